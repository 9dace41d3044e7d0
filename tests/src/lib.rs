//! The integration tests' toolkit: one way to declare a KVM test
//! ([`require_kvm!`]), safe word access to guest RAM through vm-memory
//! ([`read_word`], [`write_word`], [`read_bytes`]), the check that every
//! offline of a run is accounted for ([`assert_offlines_accounted`]), and a
//! tiny assembler for hand-made guests that do one thing each ([`Code`]).
//!
//! ```
//! // In a test file, under #[test]:
//! fn a_guest_runs() {
//!     apf_tests::require_kvm!();
//!     // ... run a guest under KVM
//! }
//! # a_guest_runs();
//! ```

use agent_proto::{Request, AGENT_PORT, MAILBOX_BASE};
use apf::{GuestAddress, GuestRam};
use vm_memory::Bytes;
use vmm::report::Report;

/// The first statement of a test that needs KVM: returns from the test
/// when `/dev/kvm` is missing, saying so on stderr and in the skip log
/// ([`skipped`]); panics instead when `CI` is set, where a missing device
/// is a broken machine. The test is named from the function it is in.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::kvm_available($crate::test_name!()) {
            return;
        }
    };
}

/// The name of the function this is used in (a test's name).
#[macro_export]
macro_rules! test_name {
    () => {{
        fn here() {}
        $crate::function_name(std::any::type_name_of_val(&here))
    }};
}

/// The function's own name from the type name of a function nested in it
/// (`crate::module::test::here` gives `test`).
pub fn function_name(nested: &'static str) -> &'static str {
    let outer = nested.strip_suffix("::here").unwrap_or(nested);
    outer.rsplit("::").next().unwrap_or(outer)
}

/// True if KVM tests can run. In CI (`CI` set) a missing `/dev/kvm` is a
/// broken machine and panics; elsewhere the test prints a notice and skips.
/// Tests use [`require_kvm!`].
pub fn kvm_available(test: &str) -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: /dev/kvm is missing in CI; KVM tests cannot run");
    }
    skipped(test, "/dev/kvm is missing (set CI to make this fail)");
    false
}

/// Says that `test` checked nothing, and why: on stderr, and as a line in
/// the file `APF_SKIP_LOG` names (CI counts them), so a skip is never
/// mistaken for a pass.
pub fn skipped(test: &str, why: &str) {
    eprintln!("{test}: SKIPPED, {why}");
    if let Some(path) = std::env::var_os("APF_SKIP_LOG") {
        use std::io::Write;
        let line = format!("{test}: {why}\n");
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }
}

/// The 8-byte word at `gpa` of guest RAM, read through vm-memory (a
/// missing page is faulted in by whoever serves RAM). Panics if `gpa` is
/// not in RAM.
pub fn read_word(ram: &GuestRam, gpa: u64) -> u64 {
    ram.guest_memory().read_obj(GuestAddress(gpa)).unwrap_or_else(|e| panic!("read at {gpa:#x}: {e}"))
}

/// Writes the 8-byte word `value` at `gpa` of guest RAM. Panics if `gpa`
/// is not in RAM.
pub fn write_word(ram: &GuestRam, gpa: u64, value: u64) {
    ram.guest_memory().write_obj(value, GuestAddress(gpa)).unwrap_or_else(|e| panic!("write at {gpa:#x}: {e}"))
}

/// Fills `buf` from guest RAM at `gpa`. Panics if the range is not all in
/// RAM.
pub fn read_bytes(ram: &GuestRam, gpa: u64, buf: &mut [u8]) {
    ram.guest_memory().read_slice(buf, GuestAddress(gpa)).unwrap_or_else(|e| panic!("read at {gpa:#x}: {e}"))
}

/// Asserts that every offline of the run (host storm and guest) ended one
/// of the three ways an offline can end without an error: completed, busy
/// at its deadline, or refused because another offline held part of its
/// range.
pub fn assert_offlines_accounted(report: &Report) {
    let o = &report.offline;
    assert_eq!(
        o.requests,
        o.completed + o.busy + o.overlapped,
        "an offline neither completed nor was busy nor overlapped:\n{}",
        report.summary()
    );
    assert!(o.guest_requested <= o.requests, "{}", report.summary());
}

/// 64-bit machine code, built one instruction at a time.
#[derive(Debug, Default, Clone)]
pub struct Code(Vec<u8>);

impl Code {
    /// Empty code.
    pub fn new() -> Self {
        Code::default()
    }

    fn emit(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }

    /// `movabs rdi, imm`.
    pub fn mov_rdi(self, imm: u64) -> Self {
        self.emit(&[0x48, 0xbf]).emit(&imm.to_le_bytes())
    }

    /// `movabs rax, imm`.
    pub fn mov_rax(self, imm: u64) -> Self {
        self.emit(&[0x48, 0xb8]).emit(&imm.to_le_bytes())
    }

    /// Stores `bytes` (padded with zeros to 8-byte words) at `addr`.
    pub fn store(mut self, addr: u64, bytes: &[u8]) -> Self {
        self = self.mov_rdi(addr);
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            // mov [rdi + disp32], rax
            self = self.mov_rax(u64::from_le_bytes(word)).emit(&[0x48, 0x89, 0x87]).emit(&(i as u32 * 8).to_le_bytes());
        }
        self
    }

    /// `mov eax, value; mov dx, port; out dx, eax`.
    pub fn out32(self, port: u16, value: u32) -> Self {
        self.emit(&[0xb8]).emit(&value.to_le_bytes()).emit(&[0x66, 0xba]).emit(&port.to_le_bytes()).emit(&[0xef])
    }

    /// `mov al, value; mov dx, port; out dx, al`.
    pub fn out8(self, port: u16, value: u8) -> Self {
        self.emit(&[0xb0, value, 0x66, 0xba]).emit(&port.to_le_bytes()).emit(&[0xee])
    }

    /// Writes `request` (sequence 1) to vCPU 0's mailbox and rings the
    /// agent doorbell.
    pub fn send(self, request: &Request) -> Self {
        let mut buf = [0u8; agent_proto::MAX_MESSAGE];
        let n = request.encode(1, &mut buf).expect("message fits");
        self.store(MAILBOX_BASE, &buf[..n]).out32(AGENT_PORT, (MAILBOX_BASE >> 12) as u32)
    }

    /// Reads 8 bytes at `addr` (`mov rbx, [rax]`).
    pub fn read64(self, addr: u64) -> Self {
        self.mov_rax(addr).emit(&[0x48, 0x8b, 0x18])
    }

    /// Writes rbx to `addr` (`mov [rax], rbx`).
    pub fn write64(self, addr: u64) -> Self {
        self.mov_rax(addr).emit(&[0x48, 0x89, 0x18])
    }

    /// Ends the vCPU: a write to the halt port (guests run in ring 3,
    /// where `hlt` faults).
    pub fn hlt(self) -> Self {
        self.out32(agent_proto::HALT_PORT, 0)
    }

    /// Raw instruction bytes.
    pub fn raw(self, bytes: &[u8]) -> Self {
        self.emit(bytes)
    }

    /// `ud2`: an invalid opcode.
    pub fn ud2(self) -> Self {
        self.emit(&[0x0f, 0x0b])
    }

    /// `jmp $`: spins forever.
    pub fn spin(self) -> Self {
        self.emit(&[0xeb, 0xfe])
    }

    /// The bytes.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_is_named_after_its_function() {
        assert_eq!(test_name!(), "a_test_is_named_after_its_function");
        assert_eq!(function_name("apf_tests::tests::outer::here"), "outer");
        assert_eq!(function_name("outer"), "outer");
    }

    #[test]
    fn words_round_trip_through_guest_memory() {
        let ram = GuestRam::anonymous(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_word(&ram, 0x1008, 0x1122_3344_5566_7788);
        assert_eq!(read_word(&ram, 0x1008), 0x1122_3344_5566_7788);
        let mut b = [0u8; 3];
        read_bytes(&ram, 0x1008, &mut b);
        assert_eq!(b, [0x88, 0x77, 0x66]);
        let past = std::panic::catch_unwind(|| read_word(&ram, 1 << 20)).unwrap_err();
        assert!(past.downcast_ref::<String>().is_some_and(|m| m.contains("0x100000")));
    }
}
