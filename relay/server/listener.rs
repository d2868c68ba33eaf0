//! The listening socket. It is made here and nowhere else: another way to obtain one (a socket
//! handed over by a service manager) belongs here too.
use crate::error::Error;
use mio::net::TcpListener;
use std::net::SocketAddr;

/// Listen backlog: deep enough for bursts of thousands of clients.
const BACKLOG: i32 = 4096;

/// Binds the listening socket (non-blocking, close-on-exec, SO_REUSEADDR).
pub fn listen(addr: SocketAddr) -> Result<TcpListener, Error> {
    use socket2::{Domain, Socket, Type};
    let fail = |source| Error::Listen { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), None).map_err(fail)?;
    socket.set_reuse_address(true).map_err(fail)?;
    socket.bind(&addr.into()).map_err(fail)?;
    socket.listen(BACKLOG).map_err(fail)?;
    warn_if_backlog_capped();
    Ok(TcpListener::from_std(socket.into()))
}

/// The kernel caps the backlog at `net.core.somaxconn` (of this network namespace) without a
/// word: at 4, clients of a burst waited in SYN retries for up to 15 s, and nothing said why (a
/// helper's resource-limits pass).
fn warn_if_backlog_capped() {
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/core/somaxconn") else { return };
    match text.trim().parse::<i32>() {
        Ok(max) if max < BACKLOG => log::warn!(
            "net.core.somaxconn is {max}: at most {max} clients wait to be accepted, not {BACKLOG}, and more in a \
             burst retry their SYN for seconds (`sysctl -w net.core.somaxconn={BACKLOG}` in this network namespace)"
        ),
        _ => {}
    }
}
