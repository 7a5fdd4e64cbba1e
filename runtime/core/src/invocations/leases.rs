//! The ledger on PostgreSQL, for several nodes sharing one queue.
//!
//! Same messages and same answers as the SQLite [`ledger`](super::ledger) — a submit is answered
//! only after its row is committed, outcomes are written in batches — but the table is shared, so
//! a `running` row is held under a lease: `lease_owner` is this node, `lease_until_ms` the time it
//! must renew by. A node renews its leases every third of the lease; one that dies stops renewing,
//! and once its leases expire any node claims those rows again, counting the attempt
//! (at-least-once). Claims take rows with `FOR UPDATE SKIP LOCKED`, so nodes never wait on each
//! other's claims, and an outcome is only written while this node still holds the lease: a run
//! whose lease was lost (a long pause, a partition) is dropped in favour of the node that took over.
//!
//! Other nodes' submits wake no one here: a node with free slots looks for due rows every
//! [`POLL`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use postgres::{Client, Transaction};
use tokio::sync::{mpsc::UnboundedSender, oneshot};

use super::{Claimed, Done, Message, NewInvocation, Outcome, QueueConfig, Stored, SubmitError};
use crate::clock::now_rfc3339;
use crate::digest::Digest;
use crate::storage::postgres::{blocking, Pool};
use crate::storage::{BlobKind, Blobs, StorageError};

const BATCH: usize = 1024;
const BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
const BUSY_DELAY: Duration = Duration::from_millis(50);
/// How often a node with free slots looks for work other nodes submitted or left behind.
pub const POLL: Duration = Duration::from_millis(250);
const SWEEP_EVERY: Duration = Duration::from_secs(60);
const SWEEP_ROWS: i64 = 10_000;
const ERROR_PAUSE: Duration = Duration::from_secs(1);

type Reply = oneshot::Sender<Result<String, SubmitError>>;

pub(super) struct Leases {
    pool: Arc<Pool>,
    client: Option<Client>,
    /// This process's name in `lease_owner`.
    node: String,
    lease: Duration,
    blobs: Arc<dyn Blobs>,
    config: QueueConfig,
    runners: UnboundedSender<Claimed>,
    depth: Arc<AtomicU64>,
    /// Rows queued across the cluster, as last counted.
    queued: u64,
    /// Handed-out invocations whose outcome has not come back.
    running: usize,
    drains: Option<Vec<oneshot::Sender<()>>>,
    next_poll: Instant,
    next_renew: Instant,
    next_sweep: Instant,
    unrecorded: Vec<Done>,
}

impl Leases {
    pub(super) fn open(
        pool: Arc<Pool>,
        lease: Duration,
        config: QueueConfig,
        blobs: Arc<dyn Blobs>,
        runners: UnboundedSender<Claimed>,
        depth: Arc<AtomicU64>,
    ) -> Result<Leases, StorageError> {
        let client = pool.connect()?;
        let now = Instant::now();
        Ok(Leases {
            pool,
            client: Some(client),
            node: uuid::Uuid::now_v7().to_string(),
            lease,
            blobs,
            config,
            runners,
            depth,
            queued: 0,
            running: 0,
            drains: None,
            next_poll: now,
            next_renew: now + lease / 3,
            next_sweep: now + SWEEP_EVERY,
            unrecorded: Vec::new(),
        })
    }

    pub(super) fn run(mut self, messages: mpsc::Receiver<Message>) {
        loop {
            let wait = self.next_event().saturating_duration_since(Instant::now());
            let first = match messages.recv_timeout(wait) {
                Ok(message) => Some(message),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let batch: Vec<Message> = first
                .into_iter()
                .chain(std::iter::from_fn(|| messages.try_recv().ok()))
                .take(BATCH)
                .collect();
            let now = Instant::now();
            if now >= self.next_renew {
                self.renew();
                self.next_renew = now + self.lease / 3;
            }
            self.turn(batch);
            if now >= self.next_sweep {
                self.sweep();
                self.next_sweep = now + SWEEP_EVERY;
            }
        }
    }

    fn next_event(&self) -> Instant {
        let mut next = self.next_renew.min(self.next_sweep);
        if self.can_hand_out() {
            next = next.min(self.next_poll);
        }
        next
    }

    fn can_hand_out(&self) -> bool {
        self.drains.is_none() && self.running < self.config.concurrency
    }

    fn now_ms(&self) -> i64 {
        self.config.clock.now_ms() as i64
    }

    /// Runs `work` in one transaction on this ledger's connection, reconnecting first if the
    /// last one broke.
    fn transaction<T: Send>(
        &mut self,
        durable: bool,
        work: impl FnOnce(&mut Transaction<'_>) -> Result<T, StorageError> + Send,
    ) -> Result<T, StorageError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = Some(self.pool.connect()?);
        }
        let client = self.client.as_mut().expect("connected above");
        blocking(|| {
            let mut tx = client.transaction()?;
            if !durable {
                // Losing an outcome in a database crash only means running it again.
                tx.batch_execute("SET LOCAL synchronous_commit = off")?;
            }
            let value = work(&mut tx)?;
            tx.commit()?;
            Ok(value)
        })
    }

    /// Extends the leases of what this node runs.
    fn renew(&mut self) {
        let (node, until) = (self.node.clone(), self.now_ms() + self.lease.as_millis() as i64);
        let renewed = self.transaction(false, |tx| {
            Ok(tx.execute(
                "UPDATE invocations SET lease_until_ms = $2 WHERE state = 'running' AND lease_owner = $1",
                &[&node, &until],
            )?)
        });
        if let Err(e) = renewed {
            tracing::error!(error = %e, "renewing the leases of running async invocations failed");
        }
    }

    fn turn(&mut self, batch: Vec<Message>) {
        let mut submits = Vec::new();
        let mut replies: Vec<Reply> = Vec::new();
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
        let poll = self.can_hand_out() && Instant::now() >= self.next_poll;
        if submits.is_empty() && done.is_empty() && !poll {
            self.finish_drain();
            return;
        }
        let free = if self.drains.is_none() {
            self.config.concurrency.saturating_sub(still_running)
        } else {
            0
        };
        let (node, now_ms, lease_ms) = (self.node.clone(), self.now_ms(), self.lease.as_millis() as i64);
        let max_queued = self.config.max_queued;
        let recorded = done
            .iter()
            .map(|d| (&d.claimed, &d.outcome, d.duration_us))
            .collect::<Vec<_>>();
        let durable = !submits.is_empty();
        let result = self.transaction(durable, |tx| {
            for (claimed, outcome, duration_us) in &recorded {
                record(tx, &node, claimed, outcome, *duration_us, now_ms)?;
            }
            let mut free = free;
            let mut handed_out = Vec::new();
            if free > 0 {
                let claimed = claim(tx, &node, free, now_ms, now_ms + lease_ms)?;
                free -= claimed.len();
                handed_out.extend(claimed);
            }
            let mut queued: i64 = tx
                .query_one("SELECT COUNT(*) FROM invocations WHERE state = 'queued'", &[])?
                .get(0);
            let mut answers = Vec::new();
            for invocation in submits {
                let answer = insert(
                    tx,
                    &node,
                    invocation,
                    &mut free,
                    &mut queued,
                    max_queued,
                    &mut handed_out,
                    now_ms,
                    now_ms + lease_ms,
                )?;
                answers.push(answer);
            }
            Ok((answers, handed_out, queued))
        });
        if poll {
            self.next_poll = Instant::now() + POLL;
        }
        match result {
            Ok((answers, handed_out, queued)) => {
                self.queued = queued.max(0) as u64;
                self.running = still_running + handed_out.len();
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(answer);
                }
                for claimed in handed_out {
                    let _ = self.runners.send(claimed);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "committing the async queue's changes failed");
                let unreachable = e.is_unreachable();
                for reply in replies {
                    let error = match unreachable {
                        true => SubmitError::Unreachable(e.to_string()),
                        false => SubmitError::Commit(e.to_string()),
                    };
                    let _ = reply.send(Err(error));
                }
                self.unrecorded = done;
                std::thread::sleep(ERROR_PAUSE);
            }
        }
        self.depth.store(self.queued + self.running as u64, Ordering::Relaxed);
        self.finish_drain();
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

    /// Deletes finished invocations past their retention (any node may; it is idempotent) and
    /// the result blobs no row names any more.
    fn sweep(&mut self) {
        let retention = i64::try_from(self.config.retention.as_millis()).unwrap_or(i64::MAX);
        let cutoff = self.now_ms().saturating_sub(retention);
        let swept = self.transaction(false, |tx| {
            let digests: Vec<Option<String>> = tx
                .query(
                    "DELETE FROM invocations WHERE id IN
                        (SELECT id FROM invocations WHERE finished_ms < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)
                     RETURNING result_digest",
                    &[&cutoff, &SWEEP_ROWS],
                )?
                .iter()
                .map(|row| row.get(0))
                .collect();
            let mut orphans = Vec::new();
            for digest in digests.iter().flatten() {
                let used = tx
                    .query_opt("SELECT 1 FROM invocations WHERE result_digest = $1 LIMIT 1", &[digest])?
                    .is_some();
                if !used {
                    orphans.extend(Digest::parse(digest));
                }
            }
            Ok((digests.len(), orphans))
        });
        match swept {
            Ok((0, _)) => {}
            Ok((rows, orphans)) => {
                for digest in orphans {
                    let _ = self.blobs.remove(BlobKind::Result, &digest);
                }
                tracing::info!(rows, "swept finished async invocations past their retention");
                if rows as i64 == SWEEP_ROWS {
                    self.next_sweep = Instant::now();
                }
            }
            Err(e) => tracing::error!(error = %e, "sweeping finished async invocations failed"),
        }
    }
}

/// Writes a new submit: `running` under this node's lease if a slot is free, `queued` otherwise.
#[allow(clippy::too_many_arguments)]
fn insert(
    tx: &mut Transaction<'_>,
    node: &str,
    invocation: NewInvocation,
    free: &mut usize,
    queued: &mut i64,
    max_queued: u64,
    handed_out: &mut Vec<Claimed>,
    now_ms: i64,
    lease_until_ms: i64,
) -> Result<Result<String, SubmitError>, StorageError> {
    if let Some(key) = &invocation.idempotency_key {
        let existing = tx.query_opt(
            "SELECT id FROM invocations WHERE function = $1 AND idempotency_key = $2",
            &[&invocation.function, key],
        )?;
        if let Some(row) = existing {
            return Ok(Ok(row.get(0)));
        }
    }
    let run_now = *free > 0;
    if !run_now && *queued as u64 >= max_queued {
        return Ok(Err(SubmitError::QueueFull(*queued as u64)));
    }
    let id = uuid::Uuid::now_v7().to_string();
    let (state, attempts, owner, until) = if run_now {
        ("running", 1i64, Some(node), Some(lease_until_ms))
    } else {
        ("queued", 0, None, None)
    };
    // Another node may insert the same idempotency key at the same moment: the unique index
    // decides, and the loser answers with the winner's id.
    let inserted = tx.query_opt(
        "INSERT INTO invocations (id, function, version, state, input, idempotency_key, attempts, max_attempts,
                                  run_after_ms, created_at, lease_owner, lease_until_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         ON CONFLICT (function, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
         RETURNING id",
        &[
            &id,
            &invocation.function,
            &i64::from(invocation.version),
            &state,
            &&invocation.input[..],
            &invocation.idempotency_key,
            &attempts,
            &i64::from(invocation.max_attempts),
            &now_ms,
            &now_rfc3339(),
            &owner,
            &until,
        ],
    )?;
    if inserted.is_none() {
        let winner = tx.query_one(
            "SELECT id FROM invocations WHERE function = $1 AND idempotency_key = $2",
            &[&invocation.function, &invocation.idempotency_key],
        )?;
        return Ok(Ok(winner.get(0)));
    }
    if run_now {
        *free -= 1;
        handed_out.push(Claimed {
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

/// Takes up to `limit` rows that are due, or whose lease expired (their node died or stalled),
/// under this node's lease; rows other nodes are claiming right now are skipped, not waited for.
fn claim(
    tx: &mut Transaction<'_>,
    node: &str,
    limit: usize,
    now_ms: i64,
    lease_until_ms: i64,
) -> Result<Vec<Claimed>, StorageError> {
    let rows = tx.query(
        "UPDATE invocations SET state = 'running', attempts = attempts + 1, lease_owner = $1, lease_until_ms = $2
         WHERE id IN (SELECT id FROM invocations
                      WHERE (state = 'queued' AND run_after_ms <= $3)
                         OR (state = 'running' AND lease_until_ms < $3)
                      ORDER BY run_after_ms, id LIMIT $4 FOR UPDATE SKIP LOCKED)
         RETURNING id, function, version, input, attempts, max_attempts",
        &[&node, &lease_until_ms, &now_ms, &(limit as i64)],
    )?;
    let lost = rows.iter().filter(|row| row.get::<_, i64>(4) > 1).count();
    if lost > 0 {
        tracing::debug!(claimed = rows.len(), "claimed async invocations, some of them again");
    }
    rows.iter()
        .map(|row| {
            Ok(Claimed {
                id: row.get(0),
                function: row.get(1),
                version: u32::try_from(row.get::<_, i64>(2)).map_err(|_| StorageError::Corrupt("version".into()))?,
                input: Bytes::from(row.get::<_, Vec<u8>>(3)),
                attempts: row.get::<_, i64>(4).clamp(0, u32::MAX as i64) as u32,
                max_attempts: row.get::<_, i64>(5).clamp(0, u32::MAX as i64) as u32,
            })
        })
        .collect()
}

/// Records a finished run, if this node still holds its lease for this attempt.
fn record(
    tx: &mut Transaction<'_>,
    node: &str,
    claimed: &Claimed,
    outcome: &Outcome,
    duration_us: i64,
    now_ms: i64,
) -> Result<(), StorageError> {
    // The row is ours only while the lease and the attempt are the ones we were handed.
    const MINE: &str = "id = $1 AND state = 'running' AND lease_owner = $2 AND attempts = $3";
    let (id, attempt) = (&claimed.id, i64::from(claimed.attempts));
    let written = match outcome {
        Outcome::Succeeded { result, stderr } => {
            let (inline, digest): (Option<&[u8]>, Option<&str>) = match result {
                Stored::Inline(bytes) => (Some(&bytes[..]), None),
                Stored::File(digest) => (None, Some(digest.hex())),
            };
            tx.execute(
                &format!(
                    "UPDATE invocations SET state = 'succeeded', result = $4, result_digest = $5, stderr = $6,
                         error = NULL, duration_us = $7, finished_at = $8, finished_ms = $9, input = ''::bytea,
                         lease_owner = NULL, lease_until_ms = NULL
                     WHERE {MINE}"
                ),
                &[
                    id,
                    &node,
                    &attempt,
                    &inline,
                    &digest,
                    stderr,
                    &duration_us,
                    &now_rfc3339(),
                    &now_ms,
                ],
            )?
        }
        Outcome::Busy => tx.execute(
            &format!(
                "UPDATE invocations SET state = 'queued', attempts = attempts - 1, run_after_ms = $4,
                     lease_owner = NULL, lease_until_ms = NULL
                 WHERE {MINE}"
            ),
            &[id, &node, &attempt, &(now_ms + BUSY_DELAY.as_millis() as i64)],
        )?,
        Outcome::Failed { error, stderr, retry } if *retry && claimed.attempts < claimed.max_attempts => {
            let backoff = BACKOFF
                .saturating_mul(1 << (claimed.attempts.saturating_sub(1)).min(16))
                .min(MAX_BACKOFF);
            tx.execute(
                &format!(
                    "UPDATE invocations SET state = 'queued', error = $4, stderr = $5, duration_us = $6,
                         run_after_ms = $7, lease_owner = NULL, lease_until_ms = NULL
                     WHERE {MINE}"
                ),
                &[
                    id,
                    &node,
                    &attempt,
                    &error.to_string(),
                    stderr,
                    &duration_us,
                    &(now_ms + backoff.as_millis() as i64),
                ],
            )?
        }
        Outcome::Failed { error, stderr, .. } => tx.execute(
            &format!(
                "UPDATE invocations SET state = 'failed', error = $4, stderr = $5, duration_us = $6,
                     finished_at = $7, finished_ms = $8, lease_owner = NULL, lease_until_ms = NULL
                 WHERE {MINE}"
            ),
            &[
                id,
                &node,
                &attempt,
                &error.to_string(),
                stderr,
                &duration_us,
                &now_rfc3339(),
                &now_ms,
            ],
        )?,
    };
    if written == 0 {
        tracing::warn!(id = %claimed.id, "an async invocation's lease was lost before it finished; another node runs it");
    }
    Ok(())
}
