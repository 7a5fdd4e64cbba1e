//! The Wasm tier: WebAssembly modules (WASI preview 1 commands) and components (`wasi:cli/command`
//! and `wasi:http/proxy`), compiled ahead of time for this CPU at deploy and run in a fresh
//! instance from a pooling allocator per invocation — microseconds, not a process.
//!
//! One module per concept:
//! - [`validate`]: what an upload is, and whether Kiln can run it (deploy, `invalid_code` otherwise);
//! - [`preinit`]: a module's init hook run once at deploy and snapshotted (Wizer);
//! - [`source`]: functions from source — a language runtime pre-initialised with the user's files;
//! - [`compile`]: AOT compilation and its cache, keyed by engine and CPU;
//! - [`link`]: the WASI linkers, and compiled code linked into ready-to-instantiate [`link::Code`];
//! - [`engine`]: the one engine and its pool, sized from `max_instances`;
//! - [`instance`]: one guest's store — WASI context, limiter, capped output, deadline — built in
//!   one place for every caller, and how a guest's error is classified;
//! - [`limits`]: the memory limiter and capped output streams;
//! - [`invoke`]: a sync or async invocation; [`trigger`]: an HTTP-trigger request;
//! - [`egress`]: where a component's outbound HTTP may go (`http://kiln.internal` is answered
//!   in-process, by [`crate::identity::endpoint`]);
//! - [`state`]: a live component instance's state captured and restored (sandbox suspend, resume
//!   and fork); [`sandbox`]: a live instance held between requests.

pub mod compile;
pub mod egress;
pub mod engine;
pub mod footprint;
pub mod incremental;
pub mod instance;
mod invoke;
pub mod limits;
pub mod link;
pub mod preinit;
pub mod sandbox;
pub mod source;
pub mod state;
pub mod trigger;
pub mod validate;

use std::sync::Arc;

use bytes::Bytes;

use self::compile::{CompileCache, CompileError, Precompiled};
use self::egress::{Connector, Egress, Rule};
use self::engine::{EpochTicker, MAX_WEIGHT};
use self::footprint::Footprint;
use self::incremental::IncrementalCache;
use self::instance::Guest;
use self::limits::PoolShare;
use self::link::{Code, Linkers};
use self::validate::CodeLimits;
use super::{Artifact, Tier};
use crate::config::CoreConfig;
use crate::connectors::Connectors;
use crate::deploy::DeployError;
use crate::digest::Digest;
use crate::function::{ArtifactKind, FunctionConfig, VersionRecord};
use crate::functions::LoadError;
use crate::identity::{Identity, Issuer, Subject, Workload};
use crate::outcome::{InvokeError, Success};
use crate::permits::{Limit, Permits};
use crate::registry::{Concurrency, Entry, LoadedFunction};
use crate::storage::seal::Sealer;
use crate::storage::{BlobKind, Blobs, Layout};

/// A loaded Wasm version: its linked code and what every instance of it is given.
pub struct WasmFunction {
    pub code: Code,
    /// `argv`: the function's name.
    pub args: [String; 1],
    pub env: Vec<(String, String)>,
    pub egress: Egress,
    /// Pool permits one instance holds (`footprint`).
    pub weight: u32,
}

impl WasmFunction {
    /// `connectors`: the rules of the egress connectors the version's config names.
    pub fn new(
        record: &VersionRecord,
        code: Code,
        footprint: Footprint,
        connectors: Vec<Rule>,
        connector: Arc<dyn Connector>,
    ) -> WasmFunction {
        WasmFunction {
            code,
            weight: footprint.weight(),
            args: [record.name.clone()],
            env: record.config.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            // The config was validated at deploy; a stored entry that no longer parses allows nothing.
            egress: Egress::new(&record.config.allowed_hosts, connectors, connector.clone())
                .unwrap_or_else(|_| Egress::deny_all(connector)),
        }
    }

    pub fn is_http(&self) -> bool {
        matches!(self.code, Code::Http(_))
    }

    /// What each of its instances is built with; `identity` is who the instance is.
    pub fn guest<'a>(&'a self, config: &FunctionConfig, identity: Option<Identity>) -> Guest<'a> {
        Guest {
            args: &self.args,
            env: &self.env,
            egress: &self.egress,
            identity,
            memory_bytes: config.memory_bytes(),
            share: PoolShare::of_weight(self.weight),
            timeout: config.timeout(),
            timeout_ms: config.timeout_ms,
        }
    }
}

/// The tier's long-lived parts, built once at start-up. Cheap to clone (every part is shared), so
/// blocking work can take a copy to the blocking pool.
#[derive(Clone)]
pub struct WasmTier {
    pub engine: wasmtime::Engine,
    cache: Arc<CompileCache>,
    linkers: Arc<Linkers>,
    /// The global cap on live instances; equal to the pool's size, so the pool itself never runs
    /// dry mid-instantiation.
    capacity: Arc<Limit>,
    connector: Arc<dyn Connector>,
    /// The egress connectors versions may name.
    connectors: Arc<Connectors>,
    /// Signs the tokens of `http://kiln.internal/identity`.
    issuer: Arc<Issuer>,
    blobs: Arc<dyn Blobs>,
    /// Where sandboxes' instances run (`sandbox`).
    sandboxes: Arc<SandboxEngine>,
    /// The language runtimes of functions from source.
    runtimes: Arc<source::Runtimes>,
    _ticker: Arc<EpochTicker>,
}

/// The engine sandboxes run on (`engine::sandbox_engine`), with its own compiled code and linkers.
struct SandboxEngine {
    engine: wasmtime::Engine,
    cache: CompileCache,
    linkers: Linkers,
}

/// What a Wasm deploy stages: the compiled code and, when an init hook ran, its snapshot.
pub struct WasmStaged {
    code_digest: Digest,
    snapshot: Option<Vec<u8>>,
    compiled: Precompiled,
}

impl WasmTier {
    pub fn open(
        config: &CoreConfig,
        layout: &Layout,
        blobs: Arc<dyn Blobs>,
        connector: Arc<dyn Connector>,
        connectors: Arc<Connectors>,
        issuer: Arc<Issuer>,
    ) -> Result<WasmTier, String> {
        let sealer =
            Sealer::open(&layout.seal_key()).map_err(|e| format!("seal key {}: {e}", layout.seal_key().display()))?;
        let incremental = IncrementalCache::open(layout.incremental_cache(), sealer.clone())
            .map_err(|e| format!("compilation cache {}: {e}", layout.incremental_cache().display()))?;
        let incremental: Arc<dyn wasmtime::CacheStore> = Arc::new(incremental);
        let engine = engine::engine(config.max_instances, Some(incremental.clone()))
            .map_err(|e| format!("wasmtime engine: {e:#}"))?;
        let sandbox_engine =
            engine::sandbox_engine(Some(incremental)).map_err(|e| format!("wasmtime engine: {e:#}"))?;
        let ticker = EpochTicker::start(&[&engine, &sandbox_engine]);
        // Nodes sharing a database and a blob store share compiled code too (`compile`).
        let publish =
            config.blob_store.is_some() && config.database.as_deref().is_some_and(crate::storage::postgres::is_url);
        let cache_for = |engine: &wasmtime::Engine| {
            CompileCache::open(engine.clone(), layout.clone(), blobs.clone(), sealer.clone(), publish)
                .map_err(|e| format!("compile cache {}: {e}", layout.compiled().display()))
        };
        let linkers_for =
            |engine: &wasmtime::Engine| Linkers::new(engine).map_err(|e| format!("wasmtime linkers: {e:#}"));
        let sandboxes = SandboxEngine {
            cache: cache_for(&sandbox_engine)?,
            linkers: linkers_for(&sandbox_engine)?,
            engine: sandbox_engine,
        };
        Ok(WasmTier {
            cache: Arc::new(cache_for(&engine)?),
            linkers: Arc::new(linkers_for(&engine)?),
            engine,
            capacity: Arc::new(Limit::new(config.max_instances)),
            connector,
            connectors,
            issuer,
            blobs,
            sandboxes: Arc::new(sandboxes),
            runtimes: Arc::new(source::Runtimes::new(config.runtimes_dir.clone())),
            _ticker: Arc::new(ticker),
        })
    }

    /// Who an instance of `record` serving `subject` is, for its identity tokens.
    pub fn identity(&self, subject: Subject, record: &VersionRecord) -> Identity {
        Identity::new(self.issuer.clone(), Workload::of(subject, record))
    }

    /// Guest instances alive now.
    pub fn instances_in_use(&self) -> usize {
        self.capacity.in_use()
    }

    /// Compilations done by this process (deploys and cache misses).
    pub fn compilations(&self) -> u64 {
        self.cache.compilations()
    }

    /// Drops compiled code of an artifact no version references.
    pub fn forget(&self, digest: &Digest) {
        self.cache.remove(digest);
    }

    /// The permits of one invocation of `f`: its function's, and its weight of the pool's.
    fn permits(
        &self,
        f: &LoadedFunction,
        wasm: &WasmFunction,
        concurrency: &Concurrency,
    ) -> Result<Permits, InvokeError> {
        Permits::take(&f.record.name, concurrency, &self.capacity, wasm.weight)
    }

    /// Refuses code one instance of which would take more of the pool than an invocation may.
    fn check_weight(&self, footprint: &Footprint) -> Result<(), DeployError> {
        let weight = footprint.weight();
        let most = MAX_WEIGHT.min(self.capacity.limit());
        if weight > most {
            return Err(DeployError::InvalidCode(format!(
                "one instance needs {} memories, {} tables and {} core instances: {weight} of the \
                 instance pool's slots, and an invocation may take at most {most}",
                footprint.memories, footprint.tables, footprint.core_instances
            )));
        }
        Ok(())
    }

    /// Stage 1, blocking and CPU-heavy: the init hook's snapshot, compilation, a link check.
    /// `source`: a function from source, its runtime and files (the artifact is the upload).
    fn prepare(
        &self,
        name: &str,
        artifact: &Artifact,
        source: Option<&source::Prepared>,
        config: &FunctionConfig,
    ) -> Result<WasmStaged, DeployError> {
        let init_code = source.map_or(&artifact.bytes[..], |s| &s.module[..]);
        self.check_weight(&Footprint::of(artifact.kind, init_code))?;
        let snapshot = match (source, artifact.init_hook) {
            (Some(source), _) => {
                tracing::info!(function = name, handler = %source.handler, "loading the function from source");
                let env = [("KILN_HANDLER".to_owned(), source.handler.clone())];
                let init = preinit::Init {
                    hook: validate::INIT_HOOKS[0],
                    what: format!("loading {}", source.handler),
                    preopens: &source.preopens,
                    env: &env,
                    keep_compiled: true,
                };
                let snapshot = preinit::preinitialize(self, name, &source.module, &init, config)
                    .map_err(DeployError::InvalidCode)?;
                Some(snapshot)
            }
            (None, Some(hook)) => {
                tracing::info!(
                    function = name,
                    digest = artifact.digest.hex(),
                    hook,
                    "running the init hook"
                );
                let snapshot = preinit::preinitialize(self, name, &artifact.bytes, &preinit::Init::hook(hook), config)
                    .map_err(DeployError::InvalidCode)?;
                Some(snapshot)
            }
            (None, None) => None,
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
        let compiled = self.cache.precompile(artifact.kind, code).map_err(invalid)?;
        self.check_weight(&compiled.footprint)?;
        let loaded = self.cache.load_bytes(artifact.kind, &compiled.cwasm).map_err(invalid)?;
        self.linkers
            .link(&loaded)
            .map_err(|e| DeployError::InvalidCode(format!("cannot be linked: {e}")))?;
        Ok(WasmStaged {
            code_digest,
            snapshot,
            compiled,
        })
    }
}

impl Tier for WasmTier {
    type Staged = WasmStaged;

    fn inspect(&self, upload: &[u8], config: &FunctionConfig) -> Result<Artifact, DeployError> {
        if let Some(runtime) = config.runtime {
            // Source: stored as uploaded; unpacked and built by `stage`.
            let built_with = self.runtimes.digest(runtime).map_err(DeployError::TierUnavailable)?;
            return Ok(Artifact {
                kind: ArtifactKind::Module,
                digest: Digest::of(upload),
                bytes: Bytes::copy_from_slice(upload),
                init_hook: None,
                built_with: Some(built_with),
            });
        }
        let limits = CodeLimits {
            memory_bytes: config.memory_bytes() as u64,
            table_elements: engine::TABLE_ELEMENTS as u64,
            memories_per_module: engine::MEMORIES_PER_MODULE as usize,
            tables_per_module: engine::TABLES_PER_MODULE as usize,
        };
        let inspected = validate::inspect(upload, &limits).map_err(|e| DeployError::InvalidCode(e.0))?;
        Ok(Artifact {
            kind: inspected.kind,
            digest: Digest::of(&inspected.bytes),
            bytes: Bytes::from(inspected.bytes),
            init_hook: inspected.init_hook,
            built_with: None,
        })
    }

    async fn stage(&self, name: &str, artifact: &Artifact, config: &FunctionConfig) -> Result<WasmStaged, DeployError> {
        // The init hook is an instance from the pool like any other: it waits for its share of
        // the pool's permits (not refused: a deploy is not an invocation that can be retried).
        let source = match config.runtime {
            Some(_) => {
                let (runtimes, upload, config) = (self.runtimes.clone(), artifact.bytes.clone(), config.clone());
                let name = name.to_owned();
                let prepared = tokio::task::spawn_blocking(move || runtimes.prepare(&name, &upload, &config))
                    .await
                    .expect("deploy task panicked");
                Some(prepared.map_err(|e| match e {
                    source::PrepareError::Invalid(message) => DeployError::InvalidCode(message),
                    source::PrepareError::Unavailable(message) => DeployError::TierUnavailable(message),
                })?)
            }
            None => None,
        };
        let init_code = source.as_ref().map_or(&artifact.bytes[..], |s| &s.module[..]);
        let weight = Footprint::of(artifact.kind, init_code).weight();
        let _pool_share = match (&source, artifact.init_hook) {
            (None, None) => None,
            _ => Some(self.capacity.take(weight.min(self.capacity.limit())).await),
        };
        let (tier, name, config) = (self.clone(), name.to_owned(), config.clone());
        let artifact = Artifact {
            kind: artifact.kind,
            bytes: artifact.bytes.clone(),
            digest: artifact.digest.clone(),
            init_hook: artifact.init_hook,
            built_with: artifact.built_with.clone(),
        };
        tokio::task::spawn_blocking(move || tier.prepare(&name, &artifact, source.as_ref(), &config))
            .await
            .expect("deploy task panicked")
    }

    fn publish(&self, staged: WasmStaged) -> Result<Digest, DeployError> {
        if let Some(snapshot) = &staged.snapshot {
            self.blobs.put(BlobKind::Artifact, &staged.code_digest, snapshot)?;
        }
        self.cache
            .store(&staged.code_digest, &staged.compiled)
            .map_err(|e| DeployError::Cache(e.to_string()))?;
        Ok(staged.code_digest)
    }

    async fn load(&self, record: &VersionRecord) -> Result<Entry, LoadError> {
        // Served from the mapped file (shared page cache), never from a deploy's heap copy.
        let cache = self.cache.clone();
        let (kind, digest) = (record.kind, record.code_digest.clone());
        let (compiled, footprint) = tokio::task::spawn_blocking(move || cache.load(kind, &digest))
            .await
            .expect("compile task panicked")?;
        let code = self.linkers.link(&compiled).map_err(LoadError::Link)?;
        Ok(Entry::Wasm(WasmFunction::new(
            record,
            code,
            footprint,
            self.connectors.rules(&record.config.connectors),
            self.connector.clone(),
        )))
    }

    fn admit(&self, f: &LoadedFunction, concurrency: &Concurrency) -> Result<Permits, InvokeError> {
        let wasm = wasm_of(f);
        if wasm.is_http() {
            return Err(InvokeError::HttpTrigger(f.record.name.clone()));
        }
        self.permits(f, wasm, concurrency)
    }

    async fn run(
        &self,
        permits: Permits,
        f: &LoadedFunction,
        invocation: &str,
        input: Bytes,
    ) -> Result<Success, InvokeError> {
        let _permits = permits;
        self.run_guest(wasm_of(f), &f.record, invocation, input).await
    }
}

fn wasm_of(f: &LoadedFunction) -> &WasmFunction {
    match &f.entry {
        Entry::Wasm(wasm) => wasm,
        Entry::Microvm(_) => unreachable!("Tiers sends only Wasm functions to the Wasm tier"),
    }
}
