//! Writes a run's results from the raw records its tools appended (see `kiln_bench::report`):
//! `<out-dir>/<stamp>.json`, `latest.json`, `latest.md`, `latest.svg`; prints the Markdown.
//!
//! Usage: report --raw RAW.jsonl --out-dir benches/results --stamp YYYYmmddTHHMMSSZ
//!        --started-unix SECONDS [--meta KEY=VALUE]...
//! Meta keys `mode`, `git_commit` and `load_at_start` fill the run's fields; others are settings.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;
use kiln_bench::record::read_jsonl;
use kiln_bench::report::{ratios, Machine, Run};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    raw: PathBuf,
    #[arg(long)]
    out_dir: PathBuf,
    #[arg(long)]
    stamp: String,
    #[arg(long)]
    started_unix: u64,
    #[arg(long = "meta", value_parser = parse_meta)]
    meta: Vec<(String, String)>,
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    let (key, value) = s.split_once('=').ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
    Ok((key.trim().to_owned(), value.trim().to_owned()))
}

fn main() {
    let args = Args::parse();
    let results = read_jsonl(&args.raw).unwrap_or_else(|e| {
        eprintln!("report: {e}");
        std::process::exit(1);
    });
    let mut settings: BTreeMap<String, String> = args.meta.into_iter().collect();
    let mut take = |key: &str| settings.remove(key).unwrap_or_else(|| "unknown".into());
    let (mode, git_commit, load) = (take("mode"), take("git_commit"), take("load_at_start"));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let run = Run {
        stamp: args.stamp,
        started_unix: args.started_unix,
        duration_s: (now - args.started_unix as f64).max(0.0),
        mode,
        git_commit,
        machine: Machine::detect(&load),
        settings,
        ratios: ratios(&results),
        results,
    };
    match run.write(&args.out_dir) {
        Ok(files) => {
            print!("{}", run.markdown());
            println!();
            for file in files {
                println!("wrote {}", file.display());
            }
        }
        Err(e) => {
            eprintln!("report: {e}");
            std::process::exit(1);
        }
    }
}
