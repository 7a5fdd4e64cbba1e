//! microVM sandboxes: a VM restored from the function's snapshot and left running in a jailed
//! helper (`kiln_vmm::jail::Session`), reached through streams over the host↔guest channel, and
//! suspended to disk as a snapshot of its own.
//!
//! # Streams
//! Each ingress request opens a stream (OPEN with the port): the guest agent connects it to
//! `127.0.0.1:<port>` inside the guest and answers with its first WINDOW. Bytes go as DATA frames,
//! at most [`STREAM_WINDOW`] unacknowledged each way; CLOSE 0 says a side sent all it will, CLOSE 1
//! resets. On the host a stream is one end of an in-memory duplex pipe, so hyper's HTTP/1.1 client
//! speaks to the guest's server over it as over a socket — websocket upgrades included.
//!
//! # Suspend points
//! A sandbox's VM files live in `<data>/sandboxes/vm/<id>/`:
//! - `run/` — where the running VM's helper works: `memory` and `state` are hard links to the
//!   point it started from (the function's snapshot, or its last suspend point), and a suspend
//!   writes `memory.next` and `state.tmp` beside them;
//! - `p-<sha256 of state>/` — a complete suspend point. After SUSPENDED the host renames the new
//!   files to `memory` and `state` inside `run/`, syncs, and renames `run/` to its point's name:
//!   the record names a point only once the directory is complete, so a crash leaves either the
//!   old point or the new one, never half of each. Points are immutable, so a fork is hard links.
//!
//! The point's name is checked against its `state` file before a resume (a changed state is
//! refused, never run). The memory file is not hashed: what is in it is the guest's own doing.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use kiln_vmm::devices::channel::STREAM_WINDOW;
use kiln_vmm::invocation::SEED_LEN;
use kiln_vmm::jail::protocol::{decode_frame, decode_header, Message, HEADER_LEN};
use kiln_vmm::jail::{Session, SuspendReport};
use kiln_vmm::persist::{MEMORY_FILE, NEXT_MEMORY_FILE, STATE_FILE, STATE_TMP_FILE};
use kiln_vmm::{Frame, FrameKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::invoke::MicrovmFunction;
use super::network;
use super::MicrovmTier;
use crate::digest::Digest;
use crate::identity::Identity;
use crate::outcome::InvokeError;
use crate::tier::wasm::egress::Rule;
use crate::tier::wasm::sandbox::IngressBody;
use crate::tier::wasm::trigger::GuestBody;

/// How long a VM may take to be restored and start (nested emulation is slow; hardware takes
/// milliseconds).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a suspend may take to write the VM's memory.
const SUSPEND_TIMEOUT: Duration = Duration::from_secs(300);
/// The header that picks another port of the guest than the sandbox's `ingress_port`.
pub const PORT_HEADER: &str = "x-kiln-port";

/// A running microVM sandbox: the helper's session and the task that reads from it.
pub struct LiveVm {
    handle: VmHandle,
    session: Mutex<Option<Session>>,
    pump: tokio::task::JoinHandle<()>,
    /// The restore hook's report, which the guest sends on its own after SESSION (the waiter is
    /// in place before the first frame is read).
    restored: Mutex<Option<oneshot::Receiver<HookReport>>>,
    /// The guest's network and the task that sends the stack's packets to the guest.
    network: Option<(kiln_netstack::Network, tokio::task::JoinHandle<()>)>,
}

/// What ingress uses to reach a live VM; cheap to clone.
#[derive(Clone)]
pub struct VmHandle {
    shared: Arc<Shared>,
}

struct Shared {
    sandbox: String,
    port: u16,
    to_helper: tokio::sync::Mutex<pipe::Sender>,
    streams: Mutex<HashMap<u32, mpsc::UnboundedSender<StreamEvent>>>,
    next_stream: AtomicU32,
    /// Set once a suspend began: no new stream opens.
    closing: AtomicBool,
    /// Told each time the last open stream closes.
    idle: tokio::sync::Notify,
    failure: OnceLock<String>,
    suspended: Mutex<Option<oneshot::Sender<SuspendReport>>>,
    /// Told the next HOOK report of the guest (one hook runs at a time).
    hook: Mutex<Option<oneshot::Sender<HookReport>>>,
    /// The guest's packets go here, to its network's stack (`network`).
    packets: Option<mpsc::Sender<Vec<u8>>>,
}

/// What a lifecycle hook of the image did.
#[derive(Debug)]
struct HookReport {
    status: i32,
    output: String,
}

/// The image's lifecycle hooks, numbered as the channel's HOOK frames number them.
#[derive(Clone, Copy, Debug)]
enum Hook {
    Restore = 1,
    Suspend = 2,
    Terminate = 3,
}

/// How long the host waits for a hook: the guest bounds each at 60 s at most.
const HOOK_PATIENCE: Duration = Duration::from_secs(70);

enum StreamEvent {
    Data(Bytes),
    /// A process's stderr.
    Stderr(Bytes),
    /// A process ended (its exit code), or a file stream finished (0 or an errno).
    Exit(ExitReport),
    Window(u32),
    /// The guest side sent all it will (`reset: false`), or the stream is gone.
    Closed {
        reset: bool,
        reason: String,
    },
}

/// How a process or file stream ended.
#[derive(Clone, Debug, PartialEq)]
pub struct ExitReport {
    /// A process's exit code (128 + the signal); for a file, 0 or the errno of the failure.
    pub status: i32,
    pub timed_out: bool,
    pub message: String,
}

/// What a stream carries besides its main byte stream, in order.
#[derive(Debug)]
pub enum Side {
    Stderr(Bytes),
    Exit(ExitReport),
    /// The stream ended without its exit: why (the VM's failure, or the guest's reset reason).
    Lost(String),
}

/// What a stream reaches in the guest (OPEN's target, see `kiln_vmm::devices::channel`).
pub enum Target<'a> {
    Port(u16),
    Process(&'a ExecSpec),
    WriteFile { path: &'a str, mode: u32 },
    ReadFile { path: &'a str },
}

/// A command to run in the guest.
#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub timeout: Option<Duration>,
    /// A pty of (cols, rows); pipes when `None`.
    pub pty: Option<(u16, u16)>,
}

impl Target<'_> {
    fn encode(&self) -> Result<Vec<u8>, String> {
        let text = |s: &str, what: &str| -> Result<Vec<u8>, String> {
            if s.contains('\0') {
                return Err(format!("{what} contains a NUL byte"));
            }
            Ok([s.as_bytes(), b"\0"].concat())
        };
        let mut out = Vec::new();
        match self {
            Target::Port(port) => {
                out.push(0);
                out.extend_from_slice(&port.to_le_bytes());
            }
            Target::Process(spec) => {
                out.push(1);
                let timeout_ms = spec
                    .timeout
                    .map_or(0, |t| t.as_millis().clamp(1, u32::MAX as u128) as u32);
                out.extend_from_slice(&timeout_ms.to_le_bytes());
                let (cols, rows) = spec.pty.unwrap_or((0, 0));
                out.push(spec.pty.is_some() as u8);
                out.extend_from_slice(&cols.to_le_bytes());
                out.extend_from_slice(&rows.to_le_bytes());
                out.extend(text(spec.cwd.as_deref().unwrap_or(""), "cwd")?);
                let argc = u16::try_from(spec.argv.len()).map_err(|_| "too many arguments".to_owned())?;
                out.extend_from_slice(&argc.to_le_bytes());
                for arg in &spec.argv {
                    out.extend(text(arg, "an argument")?);
                }
                for (key, value) in &spec.env {
                    if key.is_empty() || key.contains('=') {
                        return Err(format!("{key:?} is not an environment variable name"));
                    }
                    out.extend(text(&format!("{key}={value}"), "an environment variable")?);
                }
            }
            Target::WriteFile { path, mode } => {
                out.push(2);
                out.extend_from_slice(&mode.to_le_bytes());
                out.extend(text(path, "the path")?);
            }
            Target::ReadFile { path } => {
                out.push(3);
                out.extend(text(path, "the path")?);
            }
        }
        Ok(out)
    }
}

/// Why a stream did not open.
#[derive(Debug)]
pub enum OpenError {
    /// The VM cannot take it (gone, suspending): the invocation error says why.
    Vm(InvokeError),
    /// The guest refused the target: a file that cannot be opened (its errno and why), a
    /// connection refused.
    Refused(ExitReport),
    /// The VM has [`MAX_STREAMS`] open already.
    Busy(String),
}

/// Streams one VM carries at once (connections, execs, shells, files): each costs the guest a
/// socket, a process or a file and the host a task; past it a new one is refused (`429`).
pub const MAX_STREAMS: usize = 256;

/// An open stream to a process or a file in the guest: its main bytes through `io` (stdin and
/// stdout, or the file's content), the rest through `side`.
pub struct GuestStream {
    pub io: DuplexStream,
    pub side: mpsc::Receiver<Side>,
    id: u32,
    shared: Arc<Shared>,
}

impl GuestStream {
    /// Resizes the stream's pty.
    pub async fn resize(&self, cols: u16, rows: u16) {
        let mut frame = self.id.to_le_bytes().to_vec();
        frame.extend_from_slice(&cols.to_le_bytes());
        frame.extend_from_slice(&rows.to_le_bytes());
        let _ = self.shared.send_frame(FrameKind::Resize, frame).await;
    }
}

/// Where a live VM starts from.
pub enum Origin<'a> {
    /// The function's deploy-time snapshot (a new sandbox).
    Function(&'a MicrovmFunction),
    /// A suspend point of this sandbox (a resume, or a fork's first start).
    Point(&'a Digest),
}

impl MicrovmTier {
    /// The VM files of sandbox `id`.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.layout.root.join("sandboxes").join("vm").join(id)
    }

    /// Restores a VM for sandbox `id` from `origin` and leaves it running, its server started (or,
    /// from a suspend point, running as it was), its clock set and its randomness reseeded.
    pub async fn start_sandbox(
        &self,
        id: &str,
        origin: Origin<'_>,
        port: u16,
        env: &[(String, String)],
        egress: Vec<Rule>,
        identity: Identity,
    ) -> Result<LiveVm, String> {
        let Some(jail) = self.jail.clone() else {
            return Err(self.unavailable());
        };
        let root = self.sandbox_dir(id);
        let source = match origin {
            Origin::Function(function) => function.dir().to_path_buf(),
            Origin::Point(digest) => point_dir(&root, digest),
        };
        let expected = match origin {
            Origin::Point(digest) => Some(digest.clone()),
            Origin::Function(_) => None,
        };
        let mut entries = Vec::new();
        for (key, value) in env {
            entries.extend_from_slice(format!("{key}={value}").as_bytes());
            entries.push(0);
        }
        let seed: [u8; SEED_LEN] = rand::random();
        let clock = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let session = tokio::task::spawn_blocking(move || {
            let run = prepare_run(&root, &source, expected.as_ref()).map_err(|e| e.to_string())?;
            jail.start_session(&run, &seed, clock, &entries, START_TIMEOUT)
                .map_err(|e| format!("the sandbox's microVM did not start: {e}"))
        })
        .await
        .expect("microVM start task panicked")?;
        let live = LiveVm::new(id, port, session, egress, identity).map_err(|e| format!("the microVM's pipes: {e}"))?;
        // The guest answers its SESSION with the restore hook's report (status 0 without one).
        match live.hook_report(None).await {
            Ok(report) if report.status == 0 => Ok(live),
            Ok(report) => {
                live.stop().await;
                Err(format!(
                    "the image's restore hook failed (status {}): {}",
                    report.status, report.output
                ))
            }
            Err(reason) => {
                live.stop().await;
                Err(reason)
            }
        }
    }

    /// Suspends `live`: the VM's memory and state written as a new suspend point, the helper gone.
    /// Returns the point and its bytes on disk; on `Err` the VM runs on (a refusal) or is gone
    /// (a failure: see [`LiveVm::failure`]).
    pub async fn suspend_sandbox(&self, id: &str, live: &LiveVm) -> Result<(Digest, u64), String> {
        live.suspend().await?;
        let root = self.sandbox_dir(id);
        tokio::task::spawn_blocking(move || publish_point(&root).map_err(|e| format!("the suspend point: {e}")))
            .await
            .expect("microVM point task panicked")
    }

    /// Removes a suspend point no record names any more.
    pub async fn remove_point(&self, id: &str, digest: &Digest) {
        let dir = point_dir(&self.sandbox_dir(id), digest);
        let _ = tokio::task::spawn_blocking(move || fs::remove_dir_all(dir)).await;
    }

    /// Removes every VM file of sandbox `id` (terminated).
    pub async fn remove_sandbox(&self, id: &str) {
        let dir = self.sandbox_dir(id);
        let _ = tokio::task::spawn_blocking(move || fs::remove_dir_all(dir)).await;
    }

    /// Gives sandbox `to` the suspend point `digest` of sandbox `from`: hard links, since points
    /// never change.
    pub async fn copy_point(&self, from: &str, to: &str, digest: &Digest) -> Result<(), String> {
        let source = point_dir(&self.sandbox_dir(from), digest);
        let target = point_dir(&self.sandbox_dir(to), digest);
        tokio::task::spawn_blocking(move || link_point(&source, &target).map_err(|e| e.to_string()))
            .await
            .expect("microVM point task panicked")
    }

    /// Start-up: removes what is not a sandbox's current point (a crash's `run/`, replaced points)
    /// and the directories of sandboxes that have none.
    pub fn sweep_sandboxes(&self, current: &HashMap<String, Option<Digest>>) {
        let root = self.layout.root.join("sandboxes").join("vm");
        let Ok(entries) = fs::read_dir(&root) else { return };
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            let keep = current.get(&id).cloned().flatten().map(|d| point_name(&d));
            if keep.is_none() {
                let _ = fs::remove_dir_all(entry.path());
                continue;
            }
            for inner in fs::read_dir(entry.path()).into_iter().flatten().flatten() {
                if Some(inner.file_name().to_string_lossy().as_ref()) != keep.as_deref() {
                    let _ = fs::remove_dir_all(inner.path());
                }
            }
        }
    }
}

fn point_name(digest: &Digest) -> String {
    format!("p-{}", digest.hex())
}

fn point_dir(root: &Path, digest: &Digest) -> PathBuf {
    root.join(point_name(digest))
}

/// A fresh `run/` with `source`'s memory and state linked in (checked against `expected` first).
fn prepare_run(root: &Path, source: &Path, expected: Option<&Digest>) -> io::Result<PathBuf> {
    if let Some(expected) = expected {
        let state = fs::read(source.join(STATE_FILE))?;
        if Digest::of(&state) != *expected {
            return Err(io::Error::other(format!(
                "the suspend point {} does not match its state file: refused",
                source.display()
            )));
        }
    }
    let run = root.join("run");
    let _ = fs::remove_dir_all(&run);
    fs::create_dir_all(&run)?;
    for name in [MEMORY_FILE, STATE_FILE] {
        fs::hard_link(source.join(name), run.join(name))?;
    }
    Ok(run)
}

/// Makes `run/`'s new snapshot the sandbox's next point; returns its digest and bytes on disk.
fn publish_point(root: &Path) -> io::Result<(Digest, u64)> {
    use std::os::unix::fs::MetadataExt;
    let run = root.join("run");
    let state = fs::read(run.join(STATE_TMP_FILE))?;
    let digest = Digest::of(&state);
    fs::rename(run.join(NEXT_MEMORY_FILE), run.join(MEMORY_FILE))?;
    fs::rename(run.join(STATE_TMP_FILE), run.join(STATE_FILE))?;
    let memory = fs::metadata(run.join(MEMORY_FILE))?;
    sync_dir(&run)?;
    let point = point_dir(root, &digest);
    let _ = fs::remove_dir_all(&point);
    fs::rename(&run, &point)?;
    sync_dir(root)?;
    Ok((digest, memory.blocks() * 512 + state.len() as u64))
}

fn link_point(source: &Path, target: &Path) -> io::Result<()> {
    let tmp = target.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    for name in [MEMORY_FILE, STATE_FILE] {
        fs::hard_link(source.join(name), tmp.join(name))?;
    }
    sync_dir(&tmp)?;
    fs::rename(&tmp, target)?;
    sync_dir(target.parent().expect("a point has a parent"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

impl LiveVm {
    fn new(sandbox: &str, port: u16, session: Session, egress: Vec<Rule>, identity: Identity) -> io::Result<LiveVm> {
        let (to, from) = session.pipes()?;
        let (restored_tx, restored) = oneshot::channel();
        // A network the guest had before (a suspend point's) is not resumed: its connections
        // end, reset, the next time it uses them.
        let network = match network::start(egress, sandbox, Some(identity)) {
            Ok(network) => Some(network),
            Err(e) => {
                tracing::warn!(sandbox, error = %e, "the sandbox's microVM runs without a network");
                None
            }
        };
        let shared = Arc::new(Shared {
            sandbox: sandbox.to_owned(),
            port,
            to_helper: tokio::sync::Mutex::new(pipe::Sender::from_owned_fd(to)?),
            streams: Mutex::new(HashMap::new()),
            next_stream: AtomicU32::new(1),
            closing: AtomicBool::new(false),
            idle: tokio::sync::Notify::new(),
            failure: OnceLock::new(),
            suspended: Mutex::new(None),
            hook: Mutex::new(Some(restored_tx)),
            packets: network.as_ref().map(|n| n.from_guest.clone()),
        });
        let from = pipe::Receiver::from_owned_fd(from)?;
        let pump = tokio::spawn(pump(shared.clone(), from));
        let network = network.map(|network| {
            let network::GuestNetwork {
                network, mut to_guest, ..
            } = network;
            let shared = shared.clone();
            let forward = tokio::spawn(async move {
                while let Some(packet) = to_guest.recv().await {
                    if shared.send_frame(FrameKind::Packet, packet).await.is_err() {
                        return;
                    }
                }
            });
            (network, forward)
        });
        Ok(LiveVm {
            handle: VmHandle { shared },
            session: Mutex::new(Some(session)),
            pump,
            restored: Mutex::new(Some(restored)),
            network,
        })
    }

    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    pub fn failure(&self) -> Option<String> {
        self.handle.shared.failure.get().cloned()
    }

    /// Resets every open connection (a graceful stop suspends regardless of them).
    pub fn reset_streams(&self, reason: &str) {
        self.handle.shared.close_all(reason);
    }

    /// Closes the VM to new connections and waits up to `grace` for the open ones to end: a
    /// suspend must not cut one short. Still open after it, the VM opens again and says so.
    pub async fn quiesce(&self, grace: Duration) -> Result<(), String> {
        let shared = &self.handle.shared;
        shared.closing.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let closed = shared.idle.notified();
            let open = shared.streams.lock().expect("streams lock poisoned").len();
            if open == 0 {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, closed).await.is_err() {
                shared.closing.store(false, Ordering::SeqCst);
                return Err(format!(
                    "{open} connection(s) to it stayed open for {grace:?}; close them first"
                ));
            }
        }
    }

    /// Runs `hook` in the guest (or, with `None`, waits for the report the guest sends on its
    /// own: the restore hook's, after a SESSION).
    async fn hook_report(&self, hook: Option<Hook>) -> Result<HookReport, String> {
        let shared = &self.handle.shared;
        let told = match hook {
            None => self
                .restored
                .lock()
                .expect("restored lock poisoned")
                .take()
                .ok_or("the restore hook's report was awaited twice")?,
            Some(hook) => {
                let (tell, told) = oneshot::channel();
                *shared.hook.lock().expect("hook lock poisoned") = Some(tell);
                if shared.send_frame(FrameKind::Hook, vec![hook as u8]).await.is_err() {
                    return Err(self.failure().unwrap_or_else(|| "the microVM is gone".into()));
                }
                told
            }
        };
        match tokio::time::timeout(HOOK_PATIENCE, told).await {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(_)) => Err(self.failure().unwrap_or_else(|| "the microVM is gone".into())),
            Err(_) => Err(format!(
                "the guest did not report its {:?} hook within {HOOK_PATIENCE:?}",
                hook.unwrap_or(Hook::Restore)
            )),
        }
    }

    /// Runs the image's terminate hook (its failure is logged: the VM ends regardless), then
    /// ends the VM.
    pub async fn terminate(self) {
        match self.hook_report(Some(Hook::Terminate)).await {
            Ok(report) if report.status == 0 => {}
            Ok(report) => tracing::warn!(
                sandbox = %self.handle.shared.sandbox, status = report.status, output = %report.output,
                "the image's terminate hook failed"
            ),
            Err(reason) => tracing::warn!(sandbox = %self.handle.shared.sandbox, %reason, "no terminate hook report"),
        }
        self.stop().await;
    }

    /// Asks the helper for a snapshot (after [`LiveVm::quiesce`]) and waits for it; the image's
    /// suspend hook runs first (its failure is logged: the suspend goes on).
    async fn suspend(&self) -> Result<SuspendReport, String> {
        let shared = &self.handle.shared;
        shared.closing.store(true, Ordering::SeqCst);
        match self.hook_report(Some(Hook::Suspend)).await {
            Ok(report) if report.status == 0 => {}
            Ok(report) => tracing::warn!(
                sandbox = %shared.sandbox, status = report.status, output = %report.output,
                "the image's suspend hook failed; suspending regardless"
            ),
            Err(reason) => {
                // The VM runs on (if it still can): it takes connections again.
                shared.closing.store(false, Ordering::SeqCst);
                return Err(reason);
            }
        }
        let (tell, told) = oneshot::channel();
        *shared.suspended.lock().expect("suspend lock poisoned") = Some(tell);
        if shared.send(Message::Suspend).await.is_err() {
            return Err(self.failure().unwrap_or_else(|| "the microVM is gone".into()));
        }
        match tokio::time::timeout(SUSPEND_TIMEOUT, told).await {
            Ok(Ok(report)) => {
                tracing::info!(
                    sandbox = %shared.sandbox,
                    memory_mib = report.memory_size >> 20,
                    snapshot_ms = report.snapshot.as_millis() as u64,
                    "microVM sandbox snapshotted"
                );
                if let Some(session) = self.session.lock().expect("session lock poisoned").take() {
                    session.finish();
                }
                Ok(report)
            }
            Ok(Err(_)) => Err(self.failure().unwrap_or_else(|| "the microVM is gone".into())),
            Err(_) => {
                let reason = format!("its snapshot took longer than {SUSPEND_TIMEOUT:?}");
                let _ = shared.failure.set(reason.clone());
                Err(reason)
            }
        }
    }

    /// Ends the VM: its helper is killed, every stream reset.
    pub async fn stop(self) {
        self.pump.abort();
        let session = self.session.lock().expect("session lock poisoned").take();
        if let Some(session) = session {
            // Killing and reaping the helper blocks for a moment.
            let _ = tokio::task::spawn_blocking(move || drop(session)).await;
        }
        self.handle.shared.close_all("the sandbox stopped");
    }
}

impl Drop for LiveVm {
    fn drop(&mut self) {
        self.pump.abort();
        if let Some((_, forward)) = &self.network {
            forward.abort();
        }
        // Killing and reaping a helper blocks for a moment: not on an async thread.
        let session = self.session.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let (Some(session), Ok(runtime)) = (session, tokio::runtime::Handle::try_current()) {
            runtime.spawn_blocking(move || drop(session));
        }
    }
}

impl Shared {
    async fn send(&self, message: Message) -> io::Result<()> {
        let bytes = message.encode();
        self.to_helper.lock().await.write_all(&bytes).await
    }

    async fn send_frame(&self, kind: FrameKind, payload: Vec<u8>) -> io::Result<()> {
        self.send(Message::ToGuest(Frame::new(kind, payload))).await
    }

    /// Forgets stream `id`; wakes a suspend waiting for the last one.
    fn remove(&self, id: u32) {
        let mut streams = self.streams.lock().expect("streams lock poisoned");
        streams.remove(&id);
        if streams.is_empty() {
            self.idle.notify_waiters();
        }
    }

    fn close_all(&self, reason: &str) {
        let streams = std::mem::take(&mut *self.streams.lock().expect("streams lock poisoned"));
        self.idle.notify_waiters();
        for (_, events) in streams {
            let _ = events.send(StreamEvent::Closed {
                reset: true,
                reason: reason.to_owned(),
            });
        }
    }

    fn fail(&self, reason: String) {
        tracing::warn!(sandbox = %self.sandbox, %reason, "microVM sandbox failed");
        let _ = self.failure.set(reason);
        let reason = self.failure.get().cloned().unwrap_or_default();
        self.close_all(&reason);
        self.suspended.lock().expect("suspend lock poisoned").take();
        self.hook.lock().expect("hook lock poisoned").take();
    }
}

/// Reads the helper's frames until its pipe ends, and hands each to its stream.
async fn pump(shared: Arc<Shared>, mut from: pipe::Receiver) {
    loop {
        let mut header = [0u8; HEADER_LEN];
        if from.read_exact(&mut header).await.is_err() {
            return shared.fail("the microVM's helper exited".into());
        }
        let len = match decode_header(&header) {
            Ok((_, len)) => len,
            Err(e) => return shared.fail(format!("the microVM's helper broke the protocol: {e}")),
        };
        let mut frame = header.to_vec();
        frame.resize(HEADER_LEN + len, 0);
        if from.read_exact(&mut frame[HEADER_LEN..]).await.is_err() {
            return shared.fail("the microVM's helper exited".into());
        }
        match decode_frame(&frame) {
            Ok(Message::FromGuest(frame)) => guest_frame(&shared, frame),
            Ok(Message::Suspended(report)) => {
                if let Some(tell) = shared.suspended.lock().expect("suspend lock poisoned").take() {
                    let _ = tell.send(report);
                }
                return;
            }
            Ok(Message::Failed(failure)) => {
                return shared.fail(format!(
                    "the microVM failed: {}",
                    kiln_vmm::jail::JailError::from_failure(failure)
                ));
            }
            Ok(Message::Exited(exit)) => return shared.fail(format!("the microVM's helper ended: {exit:?}")),
            Ok(other) => return shared.fail(format!("the microVM's helper sent {other:?}")),
            Err(e) => return shared.fail(format!("the microVM's helper broke the protocol: {e}")),
        }
    }
}

fn guest_frame(shared: &Shared, frame: Frame) {
    if frame.kind == FrameKind::Log {
        let text = String::from_utf8_lossy(&frame.payload);
        for line in text.lines() {
            tracing::info!(sandbox = %shared.sandbox, "{line}");
        }
        return;
    }
    if frame.kind == FrameKind::Packet {
        // IP: a packet the stack has no room for is dropped, and TCP sends it again.
        if let Some(packets) = &shared.packets {
            let _ = packets.try_send(frame.payload);
        }
        return;
    }
    if frame.kind == FrameKind::Hook {
        let status = frame
            .payload
            .get(1..5)
            .map_or(-1, |s| i32::from_le_bytes(s.try_into().expect("4 bytes")));
        let output = String::from_utf8_lossy(frame.payload.get(5..).unwrap_or_default()).into_owned();
        for line in output.lines() {
            tracing::info!(sandbox = %shared.sandbox, hook = frame.payload.first().copied().unwrap_or(0), "{line}");
        }
        if let Some(tell) = shared.hook.lock().expect("hook lock poisoned").take() {
            let _ = tell.send(HookReport { status, output });
        }
        return;
    }
    let Some((id, body)) = frame.payload.split_first_chunk::<4>() else {
        return;
    };
    let id = u32::from_le_bytes(*id);
    let event = match frame.kind {
        FrameKind::Data => StreamEvent::Data(Bytes::copy_from_slice(body)),
        FrameKind::Stderr => StreamEvent::Stderr(Bytes::copy_from_slice(body)),
        FrameKind::Exit => StreamEvent::Exit(ExitReport {
            status: body.first_chunk::<4>().map_or(-1, |s| i32::from_le_bytes(*s)),
            timed_out: body.get(4) == Some(&1),
            message: String::from_utf8_lossy(body.get(5..).unwrap_or_default()).into_owned(),
        }),
        FrameKind::Window => match body.first_chunk::<4>() {
            Some(credit) => StreamEvent::Window(u32::from_le_bytes(*credit)),
            None => return,
        },
        FrameKind::Close => StreamEvent::Closed {
            reset: body.first() != Some(&0),
            reason: String::from_utf8_lossy(body.get(1..).unwrap_or_default()).into_owned(),
        },
        _ => return,
    };
    let reset = matches!(event, StreamEvent::Closed { reset: true, .. } | StreamEvent::Exit(_));
    if let Some(events) = shared.streams.lock().expect("streams lock poisoned").get(&id) {
        let _ = events.send(event);
    }
    if reset {
        shared.remove(id);
    }
}

impl VmHandle {
    /// Why the VM cannot serve any more, once it cannot.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.get().cloned()
    }

    /// Serves one ingress request through a new stream to the guest's server on `port` (or the
    /// sandbox's own). A websocket upgrade the guest accepts is relayed both ways; `hold` is kept
    /// until the stream closes. A server that has not answered within `timeout` is a `Timeout`
    /// for this request only: the VM runs on.
    pub async fn request(
        &self,
        mut request: http::Request<IngressBody>,
        port: Option<u16>,
        hold: Option<OwnedSemaphorePermit>,
        timeout: Duration,
    ) -> Result<http::Response<GuestBody>, InvokeError> {
        let port = port.unwrap_or(self.shared.port);
        let upgrade = is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
        let io = self.open(port, hold).await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| InvokeError::failed(format!("the sandbox's server: {e}")))?;
        tokio::spawn(connection.with_upgrades());
        let mut response = match tokio::time::timeout(timeout, sender.send_request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => return Err(InvokeError::failed(format!("the sandbox's server did not answer: {e}"))),
            Err(_) => return Err(InvokeError::Timeout(timeout.as_millis() as u64)),
        };
        if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client) = upgrade {
                let guest = hyper::upgrade::on(&mut response);
                tokio::spawn(async move {
                    if let (Ok(client), Ok(guest)) = (client.await, guest.await) {
                        let (mut client, mut guest) = (TokioIo::new(client), TokioIo::new(guest));
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut guest).await;
                    }
                });
            }
        }
        Ok(response.map(|body| GuestBody::streamed(body.map_err(wasmtime_wasi_http::Error::from).boxed_unsync())))
    }

    /// Opens a stream to `port` in the guest; waits until the guest connected it.
    async fn open(&self, port: u16, hold: Option<OwnedSemaphorePermit>) -> Result<DuplexStream, InvokeError> {
        match self.open_stream(&Target::Port(port), hold, DropWith::Reset).await {
            Ok(stream) => Ok(stream.io),
            Err(OpenError::Vm(e)) => Err(e),
            Err(OpenError::Refused(exit)) => {
                Err(InvokeError::failed(format!("the sandbox's server: {}", exit.message)))
            }
            Err(OpenError::Busy(_)) => Err(InvokeError::FunctionBusy(
                self.shared.sandbox.clone(),
                MAX_STREAMS as u32,
            )),
        }
    }

    /// Starts a process in the guest: an exec on pipes, or a shell on a pty. Dropping the stream
    /// before the process ended kills it, unless `detach` says it runs on.
    pub async fn exec(&self, spec: &ExecSpec, detach: bool) -> Result<GuestStream, OpenError> {
        let drop_with = if detach { DropWith::Detach } else { DropWith::Reset };
        self.open_stream(&Target::Process(spec), None, drop_with).await
    }

    /// Opens a file in the guest to write (`mode`) or read: its content goes through the
    /// stream's `io`; the end (0, or the errno of the failure) comes as the side's `Exit`.
    pub async fn file(&self, path: &str, write: Option<u32>) -> Result<GuestStream, OpenError> {
        let target = match write {
            Some(mode) => Target::WriteFile { path, mode },
            None => Target::ReadFile { path },
        };
        self.open_stream(&target, None, DropWith::Reset).await
    }

    /// Opens a stream to `target`; waits until the guest took it.
    async fn open_stream(
        &self,
        target: &Target<'_>,
        hold: Option<OwnedSemaphorePermit>,
        drop_with: DropWith,
    ) -> Result<GuestStream, OpenError> {
        let shared = &self.shared;
        let gone = || {
            OpenError::Vm(InvokeError::failed(
                self.failure().unwrap_or_else(|| "the microVM is gone".into()),
            ))
        };
        if let Some(reason) = shared.failure.get() {
            return Err(OpenError::Vm(InvokeError::failed(reason.clone())));
        }
        if shared.closing.load(Ordering::SeqCst) {
            return Err(OpenError::Vm(InvokeError::failed(
                "the sandbox is being suspended".into(),
            )));
        }
        let encoded = target.encode().map_err(|e| OpenError::Vm(InvokeError::failed(e)))?;
        let id = shared.next_stream.fetch_add(1, Ordering::Relaxed);
        let (events_tx, mut events) = mpsc::unbounded_channel();
        {
            let mut streams = shared.streams.lock().expect("streams lock poisoned");
            if streams.len() >= MAX_STREAMS {
                return Err(OpenError::Busy(format!(
                    "sandbox {} has its maximum of {MAX_STREAMS} connections, execs, shells and file transfers open",
                    shared.sandbox
                )));
            }
            streams.insert(id, events_tx);
        }
        let mut open = id.to_le_bytes().to_vec();
        open.extend_from_slice(&encoded);
        if shared.send_frame(FrameKind::Open, open).await.is_err() {
            shared.remove(id);
            return Err(gone());
        }
        let credit = match events.recv().await {
            Some(StreamEvent::Window(credit)) => credit,
            Some(StreamEvent::Closed { reason, .. }) => {
                shared.remove(id);
                return Err(OpenError::Refused(ExitReport {
                    status: -1,
                    timed_out: false,
                    message: reason,
                }));
            }
            Some(StreamEvent::Exit(exit)) => {
                shared.remove(id);
                return Err(OpenError::Refused(exit));
            }
            _ => {
                shared.remove(id);
                return Err(OpenError::Vm(InvokeError::failed("the sandbox's stream broke".into())));
            }
        };
        let (app, kiln) = tokio::io::duplex(STREAM_WINDOW as usize);
        let (side_tx, side) = mpsc::channel(16);
        let link = Link {
            shared: shared.clone(),
            id,
            side: side_tx,
            drop_with,
            ends_with_exit: !matches!(target, Target::Port(_)),
            _hold: hold,
        };
        tokio::spawn(bridge(link, kiln, events, credit));
        Ok(GuestStream {
            io: app,
            side,
            id,
            shared: shared.clone(),
        })
    }
}

/// What the guest is told when the host's end of a stream goes away first.
#[derive(Clone, Copy)]
enum DropWith {
    /// CLOSE 1: the connection is reset, a process killed.
    Reset,
    /// CLOSE 2: a process runs on, its output dropped.
    Detach,
}

/// One stream's ties to its VM, held by its bridge.
struct Link {
    shared: Arc<Shared>,
    id: u32,
    side: mpsc::Sender<Side>,
    drop_with: DropWith,
    /// A process or a file: the stream ends with the guest's EXIT, not when both sides closed.
    ends_with_exit: bool,
    _hold: Option<OwnedSemaphorePermit>,
}

/// Relays one stream between its duplex end and the guest, within the credit each side gives.
async fn bridge(link: Link, kiln: DuplexStream, mut events: mpsc::UnboundedReceiver<StreamEvent>, mut credit: u32) {
    let Link {
        shared,
        id,
        side,
        drop_with,
        ends_with_exit,
        ..
    } = &link;
    let id = *id;
    let (mut from_app, mut to_app) = tokio::io::split(kiln);
    let mut buf = vec![0u8; 64 << 10];
    let (mut sent_all, mut received_all) = (false, false);
    let window = |n: usize| {
        let mut window = id.to_le_bytes().to_vec();
        window.extend_from_slice(&(n as u32).to_le_bytes());
        window
    };
    // Why the stream ended without the guest's EXIT, for a process or file stream's user.
    let mut lost = None;
    let reset = loop {
        if sent_all && received_all && !ends_with_exit {
            break false;
        }
        let room = (credit as usize).min(buf.len());
        tokio::select! {
            read = from_app.read(&mut buf[..room]), if room > 0 && !sent_all => match read {
                Ok(0) | Err(_) => {
                    sent_all = true;
                    let mut close = id.to_le_bytes().to_vec();
                    close.push(0);
                    if shared.send_frame(FrameKind::Close, close).await.is_err() {
                        lost = Some(helper_gone(shared));
                        break true;
                    }
                }
                Ok(n) => {
                    credit -= n as u32;
                    let mut data = id.to_le_bytes().to_vec();
                    data.extend_from_slice(&buf[..n]);
                    if shared.send_frame(FrameKind::Data, data).await.is_err() {
                        lost = Some(helper_gone(shared));
                        break true;
                    }
                }
            },
            event = events.recv() => match event {
                Some(StreamEvent::Data(bytes)) => {
                    if to_app.write_all(&bytes).await.is_err() {
                        break true;
                    }
                    if shared.send_frame(FrameKind::Window, window(bytes.len())).await.is_err() {
                        lost = Some(helper_gone(shared));
                        break true;
                    }
                }
                Some(StreamEvent::Stderr(bytes)) => {
                    let n = bytes.len();
                    if side.send(Side::Stderr(bytes)).await.is_err() {
                        break true;
                    }
                    if shared.send_frame(FrameKind::Window, window(n)).await.is_err() {
                        lost = Some(helper_gone(shared));
                        break true;
                    }
                }
                Some(StreamEvent::Exit(exit)) => {
                    // The guest is done with the stream: what the app reads ends here.
                    let _ = to_app.shutdown().await;
                    let _ = side.send(Side::Exit(exit)).await;
                    break false;
                }
                Some(StreamEvent::Window(more)) => credit = credit.saturating_add(more),
                Some(StreamEvent::Closed { reset: false, .. }) => {
                    received_all = true;
                    let _ = to_app.shutdown().await;
                }
                Some(StreamEvent::Closed { reset: true, reason }) => {
                    lost = Some(if reason.is_empty() { "the guest reset the stream".into() } else { reason });
                    break false;
                }
                None => {
                    lost = Some(shared.failure.get().cloned().unwrap_or_else(|| "the stream was dropped".into()));
                    break false;
                }
            },
            // The host's user of a process or file stream went away before its end.
            () = side.closed(), if *ends_with_exit => break true,
        }
    };
    if let (Some(reason), true) = (lost, *ends_with_exit) {
        // What the app reads ends here; the side says why (a full side loses the reason only).
        let _ = to_app.shutdown().await;
        let _ = side.try_send(Side::Lost(reason));
    }
    if reset {
        let mut close = id.to_le_bytes().to_vec();
        close.push(match drop_with {
            DropWith::Reset => 1,
            DropWith::Detach => 2,
        });
        let _ = shared.send_frame(FrameKind::Close, close).await;
    }
    shared.remove(id);
}

/// Why a frame could not be sent: the helper's recorded failure, or its pipe closing.
fn helper_gone(shared: &Shared) -> String {
    shared
        .failure
        .get()
        .cloned()
        .unwrap_or_else(|| "the microVM's helper stopped taking frames".into())
}

/// Whether the client asks to switch protocols (a websocket).
fn is_upgrade<B>(request: &http::Request<B>) -> bool {
    request
        .headers()
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
        && request.headers().contains_key(http::header::UPGRADE)
}
