//! vCPU threads: one named thread per vCPU, a run loop over `KVM_RUN`, and
//! the two signals a vCPU thread must handle.
//!
//! - The kick signal stops a vCPU wherever it is. A vCPU blocked inside
//!   `KVM_RUN` on a missing page leaves only when the page is installed or
//!   poisoned, or when a signal arrives; the handler also sets the
//!   thread's `immediate_exit`, so a kick that lands just before `KVM_RUN`
//!   is not lost.
//! - SIGBUS: KVM delivers it to the vCPU thread when the guest touches a
//!   poisoned page. Inside `KVM_RUN` the handler records the address and
//!   the vCPU fails with a clear error; anywhere else it restores the
//!   default action, so a real bug in the VMM still stops the process.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use apf::GuestRam;
use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::agent::AgentDevice;
use crate::checksum::ChecksumDevice;
use crate::exit::{self, Action, Exit, ExitError};

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
    static IN_KVM_RUN: Cell<bool> = const { Cell::new(false) };
    static SIGBUS_ADDR: Cell<Option<u64>> = const { Cell::new(None) };
}

/// The signal that kicks a vCPU out of `KVM_RUN`. Distinct from the signal
/// `apf::hostmem` uses to interrupt a host block offline.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: `run` is this thread's own kvm_run mapping, set by the
        // vCPU loop before its first KVM_RUN and cleared before the VcpuFd
        // (and its mapping) is dropped; the field is in bounds.
        let field = unsafe { std::ptr::addr_of_mut!((*run).immediate_exit) };
        // SAFETY: see above; a byte store is async-signal-safe.
        unsafe { field.write_volatile(1) };
    }
}

extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if IN_KVM_RUN.with(Cell::get) {
        // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
        let info = unsafe { &*info };
        // SAFETY: SIGBUS fills si_addr.
        let addr = unsafe { info.si_addr() } as u64;
        SIGBUS_ADDR.with(|a| a.set(Some(addr)));
        return;
    }
    // Not from KVM: a fault in the VMM itself. Returning would re-run the
    // faulting instruction forever; let the default action end the process.
    // SAFETY: resetting a signal's disposition is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

/// Installs the kick and SIGBUS handlers (process-wide, once).
pub fn install_signal_handlers() -> Result<(), VcpuError> {
    static ONCE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    let r = ONCE.get_or_init(|| {
        register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno())?;
        register_signal_handler(libc::SIGBUS, on_sigbus).map_err(|e| e.errno())
    });
    r.map_err(|errno| VcpuError::Signals(std::io::Error::from_raw_os_error(errno)))
}

/// Why a vCPU stopped running the guest.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// An exit that ends the run.
    #[error("vCPU {vcpu}: {source} (rip {rip:#x})")]
    Exit {
        /// The vCPU.
        vcpu: u32,
        /// Its instruction pointer at the exit.
        rip: u64,
        /// The exit.
        source: ExitError,
    },
    /// The guest touched a poisoned page: KVM sent SIGBUS.
    #[error("vCPU {vcpu}: guest touched a poisoned page (host address {host_addr:#x}, guest address {gpa})")]
    Poisoned {
        /// The vCPU.
        vcpu: u32,
        /// The host address SIGBUS reported.
        host_addr: u64,
        /// The guest address, if it is in RAM.
        gpa: String,
    },
    /// `KVM_RUN` failed.
    #[error("vCPU {vcpu}: KVM_RUN failed: {source}")]
    Run {
        /// The vCPU.
        vcpu: u32,
        /// The errno.
        source: std::io::Error,
    },
    /// The signal handlers could not be installed.
    #[error("cannot install the vCPU signal handlers: {0}")]
    Signals(std::io::Error),
}

/// How a vCPU thread ended.
#[derive(Debug)]
pub enum VcpuEnd {
    /// The guest halted.
    Halted,
    /// The VMM stopped it.
    Stopped,
    /// It failed.
    Failed(VcpuError),
}

/// What a vCPU thread needs.
#[derive(Debug)]
pub struct VcpuContext {
    /// Guest RAM size (for exit decisions).
    pub ram_size: u64,
    /// The agent device.
    pub agent: Arc<AgentDevice>,
    /// The checksum device, if on.
    pub checksum: Option<Arc<ChecksumDevice>>,
    /// Set to stop every vCPU (then kick them).
    pub stop: Arc<AtomicBool>,
    /// Guest RAM, to name the guest address of a SIGBUS.
    pub ram: Arc<GuestRam>,
}

/// Runs vCPU `id` until it halts, fails or is stopped.
pub fn run(id: u32, mut fd: VcpuFd, ctx: &VcpuContext) -> VcpuEnd {
    let run_ptr: *mut kvm_run = fd.get_kvm_run();
    KVM_RUN.with(|r| r.set(run_ptr));
    let end = run_loop(id, &mut fd, ctx);
    KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    end
}

fn run_loop(id: u32, fd: &mut VcpuFd, ctx: &VcpuContext) -> VcpuEnd {
    loop {
        if ctx.stop.load(Ordering::Acquire) {
            return VcpuEnd::Stopped;
        }
        IN_KVM_RUN.with(|f| f.set(true));
        let result = fd.run().map(|e| Exit::from_kvm(&e));
        IN_KVM_RUN.with(|f| f.set(false));
        if let Some(host_addr) = SIGBUS_ADDR.with(|a| a.take()) {
            let gpa = ctx.ram.locate_host(host_addr).map_or("outside RAM".to_string(), |loc| {
                format!("{:#x}", ctx.ram.regions()[loc.region].page_gpa(loc.page).0 + (host_addr & 0xfff))
            });
            return VcpuEnd::Failed(VcpuError::Poisoned { vcpu: id, host_addr, gpa });
        }
        let exit = match result {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return VcpuEnd::Failed(VcpuError::Run { vcpu: id, source: e.into() }),
        };
        match exit::handle(&exit, ctx.ram_size) {
            Action::Agent(pfn) => ctx.agent.doorbell(id, pfn),
            Action::Checksum(slot) => match &ctx.checksum {
                Some(dev) => dev.doorbell(id, slot),
                None => {
                    let source = ExitError::UnknownPort { dir: "out", port: agent_proto::CHECKSUM_PORT, size: 4 };
                    return VcpuEnd::Failed(VcpuError::Exit { vcpu: id, rip: rip(fd), source });
                }
            },
            Action::Halted => return VcpuEnd::Halted,
            // KVM reports a poisoned page as an MMIO access inside RAM
            // when it does not send SIGBUS.
            Action::Fail(ExitError::MmioInsideRam { gpa, .. }) if poisoned(&ctx.ram, gpa) => {
                let host_addr = ctx.ram.host_range(apf::GuestAddress(gpa), 1).map_or(0, |p| p as u64);
                return VcpuEnd::Failed(VcpuError::Poisoned { vcpu: id, host_addr, gpa: format!("{gpa:#x}") });
            }
            Action::Fail(source) => return VcpuEnd::Failed(VcpuError::Exit { vcpu: id, rip: rip(fd), source }),
        }
    }
}

/// Whether the engine poisoned (or unplugged under the poison policy) the
/// page at `gpa`.
fn poisoned(ram: &GuestRam, gpa: u64) -> bool {
    ram.locate(apf::GuestAddress(gpa))
        .is_ok_and(|loc| matches!(ram.state(loc).0, apf::PageState::Poisoned | apf::PageState::Offline))
}

fn rip(fd: &VcpuFd) -> u64 {
    fd.get_regs().map(|r| r.rip).unwrap_or(0)
}
