//! Asynchronous invocations (the API's `invoke-async` and `/v1/invocations`): durable, retried,
//! at-least-once.
//!
//! One thread, the [`ledger`], owns every write to the `invocations` table. It takes what has
//! arrived since its last commit — new submits, finished runs — and writes it all in one
//! transaction, so a burst of submits shares one fsync and the queue never contends with itself
//! for SQLite's write lock.
//!
//! - **Submit**: answered `202` only after its row (input included) is committed with
//!   `synchronous=FULL`. While fewer than `async_workers` invocations run, a new row is written
//!   straight as `running` and handed to a runner after the commit (no second write to claim it);
//!   otherwise it waits as `queued`. An `Idempotency-Key` maps a retried submit to the first id.
//! - **Run**: each handed-out invocation runs in its own task, exactly like a sync invoke (same
//!   limits, same snapshot, [`run`]); its outcome goes back to the ledger as soon as it finishes.
//!   A failure is queued again with exponential backoff until the function's retries are used up.
//! - **Crash**: outcomes are committed without waiting for the disk unless a submit shares their
//!   commit; a crash can only lose them, which means running the invocation again. At start-up,
//!   `running` rows return to `queued`. Every accepted invocation is finished or run again.
//! - **Results** up to [`INLINE_RESULT`] live in the row; larger ones are files named by their
//!   SHA-256 under `<data>/results/`. Finished rows and unreferenced result files are swept after
//!   `retention`.

mod leases;
mod ledger;
mod records;
mod run;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::sync::oneshot;

use crate::clock::Clock;
use crate::digest::Digest;
use crate::kiln::Kiln;
use crate::storage::budget::{DiskBudget, StorageFull};
use crate::storage::{Blobs, Database, StorageError};

pub use records::{id_ms, uuid_ms, Mode, Query, Record, Summary, STATES};

/// Results larger than this are stored as files rather than in the row.
pub const INLINE_RESULT: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the async queue is full ({0} invocations waiting)")]
    QueueFull(u64),
    #[error(transparent)]
    Store(#[from] StorageError),
    #[error("the async queue is shut down")]
    Closed,
    #[error("committing the submit failed: {0}")]
    Commit(String),
    /// The database could not be reached to commit it (a shared queue on PostgreSQL).
    #[error("committing the submit failed: {0}")]
    Unreachable(String),
    #[error("{0}")]
    InsufficientStorage(#[from] StorageFull),
}

/// One accepted submit.
pub struct NewInvocation {
    pub function: String,
    pub version: u32,
    pub input: Bytes,
    pub idempotency_key: Option<String>,
    pub max_attempts: u32,
}

/// An invocation handed to a runner: its row is `running`.
#[derive(Clone)]
struct Claimed {
    id: String,
    function: String,
    version: u32,
    input: Bytes,
    /// This attempt's number, from 1.
    attempts: u32,
    max_attempts: u32,
}

/// Where a successful run's output is kept.
enum Stored {
    Inline(Bytes),
    /// A result blob, already durable.
    File(Digest),
}

/// What a run ended with, as it is recorded.
enum Outcome {
    Succeeded {
        result: Stored,
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

/// A finished run on its way to the ledger.
struct Done {
    claimed: Claimed,
    outcome: Outcome,
    duration_us: i64,
}

/// What the ledger thread is told.
enum Message {
    Submit {
        invocation: NewInvocation,
        reply: oneshot::Sender<Result<String, SubmitError>>,
    },
    Done(Done),
    /// Stop handing out work; answer once nothing runs.
    Drain(oneshot::Sender<()>),
}

/// The queue of asynchronous invocations, and the runners that take from it.
pub struct Queue {
    ledger: mpsc::Sender<Message>,
    /// What a submit's input must fit on disk.
    budget: Arc<DiskBudget>,
    closed: AtomicBool,
    /// Invocations queued or running, kept by the ledger (for `/metrics`).
    depth: Arc<AtomicU64>,
    /// Handed-out invocations, until `start` gives them runners.
    claimed: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Claimed>>>,
}

/// The queue's settings, from the server's configuration.
pub struct QueueConfig {
    /// The database the ledger writes (its own connection): a SQLite file, or PostgreSQL shared
    /// with other nodes (`leases`).
    pub database: Database,
    /// On PostgreSQL, how long a claimed invocation stays this node's without a renewal: how
    /// soon another node runs again what a dead node was running.
    pub lease: Duration,
    pub max_queued: u64,
    /// Invocations running at once.
    pub concurrency: usize,
    pub retention: Duration,
    /// What decides when retries are due and what is past its retention.
    pub clock: Arc<dyn Clock>,
}

impl Queue {
    /// Requeues what a crash left `running` and starts the ledger thread on its own connection.
    pub fn open(config: QueueConfig, blobs: Arc<dyn Blobs>, budget: Arc<DiskBudget>) -> Result<Queue, StorageError> {
        let (tx, rx) = mpsc::channel();
        let (claimed_tx, claimed_rx) = tokio::sync::mpsc::unbounded_channel();
        let depth = Arc::new(AtomicU64::new(0));
        let thread = std::thread::Builder::new().name("kiln-ledger".into());
        match config.database.clone() {
            Database::Sqlite(path) => {
                let ledger = ledger::Ledger::open(&path, config, blobs, claimed_tx, depth.clone())?;
                thread.spawn(move || ledger.run(rx))
            }
            Database::Postgres(pool) => {
                let ledger = leases::Leases::open(pool, config.lease, config, blobs, claimed_tx, depth.clone())?;
                thread.spawn(move || ledger.run(rx))
            }
        }
        .expect("spawning the async ledger");
        Ok(Queue {
            ledger: tx,
            budget,
            closed: AtomicBool::new(false),
            depth,
            claimed: Mutex::new(Some(claimed_rx)),
        })
    }

    /// Commits a submit durably and returns its id (the first one's, for a repeated idempotency key).
    pub async fn submit(&self, invocation: NewInvocation) -> Result<String, SubmitError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(SubmitError::Closed);
        }
        let (budget, bytes) = (self.budget.clone(), invocation.input.len() as u64);
        tokio::task::spawn_blocking(move || budget.admit(bytes))
            .await
            .expect("budget task panicked")?;
        let (reply, answer) = oneshot::channel();
        self.ledger
            .send(Message::Submit { invocation, reply })
            .map_err(|_| SubmitError::Closed)?;
        answer.await.map_err(|_| SubmitError::Closed)?
    }

    /// Asynchronous invocations queued or running.
    pub fn depth(&self) -> u64 {
        self.depth.load(Ordering::Relaxed)
    }

    /// Gives every handed-out invocation a task that runs it and reports back to the ledger.
    pub fn start(kiln: &Arc<Kiln>) {
        let Some(mut claimed) = kiln.queue.claimed.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let kiln = kiln.clone();
        tokio::spawn(async move {
            while let Some(invocation) = claimed.recv().await {
                let kiln = kiln.clone();
                tokio::spawn(async move {
                    // Every handed-out invocation reports back, even if running it panicked:
                    // otherwise its slot would stay taken and its row `running` until a restart.
                    let fallback = invocation.clone();
                    let done = match AssertUnwindSafe(run::run(&kiln, invocation)).catch_unwind().await {
                        Ok(done) => done,
                        Err(_) => {
                            tracing::error!(id = %fallback.id, "running an async invocation panicked");
                            Done {
                                claimed: fallback,
                                outcome: Outcome::Failed {
                                    error: serde_json::json!({"code": "internal", "message": "running the invocation failed inside Kiln"}),
                                    stderr: String::new(),
                                    retry: true,
                                },
                                duration_us: 0,
                            }
                        }
                    };
                    // Only fails once the ledger has stopped, at exit: the row stays `running`
                    // and runs again at the next start.
                    let _ = kiln.queue.ledger.send(Message::Done(done));
                });
            }
        });
    }

    /// Stops accepting submits and waits (up to `grace`) for running invocations to finish.
    pub async fn stop(&self, grace: Duration) {
        self.closed.store(true, Ordering::Release);
        let (reply, drained) = oneshot::channel();
        if self.ledger.send(Message::Drain(reply)).is_err() {
            return;
        }
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!(
                "async invocations still running after the grace period; they will run again at the next start"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::clock::ManualClock;
    use crate::storage::{Layout, LocalBlobs, Metadata, Sqlite, StoredResult};

    struct Harness {
        queue: Queue,
        claimed: tokio::sync::mpsc::UnboundedReceiver<Claimed>,
        metadata: Sqlite,
        clock: Arc<ManualClock>,
        _dir: tempfile::TempDir,
    }

    fn harness(concurrency: usize, max_queued: u64) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().to_path_buf());
        layout.prepare().unwrap();
        let metadata = Sqlite::open(&layout.database()).unwrap();
        let clock = ManualClock::at(1_800_000_000_000);
        let config = QueueConfig {
            database: Database::Sqlite(layout.database()),
            lease: Duration::from_secs(30),
            max_queued,
            concurrency,
            retention: Duration::from_secs(3600),
            clock: clock.clone(),
        };
        let budget = Arc::new(DiskBudget::new(layout.root.clone(), 0, None));
        let queue = Queue::open(config, Arc::new(LocalBlobs::new(layout)), budget).unwrap();
        let claimed = queue.claimed.lock().unwrap().take().unwrap();
        Harness {
            queue,
            claimed,
            metadata,
            clock,
            _dir: dir,
        }
    }

    fn submit(function: &str, key: Option<&str>) -> NewInvocation {
        NewInvocation {
            function: function.into(),
            version: 1,
            input: Bytes::from_static(b"in"),
            idempotency_key: key.map(str::to_owned),
            max_attempts: 2,
        }
    }

    fn done(claimed: Claimed, outcome: Outcome) -> Message {
        Message::Done(Done {
            claimed,
            outcome,
            duration_us: 5,
        })
    }

    fn state(h: &Harness, id: &str) -> (String, u32) {
        let record = h.metadata.invocation(id).unwrap().unwrap();
        (record.state, record.attempts)
    }

    /// The ledger on its own: what it hands out, what it records, when it retries — against a real
    /// SQLite file and a clock the test moves.
    #[tokio::test]
    async fn the_ledger_hands_out_records_retries_and_refuses_past_its_cap() {
        let mut h = harness(1, 1);
        // One slot: the first submit runs at once, the second waits, the third is refused.
        let first = h.queue.submit(submit("f", Some("k"))).await.unwrap();
        let second = h.queue.submit(submit("f", None)).await.unwrap();
        let refused = h.queue.submit(submit("f", None)).await.unwrap_err();
        assert!(matches!(refused, SubmitError::QueueFull(1)), "{refused}");
        assert_eq!(
            h.queue.submit(submit("f", Some("k"))).await.unwrap(),
            first,
            "same key, same id"
        );
        assert_eq!(h.queue.depth(), 2);
        let running = h.claimed.recv().await.unwrap();
        assert_eq!((running.id.as_str(), running.attempts), (first.as_str(), 1));
        assert_eq!(state(&h, &first), ("running".into(), 1));
        assert_eq!(state(&h, &second), ("queued".into(), 0));

        // A failure with a retry left goes back to the queue after its backoff; the slot it freed
        // goes to the invocation that was waiting.
        let failure = Outcome::Failed {
            error: serde_json::json!({"code": "function_failed", "message": "exit 1"}),
            stderr: "oops\n".into(),
            retry: true,
        };
        h.queue.ledger.send(done(running, failure)).unwrap();
        let next = h.claimed.recv().await.unwrap();
        assert_eq!(next.id, second);
        assert_eq!(state(&h, &first), ("queued".into(), 1));

        // The waiting one succeeds with a result too large for its row: it is a blob.
        let big = Bytes::from(vec![7u8; INLINE_RESULT + 1]);
        let digest = Digest::of(&big);
        let blobs = LocalBlobs::new(Layout::new(h._dir.path().to_path_buf()));
        blobs.put(crate::storage::BlobKind::Result, &digest, &big).unwrap();
        let succeeded = Outcome::Succeeded {
            result: Stored::File(digest.clone()),
            stderr: String::new(),
        };
        h.queue.ledger.send(done(next, succeeded)).unwrap();

        // Once the backoff has passed (on the ledger's clock), the failed one runs again.
        h.clock.advance(Duration::from_secs(1));
        let _ = h.queue.submit(submit("g", None)).await;
        let mut retried = h.claimed.recv().await.unwrap();
        if retried.id != first {
            // The submit of `g` may have taken the slot first; finish it and take the retry.
            h.queue.ledger.send(done(retried, Outcome::Busy)).unwrap();
            retried = h.claimed.recv().await.unwrap();
        }
        assert_eq!((retried.id.as_str(), retried.attempts), (first.as_str(), 2));
        let last_failure = Outcome::Failed {
            error: serde_json::json!({"code": "timeout", "message": "too slow"}),
            stderr: String::new(),
            retry: true,
        };
        h.queue.ledger.send(done(retried, last_failure)).unwrap();

        // Drained: every outcome is recorded.
        h.queue.stop(Duration::from_secs(5)).await;
        assert_eq!(state(&h, &first), ("failed".into(), 2), "its retries are used up");
        let record = h.metadata.invocation(&first).unwrap().unwrap();
        assert_eq!(record.error.unwrap()["code"], "timeout");
        assert_eq!(state(&h, &second).0, "succeeded");
        let input_len = |id: &str| -> i64 {
            h.metadata
                .conn()
                .query_row("SELECT length(input) FROM invocations WHERE id = ?1", [id], |r| {
                    r.get(0)
                })
                .unwrap()
        };
        assert_eq!(input_len(&second), 0, "a succeeded invocation's input is dropped");
        assert_eq!(input_len(&first), 2, "a failed one keeps its input");
        assert_eq!(
            h.metadata.invocation_result(&second).unwrap(),
            Some(StoredResult::Blob(digest))
        );
        let ids: HashSet<_> = [first, second].into();
        assert_eq!(ids.len(), 2);
    }
}
