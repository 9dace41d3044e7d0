//! The invalidation sequence: how a resolver learns that the contents it
//! filled went stale before it installed them.
//!
//! Like KVM's `mmu_invalidate_seq`: a resolver takes `read_begin` before it
//! fills a buffer, then, holding [`Notifier::install_lock`] (the lock every
//! invalidation takes to bump the sequence), checks `read_retry` and
//! installs. An invalidation that ran in between is seen, and the buffer is
//! thrown away; one that starts later waits for the install to finish.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, RwLock, RwLockReadGuard};
use std::time::Instant;

use crate::ram::GuestRange;

/// A snapshot of the invalidation sequence, from [`Notifier::read_begin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seq(u64);

/// The invalidation sequence and the ranges being invalidated right now.
#[derive(Debug, Default)]
pub struct Notifier {
    seq: AtomicU64,
    lock: RwLock<()>,
    active: Mutex<Vec<(u64, GuestRange)>>,
    ended: Condvar,
}

/// An invalidation in progress over a range; ends when dropped.
#[derive(Debug)]
pub struct Invalidation<'a> {
    notifier: &'a Notifier,
    id: u64,
}

impl Notifier {
    /// A notifier with no invalidation in progress.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits (until `deadline`) for invalidations overlapping `range` to end,
    /// then returns the sequence to check with [`Self::read_retry`].
    /// Returns `None` if the deadline passed first.
    pub fn read_begin(&self, range: GuestRange, deadline: Instant) -> Option<Seq> {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        while active.iter().any(|(_, r)| r.overlaps(&range)) {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            active = self.ended.wait_timeout(active, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        Some(Seq(self.seq.load(Ordering::Acquire)))
    }

    /// True if an invalidation began since `seq` was taken, so contents read
    /// since then may be stale. Call it holding [`Self::install_lock`] and
    /// install under the same guard. (The sequence is global: an
    /// invalidation anywhere makes every in-flight fill retry, which is
    /// conservative and keeps the check one load.)
    pub fn read_retry(&self, seq: Seq) -> bool {
        self.seq.load(Ordering::Acquire) != seq.0
    }

    /// The lock installs hold; an invalidation takes it exclusively to bump
    /// the sequence, so it waits for installs in flight and no install that
    /// checked an old sequence can land after it.
    pub fn install_lock(&self) -> RwLockReadGuard<'_, ()> {
        self.lock.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts invalidating `range`: waits for installs in flight, bumps the
    /// sequence and runs `mark` (which updates page states) while installs
    /// are held off. [`Self::read_begin`] on an overlapping range waits until
    /// the returned guard is dropped.
    pub fn invalidate_begin(&self, range: GuestRange, mark: impl FnOnce()) -> Invalidation<'_> {
        let _w = self.lock.write().unwrap_or_else(|e| e.into_inner());
        let id = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        self.active.lock().unwrap_or_else(|e| e.into_inner()).push((id, range));
        mark();
        Invalidation { notifier: self, id }
    }

    /// The current sequence value (for reports and tests).
    pub fn current(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }
}

impl Drop for Invalidation<'_> {
    fn drop(&mut self) {
        let mut active = self.notifier.active.lock().unwrap_or_else(|e| e.into_inner());
        active.retain(|(id, _)| *id != self.id);
        self.notifier.ended.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram::GuestAddress;
    use std::time::Duration;

    fn range(start: u64, len: u64) -> GuestRange {
        GuestRange::new(GuestAddress(start), len)
    }

    #[test]
    fn retry_after_invalidation() {
        let n = Notifier::new();
        let far = Instant::now() + Duration::from_secs(1);
        let seq = n.read_begin(range(0, 4096), far).unwrap();
        assert!(!n.read_retry(seq));
        drop(n.invalidate_begin(range(8192, 4096), || {}));
        assert!(n.read_retry(seq));
        let seq2 = n.read_begin(range(0, 4096), far).unwrap();
        assert!(!n.read_retry(seq2));
    }

    #[test]
    fn read_begin_waits_for_overlapping_invalidation() {
        let n = Notifier::new();
        let inv = n.invalidate_begin(range(0, 8192), || {});
        // A disjoint range does not wait.
        assert!(n.read_begin(range(8192, 4096), Instant::now()).is_some());
        // An overlapping one times out while the invalidation runs.
        let t = Instant::now();
        assert!(n.read_begin(range(4096, 4096), t + Duration::from_millis(30)).is_none());
        assert!(t.elapsed() >= Duration::from_millis(30));
        std::thread::scope(|s| {
            let h = s.spawn(|| n.read_begin(range(4096, 4096), Instant::now() + Duration::from_secs(5)));
            std::thread::sleep(Duration::from_millis(20));
            drop(inv);
            assert!(h.join().unwrap().is_some());
        });
    }

    #[test]
    fn invalidation_waits_for_installs_in_flight() {
        let n = Notifier::new();
        let marked = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let guard = n.install_lock();
            let h = s.spawn(|| {
                drop(n.invalidate_begin(range(0, 4096), || marked.store(true, Ordering::SeqCst)));
            });
            std::thread::sleep(Duration::from_millis(30));
            assert!(!marked.load(Ordering::SeqCst), "invalidation ran while an install held the lock");
            drop(guard);
            h.join().unwrap();
            assert!(marked.load(Ordering::SeqCst));
        });
    }
}
