//! Sandboxes (`../shared/API.md`, "Sandboxes"): `POST /v1/sandboxes`, list and get, suspend,
//! resume, fork, terminate, tokens; and ingress, `ANY /sbx/{id}/{*path}`, forwarded to the
//! sandbox's instance. The lifecycle is `kiln_core::sandboxes`; this is its HTTP shape.

use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use kiln_core::auth::{Auth, Principal};
use kiln_core::function::is_valid_function_name;
use kiln_core::problem::Problem;
use kiln_core::sandboxes::record::{Sandbox, Scope, Settings, State};
use kiln_core::sandboxes::{is_valid_id, NewSandbox, Sandboxes};
use kiln_core::tier::wasm::sandbox::IngressBody;
use serde::Deserialize;
use serde_json::{json, Value};
use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;

use super::body::{self, Body, BodyBudget};
use super::error;
use super::openapi::{ErrorBody, SandboxList, SandboxView, TokenForSandbox};

/// The sandbox token header: the app's own `Authorization` passes through untouched beside it.
const SANDBOX_TOKEN: &str = "x-kiln-sandbox-token";
/// Browsers' websockets cannot send headers: the token may come as this subprotocol prefix.
pub(super) const TOKEN_PROTOCOL: &str = "kiln.token.";
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// A sandbox as the API shows it.
pub fn view(sandboxes: &Sandboxes, sandbox: &Sandbox) -> Value {
    let now = sandboxes.now_ms();
    let last_active = time::OffsetDateTime::from_unix_timestamp_nanos(sandbox.last_active_ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok());
    json!({
        "id": sandbox.id,
        "function": sandbox.function,
        "version": sandbox.version,
        "tier": sandbox.tier.as_str(),
        "state": sandbox.state.as_str(),
        "created_at": sandbox.created_at,
        "last_active_at": last_active,
        "running_s": sandbox.running_ms_at(now) as f64 / 1000.0,
        "suspended_s": sandbox.suspended_ms_at(now) as f64 / 1000.0,
        "state_bytes": sandbox.state_bytes,
        "ingress_url": format!("/sbx/{}/", sandbox.id),
        "error": sandbox.error,
        "metadata": sandbox.settings.metadata,
        "idle_timeout_s": sandbox.settings.idle_timeout_s,
        "on_idle": sandbox.settings.on_idle,
        "max_lifetime_s": sandbox.settings.max_lifetime_s,
        "ingress": sandbox.settings.ingress,
        "suspended_at": sandbox.suspended_at,
        "resumed_from": sandbox.resumed_from,
    })
}

/// Who may manage `sandbox`: the admin token, or a token scoped to its function.
fn authorize(principal: &Principal, function: &str) -> Result<(), Problem> {
    if principal.may_invoke(function) {
        Ok(())
    } else {
        Err(error::forbidden(format!(
            "this token may not manage sandboxes of `{function}`"
        )))
    }
}

fn valid(id: &str) -> Result<(), Problem> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(error::not_found(format!("no sandbox {id:?}")))
    }
}

/// The creation request: a function, and the sandbox's settings.
#[derive(Deserialize)]
struct Create {
    function: String,
    #[serde(default)]
    version: Option<u32>,
    #[serde(flatten)]
    settings: Value,
}

#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes",
    params(("Idempotency-Key" = Option<String>, Header, pattern = r"^[!-~]{1,255}$", description = "A retried create with the same key returns the same sandbox")),
    request_body(content = super::openapi::NewSandbox, description = "`function` (required), `version`, and the settings"),
    responses((status = 201, description = "Created and running", body = SandboxView),
        (status = 200, description = "The sandbox this Idempotency-Key created before", body = SandboxView),
        (status = 400, description = "Bad request, or not an HTTP-trigger function", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody),
        (status = 404, description = "No such function or version", body = ErrorBody),
        (status = 429, description = "The server runs its maximum of sandboxes", body = ErrorBody),
        (status = 503, description = "The tier cannot run sandboxes here", body = ErrorBody)))]
pub async fn create(
    sandboxes: &Sandboxes,
    principal: &Principal,
    budget: &BodyBudget,
    req: Request<Incoming>,
) -> Result<Response<Body>, Problem> {
    let idempotency_key = match req.headers().get(IDEMPOTENCY_KEY) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 255)
                .ok_or_else(|| error::invalid_request("Idempotency-Key must be 1 to 255 visible ASCII characters"))?
                .to_owned(),
        ),
    };
    let (parts, incoming) = req.into_parts();
    let (bytes, _held) = body::read(&parts.headers, incoming, 64 * 1024, Duration::from_secs(10), budget).await?;
    let request: Create = kiln_core::json::from_slice(&bytes)
        .map_err(|e| error::invalid_request(format!("expected {{\"function\": name, ...settings}}: {e}")))?;
    if !is_valid_function_name(&request.function) {
        return Err(error::invalid_function_name(&request.function));
    }
    authorize(principal, &request.function)?;
    let settings: Settings = serde_json::from_value(request.settings)
        .map_err(|e| error::invalid_request(format!("sandbox settings: {e}")))?;
    let (sandbox, created) = sandboxes
        .create(NewSandbox {
            function: request.function,
            version: request.version,
            settings,
            idempotency_key,
        })
        .await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok(body::json(status, &view(sandboxes, &sandbox)))
}

#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",
    params(("function" = Option<String>, Query, pattern = r"^[a-z0-9][a-z0-9_-]{0,63}$", max_length = 64, description = "Only this function's"), ("state" = Option<State>, Query, description = "Only those in this state")),
    responses((status = 200, description = "Sandboxes, oldest first", body = SandboxList),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
pub async fn list(
    sandboxes: &Sandboxes,
    principal: &Principal,
    query: Option<&str>,
) -> Result<Response<Body>, Problem> {
    let (mut function, mut state) = (None, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("function", name)) if is_valid_function_name(name) => function = Some(name.to_owned()),
            Some(("state", name)) => {
                state =
                    Some(State::parse(name).ok_or_else(|| error::invalid_request(format!("unknown state {name:?}")))?)
            }
            _ => return Err(error::invalid_request(format!("unknown query parameter {pair:?}"))),
        }
    }
    let all = sandboxes.list(function, state).await?;
    let visible: Vec<Value> = all
        .iter()
        .filter(|s| principal.may_invoke(&s.function))
        .map(|s| view(sandboxes, s))
        .collect();
    Ok(body::json(StatusCode::OK, &json!({ "sandboxes": visible })))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id, sbx_ and 26 characters")),
    responses((status = 200, description = "The sandbox's record", body = SandboxView),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody)))]
pub async fn get(sandboxes: &Sandboxes, principal: &Principal, id: &str) -> Result<Response<Body>, Problem> {
    valid(id)?;
    let sandbox = sandboxes.get(id).await?;
    authorize(principal, &sandbox.function)?;
    Ok(body::json(StatusCode::OK, &view(sandboxes, &sandbox)))
}

/// What `POST /v1/sandboxes/{id}/{action}` does.
pub enum Action {
    Suspend,
    Resume,
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/suspend", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, description = "Suspended: its state is on disk, its instance gone", body = SandboxView),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "Not running, or not at a point where it can be suspended", body = ErrorBody)))]
pub async fn suspend(sandboxes: &Sandboxes, principal: &Principal, id: &str) -> Result<Response<Body>, Problem> {
    transition(sandboxes, principal, id, Action::Suspend).await
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, description = "Running again, with its state", body = SandboxView),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "Not suspended", body = ErrorBody),
        (status = 429, description = "The server runs its maximum of sandboxes", body = ErrorBody)))]
pub async fn resume(sandboxes: &Sandboxes, principal: &Principal, id: &str) -> Result<Response<Body>, Problem> {
    transition(sandboxes, principal, id, Action::Resume).await
}

async fn transition(
    sandboxes: &Sandboxes,
    principal: &Principal,
    id: &str,
    action: Action,
) -> Result<Response<Body>, Problem> {
    valid(id)?;
    authorize(principal, &sandboxes.gate(id).await?.function)?;
    let sandbox = match action {
        Action::Suspend => sandboxes.suspend(id).await?,
        Action::Resume => sandboxes.resume(id).await?,
    };
    Ok(body::json(StatusCode::OK, &view(sandboxes, &sandbox)))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, description = "Terminated: the final record; its state on disk is deleted", body = SandboxView),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody), (status = 409, description = "Already terminated or failed", body = ErrorBody)))]
pub async fn terminate(sandboxes: &Sandboxes, principal: &Principal, id: &str) -> Result<Response<Body>, Problem> {
    valid(id)?;
    authorize(principal, &sandboxes.gate(id).await?.function)?;
    let sandbox = sandboxes.terminate(id).await?;
    Ok(body::json(StatusCode::OK, &view(sandboxes, &sandbox)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fork {
    #[serde(default = "one")]
    count: u32,
}

fn one() -> u32 {
    1
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/fork", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 201, description = "Copies with fresh ids and tokens, suspended with the source's state and resumed on their first request", body = SandboxList),
        (status = 400, description = "Bad count", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody), (status = 409, description = "Neither running nor suspended", body = ErrorBody)))]
pub async fn fork(
    sandboxes: &Sandboxes,
    principal: &Principal,
    budget: &BodyBudget,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, Problem> {
    valid(id)?;
    authorize(principal, &sandboxes.gate(id).await?.function)?;
    let (parts, incoming) = req.into_parts();
    let (bytes, _held) = body::read(&parts.headers, incoming, 4096, Duration::from_secs(10), budget).await?;
    let request: Fork = if bytes.is_empty() {
        Fork { count: 1 }
    } else {
        kiln_core::json::from_slice(&bytes)
            .map_err(|e| error::invalid_request(format!("expected {{\"count\": n}}: {e}")))?
    };
    let forks = sandboxes.fork(id, request.count).await?;
    let views: Vec<Value> = forks.iter().map(|s| view(sandboxes, s)).collect();
    Ok(body::json(StatusCode::CREATED, &json!({ "sandboxes": views })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    #[serde(default = "ingress_only")]
    scopes: Vec<Scope>,
    #[serde(default = "an_hour")]
    ttl_s: u64,
}

fn ingress_only() -> Vec<Scope> {
    vec![Scope::Ingress]
}

fn an_hour() -> u64 {
    3600
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/tokens", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 201, description = "A token for this sandbox only; its secret is shown only here", body = TokenForSandbox),
        (status = 400, description = "Bad scopes or ttl", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody), (status = 409, description = "Terminated or failed", body = ErrorBody)))]
pub async fn token(
    sandboxes: &Sandboxes,
    principal: &Principal,
    budget: &BodyBudget,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, Problem> {
    valid(id)?;
    authorize(principal, &sandboxes.gate(id).await?.function)?;
    let (parts, incoming) = req.into_parts();
    let (bytes, _held) = body::read(&parts.headers, incoming, 4096, Duration::from_secs(10), budget).await?;
    let request: NewToken = if bytes.is_empty() {
        NewToken {
            scopes: ingress_only(),
            ttl_s: an_hour(),
        }
    } else {
        kiln_core::json::from_slice(&bytes)
            .map_err(|e| error::invalid_request(format!("expected {{\"scopes\": [...], \"ttl_s\": seconds}}: {e}")))?
    };
    let (secret, token) = sandboxes
        .create_token(id, request.scopes, Duration::from_secs(request.ttl_s))
        .await?;
    let expires_at = token
        .expires_ms
        .and_then(|ms| time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).ok())
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok());
    Ok(body::json(
        StatusCode::CREATED,
        &json!({ "token": secret, "scopes": token.scopes, "expires_at": expires_at }),
    ))
}

#[utoipa::path(method(get, post, put, delete, patch, head, options), path = "/sbx/{id}/{path}", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id"), ("path" = String, Path, description = "What the app sees as its path (with the query), from `/`"),
        ("X-Kiln-Port" = Option<u16>, Header, description = "microVM sandboxes: the guest port to reach instead of the sandbox's `ingress_port` (stripped)")),
    request_body(content = String, content_type = "application/octet-stream", description = "Streamed to the sandbox"),
    responses(
        (status = 200, description = "Whatever the sandbox answers (any status, headers and body), streamed"),
        (status = 101, description = "microVM sandboxes: the guest's server accepted a protocol upgrade (a websocket), relayed both ways"),
        (status = 401, description = "No valid token (unless the sandbox's ingress is public)", body = ErrorBody),
        (status = 403, description = "A token of another sandbox, without the ingress scope, or ingress off", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "Terminated or failed", body = ErrorBody),
        (status = 502, description = "The sandbox failed before answering", body = ErrorBody),
        (status = 504, description = "The sandbox ran past its timeout before answering", body = ErrorBody)))]
pub async fn ingress(
    auth: &Auth,
    sandboxes: &Sandboxes,
    id: &str,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Problem> {
    valid(id)?;
    let gate = sandboxes.gate(id).await?;
    let principal = auth.authenticate(req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()));
    let sandbox_token = sandbox_token(&req);
    // A bearer token that is not Kiln's may be the app's own: only a known one takes part.
    sandboxes.may_enter(&gate, principal.as_ref(), sandbox_token.as_deref())?;
    if req.uri().authority().is_none() && !req.headers().contains_key(header::HOST) {
        return Err(error::invalid_request("the request has no Host header"));
    }
    *req.uri_mut() = app_uri(req.uri(), id)?;
    strip(&mut req, principal.is_some());
    let request = req.map(|incoming| incoming.map_err(ErrorCode::from).boxed());
    let request: Request<IngressBody> = request;
    let response = sandboxes.enter(id, request).await?;
    Ok(response.map(Body::Stream))
}

/// The sandbox token, from its header or a websocket subprotocol.
pub(super) fn sandbox_token(req: &Request<Incoming>) -> Option<String> {
    if let Some(value) = req.headers().get(SANDBOX_TOKEN).and_then(|v| v.to_str().ok()) {
        return Some(value.trim().to_owned());
    }
    offered_protocols(req).find_map(|p| p.strip_prefix(TOKEN_PROTOCOL).map(str::to_owned))
}

/// The websocket subprotocols a request offers.
pub(super) fn offered_protocols(req: &Request<Incoming>) -> impl Iterator<Item = &str> {
    req.headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Removes what was for Kiln, so the app sees its own request: the sandbox token header, the
/// token subprotocol, and the bearer token when it was Kiln's; and the hop-by-hop headers, but
/// those of a protocol upgrade (a websocket), which a microVM sandbox's server answers.
fn strip(req: &mut Request<Incoming>, kiln_bearer: bool) {
    let upgrading = req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let headers = req.headers_mut();
    headers.remove(HeaderName::from_static(SANDBOX_TOKEN));
    if kiln_bearer {
        headers.remove(header::AUTHORIZATION);
    }
    let protocols: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.starts_with(TOKEN_PROTOCOL) && !p.is_empty())
        .map(str::to_owned)
        .collect();
    headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
    if !protocols.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&protocols.join(", ")) {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, value);
        }
    }
    for name in [
        HeaderName::from_static("keep-alive"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
    ] {
        headers.remove(name);
    }
    if upgrading {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// `/sbx/{id}/a/b?x=1` → `/a/b?x=1`; `/sbx/{id}` → `/`.
fn app_uri(uri: &http::Uri, id: &str) -> Result<http::Uri, Problem> {
    let rest = &uri.path().trim_start_matches('/')["sbx/".len() + id.len()..];
    let path = if rest.is_empty() { "/" } else { rest };
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|_| error::invalid_request("the request path is not valid"))?,
    );
    http::Uri::from_parts(parts).map_err(|_| error::invalid_request("the request URI is not valid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_app_sees_the_path_after_the_sandbox() {
        let uri = |s: &str| s.parse::<http::Uri>().unwrap();
        let id = "sbx_0123456789abcdefghjkmnpqrs";
        assert_eq!(app_uri(&uri(&format!("/sbx/{id}")), id).unwrap(), "/");
        assert_eq!(app_uri(&uri(&format!("/sbx/{id}/a/b?x=1")), id).unwrap(), "/a/b?x=1");
    }
}
