//! The Wasm tier's side of sandboxes (`crate::sandboxes`): an HTTP-trigger component's instance
//! kept alive, serving one request after another from the same store, so what it keeps in memory
//! is still there for the next one; its state captured at a quiescent point (suspend) and put
//! back into a fresh instance (resume), through the accessors `state` instruments it with.
//!
//! A live instance is a task that owns the store: requests, captures and the stop arrive as jobs
//! on one channel and are done in order, so a capture or a stop always comes after the requests
//! queued before it — the quiescent point. A request's response goes back as soon as the guest
//! sets it; its body streams while the guest writes it, and the next job waits for the guest to
//! return. A guest that traps or runs past its deadline leaves the instance unusable: the task
//! ends with the reason, and the sandbox fails.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::Poll;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};
use wasmtime_wasi_http::WasiHttpView;

use super::footprint::Footprint;
use super::instance::{arm_deadline, classify, ComponentState, Guest, Instance, StdoutCap};
use super::limits::PoolShare;
use super::link::Code;
use super::state::{self, InstanceState, Layout};
use super::trigger::GuestBody;
use super::WasmTier;
use crate::digest::Digest;
use crate::function::{ArtifactKind, VersionRecord};
use crate::functions::LoadError;
use crate::outcome::{Failure, InvokeError, STDERR_TAIL};
use crate::storage::BlobKind;

/// A request on its way into a sandbox: any body of bytes (the server's, adapted).
pub type IngressBody = BoxBody<Bytes, ErrorCode>;

/// A version made ready for sandboxes: its component instrumented for state access, compiled and
/// linked once (for the sandbox engine), and shared by every sandbox of the version.
pub struct SandboxCode {
    pre: ProxyPre<ComponentState>,
    layout: Layout,
    /// The instances, memories and tables one instance may create (`limits::PoolShare`).
    weight: u32,
}

impl WasmTier {
    /// Instruments, compiles (cached like any code) and links `record`'s component for sandboxes.
    /// Blocking work runs on the blocking pool.
    pub async fn sandbox_code(&self, record: &VersionRecord) -> Result<SandboxCode, LoadError> {
        if record.kind != ArtifactKind::Component {
            return Err(LoadError::Link(format!(
                "function `{}` is not a wasi:http/proxy component: a Wasm sandbox runs one",
                record.name
            )));
        }
        let tier = self.clone();
        let digest = record.code_digest.clone();
        let (compiled, footprint, layout) = tokio::task::spawn_blocking(move || -> Result<_, LoadError> {
            let original = tier
                .blobs
                .get(BlobKind::Artifact, &digest)
                .map_err(|e| LoadError::Link(e.to_string()))?;
            let instrumented = state::instrument(&original).map_err(|e| LoadError::Link(e.to_string()))?;
            let instrumented_digest = Digest::of(&instrumented.component);
            // The instrumented code is an artifact of its own: stored once, compiled once per
            // engine/CPU and sealed like any other.
            tier.blobs
                .put(BlobKind::Artifact, &instrumented_digest, &instrumented.component)
                .map_err(|e| LoadError::Link(e.to_string()))?;
            let (compiled, footprint) = tier
                .sandboxes
                .cache
                .load(ArtifactKind::Component, &instrumented_digest)?;
            Ok((compiled, footprint, instrumented.layout))
        })
        .await
        .expect("sandbox compile task panicked")?;
        let pre = match self.sandboxes.linkers.link(&compiled).map_err(LoadError::Link)? {
            Code::Http(pre) => pre,
            _ => {
                return Err(LoadError::Link(format!(
                    "function `{}` is not a wasi:http/proxy component: a Wasm sandbox runs one",
                    record.name
                )))
            }
        };
        Ok(SandboxCode {
            pre,
            layout,
            weight: Footprint::weight(&footprint),
        })
    }
}

/// A job for a live instance.
enum Job {
    Request {
        // Boxed: a request is much larger than a capture's reply channel.
        request: Box<http::Request<IngressBody>>,
        respond: oneshot::Sender<Result<http::Response<GuestBody>, InvokeError>>,
        /// Held until the guest's handler returns (its body may stream on after the answer).
        hold: Option<OwnedSemaphorePermit>,
    },
    Capture {
        respond: oneshot::Sender<Result<InstanceState, String>>,
    },
}

/// A sandbox's live Wasm instance: the task that owns its store.
pub struct LiveInstance {
    handle: LiveHandle,
    task: tokio::task::JoinHandle<()>,
}

/// What sends jobs to a live instance; cheap to clone, so a request need not hold the sandbox's
/// lock while it is served.
#[derive(Clone)]
pub struct LiveHandle {
    jobs: mpsc::Sender<Job>,
    /// Why the instance cannot serve any more, once it cannot.
    failure: Arc<OnceLock<String>>,
}

/// What a live instance is started with.
pub struct Start<'a> {
    pub code: &'a SandboxCode,
    pub record: &'a VersionRecord,
    /// The function's environment and the sandbox's own.
    pub env: Vec<(String, String)>,
    pub egress: &'a super::egress::Egress,
    /// Who it is: the sandbox, which its identity tokens name.
    pub identity: crate::identity::Identity,
    /// The state to put back (resume, fork), or `None` for a fresh instance.
    pub state: Option<Vec<u8>>,
}

impl LiveInstance {
    /// Instantiates the code (restoring `state` if given) and starts serving.
    pub async fn start(tier: &WasmTier, start: Start<'_>) -> Result<LiveInstance, InvokeError> {
        let args = [start.record.name.clone()];
        let config = &start.record.config;
        let guest = Guest {
            args: &args,
            env: &start.env,
            egress: start.egress,
            identity: Some(start.identity),
            memory_bytes: config.memory_bytes(),
            share: PoolShare::of_weight(start.code.weight),
            timeout: config.timeout(),
            timeout_ms: config.timeout_ms,
        };
        let Instance {
            mut store,
            stdout,
            stderr,
            timeout_ms,
        } = guest.store::<ComponentState>(&tier.sandboxes.engine, Bytes::new(), StdoutCap::Invocation);
        let restore_from = start.state;
        let started = async {
            let instance = start.code.pre.instance_pre().instantiate_async(&mut store).await?;
            if let Some(bytes) = restore_from {
                let saved = InstanceState::decode_vec(bytes).map_err(|e| wasmtime::Error::msg(e.to_string()))?;
                state::restore(&mut store, &instance, &start.code.layout, &saved)
                    .await
                    .map_err(|e| wasmtime::Error::msg(e.to_string()))?;
            }
            let proxy = Proxy::new(&mut store, &instance)?;
            Ok::<_, wasmtime::Error>((instance, proxy))
        };
        let (instance, proxy) = match tokio::time::timeout(config.timeout(), started).await {
            Ok(Ok(started)) => started,
            Ok(Err(error)) => {
                let exceeded = store.data().limiter.exceeded();
                return Err(classify(error, timeout_ms, exceeded, &stdout, &stderr));
            }
            Err(_) => return Err(InvokeError::Timeout(timeout_ms)),
        };
        let (jobs, queue) = mpsc::channel(64);
        let failure = Arc::new(OnceLock::new());
        let serving = Serving {
            store,
            instance,
            proxy,
            layout: start.code.layout.clone(),
            timeout: config.timeout(),
            timeout_ms,
            stdout,
            stderr,
            failure: failure.clone(),
        };
        let task = tokio::spawn(serving.run(queue));
        Ok(LiveInstance {
            handle: LiveHandle { jobs, failure },
            task,
        })
    }

    pub fn handle(&self) -> LiveHandle {
        self.handle.clone()
    }

    pub fn failure(&self) -> Option<String> {
        self.handle.failure()
    }

    pub async fn capture(&self) -> Result<InstanceState, String> {
        self.handle.capture().await
    }

    /// Stops serving once every job queued before is done, and drops the instance (its pool slot
    /// is free again when this returns).
    pub async fn stop(self) {
        drop(self.handle);
        let _ = self.task.await;
    }
}

impl LiveHandle {
    /// Why the instance stopped serving, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure.get().cloned()
    }

    /// Serves one request, holding `hold` until the guest's handler has returned; `Err(None)`
    /// when the instance is gone (stopped, or failed: see [`LiveInstance::failure`]).
    pub async fn request(
        &self,
        request: http::Request<IngressBody>,
        hold: Option<OwnedSemaphorePermit>,
    ) -> Result<http::Response<GuestBody>, Option<InvokeError>> {
        let (respond, answer) = oneshot::channel();
        self.jobs
            .send(Job::Request {
                request: Box::new(request),
                respond,
                hold,
            })
            .await
            .map_err(|_| None)?;
        answer.await.map_err(|_| None)?.map_err(Some)
    }

    /// The instance's whole state, once every request queued before has been served.
    pub async fn capture(&self) -> Result<InstanceState, String> {
        let (respond, answer) = oneshot::channel();
        let gone = || {
            self.failure()
                .unwrap_or_else(|| "the sandbox's instance is gone".into())
        };
        self.jobs.send(Job::Capture { respond }).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// The live instance's task state.
struct Serving {
    store: wasmtime::Store<ComponentState>,
    instance: wasmtime::component::Instance,
    proxy: Proxy,
    layout: Layout,
    timeout: std::time::Duration,
    timeout_ms: u64,
    stdout: super::limits::CappedOutput,
    stderr: super::limits::CappedOutput,
    failure: Arc<OnceLock<String>>,
}

impl Serving {
    async fn run(mut self, mut queue: mpsc::Receiver<Job>) {
        while let Some(job) = queue.recv().await {
            match job {
                Job::Request { request, respond, hold } => {
                    let served = self.serve(*request, respond).await;
                    drop(hold);
                    if let Err(reason) = served {
                        let _ = self.failure.set(reason);
                        return;
                    }
                }
                Job::Capture { respond } => {
                    // The accessors are guest code: the last request's deadline may have passed.
                    arm_deadline(&mut self.store, self.timeout);
                    let captured = state::capture(&mut self.store, &self.instance, &self.layout)
                        .await
                        .map_err(|e| e.to_string());
                    let _ = respond.send(captured);
                }
            }
        }
    }

    /// Runs the guest's handler on one request; `Err` with the reason when the instance cannot
    /// serve another.
    async fn serve(
        &mut self,
        request: http::Request<IngressBody>,
        respond: oneshot::Sender<Result<http::Response<GuestBody>, InvokeError>>,
    ) -> Result<(), String> {
        let (sender, mut response) = oneshot::channel();
        let setup = (|| -> wasmtime::Result<_> {
            let request = self
                .store
                .data_mut()
                .http()
                .new_incoming_request(Scheme::Http, request)?;
            let out = self.store.data_mut().http().new_response_outparam(sender)?;
            Ok((request, out))
        })();
        let (request, out) = match setup {
            Ok(handles) => handles,
            Err(e) => {
                let _ = respond.send(Err(InvokeError::failed(format!(
                    "the request could not be handed to the sandbox: {e}"
                ))));
                return Ok(());
            }
        };
        arm_deadline(&mut self.store, self.timeout);
        let (finished_tx, finished) = oneshot::channel();
        let mut pending = Some((respond, finished));
        let mut response_taken = false;
        let ended = {
            let call = self
                .proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut self.store, request, out);
            let mut call = std::pin::pin!(tokio::time::timeout(self.timeout, call));
            // Answer as soon as the guest sets its response; keep running it while it writes.
            std::future::poll_fn(|cx| {
                if !response_taken {
                    if let Poll::Ready(answer) = Pin::new(&mut response).poll(cx) {
                        response_taken = true;
                        if let (Ok(answer), Some((respond, finished))) = (answer, pending.take()) {
                            let _ = respond.send(shape(answer, finished));
                        }
                    }
                }
                call.as_mut().poll(cx)
            })
            .await
        };
        let outcome = match ended {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => {
                let exceeded = self.store.data().limiter.exceeded();
                Err(classify(error, self.timeout_ms, exceeded, &self.stdout, &self.stderr))
            }
            Err(_elapsed) => Err(InvokeError::Timeout(self.timeout_ms)),
        };
        if let Some((respond, finished)) = pending.take() {
            // The guest ended without its response being taken: it may have set it on the way.
            let set = if response_taken { None } else { response.try_recv().ok() };
            let answer = match (set, &outcome) {
                (Some(answer), _) => shape(answer, finished),
                (None, Ok(())) => Err(InvokeError::Failed(Failure {
                    message: "the function returned without setting a response".to_owned(),
                    trap: None,
                    exit_code: None,
                    stderr_tail: self.stderr.tail(STDERR_TAIL),
                })),
                (None, Err(e)) => Err(copy_error(e)),
            };
            let _ = respond.send(answer);
        }
        let _ = finished_tx.send(outcome.is_ok());
        // A trap or a timeout leaves the instance's state mid-operation: it cannot serve on.
        outcome.map_err(|e| e.to_string())
    }
}

/// The guest's answer as the client gets it: its response, whose body ends once the guest has
/// returned (`finished`), or the error code it answered with.
fn shape(
    answer: Result<http::Response<wasmtime_wasi_http::p2::body::HyperOutgoingBody>, ErrorCode>,
    finished: oneshot::Receiver<bool>,
) -> Result<http::Response<GuestBody>, InvokeError> {
    match answer {
        Ok(response) => Ok(response.map(|inner| GuestBody::new(inner, finished))),
        Err(code) => Err(InvokeError::failed(format!(
            "the function answered with an error: {code:?}"
        ))),
    }
}

/// The same failure, for a second listener.
fn copy_error(error: &InvokeError) -> InvokeError {
    match error {
        InvokeError::Timeout(ms) => InvokeError::Timeout(*ms),
        InvokeError::Failed(failure) => InvokeError::Failed(Failure {
            message: failure.message.clone(),
            trap: failure.trap.clone(),
            exit_code: failure.exit_code,
            stderr_tail: failure.stderr_tail.clone(),
        }),
        other => InvokeError::failed(other.to_string()),
    }
}
