//! One measurement, as one JSON object per line: `{"scenario", "system", "label", ...numbers}`.
//!
//! Every tool of a run appends its records to the same file (`wrk`'s Lua `done` hook, the
//! `scenarios` and `instantiate` binaries, `run.sh` itself for the async drain), and `report`
//! reads them all back. Numbers only beyond the three names, so any tool can write a record with a
//! `printf` and the report need not know every tool's types.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Scenario names, shared by the writers and the report.
pub mod scenario {
    /// Throughput: 32 connections for the run's duration.
    pub const C32: &str = "c32";
    /// Latency: one connection, one request at a time.
    pub const C1: &str = "c1";
    /// Asynchronous invocations submitted, then drained.
    pub const ASYNC: &str = "async";
    /// The first invoke after a deploy, and warm invokes of the same function.
    pub const COLD: &str = "cold";
    /// Time of a `PUT /v1/functions/{name}`, small and large modules.
    pub const DEPLOY: &str = "deploy";
    /// Round-robin over a few and over many deployed functions.
    pub const FUNCTIONS: &str = "functions";
    /// Resident memory of the server per idle deployed function.
    pub const MEMORY: &str = "memory";
    /// In process, no HTTP: Kiln's invoke path next to raw wasmtime.
    pub const INPROC: &str = "inproc";
    /// A Wasm sandbox holding a few MiB of state, suspended and resumed through the API.
    pub const SANDBOX: &str = "sandbox";
    /// Many sandboxes suspended, then all resumed: the server's resident memory along the way.
    pub const SANDBOX_FLEET: &str = "sandbox-fleet";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub scenario: String,
    pub system: String,
    #[serde(default)]
    pub label: String,
    #[serde(flatten)]
    pub values: BTreeMap<String, f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}, line {line}: {source}")]
    Parse {
        path: String,
        line: usize,
        source: serde_json::Error,
    },
}

impl Record {
    pub fn new(scenario: &str, system: &str, label: &str) -> Record {
        Record {
            scenario: scenario.into(),
            system: system.into(),
            label: label.into(),
            values: BTreeMap::new(),
        }
    }

    pub fn with(mut self, key: &str, value: f64) -> Record {
        self.values.insert(key.into(), value);
        self
    }

    /// Adds `p50_ms`, `p99_ms`, `p999_ms`, `mean_ms`, `max_ms` and `count` of `samples`.
    pub fn with_latencies(mut self, samples: &[Duration]) -> Record {
        self.values.extend(latency_summary(samples));
        self
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.values.get(key).copied()
    }

    /// Appends this record as one line; a line is written with one `write` so that concurrent
    /// writers do not interleave.
    pub fn append_to(&self, path: &Path) -> Result<(), RecordError> {
        let mut line = serde_json::to_string(self).expect("a record always serializes");
        line.push('\n');
        let io = |source| RecordError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        file.write_all(line.as_bytes()).map_err(io)
    }
}

/// Reads every record of a JSON-lines file; blank lines are skipped.
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>, RecordError> {
    let text = std::fs::read_to_string(path).map_err(|source| RecordError::Io {
        path: path.display().to_string(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|source| RecordError::Parse {
                path: path.display().to_string(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

/// The `q`-quantile (0..=1) of sorted samples, nearest rank.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn latency_summary(samples: &[Duration]) -> BTreeMap<String, f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mean = if sorted.is_empty() {
        0.0
    } else {
        sorted.iter().map(|d| ms(*d)).sum::<f64>() / sorted.len() as f64
    };
    BTreeMap::from([
        ("count".to_owned(), sorted.len() as f64),
        ("p50_ms".to_owned(), ms(quantile(&sorted, 0.50))),
        ("p99_ms".to_owned(), ms(quantile(&sorted, 0.99))),
        ("p999_ms".to_owned(), ms(quantile(&sorted, 0.999))),
        ("mean_ms".to_owned(), mean),
        ("max_ms".to_owned(), sorted.last().map_or(0.0, |d| ms(*d))),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let samples: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        assert_eq!(quantile(&samples, 0.5), Duration::from_micros(500));
        assert_eq!(quantile(&samples, 0.99), Duration::from_micros(990));
        assert_eq!(quantile(&samples, 0.999), Duration::from_micros(999));
        assert_eq!(quantile(&samples[..1], 0.999), Duration::from_micros(1));
        let summary = latency_summary(&samples);
        assert_eq!(summary["count"], 1000.0);
        assert!((summary["mean_ms"] - 0.5005).abs() < 1e-9);
    }

    #[test]
    fn records_round_trip_as_flat_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raw.jsonl");
        let record = Record::new(scenario::C32, "bare-hyper", "bare hyper").with("rps", 1234.5);
        record.append_to(&path).unwrap();
        std::fs::write(
            dir.path().join("more.jsonl"),
            "{\"scenario\":\"c1\",\"system\":\"x\",\"rps\":2}\n\n",
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "{\"scenario\":\"c32\",\"system\":\"bare-hyper\",\"label\":\"bare hyper\",\"rps\":1234.5}\n"
        );
        assert_eq!(read_jsonl(&path).unwrap(), vec![record]);
        let more = read_jsonl(&dir.path().join("more.jsonl")).unwrap();
        assert_eq!(more[0].get("rps"), Some(2.0));
        assert_eq!(more[0].label, "");
        std::fs::write(&path, "{\"scenario\":\"c1\"}\n").unwrap();
        let err = read_jsonl(&path).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }
}
