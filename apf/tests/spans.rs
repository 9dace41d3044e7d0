//! A user's own `tracing` layer sees the engine's spans and fields.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use apf::{Engine, GuestAddress, GuestRam, GuestRange, Mode, Pattern};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

mod common;
use common::read_word;

type Fields = HashMap<String, String>;

#[derive(Clone, Default)]
struct Recorder {
    spans: Arc<Mutex<HashMap<u64, (String, Fields)>>>,
}

struct Visitor<'a>(&'a mut Fields);

impl Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        attrs.record(&mut Visitor(&mut fields));
        self.spans.lock().unwrap().insert(id.into_u64(), (attrs.metadata().name().to_string(), fields));
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
        if let Some((_, fields)) = self.spans.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Visitor(fields));
        }
    }
}

#[test]
fn a_users_layer_sees_the_documented_spans_and_fields() {
    let recorder = Recorder::default();
    let subscriber = tracing_subscriber::registry().with(recorder.clone());
    // Scoped, not global: the engine's threads report to the dispatcher
    // current where it started.
    let tid = rustix::thread::gettid().as_raw_nonzero().get();
    tracing::subscriber::with_default(subscriber, || {
        let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0x10_0000), 16 * 4096)]).unwrap());
        let engine = Engine::builder(ram.clone(), Arc::new(Pattern { seed: 1 }))
            .config(apf::Config { max_window: 1, ..apf::Config::default() })
            .start()
            .unwrap();
        let word = read_word(&ram, 0x10_3000);
        assert_eq!(word, 0x10_3000);
        let deadline = || Instant::now() + Duration::from_secs(10);
        let ring = GuestRange::new(GuestAddress(0x10_8000), 2 * 4096);
        let pin = engine.pin(ring, |_| {}).unwrap();
        pin.get(deadline()).unwrap();
        engine.offline(ring, Mode::Migrate, deadline()).unwrap();
        pin.get(deadline()).unwrap();
        drop(pin);
        assert!(engine.wait_idle(deadline()));
        drop(engine);
    });

    let spans = recorder.spans.lock().unwrap();
    let named = |name: &str| -> Vec<&Fields> { spans.values().filter(|(n, _)| n == name).map(|(_, f)| f).collect() };
    let faults: Vec<&Fields> = named(apf::span::FAULT).into_iter().filter(|f| f["gpa"] == "1060864").collect();
    assert_eq!(faults.len(), 1, "{spans:?}");
    let f = faults[0];
    assert_eq!(f["gpa"], (0x10_3000u64).to_string());
    assert_eq!(f["tid"], tid.to_string(), "the faulting thread's id comes from UFFD_FEATURE_THREAD_ID");
    assert_eq!(f["kind"], "read");
    assert_eq!(f["source"], "pattern");
    assert_eq!(f["bytes"], "4096");
    assert_eq!(f["outcome"], "installed");
    assert!(!named(apf::span::INSTALL).is_empty(), "install span: {spans:?}");
    assert!(!named(apf::span::FILL).is_empty(), "fill span: {spans:?}");

    // The pin faulted its ring in twice: at first use and after the offline.
    let pins = named(apf::span::PIN);
    assert_eq!(pins.len(), 2, "{pins:?}");
    for p in &pins {
        assert_eq!((p["gpa"].as_str(), p["len"].as_str(), p["outcome"].as_str()), ("1081344", "8192", "armed"));
    }
    let offlines = named(apf::span::OFFLINE);
    assert_eq!(offlines.len(), 1);
    let o = offlines[0];
    assert_eq!((o["gpa"].as_str(), o["len"].as_str(), o["mode"].as_str()), ("1081344", "8192", "migrate"));
    assert_eq!((o["pins"].as_str(), o["pages"].as_str(), o["outcome"].as_str()), ("1", "2", "done"));
}
