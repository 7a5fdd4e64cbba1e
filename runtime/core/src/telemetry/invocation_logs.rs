//! Per-invocation logs of synchronous invocations: the guest's stderr tail (and outcome and
//! duration) kept with the invocation id, served by `GET /v1/invocations/{id}/logs`. Asynchronous
//! invocations keep theirs in their own record (`invocations`).
//!
//! A sync invoke must not wait for a disk write, so `record` only hands the entry to a channel;
//! one writer thread commits whatever has arrived as one transaction (group commit, as `invocations`
//! does for submits), on its own connection with `synchronous=NORMAL`.
//!
//! Durability trade-off, by design: a log entry is committed a few milliseconds after its
//! response was sent, and that commit is not fsynced. A `kill -9` loses the entries still in the
//! channel (at most one batch); a power loss can also lose committed entries not yet
//! checkpointed. A graceful shutdown flushes the channel. Logs are diagnostics; invocation
//! results that must survive anything are what asynchronous invocations are for.
//!
//! On PostgreSQL the same writer commits with `synchronous_commit = off`, the counterpart of
//! `NORMAL`: a crash of the database server may lose the last batches, never tear one.
//!
//! Retention: entries older than the server's retention period, and all but the newest
//! `max_kept` entries, are deleted by the writer thread once a minute.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};

use crate::clock::Clock;
use crate::storage::postgres::{blocking, Pool};
use crate::storage::sqlite;
use crate::storage::{Database, StorageError};

/// Entries committed per transaction at most.
const BATCH: usize = 1024;
/// Entries waiting for the writer at most; past it new entries are dropped (and counted) rather
/// than slowing invocations down.
const CAPACITY: usize = 64 * 1024;
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// What is kept of one finished synchronous invocation.
pub struct LogEntry {
    pub id: uuid::Uuid,
    pub function: String,
    pub version: u32,
    pub outcome: &'static str,
    pub duration_us: u64,
    pub stderr: String,
}

enum Message {
    Entry(LogEntry),
    /// Answered once every entry sent before it is committed.
    Flush(mpsc::Sender<()>),
}

#[derive(Clone)]
pub struct InvocationLogs {
    tx: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

impl InvocationLogs {
    /// Starts the writer thread on its own connection to the database.
    pub fn open(
        db: &Database,
        retention: Duration,
        max_kept: u64,
        clock: Arc<dyn Clock>,
    ) -> Result<InvocationLogs, StorageError> {
        let conn = match db {
            Database::Sqlite(path) => {
                let conn = sqlite::connect(path)?;
                // Not fsynced at commit (see the module doc); WAL keeps it consistent.
                conn.pragma_update(None, "synchronous", "NORMAL")?;
                Writer::Sqlite(conn)
            }
            Database::Postgres(pool) => Writer::Postgres {
                client: Some(connect_unsynced(pool)?),
                pool: pool.clone(),
            },
        };
        let (tx, rx) = mpsc::sync_channel(CAPACITY);
        let dropped = Arc::new(AtomicU64::new(0));
        let writer_dropped = dropped.clone();
        std::thread::Builder::new()
            .name("kiln-logs".into())
            .spawn(move || write_loop(conn, rx, retention, max_kept, writer_dropped, clock))
            .expect("spawning the log writer");
        Ok(InvocationLogs { tx, dropped })
    }

    /// Queues an entry; never blocks.
    pub fn record(&self, entry: LogEntry) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Message::Entry(entry)) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until every entry recorded so far is committed. Blocking.
    pub fn flush(&self) {
        let (done, wait) = mpsc::channel();
        if self.tx.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

/// The writer's connection.
enum Writer {
    Sqlite(Connection),
    /// Reconnected at the next batch when it broke.
    Postgres {
        pool: Arc<Pool>,
        client: Option<postgres::Client>,
    },
}

fn connect_unsynced(pool: &Pool) -> Result<postgres::Client, StorageError> {
    let mut client = pool.connect()?;
    blocking(|| client.batch_execute("SET synchronous_commit = off"))?;
    Ok(client)
}

impl Writer {
    fn write_batch(&mut self, batch: &[Message], now_ms: u64) -> Result<(), StorageError> {
        match self {
            Writer::Sqlite(conn) => Ok(write_batch(conn, batch, now_ms)?),
            Writer::Postgres { .. } => self.postgres(|client| pg_write_batch(client, batch, now_ms)),
        }
    }

    fn sweep(&mut self, cutoff_ms: u64, max_kept: u64) -> Result<usize, StorageError> {
        match self {
            Writer::Sqlite(conn) => Ok(sweep(conn, cutoff_ms, max_kept)?),
            Writer::Postgres { .. } => self.postgres(|client| pg_sweep(client, cutoff_ms, max_kept)),
        }
    }

    fn postgres<T: Send>(
        &mut self,
        work: impl FnOnce(&mut postgres::Client) -> Result<T, postgres::Error> + Send,
    ) -> Result<T, StorageError> {
        let Writer::Postgres { pool, client } = self else {
            unreachable!("called on the PostgreSQL writer only");
        };
        if client.as_ref().is_none_or(postgres::Client::is_closed) {
            *client = Some(connect_unsynced(pool)?);
        }
        let client = client.as_mut().expect("connected above");
        Ok(blocking(|| work(client))?)
    }
}

fn write_loop(
    mut conn: Writer,
    rx: mpsc::Receiver<Message>,
    retention: Duration,
    max_kept: u64,
    dropped: Arc<AtomicU64>,
    clock: Arc<dyn Clock>,
) {
    let mut last_sweep = Instant::now();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        match rx.recv_timeout(SWEEP_EVERY) {
            Ok(message) => batch.push(message),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(message) => batch.push(message),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.write_batch(&batch, clock.now_ms()) {
            tracing::error!(error = %e, entries = batch.len(), "writing invocation logs failed");
        }
        for message in batch.drain(..) {
            if let Message::Flush(done) = message {
                let _ = done.send(());
            }
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            tracing::warn!(lost, "invocation logs dropped: the log writer fell behind");
        }
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = Instant::now();
            match conn.sweep(clock.now_ms().saturating_sub(retention.as_millis() as u64), max_kept) {
                Ok(0) => {}
                Ok(n) => tracing::debug!(deleted = n, "swept invocation logs past their retention"),
                Err(e) => tracing::error!(error = %e, "sweeping invocation logs failed"),
            }
        }
    }
}

fn write_batch(conn: &mut Connection, batch: &[Message], now_ms: u64) -> rusqlite::Result<()> {
    if !batch.iter().any(|m| matches!(m, Message::Entry(_))) {
        return Ok(());
    }
    let now = now_ms as i64;
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR REPLACE INTO invocation_logs
             (id, function, version, outcome, duration_us, created_ms, stderr)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for message in batch {
            if let Message::Entry(e) = message {
                let mut buf = uuid::Uuid::encode_buffer();
                let id = e.id.as_hyphenated().encode_lower(&mut buf);
                insert.execute(params![
                    &*id,
                    e.function,
                    e.version,
                    e.outcome,
                    e.duration_us as i64,
                    now,
                    e.stderr
                ])?;
            }
        }
    }
    tx.commit()
}

fn pg_write_batch(client: &mut postgres::Client, batch: &[Message], now_ms: u64) -> Result<(), postgres::Error> {
    if !batch.iter().any(|m| matches!(m, Message::Entry(_))) {
        return Ok(());
    }
    let now = now_ms as i64;
    let mut tx = client.transaction()?;
    let insert = tx.prepare(
        "INSERT INTO invocation_logs (id, function, version, outcome, duration_us, created_ms, stderr)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (id) DO UPDATE SET function = excluded.function, version = excluded.version,
             outcome = excluded.outcome, duration_us = excluded.duration_us,
             created_ms = excluded.created_ms, stderr = excluded.stderr",
    )?;
    for message in batch {
        if let Message::Entry(e) = message {
            tx.execute(
                &insert,
                &[
                    &e.id.to_string(),
                    &e.function,
                    &i64::from(e.version),
                    &e.outcome,
                    &(e.duration_us as i64),
                    &now,
                    &e.stderr,
                ],
            )?;
        }
    }
    tx.commit()
}

/// [`sweep`] on PostgreSQL (same keys, same order).
fn pg_sweep(client: &mut postgres::Client, cutoff_ms: u64, max_kept: u64) -> Result<usize, postgres::Error> {
    let prefix = format!("{:08x}-{:04x}", (cutoff_ms >> 16) & 0xffff_ffff, cutoff_ms & 0xffff);
    // `COLLATE "C"`: ids compare byte by byte, as SQLite compares them, whatever the database's
    // collation.
    let old = client.execute("DELETE FROM invocation_logs WHERE id < $1 COLLATE \"C\"", &[&prefix])?;
    let excess = client.execute(
        "DELETE FROM invocation_logs WHERE id COLLATE \"C\" <=
           (SELECT id FROM invocation_logs ORDER BY id COLLATE \"C\" DESC LIMIT 1 OFFSET $1)",
        &[&(max_kept as i64)],
    )?;
    Ok((old + excess) as usize)
}

/// Deletes entries older than `cutoff_ms` and all but the newest `max_kept`.
fn sweep(conn: &Connection, cutoff_ms: u64, max_kept: u64) -> rusqlite::Result<usize> {
    // A UUIDv7 starts with its millisecond timestamp in hex (`tttttttt-tttt-7...`), so every id
    // created before `cutoff_ms` sorts before this prefix.
    let prefix = format!("{:08x}-{:04x}", (cutoff_ms >> 16) & 0xffff_ffff, cutoff_ms & 0xffff);
    let old = conn.execute("DELETE FROM invocation_logs WHERE id < ?1", params![prefix])?;
    let excess = conn.execute(
        "DELETE FROM invocation_logs WHERE id <=
           (SELECT id FROM invocation_logs ORDER BY id DESC LIMIT 1 OFFSET ?1)",
        params![max_kept as i64],
    )?;
    Ok(old + excess)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: uuid::Uuid, stderr: &str) -> LogEntry {
        LogEntry {
            id,
            function: "f".into(),
            version: 1,
            outcome: "success",
            duration_us: 5,
            stderr: stderr.into(),
        }
    }

    #[test]
    fn entries_are_committed_and_swept_by_age_and_count() {
        use crate::storage::{Metadata, Sqlite};
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("kiln.db");
        let store = Sqlite::open(&db).unwrap();
        let now = crate::clock::now_ms();
        let clock = crate::clock::ManualClock::at(now);
        let logs = InvocationLogs::open(&Database::Sqlite(db.clone()), Duration::from_secs(3600), 1000, clock).unwrap();
        let ts = |ms: u64| uuid::Timestamp::from_unix(uuid::NoContext, ms / 1000, (ms % 1000) as u32 * 1_000_000);
        let old = uuid::Uuid::new_v7(ts(now - 7_200_000));
        let ids: Vec<_> = (0..5).map(|i| uuid::Uuid::new_v7(ts(now - 5 + i))).collect();
        logs.record(entry(old, "old\n"));
        for id in &ids {
            logs.record(entry(*id, &format!("line of {id}\n")));
        }
        logs.flush();
        let load = |id: &uuid::Uuid| store.invocation_log(&id.to_string()).unwrap();
        assert_eq!(load(&ids[0]).unwrap(), format!("line of {}\n", ids[0]));
        assert_eq!(
            store.invocation_function(&ids[0].to_string()).unwrap().as_deref(),
            Some("f")
        );
        assert!(load(&old).is_some());

        let deleted = sweep(&store.conn(), now - 3_600_000, 3).unwrap();
        assert_eq!(deleted, 3, "the old entry by age, then two by count");
        assert!(load(&old).is_none());
        assert!(load(&ids[1]).is_none());
        for id in &ids[2..] {
            assert!(load(id).is_some());
        }
    }
}
