//! The disk budget: what new data (a deploy's upload, an asynchronous invocation's input) may be
//! accepted, so that an invoke-only token cannot fill the disk. Two bounds, both checked before
//! anything is written: a free-space floor on the data directory's file system (`statvfs`), and
//! an optional cap on the data directory's own size. Past either, the write is refused with
//! `insufficient_storage` and nothing is lost.
//!
//! The directory's size is measured by walking it, at most once per [`REMEASURE`] (the walk is
//! cheap next to a deploy, not next to every submit); between walks, what was accepted is added
//! to the last measurement, so a burst cannot slip past the cap between two walks.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How stale the measured size of the data directory may be.
const REMEASURE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StorageFull {
    #[error(
        "the data directory's file system has {free} bytes free, below the server's floor of {floor} \
         bytes (--min-free-bytes)"
    )]
    FreeSpace { free: u64, floor: u64 },
    #[error("the data directory holds {used} bytes, and the server's limit is {max} bytes (--max-data-bytes)")]
    DataBytes { used: u64, max: u64 },
}

pub struct DiskBudget {
    root: PathBuf,
    min_free: u64,
    max_data: Option<u64>,
    /// The last measured size and when; then what was accepted since.
    measured: Mutex<(Option<Instant>, u64)>,
}

impl DiskBudget {
    pub fn new(root: PathBuf, min_free: u64, max_data: Option<u64>) -> DiskBudget {
        DiskBudget {
            root,
            min_free,
            max_data,
            measured: Mutex::new((None, 0)),
        }
    }

    /// Whether `incoming` more bytes may be written; counts them if so. Blocking (it may walk the
    /// data directory): call it off the async threads.
    pub fn admit(&self, incoming: u64) -> Result<(), StorageFull> {
        let free = free_bytes(&self.root).unwrap_or(u64::MAX);
        if free < self.min_free.saturating_add(incoming) {
            return Err(StorageFull::FreeSpace {
                free,
                floor: self.min_free,
            });
        }
        let Some(max) = self.max_data else {
            return Ok(());
        };
        let mut measured = self.measured.lock().unwrap_or_else(|e| e.into_inner());
        if measured.0.is_none_or(|at| at.elapsed() >= REMEASURE) {
            *measured = (Some(Instant::now()), size_of(&self.root));
        }
        let used = measured.1;
        if used.saturating_add(incoming) > max {
            return Err(StorageFull::DataBytes { used, max });
        }
        measured.1 = used.saturating_add(incoming);
        Ok(())
    }
}

/// Bytes an unprivileged writer may still use on the file system holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stats` points to writable memory of the
    // right type; statvfs fills it in full when it returns 0.
    let stats = unsafe {
        if libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) != 0 {
            return None;
        }
        stats.assume_init()
    };
    Some((stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64))
}

/// The bytes of every file under `root` (allocated, as the disk sees them), not following links.
fn size_of(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                pending.extend(entries.flatten().map(|e| e.path()));
            }
        } else {
            total = total.saturating_add(meta.blocks().saturating_mul(512));
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_past_the_cap_or_the_floor_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), vec![1u8; 64 * 1024]).unwrap();
        let used = size_of(dir.path());
        assert!(used >= 64 * 1024, "{used}");

        let budget = DiskBudget::new(dir.path().to_path_buf(), 0, Some(used + 1000));
        budget.admit(600).unwrap();
        // What was accepted counts before the next walk.
        assert_eq!(
            budget.admit(600),
            Err(StorageFull::DataBytes {
                used: used + 600,
                max: used + 1000
            })
        );
        budget.admit(400).unwrap();

        let floor = DiskBudget::new(dir.path().to_path_buf(), u64::MAX, None);
        assert!(matches!(floor.admit(1), Err(StorageFull::FreeSpace { .. })));
        assert!(DiskBudget::new(dir.path().to_path_buf(), 0, None).admit(1).is_ok());
    }
}
