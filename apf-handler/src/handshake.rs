//! The one message Firecracker sends its page-fault handler, parsed and
//! checked: UTF-8 JSON with no terminator, an array of guest memory
//! regions `{"base_host_virt_addr", "size", "offset", "page_size",
//! "page_size_kib"}` (the last one deprecated, the same value). Pure: bytes
//! and the memory file's length in, regions or a reason out, so it can be
//! fuzzed (`fuzz/fuzz_targets/handshake.rs`).
//!
//! Strict about what the handler relies on: every region inside the
//! memory file, regions disjoint both in the peer's address space and in
//! the file, page sizes of 4 KiB or 2 MiB with addresses, sizes and
//! offsets aligned to them, and a bounded size. Unknown fields are
//! ignored (a later Firecracker may add some).

use thiserror::Error;

/// Largest handshake accepted, in bytes (Firecracker sends a few hundred).
pub const MAX_MESSAGE: usize = 64 << 10;
/// Most regions accepted (Firecracker sends one per memory slot: a few,
/// or a few hundred with virtio-mem slots).
pub const MAX_REGIONS: usize = 512;
/// The page sizes Firecracker uses: 4 KiB, and 2 MiB for hugetlbfs.
pub const PAGE_SIZES: [u64; 2] = [4096, 2 << 20];

/// One guest memory region of the peer, as its handshake describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Its first byte in the peer's address space.
    pub base_host_virt_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Where its contents start in the memory file.
    pub offset: u64,
    /// Its page size in bytes.
    pub page_size: u64,
}

/// Why a handshake is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    /// More than [`MAX_MESSAGE`] bytes.
    #[error("handshake of {0} bytes is over the {MAX_MESSAGE}-byte limit")]
    TooLong(usize),
    /// Not UTF-8 JSON, or trailing bytes after it (a second message).
    #[error("handshake is not one JSON value: {0}")]
    Json(String),
    /// JSON, but not an array of objects.
    #[error("handshake is not an array of region objects")]
    NotRegions,
    /// No regions, or more than [`MAX_REGIONS`].
    #[error("handshake has {0} regions (1 to {MAX_REGIONS} accepted)")]
    RegionCount(usize),
    /// A field is missing or not an unsigned 64-bit integer.
    #[error("region {index}: field {field} is missing or not a u64")]
    Field {
        /// The region's place in the array.
        index: usize,
        /// The field.
        field: &'static str,
    },
    /// A page size other than 4 KiB or 2 MiB, or a `page_size_kib` that
    /// disagrees with `page_size`.
    #[error("region {index}: page size {page_size} (4096 or 2097152 accepted, page_size_kib the same)")]
    PageSize {
        /// The region's place in the array.
        index: usize,
        /// The page size given.
        page_size: u64,
    },
    /// Empty, or address, size or offset not aligned to its page size, or
    /// an end past `u64::MAX`.
    #[error("region {index}: empty, unaligned to its page size, or wrapping")]
    Misaligned {
        /// The region's place in the array.
        index: usize,
    },
    /// Two regions share addresses of the peer, or bytes of the file.
    #[error("regions {0} and {1} overlap ({2})")]
    Overlap(usize, usize, &'static str),
    /// A region reaches past the end of the memory file (or the file is
    /// too short for it).
    #[error("region {index} ends at file offset {end:#x}, past the memory file's {file_len:#x} bytes")]
    OutsideFile {
        /// The region's place in the array.
        index: usize,
        /// One past its last byte in the file.
        end: u64,
        /// The file's length.
        file_len: u64,
    },
}

/// Whether `bytes` may be the start of a handshake still arriving (JSON
/// cut short), rather than one to judge now.
pub fn incomplete(bytes: &[u8]) -> bool {
    bytes.len() <= MAX_MESSAGE && serde_json::from_slice::<serde_json::Value>(bytes).is_err_and(|e| e.is_eof())
}

/// Parses and checks a handshake against a memory file of `file_len`
/// bytes.
pub fn parse(bytes: &[u8], file_len: u64) -> Result<Vec<Region>, HandshakeError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(HandshakeError::TooLong(bytes.len()));
    }
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| HandshakeError::Json(e.to_string()))?;
    let items = value.as_array().ok_or(HandshakeError::NotRegions)?;
    if items.is_empty() || items.len() > MAX_REGIONS {
        return Err(HandshakeError::RegionCount(items.len()));
    }
    let mut regions = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let obj = item.as_object().ok_or(HandshakeError::NotRegions)?;
        let field =
            |field: &'static str| obj.get(field).and_then(|v| v.as_u64()).ok_or(HandshakeError::Field { index, field });
        let region = Region {
            base_host_virt_addr: field("base_host_virt_addr")?,
            size: field("size")?,
            offset: field("offset")?,
            page_size: field("page_size")?,
        };
        // Deprecated and optional; when present, it must agree (despite
        // its name, Firecracker sends the size in bytes).
        let kib = match obj.get("page_size_kib") {
            None => Some(region.page_size),
            Some(v) => v.as_u64(),
        };
        if !PAGE_SIZES.contains(&region.page_size) || kib != Some(region.page_size) {
            return Err(HandshakeError::PageSize { index, page_size: region.page_size });
        }
        let ps = region.page_size;
        let wraps = region.base_host_virt_addr.checked_add(region.size).is_none()
            || region.offset.checked_add(region.size).is_none();
        if region.size == 0 || wraps || (region.base_host_virt_addr | region.size | region.offset) % ps != 0 {
            return Err(HandshakeError::Misaligned { index });
        }
        let end = region.offset + region.size;
        if end > file_len {
            return Err(HandshakeError::OutsideFile { index, end, file_len });
        }
        regions.push(region);
    }
    let overlap = |a: u64, alen: u64, b: u64, blen: u64| a < b + blen && b < a + alen;
    for (i, a) in regions.iter().enumerate() {
        for (j, b) in regions.iter().enumerate().skip(i + 1) {
            if overlap(a.base_host_virt_addr, a.size, b.base_host_virt_addr, b.size) {
                return Err(HandshakeError::Overlap(i, j, "peer addresses"));
            }
            if overlap(a.offset, a.size, b.offset, b.size) {
                return Err(HandshakeError::Overlap(i, j, "memory file"));
            }
        }
    }
    Ok(regions)
}

/// The handshake Firecracker would send for `regions`.
pub fn encode(regions: &[Region]) -> String {
    let items: Vec<serde_json::Value> = regions
        .iter()
        .map(|r| {
            serde_json::json!({
                "base_host_virt_addr": r.base_host_virt_addr,
                "size": r.size,
                "offset": r.offset,
                "page_size": r.page_size,
                "page_size_kib": r.page_size,
            })
        })
        .collect();
    serde_json::Value::Array(items).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn region(base: u64, size: u64, offset: u64) -> Region {
        Region { base_host_virt_addr: base, size, offset, page_size: 4096 }
    }

    #[test]
    fn firecrackers_message_round_trips() {
        // As Firecracker v1.16 sends it, byte for byte in shape.
        let msg = br#"[{"base_host_virt_addr":140241739673600,"size":134217728,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;
        assert_eq!(parse(msg, 128 * MIB), Ok(vec![region(140241739673600, 128 * MIB, 0)]));
        let two = [region(0x7f00_0000_0000, MIB, 0), region(0x7f10_0000_0000, 3 * MIB, MIB)];
        assert_eq!(parse(encode(&two).as_bytes(), 4 * MIB), Ok(two.to_vec()));
        // Unknown fields are ignored; page_size_kib may be left out.
        let extra = br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"x":[1]}]"#;
        assert!(parse(extra, 4096).is_ok());
    }

    #[test]
    fn each_malformation_has_its_reason() {
        let file = 4 * MIB;
        let cases: Vec<(Vec<u8>, HandshakeError)> = vec![
            (vec![b' '; MAX_MESSAGE + 1], HandshakeError::TooLong(MAX_MESSAGE + 1)),
            (b"[{".to_vec(), HandshakeError::Json(String::new())),
            (b"\xff\xfe".to_vec(), HandshakeError::Json(String::new())),
            (b"[] []".to_vec(), HandshakeError::Json(String::new())),
            (b"{}".to_vec(), HandshakeError::NotRegions),
            (b"[1]".to_vec(), HandshakeError::NotRegions),
            (b"[]".to_vec(), HandshakeError::RegionCount(0)),
            (
                br#"[{"size":4096,"offset":0,"page_size":4096}]"#.to_vec(),
                HandshakeError::Field { index: 0, field: "base_host_virt_addr" },
            ),
            (
                br#"[{"base_host_virt_addr":-1,"size":4096,"offset":0,"page_size":4096}]"#.to_vec(),
                HandshakeError::Field { index: 0, field: "base_host_virt_addr" },
            ),
            (
                br#"[{"base_host_virt_addr":0,"size":4096.5,"offset":0,"page_size":4096}]"#.to_vec(),
                HandshakeError::Field { index: 0, field: "size" },
            ),
            (
                br#"[{"base_host_virt_addr":0,"size":8192,"offset":0,"page_size":8192}]"#.to_vec(),
                HandshakeError::PageSize { index: 0, page_size: 8192 },
            ),
            (
                br#"[{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4}]"#.to_vec(),
                HandshakeError::PageSize { index: 0, page_size: 4096 },
            ),
            (encode(&[region(0x1000, 0, 0)]).into_bytes(), HandshakeError::Misaligned { index: 0 }),
            (encode(&[region(0x1800, 4096, 0)]).into_bytes(), HandshakeError::Misaligned { index: 0 }),
            (
                encode(&[Region { page_size: 2 * MIB, ..region(0x20_0000, 4096, 0) }]).into_bytes(),
                HandshakeError::Misaligned { index: 0 },
            ),
            (encode(&[region(u64::MAX - 4095, 8192, 0)]).into_bytes(), HandshakeError::Misaligned { index: 0 }),
            (
                encode(&[region(0x1000, MIB, 3 * MIB + 4096)]).into_bytes(),
                HandshakeError::OutsideFile { index: 0, end: 4 * MIB + 4096, file_len: file },
            ),
            (
                encode(&[region(0x10_0000, MIB, 0), region(0x18_0000, MIB, MIB)]).into_bytes(),
                HandshakeError::Overlap(0, 1, "peer addresses"),
            ),
            (
                encode(&[region(0x10_0000, MIB, 0), region(0x100_0000, MIB, MIB / 2)]).into_bytes(),
                HandshakeError::Overlap(0, 1, "memory file"),
            ),
        ];
        for (bytes, want) in cases {
            let got = parse(&bytes, file).unwrap_err();
            match (&got, &want) {
                // The JSON parser's own words are kept, not compared.
                (HandshakeError::Json(msg), HandshakeError::Json(_)) => assert!(!msg.is_empty()),
                _ => assert_eq!(got, want, "{}", String::from_utf8_lossy(&bytes[..bytes.len().min(80)])),
            }
            assert!(!got.to_string().is_empty());
        }
        let compact = |i: u64| {
            format!(r#"{{"base_host_virt_addr":{},"size":4096,"offset":{},"page_size":4096}}"#, i * 8192, i * 4096)
        };
        let many = format!("[{}]", (0..=MAX_REGIONS as u64).map(compact).collect::<Vec<_>>().join(","));
        assert!(many.len() <= MAX_MESSAGE);
        assert_eq!(parse(many.as_bytes(), u64::MAX), Err(HandshakeError::RegionCount(MAX_REGIONS + 1)));
    }

    #[test]
    fn a_message_cut_short_is_incomplete_and_a_wrong_one_is_not() {
        let msg = encode(&[region(0x1000, 4096, 0)]);
        for cut in 1..msg.len() {
            assert!(incomplete(&msg.as_bytes()[..cut]), "cut at {cut}");
        }
        assert!(!incomplete(msg.as_bytes()));
        assert!(!incomplete(b"[}"));
        assert!(!incomplete(format!("{msg}{msg}").as_bytes()), "a second message is trailing bytes");
    }
}
