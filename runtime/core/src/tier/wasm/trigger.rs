//! HTTP-trigger functions: one fresh instance of a `wasi:http/proxy` component per request, from
//! the same pool and under the same limits as a sync invoke. The request body streams into the
//! guest and the response body streams out while the guest writes it; the instance (and its
//! permits) live until the guest returns or its timeout passes, which may be after the response
//! headers have gone out. The guest runs inside the request's own task until it answers; only a
//! guest still running then (streaming its body, say) moves to a task of its own, so the common
//! small response costs no spawn and no wake-up between tasks.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::Request;
use http_body::{Frame, SizeHint};
use tokio::sync::oneshot;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::WasiHttpView;

use super::instance::{classify, ComponentState, Instance, StdoutCap};
use super::limits::CappedOutput;
use super::link::Code;
use super::{WasmFunction, WasmTier};
use crate::identity::Subject;
use crate::outcome::{Failure, InvokeError, STDERR_TAIL};
use crate::registry::{Concurrency, Entry, LoadedFunction};

/// The guest's response body. It ends only once the guest has returned: if the guest traps or
/// runs out of time mid-body, the body ends with an error, so the client sees it cut short rather
/// than a response that looks complete.
pub struct GuestBody {
    inner: HyperOutgoingBody,
    /// Whether the guest returned normally; `None` once known.
    finished: Option<oneshot::Receiver<bool>>,
}

impl GuestBody {
    /// The body a guest writes, ending once `finished` says how the guest ended.
    pub(crate) fn new(inner: HyperOutgoingBody, finished: oneshot::Receiver<bool>) -> GuestBody {
        GuestBody {
            inner,
            finished: Some(finished),
        }
    }

    /// A body that ends when `inner` does (a microVM sandbox's response, relayed as it comes).
    pub(crate) fn streamed(inner: HyperOutgoingBody) -> GuestBody {
        GuestBody { inner, finished: None }
    }
}

impl http_body::Body for GuestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(frame) = ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            return Poll::Ready(Some(frame.map_err(Into::into)));
        }
        let Some(finished) = this.finished.as_mut() else {
            return Poll::Ready(None);
        };
        let returned = ready!(Pin::new(finished).poll(cx)).unwrap_or(false);
        this.finished = None;
        if returned {
            Poll::Ready(None)
        } else {
            Poll::Ready(Some(Err("the function failed while writing its response".into())))
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl WasmTier {
    /// Runs the guest on `request` (whose URI is already the guest's view: path and query after
    /// `/fn/{name}`), as invocation `invocation`. Answers as soon as the guest has set its
    /// response.
    pub async fn serve_http<B>(
        &self,
        f: Arc<LoadedFunction>,
        concurrency: &Concurrency,
        invocation: &str,
        request: Request<B>,
    ) -> Result<http::Response<GuestBody>, InvokeError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let Entry::Wasm(wasm) = &f.entry else {
            return Err(InvokeError::NotHttpTrigger(f.record.name.clone()));
        };
        if !wasm.is_http() {
            return Err(InvokeError::NotHttpTrigger(f.record.name.clone()));
        }
        let permits = self.permits(&f, wasm, concurrency)?;
        let config = &f.record.config;
        let identity = self.identity(Subject::Invocation(invocation.to_owned()), &f.record);
        let Instance {
            mut store,
            stdout,
            stderr,
            timeout_ms,
        } = wasm.guest(config, Some(identity)).store::<ComponentState>(
            &self.engine,
            Bytes::new(),
            StdoutCap::Invocation,
        );
        let deadline = config.timeout();

        let (sender, response) = oneshot::channel();
        let setup = (|| -> wasmtime::Result<_> {
            let request = store.data_mut().http().new_incoming_request(Scheme::Http, request)?;
            let out = store.data_mut().http().new_response_outparam(sender)?;
            Ok((request, out))
        })();
        let (request, out) =
            setup.map_err(|e| InvokeError::failed(format!("the request could not be handed to the function: {e}")))?;

        let guest = f.clone();
        let answered = Arc::new(AtomicBool::new(false));
        let (finished_tx, finished) = oneshot::channel();
        let answered_in_task = answered.clone();
        let task_stderr = stderr.clone();
        let run: GuestRun = Box::pin(async move {
            let _permits = permits;
            let Entry::Wasm(WasmFunction {
                code: Code::Http(pre), ..
            }) = &guest.entry
            else {
                unreachable!("checked above")
            };
            let run = async {
                let proxy = pre.instantiate_async(&mut store).await?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, request, out)
                    .await
            };
            let outcome = tokio::time::timeout(deadline, run).await;
            let memory_exceeded = store.data().limiter.exceeded();
            drop(store);
            let _ = finished_tx.send(matches!(outcome, Ok(Ok(()))));
            if answered_in_task.load(Ordering::Acquire) {
                log_failure_after_answer(&guest, &outcome, &task_stderr);
            }
            (outcome, memory_exceeded)
        });

        // The guest runs right here, in the request's own task, until it sets its response; a small
        // response usually finishes the guest in the same poll, and then no task is spawned at all.
        let mut guest = InlineGuest(Some(run));
        let mut response = response;
        let first = std::future::poll_fn(|cx| {
            if let Some(ended) = guest.poll(cx) {
                return Poll::Ready(Err(ended));
            }
            Pin::new(&mut response).poll(cx).map(Ok)
        })
        .await;
        let ended = match first {
            Ok(Ok(answer)) => Ok(answer),
            // The guest ended: it may have set its response on the way (and then failed, in which
            // case the body it left ends with an error).
            Err(ended) => response
                .try_recv()
                .inspect(|_| log_failure_after_answer(&f, &ended.0, &stderr))
                .map_err(|_| ended),
            // The guest dropped its response outparam unset: it cannot answer any more; wait for it
            // to end and say why.
            Ok(Err(_unset)) => Err(std::future::poll_fn(|cx| guest.poll(cx).map_or(Poll::Pending, Poll::Ready)).await),
        };
        let answer = ended.map_err(|ended| explain(ended, timeout_ms, &stdout, &stderr))?;
        match answer {
            Ok(response) => {
                answered.store(true, Ordering::Release);
                // Still writing its body (or still running after it): the guest goes on as a task of
                // its own, so that the response can go out while it runs.
                guest.detach();
                Ok(response.map(|inner| GuestBody {
                    inner,
                    finished: Some(finished),
                }))
            }
            Err(code) => Err(InvokeError::failed(format!(
                "the function answered with an error: {}",
                describe(&code)
            ))),
        }
    }
}

/// How the guest's run ended: returned (with its own result) or timed out.
type GuestResult = Result<wasmtime::Result<()>, tokio::time::error::Elapsed>;
/// The run's end, and whether the guest had gone over its memory limit.
type GuestOutcome = (GuestResult, bool);
type GuestRun = Pin<Box<dyn Future<Output = GuestOutcome> + Send>>;

/// A guest's run, polled inline by the request until it is detached or ends. If the request is
/// dropped first (the client went away), the guest still runs to its end, in a task of its own,
/// as it would had it been spawned from the start.
struct InlineGuest(Option<GuestRun>);

impl InlineGuest {
    /// Polls the guest; `Some` with its outcome once it has ended.
    fn poll(&mut self, cx: &mut Context<'_>) -> Option<GuestOutcome> {
        let run = self.0.as_mut()?;
        let ended = run.as_mut().poll(cx);
        if ended.is_ready() {
            self.0 = None;
        }
        match ended {
            Poll::Ready(outcome) => Some(outcome),
            Poll::Pending => None,
        }
    }

    /// Lets the guest, if it has not ended, run on as its own task.
    fn detach(&mut self) {
        if let Some(run) = self.0.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(run);
            }
        }
    }
}

impl Drop for InlineGuest {
    fn drop(&mut self) {
        self.detach();
    }
}

/// A failure after the response started cannot change its status any more: the client sees the
/// body cut short, and the log says why.
fn log_failure_after_answer(f: &LoadedFunction, outcome: &GuestResult, stderr: &CappedOutput) {
    let error = match outcome {
        Ok(Ok(())) => return,
        Ok(Err(e)) => format!("{e:#}"),
        Err(_) => format!("ran past its timeout of {} ms", f.record.config.timeout_ms),
    };
    let stderr = stderr.tail(512);
    // The guest's text goes in quoted and escaped (`?`): a newline in it must not start a line of
    // the server's log that looks like the server's own.
    tracing::warn!(function = %f.record.name, error = ?error, stderr = ?stderr, "http trigger failed while streaming its response");
}

/// Why a guest ended without setting a response.
fn explain(
    (outcome, memory_exceeded): GuestOutcome,
    timeout_ms: u64,
    stdout: &CappedOutput,
    stderr: &CappedOutput,
) -> InvokeError {
    match outcome {
        Err(_elapsed) => InvokeError::Timeout(timeout_ms),
        Ok(Err(error)) => classify(error, timeout_ms, memory_exceeded, stdout, stderr),
        Ok(Ok(())) => InvokeError::Failed(Failure {
            message: "the function returned without setting a response".to_owned(),
            trap: None,
            exit_code: None,
            stderr_tail: stderr.tail(STDERR_TAIL),
        }),
    }
}

fn describe(code: &ErrorCode) -> String {
    format!("{code:?}")
}
