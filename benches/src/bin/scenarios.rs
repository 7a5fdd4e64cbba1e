//! The scenarios `wrk` cannot drive, against a running Kiln (`run.sh` starts it on CPU 0 and runs
//! this on CPU 1). Each appends its records to `--out`:
//!
//! - `cold`: deploy a new function, time its first invoke, then warm invokes of it; repeated with
//!   a new function (new code) each time. Goal: first ≤ warm + 1 ms.
//! - `deploy`: time of `PUT /v1/functions/{name}` for a small module (hello) and a large generated
//!   one, each deploy new code, so each compiles.
//! - `functions`: deploy N functions (distinct code) over keep-alive connections, read the
//!   server's resident memory before and after (memory per idle function), invoke each once, then
//!   drive round-robin over 10 of them and over all N. Goal: latency flat (±10 %) from 10 to N.
//!
//! Usage: scenarios <cold|deploy|functions> --addr HOST:PORT --out RAW.jsonl [options]
//! (the admin token comes from --token or KILN_TOKEN).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use hyper::Method;
use kiln_bench::guests;
use kiln_bench::load::{Conn, Load, LoadError};
use kiln_bench::record::{scenario, Record};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:7878")]
    addr: SocketAddr,
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true)]
    token: String,
    /// JSON-lines file the records are appended to.
    #[arg(long)]
    out: PathBuf,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    Cold {
        /// New functions deployed, each invoked once cold.
        #[arg(long, default_value_t = 200)]
        reps: usize,
        /// Warm invokes after each first one.
        #[arg(long, default_value_t = 20)]
        warm: usize,
    },
    Deploy {
        #[arg(long, default_value_t = 50)]
        small_reps: usize,
        #[arg(long, default_value_t = 10)]
        large_reps: usize,
        /// Functions in the large module.
        #[arg(long, default_value_t = 4000)]
        large_functions: usize,
    },
    Functions {
        /// Functions deployed and invoked round-robin.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// The small set compared against all of them.
        #[arg(long, default_value_t = 10)]
        few: usize,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Seconds of load for each of the two sets.
        #[arg(long, default_value_t = 15.0)]
        duration: f64,
        /// Connections deploying at once.
        #[arg(long, default_value_t = 8)]
        deployers: usize,
        /// The Kiln server's process id, for its resident memory (skipped without it).
        #[arg(long)]
        kiln_pid: Option<u32>,
    },
}

/// Salts keep every scenario's generated code distinct on one server.
const COLD_SALT: u64 = 1 << 40;
const SMALL_SALT: u64 = 2 << 40;
const FUNCTIONS_SALT: u64 = 3 << 40;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let result = match args.scenario {
        Scenario::Cold { reps, warm } => cold(&args, reps, warm).await,
        Scenario::Deploy {
            small_reps,
            large_reps,
            large_functions,
        } => deploy(&args, small_reps, large_reps, large_functions).await,
        Scenario::Functions {
            count,
            few,
            connections,
            duration,
            deployers,
            kiln_pid,
        } => {
            let load = LoadShape {
                connections,
                duration: Duration::from_secs_f64(duration),
            };
            functions(&args, count, few.min(count), load, deployers, kiln_pid).await
        }
    };
    if let Err(e) = result {
        eprintln!("scenarios: {e}");
        std::process::exit(1);
    }
}

async fn timed<T>(f: impl std::future::Future<Output = Result<T, LoadError>>) -> Result<Duration, LoadError> {
    let started = Instant::now();
    f.await?;
    Ok(started.elapsed())
}

async fn cold(args: &Args, reps: usize, warm: usize) -> Result<(), LoadError> {
    let mut conn = Conn::open(args.addr, Some(&args.token)).await?;
    let (mut first, mut warm_samples) = (Vec::with_capacity(reps), Vec::with_capacity(reps * warm));
    let input = Bytes::from_static(b"{}");
    for i in 0..reps {
        let path = format!("/v1/functions/cold-{i}");
        conn.expect_ok(Method::PUT, &path, Bytes::from(guests::hello(COLD_SALT + i as u64)))
            .await?;
        let invoke = format!("{path}/invoke");
        first.push(timed(conn.expect_ok(Method::POST, &invoke, input.clone())).await?);
        for _ in 0..warm {
            warm_samples.push(timed(conn.expect_ok(Method::POST, &invoke, input.clone())).await?);
        }
    }
    let label = format!("{reps} new functions (hello, distinct code), one connection");
    let out = &args.out;
    write(
        out,
        Record::new(
            scenario::COLD,
            "kiln-first-invoke",
            &format!("first invoke after PUT; {label}"),
        )
        .with_latencies(&first),
    );
    write(
        out,
        Record::new(
            scenario::COLD,
            "kiln-warm-invoke",
            &format!("the next {warm} invokes of each; {label}"),
        )
        .with_latencies(&warm_samples),
    );
    println!(
        "cold: first invoke p50 {:.3} ms, warm p50 {:.3} ms ({reps} functions)",
        ms(median(&first)),
        ms(median(&warm_samples))
    );
    Ok(())
}

async fn deploy(args: &Args, small_reps: usize, large_reps: usize, large_functions: usize) -> Result<(), LoadError> {
    let mut conn = Conn::open(args.addr, Some(&args.token)).await?;
    let kinds: [(&str, usize, Generator); 2] = [
        ("small", small_reps, Box::new(|i| guests::hello(SMALL_SALT + i))),
        (
            "large",
            large_reps,
            Box::new(move |i| guests::large(large_functions, i)),
        ),
    ];
    for (kind, reps, make) in kinds {
        let mut samples = Vec::with_capacity(reps);
        let mut bytes = 0;
        for i in 0..reps {
            let code = make(i as u64);
            bytes = code.len();
            let path = format!("/v1/functions/deploy-{kind}-{i}");
            samples.push(timed(conn.expect_ok(Method::PUT, &path, Bytes::from(code))).await?);
        }
        let what = match kind {
            "small" => "hello module".to_owned(),
            _ => format!("generated module, {large_functions} functions"),
        };
        let label = format!("{what}, {bytes} bytes, {reps} deploys of distinct code");
        write(
            &args.out,
            Record::new(scenario::DEPLOY, kind, &label)
                .with_latencies(&samples)
                .with("bytes", bytes as f64),
        );
        println!("deploy {kind}: p50 {:.1} ms ({label})", ms(median(&samples)));
    }
    Ok(())
}

/// Makes a module's bytes from a salt.
type Generator = Box<dyn Fn(u64) -> Vec<u8>>;

struct LoadShape {
    connections: usize,
    duration: Duration,
}

async fn functions(
    args: &Args,
    count: usize,
    few: usize,
    load: LoadShape,
    deployers: usize,
    kiln_pid: Option<u32>,
) -> Result<(), LoadError> {
    let rss_before = kiln_pid.and_then(rss_kib);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..deployers.max(1) {
        let mut conn = Conn::open(args.addr, Some(&args.token)).await?;
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, LoadError>(());
                }
                let code = guests::hello(FUNCTIONS_SALT + i as u64);
                conn.expect_ok(Method::PUT, &format!("/v1/functions/fn-{i}"), Bytes::from(code))
                    .await?;
            }
        }));
    }
    for task in tasks {
        task.await.expect("deploy task panicked")?;
    }
    let deploy_seconds = started.elapsed().as_secs_f64();
    println!(
        "functions: deployed {count} in {deploy_seconds:.1} s ({:.0}/s)",
        count as f64 / deploy_seconds
    );
    // Let the server finish what a deploy leaves behind (a log line, freed buffers) before reading.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_deployed = kiln_pid.and_then(rss_kib);

    let paths: Vec<String> = (0..count).map(|i| format!("/v1/functions/fn-{i}/invoke")).collect();
    let drive = |paths: Vec<String>, duration: Duration, max_requests: usize| Load {
        addr: args.addr,
        token: Some(args.token.clone()),
        paths: Arc::new(paths),
        body: Bytes::from_static(b"{}"),
        connections: load.connections,
        duration,
        max_requests,
    };
    // Every function invoked once: its code loaded, as a function in use would be.
    let first_pass = drive(paths.clone(), Duration::from_secs(3600), count).run().await?;
    let rss_invoked = kiln_pid.and_then(rss_kib);
    let mut memory = Record::new(
        scenario::MEMORY,
        "kiln",
        &format!("resident memory of `kiln serve` before and after deploying {count} functions (hello, distinct code)"),
    )
    .with("functions", count as f64)
    .with("deploy_seconds", deploy_seconds)
    .with("deploys_per_second", count as f64 / deploy_seconds);
    if let (Some(before), Some(deployed), Some(invoked)) = (rss_before, rss_deployed, rss_invoked) {
        memory = memory
            .with("rss_before_mib", before as f64 / 1024.0)
            .with("rss_deployed_mib", deployed as f64 / 1024.0)
            .with("rss_invoked_mib", invoked as f64 / 1024.0)
            .with("per_function_kib", (deployed as f64 - before as f64) / count as f64)
            .with(
                "per_invoked_function_kib",
                (invoked as f64 - before as f64) / count as f64,
            );
        println!(
            "memory: {:.1} KiB per idle function, {:.1} KiB once each was invoked",
            (deployed as f64 - before as f64) / count as f64,
            (invoked as f64 - before as f64) / count as f64
        );
    }
    write(&args.out, memory);
    if first_pass.failures > 0 {
        eprintln!("functions: {} failed first invokes", first_pass.failures);
    }

    for (system, set) in [("few", few), ("all", count)] {
        let result = drive(paths[..set].to_vec(), load.duration, usize::MAX).run().await?;
        let label = format!(
            "round-robin over {set} of {count} deployed functions, {} connections",
            load.connections
        );
        println!(
            "functions: {label}: {:.0} req/s, p50 {:.3} ms, {} failed",
            result.requests_per_second(),
            ms(median(&result.samples)),
            result.failures
        );
        write(
            &args.out,
            Record::new(scenario::FUNCTIONS, system, &label)
                .with_latencies(&result.samples)
                .with("functions", set as f64)
                .with("deployed", count as f64)
                .with("rps", result.requests_per_second())
                .with("errors", result.failures as f64),
        );
    }
    Ok(())
}

fn write(out: &Path, record: Record) {
    if let Err(e) = record.append_to(out) {
        eprintln!("scenarios: {e}");
        std::process::exit(1);
    }
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    kiln_bench::record::quantile(&sorted, 0.5)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
