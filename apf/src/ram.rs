//! Guest RAM: regions of guest-physical memory backed by host mappings, the
//! bounds-checked translation between the two, and one state byte per page.
//!
//! The backing store is a rust-vmm [`GuestMemoryMmap`], so a VMM that already
//! keeps its memory that way hands it over with [`GuestRam::from_guest_memory`]
//! and keeps using it, or takes apf's with [`GuestRam::guest_memory`].
//! Every page moves through `Missing -> Resolving -> Present` (and, for
//! offlining, `Invalidating`, `Offline`, `Poisoned`) only through methods here.
//!
//! # Guest RAM is never borrowed
//!
//! The engine changes guest RAM behind the compiler's back: the kernel
//! installs, moves and poisons its pages (the `unsafe` ioctls of
//! `crate::uffd`). That is sound because no Rust reference to guest RAM is
//! ever made: it is reached through vm-memory's volatile accesses
//! ([`GuestMemoryMmap`], `VolatileSlice`) and through the raw pointers of
//! [`GuestRam::host_range`], never through `&[u8]` or `&mut [u8]`. The
//! engine's staging area (`AnonMapping`) is held to the same rule.

use std::fmt;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use thiserror::Error;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

pub use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::image::{Image, ImageError, ImageSource};
use crate::source::PageSource;
use crate::uffd::{RegisterMode, HUGE_PAGE_SIZE, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;
/// log2 of [`PAGE_SIZE`] and of [`HUGE_PAGE_SIZE`]: a region's page index
/// is its offset shifted by one of them.
const PAGE_SHIFT: u32 = PAGE_SIZE.trailing_zeros();
const HUGE_PAGE_SHIFT: u32 = HUGE_PAGE_SIZE.trailing_zeros();

/// Errors from guest RAM set-up and translation.
#[derive(Debug, Error)]
pub enum RamError {
    /// The address is in no region.
    #[error("guest address {0:#x} is outside guest RAM")]
    OutOfRange(u64),
    /// The range is not entirely inside one region.
    #[error("guest range {0} is not inside one RAM region")]
    RangeOutOfBounds(GuestRange),
    /// The range's start or length is not page-aligned.
    #[error("guest range {0} is not page-aligned")]
    Unaligned(GuestRange),
    /// The range's start or length is not aligned to the pages of the
    /// region it is in (2 MiB on huge-page memory, where the kernel acts on
    /// whole huge pages only).
    #[error("guest range {range} is not aligned to its region's {page_size}-byte pages")]
    UnalignedToPages {
        /// The range.
        range: GuestRange,
        /// The region's page size.
        page_size: u64,
    },
    /// The range is empty.
    #[error("guest range at {0:#x} is empty")]
    Empty(u64),
    /// A region's base or size is not aligned to its pages (4 KiB, or
    /// 2 MiB for huge-page memory).
    #[error("RAM region at {base:#x} of {size:#x} bytes is not aligned to its pages")]
    UnalignedRegion {
        /// Guest-physical base.
        base: u64,
        /// Size in bytes.
        size: u64,
    },
    /// A region is not private anonymous memory.
    #[error("RAM region at {0:#x} is not private anonymous memory (file and shared backings are not supported)")]
    UnsupportedBacking(u64),
    /// No regions were given.
    #[error("guest RAM needs at least one region")]
    NoRegions,
    /// The image is shorter than the RAM that maps it (an access past its
    /// end would get SIGBUS).
    #[error("the image holds {image} bytes but guest RAM needs {needed}")]
    ImageTooShort {
        /// Bytes of RAM.
        needed: u64,
        /// Bytes of the image.
        image: u64,
    },
    /// Making the memfd behind shared RAM failed.
    #[error("cannot make the memfd behind guest RAM")]
    Memfd(#[source] ImageError),
    /// Another process may map this memory only once every page is filled:
    /// touching a hole would allocate a zero page the engine never sees,
    /// and the guest would then read zeros instead of its contents.
    #[error("guest RAM is still being filled (guest page {0:#x} is a hole): it cannot be shared yet")]
    StillFilling(u64),
    /// This kind of RAM has no descriptor to share.
    #[error("{0:?} guest RAM has no descriptor to share")]
    NotShareable(MemoryKind),
    /// Asking the kernel which pages hold data failed.
    #[error("SEEK_DATA/SEEK_HOLE on guest RAM's memfd failed")]
    Seek(#[source] std::io::Error),
    /// Allocating the host mappings failed.
    #[error("cannot map guest RAM")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// Mapping a region of a memfd or an image failed.
    #[error("cannot map guest RAM region at {base:#x}")]
    MapFile {
        /// Guest-physical base of the region.
        base: u64,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// A region of remote memory has a page size the engine does not
    /// resolve there: 4 KiB, or 2 MiB for every region.
    #[error("RAM region at {base:#x} has pages of {page_size} bytes; 4096 or 2097152 (the same for every region) are resolved")]
    PageSize {
        /// Guest-physical base.
        base: u64,
        /// Its page size.
        page_size: u64,
    },
    /// Two regions of remote memory overlap, in guest or in host
    /// addresses.
    #[error("RAM regions at {0:#x} and {1:#x} overlap")]
    Overlap(u64, u64),
    /// The memory lives in another process ([`GuestRam::remote`]): it is
    /// not mapped here, so there is no pointer or vm-memory view of it.
    #[error("guest RAM lives in another process: guest range {0} has no address here")]
    Remote(GuestRange),
    /// `madvise` on a region failed.
    #[error("madvise on RAM region at {base:#x} failed")]
    Madvise {
        /// Guest-physical base of the region.
        base: u64,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
}

/// What backs guest RAM, and so how the engine installs into it and what
/// it may do with it.
///
/// | kind | mapping | registered | installs | offline |
/// |---|---|---|---|---|
/// | `PrivateAnonymous` | private anonymous | MISSING | `COPY`, `ZEROPAGE` | every mode (`MOVE`) |
/// | `SharedMemfd` | a memfd, `MAP_SHARED` | MISSING | `COPY`, `ZEROPAGE` (into the page cache) | host blocks only |
/// | `Image` | a sealed image, `MAP_PRIVATE` | MISSING and MINOR | reads: `CONTINUE` of the image's pages; writes: `COPY` of a private copy; zeros: `ZEROPAGE` | host blocks only |
/// | `PrivateHugetlb` | private anonymous 2 MiB pages (`MAP_HUGETLB`) | MISSING | `COPY` of whole huge pages; zeros: `COPY` of a zero huge page | host blocks only |
/// | `SharedHugetlb` | a memfd of 2 MiB pages (`MFD_HUGETLB`), `MAP_SHARED` | MISSING and MINOR | as `PrivateHugetlb`, into the page cache; a page the page cache holds: `CONTINUE` | host blocks only |
///
/// On the huge-page kinds a page is 2 MiB everywhere in the engine (page
/// states, pins, references, prefetch windows), and every range the engine
/// is handed (offline, pin, reference, prefetch) must be 2 MiB-aligned:
/// the kernel acts on whole huge pages only. There is no huge-page
/// `ZEROPAGE`, so zeros are copied from one shared zeroed buffer.
///
/// Faults, prefetch, pins, page references, removes (balloon discards),
/// poison and host-block offlines work on every kind. `Migrate`, `Evict`
/// and `Unplug` take private anonymous pages out with `UFFDIO_MOVE`, which
/// the kernel does for those pages only. The other kinds are offlined in
/// place (see `crate::offline`): `Unplug` drops the pages (a punched hole
/// in shared memory, `MADV_DONTNEED` on an image, which then reads zeros,
/// not the image); `Migrate` and `Evict` of shared memory write-protect
/// the pages, copy them out, punch them and copy them back into fresh
/// frames (or leave them to the eviction store), refused while another
/// process maps the memory ([`GuestRam::shared_fd`]). On an image they do
/// the same to the guest's private copies only: the pages mapped from the
/// image's page cache are shared with every clone and stay.
///
/// Discards differ by kind, as the kernel's do:
/// - private anonymous and image: `MADV_DONTNEED` drops the page (on an
///   image the mapping would show the image again), so its next fault gets
///   zeros;
/// - shared memfd: `MADV_DONTNEED` only unmaps (the page cache keeps the
///   contents, and the next access does not fault), `MADV_REMOVE` (the
///   balloon's) punches a hole. Both raise the same remove event, so the
///   engine asks the page cache (`SEEK_DATA`) what a removed page holds,
///   and a fault on a page it had installed means a punched hole: zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// Private anonymous memory (the default).
    PrivateAnonymous,
    /// A memfd mapped shared (4 KiB pages), as vhost-user devices need.
    /// Another process may map it once every page is filled
    /// ([`GuestRam::shared_fd`]).
    SharedMemfd,
    /// An [`Image`] mapped private: restore and clones, zero-copy for reads.
    Image,
    /// Private anonymous 2 MiB huge pages (`MAP_HUGETLB`, optionally
    /// `MAP_NORESERVE`, as Firecracker maps guest RAM with huge pages).
    PrivateHugetlb,
    /// An [`Image`] of 2 MiB huge pages ([`Image::load_hugetlb`]) mapped
    /// private: a read fault maps a whole huge page of the image in place
    /// (`CONTINUE`), a first write gets a private copy of it (`COPY`).
    HugetlbImage,
    /// A memfd of 2 MiB huge pages (`MFD_HUGETLB`) mapped shared.
    /// Registered MISSING and MINOR: the kernel cannot be asked what its
    /// page cache holds (`mincore` reads page tables, `SEEK_DATA` calls
    /// everything data), so a page found there (`COPY` answers `EEXIST`)
    /// is mapped with `CONTINUE`, which fails if it is not there after
    /// all (a dry pool answers `COPY` with `EEXIST` too).
    SharedHugetlb,
}

impl MemoryKind {
    /// Whether pages can be taken out with `UFFDIO_MOVE` (migrate, evict,
    /// unplug).
    pub fn offers_move(self) -> bool {
        self == MemoryKind::PrivateAnonymous
    }

    /// Whether the page cache decides what a page holds (shared mappings:
    /// a page there is present whether or not it is mapped).
    pub fn page_cache_is_truth(self) -> bool {
        matches!(self, MemoryKind::SharedMemfd | MemoryKind::SharedHugetlb)
    }

    /// Whether its pages are 2 MiB huge pages.
    pub fn is_huge(self) -> bool {
        matches!(self, MemoryKind::PrivateHugetlb | MemoryKind::SharedHugetlb | MemoryKind::HugetlbImage)
    }

    /// Whether it is an image mapped private (small or huge pages): reads
    /// map the image's own pages, writes get private copies.
    pub fn is_image(self) -> bool {
        matches!(self, MemoryKind::Image | MemoryKind::HugetlbImage)
    }

    /// The size of its pages in bytes.
    pub fn page_size(self) -> usize {
        if self.is_huge() {
            HUGE_PAGE_SIZE
        } else {
            PAGE_SIZE
        }
    }

    /// The userfaultfd modes its regions are registered in.
    pub(crate) fn register_mode(self) -> RegisterMode {
        match self {
            // Shared huge pages: MINOR too, for `CONTINUE` to map a page
            // the page cache holds (see `SharedHugetlb`).
            MemoryKind::Image | MemoryKind::HugetlbImage | MemoryKind::SharedHugetlb => {
                RegisterMode::MISSING | RegisterMode::MINOR
            }
            _ => RegisterMode::MISSING,
        }
    }
}

impl std::str::FromStr for MemoryKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "anonymous" => Ok(MemoryKind::PrivateAnonymous),
            "shared" => Ok(MemoryKind::SharedMemfd),
            "image" => Ok(MemoryKind::Image),
            "hugetlb" => Ok(MemoryKind::PrivateHugetlb),
            "shared-hugetlb" => Ok(MemoryKind::SharedHugetlb),
            "hugetlb-image" => Ok(MemoryKind::HugetlbImage),
            other => Err(format!(
                "unknown memory kind {other:?} (expected anonymous, shared, image, hugetlb, shared-hugetlb or hugetlb-image)"
            )),
        }
    }
}

/// A half-open range of guest-physical addresses `[start, start + len)`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct GuestRange {
    /// First address.
    pub start: GuestAddress,
    /// Length in bytes.
    pub len: u64,
}

impl GuestRange {
    /// A range of `len` bytes at `start`.
    pub const fn new(start: GuestAddress, len: u64) -> Self {
        GuestRange { start, len }
    }

    /// One past the last address (saturating).
    pub fn end(&self) -> u64 {
        self.start.0.saturating_add(self.len)
    }

    /// True if the two ranges share an address.
    pub fn overlaps(&self, other: &GuestRange) -> bool {
        self.start.0 < other.end() && other.start.0 < self.end()
    }

    /// True if start and length are page-aligned.
    pub fn is_page_aligned(&self) -> bool {
        self.start.0 % PAGE == 0 && self.len % PAGE == 0
    }

    /// True if start and length are multiples of `size` (a power of two).
    pub fn is_aligned_to(&self, size: u64) -> bool {
        (self.start.0 | self.len) & (size - 1) == 0
    }
}

impl fmt::Display for GuestRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start.0, self.end())
    }
}

impl fmt::Debug for GuestRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GuestRange{self}")
    }
}

/// A page-state transition found the page in a state it must not be in
/// (an engine bug): the page was left as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest page {gpa:?}: {transition} found it {found:?}")]
pub struct StateError {
    /// The page.
    pub gpa: GuestAddress,
    /// The transition attempted.
    pub transition: &'static str,
    /// The state the page was in.
    pub found: PageState,
}

/// Where a page is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PageState {
    /// Not mapped; the next access faults.
    Missing = 0,
    /// Claimed by one resolver, which will install it (or release it).
    Resolving = 1,
    /// Installed.
    Present = 2,
    /// An invalidation (offline, migrate, evict) is taking it away.
    Invalidating = 3,
    /// Taken out of service; faults wait until it is brought back.
    Offline = 4,
    /// Its source failed for good; accesses get SIGBUS.
    Poisoned = 5,
}

/// Where a missing page's contents come from when it is faulted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Origin {
    /// The engine's page source (snapshot file, zero, ...).
    Source = 0,
    /// Zeros: the page was removed (balloon `MADV_DONTNEED`) or unplugged.
    Zero = 1,
    /// The eviction store.
    Store = 2,
    /// Unplugged under [`crate::UnplugPolicy::Poison`] while a
    /// resolver held it: the resolver poisons it instead of filling it, and
    /// it ends `Offline`.
    Unplugged = 3,
}

const STATE_MASK: u8 = 0x0f;
const ORIGIN_SHIFT: u8 = 4;

fn pack(state: PageState, origin: Origin) -> u8 {
    state as u8 | ((origin as u8) << ORIGIN_SHIFT)
}

fn unpack(byte: u8) -> (PageState, Origin) {
    let state = match byte & STATE_MASK {
        0 => PageState::Missing,
        1 => PageState::Resolving,
        2 => PageState::Present,
        3 => PageState::Invalidating,
        4 => PageState::Offline,
        _ => PageState::Poisoned,
    };
    let origin = match byte >> ORIGIN_SHIFT {
        0 => Origin::Source,
        1 => Origin::Zero,
        2 => Origin::Store,
        _ => Origin::Unplugged,
    };
    (state, origin)
}

/// The maximal runs `[a, b)` of indices below `n` where `set` holds, in
/// order: the shape every batched ioctl over a page range takes.
pub(crate) fn runs(n: usize, set: impl Fn(usize) -> bool) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut a = 0;
    while a < n {
        if !set(a) {
            a += 1;
            continue;
        }
        let mut b = a + 1;
        while b < n && set(b) {
            b += 1;
        }
        out.push((a, b));
        a = b;
    }
    out
}

/// One region of guest RAM: a guest-physical range, its host mapping, and a
/// state byte per page.
pub struct Region {
    base: GuestAddress,
    len: u64,
    host: u64,
    /// Where the region starts in the memfd or image behind it (regions
    /// back to back, in guest-address order; 0 for anonymous memory).
    file_offset: u64,
    /// log2 of its page size: page `p` starts at byte `p << shift`.
    shift: u32,
    states: Box<[AtomicU8]>,
    /// Per page: a remove was applied to it, and its zap may not have run
    /// yet. A `madvise` zaps only after its remove event is read, and
    /// nothing tells the engine when it does; whatever the engine installs
    /// meanwhile (a fill, a put-back, a replug's zeros) may be zapped
    /// with the rest. Such a loss is the discard's doing, so the page
    /// reads as zeros, not as a lost page. Cleared when a loss is seen.
    zap_pending: Box<[AtomicBool]>,
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("base", &format_args!("{:#x}", self.base.0))
            .field("len", &format_args!("{:#x}", self.len))
            .field("host", &format_args!("{:#x}", self.host))
            .field("page_size", &self.page_size())
            .finish()
    }
}

impl Region {
    /// A region of `len` bytes at guest address `base`, mapped at `host`,
    /// with pages of `1 << shift` bytes, every page missing.
    fn new(base: GuestAddress, len: u64, host: u64, file_offset: u64, shift: u32) -> Region {
        let pages = (len >> shift) as usize;
        let states = (0..pages).map(|_| AtomicU8::new(pack(PageState::Missing, Origin::Source))).collect();
        let zap_pending = (0..pages).map(|_| AtomicBool::new(false)).collect();
        Region { base, len, host, file_offset, shift, states, zap_pending }
    }

    /// Size of its pages in bytes ([`PAGE_SIZE`], or [`HUGE_PAGE_SIZE`]
    /// for huge-page memory).
    pub fn page_size(&self) -> usize {
        1 << self.shift
    }

    /// Whether its pages are huge pages.
    pub fn is_huge(&self) -> bool {
        self.shift != PAGE_SHIFT
    }

    /// log2 of its page size.
    pub(crate) fn page_shift(&self) -> u32 {
        self.shift
    }

    /// Bytes of `pages` of its pages.
    pub fn pages_len(&self, pages: usize) -> usize {
        pages << self.shift
    }

    /// Guest-physical base address.
    pub fn base(&self) -> GuestAddress {
        self.base
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a zero-sized region (never constructed by [`GuestRam`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.states.len()
    }

    /// Host address of the first byte.
    pub fn host_base(&self) -> u64 {
        self.host
    }

    /// Host address of page `page` (no bounds check beyond a debug assert;
    /// page indices come from [`GuestRam::locate`]).
    pub fn page_host(&self, page: usize) -> u64 {
        debug_assert!(page < self.pages());
        self.host + ((page as u64) << self.shift)
    }

    /// Guest-physical address of page `page`.
    pub fn page_gpa(&self, page: usize) -> GuestAddress {
        GuestAddress(self.base.0 + ((page as u64) << self.shift))
    }

    /// The runs of pages `[first, first + count)` that the page cache of the
    /// file behind this region (a memfd or an image) holds (`true`) or not,
    /// as page indices `(first, end, data)`. Asked with `mincore` on the
    /// region's own mapping, which for a page with no page-table entry
    /// looks in the file's page cache: the same answer as `SEEK_DATA`, but
    /// bounded by the range (a `SEEK_HOLE` walks to the next hole, which in
    /// a filled memfd is its end).
    fn file_runs(&self, first: usize, count: usize) -> std::io::Result<Vec<(usize, usize, bool)>> {
        let mut answers = vec![0u8; count];
        // SAFETY: mincore reads the kernel's view of pages of this region's
        // mapping, which lives as long as the region, and writes one byte
        // per page into `answers`, which has `count`.
        let ret =
            unsafe { libc::mincore(self.page_host(first) as *mut libc::c_void, count * PAGE_SIZE, answers.as_mut_ptr()) };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut a = 0;
        while a < count {
            let data = answers[a] & 1 != 0;
            let mut b = a + 1;
            while b < count && (answers[b] & 1 != 0) == data {
                b += 1;
            }
            out.push((first + a, first + b, data));
            a = b;
        }
        Ok(out)
    }

    /// State and origin of page `page`.
    pub fn state(&self, page: usize) -> (PageState, Origin) {
        unpack(self.states[page].load(Ordering::Acquire))
    }

    /// Claims a `Missing` page for resolution (`Missing -> Resolving`).
    /// Returns the page's origin if this caller won the claim.
    pub(crate) fn try_claim(&self, page: usize) -> Option<Origin> {
        let cur = self.states[page].load(Ordering::Acquire);
        let (state, origin) = unpack(cur);
        if state != PageState::Missing {
            return None;
        }
        self.states[page]
            .compare_exchange(cur, pack(PageState::Resolving, origin), Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| origin)
    }

    /// The origin of a page this caller holds in `Resolving` (it may change
    /// under the caller when a remove event turns it into `Zero`).
    pub(crate) fn claimed_origin(&self, page: usize) -> Origin {
        unpack(self.states[page].load(Ordering::Acquire)).1
    }

    /// Finishes a claim on a page unplugged under the poison policy (its
    /// poison marker is in place): `Resolving -> Offline`.
    pub(crate) fn complete_unplugged(&self, page: usize) -> Result<(), StateError> {
        self.transition(page, "complete_unplugged", PageState::Resolving, PageState::Offline)
    }

    /// Finishes a claim: `Resolving -> Present`.
    pub(crate) fn complete(&self, page: usize) -> Result<(), StateError> {
        self.transition(page, "complete", PageState::Resolving, PageState::Present)
    }

    /// Gives a claim back: `Resolving -> Missing`, origin kept.
    pub(crate) fn release(&self, page: usize) -> Result<(), StateError> {
        self.transition(page, "release", PageState::Resolving, PageState::Missing)
    }

    /// Marks a claimed page poisoned: `Resolving -> Poisoned`.
    pub(crate) fn poison(&self, page: usize) -> Result<(), StateError> {
        self.transition(page, "poison", PageState::Resolving, PageState::Poisoned)
    }

    /// The checked transitions: a page found in another state is left as
    /// it is and the error says so, in every build (test builds also stop
    /// at a debug assertion, so a test cannot pass over one).
    fn transition(&self, page: usize, name: &'static str, from: PageState, to: PageState) -> Result<(), StateError> {
        let res = self.states[page].fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
            let (state, origin) = unpack(b);
            (state == from).then(|| pack(to, origin))
        });
        let found = res.map(|_| ()).map_err(|b| unpack(b).0);
        debug_assert!(found.is_ok(), "page {page}: {name} expected {from:?}, found {found:?}");
        found.map_err(|found| StateError { gpa: self.page_gpa(page), transition: name, found })
    }

    /// A balloon-style removal: the page's contents are now zeros. A
    /// `Resolving` page stays claimed but will be resolved as zeros by its
    /// resolver (which must re-read [`Self::claimed_origin`] after it sees
    /// the invalidation sequence move). Offline and invalidating pages keep
    /// their state and take the `Zero` origin.
    /// Returns the state and origin the page had.
    pub(crate) fn mark_removed(&self, page: usize) -> (PageState, Origin) {
        self.zap_pending[page].store(true, Ordering::Release);
        let prior = self.states[page].fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
            let (state, origin) = unpack(b);
            // A discard does not undo an unplug under the poison policy.
            let origin = if origin == Origin::Unplugged { origin } else { Origin::Zero };
            let state = match state {
                PageState::Present | PageState::Poisoned => PageState::Missing,
                other => other,
            };
            Some(pack(state, origin))
        });
        unpack(prior.unwrap_or_else(|b| b))
    }

    /// [`Self::mark_removed`], for the integration tests that stage a
    /// remove's race by hand (feature `unstable-internals`: not API).
    #[cfg(feature = "unstable-internals")]
    #[doc(hidden)]
    pub fn unstable_mark_removed(&self, page: usize) -> (PageState, Origin) {
        self.mark_removed(page)
    }

    /// Marks a page for an offline (`Present`, `Missing`, `Poisoned` or
    /// `Offline` `-> Invalidating`, origin kept) and returns the state it
    /// had. A `Resolving` page stays claimed: its resolver sees the
    /// invalidation sequence move and waits for the offline to end.
    /// Called under the install lock, so no install races the marking.
    pub(crate) fn begin_invalidate(&self, page: usize) -> PageState {
        let mut prior = PageState::Resolving;
        let _ = self.states[page].fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
            let (state, origin) = unpack(b);
            prior = state;
            match state {
                PageState::Present | PageState::Missing | PageState::Poisoned | PageState::Offline => {
                    Some(pack(PageState::Invalidating, origin))
                }
                _ => None,
            }
        });
        prior
    }

    /// Ends an offline's hold on a page: `Invalidating -> to`, with a new
    /// origin if given.
    pub(crate) fn end_invalidate(&self, page: usize, to: PageState, origin: Option<Origin>) -> Result<(), StateError> {
        let res = self.states[page].fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
            let (state, old) = unpack(b);
            (state == PageState::Invalidating).then(|| pack(to, origin.unwrap_or(old)))
        });
        let found = res.map(|_| ()).map_err(|b| unpack(b).0);
        debug_assert!(found.is_ok(), "page {page}: end_invalidate expected Invalidating, found {found:?}");
        found.map_err(|found| StateError { gpa: self.page_gpa(page), transition: "end_invalidate", found })
    }

    /// Sets the origin of a page an invalidation found claimed by a
    /// resolver, whether the resolver still holds it (`Resolving`) or has
    /// given it back (`Missing`) meanwhile: used when an unplug discards the
    /// contents it was about to fill. A resolver may give back pages of its
    /// window while an invalidation holds it; their next claim must fill
    /// from the new origin, not the old one.
    pub(crate) fn set_unresolved_origin(&self, page: usize, origin: Origin) {
        let _ = self.states[page].fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
            let (state, _) = unpack(b);
            matches!(state, PageState::Resolving | PageState::Missing).then(|| pack(state, origin))
        });
    }

    /// Claims a page the engine believes `Present` that a remove touched
    /// (origin `Zero`, or a remove applied since its last loss) and the
    /// kernel reports missing: `Present -> Resolving`, origin `Zero`. A
    /// remove is applied when its event is read, and the `madvise` that
    /// sent it zaps only after that read, so an install that lands in
    /// between is zapped with the rest, however long the zap takes: zeros
    /// are what the page holds. False if the page was not such a page.
    pub(crate) fn try_reclaim_removed(&self, page: usize) -> bool {
        let cur = self.states[page].load(Ordering::Acquire);
        let (state, origin) = unpack(cur);
        let reclaimed = state == PageState::Present
            && self.zap_explains(page, origin)
            && self.states[page]
                .compare_exchange(cur, pack(PageState::Resolving, Origin::Zero), Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        if reclaimed {
            self.zap_pending[page].store(false, Ordering::Release);
        }
        reclaimed
    }

    /// Whether a remove's zap may explain the loss of this `Present` page
    /// (see `zap_pending`): origin `Zero`, or a remove applied since the
    /// last loss seen.
    pub(crate) fn zap_may_explain(&self, page: usize) -> bool {
        self.zap_explains(page, self.state(page).1)
    }

    fn zap_explains(&self, page: usize, origin: Origin) -> bool {
        origin == Origin::Zero || self.zap_pending[page].load(Ordering::Acquire)
    }

    /// Claims a `Present` page of shared memory the kernel reports missing:
    /// a hole was punched there, so it reads zeros (`Present ->
    /// Resolving`, origin `Zero`). False if the page was not `Present`.
    pub(crate) fn try_reclaim_punched(&self, page: usize) -> bool {
        let cur = self.states[page].load(Ordering::Acquire);
        unpack(cur).0 == PageState::Present
            && self.states[page]
                .compare_exchange(cur, pack(PageState::Resolving, Origin::Zero), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// A page the engine had installed and the kernel lost (no remove
    /// event behind it) was poisoned: `Present -> Poisoned`. False if the
    /// page was not `Present`.
    pub(crate) fn mark_lost(&self, page: usize) -> bool {
        let cur = self.states[page].load(Ordering::Acquire);
        let (state, origin) = unpack(cur);
        state == PageState::Present
            && self.states[page]
                .compare_exchange(cur, pack(PageState::Poisoned, origin), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Number of pages in each state, indexed by `PageState as usize`.
    pub fn census(&self) -> [usize; 6] {
        let mut counts = [0; 6];
        for s in self.states.iter() {
            counts[unpack(s.load(Ordering::Relaxed)).0 as usize] += 1;
        }
        counts
    }
}

/// A page of guest RAM, located: region index and page index in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageLoc {
    /// Index into [`GuestRam::regions`].
    pub region: usize,
    /// Page index inside the region.
    pub page: usize,
}

/// Guest RAM: the regions, their host mappings and the page states.
///
/// ```
/// use apf::{GuestAddress, GuestRam};
/// let ram = GuestRam::anonymous(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 1 << 20)])?;
/// assert_eq!(ram.size(), 2 << 20);
/// assert!(ram.locate(GuestAddress(1 << 31)).is_err()); // in the hole
/// # Ok::<(), apf::RamError>(())
/// ```
pub struct GuestRam {
    mem: GuestMemoryMmap,
    regions: Vec<Region>,
    kind: MemoryKind,
    /// The memfd of shared RAM, or the image's file.
    file: Option<Arc<File>>,
    image: Option<Arc<ImageSource>>,
    /// The regions are another process's memory ([`GuestRam::remote`]).
    remote: bool,
    /// The process a remote memory lives in, when its owner said
    /// ([`crate::RemoteMemory::with_owner`]): asked (its page map) whether
    /// a huge page is there when a `COPY` answers `EEXIST`.
    remote_owner: std::sync::OnceLock<u32>,
    /// [`GuestRam::shared_fd`] handed the memfd out: another process may
    /// map it, and its writes are not write-protected by this process.
    shared_out: std::sync::atomic::AtomicBool,
}

/// A region of guest memory that lives in another process, as an
/// external page-fault handler learns it from the process that owns it
/// (Firecracker's handshake): where it is in that process, how long, and
/// which guest address it gets here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRegion {
    /// Its first byte in the owning process's address space.
    pub host: u64,
    /// Size in bytes.
    pub len: u64,
    /// The guest address it gets in the engine (and in its page source).
    /// An external handler uses the region's offset in the memory file,
    /// so a source that reads the file at the guest address serves it.
    pub gpa: GuestAddress,
    /// The owner's page size for it, in bytes: 4096, or 2 MiB (hugetlb
    /// memory) for every region.
    pub page_size: u64,
}

impl fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestRam").field("kind", &self.kind).field("regions", &self.regions).finish()
    }
}

impl GuestRam {
    /// Maps fresh private anonymous memory for `ranges` (guest base, size),
    /// sorted and non-overlapping, with transparent huge pages off.
    pub fn anonymous(ranges: &[(GuestAddress, usize)]) -> Result<Self, RamError> {
        check_ranges(ranges)?;
        let mem = GuestMemoryMmap::from_ranges(ranges).map_err(RamError::Map)?;
        Self::from_guest_memory(mem)
    }

    /// Takes over the regions of a VMM's existing guest memory. They must be
    /// page-aligned private anonymous mappings; the VMM keeps using `mem`
    /// (the handle is shared, not copied). Transparent huge pages are turned
    /// off on them, as userfaultfd resolves 4 KiB pages.
    pub fn from_guest_memory(mem: GuestMemoryMmap) -> Result<Self, RamError> {
        for r in mem.iter() {
            if !is_private_anonymous(r) {
                return Err(RamError::UnsupportedBacking(r.start_addr().0));
            }
        }
        Self::from_parts(mem, MemoryKind::PrivateAnonymous, None, None)
    }

    /// Maps a fresh memfd for `ranges` (guest base, size), shared: regions
    /// back to back in the memfd, in the order given. Every page is a hole
    /// until the engine fills it.
    pub fn shared_memfd(ranges: &[(GuestAddress, usize)]) -> Result<Self, RamError> {
        check_ranges(ranges)?;
        let total: u64 = ranges.iter().map(|r| r.1 as u64).sum();
        let file = crate::image::memfd("apf-guest-ram").map_err(RamError::Memfd)?;
        file.set_len(total)
            .map_err(|source| RamError::Memfd(ImageError::Memfd { what: "ftruncate", source }))?;
        let file = Arc::new(file);
        let mem = map_file(ranges, &file, 0, libc::MAP_SHARED)?;
        Self::from_parts(mem, MemoryKind::SharedMemfd, Some(file), None)
    }

    /// Maps `image` private for `ranges` (guest base, size): regions back
    /// to back from offset 0, as [`crate::SnapshotFile::open`] reads them.
    /// Many guests may map one image; each shares its pages until it
    /// writes them. Serve it with [`GuestRam::image_source`] as the source.
    ///
    /// An image of huge pages ([`Image::load_hugetlb`]) makes
    /// [`MemoryKind::HugetlbImage`]: `ranges` must be 2 MiB-aligned, and the
    /// mapping reserves one huge page per 2 MiB of guest RAM from the pool
    /// for the private copies writes make (so a write never meets a dry
    /// pool), while reads share the image's pages.
    pub fn image(ranges: &[(GuestAddress, usize)], image: Arc<Image>) -> Result<Self, RamError> {
        let kind = if image.is_huge() { MemoryKind::HugetlbImage } else { MemoryKind::Image };
        check_ranges_to(ranges, image.page_size() as u64)?;
        let needed: u64 = ranges.iter().map(|r| r.1 as u64).sum();
        if image.len() < needed {
            return Err(RamError::ImageTooShort { needed, image: image.len() });
        }
        let file = image.file().clone();
        let mem = if image.is_huge() {
            map_regions(ranges, Some((&file, image.base())), libc::MAP_PRIVATE)?
        } else {
            map_file(ranges, &file, image.base(), libc::MAP_PRIVATE)?
        };
        let mut off = 0;
        let layout = ranges
            .iter()
            .map(|&(base, size)| {
                let entry = (GuestRange::new(base, size as u64), off);
                off += size as u64;
                entry
            })
            .collect();
        let source = Arc::new(ImageSource::new(image, layout));
        Self::from_parts(mem, kind, Some(file), Some(source))
    }

    /// Maps fresh private anonymous memory of 2 MiB huge pages
    /// (`MAP_HUGETLB`) for `ranges` (guest base, size, both 2 MiB-aligned),
    /// as Firecracker maps guest RAM with huge pages. With `noreserve`
    /// (`MAP_NORESERVE`, Firecracker's choice) nothing is reserved from the
    /// pool at mapping time: a fault the pool cannot serve makes `COPY`
    /// fail with `ENOMEM`, which the engine reports (the page is poisoned).
    /// Without it the mapping fails at once if the pool is short.
    pub fn anonymous_hugetlb(ranges: &[(GuestAddress, usize)], noreserve: bool) -> Result<Self, RamError> {
        check_ranges_to(ranges, HUGE_PAGE_SIZE as u64)?;
        let flags = libc::MAP_PRIVATE
            | libc::MAP_ANONYMOUS
            | libc::MAP_HUGETLB
            | libc::MAP_HUGE_2MB
            | if noreserve { libc::MAP_NORESERVE } else { 0 };
        let mem = map_regions(ranges, None, flags)?;
        Self::from_parts(mem, MemoryKind::PrivateHugetlb, None, None)
    }

    /// Maps a fresh memfd of 2 MiB huge pages (`MFD_HUGETLB`) for `ranges`
    /// (guest base, size, both 2 MiB-aligned), shared: regions back to
    /// back in the memfd. The mapping reserves its pages from the pool, so
    /// a short pool fails here, not at a fault.
    pub fn shared_hugetlb(ranges: &[(GuestAddress, usize)]) -> Result<Self, RamError> {
        check_ranges_to(ranges, HUGE_PAGE_SIZE as u64)?;
        let total: u64 = ranges.iter().map(|r| r.1 as u64).sum();
        let file = crate::image::memfd_with("apf-guest-ram-huge", libc::MFD_HUGETLB | libc::MFD_HUGE_2MB)
            .map_err(RamError::Memfd)?;
        file.set_len(total)
            .map_err(|source| RamError::Memfd(ImageError::Memfd { what: "ftruncate", source }))?;
        let file = Arc::new(file);
        let mem = map_regions(ranges, Some((&file, 0)), libc::MAP_SHARED)?;
        Self::from_parts(mem, MemoryKind::SharedHugetlb, Some(file), None)
    }

    fn from_parts(
        mem: GuestMemoryMmap,
        kind: MemoryKind,
        file: Option<Arc<File>>,
        image: Option<Arc<ImageSource>>,
    ) -> Result<Self, RamError> {
        let mut regions = Vec::with_capacity(mem.num_regions());
        let mut file_offset = 0;
        let (shift, page) = if kind.is_huge() { (HUGE_PAGE_SHIFT, HUGE_PAGE_SIZE as u64) } else { (PAGE_SHIFT, PAGE) };
        for r in mem.iter() {
            let base = r.start_addr();
            let len = r.len();
            if base.0 % page != 0 || len % page != 0 || len == 0 {
                return Err(RamError::UnalignedRegion { base: base.0, size: len });
            }
            let host = r.as_ptr() as u64;
            if !kind.is_huge() {
                // (hugetlb mappings have no transparent huge pages to turn off)
                no_huge_pages(host, len).map_err(|source| RamError::Madvise { base: base.0, source })?;
            }
            regions.push(Region::new(base, len, host, file_offset, shift));
            file_offset += len;
        }
        if regions.is_empty() {
            return Err(RamError::NoRegions);
        }
        Ok(GuestRam {
            mem,
            regions,
            kind,
            file,
            image,
            remote: false,
            remote_owner: Default::default(),
            shared_out: Default::default(),
        })
    }

    /// What backs this RAM.
    pub fn kind(&self) -> MemoryKind {
        self.kind
    }

    /// The page source of image RAM: its image, laid out as this RAM maps
    /// it. An engine over image RAM must be built with this source (reads
    /// are served from the image's pages in place, so no other source
    /// could agree with them). `None` for the other kinds.
    pub fn image_source(&self) -> Option<Arc<dyn PageSource>> {
        self.image.clone().map(|s| s as Arc<dyn PageSource>)
    }

    /// The image behind image RAM.
    pub fn image_file(&self) -> Option<&Arc<Image>> {
        self.image.as_ref().map(|s| s.image())
    }

    /// Whether `source` is this RAM's image source (the same object).
    pub(crate) fn is_image_source(&self, source: &Arc<dyn PageSource>) -> bool {
        self.image.as_ref().is_some_and(|s| std::ptr::addr_eq(Arc::as_ptr(s), Arc::as_ptr(source)))
    }

    /// The memfd of shared RAM, duplicated, for another process (a
    /// vhost-user device) to map. Refused while any page is still a hole
    /// ([`RamError::StillFilling`]): a process touching a hole would have
    /// the kernel put a zero page in the page cache, which this process
    /// then maps without a fault, reading zeros where the guest's contents
    /// should be. Fill the memory first ([`crate::Engine::prefetch`] over
    /// every region). Holes a discard punches later are zeros anyway.
    pub fn shared_fd(&self) -> Result<std::os::fd::OwnedFd, RamError> {
        let file = match (self.kind, &self.file) {
            (MemoryKind::SharedMemfd | MemoryKind::SharedHugetlb, Some(file)) => file,
            _ => return Err(RamError::NotShareable(self.kind)),
        };
        if self.kind == MemoryKind::SharedHugetlb {
            // hugetlbfs answers SEEK_DATA with "all data": the engine's
            // page states say instead. A page not present is a hole unless
            // a discard made it one (zeros are then its contents).
            for r in &self.regions {
                let filling = (0..r.pages()).find(|&p| {
                    let (state, origin) = r.state(p);
                    state != PageState::Present && origin != Origin::Zero
                });
                if let Some(p) = filling {
                    return Err(RamError::StillFilling(r.page_gpa(p).0));
                }
            }
            use std::os::fd::AsFd;
            return file.as_fd().try_clone_to_owned().map_err(RamError::Seek);
        }
        for r in &self.regions {
            let runs = crate::image::cache_runs(file, r.file_offset, r.len).map_err(RamError::Seek)?;
            if let Some(&(off, _, _)) = runs.iter().find(|run| !run.2) {
                return Err(RamError::StillFilling(r.base.0 + (off - r.file_offset)));
            }
        }
        use std::os::fd::AsFd;
        let fd = file.as_fd().try_clone_to_owned().map_err(RamError::Seek)?;
        self.shared_out.store(true, std::sync::atomic::Ordering::Release);
        Ok(fd)
    }

    /// Whether [`GuestRam::shared_fd`] handed the memory to another process.
    pub fn is_shared_out(&self) -> bool {
        self.shared_out.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Punches pages `[first, first + count)` of region `region` out of the
    /// memfd of shared RAM (`fallocate(PUNCH_HOLE)`): every mapping loses
    /// them and reads zeros until they are filled again. No remove event
    /// follows.
    pub(crate) fn punch(&self, region: usize, first: usize, count: usize) -> std::io::Result<()> {
        let (MemoryKind::SharedMemfd | MemoryKind::SharedHugetlb, Some(file)) = (self.kind, &self.file) else {
            return Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        };
        // Whole pages of the region: on hugetlbfs a hole of whole huge
        // pages gives them back to the pool (a part of one would be zeroed
        // and kept).
        let r = &self.regions[region];
        let off = r.file_offset + (first * r.page_size()) as u64;
        rustix::fs::fallocate(
            &**file,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            off,
            r.pages_len(count) as u64,
        )
        .map_err(std::io::Error::from)
    }

    /// Reads pages `[first, first + count)` of region `region` of shared
    /// RAM from its memfd into `buf` (holes read zeros), bypassing the
    /// mapping and so never faulting.
    pub(crate) fn read_file(&self, region: usize, first: usize, buf: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let (MemoryKind::SharedMemfd | MemoryKind::SharedHugetlb, Some(file)) = (self.kind, &self.file) else {
            return Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        };
        let r = &self.regions[region];
        file.read_exact_at(buf, r.file_offset + (first * r.page_size()) as u64)
    }

    /// The runs of pages `[first, first + count)` of region `region` that
    /// the page cache of the file behind it (shared memfd, image) holds
    /// (`true`) or not, as `(first, end, data)` page indices; `None` for
    /// anonymous memory.
    /// For image RAM whose image was loaded (not a file used in place):
    /// the runs of pages `[first, first + count)` of `region` where the
    /// image holds data (`true`) or a hole, as `(first, end, data)`, from
    /// what loading found, with no system call. `None` otherwise.
    pub(crate) fn image_runs(&self, region: usize, first: usize, count: usize) -> Option<Vec<(usize, usize, bool)>> {
        let data = |p: usize| self.image_holds_data(region, p);
        data(first)?;
        let mut out = Vec::new();
        let mut a = first;
        while a < first + count {
            let d = data(a)?;
            let mut b = a + 1;
            while b < first + count && data(b)? == d {
                b += 1;
            }
            out.push((a, b, d));
            a = b;
        }
        Some(out)
    }

    /// Whether the loaded image behind image RAM holds data for page
    /// `page` of `region` (`false`: a hole), as loading found it; `None`
    /// if not known (see [`GuestRam::image_runs`]).
    pub(crate) fn image_holds_data(&self, region: usize, page: usize) -> Option<bool> {
        self.image.as_ref()?.holds_data(self.regions[region].page_gpa(page))
    }

    #[allow(clippy::type_complexity)]
    pub(crate) fn file_runs(
        &self,
        region: usize,
        first: usize,
        count: usize,
    ) -> Option<std::io::Result<Vec<(usize, usize, bool)>>> {
        self.file.as_ref()?;
        if self.regions[region].is_huge() {
            // The kernel cannot say for hugetlbfs: `mincore` looks at page
            // tables only and `SEEK_DATA` calls the whole file data. A
            // MISSING fault there always means a hole (a page in the page
            // cache is mapped without one), and a `COPY` onto a page the
            // page cache holds answers `EEXIST`.
            return None;
        }
        Some(self.regions[region].file_runs(first, count))
    }

    /// Guest RAM that lives in another process, which registered it with
    /// a userfaultfd and handed the descriptor over: nothing of it is
    /// mapped here. The engine keeps its page states as for local memory
    /// and changes the memory only through that descriptor's ioctls,
    /// addressed by the owner's host addresses. It has no vm-memory view
    /// ([`GuestRam::guest_memory`] is empty) and no pointers
    /// ([`GuestRam::host_range`] fails with [`RamError::Remote`]), so
    /// nothing here can touch it directly; pins, references and offlines
    /// are refused.
    ///
    /// Regions must be page-aligned, non-empty and overlap neither in guest
    /// nor in host addresses; they may come in any order. Their pages are
    /// 4 KiB, or 2 MiB for all of them (hugetlb memory, which is then
    /// [`MemoryKind::PrivateHugetlb`]: each fault gets its whole huge page).
    pub fn remote(regions: &[RemoteRegion]) -> Result<Self, RamError> {
        if regions.is_empty() {
            return Err(RamError::NoRegions);
        }
        let mut sorted = regions.to_vec();
        sorted.sort_by_key(|r| r.gpa.0);
        let page_size = regions[0].page_size;
        for r in &sorted {
            if ![PAGE, HUGE_PAGE_SIZE as u64].contains(&r.page_size) || r.page_size != page_size {
                return Err(RamError::PageSize { base: r.gpa.0, page_size: r.page_size });
            }
            let ends = r.gpa.0.checked_add(r.len).is_some() && r.host.checked_add(r.len).is_some();
            let unaligned = (r.gpa.0 | r.host | r.len) & (r.page_size - 1) != 0;
            if unaligned || r.len == 0 || !ends {
                return Err(RamError::UnalignedRegion { base: r.gpa.0, size: r.len });
            }
        }
        for (i, a) in sorted.iter().enumerate() {
            for b in &sorted[i + 1..] {
                let guest = a.gpa.0 < b.gpa.0 + b.len && b.gpa.0 < a.gpa.0 + a.len;
                let host = a.host < b.host + b.len && b.host < a.host + a.len;
                if guest || host {
                    return Err(RamError::Overlap(a.gpa.0, b.gpa.0));
                }
            }
        }
        let regions =
            sorted.iter().map(|r| Region::new(r.gpa, r.len, r.host, 0, r.page_size.trailing_zeros())).collect();
        Ok(GuestRam {
            mem: GuestMemoryMmap::default(),
            regions,
            kind: if page_size == PAGE { MemoryKind::PrivateAnonymous } else { MemoryKind::PrivateHugetlb },
            file: None,
            image: None,
            remote: true,
            remote_owner: Default::default(),
            shared_out: Default::default(),
        })
    }

    /// True if this memory lives in another process ([`GuestRam::remote`]).
    pub fn is_remote(&self) -> bool {
        self.remote
    }

    /// The process remote memory lives in, if its owner was given.
    pub(crate) fn remote_owner(&self) -> Option<u32> {
        self.remote_owner.get().copied()
    }

    pub(crate) fn set_remote_owner(&self, pid: u32) {
        let _ = self.remote_owner.set(pid);
    }

    /// The rust-vmm view of this memory, for device emulation and loaders.
    /// Accesses through it to missing pages fault and are resolved by the
    /// engine like any other access. Empty for [`GuestRam::remote`]
    /// memory: every access through it fails with an address error.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The regions, sorted by guest address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Total bytes of RAM.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Total pages of RAM.
    pub fn pages(&self) -> usize {
        self.regions.iter().map(|r| r.pages()).sum()
    }

    /// The index of the page at `loc` among all pages of guest RAM, in
    /// region order.
    pub fn page_index(&self, loc: PageLoc) -> usize {
        self.regions[..loc.region].iter().map(|r| r.pages()).sum::<usize>() + loc.page
    }

    /// The page holding `gpa`.
    pub fn locate(&self, gpa: GuestAddress) -> Result<PageLoc, RamError> {
        let idx = self.regions.partition_point(|r| r.base.0 + r.len <= gpa.0);
        match self.regions.get(idx) {
            Some(r) if r.base.0 <= gpa.0 => Ok(PageLoc { region: idx, page: ((gpa.0 - r.base.0) >> r.shift) as usize }),
            _ => Err(RamError::OutOfRange(gpa.0)),
        }
    }

    /// The page mapped at host address `host`, if it is guest RAM.
    pub fn locate_host(&self, host: u64) -> Option<PageLoc> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            (host >= r.host && host - r.host < r.len)
                .then(|| PageLoc { region: i, page: ((host - r.host) >> r.shift) as usize })
        })
    }

    /// The region and first page of a page-aligned, non-empty range that
    /// lies inside one region, plus its page count (in the region's pages:
    /// a range of huge-page memory must be aligned to them,
    /// [`RamError::UnalignedToPages`]).
    pub fn check_range(&self, range: GuestRange) -> Result<(PageLoc, usize), RamError> {
        if range.len == 0 {
            return Err(RamError::Empty(range.start.0));
        }
        if !range.is_page_aligned() {
            return Err(RamError::Unaligned(range));
        }
        let loc = self.locate(range.start)?;
        let r = &self.regions[loc.region];
        if range.start.0.checked_add(range.len).is_none_or(|end| end > r.base.0 + r.len) {
            return Err(RamError::RangeOutOfBounds(range));
        }
        if r.is_huge() && !range.is_aligned_to(r.page_size() as u64) {
            return Err(RamError::UnalignedToPages { range, page_size: r.page_size() as u64 });
        }
        Ok((loc, (range.len >> r.shift) as usize))
    }

    /// Host address of `[gpa, gpa + len)`, which must lie inside one region
    /// (any alignment). This is the only way from a guest address to a host
    /// pointer: an address outside RAM is an error, never a pointer.
    /// Remote memory ([`GuestRam::remote`]) has no pointer here:
    /// [`RamError::Remote`].
    pub fn host_range(&self, gpa: GuestAddress, len: u64) -> Result<*mut u8, RamError> {
        if self.remote {
            return Err(RamError::Remote(GuestRange::new(gpa, len)));
        }
        let loc = self.locate(gpa)?;
        let r = &self.regions[loc.region];
        let off = gpa.0 - r.base.0;
        if off.checked_add(len).is_none_or(|end| end > r.len) {
            return Err(RamError::RangeOutOfBounds(GuestRange::new(gpa, len)));
        }
        Ok((r.host + off) as *mut u8)
    }

    /// The region a located page is in.
    pub fn region(&self, loc: PageLoc) -> &Region {
        &self.regions[loc.region]
    }

    /// State and origin of a located page.
    pub fn state(&self, loc: PageLoc) -> (PageState, Origin) {
        self.regions[loc.region].state(loc.page)
    }
}


/// A private anonymous mapping with transparent huge pages off, unmapped on
/// drop: the engine's staging area, and test buffers. Made by vm-memory's
/// mmap builder (the flags of a plain `mmap`, no `MAP_NORESERVE`).
#[derive(Debug)]
pub(crate) struct AnonMapping {
    map: MmapRegion,
}

impl AnonMapping {
    pub(crate) fn new(len: usize) -> std::io::Result<AnonMapping> {
        let map = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
            .build()
            .map_err(mmap_error)?;
        no_huge_pages(map.as_ptr() as u64, len as u64)?;
        Ok(AnonMapping { map })
    }

    /// First byte.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.map.size()
    }
}

/// The kernel's error behind a failed vm-memory mapping, errno and all.
pub(crate) fn mmap_error(e: vm_memory::mmap::MmapRegionError) -> std::io::Error {
    match e {
        vm_memory::mmap::MmapRegionError::Mmap(e) => e,
        other => std::io::Error::other(other),
    }
}

fn check_ranges(ranges: &[(GuestAddress, usize)]) -> Result<(), RamError> {
    check_ranges_to(ranges, PAGE)
}

/// Checks that `ranges` are given and aligned to pages of `page` bytes.
fn check_ranges_to(ranges: &[(GuestAddress, usize)], page: u64) -> Result<(), RamError> {
    if ranges.is_empty() {
        return Err(RamError::NoRegions);
    }
    for &(base, size) in ranges {
        if base.0 % page != 0 || size as u64 % page != 0 || size == 0 {
            return Err(RamError::UnalignedRegion { base: base.0, size: size as u64 });
        }
    }
    Ok(())
}

/// Maps `file` for `ranges`, back to back from offset `base`, with `flags`
/// (`MAP_SHARED` or `MAP_PRIVATE`) and `MAP_NORESERVE`.
fn map_file(
    ranges: &[(GuestAddress, usize)],
    file: &Arc<File>,
    base: u64,
    flags: i32,
) -> Result<GuestMemoryMmap, RamError> {
    map_regions(ranges, Some((file, base)), flags | libc::MAP_NORESERVE)
}

/// Maps `ranges` with exactly `flags`: anonymous memory, or `file` back to
/// back from offset `base`.
fn map_regions(
    ranges: &[(GuestAddress, usize)],
    file: Option<(&Arc<File>, u64)>,
    flags: i32,
) -> Result<GuestMemoryMmap, RamError> {
    let mut off = file.map_or(0, |(_, base)| base);
    let mut regions = Vec::with_capacity(ranges.len());
    for &(base, size) in ranges {
        let mut builder = MmapRegionBuilder::new(size);
        if let Some((file, _)) = file {
            builder = builder.with_file_offset(vm_memory::FileOffset::from_arc(file.clone(), off));
        }
        let map = builder
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .build()
            .map_err(|e| RamError::MapFile { base: base.0, source: mmap_error(e) })?;
        let region = GuestRegionMmap::new(map, base)
            .ok_or(RamError::MapFile { base: base.0, source: std::io::Error::from_raw_os_error(libc::EOVERFLOW) })?;
        regions.push(region);
        off += size as u64;
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| RamError::MapFile { base: ranges[0].0 .0, source: std::io::Error::other(e) })
}

fn is_private_anonymous(r: &GuestRegionMmap) -> bool {
    let m: &MmapRegion = r;
    m.file_offset().is_none() && m.flags() & libc::MAP_PRIVATE != 0 && m.flags() & libc::MAP_ANONYMOUS != 0
}

fn no_huge_pages(host: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: MADV_NOHUGEPAGE only changes the THP policy of a mapping this
    // process owns (the region's); it neither frees nor moves memory.
    let ret = unsafe { libc::madvise(host as *mut libc::c_void, len as usize, libc::MADV_NOHUGEPAGE) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_regions() -> GuestRam {
        GuestRam::anonymous(&[(GuestAddress(0x1000), 4 * PAGE_SIZE), (GuestAddress(0x10_0000), 2 * PAGE_SIZE)]).unwrap()
    }

    #[test]
    fn locate_finds_pages_and_rejects_holes() {
        let ram = two_regions();
        assert_eq!(ram.locate(GuestAddress(0x1000)).unwrap(), PageLoc { region: 0, page: 0 });
        assert_eq!(ram.locate(GuestAddress(0x4fff)).unwrap(), PageLoc { region: 0, page: 3 });
        assert_eq!(ram.locate(GuestAddress(0x10_1234)).unwrap(), PageLoc { region: 1, page: 1 });
        for bad in [0, 0xfff, 0x5000, 0xf_ffff, 0x10_2000, u64::MAX] {
            assert!(matches!(ram.locate(GuestAddress(bad)), Err(RamError::OutOfRange(a)) if a == bad), "{bad:#x}");
        }
    }

    #[test]
    fn host_range_is_bounds_checked() {
        let ram = two_regions();
        let base = ram.regions()[0].host_base();
        assert_eq!(ram.host_range(GuestAddress(0x1000), 4 * PAGE).unwrap() as u64, base);
        assert_eq!(ram.host_range(GuestAddress(0x1001), 10).unwrap() as u64, base + 1);
        // Crossing the end of a region, or into the hole, is refused.
        assert!(matches!(ram.host_range(GuestAddress(0x4000), PAGE + 1), Err(RamError::RangeOutOfBounds(_))));
        assert!(ram.host_range(GuestAddress(0x5000), 1).is_err());
        assert!(ram.host_range(GuestAddress(0x1000), u64::MAX).is_err());
    }

    #[test]
    fn check_range_validates_alignment_and_extent() {
        let ram = two_regions();
        assert_eq!(
            ram.check_range(GuestRange::new(GuestAddress(0x2000), 2 * PAGE)).unwrap(),
            (PageLoc { region: 0, page: 1 }, 2)
        );
        assert!(matches!(ram.check_range(GuestRange::new(GuestAddress(0x2000), 0)), Err(RamError::Empty(_))));
        assert!(matches!(ram.check_range(GuestRange::new(GuestAddress(0x2001), PAGE)), Err(RamError::Unaligned(_))));
        assert!(matches!(
            ram.check_range(GuestRange::new(GuestAddress(0x4000), 2 * PAGE)),
            Err(RamError::RangeOutOfBounds(_))
        ));
        assert!(matches!(ram.check_range(GuestRange::new(GuestAddress(0x8000), PAGE)), Err(RamError::OutOfRange(_))));
    }

    /// A page a remove touched, then filled again from the store (an
    /// evict and its restore while the remove's zap was still to come),
    /// is taken back as zeros when the kernel turns out not to hold it;
    /// one no remove touched is not (its loss is a lost page).
    #[test]
    fn a_loss_after_a_remove_is_the_remove_zap_until_one_is_seen() {
        let ram = two_regions();
        let r = &ram.regions()[0];
        let present_from_store = |p: usize| {
            r.states[p].store(pack(PageState::Present, Origin::Store), Ordering::Release);
        };
        present_from_store(0);
        assert!(!r.zap_may_explain(0));
        assert!(!r.try_reclaim_removed(0), "no remove came: a lost page");
        r.mark_removed(0);
        present_from_store(0);
        assert!(r.zap_may_explain(0));
        assert!(r.try_reclaim_removed(0));
        assert_eq!(r.state(0), (PageState::Resolving, Origin::Zero));
        // The zap that was pending has been seen: the next loss is a loss.
        present_from_store(0);
        assert!(!r.try_reclaim_removed(0));
        // Origin `Zero` is always the remove's.
        r.states[1].store(pack(PageState::Present, Origin::Zero), Ordering::Release);
        assert!(r.try_reclaim_removed(1));
    }

    #[test]
    fn locate_host_maps_back() {
        let ram = two_regions();
        let r1 = &ram.regions()[1];
        assert_eq!(ram.locate_host(r1.page_host(1) + 7), Some(PageLoc { region: 1, page: 1 }));
        // One past region 1 is not region 1 (it may be another mapping).
        assert_ne!(ram.locate_host(r1.host_base() + 2 * PAGE).map(|l| l.region), Some(1));
        assert_eq!(ram.locate_host(8), None);
    }

    #[test]
    fn runs_are_the_maximal_stretches_where_the_predicate_holds() {
        let set = [false, true, true, false, true, false, false, true];
        assert_eq!(runs(set.len(), |i| set[i]), vec![(1, 3), (4, 5), (7, 8)]);
        assert_eq!(runs(3, |_| true), vec![(0, 3)]);
        assert_eq!(runs(3, |_| false), vec![]);
        assert_eq!(runs(0, |_| true), vec![]);
    }

    #[test]
    fn page_state_transitions() {
        let ram = two_regions();
        let r = &ram.regions()[0];
        assert_eq!(r.state(0), (PageState::Missing, Origin::Source));
        assert_eq!(r.try_claim(0), Some(Origin::Source));
        assert_eq!(r.try_claim(0), None, "a page is claimed once");
        r.mark_removed(0);
        assert_eq!(r.state(0), (PageState::Resolving, Origin::Zero), "removal keeps the claim");
        r.complete(0).unwrap();
        assert_eq!(r.state(0).0, PageState::Present);
        assert!(r.mark_lost(0));
        assert_eq!(r.state(0), (PageState::Poisoned, Origin::Zero));
        assert!(!r.mark_lost(0), "only a present page is lost");
        r.mark_removed(0);
        r.try_claim(0).unwrap();
        r.release(0).unwrap();
        assert_eq!(r.state(0), (PageState::Missing, Origin::Zero));
        r.try_claim(0).unwrap();
        r.poison(0).unwrap();
        assert_eq!(r.state(0).0, PageState::Poisoned);
        r.mark_removed(0);
        assert_eq!(r.state(0), (PageState::Missing, Origin::Zero));
        assert_eq!(r.census(), [4, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn remote_regions_are_checked_sorted_and_have_no_pointers() {
        let reg = |host: u64, len: u64, gpa: u64| RemoteRegion { host, len, gpa: GuestAddress(gpa), page_size: PAGE };
        let ram = GuestRam::remote(&[reg(0x7f00_0020_0000, 2 * PAGE, 0x1000), reg(0x7f00_0000_0000, PAGE, 0)]).unwrap();
        assert!(ram.is_remote());
        assert_eq!(ram.regions()[0].host_base(), 0x7f00_0000_0000, "sorted by guest address");
        assert_eq!(ram.locate_host(0x7f00_0020_1234), Some(PageLoc { region: 1, page: 1 }));
        assert!(matches!(ram.host_range(GuestAddress(0x1000), 8), Err(RamError::Remote(_))));
        assert!(ram.guest_memory().iter().next().is_none(), "no local view of another process's memory");
        assert!(!two_regions().is_remote());

        let overlap_guest = GuestRam::remote(&[reg(0x10_0000, 2 * PAGE, 0), reg(0x20_0000, PAGE, PAGE)]);
        assert!(matches!(overlap_guest, Err(RamError::Overlap(0, 0x1000))));
        let overlap_host = GuestRam::remote(&[reg(0x10_0000, 2 * PAGE, 0), reg(0x10_1000, PAGE, 0x10_0000)]);
        assert!(matches!(overlap_host, Err(RamError::Overlap(..))));
        // Huge pages for every region, or for none.
        let huge = RemoteRegion { page_size: 2 << 20, ..reg(0x20_0000, 2 << 20, 0) };
        let ram = GuestRam::remote(&[huge]).unwrap();
        assert_eq!((ram.kind(), ram.regions()[0].page_size()), (MemoryKind::PrivateHugetlb, 2 << 20));
        let mixed = GuestRam::remote(&[huge, reg(0x80_0000, PAGE, 0x40_0000)]);
        assert!(matches!(mixed, Err(RamError::PageSize { page_size: 4096, .. })));
        let odd = RemoteRegion { page_size: 8192, ..reg(0x20_0000, 8192, 0) };
        assert!(matches!(GuestRam::remote(&[odd]), Err(RamError::PageSize { page_size: 8192, .. })));
        let unaligned_huge = RemoteRegion { page_size: 2 << 20, ..reg(0x20_1000, 2 << 20, 0) };
        assert!(matches!(GuestRam::remote(&[unaligned_huge]), Err(RamError::UnalignedRegion { .. })));
        assert!(matches!(GuestRam::remote(&[reg(0x10_0800, PAGE, 0)]), Err(RamError::UnalignedRegion { .. })));
        assert!(matches!(GuestRam::remote(&[reg(0x10_0000, 0, 0)]), Err(RamError::UnalignedRegion { .. })));
        assert!(matches!(GuestRam::remote(&[reg(u64::MAX - 0xfff, PAGE, 0)]), Err(RamError::UnalignedRegion { .. })));
        assert!(matches!(GuestRam::remote(&[]), Err(RamError::NoRegions)));
    }

    #[test]
    fn unaligned_regions_are_refused() {
        assert!(matches!(
            GuestRam::anonymous(&[(GuestAddress(0x800), PAGE_SIZE)]),
            Err(RamError::UnalignedRegion { .. })
        ));
        assert!(matches!(GuestRam::anonymous(&[(GuestAddress(0), 100)]), Err(RamError::UnalignedRegion { .. })));
        assert!(matches!(GuestRam::anonymous(&[]), Err(RamError::NoRegions)));
    }

    #[test]
    fn shares_memory_with_vm_memory() {
        use vm_memory::Bytes;
        let ram = two_regions();
        ram.guest_memory().write_obj(0xdead_beef_u32, GuestAddress(0x10_0010)).unwrap();
        let p = ram.host_range(GuestAddress(0x10_0010), 4).unwrap();
        // SAFETY: p points at 4 bytes inside region 1, which is mapped and
        // was just written through vm-memory.
        let v = unsafe { std::ptr::read_volatile(p as *const u32) };
        assert_eq!(v, 0xdead_beef);
    }
}
