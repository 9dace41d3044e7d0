//! Working-set replay: a restored guest that touches a fixed, scattered
//! 15% of its RAM ([`agent_proto::Workload::Scattered`]), restored on
//! demand, with its working set replayed, with the set replayed and every
//! other page filled after it (eager), and from the kernel's `MAP_PRIVATE`
//! file mapping; the snapshot in the page cache (hot), then each again with
//! the snapshot's page cache dropped before the restore (cold). The set is recorded
//! once, on a first restore of the snapshot, page by page; every variant
//! of a round restores the same snapshot.
//!
//! Per run: the time from the start of the restore (the VM's build: the
//! snapshot opened, RAM served, a replay's lead) to the end of the guest's
//! pass (the last vCPU's), faults, vCPU blocked time, fault p99 (the
//! engine's `apf.fault` spans). Ratios are medians over rounds of each
//! round's ratio.

use crate::median;

/// How a replay-part restore is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayVariant {
    /// The engine, on demand alone.
    OnDemand,
    /// The engine with the working set installed before the vCPUs start
    /// (a lead, bounded), the rest of it in the background.
    Replay,
    /// [`ReplayVariant::Replay`], then every other page filled in the
    /// background while the guest runs.
    Eager,
    /// The working set in the background only, from the vCPUs' start,
    /// demand first (no lead).
    Background,
    /// The snapshot file mapped `MAP_PRIVATE`, no userfaultfd.
    KernelFile,
}

impl ReplayVariant {
    /// Every variant, in the order a round runs them.
    pub const ALL: [ReplayVariant; 5] = [
        ReplayVariant::OnDemand,
        ReplayVariant::Replay,
        ReplayVariant::Eager,
        ReplayVariant::Background,
        ReplayVariant::KernelFile,
    ];

    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            ReplayVariant::OnDemand => "on_demand",
            ReplayVariant::Replay => "replay",
            ReplayVariant::Eager => "eager",
            ReplayVariant::Background => "replay_background",
            ReplayVariant::KernelFile => "kernel_file",
        }
    }
}

/// One restore's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReplaySample {
    /// From the start of the restore to the end of the guest's pass.
    pub seconds: f64,
    /// Faults the engine read (none for the kernel's file mapping).
    pub faults: Option<u64>,
    /// vCPU time blocked on faults, summed over vCPUs, µs.
    pub blocked_us: Option<f64>,
    /// The engine's fault p99, µs.
    pub fault_p99_us: Option<f64>,
    /// Pages the replay installed.
    pub replayed_pages: u64,
}

/// The replay part's rounds.
#[derive(Debug, Clone, Default)]
pub struct ReplayFigures {
    /// Guest RAM, bytes.
    pub bytes: u64,
    /// Pages in the working set recorded.
    pub set_pages: u64,
    /// Per round, per [`ReplayVariant::ALL`], its sample (None: it failed).
    pub rounds: Vec<[Option<ReplaySample>; 5]>,
    /// The same with the snapshot's page cache dropped before each restore
    /// (cold); empty when not measured.
    pub cold_rounds: Vec<[Option<ReplaySample>; 5]>,
}

type Rounds = [[Option<ReplaySample>; 5]];

/// The ratio keys the part writes, in order.
pub const RATIO_KEYS: [&str; 6] = [
    "replay_first_pass_vs_on_demand",
    "replay_first_pass_vs_kernel_file",
    "replay_first_pass_vs_eager",
    "replay_fault_p99_vs_none",
    "replay_first_pass_vs_on_demand_cold",
    "replay_first_pass_vs_kernel_file_cold",
];

/// The figure keys the part writes, in order.
pub const FIGURE_KEYS: [&str; 21] = [
    "replay_faults",
    "on_demand_faults",
    "eager_faults",
    "replay_background_faults",
    "replay_first_pass_ms",
    "on_demand_first_pass_ms",
    "eager_first_pass_ms",
    "replay_background_first_pass_ms",
    "kernel_file_first_pass_ms",
    "replay_blocked_ms",
    "on_demand_blocked_ms",
    "replay_fault_p99_us",
    "on_demand_fault_p99_us",
    "replay_background_fault_p99_us",
    "replay_set_pages",
    "replay_first_pass_ms_cold",
    "on_demand_first_pass_ms_cold",
    "eager_first_pass_ms_cold",
    "kernel_file_first_pass_ms_cold",
    "replay_faults_cold",
    "on_demand_faults_cold",
];

fn idx(v: ReplayVariant) -> usize {
    ReplayVariant::ALL.iter().position(|&x| x == v).unwrap_or(0)
}

impl ReplayFigures {
    /// The median over `rounds` of `f` of variant `v`.
    fn median_of(rounds: &Rounds, v: ReplayVariant, f: impl Fn(&ReplaySample) -> Option<f64>) -> Option<f64> {
        let vals: Vec<f64> = rounds.iter().filter_map(|r| r[idx(v)].as_ref().and_then(&f)).collect();
        (!vals.is_empty()).then(|| median(vals))
    }

    /// The median over rounds of `f(other) / f(replay)`: a speed-up when
    /// `f` is a time.
    fn paired(&self, other: ReplayVariant, f: impl Fn(&ReplaySample) -> Option<f64>) -> f64 {
        Self::paired_over(&self.rounds, other, ReplayVariant::Replay, f)
    }

    /// The median over `rounds` of `f(a) / f(b)`.
    fn paired_over(
        rounds: &Rounds,
        a: ReplayVariant,
        b: ReplayVariant,
        f: impl Fn(&ReplaySample) -> Option<f64>,
    ) -> f64 {
        let vals: Vec<f64> = rounds
            .iter()
            .filter_map(|r| {
                let (a, b) = (r[idx(a)].as_ref()?, r[idx(b)].as_ref()?);
                Some(f(a)? / f(b)?.max(1e-12))
            })
            .filter(|x| x.is_finite())
            .collect();
        if vals.is_empty() {
            0.0
        } else {
            median(vals)
        }
    }

    /// The part's ratios, [`RATIO_KEYS`] order.
    pub fn ratios(&self) -> Vec<(&'static str, f64)> {
        let secs = |s: &ReplaySample| Some(s.seconds);
        vec![
            (RATIO_KEYS[0], self.paired(ReplayVariant::OnDemand, secs)),
            (RATIO_KEYS[1], self.paired(ReplayVariant::KernelFile, secs)),
            (RATIO_KEYS[2], self.paired(ReplayVariant::Eager, secs)),
            // The faults taken while a replay runs beside them (the
            // background replay: with a lead, the guest takes next to
            // none) over those taken with none.
            (
                RATIO_KEYS[3],
                Self::paired_over(&self.rounds, ReplayVariant::Background, ReplayVariant::OnDemand, |s| s.fault_p99_us),
            ),
            (RATIO_KEYS[4], Self::paired_over(&self.cold_rounds, ReplayVariant::OnDemand, ReplayVariant::Replay, secs)),
            (
                RATIO_KEYS[5],
                Self::paired_over(&self.cold_rounds, ReplayVariant::KernelFile, ReplayVariant::Replay, secs),
            ),
        ]
    }

    /// The ratios when the part did not run: 0 each.
    pub fn no_ratios() -> Vec<(&'static str, f64)> {
        RATIO_KEYS.iter().map(|&k| (k, 0.0)).collect()
    }

    /// The figures, [`FIGURE_KEYS`] order (None: not measured).
    pub fn figures(&self) -> Vec<(&'static str, Option<f64>)> {
        use ReplayVariant::*;
        let hot = &self.rounds;
        let cold = &self.cold_rounds;
        let faults_in = |r: &Rounds, v| Self::median_of(r, v, |s| s.faults.map(|f| f as f64));
        let ms_in = |r: &Rounds, v| Self::median_of(r, v, |s| Some(s.seconds * 1e3));
        let faults = |v| faults_in(hot, v);
        let ms = |v| ms_in(hot, v);
        let blocked = |v| Self::median_of(hot, v, |s| s.blocked_us.map(|b| b / 1e3));
        let p99 = |v| Self::median_of(hot, v, |s| s.fault_p99_us);
        let values = [
            faults(Replay),
            faults(OnDemand),
            faults(Eager),
            faults(Background),
            ms(Replay),
            ms(OnDemand),
            ms(Eager),
            ms(Background),
            ms(KernelFile),
            blocked(Replay),
            blocked(OnDemand),
            p99(Replay),
            p99(OnDemand),
            p99(Background),
            (self.set_pages > 0).then_some(self.set_pages as f64),
            ms_in(cold, Replay),
            ms_in(cold, OnDemand),
            ms_in(cold, Eager),
            ms_in(cold, KernelFile),
            faults_in(cold, Replay),
            faults_in(cold, OnDemand),
        ];
        FIGURE_KEYS.iter().copied().zip(values).collect()
    }

    /// The figures as `"key":value` pairs for the report's `figures`
    /// object, null each when the part did not run.
    pub fn figures_json(figures: Option<&ReplayFigures>) -> String {
        let values = figures.map(ReplayFigures::figures);
        FIGURE_KEYS
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let v = values.as_ref().and_then(|f| f[i].1);
                format!("\"{k}\":{}", v.map_or("null".to_string(), |v| format!("{v:.3}")))
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seconds: f64, faults: u64, p99: f64) -> Option<ReplaySample> {
        Some(ReplaySample {
            seconds,
            faults: Some(faults),
            blocked_us: Some(1000.0),
            fault_p99_us: Some(p99),
            replayed_pages: 10,
        })
    }

    #[test]
    fn ratios_are_speed_ups_of_replay_over_each_other_way() {
        let round = [
            sample(0.8, 1000, 100.0),
            sample(0.2, 50, 120.0),
            sample(0.4, 40, 100.0),
            sample(0.7, 900, 120.0),
            Some(ReplaySample { seconds: 0.3, ..Default::default() }),
        ];
        let f = ReplayFigures { bytes: 1, set_pages: 7, rounds: vec![round; 5], cold_rounds: Vec::new() };
        let r: std::collections::HashMap<_, _> = f.ratios().into_iter().collect();
        assert!((r["replay_first_pass_vs_on_demand"] - 4.0).abs() < 1e-9);
        assert!((r["replay_first_pass_vs_kernel_file"] - 1.5).abs() < 1e-9);
        assert!((r["replay_first_pass_vs_eager"] - 2.0).abs() < 1e-9);
        assert!((r["replay_fault_p99_vs_none"] - 1.2).abs() < 1e-9);
        let figures: std::collections::HashMap<_, _> = f.figures().into_iter().collect();
        assert_eq!((figures["replay_faults"], figures["on_demand_faults"]), (Some(50.0), Some(1000.0)));
        assert_eq!(figures["replay_set_pages"], Some(7.0));
        assert_eq!(
            (r["replay_first_pass_vs_on_demand_cold"], figures["replay_faults_cold"]),
            (0.0, None),
            "no cold rounds"
        );
        let cold = ReplayFigures { cold_rounds: vec![round; 5], ..f.clone() };
        let r: std::collections::HashMap<_, _> = cold.ratios().into_iter().collect();
        assert!((r["replay_first_pass_vs_on_demand_cold"] - 4.0).abs() < 1e-9);
        // A failed variant drops out of its ratio; none left is 0.
        let mut broken = f.clone();
        broken.rounds.iter_mut().for_each(|r| r[idx(ReplayVariant::KernelFile)] = None);
        let r: std::collections::HashMap<_, _> = broken.ratios().into_iter().collect();
        assert_eq!(r["replay_first_pass_vs_kernel_file"], 0.0);
    }
}
