//! A suspended sandbox's state on disk, written incrementally: the encoded state
//! (`tier::wasm::state`) cut into [`CHUNK`]-byte chunks, each a content-addressed blob, listed by
//! a manifest whose digest is the state's.
//!
//! A suspend writes only the chunks that changed since the state the sandbox last resumed from
//! or saved: a sandbox holding 4 MiB that changed a counter writes a chunk or two, not 4 MiB —
//! the disk's bandwidth, not the state's size, was what a suspend cost. Forks and successive
//! states of one sandbox share the chunks they have in common.
//!
//! - Whether a chunk changed is told by its xxHash64 next to the previous manifest's (kept in
//!   memory); only changed chunks are hashed with SHA-256 and written. An equal xxHash64 over
//!   changed bytes (2^-64, or crafted by the guest) could only give that sandbox its own older
//!   bytes back, which the state's own checksum then refuses at resume: never another's data.
//! - Chunks, then the manifest, are durable before the state is registered, and registered
//!   before any sandbox points at it. The store keeps which chunks each registered state lists;
//!   a state no sandbox points at is released and its chunks no other state lists are removed.
//!   A crash between the two leaves a registered state nothing points at: released at start-up.
//! - Saves and releases of states take one lock, so a release never removes a chunk that a save
//!   is about to list.
//! - Chunks are named by their SHA-256 *within the function* (`Digest::scoped`): forks and
//!   successive states of a sandbox share chunks, sandboxes of different functions never do —
//!   otherwise how long a suspend takes (a chunk already on disk is not written) would tell one
//!   tenant whether another's memory holds a page it guessed.
//! - A state saved whole (before states had chunks) still resumes: it has no manifest magic.

use std::sync::{Arc, Mutex};

use crate::digest::Digest;
use crate::storage::{BlobKind, Released, Storage};
use crate::tier::wasm::state::checksum;

use super::SandboxError;

/// Bytes per chunk: small enough that a few dirty pages write little, large enough that a 1 GiB
/// state is 16,384 files.
pub const CHUNK: usize = 64 * 1024;

const MAGIC: &[u8; 8] = b"KILNSTM\0";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 8 + 4;
const ENTRY: usize = 32 + 8 + 4;

/// One chunk of a state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub digest: Digest,
    /// xxHash64 of its bytes: a cheap test of whether it changed.
    pub quick: u64,
    pub len: u32,
}

/// What a state is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub total: u64,
    pub chunks: Vec<Chunk>,
}

impl Manifest {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + ENTRY * self.chunks.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.total.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for chunk in &self.chunks {
            out.extend_from_slice(&hex::decode(chunk.digest.hex()).expect("a digest is hex"));
            out.extend_from_slice(&chunk.quick.to_le_bytes());
            out.extend_from_slice(&chunk.len.to_le_bytes());
        }
        out
    }

    /// The manifest in `bytes`, `None` if they are not one (a state saved whole).
    fn decode(bytes: &[u8]) -> Result<Option<Manifest>, String> {
        if !bytes.starts_with(MAGIC) {
            return Ok(None);
        }
        let corrupt = |why: &str| format!("corrupt state manifest: {why}");
        if bytes.len() < HEADER {
            return Err(corrupt("short header"));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        if u32_at(8) != VERSION {
            return Err(corrupt("unknown version"));
        }
        let total = u64_at(12);
        let count = u32_at(20) as usize;
        if bytes.len() != HEADER + count * ENTRY {
            return Err(corrupt("wrong length"));
        }
        let mut chunks = Vec::with_capacity(count);
        let mut sum = 0u64;
        for n in 0..count {
            let at = HEADER + n * ENTRY;
            let digest = Digest::parse(&hex::encode(&bytes[at..at + 32])).expect("64 hex digits");
            let len = u32_at(at + 40);
            if len == 0 || len as usize > CHUNK {
                return Err(corrupt("bad chunk length"));
            }
            sum += len as u64;
            chunks.push(Chunk {
                digest,
                quick: u64_at(at + 32),
                len,
            });
        }
        if sum != total {
            return Err(corrupt("chunks do not add up to the state"));
        }
        Ok(Some(Manifest { total, chunks }))
    }

    fn digests(&self) -> Vec<Digest> {
        self.chunks.iter().map(|c| c.digest.clone()).collect()
    }
}

/// Sandbox states on disk. Blocking: call from the blocking pool.
pub struct SavedStates {
    storage: Arc<Storage>,
    /// Held by saves and releases (see the module doc).
    lock: Mutex<()>,
}

impl SavedStates {
    pub fn new(storage: Arc<Storage>) -> SavedStates {
        SavedStates {
            storage,
            lock: Mutex::new(()),
        }
    }

    /// Writes `state` of a sandbox of `function`, reusing the chunks of `previous` that did not
    /// change; on disk and registered when it returns. The new chunks' bytes must fit the disk
    /// budget.
    pub fn save(
        &self,
        function: &str,
        state: &[u8],
        previous: Option<&Manifest>,
    ) -> Result<(Digest, Manifest), SandboxError> {
        let blobs = &self.storage.blobs;
        let failed = |e: std::io::Error| SandboxError::State(format!("writing the state: {e}"));
        let pieces: Vec<&[u8]> = state.chunks(CHUNK).collect();
        let mut chunks: Vec<Chunk> = pieces
            .iter()
            .enumerate()
            .map(|(n, bytes)| {
                let quick = checksum(bytes);
                let kept = previous
                    .and_then(|p| p.chunks.get(n))
                    .filter(|c| c.quick == quick && c.len as usize == bytes.len());
                Chunk {
                    digest: kept.map_or_else(|| Digest::scoped(function, bytes), |c| c.digest.clone()),
                    quick,
                    len: bytes.len() as u32,
                }
            })
            .collect();
        let _lock = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // What is not on disk yet. A kept chunk is normally there (the state it came from is
        // still pointed at); if not, it is hashed and written like a new one.
        let mut missing = Vec::new();
        for (n, chunk) in chunks.iter_mut().enumerate() {
            if !blobs.exists(BlobKind::SandboxChunk, &chunk.digest) {
                chunk.digest = Digest::scoped(function, pieces[n]);
                missing.push(n);
            }
        }
        let manifest = Manifest {
            total: state.len() as u64,
            chunks,
        };
        let encoded = manifest.encode();
        let digest = Digest::of(&encoded);
        let new_bytes: u64 = missing.iter().map(|&n| pieces[n].len() as u64).sum();
        self.storage.budget.admit(new_bytes + encoded.len() as u64)?;
        // The chunks before the manifest that lists them.
        let mut writes: Vec<(BlobKind, &Digest, &[u8])> = missing
            .iter()
            .map(|&n| (BlobKind::SandboxChunk, &manifest.chunks[n].digest, pieces[n]))
            .collect();
        writes.push((BlobKind::SandboxState, &digest, &encoded));
        blobs.put_all(&writes).map_err(failed)?;
        self.storage
            .metadata
            .register_sandbox_state(&digest, &manifest.digests())?;
        Ok((digest, manifest))
    }

    /// The state `digest` and, if it has chunks, its manifest (for the next save to build on).
    pub fn load(&self, digest: &Digest) -> Result<(Vec<u8>, Option<Manifest>), SandboxError> {
        let blobs = &self.storage.blobs;
        let failed = |e: std::io::Error| SandboxError::State(format!("reading the saved state: {e}"));
        let stored = blobs.get(BlobKind::SandboxState, digest).map_err(failed)?;
        let Some(manifest) = Manifest::decode(&stored).map_err(SandboxError::State)? else {
            return Ok((stored, None));
        };
        let mut state = Vec::with_capacity(manifest.total as usize);
        for chunk in &manifest.chunks {
            let mut file = blobs.open(BlobKind::SandboxChunk, &chunk.digest).map_err(failed)?;
            let before = state.len();
            std::io::Read::read_to_end(&mut file, &mut state).map_err(failed)?;
            if state.len() - before != chunk.len as usize {
                return Err(SandboxError::State(format!(
                    "the saved state's chunk {} has the wrong length",
                    chunk.digest.hex()
                )));
            }
        }
        Ok((state, Some(manifest)))
    }

    /// Removes the state `digest` and the chunks only it listed, unless a sandbox points at it.
    pub fn release(&self, digest: &Digest) -> Result<(), SandboxError> {
        let blobs = &self.storage.blobs;
        let _lock = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        match self.storage.metadata.release_sandbox_state(digest)? {
            Released::InUse => {}
            Released::Unregistered => {
                let _ = blobs.remove(BlobKind::SandboxState, digest);
            }
            Released::Released { orphans } => {
                for chunk in orphans {
                    let _ = blobs.remove(BlobKind::SandboxChunk, &chunk);
                }
                let _ = blobs.remove(BlobKind::SandboxState, digest);
            }
        }
        Ok(())
    }

    /// Removes what a crash left behind: states registered that no sandbox points at, then
    /// state and chunk files nothing needs (written, but the crash came before they were
    /// registered). Call it before anything saves. Returns how many blobs went.
    pub fn collect_garbage(&self) -> Result<usize, SandboxError> {
        let stale = self.storage.metadata.unreferenced_sandbox_states()?;
        for digest in &stale {
            self.release(digest)?;
        }
        let (states, chunks) = self.storage.metadata.kept_sandbox_blobs()?;
        let blobs = &self.storage.blobs;
        let listed = |kind| {
            blobs
                .list(kind)
                .map_err(|e| SandboxError::State(format!("listing saved states: {e}")))
        };
        let mut removed = stale.len();
        for (kind, kept) in [(BlobKind::SandboxState, &states), (BlobKind::SandboxChunk, &chunks)] {
            for digest in listed(kind)? {
                if !kept.contains(&digest) {
                    let _ = blobs.remove(kind, &digest);
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_round_trip_and_refuse_damage() {
        let manifest = Manifest {
            total: (CHUNK + 10) as u64,
            chunks: vec![
                Chunk {
                    digest: Digest::of(b"a"),
                    quick: 7,
                    len: CHUNK as u32,
                },
                Chunk {
                    digest: Digest::of(b"b"),
                    quick: 9,
                    len: 10,
                },
            ],
        };
        let bytes = manifest.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), Some(manifest));
        assert_eq!(Manifest::decode(b"KILNWSS\0 a whole state").unwrap(), None);
        assert!(Manifest::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut wrong_total = bytes.clone();
        wrong_total[12] ^= 1;
        assert!(Manifest::decode(&wrong_total).is_err());
    }
}
