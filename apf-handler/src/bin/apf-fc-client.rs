//! `apf-fc-client`: does what Firecracker does with its page-fault
//! handler (see `apf_handler::client`), or misbehaves one way. Prints its
//! report as one JSON line; exits non-zero on any failure.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use apf_handler::client::{self, ClientOptions, Order};

const USAGE: &str = "apf-fc-client --socket PATH --mem-file PATH [--threads N] [--regions N]
              [--order seq|random] [--balloon] [--misbehave CASE] [--hold-ms N]";

fn parse(args: &[String]) -> Result<ClientOptions, String> {
    let mut opts = ClientOptions {
        socket: PathBuf::new(),
        mem_file: PathBuf::new(),
        regions: 2,
        threads: 2,
        order: Order::Seq,
        balloon: false,
        misbehave: None,
        hold: Duration::from_secs(10),
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
            "--misbehave" => opts.misbehave = Some(value()?.parse()?),
            "--hold-ms" => opts.hold = Duration::from_millis(num(value()?)?),
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    if opts.socket.as_os_str().is_empty() || opts.mem_file.as_os_str().is_empty() {
        return Err(USAGE.into());
    }
    Ok(opts)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse(&args) {
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
