//! A funnel: the steer program attached to this network namespace WITHOUT pinning, handing TCP
//! connections for a list of ports to one listening socket of this process (`--ports`). Its link
//! lives only in this process's file table, so the kernel detaches it however the process ends,
//! SIGKILL included.
use super::{
    bindings::{BindingKey, Prefix},
    ports::{PortList, PortRange},
    record::Record,
    state::{self, Maps},
    target::{parse_proc_net, STATE_LISTEN},
};
use crate::{abi::SteerMatch, bpf, cli::Proto, error::Error, sys};
use aya::{
    maps::{lpm_trie::Key, LpmTrie, Map, MapData, PerCpuArray},
    Ebpf,
};
use std::{net::SocketAddr, os::fd::AsFd};

/// The one binding of a funnel.
const BINDING: u32 = 0;

pub struct Funnel {
    maps: Maps,
    ports: usize,
    /// Owns the program and its (unpinned) link: dropping it detaches the funnel.
    _bpf: Ebpf,
}

/// `--ports` needs BPF whatever the datapath: checked before the datapath is opened, so a user
/// without the right is told that in one sentence (not first that the datapath falls back to user
/// space, then that BPF cannot be loaded).
pub fn check_privilege() -> Result<(), Error> {
    load().map(drop)
}

fn load() -> Result<Ebpf, Error> {
    aya::EbpfLoader::new().load(bpf::objects::STEER).map_err(|e| {
        match bpf::os_error(&e).and_then(std::io::Error::raw_os_error) {
            Some(libc::EPERM) | Some(libc::EACCES) => Error::Usage(
                "--ports needs CAP_BPF and CAP_NET_ADMIN (or root) to attach its sk_lookup program: run as root, \
                 grant them, or leave out --ports"
                    .into(),
            ),
            _ => bpf::unavailable_no_fallback("create BPF maps", &e),
        }
    })
}

impl Funnel {
    /// Steers TCP connections for `ports` to `listener`, which listens on `listen`: connections to
    /// the listen address, or to any local address of its family when it is 0.0.0.0 or [::], and
    /// of IPv4 as well for a dual-stack [::] (not IPV6_V6ONLY), which takes IPv4 clients on its
    /// own port: its other ports refused them.
    pub fn attach(listener: &impl AsFd, listen: SocketAddr, ports: &PortList) -> Result<Funnel, Error> {
        let mut bpf = load()?;
        let mut maps = Maps::take(&mut bpf)?;
        // A listener on [::ffff:a.b.c.d] takes the IPv4 connections to a.b.c.d (its bound
        // address made an IPv6 prefix no IPv4 connection met: nothing was steered).
        let at = sys::unmapped(listen);
        let prefix = if at.ip().is_unspecified() { Prefix::any(at.is_ipv6()) } else { Prefix::host(at.ip()) };
        let mut prefixes = vec![prefix];
        if at.ip().is_unspecified() && at.is_ipv6() && !sys::v6only(listener) {
            prefixes.push(Prefix::any(false));
        }
        let all = ports.ports();
        check_overlaps(&prefixes, &all)?;
        let span = PortRange { lo: all[0], hi: *all.last().unwrap() };
        let key = BindingKey { proto: Proto::Tcp, prefix, ports: span };
        sys::bpf::sockmap_set(maps.targets.fd(), BINDING, listener)
            .map_err(|e| state::unavailable("put the listener into the sk_lookup map", &e))?;
        let record = Record {
            key,
            target: listen,
            pid: std::process::id(),
            comm: "skrelay".into(),
            cookie: sys::socket_cookie(listener).unwrap_or(0),
        };
        maps.bindings.insert(BINDING, record.encode(), 0).map_err(|e| state::unavailable("describe the funnel", &e))?;
        for prefix in prefixes {
            let key = BindingKey { prefix, ..key };
            for &port in &all {
                maps.ports
                    .insert(&key.trie_key(port), BINDING, 0)
                    .map_err(|e| state::unavailable("fill the port map", &e))?;
            }
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

/// The funnel (`--ports`) of a running process in this network namespace, found through the
/// kernel's links: it is pinned nowhere.
#[derive(Debug)]
pub struct Running {
    pub link_id: u32,
    /// The process holding the link (None if it could not be found in /proc).
    pub pid: Option<u32>,
    /// Where its connections go: the listening socket of that process.
    pub target: Option<SocketAddr>,
    /// The addresses it steers: one prefix, or [::] and 0.0.0.0 for a dual-stack listener.
    pub prefixes: Vec<Prefix>,
    pub ports: Vec<u16>,
    /// Each (protocol, prefix, port) it steers: a link holding several bindings (pinned steering
    /// seen from outside its bpffs) does not steer every port at every prefix (a re-check pass:
    /// a /8 binding's prefix and another binding's port made a false "gets none of them"), nor
    /// every port for both protocols.
    pub entries: Vec<Entry>,
    pub hits: u64,
    /// No process holds the link, so it is pinned: steering set up with `steer add` in a bpffs
    /// this mount namespace does not see (known only to root, who can look at every process).
    pub pinned_elsewhere: bool,
}

/// One (protocol, prefix, port) a link steers; `proto` is IPPROTO_TCP or IPPROTO_UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub proto: u8,
    pub prefix: Prefix,
    pub port: u16,
}

/// Ports a link steers, by prefix: what `Running::taking` found.
pub struct Taken(Vec<(Prefix, Vec<u16>)>);

impl Taken {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every port, once, sorted.
    pub fn ports(&self) -> Vec<u16> {
        let mut all: Vec<u16> = self.0.iter().flat_map(|(_, ports)| ports.iter().copied()).collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// `port 6000 on 10.9.0.0/16 and ports 5000-5010 on 0.0.0.0/0`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(prefix, ports)| {
                format!("{} {} on {prefix}", if ports.len() == 1 { "port" } else { "ports" }, port_list(ports))
            })
            .collect();
        parts.join(" and ")
    }
}

impl Running {
    /// What it steers of protocol `proto` (IPPROTO_*) at addresses of any of `prefixes`, among the
    /// ports `wanted` accepts.
    pub fn taking(&self, proto: u8, prefixes: &[Prefix], wanted: impl Fn(u16) -> bool) -> Taken {
        let mut by_prefix: Vec<(Prefix, Vec<u16>)> = Vec::new();
        for e in self.entries.iter().filter(|e| e.proto == proto && wanted(e.port)) {
            if !prefixes.iter().any(|p| prefixes_meet(p, &e.prefix)) {
                continue;
            }
            match by_prefix.iter_mut().find(|(p, _)| *p == e.prefix) {
                Some((_, ports)) => ports.push(e.port),
                None => by_prefix.push((e.prefix, vec![e.port])),
            }
        }
        for (_, ports) in &mut by_prefix {
            ports.sort_unstable();
            ports.dedup();
        }
        Taken(by_prefix)
    }

    /// What it steers, by protocol and prefix: `tcp port 6996 on 0.0.0.0/0 and port 6998 on
    /// 10.9.0.0/16; udp port 6999 on 0.0.0.0/0`.
    pub fn describe(&self) -> String {
        let every = [Prefix::any(false), Prefix::any(true)];
        let parts: Vec<String> = [("tcp", libc::IPPROTO_TCP), ("udp", libc::IPPROTO_UDP)]
            .into_iter()
            .filter_map(|(name, proto)| {
                let taking = self.taking(proto as u8, &every, |_| true);
                (!taking.is_empty()).then(|| format!("{name} {}", taking.describe()))
            })
            .collect();
        parts.join("; ")
    }

    /// Its ports, as a list (`7,77,9000-9015`).
    pub fn port_list(&self) -> String {
        port_list(&self.ports)
    }

    /// Its prefixes, as a list (`::/0, 0.0.0.0/0`).
    pub fn prefix_list(&self) -> String {
        self.prefixes.iter().map(Prefix::to_string).collect::<Vec<_>>().join(", ")
    }

    /// Whether it steers an address of `prefix`.
    pub fn meets(&self, prefix: &Prefix) -> bool {
        self.prefixes.iter().any(|p| prefixes_meet(p, prefix))
    }

    pub fn owner(&self) -> String {
        match self.pid {
            Some(pid) => format!("process {pid}"),
            None if self.pinned_elsewhere => format!(
                "steering pinned in a bpffs this mount namespace does not see (sk_lookup link {})",
                self.link_id
            ),
            // Its holder's descriptors out of sight (another user's, or root's to root without
            // CAP_SYS_PTRACE): a running --ports funnel, or steering pinned elsewhere.
            None => format!(
                "sk_lookup link {} (a process's --ports, or steering pinned in a bpffs out of sight)",
                self.link_id
            ),
        }
    }

    /// How a conflict with it is resolved, for a refusal: "(stop it, or leave that port out)".
    pub fn fix(&self, those: &str) -> String {
        match self.pinned_elsewhere {
            true => {
                format!("run `skrelay steer remove` in the mount namespace whose bpffs holds it, or leave {those} out")
            }
            false => format!("stop it, or leave {those} out"),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "pid": self.pid,
            "link_id": self.link_id,
            // One CIDR, as for every funnel before dual-stack ones (their IPv6 prefix); all of
            // them in `prefixes`.
            "prefix": self.prefixes.first().map(Prefix::to_string),
            "prefixes": self.prefixes.iter().map(Prefix::to_string).collect::<Vec<_>>(),
            "ports": self.port_list(),
            "port_count": self.ports.len(),
            "target": self.target.map(|t| t.to_string()),
            "hits": self.hits,
            "pinned_elsewhere": self.pinned_elsewhere,
        })
    }
}

/// `ports` (sorted) as a port list: `7,77,8000-8999`.
pub fn port_list(ports: &[u16]) -> String {
    let mut items: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ports.len() {
        let lo = ports[i];
        let mut hi = lo;
        while i + 1 < ports.len() && ports[i + 1] == hi.wrapping_add(1) {
            i += 1;
            hi = ports[i];
        }
        items.push(if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") });
        i += 1;
    }
    items.join(",")
}

/// The funnels of running processes in this network namespace (this process's excluded):
/// every sk_lookup link here that runs skrelay's steer program and is not the pinned one. The
/// program holds only the port trie, counters and targets; the process is found through its
/// file table (/proc/PID/fdinfo names the link) and the target as its listening socket.
/// Whether this process may list BPF links (BPF_LINK_GET_NEXT_ID takes CAP_SYS_ADMIN): without
/// it `running` finds nothing, whatever runs.
pub fn listable() -> bool {
    !matches!(sys::bpf::link_next_id(0), Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)))
}

pub fn running() -> Vec<Running> {
    let Ok(ino) = sys::own_netns_inode() else { return vec![] };
    let pinned = state::existing_dir().ok().flatten().and_then(|d| state::pinned_link_ids(&d)).map(|(id, _)| id);
    let mut found = Vec::new();
    let mut id = 0;
    while let Ok(Some(next)) = sys::bpf::link_next_id(id) {
        id = next;
        let Ok(fd) = sys::bpf::link_fd_by_id(id) else { continue };
        let Ok(Some(link)) = sys::bpf::netns_link(&fd) else { continue };
        if link.attach_type != sys::bpf::ATTACH_SK_LOOKUP || u64::from(link.netns_ino) != ino || Some(id) == pinned {
            continue;
        }
        let Some(prog) = aya::programs::loaded_programs().filter_map(Result::ok).find(|p| p.id() == link.prog_id)
        else {
            continue;
        };
        // aya names programs only where a tracepoint program may load (CAP_PERFMON): a service
        // user's funnel (CAP_BPF and CAP_NET_ADMIN) has no name, and its maps, named always,
        // tell it (`steer_ports` below). Root did not see such a process's --ports at all.
        if !matches!(prog.name_as_str(), Some(state::PROGRAM) | Some("") | None) {
            continue;
        }
        let map = |name: &str| {
            prog.map_ids().ok().flatten().unwrap_or_default().into_iter().find_map(|m| {
                let info = aya::maps::MapInfo::from_id(m).ok()?;
                (info.name_as_str() == Some(name)).then(|| MapData::from_id(m).ok()).flatten()
            })
        };
        let Some(trie) = map("steer_ports").and_then(|m| LpmTrie::<_, SteerMatch, u32>::try_from(Map::LpmTrie(m)).ok())
        else {
            continue;
        };
        let keys: Vec<Key<SteerMatch>> = trie.keys().filter_map(Result::ok).collect();
        if keys.is_empty() {
            continue;
        }
        let mut prefixes: Vec<Prefix> = Vec::new();
        let mut entries = Vec::new();
        for k in &keys {
            let m = k.data();
            let p = Prefix::from_raw(m.family, m.addr, (k.prefix_len().saturating_sub(32)) as u8);
            entries.push(Entry { proto: m.proto, prefix: p, port: m.port });
            if !prefixes.contains(&p) {
                prefixes.push(p);
            }
        }
        // IPv6 first, as the funnel's listener has it.
        prefixes.sort_by_key(|p| p.addr.is_ipv4());
        let mut ports: Vec<u16> = keys.iter().map(|k| k.data().port).collect();
        ports.sort_unstable();
        ports.dedup();
        let hits = map("steer_stats")
            .and_then(|m| PerCpuArray::<_, crate::abi::SteerCounters>::try_from(Map::PerCpuArray(m)).ok())
            // Every binding's: pinned steering seen from outside its bpffs holds many (a
            // re-check pass: only the first one's hits were shown).
            .map(|a| a.iter().filter_map(Result::ok).flat_map(|v| v.iter().map(|c| c.hits).collect::<Vec<u64>>()).sum())
            .unwrap_or(0);
        found.push(Running {
            link_id: id,
            pid: None,
            target: None,
            prefixes,
            ports,
            entries,
            hits,
            pinned_elsewhere: false,
        });
    }
    if !found.is_empty() {
        owners(&mut found);
        // Root sees every process's descriptors: a link none of them holds lives by its pin.
        // Not root without CAP_SYS_PTRACE, which cannot read them (a running relay's --ports
        // was called pinned steering: a re-check pass), nor root in a pid namespace of its own,
        // whose /proc shows none outside it (the same, in a steer pass).
        let root = crate::bpffs::sees_every_process();
        found.iter_mut().for_each(|f| f.pinned_elsewhere = root && f.pid.is_none());
    }
    let me = std::process::id();
    found.retain(|f| f.pid != Some(me));
    found
}

/// Fills in each funnel's process (whose fdinfo names its link) and that process's listening
/// socket in this namespace.
fn owners(funnels: &mut [Running]) {
    let mut listening = Vec::new();
    for f in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        listening.extend(
            parse_proc_net(&std::fs::read_to_string(f).unwrap_or_default())
                .into_iter()
                .filter(|r| r.state == STATE_LISTEN),
        );
    }
    let Ok(procs) = std::fs::read_dir("/proc") else { return };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else { continue };
        let mut links = Vec::new();
        let mut sockets = Vec::new();
        for fd in fds.flatten() {
            let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
            if let Some(l) = info.lines().find_map(|l| l.strip_prefix("link_id:")) {
                links.extend(l.trim().parse::<u32>().ok());
            }
            let target = std::fs::read_link(p.path().join("fd").join(fd.file_name())).unwrap_or_default();
            if let Some(ino) =
                target.to_str().and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse::<u64>().ok())
            {
                let fd_num = fd.file_name().to_str().and_then(|n| n.parse::<u32>().ok()).unwrap_or(u32::MAX);
                sockets.push((fd_num, ino));
            }
        }
        // A relay may listen on more than one socket (--metrics): the one it serves clients on is
        // its first, bound before the others or passed by systemd as descriptor 3.
        sockets.sort_unstable();
        for f in funnels.iter_mut().filter(|f| links.contains(&f.link_id)) {
            f.pid = Some(pid);
            // With the interface of a link-local --listen (/proc/net shows none), as `status`
            // shows the relay's own line (a stranger pass: `[fe80::1]:7810` here, `%4` there).
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            f.target = sockets
                .iter()
                .find_map(|(_, ino)| listening.iter().find(|r| r.inode == *ino))
                .map(|r| crate::running::with_scope(r.local, &cmdline, "--listen"));
        }
    }
}

/// Whether two prefixes of one family share an address.
pub fn prefixes_meet(a: &Prefix, b: &Prefix) -> bool {
    if a.family() != b.family() {
        return false;
    }
    let (bits_a, bits_b) = (u128::from_be_bytes(a.bytes()), u128::from_be_bytes(b.bytes()));
    let len = u32::from(a.len.min(b.len));
    let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
    bits_a & mask == bits_b & mask
}

/// Refuses a funnel whose ports, at its addresses, are already steered elsewhere in this
/// namespace: the first sk_lookup program attached keeps them, so the new funnel would say it
/// serves ports that go to another socket.
fn check_overlaps(prefixes: &[Prefix], ports: &[u16]) -> Result<(), Error> {
    let taken = |theirs: &mut dyn Iterator<Item = u16>| -> Vec<u16> {
        let mut v: Vec<u16> = theirs.filter(|p| ports.binary_search(p).is_ok()).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    // Listing BPF links needs CAP_SYS_ADMIN: without it another process's --ports is invisible.
    if let Err(e) = sys::bpf::link_next_id(0) {
        log::warn!(
            "--ports: cannot check whether another running relay or proxy already takes these ports (listing BPF \
             links: {e}; it needs CAP_SYS_ADMIN): if one does, connections keep going there"
        );
    }
    for other in running() {
        // What it steers of TCP at these addresses (a steer pass: a UDP binding's port, and a
        // port steered on another prefix only, were refused).
        let taking = other.taking(libc::IPPROTO_TCP as u8, prefixes, |p| ports.binary_search(&p).is_ok());
        let both = taking.ports();
        if !both.is_empty() {
            let target = other.target.map(|t| format!(" for {t}")).unwrap_or_default();
            let (them, those) = if both.len() == 1 { ("it", "that port") } else { ("them", "those ports") };
            return Err(Error::Usage(format!(
                "cannot take --ports {}: {} already takes {them}{target}{}, and connections would keep going there \
                 ({})",
                port_list(&both),
                other.owner(),
                if other.pinned_elsewhere { "" } else { " with its own --ports" },
                other.fix(those),
            )));
        }
    }
    let steer = match state::State::open_read_only() {
        Ok(st) => st,
        // Root's state is not for this user to read (a service user with CAP_BPF, as the
        // contrib units run): refusing would forbid --ports to it whenever root steers anything.
        Err(Error::StateOwned { dir, owner, .. }) => {
            log::warn!(
                "--ports: cannot check the bindings of `skrelay steer` at {dir} (they belong to {owner}): a pinned \
                 binding on these ports would keep them (`skrelay steer list` as {owner} shows them)"
            );
            None
        }
        // Held by another command past the readers' wait, or unreadable: the check cannot be made,
        // and starting would say ports are steered that may go elsewhere.
        Err(e) => {
            return Err(Error::Usage(format!(
                "cannot take --ports: cannot check the bindings of `skrelay steer`, which would take precedence: {e}"
            )))
        }
    };
    if let Some(st) = steer {
        for b in st.records().values() {
            let key = b.key;
            if key.proto != Proto::Tcp || !prefixes.iter().any(|p| prefixes_meet(p, &key.prefix)) {
                continue;
            }
            let both = taken(&mut key.ports.ports());
            if !both.is_empty() {
                // `steer remove` takes every address by default: a narrower binding needs its prefix.
                let addr = if key.prefix.len == 0 { String::new() } else { format!(" --addr {}", key.prefix) };
                return Err(Error::Usage(format!(
                    "cannot take --ports: `skrelay steer` already binds {key} to {}, and a pinned binding \
                     takes precedence (remove it with `skrelay steer remove --ports {}{addr}`, or leave those ports out)",
                    b.target, key.ports
                )));
            }
        }
    }
    Ok(())
}

/// What takes TCP connections to `addr` before a socket listening there could see them:
/// another running relay's or proxy's `--ports`, or a `skrelay steer` binding (sk_lookup runs
/// before the kernel looks for a listener). A listener started so got no connection at all, and
/// nothing said why (a helper's pass). None when nothing does, or when it cannot be told.
pub fn taken_from(addr: SocketAddr) -> Option<TakenBy> {
    let addr = sys::unmapped(addr);
    let port = addr.port();
    let mut here = vec![match addr.ip() {
        ip if ip.is_unspecified() => Prefix::any(ip.is_ipv6()),
        ip => Prefix { addr: ip, len: if ip.is_ipv6() { 128 } else { 32 } },
    }];
    // A wildcard IPv6 listener takes IPv4 connections too (unless IPv6-only).
    if addr.ip().is_unspecified() && addr.is_ipv6() {
        here.push(Prefix::any(false));
    }
    let meets = |p: &Prefix| here.iter().any(|h| prefixes_meet(h, p));
    // TCP only: a UDP binding takes no connection from a listener (a re-check pass).
    let tcp = libc::IPPROTO_TCP as u8;
    if let Some(other) =
        running().into_iter().find(|o| o.entries.iter().any(|e| e.proto == tcp && e.port == port && meets(&e.prefix)))
    {
        let with = if other.pid.is_none() { "" } else { " with its --ports" };
        return Some(TakenBy::Known(format!("{} takes port {port}{with}", other.owner())));
    }
    let st = match state::State::open_read_only() {
        Ok(st) => st?,
        // Pinned steering this process may not read (a service user's relay, root's steering):
        // it was silent, and the listener got nothing (a re-check pass). Not any failure: root
        // short of descriptors was told it could not read.
        Err(Error::StateOutOfReach { .. }) => return Some(TakenBy::OutOfReach),
        Err(e) if e.is_refusal() => return Some(TakenBy::Unreadable),
        Err(_) => return None,
    };
    st.records().values().find_map(|b| {
        let key = b.key;
        (key.proto == Proto::Tcp && meets(&key.prefix) && key.ports.ports().any(|p| p == port))
            .then(|| TakenBy::Known(format!("`skrelay steer` binds {key} to {}", b.target)))
    })
}

/// What `taken_from` found.
#[derive(Debug, PartialEq, Eq)]
pub enum TakenBy {
    /// Who takes the connections, in words.
    Known(String),
    /// `skrelay steer` has pinned bindings in this network namespace that this process cannot
    /// read (not root, nor CAP_BPF): one of them may take the port.
    Unreadable,
    /// Whether `skrelay steer` has bindings cannot be looked at from here (`bpffs::out_of_reach`).
    OutOfReach,
}

/// Sockets of `proto` other than `target` that listen (TCP) or are bound unconnected (UDP) on ports
/// of `ours` at addresses where one of `ours` wins the lookup among `all` the bindings (longest
/// prefix, then narrowest port range, then lower start): their connections (or datagrams) now go
/// to the target. A wildcard socket counts where one of `ours` wins at its own prefix's address;
/// an IPv6 wildcard socket counts for an IPv4 binding (it takes IPv4 unless it set IPV6_V6ONLY,
/// which /proc does not show).
pub fn bypassed(
    proto: crate::cli::Proto,
    ours: &[super::BindingKey],
    all: &[super::BindingKey],
    target: SocketAddr,
) -> Vec<SocketAddr> {
    let usable = match proto {
        crate::cli::Proto::Tcp => STATE_LISTEN,
        crate::cli::Proto::Udp => super::target::STATE_CLOSE,
    };
    // The binding a lookup of (ip, port) finds.
    let winner = |ip: std::net::IpAddr, port: u16| {
        let host = Prefix::host(ip);
        all.iter()
            .filter(|k| k.proto == proto && k.ports.contains(port) && prefixes_meet(&k.prefix, &host))
            .filter(|k| k.prefix.len <= host.len)
            .min_by_key(|k| (std::cmp::Reverse(k.prefix.len), super::plan::rank(&k.ports)))
    };
    let ours_win = |ip: std::net::IpAddr, port: u16| winner(ip, port).is_some_and(|w| ours.contains(w));
    let mut out: Vec<SocketAddr> = Vec::new();
    for f in [format!("/proc/thread-self/net/{}", proto.name()), format!("/proc/thread-self/net/{}6", proto.name())] {
        let rows = parse_proc_net(&std::fs::read_to_string(f).unwrap_or_default());
        out.extend(rows.into_iter().filter(|r| r.state == usable && r.local != target).map(|r| r.local).filter(
            |local| {
                let (ip, port) = (local.ip(), local.port());
                if ip.is_unspecified() {
                    ours.iter().any(|k| {
                        let family =
                            k.prefix.addr.is_ipv4() == ip.is_ipv4() || (ip.is_ipv6() && k.prefix.addr.is_ipv4());
                        family && k.ports.contains(port) && ours_win(k.prefix.addr, port)
                    })
                } else {
                    ours_win(ip, port)
                }
            },
        ));
    }
    out.sort();
    out.dedup();
    out
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
            // An IPv6 wildcard socket takes IPv4 connections too unless it set IPV6_V6ONLY (which
            // /proc does not show), so an IPv4 funnel shadows it as well.
            let dual_stack = listen.is_ipv4() && other.is_ipv6() && other.is_unspecified();
            dual_stack
                || other.is_ipv4() == listen.is_ipv4()
                    && (listen.ip().is_unspecified() || other.is_unspecified() || other == listen.ip())
        })
        .map(|r| r.local)
        .collect();
    out.sort();
    out.dedup();
    out
}
