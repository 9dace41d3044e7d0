//! The run's report: how each vCPU ended, what the parts of the run
//! counted, assembled into one [`Report`] ([`Report::assemble`]) at the
//! end of a run, and written as a human summary and a JSON document.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_proto::Counters;
use apf::LatencySummary;

use crate::agent::{AgentStats, VcpuAgent};
use crate::guestview::GuestView;
use crate::storm::StormReport;
use crate::vcpu::{VcpuEnd, VcpuError};

/// Errors kept in full; beyond this they are only counted.
const MAX_ERRORS: usize = 200;

/// Errors from every part of a run, bounded.
#[derive(Debug, Default)]
pub struct Errors {
    list: Mutex<Vec<String>>,
    dropped: AtomicU64,
}

impl Errors {
    /// Records an error.
    pub fn push(&self, error: impl Into<String>) {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if list.len() < MAX_ERRORS {
            list.push(error.into());
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The errors kept, plus a line for those only counted.
    pub fn to_vec(&self) -> Vec<String> {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            list.push(format!("... and {dropped} more errors"));
        }
        list
    }

    /// True when nothing went wrong.
    pub fn is_empty(&self) -> bool {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }
}

/// How a vCPU's thread ended, as the VMM saw it. The report writes it as
/// `"halted"`, `"stopped"`, `"failed: <error>"`, `"panicked"` or
/// `"did not stop"`.
#[derive(Debug, Clone)]
pub enum VcpuExit {
    /// The guest halted: its part of the run is over.
    Halted,
    /// The VMM stopped it (the run ended, or another vCPU failed).
    Stopped,
    /// It failed: an exit that ends the run, a poisoned page, `KVM_RUN`.
    Failed(Arc<VcpuError>),
    /// Its thread panicked.
    Panicked,
    /// It was still running when the VMM gave up kicking it.
    DidNotStop,
}

impl From<VcpuEnd> for VcpuExit {
    fn from(end: VcpuEnd) -> Self {
        match end {
            VcpuEnd::Halted => VcpuExit::Halted,
            VcpuEnd::Stopped => VcpuExit::Stopped,
            VcpuEnd::Failed(e) => VcpuExit::Failed(Arc::new(e)),
        }
    }
}

impl std::fmt::Display for VcpuExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuExit::Halted => f.write_str("halted"),
            VcpuExit::Stopped => f.write_str("stopped"),
            VcpuExit::Failed(e) => write!(f, "failed: {e}"),
            VcpuExit::Panicked => f.write_str("panicked"),
            VcpuExit::DidNotStop => f.write_str("did not stop"),
        }
    }
}

/// How one vCPU ended.
#[derive(Debug, Clone)]
pub struct VcpuReport {
    /// The vCPU.
    pub id: u32,
    /// How its thread ended.
    pub exit: VcpuExit,
    /// Its agent's counters, if it reported done.
    pub counters: Option<Counters>,
}

/// Host-side and guest-requested offlining.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OfflineSummary {
    /// Offlines asked for (host storm and guest).
    pub requests: u64,
    /// Offlines that finished.
    pub completed: u64,
    /// Offlines that hit their deadline and changed nothing.
    pub busy: u64,
    /// Offlines refused because another offline held part of the range.
    pub overlapped: u64,
    /// Offlines the guest asked for.
    pub guest_requested: u64,
    /// The host-block offline: "offlined", "none qualified", "error", or
    /// "off".
    pub host_block: String,
    /// What the host-block offline did.
    pub host_block_detail: String,
}

/// The guest's balloon: pages it gave back, discarded by the VMM, and what
/// it read there afterwards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonSummary {
    /// Discards the VMM carried out (`MADV_DONTNEED` on guest RAM).
    pub discards: u64,
    /// Pages those discards dropped.
    pub pages_discarded: u64,
    /// Discarded pages the guest read back as zeros.
    pub pages_verified_zero: u64,
    /// Discarded pages that did not read as zeros (stale contents): any
    /// makes the run fail.
    pub stale: u64,
}

/// The first pass's throughput: first touch (the touch workload) or the
/// verify of a restored snapshot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FirstPass {
    /// "touch" or "restore-verify".
    pub kind: &'static str,
    /// Pages the pass covered, all vCPUs.
    pub pages: u64,
    /// From the first vCPU's start to the last one's end.
    pub elapsed: Duration,
}

impl FirstPass {
    /// Pages per second.
    pub fn pages_per_sec(&self) -> f64 {
        self.pages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Everything a run reports.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The run met every check.
    pub ok: bool,
    /// Wall time of the run, from the first vCPU's start.
    pub elapsed: Duration,
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// The seed.
    pub seed: u64,
    /// "engine" or "plain".
    pub backend: &'static str,
    /// The guest's counters, summed over vCPUs.
    pub guest: Counters,
    /// The engine's counters (empty for plain memory), as JSON.
    pub engine_json: String,
    /// Faults the engine resolved.
    pub faults: u64,
    /// Offlining.
    pub offline: OfflineSummary,
    /// The guest's balloon.
    pub balloon: BalloonSummary,
    /// Pin callbacks called.
    pub pin_invalidations: u64,
    /// Pins faulted in again.
    pub pin_refaults: u64,
    /// Pins still registered after every holder let go.
    pub pins_leaked: u64,
    /// Checksums the device computed.
    pub checksums: u64,
    /// Agent requests refused as malformed or out of range.
    pub protocol_errors: u64,
    /// Per vCPU.
    pub vcpus: Vec<VcpuReport>,
    /// The first pass's rate (touch workload, or a restore).
    pub first_pass: Option<FirstPass>,
    /// Fault service latency of the baseline handler (p50, p99).
    pub baseline_latency: Option<(Duration, Duration)>,
    /// The snapshot written, if any.
    pub snapshot_saved: Option<String>,
    /// The snapshot restored from, and whether every agent verified it.
    pub restored: Option<(String, bool)>,
    /// Span latencies and per-vCPU blocked time (with latency on).
    pub latency: Option<LatencySummary>,
    /// Events written to the Chrome trace, and older ones dropped.
    pub trace_events: Option<(usize, u64)>,
    /// The guest's own view of its faults (its first-access timings).
    pub guest_view: Option<GuestView>,
    /// Faults that waited for an offline holding their page.
    pub deferred_faults: u64,
    /// The checksum device's pin callback: calls, and the time inside it
    /// (p99 and max, µs).
    pub pin_callback: Option<PinCallbacks>,
    /// What the run did with working sets (`--working-set`,
    /// `--save-working-set`).
    pub working_set: Option<crate::replay::WorkingSetReport>,
    /// From the start of the VM's build to it ready to run (with a
    /// restore: the snapshot opened, RAM served, a replay's lead).
    pub setup: Duration,
    /// What went wrong.
    pub errors: Vec<String>,
}

/// Time inside a device's pin callback (the engine calls it before any
/// page of the pinned range moves).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PinCallbacks {
    /// Calls.
    pub calls: u64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Longest, µs.
    pub max_us: f64,
}

/// The baseline handler's figures at the end of a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct BaselineEnd {
    /// Faults it served.
    pub faults: u64,
    /// Fault service latency, p50 and p99.
    pub latency: (Duration, Duration),
}

/// The engine's figures at the end of a run, taken while it shut down.
#[derive(Debug, Clone, Default)]
pub struct EngineEnd {
    /// Faults it resolved.
    pub faults: u64,
    /// Pin callbacks called.
    pub pin_invalidations: u64,
    /// Pins faulted in again.
    pub pin_refaults: u64,
    /// Pins still registered after every holder let go.
    pub pins_leaked: u64,
    /// Faults that waited for an offline holding their page.
    pub deferred: u64,
    /// Its counters as JSON.
    pub json: String,
    /// Errors it reported during the run.
    pub errors: Vec<String>,
}

/// What the parts of a run counted, gathered by its shutdown step: what
/// [`Report::assemble`] builds the report from.
#[derive(Debug)]
pub struct RunEnd<'a> {
    /// From the first vCPU's start to the last one's end.
    pub elapsed: Duration,
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// The seed.
    pub seed: u64,
    /// The backend's name.
    pub backend: &'static str,
    /// How each vCPU ended, with its agent's counters.
    pub vcpus: Vec<VcpuReport>,
    /// What each vCPU's agent said.
    pub agents: &'a [VcpuAgent],
    /// The agent device's counters.
    pub agent: &'a AgentStats,
    /// What the host storm did.
    pub storm: StormReport,
    /// Checksums the checksum device computed.
    pub checksums: u64,
    /// The snapshot restored from, if any.
    pub restored: Option<String>,
    /// The snapshot saved, if any.
    pub snapshot_saved: Option<String>,
    /// The baseline handler's figures, with that backend.
    pub baseline: Option<BaselineEnd>,
    /// The engine's figures, with that backend.
    pub engine: Option<EngineEnd>,
    /// Errors from every part of the run.
    pub errors: &'a Errors,
}

impl Report {
    /// Assembles the report from what the parts of a run counted, and
    /// judges it: the run is ok when nothing went wrong and every agent
    /// said done.
    pub fn assemble(end: RunEnd<'_>) -> Report {
        let RunEnd {
            elapsed,
            ram_size,
            seed,
            backend,
            vcpus,
            agents,
            agent: a,
            storm,
            checksums,
            restored,
            snapshot_saved,
            baseline,
            engine,
            errors,
        } = end;
        let all_done = vcpus.iter().all(|v| v.counters.is_some());
        let mut report = Report { elapsed, ram_size, seed, backend, checksums, ..Report::default() };
        report.guest = vcpus.iter().filter_map(|v| v.counters).sum();
        report.protocol_errors = a.protocol_errors.load(Ordering::Relaxed);
        report.balloon = BalloonSummary {
            discards: a.balloon_discards.load(Ordering::Relaxed),
            pages_discarded: a.balloon_pages.load(Ordering::Relaxed),
            pages_verified_zero: report.guest.balloon_pages_zero,
            stale: report.guest.balloon_stale,
        };
        // The device counts corrupt pages as the guest reports them; a
        // guest that failed before saying done reported them only there.
        let reported_corrupt = a.corrupt_pages.load(Ordering::Relaxed);
        report.guest.corrupt_pages = report.guest.corrupt_pages.max(reported_corrupt);
        let guest_requested = a.guest_offlines.load(Ordering::Relaxed);
        report.offline = OfflineSummary {
            requests: storm.requests + guest_requested,
            completed: storm.completed + a.guest_offlines_completed.load(Ordering::Relaxed),
            busy: storm.busy + a.guest_offlines_busy.load(Ordering::Relaxed),
            overlapped: storm.overlapped + a.guest_offlines_overlapped.load(Ordering::Relaxed),
            guest_requested,
            host_block: storm.host_block,
            host_block_detail: storm.host_block_detail,
        };
        let started = agents.iter().filter_map(|a| a.started).min();
        let first_done = agents.iter().map(|a| a.first_pass_at).collect::<Option<Vec<_>>>();
        if let (Some(s), Some(last)) = (started, first_done.and_then(|ends| ends.into_iter().max())) {
            report.first_pass = Some(FirstPass {
                kind: if restored.is_some() { "restore-verify" } else { "touch" },
                pages: agents.iter().map(|a| a.first_pass_pages).sum(),
                elapsed: last.duration_since(s),
            });
        }
        if let Some(b) = baseline {
            report.faults = b.faults;
            report.baseline_latency = Some(b.latency);
        }
        if let Some(path) = restored {
            let verified = agents.iter().all(|a| a.restore_verified);
            if !verified {
                errors.push("not every agent verified the restored snapshot");
            }
            report.restored = Some((path, verified));
        }
        report.snapshot_saved = snapshot_saved;
        report.vcpus = vcpus;
        if let Some(e) = engine {
            for error in e.errors {
                errors.push(format!("engine: {error}"));
            }
            if e.pins_leaked > 0 {
                errors.push(format!("{} pins still registered after every holder let go", e.pins_leaked));
            }
            report.pins_leaked = e.pins_leaked;
            report.faults = e.faults;
            report.pin_invalidations = e.pin_invalidations;
            report.pin_refaults = e.pin_refaults;
            report.deferred_faults = e.deferred;
            report.engine_json = e.json;
        }
        if report.balloon.stale > 0 {
            errors.push(format!(
                "the guest read {} discarded pages back with stale contents instead of zeros",
                report.balloon.stale
            ));
        }
        if report.guest.corrupt_pages > 0 || report.guest.checksum_errors > 0 {
            errors.push(format!(
                "the guest found {} corrupt pages and {} wrong checksums",
                report.guest.corrupt_pages, report.guest.checksum_errors
            ));
        }
        report.errors = errors.to_vec();
        report.ok = report.errors.is_empty() && all_done;
        report
    }
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The keys of the report's `guest` object: the guest's counters summed
/// over vCPUs, in the report's order (the balloon's are in `balloon`).
const GUEST_KEYS: [&str; 8] = [
    "pages_verified",
    "corrupt_pages",
    "passes",
    "pages_written",
    "checksums",
    "checksum_errors",
    "offline_requests",
    "offline_failed",
];

/// The counters named by `keys` (each one of [`Counters::NAMES`]) as a
/// JSON object, in that order.
fn counters_json(c: &Counters, keys: &[&str]) -> String {
    let fields: Vec<String> = keys.iter().map(|k| format!("\"{k}\":{}", c.get(k).unwrap_or(0))).collect();
    format!("{{{}}}", fields.join(","))
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

impl Report {
    /// Marks the run failed with `error`.
    pub fn fail(&mut self, error: String) {
        self.ok = false;
        self.errors.push(error);
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> String {
        let mut j = String::new();
        let _ = write!(
            j,
            "{{\"ok\":{},\"elapsed_ms\":{},\"ram_bytes\":{},\"seed\":{},\"backend\":{},",
            self.ok,
            self.elapsed.as_millis(),
            self.ram_size,
            self.seed,
            json_str(self.backend)
        );
        let _ = write!(j, "\"guest\":{},", counters_json(&self.guest, &GUEST_KEYS));
        let engine = if self.engine_json.is_empty() { "{}" } else { &self.engine_json };
        let _ = write!(j, "\"faults\":{{\"total\":{},\"engine\":{engine}}},", self.faults);
        let o = &self.offline;
        let _ = write!(
            j,
            "\"offline\":{{\"requests\":{},\"completed\":{},\"busy\":{},\"overlapped\":{},\"guest_requested\":{},\"host_block\":{},\"host_block_detail\":{}}},",
            o.requests,
            o.completed,
            o.busy,
            o.overlapped,
            o.guest_requested,
            json_str(&o.host_block),
            json_str(&o.host_block_detail)
        );
        let b = &self.balloon;
        let _ = write!(
            j,
            "\"balloon\":{{\"discards\":{},\"pages_discarded\":{},\"pages_verified_zero\":{},\"stale\":{}}},",
            b.discards, b.pages_discarded, b.pages_verified_zero, b.stale
        );
        let _ = write!(
            j,
            "\"pins\":{{\"invalidations\":{},\"refaults\":{},\"leaked\":{}}},\"checksums\":{},\"protocol_errors\":{},",
            self.pin_invalidations, self.pin_refaults, self.pins_leaked, self.checksums, self.protocol_errors
        );
        let blocked = |id: u32| {
            let v = self.latency.as_ref().and_then(|l| l.vcpus.iter().find(|b| b.vcpu == id));
            v.map_or("null,\"faults\":null".to_string(), |b| {
                format!("{:.3},\"faults\":{}", b.blocked.as_secs_f64() * 1e3, b.faults)
            })
        };
        let vcpus: Vec<String> = self
            .vcpus
            .iter()
            .map(|v| {
                let counters = v.counters.as_ref().map_or("null".to_string(), |c| counters_json(c, &Counters::NAMES));
                format!(
                    "{{\"id\":{},\"exit\":{},\"blocked_ms\":{},\"agent\":{counters}}}",
                    v.id,
                    json_str(&v.exit.to_string()),
                    blocked(v.id)
                )
            })
            .collect();
        match &self.latency {
            Some(l) => {
                let spans: Vec<String> = l
                    .spans
                    .iter()
                    .map(|s| {
                        format!(
                            "{}:{{\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{},\"count\":{}}}",
                            json_str(s.name),
                            us(s.p50),
                            us(s.p90),
                            us(s.p99),
                            us(s.p999),
                            us(s.max),
                            s.count
                        )
                    })
                    .collect();
                let _ = write!(
                    j,
                    "\"latency_us\":{{{}}},\"unattributed_faults\":{},",
                    spans.join(","),
                    l.unattributed_faults
                );
                match &l.tail {
                    Some(t) => {
                        let causes: Vec<String> =
                            t.causes.iter().map(|(name, d)| format!("{}:{}", json_str(name), us(*d))).collect();
                        let _ = write!(
                            j,
                            "\"fault_tail\":{{\"faults\":{},\"from_us\":{},\"total_us\":{},\"causes_us\":{{{}}}}},",
                            t.faults,
                            us(t.from),
                            us(t.total),
                            causes.join(",")
                        );
                    }
                    None => j.push_str("\"fault_tail\":null,"),
                }
            }
            None => j.push_str("\"latency_us\":null,"),
        }
        if let Some((events, dropped)) = self.trace_events {
            let _ = write!(j, "\"trace\":{{\"events\":{events},\"dropped\":{dropped}}},");
        }
        let _ = write!(
            j,
            "\"guest_view\":{},\"deferred_faults\":{},",
            self.guest_view.as_ref().map_or("null".to_string(), GuestView::to_json),
            self.deferred_faults
        );
        match &self.pin_callback {
            Some(c) => {
                let _ = write!(
                    j,
                    "\"pin_callback_us\":{{\"calls\":{},\"p99\":{:.3},\"max\":{:.3}}},",
                    c.calls, c.p99_us, c.max_us
                );
            }
            None => j.push_str("\"pin_callback_us\":null,"),
        }
        let _ = write!(j, "\"vcpus\":[{}],", vcpus.join(","));
        match &self.first_pass {
            Some(t) => {
                let _ = write!(
                    j,
                    "\"first_pass\":{{\"kind\":\"{}\",\"pages\":{},\"seconds\":{:.6},\"pages_per_sec\":{:.0}}},",
                    t.kind,
                    t.pages,
                    t.elapsed.as_secs_f64(),
                    t.pages_per_sec()
                );
            }
            None => j.push_str("\"first_pass\":null,"),
        }
        if let Some((p50, p99)) = self.baseline_latency {
            let _ = write!(j, "\"baseline_fault_us\":{{\"p50\":{},\"p99\":{}}},", us(p50), us(p99));
        }
        let _ =
            write!(j, "\"snapshot_saved\":{},", self.snapshot_saved.as_deref().map_or("null".to_string(), json_str));
        match &self.restored {
            Some((path, verified)) => {
                let _ = write!(j, "\"restored\":{{\"path\":{},\"verified\":{verified}}},", json_str(path));
            }
            None => j.push_str("\"restored\":null,"),
        }
        let ws = self.working_set.as_ref().map_or("null".to_string(), |w| w.to_json());
        let _ = write!(j, "\"working_set\":{ws},\"setup_ms\":{:.3},", self.setup.as_secs_f64() * 1e3);
        let errors: Vec<String> = self.errors.iter().map(|e| json_str(e)).collect();
        let _ = write!(j, "\"errors\":[{}]}}", errors.join(","));
        j
    }

    /// A few lines for a human.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let g = &self.guest;
        let _ = writeln!(
            s,
            "{}: {} MiB guest ({} memory), seed {}, {:.1} s",
            if self.ok { "ok" } else { "FAILED" },
            self.ram_size >> 20,
            self.backend,
            self.seed,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "guest:    {} passes, {} pages verified, {} written, {} corrupt, {} checksums ({} wrong)",
            g.passes, g.pages_verified, g.pages_written, g.corrupt_pages, g.checksums, g.checksum_errors
        );
        let o = &self.offline;
        let _ = writeln!(
            s,
            "offline:  {} requests ({} by the guest), {} completed, {} busy, {} overlapped; host block: {} {}",
            o.requests, o.guest_requested, o.completed, o.busy, o.overlapped, o.host_block, o.host_block_detail
        );
        let b = &self.balloon;
        let _ = writeln!(
            s,
            "balloon:  {} discards ({} pages), {} pages verified zero, {} stale",
            b.discards, b.pages_discarded, b.pages_verified_zero, b.stale
        );
        let _ = writeln!(
            s,
            "engine:   {} faults; pins: {} invalidations, {} refaults, {} leaked",
            self.faults, self.pin_invalidations, self.pin_refaults, self.pins_leaked
        );
        if let Some(t) = &self.first_pass {
            let _ = writeln!(
                s,
                "{:<9} {} pages in {:.3} s = {:.0} pages/s",
                format!("{}:", t.kind),
                t.pages,
                t.elapsed.as_secs_f64(),
                t.pages_per_sec()
            );
        }
        if let Some(l) = &self.latency {
            let _ = writeln!(
                s,
                "latency:  {:<15} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
                "span", "count", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs"
            );
            for sp in &l.spans {
                let _ = writeln!(
                    s,
                    "          {:<15} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
                    sp.name,
                    sp.count,
                    us(sp.p50),
                    us(sp.p90),
                    us(sp.p99),
                    us(sp.p999),
                    us(sp.max)
                );
            }
            if let Some(t) = &l.tail {
                let total = t.total.as_secs_f64().max(1e-9);
                let parts: Vec<String> = t
                    .causes
                    .iter()
                    .filter(|(_, d)| !d.is_zero())
                    .map(|(name, d)| format!("{name} {:.0}%", 100.0 * d.as_secs_f64() / total))
                    .collect();
                let _ =
                    writeln!(s, "          slowest {} faults (from {} µs): {}", t.faults, us(t.from), parts.join(", "));
            }
        }
        for v in &self.vcpus {
            let blocked = self.latency.as_ref().and_then(|l| l.vcpus.iter().find(|b| b.vcpu == v.id));
            match blocked {
                Some(b) => {
                    let _ = writeln!(
                        s,
                        "vCPU {}:   {}; blocked {:.1} ms on {} faults",
                        v.id,
                        v.exit,
                        b.blocked.as_secs_f64() * 1e3,
                        b.faults
                    );
                }
                None => {
                    let _ = writeln!(s, "vCPU {}:   {}", v.id, v.exit);
                }
            }
        }
        if let Some(v) = &self.guest_view {
            let o = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
            for (name, f) in [("touch", &v.touch), ("stress", &v.stress)] {
                if let Some(f) = f {
                    let _ = writeln!(
                        s,
                        "guest view ({name}): slowest {} of {} first accesses (the faults): p50 {} p99 {} p99.9 {} max {} µs",
                        f.faults,
                        f.touches,
                        o(f.p50_us),
                        o(f.p99_us),
                        o(f.p999_us),
                        o(f.max_us)
                    );
                }
            }
            let _ = writeln!(
                s,
                "          guest clock {} kHz ({}; calibrated {})",
                v.clock.khz,
                v.clock.source,
                v.clock.calibrated_khz.map_or("-".to_string(), |k| format!("{k} kHz"))
            );
        }
        if let Some((events, dropped)) = self.trace_events {
            let _ = writeln!(s, "trace:    {events} spans written, {dropped} older ones dropped");
        }
        if let Some(path) = &self.snapshot_saved {
            let _ = writeln!(s, "snapshot: saved to {path}");
        }
        if let Some((path, verified)) = &self.restored {
            let _ = writeln!(s, "restored: from {path}, {}", if *verified { "verified" } else { "NOT verified" });
        }
        if let Some(w) = &self.working_set {
            s.push_str(&w.summary());
        }
        for e in &self.errors {
            let _ = writeln!(s, "error:    {e}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escapes_and_keeps_the_documented_keys() {
        let r = Report {
            ok: false,
            errors: vec!["quote \" and \\ and \n".into()],
            vcpus: vec![VcpuReport { id: 0, exit: VcpuExit::Halted, counters: Some(Counters::default()) }],
            ..Report::default()
        };
        let j = r.to_json();
        for key in [
            "\"ok\":false",
            "\"guest\":{\"pages_verified\":0,\"corrupt_pages\":0,\"passes\":0",
            "\"faults\":{\"total\":0",
            "\"offline\":{\"requests\":0,\"completed\":0,\"busy\":0",
            "\"guest_requested\":0",
            "\"pins\":{\"invalidations\":0,\"refaults\":0,\"leaked\":0}",
            "\"balloon\":{\"discards\":0,\"pages_discarded\":0,\"pages_verified_zero\":0,\"stale\":0}",
            "\"errors\":[\"quote \\\" and \\\\ and \\n\"]",
            "\"vcpus\":[{\"id\":0,\"exit\":\"halted\",\"blocked_ms\":null,\"faults\":null,\"agent\":{\"passes\":0,",
        ] {
            assert!(j.contains(key), "{key} missing from {j}");
        }
        assert_eq!(j.matches('{').count(), j.matches('}').count());
    }

    #[test]
    fn vcpu_exits_keep_their_report_strings() {
        let failed = VcpuError::Run { vcpu: 1, source: std::io::Error::from_raw_os_error(libc::EFAULT) };
        let cases = [
            (VcpuExit::from(VcpuEnd::Halted), "halted".to_string()),
            (VcpuExit::from(VcpuEnd::Stopped), "stopped".to_string()),
            (VcpuExit::Panicked, "panicked".to_string()),
            (VcpuExit::DidNotStop, "did not stop".to_string()),
            (
                VcpuExit::from(VcpuEnd::Failed(failed)),
                "failed: vCPU 1: KVM_RUN failed: Bad address (os error 14)".to_string(),
            ),
        ];
        for (exit, want) in cases {
            assert_eq!(exit.to_string(), want);
            let r = Report { vcpus: vec![VcpuReport { id: 0, exit, counters: None }], ..Report::default() };
            assert!(r.to_json().contains(&format!("\"exit\":{}", json_str(&want))), "{}", r.to_json());
        }
    }

    #[test]
    fn assembly_sums_the_agents_and_judges_the_run() {
        let counters = Counters { passes: 2, pages_verified: 10, balloon_pages_zero: 3, ..Counters::default() };
        let vcpu = |id, counters| VcpuReport { id, exit: VcpuExit::Halted, counters };
        let agent = AgentStats::default();
        agent.guest_offlines.store(4, Ordering::Relaxed);
        agent.guest_offlines_completed.store(3, Ordering::Relaxed);
        agent.corrupt_pages.store(1, Ordering::Relaxed);
        let errors = Errors::default();
        let storm = StormReport { requests: 5, completed: 5, host_block: "off".into(), ..StormReport::default() };
        let engine =
            EngineEnd { faults: 9, pins_leaked: 1, errors: vec!["a source failed".into()], ..EngineEnd::default() };
        let report = Report::assemble(RunEnd {
            elapsed: Duration::from_secs(1),
            ram_size: 1 << 20,
            seed: 3,
            backend: "engine",
            vcpus: vec![vcpu(0, Some(counters)), vcpu(1, Some(counters))],
            agents: &[],
            agent: &agent,
            storm,
            checksums: 0,
            restored: None,
            snapshot_saved: None,
            baseline: None,
            engine: Some(engine),
            errors: &errors,
        });
        assert_eq!((report.guest.passes, report.guest.pages_verified), (4, 20));
        assert_eq!(report.balloon.pages_verified_zero, 6);
        assert_eq!(report.guest.corrupt_pages, 1, "the device's count when the agents said none");
        assert_eq!((report.offline.requests, report.offline.completed, report.offline.guest_requested), (9, 8, 4));
        assert_eq!((report.faults, report.pins_leaked), (9, 1));
        assert_eq!(
            report.errors,
            [
                "engine: a source failed",
                "1 pins still registered after every holder let go",
                "the guest found 1 corrupt pages and 0 wrong checksums"
            ]
        );
        assert!(!report.ok);
    }

    #[test]
    fn errors_are_bounded() {
        let e = Errors::default();
        for i in 0..MAX_ERRORS + 5 {
            e.push(format!("e{i}"));
        }
        let v = e.to_vec();
        assert_eq!(v.len(), MAX_ERRORS + 1);
        assert_eq!(v.last().unwrap(), "... and 5 more errors");
    }
}
