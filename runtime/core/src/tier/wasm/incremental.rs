//! Cranelift's incremental compilation cache, on this node's disk: a function whose body and
//! environment an earlier compile already saw is not compiled again. Every function written in
//! one language runs the same interpreter (only the snapshot's data differs), so after the first
//! deploy of a language, a deploy compiles almost nothing; the cache also survives restarts.
//!
//! An entry is compiled code Kiln will execute, so it is sealed with this node's seal key over
//! its key and bytes: an entry changed on disk is a miss (compiled again), never loaded. Entries
//! are written whole (a temporary file renamed into place); a torn one fails its seal. The cache
//! stops growing at [`MAX_BYTES`]; what is in it stays useful, as interpreters change rarely.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};
use wasmtime::CacheStore;

use crate::storage::seal::Sealer;

/// The most the cache holds (the Ruby interpreter's functions take 212 MiB of it).
pub const MAX_BYTES: u64 = 2 << 30;
/// A seal is 32 bytes, written as hex in front of the entry's bytes.
const SEAL_LEN: usize = 64;

pub struct IncrementalCache {
    dir: PathBuf,
    sealer: Sealer,
    bytes: AtomicU64,
    full_logged: AtomicBool,
}

impl std::fmt::Debug for IncrementalCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncrementalCache")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl IncrementalCache {
    /// The cache in `dir` (made if missing), sealed with `sealer`.
    pub fn open(dir: PathBuf, sealer: Sealer) -> std::io::Result<IncrementalCache> {
        std::fs::create_dir_all(&dir)?;
        let mut bytes = 0;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_name().to_str().is_some_and(|name| name.ends_with(".tmp")) {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            bytes += entry.metadata()?.len();
        }
        Ok(IncrementalCache {
            dir,
            sealer,
            bytes: AtomicU64::new(bytes),
            full_logged: AtomicBool::new(false),
        })
    }

    fn path(&self, key: &[u8]) -> PathBuf {
        self.dir.join(hex::encode(Sha256::digest(key)))
    }
}

impl CacheStore for IncrementalCache {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        let mut file = std::fs::read(self.path(key)).ok()?;
        let seal = std::str::from_utf8(file.get(..SEAL_LEN)?).ok()?;
        if !self.sealer.verify(&[key, &file[SEAL_LEN..]], seal) {
            tracing::warn!(file = %self.path(key).display(), "ignoring a compilation cache entry whose seal does not verify");
            return None;
        }
        file.drain(..SEAL_LEN);
        Some(Cow::Owned(file))
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let size = (SEAL_LEN + value.len()) as u64;
        if self.bytes.load(Ordering::Relaxed) + size > MAX_BYTES {
            if !self.full_logged.swap(true, Ordering::Relaxed) {
                tracing::info!(dir = %self.dir.display(), "the incremental compilation cache is full: new code is compiled, not cached");
            }
            return false;
        }
        let path = self.path(key);
        let tmp = path.with_extension(format!("{}.tmp", rand::random::<u32>()));
        let seal = self.sealer.seal(&[key, &value]);
        let written =
            std::fs::write(&tmp, [seal.as_bytes(), &value].concat()).and_then(|()| std::fs::rename(&tmp, &path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
            return false;
        }
        self.bytes.fetch_add(size, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_back_and_a_changed_one_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = Sealer::open(&dir.path().join("seal.key")).unwrap();
        let cache = IncrementalCache::open(dir.path().join("cache"), sealer.clone()).unwrap();
        assert!(cache.get(b"key").is_none());
        assert!(cache.insert(b"key", b"compiled code".to_vec()));
        assert_eq!(cache.get(b"key").unwrap().as_ref(), b"compiled code");
        assert!(cache.get(b"other key").is_none());

        // Reopened, it still has it and counts its size.
        let again = IncrementalCache::open(dir.path().join("cache"), sealer).unwrap();
        assert_eq!(again.get(b"key").unwrap().as_ref(), b"compiled code");
        assert_eq!(again.bytes.load(Ordering::Relaxed), (SEAL_LEN + 13) as u64);

        // One byte of code changed on disk: not loaded.
        let path = again.path(b"key");
        let mut bytes = std::fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(again.get(b"key").is_none());
        // Sealed by another node's key: not loaded either.
        let elsewhere = tempfile::tempdir().unwrap();
        let other = IncrementalCache::open(
            dir.path().join("cache"),
            Sealer::open(&elsewhere.path().join("seal.key")).unwrap(),
        )
        .unwrap();
        assert!(other.insert(b"theirs", b"code".to_vec()));
        assert!(again.get(b"theirs").is_none());
    }

    #[test]
    fn a_full_cache_refuses_new_entries() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = Sealer::open(&dir.path().join("seal.key")).unwrap();
        let cache = IncrementalCache::open(dir.path().join("cache"), sealer).unwrap();
        cache.bytes.store(MAX_BYTES - 10, Ordering::Relaxed);
        assert!(!cache.insert(b"key", b"too much".to_vec()));
        assert!(cache.get(b"key").is_none());
    }
}
