//! The guest side of the tests: a second smoltcp interface with the guest's address and a default
//! route via the gateway, as a Linux guest is configured. Its TCP is a real TCP client.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint};

pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);

pub struct Guest {
    iface: Interface,
    device: Wire,
    pub sockets: SocketSet<'static>,
    epoch: Instant,
    next_port: u16,
}

impl Guest {
    pub fn new(now: Instant) -> Guest {
        let mut device = Wire::default();
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ip),
            &mut device,
            smoltcp::time::Instant::ZERO,
        );
        iface.update_ip_addrs(|addrs| addrs.push(IpCidr::new(IpAddress::Ipv4(GUEST), 24)).unwrap());
        iface.routes_mut().add_default_ipv4_route(GATEWAY).unwrap();
        Guest {
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            epoch: now,
            next_port: 40000,
        }
    }

    pub fn poll(&mut self, now: Instant) {
        let now = self.time(now);
        self.iface.poll(now, &mut self.device, &mut self.sockets);
    }

    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        let now = self.time(now);
        self.iface.poll_delay(now, &self.sockets).map(Duration::from)
    }

    /// Packets the guest sent, for the stack.
    pub fn take_sent(&mut self) -> Vec<Vec<u8>> {
        self.device.tx.drain(..).collect()
    }

    /// A packet from the stack, for the guest.
    pub fn deliver(&mut self, packet: Vec<u8>) {
        self.device.rx.push_back(packet);
    }

    /// Starts a TCP connection to `dest` from a fresh port, with 64 KiB buffers.
    pub fn connect(&mut self, dest: SocketAddrV4) -> SocketHandle {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
        );
        let port = self.next_port;
        self.next_port = if port == 65000 { 40000 } else { port + 1 };
        socket
            .connect(
                self.iface.context(),
                IpEndpoint::new(IpAddress::Ipv4(*dest.ip()), dest.port()),
                port,
            )
            .unwrap();
        self.sockets.add(socket)
    }

    pub fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    pub fn udp_bind(&mut self, port: u16) -> SocketHandle {
        let mut socket = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 8192]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 8192]),
        );
        socket.bind(port).unwrap();
        self.sockets.add(socket)
    }

    pub fn udp(&mut self, handle: SocketHandle) -> &mut udp::Socket<'static> {
        self.sockets.get_mut::<udp::Socket>(handle)
    }

    fn time(&self, now: Instant) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(now.saturating_duration_since(self.epoch).as_micros() as i64)
    }
}

pub fn endpoint(addr: SocketAddrV4) -> IpEndpoint {
    IpEndpoint::new(IpAddress::Ipv4(*addr.ip()), addr.port())
}

#[derive(Default)]
struct Wire {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

impl Device for Wire {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _now: smoltcp::time::Instant) -> Option<(Rx, Tx<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((Rx(packet), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _now: smoltcp::time::Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = 1500;
        caps
    }
}

struct Rx(Vec<u8>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0; len];
        let result = f(&mut packet);
        self.0.push_back(packet);
        result
    }
}
