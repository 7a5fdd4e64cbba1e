//! The VM: the KVM handle for one guest, its memory slot and its in-kernel interrupt controller,
//! plus [`Hypervisor`], the `/dev/kvm` handle and the host facts every VM is built from.
//!
//! The in-kernel irqchip is created even though Kiln's guests take no interrupts: it gives each
//! vCPU a local APIC, whose state is part of a snapshot, as a Linux guest's is. A Linux guest also
//! gets the in-kernel PIT ([`Vm::create_pit`]): the kernel calibrates its clocks against it.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region, CpuId,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};

use super::memory::GuestMemory;

/// Where KVM puts the TSS it needs on Intel hosts: three pages just below 4 GiB, above any guest RAM
/// Kiln creates (at most [`crate::MAX_MEMORY_MIB`]), in the range PCs reserve for firmware.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Failure to open KVM or create a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    #[error("KVM API version {0} is not 12")]
    ApiVersion(i32),
    #[error("KVM lacks a capability Kiln needs: {0}")]
    MissingCapability(&'static str),
    #[error("KVM refused {op}: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
}

pub(crate) fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// `/dev/kvm` and what the host supports; opened once and shared by every VM.
#[derive(Debug)]
pub struct Hypervisor {
    kvm: Kvm,
    cpuid: CpuId,
    msrs: Vec<u32>,
    quirks: Quirks,
}

/// Work-arounds for hypervisors that differ from hardware; all off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quirks {
    /// Restore the task register as an *available* 64-bit TSS (type 9) instead of the busy one
    /// (type 11) `KVM_GET_SREGS` reports. Needed when KVM itself runs nested under QEMU's TCG
    /// (AMD SVM emulated in software): QEMU checks a user-mode `in`/`out` against the TSS I/O
    /// bitmap only for a type-9 TR, so a restored guest agent's port I/O faults with #GP. Its own
    /// `ltr` leaves type 9 in the hidden register, which is why a booted guest works. Hardware
    /// KVM needs the busy type (VMX refuses to enter a guest without it).
    pub available_tss_on_restore: bool,
}

impl Hypervisor {
    /// Opens `/dev/kvm` and checks the capabilities Kiln relies on.
    pub fn open() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::Open)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        for (cap, name) in [
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCapability(name));
            }
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let msrs = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        Ok(Self {
            kvm,
            cpuid,
            msrs,
            quirks: Quirks::default(),
        })
    }

    /// The same hypervisor with `quirks` applied to the VMs created from now on.
    pub fn with_quirks(mut self, quirks: Quirks) -> Self {
        self.quirks = quirks;
        self
    }

    pub fn quirks(&self) -> Quirks {
        self.quirks
    }

    pub(crate) fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub(crate) fn cpuid(&self) -> &CpuId {
        &self.cpuid
    }

    /// Whether the host's KVM can read and write this MSR.
    pub(crate) fn has_msr(&self, index: u32) -> bool {
        self.msrs.contains(&index)
    }
}

/// One guest's VM file descriptor.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    pit: bool,
}

/// The VM-wide state a snapshot keeps: the three in-kernel interrupt controllers and the clock.
#[derive(Debug, Clone)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub clock: kvm_clock_data,
    /// The PIT's state, for VMs that have one (Linux guests).
    pub pit: Option<kvm_pit_state2>,
}

impl Vm {
    pub fn new(hypervisor: &Hypervisor) -> Result<Self, VmError> {
        let fd = hypervisor.kvm().create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(TSS_ADDRESS).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        Ok(Self { fd, pit: false })
    }

    /// Adds the in-kernel i8254 PIT (its speaker port a dummy), as Linux guests expect one.
    pub fn create_pit(&mut self) -> Result<(), VmError> {
        let config = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(config).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        self.pit = true;
        Ok(())
    }

    pub(crate) fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Gives the guest `memory` as its RAM at guest-physical 0 (slot 0).
    pub fn register_memory(&self, memory: &GuestMemory) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: memory.size() as u64,
            userspace_addr: memory.host_address() as u64,
        };
        // SAFETY: the region describes `memory`'s own mapping, which stays mapped for as long as
        // the VM exists: `MicroVm` owns both and drops the VM (and its vCPU) before the memory.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))
    }

    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |chip_id| {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map(|()| chip)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            clock: self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
            pit: match self.pit {
                true => Some(self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?),
                false => None,
            },
        })
    }

    /// Sets `state` back; a state with a PIT needs a VM with one (see [`Vm::create_pit`]).
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        if let Some(pit) = &state.pit {
            if !self.pit {
                return Err(VmError::MissingCapability("a PIT in a VM created without one"));
            }
            self.fd.set_pit2(pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        }
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        // Only the clock value is restored; the flags KVM_GET_CLOCK reports describe the source
        // host's clock and are refused by KVM_SET_CLOCK.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))
    }
}
