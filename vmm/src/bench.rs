//! `vmm bench`: apf against the baselines a VMM would otherwise use, side
//! by side in one process, variants interleaved in every round.
//!
//! Workloads:
//! - host: two threads touch every page of a fresh registered region, in
//!   order or in a keyed random order ([`agent_proto::permute`]);
//! - guest: the guest agent's first pass under KVM, two vCPUs, each over
//!   its stripe (the touch workload, or the verify of a restored snapshot);
//!
//! each over a zero source (the threads write: a read of fresh anonymous
//! memory maps the shared zero page and allocates nothing) and over a
//! snapshot file in the page cache (the threads read and check). Variants:
//! `kernel` (plain anonymous memory, no userfaultfd: the limit for zero
//! pages), `baseline` (one thread, blocking read, one page per fault, COPY
//! from the source) and `apf` with its defaults, plus worker-count and
//! prefetch-window variants in the full run. Then offlining 64 MiB with 0
//! and 1,000 migratable pins and against a hard pin, fault latency with an
//! offline storm next to it, and what the latency layer costs.
//!
//! Method: the median of the rounds; every region `MADV_NOHUGEPAGE`, none
//! pre-populated; no CPU pinning for any variant (the scheduler places the
//! threads of every variant alike).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_proto::{permute, splitmix64, Workload};
use apf::span::FAULT;
use apf::LatencyLayer;
use apf::Pattern;
use apf::SinglePageHandler;
use apf::{Engine, GuestAddress, GuestRam, GuestRange, Mode, PageSource, Pin, SnapshotFile, ZeroSource};
use tracing_subscriber::layer::SubscriberExt;

use crate::config::{Backend, RunConfig};
use crate::report::json_str;

const PAGE: usize = 4096;
const MIB: u64 = 1 << 20;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// A run under two minutes: smaller regions, fewer variants.
    pub quick: bool,
    /// Rounds (at least 5).
    pub rounds: usize,
    /// Write the JSON here.
    pub json: Option<PathBuf>,
    /// Write a chart (SVG) here.
    pub chart: Option<PathBuf>,
    /// Only these parts ("throughput", "offline", "storm"); empty: all.
    pub only: Vec<String>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig { quick: false, rounds: 5, json: None, chart: None, only: Vec::new() }
    }
}

/// One measured pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Pages touched.
    pub pages: u64,
    /// Seconds the pass took.
    pub seconds: f64,
    /// Per-fault latency, p50 and p99, when the variant can tell.
    pub latency: Option<(Duration, Duration)>,
}

/// All rounds of one variant of one workload.
#[derive(Debug, Clone)]
pub struct Series {
    /// "kernel", "baseline", "apf", ...
    pub variant: String,
    /// One sample per round.
    pub samples: Vec<Sample>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl Series {
    /// Median pages per second.
    pub fn pages_per_sec(&self) -> f64 {
        median(self.samples.iter().map(|s| s.pages as f64 / s.seconds.max(1e-9)).collect())
    }

    fn latency_us(&self, which: usize) -> Option<f64> {
        let v: Vec<f64> = self
            .samples
            .iter()
            .filter_map(|s| s.latency.map(|l| if which == 0 { l.0 } else { l.1 }.as_secs_f64() * 1e6))
            .collect();
        (!v.is_empty()).then(|| median(v))
    }
}

/// One workload and its variants.
#[derive(Debug, Clone)]
pub struct WorkloadResult {
    /// "host/seq/zero" and so on.
    pub name: String,
    /// "reads" or "writes".
    pub access: &'static str,
    /// Where the latency comes from.
    pub latency_from: &'static str,
    /// The variants.
    pub series: Vec<Series>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Env {
    Host,
    Guest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    Zero,
    File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Kernel,
    Baseline,
    Apf { workers: usize, window: usize },
    ApfTraced,
}

impl Variant {
    fn name(&self) -> String {
        let d = apf::Config::default();
        match *self {
            Variant::Kernel => "kernel".into(),
            Variant::Baseline => "baseline".into(),
            Variant::Apf { workers, window } if workers == d.workers && window == d.max_window => "apf".into(),
            Variant::Apf { workers, window } if window == d.max_window => format!("apf-workers-{workers}"),
            Variant::Apf { window, .. } => format!("apf-window-{window}"),
            Variant::ApfTraced => "apf-traced".into(),
        }
    }
}

/// Everything one `vmm bench` measured.
#[derive(Debug, Clone, Default)]
pub struct BenchReport {
    /// The run was quick.
    pub quick: bool,
    /// Rounds.
    pub rounds: usize,
    /// Host region size.
    pub host_bytes: u64,
    /// Guest RAM size.
    pub guest_bytes: u64,
    /// Throughput workloads.
    pub workloads: Vec<WorkloadResult>,
    /// Offlining 64 MiB: median ms without pins, with 1,000 pins.
    pub offline_ms: (f64, f64),
    /// What an offline against a hard pin returned.
    pub hard_pin: String,
    /// Fault latency p99 (µs), quiet and with an offline storm.
    pub storm_p99_us: (f64, f64),
    /// The median over rounds of storm p99 over the quiet p99 of the
    /// round before it.
    pub storm_ratio: f64,
    /// Fault latency p50 (µs), quiet and with an offline storm.
    pub storm_p50_us: (f64, f64),
    /// Storm offlines per round.
    pub storm_offlines: u64,
    /// Wall time of the whole bench.
    pub elapsed: Duration,
    /// Problems (a variant that failed a check).
    pub errors: Vec<String>,
}

/// Ratio names, what they compare, and their targets (`>=` when higher
/// is better).
pub const TARGETS: [(&str, f64, bool); 9] = [
    ("host_seq_apf_vs_baseline", 10.0, true),
    ("host_seq_apf_vs_kernel", 2.0, true),
    ("host_random_apf_vs_baseline", 1.0, true),
    ("guest_seq_apf_vs_baseline", 3.0, true),
    ("guest_random_apf_vs_baseline", 1.0, true),
    ("guest_seq_apf_vs_kernel", 0.6, true),
    ("offline_pins_vs_nopin", 1.5, false),
    ("fault_latency_storm_vs_quiet", 2.0, false),
    ("tracing_overhead", 1.05, false),
];

impl BenchReport {
    fn workload(&self, name: &str) -> Option<&WorkloadResult> {
        self.workloads.iter().find(|w| w.name == name)
    }

    /// The median over rounds of `a`'s throughput over `b`'s in the same
    /// round (pairing cancels drift between rounds); 0 if either is
    /// missing.
    fn ratio(&self, workload: &str, a: &str, b: &str) -> f64 {
        let Some(w) = self.workload(workload) else { return 0.0 };
        let series = |v: &str| w.series.iter().find(|s| s.variant == v);
        let (Some(a), Some(b)) = (series(a), series(b)) else { return 0.0 };
        let rate = |s: &Sample| s.pages as f64 / s.seconds.max(1e-9);
        median(a.samples.iter().zip(&b.samples).map(|(x, y)| rate(x) / rate(y).max(1e-9)).collect())
    }

    /// The ratios, in [`TARGETS`] order, then extra ones.
    pub fn ratios(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("host_seq_apf_vs_baseline", self.ratio("host/seq/file", "apf", "baseline")),
            ("host_seq_apf_vs_kernel", self.ratio("host/seq/zero", "apf", "kernel")),
            ("host_random_apf_vs_baseline", self.ratio("host/random/file", "apf", "baseline")),
            ("guest_seq_apf_vs_baseline", self.ratio("guest/seq/file", "apf", "baseline")),
            ("guest_random_apf_vs_baseline", self.ratio("guest/random/file", "apf", "baseline")),
            ("guest_seq_apf_vs_kernel", self.ratio("guest/seq/zero", "apf", "kernel")),
            ("offline_pins_vs_nopin", self.offline_ms.1 / self.offline_ms.0.max(1e-9)),
            ("fault_latency_storm_vs_quiet", self.storm_ratio),
            ("tracing_overhead", self.ratio("host/random/zero", "apf", "apf-traced")),
            ("tracing_overhead_file", self.ratio("host/random/file", "apf", "apf-traced")),
            ("host_seq_zero_apf_vs_baseline", self.ratio("host/seq/zero", "apf", "baseline")),
            ("host_random_zero_apf_vs_baseline", self.ratio("host/random/zero", "apf", "baseline")),
            ("host_random_apf_vs_kernel", self.ratio("host/random/zero", "apf", "kernel")),
            ("guest_seq_zero_apf_vs_baseline", self.ratio("guest/seq/zero", "apf", "baseline")),
            ("guest_random_zero_apf_vs_baseline", self.ratio("guest/random/zero", "apf", "baseline")),
            ("guest_random_apf_vs_kernel", self.ratio("guest/random/zero", "apf", "kernel")),
        ]
    }

    /// The report as JSON.
    pub fn to_json(&self) -> String {
        let mut j = String::new();
        let _ = write!(
            j,
            "{{\"quick\":{},\"rounds\":{},\"host_bytes\":{},\"guest_bytes\":{},\"elapsed_s\":{:.1},\"cores\":{},\"workloads\":[",
            self.quick,
            self.rounds,
            self.host_bytes,
            self.guest_bytes,
            self.elapsed.as_secs_f64(),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let opt = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.1}"));
        let workloads: Vec<String> = self
            .workloads
            .iter()
            .map(|w| {
                let variants: Vec<String> = w
                    .series
                    .iter()
                    .map(|s| {
                        let rate = s.pages_per_sec();
                        let rounds: Vec<String> =
                            s.samples.iter().map(|x| format!("{:.0}", x.pages as f64 / x.seconds.max(1e-9))).collect();
                        format!(
                            "{}:{{\"pages_per_sec\":{rate:.0},\"gb_per_sec\":{:.3},\"p50_us\":{},\"p99_us\":{},\"rounds_pages_per_sec\":[{}]}}",
                            json_str(&s.variant),
                            rate * PAGE as f64 / 1e9,
                            opt(s.latency_us(0)),
                            opt(s.latency_us(1)),
                            rounds.join(",")
                        )
                    })
                    .collect();
                format!(
                    "{{\"name\":{},\"access\":\"{}\",\"latency_from\":{},\"variants\":{{{}}}}}",
                    json_str(&w.name),
                    w.access,
                    json_str(w.latency_from),
                    variants.join(",")
                )
            })
            .collect();
        j.push_str(&workloads.join(","));
        let _ = write!(
            j,
            "],\"offline_64mib_ms\":{{\"no_pins\":{:.2},\"pins_1000\":{:.2}}},\"hard_pin\":{},\"fault_latency_us\":{{\"quiet\":{{\"p50\":{:.1},\"p99\":{:.1}}},\"storm\":{{\"p50\":{:.1},\"p99\":{:.1}}},\"storm_offlines_per_round\":{}}},",
            self.offline_ms.0,
            self.offline_ms.1,
            json_str(&self.hard_pin),
            self.storm_p50_us.0,
            self.storm_p99_us.0,
            self.storm_p50_us.1,
            self.storm_p99_us.1,
            self.storm_offlines
        );
        let ratios: Vec<String> = self.ratios().iter().map(|(k, v)| format!("\"{k}\":{v:.3}")).collect();
        let targets: Vec<String> = TARGETS
            .iter()
            .map(|(k, t, higher)| {
                format!("\"{k}\":{{\"target\":\"{} {t}\",\"met\":{}}}", if *higher { ">=" } else { "<=" }, self.met(k))
            })
            .collect();
        let errors: Vec<String> = self.errors.iter().map(|e| json_str(e)).collect();
        let _ = write!(
            j,
            "\"ratios\":{{{}}},\"targets\":{{{}}},\"errors\":[{}]}}",
            ratios.join(","),
            targets.join(","),
            errors.join(",")
        );
        j
    }

    /// Whether ratio `name` meets its target.
    pub fn met(&self, name: &str) -> bool {
        let Some(&(_, target, higher)) = TARGETS.iter().find(|t| t.0 == name) else { return false };
        let Some(&(_, v)) = self.ratios().iter().find(|r| r.0 == name) else { return false };
        if higher {
            v >= target
        } else {
            v <= target && v > 0.0
        }
    }

    /// A table for a human.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<20} {:<7} {:<16} {:>12} {:>9} {:>10} {:>10}",
            "workload", "access", "variant", "pages/s", "GB/s", "p50 µs", "p99 µs"
        );
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        for w in &self.workloads {
            for sr in &w.series {
                let rate = sr.pages_per_sec();
                let _ = writeln!(
                    s,
                    "{:<20} {:<7} {:<16} {:>12.0} {:>9.3} {:>10} {:>10}",
                    w.name,
                    w.access,
                    sr.variant,
                    rate,
                    rate * PAGE as f64 / 1e9,
                    opt(sr.latency_us(0)),
                    opt(sr.latency_us(1))
                );
            }
        }
        let _ = writeln!(
            s,
            "\noffline 64 MiB: {:.2} ms without pins, {:.2} ms with 1,000 pins; hard pin: {}",
            self.offline_ms.0, self.offline_ms.1, self.hard_pin
        );
        let _ = writeln!(
            s,
            "fault latency p50/p99: quiet {:.1}/{:.1} µs, with an offline storm {:.1}/{:.1} µs ({} offlines a round)\n",
            self.storm_p50_us.0, self.storm_p99_us.0, self.storm_p50_us.1, self.storm_p99_us.1, self.storm_offlines
        );
        for (name, v) in self.ratios() {
            if v == 0.0 {
                let _ = writeln!(s, "{name:<34} not measured");
                continue;
            }
            let target = TARGETS.iter().find(|t| t.0 == name);
            let verdict = match target {
                Some((_, t, higher)) => format!(
                    "target {} {t}: {}",
                    if *higher { ">=" } else { "<=" },
                    if self.met(name) { "met" } else { "MISSED" }
                ),
                None => String::new(),
            };
            let _ = writeln!(s, "{name:<34} {v:>8.3}  {verdict}");
        }
        for e in &self.errors {
            let _ = writeln!(s, "error: {e}");
        }
        s
    }
}

/// Writes the image the host file workloads restore from.
fn write_image(path: &Path, bytes: u64, pattern: Pattern) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut chunk = vec![0u8; 1 << 20];
    for off in (0..bytes).step_by(chunk.len()) {
        let n = chunk.len().min((bytes - off) as usize);
        pattern.write(off, &mut chunk[..n]);
        f.write_all(&chunk[..n])?;
    }
    f.flush()?;
    // Read it once so every variant finds it in the page cache.
    let _ = std::fs::read(path)?;
    Ok(())
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// One host pass: two threads touch every page of a fresh region.
fn host_pass(variant: Variant, random: bool, src: Src, bytes: u64, image: &Path, seed: u64) -> Result<Sample, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), bytes as usize)]).map_err(|e| err(&e))?);
    let source = |ram: &GuestRam| -> Result<Arc<dyn PageSource>, String> {
        Ok(match src {
            Src::Zero => Arc::new(ZeroSource),
            Src::File => Arc::new(SnapshotFile::open(image, ram).map_err(|e| err(&e))?),
        })
    };
    let mut _engine = None;
    let mut _baseline = None;
    match variant {
        Variant::Kernel => {}
        Variant::Baseline => {
            _baseline = Some(SinglePageHandler::start(ram.clone(), source(&ram)?).map_err(|e| err(&e))?)
        }
        Variant::Apf { workers, window } => {
            let b = Engine::builder(ram.clone(), source(&ram)?).config(apf::Config {
                workers,
                max_window: window,
                ..apf::Config::default()
            });
            // No subscriber at all: what the engine costs on its own.
            let none = tracing::Dispatch::none();
            _engine = Some(tracing::dispatcher::with_default(&none, || b.start()).map_err(|e| err(&e))?);
        }
        Variant::ApfTraced => {
            let b = Engine::builder(ram.clone(), source(&ram)?);
            let layer = LatencyLayer::new();
            let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));
            _engine = Some(tracing::dispatcher::with_default(&dispatch, || b.start()).map_err(|e| err(&e))?);
        }
    }
    let write = src == Src::Zero;
    let pages = ram.pages() as u64;
    let base = ram.regions()[0].host_base() as usize;
    let threads = 2u64;
    let per = pages / threads;
    let start = Instant::now();
    let lat: Vec<Vec<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut lat = Vec::with_capacity(per as usize);
                    let mut sum = 0u64;
                    for i in 0..per {
                        let p = t * per + if random { permute(i, per, seed ^ t) } else { i };
                        let addr = (base + p as usize * PAGE) as *mut u64;
                        let t0 = Instant::now();
                        if write {
                            // SAFETY: `addr` is the first word of page `p`
                            // of the region, mapped while `ram` lives; the
                            // first touch is resolved by the kernel, the
                            // baseline or the engine.
                            unsafe { std::ptr::write_volatile(addr, p) };
                        } else {
                            // SAFETY: as above.
                            sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(addr) });
                        }
                        lat.push(t0.elapsed().as_nanos() as u64);
                    }
                    std::hint::black_box(sum);
                    lat
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    // Check what the threads saw: the first word of every page.
    let pattern = Pattern { seed: 1 };
    for p in 0..per * threads {
        // SAFETY: every page was touched above, so it is present.
        let word = unsafe { std::ptr::read_volatile((base + p as usize * PAGE) as *const u64) };
        let want = if write { p } else { pattern.word_at(p * PAGE as u64, 0) };
        if word != want {
            return Err(format!("{}: page {p} holds {word:#x}", variant.name()));
        }
    }
    let mut all: Vec<u64> = lat.into_iter().flatten().collect();
    all.sort_unstable();
    let latency = Some((Duration::from_nanos(percentile(&all, 0.5)), Duration::from_nanos(percentile(&all, 0.99))));
    Ok(Sample { pages: per * threads, seconds, latency })
}

/// One guest pass: the agent's first pass under KVM.
fn guest_pass(variant: Variant, random: bool, snapshot: Option<&Path>, bytes: u64) -> Result<Sample, String> {
    let backend = match variant {
        Variant::Kernel => Backend::Plain,
        Variant::Baseline => Backend::Baseline,
        _ => Backend::Apf,
    };
    let cfg = RunConfig {
        mem: if snapshot.is_some() { None } else { Some(bytes) },
        vcpus: if snapshot.is_some() { None } else { Some(2) },
        duration: Duration::ZERO,
        grace: Duration::from_secs(120),
        workload: Workload::Touch,
        backend,
        random_order: random,
        offline_every: None,
        guest_offline: false,
        checksum: false,
        latency: variant == Variant::ApfTraced,
        progress: false,
        restore: snapshot.map(Path::to_path_buf),
        ..RunConfig::default()
    };
    let report = crate::vm::run(&cfg).map_err(|e| crate::error_chain(&e))?;
    if !report.ok {
        return Err(format!("guest {} run failed: {}", variant.name(), report.errors.join("; ")));
    }
    let first = report.first_pass.ok_or("the guest reported no first pass")?;
    let latency = match backend {
        Backend::Apf => report.latency.as_ref().and_then(|l| l.span(FAULT)).map(|s| (s.p50, s.p99)),
        Backend::Baseline => report.baseline_latency,
        Backend::Plain => None,
    };
    Ok(Sample { pages: first.pages, seconds: first.elapsed.as_secs_f64(), latency })
}

/// Offlining 64 MiB with and without 1,000 pins, and against a hard pin.
fn offline_cost(rounds: usize) -> Result<((f64, f64), String), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), (64 * MIB) as usize)]).map_err(|e| err(&e))?);
    let engine = Engine::builder(ram.clone(), Arc::new(ZeroSource)).start().map_err(|e| err(&e))?;
    let target = GuestRange::new(GuestAddress(0), 64 * MIB);
    let deadline = || Instant::now() + Duration::from_secs(10);
    let mut x = 7u64;
    let pins: Vec<Pin> = (0..1000)
        .map(|_| {
            x = splitmix64(x);
            let pages = 1 + x % 16;
            let start = (x >> 20) % (target.len / PAGE as u64 - pages) * PAGE as u64;
            engine.pin(GuestRange::new(GuestAddress(start), pages * PAGE as u64), |_| {})
        })
        .collect::<Result<_, _>>()
        .map_err(|e| err(&e))?;
    let (mut none, mut pinned) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for with_pins in [false, true] {
            if with_pins {
                for p in &pins {
                    p.get(deadline()).map_err(|e| err(&e))?;
                }
            }
            engine.prefetch(target).map_err(|e| err(&e))?;
            let t = Instant::now();
            let r = engine.offline(target, Mode::Migrate, deadline()).map_err(|e| err(&e))?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if with_pins {
                if r.pins_called == 0 {
                    return Err("the pinned offline called no pins".into());
                }
                pinned.push(ms);
            } else {
                none.push(ms);
            }
        }
    }
    drop(pins);
    let held = GuestRange::new(GuestAddress(0), MIB);
    let hard = match engine.hard_pin(held, deadline()) {
        Ok(hp) => {
            let r = engine.offline(held, Mode::Migrate, Instant::now() + Duration::from_millis(300));
            drop(hp);
            match r {
                Err(e) if e.is_busy() => "busy".to_string(),
                Ok(_) => "offlined (the hard pin did not hold)".to_string(),
                Err(e) => format!("error: {e}"),
            }
        }
        Err(e) => format!("cannot take a hard pin: {e}"),
    };
    Ok(((median(none), median(pinned)), hard))
}

/// Fault latency p50 and p99 (µs), quiet and with a storm, and storm
/// offlines a round.
struct StormLatency {
    quiet: (f64, f64),
    storm: (f64, f64),
    paired_p99_ratio: f64,
    offlines: u64,
}

/// Fault latency (first reads of random fresh pages, one at a time) with
/// and without an offline storm at nice 19 on another range.
fn storm_latency(rounds: usize, faults: usize) -> Result<StormLatency, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let fault_bytes = (faults as u64 * PAGE as u64).next_multiple_of(2 * MIB);
    let storm_bytes = 64 * MIB;
    let total = storm_bytes + 2 * rounds as u64 * fault_bytes;
    let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), total as usize)]).map_err(|e| err(&e))?);
    // Every access a fault: no fault-around, so each sample is one fault's
    // service time.
    let config = apf::Config { fault_around: 1, ..apf::Config::default() };
    let engine = Engine::builder(ram.clone(), Arc::new(ZeroSource)).config(config).start().map_err(|e| err(&e))?;
    engine.prefetch(GuestRange::new(GuestAddress(0), storm_bytes)).map_err(|e| err(&e))?;
    let deadline = || Instant::now() + Duration::from_secs(10);
    let (mut quiet, mut storm) = (Vec::new(), Vec::new());
    let mut offlines = 0;
    let mut next = storm_bytes;
    for round in 0..rounds * 2 {
        let with_storm = round % 2 == 1;
        let region = next;
        next += fault_bytes;
        let stop = AtomicBool::new(false);
        let done = AtomicU64::new(0);
        let mut lat = Vec::with_capacity(faults);
        std::thread::scope(|sc| {
            if with_storm {
                sc.spawn(|| {
                    let _ = apf::set_thread_nice(19);
                    let mut x = 3 + round as u64;
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(1));
                        x = splitmix64(x);
                        let pages = 1 + x % 4096;
                        let first = (x >> 24) % (storm_bytes / PAGE as u64 - pages);
                        let r = GuestRange::new(GuestAddress(first * PAGE as u64), pages * PAGE as u64);
                        let mode = if x & 1 == 0 { Mode::Migrate } else { Mode::Evict };
                        if engine.offline(r, mode, deadline()).is_ok() {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        if mode == Mode::Evict {
                            let _ = engine.prefetch(r);
                        }
                    }
                });
                std::thread::sleep(Duration::from_millis(20));
            }
            let pages = fault_bytes / PAGE as u64;
            for i in 0..faults as u64 {
                let gpa = region + permute(i, pages, 11 + round as u64) * PAGE as u64;
                let p = ram.host_range(GuestAddress(gpa), 8).map(|p| p as *const u64);
                let Ok(p) = p else { continue };
                let t = Instant::now();
                // SAFETY: `p` is 8 bytes of guest RAM; the engine resolves the fault.
                std::hint::black_box(unsafe { std::ptr::read_volatile(p) });
                lat.push(t.elapsed().as_nanos() as u64);
            }
            stop.store(true, Ordering::Relaxed);
        });
        lat.sort_unstable();
        let p = (percentile(&lat, 0.5) as f64 / 1e3, percentile(&lat, 0.99) as f64 / 1e3);
        if with_storm {
            storm.push(p);
            offlines += done.load(Ordering::Relaxed);
        } else {
            quiet.push(p);
        }
    }
    let med = |v: &[(f64, f64)], which: usize| median(v.iter().map(|p| if which == 0 { p.0 } else { p.1 }).collect());
    let paired = median(quiet.iter().zip(&storm).map(|(q, s)| s.1 / q.1.max(1e-9)).collect());
    Ok(StormLatency {
        quiet: (med(&quiet, 0), med(&quiet, 1)),
        storm: (med(&storm, 0), med(&storm, 1)),
        paired_p99_ratio: paired,
        offlines: offlines / rounds as u64,
    })
}

impl BenchConfig {
    fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

/// Runs the bench; `log` hears progress.
pub fn run(cfg: &BenchConfig, mut log: impl FnMut(&str)) -> Result<BenchReport, String> {
    let started = Instant::now();
    let rounds = cfg.rounds.max(5);
    let (host_bytes, guest_bytes, storm_faults) =
        if cfg.quick { (64 * MIB, 64 * MIB, 4000) } else { (256 * MIB, 256 * MIB, 20_000) };
    let dir = std::env::temp_dir().join(format!("apf-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let image = dir.join("host.img");
    write_image(&image, host_bytes, Pattern { seed: 1 }).map_err(|e| format!("{}: {e}", image.display()))?;
    // The guest's snapshot: one touch run's RAM.
    let snapshot = dir.join("guest.snap");
    let make = RunConfig {
        mem: Some(guest_bytes),
        vcpus: Some(2),
        duration: Duration::ZERO,
        workload: Workload::Touch,
        offline_every: None,
        guest_offline: false,
        checksum: false,
        progress: false,
        save_snapshot: Some(snapshot.clone()),
        ..RunConfig::default()
    };
    let made = if cfg.wants("throughput") {
        crate::vm::run(&make).map_err(|e| crate::error_chain(&e))?
    } else {
        crate::report::Report { snapshot_saved: Some(String::new()), ..Default::default() }
    };
    if made.snapshot_saved.is_none() {
        return Err(format!("cannot make the guest snapshot: {}", made.errors.join("; ")));
    }

    let d = apf::Config::default();
    let apf = Variant::Apf { workers: d.workers, window: d.max_window };
    let mut host_variants = vec![Variant::Kernel, Variant::Baseline, apf, Variant::ApfTraced];
    if !cfg.quick {
        for workers in [1, 4] {
            host_variants.push(Variant::Apf { workers, window: d.max_window });
        }
        for window in [16, 64] {
            host_variants.push(Variant::Apf { workers: d.workers, window });
        }
    }
    // (env, order, source, variants)
    let mut cases: Vec<(Env, bool, Src, Vec<Variant>)> = Vec::new();
    for random in [false, true] {
        cases.push((Env::Host, random, Src::Zero, host_variants.clone()));
        let file: Vec<Variant> = host_variants.iter().copied().filter(|v| *v != Variant::Kernel).collect();
        cases.push((Env::Host, random, Src::File, file));
        cases.push((Env::Guest, random, Src::Zero, vec![Variant::Kernel, Variant::Baseline, apf, Variant::ApfTraced]));
        cases.push((Env::Guest, random, Src::File, vec![Variant::Baseline, apf, Variant::ApfTraced]));
    }
    let name = |env: Env, random: bool, src: Src| {
        format!(
            "{}/{}/{}",
            if env == Env::Host { "host" } else { "guest" },
            if random { "random" } else { "seq" },
            if src == Src::Zero { "zero" } else { "file" }
        )
    };
    let mut report = BenchReport { quick: cfg.quick, rounds, host_bytes, guest_bytes, ..BenchReport::default() };
    for (env, random, src, variants) in &cases {
        report.workloads.push(WorkloadResult {
            name: name(*env, *random, *src),
            access: if *src == Src::Zero { "writes" } else { "reads" },
            latency_from: if *env == Env::Host {
                "the touching thread: time of each page's first access"
            } else {
                "the handler: apf.fault spans (apf-traced), the baseline's own timer; none for kernel or untraced apf"
            },
            series: variants.iter().map(|v| Series { variant: v.name(), samples: Vec::new() }).collect(),
        });
    }
    if !cfg.wants("throughput") {
        cases.clear();
        report.workloads.clear();
    }
    for round in 0..rounds {
        if cases.is_empty() {
            break;
        }
        log(&format!("round {}/{rounds}: throughput", round + 1));
        for (i, (env, random, src, variants)) in cases.iter().enumerate() {
            for (k, v) in variants.iter().enumerate() {
                let sample = match env {
                    Env::Host => host_pass(*v, *random, *src, host_bytes, &image, 5 + round as u64),
                    Env::Guest => {
                        guest_pass(*v, *random, (*src == Src::File).then_some(snapshot.as_path()), guest_bytes)
                    }
                };
                match sample {
                    Ok(s) => report.workloads[i].series[k].samples.push(s),
                    Err(e) => report.errors.push(format!("{}: {e}", report.workloads[i].name)),
                }
            }
        }
    }
    if cfg.wants("offline") {
        log("offline cost");
        match offline_cost(rounds) {
            Ok((ms, hard)) => {
                report.offline_ms = ms;
                report.hard_pin = hard;
            }
            Err(e) => report.errors.push(format!("offline cost: {e}")),
        }
    }
    if cfg.wants("storm") {
        log("fault latency next to an offline storm");
        match storm_latency(rounds, storm_faults) {
            Ok(l) => {
                report.storm_p50_us = (l.quiet.0, l.storm.0);
                report.storm_p99_us = (l.quiet.1, l.storm.1);
                report.storm_offlines = l.offlines;
                report.storm_ratio = l.paired_p99_ratio;
            }
            Err(e) => report.errors.push(format!("storm latency: {e}")),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    report.elapsed = started.elapsed();
    Ok(report)
}

/// A chart of the throughput workloads: one group of bars per workload,
/// one bar per variant, on a log scale.
pub fn chart(report: &BenchReport) -> String {
    let rows: Vec<(String, String, f64)> = report
        .workloads
        .iter()
        .flat_map(|w| w.series.iter().map(move |s| (w.name.clone(), s.variant.clone(), s.pages_per_sec())))
        .collect();
    let bar_h = 14.0;
    let gap = 8.0;
    let groups = report.workloads.len() as f64;
    let h = 60.0 + rows.len() as f64 * bar_h + groups * gap + 40.0;
    let (left, width) = (260.0, 560.0);
    let max = rows.iter().map(|r| r.2).fold(1.0f64, f64::max).log10().ceil();
    let min = 3.0f64; // 1,000 pages/s
    let x = |v: f64| left + ((v.max(1.0).log10() - min).max(0.0) / (max - min)) * width;
    let color = |variant: &str| match variant {
        "kernel" => "#7f7f7f",
        "baseline" => "#d62728",
        "apf" => "#1f77b4",
        "apf-traced" => "#17becf",
        _ => "#9ecae1",
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">",
        left + width + 40.0
    );
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<text x=\"10\" y=\"22\" font-size=\"14\">apf bench: pages per second (log scale), median of {} rounds</text>",
        report.rounds
    );
    let mut dec = min;
    while dec <= max {
        let gx = x(10f64.powf(dec));
        let _ = writeln!(s, "<line x1=\"{gx:.1}\" y1=\"40\" x2=\"{gx:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>", h - 30.0);
        let _ = writeln!(s, "<text x=\"{gx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">1e{dec}</text>", h - 15.0);
        dec += 1.0;
    }
    let mut y = 50.0;
    let mut last = String::new();
    for (workload, variant, rate) in &rows {
        if *workload != last {
            y += gap;
            last = workload.clone();
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{workload} {variant}</text>",
            left - 6.0,
            y + bar_h - 4.0
        );
        let _ = writeln!(
            s,
            "<rect class=\"bar\" x=\"{left}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>",
            x(*rate) - left,
            bar_h - 2.0,
            color(variant)
        );
        let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\">{rate:.0}</text>", x(*rate) + 4.0, y + bar_h - 4.0);
        y += bar_h;
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(variant: &str, rates: &[f64]) -> Series {
        let samples = rates.iter().map(|&r| Sample { pages: r as u64, seconds: 1.0, latency: None }).collect();
        Series { variant: variant.into(), samples }
    }

    fn workload(name: &str, series: Vec<Series>) -> WorkloadResult {
        WorkloadResult { name: name.into(), access: "reads", latency_from: "", series }
    }

    #[test]
    fn ratios_are_medians_over_medians() {
        let report = BenchReport {
            workloads: vec![
                workload(
                    "host/seq/file",
                    vec![
                        series("baseline", &[10.0, 1000.0, 12.0, 11.0, 9.0]),
                        series("apf", &[300.0, 310.0, 1.0, 290.0, 305.0]),
                    ],
                ),
                workload("host/random/zero", vec![series("apf", &[100.0; 5]), series("apf-traced", &[98.0; 5])]),
            ],
            offline_ms: (20.0, 25.0),
            storm_p99_us: (30.0, 90.0),
            storm_ratio: 3.0,
            ..BenchReport::default()
        };
        let r: std::collections::HashMap<_, _> = report.ratios().into_iter().collect();
        // Paired by round, then the median: outlier rounds move nothing.
        // Per round: 30, 0.31, 0.083, 26.4, 33.9.
        assert!((r["host_seq_apf_vs_baseline"] - 290.0 / 11.0).abs() < 1e-9);
        assert!((r["tracing_overhead"] - 100.0 / 98.0).abs() < 1e-9);
        assert_eq!(r["offline_pins_vs_nopin"], 1.25);
        assert!(report.met("host_seq_apf_vs_baseline") && report.met("tracing_overhead"));
        assert!(!report.met("fault_latency_storm_vs_quiet"), "3x is over the 2x target");
        // A workload that did not run is 0, which meets no target.
        assert_eq!(r["guest_seq_apf_vs_kernel"], 0.0);
        assert!(!report.met("guest_seq_apf_vs_kernel"));

        let json = report.to_json();
        for (name, _, _) in TARGETS {
            assert!(json.contains(&format!("\"{name}\":")), "{name} missing");
        }
        let svg = chart(&report);
        assert_eq!(svg.matches("<rect class=\"bar\"").count(), 4);
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
