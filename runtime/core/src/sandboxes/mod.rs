//! Sandboxes: long-lived, addressable instances of a function, with a lifecycle of their own —
//! created, reached through ingress, suspended to disk and resumed, forked, terminated.
//!
//! ```text
//! starting ─▶ running ⇄ suspending ─▶ suspended ─▶ resuming ─▶ running
//!     │          │                        │                        │
//!     └──────────┴────────▶ terminated / failed (with the reason) ◀┘
//! ```
//!
//! - Every transition is committed to the store before it is reported, and transitions of one
//!   sandbox are serialised by its own lock; a move its state does not allow is `Conflict`.
//! - A live sandbox holds an instance (its memory and pool slots); a suspended one holds only its
//!   state, a content-addressed blob (forks share it until they diverge).
//! - Ingress to a suspended sandbox resumes it first; an idle one is suspended (or terminated) by
//!   the reaper after its `idle_timeout_s`; `max_lifetime_s` counts running time only.
//! - A graceful stop suspends every running sandbox. After a crash, one that was live goes back to
//!   its last suspend point (`resumed_from` says when that was), or fails with "the host
//!   restarted" if it never had one: never a blank instance claiming to be the old one.
//!
//! The Wasm tier runs sandboxes as live instances (`tier::wasm::sandbox`), the microVM tier as
//! running VMs in jailed helpers (`tier::microvm::sandbox`, driven from [`vm`]); on a host where
//! the microVM tier cannot run, creating one of its sandboxes answers `unavailable` with why.

pub mod record;
pub mod saved;
mod vm;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use sha2::{Digest as _, Sha256};
use tokio::sync::{Mutex, OwnedSemaphorePermit};

use self::record::{Ingress, OnIdle, Sandbox, SandboxToken, Scope, Settings, State};
use self::saved::{Manifest, SavedStates};
use crate::auth::Principal;
use crate::clock::{now_rfc3339, Clock};
use crate::digest::Digest;
use crate::function::{Tier, VersionRecord};
use crate::functions::{Functions, LoadError};
use crate::identity::Subject;
use crate::outcome::InvokeError;
use crate::permits::Limit;
use crate::registry::Entry;
use crate::storage::budget::StorageFull;
use crate::storage::{Durability, StateRecord, Storage, StorageError};
use crate::telemetry::metrics::Metrics;
use crate::tier::microvm::sandbox::{LiveVm, VmHandle, PORT_HEADER};
use crate::tier::wasm::sandbox::{IngressBody, LiveHandle, LiveInstance, SandboxCode, Start};
use crate::tier::wasm::state::InstanceState;
use crate::tier::wasm::trigger::GuestBody;

/// Why a sandbox operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("no sandbox {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("missing, invalid or expired token for this sandbox")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("the server runs its maximum of {0} sandboxes")]
    TooMany(u32),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Invoke(#[from] InvokeError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0}")]
    InsufficientStorage(#[from] StorageFull),
    #[error("sandbox state: {0}")]
    State(String),
}

/// A creation request.
pub struct NewSandbox {
    pub function: String,
    pub version: Option<u32>,
    pub settings: Settings,
    pub idempotency_key: Option<String>,
}

/// The settings of the sandbox manager, from the server's.
#[derive(Debug, Clone)]
pub struct SandboxesConfig {
    /// Sandboxes running at once (live instances); past it creating or resuming one is refused.
    pub max_running: u32,
    /// How often the reaper looks for idle and expired sandboxes.
    pub reap_every: Duration,
}

impl Default for SandboxesConfig {
    fn default() -> Self {
        SandboxesConfig {
            max_running: 100,
            reap_every: Duration::from_millis(500),
        }
    }
}

/// One sandbox's lock, its live instance while it has one, and what ingress reads on every
/// request — kept in memory so that a request touches no store.
#[derive(Default)]
struct Slot {
    /// `Some` exactly while the sandbox's committed state is `running`.
    live: Mutex<Option<Live>>,
    /// The last ingress activity (ms on the manager's clock). Not written per request: the
    /// record takes it at its next transition, and the reaper and `get` read it from here.
    active_ms: AtomicU64,
    /// Who may enter, fixed at creation.
    gate: OnceLock<Gate>,
    /// The chunks of the state it last resumed from or saved: the next save writes only what
    /// changed.
    saved: std::sync::Mutex<Option<Arc<Manifest>>>,
}

impl Slot {
    fn saved(&self) -> Option<Arc<Manifest>> {
        self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_saved(&self, manifest: Option<Manifest>) {
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = manifest.map(Arc::new);
    }
}

/// What ingress checks a request against: a sandbox's id, function and ingress setting (fixed
/// for its life).
#[derive(Debug, Clone)]
pub struct Gate {
    pub id: String,
    pub function: String,
    pub ingress: Ingress,
}

impl Gate {
    fn of(sandbox: &Sandbox) -> Gate {
        Gate {
            id: sandbox.id.clone(),
            function: sandbox.function.clone(),
            ingress: sandbox.settings.ingress,
        }
    }
}

/// A live sandbox: its instance and its place among the running sandboxes.
struct Live {
    instance: Instance,
    _running: OwnedSemaphorePermit,
}

/// What runs a live sandbox, per tier.
enum Instance {
    Wasm(LiveInstance),
    Vm(LiveVm),
}

/// What ingress reaches a live sandbox through.
enum Handle {
    Wasm(LiveHandle),
    Vm(VmHandle),
}

impl Instance {
    fn handle(&self) -> Handle {
        match self {
            Instance::Wasm(instance) => Handle::Wasm(instance.handle()),
            Instance::Vm(vm) => Handle::Vm(vm.handle()),
        }
    }

    fn failure(&self) -> Option<String> {
        match self {
            Instance::Wasm(instance) => instance.failure(),
            Instance::Vm(vm) => vm.failure(),
        }
    }

    /// A Wasm instance's whole state (a VM's is written by its helper: see `vm`).
    async fn capture(&self) -> Result<InstanceState, String> {
        match self {
            Instance::Wasm(instance) => instance.capture().await,
            Instance::Vm(_) => Err("a microVM's state is snapshotted by its helper".into()),
        }
    }

    async fn stop(self) {
        match self {
            Instance::Wasm(instance) => instance.stop().await,
            Instance::Vm(vm) => vm.stop().await,
        }
    }

    /// Ends the instance for good: a VM runs its image's terminate hook first.
    async fn terminate(self) {
        match self {
            Instance::Wasm(instance) => instance.stop().await,
            Instance::Vm(vm) => vm.terminate().await,
        }
    }
}

pub struct Sandboxes {
    storage: Arc<Storage>,
    saved: Arc<SavedStates>,
    /// Suspend points replaced by newer ones, released by the reaper in a batch rather than on
    /// the way of the sandbox's next resume.
    replaced: std::sync::Mutex<Vec<Digest>>,
    functions: Arc<Functions>,
    slots: DashMap<String, Arc<Slot>>,
    /// Sandbox tokens by the SHA-256 of their secret.
    tokens: DashMap<[u8; 32], SandboxToken>,
    /// Each version's sandbox code, instrumented and compiled once.
    code: DashMap<(String, u32), Arc<SandboxCode>>,
    running: Limit,
    /// Set by a graceful stop: suspends reset open connections rather than refuse.
    stopping: std::sync::atomic::AtomicBool,
    config: SandboxesConfig,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

/// The longest life a sandbox token may be given.
pub const MAX_TOKEN_TTL_S: u64 = 30 * 24 * 3600;

impl Sandboxes {
    /// Loads the sandboxes' tokens and puts what a crash left live back to its last suspend
    /// point. Blocking (SQLite): call it at start-up.
    pub fn open(
        storage: Arc<Storage>,
        functions: Arc<Functions>,
        config: SandboxesConfig,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Result<Sandboxes, StorageError> {
        let tokens = DashMap::new();
        for (hash, token) in storage.metadata.sandbox_tokens()? {
            if let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) {
                tokens.insert(hash, token);
            }
        }
        let now = clock.now_ms();
        for mut sandbox in storage.metadata.sandboxes(None, None)? {
            if !sandbox.state.is_live() {
                continue;
            }
            match sandbox.suspended_at.clone() {
                Some(point) => {
                    tracing::warn!(sandbox = %sandbox.id, point = %point, "a sandbox live at the last stop goes back to its last suspend point");
                    sandbox.resumed_from = Some(point);
                    sandbox.enter(State::Suspended, now);
                }
                None => {
                    tracing::warn!(sandbox = %sandbox.id, "a sandbox live at the last stop had no suspend point: failed");
                    sandbox.error = Some("the host restarted and the sandbox had never been suspended".into());
                    sandbox.enter(State::Failed, now);
                }
            }
            storage.metadata.update_sandbox(&sandbox, Durability::Disk)?;
        }
        let vm_points: HashMap<String, Option<Digest>> = storage
            .metadata
            .sandboxes(None, None)?
            .into_iter()
            .filter(|s| s.tier == Tier::Microvm && !s.state.is_final())
            .map(|s| (s.id, s.state_digest))
            .collect();
        functions.tiers.microvm.sweep_sandboxes(&vm_points);
        let saved = SavedStates::new(storage.clone());
        match saved.collect_garbage() {
            Ok(0) => {}
            Ok(n) => tracing::info!(blobs = n, "removed sandbox states and chunks a crash left behind"),
            Err(e) => tracing::warn!(error = %e, "could not release sandbox states a crash left behind"),
        }
        Ok(Sandboxes {
            saved: Arc::new(saved),
            replaced: std::sync::Mutex::new(Vec::new()),
            storage,
            functions,
            slots: DashMap::new(),
            tokens,
            code: DashMap::new(),
            running: Limit::new(config.max_running),
            stopping: std::sync::atomic::AtomicBool::new(false),
            config,
            clock,
            metrics,
        })
    }

    fn slot(&self, id: &str) -> Arc<Slot> {
        self.slots.entry(id.to_owned()).or_default().clone()
    }

    /// Blocking store calls, off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn crate::storage::Metadata) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let metadata = self.storage.metadata.clone();
        tokio::task::spawn_blocking(move || call(metadata.as_ref()))
            .await
            .expect("store task panicked")
    }

    async fn load(&self, id: &str) -> Result<Sandbox, SandboxError> {
        let owned = id.to_owned();
        let Some(mut sandbox) = self.blocking(move |m| m.sandbox(&owned)).await? else {
            // A request for an id that is not there leaves nothing behind.
            self.slots.remove(id);
            return Err(SandboxError::NotFound(id.to_owned()));
        };
        self.fold_activity(&mut sandbox);
        if let Some(slot) = self.slots.get(id) {
            let _ = slot.gate.get_or_init(|| Gate::of(&sandbox));
        }
        Ok(sandbox)
    }

    /// Brings the record's `last_active_ms` up to the activity kept in memory.
    fn fold_activity(&self, sandbox: &mut Sandbox) {
        if let Some(slot) = self.slots.get(&sandbox.id) {
            sandbox.last_active_ms = sandbox.last_active_ms.max(slot.active_ms.load(Ordering::Relaxed));
        }
    }

    /// Who may enter `id`: from memory after the first request.
    pub async fn gate(&self, id: &str) -> Result<Gate, SandboxError> {
        if let Some(gate) = self.slots.get(id).and_then(|slot| slot.gate.get().cloned()) {
            return Ok(gate);
        }
        let sandbox = self.load(id).await?;
        let gate = Gate::of(&sandbox);
        if !sandbox.state.is_final() {
            let _ = self.slot(id).gate.set(gate.clone());
        }
        Ok(gate)
    }

    /// Commits a transition. Steps into a live state (starting, running, suspending, resuming)
    /// need not reach the disk before they are reported: a power loss can only roll one back to
    /// the step before, and recovery treats both alike (back to the last suspend point). What
    /// moves the suspend point or ends a sandbox is on disk before it is reported.
    async fn commit(&self, sandbox: &Sandbox) -> Result<(), SandboxError> {
        let copy = sandbox.clone();
        let durability = if sandbox.state.is_live() {
            Durability::Process
        } else {
            Durability::Disk
        };
        self.blocking(move |m| m.update_sandbox(&copy, durability)).await?;
        self.committed(sandbox);
        Ok(())
    }

    /// Logs and counts a transition once it is committed.
    fn committed(&self, sandbox: &Sandbox) {
        tracing::info!(sandbox = %sandbox.id, function = %sandbox.function, state = sandbox.state.as_str(), "sandbox");
        self.metrics.sandbox_transition(sandbox.state);
    }

    /// A sandbox's record.
    pub async fn get(&self, id: &str) -> Result<Sandbox, SandboxError> {
        self.load(id).await
    }

    /// Sandboxes, optionally of one function and in one state.
    pub async fn list(&self, function: Option<String>, state: Option<State>) -> Result<Vec<Sandbox>, SandboxError> {
        let mut all = self.blocking(move |m| m.sandboxes(function.as_deref(), state)).await?;
        for sandbox in &mut all {
            self.fold_activity(sandbox);
        }
        Ok(all)
    }

    /// Now, on the manager's clock.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Creates a sandbox and starts it; returns its record and whether it is new (an
    /// `Idempotency-Key` used before returns the first one).
    pub async fn create(&self, request: NewSandbox) -> Result<(Sandbox, bool), SandboxError> {
        request.settings.check().map_err(SandboxError::Invalid)?;
        self.functions
            .connectors
            .check_names(&request.settings.connectors)
            .map_err(SandboxError::Invalid)?;
        let resolved = self.functions.resolve(&request.function, request.version).await?;
        let record = resolved.function.record.clone();
        // (A microVM function where its tier cannot run does not resolve: `unavailable`, with why.)
        if record.config.tier == Tier::Wasm && !resolved.function.is_http() {
            return Err(SandboxError::Invalid(format!(
                "function `{}` is not an HTTP-trigger function: a Wasm sandbox runs a wasi:http/proxy component",
                record.name
            )));
        }
        let now = self.clock.now_ms();
        let mut sandbox = Sandbox {
            id: new_id(),
            function: record.name.clone(),
            version: record.version,
            tier: record.config.tier,
            state: State::Starting,
            error: None,
            settings: request.settings,
            idempotency_key: request.idempotency_key,
            created_at: now_rfc3339(),
            last_active_ms: now,
            running_ms: 0,
            running_since_ms: None,
            suspended_ms: 0,
            suspended_since_ms: None,
            state_digest: None,
            state_bytes: 0,
            suspended_at: None,
            resumed_from: None,
        };
        let slot = self.slot(&sandbox.id);
        let mut live = slot.live.lock().await;
        let inserted = sandbox.clone();
        if let Some(existing) = self.blocking(move |m| m.insert_sandbox(&inserted)).await? {
            self.slots.remove(&sandbox.id);
            return Ok((self.load(&existing).await?, false));
        }
        self.metrics.sandbox_transition(State::Starting);
        let _ = slot.gate.set(Gate::of(&sandbox));
        let started = match record.config.tier {
            Tier::Wasm => self.start(&sandbox, &record, None).await,
            Tier::Microvm => self.start_vm(&sandbox, &record, None).await,
        };
        match started {
            Ok(started) => {
                sandbox.enter(State::Running, self.clock.now_ms());
                self.publish(&sandbox, started, &mut live).await?;
            }
            Err(e) => {
                sandbox.error = Some(e.to_string());
                sandbox.enter(State::Failed, self.clock.now_ms());
                self.commit(&sandbox).await?;
                return Err(e);
            }
        }
        Ok((sandbox, true))
    }

    /// Commits `sandbox` as running and only then lets ingress reach `started`; an instance whose
    /// state could not be committed is stopped.
    async fn publish(&self, sandbox: &Sandbox, started: Live, live: &mut Option<Live>) -> Result<(), SandboxError> {
        if let Err(e) = self.commit(sandbox).await {
            started.instance.stop().await;
            return Err(e);
        }
        *live = Some(started);
        Ok(())
    }

    /// The version's sandbox code, instrumented and compiled on first use.
    async fn code(&self, record: &VersionRecord) -> Result<Arc<SandboxCode>, SandboxError> {
        let key = (record.name.clone(), record.version);
        if let Some(code) = self.code.get(&key) {
            return Ok(code.clone());
        }
        let code = Arc::new(self.functions.tiers.wasm.sandbox_code(record).await?);
        self.code.insert(key, code.clone());
        Ok(code)
    }

    /// Starts an instance for `sandbox` (fresh, or from `state`), holding a running permit.
    async fn start(
        &self,
        sandbox: &Sandbox,
        record: &VersionRecord,
        state: Option<Vec<u8>>,
    ) -> Result<Live, SandboxError> {
        let running = self
            .running
            .try_take(1)
            .ok_or(SandboxError::TooMany(self.running.limit()))?;
        let code = self.code(record).await?;
        let wasm = &self.functions.tiers.wasm;
        let mut env: Vec<(String, String)> = record.config.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        env.extend(sandbox.settings.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let egress = match &self
            .functions
            .resolve(&record.name, Some(record.version))
            .await?
            .function
            .entry
        {
            Entry::Wasm(function) => function
                .egress
                .with_rules(self.functions.connectors.rules(&sandbox.settings.connectors)),
            Entry::Microvm(_) => unreachable!("microvm sandboxes are refused before"),
        };
        let instance = Instance::Wasm(
            LiveInstance::start(
                wasm,
                Start {
                    code: &code,
                    record,
                    env,
                    egress: &egress,
                    identity: wasm.identity(Subject::Sandbox(sandbox.id.clone()), record),
                    state,
                },
            )
            .await?,
        );
        Ok(Live {
            instance,
            _running: running,
        })
    }

    async fn version(&self, sandbox: &Sandbox) -> Result<VersionRecord, SandboxError> {
        let resolved = self.functions.resolve(&sandbox.function, Some(sandbox.version)).await?;
        Ok(resolved.function.record.clone())
    }

    /// Suspends a running sandbox: its state to disk, its instance gone.
    pub async fn suspend(&self, id: &str) -> Result<Sandbox, SandboxError> {
        let slot = self.slot(id);
        let mut live = slot.live.lock().await;
        let mut sandbox = self.load(id).await?;
        if sandbox.state != State::Running {
            return Err(SandboxError::Conflict(format!(
                "sandbox {id} is {}: only a running sandbox can be suspended",
                sandbox.state.as_str()
            )));
        }
        self.suspend_locked(&slot, &mut sandbox, &mut live).await?;
        Ok(sandbox)
    }

    async fn suspend_locked(
        &self,
        slot: &Slot,
        sandbox: &mut Sandbox,
        live: &mut Option<Live>,
    ) -> Result<(), SandboxError> {
        if sandbox.tier == Tier::Microvm {
            return self.suspend_vm(sandbox, live, false).await;
        }
        let started = std::time::Instant::now();
        let Some(current) = live.take() else {
            return self.lost(sandbox).await;
        };
        sandbox.enter(State::Suspending, self.clock.now_ms());
        self.commit(sandbox).await?;
        let state = match current.instance.capture().await {
            Ok(state) => state,
            Err(reason) => {
                if current.instance.failure().is_some() {
                    drop(current);
                    return self.fail(sandbox, reason).await;
                }
                // Not quiescent (a host resource held): it stays running.
                *live = Some(current);
                sandbox.enter(State::Running, self.clock.now_ms());
                self.commit(sandbox).await?;
                return Err(SandboxError::Conflict(format!(
                    "sandbox {} cannot be suspended now: {reason}",
                    sandbox.id
                )));
            }
        };
        // On disk, registered and pointed at by the sandbox's record in one commit, all before
        // the instance goes: a state that cannot be written (the disk budget) or committed leaves
        // the sandbox running as it was.
        let mut suspended = sandbox.clone();
        suspended.state_bytes = state.as_bytes().len() as u64;
        suspended.suspended_at = Some(now_rfc3339());
        suspended.resumed_from = None;
        suspended.enter(State::Suspended, self.clock.now_ms());
        let saved = self
            .save_state(&sandbox.function, slot.saved(), state, Some(suspended.clone()))
            .await;
        let (digest, manifest) = match saved {
            Ok(saved) => saved,
            Err(e) => {
                *live = Some(current);
                sandbox.enter(State::Running, self.clock.now_ms());
                self.commit(sandbox).await?;
                return Err(e);
            }
        };
        let previous = std::mem::replace(sandbox, suspended).state_digest;
        sandbox.state_digest = Some(digest);
        self.committed(sandbox);
        // The next save builds on this state: the sandbox points at it now.
        slot.set_saved(Some(manifest));
        // The state is durable and the record points at it: the instance's teardown need not
        // hold up the answer. It keeps its place among the running sandboxes until it is gone.
        let Live {
            instance,
            _running: running,
        } = current;
        tokio::spawn(async move {
            instance.stop().await;
            drop(running);
        });
        if let Some(previous) = previous {
            self.replaced.lock().unwrap_or_else(|e| e.into_inner()).push(previous);
        }
        self.metrics.sandbox_suspended(started.elapsed());
        Ok(())
    }

    /// Writes a state of a sandbox of `function`, only the chunks that changed since `previous`
    /// (see `saved`), and commits `pointing` — the sandbox's record, to point at the state — with
    /// it; without one (a fork's state, which the forks' records point at next), registers it.
    async fn save_state(
        &self,
        function: &str,
        previous: Option<Arc<Manifest>>,
        state: InstanceState,
        pointing: Option<Sandbox>,
    ) -> Result<(Digest, Manifest), SandboxError> {
        let (saved, function) = (self.saved.clone(), function.to_owned());
        let metadata = self.storage.metadata.clone();
        tokio::task::spawn_blocking(move || {
            let commit = |record: &StateRecord<'_>| {
                match pointing {
                    Some(mut sandbox) => {
                        sandbox.state_digest = Some(record.digest.clone());
                        metadata.update_sandbox_with_state(&sandbox, record)
                    }
                    None => metadata.register_sandbox_state(record),
                }
                .map_err(SandboxError::from)
            };
            saved.save(
                &function,
                state.as_bytes(),
                state.data_range(),
                state.data_sums(),
                previous.as_deref(),
                commit,
            )
        })
        .await
        .expect("state task panicked")
    }

    /// Removes a state no sandbox points at any more.
    async fn forget_state(&self, digest: Digest) {
        let saved = self.saved.clone();
        let released = tokio::task::spawn_blocking(move || saved.release(&digest))
            .await
            .expect("state task panicked");
        if let Err(e) = released {
            tracing::warn!(error = %e, "a sandbox state could not be released");
        }
    }

    /// Resumes a suspended sandbox from its state.
    pub async fn resume(&self, id: &str) -> Result<Sandbox, SandboxError> {
        let slot = self.slot(id);
        let mut live = slot.live.lock().await;
        let mut sandbox = self.load(id).await?;
        if sandbox.state != State::Suspended {
            return Err(SandboxError::Conflict(format!(
                "sandbox {id} is {}: only a suspended sandbox can be resumed",
                sandbox.state.as_str()
            )));
        }
        self.resume_locked(&slot, &mut sandbox, &mut live).await?;
        Ok(sandbox)
    }

    async fn resume_locked(
        &self,
        slot: &Slot,
        sandbox: &mut Sandbox,
        live: &mut Option<Live>,
    ) -> Result<(), SandboxError> {
        if sandbox.tier == Tier::Microvm {
            return self.resume_vm(sandbox, live).await;
        }
        let begun = std::time::Instant::now();
        let record = self.version(sandbox).await?;
        let Some(digest) = sandbox.state_digest.clone() else {
            return Err(SandboxError::State(format!(
                "sandbox {} has no saved state",
                sandbox.id
            )));
        };
        let (saved, function) = (self.saved.clone(), sandbox.function.clone());
        let (state, manifest) = tokio::task::spawn_blocking(move || saved.load(&function, &digest))
            .await
            .expect("state task panicked")?;
        slot.set_saved(manifest);
        sandbox.enter(State::Resuming, self.clock.now_ms());
        self.commit(sandbox).await?;
        let started = self.start(sandbox, &record, Some(state)).await;
        self.finish_resume(sandbox, started, live, begun).await
    }

    /// The end of a resume, on either tier: the instance `started` published as running; without
    /// room for it, the sandbox stays suspended (the caller may retry); any other failure fails it.
    async fn finish_resume(
        &self,
        sandbox: &mut Sandbox,
        started: Result<Live, SandboxError>,
        live: &mut Option<Live>,
        begun: std::time::Instant,
    ) -> Result<(), SandboxError> {
        let started = match started {
            Ok(started) => started,
            Err(e @ SandboxError::TooMany(_)) => {
                sandbox.enter(State::Suspended, self.clock.now_ms());
                self.commit(sandbox).await?;
                return Err(e);
            }
            Err(e) => {
                self.fail(sandbox, format!("resuming failed: {e}")).await?;
                return Err(e);
            }
        };
        sandbox.last_active_ms = self.clock.now_ms();
        sandbox.enter(State::Running, self.clock.now_ms());
        self.publish(sandbox, started, live).await?;
        self.metrics.sandbox_resumed(begun.elapsed());
        Ok(())
    }

    /// Marks a sandbox failed with `reason`.
    async fn fail(&self, sandbox: &mut Sandbox, reason: String) -> Result<(), SandboxError> {
        sandbox.error = Some(reason.clone());
        sandbox.enter(State::Failed, self.clock.now_ms());
        self.commit(sandbox).await?;
        Err(SandboxError::Conflict(format!(
            "sandbox {} failed: {reason}",
            sandbox.id
        )))
    }

    /// A running sandbox without an instance (its instance ended on its own): failed, with why.
    async fn lost(&self, sandbox: &mut Sandbox) -> Result<(), SandboxError> {
        self.fail(sandbox, "its instance is gone".into()).await
    }

    /// Terminates a sandbox: its instance and its saved state are gone; the record stays.
    pub async fn terminate(&self, id: &str) -> Result<Sandbox, SandboxError> {
        let slot = self.slot(id);
        let mut live = slot.live.lock().await;
        let mut sandbox = self.load(id).await?;
        if sandbox.state.is_final() {
            return Err(SandboxError::Conflict(format!(
                "sandbox {id} is already {}",
                sandbox.state.as_str()
            )));
        }
        if let Some(current) = live.take() {
            current.instance.terminate().await;
        }
        let state = sandbox.state_digest.take();
        sandbox.state_bytes = 0;
        sandbox.enter(State::Terminated, self.clock.now_ms());
        self.commit(&sandbox).await?;
        let owned = id.to_owned();
        self.blocking(move |m| m.delete_sandbox_tokens(&owned)).await?;
        self.tokens.retain(|_, token| token.sandbox != id);
        match (sandbox.tier, state) {
            (Tier::Microvm, _) => self.functions.tiers.microvm.remove_sandbox(id).await,
            (Tier::Wasm, Some(state)) => self.forget_state(state).await,
            (Tier::Wasm, None) => {}
        }
        drop(live);
        self.slots.remove(id);
        Ok(sandbox)
    }

    /// Copies a running or suspended sandbox into `count` new ones, each suspended with the same
    /// state (one blob, shared) and resumed on its first request.
    pub async fn fork(&self, id: &str, count: u32) -> Result<Vec<Sandbox>, SandboxError> {
        if !(1..=32).contains(&count) {
            return Err(SandboxError::Invalid("count must be between 1 and 32".into()));
        }
        let slot = self.slot(id);
        let mut live = slot.live.lock().await;
        let mut source = self.load(id).await?;
        if source.tier == Tier::Microvm {
            return self.fork_vm(&mut source, &mut live, count).await;
        }
        let (digest, bytes) = match (source.state, live.as_ref()) {
            (State::Running, Some(current)) => {
                let state =
                    current.instance.capture().await.map_err(|reason| {
                        SandboxError::Conflict(format!("sandbox {id} cannot be forked now: {reason}"))
                    })?;
                // The fork's state: the source's own next save still builds on its own last one.
                let bytes = state.as_bytes().len() as u64;
                (
                    self.save_state(&source.function, slot.saved(), state, None).await?.0,
                    bytes,
                )
            }
            (State::Suspended, _) => match &source.state_digest {
                Some(digest) => (digest.clone(), source.state_bytes),
                None => return Err(SandboxError::State(format!("sandbox {id} has no saved state"))),
            },
            (state, _) => {
                return Err(SandboxError::Conflict(format!(
                    "sandbox {id} is {}: only a running or suspended sandbox can be forked",
                    state.as_str()
                )))
            }
        };
        drop(live);
        let mut forks = Vec::new();
        for _ in 0..count {
            let fork = self.fork_record(&source, &digest, bytes);
            let inserted = fork.clone();
            self.blocking(move |m| m.insert_sandbox(&inserted)).await?;
            self.metrics.sandbox_transition(State::Suspended);
            forks.push(fork);
        }
        Ok(forks)
    }

    /// A new sandbox like `source`, suspended at `digest` (`bytes` on disk), resumed on its first
    /// request.
    fn fork_record(&self, source: &Sandbox, digest: &Digest, bytes: u64) -> Sandbox {
        let now = self.clock.now_ms();
        let mut fork = Sandbox {
            id: new_id(),
            idempotency_key: None,
            created_at: now_rfc3339(),
            last_active_ms: now,
            running_ms: 0,
            running_since_ms: None,
            suspended_ms: 0,
            suspended_since_ms: None,
            state: State::Suspended,
            error: None,
            state_digest: Some(digest.clone()),
            state_bytes: bytes,
            suspended_at: Some(now_rfc3339()),
            resumed_from: None,
            ..source.clone()
        };
        fork.enter(State::Suspended, now);
        fork
    }

    /// Makes a token for one sandbox, with `scopes`, valid for `ttl`. Returns the secret (shown
    /// once) and the token.
    pub async fn create_token(
        &self,
        id: &str,
        scopes: Vec<Scope>,
        ttl: Duration,
    ) -> Result<(String, SandboxToken), SandboxError> {
        let sandbox = self.load(id).await?;
        if sandbox.state.is_final() {
            return Err(SandboxError::Conflict(format!(
                "sandbox {id} is {}",
                sandbox.state.as_str()
            )));
        }
        if scopes.is_empty() {
            return Err(SandboxError::Invalid(
                "scopes must name at least one of ingress, exec, shell, files".into(),
            ));
        }
        if ttl.is_zero() || ttl.as_secs() > MAX_TOKEN_TTL_S {
            return Err(SandboxError::Invalid(format!(
                "ttl_s must be between 1 and {MAX_TOKEN_TTL_S}"
            )));
        }
        let secret = format!("kiln_sbx_{}", hex::encode(rand::random::<[u8; 32]>()));
        let token = SandboxToken {
            sandbox: id.to_owned(),
            scopes,
            expires_ms: Some(self.clock.now_ms() + ttl.as_millis() as u64),
        };
        let hash: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let stored = token.clone();
        self.blocking(move |m| m.insert_sandbox_token(&hash, &stored)).await?;
        self.tokens.insert(hash, token.clone());
        Ok((secret, token))
    }

    /// Whether a request with this principal and sandbox token may reach the ingress of `gate`'s sandbox.
    pub fn may_enter(
        &self,
        gate: &Gate,
        principal: Option<&Principal>,
        sandbox_token: Option<&str>,
    ) -> Result<(), SandboxError> {
        match gate.ingress {
            Ingress::Off => return Err(SandboxError::Forbidden(format!("sandbox {} takes no ingress", gate.id))),
            Ingress::Public => return Ok(()),
            Ingress::Token => {}
        }
        self.may_act(gate, principal, sandbox_token, Scope::Ingress)
    }

    /// Whether `sandbox_token` is a live token of sandbox `gate` with `scope`.
    pub(super) fn check_sandbox_token(
        &self,
        gate: &Gate,
        sandbox_token: Option<&str>,
        scope: Scope,
    ) -> Result<(), SandboxError> {
        let Some(secret) = sandbox_token else {
            return Err(SandboxError::Unauthorized);
        };
        let hash: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let Some(token) = self.tokens.get(&hash).map(|t| t.clone()) else {
            return Err(SandboxError::Unauthorized);
        };
        if token.expires_ms.is_some_and(|at| self.clock.now_ms() >= at) {
            return Err(SandboxError::Unauthorized);
        }
        if token.sandbox != gate.id || !token.scopes.contains(&scope) {
            return Err(SandboxError::Forbidden(format!(
                "this sandbox token may not {} in sandbox {}",
                scope.as_str(),
                gate.id
            )));
        }
        Ok(())
    }

    /// Serves one ingress request: resumes the sandbox first if it is suspended. A running
    /// sandbox is served from memory: no store is read or written per request.
    pub async fn enter(
        &self,
        id: &str,
        request: http::Request<IngressBody>,
    ) -> Result<http::Response<GuestBody>, SandboxError> {
        let slot = self.slot(id);
        let handle = {
            let mut live = slot.live.lock().await;
            if live.is_none() {
                let mut sandbox = self.load(id).await?;
                match sandbox.state {
                    State::Running => self.lost(&mut sandbox).await?,
                    State::Suspended => self.resume_locked(&slot, &mut sandbox, &mut live).await?,
                    state => {
                        return Err(SandboxError::Conflict(format!("sandbox {id} is {}", state.as_str())));
                    }
                }
            }
            live.as_ref().expect("running with an instance").instance.handle()
        };
        let function = match slot.gate.get() {
            Some(gate) => gate.function.clone(),
            None => self.gate(id).await?.function,
        };
        // The function's own limit applies to its sandboxes' requests too.
        let resolved = self.functions.resolve(&function, None).await?;
        let permit = resolved
            .concurrency
            .try_take(1)
            .ok_or_else(|| InvokeError::FunctionBusy(function.clone(), resolved.concurrency.limit()))?;
        slot.active_ms.fetch_max(self.clock.now_ms(), Ordering::Relaxed);
        let instance = match handle {
            Handle::Wasm(instance) => instance,
            Handle::Vm(vm) => {
                let timeout = resolved.function.record.config.timeout();
                return self.enter_vm(id, &vm, request, permit, timeout).await;
            }
        };
        // Hop-by-hop and microVM-only headers are not the component's business.
        let mut request = request;
        for name in [PORT_HEADER, "connection", "upgrade"] {
            request.headers_mut().remove(name);
        }
        match instance.request(request, Some(permit)).await {
            Ok(response) => Ok(response),
            Err(Some(error)) => {
                if matches!(error, InvokeError::Timeout(_) | InvokeError::Failed(_)) {
                    // The instance cannot serve on: the sandbox fails (its state is not trusted).
                    self.instance_failed(id, error.to_string()).await;
                }
                Err(error.into())
            }
            Err(None) => {
                let reason = instance.failure().unwrap_or_else(|| "its instance is gone".into());
                self.instance_failed(id, reason.clone()).await;
                Err(SandboxError::Conflict(format!("sandbox {id} failed: {reason}")))
            }
        }
    }

    async fn instance_failed(&self, id: &str, reason: String) {
        let slot = self.slot(id);
        let mut live = slot.live.lock().await;
        if let Some(current) = live.take() {
            current.instance.stop().await;
        }
        if let Ok(mut sandbox) = self.load(id).await {
            if sandbox.state == State::Running {
                let _ = self.fail(&mut sandbox, reason).await;
            }
        }
    }

    /// Suspends or terminates sandboxes idle past their `idle_timeout_s`, and terminates those
    /// past their `max_lifetime_s` of running time. Runs until the process ends.
    pub fn start_reaper(self: &Arc<Sandboxes>) {
        let sandboxes = Arc::downgrade(self);
        let every = self.config.reap_every;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(sandboxes) = sandboxes.upgrade() else {
                    return;
                };
                sandboxes.reap().await;
            }
        });
    }

    /// Releases the suspend points replaced since the last call (a crash before leaves them to
    /// the next start-up).
    async fn release_replaced(&self) {
        let replaced = std::mem::take(&mut *self.replaced.lock().unwrap_or_else(|e| e.into_inner()));
        if replaced.is_empty() {
            return;
        }
        let saved = self.saved.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for digest in replaced {
                if let Err(e) = saved.release(&digest) {
                    tracing::warn!(error = %e, "a sandbox state could not be released");
                }
            }
        })
        .await;
    }

    async fn reap(&self) {
        self.release_replaced().await;
        let Ok(running) = self.list(None, Some(State::Running)).await else {
            return;
        };
        let now = self.clock.now_ms();
        for sandbox in running {
            let idle = now.saturating_sub(sandbox.last_active_ms) >= sandbox.settings.idle_timeout_s * 1000;
            let expired = sandbox.running_ms_at(now) >= sandbox.settings.max_lifetime_s * 1000;
            let done = if expired {
                tracing::info!(sandbox = %sandbox.id, "sandbox reached its max_lifetime_s");
                self.terminate(&sandbox.id).await.map(drop)
            } else if idle {
                match sandbox.settings.on_idle {
                    OnIdle::Suspend => self.suspend(&sandbox.id).await.map(drop),
                    OnIdle::Terminate => self.terminate(&sandbox.id).await.map(drop),
                }
            } else {
                Ok(())
            };
            if let Err(e) = done {
                tracing::debug!(sandbox = %sandbox.id, error = %e, "the reaper left a sandbox as it was");
            }
        }
    }

    /// Suspends every running sandbox (a graceful stop). Those that cannot be suspended are left
    /// for the restart to fail or send back to their last suspend point.
    pub async fn suspend_all(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        if let Ok(running) = self.list(None, Some(State::Running)).await {
            for sandbox in running {
                if let Err(e) = self.suspend(&sandbox.id).await {
                    tracing::warn!(sandbox = %sandbox.id, error = %e, "could not suspend a sandbox at shutdown");
                }
            }
        }
        self.release_replaced().await;
    }

    /// Sandboxes by state, for `/metrics`.
    /// Sandboxes live on this node now (each holds one of `max_running`).
    pub fn live_here(&self) -> usize {
        self.running.in_use()
    }

    pub async fn counts(&self) -> HashMap<State, u64> {
        let mut counts = HashMap::new();
        if let Ok(all) = self.list(None, None).await {
            for sandbox in all {
                *counts.entry(sandbox.state).or_insert(0) += 1;
            }
        }
        counts
    }
}

/// `sbx_` and 26 characters of Crockford's base32: 130 random bits, safe in paths and URLs.
fn new_id() -> String {
    const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let bytes: [u8; 17] = rand::random();
    let mut id = String::with_capacity(30);
    id.push_str("sbx_");
    let mut bits = 0u32;
    let mut value = 0u32;
    for byte in bytes {
        value = (value << 8) | byte as u32;
        bits += 8;
        while bits >= 5 && id.len() < 30 {
            bits -= 5;
            id.push(ALPHABET[((value >> bits) & 31) as usize] as char);
        }
    }
    id
}

/// Whether `id` has the shape of a sandbox id (checked before it touches the store).
pub fn is_valid_id(id: &str) -> bool {
    id.len() == 30
        && id.starts_with("sbx_")
        && id[4..]
            .bytes()
            .all(|b| b"0123456789abcdefghjkmnpqrstvwxyz".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A microVM function's sandbox on a host where the tier cannot run (its version deployed on
    /// another host, sharing the data): `unavailable`, with the host's reason.
    #[tokio::test]
    async fn a_microvm_sandbox_where_the_tier_cannot_run_is_unavailable_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::testing::functions(dir.path()).storage.clone();
        let config = crate::function::FunctionConfig {
            tier: Tier::Microvm,
            ..Default::default()
        };
        let digest = Digest::of(b"a static executable");
        storage
            .metadata
            .commit_version("web", &digest, &digest, crate::function::ArtifactKind::Native, &config)
            .unwrap();
        // The registry is read at start-up, as after a restart.
        let functions = Arc::new(crate::testing::functions(dir.path()));
        let sandboxes = Sandboxes::open(
            storage,
            functions,
            SandboxesConfig::default(),
            Arc::new(crate::clock::SystemClock),
            Arc::new(Metrics::default()),
        )
        .unwrap();
        let request = NewSandbox {
            function: "web".into(),
            version: None,
            settings: Settings::default(),
            idempotency_key: None,
        };
        match sandboxes.create(request).await {
            Err(SandboxError::Load(LoadError::Unavailable(reason))) => {
                assert!(reason.contains("not in unit tests"), "{reason}")
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("a microVM sandbox started where the tier cannot run"),
        }
        assert!(
            sandboxes.list(None, None).await.unwrap().is_empty(),
            "a record was left"
        );

        // A suspended microVM sandbox (its data moved here from a node with a hypervisor): every
        // way in — exec, the shell and files (`vm`), ingress, resume — answers with the reason.
        let id = "sbx_0123456789abcdefghjkmnpqrs";
        let suspended = Sandbox {
            id: id.into(),
            function: "web".into(),
            version: 1,
            tier: Tier::Microvm,
            state: State::Suspended,
            error: None,
            settings: Settings::default(),
            idempotency_key: None,
            created_at: crate::clock::now_rfc3339(),
            last_active_ms: 0,
            running_ms: 0,
            running_since_ms: None,
            suspended_ms: 0,
            suspended_since_ms: Some(0),
            state_digest: Some(Digest::of(b"a suspend point")),
            state_bytes: 1,
            suspended_at: None,
            resumed_from: None,
        };
        sandboxes.storage.metadata.insert_sandbox(&suspended).unwrap();
        let unavailable = |result: Result<(), SandboxError>, what: &str| match result {
            Err(SandboxError::Load(LoadError::Unavailable(reason))) => {
                assert!(reason.contains("not in unit tests"), "{what}: {reason}")
            }
            Err(other) => panic!("{what}: {other}"),
            Ok(()) => panic!("{what}: reached a microVM where the tier cannot run"),
        };
        unavailable(sandboxes.vm(id).await.map(drop), "exec, shell, files");
        use http_body_util::BodyExt as _;
        let empty = http_body_util::Empty::new().map_err(|never| match never {}).boxed();
        let request = http::Request::new(empty);
        unavailable(sandboxes.enter(id, request).await.map(drop), "ingress");
        unavailable(sandboxes.resume(id).await.map(drop), "resume");
        assert_eq!(
            sandboxes.get(id).await.unwrap().state,
            State::Suspended,
            "the sandbox was changed"
        );
    }

    #[test]
    fn ids_are_sbx_and_26_base32_characters() {
        let id = new_id();
        assert!(is_valid_id(&id), "{id}");
        assert_ne!(new_id(), id);
        assert!(!is_valid_id("sbx_../../etc/passwd_________"));
        assert!(!is_valid_id("tok_0123456789abcdefghjkmnpqrs"));
    }
}
