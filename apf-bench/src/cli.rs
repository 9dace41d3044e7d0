//! The bench's command line: one parser and one driver, for `apf-bench`
//! (host workloads, offline cost, storm latency) and `vmm bench` (the same
//! and the guest workloads under KVM).

use std::process::ExitCode;

use crate::{chart, run, BenchConfig, GuestPass};

/// The options, for `--help` and `vmm help`.
pub const HELP: &str = "\
bench [OPTIONS]: apf against plain memory and the one-page-per-fault baseline, host and guest
workloads (guest ones only through `vmm bench`), offline cost and fault latency next to
offline storms, in one process with the variants interleaved in every round.

  --quick                a run under two minutes (smaller regions, no extra variants)
  --rounds N             rounds (default 5, at least 5)
  --json PATH            write the figures and ratios as JSON
  --chart PATH.svg       write a chart of the throughput figures
  --only PARTS           some of throughput,restore,offline,storm,guest-storm,handler,replay
                         (default all; guest-storm and replay need `vmm bench`)
";

/// Reads the options (everything after `bench`).
pub fn parse(args: &[String]) -> Result<BenchConfig, String> {
    let mut cfg = BenchConfig::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| match it.next() {
            Some(v) => Ok(v.clone()),
            None => Err(format!("{name} needs a value")),
        };
        match a.as_str() {
            "--quick" => cfg.quick = true,
            "--json" => cfg.json = Some(value("--json")?.into()),
            "--chart" => cfg.chart = Some(value("--chart")?.into()),
            "--only" => {
                for part in value("--only")?.split(',') {
                    if !["throughput", "restore", "offline", "storm", "guest-storm", "handler", "replay"]
                        .contains(&part)
                    {
                        return Err(format!(
                            "invalid value {part:?} for --only: throughput, restore, offline, storm, guest-storm, handler or replay"
                        ));
                    }
                    cfg.only.push(part.to_string());
                }
            }
            "--rounds" => {
                let v = value("--rounds")?;
                match v.parse::<usize>() {
                    Ok(n) if (5..=100).contains(&n) => cfg.rounds = n,
                    _ => return Err(format!("invalid value {v:?} for --rounds: a number from 5 to 100")),
                }
            }
            other => return Err(format!("unknown option {other:?} (try --help)")),
        }
    }
    Ok(cfg)
}

/// Runs the bench the options `args` ask for, as `program` (the name its
/// messages start with): prints the table, writes the JSON and the chart.
/// Exit status 2 for bad options, 1 when the bench or a write failed.
pub fn main(program: &str, args: &[String], guest: Option<&dyn GuestPass>) -> ExitCode {
    // The handler part starts this program again as a handler or a client.
    if let Some(code) = crate::handler::subcommand(args) {
        return code;
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{HELP}");
        return ExitCode::SUCCESS;
    }
    let cfg = match parse(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{program}: {e}");
            return ExitCode::from(2);
        }
    };
    let report = match run(&cfg, guest, |step| eprintln!("{program}: {step}")) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{program}: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", report.table());
    let mut ok = report.errors.is_empty();
    if let Some(path) = &cfg.json {
        if let Err(e) = std::fs::write(path, report.to_json() + "\n") {
            eprintln!("{program}: cannot write {}: {e}", path.display());
            ok = false;
        }
    }
    if let Some(path) = &cfg.chart {
        if let Err(e) = std::fs::write(path, chart(&report)) {
            eprintln!("{program}: cannot write {}: {e}", path.display());
            ok = false;
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_parse_and_bad_ones_are_named() {
        let cfg = parse(&args(&["--quick", "--rounds", "7", "--only", "offline,storm", "--json", "b.json"])).unwrap();
        assert!(cfg.quick);
        assert_eq!(cfg.rounds, 7);
        assert_eq!(cfg.only, ["offline", "storm"]);
        assert_eq!(cfg.json.as_deref(), Some(std::path::Path::new("b.json")));
        assert!(parse(&args(&["--rounds", "4"])).unwrap_err().contains("from 5 to 100"));
        assert!(parse(&args(&["--only", "guest"])).unwrap_err().contains("\"guest\""));
        assert_eq!(parse(&args(&["--only", "guest-storm"])).unwrap().only, ["guest-storm"]);
        assert_eq!(parse(&args(&["--only", "replay,handler"])).unwrap().only, ["replay", "handler"]);
        let e = parse(&args(&["--only", "offline,guest_storm"])).unwrap_err();
        assert!(e.contains("\"guest_storm\"") && e.contains("guest-storm"), "{e}");
        assert!(parse(&args(&["--chart"])).unwrap_err().contains("needs a value"));
        assert!(parse(&args(&["--fast"])).unwrap_err().contains("unknown option \"--fast\""));
    }
}
