//! Lambda's `Invoke`: `RequestResponse` runs the function now (a handler's exception is `200`
//! with `X-Amz-Function-Error: Unhandled` and Lambda's error payload), `Event` queues it on
//! Kiln's durable queue (`202`), `DryRun` checks it could run (`204`). `LogType: Tail` returns
//! the last 4 KB of the log, base64, in `X-Amz-Log-Result`.

use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use kiln_core::auth::Principal;
use kiln_core::invocations::NewInvocation;
use kiln_core::lambda::WRAPPER;
use kiln_core::outcome::{InvokeError, Success};
use serde_json::{json, Value};

use super::{function_name, version_of, LambdaError};
use crate::api::body::Body;
use crate::Server;

/// Lambda's cap on the log tail it returns.
const TAIL_BYTES: usize = 4096;

pub async fn invoke(
    server: &Server,
    principal: &Principal,
    raw: &str,
    query: &str,
    headers: &HeaderMap,
    payload: Bytes,
    request_id: &str,
) -> Result<Response<Body>, LambdaError> {
    let (name, qualifier) = function_name(raw, query)?;
    if !principal.may_invoke(&name) {
        return Err(LambdaError::access_denied(format!(
            "this access key may not invoke {name}"
        )));
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let kind = header("x-amz-invocation-type").unwrap_or("RequestResponse");
    let tail = match header("x-amz-log-type").unwrap_or("None") {
        "None" => false,
        "Tail" => true,
        other => return Err(LambdaError::invalid(format!("LogType {other:?} is not None or Tail"))),
    };
    let kiln = &server.kiln;
    let version = version_of(qualifier.as_deref())?;
    let resolved = kiln.functions.resolve(&name, version).await.map_err(|e| match e {
        kiln_core::functions::LoadError::NoFunction(_) if server.lambda_creations.view(&name).is_some() => {
            let state = if server.lambda_creations.pending(&name) {
                "Pending"
            } else {
                "Failed"
            };
            LambdaError::conflict(super::creations::not_active(state))
        }
        kiln_core::functions::LoadError::NoFunction(_) | kiln_core::functions::LoadError::NoVersion(..) => {
            LambdaError::not_found(format!(
                "Function not found: {}",
                kiln_core::lambda::arn(&name, qualifier.as_deref())
            ))
        }
        other => LambdaError::from(kiln_core::problem::Problem::from(other)),
    })?;
    let record = resolved.function.record.clone();
    if resolved.function.is_http() {
        return Err(LambdaError::invalid(format!(
            "{name} is an HTTP-trigger function: call it at /fn/{name}/"
        )));
    }
    let executed = match &qualifier {
        Some(_) => record.version.to_string(),
        None => "$LATEST".to_owned(),
    };
    match kind {
        "DryRun" => {
            return Ok(answer(StatusCode::NO_CONTENT, Bytes::new(), &executed));
        }
        "Event" => {
            if payload.len() as u64 > server.config.max_async_input_bytes {
                return Err(LambdaError::from(crate::api::error::payload_too_large(
                    server.config.max_async_input_bytes,
                )));
            }
            // Run as Kiln's async invocations are: the plain event, retried when it fails.
            let id = kiln
                .queue
                .submit(NewInvocation {
                    function: name.clone(),
                    version: record.version,
                    input: payload,
                    idempotency_key: None,
                    max_attempts: 1 + record.config.retries,
                })
                .await
                .map_err(|e| LambdaError::from(kiln_core::problem::Problem::from(e)))?;
            let mut response = answer(StatusCode::ACCEPTED, Bytes::new(), &executed);
            if let Ok(value) = HeaderValue::from_str(&id) {
                response.headers_mut().insert("x-amzn-requestid", value);
            }
            return Ok(response);
        }
        "RequestResponse" => {}
        other => {
            return Err(LambdaError::invalid(format!(
                "InvocationType {other:?} is not RequestResponse, Event or DryRun"
            )))
        }
    }
    if payload.len() as u64 > server.config.max_sync_input_bytes {
        return Err(LambdaError::from(crate::api::error::payload_too_large(
            server.config.max_sync_input_bytes,
        )));
    }
    // The request id is the invocation's: Kiln's logs and records find it by the same name.
    let id = uuid::Uuid::parse_str(request_id).unwrap_or_else(|_| uuid::Uuid::now_v7());
    let wrapped = record.config.lambda.is_some();
    let input = if wrapped {
        let event: Value = if payload.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&payload)
                .map_err(|e| LambdaError::invalid(format!("Could not parse request body into json: {e}")))?
        };
        let client_context = header("x-amz-client-context").and_then(|c| {
            let bytes = base64::engine::general_purpose::STANDARD.decode(c).ok()?;
            serde_json::from_slice::<Value>(&bytes).ok()
        });
        let deadline_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis() as u64
            + record.config.timeout_ms;
        let context = json!({
            "request_id": request_id,
            "function_name": name,
            "function_version": executed,
            "memory_limit_in_mb": record.config.memory_mb,
            "invoked_function_arn": kiln_core::lambda::arn(&name, qualifier.as_deref()),
            "log_group_name": format!("/aws/lambda/{name}"),
            "log_stream_name": format!("kiln/{}", record.version),
            "deadline_ms": deadline_ms,
            "client_context": client_context,
        });
        Bytes::from(json!({ WRAPPER: context, "event": event }).to_string())
    } else {
        payload
    };
    let started = Instant::now();
    let outcome = match kiln.functions.admit(&resolved) {
        Ok(permits) => kiln.functions.run(&resolved, permits, &id.to_string(), input).await,
        Err(busy) => Err(busy),
    };
    let duration = started.elapsed();
    kiln.telemetry.sync_invocation(id, &record, &outcome, duration);
    let (mut response, log) = match outcome {
        Ok(Success { stdout, stderr_tail }) => {
            let (status_body, error) = if wrapped { unwrap(&stdout)? } else { (stdout, false) };
            let mut response = answer(StatusCode::OK, status_body, &executed);
            if error {
                response
                    .headers_mut()
                    .insert("x-amz-function-error", HeaderValue::from_static("Unhandled"));
            }
            (response, stderr_tail)
        }
        Err(e @ (InvokeError::FunctionBusy(..) | InvokeError::PoolBusy(_))) => {
            return Err(LambdaError::from(kiln_core::problem::Problem::from(e)))
        }
        Err(InvokeError::Timeout(ms)) => {
            let payload = json!({
                "errorType": "Sandbox.Timedout",
                "errorMessage": format!("{request_id} Task timed out after {:.2} seconds", ms as f64 / 1000.0),
            });
            (unhandled(&payload, &executed), String::new())
        }
        Err(InvokeError::Failed(failure)) => {
            let payload = json!({
                "errorType": "Runtime.ExitError",
                "errorMessage": failure.message,
                "stackTrace": failure.stderr_tail.lines().collect::<Vec<_>>(),
            });
            (unhandled(&payload, &executed), failure.stderr_tail)
        }
        Err(other) => return Err(LambdaError::from(kiln_core::problem::Problem::from(other))),
    };
    if tail {
        let text = format!(
            "START RequestId: {request_id} Version: {executed}\n{log}{}END RequestId: {request_id}\n\
             REPORT RequestId: {request_id}\tDuration: {:.2} ms\tBilled Duration: {} ms\tMemory Size: {} MB\n",
            if log.is_empty() || log.ends_with('\n') {
                ""
            } else {
                "\n"
            },
            duration.as_secs_f64() * 1000.0,
            duration.as_millis().max(1),
            record.config.memory_mb,
        );
        let mut start = text.len().saturating_sub(TAIL_BYTES);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        let encoded = base64::engine::general_purpose::STANDARD.encode(&text.as_bytes()[start..]);
        if let Ok(value) = HeaderValue::from_str(&encoded) {
            response.headers_mut().insert("x-amz-log-result", value);
        }
    }
    Ok(response)
}

/// The wrapped answer of a Lambda handler: its result, or its error payload (`true`).
fn unwrap(stdout: &[u8]) -> Result<(Bytes, bool), LambdaError> {
    let value: Value = serde_json::from_slice(stdout).map_err(LambdaError::internal)?;
    let inner = value
        .get(WRAPPER)
        .ok_or_else(|| LambdaError::internal("a Lambda handler answered without its wrapper"))?;
    if let Some(error) = inner.get("error") {
        return Ok((Bytes::from(error.to_string()), true));
    }
    let result = inner.get("result").cloned().unwrap_or(Value::Null);
    Ok((Bytes::from(result.to_string()), false))
}

fn unhandled(payload: &Value, executed: &str) -> Response<Body> {
    let mut response = answer(StatusCode::OK, Bytes::from(payload.to_string()), executed);
    response
        .headers_mut()
        .insert("x-amz-function-error", HeaderValue::from_static("Unhandled"));
    response
}

fn answer(status: StatusCode, body: Bytes, executed: &str) -> Response<Body> {
    let mut response = Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::new(body))
        .expect("static headers are valid");
    if let Ok(value) = HeaderValue::from_str(executed) {
        response.headers_mut().insert("x-amz-executed-version", value);
    }
    response
}
