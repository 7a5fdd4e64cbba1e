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
//! - `sandboxes`: a Wasm sandbox of `guests/http-counter` holding `--state-kib` of state (a
//!   non-zero pattern), suspended and resumed `--reps` times through the API, its state checked
//!   after each resume (goal: p50 of each ≤ 5 ms at 4 MiB); then `--count` sandboxes created, each
//!   given its own state, all suspended, all resumed and every state checked, with the server's
//!   resident memory at each step (goal: back near the baseline while suspended).
//!
//! Usage: scenarios <cold|deploy|functions|sandboxes> --addr HOST:PORT --out RAW.jsonl [options]
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
    Sandboxes {
        /// The `wasi:http` component the sandboxes run (guests/http-counter).
        #[arg(long)]
        component: PathBuf,
        /// State the timed sandbox holds, in KiB.
        #[arg(long, default_value_t = 4096)]
        state_kib: usize,
        /// Suspend/resume cycles timed.
        #[arg(long, default_value_t = 50)]
        reps: usize,
        /// Sandboxes in the fleet.
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// State each sandbox of the fleet holds, in KiB.
        #[arg(long, default_value_t = 256)]
        fleet_state_kib: usize,
        /// Connections driving the fleet.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// The Kiln server's process id, for its resident memory (required: it is the point).
        #[arg(long)]
        kiln_pid: u32,
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
        Scenario::Sandboxes {
            ref component,
            state_kib,
            reps,
            count,
            fleet_state_kib,
            connections,
            kiln_pid,
        } => {
            let fleet = Fleet {
                count,
                state_kib: fleet_state_kib,
                connections,
                kiln_pid,
            };
            sandboxes(&args, component, state_kib, reps, fleet).await
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

struct Fleet {
    count: usize,
    state_kib: usize,
    connections: usize,
    kiln_pid: u32,
}

/// The counter's answer `count=N len=L sum=S`, without the count: what a resume must keep.
fn kept_state(answer: &Bytes) -> String {
    let text = String::from_utf8_lossy(answer);
    text.split_whitespace()
        .filter(|w| !w.starts_with("count="))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `POST /v1/sandboxes` for `function`; the new sandbox's id.
async fn create_sandbox(conn: &mut Conn, function: &str) -> Result<String, LoadError> {
    let body = serde_json::to_vec(&serde_json::json!({ "function": function })).expect("JSON");
    let answer = conn.expect_ok(Method::POST, "/v1/sandboxes", Bytes::from(body)).await?;
    let record: serde_json::Value = serde_json::from_slice(&answer).expect("a sandbox record");
    Ok(record["id"].as_str().expect("a sandbox id").to_owned())
}

/// Fails the scenario when a resumed sandbox does not hold what it held before.
fn check_kept(id: &str, before: &str, after: &Bytes) {
    let after = kept_state(after);
    if after != before {
        eprintln!("scenarios: sandbox {id} resumed with `{after}`, held `{before}`");
        std::process::exit(1);
    }
}

async fn sandboxes(
    args: &Args,
    component: &Path,
    state_kib: usize,
    reps: usize,
    fleet: Fleet,
) -> Result<(), LoadError> {
    let mut conn = Conn::open(args.addr, Some(&args.token)).await?;
    let code = std::fs::read(component).unwrap_or_else(|e| panic!("{}: {e}", component.display()));
    conn.expect_ok(Method::PUT, "/v1/functions/counter", Bytes::from(code))
        .await?;

    // One sandbox with `state_kib` of non-zero state, suspended and resumed `reps` times.
    let id = create_sandbox(&mut conn, "counter").await?;
    let grown = conn
        .expect_ok(
            Method::GET,
            &format!("/sbx/{id}/grow?kib={state_kib}&seed=7"),
            Bytes::new(),
        )
        .await?;
    let held = kept_state(&grown);
    // The first suspend writes the whole state; each cycle after it changes the counter (the
    // request that checks the state), so each later suspend writes what changed.
    let first = timed(conn.expect_ok(Method::POST, &format!("/v1/sandboxes/{id}/suspend"), Bytes::new())).await?;
    conn.expect_ok(Method::POST, &format!("/v1/sandboxes/{id}/resume"), Bytes::new())
        .await?;
    let (mut suspends, mut resumes) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for _ in 0..reps {
        let suspend = format!("/v1/sandboxes/{id}/suspend");
        suspends.push(timed(conn.expect_ok(Method::POST, &suspend, Bytes::new())).await?);
        let resume = format!("/v1/sandboxes/{id}/resume");
        resumes.push(timed(conn.expect_ok(Method::POST, &resume, Bytes::new())).await?);
        let answer = conn
            .expect_ok(Method::GET, &format!("/sbx/{id}/"), Bytes::new())
            .await?;
        check_kept(&id, &held, &answer);
    }
    let label = |what: &str| format!("{what} of a sandbox holding {state_kib} KiB (http-counter), through the API");
    write(
        &args.out,
        Record::new(
            scenario::SANDBOX,
            "suspend",
            &label("POST suspend, a request between each"),
        )
        .with_latencies(&suspends),
    );
    write(
        &args.out,
        Record::new(
            scenario::SANDBOX,
            "suspend-first",
            &label("first POST suspend (all of it written)"),
        )
        .with_latencies(&[first]),
    );
    write(
        &args.out,
        Record::new(scenario::SANDBOX, "resume", &label("POST resume")).with_latencies(&resumes),
    );
    println!(
        "sandboxes: {state_kib} KiB, suspend p50 {:.3} ms (the first, all written: {:.3} ms), resume p50 {:.3} ms \
         ({reps} cycles, state checked after each)",
        ms(median(&suspends)),
        ms(first),
        ms(median(&resumes))
    );
    conn.expect_ok(Method::DELETE, &format!("/v1/sandboxes/{id}"), Bytes::new())
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The fleet: `count` sandboxes, each with its own state, all suspended, then all resumed.
    let rss = || rss_kib(fleet.kiln_pid).unwrap_or(0) as f64 / 1024.0;
    let baseline = rss();
    let ids = Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let run_all = |phase: &'static str| {
        let ids = ids.clone();
        let next = Arc::new(AtomicUsize::new(0));
        let (addr, token, count, kib) = (args.addr, args.token.clone(), fleet.count, fleet.state_kib);
        async move {
            let mut tasks = Vec::new();
            for _ in 0..fleet.connections.max(1) {
                let mut conn = Conn::open(addr, Some(&token)).await?;
                let (ids, next) = (ids.clone(), next.clone());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            return Ok::<_, LoadError>(());
                        }
                        match phase {
                            "create" => {
                                let id = create_sandbox(&mut conn, "counter").await?;
                                let path = format!("/sbx/{id}/grow?kib={kib}&seed={}", i + 1);
                                let answer = conn.expect_ok(Method::GET, &path, Bytes::new()).await?;
                                ids.lock().unwrap().push((id, kept_state(&answer)));
                            }
                            action => {
                                let (id, held) = ids.lock().unwrap()[i].clone();
                                let path = format!("/v1/sandboxes/{id}/{action}");
                                conn.expect_ok(Method::POST, &path, Bytes::new()).await?;
                                if action == "resume" {
                                    let answer = conn
                                        .expect_ok(Method::GET, &format!("/sbx/{id}/"), Bytes::new())
                                        .await?;
                                    check_kept(&id, &held, &answer);
                                }
                            }
                        }
                    }
                }));
            }
            for task in tasks {
                task.await.expect("fleet task panicked")?;
            }
            Ok::<_, LoadError>(())
        }
    };
    let mut times = Vec::new();
    let mut memory = vec![baseline];
    for phase in ["create", "suspend", "resume"] {
        let started = Instant::now();
        run_all(phase).await?;
        times.push(started.elapsed().as_secs_f64());
        tokio::time::sleep(Duration::from_millis(500)).await;
        memory.push(rss());
    }
    let count = fleet.count;
    println!(
        "sandboxes: {count} × {} KiB: RSS {:.0} MiB at start, {:.0} running, {:.0} suspended, {:.0} resumed \
         (create {:.1} s, suspend {:.1} s, resume + check {:.1} s)",
        fleet.state_kib, memory[0], memory[1], memory[2], memory[3], times[0], times[1], times[2]
    );
    write(
        &args.out,
        Record::new(
            scenario::SANDBOX_FLEET,
            "kiln",
            &format!(
                "{count} sandboxes of {} KiB state each: created, all suspended, all resumed and checked",
                fleet.state_kib
            ),
        )
        .with("sandboxes", count as f64)
        .with("state_kib", fleet.state_kib as f64)
        .with("rss_baseline_mib", memory[0])
        .with("rss_running_mib", memory[1])
        .with("rss_suspended_mib", memory[2])
        .with("rss_resumed_mib", memory[3])
        .with("create_seconds", times[0])
        .with("suspend_seconds", times[1])
        .with("resume_seconds", times[2]),
    );
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
