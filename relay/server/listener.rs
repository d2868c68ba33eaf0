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
    Ok(TcpListener::from_std(socket.into()))
}
