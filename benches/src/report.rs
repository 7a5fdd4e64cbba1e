//! A run's records turned into what people read: `<stamp>.json` (everything: machine, settings,
//! every record, every ratio), `latest.json`, `latest.md` (the tables) and `latest.svg` (the plot
//! README embeds). The ratios are the promises of SPECIFICATION.md, each with its goal and whether
//! this run met it; a ratio whose inputs are missing from the run is listed without a value.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::record::{scenario, Record};
use crate::svg::{self, Chart, Row};

/// The order systems appear in tables and the plot; systems not listed follow in record order.
const SYSTEM_ORDER: [&str; 11] = [
    "bare-hyper",
    "kiln-sync",
    "kiln-lambda",
    "kiln-snapshot",
    "kiln-trigger",
    "kiln-sandbox",
    "wasmtime-serve",
    "http-floor",
    "fork-exec",
    "wasmtime-run",
    "kiln-async-submit",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    /// `/proc/loadavg`'s 1, 5 and 15 minute averages when the run started.
    pub load_at_start: String,
}

impl Machine {
    /// This machine, with the load average the run recorded when it started.
    pub fn detect(load_at_start: &str) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map_or_else(|| "unknown".into(), |m| m.trim().to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |k| k.trim().to_owned());
        Machine {
            cpu_model,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel,
            load_at_start: load_at_start.to_owned(),
        }
    }
}

/// One promised number, as measured in this run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ratio {
    pub name: String,
    /// None when the run lacks a record it needs.
    pub value: Option<f64>,
    /// "x" for a ratio, or the unit of an absolute number.
    pub unit: String,
    /// Human-readable goal; empty for numbers reported without one.
    pub goal: String,
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    /// UTC start time, `YYYYmmddTHHMMSSZ`; also the results file's name.
    pub stamp: String,
    pub started_unix: u64,
    pub duration_s: f64,
    /// `full`, `quick` or `smoke`.
    pub mode: String,
    pub git_commit: String,
    pub machine: Machine,
    /// How the systems were driven and configured (wrk flags, Kiln flags, pinning).
    pub settings: BTreeMap<String, String>,
    pub ratios: Vec<Ratio>,
    pub results: Vec<Record>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("plot: {0}")]
    Plot(String),
}

enum Goal {
    AtLeast(f64),
    AtMost(f64),
    Between(f64, f64),
    Below(f64),
    None,
}

fn find<'a>(records: &'a [Record], scenario: &str, system: &str) -> Option<&'a Record> {
    records
        .iter()
        .rev()
        .find(|r| r.scenario == scenario && r.system == system)
}

fn value(records: &[Record], scenario: &str, system: &str, key: &str) -> Option<f64> {
    find(records, scenario, system)?.get(key)
}

fn quotient(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// The promises of SPECIFICATION.md, and the numbers reported beside them.
pub fn ratios(records: &[Record]) -> Vec<Ratio> {
    let v = |s: &str, sys: &str, k: &str| value(records, s, sys, k);
    use scenario::*;
    let rows: Vec<(&str, Option<f64>, &str, Goal)> = vec![
        (
            "Kiln sync invoke / bare hyper, req/s at c=32",
            quotient(v(C32, "kiln-sync", "rps"), v(C32, "bare-hyper", "rps")),
            "x",
            Goal::AtLeast(0.85),
        ),
        (
            "Kiln sync invoke / bare hyper, p99 at c=32",
            quotient(v(C32, "kiln-sync", "p99_ms"), v(C32, "bare-hyper", "p99_ms")),
            "x",
            Goal::AtMost(2.0),
        ),
        (
            "Kiln HTTP trigger / wasmtime serve, req/s at c=32",
            quotient(v(C32, "kiln-trigger", "rps"), v(C32, "wasmtime-serve", "rps")),
            "x",
            Goal::AtLeast(2.0),
        ),
        (
            "Kiln HTTP trigger / wasmtime serve, p99 at c=32",
            quotient(v(C32, "kiln-trigger", "p99_ms"), v(C32, "wasmtime-serve", "p99_ms")),
            "x",
            Goal::Below(1.0),
        ),
        (
            "Kiln sandbox ingress / Kiln HTTP trigger, same component, req/s at c=32",
            quotient(v(C32, "kiln-sandbox", "rps"), v(C32, "kiln-trigger", "rps")),
            "x",
            Goal::AtLeast(1.5),
        ),
        (
            "Kiln sandbox ingress / Kiln HTTP trigger, same component, p99 at c=32",
            quotient(v(C32, "kiln-sandbox", "p99_ms"), v(C32, "kiln-trigger", "p99_ms")),
            "x",
            Goal::AtMost(1.0),
        ),
        (
            "Sandbox suspend, 4 MiB of state, a request between suspends, p50",
            v(SANDBOX, "suspend", "p50_ms"),
            "ms",
            Goal::AtMost(5.0),
        ),
        (
            "Sandbox suspend, 4 MiB of state, the first (all of it written)",
            v(SANDBOX, "suspend-first", "p50_ms"),
            "ms",
            Goal::None,
        ),
        (
            "Sandbox resume, 4 MiB of state, p50",
            v(SANDBOX, "resume", "p50_ms"),
            "ms",
            Goal::AtMost(5.0),
        ),
        (
            "Server RSS with every sandbox of the fleet suspended, above its baseline",
            match (
                v(SANDBOX_FLEET, "kiln", "rss_suspended_mib"),
                v(SANDBOX_FLEET, "kiln", "rss_baseline_mib"),
            ) {
                (Some(suspended), Some(baseline)) => Some(suspended - baseline),
                _ => None,
            },
            "MiB",
            Goal::None,
        ),
        (
            "Kiln HTTP trigger / wasmtime + hyper floor, req/s at c=32",
            quotient(v(C32, "kiln-trigger", "rps"), v(C32, "http-floor", "rps")),
            "x",
            Goal::None,
        ),
        (
            "wasmtime + hyper floor / wasmtime serve, req/s at c=32 (the most any server gains)",
            quotient(v(C32, "http-floor", "rps"), v(C32, "wasmtime-serve", "rps")),
            "x",
            Goal::None,
        ),
        (
            "Snapshot (0.3 s init) guest / trivial guest, req/s at c=32",
            quotient(v(C32, "kiln-snapshot", "rps"), v(C32, "kiln-sync", "rps")),
            "x",
            Goal::AtLeast(0.9),
        ),
        (
            "Async end to end / sync invoke, req/s",
            quotient(v(ASYNC, "kiln-async", "e2e_rps"), v(C32, "kiln-sync", "rps")),
            "x",
            Goal::AtLeast(0.5),
        ),
        (
            "First invoke after deploy minus warm invoke, p50",
            match (
                v(COLD, "kiln-first-invoke", "p50_ms"),
                v(COLD, "kiln-warm-invoke", "p50_ms"),
            ) {
                (Some(first), Some(warm)) => Some(first - warm),
                _ => None,
            },
            "ms",
            Goal::AtMost(1.0),
        ),
        (
            "Latency over all deployed functions / over 10, p50 at c=32",
            quotient(v(FUNCTIONS, "all", "p50_ms"), v(FUNCTIONS, "few", "p50_ms")),
            "x",
            Goal::Between(0.9, 1.1),
        ),
        (
            "Latency over all deployed functions / over 10, p99 at c=32",
            quotient(v(FUNCTIONS, "all", "p99_ms"), v(FUNCTIONS, "few", "p99_ms")),
            "x",
            Goal::None,
        ),
        (
            "Kiln invoke / raw wasmtime (pool + InstancePre), in process, median",
            quotient(
                v(INPROC, "kiln-invoke", "median_us"),
                v(INPROC, "raw-wasmtime", "median_us"),
            ),
            "x",
            Goal::AtMost(1.2),
        ),
        (
            "Lambda API invoke (SigV4) / Kiln sync invoke, req/s at c=32",
            quotient(v(C32, "kiln-lambda", "rps"), v(C32, "kiln-sync", "rps")),
            "x",
            Goal::AtLeast(0.9),
        ),
        (
            "Lambda API invoke minus Kiln sync invoke, p50 at c=1 (SigV4 and Lambda's shapes)",
            match (v(C1, "kiln-lambda", "p50_ms"), v(C1, "kiln-sync", "p50_ms")) {
                (Some(lambda), Some(sync)) => Some(lambda - sync),
                _ => None,
            },
            "ms",
            Goal::None,
        ),
        (
            "Kiln sync invoke / bare hyper, p99 at c=1",
            quotient(v(C1, "kiln-sync", "p99_ms"), v(C1, "bare-hyper", "p99_ms")),
            "x",
            Goal::None,
        ),
        (
            "Kiln sync invoke / fork+exec per request (/bin/cat), req/s at c=32",
            quotient(v(C32, "kiln-sync", "rps"), v(C32, "fork-exec", "rps")),
            "x",
            Goal::None,
        ),
        (
            "Kiln sync invoke / `wasmtime run` per request, req/s at c=32",
            quotient(v(C32, "kiln-sync", "rps"), v(C32, "wasmtime-run", "rps")),
            "x",
            Goal::None,
        ),
        (
            "Resident memory per idle deployed function",
            v(MEMORY, "kiln", "per_function_kib"),
            "KiB",
            Goal::None,
        ),
        (
            "Deploy of a small module, p50",
            v(DEPLOY, "small", "p50_ms"),
            "ms",
            Goal::None,
        ),
        (
            "Deploy of a large module, p50",
            v(DEPLOY, "large", "p50_ms"),
            "ms",
            Goal::None,
        ),
    ];
    rows.into_iter()
        .map(|(name, value, unit, goal)| {
            let unit_suffix = if unit == "x" {
                "×".to_owned()
            } else {
                format!(" {unit}")
            };
            let (text, met) = match goal {
                Goal::AtLeast(g) => (format!("≥ {g}{unit_suffix}"), value.map(|v| v >= g)),
                Goal::AtMost(g) => (format!("≤ {g}{unit_suffix}"), value.map(|v| v <= g)),
                Goal::Below(g) => (format!("< {g}{unit_suffix}"), value.map(|v| v < g)),
                Goal::Between(a, b) => (format!("{a}–{b}{unit_suffix}"), value.map(|v| (a..=b).contains(&v))),
                Goal::None => (String::new(), None),
            };
            Ratio {
                name: name.into(),
                value,
                unit: unit.into(),
                goal: text,
                met,
            }
        })
        .collect()
}

/// Records of one scenario, in `SYSTEM_ORDER` first.
fn ordered<'a>(records: &'a [Record], scenario: &str) -> Vec<&'a Record> {
    let mut of: Vec<&Record> = records.iter().filter(|r| r.scenario == scenario).collect();
    of.sort_by_key(|r| {
        SYSTEM_ORDER
            .iter()
            .position(|s| *s == r.system)
            .unwrap_or(SYSTEM_ORDER.len())
    });
    of
}

fn name(r: &Record) -> &str {
    if r.label.is_empty() {
        &r.system
    } else {
        &r.label
    }
}

fn num(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), fmt)
}

/// A count: no decimals, thousands separated.
fn int(v: Option<f64>) -> String {
    v.map_or_else(
        || "—".into(),
        |v| if v.abs() >= 1000.0 { fmt(v) } else { format!("{v:.0}") },
    )
}

/// Thousands separated above 1000, three significant decimals below.
fn fmt(v: f64) -> String {
    if v.abs() >= 1000.0 {
        let digits = format!("{:.0}", v.abs());
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if v < 0.0 {
            out.insert(0, '-');
        }
        out
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

impl Run {
    /// Why this run's numbers are not results to quote, if they are not.
    pub fn caveat(&self) -> Option<String> {
        let load: f64 = self
            .machine
            .load_at_start
            .split_whitespace()
            .next()
            .and_then(|l| l.parse().ok())
            .unwrap_or(0.0);
        let busy = load > 0.5 * self.machine.cores.max(1) as f64;
        match (self.mode == "full", busy) {
            (true, false) => None,
            (full, busy) => Some(format!(
                "**Not a result to quote:** {}{}{}. Run `benches/run.sh` on an idle machine for numbers.",
                if full {
                    String::new()
                } else {
                    format!("a `{}` run (short durations)", self.mode)
                },
                if !full && busy { ", " } else { "" },
                if busy {
                    format!(
                        "load average {} at start on {} cores",
                        self.machine.load_at_start, self.machine.cores
                    )
                } else {
                    String::new()
                },
            )),
        }
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# Kiln benchmark, run {} ({})\n", self.stamp, self.mode);
        if let Some(caveat) = self.caveat() {
            let _ = writeln!(md, "> {caveat}\n");
        }
        let m = &self.machine;
        let _ = writeln!(
            md,
            "{} × {} · Linux {} · load average at start {} · commit `{}` · took {:.0} s",
            m.cores, m.cpu_model, m.kernel, m.load_at_start, self.git_commit, self.duration_s
        );
        for (key, setting) in &self.settings {
            let _ = writeln!(md, "- {key}: {setting}");
        }

        md.push_str("\n## Ratios\n\n| ratio | measured | goal | status |\n| --- | ---: | --- | --- |\n");
        for r in &self.ratios {
            let measured = r.value.map_or_else(
                || "—".into(),
                |v| {
                    if r.unit == "x" {
                        format!("{v:.2}×")
                    } else {
                        format!("{} {}", fmt(v), r.unit)
                    }
                },
            );
            let status = match r.met {
                Some(true) => "met",
                Some(false) => "**not met**",
                None if r.goal.is_empty() => "",
                None => "not measured",
            };
            let _ = writeln!(md, "| {} | {} | {} | {} |", r.name, measured, r.goal, status);
        }

        for (s, title) in [
            (scenario::C32, "HTTP, 32 connections (throughput)"),
            (scenario::C1, "HTTP, 1 connection (latency)"),
        ] {
            let rows = ordered(&self.results, s);
            if rows.is_empty() {
                continue;
            }
            let _ = writeln!(
                md,
                "\n## {title}\n\n| system | req/s | p50 ms | p99 ms | p99.9 ms | errors |\n| --- | ---: | ---: | ---: | ---: | ---: |"
            );
            for r in rows {
                let errors = r.get("errors").unwrap_or(0.0) + r.get("non_2xx").unwrap_or(0.0);
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} |",
                    name(r),
                    num(r.get("rps")),
                    num(r.get("p50_ms")),
                    num(r.get("p99_ms")),
                    num(r.get("p999_ms")),
                    int(Some(errors))
                );
            }
        }

        let latency_rows: Vec<&Record> = [scenario::COLD, scenario::DEPLOY, scenario::FUNCTIONS]
            .iter()
            .flat_map(|s| ordered(&self.results, s))
            .collect();
        if !latency_rows.is_empty() {
            md.push_str("\n## Cold start, deploy, many functions\n\n| scenario | what | count | req/s | p50 ms | p99 ms | p99.9 ms |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |\n");
            for r in latency_rows {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    r.scenario,
                    name(r),
                    int(r.get("count")),
                    num(r.get("rps")),
                    num(r.get("p50_ms")),
                    num(r.get("p99_ms")),
                    num(r.get("p999_ms"))
                );
            }
        }
        if let Some(r) = find(&self.results, scenario::MEMORY, "kiln") {
            let _ = writeln!(
                md,
                "\n## Memory\n\n{}: {} MiB before, {} MiB with the functions deployed ({} KiB each), {} MiB once each was invoked ({} KiB each); deployed at {}/s.",
                name(r),
                num(r.get("rss_before_mib")),
                num(r.get("rss_deployed_mib")),
                num(r.get("per_function_kib")),
                num(r.get("rss_invoked_mib")),
                num(r.get("per_invoked_function_kib")),
                num(r.get("deploys_per_second"))
            );
        }
        if let Some(r) = find(&self.results, scenario::ASYNC, "kiln-async") {
            let _ = writeln!(
                md,
                "\n## Async\n\n{}: {} invocations submitted and run in {} s = {} per second end to end.",
                name(r),
                int(r.get("completed")),
                num(r.get("seconds")),
                num(r.get("e2e_rps"))
            );
        }
        let inproc = ordered(&self.results, scenario::INPROC);
        if !inproc.is_empty() {
            md.push_str("\n## In process, no HTTP\n\n| path | median µs | mean µs |\n| --- | ---: | ---: |\n");
            for r in inproc {
                let _ = writeln!(
                    md,
                    "| {} ({}) | {} | {} |",
                    r.system,
                    r.label,
                    num(r.get("median_us")),
                    num(r.get("mean_us"))
                );
            }
        }
        md
    }

    pub fn svg(&self) -> Result<String, ReportError> {
        let rows = |s: &str, keys: &[&str]| -> Vec<Row> {
            ordered(&self.results, s)
                .into_iter()
                .map(|r| Row {
                    label: r.system.clone(),
                    values: keys.iter().map(|k| r.get(k).unwrap_or(0.0)).collect(),
                })
                .collect()
        };
        let warning = if self.caveat().is_some() {
            " - not a result: short run or busy machine"
        } else {
            ""
        };
        let title_rps = format!(
            "Requests per second, 32 connections, run {} ({}){warning}",
            self.stamp, self.mode
        );
        let charts = [
            Chart {
                title: &title_rps,
                unit: "requests per second (log scale)",
                series: &["req/s"],
                rows: rows(scenario::C32, &["rps"]),
            },
            Chart {
                title: "Latency, 1 connection",
                unit: "milliseconds (log scale)",
                series: &["p50", "p99", "p99.9"],
                rows: rows(scenario::C1, &["p50_ms", "p99_ms", "p999_ms"]),
            },
        ];
        svg::render(&charts).map_err(|e| ReportError::Plot(e.to_string()))
    }

    /// Writes `<stamp>.json`, `latest.json`, `latest.md` and `latest.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
        let json = serde_json::to_string_pretty(self).expect("a run always serializes") + "\n";
        let files = [
            (format!("{}.json", self.stamp), json.clone()),
            ("latest.json".into(), json),
            ("latest.md".into(), self.markdown()),
            ("latest.svg".into(), self.svg()?),
        ];
        std::fs::create_dir_all(dir).map_err(|source| ReportError::Write {
            path: dir.display().to_string(),
            source,
        })?;
        let mut written = Vec::new();
        for (file, text) in files {
            let path = dir.join(file);
            // Write then rename, so a reader (or a crash) never sees half a file.
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|source| ReportError::Write {
                    path: path.display().to_string(),
                    source,
                })?;
            written.push(path);
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(scenario: &str, system: &str, values: &[(&str, f64)]) -> Record {
        values
            .iter()
            .fold(Record::new(scenario, system, ""), |r, (k, v)| r.with(k, *v))
    }

    #[test]
    fn ratios_follow_the_records_and_their_goals() {
        let records = vec![
            rec("c32", "bare-hyper", &[("rps", 50_000.0), ("p99_ms", 1.0)]),
            rec("c32", "kiln-sync", &[("rps", 45_000.0), ("p99_ms", 2.5)]),
            rec("cold", "kiln-first-invoke", &[("p50_ms", 1.2)]),
            rec("cold", "kiln-warm-invoke", &[("p50_ms", 0.5)]),
            rec("functions", "few", &[("p50_ms", 1.0)]),
            rec("functions", "all", &[("p50_ms", 1.15)]),
        ];
        let ratios = ratios(&records);
        let get = |prefix: &str| ratios.iter().find(|r| r.name.starts_with(prefix)).unwrap().clone();
        let rps = get("Kiln sync invoke / bare hyper, req/s");
        assert!((rps.value.unwrap() - 0.9).abs() < 1e-9);
        assert_eq!(rps.met, Some(true));
        assert_eq!(get("Kiln sync invoke / bare hyper, p99 at c=32").met, Some(false));
        let cold = get("First invoke");
        assert!((cold.value.unwrap() - 0.7).abs() < 1e-9);
        assert_eq!(cold.met, Some(true));
        assert_eq!(
            get("Latency over all deployed functions / over 10, p50").met,
            Some(false)
        );
        let missing = get("Kiln HTTP trigger / wasmtime serve, req/s");
        assert_eq!((missing.value, missing.met), (None, None));
    }

    #[test]
    fn numbers_are_formatted_for_tables() {
        assert_eq!(fmt(52314.4), "52,314");
        assert_eq!(fmt(-1234567.0), "-1,234,567");
        assert_eq!(fmt(250.4), "250");
        assert_eq!(fmt(12.34), "12.3");
        assert_eq!(fmt(2.523), "2.52");
        assert_eq!(fmt(0.5712), "0.571");
    }
}
