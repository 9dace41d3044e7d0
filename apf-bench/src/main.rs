//! `apf-bench`: the bench without a VMM (host workloads, offline cost,
//! fault latency next to a storm); `vmm bench` runs the same with the
//! guest workloads under KVM.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    apf_bench::cli::main("apf-bench", &args, None)
}
