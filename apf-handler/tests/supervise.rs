//! The supervised handler in its own processes (the supervisor and its
//! worker), against Firecracker-like clients: a worker killed mid-restore
//! is replaced and the restore completes byte for byte, removes included;
//! a worker that dies every time ends the VM instead of leaving it
//! blocked. Every wait has a deadline.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
use common::{handler, log, mem_file, Dir, Proc, MIB};

/// The handler in supervisor mode on `dir/sock`.
fn supervisor(dir: &Path, mem: &Path, args: &[&str]) -> Proc {
    handler(dir, mem, &[&["--supervise"], args].concat())
}

/// A Firecracker-like client on `dir/sock` (its stderr kept for the
/// failure messages).
fn client(dir: &Path, mem: &Path, args: &[&str]) -> Proc {
    common::client(dir, mem, args, Stdio::piped())
}

/// The supervisor's one child, the worker, waiting for a new one if
/// `not` is given (the previous worker's pid).
fn worker_of(sup: u32, not: Option<u32>, dir: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children = std::fs::read_to_string(format!("/proc/{sup}/task/{sup}/children")).unwrap_or_default();
        let pids: Vec<u32> = children.split_whitespace().map(|p| p.parse().unwrap()).collect();
        if let [pid] = pids[..] {
            if Some(pid) != not {
                return pid;
            }
        }
        assert!(Instant::now() < deadline, "no (new) worker: {pids:?}\n{}", log(dir));
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGKILL through a pidfd (the worker is the supervisor's unreaped child
/// while this runs, so its pid still names it).
fn kill(pid: u32) {
    // SAFETY: pidfd_open takes a pid and flags.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    assert!(raw >= 0, "pidfd_open {pid}: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    // SAFETY: pidfd_send_signal with a pidfd, a signal, no siginfo.
    let ret = unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, std::os::fd::AsRawFd::as_raw_fd(&fd), libc::SIGKILL, 0usize, 0)
    };
    assert_eq!(ret, 0, "pidfd_send_signal: {}", std::io::Error::last_os_error());
}

fn wait_for(path: &Path, within: Duration, dir: &Path) {
    let deadline = Instant::now() + within;
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} never appeared\n{}", path.display(), log(dir));
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The worker is killed twice: once after some faults and balloon
/// discards (the client waits at its gate), once during the client's
/// first pass. The client finishes: every byte equals the file's, and the
/// discarded pages, whose remove events only the dead worker read, read
/// zeros (from the supervisor's removed-pages set); a new worker without
/// it would fill them from the file.
#[test]
fn a_worker_killed_mid_restore_is_replaced_and_the_restore_is_exact() {
    let dir = Dir::new("kill");
    let mem = mem_file(&dir.0, 64 * MIB);
    let sup = supervisor(&dir.0, &mem, &["--workers", "1", "--restart-delay-ms", "20"]);
    let first = worker_of(sup.0.id(), None, &dir.0);
    let gate = dir.0.join("gate");
    let mut c = client(&dir.0, &mem, &["--threads", "2", "--order", "random", "--gate", gate.to_str().unwrap()]);
    wait_for(&dir.0.join("gate.ready"), Duration::from_secs(30), &dir.0);
    // The discards returned once their remove events were read; the
    // worker's hook records them right after the read.
    std::thread::sleep(Duration::from_millis(200));
    kill(first);
    let second = worker_of(sup.0.id(), Some(first), &dir.0);
    std::fs::File::create(&gate).unwrap();
    std::thread::sleep(Duration::from_millis(10));
    kill(second);
    let third = worker_of(sup.0.id(), Some(second), &dir.0);

    let status = c.wait(Duration::from_secs(60), "the client through two worker deaths");
    let mut out = String::new();
    std::io::Read::read_to_string(c.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(c.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{status}: {err}\n{}", log(&dir.0));
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["verified"], (64 * MIB / 4096) as u64, "{r}");
    // 2 regions, 16 pages discarded in each, a run crossing between them.
    assert_eq!(r["balloon_zero"], 32, "{r}");
    assert_eq!(worker_of(sup.0.id(), None, &dir.0), third, "no further restart");
    let log = log(&dir.0);
    assert_eq!(log.matches("the worker died worker=").count(), 2, "{log}");
    assert!(log.contains("resumed=true"), "{log}");
    // The third worker's report (the dead ones wrote none): it served
    // faults, so the second death came mid-pass.
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let text = std::fs::read_to_string(dir.0.join("report.jsonl")).unwrap_or_default();
        if let Some(line) = text.lines().next() {
            assert_eq!(text.lines().count(), 1, "{text}");
            break serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
        assert!(Instant::now() < deadline, "no report\n{log}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(report["end"], "hung up", "{report}");
    assert!(report["faults"].as_u64().unwrap() > 0, "the pass was over before the second kill: {report}");
}

/// A worker that dies whenever it is handed a VM: after the allowed
/// restarts the supervisor ends the client through its pidfd and exits
/// with an error, instead of leaving it blocked.
#[test]
fn a_worker_that_always_dies_ends_the_vm_instead_of_hanging_it() {
    let dir = Dir::new("always");
    let mem = mem_file(&dir.0, 4 * MIB);
    let mut sup =
        supervisor(&dir.0, &mem, &["--crash-worker", "on-vm", "--max-restarts", "3", "--restart-delay-ms", "20"]);
    let mut c = client(&dir.0, &mem, &["--threads", "2"]);
    let status = c.wait(Duration::from_secs(30), "the client of a worker that always dies");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}\n{}", log(&dir.0));
    let status = sup.wait(Duration::from_secs(10), "the supervisor that gave up");
    assert_eq!(status.code(), Some(1), "{status}");
    let log = log(&dir.0);
    assert_eq!(log.matches("the worker died worker=").count(), 4, "{log}");
    assert!(log.contains("gave up, 1 VMs ended"), "{log}");
}

/// A supervisor that dies leaves its worker serving the VMs it has: the
/// client waiting at its gate when the supervisor is killed finishes its
/// restore exactly, and the worker then exits instead of lingering.
#[test]
fn a_worker_whose_supervisor_dies_serves_its_vms_to_the_end_and_exits() {
    let dir = Dir::new("orphan");
    let mem = mem_file(&dir.0, 16 * MIB);
    let mut sup = supervisor(&dir.0, &mem, &[]);
    let worker = worker_of(sup.0.id(), None, &dir.0);
    let gate = dir.0.join("gate");
    let mut c = client(&dir.0, &mem, &["--threads", "2", "--gate", gate.to_str().unwrap()]);
    wait_for(&dir.0.join("gate.ready"), Duration::from_secs(30), &dir.0);
    sup.0.kill().unwrap();
    sup.wait(Duration::from_secs(10), "the killed supervisor");
    std::fs::File::create(&gate).unwrap();
    let status = c.wait(Duration::from_secs(60), "the client of an orphaned worker");
    let mut out = String::new();
    std::io::Read::read_to_string(c.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(status.success(), "{status}\n{}", log(&dir.0));
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["verified"], (16 * MIB / 4096) as u64, "{r}");
    // Gone, or a zombie its new parent has yet to reap.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{worker}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next().unwrap_or('?'));
        if stat.is_empty() || state == Some('Z') {
            break;
        }
        assert!(Instant::now() < deadline, "the orphaned worker is still running: {stat}\n{}", log(&dir.0));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(log(&dir.0).contains("the supervisor is gone"), "{}", log(&dir.0));
}

/// A worker that dies after reading a VM's handshake, before adopting its
/// userfaultfd: the handshake is gone with it, so the next worker gets no
/// handshake and cannot tell whether the peer handed its descriptor over;
/// at the handshake timeout it ends the peer through its pidfd instead of
/// leaving it waiting. The supervisor stays up.
#[test]
fn a_handshake_lost_with_its_worker_ends_the_vm_at_the_timeout() {
    let dir = Dir::new("lost");
    let mem = mem_file(&dir.0, 4 * MIB);
    let mut sup = supervisor(&dir.0, &mem, &["--crash-worker", "on-handshake", "--handshake-timeout-ms", "300"]);
    let mut c = client(&dir.0, &mem, &["--threads", "2"]);
    let status = c.wait(Duration::from_secs(30), "the client whose handshake was lost");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}\n{}", log(&dir.0));
    let log = log(&dir.0);
    assert_eq!(log.matches("the worker died worker=").count(), 1, "{log}");
    assert!(log.contains("no complete handshake within"), "{log}");
    assert!(sup.0.try_wait().unwrap().is_none(), "the supervisor keeps serving\n{log}");
}
