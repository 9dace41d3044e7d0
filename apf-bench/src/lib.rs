//! apf's benchmarks: the engine against the baselines a VMM would
//! otherwise use, side by side in one process, variants interleaved in
//! every round; what offlining costs; fault latency next to an offline
//! storm.
//!
//! Workloads:
//! - host: two threads touch every page of a fresh registered region, in
//!   order or in a keyed random order ([`agent_proto::permute`]);
//! - guest: the guest agent's first pass under KVM, two vCPUs, each over
//!   its stripe (the touch workload, or the verify of a restored snapshot).
//!   This crate never touches KVM: a VMM runs these passes through
//!   [`GuestPass`] (`vmm bench` does); `apf-bench` alone leaves them out;
//!
//! each over a zero source (the threads write: a read of fresh anonymous
//! memory maps the shared zero page and allocates nothing) and over a
//! snapshot file in the page cache (the threads read and check). Variants:
//! `kernel` (plain anonymous memory, no userfaultfd: the limit for zero
//! pages), `baseline` (one thread, blocking read, one page per fault, COPY
//! from the source) and `apf` with its defaults, plus worker-count and
//! prefetch-window variants in the full run. Then offlining 64 MiB with 0
//! and 1,000 migratable pins and against a hard pin ([`offline`]), fault
//! latency with an offline storm next to it ([`latency`]), and what the
//! latency layer costs.
//!
//! Method: the median of the rounds; every region `MADV_NOHUGEPAGE`, none
//! pre-populated; no CPU pinning for any variant (the scheduler places the
//! threads of every variant alike).
//!
//! | module | what |
//! |---|---|
//! | [`cli`] | the command line, shared by `apf-bench` and `vmm bench` |
//! | [`report`] | the figures, their ratios and targets; JSON, table, chart |
//! | [`offline`] | offline cost with and without pins; an offline against a hard pin |
//! | [`latency`] | fault latency next to an offline storm, a CPU hog, or nothing |
//! | [`guest_storm`] | guest fault latency, engine and guest views, quiet and next to a storm or a host block offline |
//! | [`restore`] | restoring a snapshot image: the kernel's file mapping, apf copying, apf zero-copy; clones' memory |
//! | [`replay`](mod@replay) | working-set replay: a restored guest touching a scattered 15% of its RAM, on demand, replayed, eager, the file mapping |
//! | [`handler`] | the external page-fault handler against a one-page handler and the file mapping |
//!
//! The `offline_cost` and `offline_storm` examples measure through the
//! same [`offline`] and [`latency`] code.

pub mod cli;
pub mod guest_storm;
pub mod handler;
pub mod latency;
pub mod offline;
pub mod replay;
pub mod report;
pub mod restore;
mod run;

pub use report::{chart, BenchReport, Sample, Series, WorkloadResult, TARGETS};
pub use run::{run, BenchConfig, GuestPass, Variant};

/// Bytes in a page.
const PAGE: u64 = 4096;
/// Bytes in a MiB.
const MIB: u64 = 1 << 20;

/// The median of `v`; 0 for none.
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `q` quantile of `sorted` (nearest rank); 0 for none.
fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}
