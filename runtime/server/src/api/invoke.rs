//! Synchronous invoke: the request body is the guest's stdin, its stdout the response body.

use std::time::{Duration, Instant};

use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use kiln_core::functions::Functions;
use kiln_core::problem::Problem;
use kiln_core::telemetry::Telemetry;

use super::body::{self, Body, BodyBudget};
use super::openapi::ErrorBody;
use crate::ServerConfig;

pub(super) const INVOCATION_ID: &str = "x-kiln-invocation-id";
pub(super) const VERSION: &str = "x-kiln-version";
const DURATION_US: &str = "x-kiln-duration-us";

#[utoipa::path(post, path = "/v1/functions/{name}/invoke", tag = "invoke", params(("name" = String, Path, description = "Function name", pattern = r"^[a-z0-9][a-z0-9_-]{0,63}$", max_length = 64), ("version" = Option<u32>, Query, minimum = 1, description = "Run this version instead of the latest")),
    request_body(content = String, content_type = "application/octet-stream", description = "The guest's stdin"),
    responses(
        (status = 200, description = "The guest's stdout", content_type = "application/octet-stream",
            headers(("X-Kiln-Invocation-Id" = String), ("X-Kiln-Version" = u32), ("X-Kiln-Duration-Us" = u64))),
        (status = 400, description = "Not a function name, or a bad `version`", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody),
        (status = 404, description = "No such function or version", body = ErrorBody),
        (status = 413, description = "Input over the limit", body = ErrorBody),
        (status = 429, description = "Concurrency limit reached", body = ErrorBody),
        (status = 502, description = "The function failed", body = ErrorBody),
        (status = 504, description = "The function ran past its timeout", body = ErrorBody)))]
pub async fn sync(
    functions: &Functions,
    telemetry: &Telemetry,
    limits: &ServerConfig,
    budget: &BodyBudget,
    name: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, Problem> {
    let version = super::version_param(req.uri().query())?;
    let resolved = functions.resolve(name, version).await?;
    let id = uuid::Uuid::now_v7();
    // Permits first, then the input: a refused invocation costs no buffered body.
    let (outcome, duration) = match functions.admit(&resolved) {
        Err(refused) => (Err(refused), Duration::ZERO),
        Ok(permits) => {
            let (parts, incoming) = req.into_parts();
            let (input, _held) = body::read(
                &parts.headers,
                incoming,
                limits.max_sync_input_bytes,
                limits.body_read_timeout,
                budget,
            )
            .await?;
            let started = Instant::now();
            let outcome = functions.run(&resolved, permits, &id.to_string(), input).await;
            (outcome, started.elapsed())
        }
    };
    let record = &resolved.function.record;
    telemetry.sync_invocation(id, record, &outcome, duration);
    // A function from source answers the JSON its handler returned.
    let content_type = match record.config.runtime {
        Some(_) => "application/json",
        None => "application/octet-stream",
    };
    let mut response = match outcome {
        Ok(success) => Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::new(success.stdout))
            .expect("static headers are valid"),
        Err(e) => body::error(&Problem::from(e)),
    };
    let headers = response.headers_mut();
    let mut buf = uuid::Uuid::encode_buffer();
    let id_text = id.as_hyphenated().encode_lower(&mut buf);
    headers.insert(INVOCATION_ID, HeaderValue::from_str(id_text).expect("uuid is ASCII"));
    headers.insert(VERSION, HeaderValue::from(record.version));
    headers.insert(DURATION_US, HeaderValue::from(duration.as_micros() as u64));
    Ok(response)
}
