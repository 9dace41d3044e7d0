#![no_main]
//! Fuzz target: see `checks/handshake.rs` for the input and the properties.

#[path = "../checks/handshake.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
