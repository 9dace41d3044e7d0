//! The guest agent: a `no_std` x86-64 program every vCPU of apf's VMM runs.
//! Each vCPU stamps, rewrites and verifies its own stripe of guest RAM
//! while the VMM faults it in, snapshots it and offlines it underneath, and
//! reports every page that does not hold what it should.
//!
//! The VMM starts each vCPU here in 64-bit mode, in ring 3 with IOPL 3
//! (port I/O allowed): RAM identity-mapped, interrupts off, SSE enabled,
//! the stack pointer at the top of the vCPU's stack as if `_start` had just
//! been called, and the vCPU id in `rdi`. The agent says hello through its
//! mailbox, learns the configuration and so the layout, runs its workload
//! until told to stop, sends its counters and halts through the halt port.
//!
//! | module | what |
//! |---|---|
//! | `machine` | port I/O, `rdtsc`, halting, volatile access to shared RAM |
//! | `mem` | `memcpy`, `memset` and kin, which the compiler calls and no C library provides |
//! | `mailbox` | requests to the VMM and its replies; fatal errors |
//! | `stripe` | a vCPU's data pages and generations: check, restamp, touch |
//! | `workload` | passes, verifies, offline requests, progress reports |
//! | `checksum` | the checksum device's ring slots |
//! | `rng` | SplitMix64 |
#![no_std]
#![no_main]

mod checksum;
mod machine;
mod mailbox;
mod mem;
mod rng;
mod stripe;
mod workload;

use core::panic::PanicInfo;

use agent_proto::{Layout, LayoutError, Request, MAX_VCPUS, MIN_RAM, STACKS, STACK_SIZE};

use machine::{halt, stack_pointer, SharedRam};
use mailbox::{fatal, Mailbox};
use workload::Agent;

/// Where every vCPU starts, with its id.
#[no_mangle]
pub extern "C" fn _start(vcpu: u64) -> ! {
    let vcpu = match u32::try_from(vcpu) {
        Ok(v) if v < MAX_VCPUS => v,
        // No mailbox to complain through.
        _ => halt(),
    };
    // SAFETY: the VMM runs no guest with less than MIN_RAM, and lays out
    // what it maps as `Layout` says.
    let low = unsafe { SharedRam::new(MIN_RAM) };
    let mut mailbox = Mailbox::new(low, vcpu);
    if stack_vcpu() != Some(vcpu) {
        mailbox.fatal(fatal::STACK, stack_pointer());
    }
    let config = mailbox.hello();
    let layout = match Layout::new(config.ram_size, config.vcpus) {
        Ok(layout) => layout,
        Err(LayoutError::RamSize(size)) => mailbox.fatal(fatal::LAYOUT, size),
        Err(LayoutError::Vcpus(n)) => mailbox.fatal(fatal::LAYOUT, u64::from(n)),
    };
    if vcpu >= layout.vcpus {
        mailbox.fatal(fatal::NOT_A_VCPU, u64::from(layout.vcpus));
    }
    // SAFETY: the VMM maps all of the RAM it configured, laid out as
    // `Layout` says for that size.
    let ram = unsafe { SharedRam::new(layout.ram_size) };
    let counters = Agent::new(&mut mailbox, ram, layout, vcpu, config).run();
    mailbox.call(&Request::Done { vcpu, counters });
    halt()
}

/// The vCPU whose stack this is: the stack pointer is the one thing a
/// vCPU has of its own without a word of writable memory.
fn stack_vcpu() -> Option<u32> {
    let vcpu = stack_pointer().wrapping_sub(STACKS) / STACK_SIZE;
    u32::try_from(vcpu).ok().filter(|&v| v < MAX_VCPUS)
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    if let Some(vcpu) = stack_vcpu() {
        // SAFETY: as in `_start`.
        let low = unsafe { SharedRam::new(MIN_RAM) };
        let line = info.location().map_or(0, |l| u64::from(l.line()));
        Mailbox::resume(low, vcpu).fatal(fatal::PANIC, line);
    }
    halt()
}
