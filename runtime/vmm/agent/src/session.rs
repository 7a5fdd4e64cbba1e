//! The agent's session mode: a sandbox's VM, kept running, with many streams through the channel
//! (frames `SESSION`, `OPEN`, `DATA`, `CLOSE`, `WINDOW`, `EXIT`, `STDERR`, `RESIZE`, `HOOK` of
//! `kiln-vmm`'s `devices::channel`).
//!
//! The function runs as the sandbox's server (started at boot for an image with a command, else
//! on the first SESSION; its environment: the image's, then the session's entries). Each stream
//! the host OPENs is one of:
//! - a TCP connection relayed to `127.0.0.1:<port>` inside the guest (ingress);
//! - a process — an exec on pipes, or a shell on a pty — whose stdin is the stream's DATA and
//!   whose stdout and stderr come back as DATA and STDERR, then its EXIT;
//! - a file written from the stream's DATA (committed by a rename at the host's CLOSE 0), or read
//!   into it.
//!
//! A SESSION after a restore (a resumed sandbox) sets the clock, forgets the streams of the
//! previous life — their host ends are gone — and leaves the server running as it was; every
//! SESSION runs the image's restore hook and answers with its HOOK.
//!
//! One thread, one `poll` loop: the host's frames are found by reading the channel's status port
//! (it has no interrupt), so the loop polls its descriptors with a short timeout — 1 ms right
//! after any traffic, doubling to 20 ms while idle — and looks at the port between polls.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::process::{self, ExecRequest, Hook, Image, Process};
use crate::{reseed, Channel, CLOSE, DATA, EXIT, HOOK, LOG, OPEN, PACKET, RESEED, RESIZE, SESSION, STDERR, WINDOW};

/// Bytes a sender may have unacknowledged on one stream (the host's `STREAM_WINDOW`).
const STREAM_WINDOW: u32 = 256 << 10;
/// Credit is returned once this much was consumed (or the queue ran dry).
const WINDOW_STEP: u32 = 64 << 10;
/// How long a stream may wait for the server to listen (it may still be starting).
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);
/// How long a process's outputs may stay open after it ended (a background child holding them).
const OUTPUT_GRACE: Duration = Duration::from_secs(1);
/// The largest file a stream reads (the host bounds what it writes).
const MAX_FILE: u64 = 64 << 20;
const POLL_FAST: i32 = 1;
const POLL_IDLE: i32 = 20;

/// OPEN's target tags.
const TARGET_TCP: u8 = 0;
const TARGET_PROCESS: u8 = 1;
const TARGET_WRITE_FILE: u8 = 2;
const TARGET_READ_FILE: u8 = 3;

/// What a stream is connected to in the guest.
enum Endpoint {
    Tcp {
        port: u16,
        socket: Option<TcpStream>,
        opened: Instant,
    },
    Process(Box<Process>),
    WriteFile {
        file: File,
        tmp: PathBuf,
        path: PathBuf,
        mode: u32,
        error: Option<io::Error>,
    },
    ReadFile(File),
}

/// One stream.
struct Stream {
    endpoint: Endpoint,
    /// Bytes from the host not yet written to the endpoint.
    to_app: VecDeque<u8>,
    /// Bytes written to the endpoint since the last WINDOW sent to the host.
    consumed: u32,
    /// Bytes the host will still take from us.
    credit: u32,
    /// The host will send no more: shut our write side once `to_app` is empty.
    host_done: bool,
    /// The endpoint's output ended: we sent CLOSE 0.
    app_done: bool,
    /// A process's stderr ended (or it has none).
    errors_done: bool,
    /// Our write side to the endpoint is shut (after the host's CLOSE 0 and the queue drained).
    shut: bool,
    /// The host went away but asked the process to run on: its output is dropped.
    detached: bool,
}

/// The sandbox's server process, and the pipe its output comes through.
pub struct Server {
    child: Child,
    output: OwnedFd,
}

impl Server {
    /// Whether the server has ended (without reaping it: its end is told in session mode).
    pub fn has_exited(&self) -> bool {
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes into a valid siginfo; WNOWAIT leaves the child to be reaped later.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                self.child.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is valid to read after a successful waitid.
        rc == 0 && unsafe { info.si_pid() } != 0
    }
}

pub fn run(
    channel: &mut Channel,
    first: &[u8],
    image: &Image,
    server: Option<Server>,
    network: Result<File, String>,
) -> ! {
    channel.use_bulk();
    let tun = match network {
        Ok(tun) => Some(tun),
        Err(message) => {
            if !message.is_empty() {
                let _ = channel.send(LOG, message.as_bytes());
            }
            None
        }
    };
    let mut session = Session {
        streams: HashMap::new(),
        server,
        exited: None,
        image: image.clone(),
        started: false,
        tun,
    };
    session.begin(channel, first);
    let mut timeout = POLL_FAST;
    loop {
        process::reap_orphans();
        let mut active = session.host_frames(channel);
        active |= session.poll_streams(channel, timeout);
        timeout = if active {
            POLL_FAST
        } else {
            (timeout * 2).min(POLL_IDLE)
        };
    }
}

struct Session {
    streams: HashMap<u32, Stream>,
    server: Option<Server>,
    /// How the server ended, once it has.
    exited: Option<String>,
    image: Image,
    /// The server was started (at boot or by a SESSION): it is not started again.
    started: bool,
    /// The network interface's TUN (`crate::network`), whose packets go to the host as PACKET
    /// frames and come back the same way.
    tun: Option<File>,
}

impl Session {
    /// A SESSION frame: clock, environment, a clean slate of streams, the restore hook.
    fn begin(&mut self, channel: &mut Channel, payload: &[u8]) {
        if let Some(clock) = payload.first_chunk::<8>() {
            set_clock(u64::from_le_bytes(*clock));
        }
        // Every stream belonged to the host of a previous life.
        self.streams.clear();
        let extra = parse_env(payload.get(8..).unwrap_or_default());
        // The sandbox's environment adds to the image's (exactly these reach the server).
        self.image.env.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
        self.image.env.extend(extra);
        if self.server.is_none() && !self.started {
            self.started = true;
            match start_server(&self.image) {
                Ok(server) => self.server = Some(server),
                Err(e) => {
                    let message = format!("kiln-agent: cannot start {}: {e}\n", self.image.command[0]);
                    let _ = channel.send(LOG, message.as_bytes());
                    self.exited = Some(message);
                }
            }
        }
        self.started = true;
        let (status, output) = process::run_hook(&self.image, Hook::Restore);
        let _ = channel.send(HOOK, &hook_report(Hook::Restore, status, &output));
    }

    /// Handles every frame the host has queued; true if there was any.
    fn host_frames(&mut self, channel: &mut Channel) -> bool {
        let queued = channel.status();
        if queued == 0 {
            return false;
        }
        let mut bytes = vec![0u8; queued as usize];
        channel.read_queued(&mut bytes);
        let mut rest = bytes.as_slice();
        while let Some((header, tail)) = rest.split_first_chunk::<5>() {
            let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
            let Some(payload) = tail.get(..len) else { break };
            self.host_frame(channel, header[4], payload);
            rest = &tail[len..];
        }
        true
    }

    fn host_frame(&mut self, channel: &mut Channel, kind: u8, payload: &[u8]) {
        let (id, body) = match payload.split_first_chunk::<4>() {
            Some((id, body)) => (u32::from_le_bytes(*id), body),
            None => (0, payload),
        };
        match kind {
            SESSION => self.begin(channel, payload),
            RESEED => {
                if let Err(e) = reseed(payload) {
                    let _ = channel.send(LOG, format!("kiln-agent: cannot reseed: {e}\n").as_bytes());
                }
            }
            HOOK => {
                if let Some(hook) = payload.first().copied().and_then(Hook::from_byte) {
                    let (status, output) = process::run_hook(&self.image, hook);
                    let _ = channel.send(HOOK, &hook_report(hook, status, &output));
                }
            }
            OPEN => self.open(channel, id, body),
            PACKET => {
                // IP: a packet the interface cannot take now is dropped, and TCP sends it again.
                if let Some(tun) = &mut self.tun {
                    let _ = tun.write(payload);
                }
            }
            DATA => {
                if let Some(stream) = self.streams.get_mut(&id) {
                    if let Endpoint::WriteFile { file, error, .. } = &mut stream.endpoint {
                        // A file takes what comes at once: no queue, the credit goes back.
                        if error.is_none() {
                            if let Err(e) = file.write_all(body) {
                                *error = Some(e);
                            }
                        }
                        let _ = channel.send(WINDOW, &window(id, body.len() as u32));
                    } else if !stream.detached {
                        stream.to_app.extend(body);
                    }
                }
            }
            CLOSE => match body.first() {
                Some(0) => {
                    let commit = matches!(
                        self.streams.get(&id).map(|s| &s.endpoint),
                        Some(Endpoint::WriteFile { .. })
                    );
                    if commit {
                        let stream = self.streams.remove(&id).expect("looked up");
                        commit_file(channel, id, stream.endpoint);
                    } else if let Some(stream) = self.streams.get_mut(&id) {
                        stream.host_done = true;
                    }
                }
                Some(2) => {
                    if let Some(stream) = self.streams.get_mut(&id) {
                        stream.detached = true;
                        stream.to_app.clear();
                    }
                }
                _ => {
                    if let Some(stream) = self.streams.remove(&id) {
                        if let Endpoint::WriteFile { tmp, .. } = &stream.endpoint {
                            let _ = std::fs::remove_file(tmp);
                        }
                    }
                }
            },
            WINDOW => {
                if let (Some(stream), Some(credit)) = (self.streams.get_mut(&id), body.first_chunk::<4>()) {
                    stream.credit = stream.credit.saturating_add(u32::from_le_bytes(*credit));
                }
            }
            RESIZE => {
                if let (Some(stream), Some(size)) = (self.streams.get(&id), body.first_chunk::<4>()) {
                    if let Endpoint::Process(process) = &stream.endpoint {
                        let cols = u16::from_le_bytes([size[0], size[1]]);
                        let rows = u16::from_le_bytes([size[2], size[3]]);
                        process.resize(cols, rows);
                    }
                }
            }
            _ => {}
        }
    }

    /// An OPEN: the stream's endpoint, by its target tag.
    fn open(&mut self, channel: &mut Channel, id: u32, body: &[u8]) {
        let Some((&tag, target)) = body.split_first() else {
            return;
        };
        let endpoint = match tag {
            TARGET_TCP => {
                let port = target
                    .first_chunk::<2>()
                    .map(|p| u16::from_le_bytes(*p))
                    .unwrap_or(8080);
                Endpoint::Tcp {
                    port,
                    socket: None,
                    opened: Instant::now(),
                }
            }
            TARGET_PROCESS => {
                let Some(request) = ExecRequest::parse(target) else {
                    let _ = channel.send(CLOSE, &close(id, 1, b"a malformed exec request"));
                    return;
                };
                // The stream is up either way; a command that cannot start is exit code 127, as
                // a shell says it.
                let _ = channel.send(WINDOW, &window(id, STREAM_WINDOW));
                match Process::start(&self.image, &request) {
                    Ok(process) => Endpoint::Process(Box::new(process)),
                    Err(e) => {
                        let program = request.argv.first().map_or("a login shell", String::as_str);
                        let message = format!("kiln-agent: cannot run {program}: {e}\n");
                        let _ = channel.send(STDERR, &[&id.to_le_bytes()[..], message.as_bytes()].concat());
                        let _ = channel.send(CLOSE, &close(id, 0, b""));
                        let _ = channel.send(EXIT, &exit_report(id, 127, false, b""));
                        return;
                    }
                }
            }
            TARGET_WRITE_FILE => match open_write(id, target) {
                Ok(endpoint) => endpoint,
                Err(e) => return refuse(channel, id, &e),
            },
            TARGET_READ_FILE => match open_read(target) {
                Ok(file) => Endpoint::ReadFile(file),
                Err(e) => return refuse(channel, id, &e),
            },
            _ => {
                let _ = channel.send(CLOSE, &close(id, 1, b"an unknown stream target"));
                return;
            }
        };
        let connected = !matches!(endpoint, Endpoint::Tcp { .. });
        if matches!(endpoint, Endpoint::WriteFile { .. } | Endpoint::ReadFile(_)) {
            let _ = channel.send(WINDOW, &window(id, STREAM_WINDOW));
        }
        let pty = matches!(&endpoint, Endpoint::Process(p) if p.pty);
        self.streams.insert(
            id,
            Stream {
                endpoint,
                to_app: VecDeque::new(),
                consumed: 0,
                credit: if connected { STREAM_WINDOW } else { 0 },
                host_done: false,
                app_done: false,
                errors_done: pty,
                shut: false,
                detached: false,
            },
        );
    }

    /// Connects, writes and reads what the descriptors allow, waiting at most `timeout` ms for
    /// something to happen; true if anything moved.
    fn poll_streams(&mut self, channel: &mut Channel, timeout: i32) -> bool {
        let mut active = self.connect_pending(channel);
        active |= self.read_files(channel);
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut roles: Vec<(u32, Role)> = Vec::new();
        if let Some(server) = &self.server {
            fds.push(pollfd(server.output.as_raw_fd(), libc::POLLIN));
            roles.push((0, Role::Server));
        }
        if let Some(tun) = &self.tun {
            fds.push(pollfd(tun.as_raw_fd(), libc::POLLIN));
            roles.push((0, Role::Tun));
        }
        for (&id, stream) in &self.streams {
            let wants_output = (stream.credit > 0 || stream.detached) && !stream.app_done;
            let wants_input = !stream.to_app.is_empty();
            match &stream.endpoint {
                Endpoint::Tcp {
                    socket: Some(socket), ..
                } => {
                    let mut events = 0;
                    if wants_output {
                        events |= libc::POLLIN;
                    }
                    if wants_input {
                        events |= libc::POLLOUT;
                    }
                    fds.push(pollfd(socket.as_raw_fd(), events));
                    roles.push((id, Role::Socket));
                }
                Endpoint::Process(process) => {
                    if let (Some(input), true) = (&process.input, wants_input) {
                        fds.push(pollfd(input.as_raw_fd(), libc::POLLOUT));
                        roles.push((id, Role::Input));
                    }
                    if let (Some(output), true) = (&process.output, wants_output) {
                        fds.push(pollfd(output.as_raw_fd(), libc::POLLIN));
                        roles.push((id, Role::Output));
                    }
                    if let (Some(errors), true) = (&process.errors, wants_output && !stream.errors_done) {
                        fds.push(pollfd(errors.as_raw_fd(), libc::POLLIN));
                        roles.push((id, Role::Errors));
                    }
                }
                _ => {}
            }
        }
        let busy = active || self.has_pending_work();
        let wait = if busy { 0 } else { timeout };
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures for the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait) };
        if ready > 0 {
            for (fd, (id, role)) in fds.iter().zip(roles) {
                if fd.revents == 0 {
                    continue;
                }
                active = true;
                match role {
                    Role::Server => self.server_output(channel),
                    Role::Tun => self.packets_out(channel),
                    Role::Socket => self.pump_socket(channel, id, fd.revents),
                    Role::Input => self.write_input(channel, id),
                    Role::Output => self.read_output(channel, id, false),
                    Role::Errors => self.read_output(channel, id, true),
                }
            }
        }
        // Writes a host CLOSE asked for once the queue drained, ends processes, drops finished
        // streams.
        active |= self.finish_streams(channel);
        active
    }

    /// Work that needs no waiting: a shutdown to make, a process to look at.
    fn has_pending_work(&self) -> bool {
        self.streams.values().any(Stream::should_shut)
    }

    /// Connects streams waiting for their server; a stream that cannot connect is reset.
    fn connect_pending(&mut self, channel: &mut Channel) -> bool {
        let mut moved = false;
        let mut failed = Vec::new();
        for (&id, stream) in self.streams.iter_mut() {
            let Endpoint::Tcp { port, socket, opened } = &mut stream.endpoint else {
                continue;
            };
            if socket.is_some() {
                continue;
            }
            match TcpStream::connect(("127.0.0.1", *port)) {
                Ok(connected) => {
                    let _ = connected.set_nodelay(true);
                    let _ = connected.set_nonblocking(true);
                    *socket = Some(connected);
                    stream.credit = STREAM_WINDOW;
                    // The first WINDOW says the connection is up.
                    let _ = channel.send(WINDOW, &window(id, STREAM_WINDOW));
                    moved = true;
                }
                Err(e) => {
                    let gave_up = self.exited.is_some() || opened.elapsed() > CONNECT_PATIENCE;
                    if gave_up || e.kind() != io::ErrorKind::ConnectionRefused {
                        let reason = match &self.exited {
                            Some(exited) => format!("the sandbox's server is not running: {exited}"),
                            None => format!("cannot connect to port {port} in the guest: {e}"),
                        };
                        failed.push((id, reason));
                    }
                }
            }
        }
        for (id, reason) in failed {
            self.streams.remove(&id);
            let _ = channel.send(CLOSE, &close(id, 1, reason.as_bytes()));
            moved = true;
        }
        moved
    }

    /// Sends what files being read have, within each stream's credit.
    fn read_files(&mut self, channel: &mut Channel) -> bool {
        let mut moved = false;
        let mut done = Vec::new();
        for (&id, stream) in self.streams.iter_mut() {
            let Endpoint::ReadFile(file) = &mut stream.endpoint else {
                continue;
            };
            if stream.credit == 0 {
                continue;
            }
            let mut buf = vec![0u8; (stream.credit as usize).min(64 << 10)];
            moved = true;
            match file.read(&mut buf) {
                Ok(0) => {
                    let _ = channel.send(CLOSE, &close(id, 0, b""));
                    let _ = channel.send(EXIT, &exit_report(id, 0, false, b""));
                    done.push(id);
                }
                Ok(n) => {
                    stream.credit -= n as u32;
                    let _ = channel.send(DATA, &data(id, &buf[..n]));
                }
                Err(e) => {
                    let _ = channel.send(CLOSE, &close(id, 0, b""));
                    let _ = channel.send(EXIT, &exit_report(id, errno(&e), false, e.to_string().as_bytes()));
                    done.push(id);
                }
            }
        }
        for id in done {
            self.streams.remove(&id);
        }
        moved
    }

    /// Moves bytes between one TCP stream's socket and the host.
    fn pump_socket(&mut self, channel: &mut Channel, id: u32, revents: libc::c_short) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let Endpoint::Tcp {
            socket: Some(socket), ..
        } = &mut stream.endpoint
        else {
            return;
        };
        let mut reset = false;
        if revents & libc::POLLOUT != 0 {
            let (front, _) = stream.to_app.as_slices();
            match socket.write(front) {
                Ok(n) => took(&mut stream.to_app, &mut stream.consumed, channel, id, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => reset = true,
            }
        }
        let readable = revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
        if readable && stream.credit > 0 && !stream.app_done && !reset {
            let mut buf = vec![0u8; (stream.credit as usize).min(64 << 10)];
            match socket.read(&mut buf) {
                Ok(0) => {
                    stream.app_done = true;
                    let _ = channel.send(CLOSE, &close(id, 0, b""));
                }
                Ok(n) => {
                    stream.credit -= n as u32;
                    let _ = channel.send(DATA, &data(id, &buf[..n]));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => reset = true,
            }
        }
        if reset {
            self.streams.remove(&id);
            let _ = channel.send(CLOSE, &close(id, 1, b"the connection in the guest failed"));
        }
    }

    /// Writes queued host bytes to a process's stdin (or its pty).
    fn write_input(&mut self, channel: &mut Channel, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let Endpoint::Process(process) = &mut stream.endpoint else {
            return;
        };
        let Some(input) = &process.input else { return };
        let (front, _) = stream.to_app.as_slices();
        // SAFETY: writing bytes we own to a descriptor we own.
        let n = unsafe { libc::write(input.as_raw_fd(), front.as_ptr().cast(), front.len()) };
        if n > 0 {
            took(&mut stream.to_app, &mut stream.consumed, channel, id, n as usize);
        } else if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock {
            // The process closed its stdin: what it did not read is dropped, credited back.
            let dropped = stream.to_app.len();
            took(&mut stream.to_app, &mut stream.consumed, channel, id, dropped);
            process.input = None;
        }
    }

    /// Reads a process's stdout (or pty) or stderr into DATA or STDERR frames.
    fn read_output(&mut self, channel: &mut Channel, id: u32, errors: bool) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let Endpoint::Process(process) = &mut stream.endpoint else {
            return;
        };
        let fd = if errors { &process.errors } else { &process.output };
        let Some(fd) = fd else { return };
        let room = if stream.detached {
            64 << 10
        } else {
            (stream.credit as usize).min(64 << 10)
        };
        let mut buf = vec![0u8; room];
        // SAFETY: reading into a buffer we own from a descriptor we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let ended = match n {
            0 => true,
            n if n > 0 => {
                if !stream.detached {
                    stream.credit -= n as u32;
                    let kind = if errors { STDERR } else { DATA };
                    let _ = channel.send(kind, &data(id, &buf[..n as usize]));
                }
                false
            }
            // A pty's master reads EIO once no process holds its terminal.
            _ => io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock,
        };
        if ended {
            stream.output_ended(channel, id, errors);
        }
    }

    /// Shuts write sides the host finished, ends processes (EXIT), drops finished streams.
    fn finish_streams(&mut self, channel: &mut Channel) -> bool {
        let mut moved = false;
        self.streams.retain(|&id, stream| {
            if stream.should_shut() {
                match &mut stream.endpoint {
                    Endpoint::Tcp {
                        socket: Some(socket), ..
                    } => {
                        let _ = socket.shutdown(Shutdown::Write);
                    }
                    Endpoint::Process(process) if !process.pty => process.input = None,
                    _ => {}
                }
                stream.shut = true;
                moved = true;
            }
            match &mut stream.endpoint {
                Endpoint::Process(process) => {
                    process.check();
                    let Some(status) = process.status else { return true };
                    let lingering = process.ended_at.is_some_and(|at| at.elapsed() > OUTPUT_GRACE);
                    if lingering && !(stream.app_done && stream.errors_done) {
                        // A background child holds the outputs: the exec is over regardless.
                        process.output = None;
                        process.errors = None;
                        stream.errors_done = true;
                        if !stream.app_done {
                            stream.app_done = true;
                            if !stream.detached {
                                let _ = channel.send(CLOSE, &close(id, 0, b""));
                            }
                        }
                    }
                    if !(stream.app_done && stream.errors_done) {
                        return true;
                    }
                    if !stream.detached {
                        let timed_out = process.timed_out;
                        let _ = channel.send(EXIT, &exit_report(id, status, timed_out, b""));
                    }
                    moved = true;
                    false
                }
                _ => !(stream.shut && stream.app_done),
            }
        });
        moved
    }

    /// Sends what the guest's network stack queued on the TUN to the host, a frame per packet (a
    /// bounded batch per wake, so streams get their turn).
    fn packets_out(&mut self, channel: &mut Channel) {
        let Some(tun) = &mut self.tun else { return };
        let mut buf = vec![0u8; crate::network::MTU];
        for _ in 0..64 {
            match tun.read(&mut buf) {
                Ok(n) if n > 0 => {
                    let _ = channel.send(PACKET, &buf[..n]);
                }
                _ => return,
            }
        }
    }

    /// Forwards the server's output as LOG frames; notes its end.
    fn server_output(&mut self, channel: &mut Channel) {
        let Some(server) = &mut self.server else { return };
        let mut buf = [0u8; 16 << 10];
        // SAFETY: reading into a buffer we own from the pipe we created.
        let n = unsafe { libc::read(server.output.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            let _ = channel.send(LOG, &buf[..n as usize]);
            return;
        }
        if n == 0 {
            let status = server.child.wait();
            let how = match status {
                Ok(status) => status.to_string(),
                Err(e) => e.to_string(),
            };
            let _ = channel.send(LOG, format!("kiln-agent: the function exited: {how}\n").as_bytes());
            self.exited = Some(format!("the function exited: {how}"));
            self.server = None;
        }
    }
}

#[derive(Clone, Copy)]
enum Role {
    Server,
    Tun,
    Socket,
    Input,
    Output,
    Errors,
}

impl Stream {
    /// The host is done and everything it sent is written: time to shut our write side.
    fn should_shut(&self) -> bool {
        let connected = match &self.endpoint {
            Endpoint::Tcp { socket, .. } => socket.is_some(),
            Endpoint::Process(process) => process.input.is_some(),
            _ => false,
        };
        connected && self.host_done && self.to_app.is_empty() && !self.shut
    }

    /// A process's stdout (or pty) or stderr reached its end.
    fn output_ended(&mut self, channel: &mut Channel, id: u32, errors: bool) {
        let Endpoint::Process(process) = &mut self.endpoint else {
            return;
        };
        if errors {
            process.errors = None;
            self.errors_done = true;
        } else {
            process.output = None;
            if process.pty {
                // The master is also the input: nothing more can be typed.
                process.input = None;
                self.to_app.clear();
            }
            if !self.app_done {
                self.app_done = true;
                if !self.detached {
                    let _ = channel.send(CLOSE, &close(id, 0, b""));
                }
            }
        }
    }
}

/// `n` queued bytes reached the endpoint: credit goes back to the host in steps.
fn took(to_app: &mut VecDeque<u8>, consumed: &mut u32, channel: &mut Channel, id: u32, n: usize) {
    to_app.drain(..n);
    *consumed += n as u32;
    if *consumed >= WINDOW_STEP || (to_app.is_empty() && *consumed > 0) {
        let _ = channel.send(WINDOW, &window(id, *consumed));
        *consumed = 0;
    }
}

/// A file to be written: `<path>.kiln-<id>` beside it, renamed over it at the host's CLOSE 0, so
/// a reader never sees half of it.
fn open_write(id: u32, target: &[u8]) -> io::Result<Endpoint> {
    use std::os::unix::fs::OpenOptionsExt;
    let mode = target.first_chunk::<4>().map_or(0o644, |m| u32::from_le_bytes(*m)) & 0o7777;
    let path = target
        .get(4..)
        .and_then(process::guest_path)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(path.as_bytes()));
    if path.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::EISDIR));
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut tmp = path.clone().into_os_string();
    tmp.push(format!(".kiln-{id}"));
    let tmp = PathBuf::from(tmp);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    Ok(Endpoint::WriteFile {
        file,
        tmp,
        path,
        mode,
        error: None,
    })
}

fn open_read(target: &[u8]) -> io::Result<File> {
    let path = process::guest_path(target).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let file = File::open(std::ffi::OsStr::from_bytes(path.as_bytes()))?;
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::EISDIR));
    }
    if meta.len() > MAX_FILE {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    }
    Ok(file)
}

/// The host finished a file: it is renamed into place with its mode, or the failure reported.
fn commit_file(channel: &mut Channel, id: u32, endpoint: Endpoint) {
    use std::os::unix::fs::PermissionsExt;
    let Endpoint::WriteFile {
        file,
        tmp,
        path,
        mode,
        error,
    } = endpoint
    else {
        return;
    };
    let result = match error {
        Some(e) => Err(e),
        None => file
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .and_then(|()| std::fs::rename(&tmp, &path)),
    };
    drop(file);
    match result {
        Ok(()) => {
            let _ = channel.send(EXIT, &exit_report(id, 0, false, b""));
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            let _ = channel.send(EXIT, &exit_report(id, errno(&e), false, e.to_string().as_bytes()));
        }
    }
}

/// A stream the guest cannot open: EXIT with the errno and why, and nothing else.
fn refuse(channel: &mut Channel, id: u32, e: &io::Error) {
    let _ = channel.send(EXIT, &exit_report(id, errno(e), false, e.to_string().as_bytes()));
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

fn window(id: u32, credit: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&id.to_le_bytes());
    out[4..].copy_from_slice(&credit.to_le_bytes());
    out
}

fn data(id: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + bytes.len());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(bytes);
    out
}

fn close(id: u32, how: u8, reason: &[u8]) -> Vec<u8> {
    let mut out = id.to_le_bytes().to_vec();
    out.push(how);
    out.extend_from_slice(reason);
    out
}

fn exit_report(id: u32, status: i32, timed_out: bool, message: &[u8]) -> Vec<u8> {
    let mut out = id.to_le_bytes().to_vec();
    out.extend_from_slice(&status.to_le_bytes());
    out.push(timed_out as u8);
    out.extend_from_slice(message);
    out
}

pub(crate) fn hook_report(hook: Hook, status: i32, output: &[u8]) -> Vec<u8> {
    let mut out = vec![hook as u8];
    out.extend_from_slice(&status.to_le_bytes());
    out.extend_from_slice(output);
    out
}

/// `KEY=VALUE` entries, each ending in NUL.
pub(crate) fn parse_env(bytes: &[u8]) -> Vec<(String, String)> {
    bytes
        .split(|&b| b == 0)
        .filter_map(|entry| {
            let entry = String::from_utf8_lossy(entry);
            let (key, value) = entry.split_once('=')?;
            Some((key.to_owned(), value.to_owned()))
        })
        .collect()
}

/// Starts the image's command as the sandbox's server, its stdout and stderr into one pipe.
pub fn start_server(image: &Image) -> io::Result<Server> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these two descriptors, owned by nothing else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let stderr = write.try_clone()?;
    let child = image
        .command(&image.command, None, &image.env)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::from(stderr))
        .spawn()?;
    Ok(Server { child, output: read })
}

/// Sets the guest's wall clock to the host's (a restored guest's clock stopped while it was
/// suspended).
fn set_clock(unix_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as _,
        tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: a valid timespec for the call.
    unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
}
