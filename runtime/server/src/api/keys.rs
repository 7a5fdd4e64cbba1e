//! `POST /v1/keys/rotate`: a new key signs result URLs and every older key is retired, so every
//! result URL handed out before stops working at once (admin only). What to do when a URL leaked,
//! or when a token that fetched URLs was revoked: URLs outlive the token that asked for them.

use std::sync::Arc;

use http::{Response, StatusCode};
use kiln_core::problem::Problem;
use kiln_core::signing::Signer;
use serde_json::json;

use super::body::{self, Body};
use super::openapi::{ErrorBody, Rotated};

#[utoipa::path(post, path = "/v1/keys/rotate", tag = "operations",
    responses((status = 200, description = "A new signing key; URLs signed before are refused from now on", body = Rotated),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
pub async fn rotate(signer: &Arc<Signer>) -> Result<Response<Body>, Problem> {
    let signer = signer.clone();
    let (kid, retired) = tokio::task::spawn_blocking(move || signer.rotate())
        .await
        .expect("key task panicked")
        .map_err(Problem::internal)?;
    tracing::info!(kid = %kid, retired, "result-URL signing key rotated; earlier URLs are refused");
    Ok(body::json(StatusCode::OK, &json!({ "kid": kid, "retired": retired })))
}
