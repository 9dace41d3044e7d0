//! `vmm run`'s latency outputs from a real guest run: the JSON report's
//! latency keys, the SVG plot, the Chrome trace, and the progress-free
//! run without the layer.

use std::time::Duration;

use apf_tests::require_kvm;
use serde_json::Value;
use vmm::config::RunConfig;

/// Checks that `svg` is well-formed XML as far as tags go: every element
/// opened is closed in order, and there is one root.
fn assert_well_formed(svg: &str) {
    let mut stack: Vec<String> = Vec::new();
    let mut roots = 0;
    let mut rest = svg;
    while let Some(i) = rest.find('<') {
        let end = rest[i..].find('>').expect("unclosed tag") + i;
        let tag = &rest[i + 1..end];
        rest = &rest[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop().as_deref(), Some(name.trim()), "mismatched </{name}>");
        } else if !tag.ends_with('/') {
            if stack.is_empty() {
                roots += 1;
            }
            stack.push(tag.split_whitespace().next().unwrap().to_string());
        } else if stack.is_empty() {
            roots += 1;
        }
        assert!(!tag.contains('<'), "a '<' inside a tag: {tag}");
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
    assert_eq!(roots, 1);
}

#[test]
fn json_plot_and_trace_carry_the_latencies() {
    require_kvm!();
    let dir = std::env::temp_dir().join(format!("apf-latency-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (plot, trace) = (dir.join("latency.svg"), dir.join("trace.json"));
    let cfg = RunConfig {
        mem: Some(64 << 20),
        vcpus: Some(2),
        duration: Duration::from_millis(1500),
        offline_every: Some(Duration::from_millis(5)),
        plot: Some(plot.clone()),
        chrome_trace: Some(trace.clone()),
        ..RunConfig::default()
    };
    let report = vmm::vm::run(&cfg).unwrap();
    assert!(report.ok, "{}", report.summary());

    let json: Value = serde_json::from_str(&report.to_json()).expect("the report is JSON");
    let latency = &json["latency_us"];
    // A zero source has nothing to fill: no apf.fill spans.
    assert!(latency.get("apf.fill").is_none(), "{latency}");
    for span in ["apf.fault", "apf.install", "apf.offline", "apf.pin"] {
        let s = &latency[span];
        for key in ["p50", "p90", "p99", "p999", "max"] {
            assert!(s[key].as_f64().is_some_and(|v| v > 0.0), "{span}.{key} in {latency}");
        }
        assert!(s["count"].as_u64().is_some_and(|c| c > 0), "{span}.count");
        assert!(s["p50"].as_f64() <= s["p99"].as_f64() && s["p99"].as_f64() <= s["max"].as_f64());
    }
    let faults = latency["apf.fault"]["count"].as_u64().unwrap();
    let vcpus = json["vcpus"].as_array().unwrap();
    assert_eq!(vcpus.len(), 2);
    let mut attributed = 0;
    for (i, v) in vcpus.iter().enumerate() {
        assert_eq!(v["id"].as_u64(), Some(i as u64));
        assert!(v["blocked_ms"].as_f64().is_some_and(|b| b > 0.0), "{v}");
        attributed += v["faults"].as_u64().unwrap();
    }
    // The VMM's own threads fault too (boot writes, device copies).
    assert_eq!(attributed + json["unattributed_faults"].as_u64().unwrap(), faults);
    assert!(attributed > 0);

    let svg = std::fs::read_to_string(&plot).unwrap();
    assert_well_formed(&svg);
    let series = svg.matches("<polyline class=\"series\"").count();
    assert_eq!(series, latency.as_object().unwrap().len(), "one series per span kind");
    assert!(svg.contains("data-span=\"apf.fault\""));

    let t: Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).expect("the trace is JSON");
    let events = t["traceEvents"].as_array().unwrap();
    let names: std::collections::HashSet<&str> =
        events.iter().filter(|e| e["ph"] == "X").map(|e| e["name"].as_str().unwrap()).collect();
    for want in ["apf.fault", "apf.install", "apf.offline", "apf.pin"] {
        assert!(names.contains(want), "{want} not in {names:?}");
    }
    assert!(events.iter().any(|e| e["ph"] == "M" && e["args"]["name"] == "vcpu0"), "vCPU lanes are named");
    assert_eq!(t["otherData"]["dropped_events"].as_u64(), Some(0));
    let (written, dropped) = report.trace_events.unwrap();
    assert_eq!((written, dropped), (events.iter().filter(|e| e["ph"] == "X").count(), 0));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn without_the_layer_the_report_says_so() {
    require_kvm!();
    let cfg = RunConfig {
        mem: Some(64 << 20),
        vcpus: Some(1),
        duration: Duration::from_millis(300),
        latency: false,
        ..RunConfig::default()
    };
    let report = vmm::vm::run(&cfg).unwrap();
    assert!(report.ok, "{}", report.summary());
    let json: Value = serde_json::from_str(&report.to_json()).unwrap();
    assert!(json["latency_us"].is_null());
    assert!(json["vcpus"][0]["blocked_ms"].is_null());
}

/// A storm run of the guest-storm bench part's shape, small.
fn storm_run() -> RunConfig {
    RunConfig {
        mem: Some(64 << 20),
        vcpus: Some(2),
        duration: Duration::from_millis(800),
        workload: agent_proto::Workload::Sequential,
        offline_every: Some(Duration::from_millis(20)),
        offline_max: 16 << 20,
        guest_offline: false,
        progress: false,
        ..RunConfig::default()
    }
}

#[test]
fn the_guest_view_takes_the_slowest_first_accesses_as_faults() {
    require_kvm!();
    let report = vmm::vm::run(&storm_run()).unwrap();
    assert!(report.ok, "{}", report.summary());
    let json: Value = serde_json::from_str(&report.to_json()).unwrap();
    let view = &json["guest_view"];
    // The guest's counter runs at the rate KVM says (its own clock
    // against the host's over the first pass agrees within 10%).
    let khz = view["tsc_khz"].as_f64().unwrap();
    assert!(khz > 100_000.0, "{view}");
    if let Some(calibrated) = view["tsc_khz_calibrated"].as_f64() {
        assert!((calibrated / khz - 1.0).abs() < 0.1, "KVM says {khz} kHz, the host clock {calibrated}");
    }
    // The first pass timed every page of both stripes once.
    let layout = agent_proto::Layout::new(64 << 20, 2).unwrap();
    let touch = &view["touch"];
    assert_eq!(touch["touches"].as_u64(), Some(2 * layout.stripe_pages), "{touch}");
    let touch_faults = touch["faults"].as_u64().unwrap();
    assert!(touch_faults > 0 && touch_faults < 2 * layout.stripe_pages, "{touch}");
    let (p50, p99, max) =
        (touch["p50_us"].as_f64().unwrap(), touch["p99_us"].as_f64().unwrap(), touch["max_us"].as_f64().unwrap());
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= max, "{touch}");
    // Every fault of a vCPU thread up to its last phase's close, and no
    // more: the slowest N is bounded by the faults the layer saw.
    let latency = report.latency.as_ref().unwrap();
    let vcpu_faults: u64 = latency.vcpus.iter().map(|v| v.faults).sum();
    let all = view["all"]["faults"].as_u64().unwrap();
    assert!(all >= touch_faults && all <= vcpu_faults, "{all} of {vcpu_faults}: {view}");
    assert!(view["stress"]["touches"].as_u64().unwrap() > 0, "later passes are timed: {view}");
    // The storm took the pinned ring: the callback was timed.
    assert!(report.offline.completed > 0, "{}", report.summary());
    assert!(json["pin_callback_us"]["calls"].as_u64().unwrap() >= 1, "{}", json["pin_callback_us"]);
}

#[test]
fn a_guest_storm_run_gives_the_bench_both_views() {
    use apf_bench::guest_storm::{GuestStormRun, StormSpec};
    use apf_bench::GuestPass;
    require_kvm!();
    let storm = StormSpec { every: Duration::from_millis(20), max_bytes: 16 << 20 };
    let run =
        GuestStormRun { bytes: 64 << 20, duration: Duration::from_millis(600), storm: Some(storm), host_block: false };
    let s = vmm::bench::Guests.guest_storm(&run).unwrap();
    let (engine, guest) = (s.engine.unwrap(), s.guest.unwrap());
    assert!(engine.p99_us > 0.0 && engine.p99_us <= engine.max_us, "{s:?}");
    assert!(guest.p99_us > 0.0 && guest.p99_us <= guest.p999_us && guest.p999_us <= guest.max_us, "{s:?}");
    assert!(s.vcpu_faults > 0 && s.vcpu_blocked_us > 0.0, "{s:?}");
    assert!(s.offlines > 0 && s.pin_callback_p99_us.is_some(), "{s:?}");
    assert_eq!(s.host_block, "off");
}
