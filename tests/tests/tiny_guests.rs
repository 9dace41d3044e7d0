//! Hand-made guests that each do one thing, under real KVM: malformed agent
//! messages, accesses outside RAM, poisoned pages, a guest that never
//! stops. Each checks that the VMM answers clearly and never crashes.

use std::time::{Duration, Instant};

use agent_proto::{ErrorCode, OfflineOp, Reply, Request, AGENT_PORT, MAILBOX_BASE, MAX_MESSAGE, REPLY_OFFSET};
use apf::UnplugPolicy;
use apf_tests::{kvm_available, Code};
use vmm::config::{GuestImage, RunConfig};
use vmm::report::Report;

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
        access
            .read(MAILBOX_BASE + REPLY_OFFSET as u64, &mut buf, Instant::now() + Duration::from_secs(2))
            .expect("mailbox is in RAM");
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
    if !kvm_available("malformed_messages_get_error_replies_and_are_counted") {
        return;
    }
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
        assert_eq!(report.vcpus[0].exit, "halted");
    }
}

#[test]
fn out_of_range_requests_are_refused_without_touching_anything() {
    if !kvm_available("out_of_range_requests_are_refused_without_touching_anything") {
        return;
    }
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
    if !kvm_available("a_mailbox_outside_ram_is_reported_and_the_guest_goes_on") {
        return;
    }
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
    assert_eq!(report.vcpus[0].exit, "halted");
}

#[test]
fn guest_access_outside_ram_names_the_vcpu_and_address() {
    if !kvm_available("guest_access_outside_ram_names_the_vcpu_and_address") {
        return;
    }
    for (code, access) in [(Code::new().write64(RAM + 0x1238), "write"), (Code::new().read64(RAM + 0x1238), "read")] {
        let report = vmm::vm::run(&tiny(code.hlt())).unwrap();
        assert!(!report.ok);
        let e = report.errors.iter().find(|e| e.contains("outside guest RAM")).expect("reported");
        assert!(e.contains("vCPU 0"), "{e}");
        assert!(e.contains(&format!("{access} of 8 bytes at 0x1001238")), "{e}");
        assert!(report.vcpus[0].exit.starts_with("failed"), "{:?}", report.vcpus[0]);
    }
}

#[test]
fn unknown_ports_and_triple_faults_end_the_run_clearly() {
    if !kvm_available("unknown_ports_and_triple_faults_end_the_run_clearly") {
        return;
    }
    let report = vmm::vm::run(&tiny(Code::new().out8(0x80, 1).hlt())).unwrap();
    assert!(report.errors.iter().any(|e| e.contains("vCPU 0") && e.contains("port 0x80")), "{:?}", report.errors);
    // ud2 with no IDT: #UD, then #DF, then a triple fault.
    let report = vmm::vm::run(&tiny(Code::new().ud2())).unwrap();
    assert!(report.errors.iter().any(|e| e.contains("vCPU 0") && e.contains("triple fault")), "{:?}", report.errors);
}

#[test]
fn a_guest_that_never_stops_is_kicked_out_at_the_deadline() {
    if !kvm_available("a_guest_that_never_stops_is_kicked_out_at_the_deadline") {
        return;
    }
    let cfg = RunConfig { grace: Duration::from_millis(500), ..tiny(Code::new().spin()) };
    let started = Instant::now();
    let report = vmm::vm::run(&cfg).unwrap();
    assert!(started.elapsed() < Duration::from_secs(8), "took {:?}", started.elapsed());
    assert!(!report.ok);
    assert!(has_error(&report, "did not finish"), "{:?}", report.errors);
    assert_eq!(report.vcpus[0].exit, "stopped");
}

#[test]
fn a_poisoned_page_fails_the_vcpu_not_the_vmm() {
    if !kvm_available("a_poisoned_page_fails_the_vcpu_not_the_vmm") {
        return;
    }
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
fn sse_runs_natively_in_the_guest() {
    if !kvm_available("sse_runs_natively_in_the_guest") {
        return;
    }
    // movq xmm0, rax; xorps xmm1, xmm1; paddq xmm0, xmm1; movq rbx, xmm0;
    // then store rbx where the VMM reads it.
    let sse = [0x66, 0x48, 0x0f, 0x6e, 0xc0, 0x0f, 0x57, 0xc9, 0x66, 0x0f, 0xd4, 0xc1, 0x66, 0x48, 0x0f, 0x7e, 0xc3];
    let code = Code::new().mov_rax(0x1234_5678_9abc).raw(&sse);
    let report = vmm::vm::run_and_inspect(&tiny(code.write64(0x80_0000).hlt()), |access| {
        let mut word = [0xffu8; 8];
        access.read(0x80_0000, &mut word, Instant::now() + Duration::from_secs(2)).unwrap();
        assert_eq!(u64::from_le_bytes(word), 0x1234_5678_9abc, "SSE round trip");
    })
    .unwrap();
    assert_eq!(report.vcpus[0].exit, "halted", "{:?}", report.errors);
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
    fn fill(&self, gpa: apf::GuestAddress, buf: &mut [u8]) -> Result<(), apf::source::SourceError> {
        let range = gpa.0..gpa.0 + buf.len() as u64;
        if range.contains(&self.fail) {
            return Err(apf::source::SourceError::NotCovered(apf::GuestRange::new(gpa, buf.len() as u64)));
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

    fn kind(&self) -> apf::source::SourceKind {
        apf::source::SourceKind::Blocking
    }

    fn name(&self) -> &'static str {
        "faulty"
    }
}

#[test]
fn a_vcpu_blocked_on_a_stalled_page_is_kicked_out() {
    if !kvm_available("a_vcpu_blocked_on_a_stalled_page_is_kicked_out") {
        return;
    }
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
    assert_eq!(report.vcpus[0].exit, "stopped", "{:?}", report.errors);
    assert!(has_error(&report, "did not finish"), "{:?}", report.errors);
}

#[test]
fn a_failing_source_fails_the_vcpu_with_the_page_named() {
    if !kvm_available("a_failing_source_fails_the_vcpu_with_the_page_named") {
        return;
    }
    let source =
        std::sync::Arc::new(Faulty { stall: u64::MAX, fail: 0xa0_0000, max: Duration::ZERO, released: false.into() });
    let cfg = RunConfig {
        grace: Duration::from_secs(10),
        source: Some(vmm::config::SourceOverride(source)),
        ..tiny(Code::new().read64(0xa0_0000).hlt())
    };
    let report = vmm::vm::run(&cfg).unwrap();
    assert!(!report.ok);
    assert!(report.vcpus[0].exit.contains("poisoned") && report.vcpus[0].exit.contains("0xa00000"), "{:?}", report);
    assert!(
        report.errors.iter().any(|e| e.starts_with("engine:")),
        "the source's error is reported: {:?}",
        report.errors
    );
}
