//! A microVM's network, on the host: a user-space TCP/IP endpoint that terminates every connection the
//! guest makes and re-originates the allowed ones from the host.
//!
//! ```text
//!  guest (TUN, 10.0.2.15/24, default via 10.0.2.2)
//!     │ IPv4 packets, relayed by the agent over its frame channel
//!     ▼
//!  Stack ── SYN to (ip, port) ──► policy ──► Deny: RST at once
//!     │                                  ├─► Allow(addr): socket on exactly (ip, port), SYN|ACK held
//!     │                                  └─► Serve(service): the same, answered in-process
//!     │ TCP bytes ◄──► relay task ◄──► tokio TcpStream to addr (SYN|ACK sent once it connects),
//!     │                               or an in-memory pipe to the service
//!     │ UDP to 10.0.2.3:53 ──► DNS callback ──► answer from 10.0.2.3:53
//!     │ other UDP ──► policy ──► Allow(addr): sent from a host socket of its flow, answers back
//!     └ denied UDP, ICMP, other protocols, fragments, spoofed sources: counted and dropped
//! ```
//!
//! Why each choice:
//! - **User space, no host network set-up.** No tap device, bridge, iptables or root: the guest's
//!   packets are bytes to this crate, and what leaves the host is an ordinary socket Kiln opened itself,
//!   after Kiln's own policy said yes. A guest cannot reach anything the host process did not connect.
//! - **Any destination is "local" (smoltcp's AnyIP).** The guest routes everything to the gateway;
//!   the stack answers for every address, so each connection ends here and the guest talks to a real
//!   TCP peer whatever it dials. Programs that ignore proxy settings (busybox wget, Go, Node) just work.
//! - **Policy at the SYN, before smoltcp sees it.** A denied destination is refused with an RST, so the
//!   guest's `connect` fails at once with "connection refused" rather than timing out. An allowed SYN's
//!   SYN|ACK waits until the upstream connect succeeds, so an unreachable upstream is also a refused
//!   connect, never a connection that opens and then drops.
//! - **DNS only through Kiln.** UDP to the DNS address, port 53, goes to a callback (Kiln's resolver,
//!   under the same policy). Every other datagram asks the policy too, and is dropped and counted
//!   unless allowed: then it leaves from a host socket connected to the target, one per flow
//!   (guest port → destination; at most 64, closed after 60 s of silence), so only the target's
//!   answers come back. ICMP is not forwarded (no ping, no traceroute).
//! - **Restore resets.** A restored VM's TCP state is a copy from the past; resuming it against fresh
//!   upstream sockets would corrupt both streams. [`Network::reset_all`] (or a new [`Network`]) resets
//!   every old connection towards the guest and closes its upstream; a connection the RSTs miss is reset
//!   the first time the guest sends on it, as no socket owns it any more.
//! - **Bounded.** At most [`Config::max_connections`] connections (more are reset), each with
//!   [`Config::buffer_size`] of window each way; a relay holds one 16 KiB chunk per direction and moves
//!   bytes only when the other side has room, so a slow guest or upstream stalls its own connection
//!   (TCP backpressure) and costs the host no more than its buffers. DNS queries in flight are capped.
//!
//! [`Stack`] is the synchronous core (no I/O, no clock: tests drive it step by step); [`Network`] is
//! the tokio driver that owns one and talks to the real network.

mod config;
mod device;
mod network;
mod packet;
mod stack;

pub use config::{Config, ConfigError};
pub use network::Network;
pub use stack::{
    ConnId, Connection, ConnectionError, Datagram, Decision, DnsQuery, Event, Protocol, Service, Stack, Stats, Target,
};
