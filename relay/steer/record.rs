//! A binding as the pinned `steer_bindings` map stores it (`struct steer_binding`): the one place
//! that encodes and decodes that record. The layout itself is pinned state that upgrades must
//! keep reading; abi.rs checks it against probes/skrelay.h.
use super::{
    bindings::{addr_bytes, addr_from_bytes, BindingKey, Prefix},
    ports::PortRange,
};
use crate::{abi::SteerBinding, cli::Proto};
use std::net::{SocketAddr, SocketAddrV6};

/// One binding and the socket it sends to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: BindingKey,
    /// Where the target socket listens (TCP) or is bound (UDP), with the interface of a
    /// link-local IPv6 address (kept up to index 65535, the record's room; a record written
    /// before it was kept reads as none).
    pub target: SocketAddr,
    /// The process that held the target when the binding was made, and its name (at most 15
    /// bytes are kept).
    pub pid: u32,
    pub comm: String,
    /// The target socket's cookie: the binding is alive while the socket map holds it.
    pub cookie: u64,
}

impl Record {
    pub fn encode(&self) -> SteerBinding {
        SteerBinding {
            cookie: self.cookie,
            pid: self.pid,
            port_lo: self.key.ports.lo,
            port_hi: self.key.ports.hi,
            family: self.key.prefix.family(),
            proto: self.key.proto.ipproto(),
            prefixlen: self.key.prefix.len,
            target_family: Prefix::host(self.target.ip()).family(),
            target_port: self.target.port(),
            target_scope: match self.target {
                SocketAddr::V6(a) => u16::try_from(a.scope_id()).unwrap_or(0),
                SocketAddr::V4(_) => 0,
            },
            addr: self.key.prefix.bytes(),
            target_addr: addr_bytes(self.target.ip()),
            comm: comm_bytes(&self.comm),
        }
    }

    /// `None` for a record this version cannot read (an unknown protocol).
    pub fn decode(b: &SteerBinding) -> Option<Record> {
        Some(Record {
            key: BindingKey {
                proto: Proto::from_ipproto(b.proto)?,
                prefix: Prefix::from_raw(b.family, b.addr, b.prefixlen),
                ports: PortRange { lo: b.port_lo, hi: b.port_hi },
            },
            target: match SocketAddr::new(addr_from_bytes(b.target_family, b.target_addr), b.target_port) {
                SocketAddr::V6(a) => SocketAddrV6::new(*a.ip(), a.port(), 0, b.target_scope.into()).into(),
                v4 => v4,
            },
            pid: b.pid,
            comm: String::from_utf8_lossy(b.comm.split(|c| *c == 0).next().unwrap_or_default()).into_owned(),
            cookie: b.cookie,
        })
    }
}

fn comm_bytes(s: &str) -> [u8; 16] {
    let mut b = [0u8; 16];
    let n = s.len().min(15);
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_names_are_cut_to_15_bytes() {
        let r = Record {
            key: BindingKey {
                proto: Proto::Udp,
                prefix: "2001:db8::/32".parse().unwrap(),
                ports: PortRange { lo: 53, hi: 54 },
            },
            target: "[::1]:5353".parse().unwrap(),
            pid: 42,
            comm: "dnsmasq".into(),
            cookie: 7,
        };
        assert_eq!(Record::decode(&r.encode()), Some(r.clone()));
        let v4 = Record {
            target: "127.0.0.1:80".parse().unwrap(),
            key: BindingKey { proto: Proto::Tcp, prefix: "10.0.0.0/8".parse().unwrap(), ..r.key },
            ..r.clone()
        };
        assert_eq!(Record::decode(&v4.encode()), Some(v4.clone()));
        let long = Record { comm: "a-very-long-process-name".into(), ..v4 };
        assert_eq!(Record::decode(&long.encode()).unwrap().comm, "a-very-long-pro");
        // A link-local target keeps its interface (`steer list` dropped it), as far as the
        // record's 16 bits reach.
        let scoped = Record { target: "[fe80::5%7]:80".parse().unwrap(), ..r.clone() };
        assert_eq!(Record::decode(&scoped.encode()), Some(scoped.clone()));
        let far = Record { target: SocketAddrV6::new("fe80::5".parse().unwrap(), 80, 0, 70_000).into(), ..r.clone() };
        assert_eq!(Record::decode(&far.encode()).unwrap().target, "[fe80::5]:80".parse::<SocketAddr>().unwrap());
        let unknown = SteerBinding { proto: 200, ..long.encode() };
        assert_eq!(Record::decode(&unknown), None);
    }
}
