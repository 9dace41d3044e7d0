//! What must hold for anything a guest puts in an agent mailbox and rings
//! the doorbell with: the VMM's own [`AgentDevice::doorbell`] on real
//! (plain) guest RAM, its replies checked against what the request asked.
//! Shared by the `mailbox` fuzz target and the VMM's replay test.
//!
//! Input: one byte choosing the vCPU that rings (one more than the guest
//! has: a vCPU the device does not know), four bytes choosing the mailbox
//! frame (up to two frames past the end of RAM), then the message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_proto::timing;
use agent_proto::{Config, ErrorCode, Layout, Reply, Request, Workload, MAX_MESSAGE, MIN_RAM, PAGE_SIZE, REPLY_OFFSET};
use apf::{GuestAddress, GuestRam};
use vm_memory::Bytes;
use vmm::agent::AgentDevice;
use vmm::mem::GuestAccess;
use vmm::report::Errors;

/// vCPUs of the guest the device serves.
pub const VCPUS: u32 = 2;

/// Guest RAM for [`check`]: the smallest guest, mapped once per process.
pub fn guest_ram() -> Arc<GuestRam> {
    Arc::new(GuestRam::anonymous(&[(GuestAddress(0), MIN_RAM as usize)]).expect("map guest RAM"))
}

/// Rings the doorbell as `input` says; panics if a property fails.
pub fn check(ram: &Arc<GuestRam>, input: &[u8]) {
    let [who, f0, f1, f2, f3, message @ ..] = input else {
        return;
    };
    let ram_pages = MIN_RAM / PAGE_SIZE;
    let vcpu = u32::from(*who) % (VCPUS + 1);
    let pfn = (u32::from_le_bytes([*f0, *f1, *f2, *f3]) as u64 % (ram_pages + 2)) as u32;
    let message = &message[..message.len().min(MAX_MESSAGE)];
    let mailbox = u64::from(pfn) * PAGE_SIZE;
    let mem = ram.guest_memory();
    if mailbox < MIN_RAM {
        mem.write_slice(&[0u8; PAGE_SIZE as usize], GuestAddress(mailbox)).expect("clear the mailbox");
        mem.write_slice(message, GuestAddress(mailbox)).expect("write the request");
    }

    let layout = Layout::new(MIN_RAM, VCPUS).expect("the smallest guest has a layout");
    let config = Config { ram_size: MIN_RAM, vcpus: VCPUS, workload: Workload::Mixed, seed: 1, flags: 0 };
    let errors = Arc::new(Errors::default());
    let stop_at = Instant::now() + Duration::from_secs(3600);
    let device = AgentDevice::new(GuestAccess::Plain(ram.clone()), config, layout, Vec::new(), stop_at, errors.clone());
    device.doorbell(vcpu, pfn);

    if mailbox >= MIN_RAM {
        // Nowhere to reply: nothing written, one protocol error.
        assert_eq!(errors.to_vec().len(), 1, "a mailbox outside RAM is reported once");
        return;
    }
    // A balloon the device carried out over the mailbox itself discarded
    // the request (and nothing else wrote there): read what was sent.
    let mut request = [0u8; MAX_MESSAGE];
    request[..message.len()].copy_from_slice(message);
    let mut kept = [0u8; MAX_MESSAGE];
    mem.read_slice(&mut kept, GuestAddress(mailbox)).expect("read the request back");
    let discarded_here = matches!(Request::decode(&request), Ok((_, Request::Balloon { gpa, len }))
        if gpa <= mailbox && gpa.saturating_add(len) > mailbox);
    if !discarded_here {
        assert_eq!(&kept[..message.len()], message, "the device wrote over the request");
    }
    let mut raw = [0u8; MAX_MESSAGE];
    mem.read_slice(&mut raw, GuestAddress(mailbox + REPLY_OFFSET as u64)).expect("read the reply");
    let (seq, reply) = Reply::decode(&raw).expect("every mailbox inside RAM gets a reply that decodes");
    let refused = |reply: Reply| match reply {
        Reply::Error { code, .. } => Some(code),
        _ => None,
    };
    let (req_seq, req) = match Request::decode(&request) {
        Ok(r) => r,
        Err(e) => {
            assert_eq!((seq, reply), (e.seq, Reply::Error { code: e.code, detail: e.detail }));
            assert_eq!(errors.to_vec().len(), 1, "a malformed request is reported once");
            return;
        }
    };
    assert_eq!(seq, req_seq, "the reply answers another sequence number");
    if vcpu >= VCPUS {
        assert_eq!(reply, Reply::Error { code: ErrorCode::BadValue, detail: u64::from(vcpu) });
        return;
    }
    match req {
        Request::Hello { vcpu: said } if said == vcpu => assert_eq!(reply, Reply::Config(config)),
        Request::Hello { .. } => assert_eq!(refused(reply), Some(ErrorCode::BadValue)),
        Request::Offline { gpa, len, .. } => {
            // The range check, stated independently of the VMM's: a
            // non-empty, page-aligned range that ends inside RAM.
            let expected = if gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
                ErrorCode::Unaligned
            } else if len == 0 || gpa.checked_add(len).is_none_or(|end| end > MIN_RAM) {
                ErrorCode::OutOfRange
            } else {
                // Plain memory has no engine to take pages back.
                ErrorCode::Failed
            };
            assert_eq!(refused(reply), Some(expected), "{req:?} answered with {reply:?}");
        }
        Request::Balloon { gpa, len } => {
            // The same range check, then nothing below the data area (page
            // tables, mailboxes, code, stacks); the rest is discarded.
            let expected = if gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
                Err(ErrorCode::Unaligned)
            } else if len == 0 || gpa.checked_add(len).is_none_or(|end| end > MIN_RAM) {
                Err(ErrorCode::OutOfRange)
            } else if gpa < layout.data_start {
                Err(ErrorCode::InUse)
            } else {
                Ok(len / PAGE_SIZE)
            };
            match expected {
                Err(code) => assert_eq!(refused(reply), Some(code), "{req:?} answered with {reply:?}"),
                Ok(pages) => assert_eq!(reply, Reply::Ack { stop: false, value: pages }, "{req:?}"),
            }
        }
        Request::Histogram { phase, first, counts, .. } => {
            // A piece of a phase that exists, on the chunk grid, with no
            // count past the last bucket; a fresh device has none open.
            let first = first as usize;
            let known = phase == timing::phase::TOUCH || phase == timing::phase::STRESS;
            let fits = first % timing::HIST_CHUNK == 0
                && first < timing::BUCKETS
                && counts.iter().skip(timing::BUCKETS - first).all(|&c| c == 0);
            if known && fits {
                assert_eq!(reply, Reply::Ack { stop: false, value: 0 }, "{req:?}");
            } else {
                assert_eq!(refused(reply), Some(ErrorCode::BadValue), "{req:?} answered with {reply:?}");
            }
        }
        Request::Timed { phase, touches, .. } => {
            // No piece came first: only an empty phase closes.
            let known = phase == timing::phase::TOUCH || phase == timing::phase::STRESS;
            if known && touches == 0 {
                assert_eq!(reply, Reply::Ack { stop: false, value: 0 }, "{req:?}");
            } else {
                assert_eq!(refused(reply), Some(ErrorCode::BadValue), "{req:?} answered with {reply:?}");
            }
        }
        _ => assert!(matches!(reply, Reply::Ack { stop: false, value: 0 }), "{req:?} answered with {reply:?}"),
    }
}
