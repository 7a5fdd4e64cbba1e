//! Egress connectors: `POST /v1/connectors`, `GET /v1/connectors`, `GET /v1/connectors/{name}`,
//! `DELETE /v1/connectors/{name}` (`409` while a function version or a live sandbox uses it).
//! Admin only (`tokens::authorize` refuses scoped tokens everything here).

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;

use kiln_core::connectors::{Connector, ConnectorSpec, ConnectorUse, Connectors};
use kiln_core::problem::Problem;

use super::body::{self, Body, BodyBudget};
use super::error;
use super::openapi::ErrorBody;

/// A connector as the API shows it: its spec, when it was made, and what uses it now.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct ConnectorView<'a> {
    name: &'a str,
    #[schema(value_type = Vec<String>)]
    allowed_hosts: &'a [String],
    allow_private: Vec<String>,
    udp: bool,
    created_at: &'a str,
    used_by: Vec<ConnectorUse>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct ConnectorList<'a> {
    connectors: Vec<ConnectorView<'a>>,
}

fn view(connector: &Connector, used_by: Vec<ConnectorUse>) -> ConnectorView<'_> {
    let spec = &connector.spec;
    ConnectorView {
        name: &spec.name,
        allowed_hosts: &spec.allowed_hosts,
        allow_private: spec.allow_private.iter().map(ToString::to_string).collect(),
        udp: spec.udp,
        created_at: &connector.created_at,
        used_by,
    }
}

/// Runs `work` on the blocking pool (the store is SQLite).
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .expect("connector task panicked")
}

#[utoipa::path(post, path = "/v1/connectors", tag = "connectors", request_body = ConnectorSpec,
    responses((status = 201, description = "The connector", body = ConnectorView),
        (status = 400, description = "A bad name, host entry or range", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "Not the admin token", body = ErrorBody),
        (status = 409, description = "A connector has this name", body = ErrorBody)))]
pub async fn create(
    connectors: &Arc<Connectors>,
    budget: &BodyBudget,
    req: Request<Incoming>,
) -> Result<Response<Body>, Problem> {
    let (parts, incoming) = req.into_parts();
    let (bytes, _held) = body::read(&parts.headers, incoming, 256 * 1024, Duration::from_secs(10), budget).await?;
    let spec: ConnectorSpec = kiln_core::json::from_slice(&bytes).map_err(|e| {
        error::invalid_request(format!(
            "expected {{\"name\", \"allowed_hosts\": [\"https://host\"], \"allow_private\": [\"10.0.0.7/32\"], \"udp\": false}}: {e}"
        ))
    })?;
    let registry = connectors.clone();
    let connector = blocking(move || registry.create(spec)).await?;
    Ok(body::json(StatusCode::CREATED, &view(&connector, Vec::new())))
}

#[utoipa::path(get, path = "/v1/connectors", tag = "connectors",
    responses((status = 200, description = "Every connector, by name", body = ConnectorList),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "Not the admin token", body = ErrorBody)))]
pub async fn list(connectors: &Arc<Connectors>) -> Result<Response<Body>, Problem> {
    let registry = connectors.clone();
    let all = blocking(move || {
        registry
            .list()
            .into_iter()
            .map(|c| registry.uses(&c.spec.name).map(|uses| (c, uses)))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(Problem::internal)?;
    let list = ConnectorList {
        connectors: all.iter().map(|(c, uses)| view(c, uses.clone())).collect(),
    };
    Ok(body::json(StatusCode::OK, &list))
}

#[utoipa::path(get, path = "/v1/connectors/{name}", tag = "connectors", params(("name" = String, Path, description = "Connector name")),
    responses((status = 200, description = "The connector", body = ConnectorView),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "Not the admin token", body = ErrorBody),
        (status = 404, description = "No such connector", body = ErrorBody)))]
pub async fn get(connectors: &Arc<Connectors>, name: &str) -> Result<Response<Body>, Problem> {
    let connector = connectors
        .get(name)
        .ok_or_else(|| error::not_found(format!("no connector named `{name}`")))?;
    let (registry, owned) = (connectors.clone(), name.to_owned());
    let uses = blocking(move || registry.uses(&owned))
        .await
        .map_err(Problem::internal)?;
    Ok(body::json(StatusCode::OK, &view(&connector, uses)))
}

#[utoipa::path(delete, path = "/v1/connectors/{name}", tag = "connectors", params(("name" = String, Path, description = "Connector name")),
    responses((status = 204, description = "Deleted"),
        (status = 401, description = "Missing or wrong token", body = ErrorBody), (status = 403, description = "Not the admin token", body = ErrorBody),
        (status = 404, description = "No such connector", body = ErrorBody),
        (status = 409, description = "A function version or a live sandbox uses it", body = ErrorBody)))]
pub async fn delete(connectors: &Arc<Connectors>, name: &str) -> Result<Response<Body>, Problem> {
    let (registry, owned) = (connectors.clone(), name.to_owned());
    blocking(move || registry.delete(&owned)).await?;
    Ok(Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Body::default())
        .expect("static response"))
}
