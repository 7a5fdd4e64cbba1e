//! Invocation records as they are read back for the API (`storage::Metadata`): one asynchronous
//! invocation's full record, and the summaries `GET /v1/invocations` lists, sync and async alike.

/// An invocation's record, as `GET /v1/invocations/{id}` shows it (without the URL).
pub struct Record {
    pub id: String,
    pub function: String,
    pub version: u32,
    pub state: String,
    pub attempts: u32,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub duration_us: Option<i64>,
    pub error: Option<serde_json::Value>,
    pub stderr: Option<String>,
}

/// How an invocation was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Sync,
    Async,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
        }
    }
}

/// One line of the invocation list. Synchronous invocations are finished by the time anything
/// records them, so their state is `succeeded` or `failed` (a timeout is a failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// A UUIDv7: ids sort by creation time, which is the list's order and its cursor.
    pub id: String,
    pub function: String,
    pub version: u32,
    pub mode: Mode,
    pub state: String,
    /// Unix milliseconds.
    pub created_ms: u64,
    pub duration_us: Option<i64>,
    /// Async only: runs so far.
    pub attempts: Option<u32>,
    /// Sync only: the outcome as the invocation's log line says it (`success`, `failed`, `timeout`).
    pub outcome: Option<String>,
    /// Whether its log is kept (`Metadata::invocation_log` finds it).
    pub log_kept: bool,
}

/// The states an invocation can be in, as the list filters them.
pub const STATES: [&str; 4] = ["queued", "running", "succeeded", "failed"];

/// Which invocations to list: newest first, ids below `before`, at most `limit`.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Only these functions (a scoped token's); `None`: every function.
    pub functions: Option<Vec<String>>,
    /// One of [`STATES`].
    pub state: Option<String>,
    pub before: Option<String>,
    pub limit: usize,
}

impl Query {
    /// Whether `summary` is one this query asks for (for lists kept outside the store).
    pub fn matches(&self, summary: &Summary) -> bool {
        self.functions
            .as_ref()
            .is_none_or(|functions| functions.contains(&summary.function))
            && self.state.as_ref().is_none_or(|state| *state == summary.state)
            && self.before.as_ref().is_none_or(|before| summary.id < *before)
    }
}

/// The milliseconds a UUIDv7 id was made at (0 for another kind of id).
pub fn id_ms(id: &str) -> u64 {
    uuid::Uuid::try_parse(id).map(|u| uuid_ms(&u)).unwrap_or(0)
}

/// The milliseconds a UUIDv7 was made at (0 for another kind).
pub fn uuid_ms(id: &uuid::Uuid) -> u64 {
    id.get_timestamp()
        .map(|t| {
            let (secs, nanos) = t.to_unix();
            secs * 1000 + u64::from(nanos) / 1_000_000
        })
        .unwrap_or(0)
}
