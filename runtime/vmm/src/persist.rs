//! Snapshots: a ready VM written to two files, and restored from them as many times as wanted.
//!
//! # Files
//! A snapshot is a directory holding:
//!
//! ```text
//!  memory   the guest's RAM, byte for byte (sparse: all-zero pages are holes)
//!  state    "KILNSNAP" | u32 version (1) | sections, each  u32 tag | u32 length | bytes
//!           tag  1 memory size (u64)        7 multiprocessing state
//!                2 general registers        8 pending events
//!                3 special registers        9 debug registers
//!                4 FPU                     10 XCRs (optional)
//!                5 local APIC              11 XSAVE area (optional)
//!                6 MSRs (u32 index, u32 0, u64 value)*
//!               12 PIC master  13 PIC slave  14 IOAPIC  15 KVM clock
//!               16 channel device (see devices::channel::Channel::save)
//!               17 PIT (optional: Linux guests)
//! ```
//!
//! KVM structures are stored as their in-memory bytes (`zerocopy`): a snapshot is meant for the
//! host and Kiln build that made it, not for migration.
//!
//! # Restore
//! [`Snapshot::load`] reads `state` once and keeps `memory` open. Each [`Snapshot::restore`] then
//! creates a VM, maps `memory` `MAP_PRIVATE` (copy-on-write; pages read on first touch), and sets
//! the vCPU and device state back. Writes a restored guest makes land in its private copies and
//! vanish with it; the file is never written.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use zerocopy::{FromBytes, IntoBytes};

use crate::builder::MicroVm;
use crate::devices::channel::Channel;
use crate::vstate::memory::{GuestMemory, MemoryError};
use crate::vstate::vcpu::{RunError, Vcpu, VcpuState};
use crate::vstate::vm::{Hypervisor, Vm, VmError, VmState};

const MAGIC: &[u8; 8] = b"KILNSNAP";
const VERSION: u32 = 1;
/// The guest memory file of a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// The state file of a snapshot directory; its presence means the snapshot is complete.
pub const STATE_FILE: &str = "state";
/// The state file while it is written, renamed to [`STATE_FILE`] last.
pub const STATE_TMP_FILE: &str = "state.tmp";
/// The memory file a session's snapshot is written to (beside `state.tmp`), while `memory` is
/// still mapped by the running VM; the host renames both once the helper reported SUSPENDED.
pub const NEXT_MEMORY_FILE: &str = "memory.next";

/// Failure to write a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum CreateSnapshotError {
    #[error("cannot stop the vCPU at a consistent point: {0}")]
    Pause(#[from] RunError),
    #[error("cannot read the VM's state: {0}")]
    Vm(#[from] VmError),
    #[error("cannot write the snapshot to {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Failure to read a snapshot's files.
#[derive(Debug, thiserror::Error)]
pub enum LoadSnapshotError {
    #[error("cannot read the snapshot at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the snapshot's state file is not valid: {0}")]
    Corrupt(&'static str),
}

/// Failure to restore a VM from a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("cannot create the VM: {0}")]
    Vm(#[from] VmError),
    #[error("cannot map the snapshot's memory: {0}")]
    Memory(#[from] MemoryError),
}

/// A loaded snapshot, ready to restore from.
#[derive(Debug)]
pub struct Snapshot {
    memory: File,
    memory_size: usize,
    vcpu: VcpuState,
    vm: VmState,
    channel: Channel,
}

impl Snapshot {
    /// Writes `vm`'s memory and state into `dir` (created if missing) and returns the snapshot.
    /// The VM must be stopped at a frame boundary (as after boot's READY); it can keep running after.
    pub fn create(hypervisor: &Hypervisor, vm: &mut MicroVm, dir: &Path) -> Result<Self, CreateSnapshotError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CreateSnapshotError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let memory_path = dir.join(MEMORY_FILE);
        let memory = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&memory_path)
            .map_err(io_err(&memory_path))?;
        let state_path = dir.join(STATE_FILE);
        let tmp = dir.join(STATE_TMP_FILE);
        let mut state = File::create(&tmp).map_err(io_err(&tmp))?;
        let snapshot = Self::write_files(hypervisor, vm, memory, &mut state)?;
        drop(state);
        fs::rename(&tmp, &state_path).map_err(io_err(&state_path))?;
        Ok(snapshot)
    }

    /// Writes `vm`'s snapshot into two files the caller opened, empty and writable: `memory`
    /// (kept open by the returned snapshot) and `state`, both synced. The caller names them: a
    /// snapshot directory holds them as `memory` and `state` (written as [`STATE_TMP_FILE`] and
    /// renamed last, so a directory with a `state` file is complete). The jailed helper
    /// (`crate::jail`) writes through files it opened before its jail closed, and the host renames.
    pub fn write_files(
        hypervisor: &Hypervisor,
        vm: &mut MicroVm,
        memory: File,
        state: &mut File,
    ) -> Result<Self, CreateSnapshotError> {
        let io_err = |name: &str| {
            let path = PathBuf::from(name);
            move |source| CreateSnapshotError::Io { path, source }
        };
        vm.vcpu.complete_pending_io()?;
        let vcpu = vm.vcpu.save_state(hypervisor)?;
        let vm_state = vm.vm.save_state()?;
        vm.memory.dump(&memory).map_err(io_err(MEMORY_FILE))?;
        let snapshot = Self {
            memory,
            memory_size: vm.memory.size(),
            vcpu,
            vm: vm_state,
            channel: vm.channel.clone(),
        };
        state
            .write_all(&snapshot.encode_state())
            .and_then(|()| state.sync_all())
            .map_err(io_err(STATE_TMP_FILE))?;
        Ok(snapshot)
    }

    /// Reads the snapshot in `dir`.
    pub fn load(dir: &Path) -> Result<Self, LoadSnapshotError> {
        let io_err = |path: PathBuf| move |source| LoadSnapshotError::Io { path, source };
        let state_path = dir.join(STATE_FILE);
        let bytes = fs::read(&state_path).map_err(io_err(state_path))?;
        let memory_path = dir.join(MEMORY_FILE);
        let memory = File::open(&memory_path).map_err(io_err(memory_path))?;
        Self::decode_state(&bytes, memory)
    }

    /// Reads a snapshot from its two files, already open (the jailed helper opens them before
    /// its jail closes, and reads them after).
    pub fn from_files(state: &mut File, memory: File) -> Result<Self, LoadSnapshotError> {
        let mut bytes = Vec::new();
        state.read_to_end(&mut bytes).map_err(|source| LoadSnapshotError::Io {
            path: PathBuf::from(STATE_FILE),
            source,
        })?;
        Self::decode_state(&bytes, memory)
    }

    /// Guest memory size in bytes.
    pub fn memory_size(&self) -> usize {
        self.memory_size
    }

    /// A new VM in the snapshot's state; the snapshot is left as it was.
    pub fn restore(&self, hypervisor: &Hypervisor) -> Result<MicroVm, RestoreError> {
        let memory = GuestMemory::from_file(&self.memory, self.memory_size)?;
        let mut vm = Vm::new(hypervisor)?;
        if self.vm.pit.is_some() {
            vm.create_pit()?;
        }
        vm.register_memory(&memory)?;
        vm.restore_state(&self.vm)?;
        let vcpu = Vcpu::new(hypervisor, &vm)?;
        vcpu.restore_state(&self.vcpu)?;
        Ok(MicroVm::from_parts(vcpu, vm, memory, self.channel.clone()))
    }

    /// Puts `vm` back into the snapshot's state without creating anything: its memory is remapped
    /// from the snapshot's file in place (see `GuestMemory::remap_from_file`) and its VM, vCPU and
    /// channel state are set back. `vm` needs the snapshot's memory size but may come from any
    /// snapshot, since all of its state is replaced; it may have run, failed or timed out since. This skips creating a VM, which is
    /// most of a restore's cost (registering the memory slot alone takes milliseconds on some hosts),
    /// so a pool of idle VMs per function makes each invocation a reset.
    pub fn reset(&self, vm: &mut MicroVm) -> Result<(), RestoreError> {
        if vm.memory.size() != self.memory_size {
            return Err(RestoreError::Memory(MemoryError::FileSize {
                file: self.memory_size as u64,
                expected: vm.memory.size(),
            }));
        }
        vm.memory.remap_from_file(&self.memory)?;
        vm.vm.restore_state(&self.vm)?;
        vm.vcpu.restore_state(&self.vcpu)?;
        vm.reset_channel(self.channel.clone());
        Ok(())
    }

    fn encode_state(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&VERSION.to_le_bytes());
        let mut section = |tag: u32, bytes: &[u8]| {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(bytes);
        };
        let v = &self.vcpu;
        section(1, &(self.memory_size as u64).to_le_bytes());
        section(2, v.regs.as_bytes());
        section(3, v.sregs.as_bytes());
        section(4, &encode_fpu(&v.fpu));
        section(5, v.lapic.as_bytes());
        let msrs: Vec<u8> = v
            .msrs
            .iter()
            .flat_map(|m| [m.index.to_le_bytes().as_slice(), &[0; 4], &m.data.to_le_bytes()].concat())
            .collect();
        section(6, &msrs);
        section(7, v.mp_state.as_bytes());
        section(8, v.events.as_bytes());
        section(9, v.debugregs.as_bytes());
        if let Some(xcrs) = &v.xcrs {
            section(10, xcrs.as_bytes());
        }
        if let Some(xsave) = &v.xsave {
            section(11, xsave.as_bytes());
        }
        section(12, self.vm.pic_master.as_bytes());
        section(13, self.vm.pic_slave.as_bytes());
        section(14, self.vm.ioapic.as_bytes());
        section(15, self.vm.clock.as_bytes());
        section(16, &self.channel.save());
        if let Some(pit) = &self.vm.pit {
            section(17, pit.as_bytes());
        }
        out
    }

    fn decode_state(bytes: &[u8], memory: File) -> Result<Self, LoadSnapshotError> {
        let corrupt = LoadSnapshotError::Corrupt;
        let rest = bytes.strip_prefix(MAGIC.as_slice()).ok_or(corrupt("bad magic"))?;
        let (version, mut rest) = rest.split_at_checked(4).ok_or(corrupt("truncated header"))?;
        if version != VERSION.to_le_bytes() {
            return Err(corrupt("unknown version"));
        }
        let mut sections: [Option<&[u8]>; 18] = [None; 18];
        while !rest.is_empty() {
            let (head, tail) = rest.split_at_checked(8).ok_or(corrupt("truncated section"))?;
            let tag = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
            let len = u32::from_le_bytes(head[4..].try_into().expect("4 bytes")) as usize;
            let (body, tail) = tail.split_at_checked(len).ok_or(corrupt("truncated section"))?;
            *sections.get_mut(tag).ok_or(corrupt("unknown section"))? = Some(body);
            rest = tail;
        }
        let get = |tag: usize| sections[tag].ok_or(corrupt("missing section"));
        fn read<T: FromBytes>(bytes: &[u8]) -> Result<T, LoadSnapshotError> {
            T::read_from_bytes(bytes).map_err(|_| LoadSnapshotError::Corrupt("section of the wrong size"))
        }
        let memory_size = u64::from_le_bytes(get(1)?.try_into().map_err(|_| corrupt("memory size"))?);
        let msr_bytes = get(6)?;
        if msr_bytes.len() % 16 != 0 {
            return Err(corrupt("MSR section"));
        }
        let msrs = msr_bytes
            .chunks_exact(16)
            .map(|c| kvm_bindings::kvm_msr_entry {
                index: u32::from_le_bytes(c[..4].try_into().expect("4 bytes")),
                data: u64::from_le_bytes(c[8..].try_into().expect("8 bytes")),
                ..Default::default()
            })
            .collect();
        let vcpu = VcpuState {
            regs: read(get(2)?)?,
            sregs: read(get(3)?)?,
            fpu: decode_fpu(get(4)?)?,
            lapic: read(get(5)?)?,
            msrs,
            mp_state: read(get(7)?)?,
            events: read(get(8)?)?,
            debugregs: read(get(9)?)?,
            xcrs: sections[10].map(read).transpose()?,
            xsave: sections[11].map(read).transpose()?,
        };
        let vm = VmState {
            pic_master: read(get(12)?)?,
            pic_slave: read(get(13)?)?,
            ioapic: read(get(14)?)?,
            clock: read(get(15)?)?,
            pit: sections[17].map(read).transpose()?,
        };
        let channel = Channel::restore(get(16)?).ok_or(corrupt("channel state"))?;
        Ok(Self {
            memory,
            memory_size: memory_size as usize,
            vcpu,
            vm,
            channel,
        })
    }
}

/// `kvm_fpu` has padding fields zerocopy will not read or write; its parts are stored one by one.
const FPU_LEN: usize = 8 * 16 + 2 + 2 + 1 + 2 + 8 + 8 + 16 * 16 + 4;

fn encode_fpu(fpu: &kvm_bindings::kvm_fpu) -> Vec<u8> {
    let mut out = Vec::with_capacity(FPU_LEN);
    fpu.fpr.iter().for_each(|r| out.extend_from_slice(r));
    out.extend_from_slice(&fpu.fcw.to_le_bytes());
    out.extend_from_slice(&fpu.fsw.to_le_bytes());
    out.push(fpu.ftwx);
    out.extend_from_slice(&fpu.last_opcode.to_le_bytes());
    out.extend_from_slice(&fpu.last_ip.to_le_bytes());
    out.extend_from_slice(&fpu.last_dp.to_le_bytes());
    fpu.xmm.iter().for_each(|r| out.extend_from_slice(r));
    out.extend_from_slice(&fpu.mxcsr.to_le_bytes());
    out
}

fn decode_fpu(bytes: &[u8]) -> Result<kvm_bindings::kvm_fpu, LoadSnapshotError> {
    if bytes.len() != FPU_LEN {
        return Err(LoadSnapshotError::Corrupt("FPU section"));
    }
    let mut at = 0;
    let mut take = |n: usize| {
        at += n;
        &bytes[at - n..at]
    };
    let mut fpu = kvm_bindings::kvm_fpu::default();
    for r in fpu.fpr.iter_mut() {
        r.copy_from_slice(take(16));
    }
    fpu.fcw = u16::from_le_bytes(take(2).try_into().expect("2 bytes"));
    fpu.fsw = u16::from_le_bytes(take(2).try_into().expect("2 bytes"));
    fpu.ftwx = take(1)[0];
    fpu.last_opcode = u16::from_le_bytes(take(2).try_into().expect("2 bytes"));
    fpu.last_ip = u64::from_le_bytes(take(8).try_into().expect("8 bytes"));
    fpu.last_dp = u64::from_le_bytes(take(8).try_into().expect("8 bytes"));
    for r in fpu.xmm.iter_mut() {
        r.copy_from_slice(take(16));
    }
    fpu.mxcsr = u32::from_le_bytes(take(4).try_into().expect("4 bytes"));
    Ok(fpu)
}

/// Decodes a state file, as [`Snapshot::load`] does, and encodes what it read: the fuzz target's
/// way in (`fuzz/`), needing neither KVM nor a memory file. Not an API.
#[doc(hidden)]
pub fn reencode_state(bytes: &[u8]) -> Result<Vec<u8>, LoadSnapshotError> {
    let memory = File::open("/dev/null").map_err(|source| LoadSnapshotError::Io {
        path: PathBuf::from("/dev/null"),
        source,
    })?;
    Ok(Snapshot::decode_state(bytes, memory)?.encode_state())
}
