//! Ahead-of-time compilation and its on-disk cache. Code is compiled at deploy, for this host's CPU,
//! and stored as `<data>/compiled/<key>/<digest>.cwasm`, where `key` hashes the engine's
//! compatibility hash (wasmtime version and every codegen setting) with the CPU features detected
//! here. A node whose CPU or engine settings differ has a different key, finds no entry, and
//! recompiles on first use (logged once per key and per artifact). Invocations load entries with
//! `deserialize_file`, which maps the file instead of reading it.

use std::hash::Hasher;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use wasmtime::component::Component;
use wasmtime::{Engine, Module};

use crate::digest::Digest;
use crate::function::ArtifactKind;
use crate::storage::local::write_atomic;
use crate::storage::{BlobKind, Blobs, Layout};

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("compilation failed: {0}")]
    Compile(String),
    #[error("compile cache I/O: {0}")]
    Io(#[from] std::io::Error),
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

pub struct CompileCache {
    engine: Engine,
    layout: Layout,
    /// Where artifacts are, to compile one this engine/CPU has no entry for.
    blobs: Arc<dyn Blobs>,
    dir: PathBuf,
    key: String,
    compilations: AtomicU64,
}

impl CompileCache {
    pub fn open(engine: Engine, layout: Layout, blobs: Arc<dyn Blobs>) -> std::io::Result<CompileCache> {
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
            dir,
            key,
            compilations: AtomicU64::new(0),
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

    /// Compiles `bytes` to native code for this host. CPU-bound: call it off the async threads.
    pub fn precompile(&self, kind: ArtifactKind, bytes: &[u8]) -> Result<Vec<u8>, CompileError> {
        self.compilations.fetch_add(1, Ordering::Relaxed);
        let result = match kind {
            ArtifactKind::Module => self.engine.precompile_module(bytes),
            ArtifactKind::Component => self.engine.precompile_component(bytes),
            ArtifactKind::Native => return Err(not_wasm()),
        };
        result.map_err(|e| CompileError::Compile(format!("{e:#}")))
    }

    /// Loads precompiled code from memory (deploy uses it to link-check before anything is stored).
    pub fn load_bytes(&self, kind: ArtifactKind, cwasm: &[u8]) -> Result<Compiled, CompileError> {
        // SAFETY: `cwasm` was produced by `precompile` of this very engine a moment ago.
        let loaded = unsafe {
            match kind {
                ArtifactKind::Module => Module::deserialize(&self.engine, cwasm).map(Compiled::Module),
                ArtifactKind::Component => Component::deserialize(&self.engine, cwasm).map(Compiled::Component),
                ArtifactKind::Native => return Err(not_wasm()),
            }
        };
        loaded.map_err(|e| CompileError::Compile(format!("{e:#}")))
    }

    /// Stores compiled code for `digest` durably.
    pub fn store(&self, digest: &Digest, cwasm: &[u8]) -> Result<(), CompileError> {
        Ok(write_atomic(&self.layout.tmp(), &self.path(digest), cwasm)?)
    }

    /// Loads the compiled code of an artifact, compiling it first if this engine/CPU has no entry
    /// (or the entry cannot be loaded). Blocking; call it off the async threads.
    pub fn load(&self, kind: ArtifactKind, digest: &Digest) -> Result<Compiled, CompileError> {
        let path = self.path(digest);
        if path.exists() {
            // SAFETY: files under `dir` are written only by `store` (atomically) with code this
            // engine configuration produced; the key in the path pins the configuration.
            let loaded = unsafe {
                match kind {
                    ArtifactKind::Module => Module::deserialize_file(&self.engine, &path).map(Compiled::Module),
                    ArtifactKind::Component => {
                        Component::deserialize_file(&self.engine, &path).map(Compiled::Component)
                    }
                    ArtifactKind::Native => return Err(not_wasm()),
                }
            };
            match loaded {
                Ok(compiled) => return Ok(compiled),
                Err(e) => tracing::warn!(digest = digest.hex(), error = %e, "cached code does not load; recompiling"),
            }
        }
        tracing::info!(digest = digest.hex(), key = %self.key, "compiling for this engine/CPU (no cache entry)");
        let bytes = self.blobs.get(BlobKind::Artifact, digest)?;
        let cwasm = self.precompile(kind, &bytes)?;
        self.store(digest, &cwasm)?;
        self.load(kind, digest)
    }

    /// Removes the compiled entries of an artifact, under every key.
    pub fn remove(&self, digest: &Digest) {
        if let Ok(keys) = std::fs::read_dir(self.layout.compiled()) {
            for key in keys.flatten() {
                let _ = std::fs::remove_file(key.path().join(format!("{}.cwasm", digest.hex())));
            }
        }
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
