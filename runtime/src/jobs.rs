//! Asynchronous invocations: durable, retried, at-least-once.
//!
//! - **Submit**: a request is answered `202` only after its row (input included) is committed to
//!   SQLite with `synchronous=FULL`. Submits go through one writer thread that commits whatever
//!   has arrived as a single transaction, so concurrent submits share an fsync (group commit).
//!   An `Idempotency-Key` maps a retried submit to the id of the first.
//! - **Run**: workers claim the oldest due rows (`queued` → `running`, a few per transaction), run
//!   them exactly like sync invokes (same limits, same snapshot), and record the outcomes together;
//!   a failure is queued again with exponential backoff until the function's `retries` are used up.
//! - **Crash**: claims and outcomes are committed without waiting for the disk (a crash can only
//!   lose them, which means running the invocation again). At start-up, `running` rows return to
//!   `queued`. Every accepted invocation is therefore finished or run again: at least once.
//! - **Retention**: finished rows (and their results) are deleted after `retention`.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::json;
use tokio::sync::{oneshot, Notify};

use crate::api::error::ApiError;
use crate::app::{App, LoadError};
use crate::invoke::{self, InvokeError, STDERR_TAIL};
use crate::store::{self, now_rfc3339, StoreError};

/// Submits committed together at most.
const BATCH: usize = 512;
/// Invocations a worker claims (and records) per transaction; they run concurrently.
const CLAIM_BATCH: u32 = 16;
/// Workers look for due retries at least this often.
const POLL: Duration = Duration::from_millis(100);
/// First retry delay; doubles per attempt, up to `MAX_BACKOFF`.
const BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Delay before trying again an invocation that found its function or the pool busy.
const BUSY_DELAY: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the async queue is full ({0} invocations waiting)")]
    QueueFull(u64),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the async queue is shut down")]
    Closed,
    #[error("committing the submit failed: {0}")]
    Commit(String),
}

/// One accepted submit.
pub struct NewInvocation {
    pub function: String,
    pub version: u32,
    pub input: Bytes,
    pub idempotency_key: Option<String>,
    pub max_attempts: u32,
}

struct Submit {
    invocation: NewInvocation,
    reply: oneshot::Sender<Result<String, SubmitError>>,
}

pub struct Jobs {
    submits: std::sync::Mutex<Option<mpsc::Sender<Submit>>>,
    /// Wakes idle workers when work arrives.
    pub wake: Notify,
    workers: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Jobs {
    /// Requeues what a crash left `running` and starts the submit writer on its own connection.
    pub fn open(db: &std::path::Path, max_queued: u64) -> Result<Jobs, StoreError> {
        let conn = store::connect(db)?;
        let requeued = conn.execute("UPDATE invocations SET state = 'queued' WHERE state = 'running'", [])?;
        if requeued > 0 {
            tracing::info!(
                requeued,
                "async invocations that were running at the last stop will run again"
            );
        }
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("kiln-submit".into())
            .spawn(move || write_submits(conn, rx, max_queued))
            .expect("spawning the submit writer");
        Ok(Jobs {
            submits: std::sync::Mutex::new(Some(tx)),
            wake: Notify::new(),
            workers: Default::default(),
        })
    }

    /// Commits a submit durably and returns its id (the first one's, for a repeated idempotency key).
    pub async fn submit(&self, invocation: NewInvocation) -> Result<String, SubmitError> {
        let (reply, answer) = oneshot::channel();
        let sender = self
            .submits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(SubmitError::Closed)?;
        sender
            .send(Submit { invocation, reply })
            .map_err(|_| SubmitError::Closed)?;
        let id = answer.await.map_err(|_| SubmitError::Closed)??;
        self.wake.notify_one();
        Ok(id)
    }

    /// Starts the workers and the retention sweeper.
    pub fn start(app: &Arc<App>) {
        let mut workers = app.jobs.workers.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..app.config.async_workers {
            workers.push(tokio::spawn(work(app.clone())));
        }
        tokio::spawn(sweep(app.clone()));
    }

    /// Stops accepting submits and waits (up to `grace`) for running invocations to finish.
    pub async fn stop(&self, grace: Duration) {
        self.submits.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.wake.notify_waiters();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        if tokio::time::timeout(grace, futures_util::future::join_all(workers))
            .await
            .is_err()
        {
            tracing::warn!(
                "async invocations still running after the grace period; they will run again at the next start"
            );
        }
    }
}

/// The submit writer: one transaction (one fsync) for every batch of submits waiting.
fn write_submits(mut conn: Connection, rx: mpsc::Receiver<Submit>, max_queued: u64) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(submit) => batch.push(submit),
                Err(_) => break,
            }
        }
        match commit_batch(&mut conn, &batch, max_queued) {
            Ok(results) => {
                for (submit, result) in batch.into_iter().zip(results) {
                    let _ = submit.reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "committing async submits failed");
                for submit in batch {
                    let _ = submit.reply.send(Err(SubmitError::Commit(e.to_string())));
                }
            }
        }
    }
}

fn commit_batch(
    conn: &mut Connection,
    batch: &[Submit],
    max_queued: u64,
) -> rusqlite::Result<Vec<Result<String, SubmitError>>> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut queued: u64 = tx.query_row("SELECT COUNT(*) FROM invocations WHERE state = 'queued'", [], |r| {
        r.get(0)
    })?;
    let now = now_rfc3339();
    let now_ms = now_ms();
    let mut results = Vec::with_capacity(batch.len());
    for Submit { invocation: inv, .. } in batch {
        if let Some(key) = &inv.idempotency_key {
            let existing: Option<String> = tx
                .query_row(
                    "SELECT id FROM invocations WHERE function = ?1 AND idempotency_key = ?2",
                    params![inv.function, key],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(id) = existing {
                results.push(Ok(id));
                continue;
            }
        }
        if queued >= max_queued {
            results.push(Err(SubmitError::QueueFull(queued)));
            continue;
        }
        let id = uuid::Uuid::now_v7().to_string();
        tx.execute(
            "INSERT INTO invocations (id, function, version, state, input, idempotency_key, max_attempts, run_after_ms, created_at)
             VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6, ?7, ?8)",
            params![id, inv.function, inv.version, &inv.input[..], inv.idempotency_key, inv.max_attempts, now_ms, now],
        )?;
        queued += 1;
        results.push(Ok(id));
    }
    tx.commit()?;
    Ok(results)
}

/// A claimed invocation.
struct Claimed {
    id: String,
    function: String,
    version: u32,
    input: Vec<u8>,
    attempts: u32,
    max_attempts: u32,
}

/// A worker's connection: its commits do not wait for the disk (see the module doc).
fn worker_connection(app: &App) -> Result<Connection, StoreError> {
    let conn = store::connect(&app.layout.database())?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

/// Claims up to `CLAIM_BATCH` due invocations in one transaction.
fn claim(conn: &Connection) -> rusqlite::Result<Vec<Claimed>> {
    let mut stmt = conn.prepare_cached(
        "UPDATE invocations SET state = 'running', attempts = attempts + 1
         WHERE id IN (SELECT id FROM invocations WHERE state = 'queued' AND run_after_ms <= ?1
                      ORDER BY run_after_ms, id LIMIT ?2)
         RETURNING id, function, version, input, attempts, max_attempts",
    )?;
    let rows = stmt.query_map(params![now_ms(), CLAIM_BATCH], |r| {
        Ok(Claimed {
            id: r.get(0)?,
            function: r.get(1)?,
            version: r.get(2)?,
            input: r.get(3)?,
            attempts: r.get(4)?,
            max_attempts: r.get(5)?,
        })
    })?;
    rows.collect()
}

/// What a run ended with, as it is recorded.
enum Outcome {
    Succeeded {
        result: Bytes,
        stderr: String,
    },
    /// Not the guest's fault (function or pool busy): try again soon, the attempt not counted.
    Busy,
    Failed {
        error: serde_json::Value,
        stderr: String,
        retry: bool,
    },
}

/// A step a worker runs on its connection, on the blocking pool.
type DbCall = Box<dyn FnOnce(&mut Connection) -> rusqlite::Result<Vec<Claimed>> + Send>;

async fn work(app: Arc<App>) {
    let conn = match worker_connection(&app) {
        Ok(conn) => Arc::new(std::sync::Mutex::new(conn)),
        Err(e) => return tracing::error!(error = %e, "async worker cannot open the database"),
    };
    let db = |f: DbCall| {
        let conn = conn.clone();
        tokio::task::spawn_blocking(move || f(&mut conn.lock().unwrap_or_else(|e| e.into_inner())))
    };
    while !app.is_shutting_down() {
        let claimed = match db(Box::new(|conn| claim(conn))).await.expect("worker task panicked") {
            Ok(claimed) if !claimed.is_empty() => claimed,
            Ok(_) => {
                tokio::select! {
                    () = app.jobs.wake.notified() => {}
                    () = tokio::time::sleep(POLL) => {}
                }
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "claiming an async invocation failed");
                tokio::time::sleep(POLL).await;
                continue;
            }
        };
        // The batch runs concurrently; its outcomes are recorded together, in one transaction.
        let outcomes = futures_util::future::join_all(claimed.into_iter().map(|claimed| {
            let app = &app;
            async move {
                let started = std::time::Instant::now();
                let outcome = run(app, &claimed).await;
                let duration_us = started.elapsed().as_micros() as i64;
                match &outcome {
                    Outcome::Succeeded { .. } => app.metrics.invocations_ok.inc(),
                    Outcome::Failed { error, .. } if error["code"] == "timeout" => {
                        app.metrics.invocations_timeout.inc()
                    }
                    Outcome::Failed { .. } => app.metrics.invocations_failed.inc(),
                    Outcome::Busy => {}
                }
                (claimed, outcome, duration_us)
            }
        }))
        .await;
        let record_all = move |conn: &mut Connection| {
            let tx = conn.transaction()?;
            for (claimed, outcome, duration_us) in outcomes {
                record(&tx, &claimed, outcome, duration_us)?;
            }
            tx.commit().map(|()| Vec::new())
        };
        if let Err(e) = db(Box::new(record_all)).await.expect("worker task panicked") {
            tracing::error!(error = %e, "recording async invocations failed; they will run again");
        }
    }
}

async fn run(app: &App, claimed: &Claimed) -> Outcome {
    let (function, concurrency) = match app.resolve(&claimed.function, Some(claimed.version)).await {
        Ok(resolved) => resolved,
        Err(e @ (LoadError::NoFunction(_) | LoadError::NoVersion(..))) => {
            let error = json!({"code": "not_found", "message": e.to_string()});
            return Outcome::Failed {
                error,
                stderr: String::new(),
                retry: false,
            };
        }
        Err(e) => {
            tracing::error!(error = %e, "loading a function for an async invocation failed");
            let error = json!({"code": "internal", "message": "the function could not be loaded"});
            return Outcome::Failed {
                error,
                stderr: String::new(),
                retry: true,
            };
        }
    };
    let input = Bytes::from(claimed.input.clone());
    match invoke::invoke(app, &function, &concurrency, input).await {
        Ok(success) => Outcome::Succeeded {
            result: success.stdout,
            stderr: success.stderr.tail(STDERR_TAIL),
        },
        Err(InvokeError::FunctionBusy(..) | InvokeError::PoolBusy(_)) => Outcome::Busy,
        Err(e) => {
            // The same error object a sync invoke answers with; stderr is kept in its own column.
            let stderr = match &e {
                InvokeError::Failed(failure) => failure.stderr_tail.clone(),
                _ => String::new(),
            };
            let mut error = ApiError::from(e).object();
            if let Some(object) = error.as_object_mut() {
                object.remove("stderr");
            }
            Outcome::Failed {
                error,
                stderr,
                retry: true,
            }
        }
    }
}

fn record(conn: &Connection, claimed: &Claimed, outcome: Outcome, duration_us: i64) -> rusqlite::Result<()> {
    let now_ms = now_ms();
    match outcome {
        Outcome::Succeeded { result, stderr } => conn.execute(
            "UPDATE invocations SET state = 'succeeded', result = ?2, stderr = ?3, error = NULL,
                 duration_us = ?4, finished_at = ?5, finished_ms = ?6 WHERE id = ?1",
            params![claimed.id, &result[..], stderr, duration_us, now_rfc3339(), now_ms],
        ),
        Outcome::Busy => conn.execute(
            "UPDATE invocations SET state = 'queued', attempts = attempts - 1, run_after_ms = ?2 WHERE id = ?1",
            params![claimed.id, now_ms + BUSY_DELAY.as_millis() as i64],
        ),
        Outcome::Failed { error, stderr, retry } if retry && claimed.attempts < claimed.max_attempts => {
            let backoff = BACKOFF
                .saturating_mul(1 << (claimed.attempts - 1).min(16))
                .min(MAX_BACKOFF);
            conn.execute(
                "UPDATE invocations SET state = 'queued', error = ?2, stderr = ?3, duration_us = ?4,
                     run_after_ms = ?5 WHERE id = ?1",
                params![
                    claimed.id,
                    error.to_string(),
                    stderr,
                    duration_us,
                    now_ms + backoff.as_millis() as i64
                ],
            )
        }
        Outcome::Failed { error, stderr, .. } => conn.execute(
            "UPDATE invocations SET state = 'failed', error = ?2, stderr = ?3, duration_us = ?4,
                 finished_at = ?5, finished_ms = ?6 WHERE id = ?1",
            params![
                claimed.id,
                error.to_string(),
                stderr,
                duration_us,
                now_rfc3339(),
                now_ms
            ],
        ),
    }
    .map(|_| ())
}

/// Deletes finished invocations older than the retention period, once a minute.
async fn sweep(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    while !app.is_shutting_down() {
        tick.tick().await;
        let cutoff = now_ms() - app.config.retention.as_millis() as i64;
        let store = app.store.clone();
        let deleted = tokio::task::spawn_blocking(move || {
            store
                .conn()
                .execute("DELETE FROM invocations WHERE finished_ms < ?1", params![cutoff])
        })
        .await;
        if let Ok(Ok(n)) = deleted {
            if n > 0 {
                tracing::info!(deleted = n, "swept finished async invocations past their retention");
            }
        }
    }
}

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

pub fn load_result(conn: &Connection, id: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.query_row(
        "SELECT result FROM invocations WHERE id = ?1 AND state = 'succeeded'",
        params![id],
        |r| r.get(0),
    )
    .optional()
}
