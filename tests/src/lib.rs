//! Helpers for the integration tests: KVM presence, and a tiny assembler
//! for hand-made guests that do one thing each.

use agent_proto::{Request, AGENT_PORT, MAILBOX_BASE};

/// True if KVM tests can run. In CI (`CI` set) a missing `/dev/kvm` is a
/// broken machine and panics; elsewhere the test prints a notice and skips.
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
