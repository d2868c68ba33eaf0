//! The `relay` and `proxy` processes running in this network namespace, for `skrelay status`:
//! found in /proc (command line, file table) without asking them anything, so a process that is
//! stuck is still listed.
use crate::status::Section;
use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

/// One running `skrelay relay` or `skrelay proxy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub pid: u32,
    /// `relay` or `proxy`.
    pub command: String,
    /// The sockets it accepts clients on (its own, or the one systemd passed).
    pub listening: Vec<SocketAddr>,
    /// `kernel` when it holds the kernel datapath's sk_skb programs, else `userspace`.
    pub datapath: &'static str,
    /// TCP connections it holds: clients, upstream connections, pairs' sockets.
    pub connections: usize,
    /// Where it serves --metrics, if it does.
    pub metrics: Option<SocketAddr>,
    /// What its metrics say (None without --metrics, or when they did not answer in time).
    pub live: Option<Live>,
    /// It serves --metrics, and they did not answer in time (1 s): its figures are unknown.
    pub metrics_silent: bool,
    /// Clients in its listening sockets' accept queues: connected (the kernel completed their
    /// handshake) and not yet accepted, behind a full `--max-pending`, a shortage of descriptors,
    /// or a stopped or stuck process. Read from /proc/net/tcp, so known without `--metrics`.
    pub backlog: u64,
    /// `proxy`: the ports of its `--upstream` addresses, from its command line.
    pub upstream_ports: Vec<u16>,
    /// Stopped (SIGSTOP, a debugger, or a frozen cgroup): its kernel pairs still move bytes,
    /// nothing else happens until it runs again (a helper's pass: `status` listed a stopped relay
    /// as serving).
    pub stopped: bool,
    /// The frozen cgroup (cgroup v2 `cgroup.freeze`) that stops it, if that is what does: it
    /// read as running, and `status` waited 1 s for each such relay's metrics (a helper's pass).
    pub frozen: Option<String>,
}

/// A running relay's own figures, read from its `--metrics` endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Live {
    /// Pairs it serves now.
    pub pairs: u64,
    /// Bytes inside the kernel between its pairs' sockets (`skrelay_kernel_inflight_bytes`):
    /// redirected from one socket and not yet in the other's send queue.
    pub kernel_inflight: u64,
    /// Bytes of its pairs' streams inside this host (`skrelay_held_bytes`): received from one
    /// client and not yet acknowledged by the other, on either datapath. None from a process
    /// that does not export it (an older skrelay).
    pub held: Option<u64>,
    /// Clients waiting for their token line, their partner or their upstream connection
    /// (`skrelay_pending_clients`): `status` showed none of them (an observability pass).
    pub waiting: Option<u64>,
}

impl Server {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "pid": self.pid,
            "command": self.command,
            "listening": self.listening.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "datapath": self.datapath,
            "connections": self.connections,
            "metrics": self.metrics.map(metrics_url),
            "pairs": self.live.map(|l| l.pairs),
            // A userspace relay holds nothing in the kernel between its sockets: no figure.
            "kernel_inflight_bytes": self.live.filter(|_| self.datapath == "kernel").map(|l| l.kernel_inflight),
            "held_bytes": self.live.and_then(|l| l.held),
            "waiting_clients": self.live.and_then(|l| l.waiting),
            "backlog_clients": self.backlog,
            // null without --metrics; false when they did not answer within 1 s (the figures
            // above are null then too).
            "metrics_answered": self.metrics.filter(|_| !self.stopped).map(|_| !self.metrics_silent),
            "stopped": self.stopped,
            "frozen_cgroup": self.frozen,
        })
    }
}

/// The URL a metrics endpoint answers at: one that opens, where it listens on every address
/// (`0.0.0.0` or `[::]` is no address to connect to: it answers on loopback too).
pub fn metrics_url(at: SocketAddr) -> String {
    // ::1 needs IPv6 up in the namespace; a dual-stack `[::]` answers on 127.0.0.1 as well.
    let ipv6 = std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6").is_ok_and(|v| v.trim() == "0");
    let at = match at.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), at.port()),
        IpAddr::V6(ip) if ip.is_unspecified() && ipv6 => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), at.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), at.port()),
        // A link-local address keeps its interface (its scope id).
        _ => at,
    };
    format!("http://{at}/metrics")
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let listening: Vec<String> = self.listening.iter().map(|a| a.to_string()).collect();
        // A userspace relay moves nothing while it is stopped: its pairs' bytes wait.
        let meanwhile = if self.datapath == "kernel" {
            "meanwhile its kernel pairs move bytes, and nothing else happens"
        } else {
            "meanwhile nothing happens: its pairs' bytes wait"
        };
        let stopped = match (&self.frozen, self.stopped) {
            (Some(cg), _) => format!("frozen (its cgroup {cg} has cgroup.freeze 1, and 0 resumes it; {meanwhile}): "),
            (None, true) => format!("stopped (SIGCONT resumes it; {meanwhile}): "),
            (None, false) => String::new(),
        };
        write!(
            f,
            "  {} (pid {}): {stopped}listening on {}, {} datapath, {} connection(s)",
            self.command,
            self.pid,
            // A process still starting (loading its datapath, or about to take another's socket
            // over) listens on nothing yet either: "draining" alone sent operators after a healthy
            // upgrade (a helper's operations pass).
            if listening.is_empty() {
                "nothing (starting, or draining after a stop signal)".to_string()
            } else {
                listening.join(", ")
            },
            self.datapath,
            self.connections
        )?;
        if let Some(m) = self.metrics {
            write!(f, ", metrics at {}", metrics_url(m))?;
            if m.ip().is_unspecified() {
                write!(f, " (listening on {m}: every address)")?;
            }
        }
        // What its pairs hold in all first: a helper read the bare "in flight in the kernel" as
        // that, 17 MB where 34 MB waited (most of it in a send queue).
        let held = |l: &Live| l.held.map(|h| format!(" holding {h} byte(s) on their way")).unwrap_or_default();
        match self.live {
            Some(l) if self.datapath == "kernel" => write!(
                f,
                "; {} pair(s){}, {} byte(s) {}in flight in the kernel between their sockets",
                l.pairs,
                held(&l),
                l.kernel_inflight,
                if l.held.is_some() { "of it " } else { "" }
            )?,
            Some(l) => write!(f, "; {} pair(s){}", l.pairs, held(&l))?,
            None if self.metrics_silent => write!(f, "; its metrics did not answer within 1 s: pairs unknown")?,
            None => {}
        }
        if let Some(n) = self.live.and_then(|l| l.waiting).filter(|&n| n > 0) {
            let what = if self.command == "proxy" { "for their upstream connection" } else { "to be paired" };
            write!(f, "; {n} client(s) waiting {what}")?;
        }
        if self.backlog > 0 {
            write!(f, "; {} client(s) in its listen backlog, not yet accepted", self.backlog)?;
        }
        Ok(())
    }
}

/// BPF_PROG_TYPE_SK_SKB, as /proc/PID/fdinfo shows a program's type.
const PROG_TYPE_SK_SKB: u32 = 14;
const TCP_LISTEN: u8 = 0x0A;
/// O_NONBLOCK as /proc/PID/fdinfo's octal `flags` shows it: the relay's listener is non-blocking
/// (mio), the metrics responder's is not.
const O_NONBLOCK: u32 = 0o4000;

/// Every `skrelay relay` and `skrelay proxy` process of this network namespace but this one,
/// by pid. Processes this one may not inspect (another user's, without CAP_SYS_PTRACE) are
/// left out.
pub fn servers() -> Vec<Server> {
    scan().0
}

/// The servers, and how many more skrelay relay/proxy processes this one may not inspect
/// (another user's, without root: their namespace and descriptors cannot be read).
fn scan() -> (Vec<Server>, usize) {
    let own_ns = fs::read_link("/proc/thread-self/ns/net").ok();
    let mut sockets = Vec::new();
    for f in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        sockets.extend(parse_proc_net(&fs::read_to_string(f).unwrap_or_default()));
    }
    let me = std::process::id();
    let (mut found, mut hidden) = (Vec::new(), 0);
    let Ok(procs) = fs::read_dir("/proc") else { return (found, hidden) };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let ns = fs::read_link(p.path().join("ns/net"));
        if ns.as_ref().ok() != own_ns.as_ref() {
            let denied = ns.is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied);
            if denied && command_of_process(&p.path()).is_some() {
                hidden += 1;
            }
            continue;
        }
        let Some(command) = command_of_process(&p.path()) else { continue };
        let cmdline = fs::read(p.path().join("cmdline")).unwrap_or_default();
        if let Some(mut s) = inspect(&p.path(), pid, command, &sockets, &cmdline) {
            s.upstream_ports = upstream_ports(&cmdline);
            found.push(s);
        }
    }
    found.sort_by_key(|s| s.pid);
    (found, hidden)
}

/// The name a relay or proxy gives its main thread (`sys::name_this_process`), which is the
/// process's `comm` whatever its binary is called.
pub const PROCESS_NAME: &str = "skrelay";

/// The process with directory `dir` in /proc: its command line and `comm`.
pub fn command_of_process(dir: &Path) -> Option<String> {
    let comm = fs::read_to_string(dir.join("comm")).unwrap_or_default();
    command_of(&fs::read(dir.join("cmdline")).unwrap_or_default(), &comm)
}

/// `relay` or `proxy` when `cmdline` (NUL-separated) runs skrelay with that command. A relay or
/// proxy names itself (`comm`, PROCESS_NAME), so a copy under another name is one too: `sk`
/// was taken for another program, and `accel on` then accelerated its cgroup, `status` did not
/// list it and `--takeover` refused it (a helper's pass over the jobs combined).
pub fn command_of(cmdline: &[u8], comm: &str) -> Option<String> {
    let mut args = cmdline.split(|&b| b == 0).map(String::from_utf8_lossy);
    let exe = args.next()?;
    let name = Path::new(exe.as_ref()).file_name()?.to_string_lossy().into_owned();
    // skrelay, or a renamed copy (skrelay.new); not cargo's test binaries (skrelay-<16 hex>).
    let test_binary =
        name.strip_prefix("skrelay-").is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if (!name.starts_with("skrelay") || test_binary) && comm.trim_end() != PROCESS_NAME {
        return None;
    }
    // The command is the first argument that is not a flag (skrelay takes no global flags).
    let command = args.find(|a| !a.starts_with('-'))?;
    matches!(command.as_ref(), "relay" | "proxy").then(|| command.into_owned())
}

/// The ports of a proxy's `--upstream HOST:PORT` arguments (NUL-separated command line), in
/// either form (`--upstream A`, `--upstream=A`).
fn upstream_ports(cmdline: &[u8]) -> Vec<u16> {
    flag_values(cmdline, "--upstream").iter().filter_map(|v| v.rsplit_once(':')?.1.parse().ok()).collect()
}

/// The values of `flag` in `cmdline` (NUL-separated), `--flag VALUE` or `--flag=VALUE`.
fn flag_values(cmdline: &[u8], flag: &str) -> Vec<String> {
    let args: Vec<String> = cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let mut values = Vec::new();
    for (i, a) in args.iter().enumerate() {
        let value = match a.strip_prefix(flag) {
            Some("") => args.get(i + 1).cloned(),
            Some(rest) => rest.strip_prefix('=').map(str::to_string),
            None => None,
        };
        values.extend(value.map(|v| v.trim().to_string()));
    }
    values
}

/// `addr` (from /proc/net/tcp6, which shows no interface) with the interface of the `flag`
/// address in `cmdline` that it is: a link-local address is of no use without it (`status`
/// could not read a relay's metrics at [fe80::a]:PORT, nor say which interface it listens on).
pub(crate) fn with_scope(addr: SocketAddr, cmdline: &[u8], flag: &str) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) if v6.scope_id() == 0 && v6.ip().is_unicast_link_local() => flag_values(cmdline, flag)
            .iter()
            .filter_map(|v| crate::cli::parse_listen(v).ok())
            .find_map(|given| match given {
                SocketAddr::V6(g) if g.ip() == v6.ip() && (g.port() == v6.port() || g.port() == 0) => {
                    Some(SocketAddr::V6(std::net::SocketAddrV6::new(*v6.ip(), v6.port(), 0, g.scope_id())))
                }
                _ => None,
            })
            .unwrap_or(addr),
        _ => addr,
    }
}

/// The cgroup v2 path of the process in `dir` if that cgroup is frozen (`cgroup.events`).
fn frozen_cgroup(dir: &Path) -> Option<String> {
    let cgroups = fs::read_to_string(dir.join("cgroup")).ok()?;
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?.to_string();
    let events = crate::accel::cgroup::v2_mount().ok()?.join(path.trim_start_matches('/')).join("cgroup.events");
    fs::read_to_string(events).ok()?.lines().any(|l| l == "frozen 1").then_some(path)
}

/// Whether the process is stopped: state `T` (a stop signal) or `t` (a debugger) in
/// /proc/PID/stat, the field after the command name (which may hold spaces and parentheses).
fn process_stopped(dir: &Path) -> bool {
    let stat = fs::read_to_string(dir.join("stat")).unwrap_or_default();
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|s| s == "T" || s == "t")
}

fn inspect(dir: &Path, pid: u32, command: String, sockets: &[ProcSocket], cmdline: &[u8]) -> Option<Server> {
    let fds = fs::read_dir(dir.join("fd")).ok()?;
    let mut server = Server {
        pid,
        command,
        listening: vec![],
        datapath: "userspace",
        connections: 0,
        metrics: None,
        live: None,
        metrics_silent: false,
        backlog: 0,
        upstream_ports: vec![],
        stopped: process_stopped(dir),
        frozen: frozen_cgroup(dir),
    };
    server.stopped |= server.frozen.is_some();
    for fd in fds.flatten() {
        let Ok(target) = fs::read_link(fd.path()) else { continue };
        let target = target.to_string_lossy();
        let info = fs::read_to_string(dir.join("fdinfo").join(fd.file_name())).unwrap_or_default();
        let field = |key: &str| info.lines().find_map(|l| l.strip_prefix(key)).map(str::trim);
        if target == "anon_inode:bpf-prog" {
            if field("prog_type:").and_then(|t| t.parse::<u32>().ok()) == Some(PROG_TYPE_SK_SKB) {
                server.datapath = "kernel";
            }
            continue;
        }
        let Some(inode) = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']')?.parse::<u64>().ok()) else {
            continue;
        };
        let Some(s) = sockets.iter().find(|s| s.inode == inode) else { continue };
        if s.state != TCP_LISTEN {
            server.connections += 1;
        } else if field("flags:").and_then(|f| u32::from_str_radix(f, 8).ok()).is_some_and(|f| f & O_NONBLOCK != 0) {
            server.listening.push(with_scope(s.local, cmdline, "--listen"));
            server.backlog += s.rx_queue;
        } else {
            server.metrics = Some(with_scope(s.local, cmdline, "--metrics"));
        }
    }
    server.listening.sort();
    // A stopped process cannot answer: not waited for.
    server.live = server.metrics.filter(|_| !server.stopped).and_then(|m| live(m, server.pid));
    server.metrics_silent = server.metrics.is_some() && !server.stopped && server.live.is_none();
    Some(server)
}

/// Reads relay `pid`'s pairs and in-flight bytes from its metrics endpoint (1 s at most a GET).
/// During a `--takeover` two processes accept on that socket: an answer of the other's is asked
/// again, a few times (one of its numbers showed under the other process: an operator's pass).
fn live(addr: SocketAddr, pid: u32) -> Option<Live> {
    for _ in 0..4 {
        match live_once(addr)? {
            // Asked again only when another process answered: one that does not answer is
            // waited for once (1 s), not four times.
            (Some(from), _) if from != pid => continue,
            (_, live) => return Some(live),
        }
    }
    None
}

/// One GET of the metrics at `addr`: the pid that answered (its header) and the numbers.
fn live_once(addr: SocketAddr) -> Option<(Option<u32>, Live)> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(1);
    // A dual-stack `[::]` listener answers on 127.0.0.1 too, which is there where IPv6 is
    // disabled and `[::]` (::1) cannot be reached (a re-check pass).
    let v4 = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port());
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)
        .or_else(|e| {
            if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
                std::net::TcpStream::connect_timeout(&v4, timeout)
            } else {
                Err(e)
            }
        })
        .ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: skrelay\r\n\r\n").ok()?;
    let mut text = String::new();
    s.take(1 << 20).read_to_string(&mut text).ok()?;
    let sum = |name: &str| -> Option<u64> {
        let values: Vec<f64> = text
            .lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum::<f64>() as u64)
    };
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    let from = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case(crate::metrics::PID_HEADER).then(|| value.trim().parse().ok())?
    });
    Some((
        from,
        Live {
            pairs: sum("skrelay_pairs_active")?,
            kernel_inflight: sum("skrelay_kernel_inflight_bytes")?,
            held: sum("skrelay_held_bytes"),
            waiting: sum("skrelay_pending_clients"),
        },
    ))
}

/// `skrelay status`'s section for running relays and proxies.
pub fn status_section() -> Section {
    let (servers, hidden) = scan();
    let userns = crate::bpf::in_user_namespace();
    let mut text = if servers.is_empty() && hidden > 0 && userns {
        "relays: none in sight".to_string()
    } else if servers.is_empty() && hidden > 0 {
        "relays: none of this user's is running".to_string()
    } else if servers.is_empty() && crate::bpffs::in_pid_namespace_of_its_own() {
        // Its /proc shows none outside it: "no relay is running" was false (a re-check pass).
        "relays: none in this pid namespace, whose /proc shows no process outside it (run `skrelay status` in the \
         host's pid namespace to see the others)"
            .to_string()
    } else if servers.is_empty() {
        "relays: no relay or proxy is running".to_string()
    } else {
        let mut lines = vec![format!("relays: {} running", servers.len())];
        lines.extend(servers.iter().map(Server::to_string));
        lines.join("\n")
    };
    if hidden > 0 && userns {
        // Root of a user namespace: the processes are often its own uid's, and it is root there.
        text += &format!(
            "\n  ({hidden} skrelay relay or proxy process(es) not shown: which network namespace they serve cannot be \
             read from a user namespace (run `skrelay status` as root outside it))"
        );
    } else if hidden > 0 {
        text += &format!(
            "\n  ({hidden} skrelay relay or proxy process(es) of other users not shown: which network namespace they \
             serve cannot be read without root)"
        );
    }
    let json = serde_json::json!({
        "processes": servers.iter().map(Server::json).collect::<Vec<_>>(),
        "not_shown": hidden,
    });
    Section { name: "relays", text, json }
}

#[derive(Debug, Clone, Copy)]
struct ProcSocket {
    local: SocketAddr,
    state: u8,
    /// rx_queue: for a listening socket, the connections in its accept queue.
    rx_queue: u64,
    inode: u64,
}

/// /proc/net/tcp[6] rows: addresses are the raw 32-bit words, each printed in host order.
fn parse_proc_net(text: &str) -> Vec<ProcSocket> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (addr, port) = cols.get(1)?.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let mut bytes = Vec::with_capacity(16);
            for word in addr.as_bytes().chunks(8) {
                let w = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
                bytes.extend_from_slice(&w.to_ne_bytes());
            }
            let ip = match bytes.len() {
                4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?)),
                16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
                _ => return None,
            };
            Some(ProcSocket {
                local: SocketAddr::new(ip, port),
                state: u8::from_str_radix(cols.get(3)?, 16).ok()?,
                rx_queue: u64::from_str_radix(cols.get(4)?.split_once(':')?.1, 16).ok()?,
                inode: cols.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A metrics socket answered by two processes (a --takeover): the numbers of the one asked
    /// for, or none when only the other answers.
    #[test]
    fn live_numbers_are_those_of_the_process_asked() {
        fn serve(listener: std::net::TcpListener, pids: Vec<u32>) -> std::net::TcpListener {
            use std::io::{Read, Write};
            for pid in pids {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).unwrap();
                let body =
                    format!("skrelay_pairs_active{{datapath=\"kernel\"}} {pid}\nskrelay_kernel_inflight_bytes 0\n");
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Skrelay-Pid: {pid}\r\n\r\n", body.len());
                s.write_all(format!("{head}{body}").as_bytes()).unwrap();
            }
            listener
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || serve(listener, vec![7, 7, 42]));
        assert_eq!(live(addr, 42).map(|l| l.pairs), Some(42));
        let listener = server.join().unwrap();
        let server = std::thread::spawn(move || serve(listener, vec![7; 4]));
        assert!(live(addr, 42).is_none(), "another process's numbers");
        let listener = server.join().unwrap();
        // One that does not answer is waited for once, not once per retry.
        let silent = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1500));
            drop(s);
            listener
        });
        let t = std::time::Instant::now();
        assert!(live(addr, 42).is_none());
        assert!(t.elapsed() < std::time::Duration::from_millis(1900), "waited {:?}", t.elapsed());
        silent.join().unwrap();
    }

    /// By the command line alone (a process that did not name itself).
    fn command_of_c(cmdline: &[u8]) -> Option<String> {
        command_of(cmdline, "other\n")
    }

    #[test]
    fn commands_are_found_in_the_command_line() {
        assert_eq!(command_of_c(b"/usr/local/bin/skrelay\0relay\0--listen\0[::1]:1\0"), Some("relay".into()));
        assert_eq!(command_of_c(b"skrelay\0proxy\0--upstream\0x:1\0"), Some("proxy".into()));
        assert_eq!(command_of_c(b"/usr/bin/skrelay\0status\0"), None);
        assert_eq!(command_of_c(b"/usr/bin/python3\0relay\0"), None);
        assert_eq!(command_of_c(b"/opt/skrelay.new\0proxy\0"), Some("proxy".into()));
        assert_eq!(command_of_c(b"target/debug/deps/skrelay-0123456789abcdef\0relay\0"), None, "cargo test relay");
        assert_eq!(command_of_c(b""), None);
        // Any binary name, once the process named itself.
        assert_eq!(command_of(b"/tmp/sk\0proxy\0--upstream\0x:1\0", "skrelay\n"), Some("proxy".into()));
        assert_eq!(command_of(b"/tmp/sk\0status\0", "skrelay\n"), None);
        assert_eq!(command_of(b"/tmp/sk\0proxy\0", "sk\n"), None);
    }

    #[test]
    fn upstream_ports_are_read_in_either_form() {
        let cmdline = b"skrelay\0proxy\0--upstream\0[::1]:8000\0--upstream=db.local:5432\0--listen\x00127.0.0.1:7000\0";
        assert_eq!(upstream_ports(cmdline), vec![8000, 5432]);
        assert_eq!(upstream_ports(b"skrelay\0relay\0--listen\x00127.0.0.1:7000\0"), Vec::<u16>::new());
    }

    #[test]
    fn proc_net_rows_parse() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                  0: 0100007F:1E61 00000000:0000 0A 00000000:0000000C 00:00000000 00000000     0        0 12345 1 0 100 0 0 10 0\n";
        let rows = parse_proc_net(v4);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].local, "127.0.0.1:7777".parse().unwrap());
        assert_eq!((rows[0].state, rows[0].inode, rows[0].rx_queue), (TCP_LISTEN, 12345, 12));
        let v6 = "header\n   0: 00000000000000000000000001000000:1E61 00000000000000000000000000000000:0000 01 \
                  00000000:00000000 00:00000000 00000000     0        0 777 1\n";
        let rows = parse_proc_net(v6);
        assert_eq!(rows[0].local, "[::1]:7777".parse().unwrap());
        assert_eq!((rows[0].state, rows[0].inode), (1, 777));
    }
}
