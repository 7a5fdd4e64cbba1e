//! The synchronous core: one smoltcp interface that answers for every address, a policy check on each
//! new connection, and a table of the connections the guest has open. No I/O and no clock of its own:
//! the caller feeds it packets and the time, and takes out packets and events.
//!
//! A connection's life: the guest's SYN is checked against the policy (refused → RST at once); an
//! allowed SYN gets a socket listening on exactly its destination, which takes the SYN but holds its
//! SYN|ACK ([`Event::Connect`]) until the caller has reached the upstream and calls [`Stack::accept`]
//! (or [`Stack::refuse`] → RST). The caller then moves bytes with [`Stack::poll_recv`] /
//! [`Stack::poll_send`]. A connection closed or reset on both sides is removed on the next
//! [`Stack::poll`] and announced with [`Event::Closed`].

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::BuildHasher;
use std::net::{SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use smoltcp::iface::{self, Interface, PollIngressSingleResult, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint, TcpSeqNumber};
use tokio::io::DuplexStream;

use crate::config::{Config, ConfigError};
use crate::device::QueueDevice;
use crate::packet::{self, Class, Dropped};

/// The policy's answer for a destination the guest wants to connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Connect, on the host, to this address. Usually the destination itself; a test (or a future
    /// redirect) may name another.
    Allow(SocketAddr),
    /// Serve it on the host, in-process: nothing is dialled, the service gets the connection's bytes.
    Serve(Service),
    /// Refuse: the guest's connect fails at once with "connection refused".
    Deny,
}

/// What an allowed connection reaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A socket the host connects to.
    Connect(SocketAddr),
    /// An in-process service.
    Serve(Service),
}

/// An in-process endpoint a guest can connect to (say, Kiln's own `kiln.internal`): called once
/// per connection with the host's end of it; the connection lasts until both the future ends and
/// the guest closes (dropping the stream closes the service's side).
#[derive(Clone)]
pub struct Service(Arc<ServeFn>);

type ServeFn = dyn Fn(DuplexStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync;

impl Service {
    pub fn new<F, Fut>(serve: F) -> Service
    where
        F: Fn(DuplexStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Service(Arc::new(move |stream| Box::pin(serve(stream))))
    }

    pub fn serve(&self, stream: DuplexStream) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        (self.0)(stream)
    }
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Service")
    }
}

/// The same service, not one that behaves alike.
impl PartialEq for Service {
    fn eq(&self, other: &Service) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Service {}

/// What the guest is sending to a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// A new TCP connection (its SYN).
    Tcp,
    /// A UDP datagram (not to the DNS address's port 53, which is Kiln's resolver's).
    Udp,
}

/// Decides each new connection and each datagram by its guest-visible destination. It runs on the
/// packet path with the stack locked, so it must be quick: a lookup, never I/O.
type Policy = Box<dyn Fn(Protocol, SocketAddrV4) -> Decision + Send>;

/// Identifies one guest connection for its whole life; never reused within a stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

/// A connection the policy allowed, waiting for the caller to reach `target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub id: ConnId,
    /// The guest's end (its address and ephemeral port).
    pub guest: SocketAddrV4,
    /// The destination as the guest sees it.
    pub dest: SocketAddrV4,
    /// What the policy said it reaches.
    pub target: Target,
}

/// A datagram the policy allowed, to be sent from the host to `target`; answers come back to the
/// guest with [`Stack::datagram_to_guest`], from `dest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    pub guest: SocketAddrV4,
    pub dest: SocketAddrV4,
    pub target: SocketAddr,
    pub payload: Vec<u8>,
}

/// A DNS query from the guest, to be answered with [`Stack::dns_reply`] to `guest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsQuery {
    pub guest: SocketAddrV4,
    pub query: Vec<u8>,
}

/// What the caller must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Connect upstream, then [`Stack::accept`] or [`Stack::refuse`].
    Connect(Connection),
    /// Answer it (or not: the guest's resolver retries).
    Dns(DnsQuery),
    /// Send it (or drop it, with [`Stack::datagram_dropped`]: UDP promises nothing).
    Datagram(Datagram),
    /// The connection is gone (closed, reset, timed out or aborted): drop whatever serves it.
    Closed(ConnId),
}

/// Why a connection operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionError {
    #[error("no such connection (it was closed and removed)")]
    Gone,
    #[error("the connection was reset (by the guest, a timeout or an abort)")]
    Reset,
    #[error("the connection's sending side is already closed")]
    Closed,
}

/// What the stack has dropped or refused since it was built: the guest's view of the network is "it
/// does nothing", so these are the only record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Not IPv4, truncated, bad checksums, fragments, broadcast or multicast destinations.
    pub malformed: u64,
    /// From a source address other than the guest's.
    pub spoofed: u64,
    /// Datagrams the policy did not allow, that did not fit, or that found no room.
    pub udp_dropped: u64,
    /// Datagrams the policy allowed, handed to the caller.
    pub udp_forwarded: u64,
    pub icmp_dropped: u64,
    /// Other IP protocols.
    pub other_dropped: u64,
    /// SYNs the policy denied (answered with RST).
    pub tcp_denied: u64,
    /// SYNs over `max_connections` (answered with RST).
    pub tcp_over_limit: u64,
    /// Connections the policy allowed.
    pub tcp_allowed: u64,
    /// DNS queries handed to the caller.
    pub dns_queries: u64,
    /// DNS answers that could not be sent (too large for one packet, or the socket's queue full), and
    /// queries the caller declined to take.
    pub dns_dropped: u64,
}

/// smoltcp's keep-alive towards the guest and the silence after which it gives up: a guest that was
/// killed or paused for good does not pin its connections' buffers. Well under Linux's defaults, well
/// over any round trip to a live guest.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// DNS datagrams queued each way in the DNS socket (and their bytes): a burst of lookups, not a stream.
const DNS_QUEUE: usize = 16;
const DNS_QUEUE_BYTES: usize = 16 * 1024;
/// Packets waiting for the guest above which forwarded datagrams for it are dropped: a flood from an
/// allowed peer costs the host this queue, not memory without end.
const GUEST_QUEUE: usize = 1024;

struct Conn {
    handle: SocketHandle,
    guest: SocketAddrV4,
    dest: SocketAddrV4,
    /// The guest has sent its FIN: an empty receive half means end of stream, not a reset.
    fin_received: bool,
    /// Aborted by the caller: remove it even with unread data.
    discard: bool,
}

/// One guest's network endpoint. See the module doc for a connection's life.
pub struct Stack {
    config: Config,
    policy: Policy,
    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    dns: SocketHandle,
    conns: HashMap<ConnId, Conn>,
    by_tuple: HashMap<(SocketAddrV4, SocketAddrV4), ConnId>,
    next_id: u64,
    events: VecDeque<Event>,
    stats: Stats,
    /// smoltcp's clock is "milliseconds since some instant"; this is that instant.
    epoch: Instant,
}

impl Stack {
    /// A stack for `config`, deciding each new connection with `policy`. `now` starts its clock.
    pub fn new(
        config: Config,
        policy: impl Fn(Protocol, SocketAddrV4) -> Decision + Send + 'static,
        now: Instant,
    ) -> Result<Stack, ConfigError> {
        config.validate()?;
        let mut device = QueueDevice::new(config.mtu);
        let mut iface_config = iface::Config::new(HardwareAddress::Ip);
        // Randomises initial sequence numbers, so a restored or restarted stack does not replay old ones.
        iface_config.random_seed = RandomState::new().hash_one(now);
        let epoch = now;
        let mut iface = Interface::new(iface_config, &mut device, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            // Cannot fail: the list is empty and holds at least one address.
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(config.gateway), config.prefix_len));
        });
        // Every destination is "local": the stack terminates each connection itself (see the crate doc).
        iface.set_any_ip(true);

        let mut sockets = SocketSet::new(Vec::new());
        let mut dns = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; DNS_QUEUE], vec![0; DNS_QUEUE_BYTES]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; DNS_QUEUE], vec![0; DNS_QUEUE_BYTES]),
        );
        dns.bind(IpEndpoint::new(IpAddress::Ipv4(config.dns), packet::DNS_PORT))
            .expect("port 53 is a valid bind address");
        let dns = sockets.add(dns);

        Ok(Stack {
            config,
            policy: Box::new(policy),
            iface,
            device,
            sockets,
            dns,
            conns: HashMap::new(),
            by_tuple: HashMap::new(),
            next_id: 0,
            events: VecDeque::new(),
            stats: Stats::default(),
            epoch,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Takes one IPv4 packet from the guest. Anything that is not TCP or DNS is counted and dropped;
    /// a new connection is decided here, before smoltcp sees its SYN.
    pub fn guest_packet(&mut self, now: Instant, packet: &[u8]) {
        match packet::classify(packet, self.config.guest, self.config.dns) {
            Class::Drop(why) => {
                let counter = match why {
                    Dropped::Malformed => &mut self.stats.malformed,
                    Dropped::Spoofed => &mut self.stats.spoofed,
                    Dropped::Icmp => &mut self.stats.icmp_dropped,
                    Dropped::Protocol => &mut self.stats.other_dropped,
                };
                *counter += 1;
                tracing::trace!(?why, len = packet.len(), "guest packet dropped");
            }
            Class::Tcp | Class::Dns => self.ingest(now, packet),
            Class::Syn { guest, dest, seq } => self.syn(now, packet, guest, dest, seq),
            Class::Udp { guest, dest, payload } => self.udp(guest, dest, payload),
        }
    }

    fn udp(&mut self, guest: SocketAddrV4, dest: SocketAddrV4, payload: Vec<u8>) {
        match (self.policy)(Protocol::Udp, dest) {
            Decision::Allow(target) => {
                self.stats.udp_forwarded += 1;
                self.events.push_back(Event::Datagram(Datagram {
                    guest,
                    dest,
                    target,
                    payload,
                }));
            }
            // No in-process UDP services: a `Serve` is a TCP endpoint.
            Decision::Serve(_) | Decision::Deny => {
                self.stats.udp_dropped += 1;
                tracing::trace!(%guest, %dest, "datagram dropped by policy");
            }
        }
    }

    /// Sends the guest a datagram from `from` (the destination it wrote to). Dropped, and counted,
    /// when it does not fit in one packet or too many packets already wait for the guest.
    pub fn datagram_to_guest(&mut self, from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) {
        if payload.len() > self.config.mtu - 28 || self.device.tx.len() >= GUEST_QUEUE {
            self.stats.udp_dropped += 1;
            return;
        }
        self.device.tx.push_back(packet::datagram(from, to, payload));
    }

    /// Counts a datagram the caller took but could not send.
    pub fn datagram_dropped(&mut self) {
        self.stats.udp_dropped += 1;
    }

    fn syn(&mut self, now: Instant, packet: &[u8], guest: SocketAddrV4, dest: SocketAddrV4, seq: TcpSeqNumber) {
        if let Some(&id) = self.by_tuple.get(&(guest, dest)) {
            let state = self.socket(id).map(|s| s.state());
            if !matches!(state, Some(tcp::State::Closed | tcp::State::TimeWait)) {
                // A retransmitted SYN for a connection already decided: its socket handles it.
                return self.ingest(now, packet);
            }
            // The guest reuses a port whose old connection is finished but not yet swept.
            self.remove(id);
        }
        if self.conns.len() >= self.config.max_connections {
            self.stats.tcp_over_limit += 1;
            tracing::debug!(%guest, %dest, limit = self.config.max_connections, "connection over the limit reset");
            return self.device.tx.push_back(packet::reset(guest, dest, seq));
        }
        let target = match (self.policy)(Protocol::Tcp, dest) {
            Decision::Deny => {
                self.stats.tcp_denied += 1;
                tracing::debug!(%guest, %dest, "connection denied by policy");
                return self.device.tx.push_back(packet::reset(guest, dest, seq));
            }
            Decision::Allow(address) => Target::Connect(address),
            Decision::Serve(service) => Target::Serve(service),
        };

        let size = self.config.buffer_size;
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; size]),
            tcp::SocketBuffer::new(vec![0; size]),
        );
        // Held until the upstream answers: a refused upstream is then a refused connect in the guest,
        // not a connection that opens and drops.
        socket.pause_synack(true);
        socket.set_keep_alive(Some(KEEP_ALIVE.into()));
        socket.set_timeout(Some(GUEST_TIMEOUT.into()));
        // Bytes are relayed as they come from upstream, which already coalesced them.
        socket.set_nagle_enabled(false);
        let endpoint = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(*dest.ip())),
            port: dest.port(),
        };
        if socket.listen(endpoint).is_err() {
            // Port 0: not a connection anyone can make.
            self.stats.malformed += 1;
            return;
        }
        let handle = self.sockets.add(socket);
        self.ingest(now, packet);
        // The packet went through the same checks in `classify`, so the socket took it; if it did not, a
        // listening socket left behind would take the next SYN to this destination from another port.
        if self.sockets.get::<tcp::Socket>(handle).state() != tcp::State::SynReceived {
            self.sockets.remove(handle);
            self.stats.malformed += 1;
            return;
        }
        let id = ConnId(self.next_id);
        self.next_id += 1;
        self.conns.insert(
            id,
            Conn {
                handle,
                guest,
                dest,
                fin_received: false,
                discard: false,
            },
        );
        self.by_tuple.insert((guest, dest), id);
        self.stats.tcp_allowed += 1;
        self.events.push_back(Event::Connect(Connection {
            id,
            guest,
            dest,
            target,
        }));
    }

    fn ingest(&mut self, now: Instant, packet: &[u8]) {
        self.device.rx.push_back(packet.to_vec());
        let now = self.smoltcp_now(now);
        while self.iface.poll_ingress_single(now, &mut self.device, &mut self.sockets) != PollIngressSingleResult::None
        {
        }
    }

    /// Runs smoltcp's timers and sends what its sockets have queued (data, ACKs, window updates,
    /// retransmissions, RSTs), then removes finished connections. Call it after feeding packets, after
    /// moving bytes, and when [`Stack::poll_delay`] says.
    pub fn poll(&mut self, now: Instant) {
        let now = self.smoltcp_now(now);
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        self.sweep();
    }

    /// How long until [`Stack::poll`] has timer work (retransmission, delayed ACK, keep-alive); `None`
    /// when nothing is pending.
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        let now = self.smoltcp_now(now);
        self.iface.poll_delay(now, &self.sockets).map(Duration::from)
    }

    /// The next packet for the guest, oldest first.
    pub fn pop_guest_packet(&mut self) -> Option<Vec<u8>> {
        self.device.tx.pop_front()
    }

    /// The next thing the caller must act on. DNS queries wait in their socket until taken, so an
    /// idle caller bounds them (the socket's queue), not this stack.
    pub fn next_event(&mut self) -> Option<Event> {
        if let Some(event) = self.events.pop_front() {
            return Some(event);
        }
        let socket = self.sockets.get_mut::<udp::Socket>(self.dns);
        let (query, meta) = socket.recv().ok()?;
        let IpAddress::Ipv4(addr) = meta.endpoint.addr;
        self.stats.dns_queries += 1;
        Some(Event::Dns(DnsQuery {
            guest: SocketAddrV4::new(addr, meta.endpoint.port),
            query: query.to_vec(),
        }))
    }

    /// Sends a DNS answer to the guest from the DNS address, port 53. An answer larger than one packet
    /// is dropped (counted): the resolver must truncate (TC bit) so the guest retries over TCP.
    pub fn dns_reply(&mut self, to: SocketAddrV4, answer: &[u8]) {
        let socket = self.sockets.get_mut::<udp::Socket>(self.dns);
        let fits = answer.len() <= self.config.mtu - 28;
        if !fits
            || socket
                .send_slice(answer, IpEndpoint::new(IpAddress::Ipv4(*to.ip()), to.port()))
                .is_err()
        {
            self.stats.dns_dropped += 1;
        }
    }

    /// Counts a DNS query the caller took but chose not to answer (e.g. too many in flight).
    pub fn dns_declined(&mut self) {
        self.stats.dns_dropped += 1;
    }

    /// The upstream is connected: send the guest its SYN|ACK.
    pub fn accept(&mut self, id: ConnId) -> Result<(), ConnectionError> {
        let socket = self.socket_mut(id)?;
        match socket.state() {
            tcp::State::SynReceived => {
                socket.pause_synack(false);
                Ok(())
            }
            tcp::State::Closed => Err(ConnectionError::Reset),
            _ => Ok(()),
        }
    }

    /// The upstream could not be reached: reset the guest's connection attempt.
    pub fn refuse(&mut self, id: ConnId) -> Result<(), ConnectionError> {
        self.abort(id)
    }

    /// Moves received guest bytes into `buf`. `Ready(Ok(0))` is the end of the guest's stream (it
    /// closed its sending side); `Pending` registers `cx`'s waker for more.
    pub fn poll_recv(
        &mut self,
        id: ConnId,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<Result<usize, ConnectionError>> {
        let conn = self.conns.get(&id).ok_or(ConnectionError::Gone)?;
        let fin_received = conn.fin_received;
        let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
        if socket.can_recv() {
            // Cannot fail: there is data and the socket is open.
            return Poll::Ready(Ok(socket.recv_slice(buf).unwrap_or(0)));
        }
        match socket.state() {
            tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing | tcp::State::TimeWait => {
                Poll::Ready(Ok(0))
            }
            tcp::State::Closed if fin_received => Poll::Ready(Ok(0)),
            tcp::State::Closed => Poll::Ready(Err(ConnectionError::Reset)),
            _ => {
                socket.register_recv_waker(cx.waker());
                Poll::Pending
            }
        }
    }

    /// Queues bytes for the guest, as many as its window and this connection's buffer take.
    /// `Pending` registers `cx`'s waker for room.
    pub fn poll_send(&mut self, id: ConnId, cx: &mut Context<'_>, buf: &[u8]) -> Poll<Result<usize, ConnectionError>> {
        let socket = self.socket_mut(id)?;
        if socket.can_send() {
            // Cannot fail: the socket is open and has room.
            return Poll::Ready(Ok(socket.send_slice(buf).unwrap_or(0)));
        }
        match socket.state() {
            tcp::State::Closed => Poll::Ready(Err(ConnectionError::Reset)),
            tcp::State::Listen | tcp::State::SynReceived | tcp::State::Established | tcp::State::CloseWait => {
                socket.register_send_waker(cx.waker());
                Poll::Pending
            }
            _ => Poll::Ready(Err(ConnectionError::Closed)),
        }
    }

    /// The upstream closed its side: FIN to the guest once the queued bytes are sent.
    pub fn close(&mut self, id: ConnId) -> Result<(), ConnectionError> {
        self.socket_mut(id)?.close();
        Ok(())
    }

    /// Resets the guest's connection (the RST leaves on the next [`Stack::poll`]) and forgets it.
    pub fn abort(&mut self, id: ConnId) -> Result<(), ConnectionError> {
        let conn = self.conns.get_mut(&id).ok_or(ConnectionError::Gone)?;
        conn.discard = true;
        self.sockets.get_mut::<tcp::Socket>(conn.handle).abort();
        Ok(())
    }

    /// The VM was restored (or its network replaced): every connection is reset towards the guest
    /// and forgotten, each announced with [`Event::Closed`]. A guest whose connections predate the
    /// snapshot then gets RST for them: from the RSTs sent now if its state matches ours, or, since
    /// no socket remains, in answer to whatever it sends on them next.
    pub fn reset_all(&mut self, now: Instant) {
        for conn in self.conns.values_mut() {
            conn.discard = true;
            self.sockets.get_mut::<tcp::Socket>(conn.handle).abort();
        }
        self.poll(now);
        // `poll` removed every aborted connection; nothing may survive a restore.
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            self.remove(id);
        }
        let socket = self.sockets.get_mut::<udp::Socket>(self.dns);
        while socket.recv().is_ok() {}
    }

    /// Open connections, including ones waiting for their upstream.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The guest-visible destination of a connection, if it is open.
    pub fn destination(&self, id: ConnId) -> Option<SocketAddrV4> {
        self.conns.get(&id).map(|c| c.dest)
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Removes connections both sides are done with: closed (after a reset, an abort, a timeout or a
    /// full close) or in TIME-WAIT, once the caller has read what the guest sent before its FIN.
    fn sweep(&mut self) {
        let mut finished = Vec::new();
        for (&id, conn) in self.conns.iter_mut() {
            let socket = self.sockets.get::<tcp::Socket>(conn.handle);
            let state = socket.state();
            if matches!(
                state,
                tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing | tcp::State::TimeWait
            ) {
                conn.fin_received = true;
            }
            let done = matches!(state, tcp::State::Closed | tcp::State::TimeWait);
            let drained = socket.recv_queue() == 0 || !conn.fin_received || conn.discard;
            if done && drained {
                finished.push(id);
            }
        }
        for id in finished {
            self.remove(id);
        }
    }

    fn remove(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.remove(&id) {
            self.sockets.remove(conn.handle);
            self.by_tuple.remove(&(conn.guest, conn.dest));
            self.events.push_back(Event::Closed(id));
        }
    }

    fn socket(&self, id: ConnId) -> Option<&tcp::Socket<'static>> {
        self.conns.get(&id).map(|c| self.sockets.get::<tcp::Socket>(c.handle))
    }

    fn socket_mut(&mut self, id: ConnId) -> Result<&mut tcp::Socket<'static>, ConnectionError> {
        let conn = self.conns.get(&id).ok_or(ConnectionError::Gone)?;
        Ok(self.sockets.get_mut::<tcp::Socket>(conn.handle))
    }

    fn smoltcp_now(&self, now: Instant) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(now.saturating_duration_since(self.epoch).as_micros() as i64)
    }
}
