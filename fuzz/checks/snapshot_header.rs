//! What must hold for any bytes given to the snapshot decoder
//! ([`vmm::snapshot::decode`], what a restore runs on the file it is
//! given). Shared by the `snapshot_header` fuzz target and the VMM's
//! replay test.
//!
//! Input: the file's length (u64, little-endian), then its first bytes;
//! the rest of the file reads as missing.

use agent_proto::Layout;
use vmm::snapshot::{decode_prefix, Header};

/// Decodes `input`; panics if a property fails.
pub fn check(input: &[u8]) {
    let Some((len, prefix)) = input.split_first_chunk::<8>() else {
        return;
    };
    let len = u64::from_le_bytes(*len);
    let header: Header = match decode_prefix(len, prefix) {
        Ok(h) => h,
        Err(e) => {
            // Every refusal explains itself.
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let layout = Layout::new(header.ram_size, header.vcpus).expect("a decoded snapshot has a possible guest");
    assert_eq!(header.generations.len() as u64, layout.data_pages());
    assert_eq!(len, header.ram_offset() + header.ram_size, "the file is as long as its header says");
    // What was decoded is what is stored: the fields, the checksum and the
    // table encode back to the same bytes (the padding is not part of the
    // format).
    let encoded = header.encode().expect("a decoded header encodes");
    assert_eq!(encoded[..64], prefix[..64], "the header fields do not re-encode");
    let table = 4096..4096 + header.generations.len() * 4;
    assert_eq!(encoded[table.clone()], prefix[table], "the generation table does not re-encode");
}
