//! An external page-fault handler for Firecracker snapshot restores, on
//! the apf engine.
//!
//! Firecracker restores guest memory through a handler process when its
//! memory backend is `Uffd`: it connects to the handler's socket, sends
//! the regions of guest memory as JSON with its userfaultfd attached, and
//! from then on every first touch of a page waits for the handler to
//! install it. This crate is such a handler: each connection is a VM with
//! its own [`apf::Engine`] over the adopted descriptor
//! ([`apf::RemoteMemory`]), with the engine's prefetch (streams found by
//! address, since Firecracker's descriptor has no thread ids),
//! fault-around, workers, remove events and latency tracing, and a report
//! per VM when it ends.
//!
//! With `--supervise`, a parent process owns the socket and every VM's
//! descriptors and runs the serving in a worker child it restarts if it
//! dies; removes survive the restart in a bitmap the parent owns (see
//! [`supervise`]).
//!
//! | module | what |
//! |---|---|
//! | [`handshake`] | the handshake message, parsed and checked (pure; fuzzed) |
//! | [`peer`] | the connection's message and descriptors, the peer's pidfd, ending it |
//! | [`server`] | the socket, the VMs, bad peers, failing sources |
//! | [`report`] | per-VM reports and the served-fault timeline |
//! | [`supervise`] | supervisor mode: a parent keeps every VM's descriptors and restarts a worker that dies |
//! | [`cli`] | the command lines of the handler and the client |
//! | [`client`] | a client that does what Firecracker does, for tests and benchmarks |
//! | [`one_page`] | a one-page-per-fault handler of the same protocol, to compare with |

pub mod cli;
pub mod client;
pub mod handshake;
pub mod log;
pub mod one_page;
pub mod peer;
pub mod report;
pub mod server;
pub mod supervise;

pub use server::{Crash, OnLost, Options, Server, ServerError};
