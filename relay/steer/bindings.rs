//! The binding model shared by `steer` (pinned) and `--ports` (a funnel that dies with its
//! process): a binding is (protocol, local address prefix, port range) -> one target socket.
//!
//! The kernel side is an LPM trie with one entry per (family, proto, port, prefix), whose value is
//! the id of the binding that owns the port (probes/steer.bpf.c). The trie gives "longest prefix
//! wins"; within one prefix, overlapping port ranges are resolved by plan.rs before the trie is
//! written: the narrowest range owns a port, and between equally narrow ranges the one starting
//! lower.
use super::ports::PortRange;
use crate::{abi::SteerMatch, cli::Proto};
use aya::maps::lpm_trie::Key;
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

pub const AF_INET: u8 = libc::AF_INET as u8;
pub const AF_INET6: u8 = libc::AF_INET6 as u8;

impl Proto {
    pub fn ipproto(self) -> u8 {
        match self {
            Proto::Tcp => libc::IPPROTO_TCP as u8,
            Proto::Udp => libc::IPPROTO_UDP as u8,
        }
    }

    pub fn from_ipproto(p: u8) -> Option<Proto> {
        match i32::from(p) {
            libc::IPPROTO_TCP => Some(Proto::Tcp),
            libc::IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// A local address prefix, `10.0.0.0/8` or `2001:db8::/32`; host bits are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// Every address of a family: 0.0.0.0/0 or ::/0.
    pub fn any(v6: bool) -> Prefix {
        if v6 {
            Prefix { addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED), len: 0 }
        } else {
            Prefix { addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED), len: 0 }
        }
    }

    /// Exactly one address (/32 or /128).
    pub fn host(addr: IpAddr) -> Prefix {
        Prefix { addr, len: if addr.is_ipv4() { 32 } else { 128 } }
    }

    pub fn family(&self) -> u8 {
        if self.addr.is_ipv4() {
            AF_INET
        } else {
            AF_INET6
        }
    }

    /// The address in network order, IPv4 in the first 4 bytes (the trie's layout).
    pub fn bytes(&self) -> [u8; 16] {
        addr_bytes(self.addr)
    }

    pub fn from_raw(family: u8, bytes: [u8; 16], len: u8) -> Prefix {
        Prefix { addr: addr_from_bytes(family, bytes), len }
    }
}

pub fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match addr {
        IpAddr::V4(a) => b[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => b = a.octets(),
    }
    b
}

pub fn addr_from_bytes(family: u8, b: [u8; 16]) -> IpAddr {
    if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(b))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("`{s}` is not an address prefix (write e.g. 127.0.0.0/8, 10.1.2.3, 2001:db8::/32 or ::/0)");
        // A zone (`fe80::/10%lo`) was told "the prefix length must be 0 to 128" (a helper's pass).
        if s.contains('%') {
            return Err(format!(
                "`{s}`: a prefix takes no interface (`%NAME`): it matches the address a connection is sent to, \
                 whatever interface it came in on"
            ));
        }
        let (addr, len) = match s.trim().split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.trim_start_matches('[').trim_end_matches(']').parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = match len {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("`{s}`: the prefix length must be 0 to {max}")),
            },
        };
        let bits = u128::from_be_bytes(match addr {
            IpAddr::V4(a) => Ipv6Addr::from(u128::from(u32::from(a)) << 96).octets(),
            IpAddr::V6(a) => a.octets(),
        });
        let host_mask = u128::MAX.checked_shr(u32::from(len)).unwrap_or(0);
        if bits & host_mask != 0 {
            let net = bits & !host_mask;
            let net = match addr {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from((net >> 96) as u32)),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(net)),
            };
            return Err(format!("`{s}` has bits set after the first {len} (did you mean {net}/{len}?)"));
        }
        // sk_lookup sees IPv4 traffic to a dual-stack socket as IPv4: a v4-mapped prefix would
        // be bound and never match.
        if let IpAddr::V6(a) = addr {
            if len >= 96 && a.to_ipv4_mapped().is_some() {
                let v4 = Ipv4Addr::from((u128::from_be_bytes(a.octets()) & 0xffff_ffff) as u32);
                return Err(format!(
                    "`{s}` is an IPv4-mapped IPv6 prefix, which never matches: sk_lookup sees IPv4 connections as \
                     IPv4 (write {v4}/{})",
                    len - 96
                ));
            }
        }
        Ok(Prefix { addr, len })
    }
}

/// What a binding matches. Two bindings with equal keys are the same binding (adding one again
/// replaces its target).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BindingKey {
    pub proto: Proto,
    pub prefix: Prefix,
    pub ports: PortRange,
}

impl BindingKey {
    /// Whether this binding competes with `other` for a trie entry: same proto and prefix.
    pub fn same_slot(&self, other: &BindingKey) -> bool {
        self.proto == other.proto && self.prefix == other.prefix
    }

    /// The trie key of one of this binding's ports.
    pub fn trie_key(&self, port: u16) -> Key<SteerMatch> {
        let m =
            SteerMatch { family: self.prefix.family(), proto: self.proto.ipproto(), port, addr: self.prefix.bytes() };
        Key::new(32 + u32::from(self.prefix.len), m)
    }
}

impl fmt::Display for BindingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = if self.ports.len() == 1 { "port" } else { "ports" };
        write!(f, "{} {} {word} {}", self.proto.name(), self.prefix, self.ports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(prefix: &str, lo: u16, hi: u16) -> BindingKey {
        BindingKey { proto: Proto::Tcp, prefix: prefix.parse().unwrap(), ports: PortRange { lo, hi } }
    }

    #[test]
    fn prefixes_parse_and_print() {
        assert_eq!("127.0.0.0/8".parse::<Prefix>().unwrap().to_string(), "127.0.0.0/8");
        assert_eq!("10.1.2.3".parse::<Prefix>().unwrap().to_string(), "10.1.2.3/32");
        assert_eq!("::/0".parse::<Prefix>().unwrap().to_string(), "::/0");
        assert_eq!("[::1]".parse::<Prefix>().unwrap().to_string(), "::1/128");
        assert_eq!("::1/128".parse::<Prefix>().unwrap().len, 128);
        assert_eq!("255.255.255.255/32".parse::<Prefix>().unwrap().len, 32);
        assert_eq!("2001:db8::/32".parse::<Prefix>().unwrap().family(), AF_INET6);
        assert_eq!("0.0.0.0/0".parse::<Prefix>().unwrap().bytes(), [0; 16]);
        assert_eq!(&"192.168.0.0/16".parse::<Prefix>().unwrap().bytes()[..4], &[192, 168, 0, 0]);
    }

    #[test]
    fn malformed_prefixes_say_why() {
        assert!("10.0.0/8".parse::<Prefix>().unwrap_err().contains("is not an address prefix"));
        assert!("banana".parse::<Prefix>().unwrap_err().contains("is not an address prefix"));
        assert!("10.0.0.0/33".parse::<Prefix>().unwrap_err().contains("0 to 32"));
        assert!("::/129".parse::<Prefix>().unwrap_err().contains("0 to 128"));
        // Bound, it never matched: sk_lookup sees IPv4 connections to a dual-stack socket as IPv4.
        assert!("::ffff:0:0/96".parse::<Prefix>().unwrap_err().contains("(write 0.0.0.0/0)"));
        assert!("::ffff:127.0.0.1".parse::<Prefix>().unwrap_err().contains("(write 127.0.0.1/32)"));
        assert!("::/0".parse::<Prefix>().is_ok() && "::/80".parse::<Prefix>().is_ok());
        assert_eq!(
            "10.1.2.3/8".parse::<Prefix>().unwrap_err(),
            "`10.1.2.3/8` has bits set after the first 8 (did you mean 10.0.0.0/8?)"
        );
        assert!("2001:db8::1/32".parse::<Prefix>().unwrap_err().contains("did you mean 2001:db8::/32"));
        for zoned in ["fe80::/10%lo", "fe80::1%lo"] {
            assert!(zoned.parse::<Prefix>().unwrap_err().contains("a prefix takes no interface"), "{zoned}");
        }
    }

    #[test]
    fn trie_keys_put_the_prefix_after_32_bits_of_family_proto_port() {
        let k = key("10.0.0.0/8", 80, 80).trie_key(80);
        assert_eq!(k.prefix_len(), 40);
        let d = k.data();
        assert_eq!((d.family, d.proto, d.port), (AF_INET, libc::IPPROTO_TCP as u8, 80));
        assert_eq!(d.addr[0], 10);
    }
}
