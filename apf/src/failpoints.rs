//! Failpoints in the userfaultfd wrapper (feature `failpoints`, off by
//! default): make one chosen call of one chosen ioctl report a chosen errno,
//! optionally after really doing its first pages, while every other call
//! stays real. This is how the tests drive the engine's error paths on a
//! real kernel; nothing here fakes what the kernel does.
//!
//! Failpoints belong to one engine's descriptor, so tests running in
//! parallel in one process do not see each other's.
//!
//! ```ignore
//! let fp = engine.failpoints();
//! // The second UFFDIO_MOVE from now fails with ENOMEM after moving 3 pages.
//! fp.arm(Rule::new(Op::Move, libc::ENOMEM).skip(1).partial(3));
//! ```

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

pub use crate::uffd::Op;

/// One armed failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// The ioctl it applies to.
    pub op: Op,
    /// The errno the failing call reports.
    pub errno: i32,
    /// Matching calls to let through before failing.
    pub skip: u64,
    /// Calls to fail once it fires (`u64::MAX`: every one from then on).
    pub times: u64,
    /// Pages really done before the failure is reported (partial progress,
    /// as the kernel reports it: `done` bytes).
    pub partial_pages: usize,
    /// Pages really done beyond `partial_pages` but not reported: what the
    /// kernel was seen to do when a `UFFDIO_MOVE` stopped part-way (the
    /// page it stopped at had moved all the same).
    pub uncounted_pages: usize,
    /// Only calls whose range touches `[lo, hi)` (host addresses) match:
    /// the destination, or for `MOVE` the source too.
    pub within: Option<(u64, u64)>,
    /// Instead of failing, the call waits at a gate until
    /// [`FailPoints::open_gate`] (or [`GATE_DEADLINE`]), then runs for real:
    /// a test lines up other events while the call is held.
    pub pause: bool,
}

/// The longest a paused call waits at its gate.
pub const GATE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

impl Rule {
    /// Fails the next matching call of `op` with `errno`, once.
    pub fn new(op: Op, errno: i32) -> Rule {
        Rule { op, errno, skip: 0, times: 1, partial_pages: 0, uncounted_pages: 0, within: None, pause: false }
    }

    /// Holds the next matching call of `op` at a gate, then lets it run.
    pub fn pause(op: Op) -> Rule {
        Rule { pause: true, ..Rule::new(op, 0) }
    }

    /// Lets `n` matching calls through first.
    pub fn skip(mut self, n: u64) -> Rule {
        self.skip = n;
        self
    }

    /// Fails `n` calls once it fires (`u64::MAX`: every one).
    pub fn times(mut self, n: u64) -> Rule {
        self.times = n;
        self
    }

    /// Really does the first `pages` pages of the failing call.
    pub fn partial(mut self, pages: usize) -> Rule {
        self.partial_pages = pages;
        self
    }

    /// Really does `pages` more pages than the failure reports done.
    pub fn uncounted(mut self, pages: usize) -> Rule {
        self.uncounted_pages = pages;
        self
    }

    /// Matches only calls touching host addresses `[lo, hi)`.
    pub fn within(mut self, lo: u64, hi: u64) -> Rule {
        self.within = Some((lo, hi));
        self
    }
}

/// What a failing call does (taken from its rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// The errno to report.
    pub errno: i32,
    /// Pages to really do first, and report done.
    pub partial_pages: usize,
    /// Pages to really do after those, without reporting them.
    pub uncounted_pages: usize,
    /// Wait at the gate, then run for real (no failure).
    pub pause: bool,
}

/// Behaviours of the engine that a failpoint can switch off, so a test can
/// show that the checks meant to catch their absence do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// The event loop reads events without holding installs off, so a
    /// `REMOVE` can be read (and the discarding thread let go) before the
    /// installs that checked an older sequence have landed.
    UnorderedRemoves,
    /// The event loop itself: switched off, its thread panics at its next
    /// round, as a bug in it would make it. The engine must notice.
    EventLoop,
}

/// The failpoints of one userfaultfd.
#[derive(Debug, Default)]
pub struct FailPoints {
    /// Armed rules; the count lets the fast path skip the lock.
    armed: AtomicUsize,
    rules: Mutex<Vec<Rule>>,
    fired: AtomicUsize,
    unordered_removes: AtomicBool,
    kill_event_loop: AtomicBool,
    /// (calls waiting at the gate, gate open)
    gate: Mutex<(usize, bool)>,
    gate_changed: Condvar,
}

impl FailPoints {
    /// Arms `rule`. Rules are checked in the order armed; a call is failed
    /// by the first that fires.
    pub fn arm(&self, rule: Rule) {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        rules.push(rule);
        self.armed.store(rules.len(), Ordering::Release);
    }

    /// Disarms every rule.
    pub fn clear(&self) {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        rules.clear();
        self.armed.store(0, Ordering::Release);
    }

    /// Calls failed so far.
    pub fn fired(&self) -> usize {
        self.fired.load(Ordering::Acquire)
    }

    /// Rules still armed (not yet used up).
    pub fn pending(&self) -> usize {
        self.armed.load(Ordering::Acquire)
    }

    /// Waits until a paused call is at the gate, or `timeout`; true if one is.
    pub fn wait_paused(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        while gate.0 == 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            gate = self.gate_changed.wait_timeout(gate, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }

    /// Lets every paused call (and every later one) through.
    pub fn open_gate(&self) {
        self.gate.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.gate_changed.notify_all();
    }

    /// Called by the wrapper for a pausing rule: waits at the gate.
    pub(crate) fn wait_at_gate(&self) {
        let deadline = Instant::now() + GATE_DEADLINE;
        let mut gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        gate.0 += 1;
        self.gate_changed.notify_all();
        while !gate.1 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            gate = self.gate_changed.wait_timeout(gate, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        gate.0 -= 1;
    }

    /// Turns a behaviour off (`off = true`) or back on.
    pub fn switch_off(&self, switch: Switch, off: bool) {
        match switch {
            Switch::UnorderedRemoves => self.unordered_removes.store(off, Ordering::Release),
            Switch::EventLoop => self.kill_event_loop.store(off, Ordering::Release),
        }
    }

    /// Whether `switch` is turned off.
    pub fn is_off(&self, switch: Switch) -> bool {
        match switch {
            Switch::UnorderedRemoves => self.unordered_removes.load(Ordering::Acquire),
            Switch::EventLoop => self.kill_event_loop.load(Ordering::Acquire),
        }
    }

    /// Called by the wrapper before each ioctl: the failure to report, if a
    /// rule fires on this call.
    pub(crate) fn take(&self, op: Op, addrs: [u64; 2], len: usize) -> Option<Failure> {
        if self.armed.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let touches = |r: &Rule| match r.within {
            None => true,
            Some((lo, hi)) => addrs.iter().any(|&a| a < hi && a.saturating_add(len as u64) > lo),
        };
        let i = rules.iter().position(|r| r.op == op && touches(r))?;
        let rule = &mut rules[i];
        if rule.skip > 0 {
            rule.skip -= 1;
            return None;
        }
        let failure = Failure {
            errno: rule.errno,
            partial_pages: rule.partial_pages,
            uncounted_pages: rule.uncounted_pages,
            pause: rule.pause,
        };
        rule.times = rule.times.saturating_sub(1);
        if rule.times == 0 {
            rules.remove(i);
        }
        self.armed.store(rules.len(), Ordering::Release);
        self.fired.fetch_add(1, Ordering::AcqRel);
        Some(failure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uffd::{Features, RegisterMode, Uffd, PAGE_SIZE};

    fn anon(pages: usize) -> u64 {
        let map = crate::ram::AnonMapping::new(pages * PAGE_SIZE).unwrap();
        let addr = map.ptr() as u64;
        std::mem::forget(map);
        addr
    }

    #[test]
    fn a_rule_fails_the_chosen_call_after_real_partial_progress() {
        let uffd = Uffd::new(Features::empty(), Features::empty()).unwrap();
        let a = anon(8);
        uffd.register(a, 8 * PAGE_SIZE as u64, RegisterMode::MISSING).unwrap();
        let src = vec![7u8; 8 * PAGE_SIZE];
        uffd.failpoints().arm(Rule::new(Op::Copy, libc::ENOMEM).skip(1).partial(2));
        // The first call passes.
        // SAFETY: the test's own anonymous mapping, reached only through raw pointers; `src` is long enough.
        assert_eq!(unsafe { uffd.copy(a, src.as_ptr(), PAGE_SIZE, false) }, Ok(PAGE_SIZE));
        // The second does two pages for real, then reports ENOMEM.
        // SAFETY: the test's own anonymous mapping, reached only through raw pointers; `src` is long enough.
        let e = unsafe { uffd.copy(a + PAGE_SIZE as u64, src.as_ptr(), 4 * PAGE_SIZE, false) }.unwrap_err();
        assert_eq!((e.errno, e.done), (libc::ENOMEM, 2 * PAGE_SIZE));
        // The kernel really has those two pages: a COPY there is EEXIST.
        // SAFETY: the test's own anonymous mapping, reached only through raw pointers; `src` is long enough.
        let e = unsafe { uffd.copy(a + 2 * PAGE_SIZE as u64, src.as_ptr(), PAGE_SIZE, false) }.unwrap_err();
        assert_eq!(e.errno, libc::EEXIST);
        // Used up: the next call is real again.
        // SAFETY: the test's own anonymous mapping, reached only through raw pointers; `src` is long enough.
        assert_eq!(unsafe { uffd.copy(a + 3 * PAGE_SIZE as u64, src.as_ptr(), PAGE_SIZE, false) }, Ok(PAGE_SIZE));
        assert_eq!((uffd.failpoints().fired(), uffd.failpoints().pending()), (1, 0));
        uffd.wake(a, 8 * PAGE_SIZE).unwrap();
    }

    #[test]
    fn a_rule_matches_only_its_range_and_op() {
        let uffd = Uffd::new(Features::empty(), Features::empty()).unwrap();
        let a = anon(4);
        uffd.register(a, 4 * PAGE_SIZE as u64, RegisterMode::MISSING).unwrap();
        let fp = uffd.failpoints();
        fp.arm(Rule::new(Op::ZeroPage, libc::EAGAIN).within(a + 3 * PAGE_SIZE as u64, a + 4 * PAGE_SIZE as u64));
        fp.arm(Rule::new(Op::Wake, libc::EIO).times(u64::MAX));
        // SAFETY: the test's own anonymous mapping, reached only through raw pointers.
        assert_eq!(unsafe { uffd.zeropage(a, PAGE_SIZE, true) }, Ok(PAGE_SIZE));
        // SAFETY: the test's own anonymous mapping, reached only through raw pointers.
        let e = unsafe { uffd.zeropage(a + 3 * PAGE_SIZE as u64, PAGE_SIZE, true) }.unwrap_err();
        assert_eq!(e.errno, libc::EAGAIN);
        for _ in 0..3 {
            assert_eq!(uffd.wake(a, PAGE_SIZE).unwrap_err().errno, libc::EIO);
        }
        fp.clear();
        uffd.wake(a, 4 * PAGE_SIZE).unwrap();
    }
}
