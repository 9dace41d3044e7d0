//! The guest's own view of its faults: the agents' first-access timings
//! (cycles of the guest's time-stamp counter) turned into microseconds,
//! and of them the slowest N per vCPU and phase, N being the faults the
//! engine read for that vCPU in that phase.
//!
//! Why the slowest N: most first touches find a page the engine installed
//! ahead of them (a prefetch window) and take no fault; the percentiles of
//! every touch would describe prefetch, not faults. A faulting access is
//! always slower than one that does not fault (it adds a userfaultfd round
//! trip to the same KVM path), so the N slowest are the faults, as the
//! guest saw them: from the instruction's start to its retry's end, the
//! kernel's part before the engine read the fault included. N counts every
//! fault of the vCPU thread, also those on pages the agent does not time
//! (its generation table, stack, mailbox: about one in a thousand), so the
//! set may hold a few fast touches: it errs low at its bottom, not at its
//! tail.
//!
//! The counter's rate is `KVM_GET_TSC_KHZ` of a vCPU when KVM answers,
//! otherwise a calibration against the host clock over each vCPU's first
//! phase (the hello to the phase's close; both are exits, a few
//! microseconds apart from the counter reads, over a phase that lasts
//! tens of milliseconds or more). Both are reported.

use agent_proto::timing::{phase, Histogram};

use crate::agent::{PhaseTiming, VcpuAgent};

/// A phase shorter than this does not calibrate the counter.
const MIN_CALIBRATION_MS: f64 = 20.0;

/// The guest's time-stamp counter rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TscClock {
    /// Cycles per millisecond used.
    pub khz: u64,
    /// Where `khz` came from: "kvm" or "calibrated".
    pub source: &'static str,
    /// The calibration against the host clock, when a phase was long
    /// enough (the median over vCPUs).
    pub calibrated_khz: Option<u64>,
}

/// Faults as the guest saw them in one phase (or all).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultView {
    /// First accesses timed.
    pub touches: u64,
    /// Faults the engine read for the vCPUs meanwhile: how many of the
    /// slowest accesses are taken.
    pub faults: u64,
    /// Of those, the median, 99th and 99.9th percentiles and the
    /// largest, in microseconds (None when there were no faults).
    pub p50_us: Option<f64>,
    /// 99th percentile.
    pub p99_us: Option<f64>,
    /// 99.9th percentile.
    pub p999_us: Option<f64>,
    /// Largest.
    pub max_us: Option<f64>,
}

impl FaultView {
    fn of(touches: u64, faults: u64, slowest: &Histogram, khz: u64) -> FaultView {
        let us = |c: Option<u64>| c.map(|c| c as f64 * 1e3 / khz.max(1) as f64);
        FaultView {
            touches,
            faults,
            p50_us: us(slowest.quantile(0.5)),
            p99_us: us(slowest.quantile(0.99)),
            p999_us: us(slowest.quantile(0.999)),
            max_us: us((slowest.count() > 0).then(|| slowest.max())),
        }
    }

    /// The view as a JSON object.
    pub fn to_json(&self) -> String {
        let o = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.1}"));
        format!(
            "{{\"touches\":{},\"faults\":{},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{}}}",
            self.touches,
            self.faults,
            o(self.p50_us),
            o(self.p99_us),
            o(self.p999_us),
            o(self.max_us)
        )
    }
}

/// The guest's view of a run's faults.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestView {
    /// The counter's rate.
    pub clock: TscClock,
    /// The first pass (fresh pages, or a restore's verify).
    pub touch: Option<FaultView>,
    /// Every later access (re-faults of pages an offline took).
    pub stress: Option<FaultView>,
    /// Both phases: the slowest N of each vCPU and phase, together.
    pub all: Option<FaultView>,
}

impl GuestView {
    /// The view as a JSON object.
    pub fn to_json(&self) -> String {
        let v = |f: &Option<FaultView>| f.as_ref().map_or("null".to_string(), FaultView::to_json);
        format!(
            "{{\"tsc_khz\":{},\"tsc_source\":\"{}\",\"tsc_khz_calibrated\":{},\"touch\":{},\"stress\":{},\"all\":{}}}",
            self.clock.khz,
            self.clock.source,
            self.clock.calibrated_khz.map_or("null".to_string(), |k| k.to_string()),
            v(&self.touch),
            v(&self.stress),
            v(&self.all)
        )
    }
}

/// The counter's rate from each vCPU's first phase against the host
/// clock: the median over vCPUs whose phase lasted long enough.
pub fn calibrate(agents: &[VcpuAgent]) -> Option<u64> {
    let mut rates: Vec<u64> = agents
        .iter()
        .filter_map(|a| a.timings.first())
        .filter_map(|t| {
            let host_ms = t.host.1.duration_since(t.host.0?).as_secs_f64() * 1e3;
            let cycles = t.tsc.1.checked_sub(t.tsc.0)?;
            (host_ms >= MIN_CALIBRATION_MS).then(|| (cycles as f64 / host_ms) as u64)
        })
        .collect();
    rates.sort_unstable();
    rates.get(rates.len() / 2).copied()
}

/// The guest's view of the faults in `agents`' timings, with the
/// counter's rate from KVM (`kvm_khz`) or else calibrated. None when no
/// agent sent timings, no phase carries fault counts (the latency layer
/// was off), or the rate is unknown.
pub fn guest_view(agents: &[VcpuAgent], kvm_khz: Option<u64>) -> Option<GuestView> {
    let calibrated_khz = calibrate(agents);
    let clock = match (kvm_khz.filter(|&k| k > 0), calibrated_khz) {
        (Some(khz), _) => TscClock { khz, source: "kvm", calibrated_khz },
        (None, Some(khz)) => TscClock { khz, source: "calibrated", calibrated_khz },
        (None, None) => return None,
    };
    // Per phase: touches, faults and the slowest-N histogram, all vCPUs.
    let mut phases: Vec<(u32, u64, u64, Histogram)> =
        [phase::TOUCH, phase::STRESS].iter().map(|&p| (p, 0, 0, Histogram::new())).collect();
    let mut any = false;
    for a in agents {
        let mut before = 0;
        for t in &a.timings {
            let PhaseTiming { phase, cycles, faults_by_end, .. } = t;
            let Some(by_end) = *faults_by_end else { continue };
            let faults = by_end.saturating_sub(before);
            before = by_end;
            if let Some(p) = phases.iter_mut().find(|p| p.0 == *phase) {
                any = true;
                p.1 += cycles.count();
                p.2 += faults;
                p.3.merge(&cycles.slowest(faults));
            }
        }
    }
    if !any {
        return None;
    }
    let mut all = (0, 0, Histogram::new());
    let mut view = |p: &(u32, u64, u64, Histogram)| {
        all.0 += p.1;
        all.1 += p.2;
        all.2.merge(&p.3);
        (p.1 > 0).then(|| FaultView::of(p.1, p.2, &p.3, clock.khz))
    };
    let touch = view(&phases[0]);
    let stress = view(&phases[1]);
    let all = (all.0 > 0).then(|| FaultView::of(all.0, all.1, &all.2, clock.khz));
    Some(GuestView { clock, touch, stress, all })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn timing(
        phase: u32,
        values: &[(u64, u64)],
        faults_by_end: u64,
        host: (Instant, Instant),
        tsc: u64,
    ) -> PhaseTiming {
        let mut cycles = Histogram::new();
        for &(v, n) in values {
            for _ in 0..n {
                cycles.record(v);
            }
        }
        PhaseTiming {
            phase,
            cycles,
            tsc: (1000, 1000 + tsc),
            host: (Some(host.0), host.1),
            faults_by_end: Some(faults_by_end),
        }
    }

    #[test]
    fn the_slowest_n_of_each_phase_are_the_faults() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(100);
        // 1 GHz: 1,000 cycles a microsecond. vCPU 0: 900 fast touches
        // (2 µs) and 100 faults of 50 µs, one of 5 ms; then a stress
        // phase with 10 re-faults of 200 µs among 10,000 accesses.
        let mut a = VcpuAgent::default();
        a.timings.push(timing(phase::TOUCH, &[(2_000, 900), (50_000, 99), (5_000_000, 1)], 100, (t0, t1), 100_000_000));
        a.timings.push(timing(phase::STRESS, &[(300, 9_990), (200_000, 10)], 110, (t1, t1), 0));
        let v = guest_view(&[a.clone()], Some(1_000_000)).unwrap();
        assert_eq!(v.clock.source, "kvm");
        assert_eq!(v.clock.calibrated_khz, Some(1_000_000), "100M cycles in 100 ms");
        let touch = v.touch.unwrap();
        assert_eq!((touch.touches, touch.faults), (1000, 100));
        // The median fault is 50 µs (bucket edge: at most 12.5% above),
        // not the 2 µs of a prefetched page.
        let p50 = touch.p50_us.unwrap();
        assert!((50.0..=56.25).contains(&p50), "{p50}");
        assert_eq!(touch.max_us, Some(5000.0));
        let stress = v.stress.unwrap();
        assert_eq!((stress.touches, stress.faults), (10_000, 10), "faults counted from the touch phase's end");
        assert!(stress.p50_us.unwrap() >= 200.0);
        let all = v.all.unwrap();
        assert_eq!((all.touches, all.faults), (11_000, 110));
        assert_eq!(all.max_us, Some(5000.0));

        // Without KVM's rate, the calibration is used.
        let v = guest_view(&[a.clone()], None).unwrap();
        assert_eq!((v.clock.source, v.clock.khz), ("calibrated", 1_000_000));
        // No fault counts (no latency layer): no view.
        for t in &mut a.timings {
            t.faults_by_end = None;
        }
        assert_eq!(guest_view(&[a], Some(1)), None);
        // A phase too short to calibrate, and no KVM rate: no view.
        let mut b = VcpuAgent::default();
        b.timings.push(timing(phase::TOUCH, &[(10, 1)], 1, (t0, t0 + Duration::from_millis(1)), 1_000_000));
        assert_eq!(calibrate(std::slice::from_ref(&b)), None);
        assert_eq!(guest_view(&[b], None), None);
    }

    #[test]
    fn a_phase_without_faults_has_no_percentiles() {
        let t0 = Instant::now();
        let mut a = VcpuAgent::default();
        a.timings.push(timing(phase::TOUCH, &[(2_000, 50)], 0, (t0, t0), 0));
        let touch = guest_view(&[a], Some(1000)).unwrap().touch.unwrap();
        assert_eq!((touch.touches, touch.faults, touch.p99_us, touch.max_us), (50, 0, None, None));
        assert!(touch.to_json().contains("\"p99_us\":null"));
    }
}
