//! What the handler's process tests share: the binaries, a scratch
//! directory, a memory file, child processes killed if a test ends first,
//! and starting the handler and Firecracker-like clients on `dir/sock`.

// Each test file uses its own part of it; what one leaves unused is not dead.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const HANDLER: &str = env!("CARGO_BIN_EXE_apf-handler");
pub const CLIENT: &str = env!("CARGO_BIN_EXE_apf-fc-client");
pub const MIB: usize = 1 << 20;

/// A directory removed on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("apf-handler-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A memory file of `len` bytes: every word distinct (its offset, mixed).
pub fn mem_file(dir: &Path, len: usize) -> PathBuf {
    let path = dir.join("mem");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    for w in 0..len / 8 {
        f.write_all(&apf::splitmix64(w as u64).to_le_bytes()).unwrap();
    }
    f.flush().unwrap();
    path
}

/// A child process killed (by its own handle) if the test ends first.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Its exit, or a failure naming `what` at the deadline.
    pub fn wait(&mut self, within: Duration, what: &str) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "{what}: still running after {within:?} (left blocked)");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for its exit and returns its stdout.
    pub fn output(mut self, within: Duration, what: &str) -> (ExitStatus, String) {
        let status = self.wait(within, what);
        let mut out = String::new();
        std::io::Read::read_to_string(self.0.stdout.as_mut().unwrap(), &mut out).unwrap();
        (status, out)
    }
}

/// The handler's log (its stderr) so far.
pub fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("handler.log")).unwrap_or_default()
}

/// Starts the handler on `dir/sock` with `args` (reports to
/// `dir/report.jsonl`, its log to `dir/handler.log`) and waits until it
/// listens.
pub fn handler(dir: &Path, mem: &Path, args: &[&str]) -> Proc {
    let sock = dir.join("sock");
    let child = Command::new(HANDLER)
        .arg("--socket")
        .arg(&sock)
        .arg("--mem-file")
        .arg(mem)
        .arg("--report")
        .arg(dir.join("report.jsonl"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("handler.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the handler did not listen");
        std::thread::sleep(Duration::from_millis(5));
    }
    Proc(child)
}

/// Starts a Firecracker-like client on `dir/sock` with `args`; its stdout
/// is piped (see [`Proc::output`]), its stderr goes to `stderr`.
pub fn client(dir: &Path, mem: &Path, args: &[&str], stderr: Stdio) -> Proc {
    let child = Command::new(CLIENT)
        .arg("--socket")
        .arg(dir.join("sock"))
        .arg("--mem-file")
        .arg(mem)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    Proc(child)
}
