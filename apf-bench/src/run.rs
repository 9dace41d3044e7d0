//! One bench run: the throughput workloads (host passes here, guest
//! passes through a [`GuestPass`]), then the offline cost and the fault
//! latency next to a storm.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apf::LatencyLayer;
use apf::Pattern;
use apf::SinglePageHandler;
use apf::{Engine, GuestAddress, GuestRam, GuestRange, Mode, PageSource, SnapshotFile, ZeroSource};
use tracing_subscriber::layer::SubscriberExt;
use vm_memory::Bytes;

use crate::guest_storm::{GuestStormFigures, GuestStormRun, GuestStormSample, BENCH_STORM};
use crate::latency::{fault_latency, LatencyConfig, Load};
use crate::offline::{offline_against_hard_pin, offline_cost, random_pins};
use crate::report::{BenchReport, Sample, Series, WorkloadResult};
use crate::{median, percentile, MIB, PAGE};

/// The memory the pin ratio pins.
const GIB: u64 = 1 << 30;

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
    /// Only these parts ("throughput", "restore", "offline", "storm", "guest-storm");
    /// empty: all.
    pub only: Vec<String>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig { quick: false, rounds: 5, json: None, chart: None, only: Vec::new() }
    }
}

/// The guest workloads: a guest's first pass under KVM, two vCPUs, each
/// over its stripe. A VMM provides this (`vmm bench` does); this crate
/// never touches KVM, and without one the guest workloads are not
/// measured.
pub trait GuestPass {
    /// Makes the snapshot the file-backed guest workloads restore from:
    /// the RAM of one run of `bytes` that touched every data page.
    fn make_snapshot(&self, bytes: u64, path: &Path) -> Result<(), String>;

    /// One first pass with faults served by `variant`, in order or in a
    /// keyed random order: the touch of `bytes` of fresh RAM, or with
    /// `snapshot` the verify of that snapshot restored on demand.
    fn first_pass(&self, variant: Variant, random: bool, snapshot: Option<&Path>, bytes: u64)
        -> Result<Sample, String>;

    /// One guest run of the guest-storm part ([`crate::guest_storm`]):
    /// the engine's and the guest's views of its faults. A VMM that
    /// cannot run it says so.
    fn guest_storm(&self, run: &GuestStormRun) -> Result<GuestStormSample, String> {
        let _ = run;
        Err("this VMM does not run the guest-storm part".into())
    }

    /// One first pass over `snapshot` restored through the external
    /// page-fault handler listening on `socket` (Firecracker's protocol,
    /// serving the snapshot file), in order or at random. A VMM that
    /// cannot restore that way leaves it refused.
    fn handler_first_pass(&self, socket: &Path, random: bool, snapshot: &Path) -> Result<Sample, String> {
        let _ = (socket, random, snapshot);
        Err("this VMM cannot restore through an external handler".into())
    }

    /// Makes the replay part's snapshot (a guest of `bytes` that touched
    /// every page, its workload the scattered one) and records its working
    /// set at `working_set` on a first restore of it. Returns the set's
    /// pages.
    fn make_replay_snapshot(&self, bytes: u64, snapshot: &Path, working_set: &Path) -> Result<u64, String> {
        let _ = (bytes, snapshot, working_set);
        Err("this VMM does not run the replay part".into())
    }

    /// One restore of the replay part ([`crate::replay`]) under `case`:
    /// cold, with the snapshot's page cache dropped first; changed, with
    /// the guest touching a set a tenth of which differs from the one
    /// recorded.
    fn replay_pass(
        &self,
        variant: crate::replay::ReplayVariant,
        snapshot: &Path,
        working_set: &Path,
        case: crate::replay::ReplayCase,
    ) -> Result<crate::replay::ReplaySample, String> {
        let _ = (variant, snapshot, working_set, case);
        Err("this VMM does not run the replay part".into())
    }
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

/// Who serves the faults of a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Plain anonymous memory, no userfaultfd: the kernel's own fault path.
    Kernel,
    /// `apf::baseline`: one thread, blocking read, one page per fault.
    Baseline,
    /// The engine, with this many workers and this prefetch window.
    Apf {
        /// Worker threads.
        workers: usize,
        /// Largest prefetch window, in pages.
        window: usize,
    },
    /// The engine with its defaults and the latency layer on.
    ApfTraced,
    /// A restore only: the snapshot file mapped `MAP_PRIVATE`, no
    /// userfaultfd (the kernel's own file-backed restore).
    KernelFile,
    /// A restore only: the engine over the snapshot's image loaded once
    /// and mapped private, reads mapped in place.
    ApfZeroCopy,
    /// A restore only: the engine over private anonymous 2 MiB huge pages
    /// (`MAP_HUGETLB`), a fault copying a whole huge page from the file.
    ApfHugetlb,
    /// A restore only: the engine over the snapshot's image loaded into
    /// 2 MiB huge pages and mapped private, reads mapped in place.
    ApfZeroCopyHugetlb,
}

impl Variant {
    /// The variant's name in the report: "kernel", "apf-workers-4", ...
    pub fn name(&self) -> String {
        let d = apf::Config::default();
        match *self {
            Variant::Kernel => "kernel".into(),
            Variant::Baseline => "baseline".into(),
            Variant::Apf { workers, window } if workers == d.workers && window == d.max_window => "apf".into(),
            Variant::Apf { workers, window } if window == d.max_window => format!("apf-workers-{workers}"),
            Variant::Apf { window, .. } => format!("apf-window-{window}"),
            Variant::ApfTraced => "apf-traced".into(),
            Variant::KernelFile => "kernel-file".into(),
            Variant::ApfZeroCopy => "apf-zero-copy".into(),
            Variant::ApfHugetlb => "apf-hugetlb".into(),
            Variant::ApfZeroCopyHugetlb => "apf-zero-copy-hugetlb".into(),
        }
    }
}

/// Writes the image the host file workloads restore from.
pub(crate) fn write_image(path: &Path, bytes: u64, pattern: Pattern) -> std::io::Result<()> {
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
        Variant::KernelFile | Variant::ApfZeroCopy | Variant::ApfHugetlb | Variant::ApfZeroCopyHugetlb => {
            return Err(format!("{} restores a guest; the host restores are the restore part", variant.name()))
        }
        Variant::Kernel => {}
        Variant::Baseline => {
            _baseline = Some(SinglePageHandler::start(ram.clone(), source(&ram)?).map_err(|e| err(&e))?)
        }
        Variant::Apf { workers, window } => {
            let config = apf::Config { workers, max_window: window, ..apf::Config::default() };
            let b = Engine::builder(ram.clone(), source(&ram)?).config(config);
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
    // The first touch of every page is resolved by the kernel, the
    // baseline or the engine, which live until the end of this function.
    let access = if write { crate::restore::Access::Write } else { crate::restore::Access::Read };
    let (seconds, mut all) = crate::restore::touch(base, pages, access, random, seed);
    let (threads, per) = (2, pages / 2);
    // Check what the threads saw: the first word of every page.
    let pattern = Pattern { seed: 1 };
    for p in 0..per * threads {
        let word = ram.guest_memory().read_obj::<u64>(GuestAddress(p * PAGE)).map_err(|e| e.to_string())?;
        let want = if write { p } else { pattern.word_at(p * PAGE, 0) };
        if word != want {
            return Err(format!("{}: page {p} holds {word:#x}", variant.name()));
        }
    }
    all.sort_unstable();
    let latency = Some((Duration::from_nanos(percentile(&all, 0.5)), Duration::from_nanos(percentile(&all, 0.99))));
    Ok(Sample { pages: per * threads, seconds, latency })
}

impl BenchConfig {
    fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

/// Runs the bench; `guest` runs the guest workloads (without one they are
/// left out); `log` hears progress.
pub fn run(cfg: &BenchConfig, guest: Option<&dyn GuestPass>, mut log: impl FnMut(&str)) -> Result<BenchReport, String> {
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
    // The guest-storm part runs guests of its own, throughput or not.
    let storm_guest = guest;
    let guest_for_handler = guest.filter(|_| cfg.wants("handler"));
    let guest = guest.filter(|_| cfg.wants("throughput"));
    match guest {
        Some(g) => {
            g.make_snapshot(guest_bytes, &snapshot).map_err(|e| format!("cannot make the guest snapshot: {e}"))?
        }
        None if cfg.wants("throughput") => {
            log("guest workloads: not measured (they run under KVM, through the VMM: `vmm bench`)")
        }
        None => {}
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
        if guest.is_some() {
            let zero = vec![Variant::Kernel, Variant::Baseline, apf, Variant::ApfTraced];
            cases.push((Env::Guest, random, Src::Zero, zero));
            let restorers = [
                Variant::KernelFile,
                Variant::Baseline,
                apf,
                Variant::ApfZeroCopy,
                Variant::ApfHugetlb,
                Variant::ApfZeroCopyHugetlb,
                Variant::ApfTraced,
            ];
            cases.push((Env::Guest, random, Src::File, restorers.to_vec()));
        }
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
                    Env::Guest => match guest {
                        Some(g) => {
                            g.first_pass(*v, *random, (*src == Src::File).then_some(snapshot.as_path()), guest_bytes)
                        }
                        None => continue,
                    },
                };
                match sample {
                    Ok(s) => report.workloads[i].series[k].samples.push(s),
                    Err(e) => report.errors.push(format!("{}: {e}", report.workloads[i].name)),
                }
            }
        }
    }
    if cfg.wants("restore") {
        if let Err(e) = restore_part(&mut report, &image, host_bytes, rounds, &mut log) {
            report.errors.push(format!("restore: {e}"));
        }
    }
    if cfg.wants("offline") {
        log("offline cost");
        match offline_part(rounds) {
            Ok((ms, hard)) => {
                report.offline_ms = ms;
                report.hard_pin = hard;
            }
            Err(e) => report.errors.push(format!("offline cost: {e}")),
        }
    }
    if cfg.wants("storm") {
        log("fault latency next to an offline storm");
        match storm_part(rounds, storm_faults) {
            Ok([quiet, storm]) => {
                report.storm_p50_us = (quiet.median_us(0), storm.median_us(0));
                report.storm_p99_us = (quiet.median_us(1), storm.median_us(1));
                report.storm_offlines = storm.offlines / rounds as u64;
                // Each storm round over the quiet round before it.
                report.storm_ratio =
                    median(quiet.rounds.iter().zip(&storm.rounds).map(|(q, s)| s.1 / q.1.max(1e-9)).collect());
            }
            Err(e) => report.errors.push(format!("storm latency: {e}")),
        }
    }
    if cfg.wants("guest-storm") {
        match storm_guest {
            Some(g) => {
                let offline_ms = (report.offline_ms.0 > 0.0).then_some(report.offline_ms.0);
                report.guest_storm =
                    Some(guest_storm_part(g, cfg.quick, rounds, offline_ms, &mut report.errors, &mut log));
            }
            None => log("guest storm: not measured (it runs under KVM, through the VMM: `vmm bench`)"),
        }
    }
    if cfg.wants("handler") {
        log("the external handler against the one-page handler and the file mapping (host-side clients)");
        let figures = std::env::current_exe()
            .map_err(|e| format!("cannot find this program to start the handler processes: {e}"))
            .and_then(|exe| {
                let guest = guest_for_handler.map(|g| (g, snapshot.as_path(), guest_bytes));
                crate::handler::run(&exe, &dir, host_bytes, rounds, guest)
            });
        match figures {
            Ok(f) => report.handler = Some(f),
            Err(e) => report.errors.push(format!("handler: {e}")),
        }
    }
    if cfg.wants("replay") {
        match storm_guest {
            Some(g) => match replay_part(g, &dir, guest_bytes, rounds, &mut log) {
                Ok(f) => report.replay = Some(f),
                Err(e) => report.errors.push(format!("replay: {e}")),
            },
            None => log("replay: not measured (it runs under KVM, through the VMM: `vmm bench`)"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    report.elapsed = started.elapsed();
    Ok(report)
}

/// The replay part ([`crate::replay`]): the snapshot and its working set
/// made once, then every variant once a round, in turn.
fn replay_part(
    guest: &dyn GuestPass,
    dir: &Path,
    bytes: u64,
    rounds: usize,
    log: &mut impl FnMut(&str),
) -> Result<crate::replay::ReplayFigures, String> {
    use crate::replay::{ReplayCase, ReplayFigures, ReplayVariant};
    let (snapshot, working_set) = (dir.join("replay.snap"), dir.join("replay.ws"));
    log("replay: the snapshot and its working set");
    let set_pages = guest.make_replay_snapshot(bytes, &snapshot, &working_set)?;
    let mut figures = ReplayFigures { bytes, set_pages, ..ReplayFigures::default() };
    for round in 0..rounds {
        log(&format!("round {}/{rounds}: replay", round + 1));
        for case in ReplayCase::ALL {
            let mut samples = [None; 5];
            for (k, v) in ReplayVariant::ALL.iter().enumerate() {
                match guest.replay_pass(*v, &snapshot, &working_set, case) {
                    Ok(s) => samples[k] = Some(s),
                    Err(e) => return Err(format!("{}{}: {e}", v.name(), case.suffix())),
                }
            }
            figures.rounds_of_mut(case).push(samples);
        }
    }
    let _ = std::fs::remove_file(&snapshot);
    let _ = std::fs::remove_file(&working_set);
    Ok(figures)
}

/// Restoring the host image three ways ([`crate::restore`]), every
/// restorer of every workload once a round, the image loaded afresh each
/// round; then the memory of 4 clones after a read pass.
fn restore_part(
    report: &mut BenchReport,
    path: &Path,
    bytes: u64,
    rounds: usize,
    log: &mut impl FnMut(&str),
) -> Result<(), String> {
    use crate::restore::{clones_memory, load_image, pin_present, restore_pass, Access, Restorer};
    // Huge pages for the huge-page restorer (one image's worth) and the
    // 1 GiB pin, reserved for the part; without them those rows are
    // errors and the ratios 0.
    let pool_pages = (bytes.max(GIB) / apf::HUGE_PAGE_SIZE as u64) + 8;
    let pool = apf::hugepool::HugePool::reserve(pool_pages, Instant::now() + Duration::from_secs(60));
    if let Err(e) = &pool {
        report.errors.push(format!("restore: no huge pages for the huge-page rows: {e}"));
    }
    let workloads = [
        (Access::Read, false),
        (Access::Read, true),
        (Access::Write, false),
        (Access::Write, true),
        (Access::ReadThenWrite, false),
    ];
    let first = report.workloads.len();
    for (access, random) in workloads {
        report.workloads.push(WorkloadResult {
            name: format!("host/{}/restore-{}", if random { "random" } else { "seq" }, access.name()),
            access: access.name(),
            latency_from: "the touching thread: time of each page's first access",
            series: Restorer::ALL.iter().map(|r| Series { variant: r.name().into(), samples: Vec::new() }).collect(),
        });
    }
    let mut loads = Vec::new();
    for round in 0..rounds {
        log(&format!("round {}/{rounds}: restore", round + 1));
        let (images, took) = load_image(path, pool.is_ok())?;
        loads.push(took.as_secs_f64() * 1e3);
        for (i, &(access, random)) in workloads.iter().enumerate() {
            for (k, r) in Restorer::ALL.iter().enumerate() {
                match restore_pass(*r, access, random, path, &images, bytes, 5 + round as u64) {
                    Ok(s) => report.workloads[first + i].series[k].samples.push(s),
                    Err(e) => report.errors.push(format!("{}: {e}", report.workloads[first + i].name)),
                }
            }
        }
    }
    report.image_load_ms = median(loads);
    if pool.is_ok() {
        log("pinning 1 GiB of present memory, 4 KiB and 2 MiB pages");
        match (pin_present(GIB, false, rounds), pin_present(GIB, true, rounds)) {
            (Ok(small), Ok(huge)) => report.pin_1gib_ms = (small, huge),
            (a, b) => report.errors.extend([a.err(), b.err()].into_iter().flatten().map(|e| format!("pin 1 GiB: {e}"))),
        }
    }
    drop(pool);
    log("memory of 4 clones of one image");
    let (images, _) = load_image(path, false)?;
    report.clones4_memory = clones_memory(&images.small, 4)?;
    Ok(())
}

/// Offlining 64 MiB with and without 1,000 pins (migrations), and against
/// a hard pin.
fn offline_part(rounds: usize) -> Result<((f64, f64), String), String> {
    let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), (64 * MIB) as usize)]).map_err(|e| e.to_string())?);
    let engine = Engine::builder(ram, Arc::new(ZeroSource)).start().map_err(|e| e.to_string())?;
    let target = GuestRange::new(GuestAddress(0), 64 * MIB);
    let pins = random_pins(&engine, target, 1000, 7)?;
    let cost = offline_cost(&engine, target, &pins, &[Mode::Migrate], rounds)?;
    drop(pins);
    let hard = offline_against_hard_pin(&engine, GuestRange::new(GuestAddress(0), MIB));
    Ok(((cost.median_ms(Mode::Migrate, false), cost.median_ms(Mode::Migrate, true)), hard))
}

/// Guest fault latency quiet and next to the bench storm, rounds
/// interleaved, then next to a host block offline; the 64 MiB Migrate
/// time from the offline part, or measured here when that did not run.
fn guest_storm_part(
    guest: &dyn GuestPass,
    quick: bool,
    rounds: usize,
    offline_64mib_ms: Option<f64>,
    errors: &mut Vec<String>,
    log: &mut impl FnMut(&str),
) -> GuestStormFigures {
    let (bytes, duration) =
        if quick { (128 * MIB, Duration::from_secs(1)) } else { (256 * MIB, Duration::from_secs(3)) };
    let mut figures = GuestStormFigures { bytes, storm: Some(BENCH_STORM), ..GuestStormFigures::default() };
    let quiet = GuestStormRun { bytes, duration, storm: None, host_block: false };
    let storm = GuestStormRun { storm: Some(BENCH_STORM), ..quiet };
    // The block offline starts halfway through `duration`: 0.2 s into a
    // first pass that faults for about a second.
    let block = GuestStormRun { bytes: 256 * MIB, duration: Duration::from_millis(400), storm: None, host_block: true };
    for round in 0..rounds {
        log(&format!(
            "round {}/{rounds}: guest faults quiet, next to a storm, next to a host block offline",
            round + 1
        ));
        match (guest.guest_storm(&quiet), guest.guest_storm(&storm)) {
            (Ok(q), Ok(s)) => figures.rounds.push((q, s)),
            (q, s) => {
                for e in [q.err(), s.err()].into_iter().flatten() {
                    errors.push(format!("guest storm: {e}"));
                }
            }
        }
        match guest.guest_storm(&block) {
            Ok(b) => figures.host_block.push(b),
            Err(e) => errors.push(format!("guest storm, host block: {e}")),
        }
    }
    figures.offline_64mib_ms = match offline_64mib_ms {
        Some(ms) => Some(ms),
        None => match offline_64mib(rounds) {
            Ok(ms) => Some(ms),
            Err(e) => {
                errors.push(format!("offline 64 MiB: {e}"));
                None
            }
        },
    };
    figures
}

/// Offlining 64 MiB (Migrate, no pins): the median ms over `rounds`.
fn offline_64mib(rounds: usize) -> Result<f64, String> {
    let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), (64 * MIB) as usize)]).map_err(|e| e.to_string())?);
    let engine = Engine::builder(ram, Arc::new(ZeroSource)).start().map_err(|e| e.to_string())?;
    let target = GuestRange::new(GuestAddress(0), 64 * MIB);
    let cost = offline_cost(&engine, target, &[], &[Mode::Migrate], rounds)?;
    Ok(cost.median_ms(Mode::Migrate, false))
}

/// Fault latency (first reads of random fresh pages, one at a time) quiet
/// and with an offline storm (an offline every millisecond, at nice 19)
/// on another range, rounds interleaved.
fn storm_part(rounds: usize, faults: usize) -> Result<[crate::latency::LoadLatency; 2], String> {
    let fault_bytes = (faults as u64 * PAGE).next_multiple_of(2 * MIB);
    let storm_bytes = 64 * MIB;
    // Fresh pages for every round: no unplug between rounds.
    let total = storm_bytes + 2 * rounds as u64 * fault_bytes;
    let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), total as usize)]).map_err(|e| e.to_string())?);
    // Every access a fault: no fault-around, so each sample is one fault's
    // service time.
    let config = apf::Config { fault_around: 1, ..apf::Config::default() };
    let engine =
        Engine::builder(ram.clone(), Arc::new(ZeroSource)).config(config).start().map_err(|e| e.to_string())?;
    let storm_range = GuestRange::new(GuestAddress(0), storm_bytes);
    engine.prefetch(storm_range).map_err(|e| e.to_string())?;
    let cfg = LatencyConfig {
        storm_range,
        fault_range: GuestRange::new(GuestAddress(storm_bytes), total - storm_bytes),
        loads: vec![Load::Quiet, Load::Storm { pause_us: 1000 }],
        rounds,
        faults,
        nice: 19,
    };
    let [quiet, storm]: [_; 2] =
        fault_latency(&engine, &ram, &cfg)?.try_into().map_err(|_| "two loads, two results".to_string())?;
    Ok([quiet, storm])
}
