//! `vmm stress`: the engine alone (no KVM guest), model-checked. Threads
//! read and write stamped 8-byte words of guest RAM, discard ranges as a
//! balloon does (`MADV_DONTNEED`), offline ranges (migrate, evict, unplug
//! under the zero and the poison policy, replug) and take pins and page
//! references, all at once; every value read is checked against the values
//! a linearizable memory could have returned at that moment.
//!
//! # The model
//!
//! Every operation takes a ticket from one global clock before it touches
//! memory and another after, so its interval `[start, end]` is known. A read
//! over `[t0, t1]` may return the value produced by any operation that
//! started before `t1` and that no *certain* operation completed before `t0`
//! overwrote: an operation Z kills an earlier one Y when `Y.end < Z.start`
//! (every linearization puts Y before Z). Per word, the producers are:
//!
//! | operation | produces | kills |
//! |---|---|---|
//! | the page source (the first fill) | the word's initial stamp | - |
//! | a write | its stamp | everything |
//! | a discard (`MADV_DONTNEED`) | zero | everything but poison (a poisoned page stays poisoned) |
//! | an unplug | zero, or poison under the poison policy | everything |
//! | a replug of a page known poisoned | zero | everything |
//! | migrate, evict | nothing (contents are kept) | nothing |
//!
//! An operation that failed part-way (an offline that returned an error)
//! may or may not have acted: it still produces, but kills nothing. The set
//! is a superset of what linearizability allows, so a violation is real.
//!
//! The shadow costs little: a mutex per page, held only to record or check
//! an interval, never across the memory access (the access must race the
//! discard or offline, or nothing is checked). Operations the shadow no
//! longer needs (killed before the oldest read still in flight) are pruned.
//!
//! Reads and writes of pages that may be poisoned go through
//! `process_vm_readv`/`process_vm_writev` on this process, which answer
//! `EFAULT` where a plain access would raise SIGBUS. In rounds under the
//! zero policy nothing may be poisoned, and half the accesses are plain
//! loads and stores (a SIGBUS there is reported and ends the process).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use apf::Config;
use apf::{Dispatch, Engine, GuestAddress, GuestRam, GuestRange, Mode, OfflineError, PageSource, Pin, PinError};
use apf::{SourceError, SourceKind};
use apf::{UnplugPolicy, UnplugPolicy::Poison as PoisonPolicy};
use thiserror::Error;

use crate::config::{parse_duration, parse_size, CliError};

const PAGE: usize = 4096;
/// Words checked per page, one in each 512-byte eighth of it.
const WORDS: usize = 8;
const WORD_STRIDE: usize = PAGE / WORDS;
/// Violations described in detail (on stderr, and in the report).
const DETAILED: usize = 10;
/// Shadow records per page before a mutator prunes it.
const PRUNE_AT: usize = 24;

/// Which operations run besides reads (reads always run: they are the
/// checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ops {
    /// Readers also write stamped words.
    pub write: bool,
    /// A thread discards ranges (`MADV_DONTNEED`, as a balloon does).
    pub discard: bool,
    /// The offline thread migrates ranges.
    pub migrate: bool,
    /// The offline thread evicts ranges.
    pub evict: bool,
    /// The offline thread unplugs ranges (and replugs them under the
    /// poison policy).
    pub unplug: bool,
    /// A thread reads through migratable pins (`Pin::get`).
    pub pin: bool,
    /// The same thread reads under short-term references (`page_ref`).
    pub page_ref: bool,
}

impl Ops {
    /// Everything.
    pub const ALL: Ops =
        Ops { write: true, discard: true, migrate: true, evict: true, unplug: true, pin: true, page_ref: true };
    const NAMES: &'static str = "write, discard, migrate, evict, unplug, pin, ref";

    fn parse(list: &str) -> Result<Ops, String> {
        let mut ops = Ops {
            write: false,
            discard: false,
            migrate: false,
            evict: false,
            unplug: false,
            pin: false,
            page_ref: false,
        };
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "all" => ops = Ops::ALL,
                "write" => ops.write = true,
                "discard" => ops.discard = true,
                "migrate" => ops.migrate = true,
                "evict" => ops.evict = true,
                "unplug" => ops.unplug = true,
                "pin" => ops.pin = true,
                "ref" => ops.page_ref = true,
                other => return Err(format!("unknown operation {other:?} (expected some of {})", Ops::NAMES)),
            }
        }
        Ok(ops)
    }

    fn offline(&self) -> bool {
        self.migrate || self.evict || self.unplug
    }
}

/// How the checked accesses reach memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Always `process_vm_readv`/`process_vm_writev` (cannot crash).
    Syscall,
    /// Plain loads and stores for half the accesses in zero-policy rounds
    /// (nothing may be poisoned there), the syscalls otherwise.
    Mixed,
}

/// Everything a stress run needs.
#[derive(Debug, Clone, PartialEq)]
pub struct StressConfig {
    /// How long to run in all.
    pub duration: Duration,
    /// Guest RAM in bytes (small: races concentrate).
    pub mem: u64,
    /// Threads that read and write words.
    pub readers: usize,
    /// Time the page source spends on each fill (a slow source widens the
    /// window between an install's check and its copy).
    pub fill: Duration,
    /// Seed of every random choice.
    pub seed: u64,
    /// Operations besides reads.
    pub ops: Ops,
    /// Unplug policies, one engine per round, in turn.
    pub policies: Vec<UnplugPolicy>,
    /// Length of one round (one engine, one policy). Source contents are
    /// installed only on a page's first touch (a discarded page comes back
    /// as zeros), so short rounds race more first fills against discards.
    pub round: Duration,
    /// Deadline of every operation; one that takes longer fails the run.
    pub deadline: Duration,
    /// How accesses reach memory.
    pub access: Access,
    /// Where the engine resolves faults; None: its default.
    pub dispatch: Option<Dispatch>,
    /// Turn off the engine's ordering of remove events against installs
    /// (a failpoint switch; needs the `failpoints` feature) to show the
    /// stress catches what that ordering prevents.
    pub unordered_removes: bool,
    /// End the run at the first violation.
    pub until_violation: bool,
    /// Also write the JSON line here.
    pub json: Option<PathBuf>,
}

impl Default for StressConfig {
    fn default() -> Self {
        StressConfig {
            duration: Duration::from_secs(10),
            mem: 1 << 20,
            readers: 3,
            fill: Duration::from_micros(100),
            seed: 1,
            ops: Ops::ALL,
            policies: vec![UnplugPolicy::Zero, PoisonPolicy],
            round: Duration::from_secs(1),
            deadline: Duration::from_secs(2),
            access: Access::Mixed,
            dispatch: None,
            unordered_removes: false,
            until_violation: false,
            json: None,
        }
    }
}

/// The options of `vmm stress`, for `vmm help`.
pub const STRESS_HELP: &str = "\
vmm stress [OPTIONS]: the engine alone (no KVM), model-checked: threads read and write stamped
words while others discard, migrate, evict, unplug, replug and pin the same pages; every value
read is checked against what a linearizable memory could return. Prints one JSON line; the exit
status is non-zero on any violation, any operation past its deadline, or any unexpected error.

  --seconds N            how long to run (default 10; fractions allowed)
  --mem SIZE             guest RAM (default 1M; 64K..1G, a multiple of 64K)
  --readers N            threads that read and write (default 3; 1..32)
  --fill-us N            microseconds the page source spends on each fill (default 100)
  --seed N               seed of every random choice (default 1)
  --ops LIST             operations besides reads: all, or some of write,discard,migrate,evict,
                         unplug,pin,ref (default all)
  --unplug-policy P      zero|poison|both: one engine per round, in turn (default both)
  --round D              length of one round: a fresh engine, all pages missing (default 1s)
  --deadline D           deadline of every operation (default 2s)
  --access A             syscall|mixed: process_vm_readv/writev only, or half plain accesses where
                         nothing may be poisoned (default mixed)
  --dispatch D           auto|inline|workers: where the engine resolves faults (default auto)
  --until-violation      stop at the first violation
  --json PATH            also write the JSON line to PATH
  --unordered-removes    (builds with feature failpoints) turn off the ordering of remove events
                         against installs, to show the stress catches its absence
";

/// Parses the options of `vmm stress`.
pub fn parse_args(args: &[String]) -> Result<StressConfig, CliError> {
    let mut c = StressConfig::default();
    let mut options = crate::config::Options::new(args);
    while let Some((name, inline, arg)) = options.next_option() {
        macro_rules! value {
            ($opt:literal) => {
                options.value(inline.clone(), $opt)?
            };
        }
        let invalid = |option: &'static str, value: &str, why: &str| CliError::Invalid {
            option,
            value: value.into(),
            why: why.into(),
        };
        match name {
            "--seconds" => {
                let v = value!("--seconds");
                match v.parse::<f64>() {
                    Ok(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => c.duration = Duration::from_secs_f64(s),
                    _ => return Err(invalid("--seconds", &v, "a number of seconds, more than 0, at most a day")),
                }
            }
            "--mem" => {
                let v = value!("--mem");
                let n = parse_size(&v).map_err(|e| invalid("--mem", &v, &e))?;
                if !(64 << 10..=1 << 30).contains(&n) || n % (64 << 10) != 0 {
                    return Err(invalid("--mem", &v, "must be 64K to 1G, a multiple of 64K"));
                }
                c.mem = n;
            }
            "--readers" => {
                let v = value!("--readers");
                c.readers = match v.parse() {
                    Ok(n) if (1..=32).contains(&n) => n,
                    _ => return Err(invalid("--readers", &v, "a number from 1 to 32")),
                };
            }
            "--fill-us" => {
                let v = value!("--fill-us");
                c.fill = match v.parse::<u64>() {
                    Ok(n) if n <= 100_000 => Duration::from_micros(n),
                    _ => return Err(invalid("--fill-us", &v, "a number of microseconds up to 100000")),
                };
            }
            "--seed" => {
                let v = value!("--seed");
                c.seed = v.parse().map_err(|_| invalid("--seed", &v, "expected a number"))?;
            }
            "--ops" => {
                let v = value!("--ops");
                c.ops = Ops::parse(&v).map_err(|e| invalid("--ops", &v, &e))?;
            }
            "--unplug-policy" => {
                let v = value!("--unplug-policy");
                c.policies = match v.as_str() {
                    "zero" => vec![UnplugPolicy::Zero],
                    "poison" => vec![PoisonPolicy],
                    "both" => vec![UnplugPolicy::Zero, PoisonPolicy],
                    _ => return Err(invalid("--unplug-policy", &v, "expected zero, poison or both")),
                };
            }
            "--round" => {
                let v = value!("--round");
                c.round = parse_duration(&v).map_err(|e| invalid("--round", &v, &e))?;
                if c.round < Duration::from_millis(100) {
                    return Err(invalid("--round", &v, "at least 100ms"));
                }
            }
            "--deadline" => {
                let v = value!("--deadline");
                c.deadline = parse_duration(&v).map_err(|e| invalid("--deadline", &v, &e))?;
                if c.deadline < Duration::from_millis(10) {
                    return Err(invalid("--deadline", &v, "at least 10ms"));
                }
            }
            "--access" => {
                let v = value!("--access");
                c.access = match v.as_str() {
                    "syscall" => Access::Syscall,
                    "mixed" => Access::Mixed,
                    _ => return Err(invalid("--access", &v, "expected syscall or mixed")),
                };
            }
            "--dispatch" => {
                let v = value!("--dispatch");
                c.dispatch = Some(v.parse().map_err(|e: String| invalid("--dispatch", &v, &e))?);
            }
            "--json" => c.json = Some(value!("--json").into()),
            "--until-violation" if inline.is_none() => c.until_violation = true,
            "--unordered-removes" if inline.is_none() && cfg!(feature = "failpoints") => c.unordered_removes = true,
            "--unordered-removes" if inline.is_none() => {
                return Err(CliError::Conflict(
                    "--unordered-removes needs a build with the failpoints feature (cargo build -p vmm --features \
                     failpoints)"
                        .into(),
                ))
            }
            _ => return Err(CliError::Unknown(arg.to_string())),
        }
    }
    Ok(c)
}

/// Why a stress run could not run (what it found is in the report).
#[derive(Debug, Error)]
pub enum StressError {
    /// Guest RAM could not be mapped.
    #[error("guest RAM")]
    Ram(#[from] apf::RamError),
    /// The engine did not start.
    #[error("engine start")]
    Engine(#[from] apf::EngineError),
    /// A thread could not be started, or a signal handler installed.
    #[error("stress set-up")]
    Io(#[source] std::io::Error),
    /// `--unordered-removes` in a build without the failpoints feature.
    #[error("--unordered-removes needs the failpoints feature")]
    NoFailpoints,
}

// ---------------------------------------------------------------------------
// Values and the page source.

/// What a word can hold in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Val {
    Word(u64),
    /// The page is poisoned: an access gets `EFAULT` (or SIGBUS).
    Poison,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The stamps of one round: a word's value is its own 32-bit tag (never
/// zero) above a generation (0: the source's contents, n: the n-th write of
/// the round), so any value read names the word and the write it came from.
#[derive(Debug, Clone, Copy)]
struct Stamps {
    round_key: u64,
}

impl Stamps {
    fn tag(&self, gpa: u64) -> u64 {
        (splitmix(self.round_key ^ gpa) >> 32) | 0x8000_0000
    }

    fn value(&self, gpa: u64, generation: u32) -> u64 {
        self.tag(gpa) << 32 | u64::from(generation)
    }

    fn describe(&self, gpa: u64, v: Val) -> String {
        match v {
            Val::Poison => "poisoned".into(),
            Val::Word(0) => "zero".into(),
            Val::Word(w) if w >> 32 == self.tag(gpa) && w as u32 == 0 => format!("{w:#x} (source contents)"),
            Val::Word(w) if w >> 32 == self.tag(gpa) => format!("{w:#x} (write #{})", w as u32),
            Val::Word(w) => format!("{w:#x} (not a stamp of this word)"),
        }
    }
}

/// A memory-kind page source whose contents are the initial stamps, slow
/// on purpose.
struct StressSource {
    stamps: Stamps,
    fill: Duration,
}

impl PageSource for StressSource {
    fn fill(&self, gpa: GuestAddress, buf: &mut [u8]) -> Result<(), SourceError> {
        for (i, word) in buf.chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&self.stamps.value(gpa.0 + 8 * i as u64, 0).to_le_bytes());
        }
        if !self.fill.is_zero() {
            std::thread::sleep(self.fill);
        }
        Ok(())
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Memory
    }

    fn name(&self) -> &'static str {
        "stress"
    }
}

// ---------------------------------------------------------------------------
// The shadow.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Source,
    Write,
    Discard,
    Migrate,
    Evict,
    Unplug,
    Replug,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Source => "source",
            Kind::Write => "write",
            Kind::Discard => "discard",
            Kind::Migrate => "migrate",
            Kind::Evict => "evict",
            Kind::Unplug => "unplug",
            Kind::Replug => "replug",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// The source's stamp of the word.
    Initial,
    /// Sets the word.
    Set(Val),
    /// Zero, unless the page is poisoned.
    Discard,
    /// Contents kept (recorded to know what a read raced).
    Keep,
}

const IN_FLIGHT: u64 = u64::MAX;

#[derive(Debug, Clone, Copy)]
struct Rec {
    start: u64,
    end: u64,
    effect: Effect,
    /// Done, and known to have acted (an op that failed part-way never
    /// kills what came before it).
    certain: bool,
    kind: Kind,
}

impl Rec {
    fn produces(&self, stamps: &Stamps, gpa: u64) -> Option<Val> {
        match self.effect {
            Effect::Initial => Some(Val::Word(stamps.value(gpa, 0))),
            Effect::Set(v) => Some(v),
            Effect::Discard => Some(Val::Word(0)),
            Effect::Keep => None,
        }
    }

    fn races(&self) -> bool {
        !matches!(self.kind, Kind::Source | Kind::Write)
    }
}

/// One page's records: page-wide operations, and writes per checked word.
#[derive(Debug)]
struct PageShadow {
    ops: Vec<Rec>,
    words: [Vec<Rec>; WORDS],
}

/// The latest start of a certain `Set` (or the source) and of a certain
/// discard among the records that ended before `t0`.
fn killers<'a>(recs: impl Iterator<Item = &'a Rec>, t0: u64) -> (Option<u64>, Option<u64>) {
    let (mut set, mut disc) = (None, None);
    for r in recs.filter(|r| r.certain && r.end < t0) {
        match r.effect {
            Effect::Initial | Effect::Set(_) => set = set.max(Some(r.start)),
            Effect::Discard => disc = disc.max(Some(r.start)),
            Effect::Keep => {}
        }
    }
    (set, disc)
}

fn killed(v: Val, end: u64, (set, disc): (Option<u64>, Option<u64>)) -> bool {
    set.is_some_and(|s| s > end) || (v != Val::Poison && disc.is_some_and(|d| d > end))
}

/// What a read of one word over `[t0, t1]` may return, and whether a
/// discard or offline of its page overlapped it.
struct Allowed {
    values: Vec<Val>,
    racing: bool,
    overlapping: Vec<Rec>,
}

impl PageShadow {
    fn new() -> Self {
        let source = Rec { start: 0, end: 0, effect: Effect::Initial, certain: true, kind: Kind::Source };
        PageShadow { ops: vec![source], words: Default::default() }
    }

    fn len(&self) -> usize {
        self.ops.len() + self.words.iter().map(Vec::len).sum::<usize>()
    }

    fn allowed(&self, stamps: &Stamps, gpa: u64, w: usize, t0: u64, t1: u64) -> Allowed {
        let all = || self.ops.iter().chain(&self.words[w]);
        let k = killers(all(), t0);
        let mut values = Vec::new();
        for r in all().filter(|r| r.start < t1) {
            if let Some(v) = r.produces(stamps, gpa) {
                if !killed(v, r.end, k) && !values.contains(&v) {
                    values.push(v);
                }
            }
        }
        let overlapping: Vec<Rec> = all().filter(|r| r.start < t1 && r.end > t0 && r.races()).copied().collect();
        Allowed { values, racing: !overlapping.is_empty(), overlapping }
    }

    /// Drops what no read starting at or after `mark` can need.
    fn prune(&mut self, mark: u64) {
        let dead = |r: &Rec, k: (Option<u64>, Option<u64>), gpa_free: Option<Val>| -> bool {
            if r.end >= mark {
                return false;
            }
            match gpa_free {
                None => true,
                Some(v) => killed(v, r.end, k),
            }
        };
        // Productions that matter for killing: poison or not.
        let class = |r: &Rec| match r.effect {
            Effect::Keep => None,
            Effect::Set(Val::Poison) => Some(Val::Poison),
            _ => Some(Val::Word(0)),
        };
        let mut page_dead = vec![true; self.ops.len()];
        for w in 0..WORDS {
            let k = killers(self.ops.iter().chain(&self.words[w]), mark);
            for (i, r) in self.ops.iter().enumerate() {
                if !dead(r, k, class(r)) {
                    page_dead[i] = false;
                }
            }
            self.words[w].retain(|r| !dead(r, k, class(r)));
        }
        let mut i = 0;
        self.ops.retain(|_| {
            i += 1;
            !page_dead[i - 1]
        });
    }

    fn finish(recs: &mut [Rec], start: u64, end: u64, certain: bool, effect: Option<Effect>) {
        if let Some(r) = recs.iter_mut().rev().find(|r| r.start == start) {
            r.end = end;
            r.certain = certain;
            if let Some(e) = effect {
                r.effect = e;
            }
        }
    }
}

/// The model of guest RAM: a record list per page, the clock, and the
/// oldest interval start still being checked per thread.
struct Shadow {
    pages: Box<[Mutex<PageShadow>]>,
    clock: AtomicU64,
    /// Per thread: a clock value at or before the start of its operation in
    /// progress (`IN_FLIGHT`: none).
    active: Box<[AtomicU64]>,
    stamps: Stamps,
}

impl Shadow {
    fn new(pages: usize, threads: usize, stamps: Stamps) -> Self {
        Shadow {
            pages: (0..pages).map(|_| Mutex::new(PageShadow::new())).collect(),
            clock: AtomicU64::new(1),
            active: (0..threads).map(|_| AtomicU64::new(IN_FLIGHT)).collect(),
            stamps,
        }
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    fn page(&self, p: usize) -> MutexGuard<'_, PageShadow> {
        self.pages[p].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Announces that thread `t` is about to start an operation: records
    /// from now on are kept for it. Stored before its first ticket, so a
    /// pruner that misses it computed its mark before that ticket.
    fn enter(&self, t: usize) {
        self.active[t].store(self.clock.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    fn leave(&self, t: usize) {
        self.active[t].store(IN_FLIGHT, Ordering::SeqCst);
    }

    fn mark(&self) -> u64 {
        let now = self.clock.load(Ordering::SeqCst);
        self.active.iter().map(|a| a.load(Ordering::SeqCst)).fold(now, u64::min)
    }

    /// Records a page-wide operation on pages `[first, first + n)`, before
    /// it acts; returns its start.
    fn begin_range(&self, first: usize, effects: &[Effect], kind: Kind) -> u64 {
        let start = self.tick();
        for (i, &effect) in effects.iter().enumerate() {
            self.page(first + i).ops.push(Rec { start, end: IN_FLIGHT, effect, certain: false, kind });
        }
        start
    }

    fn end_range(&self, first: usize, n: usize, start: u64, certain: bool) {
        let end = self.tick();
        let mark = self.mark();
        for p in first..first + n {
            let mut page = self.page(p);
            PageShadow::finish(&mut page.ops, start, end, certain, None);
            if page.len() > PRUNE_AT {
                page.prune(mark);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Counters and findings.

#[derive(Debug, Default)]
struct Counters {
    ops: AtomicU64,
    reads_checked: AtomicU64,
    reads_racing: AtomicU64,
    poisoned_reads: AtomicU64,
    violations: AtomicU64,
    writes: AtomicU64,
    writes_refused: AtomicU64,
    discards: AtomicU64,
    migrates: AtomicU64,
    evicts: AtomicU64,
    unplugs: AtomicU64,
    replugs: AtomicU64,
    offline_overlap: AtomicU64,
    offline_busy: AtomicU64,
    pin_gets: AtomicU64,
    pin_refused: AtomicU64,
    page_refs: AtomicU64,
    overruns: AtomicU64,
    longest_wait_us: AtomicU64,
    first_violation_us: AtomicU64,
}

/// What `vmm stress` found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StressReport {
    /// Operations done (each read, write, discard, offline, pin access).
    pub ops: u64,
    /// Words read and checked against the model.
    pub reads_checked: u64,
    /// Of those, reads that overlapped a discard or offline of their page.
    pub reads_racing: u64,
    /// Checked reads that found the page poisoned.
    pub poisoned_reads: u64,
    /// Values read (or refusals met) that no linearization allows.
    pub violations: u64,
    /// The longest any operation took.
    pub longest_wait_ms: f64,
    /// Operations that took longer than the deadline (or hit it).
    pub overruns: u64,
    /// Threads still blocked when the run ended (left behind).
    pub hung: u64,
    /// Words written.
    pub writes: u64,
    /// Writes refused because the page was poisoned.
    pub writes_refused: u64,
    /// Ranges discarded.
    pub discards: u64,
    /// Offlines done, per mode.
    pub migrates: u64,
    /// See `migrates`.
    pub evicts: u64,
    /// See `migrates`.
    pub unplugs: u64,
    /// Ranges replugged (poison policy).
    pub replugs: u64,
    /// Offlines refused because another held the range.
    pub offline_overlap: u64,
    /// Offlines that gave up because a reference holder was blocked on a
    /// fault the offline itself deferred (the engine's way out of that
    /// deadlock; one that waited out its whole deadline is an error).
    pub offline_busy: u64,
    /// Reads through `Pin::get`.
    pub pin_gets: u64,
    /// `Pin::get` or `page_ref` refused on a poisoned page.
    pub pin_refused: u64,
    /// Reads under `page_ref`.
    pub page_refs: u64,
    /// Engines run (rounds), and how many under the poison policy.
    pub rounds: u64,
    /// See `rounds`.
    pub poison_rounds: u64,
    /// Errors reported by the engine (`Engine::errors`).
    pub engine_errors: u64,
    /// Operations that failed in a way they must not.
    pub errors: Vec<String>,
    /// The first violations, in detail.
    pub details: Vec<String>,
    /// Seconds from the start to the first violation.
    pub first_violation_s: Option<f64>,
    /// Seconds run.
    pub seconds: f64,
}

impl StressReport {
    /// True when nothing went wrong.
    pub fn ok(&self) -> bool {
        self.violations == 0
            && self.overruns == 0
            && self.hung == 0
            && self.engine_errors == 0
            && self.errors.is_empty()
    }

    /// One JSON line.
    pub fn to_json(&self) -> String {
        let list = |v: &[String]| {
            let items: Vec<String> = v.iter().map(|s| crate::report::json_str(s)).collect();
            format!("[{}]", items.join(","))
        };
        format!(
            "{{\"ok\":{},\"ops\":{},\"reads_checked\":{},\"reads_racing\":{},\"violations\":{},\
             \"longest_wait_ms\":{:.3},\"overruns\":{},\"hung\":{},\"poisoned_reads\":{},\"writes\":{},\
             \"writes_refused\":{},\"discards\":{},\"offlines\":{{\"migrate\":{},\"evict\":{},\"unplug\":{},\
             \"replug\":{},\"overlap\":{},\"busy\":{}}},\"pins\":{{\"gets\":{},\"page_refs\":{},\"refused\":{}}},\
             \"rounds\":{},\"poison_rounds\":{},\"engine_errors\":{},\"first_violation_s\":{},\"seconds\":{:.3},\
             \"errors\":{},\"details\":{}}}",
            self.ok(),
            self.ops,
            self.reads_checked,
            self.reads_racing,
            self.violations,
            self.longest_wait_ms,
            self.overruns,
            self.hung,
            self.poisoned_reads,
            self.writes,
            self.writes_refused,
            self.discards,
            self.migrates,
            self.evicts,
            self.unplugs,
            self.replugs,
            self.offline_overlap,
            self.offline_busy,
            self.pin_gets,
            self.page_refs,
            self.pin_refused,
            self.rounds,
            self.poison_rounds,
            self.engine_errors,
            self.first_violation_s.map_or("null".to_string(), |s| format!("{s:.3}")),
            self.seconds,
            list(&self.errors),
            list(&self.details),
        )
    }
}

/// One thread's operation in progress, for the watchdog.
#[derive(Debug, Default)]
struct Activity {
    /// Microseconds since the run began, plus one (0: idle).
    since: AtomicU64,
    what: AtomicU32,
    /// The `since` of an operation the watchdog already counted as past
    /// its deadline.
    flagged: AtomicU64,
}

/// Operation names for the watchdog's reports (`Activity::what`).
const WHAT: [&str; 8] = ["read", "write", "discard", "offline", "replug", "pin", "page_ref", "idle"];

// ---------------------------------------------------------------------------
// One round: one engine, one policy.

struct Round {
    cfg: StressConfig,
    policy: UnplugPolicy,
    ram: Arc<GuestRam>,
    engine: Engine,
    shadow: Shadow,
    host: u64,
    pages: usize,
    stop: AtomicBool,
    counters: Arc<Counters>,
    findings: Arc<Mutex<Findings>>,
    activity: Box<[Activity]>,
    epoch: Instant,
    /// When the whole run (all rounds) began.
    run_started: Instant,
    /// Pins the pin thread holds, for the offline thread to check that
    /// offlines call their callbacks.
    pins: Mutex<Vec<Arc<Pin>>>,
    write_gen: AtomicU32,
    direct: bool,
}

#[derive(Debug, Default)]
struct Findings {
    details: Vec<String>,
    stuck: Vec<String>,
    errors: Vec<String>,
    errors_dropped: usize,
}

impl Round {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn begin_op(&self, t: usize, what: usize) -> Instant {
        self.activity[t].what.store(what as u32, Ordering::Relaxed);
        self.activity[t].since.store(self.now_us() + 1, Ordering::Release);
        self.shadow.enter(t);
        Instant::now()
    }

    fn end_op(&self, t: usize, began: Instant) {
        self.shadow.leave(t);
        let since = self.activity[t].since.swap(0, Ordering::AcqRel);
        let took = began.elapsed();
        self.counters.ops.fetch_add(1, Ordering::Relaxed);
        self.counters.longest_wait_us.fetch_max(took.as_micros() as u64, Ordering::Relaxed);
        if took > self.cfg.deadline && self.activity[t].flagged.load(Ordering::Acquire) != since {
            self.counters.overruns.fetch_add(1, Ordering::Relaxed);
            let what = WHAT[self.activity[t].what.load(Ordering::Relaxed) as usize];
            self.stuck(format!("a {what} took {took:?}, past its deadline of {:?}", self.cfg.deadline));
        }
    }

    fn error(&self, e: String) {
        self.finding(e, false);
    }

    /// An operation past its deadline, or one that never returned: kept
    /// apart so a flood of other errors cannot hide it.
    fn stuck(&self, e: String) {
        self.finding(e, true);
    }

    fn finding(&self, e: String, stuck: bool) {
        let mut f = self.findings.lock().unwrap_or_else(|e| e.into_inner());
        let list = if stuck { &mut f.stuck } else { &mut f.errors };
        if list.len() < 20 {
            eprintln!("vmm stress: {e}");
            list.push(e);
        } else {
            f.errors_dropped += 1;
        }
    }

    fn violation(&self, detail: impl FnOnce() -> String) {
        let n = self.counters.violations.fetch_add(1, Ordering::AcqRel);
        let _ = self.counters.first_violation_us.compare_exchange(
            0,
            (self.run_started.elapsed().as_micros() as u64).max(1),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if (n as usize) < DETAILED {
            let d = detail();
            eprintln!("vmm stress: violation: {d}");
            self.findings.lock().unwrap_or_else(|e| e.into_inner()).details.push(d);
        }
        if self.cfg.until_violation {
            self.stop.store(true, Ordering::Release);
        }
    }

    fn gpa(&self, page: usize, w: usize) -> u64 {
        (page * PAGE + w * WORD_STRIDE) as u64
    }

    fn addr(&self, page: usize, w: usize) -> u64 {
        self.host + self.gpa(page, w)
    }

    /// Checks word `w` of `page`, read as `got` over `[t0, t1]`.
    fn check(&self, page: usize, w: usize, got: Val, t0: u64, t1: u64) {
        let gpa = self.gpa(page, w);
        let allowed = self.shadow.page(page).allowed(&self.shadow.stamps, gpa, w, t0, t1);
        self.counters.reads_checked.fetch_add(1, Ordering::Relaxed);
        if allowed.racing {
            self.counters.reads_racing.fetch_add(1, Ordering::Relaxed);
        }
        if got == Val::Poison {
            self.counters.poisoned_reads.fetch_add(1, Ordering::Relaxed);
        }
        if !allowed.values.contains(&got) {
            self.violation(|| self.describe_violation(page, w, got, &allowed, t0, t1));
        }
    }

    fn describe_violation(&self, page: usize, w: usize, got: Val, allowed: &Allowed, t0: u64, t1: u64) -> String {
        let gpa = self.gpa(page, w);
        let st = &self.shadow.stamps;
        let show = |r: &Rec| {
            let end = if r.end == IN_FLIGHT { "..".into() } else { r.end.to_string() };
            let what = match (r.kind, r.effect) {
                (Kind::Write, Effect::Set(v)) => format!("write of {}", st.describe(gpa, v)),
                (Kind::Unplug, Effect::Set(Val::Poison)) => "unplug (poison)".into(),
                (kind, _) => kind.as_str().into(),
            };
            format!(
                "{what} [{}, {end}]{}",
                r.start,
                if r.certain || r.end == IN_FLIGHT { "" } else { " (may not have acted)" }
            )
        };
        let values: Vec<String> = allowed.values.iter().map(|v| st.describe(gpa, *v)).collect();
        let overlapped: Vec<String> = allowed.overlapping.iter().map(show).collect();
        // What the shadow still holds of the word, oldest first.
        let history: Vec<String> = {
            let p = self.shadow.page(page);
            let mut recs: Vec<Rec> = p.ops.iter().chain(&p.words[w]).copied().collect();
            recs.sort_by_key(|r| r.start);
            let skip = recs.len().saturating_sub(8);
            recs[skip..].iter().map(show).collect()
        };
        format!(
            "word {gpa:#x} ({} policy) read {} over [{t0}, {t1}]; allowed: {}; overlapped by: {}; history: {}",
            if self.policy == PoisonPolicy { "poison" } else { "zero" },
            st.describe(gpa, got),
            values.join(", "),
            if overlapped.is_empty() { "nothing".into() } else { overlapped.join(", ") },
            history.join(", "),
        )
    }

    /// Reads the checked words of `page` at host address `base` (the page's
    /// address, or a pin's view of it) and checks them; a read that fails
    /// other than on poison is reported as an error.
    fn read_page(&self, page: usize, base: u64, direct: bool) {
        let mut got = [Val::Word(0); WORDS];
        let t0 = self.shadow.tick();
        let n = if direct { read_direct(base, &mut got) } else { read_syscall(base, &mut got) };
        let t1 = self.shadow.tick();
        match n {
            Ok(n) => {
                for (w, v) in got.iter().enumerate().take(n) {
                    self.check(page, w, *v, t0, t1);
                }
            }
            Err(e) => self.error(format!("reading page {:#x} failed: {e}", page * PAGE)),
        }
    }

    fn write_word(&self, page: usize, w: usize, direct: bool) {
        let gpa = self.gpa(page, w);
        let generation = self.write_gen.fetch_add(1, Ordering::Relaxed);
        let v = self.shadow.stamps.value(gpa, generation);
        let start = {
            let mut p = self.shadow.page(page);
            let start = self.shadow.tick();
            let rec =
                Rec { start, end: IN_FLIGHT, effect: Effect::Set(Val::Word(v)), certain: false, kind: Kind::Write };
            p.words[w].push(rec);
            start
        };
        let addr = self.addr(page, w);
        let res = if direct {
            // SAFETY: `addr` is an aligned word of guest RAM, mapped while
            // the round's `ram` lives; plain stores happen only in rounds
            // where nothing may be poisoned, and a SIGBUS is reported.
            unsafe { std::ptr::write_volatile(addr as *mut u64, v) };
            Ok(())
        } else {
            write_syscall(addr, v)
        };
        let end = self.shadow.tick();
        let mark = self.shadow.mark();
        let mut p = self.shadow.page(page);
        match res {
            Ok(()) => {
                PageShadow::finish(&mut p.words[w], start, end, true, None);
                self.counters.writes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                // Refused: nothing was written, and the page was poisoned.
                PageShadow::finish(&mut p.words[w], start, end, true, Some(Effect::Keep));
                drop(p);
                self.counters.writes_refused.fetch_add(1, Ordering::Relaxed);
                self.check(page, w, Val::Poison, start, end);
                return;
            }
            Err(e) => {
                PageShadow::finish(&mut p.words[w], start, end, false, None);
                drop(p);
                self.error(format!("writing word {gpa:#x} failed: {e}"));
                return;
            }
        }
        if p.len() > PRUNE_AT {
            p.prune(mark);
        }
    }

    fn random_range(&self, rng: &mut Rng, max_pages: usize) -> (usize, usize) {
        let n = 1 + rng.below(max_pages.min(self.pages) as u64) as usize;
        let first = rng.below((self.pages - n + 1) as u64) as usize;
        (first, n)
    }

    fn range(&self, first: usize, n: usize) -> GuestRange {
        GuestRange::new(GuestAddress((first * PAGE) as u64), (n * PAGE) as u64)
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.cfg.deadline
    }

    /// A `Pin::get` or `page_ref` refused with `Poisoned`: the page must be
    /// one the model allows to be poisoned.
    fn check_refusal(&self, e: &PinError, t0: u64, t1: u64) {
        match e {
            PinError::Poisoned { gpa } => {
                self.counters.pin_refused.fetch_add(1, Ordering::Relaxed);
                self.check(gpa.0 as usize / PAGE, 0, Val::Poison, t0, t1);
            }
            // A timeout took the whole deadline: `end_op` counts it.
            e => self.error(format!("pin or page reference: {}", crate::error_chain(e))),
        }
    }
}

fn read_direct(base: u64, out: &mut [Val; WORDS]) -> std::io::Result<usize> {
    for (w, v) in out.iter_mut().enumerate() {
        let at = base + (w * WORD_STRIDE) as u64;
        // SAFETY: `at` is an aligned word of guest RAM, mapped while the
        // round's `ram` lives; plain loads happen only in rounds where
        // nothing may be poisoned, and a SIGBUS is reported.
        *v = Val::Word(unsafe { std::ptr::read_volatile(at as *const u64) });
    }
    Ok(WORDS)
}

/// Reads the checked words at `base` with one `process_vm_readv`. A word
/// on a poisoned page reads as `Poison` (`EFAULT`); the words after it are
/// not read. Returns the number of words filled in.
fn read_syscall(base: u64, out: &mut [Val; WORDS]) -> std::io::Result<usize> {
    let mut buf = [0u64; WORDS];
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: WORDS * 8 };
    let remote: [libc::iovec; WORDS] = std::array::from_fn(|w| libc::iovec {
        iov_base: (base + (w * WORD_STRIDE) as u64) as *mut libc::c_void,
        iov_len: 8,
    });
    // SAFETY: the local iovec covers `buf`, owned here; the remote ones
    // name addresses in this process, which the kernel checks (a bad or
    // poisoned one answers EFAULT, nothing is touched through it here).
    let n = unsafe { libc::process_vm_readv(own_pid(), &local, 1, remote.as_ptr(), WORDS as _, 0) };
    let done = if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EFAULT) {
            return Err(e);
        }
        0
    } else {
        n as usize / 8
    };
    for w in 0..done {
        out[w] = Val::Word(buf[w]);
    }
    if done == WORDS {
        return Ok(WORDS);
    }
    // The word that stopped it: poisoned, or something else to report.
    let mut one = 0u64;
    let local = libc::iovec { iov_base: (&mut one as *mut u64).cast(), iov_len: 8 };
    let remote = remote[done];
    // SAFETY: as above, for one word.
    let n = unsafe { libc::process_vm_readv(own_pid(), &local, 1, &remote, 1, 0) };
    out[done] = if n == 8 {
        // Present again already: a valid read of its own.
        Val::Word(one)
    } else {
        let e = std::io::Error::last_os_error();
        if n >= 0 || e.raw_os_error() != Some(libc::EFAULT) {
            return Err(e);
        }
        Val::Poison
    };
    Ok(done + 1)
}

fn own_pid() -> libc::pid_t {
    std::process::id() as libc::pid_t
}

fn write_syscall(addr: u64, v: u64) -> std::io::Result<()> {
    let local = libc::iovec { iov_base: (&v as *const u64).cast_mut().cast(), iov_len: 8 };
    let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: 8 };
    // SAFETY: the local iovec covers `v`, only read; the remote one names
    // a word of this process, which the kernel checks.
    let n = unsafe { libc::process_vm_writev(own_pid(), &local, 1, &remote, 1, 0) };
    match n {
        8 => Ok(()),
        n if n < 0 => Err(std::io::Error::last_os_error()),
        _ => Err(std::io::Error::other("short write")),
    }
}

/// xorshift64*: each thread its own, seeded from the run's seed.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        Rng(splitmix(seed ^ splitmix(stream)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

// ---------------------------------------------------------------------------
// The threads.

fn reader(r: &Round, t: usize, mut rng: Rng) {
    while !r.stop.load(Ordering::Acquire) {
        let page = rng.below(r.pages as u64) as usize;
        let direct = r.direct && rng.chance(50);
        if r.cfg.ops.write && rng.chance(25) {
            let began = r.begin_op(t, 1);
            r.write_word(page, rng.below(WORDS as u64) as usize, direct);
            r.end_op(t, began);
        } else {
            let began = r.begin_op(t, 0);
            r.read_page(page, r.addr(page, 0), direct);
            r.end_op(t, began);
        }
    }
}

fn discarder(r: &Round, t: usize, mut rng: Rng) {
    while !r.stop.load(Ordering::Acquire) {
        let (first, n) = r.random_range(&mut rng, 16);
        let began = r.begin_op(t, 2);
        let start = r.shadow.begin_range(first, &vec![Effect::Discard; n], Kind::Discard);
        let at = r.addr(first, 0) as *mut libc::c_void;
        // SAFETY: the range is guest RAM, mapped while the round lives;
        // dropping its contents is the balloon behaviour under test, and
        // the model expects it.
        let rc = unsafe { libc::madvise(at, n * PAGE, libc::MADV_DONTNEED) };
        let err = (rc != 0).then(std::io::Error::last_os_error);
        r.shadow.end_range(first, n, start, err.is_none());
        r.end_op(t, began);
        match err {
            None => {
                r.counters.discards.fetch_add(1, Ordering::Relaxed);
            }
            Some(e) => r.error(format!("discarding {} failed: {e}", r.range(first, n))),
        }
        // Read it back at once, as a balloon's guest does: an install that
        // checked its sequence before the discard and lands after it shows
        // up here as stale contents.
        for p in first..first + n {
            let began = r.begin_op(t, 0);
            r.read_page(p, r.addr(p, 0), false);
            r.end_op(t, began);
        }
        // Let the readers fault the pages back in between discards.
        std::thread::sleep(Duration::from_micros(50 + rng.below(200)));
    }
}

/// What the offline thread knows of a page's poison (it alone unplugs and
/// replugs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Poisoned {
    No,
    Yes,
    Maybe,
}

fn offliner(r: &Round, t: usize, mut rng: Rng) {
    let mut modes = Vec::new();
    if r.cfg.ops.migrate {
        modes.push(Mode::Migrate);
    }
    if r.cfg.ops.evict {
        modes.push(Mode::Evict);
    }
    if r.cfg.ops.unplug {
        modes.push(Mode::Unplug);
    }
    let poison = r.policy == PoisonPolicy;
    let mut poisoned = vec![Poisoned::No; r.pages];
    while !r.stop.load(Ordering::Acquire) {
        let held = poisoned.iter().filter(|p| **p != Poisoned::No).count();
        if poison && held > 0 && (held * 8 > r.pages || rng.chance(30)) {
            replug(r, t, &mut rng, &mut poisoned);
            continue;
        }
        let mode = modes[rng.below(modes.len() as u64) as usize];
        let (first, n) = r.random_range(&mut rng, 64);
        let effect = match mode {
            Mode::Unplug if poison => Effect::Set(Val::Poison),
            Mode::Unplug => Effect::Set(Val::Word(0)),
            _ => Effect::Keep,
        };
        let kind = match mode {
            Mode::Migrate => Kind::Migrate,
            Mode::Evict => Kind::Evict,
            _ => Kind::Unplug,
        };
        let range = r.range(first, n);
        let pins: Vec<(Arc<Pin>, u64)> = {
            let pins = r.pins.lock().unwrap_or_else(|e| e.into_inner());
            pins.iter().filter(|p| p.range().overlaps(&range)).map(|p| (p.clone(), p.invalidations())).collect()
        };
        let began = r.begin_op(t, 3);
        let start = r.shadow.begin_range(first, &vec![effect; n], kind);
        // Half the deadline: a fault, `Pin::get` or `page_ref` that meets
        // this offline waits for it, and must still end within its own.
        let deadline = r.cfg.deadline / 2;
        let res = r.engine.offline(range, mode, Instant::now() + deadline);
        r.shadow.end_range(first, n, start, res.is_ok());
        r.end_op(t, began);
        match res {
            Ok(_) => {
                let counter = match mode {
                    Mode::Migrate => &r.counters.migrates,
                    Mode::Evict => &r.counters.evicts,
                    _ => &r.counters.unplugs,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                if mode == Mode::Unplug && poison {
                    poisoned[first..first + n].fill(Poisoned::Yes);
                }
                for (pin, before) in pins {
                    if pin.invalidations() == before {
                        r.violation(|| {
                            format!("{mode} of {range} did not call the callback of the pin on {}", pin.range())
                        });
                    }
                }
            }
            Err(OfflineError::Overlap(_)) => {
                r.counters.offline_overlap.fetch_add(1, Ordering::Relaxed);
            }
            Err(OfflineError::Busy { waited, kernel_pinned: 0, hard: 0, .. }) if waited < deadline => {
                r.counters.offline_busy.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                if mode == Mode::Unplug && poison {
                    poisoned[first..first + n].iter_mut().for_each(|p| *p = Poisoned::Maybe);
                }
                r.error(format!("{mode} of {range}: {}", crate::error_chain(&e)));
            }
        }
    }
    // Leave nothing poisoned behind: the round ends with every page usable.
    while poison && poisoned.iter().any(|p| *p != Poisoned::No) {
        let Some(first) = poisoned.iter().position(|p| *p != Poisoned::No) else { break };
        let n = poisoned[first..].iter().take_while(|p| **p != Poisoned::No).count();
        if !replug_range(r, t, first, n, &mut poisoned) {
            break;
        }
    }
}

fn replug(r: &Round, t: usize, rng: &mut Rng, poisoned: &mut [Poisoned]) {
    // Around a page known or maybe poisoned, so most replugs do something.
    let held: Vec<usize> = (0..r.pages).filter(|&p| poisoned[p] != Poisoned::No).collect();
    let at = held[rng.below(held.len() as u64) as usize];
    let n = 1 + rng.below(32) as usize;
    let first = at.saturating_sub(rng.below(n as u64) as usize).min(r.pages - n.min(r.pages));
    let n = n.min(r.pages - first);
    replug_range(r, t, first, n, poisoned);
}

fn replug_range(r: &Round, t: usize, first: usize, n: usize, poisoned: &mut [Poisoned]) -> bool {
    let effects: Vec<Effect> = poisoned[first..first + n]
        .iter()
        .map(|p| match p {
            Poisoned::No => Effect::Keep,
            _ => Effect::Set(Val::Word(0)),
        })
        .collect();
    let range = r.range(first, n);
    let began = r.begin_op(t, 4);
    let start = r.shadow.begin_range(first, &effects, Kind::Replug);
    let res = r.engine.replug(range);
    // A page only maybe poisoned may have been left as it was.
    let certain = res.is_ok() && poisoned[first..first + n].iter().all(|p| *p != Poisoned::Maybe);
    r.shadow.end_range(first, n, start, certain);
    r.end_op(t, began);
    match res {
        Ok(_) => {
            r.counters.replugs.fetch_add(1, Ordering::Relaxed);
            poisoned[first..first + n].fill(Poisoned::No);
            true
        }
        Err(OfflineError::Overlap(_)) => {
            r.counters.offline_overlap.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(e) => {
            r.error(format!("replug of {range}: {}", crate::error_chain(&e)));
            false
        }
    }
}

fn pinner(r: &Round, t: usize, mut rng: Rng) {
    let new_pin = |rng: &mut Rng| -> Option<Arc<Pin>> {
        let (first, n) = r.random_range(rng, 4);
        match r.engine.pin(r.range(first, n), |_| {}) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                r.error(format!("pin of {}: {}", r.range(first, n), crate::error_chain(&e)));
                None
            }
        }
    };
    if r.cfg.ops.pin {
        let pins: Vec<Arc<Pin>> = (0..4).filter_map(|_| new_pin(&mut rng)).collect();
        *r.pins.lock().unwrap_or_else(|e| e.into_inner()) = pins;
    }
    let mut i = 0u64;
    while !r.stop.load(Ordering::Acquire) {
        i += 1;
        let use_pin = r.cfg.ops.pin && (!r.cfg.ops.page_ref || rng.chance(50));
        if use_pin {
            let pin = {
                let mut pins = r.pins.lock().unwrap_or_else(|e| e.into_inner());
                if pins.is_empty() {
                    break;
                }
                let k = rng.below(pins.len() as u64) as usize;
                if i % 64 == 0 {
                    if let Some(p) = new_pin(&mut rng) {
                        pins[k] = p;
                    }
                }
                pins[k].clone()
            };
            let began = r.begin_op(t, 5);
            let t0 = r.shadow.tick();
            match pin.get(r.deadline()) {
                Ok(guard) => {
                    let first = pin.range().start.0 as usize / PAGE;
                    for k in 0..guard.len() / PAGE {
                        r.read_page(first + k, guard.host_addr() as u64 + (k * PAGE) as u64, false);
                    }
                    r.counters.pin_gets.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => r.check_refusal(&e, t0, r.shadow.tick()),
            }
            r.end_op(t, began);
        } else {
            let (first, n) = r.random_range(&mut rng, 4);
            let began = r.begin_op(t, 6);
            let t0 = r.shadow.tick();
            match r.engine.page_ref(r.range(first, n), r.deadline()) {
                Ok(pr) => {
                    for k in 0..n {
                        r.read_page(first + k, r.addr(first + k, 0), false);
                    }
                    drop(pr);
                    r.counters.page_refs.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => r.check_refusal(&e, t0, r.shadow.tick()),
            }
            r.end_op(t, began);
        }
    }
    r.pins.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// Counts operations in progress past the deadline (once each), so one
/// that never returns is counted too.
fn watchdog(r: &Round) {
    while !r.stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(20));
        let now = r.now_us() + 1;
        for a in r.activity.iter() {
            let since = a.since.load(Ordering::Acquire);
            if since != 0 && now.saturating_sub(since) > r.cfg.deadline.as_micros() as u64 {
                let prev = a.flagged.swap(since, Ordering::AcqRel);
                if prev != since {
                    r.counters.overruns.fetch_add(1, Ordering::Relaxed);
                    let what = WHAT[a.what.load(Ordering::Relaxed) as usize];
                    r.stuck(format!("a {what} has run past its deadline of {:?}", r.cfg.deadline));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The run.

/// Runs the stress. A run that found violations still returns `Ok`: the
/// findings are in the report.
pub fn run(cfg: &StressConfig) -> Result<StressReport, StressError> {
    if cfg.unordered_removes && !cfg!(feature = "failpoints") {
        return Err(StressError::NoFailpoints);
    }
    let counters = Arc::new(Counters::default());
    let findings = Arc::new(Mutex::new(Findings::default()));
    let started = Instant::now();
    let mut report = StressReport::default();
    let sigbus = SigbusGuard::install().map_err(StressError::Io)?;
    let round_len = cfg.round.min(cfg.duration / cfg.policies.len().max(1) as u32).max(Duration::from_millis(100));
    let mut i = 0u64;
    while started.elapsed() < cfg.duration {
        let policy = cfg.policies[i as usize % cfg.policies.len()];
        let left = cfg.duration.saturating_sub(started.elapsed());
        let len = if left < round_len + round_len / 2 { left } else { round_len };
        let stamps = Stamps { round_key: splitmix(cfg.seed ^ (i << 48)) };
        let hung = run_round(cfg, policy, stamps, (i, started), len, &counters, &findings)?;
        report.rounds += 1;
        report.poison_rounds += u64::from(policy == PoisonPolicy);
        i += 1;
        report.hung += hung.0;
        report.engine_errors += hung.1;
        if hung.0 > 0 || (cfg.until_violation && counters.violations.load(Ordering::Acquire) > 0) {
            break;
        }
    }
    drop(sigbus);
    let c = &counters;
    let get = |a: &AtomicU64| a.load(Ordering::Acquire);
    let f = findings.lock().unwrap_or_else(|e| e.into_inner());
    report.ops = get(&c.ops);
    report.reads_checked = get(&c.reads_checked);
    report.reads_racing = get(&c.reads_racing);
    report.poisoned_reads = get(&c.poisoned_reads);
    report.violations = get(&c.violations);
    report.longest_wait_ms = get(&c.longest_wait_us) as f64 / 1000.0;
    report.overruns = get(&c.overruns);
    report.writes = get(&c.writes);
    report.writes_refused = get(&c.writes_refused);
    report.discards = get(&c.discards);
    report.migrates = get(&c.migrates);
    report.evicts = get(&c.evicts);
    report.unplugs = get(&c.unplugs);
    report.replugs = get(&c.replugs);
    report.offline_overlap = get(&c.offline_overlap);
    report.offline_busy = get(&c.offline_busy);
    report.pin_gets = get(&c.pin_gets);
    report.pin_refused = get(&c.pin_refused);
    report.page_refs = get(&c.page_refs);
    report.errors = f.stuck.iter().chain(&f.errors).cloned().collect();
    if f.errors_dropped > 0 {
        report.errors.push(format!("and {} more errors", f.errors_dropped));
    }
    report.details = f.details.clone();
    let first = get(&c.first_violation_us);
    report.first_violation_s = (first > 0).then(|| first as f64 / 1e6);
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// One engine under one policy for `len`. Returns the threads left
/// hanging and the engine's error count.
fn run_round(
    cfg: &StressConfig,
    policy: UnplugPolicy,
    stamps: Stamps,
    (index, run_started): (u64, Instant),
    len: Duration,
    counters: &Arc<Counters>,
    findings: &Arc<Mutex<Findings>>,
) -> Result<(u64, u64), StressError> {
    let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), cfg.mem as usize)])?);
    let source = Arc::new(StressSource { stamps, fill: cfg.fill });
    let mut config = Config { unplug_policy: policy, ..Config::default() };
    if let Some(d) = cfg.dispatch {
        config.dispatch = d;
    }
    let engine = Engine::builder(ram.clone(), source).config(config).start()?;
    #[cfg(feature = "failpoints")]
    if cfg.unordered_removes {
        engine.failpoints().switch_off(apf::failpoints::Switch::UnorderedRemoves, true);
    }
    let host = ram.host_range(GuestAddress(0), cfg.mem)? as u64;
    let pages = cfg.mem as usize / PAGE;
    let threads = cfg.readers + 3;
    let round = Arc::new(Round {
        cfg: cfg.clone(),
        policy,
        ram,
        engine,
        shadow: Shadow::new(pages, threads, stamps),
        host,
        pages,
        stop: AtomicBool::new(false),
        counters: counters.clone(),
        findings: findings.clone(),
        activity: (0..threads).map(|_| Activity::default()).collect(),
        epoch: Instant::now(),
        run_started,
        pins: Mutex::new(Vec::new()),
        write_gen: AtomicU32::new(1),
        direct: cfg.access == Access::Mixed && policy == UnplugPolicy::Zero,
    });
    let spawn = |name: String, t: usize, f: fn(&Round, usize, Rng)| -> Result<JoinHandle<()>, StressError> {
        let r = round.clone();
        let rng = Rng::new(cfg.seed, index << 8 | t as u64);
        std::thread::Builder::new().name(name).spawn(move || f(&r, t, rng)).map_err(StressError::Io)
    };
    let mut handles = Vec::new();
    for t in 0..cfg.readers {
        handles.push(spawn(format!("stress-read-{t}"), t, reader)?);
    }
    if cfg.ops.discard {
        handles.push(spawn("stress-discard".into(), cfg.readers, discarder)?);
    }
    if cfg.ops.offline() {
        handles.push(spawn("stress-offline".into(), cfg.readers + 1, offliner)?);
    }
    if cfg.ops.pin || cfg.ops.page_ref {
        handles.push(spawn("stress-pin".into(), cfg.readers + 2, pinner)?);
    }
    let dog = {
        let r = round.clone();
        std::thread::Builder::new()
            .name("stress-watchdog".into())
            .spawn(move || watchdog(&r))
            .map_err(StressError::Io)?
    };
    let until = Instant::now() + len;
    while Instant::now() < until && !round.stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(10).min(until.saturating_duration_since(Instant::now())));
    }
    // Threads finish their operation in progress (the offline thread also
    // replugs what it left poisoned); give them the deadline and a margin,
    // then leave the stuck ones behind.
    round.stop.store(true, Ordering::Release);
    let give_up = Instant::now() + cfg.deadline * 2 + Duration::from_secs(2);
    while handles.iter().any(|h| !h.is_finished()) && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(5));
    }
    let hung = handles.iter().filter(|h| !h.is_finished()).count() as u64;
    if hung > 0 {
        // Blocked in a fault or an engine call: stopping the engine could
        // release them into poisoned or zero-filled memory. Leave the
        // round (engine, RAM and threads) behind and report.
        let now = round.now_us() + 1;
        for a in round.activity.iter() {
            let since = a.since.load(Ordering::Acquire);
            if since != 0 {
                let what = WHAT[a.what.load(Ordering::Relaxed) as usize];
                round.stuck(format!("a {what} never returned (blocked for {} ms)", (now - since) / 1000));
                counters.longest_wait_us.fetch_max(now - since, Ordering::Relaxed);
            }
        }
        std::mem::forget(handles);
        std::mem::forget(dog);
        return Ok((hung, 0));
    }
    for h in handles {
        if h.join().is_err() {
            round.error("a stress thread panicked".into());
        }
    }
    let _ = dog.join();
    let round = Arc::into_inner(round).expect("every thread of the round has ended");
    let reported: Vec<_> = round.engine.errors().try_iter().collect();
    for e in reported.iter().take(5) {
        round.error(format!("engine: {}", crate::error_chain(e)));
    }
    let errors = reported.len() as u64 + round.engine.stats().errors_dropped;
    drop(round.engine);
    drop(round.ram);
    Ok((0, errors))
}

// ---------------------------------------------------------------------------
// SIGBUS: a plain access met a poisoned page no operation should have
// poisoned. Say so and end the process (the access cannot be resumed).

static SIGBUS_MESSAGE: &[u8] = b"vmm stress: violation: SIGBUS on a plain access to guest RAM at ";

extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let mut buf = [0u8; 18];
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let info = unsafe { &*info };
    // SAFETY: SIGBUS fills si_addr.
    let mut addr = unsafe { info.si_addr() } as u64;
    let mut i = buf.len();
    buf[i - 1] = b'\n';
    i -= 1;
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[(addr & 0xf) as usize];
        addr >>= 4;
        if addr == 0 || i == 2 {
            break;
        }
    }
    // SAFETY: write(2) is async-signal-safe; the buffer is valid for its
    // length.
    unsafe { libc::write(2, SIGBUS_MESSAGE.as_ptr().cast(), SIGBUS_MESSAGE.len()) };
    // SAFETY: as above.
    unsafe { libc::write(2, buf[i..].as_ptr().cast(), buf.len() - i) };
    // SAFETY: _exit(2) is async-signal-safe and ends the process here.
    unsafe { libc::_exit(3) }
}

/// The SIGBUS handler for the run, and the one it replaced.
struct SigbusGuard {
    old: libc::sigaction,
}

impl SigbusGuard {
    fn install() -> std::io::Result<SigbusGuard> {
        // SAFETY: a zeroed sigaction is a valid value to fill in.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_sigbus as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        // SAFETY: as above.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid sigaction values; the handler
        // only calls async-signal-safe functions.
        if unsafe { libc::sigaction(libc::SIGBUS, &act, &mut old) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SigbusGuard { old })
    }
}

impl Drop for SigbusGuard {
    fn drop(&mut self) {
        // SAFETY: restores the handler saved at install.
        unsafe { libc::sigaction(libc::SIGBUS, &self.old, std::ptr::null_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(start: u64, end: u64, effect: Effect, certain: bool, kind: Kind) -> Rec {
        Rec { start, end, effect, certain, kind }
    }

    const ST: Stamps = Stamps { round_key: 7 };
    const GPA: u64 = 0x1000;

    fn allowed(p: &PageShadow, t0: u64, t1: u64) -> Vec<Val> {
        let mut v = p.allowed(&ST, GPA, 0, t0, t1).values;
        v.sort_by_key(|v| match v {
            Val::Word(w) => *w,
            Val::Poison => u64::MAX,
        });
        v
    }

    fn w(v: u64) -> Val {
        Val::Word(v)
    }

    #[test]
    fn a_read_after_a_discard_may_only_see_zero() {
        let mut p = PageShadow::new();
        let init = w(ST.value(GPA, 0));
        assert_eq!(allowed(&p, 5, 6), vec![init]);
        p.ops.push(rec(10, 20, Effect::Discard, true, Kind::Discard));
        // Overlapping the discard: either; after it: zero only.
        assert_eq!(allowed(&p, 15, 25), vec![w(0), init]);
        assert_eq!(allowed(&p, 21, 22), vec![w(0)]);
        assert!(p.allowed(&ST, GPA, 0, 15, 25).racing);
        assert!(!p.allowed(&ST, GPA, 0, 21, 22).racing);
    }

    #[test]
    fn overlapping_writes_are_both_allowed_and_a_later_one_wins() {
        let mut p = PageShadow::new();
        p.words[0].push(rec(10, 20, Effect::Set(w(1)), true, Kind::Write));
        p.words[0].push(rec(15, 25, Effect::Set(w(2)), true, Kind::Write));
        // Either may be linearized last.
        assert_eq!(allowed(&p, 30, 31), vec![w(1), w(2)]);
        p.words[0].push(rec(40, 41, Effect::Set(w(3)), true, Kind::Write));
        assert_eq!(allowed(&p, 50, 51), vec![w(3)]);
        // A read that began before the third write may see the first two.
        assert_eq!(allowed(&p, 30, 45), vec![w(1), w(2), w(3)]);
        // Other words are untouched by these writes.
        assert_eq!(p.allowed(&ST, GPA + 512, 1, 50, 51).values, vec![w(ST.value(GPA + 512, 0))]);
    }

    #[test]
    fn a_discard_keeps_poison_and_an_uncertain_unplug_kills_nothing() {
        let mut p = PageShadow::new();
        p.ops.push(rec(10, 20, Effect::Set(Val::Poison), true, Kind::Unplug));
        p.ops.push(rec(30, 40, Effect::Discard, true, Kind::Discard));
        assert_eq!(allowed(&p, 50, 51), vec![w(0), Val::Poison]);
        p.ops.push(rec(60, 70, Effect::Set(w(0)), true, Kind::Replug));
        assert_eq!(allowed(&p, 80, 81), vec![w(0)]);
        // An unplug that failed part-way may or may not have acted.
        p.ops.push(rec(90, 95, Effect::Set(Val::Poison), false, Kind::Unplug));
        assert_eq!(allowed(&p, 100, 101), vec![w(0), Val::Poison]);
        // Migrate and evict change nothing, but a read overlapping one races.
        p.ops.push(rec(110, 120, Effect::Keep, true, Kind::Migrate));
        assert_eq!(allowed(&p, 115, 116), vec![w(0), Val::Poison]);
        assert!(p.allowed(&ST, GPA, 0, 115, 116).racing);
    }

    #[test]
    fn an_operation_in_flight_is_allowed_but_kills_nothing() {
        let mut p = PageShadow::new();
        p.words[0].push(rec(10, IN_FLIGHT, Effect::Set(w(9)), false, Kind::Write));
        assert_eq!(allowed(&p, 20, 21), vec![w(9), w(ST.value(GPA, 0))]);
        // Started after the read ended: not allowed.
        assert_eq!(allowed(&p, 2, 3), vec![w(ST.value(GPA, 0))]);
    }

    #[test]
    fn pruning_keeps_what_later_reads_need() {
        let mut p = PageShadow::new();
        for i in 0..10u64 {
            p.words[0].push(rec(10 * i + 1, 10 * i + 5, Effect::Set(w(i + 1)), true, Kind::Write));
        }
        p.ops.push(rec(200, 210, Effect::Keep, true, Kind::Evict));
        let before_late = allowed(&p, 300, 301);
        let before_mid = allowed(&p, 95, 96);
        p.prune(90);
        assert_eq!(allowed(&p, 300, 301), before_late);
        assert_eq!(allowed(&p, 95, 96), before_mid);
        assert!(p.words[0].len() <= 2, "{:?}", p.words[0]);
        // The source's record is dead for word 0 but not for the others.
        assert_eq!(p.allowed(&ST, GPA + 512, 1, 300, 301).values, vec![w(ST.value(GPA + 512, 0))]);
        p.prune(1000);
        assert!(p.ops.iter().all(|r| r.kind != Kind::Evict), "{:?}", p.ops);
        assert_eq!(allowed(&p, 1001, 1002), vec![w(10)]);
    }

    #[test]
    fn stamps_name_their_word_and_write() {
        let v = ST.value(0x2000, 5);
        assert_ne!(ST.value(0x2000, 0), 0);
        assert!(ST.describe(0x2000, w(v)).contains("write #5"));
        assert!(ST.describe(0x2000, w(ST.value(0x2000, 0))).contains("source"));
        assert!(ST.describe(0x3000, w(v)).contains("not a stamp"));
    }

    #[test]
    fn options_parse_and_bad_ones_say_why() {
        let args = |a: &[&str]| parse_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let c = args(&["--seconds", "2.5", "--mem=1M", "--ops", "write,discard", "--unplug-policy", "poison"]).unwrap();
        assert_eq!(c.duration, Duration::from_millis(2500));
        assert_eq!(c.mem, 1 << 20);
        assert!(c.ops.write && c.ops.discard && !c.ops.migrate && !c.ops.pin);
        assert_eq!(c.policies, vec![PoisonPolicy]);
        assert!(matches!(args(&["--seconds", "0"]), Err(CliError::Invalid { option: "--seconds", .. })));
        assert!(matches!(args(&["--mem", "100K"]), Err(CliError::Invalid { option: "--mem", .. })));
        assert!(matches!(args(&["--ops", "fly"]), Err(CliError::Invalid { option: "--ops", .. })));
        assert!(matches!(args(&["--readers", "0"]), Err(CliError::Invalid { option: "--readers", .. })));
        assert_eq!(args(&["--bogus"]), Err(CliError::Unknown("--bogus".into())));
        assert_eq!(args(&["--unordered-removes"]).is_ok(), cfg!(feature = "failpoints"));
    }

    #[test]
    fn the_report_is_one_json_line() {
        let r = StressReport { ops: 3, errors: vec!["a \"quoted\"\nline".into()], ..Default::default() };
        let j = r.to_json();
        assert!(!j.contains('\n'), "{j}");
        assert!(j.starts_with("{\"ok\":false,\"ops\":3,"), "{j}");
        assert!(j.contains("\\\"quoted\\\"\\nline"), "{j}");
    }
}
