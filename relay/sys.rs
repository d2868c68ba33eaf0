//! Raw syscalls the standard library does not wrap, each wrapped once: socket cookie, TCP_INFO
//! counters, splice(2) and pipes, MSG_PEEK, abortive close, the fd limit.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

fn check(ret: libc::c_long) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// SO_COOKIE (asm-generic/socket.h); not in the libc crate.
const SO_COOKIE: libc::c_int = 57;

/// The kernel's unique id of a socket (SO_COOKIE), the key of every skrelay socket map.
pub fn socket_cookie(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    check(ret as libc::c_long)?;
    Ok(cookie)
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
}

const TCP_TIME_WAIT: u8 = 6;
const TCP_CLOSE: u8 = 7;

/// Offsets in `struct tcp_info` (uapi linux/tcp.h), stable since Linux 4.1.
const TCPI_STATE: usize = 0;
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_BYTES_RECEIVED: usize = 128;

pub fn tcp_counters(fd: &impl AsRawFd) -> io::Result<TcpCounters> {
    let mut buf = [0u8; 256];
    let mut len = buf.len() as libc::socklen_t;
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    check(ret as libc::c_long)?;
    if (len as usize) < TCPI_BYTES_RECEIVED + 8 {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "TCP_INFO lacks byte counters (kernel older than 4.1)"));
    }
    let u64_at = |off: usize| u64::from_ne_bytes(buf[off..off + 8].try_into().unwrap());
    Ok(TcpCounters {
        state: buf[TCPI_STATE],
        bytes_acked: u64_at(TCPI_BYTES_ACKED),
        bytes_received: u64_at(TCPI_BYTES_RECEIVED),
    })
}

impl TcpCounters {
    /// The socket will receive nothing more: the peer's FIN has arrived, or the connection is
    /// closed. A reset also leaves CLOSE: callers tell it apart by SO_ERROR, which the kernel sets
    /// before it changes the state.
    pub fn fin_received(&self) -> bool {
        // TIME_WAIT, CLOSE, CLOSE_WAIT, LAST_ACK, CLOSING.
        matches!(self.state, TCP_TIME_WAIT | TCP_CLOSE | 8 | 9 | 11)
    }

    pub fn closed(&self) -> bool {
        self.state == TCP_CLOSE
    }

    /// Payload bytes received: `bytes_received` without the FIN's sequence number.
    pub fn payload_received(&self) -> u64 {
        self.bytes_received.saturating_sub(u64::from(self.fin_received()))
    }
}

/// Reads up to `buf.len()` queued bytes without consuming them (never blocks).
pub fn peek(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    let ret = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    check(ret as libc::c_long)
}

/// Makes the next close of this socket send a RST instead of a FIN: also the close the kernel
/// does when the process dies, so a reader never takes a cut stream for a whole one.
pub fn reset_on_close(fd: &impl AsRawFd) {
    set_linger(fd, 1);
}

/// Undoes `reset_on_close`: the next close is an orderly one (FIN after every queued byte).
pub fn close_gracefully(fd: &impl AsRawFd) {
    set_linger(fd, 0);
}

fn set_linger(fd: &impl AsRawFd, on: libc::c_int) {
    let linger = libc::linger { l_onoff: on, l_linger: 0 };
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// The pending error of a socket (SO_ERROR), which reading clears.
pub fn take_socket_error(fd: &impl AsRawFd) -> Option<io::Error> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut err as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if ret == 0 && err != 0 {
        Some(io::Error::from_raw_os_error(err))
    } else {
        None
    }
}

/// A pipe for splice(2), both ends non-blocking.
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

impl Pipe {
    /// A pipe of `size` bytes of capacity (or the system's default where that is refused).
    pub fn new(size: usize) -> io::Result<(Pipe, usize)> {
        let mut fds = [0 as RawFd; 2];
        check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } as libc::c_long)?;
        let pipe = unsafe { Pipe { read: OwnedFd::from_raw_fd(fds[0]), write: OwnedFd::from_raw_fd(fds[1]) } };
        let got = unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, size as libc::c_int) };
        let capacity =
            if got > 0 { got as usize } else { unsafe { libc::fcntl(fds[1], libc::F_GETPIPE_SZ) }.max(4096) as usize };
        Ok((pipe, capacity))
    }
}

/// Moves up to `len` bytes between a socket and a pipe without copying them to user space.
/// `Ok(0)` means end of file on `from`.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    let ret = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    check(ret as libc::c_long)
}

/// Raises the soft limit on open files to the hard limit: every pair holds two sockets (and two
/// pipes on the userspace datapath).
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    lim.rlim_cur
}

/// BPF_PROG_QUERY: the ids of the programs attached to `target` for `attach_type`; with
/// `effective`, those that run there, inherited from ancestors included.
pub fn bpf_prog_query(target: &impl AsRawFd, attach_type: u32, effective: bool) -> io::Result<Vec<u32>> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_F_QUERY_EFFECTIVE: u32 = 1;
    let mut ids = vec![0u32; 64];
    loop {
        // union bpf_attr, `query` member: target_fd, attach_type, query_flags, attach_flags,
        // prog_ids (u64 pointer), prog_cnt; the rest stays zero.
        let mut attr = [0u8; 64];
        attr[0..4].copy_from_slice(&(target.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
        attr[8..12].copy_from_slice(&(if effective { BPF_F_QUERY_EFFECTIVE } else { 0 }).to_ne_bytes());
        attr[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
        attr[24..28].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
        let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, attr.as_mut_ptr(), attr.len()) };
        let count = u32::from_ne_bytes(attr[24..28].try_into().unwrap()) as usize;
        match check(ret) {
            Ok(_) => {
                ids.truncate(count);
                return Ok(ids);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && count > ids.len() => ids = vec![0u32; count],
            Err(e) => return Err(e),
        }
    }
}

/// pidfd_open(2): a file descriptor for process `pid` (ESRCH: there is no such process).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// pidfd_getfd(2): a duplicate of descriptor `target_fd` of the process behind `pidfd` (EPERM:
/// the caller may not ptrace it; EBADF: it has no such descriptor).
pub fn pidfd_getfd(pidfd: &impl AsRawFd, target_fd: i32) -> io::Result<OwnedFd> {
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn sockopt_int(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let ret = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, &mut v as *mut _ as *mut libc::c_void, &mut len) };
    check(ret as libc::c_long)?;
    Ok(v)
}

/// Sets a socket's send buffer to `bytes` (the kernel doubles it for overhead), past
/// net.core.wmem_max with SO_SNDBUFFORCE when the process has CAP_NET_ADMIN, else as far as
/// SO_SNDBUF allows.
pub fn set_send_buffer(fd: &impl AsRawFd, bytes: libc::c_int) -> io::Result<()> {
    let set = |name| {
        let ret = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                &bytes as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        check(ret as libc::c_long).map(|_| ())
    };
    set(libc::SO_SNDBUFFORCE).or_else(|_| set(libc::SO_SNDBUF))
}

/// What kind of socket a descriptor is: (SO_DOMAIN, SO_PROTOCOL, SO_ACCEPTCONN), or `None` when
/// it is not a socket at all.
pub fn socket_kind(fd: &impl AsRawFd) -> io::Result<Option<(i32, i32, bool)>> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } as libc::c_long)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Ok(None);
    }
    let domain = sockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    let proto = sockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
    let listening = sockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 0;
    Ok(Some((domain, proto, listening)))
}

/// Whether a socket is restricted to IPv6 (IPV6_V6ONLY); false for IPv4 sockets.
pub fn v6only(fd: &impl AsRawFd) -> bool {
    sockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY).is_ok_and(|v| v != 0)
}

/// A socket's local or peer address (`peer`), `None` if it has none (e.g. an unconnected UDP
/// socket has no peer).
pub fn socket_addr(fd: &impl AsRawFd, peer: bool) -> Option<std::net::SocketAddr> {
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    let sock = socket2::SockRef::from(&borrowed);
    let addr = if peer { sock.peer_addr() } else { sock.local_addr() };
    addr.ok().and_then(|a| a.as_socket())
}

/// The inode of the network namespace a socket belongs to (ioctl SIOCGSKNS).
pub fn socket_netns_inode(fd: &impl AsRawFd) -> io::Result<u64> {
    const SIOCGSKNS: libc::c_ulong = 0x894C;
    let ns = check(unsafe { libc::ioctl(fd.as_raw_fd(), SIOCGSKNS as _) } as libc::c_long)?;
    let ns = unsafe { OwnedFd::from_raw_fd(ns as RawFd) };
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstat(ns.as_raw_fd(), &mut st) } as libc::c_long)?;
    Ok(st.st_ino)
}

/// The inode of the calling thread's network namespace, the name of its pinned state.
pub fn own_netns_inode() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino())
}

/// The raw bpf(2) commands aya 0.14 does not expose for what steer needs: SOCKMAP entries with
/// 8-byte values (aya insists on 4), BPF_LINK_UPDATE and the ids behind a pinned link.
pub mod bpf {
    use super::check;
    use std::{
        io,
        os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        path::Path,
    };

    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    /// BPF_F_REPLACE: update a link only if it still runs `old_prog_fd`.
    const BPF_F_REPLACE: u32 = 4;

    #[repr(C)]
    #[derive(Default)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    fn sys(cmd: libc::c_long, attr: *mut libc::c_void, size: usize) -> io::Result<usize> {
        check(unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) })
    }

    /// Puts a socket into a SOCKMAP with 8-byte values at `index`.
    pub fn sockmap_set(map: &impl AsRawFd, index: u32, socket: &impl AsRawFd) -> io::Result<()> {
        let fd: u64 = socket.as_raw_fd() as u64;
        let mut attr = MapElemAttr {
            map_fd: map.as_raw_fd() as u32,
            key: &index as *const u32 as u64,
            value: &fd as *const u64 as u64,
            ..Default::default()
        };
        sys(BPF_MAP_UPDATE_ELEM, &mut attr as *mut _ as *mut libc::c_void, std::mem::size_of::<MapElemAttr>())?;
        Ok(())
    }

    /// The cookie of the socket at `index` of a SOCKMAP with 8-byte values; `None` when the slot
    /// is empty (never set, cleared, or its socket closed).
    pub fn sockmap_cookie(map: &impl AsRawFd, index: u32) -> io::Result<Option<u64>> {
        let mut cookie: u64 = 0;
        let mut attr = MapElemAttr {
            map_fd: map.as_raw_fd() as u32,
            key: &index as *const u32 as u64,
            value: &mut cookie as *mut u64 as u64,
            ..Default::default()
        };
        match sys(BPF_MAP_LOOKUP_ELEM, &mut attr as *mut _ as *mut libc::c_void, std::mem::size_of::<MapElemAttr>()) {
            Ok(_) => Ok(Some(cookie)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Empties slot `index` of a SOCKMAP (an empty slot, for which the kernel says EINVAL, is not
    /// an error).
    pub fn sockmap_clear(map: &impl AsRawFd, index: u32) -> io::Result<()> {
        let mut attr =
            MapElemAttr { map_fd: map.as_raw_fd() as u32, key: &index as *const u32 as u64, ..Default::default() };
        match sys(BPF_MAP_DELETE_ELEM, &mut attr as *mut _ as *mut libc::c_void, std::mem::size_of::<MapElemAttr>()) {
            Err(e) if !matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EINVAL)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Opens a pinned BPF object (map, program or link).
    pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        #[repr(C)]
        struct Attr {
            pathname: u64,
            bpf_fd: u32,
            file_flags: u32,
        }
        let mut attr = Attr { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
        let fd = sys(BPF_OBJ_GET, &mut attr as *mut _ as *mut libc::c_void, std::mem::size_of::<Attr>())?;
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    /// (link id, id of the program it runs) of a link.
    pub fn link_ids(link: &impl AsRawFd) -> io::Result<(u32, u32)> {
        // struct bpf_link_info starts with type, id, prog_id; the kernel fills what fits.
        let mut info = [0u32; 16];
        #[repr(C)]
        struct Attr {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        let mut attr = Attr {
            bpf_fd: link.as_raw_fd() as u32,
            info_len: std::mem::size_of_val(&info) as u32,
            info: info.as_mut_ptr() as u64,
        };
        sys(BPF_OBJ_GET_INFO_BY_FD, &mut attr as *mut _ as *mut libc::c_void, std::mem::size_of::<Attr>())?;
        Ok((info[1], info[2]))
    }

    /// Makes `link` run `new_prog` instead of `old_prog`, atomically: no lookup runs without a
    /// program in between. Fails (EPERM) if the link no longer runs `old_prog`.
    pub fn link_update(link: &impl AsRawFd, new_prog: &impl AsRawFd, old_prog: &impl AsRawFd) -> io::Result<()> {
        #[repr(C)]
        struct Attr {
            link_fd: u32,
            new_prog_fd: u32,
            flags: u32,
            old_prog_fd: u32,
        }
        let mut attr = Attr {
            link_fd: link.as_raw_fd() as u32,
            new_prog_fd: new_prog.as_raw_fd() as u32,
            flags: BPF_F_REPLACE,
            old_prog_fd: old_prog.as_raw_fd() as u32,
        };
        sys(BPF_LINK_UPDATE, &mut attr as *mut _ as *mut libc::c_void, std::mem::size_of::<Attr>())?;
        Ok(())
    }

    /// A file descriptor for the program with id `id` (BPF_PROG_GET_FD_BY_ID).
    pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
        const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
        #[repr(C)]
        struct Attr {
            id: u32,
            next_id: u32,
            open_flags: u32,
        }
        let mut attr = Attr { id, next_id: 0, open_flags: 0 };
        let fd = sys(BPF_PROG_GET_FD_BY_ID, &mut attr as *mut _ as *mut libc::c_void, std::mem::size_of::<Attr>())?;
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    #[repr(C)]
    struct IdAttr {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }

    /// The id of the next BPF link after `start` (BPF_LINK_GET_NEXT_ID); None after the last.
    pub fn link_next_id(start: u32) -> io::Result<Option<u32>> {
        const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
        let mut attr = IdAttr { id: start, next_id: 0, open_flags: 0 };
        match sys(BPF_LINK_GET_NEXT_ID, &mut attr as *mut _ as *mut libc::c_void, std::mem::size_of::<IdAttr>()) {
            Ok(_) => Ok(Some(attr.next_id)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A file descriptor for the link with id `id` (BPF_LINK_GET_FD_BY_ID).
    pub fn link_fd_by_id(id: u32) -> io::Result<OwnedFd> {
        const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
        let mut attr = IdAttr { id, next_id: 0, open_flags: 0 };
        let fd = sys(BPF_LINK_GET_FD_BY_ID, &mut attr as *mut _ as *mut libc::c_void, std::mem::size_of::<IdAttr>())?;
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

    /// The namespace side of a link, None if it is not a netns link.
    pub fn netns_link(link: &impl AsRawFd) -> io::Result<Option<NetnsLink>> {
        // struct bpf_link_info: type, id, prog_id, then (8-aligned) netns { netns_ino, attach_type }.
        let mut info = [0u32; 16];
        #[repr(C)]
        struct Attr {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        let mut attr = Attr {
            bpf_fd: link.as_raw_fd() as u32,
            info_len: std::mem::size_of_val(&info) as u32,
            info: info.as_mut_ptr() as u64,
        };
        sys(BPF_OBJ_GET_INFO_BY_FD, &mut attr as *mut _ as *mut libc::c_void, std::mem::size_of::<Attr>())?;
        Ok((info[0] == LINK_TYPE_NETNS).then_some(NetnsLink {
            id: info[1],
            prog_id: info[2],
            netns_ino: info[4],
            attach_type: info[5],
        }))
    }
}
