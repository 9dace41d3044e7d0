//! Snapshot files: guest RAM plus what the next agent needs to verify it.
//!
//! ```text
//! 0     magic "APFSNAP1"
//! 8     version u32, vCPUs u32
//! 16    RAM bytes u64, seed u64, data start u64, data pages u64,
//!       RAM offset u64, checksum u64 (FNV-1a of bytes 0..56 and the table)
//! 4096  the generation of every data page, u32 each
//! RAM offset (page-aligned): guest RAM, byte for byte
//! ```
//! A restore demand-faults RAM from the file through the engine; the
//! generation table goes to the agent (through guest RAM) before any vCPU
//! runs.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_proto::{checksum, Layout, PAGE_SIZE};
use thiserror::Error;

use crate::mem::GuestAccess;

/// The first bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"APFSNAP1";
/// The format version.
pub const VERSION: u32 = 1;
const HEADER_FIELDS: usize = 56;
const TABLE_OFFSET: u64 = 4096;

/// A snapshot that cannot be written or used.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// Reading or writing the file failed.
    #[error("snapshot {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a snapshot of this format.
    #[error("{path} is not an apf snapshot (bad magic)")]
    Magic {
        /// The file.
        path: PathBuf,
    },
    /// A version this VMM does not read.
    #[error("{path} is snapshot version {found}; this VMM reads version {VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
    /// The file is shorter or longer than its header says.
    #[error("{path} is {actual} bytes; its header says {expected}: truncated or not a snapshot")]
    Length {
        /// The file.
        path: PathBuf,
        /// Bytes the header implies.
        expected: u64,
        /// Bytes found.
        actual: u64,
    },
    /// The header or table does not match its checksum, or describes an
    /// impossible guest.
    #[error("{path}: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What does not add up.
        why: String,
    },
    /// The snapshot's guest differs from what the command line asks for.
    #[error("{path} holds a guest with {what}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The difference.
        what: String,
    },
    /// Guest RAM could not be read.
    #[error("cannot read guest RAM at {gpa:#x} for the snapshot: {why}")]
    Guest {
        /// Where.
        gpa: u64,
        /// Why.
        why: String,
    },
}

/// A snapshot's header and generation table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// vCPUs of the guest that wrote it.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// The seed of its stamps.
    pub seed: u64,
    /// The generation of every data page.
    pub generations: Vec<u32>,
}

impl Header {
    /// Where RAM starts in the file.
    pub fn ram_offset(&self) -> u64 {
        (TABLE_OFFSET + self.generations.len() as u64 * 4).next_multiple_of(PAGE_SIZE)
    }

    /// The layout of the snapshot's guest.
    pub fn layout(&self) -> Result<Layout, String> {
        Layout::new(self.ram_size, self.vcpus).map_err(|e| e.to_string())
    }

    fn fields(&self, layout: &Layout) -> [u8; HEADER_FIELDS] {
        let mut b = [0u8; HEADER_FIELDS];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.vcpus.to_le_bytes());
        for (i, v) in [self.ram_size, self.seed, layout.data_start, layout.data_pages(), self.ram_offset()]
            .into_iter()
            .enumerate()
        {
            b[16 + i * 8..24 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// The generation table as stored (and as the agent reads it).
    pub fn table_bytes(&self) -> Vec<u8> {
        self.generations.iter().flat_map(|g| g.to_le_bytes()).collect()
    }

    fn checksum(fields: &[u8], table: &[u8]) -> u64 {
        checksum(fields) ^ checksum(table).rotate_left(1)
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io { path: path.to_path_buf(), source }
}

/// Writes guest RAM and its generation table (read from guest RAM, where
/// the agents keep it) to `path`.
pub fn save(path: &Path, access: &GuestAccess, layout: &Layout, seed: u64) -> Result<Header, SnapshotError> {
    let deadline = || Instant::now() + Duration::from_secs(5);
    let guest = |gpa: u64| move |e: crate::mem::AccessError| SnapshotError::Guest { gpa, why: e.to_string() };
    let mut table = vec![0u8; layout.data_pages() as usize * 4];
    access.read(layout.gen_entry(0), &mut table, deadline()).map_err(guest(layout.gen_entry(0)))?;
    let generations = table.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap_or_default())).collect();
    let header = Header { vcpus: layout.vcpus, ram_size: layout.ram_size, seed, generations };
    let fields = header.fields(layout);
    let sum = Header::checksum(&fields, &table);

    let file = File::create(path).map_err(io(path))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&fields).map_err(io(path))?;
    w.write_all(&sum.to_le_bytes()).map_err(io(path))?;
    w.write_all(&vec![0u8; (TABLE_OFFSET as usize) - HEADER_FIELDS - 8]).map_err(io(path))?;
    w.write_all(&table).map_err(io(path))?;
    let pad = header.ram_offset() - TABLE_OFFSET - table.len() as u64;
    w.write_all(&vec![0u8; pad as usize]).map_err(io(path))?;
    // RAM in 2 MiB chunks, each copied under one short-term reference.
    let chunk = 2 << 20;
    let mut buf = vec![0u8; chunk];
    let mut gpa = 0;
    while gpa < layout.ram_size {
        let n = chunk.min((layout.ram_size - gpa) as usize);
        access.read(gpa, &mut buf[..n], deadline()).map_err(guest(gpa))?;
        w.write_all(&buf[..n]).map_err(io(path))?;
        gpa += n as u64;
    }
    w.into_inner().map_err(|e| io(path)(e.into_error()))?.sync_all().map_err(io(path))?;
    Ok(header)
}

/// Reads and checks a snapshot's header and table: magic, version,
/// checksum, a possible guest, and a file exactly as long as they say.
pub fn open(path: &Path) -> Result<Header, SnapshotError> {
    let mut file = File::open(path).map_err(io(path))?;
    let actual = file.metadata().map_err(io(path))?.len();
    let p = || path.to_path_buf();
    let mut head = [0u8; HEADER_FIELDS + 8];
    if actual < TABLE_OFFSET {
        return Err(SnapshotError::Length { path: p(), expected: TABLE_OFFSET, actual });
    }
    file.read_exact(&mut head).map_err(io(path))?;
    if head[..8] != MAGIC {
        return Err(SnapshotError::Magic { path: p() });
    }
    let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap_or_default());
    let u64_at = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().unwrap_or_default());
    let version = u32_at(8);
    if version != VERSION {
        return Err(SnapshotError::Version { path: p(), found: version });
    }
    let (vcpus, ram_size, seed, data_start, data_pages, ram_offset, sum) =
        (u32_at(12), u64_at(16), u64_at(24), u64_at(32), u64_at(40), u64_at(48), u64_at(56));
    let corrupt = |why: String| SnapshotError::Corrupt { path: p(), why };
    let layout = Layout::new(ram_size, vcpus).map_err(|e| corrupt(format!("impossible guest: {e}")))?;
    if layout.data_start != data_start || layout.data_pages() != data_pages {
        return Err(corrupt("its data layout does not match its RAM size and vCPU count".into()));
    }
    let header = Header { vcpus, ram_size, seed, generations: vec![0; data_pages as usize] };
    if header.ram_offset() != ram_offset {
        return Err(corrupt(format!("RAM offset {ram_offset:#x}, expected {:#x}", header.ram_offset())));
    }
    let expected = ram_offset + ram_size;
    if actual != expected {
        return Err(SnapshotError::Length { path: p(), expected, actual });
    }
    let mut skip = vec![0u8; TABLE_OFFSET as usize - head.len()];
    file.read_exact(&mut skip).map_err(io(path))?;
    let mut table = vec![0u8; data_pages as usize * 4];
    file.read_exact(&mut table).map_err(io(path))?;
    if Header::checksum(&head[..HEADER_FIELDS], &table) != sum {
        return Err(corrupt("header checksum mismatch".into()));
    }
    let generations = table.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap_or_default())).collect();
    Ok(Header { generations, ..header })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use apf::{GuestAddress, GuestRam};
    use vm_memory::Bytes;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("apf-snapshot-{}-{name}", std::process::id()))
    }

    fn saved(name: &str) -> (PathBuf, Layout) {
        let layout = Layout::new(16 << 20, 2).unwrap();
        let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), 16 << 20)]).unwrap());
        ram.guest_memory().write_obj(7u32, GuestAddress(layout.gen_entry(3))).unwrap();
        ram.guest_memory().write_obj(0xabcdu64, GuestAddress(layout.data_start)).unwrap();
        let path = temp(name);
        save(&path, &GuestAccess::Plain(ram), &layout, 42).unwrap();
        (path, layout)
    }

    #[test]
    fn round_trip() {
        let (path, layout) = saved("rt");
        let h = open(&path).unwrap();
        assert_eq!((h.vcpus, h.ram_size, h.seed), (2, 16 << 20, 42));
        assert_eq!(h.generations.len() as u64, layout.data_pages());
        assert_eq!(h.generations[3], 7);
        let bytes = std::fs::read(&path).unwrap();
        let at = (h.ram_offset() + layout.data_start) as usize;
        assert_eq!(u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()), 0xabcd);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn refuses_what_does_not_match() {
        let (path, _) = saved("bad");
        let good = std::fs::read(&path).unwrap();
        let check = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            open(&path).unwrap_err()
        };
        assert!(matches!(check(&good[..good.len() - 1]), SnapshotError::Length { .. }));
        assert!(matches!(check(&good[..100]), SnapshotError::Length { .. }));
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(check(&longer), SnapshotError::Length { .. }));
        let mut m = good.clone();
        m[0] = b'X';
        assert!(matches!(check(&m), SnapshotError::Magic { .. }));
        let mut m = good.clone();
        m[8] = 9;
        assert!(matches!(check(&m), SnapshotError::Version { .. }));
        let mut m = good.clone();
        m[4096 + 12] ^= 1;
        assert!(matches!(check(&m), SnapshotError::Corrupt { .. }));
        let mut m = good.clone();
        m[16] = 1;
        assert!(matches!(check(&m), SnapshotError::Corrupt { .. }));
        std::fs::remove_file(path).unwrap();
    }
}
