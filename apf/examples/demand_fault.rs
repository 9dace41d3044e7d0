//! Restores a snapshot file into fresh guest RAM on demand, twice: once read
//! by threads in sequential order, once in random order. Every page is then
//! verified byte for byte. Prints one JSON line and exits non-zero on any
//! mismatch.
//!
//! ```text
//! cargo run --release -p apf --example demand_fault -- [--size-mib 256]
//!     [--order both|seq|random] [--threads 2] [--workers 2] [--window 256]
//!     [--dispatch auto|inline|workers] [--handler apf|baseline|kernel]
//!     [--spin-us N] [--seed N] [--file PATH]
//! ```
//!
//! `--handler baseline` resolves with one thread and one page per fault;
//! `--handler kernel` skips userfaultfd and lets the kernel zero-fill fresh
//! memory (the threads write instead of read, and verification checks what
//! they wrote). Both are there to compare against.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use apf::{splitmix64, Dispatch, Engine, GuestAddress, GuestRam, Pattern, SinglePageHandler, SnapshotFile, PAGE_SIZE};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Handler {
    Apf,
    Baseline,
    Kernel,
}

struct Args {
    size: usize,
    orders: Vec<&'static str>,
    threads: usize,
    workers: usize,
    window: usize,
    dispatch: Dispatch,
    handler: Handler,
    spin_us: u64,
    seed: u64,
    file: Option<PathBuf>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        size: 256 << 20,
        orders: vec!["sequential", "random"],
        threads: 2,
        workers: 2,
        window: apf::Config::default().max_window,
        dispatch: Dispatch::Auto,
        handler: Handler::Apf,
        spin_us: apf::Config::default().spin.as_micros() as u64,
        seed: splitmix64(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
        ),
        file: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{flag}: {v:?}: {e}"));
        match flag.as_str() {
            "--size-mib" => {
                let mib = num(value()?)?;
                if mib == 0 || mib > 64 << 10 {
                    return Err(format!("--size-mib must be between 1 and 65536, got {mib}"));
                }
                a.size = (mib << 20) as usize;
            }
            "--order" => {
                a.orders = match value()?.as_str() {
                    "both" => vec!["sequential", "random"],
                    "seq" | "sequential" => vec!["sequential"],
                    "random" => vec!["random"],
                    other => return Err(format!("--order: expected both, seq or random, got {other:?}")),
                }
            }
            "--threads" => a.threads = num(value()?)?.clamp(1, 64) as usize,
            "--workers" => a.workers = num(value()?)? as usize,
            "--window" => a.window = num(value()?)? as usize,
            "--dispatch" => a.dispatch = value()?.parse()?,
            "--handler" => {
                a.handler = match value()?.as_str() {
                    "apf" => Handler::Apf,
                    "baseline" => Handler::Baseline,
                    "kernel" => Handler::Kernel,
                    other => return Err(format!("--handler: expected apf, baseline or kernel, got {other:?}")),
                }
            }
            "--seed" => a.seed = num(value()?)?,
            "--spin-us" => a.spin_us = num(value()?)?.min(1_000_000),
            "--file" => a.file = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err("usage: demand_fault [--size-mib N] [--order both|seq|random] [--threads N] [--workers N] [--window PAGES] [--dispatch auto|inline|workers] [--handler apf|baseline|kernel] [--spin-us N] [--seed N] [--file PATH]".into()),
            other => return Err(format!("unknown option {other:?} (try --help)")),
        }
    }
    Ok(a)
}

fn write_image(path: &PathBuf, size: usize, pattern: Pattern) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut chunk = vec![0u8; 1 << 20];
    for off in (0..size).step_by(chunk.len()) {
        let n = chunk.len().min(size - off);
        pattern.write(off as u64, &mut chunk[..n]);
        f.write_all(&chunk[..n])?;
    }
    f.flush()
}

/// The page order of thread `t` of `threads`.
fn pages_for(order: &str, t: usize, threads: usize, pages: usize, seed: u64) -> Vec<usize> {
    let per = pages.div_ceil(threads);
    let mut mine: Vec<usize> = (t * per..((t + 1) * per).min(pages)).collect();
    if order == "random" {
        // Fisher-Yates with a seeded generator.
        let mut state = seed ^ t as u64;
        for i in (1..mine.len()).rev() {
            state = splitmix64(state);
            mine.swap(i, (state % (i as u64 + 1)) as usize);
        }
    }
    mine
}

struct Pass {
    order: &'static str,
    seconds: f64,
    faults: u64,
    bytes_installed: u64,
    mismatches: u64,
    stats: String,
}

fn run_pass(
    args: &Args,
    order: &'static str,
    path: &PathBuf,
    pattern: Pattern,
) -> Result<Pass, Box<dyn std::error::Error>> {
    let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), args.size)])?);
    let pages = ram.pages();
    let base = ram.regions()[0].host_base() as usize;
    let mut engine = None;
    let mut baseline = None;
    match args.handler {
        Handler::Apf => {
            let source = Arc::new(SnapshotFile::open(path, &ram)?);
            engine = Some(
                Engine::builder(ram.clone(), source)
                    .config(apf::Config {
                        workers: args.workers,
                        max_window: args.window,
                        dispatch: args.dispatch,
                        spin: std::time::Duration::from_micros(args.spin_us),
                        ..apf::Config::default()
                    })
                    .start()?,
            );
        }
        Handler::Baseline => {
            let source = Arc::new(SnapshotFile::open(path, &ram)?);
            baseline = Some(SinglePageHandler::start(ram.clone(), source)?);
        }
        Handler::Kernel => {}
    }
    let write = args.handler == Handler::Kernel;
    let lists: Vec<Vec<usize>> =
        (0..args.threads).map(|t| pages_for(order, t, args.threads, pages, args.seed)).collect();
    let start = Instant::now();
    std::thread::scope(|s| {
        for list in &lists {
            s.spawn(move || {
                let mut sum = 0u64;
                for &p in list {
                    let addr = (base + p * PAGE_SIZE) as *mut u64;
                    if write {
                        // SAFETY: `addr` is the first word of page `p` of
                        // the region, mapped for the whole pass; the kernel
                        // zero-fills it on first touch.
                        unsafe { std::ptr::write_volatile(addr, p as u64) };
                    } else {
                        // SAFETY: as above; the engine (or the baseline)
                        // installs the page on first touch.
                        sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(addr) });
                    }
                }
                std::hint::black_box(sum);
            });
        }
    });
    let seconds = start.elapsed().as_secs_f64();

    // Verify every page, every byte.
    let mut mismatches = 0;
    let mut first_bad = None;
    for p in 0..pages {
        let gpa = (p * PAGE_SIZE) as u64;
        // SAFETY: the page is inside the region and present (touched above).
        let page = unsafe { std::slice::from_raw_parts((base + p * PAGE_SIZE) as *const u8, PAGE_SIZE) };
        let ok = if write {
            page[..8] == (p as u64).to_le_bytes() && page[8..].iter().all(|&b| b == 0)
        } else {
            pattern.verify(gpa, page).is_ok()
        };
        if !ok {
            mismatches += 1;
            first_bad.get_or_insert(gpa);
        }
    }
    if let Some(gpa) = first_bad {
        eprintln!("demand_fault: {order}: {mismatches} pages differ, first at {gpa:#x}");
    }
    let (faults, bytes_installed, stats) = match (&engine, &baseline) {
        (Some(e), _) => {
            let s = e.stats();
            (s.faults, s.bytes_installed, s.to_json())
        }
        (_, Some(b)) => (b.faults(), b.faults() * PAGE_SIZE as u64, "{}".into()),
        _ => (pages as u64, args.size as u64, "{}".into()),
    };
    if let Some(e) = engine {
        let report = e.shutdown();
        debug_assert_eq!(report.poisoned_pages, 0);
    }
    drop(baseline);
    Ok(Pass { order, seconds, faults, bytes_installed, mismatches, stats })
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("demand_fault: {e}");
            return ExitCode::from(2);
        }
    };
    let pattern = Pattern { seed: args.seed };
    let own_file = args.file.is_none();
    let path = args
        .file
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("apf-demand-fault-{}.img", std::process::id())));
    if args.handler != Handler::Kernel {
        if let Err(e) = write_image(&path, args.size, pattern) {
            eprintln!("demand_fault: cannot write {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    let mut passes = Vec::new();
    for &order in &args.orders {
        match run_pass(&args, order, &path, pattern) {
            Ok(p) => passes.push(p),
            Err(e) => {
                eprintln!("demand_fault: {order} pass failed: {e}");
                if own_file {
                    let _ = std::fs::remove_file(&path);
                }
                return ExitCode::from(2);
            }
        }
    }
    if own_file {
        let _ = std::fs::remove_file(&path);
    }
    let pages = (args.size / PAGE_SIZE) as u64 * passes.len() as u64;
    let sum = |f: fn(&Pass) -> u64| passes.iter().map(f).sum::<u64>();
    let mismatches = sum(|p| p.mismatches);
    let seconds: f64 = passes.iter().map(|p| p.seconds).sum();
    let details: Vec<String> = passes
        .iter()
        .map(|p| {
            format!(
                "{{\"order\":\"{}\",\"seconds\":{:.4},\"gb_per_s\":{:.3},\"faults\":{},\"bytes_installed\":{},\"mismatches\":{},\"engine\":{}}}",
                p.order,
                p.seconds,
                args.size as f64 / p.seconds / 1e9,
                p.faults,
                p.bytes_installed,
                p.mismatches,
                p.stats
            )
        })
        .collect();
    println!(
        "{{\"pages\":{pages},\"faults\":{},\"bytes_installed\":{},\"mismatches\":{mismatches},\"seconds\":{seconds:.4},\"handler\":\"{:?}\",\"threads\":{},\"window\":{},\"passes\":[{}]}}",
        sum(|p| p.faults),
        sum(|p| p.bytes_installed),
        args.handler,
        args.threads,
        args.window,
        details.join(",")
    );
    if mismatches > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
