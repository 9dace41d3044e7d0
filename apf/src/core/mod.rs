//! The engine's core: the state every part of the engine shares (the
//! userfaultfd, guest RAM, the source and the store, the invalidation
//! notifier, the counters, the configuration), behind narrow methods; the
//! one interface through which guest memory changes ([`install`], with a
//! backend per memory kind and the limited one); and the resolver of
//! claimed windows that the fault path, pins and the engine's prefetch all
//! use (`resolve`).
//!
//! It sits between the leaf modules (userfaultfd, RAM and page states,
//! sources, notifier, configuration, counters), which it uses, and the
//! fault path, pins and offline, which use it and never each other (see
//! `docs/ARCHITECTURE.md`, and `tests/layers.rs`, which enforces it).

pub(crate) mod install;
pub(crate) mod resolve;

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{Config, Dispatch, OfflinePriority};
use crate::counters::Stats;
use crate::notifier::Notifier;
use crate::ram::{runs, GuestAddress, GuestRam, PageState, StateError};
use crate::source::{EvictionStore, PageSource, SourceError, SourceKind};
use crate::uffd::{IoctlError, Uffd, UffdError, PAGE_SIZE};

use self::install::{Install, MemOp};

/// Largest window, in huge pages, on huge-page memory (prefetch, streams,
/// replays, pins' fill): 8 MiB. A fault waits for its window's whole
/// `COPY` (one call wakes only at its end), and one huge page already
/// holds what a 512-page stream window of small pages would; a few of them
/// keep a stream's copies large while the faulting thread waits at most a
/// few milliseconds, and the fill buffer of each thread stays small.
pub(crate) const HUGE_WINDOW: usize = 4;

/// Attempts of a `UFFDIO_WAKE` before it is reported.
const WAKE_TRIES: usize = 3;

/// Most failed fills of one job not counted against
/// [`Config::fill_retries`] because an invalidation of its window came
/// meanwhile.
pub(crate) const MAX_REFUNDS: u32 = 64;

/// A failure the engine reports through [`Engine::errors`](crate::Engine::errors) while it runs.
#[derive(Debug, Error)]
pub enum FaultError {
    /// The source failed for good; the page was poisoned (accesses get
    /// SIGBUS) unless `poisoned` is false.
    #[error("page source failed for guest page {:#x} after {attempts} attempts (poisoned: {poisoned})", .gpa.0)]
    SourceFailed {
        /// The page.
        gpa: GuestAddress,
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
    #[error("page source panicked filling guest page {:#x} ({message}); poisoned: {poisoned}", .gpa.0)]
    SourcePanicked {
        /// The faulting page (or the window's first page).
        gpa: GuestAddress,
        /// Whether the page was poisoned.
        poisoned: bool,
        /// The panic's message.
        message: String,
    },
    /// An install ioctl failed in a way that is not a race.
    #[error("installing guest page {:#x} failed", .gpa.0)]
    Install {
        /// First page of the failed install.
        gpa: GuestAddress,
        /// The ioctl error.
        #[source]
        error: IoctlError,
    },
    /// The kernel had no page to install into (a huge-page pool mapped
    /// `MAP_NORESERVE` ran dry), past the retries. The kernel says so with
    /// `ENOMEM`, or with `EEXIST` where nothing is mapped (its answer when
    /// the allocation fails once the page table exists); `error` is what
    /// it answered. The faulting
    /// page was poisoned (its thread gets SIGBUS) unless `poisoned` is
    /// false: a prefetch nobody waited on, given back, or (wrapped in
    /// [`FaultError::LeftMissing`]) a faulting page with no way to poison
    /// it.
    #[error("no memory to install guest page {:#x} (huge-page pool exhausted?); poisoned: {poisoned}", .gpa.0)]
    NoMemory {
        /// The page.
        gpa: GuestAddress,
        /// Whether it was poisoned.
        poisoned: bool,
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
    #[error("guest page {:#x} was installed but the kernel lost it (no remove event); poisoned: {poisoned}", .gpa.0)]
    Inconsistent {
        /// The page.
        gpa: GuestAddress,
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
    /// The engine's userfaultfd offers no `UFFDIO_POISON`
    /// ([`Backend::Limited`](crate::Backend::Limited)): a page it would
    /// have poisoned, for the reason in `why`, was filled with zeros
    /// instead, so the thread waiting on it went on, reading zeros where
    /// its contents should be.
    #[error("guest page {:#x} was filled with zeros (this userfaultfd offers no UFFDIO_POISON)", .gpa.0)]
    ZeroFilled {
        /// The page.
        gpa: GuestAddress,
        /// What the engine gave up on (reported with `poisoned: false`).
        #[source]
        why: Box<FaultError>,
    },
    /// A faulting page nothing could be installed into, for the reason in
    /// `why`, left missing: the engine's userfaultfd offers no
    /// `UFFDIO_POISON` and zeros would need a page too (a huge-page pool
    /// that ran dry). The faulting thread faults again, and is served once
    /// the reason is gone; until then it makes no progress, so whoever
    /// runs it may want to end it.
    #[error("guest page {:#x} could not be served and was left missing; its thread faults again", .gpa.0)]
    LeftMissing {
        /// The page.
        gpa: GuestAddress,
        /// Why nothing could be installed.
        #[source]
        why: Box<FaultError>,
    },
    /// A thread resolving pages did not finish by the shutdown deadline
    /// (a page source that never returns); it was left behind.
    #[error("{0} engine threads were still busy at the shutdown deadline and were left behind")]
    ThreadsLeftBehind(usize),
}

/// A run of consecutive pages of one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    /// Its first page (an index into the region).
    pub first: usize,
    /// How many pages.
    pub count: usize,
}

impl Run {
    /// The run of the one page `page`.
    pub fn one(page: usize) -> Run {
        Run { first: page, count: 1 }
    }

    /// One past its last page.
    pub fn end(&self) -> usize {
        self.first + self.count
    }
}

/// The pages a job claimed, as runs of one region in the order they are
/// filled and installed: the faulting page's run first for a stream, the
/// strided pages one by one, a fault-around block as its missing runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Window(Vec<Run>);

impl Window {
    /// The window of the one page `page`.
    pub fn one(page: usize) -> Window {
        Window(vec![Run::one(page)])
    }

    /// Pages in all its runs.
    pub fn pages(&self) -> usize {
        self.0.iter().map(|r| r.count).sum()
    }

    /// The guest range from its lowest to its highest page (empty for an
    /// empty window).
    pub fn span(&self, region: &crate::ram::Region) -> crate::ram::GuestRange {
        let lo = self.0.iter().map(|r| r.first).min().unwrap_or(0);
        let hi = self.0.iter().map(Run::end).max().unwrap_or(lo);
        crate::ram::GuestRange::new(region.page_gpa(lo), region.pages_len(hi - lo) as u64)
    }
}

impl From<Vec<Run>> for Window {
    fn from(runs: Vec<Run>) -> Window {
        Window(runs)
    }
}

impl std::ops::Deref for Window {
    type Target = Vec<Run>;
    fn deref(&self) -> &Vec<Run> {
        &self.0
    }
}

impl std::ops::DerefMut for Window {
    fn deref_mut(&mut self) -> &mut Vec<Run> {
        &mut self.0
    }
}

/// One claimed window: runs of pages in `Resolving` that this job owns.
pub(crate) struct Job {
    pub region: usize,
    /// The faulting page and access (None for prefetch-only jobs).
    pub fault: Option<Fault>,
    /// Its pages, all claimed by this job.
    pub window: Window,
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
    /// Where its fault's time goes (see [`Causes`]).
    pub causes: Causes,
    /// Zero pages go in as copies, not as the shared zero page: a write
    /// fault asked for the window (a write to the zero page would take a
    /// copy-on-write fault per page). Kept by the rest of a split window.
    pub writes: bool,
}

/// Faults that took less than this (from the read of the fault to the end
/// of its job) record no [`Causes`]: the tail they explain is far longer,
/// and each recorded field costs the subscriber a span lookup.
const CAUSES_FROM: Duration = Duration::from_micros(50);

/// Where a fault's time went, recorded on its `apf.fault` span when it took
/// at least [`CAUSES_FROM`] (fields `queued_ns`, `waited_ns`, `lock_ns`,
/// `fill_ns`, `install_ns`; see [`crate::span`]). Measured only when a
/// subscriber listens to the span: without one, no clock is read.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Causes {
    /// When the job was made (the fault was read just before); `None` when
    /// nobody listens.
    started: Option<Instant>,
    /// When it was last handed to the worker pool.
    queued_at: Option<Instant>,
    /// Waiting for a worker.
    pub queued: Duration,
    /// Waiting for an invalidation over its window to end.
    pub waited: Duration,
    /// Waiting for the install lock.
    pub lock: Duration,
    /// Filling the window from its origin.
    pub fill: Duration,
    /// The install ioctls (copies into guest RAM).
    pub install: Duration,
}

impl Causes {
    /// Causes measured for `span` if anyone listens to it.
    pub fn for_span(span: &tracing::Span) -> Self {
        Causes { started: (!span.is_disabled()).then(Instant::now), ..Causes::default() }
    }

    /// The clock, if measuring.
    pub fn now(&self) -> Option<Instant> {
        self.started.map(|_| Instant::now())
    }

    /// Adds the time since `since` (from [`Self::now`]) to `slot`.
    pub fn since(slot: &mut Duration, since: Option<Instant>) {
        if let Some(t) = since {
            *slot += t.elapsed();
        }
    }

    /// The job goes to the worker pool now.
    pub fn queue(&mut self) {
        self.queued_at = self.now();
    }

    /// A worker took the job.
    pub fn dequeue(&mut self) {
        Self::since(&mut self.queued, self.queued_at.take());
    }

    /// Records the causes on the fault's span, if it was slow enough to be
    /// worth it.
    pub fn record(&self, span: &tracing::Span) {
        if self.started.is_none_or(|t| t.elapsed() < CAUSES_FROM) {
            return;
        }
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        for (field, d) in [
            ("queued_ns", self.queued),
            ("waited_ns", self.waited),
            ("lock_ns", self.lock),
            ("fill_ns", self.fill),
            ("install_ns", self.install),
        ] {
            if !d.is_zero() {
                span.record(field, ns(d));
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Fault {
    pub page: usize,
}

impl Job {
    /// A job over `window` of region `region`, claimed for the fault on
    /// `fault` (None: nobody waits on it yet), `writes` if a write asked
    /// for it. Its causes are measured when a fault's span is listened to.
    pub fn new(region: usize, fault: Option<usize>, window: Window, span: tracing::Span, writes: bool) -> Job {
        let causes = if fault.is_some() { Causes::for_span(&span) } else { Causes::default() };
        Job {
            region,
            fault: fault.map(|page| Fault { page }),
            window,
            span,
            attempts: 0,
            refunds: 0,
            reclaimed: false,
            causes,
            writes,
        }
    }
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job").field("region", &self.region).field("window", &self.window).finish_non_exhaustive()
    }
}

/// How the engine answers a fault on a page whose contents are lost (a
/// source that failed past its retries or panicked, a page the kernel
/// lost, any fault once the event loop has died).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// `UFFDIO_POISON`: an access gets SIGBUS.
    Poison,
    /// `UFFDIO_ZEROPAGE`, without `POISON`: the thread goes on, reading
    /// zeros, and the engine reports [`FaultError::ZeroFilled`]. Nothing
    /// else would let it go on at all.
    Zeros,
}

/// The engine has shut down (or its event loop died): the one answer of
/// [`Core::running`], which each layer above turns into its own error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stopped;

/// State shared by the event loop, the workers, pins, offlines and the
/// engine's handle. Its fields are private: the layers above go through
/// its methods.
pub(crate) struct Core {
    /// The descriptor, and every change to guest memory.
    mem: Box<dyn Install>,
    ram: Arc<GuestRam>,
    source: Arc<dyn PageSource>,
    store: Arc<EvictionStore>,
    notifier: Notifier,
    stats: Stats,
    config: Config,
    errors: Sender<FaultError>,
    /// Source of zeros for write faults on zero pages.
    zeros: Box<[u8]>,
    /// Written by workers when the event loop has parked jobs, and by
    /// offlines when they end.
    kick: EventFd,
    parked_waiting: AtomicBool,
    /// The event loop holds deferred faults (see [`Core::kick_deferred`]).
    deferred_waiting: AtomicBool,
    /// Jobs being resolved (inline, queued, on a worker, replaying) or
    /// parked.
    in_flight: AtomicUsize,
    /// Set once, at shutdown or when the event loop dies: no new work.
    stopping: AtomicBool,
    working_set: Option<FirstTouches>,
    /// Told of every remove applied (see [`Core::set_on_remove`]).
    on_remove: Option<RemoveHook>,
    /// Asked to refill a dry huge-page pool (see [`Core::refill`]).
    on_no_memory: Option<NoMemoryHook>,
    /// Host ranges an offline is dropping itself (`MADV_DONTNEED` on an
    /// image): their remove events are its own, not a balloon's.
    own_discards: std::sync::Mutex<Vec<(u64, u64)>>,
}

/// A callback told of every guest range a remove event discarded.
pub type RemoveHook = Arc<dyn Fn(crate::ram::GuestRange) + Send + Sync>;

/// A callback asked to add pages to a huge-page pool an install found dry;
/// true if it did.
pub type NoMemoryHook = Arc<dyn Fn() -> bool + Send + Sync>;

impl Core {
    /// A core over `uffd` (guest RAM already registered with it), its
    /// failures going to `errors`.
    pub(crate) fn new(
        mem: Box<dyn Install>,
        ram: Arc<GuestRam>,
        source: Arc<dyn PageSource>,
        store: Arc<EvictionStore>,
        config: Config,
        errors: Sender<FaultError>,
    ) -> io::Result<Core> {
        let ram_pages = ram.pages();
        // Zeros for the largest window any region takes: a huge-page
        // region copies its zeros (there is no huge-page ZEROPAGE).
        let zeros = ram
            .regions()
            .iter()
            .map(|r| r.pages_len(window_cap(r, config.max_window)))
            .max()
            .unwrap_or(0)
            .max(config.max_window * PAGE_SIZE);
        Ok(Core {
            mem,
            ram,
            source,
            store,
            notifier: Notifier::with_ceiling(match config.offline_priority {
                OfflinePriority::Starter => {
                    rustix::process::getpriority_process(Some(rustix::thread::gettid())).ok()
                }
                OfflinePriority::Nice(nice) => Some(nice),
                OfflinePriority::Own => None,
            }),
            stats: Stats::default(),
            zeros: vec![0u8; zeros].into_boxed_slice(),
            kick: EventFd::new(EFD_NONBLOCK)?,
            parked_waiting: AtomicBool::new(false),
            deferred_waiting: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            working_set: config.record_working_set.then(|| FirstTouches::new(ram_pages)),
            on_remove: None,
            on_no_memory: None,
            own_discards: std::sync::Mutex::new(Vec::new()),
            errors,
            config,
        })
    }

    /// Sets the callback told of every remove applied, before the core is
    /// shared.
    pub(crate) fn set_on_remove(&mut self, hook: Option<RemoveHook>) {
        self.on_remove = hook;
    }

    /// Sets the callback asked to refill a dry pool, before the core is
    /// shared.
    pub(crate) fn set_on_no_memory(&mut self, hook: Option<NoMemoryHook>) {
        self.on_no_memory = hook;
    }

    /// An install found the huge-page pool dry: asks the embedder's
    /// callback, if one is set, to add pages. True if it says it did (then
    /// a retry may succeed at once). Called by workers (the callback may
    /// take a lock file and write to `/proc`), and on the event loop only
    /// where it resolves a job itself because the park is full, a path
    /// that may block anyway (see `FaultLoop::park`).
    pub(crate) fn refill(&self) -> bool {
        let refilled = self.on_no_memory.as_ref().is_some_and(|hook| hook());
        if refilled {
            self.stats.pool_refills.add(1);
        }
        refilled
    }

    /// A remove discarded `range`: tells the callback, if one is set. Called
    /// right after the event is read, with installs held off, so it must
    /// be quick.
    pub(crate) fn removed(&self, range: crate::ram::GuestRange) {
        if let Some(hook) = &self.on_remove {
            hook(range);
        }
    }

    /// An offline is about to drop host range `start..end` itself: the
    /// remove event its `madvise` raises is not a discard of the guest's.
    /// Call [`Self::own_discard_done`] after the `madvise` returns.
    pub(crate) fn own_discard_begin(&self, start: u64, end: u64) {
        self.own_discards.lock().unwrap_or_else(|e| e.into_inner()).push((start, end));
    }

    /// The `madvise` of [`Self::own_discard_begin`] returned. If it raised
    /// its remove event (`raised`: it succeeded), the event has been read,
    /// and the event loop claims the range once it looks at the batch:
    /// wait for that (bounded by `deadline`), so that no claim is left
    /// behind for a later discard of the same range to be mistaken for.
    pub(crate) fn own_discard_done(&self, start: u64, end: u64, raised: bool, deadline: Instant) {
        loop {
            let mut own = self.own_discards.lock().unwrap_or_else(|e| e.into_inner());
            let Some(i) = own.iter().position(|r| *r == (start, end)) else { return };
            if !raised || Instant::now() >= deadline || self.stopping.load(Ordering::Acquire) {
                own.swap_remove(i);
                return;
            }
            drop(own);
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    /// Whether the remove event of `start..end` is an offline's own
    /// discard (each announced range is claimed by one event). A balloon's
    /// discard of exactly the same range at the same moment may claim it
    /// instead: the offline's own then reads as the balloon's, and the
    /// pages read zeros, which is what the balloon asked for.
    pub(crate) fn take_own_discard(&self, start: u64, end: u64) -> bool {
        let mut own = self.own_discards.lock().unwrap_or_else(|e| e.into_inner());
        match own.iter().position(|r| *r == (start, end)) {
            Some(i) => {
                own.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// The userfaultfd: events, registration, failpoints.
    pub(crate) fn uffd(&self) -> &Uffd {
        self.mem.uffd()
    }

    /// The install/take-out interface: every change to guest memory goes
    /// through it.
    pub(crate) fn mem(&self) -> &dyn Install {
        &*self.mem
    }

    /// The guest RAM served.
    pub(crate) fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Where pages with origin `Source` come from.
    pub(crate) fn source(&self) -> &dyn PageSource {
        &*self.source
    }

    /// Where evicted pages are kept.
    pub(crate) fn store(&self) -> &Arc<EvictionStore> {
        &self.store
    }

    /// The invalidation sequence, the install lock and the pin registry.
    pub(crate) fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// The counters, to add to.
    pub(crate) fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The configuration the engine was built with.
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// The largest window (in its pages) for region `region`: the
    /// configured one for small pages, [`HUGE_WINDOW`] at most for huge.
    pub(crate) fn window_cap(&self, region: usize) -> usize {
        window_cap(&self.ram.regions()[region], self.config.max_window)
    }

    /// Zeros for the largest window of any region, to COPY from.
    pub(crate) fn zeros(&self) -> &[u8] {
        &self.zeros
    }

    /// The liveness check: `Err(Stopped)` once the engine shuts down or its
    /// event loop dies, after which nothing starts new work.
    pub(crate) fn running(&self) -> Result<(), Stopped> {
        if self.stopping.load(Ordering::Acquire) {
            Err(Stopped)
        } else {
            Ok(())
        }
    }

    /// Refuses new work from now on (see [`Core::running`]).
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// The event the event loop watches for kicks (parked jobs, deferred
    /// faults).
    pub(crate) fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// Consumes pending kicks.
    pub(crate) fn clear_kick(&self) {
        let _ = self.kick.read();
    }

    /// A job was made (claimed pages are now in flight).
    pub(crate) fn job_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    /// A job let go of every page it claimed.
    pub(crate) fn job_finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Jobs resolving, queued or parked.
    pub(crate) fn jobs_in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The event loop has parked jobs (true) or sent them all (false).
    pub(crate) fn set_parked(&self, parked: bool) {
        self.parked_waiting.store(parked, Ordering::SeqCst);
    }

    /// A worker finished a job: the event loop, if it parked some, may send
    /// them now.
    pub(crate) fn kick_if_parked(&self) {
        if self.parked_waiting.load(Ordering::SeqCst) {
            let _ = self.kick.write(1);
        }
    }

    /// Records the page at `gpa` (the `index`th page of guest RAM) in the
    /// working set, if one is being recorded and this is its first touch.
    pub(crate) fn record_touch(&self, index: usize, gpa: u64) {
        if let Some(ws) = &self.working_set {
            ws.record(index, gpa);
        }
    }

    /// Records the pages of a fault's window (claimed for it) after its
    /// faulting page: what a replay must install for that fault not to
    /// come again.
    pub(crate) fn record_window(&self, region: usize, window: &Window) {
        if self.working_set.is_none() {
            return;
        }
        let r = &self.ram.regions()[region];
        for &Run { first, count } in window.iter() {
            for page in first..first + count {
                let index = self.ram.page_index(crate::ram::PageLoc { region, page });
                self.record_touch(index, r.page_gpa(page).0);
            }
        }
    }

    /// The pages recorded so far, in order, with the milliseconds from the
    /// start of recording to each (empty unless recording).
    pub(crate) fn touched_pages(&self) -> Vec<(u64, u32)> {
        self.working_set.as_ref().map(FirstTouches::touches).unwrap_or_default()
    }

    /// Has the event loop look at faults an offline deferred, if it has
    /// any: a wake of the event loop's thread costs the other core tens of
    /// microseconds, and an offline ends a chunk hundreds of times a
    /// second. Call after the pages' final states are set.
    pub(crate) fn kick_deferred(&self) {
        // Pairs with `defer_noted`: either the event loop sees the new
        // states when it looks again, or this sees its flag.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.deferred_waiting.load(Ordering::SeqCst) {
            let _ = self.kick.write(1);
        }
    }

    /// The event loop is about to defer a fault: kicks from now on reach
    /// it. It must look at the page's state again after this.
    pub(crate) fn defer_noted(&self) {
        self.deferred_waiting.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// The event loop took every deferred fault to look at again.
    pub(crate) fn deferred_taken(&self) {
        self.deferred_waiting.store(false, Ordering::SeqCst);
    }

    /// Reports a failure through the engine's bounded error queue; one that
    /// does not fit is counted in `errors_dropped`.
    pub(crate) fn report(&self, err: FaultError) {
        tracing::warn!(target: "apf", error = %err, "apf fault error");
        if self.errors.try_send(err).is_err() {
            self.stats.errors_dropped.add(1);
        }
    }

    /// Wakes the threads waiting on `[host, host + len)`. A thread nobody
    /// wakes waits for ever, so a failed wake is tried again before it is
    /// reported.
    pub(crate) fn wake(&self, host: u64, len: usize) {
        let mut last = None;
        for _ in 0..WAKE_TRIES {
            match self.mem.wake(host, len) {
                Ok(()) => return,
                Err(e) => last = Some(e),
            }
        }
        if let (Some(error), Some(loc)) = (last, self.ram.locate_host(host)) {
            self.report(FaultError::Install { gpa: self.ram.region(loc).page_gpa(loc.page), error });
        }
    }

    /// How this engine answers a page whose contents are lost.
    pub(crate) fn give_up(&self) -> GiveUp {
        if self.mem.supports(MemOp::Poison) {
            GiveUp::Poison
        } else {
            GiveUp::Zeros
        }
    }

    /// Gives up on the missing pages at `[host, host + len)` the way
    /// [`Core::give_up`] says: poisons them, or installs zeros. Waiters are
    /// woken either way. `EEXIST`: a page is present there.
    ///
    /// # Safety
    ///
    /// Pages of guest RAM, which no Rust reference ever points into (see
    /// `crate::ram`).
    pub(crate) unsafe fn give_up_on(&self, host: u64, len: usize) -> Result<usize, IoctlError> {
        match self.give_up() {
            // SAFETY: the caller's contract.
            GiveUp::Poison => unsafe { self.mem.poison(host, len) },
            // Huge pages have no ZEROPAGE: their zeros are copied.
            // SAFETY: the caller's contract; the zero buffer holds at least
            // a page of any region.
            GiveUp::Zeros if len > PAGE_SIZE => unsafe { self.mem.copy(host, self.zeros.as_ptr(), len, false) },
            // SAFETY: the caller's contract.
            GiveUp::Zeros => unsafe { self.mem.zeropage(host, len, false) },
        }
    }

    /// Reports `err` about the page at `gpa`, wrapped in
    /// [`FaultError::ZeroFilled`] if the page was given zeros.
    pub(crate) fn report_given_up(&self, gpa: GuestAddress, zeroed: bool, err: FaultError) {
        self.report(if zeroed { FaultError::ZeroFilled { gpa, why: Box::new(err) } } else { err });
    }

    /// Reports a transition that found its page in the wrong state.
    pub(crate) fn checked(&self, transition: Result<(), StateError>) {
        if let Err(e) = transition {
            self.report(FaultError::State(e));
        }
    }

    /// Poisons every page not present, in runs; pages the kernel already
    /// has (populated behind the engine's back) are skipped. Returns the
    /// pages poisoned.
    pub(crate) fn poison_unresolved(&self) -> u64 {
        if self.give_up() != GiveUp::Poison {
            // Without `POISON`, pages never touched are left to the
            // kernel: zeros once the descriptor is gone.
            return 0;
        }
        let uffd = self.mem();
        let mut poisoned = 0;
        for (i, r) in self.ram.regions().iter().enumerate() {
            let unresolved = |p: usize| matches!(r.state(p).0, PageState::Missing | PageState::Resolving);
            for (start, end) in self.holes_of(i, runs(r.pages(), unresolved)) {
                let mut at = start;
                while at < end {
                    // SAFETY: pages of guest RAM, which no Rust reference
                    // ever points into (see `crate::ram`).
                    match unsafe { uffd.poison(r.page_host(at), r.pages_len(end - at)) } {
                        Ok(n) => {
                            poisoned += (n >> r.page_shift()) as u64;
                            at = end;
                        }
                        Err(e) => {
                            poisoned += (e.done >> r.page_shift()) as u64;
                            // Skip the page that stopped it (present, most likely).
                            at += (e.done >> r.page_shift()) + 1;
                        }
                    }
                }
            }
        }
        poisoned
    }

    /// The parts of `runs` (page index runs of region `region`) that hold
    /// nothing: all of them, but on shared memory only the holes of its
    /// page cache (a page a discard kept is the guest's, whatever the
    /// engine's state says).
    fn holes_of(&self, region: usize, runs: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
        if !self.ram.kind().page_cache_is_truth() {
            return runs;
        }
        if self.ram.kind() == crate::ram::MemoryKind::SharedHugetlb {
            return self.huge_holes_of(region, runs);
        }
        let mut out = Vec::new();
        for (start, end) in runs {
            // Where the kernel cannot say, nothing is poisoned: poisoning
            // a kept page would lose it.
            if let Some(Ok(file)) = self.ram.file_runs(region, start, end - start) {
                out.extend(file.into_iter().filter(|r| !r.2).map(|r| (r.0, r.1)));
            }
        }
        out
    }

    /// [`Core::holes_of`] on shared huge pages, whose page cache the
    /// kernel cannot be asked about: each page is mapped with `CONTINUE`
    /// if the page cache holds it (it is then the guest's, and present),
    /// and is a hole if `CONTINUE` finds nothing (`EFAULT`).
    fn huge_holes_of(&self, region: usize, runs: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
        let r = &self.ram.regions()[region];
        let mut out: Vec<(usize, usize)> = Vec::new();
        for (start, end) in runs {
            for p in start..end {
                // SAFETY: a page of guest RAM, which no Rust reference ever
                // points into (see `crate::ram`).
                let res = unsafe { self.mem.continue_pages(r.page_host(p), r.page_size(), false) };
                if matches!(res, Err(e) if e.errno == libc::EFAULT) {
                    match out.last_mut() {
                        Some(run) if run.1 == p => run.1 += 1,
                        _ => out.push((p, p + 1)),
                    }
                }
            }
        }
        out
    }

    /// Whether a job of `pages` small pages' worth runs on the event-loop
    /// thread.
    pub(crate) fn inline_ok(&self, pages: usize) -> bool {
        match self.config.dispatch {
            Dispatch::Inline => true,
            Dispatch::Workers => false,
            Dispatch::Auto => self.source.kind() != SourceKind::Blocking && pages <= self.config.inline_max_pages,
        }
    }

    /// Gives the claimed pages of `runs` back (`Resolving -> Missing`) and
    /// wakes them, so any thread deduped onto them faults again and gets a
    /// new resolver: nothing waits on an abandoned window.
    pub(crate) fn release_runs(&self, region: usize, runs: &[Run]) {
        let r = &self.ram.regions()[region];
        for &Run { first, count } in runs {
            for p in first..first + count {
                self.checked(r.release(p));
            }
            self.wake(r.page_host(first), r.pages_len(count));
        }
    }
}

/// The largest window (in its pages) for `region`, given the configured
/// `max_window` (in small pages).
fn window_cap(region: &crate::ram::Region, max_window: usize) -> usize {
    if region.is_huge() {
        max_window.min(HUGE_WINDOW)
    } else {
        max_window
    }
}

/// The working set being recorded: each page's first touch, in order,
/// once. Bounded by the RAM's page count: a page faulted again (after a
/// discard or an offline) is not recorded again, which is what a replay of
/// first touches wants.
pub(crate) struct FirstTouches {
    /// One bit per page of guest RAM, in `GuestRam` page order.
    seen: Box<[AtomicU64]>,
    /// Guest address and milliseconds since `started` of each first touch.
    order: Mutex<Vec<(u64, u32)>>,
    started: Instant,
}

impl FirstTouches {
    fn new(pages: usize) -> Self {
        FirstTouches {
            seen: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            order: Mutex::new(Vec::new()),
            started: Instant::now(),
        }
    }

    /// Records the page at `gpa` (the `index`th page of guest RAM) if this
    /// is its first touch.
    fn record(&self, index: usize, gpa: u64) {
        let Some(word) = self.seen.get(index / 64) else { return };
        let bit = 1u64 << (index % 64);
        if word.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            let ms = u32::try_from(self.started.elapsed().as_millis()).unwrap_or(u32::MAX);
            self.order.lock().unwrap_or_else(|e| e.into_inner()).push((gpa, ms));
        }
    }

    fn touches(&self) -> Vec<(u64, u32)> {
        self.order.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The text of a panic's payload.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => format!("panic: {s}"),
        (_, Some(s)) => format!("panic: {s}"),
        _ => "panic".into(),
    }
}
