//! The Linux guest kernel: from the bzImage Debian ships to the ELF `vmlinux` that Kiln's VMM
//! loads with `linux-loader` and enters at its 64-bit entry point (`crate::linux` says why that
//! protocol and not PVH; the PVH entry is still reported, for a VMM that wants it).
//!
//! A bzImage is real-mode setup code followed by a small decompressor and the compressed
//! `vmlinux`. The boot-protocol header says where the payload is (`payload_offset` and
//! `payload_length`, boot protocol ≥ 2.08). Debian's cloud kernel compresses it with LZ4 in the
//! legacy frame format the kernel build uses: magic `02 21 4c 18`, then blocks of (u32
//! little-endian compressed size, LZ4 block of at most 8 MiB), then the kernel build's trailer —
//! the uncompressed size as a u32.
//!
//! Booting Linux is not possible on the PVM hosts Kiln is developed on (see the README), so only
//! extraction and loading are tested here; both run on the real Debian kernel.

use std::io::Cursor;

use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::GuestAddress;

use crate::vstate::memory::GuestMemory;

const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// Where the kernel may start: above the first MiB (boot structures, as in `builder`).
const HIGH_MEMORY: u64 = 0x10_0000;

/// Failure to turn a bzImage into a loadable kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("not a bzImage (no \"HdrS\" boot header, or boot protocol older than 2.08)")]
    NotBzImage,
    #[error("the bzImage's payload lies outside the file")]
    Truncated,
    #[error("the kernel payload is compressed with something other than LZ4 (magic {0:02x?})")]
    UnsupportedCompression([u8; 4]),
    #[error("the LZ4 payload is corrupt: {0}")]
    Lz4(String),
    #[error("the payload decompressed to {got} bytes but its trailer says {want}")]
    SizeMismatch { got: usize, want: usize },
    #[error("cannot load the ELF kernel: {0}")]
    Load(#[from] linux_loader::loader::Error),
}

/// Decompresses the ELF `vmlinux` out of a bzImage.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, KernelError> {
    let u16_at = |at: usize| bzimage.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at: usize| {
        bzimage
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    if bzimage.get(0x202..0x206) != Some(b"HdrS") || u16_at(0x206).unwrap_or(0) < 0x208 {
        return Err(KernelError::NotBzImage);
    }
    let setup_sects = match bzimage[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let (offset, length) = (
        u32_at(0x248).ok_or(KernelError::NotBzImage)?,
        u32_at(0x24c).ok_or(KernelError::NotBzImage)?,
    );
    let start = (setup_sects + 1) * 512 + offset as usize;
    let payload = bzimage
        .get(start..start + length as usize)
        .ok_or(KernelError::Truncated)?;
    decompress_lz4_legacy(payload)
}

fn decompress_lz4_legacy(payload: &[u8]) -> Result<Vec<u8>, KernelError> {
    let magic: [u8; 4] = payload
        .get(..4)
        .ok_or(KernelError::Truncated)?
        .try_into()
        .expect("4 bytes");
    if magic != LZ4_LEGACY_MAGIC {
        return Err(KernelError::UnsupportedCompression(magic));
    }
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut rest = &payload[4..];
    while rest.len() >= 4 {
        let size_bytes: [u8; 4] = rest[..4].try_into().expect("4 bytes");
        if size_bytes == LZ4_LEGACY_MAGIC {
            rest = &rest[4..]; // concatenated frames
            continue;
        }
        let size = u32::from_le_bytes(size_bytes) as usize;
        if rest.len() == 4 {
            // The kernel build's trailer: the uncompressed size.
            return match size == out.len() {
                true => Ok(out),
                false => Err(KernelError::SizeMismatch {
                    got: out.len(),
                    want: size,
                }),
            };
        }
        let data = rest.get(4..4 + size).ok_or(KernelError::Truncated)?;
        let n = lz4_flex::block::decompress_into(data, &mut block).map_err(|e| KernelError::Lz4(e.to_string()))?;
        out.extend_from_slice(&block[..n]);
        rest = &rest[4 + size..];
    }
    Ok(out)
}

/// Where a loaded kernel is and how to enter it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Guest-physical address of the ELF entry point, `startup_64` (entered in long mode).
    pub entry: u64,
    /// Guest-physical address of the PVH entry point (32-bit protected mode), if the kernel has one.
    pub pvh_entry: Option<u64>,
    /// Guest-physical range the kernel's segments occupy.
    pub start: u64,
    pub end: u64,
}

/// Loads an ELF `vmlinux` into guest memory at the physical addresses its segments ask for.
pub fn load_vmlinux(memory: &GuestMemory, vmlinux: &[u8]) -> Result<LoadedKernel, KernelError> {
    let loaded = Elf::load(
        memory.mmap(),
        None,
        &mut Cursor::new(vmlinux),
        Some(GuestAddress(HIGH_MEMORY)),
    )?;
    let pvh_entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Some(entry.0),
        _ => None,
    };
    Ok(LoadedKernel {
        entry: loaded.kernel_load.0,
        pvh_entry,
        start: loaded.kernel_load.0,
        end: loaded.kernel_end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lz4_legacy_frames_decompress_and_check_their_trailer() {
        let text = b"kiln kiln kiln kiln kiln kiln kiln kiln, a kernel it is not".repeat(100);
        let block = lz4_flex::block::compress(&text);
        let mut payload = LZ4_LEGACY_MAGIC.to_vec();
        payload.extend_from_slice(&(block.len() as u32).to_le_bytes());
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&(text.len() as u32).to_le_bytes());
        assert_eq!(decompress_lz4_legacy(&payload).unwrap(), text);
        let n = payload.len();
        payload[n - 4..].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            decompress_lz4_legacy(&payload),
            Err(KernelError::SizeMismatch { want: 1, .. })
        ));
        assert!(matches!(
            decompress_lz4_legacy(b"\x1f\x8b\x08\0gzip"),
            Err(KernelError::UnsupportedCompression(_))
        ));
        assert!(matches!(extract_vmlinux(&[0u8; 1024]), Err(KernelError::NotBzImage)));
    }
}
