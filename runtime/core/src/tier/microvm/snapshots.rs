//! Snapshots in the data directory: `<data>/microvm/<digest>/{memory,state}` (the file format is
//! `kiln_vmm::persist`'s), named by [`super::GuestImage::snapshot_digest`], which the version row
//! records as its code digest — so the row that references a snapshot is what keeps it.
//!
//! A deploy boots into a staging directory `<data>/tmp/microvm-<random>/`, and under the commit
//! lock the snapshot is fsynced and renamed to its final name *before* the version row commits: a
//! crash leaves either a staging directory or an unreferenced snapshot, never a row naming a
//! missing or half-written one. Start-up [`sweep`]s both kinds of leftovers.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_vmm::Snapshot;

use super::invoke::MicrovmFunction;
use super::MicrovmTier;
use crate::digest::Digest;
use crate::function::VersionRecord;
use crate::functions::LoadError;
use crate::storage::local::sync_dir;
use crate::storage::Layout;

const STAGING_PREFIX: &str = "microvm-";

fn root(layout: &Layout) -> PathBuf {
    layout.snapshots()
}

/// Where the snapshot named `digest` lives.
pub fn dir(layout: &Layout, digest: &Digest) -> PathBuf {
    root(layout).join(digest.hex())
}

/// A snapshot being written by a deploy: removed when dropped unless published.
pub struct Staged {
    pub digest: Digest,
    /// `None` when the snapshot already exists under its name (nothing was booted).
    path: Option<PathBuf>,
}

impl Staged {
    /// A fresh staging directory for the snapshot `digest`.
    pub fn new(layout: &Layout, digest: Digest) -> io::Result<Self> {
        let path = layout
            .tmp()
            .join(format!("{STAGING_PREFIX}{:016x}", rand::random::<u64>()));
        fs::create_dir(&path)?;
        Ok(Self {
            digest,
            path: Some(path),
        })
    }

    /// The snapshot `digest` is already published: this deploy reuses it.
    pub fn existing(digest: Digest) -> Self {
        Self { digest, path: None }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Makes the staged files durable and moves them to their final name. Call it under the
    /// commit lock, before the version row is committed. A snapshot published meanwhile under the
    /// same name has the same content and is kept.
    pub fn publish(mut self, layout: &Layout) -> io::Result<PathBuf> {
        let final_path = dir(layout, &self.digest);
        let Some(path) = self.path.take() else {
            return match final_path.join("state").exists() {
                true => Ok(final_path),
                false => Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("snapshot {} vanished before its commit", final_path.display()),
                )),
            };
        };
        let result = (|| {
            for name in ["memory", "state"] {
                File::open(path.join(name))?.sync_all()?;
            }
            sync_dir(&path)?;
            if final_path.join("state").exists() {
                return Ok(());
            }
            fs::create_dir_all(root(layout))?;
            fs::rename(&path, &final_path)?;
            sync_dir(&root(layout))
        })();
        let _ = fs::remove_dir_all(&path);
        result.map(|()| final_path)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = fs::remove_dir_all(path);
        }
    }
}

/// Loads the snapshot a microvm version runs from. Blocking work runs on the blocking pool.
pub async fn load(tier: &MicrovmTier, record: &VersionRecord) -> Result<Arc<MicrovmFunction>, LoadError> {
    if !tier.is_available() {
        return Err(LoadError::Unavailable(tier.unavailable()));
    }
    let path = dir(&tier.layout, &record.code_digest);
    let snapshot = tokio::task::spawn_blocking(move || Snapshot::load(&path))
        .await
        .expect("snapshot load task panicked")
        .map_err(|e| {
            LoadError::Link(format!(
                "the microVM snapshot of {}@{}: {e}",
                record.name, record.version
            ))
        })?;
    Ok(Arc::new(MicrovmFunction::new(snapshot)))
}

/// Removes a snapshot no version references any more (after a delete).
pub fn remove_snapshot(layout: &Layout, digest: &Digest) {
    let _ = fs::remove_dir_all(dir(layout, digest));
}

/// Removes what a crash may have left: staging directories, and snapshots whose digest no
/// version references. Runs at start-up, before anything is served.
pub fn sweep(layout: &Layout, referenced: &HashSet<String>) {
    if let Ok(entries) = fs::read_dir(layout.tmp()) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(STAGING_PREFIX) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    let Ok(entries) = fs::read_dir(root(layout)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if Digest::parse(&name).is_some() && !referenced.contains(name.as_ref()) {
            tracing::info!(digest = %name, "removing a microVM snapshot no version references");
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_snapshot_files(dir: &Path) {
        fs::write(dir.join("memory"), b"m").unwrap();
        fs::write(dir.join("state"), b"s").unwrap();
    }

    #[test]
    fn staged_snapshots_publish_once_and_leftovers_are_swept() {
        let data = tempfile::tempdir().unwrap();
        let layout = Layout::new(data.path().to_path_buf());
        layout.prepare().unwrap();
        let digest = Digest::of(b"snapshot");

        // Dropped before publishing: nothing remains.
        let staged = Staged::new(&layout, digest.clone()).unwrap();
        let staging = staged.path().unwrap().to_path_buf();
        write_snapshot_files(&staging);
        drop(staged);
        assert!(!staging.exists());

        let staged = Staged::new(&layout, digest.clone()).unwrap();
        write_snapshot_files(staged.path().unwrap());
        let published = staged.publish(&layout).unwrap();
        assert_eq!(published, dir(&layout, &digest));
        assert_eq!(fs::read(published.join("state")).unwrap(), b"s");
        // A second deploy of the same content keeps the first snapshot.
        let again = Staged::new(&layout, digest.clone()).unwrap();
        fs::write(again.path().unwrap().join("memory"), b"other").unwrap();
        fs::write(again.path().unwrap().join("state"), b"other").unwrap();
        assert_eq!(again.publish(&layout).unwrap(), published);
        assert_eq!(fs::read(published.join("state")).unwrap(), b"s");
        assert!(Staged::existing(digest.clone()).publish(&layout).is_ok());
        assert!(Staged::existing(Digest::of(b"gone")).publish(&layout).is_err());
        assert_eq!(fs::read_dir(layout.tmp()).unwrap().count(), 0, "no staging left");

        // A crash's leftovers: a staging directory and an unreferenced snapshot.
        let orphan = Digest::of(b"orphan");
        fs::create_dir_all(dir(&layout, &orphan)).unwrap();
        let leftover = Staged::new(&layout, orphan.clone()).unwrap();
        let leftover_path = leftover.path().unwrap().to_path_buf();
        std::mem::forget(leftover);
        sweep(&layout, &HashSet::from([digest.hex().to_owned()]));
        assert!(!leftover_path.exists());
        assert!(!dir(&layout, &orphan).exists());
        assert!(published.exists(), "a referenced snapshot stays");
        remove_snapshot(&layout, &digest);
        assert!(!published.exists());
    }
}
