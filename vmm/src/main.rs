//! `vmm run`: boot the guest agent under KVM with RAM demand-faulted by
//! apf, offline its memory underneath it, verify every byte, report.

use std::process::ExitCode;

use vmm::config::{parse_run, RUN_HELP};

const BENCH_HELP: &str = "\
vmm bench [OPTIONS]: apf against plain memory and the one-page-per-fault baseline, host and
guest workloads, offline cost and fault latency next to offline storms, in one process with
the variants interleaved in every round.

  --quick                a run under two minutes (smaller regions, no extra variants)
  --rounds N             rounds (default 5, at least 5)
  --json PATH            write the figures and ratios as JSON
  --chart PATH.svg       write a chart of the throughput figures
  --only PARTS           some of throughput,offline,storm (default all)
";

fn usage() -> String {
    format!(
        "usage: vmm run [OPTIONS] | vmm bench [OPTIONS] | vmm stress [OPTIONS] | vmm help\n\n{RUN_HELP}\n{BENCH_HELP}\n{}",
        vmm::stress::STRESS_HELP
    )
}

fn stress(args: &[String]) -> ExitCode {
    let cfg = match vmm::stress::parse_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm stress: {e}");
            return ExitCode::from(2);
        }
    };
    let report = match vmm::stress::run(&cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmm stress: {}", vmm::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let json = report.to_json();
    println!("{json}");
    let mut ok = report.ok();
    if let Some(path) = &cfg.json {
        if let Err(e) = std::fs::write(path, json + "\n") {
            eprintln!("vmm stress: cannot write {}: {e}", path.display());
            ok = false;
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn bench(args: &[String]) -> ExitCode {
    let mut cfg = vmm::bench::BenchConfig::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| match it.next() {
            Some(v) => Ok(v.clone()),
            None => Err(format!("{name} needs a value")),
        };
        let parsed = match a.as_str() {
            "--quick" => {
                cfg.quick = true;
                Ok(())
            }
            "--json" => value("--json").map(|v| cfg.json = Some(v.into())),
            "--chart" => value("--chart").map(|v| cfg.chart = Some(v.into())),
            "--only" => value("--only").and_then(|v| {
                for part in v.split(',') {
                    if !["throughput", "offline", "storm"].contains(&part) {
                        return Err(format!("invalid value {part:?} for --only: throughput, offline or storm"));
                    }
                    cfg.only.push(part.to_string());
                }
                Ok(())
            }),
            "--rounds" => value("--rounds").and_then(|v| match v.parse::<usize>() {
                Ok(n) if (5..=100).contains(&n) => {
                    cfg.rounds = n;
                    Ok(())
                }
                _ => Err(format!("invalid value {v:?} for --rounds: a number from 5 to 100")),
            }),
            other => Err(format!("unknown option {other:?} (try `vmm help`)")),
        };
        if let Err(e) = parsed {
            eprintln!("vmm bench: {e}");
            return ExitCode::from(2);
        }
    }
    let report = match vmm::bench::run(&cfg, |step| eprintln!("vmm bench: {step}")) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmm bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", report.table());
    let mut ok = report.errors.is_empty();
    if let Some(path) = &cfg.json {
        if let Err(e) = std::fs::write(path, report.to_json() + "\n") {
            eprintln!("vmm bench: cannot write {}: {e}", path.display());
            ok = false;
        }
    }
    if let Some(path) = &cfg.chart {
        if let Err(e) = std::fs::write(path, vmm::bench::chart(&report)) {
            eprintln!("vmm bench: cannot write {}: {e}", path.display());
            ok = false;
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") => {}
        Some("bench") => return bench(&args[1..]),
        Some("stress") => return stress(&args[1..]),
        Some("help" | "--help" | "-h") => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("vmm: unknown command {other:?}\n\n{}", usage());
            return ExitCode::from(2);
        }
        None => {
            eprintln!("{}", usage());
            return ExitCode::from(2);
        }
    }
    let config = match parse_run(&args[1..]) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm run: {e}");
            return ExitCode::from(2);
        }
    };
    let report = match vmm::vm::run(&config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmm run: {}", vmm::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    print!("{}", report.summary());
    if let Some(path) = &config.report_json {
        if let Err(e) = std::fs::write(path, report.to_json() + "\n") {
            eprintln!("vmm run: cannot write the report to {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
