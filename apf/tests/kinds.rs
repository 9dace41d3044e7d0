//! Memory kinds on real memory: an image mapped private (reads mapped in
//! place with `UFFDIO_CONTINUE`, writes given private copies, clones
//! sharing one image), shared memfd memory (the page cache is the truth
//! after a discard), and what each kind refuses.

mod common;

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
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
    let path = snapshot("clones", 7, &[5]);
    let image = Image::load(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
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

#[test]
fn a_discarded_image_page_reads_zeros_not_the_image() {
    let path = snapshot("discard", 9, &[]);
    let image = Image::load(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
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
fn kinds_without_move_refuse_migrate_evict_and_unplug_and_serve_the_rest() {
    let path = snapshot("refuse", 3, &[]);
    let image = Image::load(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let image_ram = image_ram(&image);
    let shared = Arc::new(GuestRam::shared_memfd(&[(GuestAddress(BASE), PAGES * PAGE_SIZE)]).unwrap());
    let engines = [image_engine(&image_ram), Engine::builder(shared.clone(), Arc::new(ZeroSource)).start().unwrap()];
    let range = GuestRange::new(GuestAddress(BASE), 8 * P);
    for engine in &engines {
        for mode in [Mode::Migrate, Mode::Evict, Mode::Unplug] {
            let deadline = Instant::now() + Duration::from_secs(1);
            match engine.offline(range, mode, deadline) {
                Err(e @ OfflineError::NotOffered { .. }) => assert!(e.to_string().contains("UFFDIO_MOVE"), "{e}"),
                other => panic!("{mode:?} on {:?}: {other:?}", engine.ram().kind()),
            }
        }
        // Prefetch, pins and references work.
        assert_eq!(engine.prefetch(range).unwrap(), 8);
        let pin = engine.pin(range, |_| {}).unwrap();
        let guard = pin.get(Instant::now() + Duration::from_secs(2)).unwrap();
        drop(guard);
        let r = engine.page_ref(range, Instant::now() + Duration::from_secs(2)).unwrap();
        drop(r);
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
    let path = snapshot("continue", 11, &[]);
    let image = Image::load(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
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
