//! A one-page-per-fault handler of Firecracker's protocol: what
//! Firecracker's own example handler and the platforms built on it do, to
//! measure the engine against. One thread per connection reads one event
//! at a time and answers each fault with a `UFFDIO_COPY` of its one page
//! from the memory file's mapping; pages a `REMOVE` covered get
//! `UFFDIO_ZEROPAGE`. No prefetch, no batching, no workers.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use linux_raw_sys::general as sys;
use linux_raw_sys::ioctl as nr;

use crate::handshake::{self, Region};
use crate::peer;

const PAGE: u64 = 4096;

/// The memory file, mapped read-only and shared.
struct FileMap {
    ptr: *const u8,
    len: usize,
}

// SAFETY: a read-only mapping read by the kernel only (COPY's source).
unsafe impl Send for FileMap {}
// SAFETY: as above.
unsafe impl Sync for FileMap {}

impl FileMap {
    fn open(path: &Path) -> io::Result<FileMap> {
        let file = File::open(path)?;
        let len = file.metadata()?.len() as usize;
        if len == 0 {
            return Err(io::Error::other("empty memory file"));
        }
        // SAFETY: a new read-only shared mapping of the file; no existing
        // memory is affected.
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(FileMap { ptr: ptr.cast(), len })
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `open` mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// Serves connections on `listener` from `mem_file` until `stop` is set;
/// each connection on its own thread, joined before returning.
pub fn serve(listener: UnixListener, mem_file: &Path, stop: Arc<AtomicBool>) -> io::Result<()> {
    let map = Arc::new(FileMap::open(mem_file)?);
    listener.set_nonblocking(true)?;
    let mut threads = Vec::new();
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((conn, _)) => {
                let map = map.clone();
                let stop = stop.clone();
                threads.push(std::thread::spawn(move || {
                    if let Err(e) = serve_one(&conn, &map, &stop) {
                        tracing::warn!(target: "apf_handler", error = %e, "one-page handler: connection ended");
                    }
                }));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return Err(e),
        }
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn serve_one(conn: &UnixStream, map: &FileMap, stop: &AtomicBool) -> io::Result<()> {
    let (regions, uffd) = handshake_of(conn, map.len as u64)?;
    let mut removed: HashSet<u64> = HashSet::new();
    let mut retry: Vec<u64> = Vec::new();
    // SAFETY: uffd_msg is plain integers; all-zero is valid.
    let mut msg: sys::uffd_msg = unsafe { std::mem::zeroed() };
    while !stop.load(Ordering::Acquire) {
        let mut fds = [
            libc::pollfd { fd: uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: conn.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 },
        ];
        // SAFETY: poll reads and writes the two pollfds on this frame.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, if retry.is_empty() { 100 } else { 1 }) };
        if fds[1].revents != 0 {
            return Ok(());
        }
        for page in std::mem::take(&mut retry) {
            resolve(&uffd, map, &regions, &removed, page, &mut retry)?;
        }
        // SAFETY: reads at most one uffd_msg into `msg`, on this frame.
        let n = unsafe {
            libc::read(uffd.as_raw_fd(), (&mut msg as *mut sys::uffd_msg).cast(), std::mem::size_of::<sys::uffd_msg>())
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                _ => return Err(e),
            }
        }
        match msg.event as u32 {
            sys::UFFD_EVENT_PAGEFAULT => {
                // SAFETY: the kernel wrote a pagefault message.
                let addr = unsafe { msg.arg.pagefault.address };
                resolve(&uffd, map, &regions, &removed, addr & !(PAGE - 1), &mut retry)?;
            }
            sys::UFFD_EVENT_REMOVE => {
                // SAFETY: the kernel wrote a remove message.
                let remove = unsafe { msg.arg.remove };
                let (start, end) = (remove.start, remove.end);
                removed.extend((start..end).step_by(PAGE as usize));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Reads the handshake (up to 5 s) and checks it.
fn handshake_of(conn: &UnixStream, file_len: u64) -> io::Result<(Vec<Region>, OwnedFd)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut bytes = Vec::new();
    let mut fds = Vec::new();
    let mut buf = vec![0u8; handshake::MAX_MESSAGE + 1];
    while handshake::incomplete(&bytes) {
        if Instant::now() >= deadline {
            return Err(io::Error::other("handshake timeout"));
        }
        match peer::recv(conn, &mut buf) {
            Ok(r) if r.len == 0 => return Err(io::Error::other("hung up")),
            Ok(r) => {
                bytes.extend_from_slice(&buf[..r.len]);
                fds.extend(r.fds);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(e),
        }
    }
    let regions = handshake::parse(&bytes, file_len).map_err(io::Error::other)?;
    if fds.len() != 1 || regions.iter().any(|r| r.page_size != PAGE) {
        return Err(io::Error::other("one descriptor and 4 KiB pages expected"));
    }
    Ok((regions, fds.pop().expect("one descriptor")))
}

fn resolve(
    uffd: &OwnedFd,
    map: &FileMap,
    regions: &[Region],
    removed: &HashSet<u64>,
    page: u64,
    retry: &mut Vec<u64>,
) -> io::Result<()> {
    let Some(r) = regions.iter().find(|r| (r.base_host_virt_addr..r.base_host_virt_addr + r.size).contains(&page))
    else {
        return Ok(());
    };
    let ret = if removed.contains(&page) {
        let mut arg =
            sys::uffdio_zeropage { range: sys::uffdio_range { start: page, len: PAGE }, mode: 0, zeropage: 0 };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one struct on this frame;
        // the page is the peer's, reached through its descriptor only.
        unsafe { libc::ioctl(uffd.as_raw_fd(), nr::UFFDIO_ZEROPAGE as _, &mut arg) }
    } else {
        let off = r.offset + (page - r.base_host_virt_addr);
        let src = map.ptr.wrapping_add(off as usize) as u64;
        let mut arg = sys::uffdio_copy { dst: page, src, len: PAGE, mode: 0, copy: 0 };
        // SAFETY: UFFDIO_COPY reads and writes one struct on this frame;
        // `src` is inside the file's mapping (the handshake was checked
        // against the file's length).
        unsafe { libc::ioctl(uffd.as_raw_fd(), nr::UFFDIO_COPY as _, &mut arg) }
    };
    if ret == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EEXIST) => {
            let mut range = sys::uffdio_range { start: page, len: PAGE };
            // SAFETY: UFFDIO_WAKE reads one uffdio_range on this frame.
            unsafe { libc::ioctl(uffd.as_raw_fd(), nr::UFFDIO_WAKE as _, &mut range) };
            Ok(())
        }
        // A remove is pending: read it, then try again.
        Some(libc::EAGAIN) => {
            retry.push(page);
            Ok(())
        }
        _ => Err(e),
    }
}
