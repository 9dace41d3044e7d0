//! Offlining guest ranges while faults keep being served: migrate, evict,
//! unplug, and real host memory-block offlining.
//!
//! What a caller sees (the steps, the modes, the failure contract) is on
//! [`Engine::offline`](crate::Engine::offline), [`Mode`] and
//! [`UnplugPolicy`]; this is how it is done.
//!
//! Every mode runs the same steps, as the kernel's own migration does:
//!
//! 1. **Announce the invalidation**: from here no short-term reference or
//!    pin guard is granted on the range, and no other offline may overlap
//!    it. Faults on the range are still served. From here pins (and, chunk
//!    by chunk, faults) may wait for the offline: the first that does
//!    raises the offline's thread to the engine's priority ceiling
//!    ([`OfflinePriority`](crate::OfflinePriority)) until it ends. A
//!    low-priority caller kept off the CPU would otherwise hold them all
//!    up: no lock or condition variable lends priority between nice
//!    levels. An offline nobody waits for keeps its caller's priority.
//! 2. **Call the pin callbacks** of every [`Pin`](crate::pin::Pin) over the
//!    range: holders drop their kernel pins and stop relying on the memory.
//! 3. **Wait for short-term references** ([`PageRef`](crate::pin::PageRef))
//!    and hard pins to drain, then for the staging area, both up to the
//!    deadline. A range still held then fails with [`OfflineError::Busy`]
//!    (or [`OfflineError::StagingBusy`]) and is left as it was. Because
//!    nothing is held yet, a thread holding a reference waited for here is
//!    never blocked by this offline, whatever it touches. Offlines take
//!    turns at the staging area in the order they ask, chunk by chunk: one
//!    with more chunks to do lets a waiting one go first after each chunk,
//!    so a small offline (a guest's request) waits for one chunk of a
//!    large one, never for all of it.
//! 4. **Chunk by chunk**, [`STAGING_PAGES`] pages at a time, from the start
//!    of the range:
//!    - **hold the chunk**: under the install lock, bump the sequence over
//!      the chunk and mark its pages `Invalidating`. Fills in flight over
//!      it are thrown away at their install; faults on it wait (the event
//!      loop defers them) until the chunk ends. Pages of later chunks are
//!      not held: a fault on one is served meanwhile, and its page is taken
//!      out with its chunk. The kernel's own migration does the same: an
//!      access waits only for the page being moved, never for the range.
//!    - **act**: the guest pages the kernel holds (its page table,
//!      `/proc/self/pagemap`, says which) are taken out of guest RAM with
//!      `UFFDIO_MOVE`, one call per run of them, into a staging area
//!      registered with the same userfaultfd: one step that unmaps (a
//!      write landing afterwards faults and waits, none is lost), fires
//!      KVM's MMU notifier and raises no remove event. Holes are not
//!      handed to the kernel to skip: a move over holes that a discard is
//!      zapping at the same time was seen to retry for ever inside the
//!      kernel. What the kernel held is what is acted on, whatever the
//!      engine's page states say: the staging area's page table tells
//!      which pages came over (a move that stops part-way can move one page
//!      more than it reports). Then `Migrate` copies them back into fresh
//!      frames, `Evict` copies them into the eviction store, `Unplug` drops
//!      them and applies the [`UnplugPolicy`]. The staging area is then
//!      emptied with `MADV_DONTNEED` on itself, never on guest RAM.
//!    - **end the chunk**: under the install lock, set each page's final
//!      state from what really happened to it, give the chunk back (reads,
//!      references, pins and other offlines may have it again: a pin over
//!      it re-arms at once) and wake the deferred faults, which are served
//!      the right contents.
//!
//!    Pin callbacks ran once, in step 2, before any page of the range moved.
//!    A deadline that passes between two chunks stops the offline there
//!    ([`OfflineError::Unfinished`] says how many pages were done); the rest
//!    of the range is never touched.
//! 5. **End** the announcement of whatever is left.
//!
//! # Failure contract
//!
//! No failure of any call loses a page's contents, and none leaves a page
//! the engine calls present holding stale data:
//!
//! - Every userfaultfd call here goes through one retry rule (`backoff`):
//!   `EAGAIN` (a remove event is pending; it clears once the event loop has
//!   read it) and, for `UFFDIO_MOVE`, `EBUSY` are retried until the
//!   deadline, never while holding the install lock.
//! - If taking a chunk out stops (a page the kernel keeps pinned past the
//!   deadline, or an error), the pages of that chunk already in staging are
//!   moved back into guest RAM (`UFFDIO_MOVE` needs no new memory) before
//!   the staging area is cleared; the offline stops there and returns
//!   [`OfflineError::Busy`] (with the pages done) or the error. Chunks
//!   before it are done, chunks after it untouched.
//! - If copying back into fresh frames fails, the page is moved back into
//!   its old frame; if that fails too, its contents go to the eviction
//!   store and it is restored on its next fault. `EEXIST` on the way back
//!   means the guest page is not empty: whatever is there is moved aside
//!   (nothing may have been installed over a page the offline holds) and
//!   the staged contents go in. The offline then returns the first error,
//!   naming the page and the call.
//! - A page is recorded evicted only when the store holds it, present only
//!   when its contents are back.
//! - A page whose contents are in staging but cannot be told apart from a
//!   hole there (the page table could not be read) and that cannot be moved
//!   back is poisoned and reported ([`OfflineError::Lost`]), never
//!   zero-filled.
//! - A balloon discard (`MADV_DONTNEED`) that lands while the offline holds
//!   a page wins: its contents are not put back, it reads as zeros.
//! - An `Unplug` acts on what the kernel holds, so a page the engine did
//!   not know was populated is discarded too. `UFFDIO_POISON` answering
//!   `EEXIST` means data is still there: it is moved aside and the page is
//!   poisoned again. Pages already poisoned by the engine are left as they
//!   are (their fault path poisons them again if the marker is gone).
//! - The staging area is emptied after every chunk, and checked (and
//!   emptied) before each offline: a page left there by a failed clear, or
//!   found in a slot by a `UFFDIO_MOVE` that answers `EEXIST`, never makes
//!   later offlines fail.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::field;

use crate::config::UnplugPolicy;
use crate::core::install::MemOp;
use crate::core::{Core, Stopped};
use crate::notifier::{Invalidation, Reason};
use crate::ram::{runs, AnonMapping, GuestAddress, GuestRange, MemoryKind, Origin, PageState, RamError, Region};
use crate::uffd::{IoctlError, RegisterMode, Uffd, PAGE_SIZE};

/// Pages in the staging area: an offline moves its range through it in
/// chunks of this many pages. Smaller chunks hold page-table locks and the
/// CPU for less time at once. Measured with `vmm bench`: 512 KiB chunks
/// keep the p99 of faults next to an offline storm at about 1.6x the quiet
/// p99 (2 MiB chunks: 2 to 4x), and offline 64 MiB in 32 ms instead of 25.
pub const STAGING_PAGES: usize = 128;

/// What an offline ([`Engine::offline`](crate::Engine::offline)) does to a
/// guest range.
///
/// Every mode runs the same steps (described on `Engine::offline`): the
/// range is invalidated, [`Pin`](crate::Pin) callbacks are called,
/// references are waited for, and then the pages the kernel holds for the
/// range are acted on, whatever the engine believed about them. The modes
/// differ only in that last act. Faults on the range wait for the offline
/// and then get the contents the mode leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Contents kept, host frames change: each page is copied into a fresh
    /// frame and its old one freed. Transparent to the guest.
    Migrate,
    /// Contents moved to the engine's eviction store
    /// ([`Engine::store`](crate::Engine::store)) and frames freed; a page
    /// is restored from the store on its next fault. Transparent to the
    /// guest.
    Evict,
    /// Contents discarded, frames freed; what a later access gets is the
    /// engine's [`UnplugPolicy`] (zeros, or SIGBUS until
    /// [`Engine::replug`](crate::Engine::replug)). An unplug also waits for
    /// the [`PinGuard`](crate::PinGuard)s of pins over the range, so that
    /// no device is using memory as it goes.
    Unplug,
    /// Real hot-remove of host memory block `n`: the block is offlined
    /// through sysfs, which makes the kernel migrate every page in it, and
    /// onlined again. Only the guest pages of the range that live in that
    /// block are invalidated. Needs the privilege to write the block's
    /// sysfs state; a block holding a page someone pins fails with
    /// [`OfflineError::BlockBusy`] and is online again.
    /// [`Engine::offline_any_host_block`](crate::Engine::offline_any_host_block)
    /// finds a block that can go.
    HostBlock(u32),
}

impl Mode {
    /// Lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Migrate => "migrate",
            Mode::Evict => "evict",
            Mode::Unplug => "unplug",
            Mode::HostBlock(_) => "host-block",
        }
    }

    /// Whether this mode can work on memory of `kind` at all: every mode
    /// works on every kind (in place where the kernel cannot move pages,
    /// huge pages included, whole; see `Engine::offline`). An engine may
    /// still refuse a mode its descriptor cannot do (no `MOVE`, no write
    /// protection on shared or huge-page memory), or shared memory
    /// another process maps.
    pub fn offered_on(self, kind: MemoryKind) -> bool {
        let _ = kind;
        true
    }

    fn reason(&self) -> Reason {
        match self {
            Mode::Migrate => Reason::Migrate,
            Mode::Evict => Reason::Evict,
            Mode::Unplug => Reason::Unplug,
            Mode::HostBlock(_) => Reason::HostBlock,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::HostBlock(n) => write!(f, "host-block({n})"),
            m => f.write_str(m.as_str()),
        }
    }
}

/// What one offline did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OfflineReport {
    /// Pages in the range.
    pub pages: usize,
    /// Pages the kernel held that were taken out (moved, evicted, dropped),
    /// whatever the engine's own view of them was.
    pub pages_taken: usize,
    /// Pin callbacks called.
    pub pins_called: usize,
    /// Pages now in new host frames.
    pub frames_moved: usize,
    /// Pages moved to the eviction store.
    pub pages_evicted: usize,
    /// Pages whose contents were discarded.
    pub pages_unplugged: usize,
    /// Time from start to end of the invalidation.
    pub elapsed: Duration,
    /// For [`Mode::HostBlock`]: guest pages found in the block.
    pub block_pages: usize,
}

/// Why an offline failed. Nothing is left half-done: every page of the range
/// is in a state the engine and the kernel agree on, keeps its contents
/// (but for the one exception, reported as [`OfflineError::Lost`]), and
/// faults on it are served. See
/// [`Engine::offline`](crate::Engine::offline).
#[derive(Debug, Error)]
pub enum OfflineError {
    /// The range is not page-aligned, empty, or not inside guest RAM.
    #[error("invalid offline range")]
    Range(#[from] RamError),
    /// Another offline is working on an overlapping range.
    #[error("guest range {0} overlaps an offline in progress")]
    Overlap(GuestRange),
    /// The range was still held when the deadline passed.
    #[error(
        "guest range {range} is busy after {waited:?}: {refs} short-term references, {hard} hard pins, \
         {kernel_pinned} pages the kernel would not move; {discarded} pages were discarded before it stopped"
    )]
    Busy {
        /// The range.
        range: GuestRange,
        /// How long the offline waited.
        waited: Duration,
        /// Short-term references still held.
        refs: usize,
        /// Hard pins still held.
        hard: usize,
        /// Pages `UFFDIO_MOVE` refused with `EBUSY` (pinned in the kernel).
        kernel_pinned: usize,
        /// Pages an `Unplug` discarded before the held one.
        discarded: usize,
        /// Pages from the start of the range offlined before it stopped
        /// (the offline goes chunk by chunk; the chunk that stopped was put
        /// back, the ones after it never touched).
        pages_done: usize,
    },
    /// The deadline passed part-way through the range, between two of
    /// its chunks: the first `pages_done` pages were offlined, the rest
    /// were never touched.
    #[error("offline of {range} reached its deadline after {waited:?}: {pages_done} pages done, the rest untouched")]
    Unfinished {
        /// The range.
        range: GuestRange,
        /// How long the offline ran.
        waited: Duration,
        /// Pages from the start of the range that were offlined.
        pages_done: usize,
    },
    /// Another offline held the staging area past the deadline. Nothing
    /// changed.
    #[error("guest range {range} waited {waited:?} for the staging area another offline holds; nothing changed")]
    StagingBusy {
        /// The range.
        range: GuestRange,
        /// How long the offline waited.
        waited: Duration,
    },
    /// The mode moves pages through the staging area with `UFFDIO_MOVE`,
    /// which the engine's userfaultfd does not offer (the limited backend,
    /// or a kernel without it). Refused before anything is touched.
    #[error("offline mode {mode} needs UFFDIO_MOVE, which this engine's userfaultfd ({backend} backend) does not offer")]
    NotOffered {
        /// The mode asked for.
        mode: Mode,
        /// The engine's backend.
        backend: &'static str,
    },
    /// The engine serves another process's memory
    /// ([`RemoteMemory`](crate::RemoteMemory)): offlines need the pages
    /// mapped here and `UFFDIO_MOVE`, and it has neither. Nothing was done.
    #[error("guest range {0} lives in another process: offlines need it mapped here and UFFDIO_MOVE")]
    Remote(GuestRange),
    /// `Migrate` and `Evict` of shared memory another process maps
    /// ([`GuestRam::shared_fd`](crate::GuestRam::shared_fd) handed it out):
    /// they keep writes by write-protecting this process's mapping, which
    /// does not stop the other process's. Nothing was done.
    #[error("guest range {0} is mapped by another process too, whose writes cannot be held: migrate and evict are refused")]
    SharedWithOthers(GuestRange),
    /// Dropping pages of memory without `UFFDIO_MOVE` (a punched hole in
    /// shared memory, `MADV_DONTNEED` on private memory) failed. The pages
    /// dropped before it were handled as the mode says; the rest are as
    /// they were.
    #[error("dropping the pages of {range} failed")]
    Punch {
        /// The pages that were to be dropped.
        range: GuestRange,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// A `Migrate` of huge pages found the pool dry when it put a page
    /// back (the kernel answers the `COPY` with `EEXIST` and nothing is
    /// there, or with `ENOMEM`):
    /// the page's contents are kept in the eviction store, where its next
    /// fault finds them. The pages after it are as they were.
    #[error("no free huge page in the pool to put {range} back; its contents are kept in the eviction store")]
    NoMemory {
        /// The huge page that could not go back.
        range: GuestRange,
    },
    /// The engine has shut down.
    #[error("the engine has shut down")]
    Stopped,
    /// A userfaultfd operation failed past its retries. No page lost its
    /// contents: each is back in guest RAM or in the eviction store, except
    /// pages an error reported separately names as poisoned.
    #[error("offline of {range} failed")]
    Ioctl {
        /// The page (or run of pages) the operation failed on.
        range: GuestRange,
        /// The failed operation.
        #[source]
        error: IoctlError,
    },
    /// Pages whose contents could neither be put back nor kept were
    /// poisoned: an access gets SIGBUS, never stale or zeroed data.
    #[error("{pages} pages of {range} could not be restored and were poisoned, the first at {:#x}", .first.0)]
    Lost {
        /// The range.
        range: GuestRange,
        /// Guest address of the first such page.
        first: GuestAddress,
        /// How many.
        pages: usize,
        /// The failure that stopped the restore.
        #[source]
        error: IoctlError,
    },
    /// Setting up, reading or clearing the staging area failed.
    #[error("offline staging area")]
    Staging(#[source] std::io::Error),
    /// Host memory-block offlining failed.
    #[error("host memory block offline failed")]
    HostBlock(#[source] crate::hostmem::HostMemError),
    /// The host block did not go offline by the deadline: a page in it is
    /// pinned (a hard pin, or a kernel pin nobody dropped). The block is
    /// online again and nothing moved.
    #[error(
        "host memory block {block} did not go offline within {waited:?}: a page in it is pinned; it is online again"
    )]
    BlockBusy {
        /// The block.
        block: u32,
        /// How long the offline waited.
        waited: Duration,
    },
    /// No guest page of the range lives in the host block.
    #[error("no page of guest range {range} lives in host memory block {block}")]
    NotInBlock {
        /// The range.
        range: GuestRange,
        /// The block.
        block: u32,
    },
}

impl From<Stopped> for OfflineError {
    fn from(_: Stopped) -> Self {
        OfflineError::Stopped
    }
}

impl OfflineError {
    /// True for the errors that mean "held, or not done, by the deadline"
    /// ([`Self::Busy`], [`Self::Unfinished`], [`Self::BlockBusy`],
    /// [`Self::StagingBusy`]); nothing was lost, and a later attempt may
    /// work.
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            OfflineError::Busy { .. }
                | OfflineError::Unfinished { .. }
                | OfflineError::BlockBusy { .. }
                | OfflineError::StagingBusy { .. }
        )
    }
}

/// `/proc/self/pagemap` entry bits: a page is present, or swapped out.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
/// The page is a file's (or shared), not a private anonymous one.
const PM_FILE: u64 = 1 << 61;

/// The staging area: private anonymous memory registered with the engine's
/// userfaultfd in the same mode as guest RAM, so `UFFDIO_MOVE` accepts it.
/// It has [`STAGING_PAGES`] slots a chunk of an offline moves through, and
/// one more, the quarantine slot, where a page found where none should be
/// is moved aside before it is dropped. One offline uses it at a time;
/// waiting for it is bounded by the waiter's deadline.
pub(crate) struct Staging {
    map: AnonMapping,
    pages: usize,
    pagemap: File,
    turns: Mutex<Turns>,
    freed: Condvar,
}

/// Whose turn it is at the staging area: offlines take it in the order they
/// asked for it, and one with more chunks to do gives it up between two
/// chunks when another waits (see [`StagingGuard::pass_if_waited`]).
#[derive(Debug, Default)]
struct Turns {
    /// The next ticket to hand out.
    next: u64,
    /// The ticket whose holder may use the area.
    serving: u64,
    /// Tickets whose holders stopped waiting (their deadline passed).
    abandoned: std::collections::BTreeSet<u64>,
}

impl Turns {
    /// Ends the current turn: the next ticket still waited on is served.
    fn advance(&mut self) {
        self.serving += 1;
        while self.abandoned.remove(&self.serving) {
            self.serving += 1;
        }
    }

    /// Whether a ticket after the one served is still waited on.
    fn waited(&self) -> bool {
        self.next > self.serving + 1 + self.abandoned.len() as u64
    }
}

impl fmt::Debug for Staging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Staging").field("base", &self.map.ptr()).field("pages", &self.pages).finish()
    }
}

/// The right to use the staging area, released on drop.
struct StagingGuard<'a> {
    staging: &'a Staging,
}

impl Drop for StagingGuard<'_> {
    fn drop(&mut self) {
        self.staging.turns.lock().unwrap_or_else(|e| e.into_inner()).advance();
        self.staging.freed.notify_all();
    }
}

impl<'a> StagingGuard<'a> {
    /// Between two chunks: if another offline waits for the staging area,
    /// it gets its turn now, and this one queues again behind it (an
    /// offline of a guest's own memory, asked for by a vCPU, never waits
    /// for a whole 64 MiB offline of someone else's). `None` if the turn
    /// did not come back by `deadline`.
    fn pass_if_waited(self, deadline: Instant, on_wait: impl Fn()) -> Option<StagingGuard<'a>> {
        let staging = self.staging;
        if !staging.turns.lock().unwrap_or_else(|e| e.into_inner()).waited() {
            return Some(self);
        }
        drop(self);
        staging.acquire(deadline, on_wait)
    }
}

impl std::ops::Deref for StagingGuard<'_> {
    type Target = Staging;
    fn deref(&self) -> &Staging {
        self.staging
    }
}

impl Staging {
    pub(crate) fn new(uffd: &Uffd, pages: usize) -> Result<Staging, OfflineError> {
        // Small pages on both sides: UFFDIO_MOVE wants them.
        let map = AnonMapping::new((pages + 1) * PAGE_SIZE).map_err(OfflineError::Staging)?;
        uffd.register(map.ptr() as u64, map.len() as u64, RegisterMode::MISSING)
            .map_err(|e| OfflineError::Staging(io::Error::other(e)))?;
        let pagemap = File::open("/proc/self/pagemap").map_err(OfflineError::Staging)?;
        Ok(Staging { map, pages, pagemap, turns: Mutex::new(Turns::default()), freed: Condvar::new() })
    }

    /// Waits for this caller's turn at the staging area (turns come in the
    /// order they were asked for), or `deadline`. `on_wait` runs before the
    /// first wait: it lends the waiter's priority to whoever holds the
    /// area.
    fn acquire(&self, deadline: Instant, on_wait: impl Fn()) -> Option<StagingGuard<'_>> {
        let mut turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
        let ticket = turns.next;
        turns.next += 1;
        let mut waited = false;
        while turns.serving != ticket {
            let now = Instant::now();
            if now >= deadline {
                turns.abandoned.insert(ticket);
                return None;
            }
            if !waited {
                waited = true;
                drop(turns);
                on_wait();
                turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
                continue;
            }
            turns = self.freed.wait_timeout(turns, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        Some(StagingGuard { staging: self })
    }

    fn slot(&self, slot: usize) -> u64 {
        debug_assert!(slot <= self.pages);
        self.map.ptr() as u64 + (slot * PAGE_SIZE) as u64
    }

    fn quarantine(&self) -> usize {
        self.pages
    }

    /// Which of slots `0..n` hold a page, as the kernel's page table says
    /// (present or swapped out).
    fn held(&self, n: usize) -> io::Result<Vec<bool>> {
        self.occupied_run(self.slot(0), n)
    }

    /// Whether the kernel's page table holds something (a page, present or
    /// swapped out) at `addr`, any address of this process.
    fn occupied(&self, addr: u64) -> io::Result<bool> {
        Ok(self.occupied_run(addr, 1)?[0])
    }

    /// [`Self::occupied`] for the `n` pages from `addr`, in one read.
    fn occupied_run(&self, addr: u64, n: usize) -> io::Result<Vec<bool>> {
        let mut raw = vec![0u8; n * 8];
        self.pagemap.read_exact_at(&mut raw, addr / PAGE_SIZE as u64 * 8)?;
        Ok(raw
            .chunks_exact(8)
            .map(|e| u64::from_ne_bytes(e.try_into().unwrap_or([0; 8])) & (PM_PRESENT | PM_SWAP) != 0)
            .collect())
    }

    /// Frees slots `first..first + n`. This raises a remove event for the
    /// staging area (not guest RAM, so the event loop ignores it) and
    /// returns once the event loop has read it: the caller must hold no
    /// lock the event loop takes.
    fn discard(&self, uffd: &Uffd, first: usize, n: usize) -> io::Result<()> {
        let addr = self.slot(first);
        #[cfg(feature = "failpoints")]
        if let Some(f) = uffd.failpoints().take(crate::uffd::Op::Discard, [addr, addr], n * PAGE_SIZE) {
            return Err(io::Error::from_raw_os_error(f.errno));
        }
        #[cfg(not(feature = "failpoints"))]
        let _ = uffd;
        // SAFETY: MADV_DONTNEED on slots of the staging mapping, which only
        // the holder of the staging area (this caller) uses; nothing keeps
        // references into it.
        if unsafe { libc::madvise(addr as *mut libc::c_void, n * PAGE_SIZE, libc::MADV_DONTNEED) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Empties the whole staging area if the kernel says any slot holds a
    /// page (one `pread` when it is already empty).
    fn clear(&self, uffd: &Uffd) -> io::Result<()> {
        if self.held(self.pages + 1)?.iter().any(|h| *h) {
            self.discard(uffd, 0, self.pages + 1)?;
        }
        Ok(())
    }
}

/// The one retry rule for userfaultfd calls outside the resolver. `EAGAIN`
/// means the address space is changing: a remove event is pending, and it
/// clears only once the event loop has read it, so the caller must hold
/// nothing the event loop needs (the install lock) while it waits.
/// `transient` lists further errnos worth retrying at this call (`EBUSY`
/// for `UFFDIO_MOVE`: a page-table race or a short-lived kernel pin).
/// Returns true, after a short sleep, if the caller should try again; false
/// for any other errno or once `deadline` has passed.
fn backoff(errno: i32, transient: &[i32], deadline: Instant) -> bool {
    if errno != libc::EAGAIN && !transient.contains(&errno) {
        return false;
    }
    if Instant::now() >= deadline {
        return false;
    }
    std::thread::sleep(if errno == libc::EAGAIN { Duration::from_micros(50) } else { Duration::from_millis(1) });
    true
}

/// Bytes done and the error of a call reporting partial progress, in pages.
fn split(res: Result<usize, IoctlError>) -> (usize, Option<IoctlError>) {
    split_in(res, PAGE_SIZE)
}

/// [`split`] in pages of `page_size` bytes.
fn split_in(res: Result<usize, IoctlError>, page_size: usize) -> (usize, Option<IoctlError>) {
    match res {
        Ok(n) => (n / page_size, None),
        Err(e) => (e.done / page_size, Some(e)),
    }
}

/// A page's state and origin when the offline marked it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Prior {
    state: PageState,
    origin: Origin,
}

/// What the offline did to one page; applied when the invalidation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Not acted on: it goes back to the state it had.
    Untouched,
    /// Its contents are in guest RAM (copied or moved back).
    InPlace,
    /// The kernel held nothing for it, or a balloon discarded it meanwhile.
    Empty,
    /// Its contents are in the eviction store.
    Stored,
    /// Unplugged: contents discarded, this is its new state.
    Unplugged(PageState),
    /// Contents neither put back nor kept: poisoned.
    Lost,
}

/// One offline (or replug) of pages `first..first + count` of a region.
struct Work<'a> {
    shared: &'a Core,
    region: &'a Region,
    first: usize,
    range: GuestRange,
    mode: Mode,
    deadline: Instant,
    prior: Vec<Prior>,
    outcome: Vec<Outcome>,
    failure: Option<OfflineError>,
    /// Pages the kernel would not let go of (`EBUSY`) by the deadline.
    kernel_pinned: usize,
    lost: Vec<(GuestAddress, IoctlError)>,
    report: OfflineReport,
    /// Pages from the start of the range done (every chunk before this
    /// one ended its invalidation).
    pages_done: usize,
}

impl<'a> Work<'a> {
    fn new(
        shared: &'a Core,
        region: &'a Region,
        first: usize,
        range: GuestRange,
        mode: Mode,
        deadline: Instant,
        prior: Vec<Prior>,
    ) -> Self {
        let count = prior.len();
        Work {
            shared,
            region,
            first,
            range,
            mode,
            deadline,
            prior,
            outcome: vec![Outcome::Untouched; count],
            failure: None,
            kernel_pinned: 0,
            lost: Vec::new(),
            report: OfflineReport { pages: count, ..OfflineReport::default() },
            pages_done: 0,
        }
    }

    fn count(&self) -> usize {
        self.prior.len()
    }

    /// Host address of page `i` of the range.
    fn host(&self, i: usize) -> u64 {
        self.region.page_host(self.first + i)
    }

    fn page_range(&self, i: usize, pages: usize) -> GuestRange {
        GuestRange::new(self.region.page_gpa(self.first + i), self.bytes(pages) as u64)
    }

    /// The size of the region's pages (2 MiB on huge pages, which every
    /// in-place step acts on whole).
    fn page_size(&self) -> usize {
        self.region.page_size()
    }

    /// Bytes of `pages` of the region's pages.
    fn bytes(&self, pages: usize) -> usize {
        self.region.pages_len(pages)
    }

    fn fail(&mut self, e: OfflineError) {
        tracing::warn!(target: "apf", error = %e, source = ?std::error::Error::source(&e), "apf offline step failed");
        self.failure.get_or_insert(e);
    }

    fn fail_ioctl(&mut self, i: usize, error: IoctlError) {
        let range = self.page_range(i, 1);
        self.fail(OfflineError::Ioctl { range, error });
    }

    fn stopped(&self) -> bool {
        self.failure.is_some() || self.kernel_pinned > 0
    }

    /// Restoring contents is never cut short by the offline's own deadline:
    /// it gets the engine's install deadline on top, once for the whole
    /// offline (not per run of pages, which would let an offline with many
    /// runs go on for many times that).
    fn restore_deadline(&self) -> Instant {
        self.deadline + self.shared.config().install_deadline
    }

    /// True if a balloon discarded page `i` while the offline held it: a
    /// remove event sets the origin of a marked page to `Zero`, and `begin`
    /// set every marked page's origin to `Source`. Call under the install
    /// lock, which the event loop holds to read and apply a remove.
    fn removed(&self, i: usize) -> bool {
        self.prior[i].state != PageState::Resolving && self.region.state(self.first + i).1 == Origin::Zero
    }

    /// With the install lock held by the caller: `None` if page `c0 + k`
    /// of the chunk was discarded by a balloon meanwhile (its outcome is
    /// then `Empty`: nothing goes back there), else the end of the run of
    /// pages from `k` up to `end` that were not, which can go back in one
    /// install.
    fn undiscarded_run(&mut self, c0: usize, k: usize, end: usize) -> Option<usize> {
        if self.removed(c0 + k) {
            self.outcome[c0 + k] = Outcome::Empty;
            return None;
        }
        let mut e = k + 1;
        while e < end && !self.removed(c0 + e) {
            e += 1;
        }
        Some(e)
    }

    /// Whether the take-out moves page `i`: everything the kernel may hold
    /// data for. Poison markers cannot move (and hold no data); a page a
    /// resolver is filling is left to it unless its contents are being
    /// discarded.
    fn takeable(&self, i: usize) -> bool {
        match self.prior[i].state {
            PageState::Poisoned | PageState::Offline => false,
            PageState::Resolving => self.mode == Mode::Unplug,
            _ => true,
        }
    }

    /// Steps 4 and 5, chunk by chunk: hold the chunk's pages, act on them,
    /// end their invalidation, wake the faults that waited for them. A
    /// fault waits at most for the chunk that holds its page; one on a page
    /// of a later chunk is served meanwhile, and its page is then taken out
    /// with the rest of that chunk. Stops at the first chunk that fails or
    /// is held by the kernel, or when the deadline passes between chunks:
    /// what follows is never touched.
    fn act(&mut self, guard: StagingGuard<'_>, inv: &mut Invalidation<'_>) {
        // Pages left by an offline whose clear failed.
        if let Err(e) = guard.clear(self.shared.uffd()) {
            self.fail(OfflineError::Staging(e));
            return;
        }
        let mut guard = Some(guard);
        while self.pages_done < self.count() && !self.stopped() {
            if self.pages_done > 0 {
                if Instant::now() >= self.deadline {
                    return;
                }
                // Another offline waiting for the staging area goes first.
                let raise = || self.shared.notifier().raise_holders(&GuestRange::new(GuestAddress(0), u64::MAX));
                guard = guard.take().and_then(|g| g.pass_if_waited(self.deadline, raise));
            }
            let Some(st) = guard.as_deref() else { return };
            let c0 = self.pages_done;
            let n = (self.count() - c0).min(st.pages);
            let part = self.page_range(c0, n);
            let prior = hold(self.shared, inv, part, self.region, self.first + c0, n);
            self.prior[c0..c0 + n].copy_from_slice(&prior);
            self.chunk(st, c0, n);
            self.finish(c0, n);
            inv.end_part(part);
            self.shared.kick_deferred();
            if !self.stopped() {
                self.pages_done = c0 + n;
            }
        }
    }

    /// Pages `c0..c0 + n` through staging slots `0..n`.
    fn chunk(&mut self, st: &Staging, c0: usize, n: usize) {
        let (taken, stopped_here) = self.take_out(st, c0, n);
        let mut held = match st.held(n) {
            Ok(held) => held,
            Err(e) => {
                self.fail(OfflineError::Staging(e));
                self.move_back_blind(st, c0, &taken);
                return;
            }
        };
        // A page a remove made `Missing` (origin `Zero`) that the kernel
        // still held was on its way out: its `madvise` zaps only after the
        // remove event is read, and it may not have yet. Its contents must
        // not come back (put back, or stored, they would outlive the
        // discard): they are dropped with the staging slots.
        for k in 0..n {
            let prior = self.prior[c0 + k];
            if taken[k] && prior.state == PageState::Missing && prior.origin == Origin::Zero {
                held[k] = false;
            }
        }
        self.report.pages_taken += (0..n).filter(|&k| taken[k] && held[k]).count();
        for k in (0..n).filter(|&k| taken[k] && !held[k]) {
            self.outcome[c0 + k] = Outcome::Empty;
        }
        if stopped_here {
            self.put_back_held(st, c0, &held, false);
        } else {
            match self.mode {
                Mode::Migrate => self.put_back_held(st, c0, &held, true),
                Mode::Evict => self.store_held(st, c0, &held),
                _ => {}
            }
        }
        // Every staged page is back in guest RAM or in the store (or, for
        // an unplug, meant to go): the slots can be freed.
        if let Err(e) = st.clear(self.shared.uffd()) {
            self.fail(OfflineError::Staging(e));
        }
        if self.mode == Mode::Unplug && !stopped_here {
            self.unplug(Some(st), c0, n);
        }
    }

    /// Moves the takeable pages of the chunk into their staging slots, holes
    /// and all. Returns which pages were taken (moved, or found empty) and
    /// whether the take-out stopped: then the rest of the chunk is still in
    /// guest RAM, and [`Self::kernel_pinned`] or the failure says why.
    fn take_out(&mut self, st: &Staging, c0: usize, n: usize) -> (Vec<bool>, bool) {
        let uffd = self.shared.mem();
        let mut taken = vec![false; n];
        for (i, j) in runs(n, |i| self.takeable(c0 + i)) {
            // Only what the kernel holds is moved: a hole is taken as it
            // is. Asking `UFFDIO_MOVE` to skip holes itself races badly with
            // a discard zapping the same range (the kernel was seen to
            // retry for ever inside the call).
            let occupied = match st.occupied_run(self.host(c0 + i), j - i) {
                Ok(o) => o,
                Err(e) => {
                    self.fail(OfflineError::Staging(e));
                    return (taken, true);
                }
            };
            let mut k = i;
            while k < j {
                if !occupied[k - i] {
                    taken[k] = true;
                    k += 1;
                    continue;
                }
                let mut end = k + 1;
                while end < j && occupied[end - i] {
                    end += 1;
                }
                // SAFETY: pages of guest RAM and the staging area, which no Rust reference ever points into (see `crate::ram`).
                let (done, err) = split(unsafe { uffd.move_pages(st.slot(k), self.host(c0 + k), (end - k) * PAGE_SIZE, false) });
                taken[k..k + done].fill(true);
                k += done;
                let Some(e) = err else { continue };
                if done > 0 {
                    // Partial progress: go on from there to learn why it stopped.
                    continue;
                }
                let again = match e.errno {
                    // Emptied since the look (a discard's zap): a hole now.
                    libc::ENOENT => {
                        taken[k] = true;
                        k += 1;
                        true
                    }
                    // The slot is not empty. Every slot was empty when the
                    // chunk began, so if the guest page is empty now, the
                    // kernel moved it there without counting it (this
                    // happens after a move that stopped part-way): it is
                    // taken. Otherwise a page this offline did not put
                    // there is in the slot: free it and go on.
                    libc::EEXIST => match st.occupied(self.host(c0 + k)) {
                        Ok(false) => {
                            tracing::warn!(target: "apf", slot = k, "apf found a page the kernel moved without counting it");
                            taken[k] = true;
                            k += 1;
                            true
                        }
                        _ => {
                            tracing::warn!(target: "apf", slot = k, "apf staging slot not empty; clearing it");
                            Instant::now() < self.deadline && st.discard(uffd.uffd(), k, 1).is_ok()
                        }
                    },
                    errno => backoff(errno, &[libc::EBUSY], self.deadline),
                };
                if again {
                    continue;
                }
                if e.errno == libc::EBUSY {
                    self.kernel_pinned = j - k;
                } else {
                    self.fail_ioctl(c0 + k, e);
                }
                return (taken, true);
            }
        }
        (taken, false)
    }

    /// Puts the held slots of the chunk back into guest RAM: by `COPY` into
    /// fresh frames (`fresh`), else, or when that fails, by `MOVE` into
    /// their old frames; what neither can place goes to the store.
    fn put_back_held(&mut self, st: &Staging, c0: usize, held: &[bool], fresh: bool) {
        for (a, b) in runs(held.len(), |k| held[k]) {
            self.put_back(st, c0, a, b, fresh);
        }
    }

    /// [`Self::put_back_held`] for one run of held slots `a..b`.
    fn put_back(&mut self, st: &Staging, c0: usize, a: usize, b: usize, fresh: bool) {
        let uffd = self.shared.mem();
        let by = self.restore_deadline();
        let mut copy = fresh;
        let mut k = a;
        while k < b {
            // Under the install lock: a remove event read after this check
            // (under the same lock, exclusively) finds the page installed
            // and its zap clears it; one read before it is seen here.
            let shared = self.shared;
            let guard = shared.notifier().install_lock();
            let Some(e) = self.undiscarded_run(c0, k, b) else {
                drop(guard);
                k += 1;
                continue;
            };
            let (dst, src, len) = (self.host(c0 + k), st.slot(k), (e - k) * PAGE_SIZE);
            let res = if copy {
                // SAFETY: `dst` is pages of guest RAM and `src` as many pages
                // of the staging area: both no Rust reference ever points into (see `crate::ram`).
                unsafe { uffd.copy(dst, src as *const u8, len, false) }
            } else {
                // SAFETY: pages of guest RAM and the staging area, which no Rust reference ever points into (see `crate::ram`).
                unsafe { uffd.move_pages(dst, src, len, false) }
            };
            drop(guard);
            let (done, err) = split(res);
            self.outcome[c0 + k..c0 + k + done].fill(Outcome::InPlace);
            if copy {
                self.report.frames_moved += done;
            }
            k += done;
            let Some(err) = err else { continue };
            if done > 0 {
                continue;
            }
            let again = match err.errno {
                // The guest page is not empty. If the slot is now empty,
                // the kernel moved it back without counting it (after a
                // move that stopped part-way): it is in place. Otherwise,
                // though every access to the page has waited for this
                // offline, something is there: move the intruder aside,
                // the staged contents are the page's.
                libc::EEXIST if !copy && st.occupied(src).is_ok_and(|o| !o) => {
                    tracing::warn!(target: "apf", slot = k, "apf found a page the kernel moved without counting it");
                    self.outcome[c0 + k] = Outcome::InPlace;
                    k += 1;
                    true
                }
                libc::EEXIST => Instant::now() < by && self.move_aside(Some(st), c0 + k, by),
                errno => backoff(errno, &[libc::EBUSY], by),
            };
            if again {
                continue;
            }
            self.fail_ioctl(c0 + k, err);
            if copy {
                // MOVE needs no new page: the staged frame goes back.
                copy = false;
                continue;
            }
            self.keep_in_store(st, c0, k, b);
            return;
        }
    }

    /// Copies held slots `a..b` into the eviction store (those whose page a
    /// balloon did not discard meanwhile).
    fn keep_in_store(&mut self, st: &Staging, c0: usize, a: usize, b: usize) {
        for k in a..b {
            let i = c0 + k;
            let guard = self.shared.notifier().install_lock();
            let removed = self.removed(i);
            drop(guard);
            if removed {
                self.outcome[i] = Outcome::Empty;
                continue;
            }
            // SAFETY: the slot holds a page (the page table says so), so
            // reading it cannot fault into the userfaultfd; only the holder
            // of the staging area touches it.
            let data = unsafe { std::slice::from_raw_parts(st.slot(k) as *const u8, PAGE_SIZE) };
            self.shared.store().insert(self.region.page_gpa(self.first + i), data);
            self.outcome[i] = Outcome::Stored;
        }
    }

    /// `Evict`: the held slots of the chunk go to the store.
    fn store_held(&mut self, st: &Staging, c0: usize, held: &[bool]) {
        for (a, b) in runs(held.len(), |k| held[k]) {
            // SAFETY: slots `a..b` hold pages (see `keep_in_store`).
            let data = unsafe { std::slice::from_raw_parts(st.slot(a) as *const u8, (b - a) * PAGE_SIZE) };
            self.shared.store().insert(self.region.page_gpa(self.first + c0 + a), data);
            self.outcome[c0 + a..c0 + b].fill(Outcome::Stored);
            self.report.pages_evicted += b - a;
        }
    }

    /// The page table of staging could not be read, so which slots hold
    /// pages is unknown: move every taken page back (holes allowed), and
    /// poison what cannot go back.
    fn move_back_blind(&mut self, st: &Staging, c0: usize, taken: &[bool]) {
        let uffd = self.shared.mem();
        let by = self.restore_deadline();
        for (a, e) in runs(taken.len(), |k| taken[k]) {
            let mut k = a;
            while k < e {
                // SAFETY: pages of guest RAM and the staging area, which no Rust reference ever points into (see `crate::ram`).
                let (done, err) = split(unsafe { uffd.move_pages(self.host(c0 + k), st.slot(k), (e - k) * PAGE_SIZE, true) });
                k += done;
                let Some(err) = err else { continue };
                if done > 0 || backoff(err.errno, &[libc::EBUSY], by) {
                    continue;
                }
                // Moved back without being counted (see `put_back`).
                if err.errno == libc::EEXIST && st.occupied(st.slot(k)).is_ok_and(|o| !o) {
                    k += 1;
                    continue;
                }
                for q in k..e {
                    // SAFETY: a page of guest RAM, which no Rust reference
                    // ever points into (see `crate::ram`).
                    let _ = unsafe { uffd.poison(self.host(c0 + q), PAGE_SIZE) };
                    self.outcome[c0 + q] = Outcome::Lost;
                    self.lost.push((self.region.page_gpa(self.first + c0 + q), err));
                }
                k = e;
            }
        }
    }

    /// Takes whatever the kernel holds at page `i` out to the quarantine
    /// slot and drops it (without a staging area: drops it in place). True
    /// if the caller should retry what met it.
    fn move_aside(&self, st: Option<&Staging>, i: usize, by: Instant) -> bool {
        let Some(st) = st else {
            tracing::warn!(
                target: "apf",
                gpa = self.region.page_gpa(self.first + i).0,
                "apf offline found a page where none could be; it was dropped"
            );
            return self.drop_pages(i, 1).is_ok();
        };
        let uffd = self.shared.mem();
        let q = st.quarantine();
        // SAFETY: a page of guest RAM and the staging area, which no Rust reference ever points into (see `crate::ram`).
        match unsafe { uffd.move_pages(st.slot(q), self.host(i), PAGE_SIZE, false) } {
            Ok(_) => {
                tracing::warn!(
                    target: "apf",
                    gpa = self.region.page_gpa(self.first + i).0,
                    "apf offline found a page installed where none could be; it was dropped"
                );
                st.discard(uffd.uffd(), q, 1).is_ok()
            }
            // Nothing there after all (the answer was transient).
            Err(e) if e.errno == libc::ENOENT => true,
            Err(e) if e.errno == libc::EEXIST => st.discard(uffd.uffd(), q, 1).is_ok(),
            Err(e) => backoff(e.errno, &[libc::EBUSY], by),
        }
    }

    /// `Unplug`, after the chunk's contents are gone: the policy.
    fn unplug(&mut self, st: Option<&Staging>, c0: usize, n: usize) {
        let policy = self.shared.config().unplug_policy;
        let mut i = c0;
        while i < c0 + n {
            let state = self.prior[i].state;
            match (state, policy) {
                (PageState::Resolving, _) => {
                    // Its resolver waits for this offline to end, then fills
                    // again, with zeros.
                    self.outcome[i] = Outcome::Unplugged(PageState::Resolving);
                    i += 1;
                }
                (PageState::Poisoned | PageState::Offline, UnplugPolicy::Poison) => {
                    // Its marker, or a hole its next fault poisons again.
                    self.outcome[i] = Outcome::Unplugged(PageState::Offline);
                    i += 1;
                }
                (PageState::Poisoned | PageState::Offline, UnplugPolicy::Zero) => {
                    // The marker must go: a COPY of zeros replaces it.
                    let ok = self.zero_fill(st, i);
                    let to = if ok { PageState::Present } else { PageState::Offline };
                    self.outcome[i] = Outcome::Unplugged(to);
                    i += 1;
                }
                (_, UnplugPolicy::Zero) => {
                    self.outcome[i] = Outcome::Unplugged(PageState::Missing);
                    i += 1;
                }
                (_, UnplugPolicy::Poison) => {
                    let mut j = i + 1;
                    while j < c0 + n && matches!(self.prior[j].state, PageState::Present | PageState::Missing) {
                        j += 1;
                    }
                    self.poison_run(st, i, j);
                    i = j;
                }
            }
        }
        self.report.pages_unplugged +=
            (c0..c0 + n).filter(|&i| matches!(self.outcome[i], Outcome::Unplugged(_))).count();
    }

    /// Poisons pages `a..b` (none of them poisoned by the engine before).
    fn poison_run(&mut self, st: Option<&Staging>, a: usize, b: usize) {
        let uffd = self.shared.mem();
        let by = self.restore_deadline();
        let mut k = a;
        while k < b {
            // SAFETY: pages of guest RAM, which no Rust reference ever
            // points into (see `crate::ram`).
            let (done, err) = split_in(unsafe { uffd.poison(self.host(k), self.bytes(b - k)) }, self.page_size());
            self.outcome[k..k + done].fill(Outcome::Unplugged(PageState::Offline));
            k += done;
            let Some(e) = err else { continue };
            if done > 0 {
                continue;
            }
            let again = match e.errno {
                // Not a marker of the engine's: data is still there (put
                // there since the take-out). Take it out, poison again.
                libc::EEXIST => Instant::now() < by && self.move_aside(st, k, by),
                errno => backoff(errno, &[], by),
            };
            if again {
                continue;
            }
            // Recorded unplugged all the same: its next fault poisons it
            // again, and the error names it.
            self.fail_ioctl(k, e);
            self.outcome[k] = Outcome::Unplugged(PageState::Offline);
            k += 1;
        }
    }

    /// Installs a page of zeros at page `i` (over a poison marker, or a
    /// hole). True on success; on failure the error is recorded.
    fn zero_fill(&mut self, st: Option<&Staging>, i: usize) -> bool {
        let uffd = self.shared.mem();
        let by = self.restore_deadline();
        loop {
            // Zeros are right whether a discard came first or comes after
            // (its zap then clears them, or the marker this replaces), so
            // unlike a put-back this needs no check against removes.
            // SAFETY: a page of guest RAM, which no Rust reference ever
            // points into (see `crate::ram`); `zeros` is at least a page
            // of the largest size guest RAM has.
            let res = unsafe { uffd.copy(self.host(i), self.shared.zeros().as_ptr(), self.page_size(), false) };
            let Err(e) = res else {
                return true;
            };
            let again = match e.errno {
                // COPY replaces a marker: EEXIST means a page is there.
                libc::EEXIST => Instant::now() < by && self.move_aside(st, i, by),
                errno => backoff(errno, &[], by),
            };
            if !again {
                self.fail_ioctl(i, e);
                return false;
            }
        }
    }

    /// Step 5 for pages `c0..c0 + n`: each page's final state from its
    /// outcome, under the install lock (so no remove event is applied
    /// half-way through).
    fn finish(&mut self, c0: usize, n: usize) {
        let store = self.shared.store();
        let policy = self.shared.config().unplug_policy;
        let guard = self.shared.notifier().install_lock();
        for i in c0..c0 + n {
            let p = self.first + i;
            let gpa = self.region.page_gpa(p);
            match decide(self.prior[i], self.outcome[i], self.removed(i), policy) {
                Decision::End { state, origin, drop_stored } => {
                    if drop_stored {
                        store.discard(gpa, self.page_size());
                    }
                    self.shared.checked(self.region.end_invalidate(p, state, Some(origin)));
                }
                Decision::Retarget { origin, drop_stored } => {
                    if let Some(origin) = origin {
                        self.region.set_unresolved_origin(p, origin);
                    }
                    if drop_stored {
                        store.discard(gpa, self.page_size());
                    }
                }
            }
        }
        drop(guard);
    }

    /// The offline's result, once finished.
    fn result(mut self, started: Instant) -> Result<OfflineReport, OfflineError> {
        self.report.elapsed = started.elapsed();
        if let Some(&(first, error)) = self.lost.first() {
            return Err(OfflineError::Lost { range: self.range, first, pages: self.lost.len(), error });
        }
        if let Some(e) = self.failure.take() {
            return Err(e);
        }
        if self.kernel_pinned > 0 {
            return Err(OfflineError::Busy {
                range: self.range,
                waited: started.elapsed(),
                refs: 0,
                hard: 0,
                kernel_pinned: self.kernel_pinned,
                discarded: self.report.pages_unplugged,
                pages_done: self.pages_done,
            });
        }
        if self.pages_done < self.count() {
            return Err(OfflineError::Unfinished { range: self.range, waited: started.elapsed(), pages_done: self.pages_done });
        }
        Ok(self.report)
    }
}

/// Offlines of memory without `UFFDIO_MOVE` (shared memory, an image
/// mapped private, huge pages): the pages are acted on where they are.
///
/// - `Unplug` drops the chunk's pages (a punched hole in shared memory,
///   which raises no event; `MADV_DONTNEED` on an image, whose remove
///   event the event loop applies like a balloon's: the page reads zeros,
///   not the image), then applies the [`UnplugPolicy`].
/// - `Migrate` and `Evict` of shared memory, chunk by chunk under the hold:
///   write-protect the pages (from here a write waits on its write-protect
///   fault, which the event loop defers until the chunk ends), copy what
///   the page cache holds out through the memfd (never through the
///   mapping, which could fault on the offline's own hold), punch the
///   pages, then `COPY` the contents back into frames the allocator hands
///   out (fresh ones, though it may hand a frame the punch just freed
///   straight back) (`Migrate`) or
///   leave them to the eviction store (`Evict`), and clear the protection,
///   which wakes the writers: they fault again on the hole, or write to
///   the fresh frame. No write lands between the copy and the punch.
///
/// - `Migrate` and `Evict` of an image do the same to the private copies
///   only, and of private huge pages to every page (see
///   [`Work::copy_out_private`]).
///
/// Huge pages are acted on whole, one per chunk: an unplug or a drop gives
/// them back to the pool, and a `COPY` back takes one from it; a dry pool
/// there keeps the contents in the eviction store
/// ([`OfflineError::NoMemory`]). On shared huge pages only the pages mapped
/// here are taken (the kernel cannot say what a hugetlbfs page cache
/// holds); one kept unmapped in the page cache is left where it is.
///
/// Failures: write protection that cannot be set leaves the chunk as it
/// was (protection cleared again); a punch that fails stops the offline
/// after the pages already punched are restored or stored; a `COPY` back
/// that fails leaves the page to the eviction store. Protection that
/// cannot be cleared is cleared by the next write-protect fault on the
/// page, which the event loop answers by clearing it.
impl Work<'_> {
    /// The index of this work's region in guest RAM.
    fn region_idx(&self) -> usize {
        self.shared.ram().regions().iter().position(|r| std::ptr::eq(r, self.region)).unwrap_or(0)
    }

    /// Drops `count` pages from page `i` of the range as the memory kind
    /// does: a punched hole in shared memory, `MADV_DONTNEED` otherwise
    /// (whole huge pages on hugetlb, which go back to the pool).
    fn drop_pages(&self, i: usize, count: usize) -> io::Result<()> {
        #[cfg(feature = "failpoints")]
        {
            let host = self.host(i);
            let fp = self.shared.uffd().failpoints().take(crate::uffd::Op::Punch, [host, host], self.bytes(count));
            match fp {
                Some(f) if f.pause => self.shared.uffd().failpoints().wait_at_gate(),
                Some(f) => return Err(io::Error::from_raw_os_error(f.errno)),
                None => {}
            }
        }
        if self.shared.ram().kind().page_cache_is_truth() {
            return self.shared.ram().punch(self.region_idx(), self.first + i, count);
        }
        // SAFETY: pages of guest RAM, which no Rust reference ever points
        // into (see `crate::ram`); dropping them is what a balloon does, and
        // this offline holds them. On registered memory the call returns
        // once the event loop has read its remove event, and nothing the
        // event loop waits for is held here.
        if unsafe { libc::madvise(self.host(i) as *mut libc::c_void, self.bytes(count), libc::MADV_DONTNEED) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Steps 4 and 5 without a staging area: chunk by chunk, hold, act in
    /// place, end.
    fn act_in_place(&mut self, inv: &mut Invalidation<'_>) {
        while self.pages_done < self.count() && !self.stopped() {
            if self.pages_done > 0 && Instant::now() >= self.deadline {
                return;
            }
            let c0 = self.pages_done;
            // A chunk is the staging area's bytes, and at least one page:
            // one huge page at a time on hugetlb, so that a migrate needs
            // one free huge page of slack in the pool, and a fault waits
            // behind one page's copy.
            let chunk = (STAGING_PAGES * PAGE_SIZE / self.page_size()).max(1);
            let n = (self.count() - c0).min(chunk);
            let part = self.page_range(c0, n);
            let prior = hold(self.shared, inv, part, self.region, self.first + c0, n);
            self.prior[c0..c0 + n].copy_from_slice(&prior);
            match self.mode {
                Mode::Unplug => self.unplug_in_place(c0, n),
                _ => self.copy_out_in_place(c0, n),
            }
            self.finish(c0, n);
            inv.end_part(part);
            self.shared.kick_deferred();
            if !self.stopped() {
                self.pages_done = c0 + n;
            }
        }
    }

    /// `Unplug` of pages `c0..c0 + n`: drop them, apply the policy.
    fn unplug_in_place(&mut self, c0: usize, n: usize) {
        for (a, b) in runs(n, |k| self.takeable(c0 + k)) {
            if let Err(source) = self.drop_pages(c0 + a, b - a) {
                self.fail(OfflineError::Punch { range: self.page_range(c0 + a, b - a), source });
                // The pages before this run are gone: they get the policy.
                self.unplug(None, c0, a);
                return;
            }
            self.report.pages_taken += b - a;
        }
        self.unplug(None, c0, n);
    }

    /// The `/proc/self/pagemap` entries of pages `c0..c0 + n` of the
    /// chunk, one per page (its first 4 KiB: a huge page is mapped whole).
    fn pagemap(&self, c0: usize, n: usize) -> io::Result<Vec<u64>> {
        let per_page = self.page_size() / PAGE_SIZE;
        let pm = File::open("/proc/self/pagemap")?;
        let mut raw = vec![0u8; n * per_page * 8];
        pm.read_exact_at(&mut raw, self.host(c0) / PAGE_SIZE as u64 * 8)?;
        Ok(raw
            .chunks_exact(8)
            .step_by(per_page)
            .map(|e| u64::from_ne_bytes(e.try_into().unwrap_or([0; 8])))
            .collect())
    }

    /// `Migrate` or `Evict` of private memory without `MOVE`, pages
    /// `c0..c0 + n`: an image's private copies, or private huge pages.
    /// Only anonymous pages (the guest's writes; every page of private
    /// hugetlb memory) are the guest's own: they are protected, read
    /// through `/proc/self/mem` (which never waits on the userfaultfd: a
    /// page gone meanwhile answers an error), dropped with `MADV_DONTNEED`
    /// (announced to the event loop as the offline's own discard, so its
    /// remove event does not read as a balloon's; a dropped huge page goes
    /// back to the pool) and copied back into fresh frames or stored.
    /// Pages mapped from the image's page cache are the image's, shared
    /// with every clone: they are left where they are.
    fn copy_out_private(&mut self, c0: usize, n: usize) {
        let ps = self.page_size();
        let runs = runs(n, |k| self.takeable(c0 + k));
        for (r, &(a, b)) in runs.iter().enumerate() {
            if let Err(e) = self.writeprotect(c0 + a, b - a, true, self.deadline) {
                self.fail_ioctl(c0 + a, e);
                self.unprotect(c0, &runs[..=r]);
                return;
            }
        }
        let (entries, proc_mem) = match (self.pagemap(c0, n), File::open("/proc/self/mem")) {
            (Ok(e), Ok(m)) => (e, m),
            (Err(e), _) | (_, Err(e)) => {
                self.fail(OfflineError::Staging(e));
                self.unprotect(c0, &runs);
                return;
            }
        };
        let private: Vec<bool> = (0..n)
            .map(|k| self.takeable(c0 + k) && entries[k] & (PM_PRESENT | PM_SWAP) != 0 && entries[k] & PM_FILE == 0)
            .collect();
        let mut buf = vec![0u8; self.bytes(n)];
        let mut got = private.clone();
        for (a, b) in runs_in(0, n, |k| private[k]) {
            if proc_mem.read_exact_at(&mut buf[a * ps..b * ps], self.host(c0 + a)).is_err() {
                // A page a balloon's zap took meanwhile: the others are read
                // one by one.
                for (k, got) in got.iter_mut().enumerate().take(b).skip(a) {
                    *got = proc_mem.read_exact_at(&mut buf[k * ps..(k + 1) * ps], self.host(c0 + k)).is_ok();
                }
            }
        }
        for (x, y) in runs_in(0, n, |k| private[k] && !got[k]) {
            self.outcome[c0 + x..c0 + y].fill(Outcome::Empty);
        }
        let mut dropped = Vec::new();
        for (a, b) in runs_in(0, n, |k| got[k]) {
            let start = self.host(c0 + a);
            let end = start + self.bytes(b - a) as u64;
            self.shared.own_discard_begin(start, end);
            let res = self.drop_pages(c0 + a, b - a);
            self.shared.own_discard_done(start, end, res.is_ok(), self.restore_deadline());
            if let Err(source) = res {
                self.fail(OfflineError::Punch { range: self.page_range(c0 + a, b - a), source });
                break;
            }
            dropped.push((a, b));
        }
        for &(a, b) in &dropped {
            self.report.pages_taken += b - a;
            match self.mode {
                Mode::Migrate => self.copy_back(c0, a, b, &buf),
                _ => self.store_run(c0, a, b, &buf),
            }
        }
        self.unprotect(c0, &runs);
    }

    /// Pages `x..y` of the chunk, read into `buf`, to the eviction store.
    fn store_run(&mut self, c0: usize, x: usize, y: usize, buf: &[u8]) {
        let gpa = self.region.page_gpa(self.first + c0 + x);
        self.shared.store().insert(gpa, &buf[self.bytes(x)..self.bytes(y)]);
        self.outcome[c0 + x..c0 + y].fill(Outcome::Stored);
        self.report.pages_evicted += y - x;
    }

    /// `Migrate` or `Evict` of shared memory, pages `c0..c0 + n`.
    fn copy_out_in_place(&mut self, c0: usize, n: usize) {
        if matches!(self.shared.ram().kind(), MemoryKind::Image | MemoryKind::PrivateHugetlb | MemoryKind::HugetlbImage) {
            return self.copy_out_private(c0, n);
        }
        let ps = self.page_size();
        let runs = runs(n, |k| self.takeable(c0 + k));
        // 1. Writes wait from here on. (The kernel refuses `DONTWAKE` with
        // setting protection, which wakes nobody anyway.)
        for (r, &(a, b)) in runs.iter().enumerate() {
            if let Err(e) = self.writeprotect(c0 + a, b - a, true, self.deadline) {
                self.fail_ioctl(c0 + a, e);
                self.unprotect(c0, &runs[..=r]);
                return;
            }
        }
        // 2. Which pages hold data, and their contents as the page cache
        // holds them. On hugetlbfs the kernel cannot say what its page
        // cache holds (see `GuestRam::file_runs`): the pages mapped here
        // are taken; one it keeps unmapped (a discard that kept it) is left
        // where it is, untouched, as is its hole.
        let region = self.region_idx();
        let mut buf = vec![0u8; self.bytes(n)];
        let mut data = vec![false; n];
        let huge = self.region.is_huge();
        let read = if huge {
            self.pagemap(c0, n).map(|entries| {
                for (k, d) in data.iter_mut().enumerate() {
                    *d = self.takeable(c0 + k) && entries[k] & PM_PRESENT != 0;
                }
            })
        } else {
            self.shared.ram().file_runs(region, self.first + c0, n).unwrap_or_else(|| {
                Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
            }).map(|runs| {
                for (p, e, d) in runs {
                    data[p - self.first - c0..e - self.first - c0].fill(d);
                }
            })
        };
        let read = read.and_then(|()| {
            for (x, y) in runs_in(0, n, |k| data[k]) {
                self.shared.ram().read_file(region, self.first + c0 + x, &mut buf[x * ps..y * ps])?;
            }
            Ok(())
        });
        if let Err(e) = read {
            self.fail(OfflineError::Staging(e));
            self.unprotect(c0, &runs);
            return;
        }
        // 3. Punch: the old frames go (holes need none; on hugetlbfs the
        // pages left unmapped keep theirs).
        let mut punched = Vec::new();
        for (a, b) in runs_in(0, n, |k| data[k]) {
            if let Err(source) = self.drop_pages(c0 + a, b - a) {
                self.fail(OfflineError::Punch { range: self.page_range(c0 + a, b - a), source });
                break;
            }
            punched.push((a, b));
        }
        // 4. The contents of what was punched: back into fresh frames, or
        // to the store. A hole the page cache had is empty.
        if !huge {
            let upto = if self.stopped() { punched.last().map_or(0, |&(_, b)| b) } else { n };
            for (x, y) in runs_in(0, upto, |k| self.takeable(c0 + k) && !data[k]) {
                self.outcome[c0 + x..c0 + y].fill(Outcome::Empty);
            }
        }
        for &(x, y) in &punched {
            self.report.pages_taken += y - x;
            match self.mode {
                Mode::Migrate => self.copy_back(c0, x, y, &buf),
                _ => self.store_run(c0, x, y, &buf),
            }
        }
        // 5. Writers go on: into the fresh frames, or onto the holes,
        // where they fault and wait for the chunk's end.
        self.unprotect(c0, &runs);
    }

    /// Copies pages `x..y` of the chunk from `buf` into the holes punched
    /// for them, skipping pages a balloon discarded meanwhile; what cannot
    /// go back goes to the store.
    fn copy_back(&mut self, c0: usize, x: usize, y: usize, buf: &[u8]) {
        let uffd = self.shared.mem();
        let by = self.restore_deadline();
        let ps = self.page_size();
        let mut k = x;
        // The page a dry pool's refill was asked for (once per page).
        let mut refilled = None;
        while k < y {
            // Under the install lock, as `put_back` does.
            let shared = self.shared;
            let guard = shared.notifier().install_lock();
            let Some(e) = self.undiscarded_run(c0, k, y) else {
                drop(guard);
                k += 1;
                continue;
            };
            // SAFETY: pages of guest RAM, which no Rust reference ever
            // points into (see `crate::ram`); `buf` holds `y - x` pages from
            // `x`.
            let res = unsafe { uffd.copy(self.host(c0 + k), buf[k * ps..].as_ptr(), (e - k) * ps, true) };
            drop(guard);
            let (done, err) = split_in(res, ps);
            self.outcome[c0 + k..c0 + k + done].fill(Outcome::InPlace);
            self.report.frames_moved += done;
            k += done;
            let Some(err) = err else { continue };
            if done > 0 || backoff(err.errno, &[], by) {
                continue;
            }
            // (A dry pool answers a huge-page COPY with EEXIST, nothing
            // mapped, or ENOMEM.)
            let dry = || {
                err.errno == libc::ENOMEM
                    || (err.errno == libc::EEXIST && self.huge_page_there(c0 + k).ok() == Some(false))
            };
            if self.region.is_huge() && refilled != Some(k) && dry() {
                // The embedder may add pages: then the page goes back after all.
                refilled = Some(k);
                if self.shared.refill() {
                    continue;
                }
            }
            if err.errno == libc::ENOMEM && self.region.is_huge() {
                self.fail(OfflineError::NoMemory { range: self.page_range(c0 + k, 1) });
                self.store_run(c0, k, k + 1, buf);
                k += 1;
                continue;
            }
            if err.errno == libc::EEXIST && self.region.is_huge() {
                match self.huge_page_there(c0 + k) {
                    Ok(true) => {
                        tracing::warn!(target: "apf", gpa = self.region.page_gpa(self.first + c0 + k).0, "apf found a huge page in place during a migrate; kept");
                        self.outcome[c0 + k] = Outcome::InPlace;
                    }
                    // A dry pool: the contents wait in the store for the
                    // page's next fault.
                    Ok(false) => {
                        self.fail(OfflineError::NoMemory { range: self.page_range(c0 + k, 1) });
                        self.store_run(c0, k, k + 1, buf);
                    }
                    Err(error) => {
                        self.fail_ioctl(c0 + k, error);
                        self.store_run(c0, k, k + 1, buf);
                    }
                }
                k += 1;
                continue;
            }
            if err.errno == libc::EEXIST {
                // The page cache got a page there while the offline held
                // it (a write through the file): the kernel's is newer.
                tracing::warn!(target: "apf", gpa = self.region.page_gpa(self.first + c0 + k).0, "apf found a page written through the file during a migrate; kept");
                self.outcome[c0 + k] = Outcome::InPlace;
                k += 1;
                continue;
            }
            self.fail_ioctl(c0 + k, err);
            self.store_run(c0, k, k + 1, buf);
            k += 1;
        }
    }

    /// After a `COPY` onto huge page `i` of the chunk answered `EEXIST`:
    /// whether a page is really there (true), or the pool had none for the
    /// copy (false), which the kernel answers the same way. On shared
    /// memory the page cache may hold one: `CONTINUE` maps it, and fails
    /// with `EFAULT` if there is none. A private page is mapped here, which
    /// the page map shows.
    fn huge_page_there(&self, i: usize) -> Result<bool, IoctlError> {
        if self.shared.ram().kind() == MemoryKind::SharedHugetlb {
            // SAFETY: a page of guest RAM, which no Rust reference ever
            // points into (see `crate::ram`); mapping what the page cache
            // holds changes no contents.
            return match unsafe { self.shared.mem().continue_pages(self.host(i), self.page_size(), true) } {
                Ok(_) => Ok(true),
                Err(e) if e.errno == libc::EEXIST => Ok(true),
                Err(e) if e.errno == libc::EFAULT => Ok(false),
                Err(e) => Err(e),
            };
        }
        let entries = self.pagemap(i, 1).map_err(|e| IoctlError {
            op: crate::uffd::Op::Copy.name(),
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            done: 0,
        })?;
        Ok(entries[0] & PM_PRESENT != 0)
    }

    /// Sets or clears the write protection of `count` pages from page `i`
    /// of the range, under the retry rule (`EAGAIN`: a remove event is
    /// pending; the event loop reads it) until `by`.
    fn writeprotect(&self, i: usize, count: usize, protect: bool, by: Instant) -> Result<(), IoctlError> {
        loop {
            match self.shared.mem().writeprotect(self.host(i), self.bytes(count), protect, false) {
                Err(e) if backoff(e.errno, &[], by) => {}
                res => return res,
            }
        }
    }

    /// Clears the write protection of `runs` of the chunk, waking the
    /// writers. A failure is reported; the next write-protect fault on such
    /// a page clears it (the event loop does).
    fn unprotect(&mut self, c0: usize, runs: &[(usize, usize)]) {
        for &(a, b) in runs {
            if let Err(e) = self.writeprotect(c0 + a, b - a, false, self.restore_deadline()) {
                self.fail_ioctl(c0 + a, e);
                self.shared.wake(self.host(c0 + a), self.bytes(b - a));
            }
        }
    }
}

/// The maximal runs within `a..b` where `set` holds, as `(start, end)`.
fn runs_in(a: usize, b: usize, set: impl Fn(usize) -> bool) -> Vec<(usize, usize)> {
    runs(b - a, |k| set(a + k)).into_iter().map(|(x, y)| (a + x, a + y)).collect()
}

/// What step 5 makes of one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// A page this offline marked: its invalidation ends in this state and
    /// origin; `drop_stored` drops its copy in the eviction store.
    End { state: PageState, origin: Origin, drop_stored: bool },
    /// A page a resolver held throughout: it stays claimed, with a new
    /// origin if given (its resolver sees the sequence move and fills again
    /// from there).
    Retarget { origin: Option<Origin>, drop_stored: bool },
}

/// The final state of a page from the state and origin it had when the
/// offline marked it, what the offline did to it, and whether a remove
/// (a balloon's discard) touched it meanwhile. Pure: the table test below
/// pins every row.
fn decide(prior: Prior, outcome: Outcome, removed: bool, policy: UnplugPolicy) -> Decision {
    if prior.state == PageState::Resolving {
        return match outcome {
            // Zeros, or poison: what an unplug leaves.
            Outcome::Unplugged(_) => Decision::Retarget {
                origin: Some(match policy {
                    UnplugPolicy::Zero => Origin::Zero,
                    UnplugPolicy::Poison => Origin::Unplugged,
                }),
                drop_stored: true,
            },
            Outcome::Stored => Decision::Retarget { origin: Some(Origin::Store), drop_stored: false },
            _ => Decision::Retarget { origin: None, drop_stored: false },
        };
    }
    let (mut state, mut origin) = match outcome {
        Outcome::Untouched => (prior.state, prior.origin),
        Outcome::InPlace => (PageState::Present, prior.origin),
        // Present in the engine's view but not the kernel's: a discard
        // behind its back (its remove event is on the way).
        Outcome::Empty if prior.state == PageState::Present => (PageState::Missing, Origin::Zero),
        Outcome::Empty => (prior.state, prior.origin),
        Outcome::Stored => (PageState::Missing, Origin::Store),
        Outcome::Unplugged(state) => (state, Origin::Zero),
        Outcome::Lost => (PageState::Poisoned, prior.origin),
    };
    let mut drop_stored = matches!(outcome, Outcome::Unplugged(_)) && prior.origin == Origin::Store;
    if removed {
        // What a remove does to a page (see `Region::mark_removed`). A page
        // this offline filled with zeros stays `Present` (origin `Zero`):
        // its COPY may have come after the zap, and then the kernel holds
        // it; if the zap comes after, the next fault finds it missing and
        // refills zeros.
        let zero_filled = outcome == Outcome::Unplugged(PageState::Present);
        if matches!(state, PageState::Present | PageState::Poisoned) && !zero_filled {
            state = PageState::Missing;
        }
        drop_stored |= origin == Origin::Store;
        // A discard does not undo an unplug under the poison policy: a
        // page a resolver gave back before poisoning it stays to be
        // poisoned.
        if origin != Origin::Unplugged {
            origin = Origin::Zero;
        }
    }
    Decision::End { state, origin, drop_stored }
}

pub(crate) fn offline(
    shared: &Core,
    staging: Option<&Staging>,
    range: GuestRange,
    mode: Mode,
    deadline: Instant,
) -> Result<OfflineReport, OfflineError> {
    shared.running()?;
    let in_place = !matches!(mode, Mode::HostBlock(_)) && !shared.mem().supports(MemOp::Move);
    if in_place && !offered_in_place(shared, mode) {
        return Err(OfflineError::NotOffered { mode, backend: shared.mem().name() });
    }
    if in_place && mode != Mode::Unplug && shared.ram().is_shared_out() {
        return Err(OfflineError::SharedWithOthers(range));
    }
    let (loc, count) = shared.ram().check_range(range)?;
    let span = tracing::info_span!(
        target: "apf",
        "apf.offline",
        gpa = range.start.0,
        len = range.len,
        mode = mode.as_str(),
        pins = field::Empty,
        pages = field::Empty,
        outcome = field::Empty,
    );
    let _entered = span.enter();
    let result = match mode {
        Mode::HostBlock(n) => crate::offline::host_block(shared, range, n, deadline),
        _ if in_place => offline_in_place(shared, loc.region, loc.page, count, range, mode, deadline),
        _ => offline_pages(shared, staging, loc.region, loc.page, count, range, mode, deadline),
    };
    match &result {
        Ok(r) => {
            span.record("pins", r.pins_called);
            span.record("pages", r.pages_taken);
            span.record("outcome", "done");
            shared.stats().offlines.add(1);
        }
        Err(e) if e.is_busy() => {
            span.record("outcome", "busy");
            shared.stats().offline_busy.add(1);
        }
        Err(_) => {
            span.record("outcome", "error");
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn offline_pages(
    shared: &Core,
    staging: Option<&Staging>,
    region_idx: usize,
    first: usize,
    count: usize,
    range: GuestRange,
    mode: Mode,
    deadline: Instant,
) -> Result<OfflineReport, OfflineError> {
    let started = Instant::now();
    let staging = staging.ok_or(OfflineError::NotOffered { mode, backend: shared.mem().name() })?;
    let region = &shared.ram().regions()[region_idx];
    // 1. Announce: from here no new reference is granted on the range,
    // while faults on it are still served.
    let mut inv = shared.notifier().announce(&[range], mode.reason()).map_err(|o| OfflineError::Overlap(o.0))?;
    // 2. Callbacks.
    let pins_called = inv.call_intervals();
    shared.stats().pin_invalidations.add(pins_called as u64);
    // 3. Drain, then the staging area. Nothing of the range is held yet, so
    // a holder of a reference waited for here is never blocked by this
    // offline, whatever it touches.
    if let Err(held) = inv.wait_drained(true, deadline) {
        return Err(OfflineError::Busy {
            range,
            waited: started.elapsed(),
            refs: held.refs,
            hard: held.hard,
            kernel_pinned: 0,
            discarded: 0,
            pages_done: 0,
        });
    }
    let raise = || shared.notifier().raise_holders(&GuestRange::new(GuestAddress(0), u64::MAX));
    let Some(guard) = staging.acquire(deadline, raise) else {
        return Err(OfflineError::StagingBusy { range, waited: started.elapsed() });
    };
    // 4, 5. Chunk by chunk: hold, act, end.
    let unset = Prior { state: PageState::Resolving, origin: Origin::Source };
    let mut work = Work::new(shared, region, first, range, mode, deadline, vec![unset; count]);
    work.report.pins_called = pins_called;
    work.act(guard, &mut inv);
    drop(inv);
    shared.kick_deferred();
    shared.stats().frames_moved.add(work.report.frames_moved as u64);
    shared.stats().pages_evicted.add(work.report.pages_evicted as u64);
    shared.stats().pages_unplugged.add(work.report.pages_unplugged as u64);
    work.result(started)
}

/// Whether memory without `UFFDIO_MOVE` can go through `mode` in place:
/// `Unplug` on shared memory, images and huge pages, `Migrate` and `Evict` on
/// memory registered for write protection.
fn offered_in_place(shared: &Core, mode: Mode) -> bool {
    let kind = shared.ram().kind();
    let offered = kind != MemoryKind::PrivateAnonymous && !shared.ram().is_remote() && mode.offered_on(kind);
    offered && (mode == Mode::Unplug || shared.mem().supports(MemOp::WriteProtect))
}

/// [`offline_pages`] for memory without `UFFDIO_MOVE`: the same steps, the
/// pages acted on in place (see [`Work::act_in_place`]).
#[allow(clippy::too_many_arguments)]
fn offline_in_place(
    shared: &Core,
    region_idx: usize,
    first: usize,
    count: usize,
    range: GuestRange,
    mode: Mode,
    deadline: Instant,
) -> Result<OfflineReport, OfflineError> {
    let started = Instant::now();
    let region = &shared.ram().regions()[region_idx];
    let mut inv = shared.notifier().announce(&[range], mode.reason()).map_err(|o| OfflineError::Overlap(o.0))?;
    let pins_called = inv.call_intervals();
    shared.stats().pin_invalidations.add(pins_called as u64);
    if let Err(held) = inv.wait_drained(true, deadline) {
        return Err(OfflineError::Busy {
            range,
            waited: started.elapsed(),
            refs: held.refs,
            hard: held.hard,
            kernel_pinned: 0,
            discarded: 0,
            pages_done: 0,
        });
    }
    let unset = Prior { state: PageState::Resolving, origin: Origin::Source };
    let mut work = Work::new(shared, region, first, range, mode, deadline, vec![unset; count]);
    work.report.pins_called = pins_called;
    work.act_in_place(&mut inv);
    drop(inv);
    shared.kick_deferred();
    shared.stats().frames_moved.add(work.report.frames_moved as u64);
    shared.stats().pages_evicted.add(work.report.pages_evicted as u64);
    shared.stats().pages_unplugged.add(work.report.pages_unplugged as u64);
    work.result(started)
}

/// Begins an exclusive invalidation of `range` (pages `first..first +
/// count` of `region`) that holds its pages at once, with no drain;
/// returns it with the state and origin each page had.
fn begin<'a>(
    shared: &'a Core,
    region: &Region,
    first: usize,
    count: usize,
    range: GuestRange,
    reason: Reason,
) -> Result<(Invalidation<'a>, Vec<Prior>), OfflineError> {
    let mut inv = shared.notifier().announce(&[range], reason).map_err(|o| OfflineError::Overlap(o.0))?;
    let prior = hold(shared, &mut inv, range, region, first, count);
    Ok((inv, prior))
}

/// Holds `part` of an announced invalidation (pages `first..first + count`
/// of `region`), marking its pages; returns the state and origin each page
/// had.
fn hold(
    shared: &Core,
    inv: &mut Invalidation<'_>,
    part: GuestRange,
    region: &Region,
    first: usize,
    count: usize,
) -> Vec<Prior> {
    let mut prior = vec![Prior { state: PageState::Resolving, origin: Origin::Source }; count];
    inv.hold_part(&[part], || {
        for (i, prior) in prior.iter_mut().enumerate() {
            let p = first + i;
            let origin = region.state(p).1;
            let state = region.begin_invalidate(p);
            *prior = Prior { state, origin };
            if state != PageState::Resolving {
                // A remove event sets a marked page's origin to `Zero`.
                // With every marked page at `Source` from here on,
                // `Zero` at the end means a balloon discarded it while
                // this offline held it (see `Work::removed`); the real
                // origin is kept in `prior` and set again at the end.
                shared.checked(region.end_invalidate(p, PageState::Invalidating, Some(Origin::Source)));
            }
        }
    });
    prior
}

/// Brings unplugged (poisoned) pages of `range` back as zero pages.
/// Each page's `COPY` of zeros is retried up to the engine's install
/// deadline; a page that cannot be brought back stays unplugged and the
/// error names it.
pub(crate) fn replug(shared: &Core, staging: Option<&Staging>, range: GuestRange) -> Result<usize, OfflineError> {
    let started = Instant::now();
    let deadline = started + shared.config().install_deadline;
    let (loc, count) = shared.ram().check_range(range)?;
    let region = &shared.ram().regions()[loc.region];
    let (inv, prior) = begin(shared, region, loc.page, count, range, Reason::Unplug)?;
    let mut work = Work::new(shared, region, loc.page, range, Mode::Unplug, deadline, prior);
    // The staging area is only needed to move aside a page found where
    // the marker should be; without `UFFDIO_MOVE` such a page is dropped
    // in place.
    let guard = match staging.map(|s| s.acquire(deadline, || {})) {
        Some(None) => None,
        other => Some(other.flatten()),
    };
    let mut replugged = 0;
    if let Some(guard) = &guard {
        for i in 0..count {
            // A resolver told to poison a page an unplug took from it fills
            // zeros instead (it sees this replug's sequence and looks again).
            let p = loc.page + i;
            if work.prior[i].state == PageState::Resolving && region.claimed_origin(p) == Origin::Unplugged {
                region.set_unresolved_origin(p, Origin::Zero);
                replugged += 1;
            }
            // One its resolver gave back before poisoning it: missing, and
            // to be poisoned by its next fault unless it comes back here.
            if work.prior[i] == (Prior { state: PageState::Missing, origin: Origin::Unplugged }) {
                work.outcome[i] = Outcome::Unplugged(PageState::Missing);
                replugged += 1;
            }
            if work.prior[i].state == PageState::Offline && work.zero_fill(guard.as_deref(), i) {
                work.outcome[i] = Outcome::Unplugged(PageState::Present);
                replugged += 1;
            }
        }
    }
    work.finish(0, count);
    drop(inv);
    shared.kick_deferred();
    if guard.is_none() {
        return Err(OfflineError::StagingBusy { range, waited: started.elapsed() });
    }
    match work.failure {
        Some(e) => Err(e),
        None => Ok(replugged),
    }
}

/// [`Mode::HostBlock`]: invalidates the pins over the guest pages of
/// `range` that live in host block `block`, waits for short-term references
/// to them, then has the kernel offline the block (migrating every page in
/// it) and online it again. The pages stay present throughout: kernel
/// migration is transparent to their users, and KVM follows it through its
/// MMU notifier. What the kernel cannot move (a hard pin, a kernel pin no
/// callback dropped) stops it at the deadline: [`OfflineError::BlockBusy`].
pub(crate) fn host_block(
    shared: &Core,
    range: GuestRange,
    block: u32,
    deadline: Instant,
) -> Result<OfflineReport, OfflineError> {
    use crate::hostmem::{self, BlockLock, HostMemError, Pagemap};
    let started = Instant::now();
    let (loc, count) = shared.ram().check_range(range)?;
    let region = &shared.ram().regions()[loc.region];
    let block_size = hostmem::block_size().map_err(OfflineError::HostBlock)?;
    let pagemap = Pagemap::open().map_err(OfflineError::HostBlock)?;
    let in_block = |pfns: &[Option<u64>]| -> Vec<bool> {
        pfns.iter().map(|p| p.is_some_and(|pfn| hostmem::block_of_pfn(pfn, block_size) == block)).collect()
    };
    // The pagemap has an entry per small page: a huge page (which lies in
    // one block) is told by its first.
    let ratio = region.page_size() / PAGE_SIZE;
    let pfns = |addr: u64| -> Result<Vec<Option<u64>>, OfflineError> {
        let all = pagemap.pfns(addr, count * ratio).map_err(OfflineError::HostBlock)?;
        Ok(if ratio == 1 { all } else { all.into_iter().step_by(ratio).collect() })
    };
    let before = pfns(region.page_host(loc.page))?;
    let mine = in_block(&before);
    let mut runs = Vec::new();
    let mut i = 0;
    while i < count {
        if !mine[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < count && mine[i] {
            i += 1;
        }
        runs.push(GuestRange::new(region.page_gpa(loc.page + start), region.pages_len(i - start) as u64));
    }
    if runs.is_empty() {
        return Err(OfflineError::NotInBlock { range, block });
    }
    let mut lock = BlockLock::acquire(deadline).map_err(OfflineError::HostBlock)?;
    let mut inv = shared.notifier().announce(&runs, Reason::HostBlock).map_err(|o| OfflineError::Overlap(o.0))?;
    let mut report = OfflineReport { pages: count, ..OfflineReport::default() };
    report.block_pages = mine.iter().filter(|m| **m).count();
    report.pins_called = inv.call_intervals();
    shared.stats().pin_invalidations.add(report.pins_called as u64);
    // Hard pins are left to the kernel: it is the one that cannot move them.
    if let Err(held) = inv.wait_drained(false, deadline) {
        return Err(OfflineError::Busy {
            range,
            waited: started.elapsed(),
            refs: held.refs,
            hard: 0,
            kernel_pinned: 0,
            discarded: 0,
            pages_done: 0,
        });
    }
    // Faults on the range wait while the block goes (no page is marked:
    // they stay present, and the kernel moves them).
    inv.hold(|| {});
    let result = hostmem::offline_and_online(&mut lock, block, deadline);
    drop(inv);
    match result {
        Ok(_) => {}
        Err(HostMemError::TimedOut { waited, .. }) => {
            return Err(OfflineError::BlockBusy { block, waited: started.elapsed().max(waited) });
        }
        Err(e) => return Err(OfflineError::HostBlock(e)),
    }
    let after = pfns(region.page_host(loc.page))?;
    report.frames_moved = mine.iter().zip(before.iter().zip(&after)).filter(|(m, (b, a))| **m && b != a).count();
    report.pages_taken = report.block_pages;
    report.elapsed = started.elapsed();
    shared.stats().frames_moved.add(report.frames_moved as u64);
    Ok(report)
}

/// What [`crate::Engine::offline_any_host_block`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostBlockSearch {
    /// Block `block` went offline and came back; its guest pages moved.
    Offlined {
        /// The block.
        block: u32,
        /// What the offline did.
        report: OfflineReport,
    },
    /// No block holding guest pages could be offlined.
    NoneQualified {
        /// Blocks holding guest pages.
        candidates: usize,
        /// Of those, blocks that hold unmovable kernel memory (EBUSY at once).
        unmovable: usize,
        /// Of those, blocks that did not finish before their deadline
        /// (pages held by someone else: another process, a kernel buffer).
        held: usize,
    },
}

impl fmt::Display for HostBlockSearch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostBlockSearch::Offlined { block, report } => write!(
                f,
                "block {block}: {} guest pages moved, {} pins called, {:?}",
                report.frames_moved, report.pins_called, report.elapsed
            ),
            HostBlockSearch::NoneQualified { candidates, unmovable, held } => {
                write!(f, "{candidates} blocks hold guest pages: {unmovable} hold kernel memory, {held} held by others")
            }
        }
    }
}

/// Tries the host blocks holding pages of `range`, most guest pages first,
/// each bounded by `attempt`, until one goes offline (and back online).
pub(crate) fn offline_any_host_block(
    shared: &Core,
    range: GuestRange,
    attempt: std::time::Duration,
) -> Result<HostBlockSearch, OfflineError> {
    use crate::hostmem::{self, HostMemError, Pagemap};
    let (loc, count) = shared.ram().check_range(range)?;
    let region = &shared.ram().regions()[loc.region];
    let block_size = hostmem::block_size().map_err(OfflineError::HostBlock)?;
    // An entry per small page (counts per block are of small pages).
    let small = region.pages_len(count) / PAGE_SIZE;
    let pfns =
        Pagemap::open().and_then(|pm| pm.pfns(region.page_host(loc.page), small)).map_err(OfflineError::HostBlock)?;
    let mut blocks = hostmem::blocks_holding(&pfns, block_size);
    blocks.sort_by_key(|&(_, pages)| std::cmp::Reverse(pages));
    let (mut unmovable, mut held) = (0, 0);
    for &(block, _) in &blocks {
        shared.running()?;
        match host_block(shared, range, block, Instant::now() + attempt) {
            Ok(report) => return Ok(HostBlockSearch::Offlined { block, report }),
            Err(OfflineError::HostBlock(HostMemError::Unmovable { .. })) => unmovable += 1,
            // Held by someone else: its pages, or an offline of them.
            Err(OfflineError::BlockBusy { .. } | OfflineError::Overlap(_)) => held += 1,
            // The pages moved out of the block since the pagemap was read.
            Err(OfflineError::NotInBlock { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(HostBlockSearch::NoneQualified { candidates: blocks.len(), unmovable, held })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Origin::{Source, Store, Unplugged as OUnplugged, Zero};
    use PageState::{Missing, Offline, Poisoned, Present, Resolving};

    fn prior(state: PageState, origin: Origin) -> Prior {
        Prior { state, origin }
    }

    fn end(state: PageState, origin: Origin, drop_stored: bool) -> Decision {
        Decision::End { state, origin, drop_stored }
    }

    #[test]
    fn final_states_of_marked_pages() {
        use Outcome::*;
        let z = UnplugPolicy::Zero;
        #[rustfmt::skip]
        let table: &[(Prior, Outcome, bool, Decision)] = &[
            // prior, what the offline did, removed meanwhile => final
            (prior(Present, Source), Untouched, false, end(Present, Source, false)),
            (prior(Missing, Store), Untouched, false, end(Missing, Store, false)),
            (prior(Present, Source), InPlace, false, end(Present, Source, false)),
            (prior(Present, Zero), InPlace, false, end(Present, Zero, false)),
            // Migrated, and a balloon discarded it meanwhile.
            (prior(Present, Source), InPlace, true, end(Missing, Zero, false)),
            // The kernel held nothing for a page the engine had installed.
            (prior(Present, Store), Empty, false, end(Missing, Zero, false)),
            (prior(Missing, Source), Empty, false, end(Missing, Source, false)),
            (prior(Missing, Zero), Empty, false, end(Missing, Zero, false)),
            // Evicted; then discarded while the offline held it.
            (prior(Present, Source), Stored, false, end(Missing, Store, false)),
            (prior(Present, Source), Stored, true, end(Missing, Zero, true)),
            // Unplugged (zero policy): missing, zeros; a stored copy goes.
            (prior(Present, Source), Unplugged(Missing), false, end(Missing, Zero, false)),
            (prior(Missing, Store), Unplugged(Missing), false, end(Missing, Zero, true)),
            // Unplugged (poison policy), and discarded meanwhile: the
            // marker's page stays offline.
            (prior(Present, Source), Unplugged(Offline), false, end(Offline, Zero, false)),
            (prior(Present, Source), Unplugged(Offline), true, end(Offline, Zero, false)),
            // A marker replaced by zeros stays present even if a discard
            // came (its zap, before or after, leaves zeros).
            (prior(Offline, Zero), Unplugged(Present), false, end(Present, Zero, false)),
            (prior(Poisoned, Zero), Unplugged(Present), true, end(Present, Zero, false)),
            // Contents neither put back nor kept.
            (prior(Present, Source), Lost, false, end(Poisoned, Source, false)),
            (prior(Present, Source), Lost, true, end(Missing, Zero, false)),
            // A missing page a resolver had given back after an unplug
            // under the poison policy, replugged.
            (prior(Missing, OUnplugged), Unplugged(Missing), false, end(Missing, Zero, false)),
            (prior(Missing, OUnplugged), Unplugged(Missing), true, end(Missing, Zero, false)),
            // The same page migrated or evicted (nothing to take), and
            // discarded meanwhile: still to be poisoned.
            (prior(Missing, OUnplugged), Empty, false, end(Missing, OUnplugged, false)),
            (prior(Missing, OUnplugged), Untouched, true, end(Missing, OUnplugged, false)),
            (prior(Missing, OUnplugged), Empty, true, end(Missing, OUnplugged, false)),
        ];
        for (i, &(p, o, removed, want)) in table.iter().enumerate() {
            assert_eq!(decide(p, o, removed, z), want, "row {i}: {p:?} {o:?} removed={removed}");
        }
    }

    #[test]
    fn pages_a_resolver_held_get_a_new_origin_only_when_unplugged_or_stored() {
        let p = prior(Resolving, Source);
        let retarget = |origin, drop_stored| Decision::Retarget { origin, drop_stored };
        assert_eq!(decide(p, Outcome::Unplugged(Resolving), false, UnplugPolicy::Zero), retarget(Some(Zero), true));
        assert_eq!(
            decide(p, Outcome::Unplugged(Resolving), false, UnplugPolicy::Poison),
            retarget(Some(OUnplugged), true)
        );
        assert_eq!(decide(p, Outcome::Stored, false, UnplugPolicy::Zero), retarget(Some(Store), false));
        for o in [Outcome::Untouched, Outcome::InPlace, Outcome::Empty, Outcome::Lost] {
            // A remove touching it changes its origin itself.
            assert_eq!(decide(p, o, true, UnplugPolicy::Zero), retarget(None, false), "{o:?}");
        }
    }
}
