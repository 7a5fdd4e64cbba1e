//! HTTP routes of `../shared/API.md`. `handle` is the whole request pipeline: route, refuse during
//! shutdown, authenticate, validate names, then the handler. Handlers return `Result<_, ApiError>`
//! and `error.rs` turns every failure into the contract's status and JSON body.

pub mod body;
pub mod error;
mod functions;
mod http_trigger;
mod invocations;
mod invoke;
mod logs;
mod openapi;
mod tokens;

use std::convert::Infallible;
use std::sync::Arc;

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::app::App;
use crate::config::is_valid_function_name;
use crate::metrics::Gauges;
use body::Body;
use error::ApiError;

pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let response = match route(&app, req).await {
        Ok(response) => response,
        Err(e) => body::error(&e),
    };
    Ok(response)
}

async fn route(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    match segments.as_slice() {
        ["healthz"] if method == Method::GET || method == Method::HEAD => return Ok(healthz(app)),
        ["metrics"] if method == Method::GET => return Ok(metrics(app).await),
        ["healthz"] | ["metrics"] => return Err(ApiError::method_not_allowed()),
        ["v1", ..] => {}
        ["fn", name, ..] => {
            if app.is_shutting_down() {
                return Err(ApiError::unavailable("kiln is shutting down"));
            }
            let name = name.to_string();
            return http_trigger::handle(app, &name, req).await;
        }
        _ => return Err(ApiError::not_found(format!("no route for {path}"))),
    }
    if app.is_shutting_down() {
        return Err(ApiError::unavailable("kiln is shutting down"));
    }
    // Result URLs carry their own authority (a signature), not a token.
    if let ["v1", "results", id] = segments.as_slice() {
        return match method {
            Method::GET => invocations::result(app, id, req.uri().query()).await,
            _ => Err(ApiError::method_not_allowed()),
        };
    }
    let principal = app
        .auth
        .authenticate(req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()))
        .ok_or_else(ApiError::unauthorized)?;
    tokens::authorize(app, &principal, &segments, &method).await?;
    match (segments.as_slice(), method) {
        (["v1", "openapi.json"], Method::GET) => Ok(openapi::document(app).await),
        (["v1", "openapi.json"], _) => Err(ApiError::method_not_allowed()),
        (["v1", "tokens"], Method::POST) => tokens::create(app, req).await,
        (["v1", "tokens"], Method::GET) => tokens::list(app).await,
        (["v1", "tokens"], _) => Err(ApiError::method_not_allowed()),
        (["v1", "tokens", id], Method::DELETE) => tokens::delete(app, id).await,
        (["v1", "tokens", _], _) => Err(ApiError::method_not_allowed()),
        (["v1", "functions"], Method::GET) => functions::list(app).await,
        (["v1", "functions"], _) => Err(ApiError::method_not_allowed()),
        (["v1", "functions", name, rest @ ..], method) => {
            if !is_valid_function_name(name) {
                return Err(ApiError::invalid_request(format!(
                    "invalid function name {name:?}: names match ^[a-z0-9][a-z0-9_-]{{0,63}}$"
                )));
            }
            match (rest, method) {
                ([], Method::PUT) => functions::deploy(app, name, req).await,
                ([], Method::GET) => functions::get(app, name).await,
                ([], Method::DELETE) => functions::delete(app, name).await,
                (["invoke"], Method::POST) => invoke::sync(app, name, req).await,
                (["invoke-async"], Method::POST) => invocations::submit(app, name, req).await,
                ([] | ["invoke"] | ["invoke-async"], _) => Err(ApiError::method_not_allowed()),
                _ => Err(ApiError::not_found(format!("no route for {path}"))),
            }
        }
        (["v1", "invocations", id], Method::GET) => invocations::get(app, id, req.uri().query()).await,
        (["v1", "invocations", _], _) => Err(ApiError::method_not_allowed()),
        (["v1", "invocations", id, "logs"], Method::GET) => logs::get(app, id).await,
        (["v1", "invocations", _, "logs"], _) => Err(ApiError::method_not_allowed()),
        _ => Err(ApiError::not_found(format!("no route for {path}"))),
    }
}

#[utoipa::path(get, path = "/healthz", tag = "operations", security(()),
    responses((status = 200, description = "Serving"), (status = 503, description = "Shutting down", body = crate::api::openapi::ErrorBody)))]
fn healthz(app: &App) -> Response<Body> {
    if app.is_shutting_down() {
        return body::error(&ApiError::unavailable("kiln is shutting down"));
    }
    let mut health = serde_json::json!({
        "status": "ok",
        "tiers": { "wasm": true, "microvm": app.microvm.is_available() },
    });
    if let Some(reason) = app.microvm.reason() {
        health["unavailable"] = serde_json::json!({ "microvm": reason });
    }
    body::json(StatusCode::OK, &health)
}

#[utoipa::path(get, path = "/metrics", tag = "operations", security(()),
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics(app: &Arc<App>) -> Response<Body> {
    let gauges = Gauges {
        async_queue_depth: app.jobs.depth(),
        compilations: app.cache.compilations(),
        functions: app.registry.len(),
        instances_in_use: app.config.max_instances as usize - app.instance_permits.available_permits(),
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
        .body(Body::from(app.metrics.render(&gauges)))
        .expect("static headers are valid")
}

/// Parses the `version` query parameter; other parameters are refused so a typo is not ignored.
fn version_param(query: Option<&str>) -> Result<Option<u32>, ApiError> {
    let mut version = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("version", v)) => {
                let parsed = v.parse::<u32>().ok().filter(|v| *v > 0);
                version = Some(parsed.ok_or_else(|| {
                    ApiError::invalid_request(format!("version must be a positive integer, not {v:?}"))
                })?);
            }
            _ => return Err(ApiError::invalid_request(format!("unknown query parameter {pair:?}"))),
        }
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_query() {
        assert_eq!(version_param(None).unwrap(), None);
        assert_eq!(version_param(Some("version=3")).unwrap(), Some(3));
        assert!(version_param(Some("version=0")).is_err());
        assert!(version_param(Some("version=x")).is_err());
        assert!(version_param(Some("verison=1")).is_err());
    }
}
