//! The anchor apf is measured against: one thread, blocking on the
//! userfaultfd, resolving one page per fault with one `UFFDIO_COPY` from the
//! source. This is the strategy of the single-threaded example handlers VMMs
//! ship. It is here for benchmarks and comparisons, not for production use.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::ram::GuestRam;
use crate::source::PageSource;
use crate::uffd::{Event, EventBuf, Features, RegisterMode, Uffd, UffdError, PAGE_SIZE};

/// A running single-page handler over all of a [`GuestRam`].
#[derive(Debug)]
pub struct SinglePageHandler {
    stop: Arc<AtomicBool>,
    faults: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
    uffd: Arc<Uffd>,
    ram: Arc<GuestRam>,
    latency: Arc<Mutex<Histogram<u64>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

/// Errors the handler keeps (the first ones; later ones are counted only).
const KEPT_ERRORS: usize = 64;

impl SinglePageHandler {
    /// Registers `ram` and starts the handler thread.
    pub fn start(ram: Arc<GuestRam>, source: Arc<dyn PageSource>) -> Result<Self, UffdError> {
        // It blocks in poll(2), with a timeout so that it can stop.
        // POISON where the kernel has it: a page that cannot be filled gets
        // SIGBUS instead of leaving its thread blocked.
        let uffd = Arc::new(Uffd::new(Features::empty(), Features::POISON)?);
        for r in ram.regions() {
            uffd.register(r.host_base(), r.len(), RegisterMode::MISSING)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(AtomicU64::new(0));
        let hist = Histogram::new_with_bounds(1, 3_600_000_000_000, 3).unwrap_or_else(|_| unreachable!("valid bounds"));
        let latency = Arc::new(Mutex::new(hist));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let h = Handler {
            uffd: uffd.clone(),
            ram: ram.clone(),
            source,
            stop: stop.clone(),
            faults: faults.clone(),
            latency: latency.clone(),
            errors: errors.clone(),
        };
        let thread =
            std::thread::Builder::new().name("baseline-uffd".into()).spawn(move || h.run()).map_err(UffdError::Read)?;
        Ok(SinglePageHandler { stop, faults, thread: Some(thread), uffd, ram, latency, errors })
    }

    /// The failpoints of the handler's userfaultfd (feature `failpoints`).
    #[cfg(feature = "failpoints")]
    pub fn failpoints(&self) -> &Arc<crate::failpoints::FailPoints> {
        self.uffd.failpoints()
    }

    /// What went wrong so far (the first `KEPT_ERRORS`): pages that could
    /// not be filled or installed, reads that failed.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Faults handled so far.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// Fault service latency at quantile `q` (0.5 for the median), measured
    /// as the engine measures its own `apf.fault` spans: from the read of
    /// the fault to the end of the install that wakes the thread.
    pub fn latency_at(&self, q: f64) -> Duration {
        let h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        Duration::from_nanos(if h.is_empty() { 0 } else { h.value_at_quantile(q) })
    }
}

/// The handler thread's state.
struct Handler {
    uffd: Arc<Uffd>,
    ram: Arc<GuestRam>,
    source: Arc<dyn PageSource>,
    stop: Arc<AtomicBool>,
    faults: Arc<AtomicU64>,
    latency: Arc<Mutex<Histogram<u64>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Handler {
    fn report(&self, what: String) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.len() < KEPT_ERRORS {
            errors.push(what);
        }
    }

    fn run(&self) {
        let mut buf = EventBuf::default();
        let mut events = Vec::new();
        let mut page = vec![0u8; PAGE_SIZE];
        while !self.stop.load(Ordering::Relaxed) {
            let mut fds = [rustix::event::PollFd::new(&*self.uffd, rustix::event::PollFlags::IN)];
            let timeout = rustix::event::Timespec { tv_sec: 0, tv_nsec: 100_000_000 };
            if !matches!(rustix::event::poll(&mut fds, Some(&timeout)), Ok(n) if n > 0) {
                continue;
            }
            if let Err(e) = self.uffd.read_events(&mut buf, &mut events) {
                // Never stop silently: say so, and wake every range so
                // that blocked threads fault again into a later read.
                self.report(format!("reading fault events failed: {e}"));
                for r in self.ram.regions() {
                    let _ = self.uffd.wake(r.host_base(), r.len() as usize);
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let read_at = Instant::now();
            for ev in &events {
                let Event::Fault { addr, .. } = *ev else { continue };
                self.faults.fetch_add(1, Ordering::Relaxed);
                self.resolve(addr & !(PAGE_SIZE as u64 - 1), &mut page);
                let ns = read_at.elapsed().as_nanos().clamp(1, 3_600_000_000_000) as u64;
                let _ = self.latency.lock().unwrap_or_else(|e| e.into_inner()).record(ns);
            }
        }
    }

    /// One page, one `COPY`. Whatever fails, the faulting thread is woken:
    /// with its page, with poison (SIGBUS), or to fault again.
    fn resolve(&self, host: u64, page: &mut [u8]) {
        let Some(loc) = self.ram.locate_host(host) else {
            self.report(format!("fault at {host:#x}, outside guest RAM"));
            let _ = self.uffd.wake(host, PAGE_SIZE);
            return;
        };
        let gpa = self.ram.region(loc).page_gpa(loc.page);
        let src = match self.source.resident(gpa, PAGE_SIZE) {
            Some(p) => p,
            None => match self.source.fill(gpa, page) {
                Ok(()) => page.as_ptr(),
                Err(e) => {
                    self.report(format!("page source failed for guest page {:#x}: {e}", gpa.0));
                    return self.poison_or_wake(host);
                }
            },
        };
        // SAFETY: `host` is a page of guest RAM (located above), which no
        // Rust reference ever points into (see `crate::ram`); `src` is a
        // page: the source's resident page or `page`.
        match unsafe { self.uffd.copy(host, src, PAGE_SIZE, false) } {
            Ok(_) => {}
            Err(e) if e.errno == libc::EEXIST => {
                let _ = self.uffd.wake(host, PAGE_SIZE);
            }
            Err(e) => {
                self.report(format!("installing guest page {:#x} failed: {e}", gpa.0));
                self.poison_or_wake(host);
            }
        }
    }

    fn poison_or_wake(&self, host: u64) {
        // SAFETY: `host` is a page of guest RAM, which no Rust reference ever
        // points into (see `crate::ram`).
        let poisoned =
            self.uffd.features().contains(Features::POISON) && unsafe { self.uffd.poison(host, PAGE_SIZE) }.is_ok();
        if !poisoned {
            let _ = self.uffd.wake(host, PAGE_SIZE);
        }
    }
}

impl Drop for SinglePageHandler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for r in self.ram.regions() {
            let _ = self.uffd.unregister(r.host_base(), r.len());
        }
    }
}
