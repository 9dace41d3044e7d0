//! Restoring a snapshot image on the host: the kernel mapping the file
//! `MAP_PRIVATE` with no userfaultfd (`kernel-file`, what Firecracker's
//! File backend and Cloud Hypervisor's mmap restore do), apf copying from
//! the file into anonymous memory (`apf-copy`), and apf mapping a loaded
//! [`Image`] private, reads by `UFFDIO_CONTINUE` in place and first writes
//! by a private `UFFDIO_COPY` (`apf-zero-copy`); the two apf paths again
//! over 2 MiB huge pages (`apf-copy-hugetlb`, `apf-zero-copy-hugetlb`). Two
//! threads touch every page once: reads, first writes, or a read then a
//! write of each page; in order or in a keyed random order. And what 4
//! clones of one image cost in memory after a read pass.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_proto::permute;
use apf::{Engine, GuestAddress, GuestRam, Image, Pattern, SnapshotFile};

use crate::report::Sample;
use crate::{percentile, PAGE};

/// Who restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restorer {
    /// The file mapped `MAP_PRIVATE`, no userfaultfd.
    KernelFile,
    /// apf over anonymous memory, `UFFDIO_COPY` from the file.
    ApfCopy,
    /// apf over the loaded image mapped private.
    ApfZeroCopy,
    /// apf over private anonymous 2 MiB huge pages (`MAP_HUGETLB`),
    /// `UFFDIO_COPY` from the file of whole huge pages.
    ApfCopyHugetlb,
    /// apf over an image loaded into 2 MiB huge pages
    /// ([`Image::load_hugetlb`]) mapped private: a fault maps whole huge
    /// pages of the image in place, and on a first write the kernel's
    /// copy-on-write then copies the page.
    ApfZeroCopyHugetlb,
}

impl Restorer {
    /// Every restorer, in the order each round runs them.
    pub const ALL: [Restorer; 5] = [
        Restorer::KernelFile,
        Restorer::ApfCopy,
        Restorer::ApfZeroCopy,
        Restorer::ApfCopyHugetlb,
        Restorer::ApfZeroCopyHugetlb,
    ];

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Restorer::KernelFile => "kernel-file",
            Restorer::ApfCopy => "apf-copy",
            Restorer::ApfZeroCopy => "apf-zero-copy",
            Restorer::ApfCopyHugetlb => "apf-copy-hugetlb",
            Restorer::ApfZeroCopyHugetlb => "apf-zero-copy-hugetlb",
        }
    }
}

/// What the threads do to each page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read the first word.
    Read,
    /// Write the first word (the page's first touch is a write).
    Write,
    /// Read the first word, then write it.
    ReadThenWrite,
}

impl Access {
    /// Its name in workload names and the report.
    pub fn name(self) -> &'static str {
        match self {
            Access::Read => "reads",
            Access::Write => "writes",
            Access::ReadThenWrite => "read-writes",
        }
    }
}

/// The file mapped `MAP_PRIVATE`, unmapped on drop.
struct FileMapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl FileMapping {
    fn new(file: &std::fs::File, len: usize) -> Result<FileMapping, String> {
        // SAFETY: a fresh private mapping of an open file, aliasing nothing
        // this process references; it is unmapped only on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap of the image: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: THP policy advice on the mapping just made.
        unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
        Ok(FileMapping { ptr, len })
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, referenced by nothing now.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// The images loaded from the snapshot file for one round: 4 KiB pages,
/// and 2 MiB huge pages (`None` without huge pages).
#[derive(Debug)]
pub struct Images {
    /// [`Image::load`].
    pub small: Arc<Image>,
    /// [`Image::load_hugetlb`].
    pub huge: Option<Arc<Image>>,
}

/// One pass: two threads touch every page of `bytes` restored from
/// `path` (written with `Pattern { seed: 1 }` at offset = address), or
/// from `images` (loaded from it) for the zero-copy restorers.
pub fn restore_pass(
    restorer: Restorer,
    access: Access,
    random: bool,
    path: &Path,
    images: &Images,
    bytes: u64,
    seed: u64,
) -> Result<Sample, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let ranges = [(GuestAddress(0), bytes as usize)];
    let mut _engine = None;
    let mut _mapping = None;
    let mut ram = None;
    let base = match restorer {
        Restorer::KernelFile => {
            let file = std::fs::File::open(path).map_err(|e| err(&e))?;
            let m = FileMapping::new(&file, bytes as usize)?;
            let base = m.ptr as usize;
            _mapping = Some(m);
            base
        }
        Restorer::ApfCopy | Restorer::ApfCopyHugetlb => {
            let r = match restorer {
                Restorer::ApfCopy => GuestRam::anonymous(&ranges),
                _ => GuestRam::anonymous_hugetlb(&ranges, false),
            };
            let r = Arc::new(r.map_err(|e| err(&e))?);
            let source = Arc::new(SnapshotFile::open(path, &r).map_err(|e| err(&e))?);
            let none = tracing::Dispatch::none();
            let b = Engine::builder(r.clone(), source);
            _engine = Some(tracing::dispatcher::with_default(&none, || b.start()).map_err(|e| err(&e))?);
            ram = Some(r);
            ram.as_ref().map_or(0, |r| r.regions()[0].host_base() as usize)
        }
        Restorer::ApfZeroCopy | Restorer::ApfZeroCopyHugetlb => {
            let image = match restorer {
                Restorer::ApfZeroCopy => &images.small,
                _ => images.huge.as_ref().ok_or("no huge-page image (no huge pages reserved)")?,
            };
            let r = Arc::new(GuestRam::image(&ranges, image.clone()).map_err(|e| err(&e))?);
            let source = r.image_source().ok_or("image RAM has an image source")?;
            let none = tracing::Dispatch::none();
            let b = Engine::builder(r.clone(), source);
            _engine = Some(tracing::dispatcher::with_default(&none, || b.start()).map_err(|e| err(&e))?);
            ram = Some(r);
            ram.as_ref().map_or(0, |r| r.regions()[0].host_base() as usize)
        }
    };
    let pages = bytes / PAGE;
    let (seconds, mut lat) = touch(base, pages, access, random, seed);
    // Check what the threads saw: the first word of every page.
    let pattern = Pattern { seed: 1 };
    let per = pages / 2;
    for p in 0..per * 2 {
        // SAFETY: page `p` of the mapping, present after the pass (a
        // restorer's engine still serves it if not).
        let word = unsafe { std::ptr::read_volatile((base + (p * PAGE) as usize) as *const u64) };
        let want = if access == Access::Read { pattern.word_at(p * PAGE, 0) } else { p };
        if word != want {
            return Err(format!("{}: page {p} holds {word:#x}", restorer.name()));
        }
    }
    drop(ram);
    lat.sort_unstable();
    let latency = Some((Duration::from_nanos(percentile(&lat, 0.5)), Duration::from_nanos(percentile(&lat, 0.99))));
    Ok(Sample { pages: per * 2, seconds, latency })
}

/// Two threads, each over its half of `pages` pages at `base` (mapped for
/// the whole pass), in order or in a keyed random order; returns the
/// seconds taken and every page's first-access latency in nanoseconds.
pub(crate) fn touch(base: usize, pages: u64, access: Access, random: bool, seed: u64) -> (f64, Vec<u64>) {
    let per = pages / 2;
    let start = Instant::now();
    let lat: Vec<Vec<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2u64)
            .map(|t| {
                s.spawn(move || {
                    let mut lat = Vec::with_capacity(per as usize);
                    let mut sum = 0u64;
                    for i in 0..per {
                        let p = t * per + if random { permute(i, per, seed ^ t) } else { i };
                        let addr = (base + (p * PAGE) as usize) as *mut u64;
                        let t0 = Instant::now();
                        // SAFETY (each access): `addr` is the first word of
                        // page `p` of a mapping alive for the whole pass; its
                        // first touch is resolved by the kernel or the engine.
                        match access {
                            // SAFETY: see above.
                            Access::Read => sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(addr) }),
                            // SAFETY: see above.
                            Access::Write => unsafe { std::ptr::write_volatile(addr, p) },
                            Access::ReadThenWrite => {
                                // SAFETY: see above.
                                sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(addr) });
                                // SAFETY: see above.
                                unsafe { std::ptr::write_volatile(addr, p) };
                            }
                        }
                        lat.push(t0.elapsed().as_nanos() as u64);
                    }
                    std::hint::black_box(sum);
                    lat
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
    });
    (start.elapsed().as_secs_f64(), lat.into_iter().flatten().collect())
}

/// Milliseconds to pin `bytes` of present memory (the pin's first `get`,
/// after every page was faulted in by a prefetch), over 4 KiB pages or
/// over 2 MiB huge pages: the median of `rounds`. The huge pages must be
/// reserved by the caller.
pub fn pin_present(bytes: u64, huge: bool, rounds: usize) -> Result<f64, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let ranges = [(GuestAddress(0), bytes as usize)];
    let ram = if huge { GuestRam::anonymous_hugetlb(&ranges, false) } else { GuestRam::anonymous(&ranges) };
    let ram = Arc::new(ram.map_err(|e| err(&e))?);
    let none = tracing::Dispatch::none();
    let b = Engine::builder(ram, Arc::new(apf::ZeroSource));
    let engine = tracing::dispatcher::with_default(&none, || b.start()).map_err(|e| err(&e))?;
    let range = apf::GuestRange::new(GuestAddress(0), bytes);
    engine.prefetch(range).map_err(|e| err(&e))?;
    let deadline = || Instant::now() + Duration::from_secs(60);
    let mut ms = Vec::new();
    for _ in 0..rounds.max(1) {
        let pin = engine.pin(range, |_| {}).map_err(|e| err(&e))?;
        let t = Instant::now();
        let guard = pin.get(deadline()).map_err(|e| err(&e))?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        drop(guard);
    }
    Ok(crate::median(ms))
}

/// The memory of `clones` guests restored from one image after each read
/// every page (zero-copy), over the image's own size: the image's resident
/// pages plus the anonymous memory the clones added.
pub fn clones_memory(image: &Arc<Image>, clones: usize) -> Result<f64, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let bytes = image.len();
    let anon_before = anon_bytes()?;
    let mut guests = Vec::new();
    for _ in 0..clones {
        let ram = Arc::new(GuestRam::image(&[(GuestAddress(0), bytes as usize)], image.clone()).map_err(|e| err(&e))?);
        let source = ram.image_source().ok_or("image RAM has an image source")?;
        let engine = Engine::builder(ram.clone(), source).start().map_err(|e| err(&e))?;
        let base = ram.regions()[0].host_base() as usize;
        touch(base, bytes / PAGE, Access::Read, false, 0);
        guests.push((ram, engine));
    }
    let added = anon_bytes()?.saturating_sub(anon_before);
    let image_bytes = image.resident_bytes().map_err(|e| err(&e))?;
    drop(guests);
    Ok((added + image_bytes) as f64 / bytes as f64)
}

/// This process's anonymous memory (`Anonymous` of `smaps_rollup`).
fn anon_bytes() -> Result<u64, String> {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").map_err(|e| format!("smaps_rollup: {e}"))?;
    let kb = text
        .lines()
        .find_map(|l| l.strip_prefix("Anonymous:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or("no Anonymous line in smaps_rollup")?;
    Ok(kb * 1024)
}

/// Loads the image from `path` (timing it), then reads the file back into
/// the page cache, which loading dropped, so the other restorers find it
/// there as before. With `huge`, also the image in huge pages.
pub fn load_image(path: &Path, huge: bool) -> Result<(Images, Duration), String> {
    let small = Image::load(path).map_err(|e| e.to_string())?;
    let took = small.load_time().unwrap_or_default();
    let huge = if huge { Some(Image::load_hugetlb(path).map_err(|e| format!("huge-page image: {e}"))?) } else { None };
    let _ = std::fs::read(path).map_err(|e| e.to_string())?;
    Ok((Images { small, huge }, took))
}
