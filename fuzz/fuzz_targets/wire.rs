#![no_main]
//! Fuzz target: see `checks/wire.rs` for the input and the properties.

#[path = "../checks/wire.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
