//! The fault path: reads userfaultfd events, dedupes them, plans prefetch
//! windows, and dispatches claimed windows to be resolved (on the event
//! loop or the worker pool, through `core::resolve`).
//!
//! ```text
//!  faulting threads ──fault──▶ userfaultfd ──read (batch)──▶ event loop
//!                                                       │ claim Missing pages
//!                                   cheap source: inline │ slow source / retry
//!                                                       ▼        ▼ try_send (bounded)
//!                                               resolve ◀── worker pool
//!                         fill ─▶ check seq under install lock ─▶ COPY / ZEROPAGE (wakes)
//! ```
//!
//! Module map: [`prefetch`] plans windows per thread;
//! `event_loop` is the `event-manager` subscriber.

mod event_loop;
pub mod prefetch;

use std::io;

pub(crate) use event_loop::{serve_after_shutdown, spawn};

/// Why the event loop could not be started.
#[derive(Debug)]
pub(crate) enum SpawnError {
    /// The event manager could not be created.
    EventManager(event_manager::Error),
    /// An eventfd or the thread could not be created.
    Io(io::Error),
}
