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

/// Makes the next close of this socket send a RST instead of a FIN.
pub fn reset_on_close(fd: &impl AsRawFd) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
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
