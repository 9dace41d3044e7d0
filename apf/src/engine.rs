//! The engine's front: [`Engine`] and its builder, which put the layers
//! below together (the core, the fault path, pins, offline) and are the
//! only way in from the crate's API.
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
//! Module map: `fault` reads events, dedupes and dispatches (`event_loop`)
//! and plans windows per thread (`prefetch`); `core::resolve` fills and
//! installs one claimed window, with the kernel's return conventions.
//!
//! # Shutdown
//!
//! Stop the threads that touch guest RAM first, then drop the engine (or call
//! [`Engine::shutdown`]). The engine stops its event loop, lets its workers
//! finish what they hold, then poisons every page that is still missing:
//! a thread that touches one afterwards gets SIGBUS instead of silently
//! reading zeros (which is what closing a userfaultfd would give it).
//! On the limited backend ([`Backend::Limited`]), which has no
//! `UFFDIO_POISON`, such pages are left to the kernel: zeros.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{Backend, Config, UnplugPolicy};
use crate::core::install::{self, MemOp};
use crate::core::resolve;
use crate::core::{Core, FaultError, Job, Stopped};
use crate::counters::StatsSnapshot;
use crate::fault::SpawnError;
use crate::working_set::{ImageId, WorkingSet};
use crate::notifier::InvalidateEvent;
use crate::offline::{Mode, OfflineError, OfflineReport, Staging, STAGING_PAGES};
use crate::pin::{HardPin, PageRef, Pin, PinError};
use crate::ram::{GuestAddress, GuestRam, GuestRange, RamError, RemoteRegion};
use crate::source::{EvictionStore, PageSource};
use crate::uffd::{Features, RegisterMode, Uffd, UffdError};

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
    /// The page map of the process that owns remote memory cannot be read
    /// ([`RemoteMemory::with_owner`]).
    #[error("cannot read the page map of process {pid} (2 MiB pages of another process need it to tell a dry huge-page pool from a page that is there)")]
    OwnerUnreadable {
        /// The process.
        pid: u32,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The engine has shut down.
    #[error("the engine has shut down")]
    Stopped,
    /// Too much of this kind of work is running already.
    #[error("too many {0}; try again when one has finished")]
    Busy(&'static str),
}

impl From<Stopped> for EngineError {
    fn from(_: Stopped) -> Self {
        EngineError::Stopped
    }
}

impl From<SpawnError> for EngineError {
    fn from(e: SpawnError) -> Self {
        match e {
            SpawnError::EventManager(e) => EngineError::EventManager(e),
            SpawnError::Io(e) => EngineError::Io(e),
        }
    }
}

/// Working-set replays that may run at once.
pub const MAX_REPLAYS: usize = 4;

/// The slices of a recording, in milliseconds, within which a replay
/// installs the set in address order (see [`WorkingSet`]'s replay order):
/// short beside a restored guest's run, long beside one window's install.
const REPLAY_SLICE_MS: u32 = 5;

/// The nice value of a replay's thread: the lowest priority.
const REPLAY_NICE: i32 = 19;

/// How a working-set replay paces itself ([`Engine::replay_with`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplayOptions {
    /// Largest window, in pages (default 16: 64 KiB); capped by
    /// [`Config::max_window`]. A fault waits behind at most one.
    pub window_pages: usize,
    /// Share of one CPU the replay may use, in (0, 1] (default 0.5).
    pub cpu_share: f64,
    /// After the set, fill every page still missing (default off).
    pub eager: bool,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions { window_pages: 16, cpu_share: 0.5, eager: false }
    }
}

/// Builds an [`Engine`].
pub struct EngineBuilder {
    ram: Arc<GuestRam>,
    source: Arc<dyn PageSource>,
    store: Option<Arc<EvictionStore>>,
    config: Config,
    /// The descriptor of [`RemoteMemory`] (none: the engine opens its own).
    adopted: Option<Uffd>,
    on_remove: Option<crate::core::RemoveHook>,
    on_no_memory: Option<crate::core::NoMemoryHook>,
}

impl fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("ram", &self.ram)
            .field("config", &self.config)
            .field("adopted", &self.adopted)
            .field("on_remove", &self.on_remove.is_some())
            .field("on_no_memory", &self.on_no_memory.is_some())
            .finish_non_exhaustive()
    }
}

/// Guest memory of another process, served through the userfaultfd that
/// process set up and handed over: what an external page-fault handler
/// gets from Firecracker (its handshake's regions and its descriptor).
///
/// The engine built on it ([`Engine::remote`]) resolves faults through
/// that descriptor alone, addressed by the owner's host addresses; it maps
/// nothing of the memory, never reads or writes it directly, and refuses
/// whatever would: [`Engine::pin`], [`Engine::page_ref`],
/// [`Engine::hard_pin`] ([`PinError::Remote`]), every offline and
/// [`Engine::replug`] ([`OfflineError::Remote`]). What the descriptor
/// lacks, the engine does without:
///
/// - no `THREAD_ID`: prefetch streams are told apart by address, not by
///   thread;
/// - no `POISON`: a page whose contents are lost gets zeros and a
///   [`FaultError::ZeroFilled`] report, so the faulting thread never waits
///   for ever (deciding whether the owner may go on is the caller's job);
///   at shutdown, untouched pages are left to the kernel;
/// - never `MOVE`, whatever the descriptor offers: a staging area would
///   have to live in the owner's address space.
///
/// [`Config::backend`] does not apply: the descriptor is the backend.
#[derive(Debug)]
pub struct RemoteMemory {
    uffd: Uffd,
    ram: Arc<GuestRam>,
}

impl RemoteMemory {
    /// Adopts `uffd`, a userfaultfd that its sender created, handshook and
    /// registered over `regions` (MISSING mode), and received here, for
    /// instance over `SCM_RIGHTS`. Fails if it is not an initialized
    /// userfaultfd ([`UffdError::NotUserfaultfd`]) or the regions are not
    /// ones the engine can serve ([`GuestRam::remote`]).
    pub fn adopt(uffd: std::os::fd::OwnedFd, regions: &[RemoteRegion]) -> Result<RemoteMemory, EngineError> {
        let ram = Arc::new(GuestRam::remote(regions)?);
        let uffd = Uffd::adopt(uffd)?;
        Ok(RemoteMemory { uffd, ram })
    }

    /// Names the process the memory lives in (the sender: for a
    /// connection, its `SO_PEERCRED` pid). On huge pages the engine reads
    /// that process's page map (`/proc/<pid>/pagemap`, which needs the
    /// right to trace it) to tell a `COPY` that met a dry pool (`EEXIST`
    /// with nothing mapped) from a page that is there, and an engine over
    /// another process's huge pages refuses to start without it. Fails with
    /// [`EngineError::OwnerUnreadable`] if the page map cannot be opened.
    pub fn with_owner(self, pid: u32) -> Result<RemoteMemory, EngineError> {
        std::fs::File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|source| EngineError::OwnerUnreadable { pid, source })?;
        self.ram.set_remote_owner(pid);
        Ok(self)
    }

    /// What the sender negotiated for the descriptor.
    pub fn features(&self) -> Features {
        self.uffd.features()
    }

    /// The memory, as the engine will see it.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Says that `range` was discarded by a remove event a previous
    /// handler of this descriptor read (see [`EngineBuilder::on_remove`]):
    /// its missing pages are served as zeros, not from the source. Pages
    /// already present are left to the kernel (an install meets `EEXIST`).
    /// Call before the engine starts.
    pub fn mark_removed(&self, range: GuestRange) -> Result<(), RamError> {
        let (loc, count) = self.ram.check_range(range)?;
        let region = self.ram.region(loc);
        for page in loc.page..loc.page + count {
            region.mark_removed(page);
        }
        Ok(())
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

    /// Has `hook` told of every guest range a remove event (a balloon's
    /// `MADV_DONTNEED`) discards, right after the event is read and before
    /// anything else is installed: what a supervisor keeps so that a
    /// handler started after this one died knows which pages read zeros
    /// ([`RemoteMemory::mark_removed`]). It runs with installs held off:
    /// keep it short (set bits in a bitmap).
    pub fn on_remove(mut self, hook: impl Fn(GuestRange) + Send + Sync + 'static) -> Self {
        self.on_remove = Some(Arc::new(hook));
        self
    }

    /// Has `refill` asked to add pages when an install finds the huge-page
    /// pool dry (a `MAP_NORESERVE` mapping, or a pool a host memory-block
    /// offline shrank by dissolving its free pages), before the engine
    /// retries the page and, failing that, poisons it
    /// ([`FaultError::NoMemory`]). Return true if pages were added:
    /// [`hugepool::HugePool::top_up`](crate::hugepool::HugePool::top_up)
    /// grows the pool back to what the machine's reservations hold. Runs on
    /// a worker (rarely on the event loop: see [`Config::park_capacity`]),
    /// at most [`Config::fill_retries`] times per fault, and once per page
    /// of a migrate's copy-back; it may block briefly (bound it with a
    /// deadline).
    pub fn on_no_memory(mut self, refill: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.on_no_memory = Some(Arc::new(refill));
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
    shared: Arc<Core>,
    /// Where offlines move pages through (`None` without `UFFDIO_MOVE`).
    staging: Option<Staging>,
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
        f.debug_struct("Engine").field("ram", self.shared.ram()).field("config", self.shared.config()).finish()
    }
}

impl Engine {
    /// Starts building an engine that resolves faults on `ram` from `source`.
    pub fn builder(ram: Arc<GuestRam>, source: Arc<dyn PageSource>) -> EngineBuilder {
        EngineBuilder {
            ram,
            source,
            store: None,
            config: Config::default(),
            adopted: None,
            on_remove: None,
            on_no_memory: None,
        }
    }

    /// Starts building an engine that resolves faults on another process's
    /// memory from `source` (see [`RemoteMemory`] for what it does and
    /// refuses).
    pub fn remote(mem: RemoteMemory, source: Arc<dyn PageSource>) -> EngineBuilder {
        EngineBuilder {
            ram: mem.ram,
            source,
            store: None,
            config: Config::default(),
            adopted: Some(mem.uffd),
            on_remove: None,
            on_no_memory: None,
        }
    }

    fn start(b: EngineBuilder) -> Result<Engine, EngineError> {
        let config = b.config;
        if config.workers == 0 || config.workers > 64 {
            return Err(EngineError::Config("workers must be between 1 and 64"));
        }
        if config.max_window == 0 || config.max_window > 4096 {
            return Err(EngineError::Config("max_window must be between 1 and 4096 pages"));
        }
        if config.image_window == 0 || config.image_window > 4096 {
            return Err(EngineError::Config("image_window must be between 1 and 4096 pages"));
        }
        if config.queue_depth == 0 || config.park_capacity == 0 || config.error_capacity == 0 {
            return Err(EngineError::Config("queue_depth, park_capacity and error_capacity must be positive"));
        }
        if config.backend == Backend::Limited && config.unplug_policy == UnplugPolicy::Poison {
            return Err(EngineError::Config("the poison unplug policy needs UFFDIO_POISON, which the limited backend lacks"));
        }
        let remote = b.adopted.is_some();
        let kind = b.ram.kind();
        let mem = match b.adopted {
            // Registered by its sender, in its own address space.
            Some(uffd) => install::remote(uffd),
            None => match install::open(config.backend, kind)? {
                Some(mem) => mem,
                None => return Err(EngineError::Config("the limited backend serves private anonymous memory only")),
            },
        };
        if kind.is_image() && !mem.supports(MemOp::Continue) {
            return Err(EngineError::Config("image RAM needs UFFDIO_CONTINUE"));
        }
        if kind.is_image() && !b.ram.is_image_source(&b.source) {
            // Reads map the image's pages in place: any other source
            // would disagree with them on write faults.
            return Err(EngineError::Config("image RAM is served from its image: pass GuestRam::image_source()"));
        }
        // The fault path installs and wakes with nothing else: every
        // backend must offer these.
        // (Huge pages have no ZEROPAGE: their zeros are copied.)
        let zeropage = !b.ram.regions().iter().any(|r| r.is_huge());
        if ![MemOp::Copy, MemOp::Wake].into_iter().all(|op| mem.supports(op))
            || (zeropage && !mem.supports(MemOp::ZeroPage))
        {
            return Err(EngineError::Config("the backend must offer UFFDIO_COPY, UFFDIO_ZEROPAGE and UFFDIO_WAKE"));
        }
        if let Some(huge) = b.ram.regions().iter().find(|r| r.is_huge()) {
            if remote && b.ram.remote_owner().is_none() {
                // A dry pool there answers `COPY` with `EEXIST`, nothing
                // mapped: only the owner's page map tells it from a page
                // that is there, and believed, it would leave the faulting
                // thread faulting for ever.
                return Err(EngineError::Config(
                    "2 MiB pages of another process need their owner named (RemoteMemory::with_owner)",
                ));
            }
            mem.uffd().set_page_size(huge.page_size());
        }
        if remote && config.unplug_policy == UnplugPolicy::Poison && !mem.supports(MemOp::Poison) {
            return Err(EngineError::Config("the poison unplug policy needs UFFDIO_POISON, which this descriptor lacks"));
        }
        if !remote {
            for r in b.ram.regions() {
                // Write protection is what offlines without MOVE keep
                // writes with; a kernel refusing it on this memory only
                // loses those offlines.
                let with_wp = mem.supports(MemOp::WriteProtect)
                    && mem.uffd().register(r.host_base(), r.len(), kind.register_mode() | RegisterMode::WP).is_ok();
                if !with_wp {
                    mem.no_write_protect();
                    mem.uffd().register(r.host_base(), r.len(), kind.register_mode())?;
                }
            }
        }
        let staging = if mem.supports(MemOp::Move) {
            Some(Staging::new(mem.uffd(), STAGING_PAGES).map_err(|e| EngineError::Io(io::Error::other(e)))?)
        } else {
            None
        };
        let (err_tx, err_rx) = crossbeam_channel::bounded(config.error_capacity);
        let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(config.queue_depth);
        let store = b.store.unwrap_or_default();
        let mut core = Core::new(mem, b.ram, b.source, store, config, err_tx).map_err(EngineError::Io)?;
        core.set_on_remove(b.on_remove);
        core.set_on_no_memory(b.on_no_memory);
        let shared = Arc::new(core);
        let stop = EventFd::new(EFD_NONBLOCK).map_err(EngineError::Io)?;

        let mut workers = Vec::new();
        for i in 0..shared.config().workers {
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
        let event_loop = crate::fault::spawn(shared.clone(), job_tx.clone(), stop.try_clone().map_err(EngineError::Io)?)?;
        if remote {
            // Faults a previous handler of this descriptor read and never
            // answered are not delivered again: wake every waiter, so each
            // faults anew and reaches this engine (one whose page is
            // present meanwhile just goes on).
            for r in shared.ram().regions() {
                shared.wake(r.host_base(), r.len() as usize);
            }
        }
        Ok(Engine {
            shared,
            staging,
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
        let mut stats = self.shared.stats().snapshot();
        (stats.priority_raises, stats.priority_raises_refused) = self.shared.notifier().raises();
        stats
    }

    /// Failures reported while running (bounded; see
    /// [`StatsSnapshot::errors_dropped`]).
    pub fn errors(&self) -> &Errors {
        &self.errors
    }

    /// The guest RAM this engine serves.
    pub fn ram(&self) -> &Arc<GuestRam> {
        self.shared.ram()
    }

    /// The eviction store pages are restored from.
    pub fn store(&self) -> &Arc<EvictionStore> {
        self.shared.store()
    }

    /// The failpoints of this engine's userfaultfd (feature `failpoints`).
    #[cfg(feature = "failpoints")]
    pub fn failpoints(&self) -> &Arc<crate::failpoints::FailPoints> {
        self.shared.uffd().failpoints()
    }

    /// The negotiated userfaultfd features.
    pub fn features(&self) -> Features {
        self.shared.uffd().features()
    }

    /// The pages first touched so far, in order, with when (empty unless
    /// [`Config::record_working_set`] is on). Each fault records its
    /// faulting page and the rest of the window it installed: what a replay
    /// must install for the fault not to come again. A window's pages the
    /// guest never touches inflate the set; record with `max_window: 1` and
    /// `fault_around: 1` for touched pages only.
    pub fn working_set(&self) -> WorkingSet {
        let touches = self.shared.touched_pages();
        WorkingSet { pages: touches.iter().map(|t| t.0).collect(), at_ms: touches.iter().map(|t| t.1).collect() }
    }

    /// The id that binds a working set to this engine's image: the RAM's
    /// extent and a fingerprint of pages sampled from the source (see
    /// [`ImageId`]). Reads those pages from the source.
    pub fn image_id(&self) -> Result<ImageId, crate::source::SourceError> {
        ImageId::of(self.shared.source(), self.shared.ram())
    }

    /// Installs every still-missing page of `range` now, on the calling
    /// thread, in windows of at most `max_window` pages. Returns the pages
    /// this call installed. Pages other resolvers hold are left to them.
    pub fn prefetch(&self, range: GuestRange) -> Result<u64, EngineError> {
        if self.shut_down {
            return Err(EngineError::Stopped);
        }
        self.shared.running()?;
        let (loc, count) = self.shared.ram().check_range(range)?;
        Ok(resolve::prefetch_pages(&self.shared, (loc.page..loc.page + count).map(|p| (loc.region, p)), None))
    }

    /// Replays a recorded working set as prefetch on a background thread,
    /// in recorded order; pages outside RAM are skipped. The thread stops
    /// early when the engine shuts down.
    pub fn replay(&self, ws: &WorkingSet) -> Result<(), EngineError> {
        self.replay_with(ws, ReplayOptions::default())
    }

    /// [`Self::replay`], paced by `options`: the background fill installs
    /// the set in recorded order (in address order within slices of 5 ms
    /// of the recording, so that pages touched about together and lying
    /// next to each other share a window), in windows of at most
    /// `options.window_pages`. It gives way to demand: before each window
    /// it waits (up to 5 ms) while a fault is pending (read and not yet
    /// served, or not yet read), and it sleeps once per millisecond of
    /// busy time so that it uses at most `options.cpu_share` of a CPU;
    /// below a whole CPU, on a thread of the lowest priority (nice 19),
    /// which the scheduler runs on what demand (the event loop, the vCPUs)
    /// leaves over (a fill at a whole CPU is one a restore waits for
    /// before it starts the guest, and keeps its priority). A fault on a
    /// page the fill holds waits for that one window at most. A fill that
    /// finds 4 pages of the
    /// set in a row already taken is behind the guest, which faults on
    /// the pages it is about to install: it goes on 256 pages further,
    /// ahead of the guest, and goes over the pages it passed at the end.
    /// Pages discarded or offlined meanwhile follow the notifier's rules
    /// like any prefetch: a page is installed only if it is still
    /// missing, from what its origin holds at that moment. With
    /// `options.eager`, every page still missing afterwards is filled too,
    /// in address order, at the same pace.
    pub fn replay_with(&self, ws: &WorkingSet, options: ReplayOptions) -> Result<(), EngineError> {
        if self.shut_down {
            return Err(EngineError::Stopped);
        }
        self.shared.running()?;
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
        let pages = ws.replay_order(REPLAY_SLICE_MS);
        let dispatch = crate::trace::current_dispatch();
        let h = std::thread::Builder::new()
            .name("apf-replay".into())
            .spawn(move || {
                let _trace = tracing::dispatcher::set_default(&dispatch);
                // Its waits for demand are tens of microseconds: with the
                // default slack of 50 µs each would last several times
                // that. Only a cost in wake-ups if refused.
                let _ = rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(1_000));
                // Demand first on the CPUs too: with the guest's vCPUs
                // keeping every core busy, a fill at the same priority took
                // the event loop's turn after each wake of a vCPU and sent
                // the fault p99 to milliseconds; at the lowest it runs on
                // what demand leaves idle. A fill at a whole CPU is one
                // somebody waits for (before the guest starts): at the
                // lowest priority, any other load of the machine would
                // hold it up. (Linux: the calling thread.)
                if options.cpu_share < 1.0 {
                    let _ = rustix::process::setpriority_process(None, REPLAY_NICE);
                }
                let pace = resolve::Pace { window: options.window_pages, cpu_share: options.cpu_share };
                let mut locs: Vec<_> = pages
                    .iter()
                    .filter_map(|&gpa| shared.ram().locate(GuestAddress(gpa)).ok())
                    .map(|l| (l.region, l.page))
                    .collect();
                // Recorded 4 KiB pages in a row that share one huge page
                // are one page here (and would look taken by demand).
                locs.dedup();
                let mut installed = resolve::replay_pages(&shared, &locs, pace);
                if options.eager {
                    let all = shared.ram().regions().iter().enumerate().flat_map(|(r, region)| (0..region.pages()).map(move |p| (r, p)));
                    installed += resolve::prefetch_pages(&shared, all, Some(pace));
                }
                shared.stats().replayed_pages.add(installed);
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
        self.local_for_pins(range)?;
        Pin::register(self.shared.clone(), range, callback)
    }

    /// Pins and references reach guest memory through this process's
    /// mapping of it: [`RemoteMemory`] has none.
    fn local_for_pins(&self, range: GuestRange) -> Result<(), PinError> {
        if self.shared.ram().is_remote() {
            return Err(PinError::Remote(range));
        }
        Ok(())
    }

    /// Offlines take pages out with `UFFDIO_MOVE` into a staging area of
    /// this process and find them through its page tables:
    /// [`RemoteMemory`] has neither.
    fn local_for_offline(&self, range: GuestRange) -> Result<(), OfflineError> {
        if self.shared.ram().is_remote() {
            return Err(OfflineError::Remote(range));
        }
        Ok(())
    }

    /// Takes a short-term reference on `range`, faulting it in first.
    /// Waits for an offline over the range to end, up to `deadline`.
    pub fn page_ref(&self, range: GuestRange, deadline: std::time::Instant) -> Result<PageRef, PinError> {
        self.shared.running()?;
        self.local_for_pins(range)?;
        PageRef::take(self.shared.clone(), range, deadline)
    }

    /// Takes a hard pin on `range` (legacy mode, see [`HardPin`]).
    pub fn hard_pin(&self, range: GuestRange, deadline: std::time::Instant) -> Result<HardPin, PinError> {
        self.shared.running()?;
        self.local_for_pins(range)?;
        HardPin::take(self.shared.clone(), range, deadline)
    }

    /// Pins (migratable and hard) registered right now.
    pub fn pins_registered(&self) -> usize {
        self.shared.notifier().intervals()
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
    /// 1. **The invalidation is announced.** From here no new reference is
    ///    granted on the range, and no other offline may overlap it; faults
    ///    on it are still served.
    /// 2. **The callbacks of the [`Pin`]s over the range are called**, on
    ///    this thread: their holders drop the kernel pins they made on the
    ///    memory and stop relying on it.
    /// 3. **Holders are waited for**, up to `deadline`: [`PageRef`]s and
    ///    [`HardPin`]s on the range (and, for an unplug, live
    ///    [`PinGuard`](crate::PinGuard)s), then another offline's use of
    ///    the engine's staging area. No new reference is granted on the
    ///    range meanwhile, so the wait cannot starve. A range still held at
    ///    the deadline fails with [`OfflineError::Busy`] (or
    ///    [`OfflineError::StagingBusy`]) and is left as it was. Nothing is
    ///    held yet, so a holder waited for here is never blocked by this
    ///    offline, whatever it touches. Then the pages are held: fills in
    ///    flight over the range are thrown away instead of installed, and
    ///    faults on it wait until step 5.
    /// 4. **The pages the kernel holds are acted on**, in chunks: taken out
    ///    of guest RAM in one step (a write landing afterwards faults and
    ///    waits; none is lost), then copied into fresh frames, copied into
    ///    the eviction store, or dropped, by mode. What the kernel holds is
    ///    what is acted on, whatever the engine believed: an unplug also
    ///    discards pages populated before the engine registered the memory.
    ///    Memory without `UFFDIO_MOVE` (shared memory, an image, huge
    ///    pages) is acted on in place: write-protected (a write waits),
    ///    copied out through the memfd (shared) or `/proc/self/mem`
    ///    (private) and punched or dropped, then copied back or left to
    ///    the store; an unplug punches (shared) or drops (`MADV_DONTNEED`,
    ///    private) the pages, huge pages whole. See [`Mode::offered_on`].
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
    ///   [`OfflineError::NotOffered`] (the engine's backend cannot take
    ///   pages out: no `MOVE`, and the memory kind offers no way in place,
    ///   see [`Mode::offered_on`]), [`OfflineError::SharedWithOthers`]
    ///   (`Migrate` or `Evict` of shared memory another process maps).
    ///   Nothing was done.
    /// - [`OfflineError::Busy`], [`OfflineError::StagingBusy`],
    ///   [`OfflineError::BlockBusy`] ([`OfflineError::is_busy`]): held past
    ///   the deadline. Nothing changed, except that when a page the kernel
    ///   keeps pinned stops the take-out part way, the chunks before it
    ///   are done (an unplug reports how many pages it discarded). A later
    ///   attempt may work.
    /// - [`OfflineError::Ioctl`]: a userfaultfd call failed past its
    ///   retries; the error names the call and the page it stopped at.
    /// - [`OfflineError::NoMemory`]: a migrate of huge pages found the
    ///   pool dry when it put a page back; its contents wait in the
    ///   eviction store for its next fault.
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
        self.local_for_offline(range)?;
        crate::offline::offline(&self.shared, self.staging.as_ref(), range, mode, deadline)
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
        self.local_for_offline(range)?;
        crate::offline::offline_any_host_block(&self.shared, range, attempt)
    }

    /// Brings pages unplugged under [`UnplugPolicy::Poison`] back, as
    /// zeros. Returns how many pages were brought back.
    pub fn replug(&self, range: GuestRange) -> Result<usize, OfflineError> {
        self.shared.running()?;
        self.local_for_offline(range)?;
        crate::offline::replug(&self.shared, self.staging.as_ref(), range)
    }

    /// Waits until no window is being resolved, queued or parked, and no
    /// replay is running, or until `deadline`. Returns false on timeout.
    /// Counters move after the install that wakes a faulting thread, so
    /// read them after this to see a fault's effects.
    pub fn wait_idle(&self, deadline: std::time::Instant) -> bool {
        loop {
            let replaying = self.replays.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|h| !h.is_finished());
            if self.shared.jobs_in_flight() == 0 && !replaying {
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
    /// (which is what closing a userfaultfd would give it). With
    /// [`Backend::Limited`](crate::Backend::Limited), which cannot poison,
    /// such pages are left for the kernel to fill with zeros.
    pub fn shutdown(mut self) -> ShutdownReport {
        self.stop_all()
    }

    fn stop_all(&mut self) -> ShutdownReport {
        if self.shut_down {
            return ShutdownReport::default();
        }
        self.shut_down = true;
        self.shared.stop();
        let _ = self.stop.write(1);
        let deadline = std::time::Instant::now() + self.shared.config().shutdown_deadline;
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
            crate::fault::serve_after_shutdown(self.shared.clone());
        }
        let poisoned_pages = self.poison_missing();
        // Remote memory stays registered: its registration is its owner's.
        if threads_left_behind == 0 && !self.shared.ram().is_remote() {
            for r in self.shared.ram().regions() {
                let _ = self.shared.uffd().unregister(r.host_base(), r.len());
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

