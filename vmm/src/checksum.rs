//! The checksum device: a worker thread that keeps a migratable [`Pin`] on
//! the guest's checksum ring for the whole run and computes checksums of
//! the buffers the guest submits. Offlines of the ring call the pin's
//! callback; the worker's next [`Pin::get`] faults the ring in again. The
//! guest checks every result, so a device that read stale or moved memory
//! would be caught. The worker holds the guard from [`Pin::get`] only while
//! it serves one slot: an unplug of the ring waits for it, so the ring is
//! never poisoned under the worker's reads (the agent device also refuses
//! a guest's unplug or balloon of the ring).
//!
//! Protocol (offsets in [`agent_proto`]): the guest fills slot `i`'s
//! buffer, writes the descriptor's `len` and a new `seq`, and writes `i` to
//! [`agent_proto::CHECKSUM_PORT`]. The device writes `sum` and `status`,
//! then `done_seq = seq`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agent_proto::timing::Histogram;
use agent_proto::{
    checksum, ErrorCode, DESC_DONE_SEQ, DESC_LEN, DESC_SEQ, DESC_STATUS, DESC_SUM, PAGE_SIZE, RING_BUF, RING_DESC,
    RING_LEN, RING_SLOTS,
};
use apf::{GuestAddress, GuestRange, Pin};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use vm_memory::{Bytes, GuestMemoryBackend, VolatileSlice};

use crate::mem::GuestAccess;
use crate::report::Errors;

/// How long the worker waits for its pin to fault the ring back in. A
/// host-block search may try several blocks one after another, each for up
/// to its attempt deadline (1.5 s), with the ring's pages invalidated
/// through each attempt: the ring waits for all of them.
const PIN_DEADLINE: Duration = Duration::from_secs(10);

/// Counters of the checksum device.
#[derive(Debug, Default)]
pub struct ChecksumStats {
    /// Checksums computed.
    pub computed: AtomicU64,
    /// Submissions refused (bad slot, full queue, bad length).
    pub refused: AtomicU64,
    /// Times the worker's pin was invalidated.
    pub invalidations: AtomicU64,
    /// Nanoseconds inside each call of the pin's callback: what the
    /// device adds to an offline of its ring, apart from the re-fault.
    pub callback_ns: Mutex<Histogram>,
}

/// The checksum device.
#[derive(Debug)]
pub struct ChecksumDevice {
    tx: Sender<u32>,
    stop: Arc<AtomicBool>,
    worker: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<ChecksumStats>,
    errors: Arc<Errors>,
}

/// The guest range the device pins.
pub fn ring_range() -> GuestRange {
    GuestRange::new(GuestAddress(RING_DESC), RING_LEN)
}

/// The range the device pins in `ram`: the ring, widened to whole pages
/// of the region holding it (on huge-page RAM, the huge page around it).
pub fn ring_range_in(ram: &apf::GuestRam) -> GuestRange {
    let ring = ring_range();
    let Ok(loc) = ram.locate(ring.start) else { return ring };
    let page = ram.region(loc).page_size() as u64;
    let start = ring.start.0 & !(page - 1);
    GuestRange::new(GuestAddress(start), ring.end().next_multiple_of(page) - start)
}

impl ChecksumDevice {
    /// Starts the worker. With the engine it takes its pin at once (the
    /// ring is faulted in at the first submission).
    pub fn start(access: GuestAccess, errors: Arc<Errors>) -> std::io::Result<Self> {
        let (tx, rx) = bounded(RING_SLOTS as usize);
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ChecksumStats::default());
        let pin = match access.engine() {
            Some(engine) => {
                let s = stats.clone();
                // The callback only counts: the pin disarms itself, and the
                // worker holds no kernel pin that would need dropping.
                let pin = engine
                    .pin(ring_range_in(engine.ram()), move |_| {
                        let t = Instant::now();
                        s.invalidations.fetch_add(1, Ordering::Relaxed);
                        let ns = t.elapsed().as_nanos() as u64;
                        s.callback_ns.lock().unwrap_or_else(|e| e.into_inner()).record(ns);
                    })
                    .map_err(std::io::Error::other)?;
                Some(pin)
            }
            None => None,
        };
        let worker = {
            let (stop, stats, errors) = (stop.clone(), stats.clone(), errors.clone());
            crate::spawn_traced("checksum", move || worker(access, pin, rx, stop, stats, errors))?
        };
        Ok(ChecksumDevice { tx, stop, worker: Mutex::new(Some(worker)), stats, errors })
    }

    /// The guest wrote `slot` to the doorbell.
    pub fn doorbell(&self, vcpu: u32, slot: u32) {
        if slot >= RING_SLOTS {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            self.errors.push(format!("vCPU {vcpu}: checksum slot {slot} does not exist (the ring has {RING_SLOTS})"));
            return;
        }
        match self.tx.try_send(slot) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                self.errors.push(format!("vCPU {vcpu}: checksum queue full, slot {slot} dropped"));
            }
            Err(TrySendError::Disconnected(_)) => {
                self.errors.push(format!("vCPU {vcpu}: checksum device stopped, slot {slot} dropped"));
            }
        }
    }

    /// The device's counters.
    pub fn stats(&self) -> &ChecksumStats {
        &self.stats
    }

    /// Stops the worker and drops its pin.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let worker = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = worker {
            if w.join().is_err() {
                self.errors.push("checksum worker panicked");
            }
        }
    }
}

impl Drop for ChecksumDevice {
    fn drop(&mut self) {
        self.stop();
    }
}

fn worker(
    access: GuestAccess,
    pin: Option<Pin>,
    rx: Receiver<u32>,
    stop: Arc<AtomicBool>,
    stats: Arc<ChecksumStats>,
    errors: Arc<Errors>,
) {
    loop {
        let slot = match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(slot) => slot,
            Err(RecvTimeoutError::Timeout) if !stop.load(Ordering::Acquire) => continue,
            Err(_) => return,
        };
        let served = match &pin {
            Some(pin) => match pin.get(Instant::now() + PIN_DEADLINE) {
                // The pin may cover more than the ring (a whole huge page).
                Ok(guard) => {
                    let at = (RING_DESC - pin.range().start.0) as usize;
                    match guard.memory().subslice(at, RING_LEN as usize) {
                        Ok(ring) => serve(&ring, slot),
                        Err(e) => Err(format!("the checksum ring is outside its pin: {e}")),
                    }
                }
                Err(e) => Err(format!("cannot fault the checksum ring in: {e}")),
            },
            None => match access.ram().guest_memory().get_slice(GuestAddress(RING_DESC), RING_LEN as usize) {
                Ok(mem) => serve(&mem, slot),
                Err(e) => Err(format!("cannot map the checksum ring: {e}")),
            },
        };
        match served {
            Ok(true) => stats.computed.fetch_add(1, Ordering::Relaxed),
            Ok(false) => stats.refused.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                errors.push(format!("checksum device, slot {slot}: {e}"));
                stats.refused.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// Serves `slot` of the ring mapped at `ring`. Returns whether a checksum
/// was computed (false: the descriptor was refused and says why).
fn serve<B: vm_memory::bitmap::BitmapSlice>(ring: &VolatileSlice<'_, B>, slot: u32) -> Result<bool, String> {
    let desc = (slot as u64 * agent_proto::DESC_SIZE) as usize;
    let err = |e: vm_memory::VolatileMemoryError| e.to_string();
    let len: u32 = ring.load(desc + DESC_LEN as usize, Ordering::Acquire).map_err(err)?;
    let seq: u32 = ring.load(desc + DESC_SEQ as usize, Ordering::Acquire).map_err(err)?;
    let (sum, status) = if len == 0 || len as u64 > PAGE_SIZE {
        (0, ErrorCode::BadLength as u32)
    } else {
        let mut buf = [0u8; PAGE_SIZE as usize];
        let at = (RING_BUF - RING_DESC + slot as u64 * PAGE_SIZE) as usize;
        ring.subslice(at, len as usize).map_err(err)?.copy_to(&mut buf[..len as usize]);
        (checksum(&buf[..len as usize]), 0)
    };
    ring.store(sum, desc + DESC_SUM as usize, Ordering::Relaxed).map_err(err)?;
    ring.store(status, desc + DESC_STATUS as usize, Ordering::Relaxed).map_err(err)?;
    // Published last: the guest reads sum and status once it sees seq.
    ring.store(seq, desc + DESC_DONE_SEQ as usize, Ordering::Release).map_err(err)?;
    Ok(status == 0)
}
