//! An engine on another process's memory ([`apf::RemoteMemory`]), as an
//! external page-fault handler runs it. The "other process" is this one
//! here: a sender-side descriptor is created with Firecracker's handshake
//! (`EVENT_REMOVE` alone) and registered over memory of this process, and
//! the engine adopts a duplicate of it and never touches that memory but
//! through the descriptor. (The handler crate's tests run the real thing
//! across processes.)

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apf::uffd::{Features, RegisterMode, Uffd};
use apf::{Engine, FaultError, GuestAddress, GuestRam, GuestRange, Pattern, RemoteMemory, RemoteRegion, PAGE_SIZE};

mod common;
use common::{discard, read_page, Fills, ScriptedSource};

const PAGE: u64 = PAGE_SIZE as u64;
/// Where the sender's memory starts in the engine's guest addresses (a
/// handler uses file offsets; anything but the sender's own addresses).
const OFFSET: u64 = 1 << 30;

/// The sender's memory (64 pages), its descriptor registered over it, and
/// the memory the engine adopts.
fn sender() -> (Arc<GuestRam>, Uffd, RemoteMemory) {
    let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), 64 * PAGE_SIZE)]).unwrap());
    let uffd = Uffd::new(Features::EVENT_REMOVE, Features::empty()).unwrap();
    let r = &ram.regions()[0];
    uffd.register(r.host_base(), r.len(), RegisterMode::MISSING).unwrap();
    let region = RemoteRegion { host: r.host_base(), len: r.len(), gpa: GuestAddress(OFFSET), page_size: PAGE };
    let mem = RemoteMemory::adopt(uffd.as_fd().try_clone_to_owned().unwrap(), &[region]).unwrap();
    (ram, uffd, mem)
}

/// Faults come in by the sender's addresses and are served from the
/// source at the engine's guest addresses; streams are found without
/// thread ids; a discard reads zeros; everything that would touch the
/// memory here is refused with its own error.
#[test]
fn a_remote_engine_serves_by_descriptor_only_and_refuses_what_needs_the_memory_here() {
    let (ram, _sender_uffd, mem) = sender();
    assert_eq!(mem.features(), Features::EVENT_REMOVE);
    assert!(mem.ram().is_remote());
    let pattern = Pattern { seed: 5 };
    let engine = Engine::remote(mem, Arc::new(pattern)).start().unwrap();
    for p in 0..64 {
        assert_eq!(pattern.verify(OFFSET + p * PAGE, &read_page(&ram, p * PAGE)), Ok(()), "page {p}");
    }
    assert!(engine.wait_idle(Instant::now() + Duration::from_secs(10)));
    let stats = engine.stats();
    // In order, with no thread ids: windows grow along the stream.
    assert!(stats.faults < 20, "{stats:?}");
    assert_eq!(stats.pages_installed, 64);

    discard(&ram, 8 * PAGE, 4 * PAGE);
    assert!(read_page(&ram, 9 * PAGE).iter().all(|&b| b == 0), "a discarded page reads zeros");
    assert_eq!(pattern.verify(OFFSET + 12 * PAGE, &read_page(&ram, 12 * PAGE)), Ok(()));

    let range = GuestRange::new(GuestAddress(OFFSET), 4 * PAGE);
    let deadline = Instant::now() + Duration::from_secs(1);
    assert!(matches!(engine.pin(range, |_| {}), Err(apf::PinError::Remote(r)) if r == range));
    assert!(matches!(engine.page_ref(range, deadline), Err(apf::PinError::Remote(_))));
    assert!(matches!(engine.hard_pin(range, deadline), Err(apf::PinError::Remote(_))));
    for mode in [apf::Mode::Migrate, apf::Mode::Evict, apf::Mode::Unplug, apf::Mode::HostBlock(0)] {
        let e = engine.offline(range, mode, deadline).unwrap_err();
        assert!(matches!(e, apf::OfflineError::Remote(_)), "{mode}: {e:?}");
        assert!(e.to_string().contains("another process"), "{e}");
    }
    assert!(matches!(engine.replug(range), Err(apf::OfflineError::Remote(_))));
    assert!(matches!(
        engine.offline_any_host_block(range, deadline - Instant::now()),
        Err(apf::OfflineError::Remote(_))
    ));
    assert!(engine.ram().host_range(GuestAddress(OFFSET), 8).is_err());
    let report = engine.shutdown();
    assert_eq!(report.poisoned_pages, 0, "no POISON on this descriptor");
    // The registration is the sender's: still in place after shutdown (a
    // fault there is an event on its descriptor, never zeros).
    assert!(registered_missing(ram.regions()[0].host_base()), "the engine unregistered the sender's memory");
}

/// Whether the mapping at `host` is registered with a userfaultfd in
/// MISSING mode (its `VmFlags` in `/proc/self/smaps` show `um`).
fn registered_missing(host: u64) -> bool {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ').filter(|(r, _)| r.contains('-') && !r.ends_with(':')) {
            let (lo, hi) = range.split_once('-').unwrap();
            let (lo, hi) = (u64::from_str_radix(lo, 16).unwrap(), u64::from_str_radix(hi, 16).unwrap());
            inside = (lo..hi).contains(&host);
        } else if inside && line.starts_with("VmFlags:") {
            return line.split_whitespace().any(|f| f == "um");
        }
    }
    false
}

/// The sender's memory of `pages` 2 MiB huge pages (`MAP_HUGETLB`, as
/// Firecracker maps hugetlbfs guest memory; with `MAP_NORESERVE` if
/// `noreserve`), its descriptor, and the memory the engine adopts, its
/// owner named.
fn huge_sender(pages: u64, noreserve: bool) -> (Arc<GuestRam>, Uffd, RemoteMemory) {
    let ram = Arc::new(GuestRam::anonymous_hugetlb(&[(GuestAddress(0), (pages * HP) as usize)], noreserve).unwrap());
    let uffd = Uffd::new(Features::EVENT_REMOVE, Features::empty()).unwrap();
    let r = &ram.regions()[0];
    uffd.register(r.host_base(), r.len(), RegisterMode::MISSING).unwrap();
    let region = RemoteRegion { host: r.host_base(), len: r.len(), gpa: GuestAddress(OFFSET), page_size: HP };
    let mem = RemoteMemory::adopt(uffd.as_fd().try_clone_to_owned().unwrap(), &[region]).unwrap();
    (ram, uffd, mem.with_owner(std::process::id()).unwrap())
}

const HP: u64 = apf::HUGE_PAGE_SIZE as u64;

/// The sender's huge pages mapped `MAP_NORESERVE`, one more than the pool
/// has free, and an engine over them serving `pattern` that retries a dry
/// pool once; with the number of pages. `None` (a skip) when the pool has
/// too many free pages to run dry here.
fn dry_sender(pattern: Pattern) -> Option<(Arc<GuestRam>, Uffd, Engine, u64)> {
    let pages = common::free_to_run_dry()? + 1;
    let (ram, uffd, mem) = huge_sender(pages, true);
    let config = apf::Config { fill_retries: 1, ..apf::Config::default() };
    let engine = Engine::remote(mem, Arc::new(pattern)).config(config).start().unwrap();
    Some((ram, uffd, engine, pages))
}

/// Pool: 4 pages. Each fault on another process's huge pages gets its
/// whole huge page in one copy, and a discard of one reads zeros (copied:
/// there is no huge-page ZEROPAGE).
#[test]
fn huge_pages_of_another_process_are_served_whole_and_discards_read_zeros() {
    let Some(_pool) = common::huge_pool(4) else { return };
    let (ram, _sender_uffd, mem) = huge_sender(4, false);
    assert_eq!(mem.ram().kind(), apf::MemoryKind::PrivateHugetlb);
    let pattern = Pattern { seed: 8 };
    let engine = Engine::remote(mem, Arc::new(pattern)).start().unwrap();
    let mut page = vec![0u8; HP as usize];
    for p in 0..4 {
        common::try_read(&ram, p * HP, &mut page).unwrap();
        assert_eq!(pattern.verify(OFFSET + p * HP, &page), Ok(()), "huge page {p}");
    }
    assert!(engine.wait_idle(Instant::now() + Duration::from_secs(10)));
    let stats = engine.stats();
    assert_eq!((stats.pages_installed, stats.bytes_installed), (4, 4 * HP), "{stats:?}");
    discard(&ram, HP, HP);
    common::try_read(&ram, HP, &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0), "a discarded huge page reads zeros");
    common::try_read(&ram, 2 * HP, &mut page).unwrap();
    assert_eq!(pattern.verify(OFFSET + 2 * HP, &page), Ok(()));
    assert!(engine.errors().try_iter().next().is_none());
}

/// Pool: 2 pages, then 2 more. The sender maps its huge pages
/// `MAP_NORESERVE` and the pool runs dry: the kernel answers the `COPY`
/// with `EEXIST` and nothing mapped, which the sender's page map tells
/// apart from a page that is there. Without `POISON` on the sender's
/// descriptor nothing can stand in for the page (zeros need a page too):
/// the fault is reported and stays unresolved, its thread faulting again,
/// and is served as soon as the pool has pages.
#[test]
fn a_dry_pool_in_the_owner_is_reported_and_its_fault_served_once_pages_are_free() {
    let Some(_pool) = common::huge_pool(2) else { return };
    let pattern = Pattern { seed: 9 };
    let Some((ram, _sender_uffd, engine, pages)) = dry_sender(pattern) else { return };
    let reader = {
        let ram = ram.clone();
        std::thread::spawn(move || (0..pages).map(|p| common::try_read_word(&ram, p * HP + 8)).collect::<Vec<_>>())
    };
    let dry = engine.errors().recv_timeout(Duration::from_secs(10));
    assert!(
        matches!(&dry, Some(FaultError::LeftMissing { why, .. }) if matches!(**why, FaultError::NoMemory { poisoned: false, .. })),
        "{dry:?}"
    );
    assert!(!reader.is_finished(), "the fault on the dry pool was answered");
    // Pages for it: the thread's next fault is served.
    let _more = apf::hugepool::HugePool::reserve(2, Instant::now() + Duration::from_secs(10)).unwrap();
    let words = common::within(Duration::from_secs(20), move || reader.join().unwrap());
    for (p, w) in words.iter().enumerate() {
        assert_eq!(*w, Some(pattern.word_at(OFFSET + p as u64 * HP, 1)), "huge page {p}");
    }
    assert!(engine.stats().no_memory >= 1);
}

/// Pool: 2 pages, then 2 more. A prefetch that meets the sender's dry
/// pool ran ahead of need: it reports nothing (a handler ends a peer whose
/// fault met a dry pool) and leaves the page missing, for its first fault
/// to get once the pool has a page.
#[test]
fn a_prefetch_that_meets_a_dry_pool_in_the_owner_reports_nothing_and_leaves_the_page_missing() {
    let Some(_pool) = common::huge_pool(2) else { return };
    let pattern = Pattern { seed: 10 };
    let Some((ram, _sender_uffd, engine, pages)) = dry_sender(pattern) else { return };
    let _ = engine.prefetch(GuestRange::new(GuestAddress(OFFSET), pages * HP));
    assert!(engine.wait_idle(Instant::now() + Duration::from_secs(10)));
    assert!(engine.stats().no_memory >= 1, "the pool never ran dry: {:?}", engine.stats());
    let reported: Vec<_> = engine.errors().try_iter().collect();
    assert!(reported.is_empty(), "{reported:?}");
    let states = engine.ram().regions()[0].census();
    assert!(states[apf::PageState::Missing as usize] >= 1, "the page the pool had none for is missing: {states:?}");
    assert_eq!(states[apf::PageState::Resolving as usize], 0, "nothing is left claimed: {states:?}");
    let _more = apf::hugepool::HugePool::reserve(2, Instant::now() + Duration::from_secs(10)).unwrap();
    let words = common::within(Duration::from_secs(20), {
        let ram = ram.clone();
        move || (0..pages).map(|p| common::try_read_word(&ram, p * HP + 8)).collect::<Vec<_>>()
    });
    for (p, w) in words.iter().enumerate() {
        assert_eq!(*w, Some(pattern.word_at(OFFSET + p as u64 * HP, 1)), "huge page {p}");
    }
}

/// Without `POISON`, a source that fails for good gives the faulting
/// thread zeros and says so; the thread is never left waiting.
#[test]
fn a_failing_source_without_poison_gives_zeros_and_reports_it() {
    let (ram, _sender_uffd, mem) = sender();
    let source = Arc::new(ScriptedSource::pattern(Pattern { seed: 6 }).fail(Fills::All));
    let config = apf::Config { fill_retries: 1, fault_around: 1, ..apf::Config::default() };
    let engine = Engine::remote(mem, source).config(config).start().unwrap();
    let page = common::within(Duration::from_secs(10), {
        let ram = ram.clone();
        move || read_page(&ram, 3 * PAGE)
    });
    assert!(page.iter().all(|&b| b == 0));
    match engine.errors().recv_timeout(Duration::from_secs(5)) {
        Some(FaultError::ZeroFilled { gpa, why }) => {
            assert_eq!(gpa, GuestAddress(OFFSET + 3 * PAGE));
            assert!(matches!(*why, FaultError::SourceFailed { poisoned: false, .. }), "{why:?}");
        }
        other => panic!("expected ZeroFilled, got {other:?}"),
    }
}

/// A handler that dies mid-restore leaves the descriptor with faults it
/// read and never answered (never delivered again) and removes it read
/// (gone). The next engine on the same descriptor wakes every region, so
/// the blocked thread faults anew and is served; it skips pages already
/// there (`EEXIST`), never overwriting them; and the removed pages it is
/// told of (the set a supervisor keeps through `on_remove`) read zeros,
/// not the source's contents.
#[test]
fn a_new_engine_takes_over_from_a_handler_that_died() {
    let (ram, sender_uffd, mem) = sender();
    let pattern = Pattern { seed: 7 };
    let removed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let hook = removed.clone();
    let first = Engine::remote(mem, Arc::new(pattern))
        .config(apf::Config { fault_around: 1, ..apf::Config::default() })
        .on_remove(move |r| hook.lock().unwrap().push(r))
        .start()
        .unwrap();
    assert_eq!(pattern.verify(OFFSET + 8 * PAGE, &read_page(&ram, 8 * PAGE)), Ok(()));
    common::write_word(&ram, 8 * PAGE, 0xfeed);
    discard(&ram, 16 * PAGE, 4 * PAGE);
    // The hook runs right after the event is read, which is what lets the
    // `madvise` return: it may come a moment after.
    let deadline = Instant::now() + Duration::from_secs(5);
    while removed.lock().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let told = removed.lock().unwrap().clone();
    assert_eq!(told, [GuestRange::new(GuestAddress(OFFSET + 16 * PAGE), 4 * PAGE)]);
    first.shutdown();

    // The handler "dies" holding a fault: read here, never answered.
    let reader = std::thread::spawn({
        let ram = ram.clone();
        move || read_page(&ram, 30 * PAGE)
    });
    let mut buf = apf::uffd::EventBuf::default();
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while events.is_empty() {
        assert!(Instant::now() < deadline, "the fault never came");
        sender_uffd.read_events(&mut buf, &mut events).unwrap();
    }
    assert!(matches!(events[0], apf::uffd::Event::Fault { .. }), "{events:?}");

    let r = &ram.regions()[0];
    let region = RemoteRegion { host: r.host_base(), len: r.len(), gpa: GuestAddress(OFFSET), page_size: PAGE };
    let mem = RemoteMemory::adopt(sender_uffd.as_fd().try_clone_to_owned().unwrap(), &[region]).unwrap();
    for range in told {
        mem.mark_removed(range).unwrap();
    }
    let second = Engine::remote(mem, Arc::new(pattern)).start().unwrap();
    let page = common::within(Duration::from_secs(10), move || reader.join().unwrap());
    assert_eq!(pattern.verify(OFFSET + 30 * PAGE, &page), Ok(()), "the woken thread is served");
    // Page 9's fault-around block holds page 8, written above: EEXIST keeps it.
    assert_eq!(pattern.verify(OFFSET + 9 * PAGE, &read_page(&ram, 9 * PAGE)), Ok(()));
    assert_eq!(common::read_word(&ram, 8 * PAGE), 0xfeed, "a page already there is never overwritten");
    assert!(read_page(&ram, 17 * PAGE).iter().all(|&b| b == 0), "a page removed before the takeover reads zeros");
    drop(second);
}

/// A descriptor that is not an initialized userfaultfd, or regions the
/// engine cannot serve, are refused at adoption.
#[test]
fn adoption_refuses_other_descriptors_and_bad_regions() {
    let file = std::fs::File::open("/proc/self/stat").unwrap();
    let region = RemoteRegion { host: 0x7f00_0000_0000, len: PAGE, gpa: GuestAddress(0), page_size: PAGE };
    match RemoteMemory::adopt(file.into(), &[region]) {
        Err(apf::EngineError::Uffd(e)) => assert!(e.to_string().contains("not an initialized userfaultfd"), "{e}"),
        other => panic!("a file was adopted: {other:?}"),
    }
    let uffd = Uffd::new(Features::EVENT_REMOVE, Features::empty()).unwrap();
    // Huge pages for some regions and not others, or pages of 8 KiB.
    let huge = RemoteRegion { page_size: 2 << 20, len: 2 << 20, ..region };
    let small = RemoteRegion { host: 0x7f00_1000_0000, gpa: GuestAddress(4 << 20), ..region };
    let fd = uffd.as_fd().try_clone_to_owned().unwrap();
    let mixed = RemoteMemory::adopt(fd, &[huge, small]);
    assert!(matches!(mixed, Err(apf::EngineError::Ram(apf::RamError::PageSize { .. }))), "{mixed:?}");
    let odd = RemoteRegion { page_size: 8192, len: 8192, ..region };
    let fd = uffd.as_fd().try_clone_to_owned().unwrap();
    assert!(matches!(RemoteMemory::adopt(fd, &[odd]), Err(apf::EngineError::Ram(apf::RamError::PageSize { .. }))));
    // Huge pages need their owner named, and an owner whose page map
    // cannot be read (here: no such process) is refused.
    let fd = uffd.as_fd().try_clone_to_owned().unwrap();
    let mem = RemoteMemory::adopt(fd, &[huge]).unwrap();
    let started = Engine::remote(mem, Arc::new(Pattern { seed: 1 })).start();
    assert!(matches!(&started, Err(apf::EngineError::Config(m)) if m.contains("owner")), "{started:?}");
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    let fd = uffd.as_fd().try_clone_to_owned().unwrap();
    let owned = RemoteMemory::adopt(fd, &[huge]).unwrap().with_owner(pid_max);
    assert!(matches!(owned, Err(apf::EngineError::OwnerUnreadable { pid, .. }) if pid == pid_max), "{owned:?}");
}
