//! Working sets: the guest pages one run touched first, in order, and the
//! file that carries them to the next restore of the same image.
//!
//! A restore that installs these pages before the guest asks for them (a
//! replay, [`crate::Engine::replay`]) saves most of its faults: REAP
//! (ASPLOS '21) measured 97% fewer on snapshot cold starts.
//!
//! # Positions
//!
//! Pages are guest-physical addresses, which are offsets in the memory
//! image: they stay the same across restores, while host addresses change
//! at every one.
//!
//! # The file
//!
//! Little-endian throughout:
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic `APFWSET2` |
//! | 8 | 4 | format version, 2 |
//! | 12 | 4 | page size, 4096 |
//! | 16 | 8 | image extent in bytes ([`ImageId::size`]) |
//! | 24 | 8 | image fingerprint ([`ImageId::fingerprint`]) |
//! | 32 | 8 | number of pages `n` |
//! | 40 | 12 `n` | per page, in first-touch order: its guest-physical address (u64), then milliseconds from the start of the recording to its first touch (u32) |
//! | 40 + 12 `n` | 8 | checksum: 64-bit FNV-1a of every byte before it |
//!
//! A file is refused as a whole ([`WorkingSetError`]) when it is short,
//! long, of another format or version, corrupt (checksum), or holds an
//! address that is not page-aligned, lies past its image, or comes twice;
//! and when it belongs to another image (size or fingerprint differ).
//! Whoever restores then goes on without replay: a working set only ever
//! makes a restore faster, never wrong (a replay installs what the page
//! source holds, never what the file says).
//!
//! [`WorkingSet::save`] writes a temporary file beside the target and
//! renames it over the target, so VMs saving the same set at once leave
//! one whole file, never a mix.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use thiserror::Error;

use crate::ram::{GuestAddress, GuestRam};
use crate::source::{PageSource, SourceError};
use crate::uffd::PAGE_SIZE;

const MAGIC: &[u8; 8] = b"APFWSET2";
const VERSION: u32 = 2;
const HEADER: usize = 40;
const ENTRY: usize = 12;
const CHECKSUM: usize = 8;

/// Pages of the image sampled by [`ImageId::of`].
const SAMPLES: u64 = 16;

/// Errors reading or writing a working-set file.
#[derive(Debug, Error)]
pub enum WorkingSetError {
    /// The file could not be read or written.
    #[error("working-set file I/O failed")]
    Io(#[from] io::Error),
    /// The file is not a working set this engine reads.
    #[error("not a working-set file: {0}")]
    Format(String),
    /// The checksum does not match: the file was damaged or cut short.
    #[error("working-set file is corrupt (checksum mismatch)")]
    Corrupt,
    /// The file was recorded against another image.
    #[error(
        "working set belongs to another image: recorded for {recorded_size} bytes (fingerprint {recorded:#018x}), \
         this image has {size} bytes (fingerprint {fingerprint:#018x})"
    )]
    OtherImage {
        /// The image size the file names.
        recorded_size: u64,
        /// The fingerprint the file names.
        recorded: u64,
        /// This image's size.
        size: u64,
        /// This image's fingerprint.
        fingerprint: u64,
    },
    /// Reading the image to fingerprint it failed.
    #[error("reading the image to fingerprint it failed")]
    Source(#[from] SourceError),
}

/// What binds a working set to its image: the image's size and a hash of
/// sampled pages of it (the first and last page, and 14 spread evenly
/// between). Two images that differ only in pages nobody sampled share
/// an id: a replay of the wrong set then costs time, never correctness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageId {
    /// The image's extent: one past the last guest-physical byte of its
    /// RAM (its size in bytes when RAM starts at 0 with no hole).
    pub size: u64,
    /// FNV-1a of the sampled pages.
    pub fingerprint: u64,
}

impl ImageId {
    /// The id of the image `source` fills guest RAM `ram` from.
    pub fn of(source: &dyn PageSource, ram: &GuestRam) -> Result<ImageId, SourceError> {
        let pages = ram.pages() as u64;
        let mut hash = Fnv::new();
        let mut buf = vec![0u8; PAGE_SIZE];
        let mut seen = None;
        for k in 0..SAMPLES.min(pages) {
            let index = if SAMPLES.min(pages) == 1 { 0 } else { k * (pages - 1) / (SAMPLES.min(pages) - 1) };
            if seen == Some(index) {
                continue;
            }
            seen = Some(index);
            let gpa = gpa_of(ram, index as usize);
            source.fill(gpa, &mut buf)?;
            hash.write(&gpa.0.to_le_bytes());
            hash.write(&buf);
        }
        let size = ram.regions().iter().map(|r| r.base().0 + r.len()).max().unwrap_or(0);
        Ok(ImageId { size, fingerprint: hash.finish() })
    }
}

/// The guest address of the `index`th page of `ram`.
fn gpa_of(ram: &GuestRam, mut index: usize) -> GuestAddress {
    for region in ram.regions() {
        if index < region.pages() {
            return region.page_gpa(index);
        }
        index -= region.pages();
    }
    GuestAddress(0)
}

/// The guest pages one run touched first, in order. Recorded by an engine
/// with [`Config::record_working_set`](crate::Config::record_working_set)
/// ([`crate::Engine::working_set`]) and replayed by a later one
/// ([`crate::Engine::replay`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkingSet {
    /// Page-aligned guest-physical addresses, in first-touch order, each
    /// once.
    pub pages: Vec<u64>,
    /// For each page of `pages`, milliseconds from the start of the
    /// recording to its first touch; empty when not known.
    pub at_ms: Vec<u32>,
}

impl WorkingSet {
    /// The set as a file's bytes (see the module doc), bound to `image`.
    pub fn encode(&self, image: ImageId) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + ENTRY * self.pages.len() + CHECKSUM);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        out.extend_from_slice(&image.size.to_le_bytes());
        out.extend_from_slice(&image.fingerprint.to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        for (i, page) in self.pages.iter().enumerate() {
            out.extend_from_slice(&page.to_le_bytes());
            out.extend_from_slice(&self.at_ms.get(i).copied().unwrap_or(0).to_le_bytes());
        }
        let sum = fnv(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Reads a set from a file's bytes, with the image it names. Checks
    /// everything but the image (see [`Self::decode_for`]).
    pub fn decode(bytes: &[u8]) -> Result<(WorkingSet, ImageId), WorkingSetError> {
        let format = |why: &str| WorkingSetError::Format(why.to_string());
        if bytes.len() < HEADER + CHECKSUM {
            return Err(format("shorter than a header"));
        }
        if &bytes[..8] != MAGIC {
            return Err(format("bad magic"));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
        if u32_at(8) != VERSION {
            return Err(WorkingSetError::Format(format!("format version {} (this engine reads {VERSION})", u32_at(8))));
        }
        if u32_at(12) as usize != PAGE_SIZE {
            return Err(WorkingSetError::Format(format!("page size {} (expected {PAGE_SIZE})", u32_at(12))));
        }
        let image = ImageId { size: u64_at(16), fingerprint: u64_at(24) };
        let count = u64_at(32);
        let expected = usize::try_from(count)
            .ok()
            .and_then(|n| n.checked_mul(ENTRY))
            .and_then(|n| n.checked_add(HEADER + CHECKSUM));
        if expected != Some(bytes.len()) {
            return Err(WorkingSetError::Format(format!("{} bytes for {count} pages", bytes.len())));
        }
        let body = bytes.len() - CHECKSUM;
        if fnv(&bytes[..body]) != u64_at(body) {
            return Err(WorkingSetError::Corrupt);
        }
        let n = count as usize;
        if count > image.size / PAGE_SIZE as u64 {
            return Err(WorkingSetError::Format(format!("{count} pages in an image of {} bytes", image.size)));
        }
        let mut ws = WorkingSet { pages: Vec::with_capacity(n), at_ms: Vec::with_capacity(n) };
        let mut seen = std::collections::HashSet::with_capacity(n);
        for i in 0..n {
            let at = HEADER + i * ENTRY;
            let gpa = u64_at(at);
            if gpa % PAGE_SIZE as u64 != 0 || gpa >= image.size {
                return Err(WorkingSetError::Format(format!("page {i} at {gpa:#x} is not a page of the image")));
            }
            if !seen.insert(gpa) {
                return Err(WorkingSetError::Format(format!("page {gpa:#x} comes twice")));
            }
            ws.pages.push(gpa);
            ws.at_ms.push(u32_at(at + 8));
        }
        Ok((ws, image))
    }

    /// [`Self::decode`], refusing a set recorded for another image.
    pub fn decode_for(bytes: &[u8], image: ImageId) -> Result<WorkingSet, WorkingSetError> {
        let (ws, recorded) = Self::decode(bytes)?;
        if recorded != image {
            return Err(WorkingSetError::OtherImage {
                recorded_size: recorded.size,
                recorded: recorded.fingerprint,
                size: image.size,
                fingerprint: image.fingerprint,
            });
        }
        Ok(ws)
    }

    /// Writes the set to `path`, bound to `image`: into a temporary file
    /// beside it, flushed, then renamed over `path`.
    pub fn save(&self, path: impl AsRef<Path>, image: ImageId) -> Result<(), WorkingSetError> {
        let path = path.as_ref();
        let name = path.file_name().ok_or_else(|| WorkingSetError::Format("no file name".into()))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.{:?}.tmp", std::process::id(), std::thread::current().id()));
        let tmp = path.with_file_name(tmp_name);
        let write = || -> io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&self.encode(image))?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            WorkingSetError::Io(e)
        })
    }

    /// This set, then the pages of `later` it does not hold, in their
    /// order. What a run that replayed this set and recorded `later` saves:
    /// pages the replay installed before the guest touched them never
    /// faulted, so `later` lacks them, and a set saved from it alone would
    /// lose them and shrink from one restore to the next.
    pub fn then(&self, later: &WorkingSet) -> WorkingSet {
        let mut seen: std::collections::HashSet<u64> = self.pages.iter().copied().collect();
        let mut out = self.clone();
        if out.at_ms.len() != out.pages.len() {
            out.at_ms = vec![0; out.pages.len()];
        }
        for (i, &page) in later.pages.iter().enumerate() {
            if seen.insert(page) {
                out.pages.push(page);
                out.at_ms.push(later.at_ms.get(i).copied().unwrap_or(0));
            }
        }
        out
    }

    /// The pages in the order a replay installs them: in recorded order
    /// by slices of `slice_ms` milliseconds of the recording, and in
    /// address order within each slice, so that pages the guest touched
    /// about together and lie next to each other go in one window, while the
    /// order still follows the guest's. A set without timings (or all
    /// within one slice) comes out in address order.
    pub(crate) fn replay_order(&self, slice_ms: u32) -> Vec<u64> {
        let slice_ms = slice_ms.max(1);
        let slice = |i: usize| self.at_ms.get(i).map_or(0, |&ms| ms / slice_ms);
        let mut order: Vec<(u32, u64)> = self.pages.iter().enumerate().map(|(i, &gpa)| (slice(i), gpa)).collect();
        // Recorded times only grow, but a merged set (`then`) or a file
        // written by hand may not: slices keep the first page's place.
        let mut last = 0;
        for entry in order.iter_mut() {
            last = last.max(entry.0);
            entry.0 = last;
        }
        order.sort_by_key(|&(slice, gpa)| (slice, gpa));
        order.into_iter().map(|(_, gpa)| gpa).collect()
    }

    /// Reads the set at `path`, refusing one recorded for another image.
    pub fn load(path: impl AsRef<Path>, image: ImageId) -> Result<WorkingSet, WorkingSetError> {
        Self::decode_for(&fs::read(path)?, image)
    }
}

/// 64-bit FNV-1a.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h = Fnv::new();
    h.write(bytes);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMAGE: ImageId = ImageId { size: 1 << 20, fingerprint: 0x1234 };

    #[test]
    fn a_replayed_set_then_a_recording_keeps_both_once_in_order() {
        let replayed = WorkingSet { pages: vec![0x3000, 0x1000], at_ms: vec![1, 2] };
        let recorded = WorkingSet { pages: vec![0x5000, 0x1000, 0x2000], at_ms: vec![7, 8, 9] };
        let both = replayed.then(&recorded);
        assert_eq!(both.pages, [0x3000, 0x1000, 0x5000, 0x2000]);
        assert_eq!(both.at_ms, [1, 2, 7, 9]);
        let untimed = WorkingSet { pages: vec![0x1000], at_ms: vec![] };
        assert_eq!(untimed.then(&recorded).at_ms, [0, 7, 9], "times stay one per page");
        assert_eq!(WorkingSet::default().then(&recorded), recorded);
        assert_eq!(both.then(&both), both);
        assert!(WorkingSet::decode_for(&both.encode(IMAGE), IMAGE).is_ok(), "a merged set is a valid file");
    }

    #[test]
    fn replay_order_sorts_by_address_within_slices_of_the_recording() {
        let ws = WorkingSet {
            pages: vec![0x9000, 0x2000, 0x5000, 0x1000, 0x8000, 0x3000, 0x4000],
            at_ms: vec![0, 3, 4, 10, 12, 25, 21],
        };
        // Slices of 10 ms: [0, 3, 4], [10, 12], [25, 21] (a time that goes
        // back stays in its predecessor's slice).
        assert_eq!(ws.replay_order(10), [0x2000, 0x5000, 0x9000, 0x1000, 0x8000, 0x3000, 0x4000]);
        assert_eq!(ws.replay_order(100), [0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x8000, 0x9000]);
        assert_eq!(ws.replay_order(1), ws.pages[..5].iter().copied().chain([0x3000, 0x4000]).collect::<Vec<_>>());
        let untimed = WorkingSet { pages: vec![0x3000, 0x1000, 0x2000], at_ms: vec![] };
        assert_eq!(untimed.replay_order(5), [0x1000, 0x2000, 0x3000]);
        let mut once = ws.replay_order(10);
        once.sort_unstable();
        let mut all = ws.pages.clone();
        all.sort_unstable();
        assert_eq!(once, all, "every page once");
    }

    fn set() -> WorkingSet {
        WorkingSet { pages: vec![0x1000, 0x5000, 0x2000], at_ms: vec![0, 3, 9] }
    }

    #[test]
    fn a_set_round_trips_through_its_bytes() {
        let bytes = set().encode(IMAGE);
        assert_eq!(bytes.len(), HEADER + 3 * ENTRY + CHECKSUM);
        assert_eq!(WorkingSet::decode_for(&bytes, IMAGE).unwrap(), set());
    }

    #[test]
    fn damaged_short_long_foreign_and_other_image_files_are_refused() {
        let bytes = set().encode(IMAGE);
        let mut flipped = bytes.clone();
        flipped[HEADER + 2] ^= 1;
        assert!(matches!(WorkingSet::decode(&flipped), Err(WorkingSetError::Corrupt)));
        assert!(matches!(WorkingSet::decode(&bytes[..bytes.len() - 1]), Err(WorkingSetError::Format(_))));
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(WorkingSet::decode(&long), Err(WorkingSetError::Format(_))));
        assert!(matches!(WorkingSet::decode(b"APFWSET1\0\0\0\0"), Err(WorkingSetError::Format(_))));
        let mut v3 = bytes.clone();
        v3[8] = 3;
        assert!(WorkingSet::decode(&v3).unwrap_err().to_string().contains("version 3"));
        let other = ImageId { fingerprint: 0x4321, ..IMAGE };
        assert!(matches!(WorkingSet::decode_for(&bytes, other), Err(WorkingSetError::OtherImage { .. })));
    }

    #[test]
    fn addresses_outside_the_image_unaligned_or_repeated_are_refused() {
        for pages in [vec![1 << 20], vec![0x1001], vec![0x1000, 0x1000]] {
            let ws = WorkingSet { at_ms: vec![0; pages.len()], pages };
            let err = WorkingSet::decode(&ws.encode(IMAGE)).unwrap_err();
            assert!(matches!(err, WorkingSetError::Format(_)), "{err}");
        }
    }

    #[test]
    fn saving_replaces_the_file_whole() {
        let dir = std::env::temp_dir().join(format!("apf-ws-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ws");
        fs::write(&path, b"an older, longer file that must not leave a tail").unwrap();
        set().save(&path, IMAGE).unwrap();
        assert_eq!(WorkingSet::load(&path, IMAGE).unwrap(), set());
        let left: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("ws")], "a temporary file was left behind");
        fs::remove_dir_all(&dir).unwrap();
    }
}
