//! Supervisor mode: a parent that owns every VM's descriptors and runs the
//! serving in a worker child it restarts when it dies.
//!
//! # Who holds what
//!
//! The supervisor binds the socket, accepts each connection, takes the
//! peer's pidfd, and creates the VM's removed-pages set: a memfd bitmap
//! of one bit per page of the memory file. It hands the connection and the
//! bitmap to the worker (a child running the same binary with
//! `--worker-fd`) over a `SOCK_SEQPACKET` pair, keeping its own copies. The
//! worker reads the handshake, adopts the userfaultfd and starts the VM's
//! engine as an unsupervised handler does, then sends back a copy of the
//! userfaultfd and the handshake bytes; when a VM ends (or is refused), it
//! says so and the supervisor drops its copies. The supervisor itself
//! never touches guest memory, reads no handshake and runs no engine: it
//! polls, accepts and passes descriptors.
//!
//! # When the worker dies
//!
//! The supervisor starts a new worker and hands it every VM it holds, with
//! the handshake and userfaultfd where it has them. The new worker:
//! - applies the VM's removed-pages set before serving
//!   ([`apf::RemoteMemory::mark_removed`]): a remove event the dead worker
//!   read is never delivered again, but the worker's engine recorded it in
//!   the bitmap from its `on_remove` hook, right after the event loop read
//!   it, and the bitmap's memory lives as long as the supervisor's memfd;
//! - wakes every region when its engine starts: faults the dead worker had
//!   read are never delivered again either, and their threads fault anew;
//! - meets `EEXIST` for pages the dead worker installed, and leaves them.
//!
//! A VM the dead worker had not yet reported as adopted is handed over
//! without its handshake: if the handshake is still unread in the
//! connection, the new worker reads it; otherwise the peer may have handed
//! its userfaultfd to the dead worker and wait on it for ever, so when no
//! complete handshake comes within the handshake timeout the peer is ended
//! through its pidfd.
//!
//! # The window
//!
//! A remove event read by the dead worker's event loop but not yet
//! recorded (the worker died between the `read` and the hook's bit store,
//! a few instructions) is lost: the new worker would fill those pages from
//! the memory file instead of serving zeros. The kernel gives no way to
//! close it: the event is consumed by the read.
//!
//! # Bounds
//!
//! A worker that dies more than [`Supervise::max_restarts`] times within
//! [`Supervise::window`] is not restarted again: the supervisor ends every
//! VM it holds through its pidfd (a VM without a handler would wait for
//! ever) and exits with an error. Restarts wait [`Supervise::delay`] first.
//! Every write to the worker has a deadline (1 s). A worker whose
//! supervisor dies sees the pair hang up: it takes no new VMs, serves the
//! ones it has until they end, and exits.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use apf::{GuestAddress, GuestRange};
use thiserror::Error;

use crate::peer::{self, Peer};
use crate::server::{listen_at, Options};

/// Errors of the supervisor.
#[derive(Debug, Error)]
pub enum SuperviseError {
    /// A system call failed.
    #[error("{what}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The worker kept dying: every VM was ended.
    #[error("the worker died {deaths} times within {window:?}: gave up, {ended} VMs ended")]
    GaveUp {
        /// Deaths within the window.
        deaths: usize,
        /// The window.
        window: Duration,
        /// VMs whose peer was ended.
        ended: usize,
    },
}

fn sys(what: &'static str) -> impl FnOnce(io::Error) -> SuperviseError {
    move |source| SuperviseError::Sys { what, source }
}

/// How the worker is restarted.
#[derive(Debug, Clone)]
pub struct Supervise {
    /// Most restarts within [`Supervise::window`] before giving up.
    pub max_restarts: usize,
    /// The window restarts are counted in.
    pub window: Duration,
    /// Wait before each restart.
    pub delay: Duration,
}

impl Default for Supervise {
    /// 5 restarts within 10 s, 100 ms apart.
    fn default() -> Supervise {
        Supervise { max_restarts: 5, window: Duration::from_secs(10), delay: Duration::from_millis(100) }
    }
}

/// Deadline of every write on the pair.
const SEND_DEADLINE: Duration = Duration::from_secs(1);

/// Poll timeout of the supervisor.
const TICK: Duration = Duration::from_millis(50);

/// The largest message on the pair: a header line and a handshake.
pub(crate) const MAX_CONTROL: usize = crate::handshake::MAX_MESSAGE + 4096;

/// One VM's removed pages: a bitmap in a memfd, one bit per page of the
/// memory file, mapped shared by the worker; the supervisor keeps the
/// memfd, so the bits outlive the worker that set them.
#[derive(Debug)]
pub struct RemovedPages {
    words: *const AtomicU64,
    count: usize,
    pages: u64,
}

// SAFETY: the mapping is only reached through atomics.
unsafe impl Send for RemovedPages {}
// SAFETY: as above.
unsafe impl Sync for RemovedPages {}

impl RemovedPages {
    fn bytes(pages: u64) -> usize {
        (pages.div_ceil(64).max(1) * 8) as usize
    }

    /// A new, empty set for `pages` pages.
    pub fn create(pages: u64) -> io::Result<OwnedFd> {
        // SAFETY: memfd_create reads the NUL-terminated name and returns a
        // new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"apf-removed-pages".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that only this OwnedFd owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        std::fs::File::from(fd.try_clone()?).set_len(Self::bytes(pages) as u64)?;
        Ok(fd)
    }

    /// Maps the set in `fd`, which must hold at least `pages` bits.
    pub fn map(fd: &OwnedFd, pages: u64) -> io::Result<RemovedPages> {
        let len = Self::bytes(pages);
        let have = std::fs::File::from(fd.try_clone()?).metadata()?.len();
        if have < len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("removed-pages set of {have} bytes, {len} needed"),
            ));
        }
        // SAFETY: a new shared mapping of the memfd, `len` bytes it holds;
        // no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(RemovedPages { words: ptr.cast(), count: len / 8, pages })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.count);
        let word = self.words.wrapping_add(i);
        // SAFETY: `word` is inside the mapping (checked), which is
        // page-aligned hence aligned for u64 and alive as long as `self`;
        // it is shared only through atomics.
        unsafe { &*word }
    }

    /// Records the pages of `range` as removed.
    pub fn record(&self, range: GuestRange) {
        let page = apf::PAGE_SIZE as u64;
        for p in (range.start.0 / page)..range.end().div_ceil(page).min(self.pages) {
            self.word((p / 64) as usize).fetch_or(1 << (p % 64), Ordering::Release);
        }
    }

    /// The removed pages, as ranges of adjacent pages.
    pub fn ranges(&self) -> Vec<GuestRange> {
        let page = apf::PAGE_SIZE as u64;
        let mut out: Vec<GuestRange> = Vec::new();
        for i in 0..self.count {
            let w = self.word(i).load(Ordering::Acquire);
            for b in 0..64 {
                if w & (1 << b) == 0 || i as u64 * 64 + b >= self.pages {
                    continue;
                }
                let at = (i as u64 * 64 + b) * page;
                match out.last_mut() {
                    Some(r) if r.end() == at => r.len += page,
                    _ => out.push(GuestRange::new(GuestAddress(at), page)),
                }
            }
        }
        out
    }
}

impl Drop for RemovedPages {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped.
        unsafe { libc::munmap(self.words as *mut libc::c_void, self.count * 8) };
    }
}

/// A message on the pair: a JSON header line, then raw bytes (a
/// handshake), with descriptors attached.
pub(crate) fn send_control(
    ctl: &UnixStream,
    header: &serde_json::Value,
    bytes: &[u8],
    fds: &[RawFd],
) -> io::Result<()> {
    let mut msg = header.to_string().into_bytes();
    msg.push(b'\n');
    msg.extend_from_slice(bytes);
    let n = peer::send(ctl, &msg, fds)?;
    if n != msg.len() {
        return Err(io::Error::other(format!("control message cut at {n} of {} bytes", msg.len())));
    }
    Ok(())
}

/// A message read from the pair.
pub(crate) struct Control {
    pub header: serde_json::Value,
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Reads one message from the pair: `Ok(None)` if none is waiting, an
/// error if the other end hung up or the message is malformed.
pub(crate) fn recv_control(ctl: &UnixStream, buf: &mut [u8]) -> io::Result<Option<Control>> {
    let r = match peer::recv(ctl, buf) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) => return Err(e),
    };
    if r.len == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the other end hung up"));
    }
    let msg = &buf[..r.len];
    let nl = msg.iter().position(|&b| b == b'\n').ok_or_else(|| io::Error::other("control message without header"))?;
    let header = serde_json::from_slice(&msg[..nl]).map_err(io::Error::other)?;
    Ok(Some(Control { header, bytes: msg[nl + 1..].to_vec(), fds: r.fds }))
}

/// A VM as the supervisor holds it.
struct Held {
    conn: UnixStream,
    peer: Peer,
    removed: OwnedFd,
    uffd: Option<OwnedFd>,
    handshake: Option<Vec<u8>>,
}

/// A running worker.
struct Worker {
    child: Child,
    pidfd: OwnedFd,
    ctl: UnixStream,
}

impl Worker {
    fn spawn(args: &[String]) -> Result<Worker, SuperviseError> {
        let mut pair = [0; 2];
        // SAFETY: socketpair writes two descriptors into `pair`.
        if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, pair.as_mut_ptr()) } != 0 {
            return Err(sys("socketpair")(io::Error::last_os_error()));
        }
        // SAFETY: a new descriptor that only this OwnedFd owns.
        let ours = unsafe { OwnedFd::from_raw_fd(pair[0]) };
        // SAFETY: as above.
        let theirs = unsafe { OwnedFd::from_raw_fd(pair[1]) };
        // Ours is close-on-exec; theirs (made without it) is inherited by
        // the child alone: this thread is the only one that spawns, and
        // closes it right after.
        // SAFETY: fcntl on a descriptor we own; no memory involved.
        unsafe { libc::fcntl(ours.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        let exe = std::env::current_exe().map_err(sys("find the handler's executable"))?;
        let child = Command::new(exe)
            .args(args)
            .arg("--worker-fd")
            .arg(theirs.as_raw_fd().to_string())
            .spawn()
            .map_err(sys("start the worker"))?;
        drop(theirs);
        // SAFETY: pidfd_open takes a pid and flags; the child is ours and
        // not yet reaped, so its pid names it.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        if raw < 0 {
            return Err(sys("pidfd_open of the worker")(io::Error::last_os_error()));
        }
        // SAFETY: a new descriptor that only this OwnedFd owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
        let ctl = UnixStream::from(ours);
        ctl.set_write_timeout(Some(SEND_DEADLINE)).map_err(sys("set the pair's deadline"))?;
        tracing::info!(target: "apf_handler", worker = child.id(), "worker started");
        Ok(Worker { child, pidfd, ctl })
    }

    /// Hands `vm` to the worker; a failure is logged (a dead worker is
    /// seen through its pidfd, and gets every VM again when restarted).
    fn hand(&self, vm: u64, held: &Held, resumed: bool) {
        let mut fds = vec![held.conn.as_raw_fd(), held.removed.as_raw_fd()];
        fds.extend(held.uffd.as_ref().map(|u| u.as_raw_fd()));
        let header = serde_json::json!({ "vm": vm, "resumed": resumed, "handshake": held.handshake.is_some() });
        let bytes = held.handshake.as_deref().unwrap_or_default();
        if let Err(e) = send_control(&self.ctl, &header, bytes, &fds) {
            tracing::warn!(target: "apf_handler", vm, error = %e, "cannot hand the VM to the worker");
        }
    }
}

fn pollfd(fd: RawFd, events: i16) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

/// Runs the supervisor: `worker_args` are the handler's own arguments,
/// given to each worker (with `--worker-fd`). Returns only when it gives
/// up on a worker that keeps dying.
pub fn supervise(opts: &Options, sup: &Supervise, worker_args: &[String]) -> Result<(), SuperviseError> {
    let pages = std::fs::metadata(&opts.mem_file).map_err(sys("stat the memory file"))?.len() / apf::PAGE_SIZE as u64;
    let listener = listen_at(&opts.socket).map_err(sys("listen on the socket"))?;
    listener.set_nonblocking(true).map_err(sys("make the socket non-blocking"))?;
    let mut vms: BTreeMap<u64, Held> = BTreeMap::new();
    let mut deaths: VecDeque<Instant> = VecDeque::new();
    let mut next_vm = 0u64;
    let mut worker = Worker::spawn(worker_args)?;
    let mut buf = vec![0u8; MAX_CONTROL];
    loop {
        let accepting = vms.len() < opts.max_vms;
        let mut fds = [
            pollfd(listener.as_raw_fd(), if accepting { libc::POLLIN } else { 0 }),
            pollfd(worker.ctl.as_raw_fd(), libc::POLLIN),
            pollfd(worker.pidfd.as_raw_fd(), libc::POLLIN),
        ];
        // SAFETY: poll reads and writes `fds`, an array of the length given.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, TICK.as_millis() as i32) };

        // What the worker said, first: a dead worker's last messages are
        // still in the pair.
        while let Ok(Some(msg)) = recv_control(&worker.ctl, &mut buf) {
            let Some(vm) = msg.header["vm"].as_u64() else { continue };
            if msg.header["ended"].as_bool() == Some(true) {
                vms.remove(&vm);
            } else if msg.header["adopted"].as_bool() == Some(true) {
                if let (Some(held), Some(uffd)) = (vms.get_mut(&vm), msg.fds.into_iter().next()) {
                    held.uffd = Some(uffd);
                    held.handshake = Some(msg.bytes);
                }
            }
        }

        if fds[2].revents != 0 {
            let status = worker.child.wait().map_err(sys("reap the worker"))?;
            let now = Instant::now();
            deaths.push_back(now);
            while deaths.front().is_some_and(|d| now.duration_since(*d) > sup.window) {
                deaths.pop_front();
            }
            tracing::error!(target: "apf_handler", worker = worker.child.id(), %status, vms = vms.len(), deaths = deaths.len(), "the worker died");
            if deaths.len() > sup.max_restarts {
                let ended = vms.len();
                for (vm, held) in &vms {
                    match held.peer.kill() {
                        Ok(true) => {
                            tracing::error!(target: "apf_handler", vm, pid = held.peer.pid, "no worker: ended the VM through its pidfd")
                        }
                        Ok(false) => {
                            tracing::error!(target: "apf_handler", vm, pid = held.peer.pid, "no worker, and no pidfd to end the VM by")
                        }
                        Err(e) => {
                            tracing::error!(target: "apf_handler", vm, pid = held.peer.pid, error = %e, "no worker, and ending the VM failed")
                        }
                    }
                }
                drop(vms);
                let _ = std::fs::remove_file(&opts.socket);
                return Err(SuperviseError::GaveUp { deaths: deaths.len(), window: sup.window, ended });
            }
            std::thread::sleep(sup.delay);
            worker = Worker::spawn(worker_args)?;
            for (vm, held) in &vms {
                worker.hand(*vm, held, true);
            }
            continue;
        }

        if accepting && fds[0].revents & libc::POLLIN != 0 {
            while vms.len() < opts.max_vms {
                let conn = match listener.accept() {
                    Ok((conn, _)) => conn,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::error!(target: "apf_handler", error = %e, "accept failed");
                        break;
                    }
                };
                let peer = Peer::of(&conn);
                let removed = match RemovedPages::create(pages) {
                    Ok(fd) => fd,
                    Err(e) => {
                        // Nothing handed over yet: closing tells the peer.
                        tracing::error!(target: "apf_handler", pid = peer.pid, error = %e, "cannot create the removed-pages set: connection closed");
                        continue;
                    }
                };
                let vm = next_vm;
                next_vm += 1;
                tracing::info!(target: "apf_handler", vm, pid = peer.pid, "connection (supervised)");
                let held = Held { conn, peer, removed, uffd: None, handshake: None };
                worker.hand(vm, &held, false);
                vms.insert(vm, held);
            }
        }
    }
}

/// The worker's end of the pair, from `--worker-fd`.
pub(crate) fn worker_channel(fd: RawFd) -> io::Result<UnixStream> {
    // Refuse anything that is not a seqpacket socket before owning it.
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `kind`.
    let ret = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE, (&mut kind as *mut libc::c_int).cast(), &mut len)
    };
    if ret != 0 || kind != libc::SOCK_SEQPACKET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not the supervisor's pair"),
        ));
    }
    // SAFETY: the supervisor made this descriptor for this process, which
    // owns it from here; nothing else refers to it.
    let ctl = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: fcntl on a descriptor we own; no memory involved.
    unsafe { libc::fcntl(ctl.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    ctl.set_write_timeout(Some(SEND_DEADLINE))?;
    Ok(ctl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_pages_outlive_the_mapping_that_set_them() {
        let fd = RemovedPages::create(300).unwrap();
        let page = apf::PAGE_SIZE as u64;
        {
            let set = RemovedPages::map(&fd, 300).unwrap();
            set.record(GuestRange::new(GuestAddress(3 * page), 2 * page));
            set.record(GuestRange::new(GuestAddress(5 * page), page));
            set.record(GuestRange::new(GuestAddress(299 * page), 10 * page)); // clipped to the set
        }
        let again = RemovedPages::map(&fd, 300).unwrap();
        assert_eq!(
            again.ranges(),
            vec![GuestRange::new(GuestAddress(3 * page), 3 * page), GuestRange::new(GuestAddress(299 * page), page)]
        );
        assert!(RemovedPages::map(&fd, 100_000).is_err(), "a set too small is refused");
    }

    #[test]
    fn control_messages_carry_header_bytes_and_descriptors() {
        let mut pair = [0; 2];
        // SAFETY: socketpair writes two descriptors.
        assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, pair.as_mut_ptr()) }, 0);
        // SAFETY: a new descriptor owned here.
        let a = unsafe { OwnedFd::from_raw_fd(pair[0]) };
        // SAFETY: as above.
        let b = unsafe { OwnedFd::from_raw_fd(pair[1]) };
        let (a, b) = (UnixStream::from(a), UnixStream::from(b));
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        send_control(&a, &serde_json::json!({"vm": 7}), b"[1,2]\nx", &[file.as_raw_fd()]).unwrap();
        send_control(&a, &serde_json::json!({"vm": 8}), b"", &[]).unwrap();
        let mut buf = vec![0u8; MAX_CONTROL];
        let m = recv_control(&b, &mut buf).unwrap().unwrap();
        assert_eq!((m.header["vm"].as_u64(), m.bytes.as_slice(), m.fds.len()), (Some(7), &b"[1,2]\nx"[..], 1));
        let m = recv_control(&b, &mut buf).unwrap().unwrap();
        assert_eq!((m.header["vm"].as_u64(), m.bytes.len(), m.fds.len()), (Some(8), 0, 0));
        assert!(recv_control(&b, &mut buf).unwrap().is_none());
        drop(a);
        assert!(recv_control(&b, &mut buf).is_err(), "a hang-up is an error");
    }
}
