//! The newest quiet successes: synchronous invocations that succeeded without writing to stderr.
//! They leave no row in the store (writing one would cost the busiest path ~10 µs of SQLite work,
//! see `Telemetry::sync_invocation`), yet a console's invocation list should show them. So the
//! last [`CAPACITY`] are kept here, in memory: a push is one uncontended lock and a copy of the
//! function's name. They do not survive a restart; every other invocation is listed from the store.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::invocations::{Mode, Query, Summary};

/// Quiet successes kept at most (about 100 bytes each).
pub const CAPACITY: usize = 10_000;

struct Entry {
    id: uuid::Uuid,
    function: String,
    version: u32,
    duration_us: u64,
}

#[derive(Default)]
pub struct QuietSuccesses {
    /// Oldest first; ids are UUIDv7 made in order, so this is id order too (up to the few
    /// microseconds between making an id and pushing it).
    entries: Mutex<VecDeque<Entry>>,
}

impl QuietSuccesses {
    pub fn push(&self, id: uuid::Uuid, function: &str, version: u32, duration_us: u64) {
        let entry = Entry {
            id,
            function: function.to_owned(),
            version,
            duration_us,
        };
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() == CAPACITY {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    /// Those `query` asks for, newest first, at most `query.limit`.
    pub fn list(&self, query: &Query) -> Vec<Summary> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut found: Vec<Summary> = entries
            .iter()
            .map(|e| Summary {
                id: e.id.to_string(),
                function: e.function.clone(),
                version: e.version,
                mode: Mode::Sync,
                state: "succeeded".to_owned(),
                created_ms: crate::invocations::uuid_ms(&e.id),
                duration_us: Some(e.duration_us as i64),
                attempts: None,
                outcome: Some("success".to_owned()),
                log_kept: false,
            })
            .filter(|s| query.matches(s))
            .collect();
        found.sort_by(|a, b| b.id.cmp(&a.id));
        found.truncate(query.limit);
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_first_filtered_and_bounded() {
        let kept = QuietSuccesses::default();
        let ids: Vec<uuid::Uuid> = (0..CAPACITY + 3).map(|_| uuid::Uuid::now_v7()).collect();
        for (i, id) in ids.iter().enumerate() {
            kept.push(*id, if i % 2 == 0 { "even" } else { "odd" }, 1, 5);
        }
        let all = kept.list(&Query {
            limit: usize::MAX,
            ..Default::default()
        });
        assert_eq!(all.len(), CAPACITY, "the oldest make room");
        assert_eq!(all[0].id, ids[CAPACITY + 2].to_string());
        let page = kept.list(&Query {
            functions: Some(vec!["odd".into()]),
            before: Some(ids[CAPACITY].to_string()),
            limit: 2,
            ..Default::default()
        });
        let got: Vec<&str> = page.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(got, [ids[CAPACITY - 1].to_string(), ids[CAPACITY - 3].to_string()]);
        let failed = kept.list(&Query {
            state: Some("failed".into()),
            limit: 10,
            ..Default::default()
        });
        assert!(failed.is_empty());
    }
}
