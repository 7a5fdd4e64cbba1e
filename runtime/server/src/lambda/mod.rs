//! AWS Lambda's REST API (version `2015-03-31`) as a second front door onto the same functions,
//! so boto3, the AWS CLI and the SDKs work against Kiln unchanged. Requests are authenticated
//! by Signature Version 4 with access keys from `POST /v1/tokens` (`"kind": "aws"`); answers and
//! errors have Lambda's shapes (`error.rs`).
//!
//! How Lambda's model maps onto Kiln's: every Kiln deploy is an immutable version, so
//! `$LATEST` is the latest version, `PublishVersion` names it, and a `Qualifier` is a version
//! number. Handlers written to Lambda's conventions run on the languages of functions from
//! source (`kiln_core::lambda`); `kiln-wasm` deploys the `.wasm` a zip holds. What the API has
//! and Kiln has not (layers, VPCs, aliases…) is refused naming it, never ignored.

pub mod creations;
mod error;
mod functions;
mod invoke;
pub mod sigv4;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, Method, Request, Response};
use hyper::body::Incoming;

use crate::api::body::{self, Body};
use crate::Server;
pub use error::LambdaError;

/// The path's first segment for Lambda's API dates (`2015-03-31`, `2017-03-31`, …).
pub fn is_api_date(segment: &str) -> bool {
    let b = segment.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

/// A Lambda operation, from the method and path.
#[derive(Debug, PartialEq, Eq)]
enum Operation<'a> {
    CreateFunction,
    ListFunctions,
    GetFunction(&'a str),
    DeleteFunction(&'a str),
    GetFunctionConfiguration(&'a str),
    UpdateFunctionConfiguration(&'a str),
    UpdateFunctionCode(&'a str),
    PublishVersion(&'a str),
    ListVersionsByFunction(&'a str),
    Invoke(&'a str),
}

fn operation<'a>(method: &Method, segments: &[&'a str]) -> Option<Operation<'a>> {
    use Operation::*;
    let op = match (method, segments) {
        (&Method::POST, ["2015-03-31", "functions"] | ["2015-03-31", "functions", ""]) => CreateFunction,
        (&Method::GET, ["2015-03-31", "functions"] | ["2015-03-31", "functions", ""]) => ListFunctions,
        (&Method::GET, ["2015-03-31", "functions", name]) => GetFunction(name),
        (&Method::DELETE, ["2015-03-31", "functions", name]) => DeleteFunction(name),
        (&Method::GET, ["2015-03-31", "functions", name, "configuration"]) => GetFunctionConfiguration(name),
        (&Method::PUT, ["2015-03-31", "functions", name, "configuration"]) => UpdateFunctionConfiguration(name),
        (&Method::PUT, ["2015-03-31", "functions", name, "code"]) => UpdateFunctionCode(name),
        (&Method::POST, ["2015-03-31", "functions", name, "versions"]) => PublishVersion(name),
        (&Method::GET, ["2015-03-31", "functions", name, "versions"]) => ListVersionsByFunction(name),
        (&Method::POST, ["2015-03-31", "functions", name, "invocations"]) => Invoke(name),
        _ => return None,
    };
    Some(op)
}

/// What an operation Kiln does not have is, for the refusal's message.
fn unsupported(segments: &[&str]) -> &'static str {
    match segments {
        [_, "functions", _, "aliases", ..] => "aliases",
        [_, "functions", _, "policy", ..] => "resource policies",
        [_, "functions", _, "concurrency", ..] | [_, "functions", _, "provisioned-concurrency", ..] => {
            "reserved and provisioned concurrency (Kiln's max_concurrency is set in the config)"
        }
        [_, "functions", _, "url", ..] => "function URLs (Kiln's HTTP triggers are at /fn/NAME/)",
        [_, "functions", _, "event-invoke-config", ..] => "event invoke configs",
        [_, "functions", _, "code-signing-config", ..] => "code signing",
        [_, "event-source-mappings", ..] => "event source mappings",
        [_, "layers", ..] => "layers",
        [_, "tags", ..] => "tags",
        [_, "account-settings", ..] => "account settings",
        _ => "this operation",
    }
}

/// Answers a request under a Lambda API date path.
pub async fn handle(server: &Server, req: Request<Incoming>) -> Response<Body> {
    let request_id = uuid::Uuid::now_v7().to_string();
    let mut response = match serve(server, req, &request_id).await {
        Ok(response) => response,
        Err(e) => e.response(),
    };
    if let Ok(value) = http::HeaderValue::from_str(&request_id) {
        response.headers_mut().entry("x-amzn-requestid").or_insert(value);
    }
    response
}

async fn serve(server: &Server, req: Request<Incoming>, request_id: &str) -> Result<Response<Body>, LambdaError> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    let (parts, incoming) = req.into_parts();
    // Who signed it, before the body is read: an unknown key costs no buffering.
    let authorization = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| LambdaError::signature(sigv4::Refused::Malformed))?;
    let credential = sigv4::parse(authorization).map_err(LambdaError::signature)?;
    let (secret, principal) = server
        .kiln
        .auth
        .aws_key(credential.access_key_id)
        .ok_or_else(|| LambdaError::signature(sigv4::Refused::UnknownKey))?;
    // The whole body, then: its hash is part of the signature.
    let limit = server.config.max_code_bytes * 4 / 3 + 64 * 1024;
    let (bytes, _held) = body::read(
        &parts.headers,
        incoming,
        limit,
        server.config.body_read_timeout,
        &server.bodies,
    )
    .await
    .map_err(LambdaError::from)?;
    verify(&parts, &credential, &secret, &bytes)?;
    let Some(op) = operation(&method, &segments) else {
        return Err(LambdaError::invalid(format!(
            "Kiln's Lambda API does not support {} ({method} {path})",
            unsupported(&segments[..])
        )));
    };
    let query = parts.uri.query().unwrap_or("");
    let kiln = &server.kiln;
    if !principal.is_admin() && !matches!(op, Operation::Invoke(_)) {
        return Err(LambdaError::access_denied(
            "this access key may only invoke its functions",
        ));
    }
    use Operation::*;
    match op {
        CreateFunction => functions::create(kiln, &server.lambda_creations, &bytes).await,
        ListFunctions => functions::list(kiln, query).await,
        GetFunction(name) => functions::get(kiln, &server.lambda_creations, name, query, true).await,
        GetFunctionConfiguration(name) => functions::get(kiln, &server.lambda_creations, name, query, false).await,
        DeleteFunction(name) => functions::delete(kiln, name, query).await,
        UpdateFunctionCode(name) => functions::update_code(kiln, name, &bytes).await,
        UpdateFunctionConfiguration(name) => functions::update_configuration(kiln, name, &bytes).await,
        PublishVersion(name) => functions::publish(kiln, name).await,
        ListVersionsByFunction(name) => functions::versions(kiln, name).await,
        Invoke(name) => invoke::invoke(server, &principal, name, query, &parts.headers, bytes, request_id).await,
    }
}

/// Checks the request's SigV4 signature against the access key's secret.
fn verify(
    parts: &http::request::Parts,
    credential: &sigv4::Credential<'_>,
    secret: &str,
    body: &Bytes,
) -> Result<(), LambdaError> {
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    let request = sigv4::Request {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
        host,
        body,
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64;
    sigv4::verify(credential, secret, &request, now).map_err(LambdaError::signature)
}

/// A function name as Lambda's API may give it: a name, `name:qualifier`, or an ARN (Kiln's or
/// any region's), with the qualifier of the path or the `Qualifier` parameter.
fn function_name<'a>(raw: &'a str, query: &'a str) -> Result<(String, Option<String>), LambdaError> {
    let decoded = sigv4::decode(raw);
    let rest = match decoded.split_once(":function:") {
        Some((_, rest)) => rest.to_owned(),
        None => decoded,
    };
    let (name, mut qualifier) = match rest.split_once(':') {
        Some((name, qualifier)) => (name.to_owned(), Some(qualifier.to_owned())),
        None => (rest, None),
    };
    for (key, value) in query_pairs(query) {
        if key == "Qualifier" {
            qualifier = Some(value);
        }
    }
    if !kiln_core::function::is_valid_function_name(&name) {
        return Err(LambdaError::invalid(format!(
            "function name {name:?} is not valid on Kiln: names match ^[a-z0-9][a-z0-9_-]{{0,63}}$ (lowercase)"
        )));
    }
    Ok((name, qualifier.filter(|q| q != "$LATEST")))
}

/// A qualifier as a Kiln version number.
fn version_of(qualifier: Option<&str>) -> Result<Option<u32>, LambdaError> {
    match qualifier {
        None => Ok(None),
        Some(q) => q.parse::<u32>().ok().filter(|v| *v > 0).map(Some).ok_or_else(|| {
            LambdaError::invalid(format!(
                "qualifier {q:?} is not a version number: Kiln has versions and $LATEST, not aliases"
            ))
        }),
    }
}

fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (sigv4::decode(k), sigv4::decode(v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_and_names_are_read_as_lambda_sends_them() {
        let segments = |path: &'static str| path.trim_start_matches('/').split('/').collect::<Vec<_>>();
        assert_eq!(
            operation(&Method::GET, &segments("/2015-03-31/functions/")),
            Some(Operation::ListFunctions)
        );
        assert_eq!(
            operation(&Method::POST, &segments("/2015-03-31/functions/f/invocations")),
            Some(Operation::Invoke("f"))
        );
        assert_eq!(
            operation(&Method::GET, &segments("/2015-03-31/functions/f/aliases")),
            None
        );
        assert_eq!(unsupported(&segments("/2015-03-31/functions/f/aliases")), "aliases");
        assert!(is_api_date("2015-03-31") && !is_api_date("v1") && !is_api_date("2015-03-3x"));

        let name = |raw, query| function_name(raw, query).unwrap();
        assert_eq!(name("hello", ""), ("hello".into(), None));
        assert_eq!(name("hello%3A3", ""), ("hello".into(), Some("3".into())));
        assert_eq!(name("hello", "Qualifier=%24LATEST"), ("hello".into(), None));
        assert_eq!(
            name(
                "arn%3Aaws%3Alambda%3Aus-east-1%3A123456789012%3Afunction%3Ahello",
                "Qualifier=2"
            ),
            ("hello".into(), Some("2".into()))
        );
        assert!(function_name("Hello", "").is_err());
        assert!(version_of(Some("prod")).is_err());
        assert_eq!(version_of(Some("7")).unwrap(), Some(7));
    }
}
