//! Memory kinds on real memory: an image mapped private (reads mapped in
//! place with `UFFDIO_CONTINUE`, writes given private copies, clones
//! sharing one image), shared memfd memory (the page cache is the truth
//! after a discard), and what each kind refuses.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apf::failpoints::{Op, Rule};
use apf::{
    Config, Engine, EngineError, GuestAddress, GuestRam, GuestRange, Image, MemoryKind, Mode, OfflineError, Pattern,
    RamError, ZeroSource, PAGE_SIZE,
};
use common::{discard, read_word, write_word};

const P: u64 = PAGE_SIZE as u64;
const BASE: u64 = 0x10_0000;
const PAGES: usize = 64;

/// A snapshot file of `PAGES` pages of `Pattern { seed }`, except the
/// pages in `zero`, which are zeros (holes once loaded).
fn snapshot(name: &str, seed: u64, zero: &[usize]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("apf-kinds-{name}-{}", std::process::id()));
    let mut bytes = vec![0u8; PAGES * PAGE_SIZE];
    Pattern { seed }.write(BASE, &mut bytes);
    for &z in zero {
        bytes[z * PAGE_SIZE..(z + 1) * PAGE_SIZE].fill(0);
    }
    std::fs::write(&path, &bytes).unwrap();
    path
}

/// [`snapshot`] loaded as an image (the file removed again).
fn loaded_image(name: &str, seed: u64, zero: &[usize]) -> Arc<Image> {
    let path = snapshot(name, seed, zero);
    let image = Image::load(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    image
}

fn image_ram(image: &Arc<Image>) -> Arc<GuestRam> {
    Arc::new(GuestRam::image(&[(GuestAddress(BASE), PAGES * PAGE_SIZE)], image.clone()).unwrap())
}

/// An engine over image RAM whose reads map blocks of 8 pages (not the
/// default 512, which would map these small RAMs whole at the first read).
fn image_engine(ram: &Arc<GuestRam>) -> Engine {
    let config = Config { image_window: 8, ..Config::default() };
    Engine::builder(ram.clone(), ram.image_source().unwrap()).config(config).start().unwrap()
}

fn madvise(ram: &GuestRam, gpa: u64, len: u64, advice: i32) {
    let host = ram.host_range(GuestAddress(gpa), len).unwrap();
    // SAFETY: guest RAM the engine serves, reached through no Rust
    // reference; dropping or punching it is what a balloon does.
    assert_eq!(unsafe { libc::madvise(host.cast(), len as usize, advice) }, 0, "{}", std::io::Error::last_os_error());
}

#[test]
fn image_reads_map_the_image_and_writes_get_private_copies_clones_do_not_see() {
    let image = loaded_image("clones", 7, &[5]);
    let pattern = Pattern { seed: 7 };
    let (a, b) = (image_ram(&image), image_ram(&image));
    assert_eq!(a.kind(), MemoryKind::Image);
    let (ea, eb) = (image_engine(&a), image_engine(&b));

    // Reads: every word is the image's, mapped in place (no copy).
    for p in 0..PAGES as u64 {
        let gpa = BASE + p * P;
        let want = if p == 5 { 0 } else { pattern.word_at(gpa, 3) };
        assert_eq!(read_word(&a, gpa + 24), want, "page {p}");
    }
    assert!(ea.wait_idle(Instant::now() + Duration::from_secs(5)));
    let sa = ea.stats();
    assert!(sa.continued >= PAGES as u64 - 1, "{sa:?}");
    assert!(sa.faults <= (PAGES / 8) as u64 + 2, "reads map aligned blocks of 8 pages: {sa:?}");
    assert!(sa.zero_pages >= 1, "the hole is zeros: {sa:?}");

    // A write after a read: the kernel's copy-on-write, no fault to the
    // engine; the image and the clone keep the old contents.
    write_word(&a, BASE + 24, 0xdead);
    assert_eq!(read_word(&a, BASE + 24), 0xdead);
    assert_eq!(read_word(&b, BASE + 24), pattern.word_at(BASE, 3));
    let mut word = [0u8; 8];
    std::fs::File::open(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&image.fd())))
        .unwrap()
        .read_exact_at(&mut word, 24)
        .unwrap();
    assert_eq!(u64::from_le_bytes(word), pattern.word_at(BASE, 3), "the image is never written");

    // A first write: one private copy (`COPY`), not a mapping of the image.
    assert!(eb.wait_idle(Instant::now() + Duration::from_secs(5)));
    let before = eb.stats();
    write_word(&b, BASE + 40 * P + 8, 0xbeef);
    // Counters move after the wake: read them once the engine is idle.
    assert!(eb.wait_idle(Instant::now() + Duration::from_secs(5)));
    let after = eb.stats();
    assert_eq!(after.continued, before.continued, "a write fault is not answered with CONTINUE");
    assert!(after.pages_installed > before.pages_installed);
    assert_eq!(read_word(&b, BASE + 40 * P + 8), 0xbeef);
    assert_eq!(
        read_word(&b, BASE + 40 * P + 16),
        pattern.word_at(BASE + 40 * P, 2),
        "the rest of the page is the image's"
    );
    assert_eq!(read_word(&a, BASE + 40 * P + 8), pattern.word_at(BASE + 40 * P, 1));
    assert!(ea.errors().is_empty() && eb.errors().is_empty());
}

/// A file already on tmpfs is used in place: nothing is loaded, so
/// nothing is known of its holes from loading, and the engine asks the
/// kernel (`mincore`) which pages hold data: the hole reads zeros, the
/// rest the file's bytes, a discarded page zeros.
#[test]
fn an_image_file_on_tmpfs_is_used_in_place_and_its_holes_are_asked_of_the_kernel() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        common::skip_outside_ci("no /dev/shm");
        return;
    }
    let loaded = snapshot("tmpfs", 13, &[6, 7]);
    let path = shm.join(loaded.file_name().unwrap());
    std::fs::copy(&loaded, &path).unwrap();
    std::fs::remove_file(&loaded).unwrap();
    // Holes where the snapshot has zeros, as a loaded image has them.
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    // SAFETY: fallocate punches a hole in the file just written; it reads
    // nothing from this process's memory.
    let punched = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            6 * P as i64,
            2 * P as i64,
        )
    };
    assert_eq!(punched, 0, "{}", std::io::Error::last_os_error());
    let image = Image::load(&path).unwrap();
    assert!(image.load_time().is_none(), "a tmpfs file is used in place");
    let ram = image_ram(&image);
    let engine = image_engine(&ram);
    let pattern = Pattern { seed: 13 };
    for p in 0..PAGES as u64 {
        let want = if p == 6 || p == 7 { 0 } else { pattern.word_at(BASE + p * P, 2) };
        assert_eq!(read_word(&ram, BASE + p * P + 16), want, "page {p}");
    }
    assert!(engine.wait_idle(Instant::now() + Duration::from_secs(5)));
    let stats = engine.stats();
    assert_eq!((stats.continued, stats.zero_pages), (PAGES as u64 - 2, 2), "{stats:?}");
    discard(&ram, BASE + 9 * P, P);
    assert_eq!(read_word(&ram, BASE + 9 * P + 16), 0, "a discarded page shows the file");
    assert!(engine.errors().is_empty());
    drop(engine);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_discarded_image_page_reads_zeros_not_the_image() {
    let image = loaded_image("discard", 9, &[]);
    let ram = image_ram(&image);
    let engine = image_engine(&ram);
    let pattern = Pattern { seed: 9 };
    // A page read (mapped from the image), one written (a private copy).
    assert_eq!(read_word(&ram, BASE + 2 * P), pattern.word_at(BASE + 2 * P, 0));
    write_word(&ram, BASE + 3 * P, 1);
    // The balloon takes both: the kernel would show the image again; the
    // engine gives zeros, for reads and for writes.
    discard(&ram, BASE + 2 * P, 2 * P);
    assert_eq!(read_word(&ram, BASE + 2 * P), 0);
    assert_eq!(read_word(&ram, BASE + 2 * P + 4000), 0);
    write_word(&ram, BASE + 3 * P + 8, 5);
    assert_eq!(read_word(&ram, BASE + 3 * P), 0);
    assert_eq!(read_word(&ram, BASE + 3 * P + 8), 5);
    // Pages no discard touched still read the image.
    assert_eq!(read_word(&ram, BASE + 4 * P), pattern.word_at(BASE + 4 * P, 0));
    assert!(engine.errors().is_empty());
}

#[test]
fn every_mode_is_offered_on_every_kind_and_both_kinds_serve_the_rest() {
    let image = loaded_image("refuse", 3, &[]);
    let image_ram = image_ram(&image);
    let shared = Arc::new(GuestRam::shared_memfd(&[(GuestAddress(BASE), PAGES * PAGE_SIZE)]).unwrap());
    let engines = [image_engine(&image_ram), Engine::builder(shared.clone(), Arc::new(ZeroSource)).start().unwrap()];
    let range = GuestRange::new(GuestAddress(BASE), 8 * P);
    let kinds = [
        MemoryKind::PrivateAnonymous,
        MemoryKind::SharedMemfd,
        MemoryKind::Image,
        MemoryKind::PrivateHugetlb,
        MemoryKind::SharedHugetlb,
    ];
    for kind in kinds {
        for mode in [Mode::Migrate, Mode::Evict, Mode::Unplug, Mode::HostBlock(0)] {
            assert!(mode.offered_on(kind), "{mode} on {kind:?}");
        }
    }
    // Without the engine's own write-protecting descriptor (the limited
    // backend, Firecracker's), nothing without MOVE is offered: that
    // backend serves private anonymous memory only, where MOVE is the way.
    let limited = Config { backend: apf::Backend::Limited, ..Config::default() };
    let anon = Arc::new(GuestRam::anonymous(&[(GuestAddress(BASE), PAGES * PAGE_SIZE)]).unwrap());
    let limited = Engine::builder(anon, Arc::new(ZeroSource)).config(limited).start().unwrap();
    match limited.offline(range, Mode::Migrate, Instant::now() + Duration::from_secs(1)) {
        Err(e @ OfflineError::NotOffered { .. }) => assert!(e.to_string().contains("UFFDIO_MOVE"), "{e}"),
        other => panic!("{other:?}"),
    }
    for engine in &engines {
        // Prefetch, pins and references work.
        assert_eq!(engine.prefetch(range).unwrap(), 8);
        let pin = engine.pin(range, |_| {}).unwrap();
        let guard = pin.get(Instant::now() + Duration::from_secs(2)).unwrap();
        drop(guard);
        drop(pin);
        let r = engine.page_ref(range, Instant::now() + Duration::from_secs(2)).unwrap();
        drop(r);
        // Pins are called back by the offlines these kinds do.
        let called = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = called.clone();
        let _pin = engine.pin(range, move |_| {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        let report = engine.offline(range, Mode::Unplug, Instant::now() + Duration::from_secs(5)).unwrap();
        // (On an image the unplug's own `MADV_DONTNEED` raises a remove,
        // which calls the pin back once more.)
        assert_eq!(report.pins_called, 1, "{report:?}");
        assert!(called.load(std::sync::atomic::Ordering::SeqCst) >= 1);
        assert!(engine.errors().is_empty());
    }
    // The image is served from itself, and only by a backend that can.
    let other = Engine::builder(image_ram.clone(), Arc::new(ZeroSource)).start();
    assert!(matches!(other, Err(EngineError::Config(_))), "{other:?}");
    let limited = Config { backend: apf::Backend::Limited, ..Config::default() };
    let other = Engine::builder(shared.clone(), Arc::new(ZeroSource)).config(limited).start();
    assert!(matches!(other, Err(EngineError::Config(_))), "{other:?}");
    // An image shorter than the RAM mapping it is refused.
    let short = GuestRam::image(&[(GuestAddress(0), 2 * PAGES * PAGE_SIZE)], image);
    assert!(matches!(short, Err(RamError::ImageTooShort { .. })), "{short:?}");
}

#[test]
fn shared_memory_keeps_what_dontneed_keeps_and_zeros_what_a_hole_drops() {
    let ram = Arc::new(GuestRam::shared_memfd(&[(GuestAddress(BASE), PAGES * PAGE_SIZE)]).unwrap());
    let engine = Engine::builder(ram.clone(), Arc::new(ZeroSource)).start().unwrap();
    for p in 0..8 {
        write_word(&ram, BASE + p * P, 100 + p);
    }
    // MADV_DONTNEED on shared memory: a remove event, but the page cache
    // keeps the contents and the next access maps them again.
    discard(&ram, BASE, P);
    assert_eq!(read_word(&ram, BASE), 100);
    // The engine asks the page cache rather than installing zeros over it.
    // (`madvise` returns once the event is read; the engine applies it
    // just after.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while ram.regions()[0].state(0).0 != apf::PageState::Missing {
        assert!(Instant::now() < deadline, "the remove was never applied");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(engine.wait_idle(Instant::now() + Duration::from_secs(5)));
    let before = engine.stats();
    assert_eq!(engine.prefetch(GuestRange::new(GuestAddress(BASE), P)).unwrap(), 0);
    assert!(engine.wait_idle(Instant::now() + Duration::from_secs(5)));
    assert_eq!(engine.stats().cached, before.cached + 1);
    assert_eq!(read_word(&ram, BASE), 100);
    // MADV_REMOVE (the balloon's on shared memory): a hole, zeros.
    madvise(&ram, BASE + P, P, libc::MADV_REMOVE);
    assert_eq!(read_word(&ram, BASE + P), 0);
    // A hole punched behind the engine's back (no event at all): the next
    // fault on a page it had installed reads zeros, not poison.
    let fd = ram.shared_fd();
    assert!(matches!(fd, Err(RamError::StillFilling(_))), "{fd:?}");
    engine.prefetch(GuestRange::new(GuestAddress(BASE), PAGES as u64 * P)).unwrap();
    let fd = ram.shared_fd().expect("every page filled: the memory may be shared");
    let file = std::fs::File::from(fd);
    // SAFETY: fallocate on our own memfd; it changes contents only.
    let punched = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            2 * P as i64,
            P as i64,
        )
    };
    assert_eq!(punched, 0);
    assert_eq!(read_word(&ram, BASE + 2 * P), 0);
    assert_eq!(read_word(&ram, BASE + 3 * P), 103, "the page next to the hole is kept");
    // pread bypasses userfaultfd and sees what the guest wrote.
    let mut word = [0u8; 8];
    file.read_exact_at(&mut word, 4 * P).unwrap();
    assert_eq!(u64::from_le_bytes(word), 104);
    assert!(engine.errors().is_empty(), "{:?}", engine.errors().try_recv());
    // Image and anonymous RAM have no descriptor to share.
    assert!(matches!(
        GuestRam::anonymous(&[(GuestAddress(0), PAGE_SIZE)]).unwrap().shared_fd(),
        Err(RamError::NotShareable(MemoryKind::PrivateAnonymous))
    ));
}

#[test]
fn a_failing_continue_is_reported_and_the_page_still_served() {
    let image = loaded_image("continue", 11, &[]);
    let ram = image_ram(&image);
    let engine = image_engine(&ram);
    let pattern = Pattern { seed: 11 };
    // Partial progress: the rest of the window goes in from where it stopped.
    engine.failpoints().arm(Rule::new(Op::Continue, libc::EAGAIN).partial(2));
    assert_eq!(read_word(&ram, BASE + 16 * P), pattern.word_at(BASE + 16 * P, 0));
    // A hard failure: reported, the thread faults again and is served.
    engine.failpoints().arm(Rule::new(Op::Continue, libc::EIO));
    assert_eq!(read_word(&ram, BASE + 40 * P), pattern.word_at(BASE + 40 * P, 0));
    assert!(engine.failpoints().fired() >= 2);
    let reported: Vec<_> = engine.errors().try_iter().collect();
    assert!(
        reported.iter().any(|e| matches!(e, apf::FaultError::Install { error, .. } if error.op == "UFFDIO_CONTINUE" && error.errno == libc::EIO)),
        "{reported:?}"
    );
    for p in 0..PAGES as u64 {
        assert_eq!(read_word(&ram, BASE + p * P + 8), 11, "page {p}");
    }
}

#[test]
fn shared_memory_poisons_a_page_whose_source_fails_and_shutdown_spares_kept_pages() {
    use common::{try_read_word, Fills, ScriptedSource};
    let ram = Arc::new(GuestRam::shared_memfd(&[(GuestAddress(BASE), PAGES * PAGE_SIZE)]).unwrap());
    let bad = BASE + 9 * P;
    let source = Arc::new(ScriptedSource::bytes(7).fail(Fills::Covering(bad)));
    let config = Config { fill_retries: 1, fault_around: 1, ..Config::default() };
    let engine = Engine::builder(ram.clone(), source).config(config).start().unwrap();
    // A source that fails for good: the page is poisoned (an access gets
    // SIGBUS, here EFAULT), reported, never zero-filled.
    assert_eq!(try_read_word(&ram, bad), None);
    let reported: Vec<_> = engine.errors().try_iter().collect();
    assert!(reported.iter().any(|e| matches!(e, apf::FaultError::SourceFailed { poisoned: true, .. })), "{reported:?}");
    assert_eq!(read_word(&ram, BASE), 0x0707_0707_0707_0707);
    // A page whose mapping a discard dropped but whose contents the page
    // cache kept is the guest's: shutdown poisons only true holes.
    write_word(&ram, BASE + 2 * P, 42);
    discard(&ram, BASE + 2 * P, P);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ram.regions()[0].state(2).0 != apf::PageState::Missing {
        assert!(Instant::now() < deadline, "the remove was never applied");
        std::thread::sleep(Duration::from_millis(1));
    }
    let report = engine.shutdown();
    assert!(report.poisoned_pages > 0, "{report:?}");
    assert_eq!(try_read_word(&ram, BASE + 2 * P), Some(42), "a kept page is not poisoned at shutdown");
    assert_eq!(try_read_word(&ram, BASE + 30 * P), None, "a hole is");
}

/// Shared RAM of `pages` pages at `BASE`, every page filled with
/// `Pattern { seed }` through the engine (so every page is in the page
/// cache), and its engine.
fn filled_shared(pages: usize, seed: u64, config: Config) -> (Arc<GuestRam>, Engine) {
    let ram = Arc::new(GuestRam::shared_memfd(&[(GuestAddress(BASE), pages * PAGE_SIZE)]).unwrap());
    let engine = Engine::builder(ram.clone(), Arc::new(ZeroSource)).config(config).start().unwrap();
    let mut bytes = vec![0u8; pages * PAGE_SIZE];
    Pattern { seed }.write(BASE, &mut bytes);
    common::write_bytes(&ram, BASE, &bytes);
    (ram, engine)
}

/// The memfd behind shared RAM's one region, opened through the mapping
/// (`/proc/self/map_files`), so the RAM is not handed out.
fn memfd(ram: &GuestRam) -> std::fs::File {
    let r = &ram.regions()[0];
    let path = format!("/proc/self/map_files/{:x}-{:x}", r.host_base(), r.host_base() + r.len());
    std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every byte of shared RAM, read through the memfd (not the mapping).
fn file_bytes(ram: &GuestRam) -> Vec<u8> {
    let mut bytes = vec![0u8; ram.size() as usize];
    memfd(ram).read_exact_at(&mut bytes, 0).unwrap();
    bytes
}

/// Every byte of guest RAM, read through the mapping (faulting in what
/// is missing).
fn mapped_bytes(ram: &GuestRam) -> Vec<u8> {
    let mut bytes = vec![0u8; ram.size() as usize];
    common::try_read(ram, BASE, &mut bytes).unwrap();
    bytes
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[test]
fn migrate_and_evict_of_shared_memory_lose_no_write_of_a_writer_hammering_the_range() {
    use std::sync::atomic::{AtomicBool, Ordering};
    // Four chunks of the offline's 128 pages.
    const N: usize = 512;
    let (ram, engine) = filled_shared(N, 21, Config::default());
    let mut expected = vec![0u8; N * PAGE_SIZE];
    Pattern { seed: 21 }.write(BASE, &mut expected);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (ram, stop) = (ram.clone(), stop.clone());
        std::thread::spawn(move || {
            // Walks the range again and again, writing a fresh value into
            // the next word of each page; returns what it wrote where.
            let mut written: Vec<(u64, u64)> = Vec::new();
            let mut v = 1u64;
            while !stop.load(Ordering::Relaxed) {
                for p in 0..N as u64 {
                    let gpa = BASE + p * P + (v % 512) * 8;
                    write_word(&ram, gpa, v);
                    written.push((gpa, v));
                    v += 1;
                }
            }
            written
        })
    };
    let range = GuestRange::new(GuestAddress(BASE), (N * PAGE_SIZE) as u64);
    let common::Hammered { rounds, took, writes, before } =
        common::offline_beside_writer(&engine, range, Some(N), 40, &stop, writer, BASE, &mut expected, "shared");
    let stats = engine.stats();
    eprintln!(
        "{rounds} offlines of {N} pages in {took:?} next to {writes} writes: {} write-protect faults, {} frames moved, {} pages evicted",
        stats.write_protect_faults - before.write_protect_faults,
        stats.frames_moved - before.frames_moved,
        stats.pages_evicted - before.pages_evicted
    );
    assert!(stats.write_protect_faults > before.write_protect_faults, "no write was ever held: {stats:?}");
    assert!(stats.frames_moved >= before.frames_moved + N as u64, "{stats:?}");
    assert!(stats.pages_evicted >= before.pages_evicted + N as u64, "{stats:?}");
    // Every byte, through the mapping (evicted pages come back from the
    // store) and then in the page cache.
    let mapped = mapped_bytes(&ram);
    assert_eq!(first_difference(&mapped, &expected), None, "a write was lost (offset shown)");
    assert_eq!(first_difference(&file_bytes(&ram), &expected), None);
    assert!(engine.errors().is_empty(), "{:?}", engine.errors().try_recv());
}

#[test]
fn migrate_of_shared_memory_moves_frames_and_keeps_contents() {
    const N: usize = 64;
    let (ram, engine) = filled_shared(N, 5, Config::default());
    let pfns = |ram: &GuestRam| apf::hostmem::Pagemap::open().unwrap().pfns(ram.regions()[0].host_base(), N).unwrap();
    let old = pfns(&ram);
    assert!(old.iter().all(|p| p.is_some()), "every page mapped after the writes");
    let range = GuestRange::new(GuestAddress(BASE), (N * PAGE_SIZE) as u64);
    let report = engine.offline(range, Mode::Migrate, Instant::now() + Duration::from_secs(10)).unwrap();
    assert_eq!((report.frames_moved, report.pages_taken), (N, N), "{report:?}");
    let new = pfns(&ram);
    let moved = old.iter().zip(&new).filter(|(a, b)| b.is_some() && a != b).count();
    // Fresh frames from the allocator, which may hand a frame the punch
    // just freed straight back (seen for one page in 64).
    assert!(new.iter().all(|p| p.is_some()), "every page mapped again");
    assert!(moved >= N * 3 / 4, "only {moved} of {N} pages in new frames");
    let mut expected = vec![0u8; N * PAGE_SIZE];
    Pattern { seed: 5 }.write(BASE, &mut expected);
    assert_eq!(first_difference(&mapped_bytes(&ram), &expected), None);
    // Evicted pages leave the page cache and come back from the store on
    // their next fault.
    let report = engine.offline(range, Mode::Evict, Instant::now() + Duration::from_secs(10)).unwrap();
    assert_eq!(report.pages_evicted, N);
    assert!(pfns(&ram).iter().all(|p| p.is_none()), "evicted pages are gone from the mapping");
    assert_eq!(first_difference(&mapped_bytes(&ram), &expected), None);
    assert!(engine.errors().is_empty());
}

#[test]
fn unplug_of_shared_memory_punches_the_page_cache_and_reads_zeros() {
    const N: usize = 256;
    let (ram, engine) = filled_shared(N, 8, Config::default());
    // Pages 16..200 (two chunks): holes in the page cache afterwards.
    let range = GuestRange::new(GuestAddress(BASE + 16 * P), 184 * P);
    let report = engine.offline(range, Mode::Unplug, Instant::now() + Duration::from_secs(10)).unwrap();
    assert_eq!((report.pages_unplugged, report.pages_taken), (184, 184), "{report:?}");
    let file = memfd(&ram);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: lseek on our own memfd only moves its offset.
    let data = |from: u64| unsafe { libc::lseek(fd, from as i64, libc::SEEK_DATA) };
    // SAFETY: as above.
    let hole = |from: u64| unsafe { libc::lseek(fd, from as i64, libc::SEEK_HOLE) };
    assert_eq!(hole(0), (16 * P) as i64, "the page cache is punched where the range starts");
    assert_eq!(data(16 * P), (200 * P) as i64, "and holds nothing until its end");
    let mut expected = vec![0u8; N * PAGE_SIZE];
    Pattern { seed: 8 }.write(BASE, &mut expected);
    expected[16 * PAGE_SIZE..200 * PAGE_SIZE].fill(0);
    assert_eq!(first_difference(&mapped_bytes(&ram), &expected), None);
    // The zero policy's pages are writable again.
    write_word(&ram, BASE + 20 * P, 77);
    assert_eq!(read_word(&ram, BASE + 20 * P), 77);
    assert!(engine.errors().is_empty());
}

#[test]
fn unplug_under_the_poison_policy_on_both_kinds_poisons_until_replugged() {
    use common::try_read_word;
    let config = Config { unplug_policy: apf::UnplugPolicy::Poison, image_window: 8, ..Config::default() };
    let (shared, shared_engine) = filled_shared(32, 4, config.clone());
    let image = loaded_image("poison-unplug", 4, &[]);
    let image = image_ram(&image);
    let image_engine = Engine::builder(image.clone(), image.image_source().unwrap()).config(config).start().unwrap();
    write_word(&image, BASE + 4 * P, 9);
    assert_eq!(read_word(&image, BASE + 5 * P), Pattern { seed: 4 }.word_at(BASE + 5 * P, 0));
    for (ram, engine) in [(&shared, &shared_engine), (&image, &image_engine)] {
        let range = GuestRange::new(GuestAddress(BASE + 4 * P), 4 * P);
        engine.offline(range, Mode::Unplug, Instant::now() + Duration::from_secs(5)).unwrap();
        for p in 4..8 {
            assert_eq!(try_read_word(ram, BASE + p * P), None, "{:?} page {p} poisoned", ram.kind());
        }
        assert_eq!(try_read_word(ram, BASE + 8 * P), Some(Pattern { seed: 4 }.word_at(BASE + 8 * P, 0)));
        assert_eq!(engine.replug(range).unwrap(), 4);
        for p in 4..8 {
            assert_eq!(try_read_word(ram, BASE + p * P + 16), Some(0), "{:?} page {p} replugged as zeros", ram.kind());
        }
        assert!(engine.errors().is_empty(), "{:?}", engine.errors().try_recv());
    }
}

#[test]
fn unplug_of_an_image_reads_zeros_not_the_image() {
    let image = loaded_image("unplug", 12, &[]);
    let ram = image_ram(&image);
    let engine = image_engine(&ram);
    let pattern = Pattern { seed: 12 };
    // Read pages (the image's, mapped in place), written ones (private
    // copies) and untouched ones, across the range.
    for p in 0..PAGES as u64 {
        match p % 3 {
            0 => assert_eq!(read_word(&ram, BASE + p * P), pattern.word_at(BASE + p * P, 0)),
            1 => write_word(&ram, BASE + p * P + 8, 1000 + p),
            _ => {}
        }
    }
    let range = GuestRange::new(GuestAddress(BASE + 8 * P), 40 * P);
    let report = engine.offline(range, Mode::Unplug, Instant::now() + Duration::from_secs(5)).unwrap();
    assert_eq!(report.pages_unplugged, 40, "{report:?}");
    for p in 0..PAGES as u64 {
        let gpa = BASE + p * P;
        let (w0, w1) = (read_word(&ram, gpa), read_word(&ram, gpa + 8));
        if (8..48).contains(&p) {
            assert_eq!((w0, w1), (0, 0), "page {p}: zeros after the unplug, not the image");
        } else if p % 3 == 1 {
            assert_eq!((w0, w1), (pattern.word_at(gpa, 0), 1000 + p), "page {p}");
        } else {
            assert_eq!((w0, w1), (pattern.word_at(gpa, 0), pattern.word_at(gpa, 1)), "page {p}");
        }
    }
    // Clones and the image keep their pages.
    let file = std::fs::File::from(image.fd().try_clone_to_owned().unwrap());
    let mut word = [0u8; 8];
    file.read_exact_at(&mut word, 10 * P).unwrap();
    assert_eq!(u64::from_le_bytes(word), pattern.word_at(BASE + 10 * P, 0));
    let clone = image_ram(&image);
    let _clone_engine = image_engine(&clone);
    assert_eq!(read_word(&clone, BASE + 10 * P), pattern.word_at(BASE + 10 * P, 0));
    assert!(engine.errors().is_empty(), "{:?}", engine.errors().try_recv());
}

#[test]
fn migrate_and_evict_are_refused_on_shared_memory_another_process_maps() {
    let (ram, engine) = filled_shared(32, 6, Config::default());
    let range = GuestRange::new(GuestAddress(BASE), 8 * P);
    // Not handed out yet: offered.
    engine.offline(range, Mode::Migrate, Instant::now() + Duration::from_secs(5)).unwrap();
    let _fd = ram.shared_fd().unwrap();
    assert!(ram.is_shared_out());
    for mode in [Mode::Migrate, Mode::Evict] {
        match engine.offline(range, mode, Instant::now() + Duration::from_secs(5)) {
            Err(e @ OfflineError::SharedWithOthers(_)) => assert!(e.to_string().contains("another process"), "{e}"),
            other => panic!("{mode:?} of shared-out memory: {other:?}"),
        }
    }
    // Unplug discards: the other process reads zeros, as the guest does.
    engine.offline(range, Mode::Unplug, Instant::now() + Duration::from_secs(5)).unwrap();
    assert_eq!(read_word(&ram, BASE), 0);
    assert_eq!(read_word(&ram, BASE + 8 * P), Pattern { seed: 6 }.word_at(BASE + 8 * P, 0));
}

#[test]
fn failing_write_protect_punch_and_copy_leave_every_page_readable_and_writable() {
    const N: usize = 256;
    let (ram, engine) = filled_shared(N, 13, Config::default());
    let mut expected = vec![0u8; N * PAGE_SIZE];
    Pattern { seed: 13 }.write(BASE, &mut expected);
    let range = GuestRange::new(GuestAddress(BASE), (N * PAGE_SIZE) as u64);
    let host = ram.regions()[0].host_base();
    let second_chunk = (host + 128 * P, host + 256 * P);
    let fp = engine.failpoints();
    let offline = |mode| engine.offline(range, mode, Instant::now() + Duration::from_secs(10));
    let check = |expected: &mut Vec<u8>, what: &str| {
        assert_eq!(first_difference(&mapped_bytes(&ram), expected), None, "after {what}");
        // No write stays held: every page takes a write at once.
        for p in 0..N {
            let v = 0x5000 + p as u64;
            write_word(&ram, BASE + p as u64 * P + 64, v);
            expected[p * PAGE_SIZE + 64..p * PAGE_SIZE + 72].copy_from_slice(&v.to_le_bytes());
        }
        assert_eq!(first_difference(&file_bytes_no_share(&ram), expected), None, "after {what}, in the page cache");
    };

    // Protection refused on the first chunk: nothing changes.
    fp.arm(Rule::new(Op::WriteProtect, libc::ENOMEM));
    match offline(Mode::Migrate) {
        Err(OfflineError::Ioctl { error, .. }) => {
            assert_eq!((error.op, error.errno), ("UFFDIO_WRITEPROTECT", libc::ENOMEM))
        }
        other => panic!("{other:?}"),
    }
    check(&mut expected, "a failed write protect");

    // The punch of the second chunk fails: the first is migrated, the
    // second untouched and unprotected.
    let moved = engine.stats().frames_moved;
    fp.arm(Rule::new(Op::Punch, libc::EIO).within(second_chunk.0, second_chunk.1));
    match offline(Mode::Evict) {
        Err(e @ OfflineError::Punch { .. }) => assert!(std::error::Error::source(&e).is_some()),
        other => panic!("{other:?}"),
    }
    assert_eq!(engine.stats().frames_moved, moved);
    check(&mut expected, "a failed punch");

    // The punch fails and so does clearing the protection: the pages keep
    // their frames and their protection, and the writes that meet it are
    // let go by the event loop.
    let held = engine.stats().write_protect_faults;
    fp.arm(Rule::new(Op::Punch, libc::EIO));
    fp.arm(Rule::new(Op::WriteProtect, libc::EIO).skip(1));
    match offline(Mode::Migrate) {
        Err(OfflineError::Punch { .. }) => {}
        other => panic!("{other:?}"),
    }
    check(&mut expected, "a failed punch and a failed clear of the protection");
    assert!(engine.stats().write_protect_faults >= held + 128, "the writes met the protection left behind");

    // Copying back fails for a page: it goes to the store, and its next
    // fault brings it back.
    fp.arm(Rule::new(Op::Copy, libc::ENOMEM).within(host, host + P));
    match offline(Mode::Migrate) {
        Err(OfflineError::Ioctl { error, range }) => assert_eq!((error.op, range.start.0), ("UFFDIO_COPY", BASE)),
        other => panic!("{other:?}"),
    }
    assert_eq!(ram.regions()[0].state(0), (apf::PageState::Missing, apf::Origin::Store));
    assert_eq!(ram.regions()[0].state(1).0, apf::PageState::Present);
    check(&mut expected, "a failed copy back");
    assert!(fp.fired() >= 5);
    let errors: Vec<_> = engine.errors().try_iter().collect();
    assert!(errors.is_empty(), "{errors:?}");
}

/// Every byte of shared RAM through the memfd, without handing it out.
fn file_bytes_no_share(ram: &GuestRam) -> Vec<u8> {
    // A shared mapping shows the page cache; /proc/self/mem reads it
    // without waiting on the userfaultfd (a hole would answer EIO).
    let mut bytes = vec![0u8; ram.size() as usize];
    let mem = std::fs::File::open("/proc/self/mem").unwrap();
    mem.read_exact_at(&mut bytes, ram.regions()[0].host_base()).unwrap();
    bytes
}

#[test]
fn a_write_during_the_copy_of_a_migrate_waits_for_the_chunk_and_lands() {
    let (ram, engine) = filled_shared(16, 17, Config::default());
    let range = GuestRange::new(GuestAddress(BASE), 16 * P);
    // The offline stops at its punch: the pages are protected and copied.
    engine.failpoints().arm(Rule::pause(Op::Punch));
    let offline = {
        std::thread::scope(|s| {
            let offline = s.spawn(|| engine.offline(range, Mode::Migrate, Instant::now() + Duration::from_secs(20)));
            assert!(engine.failpoints().wait_paused(Duration::from_secs(10)), "the offline never reached its punch");
            let before = engine.stats().write_protect_faults;
            let (tx, rx) = std::sync::mpsc::channel();
            let ram = &ram;
            let writer = s.spawn(move || {
                write_word(ram, BASE + 5 * P + 8, 0xfeed);
                tx.send(()).unwrap();
            });
            // The write waits on its write-protect fault while the copy
            // is taken.
            assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "a write went through during the copy");
            assert!(engine.stats().write_protect_faults > before, "{:?}", engine.stats());
            engine.failpoints().open_gate();
            rx.recv_timeout(Duration::from_secs(10)).expect("the write never landed");
            writer.join().unwrap();
            offline.join().unwrap()
        })
    };
    let report = offline.unwrap();
    assert_eq!(report.frames_moved, 16, "{report:?}");
    assert_eq!(read_word(&ram, BASE + 5 * P + 8), 0xfeed);
    assert_eq!(read_word(&ram, BASE + 5 * P), Pattern { seed: 17 }.word_at(BASE + 5 * P, 0));
    assert!(engine.errors().is_empty());
}

#[test]
fn migrate_and_evict_of_an_image_keep_every_write_and_leave_the_image_shared() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const N: usize = 256;
    let path = std::env::temp_dir().join(format!("apf-kinds-image-offline-{}", std::process::id()));
    let mut image_bytes = vec![0u8; N * PAGE_SIZE];
    Pattern { seed: 31 }.write(BASE, &mut image_bytes);
    std::fs::write(&path, &image_bytes).unwrap();
    let image = Image::load(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let ram = Arc::new(GuestRam::image(&[(GuestAddress(BASE), N * PAGE_SIZE)], image.clone()).unwrap());
    let engine = image_engine(&ram);
    let clone = Arc::new(GuestRam::image(&[(GuestAddress(BASE), N * PAGE_SIZE)], image).unwrap());
    let _clone_engine = image_engine(&clone);
    // Half the pages read (mapped from the image), half written (private
    // copies).
    let mut expected = image_bytes.clone();
    for p in 0..N as u64 {
        if p % 2 == 0 {
            read_word(&ram, BASE + p * P);
        } else {
            write_word(&ram, BASE + p * P, 0xc0de_0000 + p);
            expected[(p * P) as usize..(p * P) as usize + 8].copy_from_slice(&(0xc0de_0000 + p).to_le_bytes());
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (ram, stop) = (ram.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut written: Vec<(u64, u64)> = Vec::new();
            let mut v = 1u64;
            while !stop.load(Ordering::Relaxed) {
                // Odd pages only: each write lands on a private copy.
                for p in (1..N as u64).step_by(2) {
                    let gpa = BASE + p * P + 8 + (v % 511) * 8;
                    write_word(&ram, gpa, v);
                    written.push((gpa, v));
                    v += 1;
                }
            }
            written
        })
    };
    let range = GuestRange::new(GuestAddress(BASE), (N * PAGE_SIZE) as u64);
    let common::Hammered { rounds, writes, before, .. } =
        common::offline_beside_writer(&engine, range, None, 40, &stop, writer, BASE, &mut expected, "image");
    let stats = engine.stats();
    eprintln!(
        "{rounds} image offlines of {N} pages next to {writes} writes: {} write-protect faults, {} frames moved, {} evicted, {} removes",
        stats.write_protect_faults - before.write_protect_faults,
        stats.frames_moved - before.frames_moved,
        stats.pages_evicted - before.pages_evicted,
        stats.removes - before.removes
    );
    assert!(stats.write_protect_faults > before.write_protect_faults, "no write was ever held: {stats:?}");
    assert!(stats.frames_moved > before.frames_moved && stats.pages_evicted > before.pages_evicted, "{stats:?}");
    // The offline's own discards are not balloon removes.
    assert_eq!(stats.removes, before.removes, "{stats:?}");
    let mapped = mapped_bytes(&ram);
    if let Some(at) = first_difference(&mapped, &expected) {
        let word = |b: &[u8]| u64::from_le_bytes(b[at & !7..(at & !7) + 8].try_into().unwrap());
        let image_word = u64::from_le_bytes(image_bytes[at & !7..(at & !7) + 8].try_into().unwrap());
        let page = at / PAGE_SIZE;
        panic!(
            "a write was lost at byte {at} (page {page}, state {:?}): {:#x} where {:#x} was written (the image has {image_word:#x}); {} pages differ",
            ram.regions()[0].state(page),
            word(&mapped),
            word(&expected),
            (0..N).filter(|p| mapped[p * PAGE_SIZE..(p + 1) * PAGE_SIZE] != expected[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]).count()
        );
    }
    // The clone still reads the image.
    assert_eq!(first_difference(&mapped_bytes(&clone), &image_bytes), None);
    assert!(engine.errors().is_empty(), "{:?}", engine.errors().try_recv());
}

#[test]
fn a_failed_drop_of_an_image_page_leaves_no_claim_to_swallow_a_later_balloon_discard() {
    let image = loaded_image("own-discard", 14, &[]);
    let ram = image_ram(&image);
    let engine = image_engine(&ram);
    write_word(&ram, BASE + 5 * P, 55);
    let page = GuestRange::new(GuestAddress(BASE + 5 * P), P);
    // The drop of the private copy fails: nothing changes, the page keeps
    // the guest's write.
    engine.failpoints().arm(Rule::new(Op::Punch, libc::EIO));
    match engine.offline(page, Mode::Evict, Instant::now() + Duration::from_secs(5)) {
        Err(OfflineError::Punch { range, .. }) => assert_eq!(range, page),
        other => panic!("{other:?}"),
    }
    assert_eq!(read_word(&ram, BASE + 5 * P), 55);
    // A balloon discard of exactly that page is the guest's: zeros.
    let removes = engine.stats().removes;
    discard(&ram, BASE + 5 * P, P);
    assert_eq!(common::try_read_word(&ram, BASE + 5 * P), Some(0));
    assert_eq!(engine.stats().removes, removes + 1);
    // And a drop that works is the offline's own: no remove counted, the
    // write kept through an evict and a migrate.
    write_word(&ram, BASE + 5 * P, 56);
    for mode in [Mode::Evict, Mode::Migrate] {
        let report = engine.offline(page, mode, Instant::now() + Duration::from_secs(5)).unwrap();
        assert_eq!(report.pages_taken, 1, "{mode}: {report:?}");
        assert_eq!(read_word(&ram, BASE + 5 * P), 56, "{mode}");
    }
    assert_eq!(engine.stats().removes, removes + 1);
    assert!(engine.errors().is_empty(), "{:?}", engine.errors().try_recv());
}
