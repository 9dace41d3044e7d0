//! The guest's own view of its first touches: a fixed-size log-linear
//! histogram of cycles (no allocation, so the `no_std` agent keeps one per
//! phase on its stack), sent to the VMM in [`HIST_CHUNK`]-bucket pieces
//! ([`crate::Request::Histogram`]) and closed by [`crate::Request::Timed`].
//!
//! Buckets: values below 8 have one bucket each; above, every power of two
//! is split in 8 equal sub-buckets, so a bucket is at most 12.5% wide
//! relative to its lower edge. Values of 2^40 and more (minutes of cycles)
//! share the last bucket; the exact maximum is kept apart.
//!
//! Most first touches find a page the engine prefetched and take no fault,
//! so the percentiles of all touches say little about faults. The VMM
//! takes [`Histogram::slowest`]`(n)`, `n` being the faults the engine read
//! for that vCPU in that phase, and reads its percentiles: the guest's view
//! of what a fault cost it, from the instruction's start to its retry's
//! end, including the time in the kernel before the engine read the fault.
//!
//! ```
//! use agent_proto::timing::Histogram;
//! let mut h = Histogram::new();
//! for v in [100, 200, 90_000, 120_000] {
//!     h.record(v);
//! }
//! // The two slowest: the two faults among four touches.
//! let faults = h.slowest(2);
//! assert_eq!(faults.count(), 2);
//! assert!(faults.quantile(0.5).unwrap() >= 90_000);
//! assert_eq!(faults.quantile(1.0), Some(120_000));
//! ```

/// Sub-buckets per power of two, as a shift.
const SUB_BITS: u32 = 3;
/// Sub-buckets per power of two.
const SUB: u64 = 1 << SUB_BITS;
/// Values from `1 << TOP_BITS` on share the last bucket.
const TOP_BITS: u32 = 40;

/// Buckets in a [`Histogram`].
pub const BUCKETS: usize = (SUB + (TOP_BITS - SUB_BITS) as u64 * SUB) as usize;

/// Buckets one [`crate::Request::Histogram`] carries.
pub const HIST_CHUNK: usize = 24;

/// Phases a vCPU times, as [`crate::Request::Timed`] names them.
pub mod phase {
    /// The first pass: the touch workload's touches, a restore's verify,
    /// or the first pass of a stress workload (fresh pages).
    pub const TOUCH: u32 = 1;
    /// Every later access of the stress passes and verifies: its slow
    /// ones are re-faults of pages an offline took.
    pub const STRESS: u32 = 2;

    /// A phase's name, for reports; None for a value no phase has.
    pub const fn name(phase: u32) -> Option<&'static str> {
        match phase {
            TOUCH => Some("touch"),
            STRESS => Some("stress"),
            _ => None,
        }
    }
}

/// The bucket that holds `value`.
pub const fn bucket_of(value: u64) -> usize {
    if value < SUB {
        return value as usize;
    }
    let exp = 63 - value.leading_zeros();
    if exp >= TOP_BITS {
        return BUCKETS - 1;
    }
    ((exp - SUB_BITS + 1) as u64 * SUB + ((value >> (exp - SUB_BITS)) & (SUB - 1))) as usize
}

/// The smallest value bucket `b` holds (`b` below [`BUCKETS`]).
pub const fn bucket_low(b: usize) -> u64 {
    let b = b as u64;
    if b < SUB {
        return b;
    }
    let exp = (b / SUB) as u32 - 1 + SUB_BITS;
    (SUB + b % SUB) << (exp - SUB_BITS)
}

/// The largest value bucket `b` holds; the last bucket holds everything
/// from its lower edge on.
pub const fn bucket_high(b: usize) -> u64 {
    if b + 1 >= BUCKETS {
        u64::MAX
    } else {
        bucket_low(b + 1) - 1
    }
}

/// Counts of values per bucket, and the largest value recorded.
#[derive(Clone, PartialEq, Eq)]
pub struct Histogram {
    counts: [u32; BUCKETS],
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Histogram").field("count", &self.count()).field("max", &self.max).finish()
    }
}

impl Histogram {
    /// An empty histogram.
    pub const fn new() -> Self {
        Histogram { counts: [0; BUCKETS], max: 0 }
    }

    /// Records one value (counts saturate at `u32::MAX` per bucket).
    pub fn record(&mut self, value: u64) {
        let c = &mut self.counts[bucket_of(value)];
        *c = c.saturating_add(1);
        self.max = self.max.max(value);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|&c| u64::from(c)).sum()
    }

    /// The largest value recorded (0 when empty).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Bucket counts.
    pub fn counts(&self) -> &[u32; BUCKETS] {
        &self.counts
    }

    /// Adds `counts` to buckets `first..`; false (and nothing added) when
    /// they do not fit below [`BUCKETS`]. Counts past the end that are 0
    /// are allowed: the last [`HIST_CHUNK`] piece overhangs.
    pub fn add_counts(&mut self, first: usize, counts: &[u32]) -> bool {
        let fits = first < BUCKETS && counts.iter().skip(BUCKETS - first).all(|&c| c == 0);
        if !fits {
            return false;
        }
        for (dst, &c) in self.counts[first..].iter_mut().zip(counts) {
            *dst = dst.saturating_add(c);
        }
        true
    }

    /// Sets the largest value, known exactly to the sender (it is not
    /// carried by the bucket pieces). Raised to at least the lower edge
    /// of the highest non-empty bucket, so a quantile never exceeds it
    /// while lying below its bucket.
    pub fn set_max(&mut self, max: u64) {
        let floor = self.counts.iter().rposition(|&c| c > 0).map_or(0, bucket_low);
        self.max = max.max(floor);
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
        self.max = self.max.max(other.max);
    }

    /// The `n` largest values (all of them if there are fewer): whole
    /// buckets from the top, then part of the bucket where they run out.
    pub fn slowest(&self, n: u64) -> Histogram {
        let mut out = Histogram::new();
        let mut left = n;
        for b in (0..BUCKETS).rev() {
            if left == 0 {
                break;
            }
            let take = u64::from(self.counts[b]).min(left);
            out.counts[b] = take as u32;
            left -= take;
        }
        out.max = if out.count() > 0 { self.max } else { 0 };
        out
    }

    /// The `q` quantile (0 to 1, nearest rank): the upper edge of the
    /// bucket that holds it, never above the largest value recorded (so
    /// it errs high by at most one bucket's width). None when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let q = if q.is_nan() { 1.0 } else { q.clamp(0.0, 1.0) };
        // Nearest rank: the smallest value with at least q of all at or
        // below it; rank 1 at least.
        let at = q * total as f64;
        let mut rank = at as u64;
        if (rank as f64) < at {
            rank += 1;
        }
        let rank = rank.clamp(1, total);
        let mut seen = 0u64;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                return Some(bucket_high(b).min(self.max));
            }
        }
        Some(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_edges_are_contiguous_and_log_linear() {
        assert_eq!(BUCKETS, 304);
        for v in 0..8 {
            assert_eq!(bucket_of(v), v as usize);
        }
        // Each bucket starts where the one before ended, and holds its
        // own edges and nothing past them.
        for b in 0..BUCKETS - 1 {
            assert_eq!(bucket_high(b) + 1, bucket_low(b + 1), "bucket {b}");
            assert_eq!(bucket_of(bucket_low(b)), b, "low edge of {b}");
            assert_eq!(bucket_of(bucket_high(b)), b, "high edge of {b}");
            if b >= 8 {
                let width = bucket_high(b) - bucket_low(b) + 1;
                assert!(width * 8 <= bucket_low(b), "bucket {b} is wider than 12.5%");
            }
        }
        assert_eq!((bucket_of(8), bucket_of(15), bucket_of(16), bucket_of(17), bucket_of(18)), (8, 15, 16, 16, 17));
        assert_eq!(bucket_of((1 << 40) - 1), BUCKETS - 1);
        assert_eq!(bucket_of(1 << 40), BUCKETS - 1);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_high(BUCKETS - 1), u64::MAX);
    }

    #[test]
    fn quantiles_err_high_by_at_most_a_bucket() {
        let mut h = Histogram::new();
        assert_eq!(h.quantile(0.5), None);
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        assert_eq!(h.count(), 1000);
        for q in [0.5, 0.9, 0.99, 0.999] {
            // The nearest-rank value: rank ceil(q * 1000) of 1000..=1000000.
            let exact = (q * 1000.0 - 1e-9) as u64 * 1000 + 1000;
            let got = h.quantile(q).unwrap();
            assert!(got >= exact && got <= exact + exact / 8, "q {q}: {got} for {exact}");
        }
        assert_eq!(h.quantile(1.0), Some(1_000_000), "the max, not the bucket edge");
        assert_eq!(h.quantile(0.0), Some(bucket_high(bucket_of(1000)).min(1_000_000)));
    }

    #[test]
    fn slowest_keeps_the_top_n_and_splits_a_bucket() {
        let mut h = Histogram::new();
        for _ in 0..90 {
            h.record(50);
        }
        for _ in 0..10 {
            h.record(100_000);
        }
        h.record(5_000_000);
        let top = h.slowest(11);
        assert_eq!(top.count(), 11);
        assert!(top.quantile(0.0).unwrap() >= 100_000, "no fast touch among the slowest 11");
        assert_eq!(top.max(), 5_000_000);
        // 15 slowest: 11 above, 4 of the 90 fast ones.
        let top = h.slowest(15);
        assert_eq!(top.counts()[bucket_of(50)], 4);
        assert_eq!(top.quantile(0.2).unwrap(), bucket_high(bucket_of(50)));
        assert_eq!(h.slowest(1000).count(), 101, "all of them when n is larger");
        assert_eq!(h.slowest(0).quantile(0.5), None);
        assert_eq!(h.slowest(0).max(), 0);
    }

    #[test]
    fn merge_adds_and_pieces_rebuild_a_histogram() {
        let (mut a, mut b) = (Histogram::new(), Histogram::new());
        for v in [3, 700, 70_000] {
            a.record(v);
        }
        for v in [700, 9_000_000] {
            b.record(v);
        }
        let mut m = a.clone();
        m.merge(&b);
        assert_eq!((m.count(), m.max()), (5, 9_000_000));
        assert_eq!(m.counts()[bucket_of(700)], 2);

        // Sent in pieces, as the agent does, and rebuilt.
        let mut rebuilt = Histogram::new();
        for first in (0..BUCKETS).step_by(HIST_CHUNK) {
            let mut piece = [0u32; HIST_CHUNK];
            for (i, c) in piece.iter_mut().enumerate() {
                *c = m.counts().get(first + i).copied().unwrap_or(0);
            }
            assert!(rebuilt.add_counts(first, &piece));
        }
        rebuilt.set_max(m.max());
        assert_eq!(rebuilt, m);
        // A piece that reaches past the last bucket with counts is refused.
        let last = BUCKETS / HIST_CHUNK * HIST_CHUNK;
        assert!(!rebuilt.add_counts(last, &[1; HIST_CHUNK]));
        assert!(!rebuilt.add_counts(BUCKETS, &[0; HIST_CHUNK]));
        assert_eq!(rebuilt, m, "a refused piece adds nothing");
        // A max below the highest bucket is raised to its lower edge.
        rebuilt.set_max(1);
        assert_eq!(rebuilt.max(), bucket_low(bucket_of(9_000_000)));
    }
}
