//! Finding the socket a binding sends connections to, in this or another process: by address
//! (/proc/net/{tcp,udp}[6] then the owning process's /proc/PID/fd) or by pid and fd, and taking
//! a duplicate of it with pidfd_open + pidfd_getfd.
use crate::{cli::Proto, error::Error, sys};
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::OwnedFd,
};

/// A socket that can take steered connections: a listening TCP socket or an unconnected UDP
/// socket of this network namespace.
#[derive(Debug)]
pub struct Target {
    /// Our duplicate of the socket (the process keeps its own).
    pub fd: OwnedFd,
    pub pid: u32,
    pub comm: String,
    pub local: SocketAddr,
    pub proto: Proto,
    pub cookie: u64,
    /// An IPv6 socket that accepts IPv4 too (not IPV6_V6ONLY).
    pub dual_stack: bool,
    /// The socket has SO_REUSEPORT: the kernel spreads what is steered to it over its group.
    pub reuse_port: bool,
    /// The interface the socket is bound to (a link-local address's, or SO_BINDTODEVICE): it
    /// takes only what arrives there, and connections steered to it from elsewhere are dropped.
    pub device: Option<String>,
}

impl Target {
    /// Whether the socket can take connections to addresses of this family.
    pub fn accepts_family(&self, v6: bool) -> bool {
        match (self.local.is_ipv6(), v6) {
            (false, false) | (true, true) => true,
            (true, false) => self.dual_stack,
            (false, true) => false,
        }
    }

    /// The socket listening (TCP) or bound (UDP) at `addr` in this network namespace, taken from
    /// the process that owns it. A socket bound to the wildcard address of the family matches too.
    pub fn at(proto: Proto, addr: SocketAddr) -> Result<Target, Error> {
        // /proc/net shows no interface: a link-local address can be bound on several, each its
        // own socket, and the one taken was whichever came first (a re-check pass: `--to
        // [fe80::5%3]:7140` bound the socket on interface 2). The socket's own address says.
        let inodes = find_socket_inodes(proto, addr)?;
        let link_local = matches!(addr, SocketAddr::V6(a) if a.ip().is_unicast_link_local());
        if !link_local {
            return Target::of_inode(proto, addr, inodes[0]);
        }
        let scope = |a: &SocketAddr| match a {
            SocketAddr::V6(a) => a.scope_id(),
            SocketAddr::V4(_) => 0,
        };
        let mut found = Vec::new();
        for inode in inodes {
            let t = Target::of_inode(proto, addr, inode)?;
            // A wildcard socket takes link-local connections of every interface; the exact
            // sockets come first, so one bound on the interface named is taken before it.
            // A wildcard socket bound to another interface (SO_BINDTODEVICE) takes nothing of the
            // interface named (a re-check pass: it was taken, with only a note).
            let other_device =
                t.device.as_deref().is_some_and(|dev| scope(&addr) != 0 && sys::interface_index(dev) != scope(&addr));
            if t.local.ip().is_unspecified() && !other_device {
                if scope(&addr) == 0 && !found.is_empty() {
                    // The address alone names sockets bound on interfaces as well as this one:
                    // the wildcard was taken without a word (a re-check pass).
                    let there = found.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
                    return Err(Error::Usage(format!(
                        "{addr} is link-local, and {} sockets {} both on it, each bound to an interface \
                         ({there}), and on the wildcard address ({}): give the one meant, as \
                         [ADDRESS%INTERFACE]:PORT or {}",
                        proto.name().to_uppercase(),
                        if proto == Proto::Tcp { "listen" } else { "are bound" },
                        t.local,
                        t.local
                    )));
                }
                return Ok(t);
            }
            if scope(&t.local) == scope(&addr) {
                return Ok(t);
            }
            found.push(t.local);
        }
        let there = found.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        Err(Error::Usage(match scope(&addr) {
            0 => format!(
                "{addr} is link-local, and the {} sockets there are each bound to an interface ({there}): give the \
                 one meant with its interface, as [ADDRESS%INTERFACE]:PORT",
                proto.name().to_uppercase()
            ),
            _ => format!(
                "no {} socket is at {addr} in this network namespace (there is {there}, on another interface)",
                proto.name().to_uppercase()
            ),
        }))
    }

    /// The socket with inode `inode` (found at `addr`), taken from a process that holds it.
    fn of_inode(proto: Proto, addr: SocketAddr, inode: u64) -> Result<Target, Error> {
        let (pid, fd) = find_owner(inode).map_err(|hidden| {
            if hidden > 0 {
                // The socket is there; we may not look into the processes that could hold it.
                match rustix::process::geteuid().is_root() {
                    _ if crate::bpf::in_user_namespace() => Error::Usage(format!(
                        "cannot find which process holds the {} socket at {addr}: the descriptors of {hidden} \
                         process(es) cannot be read from a user namespace, whose capabilities reach no process \
                         outside it (run it as root outside this user namespace)",
                        proto.name()
                    )),
                    true => Error::Usage(format!(
                        "cannot find which process holds the {} socket at {addr}: the descriptors of {hidden} \
                         process(es) cannot be read without CAP_SYS_PTRACE, which taking the socket needs too (run \
                         it with CAP_SYS_PTRACE)",
                        proto.name()
                    )),
                    false => Error::Usage(format!(
                        "cannot find which process holds the {} socket at {addr}: the descriptors of {hidden} \
                         process(es) of other users cannot be read without root (run as root, or give --pid and \
                         --fd of a process of yours)",
                        proto.name()
                    )),
                }
            } else if crate::bpffs::in_pid_namespace_of_its_own() {
                // --pid and --fd cannot name a process this namespace does not show either.
                Error::Usage(format!(
                    "no process in this pid namespace holds the {} socket at {addr}, and its /proc shows no process \
                     outside it (run the command in the pid namespace of the process that holds the socket, e.g. \
                     the host's)",
                    proto.name()
                ))
            } else {
                Error::Usage(format!(
                    "no process of this machine holds the {} socket at {addr} (is it in another pid namespace?): \
                     use --pid and --fd",
                    proto.name()
                ))
            }
        })?;
        Target::from_process(proto, pid, fd)
    }

    /// Descriptor `fd` of process `pid`, which must be a socket usable as a target.
    pub fn from_process(proto: Proto, pid: i32, fd: i32) -> Result<Target, Error> {
        if pid <= 0 {
            return Err(Error::Usage(format!("--pid {pid} is not a process id (they are 1 or more)")));
        }
        let pidfd = sys::pidfd_open(pid).map_err(|e| match e.raw_os_error() {
            Some(libc::ESRCH) => Error::Usage(format!(
                "there is no process with pid {pid} (`ss -ltnup` lists the listening sockets with their pids and \
                 descriptors, or give --to ADDR to let skrelay find the process)"
            )),
            Some(libc::EPERM) => may_not_trace(pid),
            _ => match thread_group_of(pid) {
                Some(tgid) if tgid != pid => {
                    Error::Usage(format!("{pid} is a thread of process {tgid}, not a process: give --pid {tgid}"))
                }
                _ => Error::io(format!("cannot open process {pid}"), e),
            },
        })?;
        let dup = sys::pidfd_getfd(&pidfd, fd).map_err(|e| match e.raw_os_error() {
            Some(libc::EBADF) => Error::Usage(format!(
                "process {pid} has no file descriptor {fd} (`ss -ltnup` lists the listening sockets with their pids \
                 and descriptors, or give --to ADDR to let skrelay find the process)"
            )),
            Some(libc::EPERM) | Some(libc::EACCES) => may_not_trace(pid),
            Some(libc::ESRCH) => Error::Usage(format!("process {pid} exited before its fd {fd} could be taken")),
            _ => Error::io(format!("cannot take fd {fd} of process {pid}"), e),
        })?;
        let what = format!("fd {fd} of process {pid}");
        let kind = sys::socket_kind(&dup).map_err(|e| Error::io(format!("cannot inspect {what}"), e))?;
        let Some((domain, protocol, listening)) = kind else {
            return Err(Error::Usage(format!("{what} is not a socket (give the fd of its listening socket)")));
        };
        if domain != libc::AF_INET && domain != libc::AF_INET6 {
            return Err(Error::Usage(format!(
                "{what} is not an IPv4 or IPv6 socket (steering takes a listening TCP or a bound UDP socket: give \
                 the fd of one)"
            )));
        }
        let actual = match protocol {
            libc::IPPROTO_TCP => Proto::Tcp,
            libc::IPPROTO_UDP => Proto::Udp,
            _ => return Err(Error::Usage(format!("{what} is neither a TCP nor a UDP socket"))),
        };
        if actual != proto {
            return Err(Error::Usage(format!(
                "{what} is a {} socket but the binding is for {} (pass --proto {})",
                actual.name().to_uppercase(),
                proto.name().to_uppercase(),
                actual.name()
            )));
        }
        match proto {
            Proto::Tcp if !listening => {
                return Err(Error::Usage(format!(
                    "{what} is a TCP socket that is not listening (steering needs a listening socket)"
                )))
            }
            Proto::Udp if sys::socket_addr(&dup, true).is_some() => {
                return Err(Error::Usage(format!(
                    "{what} is a connected UDP socket (steering needs an unconnected, bound one)"
                )))
            }
            _ => {}
        }
        let local = sys::socket_addr(&dup, false)
            .filter(|a| a.port() != 0)
            .ok_or_else(|| Error::Usage(format!("{what} is not bound to an address")))?;
        let own_ns = sys::own_netns_inode().map_err(|e| Error::io("cannot read this network namespace", e))?;
        match sys::socket_netns_inode(&dup) {
            Ok(ns) if ns != own_ns => {
                return Err(Error::Usage(format!(
                    "{what} belongs to another network namespace (net:[{ns}], this is net:[{own_ns}]): \
                     run skrelay steer inside that namespace (ip netns exec / nsenter --net)"
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(Error::io(format!("cannot read the network namespace of {what}"), e)),
        }
        let cookie = sys::socket_cookie(&dup).map_err(|e| Error::io(format!("cannot read the cookie of {what}"), e))?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string();
        let dual_stack = domain == libc::AF_INET6 && !sys::v6only(&dup);
        let reuse_port = sys::reuse_port(&dup);
        let device = sys::bound_device(&dup);
        Ok(Target { fd: dup, pid: pid as u32, comm, local, proto, cookie, dual_stack, reuse_port, device })
    }
}

fn may_not_trace(pid: i32) -> Error {
    if rustix::process::geteuid().is_root() {
        return Error::Usage(format!(
            "not allowed to take sockets from process {pid}, even as root (pidfd_getfd needs ptrace rights over it: \
             check CAP_SYS_PTRACE in this process's bounding set, a security module's policy (kernel.yama.ptrace_scope \
             where Yama runs), or whether the process is in a user namespace this one does not own)"
        ));
    }
    let yama = match std::path::Path::new("/proc/sys/kernel/yama/ptrace_scope").exists() {
        true => ", and check kernel.yama.ptrace_scope",
        false => "",
    };
    Error::Usage(format!(
        "not allowed to take sockets from process {pid} (pidfd_getfd needs ptrace rights over it: run as root, as \
         its owner, or with CAP_SYS_PTRACE{yama})"
    ))
}

/// The process a thread id belongs to (its thread group), from /proc/PID/status; a process's own id
/// gives itself.
fn thread_group_of(tid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Tgid:")).and_then(|v| v.trim().parse().ok())
}

/// One row of /proc/net/{tcp,udp}[6].
#[derive(Debug, PartialEq, Eq)]
pub struct ProcSocket {
    pub local: SocketAddr,
    pub state: u8,
    pub inode: u64,
}

/// TCP_LISTEN in /proc/net/tcp; unconnected UDP sockets show TCP_CLOSE.
pub const STATE_LISTEN: u8 = 0x0A;
pub const STATE_CLOSE: u8 = 0x07;

/// Parses /proc/net/{tcp,udp}[6] text: addresses are printed as the raw 32-bit words in host order.
pub fn parse_proc_net(text: &str) -> Vec<ProcSocket> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 10 {
            continue;
        }
        let Some((addr, port)) = cols[1].split_once(':') else { continue };
        let (Ok(port), Ok(state), Ok(inode)) =
            (u16::from_str_radix(port, 16), u8::from_str_radix(cols[3], 16), cols[9].parse::<u64>())
        else {
            continue;
        };
        let mut bytes = Vec::with_capacity(16);
        for i in (0..addr.len()).step_by(8) {
            let Some(word) = addr.get(i..i + 8).and_then(|w| u32::from_str_radix(w, 16).ok()) else { break };
            bytes.extend_from_slice(&word.to_ne_bytes());
        }
        let ip = match bytes.len() {
            4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
            16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[..]).unwrap())),
            _ => continue,
        };
        out.push(ProcSocket { local: SocketAddr::new(ip, port), state, inode });
    }
    out
}

/// The inode of the socket at `addr`: an exact address match first, else one bound to the
/// wildcard address of the family (or a dual-stack [::] socket for an IPv4 address).
fn find_socket_inodes(proto: Proto, addr: SocketAddr) -> Result<Vec<u64>, Error> {
    let rows_of = |proto: Proto| {
        let mut rows = Vec::new();
        for file in [format!("/proc/self/net/{}", proto.name()), format!("/proc/self/net/{}6", proto.name())] {
            if let Ok(text) = std::fs::read_to_string(&file) {
                rows.extend(parse_proc_net(&text));
            }
        }
        rows
    };
    let rows = rows_of(proto);
    let usable_as = |proto: Proto, r: &ProcSocket| match proto {
        Proto::Tcp => r.state == STATE_LISTEN,
        Proto::Udp => r.state == STATE_CLOSE,
    };
    let usable = |r: &ProcSocket| usable_as(proto, r);
    let same_port: Vec<&ProcSocket> = rows.iter().filter(|r| r.local.port() == addr.port()).collect();
    // Exact ones first (several where a link-local address is bound on several interfaces).
    let exact = same_port.iter().filter(|r| r.local.ip() == addr.ip() && usable(r));
    let wildcard = same_port.iter().filter(|r| {
        usable(r)
            && r.local.ip().is_unspecified()
            && (r.local.is_ipv4() == addr.is_ipv4() || (r.local.is_ipv6() && addr.is_ipv4()))
    });
    let found: Vec<u64> = exact.chain(wildcard).map(|r| r.inode).collect();
    if !found.is_empty() {
        return Ok(found);
    }
    // A socket someone holds: a connection in TIME-WAIT (inode 0, left by a server that just
    // restarted) is none, and was said to be "a TCP socket that is not listening" (a new-user pass).
    let connected = same_port.iter().any(|r| r.local.ip() == addr.ip() && r.inode != 0);
    // A socket of the other protocol there: the user left out (or gave the wrong) --proto.
    let other = match proto {
        Proto::Tcp => Proto::Udp,
        Proto::Udp => Proto::Tcp,
    };
    let other_there = rows_of(other).iter().any(|r| {
        r.local.port() == addr.port()
            && usable_as(other, r)
            && (r.local.ip() == addr.ip() || r.local.ip().is_unspecified())
    });
    // Each mistake names its fix (README): this one named none (a README pass).
    let hint = if other_there {
        format!(" (a {} socket is there: pass --proto {})", other.name().to_uppercase(), other.name())
    } else {
        let list = match proto {
            Proto::Tcp => "ss -ltn",
            Proto::Udp => "ss -lun",
        };
        format!(" (start the server first, or give the address `{list}` shows for it)")
    };
    Err(Error::Usage(match (proto, connected) {
        (Proto::Tcp, true) => format!("the TCP socket at {addr} is not listening (steering needs a listening socket)"),
        (Proto::Udp, true) => format!("the UDP socket at {addr} is connected (steering needs an unconnected one)"),
        (Proto::Tcp, false) => format!("no TCP socket listens on {addr} in this network namespace{hint}"),
        (Proto::Udp, false) => format!("no UDP socket is bound to {addr} in this network namespace{hint}"),
    }))
}

/// (pid, fd) of a process holding socket `inode`; the lowest pid when several share it. When
/// none is found: how many processes' descriptors could not be read (other users', without root).
fn find_owner(inode: u64) -> Result<(i32, i32), usize> {
    let want = format!("socket:[{inode}]");
    let mut pids: Vec<i32> = std::fs::read_dir("/proc")
        .map_err(|_| 0usize)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let mut hidden = 0;
    for pid in pids {
        let fds = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
            Ok(fds) => fds,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                hidden += 1;
                continue;
            }
            Err(_) => continue,
        };
        // Listing the descriptors may be allowed where reading them is not (root without
        // CAP_SYS_PTRACE looking at another root process): hidden too, not "no process holds
        // it" (a re-check pass).
        let mut unreadable = false;
        for e in fds.flatten() {
            match std::fs::read_link(e.path()) {
                Ok(l) if l.as_os_str() == want.as_str() => {
                    if let Some(fd) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
                        return Ok((pid, fd));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => unreadable = true,
                _ => {}
            }
        }
        hidden += usize::from(unreadable);
    }
    Err(hidden)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_rows() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                   0: 0100007F:1E61 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 38462 1 0 100 0 0 10 0\n";
        let rows = parse_proc_net(tcp);
        assert_eq!(rows, vec![ProcSocket { local: "127.0.0.1:7777".parse().unwrap(), state: 0x0A, inode: 38462 }]);
        let tcp6 = "header\n   0: 00000000000000000000000001000000:1E61 00000000000000000000000000000000:0000 0A \
                    00000000:00000000 00:00000000 00000000     0        0 4242 1\n";
        assert_eq!(parse_proc_net(tcp6)[0].local, "[::1]:7777".parse().unwrap());
    }
}
