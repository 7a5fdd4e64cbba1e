//! The vCPU: its register set-up for a 64-bit guest, the run loop that serves its exits, the
//! deadline that stops it, and the register state a snapshot keeps.
//!
//! # Stopping a vCPU at its deadline
//! `KVM_RUN` only returns on a VM exit or a signal. Each run arms a POSIX timer
//! (`timer_create` with `SIGEV_THREAD_ID`) that sends [`kick_signal`] to the thread running the
//! vCPU when the timeout expires. The signal's handler sets `immediate_exit` in that vCPU's shared
//! `kvm_run` page, so the kick is not lost if it lands just before the thread enters `KVM_RUN`:
//! KVM then returns `EINTR` at once instead of entering the guest. No watchdog thread, no polling;
//! a guest spinning in a tight loop is stopped within the timer's resolution.

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run, kvm_segment, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::memory::GuestMemory;
use super::vm::{kvm_err, Hypervisor, Vm, VmError};
use crate::devices::channel::{
    Channel, ChannelError, Frame, BULK_PORT, CHANNEL_PORT, HEADER_LEN, MAX_PAYLOAD, STATUS_PORT,
};

/// Why a run stopped without the frame the host waited for.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the guest ran past its timeout of {0:?}")]
    Timeout(Duration),
    #[error("the guest accessed address {addr:#x}, beyond its {size} bytes of memory (memory limit exceeded)")]
    MemoryExceeded { addr: u64, size: usize },
    #[error("the guest shut down (triple fault)")]
    Shutdown,
    #[error("the guest broke the channel protocol: {0}")]
    Channel(#[from] ChannelError),
    #[error("KVM could not emulate a guest instruction (internal error)")]
    Internal,
    #[error("unexpected VM exit: {0}")]
    UnexpectedExit(String),
    #[error("cannot arm the vCPU's deadline timer: {0}")]
    Timer(std::io::Error),
    #[error("the VM was stopped by an earlier failure and cannot run until it is reset")]
    Stopped,
    #[error("KVM_RUN failed: {0}")]
    Kvm(kvm_ioctls::Error),
}

/// An exit that is not the channel's: COM1's bytes kept for the console, other ports an empty
/// bus (reads see `0xff`); an access past the end of RAM is the memory limit (nothing else is
/// mapped there); anything else stops the guest.
fn other_exit(exit: VcpuExit<'_>, console: &mut Option<Console>, memory_size: usize) -> Result<(), RunError> {
    match exit {
        VcpuExit::IoOut(COM1, data) => {
            if let Some(console) = console {
                console.bytes.extend(data);
                let excess = console.bytes.len().saturating_sub(console.cap);
                console.bytes.drain(..excess);
            }
            Ok(())
        }
        VcpuExit::IoOut(..) => Ok(()),
        VcpuExit::IoIn(_, data) => {
            data.fill(0xff);
            Ok(())
        }
        VcpuExit::MmioRead(addr, _) | VcpuExit::MmioWrite(addr, _) => Err(RunError::MemoryExceeded {
            addr,
            size: memory_size,
        }),
        VcpuExit::Shutdown => Err(RunError::Shutdown),
        VcpuExit::InternalError => Err(RunError::Internal),
        exit => Err(RunError::UnexpectedExit(format!("{exit:?}"))),
    }
}

/// Why a session stopped (see [`Vcpu::run_session`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionStop {
    /// The host asked for a snapshot: the VM is to be saved, then ended.
    Suspend,
    /// The host asked it to end, or went away.
    End,
}

/// The host's side of a running session.
pub trait SessionHost {
    /// Moves what the host sent into `channel`; `Some` when the host asks the session to stop.
    fn poll(&mut self, channel: &mut Channel) -> Option<SessionStop>;
    /// Takes a frame the guest completed; an error means the host is gone.
    fn deliver(&mut self, frame: Frame) -> std::io::Result<()>;
}

/// MSRs a snapshot keeps (those the host's KVM supports): the syscall entry points, the TSC, PAT,
/// and what a Linux guest sets up for its clock and timer (kvmclock, TSC deadline).
const SAVED_MSRS: [u32; 16] = [
    0x10,        // IA32_TSC
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    IA32_TSC_DEADLINE,
    0x4b56_4d00, // MSR_KVM_WALL_CLOCK_NEW
    0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW
    0x4b56_4d02, // MSR_KVM_ASYNC_PF_EN
    0x4b56_4d04, // MSR_KVM_PV_EOI_EN
];

/// Where and how a vCPU enters long mode.
struct LongModeEntry {
    rip: u64,
    rsp: u64,
    rsi: u64,
    pml4: u64,
    gdt: u64,
    gdt_entries: u16,
    code_selector: u16,
    data_selector: u16,
}

/// Local APIC register offsets of LVT LINT0 and LINT1, and their delivery modes (bits 8..=10).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const DELIVERY_NMI: u32 = 4;
const DELIVERY_EXTINT: u32 = 7;

/// Sets the delivery mode of the LVT register at `offset` in a saved local APIC page.
fn set_lvt_delivery(lapic: &mut kvm_lapic_state, offset: usize, mode: u32) {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = byte as _;
    }
}

const IA32_TSC_DEADLINE: u32 = 0x6e0;
/// The type of an available (not busy) 64-bit TSS descriptor.
const TSS_AVAILABLE: u8 = 9;

/// A vCPU's registers and the state around them; everything KVM needs to resume it elsewhere.
#[derive(Debug)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
    /// `None` on hosts without XSAVE support in KVM.
    pub xcrs: Option<kvm_xcrs>,
    pub xsave: Option<kvm_xsave>,
}

/// One vCPU (Kiln's guests have one).
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    /// What the guest wrote to COM1's data port, when kept (a Linux boot's early console).
    console: Option<Console>,
    /// Restore TR as an available TSS (see `Quirks::available_tss_on_restore`).
    available_tss: bool,
}

/// The last `cap` bytes a guest wrote to COM1.
#[derive(Debug)]
struct Console {
    bytes: std::collections::VecDeque<u8>,
    cap: usize,
}

/// COM1's transmit register: `earlyprintk=serial,ttyS0` writes here.
const COM1: u16 = 0x3f8;

impl Vcpu {
    pub fn new(hypervisor: &Hypervisor, vm: &Vm) -> Result<Self, VmError> {
        let fd = vm.fd().create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(hypervisor.cpuid()).map_err(kvm_err("KVM_SET_CPUID2"))?;
        Ok(Self {
            fd,
            console: None,
            available_tss: hypervisor.quirks().available_tss_on_restore,
        })
    }

    /// rip, rsp, rflags, cr0/cr2/cr3/cr4, efer and cs of the vCPU, as text.
    pub fn describe(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip {:#x} rsp {:#x} rcx {:#x} rsi {:#x} rdi {:#x} rflags {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} \
                 cr4 {:#x} efer {:#x} cs {:#x} tr {:#x}/{:#x}+{:#x} type {} g {} p {} gdt {:#x}+{:#x}",
                r.rip,
                r.rsp,
                r.rcx,
                r.rsi,
                r.rdi,
                r.rflags,
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer,
                s.cs.selector,
                s.tr.selector,
                s.tr.base,
                s.tr.limit,
                s.tr.type_,
                s.tr.g,
                s.tr.present,
                s.gdt.base,
                s.gdt.limit
            ),
            (Err(e), _) | (_, Err(e)) => format!("registers unreadable: {e}"),
        }
    }

    /// Keeps the last `cap` bytes the guest writes to COM1 from now on.
    pub fn keep_console(&mut self, cap: usize) {
        self.console = Some(Console {
            bytes: Default::default(),
            cap,
        });
    }

    /// The kept COM1 output, and stops keeping it.
    pub fn take_console(&mut self) -> Vec<u8> {
        self.console.take().map(|c| c.bytes.into()).unwrap_or_default()
    }

    /// Puts the vCPU in 64-bit long mode at `entry`, with paging rooted at `pml4` (identity
    /// mapped by the loader), flat segments described by the GDT at `gdt` (code 0x08, data
    /// 0x10), and stack `stack`.
    pub fn set_long_mode(&self, entry: u64, stack: u64, pml4: u64, gdt: u64) -> Result<(), VmError> {
        self.enter_long_mode(LongModeEntry {
            rip: entry,
            rsp: stack,
            rsi: 0,
            pml4,
            gdt,
            gdt_entries: 3,
            code_selector: 0x08,
            data_selector: 0x10,
        })
    }

    /// Sets the vCPU up for the Linux 64-bit boot protocol (see `crate::linux`): long mode at
    /// `entry` with `__BOOT_CS` = 0x10 and `__BOOT_DS` = 0x18 from the four-entry GDT at `gdt`,
    /// `rsi` = the zero page, the FPU in its reset state, fast strings enabled, and the local APIC's
    /// LINT0/LINT1 wired as a PC's (ExtINT, NMI), which the kernel expects of firmware.
    pub fn set_linux_entry(&self, entry: u64, stack: u64, pml4: u64, gdt: u64, zero_page: u64) -> Result<(), VmError> {
        self.enter_long_mode(LongModeEntry {
            rip: entry,
            rsp: stack,
            rsi: zero_page,
            pml4,
            gdt,
            gdt_entries: 4,
            code_selector: 0x10,
            data_selector: 0x18,
        })?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
        const IA32_MISC_ENABLE: u32 = 0x1a0;
        const FAST_STRING: u64 = 1;
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: IA32_MISC_ENABLE,
            data: FAST_STRING,
            ..Default::default()
        }])
        .expect("one MSR fits");
        self.fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        let mut lapic = self.fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
        set_lvt_delivery(&mut lapic, APIC_LVT0, DELIVERY_EXTINT);
        set_lvt_delivery(&mut lapic, APIC_LVT1, DELIVERY_NMI);
        self.fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
    }

    fn enter_long_mode(&self, e: LongModeEntry) -> Result<(), VmError> {
        let mut sregs = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: e.code_selector,
            type_: 0xb, // execute/read, accessed
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: e.data_selector,
            type_: 0x3,
            db: 1,
            l: 0,
            ..code
        };
        sregs.cs = code;
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.gdt.base = e.gdt;
        sregs.gdt.limit = e.gdt_entries * 8 - 1;
        sregs.cr3 = e.pml4;
        sregs.cr4 = 1 << 5 | 1 << 9 | 1 << 10; // PAE, OSFXSR, OSXMMEXCPT
        sregs.cr0 = 1 | 1 << 1 | 1 << 4 | 1 << 5 | 1 << 16 | 1 << 31; // PE MP ET NE WP PG
        sregs.efer = 1 << 8 | 1 << 10; // LME, LMA
        self.fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        let regs = kvm_regs {
            rip: e.rip,
            rsp: e.rsp,
            rbp: e.rsp,
            rsi: e.rsi,
            rflags: 0x2,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
    }

    /// Runs the guest until it completes a frame on the channel, and returns that frame.
    ///
    /// Accesses to other ports are ignored (reads see `0xff`, as on an empty bus). An access to a
    /// guest-physical address past the end of RAM stops the guest with
    /// [`RunError::MemoryExceeded`]: there is nothing else mapped there.
    pub fn run_until_frame(
        &mut self,
        channel: &mut Channel,
        memory_size: usize,
        timeout: Duration,
    ) -> Result<Frame, RunError> {
        if let Some(frame) = channel.take_frame() {
            return Ok(frame);
        }
        let deadline = Instant::now() + timeout;
        let _timer = Deadline::arm(&mut self.fd, timeout).map_err(RunError::Timer)?;
        loop {
            let interrupted = match self.fd.run() {
                Ok(VcpuExit::IoOut(CHANNEL_PORT, data)) => {
                    if channel.write(data)? {
                        return Ok(channel.take_frame().expect("write reported a frame"));
                    }
                    false
                }
                Ok(VcpuExit::IoIn(CHANNEL_PORT, data)) => {
                    channel.read(data)?;
                    false
                }
                Ok(exit) => {
                    other_exit(exit, &mut self.console, memory_size)?;
                    false
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => true,
                Err(e) => return Err(RunError::Kvm(e)),
            };
            if interrupted {
                if Instant::now() >= deadline {
                    return Err(RunError::Timeout(timeout));
                }
                // A stray kick (a signal from an earlier, already deleted timer): carry on.
                self.fd.set_kvm_immediate_exit(0);
            }
        }
    }

    /// Runs a session (a sandbox's VM): the guest runs until `host` asks it to stop, while frames
    /// flow both ways. `host.poll` moves what the host sent into the channel each time the guest
    /// reads [`STATUS_PORT`] and at least every `tick` (a periodic kick, so a guest that stops
    /// polling is still stopped on request); each frame the guest completes goes to
    /// `host.deliver`. Returns why it stopped: the VM is then between instructions, ready for a
    /// snapshot.
    pub fn run_session(
        &mut self,
        channel: &mut Channel,
        memory: &GuestMemory,
        tick: Duration,
        host: &mut dyn SessionHost,
    ) -> Result<SessionStop, RunError> {
        let memory_size = memory.size();
        let _ticker = Deadline::arm_periodic(&mut self.fd, tick).map_err(RunError::Timer)?;
        let mut bulk = Vec::new();
        loop {
            let written = match self.fd.run() {
                Ok(VcpuExit::IoOut(CHANNEL_PORT, data)) => Some(channel.write(data)?),
                Ok(VcpuExit::IoOut(BULK_PORT, data)) => {
                    let len = data.first_chunk::<4>().map_or(0, |l| u32::from_le_bytes(*l));
                    if len as usize > HEADER_LEN + MAX_PAYLOAD as usize {
                        return Err(ChannelError::Oversized { len }.into());
                    }
                    let regs = self.fd.get_regs().map_err(RunError::Kvm)?;
                    let sregs = self.fd.get_sregs().map_err(RunError::Kvm)?;
                    bulk.resize(len as usize, 0);
                    read_virtual(memory, &sregs, regs.rsi, &mut bulk).ok_or_else(|| {
                        RunError::UnexpectedExit(format!(
                            "the guest's bulk write at {:#x} ({len} bytes) is not mapped",
                            regs.rsi
                        ))
                    })?;
                    Some(channel.write(&bulk)?)
                }
                Ok(VcpuExit::IoIn(CHANNEL_PORT, data)) => {
                    channel.read(data)?;
                    None
                }
                Ok(VcpuExit::IoIn(STATUS_PORT, data)) => {
                    let stop = host.poll(channel);
                    let queued = (channel.queued().min(u32::MAX as usize) as u32).to_le_bytes();
                    for (slot, byte) in data.iter_mut().zip(queued.iter().chain(std::iter::repeat(&0))) {
                        *slot = *byte;
                    }
                    if let Some(stop) = stop {
                        return Ok(stop);
                    }
                    None
                }
                Ok(exit) => {
                    other_exit(exit, &mut self.console, memory_size)?;
                    None
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    if let Some(stop) = host.poll(channel) {
                        return Ok(stop);
                    }
                    None
                }
                Err(e) => return Err(RunError::Kvm(e)),
            };
            if written == Some(true) {
                let mut stop = None;
                while let Some(frame) = channel.take_frame() {
                    if host.deliver(frame).is_err() {
                        stop = Some(SessionStop::End);
                    }
                }
                if let Some(stop) = stop {
                    return Ok(stop);
                }
            }
        }
    }

    /// Finishes the I/O instruction the last exit stopped in, without running further guest code.
    ///
    /// After an `in`/`out` exit the instruction completes (RIP moves past it) only on the next
    /// `KVM_RUN`; registers read before that would resume the guest *at* the `out` and repeat it.
    /// `KVM_RUN` with `immediate_exit` set completes the pending operation and returns `EINTR`.
    pub fn complete_pending_io(&mut self) -> Result<(), RunError> {
        self.fd.set_kvm_immediate_exit(1);
        let result = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        match result {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(RunError::Kvm(e)),
            Ok(()) => Err(RunError::UnexpectedExit("an exit while completing I/O".into())),
        }
    }

    pub fn save_state(&self, hypervisor: &Hypervisor) -> Result<VcpuState, VmError> {
        let wanted: Vec<kvm_msr_entry> = SAVED_MSRS
            .iter()
            .filter(|&&index| hypervisor.has_msr(index))
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&wanted).expect("a handful of MSRs fits");
        let read = self.fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        Ok(VcpuState {
            regs: self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            fpu: self.fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?,
            lapic: self.fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?,
            msrs: msrs.as_slice()[..read].to_vec(),
            mp_state: self.fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
            events: self.fd.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
            debugregs: self.fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
            xcrs: self.fd.get_xcrs().ok(),
            xsave: self.fd.get_xsave().ok(),
        })
    }

    /// Sets every part of `state`, in the order KVM needs: special registers (mode, APIC base)
    /// before the APIC, pending events last.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VmError> {
        let mut sregs = state.sregs;
        if self.available_tss {
            // See `Quirks::available_tss_on_restore`.
            sregs.tr.type_ = TSS_AVAILABLE;
        }
        self.fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        self.fd.set_regs(&state.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        self.fd.set_fpu(&state.fpu).map_err(kvm_err("KVM_SET_FPU"))?;
        if let Some(xsave) = &state.xsave {
            // SAFETY: `xsave` is a plain `kvm_xsave` (no trailing entries), as `KVM_GET_XSAVE`
            // returned it on a host whose KVM accepted it; the ioctl reads exactly that struct.
            unsafe { self.fd.set_xsave(xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        }
        if let Some(xcrs) = &state.xcrs {
            self.fd.set_xcrs(xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        let msrs = Msrs::from_entries(&state.msrs).expect("a handful of MSRs fits");
        let written = self.fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if written != state.msrs.len() {
            return Err(VmError::Kvm {
                op: "KVM_SET_MSRS",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }
        self.fd.set_lapic(&state.lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
        // KVM drops a TSC deadline written while the APIC timer is not in deadline mode, as it is
        // not on a fresh vCPU before its APIC state is set: write it again now that it is.
        if let Some(deadline) = state.msrs.iter().find(|m| m.index == IA32_TSC_DEADLINE) {
            let msrs = Msrs::from_entries(&[*deadline]).expect("one MSR fits");
            self.fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        }
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        self.fd
            .set_debug_regs(&state.debugregs)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))
    }
}

thread_local! {
    /// The `kvm_run` page of the vCPU this thread is running, for the kick handler.
    static RUNNING: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal that kicks a vCPU out of `KVM_RUN` at its deadline.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 3
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: a const-initialised thread-local read and one volatile store.
    let run = RUNNING.with(Cell::get);
    if !run.is_null() {
        // SAFETY: `RUNNING` is non-null only while `Deadline` is alive, during which the `kvm_run`
        // page of the vCPU this thread runs is mapped; KVM reads `immediate_exit` on entry.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

pub(crate) fn install_kick_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()))
        .map_err(std::io::Error::from_raw_os_error)
}

/// A one-shot timer that kicks the current thread's vCPU; disarmed when dropped.
struct Deadline {
    timer: libc::timer_t,
}

impl Deadline {
    fn arm(fd: &mut VcpuFd, timeout: Duration) -> std::io::Result<Self> {
        Self::arm_with(fd, timeout, Duration::ZERO)
    }

    /// A timer that kicks every `every` (the first time after `every`).
    fn arm_periodic(fd: &mut VcpuFd, every: Duration) -> std::io::Result<Self> {
        let every = every.max(Duration::from_micros(100));
        Self::arm_with(fd, every, every)
    }

    fn arm_with(fd: &mut VcpuFd, timeout: Duration, interval: Duration) -> std::io::Result<Self> {
        install_kick_handler()?;
        fd.set_kvm_immediate_exit(0);
        RUNNING.with(|r| r.set(fd.get_kvm_run() as *mut kvm_run));
        // SAFETY: `sigevent` is a plain C struct for which all-zero is a valid value.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        event.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `event` and `timer` are valid for the call; the timer is deleted in `drop`.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) } != 0 {
            RUNNING.with(|r| r.set(std::ptr::null_mut()));
            return Err(std::io::Error::last_os_error());
        }
        let deadline = Self { timer };
        // A zero it_value would disarm the timer: wait at least a nanosecond.
        let timeout = timeout.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: interval.as_secs() as _,
                tv_nsec: interval.subsec_nanos() as libc::c_long,
            },
            it_value: libc::timespec {
                tv_sec: timeout.as_secs() as _,
                tv_nsec: timeout.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `timer` was just created; `spec` is valid for the call.
        if unsafe { libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(deadline)
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        // SAFETY: the timer was created by `arm` and is deleted exactly once.
        unsafe { libc::timer_delete(self.timer) };
        RUNNING.with(|r| r.set(std::ptr::null_mut()));
    }
}

/// Copies `buf.len()` bytes at guest-virtual `address` through the guest's current page tables
/// (4-level, or 5-level with CR4.LA57; 4 KiB, 2 MiB and 1 GiB pages); `None` if any page is not
/// mapped. The vCPU is stopped in an exit meanwhile, so the tables cannot change under the walk.
pub fn read_virtual(memory: &GuestMemory, sregs: &kvm_sregs, address: u64, buf: &mut [u8]) -> Option<()> {
    let mut done = 0;
    while done < buf.len() {
        let virtual_address = address.checked_add(done as u64)?;
        let (physical, page_size) = translate(memory, sregs, virtual_address)?;
        let in_page = (page_size - (virtual_address & (page_size - 1))) as usize;
        let n = in_page.min(buf.len() - done);
        memory.read(physical, &mut buf[done..done + n]).ok()?;
        done += n;
    }
    Some(())
}

/// The guest-physical address of `virtual_address` and the size of the page it is in.
fn translate(memory: &GuestMemory, sregs: &kvm_sregs, virtual_address: u64) -> Option<(u64, u64)> {
    const ADDRESS: u64 = 0x000f_ffff_ffff_f000;
    const PRESENT: u64 = 1;
    const HUGE: u64 = 1 << 7;
    const CR4_LA57: u64 = 1 << 12;
    let levels = if sregs.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
    // CR3's low 12 bits are a PCID (or flags), not address.
    let mut table = sregs.cr3 & ADDRESS;
    for level in (0..levels).rev() {
        let shift = 12 + 9 * level;
        let index = (virtual_address >> shift) & 0x1ff;
        let mut entry = [0u8; 8];
        memory.read(table + index * 8, &mut entry).ok()?;
        let entry = u64::from_le_bytes(entry);
        if entry & PRESENT == 0 {
            return None;
        }
        let page_size = 1u64 << shift;
        if level == 0 || ((level == 1 || level == 2) && entry & HUGE != 0) {
            let base = entry & ADDRESS & !(page_size - 1);
            return Some((base + (virtual_address & (page_size - 1)), page_size));
        }
        table = entry & ADDRESS;
    }
    None
}

#[cfg(test)]
mod page_walk_tests {
    use super::*;

    /// Page tables built by hand in guest memory: a 4 KiB page, a 2 MiB page, and a read that
    /// spans from one into the other; an unmapped address is `None`.
    #[test]
    fn guest_virtual_addresses_are_read_through_the_guests_page_tables() {
        let memory = GuestMemory::anonymous(8 << 20).unwrap();
        let entry = |at: u64, value: u64| memory.write(at, &value.to_le_bytes()).unwrap();
        let (pml4, pdpt, pd, pt) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
        // Virtual 0x0040_0000_0000 (PML4 index 0, PDPT index 1): a PD whose entry 0 is a page
        // table and entry 1 a 2 MiB page at physical 4 MiB.
        let base = 1u64 << 30;
        entry(pml4, pdpt | 3);
        entry(pdpt + 8, pd | 3 | 0x60); // accessed and dirty: flags the walk ignores
        entry(pd, pt | 3);
        entry(pd + 8, (4 << 20) | 3 | HUGE_FLAG);
        // The last 4 KiB page of the 2 MiB of the page table: physical 0x10_0000.
        entry(pt + 511 * 8, 0x10_0000 | 3);
        memory.write(0x10_0000 + 4090, b"abcdef").unwrap();
        memory.write(4 << 20, b"ghij").unwrap();
        let sregs = kvm_sregs {
            cr3: pml4 | 0x5, // a PCID in the low bits
            ..Default::default()
        };
        let mut buf = [0u8; 10];
        read_virtual(&memory, &sregs, base + (2 << 20) - 6, &mut buf).unwrap();
        assert_eq!(&buf, b"abcdefghij");
        assert_eq!(
            read_virtual(&memory, &sregs, base + (8 << 20), &mut buf),
            None,
            "unmapped"
        );
    }

    const HUGE_FLAG: u64 = 1 << 7;
}
