//! The ledger: the one thread that writes the `invocations` table.
//!
//! Each turn takes every message waiting (submits, finished runs, a drain request), applies them
//! in one transaction, hands out due work up to the concurrency limit, and only after the commit
//! answers the submits and starts the handed-out runs. The commit is `synchronous=FULL` when it
//! holds a submit (a `202` promises the row is on disk) and `NORMAL` otherwise (losing an outcome
//! in a crash only means running the invocation again).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tokio::sync::{mpsc::UnboundedSender, oneshot};

use super::{Claimed, Done, Message, NewInvocation, Outcome, QueueConfig, Stored, SubmitError};
use crate::clock::now_rfc3339;
use crate::digest::Digest;
use crate::storage::{sqlite, BlobKind, Blobs, StorageError};

/// Messages applied in one transaction at most.
const BATCH: usize = 1024;
/// First retry delay; doubles per attempt, up to `MAX_BACKOFF`.
const BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Delay before trying again an invocation that found its function or the pool busy.
const BUSY_DELAY: Duration = Duration::from_millis(50);
/// How often finished invocations past their retention are deleted, and how many per turn.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
const SWEEP_ROWS: u32 = 10_000;
/// Pause after a failed commit before the next try.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

type Reply = oneshot::Sender<Result<String, SubmitError>>;

pub(super) struct Ledger {
    conn: Connection,
    blobs: Arc<dyn Blobs>,
    config: QueueConfig,
    /// Where handed-out invocations go to be run.
    runners: UnboundedSender<Claimed>,
    depth: Arc<AtomicU64>,
    /// Rows in state `queued`.
    queued: u64,
    /// Handed-out invocations whose outcome has not come back.
    running: usize,
    /// The earliest `run_after_ms` of a queued row; `None` when nothing is queued.
    next_due: Option<i64>,
    /// Set once shutdown began: nothing more is handed out, and these are answered when
    /// nothing runs.
    drains: Option<Vec<oneshot::Sender<()>>>,
    full_sync: bool,
    next_sweep: Instant,
    /// Outcomes whose commit failed, recorded at the next turn; their runs still hold a slot.
    unrecorded: Vec<Done>,
}

/// What one turn's transaction decided, applied to the ledger's counters once it committed.
#[derive(Default)]
struct Turn {
    /// One per submit, in order.
    answers: Vec<Result<String, SubmitError>>,
    handed_out: Vec<Claimed>,
    queued_delta: i64,
    next_due: Option<i64>,
}

impl Ledger {
    pub(super) fn open(
        database: &std::path::Path,
        config: QueueConfig,
        blobs: Arc<dyn Blobs>,
        runners: UnboundedSender<Claimed>,
        depth: Arc<AtomicU64>,
    ) -> Result<Ledger, StorageError> {
        let conn = sqlite::connect(database)?;
        let requeued = conn.execute("UPDATE invocations SET state = 'queued' WHERE state = 'running'", [])?;
        if requeued > 0 {
            tracing::info!(
                requeued,
                "async invocations that were running at the last stop will run again"
            );
        }
        let queued: u64 = conn.query_row("SELECT COUNT(*) FROM invocations WHERE state = 'queued'", [], |r| {
            r.get(0)
        })?;
        let next_due = next_due(&conn)?;
        remove_orphan_results(&conn, blobs.as_ref());
        depth.store(queued, Ordering::Relaxed);
        Ok(Ledger {
            conn,
            blobs,
            config,
            runners,
            depth,
            queued,
            running: 0,
            next_due,
            drains: None,
            full_sync: true,
            next_sweep: Instant::now() + SWEEP_EVERY,
            unrecorded: Vec::new(),
        })
    }

    /// Runs until every sender is gone (the process is exiting).
    pub(super) fn run(mut self, messages: mpsc::Receiver<Message>) {
        loop {
            let first = match messages.recv_timeout(self.idle_wait()) {
                Ok(message) => Some(message),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let batch: Vec<Message> = first
                .into_iter()
                .chain(std::iter::from_fn(|| messages.try_recv().ok()))
                .take(BATCH)
                .collect();
            self.turn(batch);
            if Instant::now() >= self.next_sweep {
                self.sweep();
                self.next_sweep = Instant::now() + SWEEP_EVERY;
            }
        }
    }

    /// How long to wait for a message before looking at the queue (or sweeping) anyway.
    fn idle_wait(&self) -> Duration {
        let until_sweep = self.next_sweep.saturating_duration_since(Instant::now());
        match self.next_due {
            Some(due) if self.can_hand_out() => {
                Duration::from_millis((due - self.now_ms()).max(0) as u64).min(until_sweep)
            }
            _ => until_sweep,
        }
    }

    fn now_ms(&self) -> i64 {
        self.config.clock.now_ms() as i64
    }

    fn can_hand_out(&self) -> bool {
        self.drains.is_none() && self.running < self.config.concurrency
    }

    fn turn(&mut self, batch: Vec<Message>) {
        let mut submits = Vec::new();
        let mut replies: Vec<Reply> = Vec::new();
        // Outcomes a failed commit could not record come first.
        let mut done = std::mem::take(&mut self.unrecorded);
        for message in batch {
            match message {
                Message::Submit { invocation, reply } => {
                    submits.push(invocation);
                    replies.push(reply);
                }
                Message::Done(d) => done.push(d),
                Message::Drain(reply) => self.drains.get_or_insert_with(Vec::new).push(reply),
            }
        }
        // A result file swept after its run wrote it (only this thread deletes them): run the
        // invocation again rather than record a result that is gone.
        for d in &mut done {
            if let Outcome::Succeeded {
                result: Stored::File(digest),
                ..
            } = &d.outcome
            {
                if !self.blobs.exists(BlobKind::Result, digest) {
                    d.outcome = Outcome::Busy;
                }
            }
        }
        let still_running = self.running - done.len();
        let now_ms = self.now_ms();
        let due = self.next_due.is_some_and(|due| due <= now_ms);
        let wants_work = self.can_hand_out() && due;
        if submits.is_empty() && done.is_empty() && !wants_work {
            self.finish_drain();
            return;
        }

        let full_sync = !submits.is_empty();
        let result = self.set_sync(full_sync).and_then(|()| {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut turn = Turn::default();
            for d in &done {
                turn.queued_delta += record(&tx, d, now_ms)?;
            }
            let mut free = if self.drains.is_none() {
                self.config.concurrency.saturating_sub(still_running)
            } else {
                0
            };
            if free > 0 && due {
                let claimed = claim(&tx, free, now_ms)?;
                free -= claimed.len();
                turn.queued_delta -= claimed.len() as i64;
                turn.handed_out.extend(claimed);
            }
            let mut queued = (self.queued as i64 + turn.queued_delta) as u64;
            for invocation in submits {
                let answer = insert(
                    &tx,
                    invocation,
                    &mut free,
                    &mut queued,
                    self.config.max_queued,
                    &mut turn,
                    now_ms,
                )?;
                turn.answers.push(answer);
            }
            turn.queued_delta = queued as i64 - self.queued as i64;
            turn.next_due = next_due(&tx)?;
            tx.commit()?;
            Ok(turn)
        });
        match result {
            Ok(turn) => {
                self.queued = (self.queued as i64 + turn.queued_delta) as u64;
                self.next_due = turn.next_due;
                self.running = still_running + turn.handed_out.len();
                for (reply, answer) in replies.into_iter().zip(turn.answers) {
                    let _ = reply.send(answer);
                }
                for claimed in turn.handed_out {
                    // The receiver lives as long as the process; a send can only fail at exit.
                    let _ = self.runners.send(claimed);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "committing the async queue's changes failed");
                // Nothing of the transaction happened: submits are refused (no 202 was sent), and
                // the outcomes are kept for the next turn, after a pause so that a lasting failure
                // (disk full, say) does not spin.
                for reply in replies {
                    let _ = reply.send(Err(SubmitError::Commit(e.to_string())));
                }
                self.unrecorded = done;
                std::thread::sleep(ERROR_PAUSE);
            }
        }
        self.depth.store(self.queued + self.running as u64, Ordering::Relaxed);
        self.finish_drain();
    }

    fn set_sync(&mut self, full: bool) -> rusqlite::Result<()> {
        if self.full_sync != full {
            self.conn
                .pragma_update(None, "synchronous", if full { "FULL" } else { "NORMAL" })?;
            self.full_sync = full;
        }
        Ok(())
    }

    fn finish_drain(&mut self) {
        if self.running == 0 {
            if let Some(drains) = self.drains.as_mut() {
                for reply in drains.drain(..) {
                    let _ = reply.send(());
                }
            }
        }
    }

    /// Deletes finished invocations past their retention, and the result files no row names.
    fn sweep(&mut self) {
        let retention = i64::try_from(self.config.retention.as_millis()).unwrap_or(i64::MAX);
        let cutoff = self.now_ms().saturating_sub(retention);
        let swept = (|| -> rusqlite::Result<(usize, Vec<String>)> {
            let mut stmt = self.conn.prepare_cached(
                "DELETE FROM invocations WHERE id IN
                    (SELECT id FROM invocations WHERE finished_ms < ?1 LIMIT ?2)
                 RETURNING result_digest",
            )?;
            let digests = stmt
                .query_map(params![cutoff, SWEEP_ROWS], |r| r.get::<_, Option<String>>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((digests.len(), digests.into_iter().flatten().collect()))
        })();
        match swept {
            Ok((0, _)) => {}
            Ok((rows, digests)) => {
                for digest in digests.iter().filter_map(|d| Digest::parse(d)) {
                    remove_if_unreferenced(&self.conn, self.blobs.as_ref(), &digest);
                }
                tracing::info!(rows, "swept finished async invocations past their retention");
                if rows as u32 == SWEEP_ROWS {
                    // More to do: come back soon rather than in a minute.
                    self.next_sweep = Instant::now();
                }
            }
            Err(e) => tracing::error!(error = %e, "sweeping finished async invocations failed"),
        }
    }
}

/// Writes a new submit: `running` and handed out if a slot is free, `queued` otherwise.
fn insert(
    tx: &Transaction,
    invocation: NewInvocation,
    free: &mut usize,
    queued: &mut u64,
    max_queued: u64,
    turn: &mut Turn,
    now_ms: i64,
) -> rusqlite::Result<Result<String, SubmitError>> {
    if let Some(key) = &invocation.idempotency_key {
        let existing: Option<String> = tx
            .prepare_cached("SELECT id FROM invocations WHERE function = ?1 AND idempotency_key = ?2")?
            .query_row(params![invocation.function, key], |r| r.get(0))
            .optional()?;
        if let Some(id) = existing {
            return Ok(Ok(id));
        }
    }
    let run_now = *free > 0;
    if !run_now && *queued >= max_queued {
        return Ok(Err(SubmitError::QueueFull(*queued)));
    }
    let id = uuid::Uuid::now_v7().to_string();
    let (state, attempts) = if run_now { ("running", 1) } else { ("queued", 0) };
    tx.prepare_cached(
        "INSERT INTO invocations (id, function, version, state, input, idempotency_key, attempts, max_attempts,
                                  run_after_ms, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        id,
        invocation.function,
        invocation.version,
        state,
        &invocation.input[..],
        invocation.idempotency_key,
        attempts,
        invocation.max_attempts,
        now_ms,
        now_rfc3339()
    ])?;
    if run_now {
        *free -= 1;
        turn.handed_out.push(Claimed {
            id: id.clone(),
            function: invocation.function,
            version: invocation.version,
            input: invocation.input,
            attempts: 1,
            max_attempts: invocation.max_attempts,
        });
    } else {
        *queued += 1;
    }
    Ok(Ok(id))
}

/// Marks up to `limit` due queued invocations `running` and returns them.
fn claim(tx: &Transaction, limit: usize, now_ms: i64) -> rusqlite::Result<Vec<Claimed>> {
    let mut stmt = tx.prepare_cached(
        "UPDATE invocations SET state = 'running', attempts = attempts + 1
         WHERE id IN (SELECT id FROM invocations WHERE state = 'queued' AND run_after_ms <= ?1
                      ORDER BY run_after_ms, id LIMIT ?2)
         RETURNING id, function, version, input, attempts, max_attempts",
    )?;
    let rows = stmt.query_map(params![now_ms, limit as i64], |r| {
        Ok(Claimed {
            id: r.get(0)?,
            function: r.get(1)?,
            version: r.get(2)?,
            input: Bytes::from(r.get::<_, Vec<u8>>(3)?),
            attempts: r.get(4)?,
            max_attempts: r.get(5)?,
        })
    })?;
    rows.collect()
}

fn next_due(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT MIN(run_after_ms) FROM invocations WHERE state = 'queued'")?
        .query_row([], |r| r.get(0))
}

/// Records a finished run; returns how many rows it put back in the queue (0 or 1).
fn record(tx: &Transaction, done: &Done, now_ms: i64) -> rusqlite::Result<i64> {
    let Done {
        claimed,
        outcome,
        duration_us,
    } = done;
    match outcome {
        Outcome::Succeeded { result, stderr } => {
            let (inline, digest) = match result {
                Stored::Inline(bytes) => (Some(&bytes[..]), None),
                Stored::File(digest) => (None, Some(digest.hex().to_owned())),
            };
            tx.prepare_cached(
                // The input is not needed any more: a succeeded invocation never runs again, and a
                // megabyte per invocation kept for the retention period adds up.
                "UPDATE invocations SET state = 'succeeded', result = ?2, result_digest = ?3, stderr = ?4,
                     error = NULL, duration_us = ?5, finished_at = ?6, finished_ms = ?7, input = x'' WHERE id = ?1",
            )?
            .execute(params![
                claimed.id,
                inline,
                digest,
                stderr,
                duration_us,
                now_rfc3339(),
                now_ms
            ])?;
            Ok(0)
        }
        Outcome::Busy => {
            tx.prepare_cached(
                "UPDATE invocations SET state = 'queued', attempts = attempts - 1, run_after_ms = ?2 WHERE id = ?1",
            )?
            .execute(params![claimed.id, now_ms + BUSY_DELAY.as_millis() as i64])?;
            Ok(1)
        }
        Outcome::Failed { error, stderr, retry } if *retry && claimed.attempts < claimed.max_attempts => {
            let backoff = BACKOFF
                .saturating_mul(1 << (claimed.attempts.saturating_sub(1)).min(16))
                .min(MAX_BACKOFF);
            tx.prepare_cached(
                "UPDATE invocations SET state = 'queued', error = ?2, stderr = ?3, duration_us = ?4,
                     run_after_ms = ?5 WHERE id = ?1",
            )?
            .execute(params![
                claimed.id,
                error.to_string(),
                stderr,
                duration_us,
                now_ms + backoff.as_millis() as i64
            ])?;
            Ok(1)
        }
        Outcome::Failed { error, stderr, .. } => {
            tx.prepare_cached(
                "UPDATE invocations SET state = 'failed', error = ?2, stderr = ?3, duration_us = ?4,
                     finished_at = ?5, finished_ms = ?6 WHERE id = ?1",
            )?
            .execute(params![
                claimed.id,
                error.to_string(),
                stderr,
                duration_us,
                now_rfc3339(),
                now_ms
            ])?;
            Ok(0)
        }
    }
}

fn remove_if_unreferenced(conn: &Connection, blobs: &dyn Blobs, digest: &Digest) {
    let referenced = conn
        .prepare_cached("SELECT 1 FROM invocations WHERE result_digest = ?1 LIMIT 1")
        .and_then(|mut stmt| stmt.exists(params![digest.hex()]));
    if !matches!(referenced, Ok(false)) {
        return;
    }
    // A run may have written this file again for an outcome not yet recorded; `turn` notices the
    // file is gone and runs that invocation again.
    let _ = blobs.remove(BlobKind::Result, digest);
}

/// Result files no row names: what a crash left between writing a result and recording it.
/// Called before any run starts, so none can be in the making.
fn remove_orphan_results(conn: &Connection, blobs: &dyn Blobs) {
    let Ok(digests) = blobs.list(BlobKind::Result) else {
        return;
    };
    for digest in digests {
        let referenced = conn
            .prepare_cached("SELECT 1 FROM invocations WHERE result_digest = ?1 LIMIT 1")
            .and_then(|mut stmt| stmt.exists(params![digest.hex()]));
        if matches!(referenced, Ok(false)) {
            let _ = blobs.remove(BlobKind::Result, &digest);
        }
    }
}
