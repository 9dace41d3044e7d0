//! apf: a userspace async page-fault engine for KVM virtual machine monitors.
//!
//! A VMM that backs guest RAM with anonymous memory and fills it lazily
//! (snapshot restore, post-copy migration, overcommit) registers that memory
//! with apf. apf resolves every missing page the guest (or the VMM) touches,
//! concurrently and with prefetch, holding only short-term references to
//! guest pages.
//!
//! ```no_run
//! use std::sync::Arc;
//! use apf::fault::Engine;
//! use apf::ram::{GuestAddress, GuestRam};
//! use apf::source::SnapshotFile;
//!
//! // 256 MiB of guest RAM at guest-physical 0, restored from an image.
//! let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), 256 << 20)])?);
//! let image = Arc::new(SnapshotFile::open("guest.img", &ram)?);
//! let engine = Engine::builder(ram.clone(), image).workers(2).start()?;
//!
//! // Hand `ram.guest_memory()` (a vm-memory GuestMemoryMmap) to KVM and the
//! // device models; every first touch of a page is resolved from the image.
//! // ... run the guest, stop its vCPU threads ...
//! let report = engine.shutdown(); // pages never touched are poisoned
//! println!("{:?}", report);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Code map
//!
//! | module | owns |
//! |---|---|
//! | [`uffd`] | the userfaultfd descriptor: handshake, registration, events, resolving ioctls |
//! | [`ram`] | guest RAM regions, guest-address translation, per-page state |
//! | [`source`] | where page contents come from: zeros, snapshot files, the eviction store |
//! | [`notifier`] | the invalidation sequence and the interval registry of pins and references |
//! | [`pin`] | short-term references, migratable pins with callbacks, hard pins |
//! | [`offline`] | migrate, evict, unplug and host memory-block offlining of guest ranges |
//! | [`hostmem`] | host memory blocks: sysfs state, the pagemap, the project-wide lock file |
//! | [`kpin`] | real kernel pins on memory (io_uring fixed buffers) |
//! | [`fault`] | the engine: event loop, dedupe, prefetch, worker pool, shutdown |
//! | [`trace`] | the names of the `tracing` spans the engine emits |
//! | `failpoints` | (feature `failpoints`, tests only) make one chosen userfaultfd call fail, pause it, or switch a safeguard off |

pub mod baseline;
#[cfg(feature = "failpoints")]
pub mod failpoints;
pub mod fault;
pub mod hostmem;
pub mod kpin;
pub mod notifier;
pub mod offline;
pub mod pin;
pub mod ram;
pub mod source;
pub mod trace;
pub mod uffd;

pub use fault::{Config, Dispatch, Engine, EngineError, FaultError};
pub use offline::{HostBlockSearch, Mode, OfflineError, OfflineReport, UnplugPolicy};
pub use pin::{HardPin, PageRef, Pin, PinError, PinGuard};
pub use ram::{GuestAddress, GuestRam, GuestRange};
pub use source::{PageSource, SnapshotFile, ZeroSource};
