//! What offlining costs, measured: the time to offline a 64 MiB range with no
//! pins and under 1,000 migratable pins, and the latency of faults served
//! while an offline storm runs next to them compared with a quiet engine.
//! Variants are interleaved round by round and the median of the rounds is
//! reported, as one JSON line.
//!
//! ```text
//! cargo run --release -p apf --example offline_cost -- [--rounds 5] [--faults 20000]
//!     [--storm-interval-us 1000] [--storm-nice 19]
//! ```
//!
//! - Offline: 64 MiB of present pages, `Migrate` and `Evict` (evicted pages
//!   are faulted back in between rounds, untimed). The pins cover random
//!   ranges of 1 to 16 pages inside the range; every callback is called.
//! - Fault latency: one thread reads random pages of a 128 MiB range never
//!   touched before (one fault each, zero source); the time of each first
//!   read is recorded. Variants, interleaved:
//!   - `quiet`: nothing else runs;
//!   - `storm`: another thread migrates or evicts a random range (up to
//!     16 MiB) of a separate 64 MiB range every `--storm-interval-us`
//!     (default 1000), faulting evicted ranges back in right after, as a
//!     guest would;
//!   - `storm_back_to_back`: the same with no pause;
//!   - `cpu_hog`: the other thread only spins. On a 2-core machine this is
//!     the part of the storm's effect that is CPU contention, not the
//!     engine.
//!
//!   The other thread runs at nice `--storm-nice` (default 19), as a VMM
//!   should run background offlining: at nice 0, on 2 cores, a thread that
//!   merely spins triples the p99 fault latency by itself.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apf::{splitmix64, Engine, GuestAddress, GuestRam, GuestRange, Mode, Pin, ZeroSource, PAGE_SIZE};

const MIB: u64 = 1 << 20;
const PINS: usize = 1000;

fn range(start: u64, len: u64) -> GuestRange {
    GuestRange::new(GuestAddress(start), len)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn die(e: impl std::fmt::Display) -> ! {
    eprintln!("offline_cost: {e}");
    std::process::exit(1)
}

fn main() {
    let mut rounds = 5usize;
    let mut faults = 20_000usize;
    let mut interval_us = 1000u64;
    let mut nice = 19i32;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().unwrap_or_else(|| die(format!("{flag} needs a value")));
        let n: usize = v.parse().unwrap_or_else(|e| die(format!("{flag}: {v:?}: {e}")));
        match flag.as_str() {
            "--rounds" => rounds = n.clamp(1, 100),
            "--faults" => faults = n.clamp(100, 1 << 20),
            "--storm-interval-us" => interval_us = (n as u64).min(1_000_000),
            "--storm-nice" => nice = n.min(19) as i32,
            _ => die(format!(
                "unknown option {flag:?} (expected --rounds N, --faults N, --storm-interval-us N, --storm-nice N)"
            )),
        }
    }

    // Layout: [0, 64 MiB) offlined range; [64, 128) storm range;
    // [128, 256) fault range.
    let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), (256 * MIB) as usize)]).unwrap_or_else(|e| die(e)));
    let engine = Engine::builder(ram.clone(), Arc::new(ZeroSource)).start().unwrap_or_else(|e| die(e));
    let target = range(0, 64 * MIB);
    let storm_range = range(64 * MIB, 64 * MIB);
    let touch = |r: GuestRange| {
        for gpa in (r.start.0..r.end()).step_by(PAGE_SIZE) {
            let p = ram.host_range(GuestAddress(gpa), 8).unwrap_or_else(|e| die(e)) as *mut u64;
            // SAFETY: `p` points at 8 bytes of guest RAM, mapped while `ram`
            // lives; the engine resolves the fault.
            unsafe { std::ptr::write_volatile(p, gpa) };
        }
    };
    touch(target);
    touch(storm_range);

    let mut x = 7u64;
    let pins: Vec<Pin> = (0..PINS)
        .map(|_| {
            x = splitmix64(x);
            let pages = 1 + x % 16;
            let start = (x >> 20) % (target.len / PAGE_SIZE as u64 - pages) * PAGE_SIZE as u64;
            engine.pin(range(start, pages * PAGE_SIZE as u64), |_| {}).unwrap_or_else(|e| die(e))
        })
        .collect();
    let deadline = || Instant::now() + Duration::from_secs(10);

    // Offline cost: (mode, pinned) -> seconds per round.
    let mut times: Vec<((Mode, bool), Vec<f64>)> = Vec::new();
    for mode in [Mode::Migrate, Mode::Evict] {
        for pinned in [false, true] {
            times.push(((mode, pinned), Vec::new()));
        }
    }
    let mut pins_called = 0;
    let mut spare = Some(pins);
    let mut held: Vec<Pin> = Vec::new();
    for _ in 0..rounds {
        for ((mode, pinned), samples) in times.iter_mut() {
            // Register or drop the pins for this variant (untimed).
            if *pinned && held.is_empty() {
                held = spare.take().unwrap_or_default();
            } else if !*pinned && !held.is_empty() {
                spare = Some(std::mem::take(&mut held));
            }
            for p in &held {
                p.get(deadline()).unwrap_or_else(|e| die(e));
            }
            engine.prefetch(target).unwrap_or_else(|e| die(e));
            let t = Instant::now();
            let report = engine.offline(target, *mode, deadline()).unwrap_or_else(|e| die(e));
            samples.push(t.elapsed().as_secs_f64());
            if *pinned {
                pins_called = report.pins_called;
            }
        }
    }
    drop(held);
    drop(spare);

    // Fault latency, quiet and under a storm, interleaved.
    let fault_pages = (128 * MIB) as usize / PAGE_SIZE;
    let mut order: Vec<usize> = (0..fault_pages).collect();
    let mut s = 11u64;
    for i in (1..order.len()).rev() {
        s = splitmix64(s);
        order.swap(i, (s % (i as u64 + 1)) as usize);
    }
    let mut cursor = 0usize;
    #[derive(Clone, Copy, PartialEq)]
    enum Load {
        Quiet,
        Storm(u64),
        Hog,
    }
    let loads = [Load::Quiet, Load::Storm(interval_us), Load::Storm(0), Load::Hog];
    let mut lats: Vec<Vec<(f64, f64)>> = vec![Vec::new(); loads.len()];
    let mut storm_offlines = 0u64;
    for round in 0..rounds * loads.len() {
        let which = round % loads.len();
        let load = loads[which];
        if cursor + faults > fault_pages {
            // Start over on a fresh set: evict the fault range (untimed).
            engine.offline(range(128 * MIB, 128 * MIB), Mode::Unplug, deadline()).unwrap_or_else(|e| die(e));
            cursor = 0;
        }
        let stop = AtomicBool::new(false);
        let done = AtomicU64::new(0);
        let mut lat = Vec::with_capacity(faults);
        std::thread::scope(|sc| {
            if load != Load::Quiet {
                sc.spawn(|| {
                    let mut x = 3u64 + round as u64;
                    // Background offlining runs at low priority, as a VMM
                    // should run it (on Linux, a thread's own nice value).
                    let _ = apf::set_thread_nice(nice);
                    while !stop.load(Ordering::Relaxed) {
                        let pause = match load {
                            Load::Hog => {
                                std::hint::spin_loop();
                                continue;
                            }
                            Load::Storm(us) => us,
                            Load::Quiet => unreachable!(),
                        };
                        if pause > 0 {
                            std::thread::sleep(Duration::from_micros(pause));
                        }
                        x = splitmix64(x);
                        let pages = 1 + x % 4096;
                        let r =
                            range(64 * MIB + (x >> 24) % (16384 - pages) * PAGE_SIZE as u64, pages * PAGE_SIZE as u64);
                        let mode = if x & 1 == 0 { Mode::Migrate } else { Mode::Evict };
                        if engine.offline(r, mode, deadline()).is_ok() {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        if mode == Mode::Evict {
                            let _ = engine.prefetch(r);
                        }
                    }
                });
                // Let the storm get going.
                std::thread::sleep(Duration::from_millis(20));
            }
            for &page in &order[cursor..cursor + faults] {
                let gpa = 128 * MIB + (page * PAGE_SIZE) as u64;
                let p = ram.host_range(GuestAddress(gpa), 8).unwrap_or_else(|e| die(e)) as *const u64;
                let t = Instant::now();
                // SAFETY: as in `touch`.
                std::hint::black_box(unsafe { std::ptr::read_volatile(p) });
                lat.push(t.elapsed().as_nanos() as u64);
            }
            stop.store(true, Ordering::Relaxed);
        });
        cursor += faults;
        lat.sort_unstable();
        let (p50, p99) = (percentile(&lat, 0.5) as f64 / 1e3, percentile(&lat, 0.99) as f64 / 1e3);
        lats[which].push((p50, p99));
        if load == Load::Storm(interval_us) {
            storm_offlines += done.load(Ordering::Relaxed);
        }
    }
    let med = |v: &[(f64, f64)], i: usize| {
        let mut col: Vec<f64> = v.iter().map(|p| if i == 0 { p.0 } else { p.1 }).collect();
        median(&mut col)
    };
    let ms = |mode: Mode, pinned: bool| {
        let mut v = times.iter().find(|(k, _)| *k == (mode, pinned)).map(|(_, v)| v.clone()).unwrap_or_default();
        median(&mut v) * 1e3
    };
    let (mig0, mig1, ev0, ev1) =
        (ms(Mode::Migrate, false), ms(Mode::Migrate, true), ms(Mode::Evict, false), ms(Mode::Evict, true));
    let (quiet, storm, back, hog) = (&lats[0], &lats[1], &lats[2], &lats[3]);
    println!(
        "{{\"rounds\":{rounds},\"offline_64mib_ms\":{{\"migrate\":{mig0:.2},\"migrate_1000_pins\":{mig1:.2},\
         \"evict\":{ev0:.2},\"evict_1000_pins\":{ev1:.2}}},\"pins_called\":{pins_called},\
         \"offline_pins_vs_nopin\":{{\"migrate\":{:.3},\"evict\":{:.3}}},\
         \"fault_latency_us\":{{\"quiet\":[{:.1},{:.1}],\"storm\":[{:.1},{:.1}],\"storm_back_to_back\":[{:.1},{:.1}],\
         \"cpu_hog\":[{:.1},{:.1}]}},\"storm_interval_us\":{interval_us},\"storm_nice\":{nice},\"storm_offlines_per_round\":{},\
         \"fault_latency_storm_vs_quiet\":{:.3},\"back_to_back_vs_quiet\":{:.3},\"cpu_hog_vs_quiet\":{:.3},\
         \"faults_per_round\":{faults}}}",
        mig1 / mig0,
        ev1 / ev0,
        med(quiet, 0),
        med(quiet, 1),
        med(storm, 0),
        med(storm, 1),
        med(back, 0),
        med(back, 1),
        med(hog, 0),
        med(hog, 1),
        storm_offlines / rounds as u64,
        med(storm, 1) / med(quiet, 1),
        med(back, 1) / med(quiet, 1),
        med(hog, 1) / med(quiet, 1),
    );
}
