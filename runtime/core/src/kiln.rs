//! The running core: every long-lived piece (storage, tiers, registry, auth, the async queue,
//! telemetry) built once at start-up and shared by whatever serves it. Start-up also sweeps what
//! a crash may have left (temp files, artifacts and snapshots no version references) and warms the
//! registry in the background, so the first invocation of each function after a restart does not
//! load code.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::auth::{AdminTokenSource, Auth, AuthSetupError};
use crate::clock::{Clock, SystemClock};
use crate::config::CoreConfig;
use crate::connectors::Connectors;
use crate::functions::Functions;
use crate::identity::keys::KeyStoreError;
use crate::identity::Issuer;
use crate::invocations::{Queue, QueueConfig};
use crate::sandboxes::{Sandboxes, SandboxesConfig};
use crate::signing::Signer;
use crate::storage::budget::DiskBudget;
use crate::storage::postgres::secrets::{JoinError, Secrets, IDENTITY_KEYS, RESULT_KEYS};
use crate::storage::postgres::{self, Postgres};
use crate::storage::s3::{S3Blobs, S3Location};
use crate::storage::{BlobKind, Blobs, Database, Layout, LocalBlobs, Metadata, Sqlite, Storage, StorageError};
use crate::telemetry::invocation_logs::InvocationLogs;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::Telemetry;
use crate::tier::microvm::{self, MicrovmTier};
use crate::tier::wasm::egress::Connector;
use crate::tier::wasm::WasmTier;
use crate::tier::Tiers;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
    #[error(transparent)]
    IdentityKeys(#[from] KeyStoreError),
    #[error("{0}")]
    Engine(String),
    #[error("blob store {0}")]
    BlobStore(String),
    #[error("joining the cluster: {0}")]
    Cluster(#[from] JoinError),
}

/// Why a key rotation failed.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("result-URL signing keys: {0}")]
    ResultKeys(#[from] std::io::Error),
    #[error(transparent)]
    IdentityKeys(#[from] KeyStoreError),
    #[error("sharing the keys with the cluster: {0}")]
    Cluster(#[from] JoinError),
}

pub struct Kiln {
    pub config: CoreConfig,
    pub storage: Arc<Storage>,
    pub functions: Arc<Functions>,
    pub sandboxes: Arc<Sandboxes>,
    pub auth: Arc<Auth>,
    /// Asynchronous invocations.
    pub queue: Queue,
    pub signer: Arc<Signer>,
    /// Signs guests' identity tokens and publishes the keys that verify them.
    pub identity: Arc<Issuer>,
    pub telemetry: Telemetry,
    /// The secrets this node shares with the others of its cluster (on PostgreSQL).
    secrets: Option<Secrets>,
    shutting_down: AtomicBool,
}

impl Kiln {
    /// Opens the data directory and builds the core. `connector` sends the outbound HTTP requests
    /// functions' egress policies allow. Blocking (SQLite, files): call it before serving or from
    /// a blocking task.
    pub fn open(config: CoreConfig, connector: Arc<dyn Connector>) -> Result<Arc<Kiln>, StartError> {
        Kiln::open_with_clock(config, connector, Arc::new(SystemClock))
    }

    /// [`Kiln::open`] with the clock expiries and retention are decided by.
    pub fn open_with_clock(
        config: CoreConfig,
        connector: Arc<dyn Connector>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Kiln>, StartError> {
        let layout = Layout::new(config.data_dir.clone());
        let data_err = |source| StartError::DataDir {
            path: layout.root.display().to_string(),
            source,
        };
        layout.prepare().map_err(data_err)?;
        let mut node = None;
        let (database, metadata): (Database, Arc<dyn Metadata>) = match config.database.as_deref() {
            Some(url) if postgres::is_url(url) => {
                let pool = postgres::Pool::open(url)?;
                tracing::info!("database: PostgreSQL, shared with any other node on it");
                let store = Postgres::new(pool.clone());
                node = Some(store.node().to_owned());
                (Database::Postgres(pool), Arc::new(store))
            }
            other => {
                let path = other.map_or_else(|| layout.database(), std::path::PathBuf::from);
                (Database::Sqlite(path.clone()), Arc::new(Sqlite::open(&path)?))
            }
        };
        let shared = matches!(database, Database::Postgres(_));
        // Before anything reads a secret: take the cluster's (the lock is held until `finish`).
        let secrets = match (&database, &node) {
            (Database::Postgres(pool), Some(node)) => Some(Secrets::new(pool.clone(), &layout.root, node)),
            _ => None,
        };
        let joining = match &secrets {
            Some(secrets) => Some(secrets.join(config.admin_token.as_deref())?),
            None => None,
        };
        let storage = Arc::new(Storage {
            metadata,
            blobs: open_blobs(config.blob_store.as_deref(), &layout)?,
            budget: Arc::new(DiskBudget::new(
                layout.root.clone(),
                config.min_free_bytes,
                config.max_data_bytes,
            )),
            layout: layout.clone(),
        });
        let (auth, source) = Auth::init(
            storage.metadata.as_ref(),
            &layout.admin_token(),
            config.admin_token.as_deref(),
            &layout.root.join("aws.key"),
            clock.clone(),
        )?;
        match source {
            AdminTokenSource::Environment => tracing::info!("admin token taken from KILN_ADMIN_TOKEN"),
            AdminTokenSource::ExistingFile | AdminTokenSource::CreatedFile => {
                tracing::info!(path = %layout.admin_token().display(), "admin token is in this file")
            }
        }
        let queue = Queue::open(
            QueueConfig {
                database: database.clone(),
                lease: config.async_lease,
                max_queued: config.max_queued,
                concurrency: config.async_workers,
                retention: config.retention,
                clock: clock.clone(),
            },
            storage.blobs.clone(),
            storage.budget.clone(),
        )?;
        let metrics = Arc::new(Metrics::default());
        let telemetry = Telemetry {
            metrics: metrics.clone(),
            logs: InvocationLogs::open(&database, config.retention, config.max_kept_logs, clock.clone())?,
            quiet: Default::default(),
        };
        let signer = Arc::new(Signer::open(&layout.keys(), clock.clone()).map_err(data_err)?);
        let identity = Arc::new(Issuer::open(
            &config.public_url,
            &layout.identity_keys(),
            clock.clone(),
        )?);
        if let Some(joining) = joining {
            // The tiers open the seal key later: made now, so that a first node publishes it.
            crate::storage::seal::Sealer::open(&layout.seal_key()).map_err(data_err)?;
            joining.finish()?;
        }

        let connectors = Arc::new(Connectors::open(storage.metadata.clone())?);
        let wasm = WasmTier::open(
            &config,
            &layout,
            storage.blobs.clone(),
            connector,
            connectors.clone(),
            identity.clone(),
        )
        .map_err(StartError::Engine)?;
        let microvm = MicrovmTier::open(&config, &layout);
        match microvm.reason() {
            None => tracing::info!("tiers available: wasm, microvm"),
            Some(reason) => tracing::info!(microvm = reason, "tiers available: wasm"),
        }
        let tiers = Tiers {
            wasm: Arc::new(wasm),
            microvm: Arc::new(microvm),
        };
        let mut functions = Functions::new(storage.clone(), tiers, connectors, metrics.clone())?;
        functions.shared = shared;
        let functions = Arc::new(functions);
        let auth = Arc::new(auth);
        if let (Database::Postgres(pool), Some(node), Some(secrets)) = (&database, node, secrets.clone()) {
            let (functions, auth) = (functions.clone(), auth.clone());
            let (signer, issuer) = (signer.clone(), identity.clone());
            postgres::changes::listen(pool.clone(), node, move |change| {
                use postgres::changes::Change;
                // A dropped function is looked up in the database again at its next request.
                match change {
                    Change::Function(ref name) => functions.registry.remove(name),
                    Change::Tokens | Change::Secrets => {}
                    Change::Everything => functions.registry.clear(),
                }
                if matches!(change, Change::Tokens | Change::Everything) {
                    if let Err(e) = auth.reload_scoped(functions.storage.metadata.as_ref()) {
                        tracing::error!(error = %e, "reloading tokens another node changed failed");
                    }
                }
                if matches!(change, Change::Secrets | Change::Everything) {
                    let results = secrets.pull(RESULT_KEYS).map_err(RotateError::from);
                    let results = results.and_then(|()| Ok(signer.reload()?));
                    let identity = secrets.pull(IDENTITY_KEYS).map_err(RotateError::from);
                    let identity = identity.and_then(|()| Ok(issuer.keys().reload()?));
                    for failed in [results, identity].into_iter().filter_map(Result::err) {
                        tracing::error!(error = %failed, "taking the keys another node rotated failed");
                    }
                }
            });
        }
        if shared {
            // Another node may be between writing an artifact and committing its version: the
            // blobs are not this node's to sweep.
            tracing::info!("shared database: the start-up sweep of unreferenced artifacts is skipped");
        } else {
            sweep_unreferenced(&functions)?;
        }
        let sandboxes = Arc::new(Sandboxes::open(
            storage.clone(),
            functions.clone(),
            SandboxesConfig {
                max_running: config.max_sandboxes,
                ..SandboxesConfig::default()
            },
            clock.clone(),
            metrics,
        )?);

        Ok(Arc::new(Kiln {
            config,
            storage,
            functions,
            sandboxes,
            auth,
            queue,
            signer,
            identity,
            telemetry,
            secrets,
            shutting_down: AtomicBool::new(false),
        }))
    }

    /// Loads every function's latest version in the background (compiling where this engine/CPU
    /// has no cached code), one at a time so serving keeps the cores.
    pub fn warm_up(self: &Arc<Kiln>) {
        let kiln = self.clone();
        tokio::spawn(async move {
            let Ok(records) = kiln.functions.list().await else {
                return;
            };
            for record in records {
                if kiln.is_shutting_down() {
                    return;
                }
                if let Err(e) = kiln.functions.resolve(&record.name, None).await {
                    tracing::warn!(function = %record.name, error = %e, "could not load at start-up");
                }
            }
        });
    }

    /// Starts running asynchronous invocations, reaping idle sandboxes and rotating the identity
    /// signing key when due (needs a tokio runtime).
    pub fn start_queue(self: &Arc<Kiln>) {
        Queue::start(self);
        self.sandboxes.start_reaper();
        self.start_identity_rotation();
    }

    /// Makes a new result-URL signing key and retires every other, on every node of the
    /// cluster: URLs signed before are refused from now on. Returns the new key's id and how many
    /// were retired. Blocking.
    pub fn rotate_result_keys(&self) -> Result<(String, usize), RotateError> {
        let rotate = || Ok(self.signer.rotate()?);
        match &self.secrets {
            None => rotate(),
            Some(secrets) => secrets.rotate(RESULT_KEYS, || Ok(self.signer.reload()?), rotate),
        }
    }

    /// Makes a new identity signing key (`due_only`: only if the current one is due), on every
    /// node of the cluster; returns its id if it did. Tokens signed before still verify until
    /// they expire. Blocking.
    pub fn rotate_identity_key(&self, due_only: bool) -> Result<Option<String>, RotateError> {
        let keys = self.identity.keys();
        let rotate = || match due_only {
            true => Ok(keys.rotate_if_due()?),
            false => Ok(Some(keys.rotate()?)),
        };
        match &self.secrets {
            None => rotate(),
            Some(secrets) => secrets.rotate(IDENTITY_KEYS, || Ok(keys.reload()?), rotate),
        }
    }

    /// Replaces the identity signing key when it is due, every hour, while the core lives.
    fn start_identity_rotation(self: &Arc<Kiln>) {
        let kiln = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(kiln) = kiln.upgrade() else {
                    return;
                };
                match tokio::task::spawn_blocking(move || kiln.rotate_identity_key(true)).await {
                    Ok(Ok(Some(kid))) => tracing::info!(kid = %kid, "identity signing key rotated"),
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "identity key rotation failed"),
                    Err(_) => return,
                }
            }
        });
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// The blob store `--blob-store` names: files under the data directory (none given) or under
/// `file://DIR`, or the bucket of `s3://BUCKET?endpoint=…&region=…` with credentials from the AWS
/// variables, checked reachable now so that a wrong endpoint or key stops the start rather than
/// the first deploy.
fn open_blobs(url: Option<&str>, data: &Layout) -> Result<Arc<dyn Blobs>, StartError> {
    let Some(url) = url.filter(|url| url.starts_with("s3://")) else {
        return Ok(Arc::new(LocalBlobs::new(blob_layout(url, data)?)));
    };
    let location = S3Location::parse(url).map_err(StartError::BlobStore)?;
    let blobs = S3Blobs::open(&location, |name| std::env::var(name).ok(), data)
        .map_err(|e| StartError::BlobStore(format!("{url}: {e}")))?;
    blobs
        .check()
        .map_err(|e| StartError::BlobStore(format!("{url}: the bucket cannot be reached: {e}")))?;
    tracing::info!(
        bucket = %location.bucket,
        endpoint = location.endpoint.as_deref().unwrap_or("AWS"),
        region = %location.region,
        cache = %data.root.join("blob-cache").display(),
        "blobs: in an S3 bucket, cached in the data directory"
    );
    Ok(Arc::new(blobs))
}

/// The directory blobs live in: the data directory, or the one `file://DIR` names (which other
/// nodes may share, on a network file system).
fn blob_layout(url: Option<&str>, data: &Layout) -> Result<Layout, StartError> {
    let Some(url) = url else {
        return Ok(data.clone());
    };
    let Some(dir) = url.strip_prefix("file://") else {
        return Err(StartError::BlobStore(format!(
            "{url}: not supported (file://DIR or s3://BUCKET?endpoint=URL&region=NAME)"
        )));
    };
    let layout = Layout::new(dir.into());
    // Not `prepare`: emptying `tmp/` would break other nodes' writes in flight.
    for dir in [
        layout.tmp(),
        layout.artifacts(),
        layout.results(),
        layout.sandbox_states(),
        layout.sandbox_chunks(),
        layout.published_compiled(),
    ] {
        std::fs::create_dir_all(&dir).map_err(|e| StartError::BlobStore(format!("{url}: {e}")))?;
    }
    Ok(layout)
}

/// Removes artifacts, compiled code and snapshots no version references: what a crash between
/// writing files and committing the version left behind.
fn sweep_unreferenced(functions: &Functions) -> Result<(), StartError> {
    let storage = &functions.storage;
    let referenced = storage.metadata.referenced_digests()?;
    microvm::sweep(&storage.layout, &referenced);
    let Ok(artifacts) = storage.blobs.list(BlobKind::Artifact) else {
        return Ok(());
    };
    for digest in artifacts {
        if !referenced.contains(digest.hex()) {
            tracing::info!(digest = digest.hex(), "removing an artifact no version references");
            functions.forget(&digest);
        }
    }
    Ok(())
}
