//! The test toolkit's scripted source does what its script says: the
//! other tests' failures and races are only as good as it is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use apf::{GuestAddress, PageSource, Pattern, SourceError, PAGE_SIZE};

mod common;
use common::{Failure, Fills, ScriptedSource};

const PAGE: u64 = PAGE_SIZE as u64;

fn fill(source: &ScriptedSource, gpa: u64, pages: usize) -> Result<Vec<u8>, SourceError> {
    let mut buf = vec![0xeeu8; pages * PAGE_SIZE];
    source.fill(GuestAddress(gpa), &mut buf).map(|()| buf)
}

fn errno(r: Result<Vec<u8>, SourceError>) -> Option<i32> {
    match r {
        Err(SourceError::Io { source, .. }) => source.raw_os_error(),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => None,
    }
}

#[test]
fn fills_fail_as_scripted_and_only_successes_are_counted() {
    let pattern = Pattern { seed: 3 };
    let first = ScriptedSource::pattern(pattern).fail(Fills::First(2)).error(Failure::Io(libc::ENOSPC));
    assert_eq!(errno(fill(&first, 0, 1)), Some(libc::ENOSPC));
    assert_eq!(errno(fill(&first, 0, 1)), Some(libc::ENOSPC));
    let page = fill(&first, 0, 1).unwrap();
    assert_eq!(pattern.verify(0, &page), Ok(()));
    assert_eq!((first.calls(), first.fills_of(0)), (3, 1));

    let windows = ScriptedSource::zeros().fail(Fills::Windows);
    assert_eq!(errno(fill(&windows, 0, 2)), Some(libc::EIO), "EIO unless told");
    assert!(fill(&windows, 0, 1).unwrap().iter().all(|&b| b == 0));

    let covering = ScriptedSource::bytes(9).fail(Fills::Covering(3 * PAGE)).error(Failure::NotCovered);
    assert!(matches!(fill(&covering, 2 * PAGE, 2), Err(SourceError::NotCovered(r)) if r.start.0 == 2 * PAGE));
    assert!(fill(&covering, 4 * PAGE, 4).unwrap().iter().all(|&b| b == 9));
    assert_eq!((covering.fills_of(4 * PAGE), covering.fills_of(7 * PAGE), covering.fills_of(3 * PAGE)), (1, 1, 0));

    let switched = ScriptedSource::with(|gpa, buf| buf.fill(gpa.0 as u8 + 1));
    assert_eq!(fill(&switched, 0, 1).unwrap()[0], 1);
    switched.set_failing(true);
    assert_eq!(errno(fill(&switched, 0, 1)), Some(libc::EIO));
    switched.set_failing(false);
    assert!(fill(&switched, 0, 1).is_ok());
}

#[test]
fn a_held_fill_waits_for_its_release_and_no_longer_than_its_limit() {
    let source = Arc::new(ScriptedSource::zeros().hold(Fills::Covering(PAGE)));
    // Fills of other pages pass the closed gate.
    fill(&source, 0, 1).unwrap();
    assert!(!source.held());
    let held = {
        let source = source.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            fill(&source, 0, 2).unwrap();
            t.elapsed()
        })
    };
    assert!(source.wait_held(Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(100));
    assert!(!held.is_finished(), "a held fill went on before its release");
    source.release();
    assert!(held.join().unwrap() >= Duration::from_millis(100));

    // A fill nobody releases goes on at its limit.
    let forgotten = ScriptedSource::zeros().hold(Fills::All).hold_limit(Duration::from_millis(200));
    let t = Instant::now();
    fill(&forgotten, 0, 1).unwrap();
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(5), "took {took:?}");

    // An open gate lets fills through until it is closed.
    let open = ScriptedSource::zeros().hold(Fills::All).gate_open().hold_limit(Duration::from_millis(300));
    let t = Instant::now();
    fill(&open, 0, 1).unwrap();
    assert!(open.held() && t.elapsed() < Duration::from_millis(300));
    open.close();
    let t = Instant::now();
    fill(&open, 0, 1).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300));
}

#[test]
fn delays_and_panics_follow_the_script() {
    let slow = ScriptedSource::zeros().delay(Duration::from_millis(20)).delay_per_page(Duration::from_millis(10));
    let t = Instant::now();
    fill(&slow, 0, 3).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(50), "{:?}", t.elapsed());

    let panicking = Arc::new(ScriptedSource::zeros().panic_on(Fills::First(1)));
    let first = {
        let panicking = panicking.clone();
        std::thread::spawn(move || fill(&panicking, 0, 1).map(|_| ()))
    };
    assert!(first.join().is_err(), "the first fill should have panicked");
    assert!(fill(&panicking, 0, 1).is_ok(), "only the first fill panics");
}
