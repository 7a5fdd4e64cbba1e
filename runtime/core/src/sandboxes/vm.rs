//! The microVM tier's side of the sandbox lifecycle: the same states and rules as a Wasm
//! sandbox's, with a running VM (`tier::microvm::sandbox::LiveVm`) for the live instance and a
//! suspend point — the VM's own snapshot, written by its helper — for the saved state.
//!
//! - start: the VM restored from the function's snapshot (or a suspend point), the guest's clock
//!   set and its randomness reseeded, its server started on the first start;
//! - suspend: refused while a connection to it is open (a graceful stop resets them first); the
//!   helper writes the VM's memory and state, the host makes them the sandbox's next point and
//!   removes the one before;
//! - fork: suspend (if running), then hard links of the point for each copy (points never change);
//!   each copy reseeds its randomness when it first starts.

use std::time::Duration;

use super::record::{Sandbox, Scope, State};
use super::{Gate, Handle, Instance, Live, SandboxError, Sandboxes, PORT_HEADER};
use crate::auth::Principal;
use crate::digest::Digest;
use crate::function::VersionRecord;
use crate::identity::Subject;
use crate::outcome::InvokeError;
use crate::registry::Entry;
use crate::tier::microvm::sandbox::{Origin, VmHandle};
use crate::tier::wasm::egress::Rule;
use crate::tier::wasm::sandbox::IngressBody;
use crate::tier::wasm::trigger::GuestBody;

/// How long a suspend waits for the sandbox's open connections to end.
const QUIESCE_GRACE: Duration = Duration::from_secs(10);

fn not_a_vm(sandbox: &Sandbox) -> SandboxError {
    SandboxError::Invalid(format!(
        "sandbox {} runs on the {} tier: exec, the shell and files are for microVM sandboxes, which have \
         processes and files",
        sandbox.id,
        sandbox.tier.as_str()
    ))
}

impl Sandboxes {
    /// Starts the VM of `sandbox`: from the function's snapshot, or from its suspend point.
    pub(super) async fn start_vm(
        &self,
        sandbox: &Sandbox,
        record: &VersionRecord,
        point: Option<&Digest>,
    ) -> Result<Live, SandboxError> {
        let running = self
            .running
            .try_take(1)
            .ok_or(SandboxError::TooMany(self.running.limit()))?;
        let resolved = self.functions.resolve(&record.name, Some(record.version)).await?;
        let Entry::Microvm(function) = &resolved.function.entry else {
            return Err(SandboxError::State(format!(
                "{}@{} is not a microVM function",
                record.name, record.version
            )));
        };
        let origin = match point {
            Some(digest) => Origin::Point(digest),
            None => Origin::Function(function),
        };
        // The function's own environment is in its image; the sandbox's adds to it.
        let env: Vec<(String, String)> = sandbox
            .settings
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Where its network may go: the function's hosts and connectors, and the sandbox's own.
        let mut egress: Vec<Rule> = record
            .config
            .allowed_hosts
            .iter()
            .filter_map(|entry| Rule::parse(entry).ok())
            .collect();
        let connectors = &self.functions.connectors;
        egress.extend(connectors.rules(&record.config.connectors));
        egress.extend(connectors.rules(&sandbox.settings.connectors));
        // Its tokens from `kiln.internal` name this sandbox (a fork's, the fork).
        let identity = self
            .functions
            .tiers
            .wasm
            .identity(Subject::Sandbox(sandbox.id.clone()), record);
        let vm = self
            .functions
            .tiers
            .microvm
            .start_sandbox(
                &sandbox.id,
                origin,
                sandbox.settings.ingress_port,
                &env,
                egress,
                identity,
            )
            .await
            .map_err(|reason| SandboxError::Invoke(InvokeError::failed(reason)))?;
        Ok(Live {
            instance: Instance::Vm(vm),
            _running: running,
        })
    }

    /// Suspends a running microVM sandbox (its lock held). With `force`, open connections are
    /// reset first (a graceful stop); otherwise they make it refuse.
    pub(super) async fn suspend_vm(
        &self,
        sandbox: &mut Sandbox,
        live: &mut Option<Live>,
        force: bool,
    ) -> Result<(), SandboxError> {
        let started = std::time::Instant::now();
        let Some(current) = live.take() else {
            return self.lost(sandbox).await;
        };
        let Instance::Vm(vm) = &current.instance else {
            unreachable!("a microVM sandbox runs a VM")
        };
        let stopping = force || self.stopping.load(std::sync::atomic::Ordering::Relaxed);
        if stopping {
            vm.reset_streams("the server is stopping");
        } else {
            // A suspend point is at most the guest's memory: past the disk budget the sandbox runs
            // on (at a stop it is written regardless: the alternative is losing it).
            let record = self.version(sandbox).await;
            let bytes = record.map(|r| r.config.memory_mb << 20).unwrap_or(0);
            let budget = self.storage.budget.clone();
            let admitted = tokio::task::spawn_blocking(move || budget.admit(bytes))
                .await
                .expect("budget task panicked");
            if let Err(full) = admitted {
                *live = Some(current);
                return Err(SandboxError::InsufficientStorage(full));
            }
        }
        if let Err(reason) = vm.quiesce(QUIESCE_GRACE).await {
            *live = Some(current);
            return Err(SandboxError::Conflict(format!(
                "sandbox {} cannot be suspended now: {reason}",
                sandbox.id
            )));
        }
        sandbox.enter(State::Suspending, self.clock.now_ms());
        self.commit(sandbox).await?;
        let microvm = &self.functions.tiers.microvm;
        let (digest, bytes) = match microvm.suspend_sandbox(&sandbox.id, vm).await {
            Ok(point) => point,
            Err(reason) => {
                if vm.failure().is_some() {
                    drop(current);
                    return self.fail(sandbox, format!("suspending failed: {reason}")).await;
                }
                *live = Some(current);
                sandbox.enter(State::Running, self.clock.now_ms());
                self.commit(sandbox).await?;
                return Err(SandboxError::Conflict(format!(
                    "sandbox {} cannot be suspended now: {reason}",
                    sandbox.id
                )));
            }
        };
        current.instance.stop().await;
        let previous = sandbox.state_digest.replace(digest.clone());
        sandbox.state_bytes = bytes;
        sandbox.suspended_at = Some(crate::clock::now_rfc3339());
        sandbox.resumed_from = None;
        sandbox.enter(State::Suspended, self.clock.now_ms());
        self.commit(sandbox).await?;
        if let Some(previous) = previous.filter(|p| *p != digest) {
            microvm.remove_point(&sandbox.id, &previous).await;
        }
        self.metrics.sandbox_suspended(started.elapsed());
        Ok(())
    }

    /// Resumes a suspended microVM sandbox from its point (its lock held).
    pub(super) async fn resume_vm(&self, sandbox: &mut Sandbox, live: &mut Option<Live>) -> Result<(), SandboxError> {
        let begun = std::time::Instant::now();
        let record = self.version(sandbox).await?;
        let Some(point) = sandbox.state_digest.clone() else {
            return Err(SandboxError::State(format!(
                "sandbox {} has no suspend point",
                sandbox.id
            )));
        };
        sandbox.enter(State::Resuming, self.clock.now_ms());
        self.commit(sandbox).await?;
        let started = self.start_vm(sandbox, &record, Some(&point)).await;
        self.finish_resume(sandbox, started, live, begun).await
    }

    /// Forks a microVM sandbox (its lock held): suspended first if it runs, then each copy gets
    /// hard links of the point and a record of its own.
    pub(super) async fn fork_vm(
        &self,
        source: &mut Sandbox,
        live: &mut Option<Live>,
        count: u32,
    ) -> Result<Vec<Sandbox>, SandboxError> {
        match source.state {
            State::Running => self.suspend_vm(source, live, false).await?,
            State::Suspended => {}
            state => {
                return Err(SandboxError::Conflict(format!(
                    "sandbox {} is {}: only a running or suspended sandbox can be forked",
                    source.id,
                    state.as_str()
                )))
            }
        }
        let Some(digest) = source.state_digest.clone() else {
            return Err(SandboxError::State(format!(
                "sandbox {} has no suspend point",
                source.id
            )));
        };
        let microvm = &self.functions.tiers.microvm;
        let mut forks = Vec::new();
        for _ in 0..count {
            let fork = self.fork_record(source, &digest, source.state_bytes);
            microvm
                .copy_point(&source.id, &fork.id, &digest)
                .await
                .map_err(SandboxError::State)?;
            let inserted = fork.clone();
            self.blocking(move |m| m.insert_sandbox(&inserted)).await?;
            self.metrics.sandbox_transition(State::Suspended);
            forks.push(fork);
        }
        Ok(forks)
    }

    /// Whether `principal` (Kiln's token) or `sandbox_token` may use sandbox `gate` with `scope`:
    /// the admin token, a token scoped to its function, or a token of this sandbox with that
    /// scope. For exec, shell and files this is the whole rule (`"ingress": "off"` or `"public"`
    /// change nothing); ingress checks its mode first (`may_enter`).
    pub fn may_act(
        &self,
        gate: &Gate,
        principal: Option<&Principal>,
        sandbox_token: Option<&str>,
        scope: Scope,
    ) -> Result<(), SandboxError> {
        if let Some(principal) = principal {
            return if principal.may_invoke(&gate.function) {
                Ok(())
            } else {
                Err(SandboxError::Forbidden(format!(
                    "this token may not {} in sandboxes of `{}`",
                    scope.as_str(),
                    gate.function
                )))
            };
        }
        self.check_sandbox_token(gate, sandbox_token, scope)
    }

    /// The running VM of microVM sandbox `id`, resumed first if it is suspended: what exec,
    /// the shell and files act on. A Wasm sandbox is `Invalid`, naming its tier.
    pub async fn vm(&self, id: &str) -> Result<VmHandle, SandboxError> {
        let slot = self.slot(id);
        let mut live = slot.live.lock().await;
        if live.is_none() {
            let mut sandbox = self.load(id).await?;
            if sandbox.tier != crate::function::Tier::Microvm {
                return Err(not_a_vm(&sandbox));
            }
            match sandbox.state {
                State::Running => self.lost(&mut sandbox).await?,
                State::Suspended => self.resume_locked(&slot, &mut sandbox, &mut live).await?,
                state => {
                    return Err(SandboxError::Conflict(format!("sandbox {id} is {}", state.as_str())));
                }
            }
        }
        slot.active_ms
            .fetch_max(self.clock.now_ms(), std::sync::atomic::Ordering::Relaxed);
        match live.as_ref().expect("running with an instance").instance.handle() {
            Handle::Vm(vm) => Ok(vm),
            Handle::Wasm(_) => Err(not_a_vm(&self.load(id).await?)),
        }
    }

    /// Serves one ingress request on a running VM.
    pub(super) async fn enter_vm(
        &self,
        id: &str,
        vm: &VmHandle,
        mut request: http::Request<IngressBody>,
        permit: tokio::sync::OwnedSemaphorePermit,
        timeout: Duration,
    ) -> Result<http::Response<GuestBody>, SandboxError> {
        let port = match request.headers_mut().remove(PORT_HEADER) {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u16>().ok())
                    .filter(|port| *port > 0)
                    .ok_or_else(|| {
                        SandboxError::Invalid(format!("{PORT_HEADER} must be a port between 1 and 65535"))
                    })?,
            ),
        };
        match vm.request(request, port, Some(permit), timeout).await {
            Ok(response) => Ok(response),
            Err(error) => {
                // A VM that failed takes its sandbox with it; a request its server refused or
                // was slow to answer does not.
                if let Some(reason) = vm.failure() {
                    self.instance_failed(id, reason).await;
                }
                Err(error.into())
            }
        }
    }
}
