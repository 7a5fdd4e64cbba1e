//! The web console at `/ui/`: static files from `runtime/console/src`, built into the binary so
//! that `kiln serve` alone serves it (no second server, nothing fetched from a CDN). The console
//! is a client of the same `/v1` API as the CLI, with the token the user signs in with; these
//! files themselves carry no secret and need no token.
//!
//! Every answer forbids what the console never does (inline scripts and styles, other origins,
//! framing) in its Content-Security-Policy, and is revalidated by its ETag (`no-cache`), so a new
//! binary's console is seen at the next load.

use std::sync::OnceLock;

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use kiln_core::problem::Problem;
use sha2::Digest as _;

use super::body::Body;
use super::error;
use super::openapi::ErrorBody;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

macro_rules! assets {
    ($($name:literal => $content_type:literal),* $(,)?) => {
        &[$(($name, $content_type, include_bytes!(concat!("../../../console/src/", $name)))),*]
    };
}

/// (name, Content-Type, bytes).
const ASSETS: &[(&str, &str, &[u8])] = assets! {
    "index.html" => "text/html; charset=utf-8",
    "style.css" => "text/css; charset=utf-8",
    "icon.svg" => "image/svg+xml",
    "app.js" => "text/javascript; charset=utf-8",
    "api.js" => "text/javascript; charset=utf-8",
    "dom.js" => "text/javascript; charset=utf-8",
    "functions.js" => "text/javascript; charset=utf-8",
    "invocations.js" => "text/javascript; charset=utf-8",
    "metrics.js" => "text/javascript; charset=utf-8",
    "tokens.js" => "text/javascript; charset=utf-8",
    "sandboxes.js" => "text/javascript; charset=utf-8",
};

/// The files the console is made of, as the OpenAPI document lists them.
pub fn names() -> impl Iterator<Item = &'static str> {
    ASSETS.iter().map(|(name, _, _)| *name)
}

/// Each asset's strong ETag (its SHA-256, quoted), computed once.
fn etags() -> &'static [HeaderValue] {
    static ETAGS: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|(_, _, bytes)| {
                let digest = format!("{:x}", sha2::Sha256::digest(bytes));
                HeaderValue::from_str(&format!("\"{}\"", &digest[..32])).expect("hex is a valid header")
            })
            .collect()
    })
}

#[utoipa::path(get, path = "/ui", tag = "console", security(()),
    responses((status = 308, description = "To `/ui/`, where the console's relative links work", headers(("Location" = String)))))]
pub fn redirect() -> Response<Body> {
    Response::builder()
        .status(StatusCode::PERMANENT_REDIRECT)
        .header(header::LOCATION, "/ui/")
        .body(Body::default())
        .expect("static headers are valid")
}

#[utoipa::path(get, path = "/ui/", tag = "console", security(()),
    responses((status = 200, description = "The console's page; sign in with a token, or open `/ui/#token=<token>` (`kiln ui` prints it)", content_type = "text/html"),
        (status = 304, description = "Unchanged since the ETag given in `If-None-Match`")))]
pub fn index(headers: &HeaderMap) -> Response<Body> {
    serve(0, headers)
}

#[utoipa::path(get, path = "/ui/{asset}", tag = "console", security(()),
    params(("asset" = String, Path, description = "A file of the console", example = "app.js")),
    responses((status = 200, description = "The file",
            content(("text/javascript"), ("text/css"), ("text/html"), ("image/svg+xml"))),
        (status = 304, description = "Unchanged since the ETag given in `If-None-Match`"),
        (status = 404, description = "No such file", body = ErrorBody)))]
pub fn asset(name: &str, headers: &HeaderMap) -> Result<Response<Body>, Problem> {
    if name.is_empty() {
        return Ok(index(headers));
    }
    let index = ASSETS
        .iter()
        .position(|(asset, _, _)| *asset == name)
        .ok_or_else(|| error::not_found(format!("the console has no file {name:?}")))?;
    Ok(serve(index, headers))
}

fn serve(index: usize, headers: &HeaderMap) -> Response<Body> {
    let (_, content_type, bytes) = ASSETS[index];
    let etag = &etags()[index];
    let unchanged = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == etag || tag.trim() == "*"));
    let builder = Response::builder()
        .header(header::ETAG, etag)
        .header(header::CACHE_CONTROL, "no-cache")
        .header(header::CONTENT_SECURITY_POLICY, CSP)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::REFERRER_POLICY, "no-referrer")
        .header(header::X_FRAME_OPTIONS, "DENY");
    let response = if unchanged {
        builder.status(StatusCode::NOT_MODIFIED).body(Body::default())
    } else {
        builder
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::new(bytes))
    };
    response.expect("static headers are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_the_page_imports_is_served() {
        // A file the console imports but the table lacks would only show as a 404 in a browser.
        let names: Vec<&str> = ASSETS.iter().map(|(name, _, _)| *name).collect();
        for (name, _, bytes) in ASSETS {
            let text = std::str::from_utf8(bytes).unwrap();
            for quote in ['"', '\''] {
                for piece in text.split(quote).skip(1).step_by(2) {
                    if let Some(imported) = piece.strip_prefix("./").or_else(|| piece.strip_prefix("/ui/")) {
                        if imported.ends_with(".js") || imported.ends_with(".css") || imported.ends_with(".svg") {
                            assert!(
                                names.contains(&imported),
                                "{name} refers to {imported}, which is not served"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn an_etag_match_is_answered_304() {
        let mut headers = HeaderMap::new();
        let first = index(&headers);
        assert_eq!(first.status(), StatusCode::OK);
        assert!(first.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("script-src 'self'"));
        headers.insert(header::IF_NONE_MATCH, first.headers()[header::ETAG].clone());
        assert_eq!(index(&headers).status(), StatusCode::NOT_MODIFIED);
        assert!(asset("nope.js", &headers).is_err());
    }
}
