//! HTTP routes of `../shared/API.md`. `handle` is the whole request pipeline: route, refuse during
//! shutdown, authenticate, validate names, then the handler, given the parts of the core it uses.
//! Handlers return `Result<_, Problem>` and `error.rs` turns every failure into the contract's
//! status and JSON body.

pub mod body;
pub mod error;
mod functions;
mod http_trigger;
mod invocations;
mod invoke;
mod keys;
mod logs;
mod openapi;
mod sandboxes;
mod tokens;

use std::convert::Infallible;
use std::sync::Arc;

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use kiln_core::function::is_valid_function_name;
use kiln_core::problem::Problem;
use kiln_core::sandboxes::record::State;
use kiln_core::telemetry::metrics::Gauges;

use sha2::Digest as _;

use crate::Server;
use body::Body;

pub async fn handle(server: Arc<Server>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let response = match route(&server, req).await {
        Ok(response) => response,
        Err(problem) => body::error(&problem),
    };
    Ok(response)
}

async fn route(server: &Server, req: Request<Incoming>) -> Result<Response<Body>, Problem> {
    let kiln = &server.kiln;
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    match segments.as_slice() {
        ["healthz"] if method == Method::GET || method == Method::HEAD => return Ok(healthz(server)),
        ["metrics"] if method == Method::GET => {
            let authorization = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
            if !may_read_metrics(server, authorization) {
                return Err(error::unauthorized());
            }
            return Ok(metrics(server).await);
        }
        ["healthz"] | ["metrics"] => return Err(error::method_not_allowed()),
        ["v1", ..] => {}
        ["fn", name, ..] => {
            if kiln.is_shutting_down() {
                return Err(error::shutting_down());
            }
            let name = name.to_string();
            return http_trigger::handle(&kiln.auth, &kiln.functions, &kiln.telemetry, &name, req).await;
        }
        ["sbx", id, ..] => {
            if kiln.is_shutting_down() {
                return Err(error::shutting_down());
            }
            let id = id.to_string();
            return sandboxes::ingress(&kiln.auth, &kiln.sandboxes, &id, req).await;
        }
        _ => return Err(error::not_found(format!("no route for {path}"))),
    }
    if kiln.is_shutting_down() {
        return Err(error::shutting_down());
    }
    // Result URLs carry their own authority (a signature), not a token.
    if let ["v1", "results", id] = segments.as_slice() {
        return match method {
            Method::GET => invocations::result(&kiln.signer, &kiln.storage, id, req.uri().query()).await,
            _ => Err(error::method_not_allowed()),
        };
    }
    let principal = kiln
        .auth
        .authenticate(req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()))
        .ok_or_else(error::unauthorized)?;
    tokens::authorize(&kiln.storage, &kiln.telemetry.logs, &principal, &segments, &method).await?;
    match (segments.as_slice(), method) {
        (["v1", "openapi.json"], Method::GET) => Ok(openapi::document()),
        (["v1", "openapi.json"], _) => Err(error::method_not_allowed()),
        (["v1", "tokens"], Method::POST) => tokens::create(&kiln.auth, &kiln.storage, &server.bodies, req).await,
        (["v1", "tokens"], Method::GET) => tokens::list(&kiln.auth, &kiln.storage).await,
        (["v1", "tokens"], _) => Err(error::method_not_allowed()),
        (["v1", "tokens", id], Method::DELETE) => tokens::delete(&kiln.auth, &kiln.storage, id).await,
        (["v1", "tokens", _], _) => Err(error::method_not_allowed()),
        (["v1", "keys", "rotate"], Method::POST) => keys::rotate(&kiln.signer).await,
        (["v1", "keys", "rotate"], _) => Err(error::method_not_allowed()),
        (["v1", "sandboxes"], Method::POST) => {
            sandboxes::create(&kiln.sandboxes, &principal, &server.bodies, req).await
        }
        (["v1", "sandboxes"], Method::GET) => sandboxes::list(&kiln.sandboxes, &principal, req.uri().query()).await,
        (["v1", "sandboxes"], _) => Err(error::method_not_allowed()),
        (["v1", "sandboxes", id], Method::GET) => sandboxes::get(&kiln.sandboxes, &principal, id).await,
        (["v1", "sandboxes", id], Method::DELETE) => sandboxes::terminate(&kiln.sandboxes, &principal, id).await,
        (["v1", "sandboxes", _], _) => Err(error::method_not_allowed()),
        (["v1", "sandboxes", id, "suspend"], Method::POST) => sandboxes::suspend(&kiln.sandboxes, &principal, id).await,
        (["v1", "sandboxes", id, "resume"], Method::POST) => sandboxes::resume(&kiln.sandboxes, &principal, id).await,
        (["v1", "sandboxes", id, "fork"], Method::POST) => {
            sandboxes::fork(&kiln.sandboxes, &principal, &server.bodies, id, req).await
        }
        (["v1", "sandboxes", id, "tokens"], Method::POST) => {
            sandboxes::token(&kiln.sandboxes, &principal, &server.bodies, id, req).await
        }
        (["v1", "sandboxes", _, "suspend" | "resume" | "fork" | "tokens"], _) => Err(error::method_not_allowed()),
        (["v1", "sandboxes", id, "exec"], Method::POST) => sandboxes::exec(&kiln.sandboxes, &principal, id).await,
        (["v1", "sandboxes", id, "shell"], Method::GET) => sandboxes::shell(&kiln.sandboxes, &principal, id).await,
        (["v1", "sandboxes", id, "files"], Method::GET) => sandboxes::read_file(&kiln.sandboxes, &principal, id).await,
        (["v1", "sandboxes", id, "files"], Method::PUT) => sandboxes::write_file(&kiln.sandboxes, &principal, id).await,
        (["v1", "sandboxes", _, "exec" | "shell" | "files"], _) => Err(error::method_not_allowed()),
        (["v1", "functions"], Method::GET) => functions::list(&kiln.functions).await,
        (["v1", "functions"], _) => Err(error::method_not_allowed()),
        (["v1", "functions", name, rest @ ..], method) => {
            if !is_valid_function_name(name) {
                return Err(error::invalid_function_name(name));
            }
            match (rest, method) {
                ([], Method::PUT) => {
                    functions::deploy(
                        &kiln.functions,
                        &kiln.telemetry,
                        &server.config,
                        &server.bodies,
                        name,
                        req,
                    )
                    .await
                }
                ([], Method::GET) => functions::get(&kiln.functions, name).await,
                ([], Method::DELETE) => functions::delete(&kiln.functions, name).await,
                (["invoke"], Method::POST) => {
                    invoke::sync(
                        &kiln.functions,
                        &kiln.telemetry,
                        &server.config,
                        &server.bodies,
                        name,
                        req,
                    )
                    .await
                }
                (["invoke-async"], Method::POST) => {
                    invocations::submit(&kiln.functions, &kiln.queue, &server.config, &server.bodies, name, req).await
                }
                ([] | ["invoke"] | ["invoke-async"], _) => Err(error::method_not_allowed()),
                _ => Err(error::not_found(format!("no route for {path}"))),
            }
        }
        (["v1", "invocations", id], Method::GET) => {
            invocations::get(&kiln.storage, &kiln.signer, id, req.uri().query()).await
        }
        (["v1", "invocations", _], _) => Err(error::method_not_allowed()),
        (["v1", "invocations", id, "logs"], Method::GET) => logs::get(&kiln.storage, &kiln.telemetry.logs, id).await,
        (["v1", "invocations", _, "logs"], _) => Err(error::method_not_allowed()),
        _ => Err(error::not_found(format!("no route for {path}"))),
    }
}

#[utoipa::path(get, path = "/healthz", tag = "operations", security(()),
    responses((status = 200, description = "Serving"), (status = 503, description = "Shutting down", body = crate::api::openapi::ErrorBody)))]
fn healthz(server: &Server) -> Response<Body> {
    let kiln = &server.kiln;
    if kiln.is_shutting_down() {
        return body::error(&error::shutting_down());
    }
    let microvm = &kiln.functions.tiers.microvm;
    let mut health = serde_json::json!({
        "status": "ok",
        "tiers": { "wasm": true, "microvm": microvm.is_available() },
    });
    if let Some(reason) = microvm.reason() {
        health["unavailable"] = serde_json::json!({ "microvm": without_host_paths(reason) });
    }
    body::json(StatusCode::OK, &health)
}

/// `/healthz` needs no token: what it says must not map the host's file system. An absolute path
/// in a reason (a guest kernel's, say) is shortened to its file name; the server's log and an
/// authenticated deploy's answer keep the whole path.
fn without_host_paths(reason: &str) -> String {
    reason
        .split(' ')
        .map(|word| match word.strip_prefix('/') {
            Some(rest) if word != "/dev/kvm" && rest.contains('/') => {
                let tail = word.trim_end_matches([':', ',', '.', ')']);
                let name = tail.rsplit('/').next().unwrap_or("");
                format!("…/{name}{}", &word[tail.len()..])
            }
            _ => word.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[utoipa::path(get, path = "/metrics", tag = "operations", security((), ("bearer" = [])),
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain"),
        (status = 401, description = "A metrics token is configured and was not given", body = crate::api::openapi::ErrorBody)))]
async fn metrics(server: &Server) -> Response<Body> {
    let kiln = &server.kiln;
    let wasm = &kiln.functions.tiers.wasm;
    let counts = kiln.sandboxes.counts().await;
    let gauges = Gauges {
        async_queue_depth: kiln.queue.depth(),
        compilations: wasm.compilations(),
        functions: kiln.functions.count(),
        instances_in_use: wasm.instances_in_use(),
        sandboxes: State::ALL
            .iter()
            .map(|state| (state.as_str(), counts.get(state).copied().unwrap_or(0)))
            .collect(),
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
        .body(Body::from(kiln.telemetry.metrics.render(&gauges)))
        .expect("static headers are valid")
}

/// Whether `/metrics` may be read with this `Authorization`: by anyone unless a metrics token is
/// configured, then with it or the admin token (compared as hashes, in constant time).
fn may_read_metrics(server: &Server, authorization: Option<&[u8]>) -> bool {
    let Some(expected) = &server.config.metrics_token else {
        return true;
    };
    if server.kiln.auth.check(authorization) {
        return true;
    }
    let presented = authorization
        .and_then(|h| std::str::from_utf8(h).ok())
        .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
        .map(str::trim)
        .unwrap_or("");
    let digest = |text: &str| -> [u8; 32] { sha2::Sha256::digest(text.as_bytes()).into() };
    bool::from(subtle::ConstantTimeEq::ct_eq(
        &digest(presented)[..],
        &digest(expected)[..],
    ))
}

/// Parses the `version` query parameter; other parameters are refused so a typo is not ignored.
fn version_param(query: Option<&str>) -> Result<Option<u32>, Problem> {
    let mut version = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("version", v)) => {
                let parsed = v.parse::<u32>().ok().filter(|v| *v > 0);
                version =
                    Some(parsed.ok_or_else(|| {
                        error::invalid_request(format!("version must be a positive integer, not {v:?}"))
                    })?);
            }
            _ => return Err(error::invalid_request(format!("unknown query parameter {pair:?}"))),
        }
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_reasons_name_no_host_paths() {
        assert_eq!(
            without_host_paths("cannot read the guest kernel /srv/kiln/images/vmlinuz: not found"),
            "cannot read the guest kernel …/vmlinuz: not found"
        );
        assert_eq!(
            without_host_paths("the microvm tier needs KVM and this host has no /dev/kvm"),
            "the microvm tier needs KVM and this host has no /dev/kvm"
        );
    }

    #[test]
    fn version_query() {
        assert_eq!(version_param(None).unwrap(), None);
        assert_eq!(version_param(Some("version=3")).unwrap(), Some(3));
        assert!(version_param(Some("version=0")).is_err());
        assert!(version_param(Some("version=x")).is_err());
        assert!(version_param(Some("verison=1")).is_err());
    }
}
