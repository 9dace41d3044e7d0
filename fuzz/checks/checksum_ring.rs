//! What must hold for anything a guest puts in a checksum descriptor and
//! rings the checksum doorbell with: the VMM's own [`ChecksumDevice`] on
//! real (plain) guest RAM, its answer checked against a checksum computed
//! here. Shared by the `checksum_ring` fuzz target and the VMM's replay
//! test.
//!
//! Input: one byte choosing the slot (one past the ring: a slot that does
//! not exist), the descriptor's `len` and `seq` (u32 each), then the bytes
//! of the slot's buffer page (the rest of the page is zero).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_proto::{
    checksum, ErrorCode, DESC_DONE_SEQ, DESC_LEN, DESC_SEQ, DESC_STATUS, DESC_SUM, MIN_RAM, PAGE_SIZE, RING_BUF,
    RING_DESC, RING_SLOTS,
};
use apf::{GuestAddress, GuestRam};
use vm_memory::Bytes;
use vmm::checksum::ChecksumDevice;
use vmm::mem::GuestAccess;
use vmm::report::Errors;

/// A checksum device on the smallest guest's RAM, started once per process.
#[derive(Debug)]
pub struct Ring {
    ram: Arc<GuestRam>,
    device: ChecksumDevice,
    errors: Arc<Errors>,
}

impl Ring {
    /// Maps guest RAM and starts the device's worker.
    pub fn start() -> Ring {
        let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), MIN_RAM as usize)]).expect("map guest RAM"));
        let errors = Arc::new(Errors::default());
        let device = ChecksumDevice::start(GuestAccess::Plain(ram.clone()), errors.clone()).expect("start the device");
        Ring { ram, device, errors }
    }
}

/// Submits a slot as `input` says; panics if a property fails.
pub fn check(ring: &Ring, input: &[u8]) {
    let [s, l0, l1, l2, l3, q0, q1, q2, q3, data @ ..] = input else {
        return;
    };
    let slot = u32::from(*s) % (RING_SLOTS + 1);
    let len = u32::from_le_bytes([*l0, *l1, *l2, *l3]);
    let seq = u32::from_le_bytes([*q0, *q1, *q2, *q3]);
    let mem = ring.ram.guest_memory();
    let stats = ring.device.stats();
    let refused_before = stats.refused.load(Ordering::Relaxed);
    if slot >= RING_SLOTS {
        ring.device.doorbell(0, slot);
        assert_eq!(stats.refused.load(Ordering::Relaxed), refused_before + 1, "a slot past the ring is refused");
        // Reported (the list is bounded: past its cap errors are only counted).
        assert!(!ring.errors.is_empty(), "a slot past the ring is not reported");
        return;
    }
    let desc = RING_DESC + u64::from(slot) * agent_proto::DESC_SIZE;
    let page = &data[..data.len().min(PAGE_SIZE as usize)];
    let mut buf = [0u8; PAGE_SIZE as usize];
    buf[..page.len()].copy_from_slice(page);
    let at = |off: u64| GuestAddress(desc + off);
    mem.write_slice(&buf, GuestAddress(RING_BUF + u64::from(slot) * PAGE_SIZE)).expect("write the buffer");
    mem.write_obj(len, at(DESC_LEN)).expect("write len");
    mem.write_obj(u64::MAX, at(DESC_SUM)).expect("clear sum");
    mem.write_obj(u32::MAX, at(DESC_STATUS)).expect("clear status");
    mem.write_obj(!seq, at(DESC_DONE_SEQ)).expect("clear done_seq");
    mem.store(seq, at(DESC_SEQ), Ordering::Release).expect("write seq");
    ring.device.doorbell(0, slot);

    // The device answers on its worker thread: wait for done_seq.
    let deadline = Instant::now() + Duration::from_secs(5);
    while mem.load::<u32>(at(DESC_DONE_SEQ), Ordering::Acquire).expect("read done_seq") != seq {
        assert!(Instant::now() < deadline, "slot {slot} not answered within 5 s: {:?}", ring.errors.to_vec());
        std::thread::yield_now();
    }
    let sum: u64 = mem.read_obj(at(DESC_SUM)).expect("read sum");
    let status: u32 = mem.read_obj(at(DESC_STATUS)).expect("read status");
    if (1..=PAGE_SIZE).contains(&u64::from(len)) {
        assert_eq!((status, sum), (0, checksum(&buf[..len as usize])), "slot {slot}, {len} bytes");
    } else {
        assert_eq!((status, sum), (ErrorCode::BadLength as u32, 0), "slot {slot}, {len} bytes");
    }
}
