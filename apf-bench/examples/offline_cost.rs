//! What offlining costs, measured: the time to offline a 64 MiB range with no
//! pins and under 1,000 migratable pins, and the latency of faults served
//! while an offline storm runs next to them compared with a quiet engine.
//! Variants are interleaved round by round and the median of the rounds is
//! reported, as one JSON line.
//!
//! ```text
//! cargo run --release -p apf-bench --example offline_cost -- [--rounds 5] [--faults 20000]
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

use std::sync::Arc;

use apf::{Engine, GuestAddress, GuestRam, GuestRange, Mode, ZeroSource};
use apf_bench::latency::{fault_latency, LatencyConfig, Load};
use apf_bench::offline::{offline_cost, random_pins};
use vm_memory::Bytes;

const MIB: u64 = 1 << 20;
const PINS: usize = 1000;

fn range(start: u64, len: u64) -> GuestRange {
    GuestRange::new(GuestAddress(start), len)
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
            "--faults" => faults = n.clamp(100, 1 << 15),
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
    for gpa in (0..128 * MIB).step_by(4096) {
        ram.guest_memory().write_obj(gpa, GuestAddress(gpa)).unwrap_or_else(|e| die(e));
    }

    let pins = random_pins(&engine, target, PINS, 7).unwrap_or_else(|e| die(e));
    let cost = offline_cost(&engine, target, &pins, &[Mode::Migrate, Mode::Evict], rounds).unwrap_or_else(|e| die(e));
    drop(pins);

    // Fault latency, quiet and under a storm, interleaved.
    let loads = vec![Load::Quiet, Load::Storm { pause_us: interval_us }, Load::Storm { pause_us: 0 }, Load::Hog];
    let cfg = LatencyConfig { storm_range, fault_range: range(128 * MIB, 128 * MIB), loads, rounds, faults, nice };
    let lats = fault_latency(&engine, &ram, &cfg).unwrap_or_else(|e| die(e));
    let (quiet, storm, back, hog) = (&lats[0], &lats[1], &lats[2], &lats[3]);
    let (mig0, mig1) = (cost.median_ms(Mode::Migrate, false), cost.median_ms(Mode::Migrate, true));
    let (ev0, ev1) = (cost.median_ms(Mode::Evict, false), cost.median_ms(Mode::Evict, true));
    println!(
        "{{\"rounds\":{rounds},\"offline_64mib_ms\":{{\"migrate\":{mig0:.2},\"migrate_1000_pins\":{mig1:.2},\
         \"evict\":{ev0:.2},\"evict_1000_pins\":{ev1:.2}}},\"pins_called\":{},\
         \"offline_pins_vs_nopin\":{{\"migrate\":{:.3},\"evict\":{:.3}}},\
         \"fault_latency_us\":{{\"quiet\":[{:.1},{:.1}],\"storm\":[{:.1},{:.1}],\"storm_back_to_back\":[{:.1},{:.1}],\
         \"cpu_hog\":[{:.1},{:.1}]}},\"storm_interval_us\":{interval_us},\"storm_nice\":{nice},\"storm_offlines_per_round\":{},\
         \"fault_latency_storm_vs_quiet\":{:.3},\"back_to_back_vs_quiet\":{:.3},\"cpu_hog_vs_quiet\":{:.3},\
         \"faults_per_round\":{faults}}}",
        cost.pins_called,
        mig1 / mig0,
        ev1 / ev0,
        quiet.median_us(0),
        quiet.median_us(1),
        storm.median_us(0),
        storm.median_us(1),
        back.median_us(0),
        back.median_us(1),
        hog.median_us(0),
        hog.median_us(1),
        storm.offlines / rounds as u64,
        storm.median_us(1) / quiet.median_us(1),
        back.median_us(1) / quiet.median_us(1),
        hog.median_us(1) / quiet.median_us(1),
    );
}
