//! A suspended sandbox's state on disk, written incrementally: the encoded state
//! (`tier::wasm::state`) cut into [`CHUNK`]-byte chunks, each a content-addressed blob, listed by
//! a manifest whose digest is the state's. The manifest is kept in the store, registered in the
//! transaction that points the sandbox at the state.
//!
//! A suspend writes only the chunks that changed since the state the sandbox last resumed from
//! or saved: a sandbox holding 4 MiB that changed a counter writes one chunk, not 4 MiB — the
//! disk's bandwidth, not the state's size, was what a suspend cost. Forks and successive states
//! of one sandbox share the chunks they have in common.
//!
//! - What is chunked is the memories' pages. The bytes before them (the state's directory: its
//!   globals change with every request) and after them (its checksum, which changes with any
//!   byte) are kept in the manifest itself, up to [`INLINE`] bytes each: as chunks they would
//!   cost a file and an fsync on every save.
//! - Whether a chunk changed is told by its xxHash64 next to the previous manifest's (kept in
//!   memory); only changed chunks are hashed with SHA-256 and written. An equal xxHash64 over
//!   changed bytes (2^-64, or crafted by the guest) could only give that sandbox its own older
//!   bytes back, which the state's own checksum then refuses at resume: never another's data.
//! - Chunks are durable (fsynced, their directory too) before the state is registered, and a
//!   state is registered in or before the commit that points a sandbox at it. The store keeps
//!   which chunks each registered state lists; a state no sandbox points at is released and its
//!   chunks no other state lists are removed. A crash in between leaves chunks nothing lists, or
//!   a registered state nothing points at: both removed at start-up.
//! - Saves (up to their commit) and releases of states take one lock, so a release never removes
//!   a chunk that a save is about to list. A chunk the previous state lists is not looked for on
//!   disk: that state is the one the sandbox points at, so it stays registered meanwhile.
//! - Chunks are named by their SHA-256 *within the function* (`Digest::scoped`): forks and
//!   successive states of a sandbox share chunks, sandboxes of different functions never do —
//!   otherwise how long a suspend takes (a chunk already on disk is not written) would tell one
//!   tenant whether another's memory holds a page it guessed.
//! - What older versions saved still resumes: a manifest kept as a blob (version 1: no bytes
//!   inline), and a state saved whole (no manifest magic).

use std::ops::Range;
use std::sync::{Arc, Mutex};

use crate::digest::Digest;
use crate::storage::{BlobKind, Released, StateRecord, Storage};
use crate::tier::wasm::state::{checksum, huge, SUMMED};

use super::SandboxError;

/// Bytes per chunk: small enough that a few dirty pages write little, large enough that a 1 GiB
/// state is 16,384 files.
pub const CHUNK: usize = 64 * 1024;

// A capture sums its data in pieces of this size.
const _: () = assert!(CHUNK == SUMMED);

/// The most bytes kept in the manifest before, and after, the chunks.
pub const INLINE: usize = CHUNK;

const MAGIC: &[u8; 8] = b"KILNSTM\0";
/// 1: header, entries. 2: header, the bytes before and after the chunks, entries.
const VERSION: u32 = 2;
const HEADER_V1: usize = 8 + 4 + 8 + 4;
const HEADER: usize = 8 + 4 + 8 + 4 + 4 + 4;
const ENTRY: usize = 32 + 8 + 4;

/// One chunk of a state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub digest: Digest,
    /// xxHash64 of its bytes: a cheap test of whether it changed.
    pub quick: u64,
    pub len: u32,
}

/// What a state is made of: `head`, the chunks' bytes, `tail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub total: u64,
    pub head: Vec<u8>,
    pub tail: Vec<u8>,
    pub chunks: Vec<Chunk>,
}

impl Manifest {
    /// Version 2 (module doc):
    ///
    /// ```text
    /// magic "KILNSTM\0" | version u32 | total u64 | head length u32 | tail length u32 |
    /// chunk count u32 | head | tail | per chunk: SHA-256 (32) | xxHash64 u64 | length u32
    /// ```
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.head.len() + self.tail.len() + ENTRY * self.chunks.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.total.to_le_bytes());
        out.extend_from_slice(&(self.head.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.tail.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(&self.tail);
        for chunk in &self.chunks {
            out.extend_from_slice(&hex::decode(chunk.digest.hex()).expect("a digest is hex"));
            out.extend_from_slice(&chunk.quick.to_le_bytes());
            out.extend_from_slice(&chunk.len.to_le_bytes());
        }
        out
    }

    /// The manifest in `bytes` (version 1 or 2), `None` if they are not one (a state saved
    /// whole).
    fn decode(bytes: &[u8]) -> Result<Option<Manifest>, String> {
        if !bytes.starts_with(MAGIC) {
            return Ok(None);
        }
        let corrupt = |why: &str| format!("corrupt state manifest: {why}");
        if bytes.len() < HEADER_V1 {
            return Err(corrupt("short header"));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let total = u64_at(12);
        let (head, tail, entries, count) = match u32_at(8) {
            1 => (0..0, 0..0, HEADER_V1, u32_at(20) as usize),
            2 => {
                if bytes.len() < HEADER {
                    return Err(corrupt("short header"));
                }
                let head = HEADER..HEADER + u32_at(20) as usize;
                let tail = head.end..head.end + u32_at(24) as usize;
                (head, tail.clone(), tail.end, u32_at(28) as usize)
            }
            _ => return Err(corrupt("unknown version")),
        };
        if count.checked_mul(ENTRY).and_then(|n| n.checked_add(entries)) != Some(bytes.len()) {
            return Err(corrupt("wrong length"));
        }
        let mut chunks = Vec::with_capacity(count);
        let mut sum = (head.len() + tail.len()) as u64;
        for n in 0..count {
            let at = entries + n * ENTRY;
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
        Ok(Some(Manifest {
            total,
            head: bytes[head].to_vec(),
            tail: bytes[tail].to_vec(),
            chunks,
        }))
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
    /// change, then has `commit` register it (and point a sandbox at it) while no release can
    /// run. `data` is the part of `state` to cut into chunks (the memories' pages); the bytes
    /// around it go into the manifest, up to [`INLINE`] each. `sums` are the xxHash64 of each
    /// chunk of `data` if the caller has them (a capture does), else empty. `previous` must be the manifest of
    /// the state the sandbox points at (its chunks are not looked for on disk). The new chunks'
    /// bytes must fit the disk budget.
    pub fn save(
        &self,
        function: &str,
        state: &[u8],
        data: Range<usize>,
        sums: &[u64],
        previous: Option<&Manifest>,
        commit: impl FnOnce(&StateRecord<'_>) -> Result<(), SandboxError>,
    ) -> Result<(Digest, Manifest), SandboxError> {
        let blobs = &self.storage.blobs;
        let failed = |e: std::io::Error| SandboxError::State(format!("writing the state: {e}"));
        let end = data.end.min(state.len());
        let data = data.start.min(end)..end;
        let start = if data.start <= INLINE { data.start } else { 0 };
        let end = if state.len() - end <= INLINE { end } else { state.len() };
        let pieces: Vec<&[u8]> = state[start..end].chunks(CHUNK).collect();
        let sums = if (start..end) == data && sums.len() == pieces.len() {
            sums
        } else {
            &[]
        };
        let mut kept = vec![false; pieces.len()];
        let chunks: Vec<Chunk> = pieces
            .iter()
            .enumerate()
            .map(|(n, bytes)| {
                let quick = sums.get(n).copied().unwrap_or_else(|| checksum(bytes));
                let same = previous
                    .and_then(|p| p.chunks.get(n))
                    .filter(|c| c.quick == quick && c.len as usize == bytes.len());
                kept[n] = same.is_some();
                Chunk {
                    digest: same.map_or_else(|| Digest::scoped(function, bytes), |c| c.digest.clone()),
                    quick,
                    len: bytes.len() as u32,
                }
            })
            .collect();
        let _lock = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // What is not on disk yet. A kept chunk is (module doc); a new one may be there already
        // (a fork's, an older state's): written only if it is not.
        let missing: Vec<usize> = (0..chunks.len())
            .filter(|&n| !kept[n] && !blobs.exists(BlobKind::SandboxChunk, &chunks[n].digest))
            .collect();
        let manifest = Manifest {
            total: state.len() as u64,
            head: state[..start].to_vec(),
            tail: state[end..].to_vec(),
            chunks,
        };
        let encoded = manifest.encode();
        let digest = Digest::of(&encoded);
        let new_bytes: u64 = missing.iter().map(|&n| pieces[n].len() as u64).sum();
        self.storage.budget.admit(new_bytes + encoded.len() as u64)?;
        let writes: Vec<(BlobKind, &Digest, &[u8])> = missing
            .iter()
            .map(|&n| (BlobKind::SandboxChunk, &manifest.chunks[n].digest, pieces[n]))
            .collect();
        blobs.put_all(&writes).map_err(failed)?;
        commit(&StateRecord {
            digest: &digest,
            manifest: &encoded,
            chunks: &manifest.digests(),
        })?;
        Ok((digest, manifest))
    }

    /// The state `digest` of a sandbox of `function` and, if it has chunks, its manifest (for the
    /// next save to build on).
    pub fn load(&self, function: &str, digest: &Digest) -> Result<(Vec<u8>, Option<Manifest>), SandboxError> {
        let blobs = &self.storage.blobs;
        let failed = |e: std::io::Error| SandboxError::State(format!("reading the saved state: {e}"));
        // A manifest registered before they were kept in the store, or a state saved whole, is a
        // blob of its own.
        let stored = match self.storage.metadata.sandbox_state_manifest(digest)? {
            Some(manifest) => manifest,
            None => blobs.get(BlobKind::SandboxState, digest).map_err(failed)?,
        };
        let Some(manifest) = Manifest::decode(&stored).map_err(SandboxError::State)? else {
            return Ok((stored, None));
        };
        let mut state = huge::buffer(manifest.total as usize);
        state.extend_from_slice(&manifest.head);
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
            // A remote store cannot check a chunk (it is named within its function): this does,
            // so that its wrong bytes are never resumed.
            if blobs.remote() && Digest::scoped(function, &state[before..]) != chunk.digest {
                return Err(SandboxError::State(format!(
                    "the saved state's chunk {} does not match its digest: the blob store returned other bytes",
                    chunk.digest.hex()
                )));
            }
        }
        state.extend_from_slice(&manifest.tail);
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
    use crate::storage::budget::DiskBudget;
    use crate::storage::{Layout, LocalBlobs, Sqlite};

    fn chunk(name: &[u8], quick: u64, len: usize) -> Chunk {
        Chunk {
            digest: Digest::of(name),
            quick,
            len: len as u32,
        }
    }

    #[test]
    fn manifests_round_trip_and_refuse_damage() {
        let manifest = Manifest {
            total: (3 + CHUNK + 10 + 8) as u64,
            head: b"abc".to_vec(),
            tail: 42u64.to_le_bytes().to_vec(),
            chunks: vec![chunk(b"a", 7, CHUNK), chunk(b"b", 9, 10)],
        };
        let bytes = manifest.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), Some(manifest));
        assert_eq!(Manifest::decode(b"KILNWSS\0 a whole state").unwrap(), None);
        for cut in [0, 1, HEADER_V1, HEADER, HEADER + 3, bytes.len() - 1] {
            assert!(
                Manifest::decode(&[&MAGIC[..], &bytes[8..cut.max(8)]].concat()).is_err(),
                "{cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Manifest::decode(&longer).is_err());
        for at in [12, 20, 24, 28] {
            let mut wrong = bytes.clone();
            wrong[at] ^= 1;
            assert!(Manifest::decode(&wrong).is_err(), "byte {at}");
        }
        let mut other_version = bytes.clone();
        other_version[8] = 3;
        assert!(Manifest::decode(&other_version).is_err());
    }

    /// A version 1 manifest, as Kiln wrote them before manifests had bytes inline.
    fn manifest_v1(chunks: &[Chunk]) -> Vec<u8> {
        let total: u64 = chunks.iter().map(|c| c.len as u64).sum();
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&total.to_le_bytes());
        out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
        for chunk in chunks {
            out.extend_from_slice(&hex::decode(chunk.digest.hex()).unwrap());
            out.extend_from_slice(&chunk.quick.to_le_bytes());
            out.extend_from_slice(&chunk.len.to_le_bytes());
        }
        out
    }

    fn storage(dir: &std::path::Path) -> (Arc<Storage>, Arc<Sqlite>) {
        let layout = Layout::new(dir.to_path_buf());
        layout.prepare().unwrap();
        let sqlite = Arc::new(Sqlite::open(&layout.database()).unwrap());
        let storage = Arc::new(Storage {
            metadata: sqlite.clone(),
            blobs: Arc::new(LocalBlobs::new(layout.clone())),
            budget: Arc::new(DiskBudget::new(layout.root.clone(), 0, None)),
            layout,
        });
        (storage, sqlite)
    }

    #[test]
    fn a_chunk_the_remote_store_damaged_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let server = kiln_testkit::s3::S3Server::start().unwrap();
        let layout = Layout::new(dir.path().to_path_buf());
        layout.prepare().unwrap();
        let location = crate::storage::s3::S3Location::parse(&server.url()).unwrap();
        let env = |name: &str| server.env().into_iter().find(|(k, _)| *k == name).map(|(_, v)| v);
        let storage = Arc::new(Storage {
            metadata: Arc::new(Sqlite::open(&layout.database()).unwrap()),
            blobs: Arc::new(crate::storage::s3::S3Blobs::open(&location, env, &layout).unwrap()),
            budget: Arc::new(DiskBudget::new(layout.root.clone(), 0, None)),
            layout,
        });
        let saved = SavedStates::new(storage.clone());
        let register = |record: &StateRecord<'_>| Ok(storage.metadata.register_sandbox_state(record)?);
        let state = pattern(3 * CHUNK, 2);
        let (digest, manifest) = saved.save("f", &state, 0..state.len(), &[], None, register).unwrap();
        assert_eq!(saved.load("f", &digest).unwrap().0, state);

        // Same length, other bytes: only the digest can tell.
        let damaged = &manifest.chunks[1].digest;
        let file = server.object_path(&format!("sandboxes/chunks/{}", damaged.hex()));
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&file, bytes).unwrap();
        let error = saved.load("f", &digest).unwrap_err().to_string();
        assert!(
            error.contains(damaged.hex()) && error.contains("does not match"),
            "{error}"
        );
    }

    /// A state of `len` bytes no two chunks of which are alike.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i / 7) as u8 ^ (i >> 16) as u8 ^ seed).collect()
    }

    fn chunk_files(storage: &Storage) -> usize {
        storage.blobs.list(BlobKind::SandboxChunk).unwrap().len()
    }

    #[test]
    fn a_save_writes_the_changed_chunks_only_and_loads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, _) = storage(dir.path());
        let saved = SavedStates::new(storage.clone());
        let register = |record: &StateRecord<'_>| Ok(storage.metadata.register_sandbox_state(record)?);
        // A directory of 100 bytes, 4 chunks and a bit of pages, a checksum of 8.
        let mut state = pattern(100 + 4 * CHUNK + 5 + 8, 1);
        let data = 100..state.len() - 8;
        let (first, manifest) = saved.save("f", &state, data.clone(), &[], None, register).unwrap();
        assert_eq!(
            (manifest.head.len(), manifest.tail.len(), manifest.chunks.len()),
            (100, 8, 5)
        );
        assert_eq!(chunk_files(&storage), 5);
        assert_eq!(
            saved.load("f", &first).unwrap(),
            (state.clone(), Some(manifest.clone()))
        );

        // A byte of the directory, one of the third chunk and the checksum change: one file.
        state[3] ^= 1;
        state[100 + 2 * CHUNK + 17] ^= 1;
        *state.last_mut().unwrap() ^= 1;
        let (second, next) = saved.save("f", &state, data, &[], Some(&manifest), register).unwrap();
        assert_ne!(first, second);
        assert_eq!(chunk_files(&storage), 6, "one chunk written");
        let changed: Vec<usize> = (0..5).filter(|&n| next.chunks[n] != manifest.chunks[n]).collect();
        assert_eq!(changed, [2]);
        assert_eq!(saved.load("f", &second).unwrap().0, state);
        // No state or manifest file: the manifests are in the store.
        assert!(storage.blobs.list(BlobKind::SandboxState).unwrap().is_empty());

        // Releasing the first removes only the chunk the second does not list.
        saved.release(&first).unwrap();
        assert_eq!(chunk_files(&storage), 5);
        assert_eq!(saved.load("f", &second).unwrap().0, state);
    }

    #[test]
    fn states_saved_by_earlier_versions_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, sqlite) = storage(dir.path());
        let saved = SavedStates::new(storage.clone());
        let blobs = &storage.blobs;

        // Saved whole: a blob of its own, not registered.
        let whole = pattern(3 * CHUNK, 2);
        let whole_digest = Digest::of(&whole);
        blobs.put(BlobKind::SandboxState, &whole_digest, &whole).unwrap();
        assert_eq!(saved.load("f", &whole_digest).unwrap(), (whole, None));

        // Version 1: chunks from the first byte, the manifest a blob, the state registered
        // without it.
        let state = pattern(2 * CHUNK + 9, 3);
        let chunks: Vec<Chunk> = state
            .chunks(CHUNK)
            .map(|bytes| {
                let digest = Digest::scoped("f", bytes);
                blobs.put(BlobKind::SandboxChunk, &digest, bytes).unwrap();
                Chunk {
                    digest,
                    quick: checksum(bytes),
                    len: bytes.len() as u32,
                }
            })
            .collect();
        let v1 = manifest_v1(&chunks);
        let digest = Digest::of(&v1);
        blobs.put(BlobKind::SandboxState, &digest, &v1).unwrap();
        {
            let conn = sqlite.conn();
            conn.execute("INSERT INTO sandbox_states (digest) VALUES (?1)", [digest.hex()])
                .unwrap();
            for chunk in &chunks {
                conn.execute(
                    "INSERT INTO sandbox_state_chunks (state, chunk) VALUES (?1, ?2)",
                    [digest.hex(), chunk.digest.hex()],
                )
                .unwrap();
            }
        }
        let (loaded, manifest) = saved.load("f", &digest).unwrap();
        assert_eq!(loaded, state);
        let manifest = manifest.unwrap();
        assert_eq!((manifest.head.len(), manifest.tail.len()), (0, 0));
        assert_eq!(manifest.chunks, chunks);

        // The next save builds on it (a version 2 state), and it is released like any other.
        let register = |record: &StateRecord<'_>| Ok(storage.metadata.register_sandbox_state(record)?);
        let (next, _) = saved
            .save("f", &state, 0..state.len(), &[], Some(&manifest), register)
            .unwrap();
        assert_eq!(saved.load("f", &next).unwrap().0, state);
        saved.release(&digest).unwrap();
        assert!(
            !blobs.exists(BlobKind::SandboxState, &digest),
            "the manifest blob went with it"
        );
        assert_eq!(saved.load("f", &next).unwrap().0, state, "its chunks are still listed");
    }
}
