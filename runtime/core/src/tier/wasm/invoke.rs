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
use crate::identity::Subject;
use crate::outcome::{InvokeError, Success};

impl WasmTier {
    /// Runs `f` on `input` (its stdin) once.
    pub(super) async fn run_guest(
        &self,
        f: &WasmFunction,
        record: &VersionRecord,
        invocation: &str,
        input: Bytes,
    ) -> Result<Success, InvokeError> {
        let identity = self.identity(Subject::Invocation(invocation.to_owned()), record);
        let guest = f.guest(&record.config, Some(identity));
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::function::FunctionConfig;
    use crate::outcome::InvokeError;

    /// Echoes stdin to stdout, then exits with the code in the first input byte (`'0'` → 0).
    const ECHO_EXIT: &str = r#"(module
        (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
        (memory (export "memory") 1)
        (func (export "_start")
            (i32.store (i32.const 0) (i32.const 64))
            (i32.store (i32.const 4) (i32.const 1024))
            (drop (call $read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
            (i32.store (i32.const 4) (i32.load (i32.const 8)))
            (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 12)))
            (call $exit (i32.sub (i32.load8_u (i32.const 64)) (i32.const 48)))))"#;
    const SPIN: &str = r#"(module (func (export "_start") (loop (br 0))))"#;
    const GROW: &str =
        r#"(module (memory 1) (func (export "_start") (drop (memory.grow (i32.const 64))) unreachable))"#;

    /// Kiln's Wasm invoke path through the tier interface: output, exit codes, a trap, the memory
    /// limit, the timeout, and the permits given back after each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outcomes_are_classified_and_permits_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let functions = crate::testing::functions(dir.path());
        let deploy = |name: &'static str, wat: &'static str, config: FunctionConfig| {
            let functions = &functions;
            async move {
                functions
                    .deploy(name, Bytes::from_static(wat.as_bytes()), config)
                    .await
                    .unwrap();
                functions.resolve(name, None).await.unwrap()
            }
        };
        let echo = deploy("echo", ECHO_EXIT, FunctionConfig::default()).await;
        let ok = functions
            .invoke(&echo, "test", Bytes::from_static(b"0 in"))
            .await
            .unwrap();
        assert_eq!(ok.stdout, Bytes::from_static(b"0 in"));
        let Err(InvokeError::Failed(failed)) = functions.invoke(&echo, "test", Bytes::from_static(b"3")).await else {
            panic!("exit code 3 is a failure")
        };
        assert_eq!(
            (failed.exit_code, failed.message.as_str()),
            (Some(3), "the function exited with code 3")
        );

        let small = FunctionConfig {
            memory_mb: 1,
            ..FunctionConfig::default()
        };
        let grow = deploy("grow", GROW, small).await;
        let Err(InvokeError::Failed(failed)) = functions.invoke(&grow, "test", Bytes::new()).await else {
            panic!("growing past memory_mb fails")
        };
        assert!(
            failed.message.contains("memory limit of 1 MiB exceeded"),
            "{}",
            failed.message
        );

        let quick = FunctionConfig {
            timeout_ms: 50,
            ..FunctionConfig::default()
        };
        let spin = deploy("spin", SPIN, quick).await;
        let timeout = functions.invoke(&spin, "test", Bytes::new()).await.unwrap_err();
        assert!(matches!(timeout, InvokeError::Timeout(50)), "{timeout}");

        assert_eq!(functions.tiers.wasm.instances_in_use(), 0, "every permit came back");
        assert_eq!(echo.concurrency.in_use(), 0);
    }
}

#[cfg(test)]
mod hostile {
    use bytes::Bytes;

    use crate::deploy::DeployError;
    use crate::function::FunctionConfig;
    use crate::outcome::InvokeError;

    fn guest(name: &str) -> Bytes {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../guests/hostile/{name}.wat"));
        Bytes::from(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_memory_of_a_component_counts_against_one_limit() {
        let dir = tempfile::tempdir().unwrap();
        let functions = crate::testing::functions(dir.path());
        let wide = functions
            .deploy("wide", guest("wide_memory"), FunctionConfig::default())
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&wide, DeployError::InvalidCode(m) if m.contains("memory64")),
            "a 64-bit memory is refused, naming the proposal: {wide}"
        );
        functions
            .deploy("two", guest("two_memories"), FunctionConfig::default())
            .await
            .unwrap();
        let two = functions.resolve("two", None).await.unwrap();
        let Err(InvokeError::Failed(failed)) = functions.invoke(&two, "test", Bytes::new()).await else {
            panic!("200 MiB across two memories under a 128 MiB limit must fail")
        };
        assert!(
            failed.message.contains("memory limit of 128 MiB exceeded"),
            "{}",
            failed.message
        );
        assert_eq!(functions.tiers.wasm.instances_in_use(), 0);
    }
}
