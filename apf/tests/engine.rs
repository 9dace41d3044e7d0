//! The fault engine against real userfaultfd, with host threads as the
//! faulting "vCPUs". Failures are injected through our own seam, the
//! `PageSource`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use apf::{
    Backend, Dispatch, Engine, EngineError, GuestAddress, GuestRam, GuestRange, PageState, Pattern, RamError,
    WorkingSet, PAGE_SIZE,
};

mod common;
use common::{config, discard, read_page, wait_for, write_word, Fills, ScriptedSource};

const PAGE: u64 = PAGE_SIZE as u64;

/// An engine builder on backend `b` (a test's own configuration keeps it
/// with `..config(b)`).
fn builder(b: Backend, ram: Arc<GuestRam>, source: Arc<dyn apf::PageSource>) -> apf::EngineBuilder {
    Engine::builder(ram, source).config(config(b))
}

common::on_both_backends!(
    concurrent_faults_on_one_page_are_resolved_once,
    prefetch_windows_stop_at_region_edges,
    strided_access_is_prefetched_and_correct,
    removed_pages_fault_back_as_zeros,
    pages_present_behind_the_engine_are_skipped_not_overwritten,
    a_fault_deduped_onto_a_failed_window_is_resolved,
    working_set_recorded_by_one_run_is_replayed_by_the_next,
    prefetch_installs_a_range_and_bad_ranges_are_refused,
    zero_source_serves_reads_with_the_zero_page_and_writes_with_copies,
    many_threads_random_faults_every_byte_right,
    a_fault_with_no_stream_installs_its_aligned_block,
    shutdown_under_load_is_clean,
    a_fault_is_woken_by_its_own_head_before_the_rest_of_its_window,
    a_replay_sorts_its_set_by_address_within_slices_of_the_recording,
    a_replay_overtaken_by_demand_goes_on_ahead_and_still_installs_its_whole_set,
);

fn ram(ranges: &[(u64, usize)]) -> Arc<GuestRam> {
    let ranges: Vec<_> = ranges.iter().map(|&(b, pages)| (GuestAddress(b), pages * PAGE_SIZE)).collect();
    Arc::new(GuestRam::anonymous(&ranges).unwrap())
}

/// The counters once every job in flight has finished (installs wake the
/// faulting thread before their counters move).
fn settled(engine: &Engine) -> apf::StatsSnapshot {
    assert!(engine.wait_idle(Instant::now() + Duration::from_secs(10)), "engine did not go idle");
    engine.stats()
}

fn verify(ram: &GuestRam, pattern: Pattern, gpa: u64) {
    assert_eq!(pattern.verify(gpa, &read_page(ram, gpa)), Ok(()), "page {gpa:#x}");
}

/// The pattern the scripted sources of these tests fill with.
const SLOW_PATTERN: Pattern = Pattern { seed: 7 };

/// A source whose fills take `delay` per page, counted per page.
fn slow_source(delay: Duration) -> ScriptedSource {
    ScriptedSource::pattern(SLOW_PATTERN).delay_per_page(delay)
}

fn concurrent_faults_on_one_page_are_resolved_once(b: Backend) {
    let ram = ram(&[(0, 16)]);
    let source = Arc::new(slow_source(Duration::from_millis(100)));
    let engine =
        builder(b, ram.clone(), source.clone()).config(apf::Config { max_window: 1, ..config(b) }).start().unwrap();
    let barrier = Barrier::new(8);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                barrier.wait();
                verify(&ram, SLOW_PATTERN, 5 * PAGE);
            });
        }
    });
    assert_eq!(source.fills_of(5 * PAGE), 1, "one fill for eight concurrent faults");
    let st = settled(&engine);
    assert!(st.deduped >= 1, "faults arriving during the slow fill are deduped: {st:?}");
    assert_eq!(st.faults, st.deduped + 1, "{st:?}");
    assert_eq!(st.pages_installed, 1);
}

fn prefetch_windows_stop_at_region_edges(b: Backend) {
    // Two regions, far apart in guest-physical space.
    let ram = ram(&[(0x10_0000, 40), (0x4000_0000, 40)]);
    let pattern = Pattern { seed: 99 };
    let engine =
        builder(b, ram.clone(), Arc::new(pattern)).config(apf::Config { max_window: 32, ..config(b) }).start().unwrap();
    // Ascending through region 0, then descending through region 1.
    for p in 0..40 {
        verify(&ram, pattern, 0x10_0000 + p * PAGE);
    }
    for p in (0..40).rev() {
        verify(&ram, pattern, 0x4000_0000 + p * PAGE);
    }
    let st = settled(&engine);
    assert_eq!(st.pages_installed, 80, "{st:?}");
    assert!(st.faults < 40, "prefetch should have saved most faults: {st:?}");
    for r in ram.regions() {
        assert_eq!(r.census()[PageState::Present as usize], 40);
    }
}

fn strided_access_is_prefetched_and_correct(b: Backend) {
    let ram = ram(&[(0, 512)]);
    let pattern = Pattern { seed: 3 };
    let engine =
        builder(b, ram.clone(), Arc::new(pattern)).config(apf::Config { max_window: 64, ..config(b) }).start().unwrap();
    for p in (0..512).step_by(4) {
        verify(&ram, pattern, p * PAGE);
    }
    let st = settled(&engine);
    assert!(st.faults < 64, "a stride of 4 pages is a stream: {st:?}");
    for p in 0..512 {
        if ram.regions()[0].state(p as usize).0 == PageState::Present {
            verify(&ram, pattern, p * PAGE);
        }
    }
}

fn removed_pages_fault_back_as_zeros(b: Backend) {
    let ram = ram(&[(0, 16)]);
    let pattern = Pattern { seed: 1 };
    let engine =
        builder(b, ram.clone(), Arc::new(pattern)).config(apf::Config { max_window: 1, ..config(b) }).start().unwrap();
    for p in 0..8 {
        verify(&ram, pattern, p * PAGE);
    }
    // Two pages installed, and one never touched.
    discard(&ram, 2 * PAGE, 2 * PAGE);
    discard(&ram, 10 * PAGE, PAGE);
    for gpa in [2 * PAGE, 3 * PAGE, 10 * PAGE] {
        assert!(read_page(&ram, gpa).iter().all(|&b| b == 0), "removed page {gpa:#x} must read as zeros");
    }
    // Writable after the zero fill, and neighbours untouched.
    write_word(&ram, 2 * PAGE, 0xabcd);
    assert_eq!(read_page(&ram, 2 * PAGE)[..8], 0xabcd_u64.to_le_bytes());
    verify(&ram, pattern, PAGE);
    verify(&ram, pattern, 4 * PAGE);
    verify(&ram, pattern, 11 * PAGE);
    assert!(engine.stats().removes >= 2);
}

fn pages_present_behind_the_engine_are_skipped_not_overwritten(b: Backend) {
    let ram = ram(&[(0, 64)]);
    // Populated before the engine registers the region.
    write_word(&ram, 10 * PAGE, 0x1010);
    write_word(&ram, 11 * PAGE, 0x1111);
    write_word(&ram, 30 * PAGE, 0x3030);
    let pattern = Pattern { seed: 5 };
    let engine =
        builder(b, ram.clone(), Arc::new(pattern)).config(apf::Config { max_window: 64, ..config(b) }).start().unwrap();
    for p in 0..64u64 {
        let page = read_page(&ram, p * PAGE);
        match p {
            10 | 11 | 30 => {
                let marker = [(10, 0x1010u64), (11, 0x1111), (30, 0x3030)].iter().find(|m| m.0 == p).unwrap().1;
                assert_eq!(page[..8], marker.to_le_bytes(), "page {p} keeps what was written before");
            }
            _ => assert_eq!(pattern.verify(p * PAGE, &page), Ok(()), "page {p}"),
        }
    }
    let st = settled(&engine);
    assert!(st.eexist >= 2, "windows met the present pages: {st:?}");
    assert_eq!(st.pages_installed, 61, "{st:?}");
}

fn a_fault_deduped_onto_a_failed_window_is_resolved(b: Backend) {
    let ram = ram(&[(0, 16)]);
    let source = Arc::new(slow_source(Duration::from_millis(75)).fail(Fills::Windows));
    let engine =
        builder(b, ram.clone(), source.clone()).config(apf::Config { max_window: 4, ..config(b) }).start().unwrap();
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            // Pages 0 and 1 single, then page 2 opens a window [2, 4).
            for p in 0..3 {
                verify(&ram, SLOW_PATTERN, p * PAGE);
            }
        });
        s.spawn(|| {
            // Arrive while the window's fill is sleeping.
            let by = Instant::now() + Duration::from_secs(10);
            while source.calls() < 3 && Instant::now() < by {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(source.calls() >= 3, "the window's fill never started: {} fills", source.calls());
            std::thread::sleep(Duration::from_millis(50));
            verify(&ram, SLOW_PATTERN, 3 * PAGE);
        });
    });
    let st = settled(&engine);
    assert!(st.deduped >= 1, "page 3 was claimed by the window when faulted: {st:?}");
    assert!(st.fill_retries >= 1, "{st:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

fn working_set_recorded_by_one_run_is_replayed_by_the_next(b: Backend) {
    let pattern = Pattern { seed: 11 };
    let order: Vec<u64> = [40u64, 3, 77, 120, 5, 6, 7, 200, 201, 33].iter().map(|p| p * PAGE).collect();
    let path = std::env::temp_dir().join(format!("apf-ws-test-{}-{b:?}", std::process::id()));
    let ws = {
        let ram = ram(&[(0, 256)]);
        let engine = builder(b, ram.clone(), Arc::new(pattern))
            .config(apf::Config { max_window: 1, fault_around: 1, record_working_set: true, ..config(b) })
            .start()
            .unwrap();
        for &gpa in &order {
            verify(&ram, pattern, gpa);
        }
        let ws = engine.working_set();
        ws.save(&path, engine.image_id().unwrap()).unwrap();
        ws
    };
    assert_eq!(ws.pages, order);
    assert_eq!(ws.at_ms.len(), order.len());
    assert!(ws.at_ms.windows(2).all(|w| w[0] <= w[1]), "first touches out of time order: {:?}", ws.at_ms);

    // Another image (other contents) refuses the file.
    let other = builder(b, ram(&[(0, 256)]), Arc::new(Pattern { seed: 12 })).start().unwrap();
    let refused = WorkingSet::load(&path, other.image_id().unwrap());
    assert!(matches!(refused, Err(apf::WorkingSetError::OtherImage { .. })), "{refused:?}");
    drop(other);

    let ram = ram(&[(0, 256)]);
    let engine = builder(b, ram.clone(), Arc::new(pattern)).start().unwrap();
    let ws = WorkingSet::load(&path, engine.image_id().unwrap()).unwrap();
    std::fs::remove_file(&path).unwrap();
    engine.replay(&ws).unwrap();
    assert!(engine.wait_idle(Instant::now() + Duration::from_secs(10)), "replay did not finish");
    assert_eq!(ram.regions()[0].census()[PageState::Present as usize], order.len());
    for &gpa in &order {
        verify(&ram, pattern, gpa);
    }
    assert_eq!(engine.stats().faults, 0, "replayed pages were present before the guest asked");
}

fn prefetch_installs_a_range_and_bad_ranges_are_refused(b: Backend) {
    let ram = ram(&[(0x1000, 32)]);
    let pattern = Pattern { seed: 2 };
    let engine = builder(b, ram.clone(), Arc::new(pattern)).start().unwrap();
    let n = engine.prefetch(GuestRange::new(GuestAddress(0x1000 + 4 * PAGE), 8 * PAGE)).unwrap();
    assert_eq!(n, 8);
    assert_eq!(
        engine.prefetch(GuestRange::new(GuestAddress(0x1000 + 4 * PAGE), 8 * PAGE)).unwrap(),
        0,
        "already present"
    );
    for p in 4..12 {
        verify(&ram, pattern, 0x1000 + p * PAGE);
    }
    assert_eq!(engine.stats().faults, 0);
    let bad = [
        (GuestRange::new(GuestAddress(0x1001), PAGE), "unaligned"),
        (GuestRange::new(GuestAddress(0x1000), 0), "empty"),
        (GuestRange::new(GuestAddress(0x1000 + 30 * PAGE), 4 * PAGE), "past the end"),
        (GuestRange::new(GuestAddress(0x100_0000), PAGE), "outside RAM"),
    ];
    for (range, what) in bad {
        match engine.prefetch(range) {
            Err(EngineError::Ram(e)) => {
                let ok = matches!(
                    (what, &e),
                    ("unaligned", RamError::Unaligned(_))
                        | ("empty", RamError::Empty(_))
                        | ("past the end", RamError::RangeOutOfBounds(_))
                        | ("outside RAM", RamError::OutOfRange(_))
                );
                assert!(ok, "{what}: {e}");
                assert!(!e.to_string().is_empty());
            }
            other => panic!("{what}: expected a RAM error, got {other:?}"),
        }
    }
}

#[test]
fn invalid_configuration_is_refused() {
    let b = Backend::PrivateAnonymous;
    let ram = ram(&[(0, 4)]);
    let p = Arc::new(Pattern { seed: 0 });
    for (b, what) in [
        (builder(b, ram.clone(), p.clone()).config(apf::Config { workers: 0, ..config(b) }), "workers"),
        (builder(b, ram.clone(), p.clone()).config(apf::Config { max_window: 0, ..config(b) }), "max_window"),
        (builder(b, ram.clone(), p.clone()).config(apf::Config { max_window: 100_000, ..config(b) }), "max_window"),
    ] {
        match b.start() {
            Err(EngineError::Config(msg)) => assert!(msg.contains(what), "{msg}"),
            other => panic!("{what}: expected a config error, got {other:?}"),
        }
    }
    // Poisoning unplugged memory needs UFFDIO_POISON.
    let poison = apf::Config { unplug_policy: apf::UnplugPolicy::Poison, ..config(Backend::Limited) };
    match builder(Backend::Limited, ram.clone(), p.clone()).config(poison).start() {
        Err(EngineError::Config(msg)) => assert!(msg.contains("poison"), "{msg}"),
        other => panic!("poison policy on the limited backend: expected a config error, got {other:?}"),
    }
    // "inline" parses, garbage does not.
    assert_eq!("inline".parse::<Dispatch>(), Ok(Dispatch::Inline));
    assert!("fast".parse::<Dispatch>().unwrap_err().contains("fast"));
    assert_eq!("limited".parse::<Backend>(), Ok(Backend::Limited));
    assert!("remote".parse::<Backend>().unwrap_err().contains("remote"));
}

fn zero_source_serves_reads_with_the_zero_page_and_writes_with_copies(b: Backend) {
    let ram = ram(&[(0, 64)]);
    let engine = builder(b, ram.clone(), Arc::new(apf::ZeroSource))
        .config(apf::Config { max_window: 1, ..config(b) })
        .start()
        .unwrap();
    assert!(read_page(&ram, 0).iter().all(|&b| b == 0));
    write_word(&ram, 8 * PAGE, 42);
    assert_eq!(read_page(&ram, 8 * PAGE)[..8], 42u64.to_le_bytes());
    // The read-mapped zero page is still writable (the kernel copies it).
    write_word(&ram, 0, 7);
    assert_eq!(read_page(&ram, 0)[..8], 7u64.to_le_bytes());
    let st = settled(&engine);
    assert_eq!(st.zero_pages, 1, "{st:?}");
    assert_eq!(st.pages_installed, 2, "{st:?}");
}

fn many_threads_random_faults_every_byte_right(b: Backend) {
    let ram = ram(&[(0, 4096)]);
    let pattern = Pattern { seed: 1234 };
    let engine = builder(b, ram.clone(), Arc::new(pattern)).start().unwrap();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (ram, next) = (&ram, &next);
            s.spawn(move || {
                let mut x = t + 1;
                while next.fetch_add(1, Ordering::Relaxed) < 4096 {
                    x = apf::splitmix64(x);
                    verify(ram, pattern, (x % 4096) * PAGE);
                }
            });
        }
    });
    for p in 0..4096 {
        if ram.regions()[0].state(p).0 == PageState::Present {
            verify(&ram, pattern, p as u64 * PAGE);
        }
    }
    let st = settled(&engine);
    assert_eq!(st.pages_installed as usize, ram.regions()[0].census()[PageState::Present as usize], "{st:?}");
}

// ---- Child-process tests: a SIGBUS, or fd/thread accounting, must not
// ---- share a process with the other tests.

static SIGBUS_SEEN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigbus(_: libc::c_int) {
    SIGBUS_SEEN.store(true, Ordering::SeqCst);
    // Returning would re-run the faulting access; park this thread until
    // the process exits.
    loop {
        // SAFETY: pause(2) is async-signal-safe and has no preconditions.
        unsafe { libc::pause() };
    }
}

fn catch_sigbus() {
    // SAFETY: sigaction is plain data; all-zero is a valid value (empty
    // mask, no flags).
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigbus as *const () as usize;
    // SAFETY: the handler only touches an atomic and calls pause(2), both
    // async-signal-safe; `sa` is fully initialised.
    assert_eq!(unsafe { libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) }, 0);
}

/// Runs the ignored test `name` alone in a fresh copy of this test binary
/// and returns its stdout. Re-executing (not forking) keeps the child's
/// userfaultfd registrations its own.
fn run_child(name: &str, backend: Backend) -> String {
    let exe = std::env::current_exe().unwrap();
    let backend = match backend {
        Backend::PrivateAnonymous => "private-anonymous",
        Backend::Limited => "limited",
    };
    let mut child = std::process::Command::new(exe)
        .args([name, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("APF_CHILD", "1")
        .env("APF_BACKEND", backend)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
            assert!(status.success(), "child {name} failed ({status}):\n{out}");
            return out;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("child {name} did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn failing_source_poisons_the_page_and_reports() {
    let out = run_child("child_failing_source", Backend::PrivateAnonymous);
    assert!(
        out.contains("reported: page source failed for guest page 0x3000 after 3 attempts (poisoned: true)"),
        "{out}"
    );
    assert!(out.contains("sigbus: delivered"), "{out}");
    assert!(out.contains("poisoned: 1"), "{out}");
    assert!(out.contains("retries: 2"), "{out}");
}

/// Without UFFDIO_POISON the page a source fails for good gets zeros, so
/// the thread waiting on it goes on, and the failure is reported as such.
#[test]
fn failing_source_without_poison_fills_zeros_and_reports() {
    let ram = ram(&[(0, 8)]);
    let src = slow_source(Duration::ZERO).fail(Fills::All);
    let config = apf::Config { fill_retries: 2, ..config(Backend::Limited) };
    let engine = Engine::builder(ram.clone(), Arc::new(src)).config(config).start().unwrap();
    let r = ram.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(read_page(&r, 3 * PAGE)));
    let page = rx.recv_timeout(Duration::from_secs(10)).expect("the faulting thread was never let go");
    assert!(page.iter().all(|&b| b == 0));
    let err = engine.errors().recv_timeout(Duration::from_secs(1)).expect("an error report");
    match &err {
        apf::FaultError::ZeroFilled { gpa: GuestAddress(0x3000), why } => assert!(
            matches!(
                **why,
                apf::FaultError::SourceFailed { gpa: GuestAddress(0x3000), attempts: 3, poisoned: false, .. }
            ),
            "{why}"
        ),
        other => panic!("unexpected report: {other}"),
    }
    assert!(err.to_string().contains("filled with zeros"), "{err}");
    let st = settled(&engine);
    assert_eq!((st.poisoned, st.fill_retries), (0, 2), "{st:?}");
    assert_eq!(ram.regions()[0].state(3).0, PageState::Present);
}

#[test]
#[ignore = "runs in a child process started by failing_source_poisons_the_page_and_reports"]
fn child_failing_source() {
    assert!(std::env::var_os("APF_CHILD").is_some(), "run through its parent test");
    catch_sigbus();
    let ram = ram(&[(0, 8)]);
    let src = slow_source(Duration::ZERO).fail(Fills::All);
    let config = apf::Config { fill_retries: 2, ..Default::default() };
    let engine = Engine::builder(ram.clone(), Arc::new(src)).config(config).start().unwrap();
    let r = ram.clone();
    std::thread::spawn(move || read_page(&r, 3 * PAGE));
    let err = engine.errors().recv_timeout(Duration::from_secs(10)).expect("an error report");
    println!("reported: {err}");
    let delivered = wait_for(&SIGBUS_SEEN, Duration::from_secs(10));
    println!("sigbus: {}", if delivered { "delivered" } else { "missing" });
    let st = settled(&engine);
    println!("poisoned: {}", st.poisoned);
    println!("retries: {}", st.fill_retries);
    std::process::exit(0);
}

fn shutdown_under_load_is_clean(b: Backend) {
    let out = run_child("child_shutdown_under_load", b);
    // Without UFFDIO_POISON, pages never touched are left to the kernel,
    // which fills them with zeros once the descriptor is gone.
    let (poisoned, after) = match b {
        Backend::PrivateAnonymous => ("poisoned: all unresolved", "after shutdown: sigbus"),
        Backend::Limited => ("poisoned: none", "after shutdown: zeros"),
    };
    for needle in ["shutdown: prompt", poisoned, "fds: none leaked", "threads: all joined", after] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
}

fn count_entries(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[test]
#[ignore = "runs in a child process started by shutdown_under_load_is_clean"]
fn child_shutdown_under_load() {
    assert!(std::env::var_os("APF_CHILD").is_some(), "run through its parent test");
    let b: Backend = std::env::var("APF_BACKEND").unwrap().parse().unwrap();
    catch_sigbus();
    let fds_before = count_entries("/proc/self/fd");
    let threads_before = count_entries("/proc/self/task");
    let ram = ram(&[(0, 4096)]);
    let source = Arc::new(slow_source(Duration::from_micros(300)));
    let engine =
        builder(b, ram.clone(), source.clone()).config(apf::Config { workers: 2, ..config(b) }).start().unwrap();
    // Load: four threads faulting at random, and a replay of every page.
    engine.replay(&WorkingSet { pages: (0..4096).map(|p| p * PAGE).collect(), at_ms: Vec::new() }).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (ram, stop) = (&ram, &stop);
            s.spawn(move || {
                let mut x = t;
                while !stop.load(Ordering::Relaxed) {
                    x = apf::splitmix64(x);
                    verify(ram, SLOW_PATTERN, (x % 4096) * PAGE);
                }
            });
        }
        std::thread::sleep(Duration::from_millis(300));
        // The user stops its faulting threads first.
        stop.store(true, Ordering::Relaxed);
    });
    let r = ram.regions()[0].census();
    let unresolved = (r[PageState::Missing as usize] + r[PageState::Resolving as usize]) as u64;
    assert!(unresolved > 0, "the load must leave pages unresolved");
    let t = Instant::now();
    let report = engine.shutdown();
    let took = t.elapsed();
    println!("shutdown: {} ({took:?})", if took < Duration::from_secs(5) { "prompt" } else { "slow" });
    let after = ram.regions()[0].census();
    let missing_now = after[PageState::Missing as usize] as u64;
    let poisoned = match report.poisoned_pages {
        0 => "none",
        n if n >= missing_now => "all unresolved",
        _ => "some left",
    };
    println!(
        "poisoned: {poisoned} ({} poisoned, {unresolved} unresolved before, {missing_now} missing now)",
        report.poisoned_pages
    );
    // The engine's descriptors (uffd, eventfds, epoll) are closed. The
    // region stays mapped: it belongs to `ram`.
    let fds_after = count_entries("/proc/self/fd");
    println!(
        "fds: {} ({fds_before} before, {fds_after} after)",
        if fds_after == fds_before { "none leaked" } else { "leaked" }
    );
    let threads_after = count_entries("/proc/self/task");
    println!(
        "threads: {} ({threads_before} before, {threads_after} after)",
        if threads_after == threads_before { "all joined" } else { "left running" }
    );
    // A page nobody resolved now raises SIGBUS instead of reading zeros
    // (or reads zeros, without UFFDIO_POISON).
    let page = (0..4096).find(|&p| ram.regions()[0].state(p).0 == PageState::Missing).expect("an unresolved page");
    let r2 = ram.clone();
    let zeros = Arc::new(AtomicBool::new(false));
    let z = zeros.clone();
    std::thread::spawn(move || z.store(read_page(&r2, page as u64 * PAGE).iter().all(|&b| b == 0), Ordering::SeqCst));
    let after = match b {
        Backend::PrivateAnonymous if wait_for(&SIGBUS_SEEN, Duration::from_secs(10)) => "sigbus",
        Backend::Limited if wait_for(&zeros, Duration::from_secs(10)) && !SIGBUS_SEEN.load(Ordering::SeqCst) => "zeros",
        _ => "neither sigbus nor zeros",
    };
    println!("after shutdown: {after}");
    std::process::exit(0);
}

fn a_fault_with_no_stream_installs_its_aligned_block(b: Backend) {
    let ram = ram(&[(0, 64)]);
    let pattern = Pattern { seed: 9 };
    let engine = builder(b, ram.clone(), Arc::new(pattern)).start().unwrap();
    // Page 13 lies in the block of pages 8..16: all of it comes in.
    verify(&ram, pattern, 13 * PAGE);
    let s = settled(&engine);
    assert_eq!((s.faults, s.pages_installed), (1, 8));
    for p in 8..16 {
        assert_eq!(ram.state(ram.locate(GuestAddress(p * PAGE)).unwrap()).0, PageState::Present, "page {p}");
        verify(&ram, pattern, p * PAGE);
    }
    assert_eq!(settled(&engine).faults, 1, "no more faults in the block");
    assert_eq!(ram.state(ram.locate(GuestAddress(16 * PAGE)).unwrap()).0, PageState::Missing);
    // A page of the next block already present is left alone.
    engine.prefetch(GuestRange::new(GuestAddress(18 * PAGE), PAGE)).unwrap();
    let before = settled(&engine).pages_installed;
    verify(&ram, pattern, 21 * PAGE);
    assert_eq!(settled(&engine).pages_installed - before, 7);
    for p in 16..24 {
        verify(&ram, pattern, p * PAGE);
    }
    drop(engine);

    // Off: one page per fault.
    let ram2 = self::ram(&[(0, 64)]);
    let config = apf::Config { fault_around: 1, ..config(b) };
    let engine = builder(b, ram2.clone(), Arc::new(pattern)).config(config).start().unwrap();
    verify(&ram2, pattern, 13 * PAGE);
    assert_eq!(settled(&engine).pages_installed, 1);
}

/// The limited backend refuses, at the call and before touching anything,
/// the offlines that need `UFFDIO_MOVE`; faults, pins and discards go on.
#[test]
fn the_limited_backend_refuses_offlines_that_need_move_and_serves_the_rest() {
    let ram = ram(&[(0, 64)]);
    let pattern = Pattern { seed: 21 };
    let engine = builder(Backend::Limited, ram.clone(), Arc::new(pattern)).start().unwrap();
    assert!(!engine.features().contains(apf::Features::POISON) && !engine.features().contains(apf::Features::MOVE));
    verify(&ram, pattern, 4 * PAGE);
    // The install woke the reader before its resolver marked the window.
    settled(&engine);
    let range = GuestRange::new(GuestAddress(0), 16 * PAGE);
    for mode in [apf::Mode::Migrate, apf::Mode::Evict, apf::Mode::Unplug] {
        match engine.offline(range, mode, Instant::now() + Duration::from_secs(1)) {
            Err(e @ apf::OfflineError::NotOffered { mode: m, backend: "limited" }) if m == mode => {
                assert!(e.to_string().contains("UFFDIO_MOVE"), "{e}");
            }
            other => panic!("{mode}: expected NotOffered, got {other:?}"),
        }
    }
    assert_eq!(engine.stats().offlines + engine.stats().offline_busy, 0);
    // Nothing was touched: the page read before keeps its contents.
    assert_eq!(ram.regions()[0].state(4).0, PageState::Present);
    verify(&ram, pattern, 4 * PAGE);
    // A pin faults its range in and reads it.
    let pin = engine.pin(GuestRange::new(GuestAddress(32 * PAGE), 2 * PAGE), |_| {}).unwrap();
    let guard = pin.get(Instant::now() + Duration::from_secs(5)).unwrap();
    let mut page = vec![0u8; PAGE_SIZE];
    vm_memory::Bytes::read_slice(&guard.memory(), &mut page, 0).unwrap();
    assert_eq!(pattern.verify(32 * PAGE, &page), Ok(()));
    drop(guard);
    assert_eq!(engine.replug(range).unwrap(), 0, "nothing was unplugged");
}

/// A fault's own page and a few after it are installed and woken before the
/// rest of its window: with the fill of the rest held at a gate, the
/// faulting thread goes on; the rest arrives once the gate opens.
fn a_fault_is_woken_by_its_own_head_before_the_rest_of_its_window(b: Backend) {
    let ram = ram(&[(0, 256)]);
    let source = Arc::new(ScriptedSource::pattern(SLOW_PATTERN).hold(Fills::Covering(64 * PAGE)));
    // Fault-around of 64 pages: a first fault at page 74 claims the
    // aligned block 64..128, with the faulting page inside it.
    let cfg = apf::Config { fault_around: 64, max_window: 64, ..config(b) };
    let engine = Engine::builder(ram.clone(), source.clone()).config(cfg).start().unwrap();
    let reader = {
        let ram = ram.clone();
        std::thread::spawn(move || {
            verify(&ram, SLOW_PATTERN, 74 * PAGE);
            verify(&ram, SLOW_PATTERN, 81 * PAGE);
        })
    };
    assert!(source.wait_held(Duration::from_secs(5)), "the rest of the window was never filled");
    assert!(
        wait_for_thread(&reader, Duration::from_secs(5)),
        "the faulting thread waited for the whole window, not its own page"
    );
    reader.join().unwrap();
    assert_eq!(ram.state(ram.locate(GuestAddress(64 * PAGE)).unwrap()).0, PageState::Resolving);
    source.release();
    settled(&engine);
    for page in 64..128 {
        verify(&ram, SLOW_PATTERN, page * PAGE);
    }
    assert_eq!(engine.stats().faults, 1, "the window's pages faulted on their own");
}

/// Waits up to `limit` for `thread` to finish.
fn wait_for_thread(thread: &std::thread::JoinHandle<()>, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while !thread.is_finished() {
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

/// A replay fills its set in windows of at most 64 KiB, and faults on pages
/// it has not reached are served while it runs, each after at most one of
/// its windows.
#[test]
fn a_replay_fills_small_windows_while_demand_is_served() {
    let ram = ram(&[(0, 4096)]);
    let fills = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = fills.clone();
    let source = ScriptedSource::pattern(SLOW_PATTERN)
        .delay_per_page(Duration::from_micros(200))
        .before_fill(move |gpa, len| seen.lock().unwrap().push((gpa.0, len)));
    let engine = Engine::builder(ram.clone(), Arc::new(source)).start().unwrap();
    let set = 2048u64;
    engine.replay(&WorkingSet { pages: (0..set).map(|p| p * PAGE).collect(), at_ms: Vec::new() }).unwrap();
    for page in [3000u64, 3500, 3100, 4000] {
        verify(&ram, SLOW_PATTERN, page * PAGE);
    }
    assert_eq!(engine.stats().replayed_pages, 0, "the replay ended before the reader: nothing was shown");
    assert!(engine.wait_idle(Instant::now() + Duration::from_secs(20)), "the replay did not finish");
    assert!(wait_for_count(&engine, set), "the replay installed {} pages", engine.stats().replayed_pages);
    let fills = fills.lock().unwrap();
    let replayed: Vec<_> = fills.iter().filter(|(gpa, _)| *gpa < set * PAGE).collect();
    assert!(!replayed.is_empty());
    assert!(replayed.iter().all(|(_, len)| *len <= 16 * PAGE_SIZE), "a replay window over 64 KiB");
    for page in (0..set).step_by(97) {
        verify(&ram, SLOW_PATTERN, page * PAGE);
    }
}

/// Waits up to 10 s for replays to have installed `pages` pages.
fn wait_for_count(engine: &Engine, pages: u64) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    while engine.stats().replayed_pages < pages {
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// The fills a source was asked for: (gpa, bytes), in order.
type FillLog = Arc<std::sync::Mutex<Vec<(u64, usize)>>>;

/// A source filling with [`SLOW_PATTERN`] that logs each fill.
fn logged_source() -> (ScriptedSource, FillLog) {
    let fills = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = fills.clone();
    (ScriptedSource::pattern(SLOW_PATTERN).before_fill(move |gpa, len| seen.lock().unwrap().push((gpa.0, len))), fills)
}

fn a_replay_sorts_its_set_by_address_within_slices_of_the_recording(b: Backend) {
    let ram = ram(&[(0, 256)]);
    let (source, fills) = logged_source();
    let engine = builder(b, ram.clone(), Arc::new(source)).start().unwrap();
    // Touched within 5 ms of each other: 6, 4, 5, 3 go in one window, in
    // address order; 20 and 21, 10 ms apart, in two, in recorded order;
    // 40 to 79 within 5 ms: windows of at most 16 pages (64 KiB).
    let mut set: Vec<(u64, u32)> = vec![(6, 0), (4, 1), (5, 1), (3, 2), (21, 8), (20, 18)];
    set.extend((40..80).rev().map(|p| (p, 30)));
    let ws = WorkingSet { pages: set.iter().map(|s| s.0 * PAGE).collect(), at_ms: set.iter().map(|s| s.1).collect() };
    engine.replay(&ws).unwrap();
    assert!(engine.wait_idle(Instant::now() + Duration::from_secs(10)), "the replay did not finish");
    let fills: Vec<(u64, u64)> =
        fills.lock().unwrap().iter().map(|&(gpa, len)| (gpa / PAGE, (len / PAGE_SIZE) as u64)).collect();
    assert_eq!(fills, [(3, 4), (21, 1), (20, 1), (40, 16), (56, 16), (72, 8)], "windows (first page, pages)");
    for &(p, _) in &set {
        verify(&ram, SLOW_PATTERN, p * PAGE);
    }
    let st = settled(&engine);
    assert_eq!(st.faults, 0, "the set was present before it was read: {st:?}");
    assert_eq!(st.replayed_pages, set.len() as u64, "{st:?}");
}

fn a_replay_overtaken_by_demand_goes_on_ahead_and_still_installs_its_whole_set(b: Backend) {
    let ram = ram(&[(0, 1024)]);
    let (source, fills) = logged_source();
    let engine = builder(b, ram.clone(), Arc::new(source))
        .config(apf::Config { max_window: 1, fault_around: 1, ..config(b) })
        .start()
        .unwrap();
    // The guest is ahead of the replay: it has read the set's first eight
    // pages already.
    for p in 0..8 {
        verify(&ram, SLOW_PATTERN, p * PAGE);
    }
    fills.lock().unwrap().clear();
    let set = 600u64;
    engine.replay(&WorkingSet { pages: (0..set).map(|p| p * PAGE).collect(), at_ms: Vec::new() }).unwrap();
    assert!(engine.wait_idle(Instant::now() + Duration::from_secs(10)), "the replay did not finish");
    let fills = fills.lock().unwrap().clone();
    // Four pages in a row taken: it goes on well ahead of the guest
    // rather than to page 8, where the guest is about to fault next.
    let first = fills.first().expect("the replay filled nothing").0 / PAGE;
    assert!(first > 64, "the replay went on at page {first}, right where the guest is");
    // Each page of the set once, the passed-over ones at the end.
    let mut filled: Vec<u64> =
        fills.iter().flat_map(|&(gpa, len)| (0..len as u64 / PAGE).map(move |i| gpa / PAGE + i)).collect();
    assert!(filled.iter().any(|&p| p < first), "the pages passed over were never gone over again");
    filled.sort_unstable();
    assert_eq!(filled, (8..set).collect::<Vec<_>>(), "every missing page of the set filled once");
    assert_eq!(ram.regions()[0].census()[PageState::Present as usize], set as usize);
    assert_eq!(settled(&engine).faults, 8, "only the guest's own reads faulted");
}

/// The nice values of this process's threads named `name`.
fn nice_of_threads(name: &str) -> Vec<i64> {
    let mut nice = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        // A thread that ended meanwhile has no stat left.
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        // Fields after the command, which ends at the last ')': state is
        // field 3, nice field 19.
        let Some(end) = stat.rfind(')') else { continue };
        nice.extend(stat[end + 2..].split(' ').nth(16).and_then(|n| n.parse::<i64>().ok()));
    }
    nice
}

/// A replay's thread runs at the lowest priority: the scheduler serves
/// demand (the event loop, the faulting threads) before it.
#[test]
fn a_replay_runs_at_the_lowest_priority() {
    let ram = ram(&[(0, 64)]);
    let source = Arc::new(ScriptedSource::pattern(SLOW_PATTERN).hold(Fills::Covering(0)));
    let engine = Engine::builder(ram.clone(), source.clone()).start().unwrap();
    engine.replay(&WorkingSet { pages: vec![0], at_ms: Vec::new() }).unwrap();
    assert!(source.wait_held(Duration::from_secs(5)), "the replay never filled");
    let nice = nice_of_threads("apf-replay");
    source.release();
    // Other tests of this process may be starting replays of their own.
    assert!(nice.contains(&19), "no replay thread at nice 19: {nice:?}");
    assert!(engine.wait_idle(Instant::now() + Duration::from_secs(10)));
    verify(&ram, SLOW_PATTERN, 0);
}
