//! The machine under the agent: port I/O, the time-stamp counter, halting,
//! and volatile access to the guest RAM the agent shares with the VMM and
//! its devices. All of the agent's `unsafe` lives here and in `mem`.

use core::arch::asm;
use core::mem::{align_of, size_of};
use core::ptr;

use agent_proto::{AGENT_LOAD, GEN_TABLE, HALT_PORT, MAILBOX_BASE, PAGE_SIZE, PAGE_WORDS};

/// A 32-bit `out` to `port`. On the agent port the VMM has acted and
/// written its reply before the instruction completes; on the checksum
/// port it has at least queued the work.
pub fn out32(port: u16, value: u32) {
    // SAFETY: the ports belong to the VMM's devices, which touch only the
    // shared RAM that `SharedRam` reaches through raw pointers, never memory
    // Rust owns. Without `nomem` the asm is a compiler barrier: a request
    // written before it is in memory when the VMM looks, and a reply is read
    // after it.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags)) }
}

/// The time-stamp counter: the only clock a guest without interrupts has.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads the counter into two registers; no memory, no stack.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The time-stamp counter, read after every earlier instruction has
/// completed (`lfence` first): the end of a timed access is not read
/// before the access itself is done.
pub fn rdtsc_ordered() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: a fence and a counter read into two registers; no memory,
    // no stack. Without `nomem`, the asm also keeps the compiler from
    // moving the timed access across it.
    unsafe { asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Stops this vCPU for good. The agent runs in ring 3, where `hlt`
/// faults: the VMM ends the vCPU on a write to the halt port instead.
pub fn halt() -> ! {
    loop {
        out32(HALT_PORT, 0);
    }
}

/// The stack pointer.
pub fn stack_pointer() -> u64 {
    let rsp: u64;
    // SAFETY: copies a register; no memory, no stack.
    unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags)) }
    rsp
}

/// Values any bit pattern of the right size is a valid instance of.
pub trait Plain: Copy + private::Sealed {}
impl Plain for u32 {}
impl Plain for u64 {}

mod private {
    pub trait Sealed {}
    impl Sealed for u32 {}
    impl Sealed for u64 {}
}

/// The guest RAM the agent shares with the VMM and its devices: the
/// mailboxes and the checksum ring (`MAILBOX_BASE..AGENT_LOAD`), and the
/// generation table and data stripes (`GEN_TABLE..` the end of RAM). Rust
/// owns nothing there (the image and the stacks lie between), so volatile
/// access through raw pointers is the whole contract; every access checks
/// that it stays inside. Guest addresses are virtual addresses: the VMM
/// identity-maps all of RAM.
#[derive(Debug, Clone, Copy)]
pub struct SharedRam {
    end: u64,
}

impl SharedRam {
    /// The shared RAM of a guest whose RAM ends at `ram_end`.
    ///
    /// # Safety
    ///
    /// `0..ram_end` must be RAM, identity-mapped, laid out as
    /// `agent_proto::Layout` says: the agent's image and stacks outside the
    /// shared areas, and nothing else of the agent's inside them.
    pub const unsafe fn new(ram_end: u64) -> SharedRam {
        SharedRam { end: ram_end }
    }

    fn holds(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        (gpa >= MAILBOX_BASE && end <= AGENT_LOAD) || (gpa >= GEN_TABLE && end <= self.end)
    }

    /// A pointer to the `len` bytes at `gpa`, aligned for `T`.
    fn at<T>(&self, gpa: u64, len: u64) -> *mut T {
        assert!(self.holds(gpa, len) && gpa % align_of::<T>() as u64 == 0, "unaligned or outside the shared guest RAM");
        ptr::with_exposed_provenance_mut(gpa as usize)
    }

    /// The value at `gpa`.
    pub fn read<T: Plain>(&self, gpa: u64) -> T {
        let p = self.at::<T>(gpa, size_of::<T>() as u64);
        // SAFETY: `at` checked that `p` is aligned and inside shared RAM,
        // which is mapped and aliases nothing Rust owns; any bits are a `T`.
        unsafe { ptr::read_volatile(p) }
    }

    /// Stores `value` at `gpa`.
    pub fn write<T: Plain>(&self, gpa: u64, value: T) {
        let p = self.at::<T>(gpa, size_of::<T>() as u64);
        // SAFETY: as in `read`: aligned, mapped, aliasing nothing Rust owns.
        unsafe { ptr::write_volatile(p, value) }
    }

    /// Copies the page at `gpa` into `words`.
    pub fn read_page(&self, gpa: u64, words: &mut [u64; PAGE_WORDS]) {
        let base = self.at::<u64>(gpa, PAGE_SIZE);
        for (i, w) in words.iter_mut().enumerate() {
            // SAFETY: `at` checked the whole page: word `i` is aligned,
            // mapped and aliases nothing Rust owns.
            *w = unsafe { ptr::read_volatile(base.wrapping_add(i)) };
        }
    }

    /// Copies `words` to the page at `gpa`.
    pub fn write_page(&self, gpa: u64, words: &[u64; PAGE_WORDS]) {
        let base = self.at::<u64>(gpa, PAGE_SIZE);
        for (i, &w) in words.iter().enumerate() {
            // SAFETY: as in `read_page`.
            unsafe { ptr::write_volatile(base.wrapping_add(i), w) }
        }
    }
}
