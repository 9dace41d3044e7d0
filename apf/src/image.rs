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
use crate::uffd::{HUGE_PAGE_SIZE, PAGE_SIZE};

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
    /// Whether the image is made of 2 MiB huge pages (`MFD_HUGETLB`).
    huge: bool,
    /// For a loaded image, which of its pages hold data (one bit each; the
    /// others are holes, which read as zeros): known from loading, and
    /// fixed, since nobody can write it. `None` for a file used in place,
    /// or a loaded image the kernel would not write-seal.
    data: Option<Vec<u64>>,
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
        let (src, len) = open_range(&path, offset, len)?;
        if offset % PAGE_SIZE as u64 == 0 && on_tmpfs(&src).map_err(|source| ImageError::Read { path: path.clone(), source })? {
            return Self::new(path, src, offset, len, None, false, None);
        }
        let started = Instant::now();
        let memfd = memfd("apf-image")?;
        memfd.set_len(len).map_err(|source| ImageError::Memfd { what: "ftruncate", source })?;
        let mut data = Bits::new(len.div_ceil(PAGE_SIZE as u64) as usize);
        load_chunks(&src, offset, len, PAGE_SIZE, |at, bytes| {
            data.set(at as usize / PAGE_SIZE, bytes.len().div_ceil(PAGE_SIZE));
            memfd.write_all_at(bytes, at).map_err(|source| ImageError::Memfd { what: "write", source })
        })
        .map_err(|e| e.into_image_error(&path))?;
        Self::finish(path, src, memfd, offset, len, started, false, data)
    }

    /// [`Image::load`] into 2 MiB huge pages (a memfd made with
    /// `MFD_HUGETLB`), for guests mapping it over huge pages
    /// ([`GuestRam::image`](crate::GuestRam::image) then makes
    /// [`MemoryKind::HugetlbImage`](crate::MemoryKind::HugetlbImage)):
    /// a read fault maps a whole huge page of the image in place, one
    /// `UFFDIO_CONTINUE` per 2 MiB. The image is rounded up to whole huge
    /// pages (the tail reads zeros); its all-zero huge pages are left as
    /// holes. Its pages come from the huge-page pool (see
    /// [`hugepool`](crate::hugepool)): a pool too small for the image fails
    /// here with [`ImageError::Memfd`] (`fallocate`: `ENOSPC`), nothing
    /// half-loaded kept.
    pub fn load_hugetlb(path: impl AsRef<Path>) -> Result<Arc<Image>, ImageError> {
        Self::load_range_hugetlb(path, 0, None)
    }

    /// [`Image::load_hugetlb`] of the `len` bytes at `offset` of the file
    /// (to its end if `None`): guest RAM inside a snapshot file with a
    /// header.
    pub fn load_range_hugetlb(path: impl AsRef<Path>, offset: u64, len: Option<u64>) -> Result<Arc<Image>, ImageError> {
        let path = path.as_ref().to_path_buf();
        let (src, size) = open_range(&path, offset, len)?;
        let started = Instant::now();
        let len = size.div_ceil(HUGE_PAGE_SIZE as u64) * HUGE_PAGE_SIZE as u64;
        let memfd = memfd_with("apf-image-huge", libc::MFD_ALLOW_SEALING | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB)?;
        memfd.set_len(len).map_err(|source| ImageError::Memfd { what: "ftruncate", source })?;
        // hugetlbfs has no `write`: the data goes in through a shared
        // mapping, over pages allocated first (`fallocate` fails cleanly
        // on a short pool, where a fault would raise SIGBUS), so the
        // mapping reserves nothing itself.
        let map: MmapRegion = MmapRegionBuilder::new(len as usize)
            .with_file_offset(FileOffset::new(memfd.try_clone().map_err(|source| ImageError::Memfd { what: "dup", source })?, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| ImageError::Memfd { what: "mmap", source: crate::ram::mmap_error(e) })?;
        let mut data = Bits::new((len / HUGE_PAGE_SIZE as u64) as usize);
        load_chunks(&src, offset, size, HUGE_PAGE_SIZE, |at, bytes| {
            // SAFETY: fallocate allocates pages of the memfd's range; it
            // reads nothing from this process's memory.
            let ret = unsafe { libc::fallocate(memfd.as_raw_fd(), 0, at as i64, bytes.len().next_multiple_of(HUGE_PAGE_SIZE) as i64) };
            if ret < 0 {
                return Err(ImageError::Memfd { what: "fallocate", source: io::Error::last_os_error() });
            }
            data.set(at as usize / HUGE_PAGE_SIZE, bytes.len().div_ceil(HUGE_PAGE_SIZE));
            // SAFETY: `[at, at + len)` lies inside the mapping (`at + len`
            // is at most the file's size, which `len` rounds up), whose
            // pages were just allocated; nothing else references it.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), map.as_ptr().wrapping_add(at as usize), bytes.len()) };
            Ok(())
        })
        .map_err(|e| e.into_image_error(&path))?;
        drop(map);
        Self::finish(path, src, memfd, offset, size, started, true, data)
    }

    /// Seals a loaded memfd, drops the page cache of the `len` bytes at
    /// `offset` of the source file and maps the view (of `len` bytes,
    /// rounded up to whole huge pages for a huge image).
    #[allow(clippy::too_many_arguments)]
    fn finish(
        path: PathBuf,
        src: File,
        memfd: File,
        offset: u64,
        len: u64,
        started: Instant,
        huge: bool,
        data: Bits,
    ) -> Result<Arc<Image>, ImageError> {
        let write_sealed = seal(&memfd)?;
        // The image is the copy kept in memory; the file's pages would be a
        // second one. Advice only: a failure costs memory, not correctness.
        // SAFETY: posix_fadvise reads nothing from this process's memory.
        let _ = unsafe { libc::posix_fadvise(src.as_raw_fd(), offset as i64, len as i64, libc::POSIX_FADV_DONTNEED) };
        let len = if huge { len.next_multiple_of(HUGE_PAGE_SIZE as u64) } else { len };
        // What loading found stays true only while nobody can write the
        // image: without the write seal the kernel is asked instead.
        let known = write_sealed.then(|| data.0.clone());
        let image = Self::new(path, memfd, 0, len, Some(started.elapsed()), huge, known)?;
        image.write_sealed.store(write_sealed, std::sync::atomic::Ordering::Relaxed);
        if huge {
            // Map the view's data pages (never its holes: a fault there
            // would allocate one): write faults copy from it, and a `COPY`
            // reads its source with page faults disabled.
            let page = HUGE_PAGE_SIZE;
            let pages = (len as usize) / page;
            for (a, b) in crate::ram::runs(pages, |i| data.0[i / 64] >> (i % 64) & 1 != 0) {
                // SAFETY: MADV_POPULATE_READ maps pages of the view, which
                // holds data there; it changes no contents.
                unsafe {
                    libc::madvise(image.view.as_ptr().wrapping_add(a * page).cast(), (b - a) * page, libc::MADV_POPULATE_READ)
                };
            }
        }
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
        Self::new(path, src, offset, len, None, false, None)
    }

    fn new(
        path: PathBuf,
        file: File,
        base: u64,
        len: u64,
        load_time: Option<Duration>,
        huge: bool,
        data: Option<Vec<u64>>,
    ) -> Result<Arc<Image>, ImageError> {
        let file = Arc::new(file);
        // A huge image's view reserves nothing: only its data pages are
        // ever mapped, and they exist.
        let noreserve = if huge { libc::MAP_NORESERVE } else { 0 };
        let view = MmapRegionBuilder::new(len as usize)
            .with_file_offset(FileOffset::from_arc(file.clone(), base))
            .with_mmap_prot(libc::PROT_READ)
            .with_mmap_flags(libc::MAP_SHARED | noreserve)
            .build()
            .map_err(|e| ImageError::Memfd { what: "mmap", source: crate::ram::mmap_error(e) })?;
        let write_sealed = std::sync::atomic::AtomicBool::new(false);
        Ok(Arc::new(Image { path, file, base, len, view, load_time, write_sealed, huge, data }))
    }

    /// Whether the image is made of 2 MiB huge pages
    /// ([`Image::load_hugetlb`]).
    pub fn is_huge(&self) -> bool {
        self.huge
    }

    /// The size of the image's pages.
    pub fn page_size(&self) -> usize {
        if self.huge {
            HUGE_PAGE_SIZE
        } else {
            PAGE_SIZE
        }
    }

    /// Whether the image's page at byte `off` holds data (`false`: a hole,
    /// zeros), as loading found it; `None` when not known (a file used in
    /// place) or past the end.
    pub(crate) fn holds_data(&self, off: u64) -> Option<bool> {
        let data = self.data.as_ref()?;
        let i = (off / self.page_size() as u64) as usize;
        data.get(i / 64).map(|w| w >> (i % 64) & 1 != 0)
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

    /// Whether the image holds data for the guest page at `gpa` (`false`:
    /// a hole, zeros), as loading found it; `None` if not known.
    pub(crate) fn holds_data(&self, gpa: GuestAddress) -> Option<bool> {
        self.image.holds_data(self.offset_of(gpa, 1)?)
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

/// One bit per page.
struct Bits(Vec<u64>);

impl Bits {
    fn new(pages: usize) -> Bits {
        Bits(vec![0; pages.div_ceil(64)])
    }

    /// Sets bits `[first, first + count)`.
    fn set(&mut self, first: usize, count: usize) {
        for i in first..first + count {
            self.0[i / 64] |= 1 << (i % 64);
        }
    }
}

/// Why loading stopped: reading the file, or storing what was read.
enum LoadError {
    Read(io::Error),
    Store(ImageError),
}

impl LoadError {
    fn into_image_error(self, path: &Path) -> ImageError {
        match self {
            LoadError::Read(source) => ImageError::Read { path: path.to_path_buf(), source },
            LoadError::Store(e) => e,
        }
    }
}

/// Reads `len` bytes at `offset` of `src` in chunks and hands `store` each
/// run of pages of `page` bytes that holds data, as (offset from
/// `offset`, bytes); all-zero pages are skipped (holes). A run's last
/// page may be short at the end of the file.
fn load_chunks(
    src: &File,
    offset: u64,
    len: u64,
    page: usize,
    mut store: impl FnMut(u64, &[u8]) -> Result<(), ImageError>,
) -> Result<(), LoadError> {
    let chunk = LOAD_CHUNK.max(page);
    let mut buf = vec![0u8; chunk];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(chunk as u64) as usize;
        src.read_exact_at(&mut buf[..n], offset + off).map_err(LoadError::Read)?;
        let data = |i: usize| buf[i * page..((i + 1) * page).min(n)].iter().any(|&b| b != 0);
        for (a, b) in crate::ram::runs(n.div_ceil(page), data) {
            store(off + (a * page) as u64, &buf[a * page..(b * page).min(n)]).map_err(LoadError::Store)?;
        }
        off += n as u64;
    }
    Ok(())
}

/// Opens `path` for the `len` bytes at `offset` (to its end if `None`):
/// the file and that length, checked to be more than nothing and inside
/// the file.
fn open_range(path: &Path, offset: u64, len: Option<u64>) -> Result<(File, u64), ImageError> {
    let read_err = |source| ImageError::Read { path: path.to_path_buf(), source };
    let src = File::open(path).map_err(read_err)?;
    let size = src.metadata().map_err(read_err)?.len();
    let len = len.unwrap_or(size.saturating_sub(offset));
    if len == 0 {
        return Err(ImageError::Empty(path.to_path_buf()));
    }
    if offset.checked_add(len).is_none_or(|end| end > size) {
        let short = io::Error::new(io::ErrorKind::UnexpectedEof, format!("{size} bytes, not {offset} + {len}"));
        return Err(read_err(short));
    }
    Ok((src, len))
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
