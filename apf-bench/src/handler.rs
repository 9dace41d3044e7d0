//! The external page-fault handler (`apf-handler`, Firecracker's
//! protocol) against a one-page-per-fault handler of the same protocol and
//! against the memory file mapped `MAP_PRIVATE` (Firecracker's File
//! backend), each restore a separate client process doing what Firecracker
//! does ([`apf_handler::client`]) with two threads reading every page, in
//! order or at random, and verifying all of memory afterwards.
//!
//! Host-side clients: the threads touching memory are host threads, not a
//! guest's vCPUs. Every variant runs in fresh processes: the handler (or
//! none, for the file mapping) and the client, both this program again
//! through its `uffd-handler` and `fc-client` subcommands
//! ([`subcommand`]).
//!
//! Guest restores (through a VMM's [`GuestPass`]): the guest agent's
//! first pass over a restored snapshot, two vCPUs, guest RAM served by the
//! handler in its own process, against the one-page handler and against
//! the VMM with the snapshot file mapped `MAP_PRIVATE` as guest RAM (its
//! `file` backend: no userfaultfd, the kernel's page-cache faults).

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::{median, GuestPass};

/// The restores measured, per order.
#[derive(Debug, Clone, Default)]
pub struct HandlerFigures {
    /// Bytes of memory restored.
    pub bytes: u64,
    /// Per round: first-pass seconds of (one-page, apf handler, kernel
    /// file), in order.
    pub seq: Vec<[f64; 3]>,
    /// The same, at random.
    pub random: Vec<[f64; 3]>,
    /// Per round and order: the apf handler's load (connection to the two
    /// "device" pages written), ms.
    pub load_ms: Vec<f64>,
    /// The one-page handler's load, ms.
    pub one_page_load_ms: Vec<f64>,
    /// Guest bytes restored (0: no guest restores).
    pub guest_bytes: u64,
    /// Per round: guest first-pass seconds of (one-page, apf handler,
    /// kernel file), in order.
    pub guest_seq: Vec<[f64; 3]>,
    /// The same, at random.
    pub guest_random: Vec<[f64; 3]>,
}

impl HandlerFigures {
    /// Median over rounds of variant `a`'s speed over `b`'s (first-pass
    /// time of `b` over `a`, paired per round).
    pub fn ratio(&self, random: bool, a: usize, b: usize) -> f64 {
        let rounds = if random { &self.random } else { &self.seq };
        median(rounds.iter().map(|r| r[b] / r[a].max(1e-9)).collect())
    }

    /// The same for the guest restores (0 if none ran).
    pub fn guest_ratio(&self, random: bool) -> f64 {
        let rounds = if random { &self.guest_random } else { &self.guest_seq };
        median(rounds.iter().map(|r| r[0] / r[1].max(1e-9)).collect())
    }

    /// The handler's guest first-pass speed over the file mapping's
    /// (paired per round; 0 if none ran).
    pub fn guest_ratio_vs_file(&self, random: bool) -> f64 {
        let rounds = if random { &self.guest_random } else { &self.guest_seq };
        median(rounds.iter().map(|r| r[2] / r[1].max(1e-9)).collect())
    }
}

/// Runs the program's `uffd-handler` or `fc-client` subcommand if `args`
/// name one (the bench starts these processes from its own executable).
pub fn subcommand(args: &[String]) -> Option<ExitCode> {
    match args.first().map(String::as_str) {
        Some("uffd-handler") => Some(apf_handler::cli::handler_main(&args[1..])),
        Some("fc-client") => Some(apf_handler::cli::client_main(&args[1..])),
        _ => None,
    }
}

/// A child process, killed through its own handle if still running.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn handler(exe: &Path, dir: &Path, mem: &Path, one_page: bool) -> Result<Child, String> {
    let sock = dir.join(if one_page { "one-page.sock" } else { "apf.sock" });
    let _ = std::fs::remove_file(&sock);
    let mut cmd = Command::new(exe);
    cmd.arg("uffd-handler").arg("--socket").arg(&sock).arg("--mem-file").arg(mem);
    if one_page {
        cmd.arg("--one-page");
    }
    let child =
        Child(cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().map_err(|e| e.to_string())?);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if Instant::now() >= deadline {
            return Err("the handler did not listen within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(child)
}

/// One client restore: (first-pass seconds, load ms).
fn client(exe: &Path, sock: &Path, mem: &Path, random: bool, kernel_file: bool) -> Result<(f64, f64), String> {
    let mut cmd = Command::new(exe);
    cmd.arg("fc-client").arg("--socket").arg(sock).arg("--mem-file").arg(mem).args([
        "--threads",
        "2",
        "--regions",
        "1",
    ]);
    cmd.args(["--order", if random { "random" } else { "seq" }]);
    if kernel_file {
        cmd.arg("--kernel-file");
    }
    let child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| e.to_string())?;
    let mut child = Child(child);
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = child.0.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if Instant::now() >= deadline {
            return Err("a client restore was still running after 300 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(o) = child.0.stdout.as_mut() {
        let _ = std::io::Read::read_to_string(o, &mut out);
    }
    if let Some(e) = child.0.stderr.as_mut() {
        let _ = std::io::Read::read_to_string(e, &mut err);
    }
    if !status.success() {
        return Err(format!("client failed ({status}): {}", err.trim()));
    }
    let r: serde_json::Value = serde_json::from_str(out.trim()).map_err(|e| format!("client output {out:?}: {e}"))?;
    if r["verified"] != r["pages"] {
        return Err(format!("client verified {} of {} pages", r["verified"], r["pages"]));
    }
    let f = |k: &str| r[k].as_f64().ok_or_else(|| format!("client output lacks {k}"));
    Ok((f("first_pass_ms")? / 1e3, f("load_ms")?))
}

/// Measures `rounds` rounds over a memory file of `bytes` in `dir`, the
/// processes started from `exe`.
pub fn run(
    exe: &Path,
    dir: &Path,
    bytes: u64,
    rounds: usize,
    guest: Option<(&dyn GuestPass, &Path, u64)>,
) -> Result<HandlerFigures, String> {
    let mem = dir.join("handler.mem");
    crate::run::write_image(&mem, bytes, apf::Pattern { seed: 3 }).map_err(|e| format!("{}: {e}", mem.display()))?;
    let mut figures = HandlerFigures { bytes, ..HandlerFigures::default() };
    for _ in 0..rounds {
        for random in [false, true] {
            let mut row = [0.0; 3];
            for (i, one_page) in [(0, true), (1, false)] {
                let h = handler(exe, dir, &mem, one_page)?;
                let sock = dir.join(if one_page { "one-page.sock" } else { "apf.sock" });
                let (secs, load) = client(exe, &sock, &mem, random, false)?;
                drop(h);
                row[i] = secs;
                if one_page { &mut figures.one_page_load_ms } else { &mut figures.load_ms }.push(load);
            }
            row[2] = client(exe, &dir.join("none.sock"), &mem, random, true)?.0;
            if random { &mut figures.random } else { &mut figures.seq }.push(row);
        }
    }
    let _ = std::fs::remove_file(&mem);
    if let Some((g, snapshot, guest_bytes)) = guest {
        if !snapshot.exists() {
            g.make_snapshot(guest_bytes, snapshot).map_err(|e| format!("cannot make the guest snapshot: {e}"))?;
        }
        figures.guest_bytes = guest_bytes;
        for _ in 0..rounds {
            for random in [false, true] {
                let mut row = [0.0; 3];
                let per_memory =
                    |sample: crate::Sample| sample.seconds * (guest_bytes / 4096) as f64 / sample.pages.max(1) as f64;
                for (i, one_page) in [(0, true), (1, false)] {
                    let h = handler(exe, dir, snapshot, one_page)?;
                    let sock = dir.join(if one_page { "one-page.sock" } else { "apf.sock" });
                    let sample = g.handler_first_pass(&sock, random, snapshot)?;
                    drop(h);
                    row[i] = per_memory(sample);
                }
                // The same snapshot as file-backed guest RAM, no handler.
                row[2] = per_memory(g.first_pass(crate::Variant::KernelFile, random, Some(snapshot), guest_bytes)?);
                if random { &mut figures.guest_random } else { &mut figures.guest_seq }.push(row);
            }
        }
    }
    Ok(figures)
}
