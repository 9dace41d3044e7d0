//! The `tracing` spans the engine emits (target `apf`).
//!
//! | span | level | fields | covers |
//! |---|---|---|---|
//! | `apf.fault` | INFO | `gpa`, `tid` (faulting thread), `kind` (`read`/`write`), `source`, `bytes`, `outcome` | one fault, from the moment the engine read it to the wake (the install that resolves it, or the dedupe decision) |
//! | `apf.fill` | TRACE | | filling a window's buffer from its source |
//! | `apf.install` | TRACE | `pages` | the install ioctls of a window, under the install lock |
//! | `apf.prefetch` | TRACE | `pages`, `bytes`, `outcome` | a prefetch-only window (working-set replay, [`crate::Engine::prefetch`]) |
//! | `apf.invalidate` | DEBUG | `region`, `gpa`, `len`, `reason` | a remove event (`MADV_DONTNEED` by someone else) |
//! | `apf.offline` | INFO | `gpa`, `len`, `mode`, `pins` (callbacks called), `pages` (taken out), `outcome` (`done`, `busy`, `error`) | one [`crate::Engine::offline`], from its start to the end of its invalidation |
//!
//! A fault's `outcome` is one of `installed`, `deduped` (another resolver had
//! the page), `woken` (an offline held the page and put it back: the span
//! stays open while the fault waits for the offline, so its length is the
//! real wait), `poisoned`,
//! `source-failed`, `install-failed`, `retry`, `eagain-timeout` or
//! `invalidation-timeout`. Time the kernel spent before
//! the engine read the fault is not inside the span.

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
/// Span name: an offline.
pub const OFFLINE: &str = "apf.offline";
