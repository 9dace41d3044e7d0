//! The run's configuration and the `vmm run` command line.

use std::path::PathBuf;
use std::time::Duration;

use agent_proto::Workload;
use apf::UnplugPolicy;
use thiserror::Error;

/// Which offline modes the host storm uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfflineMode {
    /// Migrate only.
    Migrate,
    /// Evict only.
    Evict,
    /// Migrate and evict in turn.
    Mixed,
}

/// What backs guest RAM and resolves its missing pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The apf engine.
    Apf,
    /// Plain anonymous memory, no userfaultfd: the kernel fills pages.
    Plain,
    /// One thread, one page per fault ([`apf::baseline`]): the anchor apf
    /// is measured against. No offlining, no pins.
    Baseline,
    /// The snapshot file mapped `MAP_PRIVATE`, no userfaultfd: the
    /// kernel's own restore (Firecracker's File backend), the anchor a
    /// restore is weighed against. Needs `--restore`; no offlining, no
    /// balloon (a discarded page would show the file again).
    File,
}

impl Backend {
    /// The name reports use.
    pub fn as_str(&self) -> &'static str {
        match self {
            Backend::Apf => "apf",
            Backend::Plain => "plain",
            Backend::Baseline => "baseline",
            Backend::File => "file",
        }
    }
}

/// Everything a run needs.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// Guest RAM in bytes; None: 512 MiB, or the snapshot's size.
    pub mem: Option<u64>,
    /// vCPUs; None: 2, or the snapshot's count.
    pub vcpus: Option<u32>,
    /// Engine worker threads; None: the engine's default.
    pub workers: Option<usize>,
    /// Where the engine resolves faults; None: its default.
    pub dispatch: Option<apf::Dispatch>,
    /// How long the agents run their passes.
    pub duration: Duration,
    /// What the agents run.
    pub workload: Workload,
    /// Seed of stamps and random choices; None: 1, or the snapshot's.
    pub seed: Option<u64>,
    /// Host storm interval; None: no storm.
    pub offline_every: Option<Duration>,
    /// Host storm modes.
    pub offline_mode: OfflineMode,
    /// Largest range one storm offline takes, in bytes (a multiple of the
    /// page size); each offline draws its size from 1 page to this.
    pub offline_max: u64,
    /// Offline one real host memory block once, halfway through.
    pub host_block: bool,
    /// Agents ask for offlines of their own memory.
    pub guest_offline: bool,
    /// The checksum device is used.
    pub checksum: bool,
    /// What unplugged memory reads as.
    pub unplug_policy: UnplugPolicy,
    /// What backs guest RAM.
    pub backend: Backend,
    /// The kind of guest RAM the engine serves (private anonymous, shared
    /// memfd, or the restored snapshot's image mapped private).
    pub memory: apf::MemoryKind,
    /// The first pass (touch, or the verify of a restore) visits pages in
    /// a random order.
    pub random_order: bool,
    /// With the scattered workload on a restore: a tenth of the pages
    /// verified differ from the plain set.
    pub scattered_changed: bool,
    /// Write guest RAM here at the end.
    pub save_snapshot: Option<PathBuf>,
    /// Start from this snapshot.
    pub restore: Option<PathBuf>,
    /// Restore through the external page-fault handler listening here
    /// (Firecracker's protocol; it serves the snapshot file as its memory
    /// file) instead of the engine in this process.
    pub uffd_socket: Option<PathBuf>,
    /// Write the JSON report here.
    pub report_json: Option<PathBuf>,
    /// The guest image; None: the guest agent built with the VMM.
    pub guest_image: Option<GuestImage>,
    /// Extra time for agents to finish after `duration` before the run is
    /// failed and every vCPU is stopped.
    pub grace: Duration,
    /// Aggregate the engine's spans into latency histograms (the
    /// `LatencyLayer`); off only to measure what it costs.
    pub latency: bool,
    /// Write a latency distribution chart (SVG) here.
    pub plot: Option<PathBuf>,
    /// Write a Chrome trace (Perfetto) of the most recent spans here.
    pub chrome_trace: Option<PathBuf>,
    /// Show a progress line on stderr when it is a terminal.
    pub progress: bool,
    /// Where missing pages come from instead of zeros (fault injection:
    /// a source that fails or stalls). Not on the command line.
    pub source: Option<SourceOverride>,
    /// Record the pages the guest touches first and write them here at
    /// the end, bound to the image the next restore serves: the snapshot
    /// this run saves, or else the one it restored.
    pub save_working_set: Option<PathBuf>,
    /// With `--restore`: replay this working set in the background from
    /// before the vCPUs start. A file that cannot be used is reported and
    /// the restore goes on without replay.
    pub working_set: Option<PathBuf>,
    /// After the working set, fill every page still missing.
    pub replay_eager: bool,
    /// Before the vCPUs start, install the working set's head at full
    /// speed for at most this long; zero: background replay only.
    pub replay_lead: Duration,
}

/// A page source given by the embedder, compared by identity.
#[derive(Clone)]
pub struct SourceOverride(pub std::sync::Arc<dyn apf::PageSource>);

impl std::fmt::Debug for SourceOverride {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SourceOverride({})", self.0.name())
    }
}

impl PartialEq for SourceOverride {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

/// A guest program other than the agent (tests use tiny hand-made ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestImage {
    /// An ELF file's bytes.
    Elf(Vec<u8>),
    /// Raw code, loaded at [`agent_proto::AGENT_LOAD`] and entered there.
    Raw(Vec<u8>),
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            mem: None,
            vcpus: None,
            workers: None,
            dispatch: None,
            duration: Duration::from_secs(20),
            workload: Workload::Mixed,
            seed: None,
            offline_every: Some(Duration::from_millis(20)),
            offline_mode: OfflineMode::Mixed,
            offline_max: DEFAULT_OFFLINE_MAX,
            host_block: false,
            guest_offline: true,
            checksum: true,
            unplug_policy: UnplugPolicy::Zero,
            backend: Backend::Apf,
            memory: apf::MemoryKind::PrivateAnonymous,
            random_order: false,
            scattered_changed: false,
            save_snapshot: None,
            restore: None,
            uffd_socket: None,
            report_json: None,
            guest_image: None,
            grace: Duration::from_secs(60),
            latency: true,
            plot: None,
            chrome_trace: None,
            progress: true,
            source: None,
            save_working_set: None,
            working_set: None,
            replay_eager: false,
            replay_lead: Duration::ZERO,
        }
    }
}

/// The storm's largest range by default: 1 MiB.
pub const DEFAULT_OFFLINE_MAX: u64 = 1 << 20;
/// The largest `--offline-max`.
pub const MAX_OFFLINE_MAX: u64 = 1 << 30;
/// How long a restore with a working set installs it before the vCPUs
/// start, unless `--replay-lead` says otherwise.
pub const DEFAULT_REPLAY_LEAD: Duration = Duration::from_secs(1);

/// Parses `--offline-max`: a size of whole pages, from one page to 1 GiB.
pub fn parse_offline_max(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n == 0 || n % agent_proto::PAGE_SIZE != 0 {
        return Err(format!("must be a positive multiple of the page size ({} bytes)", agent_proto::PAGE_SIZE));
    }
    if n > MAX_OFFLINE_MAX {
        return Err(format!("at most {} MiB", MAX_OFFLINE_MAX >> 20));
    }
    Ok(n)
}

/// A command line that cannot be run.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CliError {
    /// An option this command does not have.
    #[error("unknown option {0:?} (try `vmm help`)")]
    Unknown(String),
    /// An option without its value.
    #[error("{0} needs a value")]
    Missing(&'static str),
    /// A value that does not parse or is out of range.
    #[error("invalid value {value:?} for {option}: {why}")]
    Invalid {
        /// The option.
        option: &'static str,
        /// The value.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// Options that cannot go together.
    #[error("{0}")]
    Conflict(String),
}

/// Parses a size: bytes, or a number with K, M or G (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| "expected a size like 256M or 1G".to_string())?;
    n.checked_mul(mult).ok_or_else(|| "too large".to_string())
}

/// Parses a duration: a number with ms, s or m (`500ms`, `5s`, `2m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || "expected a duration like 500ms, 5s or 2m".to_string();
    let (num, unit) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        return Err(bad());
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    if !v.is_finite() || v < 0.0 || v * unit > 86_400.0 {
        return Err("must be between 0 and 24 hours".into());
    }
    Ok(Duration::from_secs_f64(v * unit))
}

fn parse_workload(s: &str) -> Result<Workload, String> {
    Ok(match s {
        "mixed" => Workload::Mixed,
        "sequential" | "seq" => Workload::Sequential,
        "random" => Workload::Random,
        "strided" => Workload::Strided,
        "touch" => Workload::Touch,
        "scattered" => Workload::Scattered,
        _ => return Err("expected mixed, sequential, random, strided, touch or scattered".into()),
    })
}

/// The options of `vmm run`, for `vmm help`.
pub const RUN_HELP: &str = "\
vmm run [OPTIONS]: boot the guest agent under KVM with RAM demand-faulted by apf,
stress and verify guest memory while it is offlined underneath, and report.

  --mem SIZE             guest RAM (default 512M; 8M..16G, a multiple of 2M)
  --vcpus N              vCPUs (default 2; 1..16)
  --workers N            engine worker threads (default: the engine's)
  --dispatch D           auto|inline|workers: where the engine resolves faults (default auto)
  --duration D           how long the agents stress memory (default 20s)
  --workload W           mixed|sequential|random|strided|touch|scattered (default mixed); scattered:
                         touch every page once, or on a restore verify a fixed, scattered 15% of
                         the pages, and finish
  --scattered-changed    with --workload scattered, on a restore: a tenth of the pages verified
                         differ from the plain set (a recorded working set 10% off)
  --seed N               seed of every stamp and random choice (default 1)
  --offline-every D      host offline storm interval, or `off` (default 20ms)
  --offline-mode M       migrate|evict|mixed (default mixed)
  --offline-max SIZE     largest range one storm offline takes, drawn from 1 page to SIZE
                         (default 1M; a multiple of 4K, at most 1G)
  --host-block           offline one real host memory block holding guest pages, once
  --no-guest-offline     agents do not ask for offlines of their own memory
  --no-checksum          agents do not use the checksum device
  --unplug-policy P      zero|poison: what unplugged memory reads as (default zero)
  --backend B            apf|plain|baseline|file: the engine (default), plain anonymous memory with no
                         userfaultfd, the one-page-per-fault handler, or (with --restore) the snapshot
                         file mapped private with no userfaultfd (no offlining with the last three)
  --memory K             anonymous|shared|image|hugetlb|shared-hugetlb|hugetlb-image: guest RAM
                         private anonymous (default), a memfd mapped shared, (with --restore) the
                         snapshot's image loaded once and mapped private, reads mapped in place,
                         private anonymous 2 MiB huge pages, a memfd of 2 MiB huge pages mapped
                         shared, or (with --restore) the image loaded into 2 MiB huge pages and
                         mapped private (huge pages are reserved in the kernel's pool for the run);
                         the host storm and the agents' offlines run on every kind (in place where
                         pages cannot move)
  --order O              seq|random: the order of the first pass (touch, restore verify); default seq
  --save-snapshot FILE   write guest RAM and what the agent needs to verify it, at the end
  --restore FILE         start from a snapshot: RAM demand-faulted from FILE, verified first
  --uffd-socket PATH     with --restore: RAM is served by the external page-fault handler on PATH
                         (--memory anonymous or hugetlb: 4 KiB or 2 MiB pages)
                         (Firecracker's protocol; e.g. apf-handler --socket PATH --mem-file FILE),
                         not by the engine in this process (no offlining, like --backend baseline)
  --save-working-set FILE  record the pages the guest touches first, in order, and write them to
                         FILE at the end, bound to the snapshot saved (--save-snapshot) or else
                         the one restored (--restore); needs the engine in this process
  --working-set FILE     with --restore: replay FILE's pages before the vCPUs start (see
                         --replay-lead), then in the background, demand faults first; a corrupt,
                         truncated, foreign or other-image file is reported and the restore goes
                         on without replay
  --replay-eager         with --working-set: fill every other missing page after the set
  --replay-lead D        with --working-set: before the vCPUs start, install the set at full speed
                         for at most D (e.g. 200ms); the rest goes in the background (default
                         1s; 0: all of it in the background)
  --report-json PATH     write the JSON report
  --plot PATH.svg        write a latency distribution chart (log scale, one series per span kind)
  --chrome-trace PATH    write a Perfetto/Chrome trace of the most recent 200,000 spans
  --no-latency           do not aggregate span latencies (to measure what that costs)
";

/// Command-line options, each `--name value` or `--name=value`: the walk
/// every subcommand's parser shares.
#[derive(Debug)]
pub struct Options<'a> {
    args: std::slice::Iter<'a, String>,
}

impl<'a> Options<'a> {
    /// Options from `args` (the subcommand's, after its name).
    pub fn new(args: &'a [String]) -> Self {
        Options { args: args.iter() }
    }

    /// The next option: its name, its value if it was given as
    /// `--name=value`, and the argument as written (for errors).
    pub fn next_option(&mut self) -> Option<(&'a str, Option<String>, &'a str)> {
        let arg = self.args.next()?;
        Some(match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string()), arg.as_str()),
            _ => (arg.as_str(), None, arg.as_str()),
        })
    }

    /// The value of option `opt`: given after `=`, else the next argument.
    pub fn value(&mut self, inline: Option<String>, opt: &'static str) -> Result<String, CliError> {
        inline.or_else(|| self.args.next().cloned()).ok_or(CliError::Missing(opt))
    }
}

/// Parses the options of `vmm run`.
pub fn parse_run(args: &[String]) -> Result<RunConfig, CliError> {
    let mut c = RunConfig::default();
    let mut storm_asked = false;
    let mut lead_asked = false;
    let mut options = Options::new(args);
    while let Some((name, inline, arg)) = options.next_option() {
        macro_rules! value {
            ($opt:literal) => {
                options.value(inline.clone(), $opt)?
            };
        }
        let invalid = |option: &'static str, value: &str, why: String| CliError::Invalid {
            option,
            value: value.to_string(),
            why,
        };
        match name {
            "--mem" => {
                let v = value!("--mem");
                let n = parse_size(&v).map_err(|e| invalid("--mem", &v, e))?;
                agent_proto::Layout::new(n, 1).map_err(|e| invalid("--mem", &v, e.to_string()))?;
                c.mem = Some(n);
            }
            "--vcpus" => {
                let v = value!("--vcpus");
                let n: u32 = v.parse().map_err(|_| invalid("--vcpus", &v, "expected a number".into()))?;
                if n == 0 || n > agent_proto::MAX_VCPUS {
                    return Err(invalid("--vcpus", &v, format!("must be 1 to {}", agent_proto::MAX_VCPUS)));
                }
                c.vcpus = Some(n);
            }
            "--workers" => {
                let v = value!("--workers");
                let n: usize = v.parse().map_err(|_| invalid("--workers", &v, "expected a number".into()))?;
                if n == 0 || n > 64 {
                    return Err(invalid("--workers", &v, "must be 1 to 64".into()));
                }
                c.workers = Some(n);
            }
            "--dispatch" => {
                let v = value!("--dispatch");
                c.dispatch = Some(v.parse().map_err(|e: String| invalid("--dispatch", &v, e))?);
            }
            "--duration" => {
                let v = value!("--duration");
                c.duration = parse_duration(&v).map_err(|e| invalid("--duration", &v, e))?;
            }
            "--scattered-changed" if inline.is_none() => c.scattered_changed = true,
            "--workload" => {
                let v = value!("--workload");
                c.workload = parse_workload(&v).map_err(|e| invalid("--workload", &v, e))?;
            }
            "--seed" => {
                let v = value!("--seed");
                c.seed = Some(v.parse().map_err(|_| invalid("--seed", &v, "expected a number".into()))?);
            }
            "--offline-every" => {
                storm_asked = true;
                let v = value!("--offline-every");
                c.offline_every = match v.as_str() {
                    "off" | "0" => None,
                    _ => {
                        let d = parse_duration(&v).map_err(|e| invalid("--offline-every", &v, e))?;
                        if d < Duration::from_micros(100) {
                            return Err(invalid("--offline-every", &v, "at least 100us (or off)".into()));
                        }
                        Some(d)
                    }
                };
            }
            "--offline-mode" => {
                let v = value!("--offline-mode");
                c.offline_mode = match v.as_str() {
                    "migrate" => OfflineMode::Migrate,
                    "evict" => OfflineMode::Evict,
                    "mixed" => OfflineMode::Mixed,
                    _ => return Err(invalid("--offline-mode", &v, "expected migrate, evict or mixed".into())),
                };
            }
            "--offline-max" => {
                let v = value!("--offline-max");
                c.offline_max = parse_offline_max(&v).map_err(|e| invalid("--offline-max", &v, e))?;
            }
            "--unplug-policy" => {
                let v = value!("--unplug-policy");
                c.unplug_policy = v.parse().map_err(|e| invalid("--unplug-policy", &v, e))?;
            }
            "--save-snapshot" => c.save_snapshot = Some(value!("--save-snapshot").into()),
            "--restore" => c.restore = Some(value!("--restore").into()),
            "--uffd-socket" => c.uffd_socket = Some(value!("--uffd-socket").into()),
            "--report-json" => c.report_json = Some(value!("--report-json").into()),
            "--save-working-set" => c.save_working_set = Some(value!("--save-working-set").into()),
            "--working-set" => c.working_set = Some(value!("--working-set").into()),
            "--replay-eager" if inline.is_none() => c.replay_eager = true,
            "--replay-lead" => {
                let v = value!("--replay-lead");
                c.replay_lead = parse_duration(&v).map_err(|e| invalid("--replay-lead", &v, e))?;
                lead_asked = true;
                if c.replay_lead > Duration::from_secs(60) {
                    return Err(invalid("--replay-lead", &v, "at most 60s".into()));
                }
            }
            "--plot" => c.plot = Some(value!("--plot").into()),
            "--chrome-trace" => c.chrome_trace = Some(value!("--chrome-trace").into()),
            "--no-latency" if inline.is_none() => c.latency = false,
            "--host-block" if inline.is_none() => c.host_block = true,
            "--no-guest-offline" if inline.is_none() => c.guest_offline = false,
            "--no-checksum" if inline.is_none() => c.checksum = false,
            "--backend" => {
                let v = value!("--backend");
                c.backend = match v.as_str() {
                    "apf" => Backend::Apf,
                    "plain" => Backend::Plain,
                    "baseline" => Backend::Baseline,
                    "file" => Backend::File,
                    _ => return Err(invalid("--backend", &v, "expected apf, plain, baseline or file".into())),
                };
            }
            "--memory" => {
                let v = value!("--memory");
                c.memory = v.parse().map_err(|e| invalid("--memory", &v, e))?;
            }
            "--order" => {
                let v = value!("--order");
                c.random_order = match v.as_str() {
                    "seq" | "sequential" => false,
                    "random" => true,
                    _ => return Err(invalid("--order", &v, "expected seq or random".into())),
                };
            }
            _ => return Err(CliError::Unknown(arg.to_string())),
        }
    }
    use apf::MemoryKind;
    if c.backend == Backend::File && c.restore.is_none() {
        return Err(CliError::Conflict("--backend file maps the snapshot file: it needs --restore".into()));
    }
    if c.memory.is_image() && c.restore.is_none() {
        let name = if c.memory == MemoryKind::Image { "image" } else { "hugetlb-image" };
        return Err(CliError::Conflict(format!("--memory {name} maps the snapshot's image: it needs --restore")));
    }
    if c.memory != MemoryKind::PrivateAnonymous && matches!(c.backend, Backend::Baseline | Backend::File) {
        let name = match c.memory {
            MemoryKind::Image => "image",
            MemoryKind::PrivateHugetlb => "hugetlb",
            MemoryKind::SharedHugetlb => "shared-hugetlb",
            MemoryKind::HugetlbImage => "hugetlb-image",
            _ => "shared",
        };
        return Err(CliError::Conflict(format!("--memory {name} needs the apf or plain backend")));
    }
    if c.memory.is_image() && c.backend == Backend::Plain {
        return Err(CliError::Conflict(
            "--memory image and hugetlb-image need the engine (or use --backend file)".into(),
        ));
    }
    // The host storm migrates and evicts: every kind offers both (in place
    // where the kernel cannot move its pages).
    if ![apf::Mode::Migrate, apf::Mode::Evict].iter().all(|m| m.offered_on(c.memory)) {
        if storm_asked && c.offline_every.is_some() {
            return Err(CliError::Conflict(format!(
                "the host storm migrates and evicts, which --memory {:?} does not offer",
                c.memory
            )));
        }
        c.offline_every = None;
    }
    if c.backend == Backend::Plain && c.restore.is_some() {
        return Err(CliError::Conflict("--backend plain has no userfaultfd: it cannot --restore".into()));
    }
    if c.backend != Backend::Apf && c.host_block {
        return Err(CliError::Conflict("--host-block needs the apf backend (pins must be dropped first)".into()));
    }
    if !c.latency && (c.plot.is_some() || c.chrome_trace.is_some()) {
        return Err(CliError::Conflict(
            "--plot and --chrome-trace need latency aggregation (drop --no-latency)".into(),
        ));
    }
    if c.uffd_socket.is_some() && (c.restore.is_none() || c.backend != Backend::Apf || c.host_block) {
        return Err(CliError::Conflict(
            "--uffd-socket restores through an external handler: it needs --restore, and neither --backend nor --host-block".into(),
        ));
    }
    let anonymous = matches!(c.memory, apf::MemoryKind::PrivateAnonymous | apf::MemoryKind::PrivateHugetlb);
    if c.uffd_socket.is_some() && !anonymous {
        return Err(CliError::Conflict(
            "--uffd-socket hands private anonymous memory to the handler, as Firecracker does: --memory anonymous or hugetlb".into(),
        ));
    }
    check_working_set(&c)?;
    // A working set goes in before the vCPUs start unless told otherwise:
    // on these machines a replay only in the background, at the lowest
    // priority beside busy vCPUs, made restores slower than none.
    if c.working_set.is_some() && !lead_asked {
        c.replay_lead = DEFAULT_REPLAY_LEAD;
    }
    if c.backend != Backend::Apf || c.uffd_socket.is_some() {
        c.offline_every = None;
        c.guest_offline = false;
    }
    Ok(c)
}

/// What the working-set options need: the engine in this process (it
/// records and replays), a restore to replay into, an image to bind a
/// recording to, and files of their own.
fn check_working_set(c: &RunConfig) -> Result<(), CliError> {
    let in_process = c.backend == Backend::Apf && c.uffd_socket.is_none();
    let conflict = |why: &str| Err(CliError::Conflict(why.to_string()));
    if let Some(save) = &c.save_working_set {
        if !in_process {
            return conflict("--save-working-set records in the engine: it needs the apf backend and no --uffd-socket");
        }
        if c.save_snapshot.is_none() && c.restore.is_none() {
            return conflict("--save-working-set binds the set to a snapshot: it needs --save-snapshot or --restore");
        }
        if [&c.save_snapshot, &c.restore, &c.report_json].into_iter().flatten().any(|p| p == save) {
            return conflict(
                "--save-working-set would overwrite the snapshot or the report: give it a file of its own",
            );
        }
    }
    if let Some(ws) = &c.working_set {
        if c.restore.is_none() {
            return conflict("--working-set replays into a restore: it needs --restore");
        }
        if !in_process {
            return conflict("--working-set replays in the engine: it needs the apf backend and no --uffd-socket (the handler takes its own --working-set)");
        }
        if c.restore.as_ref() == Some(ws) || c.save_snapshot.as_ref() == Some(ws) {
            return conflict("--working-set names the snapshot itself: give the working-set file");
        }
    }
    if c.scattered_changed && c.workload != Workload::Scattered {
        return conflict("--scattered-changed changes the scattered workload's set: it needs --workload scattered");
    }
    if c.replay_eager && c.working_set.is_none() {
        return conflict("--replay-eager fills after a replay: it needs --working-set");
    }
    if !c.replay_lead.is_zero() && c.working_set.is_none() {
        return conflict("--replay-lead installs a working set: it needs --working-set");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<RunConfig, CliError> {
        parse_run(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999G").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("NaNs").is_err());
    }

    #[test]
    fn defaults_make_a_meaningful_run() {
        let c = run(&[]).unwrap();
        assert_eq!(c.duration, Duration::from_secs(20));
        assert_eq!(c.workload, Workload::Mixed);
        assert!(c.offline_every.is_some() && c.guest_offline && c.checksum);
    }

    #[test]
    fn options_parse_both_ways() {
        let c =
            run(&["--mem", "256M", "--vcpus=4", "--duration", "2s", "--workload", "touch", "--offline-every", "off"])
                .unwrap();
        assert_eq!((c.mem, c.vcpus, c.duration), (Some(256 << 20), Some(4), Duration::from_secs(2)));
        assert_eq!((c.workload, c.offline_every), (Workload::Touch, None));
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        let e = run(&["--mem", "3M"]).unwrap_err();
        assert!(matches!(e, CliError::Invalid { option: "--mem", .. }), "{e}");
        assert!(e.to_string().contains("2 MiB"), "{e}");
        assert!(matches!(run(&["--vcpus", "0"]), Err(CliError::Invalid { option: "--vcpus", .. })));
        assert!(matches!(run(&["--vcpus", "99"]), Err(CliError::Invalid { option: "--vcpus", .. })));
        assert!(matches!(run(&["--duration", "soon"]), Err(CliError::Invalid { option: "--duration", .. })));
        assert!(matches!(run(&["--workload", "chaos"]), Err(CliError::Invalid { option: "--workload", .. })));
        assert!(matches!(run(&["--offline-mode", "x"]), Err(CliError::Invalid { option: "--offline-mode", .. })));
        assert!(matches!(run(&["--offline-every", "1us"]), Err(CliError::Invalid { .. })));
        assert_eq!(run(&["--mem"]), Err(CliError::Missing("--mem")));
        assert_eq!(run(&["--bogus"]), Err(CliError::Unknown("--bogus".into())));
        assert_eq!(run(&["--host-block=yes"]), Err(CliError::Unknown("--host-block=yes".into())));
        assert!(matches!(run(&["--backend", "plain", "--restore", "x"]), Err(CliError::Conflict(_))));
        assert!(matches!(run(&["--backend", "baseline", "--host-block"]), Err(CliError::Conflict(_))));
        assert!(matches!(run(&["--backend", "uffd"]), Err(CliError::Invalid { option: "--backend", .. })));
        assert!(matches!(run(&["--uffd-socket", "s"]), Err(CliError::Conflict(_))), "needs --restore");
        let shared_handler = run(&["--uffd-socket", "s", "--restore", "x", "--memory", "shared"]);
        assert!(matches!(shared_handler, Err(CliError::Conflict(_))), "the handler serves private anonymous memory");
        let c = run(&["--uffd-socket", "s", "--restore", "x"]).unwrap();
        assert_eq!((c.offline_every, c.guest_offline), (None, false), "no offlining without the engine");
        let huge = run(&["--uffd-socket", "s", "--restore", "x", "--memory", "hugetlb"]).unwrap();
        assert_eq!(huge.memory, apf::MemoryKind::PrivateHugetlb, "Firecracker's hugetlbfs memory");
        assert!(matches!(run(&["--order", "zigzag"]), Err(CliError::Invalid { option: "--order", .. })));
        for bad in ["0", "4095", "1T", "2G", "64Q", "-1M", ""] {
            let e = run(&["--offline-max", bad]).unwrap_err();
            assert!(matches!(e, CliError::Invalid { option: "--offline-max", .. }), "{bad}: {e}");
        }
        assert!(run(&["--offline-max", "6000"]).unwrap_err().to_string().contains("multiple of the page size"));
        assert!(run(&["--offline-max", "2G"]).unwrap_err().to_string().contains("at most 1024 MiB"));
        assert!(run(&["--offline-max", "12X"]).unwrap_err().to_string().contains("expected a size like 256M"));
        assert_eq!(run(&["--offline-max=64M"]).unwrap().offline_max, 64 << 20);
        assert_eq!(run(&["--offline-max", "4K"]).unwrap().offline_max, 4096);
        assert_eq!(run(&[]).unwrap().offline_max, DEFAULT_OFFLINE_MAX);
        // Memory kinds: what each needs, said before the run.
        assert!(matches!(run(&["--memory", "image"]), Err(CliError::Conflict(_))));
        assert!(matches!(run(&["--backend", "file"]), Err(CliError::Conflict(_))));
        assert!(matches!(run(&["--memory", "shared", "--backend", "baseline"]), Err(CliError::Conflict(_))));
        // Storms and guest offlines run on every kind.
        let c = run(&["--memory", "shared", "--offline-every", "5ms"]).unwrap();
        assert_eq!(c.offline_every, Some(Duration::from_millis(5)));
        assert!(matches!(run(&["--memory", "huge"]), Err(CliError::Invalid { option: "--memory", .. })));
        assert!(matches!(run(&["--memory", "hugetlb", "--backend", "baseline"]), Err(CliError::Conflict(_))));
        // Huge pages too (whole huge pages at a time).
        let c = run(&["--memory", "shared-hugetlb", "--offline-every", "5ms"]).unwrap();
        assert_eq!((c.memory, c.offline_every), (apf::MemoryKind::SharedHugetlb, Some(Duration::from_millis(5))));
        let c = run(&["--memory", "hugetlb"]).unwrap();
        assert_eq!(
            (c.memory, c.offline_every.is_some(), c.guest_offline),
            (apf::MemoryKind::PrivateHugetlb, true, true)
        );
        let c = run(&["--memory", "shared"]).unwrap();
        assert_eq!((c.memory, c.offline_every.is_some(), c.guest_offline), (apf::MemoryKind::SharedMemfd, true, true));
        let c = run(&["--memory", "image", "--restore", "x"]).unwrap();
        assert_eq!((c.memory, c.offline_every.is_some()), (apf::MemoryKind::Image, true));
        let c = run(&["--backend", "file", "--restore", "x"]).unwrap();
        assert_eq!((c.backend, c.offline_every, c.guest_offline), (Backend::File, None, false));
        let c = run(&["--backend", "baseline", "--order", "random"]).unwrap();
        assert_eq!((c.backend, c.random_order, c.offline_every), (Backend::Baseline, true, None));
    }

    #[test]
    fn working_set_options_say_what_they_need() {
        let conflict = |args: &[&str], says: &str| match run(args) {
            Err(CliError::Conflict(why)) => assert!(why.contains(says), "{args:?}: {why}"),
            other => panic!("{args:?}: {other:?}"),
        };
        conflict(&["--save-working-set", "ws"], "needs --save-snapshot or --restore");
        conflict(&["--save-working-set", "s", "--save-snapshot", "s"], "file of its own");
        conflict(&["--save-working-set", "s", "--restore", "s"], "file of its own");
        conflict(&["--save-working-set", "ws", "--save-snapshot", "s", "--backend", "baseline"], "apf backend");
        conflict(&["--save-working-set", "ws", "--restore", "s", "--uffd-socket", "k"], "no --uffd-socket");
        conflict(&["--working-set", "ws"], "needs --restore");
        conflict(&["--working-set", "ws", "--restore", "s", "--backend", "file"], "apf backend");
        conflict(&["--working-set", "ws", "--restore", "s", "--uffd-socket", "k"], "handler takes its own");
        conflict(&["--working-set", "s", "--restore", "s"], "names the snapshot itself");
        conflict(&["--replay-eager"], "needs --working-set");
        conflict(&["--scattered-changed"], "needs --workload scattered");
        let c = run(&["--workload", "scattered", "--scattered-changed"]).unwrap();
        assert!(c.scattered_changed);
        conflict(&["--replay-eager", "--restore", "s"], "needs --working-set");
        conflict(&["--replay-lead", "100ms", "--restore", "s"], "needs --working-set");
        let e = run(&["--replay-lead", "5", "--restore", "s", "--working-set", "w"]).unwrap_err();
        assert!(matches!(e, CliError::Invalid { option: "--replay-lead", .. }), "{e}");
        let e = run(&["--replay-lead", "2m", "--restore", "s", "--working-set", "w"]).unwrap_err();
        assert!(e.to_string().contains("at most 60s"), "{e}");
        let c = run(&["--replay-lead", "150ms", "--restore", "s", "--working-set", "w"]).unwrap();
        assert_eq!(c.replay_lead, Duration::from_millis(150));
        // A working set has a lead unless told otherwise; 0 asks for none.
        assert_eq!(run(&["--restore", "s", "--working-set", "w"]).unwrap().replay_lead, DEFAULT_REPLAY_LEAD);
        let c = run(&["--replay-lead", "0ms", "--restore", "s", "--working-set", "w"]).unwrap();
        assert_eq!(c.replay_lead, Duration::ZERO);
        assert_eq!(run(&["--restore", "s"]).unwrap().replay_lead, Duration::ZERO);
        assert_eq!(run(&["--working-set"]), Err(CliError::Missing("--working-set")));
        assert_eq!(run(&["--replay-eager=1"]), Err(CliError::Unknown("--replay-eager=1".into())));
        let c = run(&["--restore", "s", "--working-set=ws", "--replay-eager", "--save-working-set", "ws2"]).unwrap();
        assert_eq!(c.working_set, Some(PathBuf::from("ws")));
        assert_eq!(c.save_working_set, Some(PathBuf::from("ws2")));
        assert!(c.replay_eager);
        let c = run(&["--save-snapshot", "s", "--save-working-set", "ws"]).unwrap();
        assert_eq!((c.save_working_set, c.working_set, c.replay_eager), (Some(PathBuf::from("ws")), None, false));
        // Replaying and recording the same file: read at the start, replaced at the end.
        assert!(run(&["--restore", "s", "--working-set", "ws", "--save-working-set", "ws"]).is_ok());
    }
}
