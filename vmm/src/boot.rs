//! 64-bit long mode from the first instruction: the GDT, an identity map
//! with 2 MiB pages, and the register state every vCPU starts with. The
//! tables are built as bytes (pure functions, tested without KVM) and
//! written into guest RAM at the places [`agent_proto::Layout`] names.
//!
//! The guest runs in ring 3 with IOPL 3. Paravirtual KVMs (PVM, the kind
//! this project's machines have) run a guest's ring 0 through the
//! instruction emulator unless the guest kernel is PVM-aware, and the
//! emulator has no SSE: the first `xorps` ends the run with an emulation
//! failure. Ring 3 runs natively everywhere. The agent needs nothing from
//! ring 0: it takes no interrupts, IOPL 3 lets it do port I/O, and it ends
//! with a write to [`agent_proto::HALT_PORT`] instead of `hlt`.

use agent_proto::{Layout, GDT, PAGE_SIZE, PDPT, PD_BASE, PML4};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};

/// Code segment selector (GDT entry 3, ring 3).
pub const CODE_SELECTOR: u16 = 0x18 | 3;
/// Data segment selector (GDT entry 4, ring 3).
pub const DATA_SELECTOR: u16 = 0x20 | 3;

const GDT_ENTRIES: [u64; 5] = [
    0,
    // 64-bit code: present, ring 0, executable, readable, L=1.
    0x00af_9b00_0000_ffff,
    // Data: present, ring 0, writable, 4 GiB, D/B=1.
    0x00cf_9300_0000_ffff,
    // The same two at ring 3.
    0x00af_fb00_0000_ffff,
    0x00cf_f300_0000_ffff,
];

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// XCR0: x87 and SSE state.
pub const XCR0: u64 = 0b11;

/// The GDT's bytes.
pub fn gdt() -> Vec<u8> {
    GDT_ENTRIES.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// The page tables' bytes, to be written at [`PML4`]: the PML4, the PDPT
/// and the page directories, back to back (they are contiguous in the
/// layout). Every 2 MiB of the first [`agent_proto::MAX_RAM`] is mapped,
/// RAM or not.
pub fn page_tables(layout: &Layout) -> Vec<u8> {
    let dirs = layout.page_directories();
    let mut words = vec![0u64; ((2 + dirs) * PAGE_SIZE / 8) as usize];
    let per_page = (PAGE_SIZE / 8) as usize;
    words[0] = PDPT | PTE_PRESENT | PTE_WRITE | PTE_USER;
    for d in 0..dirs {
        words[per_page + d as usize] = (PD_BASE + d * PAGE_SIZE) | PTE_PRESENT | PTE_WRITE | PTE_USER;
        for e in 0..512u64 {
            let addr = (d << 30) | (e << 21);
            words[(2 + d as usize) * per_page + e as usize] = addr | PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_HUGE;
        }
    }
    debug_assert_eq!(PML4 + PAGE_SIZE, PDPT);
    debug_assert_eq!(PDPT + PAGE_SIZE, PD_BASE);
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long-mode system registers, on top of what KVM reported (`sregs`).
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cs = segment(CODE_SELECTOR, true);
    let data = segment(DATA_SELECTOR, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (GDT_ENTRIES.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = PML4;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers of `vcpu` entering at `entry`: its own stack (as if
/// just called), its id in `rdi`, interrupts off, IOPL 3.
pub fn entry_regs(layout: &Layout, vcpu: u32, entry: u64) -> kvm_regs {
    kvm_regs { rip: entry, rsp: layout.stack_top(vcpu) - 8, rdi: vcpu as u64, rflags: 0x3002, ..Default::default() }
}

/// x87 and SSE state at reset.
pub fn fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(bytes: &[u8], index: usize) -> u64 {
        u64::from_le_bytes(bytes[index * 8..index * 8 + 8].try_into().unwrap())
    }

    #[test]
    fn identity_map_covers_every_2mib() {
        let layout = Layout::new(512 << 20, 2).unwrap();
        let pt = page_tables(&layout);
        assert_eq!(pt.len() as u64, (2 + layout.page_directories()) * PAGE_SIZE);
        // Walk a few addresses by hand: PML4 -> PDPT -> PD -> 2 MiB page.
        for addr in [0u64, 0x20_0000, 0x1234_5678, (512 << 20) - 1, 5 << 30, (16 << 30) - 1] {
            let pml4e = word(&pt, ((addr >> 39) & 511) as usize);
            assert_eq!(pml4e & !0xfff, PDPT);
            let pdpte = word(&pt, 512 + ((addr >> 30) & 511) as usize);
            assert_eq!(pdpte & 3, 3, "{addr:#x}");
            let pd_page = ((pdpte & !0xfff) - PML4) / PAGE_SIZE;
            let pde = word(&pt, pd_page as usize * 512 + ((addr >> 21) & 511) as usize);
            assert_eq!(pde & 0x87, 0x87);
            assert_eq!((pde & !0xfff) | (addr & 0x1f_ffff), addr);
        }
    }

    #[test]
    fn long_mode_is_on() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.cs.db, 0, "a 64-bit code segment must have D clear");
        let gdt = gdt();
        // Ring 3: the selectors' RPL and the descriptors' DPL.
        assert_eq!(CODE_SELECTOR & 3, 3);
        assert_eq!((s.cs.dpl, s.ss.dpl), (3, 3));
        let code = word(&gdt, (CODE_SELECTOR / 8) as usize);
        assert_eq!((code >> 45) & 3, 3, "code descriptor DPL");
        assert_eq!((code >> 53) & 1, 1, "code descriptor L");
        let r = entry_regs(&Layout::new(64 << 20, 2).unwrap(), 1, 0x10_0000);
        assert_eq!(r.rsp % 16, 8);
        assert_eq!(r.rdi, 1);
        assert_eq!((r.rflags >> 12) & 3, 3, "IOPL 3 for port I/O from ring 3");
    }
}
