//! Resolving one claimed window: fill from its origin, check the
//! invalidation sequence under the install lock, install, and follow the
//! kernel's return conventions.
//!
//! - A COPY that meets a present page part-way returns the bytes it did
//!   (as `EAGAIN` with progress): install the rest from where it stopped.
//! - `EEXIST` with nothing done: the page is present (someone else put it
//!   there). Mark it, WAKE it ourselves (nobody else will), skip it.
//! - `EAGAIN` with nothing done: a remove event is pending. The event loop
//!   must read it first, so the event loop hands such jobs to a worker, and
//!   workers retry after a short sleep, up to the install deadline.

use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use tracing::field;

use super::{Causes, Core, FaultError, GiveUp, Job, Run, Window};
use crate::ram::{GuestAddress, GuestRange, MemoryKind, Origin, Region};
use crate::source::PageSource;
use crate::uffd::PAGE_SIZE;

/// Per-thread scratch: the fill buffer is reused across jobs.
pub(crate) struct Ctx {
    pub on_loop: bool,
    buf: Vec<u8>,
    /// `mincore` answers.
    residency: Vec<u8>,
}

impl Ctx {
    pub fn new(on_loop: bool, max_window: usize) -> Self {
        Ctx { on_loop, buf: vec![0; max_window * PAGE_SIZE], residency: Vec::with_capacity(max_window + 1) }
    }
}

/// Whether every page of `[ptr, ptr + len)` is in memory (for a file
/// mapping: in the page cache). A `COPY` runs under the install lock, which
/// invalidations wait for: it may copy straight from a resident source only
/// when that cannot wait for a disk. Otherwise the source's `fill` reads it
/// into the buffer first, with no lock held.
fn in_memory(ptr: *const u8, len: usize, answers: &mut Vec<u8>) -> bool {
    let start = ptr as usize & !(PAGE_SIZE - 1);
    let end = (ptr as usize).saturating_add(len).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let pages = (end - start) / PAGE_SIZE;
    answers.clear();
    answers.resize(pages, 0);
    // SAFETY: mincore reads the kernel's view of `[start, end)` and writes
    // one byte per page into `answers`, which has exactly that many; it
    // fails with ENOMEM (not UB) if the range is not mapped.
    let ret = unsafe { libc::mincore(start as *mut libc::c_void, end - start, answers.as_mut_ptr()) };
    ret == 0 && answers.iter().all(|b| b & 1 != 0)
}

/// Maps the resident source's pages `[ptr, ptr + len)` into this
/// process's page tables (`MADV_POPULATE_READ`; they are in the page
/// cache, see [`in_memory`]). A `COPY` reads its source with page faults
/// disabled: a source page the page tables lack makes the kernel copy the
/// data into a bounce page and then copy it again, which for a 2 MiB huge
/// page cost most of the install. Best effort: on failure the kernel's
/// slower path still copies the right bytes.
fn populate_source(ptr: *const u8, len: usize) {
    let start = ptr as usize & !(PAGE_SIZE - 1);
    let end = (ptr as usize).saturating_add(len).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    // SAFETY: MADV_POPULATE_READ only faults pages of `[start, end)` in,
    // as reading them would; it changes no contents and fails (not UB) if
    // the range is not mapped.
    unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_POPULATE_READ) };
}

/// Where a piece of a window comes from at install time.
#[derive(Clone, Copy)]
enum Src {
    /// Copy from this address (resident source, fill buffer or zeros).
    Copy(*const u8),
    /// Map the zero page (read faults on zero pages).
    ZeroPage,
    /// Poison it: unplugged under the poison policy while this resolver
    /// held it.
    Poison,
    /// Map the page-cache pages already there (`CONTINUE`): an image's
    /// pages, for reads.
    Continue,
    /// Nothing to install: the page cache of shared memory holds the
    /// pages, so they are present (and their waiters woken).
    Cached,
}

/// A same-origin piece of a run.
struct Piece {
    first: usize,
    count: usize,
    src: Src,
}

enum InstallError {
    /// The address space is changing; these runs are still claimed.
    Again(Window),
    /// The resident source could not be read by the kernel (`EFAULT`).
    SourceFault(Window),
    /// The kernel had no page to install into (`ENOMEM`: a huge-page pool
    /// mapped `MAP_NORESERVE` ran dry); these runs are still claimed.
    NoMemory(Window, crate::uffd::IoctlError),
    /// Anything else; the pages of the failed piece onward were released.
    Fatal,
}

/// The worker loop: resolve jobs until the channel closes.
pub(crate) fn worker(shared: &Core, rx: &Receiver<Job>) {
    let mut ctx = Ctx::new(false, shared.config().max_window);
    for mut job in rx.iter() {
        job.causes.dequeue();
        let (head, rest) = split_head(job);
        for job in std::iter::once(head).chain(rest) {
            let left = resolve_guarded(shared, job, &mut ctx);
            debug_assert!(left.is_none(), "workers finish their jobs");
            if let Some(job) = left {
                shared.release_runs(job.region, &job.window);
            }
        }
        // Uncounted only once nothing of the job is left claimed.
        shared.job_finished();
        shared.kick_if_parked();
    }
}

/// Pages of a fault's window installed (and woken) before the rest of it.
pub(crate) const HEAD_PAGES: usize = 8;

/// Splits a fault's window of more than twice [`HEAD_PAGES`] into its head
/// (the faulting page and the pages that follow it in the stream's
/// direction, up to `HEAD_PAGES`), which keeps the fault, and the rest, a
/// job no thread waits on yet. A `UFFDIO_COPY` wakes only when its whole
/// range is in, so the head needs its own call for the faulting thread to
/// go on before the rest is copied. Smaller windows (fault-around blocks,
/// short streams) stay whole.
pub(crate) fn split_head(mut job: Job) -> (Job, Option<Job>) {
    let Some(fault) = job.fault else { return (job, None) };
    if job.window.pages() <= 2 * HEAD_PAGES {
        return (job, None);
    }
    let Some(at) = job.window.iter().position(|r| (r.first..r.end()).contains(&fault.page)) else {
        return (job, None);
    };
    let run = job.window[at];
    // Forward streams start their run at the faulting page, backward ones
    // end it there; anything else keeps the run from the fault on.
    let head = if run.first + run.count == fault.page + 1 && run.count > 1 {
        let first = (fault.page + 1).saturating_sub(HEAD_PAGES).max(run.first);
        Run { first, count: fault.page + 1 - first }
    } else {
        Run { first: fault.page, count: (run.end() - fault.page).min(HEAD_PAGES) }
    };
    let mut rest: Vec<Run> = Vec::with_capacity(job.window.len() + 1);
    for (i, r) in job.window.iter().enumerate() {
        if i != at {
            rest.push(*r);
            continue;
        }
        if head.first > r.first {
            rest.push(Run { first: r.first, count: head.first - r.first });
        }
        if r.end() > head.end() {
            rest.push(Run { first: head.end(), count: r.end() - head.end() });
        }
    }
    job.window = Window::from(vec![head]);
    let span = tracing::trace_span!(target: "apf", "apf.prefetch", pages = rest.iter().map(|r| r.count).sum::<usize>(), bytes = field::Empty, outcome = field::Empty);
    let rest = Job { reclaimed: job.reclaimed, ..Job::new(job.region, None, Window::from(rest), span, job.writes) };
    (job, Some(rest))
}

/// [`resolve`], with a panic (of the page source, most likely) contained:
/// the faulting page is poisoned, the rest of the window given back, and
/// the error reported; the calling thread goes on.
pub(crate) fn resolve_guarded(shared: &Core, job: Job, ctx: &mut Ctx) -> Option<Job> {
    resolve_guarded_counting(shared, job, ctx).0
}

/// [`resolve_guarded`], also returning the bytes installed.
fn resolve_guarded_counting(shared: &Core, job: Job, ctx: &mut Ctx) -> (Option<Job>, usize) {
    let (region_idx, window, fault) = (job.region, job.window.clone(), job.fault);
    let panic = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| resolve_counting(shared, job, ctx))) {
        Ok(done) => return done,
        Err(panic) => panic,
    };
    let message = super::panic_message(&*panic);
    let region = &shared.ram().regions()[region_idx];
    let (mut poisoned, mut zeroed) = (false, false);
    // Pages still `Resolving` in the job's runs are still the job's: only a
    // claimant moves a page out of that state.
    let mine = |p: usize| region.state(p).0 == crate::ram::PageState::Resolving;
    let mut others = Vec::new();
    for &Run { first, count } in window.iter() {
        for p in (first..first + count).filter(|&p| mine(p)) {
            if fault.is_some_and(|f| f.page == p) {
                // Under the lock removes and unplugs take to change it: a
                // page discarded or unplugged meanwhile no longer comes
                // from the source that panicked; given back, it faults
                // again and gets zeros (or its unplug's poison).
                let guard = shared.notifier().install_lock();
                let from_source = matches!(region.claimed_origin(p), Origin::Source | Origin::Store);
                // SAFETY: a page of guest RAM, which no Rust reference ever points into (see `crate::ram`).
                let given_up = from_source && unsafe { shared.give_up_on(region.page_host(p), region.page_size()) }.is_ok();
                match shared.give_up() {
                    GiveUp::Poison if given_up => {
                        poisoned = true;
                        shared.checked(region.poison(p));
                        shared.stats().poisoned.add(1);
                    }
                    GiveUp::Zeros if given_up => {
                        zeroed = true;
                        shared.checked(region.complete(p));
                    }
                    _ => {}
                }
                drop(guard);
                if !given_up {
                    others.push(Run::one(p));
                }
            } else {
                others.push(Run::one(p));
            }
        }
    }
    shared.release_runs(region_idx, &others);
    let gpa = region.page_gpa(fault.map_or(window.first().map_or(0, |r| r.first), |f| f.page));
    shared.report_given_up(gpa, zeroed, FaultError::SourcePanicked { gpa, poisoned, message });
    (None, 0)
}

/// Resolves `job`, also returning the bytes this call installed. Returns
/// the job back when it must continue elsewhere (only on the event-loop
/// thread: a fill that needs a retry with back-off, or an install refused
/// with `EAGAIN`); workers always finish their jobs.
fn resolve_counting(shared: &Core, mut job: Job, ctx: &mut Ctx) -> (Option<Job>, usize) {
    let span = job.span.clone();
    let _entered = span.enter();
    let mut bytes = 0usize;
    match resolve_steps(shared, &mut job, ctx, &mut bytes) {
        Step::Defer => (Some(job), bytes),
        Step::Done => {
            job.causes.record(&span);
            (None, bytes)
        }
    }
}

/// Whether a job is done or goes back to the event loop's caller.
enum Step {
    Done,
    Defer,
}

/// The body of [`resolve_counting`], on the job in place.
fn resolve_steps(shared: &Core, job: &mut Job, ctx: &mut Ctx, bytes: &mut usize) -> Step {
    let span = job.span.clone();
    let region = &shared.ram().regions()[job.region];
    let started = Instant::now();
    loop {
        if job.window.is_empty() {
            span.record("bytes", *bytes);
            span.record("outcome", "installed");
            return Step::Done;
        }
        let wait_until = if ctx.on_loop { Instant::now() } else { Instant::now() + shared.config().install_deadline };
        let mut range = job.window.span(region);
        let mut seq = shared.notifier().read_begin(range, Instant::now());
        if seq.is_none() && job.window.pages() > 1 {
            // An invalidation holds the window. Only the faulting page
            // waits for it: the rest goes back, woken. A thread whose fault
            // on a neighbour was deduped onto this job comes again and is
            // resolved on its own; held here, it could be the holder of a
            // reference the invalidation waits for, which would then wait
            // for its deadline with nobody to tell it why.
            shrink_to_fault(shared, job);
            if job.fault.is_none() {
                shared.release_runs(job.region, &job.window);
                job.window.clear();
            }
            if job.window.is_empty() {
                span.record("outcome", "given-back");
                return Step::Done;
            }
            range = job.window.span(region);
            seq = shared.notifier().read_begin(range, Instant::now());
        }
        if seq.is_none() {
            // An invalidation holds the window. It waits for nothing this
            // thread could hold (it drained references before it held).
            if wait_until > Instant::now() {
                let t = job.causes.now();
                seq = shared.notifier().read_begin(range, wait_until);
                Causes::since(&mut job.causes.waited, t);
            }
        }
        let Some(seq) = seq else {
            if ctx.on_loop {
                return Step::Defer;
            }
            // An invalidation overlapping this window did not end in time.
            shared.release_runs(job.region, &job.window);
            span.record("outcome", "invalidation-timeout");
            return Step::Done;
        };

        let t = job.causes.now();
        let filled = fill(shared, region, job, ctx);
        Causes::since(&mut job.causes.fill, t);
        let pieces = match filled {
            Ok(pieces) => pieces,
            Err((gpa, error)) => {
                job.attempts += 1;
                match on_fill_error(shared, region, job, ctx, gpa, error, (range, seq)) {
                    FillNext::Retry => continue,
                    FillNext::Defer => return Step::Defer,
                    FillNext::Done => return Step::Done,
                }
            }
        };

        let install_span = tracing::trace_span!(target: "apf", "apf.install", pages = field::Empty);
        let t = job.causes.now();
        let guard = shared.notifier().install_lock();
        Causes::since(&mut job.causes.lock, t);
        if guard.read_retry(range, seq) {
            drop(guard);
            shared.stats().stale.add(1);
            continue;
        }
        let t = job.causes.now();
        let result = install_pieces(shared, job.region, &pieces, job.reclaimed, bytes);
        Causes::since(&mut job.causes.install, t);
        if result.is_ok() {
            // Under the guard: an eviction of these pages that starts after
            // it stores fresh contents that must not be discarded.
            discard_restored(shared, region, &pieces);
        }
        drop(guard);
        install_span.record("pages", *bytes >> region.page_shift());
        drop(install_span);
        match result {
            Ok(()) => {
                job.window.clear();
            }
            Err(InstallError::Again(rest)) => {
                shared.stats().eagain.add(1);
                job.window = rest;
                if ctx.on_loop {
                    return Step::Defer;
                }
                if started.elapsed() > shared.config().install_deadline {
                    shared.release_runs(job.region, &job.window);
                    span.record("outcome", "eagain-timeout");
                    return Step::Done;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(InstallError::SourceFault(rest)) => {
                job.window = rest;
                job.attempts += 1;
                let gpa = region.page_gpa(job.window[0].first);
                let error = crate::source::SourceError::Io {
                    gpa,
                    len: region.page_size(),
                    source: std::io::Error::from_raw_os_error(libc::EFAULT),
                };
                match on_fill_error(shared, region, job, ctx, gpa, error, (range, seq)) {
                    FillNext::Retry => continue,
                    FillNext::Defer => return Step::Defer,
                    FillNext::Done => return Step::Done,
                }
            }
            Err(InstallError::NoMemory(rest, error)) => {
                shared.stats().no_memory.add(1);
                job.window = rest;
                job.attempts += 1;
                let faulting = job.fault.is_some_and(|f| job.window.iter().any(|r| (r.first..r.end()).contains(&f.page)));
                if faulting && job.attempts <= shared.config().fill_retries {
                    // The pool may have a page for the faulting one alone
                    // (another process may give pages back): try it a few
                    // times, never for ever.
                    shrink_to_fault(shared, job);
                    if ctx.on_loop {
                        return Step::Defer;
                    }
                    // Or the embedder may add pages now.
                    if !shared.refill() {
                        std::thread::sleep(shared.config().retry_backoff * (1 << (job.attempts - 1).min(10)));
                    }
                    continue;
                }
                let gpa = region.page_gpa(job.window[0].first);
                if shared.give_up() == GiveUp::Zeros && region.is_huge() {
                    // No POISON (another process's descriptor), and zeros
                    // of a huge page need a page as much as the contents
                    // do: the pages stay missing, and a faulting thread
                    // faults again (and is served once the pool has a
                    // page). Only a fault's own page is reported: a
                    // prefetch or a replay that met the dry pool ran ahead
                    // of need.
                    span.record("outcome", "no-memory");
                    shared.release_runs(job.region, &job.window);
                    job.window.clear();
                    if let Some(page) = job.fault.filter(|_| faulting).map(|f| region.page_gpa(f.page)) {
                        let why = Box::new(FaultError::NoMemory { gpa: page, poisoned: false, error });
                        shared.report(FaultError::LeftMissing { gpa: page, why });
                    }
                    return Step::Done;
                }
                let give_up = give_up_fault(shared, region, job, ctx, (range, seq), "no-memory", |page, poisoned| {
                    FaultError::NoMemory { gpa: page.unwrap_or(gpa), poisoned, error }
                });
                match give_up {
                    FillNext::Retry => continue,
                    FillNext::Defer => return Step::Defer,
                    FillNext::Done => return Step::Done,
                }
            }
            Err(InstallError::Fatal) => {
                span.record("outcome", "install-failed");
                return Step::Done;
            }
        }
    }
}

enum FillNext {
    Retry,
    Defer,
    Done,
}

/// Bounded retries with back-off, then poison. A multi-page window shrinks
/// to the faulting page at the first failure: prefetched pages are given
/// back (their own faults will retry them), so only what was asked for is
/// ever poisoned. `read` is the window and sequence the failed fill began
/// with: a page invalidated since (discarded, unplugged) has a new origin,
/// zeros most likely, so its failure is not the source's final word: it is
/// tried again, never poisoned on stale grounds.
#[allow(clippy::too_many_arguments)]
fn on_fill_error(
    shared: &Core,
    region: &Region,
    job: &mut Job,
    ctx: &Ctx,
    gpa: GuestAddress,
    error: crate::source::SourceError,
    read: (GuestRange, crate::notifier::Seq),
) -> FillNext {
    if job.refunds < super::MAX_REFUNDS && shared.notifier().read_retry(read.0, read.1) {
        // Not counted: the failure may be the invalidation's doing (an
        // evicted page whose stored copy a discard dropped).
        job.attempts -= 1;
        job.refunds += 1;
        shared.stats().stale.add(1);
        return if ctx.on_loop { FillNext::Defer } else { FillNext::Retry };
    }
    if job.attempts <= shared.config().fill_retries {
        shared.stats().fill_retries.add(1);
        shrink_to_fault(shared, job);
        if job.window.is_empty() {
            return FillNext::Done;
        }
        if ctx.on_loop {
            return FillNext::Defer;
        }
        let backoff = shared.config().retry_backoff * (1 << (job.attempts - 1).min(10));
        std::thread::sleep(backoff);
        return FillNext::Retry;
    }
    let attempts = job.attempts;
    give_up_fault(shared, region, job, ctx, read, "source-failed", |page, poisoned| FaultError::SourceFailed {
        gpa: page.unwrap_or(gpa),
        attempts,
        poisoned,
        error,
    })
}

/// Gives up on a job whose contents cannot be had (a source failed for
/// good, no memory to install into): the faulting page is poisoned (or,
/// without `POISON`, zero-filled), the rest given back, and the error made
/// by `error(faulting page, poisoned)` reported. A window no thread faulted
/// on (or whose faulting page is already in) is only given back. `read`
/// as in [`on_fill_error`]: a page invalidated since is tried again
/// instead.
fn give_up_fault(
    shared: &Core,
    region: &Region,
    job: &mut Job,
    ctx: &Ctx,
    read: (GuestRange, crate::notifier::Seq),
    outcome: &'static str,
    error: impl FnOnce(Option<GuestAddress>, bool) -> FaultError,
) -> FillNext {
    job.span.record("outcome", outcome);
    let fault = job.fault.filter(|f| job.window.iter().any(|r| (r.first..r.end()).contains(&f.page)));
    let Some(fault) = fault else {
        // Nobody waits on these pages: give them back unpoisoned.
        shared.release_runs(job.region, &job.window);
        job.window.clear();
        shared.report(error(None, false));
        return FillNext::Done;
    };
    shrink_to_fault(shared, job);
    // Report before poisoning: the poison wakes the faulting thread with
    // SIGBUS, and whoever handles that should find the reason already sent.
    let page_gpa = region.page_gpa(fault.page);
    let guard = shared.notifier().install_lock();
    if job.refunds < super::MAX_REFUNDS && guard.read_retry(read.0, read.1) {
        // Invalidated while it was failing: its origin may be zeros now.
        drop(guard);
        job.attempts -= 1;
        job.refunds += 1;
        return if ctx.on_loop { FillNext::Defer } else { FillNext::Retry };
    }
    // Without `POISON` the page gets zeros instead (see `GiveUp::Zeros`).
    let answer = shared.give_up();
    let zeroed = answer == GiveUp::Zeros;
    shared.report_given_up(page_gpa, zeroed, error(Some(page_gpa), !zeroed));
    let host = region.page_host(fault.page);
    // SAFETY: a page of guest RAM, which no Rust reference ever points into (see `crate::ram`).
    match unsafe { shared.give_up_on(host, region.page_size()) } {
        Ok(_) if zeroed => shared.checked(region.complete(fault.page)),
        Ok(_) => {
            shared.checked(region.poison(fault.page));
            shared.stats().poisoned.add(1);
        }
        Err(e) if e.errno == libc::EEXIST && !dry_pool(shared, region, host) => {
            shared.checked(region.complete(fault.page));
            shared.wake(host, region.page_size());
        }
        Err(e) => {
            // (A dry pool has no page for zeros either, on a descriptor
            // without POISON: the page stays missing and its thread faults
            // again; the report above said why.)
            drop(guard);
            shared.release_runs(job.region, &job.window);
            shared.report(FaultError::Install { gpa: page_gpa, error: e });
            job.window.clear();
            return FillNext::Done;
        }
    }
    drop(guard);
    job.window.clear();
    FillNext::Done
}

/// Keeps only the faulting page claimed; releases (and wakes) the rest.
fn shrink_to_fault(shared: &Core, job: &mut Job) {
    let Some(fault) = job.fault else { return };
    let mut others = Vec::new();
    let mut keep = false;
    for &Run { first, count } in job.window.iter() {
        if (first..first + count).contains(&fault.page) {
            keep = true;
            if fault.page > first {
                others.push(Run { first, count: fault.page - first });
            }
            if first + count > fault.page + 1 {
                others.push(Run { first: fault.page + 1, count: first + count - fault.page - 1 });
            }
        } else {
            others.push(Run { first, count });
        }
    }
    if !others.is_empty() {
        shared.release_runs(job.region, &others);
    }
    job.window = if keep { Window::one(fault.page) } else { Window::default() };
}

/// Fills the window into pieces of one origin each. Resident source pages
/// are not copied; other pages go into `ctx.buf`.
fn fill(
    shared: &Core,
    region: &Region,
    job: &Job,
    ctx: &mut Ctx,
) -> Result<Vec<Piece>, (GuestAddress, crate::source::SourceError)> {
    let zero_source = shared.source().kind() == crate::source::SourceKind::Zero;
    // A zero source fills nothing worth a span (its pages are installed
    // from a zero buffer, or with ZEROPAGE).
    let _span = (!zero_source).then(|| tracing::trace_span!(target: "apf", "apf.fill").entered());
    let write = job.writes;
    let kind = shared.ram().kind();
    let mut pieces = Vec::with_capacity(job.window.len());
    let mut buf_off = 0;
    let total: usize = job.window.pages();
    if ctx.buf.len() < region.pages_len(total) {
        ctx.buf.resize(region.pages_len(total), 0);
    }
    // Huge pages have no ZEROPAGE: they copy zeros.
    let zero = if write || region.is_huge() { Src::Copy(shared.zeros().as_ptr()) } else { Src::ZeroPage };
    for &Run { first, count } in job.window.iter() {
        let mut p = first;
        while p < first + count {
            let origin = region.claimed_origin(p);
            let mut end = p + 1;
            while end < first + count && region.claimed_origin(end) == origin {
                end += 1;
            }
            let n = end - p;
            let gpa = region.page_gpa(p);
            let len = region.pages_len(n);
            let is_zero = origin == Origin::Zero || (origin == Origin::Source && zero_source);
            // (An evicted image page comes from the store, never the image.)
            let image_read = kind.is_image() && !write && origin == Origin::Source;
            if origin != Origin::Unplugged && (is_zero || image_read) {
                // File-backed pages: what the page cache holds decides (for
                // a loaded image, known from loading).
                let runs = if image_read { shared.ram().image_runs(job.region, p, n) } else { None };
                if let Some(runs) = runs.or_else(|| file_runs(shared, job.region, p, n)) {
                    for (a, b, data) in runs {
                        let src = match (data, kind) {
                            // Shared memory keeps a discarded page's
                            // contents unless a hole was punched: the page
                            // cache has it, so it is present.
                            (true, MemoryKind::SharedMemfd) => Src::Cached,
                            // The image's own page, mapped in place
                            // (unless a discard made it zeros).
                            (true, _) if !is_zero => Src::Continue,
                            _ => zero,
                        };
                        push_piece(&mut pieces, Piece { first: a, count: b - a, src }, shared.zeros(), region);
                    }
                    p = end;
                    continue;
                }
            }
            let src = if origin == Origin::Unplugged {
                Src::Poison
            } else if is_zero {
                zero
            } else if let Some(resident) = (origin == Origin::Source && job.attempts == 0)
                .then(|| shared.source().resident(gpa, len))
                .flatten()
                .filter(|&p| in_memory(p, len, &mut ctx.residency))
            {
                // After a failure, go through `fill`, whose errors say why.
                populate_source(resident, len);
                Src::Copy(resident)
            } else {
                let dst = &mut ctx.buf[buf_off..buf_off + len];
                let res = match origin {
                    Origin::Store => shared.store().fill(gpa, dst),
                    _ => shared.source().fill(gpa, dst),
                };
                res.map_err(|e| (gpa, e))?;
                let src = Src::Copy(dst.as_ptr());
                buf_off += len;
                src
            };
            push_piece(&mut pieces, Piece { first: p, count: n, src }, shared.zeros(), region);
            p = end;
        }
    }
    Ok(pieces)
}

/// Adds `piece`, cut into pieces no longer than the zero buffer when its
/// source is that buffer: a copy of zeros reads as many bytes as it
/// installs, and a window (a huge image's block of 16 MiB, say) may be
/// longer than the buffer.
fn push_piece(pieces: &mut Vec<Piece>, piece: Piece, zeros: &[u8], region: &Region) {
    let per = (zeros.len() / region.page_size()).max(1);
    match piece.src {
        Src::Copy(src) if src == zeros.as_ptr() => {
            let mut first = piece.first;
            let end = piece.first + piece.count;
            while first < end {
                let count = per.min(end - first);
                pieces.push(Piece { first, count, src: piece.src });
                first += count;
            }
        }
        _ => pieces.push(piece),
    }
}

/// The runs of pages `[first, first + count)` of a file-backed region that
/// the page cache holds (`true`) or not; `None` for anonymous memory, or
/// when the kernel cannot say (the pieces are then installed as if every
/// page were a hole or, for the image, data: `CONTINUE` meeting a hole
/// answers `EFAULT`, which installs zeros).
fn file_runs(shared: &Core, region: usize, first: usize, count: usize) -> Option<Vec<(usize, usize, bool)>> {
    match shared.ram().file_runs(region, first, count)? {
        Ok(runs) => Some(runs),
        Err(e) => {
            tracing::warn!(target: "apf", error = %e, "mincore on guest RAM failed");
            None
        }
    }
}

/// Drops pages restored from the eviction store from it.
fn discard_restored(shared: &Core, region: &Region, pieces: &[Piece]) {
    if shared.store().is_empty() {
        return;
    }
    for piece in pieces {
        if region.claimed_origin(piece.first) == Origin::Store {
            shared.store().discard(region.page_gpa(piece.first), region.pages_len(piece.count));
        }
    }
}

/// Installs the pieces in order. Pages are marked `Present` as the kernel
/// confirms them.
/// A page found present (`EEXIST`) counts as installed, unless it was
/// claimed from `Missing` with origin `Zero` (and not `reclaimed`): see
/// there.
fn install_pieces(
    shared: &Core,
    region_idx: usize,
    pieces: &[Piece],
    reclaimed: bool,
    bytes: &mut usize,
) -> Result<(), InstallError> {
    let region = &shared.ram().regions()[region_idx];
    let stats = shared.stats();
    let (shift, page_size) = (region.page_shift(), region.page_size());
    for (i, piece) in pieces.iter().enumerate() {
        let mut off = 0;
        while off < piece.count {
            let page = piece.first + off;
            let dst = region.page_host(page);
            let len = (piece.count - off) << shift;
            // The destination is pages of one guest RAM region, which no Rust
            // reference ever points into (see `crate::ram`).
            let res = match piece.src {
                // SAFETY: see above; `src` is the piece's filled buffer, which
                // holds `piece.count` pages, of which `off` are done.
                Src::Copy(src) => unsafe { shared.mem().copy(dst, src.wrapping_add(off << shift), len, false) },
                // SAFETY: see above.
                Src::ZeroPage => unsafe { shared.mem().zeropage(dst, len, false) },
                // SAFETY: see above.
                Src::Poison => unsafe { shared.mem().poison(dst, len) },
                // SAFETY: see above.
                Src::Continue => unsafe { shared.mem().continue_pages(dst, len, false) },
                Src::Cached => {
                    shared.wake(dst, len);
                    Ok(len)
                }
            };
            let (done, err) = match res {
                Ok(n) => (n.min(len) >> shift, None),
                Err(e) => (e.done >> shift, Some(e)),
            };
            for p in page..page + done {
                if matches!(piece.src, Src::Poison) {
                    shared.checked(region.complete_unplugged(p));
                } else {
                    shared.checked(region.complete(p));
                }
            }
            if done > 0 && matches!(piece.src, Src::Cached) {
                stats.cached.add(done as u64);
            } else if done > 0 {
                stats.windows.add(u64::from(off == 0));
                stats.pages_installed.add(done as u64);
                stats.bytes_installed.add((done << shift) as u64);
                if matches!(piece.src, Src::ZeroPage) {
                    stats.zero_pages.add(done as u64);
                }
                if matches!(piece.src, Src::Continue) {
                    stats.continued.add(done as u64);
                }
                *bytes += done << shift;
            }
            off += done;
            let Some(e) = err else { continue };
            if done > 0 {
                // Partial progress: try again from where it stopped to learn
                // why (EEXIST on the next page, or EAGAIN).
                continue;
            }
            // An answer nothing here can act on: the rest is given back
            // (and its waiters woken), the error reported.
            let fatal = |error: crate::uffd::IoctlError| {
                shared.release_runs(region_idx, &remaining(pieces, i, off));
                shared.report(FaultError::Install { gpa: region.page_gpa(page), error });
                InstallError::Fatal
            };
            match e.errno {
                libc::EEXIST if dry_pool(shared, region, dst) => {
                    return Err(InstallError::NoMemory(remaining(pieces, i, off), e));
                }
                libc::EEXIST if shared.ram().kind() == MemoryKind::SharedHugetlb => {
                    // The page cache may hold the page (a discard that kept
                    // it, a write through another mapping): map it. If it
                    // does not, the pool had no page for the COPY.
                    // SAFETY: the destination as above.
                    match unsafe { shared.mem().continue_pages(dst, page_size, false) } {
                        Ok(_) => {
                            shared.checked(region.complete(page));
                            stats.cached.add(1);
                        }
                        Err(c) if c.errno == libc::EEXIST => {
                            // Mapped already.
                            shared.checked(region.complete(page));
                            shared.wake(dst, page_size);
                        }
                        Err(c) if c.errno == libc::EAGAIN => {
                            return Err(InstallError::Again(remaining(pieces, i, off)));
                        }
                        Err(c) if c.errno == libc::EFAULT => {
                            return Err(InstallError::NoMemory(remaining(pieces, i, off), e));
                        }
                        Err(c) => return Err(fatal(c)),
                    }
                    off += 1;
                }
                libc::EEXIST => {
                    stats.eexist.add(1);
                    // On shared memory the page cache is the truth: a page
                    // there is the page's (a discard that kept it, or one
                    // whose hole punch is still to come, after which its
                    // next fault gets zeros).
                    let cache_is_truth = shared.ram().kind().page_cache_is_truth();
                    if !reclaimed && region.claimed_origin(page) == Origin::Zero && !cache_is_truth {
                        // A page a remove made missing that the kernel
                        // still holds: its `madvise` zaps only after the
                        // remove event is read, and it has not yet. Those
                        // contents are on their way out, not the page's:
                        // it stays `Missing`, so that nothing (an offline
                        // above all) takes them for the page's own, and
                        // its next fault, after the zap, gets zeros. (A
                        // reclaimed page was `Present`: what the kernel
                        // holds there is the engine's own install.)
                        shared.checked(region.release(page));
                    } else {
                        // Present already: installed behind our back.
                        shared.checked(region.complete(page));
                    }
                    // Nobody else will wake its waiters.
                    shared.wake(dst, page_size);
                    off += 1;
                }
                libc::EAGAIN => return Err(InstallError::Again(remaining(pieces, i, off))),
                libc::EFAULT if matches!(piece.src, Src::Continue) => {
                    // A hole in the image: it reads as zeros (copied on huge
                    // pages, which have no ZEROPAGE).
                    let res = if region.is_huge() {
                        // SAFETY: the destination as above; the zero buffer
                        // holds a page of `page_size` bytes.
                        unsafe { shared.mem().copy(dst, shared.zeros().as_ptr(), page_size, false) }
                    } else {
                        // SAFETY: the destination as above.
                        unsafe { shared.mem().zeropage(dst, page_size, false) }
                    };
                    match res {
                        Ok(_) => {
                            shared.checked(region.complete(page));
                            stats.zero_pages.add(1);
                        }
                        Err(z) if z.errno == libc::EEXIST => {
                            shared.checked(region.complete(page));
                            shared.wake(dst, page_size);
                        }
                        Err(z) if z.errno == libc::EAGAIN => {
                            return Err(InstallError::Again(remaining(pieces, i, off)));
                        }
                        Err(z) => return Err(fatal(z)),
                    }
                    off += 1;
                }
                libc::EFAULT if matches!(piece.src, Src::Copy(_)) => {
                    return Err(InstallError::SourceFault(remaining(pieces, i, off)));
                }
                libc::ENOMEM if matches!(piece.src, Src::Copy(_)) => {
                    return Err(InstallError::NoMemory(remaining(pieces, i, off), e));
                }
                _ => return Err(fatal(e)),
            }
        }
    }
    Ok(())
}

/// Whether an `EEXIST` from a `COPY` onto the private huge page at `dst`
/// means that the pool had no page for it: the kernel answers so (not
/// `ENOMEM`) when the allocation fails once the page table exists, with
/// nothing mapped. A page really there is mapped in this private mapping,
/// which `mincore` sees (on hugetlb it reads the page table; a poison
/// marker counts as nothing).
fn dry_pool(shared: &Core, region: &Region, dst: u64) -> bool {
    // (Shared huge pages ask the page cache instead: see `install_pieces`.)
    if !matches!(shared.ram().kind(), MemoryKind::PrivateHugetlb | MemoryKind::HugetlbImage) {
        return false;
    }
    if shared.ram().is_remote() {
        // Another process's memory: its own page map says.
        return shared.ram().remote_owner().is_some_and(|pid| owner_lacks(pid, dst));
    }
    let mut answers = Vec::new();
    !in_memory(dst as *const u8, region.page_size(), &mut answers)
}

/// Whether process `pid` has nothing mapped at `addr`, by its page map
/// (present or swapped); false if it cannot be read (the process is gone,
/// or may not be traced): then the kernel's `EEXIST` is believed.
fn owner_lacks(pid: u32, addr: u64) -> bool {
    use std::os::unix::fs::FileExt;
    const PM_PRESENT: u64 = 1 << 63;
    const PM_SWAP: u64 = 1 << 62;
    static WARNED: std::sync::Once = std::sync::Once::new();
    let map = match std::fs::File::open(format!("/proc/{pid}/pagemap")) {
        Ok(map) => map,
        Err(e) => {
            WARNED.call_once(|| {
                tracing::warn!(target: "apf", pid, error = %e, "cannot read the page map of the memory's owner: a COPY that meets a dry huge-page pool (EEXIST, nothing mapped) is taken for a page that is there");
            });
            return false;
        }
    };
    let mut entry = [0u8; 8];
    match map.read_exact_at(&mut entry, addr / PAGE_SIZE as u64 * 8) {
        Ok(()) => u64::from_ne_bytes(entry) & (PM_PRESENT | PM_SWAP) == 0,
        Err(_) => false,
    }
}

/// The still-claimed runs from piece `i`, page offset `off`, onward.
fn remaining(pieces: &[Piece], i: usize, off: usize) -> Window {
    let mut rest = vec![Run { first: pieces[i].first + off, count: pieces[i].count - off }];
    rest.extend(pieces[i + 1..].iter().map(|p| Run { first: p.first, count: p.count }));
    rest.retain(|r| r.count > 0);
    Window::from(rest)
}

/// How a background fill (a working-set replay) gives way to demand.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pace {
    /// Largest window, in pages: a fault waits behind at most one.
    pub window: usize,
    /// Share of one CPU the fill may use, in (0, 1].
    pub cpu_share: f64,
}

/// The longest a background fill waits for pending demand to be served
/// before one window: it makes progress however busy the guest is.
const MOST_YIELD: Duration = Duration::from_millis(5);

/// How often a background fill looks again at pending demand while it
/// waits for it.
const DEMAND_POLL: Duration = Duration::from_micros(10);

/// The busy time over which a background fill's CPU share is kept: it
/// sleeps once per quantum, not once per window. A window takes a few
/// microseconds, far below what a sleep can be asked for (a sleep of 4 µs
/// lasts 50 µs or more with the default timer slack), so a sleep per
/// window held a fill to a small part of its share.
const SHARE_QUANTUM: Duration = Duration::from_millis(1);

/// Pages of the set in a row a replay finds already taken (demand got
/// there first) before it takes itself to be behind the guest.
const OVERTAKEN_PAGES: usize = 4;

/// How far ahead in the set a replay overtaken by demand goes on: the
/// pages it passes over are gone over once more at the end.
const LEAP_PAGES: usize = 256;

/// Claims and installs pages in windows of contiguous pages on the calling
/// thread, paced or not (see [`prefetch_pages`]).
struct Filler<'a> {
    shared: &'a Core,
    ctx: Ctx,
    pace: Option<Pace>,
    /// Largest window, in pages.
    max: usize,
    /// The window being gathered: region, first page, pages.
    run: Option<(usize, usize, usize)>,
    /// Busy time since the last sleep for the CPU share.
    busy: Duration,
    installed: u64,
}

impl<'a> Filler<'a> {
    fn new(shared: &'a Core, pace: Option<Pace>) -> Self {
        let max_window = shared.config().max_window;
        Filler {
            shared,
            ctx: Ctx::new(false, max_window),
            pace,
            max: pace.map_or(max_window, |p| p.window.clamp(1, max_window)),
            run: None,
            busy: Duration::ZERO,
            installed: 0,
        }
    }

    /// Offers page `page` of region `region`: claims it into the window
    /// being gathered when it extends it, or installs that window and
    /// starts the next, giving way to demand first when paced. Returns
    /// false when the page was not missing (taken by someone else: it is
    /// left alone).
    fn offer(&mut self, region: usize, page: usize) -> bool {
        let r = &self.shared.ram().regions()[region];
        // Huge-page regions take windows of a few huge pages.
        let max = self.max.min(self.shared.window_cap(region));
        let extends = matches!(self.run, Some((rr, first, count)) if rr == region && first + count == page && count < max);
        if !extends {
            self.flush();
            if self.pace.is_some() {
                give_way(self.shared);
            }
        }
        if r.try_claim(page).is_none() {
            self.flush();
            return false;
        }
        match &mut self.run {
            Some((_, _, count)) => *count += 1,
            None => self.run = Some((region, page, 1)),
        }
        true
    }

    /// Installs the window gathered, if any, then sleeps for the CPU share
    /// once a quantum of busy time is used.
    fn flush(&mut self) {
        let Some((region, first, count)) = self.run.take() else { return };
        let started = Instant::now();
        let span = tracing::trace_span!(target: "apf", "apf.prefetch", pages = count, bytes = field::Empty, outcome = field::Empty);
        let job = Job::new(region, None, Window::from(vec![Run { first, count }]), span, false);
        let (left, bytes) = resolve_guarded_counting(self.shared, job, &mut self.ctx);
        debug_assert!(left.is_none(), "off the event loop, jobs finish");
        if let Some(job) = left {
            self.shared.release_runs(job.region, &job.window);
        }
        self.installed += (bytes >> self.shared.ram().regions()[region].page_shift()) as u64;
        if let Some(pace) = self.pace {
            self.busy += started.elapsed();
            let share = pace.cpu_share.clamp(0.01, 1.0);
            if share < 1.0 && self.busy >= SHARE_QUANTUM {
                std::thread::sleep(self.busy.mul_f64((1.0 - share) / share));
                self.busy = Duration::ZERO;
            }
        }
    }
}

/// Installs still-missing pages from `locs` (region, page) in windows of
/// contiguous pages, on the calling thread. Returns the pages installed by
/// this call. With a `pace`, windows are at most `pace.window` pages,
/// each waits (up to [`MOST_YIELD`]) while demand is pending (a fault read
/// and not yet served, or one not yet read), and the thread sleeps once
/// per [`SHARE_QUANTUM`] of busy time so that it uses at most
/// `pace.cpu_share` of a CPU.
pub(crate) fn prefetch_pages(shared: &Core, locs: impl Iterator<Item = (usize, usize)>, pace: Option<Pace>) -> u64 {
    let mut filler = Filler::new(shared, pace);
    for (region, page) in locs {
        if shared.running().is_err() {
            break;
        }
        filler.offer(region, page);
    }
    filler.flush();
    filler.installed
}

/// Installs the still-missing pages of a working set, `locs` (region,
/// page) in the order to replay them, paced like [`prefetch_pages`]. A
/// replay that finds [`OVERTAKEN_PAGES`] of the set in a row
/// already taken is behind the guest, which faults on the very pages it
/// is about to install: it goes on [`LEAP_PAGES`] further, ahead of the
/// guest, and goes over the pages it passed once more at the end.
/// Returns the pages installed.
pub(crate) fn replay_pages(shared: &Core, locs: &[(usize, usize)], pace: Pace) -> u64 {
    let mut filler = Filler::new(shared, Some(pace));
    let mut passed = Vec::new();
    let (mut i, mut taken) = (0, 0);
    while i < locs.len() && shared.running().is_ok() {
        let (region, page) = locs[i];
        i += 1;
        if filler.offer(region, page) {
            taken = 0;
            continue;
        }
        taken += 1;
        if taken >= OVERTAKEN_PAGES {
            let to = (i + LEAP_PAGES).min(locs.len());
            passed.extend_from_slice(&locs[i..to]);
            i = to;
            taken = 0;
        }
    }
    for &(region, page) in &passed {
        if shared.running().is_err() {
            break;
        }
        filler.offer(region, page);
    }
    filler.flush();
    filler.installed
}

/// Whether demand is pending: a fault read and not yet served (a job of
/// the fault path in flight; fills like this one do not count), or one
/// waiting to be read.
fn demand_pending(shared: &Core) -> bool {
    shared.jobs_in_flight() > 0 || shared.uffd().readable()
}

/// Waits, up to [`MOST_YIELD`], while demand is pending. Called with
/// nothing claimed: a fault never waits for a window that is not there.
fn give_way(shared: &Core) {
    let until = Instant::now() + MOST_YIELD;
    while demand_pending(shared) && Instant::now() < until {
        std::thread::sleep(DEMAND_POLL);
    }
}
