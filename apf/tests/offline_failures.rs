//! The failure paths of offlining, on real userfaultfd: every ioctl an
//! offline makes is made to fail (through the engine's failpoints, where the
//! kernel would not fail on its own), and every page of the range is then
//! read back, from another thread and through the engine, for the exact
//! contents it must have. Pages that may be poisoned are read with
//! `process_vm_readv`, which answers `EFAULT` where an access would take
//! SIGBUS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use apf::failpoints::Op;
use apf::failpoints::Rule;
use apf::{Config, Engine, Mode, OfflineError, UnplugPolicy, PAGE_SIZE};
use apf::{FixedBuffer, GuestAddress, GuestRam, GuestRange, PageState, ZeroSource};

mod common;
use common::{busy, discard, try_read, write_bytes, Fills, ScriptedSource};

const PAGE: u64 = PAGE_SIZE as u64;
const MIB: usize = 1 << 20;

fn ram(bytes: usize) -> Arc<GuestRam> {
    Arc::new(GuestRam::anonymous(&[(GuestAddress(0), bytes)]).unwrap())
}

fn engine_with(ram: &Arc<GuestRam>, policy: UnplugPolicy) -> Engine {
    let config = Config { unplug_policy: policy, ..Config::default() };
    Engine::builder(ram.clone(), Arc::new(ZeroSource)).config(config).start().unwrap()
}

fn engine(ram: &Arc<GuestRam>) -> Engine {
    engine_with(ram, UnplugPolicy::Zero)
}

fn range(start: u64, pages: u64) -> GuestRange {
    GuestRange::new(GuestAddress(start), pages * PAGE)
}

fn soon(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

/// The contents stamp `salt` gives the page at `gpa`: every word differs.
fn stamped(gpa: u64, salt: u64) -> Vec<u8> {
    (0..PAGE_SIZE as u64 / 8).flat_map(|j| (gpa ^ salt ^ j.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes()).collect()
}

/// Writes the stamp into every page of `r`, through the engine.
fn stamp(ram: &GuestRam, r: GuestRange, salt: u64) {
    for gpa in (r.start.0..r.end()).step_by(PAGE_SIZE) {
        write_bytes(ram, gpa, &stamped(gpa, salt));
    }
}

/// What reading a page found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Stamp(u64),
    Zeros,
    /// `EFAULT`: the page is poisoned.
    Poisoned,
    Other(String),
}

/// Reads every page of `r` from a fresh thread with `process_vm_readv` on
/// this process (faults go through the engine; poison answers `EFAULT`),
/// and says what each holds among the stamps `salts`. A reader that does
/// not finish within 10 s is a hang, and fails the test.
fn read_back(ram: &Arc<GuestRam>, r: GuestRange, salts: &[u64]) -> Vec<Seen> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (ram, salts) = (ram.clone(), salts.to_vec());
    std::thread::spawn(move || {
        let seen: Vec<Seen> = (r.start.0..r.end())
            .step_by(PAGE_SIZE)
            .map(|gpa| {
                let mut buf = vec![0u8; PAGE_SIZE];
                match try_read(&ram, gpa, &mut buf) {
                    Err(e) if e.raw_os_error() == Some(libc::EFAULT) => return Seen::Poisoned,
                    Err(e) => return Seen::Other(e.to_string()),
                    Ok(()) => {}
                }
                if buf.iter().all(|b| *b == 0) {
                    return Seen::Zeros;
                }
                match salts.iter().find(|&&s| buf == stamped(gpa, s)) {
                    Some(&s) => Seen::Stamp(s),
                    None => Seen::Other(format!("unknown contents {:x?}", &buf[..16])),
                }
            })
            .collect();
        let _ = tx.send(seen);
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("a reader hung on the offlined range")
}

fn assert_all(seen: &[Seen], want: Seen, what: &str) {
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(*s, want, "{what}: page {i}");
    }
}

fn states(ram: &GuestRam, r: GuestRange) -> Vec<PageState> {
    (r.start.0..r.end()).step_by(PAGE_SIZE).map(|g| ram.state(ram.locate(GuestAddress(g)).unwrap()).0).collect()
}

/// Host addresses of `r`, for failpoint rules.
fn host_span(ram: &GuestRam, r: GuestRange) -> (u64, u64) {
    let h = ram.host_range(r.start, r.len).unwrap() as u64;
    (h, h + r.len)
}

fn pfns(ram: &GuestRam, r: GuestRange) -> Vec<Option<u64>> {
    let (h, _) = host_span(ram, r);
    apf::hostmem::Pagemap::open().unwrap().pfns(h, (r.len / PAGE) as usize).unwrap()
}

/// The ioctl and errno an offline error reports.
fn ioctl_of(e: &OfflineError) -> (&'static str, i32) {
    match e {
        OfflineError::Ioctl { error, .. } => (error.op, error.errno),
        other => panic!("expected an ioctl error, got {other}"),
    }
}

/// The guest address of the page an ioctl error names.
fn page_of(e: &OfflineError) -> u64 {
    match e {
        OfflineError::Ioctl { range, .. } => range.start.0,
        other => panic!("expected an ioctl error, got {other}"),
    }
}

const R: u64 = 0x10_0000;

#[test]
fn take_out_failing_at_the_first_page_changes_nothing() {
    for mode in [Mode::Migrate, Mode::Evict, Mode::Unplug] {
        let ram = ram(4 * MIB);
        let engine = engine(&ram);
        let r = range(R, 16);
        stamp(&ram, r, 1);
        let (lo, hi) = host_span(&ram, r);
        engine.failpoints().arm(Rule::new(Op::Move, libc::ENOMEM).within(lo, hi));
        let before = pfns(&ram, r);
        let err = engine.offline(r, mode, soon(2000)).unwrap_err();
        assert_eq!(ioctl_of(&err), ("UFFDIO_MOVE", libc::ENOMEM), "{mode}: {err}");
        assert_eq!(page_of(&err), R, "{mode}: the error names the first page");
        assert_eq!(pfns(&ram, r), before, "{mode}: a failed take-out moved pages");
        assert_eq!(states(&ram, r), vec![PageState::Present; 16], "{mode}");
        assert_eq!(engine.store().len(), 0, "{mode}");
        assert_all(&read_back(&ram, r, &[1]), Seen::Stamp(1), &format!("{mode} after a failed take-out"));
        // Usable afterwards: the same offline goes through.
        engine.offline(r, mode, soon(2000)).unwrap();
        let want = if mode == Mode::Unplug { Seen::Zeros } else { Seen::Stamp(1) };
        assert_all(&read_back(&ram, r, &[1]), want, &format!("{mode} after the second offline"));
    }
}

#[test]
fn take_out_failing_part_way_puts_the_staged_pages_back() {
    for mode in [Mode::Migrate, Mode::Evict, Mode::Unplug] {
        let ram = ram(4 * MIB);
        let engine = engine(&ram);
        let r = range(R, 16);
        stamp(&ram, r, 2);
        let (lo, hi) = host_span(&ram, r);
        // Five pages really move, then the next call fails: the kernel's
        // way (partial progress, then the error on the retry).
        engine.failpoints().arm(Rule::new(Op::Move, libc::ENOMEM).partial(5).within(lo, hi));
        engine.failpoints().arm(Rule::new(Op::Move, libc::ENOMEM).within(lo, hi));
        let err = engine.offline(r, mode, soon(2000)).unwrap_err();
        assert_eq!(ioctl_of(&err), ("UFFDIO_MOVE", libc::ENOMEM), "{mode}: {err}");
        assert_eq!(page_of(&err), R + 5 * PAGE, "{mode}: the error names the page it stopped at");
        assert_eq!(engine.failpoints().pending(), 0);
        assert_eq!(states(&ram, r), vec![PageState::Present; 16], "{mode}");
        assert_eq!(engine.store().len(), 0, "{mode}");
        // The five staged pages are back, even for an unplug (it stopped).
        assert_all(&read_back(&ram, r, &[2]), Seen::Stamp(2), &format!("{mode} after a part-way failure"));
        engine.offline(r, mode, soon(2000)).unwrap();
        let want = if mode == Mode::Unplug { Seen::Zeros } else { Seen::Stamp(2) };
        assert_all(&read_back(&ram, r, &[2]), want, &format!("{mode} after the second offline"));
    }
}

/// A `UFFDIO_MOVE` that stops part-way has been seen to move the page it
/// stopped at without counting it. The take-out must find that page in its
/// slot (not clear the slot as a stranger's, which loses its contents), and
/// the move back must find it in place (not move it aside as an intruder).
#[test]
fn a_page_moved_without_being_counted_is_not_lost() {
    for mode in [Mode::Migrate, Mode::Evict] {
        let ram = ram(4 * MIB);
        let engine = engine(&ram);
        let r = range(R, 16);
        stamp(&ram, r, 7);
        let (lo, hi) = host_span(&ram, r);
        engine.failpoints().arm(Rule::new(Op::Move, libc::EBUSY).partial(3).uncounted(1).within(lo, hi));
        engine.offline(r, mode, soon(2000)).unwrap();
        assert_eq!(engine.failpoints().fired(), 1);
        assert_all(&read_back(&ram, r, &[7]), Seen::Stamp(7), &format!("{mode}, take-out"));
    }
    // The move back: copies back fail, so the staged frames go back by
    // MOVE, and the first of those moves one page more than it says.
    let ram = ram(4 * MIB);
    let engine = engine(&ram);
    let r = range(R, 16);
    stamp(&ram, r, 8);
    let (lo, hi) = host_span(&ram, r);
    engine.failpoints().arm(Rule::new(Op::Copy, libc::ENOMEM).within(lo, hi));
    engine.failpoints().arm(Rule::new(Op::Move, libc::EBUSY).skip(1).partial(2).uncounted(1).within(lo, hi));
    let res = engine.offline(r, Mode::Migrate, soon(2000));
    assert_eq!(engine.failpoints().fired(), 2, "{res:?}");
    assert_all(&read_back(&ram, r, &[8]), Seen::Stamp(8), "migrate, move back");
}

#[test]
fn a_failed_copy_back_moves_the_page_back_into_its_old_frame() {
    let ram = ram(4 * MIB);
    let engine = engine(&ram);
    let r = range(R, 16);
    stamp(&ram, r, 3);
    let (lo, hi) = host_span(&ram, r);
    let before = pfns(&ram, r);
    engine.failpoints().arm(Rule::new(Op::Copy, libc::ENOMEM).partial(4).within(lo, hi));
    engine.failpoints().arm(Rule::new(Op::Copy, libc::ENOMEM).within(lo, hi));
    let err = engine.offline(r, Mode::Migrate, soon(2000)).unwrap_err();
    assert_eq!(ioctl_of(&err), ("UFFDIO_COPY", libc::ENOMEM), "{err}");
    assert_eq!(page_of(&err), R + 4 * PAGE);
    assert_eq!(states(&ram, r), vec![PageState::Present; 16]);
    let after = pfns(&ram, r);
    // Four went into fresh frames; the rest were moved back into theirs.
    for i in 0..16 {
        assert!(after[i].is_some(), "page {i} is not in memory");
        assert_eq!(after[i] == before[i], i >= 4, "page {i}: {:?} -> {:?}", before[i], after[i]);
    }
    assert_all(&read_back(&ram, r, &[3]), Seen::Stamp(3), "after a failed copy back");
    let report = engine.offline(r, Mode::Migrate, soon(2000)).unwrap();
    assert_eq!(report.frames_moved, 16);
    assert_all(&read_back(&ram, r, &[3]), Seen::Stamp(3), "after the second migrate");
}

#[test]
fn copy_back_retries_eagain_and_looks_before_trusting_eexist() {
    let ram = ram(4 * MIB);
    let engine = engine(&ram);
    let r = range(R, 16);
    stamp(&ram, r, 4);
    let (lo, hi) = host_span(&ram, r);
    // EAGAIN (a remove event pending) three times: retried.
    engine.failpoints().arm(Rule::new(Op::Copy, libc::EAGAIN).times(3).within(lo, hi));
    let report = engine.offline(r, Mode::Migrate, soon(2000)).unwrap();
    assert_eq!(report.frames_moved, 16);
    assert_all(&read_back(&ram, r, &[4]), Seen::Stamp(4), "after EAGAIN on the copy back");
    // EEXIST on the copy back: the destination is looked at (a MOVE of it
    // finds nothing there) and the copy is made again, not skipped.
    engine.failpoints().arm(Rule::new(Op::Copy, libc::EEXIST).within(lo, hi));
    let report = engine.offline(r, Mode::Migrate, soon(2000)).unwrap();
    assert_eq!(engine.failpoints().fired(), 4);
    assert_eq!(report.frames_moved, 16);
    assert_eq!(states(&ram, r), vec![PageState::Present; 16]);
    assert_all(&read_back(&ram, r, &[4]), Seen::Stamp(4), "after EEXIST on the copy back");
}

#[test]
fn pages_that_cannot_go_back_are_kept_in_the_store_not_lost() {
    let ram = ram(4 * MIB);
    let engine = engine(&ram);
    let r = range(R, 16);
    stamp(&ram, r, 5);
    let (lo, hi) = host_span(&ram, r);
    // The copy back fails, and so does every move back (after the
    // take-out's own move).
    engine.failpoints().arm(Rule::new(Op::Copy, libc::ENOMEM).within(lo, hi));
    engine.failpoints().arm(Rule::new(Op::Move, libc::ENOMEM).skip(1).times(u64::MAX).within(lo, hi));
    let err = engine.offline(r, Mode::Migrate, soon(2000)).unwrap_err();
    assert_eq!(ioctl_of(&err), ("UFFDIO_COPY", libc::ENOMEM), "the first failure is reported: {err}");
    engine.failpoints().clear();
    assert_eq!(engine.store().len(), 16, "the pages' contents are in the store");
    assert_eq!(states(&ram, r), vec![PageState::Missing; 16]);
    assert_all(&read_back(&ram, r, &[5]), Seen::Stamp(5), "restored from the store");
    assert!(engine.wait_idle(soon(5000)));
    assert_eq!(engine.store().len(), 0, "restored pages stay in the store");
    engine.offline(r, Mode::Migrate, soon(2000)).unwrap();
    assert_all(&read_back(&ram, r, &[5]), Seen::Stamp(5), "after the second migrate");
}

#[test]
fn a_failed_staging_clear_loses_nothing_and_the_next_offline_clears_it() {
    for mode in [Mode::Migrate, Mode::Evict, Mode::Unplug] {
        let ram = ram(4 * MIB);
        let engine = engine(&ram);
        let r = range(R, 16);
        stamp(&ram, r, 6);
        engine.failpoints().arm(Rule::new(Op::Discard, libc::EIO));
        let err = engine.offline(r, mode, soon(2000)).unwrap_err();
        match &err {
            OfflineError::Staging(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{mode}"),
            other => panic!("{mode}: expected a staging error, got {other}"),
        }
        let want = if mode == Mode::Unplug { Seen::Zeros } else { Seen::Stamp(6) };
        assert_all(&read_back(&ram, r, &[6]), want.clone(), &format!("{mode} after a failed clear"));
        // The next offline finds the staging area full and empties it.
        let other = range(R + 64 * PAGE, 16);
        stamp(&ram, other, 7);
        engine.offline(other, mode, soon(2000)).unwrap();
        let want_other = if mode == Mode::Unplug { Seen::Zeros } else { Seen::Stamp(7) };
        assert_all(&read_back(&ram, other, &[7]), want_other, &format!("{mode} of another range"));
        engine.offline(r, mode, soon(2000)).unwrap();
        assert_all(&read_back(&ram, r, &[6]), want, &format!("{mode} again"));
    }
}

#[test]
fn a_staging_slot_found_full_is_cleared_not_fatal() {
    let ram = ram(4 * MIB);
    let engine = engine(&ram);
    let r = range(R, 16);
    stamp(&ram, r, 8);
    let (lo, hi) = host_span(&ram, r);
    // The take-out's move meets a full slot: EEXIST, as the kernel answers
    // a MOVE into a slot that holds a page.
    engine.failpoints().arm(Rule::new(Op::Move, libc::EEXIST).within(lo, hi));
    let report = engine.offline(r, Mode::Migrate, soon(2000)).unwrap();
    assert_eq!((report.pages_taken, report.frames_moved), (16, 16));
    assert_all(&read_back(&ram, r, &[8]), Seen::Stamp(8), "after a full slot");
}

/// The cause of a staging area that stayed full: an unplug stopped by a
/// page the kernel keeps pinned put the pages it had staged back, and then
/// skipped the clear (nothing was left "moved"), so every later offline met
/// `EEXIST` at the first slot.
#[test]
fn an_unplug_stopped_by_a_kernel_pin_leaves_the_staging_area_empty() {
    let ram = ram(4 * MIB);
    let engine = engine(&ram);
    let r = range(R, 16);
    stamp(&ram, r, 9);
    // Page 10 is pinned by the kernel, and its holder never lets go.
    let pinned = range(R + 10 * PAGE, 1);
    let buffer = FixedBuffer::register(ram.host_range(pinned.start, PAGE).unwrap(), PAGE_SIZE).unwrap();
    let held = busy(engine.offline(r, Mode::Unplug, soon(300)), "the kernel pin");
    assert!(held.kernel_pinned > 0 && held.discarded == 0, "{held:?}");
    assert_all(&read_back(&ram, r, &[9]), Seen::Stamp(9), "a stopped unplug put every page back");
    // Any later offline works.
    let other = range(R + 64 * PAGE, 16);
    stamp(&ram, other, 10);
    engine.offline(other, Mode::Migrate, soon(2000)).unwrap();
    engine.offline(other, Mode::Evict, soon(2000)).unwrap();
    assert_all(&read_back(&ram, other, &[10]), Seen::Stamp(10), "the next offlines");
    drop(buffer);
    engine.offline(r, Mode::Unplug, soon(2000)).unwrap();
    assert_all(&read_back(&ram, r, &[9]), Seen::Zeros, "the unplug once the pin is gone");
}

#[test]
fn unplug_retries_and_reports_a_failed_poison() {
    let ram = ram(4 * MIB);
    let engine = engine_with(&ram, UnplugPolicy::Poison);
    let r = range(R, 8);
    stamp(&ram, r, 11);
    let (lo, hi) = host_span(&ram, r);
    // EAGAIN is retried.
    engine.failpoints().arm(Rule::new(Op::Poison, libc::EAGAIN).times(3).within(lo, hi));
    engine.offline(r, Mode::Unplug, soon(2000)).unwrap();
    assert_eq!(states(&ram, r), vec![PageState::Offline; 8]);
    assert_all(&read_back(&ram, r, &[11]), Seen::Poisoned, "after EAGAIN on the poison");
    assert_eq!(engine.replug(r).unwrap(), 8);
    // ENOMEM at the third page: reported, and no page shows its old data
    // (the one not poisoned is a hole whose fault poisons it).
    stamp(&ram, r, 12);
    engine.failpoints().arm(Rule::new(Op::Poison, libc::ENOMEM).partial(2).within(lo, hi));
    engine.failpoints().arm(Rule::new(Op::Poison, libc::ENOMEM).within(lo, hi));
    let err = engine.offline(r, Mode::Unplug, soon(2000)).unwrap_err();
    assert_eq!(ioctl_of(&err), ("UFFDIO_POISON", libc::ENOMEM), "{err}");
    assert_eq!(page_of(&err), R + 2 * PAGE);
    assert_eq!(states(&ram, r), vec![PageState::Offline; 8]);
    assert_all(&read_back(&ram, r, &[11, 12]), Seen::Poisoned, "after a failed poison");
    assert_eq!(engine.replug(r).unwrap(), 8);
    assert_all(&read_back(&ram, r, &[11, 12]), Seen::Zeros, "after the replug");
}

#[test]
fn replug_retries_eagain_and_a_failed_copy_leaves_the_page_unplugged() {
    let ram = ram(4 * MIB);
    let engine = engine_with(&ram, UnplugPolicy::Poison);
    let r = range(R, 8);
    stamp(&ram, r, 13);
    engine.offline(r, Mode::Unplug, soon(2000)).unwrap();
    let (lo, hi) = host_span(&ram, r);
    engine.failpoints().arm(Rule::new(Op::Copy, libc::ENOMEM).skip(3).within(lo, hi));
    let err = engine.replug(r).unwrap_err();
    assert_eq!(ioctl_of(&err), ("UFFDIO_COPY", libc::ENOMEM), "{err}");
    assert_eq!(page_of(&err), R + 3 * PAGE);
    let seen = read_back(&ram, r, &[13]);
    for (i, s) in seen.iter().enumerate() {
        let want = if i == 3 { Seen::Poisoned } else { Seen::Zeros };
        assert_eq!(*s, want, "page {i}");
    }
    assert_eq!(states(&ram, range(R + 3 * PAGE, 1)), vec![PageState::Offline]);
    engine.failpoints().arm(Rule::new(Op::Copy, libc::EAGAIN).times(3).within(lo, hi));
    assert_eq!(engine.replug(r).unwrap(), 1);
    assert_all(&read_back(&ram, r, &[13]), Seen::Zeros, "after the second replug");
}

/// Pages populated before the engine registered the memory: the kernel
/// holds them, the engine calls them `Missing`.
#[test]
fn unplug_and_evict_act_on_what_the_kernel_holds() {
    for (mode, policy) in
        [(Mode::Unplug, UnplugPolicy::Zero), (Mode::Unplug, UnplugPolicy::Poison), (Mode::Evict, UnplugPolicy::Zero)]
    {
        let ram = ram(4 * MIB);
        let r = range(R, 8);
        stamp(&ram, r, 14);
        let engine = engine_with(&ram, policy);
        assert_eq!(states(&ram, r), vec![PageState::Missing; 8], "the engine does not know them");
        let report = engine.offline(r, mode, soon(2000)).unwrap();
        assert_eq!(report.pages_taken, 8, "{mode}");
        let want = match (mode, policy) {
            (Mode::Evict, _) => Seen::Stamp(14),
            (_, UnplugPolicy::Zero) => Seen::Zeros,
            _ => Seen::Poisoned,
        };
        if mode == Mode::Evict {
            assert_eq!(engine.store().len(), 8);
            assert_eq!(pfns(&ram, r), vec![None; 8], "evicted frames were not freed");
        }
        assert_all(&read_back(&ram, r, &[14]), want, &format!("{mode} ({policy:?})"));
    }
}

#[test]
fn a_busy_staging_area_fails_a_later_offline_at_its_deadline() {
    let ram = ram(4 * MIB);
    let engine = engine(&ram);
    let held = range(R, 8);
    stamp(&ram, held, 15);
    let other = range(R + 64 * PAGE, 8);
    stamp(&ram, other, 16);
    // An offline that holds the staging area: stopped at a kernel pin,
    // retrying until its deadline.
    let pinned = range(R + 4 * PAGE, 1);
    let buffer = FixedBuffer::register(ram.host_range(pinned.start, PAGE).unwrap(), PAGE_SIZE).unwrap();
    std::thread::scope(|s| {
        let h = s.spawn(|| engine.offline(held, Mode::Migrate, soon(1500)));
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        let before = pfns(&ram, other);
        match engine.offline(other, Mode::Migrate, t + Duration::from_millis(200)) {
            Err(e @ OfflineError::StagingBusy { .. }) => assert!(e.is_busy()),
            other => panic!("expected StagingBusy, got {other:?}"),
        }
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(200) && took < Duration::from_millis(800), "took {took:?}");
        assert_eq!(pfns(&ram, other), before, "a busy offline moved pages");
        assert_eq!(states(&ram, other), vec![PageState::Present; 8]);
        busy(h.join().unwrap(), "the kernel pin");
    });
    drop(buffer);
    engine.offline(other, Mode::Migrate, soon(2000)).unwrap();
    engine.offline(held, Mode::Migrate, soon(2000)).unwrap();
    assert_all(&read_back(&ram, held, &[15]), Seen::Stamp(15), "the held range");
    assert_all(&read_back(&ram, other, &[16]), Seen::Stamp(16), "the other range");
}

/// A balloon discards a page whose contents sit in staging while the
/// offline waits for a kernel pin further on: once `madvise` returns the
/// page must read as zeros, so the offline must not put the contents back.
#[test]
fn a_discard_while_the_offline_holds_the_page_wins() {
    let ram = ram(4 * MIB);
    let engine = engine(&ram);
    let r = range(R, 8);
    stamp(&ram, r, 17);
    let pinned = range(R + 6 * PAGE, 1);
    let buffer = FixedBuffer::register(ram.host_range(pinned.start, PAGE).unwrap(), PAGE_SIZE).unwrap();
    std::thread::scope(|s| {
        let h = s.spawn(|| engine.offline(r, Mode::Migrate, soon(600)));
        // Pages 0..6 are in staging by now; the offline retries page 6.
        std::thread::sleep(Duration::from_millis(200));
        discard(&ram, R + PAGE, PAGE);
        busy(h.join().unwrap(), "the kernel pin");
    });
    drop(buffer);
    let seen = read_back(&ram, r, &[17]);
    for (i, s) in seen.iter().enumerate() {
        let want = if i == 1 { Seen::Zeros } else { Seen::Stamp(17) };
        assert_eq!(*s, want, "page {i}");
    }
}

#[test]
fn unplug_of_a_page_being_restored_from_the_store_drops_its_entry() {
    let ram = ram(4 * MIB);
    // Fills of page 0 wait until the test releases them.
    let source = Arc::new(ScriptedSource::zeros().hold(Fills::Covering(R)));
    let config = Config { fault_around: 1, max_window: 8, ..Config::default() };
    let engine = Engine::builder(ram.clone(), source.clone()).config(config).start().unwrap();
    let page1 = range(R + PAGE, 1);
    stamp(&ram, page1, 18);
    engine.offline(page1, Mode::Evict, soon(2000)).unwrap();
    assert_eq!(engine.store().len(), 1);
    std::thread::scope(|s| {
        // One window over page 0 (from the gated source) and page 1 (from
        // the store): page 1 stays claimed while page 0's fill waits.
        let h = s.spawn(|| engine.prefetch(range(R, 2)).unwrap());
        assert!(source.wait_held(Duration::from_secs(5)), "the fill of page 0 never started");
        assert_eq!(states(&ram, page1), vec![PageState::Resolving]);
        let unplugged = engine.offline(page1, Mode::Unplug, soon(2000));
        let stored = engine.store().len();
        // Open the gate before anything can fail, or the scope waits out
        // the hold limit.
        source.release();
        h.join().unwrap();
        unplugged.unwrap();
        assert_eq!(stored, 0, "the unplugged page's store entry leaked");
    });
    assert_all(&read_back(&ram, page1, &[18]), Seen::Zeros, "the unplugged page");
}
