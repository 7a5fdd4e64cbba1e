//! What a guest packet is, decided before smoltcp sees it, and the RST the stack answers a refused SYN with.
//!
//! Parsing here is the same smoltcp `wire` code the interface runs (checksums included), so a packet
//! that passes classification is one smoltcp accepts, and a packet that fails it is counted and dropped.

use std::net::SocketAddrV4;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpAddress, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket,
    UdpRepr,
};

/// The well-known DNS port: UDP to it at the DNS address is Kiln's resolver's.
pub(crate) const DNS_PORT: u16 = 53;

/// A guest packet's fate.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// A TCP segment opening a connection (SYN without ACK): policy decides before smoltcp sees it.
    Syn {
        guest: SocketAddrV4,
        dest: SocketAddrV4,
        seq: TcpSeqNumber,
    },
    /// Any other TCP segment: smoltcp handles it (or answers RST when no connection owns it).
    Tcp,
    /// A datagram to the DNS address, port 53.
    Dns,
    /// Any other datagram: the policy decides whether it is forwarded.
    Udp {
        guest: SocketAddrV4,
        dest: SocketAddrV4,
        payload: Vec<u8>,
    },
    Drop(Dropped),
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum Dropped {
    /// Not IPv4, bad lengths or checksums, a fragment, a broadcast or multicast destination.
    Malformed,
    /// A source address other than the guest's: the guest has exactly one address.
    Spoofed,
    Icmp,
    /// Any other IP protocol.
    Protocol,
}

pub(crate) fn classify(packet: &[u8], guest_ip: Ipv4Address, dns_ip: Ipv4Address) -> Class {
    let checksums = ChecksumCapabilities::default();
    let Ok(ip_packet) = Ipv4Packet::new_checked(packet) else {
        return Class::Drop(Dropped::Malformed);
    };
    // `parse` refuses other versions, bad header checksums and (without the fragmentation feature) fragments.
    let Ok(ip) = Ipv4Repr::parse(&ip_packet, &checksums) else {
        return Class::Drop(Dropped::Malformed);
    };
    if ip.src_addr != guest_ip {
        return Class::Drop(Dropped::Spoofed);
    }
    let dst = ip.dst_addr;
    if dst.is_broadcast() || dst.is_multicast() || dst.is_unspecified() || dst.is_loopback() {
        return Class::Drop(Dropped::Malformed);
    }
    let (src_addr, dst_addr) = (IpAddress::Ipv4(ip.src_addr), IpAddress::Ipv4(dst));
    let payload = ip_packet.payload();
    match ip.next_header {
        IpProtocol::Tcp => {
            let Ok(segment) = TcpPacket::new_checked(payload) else {
                return Class::Drop(Dropped::Malformed);
            };
            let Ok(tcp) = TcpRepr::parse(&segment, &src_addr, &dst_addr, &checksums) else {
                return Class::Drop(Dropped::Malformed);
            };
            if tcp.control == TcpControl::Syn && tcp.ack_number.is_none() {
                Class::Syn {
                    guest: SocketAddrV4::new(ip.src_addr, tcp.src_port),
                    dest: SocketAddrV4::new(dst, tcp.dst_port),
                    seq: tcp.seq_number + tcp.segment_len(),
                }
            } else {
                Class::Tcp
            }
        }
        IpProtocol::Udp => {
            let Ok(datagram) = UdpPacket::new_checked(payload) else {
                return Class::Drop(Dropped::Malformed);
            };
            let Ok(udp) = UdpRepr::parse(&datagram, &src_addr, &dst_addr, &checksums) else {
                return Class::Drop(Dropped::Malformed);
            };
            if dst == dns_ip && udp.dst_port == DNS_PORT {
                Class::Dns
            } else if udp.dst_port == 0 {
                Class::Drop(Dropped::Malformed)
            } else {
                Class::Udp {
                    guest: SocketAddrV4::new(ip.src_addr, udp.src_port),
                    dest: SocketAddrV4::new(dst, udp.dst_port),
                    payload: datagram.payload().to_vec(),
                }
            }
        }
        IpProtocol::Icmp => Class::Drop(Dropped::Icmp),
        _ => Class::Drop(Dropped::Protocol),
    }
}

/// The RST|ACK that refuses a SYN from `guest` to `dest` (`ack` = the SYN's sequence number + its
/// length), sent from `dest`: the guest's `connect` fails with "connection refused" at once.
pub(crate) fn reset(guest: SocketAddrV4, dest: SocketAddrV4, ack: TcpSeqNumber) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: dest.port(),
        dst_port: guest.port(),
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(0),
        ack_number: Some(ack),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &[],
    };
    let ip = Ipv4Repr {
        src_addr: *dest.ip(),
        dst_addr: *guest.ip(),
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let checksums = ChecksumCapabilities::default();
    let mut buffer = vec![0; ip.buffer_len() + tcp.buffer_len()];
    let mut ip_packet = Ipv4Packet::new_unchecked(&mut buffer);
    ip.emit(&mut ip_packet, &checksums);
    tcp.emit(
        &mut TcpPacket::new_unchecked(ip_packet.payload_mut()),
        &IpAddress::Ipv4(ip.src_addr),
        &IpAddress::Ipv4(ip.dst_addr),
        &checksums,
    );
    buffer
}

/// A datagram from `from` to the guest at `to`.
pub(crate) fn datagram(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let udp = UdpRepr {
        src_port: from.port(),
        dst_port: to.port(),
    };
    let ip = Ipv4Repr {
        src_addr: *from.ip(),
        dst_addr: *to.ip(),
        next_header: IpProtocol::Udp,
        payload_len: udp.header_len() + payload.len(),
        hop_limit: 64,
    };
    let checksums = ChecksumCapabilities::default();
    let mut buffer = vec![0; ip.buffer_len() + ip.payload_len];
    let mut ip_packet = Ipv4Packet::new_unchecked(&mut buffer);
    ip.emit(&mut ip_packet, &checksums);
    udp.emit(
        &mut UdpPacket::new_unchecked(ip_packet.payload_mut()),
        &IpAddress::Ipv4(ip.src_addr),
        &IpAddress::Ipv4(ip.dst_addr),
        payload.len(),
        |buf| buf.copy_from_slice(payload),
        &checksums,
    );
    buffer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_parses_as_an_rst_acking_the_syn() {
        let guest = SocketAddrV4::new(Ipv4Address::new(10, 0, 2, 15), 40000);
        let dest = SocketAddrV4::new(Ipv4Address::new(192, 0, 2, 1), 80);
        let bytes = reset(guest, dest, TcpSeqNumber(1001));
        let ip_packet = Ipv4Packet::new_checked(&bytes[..]).unwrap();
        let checksums = ChecksumCapabilities::default();
        let ip = Ipv4Repr::parse(&ip_packet, &checksums).unwrap();
        assert_eq!((ip.src_addr, ip.dst_addr), (*dest.ip(), *guest.ip()));
        let segment = TcpPacket::new_checked(ip_packet.payload()).unwrap();
        let tcp = TcpRepr::parse(&segment, &ip.src_addr.into(), &ip.dst_addr.into(), &checksums).unwrap();
        assert_eq!(tcp.control, TcpControl::Rst);
        assert_eq!(tcp.ack_number, Some(TcpSeqNumber(1001)));
        assert_eq!((tcp.src_port, tcp.dst_port), (80, 40000));
    }

    #[test]
    fn a_datagram_for_the_guest_parses_back_with_its_payload() {
        let guest = SocketAddrV4::new(Ipv4Address::new(10, 0, 2, 15), 5000);
        let from = SocketAddrV4::new(Ipv4Address::new(192, 0, 2, 1), 443);
        let bytes = datagram(from, guest, b"quic?");
        let ip_packet = Ipv4Packet::new_checked(&bytes[..]).unwrap();
        let checksums = ChecksumCapabilities::default();
        let ip = Ipv4Repr::parse(&ip_packet, &checksums).unwrap();
        assert_eq!((ip.src_addr, ip.dst_addr), (*from.ip(), *guest.ip()));
        let udp = UdpPacket::new_checked(ip_packet.payload()).unwrap();
        UdpRepr::parse(&udp, &ip.src_addr.into(), &ip.dst_addr.into(), &checksums).unwrap();
        assert_eq!(
            (udp.src_port(), udp.dst_port(), udp.payload()),
            (443, 5000, &b"quic?"[..])
        );
        // The same shape from the guest is classified as a datagram to forward, payload intact.
        let out = datagram(guest, from, b"hello");
        assert_eq!(
            classify(&out, *guest.ip(), Ipv4Address::new(10, 0, 2, 3)),
            Class::Udp {
                guest,
                dest: from,
                payload: b"hello".to_vec()
            }
        );
    }

    #[test]
    fn short_and_foreign_packets_are_dropped() {
        let guest = Ipv4Address::new(10, 0, 2, 15);
        let dns = Ipv4Address::new(10, 0, 2, 3);
        assert_eq!(classify(&[], guest, dns), Class::Drop(Dropped::Malformed));
        assert_eq!(classify(&[0x60; 40], guest, dns), Class::Drop(Dropped::Malformed));
        // A well-formed packet whose source is not the guest's address.
        let bytes = reset(
            SocketAddrV4::new(Ipv4Address::new(10, 0, 2, 99), 1),
            SocketAddrV4::new(Ipv4Address::new(192, 0, 2, 1), 80),
            TcpSeqNumber(0),
        );
        assert_eq!(classify(&bytes, guest, dns), Class::Drop(Dropped::Spoofed));
    }
}
