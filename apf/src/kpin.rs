//! Real long-term kernel pins, taken through an io_uring fixed buffer.
//!
//! Registering a memory range as an io_uring fixed buffer makes the kernel pin
//! every page of it with `FOLL_LONGTERM` until the buffer is unregistered or the
//! ring is closed: the pages cannot migrate, so a memory block holding one of
//! them cannot go offline. That is the reference apf exists to avoid; this
//! module produces it on purpose, for tests and demonstrations.
//!
//! ```no_run
//! use apf::FixedBuffer;
//!
//! let mut page = vec![0u8; 4096];
//! let mut pin = FixedBuffer::register(page.as_mut_ptr(), page.len())?;
//! // ... every page of `page` is pinned: it cannot migrate ...
//! pin.unregister()?;
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! Registration faults the pages in (like `get_user_pages` does for any
//! direct-I/O buffer): if the range is registered with userfaultfd, a handler
//! must be running, or `register` blocks until one resolves the faults. As
//! root the pinned memory is not charged against `RLIMIT_MEMLOCK`; otherwise it
//! is, and a large range fails with `ENOMEM`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use linux_raw_sys::io_uring::{io_uring_params, io_uring_register_op};

/// Submission queue entries of the ring. It never carries a request; the
/// kernel wants at least one.
const RING_ENTRIES: u32 = 1;

/// An io_uring instance with one registered fixed buffer over a memory range:
/// the kernel holds a long-term pin (`FOLL_LONGTERM`) on every page of it until
/// the buffer is unregistered or the value is dropped.
///
/// The range is kept as plain numbers and only the ring's descriptor is ever
/// used, so the value is `Send` and `Sync`: the kernel, not this process,
/// dereferences the range, and it checks every address itself.
#[derive(Debug)]
pub struct FixedBuffer {
    ring: OwnedFd,
    addr: u64,
    len: usize,
    registered: bool,
}

impl FixedBuffer {
    /// Sets up a small ring (`io_uring_setup`; the rings are never mapped)
    /// and registers `[addr, addr + len)` as fixed buffer 0
    /// (`IORING_REGISTER_BUFFERS`). The kernel faults the pages in and pins
    /// them.
    ///
    /// Fails with `EFAULT` if the range is empty or part of it is not mapped,
    /// and with the kernel's error for memory it will not pin long-term (on
    /// Linux 6.18, `EOVERFLOW` for a mapping of an ext4 file).
    pub fn register(addr: *mut u8, len: usize) -> io::Result<Self> {
        // SAFETY: io_uring_params is plain data; all-zero is the documented
        // "no flags" setup request.
        let mut params: io_uring_params = unsafe { std::mem::zeroed() };
        // SAFETY: io_uring_setup reads and writes only `params`, which is a
        // live, exclusively borrowed io_uring_params for the whole call.
        let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, RING_ENTRIES, &mut params as *mut io_uring_params) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: io_uring_setup just returned this descriptor; nothing else
        // owns it.
        let ring = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut buffer = FixedBuffer { ring, addr: addr as u64, len, registered: false };
        buffer.reregister()?;
        Ok(buffer)
    }

    /// Whether the kernel holds the pins right now.
    #[cfg(any(test, feature = "lab"))]
    pub fn is_registered(&self) -> bool {
        self.registered
    }

    /// `IORING_UNREGISTER_BUFFERS`: the kernel drops its pins before the call
    /// returns. Does nothing if the buffer is not registered.
    pub fn unregister(&mut self) -> io::Result<()> {
        if !self.registered {
            return Ok(());
        }
        self.register_op(io_uring_register_op::IORING_UNREGISTER_BUFFERS, std::ptr::null(), 0)?;
        self.registered = false;
        Ok(())
    }

    /// Registers the same range again (after [`unregister`](Self::unregister)),
    /// faulting in and pinning its pages anew. Does nothing if the buffer is
    /// registered already.
    pub fn reregister(&mut self) -> io::Result<()> {
        if self.registered {
            return Ok(());
        }
        let iov = libc::iovec { iov_base: self.addr as *mut libc::c_void, iov_len: self.len };
        self.register_op(io_uring_register_op::IORING_REGISTER_BUFFERS, &iov as *const libc::iovec as *const _, 1)?;
        self.registered = true;
        Ok(())
    }

    /// The pinned range: host address and length in bytes.
    #[cfg(any(test, feature = "lab"))]
    pub fn range(&self) -> (u64, usize) {
        (self.addr, self.len)
    }

    fn register_op(&self, op: io_uring_register_op, arg: *const libc::c_void, nr_args: u32) -> io::Result<()> {
        // SAFETY: the descriptor is a live io_uring; `arg` is null (with
        // nr_args 0) or points to `nr_args` iovecs that outlive the call. The
        // kernel validates the addresses inside them itself.
        let ret = unsafe { libc::syscall(libc::SYS_io_uring_register, self.ring.as_raw_fd(), op as u32, arg, nr_args) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for FixedBuffer {
    /// Unregisters first, because the kernel tears a closed ring down from a
    /// worker some time after `close` and would keep the pins until then.
    fn drop(&mut self) {
        let _ = self.unregister();
        // The ring's descriptor closes with `self.ring`.
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::hostmem::BlockLock;
    use crate::ram::AnonMapping;

    const PAGE: usize = 4096;

    /// Pagemap "present" bits of `pages` pages from `addr`.
    fn present(addr: *mut u8, pages: usize) -> Vec<bool> {
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let mut raw = vec![0u8; pages * 8];
        pagemap.read_exact_at(&mut raw, (addr as u64 / PAGE as u64) * 8).unwrap();
        raw.chunks_exact(8).map(|e| u64::from_ne_bytes(e.try_into().unwrap()) & (1 << 63) != 0).collect()
    }

    /// Pins are real: hold the lock that serialises memory offlining so a
    /// pin taken here cannot make an offlining test time out.
    fn lock() -> BlockLock {
        BlockLock::acquire(Instant::now() + Duration::from_secs(120)).unwrap()
    }

    #[test]
    fn registration_faults_in_every_page() {
        let _lock = lock();
        let map = AnonMapping::new(1 << 20).unwrap();
        let pages = map.len() / PAGE;
        assert!(present(map.ptr(), pages).iter().all(|p| !p), "fresh mapping already present");

        let pin = FixedBuffer::register(map.ptr(), map.len()).unwrap();
        assert!(pin.is_registered());
        assert_eq!(pin.range(), (map.ptr() as u64, map.len()));
        assert!(present(map.ptr(), pages).iter().all(|p| *p), "registration left pages missing");
    }

    #[test]
    fn unregister_and_reregister_round_trip() {
        let _lock = lock();
        let map = AnonMapping::new(1 << 20).unwrap();
        let mut pin = FixedBuffer::register(map.ptr(), map.len()).unwrap();
        pin.unregister().unwrap();
        assert!(!pin.is_registered());
        pin.unregister().unwrap(); // idempotent
        pin.reregister().unwrap();
        assert!(pin.is_registered());
        pin.reregister().unwrap(); // idempotent
        pin.unregister().unwrap();
        pin.reregister().unwrap();
        assert!(pin.is_registered());
    }

    #[test]
    fn range_with_a_hole_fails_with_efault() {
        let _lock = lock();
        let map = AnonMapping::new(3 * PAGE).unwrap();
        // SAFETY: the middle page belongs to `map`, and nothing refers to it.
        let ret = unsafe { libc::munmap(map.ptr().wrapping_add(PAGE).cast(), PAGE) };
        assert_eq!(ret, 0);
        let err = FixedBuffer::register(map.ptr(), map.len()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{err}");
    }

    #[test]
    fn empty_range_is_refused() {
        let map = AnonMapping::new(PAGE).unwrap();
        let err = FixedBuffer::register(map.ptr(), 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{err}");
    }
}
