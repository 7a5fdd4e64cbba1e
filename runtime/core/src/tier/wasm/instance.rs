//! One guest instance's store, built in one place for every caller — a sync or async invocation,
//! an HTTP-trigger request, the deploy-time init hook: the WASI context (stdio, args, env, and
//! nothing else), the memory limiter, capped stdout/stderr, and the deadline. Also how a guest's
//! error is turned into what the caller is told ([`classify`]).

use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, Trap, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::egress::Egress;
use super::engine::ticks_for;
use super::limits::{CappedOutput, MemoryLimiter, PoolShare, MAX_HOST_OBJECTS, MAX_RANDOM_BYTES};
use crate::identity::Identity;
use crate::outcome::{Failure, InvokeError, Success, STDERR_CAP, STDERR_TAIL, STDOUT_CAP};

/// Longest stretch guest code runs before it yields to the other tasks on its thread.
const SLICE: Duration = Duration::from_millis(10);

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
    /// Where `wasi:http/outgoing-handler` may go: the function's `allowed_hosts`, and
    /// `kiln.internal` always.
    pub egress: Egress,
}

/// What a store's data is made from.
pub trait GuestState: Send + Sized + 'static {
    fn new(wasi: WasiCtxBuilder, limiter: MemoryLimiter, egress: &Egress, identity: Option<&Identity>) -> Self;
    fn limiter(&mut self) -> &mut MemoryLimiter;
}

impl GuestState for ModuleState {
    fn new(mut wasi: WasiCtxBuilder, limiter: MemoryLimiter, _: &Egress, _: Option<&Identity>) -> ModuleState {
        let mut wasi = wasi.build_p1();
        wasi.ctx().table.set_max_capacity(MAX_HOST_OBJECTS);
        ModuleState { wasi, limiter }
    }

    fn limiter(&mut self) -> &mut MemoryLimiter {
        &mut self.limiter
    }
}

impl GuestState for ComponentState {
    fn new(
        mut wasi: WasiCtxBuilder,
        limiter: MemoryLimiter,
        egress: &Egress,
        identity: Option<&Identity>,
    ) -> ComponentState {
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_HOST_OBJECTS);
        ComponentState {
            wasi: wasi.build(),
            table,
            limiter,
            http: WasiHttpCtx::new(),
            egress: egress.for_instance().with_identity(identity.cloned()),
        }
    }

    fn limiter(&mut self) -> &mut MemoryLimiter {
        &mut self.limiter
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

/// Who the guest is and what it may use.
pub struct Guest<'a> {
    /// `argv`: the function's name.
    pub args: &'a [String],
    pub env: &'a [(String, String)],
    pub egress: &'a Egress,
    /// What `http://kiln.internal/identity` vouches for: the sandbox or invocation this is.
    pub identity: Option<Identity>,
    pub memory_bytes: usize,
    /// What of the pool the store may take: what its permits stand for.
    pub share: PoolShare,
    pub timeout: Duration,
    pub timeout_ms: u64,
}

/// A guest's store and its captured output.
pub struct Instance<T: 'static> {
    pub store: Store<T>,
    pub stdout: CappedOutput,
    pub stderr: CappedOutput,
    pub timeout_ms: u64,
}

impl Guest<'_> {
    /// A store for one instance: `stdin` as its input, its limits armed, its deadline running
    /// from now. The init hook's stdout is capped like stderr (nobody reads it).
    pub fn store<T: GuestState>(&self, engine: &Engine, stdin: Bytes, stdout_cap: StdoutCap) -> Instance<T> {
        self.store_with(engine, stdin, stdout_cap, &[])
            .expect("no directory to open")
    }

    /// [`Guest::store`] with directories preopened read-only, `(host directory, guest path)`:
    /// only a source function's deploy-time init has any (its files at `/app`).
    pub fn store_with<T: GuestState>(
        &self,
        engine: &Engine,
        stdin: Bytes,
        stdout_cap: StdoutCap,
        preopens: &[(std::path::PathBuf, &str)],
    ) -> Result<Instance<T>, String> {
        let stdout = CappedOutput::new("stdout", stdout_cap.bytes());
        let stderr = CappedOutput::new("stderr", STDERR_CAP);
        let mut wasi = WasiCtxBuilder::new();
        // Deny by default: stdio, args and env, and nothing else — no preopened directories, no
        // sockets, no name lookups. Random and clocks are fresh per context, so every instance
        // draws its own entropy.
        wasi.stdin(MemoryInputPipe::new(stdin))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .args(self.args)
            .envs(self.env)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .max_random_size(MAX_RANDOM_BYTES);
        for (host, guest) in preopens {
            wasi.preopened_dir(host, guest, FsPerms::ReadOnly)
                .map_err(|e| format!("opening {}: {e}", host.display()))?;
        }
        let limiter = MemoryLimiter::new(self.memory_bytes, self.share);
        let state = T::new(wasi, limiter, self.egress, self.identity.as_ref());
        let mut store = Store::new(engine, state);
        store.limiter(|s| s.limiter());
        arm_deadline(&mut store, self.timeout);
        Ok(Instance {
            store,
            stdout,
            stderr,
            timeout_ms: self.timeout_ms,
        })
    }
}

/// How much stdout an instance may write.
#[derive(Debug, Clone, Copy)]
pub enum StdoutCap {
    /// An invocation's: its response body.
    Invocation,
    /// The init hook's: nobody reads it.
    InitHook,
}

impl StdoutCap {
    fn bytes(self) -> usize {
        match self {
            StdoutCap::Invocation => STDOUT_CAP,
            StdoutCap::InitHook => STDERR_CAP,
        }
    }
}

impl<T: GuestState> Instance<T> {
    /// Turns how the guest's run ended into the invocation's outcome, naming the limit it hit when
    /// it hit one. An exit with code 0 is a success. The store is dropped first, so the output's
    /// buffer is handed over rather than copied.
    pub fn outcome(
        self,
        ended: Result<wasmtime::Result<()>, tokio::time::error::Elapsed>,
    ) -> Result<Success, InvokeError> {
        let Instance {
            mut store,
            stdout,
            stderr,
            timeout_ms,
        } = self;
        let memory_exceeded = store.data_mut().limiter().exceeded();
        drop(store);
        let success = |stdout: CappedOutput, stderr: &CappedOutput| Success {
            stdout: stdout.take(),
            stderr_tail: stderr.tail(STDERR_TAIL),
        };
        let error = match ended {
            Ok(Ok(())) => return Ok(success(stdout, &stderr)),
            Ok(Err(error)) => error,
            Err(_elapsed) => return Err(InvokeError::Timeout(timeout_ms)),
        };
        if let Some(I32Exit(0)) = error.downcast_ref::<I32Exit>() {
            return Ok(success(stdout, &stderr));
        }
        Err(classify(error, timeout_ms, memory_exceeded, &stdout, &stderr))
    }
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
pub fn classify(
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
