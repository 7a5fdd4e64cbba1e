//! Criterion micro-bench of one invocation in process (no HTTP): Kiln's `invoke` path next to
//! raw wasmtime doing the least it can for the same guest (pooling allocator, `InstancePre`, fresh
//! WASI context, `_start`, drop), in the manner of wasmtime's own `benches/instantiation.rs`.
//! Both on Kiln's engine; see `kiln_bench::inproc` for what each path does.
//!
//! `cargo bench -p kiln-bench --bench instantiate` (from the workspace root; the guest is
//! `guests/wat/hello.wat`, or the file named by `KILN_BENCH_GUEST`).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use kiln_bench::inproc::{KilnHarness, RawHarness};

fn guest() -> Vec<u8> {
    let path = std::env::var("KILN_BENCH_GUEST")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../guests/wat/hello.wat").into());
    wat::parse_file(&path).unwrap_or_else(|e| panic!("guest {path}: {e}"))
}

fn instantiate_and_call(c: &mut Criterion) {
    // One worker, as a Kiln server's invocation runs on one worker thread.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let wasm = guest();
    let kiln = rt.block_on(KilnHarness::new(&wasm));
    let raw = RawHarness::new(&kiln.kiln.functions.tiers.wasm.engine, &wasm);

    let mut group = c.benchmark_group("instantiate+call");
    // Whole batches run inside the runtime, so no per-iteration `block_on` is measured.
    group.bench_function("raw wasmtime (pool + InstancePre)", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    raw.invoke().await;
                }
                started.elapsed()
            })
        })
    });
    group.bench_function("kiln invoke", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    kiln.invoke().await;
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(2));
    targets = instantiate_and_call
}
criterion_main!(benches);
