//! `GET /v1/invocations/{id}/logs`: the guest's stderr tail of an invocation, as text. Synchronous
//! invocations keep it in `invocation_logs` (`crate::logs`), asynchronous ones in their record.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Response, StatusCode};

use super::body::Body;
use super::error::ApiError;
use super::openapi::ErrorBody;
use crate::app::App;

#[utoipa::path(get, path = "/v1/invocations/{id}/logs", tag = "invoke", params(("id" = String, Path, description = "Invocation id (a UUID)")),
    responses((status = 200, description = "The guest's stderr tail", content_type = "text/plain"),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody), (status = 404, description = "No such invocation, or its logs are no longer kept", body = ErrorBody)))]
pub async fn get(app: &Arc<App>, id: &str) -> Result<Response<Body>, ApiError> {
    super::invocations::valid_id(id)?;
    let owned = id.to_owned();
    let app2 = app.clone();
    let found = tokio::task::spawn_blocking(move || {
        let lookup = |app: &App| -> rusqlite::Result<Option<String>> {
            let conn = app.store.conn();
            if let Some(stderr) = crate::logs::load(&conn, &owned)? {
                return Ok(Some(stderr));
            }
            Ok(crate::jobs::load_record(&conn, &owned)?.map(|r| r.stderr.unwrap_or_default()))
        };
        match lookup(&app2)? {
            Some(found) => Ok(Some(found)),
            None => {
                // A sync invocation that just finished may still be on its way to the disk.
                app2.logs.flush();
                lookup(&app2)
            }
        }
    })
    .await
    .expect("store task panicked")
    .map_err(ApiError::internal)?;
    let stderr = found.ok_or_else(|| {
        ApiError::not_found(format!(
            "no logs for invocation {id:?}: unknown, past retention, or a successful invocation that wrote nothing to stderr"
        ))
    })?;
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::new(Bytes::from(stderr)))
        .expect("static headers are valid"))
}
