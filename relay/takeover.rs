//! `--takeover PID`: a new skrelay takes the listening socket (and the metrics socket) of the
//! running skrelay PID with pidfd_getfd(2), serves it, and then tells the old process to stop
//! accepting and drain (SIGUSR2). The socket is never closed on the way: both processes hold it
//! until the old one lets go, so a client that connects meanwhile waits in the one accept queue
//! and is accepted by one of them, never refused.
use crate::{error::Error, sys};
use socket2::{Domain, Socket, Type};
use std::{
    net::TcpListener,
    os::fd::{AsRawFd, OwnedFd},
};

/// The signal that asks a running relay or proxy to hand over: stop accepting, stop serving
/// metrics, let what it has accepted finish (the drain), then exit.
pub const HANDOVER_SIGNAL: i32 = libc::SIGUSR2;

/// What was taken from the old process.
pub struct Taken {
    /// Its listening socket (the one mio watches: non-blocking).
    pub listener: TcpListener,
    /// Its metrics socket (blocking: served by a thread), if it served metrics.
    pub metrics: Option<TcpListener>,
    pub handover: Handover,
}

/// The old process, to be told to hand over once the new one serves.
pub struct Handover {
    pub pid: i32,
    pidfd: OwnedFd,
}

impl Handover {
    /// Sends the old process the handover signal through its pidfd (never to a recycled pid).
    pub fn signal(&self) -> Result<(), Error> {
        // SAFETY: integer arguments and a null siginfo pointer, which the syscall allows.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                HANDOVER_SIGNAL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::io(format!("cannot tell process {} to hand over", self.pid), e));
        }
        Ok(())
    }
}

/// Takes the sockets of the running `skrelay COMMAND` process `pid` (`command`: relay or proxy).
pub fn take(pid: i32, command: &str) -> Result<Taken, Error> {
    let refuse = |why: String| Error::Usage(format!("cannot take over process {pid}: {why}"));
    if pid <= 0 || pid as u32 == std::process::id() {
        return Err(refuse("give the pid of the running skrelay to replace".into()));
    }
    let proc = std::path::PathBuf::from(format!("/proc/{pid}"));
    let cmdline = std::fs::read(proc.join("cmdline"))
        .map_err(|_| refuse(format!("there is no such process (`skrelay status` lists the running {command}s)")))?;
    match crate::running::command_of(&cmdline) {
        Some(c) if c == command => {}
        _ => {
            let shown = String::from_utf8_lossy(&cmdline).replace('\0', " ").trim().to_string();
            return Err(refuse(format!(
                "it is not a running `skrelay {command}` (it runs `{shown}`; `skrelay status` lists the running {command}s)"
            )));
        }
    }
    if std::fs::read_link(proc.join("ns/net")).ok() != std::fs::read_link("/proc/thread-self/ns/net").ok() {
        return Err(refuse("it runs in another network namespace (run the new skrelay in its namespace)".into()));
    }
    if !catches(&proc, HANDOVER_SIGNAL) {
        return Err(refuse(
            "it does not support --takeover (an older skrelay, or one still starting): stop it and start this one instead"
                .into(),
        ));
    }
    let pidfd = sys::pidfd_open(pid).map_err(|e| refuse(e.to_string()))?;
    let mut listeners = Vec::new();
    let mut metrics = Vec::new();
    let fds = std::fs::read_dir(proc.join("fd")).map_err(|e| refuse(permission(e)))?;
    for entry in fds.flatten() {
        let is_socket = std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if !is_socket {
            continue;
        }
        let dup = match sys::pidfd_getfd(&pidfd, fd) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::EBADF) => continue, // closed meanwhile
            Err(e) => return Err(refuse(permission(e))),
        };
        let socket = Socket::from(dup);
        let tcp_listener = matches!(socket.domain(), Ok(d) if d == Domain::IPV4 || d == Domain::IPV6)
            && socket.r#type().is_ok_and(|t| t == Type::STREAM)
            && socket.is_listener().unwrap_or(false);
        if !tcp_listener {
            continue;
        }
        // SAFETY: fcntl(F_GETFL) reads the flags of a descriptor we own.
        let flags = unsafe { libc::fcntl(socket.as_raw_fd(), libc::F_GETFL) };
        if flags >= 0 && flags & libc::O_NONBLOCK != 0 {
            listeners.push(socket);
        } else {
            metrics.push(socket);
        }
    }
    let listener = match listeners.len() {
        1 => listeners.remove(0),
        0 => return Err(refuse("it has no listening socket (it is draining already: wait for it to exit)".into())),
        n => return Err(refuse(format!("it has {n} listening sockets and skrelay serves one"))),
    };
    listener.set_cloexec(true).map_err(|e| refuse(e.to_string()))?;
    let metrics = match metrics.into_iter().next() {
        Some(m) => {
            m.set_cloexec(true).map_err(|e| refuse(e.to_string()))?;
            Some(m.into())
        }
        None => None,
    };
    Ok(Taken { listener: listener.into(), metrics, handover: Handover { pid, pidfd } })
}

fn permission(e: std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "{e} (taking its sockets needs the right to ptrace it: run as root, as its user, or with CAP_SYS_PTRACE)"
        ),
        _ => e.to_string(),
    }
}

/// Whether process `proc` (/proc/PID) has a handler for `signal` (its SigCgt mask).
fn catches(proc: &std::path::Path, signal: i32) -> bool {
    let status = std::fs::read_to_string(proc.join("status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}
