#![no_main]
//! Fuzz target: see `checks/snapshot_header.rs` for the input and the properties.

#[path = "../checks/snapshot_header.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
