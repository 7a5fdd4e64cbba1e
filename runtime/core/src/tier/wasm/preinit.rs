//! Pre-initialisation: a module exporting an init hook (`wizer.initialize`) has it run once, at
//! deploy, and the instance's state — memories and globals — is snapshotted into a new module
//! (`wasmtime-wizer`). That snapshot is what gets stored, compiled and pooled: every invocation
//! starts from it through a copy-on-write memory image and never runs the init again.
//!
//! The init hook runs under the function's own limits (timeout, memory) and with the same WASI
//! context an invocation gets (empty stdin). Randomness drawn during init is part of the snapshot
//! and so shared by all invocations; a guest that needs per-invocation entropy draws it after
//! start-up or reseeds in its `kiln.restore` hook.

use bytes::Bytes;
use wasmtime::Store;
use wasmtime_wizer::Wizer;

use crate::app::App;
use crate::config::{FunctionConfig, STDERR_CAP};
use crate::invoke::{arm_deadline, classify, guest_wasi, InvokeError, ModuleState};
use crate::limits::{CappedOutput, MemoryLimiter};

/// Runs `init_hook` of the module `wasm` and returns the pre-initialised module. The error is a
/// message for the deploy's 422. Blocking: call it from a blocking thread of the runtime.
pub fn preinitialize(
    app: &App,
    name: &str,
    wasm: &[u8],
    init_hook: &str,
    config: &FunctionConfig,
) -> Result<Vec<u8>, String> {
    let stdout = CappedOutput::new("stdout", STDERR_CAP);
    let stderr = CappedOutput::new("stderr", STDERR_CAP);
    let env: Vec<(String, String)> = config.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let wasi = guest_wasi(&[name.to_owned()], &env, Bytes::new(), &stdout, &stderr);
    let limiter = MemoryLimiter::new(config.memory_bytes());
    let mut store = Store::new(&app.engine, ModuleState::new(wasi, limiter));
    store.limiter(|s| &mut s.limiter);
    arm_deadline(&mut store, config.timeout());

    let mut wizer = Wizer::new();
    wizer.init_func(init_hook);
    let linker = app.linkers.module();
    let outcome = tokio::runtime::Handle::current().block_on(tokio::time::timeout(
        config.timeout(),
        wizer.run(&mut store, wasm, async |store, module| {
            linker.instantiate_async(store, module).await
        }),
    ));
    let error = match outcome {
        Ok(Ok(snapshot)) => return Ok(snapshot),
        Ok(Err(error)) => error,
        Err(_elapsed) => return Err(timed_out(init_hook, config)),
    };
    let memory_exceeded = store.data().limiter.exceeded();
    match classify(error, config.timeout_ms, memory_exceeded, &stdout, &stderr) {
        InvokeError::Timeout(_) => Err(timed_out(init_hook, config)),
        InvokeError::Failed(failure) => {
            let mut message = format!("the init hook `{init_hook}` failed: {}", failure.message);
            if !failure.stderr_tail.is_empty() {
                message.push_str(&format!("; its stderr: {}", failure.stderr_tail.trim_end()));
            }
            Err(message)
        }
        other => Err(format!("the init hook `{init_hook}` failed: {other}")),
    }
}

fn timed_out(init_hook: &str, config: &FunctionConfig) -> String {
    format!(
        "the init hook `{init_hook}` ran past the function's timeout of {} ms",
        config.timeout_ms
    )
}
