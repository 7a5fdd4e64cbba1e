//! Deploying and deleting functions. A deploy runs in stages, and only the last one is visible:
//!
//! 1. inspect the upload (validate) and, unless it equals the latest version, run its init hook
//!    into a snapshot (`snapshot`), compile the code ahead of time and link it — all in memory,
//!    so a failure or a crash here leaves nothing behind;
//! 2. under the commit lock: write the artifact and the compiled code (temp file, fsync, rename),
//!    then commit the version row in one SQLite transaction — the commit point;
//! 3. install the loaded version in the registry.
//!
//! A crash between 2's file writes and its commit leaves unreferenced files, which start-up sweeps.

use std::sync::Arc;

use bytes::Bytes;

use crate::app::App;
use crate::compile::CompileError;
use crate::config::{FunctionConfig, Tier};
use crate::pool::{MEMORIES_PER_MODULE, TABLES_PER_MODULE, TABLE_ELEMENTS};
use crate::registry::LoadedFunction;
use crate::snapshot;
use crate::store::{Digest, StoreError, VersionRecord};
use crate::validate::{self, CodeLimits};

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{0}")]
    InvalidCode(String),
    #[error("{0}")]
    TierUnavailable(String),
    #[error("no function named `{0}`")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing files: {0}")]
    Io(#[from] std::io::Error),
    #[error("compile cache: {0}")]
    Cache(String),
}

pub struct Deployed {
    pub record: VersionRecord,
    /// False when the upload matched the latest version, which is returned unchanged.
    pub created: bool,
}

/// What stage 1 produces: code ready to commit, or the latest version if nothing changed.
enum Prepared {
    Unchanged(VersionRecord),
    New {
        /// The upload, and its digest.
        digest: Digest,
        upload: Vec<u8>,
        /// The code that runs (the init hook's snapshot, or the upload itself), and its digest.
        code_digest: Digest,
        snapshot: Option<Vec<u8>>,
        kind: validate::ArtifactKind,
        cwasm: Vec<u8>,
    },
}

pub async fn deploy(
    app: &Arc<App>,
    name: &str,
    upload: Bytes,
    config: FunctionConfig,
) -> Result<Deployed, DeployError> {
    if config.tier == Tier::Microvm {
        return crate::microvm::deploy(app, name, upload, config).await;
    }
    let prepared = {
        let app = app.clone();
        let name = name.to_owned();
        let config = config.clone();
        tokio::task::spawn_blocking(move || prepare(&app, &name, &upload, &config))
            .await
            .expect("deploy task panicked")?
    };
    let (digest, upload, code_digest, snapshot, kind, cwasm) = match prepared {
        Prepared::Unchanged(record) => return Ok(Deployed { record, created: false }),
        Prepared::New {
            digest,
            upload,
            code_digest,
            snapshot,
            kind,
            cwasm,
        } => (digest, upload, code_digest, snapshot, kind, cwasm),
    };

    let _commit = app.commit_lock.lock().await;
    let (record, created) = {
        let app = app.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || -> Result<_, DeployError> {
            app.layout.write_artifact(&digest, &upload)?;
            if let Some(snapshot) = &snapshot {
                app.layout.write_artifact(&code_digest, snapshot)?;
            }
            app.cache.store(&code_digest, &cwasm).map_err(cache_error)?;
            Ok(app.store.commit_version(&name, &digest, &code_digest, kind, &config)?)
        })
        .await
        .expect("commit task panicked")?
    };
    if created {
        // Serve from the mapped file (shared page cache) rather than the deploy's heap copy.
        let cache = app.cache.clone();
        let (kind, digest) = (record.kind, record.code_digest.clone());
        let compiled = tokio::task::spawn_blocking(move || cache.load(kind, &digest))
            .await
            .expect("load task panicked")
            .map_err(cache_error)?;
        let entry = app.linkers.link(&compiled).map_err(DeployError::InvalidCode)?;
        let loaded = Arc::new(LoadedFunction::new(record.clone(), entry));
        app.registry.install(record.clone(), Some(loaded));
        app.metrics.deploys.inc();
    }
    Ok(Deployed { record, created })
}

/// Stage 1: validate, compile and link in memory. Blocking and CPU-heavy.
fn prepare(app: &App, name: &str, upload: &[u8], config: &FunctionConfig) -> Result<Prepared, DeployError> {
    let limits = CodeLimits {
        memory_bytes: config.memory_bytes() as u64,
        table_elements: TABLE_ELEMENTS as u64,
        memories_per_module: MEMORIES_PER_MODULE as usize,
        tables_per_module: TABLES_PER_MODULE as usize,
    };
    let artifact = validate::inspect(upload, &limits).map_err(|e| DeployError::InvalidCode(e.0))?;
    let digest = Digest::of(&artifact.bytes);
    if let Some(latest) = app.store.latest(name)? {
        if latest.digest == digest && latest.config == *config {
            return Ok(Prepared::Unchanged(latest));
        }
    }
    let snapshot = match artifact.init_hook {
        Some(hook) => {
            tracing::info!(function = name, digest = digest.hex(), hook, "running the init hook");
            let snapshot =
                snapshot::preinitialize(app, name, &artifact.bytes, hook, config).map_err(DeployError::InvalidCode)?;
            Some(snapshot)
        }
        None => None,
    };
    let code = snapshot.as_deref().unwrap_or(&artifact.bytes);
    let code_digest = Digest::of(code);
    tracing::info!(
        function = name,
        digest = code_digest.hex(),
        kind = artifact.kind.as_str(),
        "compiling"
    );
    let invalid = |e: CompileError| DeployError::InvalidCode(e.to_string());
    let cwasm = app.cache.precompile(artifact.kind, code).map_err(invalid)?;
    let compiled = app.cache.load_bytes(artifact.kind, &cwasm).map_err(invalid)?;
    app.linkers
        .link(&compiled)
        .map_err(|e| DeployError::InvalidCode(format!("cannot be linked: {e}")))?;
    Ok(Prepared::New {
        digest,
        upload: artifact.bytes,
        code_digest,
        snapshot,
        kind: artifact.kind,
        cwasm,
    })
}

fn cache_error(e: CompileError) -> DeployError {
    DeployError::Cache(e.to_string())
}

/// Deletes a function and every version; artifacts other functions still use stay.
pub async fn delete(app: &Arc<App>, name: &str) -> Result<(), DeployError> {
    let _commit = app.commit_lock.lock().await;
    let app2 = app.clone();
    let owned = name.to_owned();
    let orphans = tokio::task::spawn_blocking(move || app2.store.delete_function(&owned))
        .await
        .expect("delete task panicked")?
        .ok_or_else(|| DeployError::NotFound(name.to_owned()))?;
    app.registry.remove(name);
    for digest in orphans {
        let _ = std::fs::remove_file(app.layout.artifact(&digest));
        app.cache.remove(&digest);
        crate::microvm::remove_snapshot(&app.layout, &digest);
    }
    Ok(())
}
