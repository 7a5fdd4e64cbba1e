//! The driver end to end: a guest's TCP through [`Network`] to real tokio servers on 127.0.0.1.
//! Waits are on conditions with a deadline; the guest's loop wakes on each packet.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_netstack::{Config, Decision, Network, Protocol, Service};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;

use crate::guest::{endpoint, Guest, DNS, GATEWAY};

const SITE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const DEADLINE: Duration = Duration::from_secs(30);

/// A guest wired to a running [`Network`].
struct Vm {
    guest: Guest,
    to_stack: mpsc::Sender<Vec<u8>>,
    from_stack: mpsc::Receiver<Vec<u8>>,
    network: Option<Network>,
}

impl Vm {
    fn start(policy: impl Fn(Protocol, SocketAddrV4) -> Decision + Send + 'static) -> Vm {
        Vm::with_dns(policy, |_| async { None })
    }

    fn with_dns<D, F>(policy: impl Fn(Protocol, SocketAddrV4) -> Decision + Send + 'static, dns: D) -> Vm
    where
        D: Fn(Vec<u8>) -> F + Send + Sync + 'static,
        F: std::future::Future<Output = Option<Vec<u8>>> + Send + 'static,
    {
        let (to_stack, from_guest) = mpsc::channel(256);
        let (to_guest, from_stack) = mpsc::channel(256);
        let network = Network::spawn(Config::default(), policy, dns, from_guest, to_guest).unwrap();
        Vm {
            guest: Guest::new(Instant::now()),
            to_stack,
            from_stack,
            network: Some(network),
        }
    }

    fn network(&self) -> &Network {
        self.network.as_ref().unwrap()
    }

    /// Runs the guest until `done` holds, failing after [`DEADLINE`].
    async fn until(&mut self, mut done: impl FnMut(&mut Guest, Option<&Network>) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let now = Instant::now();
            self.guest.poll(now);
            for packet in self.guest.take_sent() {
                // A stopped network drops what the guest sends, as a dead link would.
                let _ = self.to_stack.send(packet).await;
            }
            if done(&mut self.guest, self.network.as_ref()) {
                return;
            }
            assert!(now < deadline, "condition not reached in {DEADLINE:?}");
            // Short, so conditions on the host side (counters, servers) are seen soon.
            let wait = self
                .guest
                .poll_delay(now)
                .unwrap_or(Duration::MAX)
                .min(Duration::from_millis(5));
            tokio::select! {
                Some(packet) = self.from_stack.recv() => {
                    self.guest.deliver(packet);
                    while let Ok(packet) = self.from_stack.try_recv() {
                        self.guest.deliver(packet);
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn establish(&mut self, dest: SocketAddrV4) -> SocketHandle {
        let handle = self.guest.connect(dest);
        self.until(|guest, _| guest.tcp(handle).state() == State::Established)
            .await;
        handle
    }

    /// Sends `data` and reads back as many bytes (through an echo server).
    async fn echo(&mut self, handle: SocketHandle, data: &[u8]) -> Vec<u8> {
        let mut sent = 0;
        let mut got = Vec::with_capacity(data.len());
        self.until(|guest, _| {
            let socket = guest.tcp(handle);
            if sent < data.len() && socket.can_send() {
                sent += socket.send_slice(&data[sent..]).unwrap();
            }
            while socket.can_recv() {
                socket
                    .recv(|bytes| {
                        got.extend_from_slice(bytes);
                        (bytes.len(), ())
                    })
                    .unwrap();
            }
            got.len() >= data.len()
        })
        .await;
        got
    }
}

/// A TCP echo server counting connections accepted and still open.
struct Echo {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

async fn echo_server() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let counters = (accepted.clone(), open.clone());
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            counters.0.fetch_add(1, Ordering::SeqCst);
            counters.1.fetch_add(1, Ordering::SeqCst);
            let open = counters.1.clone();
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
                // Wait for the peer's close (or reset), so "open" counts what the host still holds.
                let _ = reader.read(&mut [0; 1]).await;
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Echo { addr, accepted, open }
}

/// SITE:80 is the echo server; everything else is denied.
fn web(server: SocketAddr) -> impl Fn(Protocol, SocketAddrV4) -> Decision + Send + 'static {
    move |_, dest| {
        if dest == SocketAddrV4::new(SITE, 80) {
            Decision::Allow(server)
        } else {
            Decision::Deny
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mebibyte_goes_to_an_allowed_server_and_comes_back_intact() {
    let server = echo_server().await;
    let mut vm = Vm::start(web(server.addr));
    let handle = vm.establish(SocketAddrV4::new(SITE, 80)).await;
    let data: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let got = vm.echo(handle, &data).await;
    assert!(got == data, "the echo differs from what was sent");

    vm.guest.tcp(handle).close();
    let open = server.open.clone();
    vm.until(|_, network| network.unwrap().connections() == 0 && open.load(Ordering::SeqCst) == 0)
        .await;
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    assert!(matches!(vm.guest.tcp(handle).state(), State::TimeWait | State::Closed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_destination_is_answered_in_process_and_nothing_is_dialled() {
    // The service echoes, then ends when the guest closes; `served` counts connections it saw
    // and `ended` the ones whose stream it saw closed.
    let (served, ended) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let service = {
        let (served, ended) = (served.clone(), ended.clone());
        Service::new(move |stream: tokio::io::DuplexStream| {
            served.fetch_add(1, Ordering::SeqCst);
            let ended = ended.clone();
            async move {
                let (mut reader, mut writer) = tokio::io::split(stream);
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
                ended.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let mut vm = Vm::start(move |_, dest| {
        if dest == SocketAddrV4::new(SITE, 80) {
            Decision::Serve(service.clone())
        } else {
            Decision::Deny
        }
    });
    let handle = vm.establish(SocketAddrV4::new(SITE, 80)).await;
    let data: Vec<u8> = (0..256 * 1024).map(|i| (i * 13 % 251) as u8).collect();
    let got = vm.echo(handle, &data).await;
    assert!(got == data, "the service's echo differs from what was sent");
    vm.guest.tcp(handle).close();
    vm.until(|_, network| network.unwrap().connections() == 0 && ended.load(Ordering::SeqCst) == 1)
        .await;
    assert_eq!(served.load(Ordering::SeqCst), 1);
    assert_eq!(vm.network().stats().tcp_allowed, 1);
    assert!(matches!(vm.guest.tcp(handle).state(), State::TimeWait | State::Closed));
}

#[tokio::test]
async fn a_denied_port_is_refused_at_once_and_never_reaches_the_host() {
    let server = echo_server().await;
    let mut vm = Vm::start(web(server.addr));
    let handle = vm.guest.connect(SocketAddrV4::new(SITE, 81));
    let start = Instant::now();
    vm.until(|guest, _| guest.tcp(handle).state() == State::Closed).await;
    // Refused, not timed out: well before the guest's first SYN retransmission (1 s).
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "reset after {:?}",
        start.elapsed()
    );
    assert_eq!(vm.network().stats().tcp_denied, 1);
    assert_eq!(server.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_allowed_destination_that_refuses_resets_the_guest() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let mut vm = Vm::start(move |_, _| Decision::Allow(closed));
    let handle = vm.guest.connect(SocketAddrV4::new(SITE, 80));
    vm.until(|guest, _| guest.tcp(handle).state() == State::Closed).await;
    vm.until(|_, network| network.unwrap().connections() == 0).await;
    assert_eq!(vm.network().stats().tcp_allowed, 1);
}

#[tokio::test]
async fn udp_to_anywhere_but_dns_goes_nowhere() {
    let listener = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // A policy that allows every TCP connection there, and no datagram.
    let target = listener.local_addr().unwrap();
    let mut vm = Vm::start(move |protocol, _| match protocol {
        Protocol::Tcp => Decision::Allow(target),
        Protocol::Udp => Decision::Deny,
    });
    let socket = vm.guest.udp_bind(5000);
    for dest in [SITE, GATEWAY, DNS] {
        vm.guest
            .udp(socket)
            .send_slice(b"anyone?", endpoint(SocketAddrV4::new(dest, port)))
            .unwrap();
    }
    vm.until(|_, network| network.unwrap().stats().udp_dropped == 3).await;
    let mut buf = [0; 64];
    assert!(listener.try_recv_from(&mut buf).is_err(), "a datagram left the stack");
    assert_eq!(vm.network().stats().dns_queries, 0);
}

#[tokio::test]
async fn udp_the_policy_allows_goes_out_and_its_answers_come_back_from_where_the_guest_wrote() {
    // An echo server on the host, reached as SITE:7 over UDP; SITE:8 is denied.
    let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0; 2048];
        loop {
            let (n, from) = echo.recv_from(&mut buf).await.unwrap();
            let mut answer = b"echo ".to_vec();
            answer.extend_from_slice(&buf[..n]);
            echo.send_to(&answer, from).await.unwrap();
        }
    });
    let mut vm = Vm::start(move |protocol, dest| match (protocol, dest.port()) {
        (Protocol::Udp, 7) => Decision::Allow(target),
        _ => Decision::Deny,
    });
    let socket = vm.guest.udp_bind(5000);
    for (port, payload) in [(7, &b"one"[..]), (8, b"denied"), (7, b"two")] {
        vm.guest
            .udp(socket)
            .send_slice(payload, endpoint(SocketAddrV4::new(SITE, port)))
            .unwrap();
    }
    let mut answers = Vec::new();
    vm.until(|guest, _| {
        while let Ok((answer, meta)) = guest.udp(socket).recv() {
            answers.push((answer.to_vec(), meta.endpoint));
        }
        answers.len() == 2
    })
    .await;
    answers.sort();
    let from = endpoint(SocketAddrV4::new(SITE, 7));
    assert_eq!(
        answers,
        vec![(b"echo one".to_vec(), from), (b"echo two".to_vec(), from)]
    );
    let stats = vm.network().stats();
    assert_eq!((stats.udp_forwarded, stats.udp_dropped), (2, 1), "{stats:?}");
}

#[tokio::test]
async fn a_dns_query_gets_the_callbacks_answer_from_the_dns_address() {
    let mut vm = Vm::with_dns(
        |_, _| Decision::Deny,
        |query: Vec<u8>| async move {
            let mut answer = b"answer to ".to_vec();
            answer.extend_from_slice(&query);
            Some(answer)
        },
    );
    let socket = vm.guest.udp_bind(5353);
    vm.guest
        .udp(socket)
        .send_slice(b"\x12\x34 example.com A", endpoint(SocketAddrV4::new(DNS, 53)))
        .unwrap();
    vm.until(|guest, _| guest.udp(socket).can_recv()).await;
    let (answer, meta) = vm.guest.udp(socket).recv().unwrap();
    assert_eq!(answer, b"answer to \x12\x34 example.com A");
    assert_eq!(meta.endpoint, endpoint(SocketAddrV4::new(DNS, 53)));
    assert_eq!(vm.network().stats().dns_queries, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_opened_and_closed_leave_nothing_behind() {
    let server = echo_server().await;
    let mut vm = Vm::start(web(server.addr));
    for _ in 0..1000 {
        let handle = vm.establish(SocketAddrV4::new(SITE, 80)).await;
        assert_eq!(vm.echo(handle, b"ping").await, b"ping");
        vm.guest.tcp(handle).close();
        vm.until(|guest, _| matches!(guest.tcp(handle).state(), State::TimeWait | State::Closed))
            .await;
        vm.guest.sockets.remove(handle);
    }
    let open = server.open.clone();
    vm.until(|_, network| network.unwrap().connections() == 0 && open.load(Ordering::SeqCst) == 0)
        .await;
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1000);
    let stats = vm.network().stats();
    assert_eq!(stats.tcp_allowed, 1000);
    assert_eq!((stats.malformed, stats.spoofed, stats.tcp_over_limit), (0, 0, 0));
}

#[tokio::test]
async fn after_a_restore_the_old_connections_are_reset_not_resumed() {
    let server = echo_server().await;
    let mut vm = Vm::start(web(server.addr));
    let handle = vm.establish(SocketAddrV4::new(SITE, 80)).await;
    assert_eq!(vm.echo(handle, b"before").await, b"before");

    vm.network().reset_all();
    let open = server.open.clone();
    vm.until(|guest, network| {
        guest.tcp(handle).state() == State::Closed
            && network.unwrap().connections() == 0
            && open.load(Ordering::SeqCst) == 0
    })
    .await;

    // The network itself carries on: a new connection works.
    let handle = vm.establish(SocketAddrV4::new(SITE, 80)).await;
    assert_eq!(vm.echo(handle, b"after").await, b"after");
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn dropping_the_network_closes_every_upstream() {
    let server = echo_server().await;
    let mut vm = Vm::start(web(server.addr));
    for _ in 0..3 {
        let handle = vm.establish(SocketAddrV4::new(SITE, 80)).await;
        assert_eq!(vm.echo(handle, b"hi").await, b"hi");
    }
    assert_eq!(server.open.load(Ordering::SeqCst), 3);
    drop(vm.network.take());
    let open = server.open.clone();
    vm.until(|_, _| open.load(Ordering::SeqCst) == 0).await;
}
