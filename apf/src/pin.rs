//! References to guest memory held by the VMM: short-term references
//! ([`PageRef`]), migratable pins with a callback ([`Pin`], used through
//! [`PinGuard`]s) and hard pins ([`HardPin`]). What a user needs to know is
//! on those types; this is how they work.
//!
//! All three register an interval with the notifier, the engine's registry
//! of who relies on which guest range. A reference is taken by faulting
//! the range in through the engine (`populate`, on the calling thread, in
//! prefetch windows; it never touches the memory, so a poisoned page is an
//! error and not a SIGBUS) and then, under the install lock invalidations
//! take to begin, checking that every page is present before arming
//! (`fault_in_and`): no invalidation can start between the check and the
//! reference. The loop checks its deadline on every way round, so a range
//! a storm keeps invalidating cannot keep a caller past it.
//!
//! An invalidation refuses new short-term references on its range while it
//! runs and waits for the ones already held, so its wait cannot starve. A
//! pin holds no reference between uses: its callback is called and it is
//! disarmed; [`Pin::get`] re-arms it. A hard pin holds a reference and a
//! kernel pin (an io_uring fixed buffer) for its whole life.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use vm_memory::{GuestMemoryBackend, VolatileSlice};

use crate::core::{resolve, Core, Stopped};
use crate::kpin::FixedBuffer;
use crate::notifier::{IntervalId, InvalidateEvent, RefId};
use crate::ram::{GuestAddress, GuestRange, PageLoc, PageState, RamError};

/// Why a reference or pin could not be taken.
#[derive(Debug, Error)]
pub enum PinError {
    /// The range is not page-aligned, empty, or not inside one RAM region.
    #[error("invalid pin range")]
    Range(#[from] RamError),
    /// The range could not be faulted in before the deadline (an offline
    /// held it longer).
    #[error("guest range {range} could not be faulted in within {waited:?}")]
    Timeout {
        /// The range.
        range: GuestRange,
        /// How long it waited.
        waited: Duration,
    },
    /// A page of the range is poisoned or unplugged; touching it would
    /// raise SIGBUS.
    #[error("guest page {:#x} is poisoned or unplugged", .gpa.0)]
    Poisoned {
        /// The page.
        gpa: GuestAddress,
    },
    /// The engine has shut down.
    #[error("the engine has shut down")]
    Stopped,
    /// The engine serves another process's memory
    /// ([`RemoteMemory`](crate::RemoteMemory)): nothing of it is mapped
    /// here to pin or reference.
    #[error("guest range {0} lives in another process: it cannot be pinned or referenced here")]
    Remote(GuestRange),
    /// The kernel pin (io_uring fixed buffer) could not be taken.
    #[error("cannot take a kernel pin on guest range {range}")]
    KernelPin {
        /// The range.
        range: GuestRange,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
}

impl From<Stopped> for PinError {
    fn from(_: Stopped) -> Self {
        PinError::Stopped
    }
}

/// Faults `count` pages from `loc` in through the engine (on the calling
/// thread, in prefetch windows) and waits for pages other resolvers hold,
/// until every page is present in the engine's view or the deadline
/// passes. Never touches the memory itself, so a poisoned page is an
/// error, not a SIGBUS.
fn populate(shared: &Core, loc: PageLoc, count: usize, range: GuestRange, deadline: Instant) -> Result<(), PinError> {
    let started = Instant::now();
    let region = &shared.ram().regions()[loc.region];
    loop {
        shared.running()?;
        resolve::prefetch_pages(shared, (loc.page..loc.page + count).map(|p| (loc.region, p)), None);
        shared.stats().pin_pages_checked.add(count as u64);
        let mut waiting = false;
        for p in loc.page..loc.page + count {
            match region.state(p).0 {
                PageState::Present => {}
                PageState::Poisoned | PageState::Offline => {
                    return Err(PinError::Poisoned { gpa: region.page_gpa(p) });
                }
                _ => waiting = true,
            }
        }
        if !waiting {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(PinError::Timeout { range, waited: started.elapsed() });
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Runs `arm` once `range` is present with no invalidation since it was
/// faulted in, under the install lock (so no invalidation can start between
/// the check and `arm`).
fn fault_in_and<T>(
    shared: &Core,
    range: GuestRange,
    deadline: Instant,
    mut arm: impl FnMut(&crate::notifier::InstallGuard<'_>) -> Option<T>,
) -> Result<T, PinError> {
    let started = Instant::now();
    let (loc, count) = shared.ram().check_range(range)?;
    let region = &shared.ram().regions()[loc.region];
    loop {
        // Every way round the loop passes here: a range that keeps being
        // invalidated cannot keep the caller past its deadline.
        if Instant::now() >= deadline {
            return Err(PinError::Timeout { range, waited: started.elapsed() });
        }
        // Waits for an invalidation of the range in progress, if any, even
        // one that only drains: it grants no reference until it ends.
        if !shared.notifier().wait_idle(range, deadline) {
            return Err(PinError::Timeout { range, waited: started.elapsed() });
        }
        populate(shared, loc, count, range, deadline)?;
        let guard = shared.notifier().install_lock();
        // Present now, under the lock invalidations take to begin: that is
        // all arming needs. An invalidation that came and went since
        // `wait_idle` has already called the callback, and one that is
        // still running refuses the reference `arm` takes. Asking for no
        // invalidation at all since `wait_idle` would starve a pin whose
        // range a storm keeps migrating (each migrate leaves the pages
        // present again).
        shared.stats().pin_pages_checked.add(count as u64);
        let settled = (loc.page..loc.page + count).all(|p| region.state(p).0 == PageState::Present);
        if settled {
            if let Some(v) = arm(&guard) {
                return Ok(v);
            }
        }
        drop(guard);
        std::thread::yield_now();
    }
}

fn slice(shared: &Core, range: GuestRange) -> VolatileSlice<'_> {
    // The range was checked to lie inside one region when the reference
    // was made, so this cannot fail.
    shared.ram().guest_memory().get_slice(range.start, range.len as usize).expect("checked guest range")
}

/// A short-term reference to a guest range, for a bounded copy (a device
/// reading one descriptor): the pages stay where they are until it is
/// dropped. Taken with [`Engine::page_ref`](crate::Engine::page_ref).
///
/// An offline over the range waits for it to be dropped (up to the
/// offline's deadline), and no new one is granted on a range while it is
/// being offlined, so the wait cannot starve. Do not hold one across a
/// blocking wait. Access goes through [`PageRef::memory`], a
/// [`vm_memory::VolatileSlice`] (see [`Pin`] for why).
pub struct PageRef {
    shared: Arc<Core>,
    id: RefId,
    range: GuestRange,
}

impl fmt::Debug for PageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageRef").field("range", &self.range).finish()
    }
}

impl PageRef {
    pub(crate) fn take(shared: Arc<Core>, range: GuestRange, deadline: Instant) -> Result<PageRef, PinError> {
        let id = fault_in_and(&shared, range, deadline, |guard| shared.notifier().try_ref(guard, range))?;
        Ok(PageRef { shared, id, range })
    }

    /// The range referenced.
    pub fn range(&self) -> GuestRange {
        self.range
    }

    /// The memory, for volatile access.
    pub fn memory(&self) -> VolatileSlice<'_> {
        slice(&self.shared, self.range)
    }
}

impl Drop for PageRef {
    fn drop(&mut self) {
        self.shared.notifier().drop_ref(self.id);
    }
}

#[derive(Debug, Default)]
struct PinState {
    armed: AtomicBool,
    ever_armed: AtomicBool,
    invalidations: AtomicU64,
    refaults: AtomicU64,
}

/// A long-term, migratable pin over a guest range, with an invalidation
/// callback: Linux's `mmu_interval_notifier` (what HMM and RDMA on-demand
/// paging use), in userspace. Registered with
/// [`Engine::pin`](crate::Engine::pin).
///
/// Hold it as long as you like: unlike a [`PageRef`] or a [`HardPin`], a
/// pin does not hold an offline back. An offline over its range first
/// calls the callback, on the offlining thread, with an
/// [`InvalidateEvent`](crate::InvalidateEvent) that says which range and
/// why; there the holder drops any kernel pin it made on the memory (an
/// io_uring fixed buffer, say) and stops relying on it. The next
/// [`Pin::get`] waits for the offline to end, faults the range in again
/// through the engine and re-arms the pin.
///
/// # Access
///
/// Each use of the memory goes through a [`PinGuard`] from [`Pin::get`],
/// held for that use only, and reaches the memory as a volatile slice
/// ([`vm_memory::VolatileSlice`]), since the guest writes the same memory
/// concurrently: a plain `&[u8]` over it would be unsound. While the
/// pin is invalidated its memory stays mapped at the same address; an
/// access during an offline faults and waits for the offline to end, so it
/// sees the right contents. So a callback must never wait for such an
/// access: the holder may be blocked in it.
///
/// # Pins and unplug
///
/// A pin does not hold migrate, evict or a host-block offline back: they
/// keep the contents, and an access while they run faults and waits for
/// them to end. An `Unplug` is different: it discards the pages, and under
/// [`crate::UnplugPolicy::Poison`] it poisons them, so a holder reading
/// them afterwards would take SIGBUS on a thread that has no business
/// dying (a device worker, outside `KVM_RUN`). So every use of the memory
/// goes through a [`PinGuard`], which holds a short-term reference that
/// only an `Unplug` waits for, up to its deadline (then it fails with
/// `Busy` and changes nothing). Once a guard is granted, no page of the
/// range is discarded or poisoned until it is dropped; after an unplug,
/// `get` fails with [`PinError::Poisoned`] (poison policy) or serves zeros
/// (zero policy) instead of handing out memory that would fault.
///
/// The guard makes the pin safe, not useful: a device whose memory the
/// guest may unplug loses it. A VMM should refuse a guest's unplug of
/// memory a device pins (as QEMU refuses to discard RAM under VFIO, and
/// virtio-mem NACKs an unplug of memory in use); the guard is what keeps
/// the VMM alive when it does not, or when the unplug comes from elsewhere.
///
/// Hold a guard for a bounded use, like a [`PageRef`]: never across a
/// blocking wait, and never while unplugging the same range yourself (the
/// unplug would wait for you until its deadline).
///
/// ```
/// # use std::sync::atomic::{AtomicU64, Ordering};
/// # use std::sync::Arc;
/// # use std::time::{Duration, Instant};
/// # use apf::{Engine, GuestAddress, GuestRam, GuestRange, Mode, Reason, ZeroSource};
/// # let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), 1 << 20)])?);
/// # let engine = Engine::builder(ram, Arc::new(ZeroSource)).start()?;
/// use vm_memory::Bytes;
/// let soon = || Instant::now() + Duration::from_secs(1);
/// // A device's ring. Its callback is where the device would drop the
/// // kernel pins it made on the ring; here it counts the migrations.
/// let ring = GuestRange::new(GuestAddress(0x1000), 0x4000);
/// let migrated = Arc::new(AtomicU64::new(0));
/// let seen = migrated.clone();
/// let pin = engine.pin(ring, move |ev| {
///     if ev.reason == Reason::Migrate {
///         seen.fetch_add(1, Ordering::SeqCst);
///     }
/// })?;
/// // Whenever the device needs the ring: cheap while the pin is armed ...
/// pin.get(soon())?.memory().write_obj(7u32, 0)?;
/// // ... and faulted in again after an invalidation, contents kept.
/// engine.offline(ring, Mode::Migrate, soon())?;
/// assert!(!pin.is_armed());
/// let head: u32 = pin.get(soon())?.memory().read_obj(0)?;
/// assert_eq!((head, migrated.load(Ordering::SeqCst)), (7, 1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Pin {
    shared: Arc<Core>,
    id: IntervalId,
    range: GuestRange,
    state: Arc<PinState>,
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pin").field("range", &self.range).field("armed", &self.is_armed()).finish()
    }
}

impl Pin {
    pub(crate) fn register(
        shared: Arc<Core>,
        range: GuestRange,
        callback: impl Fn(&InvalidateEvent) + Send + Sync + 'static,
    ) -> Result<Pin, PinError> {
        shared.ram().check_range(range)?;
        shared.running()?;
        let state = Arc::new(PinState::default());
        let st = state.clone();
        let id = shared.notifier().register(
            range,
            Box::new(move |ev| {
                // Disarmed before the holder hears of it, so a `get` racing
                // the callback re-faults rather than trusting old state.
                st.armed.store(false, Ordering::Release);
                st.invalidations.fetch_add(1, Ordering::Relaxed);
                callback(ev);
            }),
        );
        Ok(Pin { shared, id, range, state })
    }

    /// Access to the pinned memory, for one bounded use. While the pin is
    /// armed this takes a short-term reference and nothing else; after an
    /// invalidation (or the first time) it waits for the invalidation to
    /// end, faults the range in through the engine and re-arms. Fails at
    /// `deadline`, or if a page is poisoned or unplugged.
    pub fn get(&self, deadline: Instant) -> Result<PinGuard<'_>, PinError> {
        if self.state.armed.load(Ordering::Acquire) {
            if let Some(id) = self.shared.notifier().try_guard_ref(self.range) {
                // An invalidation that ended before the reference was
                // granted has disarmed the pin: then re-fault.
                if self.state.armed.load(Ordering::Acquire) {
                    return Ok(PinGuard { pin: self, id });
                }
                self.shared.notifier().drop_ref(id);
            }
        }
        self.shared.running()?;
        let span = tracing::info_span!(
            target: "apf",
            "apf.pin",
            gpa = self.range.start.0,
            len = self.range.len,
            outcome = tracing::field::Empty,
        );
        // Under the install lock: no invalidation can start between the
        // reference and the re-arm.
        let faulted = fault_in_and(&self.shared, self.range, deadline, |_guard| {
            let id = self.shared.notifier().try_guard_ref(self.range)?;
            self.state.armed.store(true, Ordering::Release);
            Some(id)
        });
        span.record(
            "outcome",
            match &faulted {
                Ok(_) => "armed",
                Err(PinError::Timeout { .. }) => "timeout",
                Err(PinError::Poisoned { .. }) => "poisoned",
                Err(_) => "error",
            },
        );
        let id = faulted?;
        if self.state.ever_armed.swap(true, Ordering::Relaxed) {
            self.state.refaults.fetch_add(1, Ordering::Relaxed);
            self.shared.stats().pin_refaults.add(1);
        }
        Ok(PinGuard { pin: self, id })
    }

    /// True while no invalidation has hit the pin since it was last armed.
    pub fn is_armed(&self) -> bool {
        self.state.armed.load(Ordering::Acquire)
    }

    /// The pinned range.
    pub fn range(&self) -> GuestRange {
        self.range
    }

    /// Invalidations that called this pin's callback.
    pub fn invalidations(&self) -> u64 {
        self.state.invalidations.load(Ordering::Relaxed)
    }

    /// Times [`Self::get`] faulted the range in again after an invalidation.
    pub fn refaults(&self) -> u64 {
        self.state.refaults.load(Ordering::Relaxed)
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.shared.notifier().unregister(self.id);
    }
}

/// Access to a pin's memory, from [`Pin::get`]. An `Unplug` of the range
/// waits for it to be dropped (see [`Pin`]): hold it for a bounded use.
#[derive(Debug)]
pub struct PinGuard<'a> {
    pin: &'a Pin,
    id: RefId,
}

impl Drop for PinGuard<'_> {
    fn drop(&mut self) {
        self.pin.shared.notifier().drop_ref(self.id);
    }
}

impl PinGuard<'_> {
    /// The memory, for volatile access.
    pub fn memory(&self) -> VolatileSlice<'_> {
        slice(&self.pin.shared, self.pin.range)
    }

    /// Host address of the first byte (for handing to the kernel, as an
    /// io_uring fixed buffer).
    pub fn host_addr(&self) -> *mut u8 {
        self.memory().ptr_guard_mut().as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.pin.range.len as usize
    }

    /// Never true: pins are not empty.
    pub fn is_empty(&self) -> bool {
        self.pin.range.len == 0
    }

    /// True if an invalidation hit the pin since this guard was taken. An
    /// unplug waits for the guard, so it was a migrate, an evict or a
    /// host-block offline (contents kept), or a discard by someone else (a
    /// balloon's `MADV_DONTNEED`, which no guard holds back: the range
    /// reads as zeros from then on).
    pub fn invalidated(&self) -> bool {
        !self.pin.is_armed()
    }
}

/// A hard pin: no callback, plus a real kernel pin (an io_uring fixed
/// buffer) on the pages: the page reference KVM's async page faults held
/// before 2013. Offlines over it fail with
/// [`OfflineError::Busy`](crate::OfflineError::Busy) at their deadline;
/// the kernel cannot migrate its pages either. Kept to show the problem
/// migratable pins ([`Pin`]) solve. Taken with
/// [`Engine::hard_pin`](crate::Engine::hard_pin).
pub struct HardPin {
    shared: Arc<Core>,
    id: IntervalId,
    range: GuestRange,
    kernel: Option<FixedBuffer>,
}

impl fmt::Debug for HardPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HardPin").field("range", &self.range).finish()
    }
}

impl HardPin {
    pub(crate) fn take(shared: Arc<Core>, range: GuestRange, deadline: Instant) -> Result<HardPin, PinError> {
        let id = fault_in_and(&shared, range, deadline, |_guard| Some(shared.notifier().register_hard(range)))?;
        let host = match shared.ram().host_range(range.start, range.len) {
            Ok(h) => h,
            Err(e) => {
                shared.notifier().unregister(id);
                return Err(e.into());
            }
        };
        match FixedBuffer::register(host, range.len as usize) {
            Ok(kernel) => Ok(HardPin { shared, id, range, kernel: Some(kernel) }),
            Err(source) => {
                shared.notifier().unregister(id);
                Err(PinError::KernelPin { range, source })
            }
        }
    }

    /// The pinned range.
    pub fn range(&self) -> GuestRange {
        self.range
    }

    /// The memory, for volatile access.
    pub fn memory(&self) -> VolatileSlice<'_> {
        slice(&self.shared, self.range)
    }
}

impl Drop for HardPin {
    fn drop(&mut self) {
        // The kernel pin first: an offline that sees the interval gone
        // finds the pages movable.
        drop(self.kernel.take());
        self.shared.notifier().unregister(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram::GuestAddress;
    use crate::{Config, Engine, GuestRam, Mode, OfflineError, UnplugPolicy, ZeroSource};
    use std::sync::atomic::AtomicBool;
    use vm_memory::Bytes;

    const PAGE: u64 = 4096;

    fn engine(policy: UnplugPolicy) -> Engine {
        let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), 4 << 20)]).unwrap());
        let config = Config { unplug_policy: policy, ..Config::default() };
        Engine::builder(ram, Arc::new(ZeroSource)).config(config).start().unwrap()
    }

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    /// Writes `value` at the start of every page of the guard's range.
    fn stamp(guard: &PinGuard<'_>, value: u64) {
        for off in (0..guard.len()).step_by(PAGE as usize) {
            guard.memory().write_obj(value, off).unwrap();
        }
    }

    /// Reads every page of the guard's range; would raise SIGBUS (and end
    /// the test process) on a poisoned page.
    fn read_all(guard: &PinGuard<'_>) -> Vec<u64> {
        (0..guard.len()).step_by(PAGE as usize).map(|off| guard.memory().read_obj(off).unwrap()).collect()
    }

    #[test]
    fn an_unplug_waits_for_a_live_guard() {
        let engine = engine(UnplugPolicy::Poison);
        let r = GuestRange::new(GuestAddress(0x10_0000), 4 * PAGE);
        let pin = engine.pin(r, |_| {}).unwrap();
        let guard = pin.get(soon(2000)).unwrap();
        stamp(&guard, 0xfeed);
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            let unplug = s.spawn(|| {
                let started = Instant::now();
                let result = engine.offline(r, Mode::Unplug, soon(5000));
                done.store(true, Ordering::SeqCst);
                (result, started.elapsed())
            });
            std::thread::sleep(Duration::from_millis(100));
            assert!(!done.load(Ordering::SeqCst), "the unplug ran under a live guard");
            assert!(!pin.is_armed(), "the callback ran before the wait");
            // Still mapped and intact: reading it neither faults fatally
            // nor sees zeros.
            assert_eq!(read_all(&guard), vec![0xfeed; 4]);
            drop(guard);
            let (result, waited) = unplug.join().unwrap();
            assert_eq!(result.unwrap().pages_unplugged, 4);
            // The thread's clock starts a little after the sleep's.
            assert!(waited >= Duration::from_millis(90), "{waited:?}");
        });
        // Unplugged under the poison policy: refused, not handed out.
        assert!(matches!(pin.get(soon(500)), Err(PinError::Poisoned { gpa: GuestAddress(0x10_0000) })));
        engine.replug(r).unwrap();
        let guard = pin.get(soon(2000)).unwrap();
        assert_eq!(read_all(&guard), vec![0; 4]);
    }

    #[test]
    fn a_guard_held_past_the_deadline_makes_the_unplug_busy_and_keeps_the_pages() {
        let engine = engine(UnplugPolicy::Poison);
        let r = GuestRange::new(GuestAddress(0x20_0000), 2 * PAGE);
        let pin = engine.pin(r, |_| {}).unwrap();
        let guard = pin.get(soon(2000)).unwrap();
        stamp(&guard, 7);
        match engine.offline(r, Mode::Unplug, soon(50)) {
            Err(OfflineError::Busy { refs: 1, discarded: 0, .. }) => {}
            other => panic!("expected Busy with the guard counted, got {other:?}"),
        }
        assert_eq!(read_all(&guard), vec![7, 7]);
        // Migrate and evict keep contents: a guard does not hold them back.
        for mode in [Mode::Migrate, Mode::Evict] {
            let report = engine.offline(r, mode, soon(50)).unwrap();
            assert_eq!(report.pages_taken, 2, "{mode:?}");
            assert_eq!(read_all(&guard), vec![7, 7], "{mode:?}");
        }
        drop(guard);
        engine.offline(r, Mode::Unplug, soon(2000)).unwrap();
        assert!(matches!(pin.get(soon(500)), Err(PinError::Poisoned { .. })));
    }

    #[test]
    fn unplugs_racing_a_reader_never_poison_memory_under_its_guard() {
        // The device-worker race: a holder takes a guard and reads while
        // another thread unplugs and replugs the range under the poison
        // policy. A page poisoned under a guard would raise SIGBUS here and
        // end the test process.
        let engine = engine(UnplugPolicy::Poison);
        let r = GuestRange::new(GuestAddress(0x30_0000), 8 * PAGE);
        let pin = engine.pin(r, |_| {}).unwrap();
        let stop = AtomicBool::new(false);
        let (reads, refused, unplugs) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    match pin.get(soon(2000)) {
                        Ok(guard) => {
                            // A device's use of its ring: read, work, read.
                            std::hint::black_box(read_all(&guard));
                            std::thread::sleep(Duration::from_micros(20));
                            std::hint::black_box(read_all(&guard));
                            reads.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(PinError::Poisoned { .. }) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("pin get: {e}"),
                    }
                }
            });
            let until = Instant::now() + Duration::from_millis(800);
            while Instant::now() < until {
                match engine.offline(r, Mode::Unplug, soon(2000)) {
                    Ok(_) => {
                        unplugs.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => panic!("unplug: {e}"),
                }
                engine.replug(r).unwrap();
                // Time for the reader to fault the range in and take a
                // guard, so that the next unplug meets it.
                std::thread::sleep(Duration::from_micros(100));
            }
            stop.store(true, Ordering::Relaxed);
        });
        let (reads, refused, unplugs) =
            (reads.load(Ordering::Relaxed), refused.load(Ordering::Relaxed), unplugs.load(Ordering::Relaxed));
        assert!(reads > 10 && unplugs > 10, "{reads} guarded reads, {unplugs} unplugs");
        eprintln!("{reads} guarded reads, {refused} refused as poisoned, {unplugs} unplugs");
    }
}
