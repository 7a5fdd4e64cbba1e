//! An asynchronous invocation's record, as it is read back for the API (`storage::Metadata`).

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
