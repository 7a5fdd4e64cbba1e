//! Deploying and deleting functions, written once for both tiers over [`Tier`]. A deploy runs in
//! stages, and only the last one is visible:
//!
//! 1. the tier inspects the upload (`422` for anything it could never run); unless it equals the
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
use crate::storage::{BlobKind, StorageError};
use crate::tier::Tier;

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{0}")]
    InvalidCode(String),
    #[error("{0}")]
    TierUnavailable(String),
    #[error("no function named `{0}`")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StorageError),
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
        // Stage 1: inspect, compare with the latest version, stage.
        let artifact = tier.inspect(&upload, &config)?;
        drop(upload);
        if let Some(latest) = self.latest(name).await? {
            if latest.digest == artifact.digest && latest.config == config {
                return Ok(Deployed {
                    record: latest,
                    created: false,
                });
            }
        }
        let staged = tier.stage(name, &artifact, &config).await?;

        // Stage 2: the commit.
        let _commit = self.commit_lock.lock().await;
        let (storage, committing, owned) = (self.storage.clone(), tier.clone(), name.to_owned());
        let (digest, kind, commit_config) = (artifact.digest.clone(), artifact.kind, config.clone());
        let (record, created) = tokio::task::spawn_blocking(move || -> Result<_, DeployError> {
            storage.blobs.put(BlobKind::Artifact, &digest, &artifact.bytes)?;
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

    async fn latest(&self, name: &str) -> Result<Option<VersionRecord>, StorageError> {
        let metadata = self.storage.metadata.clone();
        let owned = name.to_owned();
        tokio::task::spawn_blocking(move || metadata.latest(&owned))
            .await
            .expect("store task panicked")
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
