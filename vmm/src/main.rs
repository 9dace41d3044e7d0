//! `vmm run`: boot the guest agent under KVM with RAM demand-faulted by
//! apf, offline its memory underneath it, verify every byte, report.

use std::process::ExitCode;

use vmm::config::{parse_run, RUN_HELP};

fn usage() -> String {
    format!(
        "usage: vmm run [OPTIONS] | vmm bench [OPTIONS] | vmm stress [OPTIONS] | vmm help\n\n{RUN_HELP}\nvmm {}\n{}",
        apf_bench::cli::HELP,
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

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") => {}
        Some("bench") => return apf_bench::cli::main("vmm bench", &args[1..], Some(&vmm::bench::Guests)),
        Some("stress") => return stress(&args[1..]),
        // Not for users: the processes `vmm bench` starts for its handler
        // part (the external handler and its clients).
        Some("uffd-handler" | "fc-client") => {
            return apf_bench::handler::subcommand(&args).unwrap_or(ExitCode::FAILURE)
        }
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
