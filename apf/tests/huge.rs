//! 2 MiB huge pages on real hugetlb memory: private anonymous
//! (`MAP_HUGETLB`, with and without `MAP_NORESERVE`), a shared memfd
//! (`MFD_HUGETLB`), and an image loaded into huge pages mapped private. A fault gets its whole huge page in one install, zeros
//! are copied (the kernel has no huge-page `ZEROPAGE`), page states and
//! pins count huge pages, discards and every range the engine is handed
//! are whole huge pages, and a pool that runs dry is reported, never
//! waited on.
//!
//! Each test states the huge pages it needs from the pool and reserves
//! them for its run; where the machine cannot give them, it says so and
//! skips (under `CI=true` it fails instead).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apf::failpoints::{Op, Rule};
use apf::hugepool::HugePool;
use apf::{
    Engine, FaultError, GuestAddress, GuestRam, GuestRange, MemoryKind, Mode, OfflineError, Pattern, PinError,
    RamError, ZeroSource, HUGE_PAGE_SIZE,
};
use common::{try_read, try_read_word, within};

const HP: u64 = HUGE_PAGE_SIZE as u64;
const BASE: u64 = 0x4000_0000;

use common::{huge_pool as reserve, hugepages_free, meminfo};

fn huge_ram(kind: MemoryKind, pages: u64) -> Arc<GuestRam> {
    let ranges = [(GuestAddress(BASE), (pages * HP) as usize)];
    Arc::new(match kind {
        MemoryKind::PrivateHugetlb => GuestRam::anonymous_hugetlb(&ranges, false).unwrap(),
        MemoryKind::SharedHugetlb => GuestRam::shared_hugetlb(&ranges).unwrap(),
        other => panic!("{other:?} is not a huge kind"),
    })
}

/// A snapshot file of `bytes` holding `pattern` (as guest RAM from `BASE`),
/// with the byte ranges in `zeros` zeroed, loaded into huge pages.
fn huge_image(name: &str, pattern: Pattern, bytes: u64, zeros: &[(u64, u64)]) -> Arc<apf::Image> {
    let mut contents = vec![0u8; bytes as usize];
    pattern.write(BASE, &mut contents);
    for &(a, b) in zeros {
        contents[a as usize..b as usize].fill(0);
    }
    let path = std::env::temp_dir().join(format!("apf-huge-image-{name}-{}", std::process::id()));
    std::fs::write(&path, &contents).unwrap();
    let image = apf::Image::load_hugetlb(&path);
    std::fs::remove_file(&path).unwrap();
    image.unwrap()
}

/// An engine over `image` mapped private for `pages` huge pages from
/// `BASE`.
fn on_image(image: &Arc<apf::Image>, pages: u64) -> (Arc<GuestRam>, Engine) {
    let ram = Arc::new(GuestRam::image(&[(GuestAddress(BASE), (pages * HP) as usize)], image.clone()).unwrap());
    let engine = Engine::builder(ram.clone(), ram.image_source().unwrap()).start().unwrap();
    (ram, engine)
}

/// Pool: the image (3 huge pages of data and a hole) and 4 pages of
/// private copies for each of two guests: 11, and 2 of slack.
#[test]
fn an_image_of_huge_pages_is_mapped_in_place_copied_on_write_and_shared_by_clones() {
    let Some(_pool) = reserve(13) else { return };
    let pattern = Pattern { seed: 41 };
    // 3.5 huge pages of file, huge page 1 all zeros: the image rounds the
    // tail up with zeros and leaves page 1 a hole.
    let image = huge_image("clones", pattern, 3 * HP + HP / 2, &[(HP, 2 * HP)]);
    assert!(image.is_huge());
    assert_eq!((image.len(), image.page_size()), (4 * HP, HUGE_PAGE_SIZE));
    assert_eq!(image.resident_bytes().unwrap(), 3 * HP, "the all-zero page is a hole");
    let mut want = vec![0u8; (4 * HP) as usize];
    pattern.write(BASE, &mut want);
    want[HP as usize..2 * HP as usize].fill(0);
    want[(3 * HP + HP / 2) as usize..].fill(0);
    let (ram, engine) = on_image(&image, 4);
    assert_eq!((ram.kind(), ram.regions()[0].page_size()), (MemoryKind::HugetlbImage, HUGE_PAGE_SIZE));
    // A read maps the image's own huge pages in place, no copy: the
    // block around it, but for the hole, which would cost a page of zeros.
    let gpa = BASE + 0x12_3450;
    let word = within(Duration::from_secs(10), {
        let ram = ram.clone();
        move || try_read_word(&ram, gpa)
    });
    assert_eq!(word, Some(pattern.word_at(gpa & !4095, (gpa as usize & 4095) / 8)));
    settle(&engine);
    let stats = engine.stats();
    assert_eq!((stats.faults, stats.continued, stats.pages_installed), (1, 3, 3), "{stats:?}");
    assert_eq!(ram.regions()[0].state(1).0, apf::PageState::Missing, "the hole was left to its own fault");
    // Every byte, the hole and the rounded tail reading zeros.
    let mut got = vec![0u8; (4 * HP) as usize];
    try_read(&ram, BASE, &mut got).unwrap();
    assert!(got == want, "the guest does not see the image");
    let stats = engine.stats();
    assert_eq!((stats.faults, stats.continued, stats.pages_installed), (2, 3, 4), "the hole gets zeros: {stats:?}");
    // Writes: a first write maps the image's pages as a read does, and
    // the kernel's copy-on-write gives the writer its private copy (a
    // second guest's first write on page 2, and the first guest's write on
    // page 0, which it read). Neither changes the image or the other guest.
    let (ram2, engine2) = on_image(&image, 4);
    common::write_word(&ram2, BASE + 2 * HP + 8, 0xfeed);
    common::write_word(&ram, BASE + 16, 0xbeef);
    settle(&engine2);
    assert_eq!((engine2.stats().faults, engine2.stats().continued), (1, 3), "{:?}", engine2.stats());
    assert_eq!(common::read_word(&ram2, BASE + 2 * HP + 8), 0xfeed);
    assert_eq!(common::read_word(&ram, BASE + 2 * HP + 8), pattern.word_at(BASE + 2 * HP, 1));
    assert_eq!(common::read_word(&ram2, BASE + 16), pattern.word_at(BASE, 2));
    let mut again = vec![0u8; HUGE_PAGE_SIZE];
    try_read(&ram2, BASE, &mut again).unwrap();
    assert!(again[..] == want[..HUGE_PAGE_SIZE], "a write reached the image");
    // A discard (a balloon's `MADV_DONTNEED`) would show the image again:
    // the guest reads zeros instead.
    madvise(&ram, BASE + 3 * HP, HP, libc::MADV_DONTNEED).unwrap();
    let page = within(Duration::from_secs(10), {
        let ram = ram.clone();
        move || read_huge(&ram, BASE + 3 * HP)
    });
    assert!(page.unwrap().iter().all(|&b| b == 0), "a discarded page showed the image");
    assert_eq!(common::read_word(&ram2, BASE + 3 * HP), pattern.word_at(BASE + 3 * HP, 0));
    assert!(engine.errors().try_iter().next().is_none());
    assert!(engine2.errors().try_iter().next().is_none());
}

/// Pool: the image (8 pages), 8 of private pages and 2 of slack. A
/// block of 8 image pages, claimed by a read that keeps meeting `EAGAIN`,
/// is discarded whole meanwhile: every page of it is zeros now, 16 MiB of
/// them, more than the engine's zero buffer holds; they are installed in
/// pieces no longer than it, and every byte reads zero.
#[test]
fn a_claimed_block_discarded_whole_reads_zeros_in_every_byte() {
    let Some(_pool) = reserve(8 + 8 + 2) else { return };
    let pattern = Pattern { seed: 77 };
    let image = huge_image("block", pattern, 8 * HP, &[]);
    let ram = Arc::new(GuestRam::image(&[(GuestAddress(BASE), (8 * HP) as usize)], image.clone()).unwrap());
    // The claimed job keeps retrying its EAGAIN until the discard, however
    // late a loaded machine lets this thread make it.
    let config = apf::Config { install_deadline: Duration::from_secs(60), ..apf::Config::default() };
    let engine = Engine::builder(ram.clone(), ram.image_source().unwrap()).config(config).start().unwrap();
    let fp = engine.failpoints();
    fp.arm(Rule::new(Op::Continue, libc::EAGAIN).times(u64::MAX));
    let reader = {
        let ram = ram.clone();
        std::thread::spawn(move || try_read_word(&ram, BASE + 8))
    };
    let t = Instant::now();
    while fp.fired() < 3 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(fp.fired() >= 3, "the block's CONTINUE was never tried");
    madvise(&ram, BASE, 8 * HP, libc::MADV_DONTNEED).unwrap();
    fp.clear();
    assert_eq!(within(Duration::from_secs(10), move || reader.join().unwrap()), Some(0));
    settle(&engine);
    // The claimed job installed the whole block (had it given up, a new
    // fault would take page 0 alone: its neighbours are zeros now).
    assert_eq!(engine.stats().pages_installed, 8, "{:?}", engine.stats());
    for p in 0..8u64 {
        let page = read_huge(&ram, BASE + p * HP).unwrap();
        assert_eq!(page.iter().filter(|&&b| b != 0).count(), 0, "huge page {p} holds bytes that are not the guest's");
    }
    assert!(engine.errors().try_iter().next().is_none());
}

/// Pool: 2 pages, against an image of 2 pages of data more than the pool
/// has free.
#[test]
fn an_image_larger_than_the_pool_fails_to_load_and_keeps_no_page() {
    let Some(_pool) = reserve(2) else { return };
    let Some(free) = common::free_to_run_dry() else { return };
    let mut contents = vec![0u8; ((free + 2) * HP) as usize];
    Pattern { seed: 43 }.write(BASE, &mut contents);
    let path = std::env::temp_dir().join(format!("apf-huge-image-short-{}", std::process::id()));
    std::fs::write(&path, &contents).unwrap();
    let err = apf::Image::load_hugetlb(&path).map(|_| ()).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    assert!(
        matches!(&err, apf::ImageError::Memfd { what: "fallocate", source } if source.raw_os_error() == Some(libc::ENOSPC)),
        "{err:?}"
    );
    assert_eq!(hugepages_free(), free, "the pages loaded before the pool ran dry were kept");
}

/// The huge page at `gpa` read whole with `process_vm_readv` (a poisoned
/// page answers an error, not SIGBUS).
fn read_huge(ram: &GuestRam, gpa: u64) -> std::io::Result<Vec<u8>> {
    let mut page = vec![0u8; HUGE_PAGE_SIZE];
    try_read(ram, gpa, &mut page)?;
    Ok(page)
}

fn madvise(ram: &GuestRam, gpa: u64, len: u64, advice: i32) -> std::io::Result<()> {
    let host = ram.host_range(GuestAddress(gpa), len).unwrap();
    // SAFETY: guest RAM the engine serves, reached through no Rust
    // reference; dropping or punching it is what a balloon does.
    if unsafe { libc::madvise(host.cast(), len as usize, advice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn settle(engine: &Engine) {
    assert!(engine.wait_idle(Instant::now() + Duration::from_secs(10)), "the engine did not go idle");
}

/// Pool: 4 pages per kind (4 of guest RAM), one kind at a time.
#[test]
fn a_fault_gets_its_whole_huge_page_from_the_source_in_one_copy() {
    let Some(_pool) = reserve(4) else { return };
    let pattern = Pattern { seed: 3 };
    for kind in [MemoryKind::PrivateHugetlb, MemoryKind::SharedHugetlb] {
        let ram = huge_ram(kind, 4);
        assert_eq!((ram.regions()[0].pages(), ram.regions()[0].page_size()), (4, HUGE_PAGE_SIZE));
        let engine = Engine::builder(ram.clone(), Arc::new(pattern)).start().unwrap();
        // One word in the middle of huge page 2.
        let gpa = BASE + 2 * HP + 0x12_3458;
        let word = within(Duration::from_secs(10), {
            let ram = ram.clone();
            move || try_read_word(&ram, gpa)
        });
        assert_eq!(word, Some(pattern.word_at(gpa & !4095, (gpa as usize & 4095) / 8)), "{kind:?}");
        settle(&engine);
        let stats = engine.stats();
        assert_eq!((stats.faults, stats.pages_installed, stats.windows), (1, 1, 1), "{kind:?}: {stats:?}");
        assert_eq!(stats.bytes_installed, HP, "{kind:?}: the whole huge page in one copy");
        // Every byte of it is the source's, with no further fault.
        let page = read_huge(&ram, BASE + 2 * HP).unwrap();
        assert_eq!(pattern.verify(BASE + 2 * HP, &page), Ok(()), "{kind:?}");
        assert_eq!(engine.stats().faults, 1, "{kind:?}");
        assert_eq!(ram.regions()[0].census()[apf::PageState::Present as usize], 1);
        assert!(engine.errors().try_iter().next().is_none());
    }
}

/// Pool: 2 pages per kind.
#[test]
fn zeros_are_copied_from_a_zero_huge_page_not_mapped_with_zeropage() {
    let Some(_pool) = reserve(2) else { return };
    for kind in [MemoryKind::PrivateHugetlb, MemoryKind::SharedHugetlb] {
        let ram = huge_ram(kind, 2);
        let engine = Engine::builder(ram.clone(), Arc::new(ZeroSource)).start().unwrap();
        // A read (which on small pages maps the zero page) and a write.
        let page = within(Duration::from_secs(10), {
            let ram = ram.clone();
            move || read_huge(&ram, BASE)
        });
        assert!(page.unwrap().iter().all(|&b| b == 0), "{kind:?}");
        common::write_word(&ram, BASE + HP + 8, 77);
        assert_eq!(common::read_word(&ram, BASE + HP + 8), 77);
        settle(&engine);
        let stats = engine.stats();
        assert_eq!((stats.pages_installed, stats.zero_pages), (2, 0), "{kind:?}: {stats:?}");
        assert!(engine.errors().try_iter().next().is_none(), "{kind:?}");
    }
}

/// Pool: 64 pages (128 MiB of guest RAM, pinned whole).
#[test]
fn a_pin_over_huge_pages_costs_huge_pages_not_small_ones() {
    let Some(_pool) = reserve(64) else { return };
    let ram = huge_ram(MemoryKind::PrivateHugetlb, 64);
    let engine = Engine::builder(ram.clone(), Arc::new(Pattern { seed: 9 })).start().unwrap();
    let range = GuestRange::new(GuestAddress(BASE), 64 * HP);
    let pin = engine.pin(range, |_| {}).unwrap();
    let guard = pin.get(Instant::now() + Duration::from_secs(20)).unwrap();
    assert_eq!(guard.len() as u64, 64 * HP);
    drop(guard);
    let stats = engine.stats();
    // The page states walked are huge pages: a few passes over 64 of them,
    // where small pages would be 32768 a pass.
    assert!(stats.pin_pages_checked >= 64 && stats.pin_pages_checked % 64 == 0, "{stats:?}");
    assert!(stats.pin_pages_checked <= 64 * 8, "{stats:?}");
    assert_eq!(stats.pages_installed, 64, "{stats:?}");
    // Windows of a few huge pages at most.
    assert!(stats.windows >= 64 / 4, "{stats:?}");
    let mut word = [0u8; 8];
    try_read(&ram, BASE + 63 * HP + 4096, &mut word).unwrap();
    assert_eq!(u64::from_le_bytes(word), Pattern { seed: 9 }.word_at(BASE + 63 * HP + 4096, 0));
    assert_eq!(engine.stats().faults, 0, "pinned memory is present");
}

/// Pool: 4 pages.
#[test]
fn private_huge_pages_are_removed_whole_and_an_unaligned_discard_raises_nothing() {
    let Some(_pool) = reserve(4) else { return };
    let pattern = Pattern { seed: 5 };
    let ram = huge_ram(MemoryKind::PrivateHugetlb, 4);
    let engine = Engine::builder(ram.clone(), Arc::new(pattern)).start().unwrap();
    assert_eq!(engine.prefetch(GuestRange::new(GuestAddress(BASE), 4 * HP)).unwrap(), 4);
    // Huge page 1 removed, as a balloon does: zeros from then on.
    madvise(&ram, BASE + HP, HP, libc::MADV_DONTNEED).unwrap();
    let page = within(Duration::from_secs(10), {
        let ram = ram.clone();
        move || read_huge(&ram, BASE + HP)
    });
    assert!(page.unwrap().iter().all(|&b| b == 0));
    let deadline = Instant::now() + Duration::from_secs(5);
    while engine.stats().removes < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(engine.stats().removes, 1);
    // The kernel refuses a discard that does not start on a huge page,
    // and raises no event for it; a length past a whole page is cut to
    // whole pages. Nothing is lost either way.
    let unaligned = madvise(&ram, BASE + 2 * HP + 4096, HP, libc::MADV_DONTNEED).unwrap_err();
    assert_eq!(unaligned.raw_os_error(), Some(libc::EINVAL));
    madvise(&ram, BASE + 2 * HP, HP + HP / 2, libc::MADV_DONTNEED).unwrap();
    // (An event is counted just after `madvise` is let go.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while engine.stats().removes < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(engine.stats().removes, 2, "one event, for the whole page only");
    assert_eq!(ram.regions()[0].state(3).0, apf::PageState::Present);
    assert_eq!(pattern.verify(BASE + 3 * HP, &read_huge(&ram, BASE + 3 * HP).unwrap()), Ok(()));
    assert!(read_huge(&ram, BASE + 2 * HP).unwrap().iter().all(|&b| b == 0));
    assert_eq!(pattern.verify(BASE, &read_huge(&ram, BASE).unwrap()), Ok(()));
    assert!(engine.errors().try_iter().next().is_none());
}

/// Pool: 3 pages.
#[test]
fn shared_huge_pages_keep_contents_on_dontneed_and_read_zeros_after_remove() {
    let Some(_pool) = reserve(3) else { return };
    let pattern = Pattern { seed: 6 };
    let ram = huge_ram(MemoryKind::SharedHugetlb, 3);
    let engine = Engine::builder(ram.clone(), Arc::new(pattern)).start().unwrap();
    assert_eq!(engine.prefetch(GuestRange::new(GuestAddress(BASE), 3 * HP)).unwrap(), 3);
    common::write_word(&ram, BASE + 8, 42);
    // MADV_DONTNEED unmaps; the page cache keeps the contents.
    madvise(&ram, BASE, HP, libc::MADV_DONTNEED).unwrap();
    // MADV_REMOVE punches the hole: zeros.
    madvise(&ram, BASE + HP, HP, libc::MADV_REMOVE).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while engine.stats().removes < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(engine.stats().removes, 2);
    assert_eq!(try_read_word(&ram, BASE + 8), Some(42), "kept by the page cache");
    let page = within(Duration::from_secs(10), {
        let ram = ram.clone();
        move || read_huge(&ram, BASE + HP)
    });
    assert!(page.unwrap().iter().all(|&b| b == 0), "punched: zeros");
    // A pin over the kept page finds it in the page cache (the install
    // meets EEXIST), never overwrites it.
    let r = engine.page_ref(GuestRange::new(GuestAddress(BASE), HP), Instant::now() + Duration::from_secs(10)).unwrap();
    drop(r);
    assert_eq!(try_read_word(&ram, BASE + 8), Some(42));
    assert_eq!(pattern.verify(BASE + 2 * HP, &read_huge(&ram, BASE + 2 * HP).unwrap()), Ok(()));
    // A MADV_REMOVE of part of a huge page: the kernel zeros that part
    // and keeps the page (and reports the range as it was given). The
    // engine marks the whole page removed; the page cache keeps the rest.
    madvise(&ram, BASE + 2 * HP + 4096, 4096, libc::MADV_REMOVE).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while engine.stats().removes < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(engine.stats().removes, 3);
    let r = engine.page_ref(GuestRange::new(GuestAddress(BASE + 2 * HP), HP), Instant::now() + Duration::from_secs(10));
    drop(r.unwrap());
    let page = read_huge(&ram, BASE + 2 * HP).unwrap();
    assert!(page[4096..8192].iter().all(|&b| b == 0), "the part removed reads zeros");
    assert_eq!(pattern.verify(BASE + 2 * HP, &page[..4096]), Ok(()));
    assert_eq!(pattern.verify(BASE + 2 * HP + 8192, &page[8192..]), Ok(()), "the rest is kept");
    assert!(engine.errors().try_iter().next().is_none());
}

/// Pool: 3 pages.
#[test]
fn shutdown_poisons_the_holes_of_shared_huge_pages_and_spares_kept_ones() {
    let Some(_pool) = reserve(3) else { return };
    let pattern = Pattern { seed: 13 };
    let ram = huge_ram(MemoryKind::SharedHugetlb, 3);
    let engine = Engine::builder(ram.clone(), Arc::new(pattern)).start().unwrap();
    assert_eq!(engine.prefetch(GuestRange::new(GuestAddress(BASE), 2 * HP)).unwrap(), 2);
    common::write_word(&ram, BASE + 8, 42);
    // Unmapped, kept by the page cache; the engine calls it missing.
    madvise(&ram, BASE, HP, libc::MADV_DONTNEED).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while ram.regions()[0].state(0).0 != apf::PageState::Missing {
        assert!(Instant::now() < deadline, "the remove was never applied");
        std::thread::sleep(Duration::from_millis(1));
    }
    let report = engine.shutdown();
    assert_eq!(report.poisoned_pages, 1, "{report:?}");
    assert_eq!(try_read_word(&ram, BASE + 8), Some(42), "a kept page is not poisoned at shutdown");
    assert_eq!(try_read_word(&ram, BASE + HP), Some(pattern.word_at(BASE + HP, 0)));
    assert_eq!(try_read_word(&ram, BASE + 2 * HP), None, "a hole is");
}

/// Pool: 2 pages.
#[test]
fn unaligned_ranges_are_refused_on_huge_pages_and_lose_nothing() {
    let Some(_pool) = reserve(2) else { return };
    let pattern = Pattern { seed: 8 };
    let ram = huge_ram(MemoryKind::PrivateHugetlb, 2);
    let engine = Engine::builder(ram.clone(), Arc::new(pattern)).start().unwrap();
    assert_eq!(engine.prefetch(GuestRange::new(GuestAddress(BASE), 2 * HP)).unwrap(), 2);
    let deadline = || Instant::now() + Duration::from_secs(5);
    let unaligned = GuestRange::new(GuestAddress(BASE + 4096), HP);
    let short = GuestRange::new(GuestAddress(BASE), HP / 2);
    for range in [unaligned, short] {
        let is_unaligned = |e: &RamError| matches!(e, RamError::UnalignedToPages { page_size, .. } if *page_size == HP);
        match engine.page_ref(range, deadline()) {
            Err(PinError::Range(e)) if is_unaligned(&e) => {}
            other => panic!("{range:?}: {other:?}"),
        }
        match engine.pin(range, |_| {}).map(|p| p.get(deadline()).map(drop)) {
            Ok(Err(PinError::Range(e))) | Err(PinError::Range(e)) if is_unaligned(&e) => {}
            other => panic!("{range:?}: {other:?}"),
        }
        match engine.offline(range, Mode::HostBlock(0), deadline()) {
            Err(OfflineError::Range(e)) if is_unaligned(&e) => {}
            other => panic!("{range:?}: {other:?}"),
        }
        assert!(engine.prefetch(range).is_err(), "{range:?}");
    }
    for p in 0..2 {
        assert_eq!(pattern.verify(BASE + p * HP, &read_huge(&ram, BASE + p * HP).unwrap()), Ok(()));
    }
    assert_eq!(engine.stats().pages_installed, 2);
}

/// Pool: 4 pages per kind, one kind at a time.
#[test]
fn unplug_of_huge_pages_reads_zeros_and_gives_the_pages_back_to_the_pool() {
    let Some(_pool) = reserve(4) else { return };
    let pattern = Pattern { seed: 31 };
    for kind in [MemoryKind::PrivateHugetlb, MemoryKind::SharedHugetlb] {
        let ram = huge_ram(kind, 4);
        let engine = Engine::builder(ram.clone(), Arc::new(pattern)).start().unwrap();
        assert!(Mode::Unplug.offered_on(kind));
        assert_eq!(engine.prefetch(GuestRange::new(GuestAddress(BASE), 4 * HP)).unwrap(), 4);
        common::write_word(&ram, BASE + HP + 8, 42);
        let held = huge_pages_held(&ram);
        assert_eq!(held, 4, "{kind:?}");
        let free = settled_hugepages_free();
        // Huge pages 1 and 2, whole.
        let range = GuestRange::new(GuestAddress(BASE + HP), 2 * HP);
        let report = engine.offline(range, Mode::Unplug, Instant::now() + Duration::from_secs(10)).unwrap();
        assert_eq!((report.pages, report.pages_taken, report.pages_unplugged), (2, 2, 2), "{kind:?}: {report:?}");
        // Gone from guest RAM, and back in the pool. (The pool is the
        // machine's: another process taking or giving pages meanwhile
        // would show here.)
        assert_eq!(huge_pages_held(&ram), 2, "{kind:?}: both huge pages left guest RAM");
        assert_eq!(settled_hugepages_free(), free + 2, "{kind:?}: both huge pages went back to the pool");
        for p in [1, 2] {
            let page = within(Duration::from_secs(10), {
                let ram = ram.clone();
                move || read_huge(&ram, BASE + p * HP)
            });
            assert!(page.unwrap().iter().all(|&b| b == 0), "{kind:?}: page {p} reads zeros");
        }
        for p in [0, 3] {
            assert_eq!(pattern.verify(BASE + p * HP, &read_huge(&ram, BASE + p * HP).unwrap()), Ok(()), "{kind:?}");
        }
        // Writable again.
        common::write_word(&ram, BASE + HP + 8, 77);
        assert_eq!(common::read_word(&ram, BASE + HP + 8), 77);
        assert!(engine.errors().try_iter().next().is_none(), "{kind:?}");
    }
}

/// Pool: the image (4 pages), 4 of private copies for each of two guests
/// and 2 of slack. On an image of huge pages an unplug drops the guest's
/// pages: the private copy
/// goes back to the pool, pages mapped from the image stay the image's,
/// and both read zeros, not the image; a pin over the range is told and
/// gets zeros when it pins again.
#[test]
fn unplug_of_an_image_of_huge_pages_reads_zeros_and_gives_private_copies_back() {
    let Some(_pool) = reserve(14) else { return };
    let pattern = Pattern { seed: 51 };
    let image = huge_image("unplug", pattern, 4 * HP, &[]);
    let (ram, engine) = on_image(&image, 4);
    assert!(Mode::Unplug.offered_on(MemoryKind::HugetlbImage));
    let range = GuestRange::new(GuestAddress(BASE), 4 * HP);
    assert_eq!(engine.prefetch(range).unwrap(), 4);
    // Page 1 becomes the guest's own (the kernel's copy-on-write).
    common::write_word(&ram, BASE + HP + 8, 42);
    let told = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let pin = {
        let told = told.clone();
        engine.pin(GuestRange::new(GuestAddress(BASE + HP), HP), move |_| {
            told.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
    }
    .unwrap();
    drop(pin.get(Instant::now() + Duration::from_secs(10)).unwrap());
    let free = settled_hugepages_free();
    let unplugged = GuestRange::new(GuestAddress(BASE + HP), 2 * HP);
    let report = engine.offline(unplugged, Mode::Unplug, Instant::now() + Duration::from_secs(10)).unwrap();
    assert_eq!((report.pages, report.pages_unplugged), (2, 2), "{report:?}");
    assert!(told.load(std::sync::atomic::Ordering::Relaxed) >= 1, "the pin was not told");
    assert_eq!(settled_hugepages_free(), free + 1, "the private copy went back to the pool, the image's page stayed");
    for p in [1, 2] {
        let page = within(Duration::from_secs(10), {
            let ram = ram.clone();
            move || read_huge(&ram, BASE + p * HP)
        });
        assert!(page.unwrap().iter().all(|&b| b == 0), "page {p} reads zeros, not the image");
    }
    for p in [0, 3] {
        assert_eq!(pattern.verify(BASE + p * HP, &read_huge(&ram, BASE + p * HP).unwrap()), Ok(()));
    }
    let guard = pin.get(Instant::now() + Duration::from_secs(10)).unwrap();
    assert_eq!(guard.len() as u64, HP);
    drop(guard);
    assert_eq!(common::read_word(&ram, BASE + HP + 8), 0, "the pin pinned zeros");
    // The image is untouched: a second guest sees it whole.
    let (ram2, _engine2) = on_image(&image, 4);
    assert_eq!(pattern.verify(BASE + HP, &read_huge(&ram2, BASE + HP).unwrap()), Ok(()));
    assert!(engine.errors().try_iter().next().is_none());
}

/// Pool: 2 pages per kind.
#[test]
fn unplug_of_huge_pages_under_the_poison_policy_poisons_whole_pages_until_replugged() {
    let Some(_pool) = reserve(2) else { return };
    let pattern = Pattern { seed: 32 };
    for kind in [MemoryKind::PrivateHugetlb, MemoryKind::SharedHugetlb] {
        let ram = huge_ram(kind, 2);
        let config = apf::Config { unplug_policy: apf::UnplugPolicy::Poison, ..apf::Config::default() };
        let engine = Engine::builder(ram.clone(), Arc::new(pattern)).config(config).start().unwrap();
        assert_eq!(engine.prefetch(GuestRange::new(GuestAddress(BASE), 2 * HP)).unwrap(), 2);
        let range = GuestRange::new(GuestAddress(BASE + HP), HP);
        let report = engine.offline(range, Mode::Unplug, Instant::now() + Duration::from_secs(10)).unwrap();
        assert_eq!(report.pages_unplugged, 1, "{kind:?}: {report:?}");
        // Anywhere in the huge page: SIGBUS (here an error), not zeros.
        for off in [0, HP / 2 + 8, HP - 8] {
            assert_eq!(try_read_word(&ram, BASE + HP + off), None, "{kind:?} at {off:#x}");
        }
        engine.replug(range).unwrap();
        let page = within(Duration::from_secs(10), {
            let ram = ram.clone();
            move || read_huge(&ram, BASE + HP)
        });
        assert!(page.unwrap().iter().all(|&b| b == 0), "{kind:?}");
        assert_eq!(pattern.verify(BASE, &read_huge(&ram, BASE).unwrap()), Ok(()), "{kind:?}");
    }
}

/// Pool: 4 pages of guest RAM and 2 of slack (a migrate puts each huge
/// page back into a page the pool hands out), per kind.
#[test]
fn migrate_and_evict_of_huge_pages_lose_no_write_of_a_writer_hammering_the_range() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const N: u64 = 4;
    // (An image: N pages of it, N of private copies.)
    let Some(_pool) = reserve(2 * N + 2) else { return };
    for kind in [MemoryKind::PrivateHugetlb, MemoryKind::SharedHugetlb, MemoryKind::HugetlbImage] {
        let pattern = Pattern { seed: 33 };
        let image = (kind == MemoryKind::HugetlbImage).then(|| huge_image("hammered", pattern, N * HP, &[]));
        let (ram, engine) = match &image {
            Some(image) => on_image(image, N),
            None => {
                let ram = huge_ram(kind, N);
                let engine = Engine::builder(ram.clone(), Arc::new(pattern)).start().unwrap();
                (ram, engine)
            }
        };
        let range = GuestRange::new(GuestAddress(BASE), N * HP);
        assert_eq!(engine.prefetch(range).unwrap(), N);
        let mut expected = vec![0u8; (N * HP) as usize];
        pattern.write(BASE, &mut expected);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (ram, stop) = (ram.clone(), stop.clone());
            std::thread::spawn(move || {
                // A fresh value into the next word of each huge page, page
                // after page, again and again.
                let mut written: Vec<(u64, u64)> = Vec::new();
                let mut v = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    for p in 0..N {
                        let gpa = BASE + p * HP + (v * 4104) % HP / 8 * 8;
                        common::write_word(&ram, gpa, v);
                        written.push((gpa, v));
                        v += 1;
                    }
                }
                written
            })
        };
        let what = format!("{kind:?}");
        let common::Hammered { rounds, took, writes, before } = common::offline_beside_writer(
            &engine,
            range,
            Some(N as usize),
            20,
            &stop,
            writer,
            BASE,
            &mut expected,
            &what,
        );
        let stats = engine.stats();
        eprintln!(
            "{kind:?}: {rounds} offlines of {N} huge pages in {took:?} next to {writes} writes: {} write-protect faults, {} frames moved, {} pages evicted",
            stats.write_protect_faults - before.write_protect_faults,
            stats.frames_moved - before.frames_moved,
            stats.pages_evicted - before.pages_evicted
        );
        assert!(stats.write_protect_faults > before.write_protect_faults, "{kind:?}: no write was ever held");
        assert!(stats.frames_moved >= before.frames_moved + N, "{kind:?}: {stats:?}");
        assert!(stats.pages_evicted >= before.pages_evicted + N, "{kind:?}: {stats:?}");
        // Every byte (evicted pages come back from the store).
        let mut mapped = vec![0u8; (N * HP) as usize];
        try_read(&ram, BASE, &mut mapped).unwrap();
        let diff = mapped.iter().zip(&expected).position(|(a, b)| a != b);
        assert_eq!(diff, None, "{kind:?}: a write was lost (offset shown)");
        assert!(engine.errors().try_iter().next().is_none(), "{kind:?}");
    }
}

/// Pool: 2 pages of guest RAM and 1 of slack, per kind.
#[test]
fn failed_write_protection_punch_or_copy_back_of_huge_pages_keeps_every_page_readable_and_right() {
    let Some(_pool) = reserve(3) else { return };
    let pattern = Pattern { seed: 34 };
    for kind in [MemoryKind::PrivateHugetlb, MemoryKind::SharedHugetlb] {
        let ram = huge_ram(kind, 2);
        let engine = Engine::builder(ram.clone(), Arc::new(pattern)).start().unwrap();
        let range = GuestRange::new(GuestAddress(BASE), 2 * HP);
        assert_eq!(engine.prefetch(range).unwrap(), 2);
        let deadline = || Instant::now() + Duration::from_secs(10);
        let right = |what: &str| {
            for p in 0..2 {
                let page = within(Duration::from_secs(10), {
                    let ram = ram.clone();
                    move || read_huge(&ram, BASE + p * HP)
                });
                assert_eq!(pattern.verify(BASE + p * HP, &page.unwrap()), Ok(()), "{kind:?} {what}: page {p}");
            }
        };
        for mode in [Mode::Migrate, Mode::Evict] {
            // Protection refused: nothing taken.
            engine.failpoints().arm(Rule::new(Op::WriteProtect, libc::EIO));
            match engine.offline(range, mode, deadline()) {
                Err(OfflineError::Ioctl { error, .. }) if error.errno == libc::EIO => {}
                other => panic!("{kind:?} {mode}: {other:?}"),
            }
            right("after a refused protection");
            // The punch (or drop) of the second page fails: the first is
            // done, the second as it was.
            engine.failpoints().arm(Rule::new(Op::Punch, libc::EIO).skip(1));
            match engine.offline(range, mode, deadline()) {
                Err(OfflineError::Punch { source, .. }) if source.raw_os_error() == Some(libc::EIO) => {}
                other => panic!("{kind:?} {mode}: {other:?}"),
            }
            right("after a failed punch");
        }
        // The copy back fails: the page's contents wait in the store.
        engine.failpoints().arm(
            Rule::new(Op::Copy, libc::EIO)
                .times(u64::MAX)
                .within(ram.regions()[0].page_host(0), ram.regions()[0].page_host(0) + HP),
        );
        match engine.offline(range, Mode::Migrate, deadline()) {
            Err(OfflineError::Ioctl { error, .. }) if error.errno == libc::EIO => {}
            other => panic!("{kind:?}: {other:?}"),
        }
        engine.failpoints().clear();
        assert_eq!(ram.regions()[0].state(0), (apf::PageState::Missing, apf::Origin::Store), "{kind:?}");
        right("after a failed copy back");
        // A copy back answered `ENOMEM` (a pool with no page for it): said
        // so, and the contents wait in the store too.
        engine.failpoints().arm(
            Rule::new(Op::Copy, libc::ENOMEM).within(ram.regions()[0].page_host(1), ram.regions()[0].page_host(1) + HP),
        );
        match engine.offline(range, Mode::Migrate, deadline()) {
            Err(OfflineError::NoMemory { range }) => assert_eq!(range.start.0, BASE + HP, "{kind:?}"),
            other => panic!("{kind:?}: {other:?}"),
        }
        assert_eq!(ram.regions()[0].state(1), (apf::PageState::Missing, apf::Origin::Store), "{kind:?}");
        right("after a copy back with no memory");
        // The punch fails and so does clearing the protection: the page
        // stays, protected, and a writer's fault on it clears the
        // protection (of the whole huge page), never left waiting.
        engine.failpoints().arm(Rule::new(Op::Punch, libc::EIO));
        engine.failpoints().arm(Rule::new(Op::WriteProtect, libc::EIO).skip(1));
        match engine.offline(GuestRange::new(GuestAddress(BASE), HP), Mode::Migrate, deadline()) {
            Err(OfflineError::Punch { .. }) => {}
            other => panic!("{kind:?}: {other:?}"),
        }
        assert_eq!(engine.failpoints().pending(), 0, "{kind:?}: both failures fired");
        engine.failpoints().clear();
        within(Duration::from_secs(10), {
            let ram = ram.clone();
            move || common::write_word(&ram, BASE + HP / 2, 99)
        });
        assert_eq!(common::read_word(&ram, BASE + HP / 2), 99);
        let mut page = read_huge(&ram, BASE).unwrap();
        page[(HP / 2) as usize..(HP / 2) as usize + 8]
            .copy_from_slice(&pattern.word_at(BASE + HP / 2, 0).to_le_bytes());
        assert_eq!(pattern.verify(BASE, &page), Ok(()), "{kind:?}");
        let _ = engine.errors().try_iter().count();
    }
}

/// Pool: 2 pages of guest RAM (mapped `MAP_NORESERVE`), then every free
/// page of the pool taken by another mapping while a migrate has page 0
/// dropped, before its copy back.
#[test]
fn a_pool_that_runs_dry_during_the_copy_back_of_a_migrate_loses_nothing() {
    let Some(_pool) = reserve(2) else { return };
    let Some(_) = common::free_to_run_dry() else { return };
    let pattern = Pattern { seed: 35 };
    // Without a refill callback, and with one that gives the pool its
    // pages back.
    for (kind, refill) in [
        (MemoryKind::PrivateHugetlb, false),
        (MemoryKind::SharedHugetlb, false),
        (MemoryKind::PrivateHugetlb, true),
        (MemoryKind::SharedHugetlb, true),
    ] {
        let ranges = [(GuestAddress(BASE), (2 * HP) as usize)];
        let ram = Arc::new(match kind {
            MemoryKind::PrivateHugetlb => GuestRam::anonymous_hugetlb(&ranges, true).unwrap(),
            _ => GuestRam::shared_hugetlb(&ranges).unwrap(),
        });
        let hog_slot: Arc<Mutex<Option<Hog>>> = Arc::default();
        let mut builder = Engine::builder(ram.clone(), Arc::new(pattern));
        if refill {
            let slot = hog_slot.clone();
            builder = builder.on_no_memory(move || slot.lock().unwrap().take().is_some());
        }
        let engine = Arc::new(builder.start().unwrap());
        let range = GuestRange::new(GuestAddress(BASE), 2 * HP);
        assert_eq!(engine.prefetch(range).unwrap(), 2);
        common::write_word(&ram, BASE + 8, 42);
        // The copy back of page 0 waits at the gate.
        let page0 = ram.regions()[0].page_host(0);
        engine.failpoints().arm(Rule::pause(Op::Copy).within(page0, page0 + HP));
        let offline = {
            let engine = engine.clone();
            std::thread::spawn(move || engine.offline(range, Mode::Migrate, Instant::now() + Duration::from_secs(10)))
        };
        assert!(engine.failpoints().wait_paused(Duration::from_secs(10)), "{kind:?}: the copy back never came");
        // Every free huge page (the one just dropped too) goes elsewhere.
        let hog = Hog::take_all();
        assert_eq!(hugepages_free_unreserved(), 0, "{kind:?}: the pool is dry");
        *hog_slot.lock().unwrap() = Some(hog);
        engine.failpoints().open_gate();
        let result = offline.join().unwrap();
        if refill {
            // The callback freed the pages: the copy back went through.
            assert!(result.is_ok(), "{kind:?}: {result:?}");
            assert_eq!(ram.regions()[0].state(0).0, apf::PageState::Present, "{kind:?}");
            assert_eq!(engine.stats().pool_refills, 1, "{kind:?}");
        } else {
            match &result {
                Err(OfflineError::NoMemory { range }) => assert_eq!(range.start.0, BASE, "{kind:?}"),
                other => panic!("{kind:?}: {other:?}"),
            }
            assert_eq!(ram.regions()[0].state(0), (apf::PageState::Missing, apf::Origin::Store), "{kind:?}");
            assert_eq!(engine.stats().pool_refills, 0, "{kind:?}");
        }
        drop(hog_slot.lock().unwrap().take());
        // With pages free again, the next fault brings the contents back.
        let page = within(Duration::from_secs(10), {
            let ram = ram.clone();
            move || read_huge(&ram, BASE)
        });
        let mut page = page.unwrap();
        assert_eq!(u64::from_le_bytes(page[8..16].try_into().unwrap()), 42, "{kind:?}: the write is kept");
        page[8..16].copy_from_slice(&pattern.word_at(BASE, 1).to_le_bytes());
        assert_eq!(pattern.verify(BASE, &page), Ok(()), "{kind:?}");
        assert_eq!(pattern.verify(BASE + HP, &read_huge(&ram, BASE + HP).unwrap()), Ok(()), "{kind:?}");
    }
}

/// Every free huge page of the pool, held by a private mapping until
/// dropped.
struct Hog {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Hog {
    fn take_all() -> Hog {
        let len = (hugepages_free().max(1) * HP) as usize;
        // SAFETY: a fresh private mapping; nothing else refers to it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        // Populates what the pool has; the rest fails with ENOMEM
        // (without SIGBUS), which is the point.
        // SAFETY: the mapping above.
        unsafe { libc::madvise(ptr, len, libc::MADV_POPULATE_WRITE) };
        Hog { ptr, len }
    }
}

// SAFETY: the mapping is referenced through no Rust reference; the only
// thing done with it from another thread is unmapping it, once, on drop.
unsafe impl Send for Hog {}

impl Drop for Hog {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `take_all`, unmapped once.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// `HugePages_Free` once it has stayed the same for a few reads (pages
/// an earlier engine's mapping gave back may still be on their way).
fn settled_hugepages_free() -> u64 {
    let mut last = hugepages_free();
    let mut same = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    while same < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        let now = hugepages_free();
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

/// The huge pages guest RAM holds: mapped here for private memory
/// (`Private_Hugetlb` of its mapping in `/proc/self/smaps`), allocated to
/// the memfd for shared memory (its blocks, through
/// `/proc/self/map_files`), whether mapped or not.
fn huge_pages_held(ram: &GuestRam) -> u64 {
    let r = &ram.regions()[0];
    let (start, end) = (r.host_base(), r.host_base() + r.len());
    if ram.kind() == MemoryKind::SharedHugetlb {
        let file = std::fs::File::open(format!("/proc/self/map_files/{start:x}-{end:x}")).unwrap();
        let blocks = std::os::unix::fs::MetadataExt::blocks(&file.metadata().unwrap());
        return blocks * 512 / HP;
    }
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let header = format!("{start:x}-{end:x} ");
    // The first such line after the mapping's header is its own.
    let mut vma = smaps.lines().skip_while(|l| !l.starts_with(&header));
    let line = vma.find(|l| l.starts_with("Private_Hugetlb:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024 / HP
}

fn hugepages_free_unreserved() -> u64 {
    hugepages_free() - meminfo("HugePages_Rsvd:")
}

/// Pool: 4 pages (the prefetched window), then 1 more after a failure.
#[test]
fn a_copy_of_huge_pages_that_stops_part_way_or_fails_is_resumed_or_reported() {
    let Some(_pool) = reserve(4) else { return };
    let pattern = Pattern { seed: 12 };
    let ram = huge_ram(MemoryKind::PrivateHugetlb, 4);
    let engine = Engine::builder(ram.clone(), Arc::new(pattern)).start().unwrap();
    // One window of 4 huge pages; the copy stops after its first, as the
    // kernel does when it meets a changing mapping: the rest is installed
    // from where it stopped, in whole huge pages.
    engine.failpoints().arm(Rule::new(Op::Copy, libc::EAGAIN).partial(1));
    assert_eq!(engine.prefetch(GuestRange::new(GuestAddress(BASE), 2 * HP)).unwrap(), 2);
    assert_eq!(engine.failpoints().fired(), 1);
    assert!(engine.errors().try_iter().next().is_none());
    // A copy that fails outright: reported, the page given back, and the
    // next access gets it.
    engine.failpoints().arm(Rule::new(Op::Copy, libc::EIO));
    assert!(engine.prefetch(GuestRange::new(GuestAddress(BASE + 2 * HP), HP)).is_ok());
    let reported: Vec<_> = engine.errors().try_iter().collect();
    assert!(
        reported.iter().any(|e| matches!(e, FaultError::Install { error, .. } if error.errno == libc::EIO)),
        "{reported:?}"
    );
    assert_eq!(ram.regions()[0].state(2).0, apf::PageState::Missing);
    // No memory for one page: its faulting thread is answered with poison
    // (SIGBUS, here EFAULT) after a few tries, reported, never left waiting.
    engine.failpoints().arm(
        Rule::new(Op::Copy, libc::ENOMEM)
            .times(u64::MAX)
            .within(ram.regions()[0].page_host(3), ram.regions()[0].page_host(3) + HP),
    );
    let lost = within(Duration::from_secs(10), {
        let ram = ram.clone();
        move || try_read_word(&ram, BASE + 3 * HP)
    });
    assert_eq!(lost, None);
    let reported: Vec<_> = engine.errors().try_iter().collect();
    assert!(
        reported
            .iter()
            .any(|e| matches!(e, FaultError::NoMemory { poisoned: true, gpa, .. } if gpa.0 == BASE + 3 * HP)),
        "{reported:?}"
    );
    assert!(engine.stats().no_memory >= 1);
    engine.failpoints().clear();
    for p in 0..3 {
        assert_eq!(pattern.verify(BASE + p * HP, &read_huge(&ram, BASE + p * HP).unwrap()), Ok(()), "page {p}");
    }
    assert_eq!(ram.regions()[0].state(3).0, apf::PageState::Poisoned);
}

/// Pool: 2 pages reserved, fewer than the guest RAM mapped `MAP_NORESERVE`
/// (the free pages of the pool plus 3).
#[test]
fn a_noreserve_pool_that_runs_dry_is_reported_and_no_thread_hangs() {
    let Some(_pool) = reserve(2) else { return };
    let Some(free) = common::free_to_run_dry() else { return };
    let pages = free + 3;
    let ranges = [(GuestAddress(BASE), (pages * HP) as usize)];
    let ram = Arc::new(GuestRam::anonymous_hugetlb(&ranges, true).unwrap());
    assert_eq!(ram.kind(), MemoryKind::PrivateHugetlb);
    let pattern = Pattern { seed: 4 };
    let config = apf::Config { fill_retries: 1, ..apf::Config::default() };
    let engine = Engine::builder(ram.clone(), Arc::new(pattern)).config(config).start().unwrap();
    let words = within(Duration::from_secs(20), {
        let ram = ram.clone();
        move || (0..pages).map(|p| try_read_word(&ram, BASE + p * HP + 16)).collect::<Vec<_>>()
    });
    let served = words.iter().filter(|w| w.is_some()).count() as u64;
    assert!(served <= free, "{served} pages served from {free} free");
    for (p, w) in words.iter().enumerate() {
        if let Some(w) = w {
            assert_eq!(*w, pattern.word_at(BASE + p as u64 * HP, 2), "page {p}");
        }
    }
    let reported: Vec<_> = engine.errors().try_iter().collect();
    let no_memory =
        // (The kernel answers the COPY with EEXIST, nothing mapped.)
        reported.iter().filter(|e| matches!(e, FaultError::NoMemory { poisoned: true, .. }));
    assert_eq!(no_memory.count() as u64, pages - served, "{reported:?}");
    assert!(engine.stats().no_memory >= pages - served);
}

/// Pool: 2 pages, then one more for each fault that finds it dry, which
/// the refill callback reserves.
#[test]
fn a_dry_pool_the_embedder_refills_serves_every_fault() {
    let Some(_pool) = reserve(2) else { return };
    let Some(free) = common::free_to_run_dry() else { return };
    let pages = free + 3;
    let ranges = [(GuestAddress(BASE), (pages * HP) as usize)];
    let ram = Arc::new(GuestRam::anonymous_hugetlb(&ranges, true).unwrap());
    let pattern = Pattern { seed: 6 };
    let added = Arc::new(Mutex::new(Vec::new()));
    let refill = {
        let added = added.clone();
        move || match HugePool::reserve(1, Instant::now() + Duration::from_secs(5)) {
            Ok(r) => {
                added.lock().unwrap().push(r);
                true
            }
            Err(_) => false,
        }
    };
    let engine = Engine::builder(ram.clone(), Arc::new(pattern)).on_no_memory(refill).start().unwrap();
    let words = within(Duration::from_secs(20), {
        let ram = ram.clone();
        move || (0..pages).map(|p| try_read_word(&ram, BASE + p * HP + 16)).collect::<Vec<_>>()
    });
    for (p, w) in words.iter().enumerate() {
        assert_eq!(*w, Some(pattern.word_at(BASE + p as u64 * HP, 2)), "page {p}");
    }
    let reported: Vec<_> = engine.errors().try_iter().collect();
    assert!(reported.is_empty(), "{reported:?}");
    let stats = engine.stats();
    assert!(stats.pool_refills >= 3 && stats.no_memory >= 3, "{stats:?}");
    assert_eq!(added.lock().unwrap().len() as u64, stats.pool_refills);
    drop(engine);
    drop(ram);
}

/// Pool: 8 pages of guest RAM and 8 of slack (an in-use huge page moves
/// only into a free one; free pages in the block are dissolved, which
/// fails while they are reserved).
#[test]
fn a_host_block_offline_over_huge_pages_ends_by_its_deadline_and_loses_nothing() {
    let Some(_pool) = reserve(16) else { return };
    let pattern = Pattern { seed: 21 };
    let ram = huge_ram(MemoryKind::PrivateHugetlb, 8);
    let engine = Arc::new(Engine::builder(ram.clone(), Arc::new(pattern)).start().unwrap());
    let range = GuestRange::new(GuestAddress(BASE), 8 * HP);
    assert_eq!(engine.prefetch(range).unwrap(), 8);
    let search = within(Duration::from_secs(120), {
        let engine = engine.clone();
        move || engine.offline_any_host_block(range, Duration::from_secs(2))
    });
    // Which outcome depends on the machine (and most blocks holding huge
    // pages refuse); what may not happen is a hang or a lost page.
    eprintln!("host-block offline over huge pages: {}", search.as_ref().map(|s| s.to_string()).unwrap_or_default());
    match search {
        Ok(apf::HostBlockSearch::Offlined { report, .. }) => assert!(report.block_pages >= 1, "{report:?}"),
        Ok(apf::HostBlockSearch::NoneQualified { candidates, .. }) => assert!(candidates >= 1),
        Err(e) => assert!(e.is_busy(), "{e}"),
    }
    for p in 0..8 {
        assert_eq!(pattern.verify(BASE + p * HP, &read_huge(&ram, BASE + p * HP).unwrap()), Ok(()), "page {p}");
    }
    assert_eq!(engine.stats().faults, 0, "the pages stayed present");
}
