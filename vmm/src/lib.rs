//! A minimal KVM VMM that embeds the apf engine and runs the guest agent.
//!
//! One run ([`vm::run`]) is three steps, [`vm::Vm::build`],
//! [`vm::Vm::run`] and [`vm::StoppedVm::shutdown`], that read top to
//! bottom: guest RAM is mapped and
//! handed to an [`apf::Engine`] (or left plain for comparison); a VM gets
//! one memory slot over it that never changes; the guest agent's ELF is
//! loaded and every vCPU starts in 64-bit long mode ([`boot`]); the agent
//! device ([`agent`]) and the checksum device ([`checksum`], which keeps a
//! migratable pin on its ring) serve the guest; a host storm ([`storm`])
//! offlines guest memory underneath it; the event loop waits for the agents
//! to finish; the parts are taken down in order and a [`report::Report`]
//! says what happened.
//!
//! | module | what |
//! |---|---|
//! | [`config`] | the run's configuration and the `vmm run` command line |
//! | [`boot`] | GDT, page tables, long-mode registers (pure, tested without KVM) |
//! | [`exit`] | what a vCPU exit means (pure, tested without KVM) |
//! | [`vcpu`] | vCPU threads, the kick signal, SIGBUS from poisoned pages |
//! | [`mem`] | range-checked device access to guest RAM, through short-term references |
//! | [`agent`] | the agent device: the guest/VMM protocol of [`agent_proto`] |
//! | [`guestview`] | the guest's own view of its faults: its first-access timings, the slowest N |
//! | [`checksum`] | the checksum device and its migratable pin |
//! | [`storm`] | host-side offline storms and the host memory-block offline |
//! | [`snapshot`] | snapshot files: save at the end, restore on demand |
//! | [`replay`] | working sets: the replay a restore starts, the recording a run saves |
//! | [`report`] | how each vCPU ended, the report's assembly, the summary and the JSON report |
//! | [`vm`] | the run itself: build, run, shutdown |
//! | [`bench`](mod@bench) | `vmm bench`: the `apf-bench` crate's bench, with its guest workloads run here under KVM |
//! | [`stress`] | `vmm stress`: the engine alone under racing reads, writes, discards, offlines and pins, model-checked |
//!
//! ```no_run
//! use std::time::Duration;
//! let config = vmm::config::RunConfig { duration: Duration::from_secs(2), ..Default::default() };
//! let report = vmm::vm::run(&config)?;
//! assert!(report.ok, "{}", report.summary());
//! # Ok::<(), vmm::vm::VmError>(())
//! ```

use std::thread::JoinHandle;

/// Spawns a named thread that reports spans to the dispatcher current
/// here (engine calls made from it, offlines and pin re-faults, are traced
/// with the run's subscriber).
pub(crate) fn spawn_traced<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<JoinHandle<T>> {
    let dispatch = tracing::dispatcher::get_default(|d| d.clone());
    std::thread::Builder::new().name(name.into()).spawn(move || {
        let _trace = tracing::dispatcher::set_default(&dispatch);
        f()
    })
}

/// An error with its chain of causes, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

pub mod agent;
pub mod bench;
pub mod boot;
pub mod checksum;
pub mod config;
pub mod exit;
pub mod guestview;
pub mod mem;
pub mod replay;
pub mod report;
pub mod snapshot;
pub mod storm;
pub mod stress;
pub mod vcpu;
pub mod vm;
