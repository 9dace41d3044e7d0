//! The engine's test toolkit, shared by its integration tests (each test
//! file includes it with `mod common;`):
//!
//! - [`ScriptedSource`]: one page source whose fills can be told, with a
//!   small builder, what to fill, which fills to fail (and with which
//!   error), to panic, to hold at a gate until the test releases them, and
//!   how long to take; it counts what it was asked.
//! - Word and page access to engine-managed guest RAM through vm-memory's
//!   `Bytes` ([`read_word`], [`write_word`], [`read_page`]), and the raw
//!   accesses some tests need on purpose: [`try_read_word`] and
//!   [`try_write_word`] through `process_vm_readv`/`writev`, which answer
//!   `EFAULT` where an access would take SIGBUS, and [`discard`], a
//!   balloon's `MADV_DONTNEED`.
//! - [`busy`]: the holders an offline that came back `Busy` names.
//! - Bounded waits: [`wait_for`] a flag, run a closure [`within`] a limit.
//! - [`offline_beside_writer`]: migrates and evicts a range in turn beside
//!   a writer thread, for the tests that no write is lost.

// Each test file uses its own part of the toolkit; what one file leaves
// unused is not dead.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use apf::{GuestAddress, GuestRam, GuestRange, OfflineError, PageSource, Pattern, SourceError, SourceKind, PAGE_SIZE};
use vm_memory::Bytes;

/// How long a held fill waits for [`ScriptedSource::release`] unless told
/// otherwise: a test that forgets to release, or fails before it does,
/// goes on (and fails on what it finds) instead of hanging.
pub const HOLD_LIMIT: Duration = Duration::from_secs(10);

/// Which fills a rule of a [`ScriptedSource`] applies to. A fill is one
/// call of [`PageSource::fill`], for one page or a window of several.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fills {
    /// Every fill.
    All,
    /// Fills whose range covers the page at this guest address.
    Covering(u64),
    /// The first `n` fills the source is asked for, whatever their pages.
    First(u64),
    /// Fills of more than one page (prefetch windows and fault-around
    /// blocks).
    Windows,
}

impl Fills {
    /// Whether the rule applies to fill number `call` (from 0) of
    /// `[gpa, gpa + len)`.
    fn take(self, call: u64, gpa: u64, len: usize) -> bool {
        match self {
            Fills::All => true,
            Fills::Covering(page) => (gpa..gpa + len as u64).contains(&page),
            Fills::First(n) => call < n,
            Fills::Windows => len > PAGE_SIZE,
        }
    }
}

/// The error a failing fill returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// `SourceError::Io` carrying this errno (a read of the backing store
    /// that failed).
    Io(i32),
    /// `SourceError::NotCovered`: the source has nothing for the range.
    NotCovered,
}

impl Failure {
    fn error(self, gpa: GuestAddress, len: usize) -> SourceError {
        match self {
            Failure::Io(errno) => SourceError::Io { gpa, len, source: std::io::Error::from_raw_os_error(errno) },
            Failure::NotCovered => SourceError::NotCovered(GuestRange::new(gpa, len as u64)),
        }
    }
}

/// Writes a page's contents: `(gpa, buf)`.
type FillFn = Box<dyn Fn(GuestAddress, &mut [u8]) + Send + Sync>;

/// Runs before a fill: `(gpa, len)`.
type HookFn = Box<dyn Fn(GuestAddress, usize) + Send + Sync>;

/// What a successful fill writes.
enum Contents {
    /// The pattern's bytes for the page's address.
    Pattern(Pattern),
    /// Every byte this value.
    Byte(u8),
    /// Whatever the closure writes for `(gpa, buf)`.
    With(FillFn),
}

/// The gate held fills wait at.
#[derive(Debug, Default)]
struct Gate {
    open: bool,
    /// Held fills that have arrived at the gate, open or not.
    arrived: u64,
}

/// A page source whose every fill follows a script, for tests that need
/// one chosen fill to be slow, to fail, to panic, or to wait for the test
/// to move on.
///
/// Built from its contents (`pattern`, `zeros`, `bytes`, `with`) and
/// rules; a fill runs them in this order: the fill is counted
/// ([`calls`](Self::calls)); the [`before_fill`](Self::before_fill) hook
/// runs; a fill the [`hold`](Self::hold) rule takes waits at the gate (up
/// to its limit); the fill sleeps its [`delay`](Self::delay); a fill the
/// [`panic_on`](Self::panic_on) rule takes panics; a fill the
/// [`fail`](Self::fail) rule takes, or any fill while
/// [`set_failing`](Self::set_failing) is on, fails with the
/// [`error`](Self::error); any other is counted per page
/// ([`fills_of`](Self::fills_of)) and filled.
///
/// ```ignore
/// // Fills covering page 3 wait until the test releases them; every
/// // multi-page fill fails with EIO; each page takes 10 ms.
/// let source = Arc::new(
///     ScriptedSource::pattern(Pattern { seed: 1 })
///         .hold(Fills::Covering(3 * PAGE))
///         .fail(Fills::Windows)
///         .delay_per_page(Duration::from_millis(10)),
/// );
/// ```
pub struct ScriptedSource {
    contents: Contents,
    kind: SourceKind,
    name: &'static str,
    delay: Duration,
    delay_per_page: Duration,
    before_fill: Option<HookFn>,
    fail: Option<Fills>,
    failure: Failure,
    failing: AtomicBool,
    panic_on: Option<Fills>,
    hold: Option<Fills>,
    hold_limit: Duration,
    gate: Mutex<Gate>,
    gate_moved: Condvar,
    calls: AtomicU64,
    fills: Mutex<HashMap<u64, u32>>,
}

impl fmt::Debug for ScriptedSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptedSource")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("fail", &self.fail)
            .field("panic_on", &self.panic_on)
            .field("hold", &self.hold)
            .field("calls", &self.calls())
            .finish_non_exhaustive()
    }
}

impl ScriptedSource {
    fn new(contents: Contents) -> Self {
        ScriptedSource {
            contents,
            kind: SourceKind::Blocking,
            name: "scripted",
            delay: Duration::ZERO,
            delay_per_page: Duration::ZERO,
            before_fill: None,
            fail: None,
            failure: Failure::Io(libc::EIO),
            failing: AtomicBool::new(false),
            panic_on: None,
            hold: None,
            hold_limit: HOLD_LIMIT,
            gate: Mutex::new(Gate::default()),
            gate_moved: Condvar::new(),
            calls: AtomicU64::new(0),
            fills: Mutex::new(HashMap::new()),
        }
    }

    /// Fills with the pattern's contents.
    pub fn pattern(pattern: Pattern) -> Self {
        Self::new(Contents::Pattern(pattern))
    }

    /// Fills with zeros.
    pub fn zeros() -> Self {
        Self::bytes(0)
    }

    /// Fills every byte with `byte`.
    pub fn bytes(byte: u8) -> Self {
        Self::new(Contents::Byte(byte))
    }

    /// Fills with what `fill(gpa, buf)` writes into `buf`.
    pub fn with(fill: impl Fn(GuestAddress, &mut [u8]) + Send + Sync + 'static) -> Self {
        Self::new(Contents::With(Box::new(fill)))
    }

    /// The kind the source reports (where the engine runs its fills);
    /// `Blocking` unless told.
    pub fn kind(mut self, kind: SourceKind) -> Self {
        self.kind = kind;
        self
    }

    /// The name the source reports.
    pub fn name(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// Every fill sleeps `delay`.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Every fill sleeps `delay` for each page it fills: like real I/O, a
    /// fill takes longer the more it reads.
    pub fn delay_per_page(mut self, delay: Duration) -> Self {
        self.delay_per_page = delay;
        self
    }

    /// Runs `hook(gpa, len)` at the start of every fill, after it is
    /// counted: for a test's own condition a fill must wait for.
    pub fn before_fill(mut self, hook: impl Fn(GuestAddress, usize) + Send + Sync + 'static) -> Self {
        self.before_fill = Some(Box::new(hook));
        self
    }

    /// The fills that fail (with [`error`](Self::error), EIO unless told).
    pub fn fail(mut self, fills: Fills) -> Self {
        self.fail = Some(fills);
        self
    }

    /// The error failing fills return.
    pub fn error(mut self, failure: Failure) -> Self {
        self.failure = failure;
        self
    }

    /// The fills that panic (a bug in the source).
    pub fn panic_on(mut self, fills: Fills) -> Self {
        self.panic_on = Some(fills);
        self
    }

    /// The fills held at the gate until [`release`](Self::release), for at
    /// most [`HOLD_LIMIT`]. The gate starts closed.
    pub fn hold(mut self, fills: Fills) -> Self {
        self.hold = Some(fills);
        self
    }

    /// How long a held fill waits for the gate before it goes on anyway.
    pub fn hold_limit(mut self, limit: Duration) -> Self {
        self.hold_limit = limit;
        self
    }

    /// Opens the gate from the start: held fills go through until
    /// [`close`](Self::close).
    pub fn gate_open(self) -> Self {
        self.gate().open = true;
        self
    }

    fn gate(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens the gate: held fills go on, and later ones pass.
    pub fn release(&self) {
        self.gate().open = true;
        self.gate_moved.notify_all();
    }

    /// Closes the gate: from now on, held fills wait again.
    pub fn close(&self) {
        self.gate().open = false;
    }

    /// Whether a fill the hold rule takes has arrived (open gate or not).
    pub fn held(&self) -> bool {
        self.gate().arrived > 0
    }

    /// Waits up to `limit` for a fill the hold rule takes to arrive; false
    /// if none did.
    pub fn wait_held(&self, limit: Duration) -> bool {
        let gate = self.gate();
        let (gate, _) =
            self.gate_moved.wait_timeout_while(gate, limit, |g| g.arrived == 0).unwrap_or_else(|e| e.into_inner());
        gate.arrived > 0
    }

    /// Makes every fill fail from now on (true) or stops that (false),
    /// whatever the fail rule says.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Fills asked for so far, whatever came of them.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Successful fills that covered the page at `gpa`.
    pub fn fills_of(&self, gpa: u64) -> u32 {
        self.fills.lock().unwrap_or_else(|e| e.into_inner()).get(&gpa).copied().unwrap_or(0)
    }

    /// Waits at the gate (it is held): until it opens, or the hold limit.
    fn wait_at_gate(&self) {
        let mut gate = self.gate();
        gate.arrived += 1;
        self.gate_moved.notify_all();
        let (gate, waited) =
            self.gate_moved.wait_timeout_while(gate, self.hold_limit, |g| !g.open).unwrap_or_else(|e| e.into_inner());
        drop(gate);
        if waited.timed_out() {
            eprintln!("{}: a held fill went on after {:?} without a release", self.name, self.hold_limit);
        }
    }
}

impl PageSource for ScriptedSource {
    fn fill(&self, gpa: GuestAddress, buf: &mut [u8]) -> Result<(), SourceError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let len = buf.len();
        let takes = |rule: Option<Fills>| rule.is_some_and(|f| f.take(call, gpa.0, len));
        if let Some(hook) = &self.before_fill {
            hook(gpa, len);
        }
        if takes(self.hold) {
            self.wait_at_gate();
        }
        let pages = (len / PAGE_SIZE) as u32;
        let delay = self.delay + self.delay_per_page * pages;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        if takes(self.panic_on) {
            panic!("a bug in the page source (fill {call} of {gpa:#x}, {len:#x} bytes)", gpa = gpa.0);
        }
        if takes(self.fail) || self.failing.load(Ordering::SeqCst) {
            return Err(self.failure.error(gpa, len));
        }
        let mut fills = self.fills.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..u64::from(pages) {
            *fills.entry(gpa.0 + i * PAGE_SIZE as u64).or_default() += 1;
        }
        drop(fills);
        match &self.contents {
            Contents::Pattern(p) => p.write(gpa.0, buf),
            Contents::Byte(b) => buf.fill(*b),
            Contents::With(f) => f(gpa, buf),
        }
        Ok(())
    }

    fn kind(&self) -> SourceKind {
        self.kind
    }

    fn name(&self) -> &'static str {
        self.name
    }
}

/// The 8-byte word at `gpa` of guest RAM, read through vm-memory (a
/// missing page is faulted in through the engine). Panics if `gpa` is not
/// in RAM.
pub fn read_word(ram: &GuestRam, gpa: u64) -> u64 {
    ram.guest_memory().read_obj(GuestAddress(gpa)).unwrap_or_else(|e| panic!("read at {gpa:#x}: {e}"))
}

/// Writes the 8-byte word `value` at `gpa` of guest RAM, through
/// vm-memory. Panics if `gpa` is not in RAM.
pub fn write_word(ram: &GuestRam, gpa: u64, value: u64) {
    ram.guest_memory().write_obj(value, GuestAddress(gpa)).unwrap_or_else(|e| panic!("write at {gpa:#x}: {e}"))
}

/// A copy of the page at `gpa` (faulting it in), read through vm-memory.
pub fn read_page(ram: &GuestRam, gpa: u64) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE];
    ram.guest_memory().read_slice(&mut page, GuestAddress(gpa)).unwrap_or_else(|e| panic!("read at {gpa:#x}: {e}"));
    page
}

/// Writes `bytes` at `gpa` of guest RAM, through vm-memory.
pub fn write_bytes(ram: &GuestRam, gpa: u64, bytes: &[u8]) {
    ram.guest_memory().write_slice(bytes, GuestAddress(gpa)).unwrap_or_else(|e| panic!("write at {gpa:#x}: {e}"));
}

/// Reads `buf.len()` bytes at `gpa` with `process_vm_readv` on this
/// process: a missing page is faulted in through the engine, and a
/// poisoned one answers `EFAULT` (an `Err`) instead of raising SIGBUS.
pub fn try_read(ram: &GuestRam, gpa: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let host = ram.host_range(GuestAddress(gpa), buf.len() as u64).unwrap();
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: host.cast(), iov_len: buf.len() };
    let pid = std::process::id() as libc::pid_t;
    // SAFETY: `local` is `buf`, writable for its length; the kernel checks
    // `remote` against our own address space and answers EFAULT for what
    // it cannot read, so nothing here can fault.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != buf.len() {
        return Err(std::io::Error::other(format!("short read of {n} of {} bytes", buf.len())));
    }
    Ok(())
}

/// The word at `gpa` read as [`try_read`] does: `None` where an access
/// would take SIGBUS (or the read fails otherwise).
pub fn try_read_word(ram: &GuestRam, gpa: u64) -> Option<u64> {
    let mut word = [0u8; 8];
    try_read(ram, gpa, &mut word).ok().map(|()| u64::from_le_bytes(word))
}

/// Writes the word `value` at `gpa` with `process_vm_writev`: a poisoned
/// page answers `EFAULT` (ignored) instead of raising SIGBUS.
pub fn try_write_word(ram: &GuestRam, gpa: u64, value: u64) {
    let host = ram.host_range(GuestAddress(gpa), 8).unwrap();
    let word = value.to_le_bytes();
    let local = libc::iovec { iov_base: word.as_ptr() as *mut libc::c_void, iov_len: 8 };
    let remote = libc::iovec { iov_base: host.cast(), iov_len: 8 };
    let pid = std::process::id() as libc::pid_t;
    // SAFETY: `local` is 8 readable bytes on this frame (the kernel only
    // reads it); as in `try_read`, the kernel checks `remote`.
    unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
}

/// Discards `[gpa, gpa + len)` of guest RAM with `MADV_DONTNEED`, as a
/// balloon does: the range reads as zeros afterwards (through the engine).
pub fn discard(ram: &GuestRam, gpa: u64, len: u64) {
    let host = ram.host_range(GuestAddress(gpa), len).unwrap();
    // SAFETY: the range is guest RAM the engine serves; dropping its
    // contents is what a balloon does, and no Rust reference points into
    // it (tests reach it through vm-memory or the kernel only).
    assert_eq!(unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) }, 0);
}

/// What held an offline that came back `Busy` (the fields of
/// [`OfflineError::Busy`] a test checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Short-term references still held.
    pub refs: usize,
    /// Hard pins still held.
    pub hard: usize,
    /// Pages the kernel would not move.
    pub kernel_pinned: usize,
    /// Pages an unplug discarded before it stopped.
    pub discarded: usize,
}

/// What held the offline whose result is `result`, which must be
/// [`OfflineError::Busy`]; panics, saying it expected `Busy` from `what`
/// and what came instead, on anything else.
#[track_caller]
pub fn busy<T: fmt::Debug>(result: Result<T, OfflineError>, what: &str) -> Held {
    match result {
        Err(OfflineError::Busy { refs, hard, kernel_pinned, discarded, .. }) => {
            Held { refs, hard, kernel_pinned, discarded }
        }
        other => panic!("expected Busy from {what}, got {other:?}"),
    }
}

/// Waits up to `limit` for `flag`; false if it stayed down.
pub fn wait_for(flag: &AtomicBool, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while !flag.load(Ordering::SeqCst) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

/// Runs `f` on a thread and waits at most `limit` for it: an access that
/// never returns is a hung thread, which is what the tests must catch.
#[track_caller]
pub fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).expect("the access hung")
}

/// The default configuration on backend `b`.
pub fn config(b: apf::Backend) -> apf::Config {
    apf::Config { backend: b, ..apf::Config::default() }
}

/// Runs each named test, a `fn(apf::Backend)` of the including file, on
/// both backends: one `#[test]` per backend, in a module named after it.
/// (Test files that have no such test leave it unused.)
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn private_anonymous() {
                super::$name(apf::Backend::PrivateAnonymous)
            }
            #[test]
            fn limited() {
                super::$name(apf::Backend::Limited)
            }
        }
    )*};
}
#[allow(unused_imports)]
pub(crate) use on_both_backends;

/// What [`offline_beside_writer`] did.
pub struct Hammered {
    /// Offlines run.
    pub rounds: usize,
    /// Their time.
    pub took: Duration,
    /// Words the writer wrote.
    pub writes: usize,
    /// The engine's counters before the first offline.
    pub before: apf::StatsSnapshot,
}

/// Migrates and evicts `range` in turn beside `writer` (a thread writing
/// until `stop` is set, which returns every (guest address, value) it
/// wrote), at least `min_rounds` times and until a write met a
/// write-protected page, or 10 s passed (on a busy machine the writer may
/// be off the CPU for many rounds). Each offline must succeed and, when
/// `pages` is given, take that many pages. Then stops the writer and puts
/// what it wrote into `expected`, the bytes of guest RAM from `base`.
#[allow(clippy::too_many_arguments)]
pub fn offline_beside_writer(
    engine: &apf::Engine,
    range: GuestRange,
    pages: Option<usize>,
    min_rounds: usize,
    stop: &AtomicBool,
    writer: std::thread::JoinHandle<Vec<(u64, u64)>>,
    base: u64,
    expected: &mut [u8],
    what: &str,
) -> Hammered {
    use apf::Mode;
    let before = engine.stats();
    let start = Instant::now();
    let mut rounds = 0;
    while rounds < min_rounds
        || (engine.stats().write_protect_faults == before.write_protect_faults
            && start.elapsed() < Duration::from_secs(10))
    {
        let mode = if rounds % 2 == 0 { Mode::Migrate } else { Mode::Evict };
        let report = engine.offline(range, mode, Instant::now() + Duration::from_secs(10));
        let report = report.unwrap_or_else(|e| panic!("{what} {mode}: {e}"));
        if let Some(pages) = pages {
            assert_eq!(report.pages, pages, "{what} {mode}");
        }
        rounds += 1;
    }
    let took = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    for (gpa, v) in &written {
        let at = (gpa - base) as usize;
        expected[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    Hammered { rounds, took, writes: written.len(), before }
}

/// The huge-page tests of a binary run one at a time: the pool is one for
/// the whole machine, and the dry-pool tests count its free pages.
static HUGE_SERIAL: Mutex<()> = Mutex::new(());

/// `pages` huge pages reserved for a test (and the binary's huge-page
/// tests held off), or `None` (skipped, said on stderr) when the machine
/// cannot give them outside CI.
pub fn huge_pool(pages: u64) -> Option<(apf::hugepool::Reservation, MutexGuard<'static, ()>)> {
    use apf::hugepool::{HugePool, HugePoolError};
    let serial = HUGE_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    match HugePool::reserve(pages, Instant::now() + Duration::from_secs(10)) {
        Ok(r) => Some((r, serial)),
        Err(e @ (HugePoolError::Shortfall { .. } | HugePoolError::Deadline { .. }))
            if std::env::var("CI").as_deref() != Ok("true") =>
        {
            eprintln!("SKIPPED: cannot reserve {pages} huge pages: {e}");
            None
        }
        Err(e) => panic!("cannot reserve {pages} huge pages: {e}"),
    }
}

/// `HugePages_Free` of `/proc/meminfo`.
pub fn hugepages_free() -> u64 {
    meminfo("HugePages_Free:")
}

/// The number on the line of `/proc/meminfo` that starts with `key`.
pub fn meminfo(key: &str) -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = info.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Says a test checks nothing on this machine, and why (on stderr); under
/// `CI` it fails instead: a skip there is never counted as a pass.
pub fn skip_outside_ci(why: &str) {
    assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "under CI: {why}");
    eprintln!("SKIPPED: {why}");
}

/// The pool's free huge pages, for a test that runs it dry by mapping more
/// than that `MAP_NORESERVE`; `None` (a skip outside `CI`) when there are
/// too many to map.
pub fn free_to_run_dry() -> Option<u64> {
    let free = hugepages_free();
    if free > 64 {
        skip_outside_ci(&format!("{free} huge pages are free in the pool; too many to run it dry"));
        return None;
    }
    Some(free)
}
