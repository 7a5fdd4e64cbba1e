//! The wasmtime engine and its pooling instance allocator, sized from one number: `max_instances`,
//! the most guest instances alive at once. Pool slots are reserved virtual memory set up at start,
//! so an invocation's instance comes from a free slot with a copy-on-write image of its memory
//! instead of fresh `mmap`s (the shape follows Spin's `crates/core`).
//!
//! Each pool dimension derives from `max_instances`:
//!
//! | pool               | size                  | why                                              |
//! |--------------------|-----------------------|--------------------------------------------------|
//! | component instances| max_instances         | one per live invocation                          |
//! | core instances     | 4 × max_instances     | a component holds a few core instances           |
//! | memories           | max_instances         | ~4 GiB + guard of address space each             |
//! | tables             | 2 × max_instances     | cheap: 8 bytes per element                       |
//! | async stacks       | max_instances         | one fiber stack per running invocation           |
//!
//! The pool is never exhausted by one tenant at another's expense: an invocation takes as many of
//! the `max_instances` permits as its code needs pool slots — its *weight*, one per memory, per
//! [`TABLES_PER_PERMIT`] tables and per [`CORE_INSTANCES_PER_PERMIT`] core instances — and its store
//! may create no more than its weight stands for (`limits::PoolShare`). A component with eight
//! memories takes eight permits; past `max_instances` the caller gets `too_many_requests`, never
//! another function a failure to instantiate.
//!
//! Proposals no supported guest toolchain emits (Rust, C via zig, componentize-py,
//! componentize-js) are off: 64-bit memories, GC and typed function references, exceptions,
//! threads, stack switching, wide arithmetic, custom page sizes, the component model's async
//! ABI. Less code compiled means less attack surface; an upload that uses one is refused at
//! deploy, naming the feature ([`features`] is what the deploy validator allows).
//!
//! Epoch interruption bounds guest code in time: a ticker thread advances the engine's epoch every
//! `EPOCH_TICK`, and each store gets a deadline in ticks.
//!
//! Sandboxes run on a second engine with the same settings but instances allocated on demand
//! ([`sandbox_engine`]): a pool slot keeps its first pages resident for the next instance, which
//! is what a stream of short invocations wants and not what a thousand suspended sandboxes want —
//! theirs must go back to the OS when they suspend.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wasmparser::WasmFeatures;
use wasmtime::{CacheStore, Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::function::MAX_MEMORY_MB;

/// Granularity of timeouts for guest code.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Elements a table may hold; tables larger than this are rejected at deploy.
pub const TABLE_ELEMENTS: usize = 100_000;
pub const MEMORIES_PER_MODULE: u32 = 1;
pub const TABLES_PER_MODULE: u32 = 4;
/// Pool slots one permit stands for, by kind (the pool's ratios above).
pub const TABLES_PER_PERMIT: u32 = 2;
pub const CORE_INSTANCES_PER_PERMIT: u32 = 4;
/// The most permits one invocation may need; code that needs more is refused at deploy.
pub const MAX_WEIGHT: u32 = 16;
/// Deepest Wasm stack a guest may use before it traps with a stack overflow.
pub const MAX_WASM_STACK: usize = 1 << 20;

const MIB: usize = 1 << 20;

/// Builds the one engine every function shares. Its settings are part of the compile cache key
/// (see `compile`), so changing anything here recompiles cached code, never misloads it.
pub fn engine(max_instances: u32, cache: Option<Arc<dyn CacheStore>>) -> wasmtime::Result<Engine> {
    let mut config = settings(cache)?;
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool(max_instances)));
    Engine::new(&config)
}

/// The engine for sandboxes' long-lived instances: the same settings (the same compiled code),
/// each instance's memory and stack mapped for it and unmapped when it ends.
pub fn sandbox_engine(cache: Option<Arc<dyn CacheStore>>) -> wasmtime::Result<Engine> {
    let mut config = settings(cache)?;
    config.allocation_strategy(InstanceAllocationStrategy::OnDemand);
    Engine::new(&config)
}

fn pool(max_instances: u32) -> PoolingAllocationConfig {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(max_instances)
        .total_core_instances(CORE_INSTANCES_PER_PERMIT * max_instances)
        .total_memories(max_instances)
        .total_tables(TABLES_PER_PERMIT * max_instances)
        .total_stacks(max_instances)
        .max_core_instances_per_component(CORE_INSTANCES_PER_PERMIT * MAX_WEIGHT)
        .max_memories_per_component(MAX_WEIGHT)
        .max_tables_per_component(TABLES_PER_PERMIT * MAX_WEIGHT)
        .max_memories_per_module(MEMORIES_PER_MODULE)
        .max_tables_per_module(TABLES_PER_MODULE)
        .table_elements(TABLE_ELEMENTS)
        .max_core_instance_size(MIB)
        .max_component_instance_size(MIB)
        // The pool's ceiling; each function's own `memory_mb` is enforced per store.
        .max_memory_size(MAX_MEMORY_MB as usize * MIB)
        // Keep the first pages of a slot resident and reset them with memset (cheaper than
        // madvise + page faults for small guests); PAGEMAP_SCAN resets only the dirtied pages.
        .linear_memory_keep_resident(2 * MIB)
        .table_keep_resident(MIB / 2)
        .async_stack_keep_resident(64 * 1024)
        .pagemap_scan(Enabled::Auto);
    pool
}

/// Everything but the instance allocator. `cache` is Cranelift's incremental compilation cache
/// (`incremental`), if any.
fn settings(cache: Option<Arc<dyn CacheStore>>) -> wasmtime::Result<Config> {
    let mut config = Config::new();
    if let Some(cache) = cache {
        config.enable_incremental_compilation(cache)?;
    }
    config
        .wasm_component_model(true)
        // No component-model async (WASI 0.3) yet: without its per-store state, an
        // instantiate + call is ~10% cheaper (benches/src/bin/instantiate.rs).
        .concurrency_support(false)
        .epoch_interruption(true)
        .max_wasm_stack(MAX_WASM_STACK)
        .async_stack_size(MAX_WASM_STACK + 512 * 1024)
        // Fiber stacks are reused across tenants: zero them, so a compiler bug that reads a stack
        // slot before writing it cannot read another tenant's data.
        .async_stack_zeroing(true)
        .memory_init_cow(true)
        // A snapshot whose data spreads further than this gets no copy-on-write image: every
        // instantiate copies its segments. Wasmtime's default (16 MiB) is below an interpreter's
        // heap: a Ruby function's snapshot (70 MiB, 22 MB of segments) instantiated in 13.4 ms
        // instead of 0.03 ms (guests/runtimes, README "Functions from source").
        .memory_guaranteed_dense_image_size(256 << 20)
        .cranelift_opt_level(wasmtime::OptLevel::Speed);
    config.wasm_features(DISABLED, false);
    Ok(config)
}

/// The proposals turned off (see the module doc).
const DISABLED: WasmFeatures = WasmFeatures::MEMORY64
    .union(WasmFeatures::GC)
    .union(WasmFeatures::FUNCTION_REFERENCES)
    .union(WasmFeatures::EXCEPTIONS)
    .union(WasmFeatures::LEGACY_EXCEPTIONS)
    .union(WasmFeatures::THREADS)
    .union(WasmFeatures::SHARED_EVERYTHING_THREADS)
    .union(WasmFeatures::STACK_SWITCHING)
    .union(WasmFeatures::WIDE_ARITHMETIC)
    .union(WasmFeatures::CUSTOM_PAGE_SIZES)
    .union(WasmFeatures::CM_ASYNC)
    .union(WasmFeatures::CM_MORE_ASYNC_BUILTINS)
    .union(WasmFeatures::CM_ASYNC_STACKFUL)
    .union(WasmFeatures::CM_THREADING)
    .union(WasmFeatures::CM_ERROR_CONTEXT)
    .union(WasmFeatures::CM_GC);

/// What a deploy's validator accepts: the validator's defaults without the disabled proposals.
pub fn features() -> WasmFeatures {
    WasmFeatures::default().difference(DISABLED)
}

/// Advances the engines' epochs every `EPOCH_TICK` until dropped.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    pub fn start(engines: &[&Engine]) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let engines: Vec<_> = engines.iter().map(|engine| engine.weak()).collect();
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("kiln-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    for engine in &engines {
                        match engine.upgrade() {
                            Some(engine) => engine.increment_epoch(),
                            None => return,
                        }
                    }
                }
            })
            .expect("spawning the epoch thread");
        EpochTicker { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Epoch ticks that cover `timeout`, rounded up, plus one because the current tick may be nearly over.
pub fn ticks_for(timeout: Duration) -> u64 {
    let tick = EPOCH_TICK.as_nanos();
    (timeout.as_nanos().div_ceil(tick) as u64).saturating_add(1)
}
