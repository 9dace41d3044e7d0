//! The race and failure paths of the fault path, on real userfaultfd:
//! failpoints in our userfaultfd wrapper hold or fail one chosen call while
//! every other call stays real.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apf::failpoints::{Rule, Switch};
use apf::fault::{Dispatch, Engine};
use apf::ram::{GuestAddress, GuestRam};
use apf::source::Pattern;
use apf::uffd::{Op, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

fn ram(pages: usize) -> Arc<GuestRam> {
    Arc::new(GuestRam::anonymous(&[(GuestAddress(0), pages * PAGE_SIZE)]).unwrap())
}

/// Reads the first word of the page at `gpa` (faulting it in).
fn read_word(ram: &GuestRam, gpa: u64) -> u64 {
    let p = ram.host_range(GuestAddress(gpa), 8).unwrap();
    // SAFETY: `p` covers 8 bytes of guest RAM, mapped while `ram` lives.
    unsafe { std::ptr::read_volatile(p as *const u64) }
}

fn discard(ram: &GuestRam, gpa: u64, len: u64) {
    let p = ram.host_range(GuestAddress(gpa), len).unwrap();
    // SAFETY: MADV_DONTNEED on guest RAM, as a balloon does: the range
    // reads as zeros afterwards (through the engine), nothing dangles.
    assert_eq!(unsafe { libc::madvise(p.cast(), len as usize, libc::MADV_DONTNEED) }, 0);
}

/// Waits for `flag`, up to `limit`.
fn wait_for(flag: &AtomicBool, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while !flag.load(Ordering::Acquire) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

/// Lines up the discard/install race of a balloon: an install whose
/// sequence check has passed is held just before its `UFFDIO_COPY`, a
/// thread discards the page, and the page is read once `madvise` returns.
/// Returns (whether `madvise` returned while the install was held, the
/// word read after it returned).
fn discard_racing_an_install(unordered: bool) -> (bool, u64) {
    let ram = ram(64);
    let pattern = Pattern { seed: 3 };
    let engine =
        Engine::builder(ram.clone(), Arc::new(pattern)).dispatch(Dispatch::Workers).max_window(1).start().unwrap();
    let fp = engine.failpoints().clone();
    fp.switch_off(Switch::UnorderedRemoves, unordered);
    let gpa = 5 * PAGE;
    let host = ram.host_range(GuestAddress(gpa), PAGE).unwrap() as u64;
    fp.arm(Rule::pause(Op::Copy).within(host, host + PAGE));

    // A reader faults the page; its install checks and stops at the gate.
    let reader = {
        let ram = ram.clone();
        std::thread::spawn(move || read_word(&ram, gpa))
    };
    assert!(fp.wait_paused(Duration::from_secs(5)), "the install never reached its COPY");

    // A balloon discards the page meanwhile.
    let discarded = Arc::new(AtomicBool::new(false));
    let discarder = {
        let (ram, discarded) = (ram.clone(), discarded.clone());
        std::thread::spawn(move || {
            discard(&ram, gpa, PAGE);
            discarded.store(true, Ordering::Release);
        })
    };
    let returned_while_held = wait_for(&discarded, Duration::from_millis(300));
    fp.open_gate();
    discarder.join().unwrap();
    let first = reader.join().unwrap();
    // The reader's own read saw the page at some point of the race: the
    // source's contents or zeros are both linearizable for it.
    let mut page = vec![0u8; PAGE_SIZE];
    pattern.write(gpa, &mut page);
    let source_word = u64::from_le_bytes(page[..8].try_into().unwrap());
    assert_ne!(source_word, 0);
    assert!(first == 0 || first == source_word, "reader saw {first:#x}");
    // Now that madvise has returned, the page must read as zeros.
    let after = read_word(&ram, gpa);
    drop(engine);
    (returned_while_held, after)
}

#[test]
fn a_discard_waits_for_the_install_it_races_and_the_page_reads_zeros() {
    let (returned_while_held, after) = discard_racing_an_install(false);
    assert!(!returned_while_held, "madvise returned while an install that checked before it was still pending");
    assert_eq!(after, 0, "stale contents after the discard returned");
}

#[test]
fn without_the_ordering_the_same_race_leaves_stale_contents() {
    // Proof that the test above can fail: with the ordering switched off,
    // the discard returns at once and the held install lands after it.
    let (returned_while_held, after) = discard_racing_an_install(true);
    assert!(returned_while_held, "madvise should not wait without the ordering");
    assert_ne!(after, 0, "the held install should have landed after the discard");
}
