#![no_main]
//! Fuzz target: see `checks/working_set.rs` for the input and the properties.

#[path = "../checks/working_set.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
