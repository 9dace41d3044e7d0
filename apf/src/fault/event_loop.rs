//! The event loop: an `event-manager` subscriber on the userfaultfd that
//! reads events in batches, dedupes, claims windows and dispatches them.
//! It never waits on another part of the engine: work it cannot hand off
//! (the worker queue is full) is parked, bounded, and re-sent when a worker
//! kicks it.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use tracing::field;
use vmm_sys_util::eventfd::EventFd;

use super::prefetch::StreamTable;
use super::SpawnError;
use crate::core::resolve::{self, Ctx};
use crate::core::{panic_message, Core, FaultError, GiveUp, Job, Run, Window};
use crate::notifier::{InstallsHeld, Invalidation, Reason};
use crate::ram::{GuestAddress, GuestRange, MemoryKind, Origin, PageLoc, PageState};
use crate::uffd::{Event, EventBuf, PAGE_SIZE};

/// Huge pages an image's read fault maps around the faulting one (16 MiB):
/// mapping them in place costs a few microseconds and no memory, and spares
/// the faults (and on writes, the userfaults before the kernel's
/// copy-on-write) of the next ones.
pub(crate) const HUGE_IMAGE_BLOCK: usize = 8;

const UFFD: u32 = 0;
const KICK: u32 = 1;
const STOP: u32 = 2;
/// Epoll timeout: parked work is retried at least this often even if no
/// worker kicks.
const TICK_MS: i32 = 50;

/// A fault waiting for an offline to end.
struct Deferred {
    span: tracing::Span,
    addr: u64,
    write: bool,
    /// A write-protect fault: the page is there, the write waits.
    wp: bool,
    tid: u32,
    /// When it was deferred (if anyone listens to its span) and how long
    /// it had been deferred before: the span's `deferred_ns`.
    since: Option<Instant>,
    before: Duration,
}

impl Deferred {
    fn new(span: tracing::Span, addr: u64, write: bool, tid: u32, redo: Option<Duration>) -> Self {
        let since = (!span.is_disabled()).then(Instant::now);
        Deferred { span, addr, write, wp: false, tid, since, before: redo.unwrap_or_default() }
    }
}

/// The subscriber.
pub(crate) struct FaultLoop {
    shared: Arc<Core>,
    jobs: Sender<Job>,
    stop: EventFd,
    streams: StreamTable,
    /// Fault messages carry the faulting thread (`THREAD_ID`).
    thread_ids: bool,
    buf: EventBuf,
    events: Vec<Event>,
    parked: VecDeque<Job>,
    /// Faults on pages an offline holds, answered when it ends.
    deferred: Vec<Deferred>,
    ctx: Ctx,
    exit: bool,
    /// Why the loop cannot go on (set with `exit`).
    failed: Option<String>,
}

pub(crate) fn spawn(shared: Arc<Core>, jobs: Sender<Job>, stop: EventFd) -> Result<JoinHandle<()>, SpawnError> {
    let mut manager = EventManager::<FaultLoop>::new().map_err(SpawnError::EventManager)?;
    let fl = FaultLoop {
        streams: StreamTable::new(shared.config().max_window),
        thread_ids: shared.uffd().features().contains(crate::uffd::Features::THREAD_ID),
        ctx: Ctx::new(true, shared.config().max_window),
        shared,
        jobs,
        stop,
        buf: EventBuf::default(),
        events: Vec::with_capacity(crate::uffd::EVENT_BATCH),
        parked: VecDeque::new(),
        deferred: Vec::new(),
        exit: false,
        failed: None,
    };
    let shared = fl.shared.clone();
    let rescue_stop = fl.stop.try_clone().map_err(SpawnError::Io)?;
    let id = manager.add_subscriber(fl);
    let dispatch = crate::trace::current_dispatch();
    std::thread::Builder::new()
        .name("apf-fault".into())
        .spawn(move || {
            let _trace = tracing::dispatcher::set_default(&dispatch);
            let run = std::panic::catch_unwind(AssertUnwindSafe(|| loop {
                if let Err(e) = manager.run_with_timeout(TICK_MS) {
                    break Some(format!("event manager: {e:?}"));
                }
                match manager.subscriber_mut(id) {
                    Ok(fl) if !fl.exit => fl.tick(),
                    Ok(fl) => break fl.failed.take(),
                    Err(e) => break Some(format!("event manager: {e:?}")),
                }
            }));
            let failure = match run {
                Ok(failure) => failure,
                Err(panic) => Some(panic_message(&*panic)),
            };
            // Parked jobs give their pages back (and are uncounted), also
            // after a panic: the manager still holds the loop's state.
            if let Ok(mut fl) = manager.remove_subscriber(id) {
                fl.abandon_parked();
            }
            if let Some(reason) = failure {
                tracing::error!(target: "apf", reason = %reason, "apf event loop died");
                rescue(&shared, &rescue_stop, reason);
            }
        })
        .map_err(SpawnError::Io)
}

/// After a shutdown that left a thread behind: the userfaultfd stays open
/// (closing it under a blocked thread would hand it zero-filled memory),
/// so someone must keep reading it, or a `madvise` of guest RAM would wait
/// for ever for its remove event to be read. This thread does, for as long
/// as the process lives, answering faults with poison.
pub(crate) fn serve_after_shutdown(shared: Arc<Core>) {
    let dispatch = crate::trace::current_dispatch();
    let spawned = std::thread::Builder::new().name("apf-after".into()).spawn(move || {
        let _trace = tracing::dispatcher::set_default(&dispatch);
        // Never signalled: an eventfd nobody writes.
        if let Ok(never) = EventFd::new(0) {
            answer_with_poison(&shared, &never);
        }
    });
    if let Err(e) = spawned {
        tracing::error!(target: "apf", error = %e, "apf cannot keep reading its userfaultfd after shutdown");
    }
}

/// After the event loop died: nothing resolves faults any more, and a
/// thread blocked in a kernel fault cannot be handed an error, while
/// closing the userfaultfd would release it into zero-filled memory (silent
/// corruption). So: refuse new work, poison every page not present, wake
/// every range, then answer every fault with poison and apply removes
/// (so `madvise` callers are let go) until the engine is stopped.
fn rescue(shared: &Core, stop: &EventFd, reason: String) {
    shared.stop();
    shared.report(FaultError::EventLoopDied(reason));
    shared.poison_unresolved();
    for r in shared.ram().regions() {
        shared.wake(r.host_base(), r.len() as usize);
    }
    answer_with_poison(shared, stop);
}

/// Reads events until `stop`: removes are applied in order, every fault is
/// answered with poison (or a wake where the page is present).
fn answer_with_poison(shared: &Core, stop: &EventFd) {
    let mut buf = EventBuf::default();
    let mut events = Vec::with_capacity(crate::uffd::EVENT_BATCH);
    loop {
        let mut fds = [
            libc::pollfd { fd: shared.uffd().as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: poll reads and writes the two pollfds on this frame.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, TICK_MS) };
        if fds[1].revents & libc::POLLIN != 0 {
            return;
        }
        let mut held = Some(shared.notifier().hold_installs());
        let read = shared.uffd().read_events(&mut buf, &mut events);
        let mut removes = Vec::new();
        if read.is_ok() {
            for ev in events.iter() {
                if let Event::Remove { start, end } = *ev {
                    begin_remove(shared, held.as_mut(), start, end, &mut removes);
                }
            }
        }
        drop(held);
        for inv in removes {
            inv.call_intervals();
        }
        for ev in events.iter() {
            if let Event::Fault { addr, wp, .. } = *ev {
                let size = shared.ram().locate_host(addr).map_or(PAGE_SIZE, |l| shared.ram().region(l).page_size());
                let page = addr & !(size as u64 - 1);
                if wp {
                    // A write an offline held: the page is there, let it go.
                    if shared.mem().writeprotect(page, size, false, false).is_err() {
                        shared.wake(page, size);
                    }
                    continue;
                }
                // SAFETY: the kernel reported a fault there, so the page is in
                // a range registered with this descriptor: guest RAM, which
                // no Rust reference ever points into (see `crate::ram`).
                // (Zeros where the backend cannot poison.)
                match unsafe { shared.give_up_on(page, size) } {
                    Ok(_) => {}
                    // Present, or a remove pending (it is read next round):
                    // either way the thread retries its access.
                    Err(_) => {
                        shared.wake(page, size);
                    }
                }
            }
        }
    }
}

impl MutEventSubscriber for FaultLoop {
    fn init(&mut self, ops: &mut EventOps) {
        let adds = [
            ops.add(Events::with_data(self.shared.uffd(), UFFD, EventSet::IN)),
            ops.add(Events::with_data(self.shared.kick_fd(), KICK, EventSet::IN)),
            ops.add(Events::with_data(&self.stop, STOP, EventSet::IN)),
        ];
        if let Some(Err(e)) = adds.into_iter().find(|r| r.is_err()) {
            self.failed = Some(format!("cannot watch its descriptors: {e:?}"));
            self.exit = true;
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            UFFD => self.drain(),
            KICK => {
                self.shared.clear_kick();
                self.unpark();
                self.redo_deferred();
            }
            _ => self.exit = true,
        }
    }
}

impl FaultLoop {
    fn tick(&mut self) {
        #[cfg(feature = "failpoints")]
        if self.shared.uffd().failpoints().is_off(crate::failpoints::Switch::EventLoop) {
            panic!("the event loop was switched off by a failpoint");
        }
        if !self.parked.is_empty() {
            self.unpark();
        }
        if !self.deferred.is_empty() {
            self.redo_deferred();
        }
    }

    /// Handles deferred faults again (an offline ended, or the tick).
    fn redo_deferred(&mut self) {
        self.shared.deferred_taken();
        for d in std::mem::take(&mut self.deferred) {
            let waited = d.before + d.since.map_or(Duration::ZERO, |t| t.elapsed());
            if d.since.is_some() {
                d.span.record("deferred_ns", u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX));
            }
            match self.shared.ram().locate_host(d.addr) {
                Some(_) if d.wp => self.on_wp_fault(d.span, d.addr, d.tid, Some(waited)),
                Some(loc) => self.handle_fault(d.span, d.addr, loc, d.write, d.tid, Some(waited)),
                None => {
                    self.shared.wake(d.addr & !(PAGE_SIZE as u64 - 1), PAGE_SIZE);
                }
            }
        }
    }

    /// Reads and handles every pending event, then keeps polling for
    /// `Config::spin` after the last one: waking a sleeping handler on the
    /// other core costs several times a fault's own work on these machines,
    /// and a faulting thread usually faults again within microseconds.
    /// The polling looks (`poll`) without reading: a read holds installs
    /// off (see [`Self::drain_once`]).
    fn drain(&mut self) {
        // On huge pages a thread faults again only after 2 MiB of work: a
        // spin would take a core from it (or from a worker's copy) for
        // nothing.
        let spin = if self.shared.ram().kind().is_huge() { Duration::ZERO } else { self.shared.config().spin };
        let mut last = std::time::Instant::now();
        let mut got = self.drain_once();
        loop {
            if got {
                last = std::time::Instant::now();
            } else if last.elapsed() >= spin || self.shared.jobs_in_flight() > 0 {
                // Workers are installing (or jobs are parked): leave them
                // the core.
                return;
            } else {
                std::hint::spin_loop();
            }
            got = self.shared.uffd().readable() && self.drain_once();
        }
    }

    /// One pass over the queue; true if any event was handled.
    ///
    /// Each batch is read with installs held off, and the `REMOVE`s in it
    /// are applied (sequence bumped, pages marked) before installs resume:
    /// reading a remove lets the `madvise` caller go on and zap the range,
    /// so every install whose check came before the remove must land
    /// before the read, and every later one must see the new sequence.
    /// Once `madvise` returns, the range reads as zeros until written.
    fn drain_once(&mut self) -> bool {
        let mut any = false;
        loop {
            let mut events = std::mem::take(&mut self.events);
            let shared = self.shared.clone();
            let mut held = (!self.removes_unordered()).then(|| shared.notifier().hold_installs());
            let read = shared.uffd().read_events(&mut self.buf, &mut events);
            let mut removes = Vec::new();
            if read.is_ok() {
                for ev in events.iter() {
                    if let Event::Remove { start, end } = *ev {
                        // An offline dropping pages it holds and has copied
                        // out: nothing of the guest's was discarded.
                        if !shared.take_own_discard(start, end) {
                            begin_remove(&shared, held.as_mut(), start, end, &mut removes);
                        }
                    }
                }
            }
            drop(held);
            // Pins over discarded memory must re-fault it (as zeros): their
            // callbacks run with no engine lock held.
            for inv in removes {
                inv.call_intervals();
            }
            match read {
                Ok(0) => {
                    self.events = events;
                    return any;
                }
                Ok(n) => {
                    any = true;
                    // Per message: one the wrapper cannot decode is
                    // reported on its own, never drops its batch.
                    for ev in events.iter() {
                        self.handle(*ev);
                    }
                    self.events = events;
                    // A short batch drained the queue.
                    if n < crate::uffd::EVENT_BATCH {
                        return any;
                    }
                }
                Err(e) => {
                    self.events = events;
                    self.shared.report(FaultError::Events(e));
                    return any;
                }
            }
        }
    }

    /// Whether a failpoint switched the ordering of removes against
    /// installs off (a test proving the stress catches its absence).
    fn removes_unordered(&self) -> bool {
        #[cfg(feature = "failpoints")]
        {
            self.shared.uffd().failpoints().is_off(crate::failpoints::Switch::UnorderedRemoves)
        }
        #[cfg(not(feature = "failpoints"))]
        false
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Fault { addr, wp: true, tid, .. } => {
                self.shared.stats().write_protect_faults.add(1);
                let span = tracing::info_span!(target: "apf", "apf.fault", kind = "write-protect", tid, outcome = field::Empty, deferred_ns = field::Empty);
                self.on_wp_fault(span, addr, tid, None)
            }
            Event::Fault { addr, write, tid, .. } => self.on_fault(addr, write, tid),
            // Applied when read, see `drain_once`.
            Event::Remove { .. } => {}
            Event::Unknown { event } => self.shared.report(FaultError::UnknownEvent(event)),
            // Not requested at the handshake; nothing to do if they come.
            Event::Unmap { .. } | Event::Remap { .. } | Event::Fork { .. } => {
                tracing::warn!(target: "apf", event = ?ev, "unexpected userfaultfd event");
            }
        }
    }

    /// A write to a page an offline of memory without `MOVE` protected
    /// (see `crate::offline`): while the offline holds the page the write
    /// waits (deferred, like a fault), since its page is being copied out
    /// and replaced; afterwards, or on a page nobody holds (protection an
    /// offline could not clear), the protection is cleared, which wakes
    /// the writer. With no room left to defer, the writer is only woken:
    /// it faults again.
    fn on_wp_fault(&mut self, span: tracing::Span, addr: u64, tid: u32, redo: Option<Duration>) {
        let shared = &self.shared;
        // Protection is set and cleared in whole pages of the region (2 MiB
        // on huge pages, where a 4 KiB range is refused).
        let page_size = shared.ram().locate_host(addr).map_or(PAGE_SIZE, |loc| shared.ram().region(loc).page_size());
        let page_addr = addr & !(page_size as u64 - 1);
        let held = |s: &Core| {
            s.ram().locate_host(addr).is_some_and(|loc| s.ram().state(loc).0 == PageState::Invalidating)
        };
        if held(shared) {
            if self.deferred.len() < shared.config().park_capacity {
                shared.defer_noted();
                if held(shared) {
                    if redo.is_none() {
                        shared.stats().deferred.add(1);
                        if let Some(loc) = shared.ram().locate_host(addr) {
                            let gpa = shared.ram().region(loc).page_gpa(loc.page);
                            shared.notifier().raise_holders(&GuestRange::new(gpa, page_size as u64));
                        }
                    }
                    let mut d = Deferred::new(span, addr, true, tid, redo);
                    d.wp = true;
                    self.deferred.push(d);
                    return;
                }
            } else {
                span.record("outcome", "retry");
                shared.wake(page_addr, page_size);
                return;
            }
        }
        span.record("outcome", "unprotected");
        if let Err(e) = shared.mem().writeprotect(page_addr, page_size, false, false) {
            tracing::warn!(target: "apf", error = %e, "apf could not clear write protection on a written page");
            shared.wake(page_addr, page_size);
        }
    }

    fn on_fault(&mut self, addr: u64, write: bool, tid: u32) {
        let shared = &self.shared;
        shared.stats().faults.add(1);
        let Some(loc) = shared.ram().locate_host(addr) else {
            shared.report(FaultError::OutsideRam(addr));
            shared.wake(addr & !(PAGE_SIZE as u64 - 1), PAGE_SIZE);
            return;
        };
        let region = &shared.ram().regions()[loc.region];
        let span = tracing::info_span!(
            target: "apf",
            "apf.fault",
            gpa = region.page_gpa(loc.page).0,
            tid,
            kind = if write { "write" } else { "read" },
            source = field::Empty,
            bytes = field::Empty,
            outcome = field::Empty,
            deferred_ns = field::Empty,
            queued_ns = field::Empty,
            waited_ns = field::Empty,
            lock_ns = field::Empty,
            fill_ns = field::Empty,
            install_ns = field::Empty,
        );
        self.handle_fault(span, addr, loc, write, tid, None);
    }

    /// Resolves, dedupes or defers one fault. `redo` is set for a fault
    /// deferred by an offline: such a fault on a page now present is only
    /// woken (the offline put the page back).
    fn handle_fault(&mut self, span: tracing::Span, addr: u64, loc: PageLoc, write: bool, tid: u32, redo: Option<Duration>) {
        let shared = &self.shared;
        let region = &shared.ram().regions()[loc.region];
        let page = loc.page;
        // A few rounds at most: each failed claim means another resolver
        // moved the page on, and the next look sees where to.
        for _ in 0..4 {
            match region.state(page).0 {
                PageState::Missing => {
                    if region.try_claim(page).is_none() {
                        continue;
                    }
                    shared.record_touch(shared.ram().page_index(loc), region.page_gpa(page).0);
                    span.record("source", shared.source().name());
                    // On an image of huge pages a first write maps the
                    // image's page as a read does, and the kernel's
                    // copy-on-write copies it in the faulting thread: two
                    // threads then copy at once with no hand-off, where a
                    // worker's `COPY` of 2 MiB kept the thread waiting for
                    // its wake-up (first writes went from 6.2-6.6 to
                    // 7.3-9.2 GB/s on two cores).
                    let write = write && shared.ram().kind() != MemoryKind::HugetlbImage;
                    let window = if write || !shared.ram().kind().is_image() {
                        self.plan(loc.region, page, tid)
                    } else {
                        self.image_block(loc.region, page)
                    };
                    self.shared.record_window(loc.region, &window);
                    self.dispatch(Job::new(loc.region, Some(page), window, span, write));
                    return;
                }
                PageState::Resolving => {
                    shared.stats().deduped.add(1);
                    span.record("outcome", "deduped");
                    return;
                }
                PageState::Present if redo.is_some() => {
                    span.record("outcome", "woken");
                    shared.wake(region.page_host(page), region.page_size());
                    return;
                }
                PageState::Present if region.zap_may_explain(page) => {
                    // A remove touched it: its `madvise` zaps only after the
                    // event is read (and applied), so an install landing in
                    // between (a fill, an offline's put-back, a replug's
                    // zeros, however long after) was zapped with the rest.
                    // Zeros are what it holds; a stale event meets EEXIST
                    // and is woken.
                    if !region.try_reclaim_removed(page) {
                        continue;
                    }
                    shared.stats().spurious.add(1);
                    self.dispatch_zeros(span, loc, write);
                    return;
                }
                PageState::Present if shared.ram().kind().page_cache_is_truth() => {
                    // Shared memory: a page leaves the page cache only by
                    // a punched hole (`MADV_REMOVE`, `fallocate`), which
                    // raises no event of its own, and reads zeros from
                    // then on. (Contents kept by `MADV_DONTNEED` never
                    // fault: the page cache still maps them.)
                    if !region.try_reclaim_punched(page) {
                        continue;
                    }
                    self.dispatch_zeros(span, loc, write);
                    return;
                }
                PageState::Present => {
                    // The engine installed it from its source or the store,
                    // with no remove since, and the kernel says missing:
                    // either the event is stale (it raced the install that
                    // resolved it) or the page was lost with no remove
                    // behind it. POISON is the probe that tells them apart
                    // without touching data: it refuses any non-empty entry
                    // with EEXIST.
                    // The probe runs under the install lock, with the state
                    // checked again there: an offline marks its pages (and
                    // a remove is applied) only with that lock held
                    // exclusively, so a page still `Present` under it is
                    // not being moved out by anyone.
                    let host = region.page_host(page);
                    let guard = shared.notifier().install_lock();
                    if region.state(page).0 != PageState::Present {
                        drop(guard);
                        continue;
                    }
                    // Without `POISON` the probe is `ZEROPAGE`, which refuses
                    // the same way and gives a lost page zeros.
                    let zeroed = shared.give_up() == GiveUp::Zeros;
                    // SAFETY: a page of guest RAM, which no Rust reference ever points into (see `crate::ram`).
                    let probe = unsafe { shared.give_up_on(host, region.page_size()) };
                    let lost = probe.is_ok() && (zeroed || region.mark_lost(page));
                    drop(guard);
                    match probe {
                        Err(e) if e.errno == libc::EEXIST => {
                            shared.stats().spurious.add(1);
                            span.record("outcome", "woken");
                            shared.wake(host, region.page_size());
                        }
                        Ok(_) => {
                            // Its contents are gone: say so, never zero-fill
                            // as if nothing happened.
                            debug_assert!(lost, "a present page under the install lock stays present");
                            if !zeroed {
                                shared.stats().poisoned.add(1);
                            }
                            span.record("outcome", if zeroed { "zero-filled" } else { "poisoned" });
                            let gpa = region.page_gpa(page);
                            let err = FaultError::Inconsistent { gpa, poisoned: !zeroed };
                            shared.report_given_up(gpa, zeroed, err);
                        }
                        Err(e) => self.after_failed_poison(span, addr, loc, write, tid, redo, e),
                    }
                    return;
                }
                PageState::Poisoned | PageState::Offline => {
                    // The poison marker is gone (zapped): put it back. Under
                    // the install lock, with the state checked again there:
                    // a replug (which takes that lock to mark its pages)
                    // may have put zeros there since the look above, and a
                    // discard's zap may have taken them again; a marker
                    // then would poison a page the engine calls present.
                    let host = region.page_host(page);
                    let guard = shared.notifier().install_lock();
                    if !matches!(region.state(page).0, PageState::Poisoned | PageState::Offline) {
                        drop(guard);
                        continue;
                    }
                    // SAFETY: a page of guest RAM, which no Rust reference ever points into (see `crate::ram`).
                    let res = unsafe { shared.mem().poison(host, region.page_size()) };
                    drop(guard);
                    match res {
                        Ok(_) => {
                            span.record("outcome", "poisoned");
                        }
                        Err(e) if e.errno == libc::EEXIST => {
                            span.record("outcome", "poisoned");
                            shared.wake(host, region.page_size());
                        }
                        Err(e) => self.after_failed_poison(span, addr, loc, write, tid, redo, e),
                    }
                    return;
                }
                PageState::Invalidating => {
                    if self.deferred.len() < shared.config().park_capacity {
                        // Look again once kicks are sure to come: an
                        // offline that ended the page's chunk meanwhile
                        // may not have seen that anyone waits.
                        shared.defer_noted();
                        if region.state(page).0 != PageState::Invalidating {
                            continue;
                        }
                        if redo.is_none() {
                            shared.stats().deferred.add(1);
                            // The offline holding it gets this fault's
                            // priority while the fault waits.
                            let range = GuestRange::new(region.page_gpa(page), region.page_size() as u64);
                            shared.notifier().raise_holders(&range);
                        }
                        self.deferred.push(Deferred::new(span, addr, write, tid, redo));
                        return;
                    }
                    break;
                }
            }
        }
        // Still moving, or taken away for now: let the thread fault again.
        span.record("outcome", "retry");
        shared.wake(region.page_host(page), region.page_size());
    }

    /// A `POISON` the fault path needed failed. The fault is deferred and
    /// tried again on the next round: `EAGAIN` (a remove is pending; it
    /// clears once this loop reads it) quietly, anything else reported
    /// once, when it first fails. Waking the thread at once instead would
    /// have it fault again at full speed for as long as the error lasts.
    /// With no room left to defer, the error is reported and the thread
    /// woken, so it faults again rather than waiting for ever.
    #[allow(clippy::too_many_arguments)]
    fn after_failed_poison(
        &mut self,
        span: tracing::Span,
        addr: u64,
        loc: PageLoc,
        write: bool,
        tid: u32,
        redo: Option<Duration>,
        e: crate::uffd::IoctlError,
    ) {
        let shared = &self.shared;
        let region = &shared.ram().regions()[loc.region];
        if self.deferred.len() < shared.config().park_capacity {
            span.record("outcome", "deferred");
            if redo.is_none() {
                shared.stats().deferred.add(1);
                if e.errno != libc::EAGAIN {
                    shared.report(FaultError::Install { gpa: region.page_gpa(loc.page), error: e });
                }
            }
            self.deferred.push(Deferred::new(span, addr, write, tid, redo));
            return;
        }
        span.record("outcome", "poison-failed");
        shared.report(FaultError::Install { gpa: region.page_gpa(loc.page), error: e });
        shared.wake(region.page_host(loc.page), region.page_size());
    }

    /// Claims the prefetch window after the faulting page (already claimed)
    /// and returns it.
    fn plan(&mut self, region_idx: usize, page: usize, tid: u32) -> Window {
        let region = &self.shared.ram().regions()[region_idx];
        let linear = (region.base().0 >> region.page_shift()) as i64 + page as i64;
        // Without thread ids every fault says 0: streams by address then.
        let tid = if self.thread_ids { tid } else { self.streams.key_at(linear) };
        let mut plan = self.streams.plan(tid, linear);
        if region.is_huge() {
            // A few huge pages at most (see `HUGE_WINDOW`); the table
            // learns of the cut through `trim`, as at a region's edge.
            plan.count = plan.count.min(self.shared.window_cap(region_idx));
        }
        if plan.count <= 1 {
            let runs = self.fault_around(region, page);
            if let (Some(first), Some(last)) = (runs.first(), runs.last()) {
                // The block counts as the thread's last window: a thread
                // that goes on at its end is a stream, and its windows grow
                // from there.
                let (start, end) = (first.first, last.end());
                if end - start > 1 {
                    let base = (region.base().0 >> region.page_shift()) as i64;
                    self.streams.trim(tid, base + start as i64, 1, end - start);
                }
            }
            return runs;
        }
        let max = self.shared.window_cap(region_idx);
        let pages = region.pages() as i64;
        let stride = plan.stride;
        let contiguous = stride.unsigned_abs() as usize * (plan.count - 1) < max;
        if contiguous {
            // One run from the faulting page in the stream's direction,
            // covering the strided pages and what lies between.
            let want = stride.unsigned_abs() as usize * (plan.count - 1) + 1;
            let dir = stride.signum();
            let mut n = 1;
            while n < want {
                let p = page as i64 + dir * n as i64;
                if p < 0 || p >= pages || region.try_claim(p as usize).is_none() {
                    break;
                }
                n += 1;
            }
            let covered = (n - 1) / stride.unsigned_abs() as usize + 1;
            self.streams.trim(tid, linear, stride, covered);
            let first = if dir > 0 { page } else { page + 1 - n };
            Window::from(vec![Run { first, count: n }])
        } else {
            let mut runs = Window::one(page);
            let mut covered = 1;
            for k in 1..plan.count as i64 {
                let p = page as i64 + stride * k;
                if p < 0 || p >= pages || region.try_claim(p as usize).is_none() {
                    break;
                }
                runs.push(Run::one(p as usize));
                covered += 1;
            }
            self.streams.trim(tid, linear, stride, covered);
            runs
        }
    }

    /// A read of an image: the missing pages of the aligned block of
    /// [`Config::image_window`](crate::Config::image_window) pages around
    /// `page` (already claimed), in order or not. Mapping the image's pages
    /// allocates nothing (they are its page cache, shared), so a large
    /// block costs page-table entries only, and saves the faults that the
    /// kernel's own file fault-around (16 pages) would take. On huge pages
    /// the block is [`HUGE_IMAGE_BLOCK`] huge pages (the faulting one alone
    /// if `image_window` is 1), and takes only neighbours the image holds
    /// data for: zeros there would be 2 MiB copies nobody asked for.
    fn image_block(&self, region_idx: usize, page: usize) -> Window {
        let ram = self.shared.ram();
        let region = &ram.regions()[region_idx];
        let window = self.shared.config().image_window.max(1);
        if !region.is_huge() || window == 1 {
            return self.around(region, page, window);
        }
        let mapped_in_place = |p: usize| {
            region.state(p) == (PageState::Missing, Origin::Source) && ram.image_holds_data(region_idx, p) == Some(true)
        };
        self.around_where(region, page, HUGE_IMAGE_BLOCK, mapped_in_place)
    }

    /// Runs covering `page` (already claimed) and the missing pages of the
    /// aligned fault-around block it lies in.
    /// None on huge pages: one is already larger than any block of small
    /// ones.
    fn fault_around(&self, region: &crate::ram::Region, page: usize) -> Window {
        if region.is_huge() {
            return Window::one(page);
        }
        self.around(region, page, self.shared.config().fault_around.min(self.shared.config().max_window).max(1))
    }

    /// Runs covering `page` (already claimed) and the missing pages of the
    /// aligned block of `around` pages it lies in.
    fn around(&self, region: &crate::ram::Region, page: usize, around: usize) -> Window {
        self.around_where(region, page, around, |_| true)
    }

    /// [`Self::around`], taking only the neighbours `take` accepts.
    fn around_where(
        &self,
        region: &crate::ram::Region,
        page: usize,
        around: usize,
        take: impl Fn(usize) -> bool,
    ) -> Window {
        if around == 1 {
            return Window::one(page);
        }
        let first = page / around * around;
        let end = (first + around).min(region.pages());
        let mut runs = Window::default();
        for p in first..end {
            if p != page && (!take(p) || region.try_claim(p).is_none()) {
                continue;
            }
            match runs.last_mut() {
                Some(run) if run.end() == p => run.count += 1,
                _ => runs.push(Run::one(p)),
            }
        }
        runs
    }

    /// Resolves page `loc`, reclaimed from `Present` (a zap or a punched
    /// hole took what the engine installed), as zeros: a job of its own.
    fn dispatch_zeros(&mut self, span: tracing::Span, loc: PageLoc, write: bool) {
        span.record("source", "zero");
        let job = Job { reclaimed: true, ..Job::new(loc.region, Some(loc.page), Window::one(loc.page), span, write) };
        self.dispatch(job);
    }

    fn dispatch(&mut self, job: Job) {
        // Counted from claim to finish, whichever thread finishes it.
        self.shared.job_started();
        let mut job = job;
        let mut rest = None;
        // Counted in small pages: a huge page is a large copy. A read of an
        // image maps its pages in place and copies nothing: one page each
        // (unless a page of it comes from zeros or the eviction store).
        // (Only huge pages count more than one each: small ones need no
        // look at their origins.)
        let region = &self.shared.ram().regions()[job.region];
        let copies = || {
            job.writes
                || !self.shared.ram().kind().is_image()
                || job.window.iter().any(|r| (r.first..r.end()).any(|p| region.claimed_origin(p) != Origin::Source))
        };
        let shift = if region.is_huge() && copies() { region.page_shift() - PAGE_SIZE.trailing_zeros() } else { 0 };
        if !self.shared.inline_ok(job.window.pages() << shift) {
            // A long window: when its head can be resolved here, the
            // faulting thread is woken by the head's own install, and a
            // worker copies the rest once the head is in (handed over
            // after it, so that the two do not compete for the CPU while
            // the faulting thread waits). Otherwise the worker that takes
            // the window installs its head first.
            if !self.shared.inline_ok(resolve::HEAD_PAGES) {
                self.send_to_pool(job);
                return;
            }
            let (head, tail) = resolve::split_head(job);
            job = head;
            match tail {
                Some(tail) => {
                    self.shared.job_started();
                    rest = Some(tail);
                }
                // Not split (a short window, or one no thread faulted on).
                None if !self.shared.inline_ok(job.window.pages() << shift) => {
                    self.send_to_pool(job);
                    return;
                }
                None => {}
            }
        }
        self.shared.stats().inline.add(1);
        match resolve::resolve_guarded(&self.shared, job, &mut self.ctx) {
            Some(job) => self.send_to_pool(job),
            None => {
                self.shared.job_finished();
            }
        }
        if let Some(rest) = rest {
            self.send_to_pool(rest);
        }
    }

    /// Sends a counted job to the pool (the worker uncounts it).
    fn send_to_pool(&mut self, mut job: Job) {
        job.causes.queue();
        match self.jobs.try_send(job) {
            Ok(()) => {
                self.shared.stats().dispatched.add(1);
            }
            Err(TrySendError::Full(job)) => self.park(job),
            Err(TrySendError::Disconnected(job)) => {
                self.shared.release_runs(job.region, &job.window);
                self.shared.job_finished();
            }
        }
    }

    fn park(&mut self, job: Job) {
        if self.parked.len() >= self.shared.config().park_capacity {
            // Cannot happen with fewer faulting threads than the park
            // capacity (each blocked thread has one fault outstanding).
            // Rather than lose the job, resolve it here even if it blocks.
            let mut ctx = Ctx::new(false, self.shared.config().max_window);
            let left = resolve::resolve_guarded(&self.shared, job, &mut ctx);
            debug_assert!(left.is_none());
            self.shared.job_finished();
            return;
        }
        self.shared.stats().parked.add(1);
        self.parked.push_back(job);
        self.shared.set_parked(true);
    }

    fn unpark(&mut self) {
        while let Some(job) = self.parked.pop_front() {
            match self.jobs.try_send(job) {
                Ok(()) => {
                    self.shared.stats().dispatched.add(1);
                }
                Err(TrySendError::Full(job)) => {
                    self.parked.push_front(job);
                    return;
                }
                Err(TrySendError::Disconnected(job)) => {
                    self.shared.release_runs(job.region, &job.window);
                    self.shared.job_finished();
                }
            }
        }
        self.shared.set_parked(false);
    }

    /// At exit: parked jobs give their pages back, so shutdown poisons them.
    fn abandon_parked(&mut self) {
        for job in self.parked.drain(..) {
            self.shared.release_runs(job.region, &job.window);
            self.shared.job_finished();
        }
    }
}

/// `MADV_DONTNEED` by someone else: the range reads as zeros from now on.
/// Marked with installs held off (`held`; `None` only when a failpoint
/// switched the ordering off) and the sequence bumped, so a resolver that
/// filled from the old origin retries. The invalidations begun are pushed
/// to `out`: their callbacks are called after installs resume, and they end
/// when dropped.
fn begin_remove<'a>(
    shared: &'a Core,
    mut held: Option<&mut InstallsHeld<'a>>,
    start: u64,
    end: u64,
    out: &mut Vec<Invalidation<'a>>,
) {
    for (i, r) in shared.ram().regions().iter().enumerate() {
        let lo = start.max(r.host_base());
        let hi = end.min(r.host_base() + r.len());
        if lo >= hi {
            continue;
        }
        // Whole pages: on huge pages the kernel removes whole ones only
        // (an unaligned `MADV_DONTNEED` fails or is cut to them before its
        // event), but a `MADV_REMOVE` on a shared one reports the range
        // it was given, and zeros a part of a page it keeps: the page is
        // marked removed, and the page cache says what it holds.
        let first = ((lo - r.host_base()) >> r.page_shift()) as usize;
        let last = ((hi - r.host_base()).div_ceil(r.page_size() as u64)) as usize;
        shared.stats().removes.add(1);
        let range = GuestRange::new(GuestAddress(r.page_gpa(first).0), r.pages_len(last - first) as u64);
        shared.removed(range);
        let _span = tracing::debug_span!(target: "apf", "apf.invalidate", region = i, gpa = range.start.0, len = range.len, reason = "remove").entered();
        let mark = || {
            for p in first..last {
                if r.mark_removed(p).1 == Origin::Store {
                    // Its evicted contents are gone for good (a resolver
                    // filling from them retries, from zeros).
                    shared.store().discard(r.page_gpa(p), r.page_size());
                }
            }
        };
        match held.as_deref_mut() {
            Some(held) => out.push(held.invalidate(&[range], Reason::Remove, mark)),
            None => out.extend(shared.notifier().invalidate_begin(&[range], Reason::Remove, false, mark).ok()),
        }
    }
}
