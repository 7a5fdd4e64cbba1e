//! One invocation, start to finish: take the function's and the pool's permits, build a fresh
//! WASI context, instantiate from the pre-linked `InstancePre` (a pool slot with a copy-on-write
//! memory image), call the entry point under a deadline, and shape the outcome. Nothing here
//! compiles or touches the disk.

use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmtime::component::ResourceTable;
use wasmtime::{Extern, ModuleExport, Store, Trap, TypedFunc, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::app::App;
use crate::config::{STDERR_CAP, STDOUT_CAP};
use crate::egress::Egress;
use crate::limits::{CappedOutput, MemoryLimiter, MAX_HOST_OBJECTS, MAX_RANDOM_BYTES};
use crate::pool::ticks_for;
use crate::registry::{Concurrency, Entry, LoadedFunction};

/// Store data of a core-module (WASI preview 1) instance.
pub struct ModuleState {
    pub wasi: WasiP1Ctx,
    pub limiter: MemoryLimiter,
}

/// Store data of a component instance (a `wasi:cli/command` or a `wasi:http/proxy`).
pub struct ComponentState {
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub limiter: MemoryLimiter,
    pub http: WasiHttpCtx,
    /// Where `wasi:http/outgoing-handler` may go: the function's `allowed_hosts`.
    pub egress: Egress,
}

impl ModuleState {
    pub fn new(mut wasi: WasiCtxBuilder, limiter: MemoryLimiter) -> ModuleState {
        let mut wasi = wasi.build_p1();
        wasi.ctx().table.set_max_capacity(MAX_HOST_OBJECTS);
        ModuleState { wasi, limiter }
    }
}

impl ComponentState {
    pub fn new(mut wasi: WasiCtxBuilder, limiter: MemoryLimiter, egress: Egress) -> ComponentState {
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_HOST_OBJECTS);
        ComponentState {
            wasi: wasi.build(),
            table,
            limiter,
            http: WasiHttpCtx::new(),
            egress,
        }
    }
}

impl WasiHttpView for ComponentState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.egress,
        }
    }
}

impl WasiView for ComponentState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A successful invocation: the guest exited 0.
pub struct Success {
    pub stdout: Bytes,
    /// The guest's log, for callers that keep it (asynchronous invocations).
    pub stderr: CappedOutput,
}

/// Why an invocation did not succeed. `Failed` and `Timeout` are the guest's doing; the others are
/// capacity answers the caller may retry.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("function `{0}` is already running its maximum of {1} concurrent invocations")]
    FunctionBusy(String, u32),
    #[error("the server is running its maximum of {0} concurrent instances")]
    PoolBusy(u32),
    #[error("the function ran past its timeout of {0} ms")]
    Timeout(u64),
    #[error("{}", .0.message)]
    Failed(Failure),
    #[error("function `{0}` is an HTTP-trigger function: call it at /fn/{0}/")]
    HttpTrigger(String),
    #[error("function `{0}` is not an HTTP-trigger function: invoke it at /v1/functions/{0}/invoke")]
    NotHttpTrigger(String),
}

impl InvokeError {
    /// A failure Kiln explains itself (no trap, exit code or guest output to add).
    pub(crate) fn failed(message: String) -> InvokeError {
        InvokeError::Failed(Failure {
            message,
            trap: None,
            exit_code: None,
            stderr_tail: String::new(),
        })
    }
}

/// What the caller learns of a failed guest.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub trap: Option<String>,
    pub exit_code: Option<i32>,
    pub stderr_tail: String,
}

/// Longest stretch guest code runs before it yields to the other tasks on its thread.
const SLICE: Duration = Duration::from_millis(10);

/// Bytes of stderr an error body (or an invocation record) carries.
pub const STDERR_TAIL: usize = 4096;

pub async fn invoke(
    app: &App,
    f: &LoadedFunction,
    concurrency: &Concurrency,
    input: Bytes,
) -> Result<Success, InvokeError> {
    if let Entry::Microvm(vm) = &f.entry {
        return crate::microvm::invoke(app, f, vm, concurrency, input).await;
    }
    let config = &f.record.config;
    let _function_permit = concurrency
        .permits
        .try_acquire()
        .map_err(|_| InvokeError::FunctionBusy(f.record.name.clone(), concurrency.limit))?;
    let _pool_permit = app
        .instance_permits
        .try_acquire()
        .map_err(|_| InvokeError::PoolBusy(app.config.max_instances))?;

    let stdout = CappedOutput::new("stdout", STDOUT_CAP);
    let stderr = CappedOutput::new("stderr", STDERR_CAP);
    let wasi = guest_wasi(&f.args, &f.env, input, &stdout, &stderr);
    let limiter = MemoryLimiter::new(config.memory_bytes());

    // Guest code runs in epoch slices and is interrupted once the deadline has passed; time parked
    // in a host call (a sleep, say) is bounded by the host-side timeout, which drops the future.
    let deadline = config.timeout();
    let (outcome, memory_exceeded) = match &f.entry {
        Entry::Module { pre, start, restore } => {
            let mut store = Store::new(&app.engine, ModuleState::new(wasi, limiter));
            store.limiter(|s| &mut s.limiter);
            arm_deadline(&mut store, deadline);
            let run = async {
                let instance = pre.instantiate_async(&mut store).await?;
                if let Some(hook) = restore {
                    export_func(&instance, &mut store, hook)?
                        .call_async(&mut store, ())
                        .await?;
                }
                export_func(&instance, &mut store, start)?
                    .call_async(&mut store, ())
                    .await
            };
            let outcome = tokio::time::timeout(deadline, run).await;
            (outcome, store.data().limiter.exceeded())
        }
        Entry::Http(_) => return Err(InvokeError::HttpTrigger(f.record.name.clone())),
        Entry::Microvm(_) => unreachable!("microvm functions returned above"),
        Entry::Component(pre) => {
            let state = ComponentState::new(wasi, limiter, f.egress.for_instance());
            let mut store = Store::new(&app.engine, state);
            store.limiter(|s| &mut s.limiter);
            arm_deadline(&mut store, deadline);
            let run = async {
                let command = pre.instantiate_async(&mut store).await?;
                match command.wasi_cli_run().call_run(&mut store).await? {
                    Ok(()) => Ok(()),
                    Err(()) => Err(wasmtime::Error::new(I32Exit(1))),
                }
            };
            let outcome = tokio::time::timeout(deadline, run).await;
            (outcome, store.data().limiter.exceeded())
        }
    };

    let error = match outcome {
        Ok(Ok(())) => {
            return Ok(Success {
                stdout: stdout.take(),
                stderr,
            })
        }
        Ok(Err(error)) => error,
        Err(_elapsed) => return Err(InvokeError::Timeout(config.timeout_ms)),
    };
    if let Some(I32Exit(code)) = error.downcast_ref::<I32Exit>() {
        if *code == 0 {
            return Ok(Success {
                stdout: stdout.take(),
                stderr,
            });
        }
    }
    Err(classify(error, config.timeout_ms, memory_exceeded, &stdout, &stderr))
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

/// The WASI context of a guest: its stdio, args and env, and nothing else — no preopened
/// directories, no sockets, no name lookups (deny by default). Random and clocks are fresh per
/// context, so every instance draws its own entropy.
pub(crate) fn guest_wasi(
    args: &[String],
    env: &[(String, String)],
    stdin: Bytes,
    stdout: &CappedOutput,
    stderr: &CappedOutput,
) -> WasiCtxBuilder {
    let mut wasi = WasiCtxBuilder::new();
    wasi.stdin(MemoryInputPipe::new(stdin))
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .args(args)
        .envs(env)
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .max_random_size(MAX_RANDOM_BYTES);
    wasi
}

/// Runs guest code in slices of `SLICE` and interrupts it (`Trap::Interrupt`) once `timeout` has
/// passed. Between slices the guest yields to the async executor, so a guest spinning on a core
/// cannot starve the server's other requests for the length of its timeout.
pub(crate) fn arm_deadline<T>(store: &mut Store<T>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let slice_ticks = ticks_for(SLICE).min(ticks_for(timeout));
    store.set_epoch_deadline(slice_ticks);
    store.epoch_deadline_callback(move |_| {
        if Instant::now() >= deadline {
            return Ok(UpdateDeadline::Interrupt);
        }
        Ok(UpdateDeadline::YieldCustom(
            slice_ticks,
            Box::pin(tokio::task::yield_now()),
        ))
    });
}

/// Turns a guest's error into what the caller is told, naming the limit it hit when it hit one.
pub(crate) fn classify(
    error: wasmtime::Error,
    timeout_ms: u64,
    memory_exceeded: bool,
    stdout: &CappedOutput,
    stderr: &CappedOutput,
) -> InvokeError {
    let trap = error.downcast_ref::<Trap>().copied();
    if trap == Some(Trap::Interrupt) {
        return InvokeError::Timeout(timeout_ms);
    }
    let exit_code = error.downcast_ref::<I32Exit>().map(|e| e.0);
    let message = if let Some(code) = exit_code {
        format!("the function exited with code {code}")
    } else if memory_exceeded {
        format!("the function exceeded its memory limit: {}", root_message(&error))
    } else if stdout.overflowed() {
        format!("the function's {}", stdout.limit_message())
    } else if stderr.overflowed() {
        format!("the function's {}", stderr.limit_message())
    } else if trap == Some(Trap::StackOverflow) {
        "the function trapped: stack overflow".to_owned()
    } else if let Some(trap) = trap {
        format!("the function trapped: {trap}")
    } else {
        format!("the function failed: {}", root_message(&error))
    };
    InvokeError::Failed(Failure {
        message,
        trap: trap.map(|t| t.to_string()),
        exit_code,
        stderr_tail: stderr.tail(STDERR_TAIL),
    })
}

/// The innermost cause of an error, without wasmtime's backtrace context.
fn root_message(error: &wasmtime::Error) -> String {
    error.chain().last().map(|e| e.to_string()).unwrap_or_default()
}
