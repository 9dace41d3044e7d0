//! The memory functions the compiler calls on its own (`memcpy`, `memset`,
//! ...). On this target `core` expects the C library to provide them, and
//! the agent has none. They are written with string instructions: a plain
//! loop would be turned back into a call to the function itself.

use core::arch::asm;

/// Copies `n` bytes from `src` to `dest`; the ranges do not overlap.
///
/// # Safety
///
/// `src` must be valid for `n` bytes of reads, `dest` for `n` bytes of
/// writes, and the two must not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller vouches for both ranges; `rep movsb` touches
    // exactly them, going up (the ABI leaves the direction flag clear).
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags))
    };
    dest
}

/// Copies `n` bytes from `src` to `dest`; the ranges may overlap.
///
/// # Safety
///
/// `src` must be valid for `n` bytes of reads, `dest` for `n` bytes of
/// writes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // `dest` is below `src` or past its end: copying up reads every
        // byte before it is overwritten.
        // SAFETY: the caller vouches for both ranges.
        return unsafe { memcpy(dest, src, n) };
    }
    // `dest` starts inside `src`: copy down from the last byte.
    let last = n - 1;
    // SAFETY: the caller vouches for both ranges; with the direction flag
    // set, `rep movsb` walks them from `last` down to 0 and clears the flag
    // again before the asm ends.
    unsafe {
        asm!("std", "rep movsb", "cld", inout("rcx") n => _, inout("rdi") dest.wrapping_add(last) => _,
             inout("rsi") src.wrapping_add(last) => _, options(nostack))
    };
    dest
}

/// Fills `n` bytes at `dest` with the low byte of `c`.
///
/// # Safety
///
/// `dest` must be valid for `n` bytes of writes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller vouches for the range; `rep stosb` writes exactly
    // it, going up.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") c as u8,
             options(nostack, preserves_flags))
    };
    dest
}

/// Compares `n` bytes at `a` and `b` as unsigned bytes.
///
/// # Safety
///
/// `a` and `b` must be valid for `n` bytes of reads.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: `i < n`, and the caller vouches for `n` bytes at `a`.
        let x = unsafe { a.wrapping_add(i).read() };
        // SAFETY: as above, at `b`.
        let y = unsafe { b.wrapping_add(i).read() };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// Whether `n` bytes at `a` and `b` differ (non-zero if they do).
///
/// # Safety
///
/// As for [`memcmp`].
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the caller's promise is `memcmp`'s.
    unsafe { memcmp(a, b, n) }
}
