//! apf: a userspace async page-fault engine for KVM virtual machine monitors.
//!
//! A VMM that backs guest RAM with anonymous memory and fills it lazily
//! (snapshot restore, post-copy migration, overcommit) registers that memory
//! with apf. apf resolves every missing page the guest (or the VMM) touches,
//! concurrently and with prefetch, holding only short-term references to
//! guest pages.
//!
//! ```
//! use std::sync::Arc;
//! use apf::{Config, Engine, GuestAddress, GuestRam, ZeroSource};
//! use vm_memory::Bytes;
//!
//! // 16 MiB of guest RAM at guest-physical 0, every page missing.
//! let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), 16 << 20)])?);
//! // The pages come from a source: zeros here, a `SnapshotFile` on restore,
//! // or any `PageSource` of the VMM's own.
//! let engine = Engine::builder(ram.clone(), Arc::new(ZeroSource)).config(Config::default()).start()?;
//!
//! // Hand `ram.guest_memory()` (a vm-memory GuestMemoryMmap) to KVM and the
//! // device models. Every first touch of a page is resolved by the engine,
//! // here a device model's read through vm-memory's `Bytes` API.
//! ram.guest_memory().write_obj(0x1234_5678_u64, GuestAddress(0x10_0000))?;
//! assert_eq!(ram.guest_memory().read_obj::<u64>(GuestAddress(0x10_0000))?, 0x1234_5678);
//! assert_eq!(ram.guest_memory().read_obj::<u64>(GuestAddress(0x20_0000))?, 0);
//! assert!(engine.stats().faults >= 2);
//!
//! // Stop every thread that touches guest RAM (the vCPUs, the devices),
//! // then shut down: pages never touched are poisoned, so a late access gets
//! // SIGBUS instead of silently reading zeros.
//! let report = engine.shutdown();
//! assert_eq!(report.threads_left_behind, 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The API
//!
//! Everything a VMM names is at the crate root:
//!
//! - the engine: [`Engine`], built by [`EngineBuilder`] from one [`Config`]
//!   ([`Dispatch`], [`Backend`], [`OfflinePriority`]), its failures while
//!   running ([`Errors`] of [`FaultError`]), its counters
//!   ([`StatsSnapshot`]), working sets and their files ([`WorkingSet`],
//!   [`ImageId`], [`WorkingSetError`], replayed with [`ReplayOptions`]) and
//!   [`ShutdownReport`];
//! - guest RAM: [`GuestRam`] of a [`MemoryKind`] (an [`Image`] for
//!   restores and clones, [`ImageError`]), [`GuestRange`], vm-memory's [`GuestAddress`]
//!   and [`GuestMemoryMmap`], and a read-only view of the page states
//!   ([`Region`], [`PageLoc`], [`PageState`], [`Origin`]);
//! - where pages come from: [`PageSource`] ([`SourceKind`], [`SourceError`]),
//!   [`ZeroSource`], [`SnapshotFile`], [`EvictionStore`];
//! - references to guest memory: [`Pin`] (migratable, with an invalidation
//!   callback that gets an [`InvalidateEvent`]), [`PinGuard`], [`PageRef`],
//!   [`HardPin`], [`PinError`];
//! - offlining: [`Mode`], [`UnplugPolicy`], [`OfflineReport`],
//!   [`HostBlockSearch`], [`OfflineError`];
//! - [`PAGE_SIZE`], and [`span`]: the names of the `tracing` spans the
//!   engine emits.
//!
//! # Cargo features
//!
//! Every feature is off by default; the engine builds with `tracing` only.
//!
//! - `lab`: equipment for measuring and demonstrating the engine, not for
//!   running it: `LatencyLayer` (a `tracing-subscriber` layer turning the
//!   spans into latency histograms, per-vCPU blocked time and a Perfetto
//!   trace) and `latency_plot`; `SinglePageHandler`, the one-page-per-fault
//!   handler apf is measured against; `FixedBuffer`, an io_uring fixed
//!   buffer used as a real kernel pin; the `Pattern` source and
//!   `splitmix64`; `set_thread_nice`. Pulls in `tracing-subscriber` and
//!   `hdrhistogram`.
//! - `failpoints`: the `failpoints` module, which makes one chosen call of
//!   the userfaultfd wrapper fail, for error-path tests
//!   (`Engine::failpoints`). Never part of the API.
//! - `unstable-internals`: the internal modules, public and hidden from the
//!   docs, for the engine's own integration tests. Not part of the API and
//!   not covered by semver.
//!
//! # Code map
//!
//! Layered bottom to top (`docs/ARCHITECTURE.md`; a test enforces it):
//! leaves, the core, the services, the front.
//!
//! | module | owns |
//! |---|---|
//! | `uffd` | the userfaultfd descriptor: handshake, registration, events, resolving ioctls (the `unsafe` ones) |
//! | `ram` | guest RAM regions and their memory kind, guest-address translation, per-page state |
//! | `image` | memory images: a sealed memfd loaded once (or a tmpfs file), mapped private by many guests, and its page source |
//! | `source` | where page contents come from: zeros, snapshot files, the eviction store |
//! | `notifier` | the invalidation sequence and the interval registry of pins and references |
//! | `config`, `counters` | the engine's configuration and its counters |
//! | `hostmem` | host memory blocks: sysfs state, the pagemap, the project-wide lock file |
//! | [`hugepool`] | reservations of 2 MiB pages in the kernel's pool, counted across processes in a lock file |
//! | `kpin` | real kernel pins on memory (io_uring fixed buffers), which hard pins take |
//! | [`span`] | the names of the `tracing` spans the engine emits |
//! | `trace` | tracing plumbing; with `lab`, the latency layer and its plot |
//! | `failpoints` | (feature `failpoints`, tests only) make one chosen userfaultfd call fail, pause it, or switch a safeguard off |
//! | `core` | the state the engine's parts share, behind narrow methods, and the resolver of claimed windows |
//! | `fault` | the fault path: event loop, dedupe, prefetch planning, dispatch |
//! | `pin` | short-term references, migratable pins with callbacks, hard pins |
//! | `offline` | migrate, evict, unplug and host memory-block offlining of guest ranges |
//! | `baseline` | (feature `lab`) the one-page-per-fault handler |
//! | `engine` | the engine's front: [`Engine`] and its builder, worker pool, shutdown |

#![warn(missing_docs)]
#![warn(clippy::missing_safety_doc)]

/// Declares internal modules: private, or public and hidden from the docs
/// with the `unstable-internals` feature (for the integration tests; not
/// part of the API).
macro_rules! internal_modules {
    ($($name:ident),* $(,)?) => {
        $(
            #[cfg(feature = "unstable-internals")]
            #[doc(hidden)]
            pub mod $name;
            #[cfg(not(feature = "unstable-internals"))]
            mod $name;
        )*
    };
}

internal_modules!(
    config,
    core,
    counters,
    engine,
    fault,
    hostmem,
    image,
    kpin,
    notifier,
    offline,
    pin,
    ram,
    source,
    trace,
    uffd,
    working_set
);

#[cfg(feature = "lab")]
mod baseline;
#[cfg(feature = "failpoints")]
pub mod failpoints;
pub mod hugepool;
pub mod span;

pub use crate::core::FaultError;
pub use config::{Backend, Config, Dispatch, OfflinePriority, UnplugPolicy};
pub use counters::StatsSnapshot;
pub use engine::{
    Engine, EngineBuilder, EngineError, Errors, RemoteMemory, ReplayOptions, ShutdownReport, MAX_REPLAYS,
};
pub use hostmem::{BlockOp, BlockState, HostMemError};
pub use image::{Image, ImageError};
pub use notifier::{InvalidateEvent, Reason};
pub use offline::{HostBlockSearch, Mode, OfflineError, OfflineReport, STAGING_PAGES};
pub use pin::{HardPin, PageRef, Pin, PinError, PinGuard};
pub use ram::{
    GuestAddress, GuestMemoryMmap, GuestRam, GuestRange, MemoryKind, Origin, PageLoc, PageState, RamError, Region,
    RemoteRegion, StateError,
};
pub use source::{EvictionStore, PageSource, SnapshotFile, SourceError, SourceKind, ZeroSource};
pub use uffd::{Features, IoctlError, UffdError, HUGE_PAGE_SIZE, PAGE_SIZE};
pub use working_set::{ImageId, WorkingSet, WorkingSetError};

#[cfg(feature = "lab")]
pub use baseline::SinglePageHandler;
#[cfg(feature = "lab")]
pub use kpin::FixedBuffer;
#[cfg(feature = "lab")]
pub use source::{splitmix64, Pattern};
#[cfg(feature = "lab")]
pub use trace::{latency_plot, LatencyLayer, LatencySummary, SpanStats, TraceWritten, VcpuBlocked};

/// Sets the nice value of the calling thread (Linux threads each have
/// their own): how the lab's storms and background offliners make way for
/// the threads they measure (feature `lab`).
#[cfg(feature = "lab")]
pub fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    let tid = rustix::thread::gettid();
    rustix::process::setpriority_process(Some(tid), nice).map_err(std::io::Error::from)
}
