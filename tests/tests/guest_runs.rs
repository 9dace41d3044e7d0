//! The guest agent under real KVM, with RAM demand-faulted by the engine:
//! stress with host offline storms, the guest's own offline requests, the
//! checksum device's migratable pin, snapshots saved and restored, and a
//! real host memory block offlined under a running guest. Every run checks
//! every byte the guest wrote.

use std::path::PathBuf;
use std::time::Duration;

use agent_proto::{Layout, Workload, PAGE_SIZE};
use apf_tests::{assert_offlines_accounted, require_kvm};
use vmm::config::{Backend, OfflineMode, RunConfig};
use vmm::report::{Report, VcpuExit};
use vmm::snapshot::SnapshotError;
use vmm::vm::VmError;

/// One guest run at a time: each wants both cores of these machines, and
/// runs sharing them measure the machine, not the engine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_alone(cfg: &RunConfig) -> Result<vmm::report::Report, vmm::vm::VmError> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    vmm::vm::run(cfg)
}

fn short(mem: u64, duration_ms: u64) -> RunConfig {
    RunConfig {
        mem: Some(mem),
        vcpus: Some(2),
        duration: Duration::from_millis(duration_ms),
        grace: Duration::from_secs(60),
        ..RunConfig::default()
    }
}

fn assert_clean(report: &Report) {
    assert!(report.ok, "run failed:\n{}", report.summary());
    assert_eq!(report.guest.corrupt_pages, 0);
    assert_eq!(report.guest.checksum_errors, 0);
    assert!(report.guest.passes >= 2, "{}", report.summary());
    assert!(report.guest.pages_verified > 0);
    assert_eq!(report.pins_leaked, 0);
    assert_offlines_accounted(report);
    assert!(
        report.vcpus.iter().all(|v| matches!(v.exit, VcpuExit::Halted) && v.counters.is_some()),
        "{:?}",
        report.vcpus
    );
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("apf-guest-runs-{}-{name}", std::process::id()))
}

#[test]
fn mixed_run_under_offline_storms_loses_nothing() {
    require_kvm!();
    let cfg = RunConfig { offline_every: Some(Duration::from_millis(2)), ..short(128 << 20, 2500) };
    let report = run_alone(&cfg).unwrap();
    assert_clean(&report);
    assert!(report.faults > 0);
    let storm = report.offline.requests - report.offline.guest_requested;
    assert!(storm >= 20, "only {storm} storm offlines: {}", report.summary());
    assert!(report.offline.completed >= 20, "{}", report.summary());
    // Migrations and evictions both ran, and the guest never noticed.
    assert!(report.engine_json.contains("\"frames_moved\":") && !report.engine_json.contains("\"frames_moved\":0,"));
    assert!(!report.engine_json.contains("\"pages_evicted\":0,"), "{}", report.engine_json);
    let json = report.to_json();
    for key in ["\"ok\":true", "\"corrupt_pages\":0", "\"leaked\":0", "\"errors\":[]"] {
        assert!(json.contains(key), "{key} missing from {json}");
    }
}

#[test]
fn guest_requested_offlines_round_trip() {
    require_kvm!();
    // No host storm: every offline is the guest's own, and none overlaps.
    let cfg = RunConfig { offline_every: None, checksum: false, ..short(64 << 20, 1500) };
    let report = run_alone(&cfg).unwrap();
    assert_clean(&report);
    let g = &report.guest;
    assert!(g.offline_requests >= 6, "{}", report.summary());
    assert_eq!(g.offline_failed, 0, "{}", report.summary());
    assert_eq!(report.offline.guest_requested, g.offline_requests);
    assert_eq!(report.offline.completed, report.offline.requests);
    // Unplug and replug ran: unplugged pages read back as zeros and were
    // rewritten before the next verify.
    assert!(!report.engine_json.contains("\"pages_unplugged\":0,"), "{}", report.engine_json);
}

#[test]
fn balloon_discards_read_as_zeros_under_storms() {
    require_kvm!();
    // A storm that migrates and evicts under the balloon: the discards race
    // installs and evictions of the same pages.
    let cfg = RunConfig { offline_every: Some(Duration::from_millis(2)), ..short(64 << 20, 2000) };
    let report = run_alone(&cfg).unwrap();
    assert_clean(&report);
    let b = report.balloon;
    assert!(b.discards > 0, "{}", report.summary());
    assert!(b.pages_verified_zero > 0, "{}", report.summary());
    assert_eq!(b.stale, 0, "{}", report.summary());
    assert_eq!(b.discards, report.guest.balloon_discards, "VMM and guest disagree: {}", report.summary());
    // The guest checked every page the VMM discarded.
    assert_eq!(b.pages_verified_zero + b.stale, b.pages_discarded, "{}", report.summary());
    // Each discard reached the engine as a remove event.
    assert!(!report.engine_json.contains("\"removes\":0,"), "{}", report.engine_json);
    let json = report.to_json();
    assert!(json.contains(&format!("\"balloon\":{{\"discards\":{},", b.discards)), "{json}");
    assert!(json.contains("\"stale\":0}"), "{json}");
    assert!(report.summary().contains("balloon:"), "{}", report.summary());
}

#[test]
fn checksum_device_keeps_its_pin_through_storms() {
    require_kvm!();
    // Every fourth storm offline hits the ring the device pins.
    let cfg = RunConfig {
        offline_every: Some(Duration::from_millis(1)),
        offline_mode: OfflineMode::Migrate,
        guest_offline: false,
        ..short(64 << 20, 2000)
    };
    let report = run_alone(&cfg).unwrap();
    assert_clean(&report);
    assert!(report.guest.checksums >= 8, "{}", report.summary());
    assert_eq!(report.checksums, report.guest.checksums, "device and guest disagree");
    assert!(report.pin_invalidations >= 5, "{}", report.summary());
    assert!(report.pin_refaults >= 1, "{}", report.summary());
    assert_eq!(report.pins_leaked, 0);
}

#[test]
fn snapshot_restores_on_demand_and_verifies() {
    require_kvm!();
    let path = temp("snap");
    let save = RunConfig { save_snapshot: Some(path.clone()), seed: Some(77), ..short(64 << 20, 1000) };
    let first = run_alone(&save).unwrap();
    assert_clean(&first);
    assert_eq!(first.snapshot_saved.as_deref(), Some(path.to_str().unwrap()));

    // The restored guest verifies the previous run's data before writing.
    let restore = RunConfig { restore: Some(path.clone()), mem: None, vcpus: None, ..short(0, 500) };
    let second = run_alone(&restore).unwrap();
    assert_clean(&second);
    assert_eq!(second.seed, 77, "the seed comes from the snapshot");
    assert_eq!(second.restored, Some((path.display().to_string(), true)));

    // One flipped byte in a data page of the file is found and named.
    let header = vmm::snapshot::open(&path).unwrap();
    let layout = Layout::new(64 << 20, 2).unwrap();
    let victim = layout.stripe_start(1) + 5 * PAGE_SIZE;
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(header.ram_offset() + victim + 100) as usize] ^= 0x40;
    let bad = temp("snap-bad");
    std::fs::write(&bad, &bytes).unwrap();
    let third = run_alone(&RunConfig { restore: Some(bad.clone()), ..restore.clone() }).unwrap();
    assert!(!third.ok);
    assert_eq!(third.guest.corrupt_pages, 1, "{}", third.summary());
    assert!(third.errors.iter().any(|e| e.contains(&format!("corrupt page {victim:#x}"))), "{:?}", third.errors);

    // Files that do not match are refused before anything runs.
    std::fs::write(&bad, &bytes[..bytes.len() - 4096]).unwrap();
    assert!(matches!(run_alone(&restore_from(&bad)), Err(VmError::Snapshot(SnapshotError::Length { .. }))));
    std::fs::write(&bad, b"not a snapshot at all, but long enough? no").unwrap();
    assert!(matches!(run_alone(&restore_from(&bad)), Err(VmError::Snapshot(SnapshotError::Length { .. }))));
    bytes[0] = b'X';
    std::fs::write(&bad, &bytes).unwrap();
    assert!(matches!(run_alone(&restore_from(&bad)), Err(VmError::Snapshot(SnapshotError::Magic { .. }))));
    let wrong_size = RunConfig { mem: Some(128 << 20), ..restore_from(&path) };
    let e = run_alone(&wrong_size).unwrap_err();
    assert!(matches!(e, VmError::Snapshot(SnapshotError::Mismatch { .. })), "{e}");
    assert!(e.to_string().contains("64 MiB"), "{e}");
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(&bad).unwrap();
}

/// A guest restored through the external handler (Firecracker's
/// protocol: the VMM hands its userfaultfd and regions over a socket) runs
/// and verifies like one restored by the engine in the VMM; the handler
/// reports the VM when the VMM hangs up.
#[test]
fn a_guest_restores_through_an_external_handler() {
    require_kvm!();
    let path = temp("ext-snap");
    let save = RunConfig { save_snapshot: Some(path.clone()), seed: Some(78), ..short(64 << 20, 600) };
    assert_clean(&run_alone(&save).unwrap());

    let sock = temp("ext.sock");
    let report_path = temp("ext-report.jsonl");
    let opts = apf_handler::Options { report: Some(report_path.clone()), ..apf_handler::Options::new(&sock, &path) };
    let server = apf_handler::Server::bind(opts).unwrap();
    let (stop, counters) = (server.stop_flag(), server.counters());
    let serving = std::thread::spawn(move || server.run());
    // 4 KiB pages, then 2 MiB pages as Firecracker maps hugetlbfs memory
    // (pool: 32 huge pages of guest RAM and 8 of slack, reserved by the run
    // itself): the snapshot keeps RAM on a 2 MiB boundary of the file.
    for (i, memory) in [apf::MemoryKind::PrivateAnonymous, apf::MemoryKind::PrivateHugetlb].into_iter().enumerate() {
        let restore = RunConfig {
            uffd_socket: Some(sock.clone()),
            guest_offline: false,
            offline_every: None,
            memory,
            ..restore_from(&path)
        };
        let report = run_alone(&restore).unwrap();
        assert_clean(&report);
        assert_eq!(report.restored, Some((path.display().to_string(), true)), "{memory:?}");
        assert_eq!(report.faults, 0, "{memory:?}: no engine in the VMM: the handler served every fault");

        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while counters.reports.load(std::sync::atomic::Ordering::Acquire) <= i {
            assert!(std::time::Instant::now() < deadline, "{memory:?}: the handler wrote no report");
            std::thread::sleep(Duration::from_millis(10));
        }
        let line = std::fs::read_to_string(&report_path).unwrap();
        let vm: serde_json::Value = serde_json::from_str(line.lines().nth(i).unwrap()).unwrap();
        assert_eq!(vm["end"], "hung up", "{vm}");
        // Installs count the memory's own pages.
        let page = if memory == apf::MemoryKind::PrivateHugetlb { 2 << 20 } else { 4096 };
        assert!(vm["pages"].as_u64().unwrap() >= (60 << 20) / page, "the guest's memory came through it: {vm}");
        assert!(vm["ms_to_second_fault_served"].as_f64().is_some(), "{vm}");
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    serving.join().unwrap();
    for p in [&path, &report_path] {
        let _ = std::fs::remove_file(p);
    }
}

fn restore_from(path: &std::path::Path) -> RunConfig {
    RunConfig { restore: Some(path.to_path_buf()), mem: None, vcpus: None, ..short(0, 300) }
}

#[test]
fn plain_memory_and_the_baseline_run_the_same_guest() {
    require_kvm!();
    for backend in [Backend::Plain, Backend::Baseline] {
        let cfg = RunConfig { backend, ..short(64 << 20, 800) };
        let report = run_alone(&cfg).unwrap();
        assert_clean(&report);
        assert_eq!(report.backend, backend.as_str());
        if backend == Backend::Plain {
            assert_eq!(report.faults, 0, "nobody handles faults");
        } else {
            assert!(report.faults > 1000, "one fault per page: {}", report.faults);
            assert!(report.baseline_latency.is_some_and(|(p50, p99)| p50 > Duration::ZERO && p99 >= p50));
        }
        assert_eq!(report.offline.requests, 0);
    }
}

#[test]
fn touch_workload_reports_a_fault_rate() {
    require_kvm!();
    let cfg = RunConfig { workload: Workload::Touch, offline_every: None, checksum: false, ..short(64 << 20, 0) };
    let report = run_alone(&cfg).unwrap();
    assert!(report.ok, "{}", report.summary());
    let touch = report.first_pass.expect("touch rate");
    assert_eq!(touch.kind, "touch");
    assert_eq!(touch.pages, Layout::new(64 << 20, 2).unwrap().data_pages());
    assert!(touch.pages_per_sec() > 0.0);
    assert!(report.faults > 0 && report.faults < touch.pages, "prefetch should batch: {}", report.faults);
}

#[test]
fn a_host_block_goes_offline_under_a_running_guest() {
    require_kvm!();
    let cfg = RunConfig { host_block: true, ..short(256 << 20, 3000) };
    let report = run_alone(&cfg).unwrap();
    assert_clean(&report);
    // Which blocks qualify depends on the machine's history: offlined or
    // none qualified are both honest outcomes; an error is not.
    let o = &report.offline;
    assert!(
        o.host_block == "offlined" || o.host_block == "none qualified",
        "{}: {}",
        o.host_block,
        o.host_block_detail
    );
    if o.host_block == "offlined" {
        assert!(o.host_block_detail.contains("guest pages moved"), "{}", o.host_block_detail);
    } else {
        apf_tests::skipped(
            "a_host_block_goes_offline_under_a_running_guest (host block part)",
            &format!("no host block qualified: {}", o.host_block_detail),
        );
    }
}

/// Every kind of guest memory runs the stress with the balloon, host
/// offline storms, the guest's own offline requests (and a host block
/// where one qualifies), losing nothing: a shared memfd (the balloon
/// punches holes; migrate and evict write-protect, copy and punch), the
/// snapshot's image mapped private (reads mapped in place, writes copied,
/// discards read as zeros, not the image; migrate and evict move the
/// private copies), 2 MiB huge pages (private, shared, and the image
/// loaded into them), and the kernel's own file mapping as the anchor.
#[test]
fn every_memory_kind_runs_the_stress_with_the_balloon() {
    require_kvm!();
    let path = temp("kinds.snap");
    let save = RunConfig { save_snapshot: Some(path.clone()), ..short(64 << 20, 300) };
    assert_clean(&run_alone(&save).unwrap());
    let kinds = [
        (Backend::Apf, apf::MemoryKind::SharedMemfd, false, "apf shared"),
        (Backend::Apf, apf::MemoryKind::Image, true, "apf image"),
        (Backend::File, apf::MemoryKind::PrivateAnonymous, true, "file"),
        // Pool: 32 huge pages of guest RAM and 8 of slack, reserved by the
        // run itself (and given back).
        (Backend::Apf, apf::MemoryKind::PrivateHugetlb, true, "apf hugetlb"),
        (Backend::Apf, apf::MemoryKind::SharedHugetlb, false, "apf shared-hugetlb"),
        // Pool: the image (32 huge pages), as much again for private
        // copies, and 8 of slack, reserved by the run itself.
        (Backend::Apf, apf::MemoryKind::HugetlbImage, true, "apf hugetlb-image"),
    ];
    for (backend, memory, restore, name) in kinds {
        let base = if restore { restore_from(&path) } else { short(64 << 20, 0) };
        let apf = backend == Backend::Apf;
        let cfg = RunConfig {
            backend,
            memory,
            // Every kind runs the storm (huge pages a whole huge page at a
            // time).
            offline_every: apf.then_some(Duration::from_millis(2)),
            guest_offline: apf,
            // On huge pages too: offlining a block dissolves the free huge
            // pages in it, and the pool shrinks; a page the balloon
            // discarded (its reservation gone with it) that finds it dry
            // has the VMM grow it back (`HugePool::top_up`).
            host_block: backend == Backend::Apf,
            duration: Duration::from_millis(800),
            ..base
        };
        let report = match run_alone(&cfg) {
            Err(vmm::vm::VmError::HugePages(e @ apf::hugepool::HugePoolError::Shortfall { .. }))
                if std::env::var("CI").as_deref() != Ok("true") =>
            {
                eprintln!("SKIPPED {name}: {e}");
                continue;
            }
            other => other.unwrap(),
        };
        assert_clean(&report);
        assert_eq!(report.backend, name);
        let o = &report.offline;
        if backend == Backend::Apf && o.host_block != "offlined" {
            // An honest outcome, but the host-block part checked nothing.
            assert_eq!(o.host_block, "none qualified", "{name}: {}", o.host_block_detail);
            apf_tests::skipped(
                "every_memory_kind_runs_the_stress_with_the_balloon (host block part)",
                &format!("{name}: no host block qualified: {}", o.host_block_detail),
            );
        }
        if backend == Backend::Apf {
            let b = &report.balloon;
            assert!(b.discards > 0 && b.pages_verified_zero > 0, "{name}: {b:?}");
            assert_eq!(b.stale, 0, "{name}: a discarded page showed old contents");
            assert!(report.faults > 0);
            let storm = report.offline.requests - report.offline.guest_requested;
            assert!(storm >= 5, "{name}: only {storm} storm offlines: {}", report.summary());
            assert!(report.offline.guest_requested > 0, "{name}: {}", report.summary());
        } else {
            assert_eq!(report.faults, 0, "the file backend has no userfaultfd");
        }
        if restore {
            assert!(report.restored.as_ref().is_some_and(|r| r.1), "{name}: {}", report.summary());
        }
    }
    std::fs::remove_file(&path).unwrap();
}

/// A working set recorded on the run that saves a snapshot, replayed on
/// its restore: the guest verifies every byte and faults far less than on
/// demand alone. A damaged file, or one recorded for another snapshot, is
/// reported and the restore goes on, verified, without replay.
#[test]
fn a_restore_replays_the_working_set_its_snapshot_run_recorded() {
    require_kvm!();
    let (snap, ws) = (temp("ws-snap"), temp("ws-set"));
    let save = RunConfig {
        save_snapshot: Some(snap.clone()),
        save_working_set: Some(ws.clone()),
        seed: Some(79),
        // Recorded one page per fault: the first pass is slower than on a
        // run with windows, and the agents are to finish their passes.
        ..short(64 << 20, 3000)
    };
    let first = run_alone(&save).unwrap();
    assert_clean(&first);
    let saved = first.working_set.as_ref().expect("the saving run reports its working set");
    assert_eq!(saved.saved.as_deref(), Some(ws.to_str().unwrap()));
    assert!(saved.saved_pages >= (48 << 20) / PAGE_SIZE, "the guest touched most of its RAM: {saved:?}");

    let on_demand = run_alone(&RunConfig { random_order: true, ..restore_from(&snap) }).unwrap();
    assert_clean(&on_demand);
    assert!(on_demand.working_set.is_none());
    let with_set = RunConfig { working_set: Some(ws.clone()), random_order: true, ..restore_from(&snap) };
    let background = run_alone(&with_set).unwrap();
    assert_clean(&background);
    let w = background.working_set.as_ref().unwrap();
    assert_eq!((w.error.as_deref(), w.pages, w.lead_pages), (None, saved.saved_pages, 0), "{}", background.summary());
    // With a lead, the set goes in before the vCPUs start.
    let replayed = run_alone(&RunConfig { replay_lead: Duration::from_secs(5), ..with_set }).unwrap();
    assert_clean(&replayed);
    assert_eq!(replayed.restored, Some((snap.display().to_string(), true)));
    let w = replayed.working_set.as_ref().unwrap();
    assert_eq!((w.error.as_deref(), w.pages), (None, saved.saved_pages), "{}", replayed.summary());
    assert!(w.lead_pages >= saved.saved_pages * 9 / 10, "{}", replayed.summary());
    assert!(w.replayed_pages >= w.lead_pages, "{}", replayed.summary());
    assert!(
        replayed.faults * 4 <= on_demand.faults,
        "replay: {} faults, on demand: {}\n{}",
        replayed.faults,
        on_demand.faults,
        replayed.summary()
    );

    // Damaged sets: one flipped byte, a cut, a file of something else.
    let bytes = std::fs::read(&ws).unwrap();
    let bad = temp("ws-bad");
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 1;
    let damaged: [(&[u8], &str); 3] = [
        (&flipped, "corrupt"),
        (&bytes[..bytes.len() - 5], "not a working-set file"),
        (b"hello", "not a working-set file"),
    ];
    for (content, says) in damaged {
        std::fs::write(&bad, content).unwrap();
        let report = run_alone(&RunConfig { working_set: Some(bad.clone()), ..restore_from(&snap) }).unwrap();
        assert_clean(&report);
        assert_eq!(report.restored, Some((snap.display().to_string(), true)));
        let w = report.working_set.as_ref().unwrap();
        assert!(w.error.as_deref().is_some_and(|e| e.contains(says)), "{says}: {w:?}");
        assert_eq!((w.pages, w.replayed_pages), (0, 0), "nothing replayed from a refused file");
        assert!(report.to_json().contains("\"working_set\":{\"replayed_from\":"), "{}", report.to_json());
        assert!(report.summary().contains("NOT replayed"), "{}", report.summary());
    }
    // Missing file.
    let _ = std::fs::remove_file(&bad);
    let report = run_alone(&RunConfig { working_set: Some(bad.clone()), ..restore_from(&snap) }).unwrap();
    assert_clean(&report);
    assert!(report.working_set.as_ref().unwrap().error.as_deref().is_some_and(|e| e.contains("I/O")), "{report:?}");

    // Another snapshot's set; and a set recorded on a restore binds to
    // the restored image, so it replays into it.
    let other = temp("ws-other-snap");
    let save_other = RunConfig { save_snapshot: Some(other.clone()), seed: Some(80), ..short(64 << 20, 300) };
    assert_clean(&run_alone(&save_other).unwrap());
    let report = run_alone(&RunConfig { working_set: Some(ws.clone()), ..restore_from(&other) }).unwrap();
    assert_clean(&report);
    let w = report.working_set.as_ref().unwrap();
    assert!(w.error.as_deref().is_some_and(|e| e.contains("another image")), "{w:?}");
    let recorded = temp("ws-on-restore");
    let recording = RunConfig {
        save_working_set: Some(recorded.clone()),
        duration: Duration::from_secs(3),
        ..restore_from(&other)
    };
    let report = run_alone(&recording).unwrap();
    assert_clean(&report);
    assert!(report.working_set.as_ref().unwrap().saved_pages > 0);
    let first_recording = report.working_set.as_ref().unwrap().saved_pages;
    // Replayed and recorded again: the pages the replay installed never
    // faulted, yet the set saved keeps them.
    let again = RunConfig {
        working_set: Some(recorded.clone()),
        save_working_set: Some(recorded.clone()),
        replay_lead: Duration::from_secs(5),
        ..recording.clone()
    };
    let report = run_alone(&again).unwrap();
    assert_clean(&report);
    let w = report.working_set.as_ref().unwrap();
    assert_eq!((w.error.as_deref(), w.pages), (None, first_recording), "{}", report.summary());
    assert!(w.saved_pages >= first_recording, "the set shrank: {w:?}");
    for p in [&snap, &ws, &other, &recorded] {
        let _ = std::fs::remove_file(p);
    }
}
