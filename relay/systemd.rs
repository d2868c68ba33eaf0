//! systemd without libsystemd: socket activation (`LISTEN_FDS`, sd_listen_fds(3)) and the
//! notification protocol (`NOTIFY_SOCKET`, sd_notify(3): READY=1, STOPPING=1). Both are a few
//! lines of a stable protocol, so no crate is needed.
use crate::error::Error;
use socket2::{Domain, Socket, Type};
use std::{
    net::TcpListener,
    os::{
        fd::{FromRawFd, OwnedFd, RawFd},
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr as UnixAddr, UnixDatagram},
    },
    sync::atomic::{AtomicBool, Ordering},
};

/// The first descriptor systemd passes (SD_LISTEN_FDS_START).
pub const LISTEN_FDS_START: RawFd = 3;

/// The listening socket systemd passed to this process, if it passed one: `LISTEN_FDS` set and
/// `LISTEN_PID` naming this process. Refuses (exit 2, with the fix) what skrelay cannot serve:
/// more than one socket, or one that is not a listening TCP socket.
pub fn listener() -> Result<Option<TcpListener>, Error> {
    let Ok(fds) = std::env::var("LISTEN_FDS") else { return Ok(None) };
    let pid = std::env::var("LISTEN_PID").ok();
    if pid.as_deref().and_then(|p| p.trim().parse::<u32>().ok()) != Some(std::process::id()) {
        log::warn!(
            "LISTEN_FDS is set but LISTEN_PID ({}) is not this process ({}): the sockets are not ours; \
             binding --listen instead",
            pid.as_deref().unwrap_or("unset"),
            std::process::id()
        );
        return Ok(None);
    }
    let n: u32 = fds.trim().parse().map_err(|_| {
        Error::Usage(format!("LISTEN_FDS=`{fds}` is not a number of sockets (it is set by systemd: unset it)"))
    })?;
    match n {
        0 => return Ok(None),
        1 => {}
        _ => {
            return Err(Error::Usage(format!(
                "cannot serve the sockets systemd passed: there are {n} (LISTEN_FDS={n}) and skrelay serves one \
                 (give its .socket unit a single ListenStream=)"
            )))
        }
    }
    let fd = LISTEN_FDS_START;
    let refuse = |why: String| Error::Usage(format!("cannot serve the socket systemd passed (fd {fd}): {why}"));
    // SAFETY: fcntl(F_GETFD) only reads the descriptor table entry of an integer descriptor.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(refuse(format!(
            "{} (LISTEN_FDS=1 promised it: start skrelay from its .socket unit or systemd-socket-activate)",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: fd 3 is open (checked above) and, by the protocol, passed to this process alone to
    // own; nothing else in skrelay takes descriptor 3 by number.
    let socket = Socket::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let domain = match socket.domain() {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
            // Not ours to close: it is whatever the caller left on fd 3.
            std::mem::forget(socket);
            return Err(refuse("it is not a socket (give the .socket unit a ListenStream=IP:PORT)".into()));
        }
        Err(e) => return Err(refuse(e.to_string())),
    };
    if domain != Domain::IPV4 && domain != Domain::IPV6 {
        return Err(refuse("it is not an IP socket (give the .socket unit ListenStream=IP:PORT, not a path)".into()));
    }
    if socket.r#type().map_err(|e| refuse(e.to_string()))? != Type::STREAM {
        return Err(refuse(
            "it is not a TCP socket (use ListenStream=, not ListenDatagram= or ListenSequentialPacket=)".into(),
        ));
    }
    if !socket.is_listener().map_err(|e| refuse(e.to_string()))? {
        return Err(refuse(
            "it is not listening (a connection, or a socket only bound: give the .socket unit ListenStream= with \
             Accept=no)"
                .into(),
        ));
    }
    socket.set_nonblocking(true).map_err(|e| refuse(e.to_string()))?;
    socket.set_cloexec(true).map_err(|e| refuse(e.to_string()))?;
    Ok(Some(socket.into()))
}

/// Sends `state` (e.g. "READY=1", "STOPPING=1", with "STATUS=..." lines) to the service manager
/// when `NOTIFY_SOCKET` names one; true if it was sent. A failure is logged once and otherwise
/// ignored: the manager's own timeout reports a service that never became ready.
pub fn notify(state: &str) -> bool {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return false };
    let sent = (|| {
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => UnixAddr::from_abstract_name(name)?,
            None => UnixAddr::from_pathname(&path)?,
        };
        UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)
    })();
    match sent {
        Ok(_) => true,
        Err(e) => {
            if !WARNED.swap(true, Ordering::Relaxed) {
                log::warn!("cannot notify the service manager at NOTIFY_SOCKET={}: {e}", path.to_string_lossy());
            }
            false
        }
    }
}
