//! Reading an invocation's record and result back, for the API.

use rusqlite::{params, Connection, OptionalExtension};

use crate::store::files::{Digest, Layout};

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

pub fn load_record(conn: &Connection, id: &str) -> rusqlite::Result<Option<Record>> {
    conn.query_row(
        "SELECT id, function, version, state, attempts, created_at, finished_at, duration_us, error, stderr
         FROM invocations WHERE id = ?1",
        params![id],
        |r| {
            let error: Option<String> = r.get(8)?;
            Ok(Record {
                id: r.get(0)?,
                function: r.get(1)?,
                version: r.get(2)?,
                state: r.get(3)?,
                attempts: r.get(4)?,
                created_at: r.get(5)?,
                finished_at: r.get(6)?,
                duration_us: r.get(7)?,
                error: error.and_then(|e| serde_json::from_str(&e).ok()),
                stderr: r.get(9)?,
            })
        },
    )
    .optional()
}

#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error(transparent)]
    Store(#[from] rusqlite::Error),
    #[error("reading the result file: {0}")]
    File(#[from] std::io::Error),
}

/// A succeeded invocation's output, from its row or its result file.
pub fn load_result(conn: &Connection, layout: &Layout, id: &str) -> Result<Option<Vec<u8>>, ResultError> {
    let row: Option<(Option<Vec<u8>>, Option<String>)> = conn
        .query_row(
            "SELECT result, result_digest FROM invocations WHERE id = ?1 AND state = 'succeeded'",
            params![id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    match row {
        None => Ok(None),
        Some((_, Some(digest))) => {
            let digest = Digest::parse(&digest).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "the stored result digest is malformed")
            })?;
            Ok(Some(std::fs::read(layout.result(&digest))?))
        }
        Some((inline, None)) => Ok(Some(inline.unwrap_or_default())),
    }
}
