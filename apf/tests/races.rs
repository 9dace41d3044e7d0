//! The race and failure paths of the fault path, on real userfaultfd:
//! failpoints in our userfaultfd wrapper hold or fail one chosen call while
//! every other call stays real.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apf::failpoints::Op;
use apf::failpoints::{Rule, Switch};
use apf::PAGE_SIZE;
use apf::{Backend, Dispatch, Engine, GuestAddress, GuestRam, Pattern, WorkingSet};

mod common;
use common::{config, discard, read_word, try_read_word, try_write_word, wait_for, within, Fills, ScriptedSource};

const PAGE: u64 = PAGE_SIZE as u64;

fn ram(pages: usize) -> Arc<GuestRam> {
    Arc::new(GuestRam::anonymous(&[(GuestAddress(0), pages * PAGE_SIZE)]).unwrap())
}

/// Lines up the discard/install race of a balloon: an install whose
/// sequence check has passed is held just before its `UFFDIO_COPY`, a
/// thread discards the page, and the page is read once `madvise` returns.
/// Returns (whether `madvise` returned while the install was held, the
/// word read after it returned).
fn discard_racing_an_install(unordered: bool, b: Backend) -> (bool, u64) {
    let ram = ram(64);
    let pattern = Pattern { seed: 3 };
    let engine = Engine::builder(ram.clone(), Arc::new(pattern))
        .config(apf::Config { dispatch: Dispatch::Workers, max_window: 1, ..config(b) })
        .start()
        .unwrap();
    let fp = engine.failpoints().clone();
    fp.switch_off(Switch::UnorderedRemoves, unordered);
    let gpa = 5 * PAGE;
    let host = ram.host_range(GuestAddress(gpa), PAGE).unwrap() as u64;
    fp.arm(Rule::pause(Op::Copy).within(host, host + PAGE));

    // A reader faults the page; its install checks and stops at the gate.
    let reader = {
        let ram = ram.clone();
        std::thread::spawn(move || read_word(&ram, gpa))
    };
    assert!(fp.wait_paused(Duration::from_secs(5)), "the install never reached its COPY");

    // A balloon discards the page meanwhile.
    let discarded = Arc::new(AtomicBool::new(false));
    let discarder = {
        let (ram, discarded) = (ram.clone(), discarded.clone());
        std::thread::spawn(move || {
            discard(&ram, gpa, PAGE);
            discarded.store(true, Ordering::Release);
        })
    };
    let returned_while_held = wait_for(&discarded, Duration::from_millis(if unordered { 5000 } else { 300 }));
    fp.open_gate();
    discarder.join().unwrap();
    let first = reader.join().unwrap();
    // The reader's own read saw the page at some point of the race: the
    // source's contents or zeros are both linearizable for it.
    let mut page = vec![0u8; PAGE_SIZE];
    pattern.write(gpa, &mut page);
    let source_word = u64::from_le_bytes(page[..8].try_into().unwrap());
    assert_ne!(source_word, 0);
    assert!(first == 0 || first == source_word, "reader saw {first:#x}");
    // Now that madvise has returned, the page must read as zeros.
    let after = read_word(&ram, gpa);
    drop(engine);
    (returned_while_held, after)
}

fn a_discard_waits_for_the_install_it_races_and_the_page_reads_zeros(b: Backend) {
    let (returned_while_held, after) = discard_racing_an_install(false, b);
    assert!(!returned_while_held, "madvise returned while an install that checked before it was still pending");
    assert_eq!(after, 0, "stale contents after the discard returned");
}

fn without_the_ordering_the_same_race_leaves_stale_contents(b: Backend) {
    // Proof that the test above can fail: with the ordering switched off,
    // the discard returns at once and the held install lands after it.
    let (returned_while_held, after) = discard_racing_an_install(true, b);
    assert!(returned_while_held, "madvise should not wait without the ordering");
    assert_ne!(after, 0, "the held install should have landed after the discard");
}

fn engine_with(ram: &Arc<GuestRam>, source: Arc<dyn apf::PageSource>, config: apf::Config) -> Engine {
    Engine::builder(ram.clone(), source).config(config).start().unwrap()
}

/// Whether `err` reports the page at `gpa` filled with zeros for a reason
/// `why` accepts.
fn zero_filled(err: &apf::FaultError, gpa: u64, why: impl Fn(&apf::FaultError) -> bool) -> bool {
    matches!(err, apf::FaultError::ZeroFilled { gpa: g, why: w } if g.0 == gpa && why(w))
}

common::on_both_backends!(
    a_discard_waits_for_the_install_it_races_and_the_page_reads_zeros,
    without_the_ordering_the_same_race_leaves_stale_contents,
    a_page_lost_without_a_remove_event_is_poisoned_and_reported_not_zero_filled,
    a_page_discarded_while_its_source_fails_reads_zeros_not_sigbus,
    a_source_panicking_on_a_worker_poisons_its_page_and_the_engine_goes_on,
    a_source_panicking_on_the_event_loop_poisons_its_page_and_the_engine_goes_on,
    a_dead_event_loop_is_noticed_and_no_fault_or_discard_hangs,
    shutdown_leaves_a_stuck_source_behind_and_reports_it,
    every_failure_of_a_fault_path_ioctl_ends_with_the_right_contents,
    a_zeropage_failure_ends_with_zeros,
    neighbours_discarding_and_reading_back_read_zeros,
    a_replay_window_installs_nothing_a_discard_stopped_while_its_fill_ran,
    a_discard_waits_for_the_replay_install_it_races_and_the_page_reads_zeros,
);

fn a_page_lost_without_a_remove_event_is_poisoned_and_reported_not_zero_filled(b: Backend) {
    let ram = ram(16);
    let pattern = Pattern { seed: 9 };
    let engine = engine_with(&ram, Arc::new(pattern), config(b));
    let gpa = 3 * PAGE;
    let before = read_word(&ram, gpa);
    assert_ne!(before, 0);
    // mremap(MREMAP_DONTUNMAP) takes the page's frame away and leaves the
    // old range registered and empty, with no remove event (EVENT_REMAP was
    // not asked for): the kernel has lost a page the engine installed.
    let host = ram.host_range(GuestAddress(gpa), PAGE).unwrap();
    // SAFETY: moves one page of our own private anonymous guest RAM to a
    // new mapping the kernel picks; nothing else refers to the new one.
    let mremap =
        || unsafe { libc::mremap(host.cast(), PAGE_SIZE, PAGE_SIZE, libc::MREMAP_MAYMOVE | libc::MREMAP_DONTUNMAP) };
    // Right after the install the kernel may refuse the move with EINVAL
    // for a few hundred microseconds (seen with some process layouts):
    // try again, briefly.
    let tried = Instant::now();
    let mut moved = mremap();
    while moved == libc::MAP_FAILED
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL)
        && tried.elapsed() < Duration::from_secs(1)
    {
        std::thread::sleep(Duration::from_micros(50));
        moved = mremap();
    }
    assert_ne!(moved, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    // SAFETY: `moved` is the page mremap just made, present and readable.
    assert_eq!(unsafe { std::ptr::read_volatile(moved as *const u64) }, before);
    let r = ram.clone();
    let after = within(Duration::from_secs(5), move || try_read_word(&r, gpa));
    let err = engine.errors().recv_timeout(Duration::from_secs(1)).expect("an error report");
    match b {
        Backend::PrivateAnonymous => {
            assert_eq!(after, None, "a lost page must not read as zeros");
            assert!(
                matches!(err, apf::FaultError::Inconsistent { gpa: g, poisoned: true } if g.0 == gpa),
                "unexpected report: {err}"
            );
        }
        // Without UFFDIO_POISON: zeros, and a report that says so.
        Backend::Limited => {
            assert_eq!(after, Some(0));
            assert!(zero_filled(&err, gpa, |why| matches!(why, apf::FaultError::Inconsistent { poisoned: false, .. })));
        }
    }
    // The rest of guest RAM is served as before.
    assert_eq!(within(Duration::from_secs(5), move || try_read_word(&ram, 4 * PAGE)).map(|w| w != 0), Some(true));
}

/// Unplugs `gpa`'s page under the poison policy, then discards it (the
/// marker is gone, the engine's state stays Offline).
fn unplugged_and_discarded(gpa: u64) -> (Arc<GuestRam>, Engine) {
    let ram = ram(16);
    let config = apf::Config { unplug_policy: apf::UnplugPolicy::Poison, ..apf::Config::default() };
    let engine = engine_with(&ram, Arc::new(Pattern { seed: 1 }), config);
    let range = apf::GuestRange::new(GuestAddress(gpa), PAGE);
    engine.offline(range, apf::Mode::Unplug, Instant::now() + Duration::from_secs(5)).unwrap();
    discard(&ram, gpa, PAGE);
    (ram, engine)
}

#[test]
fn a_poison_refused_with_eagain_is_retried_and_the_thread_gets_sigbus_not_a_hang() {
    let gpa = 2 * PAGE;
    let (ram, engine) = unplugged_and_discarded(gpa);
    engine.failpoints().arm(Rule::new(Op::Poison, libc::EAGAIN).times(3));
    let r = ram.clone();
    assert_eq!(within(Duration::from_secs(5), move || try_read_word(&r, gpa)), None);
    assert_eq!(engine.failpoints().fired(), 3);
    assert!(engine.stats().deferred >= 1, "{:?}", engine.stats());
}

/// A `POISON` that keeps failing for a while is reported once and tried
/// again round by round (not by a thread faulting again at full speed);
/// the thread gets its SIGBUS once it goes in.
#[test]
fn a_poison_that_fails_is_reported_once_and_retried_until_it_goes_in() {
    let gpa = 2 * PAGE;
    let (ram, engine) = unplugged_and_discarded(gpa);
    engine.failpoints().arm(Rule::new(Op::Poison, libc::ENOMEM).times(5));
    let r = ram.clone();
    assert_eq!(within(Duration::from_secs(5), move || try_read_word(&r, gpa)), None);
    assert_eq!(engine.failpoints().fired(), 5);
    let err = engine.errors().recv_timeout(Duration::from_secs(1)).expect("an error report");
    assert!(
        matches!(&err, apf::FaultError::Install { gpa: g, error } if g.0 == gpa && error.errno == libc::ENOMEM),
        "{err}"
    );
    assert!(engine.errors().try_recv().is_none(), "one failing poison, one report");
}

fn a_page_discarded_while_its_source_fails_reads_zeros_not_sigbus(b: Backend) {
    let ram = ram(16);
    // Fails every fill; the first one waits at the gate so that the test
    // can discard the page while it is failing.
    let source = Arc::new(ScriptedSource::zeros().fail(Fills::All).hold(Fills::First(1)));
    // The first failure is final: without the check, the page is poisoned
    // (or zero-filled and reported, on the limited backend).
    let config = apf::Config { fill_retries: 0, max_window: 1, ..config(b) };
    let engine = engine_with(&ram, source.clone(), config);
    let gpa = 6 * PAGE;
    let r = ram.clone();
    let reader = std::thread::spawn(move || try_read_word(&r, gpa));
    assert!(source.wait_held(Duration::from_secs(5)));
    discard(&ram, gpa, PAGE);
    source.release();
    assert_eq!(reader.join().unwrap(), Some(0), "the discarded page must read as zeros");
    assert!(engine.errors().try_recv().is_none(), "nothing failed for good");
}

fn a_panicking_source_poisons_its_page_and_the_engine_goes_on(kind: apf::SourceKind, b: Backend) {
    let ram = ram(64);
    let bad = 9 * PAGE;
    let config = apf::Config { max_window: 1, ..config(b) };
    // Panics when it fills page `bad`; the kind decides where it runs
    // (`Memory`: on the event loop).
    let source = ScriptedSource::pattern(Pattern { seed: 5 }).kind(kind).panic_on(Fills::Covering(bad));
    let engine = engine_with(&ram, Arc::new(source), config);
    let r = ram.clone();
    let read = within(Duration::from_secs(5), move || try_read_word(&r, bad));
    let err = engine.errors().recv_timeout(Duration::from_secs(1)).expect("an error report");
    match b {
        Backend::PrivateAnonymous => {
            assert_eq!(read, None);
            assert!(
                matches!(&err, apf::FaultError::SourcePanicked { gpa, poisoned: true, .. } if gpa.0 == bad),
                "{err}"
            );
        }
        Backend::Limited => {
            assert_eq!(read, Some(0));
            assert!(zero_filled(&err, bad, |why| matches!(
                why,
                apf::FaultError::SourcePanicked { poisoned: false, .. }
            )));
        }
    }
    // Other pages are still served.
    let r = ram.clone();
    assert!(within(Duration::from_secs(5), move || try_read_word(&r, 20 * PAGE)).is_some_and(|w| w != 0));
}

fn a_source_panicking_on_a_worker_poisons_its_page_and_the_engine_goes_on(b: Backend) {
    a_panicking_source_poisons_its_page_and_the_engine_goes_on(apf::SourceKind::Blocking, b);
}

fn a_source_panicking_on_the_event_loop_poisons_its_page_and_the_engine_goes_on(b: Backend) {
    a_panicking_source_poisons_its_page_and_the_engine_goes_on(apf::SourceKind::Memory, b);
}

fn a_dead_event_loop_is_noticed_and_no_fault_or_discard_hangs(b: Backend) {
    let ram = ram(64);
    let engine = engine_with(&ram, Arc::new(Pattern { seed: 2 }), config(b));
    // Without UFFDIO_POISON a page nobody can resolve reads zeros.
    let unresolved = match b {
        Backend::PrivateAnonymous => None,
        Backend::Limited => Some(0),
    };
    let r = ram.clone();
    assert!(within(Duration::from_secs(5), move || try_read_word(&r, 0)).is_some());
    engine.failpoints().switch_off(Switch::EventLoop, true);
    let err = engine.errors().recv_timeout(Duration::from_secs(2)).expect("the death is reported");
    assert!(matches!(err, apf::FaultError::EventLoopDied(_)), "{err}");
    // A fault on a missing page gets SIGBUS (EFAULT here), not a hang...
    let r = ram.clone();
    assert_eq!(within(Duration::from_secs(5), move || try_read_word(&r, 30 * PAGE)), unresolved);
    // ... a present page still reads ...
    let r = ram.clone();
    assert!(within(Duration::from_secs(5), move || try_read_word(&r, 0)).is_some());
    // ... a balloon's discard is let go, and the discarded page does not
    // read stale contents ...
    let r = ram.clone();
    within(Duration::from_secs(5), move || discard(&r, 0, PAGE));
    let r = ram.clone();
    assert_eq!(within(Duration::from_secs(5), move || try_read_word(&r, 0)), unresolved);
    // ... new work is refused, and shutdown ends.
    let range = apf::GuestRange::new(GuestAddress(PAGE), PAGE);
    assert!(engine.offline(range, apf::Mode::Migrate, Instant::now() + Duration::from_secs(1)).is_err());
    let report = within(Duration::from_secs(10), move || engine.shutdown());
    assert_eq!(report.threads_left_behind, 0);
}

fn shutdown_leaves_a_stuck_source_behind_and_reports_it(b: Backend) {
    let ram = ram(64);
    // Never returns from a fill of page 7 while the test runs: held far
    // past the shutdown deadline (and the test), let go only by the hold
    // limit.
    let source =
        Arc::new(ScriptedSource::bytes(1).hold(Fills::Covering(7 * PAGE)).hold_limit(Duration::from_secs(120)));
    let config = apf::Config { max_window: 1, shutdown_deadline: Duration::from_millis(1500), ..config(b) };
    let engine = engine_with(&ram, source.clone(), config);
    let r = ram.clone();
    // The reader stays blocked in its fault: the stuck worker owns it.
    std::thread::spawn(move || try_read_word(&r, 7 * PAGE));
    assert!(source.wait_held(Duration::from_secs(5)));
    let errors = engine.errors().clone();
    let report = within(Duration::from_secs(5), move || engine.shutdown());
    assert_eq!(report.threads_left_behind, 1);
    let err = errors.recv_timeout(Duration::from_secs(1)).expect("reported");
    assert!(matches!(err, apf::FaultError::ThreadsLeftBehind(1)), "{err}");
    // The userfaultfd stays open under the stuck thread, and is still read:
    // a balloon's discard of guest RAM is let go.
    let r = ram.clone();
    within(Duration::from_secs(5), move || discard(&r, 0, 8 * PAGE));
}

#[test]
fn the_baseline_handler_poisons_and_reports_what_it_cannot_install() {
    let ram = ram(16);
    let handler = apf::SinglePageHandler::start(ram.clone(), Arc::new(Pattern { seed: 8 })).unwrap();
    handler.failpoints().arm(Rule::new(Op::Copy, libc::ENOMEM));
    let r = ram.clone();
    assert_eq!(within(Duration::from_secs(5), move || try_read_word(&r, 4 * PAGE)), None, "poisoned, not hung");
    let errors = handler.errors();
    assert!(errors.iter().any(|e| e.contains("0x4000") && e.contains("UFFDIO_COPY")), "{errors:?}");
    // The next page is served as usual.
    let r = ram.clone();
    assert!(within(Duration::from_secs(5), move || try_read_word(&r, 5 * PAGE)).is_some_and(|w| w != 0));
}

/// Reads every page of `[0, pages)` from a thread (bounded) and checks it
/// against the pattern the source serves.
fn all_pages_right(ram: &Arc<GuestRam>, pattern: Pattern, pages: u64) {
    let r = ram.clone();
    let words =
        within(Duration::from_secs(10), move || (0..pages).map(|p| try_read_word(&r, p * PAGE)).collect::<Vec<_>>());
    for (p, w) in words.into_iter().enumerate() {
        let mut page = vec![0u8; PAGE_SIZE];
        pattern.write(p as u64 * PAGE, &mut page);
        assert_eq!(w, Some(u64::from_le_bytes(page[..8].try_into().unwrap())), "page {p}");
    }
}

/// Every failure the fault path's ioctls can report, one call at a time:
/// the faulting thread always gets the right contents, never a hang.
fn every_failure_of_a_fault_path_ioctl_ends_with_the_right_contents(b: Backend) {
    let pattern = Pattern { seed: 12 };
    let cases: Vec<(&str, apf::Dispatch, Vec<Rule>)> = vec![
        ("copy EAGAIN inline", apf::Dispatch::Inline, vec![Rule::new(Op::Copy, libc::EAGAIN).times(3)]),
        ("copy EAGAIN on a worker", apf::Dispatch::Workers, vec![Rule::new(Op::Copy, libc::EAGAIN).times(3)]),
        ("copy ENOMEM", apf::Dispatch::Auto, vec![Rule::new(Op::Copy, libc::ENOMEM)]),
        ("copy EAGAIN after 3 pages", apf::Dispatch::Workers, vec![Rule::new(Op::Copy, libc::EAGAIN).partial(3)]),
        (
            "copy EEXIST after 2 pages",
            apf::Dispatch::Workers,
            vec![Rule::new(Op::Copy, libc::EEXIST).partial(2).skip(1)],
        ),
        (
            "copy ENOMEM and the wake that follows fails",
            apf::Dispatch::Auto,
            vec![Rule::new(Op::Copy, libc::ENOMEM), Rule::new(Op::Wake, libc::EIO)],
        ),
    ];
    for (name, dispatch, rules) in cases {
        let ram = ram(64);
        let config = apf::Config { dispatch, ..config(b) };
        let engine = engine_with(&ram, Arc::new(pattern), config);
        for rule in rules {
            engine.failpoints().arm(rule);
        }
        all_pages_right(&ram, pattern, 64);
        assert!(engine.failpoints().fired() >= 1, "{name}: no failure was injected");
        assert!(engine.wait_idle(Instant::now() + Duration::from_secs(5)), "{name}");
    }
}

fn a_zeropage_failure_ends_with_zeros(b: Backend) {
    for errno in [libc::EAGAIN, libc::ENOMEM] {
        let ram = ram(16);
        let engine = engine_with(&ram, Arc::new(apf::ZeroSource), config(b));
        engine.failpoints().arm(Rule::new(Op::ZeroPage, errno).times(2));
        let r = ram.clone();
        let words =
            within(Duration::from_secs(5), move || (0..16).map(|p| try_read_word(&r, p * PAGE)).collect::<Vec<_>>());
        assert!(words.iter().all(|w| *w == Some(0)), "errno {errno}: {words:?}");
        assert_eq!(engine.failpoints().fired(), 2);
    }
}

/// Threads that each discard their own page and read it back, next to
/// each other: a neighbour's fault-around installs a page between its
/// remove being applied and its `madvise`'s zap. It must read zeros,
/// never poison (the engine must not take that for a lost page).
fn neighbours_discarding_and_reading_back_read_zeros(b: Backend) {
    let ram = ram(64);
    let engine = engine_with(&ram, Arc::new(Pattern { seed: 4 }), config(b));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = [1u64, 2, 5, 6]
        .into_iter()
        .map(|page| {
            let (ram, stop) = (ram.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut rounds, mut bad) = (0u64, Vec::new());
                while !stop.load(Ordering::Relaxed) && bad.len() < 3 {
                    discard(&ram, page * PAGE, PAGE);
                    let w = try_read_word(&ram, page * PAGE);
                    if w != Some(0) {
                        bad.push(w);
                    }
                    rounds += 1;
                }
                (rounds, bad)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let results: Vec<_> = threads.into_iter().map(|h| h.join().unwrap()).collect();
    let rounds: u64 = results.iter().map(|r| r.0).sum();
    assert!(rounds > 1000, "only {rounds} rounds");
    assert!(
        results.iter().all(|r| r.1.is_empty()),
        "{results:?}; errors: {:?}",
        engine.errors().try_iter().take(3).collect::<Vec<_>>()
    );
}

/// A balloon discards a page the offline storm keeps taking out: the page
/// must read zeros after each discard, never the contents it had before.
fn a_discard_during_offlines_wins(mode: apf::Mode) {
    let ram = ram(64);
    let engine = Arc::new(engine_with(&ram, Arc::new(Pattern { seed: 4 }), apf::Config::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let offliner = {
        let (engine, stop) = (engine.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut done = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let range = apf::GuestRange::new(GuestAddress(0), 64 * PAGE);
                done += u64::from(engine.offline(range, mode, Instant::now() + Duration::from_secs(2)).is_ok());
                // Back to back, on a loaded machine, the offlines would
                // starve the writer (its woken fault meets the next one).
                std::thread::sleep(Duration::from_micros(200));
            }
            done
        })
    };
    let started = Instant::now();
    let (mut rounds, mut bad) = (0u64, Vec::new());
    while started.elapsed() < Duration::from_secs(2) && bad.len() < 3 {
        try_write_word(&ram, 10 * PAGE, 0x5a5a_0000_0000 + rounds + 1);
        discard(&ram, 10 * PAGE, PAGE);
        let w = try_read_word(&ram, 10 * PAGE);
        if w != Some(0) {
            bad.push(w);
        }
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let offlines = offliner.join().unwrap();
    assert!(offlines > 10 && rounds > 100, "{offlines} offlines, {rounds} rounds");
    assert!(
        bad.is_empty(),
        "{mode:?}: read {bad:x?} after a discard; errors: {:?}",
        engine.errors().try_iter().take(3).collect::<Vec<_>>()
    );
}

#[test]
fn a_discard_during_migrations_wins() {
    a_discard_during_offlines_wins(apf::Mode::Migrate);
}

#[test]
fn a_discard_during_evictions_wins() {
    a_discard_during_offlines_wins(apf::Mode::Evict);
}

#[test]
fn an_offline_waiting_for_a_reference_whose_holder_faults_on_it_is_not_stalled() {
    let ram = ram(64);
    let engine = Arc::new(engine_with(&ram, Arc::new(Pattern { seed: 3 }), apf::Config::default()));
    let range = apf::GuestRange::new(GuestAddress(8 * PAGE), 4 * PAGE);
    let (go_read, read_now) = std::sync::mpsc::channel::<()>();
    let (took, has_ref) = std::sync::mpsc::channel::<()>();
    let holder = {
        let (engine, ram) = (engine.clone(), ram.clone());
        std::thread::spawn(move || {
            let guard = engine.page_ref(range, Instant::now() + Duration::from_secs(5)).unwrap();
            // A balloon takes a page from under the reference...
            discard(&ram, 9 * PAGE, PAGE);
            took.send(()).unwrap();
            read_now.recv().unwrap();
            // ... and the holder touches it while an offline waits for it.
            let started = Instant::now();
            let word = try_read_word(&ram, 9 * PAGE);
            drop(guard);
            (word, started.elapsed())
        })
    };
    has_ref.recv_timeout(Duration::from_secs(5)).unwrap();
    let offline = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            (engine.offline(range, apf::Mode::Migrate, Instant::now() + Duration::from_secs(10)), started.elapsed())
        })
    };
    // Let the offline reach its wait for the reference.
    std::thread::sleep(Duration::from_millis(200));
    go_read.send(()).unwrap();
    let (result, took_offline) = offline.join().unwrap();
    let (word, took_read) = holder.join().unwrap();
    // The offline held nothing while it drained: the holder's fault was
    // served, it let go, and the offline went on.
    assert!(result.is_ok(), "{result:?}");
    assert!(took_offline < Duration::from_secs(2), "the offline waited {took_offline:?}");
    assert!(took_read < Duration::from_secs(5), "the holder waited {took_read:?}");
    assert_eq!(word, Some(0), "the discarded page reads as zeros");
}

#[test]
fn a_page_discarded_while_its_source_panics_reads_zeros_not_sigbus() {
    let ram = ram(16);
    // Panics on its first fill, after waiting at the gate.
    let source = Arc::new(ScriptedSource::pattern(Pattern { seed: 1 }).hold(Fills::First(1)).panic_on(Fills::First(1)));
    let config = apf::Config { max_window: 1, ..apf::Config::default() };
    let engine = engine_with(&ram, source.clone(), config);
    let gpa = 6 * PAGE;
    let r = ram.clone();
    let reader = std::thread::spawn(move || try_read_word(&r, gpa));
    assert!(source.wait_held(Duration::from_secs(5)));
    discard(&ram, gpa, PAGE);
    source.release();
    assert_eq!(reader.join().unwrap(), Some(0), "the discarded page must read as zeros");
    let err = engine.errors().recv_timeout(Duration::from_secs(1)).expect("the panic is reported");
    assert!(matches!(err, apf::FaultError::SourcePanicked { poisoned: false, .. }), "{err}");
}

/// A remove is applied when its event is read, and its `madvise` zaps only
/// after that. A window installed in between meets the doomed contents
/// (`EEXIST`); taking them for the page's own would let an eviction keep
/// them past the discard (found by the stress: a write read back after a
/// discard that had returned). Here the remove is applied with its zap held
/// off for good, as if its `madvise` never got to run again.
#[test]
fn contents_a_discard_has_not_zapped_yet_are_not_the_pages_own() {
    let ram = ram(16);
    let config = apf::Config { fault_around: 8, max_window: 8, dispatch: Dispatch::Inline, ..Default::default() };
    let engine = engine_with(&ram, Arc::new(Pattern { seed: 6 }), config);
    // Page 4 gets contents of its own; its neighbours are discarded for
    // real (their zaps done), so a fault on page 0 installs a block over
    // all eight.
    try_write_word(&ram, 4 * PAGE, 0xdead_beef);
    assert_eq!(try_read_word(&ram, 4 * PAGE), Some(0xdead_beef));
    discard(&ram, 0, 4 * PAGE);
    discard(&ram, 5 * PAGE, 11 * PAGE);
    // A discard of page 4: its remove event is read and applied, its zap
    // is still to come ...
    let region = &ram.regions()[0];
    region.unstable_mark_removed(4);
    // ... and a fault-around block installs over it first.
    assert_eq!(read_word(&ram, 0), 0);
    // (The faulting thread can run before the engine has marked the block.)
    let by = Instant::now() + Duration::from_secs(5);
    while region.state(4).0 == apf::PageState::Resolving && Instant::now() < by {
        std::thread::yield_now();
    }
    assert_eq!(region.state(4).0, apf::PageState::Missing, "doomed contents taken for the page's own");
    // An eviction now must not keep them: the page reads zeros after it.
    let range = apf::GuestRange::new(GuestAddress(0), 8 * PAGE);
    engine.offline(range, apf::Mode::Evict, Instant::now() + Duration::from_secs(5)).unwrap();
    assert_eq!(try_read_word(&ram, 4 * PAGE), Some(0));
    assert!(engine.errors().try_iter().next().is_none());
}

/// A source whose fills of page 0 wait at the gate (closed from the start)
/// until the test releases them.
fn gated_first_page() -> ScriptedSource {
    ScriptedSource::pattern(Pattern { seed: 8 }).hold(Fills::Covering(0))
}

/// A thread holding a short-term reference faults while an offline that
/// waits for that reference begins: the scene the tests below stage with a
/// source whose fill of page 0 is held until the offline has begun.
struct HolderScene {
    config: apf::Config,
    /// The page the holder references.
    referenced: u64,
    /// The page it then reads while holding the reference.
    reads: u64,
    /// Another thread's fault on page 0 claims it (and its window) first.
    other_faults_first: bool,
    /// The offline's pages (first, count); an evict with a 3 s deadline.
    offline: (u64, u64),
}

/// What came of a [`HolderScene`].
struct HolderSceneEnd {
    offline: Result<apf::OfflineReport, apf::OfflineError>,
    took: Duration,
    holder_read: u64,
    other_read: Option<u64>,
}

fn holder_scene(scene: HolderScene) -> HolderSceneEnd {
    let ram = ram(16);
    // Fills of page 0 pass until the gate closes, once the holder has its
    // reference.
    let source = Arc::new(gated_first_page().gate_open());
    let engine = engine_with(&ram, source.clone(), scene.config);
    let range = |first: u64, pages: u64| apf::GuestRange::new(GuestAddress(first * PAGE), pages * PAGE);
    let (referenced, go) = (AtomicBool::new(false), AtomicBool::new(false));
    let end = std::thread::scope(|s| {
        let holder = s.spawn(|| {
            let r = engine.page_ref(range(scene.referenced, 1), Instant::now() + Duration::from_secs(5)).unwrap();
            referenced.store(true, Ordering::SeqCst);
            assert!(wait_for(&go, Duration::from_secs(5)));
            let w = read_word(&ram, scene.reads * PAGE);
            drop(r);
            w
        });
        assert!(wait_for(&referenced, Duration::from_secs(5)));
        source.close();
        let other = scene.other_faults_first.then(|| {
            let other = s.spawn(|| read_word(&ram, 0));
            assert!(source.wait_held(Duration::from_secs(5)));
            other
        });
        // The holder faults (on the claimed page, or on page 0 itself).
        go.store(true, Ordering::SeqCst);
        if other.is_some() {
            std::thread::sleep(Duration::from_millis(50));
        } else {
            assert!(source.wait_held(Duration::from_secs(5)));
        }
        let offline = s.spawn(|| {
            let started = Instant::now();
            let (first, pages) = scene.offline;
            let res = engine.offline(range(first, pages), apf::Mode::Evict, Instant::now() + Duration::from_secs(3));
            (res, started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        source.release();
        let (offline, took) = offline.join().unwrap();
        HolderSceneEnd {
            offline,
            took,
            holder_read: holder.join().unwrap(),
            other_read: other.map(|o| o.join().unwrap()),
        }
    });
    assert!(engine.errors().try_iter().next().is_none());
    end
}

/// A thread holding a reference faults on a page of someone else's window
/// (its fault is deduped onto that window's job), and an offline of a range
/// under the reference begins and overlaps the window: the window's job
/// waits for the offline, the offline for the reference, the reference's
/// holder for the window. Only the faulting page of a window may wait for
/// an invalidation: the rest goes back, and the holder gets its page, lets
/// go, and the offline goes on, well before its deadline.
#[test]
fn a_reference_holder_waiting_on_a_window_an_offline_holds_does_not_stall_the_offline() {
    // The holder references page 10 (its block, pages 8 to 15, is
    // installed) and reads page 5 of the window another fault claimed
    // (pages 0 to 7); the offline of pages 7 to 11 overlaps both.
    let end = holder_scene(HolderScene {
        config: apf::Config { fault_around: 8, dispatch: Dispatch::Workers, ..Default::default() },
        referenced: 10,
        reads: 5,
        other_faults_first: true,
        offline: (7, 5),
    });
    assert!(end.offline.is_ok(), "{:?}", end.offline);
    assert!(end.took < Duration::from_secs(2), "the offline waited {:?} for the holder", end.took);
    assert_eq!(end.holder_read, Pattern { seed: 8 }.word_at(5 * PAGE, 0));
    assert_eq!(end.other_read, Some(Pattern { seed: 8 }.word_at(0, 0)));
}

/// An unplug finds pages claimed by a window's job and, as it takes them,
/// the job gives them back (it waits with its faulting page only). Their
/// next claim must fill what the unplug left (zeros, or poison under the
/// poison policy), not the source's contents it discarded; and a replug of
/// them, before anything touched them, brings zeros.
fn pages_given_back_during_an_unplug(policy: apf::UnplugPolicy, replug: bool) {
    let ram = ram(16);
    let source = Arc::new(gated_first_page());
    let config =
        apf::Config { fault_around: 8, dispatch: Dispatch::Workers, unplug_policy: policy, ..Default::default() };
    let engine = engine_with(&ram, source.clone(), config);
    let fp = engine.failpoints().clone();
    let region = &ram.regions()[0];
    // Pages 4 to 8: page 8 is installed first (with its block, 8 to 15),
    // so that the take-out has a page to move and can be held there.
    let unplugged = apf::GuestRange::new(GuestAddress(4 * PAGE), 5 * PAGE);
    assert_eq!(read_word(&ram, 8 * PAGE), Pattern { seed: 8 }.word_at(8 * PAGE, 0));
    std::thread::scope(|s| {
        // A fault on page 0: its job claims pages 0 to 7 and waits in the
        // fill of page 0.
        let first = s.spawn(|| read_word(&ram, 0));
        assert!(source.wait_held(Duration::from_secs(5)));
        // An unplug of pages 4 to 8, held at its take-out.
        fp.arm(Rule::pause(Op::Move));
        let unplug = s.spawn(|| engine.offline(unplugged, apf::Mode::Unplug, Instant::now() + Duration::from_secs(5)));
        assert!(fp.wait_paused(Duration::from_secs(5)), "the unplug never took its pages out");
        // The job's fill ends, its install finds the unplug, and it gives
        // pages 1 to 7 back.
        source.release();
        let by = Instant::now() + Duration::from_secs(5);
        while region.state(4).0 != apf::ram::PageState::Missing && Instant::now() < by {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(region.state(4).0, apf::ram::PageState::Missing, "the job did not give page 4 back");
        fp.open_gate();
        unplug.join().unwrap().unwrap();
        assert_eq!(first.join().unwrap(), Pattern { seed: 8 }.word_at(0, 0));
    });
    if replug {
        engine.replug(unplugged).unwrap();
    }
    let want = if policy == apf::UnplugPolicy::Poison && !replug { None } else { Some(0) };
    for p in 4..9 {
        assert_eq!(try_read_word(&ram, p * PAGE), want, "page {p} after its unplug ({policy:?}, replug: {replug})");
    }
    assert_eq!(try_read_word(&ram, 3 * PAGE), Some(Pattern { seed: 8 }.word_at(3 * PAGE, 0)));
    assert!(engine.errors().try_iter().next().is_none());
}

#[test]
fn pages_given_back_during_an_unplug_read_zeros_after_it() {
    pages_given_back_during_an_unplug(apf::UnplugPolicy::Zero, false);
}

#[test]
fn pages_given_back_during_a_poisoning_unplug_read_poison_then_zeros_after_a_replug() {
    pages_given_back_during_an_unplug(apf::UnplugPolicy::Poison, false);
    pages_given_back_during_an_unplug(apf::UnplugPolicy::Poison, true);
}

/// A failed fill is not counted against the retries when an invalidation
/// of its window came meanwhile (the failure may be the invalidation's
/// doing), but not for ever: under an endless stream of offlines a source
/// that always fails still ends in poison and a report.
#[test]
fn a_failing_source_under_an_offline_storm_still_ends() {
    let ram = ram(16);
    let config = apf::Config {
        fault_around: 1,
        max_window: 1,
        dispatch: Dispatch::Workers,
        retry_backoff: Duration::from_micros(100),
        ..Default::default()
    };
    // Always fails, each time only after a whole offline has begun and
    // ended since it was called (so every failed fill overlaps an
    // invalidation of its page).
    let offlines = Arc::new(AtomicU64::new(0));
    let seen_by_fills = offlines.clone();
    let source = ScriptedSource::zeros().fail(Fills::All).before_fill(move |_, _| {
        let seen = seen_by_fills.load(Ordering::SeqCst);
        let until = Instant::now() + Duration::from_secs(1);
        while seen_by_fills.load(Ordering::SeqCst) < seen + 2 && Instant::now() < until {
            std::thread::yield_now();
        }
    });
    let engine = engine_with(&ram, Arc::new(source), config);
    let done = AtomicBool::new(false);
    let (read, took) = std::thread::scope(|s| {
        s.spawn(|| {
            let range = apf::GuestRange::new(GuestAddress(3 * PAGE), PAGE);
            let until = Instant::now() + Duration::from_secs(10);
            while !done.load(Ordering::SeqCst) && Instant::now() < until {
                let _ = engine.offline(range, apf::Mode::Migrate, Instant::now() + Duration::from_secs(1));
                offlines.fetch_add(1, Ordering::SeqCst);
            }
        });
        let started = Instant::now();
        let read = try_read_word(&ram, 3 * PAGE);
        done.store(true, Ordering::SeqCst);
        (read, started.elapsed())
    });
    assert_eq!(read, None, "a page its source cannot fill is poisoned");
    assert!(took < Duration::from_secs(5), "the fault took {took:?}");
    let errors: Vec<_> = engine.errors().try_iter().collect();
    assert!(errors.iter().any(|e| matches!(e, apf::FaultError::SourceFailed { poisoned: true, .. })), "{errors:?}");
}

/// A thread holding a reference faults on a page whose fill is under way
/// on the event loop; an offline over both begins and waits for the
/// reference. It holds nothing while it waits, so the fill's install goes
/// in, the holder lets go, and the offline goes on well before its
/// deadline.
#[test]
fn an_offline_waiting_for_a_holder_whose_fill_is_under_way_on_the_event_loop_is_not_stalled() {
    let end = holder_scene(HolderScene {
        config: apf::Config { fault_around: 1, max_window: 1, dispatch: Dispatch::Inline, ..Default::default() },
        referenced: 1,
        reads: 0,
        other_faults_first: false,
        offline: (0, 2),
    });
    assert!(end.took < Duration::from_secs(1), "the offline waited {:?} for the holder: {:?}", end.took, end.offline);
    assert!(end.offline.is_ok(), "{:?}", end.offline);
    assert_eq!(end.holder_read, Pattern { seed: 8 }.word_at(0, 0));
}

/// A thread holding a reference faults on a page another thread's fault
/// has claimed (its fault is deduped onto that job) before an offline over
/// both begins and waits for the reference. The job's install does not
/// wait for an offline that only drains: the holder gets its page, lets
/// go, and the offline goes on.
#[test]
fn an_offline_waiting_for_a_holder_deduped_onto_a_claimed_page_is_not_stalled() {
    let end = holder_scene(HolderScene {
        config: apf::Config { fault_around: 1, max_window: 1, dispatch: Dispatch::Workers, ..Default::default() },
        referenced: 1,
        reads: 0,
        other_faults_first: true,
        offline: (0, 2),
    });
    assert!(end.took < Duration::from_secs(1), "the offline waited {:?} for the holder: {:?}", end.took, end.offline);
    assert!(end.offline.is_ok(), "{:?}", end.offline);
    assert_eq!(end.holder_read, Pattern { seed: 8 }.word_at(0, 0));
    assert_eq!(end.other_read, Some(Pattern { seed: 8 }.word_at(0, 0)));
}

/// The working set of the replay tests below: pages 10, 8 and 9, touched
/// within a few milliseconds, which a replay installs in one window.
fn set_of_one_window() -> WorkingSet {
    WorkingSet { pages: vec![10 * PAGE, 8 * PAGE, 9 * PAGE], at_ms: vec![0, 1, 2] }
}

fn pattern_word(pattern: Pattern, gpa: u64) -> u64 {
    let mut page = vec![0u8; PAGE_SIZE];
    pattern.write(gpa, &mut page);
    u64::from_le_bytes(page[..8].try_into().unwrap())
}

fn a_replay_window_installs_nothing_a_discard_stopped_while_its_fill_ran(b: Backend) {
    let ram = ram(64);
    let pattern = Pattern { seed: 13 };
    let fills = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = fills.clone();
    // The replay's window is held in its fill while the balloon discards
    // two of its pages.
    let source = Arc::new(
        ScriptedSource::pattern(pattern)
            .hold(Fills::Covering(9 * PAGE))
            .before_fill(move |gpa, len| seen.lock().unwrap().push((gpa.0, len))),
    );
    let engine = engine_with(&ram, source.clone(), config(b));
    engine.replay(&set_of_one_window()).unwrap();
    assert!(source.wait_held(Duration::from_secs(5)), "the replay never filled its window");
    assert_eq!(*fills.lock().unwrap(), [(8 * PAGE, 3 * PAGE_SIZE)], "one window of the set");
    discard(&ram, 9 * PAGE, 2 * PAGE);
    source.release();
    assert!(engine.wait_idle(Instant::now() + Duration::from_secs(10)), "the replay did not finish");
    assert_eq!(read_word(&ram, 8 * PAGE), pattern_word(pattern, 8 * PAGE));
    assert_eq!(read_word(&ram, 9 * PAGE), 0, "page 9 was installed from the source after its discard");
    assert_eq!(read_word(&ram, 10 * PAGE), 0, "page 10 was installed from the source after its discard");
    assert!(engine.errors().try_recv().is_none());
}

fn a_discard_waits_for_the_replay_install_it_races_and_the_page_reads_zeros(b: Backend) {
    let ram = ram(64);
    let pattern = Pattern { seed: 14 };
    let engine = engine_with(&ram, Arc::new(pattern), config(b));
    let fp = engine.failpoints().clone();
    let host = ram.host_range(GuestAddress(9 * PAGE), PAGE).unwrap() as u64;
    // The window's install has passed its sequence check and stops just
    // before its `UFFDIO_COPY`.
    fp.arm(Rule::pause(Op::Copy).within(host, host + PAGE));
    engine.replay(&set_of_one_window()).unwrap();
    assert!(fp.wait_paused(Duration::from_secs(5)), "the replay's install never reached its COPY");
    let discarded = Arc::new(AtomicBool::new(false));
    let discarder = {
        let (ram, discarded) = (ram.clone(), discarded.clone());
        std::thread::spawn(move || {
            discard(&ram, 9 * PAGE, PAGE);
            discarded.store(true, Ordering::Release);
        })
    };
    let returned_while_held = wait_for(&discarded, Duration::from_millis(300));
    fp.open_gate();
    discarder.join().unwrap();
    assert!(!returned_while_held, "madvise returned while the replay's checked install was pending");
    assert_eq!(read_word(&ram, 9 * PAGE), 0, "stale contents in page 9 after the discard returned");
    assert!(engine.wait_idle(Instant::now() + Duration::from_secs(10)), "the replay did not finish");
    assert_eq!(read_word(&ram, 8 * PAGE), pattern_word(pattern, 8 * PAGE));
    assert_eq!(read_word(&ram, 10 * PAGE), pattern_word(pattern, 10 * PAGE));
}
