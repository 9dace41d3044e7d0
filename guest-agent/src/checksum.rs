//! The checksum device, as a vCPU uses it: fill a ring slot with random
//! bytes, ring the doorbell, wait for the device's FNV-1a and compare it
//! with the agent's own.

use core::hint::spin_loop;

use agent_proto::{
    checksum, Layout, CHECKSUM_PORT, DESC_DONE_SEQ, DESC_LEN, DESC_SEQ, DESC_STATUS, DESC_SUM, PAGE_SIZE,
    RING_SLOTS_PER_VCPU,
};

use crate::machine::{out32, rdtsc, SharedRam};
use crate::rng::Rng;

/// How long the agent waits for a checksum (some seconds).
const TIMEOUT_CYCLES: u64 = 20_000_000_000;

const SLOTS: usize = RING_SLOTS_PER_VCPU as usize;

/// The ring slots of one vCPU.
#[derive(Debug)]
pub struct Slots {
    ram: SharedRam,
    layout: Layout,
    vcpu: u32,
    /// The last sequence number written to each slot.
    seqs: [u32; SLOTS],
}

impl Slots {
    /// The slots of `vcpu`. Their sequence numbers go on from what the
    /// descriptors hold, so a result left there before a snapshot was
    /// taken never passes for a new one.
    pub fn new(ram: SharedRam, layout: Layout, vcpu: u32) -> Slots {
        let mut seqs = [0; SLOTS];
        for (k, seq) in (0..).zip(seqs.iter_mut()) {
            *seq = ram.read(layout.ring_desc(layout.ring_slot(vcpu, k)) + DESC_SEQ);
        }
        Slots { ram, layout, vcpu, seqs }
    }

    /// One checksum on every slot; returns how many came back right.
    pub fn run(&mut self, rng: &mut Rng) -> u64 {
        let mut good = 0;
        for k in 0..RING_SLOTS_PER_VCPU {
            good += u64::from(self.one(k, rng));
        }
        good
    }

    fn one(&mut self, k: u32, rng: &mut Rng) -> bool {
        let slot = self.layout.ring_slot(self.vcpu, k);
        let desc = self.layout.ring_desc(slot);
        let buf = self.layout.ring_buf(slot);
        let mut bytes = [0u8; PAGE_SIZE as usize];
        for (i, word) in (0..).zip(bytes.chunks_exact_mut(8)) {
            let w = rng.next_u64();
            word.copy_from_slice(&w.to_le_bytes());
            self.ram.write(buf + i * 8, w);
        }
        let len = 1 + rng.below(PAGE_SIZE) as u32;
        let seq = match self.seqs[k as usize].wrapping_add(1) {
            0 => 1,
            s => s,
        };
        self.seqs[k as usize] = seq;
        // In the order the protocol fixes: `len`, `seq`, then the doorbell.
        self.ram.write(desc + DESC_LEN, len);
        self.ram.write(desc + DESC_SEQ, seq);
        out32(CHECKSUM_PORT, slot);
        let deadline = rdtsc() + TIMEOUT_CYCLES;
        while self.ram.read::<u32>(desc + DESC_DONE_SEQ) != seq {
            if rdtsc() > deadline {
                return false;
            }
            spin_loop();
        }
        self.ram.read::<u32>(desc + DESC_STATUS) == 0
            && self.ram.read::<u64>(desc + DESC_SUM) == checksum(&bytes[..len as usize])
    }
}
