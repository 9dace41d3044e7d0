//! What a vCPU exit means for the run: a pure function from an owned copy
//! of the exit to an [`Action`], tested without KVM.

use agent_proto::{AGENT_PORT, CHECKSUM_PORT, HALT_PORT};
use kvm_ioctls::VcpuExit;
use thiserror::Error;

/// An owned copy of the parts of a [`VcpuExit`] the VMM looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `out` to `port` of `data` (1, 2 or 4 bytes).
    IoOut {
        /// The port.
        port: u16,
        /// The bytes written, little-endian.
        data: Vec<u8>,
    },
    /// `in` from `port`.
    IoIn {
        /// The port.
        port: u16,
        /// Bytes read.
        size: usize,
    },
    /// A read at a guest address no memory slot covers.
    MmioRead {
        /// The guest physical address.
        gpa: u64,
        /// Bytes.
        len: usize,
    },
    /// A write at a guest address no memory slot covers.
    MmioWrite {
        /// The guest physical address.
        gpa: u64,
        /// Bytes.
        len: usize,
    },
    /// `hlt`.
    Hlt,
    /// The guest reset itself: a triple fault.
    Shutdown,
    /// KVM could not enter the guest.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
        /// The CPU it failed on.
        cpu: u32,
    },
    /// KVM hit an internal error (emulation failure, say).
    InternalError,
    /// Any other exit, by name.
    Other(String),
}

impl Exit {
    /// Copies what matters out of `exit`.
    pub fn from_kvm(exit: &VcpuExit<'_>) -> Exit {
        match exit {
            VcpuExit::IoOut(port, data) => Exit::IoOut { port: *port, data: data.to_vec() },
            VcpuExit::IoIn(port, data) => Exit::IoIn { port: *port, size: data.len() },
            VcpuExit::MmioRead(gpa, data) => Exit::MmioRead { gpa: *gpa, len: data.len() },
            VcpuExit::MmioWrite(gpa, data) => Exit::MmioWrite { gpa: *gpa, len: data.len() },
            VcpuExit::Hlt => Exit::Hlt,
            VcpuExit::Shutdown => Exit::Shutdown,
            VcpuExit::FailEntry(reason, cpu) => Exit::FailEntry { reason: *reason, cpu: *cpu },
            VcpuExit::InternalError => Exit::InternalError,
            other => Exit::Other(format!("{other:?}")),
        }
    }
}

/// What the vCPU loop does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The agent rang its doorbell with a mailbox frame number.
    Agent(u32),
    /// The guest submitted a checksum slot.
    Checksum(u32),
    /// The vCPU halted (`hlt`, or a write to the halt port from ring 3):
    /// its part of the run is over.
    Halted,
    /// The run fails.
    Fail(ExitError),
}

/// An exit that ends the run.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ExitError {
    /// The guest touched an address outside its RAM.
    #[error("guest {access} of {len} bytes at {gpa:#x}, outside guest RAM (which ends at {ram_end:#x})")]
    OutsideRam {
        /// "read" or "write".
        access: &'static str,
        /// The address.
        gpa: u64,
        /// Bytes.
        len: usize,
        /// First address past RAM.
        ram_end: u64,
    },
    /// An MMIO exit inside RAM: RAM's memory slot should have covered it.
    #[error("MMIO {access} at {gpa:#x} inside guest RAM: the memory slot did not cover it")]
    MmioInsideRam {
        /// "read" or "write".
        access: &'static str,
        /// The address.
        gpa: u64,
    },
    /// Port I/O the VMM has no device for.
    #[error("port {dir} of {size} bytes at port {port:#x}, which has no device")]
    UnknownPort {
        /// "in" or "out".
        dir: &'static str,
        /// The port.
        port: u16,
        /// Bytes.
        size: usize,
    },
    /// A doorbell written with the wrong width.
    #[error("{size}-byte write to port {port:#x}, which takes 4 bytes")]
    BadIoSize {
        /// The port.
        port: u16,
        /// Bytes written.
        size: usize,
    },
    /// The guest triple-faulted.
    #[error("triple fault (shutdown exit)")]
    TripleFault,
    /// KVM could not enter the guest.
    #[error("KVM could not enter the guest (hardware reason {reason:#x} on CPU {cpu})")]
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
        /// The CPU.
        cpu: u32,
    },
    /// KVM's internal error exit.
    #[error("KVM internal error exit (emulation failure)")]
    InternalError,
    /// An exit this VMM does not expect.
    #[error("unexpected exit {0}")]
    Unexpected(String),
}

/// Decides what `exit` means for a guest with `ram_size` bytes of RAM from
/// address 0.
pub fn handle(exit: &Exit, ram_size: u64) -> Action {
    let mmio = |access, gpa: u64, len| {
        if gpa >= ram_size {
            ExitError::OutsideRam { access, gpa, len, ram_end: ram_size }
        } else {
            ExitError::MmioInsideRam { access, gpa }
        }
    };
    let doorbell = |port: u16, data: &[u8]| -> Result<u32, ExitError> {
        let bytes: [u8; 4] = data.try_into().map_err(|_| ExitError::BadIoSize { port, size: data.len() })?;
        Ok(u32::from_le_bytes(bytes))
    };
    match exit {
        Exit::IoOut { port: AGENT_PORT, data } => doorbell(AGENT_PORT, data).map_or_else(Action::Fail, Action::Agent),
        Exit::IoOut { port: CHECKSUM_PORT, data } => {
            doorbell(CHECKSUM_PORT, data).map_or_else(Action::Fail, Action::Checksum)
        }
        Exit::IoOut { port: HALT_PORT, .. } => Action::Halted,
        Exit::IoOut { port, data } => {
            Action::Fail(ExitError::UnknownPort { dir: "out", port: *port, size: data.len() })
        }
        Exit::IoIn { port, size } => Action::Fail(ExitError::UnknownPort { dir: "in", port: *port, size: *size }),
        Exit::MmioRead { gpa, len } => Action::Fail(mmio("read", *gpa, *len)),
        Exit::MmioWrite { gpa, len } => Action::Fail(mmio("write", *gpa, *len)),
        Exit::Hlt => Action::Halted,
        Exit::Shutdown => Action::Fail(ExitError::TripleFault),
        Exit::FailEntry { reason, cpu } => Action::Fail(ExitError::FailEntry { reason: *reason, cpu: *cpu }),
        Exit::InternalError => Action::Fail(ExitError::InternalError),
        Exit::Other(name) => Action::Fail(ExitError::Unexpected(name.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: u64 = 64 << 20;

    #[test]
    fn doorbells_carry_a_u32() {
        let out = |port, data: &[u8]| handle(&Exit::IoOut { port, data: data.to_vec() }, RAM);
        assert_eq!(out(AGENT_PORT, &0x20u32.to_le_bytes()), Action::Agent(0x20));
        assert_eq!(out(CHECKSUM_PORT, &3u32.to_le_bytes()), Action::Checksum(3));
        assert_eq!(out(AGENT_PORT, &[1]), Action::Fail(ExitError::BadIoSize { port: AGENT_PORT, size: 1 }));
        assert_eq!(out(0x80, &[1, 2]), Action::Fail(ExitError::UnknownPort { dir: "out", port: 0x80, size: 2 }));
        assert_eq!(
            handle(&Exit::IoIn { port: AGENT_PORT, size: 4 }, RAM),
            Action::Fail(ExitError::UnknownPort { dir: "in", port: AGENT_PORT, size: 4 })
        );
    }

    #[test]
    fn mmio_outside_ram_names_the_address() {
        let a = handle(&Exit::MmioWrite { gpa: RAM + 0x10, len: 8 }, RAM);
        assert_eq!(a, Action::Fail(ExitError::OutsideRam { access: "write", gpa: RAM + 0x10, len: 8, ram_end: RAM }));
        let Action::Fail(e) = a else { unreachable!() };
        assert!(e.to_string().contains("0x4000010"), "{e}");
        assert_eq!(
            handle(&Exit::MmioRead { gpa: 0x1000, len: 4 }, RAM),
            Action::Fail(ExitError::MmioInsideRam { access: "read", gpa: 0x1000 })
        );
    }

    #[test]
    fn ends_of_the_road() {
        assert_eq!(handle(&Exit::Hlt, RAM), Action::Halted);
        assert_eq!(handle(&Exit::IoOut { port: HALT_PORT, data: vec![0; 4] }, RAM), Action::Halted);
        assert_eq!(handle(&Exit::Shutdown, RAM), Action::Fail(ExitError::TripleFault));
        assert_eq!(
            handle(&Exit::FailEntry { reason: 7, cpu: 1 }, RAM),
            Action::Fail(ExitError::FailEntry { reason: 7, cpu: 1 })
        );
        assert_eq!(handle(&Exit::InternalError, RAM), Action::Fail(ExitError::InternalError));
        assert_eq!(handle(&Exit::Other("Debug".into()), RAM), Action::Fail(ExitError::Unexpected("Debug".into())));
    }
}
