//! The data directory: its layout in one place, durable atomic writes, and [`LocalBlobs`], the
//! blob store on the local disk. Every write goes to a temp file in `<data>/tmp`, is fsynced,
//! renamed into place and the directory fsynced, so a crash leaves either the whole file or nothing
//! under its final name.
//!
//! Whatever the blob store, the data directory stays each node's own: compiled code (mapped by
//! wasmtime, so it must be a local file), microVM snapshots in use, the admin token, signing keys
//! and the temp directory.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{BlobKind, Blobs};
use crate::digest::Digest;

/// Writes `bytes` to `path` atomically and durably; an existing file of that name is replaced.
pub fn write_atomic(tmp_dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_all(tmp_dir, &[(path, bytes)])
}

/// Writes each file as [`write_atomic`] does, syncing the files together and each directory once
/// at the end rather than once per file. When it returns every file is durable; after a crash,
/// any of them may be whole or missing, none half-written.
pub fn write_atomic_all(tmp_dir: &Path, files: &[(&Path, &[u8])]) -> io::Result<()> {
    let tmp_paths: Vec<PathBuf> = files
        .iter()
        .map(|_| tmp_dir.join(format!("{:016x}.tmp", rand::random::<u64>())))
        .collect();
    let written = (|| {
        let mut opened = Vec::with_capacity(files.len());
        for ((_, bytes), tmp_path) in files.iter().zip(&tmp_paths) {
            let mut file = File::create_new(tmp_path)?;
            file.write_all(bytes)?;
            opened.push(file);
        }
        sync_together(&opened)?;
        for ((path, _), tmp_path) in files.iter().zip(&tmp_paths) {
            fs::rename(tmp_path, path)?;
        }
        Ok(())
    })();
    if written.is_err() {
        for tmp_path in &tmp_paths {
            let _ = fs::remove_file(tmp_path);
        }
        return written;
    }
    let mut dirs: Vec<&Path> = Vec::new();
    for &(path, _) in files {
        let dir = path.parent().unwrap_or(Path::new("."));
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs.into_iter().try_for_each(sync_dir)
}

/// Syncs `files`, several at once: each fsync mostly waits for the device, and the waits of
/// concurrent ones overlap (two files took ~1.5 fsyncs' time rather than two on the host the
/// sandbox figures come from).
fn sync_together(files: &[File]) -> io::Result<()> {
    const THREADS: usize = 8;
    let Some((first, rest)) = files.split_first() else {
        return Ok(());
    };
    if rest.is_empty() {
        return first.sync_all();
    }
    std::thread::scope(|scope| {
        let others: Vec<_> = rest
            .chunks(rest.len().div_ceil(THREADS - 1))
            .map(|group| scope.spawn(move || group.iter().try_for_each(File::sync_all)))
            .collect();
        let mine = first.sync_all();
        others
            .into_iter()
            .map(|other| {
                other
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("an fsync thread panicked")))
            })
            .chain([mine])
            .collect()
    })
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The data directory's layout, in one place.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: PathBuf) -> Layout {
        Layout { root }
    }

    pub fn database(&self) -> PathBuf {
        self.root.join("kiln.db")
    }
    pub fn admin_token(&self) -> PathBuf {
        self.root.join("admin.token")
    }
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }
    pub fn artifacts(&self) -> PathBuf {
        self.root.join("artifacts")
    }
    pub fn artifact(&self, digest: &Digest) -> PathBuf {
        self.artifacts().join(format!("{}.wasm", digest.hex()))
    }
    pub fn compiled(&self) -> PathBuf {
        self.root.join("compiled")
    }
    /// Results of asynchronous invocations too large to keep in their row, named by digest.
    pub fn results(&self) -> PathBuf {
        self.root.join("results")
    }
    pub fn result(&self, digest: &Digest) -> PathBuf {
        self.results().join(digest.hex())
    }
    /// Suspended sandboxes' states (their manifests), named by digest.
    pub fn sandbox_states(&self) -> PathBuf {
        self.root.join("sandboxes")
    }
    /// The chunks the states are made of, named by digest.
    pub fn sandbox_chunks(&self) -> PathBuf {
        self.root.join("sandboxes").join("chunks")
    }
    /// Cranelift's incremental compilation cache (`tier::wasm::incremental`).
    pub fn incremental_cache(&self) -> PathBuf {
        self.root.join("incremental")
    }
    /// Compiled code published for a cluster's other nodes, in a shared blob directory.
    pub fn published_compiled(&self) -> PathBuf {
        self.root.join("compiled-published")
    }
    /// The key that seals compiled code and snapshots (`seal`).
    pub fn seal_key(&self) -> PathBuf {
        self.root.join("seal.key")
    }
    /// Keys that sign result URLs.
    pub fn keys(&self) -> PathBuf {
        self.root.join("keys")
    }
    /// Keys that sign identity tokens (`identity::keys`).
    pub fn identity_keys(&self) -> PathBuf {
        self.root.join("identity")
    }
    /// The microvm tier's snapshots, `<digest>/{memory,state}`.
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("microvm")
    }

    /// Creates the directories, closes whatever of the directory others can open (see
    /// [`Layout::make_private`]), and empties `tmp/` of what a crash left behind.
    pub fn prepare(&self) -> io::Result<()> {
        for dir in [
            self.root.clone(),
            self.tmp(),
            self.artifacts(),
            self.compiled(),
            self.results(),
            self.sandbox_states(),
            self.sandbox_chunks(),
        ] {
            fs::create_dir_all(&dir)?;
        }
        let opened = self.make_private()?;
        if !opened.is_empty() {
            tracing::warn!(
                data = %self.root.display(),
                count = opened.len(),
                first = %opened[0].display(),
                "the data directory was readable by others (function secrets, inputs and results \
                 live here): made private again (directories 0700, files 0600)"
            );
        }
        for entry in fs::read_dir(self.tmp())? {
            let _ = fs::remove_file(entry?.path());
        }
        Ok(())
    }

    /// Takes away every permission of group and others under the data directory — directories
    /// 0700, files 0600 (what Kiln's umask of 077 gives what it creates) — and returns what it
    /// changed. Symbolic links are not followed.
    pub fn make_private(&self) -> io::Result<Vec<PathBuf>> {
        use std::os::unix::fs::PermissionsExt;
        let mut changed = Vec::new();
        let mut pending = vec![self.root.clone()];
        while let Some(path) = pending.pop() {
            let meta = fs::symlink_metadata(&path)?;
            if meta.file_type().is_symlink() {
                continue;
            }
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                let private = if meta.is_dir() { 0o700 } else { 0o600 };
                fs::set_permissions(&path, fs::Permissions::from_mode(private))?;
                changed.push(path.clone());
            }
            if meta.is_dir() {
                for entry in fs::read_dir(&path)? {
                    pending.push(entry?.path());
                }
            }
        }
        Ok(changed)
    }
}

/// Blobs as files under the data directory: `artifacts/<hex>.wasm`, `results/<hex>`.
#[derive(Debug, Clone)]
pub struct LocalBlobs {
    layout: Layout,
}

impl LocalBlobs {
    pub fn new(layout: Layout) -> LocalBlobs {
        LocalBlobs { layout }
    }

    fn path(&self, kind: BlobKind, digest: &Digest) -> PathBuf {
        match kind {
            BlobKind::Artifact => self.layout.artifact(digest),
            BlobKind::Result => self.layout.result(digest),
            BlobKind::SandboxState => self.layout.sandbox_states().join(digest.hex()),
            BlobKind::SandboxChunk => self.layout.sandbox_chunks().join(digest.hex()),
            BlobKind::Compiled => self.layout.published_compiled().join(digest.hex()),
        }
    }

    fn dir(&self, kind: BlobKind) -> PathBuf {
        match kind {
            BlobKind::Artifact => self.layout.artifacts(),
            BlobKind::Result => self.layout.results(),
            BlobKind::SandboxState => self.layout.sandbox_states(),
            BlobKind::SandboxChunk => self.layout.sandbox_chunks(),
            BlobKind::Compiled => self.layout.published_compiled(),
        }
    }
}

impl Blobs for LocalBlobs {
    fn put(&self, kind: BlobKind, digest: &Digest, bytes: &[u8]) -> io::Result<()> {
        let path = self.path(kind, digest);
        if path.exists() {
            return Ok(());
        }
        write_atomic(&self.layout.tmp(), &path, bytes)
    }

    fn put_all(&self, blobs: &[(BlobKind, &Digest, &[u8])]) -> io::Result<()> {
        let paths: Vec<PathBuf> = blobs.iter().map(|(kind, digest, _)| self.path(*kind, digest)).collect();
        let files: Vec<(&Path, &[u8])> = paths
            .iter()
            .zip(blobs)
            .filter(|(path, _)| !path.exists())
            .map(|(path, (_, _, bytes))| (path.as_path(), *bytes))
            .collect();
        write_atomic_all(&self.layout.tmp(), &files)
    }

    fn get(&self, kind: BlobKind, digest: &Digest) -> io::Result<Vec<u8>> {
        fs::read(self.path(kind, digest))
    }

    fn open(&self, kind: BlobKind, digest: &Digest) -> io::Result<File> {
        File::open(self.path(kind, digest))
    }

    fn exists(&self, kind: BlobKind, digest: &Digest) -> bool {
        self.path(kind, digest).exists()
    }

    fn remove(&self, kind: BlobKind, digest: &Digest) -> io::Result<()> {
        match fs::remove_file(self.path(kind, digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn list(&self, kind: BlobKind) -> io::Result<Vec<Digest>> {
        let suffix = match kind {
            BlobKind::Artifact => ".wasm",
            BlobKind::Result | BlobKind::SandboxState | BlobKind::SandboxChunk | BlobKind::Compiled => "",
        };
        let mut digests = Vec::new();
        for entry in fs::read_dir(self.dir(kind))? {
            let name = entry?.file_name();
            if let Some(digest) = name
                .to_str()
                .and_then(|n| n.strip_suffix(suffix))
                .and_then(Digest::parse)
            {
                digests.push(digest);
            }
        }
        Ok(digests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_others_could_open_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("data"));
        layout.prepare().unwrap();
        let file = layout.artifacts().join("x.wasm");
        fs::write(&file, b"x").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(layout.results(), fs::Permissions::from_mode(0o755)).unwrap();
        let changed = layout.make_private().unwrap();
        assert_eq!(changed.len(), 2, "{changed:?}");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&layout.results()), 0o700);
        assert!(layout.make_private().unwrap().is_empty());
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().to_path_buf());
        layout.prepare().unwrap();
        let target = layout.root.join("file");
        write_atomic(&layout.tmp(), &target, b"one").unwrap();
        write_atomic(&layout.tmp(), &target, b"two").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two");
        assert_eq!(fs::read_dir(layout.tmp()).unwrap().count(), 0);
    }

    #[test]
    fn blobs_are_written_once_listed_and_removed_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().to_path_buf());
        layout.prepare().unwrap();
        let blobs = LocalBlobs::new(layout.clone());
        let (a, r) = (Digest::of(b"artifact"), Digest::of(b"result"));
        blobs.put(BlobKind::Artifact, &a, b"artifact").unwrap();
        blobs
            .put(BlobKind::Artifact, &a, b"ignored: same digest, same content")
            .unwrap();
        blobs.put(BlobKind::Result, &r, b"result").unwrap();
        assert_eq!(blobs.get(BlobKind::Artifact, &a).unwrap(), b"artifact");
        assert_eq!(blobs.list(BlobKind::Artifact).unwrap(), vec![a.clone()]);
        assert_eq!(blobs.list(BlobKind::Result).unwrap(), vec![r.clone()]);
        assert!(!blobs.exists(BlobKind::Result, &a), "kinds do not share a namespace");
        blobs.remove(BlobKind::Artifact, &a).unwrap();
        blobs.remove(BlobKind::Artifact, &a).unwrap();
        assert!(!blobs.exists(BlobKind::Artifact, &a));
        assert!(layout.result(&r).exists());
    }
}
