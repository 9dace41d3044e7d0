//! Where things live in guest RAM. The VMM builds the page tables, GDT,
//! stacks and the checksum ring here; the agent stamps the data stripes and
//! keeps its generation table here. Both compute it from the same two
//! numbers (RAM size and vCPU count) with [`Layout::new`].
//!
//! ```text
//! 0x0000_1000  GDT
//! 0x0000_2000  PML4, PDPT, then page directories mapping 16 GiB (2 MiB pages)
//! 0x0002_0000  mailboxes, one page per vCPU
//! 0x0003_0000  checksum ring: descriptor page, then one buffer page per slot
//! 0x0010_0000  the agent's ELF image (up to AGENT_LIMIT)
//! 0x0020_0000  stacks, STACK_SIZE per vCPU
//! 0x0030_0000  generation table: one u32 per data page
//! data_start   data stripes, one per vCPU, to the end of RAM
//! ```

/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;
/// Most vCPUs a layout has room for.
pub const MAX_VCPUS: u32 = 16;
/// Most guest RAM the page tables map (one page directory per GiB).
pub const MAX_RAM: u64 = 16 << 30;
/// Least guest RAM: the fixed areas plus some data for each vCPU.
pub const MIN_RAM: u64 = 8 << 20;

/// The GDT: null, 64-bit code, data.
pub const GDT: u64 = 0x1000;
/// The top-level page table.
pub const PML4: u64 = 0x2000;
/// The page-directory-pointer table.
pub const PDPT: u64 = 0x3000;
/// The first page directory; directory `i` maps GiB `i` with 2 MiB pages.
pub const PD_BASE: u64 = 0x4000;
/// vCPU `i`'s mailbox is the page at `MAILBOX_BASE + i * PAGE_SIZE`.
pub const MAILBOX_BASE: u64 = 0x2_0000;
/// Where in a mailbox page the VMM writes its reply.
pub const REPLY_OFFSET: usize = 2048;
/// Checksum slots each vCPU owns.
pub const RING_SLOTS_PER_VCPU: u32 = 2;
/// Checksum slots in the ring.
pub const RING_SLOTS: u32 = MAX_VCPUS * RING_SLOTS_PER_VCPU;
/// The checksum ring's descriptor page: [`DESC_SIZE`] bytes per slot.
pub const RING_DESC: u64 = 0x3_0000;
/// Slot `i`'s buffer is the page at `RING_BUF + i * PAGE_SIZE`.
pub const RING_BUF: u64 = RING_DESC + PAGE_SIZE;
/// The checksum ring, descriptors and buffers: what the device pins.
pub const RING_LEN: u64 = PAGE_SIZE * (1 + RING_SLOTS as u64);
/// Bytes per checksum descriptor.
pub const DESC_SIZE: u64 = 32;
/// Descriptor field offsets: the guest writes `len` then `seq` and rings
/// the doorbell; the device writes `sum` and `status`, then `done_seq`.
pub const DESC_LEN: u64 = 0;
/// See [`DESC_LEN`].
pub const DESC_SEQ: u64 = 4;
/// See [`DESC_LEN`].
pub const DESC_DONE_SEQ: u64 = 8;
/// See [`DESC_LEN`]: 0 when `sum` is valid, else an [`crate::ErrorCode`].
pub const DESC_STATUS: u64 = 12;
/// See [`DESC_LEN`].
pub const DESC_SUM: u64 = 16;
/// Where the agent's ELF image is linked.
pub const AGENT_LOAD: u64 = 0x10_0000;
/// The agent's image must end below this.
pub const AGENT_LIMIT: u64 = 0x20_0000;
/// Stack bytes per vCPU.
pub const STACK_SIZE: u64 = 0x1_0000;
/// vCPU `i`'s stack is `[STACKS + i * STACK_SIZE, STACKS + (i + 1) * STACK_SIZE)`.
pub const STACKS: u64 = 0x20_0000;
/// The generation table.
pub const GEN_TABLE: u64 = 0x30_0000;

/// Port for a 32-bit `out` of a mailbox's page frame number.
pub const AGENT_PORT: u16 = 0x510;
/// Port for a 32-bit `out` of a checksum slot index (the doorbell).
pub const CHECKSUM_PORT: u16 = 0x514;
/// Port for a 32-bit `out` (any value) that ends the vCPU: the agent runs
/// in ring 3, where `hlt` faults.
pub const HALT_PORT: u16 = 0x518;

/// Why a layout cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutError {
    /// RAM is not a multiple of 2 MiB, below [`MIN_RAM`] or above [`MAX_RAM`].
    RamSize(u64),
    /// No vCPUs, more than [`MAX_VCPUS`], or too little data for each.
    Vcpus(u32),
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LayoutError::RamSize(n) => write!(
                f,
                "guest RAM of {n} bytes is not a multiple of 2 MiB between {} MiB and {} GiB",
                MIN_RAM >> 20,
                MAX_RAM >> 30
            ),
            LayoutError::Vcpus(n) => write!(f, "{n} vCPUs do not fit (1 to {MAX_VCPUS}, each with data to work on)"),
        }
    }
}

impl core::error::Error for LayoutError {}

/// The layout of one guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Guest RAM in bytes, from guest address 0.
    pub ram_size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// First data page.
    pub data_start: u64,
    /// Data pages each vCPU owns.
    pub stripe_pages: u64,
}

impl Layout {
    /// The layout of a guest with `ram_size` bytes of RAM and `vcpus` vCPUs.
    pub const fn new(ram_size: u64, vcpus: u32) -> Result<Layout, LayoutError> {
        if ram_size % (2 << 20) != 0 || ram_size < MIN_RAM || ram_size > MAX_RAM {
            return Err(LayoutError::RamSize(ram_size));
        }
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(LayoutError::Vcpus(vcpus));
        }
        // One entry per page of RAM: a little more than the data needs,
        // but it keeps the table's size independent of where data starts.
        let table = ram_size / PAGE_SIZE * 4;
        let data_start = (GEN_TABLE + table).next_multiple_of(2 << 20);
        if data_start >= ram_size {
            return Err(LayoutError::RamSize(ram_size));
        }
        let stripe_pages = (ram_size - data_start) / PAGE_SIZE / vcpus as u64;
        if stripe_pages < 64 {
            return Err(LayoutError::Vcpus(vcpus));
        }
        Ok(Layout { ram_size, vcpus, data_start, stripe_pages })
    }

    /// Page directories of the identity map. It covers [`MAX_RAM`]
    /// whatever the RAM size, so a guest access beyond RAM reaches the VMM
    /// as an MMIO exit with its address instead of a page fault.
    pub const fn page_directories(&self) -> u64 {
        MAX_RAM >> 30
    }

    /// vCPU `vcpu`'s mailbox page.
    pub const fn mailbox(&self, vcpu: u32) -> u64 {
        MAILBOX_BASE + vcpu as u64 * PAGE_SIZE
    }

    /// The initial stack pointer of `vcpu` (16-byte aligned, top of its stack).
    pub const fn stack_top(&self, vcpu: u32) -> u64 {
        STACKS + (vcpu as u64 + 1) * STACK_SIZE
    }

    /// Checksum slot `k` (below [`RING_SLOTS_PER_VCPU`]) of `vcpu`.
    pub const fn ring_slot(&self, vcpu: u32, k: u32) -> u32 {
        vcpu * RING_SLOTS_PER_VCPU + k
    }

    /// The descriptor of checksum slot `slot`.
    pub const fn ring_desc(&self, slot: u32) -> u64 {
        RING_DESC + slot as u64 * DESC_SIZE
    }

    /// The buffer page of checksum slot `slot`.
    pub const fn ring_buf(&self, slot: u32) -> u64 {
        RING_BUF + slot as u64 * PAGE_SIZE
    }

    /// Data pages in all stripes.
    pub const fn data_pages(&self) -> u64 {
        self.stripe_pages * self.vcpus as u64
    }

    /// First page of `vcpu`'s stripe.
    pub const fn stripe_start(&self, vcpu: u32) -> u64 {
        self.data_start + vcpu as u64 * self.stripe_pages * PAGE_SIZE
    }

    /// The generation-table entry of the data page at `gpa`, if it is one.
    pub const fn gen_index(&self, gpa: u64) -> Option<u64> {
        if gpa < self.data_start || gpa % PAGE_SIZE != 0 {
            return None;
        }
        let i = (gpa - self.data_start) / PAGE_SIZE;
        if i < self.data_pages() {
            Some(i)
        } else {
            None
        }
    }

    /// Address of the generation entry `index`.
    pub const fn gen_entry(&self, index: u64) -> u64 {
        GEN_TABLE + index * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn areas_do_not_overlap() {
        let l = Layout::new(512 << 20, MAX_VCPUS).unwrap();
        assert!(PD_BASE + l.page_directories() * PAGE_SIZE <= MAILBOX_BASE);
        assert!(l.mailbox(MAX_VCPUS - 1) + PAGE_SIZE <= RING_DESC);
        const { assert!(RING_SLOTS as u64 * DESC_SIZE <= PAGE_SIZE) };
        const { assert!(RING_DESC + RING_LEN <= AGENT_LOAD) };
        assert!(l.stack_top(MAX_VCPUS - 1) <= GEN_TABLE);
        assert!(l.gen_entry(l.data_pages()) <= l.data_start);
        assert!(l.stripe_start(l.vcpus - 1) + l.stripe_pages * PAGE_SIZE <= l.ram_size);
        let big = Layout::new(MAX_RAM, 1).unwrap();
        assert!(PD_BASE + big.page_directories() * PAGE_SIZE <= MAILBOX_BASE);
    }

    #[test]
    fn refuses_odd_sizes() {
        assert_eq!(Layout::new((512 << 20) + 4096, 2), Err(LayoutError::RamSize((512 << 20) + 4096)));
        assert_eq!(Layout::new(4 << 20, 1), Err(LayoutError::RamSize(4 << 20)));
        assert_eq!(Layout::new(MAX_RAM + (2 << 20), 1), Err(LayoutError::RamSize(MAX_RAM + (2 << 20))));
        assert_eq!(Layout::new(512 << 20, 0), Err(LayoutError::Vcpus(0)));
        assert_eq!(Layout::new(512 << 20, MAX_VCPUS + 1), Err(LayoutError::Vcpus(MAX_VCPUS + 1)));
        assert_eq!(Layout::new(MIN_RAM, MAX_VCPUS).map(|l| l.stripe_pages), Ok(64));
    }

    #[test]
    fn generation_index_covers_data_pages_only() {
        let l = Layout::new(64 << 20, 2).unwrap();
        assert_eq!(l.gen_index(l.data_start), Some(0));
        assert_eq!(l.gen_index(l.data_start + 4096), Some(1));
        assert_eq!(l.gen_index(l.data_start + 1), None);
        assert_eq!(l.gen_index(l.data_start - 4096), None);
        assert_eq!(l.gen_index(l.stripe_start(1)), Some(l.stripe_pages));
        assert_eq!(l.gen_index(l.data_start + l.data_pages() * 4096), None);
    }
}
