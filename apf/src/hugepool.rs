//! Reservations of 2 MiB huge pages in the kernel's pool, shared by every
//! process of the project, put back when the last holder is done or dies.
//!
//! Huge-page memory (`MAP_HUGETLB`, `MFD_HUGETLB`) comes from a pool the
//! kernel sizes by `/proc/sys/vm/nr_hugepages`, which starts at 0. A process
//! that needs `n` pages raises that value by `n` for as long as it holds a
//! [`Reservation`]:
//!
//! ```no_run
//! use std::time::{Duration, Instant};
//! use apf::hugepool::{HugePool, HugePoolError};
//!
//! // 64 MiB of guest RAM in 2 MiB pages.
//! match HugePool::reserve(32, Instant::now() + Duration::from_secs(10)) {
//!     Ok(reservation) => {
//!         assert_eq!(reservation.pages(), 32);
//!         // ... map MAP_HUGETLB memory, run the guest ...
//!         drop(reservation); // the pool shrinks back
//!     }
//!     Err(HugePoolError::Shortfall { asked, got }) => eprintln!("only {got} of {asked} huge pages"),
//!     Err(e) => return Err(e.into()),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # What the kernel does
//!
//! Writing a larger value to `nr_hugepages` succeeds even when the kernel
//! allocated fewer pages (memory is short or fragmented), so every raise is
//! read back from `HugePages_Total` (less `HugePages_Surp`, the overcommitted
//! pages that `nr_hugepages` does not count) in `/proc/meminfo`; a shortfall
//! puts the old value back and is an error. Lowering the value while pages
//! are mapped does not fail either: the kernel frees the pool's free pages
//! now and the rest as they are unmapped.
//!
//! A raise that cannot fit in the memory available is refused before the
//! kernel is asked: the kernel would reclaim the whole machine's page cache
//! and hold every free page in the pool until the value is put back, and
//! other processes allocating in that window would meet the OOM killer.
//!
//! # Sharing the pool
//!
//! Every process takes [`LOCK_PATH`] (an exclusive `flock`, as the memory
//! block lock of the `hostmem` module does) around each change, not for a
//! reservation's lifetime: the lock file holds the reference count. Its
//! record is the value `nr_hugepages` had before the first live reservation
//! and one `<pid> <start time> <id> <pages>` line per live reservation, so
//! the pool's value is always the original plus the sum of the pages of the
//! live lines. The last reservation to go puts the original back and clears
//! the record. A holder that died (its pid is gone, or now names a process
//! that started at another time: pid reuse) is dropped from the record by
//! the next process that takes the lock, which resizes the pool to match.
//!
//! Every change is recorded in the order that a crash anywhere leaves a
//! record the next holder can repair: a new line is written before the pool
//! grows, and the pool shrinks before a line is removed.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::hostmem::{interruptible_write, lock_file, Interruptible, LockFileError};

/// The lock file every process of the project takes around a change of the
/// huge-page pool; it records the live reservations.
pub const LOCK_PATH: &str = "/tmp/apf-hugepages.lock";

/// The size of the pool the kernel keeps there (the default huge page size).
pub const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Where the pool's size is read back.
const MEMINFO: &str = "/proc/meminfo";

/// The huge page size reservations are counted in.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Memory left to the rest of the machine: a raise that would leave less
/// than this of `MemAvailable` is refused before the kernel is asked.
pub const HEADROOM: u64 = 1 << 30;

/// How long a dropped [`Reservation`] waits for the lock. When it cannot get
/// it, its line stays in the record and is cleaned up after this process
/// exits, like a crashed holder's.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long giving pages back may take. Shrinking the pool frees pages and
/// allocates none; this only bounds a kernel that misbehaves.
pub const SHRINK_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a busy lock is tried again.
const LOCK_POLL: Duration = Duration::from_millis(5);

/// First line of the lock file's record.
const RECORD_HEADER: &str =
    "# apf: huge-page reservations: \"original <nr_hugepages>\", then \"<pid> <start> <id> <pages>\" a line\n";

/// Identifies the reservations of this process in the record.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Errors from reserving huge pages. Each carries the errno or the path that
/// caused it.
#[derive(Debug, Error)]
pub enum HugePoolError {
    /// The pool did not grow by the pages asked for; it was put back as it
    /// was. `got` is what the kernel added (0 when the request was refused
    /// before asking the kernel because it does not fit in the memory
    /// available, less [`HEADROOM`]).
    #[error("asked for {asked} huge pages of 2 MiB, the pool could grow by only {got}")]
    Shortfall {
        /// Pages asked for.
        asked: u64,
        /// Pages the kernel allocated before the value was put back.
        got: u64,
    },
    /// The deadline interrupted the kernel while it grew the pool; the pool
    /// was put back as it was. `got` is what the kernel had added.
    #[error("the deadline stopped the pool's growth after {got} of {asked} huge pages of 2 MiB")]
    Deadline {
        /// Pages asked for.
        asked: u64,
        /// Pages the kernel allocated before the deadline.
        got: u64,
    },
    /// The write to `nr_hugepages` ignored the deadline's signals; its thread
    /// was abandoned, and the reservation's line stays in the record until
    /// this process exits.
    #[error("writing nr_hugepages ignored {signals} signals for {waited:?}")]
    Stuck {
        /// From the call until the write was abandoned.
        waited: Duration,
        /// Signals sent.
        signals: u32,
    },
    /// The thread that writes `nr_hugepages` or its signal handler could not
    /// be set up.
    #[error("cannot {what}")]
    Setup {
        /// What failed.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A file that needs root is not writable.
    #[error("{path}: permission denied (reserving huge pages needs root)")]
    NotPermitted {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The lock file could not be opened, locked, read or written.
    #[error("cannot open, lock or write the lock file {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Another process held the lock until the deadline.
    #[error("lock file {path} still held by another process after {waited:?}")]
    LockTimeout {
        /// The lock file.
        path: PathBuf,
        /// How long this process waited.
        waited: Duration,
    },
    /// Reading or writing a kernel file failed.
    #[error("cannot {op} {path}")]
    Io {
        /// `read` or `write`.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A kernel file does not hold what the kernel writes there.
    #[error("{path} has no {field} the way the kernel writes it")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was looked for.
        field: &'static str,
    },
    /// The default huge page size is not 2 MiB, so `nr_hugepages` does not
    /// count 2 MiB pages.
    #[error("the default huge page size is {kib} KiB, not 2048 KiB")]
    PageSize {
        /// `Hugepagesize` of `/proc/meminfo`.
        kib: u64,
    },
    /// Zero pages, or so many that the count overflows.
    #[error("cannot reserve {pages} huge pages")]
    BadCount {
        /// The count asked for.
        pages: u64,
    },
}

/// The huge-page pool of the machine: reservations through
/// `/proc/sys/vm/nr_hugepages` (see the module docs).
#[derive(Debug)]
pub struct HugePool;

impl HugePool {
    /// Raises `/proc/sys/vm/nr_hugepages` by `pages` 2 MiB pages for this
    /// [`Reservation`]'s lifetime. Waits for the lock until `deadline`
    /// ([`HugePoolError::LockTimeout`]); a pool that does not grow by all
    /// of `pages` is put back and reported as [`HugePoolError::Shortfall`].
    pub fn reserve(pages: u64, deadline: Instant) -> Result<Reservation, HugePoolError> {
        HugePool::lock(deadline)?.reserve(pages, deadline)
    }

    /// Takes the pool's lock until `deadline`, and cleans up after holders
    /// that died. Hold it to see the pool unchanged by other processes
    /// (tests); [`HugePool::reserve`] takes it for the change only.
    pub fn lock(deadline: Instant) -> Result<PoolLock, HugePoolError> {
        PoolLock::acquire(deadline)
    }

    /// `/proc/sys/vm/nr_hugepages` now.
    pub fn nr_hugepages() -> Result<u64, HugePoolError> {
        let text = std::fs::read_to_string(NR_HUGEPAGES).map_err(|source| io_err("read", NR_HUGEPAGES, source))?;
        text.trim().parse().map_err(|_| HugePoolError::Parse { path: NR_HUGEPAGES.into(), field: "count" })
    }

    /// Pages in the pool that `nr_hugepages` counts: `HugePages_Total` less
    /// `HugePages_Surp`, from `/proc/meminfo`.
    pub fn total() -> Result<u64, HugePoolError> {
        let info = Meminfo::read()?;
        Ok(info.total.saturating_sub(info.surplus))
    }

    /// Grows the pool back to the size the machine's live reservations
    /// hold, if it fell below it, and returns the pages added (0 if none
    /// was missing, or there is no live reservation). Taking a host memory
    /// block offline dissolves the free huge pages inside it: the pool
    /// shrinks, and a page the balloon discarded may find none to be
    /// filled from. Waits for the lock, and interrupts the kernel's
    /// allocation, at `deadline`.
    pub fn top_up(deadline: Instant) -> Result<u64, HugePoolError> {
        HugePool::lock(deadline)?.top_up(deadline)
    }
}

/// Huge pages this process holds in the pool. Dropping it gives them back,
/// and puts the original `nr_hugepages` back when it is the last
/// reservation of the machine (waiting for the lock at most
/// [`RELEASE_TIMEOUT`]; [`release`](Self::release) reports errors instead).
#[derive(Debug)]
#[must_use = "the pages go back to the kernel when the reservation is dropped"]
pub struct Reservation {
    pages: u64,
    id: u64,
    /// The process that made it: a copy in a forked child gives nothing back.
    pid: u32,
    released: bool,
}

impl Reservation {
    /// The 2 MiB pages reserved.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The bytes reserved.
    pub fn bytes(&self) -> u64 {
        self.pages * HUGE_PAGE_SIZE
    }

    /// Gives the pages back now, waiting for the lock until `deadline`.
    pub fn release(mut self, deadline: Instant) -> Result<(), HugePoolError> {
        let mut lock = HugePool::lock(deadline)?;
        self.release_locked(&mut lock)
    }

    /// Gives the pages back under a lock the caller holds.
    pub fn release_with(mut self, lock: &mut PoolLock) -> Result<(), HugePoolError> {
        self.release_locked(lock)
    }

    fn release_locked(&mut self, lock: &mut PoolLock) -> Result<(), HugePoolError> {
        if self.released || self.pid != std::process::id() {
            return Ok(());
        }
        let mut holders = lock.record.holders.clone();
        holders.retain(|h| !(h.pid == self.pid && h.id == self.id));
        // Shrink first, then forget the line: a crash in between leaves a
        // dead holder's line, and its recovery shrinks to the same value.
        lock.resize(&holders, Instant::now() + SHRINK_TIMEOUT)?;
        lock.record.holders = holders;
        if lock.record.holders.is_empty() {
            lock.record.original = None;
        }
        lock.write_record()?;
        self.released = true;
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.released || self.pid != std::process::id() {
            return;
        }
        let result =
            HugePool::lock(Instant::now() + RELEASE_TIMEOUT).and_then(|mut lock| self.release_locked(&mut lock));
        if let Err(e) = result {
            tracing::warn!(pages = self.pages, "huge pages not given back now, but after this process exits: {e}");
        }
    }
}

/// One live reservation in the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    /// The process.
    pub pid: u32,
    /// Its start time (clock ticks after boot, `/proc/<pid>/stat`), against
    /// pid reuse.
    pub start: u64,
    /// The reservation's number within the process.
    pub id: u64,
    /// Its pages.
    pub pages: u64,
}

/// The lock file's record: the value before the first live reservation, and
/// the live reservations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Record {
    original: Option<u64>,
    holders: Vec<Holder>,
}

impl Record {
    /// The record of a lock file; malformed lines (a crash while writing)
    /// are skipped.
    fn parse(text: &str) -> Record {
        let mut record = Record::default();
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["original", n] => record.original = n.parse().ok(),
                [pid, start, id, pages] => {
                    let holder = (|| {
                        Some(Holder {
                            pid: pid.parse().ok()?,
                            start: start.parse().ok()?,
                            id: id.parse().ok()?,
                            pages: pages.parse().ok()?,
                        })
                    })();
                    record.holders.extend(holder);
                }
                _ => {}
            }
        }
        record
    }

    fn text(&self) -> String {
        let mut text = String::from(RECORD_HEADER);
        if let Some(original) = self.original {
            let _ = writeln!(text, "original {original}");
        }
        for h in &self.holders {
            let _ = writeln!(text, "{} {} {} {}", h.pid, h.start, h.id, h.pages);
        }
        text
    }
}

/// The pool's lock, held: the exclusive right to change `nr_hugepages` and
/// the record. Dropping it lets the next process in.
#[derive(Debug)]
pub struct PoolLock {
    file: File,
    record: Record,
    recovered: Vec<Holder>,
}

impl PoolLock {
    fn acquire(deadline: Instant) -> Result<PoolLock, HugePoolError> {
        let file = lock_file(LOCK_PATH, deadline, LOCK_POLL).map_err(|e| match e {
            LockFileError::Denied(source) => HugePoolError::NotPermitted { path: LOCK_PATH.into(), source },
            LockFileError::Io(source) => lock_err(source),
            LockFileError::Timeout(waited) => HugePoolError::LockTimeout { path: LOCK_PATH.into(), waited },
        })?;
        let mut text = String::new();
        (&file).read_to_string(&mut text).map_err(lock_err)?;
        let mut lock = PoolLock { file, record: Record::parse(&text), recovered: Vec::new() };
        lock.recover()?;
        Ok(lock)
    }

    /// Drops the lines of holders that died and resizes the pool to the
    /// live ones (the original value when none is left).
    fn recover(&mut self) -> Result<(), HugePoolError> {
        let (live, dead): (Vec<Holder>, Vec<Holder>) = self.record.holders.iter().partition(|h| alive(h));
        if dead.is_empty() {
            return Ok(());
        }
        // Without the original value (a record torn at its start) the pool
        // cannot be sized: it is left as it is.
        self.resize(&live, Instant::now() + SHRINK_TIMEOUT)?;
        self.record.holders = live;
        if self.record.holders.is_empty() {
            self.record.original = None;
        }
        self.recovered = dead;
        self.write_record()
    }

    /// Holders that had died, whose pages taking this lock gave back.
    pub fn recovered(&self) -> &[Holder] {
        &self.recovered
    }

    /// The live reservations of the machine.
    pub fn holders(&self) -> &[Holder] {
        &self.record.holders
    }

    /// `nr_hugepages` before the first live reservation (`None` when there
    /// is none).
    pub fn original(&self) -> Option<u64> {
        self.record.original
    }

    /// Reserves `pages` more huge pages under this lock; the kernel's
    /// allocation is interrupted at `deadline` ([`HugePoolError::Deadline`]).
    pub fn reserve(&mut self, pages: u64, deadline: Instant) -> Result<Reservation, HugePoolError> {
        let info = Meminfo::read()?;
        if info.page_kib != HUGE_PAGE_SIZE / 1024 {
            return Err(HugePoolError::PageSize { kib: info.page_kib });
        }
        let bytes = pages.checked_mul(HUGE_PAGE_SIZE).ok_or(HugePoolError::BadCount { pages })?;
        if pages == 0 {
            return Err(HugePoolError::BadCount { pages });
        }
        if bytes.saturating_add(HEADROOM) > info.available {
            return Err(HugePoolError::Shortfall { asked: pages, got: 0 });
        }
        if self.record.original.is_none() {
            self.record.original = Some(HugePool::nr_hugepages()?);
        }
        let before = self.target(&self.record.holders).ok_or(HugePoolError::BadCount { pages })?;
        let holder = Holder {
            pid: std::process::id(),
            start: start_time(std::process::id())?,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            pages,
        };
        let mut holders = self.record.holders.clone();
        holders.push(holder);
        // Record first, then grow: a crash in between leaves a dead line,
        // and its recovery sizes the pool without it.
        let previous = std::mem::replace(&mut self.record.holders, holders);
        self.write_record()?;
        let grown = self.resize(&self.record.holders.clone(), deadline);
        if let Err(e @ HugePoolError::Stuck { .. }) = grown {
            // The write still runs: neither the pool nor the record can be
            // put back now. The line stays until this process exits, and
            // the next holder of the lock then recovers it.
            return Err(e);
        }
        let got = grown.and_then(|interrupted| Ok((interrupted, HugePool::total()?)));
        let got = match got {
            Ok((_, total)) if total >= before + pages => {
                return Ok(Reservation { pages, id: holder.id, pid: holder.pid, released: false });
            }
            Ok((interrupted, total)) => {
                let got = total.saturating_sub(before);
                Err(if interrupted {
                    HugePoolError::Deadline { asked: pages, got }
                } else {
                    HugePoolError::Shortfall { asked: pages, got }
                })
            }
            Err(e) => Err(e),
        };
        // Put the pool and the record back as they were.
        self.record.holders = previous;
        let restored = self.resize(&self.record.holders.clone(), Instant::now() + SHRINK_TIMEOUT);
        if self.record.holders.is_empty() {
            self.record.original = None;
        }
        self.write_record()?;
        restored?;
        got
    }

    /// [`HugePool::top_up`] under this lock.
    pub fn top_up(&mut self, deadline: Instant) -> Result<u64, HugePoolError> {
        let Some(target) = self.target(&self.record.holders) else {
            return Ok(0);
        };
        let before = HugePool::total()?;
        if before >= target {
            return Ok(0);
        }
        self.resize(&self.record.holders.clone(), deadline)?;
        Ok(HugePool::total()?.saturating_sub(before))
    }

    /// The pool's size with `holders` live: the original plus their pages.
    fn target(&self, holders: &[Holder]) -> Option<u64> {
        holders.iter().try_fold(self.record.original?, |sum, h| sum.checked_add(h.pages))
    }

    /// Writes the pool's size for `holders` to `nr_hugepages`, interrupting
    /// the write from `deadline` on. The kernel allocates a growth page by
    /// page and stops at a pending signal, and the write still succeeds:
    /// the pool is then short, which only the read-back shows. Returns
    /// whether the deadline's signal was sent.
    fn resize(&self, holders: &[Holder], deadline: Instant) -> Result<bool, HugePoolError> {
        let Some(target) = self.target(holders) else {
            return Ok(false);
        };
        let map = |source: io::Error| match source.raw_os_error() {
            Some(libc::EACCES | libc::EPERM) => HugePoolError::NotPermitted { path: NR_HUGEPAGES.into(), source },
            _ => io_err("write", NR_HUGEPAGES, source),
        };
        let file = OpenOptions::new().write(true).open(NR_HUGEPAGES).map_err(map)?;
        let written = interruptible_write(file, format!("{target}\n").into_bytes(), "apf-hugepool".into(), deadline)
            .map_err(|(what, source)| HugePoolError::Setup { what, source })?;
        match written {
            Interruptible::Returned { result: Ok(()), signals, .. } => Ok(signals > 0),
            // An interrupted write may fail with EINTR before it allocated.
            Interruptible::Returned { result: Err(e), signals, .. }
                if signals > 0 && e.raw_os_error() == Some(libc::EINTR) =>
            {
                Ok(true)
            }
            Interruptible::Returned { result: Err(e), .. } => Err(map(e)),
            Interruptible::Stuck { waited, signals } => Err(HugePoolError::Stuck { waited, signals }),
        }
    }

    /// Rewrites the record in place, then cuts it to length: a crash in
    /// between leaves a torn tail, whose malformed lines parse as nothing.
    fn write_record(&self) -> Result<(), HugePoolError> {
        let text = self.record.text();
        self.file.write_all_at(text.as_bytes(), 0).map_err(lock_err)?;
        self.file.set_len(text.len() as u64).map_err(lock_err)
    }
}

fn lock_err(source: io::Error) -> HugePoolError {
    HugePoolError::Lock { path: LOCK_PATH.into(), source }
}

fn io_err(op: &'static str, path: &str, source: io::Error) -> HugePoolError {
    HugePoolError::Io { op, path: path.into(), source }
}

/// The lines of `/proc/meminfo` a reservation needs.
struct Meminfo {
    total: u64,
    surplus: u64,
    page_kib: u64,
    /// `MemAvailable`, in bytes.
    available: u64,
}

impl Meminfo {
    fn read() -> Result<Meminfo, HugePoolError> {
        let text = std::fs::read_to_string(MEMINFO).map_err(|source| io_err("read", MEMINFO, source))?;
        let field = |name: &'static str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
                .ok_or(HugePoolError::Parse { path: MEMINFO.into(), field: name })
        };
        Ok(Meminfo {
            total: field("HugePages_Total")?,
            surplus: field("HugePages_Surp")?,
            page_kib: field("Hugepagesize")?,
            available: field("MemAvailable")?.saturating_mul(1024),
        })
    }
}

/// The start time of process `pid` (field 22 of `/proc/<pid>/stat`), `None`
/// when there is no such process.
fn stat_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // fields after its last ')'. Field 3 is the first word after it.
    stat.rsplit_once(')')?.1.split_whitespace().nth(22 - 3)?.parse().ok()
}

fn start_time(pid: u32) -> Result<u64, HugePoolError> {
    stat_start(pid)
        .ok_or_else(|| HugePoolError::Parse { path: format!("/proc/{pid}/stat").into(), field: "start time" })
}

/// Whether the process that wrote `holder` still runs (same pid, same
/// start time).
fn alive(holder: &Holder) -> bool {
    stat_start(holder.pid) == Some(holder.start)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, BufReader};
    use std::process::{Command, Stdio};

    use super::*;

    /// Set in a child process of these tests: what the child does.
    const CHILD_ENV: &str = "APF_HUGEPOOL_CHILD";

    fn lock() -> PoolLock {
        HugePool::lock(far()).unwrap()
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    /// What the pool should be under `lock`: the original plus the live
    /// reservations, or whatever it is when there are none.
    fn expected(lock: &PoolLock) -> u64 {
        lock.target(lock.holders()).unwrap_or_else(|| HugePool::nr_hugepages().unwrap())
    }

    /// Starts this test binary again running only `child_process`, which
    /// does `what` and prints "ready" once done.
    fn child(what: &str) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["hugepool::tests::child_process", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, what)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("ready") {
            line.clear();
            assert_ne!(out.read_line(&mut line).unwrap(), 0, "the child exited before it was ready");
        }
        (child, out)
    }

    /// The child's side, started by the tests above with `--ignored`.
    #[test]
    #[ignore = "the child process of the hugepool tests, started by them"]
    fn child_process() {
        let what = std::env::var(CHILD_ENV).expect("started by a hugepool test");
        let _held = match what.as_str() {
            "reserve" => (Some(HugePool::reserve(3, Instant::now() + Duration::from_secs(60)).unwrap()), None),
            "lock" => (None, Some(lock())),
            other => panic!("unknown child job {other}"),
        };
        println!("ready");
        // Killed by the parent long before this.
        std::thread::sleep(Duration::from_secs(60));
    }

    #[test]
    fn record_round_trips_and_skips_torn_lines() {
        let record = Record {
            original: Some(7),
            holders: vec![
                Holder { pid: 12, start: 34, id: 1, pages: 5 },
                Holder { pid: 13, start: 35, id: 2, pages: 1 },
            ],
        };
        assert_eq!(Record::parse(&record.text()), record);
        let torn = format!("{}12 34 1", record.text());
        assert_eq!(Record::parse(&torn), record);
        assert_eq!(Record::parse("garbage\noriginal x\n1 2 3\n"), Record::default());
    }

    #[test]
    fn start_time_tells_a_reused_pid_apart() {
        let me = std::process::id();
        let start = start_time(me).unwrap();
        assert!(alive(&Holder { pid: me, start, id: 0, pages: 1 }));
        assert!(!alive(&Holder { pid: me, start: start + 1, id: 0, pages: 1 }));
        let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
        assert!(!alive(&Holder { pid: pid_max, start, id: 0, pages: 1 }));
    }

    #[test]
    fn reserve_grows_the_pool_and_release_puts_it_back() {
        let mut lock = lock();
        let before = HugePool::nr_hugepages().unwrap();
        assert_eq!(before, expected(&lock));
        let total = HugePool::total().unwrap();
        let r = lock.reserve(4, far()).unwrap();
        assert_eq!(r.pages(), 4);
        assert_eq!(HugePool::nr_hugepages().unwrap(), before + 4);
        assert_eq!(HugePool::total().unwrap(), total + 4);
        assert!(lock.holders().iter().any(|h| h.pid == std::process::id() && h.pages == 4));
        r.release_with(&mut lock).unwrap();
        assert_eq!(HugePool::nr_hugepages().unwrap(), before);
        assert_eq!(HugePool::total().unwrap(), total);
        assert!(!lock.holders().iter().any(|h| h.pid == std::process::id()));
    }

    #[test]
    fn top_up_grows_a_shrunken_pool_back_to_what_the_reservations_hold() {
        let mut lock = lock();
        let r = lock.reserve(4, far()).unwrap();
        let target = expected(&lock);
        assert_eq!(lock.top_up(far()).unwrap(), 0, "nothing missing");
        // What a memory-block offline does to the pool: two of its free
        // pages dissolved.
        std::fs::write(NR_HUGEPAGES, format!("{}\n", target - 2)).unwrap();
        assert_eq!(HugePool::total().unwrap(), target - 2);
        assert_eq!(lock.top_up(far()).unwrap(), 2);
        assert_eq!((HugePool::nr_hugepages().unwrap(), HugePool::total().unwrap()), (target, target));
        r.release_with(&mut lock).unwrap();
        // No reservation left: nothing to top up to (with others', the
        // pool would be grown to theirs).
        if lock.holders().is_empty() {
            let before = HugePool::total().unwrap();
            assert_eq!(lock.top_up(far()).unwrap(), 0);
            assert_eq!(HugePool::total().unwrap(), before);
        }
    }

    #[test]
    fn reservations_count_up_and_the_last_puts_the_original_back() {
        let mut lock = lock();
        let before = HugePool::nr_hugepages().unwrap();
        let others = lock.holders().len();
        let a = lock.reserve(2, far()).unwrap();
        let original = lock.original().unwrap();
        let b = lock.reserve(3, far()).unwrap();
        assert_eq!(HugePool::nr_hugepages().unwrap(), before + 5);
        assert_eq!(lock.holders().len(), others + 2);
        a.release_with(&mut lock).unwrap();
        assert_eq!(HugePool::nr_hugepages().unwrap(), before + 3);
        assert_eq!(lock.original(), Some(original));
        drop(lock);
        // Dropping takes the lock itself.
        drop(b);
        let lock = self::lock();
        assert_eq!(HugePool::nr_hugepages().unwrap(), expected(&lock));
        if lock.holders().is_empty() {
            assert_eq!(HugePool::nr_hugepages().unwrap(), original);
            assert_eq!(lock.original(), None);
        }
    }

    #[test]
    fn a_killed_holder_is_cleaned_up_by_the_next_reserve() {
        let (mut child, _out) = child("reserve");
        let pid = child.id();
        {
            let lock = lock();
            let line = lock.holders().iter().find(|h| h.pid == pid).copied().expect("the child's line");
            assert_eq!(line.pages, 3);
            assert_eq!(HugePool::nr_hugepages().unwrap(), expected(&lock));
        }
        child.kill().unwrap();
        child.wait().unwrap();

        // The next holder of the lock (this test, or another process that
        // came first) drops the dead child's line and resizes the pool.
        let mut lock = lock();
        assert!(!lock.holders().iter().any(|h| h.pid == pid), "the dead child's line is still there");
        assert_eq!(HugePool::nr_hugepages().unwrap(), expected(&lock));
        let before = HugePool::nr_hugepages().unwrap();
        let r = lock.reserve(1, far()).unwrap();
        assert_eq!(HugePool::nr_hugepages().unwrap(), before + 1);
        r.release_with(&mut lock).unwrap();
        assert_eq!(HugePool::nr_hugepages().unwrap(), before);
    }

    #[test]
    fn the_lock_notices_a_dead_holder_and_gives_its_pages_back() {
        let mut lock = lock();
        let before = HugePool::nr_hugepages().unwrap();
        let r = lock.reserve(2, far()).unwrap();
        // A crash: the record names a process that cannot be running, and
        // the pool holds its pages.
        let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
        let dead = Holder { pid: pid_max, start: 1, id: 1, pages: 5 };
        lock.record.holders.push(dead);
        lock.write_record().unwrap();
        lock.resize(&lock.record.holders.clone(), far()).unwrap();
        assert_eq!(HugePool::nr_hugepages().unwrap(), before + 7);
        drop(lock);

        let mut lock = self::lock();
        assert_eq!(lock.recovered(), [dead]);
        assert_eq!(HugePool::nr_hugepages().unwrap(), before + 2);
        r.release_with(&mut lock).unwrap();
        assert_eq!(HugePool::nr_hugepages().unwrap(), before);
    }

    #[test]
    fn a_shortfall_is_an_error_and_leaves_the_pool_as_it_was() {
        let mut lock = lock();
        let before = HugePool::nr_hugepages().unwrap();
        let record = lock.record.clone();
        let machine = Meminfo::read().unwrap().available / HUGE_PAGE_SIZE;
        match lock.reserve(machine * 2, far()) {
            Err(HugePoolError::Shortfall { asked, got }) => {
                assert_eq!(asked, machine * 2);
                assert!(got < asked);
            }
            other => panic!("not a shortfall: {other:?}"),
        }
        assert_eq!(HugePool::nr_hugepages().unwrap(), before);
        assert_eq!(lock.record, record);
        assert!(matches!(lock.reserve(0, far()), Err(HugePoolError::BadCount { pages: 0 })));
        assert!(matches!(lock.reserve(u64::MAX, far()), Err(HugePoolError::BadCount { .. })));
        assert_eq!(HugePool::nr_hugepages().unwrap(), before);
        let text = HugePoolError::Shortfall { asked: 10, got: 3 }.to_string();
        assert!(text.contains("10") && text.contains('3'), "{text}");
    }

    #[test]
    fn reserve_gives_up_at_its_deadline_while_another_process_holds_the_lock() {
        let (mut child, _out) = child("lock");
        let start = Instant::now();
        let result = HugePool::reserve(1, Instant::now() + Duration::from_millis(300));
        let waited = start.elapsed();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(matches!(result, Err(HugePoolError::LockTimeout { .. })), "{result:?}");
        assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(5), "{waited:?}");
        // The lock is free again once its holder is gone.
        HugePool::reserve(1, Instant::now() + Duration::from_secs(60))
            .unwrap()
            .release(Instant::now() + Duration::from_secs(60))
            .unwrap();
    }

    #[test]
    fn a_deadline_stops_the_kernel_growing_the_pool_and_puts_it_back() {
        let mut lock = lock();
        let before = HugePool::nr_hugepages().unwrap();
        let record = lock.record.clone();
        // Up to 8 GiB asked with the deadline already passed: the kernel
        // stops allocating at the first signal (after a few hundred pages
        // here), and its write still succeeds.
        let asked = (Meminfo::read().unwrap().available.saturating_sub(HEADROOM) / HUGE_PAGE_SIZE / 2).min(4096);
        let start = Instant::now();
        match lock.reserve(asked, Instant::now()) {
            Err(HugePoolError::Deadline { asked: a, got }) => {
                eprintln!("the pool grew by {got} of {asked} pages before the signal, in {:?}", start.elapsed());
                assert_eq!(a, asked);
                assert!(got < asked);
            }
            other => panic!("not stopped by the deadline: {other:?}"),
        }
        assert_eq!(HugePool::nr_hugepages().unwrap(), before);
        assert_eq!(HugePool::total().unwrap(), before);
        assert_eq!(lock.record, record);
    }
}
