//! Booting a Linux guest on Kiln's VMM: the ELF `vmlinux` (see [`crate::kernel`]), an initramfs
//! and a command line, entered through the Linux **64-bit boot protocol**
//! (`Documentation/arch/x86/boot.rst`, "64-bit Boot Protocol").
//!
//! # Why the 64-bit protocol and not PVH
//! Debian's kernel has both entry points. The 64-bit protocol starts the vCPU in long mode with
//! identity paging — exactly the state [`crate::builder`] already sets up for the test guests, so
//! Linux reuses the page tables, the long-mode register set-up and the run loop those guests
//! exercise on every host, including PVM ones where Linux itself cannot run. PVH would add a second
//! entry path (32-bit protected mode, paging off, an `hvm_start_info` and its memory map) that no
//! test here could exercise. What the kernel needs to know comes in one "zero page"
//! (`struct boot_params`): the e820 memory map, the command line's address and the initramfs's
//! address and size. Firecracker boots `vmlinux` the same way.
//!
//! # Guest-physical layout
//! ```text
//!  0x0000_0500 .. 0x0000_0520   GDT: null, null, __BOOT_CS (0x10, 64-bit code), __BOOT_DS (0x18)
//!  0x0000_7000 .. 0x0000_8000   zero page (struct boot_params); rsi points here
//!  0x0000_8ff0                  boot stack (grows down)
//!  0x0000_9000 .. 0x0000_f000   identity page tables of 0..4 GiB (as in `builder`)
//!  0x0002_0000 .. +2 KiB        the command line, NUL-terminated
//!  0x0009_fc00 .. 0x0010_0000   reserved in the e820 map (EBDA, VGA, BIOS on a PC)
//!  0x0100_0000 ..               the kernel, at the physical addresses of its ELF segments
//!  end of RAM − initramfs ..    the initramfs, page-aligned, as high as it fits
//! ```
//!
//! # Devices and the command line
//! The guest gets no PCI, no ACPI tables, no serial port and no virtio: the agent reaches the host
//! over the channel port (`kiln.channel=port`, see `devices::channel`), and every other port reads
//! as an empty bus. `earlyprintk` writes to COM1 anyway; the VMM keeps the last few KiB of it
//! ([`BOOT_LOG_CAP`]) so a failed boot says why. `quiet` keeps those writes (one VM exit per
//! character) to the messages that matter.

use std::time::Duration;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::ByteValued;

use crate::builder::{write_boot_structures, BootError, ConfigError, MicroVm, VmConfig, GDT, PML4};
use crate::devices::channel::{Frame, FrameKind};
use crate::kernel::{self, KernelError};
use crate::vstate::memory::{GuestMemory, MemoryError};
use crate::vstate::vm::Hypervisor;

/// Where the zero page (`struct boot_params`) goes; `rsi` holds it at entry.
pub const ZERO_PAGE: u64 = 0x7000;
/// The boot stack pointer, below the page tables.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Where the command line goes.
pub const CMDLINE_ADDRESS: u64 = 0x2_0000;
/// Longest command line, NUL included (x86's `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX: usize = 2048;
/// Start of the hole below 1 MiB a PC reserves (EBDA, video memory, BIOS).
const EBDA_START: u64 = 0x9_fc00;
const HIGH_MEMORY: u64 = 0x10_0000;
/// Highest address (exclusive) the kernel accepts an initramfs below (`initrd_addr_max`).
const INITRD_ADDR_MAX: u64 = 0x8000_0000;
const PAGE: u64 = 4096;
/// Bytes of early console output a VM keeps for error messages.
pub const BOOT_LOG_CAP: usize = 16 * 1024;

/// The command line Kiln boots its guest with: the agent on the channel port, no hardware to
/// probe, panics end the VM at once (`panic=-1` reboots, which a VM without firmware turns into a
/// triple fault: a [`crate::RunError::Shutdown`]). Modules may load only until the agent, PID 1,
/// has loaded its own (`tun`, the guest's network) and set `modules_disabled`: nothing the guest
/// runs afterwards can load one.
pub const DEFAULT_CMDLINE: &str = "earlyprintk=serial,ttyS0,115200 keep_bootcon quiet panic=-1 reboot=t \
     pci=off acpi=off 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd \
     tsc=reliable no_timer_check random.trust_cpu=on kiln.channel=port";

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// Where a Linux boot puts everything, computed before any memory is touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootLayout {
    /// The e820 map: (address, size, type).
    pub e820: Vec<(u64, u64, u32)>,
    pub cmdline_address: u64,
    /// Length of the command line without its NUL.
    pub cmdline_len: usize,
    pub initramfs_address: u64,
    pub initramfs_size: u64,
}

/// A boot that cannot be laid out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("the kernel command line is {len} bytes; the limit is {} bytes", CMDLINE_MAX - 1)]
    CmdlineTooLong { len: usize },
    #[error("the command line contains a NUL byte")]
    CmdlineNul,
    #[error(
        "the kernel (ending at {kernel_end:#x}) and the {initramfs} byte initramfs do not fit in \
         {memory} bytes of guest memory"
    )]
    TooSmall {
        kernel_end: u64,
        initramfs: usize,
        memory: usize,
    },
}

/// Failure to boot a Linux guest to its agent's READY frame.
#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("cannot write the boot structures: {0}")]
    Memory(#[from] MemoryError),
    #[error("{source}{}", boot_log_suffix(.boot_log))]
    Boot { source: BootError, boot_log: String },
}

fn boot_log_suffix(log: &str) -> String {
    match log.trim() {
        "" => String::new(),
        log => format!("; the guest's console said:\n{log}"),
    }
}

/// Lays out the command line and the initramfs around a kernel ending at `kernel_end`.
pub fn plan(
    memory_size: usize,
    kernel_end: u64,
    initramfs_len: usize,
    cmdline: &str,
) -> Result<BootLayout, LayoutError> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(LayoutError::CmdlineTooLong { len: cmdline.len() });
    }
    if cmdline.contains('\0') {
        return Err(LayoutError::CmdlineNul);
    }
    let too_small = LayoutError::TooSmall {
        kernel_end,
        initramfs: initramfs_len,
        memory: memory_size,
    };
    let top = (memory_size as u64).min(INITRD_ADDR_MAX);
    let lowest = kernel_end.next_multiple_of(PAGE).max(HIGH_MEMORY);
    let initramfs_address = top
        .checked_sub(initramfs_len as u64)
        .map(|a| a & !(PAGE - 1))
        .filter(|&a| a >= lowest)
        .ok_or(too_small)?;
    Ok(BootLayout {
        e820: vec![
            (0, EBDA_START, E820_RAM),
            (EBDA_START, HIGH_MEMORY - EBDA_START, E820_RESERVED),
            (HIGH_MEMORY, memory_size as u64 - HIGH_MEMORY, E820_RAM),
        ],
        cmdline_address: CMDLINE_ADDRESS,
        cmdline_len: cmdline.len(),
        initramfs_address,
        initramfs_size: initramfs_len as u64,
    })
}

/// The zero page for `layout`: the setup header a boot loader fills in, and the e820 map.
pub fn boot_params(layout: &BootLayout) -> boot_params {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = 0xff; // "undefined" boot loader
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.version = 0x020f;
    params.hdr.loadflags = 0x01; // LOADED_HIGH: the kernel is above 1 MiB
    params.hdr.kernel_alignment = 0x0100_0000;
    params.hdr.cmd_line_ptr = layout.cmdline_address as u32;
    params.hdr.cmdline_size = CMDLINE_MAX as u32;
    params.hdr.ramdisk_image = layout.initramfs_address as u32;
    params.hdr.ramdisk_size = layout.initramfs_size as u32;
    for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(&layout.e820) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = layout.e820.len() as u8;
    params
}

/// The four-entry GDT of the 64-bit boot protocol: `__BOOT_CS` at 0x10, `__BOOT_DS` at 0x18.
pub fn gdt() -> [u64; 4] {
    const CODE64: u64 = 0x00af_9b00_0000_ffff;
    const DATA: u64 = 0x00cf_9300_0000_ffff;
    [0, CODE64, CODE64, DATA]
}

impl MicroVm {
    /// Creates a VM with `config.memory_mib` of RAM, loads the ELF `vmlinux` and `initramfs`,
    /// boots Linux with `cmdline`, and runs it until the guest agent sends READY, at most
    /// `timeout`. The VM is then at the point Kiln snapshots.
    pub fn boot_linux(
        hypervisor: &Hypervisor,
        config: VmConfig,
        vmlinux: &[u8],
        initramfs: &[u8],
        cmdline: &str,
        timeout: Duration,
    ) -> Result<Self, LinuxBootError> {
        let boot_error = |source: BootError| LinuxBootError::Boot {
            source,
            boot_log: String::new(),
        };
        let size = config.memory_bytes().map_err(|e| boot_error(e.into()))?;
        let memory = GuestMemory::anonymous(size)?;
        let kernel = kernel::load_vmlinux(&memory, vmlinux)?;
        let layout = plan(size, kernel.end, initramfs.len(), cmdline)?;
        write_boot_structures(&memory)?;
        memory.write(GDT, &gdt().iter().flat_map(|e| e.to_le_bytes()).collect::<Vec<_>>())?;
        memory.write(ZERO_PAGE, boot_params(&layout).as_slice())?;
        let mut line = cmdline.as_bytes().to_vec();
        line.push(0);
        memory.write(layout.cmdline_address, &line)?;
        memory.write(layout.initramfs_address, initramfs)?;

        let mut vm = MicroVm::create(hypervisor, memory).map_err(|e| boot_error(e.into()))?;
        vm.vm.create_pit().map_err(|e| boot_error(e.into()))?;
        vm.vcpu
            .set_linux_entry(kernel.entry, BOOT_STACK, PML4, GDT, ZERO_PAGE)
            .map_err(|e| boot_error(e.into()))?;
        vm.vcpu.keep_console(BOOT_LOG_CAP);
        let result = vm.run_until_frame(timeout);
        let boot_log = String::from_utf8_lossy(&vm.vcpu.take_console()).into_owned();
        match result {
            Ok(Frame {
                kind: FrameKind::Ready, ..
            }) => Ok(vm),
            // A LOG in place of READY is the agent saying why it is not ready (the image's
            // command or ready hook): it goes first in what the console said.
            Ok(frame) => Err(LinuxBootError::Boot {
                source: BootError::NotReady(frame.kind),
                boot_log: match frame.kind {
                    FrameKind::Log => format!("{}\n{boot_log}", String::from_utf8_lossy(&frame.payload).trim_end()),
                    _ => boot_log,
                },
            }),
            Err(e) => Err(LinuxBootError::Boot {
                source: e.into(),
                boot_log,
            }),
        }
    }
}

/// The memory a Linux guest needs at least: its kernel image and the initramfs, plus room to
/// unpack the initramfs and run; used to refuse configurations that cannot boot.
pub fn minimum_memory_mib(kernel_end: u64, initramfs_len: usize) -> u32 {
    let bytes = kernel_end + 3 * initramfs_len as u64 + (32 << 20);
    bytes.div_ceil(1 << 20) as u32
}

impl From<ConfigError> for LinuxBootError {
    fn from(e: ConfigError) -> Self {
        LinuxBootError::Boot {
            source: e.into(),
            boot_log: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn the_initramfs_goes_page_aligned_at_the_top_of_ram_above_the_kernel() {
        let layout = plan(128 * MIB, 0x0280_0123, 3 * MIB + 5, DEFAULT_CMDLINE).unwrap();
        assert_eq!(layout.initramfs_address % PAGE, 0);
        assert_eq!(layout.initramfs_size, 3 * MIB as u64 + 5);
        assert!(layout.initramfs_address + layout.initramfs_size <= 128 * MIB as u64);
        assert!(128 * MIB as u64 - (layout.initramfs_address + layout.initramfs_size) < PAGE);
        // Above 2 GiB of RAM it stays under initrd_addr_max.
        let big = plan(3072 * MIB, 0x0280_0000, MIB, "").unwrap();
        assert_eq!(big.initramfs_address, INITRD_ADDR_MAX - MIB as u64);
        // It never overlaps the kernel.
        let err = plan(48 * MIB, 40 * MIB as u64, 9 * MIB, "").unwrap_err();
        assert!(matches!(err, LayoutError::TooSmall { .. }), "{err}");
        assert!(plan(48 * MIB, 40 * MIB as u64, 8 * MIB, "").is_ok());
    }

    #[test]
    fn the_e820_map_covers_ram_and_reserves_the_pc_hole() {
        let layout = plan(64 * MIB, 0x0200_0000, 4096, "").unwrap();
        assert_eq!(
            layout.e820,
            vec![
                (0, 0x9_fc00, E820_RAM),
                (0x9_fc00, 0x6_0400, E820_RESERVED),
                (0x10_0000, 63 * MIB as u64, E820_RAM),
            ]
        );
        let total: u64 = layout.e820.iter().map(|e| e.1).sum();
        assert_eq!(total, 64 * MIB as u64, "the map tiles all of RAM");
    }

    #[test]
    fn the_zero_page_carries_the_layout_at_the_protocols_offsets() {
        let layout = plan(256 * MIB, 0x0300_0000, 1234567, DEFAULT_CMDLINE).unwrap();
        let params = boot_params(&layout);
        let bytes = params.as_slice();
        assert_eq!(bytes.len(), 4096);
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let u16_at = |at: usize| u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap());
        // Offsets from boot.rst's table of the real-mode kernel header and zero page.
        assert_eq!(u16_at(0x1fe), 0xaa55, "boot_flag");
        assert_eq!(&bytes[0x202..0x206], b"HdrS");
        assert_eq!(bytes[0x210], 0xff, "type_of_loader");
        assert_eq!(bytes[0x211] & 1, 1, "LOADED_HIGH");
        assert_eq!(u32_at(0x218) as u64, layout.initramfs_address, "ramdisk_image");
        assert_eq!(u32_at(0x21c), 1234567, "ramdisk_size");
        assert_eq!(u32_at(0x228) as u64, CMDLINE_ADDRESS, "cmd_line_ptr");
        assert_eq!(u32_at(0x238) as usize, CMDLINE_MAX, "cmdline_size");
        assert_eq!(bytes[0x1e8], 3, "e820_entries");
        let entry = |i: usize| {
            let at = 0x2d0 + 20 * i;
            let addr = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
            let size = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap());
            (addr, size, u32_at(at + 16))
        };
        assert_eq!(entry(2), (0x10_0000, 255 * MIB as u64, E820_RAM));
        assert_eq!(entry(1).2, E820_RESERVED);
        assert_eq!(entry(3), (0, 0, 0), "nothing past the map");
    }

    #[test]
    fn the_command_line_is_checked_and_names_the_channel() {
        assert!(DEFAULT_CMDLINE.contains("kiln.channel=port"));
        assert!(DEFAULT_CMDLINE.len() < CMDLINE_MAX);
        let long = "x".repeat(CMDLINE_MAX);
        assert_eq!(
            plan(64 * MIB, 0x0200_0000, 0, &long),
            Err(LayoutError::CmdlineTooLong { len: CMDLINE_MAX })
        );
        assert_eq!(plan(64 * MIB, 0x0200_0000, 0, "a\0b"), Err(LayoutError::CmdlineNul));
        let layout = plan(64 * MIB, 0x0200_0000, 0, "abc").unwrap();
        assert_eq!((layout.cmdline_address, layout.cmdline_len), (CMDLINE_ADDRESS, 3));
        // The command line sits between the page tables and the reserved hole, clear of both.
        assert!(CMDLINE_ADDRESS >= 0x1_0000 && CMDLINE_ADDRESS + CMDLINE_MAX as u64 <= EBDA_START);
    }

    #[test]
    fn the_gdt_has_the_boot_selectors_of_the_protocol() {
        let gdt = gdt();
        // Descriptor bits: present (47), code/data (44), long (53) for __BOOT_CS at index 2.
        let cs = gdt[0x10 / 8];
        assert_eq!((cs >> 47) & 1, 1);
        assert_eq!((cs >> 53) & 1, 1, "64-bit code");
        assert_eq!((cs >> 43) & 1, 1, "executable");
        let ds = gdt[0x18 / 8];
        assert_eq!((ds >> 43) & 1, 0, "data");
        assert_eq!((ds >> 41) & 1, 1, "writable");
        assert_eq!(gdt[0], 0);
    }
}
