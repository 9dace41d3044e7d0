//! The agent device: a port-I/O doorbell and a mailbox page per vCPU,
//! speaking [`agent_proto`]. It hands out the run's configuration, collects
//! progress and corrupt-page reports, carries out the guest's own offline
//! and balloon requests, and answers anything malformed with an error reply
//! that is counted and reported. It runs on the vCPU thread that rang.
//!
//! A balloon request is a discard: `MADV_DONTNEED` on the guest RAM
//! mapping, as a balloon device does, after which the pages read as zeros
//! until written. It runs here, on the vCPU thread, holding no engine lock:
//! the `madvise` returns only once the engine's event loop has read the
//! remove event it raises, so it must never run on that loop's thread.
//!
//! Memory a device keeps pinned (the checksum ring) is refused to both
//! `Unplug` and the balloon with [`ErrorCode::InUse`]: the device would
//! lose its ring under the guest's feet, as QEMU refuses to discard RAM a
//! VFIO device has pinned and virtio-mem NACKs an unplug of memory in use.
//! The engine keeps the device safe even without this check (an `Unplug`
//! waits for live [`apf::PinGuard`]s), but then every later submission
//! would fail; the guest deserves the answer instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_proto::{
    pass, Config, Counters, ErrorCode, Layout, OfflineOp, Reply, Request, MAX_MESSAGE, PAGE_SIZE, REPLY_OFFSET,
};
use apf::{GuestAddress, GuestRange, Mode, OfflineError};

use crate::mem::{AccessError, GuestAccess};
use crate::report::Errors;

/// How long a mailbox copy or a guest-requested offline may wait.
const DEADLINE: Duration = Duration::from_secs(2);

/// What one vCPU's agent said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuAgent {
    /// Said hello.
    pub hello: bool,
    /// Its counters, once it said done.
    pub done: Option<Counters>,
    /// Passes reported so far.
    pub passes: u64,
    /// When it got its configuration.
    pub started: Option<Instant>,
    /// When it reported its first pass: the touch pass (touch workload) or
    /// the verify of a restored snapshot, whichever came first.
    pub first_pass_at: Option<Instant>,
    /// Pages that first pass covered.
    pub first_pass_pages: u64,
    /// Whether it verified a restored snapshot.
    pub restore_verified: bool,
}

/// Counters of the agent device.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// Requests received (well-formed or not).
    pub requests: AtomicU64,
    /// Requests answered with an error because they were malformed or
    /// out of range.
    pub protocol_errors: AtomicU64,
    /// Offline requests the guest made.
    pub guest_offlines: AtomicU64,
    /// Of those, completed.
    pub guest_offlines_completed: AtomicU64,
    /// Of those, busy at their deadline.
    pub guest_offlines_busy: AtomicU64,
    /// Of those, refused because another offline (a host storm) held part
    /// of the range.
    pub guest_offlines_overlapped: AtomicU64,
    /// Corrupt pages reported.
    pub corrupt_pages: AtomicU64,
    /// Balloon discards carried out.
    pub balloon_discards: AtomicU64,
    /// Pages those discards dropped.
    pub balloon_pages: AtomicU64,
}

/// The agent device.
#[derive(Debug)]
pub struct AgentDevice {
    access: GuestAccess,
    config: Config,
    layout: Layout,
    /// Guest memory devices keep pinned: never unplugged or discarded.
    device_memory: Vec<GuestRange>,
    stop_at: Instant,
    vcpus: Mutex<Vec<VcpuAgent>>,
    stats: AgentStats,
    errors: Arc<Errors>,
}

impl AgentDevice {
    /// A device for a guest run with `config`, asking agents to stop at
    /// `stop_at`. `device_memory` is guest memory that devices keep pinned
    /// (the checksum ring): the guest may neither unplug nor discard it.
    pub fn new(
        access: GuestAccess,
        config: Config,
        layout: Layout,
        device_memory: Vec<GuestRange>,
        stop_at: Instant,
        errors: Arc<Errors>,
    ) -> Self {
        let vcpus = Mutex::new(vec![VcpuAgent::default(); config.vcpus as usize]);
        AgentDevice { access, config, layout, device_memory, stop_at, vcpus, stats: AgentStats::default(), errors }
    }

    /// The device's counters.
    pub fn stats(&self) -> &AgentStats {
        &self.stats
    }

    /// What each vCPU's agent said.
    pub fn vcpus(&self) -> Vec<VcpuAgent> {
        self.vcpus.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// True once every vCPU's agent said done.
    pub fn all_done(&self) -> bool {
        self.vcpus().iter().all(|v| v.done.is_some())
    }

    fn protocol_error(&self, vcpu: u32, what: String) {
        self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
        self.errors.push(format!("vCPU {vcpu}: agent protocol: {what}"));
    }

    /// vCPU `vcpu` rang the doorbell with mailbox frame `pfn`.
    pub fn doorbell(&self, vcpu: u32, pfn: u32) {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let mailbox = u64::from(pfn) * PAGE_SIZE;
        let mut msg = [0u8; MAX_MESSAGE];
        match self.access.read(mailbox, &mut msg, Instant::now() + DEADLINE) {
            Ok(()) => {}
            Err(AccessError::OutsideRam { .. }) => {
                // Nowhere to put a reply: the guest gets none.
                return self.protocol_error(vcpu, format!("mailbox frame {pfn:#x} is outside guest RAM; no reply"));
            }
            Err(e) => return self.protocol_error(vcpu, format!("cannot read mailbox at {mailbox:#x}: {e}")),
        }
        let (seq, reply) = match Request::decode(&msg) {
            Ok((seq, req)) => (seq, self.serve(vcpu, req)),
            Err(e) => {
                self.protocol_error(vcpu, format!("malformed request: {} (value {:#x})", e.code, e.detail));
                (e.seq, Reply::Error { code: e.code, detail: e.detail })
            }
        };
        let mut out = [0u8; MAX_MESSAGE];
        let n = reply.encode(seq, &mut out).unwrap_or(0);
        if let Err(e) = self.access.write(mailbox + REPLY_OFFSET as u64, &out[..n], Instant::now() + DEADLINE) {
            self.errors.push(format!("vCPU {vcpu}: cannot write the agent's reply at {mailbox:#x}: {e}"));
        }
    }

    fn refuse(&self, vcpu: u32, code: ErrorCode, detail: u64, what: String) -> Reply {
        self.protocol_error(vcpu, what);
        Reply::Error { code, detail }
    }

    fn serve(&self, vcpu: u32, req: Request) -> Reply {
        let ack = |value| Reply::Ack { stop: Instant::now() >= self.stop_at, value };
        let mut vcpus = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        let Some(me) = vcpus.get_mut(vcpu as usize) else {
            return Reply::Error { code: ErrorCode::BadValue, detail: vcpu as u64 };
        };
        match req {
            Request::Hello { vcpu: said } if said != vcpu => {
                drop(vcpus);
                self.refuse(
                    vcpu,
                    ErrorCode::BadValue,
                    said as u64,
                    format!("hello from vCPU {vcpu} claims to be {said}"),
                )
            }
            Request::Hello { .. } => {
                me.hello = true;
                me.started = Some(Instant::now());
                Reply::Config(self.config)
            }
            Request::Progress { kind, passes, pages, .. } => {
                me.passes = passes;
                if (kind == pass::TOUCH || kind == pass::RESTORE_VERIFY) && me.first_pass_at.is_none() {
                    me.first_pass_at = Some(Instant::now());
                    me.first_pass_pages = pages;
                }
                if kind == pass::RESTORE_VERIFY {
                    me.restore_verified = true;
                }
                ack(0)
            }
            Request::Corrupt { generation, gpa, word, expected, found, .. } => {
                drop(vcpus);
                self.stats.corrupt_pages.fetch_add(1, Ordering::Relaxed);
                self.errors.push(format!(
                    "vCPU {vcpu}: corrupt page {gpa:#x} (generation {generation}): word {word} is {found:#x}, expected {expected:#x}"
                ));
                ack(0)
            }
            Request::Done { counters, .. } => {
                me.done = Some(counters);
                ack(0)
            }
            Request::Fatal { code, detail, .. } => {
                drop(vcpus);
                self.errors.push(format!("vCPU {vcpu}: the agent gave up (code {code:#x}, detail {detail:#x})"));
                ack(0)
            }
            Request::Offline { op, gpa, len } => {
                drop(vcpus);
                self.offline(vcpu, op, gpa, len)
            }
            Request::Balloon { gpa, len } => {
                drop(vcpus);
                self.balloon(vcpu, gpa, len)
            }
        }
    }

    /// Checks that `[gpa, gpa + len)` is a page-aligned, non-empty range
    /// inside guest RAM; the error reply otherwise.
    fn checked_range(&self, vcpu: u32, what: &str, gpa: u64, len: u64) -> Result<GuestRange, Reply> {
        if gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(self.refuse(
                vcpu,
                ErrorCode::Unaligned,
                gpa,
                format!("{what} of {gpa:#x}+{len:#x} is not page-aligned"),
            ));
        }
        let range = GuestRange::new(GuestAddress(gpa), len);
        let inside = len > 0 && gpa.checked_add(len).is_some_and(|end| end <= self.layout.ram_size);
        if !inside || self.access.ram().check_range(range).is_err() {
            return Err(self.refuse(
                vcpu,
                ErrorCode::OutOfRange,
                gpa,
                format!("{what} of {gpa:#x}+{len:#x} is outside guest RAM"),
            ));
        }
        Ok(range)
    }

    /// Refuses `range` if it overlaps memory a device keeps pinned.
    fn check_not_device_memory(&self, vcpu: u32, what: &str, range: GuestRange) -> Result<(), Reply> {
        match self.device_memory.iter().find(|d| d.overlaps(&range)) {
            Some(d) => Err(self.refuse(
                vcpu,
                ErrorCode::InUse,
                range.start.0,
                format!("{what} of {range} refused: it overlaps {d}, which a device keeps pinned"),
            )),
            None => Ok(()),
        }
    }

    /// A balloon discard of `[gpa, gpa + len)`: data pages only.
    fn balloon(&self, vcpu: u32, gpa: u64, len: u64) -> Reply {
        let ack = |value| Reply::Ack { stop: Instant::now() >= self.stop_at, value };
        let range = match self.checked_range(vcpu, "balloon", gpa, len) {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        if let Err(reply) = self.check_not_device_memory(vcpu, "balloon", range) {
            return reply;
        }
        if gpa < self.layout.data_start {
            return self.refuse(
                vcpu,
                ErrorCode::InUse,
                gpa,
                format!(
                    "balloon of {range} refused: below the data area at {:#x} (page tables, mailboxes, code, stacks)",
                    self.layout.data_start
                ),
            );
        }
        match discard(self.access.ram(), range) {
            Ok(()) => {
                self.stats.balloon_discards.fetch_add(1, Ordering::Relaxed);
                self.stats.balloon_pages.fetch_add(len / PAGE_SIZE, Ordering::Relaxed);
                ack(len / PAGE_SIZE)
            }
            Err(e) => {
                self.errors.push(format!("vCPU {vcpu}: balloon discard of {range} failed: {e}"));
                Reply::Error { code: ErrorCode::Failed, detail: gpa }
            }
        }
    }

    /// A guest-requested offline of `[gpa, gpa + len)`.
    fn offline(&self, vcpu: u32, op: OfflineOp, gpa: u64, len: u64) -> Reply {
        let ack = |value| Reply::Ack { stop: Instant::now() >= self.stop_at, value };
        let what = format!("{op:?}");
        let range = match self.checked_range(vcpu, &what, gpa, len) {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        // Migrate and evict keep contents, and a pin survives them; an
        // unplug would take the ring from the device.
        if op == OfflineOp::Unplug {
            if let Err(reply) = self.check_not_device_memory(vcpu, &what, range) {
                return reply;
            }
        }
        let Some(engine) = self.access.engine() else {
            // Plain memory has nobody to take pages back.
            return Reply::Error { code: ErrorCode::Failed, detail: 0 };
        };
        self.stats.guest_offlines.fetch_add(1, Ordering::Relaxed);
        let result = match op {
            OfflineOp::Migrate => {
                engine.offline(range, Mode::Migrate, Instant::now() + DEADLINE).map(|r| r.pages_taken)
            }
            OfflineOp::Evict => engine.offline(range, Mode::Evict, Instant::now() + DEADLINE).map(|r| r.pages_taken),
            OfflineOp::Unplug => engine.offline(range, Mode::Unplug, Instant::now() + DEADLINE).map(|r| r.pages_taken),
            OfflineOp::Replug => engine.replug(range),
        };
        match result {
            Ok(pages) => {
                self.stats.guest_offlines_completed.fetch_add(1, Ordering::Relaxed);
                ack(pages as u64)
            }
            Err(e) if e.is_busy() => {
                self.stats.guest_offlines_busy.fetch_add(1, Ordering::Relaxed);
                Reply::Error { code: ErrorCode::Busy, detail: gpa }
            }
            // Another offline (a host storm) holds part of the range.
            Err(OfflineError::Overlap(_)) => {
                self.stats.guest_offlines_overlapped.fetch_add(1, Ordering::Relaxed);
                Reply::Error { code: ErrorCode::Busy, detail: gpa }
            }
            Err(e) => {
                self.errors
                    .push(format!("vCPU {vcpu}: guest-requested {op:?} of {range} failed: {}", crate::error_chain(&e)));
                Reply::Error { code: ErrorCode::Failed, detail: gpa }
            }
        }
    }
}

/// Drops the contents of guest `range` (`MADV_DONTNEED` on its mapping,
/// `MADV_REMOVE` on shared memory):
/// afterwards it reads as zeros until written. With the engine, the
/// kernel raises a remove event and `madvise` returns once the engine's
/// event loop has read it; the caller must hold nothing that loop needs.
fn discard(ram: &apf::GuestRam, range: GuestRange) -> std::io::Result<()> {
    let host = ram.host_range(range.start, range.len).map_err(std::io::Error::other)?;
    // On shared memory `MADV_DONTNEED` would only unmap (the page cache
    // keeps the contents): a balloon punches a hole there.
    let advice = if ram.kind().page_cache_is_truth() { libc::MADV_REMOVE } else { libc::MADV_DONTNEED };
    // SAFETY: `host_range` checked that `range` lies inside one region of
    // guest RAM, a mapping `ram` keeps alive; discarding it neither unmaps
    // it nor invalidates any Rust reference, because guest memory is only
    // ever reached through volatile accesses (and the guest writes it
    // concurrently anyway). The pages read as zeros after.
    let rc = unsafe { libc::madvise(host.cast(), range.len as usize, advice) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
