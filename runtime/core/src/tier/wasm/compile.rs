//! Ahead-of-time compilation and its on-disk cache. Code is compiled at deploy, for this host's CPU,
//! and stored as `<data>/compiled/<key>/<digest>.cwasm`, where `key` hashes the engine's
//! compatibility hash (wasmtime version and every codegen setting) with the CPU features detected
//! here. A node whose CPU or engine settings differ has a different key, finds no entry, and
//! recompiles on first use (logged once per key and per artifact).
//!
//! Compiled code is native code, so nothing is loaded on trust: beside each `.cwasm` is its
//! `.seal`, the code's [`Footprint`] and a keyed MAC (`storage::seal`) over the engine key, the
//! artifact's digest, the footprint and the code's SHA-256. A file that does not verify — copied
//! over another function's, restored from another node, half-written — is logged, set aside
//! (`<name>.rejected`) and compiled again from its artifact, whose own digest is checked; it is
//! never executed. Loading maps the verified file (`deserialize_open_file`) rather than copying it.
//!
//! In a cluster (a shared database and blob store) the nodes share one seal key
//! (`storage::postgres::secrets`), and a node publishes what it compiles to the blob store
//! (`BlobKind::Compiled`, named by the engine key and the artifact's digest): a node with the same
//! engine and CPU takes it there instead of compiling, after checking its seal as it checks its
//! own files', so a fleet of identical nodes compiles each function once.

use std::fs::File;
use std::hash::Hasher;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use wasmtime::component::Component;
use wasmtime::{Engine, Module};

use super::footprint::Footprint;
use crate::digest::Digest;
use crate::function::ArtifactKind;
use crate::storage::local::write_atomic_all;
use crate::storage::seal::Sealer;
use crate::storage::{BlobKind, Blobs, Layout};

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("compilation failed: {0}")]
    Compile(String),
    #[error("compile cache I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the stored artifact {0} does not match its digest")]
    CorruptArtifact(String),
}

/// Native executables run in microVMs (`crate::tier::microvm`) and have no compiled form.
fn not_wasm() -> CompileError {
    CompileError::Compile("a native executable is not compiled; the microvm tier runs it".into())
}

/// Compiled code, loaded and ready to link.
#[derive(Clone)]
pub enum Compiled {
    Module(Module),
    Component(Component),
}

/// Compiled code not yet stored: the bytes and what an instance of them takes from the pool.
pub struct Precompiled {
    pub cwasm: Vec<u8>,
    pub footprint: Footprint,
}

/// What is written beside a `.cwasm`.
#[derive(Serialize, Deserialize)]
struct Seal {
    footprint: Footprint,
    mac: String,
}

pub struct CompileCache {
    engine: Engine,
    layout: Layout,
    /// Where artifacts are, to compile one this engine/CPU has no entry for.
    blobs: Arc<dyn Blobs>,
    sealer: Sealer,
    dir: PathBuf,
    key: String,
    compilations: AtomicU64,
    /// Whether compiled code is published to, and taken from, a blob store other nodes share.
    publish: bool,
}

impl CompileCache {
    pub fn open(
        engine: Engine,
        layout: Layout,
        blobs: Arc<dyn Blobs>,
        sealer: Sealer,
        publish: bool,
    ) -> std::io::Result<CompileCache> {
        let key = cache_key(&engine);
        let dir = layout.compiled().join(&key);
        if !dir.exists() {
            std::fs::create_dir_all(&dir)?;
            tracing::info!(key = %key, cpu = %cpu_features(), "new engine/CPU cache key: functions compile again on first use");
        }
        Ok(CompileCache {
            engine,
            layout,
            blobs,
            sealer,
            dir,
            key,
            compilations: AtomicU64::new(0),
            publish,
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Compilations done by this process (cache misses), exported as a metric.
    pub fn compilations(&self) -> u64 {
        self.compilations.load(Ordering::Relaxed)
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("{}.cwasm", digest.hex()))
    }

    fn seal_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("{}.seal", digest.hex()))
    }

    /// Compiles `bytes` to native code for this host. CPU-bound: call it off the async threads.
    pub fn precompile(&self, kind: ArtifactKind, bytes: &[u8]) -> Result<Precompiled, CompileError> {
        self.compilations.fetch_add(1, Ordering::Relaxed);
        let result = match kind {
            ArtifactKind::Module => self.engine.precompile_module(bytes),
            ArtifactKind::Component => self.engine.precompile_component(bytes),
            ArtifactKind::Native | ArtifactKind::Image => return Err(not_wasm()),
        };
        let cwasm = result.map_err(|e| CompileError::Compile(format!("{e:#}")))?;
        Ok(Precompiled {
            cwasm,
            footprint: Footprint::of(kind, bytes),
        })
    }

    /// Loads precompiled code from memory (deploy uses it to link-check before anything is stored).
    pub fn load_bytes(&self, kind: ArtifactKind, cwasm: &[u8]) -> Result<Compiled, CompileError> {
        // SAFETY: `cwasm` was produced by `precompile` of this very engine a moment ago.
        let loaded = unsafe {
            match kind {
                ArtifactKind::Module => Module::deserialize(&self.engine, cwasm).map(Compiled::Module),
                ArtifactKind::Component => Component::deserialize(&self.engine, cwasm).map(Compiled::Component),
                ArtifactKind::Native | ArtifactKind::Image => return Err(not_wasm()),
            }
        };
        loaded.map_err(|e| CompileError::Compile(format!("{e:#}")))
    }

    /// What the seal of compiled code for `digest` covers.
    fn sealed_parts(&self, digest: &Digest, footprint: &Footprint, cwasm_sha256: &[u8]) -> Vec<Vec<u8>> {
        vec![
            b"kiln compiled code v1".to_vec(),
            self.key.as_bytes().to_vec(),
            digest.hex().as_bytes().to_vec(),
            serde_json::to_vec(footprint).expect("a footprint serialises"),
            cwasm_sha256.to_vec(),
        ]
    }

    /// Stores compiled code for `digest` durably, with its seal (written last: code without a
    /// seal is never loaded).
    pub fn store(&self, digest: &Digest, compiled: &Precompiled) -> Result<(), CompileError> {
        let parts = self.sealed_parts(digest, &compiled.footprint, &Sha256::digest(&compiled.cwasm));
        let seal = Seal {
            footprint: compiled.footprint,
            mac: self.sealer.seal(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>()),
        };
        let seal = serde_json::to_vec(&seal).expect("a seal serialises");
        write_atomic_all(
            &self.layout.tmp(),
            &[(&self.path(digest), &compiled.cwasm), (&self.seal_path(digest), &seal)],
        )?;
        if self.publish {
            // Best effort: another node that does not find it compiles it.
            let published = [&(seal.len() as u32).to_le_bytes()[..], &seal, &compiled.cwasm].concat();
            if let Err(e) = self
                .blobs
                .put(BlobKind::Compiled, &self.published_name(digest), &published)
            {
                tracing::warn!(digest = digest.hex(), error = %e, "could not publish compiled code to the blob store");
            }
        }
        Ok(())
    }

    /// The blob name of the compiled code of `digest` for this engine and CPU.
    fn published_name(&self, digest: &Digest) -> Digest {
        Digest::scoped(
            "kiln compiled code v1",
            format!("{}/{}", self.key, digest.hex()).as_bytes(),
        )
    }

    /// Takes the compiled code of `digest` another node published, if there is one whose seal
    /// verifies, into this node's cache. Whether it did.
    fn take_published(&self, digest: &Digest) -> bool {
        let published = match self.blobs.get(BlobKind::Compiled, &self.published_name(digest)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
            Err(e) => {
                tracing::warn!(digest = digest.hex(), error = %e, "could not read published compiled code");
                return false;
            }
        };
        let parsed = published.split_first_chunk::<4>().and_then(|(len, rest)| {
            let len = u32::from_le_bytes(*len) as usize;
            let (seal, cwasm) = (rest.get(..len)?, rest.get(len..)?);
            Some((serde_json::from_slice::<Seal>(seal).ok()?, seal, cwasm))
        });
        let verified = parsed.filter(|(seal, _, cwasm)| {
            let parts = self.sealed_parts(digest, &seal.footprint, &Sha256::digest(cwasm));
            self.sealer
                .verify(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>(), &seal.mac)
        });
        let Some((_, seal, cwasm)) = verified else {
            tracing::warn!(
                digest = digest.hex(),
                "published compiled code does not match its seal: ignored, compiling"
            );
            return false;
        };
        let (code_path, seal_path) = (self.path(digest), self.seal_path(digest));
        match write_atomic_all(&self.layout.tmp(), &[(&code_path, cwasm), (&seal_path, seal)]) {
            Ok(()) => {
                tracing::info!(digest = digest.hex(), key = %self.key, "took compiled code another node published");
                true
            }
            Err(e) => {
                tracing::warn!(digest = digest.hex(), error = %e, "could not keep published compiled code");
                false
            }
        }
    }

    /// Loads the compiled code of an artifact and its footprint, compiling it first if this
    /// engine/CPU has no entry, or the entry does not verify or load. Blocking; call it off the
    /// async threads.
    pub fn load(&self, kind: ArtifactKind, digest: &Digest) -> Result<(Compiled, Footprint), CompileError> {
        if let Some(loaded) = self.load_cached(kind, digest)? {
            return Ok(loaded);
        }
        if self.publish && self.take_published(digest) {
            if let Some(loaded) = self.load_cached(kind, digest)? {
                return Ok(loaded);
            }
        }
        let bytes = self.blobs.get(BlobKind::Artifact, digest)?;
        if Digest::of(&bytes) != *digest {
            return Err(CompileError::CorruptArtifact(digest.prefixed()));
        }
        let compiled = self.precompile(kind, &bytes)?;
        self.store(digest, &compiled)?;
        let loaded = self.load_bytes(kind, &compiled.cwasm)?;
        Ok((loaded, compiled.footprint))
    }

    /// This node's compiled code of `digest`, if it has some that verifies and loads.
    fn load_cached(&self, kind: ArtifactKind, digest: &Digest) -> Result<Option<(Compiled, Footprint)>, CompileError> {
        match self.open_sealed(digest)? {
            Cached::Sealed(file, footprint) => {
                // SAFETY: the file's bytes are what this node compiled for `digest` with this
                // engine configuration: its seal, keyed by this node and naming the digest and the
                // engine key, was verified just now over the same open file (a module is mapped
                // from that very descriptor; a component, which wasmtime maps only by path, from
                // the same path a moment later — the data directory is trusted not to change
                // under a running server, the seal guards against what was put there before).
                let loaded = unsafe {
                    match kind {
                        ArtifactKind::Module => Module::deserialize_open_file(&self.engine, file).map(Compiled::Module),
                        ArtifactKind::Component => {
                            Component::deserialize_file(&self.engine, self.path(digest)).map(Compiled::Component)
                        }
                        ArtifactKind::Native | ArtifactKind::Image => return Err(not_wasm()),
                    }
                };
                match loaded {
                    Ok(compiled) => return Ok(Some((compiled, footprint))),
                    Err(e) => {
                        tracing::warn!(digest = digest.hex(), error = %e, "cached code does not load; recompiling")
                    }
                }
            }
            Cached::Missing => {
                tracing::info!(digest = digest.hex(), key = %self.key, "compiling for this engine/CPU (no cache entry)");
            }
            Cached::Rejected(set_aside) => {
                tracing::warn!(
                    digest = digest.hex(),
                    set_aside = %set_aside.display(),
                    "compiled code does not match its seal: set aside, never loaded; compiling it again from the artifact"
                );
            }
        }
        Ok(None)
    }

    /// The cache entry of `digest`, verified against its seal; one that does not verify is moved
    /// out of the way.
    fn open_sealed(&self, digest: &Digest) -> std::io::Result<Cached> {
        let path = self.path(digest);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Cached::Missing),
            Err(e) => return Err(e),
        };
        let seal: Option<Seal> = std::fs::read(self.seal_path(digest))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut HashWriter(&mut hasher))?;
        let sha = hasher.finalize();
        if let Some(seal) = seal {
            let parts = self.sealed_parts(digest, &seal.footprint, &sha);
            if self
                .sealer
                .verify(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>(), &seal.mac)
            {
                return Ok(Cached::Sealed(file, seal.footprint));
            }
        }
        let rejected = path.with_extension("cwasm.rejected");
        std::fs::rename(&path, &rejected)?;
        let _ = std::fs::remove_file(self.seal_path(digest));
        Ok(Cached::Rejected(rejected))
    }

    /// Removes the compiled entries of an artifact, under every key.
    pub fn remove(&self, digest: &Digest) {
        if let Ok(keys) = std::fs::read_dir(self.layout.compiled()) {
            for key in keys.flatten() {
                for suffix in ["cwasm", "seal", "cwasm.rejected"] {
                    let _ = std::fs::remove_file(key.path().join(format!("{}.{suffix}", digest.hex())));
                }
            }
        }
    }
}

/// A cache entry, as found.
enum Cached {
    Missing,
    /// It did not verify; it is now at this path.
    Rejected(PathBuf),
    /// Verified, and open.
    Sealed(File, Footprint),
}

/// Feeds what is copied into a hash.
struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Feeds `Hash` output into SHA-256, so the key is stable across processes (unlike `DefaultHasher`
/// with random keys) and across Rust releases.
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        unreachable!("only the full digest is read")
    }
}

fn cache_key(engine: &Engine) -> String {
    let mut hasher = ShaHasher(Sha256::new());
    std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
    hasher.write(cpu_features().as_bytes());
    hex::encode(&hasher.0.finalize()[..12])
}

/// The CPU features code generation depends on, as detected on this host.
pub fn cpu_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut features = vec!["x86_64"];
        macro_rules! detect {
            ($($f:tt),*) => {$( if std::arch::is_x86_feature_detected!($f) { features.push($f); } )*};
        }
        detect!(
            "sse3",
            "ssse3",
            "sse4.1",
            "sse4.2",
            "popcnt",
            "avx",
            "avx2",
            "fma",
            "bmi1",
            "bmi2",
            "lzcnt",
            "avx512f",
            "avx512vl",
            "avx512dq",
            "avx512bw",
            "avx512vbmi",
            "avx512bitalg",
            "avx512vpopcntdq"
        );
        features.join(",")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_owned()
    }
}
