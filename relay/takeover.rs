//! `--takeover PID`: a new skrelay takes the listening socket (and the metrics socket) of the
//! running skrelay PID with pidfd_getfd(2), serves it, and then tells the old process to stop
//! accepting and drain (SIGUSR2). The socket is never closed on the way: both processes hold it
//! until the old one lets go, so a client that connects meanwhile waits in the one accept queue
//! and is accepted by one of them, never refused.
//!
//! Live pairs and waiting clients move too (server/handover.rs). The new process listens on an
//! abstract unix socket named after the old process (`channel_name`) before it signals; the old
//! one, on SIGUSR2, stops, connects and sends a manifest of everything it holds, naming its
//! descriptors by number. The new process duplicates them all with pidfd_getfd and answers
//! `ready`; the old one answers `commit` and exits at once, without closing or resetting
//! anything (the new process holds every socket by then). Until `commit`, the old process owns
//! everything: a new process that fails or dies before it only drops duplicates, and the old one
//! carries on (it drains). If the new process dies after `commit`, both are gone and the kernel
//! resets every pair (their sockets are armed to reset on close): never a clean end of file.
use crate::{error::Error, sys};
use socket2::{Domain, Socket, Type};
use std::{
    io::{self, Read, Write},
    net::TcpListener,
    os::{
        fd::{AsRawFd, OwnedFd},
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream},
    },
    time::Duration,
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
    /// Where the old process connects to hand over its pairs (None: it could not be bound, so
    /// the old process drains them instead).
    channel: Option<UnixListener>,
}

/// The abstract unix socket name of the handover channel of process `old_pid`. Abstract names
/// belong to the network namespace, which both processes share (checked by `take`); a second
/// takeover of the same process at the same time finds the name taken.
pub fn channel_name(old_pid: u32) -> String {
    format!("skrelay-takeover-{old_pid}")
}

/// The largest message the channel carries (the manifest: about 1 KiB a pair).
const MAX_MESSAGE: usize = 1 << 30;

/// One end of the handover channel: length-prefixed messages.
pub struct Channel {
    stream: UnixStream,
}

impl Channel {
    /// The old process's end: connects to the channel of the process taking it over. An error
    /// means nobody listens (an older skrelay took over, or it gave up waiting).
    pub fn connect() -> io::Result<Channel> {
        let addr = UnixAddr::from_abstract_name(channel_name(std::process::id()))?;
        let stream = UnixStream::connect_addr(&addr)?;
        // Only a process of our own user (or root) gets the manifest: anyone in the network
        // namespace can bind an abstract name.
        let peer = rustix::net::sockopt::socket_peercred(&stream)?;
        let (theirs, ours) = (peer.uid.as_raw(), rustix::process::geteuid().as_raw());
        if theirs != ours && theirs != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the process listening on the handover channel runs as user {theirs}, not {ours}"),
            ));
        }
        Ok(Channel { stream })
    }

    /// The process at the other end, from SO_PEERCRED.
    pub fn peer_pid(&self) -> Option<i32> {
        rustix::net::sockopt::socket_peercred(&self.stream).ok().map(|c| c.pid.as_raw_nonzero().get())
    }

    pub fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        let len = u32::try_from(msg.len()).map_err(|_| io::Error::other("message too long"))?;
        self.stream.write_all(&len.to_le_bytes())?;
        self.stream.write_all(msg)
    }

    /// The next message, waiting at most `timeout` for each read.
    pub fn recv(&mut self, timeout: Duration) -> io::Result<Vec<u8>> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_MESSAGE {
            return Err(io::Error::other(format!("a {len}-byte message is more than the channel carries")));
        }
        let mut msg = vec![0u8; len];
        self.stream.read_exact(&mut msg)?;
        Ok(msg)
    }
}

/// What the wait for the old process's handover connection ended with.
enum Wait {
    Connecting,
    Exited,
    TimedOut,
}

impl Handover {
    /// Signals the old process to hand over and waits up to `timeout` for it to connect. None:
    /// it did not (an older skrelay, which drains its pairs instead), with the reason logged.
    pub fn start(&mut self, timeout: Duration) -> Result<Option<Channel>, Error> {
        self.signal()?;
        let Some(listener) = self.channel.take() else { return Ok(None) };
        // Accepted only once the poll says a connection waits: a blocking accept with its own
        // timeout after a wait that ran out doubled the wait (10 s for a stopped old process, a
        // helper's pass, with clients in the backlog all along).
        listener.set_nonblocking(true).map_err(|e| Error::io("cannot set up the handover channel", e))?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.wait_for_connection(&listener, deadline) {
                // The old process may exit instead of connecting: another `--takeover` finished
                // with it a moment before this one signalled (both had passed `take`'s checks),
                // or it was killed. Waiting out `timeout` left this process serving a copy of the
                // listening socket beside the other one (a token client and its partner could
                // land apart).
                Wait::Exited => {
                    return Err(Error::Usage(format!(
                        "process {} exited before it handed over (another --takeover may have taken it over: \
                         `skrelay status` lists what runs now)",
                        self.pid
                    )))
                }
                Wait::TimedOut => {
                    log::warn!(
                        "process {} did not connect to hand over its live pairs within {timeout:?}: it is an older \
                         skrelay, or stopped, or busy; it lets them finish instead",
                        self.pid
                    );
                    return Ok(None);
                }
                Wait::Connecting => {}
            }
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).map_err(|e| Error::io("cannot set up the handover channel", e))?;
                    let channel = Channel { stream };
                    if channel.peer_pid() != Some(self.pid) {
                        log::warn!("handover channel: a connection from another process was ignored");
                        continue;
                    }
                    return Ok(Some(channel));
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => {}
                Err(e) => {
                    log::warn!(
                        "process {} could not hand over its live pairs ({e}): it lets them finish instead",
                        self.pid
                    );
                    return Ok(None);
                }
            }
        }
    }

    /// Waits until a connection waits on `listener`, the old process exits without connecting,
    /// or `deadline` passes.
    fn wait_for_connection(&self, listener: &UnixListener, deadline: std::time::Instant) -> Wait {
        use rustix::event::{poll, PollFd, PollFlags};
        loop {
            let mut fds = [PollFd::new(listener, PollFlags::IN), PollFd::new(&self.pidfd, PollFlags::IN)];
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let ms = rustix::event::Timespec { tv_sec: left.as_secs() as i64, tv_nsec: i64::from(left.subsec_nanos()) };
            match poll(&mut fds, Some(&ms)) {
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) | Ok(0) => return Wait::TimedOut,
                Ok(_) => {}
            }
            if fds[0].revents().contains(PollFlags::IN) {
                return Wait::Connecting;
            }
            // A pidfd is readable once its process has exited.
            if !fds[1].revents().is_empty() {
                return Wait::Exited;
            }
        }
    }

    /// Duplicates descriptor `fd` of the old process.
    pub fn getfd(&self, fd: i32) -> io::Result<OwnedFd> {
        sys::pidfd_getfd(&self.pidfd, fd)
    }

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
    // Bound before the signal, so the old process finds it; the name is taken while another
    // takeover of the same process runs. Bound first: the loser of two takeovers at once is told
    // so, not that the process it saw exit or drain meanwhile is gone or draining.
    let channel = UnixAddr::from_abstract_name(channel_name(pid as u32)).and_then(|a| UnixListener::bind_addr(&a));
    let channel = match channel {
        Ok(c) => Some(c),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            return Err(refuse("another skrelay is taking it over right now (wait for that one to finish)".into()))
        }
        Err(e) => {
            log::warn!("cannot open the handover channel ({e}): process {pid} will let its live pairs finish instead");
            None
        }
    };
    let proc = std::path::PathBuf::from(format!("/proc/{pid}"));
    let plural = if command == "proxy" { "proxies" } else { "relays" };
    let cmdline = std::fs::read(proc.join("cmdline")).map_err(|_| {
        refuse(format!(
            "there is no such process (if it ran a moment ago, another --takeover may have taken it over; `skrelay \
             status` lists the running {plural})"
        ))
    })?;
    // An exiting process has no command line any more (a kernel thread has none either).
    let kthread = || std::fs::read_to_string(proc.join("status")).is_ok_and(|s| s.contains("\nKthread:\t1"));
    if cmdline.is_empty() && !kthread() {
        return Err(refuse(gone()));
    }
    let comm = std::fs::read_to_string(proc.join("comm")).unwrap_or_default();
    match crate::running::command_of(&cmdline, &comm) {
        Some(c) if c == command => {}
        // A process that is exiting (the one another takeover just replaced) may show half its
        // command line, read while the kernel unmaps it (`/check/.../debug/sk` and nothing
        // more, in a CI run): it exited, it is not something else.
        _ if sys::exiting(pid as u32) => return Err(refuse(gone())),
        _ => {
            // One line, and not a whole script passed to `sh -c`.
            let all = String::from_utf8_lossy(&cmdline).replace(['\0', '\n', '\t'], " ").trim().to_string();
            let shown = match all.char_indices().nth(80) {
                Some((at, _)) => format!("{}...", &all[..at]),
                None => all,
            };
            return Err(refuse(format!(
                "it is not a running `skrelay {command}` (it runs `{shown}`; `skrelay status` lists the running {plural})"
            )));
        }
    }
    // Reading its namespace takes the right to ptrace it, as taking its sockets does: a user
    // without it is told that, not that the namespaces differ.
    let its_netns = std::fs::read_link(proc.join("ns/net")).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => refuse(gone()),
        _ => refuse(permission(&proc, e)),
    })?;
    if Some(its_netns) != std::fs::read_link("/proc/thread-self/ns/net").ok() {
        return Err(refuse("it runs in another network namespace (run the new skrelay in its namespace)".into()));
    }
    // Its --ports funnel is a link in its own file table, which no handover moves: the new
    // process (which cannot take --ports with --takeover) would serve the listen port alone.
    if let Some(f) = crate::steer::funnel::running().into_iter().find(|f| f.pid == Some(pid as u32)) {
        return Err(refuse(format!(
            "it also serves --ports {}, which a takeover cannot carry yet (its funnel would go with it): stop it and \
             start this one with the same --ports instead",
            f.port_list()
        )));
    }
    if !catches(&proc, HANDOVER_SIGNAL) {
        return Err(refuse(
            "it does not support --takeover (an older skrelay, or one still starting): stop it and start this one instead"
                .into(),
        ));
    }
    let pidfd = sys::pidfd_open(pid).map_err(|e| match e.raw_os_error() {
        Some(libc::ESRCH) => refuse(gone()),
        _ => refuse(e.to_string()),
    })?;
    let mut listeners = Vec::new();
    let mut metrics = Vec::new();
    let fds = std::fs::read_dir(proc.join("fd")).map_err(|e| refuse(permission(&proc, e)))?;
    for entry in fds.flatten() {
        let is_socket = std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if !is_socket {
            continue;
        }
        let dup = match sys::pidfd_getfd(&pidfd, fd) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::EBADF) => continue, // closed meanwhile
            Err(e) => return Err(refuse(permission(&proc, e))),
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
    let listener =
        match listeners.len() {
            1 => listeners.remove(0),
            0 => return Err(refuse(
                "it has no listening socket (it is draining, or another --takeover has just taken it over: `skrelay \
                 status` lists what runs now)"
                    .into(),
            )),
            n => return Err(refuse(format!("it has {n} listening sockets and skrelay serves one"))),
        };
    // A takeover whose handover timed out (the old process stopped) serves the socket beside
    // it: a second takeover of the old process made a third server of it, and token partners
    // landed apart (a re-check pass). That one is the process to replace.
    if let Some(other) = rustix::fs::fstat(&listener).ok().and_then(|st| other_holder(pid, command, st.st_ino)) {
        return Err(refuse(format!(
            "process {other}, another `skrelay {command}` that took it over (just now, or after a handover that \
             timed out while process {pid} was stopped or busy), serves its listening socket too: replace that one \
             (`--takeover {other}`)"
        )));
    }
    listener.set_cloexec(true).map_err(|e| refuse(e.to_string()))?;
    let metrics = match metrics.into_iter().next() {
        Some(m) => {
            m.set_cloexec(true).map_err(|e| refuse(e.to_string()))?;
            Some(m.into())
        }
        None => None,
    };
    Ok(Taken { listener: listener.into(), metrics, handover: Handover { pid, pidfd, channel } })
}

/// Another `skrelay COMMAND` process than `pid` (and this one) that holds the socket with inode
/// `inode`.
fn other_holder(pid: i32, command: &str, inode: u64) -> Option<u32> {
    sys::socket_holders(inode)?.find(|&other| {
        other != pid as u32
            && crate::running::command_of_process(std::path::Path::new(&format!("/proc/{other}"))).as_deref()
                == Some(command)
    })
}

/// The process was there a moment ago: it exited, maybe taken over by another `--takeover`.
fn gone() -> String {
    "it exited meanwhile (another --takeover may have taken it over: `skrelay status` lists what runs now)".into()
}

fn permission(proc: &std::path::Path, e: std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ESRCH) => gone(),
        Some(libc::EPERM) | Some(libc::EACCES) => match caps_beyond_ours(proc) {
            // The same user may not ptrace a process holding capabilities it lacks (another
            // user's process is refused whatever it holds: the message below).
            beyond if !beyond.is_empty() && same_user(proc) => format!(
                "{e} (it holds capabilities this process lacks: {}; taking its sockets needs the right to ptrace \
                 it: give this one the same capabilities, or CAP_SYS_PTRACE)",
                beyond.join(", ")
            ),
            _ => format!(
                "{e} (taking its sockets needs the right to ptrace it: run as root, as its user, or with \
                 CAP_SYS_PTRACE)"
            ),
        },
        _ => e.to_string(),
    }
}

/// The effective capabilities of process `proc` (/proc/PID) that this process lacks, by name.
fn caps_beyond_ours(proc: &std::path::Path) -> Vec<String> {
    let eff = crate::sys::effective_capabilities;
    let (Some(theirs), Some(ours)) = (eff(proc), eff(std::path::Path::new("/proc/self"))) else { return vec![] };
    // capability.h's order: a root process holds them all, and "capability 7" said nothing.
    const NAMES: [&str; 41] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    (0..64)
        .filter(|bit| theirs & !ours & (1 << bit) != 0)
        .map(|bit| NAMES.get(bit).map_or(format!("capability {bit}"), |n| format!("CAP_{n}")))
        .collect()
}

/// Whether process `proc` (/proc/PID) runs as this process's user (its effective uid).
fn same_user(proc: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(proc).is_ok_and(|m| m.uid() == rustix::process::geteuid().as_raw())
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
