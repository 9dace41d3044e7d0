//! A memory image: guest RAM's contents in a memfd loaded once from a
//! snapshot file (or a file already on tmpfs, used in place), which any
//! number of guests map private and share until they write; and the page
//! source that reads it.
//!
//! A loaded image is sealed (no resize; no write, where the kernel grants
//! it), so the guests mapping it cannot change what the others see, and
//! its all-zero pages are left as holes, which cost no memory and read as zeros. After loading from a
//! regular file, that file's page cache is dropped: the image is the one
//! copy kept in memory.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::FileOffset;

use crate::ram::{GuestAddress, GuestRange};
use crate::source::{PageSource, SourceError, SourceKind};
use crate::uffd::PAGE_SIZE;

/// `TMPFS_MAGIC` from <linux/magic.h>: a file there lives in the page
/// cache already, as a memfd's pages do.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Bytes read at a time while loading.
const LOAD_CHUNK: usize = 2 << 20;

/// Errors loading or mapping an image.
#[derive(Debug, Error)]
pub enum ImageError {
    /// The snapshot file could not be opened or read.
    #[error("cannot read image file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Making, filling or sealing the memfd failed.
    #[error("cannot make the image's memfd ({what})")]
    Memfd {
        /// The step that failed.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The image is empty.
    #[error("image file {0} is empty")]
    Empty(PathBuf),
}

/// A sealed memfd (or a tmpfs file) holding guest RAM's contents. See the
/// module documentation.
///
/// ```
/// # use std::io::Write;
/// let dir = std::env::temp_dir().join(format!("apf-image-doc-{}", std::process::id()));
/// std::fs::write(&dir, vec![7u8; 8192])?;
/// let image = apf::Image::load(&dir)?;
/// assert_eq!(image.len(), 8192);
/// # std::fs::remove_file(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Image {
    path: PathBuf,
    file: Arc<File>,
    /// Where the image starts in `file` (0 for a loaded memfd).
    base: u64,
    len: u64,
    /// The whole image mapped read-only and shared: what write faults copy
    /// from (its resident pages only; holes are read with `pread`, which
    /// allocates nothing).
    view: MmapRegion,
    load_time: Option<Duration>,
    /// The memfd refuses writes (`F_SEAL_WRITE`).
    write_sealed: std::sync::atomic::AtomicBool,
}

/// Seals a freshly loaded memfd: never resized (a mapping past its end
/// would get SIGBUS), and never written if the kernel agrees. It refuses
/// `F_SEAL_WRITE` with `EBUSY` while it sees a page referenced beyond the
/// page cache (briefly isolated by compaction or reclaim, say) after
/// waiting about 150 ms; the write seal is then tried twice more and, failing that,
/// left off: nothing in this process writes the image, and it is handed to
/// others read-only. Returns whether the write seal is on.
fn seal(memfd: &File) -> Result<bool, ImageError> {
    let size = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    for _ in 0..3 {
        // SAFETY: F_ADD_SEALS on a memfd the caller made; it only forbids
        // later writes and resizes.
        if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, size | libc::F_SEAL_WRITE) } == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(ImageError::Memfd { what: "seal", source: err });
        }
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, size) } < 0 {
        return Err(ImageError::Memfd { what: "seal", source: io::Error::last_os_error() });
    }
    tracing::warn!(target: "apf", "the image's memfd is sealed against resizing only (F_SEAL_WRITE: EBUSY)");
    Ok(false)
}

impl Image {
    /// Loads the image at `path`: a file on tmpfs is used in place
    /// (nothing is copied; nothing stops another process writing it, so
    /// keep it read-only); any other file is copied once into a sealed
    /// memfd, its all-zero pages left as holes, and its own page cache
    /// dropped afterwards.
    pub fn load(path: impl AsRef<Path>) -> Result<Arc<Image>, ImageError> {
        Self::load_range(path, 0, None)
    }

    /// [`Image::load`] of the `len` bytes at `offset` of the file (to its
    /// end if `None`): guest RAM inside a snapshot file with a header. A
    /// tmpfs file is used in place if `offset` is page-aligned.
    pub fn load_range(path: impl AsRef<Path>, offset: u64, len: Option<u64>) -> Result<Arc<Image>, ImageError> {
        let path = path.as_ref().to_path_buf();
        let read_err = |source| ImageError::Read { path: path.clone(), source };
        let src = File::open(&path).map_err(read_err)?;
        let size = src.metadata().map_err(read_err)?.len();
        let len = len.unwrap_or(size.saturating_sub(offset));
        if len == 0 {
            return Err(ImageError::Empty(path));
        }
        if offset.checked_add(len).is_none_or(|end| end > size) {
            let short = io::Error::new(io::ErrorKind::UnexpectedEof, format!("{size} bytes, not {offset} + {len}"));
            return Err(read_err(short));
        }
        if offset % PAGE_SIZE as u64 == 0 && on_tmpfs(&src).map_err(read_err)? {
            return Self::new(path, src, offset, len, None);
        }
        let started = Instant::now();
        let memfd = memfd("apf-image")?;
        memfd.set_len(len).map_err(|source| ImageError::Memfd { what: "ftruncate", source })?;
        let mut buf = vec![0u8; LOAD_CHUNK];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(LOAD_CHUNK as u64) as usize;
            src.read_exact_at(&mut buf[..n], offset + off).map_err(read_err)?;
            // Zero pages stay holes: no memory, zeros when read. The other
            // pages go in as runs, one write each.
            let data = |i: usize| buf[i * PAGE_SIZE..((i + 1) * PAGE_SIZE).min(n)].iter().any(|&b| b != 0);
            for (a, b) in crate::ram::runs(n.div_ceil(PAGE_SIZE), data) {
                let bytes = &buf[a * PAGE_SIZE..(b * PAGE_SIZE).min(n)];
                let at = off + (a * PAGE_SIZE) as u64;
                memfd.write_all_at(bytes, at).map_err(|source| ImageError::Memfd { what: "write", source })?;
            }
            off += n as u64;
        }
        let write_sealed = seal(&memfd)?;
        // The image is the copy kept in memory; the file's pages would be a
        // second one. Advice only: a failure costs memory, not correctness.
        // SAFETY: posix_fadvise reads nothing from this process's memory.
        let _ = unsafe { libc::posix_fadvise(src.as_raw_fd(), offset as i64, len as i64, libc::POSIX_FADV_DONTNEED) };
        let image = Self::new(path, memfd, 0, len, Some(started.elapsed()))?;
        image.write_sealed.store(write_sealed, std::sync::atomic::Ordering::Relaxed);
        Ok(image)
    }

    /// The `len` bytes at `offset` (page-aligned) of the file itself, on
    /// whatever filesystem, nothing loaded: what a guest mapping it private
    /// with no userfaultfd at all gets (the kernel's own file-backed
    /// restore), for comparison. Nothing stops another process writing
    /// the file.
    pub fn in_place(path: impl AsRef<Path>, offset: u64, len: u64) -> Result<Arc<Image>, ImageError> {
        let path = path.as_ref().to_path_buf();
        let read_err = |source| ImageError::Read { path: path.clone(), source };
        let src = File::open(&path).map_err(read_err)?;
        let size = src.metadata().map_err(read_err)?.len();
        if len == 0 {
            return Err(ImageError::Empty(path));
        }
        if offset % PAGE_SIZE as u64 != 0 || offset.checked_add(len).is_none_or(|end| end > size) {
            let bad = io::Error::new(io::ErrorKind::InvalidInput, format!("{size} bytes, not {offset} + {len} (page-aligned)"));
            return Err(read_err(bad));
        }
        Self::new(path, src, offset, len, None)
    }

    fn new(path: PathBuf, file: File, base: u64, len: u64, load_time: Option<Duration>) -> Result<Arc<Image>, ImageError> {
        let file = Arc::new(file);
        let view = MmapRegionBuilder::new(len as usize)
            .with_file_offset(FileOffset::from_arc(file.clone(), base))
            .with_mmap_prot(libc::PROT_READ)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .map_err(|e| ImageError::Memfd { what: "mmap", source: crate::ram::mmap_error(e) })?;
        let write_sealed = std::sync::atomic::AtomicBool::new(false);
        Ok(Arc::new(Image { path, file, base, len, view, load_time, write_sealed }))
    }

    /// Where the image starts in its file.
    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    /// Bytes in the image.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never true: an empty file is refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How long loading took (`None`: a tmpfs file used in place).
    pub fn load_time(&self) -> Option<Duration> {
        self.load_time
    }

    /// Whether the image refuses writes (a loaded image, unless the kernel
    /// refused the write seal; see [`Image::load`]).
    pub fn is_write_sealed(&self) -> bool {
        self.write_sealed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The descriptor, for a guest in another process to map private: a
    /// loaded image is sealed, so it cannot write it
    /// ([`Image::is_write_sealed`]).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    pub(crate) fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Bytes of the image in the page cache (its memory cost).
    pub fn resident_bytes(&self) -> io::Result<u64> {
        let runs = cache_runs(&self.file, self.base, self.len)?;
        let pages = self.len.div_ceil(PAGE_SIZE as u64) as usize;
        let mut answers = vec![0u8; pages];
        // SAFETY: mincore writes one byte per page of the view, which is
        // mapped for `len` bytes, into `answers`, which has that many.
        let ret = unsafe { libc::mincore(self.view.as_ptr().cast(), self.len as usize, answers.as_mut_ptr()) };
        if ret < 0 {
            // Fall back on the data runs: what is not a hole is in memory.
            return Ok(runs.iter().filter(|r| r.2).map(|r| r.1 - r.0).sum());
        }
        Ok(answers.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE_SIZE as u64)
    }
}

/// The image as the page source of one guest's RAM: guest regions stored
/// back to back from offset 0, in guest-address order (as
/// [`crate::SnapshotFile::open`] lays them out).
#[derive(Debug)]
pub(crate) struct ImageSource {
    image: Arc<Image>,
    layout: Vec<(GuestRange, u64)>,
}

impl ImageSource {
    pub(crate) fn new(image: Arc<Image>, layout: Vec<(GuestRange, u64)>) -> ImageSource {
        ImageSource { image, layout }
    }

    pub(crate) fn image(&self) -> &Arc<Image> {
        &self.image
    }

    fn offset_of(&self, gpa: GuestAddress, len: usize) -> Option<u64> {
        self.layout.iter().find_map(|(r, off)| {
            let inside = gpa.0 >= r.start.0 && gpa.0.checked_add(len as u64).is_some_and(|end| end <= r.end());
            inside.then(|| off + (gpa.0 - r.start.0))
        })
    }
}

impl PageSource for ImageSource {
    fn fill(&self, gpa: GuestAddress, buf: &mut [u8]) -> Result<(), SourceError> {
        let off =
            self.offset_of(gpa, buf.len()).ok_or(SourceError::NotCovered(GuestRange::new(gpa, buf.len() as u64)))?;
        // `pread` of a hole gives zeros and allocates nothing.
        self.image.file.read_exact_at(buf, self.image.base + off).map_err(|source| SourceError::Io { gpa, len: buf.len(), source })
    }

    fn resident(&self, gpa: GuestAddress, len: usize) -> Option<*const u8> {
        let off = self.offset_of(gpa, len)?;
        (off + len as u64 <= self.image.len).then(|| self.image.view.as_ptr().wrapping_add(off as usize).cast_const())
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Memory
    }

    fn name(&self) -> &'static str {
        "image"
    }
}

/// Whether `file` lives on tmpfs.
fn on_tmpfs(file: &File) -> io::Result<bool> {
    // SAFETY: fstatfs writes one statfs, which lives on this frame.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the descriptor is open.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == TMPFS_MAGIC)
}

/// A fresh memfd that can be sealed.
pub(crate) fn memfd(name: &str) -> Result<File, ImageError> {
    memfd_with(name, libc::MFD_ALLOW_SEALING)
}

/// A fresh memfd made with `flags` (and `MFD_CLOEXEC`).
pub(crate) fn memfd_with(name: &str, flags: libc::c_uint) -> Result<File, ImageError> {
    let cname = std::ffi::CString::new(name).unwrap_or_default();
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new
    // descriptor, which this function owns from here.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(ImageError::Memfd { what: "memfd_create", source: io::Error::last_os_error() });
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The runs of `[off, off + len)` in `file` that hold data (`true`) or are
/// holes (`false`), as `(start, end, data)`, asked of the kernel with
/// `SEEK_DATA`/`SEEK_HOLE`: for shared memory, the page cache is the truth
/// about what a page holds.
pub(crate) fn cache_runs(file: &File, off: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
    let end = off + len;
    let mut out = Vec::new();
    let mut at = off;
    while at < end {
        let data = seek(file, at, libc::SEEK_DATA)?.unwrap_or(end).min(end);
        if data > at {
            out.push((at, data, false));
            at = data;
            continue;
        }
        let hole = seek(file, at, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        out.push((at, hole, true));
        at = hole;
    }
    Ok(out)
}

/// `lseek(file, at, whence)`; `None` for `ENXIO` (no data past `at`).
fn seek(file: &File, at: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: lseek with SEEK_DATA/SEEK_HOLE only reads the file's extent
    // map. The descriptor's offset moves, which nothing here relies on
    // (every read and write is positioned).
    let ret = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, whence) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(err) };
    }
    Ok(Some(ret as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Says a test checked nothing here, on stderr and in the file
    /// `APF_SKIP_LOG` names (CI counts them).
    fn skipped(why: &str) {
        eprintln!("skipped: {why}");
        if let Some(path) = std::env::var_os("APF_SKIP_LOG") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new().append(true).create(true).open(path) {
                let _ = writeln!(f, "image: {why}");
            }
        }
    }

    fn temp(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("apf-image-{name}-{}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn a_loaded_image_keeps_zero_pages_as_holes_and_is_sealed() {
        let mut bytes = vec![0u8; 4 * PAGE_SIZE];
        bytes[PAGE_SIZE + 5] = 1;
        bytes[3 * PAGE_SIZE] = 2;
        let path = temp("holes", &bytes);
        if on_tmpfs(&File::open(&path).unwrap()).unwrap() {
            skipped("the temporary directory is on tmpfs, where images are used in place");
            return;
        }
        let image = Image::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(image.load_time().is_some(), "a regular file is copied");
        let p = PAGE_SIZE as u64;
        assert_eq!(
            cache_runs(image.file(), 0, 4 * p).unwrap(),
            vec![(0, p, false), (p, 2 * p, true), (2 * p, 3 * p, false), (3 * p, 4 * p, true)]
        );
        assert_eq!(image.resident_bytes().unwrap(), 2 * p);
        // Sealed: nobody resizes it, nobody writes it (where the kernel
        // granted the write seal).
        assert_eq!(image.file().write_all_at(&[9], 0).is_err(), image.is_write_sealed());
        assert!(image.file().set_len(8 * p).is_err());
        let source = ImageSource::new(image.clone(), vec![(GuestRange::new(GuestAddress(0x10_0000), 4 * p), 0)]);
        let mut buf = vec![0xffu8; 2 * PAGE_SIZE];
        source.fill(GuestAddress(0x10_0000), &mut buf).unwrap();
        assert_eq!(&buf[..], &bytes[..2 * PAGE_SIZE]);
        assert!(matches!(source.fill(GuestAddress(0), &mut buf), Err(SourceError::NotCovered(_))));
        assert!(source.resident(GuestAddress(0x10_0000 + 3 * p), PAGE_SIZE).is_some());
        assert!(source.resident(GuestAddress(0x10_0000 + 3 * p), 2 * PAGE_SIZE).is_none());
    }

    #[test]
    fn a_tmpfs_file_is_used_in_place_and_an_empty_one_refused() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            skipped("no /dev/shm on this machine");
            return;
        }
        let path = shm.join(format!("apf-image-tmpfs-{}", std::process::id()));
        std::fs::write(&path, vec![3u8; PAGE_SIZE]).unwrap();
        let image = Image::load(&path).unwrap();
        assert_eq!(image.load_time(), None, "nothing is loaded from tmpfs");
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(Image::load(&path), Err(ImageError::Empty(_))));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(Image::load(&path), Err(ImageError::Read { .. })));
    }
}
