//! `http://kiln.internal`: the host a guest reaches Kiln itself at, always allowed whatever its
//! egress policy, and answered in-process by this one function on both tiers: a Wasm guest's
//! `wasi:http` requests to it never leave the host (`tier::wasm::egress` answers them before its
//! policy); a microVM guest's name resolves to an address its network serves in-process
//! (`tier::microvm::network`).
//!
//! - `GET /identity?aud=<audience>[&ttl=<seconds>]` → `200 {"token", "expires_at"}`: a token
//!   naming this instance's sandbox or invocation (`crate::identity`), for `aud`, valid for `ttl`
//!   (default 15 minutes, at most an hour). A missing or bad parameter is `400`.
//! - another method on `/identity` is `405`; any other path `404`. Errors have the API's body,
//!   `{"error": {"code", "message"}}`.

use std::time::Duration;

use http::{Method, StatusCode};

use super::{Identity, IssueError, DEFAULT_TOKEN_LIFETIME};
use crate::problem::ErrorCode;

/// The host name, compared without case and without a trailing dot. Any scheme and port: the
/// name is Kiln's, never the network's.
pub const HOST: &str = "kiln.internal";

/// Whether a request is for `kiln.internal`.
pub fn is_internal(uri: &http::Uri) -> bool {
    uri.host()
        .is_some_and(|host| host.trim_end_matches('.').eq_ignore_ascii_case(HOST))
}

/// The status and JSON body of a request to `kiln.internal` from an instance that is `identity`
/// (`None`: one that has none, such as a deploy's init hook).
pub fn respond(identity: Option<&Identity>, method: &Method, uri: &http::Uri) -> (StatusCode, serde_json::Value) {
    if uri.path() != "/identity" {
        let message = format!("kiln.internal has no {}: it serves /identity", uri.path());
        return error(StatusCode::NOT_FOUND, ErrorCode::NotFound, message);
    }
    if method != Method::GET {
        let message = format!("/identity takes GET, not {method}");
        return error(StatusCode::METHOD_NOT_ALLOWED, ErrorCode::MethodNotAllowed, message);
    }
    let Some(identity) = identity else {
        let message = "this instance has no identity (a deploy's init hook)".to_owned();
        return error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, message);
    };
    let token = parameters(uri.query()).and_then(|(audience, lifetime)| identity.token(&audience, lifetime));
    match token {
        Ok(token) => (
            StatusCode::OK,
            serde_json::json!({ "token": token.token, "expires_at": token.expires_at() }),
        ),
        Err(e) => error(StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest, e.to_string()),
    }
}

/// `aud` (required, once) and `ttl` (optional, once), percent-decoded; nothing else, so a typo
/// is not silently ignored. The audience's own rule is the issuer's.
fn parameters(query: Option<&str>) -> Result<(String, Duration), IssueError> {
    let mut audience = None;
    let mut lifetime = None;
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*name {
            "aud" if audience.is_none() => audience = Some(value.into_owned()),
            "aud" => return Err(IssueError::BadAudience),
            "ttl" if lifetime.is_none() => {
                let secs: u64 = value.parse().map_err(|_| IssueError::BadLifetime)?;
                lifetime = Some(Duration::from_secs(secs));
            }
            _ => return Err(IssueError::UnknownParameter(name.into_owned())),
        }
    }
    let audience = audience.ok_or(IssueError::NoAudience)?;
    Ok((audience, lifetime.unwrap_or(DEFAULT_TOKEN_LIFETIME)))
}

fn error(status: StatusCode, code: ErrorCode, message: String) -> (StatusCode, serde_json::Value) {
    let body = serde_json::json!({ "error": { "code": code.as_str(), "message": message } });
    (status, body)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::ManualClock;
    use crate::identity::{Issuer, Subject, Workload};

    fn identity(dir: &std::path::Path) -> Identity {
        let issuer = Issuer::open("http://kiln.test", dir, ManualClock::at(1_800_000_000_000)).unwrap();
        let workload = Workload {
            subject: Subject::Invocation("0193".to_owned()),
            function: "f".to_owned(),
            version: 1,
            digest: "sha256:00".to_owned(),
        };
        Identity::new(Arc::new(issuer), workload)
    }

    fn status(identity: Option<&Identity>, method: Method, uri: &str) -> (u16, serde_json::Value) {
        let (status, body) = respond(identity, &method, &uri.parse().unwrap());
        (status.as_u16(), body)
    }

    #[test]
    fn the_host_is_recognised_in_any_case_scheme_and_port() {
        for uri in [
            "http://kiln.internal/identity",
            "https://KILN.internal:8443/x",
            "http://kiln.internal./identity",
        ] {
            assert!(is_internal(&uri.parse().unwrap()), "{uri}");
        }
        for uri in [
            "http://kiln.internal.example.com/",
            "http://xkiln.internal/",
            "http://127.0.0.1/",
        ] {
            assert!(!is_internal(&uri.parse().unwrap()), "{uri}");
        }
    }

    #[test]
    fn identity_answers_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let me = identity(dir.path());
        let me = Some(&me);
        let (code, body) = status(
            me,
            Method::GET,
            "http://kiln.internal/identity?aud=https%3A%2F%2Fapi.example",
        );
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["expires_at"], "2027-01-15T08:15:00Z", "15 minutes by default");
        let claims = body["token"].as_str().unwrap().split('.').nth(1).unwrap().to_owned();
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, claims).unwrap(),
        )
        .unwrap();
        assert_eq!(claims["aud"], "https://api.example", "percent-decoded");
        assert_eq!(claims["sub"], "invocation:0193");
        let (code, body) = status(me, Method::GET, "http://kiln.internal/identity?aud=svc&ttl=3600");
        assert_eq!((code, body["expires_at"].as_str()), (200, Some("2027-01-15T09:00:00Z")));

        for (uri, expected) in [
            ("http://kiln.internal/identity", 400),
            ("http://kiln.internal/identity?aud=", 400),
            ("http://kiln.internal/identity?aud=a&aud=b", 400),
            ("http://kiln.internal/identity?aud=a&ttl=3601", 400),
            ("http://kiln.internal/identity?aud=a&ttl=-1", 400),
            ("http://kiln.internal/identity?aud=a&audience=b", 400),
            ("http://kiln.internal/identity/?aud=a", 404),
            ("http://kiln.internal/token?aud=a", 404),
        ] {
            let (code, body) = status(me, Method::GET, uri);
            assert_eq!(code, expected, "{uri}: {body}");
            assert!(body["error"]["message"].is_string(), "{body}");
        }
        let long = format!("http://kiln.internal/identity?aud={}", "a".repeat(257));
        assert_eq!(status(me, Method::GET, &long).0, 400);
        let (code, body) = status(me, Method::POST, "http://kiln.internal/identity?aud=a");
        assert_eq!(
            (code, body["error"]["code"].as_str()),
            (405, Some("method_not_allowed"))
        );
        assert_eq!(status(None, Method::GET, "http://kiln.internal/identity?aud=a").0, 503);
    }
}
