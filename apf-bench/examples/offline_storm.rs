//! An offline storm under load, to show that memory held by the VMM never
//! blocks offlining and that no write is lost.
//!
//! A 256 MiB region: 2 writer threads do read-increment-write on per-page
//! counters they own; 256 migratable pins over random ranges are served by 4
//! holder threads that read their memory continuously (one of them also
//! holds an io_uring fixed buffer over its first range, which its callback
//! drops); an offline thread cycles `Migrate` and `Evict` over random ranges
//! of that memory (transparent to the writers) and `Unplug` over a scratch
//! range it owns (checking that it reads zeros afterwards). Then one host
//! memory block holding region pages is offlined for real, if one
//! qualifies, and one last offline is tried against a hard pin. Every
//! counter is verified; one JSON line is printed; the exit status is
//! non-zero if a write was lost or the storm misbehaved.
//!
//! ```text
//! cargo run --release -p apf-bench --example offline_storm -- [--seconds 10] [--seed N]
//!     [--ballast-mib 512] [--no-host-block]
//! ```
//!
//! `--ballast-mib` touches that much memory before the region is faulted in:
//! a process's first pages come from recently freed memory, often in blocks
//! that also hold kernel memory and cannot go offline; the ballast makes the
//! region land in blocks that can.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_proto::splitmix64;
use apf::FixedBuffer;
use apf::{Engine, GuestAddress, GuestRam, GuestRange, HostBlockSearch, Mode, Pin, ZeroSource};
use apf_bench::offline::offline_against_hard_pin;
use vm_memory::Bytes;

const PAGE_SIZE: usize = 4096;

const REGION: usize = 256 << 20;
/// The offline thread's own range at the end of the region, for unplug.
const SCRATCH: usize = 8 << 20;
const COUNTERS: usize = REGION - SCRATCH;
const PINS: usize = 256;
const HOLDERS: usize = 4;
const WRITERS: usize = 2;

struct Args {
    seconds: u64,
    seed: u64,
    ballast: usize,
    host_block: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args { seconds: 10, seed: 1, ballast: 512 << 20, host_block: true };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{flag}: {v:?}: {e}"));
        match flag.as_str() {
            "--seconds" => {
                a.seconds = num(value()?)?;
                if a.seconds == 0 || a.seconds > 3600 {
                    return Err(format!("--seconds must be between 1 and 3600, got {}", a.seconds));
                }
            }
            "--seed" => a.seed = num(value()?)?,
            "--ballast-mib" => a.ballast = (num(value()?)?.min(16 << 10) << 20) as usize,
            "--no-host-block" => a.host_block = false,
            "-h" | "--help" => {
                return Err("usage: offline_storm [--seconds N] [--seed N] [--ballast-mib N] [--no-host-block]".into())
            }
            other => return Err(format!("unknown option {other:?} (try --help)")),
        }
    }
    Ok(a)
}

/// The word at `gpa`; a missing page is faulted in by the engine.
fn read(ram: &GuestRam, gpa: u64) -> u64 {
    ram.guest_memory().read_obj(GuestAddress(gpa)).expect("inside the region")
}

fn write(ram: &GuestRam, gpa: u64, v: u64) {
    ram.guest_memory().write_obj(v, GuestAddress(gpa)).expect("inside the region")
}

fn random_range(x: &mut u64, limit: usize, max_pages: u64) -> GuestRange {
    *x = splitmix64(*x);
    let pages = 1 + *x % max_pages;
    let start = (*x >> 24) % (limit as u64 / PAGE_SIZE as u64 - pages);
    GuestRange::new(GuestAddress(start * PAGE_SIZE as u64), pages * PAGE_SIZE as u64)
}

#[derive(Default)]
struct Tally {
    offlines: AtomicU64,
    busy: AtomicU64,
    unplug_checks: AtomicU64,
    unplug_not_zero: AtomicU64,
    errors: Mutex<Vec<String>>,
    holder_reads: AtomicU64,
    kernel_pin_drops: AtomicU64,
}

impl Tally {
    fn error(&self, e: String) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.len() < 20 {
            errors.push(e);
        }
    }
}

fn ballast(bytes: usize) -> Vec<u8> {
    vec![1u8; bytes]
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("offline_storm: {e}");
            return ExitCode::from(2);
        }
    };
    let _ballast = ballast(args.ballast);
    let ram = match GuestRam::anonymous(&[(GuestAddress(0), REGION)]) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            eprintln!("offline_storm: {e}");
            return ExitCode::FAILURE;
        }
    };
    let engine = match Engine::builder(ram.clone(), Arc::new(ZeroSource)).start() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("offline_storm: cannot start the engine: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Fault everything in, so the storm has present pages to move.
    if let Err(e) = engine.prefetch(GuestRange::new(GuestAddress(0), REGION as u64)) {
        eprintln!("offline_storm: {e}");
        return ExitCode::FAILURE;
    }
    for gpa in (0..REGION as u64).step_by(PAGE_SIZE) {
        write(&ram, gpa, 0);
    }

    let tally = Tally::default();
    let stop = AtomicBool::new(false);
    let pages = COUNTERS / PAGE_SIZE;
    let mut x = args.seed;
    let ranges: Vec<GuestRange> = (0..PINS).map(|_| random_range(&mut x, COUNTERS, 16)).collect();
    // Holder 0's first pin also holds a kernel pin, dropped by its callback.
    let kernel_pin: Arc<Mutex<Option<FixedBuffer>>> = Arc::new(Mutex::new(None));
    let mut pins: Vec<Pin> = Vec::with_capacity(PINS);
    for (i, r) in ranges.iter().enumerate() {
        let kp = (i == 0).then(|| kernel_pin.clone());
        let pin = engine.pin(*r, move |_| {
            if let Some(kp) = &kp {
                if let Some(buf) = kp.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    let _ = buf.unregister();
                }
            }
        });
        match pin {
            Ok(p) => pins.push(p),
            Err(e) => {
                eprintln!("offline_storm: pin {r}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let started = Instant::now();
    let storm_for = Duration::from_secs(args.seconds);
    let mut host_block = (String::from("not tried"), String::new());
    let mut hard_pin = String::from("not tried");

    let totals: Vec<Vec<u64>> = std::thread::scope(|s| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|t| {
                let (ram, stop, tally) = (&ram, &stop, &tally);
                std::thread::Builder::new()
                    .name(format!("writer-{t}"))
                    .spawn_scoped(s, move || {
                        let mut mine = vec![0u64; pages];
                        let mut x = splitmix64(args.seed ^ (t as u64 + 100));
                        let mut reported = 0;
                        while !stop.load(Ordering::Relaxed) {
                            x = splitmix64(x);
                            let page = (x as usize % (pages / WRITERS)) * WRITERS + t;
                            let gpa = (page * PAGE_SIZE) as u64;
                            let v = read(ram, gpa);
                            if v != mine[page] && reported < 5 {
                                tally.error(format!("writer {t}: page {gpa:#x} read {v}, wrote {}", mine[page]));
                                reported += 1;
                            }
                            write(ram, gpa, mine[page] + 1);
                            mine[page] += 1;
                        }
                        mine
                    })
                    .expect("spawn writer")
            })
            .collect();
        for h in 0..HOLDERS {
            let (pins, stop, tally, kernel_pin) = (&pins, &stop, &tally, &kernel_pin);
            std::thread::Builder::new()
                .name(format!("holder-{h}"))
                .spawn_scoped(s, move || {
                    let mine: Vec<&Pin> = pins.iter().skip(h).step_by(HOLDERS).collect();
                    while !stop.load(Ordering::Relaxed) {
                        for (k, pin) in mine.iter().enumerate() {
                            let guard = match pin.get(Instant::now() + Duration::from_secs(5)) {
                                Ok(g) => g,
                                Err(e) => {
                                    tally.error(format!("holder {h}: pin {}: {e}", pin.range()));
                                    continue;
                                }
                            };
                            if h == 0 && k == 0 {
                                let mut kp = kernel_pin.lock().unwrap_or_else(|e| e.into_inner());
                                match kp.as_mut() {
                                    None => match FixedBuffer::register(guard.host_addr(), guard.len()) {
                                        Ok(b) => *kp = Some(b),
                                        Err(e) => tally.error(format!("io_uring fixed buffer: {e}")),
                                    },
                                    Some(b) if !b.is_registered() => {
                                        tally.kernel_pin_drops.fetch_add(1, Ordering::Relaxed);
                                        if let Err(e) = b.reregister() {
                                            tally.error(format!("io_uring fixed buffer: {e}"));
                                        }
                                    }
                                    Some(_) => {}
                                }
                            }
                            // Read every page's counter through the guard.
                            let mem = guard.memory();
                            let mut sum = 0u64;
                            for off in (0..guard.len()).step_by(PAGE_SIZE) {
                                sum = sum.wrapping_add(mem.read_obj::<u64>(off).unwrap_or(0));
                            }
                            std::hint::black_box(sum);
                            tally.holder_reads.fetch_add(1, Ordering::Relaxed);
                        }
                        std::thread::sleep(Duration::from_micros(200));
                    }
                })
                .expect("spawn holder");
        }

        // The offline thread: the storm.
        let mut x = splitmix64(args.seed ^ 0xdead);
        let mut round = 0u64;
        let scratch = GuestRange::new(GuestAddress(COUNTERS as u64), SCRATCH as u64);
        while started.elapsed() < storm_for {
            round += 1;
            let (range, mode) = if round % 8 == 0 {
                for gpa in (scratch.start.0..scratch.end()).step_by(PAGE_SIZE) {
                    write(&ram, gpa + 16, gpa | 1);
                }
                (scratch, Mode::Unplug)
            } else {
                let mode = if round % 2 == 0 { Mode::Migrate } else { Mode::Evict };
                (random_range(&mut x, COUNTERS, 4096), mode)
            };
            match engine.offline(range, mode, Instant::now() + Duration::from_secs(2)) {
                Ok(_) => {
                    tally.offlines.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.is_busy() => {
                    tally.busy.fetch_add(1, Ordering::Relaxed);
                    tally.error(format!("{mode} of {range}: {e}"));
                }
                Err(e) => tally.error(format!("{mode} of {range}: {e}")),
            }
            if mode == Mode::Unplug {
                tally.unplug_checks.fetch_add(1, Ordering::Relaxed);
                let dirty = (scratch.start.0..scratch.end()).step_by(PAGE_SIZE).filter(|g| read(&ram, g + 16) != 0);
                let dirty = dirty.count() as u64;
                tally.unplug_not_zero.fetch_add(dirty, Ordering::Relaxed);
            }
        }

        if args.host_block {
            host_block = offline_one_block(&engine);
        }

        // One offline against a hard pin, which must give Busy.
        hard_pin = offline_against_hard_pin(&engine, GuestRange::new(GuestAddress(0), 16 * PAGE_SIZE as u64));

        stop.store(true, Ordering::Relaxed);
        writers.into_iter().map(|w| w.join().expect("writer panicked")).collect()
    });

    // Verify every counter.
    let mut writes = 0u64;
    let mut lost = 0u64;
    for page in 0..pages {
        let want: u64 = totals.iter().map(|t| t[page]).sum();
        writes += want;
        let got = read(&ram, (page * PAGE_SIZE) as u64);
        if got != want {
            lost += want.abs_diff(got);
            tally.error(format!("page {page}: counter {got}, expected {want}"));
        }
    }
    drop(pins);
    let stats = engine.stats();
    let errors = tally.errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let busy = tally.busy.load(Ordering::Relaxed);
    let unplug_not_zero = tally.unplug_not_zero.load(Ordering::Relaxed);
    println!(
        "{{\"seconds\":{},\"writes\":{writes},\"lost_writes\":{lost},\"offlines\":{},\"busy\":{busy},\
         \"pin_invalidations\":{},\"pin_refaults\":{},\"frames_moved\":{},\"pages_evicted\":{},\
         \"unplug_checks\":{},\"unplug_not_zero\":{unplug_not_zero},\"kernel_pin_drops\":{},\
         \"holder_reads\":{},\"deferred_faults\":{},\"host_block\":{:?},\"host_block_detail\":{:?},\"hard_pin\":{:?},\"pins_leaked\":{},\
         \"errors\":{:?}}}",
        args.seconds,
        tally.offlines.load(Ordering::Relaxed),
        stats.pin_invalidations,
        stats.pin_refaults,
        stats.frames_moved,
        stats.pages_evicted,
        tally.unplug_checks.load(Ordering::Relaxed),
        tally.kernel_pin_drops.load(Ordering::Relaxed),
        tally.holder_reads.load(Ordering::Relaxed),
        stats.deferred,
        host_block.0,
        host_block.1,
        hard_pin,
        engine.pins_registered(),
        errors,
    );
    if lost > 0 || unplug_not_zero > 0 || hard_pin != "busy" || !errors.is_empty() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Offlines one host memory block holding region pages (while writers and
/// holders keep running). Returns the outcome ("offlined", "none
/// qualified" or "error") and the details, for the report.
fn offline_one_block(engine: &Engine) -> (String, String) {
    let all = GuestRange::new(GuestAddress(0), REGION as u64);
    match engine.offline_any_host_block(all, Duration::from_millis(1500)) {
        Ok(found @ HostBlockSearch::Offlined { .. }) => ("offlined".into(), found.to_string()),
        Ok(none) => ("none qualified".into(), none.to_string()),
        Err(e) => ("error".into(), e.to_string()),
    }
}
