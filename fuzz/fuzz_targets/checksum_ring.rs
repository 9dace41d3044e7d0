#![no_main]
//! Fuzz target: see `checks/checksum_ring.rs` for the input and the properties.

#[path = "../checks/checksum_ring.rs"]
mod checks;

use std::sync::OnceLock;

static RING: OnceLock<checks::Ring> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(RING.get_or_init(checks::Ring::start), data));
