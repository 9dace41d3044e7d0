//! `vmm bench`: the bench of the `apf-bench` crate, with its guest
//! workloads run here, under KVM: each a run of the guest agent's first
//! pass with two vCPUs ([`Guests`]), and the guest-storm part's runs:
//! sequential passes for a fixed time, quiet, next to a storm or next to
//! a host block offline.

use std::path::Path;
use std::time::Duration;

use agent_proto::Workload;
use apf::span::{FAULT, PIN};
use apf_bench::guest_storm::{GuestStormRun, GuestStormSample, Tail};
use apf_bench::replay::{ReplayCase, ReplaySample, ReplayVariant};
use apf_bench::{GuestPass, Sample, Variant};

use crate::config::{Backend, OfflineMode, RunConfig};
use crate::guestview::FaultView;

/// Runs the bench's guest passes as VMM runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Guests;

impl GuestPass for Guests {
    fn make_snapshot(&self, bytes: u64, path: &Path) -> Result<(), String> {
        let cfg = RunConfig {
            mem: Some(bytes),
            vcpus: Some(2),
            duration: Duration::ZERO,
            workload: Workload::Touch,
            offline_every: None,
            guest_offline: false,
            checksum: false,
            progress: false,
            save_snapshot: Some(path.to_path_buf()),
            ..RunConfig::default()
        };
        let made = crate::vm::run(&cfg).map_err(|e| crate::error_chain(&e))?;
        match made.snapshot_saved {
            Some(_) => Ok(()),
            None => Err(made.errors.join("; ")),
        }
    }

    fn first_pass(
        &self,
        variant: Variant,
        random: bool,
        snapshot: Option<&Path>,
        bytes: u64,
    ) -> Result<Sample, String> {
        let backend = match variant {
            Variant::Kernel => Backend::Plain,
            Variant::Baseline => Backend::Baseline,
            Variant::KernelFile => Backend::File,
            Variant::Apf { .. }
            | Variant::ApfTraced
            | Variant::ApfZeroCopy
            | Variant::ApfHugetlb
            | Variant::ApfZeroCopyHugetlb => Backend::Apf,
        };
        let memory = match variant {
            Variant::ApfZeroCopy => apf::MemoryKind::Image,
            // `vm::run` reserves the huge pages it needs for the run.
            Variant::ApfHugetlb => apf::MemoryKind::PrivateHugetlb,
            Variant::ApfZeroCopyHugetlb => apf::MemoryKind::HugetlbImage,
            _ => apf::MemoryKind::PrivateAnonymous,
        };
        let cfg = RunConfig {
            mem: if snapshot.is_some() { None } else { Some(bytes) },
            vcpus: if snapshot.is_some() { None } else { Some(2) },
            duration: Duration::ZERO,
            grace: Duration::from_secs(120),
            workload: Workload::Touch,
            backend,
            memory,
            random_order: random,
            offline_every: None,
            guest_offline: false,
            checksum: false,
            latency: variant == Variant::ApfTraced,
            progress: false,
            restore: snapshot.map(Path::to_path_buf),
            ..RunConfig::default()
        };
        let report = crate::vm::run(&cfg).map_err(|e| crate::error_chain(&e))?;
        if !report.ok {
            return Err(format!("guest {} run failed: {}", variant.name(), report.errors.join("; ")));
        }
        let first = report.first_pass.ok_or("the guest reported no first pass")?;
        let latency = match backend {
            Backend::Apf => report.latency.as_ref().and_then(|l| l.span(FAULT)).map(|s| (s.p50, s.p99)),
            Backend::Baseline => report.baseline_latency,
            Backend::Plain | Backend::File => None,
        };
        Ok(Sample { pages: first.pages, seconds: first.elapsed.as_secs_f64(), latency })
    }

    fn guest_storm(&self, run: &GuestStormRun) -> Result<GuestStormSample, String> {
        let cfg = RunConfig {
            mem: Some(run.bytes),
            vcpus: Some(2),
            duration: run.duration,
            workload: Workload::Sequential,
            offline_every: run.storm.map(|s| s.every),
            offline_mode: OfflineMode::Mixed,
            offline_max: run.storm.map_or(crate::config::DEFAULT_OFFLINE_MAX, |s| s.max_bytes),
            host_block: run.host_block,
            // Only the host's offlines: the guest's own (and its balloon)
            // would fault in the quiet run too.
            guest_offline: false,
            // The device and its pin on the ring: the storm's pin re-faults.
            checksum: true,
            latency: true,
            progress: false,
            ..RunConfig::default()
        };
        let report = crate::vm::run(&cfg).map_err(|e| crate::error_chain(&e))?;
        if !report.ok {
            return Err(format!("guest run failed: {}", report.errors.join("; ")));
        }
        sample_of(&report)
    }

    fn handler_first_pass(&self, socket: &Path, random: bool, snapshot: &Path) -> Result<Sample, String> {
        let cfg = RunConfig {
            duration: Duration::ZERO,
            grace: Duration::from_secs(120),
            workload: Workload::Touch,
            random_order: random,
            offline_every: None,
            guest_offline: false,
            checksum: false,
            latency: false,
            progress: false,
            restore: Some(snapshot.to_path_buf()),
            uffd_socket: Some(socket.to_path_buf()),
            ..RunConfig::default()
        };
        let report = crate::vm::run(&cfg).map_err(|e| crate::error_chain(&e))?;
        if !report.ok {
            return Err(format!("guest restore through the handler failed: {}", report.errors.join("; ")));
        }
        let first = report.first_pass.ok_or("the guest reported no first pass")?;
        Ok(Sample { pages: first.pages, seconds: first.elapsed.as_secs_f64(), latency: None })
    }

    fn make_replay_snapshot(&self, bytes: u64, snapshot: &Path, working_set: &Path) -> Result<u64, String> {
        let quiet = RunConfig {
            duration: Duration::ZERO,
            grace: Duration::from_secs(120),
            workload: Workload::Scattered,
            offline_every: None,
            guest_offline: false,
            checksum: false,
            latency: false,
            progress: false,
            ..RunConfig::default()
        };
        let made = crate::vm::run(&RunConfig {
            mem: Some(bytes),
            vcpus: Some(2),
            save_snapshot: Some(snapshot.to_path_buf()),
            ..quiet.clone()
        })
        .map_err(|e| crate::error_chain(&e))?;
        if made.snapshot_saved.is_none() {
            return Err(format!("no snapshot: {}", made.errors.join("; ")));
        }
        // The set the restored guest touches, recorded on its first restore.
        let recorded = crate::vm::run(&RunConfig {
            restore: Some(snapshot.to_path_buf()),
            save_working_set: Some(working_set.to_path_buf()),
            ..quiet
        })
        .map_err(|e| crate::error_chain(&e))?;
        match recorded.working_set {
            Some(w) if recorded.ok => Ok(w.saved_pages),
            _ => Err(format!("no working set: {}", recorded.errors.join("; "))),
        }
    }

    fn replay_pass(
        &self,
        variant: ReplayVariant,
        snapshot: &Path,
        working_set: &Path,
        case: ReplayCase,
    ) -> Result<ReplaySample, String> {
        if case.cold() {
            drop_page_cache(snapshot)?;
        }
        let replays = !matches!(variant, ReplayVariant::OnDemand | ReplayVariant::KernelFile);
        let cfg = RunConfig {
            duration: Duration::ZERO,
            grace: Duration::from_secs(120),
            workload: Workload::Scattered,
            scattered_changed: case.changed(),
            backend: if variant == ReplayVariant::KernelFile { Backend::File } else { Backend::Apf },
            offline_every: None,
            guest_offline: false,
            checksum: false,
            latency: variant != ReplayVariant::KernelFile,
            progress: false,
            restore: Some(snapshot.to_path_buf()),
            working_set: replays.then(|| working_set.to_path_buf()),
            replay_eager: variant == ReplayVariant::Eager,
            replay_lead: match variant {
                ReplayVariant::Replay | ReplayVariant::Eager => REPLAY_LEAD,
                _ => Duration::ZERO,
            },
            ..RunConfig::default()
        };
        let report = crate::vm::run(&cfg).map_err(|e| crate::error_chain(&e))?;
        if !report.ok {
            return Err(format!("guest run failed: {}", report.errors.join("; ")));
        }
        if let Some(e) = report.working_set.as_ref().and_then(|w| w.error.clone()) {
            return Err(format!("the working set was not replayed: {e}"));
        }
        let first = report.first_pass.ok_or("the guest reported no first pass")?;
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let latency = report.latency.as_ref();
        Ok(ReplaySample {
            seconds: (report.setup + first.elapsed).as_secs_f64(),
            faults: (cfg.backend == Backend::Apf).then_some(report.faults),
            blocked_us: latency.map(|l| l.vcpus.iter().map(|v| us(v.blocked)).sum()),
            fault_p99_us: latency.and_then(|l| l.span(FAULT)).map(|s| us(s.p99)),
            replayed_pages: report.working_set.as_ref().map_or(0, |w| w.replayed_pages),
        })
    }
}

/// Drops the page cache of `path` (written back first: dirty pages stay).
fn drop_page_cache(path: &Path) -> Result<(), String> {
    let why = |e: &dyn std::fmt::Display| format!("dropping the page cache of {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(|e| why(&e))?;
    file.sync_all().map_err(|e| why(&e))?;
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).map_err(|e| why(&e))
}

/// The longest a replay-part restore installs its working set before the
/// vCPUs start: the whole set, at the sizes the bench runs.
const REPLAY_LEAD: Duration = Duration::from_secs(10);

/// What the guest-storm part takes from a run's report.
fn sample_of(report: &crate::report::Report) -> Result<GuestStormSample, String> {
    let latency = report.latency.as_ref().ok_or("the run kept no latencies")?;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let engine = latency.span(FAULT).map(|s| Tail { p99_us: us(s.p99), p999_us: us(s.p999), max_us: us(s.max) });
    let tail = |v: &Option<FaultView>| {
        let v = v.as_ref()?;
        Some(Tail { p99_us: v.p99_us?, p999_us: v.p999_us?, max_us: v.max_us? })
    };
    let view = report.guest_view.as_ref().ok_or("the guest sent no timings")?;
    Ok(GuestStormSample {
        engine,
        guest: tail(&view.all),
        guest_touch: tail(&view.touch),
        guest_stress: tail(&view.stress),
        vcpu_faults: latency.vcpus.iter().map(|v| v.faults).sum(),
        vcpu_blocked_us: latency.vcpus.iter().map(|v| us(v.blocked)).sum(),
        deferred_faults: report.deferred_faults,
        pin_refault_p99_us: latency.span(PIN).map(|s| us(s.p99)),
        pin_callback_p99_us: report.pin_callback.map(|c| c.p99_us),
        offlines: report.offline.completed,
        host_block: report.offline.host_block.clone(),
        tail_causes_pct: latency.tail.as_ref().map_or_else(Vec::new, |t| {
            let total = t.total.as_secs_f64().max(1e-12);
            apf_bench::guest_storm::TAIL_CAUSES
                .iter()
                .filter_map(|&c| Some((c, 100.0 * t.cause(c)?.as_secs_f64() / total)))
                .collect()
        }),
    })
}
