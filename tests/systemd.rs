//! systemd: socket activation (LISTEN_FDS) under the real `systemd-socket-activate`, the
//! notification protocol (READY=1, STOPPING=1) on a real datagram socket, what skrelay refuses to
//! serve, and `systemd-analyze verify` on contrib/systemd.
#[macro_use]
mod common;
use common::*;
use std::{
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::{
        fd::{AsRawFd, RawFd},
        unix::{net::UnixDatagram, process::CommandExt},
    },
    path::PathBuf,
    process::Command,
    time::Duration,
};

const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/systemd");

/// Fails under CI=true when `tool` is missing (scripts/setup.sh installs it); else skips.
fn require_tool(test: &str, tool: &str) -> bool {
    if Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {tool} is missing under CI=true (scripts/setup.sh installs it)");
    }
    eprintln!("SKIPPED {test}: {tool} is missing (scripts/setup.sh)");
    false
}

/// A datagram socket standing in for systemd's notification socket.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn new(name: &str) -> NotifySocket {
        let path = std::env::temp_dir().join(format!("skrelay-test-{}-{name}.notify", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        NotifySocket { socket, path }
    }

    /// The next message, as text.
    fn recv(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).expect("a notification within 10 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn socket_activation_serves_the_passed_socket_and_notifies_on_both_datapaths(dp: &str) {
    let _netns = enter_netns();
    if !require_tool("socket_activation", "systemd-socket-activate") {
        return;
    }
    const LEN: u64 = 16 << 20;
    let notify = NotifySocket::new(dp);
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args(["-l", "127.0.0.1:7777", "-E", &format!("NOTIFY_SOCKET={}", notify.path.display())])
        .args(["-E", "RUST_LOG=info", SKRELAY, "relay", "--datapath", dp, "--kernel-after", "0"])
        .args(["--metrics", "127.0.0.1:0", "--ports", "7791"])
        // Would be bound without socket activation; with it, nothing listens there.
        .args(["--listen", "127.0.0.1:7788"]);
    // systemd-socket-activate holds the socket and starts skrelay at the first connection.
    let relay = Skrelay::spawn(cmd, "Listening on 127.0.0.1:7777");
    let a = connect("127.0.0.1:7777".parse().unwrap());
    let b = connect("127.0.0.1:7777".parse().unwrap());
    exchange_both_ways(a, b, [1, 2], LEN, dp);
    let log = relay.log();
    assert!(
        log.contains("serving the socket systemd passed (127.0.0.1:7777); --listen 127.0.0.1:7788 is not used"),
        "{log}"
    );
    assert!(log.contains(&format!("listening on 127.0.0.1:7777: pairing clients in arrival order, {dp}")), "{log}");
    assert!(TcpStream::connect("127.0.0.1:7788").is_err(), "--listen was bound too");
    // status named the metrics socket as the --ports target (the first listening socket found).
    let status = skrelay_ok(&["status"]);
    assert!(status.contains("1 port (7791) on 127.0.0.1/32 -> 127.0.0.1:7777"), "{dp}:\n{status}");
    let ready = notify.recv();
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(ready.contains("STATUS=listening on 127.0.0.1:7777"), "{ready:?}");
    // The exec'd skrelay keeps systemd-socket-activate's pid: SIGTERM reaches skrelay.
    let m = relay.wait_pairs_ended(1, Duration::from_secs(10));
    assert_eq!(m.pairs(dp, "eof"), 1, "{dp}: the pair ended with EOF both ways:\n{}", m.text);
    assert_eq!(m.bytes(dp), 2 * LEN, "{dp}: every byte counted once:\n{}", m.text);
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(notify.recv().starts_with("STOPPING=1\n"), "{dp}");
    assert!(status.success(), "{dp}: {status}\n{log}");
}

per_datapath!(socket_activation_serves_the_passed_socket_and_notifies_on_both_datapaths);

/// The client whose connection starts a socket-activated relay waits in the accept queue before
/// skrelay sets the listener's options, which only sockets accepted later inherit: it read a clean
/// EOF where a reset was due, when the relay was killed and at the pair timeout (a re-check pass).
fn the_client_that_starts_a_socket_activated_relay_is_reset_as_any_other(dp: &str) {
    let _netns = enter_netns();
    if !require_tool("socket_activation", "systemd-socket-activate") {
        return;
    }
    let addr: SocketAddr = "127.0.0.1:7777".parse().unwrap();
    let expect_reset = |s: &mut TcpStream, what: &str| {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let r = std::io::Read::read(s, &mut [0u8; 1]);
        assert!(matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset), "{dp}: {what}: {r:?}");
    };
    let activated = |extra: &[&str]| {
        let mut cmd = Command::new("systemd-socket-activate");
        cmd.args(["-l", "127.0.0.1:7777", SKRELAY, "relay", "--datapath", dp]).args(extra);
        Skrelay::spawn(cmd, "Listening on 127.0.0.1:7777")
    };
    // Killed with a pair live.
    let mut relay = activated(&[]);
    let mut first = connect(addr);
    relay.wait_log("listening on 127.0.0.1:7777", 1, Duration::from_secs(10));
    let mut second = connect(addr);
    std::io::Write::write_all(&mut first, b"x").unwrap();
    assert_eq!(read_n(&mut second, 1), b"x", "{dp}");
    relay.child.kill().unwrap();
    relay.wait(Duration::from_secs(5));
    expect_reset(&mut first, "the first client, its relay killed");
    expect_reset(&mut second, "the second client, its relay killed");
    // Alone until --pair-timeout.
    let relay = activated(&["--pair-timeout", "0.5"]);
    let mut first = connect(addr);
    relay.wait_log("no partner came within --pair-timeout", 1, Duration::from_secs(10));
    expect_reset(&mut first, "the first client, at the pair timeout");
}

per_datapath!(the_client_that_starts_a_socket_activated_relay_is_reset_as_any_other);

/// Runs skrelay with `fd` as descriptor 3 and LISTEN_FDS=`n`, LISTEN_PID naming it:
/// (exit code, stderr).
fn run_with_fd3(fd: Option<RawFd>, n: &str, args: &[&str]) -> (i32, String) {
    let mut cmd = Command::new("sh");
    // $$ is the shell's pid, which exec hands to skrelay.
    cmd.args(["-c", &format!("LISTEN_PID=$$ LISTEN_FDS={n} exec \"$0\" \"$@\""), SKRELAY]).args(args);
    if let Some(fd) = fd {
        // SAFETY: between fork and exec only async-signal-safe calls: dup2 and fcntl on integers.
        unsafe {
            cmd.pre_exec(move || {
                if fd == 3 {
                    let flags = libc::fcntl(3, libc::F_GETFD);
                    libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                } else if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().expect("run sh");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn sockets_skrelay_cannot_serve_are_refused_with_the_fix() {
    let _netns = enter_netns();
    let refused = |fd: Option<RawFd>, n: &str, expect: &str| {
        for cmd in [
            &["relay", "--datapath", "userspace"][..],
            &["proxy", "--datapath", "userspace", "--upstream", "127.0.0.1:9"],
        ] {
            let (code, err) = run_with_fd3(fd, n, cmd);
            assert_eq!(code, 2, "{cmd:?} LISTEN_FDS={n}: exit {code}: {err}");
            assert!(err.contains(expect), "{cmd:?} LISTEN_FDS={n}: stderr lacks `{expect}`:\n{err}");
            assert_eq!(err.lines().count(), 1, "one sentence: {err}");
            assert!(!err.contains("listening on"), "{err}");
        }
    };
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    refused(Some(udp.as_raw_fd()), "1", "cannot serve the socket systemd passed (fd 3): it is not a TCP socket");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let conn = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    refused(Some(conn.as_raw_fd()), "1", "it is not listening (a connection, or a socket only bound");
    let file = std::fs::File::open("/dev/null").unwrap();
    refused(Some(file.as_raw_fd()), "1", "it is not a socket");
    let unix_path = std::env::temp_dir().join(format!("skrelay-test-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&unix_path);
    let unix = std::os::unix::net::UnixListener::bind(&unix_path).unwrap();
    refused(Some(unix.as_raw_fd()), "1", "it is not an IP socket");
    let _ = std::fs::remove_file(&unix_path);
    refused(None, "1", "cannot serve the socket systemd passed (fd 3): Bad file descriptor");
    refused(Some(listener.as_raw_fd()), "2", "there are 2 (LISTEN_FDS=2) and skrelay serves one");
    refused(Some(listener.as_raw_fd()), "x", "LISTEN_FDS=`x` is not a number");
    // Nothing was bound in their place.
    assert!(TcpStream::connect("127.0.0.1:7777").is_err());
}

#[test]
fn sockets_passed_to_another_process_are_not_taken() {
    let _netns = enter_netns();
    let mut cmd = Command::new(SKRELAY);
    cmd.args(["relay", "--datapath", "userspace"]).env("LISTEN_FDS", "1").env("LISTEN_PID", "1");
    let relay = Skrelay::spawn(cmd, "listening on 127.0.0.1:7777");
    assert!(relay.log().contains("LISTEN_PID (1) is not this process"), "{}", relay.log());
    let addr: SocketAddr = "127.0.0.1:7777".parse().unwrap();
    let (a, b) = (connect(addr), connect(addr));
    exchange_both_ways(a, b, [1, 2], 100_000, "through the passed socket");
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

#[test]
fn systemd_analyze_verify_accepts_the_units() {
    if !require_tool("systemd_analyze_verify_accepts_the_units", "systemd-analyze") {
        return;
    }
    // verify checks that ExecStart= exists: point it at the binary under test.
    let dir = std::env::temp_dir().join(format!("skrelay-test-{}-units", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut units = Vec::new();
    for name in ["skrelay-relay.socket", "skrelay-relay.service", "skrelay-proxy.socket", "skrelay-proxy.service"] {
        let text = std::fs::read_to_string(format!("{UNITS}/{name}")).unwrap_or_else(|e| panic!("{name}: {e}"));
        let path = dir.join(name);
        std::fs::write(&path, text.replace("/usr/local/bin/skrelay", SKRELAY)).unwrap();
        units.push(path);
    }
    let out = Command::new("systemd-analyze").arg("verify").args(&units).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success() && err.trim().is_empty(), "systemd-analyze verify: {}\n{err}", out.status);
    // Each service is Type=notify and started by its socket.
    for svc in ["relay", "proxy"] {
        let text = std::fs::read_to_string(format!("{UNITS}/skrelay-{svc}.service")).unwrap();
        assert!(text.contains("\nType=notify\n"), "{svc}");
        assert!(text.contains(&format!("\nRequires=skrelay-{svc}.socket\n")), "{svc}");
        assert!(text.contains(&format!("ExecStart=/usr/local/bin/skrelay {svc} ")), "{svc}");
    }
}

/// SIGQUIT closes the live pairs at once: the STOPPING status said "draining" (an operator's
/// pass, 2026-12-08).
#[test]
fn sigquit_tells_systemd_it_closes_the_pairs_rather_than_drains_them() {
    let _netns = enter_netns();
    let notify = NotifySocket::new("sigquit");
    let mut cmd = Command::new(SKRELAY);
    cmd.env("NOTIFY_SOCKET", &notify.path).args(["relay", "--datapath", "userspace", "--listen", "127.0.0.1:7795"]);
    let mut relay = Skrelay::spawn(cmd, "listening on");
    assert!(notify.recv().starts_with("READY=1\n"));
    let (_a, _b) = (connect("127.0.0.1:7795".parse().unwrap()), connect("127.0.0.1:7795".parse().unwrap()));
    std::thread::sleep(Duration::from_millis(200)); // paired
    relay.signal(libc::SIGQUIT);
    let stopping = notify.recv();
    assert!(stopping.starts_with("STOPPING=1\nSTATUS=closing 1 live pair(s) now"), "{stopping:?}");
    relay.wait(Duration::from_secs(5));
}
