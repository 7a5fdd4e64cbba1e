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
use wasmtime_wizer::Wizer;

use super::egress::Egress;
use super::footprint::Footprint;
use super::instance::{Guest, ModuleState, StdoutCap};
use super::limits::PoolShare;
use super::WasmTier;
use crate::function::ArtifactKind;
use crate::function::FunctionConfig;
use crate::outcome::InvokeError;

/// Runs `init_hook` of the module `wasm` and returns the pre-initialised module. The error is a
/// message for the deploy's `invalid_code`. Blocking: call it from a blocking thread of the runtime.
pub fn preinitialize(
    tier: &WasmTier,
    name: &str,
    wasm: &[u8],
    init_hook: &str,
    config: &FunctionConfig,
) -> Result<Vec<u8>, String> {
    let env: Vec<(String, String)> = config.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let args = [name.to_owned()];
    let no_egress = Egress::deny_all(tier.connector.clone());
    let guest = Guest {
        args: &args,
        env: &env,
        egress: &no_egress,
        // Deploy time: no sandbox or invocation to vouch for.
        identity: None,
        memory_bytes: config.memory_bytes(),
        share: PoolShare::of_weight(Footprint::of(ArtifactKind::Module, wasm).weight()),
        timeout: config.timeout(),
        timeout_ms: config.timeout_ms,
    };
    let mut instance = guest.store::<ModuleState>(&tier.engine, Bytes::new(), StdoutCap::InitHook);

    let mut wizer = Wizer::new();
    wizer.init_func(init_hook);
    let linker = tier.linkers.module();
    let outcome = tokio::runtime::Handle::current().block_on(tokio::time::timeout(
        config.timeout(),
        wizer.run(&mut instance.store, wasm, async |store, module| {
            linker.instantiate_async(store, module).await
        }),
    ));
    let ended = match outcome {
        Ok(Ok(snapshot)) => return Ok(snapshot),
        Ok(Err(error)) => Ok(Err(error)),
        Err(elapsed) => Err(elapsed),
    };
    match instance.outcome(ended) {
        // `proc_exit(0)` ends the instance before the hook returns: there is nothing to snapshot.
        Ok(_) => Err(format!(
            "the init hook `{init_hook}` failed: the function exited with code 0"
        )),
        Err(InvokeError::Timeout(_)) => Err(timed_out(init_hook, config)),
        Err(InvokeError::Failed(failure)) => {
            let mut message = format!("the init hook `{init_hook}` failed: {}", failure.message);
            if !failure.stderr_tail.is_empty() {
                message.push_str(&format!("; its stderr: {}", failure.stderr_tail.trim_end()));
            }
            Err(message)
        }
        Err(other) => Err(format!("the init hook `{init_hook}` failed: {other}")),
    }
}

fn timed_out(init_hook: &str, config: &FunctionConfig) -> String {
    format!(
        "the init hook `{init_hook}` ran past the function's timeout of {} ms",
        config.timeout_ms
    )
}
