//! The host's side: [`Jail`] starts helpers and runs one VM operation in each; [`Helper`] is one
//! started helper (its pids, for tests and tools, and a hook called once it is jailed).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cgroup::{CgroupError, CgroupSetting, Cgroups, HelperCgroup, OVERHEAD_BYTES};
use super::child::CGROUP_ENV;
use super::protocol::{
    decode_frame, decode_header, BootFlat64Request, BootLinuxRequest, BootReport, Failure, ForbiddenSyscall,
    HelperExit, Message, ProbeRequest, RequestFlags, RestoreRequest, SessionRequest, HEADER_LEN, MAX_PATH,
    MAX_REQUEST_PAYLOAD,
};
use crate::builder::{ConfigError, VmConfig, MIN_MEMORY_MIB};
use crate::invocation::{Reply, SEED_LEN};
use crate::linux::LayoutError;
use crate::persist::{MEMORY_FILE, STATE_FILE, STATE_TMP_FILE};
use crate::vstate::vcpu::RunError;
use crate::vstate::vm::Quirks;

/// How the host starts helpers.
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// The executable to run: Kiln's own (`std::env::current_exe()`), or `kiln-vmm-jail` in tests.
    pub exe: PathBuf,
    /// Its arguments, e.g. `["vmm-jail"]`: whatever makes it call `jail::child_main`.
    pub args: Vec<OsString>,
    /// Work-arounds for the host's KVM, applied in every helper.
    pub quirks: Quirks,
    /// Per-helper cgroup v2 limits (see `jail::cgroup`).
    pub cgroup: CgroupSetting,
    /// How long past an operation's own timeout the host waits for the helper's answer before it
    /// kills the helper (restoring, tearing down and the helper's own start-up happen in it).
    pub margin: Duration,
    /// How long a helper may take to start (exec, KVM, namespaces) and say HELLO.
    pub start_timeout: Duration,
    /// Helpers kept started and waiting for their request (0: start one per operation). Each
    /// still runs exactly one VM; a pre-started one only takes the start-up off the request's path.
    pub prestart: usize,
}

impl JailConfig {
    /// A configuration with the defaults: no quirks, cgroups where the host has them, a 5 s
    /// margin, a 10 s start timeout, no pre-started helpers.
    pub fn new(exe: impl Into<PathBuf>, args: Vec<OsString>) -> Self {
        Self {
            exe: exe.into(),
            args,
            quirks: Quirks::default(),
            cgroup: CgroupSetting::Auto,
            margin: Duration::from_secs(5),
            start_timeout: Duration::from_secs(10),
            prestart: 0,
        }
    }
}

impl fmt::Display for HelperExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            HelperExit::Code(code) => write!(f, "exit code {code}"),
            HelperExit::Signal(signal) => {
                let name = match signal {
                    libc::SIGKILL => " (SIGKILL)",
                    libc::SIGSYS => " (SIGSYS: a syscall its seccomp filter forbids)",
                    libc::SIGSEGV => " (SIGSEGV)",
                    libc::SIGBUS => " (SIGBUS)",
                    libc::SIGABRT => " (SIGABRT)",
                    _ => "",
                };
                write!(f, "killed by signal {signal}{name}")
            }
        }
    }
}

/// Failure of an operation run in a jailed helper.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("cannot start the VM helper {exe}: {source}")]
    Spawn { exe: PathBuf, source: io::Error },
    #[error("cannot give the VM helper its cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("the VM helper cannot build its jail: {0}")]
    Setup(String),
    #[error("the VM helper died before it answered ({0})")]
    Died(HelperExit),
    #[error("the VM helper did not answer within {0:?} and was killed")]
    Hung(Duration),
    #[error("the VM helper broke the protocol: {0}")]
    Protocol(String),
    #[error("cannot talk to the VM helper: {0}")]
    Io(io::Error),
    #[error("{0}")]
    Files(String),
    #[error("the {what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { what: &'static str, len: usize, max: usize },
    #[error(transparent)]
    Config(ConfigError),
    #[error(transparent)]
    Layout(LayoutError),
    /// The vCPU stopped: the invocation's timeout, the memory limit, a shutdown, ... — the same
    /// errors as in-process runs give.
    #[error(transparent)]
    Run(RunError),
    #[error("the guest broke the protocol: {0}")]
    Guest(String),
    #[error("{0}")]
    Vm(String),
    /// A Linux boot failed: the message ends with the guest's console; `run` is the run error
    /// behind it, if the vCPU stopped (a boot timeout, a triple fault...).
    #[error("the microVM's Linux guest did not boot: {message}")]
    LinuxBoot { message: String, run: Option<RunError> },
}

impl JailError {
    /// The run error behind this failure, if the vCPU stopped (timeout, memory limit, ...); as
    /// `InvokeError::run_error` for in-process runs.
    pub fn run_error(&self) -> Option<&RunError> {
        match self {
            JailError::Run(e) => Some(e),
            JailError::LinuxBoot { run, .. } => run.as_ref(),
            _ => None,
        }
    }

    pub fn from_failure(failure: Failure) -> Self {
        match failure {
            Failure::Setup(m) => JailError::Setup(m),
            Failure::Config(e) => JailError::Config(e),
            Failure::Layout(e) => JailError::Layout(e),
            Failure::Run(e) => JailError::Run(e),
            Failure::Guest(m) => JailError::Guest(m),
            Failure::Vm(m) => JailError::Vm(m),
            Failure::LinuxBoot { message, run } => JailError::LinuxBoot { message, run },
        }
    }
}

/// What the host's side of one start-up or exchange can run into.
enum ReadError {
    /// The pipe closed: the helper is gone.
    Closed,
    /// The deadline passed.
    Deadline,
    Decode(String),
    Io(io::Error),
}

/// The helpers' shared settings.
#[derive(Debug)]
struct Shared {
    config: JailConfig,
    cgroups: Option<Cgroups>,
    cgroup_reason: Option<String>,
    reaper: Arc<Reaper>,
}

/// Runs each VM operation in its own jailed helper process. Blocking: call it from
/// `spawn_blocking` (or a thread of its own). Share it (`Arc<Jail>`); every operation starts (or
/// takes a pre-started) helper and runs one VM in it. A helper that answered is reaped by the
/// jail's reaper thread while the caller goes on (its exit, the VM's teardown, takes a few ms); one
/// that failed is reaped before the operation returns. Dropping the jail reaps them all.
pub struct Jail {
    shared: Arc<Shared>,
    pool: Option<Pool>,
}

impl fmt::Debug for Jail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jail")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

impl Jail {
    /// Checks the cgroup setting (logging once, at warn level, why helpers run without cgroup
    /// limits if they must) and starts the pre-started helpers, if any. Starts no VM.
    pub fn new(config: JailConfig) -> Self {
        let (cgroups, cgroup_reason) = match Cgroups::open(&config.cgroup) {
            Ok(cgroups) => {
                tracing::info!(parent = %cgroups.parent().display(), "microVM helpers get cgroup v2 limits");
                (Some(cgroups), None)
            }
            Err(CgroupError::Off) => (None, Some(CgroupError::Off.to_string())),
            Err(e) => {
                tracing::warn!("microVM helpers run without cgroup limits: {e}");
                (None, Some(e.to_string()))
            }
        };
        let shared = Arc::new(Shared {
            config,
            cgroups,
            cgroup_reason,
            reaper: Reaper::start(),
        });
        let pool = (shared.config.prestart > 0).then(|| Pool::start(shared.clone()));
        Self { shared, pool }
    }

    /// The cgroup helpers' cgroups are created in, if they get cgroup limits.
    pub fn cgroup_parent(&self) -> Option<&Path> {
        self.shared.cgroups.as_ref().map(Cgroups::parent)
    }

    /// Why helpers run without cgroup limits, if they do.
    pub fn cgroup_unavailable(&self) -> Option<&str> {
        self.shared.cgroup_reason.as_deref()
    }

    /// Starts a new helper (never a pre-started one): jailed in its namespaces and waiting for its
    /// one request. For callers that want its pid or the jailed hook first.
    pub fn spawn(&self) -> Result<Helper, JailError> {
        spawn(&self.shared)
    }

    /// A pre-started helper if one is ready, else a new one.
    fn helper(&self) -> Result<(Helper, bool), JailError> {
        match self.pool.as_ref().and_then(Pool::take) {
            Some(helper) => Ok((helper, true)),
            None => Ok((self.spawn()?, false)),
        }
    }

    /// Runs `op` in a helper; a pre-started helper found dead before it took the request (its
    /// pipe closed) is replaced by a new one, once.
    fn run<T>(&self, op: impl Fn(Helper) -> Result<T, Attempt>) -> Result<T, JailError> {
        let (helper, prestarted) = self.helper()?;
        match op(helper) {
            Ok(value) => Ok(value),
            Err(Attempt::Unsent(e)) if prestarted => {
                tracing::warn!("a pre-started microVM helper was gone ({e}); starting another");
                op(self.spawn()?).map_err(Attempt::into_error)
            }
            Err(e) => Err(e.into_error()),
        }
    }

    /// Restores the snapshot in `snapshot_dir` in a jailed helper, sends RESEED with `seed` and
    /// REQUEST with `input`, and returns the guest's reply; as `Snapshot::restore` then
    /// `MicroVm::invoke` in process. The helper is killed if it has not answered by `timeout`
    /// plus the configured margin.
    pub fn restore_and_invoke(
        &self,
        snapshot_dir: &Path,
        seed: &[u8; SEED_LEN],
        input: &[u8],
        timeout: Duration,
        log_cap: usize,
    ) -> Result<Reply, JailError> {
        // Refused before a helper is taken for it.
        check_input(input)?;
        self.run(|helper| helper.restore_and_invoke_attempt(snapshot_dir, seed, input, timeout, log_cap))
    }

    /// Boots a flat 64-bit test image (`crate::test_guest`) to READY in a jailed helper and
    /// snapshots it into `dir` (created if missing), as `MicroVm::boot_flat64` then
    /// `Snapshot::create` in process.
    pub fn boot_flat64_and_snapshot(
        &self,
        image: &[u8],
        config: VmConfig,
        timeout: Duration,
        dir: &Path,
    ) -> Result<BootReport, JailError> {
        self.run(|helper| helper.boot_flat64_attempt(image, config, timeout, dir))
    }

    /// Boots Linux (`vmlinux`, the ELF kernel) with `initramfs` and `cmdline` to the agent's READY
    /// in a jailed helper and snapshots it into `dir` (created if missing), as
    /// `MicroVm::boot_linux` then `Snapshot::create` in process: the deploy path.
    pub fn boot_linux_and_snapshot(
        &self,
        vmlinux: &[u8],
        initramfs: &[u8],
        cmdline: &str,
        config: VmConfig,
        timeout: Duration,
        dir: &Path,
    ) -> Result<BootReport, JailError> {
        self.run(|helper| helper.boot_linux_attempt(vmlinux, initramfs, cmdline, config, timeout, dir))
    }

    /// Restores the snapshot in `dir` in a jailed helper and keeps it running as a session (a
    /// sandbox's VM): RESEED with `seed`, SESSION with `clock` (the host's wall clock, since the
    /// Unix epoch), then frames both ways through the returned [`Session`] until the caller asks
    /// for a snapshot (written into `dir` as `memory.next` and `state.tmp`) or drops it. `dir`
    /// must be writable; `env` (`KEY=VALUE` entries, each ending in NUL) adds to the function's
    /// environment when the guest starts its server. The helper is killed if it has not started
    /// by `timeout` plus the margin.
    pub fn start_session(
        &self,
        dir: &Path,
        seed: &[u8; SEED_LEN],
        clock: Duration,
        env: &[u8],
        timeout: Duration,
    ) -> Result<Session, JailError> {
        self.run(|helper| helper.start_session_attempt(dir, seed, clock, env, timeout))
    }

    /// Whether a helper can be jailed here and create a VM in its jail: the server's capability
    /// check, without opening `/dev/kvm` itself. The error says why not.
    pub fn probe(&self) -> Result<(), String> {
        self.run(|helper| helper.probe_attempt(None))
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// Makes a helper attempt `syscall` once jailed; its seccomp filter kills it, so this returns
    /// `JailError::Died(HelperExit::Signal(SIGSYS))`. A test of the filter, for tests.
    pub fn probe_forbidden(&self, syscall: ForbiddenSyscall) -> JailError {
        match self.run(|helper| helper.probe_attempt(Some(syscall))) {
            Ok(()) => JailError::Protocol(format!("the helper answered after attempting {syscall:?}")),
            Err(e) => e,
        }
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        // The pre-started helpers first (killed and reaped), then every helper that answered.
        self.pool.take();
        self.shared.reaper.stop();
    }
}

/// An operation's outcome, telling apart a helper that never took the request.
enum Attempt {
    /// The helper was gone before it read anything of the request.
    Unsent(JailError),
    Failed(JailError),
}

impl Attempt {
    fn into_error(self) -> JailError {
        match self {
            Attempt::Unsent(e) | Attempt::Failed(e) => e,
        }
    }
}

impl From<JailError> for Attempt {
    fn from(e: JailError) -> Self {
        Attempt::Failed(e)
    }
}

type JailedHook = Box<dyn FnOnce(u32) + Send>;

/// One started helper: jailed in its namespaces, its worker waiting for one request. Each
/// operation consumes it; dropping it unused kills and reaps it.
pub struct Helper {
    child: Child,
    reaped: bool,
    to_helper: ChildStdin,
    from_helper: ChildStdout,
    worker_pid: u32,
    /// A pidfd of the worker (opened at HELLO), to kill it without racing a reused pid.
    worker: Option<OwnedFd>,
    margin: Duration,
    quirks: Quirks,
    cgroup: Option<HelperCgroup>,
    on_jailed: Option<JailedHook>,
    reaper: Arc<Reaper>,
}

impl fmt::Debug for Helper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Helper")
            .field("supervisor_pid", &self.child.id())
            .field("worker_pid", &self.worker_pid)
            .finish_non_exhaustive()
    }
}

fn spawn(shared: &Shared) -> Result<Helper, JailError> {
    let config = &shared.config;
    let cgroup = shared.cgroups.as_ref().map(Cgroups::create).transpose()?;
    let mut command = Command::new(&config.exe);
    // No environment: the server's (tokens, paths) has no business in a helper.
    command
        .args(&config.args)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cgroup) = &cgroup {
        command.env(CGROUP_ENV, cgroup.path());
    }
    let mut child = command.spawn().map_err(|source| JailError::Spawn {
        exe: config.exe.clone(),
        source,
    })?;
    let (Some(to_helper), Some(from_helper), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        unreachable!("the three pipes were asked for");
    };
    forward_stderr(stderr, child.id());
    let mut helper = Helper {
        child,
        reaped: false,
        to_helper,
        from_helper,
        worker_pid: 0,
        worker: None,
        margin: config.margin,
        quirks: config.quirks,
        cgroup,
        on_jailed: None,
        reaper: shared.reaper.clone(),
    };
    set_nonblocking(helper.to_helper.as_raw_fd()).map_err(JailError::Io)?;
    set_nonblocking(helper.from_helper.as_raw_fd()).map_err(JailError::Io)?;
    let deadline = Instant::now() + config.start_timeout;
    match helper.read_message(deadline) {
        Ok(Message::Hello { worker_pid }) => {
            helper.worker_pid = worker_pid;
            // The worker cannot have ended yet (it waits for its request), so the pid is its own.
            helper.worker = pidfd_open(worker_pid);
            Ok(helper)
        }
        Ok(Message::Failed(failure)) => {
            helper.reap(deadline);
            Err(JailError::from_failure(failure))
        }
        Ok(other) => Err(helper.broken(format!("a {other:?} frame instead of HELLO"))),
        Err(e) => Err(helper.lost(e, config.start_timeout)),
    }
}

/// Copies a helper's stderr (a panic, the jail's diagnostics) into the server's log, line by
/// line. A pipe rather than the server's own stderr: the jailed worker must hold no descriptor
/// of the host's (a log file, a terminal). The thread ends when the helper and its worker have.
fn forward_stderr(stderr: ChildStderr, supervisor_pid: u32) {
    use std::io::BufRead;
    let forward = move || {
        for line in io::BufReader::new(stderr).lines().map_while(Result::ok) {
            tracing::warn!(helper = supervisor_pid, "microvm helper: {line}");
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("kiln-vmm-stderr".into())
        .spawn(forward)
    {
        tracing::warn!("the microvm helper's stderr is not forwarded: {e}");
    }
}

impl Helper {
    /// The worker's pid in the host's PID namespace (it is PID 1 in its own): the process that
    /// runs the vCPU, whose `/proc/<pid>` shows the jail.
    pub fn worker_pid(&self) -> u32 {
        self.worker_pid
    }

    /// The supervisor's pid: the host's child, which waits for the worker.
    pub fn supervisor_pid(&self) -> u32 {
        self.child.id()
    }

    /// Calls `hook` with the worker's pid once the worker is jailed (namespaces, root, no
    /// capabilities, seccomp) and about to run the guest. For tests and tools.
    pub fn on_jailed(&mut self, hook: impl FnOnce(u32) + Send + 'static) {
        self.on_jailed = Some(Box::new(hook));
    }

    fn flags(&self) -> RequestFlags {
        RequestFlags {
            quirks: self.quirks,
            report_jailed: self.on_jailed.is_some(),
        }
    }

    /// See [`Jail::restore_and_invoke`].
    pub fn restore_and_invoke(
        self,
        snapshot_dir: &Path,
        seed: &[u8; SEED_LEN],
        input: &[u8],
        timeout: Duration,
        log_cap: usize,
    ) -> Result<Reply, JailError> {
        self.restore_and_invoke_attempt(snapshot_dir, seed, input, timeout, log_cap)
            .map_err(Attempt::into_error)
    }

    fn restore_and_invoke_attempt(
        self,
        snapshot_dir: &Path,
        seed: &[u8; SEED_LEN],
        input: &[u8],
        timeout: Duration,
        log_cap: usize,
    ) -> Result<Reply, Attempt> {
        check_input(input)?;
        let dir = absolute(snapshot_dir)?;
        let memory_file = dir.join(MEMORY_FILE);
        let memory = fs::metadata(&memory_file)
            .map_err(|e| JailError::Files(format!("cannot read the snapshot's {}: {e}", memory_file.display())))?
            .len();
        let request = Message::Restore(RestoreRequest {
            flags: self.flags(),
            timeout,
            log_cap: log_cap.min(super::protocol::MAX_LOG_CAP as usize) as u32,
            seed: *seed,
            dir,
            input: input.to_vec(),
        });
        match self.exchange(request, memory + input.len() as u64, timeout)? {
            Message::Replied(reply) => Ok(reply),
            other => Err(unexpected(other)),
        }
    }

    /// See [`Jail::boot_flat64_and_snapshot`].
    pub fn boot_flat64_and_snapshot(
        self,
        image: &[u8],
        config: VmConfig,
        timeout: Duration,
        dir: &Path,
    ) -> Result<BootReport, JailError> {
        self.boot_flat64_attempt(image, config, timeout, dir)
            .map_err(Attempt::into_error)
    }

    fn boot_flat64_attempt(
        self,
        image: &[u8],
        config: VmConfig,
        timeout: Duration,
        dir: &Path,
    ) -> Result<BootReport, Attempt> {
        let dir = staging_dir(dir)?;
        let request = Message::BootFlat64(BootFlat64Request {
            flags: self.flags(),
            config,
            timeout,
            dir: dir.clone(),
            image: image.to_vec(),
        });
        let memory = config.memory_mib as u64 * (1 << 20) + image.len() as u64;
        self.boot(request, memory, timeout + snapshot_time(config), &dir)
    }

    /// See [`Jail::boot_linux_and_snapshot`].
    pub fn boot_linux_and_snapshot(
        self,
        vmlinux: &[u8],
        initramfs: &[u8],
        cmdline: &str,
        config: VmConfig,
        timeout: Duration,
        dir: &Path,
    ) -> Result<BootReport, JailError> {
        self.boot_linux_attempt(vmlinux, initramfs, cmdline, config, timeout, dir)
            .map_err(Attempt::into_error)
    }

    fn boot_linux_attempt(
        self,
        vmlinux: &[u8],
        initramfs: &[u8],
        cmdline: &str,
        config: VmConfig,
        timeout: Duration,
        dir: &Path,
    ) -> Result<BootReport, Attempt> {
        let dir = staging_dir(dir)?;
        let request = Message::BootLinux(BootLinuxRequest {
            flags: self.flags(),
            config,
            timeout,
            dir: dir.clone(),
            cmdline: cmdline.to_owned(),
            vmlinux: vmlinux.to_vec(),
            initramfs: initramfs.to_vec(),
        });
        let memory = config.memory_mib as u64 * (1 << 20) + (vmlinux.len() + initramfs.len()) as u64;
        self.boot(request, memory, timeout + snapshot_time(config), &dir)
    }

    /// Runs a boot request and publishes the snapshot's state file (the helper wrote it as
    /// `state.tmp`, and cannot rename: its filter allows no path operations).
    fn boot(self, request: Message, memory: u64, budget: Duration, dir: &Path) -> Result<BootReport, Attempt> {
        match self.exchange(request, memory, budget)? {
            Message::Booted(report) => {
                let (tmp, state) = (dir.join(STATE_TMP_FILE), dir.join(STATE_FILE));
                fs::rename(&tmp, &state).map_err(|e| {
                    JailError::Files(format!("cannot publish the snapshot's state {}: {e}", state.display()))
                })?;
                Ok(report)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Runs a PROBE in a fresh empty directory (the jail's root).
    fn probe_attempt(self, attempt: Option<ForbiddenSyscall>) -> Result<(), Attempt> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kiln-jail-probe-{}-{n}", std::process::id()));
        fs::create_dir(&dir).map_err(|e| JailError::Files(format!("cannot create {}: {e}", dir.display())))?;
        let request = Message::Probe(ProbeRequest {
            flags: self.flags(),
            dir: dir.clone(),
            attempt,
        });
        let outcome = self.exchange(request, (MIN_MEMORY_MIB as u64) << 20, Duration::from_secs(5));
        let _ = fs::remove_dir(&dir);
        match outcome? {
            Message::Probed => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Sends `request`, then reads until the answer, the helper's death or the deadline (`budget`
    /// plus the margin), and reaps the helper whatever happens.
    fn exchange(self, request: Message, memory: u64, budget: Duration) -> Result<Message, Attempt> {
        let waited = budget + self.margin;
        let deadline = Instant::now() + waited;
        if let Some(cgroup) = &self.cgroup {
            cgroup
                .set_memory_max(memory + OVERHEAD_BYTES)
                .map_err(JailError::Cgroup)?;
        }
        let frame = request.encode();
        drop(request);
        if frame.len() - HEADER_LEN > MAX_REQUEST_PAYLOAD {
            return Err(JailError::TooLarge {
                what: "request",
                len: frame.len() - HEADER_LEN,
                max: MAX_REQUEST_PAYLOAD,
            }
            .into());
        }
        let helper = self.write_request(&frame, deadline, waited)?;
        match helper.answer(deadline, waited)? {
            // The worker answered and is exiting: the reaper waits for that, off this path.
            (helper, answer @ (Message::Replied(_) | Message::Booted(_) | Message::Probed)) => {
                helper.reaper.clone().hand_over(helper);
                Ok(answer)
            }
            (helper, other) => Err(helper.broken(format!("an unexpected {other:?} frame")).into()),
        }
    }

    /// Reads up to the worker's answer to a request, by `deadline`: JAILED is acted on (the hook,
    /// the go-ahead), a failure or the worker's end is the error; the helper and its answer
    /// otherwise.
    fn answer(self, deadline: Instant, waited: Duration) -> Result<(Helper, Message), Attempt> {
        let mut helper = self;
        loop {
            match helper.read_message(deadline) {
                Ok(Message::Jailed) => helper = helper.go_ahead(deadline, waited)?,
                Ok(Message::Exited(exit)) => {
                    helper.reap(deadline);
                    return Err(JailError::Died(exit).into());
                }
                // The worker reported and is exiting: the reaper waits for that, off this path.
                Ok(Message::Failed(failure)) => {
                    helper.reaper.clone().hand_over(helper);
                    return Err(JailError::from_failure(failure).into());
                }
                Ok(answer) => return Ok((helper, answer)),
                Err(e) => return Err(helper.lost(e, waited).into()),
            }
        }
    }

    /// Writes a request's frame by `deadline`; a helper that cannot take it is lost.
    fn write_request(mut self, frame: &[u8], deadline: Instant, waited: Duration) -> Result<Self, Attempt> {
        match write_all_by(&mut self.to_helper, frame, deadline) {
            Ok(()) => Ok(self),
            Err((0, WriteError::Closed)) => Err(Attempt::Unsent(self.lost(ReadError::Closed, waited))),
            Err((_, WriteError::Closed)) => Err(self.lost(ReadError::Closed, waited).into()),
            Err((_, WriteError::Deadline)) => Err(self.lost(ReadError::Deadline, waited).into()),
            Err((_, WriteError::Io(e))) => Err(self.lost(ReadError::Io(e), waited).into()),
        }
    }

    /// After JAILED: runs the hook, then lets the worker go on.
    fn go_ahead(mut self, deadline: Instant, waited: Duration) -> Result<Self, Attempt> {
        if let Some(hook) = self.on_jailed.take() {
            hook(self.worker_pid);
        }
        // The worker waits for this before it runs the guest (see `report_jailed`).
        if let Err((_, e)) = write_all_by(&mut self.to_helper, &[1], deadline) {
            let e = match e {
                WriteError::Closed => ReadError::Closed,
                WriteError::Deadline => ReadError::Deadline,
                WriteError::Io(e) => ReadError::Io(e),
            };
            return Err(self.lost(e, waited).into());
        }
        Ok(self)
    }

    /// See [`Jail::start_session`].
    fn start_session_attempt(
        self,
        dir: &Path,
        seed: &[u8; SEED_LEN],
        clock: Duration,
        env: &[u8],
        timeout: Duration,
    ) -> Result<Session, Attempt> {
        let dir = absolute(dir)?;
        let memory_file = dir.join(MEMORY_FILE);
        let memory = fs::metadata(&memory_file)
            .map_err(|e| JailError::Files(format!("cannot read the snapshot's {}: {e}", memory_file.display())))?
            .len();
        if let Some(cgroup) = &self.cgroup {
            cgroup
                .set_memory_max(memory + OVERHEAD_BYTES)
                .map_err(JailError::Cgroup)?;
        }
        let request = Message::Session(SessionRequest {
            flags: self.flags(),
            seed: *seed,
            clock,
            dir,
            env: env.to_vec(),
        });
        let waited = timeout + self.margin;
        let deadline = Instant::now() + waited;
        let helper = self.write_request(&request.encode(), deadline, waited)?;
        match helper.answer(deadline, waited)? {
            (helper, Message::Started) => Ok(Session { helper }),
            (helper, other) => Err(helper.broken(format!("an unexpected {other:?} frame")).into()),
        }
    }
}

/// A running session (a sandbox's VM) in a jailed helper: frames flow through [`Session::pipes`]
/// (the protocol's TO_GUEST and SUSPEND one way; FROM_GUEST, SUSPENDED, FAILED and EXITED the
/// other), driven by the caller's own event loop. Dropping it kills the helper and reaps it.
#[derive(Debug)]
pub struct Session {
    helper: Helper,
}

impl Session {
    /// The worker's pid in the host's PID namespace.
    pub fn worker_pid(&self) -> u32 {
        self.helper.worker_pid
    }

    /// Non-blocking duplicates of the pipes: (to the helper, from the helper).
    pub fn pipes(&self) -> io::Result<(OwnedFd, OwnedFd)> {
        Ok((
            self.helper.to_helper.as_fd().try_clone_to_owned()?,
            self.helper.from_helper.as_fd().try_clone_to_owned()?,
        ))
    }

    /// After SUSPENDED (the worker is exiting): reaped off the caller's path.
    pub fn finish(self) {
        let helper = self.helper;
        helper.reaper.clone().hand_over(helper);
    }
}

impl Helper {
    /// Reads one helper → host frame by `deadline`.
    fn read_message(&mut self, deadline: Instant) -> Result<Message, ReadError> {
        let mut header = [0u8; HEADER_LEN];
        read_exact_by(&mut self.from_helper, &mut header, deadline)?;
        let (kind, len) = decode_header(&header).map_err(|e| ReadError::Decode(e.to_string()))?;
        if super::protocol::kind_is_request(kind) {
            return Err(ReadError::Decode(format!("the helper sent a request (kind {kind})")));
        }
        let mut frame = header.to_vec();
        frame.resize(HEADER_LEN + len, 0);
        read_exact_by(&mut self.from_helper, &mut frame[HEADER_LEN..], deadline)?;
        decode_frame(&frame).map_err(|e| ReadError::Decode(e.to_string()))
    }

    /// The error for a helper that went silent or away: kills it if it still runs, and reaps it.
    fn lost(self, error: ReadError, waited: Duration) -> JailError {
        match error {
            ReadError::Closed => self.ended(Instant::now() + waited),
            ReadError::Deadline => {
                let mut helper = self;
                helper.kill_and_reap();
                JailError::Hung(waited)
            }
            ReadError::Decode(message) => self.broken(message),
            ReadError::Io(e) => {
                let mut helper = self;
                helper.kill_and_reap();
                JailError::Io(e)
            }
        }
    }

    /// A helper whose pipe closed under the host: reads what it still said (its supervisor reports
    /// the worker's end, or a set-up failure, before it exits) and reaps it. Without a report, the
    /// supervisor itself died, and its own status says how.
    fn ended(mut self, deadline: Instant) -> JailError {
        let mut report = None;
        loop {
            match self.read_message(deadline) {
                Ok(Message::Exited(exit)) => report = Some(JailError::Died(exit)),
                Ok(Message::Failed(failure)) => report = Some(JailError::from_failure(failure)),
                Ok(_) => {}
                Err(ReadError::Deadline) => {
                    self.kill_and_reap();
                    return report.unwrap_or(JailError::Hung(Duration::ZERO));
                }
                // End of stream: both processes have exited (or are exiting), so the wait is short.
                Err(_) => break,
            }
        }
        let status = self.child.wait();
        self.reaped = true;
        report.unwrap_or(JailError::Died(match status {
            Ok(status) => exit_of(status),
            Err(_) => HelperExit::Signal(libc::SIGKILL),
        }))
    }

    /// A helper that broke the protocol: killed and reaped.
    fn broken(mut self, message: String) -> JailError {
        self.kill_and_reap();
        JailError::Protocol(message)
    }

    /// Reaps a helper that answered (see `Reaper`), allowing its exit the margin.
    fn finish(mut self) {
        let deadline = Instant::now() + self.margin;
        self.reap(deadline);
    }

    /// After the answer: the supervisor reports the worker's exit and ends; reads up to that and
    /// reaps it, killing it if it lingers past `deadline`.
    fn reap(&mut self, deadline: Instant) {
        let mut rest = [0u8; 64];
        loop {
            match read_some_by(&mut self.from_helper, &mut rest, deadline) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(_) => return self.kill_and_reap(),
            }
        }
        let _ = self.child.wait();
        self.reaped = true;
    }

    /// Ends a helper that has not ended: kills the worker, so that its supervisor reaps it, reports
    /// and exits (no process is left to be reparented), then reaps the supervisor — killing it too
    /// if it does not exit at once.
    fn kill_and_reap(&mut self) {
        if self.reaped {
            return;
        }
        if let Some(worker) = &self.worker {
            // SAFETY: pidfd_send_signal on a pidfd this helper owns; no info struct.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    worker.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
            let deadline = Instant::now() + SUPERVISOR_GRACE;
            let mut rest = [0u8; 64];
            while let Ok(n) = read_some_by(&mut self.from_helper, &mut rest, deadline) {
                if n == 0 {
                    break;
                }
            }
        }
        // Without effect if the supervisor already exited (it is not reaped yet, so the pid is
        // still its own).
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }
}

/// How long a supervisor whose worker was killed may take to report and exit.
const SUPERVISOR_GRACE: Duration = Duration::from_secs(1);

/// A pidfd for `pid`, or `None` where the kernel has none (before 5.3).
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open with a pid and no flags returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a descriptor pidfd_open just returned, owned by nothing else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

fn exit_of(status: ExitStatus) -> HelperExit {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(signal) => HelperExit::Signal(signal),
        None => HelperExit::Code(status.code().unwrap_or(-1)),
    }
}

/// An invocation's input must fit one channel frame, as in process.
fn check_input(input: &[u8]) -> Result<(), JailError> {
    let max = crate::devices::channel::MAX_PAYLOAD as usize;
    match input.len() {
        len if len > max => Err(JailError::TooLarge {
            what: "input",
            len,
            max,
        }),
        _ => Ok(()),
    }
}

fn unexpected(message: Message) -> Attempt {
    JailError::Protocol(format!("an unexpected answer: {message:?}")).into()
}

/// Time allowed for writing a snapshot after the boot: scanning and writing guest memory.
fn snapshot_time(config: VmConfig) -> Duration {
    Duration::from_millis(10) * config.memory_mib
}

fn absolute(dir: &Path) -> Result<PathBuf, JailError> {
    let dir = std::path::absolute(dir).map_err(|e| JailError::Files(format!("{}: {e}", dir.display())))?;
    let len = dir.as_os_str().len();
    if len > MAX_PATH {
        return Err(JailError::TooLarge {
            what: "directory path",
            len,
            max: MAX_PATH,
        });
    }
    Ok(dir)
}

/// The directory a boot writes its snapshot into, created if missing (the helper's root).
fn staging_dir(dir: &Path) -> Result<PathBuf, JailError> {
    let dir = absolute(dir)?;
    fs::create_dir_all(&dir).map_err(|e| JailError::Files(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor this process owns (a pipe end of its child).
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until `fd` is ready for `events` or `deadline` passes (false).
fn wait_ready(fd: RawFd, events: libc::c_short, deadline: Instant) -> io::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        let mut pollfd = libc::pollfd { fd, events, revents: 0 };
        // SAFETY: one valid pollfd for the call.
        match unsafe { libc::poll(&mut pollfd, 1, ms) } {
            n if n > 0 => return Ok(true),
            0 => continue,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Reads what is there (at least a byte, or 0 at end of stream) by `deadline`.
fn read_some_by(from: &mut ChildStdout, buf: &mut [u8], deadline: Instant) -> Result<usize, ReadError> {
    loop {
        match from.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !wait_ready(from.as_raw_fd(), libc::POLLIN, deadline).map_err(ReadError::Io)? {
                    return Err(ReadError::Deadline);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

fn read_exact_by(from: &mut ChildStdout, buf: &mut [u8], deadline: Instant) -> Result<(), ReadError> {
    let mut filled = 0;
    while filled < buf.len() {
        match read_some_by(from, &mut buf[filled..], deadline)? {
            0 => return Err(ReadError::Closed),
            n => filled += n,
        }
    }
    Ok(())
}

enum WriteError {
    Closed,
    Deadline,
    Io(io::Error),
}

/// Writes all of `bytes` by `deadline`; on failure, how many bytes went through.
fn write_all_by(to: &mut ChildStdin, bytes: &[u8], deadline: Instant) -> Result<(), (usize, WriteError)> {
    let mut written = 0;
    while written < bytes.len() {
        match to.write(&bytes[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match wait_ready(to.as_raw_fd(), libc::POLLOUT, deadline) {
                    Ok(true) => {}
                    Ok(false) => return Err((written, WriteError::Deadline)),
                    Err(e) => return Err((written, WriteError::Io(e))),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err((written, WriteError::Closed)),
            Err(e) => return Err((written, WriteError::Io(e))),
        }
    }
    Ok(())
}

/// Reaps helpers that have answered, off the operation's path: a helper's exit — the VM's
/// teardown, its namespaces' — takes milliseconds the caller need not wait for. Dropping the jail
/// waits until every helper handed over is reaped; a helper that outlives its jail is reaped by
/// the thread that finishes with it.
struct Reaper {
    queue: Mutex<Option<mpsc::Sender<Helper>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for Reaper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Reaper")
    }
}

impl Reaper {
    fn start() -> Arc<Self> {
        let (queue, answered) = mpsc::channel::<Helper>();
        let thread = std::thread::Builder::new()
            .name("kiln-vm-reaper".into())
            .spawn(move || answered.into_iter().for_each(Helper::finish))
            .expect("cannot start the microVM helper reaper");
        Arc::new(Self {
            queue: Mutex::new(Some(queue)),
            thread: Mutex::new(Some(thread)),
        })
    }

    fn hand_over(&self, helper: Helper) {
        let queue = self.queue.lock().expect("reaper lock poisoned");
        let unqueued = match queue.as_ref() {
            Some(queue) => queue.send(helper).err().map(|mpsc::SendError(helper)| helper),
            None => Some(helper),
        };
        drop(queue);
        if let Some(helper) = unqueued {
            helper.finish();
        }
    }

    fn stop(&self) {
        self.queue.lock().expect("reaper lock poisoned").take();
        if let Some(thread) = self.thread.lock().expect("reaper lock poisoned").take() {
            let _ = thread.join();
        }
    }
}

/// Pre-started helpers and the thread that keeps their number up.
struct Pool {
    state: Arc<(Mutex<PoolState>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct PoolState {
    ready: VecDeque<Helper>,
    stop: bool,
}

impl Pool {
    fn start(shared: Arc<Shared>) -> Self {
        let state = Arc::new((Mutex::new(PoolState::default()), Condvar::new()));
        let thread = {
            let state = state.clone();
            std::thread::Builder::new()
                .name("kiln-vm-prestart".into())
                .spawn(move || Self::refill(&shared, &state))
                .expect("cannot start the microVM helper thread")
        };
        Self {
            state,
            thread: Some(thread),
        }
    }

    fn refill(shared: &Shared, state: &(Mutex<PoolState>, Condvar)) {
        let (lock, wake) = state;
        let want = shared.config.prestart;
        let mut guard = lock.lock().expect("pool lock poisoned");
        let mut failing = false;
        loop {
            while !guard.stop && guard.ready.len() >= want {
                guard = wake.wait(guard).expect("pool lock poisoned");
            }
            if guard.stop {
                break;
            }
            drop(guard);
            let started = spawn(shared);
            guard = lock.lock().expect("pool lock poisoned");
            match started {
                Ok(helper) => {
                    failing = false;
                    guard.ready.push_back(helper);
                }
                Err(e) => {
                    // Said once per run of failures; operations start their own helpers meanwhile.
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!("cannot pre-start a microVM helper (retrying every second): {e}");
                    }
                    // Try again in a second, or at once when a helper is taken or the pool stops.
                    guard = wake
                        .wait_timeout(guard, Duration::from_secs(1))
                        .expect("pool lock poisoned")
                        .0;
                }
            }
        }
        // Stopping: the ready helpers are killed and reaped as they drop.
        guard.ready.clear();
    }

    fn take(&self) -> Option<Helper> {
        let (lock, wake) = &*self.state;
        let helper = lock.lock().expect("pool lock poisoned").ready.pop_front();
        wake.notify_all();
        helper
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let (lock, wake) = &*self.state;
        lock.lock().expect("pool lock poisoned").stop = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
