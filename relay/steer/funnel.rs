//! A funnel: the steer program attached to this network namespace WITHOUT pinning, handing TCP
//! connections for a list of ports to one listening socket of this process (`--ports`). Its link
//! lives only in this process's file table, so the kernel detaches it however the process ends,
//! SIGKILL included.
use super::{
    bindings::{BindingKey, Prefix},
    ports::{PortList, PortRange},
    state::{self, Maps},
    target::{parse_proc_net, STATE_LISTEN},
};
use crate::{abi::SteerBinding, bpf, cli::Proto, error::Error, sys};
use aya::Ebpf;
use std::{
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd},
};

/// The one binding of a funnel.
const BINDING: u32 = 0;

pub struct Funnel {
    maps: Maps,
    ports: usize,
    /// Owns the program and its (unpinned) link: dropping it detaches the funnel.
    _bpf: Ebpf,
}

impl Funnel {
    /// Steers TCP connections for `ports` to `listener`, which listens on `listen`: connections to
    /// the listen address, or to any local address of its family when it is 0.0.0.0 or [::].
    pub fn attach(listener: &impl AsFd, listen: SocketAddr, ports: &PortList) -> Result<Funnel, Error> {
        let mut bpf = bpf::load(bpf::objects::STEER)?;
        let mut maps = Maps::take(&mut bpf)?;
        let prefix =
            if listen.ip().is_unspecified() { Prefix::any(listen.is_ipv6()) } else { Prefix::host(listen.ip()) };
        let all = ports.ports();
        let span = PortRange { lo: all[0], hi: *all.last().unwrap() };
        let key = BindingKey { proto: Proto::Tcp, prefix, ports: span };
        sys::bpf::sockmap_set(&maps.targets.fd().as_fd(), BINDING, &listener.as_fd().as_raw_fd())
            .map_err(|e| state::unavailable("put the listener into the sk_lookup map", &e))?;
        let record = SteerBinding {
            cookie: sys::socket_cookie(&listener.as_fd().as_raw_fd()).unwrap_or(0),
            pid: std::process::id(),
            port_lo: span.lo,
            port_hi: span.hi,
            family: prefix.family(),
            proto: Proto::Tcp.ipproto(),
            prefixlen: prefix.len,
            target_family: Prefix::host(listen.ip()).family(),
            target_port: listen.port(),
            addr: prefix.bytes(),
            target_addr: super::bindings::addr_bytes(listen.ip()),
            comm: *b"skrelay\0\0\0\0\0\0\0\0\0",
            ..Default::default()
        };
        maps.bindings.insert(BINDING, record, 0).map_err(|e| state::unavailable("describe the funnel", &e))?;
        for &port in &all {
            maps.ports
                .insert(&key.trie_key(port), BINDING, 0)
                .map_err(|e| state::unavailable("fill the port map", &e))?;
        }
        let prog = state::load_program(&mut bpf)?;
        prog.attach(state::netns_file()?).map_err(|e| state::unavailable("attach the sk_lookup program", &e))?;
        Ok(Funnel { maps, ports: all.len(), _bpf: bpf })
    }

    pub fn ports(&self) -> usize {
        self.ports
    }

    /// Connections handed to the listener so far.
    pub fn hits(&self) -> u64 {
        self.maps.counters(BINDING).hits
    }
}

/// Other TCP sockets listening on ports of the list at addresses the funnel covers: while the
/// funnel runs, their connections come to us instead.
pub fn shadowed(listen: SocketAddr, ports: &PortList) -> Vec<SocketAddr> {
    let mut text = String::new();
    for f in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        text.push_str(&std::fs::read_to_string(f).unwrap_or_default());
        text.push('\n');
    }
    let items = ports.items();
    let mut out: Vec<SocketAddr> = text
        .split("\n\n")
        .flat_map(parse_proc_net)
        .filter(|r| r.state == STATE_LISTEN && r.local != listen)
        .filter(|r| items.iter().any(|i| i.contains(r.local.port())))
        .filter(|r| {
            let other = r.local.ip();
            other.is_ipv4() == listen.is_ipv4()
                && (listen.ip().is_unspecified() || other.is_unspecified() || other == listen.ip())
        })
        .map(|r| r.local)
        .collect();
    out.sort();
    out.dedup();
    out
}
