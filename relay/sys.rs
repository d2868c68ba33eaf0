//! The socket and kernel calls skrelay makes, each wrapped once and taking `AsFd`.
//!
//! Most are thin adapters over maintained crates: socket2 (cookie, linger, SO_ERROR, socket
//! kind, IPV6_V6ONLY, addresses), rustix (MSG_PEEK without blocking, SO_SNDBUFFORCE, splice(2)
//! and pipe sizes, pidfds, rlimits, fstat). Raw here is only what none of them offers:
//! - TCP_INFO's byte counters (no crate reads `struct tcp_info`; libc defines its layout),
//! - SIOCGSKNS, a socket's network namespace, and SO_MEMINFO, its memory (no crate has either),
//! - the bpf(2) commands aya 0.14 does not expose (`bpf` below),
//! - SOCK_DESTROY, one netlink request that resets a socket while its descriptor stays open
//!   (`abort`; the netlink crates would add three dependencies for one message).
//!
//! Every constant, offset and `#[repr(C)]` struct written here by hand is compared with the
//! kernel's uapi headers by the tests at the end (build.rs compiles a probe of the headers).
//! Every `unsafe` block says why it is sound; the pattern is always the same: a syscall is given
//! a descriptor we borrow for the call and pointers to locals that outlive it, with their true
//! sizes.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

fn check(ret: libc::c_long) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

fn sock<Fd: AsFd>(fd: &Fd) -> socket2::SockRef<'_> {
    socket2::SockRef::from(fd)
}

/// Whether process `pid` is exiting or gone: every one of its threads a zombie or flagged
/// PF_EXITING, which `do_exit` sets before it releases the memory that holds the command line (a
/// takeover read half the command line of the process another takeover had just replaced), or
/// no such process. A zombie's `comm` is still there: `steer list` called a target's exited
/// process running. Every thread: a main thread that called pthread_exit shows as a zombie while
/// the others serve (a re-check pass).
pub fn exiting(pid: u32) -> bool {
    let dir = format!("/proc/{pid}");
    if !thread_exiting(&format!("{dir}/stat")) {
        return false;
    }
    match std::fs::read_dir(format!("{dir}/task")) {
        Ok(tasks) => tasks.flatten().all(|t| thread_exiting(&t.path().join("stat").to_string_lossy())),
        Err(_) => true,
    }
}

/// Whether the thread of `stat` (a /proc stat file) is a zombie, flagged PF_EXITING, or gone.
fn thread_exiting(stat: &str) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = std::fs::read_to_string(stat) else { return true };
    // The fields after the command name (in parentheses, which may hold spaces): state, ppid,
    // pgrp, session, tty_nr, tpgid, flags.
    let Some((_, fields)) = stat.rsplit_once(')') else { return true };
    let mut fields = fields.split_whitespace();
    let zombie = fields.next().is_none_or(|state| matches!(state, "Z" | "X" | "x"));
    zombie || fields.nth(5).and_then(|f| f.parse::<u64>().ok()).is_none_or(|f| f & PF_EXITING != 0)
}

/// The kernel's unique id of a socket (SO_COOKIE), the key of every skrelay socket map.
pub fn socket_cookie(fd: impl AsFd) -> io::Result<u64> {
    sock(&fd).cookie()
}

/// The parts of `struct tcp_info` skrelay reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// TCP state (TCP_ESTABLISHED = 1, TCP_CLOSE_WAIT = 8, ...).
    pub state: u8,
    /// Bytes of ours the peer acknowledged; an actively opened socket's count includes its SYN.
    pub bytes_acked: u64,
    /// Bytes received in sequence; includes the FIN once it arrived.
    pub bytes_received: u64,
    /// The window the peer last advertised, in bytes (`tcpi_snd_wnd`, Linux 5.4+; None before):
    /// 0 while its receive buffer is full, that is while its client does not read.
    pub snd_wnd: Option<u32>,
    /// Bytes written and not sent yet (`tcpi_notsent_bytes`, Linux 4.6+): the send queue
    /// (`send_queue_len`) less these is what is in flight, sent and not acknowledged.
    pub notsent: Option<u32>,
}

/// TCP states (the kernel's `enum` in net/tcp_states.h, mirrored by uapi `BPF_TCP_*`).
const TCP_ESTABLISHED: u8 = 1;
const TCP_SYN_SENT: u8 = 2;
const TCP_FIN_WAIT2: u8 = 5;
const TCP_TIME_WAIT: u8 = 6;
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;
const TCP_CLOSING: u8 = 11;

/// A TCP state as `ss` names it, for logs.
pub fn tcp_state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTAB",
        2 => "SYN-SENT",
        3 => "SYN-RECV",
        4 => "FIN-WAIT-1",
        TCP_FIN_WAIT2 => "FIN-WAIT-2",
        TCP_TIME_WAIT => "TIME-WAIT",
        TCP_CLOSE => "CLOSED",
        TCP_CLOSE_WAIT => "CLOSE-WAIT",
        TCP_LAST_ACK => "LAST-ACK",
        10 => "LISTEN",
        TCP_CLOSING => "CLOSING",
        _ => "unknown TCP state",
    }
}

/// Offsets in `struct tcp_info` (uapi linux/tcp.h), from libc's definition of it; stable since
/// Linux 4.1 and checked against the headers by the tests below.
const TCPI_STATE: usize = std::mem::offset_of!(libc::tcp_info, tcpi_state);
const TCPI_BYTES_ACKED: usize = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked);
const TCPI_BYTES_RECEIVED: usize = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received);
const TCPI_SND_WND: usize = std::mem::offset_of!(libc::tcp_info, tcpi_snd_wnd);
const TCPI_NOTSENT_BYTES: usize = std::mem::offset_of!(libc::tcp_info, tcpi_notsent_bytes);
const TCPI_UNACKED: usize = std::mem::offset_of!(libc::tcp_info, tcpi_unacked);

/// The byte counters of a TCP socket (TCP_INFO).
pub fn tcp_counters(fd: impl AsFd) -> io::Result<TcpCounters> {
    let (buf, len) = tcp_info_bytes(fd)?;
    if len < TCPI_BYTES_RECEIVED + 8 {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "TCP_INFO lacks byte counters (kernel older than 4.1)"));
    }
    let u64_at = |off: usize| u64::from_ne_bytes(buf[off..off + 8].try_into().expect("8 bytes"));
    let u32_at = |off: usize| u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes"));
    Ok(TcpCounters {
        state: buf[TCPI_STATE],
        bytes_acked: u64_at(TCPI_BYTES_ACKED),
        bytes_received: u64_at(TCPI_BYTES_RECEIVED),
        snd_wnd: (len >= TCPI_SND_WND + 4).then(|| u32_at(TCPI_SND_WND)),
        notsent: (len >= TCPI_NOTSENT_BYTES + 4).then(|| u32_at(TCPI_NOTSENT_BYTES)),
    })
}

/// A TCP socket's `struct tcp_info` as bytes, and how many of them the kernel filled.
fn tcp_info_bytes(fd: impl AsFd) -> io::Result<([u8; std::mem::size_of::<libc::tcp_info>()], usize)> {
    let mut buf = [0u8; std::mem::size_of::<libc::tcp_info>()];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` and `len` are live locals and `len` is `buf`'s size: the kernel copies at
    // most that much of its `struct tcp_info` and reports how much in `len`. The descriptor is
    // borrowed for the call; a bad one is an error return.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    check(ret as libc::c_long)?;
    Ok((buf, len as usize))
}

/// How many connections wait in a listening socket's accept queue (TCP_INFO's `tcpi_unacked`,
/// which a listener fills with its `sk_ack_backlog`).
pub fn accept_queue_len(fd: impl AsFd) -> io::Result<u32> {
    let (buf, len) = tcp_info_bytes(fd)?;
    if len < TCPI_UNACKED + 4 {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "TCP_INFO too short"));
    }
    Ok(u32::from_ne_bytes(buf[TCPI_UNACKED..TCPI_UNACKED + 4].try_into().expect("4 bytes")))
}

impl TcpCounters {
    /// The socket will receive nothing more: the peer's FIN has arrived, or the connection is
    /// closed. A reset also leaves CLOSE: callers tell it apart by SO_ERROR, which the kernel sets
    /// before it changes the state.
    pub fn fin_received(&self) -> bool {
        matches!(self.state, TCP_TIME_WAIT | TCP_CLOSE | TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING)
    }

    pub fn closed(&self) -> bool {
        self.state == TCP_CLOSE
    }

    /// SYN-SENT: a connect(2) still waits for its answer.
    pub fn connecting(&self) -> bool {
        self.state == TCP_SYN_SENT
    }

    /// ESTABLISHED: the only state in which a socket may join a socket map.
    pub fn established(&self) -> bool {
        self.state == TCP_ESTABLISHED
    }

    /// Payload bytes received: `bytes_received` without the FIN's sequence number.
    pub fn payload_received(&self) -> u64 {
        self.bytes_received.saturating_sub(u64::from(self.fin_received()))
    }

    /// Payload bytes received, where a socket that was reset (CLOSE) is taken to have had no
    /// FIN (`payload_received` takes one off for it: a reset pair's figure read 1 short).
    pub fn payload_received_but_reset(&self) -> u64 {
        let fin = matches!(self.state, TCP_TIME_WAIT | TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING);
        self.bytes_received.saturating_sub(u64::from(fin))
    }

    /// Bytes of ours the peer acknowledged less the FIN's sequence number once it was
    /// acknowledged (FIN-WAIT-2, TIME-WAIT). An actively opened socket's SYN is still in.
    pub fn acked_but_fin(&self) -> u64 {
        self.bytes_acked.saturating_sub(u64::from(matches!(self.state, TCP_FIN_WAIT2 | TCP_TIME_WAIT)))
    }
}

/// Reads up to `buf.len()` queued bytes without consuming them (never blocks).
/// Takes and drops what `fd` has received, up to `max` bytes, without waiting: the bytes dropped
/// (0 at end of file or when nothing is queued). TCP drops them in place (MSG_TRUNC); a socket
/// with a psock (the kernel datapath's) copies its own queue into `scratch` first.
pub fn drop_received(fd: impl AsFd, scratch: &mut [u8], max: usize) -> io::Result<usize> {
    use rustix::net::RecvFlags;
    let mut dropped = 0;
    while dropped < max {
        let want = (max - dropped).min(scratch.len());
        match rustix::net::recv(&fd, &mut scratch[..want], RecvFlags::TRUNC | RecvFlags::DONTWAIT) {
            Ok((_, 0)) => break,
            Ok((_, n)) => dropped += n.min(want),
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(dropped)
}

pub fn peek(fd: impl AsFd, buf: &mut [u8]) -> io::Result<usize> {
    use rustix::net::RecvFlags;
    // rustix returns (bytes copied into buf, what recv returned): without MSG_TRUNC, the same.
    Ok(rustix::net::recv(fd, buf, RecvFlags::PEEK | RecvFlags::DONTWAIT)?.0)
}

/// A path reached through another process's root (/proc/PID/root/sys/...: the outer mount
/// namespace's, under `ip netns exec`) as the host names it (/sys/...); None for other paths.
pub fn as_the_host_names_it(path: &Path) -> Option<PathBuf> {
    let mut c = path.strip_prefix("/proc").ok()?.components();
    let (_pid, root) = (c.next()?, c.next()?);
    (root.as_os_str() == "root").then(|| Path::new("/").join(c.as_path()))
}

/// `path` as messages and reports show it: as the host names it (`as_the_host_names_it`). Under
/// `ip netns exec` skrelay's state is reached through /proc/2/root, a path that says nothing to
/// the user and changes with how the command was started (a stranger pass).
pub fn shown(path: &Path) -> PathBuf {
    as_the_host_names_it(path).unwrap_or_else(|| path.to_path_buf())
}

/// `arg` as one word of a shell command a message tells the user to run: as it is when the
/// shell would take it so, else in single quotes (a cgroup path with a space broke the pasted
/// command: a helper's pass).
pub fn shell_arg(arg: impl std::fmt::Display) -> String {
    let s = arg.to_string();
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./:@%+=,-".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Resets a TCP connection now, as `ss -K` does: SOCK_DESTROY over NETLINK_SOCK_DIAG sends the
/// reset, throws away the send queue and leaves the socket CLOSE with its descriptor open, so its
/// counters can be read once nothing more can reach the peer: what it had sent before the reset
/// is what the peer gets. Needs CAP_NET_ADMIN in the socket's network namespace and a kernel built
/// with CONFIG_INET_DIAG_DESTROY; an error means the connection was not reset.
pub fn abort(fd: impl AsFd) -> io::Result<()> {
    // `tcp_abort` resets only where `tcp_need_reset` says so: not in LAST-ACK or CLOSING, which
    // it would close silently, leaving the client in FIN-WAIT-2 for good (a re-check pass); the
    // close with SO_LINGER 0 (`tcp_disconnect`) resets them while data waits.
    let state = tcp_counters(&fd)?.state;
    if matches!(state, TCP_LAST_ACK | TCP_CLOSING) {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "SOCK_DESTROY sends no reset in LAST-ACK or CLOSING"));
    }
    let s = sock(&fd);
    let (Some(local), Some(peer)) = (s.local_addr()?.as_socket(), s.peer_addr()?.as_socket()) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    let family = if s.domain()? == socket2::Domain::IPV6 { libc::AF_INET6 } else { libc::AF_INET };
    let octets = |a: std::net::SocketAddr| {
        let mut out = [0u8; 16];
        match a.ip() {
            std::net::IpAddr::V4(ip) if family == libc::AF_INET => out[..4].copy_from_slice(&ip.octets()),
            std::net::IpAddr::V4(ip) => out = ip.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(ip) => out = ip.octets(),
        }
        out
    };
    let cookie = socket_cookie(&fd)?;
    let request = DestroyRequest {
        header: libc::nlmsghdr {
            nlmsg_len: std::mem::size_of::<DestroyRequest>() as u32,
            nlmsg_type: SOCK_DESTROY,
            nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        req: InetDiagReqV2 {
            family: family as u8,
            protocol: libc::IPPROTO_TCP as u8,
            ext: 0,
            pad: 0,
            states: !0,
            id: InetDiagSockId {
                sport: local.port().to_be_bytes(),
                dport: peer.port().to_be_bytes(),
                src: octets(local),
                dst: octets(peer),
                ifindex: bound_device_index(&fd).unwrap_or(0),
                cookie: [cookie as u32, (cookie >> 32) as u32],
            },
        },
    };
    // SAFETY: socket(2) takes no pointers; a descriptor it returns is ours alone to own.
    let nl = unsafe {
        let raw = libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG);
        check(raw as libc::c_long)?;
        OwnedFd::from_raw_fd(raw)
    };
    // SAFETY: the request is a live local, and its size is what is passed; an unconnected
    // netlink socket sends to the kernel.
    check(unsafe {
        libc::send(
            nl.as_raw_fd(),
            &request as *const DestroyRequest as *const libc::c_void,
            std::mem::size_of::<DestroyRequest>(),
            0,
        )
    } as libc::c_long)?;
    let mut answer = [0u8; 256];
    // SAFETY: the buffer is a live local of the length given.
    let len = check(unsafe { libc::recv(nl.as_raw_fd(), answer.as_mut_ptr() as *mut libc::c_void, answer.len(), 0) }
        as libc::c_long)?;
    // The acknowledgment: an nlmsghdr of type NLMSG_ERROR, then the error (0: done, or -errno).
    let header = std::mem::size_of::<libc::nlmsghdr>();
    if len < header + 4 || u16::from_ne_bytes([answer[4], answer[5]]) != libc::NLMSG_ERROR as u16 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected answer to SOCK_DESTROY"));
    }
    match i32::from_ne_bytes(answer[header..header + 4].try_into().expect("4 bytes")) {
        0 => Ok(()),
        err => Err(io::Error::from_raw_os_error(-err)),
    }
}

/// The interface a socket is bound to, by index (SO_BINDTOIFINDEX; 0: none).
fn bound_device_index(fd: impl AsFd) -> io::Result<u32> {
    let mut index: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `index`, a live local of that size.
    check(unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTOIFINDEX,
            &mut index as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    } as libc::c_long)?;
    Ok(index.max(0) as u32)
}

/// SOCK_DESTROY, the sock_diag request that resets a socket (uapi linux/sock_diag.h).
const SOCK_DESTROY: u16 = 21;

/// `struct inet_diag_sockid` (uapi linux/inet_diag.h): ports and addresses in network order.
#[repr(C)]
struct InetDiagSockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2` (uapi linux/inet_diag.h).
#[repr(C)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

/// One netlink message: a SOCK_DESTROY request.
#[repr(C)]
struct DestroyRequest {
    header: libc::nlmsghdr,
    req: InetDiagReqV2,
}

/// Makes the next close of this socket send a RST instead of a FIN: also the close the kernel
/// does when the process dies, so a reader never takes a cut stream for a whole one.
pub fn reset_on_close(fd: impl AsFd) {
    let _ = sock(&fd).set_linger(Some(std::time::Duration::ZERO));
}

/// Sets on a listening socket (or on one accepted socket) what each socket it accepts inherits, and what skrelay wants of
/// every client before anything else: `reset_on_close` (a client closed before its pair ends
/// well, or by this process's death, sees a reset), TCP_NODELAY, and urgent bytes (MSG_OOB) kept
/// in the stream (`inline_urgent_data`: one that came before the pair formed would be dropped
/// from the queue by a second urgent pointer; a re-check pass saw `X` of X, mid, Y, tail lost,
/// then a clean EOF). Three system calls once, where each client took two of its own. A socket
/// inherits them only if its handshake completes after this: what already waits in the accept
/// queue (`accept_queue_len`) is armed one by one, with this same function.
pub fn arm_for_clients(fd: impl AsFd) -> io::Result<()> {
    let s = sock(&fd);
    s.set_linger(Some(std::time::Duration::ZERO))?;
    s.set_nodelay(true)?;
    s.set_out_of_band_inline(true)
}

/// Undoes `reset_on_close`: the next close is an orderly one (FIN after every queued byte).
pub fn close_gracefully(fd: impl AsFd) {
    let _ = sock(&fd).set_linger(None);
}

/// The host's TCP memory pressure threshold in bytes, past which TCP moderates every socket's
/// buffers host-wide: the second of net.ipv4.tcp_mem's three page counts, and whether it was read
/// (true) or estimated. The sysctl is the host's alone and shows only in its first network
/// namespace; elsewhere the estimate is the kernel's default for it (`tcp_init`): 1/16 of the
/// memory. None if neither can be read.
pub fn tcp_memory_pressure_threshold() -> Option<(u64, bool)> {
    let read = || -> Option<u64> {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem").ok()?;
        let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
        pages.checked_mul(rustix::param::page_size() as u64)
    };
    let estimate = || -> Option<u64> {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let kib: u64 =
            text.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kib * 1024 / 16)
    };
    read().map(|b| (b, true)).or_else(|| estimate().map(|b| (b, false)))
}

/// The pending error of a socket (SO_ERROR), which reading clears.
pub fn take_socket_error(fd: impl AsFd) -> Option<io::Error> {
    sock(&fd).take_error().ok().flatten()
}

/// A pipe for splice(2), both ends non-blocking.
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

impl Pipe {
    /// A pipe of `size` bytes of capacity (or the system's default where that is refused).
    pub fn new(size: usize) -> io::Result<(Pipe, usize)> {
        use rustix::pipe::{fcntl_getpipe_size, fcntl_setpipe_size, pipe_with, PipeFlags};
        let (read, write) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        let capacity = match fcntl_setpipe_size(&write, size) {
            Ok(got) if got > 0 => got,
            _ => fcntl_getpipe_size(&write).unwrap_or(0).max(4096),
        };
        Ok((Pipe { read, write }, capacity))
    }
}

/// Moves up to `len` bytes between a socket and a pipe without copying them to user space.
/// `Ok(0)` means end of file on `from`.
pub fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    use rustix::pipe::SpliceFlags;
    Ok(rustix::pipe::splice(from, None, to, None, len, SpliceFlags::MOVE | SpliceFlags::NONBLOCK)?)
}

/// An IPv4 address written in IPv6 form (`[::ffff:a.b.c.d]:p`) as the IPv4 address it is: the
/// kernel's lookups (sk_lookup, the listener hash) see such connections as IPv4. Others as given.
pub fn unmapped(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V6(v6) => {
            v6.to_ipv4_mapped().map_or(addr, |v4| std::net::SocketAddr::new(v4.into(), addr.port()))
        }
        std::net::IpAddr::V4(_) => addr,
    }
}

/// Whether `addr`'s IP is an address of this machine (in this network namespace); a link-local
/// IPv6 address only on the interface its scope names (binding it without one fails, and every
/// link-local address looked foreign: an IPv6 stranger pass). The port is not looked at.
pub fn is_local_address(addr: std::net::SocketAddr) -> bool {
    let at = match addr {
        std::net::SocketAddr::V6(v6) => std::net::SocketAddrV6::new(*v6.ip(), 0, 0, v6.scope_id()).into(),
        std::net::SocketAddr::V4(v4) => std::net::SocketAddr::new((*v4.ip()).into(), 0),
    };
    std::net::UdpSocket::bind(at).is_ok()
}

/// Whether two socket addresses name the same local IP: equal IPs, and for a link-local IPv6
/// address the same interface (the same fe80:: address on two links is two addresses).
pub fn same_local_ip(a: std::net::SocketAddr, b: std::net::SocketAddr) -> bool {
    match (a, b) {
        (std::net::SocketAddr::V6(a), std::net::SocketAddr::V6(b)) if a.ip().is_unicast_link_local() => {
            a.ip() == b.ip() && a.scope_id() == b.scope_id()
        }
        _ => a.ip() == b.ip(),
    }
}

/// SIGINT, SIGTERM, SIGHUP, SIGQUIT (and SIGUSR1 and SIGUSR2, which would kill) held back (blocked) while alive: a relay's handlers are installed only
/// once its datapaths are loaded and its event loop exists (0.1 s, seconds with many
/// `--threads`), and a SIGINT before that was lost when the shell had it ignored (a background
/// job of a script), a SIGTERM ended the process without its drain. Blocked, they wait (even an
/// ignored one: Linux queues a blocked signal) and reach the handlers once this is dropped.
/// Threads started meanwhile keep them blocked, so they go to the thread that unblocks.
pub struct StopSignalsHeld(libc::sigset_t, std::cell::Cell<bool>);

impl StopSignalsHeld {
    pub fn new() -> StopSignalsHeld {
        let set = Self::set();
        // SAFETY: pthread_sigmask reads the set it is given; a null old set is allowed.
        unsafe {
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        StopSignalsHeld(set, std::cell::Cell::new(false))
    }

    /// The signals held: SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2.
    pub fn set() -> libc::sigset_t {
        // SAFETY: sigset_t is plain data, filled by sigemptyset/sigaddset before use.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2] {
                libc::sigaddset(&mut set, signal);
            }
            set
        }
    }
}

impl StopSignalsHeld {
    /// `e`, and when it is a start-up stopped by a held signal, that signal stays held: let go,
    /// it would end the process before it said why.
    pub fn keep_if_stopped(&self, e: crate::error::Error) -> crate::error::Error {
        if matches!(e, crate::error::Error::StoppedStarting(_)) {
            self.1.set(true);
        }
        e
    }

    /// The signals held, for a child to let go of between fork and exec (`unblock`): a mask
    /// survives both, so a command started while they are held would have them blocked.
    pub fn signals(&self) -> libc::sigset_t {
        self.0
    }

    /// Takes SIGUSR1 and SIGUSR2 off the pending signals where one came while held (they are
    /// not stop signals: `pending` does not name them); returns their names.
    pub fn discard_user_signals() -> Vec<&'static str> {
        let mut taken = Vec::new();
        for (signal, name) in [(libc::SIGUSR1, "SIGUSR1"), (libc::SIGUSR2, "SIGUSR2")] {
            // SAFETY: sigset_t is plain data, filled before use; sigtimedwait with a zero timeout
            // takes the signal if it is pending (it is blocked here) and returns at once if not.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, signal);
                let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
                if libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) == signal {
                    taken.push(name);
                }
            }
        }
        taken
    }

    /// Keeps the stop signals held when this is dropped: one that came is then thrown away
    /// with the process, which says why it stopped instead of being killed by it.
    pub fn keep(&self) {
        self.1.set(true);
    }

    /// The stop signal held back so far, if one came: a start-up that takes long (many
    /// `--threads`) stops there instead of serving first and draining at once.
    pub fn pending() -> Option<&'static str> {
        // SAFETY: sigpending fills the set it is given; sigismember reads it.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            if libc::sigpending(&mut set) != 0 {
                return None;
            }
            [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM"), (libc::SIGHUP, "SIGHUP"), (libc::SIGQUIT, "SIGQUIT")]
                .into_iter()
                .find(|&(signal, _)| {
                    libc::sigismember(&set, signal) == 1 && !(signal == libc::SIGHUP && signal_ignored(signal))
                })
                .map(|(_, name)| name)
        }
    }
}

impl Default for StopSignalsHeld {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for StopSignalsHeld {
    fn drop(&mut self) {
        if self.1.get() {
            return;
        }
        // SAFETY: unblocks the set blocked in `new`.
        unsafe {
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &self.0, std::ptr::null_mut());
        }
    }
}

/// Unblocks `set` in this thread. Async-signal-safe (sigprocmask alone): callable in a child
/// between fork and exec.
pub fn unblock(set: &libc::sigset_t) {
    // SAFETY: sigprocmask reads the set it is given; a null old set is allowed.
    unsafe {
        libc::sigprocmask(libc::SIG_UNBLOCK, set, std::ptr::null_mut());
    }
}

/// Whether `signal` is ignored (SIG_IGN), as `nohup` leaves SIGHUP for the programs it starts.
pub fn signal_ignored(signal: i32) -> bool {
    // SAFETY: sigaction with a null new action only reads the current one into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Runs `f` (which starts a thread) with every signal blocked, and gives the caller's mask back:
/// the thread inherits the full mask, so a signal for the process never goes to it, where the
/// stop handlers do not run (a SIGINT during start-up was lost to the log thread).
pub fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigset_t is plain data, filled by sigfillset/pthread_sigmask before use; the old
    // mask is put back before returning.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let out = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        out
    }
}

/// Names this process (its main thread's `comm`) `name`, whatever its binary is called, so that
/// other skrelay commands know it for a relay or proxy (`running::PROCESS_NAME`).
pub fn name_this_process(name: &std::ffi::CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of which it keeps up to 15 bytes; `name`
    // is one and outlives the call.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr());
    }
}

/// The binary's allocator: the system's, but an allocation that fails ends the process with one
/// sentence and exit 2 (a relay or proxy first makes every socket's close a reset), instead of
/// Rust's abort ("memory allocation of 16 bytes failed", exit 134, and clients whose streams ended in a clean
/// EOF). Under a small address-space limit (`ulimit -v`) a relay or proxy failed so at start (a
/// helper's resource-limits pass). Fallible allocations (`try_reserve`, which `std::fs::read`
/// uses) end it too: a process that cannot allocate a few bytes cannot go on serving for long,
/// and dying with a reset beats limping. Nothing here allocates.
pub struct ExitWhenOutOfMemory;

// SAFETY: every method hands the call to the system allocator unchanged; only a null result,
// which the caller would abort on, is turned into an exit first.
unsafe impl std::alloc::GlobalAlloc for ExitWhenOutOfMemory {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        let p = unsafe { std::alloc::System.alloc(layout) };
        if p.is_null() {
            out_of_memory(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc_zeroed` is passed on as it is.
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if p.is_null() {
            out_of_memory(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on as it is.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc` is passed on as it is.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            out_of_memory(new_size);
        }
        p
    }
}

/// Set by the commands that carry clients' connections (relay, proxy), for `out_of_memory`'s
/// sentence: others carry none to reset (a re-check pass found `steer` saying so).
pub static CARRIES_CONNECTIONS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Says that an allocation of `size` bytes failed, resets every socket a relay or proxy holds (a
/// stream it can no longer carry must not end in a clean EOF), and exits 2. No allocation.
fn out_of_memory(size: usize) -> ! {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = size;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only a relay or proxy resets: other commands hold duplicates of other processes' sockets
    // (`steer`'s targets), whose options are those processes' own, and an accepted socket inherits
    // its listener's linger.
    let carries = CARRIES_CONNECTIONS.load(std::sync::atomic::Ordering::Relaxed);
    let carried: &[u8] = match carries {
        true => b"; connections it carried were reset",
        false => b"",
    };
    let parts: [&[u8]; 5] = [
        b"skrelay: out of memory: an allocation of ",
        &digits[at..],
        b" bytes failed",
        carried,
        b" (raise the address-space limit, ulimit -v or LimitAS= in a unit, or the memory available to this \
          process)\n",
    ];
    let reset = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: write(2) reads each slice, which lives across the call; setsockopt reads the linger
    // value, valid for its size, and fails harmlessly on descriptors that are not sockets or not
    // open; getrlimit writes one struct through a valid pointer; _exit does not return.
    unsafe {
        for part in parts {
            libc::write(2, part.as_ptr().cast(), part.len());
        }
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        let open_max = match (carries, libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim)) {
            (false, _) => 0,
            (true, 0) => lim.rlim_cur.min(1 << 20) as libc::c_int,
            (true, _) => 1024,
        };
        for fd in 3..open_max {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&reset as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
        libc::_exit(2)
    }
}

/// The index of network interface `name` in this network namespace, 0 if there is none.
pub fn interface_index(name: &str) -> u32 {
    let Ok(name) = std::ffi::CString::new(name) else { return 0 };
    // SAFETY: `name` is a NUL-terminated string that lives across the call.
    unsafe { libc::if_nametoindex(name.as_ptr()) }
}

/// The name of network interface `index` in this network namespace, if one has it.
pub fn interface_name(index: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has room for IF_NAMESIZE bytes, as if_indextoname(3) requires.
    let found = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
    // SAFETY: if_indextoname wrote a NUL-terminated name into `name` when it did not fail.
    (!found.is_null()).then(|| unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned())
}

/// The soft address-space limit (RLIMIT_AS, `ulimit -v`) in KiB, where there is one.
pub fn address_space_limit_kib() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::As).current.map(|bytes| bytes / 1024)
}

/// The effective capabilities of process `proc` (/proc/PID or /proc/self), as a bit set.
pub fn effective_capabilities(proc: &std::path::Path) -> Option<u64> {
    let status = std::fs::read_to_string(proc.join("status")).ok()?;
    u64::from_str_radix(status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim(), 16).ok()
}

/// Which of `wanted` (capability bit, name) this process's effective set lacks, as "A, B and C";
/// None if it has them all or the set cannot be read.
pub fn lacking_capabilities(wanted: &[(u32, &str)]) -> Option<String> {
    let effective = effective_capabilities(std::path::Path::new("/proc/self"))?;
    let missing: Vec<&str> = wanted.iter().filter(|(bit, _)| effective & (1 << bit) == 0).map(|(_, n)| *n).collect();
    match missing.as_slice() {
        [] => None,
        [one] => Some(one.to_string()),
        [rest @ .., last] => Some(format!("{} and {last}", rest.join(", "))),
    }
}

/// Raises the soft limit on open files to the hard limit: every pair holds two sockets (and two
/// pipes on the userspace datapath). Returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum
        && setrlimit(Resource::Nofile, rustix::process::Rlimit { current: lim.maximum, ..lim }).is_ok()
    {
        lim.current = lim.maximum;
    }
    // None is RLIM_INFINITY.
    lim.current.unwrap_or(u64::MAX)
}

/// pidfd_open(2): a file descriptor for process `pid` (ESRCH: there is no such process).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?)
}

/// pidfd_getfd(2): a duplicate of descriptor `target_fd` of the process behind `pidfd` (EPERM:
/// the caller may not ptrace it; EBADF: it has no such descriptor).
pub fn pidfd_getfd(pidfd: impl AsFd, target_fd: i32) -> io::Result<OwnedFd> {
    Ok(rustix::process::pidfd_getfd(pidfd, target_fd, rustix::process::PidfdGetfdFlags::empty())?)
}

/// Sets a socket's send buffer to `bytes` (the kernel doubles it for overhead), past
/// net.core.wmem_max with SO_SNDBUFFORCE when the process has CAP_NET_ADMIN, else as far as
/// SO_SNDBUF allows.
pub fn set_send_buffer(fd: impl AsFd, bytes: libc::c_int) -> io::Result<()> {
    let size = usize::try_from(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    rustix::net::sockopt::set_socket_send_buffer_size_force(&fd, size).or_else(|_| sock(&fd).set_send_buffer_size(size))
}

/// Sets a socket's receive buffer to `bytes` (the kernel doubles it), past net.core.rmem_max
/// with SO_RCVBUFFORCE when the process has CAP_NET_ADMIN. It stops the buffer's autotuning.
pub fn set_recv_buffer(fd: impl AsFd, bytes: libc::c_int) -> io::Result<()> {
    let size = usize::try_from(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    rustix::net::sockopt::set_socket_recv_buffer_size_force(&fd, size).or_else(|_| sock(&fd).set_recv_buffer_size(size))
}

/// What a socket holds and may hold, as the kernel charges it (SO_MEMINFO; skb truesize, so a
/// little more than the payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMemory {
    /// Receive memory charged: its receive queue and, in a socket map, its psock's message queue.
    pub rmem_alloc: u64,
    /// The receive buffer (the value set, doubled by the kernel).
    pub rcvbuf: u64,
    /// The send buffer (doubled likewise).
    pub sndbuf: u64,
    /// Memory of the send queue, sent and not acknowledged or not sent yet.
    pub wmem_queued: u64,
}

/// SO_MEMINFO (uapi asm-generic/socket.h) and the indices of its array (linux/sock_diag.h).
const SO_MEMINFO: libc::c_int = 55;
const SK_MEMINFO_VARS: usize = 9;

/// A socket's memory figures (SO_MEMINFO).
pub fn socket_memory(fd: impl AsFd) -> io::Result<SocketMemory> {
    let mut v = [0u32; SK_MEMINFO_VARS];
    let mut len = std::mem::size_of_val(&v) as libc::socklen_t;
    // SAFETY: `v` and `len` are live locals and `len` is `v`'s size in bytes: the kernel copies at
    // most that much; the descriptor is borrowed for the call.
    let ret = unsafe {
        libc::getsockopt(fd.as_fd().as_raw_fd(), libc::SOL_SOCKET, SO_MEMINFO, v.as_mut_ptr().cast(), &mut len)
    };
    check(ret as libc::c_long)?;
    let at = |i: libc::c_int| u64::from(v[i as usize]);
    Ok(SocketMemory {
        rmem_alloc: at(libc::SK_MEMINFO_RMEM_ALLOC),
        rcvbuf: at(libc::SK_MEMINFO_RCVBUF),
        sndbuf: at(libc::SK_MEMINFO_SNDBUF),
        wmem_queued: at(libc::SK_MEMINFO_WMEM_QUEUED),
    })
}

/// A TCP socket's window clamp (TCP_WINDOW_CLAMP): the most receive window it advertises.
pub fn tcp_window_clamp(fd: impl AsFd) -> io::Result<u32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live locals and `len` is `value`'s size; the descriptor is
    // borrowed for the call.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_WINDOW_CLAMP,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    check(ret as libc::c_long)?;
    Ok(value.max(0) as u32)
}

/// Clamps the receive window a TCP socket advertises (the kernel's floor is about 2 KiB; a
/// window already advertised is never taken back).
pub fn set_tcp_window_clamp(fd: impl AsFd, bytes: u32) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `value` is a live local of the size passed; the descriptor is borrowed for the call.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_WINDOW_CLAMP,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(ret as libc::c_long).map(|_| ())
}

/// What kind of socket a descriptor is: (SO_DOMAIN, SO_PROTOCOL, SO_ACCEPTCONN), or `None` when
/// it is not a socket at all.
pub fn socket_kind(fd: impl AsFd) -> io::Result<Option<(i32, i32, bool)>> {
    let st = rustix::fs::fstat(&fd)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Socket {
        return Ok(None);
    }
    let s = sock(&fd);
    let domain = libc::c_int::from(s.domain()?);
    let proto = s.protocol()?.map_or(0, libc::c_int::from);
    Ok(Some((domain, proto, s.is_listener()?)))
}

/// Whether a socket is restricted to IPv6 (IPV6_V6ONLY); false for IPv4 sockets.
pub fn v6only(fd: impl AsFd) -> bool {
    sock(&fd).only_v6().unwrap_or(false)
}

/// The interface a socket is bound to (SO_BINDTODEVICE, or the scope of a link-local address it
/// is bound to), by name; None when it takes packets from every interface.
pub fn bound_device(fd: impl AsFd) -> Option<String> {
    sock(&fd).device().ok().flatten().map(|name| String::from_utf8_lossy(&name).into_owned())
}

/// Whether a socket has SO_REUSEPORT (is, or may join, a reuseport group).
pub fn reuse_port(fd: impl AsFd) -> bool {
    sock(&fd).reuse_port().unwrap_or(false)
}

/// A socket's local or peer address (`peer`), `None` if it has none (e.g. an unconnected UDP
/// socket has no peer).
pub fn socket_addr(fd: impl AsFd, peer: bool) -> Option<std::net::SocketAddr> {
    let s = sock(&fd);
    let addr = if peer { s.peer_addr() } else { s.local_addr() };
    addr.ok().and_then(|a| a.as_socket())
}

/// The inode of the network namespace a socket belongs to (ioctl SIOCGSKNS).
pub fn socket_netns_inode(fd: impl AsFd) -> io::Result<u64> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new descriptor (or fails); the socket's
    // descriptor is borrowed for the call.
    let ns = check(unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), SIOCGSKNS as _) } as libc::c_long)?;
    // SAFETY: the ioctl succeeded: `ns` is a new descriptor that nothing else owns.
    let ns = unsafe { OwnedFd::from_raw_fd(ns as std::os::fd::RawFd) };
    Ok(rustix::fs::fstat(&ns)?.st_ino)
}

/// SIOCGSKNS (uapi linux/sockios.h): a descriptor of a socket's network namespace.
const SIOCGSKNS: libc::c_ulong = 0x894C;

/// The inode of the calling thread's network namespace, the name of its pinned state.
pub fn own_netns_inode() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino())
}

/// BPF_PROG_QUERY: the ids of the programs attached to `target` for `attach_type`; with
/// `effective`, those that run there, inherited from ancestors included (aya 0.14 queries only
/// some program types, and never with BPF_F_QUERY_EFFECTIVE).
pub fn bpf_prog_query(target: impl AsFd, attach_type: u32, effective: bool) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    loop {
        let mut attr = bpf::QueryAttr {
            target_fd: target.as_fd().as_raw_fd() as u32,
            attach_type,
            query_flags: if effective { bpf::BPF_F_QUERY_EFFECTIVE } else { 0 },
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            ..Default::default()
        };
        // SAFETY: prog_ids points to `ids` and prog_cnt is its length: the kernel writes at most
        // that many u32 ids there, and the number attached into prog_cnt (also on ENOSPC).
        let result = unsafe { bpf::sys(bpf::BPF_PROG_QUERY, &mut attr) };
        let count = attr.prog_cnt as usize;
        match result {
            Ok(_) => {
                ids.truncate(count);
                return Ok(ids);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && count > ids.len() => ids = vec![0u32; count],
            Err(e) => return Err(e),
        }
    }
}

/// The raw bpf(2) commands aya 0.14 does not expose for what steer needs:
/// - SOCKMAP entries with 8-byte values (aya's `SockMap` insists on 4-byte ones),
/// - BPF_LINK_UPDATE, and BPF_OBJ_GET for the descriptor it takes (aya's `PinnedLink` and
///   `FdLink` lend none),
/// - the network namespace side of a link (aya's `LinkInfo` reads only ids and type), and the
///   link ids and descriptors to ask it of (aya's `loaded_links` gives infos, no descriptors).
///
/// Each command's part of `union bpf_attr` is a `#[repr(C)]` struct below; the layout tests
/// check every field's offset against the kernel headers.
pub mod bpf {
    use super::check;
    use std::{
        io,
        os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
        path::Path,
    };

    pub(super) const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    pub(super) const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    pub(super) const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    pub(super) const BPF_OBJ_GET: libc::c_long = 7;
    pub(super) const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    pub(super) const BPF_PROG_QUERY: libc::c_long = 16;
    pub(super) const BPF_LINK_UPDATE: libc::c_long = 29;
    pub(super) const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    pub(super) const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
    /// BPF_F_REPLACE: update a link only if it still runs `old_prog_fd`.
    pub(super) const BPF_F_REPLACE: u32 = 4;
    /// BPF_F_QUERY_EFFECTIVE: also the programs inherited from ancestor cgroups.
    pub(super) const BPF_F_QUERY_EFFECTIVE: u32 = 1;
    /// Offsets in `struct bpf_link_info`, counted in u32 words: type, id, prog_id, then the
    /// (8-aligned) union whose `netns` member is { netns_ino, attach_type }.
    pub(super) const LINK_INFO_TYPE: usize = 0;
    pub(super) const LINK_INFO_ID: usize = 1;
    pub(super) const LINK_INFO_PROG_ID: usize = 2;
    pub(super) const LINK_INFO_NETNS_INO: usize = 4;
    pub(super) const LINK_INFO_NETNS_ATTACH_TYPE: usize = 5;
    /// The union's `cgroup` member is { cgroup_id (u64: words 4 and 5), attach_type }.
    pub(super) const LINK_INFO_CGROUP_ID: usize = 4;

    /// BPF_MAP_*_ELEM.
    #[repr(C)]
    #[derive(Default)]
    pub(super) struct MapElemAttr {
        pub map_fd: u32,
        pub _pad: u32,
        pub key: u64,
        pub value: u64,
        pub flags: u64,
    }

    /// BPF_OBJ_GET.
    #[repr(C)]
    #[derive(Default)]
    pub(super) struct ObjGetAttr {
        pub pathname: u64,
        pub bpf_fd: u32,
        pub file_flags: u32,
    }

    /// BPF_OBJ_GET_INFO_BY_FD (`info` member).
    #[repr(C)]
    #[derive(Default)]
    pub(super) struct InfoAttr {
        pub bpf_fd: u32,
        pub info_len: u32,
        pub info: u64,
    }

    /// BPF_LINK_UPDATE (`link_update` member).
    #[repr(C)]
    #[derive(Default)]
    pub(super) struct LinkUpdateAttr {
        pub link_fd: u32,
        pub new_prog_fd: u32,
        pub flags: u32,
        pub old_prog_fd: u32,
    }

    /// BPF_LINK_GET_NEXT_ID and BPF_LINK_GET_FD_BY_ID (`start_id`/`link_id`, `next_id`,
    /// `open_flags`).
    #[repr(C)]
    #[derive(Default)]
    pub(super) struct IdAttr {
        pub id: u32,
        pub next_id: u32,
        pub open_flags: u32,
    }

    /// BPF_PROG_QUERY (`query` member).
    #[repr(C)]
    #[derive(Default)]
    pub(super) struct QueryAttr {
        pub target_fd: u32,
        pub attach_type: u32,
        pub query_flags: u32,
        pub attach_flags: u32,
        pub prog_ids: u64,
        pub prog_cnt: u32,
        pub _pad: u32,
    }

    /// bpf(2) with `attr` as the command's part of `union bpf_attr`.
    ///
    /// # Safety
    /// `A` must be one of the `#[repr(C)]` structs above, the one for `cmd` (the layout tests
    /// check each against the kernel headers), and every pointer in `attr` must point to live
    /// memory of the size the command reads or writes there.
    pub(super) unsafe fn sys<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<usize> {
        let size = std::mem::size_of::<A>();
        // SAFETY: the kernel reads (and for some commands writes) `size` bytes at `attr`, an
        // exclusive borrow of that size; the pointers inside are the caller's promise.
        check(unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, size) })
    }

    fn raw(fd: &impl AsFd) -> u32 {
        fd.as_fd().as_raw_fd() as u32
    }

    /// Puts a socket into a SOCKMAP with 8-byte values at `index`.
    pub fn sockmap_set(map: impl AsFd, index: u32, socket: impl AsFd) -> io::Result<()> {
        let fd: u64 = u64::from(raw(&socket));
        let mut attr = MapElemAttr {
            map_fd: raw(&map),
            key: &index as *const u32 as u64,
            value: &fd as *const u64 as u64,
            ..Default::default()
        };
        // SAFETY: key and value point to the live locals `index` (4 bytes) and `fd` (8 bytes),
        // the key and value sizes of the SOCKMAPs this is for; the kernel only reads them.
        unsafe { sys(BPF_MAP_UPDATE_ELEM, &mut attr) }?;
        Ok(())
    }

    /// The cookie of the socket at `index` of a SOCKMAP with 8-byte values; `None` when the slot
    /// is empty (never set, cleared, or its socket closed).
    pub fn sockmap_cookie(map: impl AsFd, index: u32) -> io::Result<Option<u64>> {
        let mut cookie: u64 = 0;
        let mut attr = MapElemAttr {
            map_fd: raw(&map),
            key: &index as *const u32 as u64,
            value: &mut cookie as *mut u64 as u64,
            ..Default::default()
        };
        // SAFETY: key points to the live local `index` (4 bytes); the kernel writes the 8-byte
        // value (a socket cookie) into the live local `cookie`.
        match unsafe { sys(BPF_MAP_LOOKUP_ELEM, &mut attr) } {
            Ok(_) => Ok(Some(cookie)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Empties slot `index` of a SOCKMAP (an empty slot, for which the kernel says EINVAL, is not
    /// an error).
    pub fn sockmap_clear(map: impl AsFd, index: u32) -> io::Result<()> {
        let mut attr = MapElemAttr { map_fd: raw(&map), key: &index as *const u32 as u64, ..Default::default() };
        // SAFETY: key points to the live local `index` (4 bytes); the kernel only reads it.
        match unsafe { sys(BPF_MAP_DELETE_ELEM, &mut attr) } {
            Err(e) if !matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EINVAL)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Opens a pinned BPF object (map, program or link).
    pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut attr = ObjGetAttr { pathname: c.as_ptr() as u64, ..Default::default() };
        // SAFETY: pathname points to `c`, a NUL-terminated string that outlives the call.
        let fd = unsafe { sys(BPF_OBJ_GET, &mut attr) }?;
        // SAFETY: BPF_OBJ_GET succeeded: `fd` is a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    /// Makes `link` run `new_prog` instead of `old_prog`, atomically: no lookup runs without a
    /// program in between. Fails (EPERM) if the link no longer runs `old_prog`.
    pub fn link_update(link: impl AsFd, new_prog: impl AsFd, old_prog: impl AsFd) -> io::Result<()> {
        let mut attr = LinkUpdateAttr {
            link_fd: raw(&link),
            new_prog_fd: raw(&new_prog),
            flags: BPF_F_REPLACE,
            old_prog_fd: raw(&old_prog),
        };
        // SAFETY: descriptors and flags only, no pointers.
        unsafe { sys(BPF_LINK_UPDATE, &mut attr) }?;
        Ok(())
    }

    /// The id of the next BPF link after `start` (BPF_LINK_GET_NEXT_ID); None after the last.
    pub fn link_next_id(start: u32) -> io::Result<Option<u32>> {
        let mut attr = IdAttr { id: start, ..Default::default() };
        // SAFETY: integers only, no pointers.
        match unsafe { sys(BPF_LINK_GET_NEXT_ID, &mut attr) } {
            Ok(_) => Ok(Some(attr.next_id)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A file descriptor for the link with id `id` (BPF_LINK_GET_FD_BY_ID).
    pub fn link_fd_by_id(id: u32) -> io::Result<OwnedFd> {
        let mut attr = IdAttr { id, ..Default::default() };
        // SAFETY: integers only, no pointers.
        let fd = unsafe { sys(BPF_LINK_GET_FD_BY_ID, &mut attr) }?;
        // SAFETY: the command succeeded: `fd` is a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    /// What a network namespace link (BPF_LINK_TYPE_NETNS) is attached to.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct NetnsLink {
        pub id: u32,
        pub prog_id: u32,
        /// 0 once its namespace is gone.
        pub netns_ino: u32,
        pub attach_type: u32,
    }

    /// BPF_LINK_TYPE_NETNS and BPF_SK_LOOKUP (uapi linux/bpf.h).
    pub const LINK_TYPE_NETNS: u32 = 5;
    pub const ATTACH_SK_LOOKUP: u32 = 36;
    /// BPF_CGROUP_SOCK_OPS (uapi linux/bpf.h `enum bpf_attach_type`).
    pub const ATTACH_CGROUP_SOCK_OPS: u32 = 3;

    /// BPF_LINK_TYPE_CGROUP (uapi linux/bpf.h).
    pub const LINK_TYPE_CGROUP: u32 = 3;

    /// The cgroup a cgroup link is attached to: its id (the inode number of its cgroup v2
    /// directory), or 0 once it is detached (`bpftool link detach`) or its cgroup was removed and
    /// released. None if it is not a cgroup link.
    pub fn cgroup_link_target(link: impl AsFd) -> io::Result<Option<u64>> {
        let info = link_info(link)?;
        let id = u64::from(info[LINK_INFO_CGROUP_ID]) | (u64::from(info[LINK_INFO_CGROUP_ID + 1]) << 32);
        Ok((info[LINK_INFO_TYPE] == LINK_TYPE_CGROUP).then_some(id))
    }

    /// The first 64 bytes of a link's `struct bpf_link_info`, as u32 words.
    fn link_info(link: impl AsFd) -> io::Result<[u32; 16]> {
        let mut info = [0u32; 16];
        let mut attr = InfoAttr {
            bpf_fd: raw(&link),
            info_len: std::mem::size_of_val(&info) as u32,
            info: info.as_mut_ptr() as u64,
        };
        // SAFETY: info points to the live local `info` and info_len is its size: the kernel
        // writes at most that many bytes of `struct bpf_link_info`.
        unsafe { sys(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
        Ok(info)
    }

    /// The namespace side of a link, None if it is not a netns link.
    pub fn netns_link(link: impl AsFd) -> io::Result<Option<NetnsLink>> {
        let info = link_info(link)?;
        Ok((info[LINK_INFO_TYPE] == LINK_TYPE_NETNS).then_some(NetnsLink {
            id: info[LINK_INFO_ID],
            prog_id: info[LINK_INFO_PROG_ID],
            netns_ino: info[LINK_INFO_NETNS_INO],
            attach_type: info[LINK_INFO_NETNS_ATTACH_TYPE],
        }))
    }
}

/// Bytes in a TCP socket's send queue not yet acknowledged by its peer (SIOCOUTQ), sent or not.
pub fn send_queue_len(fd: impl AsFd) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the pointer, which is valid for it; the
    // descriptor is borrowed for the call.
    let ret = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

/// Whether a TCP socket's next byte to read is its peer's urgent byte (SIOCATMARK). splice(2)
/// stops there (`tcp_read_sock` reads up to the urgent mark and no further) and says EAGAIN, or 0
/// once the peer has shut down, however many bytes wait behind it.
pub fn at_urgent_mark(fd: impl AsFd) -> bool {
    let mut at: libc::c_int = 0;
    // SAFETY: SIOCATMARK writes one int through the pointer, which is valid for it; the
    // descriptor is borrowed for the call.
    let ret = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), SIOCATMARK as _, &mut at as *mut libc::c_int) };
    ret == 0 && at != 0
}

/// Makes a socket's urgent bytes (MSG_OOB) ordinary bytes of its stream, read in place
/// (SO_OOBINLINE).
pub fn inline_urgent_data(fd: impl AsFd) -> io::Result<()> {
    sock(&fd).set_out_of_band_inline(true)
}

/// Reads the urgent byte a socket is at (`at_urgent_mark`) as an ordinary byte of the stream:
/// with SO_OOBINLINE it comes in place, and reading past it lets splice(2) go on. `Ok(None)`:
/// it has not arrived yet (the peer's urgent pointer comes before its byte).
pub fn take_urgent_byte(fd: impl AsFd) -> io::Result<Option<u8>> {
    inline_urgent_data(&fd)?;
    let mut byte = [0u8; 1];
    match rustix::net::recv(&fd, &mut byte, rustix::net::RecvFlags::DONTWAIT) {
        Ok((1, _)) => Ok(Some(byte[0])),
        Ok(_) => Ok(None),
        Err(rustix::io::Errno::AGAIN) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// SIOCATMARK (uapi asm-generic/sockios.h), which libc does not define for Linux.
const SIOCATMARK: libc::c_ulong = 0x8905;

/// Bytes in a TCP socket's send queue not sent yet (SIOCOUTQNSD): what a reset throws away.
pub fn unsent_len(fd: impl AsFd) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQNSD writes one int through the pointer, which is valid for it; the
    // descriptor is borrowed for the call.
    let ret = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::SIOCOUTQNSD as _, &mut n as *mut libc::c_int) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

/// Bytes readable now (FIONREAD; on a socket in a socket map, the bytes in its psock queue).
pub fn readable_len(fd: impl AsFd) -> io::Result<u64> {
    Ok(rustix::io::ioctl_fionread(fd)?)
}

#[cfg(test)]
mod tests {
    //! Every number and layout above that was written by hand, against the kernel's uapi headers
    //! as the host compiler sees them (build.rs prints them from a small C program).
    use super::{bpf::*, *};
    use std::mem::offset_of;

    #[test]
    fn a_running_process_is_not_exiting_and_a_gone_or_zombie_one_is() {
        assert!(!exiting(std::process::id()));
        assert!(exiting(u32::MAX));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        // Not reaped yet: a zombie once it has exited.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !exiting(child.id()) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(exiting(child.id()));
        child.wait().unwrap();
        // A main thread that called pthread_exit is a zombie while another thread runs on: the
        // process is not exiting.
        let script =
            "import ctypes, threading, time\nthreading.Thread(target=lambda: time.sleep(30), daemon=True).start()\n\
                      print(flush=True)\nctypes.CDLL(None).pthread_exit(None)";
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
        let main = format!("/proc/{}/stat", child.id());
        while !std::fs::read_to_string(&main).unwrap().contains(") Z ") {
            assert!(std::time::Instant::now() < deadline + std::time::Duration::from_secs(5), "main thread lives on");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!exiting(child.id()), "its other thread runs");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[allow(non_upper_case_globals, dead_code)]
    mod k {
        include!(concat!(env!("OUT_DIR"), "/kernel_layout.rs"));
    }

    #[test]
    fn bpf_command_numbers_match_the_headers() {
        let cmds = [
            (BPF_MAP_LOOKUP_ELEM, k::BPF_MAP_LOOKUP_ELEM),
            (BPF_MAP_UPDATE_ELEM, k::BPF_MAP_UPDATE_ELEM),
            (BPF_MAP_DELETE_ELEM, k::BPF_MAP_DELETE_ELEM),
            (BPF_OBJ_GET, k::BPF_OBJ_GET),
            (BPF_OBJ_GET_INFO_BY_FD, k::BPF_OBJ_GET_INFO_BY_FD),
            (BPF_PROG_QUERY, k::BPF_PROG_QUERY),
            (BPF_LINK_UPDATE, k::BPF_LINK_UPDATE),
            (BPF_LINK_GET_FD_BY_ID, k::BPF_LINK_GET_FD_BY_ID),
            (BPF_LINK_GET_NEXT_ID, k::BPF_LINK_GET_NEXT_ID),
        ];
        for (ours, header) in cmds {
            assert_eq!(ours as u64, header);
        }
        assert_eq!(u64::from(BPF_F_REPLACE), k::BPF_F_REPLACE);
        assert_eq!(u64::from(BPF_F_QUERY_EFFECTIVE), k::BPF_F_QUERY_EFFECTIVE);
        assert_eq!(u64::from(LINK_TYPE_NETNS), k::BPF_LINK_TYPE_NETNS);
        assert_eq!(u64::from(LINK_TYPE_CGROUP), k::BPF_LINK_TYPE_CGROUP);
        assert_eq!(u64::from(ATTACH_SK_LOOKUP), k::BPF_SK_LOOKUP);
        assert_eq!(u64::from(ATTACH_CGROUP_SOCK_OPS), k::BPF_CGROUP_SOCK_OPS);
    }

    #[test]
    fn bpf_attr_structs_match_the_headers() {
        assert_eq!(offset_of!(MapElemAttr, map_fd), k::ATTR_map_fd);
        assert_eq!(offset_of!(MapElemAttr, key), k::ATTR_key);
        assert_eq!(offset_of!(MapElemAttr, value), k::ATTR_value);
        assert_eq!(offset_of!(MapElemAttr, flags), k::ATTR_flags);
        assert_eq!(offset_of!(ObjGetAttr, pathname), k::ATTR_pathname);
        assert_eq!(offset_of!(ObjGetAttr, bpf_fd), k::ATTR_bpf_fd);
        assert_eq!(offset_of!(ObjGetAttr, file_flags), k::ATTR_file_flags);
        assert_eq!(offset_of!(InfoAttr, bpf_fd), k::ATTR_info_bpf_fd);
        assert_eq!(offset_of!(InfoAttr, info_len), k::ATTR_info_info_len);
        assert_eq!(offset_of!(InfoAttr, info), k::ATTR_info_info);
        assert_eq!(offset_of!(LinkUpdateAttr, link_fd), k::ATTR_link_update_link_fd);
        assert_eq!(offset_of!(LinkUpdateAttr, new_prog_fd), k::ATTR_link_update_new_prog_fd);
        assert_eq!(offset_of!(LinkUpdateAttr, flags), k::ATTR_link_update_flags);
        assert_eq!(offset_of!(LinkUpdateAttr, old_prog_fd), k::ATTR_link_update_old_prog_fd);
        assert_eq!(offset_of!(IdAttr, id), k::ATTR_start_id);
        assert_eq!(offset_of!(IdAttr, id), k::ATTR_link_id);
        assert_eq!(offset_of!(IdAttr, next_id), k::ATTR_next_id);
        assert_eq!(offset_of!(IdAttr, open_flags), k::ATTR_open_flags);
        assert_eq!(offset_of!(QueryAttr, target_fd), k::ATTR_query_target_fd);
        assert_eq!(offset_of!(QueryAttr, attach_type), k::ATTR_query_attach_type);
        assert_eq!(offset_of!(QueryAttr, query_flags), k::ATTR_query_query_flags);
        assert_eq!(offset_of!(QueryAttr, attach_flags), k::ATTR_query_attach_flags);
        assert_eq!(offset_of!(QueryAttr, prog_ids), k::ATTR_query_prog_ids);
        assert_eq!(offset_of!(QueryAttr, prog_cnt), k::ATTR_query_prog_cnt);
        assert_eq!(LINK_INFO_TYPE * 4, k::bpf_link_info__type);
        assert_eq!(LINK_INFO_ID * 4, k::bpf_link_info__id);
        assert_eq!(LINK_INFO_PROG_ID * 4, k::bpf_link_info__prog_id);
        assert_eq!(LINK_INFO_NETNS_INO * 4, k::bpf_link_info__netns_netns_ino);
        assert_eq!(LINK_INFO_NETNS_ATTACH_TYPE * 4, k::bpf_link_info__netns_attach_type);
        assert_eq!(LINK_INFO_CGROUP_ID * 4, k::bpf_link_info__cgroup_cgroup_id);
    }

    #[test]
    fn tcp_info_offsets_and_states_match_the_headers() {
        assert_eq!(TCPI_STATE, k::tcp_info__tcpi_state);
        assert_eq!(TCPI_BYTES_ACKED, k::tcp_info__tcpi_bytes_acked);
        assert_eq!(TCPI_BYTES_RECEIVED, k::tcp_info__tcpi_bytes_received);
        assert_eq!(TCPI_SND_WND, k::tcp_info__tcpi_snd_wnd);
        assert_eq!(TCPI_UNACKED, k::tcp_info__tcpi_unacked);
        let states = [
            (TCP_ESTABLISHED, k::BPF_TCP_ESTABLISHED),
            (TCP_SYN_SENT, k::BPF_TCP_SYN_SENT),
            (TCP_TIME_WAIT, k::BPF_TCP_TIME_WAIT),
            (TCP_CLOSE, k::BPF_TCP_CLOSE),
            (TCP_CLOSE_WAIT, k::BPF_TCP_CLOSE_WAIT),
            (TCP_LAST_ACK, k::BPF_TCP_LAST_ACK),
            (TCP_CLOSING, k::BPF_TCP_CLOSING),
        ];
        for (ours, header) in states {
            assert_eq!(u64::from(ours), header);
        }
    }

    #[test]
    fn socket_constants_match_the_headers() {
        #[allow(clippy::unnecessary_cast)] // c_ulong is u32 on 32-bit targets
        let siocgskns = SIOCGSKNS as u64;
        assert_eq!(siocgskns, k::SIOCGSKNS);
        #[allow(clippy::unnecessary_cast)]
        let siocatmark = SIOCATMARK as u64;
        assert_eq!(siocatmark, k::SIOCATMARK);
        assert_eq!(SO_MEMINFO as u64, k::SO_MEMINFO);
        assert_eq!(SK_MEMINFO_VARS as u64, k::SK_MEMINFO_VARS);
        assert_eq!(libc::SK_MEMINFO_WMEM_QUEUED as u64, k::SK_MEMINFO_WMEM_QUEUED);
        assert_eq!(libc::SK_MEMINFO_SNDBUF as u64, k::SK_MEMINFO_SNDBUF);
    }

    #[test]
    fn the_destroy_request_matches_the_headers() {
        use std::mem::{offset_of, size_of};
        assert_eq!(u64::from(SOCK_DESTROY), k::SOCK_DESTROY);
        assert_eq!(libc::NETLINK_SOCK_DIAG as u64, k::NETLINK_SOCK_DIAG);
        assert_eq!(size_of::<libc::nlmsghdr>(), k::nlmsghdr__SIZE);
        assert_eq!(size_of::<InetDiagReqV2>(), k::inet_diag_req_v2__SIZE);
        assert_eq!(offset_of!(InetDiagReqV2, family), k::inet_diag_req_v2__sdiag_family);
        assert_eq!(offset_of!(InetDiagReqV2, protocol), k::inet_diag_req_v2__sdiag_protocol);
        assert_eq!(offset_of!(InetDiagReqV2, states), k::inet_diag_req_v2__idiag_states);
        assert_eq!(offset_of!(InetDiagReqV2, id), k::inet_diag_req_v2__id);
        assert_eq!(size_of::<InetDiagSockId>(), k::inet_diag_sockid__SIZE);
        assert_eq!(offset_of!(InetDiagSockId, sport), k::inet_diag_sockid__idiag_sport);
        assert_eq!(offset_of!(InetDiagSockId, dport), k::inet_diag_sockid__idiag_dport);
        assert_eq!(offset_of!(InetDiagSockId, src), k::inet_diag_sockid__idiag_src);
        assert_eq!(offset_of!(InetDiagSockId, dst), k::inet_diag_sockid__idiag_dst);
        assert_eq!(offset_of!(InetDiagSockId, ifindex), k::inet_diag_sockid__idiag_if);
        assert_eq!(offset_of!(InetDiagSockId, cookie), k::inet_diag_sockid__idiag_cookie);
        assert_eq!(size_of::<DestroyRequest>(), k::nlmsghdr__SIZE + k::inet_diag_req_v2__SIZE);
    }

    #[test]
    fn an_aborted_connection_resets_its_peer_and_keeps_its_counters() {
        // As root (CAP_NET_ADMIN), on IPv4 and on a dual-stack socket with a mapped address; the
        // descriptor stays open and its counters readable. Without the capability it says so.
        use std::io::{Read, Write};
        let root = rustix::process::geteuid().is_root();
        for (listen, connect) in [("127.0.0.1:0", "127.0.0.1"), ("[::]:0", "127.0.0.1"), ("[::1]:0", "::1")] {
            let l = std::net::TcpListener::bind(listen).unwrap();
            let mut c = std::net::TcpStream::connect((connect, l.local_addr().unwrap().port())).unwrap();
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"hello").unwrap();
            let mut buf = [0u8; 5];
            c.read_exact(&mut buf).unwrap();
            // Read is not acknowledged: the client's ACK may still be on its way (a fresh-clone
            // CI run aborted first and counted 0).
            let acked_by = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while send_queue_len(&s).unwrap() > 0 && std::time::Instant::now() < acked_by {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            match abort(&s) {
                Ok(()) => {
                    let r = c.read(&mut buf);
                    assert!(matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset), "{listen}: {r:?}");
                    let counters = tcp_counters(&s).unwrap();
                    assert!(counters.closed(), "{listen}: {counters:?}");
                    assert_eq!(counters.bytes_acked, 5, "{listen}: the 5 bytes (a passive socket counts no SYN)");
                }
                Err(e) => assert!(!root && e.kind() == io::ErrorKind::PermissionDenied, "{listen}: {e}"),
            }
        }
    }

    #[test]
    fn the_counters_of_a_connection_read_as_the_kernel_counts() {
        // A live check of the offsets: 5 bytes one way, then a FIN.
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(peek(&s, &mut buf).map_err(|e| e.kind()), Err(io::ErrorKind::WouldBlock), "peek never blocks");
        c.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(s.read(&mut buf).unwrap(), 0);
        let (sc, cc) = (tcp_counters(&s).unwrap(), tcp_counters(&c).unwrap());
        assert_eq!(sc.state, TCP_CLOSE_WAIT);
        assert!(sc.fin_received());
        assert_eq!(sc.bytes_received, 6, "5 bytes and the FIN");
        assert_eq!(sc.payload_received(), 5);
        // The SYN and 5 bytes, and the FIN once its ACK is back.
        assert!(matches!(cc.bytes_acked, 6 | 7), "client acked {}", cc.bytes_acked);
        assert_ne!(socket_cookie(&s).unwrap(), socket_cookie(&c).unwrap());
    }

    #[test]
    fn sockets_are_told_apart_by_kind() {
        let l = std::net::TcpListener::bind("[::1]:0").unwrap();
        assert_eq!(socket_kind(&l).unwrap(), Some((libc::AF_INET6, libc::IPPROTO_TCP, true)));
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(socket_kind(&u).unwrap(), Some((libc::AF_INET, libc::IPPROTO_UDP, false)));
        assert!(!v6only(&u));
        assert_eq!(socket_addr(&u, false), Some(u.local_addr().unwrap()));
        assert_eq!(socket_addr(&u, true), None);
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        assert_eq!(socket_kind(&f).unwrap(), None);
        assert_eq!(socket_netns_inode(&u).unwrap(), own_netns_inode().unwrap());
    }

    #[test]
    fn pipes_splice_between_descriptors() {
        let (pipe, capacity) = Pipe::new(1 << 16).unwrap();
        assert!(capacity >= 4096);
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut a, b"abc").unwrap();
        assert_eq!(splice(&b, &pipe.write, 16).unwrap(), 3);
        let (c, mut d) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(splice(&pipe.read, &c, 3).unwrap(), 3);
        let mut got = [0u8; 3];
        std::io::Read::read_exact(&mut d, &mut got).unwrap();
        assert_eq!(&got, b"abc");
        assert!(raise_fd_limit() > 0);
    }
}

/// The kernel's address of a text symbol, from /proc/kallsyms: None where it is not there, or
/// where kptr_restrict shows every address as 0 (an unprivileged reader, kptr_restrict 2).
pub fn kernel_symbol(name: &str) -> Option<u64> {
    use std::io::BufRead;
    // Line by line (5 MB in all), up to the symbol: core kernel text comes first.
    let file = std::io::BufReader::new(std::fs::File::open("/proc/kallsyms").ok()?);
    file.lines().map_while(Result::ok).find_map(|line| symbol_address(&line, name))
}

/// The address on one /proc/kallsyms line, if it is `name`'s (text, not hidden as 0).
fn symbol_address(line: &str, name: &str) -> Option<u64> {
    let mut fields = line.split_whitespace();
    let (addr, kind, sym) = (fields.next()?, fields.next()?, fields.next()?);
    (sym == name && matches!(kind, "T" | "t")).then(|| u64::from_str_radix(addr, 16).ok()).flatten().filter(|&a| a != 0)
}

#[cfg(test)]
mod kallsyms_tests {
    use super::symbol_address;

    #[test]
    fn a_symbol_is_found_by_its_exact_name_and_a_hidden_address_is_none() {
        let name = "woken_wake_function";
        assert_eq!(symbol_address("ffffffff813dc480 T woken_wake_function", name), Some(0xffffffff813dc480));
        assert_eq!(symbol_address("ffffffff813dc470 T __pfx_woken_wake_function", name), None);
        assert_eq!(symbol_address("0000000000000000 T woken_wake_function", name), None);
        assert_eq!(crate::sys::kernel_symbol("no_such_symbol_in_any_kernel"), None);
    }
}

/// Whether a process other than this one holds `fd`'s socket (a descriptor in /proc/PID/fd that
/// names the same `socket:[INODE]`). None where it cannot be told (no /proc, or the socket's inode
/// unreadable); processes whose descriptors this one may not list are not looked at.
pub fn socket_held_elsewhere(fd: impl AsFd) -> Option<bool> {
    let inode = rustix::fs::fstat(fd).ok()?.st_ino;
    Some(socket_holders(inode)?.next().is_some())
}

/// The processes other than this one that hold the socket with inode `inode` (a descriptor in
/// /proc/PID/fd naming `socket:[INODE]`), as /proc lists them; processes whose descriptors this
/// one may not list are not among them. None without /proc.
pub fn socket_holders(inode: u64) -> Option<impl Iterator<Item = u32>> {
    let name = format!("socket:[{inode}]");
    let own = std::process::id();
    let procs = std::fs::read_dir("/proc").ok()?;
    Some(procs.flatten().filter_map(move |p| {
        let pid = p.file_name().to_str()?.parse::<u32>().ok().filter(|&pid| pid != own)?;
        let fds = std::fs::read_dir(p.path().join("fd")).ok()?;
        fds.flatten().any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == name.as_str())).then_some(pid)
    }))
}

#[cfg(test)]
mod shell_arg_tests {
    use super::shell_arg;

    #[test]
    fn words_the_shell_would_split_or_expand_are_quoted() {
        assert_eq!(shell_arg("/sys/fs/cgroup/unified/app"), "/sys/fs/cgroup/unified/app");
        assert_eq!(shell_arg("/sys/fs/cgroup/unified/rv run"), "'/sys/fs/cgroup/unified/rv run'");
        assert_eq!(shell_arg("it's $HOME"), r"'it'\''s $HOME'");
        assert_eq!(shell_arg(""), "''");
    }
}

/// A socket as the kernel's socket diagnostics (sock_diag, what `ss` reads) show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiagSocket {
    /// TCP state numbers (`tcp_state_name`); an unconnected UDP socket is TCP_CLOSE (7), a
    /// connected one TCP_ESTABLISHED (1).
    pub state: u8,
    pub inode: u32,
}

/// Every TCP (`protocol` IPPROTO_TCP) or UDP socket of this network namespace in one of the
/// `states` (a mask of `1 << state`), IPv4 and IPv6, by socket cookie: what tells whether the
/// socket a map holds is the one listening at an address, which /proc/net/tcp cannot (it has no
/// cookies).
pub fn diag_sockets(protocol: u8, states: u32) -> io::Result<std::collections::HashMap<u64, DiagSocket>> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const HEADER: usize = 16; // struct nlmsghdr
    const MSG: usize = 72; // struct inet_diag_msg up to and with idiag_inode
                           // SAFETY: plain system call; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
    check(fd as libc::c_long)?;
    // SAFETY: fd was just returned by socket(2) and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut found = std::collections::HashMap::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        // struct nlmsghdr, then struct inet_diag_req_v2 (family, protocol, ext, pad, states, and
        // a zeroed struct inet_diag_sockid of 48 bytes: no filter).
        let mut req = [0u8; HEADER + 56];
        req[0..4].copy_from_slice(&((HEADER + 56) as u32).to_ne_bytes());
        req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        req[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
        req[8..12].copy_from_slice(&u32::from(family).to_ne_bytes());
        req[HEADER] = family;
        req[HEADER + 1] = protocol;
        req[HEADER + 4..HEADER + 8].copy_from_slice(&states.to_ne_bytes());
        // SAFETY: req is a valid buffer of its length.
        check(unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } as libc::c_long)?;
        let mut buf = vec![0u8; 32 * 1024];
        'dump: loop {
            // SAFETY: buf is a valid, writable buffer of its length.
            let n =
                check(unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) } as libc::c_long)?;
            if n == 0 {
                break;
            }
            let mut at = 0;
            while at + HEADER <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
                if len < HEADER || at + len > n {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "a truncated sock_diag message"));
                }
                match kind as libc::c_int {
                    libc::NLMSG_DONE => break 'dump,
                    libc::NLMSG_ERROR => {
                        let errno = i32::from_ne_bytes(buf[at + HEADER..at + HEADER + 4].try_into().unwrap());
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                    _ if len >= HEADER + MSG => {
                        let m = &buf[at + HEADER..at + HEADER + MSG];
                        let low = u32::from_ne_bytes(m[44..48].try_into().unwrap());
                        let high = u32::from_ne_bytes(m[48..52].try_into().unwrap());
                        let inode = u32::from_ne_bytes(m[68..72].try_into().unwrap());
                        found.insert(u64::from(high) << 32 | u64::from(low), DiagSocket { state: m[1], inode });
                    }
                    _ => {}
                }
                at += (len + 3) & !3;
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod diag_tests {
    use super::*;

    #[test]
    fn a_listening_and_a_connected_socket_are_found_by_cookie_with_their_states() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let u = std::net::UdpSocket::bind("[::1]:0").unwrap();
        let listening = diag_sockets(libc::IPPROTO_TCP as u8, 1 << 10).unwrap();
        let inode = |fd: &dyn AsFd| rustix::fs::fstat(fd).unwrap().st_ino as u32;
        assert_eq!(listening.get(&socket_cookie(&l).unwrap()), Some(&DiagSocket { state: 10, inode: inode(&l) }));
        assert!(!listening.contains_key(&socket_cookie(&c).unwrap()), "a connected socket is not listening");
        let all = diag_sockets(libc::IPPROTO_TCP as u8, !0).unwrap();
        assert_eq!(all.get(&socket_cookie(&c).unwrap()).map(|s| s.state), Some(1));
        let udp = diag_sockets(libc::IPPROTO_UDP as u8, !0).unwrap();
        assert_eq!(udp.get(&socket_cookie(&u).unwrap()), Some(&DiagSocket { state: 7, inode: inode(&u) }));
        u.connect("[::1]:9").unwrap();
        let udp = diag_sockets(libc::IPPROTO_UDP as u8, !0).unwrap();
        assert_eq!(udp.get(&socket_cookie(&u).unwrap()).map(|s| s.state), Some(1));
    }
}
