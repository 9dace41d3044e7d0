//! Guest fault latency quiet and next to a host offline storm, side by
//! side in every round: the same guest run (two vCPUs, sequential passes
//! that check and rewrite every page, for a fixed time) once with no
//! offlining and once next to a storm of migrates and evictions of ranges
//! up to 64 MiB, then once next to a real host memory-block offline. Each
//! run reports the engine's view (its `apf.fault` spans) and the guest's
//! own (its first-access timings, the slowest N, N the faults the engine
//! read for its vCPUs), the vCPUs' blocked time, the device pin's
//! re-faults and callback time. The figures are medians over rounds; the
//! ratios pair each storm run with the quiet run of its round.
//!
//! A host block offline leaves every page present (the kernel migrates
//! them; KVM follows through its MMU notifier), so it causes no faults of
//! its own: what it could do is hold up the faults that happen meanwhile.
//! Its run therefore starts the block offline 0.2 s into a first pass of
//! 256 MiB (about a second of faulting), and reports that pass's faults.
//!
//! This crate never touches KVM: a VMM runs the guest through
//! [`crate::GuestPass::guest_storm`] (`vmm bench --only guest-storm`).

use std::time::Duration;

use crate::{median, MIB};

/// The storm next to a guest run: an offline every `every`, of a range
/// drawn uniformly from 1 page to `max_bytes` anywhere in guest RAM,
/// migrate and evict in turn (one in four on the device's pinned ring),
/// from one thread at nice 19.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StormSpec {
    /// Time between offlines (an offline longer than this delays the
    /// next; none overlap).
    pub every: Duration,
    /// Largest range.
    pub max_bytes: u64,
}

/// The bench's storm: every 50 ms, ranges up to 64 MiB.
pub const BENCH_STORM: StormSpec = StormSpec { every: Duration::from_millis(50), max_bytes: 64 * MIB };

/// One guest run of this part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestStormRun {
    /// Guest RAM.
    pub bytes: u64,
    /// How long the agents run passes (the first pass faults every page
    /// in; the later ones re-touch them).
    pub duration: Duration,
    /// The host storm; None: quiet.
    pub storm: Option<StormSpec>,
    /// Offline one real host memory block holding guest pages, halfway.
    pub host_block: bool,
}

/// A latency tail, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Tail {
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
}

/// What one guest run measured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GuestStormSample {
    /// The engine's view: `apf.fault` spans of the whole run.
    pub engine: Option<Tail>,
    /// The guest's view: its slowest first accesses, as many as the
    /// engine read faults for its vCPUs, both phases.
    pub guest: Option<Tail>,
    /// The guest's view of the first pass alone (fresh pages).
    pub guest_touch: Option<Tail>,
    /// The guest's view of the stress phase alone (after the first pass):
    /// faults there are re-faults of pages an offline took.
    pub guest_stress: Option<Tail>,
    /// Faults the engine read for the vCPUs.
    pub vcpu_faults: u64,
    /// Time the vCPUs were blocked on them, µs.
    pub vcpu_blocked_us: f64,
    /// Faults that waited for an offline holding their page.
    pub deferred_faults: u64,
    /// `apf.pin` p99, µs: the device pin faulting its ring in again.
    pub pin_refault_p99_us: Option<f64>,
    /// Time inside the device's pin callback, p99, µs.
    pub pin_callback_p99_us: Option<f64>,
    /// Storm offlines completed.
    pub offlines: u64,
    /// The host block offline: "offlined", "none qualified", ... or "off".
    pub host_block: String,
    /// Where the slowest faults' time went (the latency layer's tail
    /// breakdown): percent of their time per cause of [`TAIL_CAUSES`].
    pub tail_causes_pct: Vec<(&'static str, f64)>,
}

/// The causes a slow fault's time is split into (see
/// `apf::TailBreakdown`), as the figures name them.
pub const TAIL_CAUSES: [&str; 7] = ["deferred", "queued", "waited", "lock", "fill", "install", "other"];

impl GuestStormSample {
    fn blocked_per_fault_us(&self) -> Option<f64> {
        (self.vcpu_faults > 0).then(|| self.vcpu_blocked_us / self.vcpu_faults as f64)
    }
}

/// Every round's runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuestStormFigures {
    /// Guest RAM of the runs.
    pub bytes: u64,
    /// The storm.
    pub storm: Option<StormSpec>,
    /// Per round: quiet, storm.
    pub rounds: Vec<(GuestStormSample, GuestStormSample)>,
    /// Per round: the run next to a host block offline.
    pub host_block: Vec<GuestStormSample>,
    /// Offlining 64 MiB (Migrate, no pins): median ms.
    pub offline_64mib_ms: Option<f64>,
}

/// The median of the values present; None when none is.
fn median_of(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = v.flatten().collect();
    (!v.is_empty()).then(|| median(v))
}

/// The keys [`GuestStormFigures::figures`] writes, in order.
pub const FIGURE_KEYS: [&str; 42] = [
    "guest_fault_p99_us_quiet",
    "guest_fault_p999_us_quiet",
    "guest_fault_max_us_quiet",
    "guest_fault_p99_us_quiet_guest_view",
    "guest_fault_p999_us_quiet_guest_view",
    "guest_fault_max_us_quiet_guest_view",
    "guest_fault_p99_us_storm",
    "guest_fault_p999_us_storm",
    "guest_fault_max_us_storm",
    "guest_fault_max_us_storm_all_rounds",
    "guest_fault_p99_us_storm_guest_view",
    "guest_fault_p999_us_storm_guest_view",
    "guest_fault_max_us_storm_guest_view",
    "guest_refault_p99_us_storm_guest_view",
    "guest_blocked_per_fault_us_quiet",
    "guest_blocked_per_fault_us_storm",
    "storm_refaulted_pages",
    "storm_deferred_faults",
    "storm_offlines",
    "pin_refault_p99_us",
    "pin_callback_p99_us",
    "offline_64mib_ms",
    "host_block_fault_p99_us",
    "host_block_fault_max_us",
    "host_block_fault_p99_us_engine_view",
    "host_block_fault_max_us_engine_view",
    "host_block_offlined_rounds",
    "guest_storm_rounds",
    "fault_tail_deferred_pct_quiet",
    "fault_tail_queued_pct_quiet",
    "fault_tail_waited_pct_quiet",
    "fault_tail_lock_pct_quiet",
    "fault_tail_fill_pct_quiet",
    "fault_tail_install_pct_quiet",
    "fault_tail_other_pct_quiet",
    "fault_tail_deferred_pct_storm",
    "fault_tail_queued_pct_storm",
    "fault_tail_waited_pct_storm",
    "fault_tail_lock_pct_storm",
    "fault_tail_fill_pct_storm",
    "fault_tail_install_pct_storm",
    "fault_tail_other_pct_storm",
];

/// The keys [`GuestStormFigures::ratios`] writes, in order.
pub const RATIO_KEYS: [&str; 3] = [
    "guest_fault_p99_storm_vs_quiet",
    "guest_fault_p99_storm_vs_quiet_guest_view",
    "guest_blocked_per_fault_storm_vs_quiet",
];

impl GuestStormFigures {
    fn quiet(&self) -> impl Iterator<Item = &GuestStormSample> {
        self.rounds.iter().map(|r| &r.0)
    }

    fn storm(&self) -> impl Iterator<Item = &GuestStormSample> {
        self.rounds.iter().map(|r| &r.1)
    }

    /// The figures, [`FIGURE_KEYS`] in order; None: not measured.
    pub fn figures(&self) -> Vec<(&'static str, Option<f64>)> {
        let tail = |s: &GuestStormSample, guest: bool| if guest { s.guest } else { s.engine };
        let q = |f: fn(&Tail) -> f64, guest: bool| median_of(self.quiet().map(|s| tail(s, guest).as_ref().map(f)));
        let st = |f: fn(&Tail) -> f64, guest: bool| median_of(self.storm().map(|s| tail(s, guest).as_ref().map(f)));
        type Pick = fn(&Tail) -> f64;
        let (p99, p999, max): (Pick, Pick, Pick) = (|t| t.p99_us, |t| t.p999_us, |t| t.max_us);
        let max_all = self.storm().filter_map(|s| s.engine.map(|t| t.max_us)).reduce(f64::max);
        let refaulted =
            median_of(self.rounds.iter().map(|(q, s)| Some((s.vcpu_faults as f64 - q.vcpu_faults as f64).max(0.0))));
        // Only runs where a block went offline and the guest re-faulted.
        let offlined: Vec<&GuestStormSample> = self.host_block.iter().filter(|s| s.host_block == "offlined").collect();
        let hb = |f: fn(&Tail) -> f64| median_of(offlined.iter().map(|s| s.guest_touch.as_ref().map(f)));
        let hb_engine = |f: fn(&Tail) -> f64| median_of(offlined.iter().map(|s| s.engine.as_ref().map(f)));
        let rounds = (!self.rounds.is_empty()).then_some(self.rounds.len() as f64);
        let cause = |runs: Vec<&GuestStormSample>, c: &str| {
            median_of(runs.into_iter().map(|s| s.tail_causes_pct.iter().find(|(n, _)| *n == c).map(|(_, v)| *v)))
        };
        let quiet_causes = TAIL_CAUSES.map(|c| cause(self.quiet().collect(), c));
        let storm_causes = TAIL_CAUSES.map(|c| cause(self.storm().collect(), c));
        let values = [
            q(p99, false),
            q(p999, false),
            q(max, false),
            q(p99, true),
            q(p999, true),
            q(max, true),
            st(p99, false),
            st(p999, false),
            st(max, false),
            max_all,
            st(p99, true),
            st(p999, true),
            st(max, true),
            median_of(self.storm().map(|s| s.guest_stress.map(|t| t.p99_us))),
            median_of(self.quiet().map(GuestStormSample::blocked_per_fault_us)),
            median_of(self.storm().map(GuestStormSample::blocked_per_fault_us)),
            refaulted,
            median_of(self.storm().map(|s| Some(s.deferred_faults as f64))),
            median_of(self.storm().map(|s| Some(s.offlines as f64))),
            median_of(self.storm().map(|s| s.pin_refault_p99_us)),
            median_of(self.storm().map(|s| s.pin_callback_p99_us)),
            self.offline_64mib_ms,
            hb(p99),
            hb(max),
            hb_engine(p99),
            hb_engine(max),
            (!self.host_block.is_empty()).then_some(offlined.len() as f64),
            rounds,
            quiet_causes[0],
            quiet_causes[1],
            quiet_causes[2],
            quiet_causes[3],
            quiet_causes[4],
            quiet_causes[5],
            quiet_causes[6],
            storm_causes[0],
            storm_causes[1],
            storm_causes[2],
            storm_causes[3],
            storm_causes[4],
            storm_causes[5],
            storm_causes[6],
        ];
        FIGURE_KEYS.iter().copied().zip(values).collect()
    }

    /// The ratios, [`RATIO_KEYS`] in order: each storm run over the
    /// quiet run of its round, then the median; 0 when not measured.
    pub fn ratios(&self) -> Vec<(&'static str, f64)> {
        let paired = |f: &dyn Fn(&GuestStormSample) -> Option<f64>| {
            let v: Vec<f64> = self
                .rounds
                .iter()
                .filter_map(|(q, s)| Some(f(s)? / f(q)?.max(1e-9)))
                .filter(|r| r.is_finite())
                .collect();
            median(v)
        };
        let values = [
            paired(&|s| s.engine.map(|t| t.p99_us)),
            paired(&|s| s.guest.map(|t| t.p99_us)),
            paired(&GuestStormSample::blocked_per_fault_us),
        ];
        RATIO_KEYS.iter().copied().zip(values).collect()
    }

    /// The figures as the members of a JSON object (no braces): every
    /// key of [`FIGURE_KEYS`], null when not measured.
    pub fn figures_json(figures: Option<&GuestStormFigures>) -> String {
        let figures = figures.map(GuestStormFigures::figures);
        let fields: Vec<String> = FIGURE_KEYS
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let v = figures.as_ref().and_then(|f| f[i].1);
                format!("\"{k}\":{}", v.filter(|v| v.is_finite()).map_or("null".to_string(), |v| format!("{v:.1}")))
            })
            .collect();
        fields.join(",")
    }

    /// Lines for the bench's table.
    pub fn table(&self) -> String {
        let f: std::collections::HashMap<_, _> = self.figures().into_iter().collect();
        let o = |k: &str| f.get(k).copied().flatten().map_or("-".to_string(), |v| format!("{v:.1}"));
        let storm = self.storm.map_or("none".to_string(), |s| {
            format!("an offline every {} ms, up to {} MiB, migrate/evict", s.every.as_millis(), s.max_bytes / MIB)
        });
        let mut s = format!("guest faults ({} MiB, {} rounds; storm: {storm})\n", self.bytes / MIB, self.rounds.len());
        s += &format!(
            "  quiet  engine p99/p99.9/max {}/{}/{} µs, guest view {}/{}/{} µs, blocked {} µs a fault\n",
            o("guest_fault_p99_us_quiet"),
            o("guest_fault_p999_us_quiet"),
            o("guest_fault_max_us_quiet"),
            o("guest_fault_p99_us_quiet_guest_view"),
            o("guest_fault_p999_us_quiet_guest_view"),
            o("guest_fault_max_us_quiet_guest_view"),
            o("guest_blocked_per_fault_us_quiet"),
        );
        s += &format!(
            "  storm  engine p99/p99.9/max {}/{}/{} µs, guest view {}/{}/{} µs, blocked {} µs a fault\n",
            o("guest_fault_p99_us_storm"),
            o("guest_fault_p999_us_storm"),
            o("guest_fault_max_us_storm"),
            o("guest_fault_p99_us_storm_guest_view"),
            o("guest_fault_p999_us_storm_guest_view"),
            o("guest_fault_max_us_storm_guest_view"),
            o("guest_blocked_per_fault_us_storm"),
        );
        s += &format!(
            "  storm: {} offlines a run, {} pages re-faulted, {} faults deferred; pin re-fault p99 {} µs, callback p99 {} µs\n",
            o("storm_offlines"),
            o("storm_refaulted_pages"),
            o("storm_deferred_faults"),
            o("pin_refault_p99_us"),
            o("pin_callback_p99_us"),
        );
        s += &format!(
            "  host block: offlined in {} runs; guest view p99/max {}/{} µs; offline 64 MiB {} ms\n",
            o("host_block_offlined_rounds"),
            o("host_block_fault_p99_us"),
            o("host_block_fault_max_us"),
            o("offline_64mib_ms"),
        );
        for run in ["quiet", "storm"] {
            let parts: Vec<String> = TAIL_CAUSES
                .iter()
                .filter_map(|c| f.get(format!("fault_tail_{c}_pct_{run}").as_str()).copied().flatten().map(|v| (c, v)))
                .filter(|(_, v)| *v >= 0.5)
                .map(|(c, v)| format!("{c} {v:.0}%"))
                .collect();
            if !parts.is_empty() {
                s += &format!("  slowest 0.1% of faults, {run}: {}\n", parts.join(", "));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(p99: f64, guest_p99: f64, faults: u64, blocked_us: f64) -> GuestStormSample {
        let tail = |p99: f64| Some(Tail { p99_us: p99, p999_us: p99 * 2.0, max_us: p99 * 4.0 });
        GuestStormSample {
            engine: tail(p99),
            guest: tail(guest_p99),
            guest_touch: tail(guest_p99 * 5.0),
            guest_stress: tail(guest_p99 * 3.0),
            vcpu_faults: faults,
            vcpu_blocked_us: blocked_us,
            deferred_faults: 7,
            pin_refault_p99_us: Some(900.0),
            pin_callback_p99_us: Some(0.2),
            offlines: 20,
            host_block: "off".into(),
            tail_causes_pct: vec![("deferred", 10.0), ("other", 90.0)],
        }
    }

    #[test]
    fn figures_are_medians_and_ratios_pair_rounds() {
        let rounds = vec![
            (sample(100.0, 200.0, 1000, 50_000.0), sample(150.0, 300.0, 1100, 110_000.0)),
            (sample(1000.0, 2000.0, 1000, 50_000.0), sample(1000.0, 2000.0, 1300, 65_000.0)),
            (sample(120.0, 240.0, 1000, 60_000.0), sample(240.0, 480.0, 1200, 72_000.0)),
        ];
        let mut hb = sample(0.0, 0.0, 0, 0.0);
        hb.host_block = "offlined".into();
        hb.guest_touch = Some(Tail { p99_us: 800.0, p999_us: 900.0, max_us: 4000.0 });
        let none = GuestStormSample { host_block: "none qualified".into(), ..sample(1.0, 1.0, 1, 1.0) };
        let figures = GuestStormFigures {
            bytes: 128 * MIB,
            storm: Some(BENCH_STORM),
            rounds,
            host_block: vec![hb, none],
            offline_64mib_ms: Some(41.5),
        };
        let f: std::collections::HashMap<_, _> = figures.figures().into_iter().collect();
        assert_eq!(f["guest_fault_p99_us_quiet"], Some(120.0));
        assert_eq!(f["guest_fault_p999_us_quiet_guest_view"], Some(480.0));
        assert_eq!(f["guest_fault_max_us_storm"], Some(960.0));
        assert_eq!(f["guest_fault_max_us_storm_all_rounds"], Some(4000.0));
        assert_eq!(f["storm_refaulted_pages"], Some(200.0), "storm faults over quiet, per round: 100, 300, 200");
        assert_eq!(f["pin_refault_p99_us"], Some(900.0));
        assert_eq!(f["offline_64mib_ms"], Some(41.5));
        // Only the run where a block went offline counts.
        assert_eq!((f["host_block_fault_p99_us"], f["host_block_fault_max_us"]), (Some(800.0), Some(4000.0)));
        assert_eq!(f["host_block_offlined_rounds"], Some(1.0));
        let r: std::collections::HashMap<_, _> = figures.ratios().into_iter().collect();
        // Per round 1.5, 1.0, 2.0: the median, not the ratio of medians.
        assert_eq!(r["guest_fault_p99_storm_vs_quiet"], 1.5);
        assert_eq!(r["guest_fault_p99_storm_vs_quiet_guest_view"], 1.5);
        // Blocked per fault: 100/50, 50/50, 60/60.
        assert_eq!(r["guest_blocked_per_fault_storm_vs_quiet"], 1.0);
        assert!(figures.table().contains("pin re-fault p99 900.0 µs"));
    }

    #[test]
    fn nothing_measured_is_null_not_zero() {
        let json = GuestStormFigures::figures_json(None);
        for k in FIGURE_KEYS {
            assert!(json.contains(&format!("\"{k}\":null")), "{k}");
        }
        // No block qualified in any run: null, not 0.
        let figures = GuestStormFigures {
            host_block: vec![GuestStormSample { host_block: "none qualified".into(), ..GuestStormSample::default() }],
            ..GuestStormFigures::default()
        };
        let json = GuestStormFigures::figures_json(Some(&figures));
        assert!(json.contains("\"host_block_fault_p99_us\":null,\"host_block_fault_max_us\":null"), "{json}");
        assert!(json.contains("\"host_block_offlined_rounds\":0.0"), "{json}");
        assert!(figures.ratios().iter().all(|(_, v)| *v == 0.0));
    }
}
