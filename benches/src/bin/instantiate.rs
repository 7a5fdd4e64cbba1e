//! In-process cost of one invocation: Kiln's `invoke` path next to raw wasmtime doing the least it
//! can for the same guest (see `kiln_bench::inproc`). No HTTP on either side.
//!
//! Usage: instantiate [GUEST.wat] [ITERATIONS] [CONCURRENCY] [--out RAW.jsonl]
//!        (defaults: guests/wat/hello.wat, 20000, 1)
//! Prints per-invocation median and mean for both, and the ratio Kiln / raw; with `--out`, also
//! appends them as `inproc` records. With CONCURRENCY > 1 it also runs that many tasks invoking
//! Kiln at once and prints invocations per second.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use kiln_bench::inproc::{sample, KilnHarness, RawHarness};
use kiln_bench::record::{scenario, Record};

#[derive(Parser)]
struct Args {
    #[arg(default_value = "guests/wat/hello.wat")]
    guest: PathBuf,
    #[arg(default_value_t = 20_000)]
    iterations: usize,
    #[arg(default_value_t = 1)]
    concurrency: usize,
    /// Append the medians as records to this JSON-lines file.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn summarize(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let median = samples[samples.len() / 2].as_secs_f64() * 1e6;
    let mean = samples.iter().map(|d| d.as_secs_f64()).sum::<f64>() / samples.len() as f64 * 1e6;
    (median, mean)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let args = Args::parse();
    let wasm = wat::parse_file(&args.guest).expect("guest");
    let iterations = args.iterations.max(1);
    let kiln = Arc::new(KilnHarness::new(&wasm).await);
    let raw = RawHarness::new(&kiln.kiln.functions.tiers.wasm.engine, &wasm);

    // Warm both paths, then measure each twice, interleaved, and keep the better run of each.
    sample(1000, || raw.invoke()).await;
    sample(1000, || kiln.invoke()).await;
    let mut best_raw = (f64::MAX, f64::MAX);
    let mut best_kiln = (f64::MAX, f64::MAX);
    for _ in 0..2 {
        let r = summarize(sample(iterations, || raw.invoke()).await);
        let k = summarize(sample(iterations, || kiln.invoke()).await);
        best_raw = if r.0 < best_raw.0 { r } else { best_raw };
        best_kiln = if k.0 < best_kiln.0 { k } else { best_kiln };
    }
    let guest = args.guest.display();
    println!("guest {guest}, {iterations} invocations per run, best of 2 runs");
    println!("{:<34} {:>10} {:>10}", "", "median µs", "mean µs");
    println!(
        "{:<34} {:>10.2} {:>10.2}",
        "raw wasmtime (pool + InstancePre)", best_raw.0, best_raw.1
    );
    println!("{:<34} {:>10.2} {:>10.2}", "kiln invoke", best_kiln.0, best_kiln.1);
    println!(
        "kiln / raw: median {:.2}x, mean {:.2}x",
        best_kiln.0 / best_raw.0,
        best_kiln.1 / best_raw.1
    );
    if let Some(out) = &args.out {
        let label = format!("{guest}, {iterations} invocations, best of 2");
        for (system, (median, mean)) in [("raw-wasmtime", best_raw), ("kiln-invoke", best_kiln)] {
            Record::new(scenario::INPROC, system, &label)
                .with("median_us", median)
                .with("mean_us", mean)
                .with("iterations", iterations as f64)
                .append_to(out)
                .expect("write the record");
        }
    }

    if args.concurrency > 1 {
        let concurrency = args.concurrency;
        let started = Instant::now();
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let kiln = kiln.clone();
                tokio::spawn(async move {
                    for _ in 0..iterations / concurrency {
                        kiln.invoke().await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let per_second = (iterations / concurrency * concurrency) as f64 / started.elapsed().as_secs_f64();
        println!("kiln invoke, {concurrency} tasks at once: {per_second:.0} invocations/s");
    }
}
