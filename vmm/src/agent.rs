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

use agent_proto::timing::{phase, Histogram, HIST_CHUNK};
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
    /// The first-access timings of each phase it closed, in order.
    pub timings: Vec<PhaseTiming>,
    /// The phase whose histogram pieces are arriving, and the histogram
    /// so far.
    building: Option<(u32, Histogram)>,
}

/// One phase's first-access timings, as a vCPU's agent sent them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseTiming {
    /// Which phase ([`phase`]).
    pub phase: u32,
    /// Cycles of each first access (exact maximum included).
    pub cycles: Histogram,
    /// The guest's time-stamp counter at the phase's start and end.
    pub tsc: (u64, u64),
    /// Host time at the phase's start (the hello, or the previous
    /// phase's end) and at its end (its close arrived).
    pub host: (Option<Instant>, Instant),
    /// Faults the engine had read for this vCPU by the phase's end, all
    /// phases so far (None without the latency layer).
    pub faults_by_end: Option<u64>,
}

/// Faults the engine has read for a vCPU so far (the latency layer's
/// per-vCPU count).
#[derive(Clone)]
pub struct FaultCount(pub Arc<dyn Fn(u32) -> Option<u64> + Send + Sync>);

impl std::fmt::Debug for FaultCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FaultCount")
    }
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
    fault_count: Option<FaultCount>,
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
        AgentDevice {
            access,
            config,
            layout,
            device_memory,
            stop_at,
            vcpus,
            stats: AgentStats::default(),
            errors,
            fault_count: None,
        }
    }

    /// Records with each phase's timings the faults `count` says the
    /// engine had read for the vCPU by the phase's end.
    pub fn with_fault_count(mut self, count: FaultCount) -> Self {
        self.fault_count = Some(count);
        self
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
        // Read before the lock: the count takes the latency layer's locks.
        let faults_by_end = match req {
            Request::Timed { .. } => self.fault_count.as_ref().and_then(|c| (c.0)(vcpu)),
            _ => None,
        };
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
            Request::Histogram { phase, first, counts, .. } => match me.add_piece(phase, first, &counts) {
                Ok(()) => ack(0),
                Err(what) => {
                    drop(vcpus);
                    self.refuse(vcpu, ErrorCode::BadValue, u64::from(first), what)
                }
            },
            Request::Timed { phase, touches, max_cycles, tsc_start, tsc_end, .. } => {
                match me.close_phase(phase, touches, max_cycles, (tsc_start, tsc_end), faults_by_end) {
                    Ok(()) => ack(0),
                    Err(what) => {
                        drop(vcpus);
                        self.refuse(vcpu, ErrorCode::BadValue, touches, what)
                    }
                }
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
        let checked = self.access.ram().check_range(range);
        if let Err(apf::RamError::UnalignedToPages { page_size, .. }) = checked {
            // Huge-page RAM: the kernel acts on whole huge pages only.
            return Err(self.refuse(
                vcpu,
                ErrorCode::Unaligned,
                gpa,
                format!("{what} of {gpa:#x}+{len:#x} is not aligned to guest RAM's {page_size}-byte pages"),
            ));
        }
        if !inside || checked.is_err() {
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

impl VcpuAgent {
    /// Adds a piece of `phase`'s histogram.
    fn add_piece(&mut self, phase: u32, first: u32, counts: &[u32; HIST_CHUNK]) -> Result<(), String> {
        if phase::name(phase).is_none() {
            return Err(format!("timings of phase {phase}, which does not exist"));
        }
        if first as usize % HIST_CHUNK != 0 {
            return Err(format!("a histogram piece at bucket {first}, not a multiple of {HIST_CHUNK}"));
        }
        let (building, hist) = self.building.get_or_insert_with(|| (phase, Histogram::new()));
        if *building != phase {
            return Err(format!("a piece of phase {phase} while phase {building} is open"));
        }
        if !hist.add_counts(first as usize, counts) {
            return Err(format!("a histogram piece at bucket {first} reaches past the last bucket"));
        }
        Ok(())
    }

    /// Closes `phase`: its pieces must add up to `touches`.
    fn close_phase(
        &mut self,
        phase: u32,
        touches: u64,
        max_cycles: u64,
        tsc: (u64, u64),
        faults_by_end: Option<u64>,
    ) -> Result<(), String> {
        let (open, mut cycles) = self.building.take().unwrap_or((phase, Histogram::new()));
        if open != phase || phase::name(phase).is_none() {
            return Err(format!("a close of phase {phase} while phase {open} is open"));
        }
        if cycles.count() != touches {
            return Err(format!("phase {phase} closed with {touches} touches, its pieces hold {}", cycles.count()));
        }
        cycles.set_max(max_cycles);
        let start = self.timings.last().map(|t| t.host.1).or(self.started);
        self.timings.push(PhaseTiming { phase, cycles, tsc, host: (start, Instant::now()), faults_by_end });
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(values: &[(usize, u32)]) -> [u32; HIST_CHUNK] {
        let mut counts = [0; HIST_CHUNK];
        for &(i, c) in values {
            counts[i] = c;
        }
        counts
    }

    #[test]
    fn phases_are_rebuilt_from_their_pieces_and_checked() {
        let mut a = VcpuAgent { started: Some(Instant::now()), ..VcpuAgent::default() };
        a.add_piece(phase::TOUCH, 0, &piece(&[(3, 2)])).unwrap();
        a.add_piece(phase::TOUCH, 2 * HIST_CHUNK as u32, &piece(&[(0, 5)])).unwrap();
        // A piece of another phase while this one is open.
        assert!(a.add_piece(phase::STRESS, 0, &piece(&[])).unwrap_err().contains("while phase 1 is open"));
        // The close must count what the pieces hold.
        assert!(a.close_phase(phase::TOUCH, 8, 9000, (1, 2), Some(7)).unwrap_err().contains("pieces hold 7"));
        // A refused close dropped the phase: its pieces are sent again.
        a.add_piece(phase::TOUCH, 0, &piece(&[(3, 2)])).unwrap();
        a.add_piece(phase::TOUCH, 2 * HIST_CHUNK as u32, &piece(&[(0, 5)])).unwrap();
        a.close_phase(phase::TOUCH, 7, 9000, (1, 2), Some(7)).unwrap();
        let t = &a.timings[0];
        assert_eq!((t.phase, t.cycles.count(), t.cycles.max(), t.faults_by_end), (phase::TOUCH, 7, 9000, Some(7)));
        assert_eq!(t.host.0, a.started, "the touch phase starts at the hello");
        // An empty phase needs no piece; the stress phase starts where the
        // touch phase ended.
        a.close_phase(phase::STRESS, 0, 0, (2, 3), Some(7)).unwrap();
        assert_eq!(a.timings[1].host.0, Some(a.timings[0].host.1));
        // Pieces off the chunk grid, past the last bucket, or of no phase.
        assert!(a.add_piece(phase::TOUCH, 5, &piece(&[])).unwrap_err().contains("not a multiple"));
        let last = (agent_proto::timing::BUCKETS / HIST_CHUNK * HIST_CHUNK) as u32;
        assert!(a.add_piece(phase::TOUCH, last, &piece(&[(HIST_CHUNK - 1, 1)])).unwrap_err().contains("past the last"));
        a.building = None;
        assert!(a.add_piece(9, 0, &piece(&[])).unwrap_err().contains("phase 9"));
        assert!(a.close_phase(9, 0, 0, (0, 0), None).is_err());
    }
}
