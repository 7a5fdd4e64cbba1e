//! Guest memory: one region at guest-physical address 0, backed either by anonymous memory (a
//! fresh boot) or by a snapshot's memory file mapped `MAP_PRIVATE` (a restore).
//!
//! The private file mapping is what makes restores cheap and isolated: pages are read from the file
//! (page cache) only when the guest touches them, and the first write to a page copies it into
//! memory private to that VM. The file is never written through the mapping, so any number of VMs
//! restored from one snapshot, at once or in turn, all start from the same bytes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Guest page size the snapshot writer scans in.
const PAGE: usize = 4096;

/// Failure to set up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        size: usize,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("the memory file holds {file} bytes but the snapshot records {expected}")]
    FileSize { file: u64, expected: usize },
    #[error("cannot read the memory file: {0}")]
    Io(#[from] io::Error),
    #[error("guest address {addr:#x} (+{len}) is outside the guest's {size} bytes")]
    OutOfRange { addr: u64, len: usize, size: usize },
}

/// The guest's RAM.
#[derive(Debug)]
pub struct GuestMemory {
    mem: GuestMemoryMmap,
    size: usize,
    host: *mut u8,
}

// SAFETY: `host` is the address of the mapping `mem` owns, only handed to KVM; `GuestMemoryMmap`
// itself is Send and Sync, and the raw pointer adds no thread-affine state.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; shared access goes through `mem`'s volatile accessors.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Zeroed memory for a fresh boot. `MAP_NORESERVE`: untouched pages cost nothing.
    pub fn anonymous(size: usize) -> Result<Self, MemoryError> {
        let region = MmapRegion::build(
            None,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        )
        .map_err(|source| MemoryError::Map { size, source })?;
        Ok(Self::from_region(region, size))
    }

    /// Memory restored from a snapshot file: mapped copy-on-write, paged in on demand.
    pub fn from_file(file: &File, size: usize) -> Result<Self, MemoryError> {
        let file_len = file.metadata()?.len();
        if file_len != size as u64 {
            return Err(MemoryError::FileSize {
                file: file_len,
                expected: size,
            });
        }
        let region = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(file.try_clone()?, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryError::Map { size, source })?;
        Ok(Self::from_region(region, size))
    }

    fn from_region(region: MmapRegion, size: usize) -> Self {
        let host = region.as_ptr();
        let region = GuestRegionMmap::new(region, GuestAddress(0)).expect("region at 0 cannot overflow");
        let mem = GuestMemoryMmap::from_regions(vec![region]).expect("one region never overlaps");
        Self { mem, size, host }
    }

    /// Replaces the whole of this memory, in place, with a fresh copy-on-write mapping of `file`
    /// (a snapshot's memory file): every page the guest dirtied is dropped, and the host address
    /// stays the same, so the VM's memory slot stays valid. KVM's MMU notifier drops the guest's
    /// mappings of the old pages; the guest faults the file's pages in again as it touches them.
    pub fn remap_from_file(&self, file: &File) -> Result<(), MemoryError> {
        let file_len = file.metadata()?.len();
        if file_len != self.size as u64 {
            return Err(MemoryError::FileSize {
                file: file_len,
                expected: self.size,
            });
        }
        // SAFETY: `self.host .. + self.size` is exactly the mapping `self.mem` owns, so MAP_FIXED
        // replaces only Kiln's own guest memory (never another mapping), with one of the same size
        // and protection; `mem` keeps owning (and later unmaps) that range. No vCPU runs while this
        // executes: it takes the memory of a `MicroVm` that is not running.
        let mapped = unsafe {
            libc::mmap(
                self.host.cast(),
                self.size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE | libc::MAP_FIXED,
                std::os::fd::AsRawFd::as_raw_fd(file),
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(MemoryError::Io(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The `vm-memory` view, for loaders that write through it (`linux-loader`).
    pub(crate) fn mmap(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Host address of guest-physical 0, for registering the region with KVM.
    pub fn host_address(&self) -> *mut u8 {
        self.host
    }

    /// Copies `bytes` into guest memory at `addr`.
    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), MemoryError> {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|_| MemoryError::OutOfRange {
                addr,
                len: bytes.len(),
                size: self.size,
            })
    }

    /// Copies guest memory at `addr` into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| MemoryError::OutOfRange {
                addr,
                len: buf.len(),
                size: self.size,
            })
    }

    /// Writes the whole of guest memory to `file` (which must be empty), leaving holes where pages
    /// are all zero: a guest that touched 3 MiB of 128 costs 3 MiB of disk, and restores read the
    /// holes back as zeros without I/O.
    pub fn dump(&self, file: &File) -> io::Result<()> {
        let mut page = [0u8; PAGE];
        let mut offset = 0usize;
        while offset < self.size {
            let len = PAGE.min(self.size - offset);
            self.read(offset as u64, &mut page[..len]).map_err(io::Error::other)?;
            if page[..len].iter().any(|&b| b != 0) {
                file.write_all_at(&page[..len], offset as u64)?;
            }
            offset += len;
        }
        file.set_len(self.size as u64)?;
        file.sync_all()
    }
}
