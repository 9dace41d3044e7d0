//! One run in three steps, as the VMMs this one learns from read:
//! [`Vm::build`] sets everything up once, top to bottom (RAM through the
//! engine, the VM and its memory slot, long mode and the guest image, the
//! devices, the vCPUs); [`Vm::run`] starts the agent device, the host
//! storm and one thread per vCPU and watches them until the agents are
//! done (or a deadline passes or a vCPU fails), then stops every vCPU;
//! [`StoppedVm::shutdown`] takes the parts down in order (storm, devices,
//! snapshot, engine) and assembles the [`Report`].

use std::io::Cursor;
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agent_proto::{
    Config, Layout, LayoutError, Workload, AGENT_LIMIT, AGENT_LOAD, FLAG_BALLOON, FLAG_CHECKSUM, FLAG_GUEST_OFFLINE,
};
use apf::SinglePageHandler;
use apf::{latency_plot, LatencyLayer};
use apf::{
    Engine, EngineError, GuestAddress, GuestRam, GuestRange, Image, MemoryKind, PageSource, SnapshotFile, ZeroSource,
};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use linux_loader::loader::{elf::Elf, KernelLoader};
use thiserror::Error;
use tracing_subscriber::layer::SubscriberExt;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::agent::{AgentDevice, FaultCount};
use crate::boot;
use crate::checksum::ChecksumDevice;
use crate::config::{Backend, GuestImage, RunConfig};
use crate::mem::{AccessError, GuestAccess};
use crate::report::{BaselineEnd, EngineEnd, Errors, PinCallbacks, Report, RunEnd, VcpuExit, VcpuReport};
use crate::snapshot::{self, FileId, Header, SnapshotError};
use crate::storm::{Storm, StormConfig, StormReport};
use crate::vcpu::{self, VcpuContext, VcpuEnd, VcpuError};

/// The guest agent, built with the VMM.
pub static AGENT_ELF: &[u8] = include_bytes!(env!("APF_AGENT_ELF"));

/// Spans a Chrome trace keeps (the most recent).
pub const TRACE_EVENTS: usize = 200_000;

/// How long a stopped vCPU may take to leave `KVM_RUN`.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// A run that could not start, or whose machinery broke.
#[derive(Debug, Error)]
pub enum VmError {
    /// The guest's size or vCPU count do not fit the layout.
    #[error("invalid guest shape")]
    Layout(#[source] LayoutError),
    /// Guest RAM could not be mapped.
    #[error("cannot map guest RAM")]
    Ram(#[source] apf::RamError),
    /// The huge pages guest RAM needs could not be reserved.
    #[error("cannot reserve the huge pages guest RAM needs")]
    HugePages(#[source] apf::hugepool::HugePoolError),
    /// The engine could not start.
    #[error("cannot start the page-fault engine")]
    Engine(#[source] EngineError),
    /// The snapshot cannot be used.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The snapshot's RAM cannot be read as a page source.
    #[error("cannot read the snapshot's RAM")]
    Source(#[source] apf::SourceError),
    /// The snapshot's RAM cannot be loaded or mapped as an image.
    #[error("cannot map the snapshot's RAM as an image")]
    Image(#[source] apf::ImageError),
    /// A KVM ioctl failed.
    #[error("KVM: {what}")]
    Kvm {
        /// Which step.
        what: &'static str,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// The guest image cannot be loaded.
    #[error("cannot load the guest image: {0}")]
    Load(String),
    /// Writing boot structures into guest RAM failed.
    #[error("cannot write {what} into guest RAM")]
    Boot {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: AccessError,
    },
    /// A thread could not be started, or an event source could not be made.
    #[error("cannot start {what}")]
    Io {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The vCPU signal handlers could not be installed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm { what, source: e.into() }
}

/// Wakes the event loop when a vCPU thread ends.
#[derive(Debug)]
struct Supervisor {
    vcpu_exit: EventFd,
}

impl MutEventSubscriber for Supervisor {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.vcpu_exit.as_raw_fd() {
            let _ = self.vcpu_exit.read();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // The loop also wakes on its timeout; a failed add only delays the
        // reaction to a vCPU's end to the next timeout.
        let _ = ops.add(Events::new(&self.vcpu_exit, EventSet::IN));
    }
}

/// The run's shape: RAM size, vCPUs and seed.
#[derive(Debug, Clone, Copy)]
struct Shape {
    ram_size: u64,
    vcpus: u32,
    seed: u64,
}

/// The snapshot a run restores from.
#[derive(Debug)]
struct Restore {
    path: PathBuf,
    header: Header,
    /// Its identity, so that no save of this run overwrites it.
    id: FileId,
}

impl Restore {
    fn open(cfg: &RunConfig) -> Result<Option<Restore>, VmError> {
        let Some(path) = &cfg.restore else { return Ok(None) };
        let (header, id) = snapshot::open_with_id(path)?;
        Ok(Some(Restore { path: path.clone(), header, id }))
    }
}

/// Resolves RAM size, vCPUs and seed from the command line and, for a
/// restore, the snapshot (which fixes them).
fn shape(cfg: &RunConfig, restore: Option<&Restore>) -> Result<Shape, VmError> {
    let Some(Restore { path, header: h, .. }) = restore else {
        return Ok(Shape {
            ram_size: cfg.mem.unwrap_or(512 << 20),
            vcpus: cfg.vcpus.unwrap_or(2),
            seed: cfg.seed.unwrap_or(1),
        });
    };
    let mismatch = |what: String| VmError::Snapshot(SnapshotError::Mismatch { path: path.clone(), what });
    if let Some(mem) = cfg.mem.filter(|&m| m != h.ram_size) {
        return Err(mismatch(format!("{} MiB of RAM, not {} MiB (--mem)", h.ram_size >> 20, mem >> 20)));
    }
    if let Some(v) = cfg.vcpus.filter(|&v| v != h.vcpus) {
        return Err(mismatch(format!("{} vCPUs, not {v} (--vcpus)", h.vcpus)));
    }
    if let Some(s) = cfg.seed.filter(|&s| s != h.seed) {
        return Err(mismatch(format!("seed {}, not {s} (--seed)", h.seed)));
    }
    Ok(Shape { ram_size: h.ram_size, vcpus: h.vcpus, seed: h.seed })
}

/// Guest RAM of the kind the run asks for: private anonymous, a shared
/// memfd, or the snapshot's RAM as an image mapped private (loaded once
/// for the engine; the file itself, in place, for `--backend file`).
fn guest_ram(cfg: &RunConfig, restore: Option<&Restore>, ram_size: u64) -> Result<GuestRam, VmError> {
    let ranges = [(GuestAddress(0), ram_size as usize)];
    let image = |r: &Restore| match (cfg.backend, cfg.memory) {
        (Backend::File, _) => Image::in_place(&r.path, r.header.ram_offset(), ram_size),
        (_, MemoryKind::HugetlbImage) => Image::load_range_hugetlb(&r.path, r.header.ram_offset(), Some(ram_size)),
        _ => Image::load_range(&r.path, r.header.ram_offset(), Some(ram_size)),
    };
    match (cfg.backend, cfg.memory, restore) {
        (Backend::File, _, Some(r)) | (_, MemoryKind::Image | MemoryKind::HugetlbImage, Some(r)) => {
            GuestRam::image(&ranges, image(r).map_err(VmError::Image)?).map_err(VmError::Ram)
        }
        (_, MemoryKind::SharedMemfd, _) => GuestRam::shared_memfd(&ranges).map_err(VmError::Ram),
        // Reserved at mapping time from the pool `huge_pages` raised: a
        // short pool fails here, not at a fault.
        (_, MemoryKind::PrivateHugetlb, _) => GuestRam::anonymous_hugetlb(&ranges, false).map_err(VmError::Ram),
        (_, MemoryKind::SharedHugetlb, _) => GuestRam::shared_hugetlb(&ranges).map_err(VmError::Ram),
        _ => GuestRam::anonymous(&ranges).map_err(VmError::Ram),
    }
}

/// Free huge pages kept in the pool beside guest RAM's: a host-block
/// offline moves an in-use huge page only into a free one.
const HUGE_PAGE_SLACK: u64 = 8;

/// The huge pages guest RAM of a huge-page kind needs (and a little
/// slack), reserved in the kernel's pool for the run and given back when
/// it is dropped. `None` for the other kinds.
fn huge_pages(cfg: &RunConfig, ram_size: u64) -> Result<Option<apf::hugepool::Reservation>, VmError> {
    if !cfg.memory.is_huge() {
        return Ok(None);
    }
    // An image in huge pages holds the snapshot's RAM, and guest RAM
    // reserves as much again for the private copies of its writes.
    let copies = if cfg.memory == MemoryKind::HugetlbImage { 2 } else { 1 };
    let pages = copies * ram_size.div_ceil(apf::HUGE_PAGE_SIZE as u64) + HUGE_PAGE_SLACK;
    apf::hugepool::HugePool::reserve(pages, Instant::now() + Duration::from_secs(30))
        .map(Some)
        .map_err(VmError::HugePages)
}

/// Where guest pages come from: the override, the snapshot restored (its
/// image, when RAM maps it), or zeros.
fn page_source(
    cfg: &RunConfig,
    restore: Option<&Restore>,
    ram: &GuestRam,
    ram_size: u64,
) -> Result<Arc<dyn PageSource>, VmError> {
    Ok(match (restore, &cfg.source) {
        (_, Some(source)) => source.0.clone(),
        (Some(_), None) if ram.image_source().is_some() => ram.image_source().unwrap_or_else(|| Arc::new(ZeroSource)),
        (Some(r), None) => {
            let layout = vec![(GuestRange::new(GuestAddress(0), ram_size), r.header.ram_offset())];
            Arc::new(SnapshotFile::with_layout(&r.path, layout).map_err(VmError::Source)?)
        }
        (None, None) => Arc::new(ZeroSource),
    })
}

/// How guest RAM is served: by the engine, by the one-page-per-fault
/// baseline handler, or by the kernel alone.
fn memory_backend(
    cfg: &RunConfig,
    ram: &Arc<GuestRam>,
    source: impl FnOnce() -> Result<Arc<dyn PageSource>, VmError>,
) -> Result<(GuestAccess, Option<SinglePageHandler>), VmError> {
    if cfg.uffd_socket.is_some() {
        // Served by an external handler (see `external_handler`).
        return Ok((GuestAccess::Plain(ram.clone()), None));
    }
    Ok(match cfg.backend {
        Backend::Plain | Backend::File => (GuestAccess::Plain(ram.clone()), None),
        Backend::Baseline => {
            let handler = SinglePageHandler::start(ram.clone(), source()?)
                .map_err(|e| VmError::Io { what: "the baseline handler", source: std::io::Error::other(e) })?;
            (GuestAccess::Plain(ram.clone()), Some(handler))
        }
        Backend::Apf => {
            let mut config = apf::Config {
                unplug_policy: cfg.unplug_policy,
                record_working_set: cfg.save_working_set.is_some(),
                ..apf::Config::default()
            };
            if cfg.save_working_set.is_some() {
                // Recorded one page per fault: a window's pages the guest
                // never touches would go into the set (five times the
                // pages the scattered restore reads, measured) and every
                // replay would install them.
                config.max_window = 1;
                config.fault_around = 1;
            }
            if let Some(w) = cfg.workers {
                config.workers = w;
            }
            if let Some(d) = cfg.dispatch {
                config.dispatch = d;
            }
            let mut builder = Engine::builder(ram.clone(), source()?).config(config);
            if cfg.memory.is_huge() {
                // A host-block offline dissolves the pool's free pages in the
                // block: a fault that finds the pool dry grows it back to
                // what the run reserved.
                builder = builder.on_no_memory(|| {
                    apf::hugepool::HugePool::top_up(Instant::now() + Duration::from_millis(500)).is_ok_and(|n| n > 0)
                });
            }
            let engine = builder.start().map_err(VmError::Engine)?;
            (GuestAccess::Engine(Arc::new(engine)), None)
        }
    })
}

/// With `--uffd-socket`: guest RAM handed to the external handler there,
/// as Firecracker hands its memory over, its contents at the snapshot's
/// RAM offset in the file the handler serves.
fn external_handler(
    cfg: &RunConfig,
    ram: &GuestRam,
    restore: Option<&Restore>,
) -> Result<Option<apf_handler::client::Attached>, VmError> {
    let (Some(socket), Some(restore)) = (&cfg.uffd_socket, restore) else { return Ok(None) };
    let regions: Vec<(u64, u64, u64)> =
        ram.regions().iter().map(|r| (r.host_base(), r.len(), restore.header.ram_offset() + r.base().0)).collect();
    let page_size = ram.regions()[0].page_size() as u64;
    // SAFETY: guest RAM is private anonymous memory (4 KiB or 2 MiB pages)
    // mapped for as long as the `Vm` (which keeps the result, dropped after
    // its last access), and reached through vm-memory's volatile accesses
    // and KVM only.
    let attached = unsafe { apf_handler::client::attach(socket, &regions, page_size) };
    attached
        .map(Some)
        .map_err(|e| VmError::Io { what: "the external page-fault handler", source: std::io::Error::other(e) })
}

/// The VM and its one memory slot over all of guest RAM, fixed for the
/// whole run.
fn create_vm(ram: &GuestRam, ram_size: u64) -> Result<(Kvm, VmFd), VmError> {
    let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ram_size,
        userspace_addr: ram.regions()[0].host_base(),
    };
    // SAFETY: the slot covers exactly guest RAM's mapping, which the `Vm`
    // keeps alive (its `ram`) until after every vCPU and the VM are gone.
    unsafe { vm.set_user_memory_region(slot) }.map_err(kvm_err("set the memory slot"))?;
    Ok((kvm, vm))
}

/// Writes long mode's structures and the guest image, and for a restore
/// the generations to expect; returns the image's entry point.
fn load_guest(
    cfg: &RunConfig,
    access: &GuestAccess,
    layout: &Layout,
    restore: Option<&Restore>,
) -> Result<u64, VmError> {
    let deadline = || Instant::now() + Duration::from_secs(5);
    let boot_write =
        |what, gpa, bytes: &[u8]| access.write(gpa, bytes, deadline()).map_err(|source| VmError::Boot { what, source });
    boot_write("the GDT", agent_proto::GDT, &boot::gdt())?;
    boot_write("the page tables", agent_proto::PML4, &boot::page_tables(layout))?;
    let image = cfg.guest_image.clone().unwrap_or_else(|| GuestImage::Elf(AGENT_ELF.to_vec()));
    let entry = load_image(&image, access)?;
    if let Some(r) = restore {
        boot_write("the generation table", layout.gen_entry(0), &r.header.table_bytes())?;
    }
    Ok(entry)
}

/// The configuration the agent device hands every vCPU's agent.
fn agent_config(cfg: &RunConfig, shape: Shape, restoring: bool) -> Config {
    let mut flags = 0;
    if restoring {
        flags |= agent_proto::FLAG_RESTORE;
    }
    // The agents ask for migrates, evicts and unplugs of their own pages:
    // every kind offers them (in place where the kernel cannot move pages).
    let offered = [apf::Mode::Migrate, apf::Mode::Evict, apf::Mode::Unplug].iter().all(|m| m.offered_on(cfg.memory));
    if cfg.guest_offline && cfg.backend == Backend::Apf && offered {
        flags |= FLAG_GUEST_OFFLINE;
    }
    // The balloon needs only a discard that reads back as zeros: the
    // engine and plain memory give that; the baseline handler would fill
    // a discarded page from its source again, and the file backend would
    // show the file again.
    if cfg.guest_offline && !matches!(cfg.backend, Backend::Baseline | Backend::File) {
        flags |= FLAG_BALLOON;
        // The kernel discards huge pages whole only.
        if cfg.memory.is_huge() {
            flags |= agent_proto::FLAG_BALLOON_HUGE;
        }
    }
    if cfg.random_order {
        flags |= agent_proto::FLAG_RANDOM_ORDER;
    }
    if cfg.scattered_changed {
        flags |= agent_proto::FLAG_SCATTERED_CHANGED;
    }
    if cfg.checksum {
        flags |= FLAG_CHECKSUM;
    }
    Config { ram_size: shape.ram_size, vcpus: shape.vcpus, workload: cfg.workload, seed: shape.seed, flags }
}

/// Loads the guest image; returns its entry point.
fn load_image(image: &GuestImage, access: &GuestAccess) -> Result<u64, VmError> {
    match image {
        GuestImage::Raw(code) => {
            if code.is_empty() || code.len() as u64 > AGENT_LIMIT - AGENT_LOAD {
                return Err(VmError::Load(format!("raw code of {} bytes does not fit", code.len())));
            }
            access
                .write(AGENT_LOAD, code, Instant::now() + Duration::from_secs(5))
                .map_err(|source| VmError::Boot { what: "the guest code", source })?;
            Ok(AGENT_LOAD)
        }
        GuestImage::Elf(bytes) => {
            let mem = access.ram().guest_memory();
            let loaded = Elf::load(mem, None, &mut Cursor::new(bytes.as_slice()), Some(GuestAddress(AGENT_LOAD)))
                .map_err(|e| VmError::Load(e.to_string()))?;
            if loaded.kernel_end > AGENT_LIMIT {
                return Err(VmError::Load(format!(
                    "the image ends at {:#x}, past the agent's area (which ends at {AGENT_LIMIT:#x})",
                    loaded.kernel_end
                )));
            }
            Ok(loaded.kernel_load.0)
        }
    }
}

fn setup_vcpu(kvm: &Kvm, vm: &VmFd, layout: &Layout, id: u32, entry: u64) -> Result<VcpuFd, VmError> {
    let fd = vm.create_vcpu(id as u64).map_err(kvm_err("create vCPU"))?;
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("get supported CPUID"))?;
    fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
    let sregs = fd.get_sregs().map_err(kvm_err("get sregs"))?;
    fd.set_sregs(&boot::long_mode_sregs(sregs)).map_err(kvm_err("set sregs"))?;
    fd.set_regs(&boot::entry_regs(layout, id, entry)).map_err(kvm_err("set regs"))?;
    fd.set_fpu(&boot::fpu()).map_err(kvm_err("set FPU"))?;
    // x87 and SSE state enabled in XCR0: some KVMs (this paravirtual one
    // among them) otherwise fault on the first SSE instruction.
    let mut xcrs = fd.get_xcrs().map_err(kvm_err("get XCRs"))?;
    xcrs.nr_xcrs = 1;
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = boot::XCR0;
    fd.set_xcrs(&xcrs).map_err(kvm_err("set XCR0"))?;
    Ok(fd)
}

/// Stops every vCPU thread still running: sets the stop flag and kicks
/// them until they leave `KVM_RUN`, up to a deadline.
fn stop_vcpus(stop: &AtomicBool, threads: &[(u32, JoinHandle<VcpuEnd>)], errors: &Errors) {
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + STOP_DEADLINE;
    loop {
        let running: Vec<_> = threads.iter().filter(|(_, t)| !t.is_finished()).collect();
        if running.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            for (id, _) in running {
                errors.push(format!("vCPU {id} did not stop within {STOP_DEADLINE:?} of being kicked"));
            }
            return;
        }
        for (_, t) in &running {
            // SAFETY: the thread has not been joined (we hold its handle),
            // so its pthread_t is valid; the kick handler is installed.
            unsafe { libc::pthread_kill(t.as_pthread_t(), vcpu::kick_signal()) };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a guest as `cfg` says and reports. Err only when the run could not
/// be set up; everything that goes wrong once vCPUs run is in the report.
pub fn run(cfg: &RunConfig) -> Result<Report, VmError> {
    run_and_inspect(cfg, |_| {})
}

/// [`run`], calling `inspect` with guest RAM once every vCPU has stopped
/// (and before the engine shuts down): tests read what the VMM wrote.
///
/// With `cfg.latency` the run's spans go to a [`LatencyLayer`] (and to
/// nothing else) for the length of the run.
pub fn run_and_inspect(cfg: &RunConfig, inspect: impl FnOnce(&GuestAccess)) -> Result<Report, VmError> {
    let steps = |latency: Option<LatencyLayer>| -> Result<Report, VmError> {
        let stopped = Vm::build(cfg, latency)?.run()?;
        inspect(stopped.access());
        Ok(stopped.shutdown())
    };
    if !cfg.latency {
        return steps(None);
    }
    let layer = match cfg.chrome_trace {
        Some(_) => LatencyLayer::with_trace(TRACE_EVENTS),
        None => LatencyLayer::new(),
    };
    let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer.clone()));
    let mut report = tracing::dispatcher::with_default(&dispatch, || steps(Some(layer.clone())))?;
    report.latency = Some(layer.summary());
    if let Some(path) = &cfg.plot {
        let title = format!("apf fault latency: {} MiB, {} vCPUs", report.ram_size >> 20, report.vcpus.len());
        if let Err(e) = std::fs::write(path, latency_plot(&title, &layer.curves())) {
            report.fail(format!("cannot write the plot to {}: {e}", path.display()));
        }
    }
    if let Some(path) = &cfg.chrome_trace {
        let written = std::fs::File::create(path).and_then(|f| layer.write_chrome_trace(std::io::BufWriter::new(f)));
        match written {
            Ok(w) => report.trace_events = Some((w.events, w.dropped)),
            Err(e) => report.fail(format!("cannot write the trace to {}: {e}", path.display())),
        }
    }
    Ok(report)
}

/// A VM built and ready to run: guest RAM and how it is served, the VM
/// with its memory slot, the guest loaded, the checksum device, and one
/// vCPU in long mode per vCPU of the guest.
#[derive(Debug)]
pub struct Vm {
    // Dropped first: the vCPUs and the VM, before the RAM their slot maps.
    vcpus: Vec<VcpuFd>,
    vm: VmFd,
    cfg: RunConfig,
    shape: Shape,
    layout: Layout,
    restore: Option<Restore>,
    ram: Arc<GuestRam>,
    access: GuestAccess,
    baseline: Option<SinglePageHandler>,
    /// Guest RAM's userfaultfd and connection, with `--uffd-socket`.
    external: Option<apf_handler::client::Attached>,
    checksum: Option<Arc<ChecksumDevice>>,
    agent_config: Config,
    errors: Arc<Errors>,
    latency: Option<LatencyLayer>,
    /// The guest's time-stamp counter rate, as KVM reports it.
    tsc_khz: Option<u64>,
    /// The working-set replay started (or refused), with `--working-set`.
    working_set: Option<crate::replay::WorkingSetReport>,
    /// The set replayed, kept when the run records one too.
    replayed_set: Option<apf::WorkingSet>,
    /// From the start of the build to the VM ready to run (the snapshot
    /// opened, RAM and its engine set up, a replay's lead).
    setup: Duration,
    /// The huge pages of huge-page RAM, reserved for the run (given back
    /// last, after the RAM is unmapped).
    #[allow(dead_code)] // held for its `Drop`
    hugepages: Option<apf::hugepool::Reservation>,
}

impl Vm {
    /// Builds the VM `cfg` describes. With `latency`, vCPU threads register
    /// with it so that faults are charged to their vCPU.
    pub fn build(cfg: &RunConfig, latency: Option<LatencyLayer>) -> Result<Vm, VmError> {
        let build_start = Instant::now();
        // The snapshot first: it fixes the guest's shape. A save over it
        // is refused before the run rather than after it (and checked
        // again at the save).
        let restore = Restore::open(cfg)?;
        if let Some(path) = &cfg.save_snapshot {
            snapshot::check_save_target(path, restore.as_ref().map(|r| r.id))?;
        }
        let shape = shape(cfg, restore.as_ref())?;
        let layout = Layout::new(shape.ram_size, shape.vcpus).map_err(VmError::Layout)?;
        vcpu::install_signal_handlers()?;

        // Guest RAM, demand-faulted by the engine (or plain, for comparison).
        let hugepages = huge_pages(cfg, shape.ram_size)?;
        let ram = Arc::new(guest_ram(cfg, restore.as_ref(), shape.ram_size)?);
        let (access, baseline) =
            memory_backend(cfg, &ram, || page_source(cfg, restore.as_ref(), &ram, shape.ram_size))?;
        let external = external_handler(cfg, &ram, restore.as_ref())?;
        // The replay starts before any vCPU runs, so that it is ahead of
        // the guest from its first instruction.
        let (working_set, replayed_set) = crate::replay::start(cfg, access.engine().map(|e| &**e));

        // The VM, the guest image, the devices, the vCPUs.
        let (kvm, vm) = create_vm(&ram, shape.ram_size)?;
        let entry = load_guest(cfg, &access, &layout, restore.as_ref())?;
        let errors = Arc::new(Errors::default());
        let checksum = match cfg.checksum {
            true => Some(Arc::new(
                ChecksumDevice::start(access.clone(), errors.clone())
                    .map_err(|source| VmError::Io { what: "the checksum device", source })?,
            )),
            false => None,
        };
        let agent_config = agent_config(cfg, shape, restore.is_some());
        let vcpus =
            (0..shape.vcpus).map(|id| setup_vcpu(&kvm, &vm, &layout, id, entry)).collect::<Result<Vec<_>, _>>()?;
        // The rate the agents' timings are converted with; a KVM without
        // the ioctl leaves it to a calibration (`guestview`).
        let tsc_khz = vcpus.first().and_then(|v| v.get_tsc_khz().ok()).map(u64::from);
        Ok(Vm {
            vcpus,
            vm,
            cfg: cfg.clone(),
            shape,
            layout,
            restore,
            ram,
            access,
            baseline,
            external,
            checksum,
            agent_config,
            errors,
            latency,
            tsc_khz,
            working_set,
            replayed_set,
            setup: build_start.elapsed(),
            hugepages,
        })
    }

    /// Runs the guest: starts the agent device (its deadline counts from
    /// here), the host storm and the vCPU threads, watches them until every
    /// vCPU has ended, one failed, or the hard deadline passed, and stops
    /// every vCPU still running. Err only when a thread or event source
    /// could not be started.
    pub fn run(mut self) -> Result<StoppedVm, VmError> {
        let start = Instant::now();
        let device_memory =
            if self.checksum.is_some() { vec![crate::checksum::ring_range_in(&self.ram)] } else { Vec::new() };
        let mut agent = AgentDevice::new(
            self.access.clone(),
            self.agent_config,
            self.layout,
            device_memory,
            start + self.cfg.duration,
            self.errors.clone(),
        );
        if let Some(layer) = self.latency.clone() {
            // The faults the engine read for a vCPU: how many of its
            // slowest first accesses the guest view takes.
            agent = agent.with_fault_count(FaultCount(Arc::new(move |vcpu| {
                layer.summary().vcpus.iter().find(|v| v.vcpu == vcpu).map(|v| v.faults)
            })));
        }
        let agent = Arc::new(agent);
        let storm = self.start_storm(start)?;

        let stop = Arc::new(AtomicBool::new(false));
        let vcpu_exit =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Io { what: "an eventfd", source })?;
        let ctx = Arc::new(VcpuContext {
            ram_size: self.shape.ram_size,
            agent: agent.clone(),
            checksum: self.checksum.clone(),
            stop: stop.clone(),
            ram: self.ram.clone(),
        });
        // The event loop's manager first: nothing may fail between starting
        // vCPU threads and watching them.
        let mut em = EventManager::<Box<dyn MutEventSubscriber + Send>>::new()
            .map_err(|e| VmError::Io { what: "the event manager", source: std::io::Error::other(e.to_string()) })?;
        let wake = vcpu_exit.try_clone().map_err(|source| VmError::Io { what: "an eventfd", source })?;
        em.add_subscriber(Box::new(Supervisor { vcpu_exit: wake }));
        let vcpu_failed = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (id, fd) in (0..self.shape.vcpus).zip(std::mem::take(&mut self.vcpus)) {
            let ctx = ctx.clone();
            let failed = vcpu_failed.clone();
            let exit = vcpu_exit.try_clone().map_err(|source| VmError::Io { what: "an eventfd", source })?;
            let latency = self.latency.clone();
            let spawned = crate::spawn_traced(&format!("vcpu{id}"), move || {
                if let Some(l) = &latency {
                    l.register_current_vcpu(id);
                }
                let end = vcpu::run(id, fd, &ctx);
                if matches!(end, VcpuEnd::Failed(_)) {
                    failed.store(true, Ordering::Release);
                }
                let _ = exit.write(1);
                end
            });
            match spawned {
                Ok(t) => threads.push((id, t)),
                Err(source) => {
                    stop_vcpus(&stop, &threads, &self.errors);
                    return Err(VmError::Io { what: "a vCPU thread", source });
                }
            }
        }

        self.watch(&mut em, start, &threads, &vcpu_failed, &agent, storm.as_ref());
        stop_vcpus(&stop, &threads, &self.errors);
        let elapsed = start.elapsed();
        let vcpus = self.join_vcpus(threads, &agent);
        drop(ctx);
        Ok(StoppedVm { vm: self, agent, storm, elapsed, vcpus })
    }

    /// The host storm, if asked for and the engine serves RAM.
    fn start_storm(&self, start: Instant) -> Result<Option<Storm>, VmError> {
        let cfg = &self.cfg;
        let Some(engine) = self.access.engine().filter(|_| cfg.offline_every.is_some() || cfg.host_block) else {
            return Ok(None);
        };
        let config = StormConfig {
            every: cfg.offline_every,
            mode: cfg.offline_mode,
            max_pages: cfg.offline_max / agent_proto::PAGE_SIZE,
            host_block_at: cfg.host_block.then(|| start + cfg.duration / 2),
            seed: self.shape.seed,
        };
        let storm = Storm::start(engine.clone(), config, self.errors.clone())
            .map_err(|source| VmError::Io { what: "the offline storm", source })?;
        Ok(Some(storm))
    }

    /// The event loop: until every vCPU has ended, one failed, or the hard
    /// deadline passed.
    fn watch(
        &self,
        em: &mut EventManager<Box<dyn MutEventSubscriber + Send>>,
        start: Instant,
        threads: &[(u32, JoinHandle<VcpuEnd>)],
        vcpu_failed: &AtomicBool,
        agent: &AgentDevice,
        storm: Option<&Storm>,
    ) {
        let cfg = &self.cfg;
        let hard_deadline = start + cfg.duration + cfg.grace;
        let mut progress = Progress::new(cfg.progress && cfg.workload != Workload::Touch);
        loop {
            let _ = em.run_with_timeout(100);
            progress.show(start, cfg.duration, &self.access, agent, storm);
            if threads.iter().all(|(_, t)| t.is_finished()) {
                break;
            }
            if vcpu_failed.load(Ordering::Acquire) {
                // One vCPU failed: the run is over for the others too.
                break;
            }
            if Instant::now() >= hard_deadline {
                self.errors.push(format!(
                    "the agents did not finish within {:?} (duration {:?} plus {:?} grace); stopping every vCPU",
                    hard_deadline - start,
                    cfg.duration,
                    cfg.grace
                ));
                break;
            }
        }
        progress.clear();
    }

    /// How each vCPU thread ended, with its agent's counters.
    fn join_vcpus(&self, threads: Vec<(u32, JoinHandle<VcpuEnd>)>, agent: &AgentDevice) -> Vec<VcpuReport> {
        let agents = agent.vcpus();
        let mut reports = Vec::new();
        for (id, t) in threads {
            let exit = if !t.is_finished() {
                VcpuExit::DidNotStop
            } else {
                match t.join() {
                    Ok(end) => VcpuExit::from(end),
                    Err(_) => {
                        self.errors.push(format!("vCPU {id}: its thread panicked"));
                        VcpuExit::Panicked
                    }
                }
            };
            if let VcpuExit::Failed(e) = &exit {
                self.errors.push(e.to_string());
            }
            let counters = agents.get(id as usize).and_then(|a| a.done);
            if counters.is_none() && matches!(exit, VcpuExit::Halted) {
                self.errors.push(format!("vCPU {id}: halted without reporting done"));
            }
            reports.push(VcpuReport { id, exit, counters });
        }
        reports
    }
}

/// A VM whose vCPUs have all stopped (or were given up on): guest RAM can
/// be read, and [`StoppedVm::shutdown`] takes it down.
#[derive(Debug)]
pub struct StoppedVm {
    vm: Vm,
    agent: Arc<AgentDevice>,
    storm: Option<Storm>,
    elapsed: Duration,
    vcpus: Vec<VcpuReport>,
}

impl StoppedVm {
    /// Guest RAM, still served as during the run.
    pub fn access(&self) -> &GuestAccess {
        &self.vm.access
    }

    /// Takes the run down in order (storm; devices, dropping their pins;
    /// the snapshot; the VM; the engine) and reports.
    pub fn shutdown(self) -> Report {
        let StoppedVm { vm, agent, storm, elapsed, vcpus } = self;
        let Vm {
            vcpus: _,
            vm: vm_fd,
            cfg,
            shape,
            layout,
            restore,
            ram,
            access,
            baseline,
            external,
            checksum,
            errors,
            tsc_khz,
            mut working_set,
            replayed_set,
            setup,
            ..
        } = vm;
        let storm =
            storm.map(Storm::stop).unwrap_or_else(|| StormReport { host_block: "off".into(), ..Default::default() });
        let checksums = checksum.as_ref().map_or(0, |c| {
            c.stop();
            c.stats().computed.load(Ordering::Relaxed)
        });
        let pin_callback = checksum.as_ref().and_then(|c| {
            let h = c.stats().callback_ns.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let us = |ns: u64| ns as f64 / 1e3;
            h.quantile(0.99).map(|p99| PinCallbacks { calls: h.count(), p99_us: us(p99), max_us: us(h.max()) })
        });
        drop(checksum);
        let mut snapshot_saved = None;
        if let Some(path) = &cfg.save_snapshot {
            if vcpus.iter().all(|v| v.counters.is_some()) && errors.is_empty() {
                match snapshot::save(path, &access, &layout, shape.seed, restore.as_ref().map(|r| r.id)) {
                    Ok(_) => snapshot_saved = Some(path.display().to_string()),
                    Err(e) => errors.push(e.to_string()),
                }
            } else {
                errors.push(format!("snapshot not saved to {}: the run did not finish cleanly", path.display()));
            }
        }
        if let (Some(path), Some(engine)) = (&cfg.save_working_set, access.engine()) {
            let clean = vcpus.iter().all(|v| v.counters.is_some()) && errors.is_empty();
            let saved = match (&cfg.save_snapshot, &snapshot_saved) {
                (Some(_), None) => {
                    Err(format!("working set not saved to {}: no snapshot to bind it to", path.display()))
                }
                _ if !clean => {
                    Err(format!("working set not saved to {}: the run did not finish cleanly", path.display()))
                }
                (_, Some(_)) => {
                    crate::replay::save(path, engine, &ram, cfg.save_snapshot.as_deref(), replayed_set.as_ref())
                }
                (None, None) => crate::replay::save(path, engine, &ram, None, replayed_set.as_ref()),
            };
            match saved {
                Ok(pages) => {
                    let w = working_set.get_or_insert_with(Default::default);
                    w.saved = Some(path.display().to_string());
                    w.saved_pages = pages;
                }
                Err(e) => errors.push(e),
            }
        }
        drop(vm_fd);
        // Nothing touches guest RAM any more: the handler may stop.
        drop(external);

        let baseline_end = baseline
            .as_ref()
            .map(|b| BaselineEnd { faults: b.faults(), latency: (b.latency_at(0.5), b.latency_at(0.99)) });
        drop(baseline);
        let engine_end = access.engine().map(|engine| {
            let errors = engine.errors().try_iter().map(|e| e.to_string()).collect();
            let pins_leaked = engine.pins_registered() as u64;
            engine.wait_idle(Instant::now() + Duration::from_secs(2));
            let stats = engine.stats();
            if let Some(w) = working_set.as_mut() {
                w.replayed_pages = stats.replayed_pages;
            }
            EngineEnd {
                faults: stats.faults,
                pin_invalidations: stats.pin_invalidations,
                pin_refaults: stats.pin_refaults,
                pins_leaked,
                deferred: stats.deferred,
                json: stats.to_json(),
                errors,
            }
        });
        let mut report = Report::assemble(RunEnd {
            elapsed,
            ram_size: shape.ram_size,
            seed: shape.seed,
            backend: match (cfg.backend, cfg.memory) {
                (Backend::Apf, MemoryKind::SharedMemfd) => "apf shared",
                (Backend::Apf, MemoryKind::Image) => "apf image",
                (Backend::Apf, MemoryKind::PrivateHugetlb) => "apf hugetlb",
                (Backend::Apf, MemoryKind::SharedHugetlb) => "apf shared-hugetlb",
                (Backend::Apf, MemoryKind::HugetlbImage) => "apf hugetlb-image",
                (Backend::Plain, MemoryKind::PrivateHugetlb) => "plain hugetlb",
                (Backend::Plain, MemoryKind::SharedHugetlb) => "plain shared-hugetlb",
                (Backend::Plain, MemoryKind::SharedMemfd) => "plain shared",
                (backend, _) => backend.as_str(),
            },
            vcpus,
            agents: &agent.vcpus(),
            agent: agent.stats(),
            storm,
            checksums,
            restored: restore.map(|r| r.path.display().to_string()),
            snapshot_saved,
            baseline: baseline_end,
            engine: engine_end,
            errors: &errors,
        });
        report.guest_view = crate::guestview::guest_view(&agent.vcpus(), tsc_khz);
        report.pin_callback = pin_callback;
        report.working_set = working_set;
        report.setup = setup;
        drop(agent);
        drop(ram);
        if let GuestAccess::Engine(engine) = access {
            match Arc::try_unwrap(engine) {
                Ok(engine) => {
                    engine.shutdown();
                }
                Err(_) => report.fail("the engine is still referenced at shutdown".to_string()),
            }
        }
        report
    }
}

/// A progress line on stderr, only when stderr is a terminal.
struct Progress {
    on: bool,
    last: Instant,
    last_faults: u64,
}

impl Progress {
    fn new(wanted: bool) -> Self {
        use std::io::IsTerminal;
        Progress { on: wanted && std::io::stderr().is_terminal(), last: Instant::now(), last_faults: 0 }
    }

    fn show(
        &mut self,
        start: Instant,
        duration: Duration,
        access: &GuestAccess,
        agent: &AgentDevice,
        storm: Option<&Storm>,
    ) {
        if !self.on || self.last.elapsed() < Duration::from_millis(250) {
            return;
        }
        let faults = access.engine().map_or(0, |e| e.stats().faults);
        let rate = (faults - self.last_faults) as f64 / self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
        self.last_faults = faults;
        let done = start.elapsed().as_secs_f64() / duration.as_secs_f64().max(1e-3);
        let width = 24;
        let filled = ((done.min(1.0)) * width as f64) as usize;
        let offlines = storm.map_or(0, |s| s.progress().completed)
            + agent.stats().guest_offlines_completed.load(Ordering::Relaxed);
        let left = duration.saturating_sub(start.elapsed()).as_secs_f64();
        eprint!(
            "\r[{}{}] {left:5.1} s left  {rate:8.0} faults/s  {offlines} offlines ",
            "#".repeat(filled),
            "-".repeat(width - filled)
        );
    }

    fn clear(&self) {
        if self.on {
            eprint!("\r{}\r", " ".repeat(72));
        }
    }
}
