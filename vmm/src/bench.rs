//! `vmm bench`: the bench of the `apf-bench` crate, with its guest
//! workloads run here, under KVM: each a run of the guest agent's first
//! pass with two vCPUs ([`Guests`]).

use std::path::Path;
use std::time::Duration;

use agent_proto::Workload;
use apf::span::FAULT;
use apf_bench::{GuestPass, Sample, Variant};

use crate::config::{Backend, RunConfig};

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
            Variant::Apf { .. } | Variant::ApfTraced => Backend::Apf,
        };
        let cfg = RunConfig {
            mem: if snapshot.is_some() { None } else { Some(bytes) },
            vcpus: if snapshot.is_some() { None } else { Some(2) },
            duration: Duration::ZERO,
            grace: Duration::from_secs(120),
            workload: Workload::Touch,
            backend,
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
            Backend::Plain => None,
        };
        Ok(Sample { pages: first.pages, seconds: first.elapsed.as_secs_f64(), latency })
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
}
