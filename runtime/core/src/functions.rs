//! Deployed functions, as the rest of Kiln uses them: the registry of loaded versions, the tiers
//! that run them, and the stores that keep them. [`Functions::resolve`] is the first step of every
//! invocation; deploy and delete are in [`crate::deploy`], running one is [`Functions::invoke`].

use std::sync::Arc;

use bytes::Bytes;

use crate::connectors::Connectors;
use crate::function::VersionRecord;
use crate::outcome::{InvokeError, Success};
use crate::permits::Permits;
use crate::registry::{Concurrency, LoadedFunction, Lookup, Registry, Slot};
use crate::storage::{Storage, StorageError};
use crate::telemetry::metrics::Metrics;
use crate::tier::Tiers;

/// Why a function version could not be made ready to run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("no function named `{0}`")]
    NoFunction(String),
    #[error("function `{0}` has no version {1}")]
    NoVersion(String, u32),
    #[error(transparent)]
    Store(#[from] StorageError),
    #[error(transparent)]
    Compile(#[from] crate::tier::wasm::compile::CompileError),
    #[error("linking: {0}")]
    Link(String),
    #[error("{0}")]
    Unavailable(String),
}

/// A version ready to run, and its function's concurrency permits.
pub struct Resolved {
    pub function: Arc<LoadedFunction>,
    pub concurrency: Arc<Concurrency>,
}

pub struct Functions {
    pub(crate) storage: Arc<Storage>,
    pub tiers: Tiers,
    pub(crate) registry: Registry,
    /// Serialises the commit step of deploys and deletes (not their compilation).
    pub(crate) commit_lock: tokio::sync::Mutex<()>,
    pub(crate) metrics: Arc<Metrics>,
    /// The egress connectors configs may name.
    pub connectors: Arc<Connectors>,
    /// The database is shared with other nodes (PostgreSQL): a function this node has not seen
    /// is looked up there before it is called unknown.
    pub(crate) shared: bool,
}

impl Functions {
    pub(crate) fn new(
        storage: Arc<Storage>,
        tiers: Tiers,
        connectors: Arc<Connectors>,
        metrics: Arc<Metrics>,
    ) -> Result<Functions, StorageError> {
        let registry = Registry::default();
        for record in storage.metadata.all_latest()? {
            registry.install(record, None);
        }
        Ok(Functions {
            storage,
            tiers,
            registry,
            commit_lock: tokio::sync::Mutex::new(()),
            metrics,
            connectors,
            shared: false,
        })
    }

    /// The loaded code of `name` at `version` (default: latest), loading it if needed, and the
    /// function's concurrency permits.
    pub async fn resolve(&self, name: &str, version: Option<u32>) -> Result<Resolved, LoadError> {
        let (slot, concurrency) = match self.registry.lookup(name, version) {
            Lookup::Found(slot, concurrency) => (slot, concurrency),
            Lookup::NoFunction if self.shared => {
                // On a shared database another node may have deployed it since this node started:
                // registered with its latest version, it resolves as any other function.
                let metadata = self.storage.metadata.clone();
                let owned = name.to_owned();
                let latest = tokio::task::spawn_blocking(move || metadata.latest(&owned))
                    .await
                    .expect("store task panicked")?
                    .ok_or_else(|| LoadError::NoFunction(name.to_owned()))?;
                self.registry.install(latest, None);
                return Box::pin(self.resolve(name, version)).await;
            }
            Lookup::NoFunction => return Err(LoadError::NoFunction(name.to_owned())),
            Lookup::NotLoaded(concurrency) => {
                // `install` registers every function with its latest version, so only an explicit
                // older version can be missing here.
                let Some(version) = version else {
                    return Err(LoadError::NoFunction(name.to_owned()));
                };
                let metadata = self.storage.metadata.clone();
                let owned = name.to_owned();
                let record = tokio::task::spawn_blocking(move || metadata.version(&owned, version))
                    .await
                    .expect("store task panicked")?
                    .ok_or_else(|| LoadError::NoVersion(name.to_owned(), version))?;
                (self.registry.add_version(record), concurrency)
            }
        };
        if let Some(loaded) = slot.loaded.get() {
            return Ok(Resolved {
                function: loaded.clone(),
                concurrency,
            });
        }
        let function = slot.loaded.get_or_try_init(|| self.load(&slot)).await?.clone();
        Ok(Resolved { function, concurrency })
    }

    async fn load(&self, slot: &Slot) -> Result<Arc<LoadedFunction>, LoadError> {
        let entry = self.tiers.load(&slot.record).await?;
        Ok(Arc::new(LoadedFunction::new(slot.record.clone(), entry)))
    }

    /// Admits one invocation of a resolved function: its permits, or `too_many_requests`. Take
    /// them before reading the input, so a refused request costs no buffering.
    pub fn admit(&self, resolved: &Resolved) -> Result<Permits, InvokeError> {
        self.tiers.admit(&resolved.function, &resolved.concurrency)
    }

    /// Runs one admitted invocation of a resolved function on its tier; `invocation` is its id.
    pub async fn run(
        &self,
        resolved: &Resolved,
        permits: Permits,
        invocation: &str,
        input: Bytes,
    ) -> Result<Success, InvokeError> {
        self.tiers.run(permits, &resolved.function, invocation, input).await
    }

    /// Admits and runs one invocation.
    pub async fn invoke(&self, resolved: &Resolved, invocation: &str, input: Bytes) -> Result<Success, InvokeError> {
        let permits = self.admit(resolved)?;
        self.run(resolved, permits, invocation, input).await
    }

    /// Whether `name` exists and may be served without a token, known without loading it.
    pub fn is_public(&self, name: &str) -> bool {
        matches!(self.registry.lookup(name, None), Lookup::Found(slot, _) if slot.record.config.public)
    }

    /// Functions deployed now.
    pub fn count(&self) -> usize {
        self.registry.len()
    }

    /// Every function's latest version, by name.
    pub async fn list(&self) -> Result<Vec<VersionRecord>, StorageError> {
        let metadata = self.storage.metadata.clone();
        tokio::task::spawn_blocking(move || metadata.all_latest())
            .await
            .expect("store task panicked")
    }

    /// Every version of a function, oldest first; empty when there is no such function.
    pub async fn versions(&self, name: &str) -> Result<Vec<VersionRecord>, StorageError> {
        let metadata = self.storage.metadata.clone();
        let owned = name.to_owned();
        tokio::task::spawn_blocking(move || metadata.versions(&owned))
            .await
            .expect("store task panicked")
    }
}
