//! The command lines of the handler (`apf-handler`) and of the
//! Firecracker-like client (`apf-fc-client`), as functions, so that other
//! programs (the benchmarks) can run them as subcommands of their own.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tracing_subscriber::prelude::*;

use crate::client::{self, ClientOptions, Order};
use crate::supervise::Supervise;
use crate::{OnLost, Options, Server};

/// `apf-handler`'s usage.
pub const HANDLER_USAGE: &str = "apf-handler --socket PATH --mem-file PATH [--workers N] [--max-window PAGES]
            [--fault-around PAGES] [--dispatch auto|inline|workers] [--max-vms N]
            [--handshake-timeout-ms N] [--on-lost kill|zeros] [--report PATH]
            [--trace-dir DIR] [--one-page] [--fail-at OFFSET]
            [--working-set FILE | --no-working-set] [--replay-eager] [--save-working-set FILE]
            [--supervise [--max-restarts N] [--restart-window-ms N] [--restart-delay-ms N]]

  --report PATH     append one JSON line per VM when it ends
  --trace-dir DIR   write each VM's Chrome trace (vm-N.trace.json) and latency plot (vm-N.svg)
  --on-lost         a failed read of the memory file ends the peer (kill, default) or gives zeros
  --one-page        serve with the one-page-per-fault handler instead (for comparison)
  --fail-at OFFSET  test seam: reads of the memory file covering OFFSET fail
  --working-set FILE  replay FILE's pages into each VM from its start, demand faults first
                    (default: MEM-FILE.ws when it exists); a file that does not fit the VM's
                    image is reported and the VM served without replay
  --no-working-set  replay nothing, not even MEM-FILE.ws
  --replay-eager    after the set, fill every other page still missing
  --save-working-set FILE  record each VM's first touches; write them to FILE when it hangs up
                    (MEM-FILE.ws: the next VMs replay them)

  --supervise       a parent keeps the socket and every VM's descriptors and serves in a
                    worker child, restarted when it dies (at most --max-restarts, default 5,
                    within --restart-window-ms, default 10000, each after --restart-delay-ms,
                    default 100); past that every VM is ended through its pidfd
  --crash-worker on-vm|on-handshake
                    test seam: a supervised worker dies (SIGKILL) as soon as it is handed a
                    VM, or once it has read a VM's handshake (before adopting it)";

/// What the command line asks for.
struct Parsed {
    opts: Options,
    one_page: bool,
    supervise: Option<Supervise>,
    worker_fd: Option<i32>,
}

fn parse_handler(args: &[String]) -> Result<Parsed, String> {
    let mut socket = None;
    let mut mem_file = None;
    let mut opts = Options::new("", "");
    let mut one_page = false;
    let mut supervise = None::<Supervise>;
    let mut sup = Supervise::default();
    let mut worker_fd = None;
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
            "--working-set" => opts.working_set = Some(PathBuf::from(value()?)),
            "--no-working-set" => opts.no_working_set = true,
            "--replay-eager" => opts.replay_eager = true,
            "--save-working-set" => opts.save_working_set = Some(PathBuf::from(value()?)),
            "--one-page" => one_page = true,
            "--supervise" => supervise = Some(Supervise::default()),
            "--max-restarts" => sup.max_restarts = num(value()?)? as usize,
            "--restart-window-ms" => sup.window = Duration::from_millis(num(value()?)?),
            "--restart-delay-ms" => sup.delay = Duration::from_millis(num(value()?)?),
            "--crash-worker" => opts.crash = Some(value()?.parse()?),
            "--worker-fd" => worker_fd = Some(num(value()?)? as i32),
            "--help" | "-h" => return Err(HANDLER_USAGE.into()),
            other => return Err(format!("unknown option {other}\n{HANDLER_USAGE}")),
        }
    }
    opts.socket = socket.ok_or(format!("--socket is required\n{HANDLER_USAGE}"))?;
    opts.mem_file = mem_file.ok_or(format!("--mem-file is required\n{HANDLER_USAGE}"))?;
    if opts.no_working_set && (opts.working_set.is_some() || opts.replay_eager) {
        return Err(format!("--no-working-set goes with neither --working-set nor --replay-eager\n{HANDLER_USAGE}"));
    }
    let replays = opts.working_set.is_some() || opts.replay_eager || opts.save_working_set.is_some();
    if one_page && (replays || opts.no_working_set) {
        return Err(format!("--one-page neither records nor replays working sets\n{HANDLER_USAGE}"));
    }
    if one_page && supervise.is_some() {
        return Err("--one-page cannot be supervised".into());
    }
    Ok(Parsed { opts, one_page, supervise: supervise.map(|_| sup), worker_fd })
}

/// Runs the handler with command-line `args` (after the program name).
pub fn handler_main(args: &[String]) -> ExitCode {
    let Parsed { opts, one_page, supervise, worker_fd } = match parse_handler(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(crate::log::StderrLog));
    if one_page {
        let listener = match crate::server::listen_at(&opts.socket) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("cannot listen on {}: {e}", opts.socket.display());
                return ExitCode::FAILURE;
            }
        };
        eprintln!("apf-handler: one page per fault on {}", opts.socket.display());
        return match crate::one_page::serve(listener, &opts.mem_file, Arc::default()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("apf-handler: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let bound = match (worker_fd, &supervise) {
        (Some(fd), _) => match crate::supervise::worker_channel(fd) {
            Ok(ctl) => Server::worker(opts, ctl),
            Err(e) => {
                eprintln!("apf-handler: --worker-fd {fd}: {e}");
                return ExitCode::from(2);
            }
        },
        (None, Some(sup)) => {
            eprintln!("apf-handler: supervising on {}", opts.socket.display());
            // Every worker gets the same arguments, `--worker-fd` added.
            return match crate::supervise::supervise(&opts, sup, args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!(
                        "apf-handler: {e}{}",
                        std::error::Error::source(&e).map(|s| format!(": {s}")).unwrap_or_default()
                    );
                    ExitCode::FAILURE
                }
            };
        }
        (None, None) => Server::bind(opts),
    };
    match bound {
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

/// `apf-fc-client`'s usage.
pub const CLIENT_USAGE: &str = "apf-fc-client --socket PATH --mem-file PATH [--threads N] [--regions N]
              [--order seq|random] [--balloon] [--misbehave CASE] [--hold-ms N] [--kernel-file]
              [--gate PATH] [--huge]

  --kernel-file   no handler: map the memory file MAP_PRIVATE and touch it the same way
                  (what Firecracker's File backend does), for comparison
  --gate PATH     touch the first pages and discard ranges, create PATH.ready, wait for PATH,
                  then restore the rest (discarded ranges must read zeros): for tests that
                  end a handler mid-restore
  --huge          guest memory of 2 MiB huge pages (MAP_HUGETLB | MAP_NORESERVE, as Firecracker
                  maps hugetlbfs memory; the memory file must be whole huge pages and the pool
                  must hold them); not with --gate or --kernel-file";

fn parse_client(args: &[String]) -> Result<ClientOptions, String> {
    let mut opts = ClientOptions {
        socket: PathBuf::new(),
        mem_file: PathBuf::new(),
        regions: 2,
        threads: 2,
        order: Order::Seq,
        balloon: false,
        misbehave: None,
        hold: Duration::from_secs(10),
        kernel_file: false,
        gate: None,
        huge: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        let num = |v: &String| v.parse::<u64>().map_err(|e| format!("{arg} {v}: {e}"));
        match arg.as_str() {
            "--socket" => opts.socket = PathBuf::from(value()?),
            "--mem-file" => opts.mem_file = PathBuf::from(value()?),
            "--threads" => opts.threads = num(value()?)? as usize,
            "--regions" => opts.regions = num(value()?)? as usize,
            "--order" => opts.order = value()?.parse()?,
            "--balloon" => opts.balloon = true,
            "--kernel-file" => opts.kernel_file = true,
            "--misbehave" => opts.misbehave = Some(value()?.parse()?),
            "--gate" => opts.gate = Some(PathBuf::from(value()?)),
            "--hold-ms" => opts.hold = Duration::from_millis(num(value()?)?),
            "--huge" => opts.huge = true,
            other => return Err(format!("unknown option {other}\n{CLIENT_USAGE}")),
        }
    }
    if opts.socket.as_os_str().is_empty() || opts.mem_file.as_os_str().is_empty() {
        return Err(CLIENT_USAGE.into());
    }
    if opts.huge && (opts.gate.is_some() || opts.kernel_file) {
        return Err("--huge does not combine with --gate or --kernel-file".into());
    }
    Ok(opts)
}

/// Runs the client with command-line `args` (after the program name).
pub fn client_main(args: &[String]) -> ExitCode {
    let opts = match parse_client(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match client::run(&opts) {
        Ok(report) => {
            println!("{}", report.to_json());
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut msg = e.to_string();
            if let Some(s) = std::error::Error::source(&e) {
                msg += &format!(": {s}");
            }
            eprintln!("apf-fc-client: {msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<(Options, bool), String> {
        let mut all = vec!["--socket", "s", "--mem-file", "m"];
        all.extend_from_slice(args);
        parse_handler(&all.iter().map(|s| s.to_string()).collect::<Vec<_>>()).map(|p| (p.opts, p.one_page))
    }

    #[test]
    fn working_set_options_parse_and_conflicts_are_named() {
        let (o, _) = parse(&["--working-set", "w", "--replay-eager", "--save-working-set", "m.ws"]).unwrap();
        assert_eq!(o.working_set, Some(PathBuf::from("w")));
        assert_eq!(o.save_working_set, Some(PathBuf::from("m.ws")));
        assert!(o.replay_eager && !o.no_working_set);
        let (o, _) = parse(&[]).unwrap();
        assert_eq!((o.working_set, o.no_working_set, o.replay_eager, o.save_working_set), (None, false, false, None));
        assert!(parse(&["--no-working-set"]).unwrap().0.no_working_set);
        let e = parse(&["--no-working-set", "--working-set", "w"]).unwrap_err();
        assert!(e.starts_with("--no-working-set goes with neither"), "{e}");
        assert!(parse(&["--no-working-set", "--replay-eager"]).is_err());
        let e = parse(&["--one-page", "--save-working-set", "w"]).unwrap_err();
        assert!(e.starts_with("--one-page neither records nor replays"), "{e}");
        assert!(parse(&["--working-set"]).unwrap_err().starts_with("--working-set needs a value"));
        assert_eq!(crate::server::beside(std::path::Path::new("/a/mem")), PathBuf::from("/a/mem.ws"));
    }
}
