//! Deploy, list, get and delete.

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;

use kiln_core::function::{FunctionConfig, Runtime, VersionRecord};
use kiln_core::functions::Functions;
use kiln_core::problem::Problem;
use kiln_core::telemetry::Telemetry;

use super::body::{self, Body, BodyBudget, Held};
use super::error;
use super::openapi::{DeployForm, ErrorBody, FunctionList};
use crate::ServerConfig;

/// A version as the API shows it.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct VersionView<'a> {
    name: &'a str,
    version: u32,
    digest: String,
    /// Present when an init hook ran at deploy: the digest of the snapshot that runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot_digest: Option<String>,
    kind: &'static str,
    tier: &'static str,
    handle: String,
    config: &'a FunctionConfig,
    created_at: &'a str,
    /// A function from source: its language, interpreter and the interpreter's version.
    #[serde(skip_serializing_if = "Option::is_none")]
    runtime: Option<RuntimeView>,
}

/// The language runtime of a function from source.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct RuntimeView {
    /// `ruby`, `python` or `javascript`.
    language: &'static str,
    interpreter: &'static str,
    version: &'static str,
}

impl From<Runtime> for RuntimeView {
    fn from(runtime: Runtime) -> Self {
        let (interpreter, version) = runtime.interpreter();
        RuntimeView {
            language: runtime.as_str(),
            interpreter,
            version,
        }
    }
}

impl<'a> From<&'a VersionRecord> for VersionView<'a> {
    fn from(r: &'a VersionRecord) -> Self {
        VersionView {
            name: &r.name,
            version: r.version,
            digest: r.digest.prefixed(),
            snapshot_digest: (r.code_digest != r.digest).then(|| r.code_digest.prefixed()),
            kind: r.kind.as_str(),
            tier: r.config.tier.as_str(),
            handle: format!("{}@{}", r.name, r.version),
            config: &r.config,
            created_at: &r.created_at,
            runtime: r.config.runtime.map(RuntimeView::from),
        }
    }
}

#[utoipa::path(put, path = "/v1/functions/{name}", tag = "functions", params(("name" = String, Path, description = "Function name", pattern = r"^[a-z0-9][a-z0-9_-]{0,63}$", max_length = 64, example = "hello")),
    request_body(content((DeployForm = "multipart/form-data"), (Vec<u8> = "application/octet-stream")),
        description = "multipart with parts `code` and optional `config`, or the raw artifact; source (Ruby, Python, JavaScript) by the config's `runtime`, the `code` part's file name or the Content-Type"),
    responses(
        (status = 201, description = "A new version", body = VersionView),
        (status = 200, description = "Same artifact and config as the latest version: no new version", body = VersionView),
        (status = 400, description = "Bad name, multipart or config", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody),
        (status = 413, description = "Artifact over the limit", body = ErrorBody),
        (status = 422, description = "Not valid code, or imports Kiln cannot provide", body = ErrorBody),
        (status = 503, description = "This server cannot build or run it: the microVM tier, or the language runtime of a function from source, is not available here; or the blob store did not keep the artifact (nothing deployed: try again)", body = ErrorBody)))]
pub async fn deploy(
    functions: &Functions,
    telemetry: &Telemetry,
    limits: &ServerConfig,
    budget: &BodyBudget,
    name: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, Problem> {
    let (parts, incoming) = req.into_parts();
    let upload = read_upload(&parts.headers, incoming, limits, budget).await;
    // What the request itself got wrong counts as a failed deploy, as the deploy's own refusals do.
    let (code, config, _held) = upload.inspect_err(|_| telemetry.metrics.deploys_failed.inc())?;
    let deployed = functions.deploy(name, code, config).await?;
    let status = if deployed.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(body::json(status, &VersionView::from(&deployed.record)))
}

/// The upload and its config, from a raw body or a multipart form.
async fn read_upload(
    headers: &http::HeaderMap,
    incoming: Incoming,
    limits: &ServerConfig,
    budget: &BodyBudget,
) -> Result<(Bytes, FunctionConfig, Held), Problem> {
    // The code cap plus room for the multipart framing and a config part.
    let limit = limits.max_code_bytes + 64 * 1024;
    let (bytes, held) = body::read(headers, incoming, limit, limits.body_read_timeout, budget).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (code, config) = if content_type.starts_with("multipart/form-data") {
        parse_multipart(content_type, bytes).await?
    } else {
        // A raw body is source when its Content-Type says so (`text/x-ruby`...).
        let config = FunctionConfig {
            runtime: Runtime::of_content_type(content_type),
            ..FunctionConfig::default()
        };
        (bytes, config)
    };
    if code.len() as u64 > limits.max_code_bytes {
        return Err(error::payload_too_large(limits.max_code_bytes));
    }
    Ok((code, config, held))
}

pub(super) async fn parse_multipart(content_type: &str, bytes: Bytes) -> Result<(Bytes, FunctionConfig), Problem> {
    let bad = |msg: String| error::invalid_request(format!("multipart body: {msg}"));
    let boundary = multer::parse_boundary(content_type).map_err(|e| bad(e.to_string()))?;
    let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(bytes) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let (mut code, mut config) = (None, None);
    let (mut file_name, mut code_type) = (None, None);
    while let Some(field) = multipart.next_field().await.map_err(|e| bad(e.to_string()))? {
        let name = field.name().unwrap_or("").to_owned();
        if name == "code" {
            file_name = field.file_name().map(str::to_owned);
            code_type = field.content_type().map(|m| m.essence_str().to_owned());
        }
        let data = field.bytes().await.map_err(|e| bad(e.to_string()))?;
        let slot = match name.as_str() {
            "code" => &mut code,
            "config" => &mut config,
            other => {
                return Err(bad(format!(
                    "unexpected part {other:?}; expected `code` and optionally `config`"
                )))
            }
        };
        if slot.replace(data).is_some() {
            return Err(bad(format!("part {name:?} appears twice")));
        }
    }
    let code = code.ok_or_else(|| bad("no `code` part".into()))?;
    let mut config = match config {
        Some(json) => FunctionConfig::from_json(&json).map_err(error::invalid_request)?,
        None => FunctionConfig::default(),
    };
    if source_by_name(&mut config, file_name.as_deref(), code_type.as_deref()) {
        config.check().map_err(error::invalid_request)?;
    }
    Ok((code, config))
}

/// A `code` part named `handler.rb` (or typed `text/x-ruby`) is Ruby source, and a single source
/// file's name is its handler's. True when the config was changed.
fn source_by_name(config: &mut FunctionConfig, file_name: Option<&str>, content_type: Option<&str>) -> bool {
    let base = file_name
        .map(|n| n.rsplit(['/', '\\']).next().unwrap_or(n))
        .filter(|n| kiln_core::tier::wasm::source::check_path(n).is_ok());
    let by_name = base.and_then(Runtime::of_file_name);
    let runtime = config
        .runtime
        .or(by_name)
        .or_else(|| content_type.and_then(Runtime::of_content_type));
    let Some(runtime) = runtime else { return false };
    let mut changed = config.runtime.replace(runtime).is_none();
    if config.handler.is_none() && by_name.is_some() {
        config.handler = base.map(str::to_owned);
        changed = true;
    }
    changed
}

#[utoipa::path(get, path = "/v1/functions", tag = "functions",
    responses((status = 200, description = "Every function's latest version", body = FunctionList), (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
pub async fn list(functions: &Functions) -> Result<Response<Body>, Problem> {
    let records = functions.list().await.map_err(Problem::from)?;
    #[derive(Serialize)]
    struct List<'a> {
        functions: Vec<VersionView<'a>>,
    }
    let functions = records.iter().map(VersionView::from).collect();
    Ok(body::json(StatusCode::OK, &List { functions }))
}

#[utoipa::path(get, path = "/v1/functions/{name}", tag = "functions", params(("name" = String, Path, description = "Function name", pattern = r"^[a-z0-9][a-z0-9_-]{0,63}$", max_length = 64)),
    responses((status = 200, description = "The latest version and a `versions` list", body = VersionView),
        (status = 400, description = "Not a function name", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody), (status = 404, description = "No such function", body = ErrorBody)))]
pub async fn get(functions: &Functions, name: &str) -> Result<Response<Body>, Problem> {
    let versions = functions.versions(name).await.map_err(Problem::from)?;
    let Some(latest) = versions.last() else {
        return Err(error::not_found(format!("no function named `{name}`")));
    };
    let mut view = serde_json::to_value(VersionView::from(latest)).expect("serialises");
    let list: Vec<_> = versions
        .iter()
        .map(|v| {
            serde_json::json!({
                "version": v.version,
                "digest": v.digest.prefixed(),
                "handle": format!("{}@{}", v.name, v.version),
                "created_at": v.created_at,
            })
        })
        .collect();
    view["versions"] = list.into();
    Ok(body::json(StatusCode::OK, &view))
}

#[utoipa::path(delete, path = "/v1/functions/{name}", tag = "functions", params(("name" = String, Path, description = "Function name", pattern = r"^[a-z0-9][a-z0-9_-]{0,63}$", max_length = 64)),
    responses((status = 204, description = "Removed with all its versions"),
        (status = 400, description = "Not a function name", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody), (status = 404, description = "No such function", body = ErrorBody)))]
pub async fn delete(functions: &Functions, name: &str) -> Result<Response<Body>, Problem> {
    functions.delete(name).await?;
    Ok(Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Body::default())
        .expect("static response"))
}
