//! The VMM's own access to guest RAM, for devices: a bounded copy through
//! a short-term [`apf::PageRef`] when the engine backs RAM, a plain copy
//! when it does not (plain memory, or the baseline handler). Every access is range-checked against
//! guest RAM first, so nothing a guest writes can point the VMM outside it.

use std::sync::Arc;
use std::time::Instant;

use apf::RamError;
use apf::{Engine, GuestAddress, GuestRam, GuestRange, PinError};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, VolatileSlice};

/// Why a device could not copy guest memory.
#[derive(Debug, Error)]
pub enum AccessError {
    /// The range is not inside guest RAM (or wraps).
    #[error("guest range {gpa:#x}+{len:#x} is not inside guest RAM")]
    OutsideRam {
        /// First byte.
        gpa: u64,
        /// Bytes.
        len: u64,
    },
    /// The engine could not give a short-term reference in time.
    #[error("cannot reference guest memory")]
    Ref(#[from] PinError),
    /// The copy itself failed.
    #[error("guest memory copy failed: {0}")]
    Copy(String),
}

fn outside(gpa: u64, len: usize) -> AccessError {
    AccessError::OutsideRam { gpa, len: len as u64 }
}

/// How devices reach guest RAM.
#[derive(Debug, Clone)]
pub enum GuestAccess {
    /// RAM demand-faulted by the engine.
    Engine(Arc<Engine>),
    /// Memory the VMM reads and writes directly: plain anonymous memory,
    /// or memory whose faults the baseline handler resolves.
    Plain(Arc<GuestRam>),
}

impl GuestAccess {
    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        match self {
            GuestAccess::Engine(e) => e.ram(),
            GuestAccess::Plain(r) => r,
        }
    }

    /// The page-aligned range covering `[gpa, gpa + len)` (in the pages
    /// of the region it is in: huge pages are referenced whole), checked
    /// against guest RAM.
    fn cover(&self, gpa: u64, len: usize) -> Result<GuestRange, AccessError> {
        let end = gpa.checked_add(len as u64).filter(|_| len > 0).ok_or(outside(gpa, len))?;
        let loc = self.ram().locate(GuestAddress(gpa)).map_err(|_| outside(gpa, len))?;
        let page = self.ram().region(loc).page_size() as u64;
        let start = gpa & !(page - 1);
        let end = end.checked_next_multiple_of(page).ok_or(outside(gpa, len))?;
        let range = GuestRange::new(GuestAddress(start), end - start);
        // A range that is aligned by construction can only fail by
        // leaving RAM (or crossing regions, which one-region guests cannot).
        self.ram().check_range(range).map(|_| range).map_err(|_: RamError| outside(gpa, len))
    }

    /// Runs `f` on the guest memory `[gpa, gpa + len)`, range-checked, and
    /// under a short-term reference when the engine backs RAM.
    fn with_memory<T>(
        &self,
        gpa: u64,
        len: usize,
        deadline: Instant,
        f: impl FnOnce(VolatileSlice<'_>) -> T,
    ) -> Result<T, AccessError> {
        let range = self.cover(gpa, len)?;
        let copy = |e: vm_memory::VolatileMemoryError| AccessError::Copy(e.to_string());
        match self {
            GuestAccess::Engine(e) => {
                let r = e.page_ref(range, deadline)?;
                let mem = r.memory();
                Ok(f(mem.subslice((gpa - range.start.0) as usize, len).map_err(copy)?))
            }
            GuestAccess::Plain(ram) => {
                let mem = ram
                    .guest_memory()
                    .get_slice(GuestAddress(gpa), len)
                    .map_err(|e| AccessError::Copy(e.to_string()))?;
                Ok(f(mem))
            }
        }
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8], deadline: Instant) -> Result<(), AccessError> {
        self.with_memory(gpa, buf.len(), deadline, |m| m.copy_to(buf)).map(drop)
    }

    /// Copies `buf` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, buf: &[u8], deadline: Instant) -> Result<(), AccessError> {
        self.with_memory(gpa, buf.len(), deadline, |m| m.copy_from(buf))
    }

    /// The engine, when there is one.
    pub fn engine(&self) -> Option<&Arc<Engine>> {
        match self {
            GuestAccess::Engine(e) => Some(e),
            GuestAccess::Plain(_) => None,
        }
    }

    /// Bytes of guest RAM.
    pub fn ram_size(&self) -> u64 {
        self.ram().guest_memory().iter().map(|r| r.len()).sum()
    }
}
