//! The peer at the other end of a connection: its message and the
//! descriptors that came with it (`SCM_RIGHTS`), who it is
//! (`SO_PEERPIDFD`), and how to end it (`pidfd_send_signal`).
//!
//! A peer is ended through a pidfd, never by pid: a pid can be reused
//! by an unrelated process once the peer is gone. `SO_PEERPIDFD` (Linux
//! 6.5) gives a pidfd for the process that connected, taken by the kernel
//! at `connect` time, so it is exact. Without it the fallback,
//! `pidfd_open` of the `SO_PEERCRED` pid, is racy: if the peer exited and
//! its pid was reused in between, the pidfd names the wrong process. It is
//! taken at accept, before anything else, which keeps the window small,
//! and it is said in the log when used.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Most descriptors taken from one message; more are a bad peer, and the
/// kernel closes what did not fit (`MSG_CTRUNC`).
const MAX_FDS: usize = 4;

/// What one `recvmsg` brought.
#[derive(Debug)]
pub struct Received {
    /// Bytes of the message (0: the peer hung up).
    pub len: usize,
    /// Descriptors that came with it.
    pub fds: Vec<OwnedFd>,
    /// More descriptors came than [`MAX_FDS`] (the rest were closed).
    pub fds_truncated: bool,
}

/// Reads what is waiting on `sock` into `buf`, with its descriptors
/// (close-on-exec), without blocking: `WouldBlock` if nothing is.
pub fn recv(sock: &UnixStream, buf: &mut [u8]) -> io::Result<Received> {
    const SPACE: usize = cmsg_space(MAX_FDS * std::mem::size_of::<RawFd>());
    let mut control = [0u64; SPACE.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain integers and pointers; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points at `iov` (which is `buf`, writable for its
    // length) and at `control` (writable for msg_controllen bytes), all on
    // this frame and alive across the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled in by recvmsg; CMSG_FIRSTHDR/NXTHDR walk the
    // control buffer within msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is a header inside `control`, as CMSG_* returned it.
        let header = unsafe { cmsg.read() };
        let (level, kind, len) = (header.cmsg_level, header.cmsg_type, header.cmsg_len);
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a constant computation.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            #[allow(clippy::unnecessary_cast)] // cmsg_len is not usize on every libc
            let count = (len as usize - header) / std::mem::size_of::<RawFd>();
            // SAFETY: the data of an SCM_RIGHTS header holds `count` ints.
            let data = unsafe { libc::CMSG_DATA(cmsg) } as *const RawFd;
            for i in 0..count {
                // SAFETY: within the header's data; unaligned reads as the
                // control buffer gives no alignment promise for ints.
                let fd = unsafe { data.wrapping_add(i).read_unaligned() };
                // SAFETY: the kernel just installed `fd` in this process
                // for us; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(Received { len: n as usize, fds, fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0 })
}

const fn cmsg_space(len: usize) -> usize {
    // CMSG_SPACE as a const: header (16 on 64-bit) plus data, rounded up
    // to 8.
    std::mem::size_of::<libc::cmsghdr>() + len.div_ceil(8) * 8
}

/// Sends `bytes` with `fds` attached in one message.
pub fn send(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut control = vec![0u64; cmsg_space(std::mem::size_of_val(fds)).div_ceil(8)];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: msghdr is plain integers and pointers; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a constant computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) } as usize;
        // SAFETY: the control buffer is at least CMSG_SPACE bytes, so it
        // holds one header.
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        // SAFETY: CMSG_LEN is a constant computation.
        let cmsg_len = unsafe { libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) } as usize;
        // SAFETY: `cmsg` is the first header inside `control` (aligned: a
        // u64 buffer), written whole.
        unsafe { cmsg.write(libc::cmsghdr { cmsg_len, cmsg_level: libc::SOL_SOCKET, cmsg_type: libc::SCM_RIGHTS }) };
        // SAFETY: the header's data lies inside `control`.
        let data = unsafe { libc::CMSG_DATA(cmsg) } as *mut RawFd;
        // SAFETY: the data has room for `fds` (CMSG_SPACE above); the
        // buffers are distinct.
        unsafe { std::ptr::copy_nonoverlapping(fds.as_ptr(), data, fds.len()) };
    }
    // SAFETY: `msg` points at `iov` (`bytes`, read only by the kernel) and
    // `control`, both alive across the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Who connected: its pid (for the log) and a pidfd to end it by.
#[derive(Debug)]
pub struct Peer {
    /// Its pid at connect time (for the log only).
    pub pid: i32,
    /// A pidfd for it, if one could be had.
    pub pidfd: Option<OwnedFd>,
    /// The pidfd came from `pidfd_open` of the pid, not `SO_PEERPIDFD`:
    /// racy (see the module doc).
    pub racy: bool,
}

impl Peer {
    /// Identifies the process at the other end of `sock`.
    pub fn of(sock: &UnixStream) -> Peer {
        let fd = sock.as_raw_fd();
        let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cred`, on
        // this frame.
        let ret = unsafe {
            libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len)
        };
        let pid = if ret == 0 { cred.pid } else { 0 };
        let mut pidfd: RawFd = -1;
        let mut len = std::mem::size_of::<RawFd>() as libc::socklen_t;
        // SAFETY: as above, into one int.
        let ret = unsafe {
            libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERPIDFD, (&mut pidfd as *mut RawFd).cast(), &mut len)
        };
        if ret == 0 && pidfd >= 0 {
            // SAFETY: the kernel made this pidfd for us; nothing else owns it.
            return Peer { pid, pidfd: Some(unsafe { OwnedFd::from_raw_fd(pidfd) }), racy: false };
        }
        if pid <= 0 {
            return Peer { pid, pidfd: None, racy: true };
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new
        // descriptor or -1; no memory is involved.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let pidfd = (raw >= 0).then(|| {
            // SAFETY: a new descriptor that only this OwnedFd owns.
            unsafe { OwnedFd::from_raw_fd(raw as RawFd) }
        });
        Peer { pid, pidfd, racy: true }
    }

    /// Ends the peer with SIGKILL through its pidfd. `Ok(false)` if it has
    /// no pidfd, `Ok(true)` once the signal is sent (or the peer is
    /// already gone: `ESRCH`).
    pub fn kill(&self) -> io::Result<bool> {
        let Some(pidfd) = &self.pidfd else { return Ok(false) };
        // SAFETY: pidfd_send_signal takes a pidfd, a signal, a null siginfo
        // and flags; no memory of ours is read.
        let ret = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), libc::SIGKILL, std::ptr::null::<u8>(), 0)
        };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ESRCH) { Ok(true) } else { Err(e) };
        }
        Ok(true)
    }
}

/// Whether `fd` is a userfaultfd (by what `/proc/self/fd` calls it).
pub fn is_userfaultfd(fd: &OwnedFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|l| l.as_os_str() == "anon_inode:[userfaultfd]")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_message_and_its_descriptors_arrive_together() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        assert_eq!(send(&a, b"hello", &[file.as_raw_fd(), file.as_raw_fd()]).unwrap(), 5);
        let mut buf = [0u8; 16];
        let got = recv(&b, &mut buf).unwrap();
        assert_eq!((&buf[..got.len], got.fds.len(), got.fds_truncated), (&b"hello"[..], 2, false));
        assert!(!is_userfaultfd(&got.fds[0]));
        assert_eq!(recv(&b, &mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        // More than fit: the rest are closed by the kernel, and it says so.
        let many = [file.as_raw_fd(); MAX_FDS + 2];
        send(&a, b"x", &many).unwrap();
        let got = recv(&b, &mut buf).unwrap();
        assert!(got.fds_truncated, "{got:?}");
        drop(a);
        assert_eq!(recv(&b, &mut buf).unwrap().len, 0, "hang-up reads 0");
    }

    #[test]
    fn the_peer_is_known_by_a_pidfd() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = Peer::of(&a);
        assert_eq!(peer.pid, std::process::id() as i32);
        assert!(peer.pidfd.as_ref().is_some_and(|p| p.as_fd().as_raw_fd() >= 0));
        assert!(!peer.racy, "this kernel offers SO_PEERPIDFD");
    }
}
