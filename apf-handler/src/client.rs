//! A client that restores memory the way Firecracker does, for tests and
//! benchmarks of a handler without Firecracker.
//!
//! Like Firecracker v1.16 with a `Uffd` memory backend: guest memory is
//! private anonymous (one mapping per region), a userfaultfd is created
//! non-blocking and close-on-exec, without `UFFD_USER_MODE_ONLY` (KVM's
//! faults are kernel-mode), handshaken with `EVENT_REMOVE` alone, and the
//! regions are registered MISSING. It connects, sends the region JSON with
//! the descriptor attached in one message, and keeps the connection and
//! its own copy of the descriptor. Then, as Firecracker's load does, it
//! writes two pages before the "load" returns (their contents unchanged,
//! so they still verify), and as a guest would, it touches every page from
//! several threads, in order or at random, and compares all of memory with
//! the memory file. As a balloon device does, it discards ranges with
//! `MADV_DONTNEED` and checks they read zeros.
//!
//! [`Misbehave`] makes it a bad peer instead, one way at a time.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use linux_raw_sys::general as sys;
use linux_raw_sys::ioctl as nr;
use thiserror::Error;

use crate::handshake::{self, Region};
use crate::peer;

const PAGE: usize = 4096;
const HUGE_PAGE: usize = 2 << 20;

/// Errors of the client.
#[derive(Debug, Error)]
pub enum ClientError {
    /// A system call failed.
    #[error("{what}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// Memory did not hold what the memory file does.
    #[error("page at offset {offset:#x} of the memory file differs from memory")]
    Mismatch {
        /// The page's offset in the file.
        offset: u64,
    },
    /// A discarded page did not read zeros.
    #[error("discarded page at offset {offset:#x} does not read zeros")]
    NotZero {
        /// The page's offset in the file.
        offset: u64,
    },
}

fn sys_err(what: &'static str) -> impl FnOnce(io::Error) -> ClientError {
    move |source| ClientError::Sys { what, source }
}

fn last(what: &'static str) -> ClientError {
    ClientError::Sys { what, source: io::Error::last_os_error() }
}

/// Order of the first pass over memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Each thread reads its stripe of memory in order.
    Seq,
    /// Every page once, in a random order shared out between the threads.
    Random,
}

impl std::str::FromStr for Order {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "seq" => Ok(Order::Seq),
            "random" => Ok(Order::Random),
            other => Err(format!("unknown order {other:?} (expected seq or random)")),
        }
    }
}

/// One way to be a bad peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehave {
    /// Not JSON (with the descriptor).
    Garbage,
    /// More than the handler's limit (with the descriptor).
    Oversized,
    /// Good JSON, no descriptor.
    NoFd,
    /// Good JSON, the descriptor twice.
    TwoFds,
    /// Good JSON, a descriptor that is not a userfaultfd.
    NotUffd,
    /// Overlapping regions (with the descriptor).
    Overlap,
    /// A region past the end of the memory file (with the descriptor).
    OutsideFile,
    /// A page size of 8 KiB (with the descriptor).
    BadPageSize,
    /// 2 MiB pages over a region whose size is not whole huge pages (with
    /// the descriptor).
    HugeMisaligned,
    /// A good handshake, then a second message.
    SendTwice,
    /// Connects and sends nothing.
    Silent,
}

impl Misbehave {
    /// Every case, with its name.
    pub const ALL: [(Misbehave, &'static str); 11] = [
        (Misbehave::Garbage, "garbage"),
        (Misbehave::Oversized, "oversized"),
        (Misbehave::NoFd, "no-fd"),
        (Misbehave::TwoFds, "two-fds"),
        (Misbehave::NotUffd, "not-uffd"),
        (Misbehave::Overlap, "overlap"),
        (Misbehave::OutsideFile, "outside-file"),
        (Misbehave::BadPageSize, "bad-page-size"),
        (Misbehave::HugeMisaligned, "huge-misaligned"),
        (Misbehave::SendTwice, "send-twice"),
        (Misbehave::Silent, "silent"),
    ];

    /// Whether the peer handed over a userfaultfd, so a handler must end
    /// it rather than leave it waiting.
    pub fn hands_over_uffd(self) -> bool {
        !matches!(self, Misbehave::NoFd | Misbehave::NotUffd | Misbehave::Silent)
    }
}

impl std::str::FromStr for Misbehave {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Misbehave::ALL.iter().find(|(_, n)| *n == s).map(|(m, _)| *m).ok_or_else(|| format!("unknown case {s:?}"))
    }
}

/// What the client does.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The handler's socket.
    pub socket: PathBuf,
    /// The memory file (to size memory and verify it).
    pub mem_file: PathBuf,
    /// Regions to split memory into (the file's pages shared out).
    pub regions: usize,
    /// Threads touching memory.
    pub threads: usize,
    /// Order of the first pass.
    pub order: Order,
    /// Discard ranges as a balloon would, and check zeros.
    pub balloon: bool,
    /// Be a bad peer this way instead.
    pub misbehave: Option<Misbehave>,
    /// How long a bad peer waits for the handler to close its connection.
    pub hold: Duration,
    /// No handler: the memory file mapped `MAP_PRIVATE` (Firecracker's
    /// File backend), touched the same way, for comparison.
    pub kernel_file: bool,
    /// Restore in two halves around a gate, for tests of a handler dying
    /// mid-restore: after the load, touch the first pages and discard
    /// ranges as a balloon would (touched ones and untouched ones), create
    /// `GATE.ready`, wait (at most 60 s) for `GATE` to exist, then the
    /// first pass; the discarded ranges must read zeros when verified.
    pub gate: Option<PathBuf>,
    /// Guest memory of 2 MiB huge pages, as Firecracker maps hugetlbfs
    /// guest memory (`MAP_HUGETLB | MAP_NORESERVE`); the memory file must
    /// be whole huge pages, and the balloon discards whole huge pages.
    pub huge: bool,
}

/// What a restore measured.
#[derive(Debug, Clone, Default)]
pub struct ClientReport {
    /// From connecting to the two "device" pages written.
    pub load: Duration,
    /// The first pass: one read per page, from every thread.
    pub first_pass: Duration,
    /// Pages of memory.
    pub pages: u64,
    /// Pages compared with the file.
    pub verified: u64,
    /// Pages discarded and read back as zeros.
    pub balloon_zero: u64,
}

impl ClientReport {
    /// As one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "load_ms": self.load.as_secs_f64() * 1e3,
            "first_pass_ms": self.first_pass.as_secs_f64() * 1e3,
            "pages": self.pages,
            "verified": self.verified,
            "balloon_zero": self.balloon_zero,
        })
    }
}

/// Private anonymous memory, unmapped on drop. Reached only through raw
/// pointers and volatile or kernel accesses, never references: the
/// handler installs pages in it behind the compiler's back.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory reached through raw pointers only;
// threads touch it through volatile reads, which the kernel serialises
// with the handler's installs.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(len: usize, huge: bool) -> Result<Mapping, ClientError> {
        let hugetlb = if huge { libc::MAP_HUGETLB | libc::MAP_HUGE_2MB } else { 0 };
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | hugetlb,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(last("mmap of guest memory"));
        }
        if !huge {
            // SAFETY: THP policy of the mapping just made (Firecracker's
            // 4 KiB guest memory faults in 4 KiB pages).
            unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
        }
        Ok(Mapping { ptr: ptr.cast(), len })
    }

    /// The file mapped private: its pages come from the page cache, and a
    /// write copies one.
    fn file_private(file: &File, len: usize) -> Result<Mapping, ClientError> {
        // SAFETY: a fresh private mapping of the file; no existing memory
        // is affected.
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
            return Err(last("mmap of the memory file"));
        }
        Ok(Mapping { ptr: ptr.cast(), len })
    }

    fn read_word(&self, off: usize) -> u64 {
        assert!(off + 8 <= self.len && off % 8 == 0);
        // SAFETY: inside the mapping, aligned; a missing page faults and
        // waits for the handler.
        unsafe { std::ptr::read_volatile(self.ptr.wrapping_add(off) as *const u64) }
    }

    fn write_word(&self, off: usize, v: u64) {
        assert!(off + 8 <= self.len && off % 8 == 0);
        // SAFETY: as for `read_word`.
        unsafe { std::ptr::write_volatile(self.ptr.wrapping_add(off) as *mut u64, v) }
    }

    fn copy_out(&self, off: usize, buf: &mut [u8]) {
        assert!(off + buf.len() <= self.len);
        // SAFETY: inside the mapping; `buf` is a distinct local buffer.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.wrapping_add(off), buf.as_mut_ptr(), buf.len()) }
    }

    fn discard(&self, off: usize, len: usize) -> Result<(), ClientError> {
        assert!(off + len <= self.len);
        // SAFETY: drops pages of this mapping, which only raw accesses
        // reach; they read zeros (through the handler) afterwards.
        if unsafe { libc::madvise(self.ptr.wrapping_add(off).cast(), len, libc::MADV_DONTNEED) } != 0 {
            return Err(last("madvise(MADV_DONTNEED)"));
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A userfaultfd as Firecracker makes it: non-blocking, close-on-exec,
/// kernel faults included, `EVENT_REMOVE` only.
fn firecracker_uffd() -> Result<OwnedFd, ClientError> {
    // SAFETY: userfaultfd(2) takes flags only.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(last("userfaultfd"));
    }
    // SAFETY: a new descriptor only this OwnedFd owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api =
        sys::uffdio_api { api: sys::UFFD_API as u64, features: sys::UFFD_FEATURE_EVENT_REMOVE as u64, ioctls: 0 };
    // SAFETY: UFFDIO_API reads and writes one uffdio_api on this frame.
    if unsafe { libc::ioctl(fd.as_raw_fd(), nr::UFFDIO_API as _, &mut api) } != 0 {
        return Err(last("UFFDIO_API"));
    }
    Ok(fd)
}

fn register(uffd: &OwnedFd, m: &Mapping) -> Result<(), ClientError> {
    let mut reg = sys::uffdio_register {
        range: sys::uffdio_range { start: m.ptr as u64, len: m.len as u64 },
        mode: sys::UFFDIO_REGISTER_MODE_MISSING as u64,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register on this
    // frame; the range is our own mapping.
    if unsafe { libc::ioctl(uffd.as_raw_fd(), nr::UFFDIO_REGISTER as _, &mut reg) } != 0 {
        return Err(last("UFFDIO_REGISTER"));
    }
    Ok(())
}

/// Memory of this process handed to a handler as Firecracker hands it
/// over: its userfaultfd and the connection, kept for as long as the
/// memory is used (the handler serves until the connection hangs up).
#[derive(Debug)]
pub struct Attached {
    _uffd: OwnedFd,
    _conn: UnixStream,
}

/// Hands memory of this process to the handler at `socket`, as
/// Firecracker does: a userfaultfd with `EVENT_REMOVE` only, every region
/// `(host address, length, offset in the memory file)` registered MISSING,
/// then the handshake with the descriptor attached. `page_size` is the
/// memory's: 4096, or 2 MiB for `MAP_HUGETLB` memory (every region then
/// 2 MiB-aligned, in memory and in the file).
///
/// # Safety
///
/// Each region must be private anonymous memory of this process that
/// stays mapped while the result lives, and that is reached only through
/// raw pointers, volatile accesses or the kernel (never a Rust
/// reference): the handler installs pages in it behind the compiler's
/// back.
pub unsafe fn attach(socket: &Path, regions: &[(u64, u64, u64)], page_size: u64) -> Result<Attached, ClientError> {
    let uffd = firecracker_uffd()?;
    let mut sent = Vec::with_capacity(regions.len());
    for &(host, len, offset) in regions {
        // Borrowed for registration only; never unmapped here.
        let m = std::mem::ManuallyDrop::new(Mapping { ptr: host as *mut u8, len: len as usize });
        register(&uffd, &m)?;
        sent.push(Region { base_host_virt_addr: host, size: len, offset, page_size });
    }
    let conn = UnixStream::connect(socket).map_err(sys_err("connect to the handler"))?;
    peer::send(&conn, handshake::encode(&sent).as_bytes(), &[uffd.as_raw_fd()])
        .map_err(sys_err("send the handshake"))?;
    Ok(Attached { _uffd: uffd, _conn: conn })
}

/// A restored VM's memory: the mappings, the descriptor, the connection.
struct Vm {
    maps: Vec<Mapping>,
    /// File offset of each mapping.
    offsets: Vec<u64>,
    _uffd: OwnedFd,
    conn: UnixStream,
}

/// Splits `pages` into `n` regions, in pages.
fn split(pages: usize, n: usize) -> Vec<usize> {
    let n = n.clamp(1, pages.max(1));
    (0..n).map(|i| pages * (i + 1) / n - pages * i / n).collect()
}

/// Runs the client: a restore, or a bad peer's one misdeed. A bad peer
/// returns once the handler closes its connection (it may instead be
/// killed by the handler, which is the point), or at `hold` with an
/// error.
pub fn run(opts: &ClientOptions) -> Result<ClientReport, ClientError> {
    let file = File::open(&opts.mem_file).map_err(sys_err("open the memory file"))?;
    let len = file.metadata().map_err(sys_err("stat the memory file"))?.len() as usize;
    let pages = len / PAGE;
    if opts.kernel_file {
        let maps = vec![Mapping::file_private(&file, pages * PAGE)?];
        let first_pass = touch(&maps, pages, opts.threads, opts.order);
        let verified = verify(&maps, &[0], &file, &[])?;
        return Ok(ClientReport { first_pass, pages: pages as u64, verified, ..ClientReport::default() });
    }
    // Firecracker's page: 4 KiB, or 2 MiB on hugetlbfs.
    let unit = if opts.huge { HUGE_PAGE } else { PAGE };
    if len % unit != 0 {
        let e = io::Error::new(io::ErrorKind::InvalidInput, format!("{len} bytes, not whole pages of {unit}"));
        return Err(ClientError::Sys { what: "size the memory file", source: e });
    }
    let uffd = firecracker_uffd()?;
    let mut maps = Vec::new();
    let mut offsets = Vec::new();
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for n in split(len / unit, opts.regions) {
        let m = Mapping::new(n * unit, opts.huge)?;
        register(&uffd, &m)?;
        regions.push(Region { base_host_virt_addr: m.ptr as u64, size: m.len as u64, offset, page_size: unit as u64 });
        offsets.push(offset);
        offset += m.len as u64;
        maps.push(m);
    }
    let started = Instant::now();
    let conn = UnixStream::connect(&opts.socket).map_err(sys_err("connect to the handler"))?;
    if let Some(bad) = opts.misbehave {
        misbehave(bad, &conn, &uffd, &regions, opts.hold)?;
        return Ok(ClientReport::default());
    }
    peer::send(&conn, handshake::encode(&regions).as_bytes(), &[uffd.as_raw_fd()])
        .map_err(sys_err("send the handshake"))?;
    let vm = Vm { maps, offsets, _uffd: uffd, conn };
    // Firecracker's load writes two device pages before it returns.
    let last_map = vm.maps.len() - 1;
    for (m, off) in [(0, 0), (last_map, vm.maps[last_map].len - PAGE)] {
        let mut word = [0u8; 8];
        file.read_exact_at(&mut word, vm.offsets[m] + off as u64).map_err(sys_err("read the memory file"))?;
        vm.maps[m].write_word(off, u64::from_le_bytes(word));
    }
    let load = started.elapsed();
    let discarded = match &opts.gate {
        Some(gate) => before_gate(&vm, gate)?,
        None => Vec::new(),
    };
    let first_pass = touch(&vm.maps, pages, opts.threads, opts.order);
    let verified = verify(&vm.maps, &vm.offsets, &file, &discarded)?;
    let early_zero = discarded.iter().map(|&(_, _, len)| (len / PAGE) as u64).sum::<u64>();
    let balloon_zero = early_zero + if opts.balloon { balloon(&vm, unit)? } else { 0 };
    drop(vm.conn);
    Ok(ClientReport { load, first_pass, pages: pages as u64, verified, balloon_zero })
}

/// The first pass: one read per page, threads in parallel.
fn touch(maps: &[Mapping], pages: usize, threads: usize, order: Order) -> Duration {
    let threads = threads.max(1);
    // (mapping, offset) of every page, in file order.
    let all: Vec<(usize, usize)> =
        maps.iter().enumerate().flat_map(|(i, m)| (0..m.len / PAGE).map(move |p| (i, p * PAGE))).collect();
    debug_assert_eq!(all.len(), pages);
    let work: Vec<Vec<(usize, usize)>> = match order {
        Order::Seq => split(all.len(), threads)
            .iter()
            .scan(0, |at, n| {
                let chunk = all[*at..*at + n].to_vec();
                *at += n;
                Some(chunk)
            })
            .collect(),
        Order::Random => {
            let mut shuffled = all.clone();
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            for i in (1..shuffled.len()).rev() {
                x = apf::splitmix64(x);
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let n = shuffled.len().div_ceil(threads).max(1);
            shuffled.chunks(n).map(|c| c.to_vec()).collect()
        }
    };
    let start = Instant::now();
    std::thread::scope(|s| {
        for chunk in &work {
            s.spawn(move || {
                let mut sum = 0u64;
                for &(m, off) in chunk {
                    sum = sum.wrapping_add(maps[m].read_word(off));
                }
                std::hint::black_box(sum);
            });
        }
    });
    start.elapsed()
}

/// The first half of a gated restore (see [`ClientOptions::gate`]):
/// returns the discarded ranges, `(mapping, offset, length)`.
fn before_gate(vm: &Vm, gate: &Path) -> Result<Vec<(usize, usize, usize)>, ClientError> {
    let mut discarded = Vec::new();
    for (i, m) in vm.maps.iter().enumerate() {
        // Touch the first eighth of the mapping, then discard its first 4
        // pages (present), 8 at the middle and the last 4 (never touched,
        // but for the load's page): the last pages of one region and the
        // first of the next are adjacent in the memory file.
        let touched = (m.len / 8) / PAGE * PAGE;
        for off in (0..touched).step_by(PAGE) {
            std::hint::black_box(m.read_word(off));
        }
        let pages = m.len / PAGE;
        for (first, count) in [(0, 4), (pages / 2, 8), (pages.saturating_sub(4), 4)] {
            let (off, len) = (first * PAGE, (count * PAGE).min(m.len - first * PAGE));
            if len == 0 || discarded.iter().any(|&(j, o, l)| j == i && o < off + len && off < o + l) {
                continue;
            }
            m.discard(off, len)?;
            discarded.push((i, off, len));
        }
    }
    let mut ready = gate.as_os_str().to_owned();
    ready.push(".ready");
    File::create(PathBuf::from(ready)).map_err(sys_err("create the gate's ready file"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !gate.exists() {
        if Instant::now() >= deadline {
            return Err(ClientError::Sys { what: "waiting at the gate", source: io::ErrorKind::TimedOut.into() });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(discarded)
}

/// Compares all of memory with the file, where `zeroed` ranges
/// (`(mapping, offset, length)`) must read zeros instead; returns the
/// pages compared.
fn verify(
    maps: &[Mapping],
    offsets: &[u64],
    file: &File,
    zeroed: &[(usize, usize, usize)],
) -> Result<u64, ClientError> {
    const CHUNK: usize = 256 * PAGE;
    let mut want = vec![0u8; CHUNK];
    let mut got = vec![0u8; CHUNK];
    let mut pages = 0;
    for (i, (m, &base)) in maps.iter().zip(offsets).enumerate() {
        let mut off = 0;
        while off < m.len {
            let n = CHUNK.min(m.len - off);
            file.read_exact_at(&mut want[..n], base + off as u64).map_err(sys_err("read the memory file"))?;
            for &(_, z, len) in zeroed.iter().filter(|z| z.0 == i) {
                let (lo, hi) = (z.max(off), (z + len).min(off + n));
                if lo < hi {
                    want[lo - off..hi - off].fill(0);
                }
            }
            m.copy_out(off, &mut got[..n]);
            if want[..n] != got[..n] {
                let p = (0..n / PAGE).find(|p| want[p * PAGE..(p + 1) * PAGE] != got[p * PAGE..(p + 1) * PAGE]);
                return Err(ClientError::Mismatch { offset: base + (off + p.unwrap_or(0) * PAGE) as u64 });
            }
            pages += (n / PAGE) as u64;
            off += n;
        }
    }
    Ok(pages)
}

/// Discards ranges of 16 pages (or one huge page of `unit` bytes, on huge
/// pages) spread over memory (as a balloon inflating), checks they read
/// zeros, writes them and reads the writes back.
fn balloon(vm: &Vm, unit: usize) -> Result<u64, ClientError> {
    let mut zero = 0;
    for (m, &base) in vm.maps.iter().zip(&vm.offsets) {
        let ranges = (m.len / (16 * PAGE).max(unit) / 4).clamp(1, 16);
        for r in 0..ranges {
            let off = (r * m.len / ranges) / unit * unit;
            let len = (16 * PAGE).max(unit).min(m.len - off);
            m.discard(off, len)?;
            for p in (off..off + len).step_by(PAGE) {
                if (0..PAGE).step_by(8).any(|w| m.read_word(p + w) != 0) {
                    return Err(ClientError::NotZero { offset: base + p as u64 });
                }
                zero += 1;
                m.write_word(p, p as u64 ^ 0x5a5a);
                if m.read_word(p) != p as u64 ^ 0x5a5a {
                    return Err(ClientError::Mismatch { offset: base + p as u64 });
                }
            }
        }
    }
    Ok(zero)
}

/// One misdeed, then wait for the handler to close the connection.
fn misbehave(
    bad: Misbehave,
    conn: &UnixStream,
    uffd: &OwnedFd,
    regions: &[Region],
    hold: Duration,
) -> Result<(), ClientError> {
    let good = handshake::encode(regions);
    let fd = uffd.as_raw_fd();
    let other = File::open("/proc/self/stat").map_err(sys_err("open a non-userfaultfd descriptor"))?;
    let shifted = |f: &dyn Fn(&mut Region)| {
        let mut r = regions.to_vec();
        f(&mut r[0]);
        r
    };
    let send = |bytes: &[u8], fds: &[i32]| peer::send(conn, bytes, fds).map_err(sys_err("send"));
    match bad {
        Misbehave::Garbage => send(b"[{\"base_host_virt_addr\": nope}]", &[fd])?,
        Misbehave::Oversized => send(&vec![b' '; handshake::MAX_MESSAGE + 4096], &[fd])?,
        Misbehave::NoFd => send(good.as_bytes(), &[])?,
        Misbehave::TwoFds => send(good.as_bytes(), &[fd, fd])?,
        Misbehave::NotUffd => send(good.as_bytes(), &[other.as_raw_fd()])?,
        Misbehave::Overlap => {
            let mut r = regions.to_vec();
            r.push(Region { offset: r[0].offset + 4096, ..r[0] });
            r[1].base_host_virt_addr = r[0].base_host_virt_addr;
            send(handshake::encode(&r).as_bytes(), &[fd])?
        }
        Misbehave::OutsideFile => send(handshake::encode(&shifted(&|r| r.offset += 1 << 30)).as_bytes(), &[fd])?,
        Misbehave::BadPageSize => send(handshake::encode(&shifted(&|r| r.page_size = 8192)).as_bytes(), &[fd])?,
        Misbehave::HugeMisaligned => {
            let huge = shifted(&|r| {
                r.page_size = 2 << 20;
                r.base_host_virt_addr = 0x7e00_0000_0000;
                r.size = (2 << 20) + 4096;
            });
            send(handshake::encode(&huge[..1]).as_bytes(), &[fd])?
        }
        Misbehave::SendTwice => {
            send(good.as_bytes(), &[fd])?;
            std::thread::sleep(Duration::from_millis(100));
            send(good.as_bytes(), &[])?
        }
        Misbehave::Silent => 0,
    };
    conn.set_read_timeout(Some(hold)).map_err(sys_err("set a read timeout"))?;
    let mut byte = [0u8; 1];
    match (&*conn).read(&mut byte) {
        Ok(0) => Ok(()),
        Ok(_) => Err(ClientError::Sys { what: "the handler answered", source: io::Error::other("unexpected bytes") }),
        Err(e) => Err(ClientError::Sys { what: "waiting for the handler to close the connection", source: e }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_split_into_regions_of_whole_pages() {
        assert_eq!(split(10, 3), vec![3, 3, 4]);
        assert_eq!(split(10, 1), vec![10]);
        assert_eq!(split(2, 5), vec![1, 1]);
        assert_eq!(split(10, 3).iter().sum::<usize>(), 10);
    }

    #[test]
    fn the_descriptor_is_what_firecracker_hands_over() {
        let fd = firecracker_uffd().unwrap();
        assert!(peer::is_userfaultfd(&fd));
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
        // EVENT_REMOVE (0x8) and the kernel's handshake-done bit, nothing else.
        assert!(info.lines().any(|l| l.starts_with("API:\taa:80000008:")), "{info}");
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:\t")).unwrap();
        assert_ne!(u32::from_str_radix(flags, 8).unwrap() & libc::O_NONBLOCK as u32, 0);
        for (case, name) in Misbehave::ALL {
            assert_eq!(name.parse::<Misbehave>(), Ok(case));
        }
    }
}
