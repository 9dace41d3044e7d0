//! The invalidation sequence and the interval registry: how a resolver
//! learns that contents it filled went stale before it installed them, and
//! how holders of guest memory learn that they must let go of it.
//!
//! The semantics are those of Linux's `mmu_interval_notifier`:
//!
//! - A resolver takes [`Notifier::read_begin`] before it fills a buffer
//!   (waiting for any overlapping invalidation to end), then, holding
//!   [`Notifier::install_lock`] (the lock every invalidation takes to bump
//!   the sequence), checks [`InstallGuard::read_retry`] and installs under
//!   the same guard. An invalidation that ran in between is seen and the
//!   buffer is thrown away; one that starts later waits for the install to
//!   finish. Checking first and installing after the guard is dropped would
//!   leave a window in which stale data lands.
//! - Sequences are per range: an invalidation makes only the reads that
//!   overlap it retry. The last [`HISTORY`] invalidated ranges are kept; a
//!   read older than all of them retries (conservative, never wrong).
//! - Long-term holders register an interval with a callback
//!   ([`Notifier::register`]); every invalidation that overlaps it calls the
//!   callback once, before anything is done to the pages. Short-term
//!   references ([`Notifier::try_ref`]) are not called back: invalidations
//!   wait for them to drain, and no new one is granted on a range while it
//!   is being invalidated, so the wait cannot starve.
//! - An offline first announces its invalidation ([`Notifier::announce`]),
//!   calls the intervals back and waits for references to drain while
//!   faults on its pages are still served; only then does it hold the
//!   pages ([`Invalidation::hold`]; an offline holds them chunk by chunk
//!   with [`Invalidation::hold_part`] and gives each chunk back with
//!   [`Invalidation::end_part`]), and from there it waits for nothing but
//!   the kernel. A thread holding a reference the drain waits for can
//!   therefore never be blocked by that same invalidation, whatever it
//!   touches: no deadlock between a drain and a fault exists to detect.
//!   Hard intervals (no callback) stand for references that are never given
//!   back on request; an invalidation can only wait for them, up to its
//!   deadline.
//!
//! Lock order: the install lock, then the registry mutex, then an
//! interval's callback lock. Callbacks run with no engine lock held except
//! their own interval's.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use crate::ram::GuestRange;

/// Invalidated ranges remembered for [`Notifier::read_retry`].
pub const HISTORY: usize = 256;

/// A snapshot of the invalidation sequence, from [`Notifier::read_begin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seq(u64);

/// Why a range is being invalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Contents kept, host frames change.
    Migrate,
    /// Contents move to the eviction store.
    Evict,
    /// Contents discarded.
    Unplug,
    /// A host memory block holding the pages is being offlined.
    HostBlock,
    /// Someone else discarded the pages (`MADV_DONTNEED`, a balloon).
    Remove,
}

impl Reason {
    /// Lower-case name, as used in spans and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Migrate => "migrate",
            Reason::Evict => "evict",
            Reason::Unplug => "unplug",
            Reason::HostBlock => "host-block",
            Reason::Remove => "remove",
        }
    }
}

/// What an interval's callback is told.
#[derive(Debug, Clone, Copy)]
pub struct InvalidateEvent {
    /// The part of the interval being invalidated.
    pub range: GuestRange,
    /// Why.
    pub reason: Reason,
    /// The sequence value of this invalidation.
    pub seq: u64,
}

/// An interval callback. It runs on the invalidating thread, must return
/// promptly, and must not wait for the holder's own use of the memory (the
/// holder may be blocked on a fault that waits for this invalidation), nor
/// register or unregister intervals.
pub type Callback = Box<dyn Fn(&InvalidateEvent) + Send + Sync>;

/// Handle of a registered interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IntervalId(u64);

/// Handle of a granted short-term reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RefId(u64);

struct Interval {
    id: u64,
    range: GuestRange,
    /// `None` for a hard interval.
    callback: Option<Mutex<Option<Callback>>>,
}

#[derive(Default)]
struct History {
    /// `(seq, range)` of recent invalidations, oldest first.
    ranges: VecDeque<(u64, GuestRange)>,
    /// Every invalidation with a sequence up to this one has been dropped
    /// from `ranges`.
    forgotten: u64,
}

/// An invalidation in progress.
struct Active {
    id: u64,
    /// What it still invalidates: an offline gives back each part it is
    /// done with ([`Invalidation::end_part`]).
    ranges: Vec<GuestRange>,
    /// An offline (refuses to overlap another); a remove event is not.
    exclusive: bool,
    /// The parts reads wait for (see [`Invalidation::hold`]); on the rest
    /// of `ranges` an announced invalidation only refuses new references.
    held: Vec<GuestRange>,
    /// The thread that announced it (an offline's), which a waiter raises
    /// to the ceiling (see [`Notifier::with_ceiling`]).
    holder: Option<i32>,
    /// `None` until a waiter looked at the holder's priority; then the
    /// nice value to put back at the end, if the holder was raised.
    raised: Option<Option<i32>>,
}

impl Active {
    fn overlaps(&self, range: &GuestRange) -> bool {
        self.ranges.iter().any(|r| r.overlaps(range))
    }

    fn holds(&self, range: &GuestRange) -> bool {
        self.held.iter().any(|r| r.overlaps(range))
    }
}

/// `ranges` without `part`: each range that overlaps it loses the overlap
/// (and splits in two if `part` lies inside it).
fn subtract(ranges: &mut Vec<GuestRange>, part: GuestRange) {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for r in ranges.drain(..) {
        if !r.overlaps(&part) {
            out.push(r);
            continue;
        }
        if r.start.0 < part.start.0 {
            out.push(GuestRange::new(r.start, part.start.0 - r.start.0));
        }
        if r.end() > part.end() {
            out.push(GuestRange::new(crate::ram::GuestAddress(part.end()), r.end() - part.end()));
        }
    }
    *ranges = out;
}

#[derive(Default)]
struct Registry {
    active: Vec<Active>,
    /// Short-term references: id, range, and whether a pin's guard holds it
    /// (only an unplug waits for those).
    refs: Vec<(u64, GuestRange, bool)>,
    intervals: Vec<Arc<Interval>>,
    next_id: u64,
}

impl Registry {
    /// An invalidation, announced or holding, overlaps `range`: no new
    /// reference is granted on it.
    fn invalidating(&self, range: &GuestRange) -> bool {
        self.active.iter().any(|a| a.overlaps(range))
    }

    /// A fresh id for an invalidation, interval or reference.
    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// A holding invalidation overlaps `range`: reads of it wait.
    fn holding(&self, range: &GuestRange) -> bool {
        self.active.iter().any(|a| a.holds(range))
    }
}

/// The invalidation sequence, the invalidations in progress, and the
/// registry of intervals and short-term references.
pub struct Notifier {
    seq: AtomicU64,
    lock: RwLock<History>,
    registry: Mutex<Registry>,
    changed: Condvar,
    /// The nice value a waiter raises an invalidation's holder to.
    ceiling: Option<i32>,
    /// Holders raised, and raises the kernel refused.
    raises: AtomicU64,
    raises_refused: AtomicU64,
}

impl Default for Notifier {
    fn default() -> Self {
        Notifier {
            seq: AtomicU64::new(0),
            lock: RwLock::new(History::default()),
            registry: Mutex::new(Registry { next_id: 1, ..Registry::default() }),
            changed: Condvar::new(),
            ceiling: None,
            raises: AtomicU64::new(0),
            raises_refused: AtomicU64::new(0),
        }
    }
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reg = self.registry();
        f.debug_struct("Notifier")
            .field("seq", &self.current())
            .field("active", &reg.active.len())
            .field("refs", &reg.refs.len())
            .field("intervals", &reg.intervals.len())
            .finish()
    }
}

/// The install lock, held for a check-and-install.
#[derive(Debug)]
pub struct InstallGuard<'a> {
    history: RwLockReadGuard<'a, History>,
    notifier: &'a Notifier,
}

impl InstallGuard<'_> {
    /// True if an invalidation overlapping `range` began since `seq` was
    /// taken: contents read since then may be stale and must not be
    /// installed. Install under this same guard if it returns false.
    pub fn read_retry(&self, range: GuestRange, seq: Seq) -> bool {
        self.notifier.retry_in(&self.history, range, seq)
    }
}

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("History").field("ranges", &self.ranges.len()).field("forgotten", &self.forgotten).finish()
    }
}

/// Installs held off (the write side of the install lock), from
/// [`Notifier::hold_installs`].
#[derive(Debug)]
pub struct InstallsHeld<'a> {
    history: RwLockWriteGuard<'a, History>,
    notifier: &'a Notifier,
}

impl<'a> InstallsHeld<'a> {
    /// Begins a non-exclusive invalidation (a discard that has already
    /// happened) while installs are held off; `mark` updates page states.
    pub fn invalidate(&mut self, ranges: &[GuestRange], reason: Reason, mark: impl FnOnce()) -> Invalidation<'a> {
        let notifier = self.notifier;
        let reg = notifier.registry();
        notifier.start(&mut self.history, reg, ranges, reason, false, mark)
    }
}

/// Who still holds an invalidated range when the deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Held {
    /// Short-term references.
    pub refs: usize,
    /// Hard intervals.
    pub hard: usize,
}

/// Why [`Notifier::invalidate_begin`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest range {0} overlaps an offline in progress")]
pub struct Overlap(pub GuestRange);

/// An invalidation in progress; it ends when dropped, waking every read
/// waiting for it.
#[derive(Debug)]
pub struct Invalidation<'a> {
    notifier: &'a Notifier,
    id: u64,
    seq: u64,
    ranges: Vec<GuestRange>,
    reason: Reason,
}

impl Notifier {
    /// A notifier with nothing registered and no invalidation in progress,
    /// with priority inheritance: a thread that waits for an
    /// invalidation (a read of a held range, a reference or pin waiting
    /// for an announced one, a fault deferred behind one) first raises
    /// the thread that announced it to nice `ceiling`, if it runs lower,
    /// and the invalidation puts its priority back when it ends. Linux's
    /// locks and condition variables lend no priority between nice levels:
    /// without this, an offline started from a nice-19 thread is kept off
    /// the CPU by the very vCPUs waiting for it. Only a waiter raises it, so
    /// an offline nobody waits for competes with nobody. Raising needs
    /// `CAP_SYS_NICE` (or a `RLIMIT_NICE` that allows it); see
    /// [`Self::raises`].
    pub fn with_ceiling(ceiling: Option<i32>) -> Self {
        Notifier { ceiling, ..Self::default() }
    }

    /// Holders raised to the ceiling so far, and raises the kernel refused.
    pub fn raises(&self) -> (u64, u64) {
        (self.raises.load(Ordering::Relaxed), self.raises_refused.load(Ordering::Relaxed))
    }

    /// Raises the holders of the invalidations overlapping `range` to the
    /// ceiling (see [`Self::with_ceiling`]); each at most once.
    pub fn raise_holders(&self, range: &GuestRange) {
        if self.ceiling.is_some() {
            let mut reg = self.registry();
            self.raise_locked(&mut reg, range);
        }
    }

    fn raise_locked(&self, reg: &mut Registry, range: &GuestRange) {
        let Some(ceiling) = self.ceiling else { return };
        for a in reg.active.iter_mut().filter(|a| a.raised.is_none() && a.overlaps(range)) {
            let Some(tid) = a.holder.and_then(rustix::process::Pid::from_raw) else { continue };
            let own = rustix::process::getpriority_process(Some(tid)).unwrap_or(ceiling);
            a.raised = Some(None);
            if own <= ceiling {
                continue;
            }
            match rustix::process::setpriority_process(Some(tid), ceiling) {
                Ok(()) => {
                    a.raised = Some(Some(own));
                    self.raises.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    self.raises_refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits (until `deadline`) for holding invalidations overlapping
    /// `range` to end, then returns the sequence to check with
    /// [`InstallGuard::read_retry`]. Returns `None` if the deadline passed
    /// first. An announced invalidation that does not hold its pages yet
    /// (see [`Self::announce`]) is not waited for.
    pub fn read_begin(&self, range: GuestRange, deadline: Instant) -> Option<Seq> {
        // The sequence is read with the registry still locked: a hold bumps
        // it and marks itself holding under that lock (see `hold`).
        let _reg = self.wait_registry(deadline, &range, |reg| !reg.holding(&range))?;
        Some(Seq(self.seq.load(Ordering::Acquire)))
    }

    /// Waits (until `deadline`) for every invalidation overlapping `range`,
    /// announced or holding, to end: what a taker of a reference waits for,
    /// since none is granted meanwhile. False if the deadline passed first.
    pub fn wait_idle(&self, range: GuestRange, deadline: Instant) -> bool {
        self.wait_registry(deadline, &range, |reg| !reg.invalidating(&range)).is_some()
    }

    /// Waits (until `deadline`) for the registry to satisfy `ready`, and
    /// returns it still locked; `None` if the deadline passed first. A
    /// wait raises the holders of the invalidations over `range` first.
    fn wait_registry(
        &self,
        deadline: Instant,
        range: &GuestRange,
        ready: impl Fn(&Registry) -> bool,
    ) -> Option<MutexGuard<'_, Registry>> {
        let mut reg = self.registry();
        while !ready(&reg) {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            self.raise_locked(&mut reg, range);
            reg = self.changed.wait_timeout(reg, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        Some(reg)
    }

    /// True if an invalidation overlapping `range` began since `seq`. This
    /// takes the install lock for the check alone; a resolver that goes on
    /// to install must use [`InstallGuard::read_retry`] instead.
    pub fn read_retry(&self, range: GuestRange, seq: Seq) -> bool {
        self.install_lock().read_retry(range, seq)
    }

    fn retry_in(&self, history: &History, range: GuestRange, seq: Seq) -> bool {
        if self.seq.load(Ordering::Acquire) == seq.0 {
            return false;
        }
        if history.forgotten > seq.0 {
            return true;
        }
        history.ranges.iter().rev().take_while(|(s, _)| *s > seq.0).any(|(_, r)| r.overlaps(&range))
    }

    /// The lock installs hold. An invalidation takes it exclusively to bump
    /// the sequence and mark its pages, so it waits for installs in flight
    /// and no install that checked an old sequence lands after it.
    pub fn install_lock(&self) -> InstallGuard<'_> {
        InstallGuard { history: self.lock.read().unwrap_or_else(|e| e.into_inner()), notifier: self }
    }

    /// Starts invalidating `ranges`: waits for installs in flight, bumps the
    /// sequence and runs `mark` (which updates page states) while installs
    /// are held off. Reads of an overlapping range wait until the returned
    /// guard is dropped, and no short-term reference is granted on it.
    ///
    /// An `exclusive` invalidation (an offline) refuses to start over a
    /// range another exclusive one is working on; a non-exclusive one (a
    /// remove event, which has already happened) always starts.
    pub fn invalidate_begin(
        &self,
        ranges: &[GuestRange],
        reason: Reason,
        exclusive: bool,
        mark: impl FnOnce(),
    ) -> Result<Invalidation<'_>, Overlap> {
        let mut history = self.lock.write().unwrap_or_else(|e| e.into_inner());
        self.begin_locked(&mut history, ranges, reason, exclusive, mark)
    }

    /// Holds installs off until the returned guard is dropped: no install
    /// is in flight while it is held, and every install that starts after
    /// it sees the invalidations begun under it. The event loop reads
    /// userfaultfd events under it, because reading a `REMOVE` is what lets
    /// the discarding thread go on and zap the range: an install that
    /// checked its sequence before the remove was applied must have landed
    /// before the read (the zap then removes it), never after.
    pub fn hold_installs(&self) -> InstallsHeld<'_> {
        InstallsHeld { history: self.lock.write().unwrap_or_else(|e| e.into_inner()), notifier: self }
    }

    fn begin_locked(
        &self,
        history: &mut History,
        ranges: &[GuestRange],
        reason: Reason,
        exclusive: bool,
        mark: impl FnOnce(),
    ) -> Result<Invalidation<'_>, Overlap> {
        let reg = self.registry();
        if exclusive {
            Self::check_overlap(&reg, ranges)?;
        }
        Ok(self.start(history, reg, ranges, reason, exclusive, mark))
    }

    fn check_overlap(reg: &Registry, ranges: &[GuestRange]) -> Result<(), Overlap> {
        for a in reg.active.iter().filter(|a| a.exclusive) {
            if let Some(r) = ranges.iter().find(|r| a.overlaps(r)) {
                return Err(Overlap(*r));
            }
        }
        Ok(())
    }

    /// Announces an exclusive invalidation of `ranges` without holding
    /// them: from now on no short-term reference or pin guard is granted
    /// on them, but reads, faults and installs go on as before. The caller
    /// calls the intervals back and waits for references to drain, and
    /// only then holds the pages with [`Invalidation::hold`]. So a thread
    /// that holds a reference the drain waits for is never blocked by the
    /// invalidation itself: a fault it takes meanwhile is served.
    pub fn announce(&self, ranges: &[GuestRange], reason: Reason) -> Result<Invalidation<'_>, Overlap> {
        let mut reg = self.registry();
        Self::check_overlap(&reg, ranges)?;
        let id = reg.take_id();
        reg.active.push(Active {
            id,
            ranges: ranges.to_vec(),
            exclusive: true,
            held: Vec::new(),
            holder: Some(rustix::thread::gettid().as_raw_nonzero().get()),
            raised: None,
        });
        let seq = self.seq.load(Ordering::Acquire) + 1;
        Ok(Invalidation { notifier: self, id, seq, ranges: ranges.to_vec(), reason })
    }

    /// Records `ranges` in the history under a new sequence value; called
    /// with the install lock held exclusively (`history`) and the registry
    /// locked, so that a read never takes the new value without seeing
    /// what took it.
    fn bump(&self, history: &mut History, ranges: &[GuestRange]) -> u64 {
        let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        for r in ranges {
            if history.ranges.len() == HISTORY {
                if let Some((s, _)) = history.ranges.pop_front() {
                    history.forgotten = s;
                }
            }
            history.ranges.push_back((seq, *r));
        }
        seq
    }

    /// Bumps the sequence, records the ranges and marks them, with the
    /// install lock held exclusively (`history`) and the registry locked.
    fn start(
        &self,
        history: &mut History,
        mut reg: MutexGuard<'_, Registry>,
        ranges: &[GuestRange],
        reason: Reason,
        exclusive: bool,
        mark: impl FnOnce(),
    ) -> Invalidation<'_> {
        let seq = self.bump(history, ranges);
        let id = reg.take_id();
        reg.active.push(Active { id, ranges: ranges.to_vec(), exclusive, held: ranges.to_vec(), holder: None, raised: None });
        drop(reg);
        mark();
        Invalidation { notifier: self, id, seq, ranges: ranges.to_vec(), reason }
    }

    /// Registers an interval whose `callback` is called by every overlapping
    /// invalidation.
    pub fn register(&self, range: GuestRange, callback: Callback) -> IntervalId {
        self.insert_interval(range, Some(Mutex::new(Some(callback))))
    }

    /// Registers a hard interval: no callback, invalidations can only wait
    /// for [`Self::unregister`].
    pub fn register_hard(&self, range: GuestRange) -> IntervalId {
        self.insert_interval(range, None)
    }

    fn insert_interval(&self, range: GuestRange, callback: Option<Mutex<Option<Callback>>>) -> IntervalId {
        let mut reg = self.registry();
        let id = reg.take_id();
        reg.intervals.push(Arc::new(Interval { id, range, callback }));
        IntervalId(id)
    }

    /// Removes an interval. If its callback is running, waits for it to
    /// return; it is never called after this returns.
    pub fn unregister(&self, id: IntervalId) {
        let removed = {
            let mut reg = self.registry();
            let pos = reg.intervals.iter().position(|i| i.id == id.0);
            let removed = pos.map(|p| reg.intervals.swap_remove(p));
            self.changed.notify_all();
            removed
        };
        if let Some(cb) = removed.as_ref().and_then(|i| i.callback.as_ref()) {
            // Waits for a running call, then disarms for good.
            cb.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }

    /// Registered intervals (pins) right now.
    pub fn intervals(&self) -> usize {
        self.registry().intervals.len()
    }

    /// Grants a short-term reference on `range` unless an invalidation
    /// overlapping it is in progress. Call it holding the install lock,
    /// after checking under that lock that the pages are present, so that
    /// they stay so until the reference is visible to invalidations (an
    /// invalidation begins only with the lock held exclusively).
    pub fn try_ref(&self, _proof: &InstallGuard<'_>, range: GuestRange) -> Option<RefId> {
        self.push_ref(range, false)
    }

    /// Grants the reference a pin's guard holds while its holder reads the
    /// memory, unless an invalidation overlapping `range` is in progress.
    /// Only an `Unplug` waits for it (migrate and evict keep the contents,
    /// and an access meanwhile faults and waits, so they need not): no page
    /// is discarded or poisoned under a live guard. Granted without the
    /// install lock, the caller must check afterwards that its pin is still
    /// armed: an invalidation that ended before the grant disarmed it.
    pub fn try_guard_ref(&self, range: GuestRange) -> Option<RefId> {
        self.push_ref(range, true)
    }

    fn push_ref(&self, range: GuestRange, guard: bool) -> Option<RefId> {
        let mut reg = self.registry();
        if reg.invalidating(&range) {
            return None;
        }
        let id = reg.take_id();
        reg.refs.push((id, range, guard));
        Some(RefId(id))
    }

    /// Drops a short-term reference.
    pub fn drop_ref(&self, id: RefId) {
        let mut reg = self.registry();
        reg.refs.retain(|(i, _, _)| *i != id.0);
        self.changed.notify_all();
    }

    /// The current sequence value (for reports and tests).
    pub fn current(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }
}

impl Invalidation<'_> {
    /// Holds the announced ranges (see [`Notifier::announce`]): waits for
    /// installs in flight, bumps the sequence (a read begun before now
    /// retries) and runs `mark`, which updates page states, while installs
    /// are held off. From then until the invalidation ends, reads of the
    /// ranges wait for it. Holding twice is harmless.
    pub fn hold(&mut self, mark: impl FnOnce()) {
        let ranges = self.ranges.clone();
        self.hold_part(&ranges, mark);
    }

    /// [`Self::hold`] for `parts` of the announced ranges only (an offline
    /// holds its range chunk by chunk): reads of the rest go on.
    pub fn hold_part(&mut self, parts: &[GuestRange], mark: impl FnOnce()) {
        let notifier = self.notifier;
        let mut history = notifier.lock.write().unwrap_or_else(|e| e.into_inner());
        // The registry stays locked from the bump until reads see the
        // hold: `read_begin` looks at both under that lock, so none can
        // take the new sequence without waiting for this invalidation.
        let mut reg = notifier.registry();
        self.seq = notifier.bump(&mut history, parts);
        if let Some(a) = reg.active.iter_mut().find(|a| a.id == self.id) {
            a.held.extend_from_slice(parts);
        }
        drop(reg);
        mark();
    }

    /// Ends the invalidation of `part` while the rest goes on: reads of it
    /// no longer wait, references and pins over it are granted again, and
    /// other offlines may take it. The caller has set its pages' final
    /// states (under the install lock).
    pub fn end_part(&mut self, part: GuestRange) {
        subtract(&mut self.ranges, part);
        let mut reg = self.notifier.registry();
        if let Some(a) = reg.active.iter_mut().find(|a| a.id == self.id) {
            subtract(&mut a.ranges, part);
            subtract(&mut a.held, part);
        }
        self.notifier.changed.notify_all();
    }

    /// Calls the callback of every interval overlapping the invalidated
    /// ranges, once per interval, with the overlapping part. Returns how
    /// many were called.
    pub fn call_intervals(&self) -> usize {
        let overlapping: Vec<Arc<Interval>> = {
            let reg = self.notifier.registry();
            reg.intervals
                .iter()
                .filter(|i| i.callback.is_some() && self.ranges.iter().any(|r| r.overlaps(&i.range)))
                .cloned()
                .collect()
        };
        let mut called = 0;
        for interval in overlapping {
            let Some(cb) = interval.callback.as_ref() else { continue };
            let cb = cb.lock().unwrap_or_else(|e| e.into_inner());
            let Some(cb) = cb.as_ref() else { continue }; // unregistered meanwhile
            let range = self.ranges.iter().find(|r| r.overlaps(&interval.range)).copied().unwrap_or(interval.range);
            let lo = range.start.0.max(interval.range.start.0);
            let hi = range.end().min(interval.range.end());
            let part = GuestRange::new(crate::ram::GuestAddress(lo), hi - lo);
            let event = InvalidateEvent { range: part, reason: self.reason, seq: self.seq };
            // A callback that panics is the holder's bug: it must not take
            // down the thread invalidating (the event loop, for a discard).
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cb(&event))).is_err() {
                tracing::error!(target: "apf", range = %part, "apf pin callback panicked");
            }
            called += 1;
        }
        called
    }

    /// Waits until no short-term reference (and, with `hard`, no hard
    /// interval) overlaps the invalidated ranges, or until `deadline`.
    /// An unplug waits for pin guards too. On timeout returns who still
    /// holds the range.
    pub fn wait_drained(&self, hard: bool, deadline: Instant) -> Result<(), Held> {
        let guards = self.reason == Reason::Unplug;
        let mut reg = self.notifier.registry();
        loop {
            let held = Held {
                refs: reg
                    .refs
                    .iter()
                    .filter(|(_, r, guard)| (guards || !guard) && self.ranges.iter().any(|x| x.overlaps(r)))
                    .count(),
                hard: if hard {
                    reg.intervals
                        .iter()
                        .filter(|i| i.callback.is_none() && self.ranges.iter().any(|x| x.overlaps(&i.range)))
                        .count()
                } else {
                    0
                },
            };
            if held == Held::default() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(held);
            }
            reg = self.notifier.changed.wait_timeout(reg, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

impl Drop for Invalidation<'_> {
    fn drop(&mut self) {
        let mut reg = self.notifier.registry();
        // Under the registry lock, which every raise takes: no waiter
        // raises the holder after its priority is put back.
        if let Some(a) = reg.active.iter().find(|a| a.id == self.id) {
            if let (Some(tid), Some(Some(nice))) = (a.holder.and_then(rustix::process::Pid::from_raw), a.raised) {
                // Lowering a priority needs no privilege.
                let _ = rustix::process::setpriority_process(Some(tid), nice);
            }
        }
        reg.active.retain(|a| a.id != self.id);
        self.notifier.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram::GuestAddress;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::time::Duration;

    fn range(start: u64, len: u64) -> GuestRange {
        GuestRange::new(GuestAddress(start), len)
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn retry_only_for_overlapping_invalidations() {
        let n = Notifier::default();
        let seq = n.read_begin(range(0, 4096), far()).unwrap();
        assert!(!n.read_retry(range(0, 4096), seq));
        drop(n.invalidate_begin(&[range(8192, 4096)], Reason::Migrate, true, || {}).unwrap());
        assert!(!n.read_retry(range(0, 4096), seq), "a disjoint invalidation does not force a retry");
        assert!(n.read_retry(range(8192, 8192), seq));
        drop(n.invalidate_begin(&[range(0, 4096)], Reason::Remove, false, || {}).unwrap());
        assert!(n.read_retry(range(0, 4096), seq));
        let seq2 = n.read_begin(range(0, 4096), far()).unwrap();
        assert!(!n.read_retry(range(0, 4096), seq2));
    }

    #[test]
    fn forgotten_history_retries_conservatively() {
        let n = Notifier::default();
        let seq = n.read_begin(range(0, 4096), far()).unwrap();
        for i in 0..HISTORY as u64 + 1 {
            drop(n.invalidate_begin(&[range((i + 10) << 12, 4096)], Reason::Evict, true, || {}).unwrap());
        }
        assert!(n.read_retry(range(0, 4096), seq), "older than the history: must retry");
    }

    #[test]
    fn read_begin_waits_for_overlapping_invalidation() {
        let n = Notifier::default();
        let inv = n.invalidate_begin(&[range(0, 8192)], Reason::Migrate, true, || {}).unwrap();
        assert!(n.read_begin(range(8192, 4096), Instant::now()).is_some());
        let t = Instant::now();
        assert!(n.read_begin(range(4096, 4096), t + Duration::from_millis(30)).is_none());
        assert!(t.elapsed() >= Duration::from_millis(30));
        std::thread::scope(|s| {
            let h = s.spawn(|| n.read_begin(range(4096, 4096), far()));
            std::thread::sleep(Duration::from_millis(20));
            drop(inv);
            assert!(h.join().unwrap().is_some());
        });
    }

    #[test]
    fn exclusive_invalidations_refuse_overlap() {
        let n = Notifier::default();
        let a = n.invalidate_begin(&[range(0, 8192)], Reason::Migrate, true, || {}).unwrap();
        assert_eq!(
            n.invalidate_begin(&[range(4096, 8192)], Reason::Evict, true, || {}).unwrap_err(),
            Overlap(range(4096, 8192))
        );
        // A remove event is not refused, and disjoint offlines run together.
        drop(n.invalidate_begin(&[range(4096, 4096)], Reason::Remove, false, || {}).unwrap());
        drop(n.invalidate_begin(&[range(8192, 4096)], Reason::Evict, true, || {}).unwrap());
        drop(a);
        drop(n.invalidate_begin(&[range(4096, 8192)], Reason::Evict, true, || {}).unwrap());
    }

    #[test]
    fn an_offline_held_part_by_part_gives_each_part_back_when_it_ends() {
        let n = Notifier::default();
        let now = Instant::now;
        let mut inv = n.announce(&[range(0, 3 * 8192)], Reason::Migrate).unwrap();
        let seq = n.read_begin(range(0, 4096), now()).expect("announced only: reads go on");
        inv.hold_part(&[range(0, 8192)], || {});
        // Reads wait for the held chunk only; references wait for all of it.
        assert!(n.read_begin(range(4096, 4096), now()).is_none());
        assert!(n.read_retry(range(0, 4096), seq), "the hold moved the chunk's sequence");
        let later = n.read_begin(range(8192, 4096), now()).expect("a chunk not held yet is read");
        assert!(!n.read_retry(range(8192, 4096), later));
        assert!(!n.wait_idle(range(8192, 4096), now()));
        inv.end_part(range(0, 8192));
        // The first chunk is free again: reads, references, other offlines.
        assert!(n.read_begin(range(0, 8192), now()).is_some());
        assert!(n.wait_idle(range(0, 8192), now()));
        assert!(n.try_guard_ref(range(0, 8192)).is_some());
        drop(n.announce(&[range(0, 8192)], Reason::Evict).unwrap());
        // The rest is still announced, and the next hold covers its chunk.
        assert!(!n.wait_idle(range(8192, 8192), now()));
        assert_eq!(n.announce(&[range(4096, 8192)], Reason::Evict).unwrap_err(), Overlap(range(4096, 8192)));
        inv.hold_part(&[range(8192, 8192)], || {});
        assert!(n.read_begin(range(8192, 4096), now()).is_none());
        assert!(n.read_begin(range(16384, 4096), now()).is_some());
        drop(inv);
        assert!(n.wait_idle(range(0, 3 * 8192), now()));
    }

    #[test]
    fn subtracting_a_part_splits_the_ranges_around_it() {
        let mut ranges = vec![range(0, 16384), range(32768, 4096)];
        subtract(&mut ranges, range(4096, 4096));
        assert_eq!(ranges, vec![range(0, 4096), range(8192, 8192), range(32768, 4096)]);
        subtract(&mut ranges, range(0, 40960));
        assert!(ranges.is_empty());
    }

    #[test]
    fn invalidation_waits_for_installs_in_flight() {
        let n = Notifier::default();
        let marked = AtomicBool::new(false);
        std::thread::scope(|s| {
            let guard = n.install_lock();
            let h = s.spawn(|| {
                drop(
                    n.invalidate_begin(&[range(0, 4096)], Reason::Unplug, true, || {
                        marked.store(true, Ordering::SeqCst)
                    })
                    .unwrap(),
                );
            });
            std::thread::sleep(Duration::from_millis(30));
            assert!(!marked.load(Ordering::SeqCst), "invalidation ran while an install held the lock");
            drop(guard);
            h.join().unwrap();
            assert!(marked.load(Ordering::SeqCst));
        });
    }

    #[test]
    fn callbacks_see_their_part_once() {
        let n = Notifier::default();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let id = n.register(range(0x4000, 0x4000), Box::new(move |ev| s2.lock().unwrap().push((ev.range, ev.reason))));
        let s3 = seen.clone();
        let _other =
            n.register(range(0x10_0000, 0x1000), Box::new(move |ev| s3.lock().unwrap().push((ev.range, ev.reason))));
        let inv = n.invalidate_begin(&[range(0x6000, 0x8000)], Reason::Evict, true, || {}).unwrap();
        assert_eq!(inv.call_intervals(), 1);
        assert_eq!(*seen.lock().unwrap(), vec![(range(0x6000, 0x2000), Reason::Evict)]);
        drop(inv);
        n.unregister(id);
        let inv = n.invalidate_begin(&[range(0x4000, 0x1000)], Reason::Evict, true, || {}).unwrap();
        assert_eq!(inv.call_intervals(), 0, "unregistered intervals are not called");
        assert_eq!(n.intervals(), 1);
    }

    #[test]
    fn unregister_waits_for_a_running_callback() {
        let n = Arc::new(Notifier::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let i2 = inside.clone();
        let id = n.register(
            range(0, 4096),
            Box::new(move |_| {
                i2.store(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
                i2.store(2, Ordering::SeqCst);
            }),
        );
        std::thread::scope(|s| {
            s.spawn(|| {
                let inv = n.invalidate_begin(&[range(0, 4096)], Reason::Migrate, true, || {}).unwrap();
                inv.call_intervals();
            });
            while inside.load(Ordering::SeqCst) == 0 {
                std::thread::yield_now();
            }
            n.unregister(id);
            assert_eq!(inside.load(Ordering::SeqCst), 2, "unregister returned while the callback ran");
        });
    }

    #[test]
    fn refs_drain_and_are_refused_while_invalidating() {
        let n = Notifier::default();
        let r = n.try_ref(&n.install_lock(), range(0, 4096)).unwrap();
        let inv = n.invalidate_begin(&[range(0, 8192)], Reason::Migrate, true, || {}).unwrap();
        assert!(n.try_ref(&n.install_lock(), range(4096, 4096)).is_none(), "no new reference while invalidating");
        assert!(n.try_ref(&n.install_lock(), range(8192, 4096)).is_some());
        let t = Instant::now();
        assert_eq!(inv.wait_drained(false, t + Duration::from_millis(20)), Err(Held { refs: 1, hard: 0 }));
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                n.drop_ref(r);
            });
            assert_eq!(inv.wait_drained(false, far()), Ok(()));
        });
    }

    #[test]
    fn an_announced_invalidation_refuses_references_but_lets_reads_go_on_until_it_holds() {
        let n = Notifier::default();
        let seq = n.read_begin(range(0, 4096), far()).unwrap();
        let mut inv = n.announce(&[range(0, 8192)], Reason::Evict).unwrap();
        assert!(n.try_ref(&n.install_lock(), range(4096, 4096)).is_none(), "no new reference once announced");
        assert!(n.try_guard_ref(range(0, 4096)).is_none(), "no new guard once announced");
        assert!(matches!(n.announce(&[range(4096, 4096)], Reason::Migrate), Err(Overlap(_))));
        // Reads neither wait nor retry: nothing is held yet.
        assert!(n.read_begin(range(0, 4096), Instant::now()).is_some());
        assert!(!n.read_retry(range(0, 4096), seq));
        let mut marked = false;
        inv.hold(|| marked = true);
        assert!(marked);
        assert!(n.read_retry(range(0, 4096), seq), "a read begun before the hold retries");
        assert!(n.read_begin(range(0, 4096), Instant::now() + Duration::from_millis(10)).is_none(), "reads wait");
        assert!(n.read_begin(range(8192, 4096), Instant::now()).is_some(), "a disjoint read does not");
        drop(inv);
        assert!(n.read_begin(range(0, 4096), Instant::now()).is_some());
        assert!(n.try_ref(&n.install_lock(), range(0, 4096)).is_some());
    }

    #[test]
    fn only_an_unplug_waits_for_pin_guards() {
        let n = Notifier::default();
        let g = n.try_guard_ref(range(0, 4096)).unwrap();
        for reason in [Reason::Migrate, Reason::Evict, Reason::HostBlock] {
            let inv = n.invalidate_begin(&[range(0, 4096)], reason, true, || {}).unwrap();
            assert!(n.try_guard_ref(range(0, 4096)).is_none(), "no new guard while invalidating");
            assert_eq!(inv.wait_drained(true, Instant::now()), Ok(()), "{reason:?} waited for a guard");
        }
        let inv = n.invalidate_begin(&[range(0, 8192)], Reason::Unplug, true, || {}).unwrap();
        let t = Instant::now() + Duration::from_millis(10);
        assert_eq!(inv.wait_drained(true, t), Err(Held { refs: 1, hard: 0 }));
        n.drop_ref(g);
        assert_eq!(inv.wait_drained(true, Instant::now()), Ok(()));
    }

    #[test]
    fn hard_intervals_hold_until_unregistered() {
        let n = Notifier::default();
        let h = n.register_hard(range(0, 4096));
        let inv = n.invalidate_begin(&[range(0, 4096)], Reason::Migrate, true, || {}).unwrap();
        assert_eq!(inv.call_intervals(), 0, "hard intervals have no callback");
        assert_eq!(inv.wait_drained(false, Instant::now()), Ok(()), "ignored unless asked");
        assert_eq!(inv.wait_drained(true, Instant::now() + Duration::from_millis(10)), Err(Held { refs: 0, hard: 1 }));
        n.unregister(h);
        assert_eq!(inv.wait_drained(true, Instant::now()), Ok(()));
    }
}
