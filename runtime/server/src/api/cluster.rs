//! `GET /v1/cluster`: the nodes serving this database, from their heartbeats (`heartbeat`
//! writes this node's). Admin only.

use std::sync::Arc;
use std::time::Duration;

use http::{Response, StatusCode};
use kiln_core::cluster::{self, Node};
use kiln_core::problem::Problem;
use kiln_core::Kiln;
use serde_json::json;

use super::body::{self, Body};
use super::openapi::ErrorBody;

/// A node as the list shows it: its heartbeat, and whether it is recent.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(super) struct NodeView {
    #[serde(flatten)]
    node: Node,
    /// Heard from within the last 15 seconds.
    alive: bool,
    /// The node that answered this request.
    this_node: bool,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub(super) struct NodeList {
    nodes: Vec<NodeView>,
}

#[utoipa::path(get, path = "/v1/cluster", tag = "operations",
    responses((status = 200, description = "The nodes serving this database (one on the embedded default)", body = NodeList),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 403, description = "The token may not do this", body = ErrorBody)))]
pub async fn list(kiln: &Arc<Kiln>, this_node: &str) -> Result<Response<Body>, Problem> {
    let metadata = kiln.storage.metadata.clone();
    let nodes = tokio::task::spawn_blocking(move || metadata.nodes())
        .await
        .expect("store task panicked")
        .map_err(Problem::from)?;
    let now = now_ms();
    let nodes: Vec<_> = nodes
        .into_iter()
        .map(|node| {
            json!(NodeView {
                alive: now.saturating_sub(node.last_seen_ms) <= cluster::ALIVE_WITHIN.as_millis() as u64,
                this_node: node.id == this_node,
                node,
            })
        })
        .collect();
    Ok(body::json(StatusCode::OK, &json!({ "nodes": nodes })))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// This node's heartbeat: written at once, then every `cluster::HEARTBEAT`, until the process
/// ends. A failed write is logged and tried again at the next beat.
pub fn start_heartbeat(kiln: Arc<Kiln>, id: String, address: String) {
    let started_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let cpu = kiln_core::tier::wasm::compile::cpu_features();
    tokio::spawn(async move {
        let mut beats = tokio::time::interval(cluster::HEARTBEAT);
        loop {
            beats.tick().await;
            if kiln.is_shutting_down() {
                return;
            }
            let node = Node {
                id: id.clone(),
                address: address.clone(),
                cpu: cpu.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                started_at: started_at.clone(),
                last_seen_ms: now_ms(),
                load: cluster::load_average(),
                instances_in_use: kiln.functions.tiers.wasm.instances_in_use() as u64,
                sandboxes_running: kiln.sandboxes.live_here() as u64,
            };
            let metadata = kiln.storage.metadata.clone();
            let written = tokio::task::spawn_blocking(move || metadata.heartbeat(&node)).await;
            if let Ok(Err(e)) = written {
                tracing::warn!(error = %e, "writing this node's heartbeat failed");
            }
        }
    });
}
