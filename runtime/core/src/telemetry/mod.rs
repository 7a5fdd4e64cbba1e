//! What Kiln records about what it runs: [`metrics`] (counters and histograms served at
//! `/metrics`, and per function the last hour by minute, [`series`], for the console),
//! [`invocation_logs`] (the kept stderr tail of synchronous invocations), [`recent`] (the newest
//! synchronous successes that left no log, so that the invocation list shows them), and, here,
//! what each finished invocation records, in one place: its metrics, its one structured log line
//! (target [`INVOCATION_TARGET`]) and (synchronous ones) its kept log; asynchronous runs keep
//! theirs in their own record. Everything here is cheap and non-blocking: atomics, one `tracing`
//! event, one channel send.
//!
//! The log line carries the id, function, version, outcome and duration (and Kiln's error message
//! for a failure); never the request or response body, the guest's stderr, or a token.

pub mod invocation_logs;
pub mod metrics;
pub mod recent;
pub mod series;

use std::sync::Arc;
use std::time::Duration;

use self::invocation_logs::{InvocationLogs, LogEntry};
use self::metrics::{Metrics, Outcome};
use self::recent::QuietSuccesses;
use crate::function::VersionRecord;
use crate::outcome::{InvokeError, Success};

/// The target of the one log line per invocation; the server's log writer batches these.
pub const INVOCATION_TARGET: &str = "kiln::invocation";

pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    /// Kept logs of synchronous invocations.
    pub logs: InvocationLogs,
    /// The newest synchronous invocations that left no log.
    pub quiet: QuietSuccesses,
}

impl Telemetry {
    pub fn sync_invocation(
        &self,
        id: uuid::Uuid,
        record: &VersionRecord,
        result: &Result<Success, InvokeError>,
        duration: Duration,
    ) {
        let (outcome, stderr, error) = match result {
            Ok(success) => (Outcome::Success, success.stderr_tail.clone(), None),
            Err(e @ InvokeError::Failed(failure)) => (Outcome::Failed, failure.stderr_tail.clone(), Some(e)),
            Err(e @ InvokeError::Timeout(_)) => (Outcome::Timeout, String::new(), Some(e)),
            Err(
                e @ (InvokeError::FunctionBusy(..)
                | InvokeError::PoolBusy(_)
                | InvokeError::HttpTrigger(_)
                | InvokeError::NotHttpTrigger(_)),
            ) => (Outcome::Rejected, String::new(), Some(e)),
        };
        self.metrics.observe(&record.name, outcome, duration);
        let duration_us = duration.as_micros() as u64;
        match error {
            None => tracing::info!(
                target: INVOCATION_TARGET,
                id = %id, function = %record.name, version = record.version,
                outcome = outcome.as_str(), duration_us, "invocation"
            ),
            Some(error) => tracing::info!(
                target: INVOCATION_TARGET,
                id = %id, function = %record.name, version = record.version,
                outcome = outcome.as_str(), duration_us, error = %error, "invocation"
            ),
        }
        // A refused invocation never ran, and a successful one that wrote nothing to stderr has no
        // log: nothing to keep. Skipping the quiet successes keeps the log writer's SQLite work (about
        // 10 µs a row) off the busiest path, a trivial function served at full speed.
        let quiet_success = outcome == Outcome::Success && stderr.is_empty();
        if quiet_success {
            self.quiet.push(id, &record.name, record.version, duration_us);
        } else if outcome != Outcome::Rejected {
            self.logs.record(LogEntry {
                id,
                function: record.name.clone(),
                version: record.version,
                outcome: outcome.as_str(),
                duration_us,
                stderr,
            });
        }
    }

    /// Records one request to an HTTP-trigger function. `duration` runs to the response's headers (its
    /// body may stream on); a failure after that is logged by the trigger itself.
    pub fn http_request(&self, record: &VersionRecord, result: Result<(), &InvokeError>, duration: Duration) {
        let outcome = match result {
            Ok(()) => Outcome::Success,
            Err(InvokeError::Failed(_)) => Outcome::Failed,
            Err(InvokeError::Timeout(_)) => Outcome::Timeout,
            Err(_) => Outcome::Rejected,
        };
        self.metrics.observe(&record.name, outcome, duration);
        let duration_us = duration.as_micros() as u64;
        match result {
            Ok(()) => tracing::info!(
                target: INVOCATION_TARGET,
                function = %record.name, version = record.version,
                outcome = outcome.as_str(), duration_us, http = true, "invocation"
            ),
            Err(error) => tracing::info!(
                target: INVOCATION_TARGET,
                function = %record.name, version = record.version,
                outcome = outcome.as_str(), duration_us, http = true, error = %error, "invocation"
            ),
        }
    }

    /// Records one run of an asynchronous invocation: the same per-function metrics and log line as a
    /// synchronous one (`invocations` keeps the stderr in the invocation's record). `error` is Kiln's message
    /// for a failed run.
    pub fn async_run(
        &self,
        id: &str,
        function: &str,
        version: u32,
        outcome: Outcome,
        duration: Duration,
        error: Option<&str>,
    ) {
        self.metrics.observe(function, outcome, duration);
        let duration_us = duration.as_micros() as u64;
        match error {
            None => tracing::info!(
                target: INVOCATION_TARGET,
                id, function, version, outcome = outcome.as_str(), duration_us, asynchronous = true, "invocation"
            ),
            Some(error) => tracing::info!(
                target: INVOCATION_TARGET,
                id, function, version, outcome = outcome.as_str(), duration_us, asynchronous = true, error,
                "invocation"
            ),
        }
    }
}
