//! Host memory blocks: taking one offline (which makes the kernel migrate every
//! page in it) and back online, with a deadline, under a lock shared by every
//! process of the project.
//!
//! This is how apf's claim is checked against the real kernel: a memory block
//! holding guest pages goes offline only if nothing holds a long-term reference
//! to any of those pages. Everything here talks to the real kernel: the
//! `/sys/devices/system/memory/memoryN/state` files, `block_size_bytes` and
//! `/proc/self/pagemap` (which needs `CAP_SYS_ADMIN` to show frame numbers).
//!
//! ```no_run
//! use std::time::{Duration, Instant};
//! use apf::hostmem::{self, BlockLock, HostMemError, Pagemap};
//!
//! let guest_ram = vec![1u8; 64 << 20];
//! let pages = guest_ram.len() / 4096;
//! let mut lock = BlockLock::acquire(Instant::now() + Duration::from_secs(60))?;
//! let pfns = Pagemap::open()?.pfns(guest_ram.as_ptr() as u64 & !4095, pages)?;
//! for (block, _pages) in hostmem::blocks_holding(&pfns, hostmem::block_size()?) {
//!     match hostmem::offline_and_online(&mut lock, block, Instant::now() + Duration::from_secs(3)) {
//!         Ok(report) => {
//!             println!("{report:?}");
//!             break;
//!         }
//!         Err(HostMemError::Unmovable { .. }) => continue, // kernel memory in it
//!         Err(e) => return Err(e.into()),
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Bounding the kernel
//!
//! Writing `offline` to a block whose pages cannot all migrate (one of them is
//! pinned) does not fail: the kernel retries forever, and only a pending signal
//! ends the write (with `EINTR`; the block stays online). So each state write is
//! one raw `write(2)` on a dedicated thread, and at the deadline that thread is
//! sent [`interrupt_signal`] (`SIGRTMIN() + 2`) every [`SIGNAL_RESEND`] until the
//! write returns: the first signal may land before the write has started. The
//! signal's handler does nothing; it is installed once per process (without
//! `SA_RESTART`, though the kernel's `EINTR` here is never restarted anyway) and
//! replaces any other handler of that signal.
//!
//! Not every block holding kernel memory fails at once with `EBUSY`: when the
//! kernel's isolation step misses an unmovable page, the write loops just as it
//! does for a pinned page. So a timeout alone does not prove a pin; the same
//! block going offline once the pin is dropped does.
//!
//! # Sharing the blocks
//!
//! Offlining is machine-wide, so every process takes [`BlockLock`] (an exclusive
//! `flock` on [`LOCK_PATH`]) first. The lock file records which blocks its
//! holder has offline right now; a process that dies with a block offline leaves
//! that record behind, and the next holder puts those blocks back online.

use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::OnceLock;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};
use thiserror::Error;
use vmm_sys_util::signal::{register_signal_handler, unblock_signal, Killable, SIGRTMIN};

/// The lock file every process of the project takes before it offlines a host
/// memory block.
pub const LOCK_PATH: &str = "/tmp/apf-memory-blocks.lock";

/// Where the kernel lists memory blocks.
const MEMORY_DIR: &str = "/sys/devices/system/memory";

/// How often the interrupting signal is sent again until the write returns.
pub const SIGNAL_RESEND: Duration = Duration::from_millis(10);

/// How long writing `online` to a block may take. Onlining migrates nothing
/// and takes milliseconds; this only bounds a kernel that misbehaves.
pub const ONLINE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a thread keeps being signalled after its deadline before it is
/// abandoned as stuck (the kernel is not checking for signals).
const GIVE_UP_AFTER: Duration = Duration::from_secs(10);

/// How often a busy [`BlockLock`] is tried again.
const LOCK_POLL: Duration = Duration::from_millis(10);

/// The host page size (x86-64).
const PAGE_SIZE: u64 = crate::uffd::PAGE_SIZE as u64;

/// Pagemap entry bits, from the kernel's `Documentation/admin-guide/mm/pagemap.rst`.
const PM_PRESENT: u64 = 1 << 63;
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// First line of the lock file's record.
const RECORD_HEADER: &str = "# apf: memory blocks offline right now, one \"<pid> <block>\" a line\n";

/// The signal that interrupts a state write at its deadline: `SIGRTMIN() + 2`.
pub fn interrupt_signal() -> libc::c_int {
    SIGRTMIN() + 2
}

/// Errors from host memory-block operations. Each names the block or path.
#[derive(Debug, Error)]
pub enum HostMemError {
    /// The kernel has no memory-hotplug sysfs directory.
    #[error("{path} is not readable: no memory hotplug support (or sysfs is not mounted)")]
    NoMemoryHotplug {
        /// The directory that is missing.
        path: PathBuf,
        /// The error reading it.
        #[source]
        source: io::Error,
    },
    /// Permission denied on a file that needs root.
    #[error("{path}: permission denied (offlining memory needs root)")]
    NotPermitted {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The memory block does not exist (block numbers have gaps).
    #[error("memory block {block} does not exist")]
    NoSuchBlock {
        /// The block number.
        block: u32,
    },
    /// Reading a file failed.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A file's contents are not what the kernel writes there.
    #[error("{path} holds {content:?}, not a {expected}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What it held.
        content: String,
        /// What it should hold.
        expected: &'static str,
    },
    /// The block is not online, so it is not this process's to offline.
    #[error("memory block {block} is {state}, not online: left alone")]
    NotOnline {
        /// The block number.
        block: u32,
        /// Its state.
        state: BlockState,
    },
    /// The address given to the pagemap lookup is not page-aligned.
    #[error("address {addr:#x} is not page-aligned")]
    Misaligned {
        /// The address.
        addr: u64,
    },
    /// `/proc/self/pagemap` shows present pages as frame 0: the process lacks
    /// `CAP_SYS_ADMIN`.
    #[error("/proc/self/pagemap hides frame numbers (needs CAP_SYS_ADMIN)")]
    PfnHidden,
    /// The lock file could not be opened, locked or written.
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
    /// A block recorded by an earlier holder of the lock could not be put back
    /// online; the record is kept for the next holder.
    #[error("memory block {block}, left offline by process {pid}, cannot be put back online")]
    Recovery {
        /// The block number.
        block: u32,
        /// The process that recorded it.
        pid: u32,
        /// Why onlining failed.
        #[source]
        source: Box<HostMemError>,
    },
    /// The block holds memory that cannot move (kernel allocations): the
    /// `offline` write failed with `EBUSY`, or the kernel will never
    /// offline it (`EINVAL`: it spans zones). The block is online.
    #[error("memory block {block} holds unmovable pages or cannot be removed (EBUSY or EINVAL)")]
    Unmovable {
        /// The block number.
        block: u32,
    },
    /// The deadline interrupted the write; the block is online again.
    #[error("{op} of memory block {block} did not finish: interrupted after {waited:?} ({signals} signals)")]
    TimedOut {
        /// The block number.
        block: u32,
        /// Which write it was.
        op: BlockOp,
        /// From the call until the write returned.
        waited: Duration,
        /// How many signals it took.
        signals: u32,
    },
    /// The write did not return even after being signalled for a long time;
    /// its thread was abandoned and the block stays recorded in the lock file.
    #[error("{op} of memory block {block} ignored {signals} signals for {waited:?}; thread abandoned")]
    Stuck {
        /// The block number.
        block: u32,
        /// Which write it was.
        op: BlockOp,
        /// How long it was waited for.
        waited: Duration,
        /// How many signals were sent.
        signals: u32,
    },
    /// A state write failed with another error.
    #[error("{op} of memory block {block} failed")]
    Io {
        /// The block number.
        block: u32,
        /// Which write it was.
        op: BlockOp,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The block was written `online` but does not read back online.
    #[error("memory block {block} reads {state} after being put back online")]
    StillNotOnline {
        /// The block number.
        block: u32,
        /// What it reads.
        state: BlockState,
    },
    /// The thread that writes the state could not be started, or the signal
    /// handler could not be installed.
    #[error("cannot {what}")]
    Setup {
        /// What failed.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The state of a memory block, as its `state` file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockState {
    /// `online`
    Online,
    /// `offline`
    Offline,
    /// Anything else (`going-offline` while an offline is in progress).
    Other(String),
}

impl fmt::Display for BlockState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockState::Online => f.write_str("online"),
            BlockState::Offline => f.write_str("offline"),
            BlockState::Other(s) => f.write_str(s),
        }
    }
}

/// Which state write an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOp {
    /// Writing `offline`.
    Offline,
    /// Writing `online`.
    Online,
}

impl BlockOp {
    fn word(self) -> &'static str {
        match self {
            BlockOp::Offline => "offline",
            BlockOp::Online => "online",
        }
    }
}

impl fmt::Display for BlockOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

/// What one successful [`offline_and_online`] took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockReport {
    /// The block number.
    pub block: u32,
    /// How long the `offline` write took (migrating every page of the block).
    pub offline_time: Duration,
    /// How long the `online` write took.
    pub online_time: Duration,
}

/// The size of a memory block in bytes (`block_size_bytes`, which the kernel
/// writes in hex without a prefix).
pub fn block_size() -> Result<u64, HostMemError> {
    let path = Path::new(MEMORY_DIR).join("block_size_bytes");
    let text = std::fs::read_to_string(&path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => HostMemError::NoMemoryHotplug { path: MEMORY_DIR.into(), source },
        _ => HostMemError::Read { path: path.clone(), source },
    })?;
    u64::from_str_radix(text.trim(), 16).ok().filter(|size| *size > 0).ok_or(HostMemError::Parse {
        path,
        content: text,
        expected: "hex block size",
    })
}

/// The state of block `n`.
pub fn block_state(n: u32) -> Result<BlockState, HostMemError> {
    let path = block_dir(n)?.join("state");
    let text = std::fs::read_to_string(&path).map_err(|source| HostMemError::Read { path, source })?;
    Ok(match text.trim() {
        "online" => BlockState::Online,
        "offline" => BlockState::Offline,
        other => BlockState::Other(other.to_owned()),
    })
}

/// The sysfs directory of block `n`, checked to exist.
fn block_dir(n: u32) -> Result<PathBuf, HostMemError> {
    let dir = PathBuf::from(format!("{MEMORY_DIR}/memory{n}"));
    match std::fs::metadata(&dir) {
        Ok(_) => Ok(dir),
        Err(source) if source.kind() == io::ErrorKind::NotFound => match std::fs::metadata(MEMORY_DIR) {
            Ok(_) => Err(HostMemError::NoSuchBlock { block: n }),
            Err(source) => Err(HostMemError::NoMemoryHotplug { path: MEMORY_DIR.into(), source }),
        },
        Err(source) => Err(HostMemError::Read { path: dir, source }),
    }
}

/// Which memory block a page frame lives in.
pub fn block_of_pfn(pfn: u64, block_size: u64) -> u32 {
    (pfn * PAGE_SIZE / block_size) as u32
}

/// The blocks holding any of the given present pages, with how many of them
/// each holds, most pages first (lower block first among equals).
pub fn blocks_holding(pfns: &[Option<u64>], block_size: u64) -> Vec<(u32, usize)> {
    let mut counts = std::collections::BTreeMap::new();
    for pfn in pfns.iter().flatten() {
        *counts.entry(block_of_pfn(*pfn, block_size)).or_insert(0) += 1;
    }
    let mut blocks: Vec<(u32, usize)> = counts.into_iter().collect();
    blocks.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    blocks
}

/// This process's `/proc/self/pagemap`: which page frame backs each virtual page.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens `/proc/self/pagemap`.
    pub fn open() -> Result<Self, HostMemError> {
        let path = "/proc/self/pagemap";
        let file = File::open(path).map_err(|source| HostMemError::Read { path: path.into(), source })?;
        Ok(Pagemap { file })
    }

    /// The frame number of each of `pages` pages from the page-aligned host
    /// address `addr`, `None` where no page is present (never touched, or
    /// swapped out). Fails with [`HostMemError::PfnHidden`] when the kernel
    /// hides frame numbers from this process.
    pub fn pfns(&self, addr: u64, pages: usize) -> Result<Vec<Option<u64>>, HostMemError> {
        if addr % PAGE_SIZE != 0 {
            return Err(HostMemError::Misaligned { addr });
        }
        let mut raw = vec![0u8; pages * 8];
        self.file
            .read_exact_at(&mut raw, addr / PAGE_SIZE * 8)
            .map_err(|source| HostMemError::Read { path: "/proc/self/pagemap".into(), source })?;
        raw.chunks_exact(8)
            .map(|entry| {
                let entry = u64::from_ne_bytes(entry.try_into().expect("chunks of 8 bytes"));
                match (entry & PM_PRESENT != 0, entry & PM_PFN_MASK) {
                    (false, _) => Ok(None),
                    (true, 0) => Err(HostMemError::PfnHidden),
                    (true, pfn) => Ok(Some(pfn)),
                }
            })
            .collect()
    }
}

/// The exclusive right to offline host memory blocks: an `flock` on
/// [`LOCK_PATH`], shared by every process and every test of the project.
///
/// The lock file records the blocks its holder has offline right now (pid and
/// block number per line). Holding the lock proves that whoever wrote a record
/// found there is gone (the kernel drops an `flock` when its holder dies), so
/// [`acquire`](Self::acquire) puts every recorded block that is still offline
/// back online and clears the record.
#[derive(Debug)]
pub struct BlockLock {
    file: File,
    /// Blocks this holder has offline, or may have (a write in flight).
    offline: Vec<u32>,
    recovered: Vec<u32>,
}

impl BlockLock {
    /// Takes the lock, trying every few milliseconds until `deadline`
    /// ([`HostMemError::LockTimeout`]), then recovers the blocks an earlier
    /// holder left offline (each onlining bounded by [`ONLINE_TIMEOUT`]).
    pub fn acquire(deadline: Instant) -> Result<Self, HostMemError> {
        let file = lock_file(LOCK_PATH, deadline, LOCK_POLL).map_err(|e| match e {
            LockFileError::Denied(source) => HostMemError::NotPermitted { path: LOCK_PATH.into(), source },
            LockFileError::Io(source) => HostMemError::Lock { path: LOCK_PATH.into(), source },
            LockFileError::Timeout(waited) => HostMemError::LockTimeout { path: LOCK_PATH.into(), waited },
        })?;
        let mut lock = BlockLock { file, offline: Vec::new(), recovered: Vec::new() };
        lock.recover()?;
        Ok(lock)
    }

    /// Blocks an earlier holder had left offline and [`acquire`](Self::acquire)
    /// put back online.
    #[cfg(test)]
    pub fn recovered(&self) -> &[u32] {
        &self.recovered
    }

    fn recover(&mut self) -> Result<(), HostMemError> {
        let mut text = String::new();
        (&self.file)
            .read_to_string(&mut text)
            .map_err(|source| HostMemError::Lock { path: LOCK_PATH.into(), source })?;
        for (pid, block) in parse_record(&text) {
            match block_state(block) {
                Ok(BlockState::Online) | Err(HostMemError::NoSuchBlock { .. }) => {}
                Ok(_) => {
                    ensure_online(block).map_err(|e| HostMemError::Recovery { block, pid, source: Box::new(e) })?;
                    self.recovered.push(block);
                }
                Err(e) => return Err(HostMemError::Recovery { block, pid, source: Box::new(e) }),
            }
        }
        self.write_record()
    }

    fn record(&mut self, block: u32) -> Result<(), HostMemError> {
        self.offline.push(block);
        self.write_record()
    }

    fn unrecord(&mut self, block: u32) -> Result<(), HostMemError> {
        self.offline.retain(|b| *b != block);
        self.write_record()
    }

    /// Rewrites the record in place, then cuts it to length: a crash in
    /// between leaves extra records, which recovery treats as harmless.
    fn write_record(&self) -> Result<(), HostMemError> {
        let mut text = String::from(RECORD_HEADER);
        for block in &self.offline {
            let _ = writeln!(text, "{} {block}", std::process::id());
        }
        let lock_err = |source| HostMemError::Lock { path: LOCK_PATH.into(), source };
        self.file.write_all_at(text.as_bytes(), 0).map_err(lock_err)?;
        self.file.set_len(text.len() as u64).map_err(lock_err)
    }
}

/// `(pid, block)` of each well-formed line of a lock-file record.
fn parse_record(text: &str) -> Vec<(u32, u32)> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let pid = words.next()?.parse().ok()?;
            let block = words.next()?.parse().ok()?;
            words.next().is_none().then_some((pid, block))
        })
        .collect()
}

/// Takes block `n` offline, which makes the kernel migrate every page in it,
/// and puts it back online.
///
/// `n` is recorded in the lock file before the `offline` write and removed once
/// the block is online again. The write is interrupted at `deadline` (see the
/// module docs); the `online` write is bounded by [`ONLINE_TIMEOUT`]. Outcomes:
/// - `Ok`: the block went offline and came back online.
/// - [`HostMemError::Unmovable`]: the write failed with `EBUSY` (kernel memory
///   in the block); try another block.
/// - [`HostMemError::TimedOut`]: the deadline interrupted the write (a page of
///   the block could not migrate or be freed); the block is verified online
///   again. Pages that did migrate before the deadline stay where they went.
/// - [`HostMemError::NotOnline`], [`HostMemError::NoSuchBlock`]: the block was
///   not touched.
/// - [`HostMemError::Io`] for any other errno, after the block is back online.
pub fn offline_and_online(lock: &mut BlockLock, n: u32, deadline: Instant) -> Result<BlockReport, HostMemError> {
    let start = Instant::now();
    match block_state(n)? {
        BlockState::Online => {}
        state => return Err(HostMemError::NotOnline { block: n, state }),
    }
    lock.record(n)?;
    let result = write_state(n, BlockOp::Offline, deadline).and_then(|write| match write {
        Write::Done(offline_time) => {
            write_online(n).map(|online_time| BlockReport { block: n, offline_time, online_time })
        }
        // EBUSY: unmovable kernel memory in the block. EINVAL: the kernel
        // will never offline it (it spans zones, as block 0 often does).
        Write::Failed(source) if matches!(source.raw_os_error(), Some(libc::EBUSY | libc::EINVAL)) => {
            ensure_online(n).and(Err(HostMemError::Unmovable { block: n }))
        }
        Write::Failed(source) => ensure_online(n).and(Err(HostMemError::Io { block: n, op: BlockOp::Offline, source })),
        Write::Interrupted { signals } => {
            let waited = start.elapsed();
            ensure_online(n).and(Err(HostMemError::TimedOut { block: n, op: BlockOp::Offline, waited, signals }))
        }
    });
    // A block that may still be offline (or whose write is still in flight)
    // keeps its record, for recovery.
    let stuck = matches!(result, Err(HostMemError::Stuck { .. }));
    if !stuck && block_state(n).is_ok_and(|state| state == BlockState::Online) {
        lock.unrecord(n)?;
    }
    result
}

/// Puts block `n` online if it is not, and checks that it reads online.
fn ensure_online(n: u32) -> Result<(), HostMemError> {
    if block_state(n)? != BlockState::Online {
        write_online(n)?;
    }
    Ok(())
}

/// Writes `online` to block `n`, bounded by [`ONLINE_TIMEOUT`], and checks that
/// it reads online. Returns how long the write took.
fn write_online(n: u32) -> Result<Duration, HostMemError> {
    let start = Instant::now();
    let took = match write_state(n, BlockOp::Online, start + ONLINE_TIMEOUT)? {
        Write::Done(took) => took,
        Write::Failed(source) => return Err(HostMemError::Io { block: n, op: BlockOp::Online, source }),
        Write::Interrupted { signals } => {
            return Err(HostMemError::TimedOut { block: n, op: BlockOp::Online, waited: start.elapsed(), signals })
        }
    };
    match block_state(n)? {
        BlockState::Online => Ok(took),
        state => Err(HostMemError::StillNotOnline { block: n, state }),
    }
}

/// How one state write ended.
#[derive(Debug)]
enum Write {
    /// It succeeded, taking this long.
    Done(Duration),
    /// It failed on its own.
    Failed(io::Error),
    /// The deadline's signal ended it (`EINTR`) after this many signals.
    Interrupted { signals: u32 },
}

/// One raw `write(2)` of `op`'s word to block `n`'s `state` file, on its own
/// thread, interrupted with [`interrupt_signal`] from `deadline` on.
fn write_state(n: u32, op: BlockOp, deadline: Instant) -> Result<Write, HostMemError> {
    let path = block_dir(n)?.join("state");
    let file = OpenOptions::new().write(true).open(&path).map_err(|source| match source.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => HostMemError::NotPermitted { path: path.clone(), source },
        _ => HostMemError::Io { block: n, op, source },
    })?;
    let written = interruptible_write(file, op.word().as_bytes().to_vec(), format!("apf-{op}-{n}"), deadline)
        .map_err(|(what, source)| HostMemError::Setup { what, source })?;
    Ok(match written {
        Interruptible::Stuck { waited, signals } => return Err(HostMemError::Stuck { block: n, op, waited, signals }),
        Interruptible::Returned { result: Ok(()), took, .. } => Write::Done(took),
        Interruptible::Returned { result: Err(e), signals, .. }
            if e.raw_os_error() == Some(libc::EINTR) && signals > 0 =>
        {
            Write::Interrupted { signals }
        }
        Interruptible::Returned { result: Err(e), .. } => Write::Failed(e),
    })
}

/// Why [`lock_file`] did not get its lock.
#[derive(Debug)]
pub(crate) enum LockFileError {
    /// The lock file may not be opened or created (`EACCES`, `EPERM`).
    Denied(io::Error),
    /// Opening or locking it failed otherwise.
    Io(io::Error),
    /// Another process held it until the deadline; how long this one waited.
    Timeout(Duration),
}

/// Opens (creating it if need be) the machine-wide lock file at `path` and
/// takes an exclusive `flock` on it, trying every `poll` until `deadline`.
/// The lock is held until the returned file is closed.
pub(crate) fn lock_file(path: &str, deadline: Instant, poll: Duration) -> Result<File, LockFileError> {
    let start = Instant::now();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EACCES | libc::EPERM) => LockFileError::Denied(e),
            _ => LockFileError::Io(e),
        })?;
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => thread::sleep(poll),
            Err(rustix::io::Errno::WOULDBLOCK) => return Err(LockFileError::Timeout(start.elapsed())),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(LockFileError::Io(e.into())),
        }
    }
}

/// How a write that [`interruptible_write`] bounds ended.
#[derive(Debug)]
pub(crate) enum Interruptible {
    /// The write returned: its result, how long it took and how many
    /// signals were sent before it did.
    Returned {
        /// What `write(2)` answered.
        result: io::Result<()>,
        /// From its start until it returned.
        took: Duration,
        /// Signals sent before it returned.
        signals: u32,
    },
    /// It ignored the signals for [`GIVE_UP_AFTER`]; its thread was abandoned.
    Stuck {
        /// From the call until it was abandoned.
        waited: Duration,
        /// Signals sent.
        signals: u32,
    },
}

/// One raw `write(2)` of `bytes` to `file` on a thread of its own named
/// `name`, sent [`interrupt_signal`] every [`SIGNAL_RESEND`] from `deadline`
/// on until it returns: for kernel writes that loop until a signal is
/// pending (offlining a block, growing the huge-page pool). Fails only
/// when the thread or the handler cannot be set up (what, and why).
pub(crate) fn interruptible_write(
    file: File,
    bytes: Vec<u8>,
    name: String,
    deadline: Instant,
) -> Result<Interruptible, (&'static str, io::Error)> {
    install_handler().map_err(|errno| ("install the interrupting signal's handler", io::Error::from_raw_os_error(errno)))?;
    let start = Instant::now();
    let signal = interrupt_signal();
    let (done_tx, done_rx) = mpsc::channel();
    let writer: JoinHandle<()> = thread::Builder::new()
        .name(name)
        .spawn(move || {
            // The thread inherits its creator's mask; the signal must get through.
            let _ = unblock_signal(signal);
            let start = Instant::now();
            // SAFETY: `file` is open for the whole call and `bytes` is a live
            // buffer of `bytes.len()` bytes that the kernel only reads.
            let ret = unsafe { libc::write(file.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
            let result = if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) };
            let _ = done_tx.send((result, start.elapsed()));
        })
        .map_err(|source| ("start the writing thread", source))?;

    let timeout = deadline.saturating_duration_since(Instant::now());
    let mut signals = 0u32;
    let (result, took) = match done_rx.recv_timeout(timeout) {
        Ok(done) => done,
        Err(_) => loop {
            if signals > 0 && Instant::now().saturating_duration_since(deadline) >= GIVE_UP_AFTER {
                // Dropping the handle detaches the thread.
                return Ok(Interruptible::Stuck { waited: start.elapsed(), signals });
            }
            // A failed kill means the thread has exited, and its result is queued.
            let _ = writer.kill(signal);
            signals += 1;
            match done_rx.recv_timeout(SIGNAL_RESEND) {
                Ok(done) => break done,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = writer.join();
                    return Err(("write", io::Error::other("the writing thread ended without a result")));
                }
            }
        },
    };
    let _ = writer.join();
    Ok(Interruptible::Returned { result, took, signals })
}

/// Installs the no-op handler of [`interrupt_signal`], once per process
/// (the errno when it cannot).
fn install_handler() -> Result<(), i32> {
    extern "C" fn interrupt(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    // register_signal_handler sets SA_SIGINFO only: no SA_RESTART.
    *INSTALLED.get_or_init(|| register_signal_handler(interrupt_signal(), interrupt).map_err(|e| e.errno()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kpin::FixedBuffer;
    use crate::ram::AnonMapping;

    const PAGE: usize = PAGE_SIZE as usize;

    fn lock() -> BlockLock {
        BlockLock::acquire(Instant::now() + Duration::from_secs(120)).unwrap()
    }

    /// Anonymous memory without transparent huge pages, each page filled with
    /// a pattern of its own.
    struct Buffer {
        map: AnonMapping,
    }

    impl Buffer {
        fn new(len: usize) -> Buffer {
            let map = AnonMapping::new(len).unwrap();
            let addr = map.ptr();
            // SAFETY: the mapping is `len` bytes, page-aligned, readable and
            // writable, and nothing else refers to it yet.
            let words = unsafe { std::slice::from_raw_parts_mut(addr.cast::<u64>(), len / 8) };
            for (i, word) in words.iter_mut().enumerate() {
                *word = Self::pattern(i);
            }
            Buffer { map }
        }

        fn pattern(i: usize) -> u64 {
            (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xa5a5
        }

        fn words(&self) -> &[u64] {
            // SAFETY: the mapping is `len` bytes, page-aligned and readable,
            // and lives as long as `self`; after `new` only the kernel changes
            // it (moving pages, which keeps their contents).
            unsafe { std::slice::from_raw_parts(self.map.ptr().cast(), self.map.len() / 8) }
        }

        /// The first page whose contents differ from the pattern.
        fn first_bad_page(&self) -> Option<usize> {
            let words = self.words();
            (0..words.len()).find(|i| words[*i] != Self::pattern(*i)).map(|i| i * 8 / PAGE)
        }

        fn pages(&self) -> usize {
            self.map.len() / PAGE
        }

        fn page(&self, i: usize) -> *mut u8 {
            self.map.ptr().wrapping_add(i * PAGE)
        }

        fn pfns(&self) -> Vec<Option<u64>> {
            Pagemap::open().unwrap().pfns(self.map.ptr() as u64, self.pages()).unwrap()
        }
    }

    /// The longest run (at most `max` pages) of consecutive pages of the buffer
    /// that all live in `block`: (first page, pages).
    fn run_in_block(pfns: &[Option<u64>], block: u32, block_size: u64, max: usize) -> Option<(usize, usize)> {
        let in_block = |i: usize| pfns[i].is_some_and(|pfn| block_of_pfn(pfn, block_size) == block);
        let mut best: Option<(usize, usize)> = None;
        let mut i = 0;
        while i < pfns.len() {
            if in_block(i) {
                let start = i;
                while i < pfns.len() && in_block(i) && i - start < max {
                    i += 1;
                }
                if best.is_none_or(|(_, len)| i - start > len) {
                    best = Some((start, i - start));
                }
            } else {
                i += 1;
            }
        }
        best
    }

    /// Host memory that grows 64 MiB at a time, and the blocks holding it
    /// that have not been tried yet, most pages first. The first chunks tend to
    /// land in recently freed pages of blocks mixed with kernel memory (EBUSY);
    /// growing reaches blocks that hold nothing else. Every block handed out is
    /// put back online when the search is dropped, whatever happened.
    struct Search {
        chunks: Vec<Buffer>,
        tried: Vec<u32>,
        block_size: u64,
        budget: Instant,
    }

    impl Search {
        const CHUNK: usize = 64 << 20;
        const MAX_CHUNKS: usize = 8;

        fn new(budget: Duration) -> Search {
            let block_size = block_size().unwrap();
            Search {
                chunks: vec![Buffer::new(Self::CHUNK)],
                tried: Vec::new(),
                block_size,
                budget: Instant::now() + budget,
            }
        }

        /// The next block to try, or `None` when the budget is spent or every
        /// block holding the largest buffer allowed has been tried.
        fn next(&mut self) -> Option<u32> {
            while Instant::now() < self.budget {
                let untried =
                    blocks_holding(&self.pfns(), self.block_size).into_iter().find(|(b, _)| !self.tried.contains(b));
                if let Some((block, _)) = untried {
                    self.tried.push(block);
                    return Some(block);
                }
                if self.chunks.len() == Self::MAX_CHUNKS {
                    return None;
                }
                self.chunks.push(Buffer::new(Self::CHUNK));
            }
            None
        }

        /// Frame numbers of every page of every chunk, in order.
        fn pfns(&self) -> Vec<Option<u64>> {
            self.chunks.iter().flat_map(Buffer::pfns).collect()
        }

        fn in_block(&self, pfn: Option<u64>, block: u32) -> bool {
            pfn.is_some_and(|pfn| block_of_pfn(pfn, self.block_size) == block)
        }

        /// Whether every chunk still holds its pattern.
        fn intact(&self) -> bool {
            self.chunks.iter().all(|chunk| chunk.first_bad_page().is_none())
        }

        fn describe(&self) -> String {
            format!("{} blocks tried over {} MiB", self.tried.len(), (self.chunks.len() * Self::CHUNK) >> 20)
        }
    }

    impl Drop for Search {
        fn drop(&mut self) {
            for block in &self.tried {
                if let Err(e) = ensure_online(*block) {
                    eprintln!("memory block {block} may be left offline: {e}");
                }
            }
        }
    }

    #[test]
    fn block_of_pfn_divides_by_block_size() {
        let block = 128 << 20;
        assert_eq!(block_of_pfn(0, block), 0);
        assert_eq!(block_of_pfn(32767, block), 0);
        assert_eq!(block_of_pfn(32768, block), 1);
        assert_eq!(block_of_pfn(5 * 32768 + 17, block), 5);
    }

    #[test]
    fn blocks_holding_counts_present_pages_most_first() {
        let block = 128 << 20;
        let pfns = [Some(3 * 32768), None, Some(32768 + 1), Some(3 * 32768 + 9), Some(7), Some(32768)];
        assert_eq!(blocks_holding(&pfns, block), vec![(1, 2), (3, 2), (0, 1)]);
        assert!(blocks_holding(&[None, None], block).is_empty());
    }

    #[test]
    fn lock_record_parses_only_well_formed_lines() {
        let text = format!("{RECORD_HEADER}12 7\n13 x\n14\n15 9 extra\n\n99 40\n");
        assert_eq!(parse_record(&text), vec![(12, 7), (99, 40)]);
    }

    #[test]
    fn block_size_matches_sysfs() {
        let text = std::fs::read_to_string(format!("{MEMORY_DIR}/block_size_bytes")).unwrap();
        let size = block_size().unwrap();
        assert_eq!(format!("{size:x}"), text.trim());
        assert_eq!(size % PAGE_SIZE, 0);
    }

    #[test]
    fn missing_block_is_reported_as_such() {
        let err = block_state(u32::MAX).unwrap_err();
        assert!(matches!(err, HostMemError::NoSuchBlock { block: u32::MAX }), "{err}");
        let mut lock = lock();
        let err = offline_and_online(&mut lock, u32::MAX, Instant::now() + Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, HostMemError::NoSuchBlock { block: u32::MAX }), "{err}");
    }

    #[test]
    fn pagemap_shows_touched_pages_only() {
        // SAFETY: a fresh anonymous mapping at an address the kernel picks.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let addr: *mut u8 = addr.cast();
        for page in [1, 4, 5] {
            // SAFETY: the byte is inside the 8-page mapping made above.
            unsafe { addr.wrapping_add(page * PAGE).write(1) };
        }
        let pagemap = Pagemap::open().unwrap();
        let pfns = pagemap.pfns(addr as u64, 8).unwrap();
        let present: Vec<usize> = (0..8).filter(|i| pfns[*i].is_some()).collect();
        assert_eq!(present, [1, 4, 5]);
        assert!(matches!(pagemap.pfns(addr as u64 + 1, 1), Err(HostMemError::Misaligned { .. })));
        // SAFETY: the mapping made above; nothing refers to it any more.
        unsafe { libc::munmap(addr.cast(), 8 * PAGE) };
    }

    #[test]
    fn offline_moves_every_page_of_a_movable_block() {
        let mut lock = lock();
        let mut search = Search::new(Duration::from_secs(10));
        let (mut unmovable, mut timed_out) = (0, 0);
        while let Some(block) = search.next() {
            let before = search.pfns();
            match offline_and_online(&mut lock, block, Instant::now() + Duration::from_secs(3)) {
                Ok(report) => {
                    let after = search.pfns();
                    let mut moved = 0;
                    for (i, old) in before.iter().enumerate().filter(|(_, pfn)| search.in_block(**pfn, block)) {
                        let new = after[i].unwrap_or_else(|| panic!("page {i} no longer present"));
                        assert_ne!(Some(new), *old, "page {i} did not move");
                        assert!(!search.in_block(Some(new), block), "page {i} still in block {block}");
                        moved += 1;
                    }
                    assert!(moved > 0);
                    assert!(search.intact(), "data changed");
                    assert_eq!(block_state(block).unwrap(), BlockState::Online);
                    eprintln!(
                        "{report:?}: {moved} pages moved; {} ({unmovable} unmovable, {timed_out} timed out)",
                        search.describe()
                    );
                    return;
                }
                Err(HostMemError::Unmovable { .. }) => unmovable += 1,
                Err(HostMemError::TimedOut { .. }) => timed_out += 1,
                Err(e) => panic!("block {block}: {e}"),
            }
            assert_eq!(block_state(block).unwrap(), BlockState::Online);
            assert!(search.intact(), "data changed");
        }
        eprintln!("notice: no block qualified: {} ({unmovable} unmovable, {timed_out} timed out)", search.describe());
    }

    /// The proof that an io_uring pin is a real kernel pin: with a few pages of
    /// a block pinned, offlining it times out; unpinned, the same block goes
    /// offline. (Pinning after a successful offline does not work: the offline
    /// moves every page of ours out of the block, and the freshly onlined
    /// memory goes to the tail of the kernel's free lists.)
    #[test]
    fn pinned_page_holds_its_block_online_until_unpinned() {
        let mut lock = lock();
        let mut search = Search::new(Duration::from_secs(8));
        while let Some(block) = search.next() {
            // The longest run of pages of one chunk in the block, at most 8.
            let Some((chunk, first, pages)) = search
                .chunks
                .iter()
                .enumerate()
                .filter_map(|(c, chunk)| {
                    run_in_block(&chunk.pfns(), block, search.block_size, 8).map(|(f, n)| (c, f, n))
                })
                .max_by_key(|(_, _, pages)| *pages)
            else {
                continue;
            };
            let addr = search.chunks[chunk].page(first);
            let mut pin = FixedBuffer::register(addr, pages * PAGE).unwrap();
            let pinned = Pagemap::open().unwrap().pfns(addr as u64, pages).unwrap();
            if !pinned.iter().all(|pfn| search.in_block(*pfn, block)) {
                continue; // pinning moved them out (a movable zone)
            }

            let start = Instant::now();
            match offline_and_online(&mut lock, block, start + Duration::from_millis(1500)) {
                Err(HostMemError::TimedOut { waited, signals, .. }) => {
                    let took = start.elapsed();
                    assert!(took < Duration::from_millis(2500), "interrupting took {took:?}");
                    assert_eq!(block_state(block).unwrap(), BlockState::Online);
                    assert!(search.intact(), "data changed");
                    let still = Pagemap::open().unwrap().pfns(addr as u64, pages).unwrap();
                    assert_eq!(still, pinned, "pinned pages moved");
                    eprintln!(
                        "block {block} with {pages} pinned pages: timed out after {waited:?} ({signals} signals)"
                    );
                }
                Err(HostMemError::Unmovable { .. }) => continue,
                Ok(report) => panic!("block {block} went offline with {pages} pages pinned: {report:?}"),
                Err(e) => panic!("block {block}: {e}"),
            }

            pin.unregister().unwrap();
            match offline_and_online(&mut lock, block, Instant::now() + Duration::from_secs(3)) {
                Ok(report) => {
                    assert!(search.intact(), "data changed");
                    assert_eq!(block_state(block).unwrap(), BlockState::Online);
                    eprintln!("unpinned: {report:?}; {}", search.describe());
                    return;
                }
                // Something else holds the block too: the timeout proved nothing.
                Err(e @ (HostMemError::TimedOut { .. } | HostMemError::Unmovable { .. })) => {
                    eprintln!("block {block} still refuses to go offline unpinned: {e}");
                }
                Err(e) => panic!("block {block}: {e}"),
            }
        }
        eprintln!("notice: no block qualified for the pin test: {}", search.describe());
    }

    #[test]
    fn next_holder_recovers_a_block_left_offline() {
        let mut lock = lock();
        let mut search = Search::new(Duration::from_secs(8));
        let mut offline = None;
        while let Some(block) = search.next() {
            // Recorded first, as offline_and_online does.
            lock.record(block).unwrap();
            match write_state(block, BlockOp::Offline, Instant::now() + Duration::from_secs(2)).unwrap() {
                Write::Done(_) => {
                    offline = Some(block);
                    break;
                }
                Write::Failed(_) | Write::Interrupted { .. } => {
                    ensure_online(block).unwrap();
                    lock.unrecord(block).unwrap();
                }
            }
        }
        let Some(block) = offline else {
            eprintln!("notice: no block would go offline: {}", search.describe());
            return;
        };
        assert_eq!(block_state(block).unwrap(), BlockState::Offline);

        // Crash: the record names a process that cannot be running
        // (pids are below pid_max).
        let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
        lock.offline.clear();
        let record = format!("{RECORD_HEADER}{pid_max} {block}\n");
        lock.file.write_all_at(record.as_bytes(), 0).unwrap();
        lock.file.set_len(record.len() as u64).unwrap();
        drop(lock);

        let start = Instant::now();
        let lock = self::lock();
        eprintln!("recovered {:?} in {:?}; {}", lock.recovered(), start.elapsed(), search.describe());
        assert_eq!(lock.recovered(), [block]);
        assert_eq!(block_state(block).unwrap(), BlockState::Online);
        assert_eq!(parse_record(&std::fs::read_to_string(LOCK_PATH).unwrap()), []);
        assert!(search.intact(), "data changed");
    }
}
