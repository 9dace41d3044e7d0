//! The guest/VMM protocol of apf's agent device, and the guest memory layout
//! both sides agree on. `no_std`, no `unsafe`, no dependencies: the guest
//! agent and the VMM compile this same crate.
//!
//! A vCPU talks to the VMM through its mailbox, one page of guest RAM: it
//! writes a [`Request`] at the start of the page and does a 32-bit `out` of
//! the page's frame number to [`AGENT_PORT`]. The VMM copies the request
//! out, acts, and writes a [`Reply`] at [`REPLY_OFFSET`] of the same page
//! before the `out` returns. Every message starts with a [`Header`]: magic,
//! version, kind, sequence number and body length. Anything the VMM cannot
//! decode gets [`Reply::Error`] with an [`ErrorCode`]; nothing a guest
//! writes can make the VMM touch memory outside guest RAM.
//!
//! ```
//! use agent_proto::{Reply, Request};
//! let mut page = [0u8; 256];
//! let n = Request::Hello { vcpu: 1 }.encode(7, &mut page).unwrap();
//! let (seq, req) = Request::decode(&page[..n]).unwrap();
//! assert_eq!((seq, req), (7, Request::Hello { vcpu: 1 }));
//! let n = Reply::Ack { stop: false, value: 3 }.encode(seq, &mut page).unwrap();
//! assert_eq!(Reply::decode(&page[..n]).unwrap(), (7, Reply::Ack { stop: false, value: 3 }));
//! ```
#![no_std]

mod layout;
mod stamp;
pub mod timing;
mod wire;

pub use layout::*;
pub use stamp::*;
pub use wire::*;
