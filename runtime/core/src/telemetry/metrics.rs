//! Process counters served at `GET /metrics` in the Prometheus text format.
//!
//! Hot-path cost: an invocation does one shard read of `functions` (a `DashMap`, no global lock)
//! to find its function's counters, then a few relaxed atomic increments: one outcome counter and,
//! for invocations that ran, one histogram bucket plus the sum and count. Rendering walks the map
//! and sorts by name, which is the scraper's cost, not the invoker's.
//!
//! Per-function series outlive a deleted function until the process restarts, as Prometheus
//! counters should (a counter that vanishes and comes back reads as a reset).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

use super::series::{MinuteStats, Series};

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    pub fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// How an invocation ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The guest trapped, exited non-zero or broke a limit.
    Failed,
    Timeout,
    /// Refused before running: the function's or the server's concurrency limit.
    Rejected,
}

impl Outcome {
    const ALL: [Outcome; 4] = [Outcome::Success, Outcome::Failed, Outcome::Timeout, Outcome::Rejected];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failed => "failed",
            Outcome::Timeout => "timeout",
            Outcome::Rejected => "rejected",
        }
    }
}

/// Upper bounds (seconds) of the duration histogram's buckets: from a warm Wasm call (~100 µs) to
/// the longest timeout (15 min).
pub const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 900.0,
];

/// The index in [`BUCKETS`] (or `+Inf`, the last) a duration is counted in.
pub fn bucket_of(duration: Duration) -> usize {
    let seconds = duration.as_secs_f64();
    BUCKETS.iter().position(|b| seconds <= *b).unwrap_or(BUCKETS.len())
}

/// One function's series.
#[derive(Default)]
pub struct FunctionMetrics {
    outcomes: [Counter; 4],
    /// Per bucket, not cumulative (rendering sums them); the last slot is `+Inf`.
    buckets: [Counter; BUCKETS.len() + 1],
    sum_us: Counter,
    /// The last hour by minute, for the console.
    recent: Series,
}

impl FunctionMetrics {
    fn observe(&self, minute: u64, outcome: Outcome, duration: Duration) {
        self.outcomes[outcome as usize].inc();
        self.recent.observe(minute, outcome, duration);
        if outcome == Outcome::Rejected {
            return;
        }
        self.buckets[bucket_of(duration)].inc();
        self.sum_us.0.fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
    }
}

/// A duration histogram over [`BUCKETS`].
#[derive(Default)]
pub struct Histogram {
    /// Per bucket, not cumulative (rendering sums them); the last slot is `+Inf`.
    buckets: [Counter; BUCKETS.len() + 1],
    sum_us: Counter,
}

impl Histogram {
    pub fn observe(&self, duration: Duration) {
        self.buckets[bucket_of(duration)].inc();
        self.sum_us.0.fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].get();
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[BUCKETS.len()].get();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}");
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum_us.get() as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

#[derive(Default)]
pub struct Metrics {
    /// Deploys that created a version (counted by `deploy`).
    pub deploys: Counter,
    /// Deploys that matched the latest version and created nothing.
    pub deploys_unchanged: Counter,
    /// Deploys refused (invalid code or config, too large, ...).
    pub deploys_failed: Counter,
    /// Asynchronous runs by outcome, all functions together, counted by `invocations` (per
    /// function they are in `kiln_invocations_total` with the synchronous ones); `rejected`
    /// counts runs put back in the queue because the function or the pool was busy.
    pub invocations_ok: Counter,
    pub invocations_failed: Counter,
    pub invocations_timeout: Counter,
    pub invocations_rejected: Counter,
    /// Sandbox transitions, by the state entered.
    sandbox_transitions: [Counter; 7],
    sandbox_suspend: Histogram,
    sandbox_resume: Histogram,
    functions: DashMap<String, Arc<FunctionMetrics>>,
}

/// Values read from elsewhere at render time.
pub struct Gauges {
    pub compilations: u64,
    pub functions: usize,
    pub instances_in_use: usize,
    /// Asynchronous invocations queued or running.
    pub async_queue_depth: u64,
    /// Sandboxes by state.
    pub sandboxes: Vec<(&'static str, u64)>,
}

impl Metrics {
    /// Counts a sandbox entering `state`.
    pub fn sandbox_transition(&self, state: crate::sandboxes::record::State) {
        self.sandbox_transitions[state as usize].inc();
    }

    pub fn sandbox_suspended(&self, took: Duration) {
        self.sandbox_suspend.observe(took);
    }

    pub fn sandbox_resumed(&self, took: Duration) {
        self.sandbox_resume.observe(took);
    }

    /// Counts one invocation of `function`.
    pub fn observe(&self, function: &str, outcome: Outcome, duration: Duration) {
        let minute = crate::clock::now_ms() / 60_000;
        if let Some(series) = self.functions.get(function) {
            series.observe(minute, outcome, duration);
            return;
        }
        let series = self.functions.entry(function.to_owned()).or_default().clone();
        series.observe(minute, outcome, duration);
    }

    /// The last hour of every function `visible` lets through, by name, up to minute `now`
    /// (minutes since the Unix epoch).
    pub fn last_hour(&self, now: u64, visible: impl Fn(&str) -> bool) -> Vec<(String, Vec<MinuteStats>)> {
        let mut functions: Vec<(String, Vec<MinuteStats>)> = self
            .functions
            .iter()
            .filter(|e| visible(e.key()))
            .map(|e| (e.key().clone(), e.value().recent.last_hour(now)))
            .collect();
        functions.sort_by(|a, b| a.0.cmp(&b.0));
        functions
    }

    pub fn render(&self, gauges: &Gauges) -> String {
        let mut functions: Vec<(String, Arc<FunctionMetrics>)> = self
            .functions
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        functions.sort_by(|a, b| a.0.cmp(&b.0));

        let mut out = String::with_capacity(1024 + functions.len() * 2048);
        let header = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };

        header(
            &mut out,
            "kiln_invocations_total",
            "counter",
            "Invocations by function and outcome.",
        );
        for (name, series) in &functions {
            for outcome in Outcome::ALL {
                let value = series.outcomes[outcome as usize].get();
                let _ = writeln!(
                    out,
                    "kiln_invocations_total{{function=\"{name}\",outcome=\"{}\"}} {value}",
                    outcome.as_str()
                );
            }
        }
        header(
            &mut out,
            "kiln_invocation_duration_seconds",
            "histogram",
            "Wall-clock time of invocations that ran (instantiate, run, shape the answer).",
        );
        for (name, series) in &functions {
            let mut cumulative = 0;
            for (i, bound) in BUCKETS.iter().enumerate() {
                cumulative += series.buckets[i].get();
                let _ = writeln!(
                    out,
                    "kiln_invocation_duration_seconds_bucket{{function=\"{name}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            cumulative += series.buckets[BUCKETS.len()].get();
            let _ = writeln!(
                out,
                "kiln_invocation_duration_seconds_bucket{{function=\"{name}\",le=\"+Inf\"}} {cumulative}"
            );
            let sum = series.sum_us.get() as f64 / 1e6;
            let _ = writeln!(out, "kiln_invocation_duration_seconds_sum{{function=\"{name}\"}} {sum}");
            let _ = writeln!(
                out,
                "kiln_invocation_duration_seconds_count{{function=\"{name}\"}} {cumulative}"
            );
        }

        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            header(&mut out, name, kind, help);
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        metric(
            "kiln_async_invocations_total",
            "counter",
            "Asynchronous runs by outcome (each attempt counts).",
            &[
                ("{outcome=\"success\"}", self.invocations_ok.get()),
                ("{outcome=\"failed\"}", self.invocations_failed.get()),
                ("{outcome=\"timeout\"}", self.invocations_timeout.get()),
                ("{outcome=\"rejected\"}", self.invocations_rejected.get()),
            ],
        );
        metric(
            "kiln_deploys_total",
            "counter",
            "Deploys by outcome: created a version, matched the latest (unchanged), or refused.",
            &[
                ("{outcome=\"created\"}", self.deploys.get()),
                ("{outcome=\"unchanged\"}", self.deploys_unchanged.get()),
                ("{outcome=\"failed\"}", self.deploys_failed.get()),
            ],
        );
        metric(
            "kiln_compilations_total",
            "counter",
            "Ahead-of-time compilations done by this process (deploys and cache misses).",
            &[("", gauges.compilations)],
        );
        metric(
            "kiln_functions",
            "gauge",
            "Deployed functions.",
            &[("", gauges.functions as u64)],
        );
        metric(
            "kiln_pool_instances_in_use",
            "gauge",
            "Guest instances alive now.",
            &[("", gauges.instances_in_use as u64)],
        );
        metric(
            "kiln_async_queue_depth",
            "gauge",
            "Asynchronous invocations queued or running.",
            &[("", gauges.async_queue_depth)],
        );
        let states: Vec<(String, u64)> = gauges
            .sandboxes
            .iter()
            .map(|(state, n)| (format!("{{state=\"{state}\"}}"), *n))
            .collect();
        let states: Vec<(&str, u64)> = states.iter().map(|(l, n)| (l.as_str(), *n)).collect();
        metric("kiln_sandboxes", "gauge", "Sandboxes by state.", &states);
        let transitions: Vec<(String, u64)> = crate::sandboxes::record::State::ALL
            .iter()
            .map(|state| {
                (
                    format!("{{state=\"{}\"}}", state.as_str()),
                    self.sandbox_transitions[*state as usize].get(),
                )
            })
            .collect();
        let transitions: Vec<(&str, u64)> = transitions.iter().map(|(l, n)| (l.as_str(), *n)).collect();
        metric(
            "kiln_sandbox_transitions_total",
            "counter",
            "Sandbox transitions, by the state entered.",
            &transitions,
        );
        header(
            &mut out,
            "kiln_sandbox_suspend_seconds",
            "histogram",
            "Time to suspend a sandbox: capture its state, write it, free its instance.",
        );
        self.sandbox_suspend
            .render(&mut out, "kiln_sandbox_suspend_seconds", "");
        header(
            &mut out,
            "kiln_sandbox_resume_seconds",
            "histogram",
            "Time to resume a sandbox: read its state, instantiate, put the state back.",
        );
        self.sandbox_resume.render(&mut out, "kiln_sandbox_resume_seconds", "");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_rejections_are_not_timed() {
        let m = Metrics::default();
        m.observe("f", Outcome::Success, Duration::from_micros(80));
        m.observe("f", Outcome::Success, Duration::from_millis(3));
        m.observe("f", Outcome::Timeout, Duration::from_secs(1000));
        m.observe("f", Outcome::Rejected, Duration::ZERO);
        let gauges = Gauges {
            compilations: 0,
            functions: 1,
            instances_in_use: 0,
            async_queue_depth: 0,
            sandboxes: vec![("running", 2)],
        };
        let text = m.render(&gauges);
        for line in [
            "kiln_invocations_total{function=\"f\",outcome=\"success\"} 2",
            "kiln_invocations_total{function=\"f\",outcome=\"rejected\"} 1",
            "kiln_invocation_duration_seconds_bucket{function=\"f\",le=\"0.0001\"} 1",
            "kiln_invocation_duration_seconds_bucket{function=\"f\",le=\"0.005\"} 2",
            "kiln_invocation_duration_seconds_bucket{function=\"f\",le=\"900\"} 2",
            "kiln_invocation_duration_seconds_bucket{function=\"f\",le=\"+Inf\"} 3",
            "kiln_invocation_duration_seconds_count{function=\"f\"} 3",
            "kiln_sandboxes{state=\"running\"} 2",
            "kiln_sandbox_resume_seconds_count 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
