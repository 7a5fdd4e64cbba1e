//! What is recorded about each finished invocation, in one place: its metrics, its one structured
//! log line, and (synchronous ones) its kept log, the guest's stderr tail; asynchronous runs keep
//! theirs in their own record. Everything here is cheap
//! and non-blocking: atomics, one `tracing` event, one channel send.
//!
//! The log line carries the id, function, version, outcome and duration (and Kiln's error message
//! for a failure); never the request or response body, the guest's stderr, or a token.

use std::time::Duration;

use crate::app::App;
use crate::invoke::{InvokeError, Success, STDERR_TAIL};
use crate::log_output::INVOCATION_TARGET;
use crate::logs::LogEntry;
use crate::metrics::Outcome;
use crate::store::VersionRecord;

pub fn sync_invocation(
    app: &App,
    id: uuid::Uuid,
    record: &VersionRecord,
    result: &Result<Success, InvokeError>,
    duration: Duration,
) {
    let (outcome, stderr, error) = match result {
        Ok(success) => (Outcome::Success, success.stderr.tail(STDERR_TAIL), None),
        Err(e @ InvokeError::Failed(failure)) => (Outcome::Failed, failure.stderr_tail.clone(), Some(e)),
        Err(e @ InvokeError::Timeout(_)) => (Outcome::Timeout, String::new(), Some(e)),
        Err(
            e @ (InvokeError::FunctionBusy(..)
            | InvokeError::PoolBusy(_)
            | InvokeError::HttpTrigger(_)
            | InvokeError::NotHttpTrigger(_)),
        ) => (Outcome::Rejected, String::new(), Some(e)),
    };
    app.metrics.observe(&record.name, outcome, duration);
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
    if outcome != Outcome::Rejected && !quiet_success {
        app.logs.record(LogEntry {
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
pub fn http_request(app: &App, record: &VersionRecord, result: Result<(), &InvokeError>, duration: Duration) {
    let outcome = match result {
        Ok(()) => Outcome::Success,
        Err(InvokeError::Failed(_)) => Outcome::Failed,
        Err(InvokeError::Timeout(_)) => Outcome::Timeout,
        Err(_) => Outcome::Rejected,
    };
    app.metrics.observe(&record.name, outcome, duration);
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
/// synchronous one (`jobs` keeps the stderr in the invocation's record). `error` is Kiln's message
/// for a failed run.
pub fn async_run(
    app: &App,
    id: &str,
    function: &str,
    version: u32,
    outcome: Outcome,
    duration: Duration,
    error: Option<&str>,
) {
    app.metrics.observe(function, outcome, duration);
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
