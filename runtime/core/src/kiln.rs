//! The running Kiln: every long-lived piece (store, engine, compile cache, linkers, registry, auth)
//! built once at start-up and shared by the server's tasks. Start-up also sweeps what a crash may
//! have left (temp files, artifacts no version references) and warms the registry in the
//! background, so the first invocation of each function after a restart does not load code.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::auth::{AdminTokenSource, Auth, AuthSetupError};
use crate::compile::{CompileCache, CompileError};
use crate::config::ServerConfig;
use crate::jobs::{Jobs, JobsConfig};
use crate::logs::InvocationLogs;
use crate::metrics::Metrics;
use crate::pool::{self, EpochTicker};
use crate::registry::{Concurrency, Entry, Linkers, LoadedFunction, Lookup, Registry, Slot};
use crate::signing::Signer;
use crate::store::{Layout, Store, StoreError};
use crate::validate::ArtifactKind;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
    #[error("wasmtime engine: {0}")]
    Engine(String),
}

/// Why a function version could not be made ready to run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("no function named `{0}`")]
    NoFunction(String),
    #[error("function `{0}` has no version {1}")]
    NoVersion(String, u32),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("linking: {0}")]
    Link(String),
    #[error("{0}")]
    Unavailable(String),
}

pub struct App {
    pub config: ServerConfig,
    pub layout: Layout,
    pub store: Arc<Store>,
    pub engine: wasmtime::Engine,
    pub cache: Arc<CompileCache>,
    pub linkers: Linkers,
    pub registry: Registry,
    pub auth: Auth,
    pub jobs: Jobs,
    pub signer: Signer,
    pub metrics: Metrics,
    /// Kept logs of synchronous invocations.
    pub logs: InvocationLogs,
    /// The microvm tier: whether it can run on this host (probed once at start-up), its guest
    /// image and its VM permits.
    pub microvm: crate::microvm::MicrovmTier,
    /// The global cap on live instances; equal to the pool's size, so the pool itself never runs
    /// dry mid-instantiation.
    pub instance_permits: Semaphore,
    /// Serialises the commit step of deploys and deletes (not their compilation).
    pub commit_lock: tokio::sync::Mutex<()>,
    shutting_down: AtomicBool,
    _ticker: EpochTicker,
}

impl App {
    /// Opens the data directory and builds the runtime. Blocking (SQLite, files): call it before
    /// serving or from a blocking task.
    pub fn open(config: ServerConfig) -> Result<Arc<App>, StartError> {
        let layout = Layout::new(config.data_dir.clone());
        let data_err = |source| StartError::DataDir {
            path: layout.root.display().to_string(),
            source,
        };
        layout.prepare().map_err(data_err)?;
        let store = Arc::new(Store::open(&layout.database())?);
        let (auth, source) = Auth::init(&store, &layout.admin_token(), config.admin_token.as_deref())?;
        let jobs = Jobs::open(
            &layout,
            JobsConfig {
                max_queued: config.max_queued,
                concurrency: config.async_workers,
                retention: config.retention,
            },
        )?;
        let logs = InvocationLogs::open(&layout.database(), config.retention, config.max_kept_logs)?;
        let signer = Signer::open(&layout.keys()).map_err(data_err)?;
        match source {
            AdminTokenSource::Environment => tracing::info!("admin token taken from KILN_ADMIN_TOKEN"),
            AdminTokenSource::ExistingFile | AdminTokenSource::CreatedFile => {
                tracing::info!(path = %layout.admin_token().display(), "admin token is in this file")
            }
        }
        let engine = pool::engine(config.max_instances).map_err(|e| StartError::Engine(format!("{e:#}")))?;
        let ticker = EpochTicker::start(&engine);
        let cache = Arc::new(CompileCache::open(engine.clone(), layout.clone()).map_err(data_err)?);
        let linkers = Linkers::new(&engine).map_err(|e| StartError::Engine(format!("{e:#}")))?;

        let registry = Registry::default();
        for record in store.all_latest()? {
            registry.install(record, None);
        }
        sweep_unreferenced(&store, &layout, &cache)?;
        let microvm = crate::microvm::MicrovmTier::open(&config);
        match microvm.reason() {
            None => tracing::info!("tiers available: wasm, microvm"),
            Some(reason) => tracing::info!(microvm = reason, "tiers available: wasm"),
        }

        Ok(Arc::new(App {
            instance_permits: Semaphore::new(config.max_instances as usize),
            config,
            layout,
            store,
            engine,
            cache,
            linkers,
            registry,
            auth,
            jobs,
            signer,
            metrics: Metrics::default(),
            logs,
            microvm,
            commit_lock: tokio::sync::Mutex::new(()),
            shutting_down: AtomicBool::new(false),
            _ticker: ticker,
        }))
    }

    /// Loads every function's latest version in the background (compiling where this engine/CPU
    /// has no cached code), one at a time so serving keeps the cores.
    pub fn warm_up(self: &Arc<App>) {
        let app = self.clone();
        tokio::spawn(async move {
            let names = match tokio::task::spawn_blocking({
                let store = app.store.clone();
                move || store.all_latest()
            })
            .await
            {
                Ok(Ok(records)) => records,
                _ => return,
            };
            for record in names {
                if app.is_shutting_down() {
                    return;
                }
                if let Err(e) = app.resolve(&record.name, None).await {
                    tracing::warn!(function = %record.name, error = %e, "could not load at start-up");
                }
            }
        });
    }

    /// The loaded code of `name` at `version` (default: latest), loading it if needed, and the
    /// function's concurrency permits.
    pub async fn resolve(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<(Arc<LoadedFunction>, Arc<Concurrency>), LoadError> {
        let (slot, concurrency) = match self.registry.lookup(name, version) {
            Lookup::Found(slot, concurrency) => (slot, concurrency),
            Lookup::NoFunction => return Err(LoadError::NoFunction(name.to_owned())),
            Lookup::NotLoaded(concurrency) => {
                // `install` registers every function with its latest version, so only an explicit
                // older version can be missing here.
                let Some(version) = version else {
                    return Err(LoadError::NoFunction(name.to_owned()));
                };
                let store = self.store.clone();
                let owned = name.to_owned();
                let record = tokio::task::spawn_blocking(move || store.version(&owned, version))
                    .await
                    .expect("store task panicked")?
                    .ok_or_else(|| LoadError::NoVersion(name.to_owned(), version))?;
                (self.registry.add_version(record), concurrency)
            }
        };
        if let Some(loaded) = slot.loaded.get() {
            return Ok((loaded.clone(), concurrency));
        }
        let loaded = slot.loaded.get_or_try_init(|| self.load(&slot)).await?;
        Ok((loaded.clone(), concurrency))
    }

    async fn load(&self, slot: &Slot) -> Result<Arc<LoadedFunction>, LoadError> {
        if slot.record.kind == ArtifactKind::Native {
            let function = crate::microvm::load(self, &slot.record).await?;
            return Ok(Arc::new(LoadedFunction::new(
                slot.record.clone(),
                Entry::Microvm(function),
            )));
        }
        let record = slot.record.clone();
        let cache = self.cache.clone();
        let compiled = tokio::task::spawn_blocking(move || cache.load(record.kind, &record.code_digest))
            .await
            .expect("compile task panicked")?;
        let entry = self.linkers.link(&compiled).map_err(LoadError::Link)?;
        Ok(Arc::new(LoadedFunction::new(slot.record.clone(), entry)))
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// Removes artifact and compiled files no version references: what a crash between writing files
/// and committing the version left behind.
fn sweep_unreferenced(store: &Store, layout: &Layout, cache: &CompileCache) -> Result<(), StartError> {
    let referenced = store.referenced_digests()?;
    crate::microvm::sweep(layout, &referenced);
    let Ok(entries) = std::fs::read_dir(layout.artifacts()) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(hex) = file_name.to_str().and_then(|n| n.strip_suffix(".wasm")) else {
            continue;
        };
        if !referenced.contains(hex) {
            if let Some(digest) = crate::store::Digest::parse(hex) {
                tracing::info!(digest = hex, "removing an artifact no version references");
                let _ = std::fs::remove_file(entry.path());
                cache.remove(&digest);
            }
        }
    }
    Ok(())
}
