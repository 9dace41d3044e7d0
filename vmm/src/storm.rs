//! Host-side offlining during a run: a low-priority thread that offlines
//! random ranges of all of guest RAM (code, stacks, page tables and the
//! checksum ring included: migration is transparent, so the guest cannot
//! tell), and once, if asked, a real host memory block holding guest pages.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agent_proto::{splitmix64, PAGE_SIZE};
use apf::{Engine, GuestAddress, GuestRange, HostBlockSearch, Mode, OfflineError};

use crate::checksum::ring_range_in;
use crate::config::OfflineMode;
use crate::report::Errors;

/// Deadline of one storm offline.
const DEADLINE: Duration = Duration::from_secs(2);
/// Deadline of one host block attempt.
const BLOCK_ATTEMPT: Duration = Duration::from_millis(1500);

/// What the storm did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StormReport {
    /// Offlines started.
    pub requests: u64,
    /// Offlines that finished.
    pub completed: u64,
    /// Offlines that hit their deadline.
    pub busy: u64,
    /// Offlines skipped: another offline held part of the range.
    pub overlapped: u64,
    /// The host block outcome: "offlined", "none qualified", "error" or
    /// "off".
    pub host_block: String,
    /// Details of the host block offline.
    pub host_block_detail: String,
}

/// What to storm with.
#[derive(Debug, Clone, Copy)]
pub struct StormConfig {
    /// Time between offlines; None: no storm.
    pub every: Option<Duration>,
    /// Which modes.
    pub mode: OfflineMode,
    /// Largest range one offline takes, in pages (at least 1); each draws
    /// its size uniformly from 1 to this, and never more than RAM.
    pub max_pages: u64,
    /// When to offline one host block; None: never.
    pub host_block_at: Option<Instant>,
    /// Seed of the range choice.
    pub seed: u64,
}

/// A running storm.
#[derive(Debug)]
pub struct Storm {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    report: Arc<Mutex<StormReport>>,
}

impl Storm {
    /// Starts the storm thread.
    pub fn start(engine: Arc<Engine>, config: StormConfig, errors: Arc<Errors>) -> std::io::Result<Storm> {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(StormReport { host_block: "off".into(), ..StormReport::default() }));
        let handle = {
            let (stop, report) = (stop.clone(), report.clone());
            crate::spawn_traced("offline-storm", move || run(&engine, config, &stop, &report, &errors))?
        };
        Ok(Storm { stop, handle: Some(handle), report })
    }

    /// What the storm did so far.
    pub fn progress(&self) -> StormReport {
        self.report.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the storm (the offline in progress finishes first) and
    /// returns what it did.
    pub fn stop(mut self) -> StormReport {
        self.halt();
        self.report.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Storm {
    fn drop(&mut self) {
        // A run that fails to start must not leave the storm running.
        self.halt();
    }
}

fn run(engine: &Engine, config: StormConfig, stop: &AtomicBool, report: &Mutex<StormReport>, errors: &Errors) {
    // Offlining competes with vCPUs and the engine for two cores; at normal
    // priority a busy storm triples fault latency.
    let _ = apf::set_thread_nice(19);
    let ram = engine.ram().size();
    // Ranges of whole pages of guest RAM (2 MiB on huge pages, which the
    // engine offlines whole only): `max_pages` counts 4 KiB pages.
    let page = engine.ram().regions().iter().map(|r| r.page_size() as u64).max().unwrap_or(PAGE_SIZE);
    let ram_pages = ram / page;
    let max_pages = (config.max_pages * PAGE_SIZE / page).max(1);
    let mut rng = config.seed ^ 0x5707_3e11;
    let mut n = 0u64;
    let mut next = Instant::now();
    let mut host_block_at = config.host_block_at;
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        if host_block_at.is_some_and(|t| now >= t) {
            host_block_at = None;
            let all = GuestRange::new(GuestAddress(0), ram);
            let (outcome, detail) = match engine.offline_any_host_block(all, BLOCK_ATTEMPT) {
                Ok(found @ HostBlockSearch::Offlined { .. }) => ("offlined", found.to_string()),
                Ok(none) => ("none qualified", none.to_string()),
                Err(e) => {
                    let e = crate::error_chain(&e);
                    errors.push(format!("host block offline: {e}"));
                    ("error", e)
                }
            };
            let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
            r.host_block = outcome.into();
            r.host_block_detail = detail;
            continue;
        }
        let Some(every) = config.every else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(5)));
            continue;
        }
        next = now + every;
        n += 1;
        rng = splitmix64(rng);
        // One offline in four hits the pinned checksum ring, the first
        // one among them (a short run may make only a few).
        let range = if n % 4 == 1 {
            ring_range_in(engine.ram())
        } else {
            let pages = 1 + rng % max_pages.clamp(1, ram_pages);
            let first = splitmix64(rng) % (ram_pages - pages + 1);
            GuestRange::new(GuestAddress(first * page), pages * page)
        };
        let mode = match config.mode {
            OfflineMode::Migrate => Mode::Migrate,
            OfflineMode::Evict => Mode::Evict,
            OfflineMode::Mixed if n % 2 == 0 => Mode::Migrate,
            OfflineMode::Mixed => Mode::Evict,
        };
        let result = engine.offline(range, mode, Instant::now() + DEADLINE);
        let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
        r.requests += 1;
        match result {
            Ok(_) => r.completed += 1,
            Err(e) if e.is_busy() => r.busy += 1,
            Err(OfflineError::Overlap(_)) => r.overlapped += 1,
            Err(OfflineError::Stopped) => return,
            Err(e) => {
                drop(r);
                errors.push(format!("storm {mode} of {range}: {}", crate::error_chain(&e)));
            }
        }
    }
}
