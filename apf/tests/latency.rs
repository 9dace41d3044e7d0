//! LatencyLayer against a source that sleeps known times: the histograms
//! and the blocked time must match what the faulting thread waited.

use std::sync::Arc;
use std::time::{Duration, Instant};

use apf::span::{FAULT, FILL};
use apf::Engine;
use apf::{GuestAddress, GuestRam, LatencyLayer};
use tracing_subscriber::layer::SubscriberExt;

mod common;
use common::{read_word, ScriptedSource};

#[test]
fn histograms_match_the_durations_a_sleeping_source_produces() {
    const PAGES: u64 = 12;
    let sleep = Duration::from_millis(15);
    let layer = LatencyLayer::new();
    let subscriber = tracing_subscriber::registry().with(layer.clone());
    let waited = tracing::subscriber::with_default(subscriber, || {
        let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), 64 * 4096)]).unwrap());
        // One page per fault, so every fault is one fill.
        let engine = Engine::builder(ram.clone(), Arc::new(ScriptedSource::zeros().delay(sleep)))
            .config(apf::Config { max_window: 1, ..apf::Config::default() })
            .start()
            .unwrap();
        layer.register_current_vcpu(3);
        let mut waited = Vec::new();
        for i in 0..PAGES {
            let t = Instant::now();
            let v = read_word(&ram, i * 3 * 4096);
            waited.push(t.elapsed());
            assert_eq!(v, 0);
        }
        assert!(engine.wait_idle(Instant::now() + Duration::from_secs(10)));
        drop(engine);
        waited
    });
    let s = layer.summary();
    let fill = s.span(FILL).expect("fill spans");
    let fault = s.span(FAULT).expect("fault spans");
    assert_eq!((fill.count, fault.count), (PAGES, PAGES));
    // A fill is the sleep plus a little; a fault contains its fill.
    let slack = Duration::from_millis(10);
    assert!(fill.p50 >= sleep && fill.p50 < sleep + slack, "fill p50 {:?}", fill.p50);
    assert!(fill.max < sleep * 4, "fill max {:?}", fill.max);
    assert!(fault.p50 >= fill.p50 && fault.p50 < sleep + slack, "fault p50 {:?}", fault.p50);
    // What the thread saw is at least what the engine measured (time in
    // the kernel before the read is not in the span).
    let seen: Duration = waited.iter().sum();
    let vcpu = &s.vcpus[0];
    assert_eq!((vcpu.vcpu, vcpu.faults), (3, PAGES));
    assert!(vcpu.blocked >= sleep * PAGES as u32, "blocked {:?}", vcpu.blocked);
    assert!(vcpu.blocked <= seen, "blocked {:?} > waited {seen:?}", vcpu.blocked);
    assert_eq!(s.unattributed_faults, 0);

    let curves = layer.curves();
    let (_, points) = curves.iter().find(|(n, _)| *n == FAULT).unwrap();
    assert!(points.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1), "{points:?}");
    assert_eq!(points.last().unwrap().1, fault.max);
}
