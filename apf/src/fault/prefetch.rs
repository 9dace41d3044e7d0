//! Prefetch: per-thread stream detection.
//!
//! Like the kernel's readahead, per faulting thread: a fault where the last
//! window ended (or one stride on from the last fault, twice in a row) is a
//! stream, and its window doubles up to the configured maximum; anything else
//! resets it to one page, so random access pays nothing for prefetch.
//! Where faults carry no thread id (a descriptor without `THREAD_ID`, such
//! as Firecracker's), streams are told apart by address instead
//! ([`StreamTable::key_at`]).

/// Largest stride, in pages, that counts as a stream.
const MAX_STRIDE: i64 = 64;
/// Threads tracked at once; the least recently seen is replaced.
const STREAMS: usize = 32;

/// What to install for one fault: `count` pages starting at the faulting
/// page and stepping by `stride` pages (negative for descending access).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Step between pages, in pages (never 0).
    pub stride: i64,
    /// Number of pages, the faulting one included (at least 1).
    pub count: usize,
}

#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    tid: u32,
    last: i64,
    expect: i64,
    delta: i64,
    window: usize,
    stamp: u64,
}

/// Stream state for the threads seen most recently.
#[derive(Debug)]
pub struct StreamTable {
    streams: [Stream; STREAMS],
    clock: u64,
    max_window: usize,
    /// The last key [`StreamTable::key_at`] made up.
    last_key: u32,
}

impl StreamTable {
    /// A table that plans windows of at most `max_window` pages.
    pub fn new(max_window: usize) -> Self {
        StreamTable { streams: [Stream::default(); STREAMS], clock: 0, max_window: max_window.max(1), last_key: 0 }
    }

    /// The key under which to [`plan`](Self::plan) and
    /// [`trim`](Self::trim) a fault on `page` when faults carry no thread
    /// id: the stream this page continues (the page it expects next), else
    /// the stream whose last page is nearest, within the largest stride,
    /// else a new one. Threads that walk apart regions keep apart streams,
    /// as they would with thread ids; the keys never mix with real ones
    /// (a table is keyed by one or the other).
    pub fn key_at(&mut self, page: i64) -> u32 {
        let live = || self.streams.iter().filter(|s| s.stamp != 0);
        if let Some(s) = live().find(|s| s.window > 0 && s.expect == page) {
            return s.tid;
        }
        let near = live().map(|s| ((s.last - page).abs(), s)).filter(|(d, _)| *d <= MAX_STRIDE).min_by_key(|(d, _)| *d);
        if let Some((_, s)) = near {
            return s.tid;
        }
        self.last_key = self.last_key.wrapping_add(1);
        self.last_key
    }

    /// Plans the install for a fault by thread `tid` on page `page` (a
    /// linear page number; callers clamp the plan to the region).
    pub fn plan(&mut self, tid: u32, page: i64) -> Plan {
        self.clock += 1;
        let clock = self.clock;
        let max = self.max_window;
        let idx = match self.streams.iter().position(|s| s.stamp != 0 && s.tid == tid) {
            Some(i) => i,
            None => {
                let i = (0..STREAMS).min_by_key(|&i| self.streams[i].stamp).unwrap_or(0);
                self.streams[i] = Stream { tid, last: page, expect: i64::MIN, delta: 0, window: 0, stamp: clock };
                self.streams[i].stamp = clock;
                return self.finish(i, page, 1, 1);
            }
        };
        let s = self.streams[idx];
        let delta = page - s.last;
        let stride = if s.delta != 0 { s.delta.signum() * s.delta.abs().min(MAX_STRIDE) } else { 1 };
        if page == s.expect && s.window > 0 {
            // The stream reached the end of its last window: grow.
            let window = (s.window * 2).min(max);
            self.finish(idx, page, stride, window)
        } else if delta != 0 && delta == s.delta && delta.abs() <= MAX_STRIDE {
            // The same step twice: a (strided) stream starts.
            self.finish(idx, page, delta, 2.min(max))
        } else {
            self.streams[idx].delta = delta;
            self.finish(idx, page, 1, 1)
        }
    }

    fn finish(&mut self, idx: usize, page: i64, stride: i64, count: usize) -> Plan {
        let s = &mut self.streams[idx];
        s.stamp = self.clock;
        s.window = count;
        if count > 1 {
            s.delta = stride;
            s.last = page + stride * (count as i64 - 1);
            s.expect = page + stride * count as i64;
        } else {
            s.last = page;
            s.expect = i64::MIN;
        }
        Plan { stride, count }
    }

    /// Tells the table the plan was cut short to `installed` pages (region
    /// edge, or pages already present), so the next fault is still seen as
    /// the stream's continuation.
    pub fn trim(&mut self, tid: u32, page: i64, stride: i64, installed: usize) {
        if let Some(s) = self.streams.iter_mut().find(|s| s.stamp != 0 && s.tid == tid) {
            if installed >= 1 {
                s.window = installed;
                s.last = page + stride * (installed as i64 - 1);
                s.expect = page + stride * installed as i64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_stream_window_doubles_to_max() {
        let mut t = StreamTable::new(16);
        let mut page = 100;
        let mut windows = vec![];
        for _ in 0..7 {
            let plan = t.plan(1, page);
            assert_eq!(plan.stride, 1);
            windows.push(plan.count);
            page += plan.count as i64;
        }
        assert_eq!(windows, [1, 1, 2, 4, 8, 16, 16]);
    }

    #[test]
    fn random_access_gets_single_pages() {
        let mut t = StreamTable::new(64);
        for page in [5, 900, 17, 4000, 33, 2] {
            assert_eq!(t.plan(7, page).count, 1);
        }
    }

    #[test]
    fn strided_and_descending_streams_are_detected() {
        let mut t = StreamTable::new(8);
        assert_eq!(t.plan(1, 0).count, 1);
        assert_eq!(t.plan(1, 4).count, 1);
        let p = t.plan(1, 8);
        assert_eq!((p.stride, p.count), (4, 2));
        // The next fault lands one stride after the window.
        let p = t.plan(1, 16);
        assert_eq!((p.stride, p.count), (4, 4));

        let mut t = StreamTable::new(8);
        t.plan(2, 50);
        t.plan(2, 49);
        let p = t.plan(2, 48);
        assert_eq!((p.stride, p.count), (-1, 2));
        assert_eq!(t.plan(2, 46).count, 4);
    }

    #[test]
    fn threads_are_tracked_apart() {
        let mut t = StreamTable::new(8);
        // Thread 1 reads sequentially, thread 2 with a stride of 3 pages;
        // their faults interleave.
        for (a, b) in [(0, 1000), (1, 1003)] {
            assert_eq!(t.plan(1, a).count, 1);
            assert_eq!(t.plan(2, b).count, 1);
        }
        assert_eq!(t.plan(1, 2), Plan { stride: 1, count: 2 });
        assert_eq!(t.plan(2, 1006), Plan { stride: 3, count: 2 });
        assert_eq!(t.plan(1, 4), Plan { stride: 1, count: 4 });
        assert_eq!(t.plan(2, 1012), Plan { stride: 3, count: 4 });
    }

    /// Without thread ids: the same interleaving as above, keyed by
    /// address, still finds both streams; one key for every fault (what a
    /// table keyed by a thread id of 0 would do) finds neither.
    #[test]
    fn streams_are_told_apart_by_address_without_thread_ids() {
        let mut t = StreamTable::new(8);
        let plan = |t: &mut StreamTable, page| {
            let key = t.key_at(page);
            t.plan(key, page)
        };
        for (a, b) in [(0, 1000), (1, 1003)] {
            assert_eq!(plan(&mut t, a).count, 1);
            assert_eq!(plan(&mut t, b).count, 1);
        }
        assert_eq!(plan(&mut t, 2), Plan { stride: 1, count: 2 });
        assert_eq!(plan(&mut t, 1006), Plan { stride: 3, count: 2 });
        assert_eq!(plan(&mut t, 4), Plan { stride: 1, count: 4 });
        assert_eq!(plan(&mut t, 1012), Plan { stride: 3, count: 4 });
        // A fault far from every stream starts its own.
        assert_eq!(plan(&mut t, 500_000).count, 1);
        assert_eq!(plan(&mut t, 8), Plan { stride: 1, count: 8 }, "the first stream goes on");

        let mut one = StreamTable::new(8);
        let counts: Vec<usize> = [0, 1000, 1, 1003, 2, 1006, 4, 1012].iter().map(|&p| one.plan(0, p).count).collect();
        assert!(counts.iter().all(|&c| c == 1), "{counts:?}");
    }

    #[test]
    fn trim_keeps_the_stream_after_a_short_window() {
        let mut t = StreamTable::new(8);
        t.plan(1, 0);
        t.plan(1, 1);
        assert_eq!(t.plan(1, 2).count, 2);
        // Only page 2 could be installed; the thread faults on page 3 next.
        t.trim(1, 2, 1, 1);
        assert_eq!(t.plan(1, 3), Plan { stride: 1, count: 2 });
    }
}
