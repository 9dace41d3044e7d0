//! The fault engine: reads userfaultfd events, dedupes them, plans prefetch
//! windows, and installs pages from the page source.
//!
//! ```text
//!  faulting threads ──fault──▶ userfaultfd ──read (batch)──▶ event loop
//!                                                       │ claim Missing pages
//!                                   cheap source: inline │ slow source / retry
//!                                                       ▼        ▼ try_send (bounded)
//!                                               resolve ◀── worker pool
//!                         fill ─▶ check seq under install lock ─▶ COPY / ZEROPAGE (wakes)
//! ```
//!
//! Module map: [`prefetch`] plans windows per thread and keeps working sets;
//! `event_loop` is the `event-manager` subscriber; `resolve` fills and
//! installs one claimed window, with the kernel's return conventions.
//!
//! # Shutdown
//!
//! Stop the threads that touch guest RAM first, then drop the engine (or call
//! [`Engine::shutdown`]). The engine stops its event loop, lets its workers
//! finish what they hold, then poisons every page that is still missing:
//! a thread that touches one afterwards gets SIGBUS instead of silently
//! reading zeros (which is what closing a userfaultfd would give it).

mod event_loop;
pub mod prefetch;
pub(crate) mod resolve;

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::notifier::{InvalidateEvent, Notifier};
use crate::offline::{Mode, OfflineError, OfflineReport, Staging, UnplugPolicy, STAGING_PAGES};
use crate::pin::{HardPin, PageRef, Pin, PinError};
use crate::ram::{GuestAddress, GuestRam, GuestRange, PageState, RamError};
use crate::source::{EvictionStore, PageSource, SourceError, SourceKind};
use crate::uffd::{Features, IoctlError, RegisterMode, Uffd, UffdError, PAGE_SIZE};

pub use prefetch::{WorkingSet, WorkingSetError};

/// Where claimed windows are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// Small windows from zero and in-memory sources on the event-loop
    /// thread (a cross-core hand-off costs more than they do); large
    /// windows, which amortise the hand-off and install in parallel with
    /// other threads' windows, and everything from blocking sources, on the
    /// worker pool.
    Auto,
    /// Everything on the event-loop thread (retries still go to the pool).
    Inline,
    /// Everything on the worker pool.
    Workers,
}

impl std::str::FromStr for Dispatch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Dispatch::Auto),
            "inline" => Ok(Dispatch::Inline),
            "workers" => Ok(Dispatch::Workers),
            other => Err(format!("unknown dispatch mode {other:?} (expected auto, inline or workers)")),
        }
    }
}

/// Engine configuration. The defaults were chosen by measurement on a
/// 2-core machine (see the README's numbers).
#[derive(Debug, Clone)]
pub struct Config {
    /// Worker threads for blocking sources and retries (at least 1).
    pub workers: usize,
    /// Largest prefetch window, in pages (1 turns prefetch off).
    pub max_window: usize,
    /// Fault-around for faults that follow no stream (random access):
    /// the missing pages of the aligned block of this many pages around
    /// the faulting one are installed with it, as Linux does for file
    /// mappings (`fault_around_bytes`). Trades memory (neighbours that may
    /// never be touched) for fewer faults; 1 turns it off. Capped by
    /// `max_window`.
    pub fault_around: usize,
    /// Where windows are resolved.
    pub dispatch: Dispatch,
    /// With [`Dispatch::Auto`], windows of more pages than this go to the
    /// worker pool.
    pub inline_max_pages: usize,
    /// How long the event loop keeps polling for the next fault before it
    /// sleeps in epoll (zero: sleep at once). It never spins while workers
    /// are installing: on a small machine they need the core.
    pub spin: Duration,
    /// Capacity of the worker queue.
    pub queue_depth: usize,
    /// Jobs the event loop parks when the worker queue is full.
    pub park_capacity: usize,
    /// Fill attempts after the first before a page is poisoned.
    pub fill_retries: u32,
    /// Back-off before the first retry (doubles each time).
    pub retry_backoff: Duration,
    /// How long a worker keeps retrying an install the kernel refuses with
    /// `EAGAIN` (address space changing) before it gives the pages back.
    pub install_deadline: Duration,
    /// Capacity of the error channel; further errors are counted, not kept.
    pub error_capacity: usize,
    /// Record the pages faulted, in order, as a [`WorkingSet`].
    pub record_working_set: bool,
    /// What accesses to unplugged memory get.
    pub unplug_policy: UnplugPolicy,
    /// How long shutdown waits for the engine's threads; a thread still
    /// busy then (in a page source that never returns) is left behind and
    /// reported, never waited for without end.
    pub shutdown_deadline: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workers: 2,
            max_window: 256,
            fault_around: 8,
            dispatch: Dispatch::Auto,
            inline_max_pages: 8,
            spin: Duration::from_micros(100),
            queue_depth: 256,
            park_capacity: 4096,
            fill_retries: 3,
            retry_backoff: Duration::from_millis(1),
            install_deadline: Duration::from_secs(2),
            error_capacity: 1024,
            record_working_set: false,
            unplug_policy: UnplugPolicy::Zero,
            shutdown_deadline: Duration::from_secs(5),
        }
    }
}

/// Errors starting or driving the engine.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The userfaultfd could not be set up.
    #[error("userfaultfd set-up failed")]
    Uffd(#[from] UffdError),
    /// A configuration value is out of range.
    #[error("invalid engine configuration: {0}")]
    Config(&'static str),
    /// An event-manager call failed.
    #[error("event manager: {0:?}")]
    EventManager(event_manager::Error),
    /// Creating an eventfd or a thread failed.
    #[error("engine set-up failed")]
    Io(#[source] io::Error),
    /// A guest range was invalid.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// The engine has shut down.
    #[error("the engine has shut down")]
    Stopped,
    /// Too much of this kind of work is running already.
    #[error("too many {0}; try again when one has finished")]
    Busy(&'static str),
}

/// Attempts of a `UFFDIO_WAKE` before it is reported.
const WAKE_TRIES: usize = 3;

/// Working-set replays that may run at once.
pub const MAX_REPLAYS: usize = 4;

/// Most failed fills of one job not counted against
/// [`Config::fill_retries`] because an invalidation of its window came
/// meanwhile.
pub(crate) const MAX_REFUNDS: u32 = 64;

/// A failure the engine reports through [`Engine::errors`] while it runs.
#[derive(Debug, Error)]
pub enum FaultError {
    /// The source failed for good; the page was poisoned (accesses get
    /// SIGBUS) unless `poisoned` is false.
    #[error("page source failed for guest page {gpa:#x} after {attempts} attempts (poisoned: {poisoned})")]
    SourceFailed {
        /// The page.
        gpa: u64,
        /// Attempts made.
        attempts: u32,
        /// Whether the page was poisoned (a prefetch-only page is not).
        poisoned: bool,
        /// The last error.
        #[source]
        error: SourceError,
    },
    /// The page source panicked while filling a window. The faulting page
    /// was poisoned (its thread gets SIGBUS) and the rest given back; the
    /// engine goes on serving other pages.
    #[error("page source panicked filling guest page {gpa:#x} ({message}); poisoned: {poisoned}")]
    SourcePanicked {
        /// The faulting page (or the window's first page).
        gpa: u64,
        /// Whether the page was poisoned.
        poisoned: bool,
        /// The panic's message.
        message: String,
    },
    /// An install ioctl failed in a way that is not a race.
    #[error("installing guest page {gpa:#x} failed")]
    Install {
        /// First page of the failed install.
        gpa: u64,
        /// The ioctl error.
        #[source]
        error: IoctlError,
    },
    /// The kernel reported a fault outside guest RAM (cannot happen unless
    /// someone registered other memory with the engine's descriptor).
    #[error("fault at host address {0:#x} outside guest RAM")]
    OutsideRam(u64),
    /// Reading events failed.
    #[error("reading fault events failed")]
    Events(#[source] UffdError),
    /// A userfaultfd message of a kind the engine does not know; the other
    /// messages of its batch were handled.
    #[error("unknown userfaultfd event {0:#x}")]
    UnknownEvent(u8),
    /// The kernel reported a page missing that the engine had installed,
    /// with no remove event behind it: its contents are gone. The page was
    /// poisoned (accesses get SIGBUS) rather than silently zero-filled.
    #[error("guest page {gpa:#x} was installed but the kernel lost it (no remove event); poisoned: {poisoned}")]
    Inconsistent {
        /// The page.
        gpa: u64,
        /// Whether it was poisoned.
        poisoned: bool,
    },
    /// A page-state transition found the page in a state it must not be
    /// in: an engine bug, reported instead of acted on.
    #[error("page-state machine")]
    State(#[from] crate::ram::StateError),
    /// The event loop thread stopped unexpectedly. A rescue thread answers
    /// every fault from then on with poison (SIGBUS) and applies removes,
    /// so no thread blocks forever; the engine must be shut down.
    #[error("the fault event loop died ({0}); every missing page is poisoned from now on")]
    EventLoopDied(String),
    /// A thread resolving pages did not finish by the shutdown deadline
    /// (a page source that never returns); it was left behind.
    #[error("{0} engine threads were still busy at the shutdown deadline and were left behind")]
    ThreadsLeftBehind(usize),
}

macro_rules! counters {
    ($(#[$m:meta])* $name:ident / $snap:ident { $($(#[$fm:meta])* $field:ident),* $(,)? }) => {
        /// Counters the engine keeps (monotonic, relaxed).
        #[derive(Debug, Default)]
        pub struct $name { $(pub(crate) $field: AtomicU64,)* }

        $(#[$m])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct $snap { $($(#[$fm])* pub $field: u64,)* }

        impl $name {
            /// A consistent-enough copy of every counter.
            pub fn snapshot(&self) -> $snap {
                $snap { $($field: self.$field.load(Ordering::Relaxed),)* }
            }
        }

        impl $snap {
            /// The counters as one JSON object.
            pub fn to_json(&self) -> String {
                let fields: Vec<String> = vec![$(format!("\"{}\":{}", stringify!($field), self.$field)),*];
                format!("{{{}}}", fields.join(","))
            }
        }
    };
}

counters! {
    /// A copy of the engine's counters.
    Stats / StatsSnapshot {
        /// Fault events read.
        faults,
        /// Faults on a page another resolver had claimed.
        deduped,
        /// Faults on a page already present (stale events).
        spurious,
        /// Windows installed (one or more pages each).
        windows,
        /// Pages installed by COPY or ZEROPAGE.
        pages_installed,
        /// Bytes installed.
        bytes_installed,
        /// Pages installed with ZEROPAGE.
        zero_pages,
        /// Pages found already present mid-install (`EEXIST`).
        eexist,
        /// Installs the kernel refused while the address space changed.
        eagain,
        /// Fills or installs thrown away because an invalidation ran.
        stale,
        /// Fill attempts retried after a source error.
        fill_retries,
        /// Pages poisoned because their source failed.
        poisoned,
        /// Remove events (`MADV_DONTNEED` by someone else).
        removes,
        /// Windows resolved on the event-loop thread.
        inline,
        /// Windows handed to the worker pool.
        dispatched,
        /// Windows parked because the worker queue was full.
        parked,
        /// Errors dropped because the error channel was full.
        errors_dropped,
        /// Faults on pages an offline held, answered when it ended.
        deferred,
        /// Offlines completed (every mode).
        offlines,
        /// Offlines that hit their deadline (held by a hard pin, a
        /// short-term reference, or a kernel pin) and changed nothing.
        offline_busy,
        /// Pages migrated to new host frames.
        frames_moved,
        /// Pages moved to the eviction store.
        pages_evicted,
        /// Pages unplugged (contents discarded).
        pages_unplugged,
        /// Pin callbacks called by invalidations.
        pin_invalidations,
        /// Pins re-armed (faulted in again) after an invalidation.
        pin_refaults,
    }
}

/// One claimed window: runs of pages in `Resolving` that this job owns.
pub(crate) struct Job {
    pub region: usize,
    /// The faulting page and access (None for prefetch-only jobs).
    pub fault: Option<Fault>,
    /// `(first page, count)` runs, all claimed by this job.
    pub runs: Vec<(usize, usize)>,
    pub span: tracing::Span,
    pub attempts: u32,
    /// Failed fills not counted in `attempts` because an invalidation moved
    /// the window's sequence meanwhile (see `resolve::on_fill_error`);
    /// capped at [`MAX_REFUNDS`] so a source that keeps failing under an
    /// invalidation storm still ends.
    pub refunds: u32,
    /// Claimed from `Present` by [`crate::ram::Region::try_reclaim_removed`]
    /// (a fault on a page a remove touched after it was installed), not
    /// from `Missing`: a page the kernel holds there is the engine's own.
    pub reclaimed: bool,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Fault {
    pub page: usize,
    pub write: bool,
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job").field("region", &self.region).field("runs", &self.runs).finish_non_exhaustive()
    }
}

/// State shared by the event loop, the workers and the handle.
pub(crate) struct Shared {
    pub uffd: Uffd,
    pub ram: Arc<GuestRam>,
    pub source: Arc<dyn PageSource>,
    pub store: Arc<EvictionStore>,
    pub notifier: Notifier,
    pub stats: Stats,
    pub config: Config,
    pub errors: Sender<FaultError>,
    /// Source of zeros for write faults on zero pages.
    pub zeros: Box<[u8]>,
    /// Written by workers when the event loop has parked jobs.
    pub kick: EventFd,
    pub parked_waiting: AtomicBool,
    /// Jobs being resolved (inline, queued, on a worker, replaying) or
    /// parked.
    pub in_flight: std::sync::atomic::AtomicUsize,
    pub stopping: AtomicBool,
    pub working_set: Option<FirstTouches>,
    /// Where offlines move pages through (`None` without `UFFDIO_MOVE`).
    pub staging: Option<Staging>,
}

impl Shared {
    /// Has the event loop look at faults an offline deferred.
    pub fn kick_deferred(&self) {
        let _ = self.kick.write(1);
    }

    pub fn report(&self, err: FaultError) {
        tracing::warn!(target: "apf", error = %err, "apf fault error");
        if self.errors.try_send(err).is_err() {
            self.stats.errors_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Wakes the threads waiting on `[host, host + len)`. A thread nobody
    /// wakes waits for ever, so a failed wake is tried again before it is
    /// reported.
    pub fn wake(&self, host: u64, len: usize) {
        let mut last = None;
        for _ in 0..WAKE_TRIES {
            match self.uffd.wake(host, len) {
                Ok(()) => return,
                Err(e) => last = Some(e),
            }
        }
        if let (Some(error), Some(loc)) = (last, self.ram.locate_host(host)) {
            self.report(FaultError::Install { gpa: self.ram.region(loc).page_gpa(loc.page).0, error });
        }
    }

    /// Reports a transition that found its page in the wrong state.
    pub fn checked(&self, transition: Result<(), crate::ram::StateError>) {
        if let Err(e) = transition {
            self.report(FaultError::State(e));
        }
    }

    /// Poisons every page not present, in runs; pages the kernel already
    /// has (populated behind the engine's back) are skipped. Returns the
    /// pages poisoned.
    pub fn poison_unresolved(&self) -> u64 {
        let uffd = &self.uffd;
        let mut poisoned = 0;
        for r in self.ram.regions() {
            let unresolved = |p: usize| matches!(r.state(p).0, PageState::Missing | PageState::Resolving);
            for (start, end) in crate::ram::runs(r.pages(), unresolved) {
                let mut at = start;
                while at < end {
                    // SAFETY: pages of guest RAM, which no Rust reference
                    // ever points into (see `crate::ram`).
                    match unsafe { uffd.poison(r.page_host(at), (end - at) * PAGE_SIZE) } {
                        Ok(n) => {
                            poisoned += (n / PAGE_SIZE) as u64;
                            at = end;
                        }
                        Err(e) => {
                            poisoned += (e.done / PAGE_SIZE) as u64;
                            // Skip the page that stopped it (present, most likely).
                            at += e.done / PAGE_SIZE + 1;
                        }
                    }
                }
            }
        }
        poisoned
    }

    /// Whether a job of `pages` pages runs on the event-loop thread.
    pub fn inline_ok(&self, pages: usize) -> bool {
        match self.config.dispatch {
            Dispatch::Inline => true,
            Dispatch::Workers => false,
            Dispatch::Auto => self.source.kind() != SourceKind::Blocking && pages <= self.config.inline_max_pages,
        }
    }

    /// Gives the claimed pages of `runs` back (`Resolving -> Missing`) and
    /// wakes them, so any thread deduped onto them faults again and gets a
    /// new resolver: nothing waits on an abandoned window.
    pub fn release_runs(&self, region: usize, runs: &[(usize, usize)]) {
        let r = &self.ram.regions()[region];
        for &(first, count) in runs {
            for p in first..first + count {
                self.checked(r.release(p));
            }
            self.wake(r.page_host(first), count * PAGE_SIZE);
        }
    }
}

/// The working set being recorded: each page's first touch, in order,
/// once. Bounded by the RAM's page count: a page faulted again (after a
/// discard or an offline) is not recorded again, which is what a replay of
/// first touches wants.
pub(crate) struct FirstTouches {
    /// One bit per page of guest RAM, in `GuestRam` page order.
    seen: Box<[AtomicU64]>,
    order: Mutex<Vec<u64>>,
}

impl FirstTouches {
    fn new(pages: usize) -> Self {
        FirstTouches {
            seen: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            order: Mutex::new(Vec::new()),
        }
    }

    /// Records the page at `gpa` (the `index`th page of guest RAM) if this
    /// is its first touch.
    pub fn record(&self, index: usize, gpa: u64) {
        let Some(word) = self.seen.get(index / 64) else { return };
        let bit = 1u64 << (index % 64);
        if word.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            self.order.lock().unwrap_or_else(|e| e.into_inner()).push(gpa);
        }
    }

    fn pages(&self) -> Vec<u64> {
        self.order.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Builds an [`Engine`].
#[derive(Debug)]
pub struct EngineBuilder {
    ram: Arc<GuestRam>,
    source: Arc<dyn PageSource>,
    store: Option<Arc<EvictionStore>>,
    config: Config,
}

impl fmt::Debug for dyn PageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PageSource({})", self.name())
    }
}

impl EngineBuilder {
    /// The configuration (the default one unless this is called). There is
    /// one way to configure an engine: build a [`Config`] (struct update
    /// syntax over `Config::default()`) and hand it over here.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use apf::{Config, Dispatch, Engine, GuestAddress, GuestRam, ZeroSource};
    /// # let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), 1 << 20)])?);
    /// let config = Config { workers: 2, dispatch: Dispatch::Workers, ..Config::default() };
    /// let engine = Engine::builder(ram, Arc::new(ZeroSource)).config(config).start()?;
    /// # engine.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Shares an eviction store (one is created otherwise).
    pub fn store(mut self, store: Arc<EvictionStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Opens the userfaultfd, registers every RAM region, and starts the
    /// event loop and the workers.
    pub fn start(self) -> Result<Engine, EngineError> {
        Engine::start(self)
    }
}

/// The failures an [`Engine`] reports while it runs, oldest first: a
/// bounded queue that drops (and counts, [`StatsSnapshot::errors_dropped`])
/// what does not fit. Clones share one queue, and a clone outlives the
/// engine, keeping what was reported until it is read.
#[derive(Debug, Clone)]
pub struct Errors(Receiver<FaultError>);

impl Errors {
    /// The oldest failure, if one is waiting.
    pub fn try_recv(&self) -> Option<FaultError> {
        self.0.try_recv().ok()
    }

    /// The oldest failure, waiting up to `timeout` for one. `None` at the
    /// timeout, or at once when none is waiting and the engine is gone.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<FaultError> {
        self.0.recv_timeout(timeout).ok()
    }

    /// Every failure waiting now, oldest first, without blocking.
    pub fn try_iter(&self) -> impl Iterator<Item = FaultError> + '_ {
        self.0.try_iter()
    }

    /// Failures waiting now.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if no failure is waiting.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What [`Engine::shutdown`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Pages still missing at shutdown, now poisoned.
    pub poisoned_pages: u64,
    /// Engine threads still busy at the shutdown deadline, left behind
    /// (they keep the userfaultfd open, so guest RAM never silently turns
    /// into zero-filled memory under them).
    pub threads_left_behind: usize,
}

/// The running fault engine for one [`GuestRam`].
///
/// ```no_run
/// use std::sync::Arc;
/// use apf::{Engine, GuestAddress, GuestRam, SnapshotFile};
///
/// let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), 64 << 20)])?);
/// let source = Arc::new(SnapshotFile::open("guest.img", &ram)?);
/// let engine = Engine::builder(ram.clone(), source).start()?;
/// // Any access to guest RAM now faults the page in from guest.img.
/// let first = ram.host_range(GuestAddress(0), 8)?;
/// // SAFETY: `first` points at 8 bytes of guest RAM.
/// let word = unsafe { std::ptr::read_volatile(first as *const u64) };
/// println!("{word:#x}, {:?}", engine.stats());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Engine {
    shared: Arc<Shared>,
    stop: EventFd,
    event_loop: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    jobs: Option<Sender<Job>>,
    errors: Errors,
    replays: Mutex<Vec<JoinHandle<()>>>,
    shut_down: bool,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine").field("ram", &self.shared.ram).field("config", &self.shared.config).finish()
    }
}

impl Engine {
    /// Starts building an engine that resolves faults on `ram` from `source`.
    pub fn builder(ram: Arc<GuestRam>, source: Arc<dyn PageSource>) -> EngineBuilder {
        EngineBuilder { ram, source, store: None, config: Config::default() }
    }

    fn start(b: EngineBuilder) -> Result<Engine, EngineError> {
        let config = b.config;
        if config.workers == 0 || config.workers > 64 {
            return Err(EngineError::Config("workers must be between 1 and 64"));
        }
        if config.max_window == 0 || config.max_window > 4096 {
            return Err(EngineError::Config("max_window must be between 1 and 4096 pages"));
        }
        if config.queue_depth == 0 || config.park_capacity == 0 || config.error_capacity == 0 {
            return Err(EngineError::Config("queue_depth, park_capacity and error_capacity must be positive"));
        }
        let uffd = Uffd::new(Features::EVENT_REMOVE | Features::THREAD_ID | Features::POISON, Features::MOVE)?;
        for r in b.ram.regions() {
            uffd.register(r.host_base(), r.len(), RegisterMode::MISSING)?;
        }
        let staging = if uffd.features().contains(Features::MOVE) {
            Some(Staging::new(&uffd, STAGING_PAGES).map_err(|e| EngineError::Io(io::Error::other(e)))?)
        } else {
            None
        };
        let ram_pages = b.ram.pages();
        let (err_tx, err_rx) = crossbeam_channel::bounded(config.error_capacity);
        let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(config.queue_depth);
        let shared = Arc::new(Shared {
            uffd,
            ram: b.ram,
            source: b.source,
            store: b.store.unwrap_or_default(),
            notifier: Notifier::new(),
            stats: Stats::default(),
            zeros: vec![0u8; config.max_window * PAGE_SIZE].into_boxed_slice(),
            kick: EventFd::new(EFD_NONBLOCK).map_err(EngineError::Io)?,
            parked_waiting: AtomicBool::new(false),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            working_set: config.record_working_set.then(|| FirstTouches::new(ram_pages)),
            errors: err_tx,
            staging,
            config,
        });
        let stop = EventFd::new(EFD_NONBLOCK).map_err(EngineError::Io)?;

        let mut workers = Vec::new();
        for i in 0..shared.config.workers {
            let shared = shared.clone();
            let rx = job_rx.clone();
            let dispatch = crate::trace::current_dispatch();
            let h = std::thread::Builder::new()
                .name(format!("apf-worker-{i}"))
                .spawn(move || {
                    let _trace = tracing::dispatcher::set_default(&dispatch);
                    resolve::worker(&shared, &rx)
                })
                .map_err(EngineError::Io)?;
            workers.push(h);
        }
        let event_loop = event_loop::spawn(shared.clone(), job_tx.clone(), stop.try_clone().map_err(EngineError::Io)?)?;
        Ok(Engine {
            shared,
            stop,
            event_loop: Some(event_loop),
            workers,
            jobs: Some(job_tx),
            errors: Errors(err_rx),
            replays: Mutex::new(Vec::new()),
            shut_down: false,
        })
    }

    /// The engine's counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Failures reported while running (bounded; see
    /// [`StatsSnapshot::errors_dropped`]).
    pub fn errors(&self) -> &Errors {
        &self.errors
    }

    /// The guest RAM this engine serves.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.shared.ram
    }

    /// The eviction store pages are restored from.
    pub fn store(&self) -> &Arc<EvictionStore> {
        &self.shared.store
    }

    /// The failpoints of this engine's userfaultfd (feature `failpoints`).
    #[cfg(feature = "failpoints")]
    pub fn failpoints(&self) -> &Arc<crate::failpoints::FailPoints> {
        self.shared.uffd.failpoints()
    }

    /// The negotiated userfaultfd features.
    pub fn features(&self) -> Features {
        self.shared.uffd.features()
    }

    /// The pages faulted so far, in order (empty unless recording).
    pub fn working_set(&self) -> WorkingSet {
        let pages = self.shared.working_set.as_ref().map(FirstTouches::pages).unwrap_or_default();
        WorkingSet { pages }
    }

    /// Installs every still-missing page of `range` now, on the calling
    /// thread, in windows of at most `max_window` pages. Returns the pages
    /// this call installed. Pages other resolvers hold are left to them.
    pub fn prefetch(&self, range: GuestRange) -> Result<u64, EngineError> {
        if self.shut_down || self.shared.stopping.load(Ordering::Acquire) {
            return Err(EngineError::Stopped);
        }
        let (loc, count) = self.shared.ram.check_range(range)?;
        Ok(resolve::prefetch_pages(&self.shared, (loc.page..loc.page + count).map(|p| (loc.region, p))))
    }

    /// Replays a recorded working set as prefetch on a background thread,
    /// in recorded order; pages outside RAM are skipped. The thread stops
    /// early when the engine shuts down.
    pub fn replay(&self, ws: &WorkingSet) -> Result<(), EngineError> {
        if self.shut_down || self.shared.stopping.load(Ordering::Acquire) {
            return Err(EngineError::Stopped);
        }
        let mut replays = self.replays.lock().unwrap_or_else(|e| e.into_inner());
        // Finished replays are joined here, so the list holds running ones
        // only, and at most `MAX_REPLAYS` of those.
        for h in std::mem::take(&mut *replays) {
            if h.is_finished() {
                let _ = h.join();
            } else {
                replays.push(h);
            }
        }
        if replays.len() >= MAX_REPLAYS {
            return Err(EngineError::Busy("replays running"));
        }
        let shared = self.shared.clone();
        let pages = ws.pages.clone();
        let dispatch = crate::trace::current_dispatch();
        let h = std::thread::Builder::new()
            .name("apf-replay".into())
            .spawn(move || {
                let _trace = tracing::dispatcher::set_default(&dispatch);
                let locs = pages.iter().filter_map(|&gpa| shared.ram.locate(GuestAddress(gpa)).ok());
                let locs = locs.map(|l| (l.region, l.page));
                resolve::prefetch_pages(&shared, locs);
            })
            .map_err(EngineError::Io)?;
        replays.push(h);
        Ok(())
    }

    /// Registers a migratable pin over `range` (page-aligned, inside one
    /// RAM region). `callback` runs on the offlining thread whenever an
    /// invalidation hits the range; see [`Pin`] for what it may do.
    /// The memory is faulted in by the first [`Pin::get`].
    pub fn pin(
        &self,
        range: GuestRange,
        callback: impl Fn(&InvalidateEvent) + Send + Sync + 'static,
    ) -> Result<Pin, PinError> {
        Pin::register(self.shared.clone(), range, callback)
    }

    /// Takes a short-term reference on `range`, faulting it in first.
    /// Waits for an offline over the range to end, up to `deadline`.
    pub fn page_ref(&self, range: GuestRange, deadline: std::time::Instant) -> Result<PageRef, PinError> {
        if self.shared.stopping.load(Ordering::Acquire) {
            return Err(PinError::Stopped);
        }
        PageRef::take(self.shared.clone(), range, deadline)
    }

    /// Takes a hard pin on `range` (legacy mode, see [`HardPin`]).
    pub fn hard_pin(&self, range: GuestRange, deadline: std::time::Instant) -> Result<HardPin, PinError> {
        if self.shared.stopping.load(Ordering::Acquire) {
            return Err(PinError::Stopped);
        }
        HardPin::take(self.shared.clone(), range, deadline)
    }

    /// Pins (migratable and hard) registered right now.
    pub fn pins_registered(&self) -> usize {
        self.shared.notifier.intervals()
    }

    /// Offlines `range` in `mode`, waiting at most until `deadline` for
    /// references and kernel pins to let go. Faults on the range keep being
    /// served: they wait while the offline holds the pages and then get the
    /// right contents. See [`Mode`] for what each mode does.
    ///
    /// `range` must be page-aligned and inside one RAM region. One offline
    /// runs on a range at a time; offlines of disjoint ranges may be called
    /// concurrently, from any threads (they take turns at step 4).
    ///
    /// # Steps
    ///
    /// Every mode runs the same steps, as the kernel's own page migration
    /// does:
    ///
    /// 1. **The invalidation begins.** Fills in flight over the range are
    ///    thrown away instead of installed; faults on the range wait until
    ///    step 5.
    /// 2. **The callbacks of the [`Pin`]s over the range are called**, on
    ///    this thread: their holders drop the kernel pins they made on the
    ///    memory and stop relying on it.
    /// 3. **Holders are waited for**, up to `deadline`: [`PageRef`]s and
    ///    [`HardPin`]s on the range (and, for an unplug, live
    ///    [`PinGuard`](crate::PinGuard)s), then another offline's use of
    ///    the engine's staging area. No new reference is granted on the
    ///    range meanwhile, so the wait cannot starve. A range still held at
    ///    the deadline fails with [`OfflineError::Busy`] (or
    ///    [`OfflineError::StagingBusy`]) and is left as it was.
    /// 4. **The pages the kernel holds are acted on**, in chunks: taken out
    ///    of guest RAM in one step (a write landing afterwards faults and
    ///    waits; none is lost), then copied into fresh frames, copied into
    ///    the eviction store, or dropped, by mode. What the kernel holds is
    ///    what is acted on, whatever the engine believed: an unplug also
    ///    discards pages populated before the engine registered the memory.
    /// 5. **The invalidation ends.** Each page's state is set from what
    ///    really happened to it, and the waiting faults are served.
    ///
    /// # Errors
    ///
    /// No failure leaves a page holding stale data, and none loses a
    /// page's contents but for the one exception below: whatever the
    /// error, every page of the range keeps its contents (in guest RAM, or
    /// in the eviction store and restored on its next fault) or, for an
    /// unplug, is discarded, and faults on it are served.
    ///
    /// - [`OfflineError::Range`]: `range` is not aligned, empty, or not in
    ///   one RAM region; [`OfflineError::Overlap`]: another offline is
    ///   working on part of it; [`OfflineError::Stopped`],
    ///   [`OfflineError::Unsupported`] (the kernel lacks `UFFDIO_MOVE`).
    ///   Nothing was done.
    /// - [`OfflineError::Busy`], [`OfflineError::StagingBusy`],
    ///   [`OfflineError::BlockBusy`] ([`OfflineError::is_busy`]): held past
    ///   the deadline. Nothing changed, except that when a page the kernel
    ///   keeps pinned stops the take-out part way, the chunks before it
    ///   are done (an unplug reports how many pages it discarded). A later
    ///   attempt may work.
    /// - [`OfflineError::Ioctl`]: a userfaultfd call failed past its
    ///   retries; the error names the call and the page it stopped at.
    ///   Pages that could not go back into guest RAM are in the eviction
    ///   store.
    /// - [`OfflineError::Lost`]: the one exception. Pages whose contents
    ///   could neither be put back nor kept were poisoned (an access gets
    ///   SIGBUS), never zero-filled.
    ///
    /// A balloon's discard (`MADV_DONTNEED`) of a page the offline holds
    /// wins: once it returns, the page reads as zeros, and the offline does
    /// not put the old contents back.
    pub fn offline(
        &self,
        range: GuestRange,
        mode: Mode,
        deadline: std::time::Instant,
    ) -> Result<OfflineReport, OfflineError> {
        crate::offline::offline(&self.shared, range, mode, deadline)
    }

    /// Offlines one real host memory block holding pages of `range`
    /// ([`Mode::HostBlock`]): tries the blocks that hold its pages, most
    /// pages first, each attempt bounded by `attempt`, until one goes
    /// offline and back online. Blocks of unmovable kernel memory, or
    /// held by someone else, are skipped and counted.
    pub fn offline_any_host_block(
        &self,
        range: GuestRange,
        attempt: Duration,
    ) -> Result<crate::offline::HostBlockSearch, OfflineError> {
        crate::offline::offline_any_host_block(&self.shared, range, attempt)
    }

    /// Brings pages unplugged under [`UnplugPolicy::Poison`] back, as
    /// zeros. Returns how many pages were brought back.
    pub fn replug(&self, range: GuestRange) -> Result<usize, OfflineError> {
        if self.shared.stopping.load(Ordering::Acquire) {
            return Err(OfflineError::Stopped);
        }
        crate::offline::replug(&self.shared, range)
    }

    /// Waits until no window is being resolved, queued or parked, and no
    /// replay is running, or until `deadline`. Returns false on timeout.
    /// Counters move after the install that wakes a faulting thread, so
    /// read them after this to see a fault's effects.
    pub fn wait_idle(&self, deadline: std::time::Instant) -> bool {
        loop {
            let replaying = self.replays.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|h| !h.is_finished());
            if self.shared.in_flight.load(Ordering::Acquire) == 0 && !replaying {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Stops the engine. Stop the threads that touch guest RAM first (the
    /// vCPUs, the devices), then call this (or drop the engine). The
    /// engine stops its event loop, lets its workers finish what they hold
    /// (up to [`Config::shutdown_deadline`]), then poisons every page that
    /// is still missing: a thread that touches one afterwards, or is still
    /// blocked on one, gets SIGBUS instead of silently reading zeros
    /// (which is what closing a userfaultfd would give it).
    pub fn shutdown(mut self) -> ShutdownReport {
        self.stop_all()
    }

    fn stop_all(&mut self) -> ShutdownReport {
        if self.shut_down {
            return ShutdownReport::default();
        }
        self.shut_down = true;
        self.shared.stopping.store(true, Ordering::Release);
        let _ = self.stop.write(1);
        let deadline = std::time::Instant::now() + self.shared.config.shutdown_deadline;
        let mut threads = Vec::new();
        threads.extend(self.event_loop.take());
        // Workers drain the queue (each job is bounded by retries and the
        // install deadline, unless its source never returns) and exit when
        // the channel closes.
        self.jobs = None;
        threads.append(&mut self.workers);
        threads.append(&mut self.replays.lock().unwrap_or_else(|e| e.into_inner()));
        let mut threads_left_behind = 0;
        for h in threads {
            while !h.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                threads_left_behind += 1;
            }
        }
        if threads_left_behind > 0 {
            self.shared.report(FaultError::ThreadsLeftBehind(threads_left_behind));
            event_loop::serve_after_shutdown(self.shared.clone());
        }
        let poisoned_pages = self.poison_missing();
        if threads_left_behind == 0 {
            for r in self.shared.ram.regions() {
                let _ = self.shared.uffd.unregister(r.host_base(), r.len());
            }
        }
        ShutdownReport { poisoned_pages, threads_left_behind }
    }

    fn poison_missing(&self) -> u64 {
        self.shared.poison_unresolved()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop_all();
    }
}
