//! Pins, invalidation and offlining against real userfaultfd, with host
//! threads standing in for vCPUs and device workers.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apf::hostmem::Pagemap;
use apf::{
    Config, Engine, FixedBuffer, GuestAddress, GuestRam, GuestRange, Mode, OfflineError, PageState, Pattern, PinError,
    RamError, Reason, UnplugPolicy, ZeroSource, PAGE_SIZE,
};
use vm_memory::Bytes;

mod common;
use common::{busy, read_word, write_word, ScriptedSource};

const PAGE: u64 = PAGE_SIZE as u64;
const MIB: usize = 1 << 20;

fn ram(bytes: usize) -> Arc<GuestRam> {
    Arc::new(GuestRam::anonymous(&[(GuestAddress(0), bytes)]).unwrap())
}

fn engine(ram: &Arc<GuestRam>) -> Engine {
    Engine::builder(ram.clone(), Arc::new(ZeroSource)).start().unwrap()
}

fn range(start: u64, len: u64) -> GuestRange {
    GuestRange::new(GuestAddress(start), len)
}

fn soon(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

/// Writes a word derived from the page's address into every page.
fn stamp(ram: &GuestRam, r: GuestRange, salt: u64) {
    for gpa in (r.start.0..r.end()).step_by(PAGE_SIZE) {
        write_word(ram, gpa + 8, gpa ^ salt);
    }
}

fn check_stamp(ram: &GuestRam, r: GuestRange, salt: u64) {
    for gpa in (r.start.0..r.end()).step_by(PAGE_SIZE) {
        assert_eq!(read_word(ram, gpa + 8), gpa ^ salt, "page {gpa:#x}");
    }
}

fn states(ram: &GuestRam, r: GuestRange) -> Vec<PageState> {
    (r.start.0..r.end()).step_by(PAGE_SIZE).map(|g| ram.state(ram.locate(GuestAddress(g)).unwrap()).0).collect()
}

fn resident(ram: &GuestRam, r: GuestRange) -> usize {
    let host = ram.host_range(r.start, r.len).unwrap();
    let pages = (r.len / PAGE) as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: mincore reads the page tables of a mapping this process owns
    // and writes `pages` bytes into `vec`.
    let ret = unsafe { libc::mincore(host as *mut libc::c_void, r.len as usize, vec.as_mut_ptr()) };
    assert_eq!(ret, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|b| **b & 1 != 0).count()
}

fn pfns(ram: &GuestRam, r: GuestRange) -> Vec<Option<u64>> {
    let host = ram.host_range(r.start, r.len).unwrap() as u64;
    Pagemap::open().unwrap().pfns(host, (r.len / PAGE) as usize).unwrap()
}

/// Writers doing read-increment-write on counters in pages they own, while
/// `storm` offlines ranges under them; every increment must survive.
fn writers_lose_nothing(modes: &[Mode]) {
    let ram = ram(16 * MIB);
    let engine = engine(&ram);
    let pages = 16 * MIB / PAGE_SIZE;
    let stop = AtomicBool::new(false);
    let offlines = AtomicUsize::new(0);
    let counts: Vec<u64> = std::thread::scope(|s| {
        let writers: Vec<_> = (0..2u64)
            .map(|t| {
                let (ram, stop) = (&ram, &stop);
                s.spawn(move || {
                    let mut mine = vec![0u64; pages];
                    let mut x = t + 1;
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) || n < 20_000 {
                        x = apf::splitmix64(x);
                        let page = (x as usize % (pages / 2)) * 2 + t as usize;
                        let gpa = (page * PAGE_SIZE) as u64;
                        let v = read_word(ram, gpa);
                        assert_eq!(v, mine[page], "writer {t}: page {gpa:#x} lost a write");
                        write_word(ram, gpa, v + 1);
                        mine[page] += 1;
                        n += 1;
                    }
                    mine
                })
            })
            .collect();
        let mut x = 99u64;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(600) {
            x = apf::splitmix64(x);
            let len = (1 + x % 512) * PAGE;
            let start = (x >> 20) % (16 * MIB as u64 - len) / PAGE * PAGE;
            let mode = modes[offlines.load(Ordering::Relaxed) % modes.len()];
            match engine.offline(range(start, len), mode, soon(2000)) {
                Ok(_) => {
                    offlines.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => panic!("offline {mode} of {}: {e}", range(start, len)),
            }
        }
        stop.store(true, Ordering::Relaxed);
        let mut total = vec![0u64; pages];
        for w in writers {
            for (i, c) in w.join().unwrap().into_iter().enumerate() {
                total[i] += c;
            }
        }
        total
    });
    for (page, want) in counts.iter().enumerate() {
        assert_eq!(read_word(&ram, (page * PAGE_SIZE) as u64), *want, "page {page}");
    }
    assert!(offlines.load(Ordering::Relaxed) >= 10, "only {} offlines ran", offlines.load(Ordering::Relaxed));
    let stats = engine.stats();
    assert!(stats.offlines >= 10);
    assert!(stats.deferred > 0, "no fault raced an offline: {stats:?}");
    if modes.contains(&Mode::Migrate) {
        assert!(stats.frames_moved > 0);
    }
    if modes.contains(&Mode::Evict) {
        assert!(stats.pages_evicted > 0);
    }
}

#[test]
fn concurrent_writers_lose_nothing_across_migrate() {
    writers_lose_nothing(&[Mode::Migrate]);
}

#[test]
fn concurrent_writers_lose_nothing_across_evict() {
    writers_lose_nothing(&[Mode::Evict]);
}

#[test]
fn concurrent_writers_lose_nothing_across_mixed_offlines() {
    writers_lose_nothing(&[Mode::Migrate, Mode::Evict]);
}

#[test]
fn migrate_moves_frames_and_keeps_contents() {
    let ram = ram(4 * MIB);
    let engine = engine(&ram);
    let r = range(0x10_0000, 64 * PAGE);
    stamp(&ram, r, 0x55);
    let before = pfns(&ram, r);
    let report = engine.offline(r, Mode::Migrate, soon(2000)).unwrap();
    assert_eq!((report.pages, report.pages_taken, report.frames_moved), (64, 64, 64));
    let after = pfns(&ram, r);
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert!(b.is_some() && a.is_some(), "page {i} not present");
        assert_ne!(b, a, "page {i} still in its old frame");
    }
    check_stamp(&ram, r, 0x55);
    assert!(states(&ram, r).iter().all(|s| *s == PageState::Present));
    // Pages never touched stay missing and are not counted.
    let fresh = range(0x20_0000, 8 * PAGE);
    let report = engine.offline(fresh, Mode::Migrate, soon(2000)).unwrap();
    assert_eq!((report.pages_taken, report.frames_moved), (0, 0));
    assert_eq!(resident(&ram, fresh), 0);
}

#[test]
fn evict_frees_frames_and_restores_on_fault() {
    let ram = ram(4 * MIB);
    let engine = engine(&ram);
    let r = range(0x4000, 100 * PAGE);
    stamp(&ram, r, 0xabc);
    let report = engine.offline(r, Mode::Evict, soon(2000)).unwrap();
    assert_eq!(report.pages_evicted, 100);
    assert_eq!(resident(&ram, r), 0, "evicted frames were not freed");
    assert_eq!(engine.store().len(), 100);
    assert!(states(&ram, r).iter().all(|s| *s == PageState::Missing));
    check_stamp(&ram, r, 0xabc);
    assert!(engine.wait_idle(soon(5000)));
    assert_eq!(engine.store().len(), 0, "restored pages stay in the store");
}

#[test]
fn unplug_zero_fills_and_later_writes_stick() {
    let ram = ram(4 * MIB);
    let engine = engine(&ram);
    let r = range(0x8000, 16 * PAGE);
    stamp(&ram, r, 1);
    // Evicted pages of the range must be forgotten too.
    engine.offline(range(0x8000, 4 * PAGE), Mode::Evict, soon(2000)).unwrap();
    let report = engine.offline(r, Mode::Unplug, soon(2000)).unwrap();
    assert_eq!(report.pages_unplugged, 16);
    assert_eq!(engine.store().len(), 0);
    for gpa in (r.start.0..r.end()).step_by(PAGE_SIZE) {
        assert_eq!(read_word(&ram, gpa + 8), 0, "page {gpa:#x} kept data after unplug");
    }
    stamp(&ram, r, 2);
    check_stamp(&ram, r, 2);
}

#[test]
fn unplug_poison_policy_refuses_pins_until_replugged() {
    let ram = ram(4 * MIB);
    let config = Config { unplug_policy: UnplugPolicy::Poison, ..Config::default() };
    let engine = Engine::builder(ram.clone(), Arc::new(ZeroSource)).config(config).start().unwrap();
    let r = range(0x8000, 4 * PAGE);
    stamp(&ram, r, 3);
    engine.offline(r, Mode::Unplug, soon(2000)).unwrap();
    assert!(states(&ram, r).iter().all(|s| *s == PageState::Offline));
    let pin = engine.pin(r, |_| {}).unwrap();
    assert!(matches!(pin.get(soon(500)), Err(PinError::Poisoned { gpa: GuestAddress(0x8000) })));
    assert_eq!(engine.replug(r).unwrap(), 4);
    let mem = pin.get(soon(1000)).unwrap();
    assert_eq!(mem.memory().read_obj::<u64>(8).unwrap(), 0);
    stamp(&ram, r, 4);
    check_stamp(&ram, r, 4);
}

#[test]
fn contents_filled_before_an_invalidation_are_never_installed_after_it() {
    let ram = ram(MIB);
    // Fills take a while, so an invalidation can land while one is in
    // progress.
    let source = Arc::new(ScriptedSource::pattern(Pattern { seed: 5 }).delay(Duration::from_millis(150)));
    let engine = Engine::builder(ram.clone(), source.clone())
        .config(apf::Config { max_window: 1, ..apf::Config::default() })
        .start()
        .unwrap();
    let r = range(0x3000, PAGE);
    std::thread::scope(|s| {
        let reader = s.spawn(|| read_word(&ram, 0x3000 + 8));
        let by = Instant::now() + Duration::from_secs(5);
        while source.calls() == 0 && Instant::now() < by {
            std::thread::yield_now();
        }
        assert_ne!(source.calls(), 0, "the reader's fill never started");
        // The fill is in progress: discard the page's contents under it.
        let report = engine.offline(r, Mode::Unplug, soon(2000)).unwrap();
        assert_eq!(report.pages_taken, 0, "nothing was installed yet");
        assert_eq!(reader.join().unwrap(), 0, "a fill from before the unplug was installed after it");
    });
    let stats = engine.stats();
    assert!(stats.stale >= 1, "the resolver did not notice the invalidation: {stats:?}");
    assert_eq!(read_word(&ram, 0x3000 + 8), 0);
    // Its neighbour is still served from the source.
    let mut buf = vec![0u8; PAGE_SIZE];
    ram.guest_memory().read_slice(&mut buf, GuestAddress(0x4000)).unwrap();
    assert_eq!(Pattern { seed: 5 }.verify(0x4000, &buf), Ok(()));
}

#[test]
fn callbacks_run_before_pages_are_dropped() {
    let ram = ram(4 * MIB);
    let engine = engine(&ram);
    let r = range(0x10_0000, 32 * PAGE);
    stamp(&ram, r, 9);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (seen2, ram2) = (seen.clone(), ram.clone());
    let pin = engine
        .pin(range(0x10_0000 + 8 * PAGE, 8 * PAGE), move |ev| {
            // Whatever the pin covers must still be in memory now.
            seen2.lock().unwrap().push((ev.reason, ev.range, resident(&ram2, ev.range)));
        })
        .unwrap();
    pin.get(soon(1000)).unwrap();
    engine.offline(r, Mode::Evict, soon(2000)).unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![(Reason::Evict, range(0x10_0000 + 8 * PAGE, 8 * PAGE), 8)]);
    assert_eq!(resident(&ram, r), 0);
    assert!(!pin.is_armed());
}

#[test]
fn pins_refault_after_invalidation() {
    let ram = ram(4 * MIB);
    let engine = engine(&ram);
    let r = range(0x2000, 4 * PAGE);
    let called = Arc::new(AtomicU64::new(0));
    let c2 = called.clone();
    let pin = engine
        .pin(r, move |_| {
            c2.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    assert!(!pin.is_armed(), "armed before the first get");
    {
        let g = pin.get(soon(1000)).unwrap();
        g.memory().write_obj(0x1234_5678u64, 16).unwrap();
    }
    assert_eq!(states(&ram, r), vec![PageState::Present; 4], "get did not fault the range in");
    assert_eq!(pin.refaults(), 0);
    for (i, mode) in [Mode::Evict, Mode::Migrate].into_iter().enumerate() {
        engine.offline(range(0, 16 * PAGE), mode, soon(2000)).unwrap();
        assert!(!pin.is_armed());
        assert_eq!(pin.invalidations(), i as u64 + 1);
        let g = pin.get(soon(1000)).unwrap();
        assert!(pin.is_armed());
        assert_eq!(pin.refaults(), i as u64 + 1);
        assert_eq!(g.memory().read_obj::<u64>(16).unwrap(), 0x1234_5678);
    }
    assert_eq!(called.load(Ordering::SeqCst), 2);
    // An offline elsewhere leaves it alone.
    engine.offline(range(MIB as u64, 16 * PAGE), Mode::Migrate, soon(2000)).unwrap();
    assert!(pin.is_armed());
    assert_eq!(engine.pins_registered(), 1);
    drop(pin);
    assert_eq!(engine.pins_registered(), 0);
    let stats = engine.stats();
    assert_eq!((stats.pin_invalidations, stats.pin_refaults), (2, 2));
}

#[test]
fn hard_pin_gives_busy_within_its_deadline_and_changes_nothing() {
    let ram = ram(4 * MIB);
    let engine = engine(&ram);
    let r = range(0x10_0000, 16 * PAGE);
    stamp(&ram, r, 0x77);
    let hard = engine.hard_pin(range(0x10_0000 + 4 * PAGE, 2 * PAGE), soon(1000)).unwrap();
    let before = pfns(&ram, r);
    let t = Instant::now();
    let held = busy(engine.offline(r, Mode::Migrate, t + Duration::from_millis(300)), "the hard pin");
    assert_eq!((held.hard, held.refs), (1, 0));
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(pfns(&ram, r), before, "a busy offline moved pages");
    assert!(states(&ram, r).iter().all(|s| *s == PageState::Present));
    check_stamp(&ram, r, 0x77);
    assert_eq!(engine.stats().offline_busy, 1);
    drop(hard);
    engine.offline(r, Mode::Migrate, soon(2000)).unwrap();
    check_stamp(&ram, r, 0x77);
}

#[test]
fn kernel_pin_kept_through_the_callback_is_busy_and_dropping_it_lets_pages_move() {
    let ram = ram(4 * MIB);
    let engine = engine(&ram);
    let r = range(0x20_0000, 8 * PAGE);
    stamp(&ram, r, 0x99);
    let host = ram.host_range(r.start, r.len).unwrap();
    let buffer = Arc::new(Mutex::new(FixedBuffer::register(host, r.len as usize).unwrap()));
    let drop_it = Arc::new(AtomicBool::new(false));
    let (b2, d2) = (buffer.clone(), drop_it.clone());
    let pin = engine
        .pin(r, move |_| {
            if d2.load(Ordering::SeqCst) {
                b2.lock().unwrap().unregister().unwrap();
            }
        })
        .unwrap();
    pin.get(soon(1000)).unwrap();
    // A holder that keeps its kernel pin: the kernel refuses to move.
    assert!(busy(engine.offline(r, Mode::Migrate, soon(300)), "the kernel pin").kernel_pinned > 0);
    check_stamp(&ram, r, 0x99);
    // A holder that drops it in the callback: the pages move.
    drop_it.store(true, Ordering::SeqCst);
    pin.get(soon(1000)).unwrap();
    let before = pfns(&ram, r);
    let report = engine.offline(r, Mode::Migrate, soon(2000)).unwrap();
    assert_eq!(report.frames_moved, 8);
    assert!(pfns(&ram, r).iter().zip(&before).all(|(a, b)| a != b));
    assert!(!buffer.lock().unwrap().is_registered());
    check_stamp(&ram, r, 0x99);
}

#[test]
fn offline_waits_for_short_term_references() {
    let ram = ram(4 * MIB);
    let engine = engine(&ram);
    let r = range(0x1000, 8 * PAGE);
    stamp(&ram, r, 5);
    let pref = engine.page_ref(range(0x2000, PAGE), soon(1000)).unwrap();
    assert_eq!(pref.memory().read_obj::<u64>(8).unwrap(), 0x2000 ^ 5);
    // Held past the deadline: busy, nothing changed.
    let held = busy(engine.offline(r, Mode::Evict, soon(100)), "the reference");
    assert_eq!((held.refs, held.hard), (1, 0));
    assert_eq!(engine.store().len(), 0);
    // Dropped while the offline waits: it goes on.
    std::thread::scope(|s| {
        let t = Instant::now();
        let h = s.spawn(|| engine.offline(r, Mode::Evict, soon(5000)));
        std::thread::sleep(Duration::from_millis(100));
        // No new reference is granted while the offline waits.
        assert!(matches!(engine.page_ref(range(0x3000, PAGE), soon(50)), Err(PinError::Timeout { .. })));
        drop(pref);
        let report = h.join().unwrap().unwrap();
        assert_eq!(report.pages_evicted, 8);
        assert!(t.elapsed() >= Duration::from_millis(100));
    });
    check_stamp(&ram, r, 5);
}

#[test]
fn invalid_ranges_get_clear_errors() {
    let ram = ram(4 * MIB);
    let engine = engine(&ram);
    let cases = [
        (range(0x1001, PAGE), "unaligned"),
        (range(0x1000, 100), "unaligned"),
        (range(0x1000, 0), "empty"),
        (range(8 * MIB as u64, PAGE), "outside"),
        (range(4 * MIB as u64 - PAGE, 2 * PAGE), "crosses the end"),
    ];
    for (r, what) in cases {
        let err = engine.offline(r, Mode::Migrate, soon(100)).unwrap_err();
        let ok = matches!(
            (&err, what),
            (OfflineError::Range(RamError::Unaligned(_)), "unaligned")
                | (OfflineError::Range(RamError::Empty(_)), "empty")
                | (OfflineError::Range(RamError::OutOfRange(_)), "outside")
                | (OfflineError::Range(RamError::RangeOutOfBounds(_)), "crosses the end")
        );
        assert!(ok, "{r} ({what}): {err}");
        assert!(engine.pin(r, |_| {}).is_err(), "{r}: pin accepted");
        assert!(engine.page_ref(r, soon(100)).is_err(), "{r}: reference granted");
    }
    // Overlapping an offline in progress (held up by a hard pin).
    stamp(&ram, range(0x10_0000, 4 * PAGE), 0);
    let hard = engine.hard_pin(range(0x10_0000, PAGE), soon(1000)).unwrap();
    std::thread::scope(|s| {
        let h = s.spawn(|| engine.offline(range(0x10_0000, 4 * PAGE), Mode::Migrate, soon(400)));
        std::thread::sleep(Duration::from_millis(100));
        let err = engine.offline(range(0x10_0000 + 2 * PAGE, 4 * PAGE), Mode::Evict, soon(100)).unwrap_err();
        assert!(matches!(err, OfflineError::Overlap(_)), "{err}");
        assert!(err.to_string().contains("overlaps an offline in progress"));
        // A disjoint one runs meanwhile.
        engine.offline(range(0x20_0000, 4 * PAGE), Mode::Migrate, soon(1000)).unwrap();
        busy(h.join().unwrap(), "the hard pin");
    });
    drop(hard);
}

#[test]
fn faults_during_an_offline_wait_and_get_the_right_contents() {
    use apf::failpoints::{Op, Rule};
    let ram = ram(4 * MIB);
    let engine = engine(&ram);
    let r = range(0x10_0000, 64 * PAGE);
    stamp(&ram, range(0x10_0000, 32 * PAGE), 0x42);
    // The offline is held at its take-out, with its pages held.
    let fp = engine.failpoints().clone();
    fp.arm(Rule::pause(Op::Move));
    // A page never touched (beyond the stamps' prefetch windows): its
    // fault waits for the offline.
    let untouched = 0x10_0000 + 63 * PAGE;
    assert_eq!(ram.state(ram.locate(GuestAddress(untouched)).unwrap()).0, PageState::Missing);
    let released = Mutex::new(None);
    std::thread::scope(|s| {
        let off = s.spawn(|| engine.offline(r, Mode::Evict, soon(5000)));
        assert!(fp.wait_paused(Duration::from_secs(5)), "the offline never took its pages out");
        let reader = s.spawn(|| {
            let v = read_word(&ram, untouched);
            (v, Instant::now())
        });
        std::thread::sleep(Duration::from_millis(150));
        *released.lock().unwrap() = Some(Instant::now());
        fp.open_gate();
        off.join().unwrap().unwrap();
        let (v, at) = reader.join().unwrap();
        assert_eq!(v, 0);
        assert!(at >= released.lock().unwrap().unwrap(), "the fault was served while the offline held the page");
    });
    assert!(engine.stats().deferred >= 1);
    check_stamp(&ram, range(0x10_0000, 32 * PAGE), 0x42);
}

/// While an offline waits for references to drain it holds nothing: a
/// fault on its range is served at once, so a holder that faults there
/// can go on and let go.
#[test]
fn faults_while_an_offline_drains_are_served_at_once() {
    let ram = ram(4 * MIB);
    let engine = engine(&ram);
    let r = range(0x10_0000, 64 * PAGE);
    stamp(&ram, range(0x10_0000, 32 * PAGE), 0x42);
    // A hard pin in the range holds the offline in its drain.
    let hard = engine.hard_pin(range(0x10_0000, PAGE), soon(1000)).unwrap();
    let untouched = 0x10_0000 + 63 * PAGE;
    assert_eq!(ram.state(ram.locate(GuestAddress(untouched)).unwrap()).0, PageState::Missing);
    std::thread::scope(|s| {
        let off = s.spawn(|| engine.offline(r, Mode::Evict, soon(5000)));
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        assert_eq!(read_word(&ram, untouched), 0);
        let took = started.elapsed();
        assert!(!off.is_finished(), "the offline ended before the hard pin was dropped");
        assert!(took < Duration::from_millis(500), "the fault waited {took:?} for a draining offline");
        // No new reference is granted while it drains.
        assert!(engine.page_ref(range(0x10_0000 + PAGE, PAGE), soon(50)).is_err());
        drop(hard);
        off.join().unwrap().unwrap();
    });
    check_stamp(&ram, range(0x10_0000, 32 * PAGE), 0x42);
}

/// The host addresses of `r`, for failpoints that match by address.
fn host_span(ram: &GuestRam, r: GuestRange) -> (u64, u64) {
    let host = ram.host_range(r.start, r.len).unwrap() as u64;
    (host, host + r.len)
}

/// An offline goes chunk by chunk and gives each chunk back as it ends:
/// while it is stopped on a later chunk, a fault on a page of a chunk
/// already done is served and a pin over that chunk re-arms, while a pin
/// over a chunk still to come waits. Every pin was called back once,
/// before any of its pages moved.
#[test]
fn an_offline_gives_back_each_chunk_as_it_ends() {
    let ram = ram(4 * MIB);
    let engine = Arc::new(engine(&ram));
    let chunk = (apf::STAGING_PAGES * PAGE_SIZE) as u64;
    let r = range(0x10_0000, 3 * chunk);
    stamp(&ram, r, 0x3c);
    let pin_over = |start: u64, called: Arc<Mutex<Vec<usize>>>| {
        let ram2 = ram.clone();
        engine.pin(range(start, 4 * PAGE), move |ev| called.lock().unwrap().push(resident(&ram2, ev.range))).unwrap()
    };
    let (first_calls, last_calls) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    let first = pin_over(r.start.0, first_calls.clone());
    let last = pin_over(r.start.0 + 2 * chunk, last_calls.clone());
    first.get(soon(1000)).unwrap();
    last.get(soon(1000)).unwrap();

    let (lo, hi) = host_span(&ram, range(r.start.0 + chunk, chunk));
    engine.failpoints().arm(apf::failpoints::Rule::pause(apf::failpoints::Op::Move).within(lo, hi));
    let off = {
        let engine = engine.clone();
        std::thread::spawn(move || engine.offline(r, Mode::Evict, soon(15_000)))
    };
    assert!(engine.failpoints().wait_paused(Duration::from_secs(5)), "the second chunk's take-out never started");
    // Both pins were called back before anything moved, each once.
    assert_eq!(*first_calls.lock().unwrap(), vec![4]);
    assert_eq!(*last_calls.lock().unwrap(), vec![4]);
    // The first chunk is in the store and given back: reading it faults,
    // and the faults are served while the offline is still stopped.
    let ram2 = ram.clone();
    common::within(Duration::from_secs(3), move || check_stamp(&ram2, range(r.start.0, chunk), 0x3c));
    first.get(soon(1000)).expect("a pin over a finished chunk re-arms at once");
    assert!(matches!(last.get(soon(100)), Err(PinError::Timeout { .. })), "a pin over a chunk still to come re-armed");
    engine.failpoints().open_gate();
    let report = off.join().unwrap().unwrap();
    assert_eq!(report.pages_evicted, 3 * apf::STAGING_PAGES);
    check_stamp(&ram, r, 0x3c);
    last.get(soon(1000)).unwrap();
    assert_eq!(last_calls.lock().unwrap().len(), 1, "called back more than once");
}

/// An offline whose deadline passes between two chunks stops there: it
/// reports the pages it did, and the pages after them were never touched.
#[test]
fn an_offline_out_of_time_between_chunks_leaves_the_rest_untouched() {
    let ram = ram(4 * MIB);
    let engine = Arc::new(engine(&ram));
    let pages = apf::STAGING_PAGES;
    let chunk = (pages * PAGE_SIZE) as u64;
    let r = range(0x10_0000, 3 * chunk);
    stamp(&ram, r, 0x77);
    let before = pfns(&ram, r);
    let (lo, hi) = host_span(&ram, range(r.start.0 + chunk, chunk));
    engine.failpoints().arm(apf::failpoints::Rule::pause(apf::failpoints::Op::Move).within(lo, hi));
    let off = {
        let engine = engine.clone();
        std::thread::spawn(move || engine.offline(r, Mode::Migrate, soon(300)))
    };
    assert!(engine.failpoints().wait_paused(Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(400));
    engine.failpoints().open_gate();
    match off.join().unwrap() {
        Err(e @ OfflineError::Unfinished { pages_done, .. }) => {
            assert_eq!(pages_done, 2 * pages);
            assert!(e.is_busy());
        }
        other => panic!("expected Unfinished, got {other:?}"),
    }
    let after = pfns(&ram, r);
    for i in 0..3 * pages {
        assert!(after[i].is_some(), "page {i} not present");
        if i < 2 * pages {
            assert_ne!(before[i], after[i], "page {i} of a done chunk kept its frame");
        } else {
            assert_eq!(before[i], after[i], "page {i} after the deadline was moved");
        }
    }
    assert!(states(&ram, r).iter().all(|s| *s == PageState::Present));
    check_stamp(&ram, r, 0x77);
}

/// The nice value of thread `tid` of this process.
fn nice_of(tid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at state:
    // nice is field 19 of the whole line, the 17th after the name.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split(' ').nth(16).unwrap().parse().unwrap()
}

/// An offline called from a low-priority thread runs at its own priority
/// until someone waits for it: a fault on a page it holds lends it the
/// priority of the thread that started the engine, and the offline's
/// thread gets its own priority back when it ends.
#[test]
fn a_fault_waiting_for_a_low_priority_offline_raises_it() {
    let ram = ram(4 * MIB);
    let engine = Arc::new(engine(&ram));
    let starter = nice_of(rustix::thread::gettid().as_raw_nonzero().get());
    let r = range(0x10_0000, 2 * (apf::STAGING_PAGES * PAGE_SIZE) as u64);
    // The first 16 pages are never touched: missing, held by the offline.
    let stamped = range(r.start.0 + 16 * PAGE, r.len - 16 * PAGE);
    stamp(&ram, stamped, 0x19);
    let (lo, hi) = host_span(&ram, r);
    engine.failpoints().arm(apf::failpoints::Rule::pause(apf::failpoints::Op::Move).within(lo, hi));
    let (tx, rx) = std::sync::mpsc::channel();
    let off = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            apf::set_thread_nice(19).unwrap();
            tx.send(rustix::thread::gettid().as_raw_nonzero().get()).unwrap();
            let result = engine.offline(r, Mode::Migrate, soon(5000));
            (result, nice_of(rustix::thread::gettid().as_raw_nonzero().get()))
        })
    };
    let tid = rx.recv().unwrap();
    assert!(engine.failpoints().wait_paused(Duration::from_secs(5)));
    assert_eq!(nice_of(tid), 19, "an offline nobody waits for was raised");
    // A fault on the held chunk waits for the offline, and raises it.
    let reader = {
        let ram = ram.clone();
        std::thread::spawn(move || read_word(&ram, r.start.0 + 3 * PAGE))
    };
    let until = Instant::now() + Duration::from_secs(5);
    while engine.stats().priority_raises + engine.stats().priority_raises_refused == 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(1));
    }
    let during = nice_of(tid);
    engine.failpoints().open_gate();
    let (result, after) = off.join().unwrap();
    result.unwrap();
    assert_eq!(reader.join().unwrap(), 0);
    assert_eq!(after, 19, "the offline did not give its thread its priority back");
    let stats = engine.stats();
    if stats.priority_raises_refused == 0 {
        assert_eq!(stats.priority_raises, 1);
        assert_eq!(during, starter, "the offline a fault waited for ran at its caller's priority");
    } else {
        // No CAP_SYS_NICE: the engine says so instead.
        assert_eq!(during, 19);
    }
    check_stamp(&ram, stamped, 0x19);
}

/// A small offline that asks for the staging area while a large one is
/// working gets its turn after the large one's current chunk, not after
/// all of it.
#[test]
fn a_small_offline_waits_for_one_chunk_of_a_large_one_not_all_of_it() {
    let ram = ram(48 * MIB);
    let engine = Arc::new(engine(&ram));
    let large = range(0, 32 * MIB as u64);
    let small = range(40 * MIB as u64, 64 * PAGE);
    stamp(&ram, large, 0x4a);
    stamp(&ram, small, 0x5b);
    // The large offline stops at its first move until the small one waits.
    let (lo, hi) = host_span(&ram, large);
    engine.failpoints().arm(apf::failpoints::Rule::pause(apf::failpoints::Op::Move).within(lo, hi));
    let big = {
        let engine = engine.clone();
        std::thread::spawn(move || engine.offline(large, Mode::Migrate, soon(20_000)))
    };
    assert!(engine.failpoints().wait_paused(Duration::from_secs(5)));
    let little = {
        let engine = engine.clone();
        std::thread::spawn(move || engine.offline(small, Mode::Migrate, soon(20_000)))
    };
    // Give the small one time to queue for the staging area.
    std::thread::sleep(Duration::from_millis(50));
    engine.failpoints().open_gate();
    little.join().unwrap().unwrap();
    assert!(!big.is_finished(), "the small offline waited for the whole large one");
    big.join().unwrap().unwrap();
    check_stamp(&ram, large, 0x4a);
    check_stamp(&ram, small, 0x5b);
}
