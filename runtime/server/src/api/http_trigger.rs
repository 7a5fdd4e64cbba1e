//! `/fn/{name}/{*path}`: HTTP-trigger functions, any method. The guest sees the method, the path
//! after `/fn/{name}` (at least `/`), the query and the client's headers, minus `Authorization`
//! (Kiln's token is not the function's business) and the hop-by-hop headers of this connection.

use std::time::Instant;

use http::header::{self, HeaderName};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use kiln_core::auth::Auth;
use kiln_core::function::is_valid_function_name;
use kiln_core::functions::Functions;
use kiln_core::problem::Problem;
use kiln_core::telemetry::Telemetry;

use super::body::Body;
use super::error;
use super::openapi::ErrorBody;

/// Headers that describe one connection, never forwarded (RFC 9110, section 7.6.1).
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

#[utoipa::path(method(get, post, put, delete, patch, head, options), path = "/fn/{name}/{path}", tag = "invoke",
    params(("name" = String, Path, description = "Function name", pattern = r"^[a-z0-9][a-z0-9_-]{0,63}$", max_length = 64),
        ("path" = String, Path, description = "What the guest sees as its path (with the query), from `/`")),
    request_body(content = String, content_type = "application/octet-stream", description = "Streamed to the guest"),
    responses(
        (status = 200, description = "Whatever the guest answers (any status, headers and body), streamed, with `X-Kiln-Version` and `X-Kiln-Invocation-Id` (what the guest's identity tokens name) added",
            headers(("X-Kiln-Invocation-Id" = String), ("X-Kiln-Version" = u32))),
        (status = 400, description = "Not an HTTP-trigger function, or a bad name", body = ErrorBody),
        (status = 401, description = "Missing or wrong token (unless the function is public)", body = ErrorBody),
        (status = 403, description = "The token may not invoke this function", body = ErrorBody),
        (status = 404, description = "No such function", body = ErrorBody),
        (status = 429, description = "Concurrency limit reached", body = ErrorBody),
        (status = 502, description = "The function failed before answering", body = ErrorBody),
        (status = 504, description = "The function ran past its timeout before answering", body = ErrorBody)))]
pub async fn handle(
    auth: &Auth,
    functions: &Functions,
    telemetry: &Telemetry,
    name: &str,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Problem> {
    if !is_valid_function_name(name) {
        return Err(error::invalid_function_name(name));
    }
    let principal = auth.authenticate(req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()));
    // Authorise before loading anything: a client without a valid token learns nothing and costs
    // nothing unless the function is public (which the registry knows without loading it).
    match &principal {
        Some(p) if !p.may_invoke(name) => {
            return Err(error::forbidden(format!("this token may not invoke `{name}`")));
        }
        Some(_) => {}
        None if functions.is_public(name) => {}
        None => return Err(error::unauthorized()),
    }
    let resolved = functions.resolve(name, None).await?;
    let record = &resolved.function.record;
    if principal.is_none() && !record.config.public {
        return Err(error::unauthorized());
    }
    if req.uri().authority().is_none() && !req.headers().contains_key(header::HOST) {
        return Err(error::invalid_request("the request has no Host header"));
    }

    *req.uri_mut() = guest_uri(req.uri(), name)?;
    strip_headers(req.headers_mut());
    let started = Instant::now();
    let id = uuid::Uuid::now_v7().to_string();
    let outcome = functions
        .tiers
        .wasm
        .serve_http(resolved.function.clone(), &resolved.concurrency, &id, req)
        .await;
    telemetry.http_request(record, outcome.as_ref().map(|_| ()), started.elapsed());
    let mut response = outcome?.map(Body::Stream);
    let headers = response.headers_mut();
    headers.insert(super::invoke::VERSION, HeaderValue::from(record.version));
    headers.insert(
        super::invoke::INVOCATION_ID,
        HeaderValue::from_str(&id).expect("uuid is ASCII"),
    );
    Ok(response)
}

/// `/fn/{name}/a/b?x=1` → `/a/b?x=1`; `/fn/{name}` → `/`.
pub(super) fn guest_uri(uri: &Uri, name: &str) -> Result<Uri, Problem> {
    // The router ignores extra leading slashes (`//fn/x`); so does this.
    let rest = &uri.path().trim_start_matches('/')["fn/".len() + name.len()..];
    let path = if rest.is_empty() { "/" } else { rest };
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}").parse(),
        None => PathAndQuery::try_from(path),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.map_err(|_| error::invalid_request("the request path is not valid"))?);
    Uri::from_parts(parts).map_err(|_| error::invalid_request("the request URI is not valid"))
}

fn strip_headers(headers: &mut HeaderMap) {
    // Headers a `Connection` header names are hop-by-hop too.
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP.iter() {
        headers.remove(name);
    }
    headers.remove(header::AUTHORIZATION);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_sees_the_path_after_its_name() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        assert_eq!(guest_uri(&uri("/fn/hello"), "hello").unwrap(), "/");
        assert_eq!(guest_uri(&uri("/fn/hello/"), "hello").unwrap(), "/");
        assert_eq!(guest_uri(&uri("/fn/hello/a/b?x=1&y"), "hello").unwrap(), "/a/b?x=1&y");
        assert_eq!(guest_uri(&uri("/fn/hello?q"), "hello").unwrap(), "/?q");
        assert_eq!(guest_uri(&uri("//fn/hello/x"), "hello").unwrap(), "/x");
    }

    #[test]
    fn authorization_and_hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer secret"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("te", "trailers"),
            ("x-kept", "yes"),
            ("content-type", "text/plain"),
        ] {
            headers.insert(HeaderName::from_static(name), value.parse().unwrap());
        }
        strip_headers(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["content-type", "x-kept"]);
    }
}
