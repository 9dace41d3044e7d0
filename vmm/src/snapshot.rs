//! Snapshot files: guest RAM plus what the next agent needs to verify it.
//!
//! ```text
//! 0     magic "APFSNAP1"
//! 8     version u32, vCPUs u32
//! 16    RAM bytes u64, seed u64, data start u64, data pages u64,
//!       RAM offset u64, checksum u64 (FNV-1a of bytes 0..56 and the table)
//! 4096  the generation of every data page, u32 each
//! RAM offset: guest RAM, byte for byte
//! ```
//! The RAM offset is 2 MiB-aligned from version 2 on (4 KiB in version
//! 1, which is still read), so that a page-fault handler can serve guest
//! RAM of 2 MiB pages from the file: every huge page of it starts on a
//! huge-page boundary of the file, as in Firecracker's memory file.
//! A restore demand-faults RAM from the file through the engine; the
//! generation table goes to the agent (through guest RAM) before any vCPU
//! runs.
//!
//! A save never writes over the previous snapshot in place: it writes a
//! temporary file beside it, syncs it, renames it over the name and syncs
//! the directory, so a save that fails leaves the previous snapshot whole.
//! It refuses to replace the snapshot the run restores from, compared by
//! device and inode ([`FileId`]), whatever name reaches it. Everything a
//! file feeds goes through [`decode`], which checks each field before it
//! sizes a read or an allocation (and is what the fuzz targets exercise).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agent_proto::{checksum, Layout, PAGE_SIZE};
use thiserror::Error;

use crate::mem::GuestAccess;

/// The first bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"APFSNAP1";
/// The format version written.
pub const VERSION: u32 = 2;
/// The versions read: 1 (RAM at a 4 KiB-aligned offset) and 2 (2 MiB).
pub const VERSIONS_READ: [u32; 2] = [1, 2];
/// Where RAM starts in a version-2 file: on a 2 MiB boundary.
const RAM_ALIGN: u64 = 2 << 20;
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
    #[error("{path} is snapshot version {found}; this VMM reads versions 1 and 2")]
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
    /// The save would overwrite the snapshot this run restores from,
    /// which is still the page source of guest RAM.
    #[error(
        "refusing to save over {path}: it is the snapshot this run restores from (under this or another name); \
         save to another file"
    )]
    RestoreSource {
        /// The file named for the save.
        path: PathBuf,
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
    /// The format version of the file ([`VERSION`] for a new one).
    pub version: u32,
    /// vCPUs of the guest that wrote it.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// The seed of its stamps.
    pub seed: u64,
    /// The generation of every data page.
    pub generations: Vec<u32>,
}

/// Where the generation table of `data_pages` entries ends in the file.
fn table_end(data_pages: u64) -> u64 {
    TABLE_OFFSET + data_pages * 4
}

/// Where RAM starts in a file of `version` with `data_pages` entries.
fn ram_start(version: u32, data_pages: u64) -> u64 {
    let align = if version >= 2 { RAM_ALIGN } else { PAGE_SIZE };
    table_end(data_pages).next_multiple_of(align)
}

impl Header {
    /// Where RAM starts in the file.
    pub fn ram_offset(&self) -> u64 {
        ram_start(self.version, self.generations.len() as u64)
    }

    /// The layout of the snapshot's guest.
    pub fn layout(&self) -> Result<Layout, String> {
        Layout::new(self.ram_size, self.vcpus).map_err(|e| e.to_string())
    }

    /// The file's first [`Header::ram_offset`] bytes: header, checksum,
    /// generation table and the padding up to RAM. What [`decode`] reads
    /// back; `None` for a header no snapshot can have (an impossible
    /// guest, or a table whose length does not match it).
    pub fn encode(&self) -> Option<Vec<u8>> {
        let layout = self.layout().ok()?;
        (self.generations.len() as u64 == layout.data_pages()).then(|| self.encode_with(&layout))
    }

    fn encode_with(&self, layout: &Layout) -> Vec<u8> {
        let mut fields = [0u8; HEADER_FIELDS];
        fields[..8].copy_from_slice(&MAGIC);
        fields[8..12].copy_from_slice(&self.version.to_le_bytes());
        fields[12..16].copy_from_slice(&self.vcpus.to_le_bytes());
        for (i, v) in [self.ram_size, self.seed, layout.data_start, layout.data_pages(), self.ram_offset()]
            .into_iter()
            .enumerate()
        {
            fields[16 + i * 8..24 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        let table = self.table_bytes();
        let mut out = vec![0u8; self.ram_offset() as usize];
        out[..HEADER_FIELDS].copy_from_slice(&fields);
        out[HEADER_FIELDS..HEADER_FIELDS + 8].copy_from_slice(&Self::checksum(&fields, &table).to_le_bytes());
        out[TABLE_OFFSET as usize..TABLE_OFFSET as usize + table.len()].copy_from_slice(&table);
        out
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

/// A file's identity: the device and inode it lives on. Two names reach
/// the same file exactly when their identities are equal, whatever the
/// names: a symlink, a hard link, `./x` and `x` all compare equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl FileId {
    /// The identity of the file `path` names, following symlinks.
    pub fn of(path: &Path) -> std::io::Result<FileId> {
        std::fs::metadata(path).map(|m| FileId { dev: m.dev(), ino: m.ino() })
    }

    /// The identity of an open file: the one actually in use, even if its
    /// name has since been replaced.
    pub fn of_file(file: &File) -> std::io::Result<FileId> {
        file.metadata().map(|m| FileId { dev: m.dev(), ino: m.ino() })
    }
}

/// A temporary file next to the snapshot being saved. Removed when
/// dropped unless it was renamed into place, so a failed save leaves
/// nothing behind.
struct TempFile {
    path: PathBuf,
    placed: bool,
}

impl TempFile {
    /// Creates a new, empty temporary file in `dir` for `target`. The name
    /// is unique across processes (the pid) and within one (a counter);
    /// `create_new` makes a leftover of a crashed process with the same
    /// pid a reason to pick the next name, never a file to write through.
    fn create(dir: &Path, target: &Path) -> Result<(TempFile, File), SnapshotError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = target.file_name().unwrap_or_default().to_string_lossy().into_owned();
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => return Ok((TempFile { path, placed: false }, file)),
                Err(e) if e.kind() == ErrorKind::AlreadyExists && n % 1000 != 999 => continue,
                Err(e) => return Err(io(&path)(e)),
            }
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.placed {
            // Best effort: the save already failed with the error that
            // matters, and a leftover only costs disk space.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Where a save to `path` writes: the file a symlink points to (as
/// writing through it would), or `path` itself when it does not exist yet.
fn save_target(path: &Path) -> Result<PathBuf, SnapshotError> {
    match std::fs::canonicalize(path) {
        Ok(p) => Ok(p),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(path.to_path_buf()),
        Err(e) => Err(io(path)(e)),
    }
}

/// Checks that a save to `path` would not overwrite `restoring_from`, the
/// snapshot a run restores from, under any name (compared by device and
/// inode, never by path); returns the file the save would write. A run
/// checks this before it starts, and [`save`] again at the end.
pub fn check_save_target(path: &Path, restoring_from: Option<FileId>) -> Result<PathBuf, SnapshotError> {
    let target = save_target(path)?;
    if let Some(source) = restoring_from {
        match FileId::of(&target) {
            Ok(id) if id == source => return Err(SnapshotError::RestoreSource { path: path.to_path_buf() }),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io(path)(e)),
        }
    }
    Ok(target)
}

/// Writes guest RAM and its generation table (read from guest RAM, where
/// the agents keep it) to `path`.
///
/// The snapshot is written to a temporary file in the same directory,
/// synced, renamed over `path` and the directory synced: a save that fails
/// at any point leaves the previous snapshot at `path` as it was, and no
/// temporary file. `restoring_from` is the file this run restores from
/// (still its page source); a save over it, under any name, is refused.
pub fn save(
    path: &Path,
    access: &GuestAccess,
    layout: &Layout,
    seed: u64,
    restoring_from: Option<FileId>,
) -> Result<Header, SnapshotError> {
    let target = check_save_target(path, restoring_from)?;
    let deadline = || Instant::now() + Duration::from_secs(5);
    let guest = |gpa: u64| move |e: crate::mem::AccessError| SnapshotError::Guest { gpa, why: e.to_string() };
    let mut table = vec![0u8; layout.data_pages() as usize * 4];
    access.read(layout.gen_entry(0), &mut table, deadline()).map_err(guest(layout.gen_entry(0)))?;
    let generations = table.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap_or_default())).collect();
    let header = Header { version: VERSION, vcpus: layout.vcpus, ram_size: layout.ram_size, seed, generations };

    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (mut temp, file) = TempFile::create(&dir, &target)?;
    let tio = io(&temp.path);
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&header.encode_with(layout)).map_err(&tio)?;
    // RAM in 2 MiB chunks, each copied under one short-term reference.
    let chunk = 2 << 20;
    let mut buf = vec![0u8; chunk];
    let mut gpa = 0;
    while gpa < layout.ram_size {
        let n = chunk.min((layout.ram_size - gpa) as usize);
        access.read(gpa, &mut buf[..n], deadline()).map_err(guest(gpa))?;
        w.write_all(&buf[..n]).map_err(&tio)?;
        gpa += n as u64;
    }
    let file = w.into_inner().map_err(|e| tio(e.into_error()))?;
    // The new snapshot takes the permissions of the one it replaces, as
    // a write in place kept them.
    match std::fs::metadata(&target) {
        Ok(previous) => file.set_permissions(previous.permissions()).map_err(&tio)?,
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io(path)(e)),
    }
    // Durable before it gets the name: a crash after the rename must not
    // find a snapshot whose data never reached the disk.
    file.sync_all().map_err(&tio)?;
    drop(tio);
    std::fs::rename(&temp.path, &target).map_err(io(path))?;
    temp.placed = true;
    // The rename itself is durable once the directory is.
    File::open(&dir).and_then(|d| d.sync_all()).map_err(io(&dir))?;
    Ok(header)
}

/// Reads and checks a snapshot's header and table: magic, version,
/// checksum, a possible guest, and a file exactly as long as they say.
pub fn open(path: &Path) -> Result<Header, SnapshotError> {
    open_with_id(path).map(|(h, _)| h)
}

/// [`open`], with the identity of the file it read: what a later
/// [`save`] must not overwrite while the file is the run's page source.
pub fn open_with_id(path: &Path) -> Result<(Header, FileId), SnapshotError> {
    let file = File::open(path).map_err(io(path))?;
    let meta = file.metadata().map_err(io(path))?;
    let id = FileId { dev: meta.dev(), ino: meta.ino() };
    let header = decode(path, meta.len(), |buf, offset| file.read_exact_at(buf, offset))?;
    Ok((header, id))
}

/// Decodes the header and generation table of the snapshot `path`, a file
/// of `len` bytes whose contents `read_at(buf, offset)` fills in: the
/// parsing [`open`] does, on any bytes. Every field is checked before it
/// sizes a read or an allocation.
pub fn decode(
    path: &Path,
    len: u64,
    mut read_at: impl FnMut(&mut [u8], u64) -> std::io::Result<()>,
) -> Result<Header, SnapshotError> {
    let p = || path.to_path_buf();
    let mut head = [0u8; HEADER_FIELDS + 8];
    if len < TABLE_OFFSET {
        return Err(SnapshotError::Length { path: p(), expected: TABLE_OFFSET, actual: len });
    }
    read_at(&mut head, 0).map_err(io(path))?;
    if head[..8] != MAGIC {
        return Err(SnapshotError::Magic { path: p() });
    }
    let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap_or_default());
    let u64_at = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().unwrap_or_default());
    let version = u32_at(8);
    if !VERSIONS_READ.contains(&version) {
        return Err(SnapshotError::Version { path: p(), found: version });
    }
    let (vcpus, ram_size, seed, data_start, data_pages, ram_offset, sum) =
        (u32_at(12), u64_at(16), u64_at(24), u64_at(32), u64_at(40), u64_at(48), u64_at(56));
    let corrupt = |why: String| SnapshotError::Corrupt { path: p(), why };
    let layout = Layout::new(ram_size, vcpus).map_err(|e| corrupt(format!("impossible guest: {e}")))?;
    if layout.data_start != data_start || layout.data_pages() != data_pages {
        return Err(corrupt("its data layout does not match its RAM size and vCPU count".into()));
    }
    let expected_offset = ram_start(version, data_pages);
    if expected_offset != ram_offset {
        return Err(corrupt(format!("RAM offset {ram_offset:#x}, expected {expected_offset:#x}")));
    }
    let expected = ram_offset + ram_size;
    if len != expected {
        return Err(SnapshotError::Length { path: p(), expected, actual: len });
    }
    let mut table = vec![0u8; data_pages as usize * 4];
    read_at(&mut table, TABLE_OFFSET).map_err(io(path))?;
    if Header::checksum(&head[..HEADER_FIELDS], &table) != sum {
        return Err(corrupt("header checksum mismatch".into()));
    }
    let generations = table.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap_or_default())).collect();
    Ok(Header { version, vcpus, ram_size, seed, generations })
}

/// [`decode`] of a snapshot file of `len` bytes that starts with
/// `prefix` (the rest reads as missing: an I/O error, as a file cut short
/// under the reader would give). What fuzzing and corpus replays call.
pub fn decode_prefix(len: u64, prefix: &[u8]) -> Result<Header, SnapshotError> {
    decode(Path::new("<bytes>"), len, |buf, offset| {
        let at = usize::try_from(offset).ok().filter(|&at| at <= prefix.len()).unwrap_or(prefix.len());
        let src = prefix.get(at..at.saturating_add(buf.len())).filter(|s| s.len() == buf.len());
        match src {
            Some(s) => {
                buf.copy_from_slice(s);
                Ok(())
            }
            None => Err(ErrorKind::UnexpectedEof.into()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use apf::{GuestAddress, GuestRam};
    use vm_memory::Bytes;

    /// A fresh directory of its own per test, so "nothing left behind" can
    /// be checked by listing it.
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("apf-snapshot-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    /// 16 MiB of guest RAM with a generation and a data word set.
    fn guest(generation: u32, word: u64) -> (GuestAccess, Layout) {
        let layout = Layout::new(16 << 20, 2).unwrap();
        let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), 16 << 20)]).unwrap());
        ram.guest_memory().write_obj(generation, GuestAddress(layout.gen_entry(3))).unwrap();
        ram.guest_memory().write_obj(word, GuestAddress(layout.data_start)).unwrap();
        (GuestAccess::Plain(ram), layout)
    }

    fn saved(dir: &Path) -> (PathBuf, Layout) {
        let (access, layout) = guest(7, 0xabcd);
        let path = dir.join("snap");
        save(&path, &access, &layout, 42, None).unwrap();
        (path, layout)
    }

    #[test]
    fn round_trip() {
        let dir = temp_dir("rt");
        let (path, layout) = saved(&dir);
        let h = open(&path).unwrap();
        assert_eq!((h.vcpus, h.ram_size, h.seed), (2, 16 << 20, 42));
        assert_eq!(h.generations.len() as u64, layout.data_pages());
        assert_eq!(h.generations[3], 7);
        let bytes = std::fs::read(&path).unwrap();
        let at = (h.ram_offset() + layout.data_start) as usize;
        assert_eq!(u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()), 0xabcd);
        // The pure decoder reads what the file holds, and the header
        // encodes back to the file's first bytes.
        let prefix = h.encode().unwrap();
        assert_eq!(prefix[..], bytes[..h.ram_offset() as usize]);
        assert_eq!(decode_prefix(bytes.len() as u64, &prefix).unwrap(), h);
        assert_eq!(entries(&dir), ["snap"]);
        // A new file puts RAM on a 2 MiB boundary (huge pages can be
        // served from it); a version-1 file, RAM on the next 4 KiB one
        // after the table, is still read as it is.
        assert_eq!((h.version, h.ram_offset() % (2 << 20)), (VERSION, 0));
        let v1 = Header { version: 1, ..h.clone() };
        assert_eq!(v1.ram_offset(), (4096 + layout.data_pages() * 4).next_multiple_of(4096));
        let mut file = v1.encode().unwrap();
        file.extend_from_slice(&bytes[h.ram_offset() as usize..]);
        assert_eq!(decode_prefix(file.len() as u64, &file).unwrap(), v1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refuses_what_does_not_match() {
        let dir = temp_dir("bad");
        let (path, _) = saved(&dir);
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
        // A file cut short under the reader: an I/O error, not a panic.
        let h = decode_prefix(good.len() as u64, &good[..5000]).unwrap_err();
        assert!(matches!(h, SnapshotError::Io { .. }), "{h}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_save_failing_midway_keeps_the_previous_snapshot() {
        let dir = temp_dir("midway");
        let (path, _) = saved(&dir);
        let before = std::fs::read(&path).unwrap();
        // A guest that claims 32 MiB over 16 MiB of RAM: its generation
        // table reads, then the RAM copy fails at 16 MiB, half written.
        let (access, _) = guest(9, 0x1234);
        let bigger = Layout::new(32 << 20, 2).unwrap();
        let e = save(&path, &access, &bigger, 42, None).unwrap_err();
        assert!(matches!(e, SnapshotError::Guest { gpa, .. } if gpa == 16 << 20), "{e}");
        assert!(std::fs::read(&path).unwrap() == before, "the failed save changed the previous snapshot");
        assert_eq!(entries(&dir), ["snap"], "a failed save left a temporary file");
        // The previous snapshot still opens and says what it said.
        assert_eq!(open(&path).unwrap().generations[3], 7);

        // Failing at the very last step (the name is a directory, so the
        // rename fails) leaves nothing behind either.
        let taken = dir.join("taken");
        std::fs::create_dir(&taken).unwrap();
        let (access, layout) = guest(9, 0x1234);
        let e = save(&taken, &access, &layout, 42, None).unwrap_err();
        assert!(matches!(e, SnapshotError::Io { .. }), "{e}");
        assert_eq!(entries(&dir), ["snap", "taken"]);
        assert!(entries(&taken).is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_save_replaces_the_previous_snapshot_whole() {
        let dir = temp_dir("replace");
        let (path, layout) = saved(&dir);
        let (access, _) = guest(9, 0x1234);
        save(&path, &access, &layout, 43, None).unwrap();
        let h = open(&path).unwrap();
        assert_eq!((h.seed, h.generations[3]), (43, 9));
        assert_eq!(entries(&dir), ["snap"]);
        // It keeps the permissions of the file it replaces.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        save(&path, &access, &layout, 43, None).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // Through a symlink: the file it points to gets the snapshot, the
        // link stays a link.
        let link = dir.join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        save(&link, &access, &layout, 44, None).unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(open(&path).unwrap().seed, 44);
        assert_eq!(entries(&dir), ["link", "snap"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn concurrent_saves_to_one_name_leave_one_whole_snapshot() {
        let dir = temp_dir("concurrent");
        let path = dir.join("snap");
        let threads: Vec<_> = (0..4u64)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let (access, layout) = guest(i as u32, i);
                    save(&path, &access, &layout, 100 + i, None).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let h = open(&path).unwrap();
        assert!((100..104).contains(&h.seed));
        // Header and RAM come from the same save.
        assert_eq!(h.generations[3] as u64, h.seed - 100);
        assert_eq!(entries(&dir), ["snap"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refuses_to_save_over_the_restore_source_under_any_name() {
        let dir = temp_dir("source");
        let (path, layout) = saved(&dir);
        let before = std::fs::read(&path).unwrap();
        let (_, source) = open_with_id(&path).unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let hard = dir.join("hard");
        std::fs::hard_link(&path, &hard).unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        let dotted = dir.join("sub").join("..").join(".").join("snap");
        let (access, _) = guest(9, 0x1234);
        for name in [&path, &link, &hard, &dotted] {
            let e = save(name, &access, &layout, 1, Some(source)).unwrap_err();
            assert!(matches!(e, SnapshotError::RestoreSource { .. }), "{}: {e}", name.display());
            assert!(e.to_string().contains("restores from"), "{e}");
            assert!(matches!(check_save_target(name, Some(source)), Err(SnapshotError::RestoreSource { .. })));
        }
        assert!(std::fs::read(&path).unwrap() == before);
        assert_eq!(entries(&dir), ["hard", "link", "snap", "sub"]);

        // Identity, not the name: once the source is renamed away, a new
        // file under its old name may be overwritten, the source may not.
        let moved = dir.join("moved");
        std::fs::rename(&path, &moved).unwrap();
        save(&path, &access, &layout, 2, Some(source)).unwrap();
        assert_eq!(open(&path).unwrap().seed, 2);
        assert!(matches!(save(&moved, &access, &layout, 3, Some(source)), Err(SnapshotError::RestoreSource { .. })));
        assert!(matches!(save(&hard, &access, &layout, 3, Some(source)), Err(SnapshotError::RestoreSource { .. })));
        assert!(std::fs::read(&moved).unwrap() == before);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
