//! The handler: one socket, one memory file, many VMs.
//!
//! One thread polls everything: the listening socket, connections still
//! in their handshake (each with a deadline) and the connections of
//! running VMs (a hang-up ends the VM; bytes after the handshake are a bad
//! peer). A VM whose handshake is good gets its own engine over the
//! adopted userfaultfd ([`apf::Engine::remote`]); VMs share the memory
//! file's mapping, so they share its page cache. A second thread shuts
//! ended VMs' engines down and writes their reports, so a slow shutdown
//! never stalls the others.
//!
//! # Threads
//!
//! Bounded whatever the number of connections: 2 (the poller and the
//! reaper), plus per running VM its engine's event loop and
//! [`Options::config`]'s workers, for at most [`Options::max_vms`] VMs at
//! once: `2 + max_vms * (1 + workers)`. While `max_vms` VMs run, new
//! connections wait in the listen backlog (the socket is not polled), and
//! are served when one ends.
//!
//! # Bad peers
//!
//! A handshake that is malformed, too long, has no descriptor or more than
//! one, a descriptor that is not an initialized userfaultfd, regions the
//! memory file cannot serve, or does not arrive within
//! [`Options::handshake_timeout`] is logged and its connection closed.
//! Where the peer did hand over a userfaultfd, it is waiting on it and
//! would wait for ever (Firecracker keeps its own copy of the descriptor),
//! so the handler ends it with SIGKILL through its pidfd and says so. A
//! peer that sends anything after its handshake is ended the same way.
//! Other VMs are not touched.
//!
//! # Working sets
//!
//! Each VM gets the working set of the memory file replayed into it from
//! the moment its engine starts ([`apf::Engine::replay_with`]: recorded
//! order, 64 KiB windows, demand faults first): the file
//! [`Options::working_set`] names, or else `<mem-file>.ws` beside the
//! memory file when there is one, read anew for each VM (so a set saved by
//! one VM serves the next). The set must be bound to the image the VM
//! maps ([`apf::ImageId`]: the regions' extent and sampled pages of the
//! file at their offsets); a set that is missing (when named), corrupt,
//! truncated, foreign or of another image is logged and in the VM's
//! report, and the VM is served without replay. Positions are the
//! handler's guest addresses, the file offsets of the handshake's regions:
//! sets recorded by this handler, not by an in-process engine whose guest
//! addresses start at 0 (their ids differ, so such a set is refused).
//! With [`Options::save_working_set`], each VM that hangs up writes what
//! its engine recorded there, with the engine's windows as configured
//! (a window's untouched neighbours go in the set: `--max-window 1
//! --fault-around 1` records touched pages only, at one fault a page) (temporary file and rename: VMs ending at once
//! leave one whole set, the last one's).
//!
//! # A source that fails
//!
//! Firecracker's descriptor has no `UFFDIO_POISON`, so a page whose
//! contents cannot be read could only be answered with zeros: silent
//! corruption of the guest. With [`OnLost::Kill`] (the default), the
//! first failed read of the memory file for a VM ends that VM's peer
//! through its pidfd, before the engine can install anything in place of
//! the page (the kill is sent from inside the failing read, and the engine
//! installs zeros only after its retries); a killed process never runs
//! user code again, so it never reads them. [`OnLost::Zeros`] leaves the
//! engine's zero-fill (and its `ZeroFilled` report) in place.
//!
//! The engine's other zero-fills without `POISON` (a page the kernel lost
//! with no remove behind it; every fault once its event loop died) are
//! seen in its error queue at the next poll tick (20 ms), and under
//! [`OnLost::Kill`] end the peer then: within that window the guest may
//! read those zeros.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apf::{
    Engine, GuestAddress, GuestRange, PageSource, RemoteMemory, RemoteRegion, SnapshotFile, SourceError, SourceKind,
};
use thiserror::Error;
use tracing_subscriber::prelude::*;

use crate::handshake::{self, HandshakeError, Region};
use crate::peer::{self, Peer};
use crate::report::{End, Timeline, VmReport, WorkingSetUse};
use crate::supervise::RemovedPages;

/// Errors starting the handler.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The memory file cannot be opened or mapped.
    #[error("memory file {path}")]
    MemFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: SourceError,
    },
    /// The socket cannot be bound.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket's path.
        path: PathBuf,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// An option is out of range.
    #[error("invalid option: {0}")]
    Option(&'static str),
    /// The working set named cannot be read.
    #[error("working set {path}")]
    WorkingSet {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What to do when a page's contents cannot be read (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnLost {
    /// End the peer through its pidfd before anything is installed.
    #[default]
    Kill,
    /// Let the engine install zeros and report it.
    Zeros,
}

impl std::str::FromStr for OnLost {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kill" => Ok(OnLost::Kill),
            "zeros" => Ok(OnLost::Zeros),
            other => Err(format!("unknown policy {other:?} (expected kill or zeros)")),
        }
    }
}

/// The handler's options.
#[derive(Debug, Clone)]
pub struct Options {
    /// The socket to listen on (replaced if it exists).
    pub socket: PathBuf,
    /// The memory snapshot file every VM of this socket restores.
    pub mem_file: PathBuf,
    /// Each VM's engine configuration (the backend is the descriptor's).
    pub config: apf::Config,
    /// How long a peer has to send its handshake.
    pub handshake_timeout: Duration,
    /// Most VMs served at once (see the module doc on threads).
    pub max_vms: usize,
    /// Where to append each VM's report, one JSON line each.
    pub report: Option<PathBuf>,
    /// Where to write each VM's Chrome trace and latency plot.
    pub trace_dir: Option<PathBuf>,
    /// What a failed read of the memory file does.
    pub on_lost: OnLost,
    /// Test seam: reads of the memory file covering this offset fail.
    pub fail_at: Option<u64>,
    /// The working set replayed into each VM; None: `<mem-file>.ws` when
    /// it exists (see the module doc).
    pub working_set: Option<PathBuf>,
    /// No working set replayed, not even `<mem-file>.ws`.
    pub no_working_set: bool,
    /// Fill every page still missing after the set.
    pub replay_eager: bool,
    /// Record each VM's first touches and write them here when it hangs up.
    pub save_working_set: Option<PathBuf>,
    /// Test seam: when a supervised worker dies (SIGKILL, for every VM).
    pub crash: Option<Crash>,
}

impl Options {
    /// Defaults for `socket` and `mem_file`: the engine's defaults (two
    /// workers per VM: in-order restores of two threads ran 1.1-1.7x faster
    /// than with one here), a 5 s handshake timeout, 32 VMs.
    pub fn new(socket: impl Into<PathBuf>, mem_file: impl Into<PathBuf>) -> Options {
        Options {
            socket: socket.into(),
            mem_file: mem_file.into(),
            config: apf::Config::default(),
            handshake_timeout: Duration::from_secs(5),
            max_vms: 32,
            report: None,
            trace_dir: None,
            on_lost: OnLost::Kill,
            fail_at: None,
            working_set: None,
            no_working_set: false,
            replay_eager: false,
            save_working_set: None,
            crash: None,
        }
    }
}

/// Poll timeout: deadlines and engine errors are looked at this often.
const TICK: Duration = Duration::from_millis(20);

/// The memory file as one VM's source: reads at guest address = file
/// offset, through the shared mapping; a failed read ends the peer under
/// [`OnLost::Kill`].
struct VmSource {
    file: Arc<SnapshotFile>,
    peer: Arc<Peer>,
    on_lost: OnLost,
    fail_at: Option<u64>,
    killed: Arc<AtomicBool>,
}

impl VmSource {
    fn injected(&self, gpa: GuestAddress, len: usize) -> bool {
        self.fail_at.is_some_and(|at| (gpa.0..gpa.0 + len as u64).contains(&at))
    }
}

impl PageSource for VmSource {
    fn fill(&self, gpa: GuestAddress, buf: &mut [u8]) -> Result<(), SourceError> {
        let res = if self.injected(gpa, buf.len()) {
            Err(SourceError::Io { gpa, len: buf.len(), source: io::Error::other("injected failure (--fail-at)") })
        } else {
            self.file.fill(gpa, buf)
        };
        if let Err(e) = &res {
            if self.on_lost == OnLost::Kill && !self.killed.swap(true, Ordering::AcqRel) {
                tracing::error!(target: "apf_handler", pid = self.peer.pid, error = %e, "memory file read failed: ending the peer");
                if let Err(k) = self.peer.kill() {
                    tracing::error!(target: "apf_handler", pid = self.peer.pid, error = %k, "cannot end the peer");
                }
            }
        }
        res
    }

    fn resident(&self, gpa: GuestAddress, len: usize) -> Option<*const u8> {
        if self.injected(gpa, len) {
            return None;
        }
        self.file.resident(gpa, len)
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Memory
    }

    fn name(&self) -> &'static str {
        "memory-file"
    }
}

/// A connection in its handshake.
struct Pending {
    vm: u64,
    conn: UnixStream,
    peer: Peer,
    since: Instant,
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
    fds_truncated: bool,
    /// The VM's removed-pages set (supervised workers only).
    removed: Option<RemovedPages>,
    /// Handed over by the supervisor after a worker died: the peer may
    /// have given its userfaultfd to the dead worker.
    resumed: bool,
}

/// A running VM.
struct Live {
    vm: u64,
    conn: UnixStream,
    peer: Arc<Peer>,
    since: Instant,
    engine: Engine,
    latency: apf::LatencyLayer,
    timeline: Timeline,
    memory_bytes: u64,
    killed: Arc<AtomicBool>,
    /// What the engine reported while it ran (the first 64).
    errors: Vec<String>,
    /// The working set replayed into it.
    working_set: WorkingSetUse,
    /// That set itself, kept when this VM's recording is saved.
    replayed: Option<apf::WorkingSet>,
}

/// Counters of the handler as a whole (for tests and logs).
#[derive(Debug, Default)]
pub struct Counters {
    /// VMs served (handshake accepted).
    pub vms: AtomicUsize,
    /// Connections refused at the handshake.
    pub refused: AtomicUsize,
    /// Peers ended through their pidfd.
    pub killed: AtomicUsize,
    /// Reports written.
    pub reports: AtomicUsize,
}

/// Where VMs come from.
#[derive(Debug)]
enum Intake {
    /// Connections accepted on the socket.
    Listen(UnixListener),
    /// VMs handed over by the supervisor (see [`crate::supervise`]).
    Supervised(Arc<UnixStream>),
}

/// A handler bound to its socket.
#[derive(Debug)]
pub struct Server {
    opts: Options,
    /// The socket, or the supervisor's pair (a supervised worker).
    intake: Intake,
    file: Arc<SnapshotFile>,
    file_len: u64,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for VmSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmSource").field("pid", &self.peer.pid).finish_non_exhaustive()
    }
}

impl Server {
    /// Opens the memory file and listens on the socket.
    pub fn bind(opts: Options) -> Result<Server, ServerError> {
        let listener = listen_at(&opts.socket)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| ServerError::Listen { path: opts.socket.clone(), source })?;
        Server::open(opts, Intake::Listen(listener))
    }

    /// A supervised worker: VMs come from the supervisor's pair `ctl`
    /// instead of a socket (see [`crate::supervise`]).
    pub fn worker(opts: Options, ctl: UnixStream) -> Result<Server, ServerError> {
        Server::open(opts, Intake::Supervised(Arc::new(ctl)))
    }

    fn open(mut opts: Options, intake: Intake) -> Result<Server, ServerError> {
        opts.config.record_working_set |= opts.save_working_set.is_some();
        if opts.max_vms == 0 {
            return Err(ServerError::Option("max_vms must be at least 1"));
        }
        if opts.no_working_set && (opts.working_set.is_some() || opts.replay_eager) {
            return Err(ServerError::Option("no working set, yet one is named or its eager fill asked for"));
        }
        if let Some(ws) = &opts.working_set {
            // A named set that cannot even be opened is a mistake to say
            // now; its binding to each VM's image is judged per VM.
            std::fs::metadata(ws).map_err(|source| ServerError::WorkingSet { path: ws.clone(), source })?;
        }
        if opts.save_working_set.as_ref().is_some_and(|p| *p == opts.mem_file || *p == opts.socket) {
            return Err(ServerError::Option("the working set would be saved over the memory file or the socket"));
        }
        let mem_err = |source| ServerError::MemFile { path: opts.mem_file.clone(), source };
        // Whole pages only: a partial last page cannot be installed.
        let file_len = std::fs::metadata(&opts.mem_file)
            .map_err(|source| mem_err(SourceError::Open { path: opts.mem_file.clone(), source }))?
            .len()
            / apf::PAGE_SIZE as u64
            * apf::PAGE_SIZE as u64;
        let layout = if file_len == 0 { vec![] } else { vec![(GuestRange::new(GuestAddress(0), file_len), 0)] };
        let file = Arc::new(SnapshotFile::with_layout(&opts.mem_file, layout).map_err(mem_err)?);
        Ok(Server { opts, intake, file, file_len, stop: Arc::default(), counters: Arc::default() })
    }

    /// Set to stop [`Server::run`] (it ends every VM and returns).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The handler's counters.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// Serves until the stop flag is set.
    pub fn run(self) {
        let (reap_tx, reap_rx) = crossbeam_channel::bounded::<(Live, End)>(self.opts.max_vms);
        let active = Arc::new(AtomicUsize::new(0));
        let reaper = {
            let opts = self.opts.clone();
            let active = active.clone();
            let counters = self.counters.clone();
            let ctl = self.ctl().cloned();
            std::thread::Builder::new()
                .name("apf-handler-reap".into())
                .spawn(move || {
                    for (live, end) in reap_rx {
                        let vm = live.vm;
                        finish(&opts, live, end, &counters);
                        if let Some(ctl) = &ctl {
                            tell_ended(ctl, vm);
                        }
                        active.fetch_sub(1, Ordering::AcqRel);
                    }
                })
                .expect("cannot start the reaper thread")
        };
        let mut pending: Vec<Pending> = Vec::new();
        // A supervised worker whose supervisor died takes no new VMs and
        // serves the ones it has until they end.
        let mut orphaned = false;
        let mut live: Vec<Live> = Vec::new();
        let mut next_vm = 0u64;
        let mut buf = vec![0u8; handshake::MAX_MESSAGE.max(crate::supervise::MAX_CONTROL) + 1];
        while !(self.stop.load(Ordering::Acquire) || orphaned && live.is_empty() && pending.is_empty()) {
            // A supervisor bounds its VMs itself, and has handed them over.
            let accepting = matches!(self.intake, Intake::Supervised(_))
                || active.load(Ordering::Acquire) + pending.len() < self.opts.max_vms;
            let mut fds = Vec::with_capacity(1 + pending.len() + live.len());
            let intake_fd = match &self.intake {
                Intake::Listen(l) => l.as_raw_fd(),
                Intake::Supervised(ctl) => ctl.as_raw_fd(),
            };
            // poll skips a negative descriptor: a hung-up pair would
            // report POLLHUP at every call.
            fds.push(pollfd(if orphaned { -1 } else { intake_fd }, if accepting { libc::POLLIN } else { 0 }));
            fds.extend(pending.iter().map(|p| pollfd(p.conn.as_raw_fd(), libc::POLLIN)));
            fds.extend(live.iter().map(|l| pollfd(l.conn.as_raw_fd(), libc::POLLIN | libc::POLLRDHUP)));
            // SAFETY: poll reads and writes `fds`, a live Vec of pollfds of
            // exactly the length given.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, TICK.as_millis() as i32) };

            // Running VMs first: hang-ups, bytes after the handshake, and
            // what their engines reported.
            let live_ready: Vec<bool> = fds[1 + pending.len()..].iter().map(|f| f.revents != 0).collect();
            let mut ended = Vec::new();
            for (i, l) in live.iter_mut().enumerate() {
                if let Some(end) = self.check_live(l, live_ready[i], &mut buf) {
                    ended.push((i, end));
                }
            }
            for (i, end) in ended.into_iter().rev() {
                let l = live.swap_remove(i);
                let _ = reap_tx.send((l, end));
            }

            // Handshakes: read what arrived, judge what is complete or late.
            let ready: Vec<bool> = fds[1..1 + pending.len()].iter().map(|f| f.revents != 0).collect();
            let mut i = pending.len();
            while i > 0 {
                i -= 1;
                let p = &mut pending[i];
                let hung_up = ready[i] && read_handshake(p, &mut buf);
                let late = p.since.elapsed() >= self.opts.handshake_timeout;
                if !(hung_up || late || !handshake::incomplete(&p.bytes) || p.bytes.len() > handshake::MAX_MESSAGE) {
                    continue;
                }
                let p = pending.swap_remove(i);
                if self.opts.crash == Some(Crash::OnHandshake) && self.ctl().is_some() && !p.bytes.is_empty() {
                    die(p.vm, "on-handshake");
                }
                match self.start_vm(p, hung_up, late) {
                    Ok(l) => {
                        active.fetch_add(1, Ordering::AcqRel);
                        self.counters.vms.fetch_add(1, Ordering::Relaxed);
                        live.push(l);
                    }
                    Err(vm) => {
                        self.counters.refused.fetch_add(1, Ordering::Relaxed);
                        if let Some(ctl) = self.ctl() {
                            tell_ended(ctl, vm);
                        }
                    }
                }
            }

            if let (Intake::Supervised(ctl), true) = (&self.intake, fds[0].revents != 0) {
                if !orphaned && !self.take_handed(ctl, &mut pending, &mut buf) {
                    tracing::error!(target: "apf_handler", vms = live.len() + pending.len(), "the supervisor is gone: serving the VMs there are until they end");
                    orphaned = true;
                }
            }
            let Intake::Listen(listener) = &self.intake else { continue };
            if accepting && fds[0].revents & libc::POLLIN != 0 {
                while active.load(Ordering::Acquire) + pending.len() < self.opts.max_vms {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            // Who it is, first: the pidfd is exact, and the
                            // pid fallback is least racy now.
                            let peer = Peer::of(&conn);
                            if peer.racy {
                                tracing::warn!(target: "apf_handler", pid = peer.pid, "no SO_PEERPIDFD: the peer's pidfd comes from its pid (racy)");
                            }
                            let vm = next_vm;
                            next_vm += 1;
                            tracing::info!(target: "apf_handler", vm, pid = peer.pid, "connection");
                            pending.push(Pending {
                                vm,
                                conn,
                                peer,
                                since: Instant::now(),
                                bytes: Vec::new(),
                                fds: Vec::new(),
                                fds_truncated: false,
                                removed: None,
                                resumed: false,
                            });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            tracing::error!(target: "apf_handler", error = %e, "accept failed");
                            break;
                        }
                    }
                }
            }
        }
        for l in live {
            let _ = reap_tx.send((l, End::Shutdown));
        }
        drop(reap_tx);
        let _ = reaper.join();
        if let Intake::Listen(_) = self.intake {
            let _ = std::fs::remove_file(&self.opts.socket);
        }
    }

    fn ctl(&self) -> Option<&Arc<UnixStream>> {
        match &self.intake {
            Intake::Supervised(ctl) => Some(ctl),
            Intake::Listen(_) => None,
        }
    }

    /// Takes the VMs the supervisor handed over; false once it is gone.
    fn take_handed(&self, ctl: &UnixStream, pending: &mut Vec<Pending>, buf: &mut [u8]) -> bool {
        loop {
            let msg = match crate::supervise::recv_control(ctl, buf) {
                Ok(Some(m)) => m,
                Ok(None) => return true,
                Err(e) => {
                    tracing::error!(target: "apf_handler", error = %e, "the supervisor's pair");
                    return false;
                }
            };
            let Some(vm) = msg.header["vm"].as_u64() else {
                tracing::error!(target: "apf_handler", header = %msg.header, "a message of the supervisor without a VM");
                continue;
            };
            if self.opts.crash == Some(Crash::OnVm) {
                die(vm, "on-vm");
            }
            let resumed = msg.header["resumed"].as_bool() == Some(true);
            let mut fds = msg.fds.into_iter();
            let (Some(conn), Some(set)) = (fds.next(), fds.next()) else {
                tracing::error!(target: "apf_handler", vm, "the supervisor handed a VM without its descriptors");
                continue;
            };
            let conn = UnixStream::from(conn);
            let peer = Peer::of(&conn);
            let removed = match RemovedPages::map(&set, self.file_len / apf::PAGE_SIZE as u64) {
                Ok(r) => r,
                Err(e) => {
                    // Served without it, this VM's removes would not
                    // survive a restart: end it rather than risk stale pages.
                    self.kill(vm, &peer, &format!("cannot map its removed-pages set: {e}"));
                    tell_ended(ctl, vm);
                    continue;
                }
            };
            if let Err(e) = conn.set_nonblocking(true) {
                tracing::warn!(target: "apf_handler", vm, error = %e, "cannot make the connection non-blocking");
            }
            tracing::info!(target: "apf_handler", vm, pid = peer.pid, resumed, "handed over by the supervisor");
            pending.push(Pending {
                vm,
                conn,
                peer,
                since: Instant::now(),
                bytes: msg.bytes,
                fds: fds.collect(),
                fds_truncated: false,
                removed: Some(removed),
                resumed,
            });
        }
    }

    /// Whether a running VM has ended, and why.
    fn check_live(&self, l: &mut Live, readable: bool, buf: &mut [u8]) -> Option<End> {
        if l.killed.load(Ordering::Acquire) {
            self.counters.killed.fetch_add(1, Ordering::Relaxed);
            return Some(End::Killed("its memory file read failed".into()));
        }
        if readable {
            match peer::recv(&l.conn, buf) {
                Ok(r) if r.len == 0 && r.fds.is_empty() => return Some(End::HungUp),
                Ok(_) => {
                    let why = "it sent a second message after its handshake";
                    return Some(self.kill(l.vm, &l.peer, why));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Some(End::HungUp),
            }
        }
        // ESRCH from any ioctl: the peer's address space is gone.
        let mut esrch = false;
        let mut lost = None;
        let mut dry = None;
        for e in l.engine.errors().try_iter() {
            tracing::warn!(target: "apf_handler", vm = l.vm, error = %e, "engine error");
            esrch |= matches!(e, apf::FaultError::Install { error, .. } if error.errno == libc::ESRCH);
            // Zeros where contents were lost (a page the kernel lost, or
            // every fault once the event loop died): the guest may read
            // them until this tick. Under `OnLost::Kill` it goes no further.
            if matches!(e, apf::FaultError::ZeroFilled { .. } | apf::FaultError::EventLoopDied(_)) {
                lost.get_or_insert_with(|| e.to_string());
            }
            // A fault nothing could be installed for (its huge-page pool
            // ran dry; zeros need a page too): its vCPU would fault again
            // and again until the pool has a page.
            if let apf::FaultError::LeftMissing { why, .. } = &e {
                dry.get_or_insert_with(|| format!("{e}: {why}"));
            }
            if l.errors.len() < 64 {
                l.errors.push(e.to_string());
            }
        }
        if let (Some(why), OnLost::Kill) = (lost, self.opts.on_lost) {
            return Some(self.kill(l.vm, &l.peer, &format!("its memory was zero-filled: {why}")));
        }
        if let Some(why) = dry {
            return Some(self.kill(l.vm, &l.peer, &format!("a fault of it could not be served: {why}")));
        }
        esrch.then_some(End::Esrch)
    }

    fn kill(&self, vm: u64, peer: &Peer, why: &str) -> End {
        match peer.kill() {
            Ok(true) => {
                self.counters.killed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(target: "apf_handler", vm, pid = peer.pid, why, "bad peer: ended it through its pidfd");
            }
            Ok(false) => {
                tracing::error!(target: "apf_handler", vm, pid = peer.pid, why, "bad peer: no pidfd to end it by")
            }
            Err(e) => {
                tracing::error!(target: "apf_handler", vm, pid = peer.pid, why, error = %e, "bad peer: ending it failed")
            }
        }
        End::Killed(why.to_string())
    }

    /// Judges a handshake and starts its VM; on refusal, logs why and ends
    /// the peer if it handed over a userfaultfd.
    fn start_vm(&self, mut p: Pending, hung_up: bool, late: bool) -> Result<Live, u64> {
        let vm = p.vm;
        let refuse = |p: &Pending, why: String| {
            // A resumed peer may have handed its userfaultfd to the dead
            // worker: it would wait on it for ever.
            let uffd = p.resumed || p.fds.iter().any(peer::is_userfaultfd);
            tracing::error!(target: "apf_handler", vm = p.vm, pid = p.peer.pid, why = %why, "handshake refused");
            if uffd {
                self.kill(p.vm, &p.peer, &format!("handshake refused ({why}) after it handed over a userfaultfd"));
            }
        };
        if late && handshake::incomplete(&p.bytes) {
            refuse(&p, format!("no complete handshake within {:?}", self.opts.handshake_timeout));
            return Err(vm);
        }
        let regions = match handshake::parse(&p.bytes, self.file_len) {
            Ok(r) => r,
            Err(e @ HandshakeError::Json(_)) if hung_up && p.bytes.is_empty() => {
                refuse(&p, format!("hung up before its handshake ({e})"));
                return Err(vm);
            }
            Err(e) => {
                refuse(&p, e.to_string());
                return Err(vm);
            }
        };
        if p.fds.len() != 1 || p.fds_truncated {
            let n = if p.fds_truncated { format!("more than {}", p.fds.len()) } else { p.fds.len().to_string() };
            refuse(&p, format!("the handshake came with {n} descriptors (one userfaultfd expected)"));
            return Err(vm);
        }
        let fd = p.fds.pop().expect("one descriptor");
        if !peer::is_userfaultfd(&fd) {
            refuse(&p, "its descriptor is not a userfaultfd".into());
            return Err(vm);
        }
        // The supervisor keeps a copy, for the next worker if this one dies.
        let uffd_copy = if self.ctl().is_some() { fd.try_clone().ok() } else { None };
        let remote: Vec<RemoteRegion> = regions.iter().map(remote_region).collect();
        let peer = Arc::new(p.peer);
        // Its pid: on huge pages, its page map tells a dry pool from a
        // page that is there.
        // Named only for huge pages, which need its page map: a 4 KiB peer
        // the handler may not trace is served as before.
        let huge = regions.iter().any(|r| r.page_size > 4096);
        let owner = u32::try_from(peer.pid).ok().filter(|&pid| pid > 0 && huge);
        let adopted = RemoteMemory::adopt(fd, &remote).and_then(|m| match owner {
            Some(pid) => m.with_owner(pid),
            None => Ok(m),
        });
        let mem = match adopted {
            Ok(m) => m,
            Err(e) => {
                // The descriptor was a userfaultfd: the peer waits on it.
                let why = format!("cannot serve it: {e}");
                tracing::error!(target: "apf_handler", vm = p.vm, why = %why, "handshake refused");
                self.kill(p.vm, &peer, &why);
                return Err(vm);
            }
        };
        let killed = Arc::new(AtomicBool::new(false));
        let source = Arc::new(VmSource {
            file: self.file.clone(),
            peer: peer.clone(),
            on_lost: self.opts.on_lost,
            fail_at: self.opts.fail_at,
            killed: killed.clone(),
        });
        let latency = if self.opts.trace_dir.is_some() {
            apf::LatencyLayer::with_trace(1 << 16)
        } else {
            apf::LatencyLayer::new()
        };
        let timeline = Timeline::default();
        // The engine's threads take the dispatcher current when they start:
        // each VM's spans go to its own layers.
        let dispatch =
            tracing::Dispatch::new(tracing_subscriber::registry().with(latency.clone()).with(timeline.clone()));
        let features = mem.features();
        let removed = p.removed.take().map(Arc::new);
        if let Some(set) = &removed {
            // Removes an earlier worker read: those pages read zeros.
            // A run of removed pages may cross from one region into the
            // next (regions are adjacent in the file): one region at a time.
            let pieces = set.ranges().into_iter().flat_map(|range| {
                regions.iter().filter_map(move |r| {
                    let (lo, hi) = (range.start.0.max(r.offset), range.end().min(r.offset + r.size));
                    (lo < hi).then(|| GuestRange::new(GuestAddress(lo), hi - lo))
                })
            });
            for range in pieces {
                if let Err(e) = mem.mark_removed(range) {
                    tracing::warn!(target: "apf_handler", vm = p.vm, error = %e, "a removed range outside the regions");
                }
            }
        }
        let started = tracing::dispatcher::with_default(&dispatch, || {
            let mut b = Engine::remote(mem, source).config(self.opts.config.clone());
            if let Some(set) = removed {
                b = b.on_remove(move |range| set.record(range));
            }
            b.start()
        });
        let engine = match started {
            Ok(e) => e,
            Err(e) => {
                let why = format!("cannot start its engine: {e}");
                tracing::error!(target: "apf_handler", vm = p.vm, why = %why, "handshake refused");
                self.kill(p.vm, &peer, &why);
                return Err(vm);
            }
        };
        if let (Some(ctl), Some(uffd)) = (self.ctl(), uffd_copy) {
            let header = serde_json::json!({ "vm": p.vm, "adopted": true });
            if let Err(e) = crate::supervise::send_control(ctl, &header, &p.bytes, &[uffd.as_raw_fd()]) {
                tracing::warn!(target: "apf_handler", vm = p.vm, error = %e, "cannot tell the supervisor the VM is adopted");
            }
        }
        let memory_bytes = regions.iter().map(|r| r.size).sum();
        let (working_set, replayed) = self.replay(p.vm, &engine);
        tracing::info!(target: "apf_handler", vm = p.vm, pid = peer.pid, regions = regions.len(), memory_bytes, %features, "serving");
        Ok(Live {
            vm: p.vm,
            conn: p.conn,
            peer,
            since: p.since,
            engine,
            latency,
            timeline,
            memory_bytes,
            killed,
            errors: Vec::new(),
            working_set,
            replayed,
        })
    }

    /// The working set this VM's engine replays: the one named, or
    /// `<mem-file>.ws` if it exists. Whatever goes wrong is logged and
    /// reported; the VM is served on demand alone.
    fn replay(&self, vm: u64, engine: &Engine) -> (WorkingSetUse, Option<apf::WorkingSet>) {
        let mut used = WorkingSetUse::default();
        if self.opts.no_working_set {
            return (used, None);
        }
        let path = match &self.opts.working_set {
            Some(p) => p.clone(),
            None => {
                let beside = beside(&self.opts.mem_file);
                if !beside.exists() {
                    return (used, None);
                }
                beside
            }
        };
        used.file = Some(path.display().to_string());
        let loaded = engine
            .image_id()
            .map_err(|e| format!("reading the image to identify it: {}", chain(&e)))
            .and_then(|id| apf::WorkingSet::load(&path, id).map_err(|e| chain(&e)));
        let options = apf::ReplayOptions { eager: self.opts.replay_eager, ..apf::ReplayOptions::default() };
        match loaded.and_then(|ws| engine.replay_with(&ws, options).map(|()| ws).map_err(|e| chain(&e))) {
            Ok(ws) => {
                used.pages = ws.pages.len() as u64;
                tracing::info!(target: "apf_handler", vm, pages = used.pages, file = %path.display(), "replaying the working set");
                // Kept only if this VM's recording is saved (see `finish`).
                let keep = self.opts.save_working_set.is_some();
                (used, keep.then_some(ws))
            }
            Err(e) => {
                tracing::warn!(target: "apf_handler", vm, file = %path.display(), error = %e, "working set not replayed");
                used.error = Some(e);
                (used, None)
            }
        }
    }
}

/// Where the handler looks for a memory file's working set when none is
/// named: `<mem-file>.ws`.
pub fn beside(mem_file: &Path) -> PathBuf {
    let mut p = mem_file.as_os_str().to_owned();
    p.push(".ws");
    PathBuf::from(p)
}

/// An error with its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s += &format!(": {c}");
        cause = c.source();
    }
    s
}

/// Listens on a Unix socket at `path`, replacing what is there. The path
/// appears only once the socket listens (bound under a temporary name,
/// then renamed): a peer that sees it never meets `ECONNREFUSED`, which
/// it would between a `bind` and its `listen`.
pub fn listen_at(path: &Path) -> io::Result<UnixListener> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(listener)
}

/// Test seam: when a supervised worker dies ([`Options::crash`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// As soon as it is handed a VM.
    OnVm,
    /// Once it has read a VM's handshake, before adopting it.
    OnHandshake,
}

impl std::str::FromStr for Crash {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on-vm" => Ok(Crash::OnVm),
            "on-handshake" => Ok(Crash::OnHandshake),
            other => Err(format!("unknown crash point {other:?} (expected on-vm or on-handshake)")),
        }
    }
}

/// The worker dies at a test seam: SIGKILL rather than abort (no core
/// file, no unwinding), as a worker killed from outside would.
fn die(vm: u64, at: &str) {
    tracing::error!(target: "apf_handler", vm, at, "--crash-worker: dying");
    // SAFETY: raise takes a signal number; this process ends.
    unsafe { libc::raise(libc::SIGKILL) };
}

/// Tells the supervisor a VM ended (it drops its copies).
fn tell_ended(ctl: &UnixStream, vm: u64) {
    if let Err(e) = crate::supervise::send_control(ctl, &serde_json::json!({ "vm": vm, "ended": true }), &[], &[]) {
        tracing::warn!(target: "apf_handler", vm, error = %e, "cannot tell the supervisor the VM ended");
    }
}

fn remote_region(r: &Region) -> RemoteRegion {
    RemoteRegion { host: r.base_host_virt_addr, len: r.size, gpa: GuestAddress(r.offset), page_size: r.page_size }
}

fn pollfd(fd: i32, events: i16) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

/// Reads what a handshaking peer sent; true if it hung up.
fn read_handshake(p: &mut Pending, buf: &mut [u8]) -> bool {
    loop {
        match peer::recv(&p.conn, buf) {
            Ok(r) => {
                p.fds_truncated |= r.fds_truncated;
                p.fds.extend(r.fds);
                if r.len == 0 {
                    return true;
                }
                p.bytes.extend_from_slice(&buf[..r.len]);
                if p.bytes.len() > handshake::MAX_MESSAGE {
                    return false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Stops a VM's engine and writes its report.
fn finish(opts: &Options, live: Live, end: End, counters: &Counters) {
    let Live {
        vm,
        peer,
        since,
        engine,
        latency,
        timeline,
        memory_bytes,
        conn,
        errors: live_errors,
        mut working_set,
        replayed,
        ..
    } = live;
    // Counters once the windows in flight (and the replay) are done (a
    // dead peer's fail with ESRCH at once).
    engine.wait_idle(Instant::now() + Duration::from_secs(1));
    // Only a VM that ran to its end leaves its working set: one ended
    // early would leave a part of it.
    if let (Some(path), End::HungUp) = (&opts.save_working_set, &end) {
        // Pages the replay installed never faulted: the set replayed comes
        // first, so the saved set does not shrink from VM to VM.
        let recorded = engine.working_set();
        let ws = replayed.map_or(recorded.clone(), |r| r.then(&recorded));
        match engine.image_id().map_err(|e| chain(&e)).and_then(|id| ws.save(path, id).map_err(|e| chain(&e))) {
            Ok(()) => {
                working_set.saved = Some(path.display().to_string());
                working_set.saved_pages = ws.pages.len() as u64;
            }
            Err(e) => {
                tracing::error!(target: "apf_handler", vm, file = %path.display(), error = %e, "working set not saved");
                working_set.save_error = Some(e);
            }
        }
    }
    let stats = engine.stats();
    let mut errors = live_errors;
    errors.extend(engine.errors().try_iter().map(|e| e.to_string()));
    errors.truncate(64);
    let shutdown = engine.shutdown();
    if shutdown.threads_left_behind > 0 {
        tracing::error!(target: "apf_handler", vm, left = shutdown.threads_left_behind, "engine threads left behind");
    }
    let (first_fault, second_fault, last_fault) = timeline.since(since);
    let report = VmReport {
        vm,
        pid: peer.pid,
        end,
        memory_bytes,
        stats,
        fault_latency: latency.summary().span(apf::span::FAULT).cloned(),
        first_fault,
        second_fault,
        last_fault,
        errors,
        working_set,
    };
    drop(conn);
    let line = report.to_json().to_string();
    tracing::info!(target: "apf_handler", vm, report = %line, "VM ended");
    if let Some(path) = &opts.report {
        if let Err(e) = append_line(path, &line) {
            tracing::error!(target: "apf_handler", vm, error = %e, "cannot write the report");
        }
    }
    if let Some(dir) = &opts.trace_dir {
        if let Err(e) = write_traces(dir, vm, &latency) {
            tracing::error!(target: "apf_handler", vm, error = %e, "cannot write the trace");
        }
    }
    counters.reports.fetch_add(1, Ordering::Relaxed);
}

/// Reports are appended by one thread (the reaper) at a time; the lock
/// keeps in-process users of several servers from interleaving lines.
static REPORT_LOCK: Mutex<()> = Mutex::new(());

fn append_line(path: &Path, line: &str) -> io::Result<()> {
    let _g = REPORT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut f = File::options().create(true).append(true).open(path)?;
    writeln!(f, "{line}")
}

fn write_traces(dir: &Path, vm: u64, latency: &apf::LatencyLayer) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    latency.write_chrome_trace(io::BufWriter::new(File::create(dir.join(format!("vm-{vm}.trace.json")))?))?;
    let svg = apf::latency_plot(&format!("VM {vm}: fault latency"), &latency.curves());
    std::fs::write(dir.join(format!("vm-{vm}.svg")), svg)
}
