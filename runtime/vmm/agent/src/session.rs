//! The agent's session mode: a sandbox's VM, kept running, with many TCP streams through the
//! channel (frames `SESSION`, `OPEN`, `DATA`, `CLOSE`, `WINDOW` of `kiln-vmm`'s
//! `devices::channel`).
//!
//! On the first SESSION the agent starts `/function` as a server (its environment: `/env`, then
//! the session's entries) and relays each stream the host OPENs to `127.0.0.1:<port>` inside the
//! guest. A SESSION after a restore (a resumed sandbox) sets the clock, forgets the streams of the
//! previous life — their host ends are gone — and leaves the server running as it was.
//!
//! One thread, one `poll` loop: the host's frames are found by reading the channel's status port
//! (it has no interrupt), so the loop polls its sockets with a short timeout — 1 ms right after
//! any traffic, doubling to 20 ms while idle — and looks at the port between polls.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{reseed, Channel, CLOSE, DATA, LOG, OPEN, RESEED, SESSION, WINDOW};

/// Bytes a sender may have unacknowledged on one stream (the host's `STREAM_WINDOW`).
const STREAM_WINDOW: u32 = 256 << 10;
/// Credit is returned once this much was consumed (or the queue ran dry).
const WINDOW_STEP: u32 = 64 << 10;
/// How long a stream may wait for the server to listen (it may still be starting).
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);
const POLL_FAST: i32 = 1;
const POLL_IDLE: i32 = 20;

/// One relayed connection.
struct Stream {
    port: u16,
    socket: Option<TcpStream>,
    opened: Instant,
    /// Bytes from the host not yet written to the socket.
    to_app: VecDeque<u8>,
    /// Bytes written to the socket since the last WINDOW sent to the host.
    consumed: u32,
    /// Bytes the host will still take from us.
    credit: u32,
    /// The host will send no more: shut our write side once `to_app` is empty.
    host_done: bool,
    /// The app closed its side: we sent CLOSE 0.
    app_done: bool,
    /// Our write side to the app is shut (after the host's CLOSE 0 and the queue drained).
    shut: bool,
}

/// The sandbox's server process, and the pipe its output comes through.
struct Server {
    child: Child,
    output: OwnedFd,
}

pub fn run(channel: &mut Channel, first: &[u8], env: &[(String, String)]) -> ! {
    let mut session = Session {
        streams: HashMap::new(),
        server: None,
        exited: None,
        env: env.to_vec(),
    };
    session.begin(channel, first);
    let mut timeout = POLL_FAST;
    loop {
        let mut active = session.host_frames(channel);
        active |= session.poll_sockets(channel, timeout);
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
    env: Vec<(String, String)>,
}

impl Session {
    /// A SESSION frame: clock, environment and a clean slate of streams.
    fn begin(&mut self, channel: &mut Channel, payload: &[u8]) {
        if let Some(clock) = payload.first_chunk::<8>() {
            set_clock(u64::from_le_bytes(*clock));
        }
        // Every stream belonged to the host of a previous life.
        self.streams.clear();
        if self.server.is_none() && self.exited.is_none() {
            let extra = parse_env(payload.get(8..).unwrap_or_default());
            self.env.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
            self.env.extend(extra);
            match start_server(&self.env) {
                Ok(server) => self.server = Some(server),
                Err(e) => {
                    let message = format!("kiln-agent: cannot start /function: {e}\n");
                    let _ = channel.send(LOG, message.as_bytes());
                    self.exited = Some(message);
                }
            }
        }
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
            OPEN => {
                let port = body.first_chunk::<2>().map(|p| u16::from_le_bytes(*p)).unwrap_or(8080);
                self.streams.insert(
                    id,
                    Stream {
                        port,
                        socket: None,
                        opened: Instant::now(),
                        to_app: VecDeque::new(),
                        consumed: 0,
                        credit: 0,
                        host_done: false,
                        app_done: false,
                        shut: false,
                    },
                );
            }
            DATA => {
                if let Some(stream) = self.streams.get_mut(&id) {
                    stream.to_app.extend(body);
                }
            }
            CLOSE => match body.first() {
                Some(0) => {
                    if let Some(stream) = self.streams.get_mut(&id) {
                        stream.host_done = true;
                    }
                }
                _ => {
                    self.streams.remove(&id);
                }
            },
            WINDOW => {
                if let (Some(stream), Some(credit)) = (self.streams.get_mut(&id), body.first_chunk::<4>()) {
                    stream.credit = stream.credit.saturating_add(u32::from_le_bytes(*credit));
                }
            }
            _ => {}
        }
    }

    /// Connects, writes and reads what the sockets allow, waiting at most `timeout` ms for
    /// something to happen; true if anything moved.
    fn poll_sockets(&mut self, channel: &mut Channel, timeout: i32) -> bool {
        let mut active = self.connect_pending(channel);
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut ids: Vec<u32> = Vec::new();
        if let Some(server) = &self.server {
            fds.push(pollfd(server.output.as_raw_fd(), libc::POLLIN));
            ids.push(u32::MAX);
        }
        for (&id, stream) in &self.streams {
            let Some(socket) = &stream.socket else { continue };
            let mut events = 0;
            if stream.credit > 0 && !stream.app_done {
                events |= libc::POLLIN;
            }
            if !stream.to_app.is_empty() {
                events |= libc::POLLOUT;
            }
            fds.push(pollfd(socket.as_raw_fd(), events));
            ids.push(id);
        }
        let wait = if active || self.has_pending_work() { 0 } else { timeout };
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures for the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait) };
        if ready > 0 {
            for (fd, id) in fds.iter().zip(&ids) {
                if fd.revents == 0 {
                    continue;
                }
                active = true;
                if *id == u32::MAX {
                    self.server_output(channel);
                } else {
                    self.pump(channel, *id, fd.revents);
                }
            }
        }
        // Writes a host CLOSE asked for once the queue drained, and drops finished streams.
        active |= self.finish_streams();
        active
    }

    /// Work that needs no waiting: a shutdown to make.
    fn has_pending_work(&self) -> bool {
        self.streams.values().any(Stream::should_shut)
    }

    /// Connects streams waiting for their server; a stream that cannot connect is reset.
    fn connect_pending(&mut self, channel: &mut Channel) -> bool {
        let mut moved = false;
        let mut failed = Vec::new();
        for (&id, stream) in self.streams.iter_mut().filter(|(_, s)| s.socket.is_none()) {
            match TcpStream::connect(("127.0.0.1", stream.port)) {
                Ok(socket) => {
                    let _ = socket.set_nodelay(true);
                    let _ = socket.set_nonblocking(true);
                    stream.socket = Some(socket);
                    stream.credit = STREAM_WINDOW;
                    // The first WINDOW says the connection is up.
                    let _ = channel.send(WINDOW, &window(id, STREAM_WINDOW));
                    moved = true;
                }
                Err(e) => {
                    let gave_up = self.exited.is_some() || stream.opened.elapsed() > CONNECT_PATIENCE;
                    if gave_up || e.kind() != io::ErrorKind::ConnectionRefused {
                        let reason = match &self.exited {
                            Some(exited) => format!("the sandbox's server is not running: {exited}"),
                            None => format!("cannot connect to port {} in the guest: {e}", stream.port),
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

    /// Moves bytes between one stream's socket and the host.
    fn pump(&mut self, channel: &mut Channel, id: u32, revents: libc::c_short) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let Some(socket) = stream.socket.as_mut() else { return };
        let mut reset = false;
        if revents & libc::POLLOUT != 0 {
            let (front, _) = stream.to_app.as_slices();
            match socket.write(front) {
                Ok(n) => {
                    stream.to_app.drain(..n);
                    stream.consumed += n as u32;
                    if stream.consumed >= WINDOW_STEP || stream.to_app.is_empty() {
                        let _ = channel.send(WINDOW, &window(id, stream.consumed));
                        stream.consumed = 0;
                    }
                }
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
                    let mut frame = id.to_le_bytes().to_vec();
                    frame.extend_from_slice(&buf[..n]);
                    let _ = channel.send(DATA, &frame);
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

    /// Shuts the write side of streams the host finished, and forgets streams done both ways.
    fn finish_streams(&mut self) -> bool {
        let mut moved = false;
        self.streams.retain(|_, stream| {
            if stream.should_shut() {
                if let Some(socket) = &stream.socket {
                    let _ = socket.shutdown(Shutdown::Write);
                }
                stream.shut = true;
                moved = true;
            }
            !(stream.shut && stream.app_done)
        });
        moved
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
            let _ = channel.send(LOG, format!("kiln-agent: /function exited: {how}\n").as_bytes());
            self.exited = Some(format!("/function exited: {how}"));
            self.server = None;
        }
    }
}

impl Stream {
    /// The host is done and everything it sent is written: time to shut our write side.
    fn should_shut(&self) -> bool {
        self.socket.is_some() && self.host_done && self.to_app.is_empty() && !self.shut
    }
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

fn close(id: u32, how: u8, reason: &[u8]) -> Vec<u8> {
    let mut out = id.to_le_bytes().to_vec();
    out.push(how);
    out.extend_from_slice(reason);
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

/// Starts `/function` as the sandbox's server, its stdout and stderr into one pipe.
fn start_server(env: &[(String, String)]) -> io::Result<Server> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these two descriptors, owned by nothing else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let stderr = write.try_clone()?;
    let child = Command::new("/function")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::from(stderr))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
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
