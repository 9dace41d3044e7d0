//! A thin wrapper over one userfaultfd file descriptor.
//!
//! Every kernel call the engine makes on userfaultfd lives here: the API
//! handshake, (un)registration, batched event reads and the resolving ioctls
//! (`COPY`, `ZEROPAGE`, `CONTINUE`, `MOVE`, `WAKE`, `POISON`, `WRITEPROTECT`). Errors keep
//! their errno, because the fault path branches on it (`EEXIST`, `EAGAIN`,
//! `ENOENT`, `ESRCH`), and the partial progress the kernel reports.
//!
//! The ioctls that change memory behind the compiler's back (`COPY`,
//! `ZEROPAGE`, `CONTINUE`, `MOVE`, `POISON`) are `unsafe fn`s, as in userfaultfd-rs: the
//! caller vouches that the range is memory it owns and that no Rust
//! reference to it is live. The engine's ranges are guest RAM and its
//! staging area, which are only ever accessed through raw pointers and
//! volatile accesses (see [`crate::ram`]).
//!
//! Structures come from `linux-raw-sys`; the `MOVE` and `POISON` ioctl numbers
//! are not in its table and are built here with the `_IOWR` encoding.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use linux_raw_sys::general as sys;
use linux_raw_sys::ioctl as nr;
use thiserror::Error;

/// The host page size the engine works in. userfaultfd on anonymous memory
/// resolves 4 KiB pages (transparent huge pages are disabled on registered
/// regions).
pub const PAGE_SIZE: usize = 4096;

/// The size of a huge page (`MAP_HUGETLB`, `MFD_HUGETLB`): huge-page
/// memory is resolved in whole pages of this size.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// `_IOWR(UFFDIO, nr, T)` as `<asm-generic/ioctl.h>` encodes it.
const fn iowr(num: u32, size: usize) -> u32 {
    const IOC_READ_WRITE: u32 = 3;
    (IOC_READ_WRITE << 30) | ((size as u32) << 16) | (sys::UFFDIO << 8) | num
}

const UFFDIO_MOVE: u32 = iowr(sys::_UFFDIO_MOVE, std::mem::size_of::<sys::uffdio_move>());
const UFFDIO_POISON: u32 = iowr(sys::_UFFDIO_POISON, std::mem::size_of::<sys::uffdio_poison>());
// `UFFDIO_CONTINUE_MODE_DONTWAKE` from <linux/userfaultfd.h> (not in
// linux-raw-sys).
const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
// `UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES` from <linux/userfaultfd.h>.
const UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: u64 = 1 << 1;

/// Errors from the userfaultfd wrapper.
#[derive(Debug, Error)]
pub enum UffdError {
    /// The `userfaultfd(2)` syscall failed.
    #[error("cannot create a userfaultfd (is /dev/userfaultfd or vm.unprivileged_userfaultfd available?)")]
    Create(#[source] io::Error),
    /// The `UFFDIO_API` handshake failed.
    #[error("UFFDIO_API handshake failed")]
    Api(#[source] io::Error),
    /// The kernel does not offer features the caller requires.
    #[error("the kernel's userfaultfd lacks required features: {missing}")]
    MissingFeatures {
        /// The features that are required but not offered.
        missing: Features,
    },
    /// Registering a range failed.
    #[error("UFFDIO_REGISTER of {len:#x} bytes at {start:#x} failed")]
    Register {
        /// Host address of the range.
        start: u64,
        /// Length of the range in bytes.
        len: u64,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The registered range lacks an ioctl the engine needs.
    #[error("the registered range at {start:#x} does not support {ioctl}")]
    RegisterIoctls {
        /// Host address of the range.
        start: u64,
        /// The missing ioctl.
        ioctl: &'static str,
    },
    /// Unregistering a range failed.
    #[error("UFFDIO_UNREGISTER of {len:#x} bytes at {start:#x} failed")]
    Unregister {
        /// Host address of the range.
        start: u64,
        /// Length of the range in bytes.
        len: u64,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// Reading events failed.
    #[error("reading userfaultfd events failed")]
    Read(#[source] io::Error),
    /// A descriptor handed over to be adopted is not a userfaultfd that
    /// went through `UFFDIO_API` (see [`Uffd::adopt`]).
    #[error("descriptor {fd} is not an initialized userfaultfd: {why}")]
    NotUserfaultfd {
        /// The descriptor number in this process.
        fd: RawFd,
        /// What was found instead.
        why: String,
    },
    /// Reading a received descriptor's `/proc/self/fdinfo` or flags failed.
    #[error("cannot inspect descriptor {fd}")]
    Inspect {
        /// The descriptor number in this process.
        fd: RawFd,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// A failed resolving ioctl: the errno, and how many bytes the kernel had
/// already handled before it stopped (COPY, ZEROPAGE, MOVE and POISON report
/// partial progress).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("{op} failed after {done} bytes: {}", io::Error::from_raw_os_error(*errno))]
pub struct IoctlError {
    /// The ioctl that failed.
    pub op: &'static str,
    /// The raw errno.
    pub errno: i32,
    /// Bytes handled before the failure.
    pub done: usize,
}

impl IoctlError {
    /// The errno as an [`io::Error`].
    pub fn io_error(&self) -> io::Error {
        io::Error::from_raw_os_error(self.errno)
    }
}

/// The userfaultfd calls the engine makes, as failpoints name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `UFFDIO_COPY`.
    Copy,
    /// `UFFDIO_ZEROPAGE`.
    ZeroPage,
    /// `UFFDIO_MOVE`.
    Move,
    /// `UFFDIO_POISON`.
    Poison,
    /// `UFFDIO_WAKE`.
    Wake,
    /// `UFFDIO_CONTINUE`.
    Continue,
    /// `MADV_DONTNEED` on the offline staging area (registered memory: it
    /// raises a remove event).
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    Discard,
    /// `UFFDIO_WRITEPROTECT`, setting or clearing write protection.
    WriteProtect,
    /// Dropping guest pages an offline took a copy of, on memory without
    /// `UFFDIO_MOVE`: a punched hole (`fallocate`) in shared memory,
    /// `MADV_DONTNEED` on an image mapped private.
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    Punch,
}

impl Op {
    /// The ioctl's name.
    pub fn name(self) -> &'static str {
        match self {
            Op::Copy => "UFFDIO_COPY",
            Op::ZeroPage => "UFFDIO_ZEROPAGE",
            Op::Move => "UFFDIO_MOVE",
            Op::Poison => "UFFDIO_POISON",
            Op::Wake => "UFFDIO_WAKE",
            Op::Continue => "UFFDIO_CONTINUE",
            Op::Discard => "MADV_DONTNEED",
            Op::WriteProtect => "UFFDIO_WRITEPROTECT",
            Op::Punch => "FALLOC_FL_PUNCH_HOLE",
        }
    }
}

/// A set of `UFFD_FEATURE_*` flags.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Features(u64);

impl Features {
    /// `UFFD_FEATURE_EVENT_REMOVE`: `MADV_DONTNEED`/`MADV_REMOVE` on a
    /// registered range is reported (balloon-style removal).
    pub const EVENT_REMOVE: Features = Features(sys::UFFD_FEATURE_EVENT_REMOVE as u64);
    /// `UFFD_FEATURE_THREAD_ID`: fault messages carry the faulting thread id.
    pub const THREAD_ID: Features = Features(sys::UFFD_FEATURE_THREAD_ID as u64);
    /// `UFFD_FEATURE_POISON`: `UFFDIO_POISON` is available.
    pub const POISON: Features = Features(sys::UFFD_FEATURE_POISON as u64);
    /// `UFFD_FEATURE_MOVE`: `UFFDIO_MOVE` is available.
    pub const MOVE: Features = Features(sys::UFFD_FEATURE_MOVE as u64);
    /// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect faults.
    pub const PAGEFAULT_FLAG_WP: Features = Features(sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP as u64);
    /// `UFFD_FEATURE_MISSING_SHMEM`: missing faults on shared memory.
    pub const MISSING_SHMEM: Features = Features(sys::UFFD_FEATURE_MISSING_SHMEM as u64);
    /// `UFFD_FEATURE_MISSING_HUGETLBFS`: missing faults on huge pages.
    pub const MISSING_HUGETLBFS: Features = Features(sys::UFFD_FEATURE_MISSING_HUGETLBFS as u64);
    /// `UFFD_FEATURE_MINOR_HUGETLBFS`: minor faults on huge pages.
    pub const MINOR_HUGETLBFS: Features = Features(sys::UFFD_FEATURE_MINOR_HUGETLBFS as u64);
    /// `UFFD_FEATURE_MINOR_SHMEM`: minor faults on shared memory.
    pub const MINOR_SHMEM: Features = Features(sys::UFFD_FEATURE_MINOR_SHMEM as u64);
    /// `UFFD_FEATURE_EXACT_ADDRESS`: fault addresses are not page-masked.
    pub const EXACT_ADDRESS: Features = Features(sys::UFFD_FEATURE_EXACT_ADDRESS as u64);
    /// `UFFD_FEATURE_WP_UNPOPULATED`: write-protect unpopulated ptes.
    pub const WP_UNPOPULATED: Features = Features(sys::UFFD_FEATURE_WP_UNPOPULATED as u64);
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write protection on shared memory
    /// and hugetlbfs (registering those in [`RegisterMode::WP`] needs it).
    pub const WP_SHMEM: Features = Features(sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM as u64);

    const NAMES: [(Features, &'static str); 12] = [
        (Self::EVENT_REMOVE, "EVENT_REMOVE"),
        (Self::THREAD_ID, "THREAD_ID"),
        (Self::POISON, "POISON"),
        (Self::MOVE, "MOVE"),
        (Self::PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
        (Self::MISSING_SHMEM, "MISSING_SHMEM"),
        (Self::MINOR_SHMEM, "MINOR_SHMEM"),
        (Self::MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
        (Self::MINOR_HUGETLBFS, "MINOR_HUGETLBFS"),
        (Self::EXACT_ADDRESS, "EXACT_ADDRESS"),
        (Self::WP_UNPOPULATED, "WP_UNPOPULATED"),
        (Self::WP_SHMEM, "WP_HUGETLBFS_SHMEM"),
    ];

    /// No features.
    pub const fn empty() -> Self {
        Features(0)
    }

    /// The raw bit set.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Builds a set from raw bits.
    pub const fn from_bits(bits: u64) -> Self {
        Features(bits)
    }

    /// True if every feature in `other` is in `self`.
    pub const fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }

    /// The features in `self` that are not in `other`.
    pub const fn difference(self, other: Features) -> Features {
        Features(self.0 & !other.0)
    }
}

impl std::ops::BitOr for Features {
    type Output = Features;
    fn bitor(self, rhs: Features) -> Features {
        Features(self.0 | rhs.0)
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        let mut first = true;
        for (feature, name) in Self::NAMES {
            if rest & feature.0 != 0 {
                write!(f, "{}{name}", if first { "" } else { "|" })?;
                first = false;
                rest &= !feature.0;
            }
        }
        if rest != 0 || first {
            write!(f, "{}{rest:#x}", if first { "" } else { "|" })?;
        }
        Ok(())
    }
}

impl fmt::Debug for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Features({self})")
    }
}

/// Registration modes (`UFFDIO_REGISTER_MODE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterMode(u64);

impl RegisterMode {
    /// Faults on missing pages.
    pub const MISSING: RegisterMode = RegisterMode(sys::UFFDIO_REGISTER_MODE_MISSING as u64);
    /// Write-protect faults.
    // The engine does not write-protect (yet): kept, with its test, as
    // the complete wrapper the next memory kinds build on.
    #[allow(dead_code)]
    pub const WP: RegisterMode = RegisterMode(sys::UFFDIO_REGISTER_MODE_WP as u64);
    /// Minor faults (page cache present, page table entry missing): how
    /// an image mapped private is served (`UFFDIO_CONTINUE`).
    pub const MINOR: RegisterMode = RegisterMode(sys::UFFDIO_REGISTER_MODE_MINOR as u64);
}

impl std::ops::BitOr for RegisterMode {
    type Output = RegisterMode;
    fn bitor(self, rhs: RegisterMode) -> RegisterMode {
        RegisterMode(self.0 | rhs.0)
    }
}

/// One event read from the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted on a registered page.
    Fault {
        /// Faulting host address (page-aligned unless `EXACT_ADDRESS`).
        addr: u64,
        /// It was a write access.
        write: bool,
        /// It was a write-protect fault.
        wp: bool,
        /// It was a minor fault.
        minor: bool,
        /// The faulting thread id (0 without `THREAD_ID`).
        tid: u32,
    },
    /// `MADV_DONTNEED`/`MADV_REMOVE` removed `[start, end)`. The thread that
    /// called madvise waits until this event is read, then zaps the range.
    Remove {
        /// First host address of the range.
        start: u64,
        /// One past the last host address.
        end: u64,
    },
    /// The range was unmapped (`EVENT_UNMAP`).
    Unmap {
        /// First host address of the range.
        start: u64,
        /// One past the last host address.
        end: u64,
    },
    /// The range moved (`EVENT_REMAP`).
    Remap {
        /// Old host address.
        from: u64,
        /// New host address.
        to: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The process forked with `EVENT_FORK`; carries the child's uffd.
    Fork {
        /// The child's userfaultfd descriptor number.
        fd: u32,
    },
    /// A message this wrapper cannot decode (an event code it does not
    /// know). It is passed on, not dropped with its batch, so the other
    /// messages read with it are still handled.
    Unknown {
        /// The raw event code.
        event: u8,
    },
}

/// Capacity of one batched read, in messages.
pub const EVENT_BATCH: usize = 64;

/// A buffer for batched event reads, reused across reads so the event loop
/// does not allocate.
pub struct EventBuf {
    msgs: [sys::uffd_msg; EVENT_BATCH],
}

impl fmt::Debug for EventBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBuf").finish_non_exhaustive()
    }
}

impl Default for EventBuf {
    fn default() -> Self {
        // SAFETY: uffd_msg is a plain C struct of integers and unions of
        // integers; all-zero is a valid value.
        EventBuf { msgs: unsafe { std::mem::zeroed() } }
    }
}

/// An open userfaultfd with its negotiated features.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: Features,
    /// The page size of the memory registered, in which a failpoint's
    /// partial progress is counted (a huge page is done whole or not).
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    page_size: std::sync::atomic::AtomicUsize,
    #[cfg(feature = "failpoints")]
    failpoints: std::sync::Arc<crate::failpoints::FailPoints>,
}

impl Uffd {
    /// The features this kernel offers, probed with a throwaway descriptor
    /// (the API handshake can be done only once per descriptor).
    pub fn supported_features() -> Result<Features, UffdError> {
        let fd = Self::create_fd()?;
        Self::api(&fd, Features::empty())
    }

    /// Opens a userfaultfd and negotiates `required | optional` features.
    /// Fails with [`UffdError::MissingFeatures`] naming every required
    /// feature the kernel lacks; optional ones are enabled where offered.
    ///
    /// The descriptor is non-blocking and close-on-exec, and it receives
    /// kernel-mode faults too (no `UFFD_USER_MODE_ONLY`): KVM touches guest
    /// memory from kernel mode.
    pub fn new(required: Features, optional: Features) -> Result<Self, UffdError> {
        let supported = Self::supported_features()?;
        let missing = required.difference(supported);
        if missing != Features::empty() {
            return Err(UffdError::MissingFeatures { missing });
        }
        let wanted = Features(required.0 | (optional.0 & supported.0));
        let fd = Self::create_fd()?;
        // The kernel answers with every feature it has, but enables only
        // those requested.
        Self::api(&fd, wanted)?;
        Ok(Uffd {
            fd,
            features: wanted,
            page_size: std::sync::atomic::AtomicUsize::new(PAGE_SIZE),
            #[cfg(feature = "failpoints")]
            failpoints: Default::default(),
        })
    }

    /// Adopts a userfaultfd another process created, set up and sent over
    /// (`SCM_RIGHTS`), as Firecracker hands its descriptor to an external
    /// page-fault handler. Its `UFFDIO_API` handshake was done by that
    /// process, and a second one fails with `EINVAL`, so what it offers is
    /// read from `/proc/self/fdinfo/N` (its `API:` line) instead of
    /// negotiated. The same look tells a userfaultfd from any other
    /// descriptor (`/proc/self/fd/N` names `anon_inode:[userfaultfd]`).
    ///
    /// The descriptor is made non-blocking if it is not (the flag lives
    /// on the shared open file, so the sender's copy becomes non-blocking
    /// too; Firecracker's already is): a blocking userfaultfd cannot be
    /// polled.
    ///
    /// Its ranges live in the sender's address space: the ioctls reach
    /// them by the sender's addresses, and nothing of them is mapped here.
    pub fn adopt(fd: OwnedFd) -> Result<Self, UffdError> {
        let raw = fd.as_raw_fd();
        let inspect = |source: io::Error| UffdError::Inspect { fd: raw, source };
        let link = std::fs::read_link(format!("/proc/self/fd/{raw}")).map_err(inspect)?;
        if link.as_os_str() != "anon_inode:[userfaultfd]" {
            return Err(UffdError::NotUserfaultfd { fd: raw, why: format!("it is {}", link.display()) });
        }
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}")).map_err(inspect)?;
        let features = match parse_fdinfo_api(&info) {
            Ok(f) => f,
            Err(why) => return Err(UffdError::NotUserfaultfd { fd: raw, why: why.into() }),
        };
        let flags = rustix::fs::fcntl_getfl(&fd).map_err(|e| inspect(e.into()))?;
        if !flags.contains(rustix::fs::OFlags::NONBLOCK) {
            rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK).map_err(|e| inspect(e.into()))?;
        }
        Ok(Uffd {
            fd,
            features,
            page_size: std::sync::atomic::AtomicUsize::new(PAGE_SIZE),
            #[cfg(feature = "failpoints")]
            failpoints: Default::default(),
        })
    }

    /// Always non-blocking: a blocking userfaultfd cannot be polled (the
    /// kernel answers POLLERR), so nothing could wait on it with a deadline.
    fn create_fd() -> Result<OwnedFd, UffdError> {
        use rustix::mm::UserfaultfdFlags;
        let flags = UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK;
        // SAFETY: userfaultfd(2) has no memory-safety preconditions; rustix
        // marks it unsafe only because the new descriptor can change how
        // this process's memory behaves once ranges are registered, which
        // is exactly what the caller asks for.
        unsafe { rustix::mm::userfaultfd(flags) }.map_err(|e| UffdError::Create(e.into()))
    }

    fn api(fd: &OwnedFd, features: Features) -> Result<Features, UffdError> {
        let mut api = sys::uffdio_api { api: sys::UFFD_API as u64, features: features.0, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes one uffdio_api that lives on
        // this stack frame for the duration of the call.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), nr::UFFDIO_API as _, &mut api) };
        if ret < 0 {
            return Err(UffdError::Api(io::Error::last_os_error()));
        }
        Ok(Features(api.features))
    }

    /// The features negotiated for this descriptor.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The failpoints of this descriptor (feature `failpoints`).
    #[cfg(feature = "failpoints")]
    pub fn failpoints(&self) -> &std::sync::Arc<crate::failpoints::FailPoints> {
        &self.failpoints
    }

    /// Runs `real` unless an armed failpoint takes this call: then the
    /// failure it chose is returned, after `real` has done its partial
    /// progress (the first pages of the range, really) if it asked for any.
    #[allow(unused_variables)]
    fn with_failpoint(
        &self,
        op: Op,
        addrs: [u64; 2],
        len: usize,
        real: impl Fn(usize) -> Result<usize, IoctlError>,
    ) -> Result<usize, IoctlError> {
        #[cfg(feature = "failpoints")]
        if let Some(f) = self.failpoints.take(op, addrs, len) {
            if f.pause {
                self.failpoints.wait_at_gate();
                return real(len);
            }
            let page = self.page_size.load(std::sync::atomic::Ordering::Relaxed);
            let part = ((f.partial_pages + f.uncounted_pages) * page).min(len);
            let done = if part > 0 { real(part)? } else { 0 };
            let done = done.min(f.partial_pages * page);
            return Err(IoctlError { op: op.name(), errno: f.errno, done });
        }
        real(len)
    }

    /// Says that the memory registered has pages of `size` bytes (huge
    /// pages): failpoints count their partial progress in them.
    pub(crate) fn set_page_size(&self, size: usize) {
        self.page_size.store(size, std::sync::atomic::Ordering::Relaxed);
    }

    /// Registers `[start, start + len)` (host addresses, page-aligned) in
    /// `mode`. Returns the ioctl bit mask the range supports.
    pub fn register(&self, start: u64, len: u64, mode: RegisterMode) -> Result<u64, UffdError> {
        let mut reg = sys::uffdio_register { range: sys::uffdio_range { start, len }, mode: mode.0, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register on
        // this stack frame. Registering changes how faults on the range are
        // handled, not which memory is valid.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), nr::UFFDIO_REGISTER as _, &mut reg) };
        if ret < 0 {
            return Err(UffdError::Register { start, len, source: io::Error::last_os_error() });
        }
        for (bit, ioctl) in [(sys::_UFFDIO_COPY, "UFFDIO_COPY"), (sys::_UFFDIO_WAKE, "UFFDIO_WAKE")] {
            if reg.ioctls & (1 << bit) == 0 {
                return Err(UffdError::RegisterIoctls { start, ioctl });
            }
        }
        Ok(reg.ioctls)
    }

    /// Unregisters `[start, start + len)`.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = sys::uffdio_range { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads one uffdio_range on this stack frame.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), nr::UFFDIO_UNREGISTER as _, &mut range) };
        if ret < 0 {
            return Err(UffdError::Unregister { start, len, source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Reads up to [`EVENT_BATCH`] pending events into `out` (cleared first)
    /// without blocking. Returns the number read; 0 when none is pending.
    pub fn read_events(&self, buf: &mut EventBuf, out: &mut Vec<Event>) -> Result<usize, UffdError> {
        out.clear();
        let bytes = loop {
            // SAFETY: the destination is `buf.msgs`, writable for exactly
            // size_of_val(&buf.msgs) bytes, and the kernel writes whole
            // uffd_msg records into it.
            let ret = unsafe {
                libc::read(self.fd.as_raw_fd(), buf.msgs.as_mut_ptr().cast(), std::mem::size_of_val(&buf.msgs))
            };
            if ret >= 0 {
                break ret as usize;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(0),
                _ => return Err(UffdError::Read(err)),
            }
        };
        let count = bytes / std::mem::size_of::<sys::uffd_msg>();
        out.extend(buf.msgs[..count].iter().map(decode));
        Ok(count)
    }

    /// Whether an event is waiting to be read (a `poll` with no timeout).
    pub fn readable(&self) -> bool {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll reads and writes one pollfd on this stack frame.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & libc::POLLIN != 0
    }

    fn ioctl_progress<T>(
        &self,
        op: &'static str,
        req: u32,
        arg: &mut T,
        progress: impl Fn(&T) -> i64,
    ) -> Result<usize, IoctlError> {
        // SAFETY: every request routed here takes a pointer to a struct of
        // type T (uffdio_copy, uffdio_zeropage, uffdio_move, uffdio_poison,
        // uffdio_continue)
        // that the kernel reads and writes back into for the duration of the
        // call; `arg` is such a struct, exclusively borrowed. The memory it
        // names is only accessed by the kernel, which validates it against
        // the registered ranges.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg as *mut T) };
        let done = progress(arg);
        if ret == 0 {
            return Ok(done.max(0) as usize);
        }
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
        // The kernel reports either bytes done (>= 0) or a negative errno in
        // the progress field; a negative value means nothing was done.
        Err(IoctlError { op, errno, done: done.max(0) as usize })
    }

    /// `UFFDIO_COPY`: atomically installs `len` bytes from `src` at `dst`
    /// and wakes threads waiting in the range (unless `dont_wake`).
    /// On failure, `done` bytes were installed from the start of the range.
    ///
    /// # Safety
    ///
    /// `[dst, dst + len)` must be memory the caller owns, and no Rust
    /// reference to any of it may be live: the kernel writes it behind the
    /// compiler's back. `src` must be valid for reads of `len` bytes.
    pub unsafe fn copy(&self, dst: u64, src: *const u8, len: usize, dont_wake: bool) -> Result<usize, IoctlError> {
        self.with_failpoint(Op::Copy, [dst, dst], len, |len| {
            let mut arg = sys::uffdio_copy {
                dst,
                src: src as u64,
                len: len as u64,
                mode: if dont_wake { sys::UFFDIO_COPY_MODE_DONTWAKE as u64 } else { 0 },
                copy: 0,
            };
            self.ioctl_progress(Op::Copy.name(), nr::UFFDIO_COPY, &mut arg, |a| a.copy)
        })
    }

    /// `UFFDIO_ZEROPAGE`: maps the shared zero page over the range (read
    /// faults only: a later write takes another, kernel-handled fault).
    ///
    /// # Safety
    ///
    /// `[start, start + len)` must be memory the caller owns, and no Rust
    /// reference to any of it may be live: the kernel maps new contents
    /// under it behind the compiler's back.
    pub unsafe fn zeropage(&self, start: u64, len: usize, dont_wake: bool) -> Result<usize, IoctlError> {
        self.with_failpoint(Op::ZeroPage, [start, start], len, |len| {
            let mut arg = sys::uffdio_zeropage {
                range: sys::uffdio_range { start, len: len as u64 },
                mode: if dont_wake { sys::UFFDIO_ZEROPAGE_MODE_DONTWAKE as u64 } else { 0 },
                zeropage: 0,
            };
            self.ioctl_progress(Op::ZeroPage.name(), nr::UFFDIO_ZEROPAGE, &mut arg, |a| a.zeropage)
        })
    }

    /// `UFFDIO_MOVE`: moves the pages of `[src, src + len)` to `dst`, which
    /// must be missing. Both ranges must be registered with this descriptor.
    /// With `allow_src_holes`, missing source pages are skipped.
    ///
    /// # Safety
    ///
    /// Both ranges must be memory the caller owns, and no Rust reference to
    /// any of it may be live: the kernel takes the pages out from under
    /// `src` (an access there faults afterwards) and maps them at `dst`.
    pub unsafe fn move_pages(&self, dst: u64, src: u64, len: usize, allow_src_holes: bool) -> Result<usize, IoctlError> {
        self.with_failpoint(Op::Move, [dst, src], len, |len| {
            let mut arg = sys::uffdio_move {
                dst,
                src,
                len: len as u64,
                mode: if allow_src_holes { UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES } else { 0 },
                move_: 0,
            };
            self.ioctl_progress(Op::Move.name(), UFFDIO_MOVE, &mut arg, |a| a.move_)
        })
    }

    /// `UFFDIO_POISON`: installs poison markers over missing pages of the
    /// range; an access then gets SIGBUS instead of a fault event. Wakes
    /// waiting threads, which then see the SIGBUS. A later `COPY` or
    /// `ZEROPAGE` replaces a marker (the kernel treats it as an empty
    /// entry), and `MADV_DONTNEED` clears it.
    ///
    /// # Safety
    ///
    /// `[start, start + len)` must be memory the caller owns, and no Rust
    /// reference to any of it may be live: an access through one would get
    /// SIGBUS where the compiler assumes the memory readable.
    pub unsafe fn poison(&self, start: u64, len: usize) -> Result<usize, IoctlError> {
        self.with_failpoint(Op::Poison, [start, start], len, |len| {
            let mut arg =
                sys::uffdio_poison { range: sys::uffdio_range { start, len: len as u64 }, mode: 0, updated: 0 };
            self.ioctl_progress(Op::Poison.name(), UFFDIO_POISON, &mut arg, |a| a.updated)
        })
    }

    /// `UFFDIO_CONTINUE`: maps the page-cache pages already at
    /// `[start, start + len)` of a range registered in
    /// [`RegisterMode::MINOR`] (no copy; on a private mapping read-only, so
    /// a later write takes the kernel's copy-on-write fault). `EFAULT`
    /// with nothing done: the page cache has no page there (a hole).
    ///
    /// # Safety
    ///
    /// `[start, start + len)` must be memory the caller owns, and no Rust
    /// reference to any of it may be live: the kernel maps pages under it
    /// behind the compiler's back.
    pub unsafe fn continue_pages(&self, start: u64, len: usize, dont_wake: bool) -> Result<usize, IoctlError> {
        self.with_failpoint(Op::Continue, [start, start], len, |len| {
            let mut arg = sys::uffdio_continue {
                range: sys::uffdio_range { start, len: len as u64 },
                mode: if dont_wake { UFFDIO_CONTINUE_MODE_DONTWAKE } else { 0 },
                mapped: 0,
            };
            self.ioctl_progress(Op::Continue.name(), nr::UFFDIO_CONTINUE, &mut arg, |a| a.mapped)
        })
    }

    /// `UFFDIO_WAKE`: wakes threads waiting on faults in the range; they
    /// retry the access (and fault again if the page is still missing).
    pub fn wake(&self, start: u64, len: usize) -> Result<(), IoctlError> {
        self.with_failpoint(Op::Wake, [start, start], len, |len| {
            let mut range = sys::uffdio_range { start, len: len as u64 };
            // SAFETY: UFFDIO_WAKE reads one uffdio_range on this stack frame.
            let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), nr::UFFDIO_WAKE as _, &mut range) };
            if ret < 0 {
                let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
                return Err(IoctlError { op: Op::Wake.name(), errno, done: 0 });
            }
            Ok(len)
        })
        .map(|_| ())
    }

    /// `UFFDIO_WRITEPROTECT`: sets (`protect`) or clears write protection on
    /// a range registered in [`RegisterMode::WP`]. On shared memory the
    /// kernel also marks entries with no page mapped (the page cache may
    /// hold one), so every write to the range faults. Clearing wakes the
    /// threads waiting on the range's write-protect faults unless
    /// `dont_wake`. All or nothing as far as the caller can tell (no
    /// progress is reported): after a failure, clear again.
    pub fn writeprotect(&self, start: u64, len: usize, protect: bool, dont_wake: bool) -> Result<(), IoctlError> {
        // UFFDIO_WRITEPROTECT_MODE_WP and _DONTWAKE from <linux/userfaultfd.h>.
        const WP: u64 = 1 << 0;
        const DONTWAKE: u64 = 1 << 1;
        self.with_failpoint(Op::WriteProtect, [start, start], len, |len| {
            let mut arg = sys::uffdio_writeprotect {
                range: sys::uffdio_range { start, len: len as u64 },
                mode: if protect { WP } else { 0 } | if dont_wake { DONTWAKE } else { 0 },
            };
            // SAFETY: UFFDIO_WRITEPROTECT reads one uffdio_writeprotect on
            // this stack frame; it changes whether writes fault, not which
            // memory is valid.
            let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), nr::UFFDIO_WRITEPROTECT as _, &mut arg) };
            if ret < 0 {
                let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
                return Err(IoctlError { op: Op::WriteProtect.name(), errno, done: 0 });
            }
            Ok(len)
        })
        .map(|_| ())
    }
}

fn decode(msg: &sys::uffd_msg) -> Event {
    // SAFETY (for each union read below): the kernel fills the union member
    // that matches `msg.event`, and every member is plain integers, so any
    // bit pattern is a valid value of the member read.
    match msg.event as u32 {
        sys::UFFD_EVENT_PAGEFAULT => {
            // SAFETY: see above; PAGEFAULT carries `pagefault`.
            let pf = unsafe { msg.arg.pagefault };
            let flags = pf.flags as u32;
            // SAFETY: see above; `feat.ptid` is a u32 in every variant.
            let tid = unsafe { pf.feat.ptid };
            Event::Fault {
                addr: pf.address,
                write: flags & sys::UFFD_PAGEFAULT_FLAG_WRITE != 0,
                wp: flags & sys::UFFD_PAGEFAULT_FLAG_WP != 0,
                minor: flags & sys::UFFD_PAGEFAULT_FLAG_MINOR != 0,
                tid,
            }
        }
        sys::UFFD_EVENT_REMOVE => {
            // SAFETY: see above; REMOVE carries `remove`.
            let r = unsafe { msg.arg.remove };
            Event::Remove { start: r.start, end: r.end }
        }
        sys::UFFD_EVENT_UNMAP => {
            // SAFETY: see above; UNMAP carries `remove`.
            let r = unsafe { msg.arg.remove };
            Event::Unmap { start: r.start, end: r.end }
        }
        sys::UFFD_EVENT_REMAP => {
            // SAFETY: see above; REMAP carries `remap`.
            let r = unsafe { msg.arg.remap };
            Event::Remap { from: r.from, to: r.to, len: r.len }
        }
        sys::UFFD_EVENT_FORK => {
            // SAFETY: see above; FORK carries `fork`.
            let f = unsafe { msg.arg.fork };
            Event::Fork { fd: f.ufd }
        }
        other => Event::Unknown { event: other as u8 },
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The kernel's internal "handshake done" bit in the features of a
/// userfaultfd's fdinfo (`UFFD_FEATURE_INITIALIZED`, `1 << 31`); never a
/// feature a process can ask for.
const FDINFO_INITIALIZED: u64 = 1 << 31;

/// The features of an initialized userfaultfd from the text of its
/// `/proc/<pid>/fdinfo/N`: the `API:\t<api>:<features>:<ioctls>` line, in
/// hex. An error says why the text is not that of a userfaultfd whose
/// handshake is done.
pub(crate) fn parse_fdinfo_api(info: &str) -> Result<Features, &'static str> {
    let line = info.lines().find_map(|l| l.strip_prefix("API:")).ok_or("its fdinfo has no API line")?;
    let mut fields = line.trim().split(':');
    let mut hex = || fields.next().and_then(|f| u64::from_str_radix(f, 16).ok());
    let (api, features, _ioctls) = (hex(), hex(), hex());
    let (Some(api), Some(features)) = (api, features) else {
        return Err("its fdinfo API line is malformed");
    };
    if api != sys::UFFD_API as u64 {
        return Err("its fdinfo names an unknown userfaultfd API");
    }
    if features & FDINFO_INITIALIZED == 0 {
        return Err("its UFFDIO_API handshake has not been done");
    }
    Ok(Features(features & !FDINFO_INITIALIZED))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_encoding() {
        // The numbers linux-raw-sys does carry pin down the encoding.
        assert_eq!(iowr(sys::_UFFDIO_COPY, std::mem::size_of::<sys::uffdio_copy>()), nr::UFFDIO_COPY);
        assert_eq!(iowr(sys::_UFFDIO_CONTINUE, std::mem::size_of::<sys::uffdio_continue>()), nr::UFFDIO_CONTINUE);
        // <linux/userfaultfd.h>: UFFDIO_MOVE 0xc028aa05, UFFDIO_POISON 0xc020aa08.
        assert_eq!(UFFDIO_MOVE, 0xc028_aa05);
        assert_eq!(UFFDIO_POISON, 0xc020_aa08);
    }

    #[test]
    fn an_unknown_message_is_decoded_on_its_own() {
        // SAFETY: uffd_msg is plain integers; all-zero is valid.
        let mut msg: sys::uffd_msg = unsafe { std::mem::zeroed() };
        msg.event = 0x7f;
        assert_eq!(decode(&msg), Event::Unknown { event: 0x7f });
        msg.event = sys::UFFD_EVENT_REMOVE as u8;
        msg.arg.remove = sys::uffd_msg__bindgen_ty_1__bindgen_ty_4 { start: 0x1000, end: 0x3000 };
        assert_eq!(decode(&msg), Event::Remove { start: 0x1000, end: 0x3000 });
    }

    #[test]
    fn features_display_names_each_flag() {
        let f = Features::EVENT_REMOVE | Features::POISON | Features::from_bits(1 << 40);
        assert_eq!(f.to_string(), "EVENT_REMOVE|POISON|0x10000000000");
        assert_eq!(Features::empty().to_string(), "0x0");
    }

    #[test]
    fn fdinfo_api_line_gives_the_features_of_an_initialized_descriptor() {
        let info = "pos:\t0\nflags:\t02004000\npending:\t0\ntotal:\t0\nAPI:\taa:80000008:80000000000001ff\n";
        assert_eq!(parse_fdinfo_api(info), Ok(Features::EVENT_REMOVE));
        // Before UFFDIO_API the kernel shows no features and no "done" bit.
        assert!(parse_fdinfo_api("API:\taa:0:80000000000001ff\n").unwrap_err().contains("handshake"));
        assert!(parse_fdinfo_api("eventfd-count: 0\n").unwrap_err().contains("no API line"));
        assert!(parse_fdinfo_api("API:\tzz:1\n").unwrap_err().contains("malformed"));
        assert!(parse_fdinfo_api("API:\tab:80000008:0\n").unwrap_err().contains("unknown"));
    }

    /// What a handler receives from Firecracker: a descriptor whose
    /// handshake asked for `EVENT_REMOVE` alone. Adopting it reads exactly
    /// that, and a second handshake is refused by the kernel.
    #[test]
    fn adopt_reads_what_the_sender_negotiated_and_refuses_other_descriptors() {
        let sender = Uffd::new(Features::EVENT_REMOVE, Features::empty()).unwrap();
        let copy = sender.fd.try_clone().unwrap();
        let adopted = Uffd::adopt(copy).unwrap();
        assert_eq!(adopted.features(), Features::EVENT_REMOVE);
        let again = Uffd::api(&adopted.fd, Features::EVENT_REMOVE).unwrap_err();
        assert!(matches!(again, UffdError::Api(ref e) if e.raw_os_error() == Some(libc::EINVAL)), "{again:?}");

        let fresh = Uffd::create_fd().unwrap();
        assert!(matches!(Uffd::adopt(fresh), Err(UffdError::NotUserfaultfd { .. })));
        let event = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        // SAFETY: the eventfd's descriptor is valid for as long as `event`,
        // which outlives the borrow; it is duplicated into a new one.
        let borrowed = unsafe { BorrowedFd::borrow_raw(event.as_raw_fd()) };
        let dup = borrowed.try_clone_to_owned().unwrap();
        match Uffd::adopt(dup) {
            Err(UffdError::NotUserfaultfd { why, .. }) => assert!(why.contains("eventfd"), "{why}"),
            other => panic!("an eventfd was adopted: {other:?}"),
        }
    }

    #[test]
    fn handshake_negotiates_required_features() {
        let uffd = Uffd::new(Features::EVENT_REMOVE | Features::THREAD_ID, Features::POISON).unwrap();
        assert!(uffd.features().contains(Features::EVENT_REMOVE | Features::THREAD_ID));
    }

    #[test]
    fn features_are_what_was_enabled_not_what_is_offered() {
        let uffd = Uffd::new(Features::THREAD_ID, Features::empty()).unwrap();
        assert_eq!(uffd.features(), Features::THREAD_ID);
        assert!(Uffd::supported_features().unwrap().contains(Features::EVENT_REMOVE | Features::THREAD_ID));
    }

    /// Fresh private anonymous pages (leaked: tests are short-lived).
    fn anon(pages: usize) -> u64 {
        // SAFETY: a fresh anonymous mapping aliasing nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as u64
    }

    fn peek(addr: u64) -> u8 {
        // SAFETY: only called on pages the test made present.
        unsafe { std::ptr::read_volatile(addr as *const u8) }
    }

    // The test thread never touches a missing registered page (nobody
    // would resolve it): every check goes through ioctl results or pages
    // it installed itself.
    #[test]
    fn resolving_ioctls_keep_errno_and_progress() {
        let uffd = Uffd::new(Features::empty(), Features::MOVE | Features::POISON).unwrap();
        let (a, b) = (anon(4), anon(4));
        let page = PAGE_SIZE as u64;
        uffd.register(a, 4 * page, RegisterMode::MISSING).unwrap();
        uffd.register(b, 4 * page, RegisterMode::MISSING).unwrap();
        let src = vec![0xaa_u8; 2 * PAGE_SIZE];

        // SAFETY: the test's own anonymous mappings, reached only through raw pointers; `src` is long enough.
        assert_eq!(unsafe { uffd.copy(a, src.as_ptr(), PAGE_SIZE, false) }, Ok(PAGE_SIZE));
        assert_eq!(peek(a), 0xaa);
        // Present first page: EEXIST with nothing done.
        // SAFETY: the test's own anonymous mappings, reached only through raw pointers; `src` is long enough.
        let e = unsafe { uffd.copy(a, src.as_ptr(), 2 * PAGE_SIZE, false) }.unwrap_err();
        assert_eq!((e.errno, e.done), (libc::EEXIST, 0));
        // Present page part-way: the bytes before it are reported.
        // SAFETY: the test's own anonymous mappings, reached only through raw pointers; `src` is long enough.
        assert_eq!(unsafe { uffd.copy(a + 2 * page, src.as_ptr(), PAGE_SIZE, false) }, Ok(PAGE_SIZE));
        // SAFETY: the test's own anonymous mappings, reached only through raw pointers; `src` is long enough.
        let e = unsafe { uffd.copy(a + page, src.as_ptr(), 2 * PAGE_SIZE, false) }.unwrap_err();
        assert_eq!(e.done, PAGE_SIZE, "{e}");
        assert_eq!(peek(a + page), 0xaa);
        // Zero page, then the shared zero page is present too.
        // SAFETY: the test's own anonymous mappings, reached only through raw pointers.
        assert_eq!(unsafe { uffd.zeropage(a + 3 * page, PAGE_SIZE, false) }, Ok(PAGE_SIZE));
        assert_eq!(peek(a + 3 * page), 0);
        // SAFETY: the test's own anonymous mappings, reached only through raw pointers.
        assert_eq!(unsafe { uffd.zeropage(a + 3 * page, PAGE_SIZE, false) }.unwrap_err().errno, libc::EEXIST);
        uffd.wake(a, 4 * PAGE_SIZE).unwrap();

        if uffd.features().contains(Features::MOVE) {
            // SAFETY: the test's own anonymous mappings, reached only through raw pointers.
            assert_eq!(unsafe { uffd.move_pages(b, a, PAGE_SIZE, false) }, Ok(PAGE_SIZE));
            assert_eq!(peek(b), 0xaa);
            // The source is missing again: a COPY there succeeds.
            // SAFETY: the test's own anonymous mappings, reached only through raw pointers; `src` is long enough.
            assert_eq!(unsafe { uffd.copy(a, src.as_ptr(), PAGE_SIZE, false) }, Ok(PAGE_SIZE));
            // Moving from a hole fails without ALLOW_SRC_HOLES...
            // SAFETY: the test's own anonymous mappings, reached only through raw pointers.
            let e = unsafe { uffd.move_pages(b + 2 * page, b + page, PAGE_SIZE, false) }.unwrap_err();
            assert_eq!((e.errno, e.done), (libc::ENOENT, 0));
            // ... and skips it with.
            // SAFETY: the test's own anonymous mappings, reached only through raw pointers.
            assert_eq!(unsafe { uffd.move_pages(b + 2 * page, b + page, PAGE_SIZE, true) }, Ok(PAGE_SIZE));
        }
        if uffd.features().contains(Features::POISON) {
            // SAFETY: the test's own anonymous mappings, reached only through raw pointers.
            assert_eq!(unsafe { uffd.poison(b + 3 * page, PAGE_SIZE) }, Ok(PAGE_SIZE));
            // SAFETY: the test's own anonymous mappings, reached only through raw pointers.
            assert_eq!(unsafe { uffd.poison(b + 3 * page, PAGE_SIZE) }.unwrap_err().errno, libc::EEXIST);
            // A COPY replaces the marker: poison can be undone.
            // SAFETY: the test's own anonymous mappings, reached only through raw pointers; `src` is long enough.
            assert_eq!(unsafe { uffd.copy(b + 3 * page, src.as_ptr(), PAGE_SIZE, false) }, Ok(PAGE_SIZE));
            assert_eq!(peek(b + 3 * page), 0xaa);
        }
        // Outside any registered range.
        let outside = anon(1);
        // SAFETY: the test's own anonymous mappings, reached only through raw pointers; `src` is long enough.
        assert_eq!(unsafe { uffd.copy(outside, src.as_ptr(), PAGE_SIZE, false) }.unwrap_err().errno, libc::ENOENT);
        uffd.unregister(a, 4 * page).unwrap();
        assert!(matches!(uffd.unregister(a + 1, page), Err(UffdError::Unregister { .. })));
    }

    #[test]
    fn writeprotect_round_trip() {
        let uffd = Uffd::new(Features::empty(), Features::empty()).unwrap();
        let a = anon(2);
        let page = PAGE_SIZE as u64;
        uffd.register(a, 2 * page, RegisterMode::MISSING | RegisterMode::WP).unwrap();
        let src = vec![1u8; PAGE_SIZE];
        // SAFETY: the test's own anonymous mappings, reached only through raw pointers; `src` is long enough.
        unsafe { uffd.copy(a, src.as_ptr(), PAGE_SIZE, false) }.unwrap();
        uffd.writeprotect(a, PAGE_SIZE, true, false).unwrap();
        assert_eq!(peek(a), 1, "reads are not blocked by write protection");
        uffd.writeprotect(a, PAGE_SIZE, false, false).unwrap();
        // SAFETY: the page is present and no longer write-protected.
        unsafe { std::ptr::write_volatile(a as *mut u8, 2) };
        assert_eq!(peek(a), 2);
        // Write-protecting a range registered without WP is refused.
        let b = anon(1);
        uffd.register(b, page, RegisterMode::MISSING).unwrap();
        assert!(uffd.writeprotect(b, PAGE_SIZE, true, false).is_err());
    }

    #[test]
    fn register_errors_name_the_range() {
        let uffd = Uffd::new(Features::empty(), Features::empty()).unwrap();
        let a = anon(1);
        match uffd.register(a + 1, PAGE_SIZE as u64, RegisterMode::MISSING) {
            Err(e @ UffdError::Register { .. }) => assert!(e.to_string().contains(&format!("{:#x}", a + 1))),
            other => panic!("unaligned register: {other:?}"),
        }
    }

    #[test]
    fn missing_required_feature_is_named() {
        // Bit 62 is not a feature any kernel offers.
        let bogus = Features::from_bits(1 << 62);
        let err = Uffd::new(Features::THREAD_ID | bogus, Features::empty()).unwrap_err();
        match err {
            UffdError::MissingFeatures { missing } => assert_eq!(missing, bogus),
            other => panic!("unexpected error {other}"),
        }
    }
}
