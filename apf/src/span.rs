//! The names of the `tracing` spans the engine emits (target `apf`).
//!
//! With the `lab` feature, `LatencyLayer` (a `tracing-subscriber` layer)
//! turns them into latency histograms, per-vCPU blocked time, a plot and a
//! Perfetto trace.
//!
//! Any subscriber works: the engine only emits spans (target `apf`). Its
//! threads (event loop, workers, replays) report to the dispatcher that was
//! current on the thread that started the engine, so a scoped subscriber
//! (`tracing::dispatcher::with_default`) sees them as well as a global one.
//!
//! # Spans
//!
//! This list is the reference; its names and fields are stable.
//!
//! | span | level | fields | covers |
//! |---|---|---|---|
//! | `apf.fault` | INFO | `gpa`, `tid`, `kind`, `source`, `bytes`, `outcome`, and where a slow fault's time went: `deferred_ns`, `queued_ns`, `waited_ns`, `lock_ns`, `fill_ns`, `install_ns` | one fault, from the moment the engine read it from the userfaultfd to the wake |
//! | `apf.fill` | TRACE | | filling a window's buffer from its source (not emitted for a zero source, which has nothing to fill) |
//! | `apf.install` | TRACE | `pages` | the install ioctls of one window, under the install lock |
//! | `apf.prefetch` | TRACE | `pages`, `bytes`, `outcome` | a window no thread waits on yet: the rest of a fault's window after its head, working-set replay, [`crate::Engine::prefetch`] |
//! | `apf.invalidate` | DEBUG | `region`, `gpa`, `len`, `reason` | a remove event (`MADV_DONTNEED` by someone else) |
//! | `apf.pin` | INFO | `gpa`, `len`, `outcome` | a [`crate::Pin::get`] that faults its range in again (first use or after an invalidation); an armed pin's `get` emits nothing |
//! | `apf.offline` | INFO | `gpa`, `len`, `mode`, `pins`, `pages`, `outcome` | one [`crate::Engine::offline`], from its start to the end of its invalidation |
//!
//! Fields:
//! - `gpa`, `len`: the guest range (bytes).
//! - `tid`: the thread that faulted, as userfaultfd reports it (the kernel
//!   thread id). `LatencyLayer::register_vcpu` (feature `lab`) maps
//!   it to a vCPU.
//! - `kind`: `read` or `write`.
//! - `source`: the page source's name (`zero`, `snapshot`, `evicted`...).
//! - `bytes`: bytes installed by the window that resolved the fault.
//! - `mode`: `migrate`, `evict`, `unplug` or `host-block`.
//! - `pins`: pin callbacks the offline called. `pages`: pages it took out.
//! - `reason` (invalidate): `remove`.
//! - `deferred_ns` .. `install_ns` (fault): nanoseconds the fault spent
//!   deferred behind an offline that held its page, its job queued for a
//!   worker, its resolver waiting for an invalidation over its window,
//!   waiting for the install lock, filling, and in the install ioctls.
//!   `deferred_ns` is recorded whenever a fault was deferred; the others
//!   only for faults that took at least 50 µs (each recorded field costs the
//!   subscriber a span lookup). `LatencyLayer` adds them up over the slowest
//!   faults (`LatencySummary::tail`).
//! - `outcome`, for `apf.fault`: `installed`, `deduped` (another resolver
//!   had the page; the span closes at once, so its length is not the
//!   wait), `woken` (an offline held the page and put it back: the span
//!   stays open while the fault waits for the offline), `poisoned`,
//!   `source-failed`, `install-failed`, `retry`, `eagain-timeout` or
//!   `invalidation-timeout`; for `apf.pin`: `armed`, `timeout`, `poisoned`
//!   or `error`; for `apf.offline`: `done`, `busy` or `error`.
//!
//! Time the kernel spent before the engine read a fault is not inside
//! `apf.fault`: a fault's span is a lower bound of what the faulting
//! thread waited.

/// Span name: one fault.
pub const FAULT: &str = "apf.fault";
/// Span name: filling a window.
pub const FILL: &str = "apf.fill";
/// Span name: installing a window.
pub const INSTALL: &str = "apf.install";
/// Span name: a prefetch-only window.
pub const PREFETCH: &str = "apf.prefetch";
/// Span name: a remove event's invalidation.
pub const INVALIDATE: &str = "apf.invalidate";
/// Span name: a pin faulting its range in again.
pub const PIN: &str = "apf.pin";
/// Span name: an offline.
pub const OFFLINE: &str = "apf.offline";

/// Every span name, in the order reports list them.
pub const SPANS: [&str; 7] = [FAULT, FILL, INSTALL, PREFETCH, INVALIDATE, PIN, OFFLINE];
