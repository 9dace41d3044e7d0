//! The one interface through which the engine changes guest memory:
//! install bytes (`COPY`), install zeros (`ZEROPAGE`), wake, take pages out
//! into a staging area (`MOVE`), poison. The fault path, pins and offline
//! call nothing else; what a backend lacks it says ([`Install::supports`])
//! and refuses, so callers choose another way before they start.
//!
//! The backends:
//!
//! - [`PrivateAnonymous`]: the engine's own descriptor over private
//!   anonymous memory, with every feature (`COPY`, `ZEROPAGE`, `MOVE` into
//!   staging, `POISON`, thread ids).
//! - [`SharedMemory`]: the engine's own descriptor over a memfd mapped
//!   shared: `COPY` and `ZEROPAGE` put pages into the page cache; `POISON`
//!   and thread ids; `WRITEPROTECT` when the kernel offers it on shared
//!   memory; no `MOVE` (the kernel moves private anonymous pages only).
//! - [`ImagePrivate`]: the engine's own descriptor over an image mapped
//!   private, registered MISSING and MINOR: `CONTINUE` maps the image's
//!   pages for reads, `COPY` installs private copies for writes, `ZEROPAGE`
//!   zeros; `POISON` and thread ids; `WRITEPROTECT` as for shared memory;
//!   no `MOVE`.
//! - [`Hugetlb`]: the engine's own descriptor over 2 MiB huge pages,
//!   private anonymous or a memfd mapped shared: `COPY` of whole huge
//!   pages, `POISON` and thread ids; `CONTINUE` on the shared one (a page
//!   its page cache holds); `WRITEPROTECT` of whole huge pages when the
//!   kernel offers it on hugetlb; no `ZEROPAGE` (the kernel has none for
//!   huge pages: zeros are copied) and no `MOVE`.
//! - [`Limited`]: `COPY`, `ZEROPAGE` and `WAKE` only, no thread ids: what a
//!   userfaultfd received from Firecracker offers (its `UFFDIO_API` asked
//!   for `EVENT_REMOVE` alone, and a second handshake is refused).
//! - [`Remote`]: an adopted descriptor over another process's memory:
//!   `COPY`, `ZEROPAGE`, `WAKE`, and `POISON` if its sender negotiated it;
//!   never `MOVE` (the staging area would have to live in that process).

use crate::config::Backend;
use crate::ram::MemoryKind;
use crate::uffd::{Features, IoctlError, Op, Uffd, UffdError};

/// What a backend may be asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MemOp {
    /// Install bytes (`UFFDIO_COPY`).
    Copy,
    /// Install zeros (`UFFDIO_ZEROPAGE`).
    ZeroPage,
    /// Wake waiting threads (`UFFDIO_WAKE`).
    Wake,
    /// Take pages out into staging (`UFFDIO_MOVE`).
    Move,
    /// Mark pages lost, so an access gets SIGBUS (`UFFDIO_POISON`).
    Poison,
    /// Map the page-cache pages already there (`UFFDIO_CONTINUE`).
    Continue,
    /// Make writes fault, and let them go again (`UFFDIO_WRITEPROTECT`):
    /// how offlines keep every write on memory without `MOVE`.
    WriteProtect,
}

/// Installs and takes out guest pages. The `unsafe` methods change memory
/// behind any reference into it: their destinations (and a move's source)
/// must be pages of a range registered with [`Install::uffd`] that no Rust
/// reference points into (guest RAM, or the staging area its holder uses).
pub(crate) trait Install: Send + Sync {
    /// The backend's name, for errors.
    fn name(&self) -> &'static str;

    /// Whether this backend offers `op`. One it does not offer fails with
    /// `EOPNOTSUPP` without reaching the kernel.
    fn supports(&self, op: MemOp) -> bool;

    /// The descriptor: events, registration, failpoints.
    fn uffd(&self) -> &Uffd;

    /// `UFFDIO_COPY` of `len` bytes from `src` to `dst`; wakes the waiters
    /// unless `dont_wake`. Returns the bytes copied (partial progress comes
    /// back as an error with `done` set).
    ///
    /// # Safety
    ///
    /// `dst..dst + len` as described on the trait; `src` readable for `len`
    /// bytes.
    unsafe fn copy(&self, dst: u64, src: *const u8, len: usize, dont_wake: bool) -> Result<usize, IoctlError> {
        // SAFETY: the caller's contract is `Uffd::copy`'s.
        unsafe { self.uffd().copy(dst, src, len, dont_wake) }
    }

    /// `UFFDIO_ZEROPAGE` over `start..start + len`.
    ///
    /// # Safety
    ///
    /// The range as described on the trait.
    unsafe fn zeropage(&self, start: u64, len: usize, dont_wake: bool) -> Result<usize, IoctlError> {
        // SAFETY: the caller's contract is `Uffd::zeropage`'s.
        unsafe { self.uffd().zeropage(start, len, dont_wake) }
    }

    /// `UFFDIO_WAKE` of the threads waiting on `start..start + len`.
    fn wake(&self, start: u64, len: usize) -> Result<(), IoctlError> {
        self.uffd().wake(start, len)
    }

    /// `UFFDIO_MOVE` of `len` bytes from `src` to `dst` (holes in the source
    /// allowed if `allow_src_holes`).
    ///
    /// # Safety
    ///
    /// Both ranges as described on the trait.
    unsafe fn move_pages(&self, dst: u64, src: u64, len: usize, allow_src_holes: bool) -> Result<usize, IoctlError> {
        let _ = (dst, src, len, allow_src_holes);
        Err(unsupported(Op::Move))
    }

    /// `UFFDIO_POISON` over `start..start + len`.
    ///
    /// # Safety
    ///
    /// The range as described on the trait.
    unsafe fn poison(&self, start: u64, len: usize) -> Result<usize, IoctlError> {
        let _ = (start, len);
        Err(unsupported(Op::Poison))
    }

    /// `UFFDIO_CONTINUE` over `start..start + len`: maps the page-cache
    /// pages there. `EFAULT` with nothing done: a hole.
    ///
    /// # Safety
    ///
    /// The range as described on the trait.
    unsafe fn continue_pages(&self, start: u64, len: usize, dont_wake: bool) -> Result<usize, IoctlError> {
        let _ = (start, len, dont_wake);
        Err(unsupported(Op::Continue))
    }

    /// `UFFDIO_WRITEPROTECT` over `start..start + len`: sets or clears
    /// write protection (clearing wakes the writers unless `dont_wake`).
    fn writeprotect(&self, start: u64, len: usize, protect: bool, dont_wake: bool) -> Result<(), IoctlError> {
        let _ = (start, len, protect, dont_wake);
        Err(unsupported(Op::WriteProtect))
    }

    /// Guest RAM could not be registered for write protection: stop
    /// offering it.
    fn no_write_protect(&self) {}
}

/// Write protection of a backend over shared memory: offered when the
/// descriptor negotiated it and guest RAM was registered with it.
#[derive(Debug, Default)]
pub(crate) struct WriteProtection(std::sync::atomic::AtomicBool);

impl WriteProtection {
    fn new(uffd: &Uffd) -> Self {
        WriteProtection(std::sync::atomic::AtomicBool::new(uffd.features().contains(Features::WP_SHMEM)))
    }

    fn on(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    fn off(&self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }

    fn writeprotect(&self, uffd: &Uffd, start: u64, len: usize, protect: bool, dont_wake: bool) -> Result<(), IoctlError> {
        if !self.on() {
            return Err(unsupported(Op::WriteProtect));
        }
        uffd.writeprotect(start, len, protect, dont_wake)
    }
}

/// The answer to an operation a backend does not offer.
fn unsupported(op: Op) -> IoctlError {
    IoctlError { op: op.name(), errno: libc::EOPNOTSUPP, done: 0 }
}

/// Opens a descriptor for `backend` over memory of `kind` and wraps it.
/// `None`: the limited backend serves private anonymous memory only (it
/// stands for a descriptor received from Firecracker).
pub(crate) fn open(backend: Backend, kind: MemoryKind) -> Result<Option<Box<dyn Install>>, UffdError> {
    let own = Features::EVENT_REMOVE | Features::THREAD_ID | Features::POISON;
    Ok(Some(match (backend, kind) {
        (Backend::PrivateAnonymous, MemoryKind::PrivateAnonymous) => {
            for_descriptor(Uffd::new(own, Features::MOVE)?)
        }
        (Backend::PrivateAnonymous, MemoryKind::SharedMemfd) => {
            let uffd = Uffd::new(own | Features::MISSING_SHMEM, Features::WP_SHMEM)?;
            Box::new(SharedMemory { wp: WriteProtection::new(&uffd), uffd })
        }
        (Backend::PrivateAnonymous, MemoryKind::Image) => {
            let uffd = Uffd::new(own | Features::MISSING_SHMEM | Features::MINOR_SHMEM, Features::WP_SHMEM)?;
            Box::new(ImagePrivate { wp: WriteProtection::new(&uffd), uffd })
        }
        (
            Backend::PrivateAnonymous,
            MemoryKind::PrivateHugetlb | MemoryKind::SharedHugetlb | MemoryKind::HugetlbImage,
        ) => {
            let minor =
                if kind == MemoryKind::PrivateHugetlb { Features::empty() } else { Features::MINOR_HUGETLBFS };
            let uffd = Uffd::new(own | Features::MISSING_HUGETLBFS | minor, Features::WP_SHMEM)?;
            uffd.set_page_size(kind.page_size());
            Box::new(Hugetlb { wp: WriteProtection::new(&uffd), uffd, kind })
        }
        // What Firecracker asks for before it hands the descriptor over.
        (Backend::Limited, MemoryKind::PrivateAnonymous) => for_descriptor(Uffd::new(Features::EVENT_REMOVE, Features::empty())?),
        (Backend::Limited, _) => return Ok(None),
    }))
}

/// The backend a descriptor's negotiated features allow: private anonymous
/// with `POISON` (and `MOVE` if offered), limited otherwise.
pub(crate) fn for_descriptor(uffd: Uffd) -> Box<dyn Install> {
    if uffd.features().contains(Features::POISON) {
        Box::new(PrivateAnonymous { uffd })
    } else {
        Box::new(Limited { uffd })
    }
}

/// The backend of an adopted descriptor ([`Uffd::adopt`]) over another
/// process's memory.
pub(crate) fn remote(uffd: Uffd) -> Box<dyn Install> {
    Box::new(Remote { uffd })
}

/// Another process's memory, through the descriptor it handed over.
pub(crate) struct Remote {
    uffd: Uffd,
}

impl Install for Remote {
    fn name(&self) -> &'static str {
        "remote"
    }

    fn supports(&self, op: MemOp) -> bool {
        match op {
            MemOp::Copy | MemOp::ZeroPage | MemOp::Wake => true,
            MemOp::Poison => self.uffd.features().contains(Features::POISON),
            MemOp::Move | MemOp::Continue | MemOp::WriteProtect => false,
        }
    }

    fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    unsafe fn poison(&self, start: u64, len: usize) -> Result<usize, IoctlError> {
        if !self.supports(MemOp::Poison) {
            return Err(unsupported(Op::Poison));
        }
        // SAFETY: the caller's contract is `Uffd::poison`'s.
        unsafe { self.uffd.poison(start, len) }
    }
}

/// Private anonymous memory on a descriptor with `POISON` (and `MOVE`, when
/// the kernel offers it).
pub(crate) struct PrivateAnonymous {
    uffd: Uffd,
}

impl Install for PrivateAnonymous {
    fn name(&self) -> &'static str {
        "private-anonymous"
    }

    fn supports(&self, op: MemOp) -> bool {
        match op {
            MemOp::Copy | MemOp::ZeroPage | MemOp::Wake | MemOp::Poison => true,
            MemOp::Move => self.uffd.features().contains(Features::MOVE),
            MemOp::Continue | MemOp::WriteProtect => false,
        }
    }

    fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    unsafe fn move_pages(&self, dst: u64, src: u64, len: usize, allow_src_holes: bool) -> Result<usize, IoctlError> {
        // SAFETY: the caller's contract is `Uffd::move_pages`'s.
        unsafe { self.uffd.move_pages(dst, src, len, allow_src_holes) }
    }

    unsafe fn poison(&self, start: u64, len: usize) -> Result<usize, IoctlError> {
        // SAFETY: the caller's contract is `Uffd::poison`'s.
        unsafe { self.uffd.poison(start, len) }
    }
}

/// `COPY`, `ZEROPAGE` and `WAKE` only: no `MOVE`, no `POISON`, no thread
/// ids.
pub(crate) struct Limited {
    uffd: Uffd,
}

impl Install for Limited {
    fn name(&self) -> &'static str {
        "limited"
    }

    fn supports(&self, op: MemOp) -> bool {
        matches!(op, MemOp::Copy | MemOp::ZeroPage | MemOp::Wake)
    }

    fn uffd(&self) -> &Uffd {
        &self.uffd
    }
}

/// A memfd mapped shared: installs go into the page cache, which is what
/// every mapping of the memfd sees.
pub(crate) struct SharedMemory {
    uffd: Uffd,
    wp: WriteProtection,
}

impl Install for SharedMemory {
    fn name(&self) -> &'static str {
        "shared-memory"
    }

    fn supports(&self, op: MemOp) -> bool {
        match op {
            MemOp::Copy | MemOp::ZeroPage | MemOp::Wake | MemOp::Poison => true,
            MemOp::WriteProtect => self.wp.on(),
            MemOp::Move | MemOp::Continue => false,
        }
    }

    fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    unsafe fn poison(&self, start: u64, len: usize) -> Result<usize, IoctlError> {
        // SAFETY: the caller's contract is `Uffd::poison`'s.
        unsafe { self.uffd.poison(start, len) }
    }

    fn writeprotect(&self, start: u64, len: usize, protect: bool, dont_wake: bool) -> Result<(), IoctlError> {
        self.wp.writeprotect(&self.uffd, start, len, protect, dont_wake)
    }

    fn no_write_protect(&self) {
        self.wp.off();
    }
}

/// Huge pages (private anonymous, or a memfd mapped shared): each
/// install is of whole 2 MiB pages. The kernel has no huge-page
/// `ZEROPAGE`, and `MOVE` refuses hugetlb memory; write protection of
/// whole huge pages (`UFFD_FEATURE_WP_HUGETLBFS_SHMEM`, private and
/// shared alike) is what offlines keep writes with instead.
pub(crate) struct Hugetlb {
    uffd: Uffd,
    /// `PrivateHugetlb`, `SharedHugetlb` or `HugetlbImage`.
    kind: MemoryKind,
    wp: WriteProtection,
}

impl Install for Hugetlb {
    fn name(&self) -> &'static str {
        match self.kind {
            MemoryKind::SharedHugetlb => "hugetlb-shared",
            MemoryKind::HugetlbImage => "hugetlb-image",
            _ => "hugetlb-private",
        }
    }

    fn supports(&self, op: MemOp) -> bool {
        match op {
            MemOp::Copy | MemOp::Wake | MemOp::Poison => true,
            // Pages of a file's page cache (shared memory, the image).
            MemOp::Continue => self.kind != MemoryKind::PrivateHugetlb,
            MemOp::WriteProtect => self.wp.on(),
            MemOp::ZeroPage | MemOp::Move => false,
        }
    }

    fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    unsafe fn continue_pages(&self, start: u64, len: usize, dont_wake: bool) -> Result<usize, IoctlError> {
        if !self.supports(MemOp::Continue) {
            return Err(unsupported(Op::Continue));
        }
        // SAFETY: the caller's contract is `Uffd::continue_pages`'s.
        unsafe { self.uffd.continue_pages(start, len, dont_wake) }
    }

    unsafe fn zeropage(&self, start: u64, len: usize, dont_wake: bool) -> Result<usize, IoctlError> {
        let _ = (start, len, dont_wake);
        Err(unsupported(Op::ZeroPage))
    }

    fn writeprotect(&self, start: u64, len: usize, protect: bool, dont_wake: bool) -> Result<(), IoctlError> {
        self.wp.writeprotect(&self.uffd, start, len, protect, dont_wake)
    }

    fn no_write_protect(&self) {
        self.wp.off();
    }

    unsafe fn poison(&self, start: u64, len: usize) -> Result<usize, IoctlError> {
        // SAFETY: the caller's contract is `Uffd::poison`'s.
        unsafe { self.uffd.poison(start, len) }
    }
}

/// An image mapped private: reads map the image's own pages
/// (`CONTINUE`), writes get private copies (`COPY`).
pub(crate) struct ImagePrivate {
    uffd: Uffd,
    wp: WriteProtection,
}

impl Install for ImagePrivate {
    fn name(&self) -> &'static str {
        "image-private"
    }

    fn supports(&self, op: MemOp) -> bool {
        match op {
            MemOp::Copy | MemOp::ZeroPage | MemOp::Wake | MemOp::Poison | MemOp::Continue => true,
            MemOp::WriteProtect => self.wp.on(),
            MemOp::Move => false,
        }
    }

    fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    unsafe fn poison(&self, start: u64, len: usize) -> Result<usize, IoctlError> {
        // SAFETY: the caller's contract is `Uffd::poison`'s.
        unsafe { self.uffd.poison(start, len) }
    }

    unsafe fn continue_pages(&self, start: u64, len: usize, dont_wake: bool) -> Result<usize, IoctlError> {
        // SAFETY: the caller's contract is `Uffd::continue_pages`'s.
        unsafe { self.uffd.continue_pages(start, len, dont_wake) }
    }

    fn writeprotect(&self, start: u64, len: usize, protect: bool, dont_wake: bool) -> Result<(), IoctlError> {
        self.wp.writeprotect(&self.uffd, start, len, protect, dont_wake)
    }

    fn no_write_protect(&self) {
        self.wp.off();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram::AnonMapping;
    use crate::uffd::{RegisterMode, PAGE_SIZE};

    #[test]
    fn each_backend_says_what_it_offers_and_refuses_the_rest() {
        // Shared memory and images: no MOVE (the kernel moves private
        // anonymous pages only); CONTINUE for images alone.
        let shared = open(Backend::PrivateAnonymous, MemoryKind::SharedMemfd).unwrap().unwrap();
        let image = open(Backend::PrivateAnonymous, MemoryKind::Image).unwrap().unwrap();
        for op in [MemOp::Copy, MemOp::ZeroPage, MemOp::Wake, MemOp::Poison] {
            assert!(shared.supports(op) && image.supports(op), "{op:?}");
        }
        assert!(!shared.supports(MemOp::Move) && !image.supports(MemOp::Move));
        assert!(image.supports(MemOp::Continue) && !shared.supports(MemOp::Continue));
        assert!(image.uffd().features().contains(Features::MINOR_SHMEM | Features::MISSING_SHMEM));
        let anon = open(Backend::PrivateAnonymous, MemoryKind::PrivateAnonymous).unwrap().unwrap();
        let limited = open(Backend::Limited, MemoryKind::PrivateAnonymous).unwrap().unwrap();
        assert!(open(Backend::Limited, MemoryKind::Image).unwrap().is_none());
        assert!(!anon.supports(MemOp::Continue));
        assert_eq!((anon.name(), limited.name()), ("private-anonymous", "limited"));
        for op in [MemOp::Copy, MemOp::ZeroPage, MemOp::Wake, MemOp::Poison] {
            assert!(anon.supports(op), "{op:?}");
        }
        for op in [MemOp::Copy, MemOp::ZeroPage, MemOp::Wake] {
            assert!(limited.supports(op), "{op:?}");
        }
        assert!(!limited.supports(MemOp::Move) && !limited.supports(MemOp::Poison));
        // Huge pages: write protection where the kernel offers it on
        // hugetlb (offlines keep writes with it), no ZEROPAGE, no MOVE.
        // CONTINUE where a page cache holds the pages (shared memory, the
        // image).
        for kind in [MemoryKind::PrivateHugetlb, MemoryKind::SharedHugetlb, MemoryKind::HugetlbImage] {
            let huge = open(Backend::PrivateAnonymous, kind).unwrap().unwrap();
            assert_eq!(huge.supports(MemOp::Continue), kind != MemoryKind::PrivateHugetlb, "{kind:?}");
            assert_eq!(huge.uffd().features().contains(Features::MINOR_HUGETLBFS), kind != MemoryKind::PrivateHugetlb);
            let wp = huge.uffd().features().contains(Features::WP_SHMEM);
            assert_eq!(huge.supports(MemOp::WriteProtect), wp, "{kind:?}");
            assert!(!huge.supports(MemOp::ZeroPage) && !huge.supports(MemOp::Move), "{kind:?}");
            huge.no_write_protect();
            assert!(!huge.supports(MemOp::WriteProtect), "{kind:?}");
        }
        // The limited descriptor is negotiated like Firecracker's.
        for f in [Features::POISON, Features::MOVE, Features::THREAD_ID] {
            assert!(!limited.uffd().features().contains(f), "{f:?}");
        }

        let map = AnonMapping::new(2 * PAGE_SIZE).unwrap();
        let base = map.ptr() as u64;
        limited.uffd().register(base, (2 * PAGE_SIZE) as u64, RegisterMode::MISSING).unwrap();
        // SAFETY: `map` is registered above and nothing references it.
        let refused = unsafe { limited.poison(base, PAGE_SIZE) }.unwrap_err();
        assert_eq!((refused.op, refused.errno), ("UFFDIO_POISON", libc::EOPNOTSUPP));
        // SAFETY: as above.
        let refused = unsafe { limited.move_pages(base + PAGE_SIZE as u64, base, PAGE_SIZE, true) }.unwrap_err();
        assert_eq!((refused.op, refused.errno), ("UFFDIO_MOVE", libc::EOPNOTSUPP));
        // What it offers reaches the kernel.
        // SAFETY: as above.
        assert_eq!(unsafe { limited.zeropage(base, PAGE_SIZE, false) }, Ok(PAGE_SIZE));
        // SAFETY: as above.
        let again = unsafe { limited.zeropage(base, PAGE_SIZE, false) }.unwrap_err();
        assert_eq!(again.errno, libc::EEXIST);
        // SAFETY: the first page was installed above and is read through
        // the mapping, which is still alive.
        assert_eq!(unsafe { std::ptr::read_volatile(map.ptr() as *const u64) }, 0);
    }
}
