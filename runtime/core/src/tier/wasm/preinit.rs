//! Pre-initialisation: a module exporting an init hook (`wizer.initialize`) has it run once, at
//! deploy, and the instance's state — memories and globals — is snapshotted into a new module
//! (`wasmtime-wizer`). That snapshot is what gets stored, compiled and pooled: every invocation
//! starts from it through a copy-on-write memory image and never runs the init again.
//!
//! The init hook runs under the function's own limits (timeout, memory) and with the same WASI
//! context an invocation gets (empty stdin). Randomness drawn during init is part of the snapshot
//! and so shared by all invocations; a guest that needs per-invocation entropy draws it after
//! start-up or reseeds in its `kiln.restore` hook.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use bytes::Bytes;
use wasmtime_wizer::{WasmtimeWizer, Wizer};

use super::egress::Egress;
use super::footprint::Footprint;
use super::instance::{Guest, ModuleState, StdoutCap};
use super::limits::PoolShare;
use super::WasmTier;
use crate::digest::Digest;
use crate::function::ArtifactKind;
use crate::function::FunctionConfig;
use crate::outcome::InvokeError;

/// What an init runs with besides the function's own config.
pub struct Init<'a> {
    /// The exported function to run (`wizer.initialize`).
    pub hook: &'a str,
    /// How errors name what failed: "the init hook `wizer.initialize`", "loading /app/main.rb".
    pub what: String,
    /// Directories the init sees, read-only: `(host directory, guest path)`. Invocations see none.
    pub preopens: &'a [(PathBuf, &'static str)],
    /// Variables added to the function's env for the init only.
    pub env: &'a [(String, String)],
    /// Keep the compiled instrumented module for the next init of the same code (a language
    /// runtime: its instrumented module does not depend on the user's code).
    pub keep_compiled: bool,
}

impl<'a> Init<'a> {
    /// A module's own init hook: nothing preopened, nothing added.
    pub fn hook(hook: &'a str) -> Init<'a> {
        Init {
            hook,
            what: format!("the init hook `{hook}`"),
            preopens: &[],
            env: &[],
            keep_compiled: false,
        }
    }
}

/// Compiled instrumented modules of language runtimes, by the digest of the instrumented bytes:
/// compiling Ruby's takes 10–25 s, the init itself 0.15 s. Kept for the life of the process (one
/// per language, in memory: Ruby's is about 65 MB of code).
static INSTRUMENTED: Mutex<Option<HashMap<Digest, wasmtime::Module>>> = Mutex::new(None);

/// Runs the init of the module `wasm` and returns the pre-initialised module. The error is a
/// message for the deploy's `invalid_code`. Blocking: call it from a blocking thread of the runtime.
///
/// Only the guest's own run counts against its timeout: instrumenting and compiling the module
/// (host work, seconds for an interpreter) happen before its deadline starts.
pub fn preinitialize(
    tier: &WasmTier,
    name: &str,
    wasm: &[u8],
    init: &Init<'_>,
    config: &FunctionConfig,
) -> Result<Vec<u8>, String> {
    let mut env: Vec<(String, String)> = config.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    env.extend(init.env.iter().cloned());
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
    let what = &init.what;

    let mut wizer = Wizer::new();
    wizer.init_func(init.hook);
    let (cx, instrumented) = wizer
        .instrument(wasm)
        .map_err(|e| format!("{what} cannot be run: {e}"))?;
    let module = compile_instrumented(&tier.engine, &instrumented, init.keep_compiled)
        .map_err(|e| format!("{what} cannot be run: {e}"))?;
    match module.get_export(init.hook) {
        Some(wasmtime::ExternType::Func(f)) if f.params().len() == 0 && f.results().len() == 0 => {}
        _ => {
            return Err(format!(
                "{what} cannot be run: it is not an exported function of type [] -> []"
            ))
        }
    }

    let mut instance = guest
        .store_with::<ModuleState>(&tier.engine, Bytes::new(), StdoutCap::InitHook, init.preopens)
        .map_err(|e| format!("{what} cannot be run: {e}"))?;
    let linker = tier.linkers.module();
    let store = &mut instance.store;
    let ran = tokio::runtime::Handle::current().block_on(tokio::time::timeout(config.timeout(), async {
        let instance = linker.instantiate_async(&mut *store, &module).await?;
        // A reactor's own start-up (wasi-libc's constructors) first, as Wizer does.
        if let Ok(initialize) = instance.get_typed_func::<(), ()>(&mut *store, "_initialize") {
            initialize.call_async(&mut *store, ()).await?;
        }
        let hook = instance.get_typed_func::<(), ()>(&mut *store, init.hook)?;
        hook.call_async(&mut *store, ()).await?;
        wasmtime::Result::<_>::Ok(instance)
    }));
    let ended = match ran {
        Ok(Ok(done)) => {
            let snapshot = tokio::runtime::Handle::current().block_on(wizer.snapshot(
                &cx,
                &mut WasmtimeWizer {
                    store: &mut instance.store,
                    instance: done,
                },
            ));
            return snapshot.map_err(|e| format!("{what}: taking the snapshot failed: {e}"));
        }
        Ok(Err(error)) => Ok(Err(error)),
        Err(elapsed) => Err(elapsed),
    };
    match instance.outcome(ended) {
        // `proc_exit(0)` ends the instance before the hook returns: there is nothing to snapshot.
        Ok(_) => Err(format!("{what} failed: the function exited with code 0")),
        Err(InvokeError::Timeout(_)) => Err(format!(
            "{what} ran past the function's timeout of {} ms",
            config.timeout_ms
        )),
        Err(InvokeError::Failed(failure)) => {
            let mut message = format!("{what} failed: {}", failure.message);
            if !failure.stderr_tail.is_empty() {
                message.push_str(&format!("; its stderr: {}", failure.stderr_tail.trim_end()));
            }
            Err(message)
        }
        Err(other) => Err(format!("{what} failed: {other}")),
    }
}

fn compile_instrumented(
    engine: &wasmtime::Engine,
    instrumented: &[u8],
    keep: bool,
) -> wasmtime::Result<wasmtime::Module> {
    if !keep {
        return wasmtime::Module::new(engine, instrumented);
    }
    let digest = Digest::of(instrumented);
    let cached = INSTRUMENTED
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|m| m.get(&digest))
        .cloned();
    // Compiled code belongs to its engine (tests build several).
    if let Some(module) = cached.filter(|m| wasmtime::Engine::same(m.engine(), engine)) {
        return Ok(module);
    }
    let module = wasmtime::Module::new(engine, instrumented)?;
    INSTRUMENTED
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(digest, module.clone());
    Ok(module)
}
