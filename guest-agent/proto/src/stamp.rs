//! Page stamps: what every word of a data page holds at a given generation,
//! and the checksum the checksum device computes.

use crate::PAGE_SIZE;

/// Words in a page.
pub const PAGE_WORDS: usize = PAGE_SIZE as usize / 8;

/// The splitmix64 finaliser: a fast, well-mixed 64-bit hash.
pub const fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The per-page key every word of a stamp derives from.
pub const fn page_key(seed: u64, gpa: u64, generation: u32) -> u64 {
    splitmix64(seed ^ gpa.rotate_left(21) ^ (generation as u64).wrapping_mul(0xd6e8_feb8_6659_fd93))
}

/// Word `i` of the page at `gpa` stamped at `generation` with `key` (from
/// [`page_key`]). Generation 0 is a page never written (or unplugged under
/// the zero policy): all zeros. Otherwise word 0 is the page's own address
/// and word 1 its generation, so a page that lands at the wrong address or
/// comes back stale says so at once; every other word is derived from the
/// key.
#[inline]
pub const fn stamp_word(key: u64, gpa: u64, generation: u32, i: usize) -> u64 {
    match (generation, i) {
        (0, _) => 0,
        (_, 0) => gpa,
        (_, 1) => generation as u64 | 0xa9f0_0000_0000_0000,
        _ => key.wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
    }
}

/// Fills `page` with the stamp of `gpa` at `generation`.
pub fn stamp_page(seed: u64, gpa: u64, generation: u32, page: &mut [u64; PAGE_WORDS]) {
    let key = page_key(seed, gpa, generation);
    for (i, w) in page.iter_mut().enumerate() {
        *w = stamp_word(key, gpa, generation, i);
    }
}

/// The first word of `page` that differs from the stamp of `gpa` at
/// `generation`: `(index, expected, found)`.
pub fn check_page(seed: u64, gpa: u64, generation: u32, page: &[u64; PAGE_WORDS]) -> Option<(usize, u64, u64)> {
    let key = page_key(seed, gpa, generation);
    page.iter()
        .enumerate()
        .map(|(i, &w)| (i, stamp_word(key, gpa, generation, i), w))
        .find(|&(_, want, got)| want != got)
}

/// Position `i` (below `n`) of a pseudo-random permutation of `0..n` keyed
/// by `key`: a four-round Feistel network over the next power of two,
/// walking cycles until the value falls below `n`. Visits every index
/// once with no table and no constant stride (a prefetcher cannot guess
/// it), so guest and host random passes need no memory for their order.
pub fn permute(i: u64, n: u64, key: u64) -> u64 {
    debug_assert!(i < n);
    if n <= 1 {
        return 0;
    }
    let bits = (64 - (n - 1).leading_zeros()).max(2);
    let half = bits.div_ceil(2);
    let (lo_bits, hi_bits) = (half, bits - half);
    let (lo_mask, hi_mask) = ((1u64 << lo_bits) - 1, (1u64 << hi_bits) - 1);
    let mut x = i;
    loop {
        // Unbalanced Feistel: alternate which half is mixed, so the sizes
        // stay right when `bits` is odd.
        let (mut l, mut r) = (x >> lo_bits, x & lo_mask);
        for round in 0..4u64 {
            let k = key ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            if round % 2 == 0 {
                l ^= splitmix64(k ^ r) & hi_mask;
            } else {
                r ^= splitmix64(k ^ l) & lo_mask;
            }
        }
        x = (l << lo_bits) | r;
        if x < n {
            return x;
        }
    }
}

/// FNV-1a over `bytes`: the checksum device's result.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_differ_by_address_generation_and_seed() {
        let mut a = [0u64; PAGE_WORDS];
        stamp_page(1, 0x40_0000, 3, &mut a);
        assert_eq!(check_page(1, 0x40_0000, 3, &a), None);
        assert_eq!(check_page(1, 0x40_1000, 3, &a).map(|c| c.0), Some(0));
        assert_eq!(check_page(1, 0x40_0000, 4, &a).map(|c| c.0), Some(1));
        assert_eq!(check_page(2, 0x40_0000, 3, &a).map(|c| c.0), Some(2));
        a[PAGE_WORDS - 1] ^= 1;
        assert_eq!(check_page(1, 0x40_0000, 3, &a).map(|c| c.0), Some(PAGE_WORDS - 1));
    }

    #[test]
    fn generation_zero_is_a_zero_page() {
        let z = [0u64; PAGE_WORDS];
        assert_eq!(check_page(9, 0x1000, 0, &z), None);
        assert!(check_page(9, 0x1000, 1, &z).is_some());
    }

    #[test]
    fn permute_visits_every_index_once() {
        for n in [1u64, 2, 3, 7, 64, 1000, 4097] {
            let mut seen = [false; 4097];
            for i in 0..n {
                let p = permute(i, n, 42) as usize;
                assert!(!seen[p], "{p} twice for n={n}");
                seen[p] = true;
            }
        }
        // Not the identity, and no constant stride.
        let v: [u64; 6] = core::array::from_fn(|i| permute(i as u64, 1000, 7));
        assert_ne!(v, [0, 1, 2, 3, 4, 5]);
        assert!(v.windows(3).any(|w| w[1].wrapping_sub(w[0]) != w[2].wrapping_sub(w[1])));
    }

    #[test]
    fn checksum_is_fnv1a() {
        assert_eq!(checksum(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(checksum(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
