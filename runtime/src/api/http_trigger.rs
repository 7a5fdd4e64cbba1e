//! `/fn/{name}/{*path}`: HTTP-trigger functions, any method. The guest sees the method, the path
//! after `/fn/{name}` (at least `/`), the query and the client's headers, minus `Authorization`
//! (Kiln's token is not the function's business) and the hop-by-hop headers of this connection.

use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderName};
use http::{HeaderMap, Request, Response, Uri};
use hyper::body::Incoming;

use super::body::Body;
use super::error::ApiError;
use crate::app::App;
use crate::config::is_valid_function_name;
use crate::trigger;

/// Headers that describe one connection, never forwarded (RFC 9110, section 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub async fn handle(app: &Arc<App>, name: &str, mut req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    if !is_valid_function_name(name) {
        return Err(ApiError::invalid_request(format!(
            "invalid function name {name:?}: names match ^[a-z0-9][a-z0-9_-]{{0,63}}$"
        )));
    }
    let authorized = app
        .auth
        .check(req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()));
    let resolved = app.resolve(name, None).await;
    // Without a valid token, an unknown function and a private one look the same.
    let (function, concurrency) = match resolved {
        Ok((f, c)) if authorized || f.record.config.public => (f, c),
        Ok(_) => return Err(ApiError::unauthorized()),
        Err(_) if !authorized => return Err(ApiError::unauthorized()),
        Err(e) => return Err(e.into()),
    };

    *req.uri_mut() = guest_uri(req.uri(), name)?;
    strip_headers(req.headers_mut());
    let started = Instant::now();
    let version = function.record.version;
    let outcome = trigger::serve(app, function.clone(), concurrency, req).await;
    let metrics = &app.metrics;
    match outcome {
        Ok(response) => {
            metrics.invocations_ok.inc();
            tracing::debug!(
                function = name,
                version,
                elapsed_us = started.elapsed().as_micros() as u64,
                "http trigger answered"
            );
            let mut response = response.map(Body::Stream);
            response
                .headers_mut()
                .insert(super::invoke::VERSION, function.version_header.clone());
            Ok(response)
        }
        Err(e) => {
            match &e {
                crate::invoke::InvokeError::Timeout(_) => metrics.invocations_timeout.inc(),
                crate::invoke::InvokeError::Failed(_) => metrics.invocations_failed.inc(),
                _ => metrics.invocations_rejected.inc(),
            }
            tracing::debug!(function = name, version, error = %e, "http trigger failed");
            Err(e.into())
        }
    }
}

/// `/fn/{name}/a/b?x=1` → `/a/b?x=1`; `/fn/{name}` → `/`.
fn guest_uri(uri: &Uri, name: &str) -> Result<Uri, ApiError> {
    let prefix_len = "/fn/".len() + name.len();
    let rest = &uri.path()[prefix_len..];
    let path = if rest.is_empty() { "/" } else { rest };
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|_| ApiError::invalid_request("the request path is not valid"))?,
    );
    Uri::from_parts(parts).map_err(|_| ApiError::invalid_request("the request URI is not valid"))
}

fn strip_headers(headers: &mut HeaderMap) {
    // Headers a `Connection` header names are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
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
