//! The engine's configuration: one [`Config`], handed to the builder whole.
//! A leaf: the layers above read it, nothing here knows them.

use std::time::Duration;

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
    /// Reads of an image ([`MemoryKind::Image`](crate::MemoryKind::Image))
    /// map the missing pages of the aligned block of this many pages around
    /// the faulting one, in order or at random: the image's pages are
    /// mapped in place (`UFFDIO_CONTINUE`), which allocates nothing, so a
    /// large block costs page-table entries only and saves faults. At most
    /// 4096; 1 maps the faulting page alone. On an image of huge pages
    /// ([`MemoryKind::HugetlbImage`](crate::MemoryKind::HugetlbImage)) the
    /// block is 8 huge pages (16 MiB; 1 still means the faulting page
    /// alone), and a first write is served the same way, the kernel's
    /// copy-on-write then copying the page in the faulting thread.
    pub image_window: usize,
    /// Where windows are resolved.
    pub dispatch: Dispatch,
    /// With [`Dispatch::Auto`], windows of more pages than this go to the
    /// worker pool. Counted in 4 KiB pages of copying: a huge page counts
    /// 512, and a read of an image, mapped in place, one per page.
    pub inline_max_pages: usize,
    /// How long the event loop keeps polling for the next fault before it
    /// sleeps in epoll (zero: sleep at once). It never spins while workers
    /// are installing: on a small machine they need the core. Nor on huge
    /// pages, where a thread faults again only after 2 MiB of work: there
    /// a spin took the core from the faulting threads and made an image
    /// restore's reads up to a third slower.
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
    /// Record the pages faulted, in order, as a [`WorkingSet`](crate::WorkingSet).
    pub record_working_set: bool,
    /// What accesses to unplugged memory get.
    pub unplug_policy: UnplugPolicy,
    /// How long shutdown waits for the engine's threads; a thread still
    /// busy then (in a page source that never returns) is left behind and
    /// reported, never waited for without end.
    pub shutdown_deadline: Duration,
    /// Which userfaultfd operations the engine uses to change guest memory.
    pub backend: Backend,
    /// The priority an offline is raised to while something waits for it.
    pub offline_priority: OfflinePriority,
}

/// The priority an offline is raised to while faults or pins wait for it
/// ([`Config::offline_priority`]).
///
/// A VMM often offlines from a background thread it runs at a low priority
/// (nice 19). While the offline holds pages, vCPUs that touch them wait
/// for it; Linux's mutexes and condition variables lend no priority
/// between nice levels, so on a busy machine such a thread can be kept off
/// the CPU for hundreds of milliseconds by the very vCPUs waiting for it.
/// So the first fault, read or pin that waits for an offline raises the
/// offline's thread to this priority, and the offline puts its thread's
/// own priority back when it ends: priority inheritance, done by the
/// waiter. An offline nobody waits for keeps its caller's priority and
/// competes with nobody. Raising a priority needs `CAP_SYS_NICE` (or a
/// `RLIMIT_NICE` that allows it); without it the offline runs at its own
/// priority and `priority_raises_refused` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OfflinePriority {
    /// The nice value of the thread that started the engine (the default:
    /// a VMM starts its engine from the thread its vCPUs share a priority
    /// with).
    #[default]
    Starter,
    /// This nice value.
    Nice(i32),
    /// Never raised: the offlining thread's own priority, whatever it is.
    Own,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workers: 2,
            max_window: 256,
            fault_around: 8,
            image_window: 512,
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
            backend: Backend::PrivateAnonymous,
            offline_priority: OfflinePriority::Starter,
        }
    }
}

/// What an access to unplugged memory gets: what follows a
/// [`Mode::Unplug`](crate::Mode::Unplug) of a range, for the whole engine
/// ([`Config::unplug_policy`](crate::Config::unplug_policy)).
///
/// Parsed from `"zero"` or `"poison"` (for command lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnplugPolicy {
    /// Zeros, like fresh memory: the next access to an unplugged page is
    /// served zeros, and the memory is usable again at once.
    #[default]
    Zero,
    /// SIGBUS: the pages are poisoned, so a thread touching them gets
    /// SIGBUS, and a
    /// [`Pin::get`](crate::Pin::get) or
    /// [`Engine::page_ref`](crate::Engine::page_ref) over them fails with
    /// [`PinError::Poisoned`](crate::PinError::Poisoned). Until
    /// [`Engine::replug`](crate::Engine::replug) brings them back as zeros.
    /// What a VMM wants when an access to memory the guest gave back is a
    /// bug to catch rather than to paper over.
    Poison,
}

impl std::str::FromStr for UnplugPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "zero" => Ok(UnplugPolicy::Zero),
            "poison" => Ok(UnplugPolicy::Poison),
            other => Err(format!("unknown unplug policy {other:?} (expected zero or poison)")),
        }
    }
}


/// How the engine changes guest memory: which userfaultfd operations its
/// descriptor is opened with and used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// The engine's own descriptor, with every feature the memory's kind
    /// allows ([`MemoryKind`](crate::MemoryKind)): on private anonymous
    /// memory `COPY`, `ZEROPAGE`, `MOVE` into a staging area (offlines),
    /// `POISON` (pages whose contents are lost, the poison unplug policy,
    /// shutdown), thread ids (per-thread prefetch streams); on shared
    /// memory and images the same but `MOVE`, and on images `CONTINUE`.
    #[default]
    PrivateAnonymous,
    /// `COPY`, `ZEROPAGE` and `WAKE` only, over private anonymous memory
    /// (other kinds are refused at build time), as a userfaultfd received
    /// from Firecracker offers (its handshake asked for `EVENT_REMOVE` alone).
    /// Faults, prefetch, dedupe, discards, pins and host-block offlines
    /// work; `Migrate`, `Evict` and `Unplug` need `MOVE` and are refused
    /// ([`crate::OfflineError::NotOffered`]), and so is
    /// [`UnplugPolicy::Poison`] at build time. Where the engine would
    /// poison a page whose contents are lost (a source that fails past its
    /// retries or panics, a page the kernel lost), it installs zeros
    /// instead, so the thread waiting on it goes on, and reports
    /// [`crate::FaultError::ZeroFilled`]; at shutdown pages never touched are
    /// left to the kernel, which fills them with zeros once the descriptor
    /// is gone.
    Limited,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "private-anonymous" => Ok(Backend::PrivateAnonymous),
            "limited" => Ok(Backend::Limited),
            other => Err(format!("unknown backend {other:?} (expected private-anonymous or limited)")),
        }
    }
}
