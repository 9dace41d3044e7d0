//! Hand-made guests that each do one thing, under real KVM: malformed agent
//! messages, accesses outside RAM, poisoned pages, a guest that never
//! stops, balloon requests, a guest that tries to unplug the checksum
//! device's ring from under it. Each checks that the VMM answers clearly
//! and never crashes.

use std::time::{Duration, Instant};

use agent_proto::{
    checksum, ErrorCode, OfflineOp, Reply, Request, AGENT_PORT, CHECKSUM_PORT, DESC_DONE_SEQ, DESC_LEN, DESC_STATUS,
    DESC_SUM, MAILBOX_BASE, MAX_MESSAGE, PAGE_SIZE, REPLY_OFFSET, RING_BUF, RING_DESC, RING_LEN,
};
use apf::UnplugPolicy;
use apf_tests::{assert_offlines_accounted, read_bytes, read_word, require_kvm, Code};
use vmm::config::{GuestImage, RunConfig};
use vmm::report::{Report, VcpuExit};
use vmm::vcpu::VcpuError;

const RAM: u64 = 16 << 20;

fn tiny(code: Code) -> RunConfig {
    RunConfig {
        mem: Some(RAM),
        vcpus: Some(1),
        duration: Duration::ZERO,
        grace: Duration::from_secs(10),
        offline_every: None,
        checksum: false,
        guest_image: Some(GuestImage::Raw(code.bytes())),
        ..RunConfig::default()
    }
}

/// What vCPU 0's mailbox held as a reply after the run.
type MailboxReply = Option<Result<(u32, Reply), agent_proto::DecodeError>>;

/// Runs `cfg` and returns the report and the reply in vCPU 0's mailbox.
fn run_reading_reply(cfg: &RunConfig) -> (Report, MailboxReply) {
    let mut reply = None;
    let report = vmm::vm::run_and_inspect(cfg, |access| {
        let mut buf = [0u8; MAX_MESSAGE];
        read_bytes(access.ram(), MAILBOX_BASE + REPLY_OFFSET as u64, &mut buf);
        reply = Some(Reply::decode(&buf));
    })
    .expect("the VM starts");
    (report, reply)
}

fn has_error(report: &Report, needle: &str) -> bool {
    report.errors.iter().any(|e| e.contains(needle))
}

#[test]
fn malformed_messages_get_error_replies_and_are_counted() {
    require_kvm!();
    let mut good = [0u8; MAX_MESSAGE];
    let n = Request::Hello { vcpu: 0 }.encode(5, &mut good).unwrap();
    let mut bad_version = good;
    bad_version[4] = 7;
    let mut bad_kind = good;
    bad_kind[6] = 0x42;
    let mut bad_len = good;
    bad_len[12] = 99;
    let cases: [(&[u8], ErrorCode); 4] = [
        (&[0xef, 0xbe, 0xad, 0xde], ErrorCode::BadMagic),
        (&bad_version[..n], ErrorCode::BadVersion),
        (&bad_kind[..n], ErrorCode::UnknownKind),
        (&bad_len[..n], ErrorCode::BadLength),
    ];
    for (bytes, code) in cases {
        let guest = Code::new().store(MAILBOX_BASE, bytes).out32(AGENT_PORT, (MAILBOX_BASE >> 12) as u32).hlt();
        let (report, reply) = run_reading_reply(&tiny(guest));
        match reply {
            Some(Ok((_, Reply::Error { code: got, .. }))) => assert_eq!(got, code),
            other => panic!("expected an error reply {code:?}, got {other:?}"),
        }
        assert!(!report.ok);
        assert_eq!(report.protocol_errors, 1, "{:?}", report.errors);
        assert!(has_error(&report, code.as_str()), "{code:?} not reported: {:?}", report.errors);
        assert!(matches!(report.vcpus[0].exit, VcpuExit::Halted), "{:?}", report.vcpus[0]);
    }
}

#[test]
fn out_of_range_requests_are_refused_without_touching_anything() {
    require_kvm!();
    let cases = [
        (Request::Offline { op: OfflineOp::Migrate, gpa: RAM, len: 4096 }, ErrorCode::OutOfRange),
        (Request::Offline { op: OfflineOp::Evict, gpa: RAM - 4096, len: 8192 }, ErrorCode::OutOfRange),
        (Request::Offline { op: OfflineOp::Unplug, gpa: u64::MAX - 4095, len: 8192 }, ErrorCode::OutOfRange),
        (Request::Offline { op: OfflineOp::Migrate, gpa: 0x40_0000, len: 0 }, ErrorCode::OutOfRange),
        (Request::Offline { op: OfflineOp::Migrate, gpa: 0x40_0100, len: 4096 }, ErrorCode::Unaligned),
        (Request::Hello { vcpu: 3 }, ErrorCode::BadValue),
    ];
    for (req, code) in cases {
        let (report, reply) = run_reading_reply(&tiny(Code::new().send(&req).hlt()));
        match reply {
            Some(Ok((1, Reply::Error { code: got, .. }))) => assert_eq!(got, code, "{req:?}"),
            other => panic!("{req:?}: expected an error reply {code:?}, got {other:?}"),
        }
        assert_eq!(report.protocol_errors, 1, "{req:?}: {:?}", report.errors);
        assert_eq!(report.offline.completed, 0);
    }
}

#[test]
fn a_mailbox_outside_ram_is_reported_and_the_guest_goes_on() {
    require_kvm!();
    // A frame far past RAM, then one just past it, then a clean hello.
    let guest = Code::new()
        .out32(AGENT_PORT, 0xffff_ffff)
        .out32(AGENT_PORT, (RAM >> 12) as u32)
        .send(&Request::Hello { vcpu: 0 })
        .hlt();
    let (report, reply) = run_reading_reply(&tiny(guest));
    assert!(matches!(reply, Some(Ok((1, Reply::Config(_))))), "{reply:?}");
    assert_eq!(report.protocol_errors, 2, "{:?}", report.errors);
    assert!(has_error(&report, "outside guest RAM; no reply"), "{:?}", report.errors);
    assert!(matches!(report.vcpus[0].exit, VcpuExit::Halted), "{:?}", report.vcpus[0]);
}

#[test]
fn guest_access_outside_ram_names_the_vcpu_and_address() {
    require_kvm!();
    for (code, access) in [(Code::new().write64(RAM + 0x1238), "write"), (Code::new().read64(RAM + 0x1238), "read")] {
        let report = vmm::vm::run(&tiny(code.hlt())).unwrap();
        assert!(!report.ok);
        let e = report.errors.iter().find(|e| e.contains("outside guest RAM")).expect("reported");
        assert!(e.contains("vCPU 0"), "{e}");
        assert!(e.contains(&format!("{access} of 8 bytes at 0x1001238")), "{e}");
        assert!(
            matches!(&report.vcpus[0].exit, VcpuExit::Failed(e) if matches!(**e, VcpuError::Exit { vcpu: 0, .. })),
            "{:?}",
            report.vcpus[0]
        );
    }
}

#[test]
fn unknown_ports_and_triple_faults_end_the_run_clearly() {
    require_kvm!();
    let report = vmm::vm::run(&tiny(Code::new().out8(0x80, 1).hlt())).unwrap();
    assert!(report.errors.iter().any(|e| e.contains("vCPU 0") && e.contains("port 0x80")), "{:?}", report.errors);
    // ud2 with no IDT: #UD, then #DF, then a triple fault.
    let report = vmm::vm::run(&tiny(Code::new().ud2())).unwrap();
    assert!(report.errors.iter().any(|e| e.contains("vCPU 0") && e.contains("triple fault")), "{:?}", report.errors);
}

#[test]
fn a_guest_that_never_stops_is_kicked_out_at_the_deadline() {
    require_kvm!();
    let cfg = RunConfig { grace: Duration::from_millis(500), ..tiny(Code::new().spin()) };
    let started = Instant::now();
    let report = vmm::vm::run(&cfg).unwrap();
    assert!(started.elapsed() < Duration::from_secs(8), "took {:?}", started.elapsed());
    assert!(!report.ok);
    assert!(has_error(&report, "did not finish"), "{:?}", report.errors);
    assert!(matches!(report.vcpus[0].exit, VcpuExit::Stopped), "{:?}", report.vcpus[0]);
}

#[test]
fn a_poisoned_page_fails_the_vcpu_not_the_vmm() {
    require_kvm!();
    // The guest unplugs a page under the poison policy, then touches it:
    // KVM sends SIGBUS to the vCPU thread.
    let page = 0x80_0000;
    let guest = Code::new().send(&Request::Offline { op: OfflineOp::Unplug, gpa: page, len: 4096 }).read64(page).hlt();
    let cfg = RunConfig { unplug_policy: UnplugPolicy::Poison, grace: Duration::from_secs(5), ..tiny(guest) };
    let report = vmm::vm::run(&cfg).unwrap();
    assert!(!report.ok);
    let e = report.errors.iter().find(|e| e.contains("poisoned")).unwrap_or_else(|| panic!("{:?}", report.errors));
    assert!(e.contains("vCPU 0") && e.contains("0x800000"), "{e}");
}

#[test]
fn balloon_requests_are_checked_like_offlines() {
    require_kvm!();
    // 16 MiB with one vCPU: data pages start at 4 MiB.
    let cases = [
        (Request::Balloon { gpa: RAM, len: 4096 }, ErrorCode::OutOfRange),
        (Request::Balloon { gpa: u64::MAX - 4095, len: 8192 }, ErrorCode::OutOfRange),
        (Request::Balloon { gpa: 0x80_0000, len: 0 }, ErrorCode::OutOfRange),
        (Request::Balloon { gpa: 0x80_0010, len: 4096 }, ErrorCode::Unaligned),
        (Request::Balloon { gpa: 0x80_0000, len: 100 }, ErrorCode::Unaligned),
        // The page tables, the agent's code, its mailbox: not data pages.
        (Request::Balloon { gpa: agent_proto::PML4, len: 4096 }, ErrorCode::InUse),
        (Request::Balloon { gpa: agent_proto::AGENT_LOAD, len: 4096 }, ErrorCode::InUse),
        (Request::Balloon { gpa: MAILBOX_BASE, len: 4096 }, ErrorCode::InUse),
    ];
    for (req, code) in cases {
        let (report, reply) = run_reading_reply(&tiny(Code::new().send(&req).hlt()));
        match reply {
            Some(Ok((1, Reply::Error { code: got, .. }))) => assert_eq!(got, code, "{req:?}"),
            other => panic!("{req:?}: expected an error reply {code:?}, got {other:?}"),
        }
        assert_eq!(report.protocol_errors, 1, "{req:?}: {:?}", report.errors);
        assert_eq!(report.balloon.discards, 0);
    }
    // A data page the guest wrote reads as zeros once the balloon took it.
    let page = 0x80_0000;
    let guest = Code::new()
        .mov_rax(0x5eed)
        .raw(&[0x48, 0x89, 0xc3]) // mov rbx, rax
        .write64(page + 8)
        .send(&Request::Balloon { gpa: page, len: 2 * PAGE_SIZE })
        .read64(page + 8)
        .write64(page + 16)
        .hlt();
    let mut words = [u64::MAX; 2];
    let report = vmm::vm::run_and_inspect(&tiny(guest), |access| {
        words = [read_word(access.ram(), page + 8), read_word(access.ram(), page + 16)];
    })
    .unwrap();
    // A tiny guest never says done; nothing else went wrong.
    assert_eq!(report.errors, ["vCPU 0: halted without reporting done"]);
    assert_eq!((report.balloon.discards, report.balloon.pages_discarded), (1, 2));
    assert_eq!(words, [0; 2], "the discarded word, and what the guest read there after the discard");
}

#[test]
fn a_guest_cannot_unplug_the_ring_from_under_the_checksum_device() {
    require_kvm!();
    // A hostile guest, under the poison policy: it submits checksum work
    // and, while the device worker serves it through its pin, asks again
    // and again to unplug the ring (whole, or a page that overlaps it) and
    // to balloon it away, between migrations and evictions of the ring
    // that the pin must survive. Were the ring poisoned under the worker,
    // it would take SIGBUS outside KVM_RUN and end the VMM.
    const ROUNDS: u32 = 150;
    let ring = (RING_DESC, RING_LEN);
    let len = 100u32;
    let mut guest = Code::new();
    for seq in 1..=ROUNDS {
        let desc = u64::from(len) | u64::from(seq) << 32;
        guest = guest
            .store(RING_DESC + DESC_LEN, &desc.to_le_bytes())
            .out32(CHECKSUM_PORT, 0)
            // Right behind the doorbell: the worker is serving it now.
            .send(&Request::Offline { op: OfflineOp::Unplug, gpa: ring.0, len: ring.1 })
            // Replugged before the guest touches the ring again, so that
            // an unplug that went through would hurt the VMM, not the
            // guest.
            .send(&Request::Offline { op: OfflineOp::Replug, gpa: ring.0, len: ring.1 })
            .send(&Request::Offline { op: OfflineOp::Migrate, gpa: ring.0, len: ring.1 })
            .send(&Request::Balloon { gpa: RING_BUF, len: PAGE_SIZE })
            .send(&Request::Offline { op: OfflineOp::Evict, gpa: ring.0, len: ring.1 })
            .send(&Request::Offline { op: OfflineOp::Unplug, gpa: RING_DESC - PAGE_SIZE, len: 2 * PAGE_SIZE })
            .send(&Request::Offline { op: OfflineOp::Replug, gpa: RING_DESC - PAGE_SIZE, len: 2 * PAGE_SIZE });
    }
    let cfg = RunConfig {
        checksum: true,
        unplug_policy: UnplugPolicy::Poison,
        grace: Duration::from_secs(30),
        ..tiny(guest.hlt())
    };
    let started = Instant::now();
    let (mut last, mut last_reply) = (None, None);
    let report = vmm::vm::run_and_inspect(&cfg, |access| {
        // The device finishes the last submission on a ring it still has.
        let deadline = Instant::now() + Duration::from_secs(5);
        // A ring the guest managed to unplug reads as an error, not a word
        // (through the VMM's access, not vm-memory: a poisoned page would
        // end this process with SIGBUS).
        let word = |off: u64| {
            let mut b = [0u8; 8];
            access.read(RING_DESC + off, &mut b, Instant::now() + Duration::from_secs(2)).ok()?;
            Some(u64::from_le_bytes(b))
        };
        while word(DESC_DONE_SEQ).is_some_and(|w| w as u32 != ROUNDS) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        last = Some((word(DESC_DONE_SEQ).map(|w| w as u32), word(DESC_STATUS).map(|w| w as u32), word(DESC_SUM)));
        let mut buf = [0u8; MAX_MESSAGE];
        read_bytes(access.ram(), MAILBOX_BASE + REPLY_OFFSET as u64, &mut buf);
        last_reply = Some(Reply::decode(&buf));
    })
    .expect("the VM starts");
    assert!(started.elapsed() < Duration::from_secs(40), "took {:?}", started.elapsed());
    // The VMM survived and the guest ran to its end.
    assert!(matches!(report.vcpus[0].exit, VcpuExit::Halted), "{:?}", report.errors);
    // Every unplug and balloon of the ring got an error reply, and only
    // those were refused.
    assert_eq!(report.protocol_errors, 3 * u64::from(ROUNDS), "{:?}", report.errors);
    // Nothing else went wrong: no pin failed, no device error. (The list
    // keeps the first errors only; a tiny guest never says done; a
    // doorbell may find the device's queue full.)
    let expected = ["which a device keeps pinned", "checksum queue full", "halted without reporting done", "... and "];
    let unexpected: Vec<&String> = report.errors.iter().filter(|e| !expected.iter().any(|x| e.contains(x))).collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    assert_eq!(report.balloon.discards, 0);
    assert!(report.engine_json.contains("\"pages_unplugged\":0,"), "{}", report.engine_json);
    // Migrations and evictions of the ring went through, and the device
    // kept its pin through them.
    let o = &report.offline;
    assert_eq!(o.guest_requested, 4 * u64::from(ROUNDS), "replugs, migrations and evictions");
    assert_eq!(o.requests, o.guest_requested, "no host storm");
    assert_offlines_accounted(&report);
    assert!(o.completed > 0 && report.pin_invalidations > 0, "{}", report.summary());
    assert!(report.checksums > 0, "{}", report.summary());
    assert_eq!(report.pins_leaked, 0);
    let sum = checksum(&[0u8; 100]);
    assert_eq!(last, Some((Some(ROUNDS), Some(0), Some(sum))), "the device's last answer");
    // The last request, a replug of nothing unplugged, was acknowledged.
    assert!(matches!(last_reply, Some(Ok((1, Reply::Ack { value: 0, .. })))), "{last_reply:?}");
}

#[test]
fn sse_runs_natively_in_the_guest() {
    require_kvm!();
    // movq xmm0, rax; xorps xmm1, xmm1; paddq xmm0, xmm1; movq rbx, xmm0;
    // then store rbx where the VMM reads it.
    let sse = [0x66, 0x48, 0x0f, 0x6e, 0xc0, 0x0f, 0x57, 0xc9, 0x66, 0x0f, 0xd4, 0xc1, 0x66, 0x48, 0x0f, 0x7e, 0xc3];
    let code = Code::new().mov_rax(0x1234_5678_9abc).raw(&sse);
    let report = vmm::vm::run_and_inspect(&tiny(code.write64(0x80_0000).hlt()), |access| {
        assert_eq!(read_word(access.ram(), 0x80_0000), 0x1234_5678_9abc, "SSE round trip");
    })
    .unwrap();
    assert!(matches!(report.vcpus[0].exit, VcpuExit::Halted), "{:?}", report.errors);
}

/// A page source that stalls on one page (until released, or for at most
/// `max`) and fails on another; zeros elsewhere.
struct Faulty {
    stall: u64,
    fail: u64,
    max: Duration,
    released: std::sync::atomic::AtomicBool,
}

impl apf::PageSource for Faulty {
    fn fill(&self, gpa: apf::GuestAddress, buf: &mut [u8]) -> Result<(), apf::SourceError> {
        let range = gpa.0..gpa.0 + buf.len() as u64;
        if range.contains(&self.fail) {
            return Err(apf::SourceError::NotCovered(apf::GuestRange::new(gpa, buf.len() as u64)));
        }
        if range.contains(&self.stall) {
            let until = Instant::now() + self.max;
            while !self.released.load(std::sync::atomic::Ordering::Acquire) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        buf.fill(0);
        Ok(())
    }

    fn kind(&self) -> apf::SourceKind {
        apf::SourceKind::Blocking
    }

    fn name(&self) -> &'static str {
        "faulty"
    }
}

#[test]
fn a_vcpu_blocked_on_a_stalled_page_is_kicked_out() {
    require_kvm!();
    let source = std::sync::Arc::new(Faulty {
        stall: 0x90_0000,
        fail: u64::MAX,
        max: Duration::from_secs(20),
        released: false.into(),
    });
    let cfg = RunConfig {
        grace: Duration::from_millis(300),
        source: Some(vmm::config::SourceOverride(source.clone())),
        ..tiny(Code::new().read64(0x90_0000).hlt())
    };
    let started = Instant::now();
    let report = vmm::vm::run_and_inspect(&cfg, |_| {
        // The vCPU has left KVM_RUN while the page is still missing.
        source.released.store(true, std::sync::atomic::Ordering::Release);
    })
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(matches!(report.vcpus[0].exit, VcpuExit::Stopped), "{:?}", report.errors);
    assert!(has_error(&report, "did not finish"), "{:?}", report.errors);
}

#[test]
fn a_failing_source_fails_the_vcpu_with_the_page_named() {
    require_kvm!();
    let source =
        std::sync::Arc::new(Faulty { stall: u64::MAX, fail: 0xa0_0000, max: Duration::ZERO, released: false.into() });
    let cfg = RunConfig {
        grace: Duration::from_secs(10),
        source: Some(vmm::config::SourceOverride(source)),
        ..tiny(Code::new().read64(0xa0_0000).hlt())
    };
    let report = vmm::vm::run(&cfg).unwrap();
    assert!(!report.ok);
    assert!(
        matches!(&report.vcpus[0].exit, VcpuExit::Failed(e) if matches!(&**e, VcpuError::Poisoned { vcpu: 0, gpa, .. } if gpa == "0xa00000")),
        "{:?}",
        report.vcpus[0]
    );
    assert!(
        report.errors.iter().any(|e| e.starts_with("engine:")),
        "the source's error is reported: {:?}",
        report.errors
    );
}
