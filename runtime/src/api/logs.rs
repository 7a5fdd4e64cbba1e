//! `GET /v1/invocations/{id}/logs`: the guest's stderr tail of an invocation, as text. Synchronous
//! invocations keep it in `invocation_logs` (`crate::logs`), asynchronous ones in their record.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Response, StatusCode};

use super::body::Body;
use super::error::ApiError;
use crate::app::App;

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
    let stderr = found.ok_or_else(|| ApiError::not_found(format!("no logs for invocation {id:?}")))?;
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::new(Bytes::from(stderr)))
        .expect("static headers are valid"))
}
