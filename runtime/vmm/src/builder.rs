//! Building and booting a microVM, and talking to it once it runs.
//!
//! Kiln's boot protocol for a flat 64-bit image (the tiny test guests; a Linux kernel is loaded by
//! `crate::linux` on the same page tables):
//!
//! ```text
//!  guest-physical                 what
//!  0x0000_0500 .. 0x0000_0518     GDT: null, 64-bit code (0x08), data (0x10)
//!  0x0000_7000 .. 0x0000_9000     boot stack (rsp = 0x9000)
//!  0x0000_9000                    PML4 → PDPT at 0xa000 → 4 page directories 0xb000..0xf000
//!                                 identity map of 0..4 GiB in 2 MiB pages
//!  0x0010_0000 (IMAGE_ADDRESS)    the image; the vCPU starts at its first byte in long mode
//!  .. memory size                 free for the guest
//! ```
//!
//! The identity map covers 4 GiB whatever the memory size: a guest that touches an address past
//! its RAM reaches no memory slot, KVM hands the access to the VMM, and the run stops with
//! [`RunError::MemoryExceeded`]. The guest has no way to grow its memory.
//!
//! All calls block the calling thread while the vCPU runs: call them from a dedicated thread
//! (`spawn_blocking`), never from an async task.

use std::time::Duration;

use crate::devices::channel::{Channel, ChannelError, Frame, FrameKind};
use crate::vstate::memory::{GuestMemory, MemoryError};
use crate::vstate::vcpu::{RunError, SessionHost, SessionStop, Vcpu};
use crate::vstate::vm::{Hypervisor, Vm, VmError};

/// Smallest guest: the boot structures below 1 MiB and a 1 MiB image.
pub const MIN_MEMORY_MIB: u32 = 2;
/// Largest guest: the extent of the identity map.
pub const MAX_MEMORY_MIB: u32 = 4096;
/// Where the image is loaded and started.
pub const IMAGE_ADDRESS: u64 = 0x10_0000;

pub(crate) const GDT: u64 = 0x500;
const STACK_TOP: u64 = 0x9000;
pub(crate) const PML4: u64 = 0x9000;
const PDPT: u64 = 0xa000;
const PD: u64 = 0xb000;

/// A guest's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest RAM in MiB, [`MIN_MEMORY_MIB`]..=[`MAX_MEMORY_MIB`] and at most the caller's cap.
    pub memory_mib: u32,
    /// The caller's memory cap in MiB (Kiln's per-function limit); refused above it.
    pub max_memory_mib: u32,
}

impl VmConfig {
    pub fn new(memory_mib: u32) -> Self {
        Self {
            memory_mib,
            max_memory_mib: MAX_MEMORY_MIB,
        }
    }

    pub(crate) fn memory_bytes(&self) -> Result<usize, ConfigError> {
        let max = self.max_memory_mib.min(MAX_MEMORY_MIB);
        if self.memory_mib < MIN_MEMORY_MIB || self.memory_mib > max {
            return Err(ConfigError::MemorySize {
                requested: self.memory_mib,
                min: MIN_MEMORY_MIB,
                max,
            });
        }
        Ok(self.memory_mib as usize * 1024 * 1024)
    }
}

/// A configuration Kiln refuses before touching KVM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("memory of {requested} MiB is outside {min}..={max} MiB")]
    MemorySize { requested: u32, min: u32, max: u32 },
    #[error("the image of {len} bytes does not fit in {memory_mib} MiB of guest memory")]
    ImageTooLarge { len: usize, memory_mib: u32 },
}

/// Failure to create a VM and boot it until its ready signal.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create the VM: {0}")]
    Vm(#[from] VmError),
    #[error("cannot set up guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("the guest failed before it was ready: {0}")]
    Run(#[from] RunError),
    #[error("the guest sent a {0:?} frame before its ready signal")]
    NotReady(FrameKind),
}

/// Failure of one request to a running guest.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("the request cannot be queued: {0}")]
    Channel(#[from] ChannelError),
    #[error("the guest answered with a {0:?} frame instead of a response")]
    UnexpectedFrame(FrameKind),
    #[error("the VM was stopped by an earlier failure and cannot run until it is reset")]
    Stopped,
}

/// A VM, its vCPU, memory and channel. Dropping it tears the VM down.
#[derive(Debug)]
pub struct MicroVm {
    // Field order is drop order: the vCPU and VM go before the memory KVM maps.
    pub(crate) vcpu: Vcpu,
    pub(crate) vm: Vm,
    pub(crate) memory: GuestMemory,
    pub(crate) channel: Channel,
    stopped: bool,
}

impl MicroVm {
    /// Creates an empty VM with `memory` as its RAM and one vCPU; nothing runs yet.
    pub(crate) fn create(hypervisor: &Hypervisor, memory: GuestMemory) -> Result<Self, VmError> {
        let vm = Vm::new(hypervisor)?;
        vm.register_memory(&memory)?;
        let vcpu = Vcpu::new(hypervisor, &vm)?;
        Ok(Self {
            vcpu,
            vm,
            memory,
            channel: Channel::new(),
            stopped: false,
        })
    }

    /// Creates a VM with `config.memory_mib` of zeroed RAM and one vCPU, and loads nothing: the
    /// cost every fresh boot pays before the guest's first instruction.
    pub fn empty(hypervisor: &Hypervisor, config: VmConfig) -> Result<Self, BootError> {
        let memory = GuestMemory::anonymous(config.memory_bytes()?)?;
        Ok(Self::create(hypervisor, memory)?)
    }

    pub(crate) fn from_parts(vcpu: Vcpu, vm: Vm, memory: GuestMemory, channel: Channel) -> Self {
        Self {
            vcpu,
            vm,
            memory,
            channel,
            stopped: false,
        }
    }

    /// Creates a VM, loads a flat 64-bit `image` (see the module doc), and runs it until it sends
    /// its READY frame, at most `timeout`.
    pub fn boot_flat64(
        hypervisor: &Hypervisor,
        config: VmConfig,
        image: &[u8],
        timeout: Duration,
    ) -> Result<Self, BootError> {
        let size = config.memory_bytes()?;
        if IMAGE_ADDRESS as usize + image.len() > size {
            return Err(ConfigError::ImageTooLarge {
                len: image.len(),
                memory_mib: config.memory_mib,
            }
            .into());
        }
        let memory = GuestMemory::anonymous(size)?;
        write_boot_structures(&memory)?;
        memory.write(IMAGE_ADDRESS, image)?;
        let mut vm = Self::create(hypervisor, memory)?;
        vm.vcpu.set_long_mode(IMAGE_ADDRESS, STACK_TOP, PML4, GDT)?;
        match vm.run_until_frame(timeout)? {
            Frame {
                kind: FrameKind::Ready, ..
            } => Ok(vm),
            frame => Err(BootError::NotReady(frame.kind)),
        }
    }

    /// Sends `input` as a REQUEST frame and runs the guest until it answers, at most `timeout`.
    /// Any failure stops the VM for good: its state is no longer trustworthy.
    pub fn request(&mut self, input: &[u8], timeout: Duration) -> Result<Vec<u8>, RequestError> {
        self.send(&Frame::new(FrameKind::Request, input))?;
        match self.run_until_frame(timeout)? {
            Frame {
                kind: FrameKind::Response,
                payload,
            } => Ok(payload),
            frame => {
                self.stopped = true;
                Err(RequestError::UnexpectedFrame(frame.kind))
            }
        }
    }

    /// Queues a frame for the guest; it reads it when it next runs.
    pub fn send(&mut self, frame: &Frame) -> Result<(), RequestError> {
        if self.stopped {
            return Err(RequestError::Stopped);
        }
        Ok(self.channel.send(frame)?)
    }

    /// Runs the guest until it completes a frame, at most `timeout`.
    pub fn run_until_frame(&mut self, timeout: Duration) -> Result<Frame, RunError> {
        if self.stopped {
            return Err(RunError::Stopped);
        }
        let result = self
            .vcpu
            .run_until_frame(&mut self.channel, self.memory.size(), timeout);
        if result.is_err() {
            self.stopped = true;
        }
        result
    }

    /// Runs the VM as a session until `host` asks it to stop (see
    /// [`crate::vstate::vcpu::Vcpu::run_session`]). Frames queued with [`MicroVm::send`] before
    /// are the guest's first.
    pub fn run_session(&mut self, tick: Duration, host: &mut dyn SessionHost) -> Result<SessionStop, RunError> {
        if self.stopped {
            return Err(RunError::Stopped);
        }
        let result = self.vcpu.run_session(&mut self.channel, &self.memory, tick, host);
        if result.is_err() {
            self.stopped = true;
        }
        result
    }

    /// A new channel (the snapshot's) for a VM being reset; the VM may run again.
    pub(crate) fn reset_channel(&mut self, channel: Channel) {
        self.channel = channel;
        self.stopped = false;
    }

    /// The guest's RAM, for inspection by tests and tools.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The vCPU's instruction pointer, stack and control registers, for diagnosing a guest that
    /// stopped (tools and error reports).
    pub fn describe_vcpu(&self) -> String {
        self.vcpu.describe()
    }

    /// Keeps the last `cap` bytes the guest writes to COM1 from now on (see [`MicroVm::console`]).
    pub fn keep_console(&mut self, cap: usize) {
        self.vcpu.keep_console(cap);
    }

    /// The kept COM1 output, and stops keeping it.
    pub fn console(&mut self) -> Vec<u8> {
        self.vcpu.take_console()
    }
}

/// Writes the GDT and the identity-mapping page tables.
pub(crate) fn write_boot_structures(memory: &GuestMemory) -> Result<(), MemoryError> {
    let gdt: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    memory.write(GDT, &u64s(&gdt))?;
    const PRESENT_RW: u64 = 0b11;
    const HUGE: u64 = 1 << 7;
    memory.write(PML4, &u64s(&[PDPT | PRESENT_RW]))?;
    let pdpt: Vec<u64> = (0..4).map(|i| (PD + i * 0x1000) | PRESENT_RW).collect();
    memory.write(PDPT, &u64s(&pdpt))?;
    let pd: Vec<u64> = (0..4 * 512u64).map(|i| (i << 21) | PRESENT_RW | HUGE).collect();
    memory.write(PD, &u64s(&pd))
}

fn u64s(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
