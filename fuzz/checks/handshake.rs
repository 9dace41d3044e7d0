//! What must hold for any bytes a peer sends the page-fault handler as
//! its handshake ([`apf_handler::handshake::parse`]). Shared by the
//! `handshake` fuzz target and the handler's replay test.
//!
//! Input: the memory file's length (u64, little-endian), then the message.

use apf_handler::handshake::{encode, incomplete, parse, MAX_MESSAGE, MAX_REGIONS, PAGE_SIZES};

/// Parses `input`; panics if a property fails.
pub fn check(input: &[u8]) {
    let Some((len, msg)) = input.split_first_chunk::<8>() else {
        return;
    };
    let file_len = u64::from_le_bytes(*len);
    let cut_short = incomplete(msg);
    let regions = match parse(msg, file_len) {
        Ok(r) => r,
        Err(e) => {
            // Every refusal explains itself.
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert!(!cut_short, "a message that parses is not incomplete");
    assert!(msg.len() <= MAX_MESSAGE && !regions.is_empty() && regions.len() <= MAX_REGIONS);
    for (i, r) in regions.iter().enumerate() {
        assert!(PAGE_SIZES.contains(&r.page_size), "{r:?}");
        assert!(r.size > 0 && (r.base_host_virt_addr | r.size | r.offset) % r.page_size == 0, "{r:?}");
        assert!(r.offset.checked_add(r.size).is_some_and(|end| end <= file_len), "{r:?} outside {file_len}");
        assert!(r.base_host_virt_addr.checked_add(r.size).is_some(), "{r:?}");
        for s in &regions[i + 1..] {
            let apart = |a: u64, al: u64, b: u64, bl: u64| a + al <= b || b + bl <= a;
            assert!(apart(r.base_host_virt_addr, r.size, s.base_host_virt_addr, s.size), "{r:?} {s:?}");
            assert!(apart(r.offset, r.size, s.offset, s.size), "{r:?} {s:?}");
        }
    }
    // What was accepted is what was sent: the regions encode as
    // Firecracker would and parse back the same.
    assert_eq!(parse(encode(&regions).as_bytes(), file_len).as_ref(), Ok(&regions));
}
