//! Asynchronous invocations: submit, the record, and the result behind a signed URL; and the list
//! of invocations, sync and async.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use kiln_core::auth::Principal;
use kiln_core::function::is_valid_function_name;
use kiln_core::functions::Functions;
use kiln_core::invocations::{Mode, NewInvocation, Query, Queue, STATES};
use kiln_core::outcome::InvokeError;
use kiln_core::problem::Problem;
use kiln_core::signing::{self, Refused, Signer};
use kiln_core::storage::{BlobKind, Storage, StoredResult};
use kiln_core::telemetry::recent::QuietSuccesses;
use serde_json::json;

use super::body::{self, Body, BodyBudget, FileBody};
use super::error;
use super::openapi::{ErrorBody, Invocation, Submitted};
use crate::ServerConfig;

const IDEMPOTENCY_KEY: &str = "idempotency-key";

#[utoipa::path(post, path = "/v1/functions/{name}/invoke-async", tag = "invoke", params(("name" = String, Path, description = "Function name", pattern = r"^[a-z0-9][a-z0-9_-]{0,63}$", max_length = 64), ("version" = Option<u32>, Query, minimum = 1, description = "Run this version instead of the latest"),
        ("Idempotency-Key" = Option<String>, Header, pattern = r"^[!-~]{1,255}$", description = "A retried submit with the same key returns the same id")),
    request_body(content = String, content_type = "application/octet-stream", description = "The guest's stdin"),
    responses((status = 202, description = "Committed to disk", body = Submitted),
        (status = 400, description = "Not a function name, or a bad `version`", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody),
        (status = 404, description = "No such function or version", body = ErrorBody),
        (status = 413, description = "Input over the limit", body = ErrorBody),
        (status = 429, description = "The queue is full", body = ErrorBody)))]
pub async fn submit(
    functions: &Functions,
    queue: &Queue,
    limits: &ServerConfig,
    budget: &BodyBudget,
    name: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, Problem> {
    let version = super::version_param(req.uri().query())?;
    // Resolving loads the code now, so a submit for a missing function fails here, not later.
    let function = functions.resolve(name, version).await?.function;
    if function.is_http() {
        return Err(InvokeError::HttpTrigger(name.to_owned()).into());
    }
    let idempotency_key = match req.headers().get(IDEMPOTENCY_KEY) {
        None => None,
        Some(value) => {
            let key = value.to_str().ok().filter(|k| !k.is_empty() && k.len() <= 255);
            Some(
                key.ok_or_else(|| error::invalid_request("Idempotency-Key must be 1 to 255 visible ASCII characters"))?
                    .to_owned(),
            )
        }
    };
    let (parts, incoming) = req.into_parts();
    let (input, _held) = body::read(
        &parts.headers,
        incoming,
        limits.max_async_input_bytes,
        limits.body_read_timeout,
        budget,
    )
    .await?;
    let invocation = NewInvocation {
        function: name.to_owned(),
        version: function.record.version,
        input,
        idempotency_key,
        max_attempts: 1 + function.record.config.retries,
    };
    let id = queue.submit(invocation).await?;
    let status_url = format!("/v1/invocations/{id}");
    let mut response = body::json(StatusCode::ACCEPTED, &json!({ "id": id, "status_url": status_url }));
    response
        .headers_mut()
        .insert(header::LOCATION, status_url.parse().expect("ASCII path"));
    Ok(response)
}

/// Invocation ids are UUIDs; anything else never touches the database.
pub(super) fn valid_id(id: &str) -> Result<(), Problem> {
    match uuid::Uuid::try_parse(id) {
        Ok(parsed) if parsed.hyphenated().to_string() == id => Ok(()),
        _ => Err(error::not_found(format!("no invocation {id:?}"))),
    }
}

/// `expires_in` (seconds) sets the result URL's lifetime: default 15 minutes, at most 7 days.
pub(super) fn url_lifetime(query: Option<&str>) -> Result<Duration, Problem> {
    let mut lifetime = signing::DEFAULT_LIFETIME;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("expires_in", v)) => {
                let seconds = v
                    .parse::<u64>()
                    .ok()
                    .filter(|s| (1..=signing::MAX_LIFETIME.as_secs()).contains(s));
                lifetime = Duration::from_secs(seconds.ok_or_else(|| {
                    error::invalid_request(format!(
                        "expires_in must be between 1 and {} seconds",
                        signing::MAX_LIFETIME.as_secs()
                    ))
                })?);
            }
            _ => return Err(error::invalid_request(format!("unknown query parameter {pair:?}"))),
        }
    }
    Ok(lifetime)
}

#[utoipa::path(get, path = "/v1/invocations/{id}", tag = "invoke", params(("id" = String, Path, description = "Invocation id (a UUID)"),
        ("expires_in" = Option<u64>, Query, description = "Lifetime of the result URL in seconds")),
    responses((status = 200, description = "The invocation's record", body = Invocation),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody), (status = 404, description = "No such invocation", body = ErrorBody)))]
pub async fn get(storage: &Storage, signer: &Signer, id: &str, query: Option<&str>) -> Result<Response<Body>, Problem> {
    valid_id(id)?;
    let lifetime = url_lifetime(query)?;
    let metadata = storage.metadata.clone();
    let owned = id.to_owned();
    let record = tokio::task::spawn_blocking(move || metadata.invocation(&owned))
        .await
        .expect("store task panicked")
        .map_err(Problem::from)?
        .ok_or_else(|| error::not_found(format!("no invocation {id}")))?;
    let result_url = (record.state == "succeeded").then(|| signer.url(&record.id, lifetime));
    /// The record as the API shows it, in the contract's field order.
    #[derive(serde::Serialize)]
    struct View {
        id: String,
        function: String,
        version: u32,
        state: String,
        attempts: u32,
        created_at: String,
        finished_at: Option<String>,
        duration_us: Option<i64>,
        error: Option<serde_json::Value>,
        stderr: Option<String>,
        result_url: Option<String>,
    }
    let view = View {
        id: record.id,
        function: record.function,
        version: record.version,
        state: record.state,
        attempts: record.attempts,
        created_at: record.created_at,
        finished_at: record.finished_at,
        duration_us: record.duration_us,
        error: record.error,
        stderr: record.stderr,
        result_url,
    };
    Ok(body::json(StatusCode::OK, &view))
}

#[utoipa::path(get, path = "/v1/results/{id}", tag = "invoke", security(()), params(("id" = String, Path, description = "Invocation id (a UUID)"),
        ("expires" = u64, Query, description = "Unix seconds"), ("sig" = String, Query, description = "HMAC signature")),
    responses((status = 200, description = "The function's output", content_type = "application/octet-stream"),
        (status = 403, description = "Bad or expired signature", body = ErrorBody),
        (status = 404, description = "No longer kept", body = ErrorBody)))]
pub async fn result(
    signer: &Signer,
    storage: &Storage,
    id: &str,
    query: Option<&str>,
) -> Result<Response<Body>, Problem> {
    signer.verify(id, query).map_err(|refused| {
        error::forbidden(match refused {
            Refused::Expired => "the result URL has expired; fetch the invocation again for a new one",
            Refused::Malformed | Refused::BadSignature => "the result URL is not valid",
        })
    })?;
    let (metadata, blobs) = (storage.metadata.clone(), storage.blobs.clone());
    let owned = id.to_owned();
    let result = tokio::task::spawn_blocking(move || -> Result<Option<Body>, String> {
        match metadata.invocation_result(&owned).map_err(|e| e.to_string())? {
            None => Ok(None),
            Some(StoredResult::Inline(bytes)) => Ok(Some(Body::new(Bytes::from(bytes)))),
            Some(StoredResult::Blob(digest)) => blobs
                .open(BlobKind::Result, &digest)
                .and_then(FileBody::new)
                .map(|file| Some(Body::File(file)))
                .map_err(|e| format!("opening the result blob: {e}")),
        }
    })
    .await
    .expect("store task panicked")
    .map_err(Problem::internal)?
    .ok_or_else(|| error::not_found("the result is no longer kept"))?;
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(result)
        .expect("static headers are valid"))
}

/// One line of `GET /v1/invocations`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(super) struct SummaryView {
    id: String,
    function: String,
    version: u32,
    /// `sync` or `async`.
    mode: &'static str,
    /// `queued`, `running`, `succeeded` or `failed`.
    state: String,
    created_at: String,
    duration_us: Option<i64>,
    /// Asynchronous only: runs so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<u32>,
    /// Synchronous only: `success`, `failed` or `timeout`.
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<String>,
    /// Asynchronous only: the record, with the result URL once succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    status_url: Option<String>,
    /// Present when a log is kept (every asynchronous invocation; synchronous ones that failed or
    /// wrote to stderr).
    #[serde(skip_serializing_if = "Option::is_none")]
    logs_url: Option<String>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub(super) struct InvocationList {
    invocations: Vec<SummaryView>,
    /// The `before` of the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_before: Option<String>,
}

/// A page holds this many invocations unless `limit` says otherwise, and at most [`MAX_LIMIT`].
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 1000;

/// The query of `GET /v1/invocations`; unknown parameters are refused so a typo is not ignored.
fn list_query(query: Option<&str>) -> Result<(Option<String>, Query), Problem> {
    let mut function = None;
    let mut list = Query {
        limit: DEFAULT_LIMIT,
        ..Query::default()
    };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("function", name)) if is_valid_function_name(name) => function = Some(name.to_owned()),
            Some(("state", state)) if STATES.contains(&state) => list.state = Some(state.to_owned()),
            Some(("limit", n)) => {
                list.limit = n
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| error::invalid_request(format!("limit must be between 1 and {MAX_LIMIT}")))?;
            }
            Some(("before", id)) => {
                // Any spelling of a UUID, compared as the store writes ids (lowercase, hyphenated).
                let parsed = uuid::Uuid::try_parse(id)
                    .map_err(|_| error::invalid_request(format!("before must be an invocation id, not {id:?}")))?;
                list.before = Some(parsed.hyphenated().to_string());
            }
            _ => return Err(error::invalid_request(format!("unknown query parameter {pair:?}"))),
        }
    }
    Ok((function, list))
}

#[utoipa::path(get, path = "/v1/invocations", tag = "invoke",
    params(("function" = Option<String>, Query, description = "Only this function's", pattern = r"^[a-z0-9][a-z0-9_-]{0,63}$", max_length = 64),
        ("state" = Option<String>, Query, description = "Only those in this state", pattern = "^(queued|running|succeeded|failed)$"),
        ("limit" = Option<usize>, Query, description = "At most this many [50]", minimum = 1, maximum = 1000),
        ("before" = Option<String>, Query, description = "Only those older than this invocation (the previous page's `next_before`)", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses((status = 200, description = "Invocations, newest first: every asynchronous one, the synchronous ones with a kept log, and the newest synchronous successes that wrote nothing to stderr (kept in memory, the last 10,000). A scoped token sees its functions' only.", body = InvocationList),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody)))]
pub async fn list(
    storage: &Storage,
    quiet: &QuietSuccesses,
    principal: &Principal,
    query: Option<&str>,
) -> Result<Response<Body>, Problem> {
    let (function, mut query) = list_query(query)?;
    // A scoped token lists its own functions' invocations only, as it lists sandboxes.
    query.functions = match (principal, function) {
        (Principal::Admin, function) => function.map(|f| vec![f]),
        (Principal::Invoke(token), Some(f)) => Some(if token.functions.contains(&f) { vec![f] } else { vec![] }),
        (Principal::Invoke(token), None) => Some(token.functions.iter().cloned().collect()),
    };
    if query.functions.as_ref().is_some_and(Vec::is_empty) {
        return Ok(body::json(StatusCode::OK, &json!({ "invocations": [] })));
    }
    let metadata = storage.metadata.clone();
    let stored_query = query.clone();
    let mut found = tokio::task::spawn_blocking(move || metadata.invocations(&stored_query))
        .await
        .expect("store task panicked")
        .map_err(Problem::from)?;
    found.extend(quiet.list(&query));
    found.sort_by(|a, b| b.id.cmp(&a.id));
    found.truncate(query.limit);
    let next_before = (found.len() == query.limit).then(|| found[found.len() - 1].id.clone());
    let invocations = found
        .into_iter()
        .map(|s| {
            let asynchronous = s.mode == Mode::Async;
            SummaryView {
                status_url: asynchronous.then(|| format!("/v1/invocations/{}", s.id)),
                logs_url: s.log_kept.then(|| format!("/v1/invocations/{}/logs", s.id)),
                created_at: rfc3339_ms(s.created_ms),
                id: s.id,
                function: s.function,
                version: s.version,
                mode: s.mode.as_str(),
                state: s.state,
                duration_us: s.duration_us,
                attempts: s.attempts,
                outcome: s.outcome,
            }
        })
        .collect();
    Ok(body::json(
        StatusCode::OK,
        &InvocationList {
            invocations,
            next_before,
        },
    ))
}

/// Unix milliseconds as the API shows times (RFC 3339, UTC, to the millisecond).
fn rfc3339_ms(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}
