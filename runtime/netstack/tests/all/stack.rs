//! The synchronous stack against a guest, on a virtual clock (one millisecond per step): no sleeps,
//! and timers (delayed ACKs, retransmissions) fire by moving the clock.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use kiln_netstack::{Config, ConnId, ConnectionError, Decision, Event, Protocol, Stack, Target};
use smoltcp::socket::tcp::State;

use crate::guest::{endpoint, Guest, DNS, GUEST};

const SITE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// Any address: the sync tests never connect upstream, they play the driver themselves.
const UPSTREAM: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9));

struct Lab {
    guest: Guest,
    stack: Stack,
    now: Instant,
    /// When false, packets from the stack are thrown away (lost, or sent to a VM since restored).
    deliver: bool,
}

impl Lab {
    fn new(config: Config, policy: impl Fn(Protocol, SocketAddrV4) -> Decision + Send + 'static) -> Lab {
        let now = Instant::now();
        Lab {
            guest: Guest::new(now),
            stack: Stack::new(config, policy, now).unwrap(),
            now,
            deliver: true,
        }
    }

    /// Only port 80 of SITE is allowed.
    fn web() -> Lab {
        Lab::new(Config::default(), |_, dest: SocketAddrV4| {
            if dest == SocketAddrV4::new(SITE, 80) {
                Decision::Allow(UPSTREAM)
            } else {
                Decision::Deny
            }
        })
    }

    fn step(&mut self) {
        self.now += Duration::from_millis(1);
        self.guest.poll(self.now);
        for packet in self.guest.take_sent() {
            self.stack.guest_packet(self.now, &packet);
        }
        self.stack.poll(self.now);
        while let Some(packet) = self.stack.pop_guest_packet() {
            if self.deliver {
                self.guest.deliver(packet);
            }
        }
        self.guest.poll(self.now);
    }

    /// Steps until `done`, failing after `max` steps; returns the steps taken.
    fn until(&mut self, max: usize, mut done: impl FnMut(&mut Lab) -> bool) -> usize {
        for steps in 0..=max {
            if done(self) {
                return steps;
            }
            self.step();
        }
        panic!("condition not reached in {max} steps");
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.stack.next_event()).collect()
    }

    fn connect_event(&mut self) -> ConnId {
        match self.events().as_slice() {
            [Event::Connect(conn)] => conn.id,
            other => panic!("expected one Connect, got {other:?}"),
        }
    }

    /// A connection to SITE:80, accepted and established on both sides.
    fn established(&mut self) -> (smoltcp::iface::SocketHandle, ConnId) {
        let handle = self.guest.connect(SocketAddrV4::new(SITE, 80));
        self.step();
        let id = self.connect_event();
        self.stack.accept(id).unwrap();
        self.until(20, |lab| lab.guest.tcp(handle).state() == State::Established);
        (handle, id)
    }

    fn recv(&mut self, id: ConnId) -> Poll<Result<usize, ConnectionError>> {
        let mut buf = [0; 4096];
        self.stack
            .poll_recv(id, &mut Context::from_waker(Waker::noop()), &mut buf)
    }
}

fn send(stack: &mut Stack, id: ConnId, bytes: &[u8]) -> Poll<Result<usize, ConnectionError>> {
    stack.poll_send(id, &mut Context::from_waker(Waker::noop()), bytes)
}

#[test]
fn a_denied_destination_is_reset_at_once() {
    let mut lab = Lab::web();
    let handle = lab.guest.connect(SocketAddrV4::new(SITE, 81));
    let steps = lab.until(3, |lab| lab.guest.tcp(handle).state() == State::Closed);
    assert!(steps <= 2, "reset after {steps} steps");
    assert_eq!(lab.stack.stats().tcp_denied, 1);
    assert_eq!(lab.stack.connections(), 0);
    assert_eq!(lab.events(), []);
}

#[test]
fn an_allowed_connection_waits_for_its_upstream_then_carries_bytes_both_ways() {
    let mut lab = Lab::web();
    let handle = lab.guest.connect(SocketAddrV4::new(SITE, 80));
    lab.step();
    let conn = match lab.events().as_slice() {
        [Event::Connect(conn)] => conn.clone(),
        other => panic!("expected one Connect, got {other:?}"),
    };
    assert_eq!(conn.dest, SocketAddrV4::new(SITE, 80));
    assert_eq!(*conn.guest.ip(), GUEST);
    assert_eq!(conn.target, Target::Connect(UPSTREAM));

    // The SYN|ACK is held while the upstream connects.
    for _ in 0..50 {
        lab.step();
    }
    assert_eq!(lab.guest.tcp(handle).state(), State::SynSent);
    assert_eq!(lab.recv(conn.id), Poll::Pending);

    lab.stack.accept(conn.id).unwrap();
    lab.until(5, |lab| lab.guest.tcp(handle).state() == State::Established);

    lab.guest.tcp(handle).send_slice(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut got = Vec::new();
    lab.until(20, |lab| {
        let mut buf = [0; 64];
        if let Poll::Ready(Ok(n)) = lab
            .stack
            .poll_recv(conn.id, &mut Context::from_waker(Waker::noop()), &mut buf)
        {
            got.extend_from_slice(&buf[..n]);
        }
        got.len() == 18
    });
    assert_eq!(got, b"GET / HTTP/1.0\r\n\r\n");

    assert_eq!(
        send(&mut lab.stack, conn.id, b"HTTP/1.0 200 OK\r\n\r\n"),
        Poll::Ready(Ok(19))
    );
    lab.until(20, |lab| lab.guest.tcp(handle).recv_queue() == 19);

    // The guest closes, then the upstream: both FINs, and the connection is swept.
    lab.guest.tcp(handle).close();
    lab.until(20, |lab| lab.recv(conn.id) == Poll::Ready(Ok(0)));
    lab.stack.close(conn.id).unwrap();
    lab.until(50, |lab| lab.stack.connections() == 0);
    assert!(matches!(lab.guest.tcp(handle).state(), State::TimeWait | State::Closed));
    assert_eq!(lab.events(), [Event::Closed(conn.id)]);
    assert_eq!(lab.recv(conn.id), Poll::Ready(Err(ConnectionError::Gone)));
}

#[test]
fn an_unreachable_upstream_resets_the_guest() {
    let mut lab = Lab::web();
    let handle = lab.guest.connect(SocketAddrV4::new(SITE, 80));
    lab.step();
    let id = lab.connect_event();
    lab.stack.refuse(id).unwrap();
    lab.until(3, |lab| lab.guest.tcp(handle).state() == State::Closed);
    assert_eq!(lab.stack.connections(), 0);
    assert_eq!(lab.events(), [Event::Closed(id)]);
}

#[test]
fn a_retransmitted_syn_is_the_same_connection() {
    let mut lab = Lab::web();
    let handle = lab.guest.connect(SocketAddrV4::new(SITE, 80));
    lab.step();
    let id = lab.connect_event();
    // Past the guest's first SYN retransmission (smoltcp's initial RTO is 1 s).
    for _ in 0..3 {
        lab.now += Duration::from_millis(1100);
        lab.step();
    }
    assert_eq!(lab.events(), []);
    assert_eq!(lab.stack.connections(), 1);
    lab.stack.accept(id).unwrap();
    lab.until(5, |lab| lab.guest.tcp(handle).state() == State::Established);
}

#[test]
fn connections_over_the_limit_are_reset() {
    let config = Config {
        max_connections: 2,
        ..Config::default()
    };
    let mut lab = Lab::new(config, |_, _| Decision::Allow(UPSTREAM));
    let handles: Vec<_> = (0..3).map(|_| lab.guest.connect(SocketAddrV4::new(SITE, 80))).collect();
    lab.until(3, |lab| lab.guest.tcp(handles[2]).state() == State::Closed);
    assert_eq!(lab.stack.stats().tcp_over_limit, 1);
    assert_eq!(lab.stack.connections(), 2);
    assert_eq!(lab.guest.tcp(handles[0]).state(), State::SynSent);
    assert_eq!(lab.guest.tcp(handles[1]).state(), State::SynSent);
}

#[test]
fn a_guest_reset_is_seen_by_the_caller_and_swept() {
    let mut lab = Lab::web();
    let (handle, id) = lab.established();
    lab.guest.tcp(handle).abort();
    lab.until(5, |lab| lab.stack.connections() == 0);
    assert_eq!(lab.events(), [Event::Closed(id)]);
    assert_eq!(
        send(&mut lab.stack, id, b"late"),
        Poll::Ready(Err(ConnectionError::Gone))
    );
}

#[test]
fn reset_all_resets_the_guests_connections() {
    let mut lab = Lab::web();
    let (handle, id) = lab.established();
    lab.stack.reset_all(lab.now);
    assert_eq!(lab.stack.connections(), 0);
    assert_eq!(lab.events(), [Event::Closed(id)]);
    lab.until(3, |lab| lab.guest.tcp(handle).state() == State::Closed);
}

#[test]
fn after_reset_all_a_connection_the_rst_missed_is_reset_when_it_speaks() {
    // As after a restore from an older snapshot: the RSTs sent at reset never reach this guest state.
    let mut lab = Lab::web();
    let (handle, _) = lab.established();
    lab.deliver = false;
    lab.stack.reset_all(lab.now);
    lab.step();
    lab.deliver = true;
    assert_eq!(lab.guest.tcp(handle).state(), State::Established);
    lab.guest.tcp(handle).send_slice(b"still there?").unwrap();
    lab.until(3, |lab| lab.guest.tcp(handle).state() == State::Closed);
    assert_eq!(lab.stack.connections(), 0);
}

#[test]
fn udp_goes_nowhere_but_dns() {
    let mut lab = Lab::web();
    let socket = lab.guest.udp_bind(5353);
    lab.guest
        .udp(socket)
        .send_slice(b"hello?", endpoint(SocketAddrV4::new(SITE, 9999)))
        .unwrap();
    lab.guest
        .udp(socket)
        .send_slice(b"gateway?", endpoint(SocketAddrV4::new(crate::guest::GATEWAY, 53)))
        .unwrap();
    lab.until(3, |lab| lab.stack.stats().udp_dropped == 2);
    assert_eq!(lab.events(), []);

    lab.guest
        .udp(socket)
        .send_slice(b"query", endpoint(SocketAddrV4::new(DNS, 53)))
        .unwrap();
    lab.step();
    let query = match lab.events().as_slice() {
        [Event::Dns(query)] => query.clone(),
        other => panic!("expected one Dns, got {other:?}"),
    };
    assert_eq!(query.query, b"query");
    assert_eq!(query.guest, SocketAddrV4::new(GUEST, 5353));
    lab.stack.dns_reply(query.guest, b"answer");
    lab.until(3, |lab| lab.guest.udp(socket).can_recv());
    let (answer, meta) = lab.guest.udp(socket).recv().unwrap();
    assert_eq!(answer, b"answer");
    assert_eq!(meta.endpoint, endpoint(SocketAddrV4::new(DNS, 53)));
    assert_eq!(lab.stack.stats().dns_queries, 1);
}

/// A small deterministic generator (xorshift64*): no dependency, and a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_and_mangled_packets_never_panic() {
    let mut lab = Lab::new(
        Config {
            max_connections: 8,
            ..Config::default()
        },
        |_, dest: SocketAddrV4| {
            if dest.port().is_multiple_of(2) {
                Decision::Allow(UPSTREAM)
            } else {
                Decision::Deny
            }
        },
    );
    // Real packets to mangle: SYNs, data, DNS.
    let mut samples = Vec::new();
    for port in [80, 81, 443] {
        let handle = lab.guest.connect(SocketAddrV4::new(SITE, port));
        lab.guest.poll(lab.now);
        samples.extend(lab.guest.take_sent());
        lab.guest.sockets.remove(handle);
    }
    let dns = lab.guest.udp_bind(5353);
    lab.guest
        .udp(dns)
        .send_slice(b"\x12\x34query", endpoint(SocketAddrV4::new(DNS, 53)))
        .unwrap();
    lab.guest.poll(lab.now);
    samples.extend(lab.guest.take_sent());

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..20_000 {
        let packet: Vec<u8> = match rng.below(3) {
            // Pure noise, often with an IPv4 first nibble so it gets past the version check.
            0 => {
                let mut bytes: Vec<u8> = (0..rng.below(1600)).map(|_| rng.next() as u8).collect();
                if let Some(first) = bytes.first_mut() {
                    *first = 0x45;
                }
                bytes
            }
            // A real packet with a few bytes changed or cut short.
            1 => {
                let mut bytes = samples[rng.below(samples.len() as u64) as usize].clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(bytes.len() as u64) as usize;
                    bytes[at] = rng.next() as u8;
                }
                bytes.truncate(rng.below(bytes.len() as u64 + 1) as usize);
                bytes
            }
            // A real packet, unchanged: connections open and the table fills.
            _ => samples[rng.below(samples.len() as u64) as usize].clone(),
        };
        lab.stack.guest_packet(lab.now, &packet);
        if round % 50 == 0 {
            lab.now += Duration::from_millis(rng.below(2000));
            lab.stack.poll(lab.now);
            while lab.stack.pop_guest_packet().is_some() {}
            // Play a careless driver: accept, refuse or abort what comes.
            while let Some(event) = lab.stack.next_event() {
                match event {
                    Event::Connect(conn) => match rng.below(3) {
                        0 => drop(lab.stack.accept(conn.id)),
                        1 => drop(lab.stack.refuse(conn.id)),
                        _ => drop(lab.stack.abort(conn.id)),
                    },
                    Event::Dns(query) => lab.stack.dns_reply(query.guest, &query.query),
                    Event::Datagram(datagram) => {
                        lab.stack
                            .datagram_to_guest(datagram.dest, datagram.guest, &datagram.payload)
                    }
                    Event::Closed(_) => {}
                }
            }
        }
    }
    let stats = lab.stack.stats();
    assert!(stats.malformed > 1000, "{stats:?}");
    assert!(lab.stack.connections() <= 8);
}

#[test]
fn neither_side_can_push_more_than_the_windows_hold() {
    let config = Config {
        buffer_size: 16 * 1024,
        ..Config::default()
    };
    let mut lab = Lab::new(config, |_, _| Decision::Allow(UPSTREAM));
    let (handle, id) = lab.established();
    lab.until(5, |lab| send(&mut lab.stack, id, b"").is_ready());

    // Upstream → guest, the guest not reading: its 64 KiB buffer plus this connection's 16 KiB.
    let mut accepted = 0;
    for _ in 0..200 {
        while let Poll::Ready(Ok(n @ 1..)) = send(&mut lab.stack, id, &[7; 1024]) {
            accepted += n;
        }
        lab.step();
    }
    assert_eq!(accepted, 80 * 1024);
    assert_eq!(send(&mut lab.stack, id, &[7; 1024]), Poll::Pending);

    // Guest → upstream, the caller not reading: the guest fills this connection's 16 KiB, then waits.
    let data = vec![9; 1024 * 1024];
    let mut pushed = 0;
    for _ in 0..200 {
        pushed += lab.guest.tcp(handle).send_slice(&data[pushed..]).unwrap();
        lab.step();
    }
    assert_eq!(pushed - lab.guest.tcp(handle).send_queue(), 16 * 1024);
    let mut buf = vec![0; 64 * 1024];
    let mut cx = Context::from_waker(Waker::noop());
    assert_eq!(lab.stack.poll_recv(id, &mut cx, &mut buf), Poll::Ready(Ok(16 * 1024)));
}
