//! Deploying and deleting functions, written once for both tiers over [`Tier`]. A deploy runs in
//! stages, and only the last one is visible:
//!
//! 1. the tier inspects the upload (`invalid_code` for anything it could never run); unless it equals the
//!    latest version, the tier stages what will run — compiles it (and runs its init hook into a
//!    snapshot), or boots and snapshots it — all where nobody sees it, so a failure or a crash
//!    here leaves nothing behind;
//! 2. under the commit lock: the artifact is stored, the tier publishes its staged files (temp
//!    file, fsync, rename), then the version row commits in one transaction — the commit point;
//! 3. the tier loads the committed version and the registry installs it.
//!
//! A crash between 2's file writes and its commit leaves unreferenced files, which start-up sweeps.

use std::sync::Arc;

use bytes::Bytes;

use crate::digest::Digest;
use crate::function::{FunctionConfig, Tier as TierName, VersionRecord};
use crate::functions::Functions;
use crate::registry::LoadedFunction;
use crate::storage::budget::StorageFull;
use crate::storage::{BlobKind, StorageError};
use crate::tier::Tier;

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{0}")]
    InvalidCode(String),
    /// The config does not fit the upload (found by the tier, after the config's own checks).
    #[error("{0}")]
    InvalidConfig(String),
    #[error("{0}")]
    TierUnavailable(String),
    #[error("no function named `{0}`")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StorageError),
    #[error("writing files: {0}")]
    Io(#[from] std::io::Error),
    /// The blob store did not take the artifact (a remote one down or refusing): nothing was
    /// committed, and trying again later may work.
    #[error("the blob store did not keep the artifact, nothing was deployed: {0}")]
    BlobStore(std::io::Error),
    #[error("compile cache: {0}")]
    Cache(String),
    #[error("{0}")]
    InsufficientStorage(#[from] StorageFull),
}

pub struct Deployed {
    pub record: VersionRecord,
    /// False when the upload matched the latest version, which is returned unchanged.
    pub created: bool,
}

impl Functions {
    /// Deploys `upload` as a new version of `name` on the tier its config names.
    pub async fn deploy(&self, name: &str, upload: Bytes, config: FunctionConfig) -> Result<Deployed, DeployError> {
        let deployed = match config.tier {
            TierName::Wasm => self.deploy_on(&self.tiers.wasm, name, upload, config).await,
            TierName::Microvm => self.deploy_on(&self.tiers.microvm, name, upload, config).await,
        };
        match &deployed {
            Ok(Deployed { created: true, .. }) => self.metrics.deploys.inc(),
            Ok(Deployed { created: false, .. }) => self.metrics.deploys_unchanged.inc(),
            Err(_) => self.metrics.deploys_failed.inc(),
        }
        deployed
    }

    async fn deploy_on<T: Tier + 'static>(
        &self,
        tier: &Arc<T>,
        name: &str,
        upload: Bytes,
        config: FunctionConfig,
    ) -> Result<Deployed, DeployError> {
        // Stage 1: inspect, compare with the latest version, stage. A connector that does not
        // exist is refused before anything is built (the commit checks again, atomically).
        self.connectors
            .check_names(&config.connectors)
            .map_err(DeployError::InvalidConfig)?;
        let artifact = tier.inspect(&upload, &config)?;
        drop(upload);
        let mut config = config;
        config.runtime_digest = artifact.built_with.clone();
        // One trip to the blocking pool: the latest version and, if this one differs, whether
        // what this deploy will write fits the disk budget, checked before anything is built.
        let (storage, owned, latest_config) = (self.storage.clone(), name.to_owned(), config.clone());
        let (digest, bytes) = (artifact.digest.clone(), artifact.bytes.len() as u64);
        let unchanged = tokio::task::spawn_blocking(move || -> Result<_, DeployError> {
            let latest = storage.metadata.latest(&owned)?;
            if let Some(latest) = latest.filter(|l| l.digest == digest && l.config == latest_config) {
                return Ok(Some(latest));
            }
            storage.budget.admit(bytes)?;
            Ok(None)
        })
        .await
        .expect("deploy task panicked")?;
        if let Some(latest) = unchanged {
            return Ok(Deployed {
                record: latest,
                created: false,
            });
        }
        let staged = tier.stage(name, &artifact, &config).await?;

        // Stage 2: the commit.
        let _commit = self.commit_lock.lock().await;
        let (storage, committing, owned) = (self.storage.clone(), tier.clone(), name.to_owned());
        let (digest, kind, commit_config) = (artifact.digest.clone(), artifact.kind, config.clone());
        let (record, created) = tokio::task::spawn_blocking(move || -> Result<_, DeployError> {
            storage
                .blobs
                .put(BlobKind::Artifact, &digest, &artifact.bytes)
                .map_err(DeployError::BlobStore)?;
            let code_digest = committing.publish(staged)?;
            Ok(storage
                .metadata
                .commit_version(&owned, &digest, &code_digest, kind, &commit_config)?)
        })
        .await
        .expect("commit task panicked")?;

        // Stage 3: serve it.
        if created {
            let entry = tier.load(&record).await.map_err(|e| match e {
                crate::functions::LoadError::Link(message) => DeployError::InvalidCode(message),
                other => DeployError::Cache(other.to_string()),
            })?;
            let loaded = Arc::new(LoadedFunction::new(record.clone(), entry));
            self.registry.install(record.clone(), Some(loaded));
        }
        Ok(Deployed { record, created })
    }

    /// Deletes a function and every version; artifacts other functions still use stay.
    pub async fn delete(&self, name: &str) -> Result<(), DeployError> {
        let _commit = self.commit_lock.lock().await;
        let metadata = self.storage.metadata.clone();
        let owned = name.to_owned();
        let orphans = tokio::task::spawn_blocking(move || metadata.delete_function(&owned))
            .await
            .expect("delete task panicked")?
            .ok_or_else(|| DeployError::NotFound(name.to_owned()))?;
        self.registry.remove(name);
        for digest in orphans {
            self.forget(&digest);
        }
        Ok(())
    }

    /// Removes every file of code no version references any more.
    pub(crate) fn forget(&self, digest: &Digest) {
        let _ = self.storage.blobs.remove(BlobKind::Artifact, digest);
        self.tiers.forget(digest);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::function::ArtifactKind;
    use crate::functions::LoadError;
    use crate::outcome::{InvokeError, Success};
    use crate::permits::Permits;
    use crate::registry::{Concurrency, Entry};
    use crate::tier::wasm::WasmTier;
    use crate::tier::Artifact;

    const HELLO: &str = r#"(module
        (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (data (i32.const 8) "hi")
        (func (export "_start")))"#;

    /// The real Wasm tier, with each stage counted and able to fail on demand.
    struct Recording {
        wasm: WasmTier,
        fail_at: Mutex<Option<&'static str>>,
        calls: Mutex<Vec<&'static str>>,
        loads: AtomicUsize,
        /// Stands for the language runtime a function from source is built with.
        built_with: Mutex<Option<String>>,
    }

    impl Recording {
        fn step(&self, name: &'static str) -> Result<(), DeployError> {
            self.calls.lock().unwrap().push(name);
            match *self.fail_at.lock().unwrap() {
                Some(at) if at == name => Err(DeployError::InvalidCode(format!("{name} failed"))),
                _ => Ok(()),
            }
        }
    }

    impl Tier for Recording {
        type Staged = <WasmTier as Tier>::Staged;

        fn inspect(&self, upload: &[u8], config: &FunctionConfig) -> Result<Artifact, DeployError> {
            self.step("inspect")?;
            let mut artifact = self.wasm.inspect(upload, config)?;
            artifact.built_with = self.built_with.lock().unwrap().clone();
            Ok(artifact)
        }

        async fn stage(
            &self,
            name: &str,
            artifact: &Artifact,
            config: &FunctionConfig,
        ) -> Result<Self::Staged, DeployError> {
            self.step("stage")?;
            self.wasm.stage(name, artifact, config).await
        }

        fn publish(&self, staged: Self::Staged) -> Result<Digest, DeployError> {
            self.step("publish")?;
            self.wasm.publish(staged)
        }

        async fn load(&self, record: &VersionRecord) -> Result<Entry, LoadError> {
            self.loads.fetch_add(1, Ordering::SeqCst);
            self.wasm.load(record).await
        }

        fn admit(&self, _: &LoadedFunction, _: &Concurrency) -> Result<Permits, InvokeError> {
            unreachable!("deploy never invokes")
        }

        async fn run(&self, _: Permits, _: &LoadedFunction, _: &str, _: Bytes) -> Result<Success, InvokeError> {
            unreachable!("deploy never invokes")
        }
    }

    fn functions(dir: &std::path::Path) -> (Functions, Arc<Recording>) {
        let functions = crate::testing::functions(dir);
        let recording = Arc::new(Recording {
            wasm: WasmTier::clone(&functions.tiers.wasm),
            fail_at: Mutex::new(None),
            calls: Mutex::new(Vec::new()),
            loads: AtomicUsize::new(0),
            built_with: Mutex::new(None),
        });
        (functions, recording)
    }

    fn artifacts(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir.join("artifacts")).unwrap().count()
    }

    /// The deploy skeleton over a tier: a failure at any stage before the commit leaves nothing;
    /// the commit publishes, commits the row and installs the loaded version; an unchanged upload
    /// stages nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stages_run_in_order_and_only_the_commit_is_visible() {
        let dir = tempfile::tempdir().unwrap();
        let (functions, tier) = functions(dir.path());
        let deploy =
            |config: FunctionConfig| functions.deploy_on(&tier, "f", Bytes::from_static(HELLO.as_bytes()), config);

        for stage in ["inspect", "stage", "publish"] {
            *tier.fail_at.lock().unwrap() = Some(stage);
            let error = deploy(FunctionConfig::default()).await.err().unwrap();
            assert_eq!(error.to_string(), format!("{stage} failed"));
            assert!(
                functions.storage.metadata.latest("f").unwrap().is_none(),
                "{stage}: no version"
            );
            assert!(
                functions.resolve("f", None).await.is_err(),
                "{stage}: nothing installed"
            );
        }
        // Only a failed publish (inside the commit) got as far as storing the artifact; start-up
        // sweeps what no version references.
        assert_eq!(artifacts(dir.path()), 1);
        *tier.fail_at.lock().unwrap() = None;
        tier.calls.lock().unwrap().clear();

        let deployed = deploy(FunctionConfig::default()).await.unwrap();
        assert!(deployed.created);
        assert_eq!(deployed.record.version, 1);
        assert_eq!(deployed.record.kind, ArtifactKind::Module);
        assert_eq!(*tier.calls.lock().unwrap(), ["inspect", "stage", "publish"]);
        assert_eq!(tier.loads.load(Ordering::SeqCst), 1);
        let resolved = functions.resolve("f", None).await.unwrap();
        assert_eq!(resolved.function.record.version, 1);
        assert_eq!(
            tier.loads.load(Ordering::SeqCst),
            1,
            "installed loaded: resolving loads nothing"
        );
        assert_eq!(artifacts(dir.path()), 1);

        // The same upload and config: the latest version, and nothing staged.
        tier.calls.lock().unwrap().clear();
        let again = deploy(FunctionConfig::default()).await.unwrap();
        assert!(!again.created);
        assert_eq!(again.record.version, 1);
        assert_eq!(*tier.calls.lock().unwrap(), ["inspect"]);

        // Another config is another version, with the same artifact.
        let longer = FunctionConfig {
            timeout_ms: 99,
            ..FunctionConfig::default()
        };
        assert_eq!(deploy(longer.clone()).await.unwrap().record.version, 2);
        assert_eq!(artifacts(dir.path()), 1);
        // The same upload and config built by another language runtime is another version too,
        // and records which runtime built it.
        *tier.built_with.lock().unwrap() = Some("sha256:upgraded".into());
        let rebuilt = deploy(longer.clone()).await.unwrap();
        assert_eq!(rebuilt.record.version, 3);
        assert_eq!(rebuilt.record.config.runtime_digest.as_deref(), Some("sha256:upgraded"));
        assert!(!deploy(longer).await.unwrap().created);

        functions.delete("f").await.unwrap();
        assert!(functions.resolve("f", None).await.is_err());
        assert_eq!(
            artifacts(dir.path()),
            0,
            "an artifact no version uses goes with the function"
        );
        assert!(matches!(functions.delete("f").await, Err(DeployError::NotFound(_))));
    }
}
