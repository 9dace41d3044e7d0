//! What the engine keeps grows with guest RAM, never with time: the
//! working set, replay threads, the eviction store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use apf::{Engine, EngineError, GuestAddress, GuestRam, GuestRange, Pattern, WorkingSet, MAX_REPLAYS, PAGE_SIZE};

mod common;
use common::{discard, read_word, ScriptedSource};

const PAGE: u64 = PAGE_SIZE as u64;

fn ram(pages: usize) -> Arc<GuestRam> {
    Arc::new(GuestRam::anonymous(&[(GuestAddress(0), pages * PAGE_SIZE)]).unwrap())
}

#[test]
fn the_working_set_records_first_touches_once_in_order() {
    let ram = ram(32);
    let engine = Engine::builder(ram.clone(), Arc::new(Pattern { seed: 4 }))
        .config(apf::Config { max_window: 1, record_working_set: true, ..apf::Config::default() })
        .start()
        .unwrap();
    let order = [5u64, 3, 17, 9];
    for round in 0..50 {
        for &p in &order {
            read_word(&ram, p * PAGE);
        }
        if round % 2 == 0 {
            discard(&ram, 0, 32 * PAGE);
        }
    }
    let ws = engine.working_set();
    // Fault-around is off (max_window 1): exactly the pages touched, each
    // once, in the order first touched, however often they faulted again.
    assert_eq!(ws.pages, order.iter().map(|p| p * PAGE).collect::<Vec<_>>());
    assert!(engine.stats().faults >= 25 * order.len() as u64, "{:?}", engine.stats());
}

/// Slow enough that replays are still running when the test looks.
fn slow() -> ScriptedSource {
    ScriptedSource::pattern(Pattern { seed: 1 }).delay(Duration::from_millis(20))
}

#[test]
fn finished_replays_are_pruned_and_running_ones_bounded() {
    let ram = ram(256);
    let engine = Engine::builder(ram.clone(), Arc::new(slow()))
        .config(apf::Config { max_window: 1, ..apf::Config::default() })
        .start()
        .unwrap();
    // Each replay's pages are installed one at a time, 20 ms each.
    let ws = |first: u64| WorkingSet { pages: (first..first + 8).map(|p| p * PAGE).collect(), at_ms: Vec::new() };
    for i in 0..MAX_REPLAYS as u64 {
        engine.replay(&ws(i * 8)).unwrap();
    }
    assert!(matches!(engine.replay(&ws(100)), Err(EngineError::Busy(_))));
    assert!(engine.wait_idle(Instant::now() + Duration::from_secs(10)));
    // Finished replays do not count, however many ran before.
    for i in 0..3 * MAX_REPLAYS as u64 {
        engine.replay(&ws(128 + (i % 8) * 8)).unwrap();
        assert!(engine.wait_idle(Instant::now() + Duration::from_secs(10)));
    }
}

#[test]
fn discarding_evicted_pages_drops_their_stored_copies() {
    let ram = ram(64);
    let engine = Engine::builder(ram.clone(), Arc::new(Pattern { seed: 6 })).start().unwrap();
    for p in 0..16 {
        read_word(&ram, p * PAGE);
    }
    let range = GuestRange::new(GuestAddress(0), 16 * PAGE);
    let report = engine.offline(range, apf::Mode::Evict, Instant::now() + Duration::from_secs(5)).unwrap();
    assert_eq!(report.pages_evicted, 16);
    assert_eq!(engine.store().len(), 16);
    // A balloon takes the evicted (missing) pages: their contents are zeros
    // now, and the stored copies must go.
    discard(&ram, 0, 16 * PAGE);
    // `madvise` returns once the engine has read the remove event; it
    // applies it right after, before it handles any later fault.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !engine.store().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(engine.store().len(), 0);
    for p in 0..16 {
        assert_eq!(read_word(&ram, p * PAGE), 0);
    }
}
