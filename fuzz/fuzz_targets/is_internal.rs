//! The internal-address check (`is_internal`): 16 bytes as an IPv6 address, their first 4 as IPv4.
//! Every form that carries an IPv4 address is judged as that address, and the ranges that are
//! never public (loopback, private, link-local, unique-local, multicast, unspecified) are internal.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kiln_core::tier::wasm::egress::is_internal;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut bytes = [0u8; 16];
    let n = data.len().min(16);
    bytes[..n].copy_from_slice(&data[..n]);
    let v6 = Ipv6Addr::from(bytes);
    let v4 = Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]);
    let internal4 = is_internal(IpAddr::V4(v4));
    let internal6 = is_internal(IpAddr::V6(v6));

    // IPv4 forms inside IPv6: mapped, NAT64 (64:ff9b::/96), 6to4 (2002::/16) are that IPv4 address.
    assert_eq!(is_internal(IpAddr::V6(v4.to_ipv6_mapped())), internal4);
    let [a, b, c, d] = v4.octets();
    let nat64 = Ipv6Addr::new(
        0x64,
        0xff9b,
        0,
        0,
        0,
        0,
        u16::from_be_bytes([a, b]),
        u16::from_be_bytes([c, d]),
    );
    assert_eq!(is_internal(IpAddr::V6(nat64)), internal4, "{nat64}");
    let six_to_four = Ipv6Addr::new(
        0x2002,
        u16::from_be_bytes([a, b]),
        u16::from_be_bytes([c, d]),
        1,
        2,
        3,
        4,
        5,
    );
    assert_eq!(is_internal(IpAddr::V6(six_to_four)), internal4, "{six_to_four}");
    // IPv4-compatible (::a.b.c.d) and IPv4-translated (::ffff:0:a.b.c.d) forms are never public.
    assert!(is_internal(IpAddr::V6(v4.to_ipv6_compatible())));

    if v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_multicast()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_documentation()
    {
        assert!(internal4, "{v4}");
    }
    if v6.is_loopback()
        || v6.is_unspecified()
        || v6.is_multicast()
        || v6.is_unique_local()
        || v6.is_unicast_link_local()
    {
        assert!(internal6, "{v6}");
    }
    // Only global unicast (2000::/3) can be public, besides the forms that carry an IPv4 address.
    let carries_v4 = v6.to_ipv4_mapped().is_some() || v6.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    if !internal6 && !carries_v4 {
        assert_eq!(v6.segments()[0] & 0xe000, 0x2000, "{v6}");
    }
    // (An IPv4-mapped or NAT64 address is judged as the IPv4 address it carries, so a public one
    // lies outside 2000::/3: both are checked against that address here.)
    if let Some(mapped) = v6.to_ipv4_mapped() {
        assert_eq!(internal6, is_internal(IpAddr::V4(mapped)));
    }
    if v6.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [.., a, b, c, d] = v6.octets();
        assert_eq!(internal6, is_internal(IpAddr::V4(Ipv4Addr::new(a, b, c, d))), "{v6}");
    }
    // The text forms an address parses from are judged as the address.
    for ip in [IpAddr::V4(v4), IpAddr::V6(v6)] {
        let parsed: IpAddr = ip.to_string().parse().unwrap();
        assert_eq!(is_internal(parsed), is_internal(ip));
    }
});
