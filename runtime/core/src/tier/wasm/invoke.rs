//! One Wasm invocation, top to bottom: a store from the pool with its limits and deadline
//! ([`super::instance`]), instantiate from the pre-linked code (a pool slot with a copy-on-write
//! memory image), the restore hook then `_start` (a module) or `wasi:cli/run` (a component), and
//! the outcome classified. Nothing here compiles or touches the disk; the permits were taken by
//! the caller.

use bytes::Bytes;
use wasmtime::{Extern, ModuleExport, Store, TypedFunc};
use wasmtime_wasi::I32Exit;

use super::instance::{ComponentState, ModuleState, StdoutCap};
use super::link::Code;
use super::{WasmFunction, WasmTier};
use crate::function::VersionRecord;
use crate::outcome::{InvokeError, Success};

impl WasmTier {
    /// Runs `f` on `input` (its stdin) once.
    pub(super) async fn run(
        &self,
        f: &WasmFunction,
        record: &VersionRecord,
        input: Bytes,
    ) -> Result<Success, InvokeError> {
        let guest = f.guest(&record.config);
        // Guest code runs in epoch slices and is interrupted once the deadline has passed; time
        // parked in a host call (a sleep, say) is bounded by the host-side timeout, which drops
        // the future.
        let deadline = record.config.timeout();
        match &f.code {
            Code::Module { pre, start, restore } => {
                let mut instance = guest.store::<ModuleState>(&self.engine, input, StdoutCap::Invocation);
                let store = &mut instance.store;
                let run = async {
                    let module = pre.instantiate_async(&mut *store).await?;
                    if let Some(hook) = restore {
                        export_func(&module, store, hook)?.call_async(&mut *store, ()).await?;
                    }
                    export_func(&module, store, start)?.call_async(&mut *store, ()).await
                };
                let ended = tokio::time::timeout(deadline, run).await;
                instance.outcome(ended)
            }
            Code::Command(pre) => {
                let mut instance = guest.store::<ComponentState>(&self.engine, input, StdoutCap::Invocation);
                let store = &mut instance.store;
                let run = async {
                    let command = pre.instantiate_async(&mut *store).await?;
                    match command.wasi_cli_run().call_run(&mut *store).await? {
                        Ok(()) => Ok(()),
                        // WASI 0.2's `exit` carries only success or failure.
                        Err(()) => Err(wasmtime::Error::new(I32Exit(1))),
                    }
                };
                let ended = tokio::time::timeout(deadline, run).await;
                instance.outcome(ended)
            }
            Code::Http(_) => Err(InvokeError::HttpTrigger(record.name.clone())),
        }
    }
}

/// A `() -> ()` export found by its index (checked when the function was linked).
fn export_func(
    instance: &wasmtime::Instance,
    store: &mut Store<ModuleState>,
    export: &ModuleExport,
) -> wasmtime::Result<TypedFunc<(), ()>> {
    match instance.get_module_export(&mut *store, export) {
        Some(Extern::Func(func)) => func.typed::<(), ()>(&*store),
        _ => Err(wasmtime::Error::msg("the module's export is not a function")),
    }
}
