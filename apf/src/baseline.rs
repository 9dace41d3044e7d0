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
}

impl SinglePageHandler {
    /// Registers `ram` and starts the handler thread.
    pub fn start(ram: Arc<GuestRam>, source: Arc<dyn PageSource>) -> Result<Self, UffdError> {
        // It blocks in poll(2), with a timeout so that it can stop.
        let uffd = Arc::new(Uffd::new(Features::empty(), Features::empty())?);
        for r in ram.regions() {
            uffd.register(r.host_base(), r.len(), RegisterMode::MISSING)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(AtomicU64::new(0));
        let hist = Histogram::new_with_bounds(1, 3_600_000_000_000, 3).unwrap_or_else(|_| unreachable!("valid bounds"));
        let latency = Arc::new(Mutex::new(hist));
        let (u, s, f, rm, l) = (uffd.clone(), stop.clone(), faults.clone(), ram.clone(), latency.clone());
        let thread = std::thread::Builder::new()
            .name("baseline-uffd".into())
            .spawn(move || run(&u, &rm, source.as_ref(), &s, &f, &l))
            .map_err(UffdError::Read)?;
        Ok(SinglePageHandler { stop, faults, thread: Some(thread), uffd, ram, latency })
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

fn run(
    uffd: &Uffd,
    ram: &GuestRam,
    source: &dyn PageSource,
    stop: &AtomicBool,
    faults: &AtomicU64,
    latency: &Mutex<Histogram<u64>>,
) {
    let mut buf = EventBuf::default();
    let mut events = Vec::new();
    let mut page = vec![0u8; PAGE_SIZE];
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [rustix::event::PollFd::new(uffd, rustix::event::PollFlags::IN)];
        let timeout = rustix::event::Timespec { tv_sec: 0, tv_nsec: 100_000_000 };
        if !matches!(rustix::event::poll(&mut fds, Some(&timeout)), Ok(n) if n > 0) {
            continue;
        }
        if uffd.read_events(&mut buf, &mut events).is_err() {
            return;
        }
        let read_at = Instant::now();
        for ev in &events {
            let Event::Fault { addr, .. } = *ev else { continue };
            faults.fetch_add(1, Ordering::Relaxed);
            let host = addr & !(PAGE_SIZE as u64 - 1);
            let Some(loc) = ram.locate_host(host) else { continue };
            let gpa = ram.region(loc).page_gpa(loc.page);
            let src = match source.resident(gpa, PAGE_SIZE) {
                Some(p) => p,
                None => {
                    if source.fill(gpa, &mut page).is_err() {
                        let _ = uffd.poison(host, PAGE_SIZE);
                        continue;
                    }
                    page.as_ptr()
                }
            };
            if let Err(e) = uffd.copy(host, src, PAGE_SIZE, false) {
                if e.errno == libc::EEXIST {
                    let _ = uffd.wake(host, PAGE_SIZE);
                }
            }
            let ns = read_at.elapsed().as_nanos().clamp(1, 3_600_000_000_000) as u64;
            let _ = latency.lock().unwrap_or_else(|e| e.into_inner()).record(ns);
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
