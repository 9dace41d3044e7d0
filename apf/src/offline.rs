//! Offlining guest ranges while faults keep being served: migrate, evict,
//! unplug, and real host memory-block offlining.
//!
//! Every mode runs the same steps, as the kernel's own migration does:
//!
//! 1. **Begin the invalidation**: under the install lock, bump the
//!    sequence and mark the range's pages `Invalidating`. Fills in flight
//!    over the range are thrown away at their install; faults on the range
//!    wait (the event loop defers them) until step 5.
//! 2. **Call the pin callbacks** of every [`Pin`](crate::pin::Pin) over the
//!    range: holders drop their kernel pins and stop relying on the memory.
//! 3. **Wait for short-term references** ([`PageRef`](crate::pin::PageRef))
//!    and hard pins to drain, up to the deadline. A range still held then
//!    fails with [`OfflineError::Busy`] and is left as it was.
//! 4. **Act.** Pages are taken out of guest RAM with `UFFDIO_MOVE` into a
//!    staging area registered with the same userfaultfd: one step that
//!    unmaps (so a write landing afterwards faults and waits, and none is
//!    lost), fires KVM's MMU notifier, and raises no remove event. Then:
//!    `Migrate` copies them back into fresh frames, `Evict` copies them into
//!    the eviction store, `Unplug` drops them. The staging pages are freed
//!    with `MADV_DONTNEED` on the staging area, never on guest RAM, so the
//!    engine never mistakes its own work for a balloon's remove.
//! 5. **End the invalidation**: set the final page states, wake the
//!    deferred faults, which are then served the right contents.
//!
//! A source page the kernel will not move (`EBUSY`: pinned by the kernel,
//! for example an io_uring fixed buffer nobody dropped) is retried until
//! the deadline, then the offline fails with `Busy`; pages already handled
//! keep their contents (migrated or evicted), except under `Unplug`, where
//! the report of the error says how many were discarded.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::field;

use crate::fault::Shared;
use crate::notifier::{Invalidation, Reason};
use crate::ram::{AnonMapping, GuestRange, Origin, PageState, RamError, Region};
use crate::uffd::{IoctlError, RegisterMode, Uffd, PAGE_SIZE};

/// Pages in the staging area: an offline moves its range through it in
/// chunks of this many pages. Smaller chunks hold page-table locks and the
/// CPU for less time at once. Measured with `vmm bench`: 512 KiB chunks
/// keep the p99 of faults next to an offline storm at about 1.6x the quiet
/// p99 (2 MiB chunks: 2 to 4x), and offline 64 MiB in 32 ms instead of 25.
pub const STAGING_PAGES: usize = 128;

/// What an offline does to the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Contents kept, host frames change (transparent to the guest).
    Migrate,
    /// Contents moved to the eviction store, frames freed; restored on fault
    /// (transparent to the guest).
    Evict,
    /// Contents discarded; later accesses follow the engine's
    /// [`UnplugPolicy`].
    Unplug,
    /// Real hot-remove of host memory block `n`: the block is offlined
    /// through sysfs, which makes the kernel migrate every page in it, and
    /// onlined again. Only the guest pages of the range that live in that
    /// block are invalidated.
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

/// What an access to unplugged memory gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnplugPolicy {
    /// Zeros, like fresh memory.
    #[default]
    Zero,
    /// SIGBUS (the pages are poisoned) until [`crate::Engine::replug`].
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

/// What one offline did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OfflineReport {
    /// Pages in the range.
    pub pages: usize,
    /// Pages that were present and were taken out (moved, evicted, dropped).
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

/// Why an offline failed. Nothing is left half-done: the range's pages are
/// back in a consistent state and faults on them are served.
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
    },
    /// The kernel lacks `UFFDIO_MOVE`.
    #[error("offlining needs UFFDIO_MOVE, which this kernel's userfaultfd does not offer")]
    Unsupported,
    /// The engine has shut down.
    #[error("the engine has shut down")]
    Stopped,
    /// A userfaultfd operation failed unexpectedly.
    #[error("offline of {range} failed")]
    Ioctl {
        /// The range.
        range: GuestRange,
        /// The failed operation.
        #[source]
        error: IoctlError,
    },
    /// Setting up or clearing the staging area failed.
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

impl OfflineError {
    /// True for the errors that mean "held past the deadline" ([`Self::Busy`],
    /// [`Self::BlockBusy`]); nothing was lost, and a later attempt may work.
    pub fn is_busy(&self) -> bool {
        matches!(self, OfflineError::Busy { .. } | OfflineError::BlockBusy { .. })
    }
}

/// The staging area: private anonymous memory registered with the engine's
/// userfaultfd in the same mode as guest RAM, so `UFFDIO_MOVE` accepts it.
pub(crate) struct Staging {
    map: AnonMapping,
    pages: usize,
}

impl fmt::Debug for Staging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Staging").field("base", &self.map.ptr()).field("pages", &self.pages).finish()
    }
}

impl Staging {
    pub(crate) fn new(uffd: &Uffd, pages: usize) -> Result<Mutex<Staging>, OfflineError> {
        // Small pages on both sides: UFFDIO_MOVE wants them.
        let map = AnonMapping::new(pages * PAGE_SIZE).map_err(OfflineError::Staging)?;
        uffd.register(map.ptr() as u64, map.len() as u64, RegisterMode::MISSING)
            .map_err(|e| OfflineError::Staging(std::io::Error::other(e)))?;
        Ok(Mutex::new(Staging { map, pages }))
    }

    fn addr(&self, slot: usize) -> u64 {
        self.map.ptr() as u64 + (slot * PAGE_SIZE) as u64
    }

    /// Frees the first `pages` staging pages. This raises a remove event
    /// for the staging area (not guest RAM, so the event loop ignores it),
    /// and returns once the event loop has read it.
    fn clear(&self, pages: usize) -> Result<(), OfflineError> {
        // SAFETY: MADV_DONTNEED on the staging mapping, which only the
        // holder of the staging lock (this caller) uses; nothing keeps
        // references into it.
        if unsafe { libc::madvise(self.map.ptr().cast(), pages * PAGE_SIZE, libc::MADV_DONTNEED) } < 0 {
            return Err(OfflineError::Staging(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// What became of one page of the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Not handled (not present, or the offline stopped before it).
    Untouched,
    /// Moved out of guest RAM into staging.
    Moved,
    /// Present in the engine's view but gone in the kernel's (someone
    /// discarded it): it reads as zeros.
    Hole,
}

pub(crate) fn offline(
    shared: &Shared,
    range: GuestRange,
    mode: Mode,
    deadline: Instant,
) -> Result<OfflineReport, OfflineError> {
    if shared.stopping.load(std::sync::atomic::Ordering::Acquire) {
        return Err(OfflineError::Stopped);
    }
    let (loc, count) = shared.ram.check_range(range)?;
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
        _ => offline_pages(shared, loc.region, loc.page, count, range, mode, deadline),
    };
    match &result {
        Ok(r) => {
            span.record("pins", r.pins_called);
            span.record("pages", r.pages_taken);
            span.record("outcome", "done");
            shared.stats.offlines.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Err(e) if e.is_busy() => {
            span.record("outcome", "busy");
            shared.stats.offline_busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Err(_) => {
            span.record("outcome", "error");
        }
    }
    result
}

fn offline_pages(
    shared: &Shared,
    region_idx: usize,
    first: usize,
    count: usize,
    range: GuestRange,
    mode: Mode,
    deadline: Instant,
) -> Result<OfflineReport, OfflineError> {
    use std::sync::atomic::Ordering::Relaxed;
    let started = Instant::now();
    let staging = shared.staging.as_ref().ok_or(OfflineError::Unsupported)?;
    let region = &shared.ram.regions()[region_idx];
    let policy = shared.config.unplug_policy;
    // 1. Begin.
    let (inv, prior) = begin(shared, region, first, count, range, mode.reason())?;
    let mut report = OfflineReport { pages: count, ..OfflineReport::default() };
    // 2. Callbacks.
    report.pins_called = inv.call_intervals();
    shared.stats.pin_invalidations.fetch_add(report.pins_called as u64, Relaxed);
    // 3. Drain.
    if let Err(held) = inv.wait_drained(true, deadline) {
        restore(shared, region, first, &prior);
        drop(inv);
        shared.kick_deferred();
        return Err(OfflineError::Busy {
            range,
            waited: started.elapsed(),
            refs: held.refs,
            hard: held.hard,
            kernel_pinned: 0,
            discarded: 0,
        });
    }
    // 4. Act, through the staging area in chunks.
    let mut fate = vec![Fate::Untouched; count];
    let mut busy = 0usize;
    let mut failure = None;
    {
        let staging = staging.lock().unwrap_or_else(|e| e.into_inner());
        let mut i = 0;
        while i < count && busy == 0 && failure.is_none() {
            if prior[i] != PageState::Present {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < count && prior[j] == PageState::Present && j - i < staging.pages {
                j += 1;
            }
            match take_out(shared, region, first, i, j, &staging, &mut fate, deadline) {
                Ok(0) => {}
                Ok(held) => busy = held,
                Err(e) => failure = Some(e),
            }
            if failure.is_none() {
                if let Err(e) = dispose(shared, region, first, i, j, &staging, &mut fate, mode, busy > 0) {
                    failure = Some(e);
                }
            }
            let moved = fate[i..j].iter().filter(|f| **f == Fate::Moved).count();
            if moved > 0 {
                if let Err(e) = staging.clear(j - i) {
                    failure.get_or_insert(e);
                }
            }
            i = j;
        }
    }
    // 5. End: final states, then wake deferred faults.
    let mut discarded = 0;
    for i in 0..count {
        let p = first + i;
        let gpa = region.page_gpa(p);
        let (to, origin) = match (prior[i], fate[i], mode) {
            (PageState::Resolving, _, Mode::Unplug) if busy == 0 && failure.is_none() => {
                // Its resolver saw the sequence move and waits for this
                // offline to end: it fills again, with zeros.
                region.set_claimed_origin(p, Origin::Zero);
                continue;
            }
            (PageState::Resolving, _, _) => continue,
            (PageState::Present, Fate::Moved, Mode::Migrate) => {
                report.frames_moved += 1;
                (PageState::Present, None)
            }
            (PageState::Present, Fate::Moved, Mode::Evict) => {
                report.pages_evicted += 1;
                (PageState::Missing, Some(Origin::Store))
            }
            (PageState::Present, Fate::Hole, m) if m != Mode::Unplug => (PageState::Missing, Some(Origin::Zero)),
            (PageState::Present, Fate::Untouched, _) => (PageState::Present, None),
            (_, _, Mode::Unplug) => {
                if busy > 0 || failure.is_some() {
                    // Stopped part-way: only pages taken out are discarded.
                    if fate[i] == Fate::Untouched {
                        shared.checked(region.end_invalidate(p, prior[i], None));
                        continue;
                    }
                }
                discarded += 1;
                if region.state(p).1 == Origin::Store {
                    shared.store.discard(gpa, PAGE_SIZE);
                }
                match unplug_page(shared, region, p, prior[i], policy) {
                    Ok(state) => (state, Some(Origin::Zero)),
                    Err(e) => {
                        failure.get_or_insert(OfflineError::Ioctl { range, error: e });
                        (PageState::Missing, Some(Origin::Zero))
                    }
                }
            }
            (state, _, _) => (state, None),
        };
        shared.checked(region.end_invalidate(p, to, origin));
    }
    report.pages_taken = fate.iter().filter(|f| **f != Fate::Untouched).count();
    report.pages_unplugged = if mode == Mode::Unplug { discarded } else { 0 };
    report.elapsed = started.elapsed();
    drop(inv);
    shared.kick_deferred();
    shared.stats.frames_moved.fetch_add(report.frames_moved as u64, Relaxed);
    shared.stats.pages_evicted.fetch_add(report.pages_evicted as u64, Relaxed);
    shared.stats.pages_unplugged.fetch_add(report.pages_unplugged as u64, Relaxed);
    if let Some(e) = failure {
        return Err(e);
    }
    if busy > 0 {
        return Err(OfflineError::Busy {
            range,
            waited: started.elapsed(),
            refs: 0,
            hard: 0,
            kernel_pinned: busy,
            discarded: report.pages_unplugged,
        });
    }
    Ok(report)
}

/// Begins an exclusive invalidation of `range` (pages `first..first +
/// count` of `region`), marking its pages; returns it with the state each
/// page had.
fn begin<'a>(
    shared: &'a Shared,
    region: &Region,
    first: usize,
    count: usize,
    range: GuestRange,
    reason: Reason,
) -> Result<(Invalidation<'a>, Vec<PageState>), OfflineError> {
    let mut prior = vec![PageState::Resolving; count];
    let inv = shared
        .notifier
        .invalidate_begin(&[range], reason, true, || {
            for (i, prior) in prior.iter_mut().enumerate() {
                *prior = region.begin_invalidate(first + i);
            }
        })
        .map_err(|o| OfflineError::Overlap(o.0))?;
    Ok((inv, prior))
}

/// Puts marked pages back as they were (an offline that did nothing).
fn restore(shared: &Shared, region: &Region, first: usize, prior: &[PageState]) {
    for (i, &state) in prior.iter().enumerate() {
        if state != PageState::Resolving {
            shared.checked(region.end_invalidate(first + i, state, None));
        }
    }
}

/// Moves pages `[i, j)` of the range (all present in the engine's view)
/// into staging slots `0..j - i`. Returns the number of pages the kernel
/// still refused to move (`EBUSY`) at the deadline; those and the pages
/// after them stay in place.
#[allow(clippy::too_many_arguments)]
fn take_out(
    shared: &Shared,
    region: &Region,
    first: usize,
    i: usize,
    j: usize,
    staging: &Staging,
    fate: &mut [Fate],
    deadline: Instant,
) -> Result<usize, OfflineError> {
    let mut k = i;
    while k < j {
        let src = region.page_host(first + k);
        let res = shared.uffd.move_pages(staging.addr(k - i), src, (j - k) * PAGE_SIZE, false);
        let (done, err) = match res {
            Ok(n) => (n / PAGE_SIZE, None),
            Err(e) => (e.done / PAGE_SIZE, Some(e)),
        };
        fate[k..k + done].fill(Fate::Moved);
        k += done;
        let Some(e) = err else { continue };
        match e.errno {
            // A hole: discarded behind the engine's back (the remove event
            // is on its way); it reads as zeros.
            libc::ENOENT => {
                fate[k] = Fate::Hole;
                k += 1;
            }
            // Pinned by the kernel, or the page table is busy: retry until
            // the deadline.
            libc::EBUSY | libc::EAGAIN => {
                if Instant::now() >= deadline {
                    return Ok(j - k);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            _ => {
                let range = GuestRange::new(region.page_gpa(first + k), PAGE_SIZE as u64);
                return Err(OfflineError::Ioctl { range, error: e });
            }
        }
    }
    Ok(0)
}

/// Does the mode's work on the pages of `[i, j)` that were moved to
/// staging. If `stopping` (a busy page stopped an `Unplug`), the moved
/// pages are put back instead of being discarded, so only whole chunks are
/// ever discarded.
#[allow(clippy::too_many_arguments)]
fn dispose(
    shared: &Shared,
    region: &Region,
    first: usize,
    i: usize,
    j: usize,
    staging: &Staging,
    fate: &mut [Fate],
    mode: Mode,
    stopping: bool,
) -> Result<(), OfflineError> {
    let put_back = mode == Mode::Migrate || (mode == Mode::Unplug && stopping);
    let mut k = i;
    while k < j {
        if fate[k] != Fate::Moved {
            k += 1;
            continue;
        }
        let mut e = k;
        while e < j && fate[e] == Fate::Moved {
            e += 1;
        }
        let len = (e - k) * PAGE_SIZE;
        if put_back {
            // Into fresh frames: the COPY allocates new pages, and wakes
            // any thread that faulted on them meanwhile.
            let dst = region.page_host(first + k);
            let src = staging.addr(k - i) as *const u8;
            let mut off = 0;
            while off < len {
                match shared.uffd.copy(dst + off as u64, src.wrapping_add(off), len - off, false) {
                    Ok(n) => off += n,
                    Err(err) if err.done > 0 => off += err.done,
                    Err(err) => {
                        let range = GuestRange::new(region.page_gpa(first + k), len as u64);
                        return Err(OfflineError::Ioctl { range, error: err });
                    }
                }
            }
            if mode == Mode::Unplug {
                fate[k..e].fill(Fate::Untouched);
            }
        } else if mode == Mode::Evict {
            // SAFETY: staging slots `k - i .. e - i` hold pages just moved
            // there (present, so reading them cannot fault), and only the
            // holder of the staging lock touches the staging area.
            let data = unsafe { std::slice::from_raw_parts(staging.addr(k - i) as *const u8, len) };
            shared.store.insert(region.page_gpa(first + k), data);
        }
        k = e;
    }
    Ok(())
}

/// Applies the unplug policy to a page whose contents are gone (moved out,
/// never present, or poisoned before); returns its new state.
fn unplug_page(
    shared: &Shared,
    region: &Region,
    page: usize,
    prior: PageState,
    policy: UnplugPolicy,
) -> Result<PageState, IoctlError> {
    let host = region.page_host(page);
    let marked = matches!(prior, PageState::Poisoned | PageState::Offline);
    match policy {
        UnplugPolicy::Poison => {
            if !marked {
                match shared.uffd.poison(host, PAGE_SIZE) {
                    Ok(_) => {}
                    Err(e) if e.errno == libc::EEXIST => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(PageState::Offline)
        }
        UnplugPolicy::Zero if marked => {
            // The poison marker must go: a COPY of zeros replaces it.
            match shared.uffd.copy(host, shared.zeros.as_ptr(), PAGE_SIZE, false) {
                Ok(_) => Ok(PageState::Present),
                Err(e) if e.errno == libc::EEXIST => Ok(PageState::Present),
                Err(e) => Err(e),
            }
        }
        UnplugPolicy::Zero => Ok(PageState::Missing),
    }
}

/// Brings unplugged (poisoned) pages of `range` back as zero pages.
pub(crate) fn replug(shared: &Shared, range: GuestRange) -> Result<usize, OfflineError> {
    let (loc, count) = shared.ram.check_range(range)?;
    let region = &shared.ram.regions()[loc.region];
    let (inv, prior) = begin(shared, region, loc.page, count, range, Reason::Unplug)?;
    let mut replugged = 0;
    let mut failure = None;
    for (i, &state) in prior.iter().enumerate() {
        let p = loc.page + i;
        if state == PageState::Offline {
            match unplug_page(shared, region, p, state, UnplugPolicy::Zero) {
                Ok(to) => {
                    shared.checked(region.end_invalidate(p, to, Some(Origin::Zero)));
                    replugged += 1;
                }
                Err(e) => {
                    shared.checked(region.end_invalidate(p, state, None));
                    failure.get_or_insert(OfflineError::Ioctl { range, error: e });
                }
            }
        } else if state != PageState::Resolving {
            shared.checked(region.end_invalidate(p, state, None));
        }
    }
    drop(inv);
    shared.kick_deferred();
    match failure {
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
    shared: &Shared,
    range: GuestRange,
    block: u32,
    deadline: Instant,
) -> Result<OfflineReport, OfflineError> {
    use crate::hostmem::{self, BlockLock, HostMemError, Pagemap};
    let started = Instant::now();
    let (loc, count) = shared.ram.check_range(range)?;
    let region = &shared.ram.regions()[loc.region];
    let block_size = hostmem::block_size().map_err(OfflineError::HostBlock)?;
    let pagemap = Pagemap::open().map_err(OfflineError::HostBlock)?;
    let in_block = |pfns: &[Option<u64>]| -> Vec<bool> {
        pfns.iter().map(|p| p.is_some_and(|pfn| hostmem::block_of_pfn(pfn, block_size) == block)).collect()
    };
    let before = pagemap.pfns(region.page_host(loc.page), count).map_err(OfflineError::HostBlock)?;
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
        runs.push(GuestRange::new(region.page_gpa(loc.page + start), ((i - start) * PAGE_SIZE) as u64));
    }
    if runs.is_empty() {
        return Err(OfflineError::NotInBlock { range, block });
    }
    let mut lock = BlockLock::acquire(deadline).map_err(OfflineError::HostBlock)?;
    let inv = shared
        .notifier
        .invalidate_begin(&runs, Reason::HostBlock, true, || {})
        .map_err(|o| OfflineError::Overlap(o.0))?;
    let mut report = OfflineReport { pages: count, ..OfflineReport::default() };
    report.block_pages = mine.iter().filter(|m| **m).count();
    report.pins_called = inv.call_intervals();
    shared.stats.pin_invalidations.fetch_add(report.pins_called as u64, std::sync::atomic::Ordering::Relaxed);
    // Hard pins are left to the kernel: it is the one that cannot move them.
    if let Err(held) = inv.wait_drained(false, deadline) {
        return Err(OfflineError::Busy {
            range,
            waited: started.elapsed(),
            refs: held.refs,
            hard: 0,
            kernel_pinned: 0,
            discarded: 0,
        });
    }
    let result = hostmem::offline_and_online(&mut lock, block, deadline);
    drop(inv);
    match result {
        Ok(_) => {}
        Err(HostMemError::TimedOut { waited, .. }) => {
            return Err(OfflineError::BlockBusy { block, waited: started.elapsed().max(waited) });
        }
        Err(e) => return Err(OfflineError::HostBlock(e)),
    }
    let after = pagemap.pfns(region.page_host(loc.page), count).map_err(OfflineError::HostBlock)?;
    report.frames_moved = mine.iter().zip(before.iter().zip(&after)).filter(|(m, (b, a))| **m && b != a).count();
    report.pages_taken = report.block_pages;
    report.elapsed = started.elapsed();
    shared.stats.frames_moved.fetch_add(report.frames_moved as u64, std::sync::atomic::Ordering::Relaxed);
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
    shared: &Shared,
    range: GuestRange,
    attempt: std::time::Duration,
) -> Result<HostBlockSearch, OfflineError> {
    use crate::hostmem::{self, HostMemError, Pagemap};
    let (loc, count) = shared.ram.check_range(range)?;
    let region = &shared.ram.regions()[loc.region];
    let block_size = hostmem::block_size().map_err(OfflineError::HostBlock)?;
    let pfns =
        Pagemap::open().and_then(|pm| pm.pfns(region.page_host(loc.page), count)).map_err(OfflineError::HostBlock)?;
    let mut blocks = hostmem::blocks_holding(&pfns, block_size);
    blocks.sort_by_key(|&(_, pages)| std::cmp::Reverse(pages));
    let (mut unmovable, mut held) = (0, 0);
    for &(block, _) in &blocks {
        if shared.stopping.load(std::sync::atomic::Ordering::Acquire) {
            return Err(OfflineError::Stopped);
        }
        match host_block(shared, range, block, Instant::now() + attempt) {
            Ok(report) => return Ok(HostBlockSearch::Offlined { block, report }),
            Err(OfflineError::HostBlock(HostMemError::Unmovable { .. })) => unmovable += 1,
            Err(OfflineError::BlockBusy { .. }) => held += 1,
            // The pages moved out of the block since the pagemap was read.
            Err(OfflineError::NotInBlock { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(HostBlockSearch::NoneQualified { candidates: blocks.len(), unmovable, held })
}
