//! What must hold for any bytes given to the working-set decoder
//! ([`apf::WorkingSet::decode`], what a restore runs on the file beside its
//! snapshot). Shared by the `working_set` fuzz target and apf's replay
//! test.
//!
//! Input: the file's bytes.

use apf::{WorkingSet, PAGE_SIZE};

/// Decodes `input`; panics if a property fails.
pub fn check(input: &[u8]) {
    let (set, image) = match WorkingSet::decode(input) {
        Ok(decoded) => decoded,
        Err(e) => {
            // Every refusal explains itself.
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    // What was accepted is a set a replay can trust to stay in bounds.
    assert_eq!(set.pages.len(), set.at_ms.len());
    assert!(set.pages.len() as u64 <= image.size / PAGE_SIZE as u64);
    let mut seen = std::collections::HashSet::new();
    for &gpa in &set.pages {
        assert_eq!(gpa % PAGE_SIZE as u64, 0, "an unaligned page was accepted");
        assert!(gpa < image.size, "a page past the image was accepted");
        assert!(seen.insert(gpa), "a page was accepted twice");
    }
    // It encodes back to the same bytes, and refuses any other image.
    assert_eq!(set.encode(image), input, "an accepted file does not re-encode to itself");
    let other = apf::ImageId { fingerprint: image.fingerprint ^ 1, ..image };
    assert!(WorkingSet::decode_for(input, other).is_err());
}
