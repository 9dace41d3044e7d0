//! What an offline costs: the time to offline a range with and without
//! migratable pins over it, and what an offline against a hard pin
//! returns. `vmm bench` and the `offline_cost` and `offline_storm`
//! examples measure through these.

use std::time::{Duration, Instant};

use agent_proto::splitmix64;
use apf::{Engine, GuestAddress, GuestRange, Mode, Pin};

use crate::PAGE;

/// `count` migratable pins of 1 to 16 pages each, at places inside
/// `target` drawn from `seed`, with callbacks that do nothing.
pub fn random_pins(engine: &Engine, target: GuestRange, count: usize, seed: u64) -> Result<Vec<Pin>, String> {
    let mut x = seed;
    (0..count)
        .map(|_| {
            x = splitmix64(x);
            let pages = 1 + x % 16;
            let start = target.start.0 + (x >> 20) % (target.len / PAGE - pages) * PAGE;
            engine.pin(GuestRange::new(GuestAddress(start), pages * PAGE), |_| {}).map_err(|e| e.to_string())
        })
        .collect()
}

/// Offline times of `target`, one list of seconds per (mode, with pins),
/// in the order of `modes` and without pins first.
#[derive(Debug, Clone, Default)]
pub struct OfflineCost {
    /// Seconds per round, for each mode, without and with pins.
    pub seconds: Vec<((Mode, bool), Vec<f64>)>,
    /// Pin callbacks the last offline with pins called.
    pub pins_called: usize,
}

impl OfflineCost {
    /// The median offline time in milliseconds of `mode`, with or without
    /// pins; 0 when not measured.
    pub fn median_ms(&self, mode: Mode, pinned: bool) -> f64 {
        let v = self.seconds.iter().find(|(k, _)| *k == (mode, pinned)).map(|(_, v)| v.clone()).unwrap_or_default();
        crate::median(v) * 1e3
    }
}

/// Offlines `target` in each of `modes`, `rounds` times, without and with
/// `pins` (valid pins over it: each is fetched again, untimed, before an
/// offline with pins; they stay registered throughout). The variants are
/// interleaved in every round; every page is present (prefetched, untimed)
/// before each offline.
pub fn offline_cost(
    engine: &Engine,
    target: GuestRange,
    pins: &[Pin],
    modes: &[Mode],
    rounds: usize,
) -> Result<OfflineCost, String> {
    let deadline = || Instant::now() + Duration::from_secs(10);
    let mut cost = OfflineCost::default();
    for &mode in modes {
        for pinned in [false, true] {
            cost.seconds.push(((mode, pinned), Vec::new()));
        }
    }
    for _ in 0..rounds {
        for ((mode, pinned), samples) in cost.seconds.iter_mut() {
            if *pinned {
                for p in pins {
                    p.get(deadline()).map_err(|e| e.to_string())?;
                }
            }
            engine.prefetch(target).map_err(|e| e.to_string())?;
            let t = Instant::now();
            let report = engine.offline(target, *mode, deadline()).map_err(|e| e.to_string())?;
            samples.push(t.elapsed().as_secs_f64());
            if *pinned {
                if report.pins_called == 0 && !pins.is_empty() {
                    return Err(format!("the {mode} with pins called no pins"));
                }
                cost.pins_called = report.pins_called;
            }
        }
    }
    Ok(cost)
}

/// Takes a hard pin over `range` and tries to migrate it: an offline must
/// give up as busy rather than wait for a pin that never lets go. Returns
/// "busy" when it did, otherwise what happened.
pub fn offline_against_hard_pin(engine: &Engine, range: GuestRange) -> String {
    match engine.hard_pin(range, Instant::now() + Duration::from_secs(10)) {
        Ok(hp) => {
            let r = engine.offline(range, Mode::Migrate, Instant::now() + Duration::from_millis(300));
            drop(hp);
            match r {
                Err(e) if e.is_busy() => "busy".to_string(),
                Ok(_) => "offlined (the hard pin did not hold)".to_string(),
                Err(e) => format!("error: {e}"),
            }
        }
        Err(e) => format!("cannot take a hard pin: {e}"),
    }
}
