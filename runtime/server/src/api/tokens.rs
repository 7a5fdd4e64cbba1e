//! Scoped tokens: `POST /v1/tokens` (create an invoke-only token for named functions; the secret
//! is in this answer only), `GET /v1/tokens` (list, without secrets), `DELETE /v1/tokens/{id}`
//! (revoke). Admin only. `authorize` is where a scoped token's limits are enforced.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use kiln_core::auth::{Auth, Principal, MAX_TOKEN_TTL_SECS};
use kiln_core::function::is_valid_function_name;
use kiln_core::problem::Problem;
use kiln_core::storage::Storage;
use kiln_core::telemetry::invocation_logs::InvocationLogs;
use serde::Deserialize;
use serde_json::json;

use super::body::{self, Body, BodyBudget};
use super::error::{self, forbidden};
use super::openapi::{ErrorBody, NewTokenRequest, TokenList, TokenView};

/// A token may name this many functions at most.
const MAX_FUNCTIONS: usize = 1000;

/// Lets the admin token through everything, and an invoke-only token through the invoke routes
/// of its own functions, the records and logs of their invocations, and the lists that show it
/// only those (invocations, the console's metrics, sandboxes).
pub async fn authorize(
    storage: &Storage,
    logs: &InvocationLogs,
    principal: &Principal,
    segments: &[&str],
    method: &Method,
) -> Result<(), Problem> {
    let invocation = match (principal, segments) {
        (Principal::Admin, _) => return Ok(()),
        (Principal::Invoke(_), ["v1", "functions", name, "invoke" | "invoke-async"]) if method == Method::POST => {
            return if principal.may_invoke(name) {
                Ok(())
            } else {
                Err(forbidden(format!("this token may not invoke `{name}`")))
            };
        }
        // The sandbox handlers check the function of the sandbox themselves; the invocation list
        // and the console's metrics show a scoped token its own functions only.
        (Principal::Invoke(_), ["v1", "sandboxes", ..]) => return Ok(()),
        (Principal::Invoke(_), ["v1", "invocations" | "metrics"]) if method == Method::GET => return Ok(()),
        (Principal::Invoke(_), ["v1", "invocations", id] | ["v1", "invocations", id, "logs"])
            if method == Method::GET =>
        {
            (*id).to_owned()
        }
        (Principal::Invoke(_), _) => return Err(forbidden("this token may only invoke its functions")),
    };
    // Whose invocation is it? A sync one just finished may still be on its way to the disk.
    let (metadata, logs) = (storage.metadata.clone(), logs.clone());
    let function = tokio::task::spawn_blocking(move || {
        let lookup = || metadata.invocation_function(&invocation);
        match lookup()? {
            Some(function) => Ok(Some(function)),
            None => {
                logs.flush();
                lookup()
            }
        }
    })
    .await
    .expect("store task panicked")
    .map_err(Problem::from)?;
    match function {
        // Unknown: the handler answers 404, as it would to anyone.
        None => Ok(()),
        Some(function) if principal.may_invoke(&function) => Ok(()),
        Some(_) => Err(forbidden(
            "this invocation belongs to a function this token may not invoke",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    /// `bearer` (default) or `aws`: an access key and secret for the Lambda API (SigV4).
    #[serde(default)]
    kind: Option<String>,
    /// As sent: the limit counts what was sent, repeats included (the document's `maxItems`).
    /// An AWS key without functions (absent or null) has the admin's rights.
    #[serde(default)]
    functions: Option<Vec<String>>,
    /// Seconds the token is valid for; without it, until revoked.
    #[serde(default)]
    ttl_s: Option<u64>,
}

/// Unix seconds as the API shows times.
fn rfc3339(unix_secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_secs as i64)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = NewTokenRequest,
    responses((status = 201, description = "The token; its secret is shown only here", body = TokenView),
        (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
pub async fn create(
    auth: &Arc<Auth>,
    storage: &Storage,
    budget: &BodyBudget,
    req: Request<Incoming>,
) -> Result<Response<Body>, Problem> {
    let (parts, incoming) = req.into_parts();
    let (bytes, _held) = body::read(&parts.headers, incoming, 64 * 1024, Duration::from_secs(10), budget).await?;
    let request: NewToken = kiln_core::json::from_slice(&bytes).map_err(|e| {
        error::invalid_request(format!(
            "expected {{\"functions\": [names], \"ttl_s\": seconds}} or {{\"kind\": \"aws\", ...}}: {e}"
        ))
    })?;
    let aws = match request.kind.as_deref() {
        None | Some("bearer") => false,
        Some("aws") => true,
        Some(other) => return Err(error::invalid_request(format!("kind {other:?} is not bearer or aws"))),
    };
    let ttl = match request.ttl_s {
        None => None,
        Some(seconds) if (1..=MAX_TOKEN_TTL_SECS).contains(&seconds) => Some(Duration::from_secs(seconds)),
        Some(_) => {
            return Err(error::invalid_request(format!(
                "ttl_s must be between 1 and {MAX_TOKEN_TTL_SECS} seconds"
            )))
        }
    };
    // Absent: an AWS key with the admin's rights; a bearer token must name its functions.
    let functions = match request.functions {
        None if aws => Vec::new(),
        functions => functions
            .filter(|f| (1..=MAX_FUNCTIONS).contains(&f.len()))
            .ok_or_else(|| error::invalid_request(format!("functions must name 1 to {MAX_FUNCTIONS} functions")))?,
    };
    if let Some(bad) = functions.iter().find(|n| !is_valid_function_name(n)) {
        return Err(error::invalid_request(format!(
            "invalid function name {bad:?}: names match ^[a-z0-9][a-z0-9_-]{{0,63}}$"
        )));
    }
    let functions: BTreeSet<String> = functions.into_iter().collect();
    let (auth, metadata) = (auth.clone(), storage.metadata.clone());
    let (token, secret, created_at) = tokio::task::spawn_blocking(move || {
        if aws {
            auth.create_aws_key(metadata.as_ref(), functions, ttl)
        } else {
            auth.create_scoped(metadata.as_ref(), functions, ttl)
        }
    })
    .await
    .expect("token task panicked")
    .map_err(Problem::from)?;
    let mut view = view(&token, &created_at);
    match &token.access_key_id {
        // The secret AWS clients sign with; `token` stays absent (it is no bearer token).
        Some(_) => view["secret_access_key"] = json!(secret),
        None => view["token"] = json!(secret),
    }
    Ok(body::json(StatusCode::CREATED, &view))
}

/// A token as the API shows it, without its secret.
fn view(token: &kiln_core::auth::ScopedToken, created_at: &str) -> serde_json::Value {
    let mut view = json!({
        "id": token.id,
        "kind": if token.access_key_id.is_some() { "aws" } else { "bearer" },
        "scope": if token.admin { "admin" } else { "invoke" },
        "functions": token.functions,
        "created_at": created_at,
        "expires_at": token.expires_at.map(rfc3339),
    });
    if let Some(key_id) = &token.access_key_id {
        view["access_key_id"] = json!(key_id);
    }
    view
}

#[utoipa::path(get, path = "/v1/tokens", tag = "tokens",
    responses((status = 200, description = "Scoped tokens, without secrets", body = TokenList), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
pub async fn list(auth: &Arc<Auth>, storage: &Storage) -> Result<Response<Body>, Problem> {
    let (auth, metadata) = (auth.clone(), storage.metadata.clone());
    let tokens = tokio::task::spawn_blocking(move || auth.list_scoped(metadata.as_ref()))
        .await
        .expect("token task panicked")
        .map_err(Problem::from)?;
    let tokens: Vec<_> = tokens
        .into_iter()
        .map(|(token, created_at)| view(&token, &created_at))
        .collect();
    Ok(body::json(StatusCode::OK, &json!({ "tokens": tokens })))
}

#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "Token id")),
    responses((status = 204, description = "Revoked"), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody), (status = 404, description = "No such token", body = ErrorBody)))]
pub async fn delete(auth: &Arc<Auth>, storage: &Storage, id: &str) -> Result<Response<Body>, Problem> {
    let (auth, metadata) = (auth.clone(), storage.metadata.clone());
    let owned = id.to_owned();
    let deleted = tokio::task::spawn_blocking(move || auth.revoke(metadata.as_ref(), &owned))
        .await
        .expect("token task panicked")
        .map_err(Problem::from)?;
    if !deleted {
        return Err(error::not_found(format!("no token {id:?}")));
    }
    Ok(Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Body::default())
        .expect("static response"))
}
