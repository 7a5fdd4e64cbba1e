//! Lambda's function operations over Kiln's deploys: create, get, list, update code or
//! configuration, publish, list versions, delete. Every change is a Kiln deploy (a new version);
//! a function's shape as Lambda shows it (`FunctionConfiguration`) is made from the version's
//! record.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::{Response, StatusCode};
use kiln_core::function::{FunctionConfig, Runtime, Tier, VersionRecord};
use kiln_core::lambda::LambdaHandler;
use kiln_core::problem::Problem;
use kiln_core::storage::BlobKind;
use kiln_core::Kiln;
use serde_json::{json, Map, Value};

use super::creations::{Creations, CREATE_WAIT};
use super::{function_name, query_pairs, version_of, LambdaError};
use crate::api::body::{self, Body};

/// The runtime identifier of a zip holding a WebAssembly module or component.
const KILN_WASM: &str = "kiln-wasm";
/// Lambda's defaults.
const DEFAULT_TIMEOUT_S: u64 = 3;
const DEFAULT_MEMORY_MB: u64 = 128;

fn kiln_error(e: impl Into<Problem>) -> LambdaError {
    LambdaError::from(e.into())
}

/// The request's JSON object; names any field Kiln does not support.
fn request_object(body: &[u8], supported: &[&str]) -> Result<Map<String, Value>, LambdaError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| LambdaError::invalid(format!("the request is not JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(LambdaError::invalid("the request is not a JSON object"));
    };
    for (key, value) in &object {
        if supported.contains(&key.as_str()) {
            continue;
        }
        // Values that ask for nothing Kiln lacks are accepted as what they are.
        let harmless = match key.as_str() {
            "Architectures" => value == &json!(["x86_64"]),
            "PackageType" => value == "Zip",
            "TracingConfig" => value == &json!({"Mode": "PassThrough"}),
            "Tags" | "Layers" => {
                value.as_object().is_some_and(Map::is_empty) || value.as_array().is_some_and(Vec::is_empty)
            }
            "DryRun" => value == false,
            _ => false,
        };
        if !harmless {
            return Err(LambdaError::invalid(format!(
                "Kiln does not support {key} (see README, \"Coming from Lambda\")"
            )));
        }
    }
    Ok(object)
}

fn string<'a>(object: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, LambdaError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(LambdaError::invalid(format!("{key} must be a string"))),
    }
}

fn number(
    object: &Map<String, Value>,
    key: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, LambdaError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64().filter(|n| range.contains(n)) {
            Some(n) => Ok(Some(n)),
            None => Err(LambdaError::invalid(format!(
                "{key} must be an integer from {} to {} on Kiln",
                range.start(),
                range.end()
            ))),
        },
    }
}

/// The zip of `Code.ZipFile` or of `ZipFile`, decoded.
fn zip_file(value: Option<&Value>) -> Result<Bytes, LambdaError> {
    let text = value.and_then(Value::as_str).ok_or_else(|| {
        LambdaError::invalid(
            "ZipFile (the function's zip, base64) is required: Kiln does not read code from S3 or images",
        )
    })?;
    let zip = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| LambdaError::invalid(format!("ZipFile is not base64: {e}")))?;
    Ok(Bytes::from(zip))
}

/// Applies the configuration fields a request may set to `config`.
fn configure(config: &mut FunctionConfig, object: &Map<String, Value>, runtime: &str) -> Result<(), LambdaError> {
    let max_timeout_s = kiln_core::function::MAX_TIMEOUT_MS / 1000;
    if let Some(timeout) = number(object, "Timeout", 1..=max_timeout_s)? {
        config.timeout_ms = timeout * 1000;
    }
    if let Some(memory) = number(object, "MemorySize", 128..=kiln_core::function::MAX_MEMORY_MB)? {
        config.memory_mb = memory;
    }
    if let Some(environment) = object.get("Environment") {
        let variables = environment.get("Variables").cloned().unwrap_or(json!({}));
        let env: BTreeMap<String, String> = serde_json::from_value(variables)
            .map_err(|_| LambdaError::invalid("Environment.Variables must map names to strings"))?;
        config.env = env;
    }
    let handler = string(object, "Handler")?;
    if runtime == KILN_WASM {
        config.lambda = None;
        config.runtime = None;
        return Ok(());
    }
    let language = kiln_core::lambda::language(runtime).map_err(LambdaError::invalid)?;
    let previous = config.lambda.take();
    let handler = match (handler, &previous) {
        (Some(handler), _) => handler.to_owned(),
        (None, Some(previous)) => previous.handler.clone(),
        (None, None) => {
            return Err(LambdaError::invalid(
                "Handler is required for runtime ".to_owned() + runtime,
            ))
        }
    };
    let keep = |key: &str, old: Option<String>| -> Result<Option<String>, LambdaError> {
        Ok(match string(object, key)? {
            Some(value) => Some(value.to_owned()),
            None => old,
        })
    };
    config.lambda = Some(LambdaHandler {
        runtime: runtime.to_owned(),
        handler,
        role: keep("Role", previous.as_ref().and_then(|p| p.role.clone()))?,
        description: keep("Description", previous.as_ref().and_then(|p| p.description.clone()))?,
    });
    config.runtime = Some(language);
    config.tier = Tier::Wasm;
    Ok(())
}

/// What a deploy takes for `runtime`: the zip itself for a language, the module in it for
/// `kiln-wasm` (the `Handler` names it, or it is the zip's only `.wasm`).
fn code_for(runtime: &str, zip: Bytes, handler: Option<&str>) -> Result<Bytes, LambdaError> {
    if runtime != KILN_WASM {
        return Ok(zip);
    }
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip))
        .map_err(|e| LambdaError::invalid(format!("ZipFile is not a zip archive: {e}")))?;
    let names: Vec<String> = archive
        .file_names()
        .filter(|n| handler.map_or(n.ends_with(".wasm"), |h| *n == h))
        .map(str::to_owned)
        .collect();
    let [name] = &names[..] else {
        return Err(LambdaError::invalid(match handler {
            Some(h) => format!("the zip has no file {h:?} (the Handler)"),
            None => "a kiln-wasm zip holds one .wasm file, or the Handler names it".to_owned(),
        }));
    };
    let mut file = archive
        .by_name(name)
        .map_err(|e| LambdaError::invalid(format!("reading {name} from the zip: {e}")))?;
    let mut wasm = Vec::new();
    file.read_to_end(&mut wasm)
        .map_err(|e| LambdaError::invalid(format!("reading {name} from the zip: {e}")))?;
    Ok(Bytes::from(wasm))
}

pub async fn create(kiln: &Arc<Kiln>, creations: &Arc<Creations>, body: &[u8]) -> Result<Response<Body>, LambdaError> {
    let object = request_object(
        body,
        &[
            "FunctionName",
            "Runtime",
            "Role",
            "Handler",
            "Code",
            "Description",
            "Timeout",
            "MemorySize",
            "Publish",
            "Environment",
        ],
    )?;
    let raw_name = string(&object, "FunctionName")?.ok_or_else(|| LambdaError::invalid("FunctionName is required"))?;
    let (name, qualifier) = function_name(raw_name, "")?;
    if qualifier.is_some() {
        return Err(LambdaError::invalid("FunctionName must not carry a qualifier"));
    }
    let runtime = string(&object, "Runtime")?.ok_or_else(|| LambdaError::invalid("Runtime is required"))?;
    if let Some(code) = object.get("Code").and_then(Value::as_object) {
        if let Some(key) = code.keys().find(|k| *k != "ZipFile") {
            return Err(LambdaError::invalid(format!(
                "Kiln does not support Code.{key}: send the zip as Code.ZipFile"
            )));
        }
    }
    let zip = zip_file(object.get("Code").and_then(|c| c.get("ZipFile")))?;
    let zip_len = zip.len();
    let mut config = FunctionConfig {
        timeout_ms: DEFAULT_TIMEOUT_S * 1000,
        memory_mb: DEFAULT_MEMORY_MB,
        ..FunctionConfig::default()
    };
    configure(&mut config, &object, runtime)?;
    config.check().map_err(LambdaError::invalid)?;
    let code = code_for(runtime, zip, string(&object, "Handler")?)?;
    let existing = kiln.functions.versions(&name).await.map_err(LambdaError::internal)?;
    let exists = || LambdaError::conflict(format!("Function already exist: {name}"));
    if !existing.is_empty() {
        return Err(exists());
    }
    if !creations.begin(&name, pending_view(&name, &config, &code, zip_len)) {
        return Err(exists());
    }
    // The deploy runs on its own: past `CREATE_WAIT` the answer is `Pending` and it carries on.
    let deploy = tokio::spawn({
        let (kiln, creations, name) = (kiln.clone(), creations.clone(), name.clone());
        async move {
            // The reason shown is the user's message (an internal failure's cause stays in the log).
            let deployed = kiln.functions.deploy(&name, code, config).await.map_err(Problem::from);
            match &deployed {
                Ok(_) => creations.succeeded(&name),
                Err(problem) => creations.failed(&name, &problem.message),
            }
            deployed
        }
    });
    let deployed = match tokio::time::timeout(CREATE_WAIT, deploy).await {
        Ok(done) => {
            // Answered now, whatever the outcome: nothing for GetFunction to show meanwhile.
            creations.succeeded(&name);
            done.expect("the deploy task panicked").map_err(kiln_error)?
        }
        Err(_) => {
            let view = creations.view(&name).unwrap_or_default();
            return Ok(body::json(StatusCode::CREATED, &view));
        }
    };
    let publish = object.get("Publish").and_then(Value::as_bool).unwrap_or(false);
    let label = if publish {
        deployed.record.version.to_string()
    } else {
        "$LATEST".to_owned()
    };
    let view = configuration(kiln, &deployed.record, &label).await?;
    Ok(body::json(StatusCode::CREATED, &view))
}

/// `FunctionConfiguration` of a function being created (`creations` sets its state).
fn pending_view(name: &str, config: &FunctionConfig, code: &[u8], zip_len: usize) -> Value {
    let lambda = config.lambda.as_ref();
    let text = |value: Option<&String>| value.cloned().unwrap_or_default();
    json!({
        "FunctionName": name,
        "FunctionArn": kiln_core::lambda::arn(name, None),
        "Runtime": lambda.map(|l| l.runtime.clone()).unwrap_or_else(|| KILN_WASM.to_owned()),
        "Role": text(lambda.and_then(|l| l.role.as_ref())),
        "Handler": lambda.map(|l| l.handler.clone()).unwrap_or_default(),
        "CodeSize": zip_len,
        "Description": text(lambda.and_then(|l| l.description.as_ref())),
        "Timeout": config.timeout_ms.div_ceil(1000),
        "MemorySize": config.memory_mb,
        "LastModified": last_modified(&kiln_core::clock::now_rfc3339()),
        "CodeSha256": hex_to_base64(kiln_core::digest::Digest::of(code).hex()),
        "Version": "$LATEST",
        "Environment": { "Variables": config.env },
        "TracingConfig": { "Mode": "PassThrough" },
        "PackageType": "Zip",
        "Architectures": ["x86_64"],
        "EphemeralStorage": { "Size": 512 },
    })
}

/// `FunctionConfiguration` of a version, shown as `label` (`$LATEST` or its number).
async fn configuration(kiln: &Kiln, record: &VersionRecord, label: &str) -> Result<Value, LambdaError> {
    let (blobs, digest) = (kiln.storage.blobs.clone(), record.digest.clone());
    let code_size = tokio::task::spawn_blocking(move || {
        blobs
            .open(BlobKind::Artifact, &digest)
            .and_then(|f| f.metadata())
            .map(|m| m.len())
            .unwrap_or(0)
    })
    .await
    .unwrap_or(0);
    let config = &record.config;
    let (runtime, handler, role, description) = match (&config.lambda, config.runtime) {
        (Some(l), _) => (
            l.runtime.clone(),
            l.handler.clone(),
            l.role.clone().unwrap_or_default(),
            l.description.clone().unwrap_or_default(),
        ),
        (None, Some(language)) => (
            format!("kiln-{}", language.as_str()),
            config.handler.clone().unwrap_or_default(),
            String::new(),
            String::new(),
        ),
        (None, None) => (KILN_WASM.to_owned(), String::new(), String::new(), String::new()),
    };
    let sha = hex_to_base64(record.digest.hex());
    let qualifier = (label != "$LATEST").then_some(label);
    Ok(json!({
        "FunctionName": record.name,
        "FunctionArn": kiln_core::lambda::arn(&record.name, qualifier),
        "Runtime": runtime,
        "Role": role,
        "Handler": handler,
        "CodeSize": code_size,
        "Description": description,
        "Timeout": config.timeout_ms.div_ceil(1000),
        "MemorySize": config.memory_mb,
        "LastModified": last_modified(&record.created_at),
        "CodeSha256": sha,
        "Version": label,
        "Environment": { "Variables": config.env },
        "TracingConfig": { "Mode": "PassThrough" },
        "RevisionId": format!("kiln-{}-{}", record.name, record.version),
        "State": "Active",
        "LastUpdateStatus": "Successful",
        "PackageType": "Zip",
        "Architectures": ["x86_64"],
        "EphemeralStorage": { "Size": 512 },
    }))
}

fn hex_to_base64(hex: &str) -> String {
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Lambda's `2019-09-24T18:48:12.231+0000` from Kiln's RFC 3339 time.
fn last_modified(created_at: &str) -> String {
    let format = time::format_description::well_known::Rfc3339;
    match time::OffsetDateTime::parse(created_at, &format) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}+0000",
            t.year(),
            t.month() as u8,
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        Err(_) => created_at.to_owned(),
    }
}

/// The version a qualifier names, or the latest.
async fn record(kiln: &Kiln, name: &str, qualifier: Option<&str>) -> Result<(VersionRecord, String), LambdaError> {
    let version = version_of(qualifier)?;
    let versions = kiln.functions.versions(name).await.map_err(LambdaError::internal)?;
    let not_found = || {
        LambdaError::not_found(format!(
            "Function not found: {}",
            kiln_core::lambda::arn(name, qualifier)
        ))
    };
    match version {
        None => {
            let latest = versions.into_iter().last().ok_or_else(not_found)?;
            Ok((latest, "$LATEST".to_owned()))
        }
        Some(v) => {
            let record = versions.into_iter().find(|r| r.version == v).ok_or_else(not_found)?;
            Ok((record, v.to_string()))
        }
    }
}

pub async fn get(
    kiln: &Kiln,
    creations: &Creations,
    raw: &str,
    query: &str,
    full: bool,
) -> Result<Response<Body>, LambdaError> {
    let (name, qualifier) = function_name(raw, query)?;
    let view = match record(kiln, &name, qualifier.as_deref()).await {
        Ok((record, label)) => configuration(kiln, &record, &label).await?,
        Err(e) => match qualifier {
            None => creations.view(&name).ok_or(e)?,
            Some(_) => return Err(e),
        },
    };
    let answer = if full {
        json!({ "Configuration": view, "Code": { "RepositoryType": "Kiln" } })
    } else {
        view
    };
    Ok(body::json(StatusCode::OK, &answer))
}

pub async fn list(kiln: &Kiln, query: &str) -> Result<Response<Body>, LambdaError> {
    let (mut marker, mut max_items) = (None, 50usize);
    for (key, value) in query_pairs(query) {
        match key.as_str() {
            "Marker" => marker = Some(value),
            "MaxItems" => {
                max_items = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| LambdaError::invalid("MaxItems must be from 1 to 10000"))?
            }
            "FunctionVersion" | "MasterRegion" => {
                return Err(LambdaError::invalid(format!(
                    "Kiln does not support {key} in ListFunctions"
                )))
            }
            _ => {}
        }
    }
    let mut latest = kiln.functions.list().await.map_err(LambdaError::internal)?;
    latest.sort_by(|a, b| a.name.cmp(&b.name));
    let start = marker.map_or(0, |m| latest.partition_point(|r| r.name.as_str() <= m.as_str()));
    let page: Vec<&VersionRecord> = latest.iter().skip(start).take(max_items).collect();
    let mut functions = Vec::with_capacity(page.len());
    for record in &page {
        functions.push(configuration(kiln, record, "$LATEST").await?);
    }
    let mut answer = json!({ "Functions": functions });
    if start + page.len() < latest.len() {
        if let Some(last) = page.last() {
            answer["NextMarker"] = json!(last.name);
        }
    }
    Ok(body::json(StatusCode::OK, &answer))
}

pub async fn delete(kiln: &Kiln, raw: &str, query: &str) -> Result<Response<Body>, LambdaError> {
    let (name, qualifier) = function_name(raw, query)?;
    if qualifier.is_some() {
        return Err(LambdaError::invalid(
            "Kiln does not delete single versions: delete the function (without a Qualifier)",
        ));
    }
    kiln.functions.delete(&name).await.map_err(|e| match e {
        kiln_core::deploy::DeployError::NotFound(_) => {
            LambdaError::not_found(format!("Function not found: {}", kiln_core::lambda::arn(&name, None)))
        }
        other => kiln_error(other),
    })?;
    Ok(Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Body::default())
        .expect("static response"))
}

/// Deploys `code` (or the latest version's own, when `None`) with `config` as a new version.
async fn redeploy(
    kiln: &Kiln,
    latest: &VersionRecord,
    code: Option<Bytes>,
    config: FunctionConfig,
    publish: bool,
) -> Result<Response<Body>, LambdaError> {
    let code = match code {
        Some(code) => code,
        None => {
            let (blobs, digest) = (kiln.storage.blobs.clone(), latest.digest.clone());
            let bytes = tokio::task::spawn_blocking(move || blobs.get(BlobKind::Artifact, &digest))
                .await
                .expect("blob task panicked")
                .map_err(LambdaError::internal)?;
            Bytes::from(bytes)
        }
    };
    let deployed = kiln
        .functions
        .deploy(&latest.name, code, config)
        .await
        .map_err(kiln_error)?;
    let label = if publish {
        deployed.record.version.to_string()
    } else {
        "$LATEST".to_owned()
    };
    Ok(body::json(
        StatusCode::OK,
        &configuration(kiln, &deployed.record, &label).await?,
    ))
}

fn runtime_of(record: &VersionRecord) -> String {
    match (&record.config.lambda, record.config.runtime) {
        (Some(l), _) => l.runtime.clone(),
        (None, Some(Runtime::Python)) => "python3.12".into(),
        (None, Some(Runtime::Javascript)) => "nodejs22.x".into(),
        (None, Some(Runtime::Ruby)) => "ruby3.4".into(),
        (None, None) => KILN_WASM.into(),
    }
}

pub async fn update_code(kiln: &Kiln, raw: &str, body: &[u8]) -> Result<Response<Body>, LambdaError> {
    let object = request_object(body, &["ZipFile", "Publish", "RevisionId"])?;
    let (name, _) = function_name(raw, "")?;
    let (latest, _) = record(kiln, &name, None).await?;
    let zip = zip_file(object.get("ZipFile"))?;
    let runtime = runtime_of(&latest);
    let handler = latest.config.lambda.as_ref().map(|l| l.handler.clone());
    let code = code_for(
        &runtime,
        zip,
        if runtime == KILN_WASM { None } else { handler.as_deref() },
    )?;
    let publish = object.get("Publish").and_then(Value::as_bool).unwrap_or(false);
    redeploy(kiln, &latest, Some(code), latest.config.clone(), publish).await
}

pub async fn update_configuration(kiln: &Kiln, raw: &str, body: &[u8]) -> Result<Response<Body>, LambdaError> {
    let object = request_object(
        body,
        &[
            "Role",
            "Handler",
            "Description",
            "Timeout",
            "MemorySize",
            "Environment",
            "Runtime",
            "RevisionId",
        ],
    )?;
    let (name, _) = function_name(raw, "")?;
    let (latest, _) = record(kiln, &name, None).await?;
    let current = runtime_of(&latest);
    let runtime = string(&object, "Runtime")?.unwrap_or(&current).to_owned();
    if (runtime == KILN_WASM) != (current == KILN_WASM) {
        return Err(LambdaError::invalid(format!(
            "Kiln cannot change a function's runtime from {current} to {runtime}: deploy new code"
        )));
    }
    let mut config = latest.config.clone();
    configure(&mut config, &object, &runtime)?;
    config.check().map_err(LambdaError::invalid)?;
    redeploy(kiln, &latest, None, config, false).await
}

pub async fn publish(kiln: &Kiln, raw: &str) -> Result<Response<Body>, LambdaError> {
    let (name, _) = function_name(raw, "")?;
    let (latest, _) = record(kiln, &name, None).await?;
    let label = latest.version.to_string();
    Ok(body::json(
        StatusCode::CREATED,
        &configuration(kiln, &latest, &label).await?,
    ))
}

pub async fn versions(kiln: &Kiln, raw: &str) -> Result<Response<Body>, LambdaError> {
    let (name, _) = function_name(raw, "")?;
    let all = kiln.functions.versions(&name).await.map_err(LambdaError::internal)?;
    let Some(latest) = all.last() else {
        return Err(LambdaError::not_found(format!(
            "Function not found: {}",
            kiln_core::lambda::arn(&name, None)
        )));
    };
    let mut versions = vec![configuration(kiln, latest, "$LATEST").await?];
    for record in &all {
        versions.push(configuration(kiln, record, &record.version.to_string()).await?);
    }
    Ok(body::json(StatusCode::OK, &json!({ "Versions": versions })))
}
