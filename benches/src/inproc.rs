//! One invocation in process, no HTTP, two ways: through Kiln's `invoke` (permits, WASI context
//! with capped stdio, limiter, epoch slicing, instance from the pool, `_start`, teardown) and
//! through raw wasmtime doing the least it can for the same guest (same engine and pool,
//! `InstancePre`, fresh WASI context with in-memory stdio, instantiate, `_start`, drop).
//!
//! Used by `src/bin/instantiate.rs` (medians for `run.sh`) and `benches/instantiate.rs`
//! (criterion). Kiln's entry points are called here only, so a change to them is fixed in one place.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_core::config::CoreConfig;
use kiln_core::function::FunctionConfig;
use kiln_core::functions::Resolved;
use kiln_core::tier::wasm::egress::NoConnector;
use kiln_core::Kiln;
use wasmtime::{InstancePre, Linker, Module, Store};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi::WasiCtxBuilder;

/// The guest's input on both paths.
const INPUT: &[u8] = b"{}";

/// Kiln's core on a temporary data directory, with one function deployed.
pub struct KilnHarness {
    pub kiln: Arc<Kiln>,
    resolved: Resolved,
    _dir: tempfile::TempDir,
}

impl KilnHarness {
    /// Opens Kiln's core and deploys `wasm` as `bench`.
    pub async fn new(wasm: &[u8]) -> KilnHarness {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut config = CoreConfig::new(dir.path().to_path_buf());
        config.admin_token = Some("bench".into());
        let kiln = tokio::task::spawn_blocking(move || Kiln::open(config, Arc::new(NoConnector)))
            .await
            .unwrap()
            .expect("open Kiln's data directory");
        kiln.functions
            .deploy("bench", Bytes::copy_from_slice(wasm), FunctionConfig::default())
            .await
            .expect("deploy");
        let resolved = kiln.functions.resolve("bench", None).await.expect("resolve");
        KilnHarness {
            kiln,
            resolved,
            _dir: dir,
        }
    }

    /// One invocation through Kiln's invoke path.
    pub async fn invoke(&self) {
        let out = self
            .kiln
            .functions
            .invoke(&self.resolved, "bench", Bytes::from_static(INPUT))
            .await;
        std::hint::black_box(out.expect("the guest runs").stdout);
    }
}

/// The same guest, linked with raw wasmtime on Kiln's engine.
pub struct RawHarness {
    engine: wasmtime::Engine,
    pre: InstancePre<WasiP1Ctx>,
}

impl RawHarness {
    pub fn new(engine: &wasmtime::Engine, wasm: &[u8]) -> RawHarness {
        let module = Module::new(engine, wasm).expect("compile");
        let mut linker: Linker<WasiP1Ctx> = Linker::new(engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s| s).unwrap();
        let pre = linker.instantiate_pre(&module).unwrap();
        RawHarness {
            engine: engine.clone(),
            pre,
        }
    }

    /// Fresh WASI context, instantiate from the pool, `_start`, drop.
    pub async fn invoke(&self) {
        let stdout = MemoryOutputPipe::new(1 << 20);
        let wasi = WasiCtxBuilder::new()
            .stdin(MemoryInputPipe::new(Bytes::from_static(INPUT)))
            .stdout(stdout.clone())
            .build_p1();
        let mut store = Store::new(&self.engine, wasi);
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = self.pre.instantiate_async(&mut store).await.unwrap();
        let start = instance.get_typed_func::<(), ()>(&mut store, "_start").unwrap();
        start.call_async(&mut store, ()).await.unwrap();
        drop(store);
        std::hint::black_box(stdout.contents());
    }
}

/// Times `iterations` sequential calls of `call`, one sample each.
pub async fn sample<F, Fut>(iterations: usize, mut call: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = Instant::now();
        call().await;
        samples.push(started.elapsed());
    }
    samples
}
