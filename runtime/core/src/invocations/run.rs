//! Running one handed-out invocation, exactly as a sync invoke would, and shaping its outcome
//! for the ledger.

use serde_json::json;

use super::{Claimed, Done, Outcome, Stored, INLINE_RESULT};
use crate::api::error::ApiError;
use crate::app::{App, LoadError};
use crate::invoke::{self, InvokeError, STDERR_TAIL};
use crate::metrics;
use crate::store::files::Digest;

pub(super) async fn run(app: &App, claimed: Claimed) -> Done {
    let started = std::time::Instant::now();
    let outcome = outcome(app, &claimed).await;
    let duration_us = started.elapsed().as_micros() as i64;
    let (observed, error) = match &outcome {
        Outcome::Succeeded { .. } => {
            app.metrics.invocations_ok.inc();
            (Some(metrics::Outcome::Success), None)
        }
        Outcome::Failed { error, .. } if error["code"] == "timeout" => {
            app.metrics.invocations_timeout.inc();
            (Some(metrics::Outcome::Timeout), error["message"].as_str())
        }
        Outcome::Failed { error, .. } => {
            app.metrics.invocations_failed.inc();
            (Some(metrics::Outcome::Failed), error["message"].as_str())
        }
        // Not run: it goes back to the queue.
        Outcome::Busy => (None, None),
    };
    if let Some(observed) = observed {
        let duration = std::time::Duration::from_micros(duration_us as u64);
        crate::observe::async_run(
            app,
            &claimed.id,
            &claimed.function,
            claimed.version,
            observed,
            duration,
            error,
        );
    }
    Done {
        claimed,
        outcome,
        duration_us,
    }
}

async fn outcome(app: &App, claimed: &Claimed) -> Outcome {
    let (function, concurrency) = match app.resolve(&claimed.function, Some(claimed.version)).await {
        Ok(resolved) => resolved,
        Err(e @ (LoadError::NoFunction(_) | LoadError::NoVersion(..))) => {
            let error = json!({"code": "not_found", "message": e.to_string()});
            return Outcome::Failed {
                error,
                stderr: String::new(),
                retry: false,
            };
        }
        Err(e) => {
            tracing::error!(error = %e, "loading a function for an async invocation failed");
            let error = json!({"code": "internal", "message": "the function could not be loaded"});
            return Outcome::Failed {
                error,
                stderr: String::new(),
                retry: true,
            };
        }
    };
    match invoke::invoke(app, &function, &concurrency, claimed.input.clone()).await {
        Ok(success) => {
            let stderr = success.stderr.tail(STDERR_TAIL);
            match store_result(app, success.stdout).await {
                Ok(result) => Outcome::Succeeded { result, stderr },
                Err(e) => {
                    tracing::error!(error = %e, "storing an async result failed");
                    let error = json!({"code": "internal", "message": "the result could not be stored"});
                    Outcome::Failed {
                        error,
                        stderr,
                        retry: true,
                    }
                }
            }
        }
        Err(InvokeError::FunctionBusy(..) | InvokeError::PoolBusy(_)) => Outcome::Busy,
        // Deployed since the submit as an HTTP-trigger function: no retry can succeed.
        Err(e @ (InvokeError::HttpTrigger(_) | InvokeError::NotHttpTrigger(_))) => Outcome::Failed {
            error: ApiError::from(e).object(),
            stderr: String::new(),
            retry: false,
        },
        Err(e) => {
            // The same error object a sync invoke answers with; stderr is kept in its own column.
            let stderr = match &e {
                InvokeError::Failed(failure) => failure.stderr_tail.clone(),
                _ => String::new(),
            };
            let mut error = ApiError::from(e).object();
            if let Some(object) = error.as_object_mut() {
                object.remove("stderr");
            }
            Outcome::Failed {
                error,
                stderr,
                retry: true,
            }
        }
    }
}

/// Small results go in the row; large ones to a content-addressed file, synced before the row
/// that names it can be committed.
async fn store_result(app: &App, result: bytes::Bytes) -> std::io::Result<Stored> {
    if result.len() <= INLINE_RESULT {
        return Ok(Stored::Inline(result));
    }
    let layout = app.layout.clone();
    tokio::task::spawn_blocking(move || {
        let digest = Digest::of(&result);
        layout.write_result(&digest, &result)?;
        Ok(Stored::File(digest))
    })
    .await
    .expect("result writer panicked")
}
