//! The address ranges downloads refuse: every range the IANA IPv4 and IPv6 Special-Purpose
//! Address Registries do not mark globally reachable, plus multicast, and the IPv6 ranges
//! that embed or tunnel to an IPv4 address (IPv4-compatible `::/96`, 6to4, Teredo, local
//! NAT64). IPv4-mapped `::ffff:0:0/96` and the well-known NAT64 prefix `64:ff9b::/96` are
//! judged by the IPv4 address they carry.
//!
//! Sources: <https://www.iana.org/assignments/iana-ipv4-special-registry> and
//! <https://www.iana.org/assignments/iana-ipv6-special-registry> (both as of 2025), RFC 6890.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// How a refused range may be let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Loopback: allowed only with `allow_loopback`.
    Loopback,
    /// Private, link-local, shared, reserved, documentation, tunnels: only with
    /// `allow_private`.
    Private,
    /// Unspecified, "this network", broadcast, multicast: never fetched.
    Never,
}

/// One non-global range: network, prefix length, kind and a name with the range.
type V4 = (u32, u8, Kind, &'static str);
type V6 = (u128, u8, Kind, &'static str);

const fn v4(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_be_bytes([a, b, c, d])
}

/// IPv4 ranges, the more specific first (the first match names the range).
pub(crate) const V4_RANGES: &[V4] = &[
    (v4(0, 0, 0, 0), 32, Kind::Never, "unspecified 0.0.0.0/32"),
    (v4(0, 0, 0, 0), 8, Kind::Never, "\"this network\" 0.0.0.0/8"),
    (v4(10, 0, 0, 0), 8, Kind::Private, "private-use 10.0.0.0/8"),
    (
        v4(100, 64, 0, 0),
        10,
        Kind::Private,
        "shared address space 100.64.0.0/10",
    ),
    (v4(127, 0, 0, 0), 8, Kind::Loopback, "loopback 127.0.0.0/8"),
    (
        v4(169, 254, 0, 0),
        16,
        Kind::Private,
        "link-local 169.254.0.0/16",
    ),
    (
        v4(172, 16, 0, 0),
        12,
        Kind::Private,
        "private-use 172.16.0.0/12",
    ),
    (
        v4(192, 0, 0, 0),
        24,
        Kind::Private,
        "IETF protocol assignments 192.0.0.0/24",
    ),
    (
        v4(192, 0, 2, 0),
        24,
        Kind::Private,
        "documentation TEST-NET-1 192.0.2.0/24",
    ),
    (
        v4(192, 88, 99, 0),
        24,
        Kind::Private,
        "6to4 relay anycast 192.88.99.0/24",
    ),
    (
        v4(192, 168, 0, 0),
        16,
        Kind::Private,
        "private-use 192.168.0.0/16",
    ),
    (
        v4(198, 18, 0, 0),
        15,
        Kind::Private,
        "benchmarking 198.18.0.0/15",
    ),
    (
        v4(198, 51, 100, 0),
        24,
        Kind::Private,
        "documentation TEST-NET-2 198.51.100.0/24",
    ),
    (
        v4(203, 0, 113, 0),
        24,
        Kind::Private,
        "documentation TEST-NET-3 203.0.113.0/24",
    ),
    (v4(224, 0, 0, 0), 4, Kind::Never, "multicast 224.0.0.0/4"),
    (
        v4(255, 255, 255, 255),
        32,
        Kind::Never,
        "limited broadcast 255.255.255.255/32",
    ),
    (v4(240, 0, 0, 0), 4, Kind::Private, "reserved 240.0.0.0/4"),
];

const fn v6(s: [u16; 8]) -> u128 {
    let mut n = 0u128;
    let mut i = 0;
    while i < 8 {
        n = (n << 16) | s[i] as u128;
        i += 1;
    }
    n
}

/// IPv6 ranges, the more specific first. IPv4-mapped addresses and the well-known NAT64
/// prefix are not listed: they are judged by their IPv4 address.
pub(crate) const V6_RANGES: &[V6] = &[
    (0, 128, Kind::Never, "unspecified ::/128"),
    (1, 128, Kind::Loopback, "loopback ::1/128"),
    (0, 96, Kind::Private, "IPv4-compatible ::/96"),
    (
        v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0]),
        48,
        Kind::Private,
        "local-use NAT64 64:ff9b:1::/48",
    ),
    (
        v6([0x100, 0, 0, 0, 0, 0, 0, 0]),
        64,
        Kind::Private,
        "discard-only 100::/64",
    ),
    (
        v6([0x100, 0, 0, 1, 0, 0, 0, 0]),
        64,
        Kind::Private,
        "dummy prefix 100:0:0:1::/64",
    ),
    (
        v6([0x2001, 0, 0, 0, 0, 0, 0, 0]),
        32,
        Kind::Private,
        "Teredo 2001::/32",
    ),
    (
        v6([0x2001, 2, 0, 0, 0, 0, 0, 0]),
        48,
        Kind::Private,
        "benchmarking 2001:2::/48",
    ),
    (
        v6([0x2001, 0x10, 0, 0, 0, 0, 0, 0]),
        28,
        Kind::Private,
        "ORCHID 2001:10::/28",
    ),
    (
        v6([0x2001, 0x20, 0, 0, 0, 0, 0, 0]),
        28,
        Kind::Private,
        "ORCHIDv2 2001:20::/28",
    ),
    (
        v6([0x2001, 0, 0, 0, 0, 0, 0, 0]),
        23,
        Kind::Private,
        "IETF protocol assignments 2001::/23",
    ),
    (
        v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0]),
        32,
        Kind::Private,
        "documentation 2001:db8::/32",
    ),
    (
        v6([0x2002, 0, 0, 0, 0, 0, 0, 0]),
        16,
        Kind::Private,
        "6to4 2002::/16",
    ),
    (
        v6([0x3fff, 0, 0, 0, 0, 0, 0, 0]),
        20,
        Kind::Private,
        "documentation 3fff::/20",
    ),
    (
        v6([0x5f00, 0, 0, 0, 0, 0, 0, 0]),
        16,
        Kind::Private,
        "segment routing SIDs 5f00::/16",
    ),
    (
        v6([0xfc00, 0, 0, 0, 0, 0, 0, 0]),
        7,
        Kind::Private,
        "unique-local fc00::/7",
    ),
    (
        v6([0xfe80, 0, 0, 0, 0, 0, 0, 0]),
        10,
        Kind::Private,
        "link-local fe80::/10",
    ),
    (
        v6([0xfec0, 0, 0, 0, 0, 0, 0, 0]),
        10,
        Kind::Private,
        "site-local fec0::/10",
    ),
    (
        v6([0xff00, 0, 0, 0, 0, 0, 0, 0]),
        8,
        Kind::Never,
        "multicast ff00::/8",
    ),
];

fn in_v4(ip: u32, (net, len, ..): &V4) -> bool {
    let mask = if *len == 0 { 0 } else { u32::MAX << (32 - len) };
    ip & mask == *net
}

fn in_v6(ip: u128, (net, len, ..): &V6) -> bool {
    let mask = if *len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    ip & mask == *net
}

/// The IPv4 address an IPv6 address stands for: IPv4-mapped `::ffff:a.b.c.d` and the
/// well-known NAT64 prefix `64:ff9b::a.b.c.d` (RFC 6052), which a translator turns into a
/// connection to that IPv4 address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let n = u128::from(ip);
    (n >> 32 == v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0]) >> 32).then(|| Ipv4Addr::from(n as u32))
}

/// The non-global range `ip` is in, if any: its kind and name.
pub(crate) fn classify(ip: IpAddr) -> Option<(Kind, &'static str)> {
    match ip {
        IpAddr::V4(v4) => {
            let n = u32::from(v4);
            V4_RANGES.iter().find(|r| in_v4(n, r)).map(|r| (r.2, r.3))
        }
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => classify(IpAddr::V4(v4)),
            None => {
                let n = u128::from(v6);
                V6_RANGES.iter().find(|r| in_v6(n, r)).map(|r| (r.2, r.3))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One address inside every listed range, and the range it must be reported as.
    const INSIDE: &[(&str, &str)] = &[
        ("0.0.0.0", "unspecified 0.0.0.0/32"),
        ("0.1.2.3", "\"this network\" 0.0.0.0/8"),
        ("10.200.0.1", "private-use 10.0.0.0/8"),
        ("100.127.255.254", "shared address space 100.64.0.0/10"),
        ("127.9.9.9", "loopback 127.0.0.0/8"),
        ("169.254.169.254", "link-local 169.254.0.0/16"),
        ("172.31.255.1", "private-use 172.16.0.0/12"),
        ("192.0.0.170", "IETF protocol assignments 192.0.0.0/24"),
        ("192.0.2.7", "documentation TEST-NET-1 192.0.2.0/24"),
        ("192.88.99.1", "6to4 relay anycast 192.88.99.0/24"),
        ("192.168.1.1", "private-use 192.168.0.0/16"),
        ("198.19.0.1", "benchmarking 198.18.0.0/15"),
        ("198.51.100.9", "documentation TEST-NET-2 198.51.100.0/24"),
        ("203.0.113.200", "documentation TEST-NET-3 203.0.113.0/24"),
        ("239.255.255.250", "multicast 224.0.0.0/4"),
        ("255.255.255.255", "limited broadcast 255.255.255.255/32"),
        ("250.1.2.3", "reserved 240.0.0.0/4"),
        ("::", "unspecified ::/128"),
        ("::1", "loopback ::1/128"),
        ("::127.0.0.1", "IPv4-compatible ::/96"),
        ("::8.8.8.8", "IPv4-compatible ::/96"),
        ("64:ff9b:1::a00:1", "local-use NAT64 64:ff9b:1::/48"),
        ("100::1", "discard-only 100::/64"),
        ("100:0:0:1::1", "dummy prefix 100:0:0:1::/64"),
        ("2001::1", "Teredo 2001::/32"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo 2001::/32"),
        ("2001:2::1", "benchmarking 2001:2::/48"),
        ("2001:10::1", "ORCHID 2001:10::/28"),
        ("2001:20::1", "ORCHIDv2 2001:20::/28"),
        ("2001:1::1", "IETF protocol assignments 2001::/23"),
        ("2001:db8::1", "documentation 2001:db8::/32"),
        ("2002:7f00:1::1", "6to4 2002::/16"),
        ("3fff:1::1", "documentation 3fff::/20"),
        ("5f00::1", "segment routing SIDs 5f00::/16"),
        ("fd00::1", "unique-local fc00::/7"),
        ("fe80::1", "link-local fe80::/10"),
        ("fec0::1", "site-local fec0::/10"),
        ("ff02::1", "multicast ff00::/8"),
        // Embedded IPv4 addresses are judged as IPv4.
        ("::ffff:127.0.0.1", "loopback 127.0.0.0/8"),
        ("::ffff:169.254.169.254", "link-local 169.254.0.0/16"),
        ("64:ff9b::a00:1", "private-use 10.0.0.0/8"),
        ("64:ff9b::7f00:1", "loopback 127.0.0.0/8"),
    ];

    #[test]
    fn every_range_has_an_address_inside_reported_by_name() {
        for (ip, want) in INSIDE {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(classify(ip).map(|c| c.1), Some(*want), "{ip}");
        }
        for (_, _, _, name) in V4_RANGES.iter() {
            assert!(INSIDE.iter().any(|(_, n)| n == name), "no test for {name}");
        }
        for (_, _, _, name) in V6_RANGES.iter() {
            assert!(INSIDE.iter().any(|(_, n)| n == name), "no test for {name}");
        }
    }

    #[test]
    fn global_addresses_and_range_edges_pass() {
        for ip in [
            "8.8.8.8",
            "93.184.216.34",
            "100.63.255.255",
            "100.128.0.0",
            "172.32.0.1",
            "192.0.3.1",
            "198.20.0.1",
            "223.255.255.255",
            "2606:4700::1111",
            "2001:200::1",
            "2003::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "64:ff9b:2::1",
            "1::1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(classify(ip), None, "{ip} is global");
        }
    }
}
