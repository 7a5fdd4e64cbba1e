//! HTTP routes of `../shared/API.md`. `handle` is the whole request pipeline: route, refuse during
//! shutdown, authenticate, validate names, then the handler, given the parts of the core it uses.
//! Handlers return `Result<_, Problem>` and `error.rs` turns every failure into the contract's
//! status and JSON body.

pub mod body;
mod cluster;
mod connectors;
mod console;
pub mod error;
mod functions;
mod http_trigger;
mod identity;
mod inside;
mod invocations;
mod invoke;
mod keys;
mod logs;
mod openapi;
mod sandboxes;
mod stats;
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
pub use cluster::start_heartbeat;

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
    let segments = segments(&path);
    let method = req.method().clone();
    let api = match classify(&method, &segments) {
        Route::Healthz => return Ok(healthz(server)),
        Route::Metrics => {
            let authorization = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
            if !may_read_metrics(server, authorization) {
                return Err(error::unauthorized());
            }
            return Ok(metrics(server).await);
        }
        Route::Jwks => return Ok(identity::jwks(&kiln.identity)),
        Route::Discovery => return Ok(identity::discovery(&kiln.identity)),
        Route::ConsoleRedirect => return Ok(console::redirect()),
        Route::Console(asset) => return console::asset(asset, req.headers()),
        Route::Refused(refusal) => return refusal.answer(&path, &segments),
        _ if kiln.is_shutting_down() => return Err(error::shutting_down()),
        Route::Trigger(name) => {
            return http_trigger::handle(&kiln.auth, &kiln.functions, &kiln.telemetry, name, req).await;
        }
        Route::Ingress(id) => return sandboxes::ingress(&kiln.auth, &kiln.sandboxes, id, req).await,
        // Lambda's API signs its requests (SigV4) and answers in Lambda's shapes.
        Route::Lambda => return Ok(crate::lambda::handle(server, req).await),
        // Result URLs carry their own authority (a signature), not a token.
        Route::Result(id) => return invocations::result(&kiln.signer, &kiln.storage, id, req.uri().query()).await,
        // Inside a sandbox, a sandbox token with the right scope may stand in for Kiln's.
        Route::Api(Api::SandboxExec(id)) => {
            return inside::exec(&kiln.auth, &kiln.sandboxes, &server.bodies, id, req).await
        }
        Route::Api(Api::SandboxShell(id)) => return inside::shell(&kiln.auth, &kiln.sandboxes, id, req).await,
        Route::Api(Api::SandboxReadFile(id)) => return inside::read_file(&kiln.auth, &kiln.sandboxes, id, req).await,
        Route::Api(Api::SandboxWriteFile(id)) => return inside::write_file(&kiln.auth, &kiln.sandboxes, id, req).await,
        Route::Api(api) => api,
    };
    let principal = kiln
        .auth
        .authenticate(req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()))
        .ok_or_else(error::unauthorized)?;
    tokens::authorize(&kiln.storage, &kiln.telemetry.logs, &principal, &segments, &method).await?;
    let (limits, bodies) = (&server.config, &server.bodies);
    match api {
        Api::OpenApi => Ok(openapi::document()),
        Api::CreateToken => tokens::create(&kiln.auth, &kiln.storage, bodies, req).await,
        Api::ListTokens => tokens::list(&kiln.auth, &kiln.storage).await,
        Api::DeleteToken(id) => tokens::delete(&kiln.auth, &kiln.storage, id).await,
        Api::RotateKeys => keys::rotate(kiln, req.uri().query()).await,
        Api::CreateConnector => connectors::create(&kiln.functions.connectors, bodies, req).await,
        Api::ListConnectors => connectors::list(&kiln.functions.connectors).await,
        Api::GetConnector(name) => connectors::get(&kiln.functions.connectors, name).await,
        Api::DeleteConnector(name) => connectors::delete(&kiln.functions.connectors, name).await,
        Api::ListFunctions => functions::list(&kiln.functions).await,
        Api::Deploy(name) => functions::deploy(&kiln.functions, &kiln.telemetry, limits, bodies, name, req).await,
        Api::GetFunction(name) => functions::get(&kiln.functions, name).await,
        Api::DeleteFunction(name) => functions::delete(&kiln.functions, name).await,
        Api::Invoke(name) => invoke::sync(&kiln.functions, &kiln.telemetry, limits, bodies, name, req).await,
        Api::InvokeAsync(name) => invocations::submit(&kiln.functions, &kiln.queue, limits, bodies, name, req).await,
        Api::ListInvocations => {
            invocations::list(&kiln.storage, &kiln.telemetry.quiet, &principal, req.uri().query()).await
        }
        Api::FunctionStats => stats::get(&kiln.telemetry.metrics, &principal, req.uri().query()),
        Api::Cluster => cluster::list(kiln, &server.node).await,
        Api::GetInvocation(id) => invocations::get(&kiln.storage, &kiln.signer, id, req.uri().query()).await,
        Api::InvocationLogs(id) => logs::get(&kiln.storage, &kiln.telemetry.logs, id).await,
        Api::CreateSandbox => sandboxes::create(&kiln.sandboxes, &principal, bodies, req).await,
        Api::ListSandboxes => sandboxes::list(&kiln.sandboxes, &principal, req.uri().query()).await,
        Api::GetSandbox(id) => sandboxes::get(&kiln.sandboxes, &principal, id).await,
        Api::TerminateSandbox(id) => sandboxes::terminate(&kiln.sandboxes, &principal, id).await,
        Api::SuspendSandbox(id) => sandboxes::suspend(&kiln.sandboxes, &principal, id).await,
        Api::ResumeSandbox(id) => sandboxes::resume(&kiln.sandboxes, &principal, id).await,
        Api::ForkSandbox(id) => sandboxes::fork(&kiln.sandboxes, &principal, bodies, id, req).await,
        Api::SandboxToken(id) => sandboxes::token(&kiln.sandboxes, &principal, bodies, id, req).await,
        Api::SandboxExec(_) | Api::SandboxShell(_) | Api::SandboxReadFile(_) | Api::SandboxWriteFile(_) => {
            unreachable!("routed above")
        }
        Api::Refused(refusal) => refusal.answer(&path, &segments),
    }
}

/// A path's segments, as the router matches them (extra leading slashes ignored).
fn segments(path: &str) -> Vec<&str> {
    path.trim_start_matches('/').split('/').collect()
}

/// Where a request goes, from its method and path alone: decided before anything is read,
/// authenticated or looked up, so the routing table is one pure function (fuzzed in `fuzz/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    Healthz,
    Metrics,
    /// `GET /.well-known/jwks.json`: the keys that verify guests' identity tokens (no token).
    Jwks,
    /// `GET /.well-known/openid-configuration`: where those keys are (no token).
    Discovery,
    /// `GET /ui`: to `/ui/`.
    ConsoleRedirect,
    /// `GET /ui/<file>`: the web console's files (`""` is its page), no token.
    Console(&'a str),
    /// `/fn/<name>/...`, any method; the trigger checks the name and the caller.
    Trigger(&'a str),
    /// `GET /v1/results/<id>`: authorised by its signature, not by a token.
    Result(&'a str),
    /// `/sbx/<id>/...`, any method: a sandbox's ingress, which authenticates on its own terms.
    Ingress(&'a str),
    /// `/2015-03-31/...` (any of Lambda's API dates): AWS Lambda's API, signed with SigV4.
    Lambda,
    /// Answered at once, before authentication or the shutdown check.
    Refused(Refusal<'a>),
    /// The rest of `/v1`: only for an authenticated, authorised caller.
    Api(Api<'a>),
}

/// A route under `/v1` that needs a token. Function names are valid ([`is_valid_function_name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api<'a> {
    OpenApi,
    CreateToken,
    ListTokens,
    DeleteToken(&'a str),
    RotateKeys,
    CreateConnector,
    ListConnectors,
    GetConnector(&'a str),
    DeleteConnector(&'a str),
    ListFunctions,
    Deploy(&'a str),
    GetFunction(&'a str),
    DeleteFunction(&'a str),
    Invoke(&'a str),
    InvokeAsync(&'a str),
    ListInvocations,
    /// `GET /v1/metrics`: the last hour per function, as JSON.
    FunctionStats,
    /// `GET /v1/cluster`: the nodes serving this database.
    Cluster,
    GetInvocation(&'a str),
    InvocationLogs(&'a str),
    CreateSandbox,
    ListSandboxes,
    GetSandbox(&'a str),
    TerminateSandbox(&'a str),
    SuspendSandbox(&'a str),
    ResumeSandbox(&'a str),
    ForkSandbox(&'a str),
    SandboxToken(&'a str),
    SandboxExec(&'a str),
    SandboxShell(&'a str),
    SandboxReadFile(&'a str),
    SandboxWriteFile(&'a str),
    /// Told only to an authenticated caller: an anonymous one learns nothing about `/v1` but 401.
    Refused(Refusal<'a>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal<'a> {
    NotFound,
    MethodNotAllowed,
    InvalidName(&'a str),
}

impl Refusal<'_> {
    /// The refusal's answer: a 405 names the methods the path takes in `Allow` (RFC 9110).
    fn answer(self, path: &str, segments: &[&str]) -> Result<Response<Body>, Problem> {
        match self {
            Refusal::NotFound => Err(error::not_found(format!("no route for {path}"))),
            Refusal::InvalidName(name) => Err(error::invalid_function_name(name)),
            Refusal::MethodNotAllowed => {
                let mut response = body::error(&error::method_not_allowed());
                if let Ok(allow) = http::HeaderValue::from_str(&allowed_methods(segments)) {
                    response.headers_mut().insert(header::ALLOW, allow);
                }
                Ok(response)
            }
        }
    }
}

/// The methods the routing table takes for a path, as an `Allow` header lists them.
fn allowed_methods(segments: &[&str]) -> String {
    [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
    ]
    .into_iter()
    .filter(|method| {
        !matches!(
            classify(method, segments),
            Route::Refused(_) | Route::Api(Api::Refused(_))
        )
    })
    .map(|method| method.as_str().to_owned())
    .collect::<Vec<_>>()
    .join(", ")
}

/// The routing table of `../shared/API.md`.
pub fn classify<'a>(method: &Method, segments: &[&'a str]) -> Route<'a> {
    let get = method == Method::GET;
    match segments {
        ["healthz"] if get || method == Method::HEAD => Route::Healthz,
        ["metrics"] if get => Route::Metrics,
        ["healthz"] | ["metrics"] => Route::Refused(Refusal::MethodNotAllowed),
        [".well-known", "jwks.json"] if get => Route::Jwks,
        [".well-known", "openid-configuration"] if get => Route::Discovery,
        [".well-known", "jwks.json" | "openid-configuration"] => Route::Refused(Refusal::MethodNotAllowed),
        ["ui"] if get => Route::ConsoleRedirect,
        ["ui", asset] if get => Route::Console(asset),
        ["ui"] | ["ui", _] => Route::Refused(Refusal::MethodNotAllowed),
        ["fn", name, ..] => Route::Trigger(name),
        ["v1", "results", id] if get => Route::Result(id),
        ["v1", "results", _] => Route::Refused(Refusal::MethodNotAllowed),
        ["sbx", id, ..] => Route::Ingress(id),
        ["v1", ..] => Route::Api(classify_api(method, segments)),
        [date, ..] if crate::lambda::is_api_date(date) => Route::Lambda,
        _ => Route::Refused(Refusal::NotFound),
    }
}

fn classify_api<'a>(method: &Method, segments: &[&'a str]) -> Api<'a> {
    let refused = Api::Refused;
    match (segments, method) {
        (["v1", "openapi.json"], &Method::GET) => Api::OpenApi,
        (["v1", "openapi.json"], _) => refused(Refusal::MethodNotAllowed),
        (["v1", "tokens"], &Method::POST) => Api::CreateToken,
        (["v1", "tokens"], &Method::GET) => Api::ListTokens,
        (["v1", "tokens"], _) => refused(Refusal::MethodNotAllowed),
        (["v1", "tokens", id], &Method::DELETE) => Api::DeleteToken(id),
        (["v1", "tokens", _], _) => refused(Refusal::MethodNotAllowed),
        (["v1", "keys", "rotate"], &Method::POST) => Api::RotateKeys,
        (["v1", "keys", "rotate"], _) => refused(Refusal::MethodNotAllowed),
        (["v1", "connectors"], &Method::POST) => Api::CreateConnector,
        (["v1", "connectors"], &Method::GET) => Api::ListConnectors,
        (["v1", "connectors"], _) => refused(Refusal::MethodNotAllowed),
        (["v1", "connectors", name], &Method::GET) => Api::GetConnector(name),
        (["v1", "connectors", name], &Method::DELETE) => Api::DeleteConnector(name),
        (["v1", "connectors", _], _) => refused(Refusal::MethodNotAllowed),
        (["v1", "functions"], &Method::GET) => Api::ListFunctions,
        (["v1", "functions"], _) => refused(Refusal::MethodNotAllowed),
        (["v1", "sandboxes"], &Method::POST) => Api::CreateSandbox,
        (["v1", "sandboxes"], &Method::GET) => Api::ListSandboxes,
        (["v1", "sandboxes"], _) => refused(Refusal::MethodNotAllowed),
        (["v1", "sandboxes", id], &Method::GET) => Api::GetSandbox(id),
        (["v1", "sandboxes", id], &Method::DELETE) => Api::TerminateSandbox(id),
        (["v1", "sandboxes", _], _) => refused(Refusal::MethodNotAllowed),
        (["v1", "sandboxes", id, "suspend"], &Method::POST) => Api::SuspendSandbox(id),
        (["v1", "sandboxes", id, "resume"], &Method::POST) => Api::ResumeSandbox(id),
        (["v1", "sandboxes", id, "fork"], &Method::POST) => Api::ForkSandbox(id),
        (["v1", "sandboxes", id, "tokens"], &Method::POST) => Api::SandboxToken(id),
        (["v1", "sandboxes", id, "exec"], &Method::POST) => Api::SandboxExec(id),
        (["v1", "sandboxes", id, "shell"], &Method::GET) => Api::SandboxShell(id),
        (["v1", "sandboxes", id, "files"], &Method::GET) => Api::SandboxReadFile(id),
        (["v1", "sandboxes", id, "files"], &Method::PUT) => Api::SandboxWriteFile(id),
        (["v1", "sandboxes", _, "suspend" | "resume" | "fork" | "tokens" | "exec" | "shell" | "files"], _) => {
            refused(Refusal::MethodNotAllowed)
        }
        (["v1", "functions", name, rest @ ..], method) => {
            if !is_valid_function_name(name) {
                return refused(Refusal::InvalidName(name));
            }
            match (rest, method) {
                ([], &Method::PUT) => Api::Deploy(name),
                ([], &Method::GET) => Api::GetFunction(name),
                ([], &Method::DELETE) => Api::DeleteFunction(name),
                (["invoke"], &Method::POST) => Api::Invoke(name),
                (["invoke-async"], &Method::POST) => Api::InvokeAsync(name),
                ([] | ["invoke"] | ["invoke-async"], _) => refused(Refusal::MethodNotAllowed),
                _ => refused(Refusal::NotFound),
            }
        }
        (["v1", "cluster"], &Method::GET) => Api::Cluster,
        (["v1", "cluster"], _) => refused(Refusal::MethodNotAllowed),
        (["v1", "metrics"], &Method::GET) => Api::FunctionStats,
        (["v1", "metrics"], _) => refused(Refusal::MethodNotAllowed),
        (["v1", "invocations"], &Method::GET) => Api::ListInvocations,
        (["v1", "invocations"], _) => refused(Refusal::MethodNotAllowed),
        (["v1", "invocations", id], &Method::GET) => Api::GetInvocation(id),
        (["v1", "invocations", _], _) => refused(Refusal::MethodNotAllowed),
        (["v1", "invocations", id, "logs"], &Method::GET) => Api::InvocationLogs(id),
        (["v1", "invocations", _, "logs"], _) => refused(Refusal::MethodNotAllowed),
        _ => refused(Refusal::NotFound),
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

/// The request parsers the server runs, for the fuzz targets in `fuzz/`; not an API.
#[doc(hidden)]
pub mod fuzzing {
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Method, Uri};
    use kiln_core::function::FunctionConfig;
    use kiln_core::problem::Problem;

    pub use super::{Api, Refusal, Route};

    /// The router's decision for a method and a path.
    pub fn route<'a>(method: &Method, path: &'a str) -> Route<'a> {
        super::classify(method, &super::segments(path))
    }

    pub async fn parse_multipart(content_type: &str, body: Bytes) -> Result<(Bytes, FunctionConfig), Problem> {
        super::functions::parse_multipart(content_type, body).await
    }

    pub fn version_param(query: Option<&str>) -> Result<Option<u32>, Problem> {
        super::version_param(query)
    }

    pub fn url_lifetime(query: Option<&str>) -> Result<Duration, Problem> {
        super::invocations::url_lifetime(query)
    }

    pub fn valid_id(id: &str) -> bool {
        super::invocations::valid_id(id).is_ok()
    }

    pub fn guest_uri(uri: &Uri, name: &str) -> Result<Uri, Problem> {
        super::http_trigger::guest_uri(uri, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_table() {
        use Refusal::*;
        // Under /v1, refusals come after authentication: `route` authenticates first.
        let after_auth = |refusal| Route::Api(Api::Refused(refusal));
        for (method, path, expected) in [
            (Method::HEAD, "/healthz", Route::Healthz),
            (Method::GET, "//metrics", Route::Metrics),
            (Method::POST, "/metrics", Route::Refused(MethodNotAllowed)),
            (Method::GET, "/nope", Route::Refused(NotFound)),
            (Method::GET, "/.well-known/jwks.json", Route::Jwks),
            (Method::POST, "/.well-known/jwks.json", Route::Refused(MethodNotAllowed)),
            (Method::GET, "/.well-known/openid-configuration", Route::Discovery),
            (Method::GET, "/.well-known/other", Route::Refused(NotFound)),
            (Method::GET, "/ui", Route::ConsoleRedirect),
            (Method::GET, "/ui/", Route::Console("")),
            (Method::GET, "/ui/app.js", Route::Console("app.js")),
            (Method::POST, "/ui/", Route::Refused(MethodNotAllowed)),
            (Method::GET, "/ui/a/b", Route::Refused(NotFound)),
            (Method::GET, "/v1/invocations", Route::Api(Api::ListInvocations)),
            (Method::GET, "/v1/metrics", Route::Api(Api::FunctionStats)),
            (Method::POST, "/v1/metrics", after_auth(MethodNotAllowed)),
            (Method::PATCH, "/fn/Bad/x", Route::Trigger("Bad")),
            (Method::GET, "/v1/results/abc", Route::Result("abc")),
            (Method::PUT, "/v1/results/abc", Route::Refused(MethodNotAllowed)),
            (Method::PUT, "/v1/functions/f", Route::Api(Api::Deploy("f"))),
            (
                Method::POST,
                "/v1/functions/f/invoke-async",
                Route::Api(Api::InvokeAsync("f")),
            ),
            (
                Method::GET,
                "/v1/invocations/i/logs",
                Route::Api(Api::InvocationLogs("i")),
            ),
            (Method::DELETE, "/v1/tokens/t", Route::Api(Api::DeleteToken("t"))),
            (Method::POST, "/v1/keys/rotate", Route::Api(Api::RotateKeys)),
            (Method::GET, "/v1/keys/rotate", after_auth(MethodNotAllowed)),
            (Method::GET, "/v1/nope", after_auth(NotFound)),
            (Method::GET, "/v1/functions/f/invoke", after_auth(MethodNotAllowed)),
            (Method::GET, "/v1/functions/f/x", after_auth(NotFound)),
            (Method::GET, "/v1/functions/A/x", after_auth(InvalidName("A"))),
            (Method::GET, "/v1/functions/../x", after_auth(InvalidName(".."))),
        ] {
            assert_eq!(classify(&method, &segments(path)), expected, "{method} {path}");
        }
    }

    #[test]
    fn a_405_lists_what_the_path_takes() {
        for (path, allow) in [
            ("/healthz", "GET, HEAD"),
            ("/metrics", "GET"),
            ("/v1/functions/f", "GET, PUT, DELETE"),
            ("/v1/functions/f/invoke", "POST"),
            ("/v1/sandboxes", "GET, POST"),
            ("/v1/sandboxes/sbx_x/files", "GET, PUT"),
            ("/v1/tokens/t", "DELETE"),
            ("/v1/openapi.json", "GET"),
            ("/ui/", "GET"),
            ("/v1/invocations", "GET"),
        ] {
            assert_eq!(allowed_methods(&segments(path)), allow, "{path}");
        }
    }

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
