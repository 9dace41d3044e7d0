//! A user's own `tracing` layer sees the engine's spans and fields.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use apf::ram::{GuestAddress, GuestRam};
use apf::source::Pattern;
use apf::Engine;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

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
fn fault_spans_carry_the_documented_fields() {
    let recorder = Recorder::default();
    let subscriber = tracing_subscriber::registry().with(recorder.clone());
    // Global: the engine's threads must see it too.
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0x10_0000), 16 * 4096)]).unwrap());
    let engine = Engine::builder(ram.clone(), Arc::new(Pattern { seed: 1 })).max_window(1).start().unwrap();
    let p = ram.host_range(GuestAddress(0x10_3000), 8).unwrap();
    // SAFETY: `p` is 8 bytes of guest RAM; the engine installs the page.
    let word = unsafe { std::ptr::read_volatile(p as *const u64) };
    assert_eq!(word, 0x10_3000);
    let tid = rustix::thread::gettid().as_raw_nonzero().get();
    assert!(engine.wait_idle(std::time::Instant::now() + std::time::Duration::from_secs(10)));
    drop(engine);

    let spans = recorder.spans.lock().unwrap();
    let faults: Vec<&Fields> = spans.values().filter(|(n, _)| n == apf::trace::FAULT).map(|(_, f)| f).collect();
    assert_eq!(faults.len(), 1, "{spans:?}");
    let f = faults[0];
    assert_eq!(f["gpa"], (0x10_3000u64).to_string());
    assert_eq!(f["tid"], tid.to_string(), "the faulting thread's id comes from UFFD_FEATURE_THREAD_ID");
    assert_eq!(f["kind"], "read");
    assert_eq!(f["source"], "pattern");
    assert_eq!(f["bytes"], "4096");
    assert_eq!(f["outcome"], "installed");
    assert!(spans.values().any(|(n, _)| n == apf::trace::INSTALL), "install span: {spans:?}");
    assert!(spans.values().any(|(n, _)| n == apf::trace::FILL), "fill span: {spans:?}");
}
