//! Where page contents come from: zeros, a snapshot file, the eviction store.
//!
//! A [`PageSource`] fills whole pages for a guest range. Sources that keep
//! their contents addressable in memory also expose them through
//! [`PageSource::resident`], so the engine installs straight from them with
//! one `UFFDIO_COPY` and no intermediate copy.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::FileOffset;

use crate::ram::{GuestAddress, GuestRam, GuestRange};
use crate::uffd::PAGE_SIZE;

/// Errors from page sources.
#[derive(Debug, Error)]
pub enum SourceError {
    /// Reading the backing store failed.
    #[error("reading {len:#x} bytes for guest address {:#x} failed", .gpa.0)]
    Io {
        /// Guest address of the first byte asked for.
        gpa: GuestAddress,
        /// Bytes asked for.
        len: usize,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The source has nothing for this range.
    #[error("the page source does not cover guest range {0}")]
    NotCovered(GuestRange),
    /// Opening a snapshot file failed.
    #[error("cannot open snapshot file {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The snapshot file is shorter than the regions it backs.
    #[error("snapshot file {path} holds {actual} bytes but its layout needs {needed}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the layout needs.
        needed: u64,
        /// Bytes the file has.
        actual: u64,
    },
    /// A layout entry is not page-aligned or overlaps another.
    #[error("snapshot layout entry {0} is not page-aligned or overlaps another entry")]
    BadLayout(GuestRange),
    /// Mapping the snapshot file failed.
    #[error("cannot map snapshot file {path}")]
    Map {
        /// The file.
        path: PathBuf,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// How expensive a source is to read; the engine resolves cheap sources on
/// its event-loop thread and hands the rest to its worker pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// Every page is zeros.
    Zero,
    /// Contents are in memory (or the page cache): a fill costs a memcpy.
    Memory,
    /// A fill may block for a long time (disk, network).
    Blocking,
}

/// Where page contents come from.
///
/// `fill` is called with whole pages; it must fill all of `buf` or fail.
/// It may be called concurrently from several threads, and again for the
/// same range after a failure (the engine retries a bounded number of times
/// before it poisons the page).
pub trait PageSource: Send + Sync {
    /// Fills `buf` with the contents of guest memory starting at `gpa`.
    fn fill(&self, gpa: GuestAddress, buf: &mut [u8]) -> Result<(), SourceError>;

    /// The contents of `[gpa, gpa + len)` in place, if the source keeps them
    /// addressable: a pointer readable for `len` bytes for as long as the
    /// source lives. The engine hands it straight to `UFFDIO_COPY`.
    fn resident(&self, gpa: GuestAddress, len: usize) -> Option<*const u8> {
        let _ = (gpa, len);
        None
    }

    /// How expensive a fill is.
    fn kind(&self) -> SourceKind;

    /// A short name for traces and reports.
    fn name(&self) -> &'static str;
}

/// Every page is zeros: fresh guest RAM.
#[derive(Debug, Default, Clone, Copy)]
pub struct ZeroSource;

impl PageSource for ZeroSource {
    fn fill(&self, _gpa: GuestAddress, buf: &mut [u8]) -> Result<(), SourceError> {
        buf.fill(0);
        Ok(())
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Zero
    }

    fn name(&self) -> &'static str {
        "zero"
    }
}

/// A raw memory image: each guest range in the layout is stored at a file
/// offset. The file is mapped read-only so that installs copy straight from
/// the page cache; `fill` uses `pread`, so a file that shrinks under the
/// engine gives an error, never a SIGBUS.
#[derive(Debug)]
pub struct SnapshotFile {
    path: PathBuf,
    file: Arc<File>,
    /// The file, mapped read-only and shared (none for an empty layout).
    map: Option<MmapRegion>,
    layout: Vec<(GuestRange, u64)>,
}

impl SnapshotFile {
    /// Opens an image of `ram`: its regions stored back to back from offset
    /// 0, in guest-address order.
    pub fn open(path: impl AsRef<Path>, ram: &GuestRam) -> Result<Self, SourceError> {
        let mut offset = 0;
        let layout = ram
            .regions()
            .iter()
            .map(|r| {
                let entry = (GuestRange::new(r.base(), r.len()), offset);
                offset += r.len();
                entry
            })
            .collect();
        Self::with_layout(path, layout)
    }

    /// Opens an image with an explicit layout: `(guest range, file offset)`.
    /// Ranges and offsets must be page-aligned and ranges must not overlap.
    /// A file shorter than the layout needs is refused here, not at fault
    /// time.
    pub fn with_layout(path: impl AsRef<Path>, layout: Vec<(GuestRange, u64)>) -> Result<Self, SourceError> {
        let path = path.as_ref().to_path_buf();
        for (i, (range, off)) in layout.iter().enumerate() {
            let overlaps = layout[..i].iter().any(|(other, _)| other.overlaps(range));
            if !range.is_page_aligned() || range.len == 0 || off % PAGE_SIZE as u64 != 0 || overlaps {
                return Err(SourceError::BadLayout(*range));
            }
        }
        let file = Arc::new(File::open(&path).map_err(|source| SourceError::Open { path: path.clone(), source })?);
        let actual = file.metadata().map_err(|source| SourceError::Open { path: path.clone(), source })?.len();
        let needed = layout.iter().map(|(r, off)| off + r.len).max().unwrap_or(0);
        if actual < needed {
            return Err(SourceError::Truncated { path, needed, actual });
        }
        let map_len = needed as usize;
        let map = if map_len == 0 {
            None
        } else {
            let map = MmapRegionBuilder::new(map_len)
                .with_file_offset(FileOffset::from_arc(file.clone(), 0))
                .with_mmap_prot(libc::PROT_READ)
                .with_mmap_flags(libc::MAP_SHARED)
                .build()
                .map_err(|e| SourceError::Map { path: path.clone(), source: crate::ram::mmap_error(e) })?;
            Some(map)
        };
        Ok(SnapshotFile { path, file, map, layout })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn offset_of(&self, gpa: GuestAddress, len: usize) -> Option<u64> {
        self.layout.iter().find_map(|(r, off)| {
            let inside = gpa.0 >= r.start.0 && gpa.0.checked_add(len as u64).is_some_and(|end| end <= r.end());
            inside.then(|| off + (gpa.0 - r.start.0))
        })
    }
}

impl PageSource for SnapshotFile {
    fn fill(&self, gpa: GuestAddress, buf: &mut [u8]) -> Result<(), SourceError> {
        let off =
            self.offset_of(gpa, buf.len()).ok_or(SourceError::NotCovered(GuestRange::new(gpa, buf.len() as u64)))?;
        self.file.read_exact_at(buf, off).map_err(|source| SourceError::Io { gpa, len: buf.len(), source })
    }

    fn resident(&self, gpa: GuestAddress, len: usize) -> Option<*const u8> {
        let off = self.offset_of(gpa, len)?;
        let map = self.map.as_ref()?;
        // The layout was checked against the mapping's length at open.
        debug_assert!(off as usize + len <= map.size());
        Some(map.as_ptr().wrapping_add(off as usize).cast_const())
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Memory
    }

    fn name(&self) -> &'static str {
        "snapshot"
    }
}

#[cfg(feature = "lab")]
/// Deterministic synthetic contents: every page starts with its guest
/// address and the seed, and the rest is a hash of both. Lets examples,
/// tests and benchmarks write and verify images without keeping a copy
/// (feature `lab`).
#[derive(Debug, Clone, Copy)]
pub struct Pattern {
    /// Seed mixed into every page.
    pub seed: u64,
}

#[cfg(feature = "lab")]
impl Pattern {
    /// Writes the contents of the pages starting at `gpa` into `buf`.
    pub fn write(&self, gpa: u64, buf: &mut [u8]) {
        for (i, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
            let page_gpa = gpa + (i * PAGE_SIZE) as u64;
            for (j, word) in page.chunks_exact_mut(8).enumerate() {
                word.copy_from_slice(&Self::word(page_gpa, self.seed, j).to_le_bytes());
            }
        }
    }

    /// Checks every byte of the pages starting at `gpa`; returns the guest
    /// address of the first page that does not match.
    pub fn verify(&self, gpa: u64, buf: &[u8]) -> Result<(), u64> {
        for (i, page) in buf.chunks_exact(PAGE_SIZE).enumerate() {
            let page_gpa = gpa + (i * PAGE_SIZE) as u64;
            let ok = page
                .chunks_exact(8)
                .enumerate()
                .all(|(j, w)| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])) == Self::word(page_gpa, self.seed, j));
            if !ok {
                return Err(page_gpa);
            }
        }
        Ok(())
    }

    /// Word `j` of the page at `gpa` (page-aligned).
    pub fn word_at(&self, gpa: u64, j: usize) -> u64 {
        Self::word(gpa, self.seed, j)
    }

    fn word(gpa: u64, seed: u64, j: usize) -> u64 {
        match j {
            0 => gpa,
            1 => seed,
            _ => splitmix64(gpa ^ seed.rotate_left(17) ^ (j as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        }
    }
}

#[cfg(feature = "lab")]
/// The splitmix64 finaliser: a fast, well-mixed 64-bit hash.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(feature = "lab")]
impl PageSource for Pattern {
    fn fill(&self, gpa: GuestAddress, buf: &mut [u8]) -> Result<(), SourceError> {
        self.write(gpa.0, buf);
        Ok(())
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Memory
    }

    fn name(&self) -> &'static str {
        "pattern"
    }
}

const STORE_SHARDS: usize = 64;

/// Page contents taken out of guest RAM (evicted) and kept in host memory
/// until the guest faults them back in. Sharded so concurrent evictions and
/// restores rarely contend.
#[derive(Debug)]
pub struct EvictionStore {
    shards: Vec<Mutex<HashMap<u64, Box<[u8]>>>>,
    pages: std::sync::atomic::AtomicUsize,
}

impl Default for EvictionStore {
    fn default() -> Self {
        EvictionStore {
            shards: (0..STORE_SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            pages: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

impl EvictionStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn shard(&self, page_gpa: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Box<[u8]>>> {
        let idx = (page_gpa / PAGE_SIZE as u64) as usize % STORE_SHARDS;
        self.shards[idx].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores whole pages starting at page-aligned `gpa`.
    pub fn insert(&self, gpa: GuestAddress, data: &[u8]) {
        debug_assert!(gpa.0 % PAGE_SIZE as u64 == 0 && data.len() % PAGE_SIZE == 0);
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let key = gpa.0 + (i * PAGE_SIZE) as u64;
            if self.shard(key).insert(key, page.into()).is_none() {
                self.pages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Forgets the pages of `[gpa, gpa + len)` (after they were restored).
    pub fn discard(&self, gpa: GuestAddress, len: usize) {
        for key in (gpa.0..gpa.0 + len as u64).step_by(PAGE_SIZE) {
            if self.shard(key).remove(&key).is_some() {
                self.pages.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Forgets every stored page of `range`, which was discarded (a
    /// balloon's `MADV_DONTNEED`) or unplugged: its contents are zeros now,
    /// and an entry left behind would never be read nor freed. Returns how
    /// many pages were dropped. Free when the store is empty; a range larger
    /// than the store walks the store instead of the range.
    pub fn discard_range(&self, range: GuestRange) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        if self.is_empty() || range.len == 0 {
            return 0;
        }
        let first = range.start.0 & !(PAGE_SIZE as u64 - 1);
        let pages = (range.end() - first).div_ceil(PAGE_SIZE as u64);
        let mut dropped = 0;
        if pages > self.len() as u64 {
            for shard in &self.shards {
                let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
                let before = shard.len();
                shard.retain(|&key, _| key < first || key >= range.end());
                dropped += before - shard.len();
            }
        } else {
            for key in (0..pages).map(|i| first + i * PAGE_SIZE as u64) {
                dropped += usize::from(self.shard(key).remove(&key).is_some());
            }
        }
        self.pages.fetch_sub(dropped, Relaxed);
        dropped
    }

    /// True if the page at `gpa` is stored.
    pub fn contains(&self, gpa: GuestAddress) -> bool {
        let key = gpa.0 & !(PAGE_SIZE as u64 - 1);
        self.shard(key).contains_key(&key)
    }

    /// Number of pages stored.
    pub fn len(&self) -> usize {
        self.pages.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// True if nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PageSource for EvictionStore {
    fn fill(&self, gpa: GuestAddress, buf: &mut [u8]) -> Result<(), SourceError> {
        for (i, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
            let key = gpa.0 + (i * PAGE_SIZE) as u64;
            match self.shard(key).get(&key) {
                Some(data) => page.copy_from_slice(data),
                None => return Err(SourceError::NotCovered(GuestRange::new(GuestAddress(key), PAGE_SIZE as u64))),
            }
        }
        Ok(())
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Memory
    }

    fn name(&self) -> &'static str {
        "store"
    }
}

impl std::fmt::Debug for dyn PageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageSource({})", self.name())
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(bytes: &[u8]) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.path().join("image");
        File::create(&path).unwrap().write_all(bytes).unwrap();
        (dir, path)
    }

    mod tempdir {
        use std::path::{Path, PathBuf};
        pub struct Dir(PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir().join(format!("apf-source-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn snapshot_fill_and_resident_agree() {
        let bytes: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| (i / 7) as u8).collect();
        let (_d, path) = temp_file(&bytes);
        let layout = vec![
            (GuestRange::new(GuestAddress(0x10_0000), 2 * PAGE_SIZE as u64), 0),
            (GuestRange::new(GuestAddress(0x40_0000), PAGE_SIZE as u64), 2 * PAGE_SIZE as u64),
        ];
        let snap = SnapshotFile::with_layout(&path, layout).unwrap();
        let mut buf = vec![0; PAGE_SIZE];
        snap.fill(GuestAddress(0x40_0000), &mut buf).unwrap();
        assert_eq!(buf, bytes[2 * PAGE_SIZE..]);
        let p = snap.resident(GuestAddress(0x10_1000), PAGE_SIZE).unwrap();
        // SAFETY: `resident` promises PAGE_SIZE readable bytes while `snap` lives.
        let resident = unsafe { std::slice::from_raw_parts(p, PAGE_SIZE) };
        assert_eq!(resident, &bytes[PAGE_SIZE..2 * PAGE_SIZE]);
        // Not covered: between the ranges, and running off the end of one.
        assert!(matches!(snap.fill(GuestAddress(0x20_0000), &mut buf), Err(SourceError::NotCovered(_))));
        let mut two = vec![0; 2 * PAGE_SIZE];
        assert!(snap.fill(GuestAddress(0x10_1000), &mut two).is_err());
        assert!(snap.resident(GuestAddress(0x40_0000), 2 * PAGE_SIZE).is_none());
    }

    #[test]
    fn short_snapshot_is_refused_at_open() {
        let (_d, path) = temp_file(&vec![1; PAGE_SIZE + 1]);
        let layout = vec![(GuestRange::new(GuestAddress(0), 2 * PAGE_SIZE as u64), 0)];
        match SnapshotFile::with_layout(&path, layout) {
            Err(SourceError::Truncated { needed, actual, .. }) => {
                assert_eq!((needed, actual), (2 * PAGE_SIZE as u64, PAGE_SIZE as u64 + 1));
            }
            other => panic!("expected Truncated, got {other:?}"),
        }
    }

    #[test]
    fn bad_layouts_are_refused() {
        let (_d, path) = temp_file(&vec![0; 4 * PAGE_SIZE]);
        let page = PAGE_SIZE as u64;
        for layout in [
            vec![(GuestRange::new(GuestAddress(1), page), 0)],
            vec![(GuestRange::new(GuestAddress(0), page), 1)],
            vec![(GuestRange::new(GuestAddress(0), 0), 0)],
            vec![
                (GuestRange::new(GuestAddress(0), 2 * page), 0),
                (GuestRange::new(GuestAddress(page), page), 2 * page),
            ],
        ] {
            assert!(matches!(SnapshotFile::with_layout(&path, layout), Err(SourceError::BadLayout(_))));
        }
        assert!(matches!(SnapshotFile::with_layout("/nonexistent/apf", vec![]), Err(SourceError::Open { .. })));
    }

    #[cfg(feature = "lab")]
    #[test]
    fn pattern_verifies_what_it_wrote_and_nothing_else() {
        let p = Pattern { seed: 42 };
        let mut buf = vec![0; 3 * PAGE_SIZE];
        p.write(0x7000, &mut buf);
        assert_eq!(p.verify(0x7000, &buf), Ok(()));
        assert_eq!(u64::from_le_bytes(buf[PAGE_SIZE..PAGE_SIZE + 8].try_into().unwrap()), 0x8000);
        // Another seed, another address, or one flipped byte all fail.
        assert_eq!(Pattern { seed: 43 }.verify(0x7000, &buf), Err(0x7000));
        assert_eq!(p.verify(0x6000, &buf), Err(0x6000));
        buf[2 * PAGE_SIZE + 4000] ^= 1;
        assert_eq!(p.verify(0x7000, &buf), Err(0x9000));
    }

    #[test]
    fn eviction_store_round_trip() {
        let store = EvictionStore::new();
        let data: Vec<u8> = (0..2 * PAGE_SIZE).map(|i| i as u8).collect();
        store.insert(GuestAddress(0x8000), &data);
        assert_eq!(store.len(), 2);
        let mut buf = vec![0; 2 * PAGE_SIZE];
        store.fill(GuestAddress(0x8000), &mut buf).unwrap();
        assert_eq!(buf, data);
        store.discard(GuestAddress(0x8000), PAGE_SIZE);
        assert!(!store.contains(GuestAddress(0x8000)));
        assert!(store.contains(GuestAddress(0x9fff)));
        assert!(store.fill(GuestAddress(0x8000), &mut buf).is_err());
    }

    #[test]
    fn discard_range_drops_exactly_the_range_by_either_walk() {
        let store = EvictionStore::new();
        let page = PAGE_SIZE as u64;
        store.insert(GuestAddress(0), &vec![1; 8 * PAGE_SIZE]);
        // A range smaller than the store: walked page by page.
        assert_eq!(store.discard_range(GuestRange::new(GuestAddress(2 * page), 2 * page)), 2);
        assert_eq!(store.len(), 6);
        assert!(store.contains(GuestAddress(page)) && !store.contains(GuestAddress(2 * page)));
        assert!(!store.contains(GuestAddress(3 * page)) && store.contains(GuestAddress(4 * page)));
        // Larger than the store: the store is walked; pages outside stay.
        assert_eq!(store.discard_range(GuestRange::new(GuestAddress(4 * page), 1 << 30)), 4);
        assert_eq!(store.len(), 2);
        assert!(store.contains(GuestAddress(0)) && store.contains(GuestAddress(page)));
        // An unaligned range covers the pages it touches.
        assert_eq!(store.discard_range(GuestRange::new(GuestAddress(page - 1), 2)), 2);
        assert!(store.is_empty());
        assert_eq!(store.discard_range(GuestRange::new(GuestAddress(0), 1 << 40)), 0);
    }
}
