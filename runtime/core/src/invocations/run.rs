//! Running one handed-out invocation, exactly as a sync invoke would, and shaping its outcome
//! for the ledger. Its error is the same object a sync invoke answers with (`Problem`).

use serde_json::json;

use super::{Claimed, Done, Outcome, Stored, INLINE_RESULT};
use crate::digest::Digest;
use crate::functions::LoadError;
use crate::kiln::Kiln;
use crate::outcome::InvokeError;
use crate::problem::{ErrorCode, Problem};
use crate::storage::BlobKind;
use crate::telemetry::metrics;

pub(super) async fn run(kiln: &Kiln, claimed: Claimed) -> Done {
    let started = std::time::Instant::now();
    let outcome = outcome(kiln, &claimed).await;
    let duration_us = started.elapsed().as_micros() as i64;
    let counters = &kiln.telemetry.metrics;
    let (observed, error) = match &outcome {
        Outcome::Succeeded { .. } => {
            counters.invocations_ok.inc();
            (Some(metrics::Outcome::Success), None)
        }
        Outcome::Failed { error, .. } if error["code"] == ErrorCode::Timeout.as_str() => {
            counters.invocations_timeout.inc();
            (Some(metrics::Outcome::Timeout), error["message"].as_str())
        }
        Outcome::Failed { error, .. } => {
            counters.invocations_failed.inc();
            (Some(metrics::Outcome::Failed), error["message"].as_str())
        }
        // Not run: it goes back to the queue.
        Outcome::Busy => {
            counters.invocations_rejected.inc();
            (None, None)
        }
    };
    if let Some(observed) = observed {
        let duration = std::time::Duration::from_micros(duration_us as u64);
        kiln.telemetry.async_run(
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

async fn outcome(kiln: &Kiln, claimed: &Claimed) -> Outcome {
    let resolved = match kiln.functions.resolve(&claimed.function, Some(claimed.version)).await {
        Ok(resolved) => resolved,
        Err(e @ (LoadError::NoFunction(_) | LoadError::NoVersion(..))) => {
            return Outcome::Failed {
                error: Problem::from(e).object(),
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
    match kiln
        .functions
        .invoke(&resolved, &claimed.id, claimed.input.clone())
        .await
    {
        Ok(success) => match store_result(kiln, success.stdout).await {
            Ok(result) => Outcome::Succeeded {
                result,
                stderr: success.stderr_tail,
            },
            Err(e) => {
                tracing::error!(error = %e, "storing an async result failed");
                let error = json!({"code": "internal", "message": "the result could not be stored"});
                Outcome::Failed {
                    error,
                    stderr: success.stderr_tail,
                    retry: true,
                }
            }
        },
        Err(e) if e.is_busy() => Outcome::Busy,
        // Deployed since the submit as an HTTP-trigger function: no retry can succeed.
        Err(e @ (InvokeError::HttpTrigger(_) | InvokeError::NotHttpTrigger(_))) => Outcome::Failed {
            error: Problem::from(e).object(),
            stderr: String::new(),
            retry: false,
        },
        Err(e) => {
            // The same error object a sync invoke answers with; stderr is kept in its own column.
            let stderr = match &e {
                InvokeError::Failed(failure) => failure.stderr_tail.clone(),
                _ => String::new(),
            };
            let mut error = Problem::from(e).object();
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

/// Small results go in the row; large ones to a content-addressed blob, durable before the row
/// that names it can be committed.
async fn store_result(kiln: &Kiln, result: bytes::Bytes) -> std::io::Result<Stored> {
    if result.len() <= INLINE_RESULT {
        return Ok(Stored::Inline(result));
    }
    let blobs = kiln.storage.blobs.clone();
    tokio::task::spawn_blocking(move || {
        let digest = Digest::of(&result);
        blobs.put(BlobKind::Result, &digest, &result)?;
        Ok(Stored::File(digest))
    })
    .await
    .expect("result writer panicked")
}
