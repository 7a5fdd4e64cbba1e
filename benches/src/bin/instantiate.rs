//! In-process cost of one invocation: Kiln's `invoke` path (permits, WASI context with capped
//! stdio, limiter, epoch slicing, instance from the pool, `_start`, teardown) next to raw wasmtime
//! doing the least it can for the same guest (same engine and pool, `InstancePre`, fresh WASI
//! context with in-memory stdio, instantiate, `_start`, drop). No HTTP on either side.
//!
//! Usage: instantiate [GUEST.wat] [ITERATIONS] [CONCURRENCY]
//!        (defaults: guests/wat/hello.wat, 20000, 1)
//! Prints per-invocation median and mean for both, and the ratio Kiln / raw. With CONCURRENCY > 1
//! it also runs that many tasks invoking Kiln at once and prints invocations per second.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln::app::App;
use kiln::config::{FunctionConfig, ServerConfig};
use wasmtime::{Linker, Module, Store};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi::WasiCtxBuilder;

fn summarize(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let median = samples[samples.len() / 2].as_secs_f64() * 1e6;
    let mean = samples.iter().map(|d| d.as_secs_f64()).sum::<f64>() / samples.len() as f64 * 1e6;
    (median, mean)
}

async fn raw(engine: &wasmtime::Engine, wasm: &[u8], iterations: usize) -> Vec<Duration> {
    let module = Module::new(engine, wasm).expect("compile");
    let mut linker: Linker<WasiP1Ctx> = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s| s).unwrap();
    let pre = linker.instantiate_pre(&module).unwrap();
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = Instant::now();
        let stdout = MemoryOutputPipe::new(1 << 20);
        let wasi = WasiCtxBuilder::new()
            .stdin(MemoryInputPipe::new(Bytes::from_static(b"{}")))
            .stdout(stdout.clone())
            .build_p1();
        let mut store = Store::new(engine, wasi);
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = pre.instantiate_async(&mut store).await.unwrap();
        let start = instance.get_typed_func::<(), ()>(&mut store, "_start").unwrap();
        start.call_async(&mut store, ()).await.unwrap();
        drop(store);
        std::hint::black_box(stdout.contents());
        samples.push(started.elapsed());
    }
    samples
}

async fn kiln(app: &std::sync::Arc<App>, wasm: &[u8], iterations: usize) -> Vec<Duration> {
    kiln::deploy::deploy(app, "bench", Bytes::copy_from_slice(wasm), FunctionConfig::default())
        .await
        .expect("deploy");
    let (function, concurrency) = app.resolve("bench", None).await.expect("resolve");
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = Instant::now();
        let out = kiln::invoke::invoke(app, &function, &concurrency, Bytes::from_static(b"{}")).await;
        std::hint::black_box(out.ok().map(|s| s.stdout));
        samples.push(started.elapsed());
    }
    samples
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let guest = args.next().unwrap_or_else(|| "guests/wat/hello.wat".into());
    let iterations: usize = args.next().map(|n| n.parse().expect("iterations")).unwrap_or(20_000);
    let wasm = wat::parse_file(&guest).expect("guest");

    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf());
    config.admin_token = Some("bench".into());
    let app = tokio::task::spawn_blocking(move || App::open(config))
        .await
        .unwrap()
        .expect("open");

    // Warm both paths, then measure each twice, interleaved, and keep the better run of each.
    raw(&app.engine, &wasm, 1000).await;
    kiln(&app, &wasm, 1000).await;
    let mut best_raw = (f64::MAX, f64::MAX);
    let mut best_kiln = (f64::MAX, f64::MAX);
    for _ in 0..2 {
        let r = summarize(raw(&app.engine, &wasm, iterations).await);
        let k = summarize(kiln(&app, &wasm, iterations).await);
        best_raw = if r.0 < best_raw.0 { r } else { best_raw };
        best_kiln = if k.0 < best_kiln.0 { k } else { best_kiln };
    }
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

    let concurrency: usize = std::env::args()
        .nth(3)
        .map(|n| n.parse().expect("concurrency"))
        .unwrap_or(1);
    if concurrency > 1 {
        let (function, limits) = app.resolve("bench", None).await.expect("resolve");
        let started = Instant::now();
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let (app, function, limits) = (app.clone(), function.clone(), limits.clone());
                tokio::spawn(async move {
                    for _ in 0..iterations / concurrency {
                        let out = kiln::invoke::invoke(&app, &function, &limits, Bytes::from_static(b"{}")).await;
                        std::hint::black_box(out.ok().map(|s| s.stdout));
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
