#![no_main]
//! Fuzz target: see `checks/mailbox.rs` for the input and the properties.

#[path = "../checks/mailbox.rs"]
mod checks;

use std::sync::{Arc, OnceLock};

static RAM: OnceLock<Arc<apf::GuestRam>> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(RAM.get_or_init(checks::guest_ram), data));
