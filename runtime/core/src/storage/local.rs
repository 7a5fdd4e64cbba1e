//! Content-addressed files under the data directory. Every write goes to a temp file in
//! `<data>/tmp`, is fsynced, renamed into place and the directory fsynced, so a crash leaves either
//! the whole file or nothing under its final name.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// A SHA-256 digest in lowercase hex, the name of an artifact everywhere in Kiln.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest(String);

impl Digest {
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(hex::encode(Sha256::digest(bytes)))
    }

    /// Accepts only 64 lowercase hex characters, so a digest read back is safe to use in a path.
    pub fn parse(hex: &str) -> Option<Digest> {
        let valid = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        valid.then(|| Digest(hex.to_owned()))
    }

    pub fn hex(&self) -> &str {
        &self.0
    }

    /// The form the API shows: `sha256:<hex>`.
    pub fn prefixed(&self) -> String {
        format!("sha256:{}", self.0)
    }
}

/// Writes `bytes` to `path` atomically and durably; an existing file of that name is replaced.
pub fn write_atomic(tmp_dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp_path = tmp_dir.join(format!("{:016x}.tmp", rand::random::<u64>()));
    let result = (|| {
        let mut file = File::create_new(&tmp_path)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp_path, path)?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp_path);
    }
    result
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
    /// Keys that sign result URLs.
    pub fn keys(&self) -> PathBuf {
        self.root.join("keys")
    }

    /// Creates the directories and empties `tmp/` of what a crash left behind.
    pub fn prepare(&self) -> io::Result<()> {
        for dir in [
            self.root.clone(),
            self.tmp(),
            self.artifacts(),
            self.compiled(),
            self.results(),
        ] {
            fs::create_dir_all(&dir)?;
        }
        for entry in fs::read_dir(self.tmp())? {
            let _ = fs::remove_file(entry?.path());
        }
        Ok(())
    }

    /// Stores a result under its digest unless it is already there. (The ledger, the only thread
    /// that deletes results, checks the file still exists before recording the row that names it.)
    pub fn write_result(&self, digest: &Digest, bytes: &[u8]) -> io::Result<()> {
        let path = self.result(digest);
        if path.exists() {
            return Ok(());
        }
        write_atomic(&self.tmp(), &path, bytes)
    }

    /// Stores an artifact under its digest unless it is already there.
    pub fn write_artifact(&self, digest: &Digest, bytes: &[u8]) -> io::Result<()> {
        let path = self.artifact(digest);
        if path.exists() {
            return Ok(());
        }
        write_atomic(&self.tmp(), &path, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_parse_rejects_paths() {
        let d = Digest::of(b"hello");
        assert_eq!(Digest::parse(d.hex()), Some(d.clone()));
        assert!(d.prefixed().starts_with("sha256:"));
        assert_eq!(Digest::parse("../etc/passwd"), None);
        assert_eq!(Digest::parse(&"A".repeat(64)), None);
        assert_eq!(Digest::parse(&"a".repeat(63)), None);
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
}
