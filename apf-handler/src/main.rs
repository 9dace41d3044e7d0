//! `apf-handler`: serves Firecracker snapshot restores from one memory
//! file on one socket (see the crate doc and `server`'s module doc).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use apf_handler::{OnLost, Options, Server};
use tracing_subscriber::prelude::*;

const USAGE: &str = "apf-handler --socket PATH --mem-file PATH [--workers N] [--max-window PAGES]
            [--fault-around PAGES] [--dispatch auto|inline|workers] [--max-vms N]
            [--handshake-timeout-ms N] [--on-lost kill|zeros] [--report PATH]
            [--trace-dir DIR] [--one-page] [--fail-at OFFSET]

  --report PATH     append one JSON line per VM when it ends
  --trace-dir DIR   write each VM's Chrome trace (vm-N.trace.json) and latency plot (vm-N.svg)
  --on-lost         a failed read of the memory file ends the peer (kill, default) or gives zeros
  --one-page        serve with the one-page-per-fault handler instead (for comparison)
  --fail-at OFFSET  test seam: reads of the memory file covering OFFSET fail";

fn parse(args: &[String]) -> Result<(Options, bool), String> {
    let mut socket = None;
    let mut mem_file = None;
    let mut opts = Options::new("", "");
    let mut one_page = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        let num = |v: &String| v.parse::<u64>().map_err(|e| format!("{arg} {v}: {e}"));
        match arg.as_str() {
            "--socket" => socket = Some(PathBuf::from(value()?)),
            "--mem-file" => mem_file = Some(PathBuf::from(value()?)),
            "--workers" => opts.config.workers = num(value()?)? as usize,
            "--max-window" => opts.config.max_window = num(value()?)? as usize,
            "--fault-around" => opts.config.fault_around = num(value()?)? as usize,
            "--dispatch" => opts.config.dispatch = value()?.parse()?,
            "--max-vms" => opts.max_vms = num(value()?)? as usize,
            "--handshake-timeout-ms" => opts.handshake_timeout = Duration::from_millis(num(value()?)?),
            "--on-lost" => opts.on_lost = value()?.parse::<OnLost>()?,
            "--report" => opts.report = Some(PathBuf::from(value()?)),
            "--trace-dir" => opts.trace_dir = Some(PathBuf::from(value()?)),
            "--fail-at" => opts.fail_at = Some(num(value()?)?),
            "--one-page" => one_page = true,
            "--help" | "-h" => return Err(USAGE.into()),
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    opts.socket = socket.ok_or(format!("--socket is required\n{USAGE}"))?;
    opts.mem_file = mem_file.ok_or(format!("--mem-file is required\n{USAGE}"))?;
    Ok((opts, one_page))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (opts, one_page) = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(apf_handler::log::StderrLog));
    if one_page {
        let _ = std::fs::remove_file(&opts.socket);
        let listener = match std::os::unix::net::UnixListener::bind(&opts.socket) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("cannot listen on {}: {e}", opts.socket.display());
                return ExitCode::FAILURE;
            }
        };
        eprintln!("apf-handler: one page per fault on {}", opts.socket.display());
        return match apf_handler::one_page::serve(listener, &opts.mem_file, Arc::default()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("apf-handler: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match Server::bind(opts) {
        Ok(server) => {
            eprintln!("apf-handler: listening");
            server.run();
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg += &format!(": {s}");
                src = s.source();
            }
            eprintln!("apf-handler: {msg}");
            ExitCode::FAILURE
        }
    }
}
