//! Fault latency next to an offline storm: one thread reads pages never
//! touched before, one at a time, and times each first read, while
//! another thread offlines ranges of a separate range (or only spins, or
//! does nothing). `vmm bench` and the `offline_cost` example measure
//! through this.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agent_proto::{permute, splitmix64};
use apf::{Engine, GuestAddress, GuestRam, GuestRange, Mode};
use vm_memory::Bytes;

use crate::PAGE;

/// What runs next to the faulting thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// Nothing.
    Quiet,
    /// Migrates or evicts a random range (up to 16 MiB) of the storm
    /// range, pausing this many microseconds between offlines (0: none),
    /// and faults evicted ranges back in right after, as a guest would.
    Storm {
        /// The pause between offlines.
        pause_us: u64,
    },
    /// Only spins: on a 2-core machine, the part of a storm's effect that
    /// is CPU contention, not the engine.
    Hog,
}

/// How to measure.
#[derive(Debug, Clone)]
pub struct LatencyConfig {
    /// The range the storm offlines (present pages, owned by the storm).
    pub storm_range: GuestRange,
    /// The range the faulting thread reads: fresh pages, taken in a keyed
    /// random order; once they run out it is unplugged (untimed) and read
    /// again from the start.
    pub fault_range: GuestRange,
    /// The loads, measured in this order in every round.
    pub loads: Vec<Load>,
    /// Rounds.
    pub rounds: usize,
    /// Faults timed per load and round.
    pub faults: usize,
    /// The nice value of the other thread: background offlining runs at
    /// low priority, as a VMM should run it (at nice 0, on 2 cores, a
    /// thread that merely spins triples the p99 fault latency by itself).
    pub nice: i32,
}

/// What one load measured.
#[derive(Debug, Clone, Default)]
pub struct LoadLatency {
    /// Per round: fault latency p50 and p99, in microseconds.
    pub rounds: Vec<(f64, f64)>,
    /// Offlines the storm completed, all rounds.
    pub offlines: u64,
}

impl LoadLatency {
    /// The median over rounds of p50 (`which` 0) or p99 (`which` 1).
    pub fn median_us(&self, which: usize) -> f64 {
        crate::median(self.rounds.iter().map(|p| if which == 0 { p.0 } else { p.1 }).collect())
    }
}

/// Measures fault latency under each load of `cfg`, loads interleaved in
/// every round; one result per load, in `cfg.loads`'s order.
pub fn fault_latency(engine: &Engine, ram: &GuestRam, cfg: &LatencyConfig) -> Result<Vec<LoadLatency>, String> {
    let deadline = || Instant::now() + Duration::from_secs(10);
    let mut out = vec![LoadLatency::default(); cfg.loads.len()];
    let fault_pages = cfg.fault_range.len / PAGE;
    if (cfg.faults as u64) > fault_pages || cfg.storm_range.len / PAGE < 2 {
        return Err(format!("{} faults a round do not fit {}", cfg.faults, cfg.fault_range));
    }
    let storm_pages = cfg.storm_range.len / PAGE;
    let mut cursor = 0u64;
    for round in 0..cfg.rounds * cfg.loads.len() {
        let which = round % cfg.loads.len();
        let load = cfg.loads[which];
        if cursor + cfg.faults as u64 > fault_pages {
            // Start over on fresh pages.
            engine.offline(cfg.fault_range, Mode::Unplug, deadline()).map_err(|e| e.to_string())?;
            cursor = 0;
        }
        let stop = AtomicBool::new(false);
        let done = AtomicU64::new(0);
        let mut lat = Vec::with_capacity(cfg.faults);
        let mut read_error = None;
        std::thread::scope(|sc| {
            if load != Load::Quiet {
                sc.spawn(|| {
                    // A thread's own nice value (Linux applies it per thread).
                    let _ = apf::set_thread_nice(cfg.nice);
                    let mut x = 3 + round as u64;
                    while !stop.load(Ordering::Relaxed) {
                        let pause_us = match load {
                            Load::Hog => {
                                std::hint::spin_loop();
                                continue;
                            }
                            Load::Storm { pause_us } => pause_us,
                            Load::Quiet => return,
                        };
                        if pause_us > 0 {
                            std::thread::sleep(Duration::from_micros(pause_us));
                        }
                        x = splitmix64(x);
                        let pages = 1 + x % 4096.min(storm_pages - 1);
                        let first = (x >> 24) % (storm_pages - pages);
                        let r = GuestRange::new(GuestAddress(cfg.storm_range.start.0 + first * PAGE), pages * PAGE);
                        let mode = if x & 1 == 0 { Mode::Migrate } else { Mode::Evict };
                        if engine.offline(r, mode, deadline()).is_ok() {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        if mode == Mode::Evict {
                            let _ = engine.prefetch(r);
                        }
                    }
                });
                // Let the other thread get going.
                std::thread::sleep(Duration::from_millis(20));
            }
            let mem = ram.guest_memory();
            for i in cursor..cursor + cfg.faults as u64 {
                let gpa = GuestAddress(cfg.fault_range.start.0 + permute(i, fault_pages, 11) * PAGE);
                let t = Instant::now();
                match mem.read_obj::<u64>(gpa) {
                    Ok(word) => {
                        std::hint::black_box(word);
                    }
                    Err(e) => {
                        read_error = Some(format!("read at {gpa:#x?}: {e}"));
                        break;
                    }
                }
                lat.push(t.elapsed().as_nanos() as u64);
            }
            stop.store(true, Ordering::Relaxed);
        });
        if let Some(e) = read_error {
            return Err(e);
        }
        cursor += cfg.faults as u64;
        lat.sort_unstable();
        let p = (crate::percentile(&lat, 0.5) as f64 / 1e3, crate::percentile(&lat, 0.99) as f64 / 1e3);
        out[which].rounds.push(p);
        out[which].offlines += done.load(Ordering::Relaxed);
    }
    Ok(out)
}
