//! Messages: a fixed header, then a body whose length the kind fixes.
//! All integers are little-endian.

/// "APF1", little-endian, at the start of every message.
pub const MAGIC: u32 = 0x3146_5041;
/// The protocol version this crate speaks.
pub const VERSION: u16 = 1;
/// Header bytes: magic u32, version u16, kind u16, seq u32, body length u32.
pub const HEADER_LEN: usize = 16;
/// The largest message (header and body).
pub const MAX_MESSAGE: usize = 128;

/// Why a message was refused. Sent back in [`Reply::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// The message does not start with [`MAGIC`].
    BadMagic = 1,
    /// The version is not [`VERSION`].
    BadVersion = 2,
    /// The kind is not one this version knows.
    UnknownKind = 3,
    /// The body length does not match the kind, or the buffer is short.
    BadLength = 4,
    /// A guest range is empty, wraps, or is not inside guest RAM.
    OutOfRange = 5,
    /// A guest range is not page-aligned.
    Unaligned = 6,
    /// The operation did not finish before its deadline.
    Busy = 7,
    /// The operation failed; the VMM's report says why.
    Failed = 8,
    /// The mailbox frame number is not a page of guest RAM.
    BadMailbox = 9,
    /// A field holds a value this version does not define.
    BadValue = 10,
    /// The device's queue is full; try again.
    QueueFull = 11,
    /// The range holds memory the VMM or a device relies on: the checksum
    /// ring, which the device keeps pinned, may be neither unplugged nor
    /// discarded, and a balloon takes data pages only (never the page
    /// tables, mailboxes, code, stacks or generation table below
    /// [`crate::Layout::data_start`]).
    InUse = 12,
}

impl ErrorCode {
    /// The code for a raw value.
    pub const fn from_u32(v: u32) -> Option<ErrorCode> {
        Some(match v {
            1 => ErrorCode::BadMagic,
            2 => ErrorCode::BadVersion,
            3 => ErrorCode::UnknownKind,
            4 => ErrorCode::BadLength,
            5 => ErrorCode::OutOfRange,
            6 => ErrorCode::Unaligned,
            7 => ErrorCode::Busy,
            8 => ErrorCode::Failed,
            9 => ErrorCode::BadMailbox,
            10 => ErrorCode::BadValue,
            11 => ErrorCode::QueueFull,
            12 => ErrorCode::InUse,
            _ => return None,
        })
    }

    /// A short name, for reports.
    pub const fn as_str(&self) -> &'static str {
        match self {
            ErrorCode::BadMagic => "bad magic",
            ErrorCode::BadVersion => "unsupported version",
            ErrorCode::UnknownKind => "unknown message kind",
            ErrorCode::BadLength => "bad length",
            ErrorCode::OutOfRange => "range outside guest RAM",
            ErrorCode::Unaligned => "unaligned range",
            ErrorCode::Busy => "busy",
            ErrorCode::Failed => "failed",
            ErrorCode::BadMailbox => "mailbox outside guest RAM",
            ErrorCode::BadValue => "bad value",
            ErrorCode::QueueFull => "queue full",
            ErrorCode::InUse => "range in use by the VMM or a device",
        }
    }
}

impl core::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the guest asks the VMM to do with a range of its own memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum OfflineOp {
    /// Move the pages to new host frames, contents kept.
    Migrate = 1,
    /// Push the contents out; they come back on the next touch.
    Evict = 2,
    /// Discard the contents (memory hot-unplug): the guest stops using
    /// the range and rewrites it before it reads it again.
    Unplug = 3,
    /// Bring an unplugged range back (a no-op unless the VMM poisons
    /// unplugged memory).
    Replug = 4,
}

impl OfflineOp {
    /// The op for a raw value.
    pub const fn from_u32(v: u32) -> Option<OfflineOp> {
        Some(match v {
            1 => OfflineOp::Migrate,
            2 => OfflineOp::Evict,
            3 => OfflineOp::Unplug,
            4 => OfflineOp::Replug,
            _ => return None,
        })
    }
}

/// What the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Workload {
    /// Sequential, random and strided passes in turn.
    Mixed = 0,
    /// Sequential passes only.
    Sequential = 1,
    /// Random passes only.
    Random = 2,
    /// Strided passes only.
    Strided = 3,
    /// Touch (write) every data page once, in order, report, and finish:
    /// the first-touch fault rate.
    Touch = 4,
    /// Like [`Workload::Touch`] on a fresh start; on a restore, verify
    /// only a fixed, scattered [`SCATTERED_PER_MILLE`] of each stripe's
    /// pages (the first of a keyed permutation, the key the seed and the
    /// vCPU: the same pages at every restore of a snapshot), report, and
    /// finish: a restored guest that touches a small part of its RAM, what
    /// a working-set replay is for.
    Scattered = 5,
}

/// The share of its stripe, in thousandths, a restored
/// [`Workload::Scattered`] agent reads.
pub const SCATTERED_PER_MILLE: u64 = 150;

/// How many pages of a `pages`-page stripe a restored
/// [`Workload::Scattered`] agent reads: [`SCATTERED_PER_MILLE`] of them, at
/// least one of a stripe that has any.
pub fn scattered_pages(pages: u64) -> u64 {
    (pages * SCATTERED_PER_MILLE / 1000).clamp(pages.min(1), pages)
}

/// The index, in the stripe's keyed permutation, of the `i`th of the
/// `visits` pages a restored [`Workload::Scattered`] agent verifies: `i`
/// itself, or with `changed`, every tenth of them (`i % 10 == 9`) traded
/// for one past the plain set (`visits + i / 10`), so that a tenth of the
/// set differs, spread over the whole pass. Never past the stripe's
/// `pages`.
pub fn scattered_index(i: u64, visits: u64, pages: u64, changed: bool) -> u64 {
    if changed && i % 10 == 9 {
        (visits + i / 10).min(pages.saturating_sub(1))
    } else {
        i
    }
}

impl Workload {
    /// The workload for a raw value.
    pub const fn from_u32(v: u32) -> Option<Workload> {
        Some(match v {
            0 => Workload::Mixed,
            1 => Workload::Sequential,
            2 => Workload::Random,
            3 => Workload::Strided,
            4 => Workload::Touch,
            5 => Workload::Scattered,
            _ => return None,
        })
    }
}

/// Pass kinds, as [`Request::Progress`] reports them.
pub mod pass {
    /// Every page of the stripe in order.
    pub const SEQUENTIAL: u32 = 1;
    /// Random pages of the stripe.
    pub const RANDOM: u32 = 2;
    /// Every page at a fixed stride, wrapping.
    pub const STRIDED: u32 = 3;
    /// The first-touch pass of [`crate::Workload::Touch`].
    pub const TOUCH: u32 = 4;
    /// Verifying data restored from a snapshot, before any rewrite.
    pub const RESTORE_VERIFY: u32 = 5;
}

/// [`Config::flags`]: the agent starts from a restored snapshot. The
/// generation table already holds what each page must contain; verify every
/// data page against it before writing anything.
pub const FLAG_RESTORE: u32 = 1;
/// [`Config::flags`]: ask the VMM to offline, evict and unplug ranges of
/// the agent's own memory while it runs.
pub const FLAG_GUEST_OFFLINE: u32 = 2;
/// [`Config::flags`]: use the checksum device.
pub const FLAG_CHECKSUM: u32 = 4;
/// [`Config::flags`]: the touch pass and the restore verify visit the
/// stripe in a random order ([`crate::permute`]) instead of in order.
pub const FLAG_RANDOM_ORDER: u32 = 8;
/// [`Config::flags`]: after each pass, give a few pages back to the VMM
/// with [`Request::Balloon`], check that they read as zeros, and write
/// them again.
pub const FLAG_BALLOON: u32 = 16;
/// [`Config::flags`]: a restored [`Workload::Scattered`] agent verifies a
/// set of which a tenth differs from the plain one
/// ([`scattered_index`]): a working set recorded on one restore and
/// replayed into a guest whose pages changed a little.
pub const FLAG_SCATTERED_CHANGED: u32 = 32;
/// [`Config::flags`]: guest RAM is made of 2 MiB huge pages, which the
/// host discards and offlines whole only: balloon and offline requests
/// name whole, aligned 2 MiB pages.
pub const FLAG_BALLOON_HUGE: u32 = 64;

/// What the VMM tells an agent in answer to its hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// vCPUs running the agent.
    pub vcpus: u32,
    /// What to run.
    pub workload: Workload,
    /// The seed of every stamp and every random choice.
    pub seed: u64,
    /// `FLAG_*` bits.
    pub flags: u32,
}

/// Declares [`Counters`] and the methods that walk its fields, so that the
/// list of counters is written once: the wire format, the sum over vCPUs
/// and the VMM's JSON all follow it.
macro_rules! counters {
    ($($(#[doc = $doc:literal])+ $name:ident,)+) => {
        /// Counters a vCPU reports when it is done.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct Counters {
            $($(#[doc = $doc])+ pub $name: u64,)+
        }

        impl Counters {
            /// How many counters there are.
            pub const LEN: usize = [$(stringify!($name)),+].len();

            /// The counters' names, in wire order.
            pub const NAMES: [&'static str; Self::LEN] = [$(stringify!($name)),+];

            /// The counters' values, in wire order.
            pub fn values(&self) -> [u64; Self::LEN] {
                [$(self.$name),+]
            }

            /// Counters from their values, in wire order.
            pub fn from_values(values: [u64; Self::LEN]) -> Counters {
                let [$($name),+] = values;
                Counters { $($name),+ }
            }
        }
    };
}

counters! {
    /// Passes completed.
    passes,
    /// Pages whose every word was checked.
    pages_verified,
    /// Pages stamped.
    pages_written,
    /// Pages found corrupt (each was also reported on its own).
    corrupt_pages,
    /// Offline requests the VMM accepted.
    offline_requests,
    /// Offline requests the VMM refused or could not finish.
    offline_failed,
    /// Checksums the device computed and the agent checked.
    checksums,
    /// Checksums that did not match, or did not arrive in time.
    checksum_errors,
    /// Balloon discards the VMM carried out.
    balloon_discards,
    /// Discarded pages that read as zeros afterwards.
    balloon_pages_zero,
    /// Discarded pages that did not read as zeros (stale contents; each is
    /// also reported as a corrupt page).
    balloon_stale,
}

impl Counters {
    /// The value of the counter called `name` (one of [`Counters::NAMES`]).
    pub fn get(&self, name: &str) -> Option<u64> {
        let i = Self::NAMES.iter().position(|n| *n == name)?;
        Some(self.values()[i])
    }

    /// Adds `other`'s counters to these, each saturating.
    pub fn add(&mut self, other: &Counters) {
        let mut sum = self.values();
        for (s, o) in sum.iter_mut().zip(other.values()) {
            *s = s.saturating_add(o);
        }
        *self = Counters::from_values(sum);
    }
}

impl core::iter::Sum for Counters {
    fn sum<I: Iterator<Item = Counters>>(iter: I) -> Counters {
        iter.fold(Counters::default(), |mut total, c| {
            total.add(&c);
            total
        })
    }
}

/// A message from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// The first message of each vCPU; answered by [`Reply::Config`].
    Hello {
        /// The vCPU saying hello.
        vcpu: u32,
    },
    /// A pass ended and everything was verified. The answer is
    /// [`Reply::Ack`] whose `stop` says whether to finish.
    Progress {
        /// The vCPU.
        vcpu: u32,
        /// Which pass (see [`pass`]).
        kind: u32,
        /// Passes so far.
        passes: u64,
        /// Data pages this pass covered.
        pages: u64,
    },
    /// A page did not hold what it should.
    Corrupt {
        /// The vCPU that found it.
        vcpu: u32,
        /// Generation expected.
        generation: u32,
        /// The page.
        gpa: u64,
        /// Index of the first wrong word.
        word: u64,
        /// What the word should be.
        expected: u64,
        /// What it was.
        found: u64,
    },
    /// Offline, evict, unplug or replug a range of the guest's memory.
    Offline {
        /// What to do.
        op: OfflineOp,
        /// First byte, page-aligned.
        gpa: u64,
        /// Bytes, a multiple of the page size.
        len: u64,
    },
    /// Discard `[gpa, gpa + len)`, as a balloon driver inflating over
    /// those pages does: the VMM drops their contents (`MADV_DONTNEED` on
    /// guest RAM) and they read as zeros until written again. Answered by
    /// [`Reply::Ack`] whose `value` is the pages discarded.
    Balloon {
        /// First byte, page-aligned.
        gpa: u64,
        /// Bytes, a multiple of the page size.
        len: u64,
    },
    /// The vCPU finished; its last message.
    Done {
        /// The vCPU.
        vcpu: u32,
        /// What it did.
        counters: Counters,
    },
    /// One piece of a phase's first-touch histogram
    /// ([`crate::timing::Histogram`]): the counts of buckets
    /// `first..first + HIST_CHUNK` (those past the last bucket are 0).
    /// Pieces of empty buckets may be left out; [`Request::Timed`] closes
    /// the phase.
    Histogram {
        /// The vCPU.
        vcpu: u32,
        /// Which phase ([`crate::timing::phase`]).
        phase: u32,
        /// The first bucket, a multiple of [`crate::timing::HIST_CHUNK`].
        first: u32,
        /// Counts.
        counts: [u32; crate::timing::HIST_CHUNK],
    },
    /// A phase's timing is complete: every piece of its histogram was
    /// sent before this.
    Timed {
        /// The vCPU.
        vcpu: u32,
        /// Which phase.
        phase: u32,
        /// Accesses timed: the histogram's count.
        touches: u64,
        /// The slowest, in cycles.
        max_cycles: u64,
        /// The time-stamp counter at the phase's start.
        tsc_start: u64,
        /// The time-stamp counter now, at its end.
        tsc_end: u64,
    },
    /// The agent cannot go on (a reply it cannot use, a panic).
    Fatal {
        /// The vCPU.
        vcpu: u32,
        /// What went wrong (agent-defined).
        code: u32,
        /// A value that helps (an address, a line number).
        detail: u64,
    },
}

/// The VMM's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The answer to [`Request::Hello`].
    Config(Config),
    /// Done. `stop` asks the agent to finish (verify, send done, halt);
    /// `value` depends on the request (pages offlined, say).
    Ack {
        /// Finish now.
        stop: bool,
        /// Request-specific.
        value: u64,
    },
    /// The request was refused or failed.
    Error {
        /// Why.
        code: ErrorCode,
        /// A value that helps (the offending address, say).
        detail: u64,
    },
}

const K_HELLO: u16 = 1;
const K_PROGRESS: u16 = 2;
const K_CORRUPT: u16 = 3;
const K_OFFLINE: u16 = 4;
const K_DONE: u16 = 5;
const K_FATAL: u16 = 6;
const K_BALLOON: u16 = 7;
const K_HISTOGRAM: u16 = 8;
const K_TIMED: u16 = 9;
const K_CONFIG: u16 = 0x81;
const K_ACK: u16 = 0x82;
const K_ERROR: u16 = 0xff;

/// A message that could not be decoded, with the code to answer it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError {
    /// The reply code.
    pub code: ErrorCode,
    /// The sequence number, when the header got that far (0 otherwise).
    pub seq: u32,
    /// The offending value (magic, version, kind, length or field).
    pub detail: u64,
}

struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
    ok: bool,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        match self.buf.get_mut(self.at..self.at + b.len()) {
            Some(dst) => dst.copy_from_slice(b),
            None => self.ok = false,
        }
        self.at += b.len();
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    // Lengths are checked against the kind before any field is read.
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.at..self.at + N]);
        self.at += N;
        out
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    /// A reserved word: zero, so that one message has one encoding and a
    /// later version can give the field a meaning.
    fn reserved(&mut self, seq: u32) -> Result<(), DecodeError> {
        match self.u32() {
            0 => Ok(()),
            v => Err(DecodeError { code: ErrorCode::BadValue, seq, detail: v as u64 }),
        }
    }
}

fn encode_with(
    kind: u16,
    seq: u32,
    body_len: usize,
    buf: &mut [u8],
    body: impl FnOnce(&mut Writer<'_>),
) -> Option<usize> {
    let mut w = Writer { buf, at: 0, ok: true };
    w.u32(MAGIC);
    w.u16(VERSION);
    w.u16(kind);
    w.u32(seq);
    w.u32(body_len as u32);
    body(&mut w);
    debug_assert_eq!(w.at, HEADER_LEN + body_len);
    w.ok.then_some(w.at)
}

/// Checks the header and the body length for `kind`; returns the kind,
/// the sequence number and a reader at the body.
fn open(buf: &[u8], body_len: impl Fn(u16) -> Option<usize>) -> Result<(u16, u32, Reader<'_>), DecodeError> {
    let err = |code, seq, detail| DecodeError { code, seq, detail };
    if buf.len() < HEADER_LEN {
        return Err(err(ErrorCode::BadLength, 0, buf.len() as u64));
    }
    let mut r = Reader { buf, at: 0 };
    let magic = r.u32();
    if magic != MAGIC {
        return Err(err(ErrorCode::BadMagic, 0, magic as u64));
    }
    let version = r.u16();
    let kind = r.u16();
    let seq = r.u32();
    if version != VERSION {
        return Err(err(ErrorCode::BadVersion, seq, version as u64));
    }
    let len = r.u32() as usize;
    let want = body_len(kind).ok_or(err(ErrorCode::UnknownKind, seq, kind as u64))?;
    if len != want || buf.len() < HEADER_LEN + len {
        return Err(err(ErrorCode::BadLength, seq, len as u64));
    }
    Ok((kind, seq, r))
}

const COUNTERS_LEN: usize = Counters::LEN * 8;

impl Request {
    fn body_len(kind: u16) -> Option<usize> {
        Some(match kind {
            K_HELLO => 4,
            K_PROGRESS => 4 + 4 + 8 + 8,
            K_CORRUPT => 4 + 4 + 8 * 4,
            K_OFFLINE => 4 + 4 + 8 + 8,
            K_DONE => 8 + COUNTERS_LEN,
            K_FATAL => 4 + 4 + 8,
            K_BALLOON => 8 + 8,
            K_HISTOGRAM => 4 + 4 + 4 + 4 + 4 * crate::timing::HIST_CHUNK,
            K_TIMED => 4 + 4 + 8 * 4,
            _ => return None,
        })
    }

    /// Writes the request with sequence number `seq` into `buf`; returns
    /// the bytes written, or None if `buf` is too small.
    pub fn encode(&self, seq: u32, buf: &mut [u8]) -> Option<usize> {
        let kind = match self {
            Request::Hello { .. } => K_HELLO,
            Request::Progress { .. } => K_PROGRESS,
            Request::Corrupt { .. } => K_CORRUPT,
            Request::Offline { .. } => K_OFFLINE,
            Request::Done { .. } => K_DONE,
            Request::Fatal { .. } => K_FATAL,
            Request::Balloon { .. } => K_BALLOON,
            Request::Histogram { .. } => K_HISTOGRAM,
            Request::Timed { .. } => K_TIMED,
        };
        let len = Self::body_len(kind).unwrap_or(0);
        encode_with(kind, seq, len, buf, |w| match *self {
            Request::Hello { vcpu } => w.u32(vcpu),
            Request::Progress { vcpu, kind, passes, pages } => {
                w.u32(vcpu);
                w.u32(kind);
                w.u64(passes);
                w.u64(pages);
            }
            Request::Corrupt { vcpu, generation, gpa, word, expected, found } => {
                w.u32(vcpu);
                w.u32(generation);
                w.u64(gpa);
                w.u64(word);
                w.u64(expected);
                w.u64(found);
            }
            Request::Offline { op, gpa, len } => {
                w.u32(op as u32);
                w.u32(0);
                w.u64(gpa);
                w.u64(len);
            }
            Request::Done { vcpu, counters } => {
                w.u32(vcpu);
                w.u32(0);
                for v in counters.values() {
                    w.u64(v);
                }
            }
            Request::Fatal { vcpu, code, detail } => {
                w.u32(vcpu);
                w.u32(code);
                w.u64(detail);
            }
            Request::Balloon { gpa, len } => {
                w.u64(gpa);
                w.u64(len);
            }
            Request::Histogram { vcpu, phase, first, counts } => {
                w.u32(vcpu);
                w.u32(phase);
                w.u32(first);
                w.u32(0);
                for c in counts {
                    w.u32(c);
                }
            }
            Request::Timed { vcpu, phase, touches, max_cycles, tsc_start, tsc_end } => {
                w.u32(vcpu);
                w.u32(phase);
                w.u64(touches);
                w.u64(max_cycles);
                w.u64(tsc_start);
                w.u64(tsc_end);
            }
        })
    }

    /// Reads a request; returns its sequence number and the request.
    pub fn decode(buf: &[u8]) -> Result<(u32, Request), DecodeError> {
        let (kind, seq, mut r) = open(buf, Self::body_len)?;
        let req = match kind {
            K_HELLO => Request::Hello { vcpu: r.u32() },
            K_PROGRESS => Request::Progress { vcpu: r.u32(), kind: r.u32(), passes: r.u64(), pages: r.u64() },
            K_CORRUPT => Request::Corrupt {
                vcpu: r.u32(),
                generation: r.u32(),
                gpa: r.u64(),
                word: r.u64(),
                expected: r.u64(),
                found: r.u64(),
            },
            K_OFFLINE => {
                let raw = r.u32();
                let op = OfflineOp::from_u32(raw).ok_or(DecodeError {
                    code: ErrorCode::BadValue,
                    seq,
                    detail: raw as u64,
                })?;
                r.reserved(seq)?;
                Request::Offline { op, gpa: r.u64(), len: r.u64() }
            }
            K_DONE => {
                let vcpu = r.u32();
                r.reserved(seq)?;
                let mut values = [0; Counters::LEN];
                for v in &mut values {
                    *v = r.u64();
                }
                Request::Done { vcpu, counters: Counters::from_values(values) }
            }
            K_FATAL => Request::Fatal { vcpu: r.u32(), code: r.u32(), detail: r.u64() },
            K_BALLOON => Request::Balloon { gpa: r.u64(), len: r.u64() },
            K_HISTOGRAM => {
                let (vcpu, phase, first) = (r.u32(), r.u32(), r.u32());
                r.reserved(seq)?;
                let mut counts = [0; crate::timing::HIST_CHUNK];
                for c in &mut counts {
                    *c = r.u32();
                }
                Request::Histogram { vcpu, phase, first, counts }
            }
            K_TIMED => Request::Timed {
                vcpu: r.u32(),
                phase: r.u32(),
                touches: r.u64(),
                max_cycles: r.u64(),
                tsc_start: r.u64(),
                tsc_end: r.u64(),
            },
            _ => unreachable!("body_len accepted only known kinds"),
        };
        Ok((seq, req))
    }
}

impl Reply {
    fn body_len(kind: u16) -> Option<usize> {
        Some(match kind {
            K_CONFIG => 8 + 4 + 4 + 8 + 4 + 4,
            K_ACK => 4 + 4 + 8,
            K_ERROR => 4 + 4 + 8,
            _ => return None,
        })
    }

    /// Writes the reply to request `seq` into `buf`; returns the bytes
    /// written, or None if `buf` is too small.
    pub fn encode(&self, seq: u32, buf: &mut [u8]) -> Option<usize> {
        let kind = match self {
            Reply::Config(_) => K_CONFIG,
            Reply::Ack { .. } => K_ACK,
            Reply::Error { .. } => K_ERROR,
        };
        let len = Self::body_len(kind).unwrap_or(0);
        encode_with(kind, seq, len, buf, |w| match *self {
            Reply::Config(c) => {
                w.u64(c.ram_size);
                w.u32(c.vcpus);
                w.u32(c.workload as u32);
                w.u64(c.seed);
                w.u32(c.flags);
                w.u32(0);
            }
            Reply::Ack { stop, value } => {
                w.u32(stop as u32);
                w.u32(0);
                w.u64(value);
            }
            Reply::Error { code, detail } => {
                w.u32(code as u32);
                w.u32(0);
                w.u64(detail);
            }
        })
    }

    /// Reads a reply; returns the sequence number it answers and the reply.
    pub fn decode(buf: &[u8]) -> Result<(u32, Reply), DecodeError> {
        let (kind, seq, mut r) = open(buf, Self::body_len)?;
        let bad = |detail: u32| DecodeError { code: ErrorCode::BadValue, seq, detail: detail as u64 };
        let reply = match kind {
            K_CONFIG => {
                let ram_size = r.u64();
                let vcpus = r.u32();
                let raw = r.u32();
                let workload = Workload::from_u32(raw).ok_or(bad(raw))?;
                let (seed, flags) = (r.u64(), r.u32());
                r.reserved(seq)?;
                Reply::Config(Config { ram_size, vcpus, workload, seed, flags })
            }
            K_ACK => {
                let stop = match r.u32() {
                    0 => false,
                    1 => true,
                    v => return Err(bad(v)),
                };
                r.reserved(seq)?;
                Reply::Ack { stop, value: r.u64() }
            }
            K_ERROR => {
                let raw = r.u32();
                let code = ErrorCode::from_u32(raw).ok_or(bad(raw))?;
                r.reserved(seq)?;
                Reply::Error { code, detail: r.u64() }
            }
            _ => unreachable!("body_len accepted only known kinds"),
        };
        Ok((seq, reply))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_changed_scattered_set_differs_in_a_tenth_of_its_pages() {
        const PAGES: u64 = 10_000;
        let visits = scattered_pages(PAGES);
        for i in 0..visits {
            assert_eq!(scattered_index(i, visits, PAGES, false), i, "the plain set is the permutation's first pages");
        }
        let mut seen = [false; PAGES as usize];
        let mut outside = 0;
        for i in 0..visits {
            let k = scattered_index(i, visits, PAGES, true);
            assert!(k < PAGES);
            assert!(!seen[k as usize], "{k} twice");
            seen[k as usize] = true;
            outside += u64::from(k >= visits);
        }
        assert_eq!(outside, visits / 10, "a tenth of the set changed");
        assert_eq!(scattered_index(0, 1, 1, true), 0);
    }

    use super::*;

    fn round_trip(req: Request) {
        let mut buf = [0u8; MAX_MESSAGE];
        let n = req.encode(42, &mut buf).unwrap();
        assert!(n <= MAX_MESSAGE);
        assert_eq!(Request::decode(&buf[..n]), Ok((42, req)));
        assert_eq!(Request::decode(&buf[..n - 1]).unwrap_err().code, ErrorCode::BadLength);
        assert!(req.encode(42, &mut buf[..n - 1]).is_none());
    }

    #[test]
    fn every_request_round_trips() {
        round_trip(Request::Hello { vcpu: 3 });
        round_trip(Request::Progress { vcpu: 1, kind: pass::RANDOM, passes: 9, pages: 1 << 40 });
        round_trip(Request::Corrupt { vcpu: 0, generation: 7, gpa: 0x40_0000, word: 5, expected: 1, found: 2 });
        round_trip(Request::Offline { op: OfflineOp::Unplug, gpa: 0x40_0000, len: 0x2000 });
        let counters = Counters {
            passes: 1,
            pages_verified: 2,
            checksum_errors: 8,
            balloon_discards: 9,
            balloon_pages_zero: 10,
            balloon_stale: 11,
            ..Counters::default()
        };
        round_trip(Request::Done { vcpu: 1, counters });
        round_trip(Request::Balloon { gpa: 0x40_0000, len: 0x3000 });
        round_trip(Request::Fatal { vcpu: 1, code: 2, detail: 3 });
        let counts = core::array::from_fn(|i| i as u32 * 1000 + 7);
        round_trip(Request::Histogram { vcpu: 2, phase: crate::timing::phase::STRESS, first: 48, counts });
        round_trip(Request::Timed {
            vcpu: 1,
            phase: crate::timing::phase::TOUCH,
            touches: 1 << 33,
            max_cycles: 123_456_789,
            tsc_start: u64::MAX - 5,
            tsc_end: 9,
        });
    }

    #[test]
    fn a_histogram_piece_fills_the_largest_message() {
        let mut buf = [0u8; MAX_MESSAGE];
        let piece = Request::Histogram { vcpu: 0, phase: 1, first: 0, counts: [u32::MAX; crate::timing::HIST_CHUNK] };
        assert_eq!(piece.encode(1, &mut buf), Some(MAX_MESSAGE));
        // Its reserved word is checked like every other.
        buf[HEADER_LEN + 12] = 1;
        assert_eq!(Request::decode(&buf).unwrap_err().code, ErrorCode::BadValue);
    }

    #[test]
    fn counters_sum_field_by_field_and_name_every_field() {
        let a = Counters::from_values(core::array::from_fn(|i| i as u64 + 1));
        assert_eq!((a.passes, a.balloon_stale), (1, Counters::LEN as u64));
        assert_eq!(a.get("pages_written"), Some(3));
        assert_eq!(a.get("no_such_counter"), None);
        let total: Counters = [a, a, Counters { checksums: 5, ..Counters::default() }].into_iter().sum();
        for (i, (name, v)) in Counters::NAMES.iter().zip(total.values()).enumerate() {
            let extra = if *name == "checksums" { 5 } else { 0 };
            assert_eq!(v, 2 * (i as u64 + 1) + extra, "{name}");
        }
        let mut max = Counters::from_values([u64::MAX; Counters::LEN]);
        max.add(&a);
        assert_eq!(max.values(), [u64::MAX; Counters::LEN], "saturates");
    }

    #[test]
    fn workloads_round_trip_and_the_scattered_share_is_bounded() {
        for v in 0..=5 {
            assert_eq!(Workload::from_u32(v).map(|w| w as u32), Some(v));
        }
        assert_eq!(Workload::from_u32(6), None);
        assert_eq!(scattered_pages(10_000), 1_500);
        assert_eq!((scattered_pages(0), scattered_pages(1), scattered_pages(5)), (0, 1, 1));
    }

    #[test]
    fn every_error_code_round_trips() {
        for v in 1..=12 {
            let code = ErrorCode::from_u32(v).unwrap();
            assert_eq!(code as u32, v);
            assert!(!code.as_str().is_empty());
        }
        assert_eq!(ErrorCode::from_u32(0), None);
        assert_eq!(ErrorCode::from_u32(13), None);
    }

    #[test]
    fn every_reply_round_trips() {
        let mut buf = [0u8; MAX_MESSAGE];
        for reply in [
            Reply::Config(Config {
                ram_size: 1 << 29,
                vcpus: 2,
                workload: Workload::Touch,
                seed: 5,
                flags: FLAG_RESTORE,
            }),
            Reply::Ack { stop: true, value: 12 },
            Reply::Error { code: ErrorCode::OutOfRange, detail: 0xdead_0000 },
        ] {
            let n = reply.encode(9, &mut buf).unwrap();
            assert_eq!(Reply::decode(&buf[..n]), Ok((9, reply)));
        }
    }

    #[test]
    fn garbage_gets_the_right_code() {
        let mut buf = [0u8; MAX_MESSAGE];
        let n = Request::Offline { op: OfflineOp::Migrate, gpa: 0, len: 4096 }.encode(1, &mut buf).unwrap();
        let code = |b: &[u8]| Request::decode(b).unwrap_err().code;

        assert_eq!(code(&[0u8; 8]), ErrorCode::BadLength);
        let mut m = buf;
        m[0] ^= 1;
        assert_eq!(code(&m[..n]), ErrorCode::BadMagic);
        let mut m = buf;
        m[4] = 9;
        assert_eq!(code(&m[..n]), ErrorCode::BadVersion);
        let mut m = buf;
        m[6] = 0x77;
        assert_eq!(code(&m[..n]), ErrorCode::UnknownKind);
        let mut m = buf;
        m[12] = 200;
        assert_eq!(code(&m[..]), ErrorCode::BadLength);
        let mut m = buf;
        m[HEADER_LEN] = 99;
        let e = Request::decode(&m[..n]).unwrap_err();
        assert_eq!((e.code, e.seq, e.detail), (ErrorCode::BadValue, 1, 99));
        // Reserved words are zero: one message, one encoding.
        let mut m = buf;
        m[HEADER_LEN + 4] = 1;
        let e = Request::decode(&m[..n]).unwrap_err();
        assert_eq!((e.code, e.seq, e.detail), (ErrorCode::BadValue, 1, 1));
        // A reply is not a request.
        let n = Reply::Ack { stop: false, value: 0 }.encode(1, &mut buf).unwrap();
        assert_eq!(code(&buf[..n]), ErrorCode::UnknownKind);
    }
}
