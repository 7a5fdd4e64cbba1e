//! The async driver: one task owns the [`Stack`]'s clock and the guest's packet channels; one task per
//! allowed connection connects upstream (or serves it in-process) and relays bytes; one short task per DNS query.
//!
//! The stack sits behind a std `Mutex`, held only for a stack call and never across an `.await`
//! (so no tokio mutex is needed). A relay waits on the stack through smoltcp's socket wakers and
//! "kicks" the driver after each move, so ACKs and window updates leave at once. Backpressure is the
//! TCP window: a relay takes from the guest only what it has written upstream, and gives the guest only
//! what its window takes, so at most one relay buffer (16 KiB) per direction sits outside the sockets.
//!
//! Every task lives in the driver's `JoinSet`: dropping the [`Network`] aborts the driver, which drops
//! the set, which ends every relay and closes every upstream socket.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};

use crate::config::{Config, ConfigError};
use crate::stack::{
    ConnId, Connection, ConnectionError, Datagram, Decision, DnsQuery, Event, Protocol, Stack, Stats, Target,
};

/// Bytes one relay moves per step, each way.
const RELAY_CHUNK: usize = 16 * 1024;
/// DNS queries being answered at once; more are dropped (the guest's resolver retries).
const DNS_IN_FLIGHT: usize = 32;
/// Guest packets handled per lock, so a flood cannot starve the relays of the stack.
const PACKET_BATCH: usize = 64;
/// The driver's longest sleep when smoltcp has no timer pending (it wakes on packets and kicks anyway).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// UDP flows (guest port → destination) open at once; datagrams that would open more are dropped.
const MAX_UDP_FLOWS: usize = 64;
/// A UDP flow with no datagram either way for this long is closed (its host socket with it).
const UDP_IDLE: Duration = Duration::from_secs(60);
/// The largest datagram taken from upstream (what fits the guest's MTU is forwarded).
const MAX_DATAGRAM: usize = 65536;

/// One microVM's running network. Dropping it ends every connection.
pub struct Network {
    shared: Arc<Shared>,
    driver: JoinHandle<()>,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the driver to poll the stack: bytes were moved, a connection was accepted, an answer queued.
    kick: Notify,
    connect_timeout: Duration,
    epoch: Instant,
}

struct Inner {
    stack: Stack,
    /// The relay task of each open connection, to end it when the stack drops the connection.
    relays: HashMap<ConnId, AbortHandle>,
    /// Each UDP flow's host socket, by (guest's end, guest-visible destination).
    flows: HashMap<(SocketAddrV4, SocketAddrV4), Flow>,
    next_flow: u64,
}

/// A connected host socket carrying one guest flow's datagrams, and the task taking its answers.
struct Flow {
    id: u64,
    /// Sends without waiting (a full socket buffer drops the datagram); tokio's `try_send` would
    /// also refuse before the reactor has first seen the socket writable.
    sender: std::net::UdpSocket,
    receiver: AbortHandle,
    /// When a datagram last went either way, in ms since `Shared::epoch`.
    active_ms: Arc<AtomicU64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic under the lock leaves the stack as consistent as smoltcp left it; keep serving.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Network {
    /// Starts the network of one VM on the current tokio runtime.
    ///
    /// `from_guest` carries the guest's IPv4 packets, `to_guest` takes packets for it; when either
    /// channel closes the network stops. `policy` decides each new TCP connection by its destination
    /// (quickly: it runs with the stack locked). `dns` answers a raw DNS query with a raw answer, or
    /// `None` to stay silent; it should bound its own time, as the guest's resolver gives up after a few
    /// seconds anyway.
    pub fn spawn<P, D, F>(
        config: Config,
        policy: P,
        dns: D,
        from_guest: mpsc::Receiver<Vec<u8>>,
        to_guest: mpsc::Sender<Vec<u8>>,
    ) -> Result<Network, ConfigError>
    where
        P: Fn(Protocol, SocketAddrV4) -> Decision + Send + 'static,
        D: Fn(Vec<u8>) -> F + Send + Sync + 'static,
        F: Future<Output = Option<Vec<u8>>> + Send + 'static,
    {
        let connect_timeout = config.connect_timeout;
        let stack = Stack::new(config, policy, Instant::now())?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                stack,
                relays: HashMap::new(),
                flows: HashMap::new(),
                next_flow: 0,
            }),
            kick: Notify::new(),
            connect_timeout,
            epoch: Instant::now(),
        });
        let driver = tokio::spawn(drive(shared.clone(), Arc::new(dns), from_guest, to_guest));
        Ok(Network { shared, driver })
    }

    /// The VM was restored from a snapshot: reset every connection towards the guest, close every
    /// upstream, forget them all. Nothing is resumed.
    pub fn reset_all(&self) {
        let mut inner = self.shared.lock();
        for (_, relay) in inner.relays.drain() {
            relay.abort();
        }
        for (_, flow) in inner.flows.drain() {
            flow.receiver.abort();
        }
        inner.stack.reset_all(Instant::now());
        drop(inner);
        self.shared.kick.notify_one();
    }

    /// Open guest connections, including ones still connecting upstream.
    pub fn connections(&self) -> usize {
        self.shared.lock().stack.connections()
    }

    pub fn stats(&self) -> Stats {
        self.shared.lock().stack.stats()
    }

    /// Whether the driver has stopped (a channel closed).
    pub fn is_finished(&self) -> bool {
        self.driver.is_finished()
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn drive<D, F>(
    shared: Arc<Shared>,
    dns: Arc<D>,
    mut from_guest: mpsc::Receiver<Vec<u8>>,
    to_guest: mpsc::Sender<Vec<u8>>,
) where
    D: Fn(Vec<u8>) -> F + Send + Sync + 'static,
    F: Future<Output = Option<Vec<u8>>> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    let dns_permits = Arc::new(Semaphore::new(DNS_IN_FLIGHT));
    let mut outgoing = Vec::new();
    loop {
        let delay = {
            let mut inner = shared.lock();
            let now = Instant::now();
            inner.stack.poll(now);
            while let Some(packet) = inner.stack.pop_guest_packet() {
                outgoing.push(packet);
            }
            while let Some(event) = inner.stack.next_event() {
                match event {
                    Event::Connect(conn) => {
                        let id = conn.id;
                        let relay = tasks.spawn(relay(shared.clone(), conn));
                        inner.relays.insert(id, relay);
                    }
                    Event::Dns(query) => match dns_permits.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let (shared, dns) = (shared.clone(), dns.clone());
                            tasks.spawn(async move {
                                answer(&shared, dns.as_ref(), query).await;
                                drop(permit);
                            });
                        }
                        Err(_) => inner.stack.dns_declined(),
                    },
                    Event::Datagram(datagram) => forward(&shared, &mut inner, &mut tasks, datagram),
                    Event::Closed(id) => {
                        if let Some(relay) = inner.relays.remove(&id) {
                            relay.abort();
                        }
                    }
                }
            }
            inner.stack.poll_delay(now).unwrap_or(IDLE_POLL)
        };
        // Finished tasks leave the set here, so it holds only live ones.
        while tasks.try_join_next().is_some() {}
        for packet in outgoing.drain(..) {
            if to_guest.send(packet).await.is_err() {
                return;
            }
        }

        tokio::select! {
            packet = from_guest.recv() => {
                let Some(packet) = packet else { return };
                let mut inner = shared.lock();
                let now = Instant::now();
                inner.stack.guest_packet(now, &packet);
                for _ in 1..PACKET_BATCH {
                    match from_guest.try_recv() {
                        Ok(packet) => inner.stack.guest_packet(now, &packet),
                        Err(_) => break,
                    }
                }
            }
            _ = shared.kick.notified() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Sends a guest's datagram from the host socket of its flow, opening one (connected to the target,
/// so only the target's answers come back) for a new flow. UDP promises nothing: a datagram that
/// cannot be sent now is dropped and counted, never queued.
fn forward(shared: &Arc<Shared>, inner: &mut Inner, tasks: &mut JoinSet<()>, datagram: Datagram) {
    let key = (datagram.guest, datagram.dest);
    let now_ms = shared.epoch.elapsed().as_millis() as u64;
    if let Some(flow) = inner.flows.get(&key) {
        flow.active_ms.store(now_ms, Ordering::Relaxed);
        if flow.sender.send(&datagram.payload).is_err() {
            inner.stack.datagram_dropped();
        }
        return;
    }
    if inner.flows.len() >= MAX_UDP_FLOWS {
        tracing::debug!(guest = %datagram.guest, dest = %datagram.dest, "UDP flow over the limit dropped");
        return inner.stack.datagram_dropped();
    }
    let (sender, socket) = match open_flow(datagram.target) {
        Ok(sockets) => sockets,
        Err(error) => {
            tracing::debug!(target = %datagram.target, %error, "UDP flow not opened");
            return inner.stack.datagram_dropped();
        }
    };
    if sender.send(&datagram.payload).is_err() {
        inner.stack.datagram_dropped();
    }
    let id = inner.next_flow;
    inner.next_flow += 1;
    let active_ms = Arc::new(AtomicU64::new(now_ms));
    let receiver = tasks.spawn(receive(shared.clone(), socket, key, id, active_ms.clone()));
    inner.flows.insert(
        key,
        Flow {
            id,
            sender,
            receiver,
            active_ms,
        },
    );
}

/// A host socket connected to `target`: a blocking-free handle to send on, and the same socket for
/// the receiving task.
fn open_flow(target: SocketAddr) -> io::Result<(std::net::UdpSocket, UdpSocket)> {
    let any: SocketAddr = match target {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.set_nonblocking(true)?;
    socket.connect(target)?;
    Ok((socket.try_clone()?, UdpSocket::from_std(socket)?))
}

/// Gives the guest what the flow's target sends back, from the destination the guest wrote to,
/// until the flow is idle for [`UDP_IDLE`]; then closes it.
async fn receive(
    shared: Arc<Shared>,
    socket: UdpSocket,
    (guest, dest): (SocketAddrV4, SocketAddrV4),
    id: u64,
    active_ms: Arc<AtomicU64>,
) {
    let mut buf = vec![0; MAX_DATAGRAM];
    loop {
        let idle_for = shared
            .epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(active_ms.load(Ordering::Relaxed)));
        let Some(wait) = UDP_IDLE.checked_sub(idle_for).filter(|wait| !wait.is_zero()) else {
            break;
        };
        match tokio::time::timeout(wait, socket.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                active_ms.store(shared.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                with_stack(&shared, |stack| stack.datagram_to_guest(dest, guest, &buf[..n]));
            }
            // An ICMP error from the target (say, port unreachable) fails one receive; UDP goes on.
            Ok(Err(error)) => tracing::trace!(%dest, %error, "UDP receive failed"),
            Err(_) => {}
        }
    }
    let mut inner = shared.lock();
    if inner.flows.get(&(guest, dest)).is_some_and(|flow| flow.id == id) {
        inner.flows.remove(&(guest, dest));
    }
}

async fn answer<D, F>(shared: &Shared, dns: &D, query: DnsQuery)
where
    D: Fn(Vec<u8>) -> F,
    F: Future<Output = Option<Vec<u8>>>,
{
    let Some(reply) = dns(query.query).await else { return };
    shared.lock().stack.dns_reply(query.guest, &reply);
    shared.kick.notify_one();
}

/// Reaches the connection's target (connects upstream, or opens a pipe to the in-process service),
/// then lets the guest's connection complete and relays both ways until both are closed. Any failure
/// resets the guest's side; the stack then drops the connection and this task.
async fn relay(shared: Arc<Shared>, conn: Connection) {
    let id = conn.id;
    match &conn.target {
        &Target::Connect(target) => {
            let upstream = match tokio::time::timeout(shared.connect_timeout, TcpStream::connect(target)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(dest = %conn.dest, %target, %error, "upstream connect failed");
                    let _ = with_stack(&shared, |stack| stack.refuse(id));
                    return;
                }
                Err(_) => {
                    tracing::debug!(dest = %conn.dest, %target, "upstream connect timed out");
                    let _ = with_stack(&shared, |stack| stack.refuse(id));
                    return;
                }
            };
            // Small writes from the guest (a request line, a TLS record) go out as they come.
            let _ = upstream.set_nodelay(true);
            let (reader, writer) = upstream.into_split();
            exchange(&shared, &conn, reader, writer).await;
        }
        Target::Serve(service) => {
            let (ours, theirs) = tokio::io::duplex(RELAY_CHUNK);
            let (reader, writer) = tokio::io::split(ours);
            // When the relay ends it drops its end of the pipe, and the service sees the close.
            tokio::join!(service.serve(theirs), exchange(&shared, &conn, reader, writer));
        }
    }
}

/// Completes the guest's connection and moves bytes between it and `upstream` until both are closed.
async fn exchange(shared: &Shared, conn: &Connection, reader: impl AsyncRead + Unpin, writer: impl AsyncWrite + Unpin) {
    let id = conn.id;
    if with_stack(shared, |stack| stack.accept(id)).is_err() {
        return;
    }
    if let Err(error) = tokio::try_join!(
        guest_to_upstream(shared, id, writer),
        upstream_to_guest(shared, id, reader)
    ) {
        tracing::debug!(dest = %conn.dest, %error, "connection reset");
        let _ = with_stack(shared, |stack| stack.abort(id));
    }
}

/// Runs one stack call and kicks the driver to send what it queued.
fn with_stack<T>(shared: &Shared, f: impl FnOnce(&mut Stack) -> T) -> T {
    let result = f(&mut shared.lock().stack);
    shared.kick.notify_one();
    result
}

async fn guest_to_upstream(shared: &Shared, id: ConnId, mut upstream: impl AsyncWrite + Unpin) -> io::Result<()> {
    let mut buf = vec![0; RELAY_CHUNK];
    loop {
        let n = poll_fn(|cx| shared.lock().stack.poll_recv(id, cx, &mut buf))
            .await
            .map_err(io_error)?;
        // The guest's window reopened: the driver sends the update.
        shared.kick.notify_one();
        if n == 0 {
            return upstream.shutdown().await;
        }
        upstream.write_all(&buf[..n]).await?;
    }
}

async fn upstream_to_guest(shared: &Shared, id: ConnId, mut upstream: impl AsyncRead + Unpin) -> io::Result<()> {
    let mut buf = vec![0; RELAY_CHUNK];
    loop {
        let n = upstream.read(&mut buf).await?;
        if n == 0 {
            return with_stack(shared, |stack| stack.close(id)).map_err(io_error);
        }
        let mut sent = 0;
        while sent < n {
            sent += poll_fn(|cx| shared.lock().stack.poll_send(id, cx, &buf[sent..n]))
                .await
                .map_err(io_error)?;
            shared.kick.notify_one();
        }
    }
}

fn io_error(error: ConnectionError) -> io::Error {
    let kind = match error {
        ConnectionError::Reset => io::ErrorKind::ConnectionReset,
        ConnectionError::Gone | ConnectionError::Closed => io::ErrorKind::NotConnected,
    };
    io::Error::new(kind, error)
}
