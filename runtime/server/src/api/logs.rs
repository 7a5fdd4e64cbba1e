//! `GET /v1/invocations/{id}/logs`: the guest's stderr tail of an invocation, as text. Synchronous
//! invocations keep it in `invocation_logs` (`kiln_core::telemetry::invocation_logs`), asynchronous
//! ones in their record.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use kiln_core::problem::Problem;
use kiln_core::storage::Storage;
use kiln_core::telemetry::invocation_logs::InvocationLogs;

use super::body::Body;
use super::error;
use super::openapi::ErrorBody;

#[utoipa::path(get, path = "/v1/invocations/{id}/logs", tag = "invoke", params(("id" = String, Path, description = "Invocation id (a UUID)")),
    responses((status = 200, description = "The guest's stderr tail", content_type = "text/plain"),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody), (status = 404, description = "No such invocation, or its logs are no longer kept", body = ErrorBody)))]
pub async fn get(storage: &Storage, logs: &InvocationLogs, id: &str) -> Result<Response<Body>, Problem> {
    super::invocations::valid_id(id)?;
    let (metadata, logs) = (storage.metadata.clone(), logs.clone());
    let owned = id.to_owned();
    let found = tokio::task::spawn_blocking(move || match metadata.invocation_log(&owned)? {
        Some(found) => Ok(Some(found)),
        None => {
            // A sync invocation that just finished may still be on its way to the disk.
            logs.flush();
            metadata.invocation_log(&owned)
        }
    })
    .await
    .expect("store task panicked")
    .map_err(Problem::internal)?;
    let stderr = found.ok_or_else(|| {
        error::not_found(format!(
            "no logs for invocation {id:?}: unknown, past retention, or a successful invocation that wrote nothing to stderr"
        ))
    })?;
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::new(Bytes::from(stderr)))
        .expect("static headers are valid"))
}
