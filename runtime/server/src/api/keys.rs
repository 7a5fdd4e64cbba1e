//! `POST /v1/keys/rotate[?keys=results|identity]` (admin only): new signing keys.
//!
//! - Result URLs: a new key signs and every older key is retired, so every result URL handed out
//!   before stops working at once. What to do when a URL leaked, or when a token that fetched
//!   URLs was revoked: URLs outlive the token that asked for them.
//! - Identity tokens: a new key signs guests' tokens from now on; the keys it replaces stay in the
//!   JWKS until every token they signed has expired (`kiln_core::identity::keys`), so no valid
//!   token stops verifying. Kiln also rotates this key by itself every day.
//!
//! Without `keys`, both rotate.

use std::sync::Arc;

use http::{Response, StatusCode};
use kiln_core::kiln::Kiln;
use kiln_core::problem::Problem;
use serde_json::json;

use super::body::{self, Body};
use super::error;
use super::openapi::{ErrorBody, Rotated};

/// Which keys a rotation replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Both,
    Results,
    Identity,
}

pub fn which(query: Option<&str>) -> Result<Which, Problem> {
    match query.unwrap_or("") {
        "" => Ok(Which::Both),
        "keys=results" => Ok(Which::Results),
        "keys=identity" => Ok(Which::Identity),
        other => Err(error::invalid_request(format!(
            "unknown query {other:?}: keys=results or keys=identity, or nothing for both"
        ))),
    }
}

#[utoipa::path(post, path = "/v1/keys/rotate", tag = "operations",
    params(("keys" = Option<super::openapi::KeyKind>, Query, description = "Rotate only these keys [default: both]")),
    responses((status = 200, description = "New signing keys: result URLs signed before are refused from now on; identity tokens signed before still verify until they expire", body = Rotated),
        (status = 400, description = "An unknown `keys`", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
pub async fn rotate(kiln: &Arc<Kiln>, query: Option<&str>) -> Result<Response<Body>, Problem> {
    let which = which(query)?;
    let kiln = kiln.clone();
    let answer = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, Problem> {
        let mut answer = json!({});
        if which != Which::Identity {
            let (kid, retired) = kiln.rotate_result_keys().map_err(Problem::internal)?;
            tracing::info!(kid = %kid, retired, "result-URL signing key rotated; earlier URLs are refused");
            answer["kid"] = kid.into();
            answer["retired"] = retired.into();
        }
        if which != Which::Results {
            let kid = kiln
                .rotate_identity_key(false)
                .map_err(Problem::internal)?
                .unwrap_or_default();
            let published: Vec<String> = kiln.identity.keys().published().iter().map(|k| k.kid.clone()).collect();
            tracing::info!(kid = %kid, published = published.len(), "identity signing key rotated");
            answer["identity"] = json!({ "kid": kid, "published": published });
        }
        Ok(answer)
    })
    .await
    .expect("key task panicked")?;
    Ok(body::json(StatusCode::OK, &answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_keys() {
        assert_eq!(which(None).unwrap(), Which::Both);
        assert_eq!(which(Some("keys=identity")).unwrap(), Which::Identity);
        assert_eq!(which(Some("keys=results")).unwrap(), Which::Results);
        assert!(which(Some("keys=all")).is_err());
    }
}
