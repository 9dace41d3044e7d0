//! Working-set replay: a restored guest that touches a fixed, scattered
//! 15% of its RAM ([`agent_proto::Workload::Scattered`]), restored on
//! demand, with its working set replayed, with the set replayed and every
//! other page filled after it (eager), and from the kernel's `MAP_PRIVATE`
//! file mapping; the snapshot in the page cache (hot), then each again with
//! the snapshot's page cache dropped before the restore (cold), and both
//! again with the guest touching a set of which a tenth differs from the
//! one recorded (changed, [`ReplayCase`]). The set is recorded once, on a
//! first restore of the snapshot, page by page; every variant of a round
//! restores the same snapshot.
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

/// The conditions a round restores under: the snapshot's page cache hot
/// or dropped first (cold), and the guest touching the set recorded or a
/// set of which a tenth differs (changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayCase {
    /// Page cache hot, the set recorded: the targets.
    Hot,
    /// The snapshot's page cache dropped before each restore.
    Cold,
    /// Page cache hot, a tenth of the guest's set changed.
    Changed,
    /// Page cache cold and a tenth of the set changed.
    ChangedCold,
}

impl ReplayCase {
    /// Every case, in the order a round runs them.
    pub const ALL: [ReplayCase; 4] = [ReplayCase::Hot, ReplayCase::Cold, ReplayCase::Changed, ReplayCase::ChangedCold];

    /// The snapshot's page cache is dropped before each restore.
    pub fn cold(self) -> bool {
        matches!(self, ReplayCase::Cold | ReplayCase::ChangedCold)
    }

    /// A tenth of the guest's set differs from the recorded one.
    pub fn changed(self) -> bool {
        matches!(self, ReplayCase::Changed | ReplayCase::ChangedCold)
    }

    /// The suffix of the case's keys in the report (none for the hot,
    /// unchanged case the issue names its keys for).
    pub fn suffix(self) -> &'static str {
        match self {
            ReplayCase::Hot => "",
            ReplayCase::Cold => "_cold",
            ReplayCase::Changed => "_changed",
            ReplayCase::ChangedCold => "_changed_cold",
        }
    }
}

/// The replay part's rounds.
#[derive(Debug, Clone, Default)]
pub struct ReplayFigures {
    /// Guest RAM, bytes.
    pub bytes: u64,
    /// Pages in the working set recorded.
    pub set_pages: u64,
    /// Per round, per [`ReplayVariant::ALL`], its sample (None: it failed),
    /// the page cache hot and the set unchanged.
    pub rounds: Vec<[Option<ReplaySample>; 5]>,
    /// The same with the snapshot's page cache dropped before each restore
    /// (cold); empty when not measured.
    pub cold_rounds: Vec<[Option<ReplaySample>; 5]>,
    /// Hot, with a tenth of the guest's set changed; empty when not
    /// measured.
    pub changed_rounds: Vec<[Option<ReplaySample>; 5]>,
    /// Cold, with a tenth of the guest's set changed; empty when not
    /// measured.
    pub changed_cold_rounds: Vec<[Option<ReplaySample>; 5]>,
}

type Rounds = [[Option<ReplaySample>; 5]];

/// The ratio keys the part writes, in order: per case
/// ([`ReplayCase::ALL`]), the speed-ups of `replay` over on demand, the
/// file mapping and eager fill, the background replay's fault p99 over on
/// demand's, and the background replay's speed-up over on demand; each
/// key suffixed with its case's [`ReplayCase::suffix`].
pub const RATIO_KEYS: [&str; 20] = [
    "replay_first_pass_vs_on_demand",
    "replay_first_pass_vs_kernel_file",
    "replay_first_pass_vs_eager",
    "replay_fault_p99_vs_none",
    "replay_background_first_pass_vs_on_demand",
    "replay_first_pass_vs_on_demand_cold",
    "replay_first_pass_vs_kernel_file_cold",
    "replay_first_pass_vs_eager_cold",
    "replay_fault_p99_vs_none_cold",
    "replay_background_first_pass_vs_on_demand_cold",
    "replay_first_pass_vs_on_demand_changed",
    "replay_first_pass_vs_kernel_file_changed",
    "replay_first_pass_vs_eager_changed",
    "replay_fault_p99_vs_none_changed",
    "replay_background_first_pass_vs_on_demand_changed",
    "replay_first_pass_vs_on_demand_changed_cold",
    "replay_first_pass_vs_kernel_file_changed_cold",
    "replay_first_pass_vs_eager_changed_cold",
    "replay_fault_p99_vs_none_changed_cold",
    "replay_background_first_pass_vs_on_demand_changed_cold",
];

/// The figure keys the part writes, in order: per case, each variant's
/// time to the end of the pass, faults, vCPU blocked time and fault p99,
/// and the pages the background replay installed; then the set's pages.
pub const FIGURE_KEYS: [&str; 69] = [
    "replay_first_pass_ms",
    "on_demand_first_pass_ms",
    "eager_first_pass_ms",
    "replay_background_first_pass_ms",
    "kernel_file_first_pass_ms",
    "replay_faults",
    "on_demand_faults",
    "eager_faults",
    "replay_background_faults",
    "replay_blocked_ms",
    "on_demand_blocked_ms",
    "eager_blocked_ms",
    "replay_background_blocked_ms",
    "replay_fault_p99_us",
    "on_demand_fault_p99_us",
    "replay_background_fault_p99_us",
    "replay_background_replayed_pages",
    "replay_first_pass_ms_cold",
    "on_demand_first_pass_ms_cold",
    "eager_first_pass_ms_cold",
    "replay_background_first_pass_ms_cold",
    "kernel_file_first_pass_ms_cold",
    "replay_faults_cold",
    "on_demand_faults_cold",
    "eager_faults_cold",
    "replay_background_faults_cold",
    "replay_blocked_ms_cold",
    "on_demand_blocked_ms_cold",
    "eager_blocked_ms_cold",
    "replay_background_blocked_ms_cold",
    "replay_fault_p99_us_cold",
    "on_demand_fault_p99_us_cold",
    "replay_background_fault_p99_us_cold",
    "replay_background_replayed_pages_cold",
    "replay_first_pass_ms_changed",
    "on_demand_first_pass_ms_changed",
    "eager_first_pass_ms_changed",
    "replay_background_first_pass_ms_changed",
    "kernel_file_first_pass_ms_changed",
    "replay_faults_changed",
    "on_demand_faults_changed",
    "eager_faults_changed",
    "replay_background_faults_changed",
    "replay_blocked_ms_changed",
    "on_demand_blocked_ms_changed",
    "eager_blocked_ms_changed",
    "replay_background_blocked_ms_changed",
    "replay_fault_p99_us_changed",
    "on_demand_fault_p99_us_changed",
    "replay_background_fault_p99_us_changed",
    "replay_background_replayed_pages_changed",
    "replay_first_pass_ms_changed_cold",
    "on_demand_first_pass_ms_changed_cold",
    "eager_first_pass_ms_changed_cold",
    "replay_background_first_pass_ms_changed_cold",
    "kernel_file_first_pass_ms_changed_cold",
    "replay_faults_changed_cold",
    "on_demand_faults_changed_cold",
    "eager_faults_changed_cold",
    "replay_background_faults_changed_cold",
    "replay_blocked_ms_changed_cold",
    "on_demand_blocked_ms_changed_cold",
    "eager_blocked_ms_changed_cold",
    "replay_background_blocked_ms_changed_cold",
    "replay_fault_p99_us_changed_cold",
    "on_demand_fault_p99_us_changed_cold",
    "replay_background_fault_p99_us_changed_cold",
    "replay_background_replayed_pages_changed_cold",
    "replay_set_pages",
];

fn idx(v: ReplayVariant) -> usize {
    ReplayVariant::ALL.iter().position(|&x| x == v).unwrap_or(0)
}

impl ReplayFigures {
    /// The rounds of `case`.
    pub fn rounds_of(&self, case: ReplayCase) -> &Rounds {
        match case {
            ReplayCase::Hot => &self.rounds,
            ReplayCase::Cold => &self.cold_rounds,
            ReplayCase::Changed => &self.changed_rounds,
            ReplayCase::ChangedCold => &self.changed_cold_rounds,
        }
    }

    /// The rounds of `case`, to add to.
    pub fn rounds_of_mut(&mut self, case: ReplayCase) -> &mut Vec<[Option<ReplaySample>; 5]> {
        match case {
            ReplayCase::Hot => &mut self.rounds,
            ReplayCase::Cold => &mut self.cold_rounds,
            ReplayCase::Changed => &mut self.changed_rounds,
            ReplayCase::ChangedCold => &mut self.changed_cold_rounds,
        }
    }

    /// The median over `rounds` of `f` of variant `v`.
    fn median_of(rounds: &Rounds, v: ReplayVariant, f: impl Fn(&ReplaySample) -> Option<f64>) -> Option<f64> {
        let vals: Vec<f64> = rounds.iter().filter_map(|r| r[idx(v)].as_ref().and_then(&f)).collect();
        (!vals.is_empty()).then(|| median(vals))
    }

    /// The median over `rounds` of `f(a) / f(b)`: a speed-up of `b` over
    /// `a` when `f` is a time.
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
        use ReplayVariant::*;
        let secs = |s: &ReplaySample| Some(s.seconds);
        let values = ReplayCase::ALL.iter().flat_map(|&case| {
            let r = self.rounds_of(case);
            [
                Self::paired_over(r, OnDemand, Replay, secs),
                Self::paired_over(r, KernelFile, Replay, secs),
                Self::paired_over(r, Eager, Replay, secs),
                // The faults taken while a replay runs beside them (the
                // background replay: with a lead, the guest takes next to
                // none) over those taken with none.
                Self::paired_over(r, Background, OnDemand, |s| s.fault_p99_us),
                Self::paired_over(r, OnDemand, Background, secs),
            ]
        });
        RATIO_KEYS.iter().copied().zip(values).collect()
    }

    /// The ratios when the part did not run: 0 each.
    pub fn no_ratios() -> Vec<(&'static str, f64)> {
        RATIO_KEYS.iter().map(|&k| (k, 0.0)).collect()
    }

    /// The figures, [`FIGURE_KEYS`] order (None: not measured).
    pub fn figures(&self) -> Vec<(&'static str, Option<f64>)> {
        use ReplayVariant::*;
        let mut values = Vec::with_capacity(FIGURE_KEYS.len());
        for case in ReplayCase::ALL {
            let r = self.rounds_of(case);
            let ms = |v| Self::median_of(r, v, |s| Some(s.seconds * 1e3));
            let faults = |v| Self::median_of(r, v, |s| s.faults.map(|f| f as f64));
            let blocked = |v| Self::median_of(r, v, |s| s.blocked_us.map(|b| b / 1e3));
            let p99 = |v| Self::median_of(r, v, |s| s.fault_p99_us);
            values.extend([Replay, OnDemand, Eager, Background, KernelFile].map(ms));
            values.extend([Replay, OnDemand, Eager, Background].map(faults));
            values.extend([Replay, OnDemand, Eager, Background].map(blocked));
            values.extend([Replay, OnDemand, Background].map(p99));
            values.push(Self::median_of(r, Background, |s| Some(s.replayed_pages as f64)));
        }
        values.push((self.set_pages > 0).then_some(self.set_pages as f64));
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
        let f = ReplayFigures { bytes: 1, set_pages: 7, rounds: vec![round; 5], ..Default::default() };
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
        assert!((r["replay_background_first_pass_vs_on_demand"] - 8.0 / 7.0).abs() < 1e-9);
        // Each case reads its own rounds, under its own suffix.
        let mut slower = round;
        slower[idx(ReplayVariant::Replay)] = sample(0.4, 60, 120.0);
        let changed = ReplayFigures { changed_cold_rounds: vec![slower; 5], ..f.clone() };
        let r: std::collections::HashMap<_, _> = changed.ratios().into_iter().collect();
        let figures: std::collections::HashMap<_, _> = changed.figures().into_iter().collect();
        assert!((r["replay_first_pass_vs_on_demand_changed_cold"] - 2.0).abs() < 1e-9);
        assert!((r["replay_first_pass_vs_on_demand"] - 4.0).abs() < 1e-9, "the hot case is its own");
        assert_eq!(r["replay_first_pass_vs_on_demand_changed"], 0.0, "no hot changed rounds");
        assert_eq!(figures["replay_faults_changed_cold"], Some(60.0));
        assert_eq!(figures["replay_background_replayed_pages_changed_cold"], Some(10.0));
        assert_eq!(figures.len(), FIGURE_KEYS.len());
        assert_eq!(r.len(), RATIO_KEYS.len(), "every key once");
        // A failed variant drops out of its ratio; none left is 0.
        let mut broken = f.clone();
        broken.rounds.iter_mut().for_each(|r| r[idx(ReplayVariant::KernelFile)] = None);
        let r: std::collections::HashMap<_, _> = broken.ratios().into_iter().collect();
        assert_eq!(r["replay_first_pass_vs_kernel_file"], 0.0);
    }
}
