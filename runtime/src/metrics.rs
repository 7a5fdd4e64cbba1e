//! Process counters served at `GET /metrics` in the Prometheus text format. Plain atomics: the
//! invoke path pays one relaxed increment per counter it touches.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct Metrics {
    pub deploys: Counter,
    pub invocations_ok: Counter,
    pub invocations_failed: Counter,
    pub invocations_timeout: Counter,
    pub invocations_rejected: Counter,
}

/// Values read from elsewhere at render time.
pub struct Gauges {
    pub compilations: u64,
    pub functions: usize,
    pub instances_in_use: usize,
    /// Asynchronous invocations queued or running.
    pub async_queue_depth: u64,
}

impl Metrics {
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(1024);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        metric(
            "kiln_invocations_total",
            "counter",
            "Invocations by outcome.",
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
            "Deploys that created a version.",
            &[("", self.deploys.get())],
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
        out
    }
}
