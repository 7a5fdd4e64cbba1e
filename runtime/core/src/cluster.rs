//! The nodes serving one database. Each node writes a heartbeat — who it is and how loaded —
//! every [`HEARTBEAT`]; `GET /v1/cluster` lists them. On the embedded default (SQLite) that is
//! one node; on PostgreSQL, every node that shares it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How often a node writes its row.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A node silent for this long is listed as not alive; after [`FORGOTTEN`] its row goes.
pub const ALIVE_WITHIN: Duration = Duration::from_secs(15);
pub const FORGOTTEN: Duration = Duration::from_secs(3600);

/// One node as its heartbeat describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Node {
    /// Random at each start of the process.
    pub id: String,
    /// Where clients reach it (`--public-url`, or its listening address).
    pub address: String,
    /// The CPU features compiled code is keyed by: nodes with the same key could share it.
    pub cpu: String,
    /// Kiln's version on the node.
    pub version: String,
    pub started_at: String,
    /// Unix milliseconds of its last heartbeat.
    pub last_seen_ms: u64,
    /// The host's one-minute load average.
    pub load: f64,
    /// Wasm instances running invocations now.
    pub instances_in_use: u64,
    /// Sandboxes live on it.
    pub sandboxes_running: u64,
}

/// The host's one-minute load average (0 where `/proc/loadavg` cannot be read).
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_load_average_is_read() {
        let load = super::load_average();
        assert!(load.is_finite() && load >= 0.0, "{load}");
        // This test's own process keeps the machine from being entirely idle, but a load of
        // exactly 0.00 is possible: only check it parsed when the file says something else.
        let text = std::fs::read_to_string("/proc/loadavg").unwrap();
        let first: f64 = text.split_whitespace().next().unwrap().parse().unwrap();
        assert_eq!(load, first);
    }
}
