//! `skrelay accel`: sockops + sk_msg acceleration of one cgroup's loopback TCP. Each test runs in
//! its own network namespace and its own cgroup; the peers are tests/accel_peer.py processes
//! started in the cgroup by `skrelay accel run --cgroup` (so they join before creating sockets),
//! or outside it. Payloads are checked by sha256; the counters prove which path the bytes took.
//! The peers read with poll and non-blocking `recv`, as event loops do; only
//! `a_blocked_recv_survives_its_own_half_close` uses a blocking `recv` (README, accel limitation).
mod common;

use common::*;
use skrelay::accel::{report_cgroup, AccelReport};
use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/accel_peer.py");
const MIB: u64 = 1 << 20;

/// A private cgroup, accelerated by `skrelay accel on`; turned off and removed on drop.
struct TestCgroup {
    rel: String,
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// One test at a time: on 2 CPUs, parallel peers delay the accepted end's join long enough for
/// connecting ends to send first, which the programs then leave unaccelerated (see README).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl TestCgroup {
    /// With `--small-write 64K` unless `extra` names it: the policy these tests were written for,
    /// the same on every machine (the default is measured: `the_default_small_write_is_measured...`).
    fn accelerated(name: &str, extra: &[&str]) -> TestCgroup {
        let cg = TestCgroup::unaccelerated(name);
        let mut args = vec!["accel", "on", "--cgroup", &cg.rel];
        args.extend_from_slice(extra);
        if !extra.contains(&"--small-write") {
            args.extend_from_slice(&["--small-write", "64K"]);
        }
        let (code, out, err) = skrelay_output(&args);
        assert_eq!(code, 0, "accel on failed: {out}{err}");
        cg
    }

    fn unaccelerated(name: &str) -> TestCgroup {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        TestCgroup { rel: format!("skrelay-test-{}-{name}", std::process::id()), _serial: serial }
    }

    fn path(&self) -> PathBuf {
        cgroup_v2_mount().join(&self.rel)
    }

    /// `skrelay accel run --cgroup THIS -- python3 accel_peer.py ARGS`.
    fn peer(&self, args: &[&str]) -> Command {
        let mut c = Command::new(SKRELAY);
        c.args(["accel", "run", "--cgroup", &self.rel, "--", "python3", PEER]).args(args);
        c
    }

    /// The peer in this cgroup without `accel run`, which refuses a cgroup that is draining.
    fn inside(&self, args: &[&str]) -> Command {
        let mut c = Command::new("sh");
        let procs = self.path().join("cgroup.procs");
        c.args(["-c", "echo $$ > \"$0\" && exec python3 \"$@\"", &procs.to_string_lossy(), PEER]).args(args);
        c
    }

    fn report(&self) -> AccelReport {
        report_cgroup(&self.path()).expect("accel report")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = skrelay_output(&["accel", "off", "--cgroup", &self.rel, "--force"]);
        for _ in 0..100 {
            if std::fs::remove_dir(self.path()).is_ok() || !self.path().exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A client sends 100,000 bytes through the proxy on `port` to a fresh server on `up`, which
/// answers; both directions must arrive whole.
fn served_through_proxy(port: u16, up: u16) {
    let (mut server, mut server_out) = start_server(plain_peer(&["serve", "127.0.0.1", &up.to_string()]));
    let client = output(plain_peer(&["connect", "127.0.0.1", &port.to_string(), "100000"]));
    let mut server_text = String::new();
    std::io::Read::read_to_string(&mut server_out, &mut server_text).unwrap();
    assert!(server.wait().unwrap().success(), "{server_text}");
    assert_eq!(field(&client, "sent"), field(&server_text, "received"), "client -> upstream damaged");
    assert_eq!(field(&server_text, "sent"), field(&client, "received"), "upstream -> client damaged");
}

/// A new client of the proxy at `listen` is reset (seen by its write or by its read).
fn a_new_client_is_reset(listen: &str, what: &str, proxy: &Skrelay) {
    let mut client = std::net::TcpStream::connect(listen).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let got = send_then_read(&mut client, &8u64.to_le_bytes());
    assert!(
        matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{what}: {got:?}\n{}",
        proxy.log()
    );
}

/// `accel on` for cgroup `rel` from another network namespace, whose `accel on` does not see a
/// relay or proxy of this one inside (and so does not refuse).
fn accel_on_unseen(rel: &str) {
    let on = Command::new("unshare")
        .args(["-n", SKRELAY, "accel", "on", "--cgroup", rel, "--small-write", "64K"])
        .output()
        .unwrap();
    assert!(on.status.success(), "{}", String::from_utf8_lossy(&on.stderr));
}

/// The same peer, outside any test cgroup.
fn plain_peer(args: &[&str]) -> Command {
    let mut c = Command::new("python3");
    c.arg(PEER).args(args);
    c
}

fn output(mut c: Command) -> String {
    let out = c.output().expect("run peer");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "peer {c:?} failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

/// The value after `key ` on its line.
fn field<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no `{key}` in peer output:\n{text}"))
}

/// A server peer waiting for one connection on `host:port`.
fn start_server(mut c: Command) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = c.stdout(Stdio::piped()).spawn().expect("spawn server peer");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening", "server peer did not start");
    (child, out)
}

/// Runs a server and a client peer exchanging `bytes` each way; asserts both streams arrived
/// intact (same length and sha256 on both ends).
fn exchange(server: Command, client: Command, bytes: u64) {
    let (mut srv, mut srv_out) = start_server(server);
    let client_out = output(client);
    let mut server_text = String::new();
    std::io::Read::read_to_string(&mut srv_out, &mut server_text).unwrap();
    assert!(srv.wait().unwrap().success(), "server peer failed:\n{server_text}");
    let expect = |s: &str| assert!(s.starts_with(&format!("{bytes} ")), "wrong length: {s}");
    expect(field(&client_out, "sent"));
    expect(field(&server_text, "sent"));
    assert_eq!(field(&client_out, "sent"), field(&server_text, "received"), "client -> server stream damaged");
    assert_eq!(field(&server_text, "sent"), field(&client_out, "received"), "server -> client stream damaged");
}

/// The redirect and the TCP path together counted `total` bytes, unless a socket left the map
/// or fell back (its peer closed or left first: those sends are plain TCP, counted as messages,
/// not bytes); something always took the redirect.
fn assert_counted(r: &AccelReport, total: u64) {
    assert!(r.bytes > 0, "nothing took the redirect: {r}");
    if r.left == 0 && r.fallbacks == 0 {
        assert_eq!(r.bytes + r.passed_bytes, total, "{r}");
    } else {
        assert!(r.bytes + r.passed_bytes <= total, "{r}");
    }
}

fn serve_args(host: &str, port: u16) -> Vec<String> {
    vec!["serve".into(), host.into(), port.to_string()]
}

fn connect_args(host: &str, port: u16, bytes: u64) -> Vec<String> {
    vec!["connect".into(), host.into(), port.to_string(), bytes.to_string()]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn two_processes_exchange_256_mib_each_way_through_the_redirect() {
    if !require_bpf("two_processes_exchange_256_mib_each_way_through_the_redirect") {
        return;
    }
    let _netns = enter_netns();
    let cg = TestCgroup::accelerated("bulk", &[]);
    let port = free_port();
    let bytes = 256 * MIB;
    exchange(
        cg.peer(&strs(&serve_args("127.0.0.1", port))),
        cg.peer(&strs(&connect_args("127.0.0.1", port, bytes))),
        bytes,
    );
    let r = cg.report();
    assert_eq!(r.connections, 1, "{r}");
    assert_eq!(r.sockets_joined, 2, "{r}");
    // The live-sockets gauge (what tells a paused direction how crowded the cgroup is) comes back
    // to zero once both sockets closed (the last one's TCP_CLOSE may come a moment later).
    let deadline = Instant::now() + Duration::from_secs(2);
    while cg.report().sockets_live != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(cg.report().sockets_live, 0, "{}", cg.report());
    // Both streams plus the client's 8-byte length header went through the redirect, or through
    // TCP while a reader held its queue limit; a socket that left the map is no longer counted.
    assert_counted(&r, 2 * bytes + 8);
    assert!(r.messages > 0 && r.insert_busy == 0 && r.insert_failed == 0, "{r}");
}

#[test]
fn ipv6_and_v4_mapped_connections_are_redirected() {
    if !require_bpf("ipv6_and_v4_mapped_connections_are_redirected") {
        return;
    }
    let _netns = enter_netns();
    let cg = TestCgroup::accelerated("families", &[]);
    let bytes = 8 * MIB;
    // (server address, client address): IPv6; AF_INET6 server on a v4-mapped address with an
    // AF_INET client; AF_INET server with an AF_INET6 client dialling the v4-mapped address.
    let cases = [("::1", "::1"), ("::ffff:127.0.0.1", "127.0.0.1"), ("127.0.0.1", "::ffff:127.0.0.1")];
    for (i, (server, client)) in cases.into_iter().enumerate() {
        let port = free_port();
        exchange(cg.peer(&strs(&serve_args(server, port))), cg.peer(&strs(&connect_args(client, port, bytes))), bytes);
        let r = cg.report();
        assert_eq!(r.connections, i as u64 + 1, "{server} <- {client}: {r}");
        assert!(r.bytes > 0, "{server} <- {client}: nothing redirected: {r}");
    }
}

#[test]
fn a_peer_outside_the_cgroup_takes_the_normal_path() {
    if !require_bpf("a_peer_outside_the_cgroup_takes_the_normal_path") {
        return;
    }
    let _netns = enter_netns();
    let cg = TestCgroup::accelerated("outside", &[]);
    let bytes = 16 * MIB;
    // A client outside talking to a server inside, then a client inside talking to a server
    // outside: neither end joins (a socket whose peer cannot join stays out of the map), so the
    // bytes take the normal path.
    let port = free_port();
    exchange(
        cg.peer(&strs(&serve_args("127.0.0.1", port))),
        plain_peer(&strs(&connect_args("127.0.0.1", port, bytes))),
        bytes,
    );
    let port = free_port();
    exchange(
        plain_peer(&strs(&serve_args("127.0.0.1", port))),
        cg.peer(&strs(&connect_args("127.0.0.1", port, bytes))),
        bytes,
    );
    let r = cg.report();
    assert_eq!((r.sockets_joined, r.connections, r.messages, r.bytes, r.fallbacks), (0, 0, 0, 0, 0), "{r}");
}

#[test]
fn half_close_behaves_as_without_acceleration() {
    if !require_bpf("half_close_behaves_as_without_acceleration") {
        return;
    }
    let _netns = enter_netns();
    let cg = TestCgroup::accelerated("halfclose", &[]);
    let plain = output(plain_peer(&["halfclose", "127.0.0.1"]));
    let accel = output(cg.peer(&["halfclose", "127.0.0.1"]));
    assert_eq!(field(&accel, "request"), "8000");
    assert_eq!(accel, plain, "half-close differs with acceleration");
    let r = cg.report();
    assert_eq!(r.connections, 1, "{r}");
    assert!(r.bytes >= 8000, "the request did not go through the redirect: {r}");
}

#[test]
fn reset_behaves_as_without_acceleration() {
    if !require_bpf("reset_behaves_as_without_acceleration") {
        return;
    }
    let _netns = enter_netns();
    let cg = TestCgroup::accelerated("reset", &[]);
    let plain = output(plain_peer(&["reset", "127.0.0.1"]));
    let accel = output(cg.peer(&["reset", "127.0.0.1"]));
    // Bytes queued before the RST are read, then the reset is reported, then sending fails.
    // How many bytes were already at the receiver when the RST came is timing (plain TCP drops
    // what is still in the sender's buffer); the redirect delivers on send, so all of them.
    for key in ["outcome", "send"] {
        assert_eq!(field(&accel, key), field(&plain, key), "{key}: plain\n{plain}\naccel\n{accel}");
    }
    assert_eq!(field(&accel, "outcome"), "ConnectionResetError");
    let got: u64 = field(&accel, "before-error").parse().unwrap();
    assert!(got <= MIB, "{accel}");
    let r = cg.report();
    assert_eq!(r.connections, 1, "{r}");
    // The client's megabyte took the redirect or (a 512 KiB message above a fresh reader's limit)
    // the TCP path.
    assert!(r.bytes + r.passed_bytes <= MIB, "{r}");
}

#[test]
fn off_with_live_connections_loses_nothing() {
    if !require_bpf("off_with_live_connections_loses_nothing") {
        return;
    }
    let _netns = enter_netns();
    let cg = TestCgroup::accelerated("off", &[]);
    let bytes = 32 * MIB;
    let mut child = cg
        .peer(&["pause", "127.0.0.1", &bytes.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("ready "), "{line}");
    let r = cg.report();
    // A socket whose reader blocks may have left the map already (its sends take plain TCP).
    assert_eq!(r.sockets_open + r.left, 2, "{r}");
    assert_eq!(r.sockets_live, 2, "both ends of the open connection are live: {r}");
    assert!(r.bytes > 0, "unread bytes should be queued at the peers: {r}");

    // Plain `off` refuses while accelerated connections are open, but stops new ones joining.
    let (code, _, err) = skrelay_output(&["accel", "off", "--cgroup", &cg.rel]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("sockets of open connections still use the fast path"), "{err}");
    let r = cg.report();
    assert!(!r.attached, "{r}");
    // Draining, status says only what the map holds, not a "live" count (which stayed stale
    // when `off` detached sockops, as it still does for state an older skrelay pinned).
    let text = r.to_string();
    assert!(!text.contains("of them live") && text.contains("in the map now"), "{text}");
    output(cg.inside(&["halfclose", "127.0.0.1"]));
    assert_eq!(cg.report().sockets_joined, 2, "a connection joined after off");

    // --force removes the state with half of each stream still unread at the peers.
    let (code, outp, err) = skrelay_output(&["accel", "off", "--cgroup", &cg.rel, "--force"]);
    assert_eq!(code, 0, "{outp}{err}");
    assert!(report_cgroup(&cg.path()).is_err(), "state still pinned after off --force");

    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut out, &mut text).unwrap();
    assert!(child.wait().unwrap().success(), "{text}");
    let sent_c = field(&text, "client sent");
    assert!(sent_c.starts_with(&format!("{bytes} ")), "{text}");
    assert_eq!(sent_c, field(&text, "server received"), "client -> server damaged across off:\n{text}");
    assert_eq!(field(&text, "server sent"), field(&text, "client received"), "server -> client damaged:\n{text}");
}

#[test]
fn ports_limit_which_connections_join() {
    if !require_bpf("ports_limit_which_connections_join") {
        return;
    }
    let _netns = enter_netns();
    let port = free_port();
    let cg = TestCgroup::accelerated("ports", &["--ports", &format!("1,{port}")]);
    assert_eq!(cg.report().ports, vec![1, port]);
    output(cg.peer(&["halfclose", "127.0.0.1"])); // an ephemeral port: not listed
    assert_eq!(cg.report().sockets_joined, 0);
    exchange(
        cg.peer(&strs(&serve_args("127.0.0.1", port))),
        cg.peer(&strs(&connect_args("127.0.0.1", port, MIB))),
        MIB,
    );
    let r = cg.report();
    assert_eq!(r.connections, 1, "{r}");
    assert_counted(&r, 2 * MIB + 8);
}

#[test]
fn bad_input_exits_2_and_leaves_nothing() {
    if !require_bpf("bad_input_exits_2_and_leaves_nothing") {
        return;
    }
    let pins = std::path::Path::new("/sys/fs/bpf/skrelay/accel");
    let (code, _, err) = skrelay_output(&["accel", "on", "--cgroup", "/tmp/not-a-cgroup"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not a cgroup v2 directory"), "{err}");
    // A cgroup's file, not its directory: said so, with the path as the user gave it.
    let file = cgroup_v2_mount().join("cgroup.procs");
    let (code, _, err) = skrelay_output(&["accel", "on", "--cgroup", file.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("{} is not a cgroup v2 directory: it is not a directory", file.display())), "{err}");
    assert!(!err.contains("/proc/"), "{err}");
    let (code, _, err) = skrelay_output(&["accel", "on", "--cgroup", file.join("below").to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("{} is a file", file.display())), "{err}");

    let cg = TestCgroup::unaccelerated("badinput");
    let (code, _, err) = skrelay_output(&["accel", "off", "--cgroup", &cg.rel]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not accelerated"), "{err}");
    let (code, _, err) = skrelay_output(&["accel", "on", "--cgroup", &cg.rel, "--ports", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(!cg.path().exists(), "a refused `on` created the cgroup");
    // 1,025 distinct ports pass the map's 1,024; 1,024 and a repeat do not (they were refused as
    // 1,025: a scale pass). The latter fails on the missing cgroup instead, past the count.
    let ports = |n: u16, repeat: bool| {
        let mut list: Vec<String> = (20_000..20_000 + n).map(|p| p.to_string()).collect();
        if repeat {
            list.push("20000".into());
        }
        list.join(",")
    };
    let (code, _, err) =
        skrelay_output(&["accel", "on", "--cgroup", "/tmp/not-a-cgroup", "--ports", &ports(1025, false)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--ports lists 1025 ports; at most 1024 are supported (accelerate the whole cgroup"), "{err}");
    let (code, _, err) =
        skrelay_output(&["accel", "on", "--cgroup", "/tmp/not-a-cgroup", "--ports", &ports(1024, true)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not a cgroup v2 directory"), "{err}");
    // A command that cannot run is refused before the set-up (it measured and set up for half a
    // second, then said so).
    let started = std::time::Instant::now();
    let (code, _, err) = skrelay_output(&["accel", "run", "--cgroup", &cg.rel, "--", "/no/such/command"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot run `/no/such/command`: no such file"), "{err}");
    assert!(started.elapsed() < Duration::from_millis(300), "refused after {:?}", started.elapsed());
    assert!(!cg.path().exists(), "a refused `run` created the cgroup");
    // A file that exists but cannot run was called "command not found" too.
    for (program, why) in [
        ("/etc/passwd", "not executable (no x permission: chmod +x)"),
        ("/etc", "it is a directory"),
        ("no-such-command-anywhere", "command not found"),
    ] {
        let (code, _, err) = skrelay_output(&["accel", "run", "--cgroup", &cg.rel, "--", program]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(&format!("cannot run `{program}`: {why}")), "{err}");
        assert!(!cg.path().exists(), "a refused `run` created the cgroup");
    }

    drop(cg);
    let cg = TestCgroup::accelerated("badinput", &[]);
    let (code, _, err) = skrelay_output(&["accel", "on", "--cgroup", &cg.rel]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("already accelerated"), "{err}");
    // A cgroup inside an accelerated one: its sockets would need two sk_msg programs.
    let child = format!("{}/inner", cg.rel);
    let (code, _, err) = skrelay_output(&["accel", "on", "--cgroup", &child]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("lies inside cgroup"), "{err}");
    assert!(!cg.path().join("inner").exists(), "a refused `on` left its cgroup behind");
    assert!(!pins.join(format!("%2F{}%2Finner", cg.rel)).exists());
}

#[test]
fn run_without_a_cgroup_cleans_up_after_the_command() {
    if !require_bpf("run_without_a_cgroup_cleans_up_after_the_command") {
        return;
    }
    let _netns = enter_netns();
    let out =
        Command::new(SKRELAY).args(["accel", "run", "--", "python3", PEER, "halfclose", "127.0.0.1"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = String::from_utf8_lossy(&out.stderr);
    let cgroup = log
        .split_whitespace()
        .find(|w| w.contains("skrelay-run-"))
        .unwrap_or_else(|| panic!("run did not name its cgroup:\n{log}"));
    assert!(!std::path::Path::new(cgroup).exists(), "{cgroup} left behind");
    let name = cgroup.rsplit('/').next().unwrap();
    assert!(!std::path::Path::new("/sys/fs/bpf/skrelay/accel").join(format!("%2F{name}")).exists());
    // The command's exit status is passed on.
    let st = Command::new(SKRELAY).args(["accel", "run", "--", "sh", "-c", "exit 7"]).status().unwrap();
    assert_eq!(st.code(), Some(7));
}

/// Ten request/response rounds between an rpc server and client in the cgroup; the client
/// half-closes after its last request and then waits for the reply. `mode` is "" (a blocking
/// `recv`) or "poll" (poll, then a non-blocking `recv`).
fn rpc_with_half_close(name: &str, mode: &str) {
    let _netns = enter_netns();
    let port = free_port();
    let p = port.to_string();
    let cg = TestCgroup::accelerated(name, &[]);
    let (mut srv, _out) = start_server(cg.peer(&["rpc-serve", "127.0.0.1", &p, "10"]));
    let mut args = vec!["rpc-connect", "127.0.0.1", &p, "10"];
    if !mode.is_empty() {
        args.push(mode);
    }
    let client = output(cg.peer(&args));
    assert!(srv.wait().unwrap().success(), "rpc server failed");
    assert_eq!(field(&client, "rpc"), "ok", "{}", cg.report());
    let r = cg.report();
    assert_eq!(r.connections, 1, "the rpc connection was not accelerated: {r}");
    // The client leaves the map when it sends its FIN (so the reply it then waits for may take
    // plain TCP); everything before went through the redirect.
    assert!(
        r.bytes == 2 * 10 * 8 || r.bytes == 2 * 10 * 8 - 8,
        "not every request and reply went through the redirect: {r}"
    );
    assert!(r.left >= 1, "the half-closed socket did not leave the map: {r}");
    // Small requests to a reader that waits for them stay on the redirect.
    assert_eq!(r.demoted_small, 0, "request/response was taken for a small-write stream: {r}");
}

/// A client that half-closes after its last request and blocks in `recv` for the reply: the ACK
/// of its FIN (FIN_WAIT1 -> FIN_WAIT2) wakes the blocked reader without data. Plain TCP keeps
/// waiting; on 6.18 `tcp_bpf_recvmsg` returns EAGAIN after a wake-up without data while the
/// socket is in the SOCKHASH. The sockops program takes a socket out of the map when it sends
/// its FIN (probes/accel.bpf.c, try_leave), so the wait happens in plain `tcp_recvmsg`. What can
/// still fail (README): a reader already blocked in recv when its own FIN goes out (another
/// thread calls shutdown), or a leave that must wait for the peer's sendmsg.
#[test]
fn a_blocked_recv_survives_its_own_half_close() {
    if !require_bpf("a_blocked_recv_survives_its_own_half_close") {
        return;
    }
    rpc_with_half_close("rpc-blocking", "");
}

/// Socket options whose work the redirect would skip (a new-user pass): MSG_ZEROCOPY's
/// completions (a sender that waited for them hung), receive timestamps, SO_RCVLOWAT (poll woke
/// for 1,000 bytes under a 50,000 low mark). A connection with one set takes TCP from then on,
/// so each answers as on plain loopback, also when set after the connection joined.
#[test]
fn socket_options_the_redirect_would_skip_answer_as_on_plain_tcp() {
    if !require_bpf("socket_options_the_redirect_would_skip_answer_as_on_plain_tcp") {
        return;
    }
    let _netns = enter_netns();
    let plain = output(plain_peer(&["options", "127.0.0.1"]));
    assert_eq!(field(&plain, "zerocopy"), "16", "{plain}");
    assert_eq!(field(&plain, "rx-stamp"), "yes", "{plain}");
    assert_eq!(field(&plain, "rcvlowat"), "no 61000", "{plain}");
    let cg = TestCgroup::accelerated("options", &[]);
    let out = output(cg.peer(&["options", "127.0.0.1"]));
    let r = cg.report();
    for key in ["zerocopy", "rx-stamp", "rcvlowat"] {
        assert_eq!(field(&out, key), field(&plain, key), "{key} under accel:\n{out}\n{r}");
    }
    assert_eq!(r.connections, 3, "the connections were accelerated until the option was seen: {r}");
    assert!(r.races_lost >= 3, "each connection left the redirect for its option: {r}");
}

/// HTTP/1.0 style: the client sends its request, half-closes and reads the reply with blocking
/// recv(2) to EOF; the server reads the request to EOF with blocking recv(2), so it is blocked
/// there, holding its psock, when the client's FIN goes out. The client's leave at its FIN took
/// that reference for a sendmsg in progress and waited, the client's recv blocked inside
/// tcp_bpf_recvmsg, and the FIN's ACK woke it without data: EAGAIN in 30 of 30 exchanges (a
/// new-user pass). The sockops program now counts the peer's threads blocked in recvmsg
/// (wait-queue entries of woken_wake_function) as holders too. What remains: a peer's reader
/// caught between its wake-up and its next wait (about 1 exchange in 75 here).
#[test]
fn a_client_reading_to_eof_after_half_close_meets_a_server_blocked_in_recv() {
    if !require_bpf("a_client_reading_to_eof_after_half_close_meets_a_server_blocked_in_recv") {
        return;
    }
    let _netns = enter_netns();
    let cg = TestCgroup::accelerated("request-eof", &[]);
    let out = output(cg.peer(&["request-eof", "127.0.0.1", "20"]));
    let r = cg.report();
    let counts: Vec<u32> = field(&out, "request-eof").split(' ').take(2).map(|n| n.parse().unwrap()).collect();
    assert!(r.connections >= 20, "the exchanges were not accelerated: {r}");
    assert!(counts[0] >= 17, "{} of {} exchanges got their whole reply: {out}\n{r}", counts[0], counts[1]);
}

/// `accel off` with connections open leaves them the fast path, and the half-close handling
/// with it: `off` detached sockops, so a socket that half-closed stayed in the map and the
/// client's blocking read to EOF got EAGAIN (20 of 20 after `off`, 0 without; a helper's pass).
/// Now `off` sets the draining flag, which the sockops program reads before it lets a new
/// connection join, and sockops stays until the state is removed.
#[test]
fn connections_left_open_by_off_keep_their_half_close_handling() {
    if !require_bpf("connections_left_open_by_off_keep_their_half_close_handling") {
        return;
    }
    let _netns = enter_netns();
    let cg = TestCgroup::accelerated("off-halfclose", &[]);
    let mut child = cg
        .peer(&["request-eof-later", "127.0.0.1", "20"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let r = cg.report();
    assert_eq!(r.connections, 20, "the connections were not accelerated: {r}");
    let (code, _, err) = skrelay_output(&["accel", "off", "--cgroup", &cg.rel]);
    assert_eq!(code, 2, "{err}");
    assert!(!cg.report().attached, "status does not say draining");
    // Nothing new is accelerated there until `off` removes the state: `on` and `run` say so.
    for args in [vec!["accel", "on", "--cgroup", &cg.rel], vec!["accel", "run", "--cgroup", &cg.rel, "--", "true"]] {
        let (code, _, err) = skrelay_output(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("is draining after `skrelay accel off` (40 sockets"), "{args:?}: {err}");
    }
    // Nor a cgroup inside it, which is told what the drain waits for, not to run `off` again.
    let sub = cg.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let (code, _, err) = skrelay_output(&["accel", "on", "--cgroup", &format!("{}/sub", cg.rel)]);
    std::fs::remove_dir(&sub).unwrap();
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("(that one is draining after `skrelay accel off` (40 sockets"), "{err}");
    // A connection made while draining does not join.
    output(cg.inside(&["halfclose", "127.0.0.1"]));
    assert_eq!(cg.report().connections, 20, "a connection joined after off");
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut out, &mut text).unwrap();
    assert!(child.wait().unwrap().success(), "{text}");
    let counts: Vec<u32> = field(&text, "request-eof").split(' ').take(2).map(|n| n.parse().unwrap()).collect();
    assert!(counts[0] >= 17, "{} of {} exchanges after off got their whole reply: {text}", counts[0], counts[1]);
    // They are closed: `status` and `on` say a plain `off` finishes the drain, and it does.
    let text = cg.report().to_string();
    assert!(text.contains("draining, and its connections have closed (`skrelay accel off --cgroup"), "{text}");
    let (code, _, err) = skrelay_output(&["accel", "on", "--cgroup", &cg.rel]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is draining after `skrelay accel off`, and its connections have closed"), "{err}");
    let (code, outp, err) = skrelay_output(&["accel", "off", "--cgroup", &cg.rel, "--wait", "5"]);
    assert_eq!(code, 0, "{outp}{err}");
    assert!(report_cgroup(&cg.path()).is_err(), "state still pinned after off");
}

/// The same exchange read the way event loops read (poll, then a non-blocking `recv`, retrying
/// EAGAIN): the empty wake-up costs one retry and the application never sees it.
#[test]
fn an_event_loop_reader_survives_its_own_half_close() {
    if !require_bpf("an_event_loop_reader_survives_its_own_half_close") {
        return;
    }
    rpc_with_half_close("rpc-poll", "poll");
}

fn sysctl_max(path: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.split_whitespace().last().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{path}: {text}"))
}

/// A reader that stops for 10 s while its peer sends as fast as it can: without a bound the
/// redirect queued the whole stream in the reader's psock (2 GB seen, host memory falling by
/// ~230 MiB/s). Now the connection holds what TCP would plus the queue limit: the sender is held
/// back, and when the reader resumes it gets every byte once, in order.
#[test]
fn a_reader_that_stops_holds_back_its_sender_within_the_bound() {
    if !require_bpf("a_reader_that_stops_holds_back_its_sender_within_the_bound") {
        return;
    }
    let _netns = enter_netns();
    let cg = TestCgroup::accelerated("stall", &[]);
    let total = 1024 * MIB;
    let out = output(cg.peer(&["stall", "127.0.0.1", &total.to_string(), "10"]));
    assert_eq!(field(&out, "sent"), field(&out, "received"), "stream damaged after the stall:\n{out}");
    assert!(field(&out, "sent").starts_with(&format!("{total} ")), "{out}");
    // The documented bound (README): the queue limit (8 MiB by default), plus what TCP itself
    // allows: the sender's and the receiver's socket buffers at their autotuning maximum.
    let bound = 8 * MIB + sysctl_max("/proc/sys/net/ipv4/tcp_wmem") + sysctl_max("/proc/sys/net/ipv4/tcp_rmem");
    let held: u64 = field(&out, "held").parse().unwrap();
    assert!(
        held <= bound,
        "the sender handed {held} bytes to the kernel while the reader stopped; bound {bound}\n{out}"
    );
    // Host memory, the way the unbounded queue failed: it fell by 2+ GB in 10 s. Other processes
    // share the host, so the margin is wide; the exact figure is `held` above.
    let memdrop: u64 = field(&out, "memdrop").parse().unwrap();
    assert!(memdrop < 512 * MIB, "host MemAvailable fell by {memdrop} bytes during the stall\n{out}");
    let r = cg.report();
    assert!(r.pauses >= 1, "the sender was never paused: {r}");
    assert!(r.bytes > 0, "{r}");
}

/// The bound counts messages too: each redirected message costs the reader's host a struct
/// sk_msg (1 KiB of slab, kmalloc-1k) besides its bytes, which the reader's receive memory does
/// not count. 100-byte writes to a reader that stopped, with the small-write policy off
/// (`--small-write 0`), held 8 MiB of bytes in 84,000 messages and 81 MiB of slab before; now
/// the stream pauses when bytes plus 1 KiB per message reach the limit.
#[test]
fn small_messages_to_a_stopped_reader_stay_within_the_bound() {
    if !require_bpf("small_messages_to_a_stopped_reader_stay_within_the_bound") {
        return;
    }
    let _netns = enter_netns();
    let cg = TestCgroup::accelerated("stallsmall", &["--small-write", "0"]);
    let total = 16 * MIB;
    let out = output(cg.peer(&["stall", "127.0.0.1", &total.to_string(), "4", "100"]));
    assert_eq!(field(&out, "sent"), field(&out, "received"), "stream damaged after the stall:\n{out}");
    assert!(field(&out, "sent").starts_with(&format!("{total} ")), "{out}");
    let r = cg.report();
    assert!(r.pauses >= 1 && r.messages > 0, "the stream was not redirected, then paused: {r}");
    // --max-queued 8 MiB: at most about 8 MiB of sk_msg slab; measured 81 MiB without the count.
    let slab: u64 = field(&out, "slabgrowth").parse().unwrap();
    eprintln!("100-byte writes, reader stopped 4 s:\n{out}\n{r}");
    assert!(
        slab < 24 * MIB,
        "kmalloc-1k grew by {slab} bytes while the reader stopped ({} messages redirected)\n{out}\n{r}",
        r.messages
    );
}

/// A counter of /proc/net/netstat (`TcpExt: NAME`) in this thread's network namespace.
fn tcp_ext(name: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/netstat").expect("read netstat");
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let i = names.split_whitespace().position(|n| n == name).unwrap_or_else(|| panic!("no TcpExt {name}"));
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// A stream of small writes at a reader that is behind: the redirect would make each one a
/// message and a wake-up (0.28x plain measured for 64-byte writes), TCP coalesces them. The
/// direction moves to TCP and its socket leaves the map; every byte arrives once, in order. The
/// move happens before the unread redirected bytes fill a quarter of the reader's receive
/// buffer: TCP bytes arriving on top of more made TCP prune and grow that buffer for good
/// (16 KiB writes: 2.7 MB instead of about 1 MB, 5% slower for the rest of the connection).
#[test]
fn a_small_write_stream_moves_to_plain_tcp_without_damage() {
    if !require_bpf("a_small_write_stream_moves_to_plain_tcp_without_damage") {
        return;
    }
    let _netns = enter_netns();
    for (write, late) in [("64", "0"), ("16384", "0.05")] {
        let cg = TestCgroup::accelerated(&format!("small{write}"), &[]);
        let total = 4 * MIB;
        let pruned = tcp_ext("PruneCalled");
        let out = output(cg.peer(&["small", "127.0.0.1", &total.to_string(), write, late]));
        assert!(field(&out, "sent").starts_with(&format!("{total} ")), "{write} B writes: {out}");
        assert_eq!(field(&out, "sent"), field(&out, "received"), "{write} B writes: stream damaged:\n{out}");
        let r = cg.report();
        assert_eq!(r.connections, 1, "{write} B writes: {r}");
        assert!(r.demoted_small >= 1, "{write} B writes: the small-write stream stayed on the redirect: {r}");
        assert!(r.left >= 1, "{write} B writes: the small-write sender did not leave the map: {r}");
        let pruned = tcp_ext("PruneCalled") - pruned;
        assert_eq!(
            pruned,
            0,
            "{write} B writes: the reader's receive memory went over its buffer ({pruned} prunes; \
             reader's SO_RCVBUF now {}): {r}",
            field(&out, "rcvbuf")
        );
    }
}

/// Left out, `--small-write` is measured when the cgroup is set up: a redirected stream of 64 KiB
/// writes against plain loopback TCP (about 0.5 s), 64K where the redirect wins by 1.15x, else
/// 128K (64 KiB streams to plain TCP). Which one is the machine's (64K on a 2-vCPU VM, 128K on a
/// 16-core Xeon), so this checks that a measurement was made and the cgroup got what `accel on`
/// said; that a given value is used as given; and that without a loopback to measure on (a fresh
/// network namespace) the safe 128K is chosen, saying why.
#[test]
fn the_default_small_write_is_measured_and_is_128k_where_it_cannot_be() {
    if !require_bpf("the_default_small_write_is_measured_and_is_128k_where_it_cannot_be") {
        return;
    }
    let _netns = enter_netns();
    let cg = TestCgroup::unaccelerated("measured");
    let off = || {
        let (code, out, err) = skrelay_output(&["accel", "off", "--cgroup", &cg.rel, "--force"]);
        assert_eq!(code, 0, "{out}{err}");
    };
    let (code, out, err) = skrelay_output(&["accel", "on", "--cgroup", &cg.rel]);
    assert_eq!(code, 0, "{out}{err}");
    let chosen = if out.contains("; --small-write 64K (measured here: a stream of 64 KiB writes moved ") {
        64 << 10
    } else if out.contains("; --small-write 128K (measured here: a stream of 64 KiB writes moved ") {
        128 << 10
    } else {
        panic!("accel on did not measure the default --small-write: {out}{err}");
    };
    let r = cg.report();
    assert_eq!((r.small_write, r.max_queued), (chosen, 8 << 20), "{r}");
    assert!(r.to_string().contains(" (measured: a stream of 64 KiB writes redirected ran at "), "{r}");
    off();

    let (code, out, err) = skrelay_output(&["accel", "on", "--cgroup", &cg.rel, "--small-write", "96K"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("small-write"), "a given --small-write was measured: {out}");
    let r = cg.report();
    assert_eq!(r.small_write, 96 << 10, "{r}");
    assert!(r.to_string().contains("policy: --max-queued 8M --small-write 96K\n"), "{r}");
    off();

    let on = Command::new("unshare").args(["-n", SKRELAY, "accel", "on", "--cgroup", &cg.rel]).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&on.stdout), String::from_utf8_lossy(&on.stderr));
    assert!(on.status.success(), "{out}{err}");
    assert!(out.contains("; --small-write 128K (not measured: plain loopback stream: "), "{out}{err}");
    assert!(out.contains("is `lo` up in this network namespace?"), "{out}");
    assert_eq!(cg.report().small_write, 128 << 10);
    assert!(cg.report().to_string().contains("--small-write 128K (the default where it could not be measured)"));

    // From inside an accelerated cgroup its test connection would be accelerated too: it says so
    // and takes the safe value.
    let other = format!("{}-other", cg.rel);
    let nested = Command::new(SKRELAY)
        .args(["accel", "run", "--cgroup", &cg.rel, "--", SKRELAY, "accel", "on", "--cgroup", &other])
        .output()
        .unwrap();
    let (out, err) = (String::from_utf8_lossy(&nested.stdout), String::from_utf8_lossy(&nested.stderr));
    let _ = skrelay_output(&["accel", "off", "--cgroup", &other, "--force"]);
    let _ = std::fs::remove_dir(cgroup_v2_mount().join(&other));
    assert!(nested.status.success(), "{out}{err}");
    assert!(out.contains("; --small-write 128K (not measured: skrelay itself runs in cgroup "), "{out}{err}");
}

/// States a kernel behaviour that puts splice(2) readers at risk (README, accel): redirected bytes
/// wait in the reader's psock queue, which only recvmsg reads, and 6.18's tcp_bpf has no
/// splice_read, so splice(2) (and sendfile(2)) from an accelerated socket reads the TCP queue
/// alone, skips every redirected byte and takes the FIN for the end of the stream. The same
/// exchange outside the cgroup arrives whole. If this test fails because the accelerated reader
/// got everything, the kernel has learnt to splice from a psock (bpf-next, 2026: "bpf/sockmap:
/// add splice support for tcp_bpf"): say so in README and `accel --help`.
#[test]
fn a_splice_reader_misses_redirected_bytes_kernel_behaviour() {
    if !require_bpf("a_splice_reader_misses_redirected_bytes_kernel_behaviour") {
        return;
    }
    let _netns = enter_netns();
    let total = (4 * MIB).to_string();
    let plain = output(plain_peer(&["splice", "127.0.0.1", &total]));
    assert!(field(&plain, "sent").starts_with(&format!("{total} ")), "{plain}");
    assert_eq!(field(&plain, "sent"), field(&plain, "received"), "plain TCP, splice reader:\n{plain}");
    let cg = TestCgroup::accelerated("splice", &[]);
    let out = output(cg.peer(&["splice", "127.0.0.1", &total]));
    let r = cg.report();
    assert_eq!(r.connections, 1, "{r}");
    assert!(r.bytes > 0, "nothing was redirected: {r}");
    let received: u64 = field(&out, "received").split(' ').next().unwrap().parse().unwrap();
    assert!(!out.contains("timeout"), "the splice reader waited 10 s instead of seeing an end: {out}");
    assert!(
        received + r.bytes <= 4 * MIB,
        "the splice reader got redirected bytes ({received} of {total} received, {} redirected): the kernel \
         splices from the psock queue now; update README and `accel --help`\n{out}\n{r}",
        r.bytes
    );
}

/// States a kernel behaviour that stalls FIONREAD users (README, accel): 6.18's tcp_bpf answers
/// FIONREAD with the psock's redirect queue alone (`tcp_bpf_ioctl` -> `sk_psock_msg_inq`), so
/// once a paused direction has sent bytes by TCP and the reader has taken the redirected ones,
/// FIONREAD says 0 while the TCP queue holds megabytes. nginx reads until a read fills its
/// buffer, asks FIONREAD, and on 0 waits for the next epoll edge, which a sender held back by a
/// closed window never brings (a helper's pass: 5 of 6 reverse-proxy downloads and every upload
/// to nginx stalled). Every byte still arrives for a reader that reads on. If this test fails
/// because FIONREAD was never short, the kernel counts the TCP queue too: update README and
/// `accel --help`.
#[test]
fn fionread_counts_only_redirected_bytes_kernel_behaviour() {
    if !require_bpf("fionread_counts_only_redirected_bytes_kernel_behaviour") {
        return;
    }
    let _netns = enter_netns();
    let total = (24 * MIB).to_string();
    let short = |out: &str| -> u64 { field(out, "fionread-short").split(' ').next().unwrap().parse().unwrap() };
    let plain = output(plain_peer(&["fionread", "127.0.0.1", &total]));
    assert_eq!(field(&plain, "sent"), field(&plain, "received"), "plain TCP:\n{plain}");
    assert_eq!(short(&plain), 0, "plain TCP's FIONREAD counts every byte:\n{plain}");
    let cg = TestCgroup::accelerated("fionread", &[]);
    let out = output(cg.peer(&["fionread", "127.0.0.1", &total]));
    let r = cg.report();
    assert_eq!(field(&out, "sent"), field(&out, "received"), "accelerated:\n{out}\n{r}");
    assert!(r.pauses > 0, "the sender never paused, so nothing went by TCP: {r}");
    assert!(
        short(&out) > 0,
        "FIONREAD counted the TCP queue too: the kernel fixed tcp_bpf_ioctl; update README and `accel --help`\n{out}\n{r}"
    );
}

/// States a kernel behaviour: urgent data (MSG_OOB) is not kept apart under accel: the reader's
/// MSG_OOB read gets another byte, and the urgent byte stays inline. Plain TCP keeps it apart.
/// If this test fails, update README and `accel --help`.
#[test]
fn urgent_data_is_not_kept_apart_kernel_behaviour() {
    if !require_bpf("urgent_data_is_not_kept_apart_kernel_behaviour") {
        return;
    }
    let _netns = enter_netns();
    let plain = output(plain_peer(&["oob", "127.0.0.1"]));
    assert_eq!(field(&plain, "urgent"), "b'!'", "{plain}");
    assert_eq!(field(&plain, "inline"), "b'AAAAAAAAAABBBBBBBBBB'", "{plain}");
    let cg = TestCgroup::accelerated("oob", &["--small-write", "0"]);
    let out = output(cg.peer(&["oob", "127.0.0.1"]));
    let r = cg.report();
    assert!(r.messages > 0, "nothing was redirected: {r}");
    assert_ne!(field(&out, "urgent"), "b'!'", "the urgent byte was kept apart: update README\n{out}\n{r}");
}

/// States a kernel behaviour (README, accel, "Half-close"): 6.18's `tcp_bpf_recvmsg` answers
/// EAGAIN when a thread blocked in a blocking `recv` is woken without data, and a peer's reset
/// or another thread's `shutdown(SHUT_RD)` wakes it so (a new-user pass, 2026-12-07): plain TCP
/// returns ECONNRESET and EOF there. The next call says what happened, so nothing is lost, but
/// a program that takes EAGAIN on a blocking socket for a fatal error misreads it. No program
/// skrelay attaches sees either in time (neither sends a FIN of the socket's own, and a thread
/// already inside `tcp_bpf_recvmsg` stays there whatever the map holds). If this test fails
/// because the accelerated reader saw the reset or the EOF at once, the kernel waits again after
/// an empty wake-up: update README and `accel --help`.
#[test]
fn a_blocked_reader_woken_by_a_reset_or_shut_rd_gets_eagain_kernel_behaviour() {
    if !require_bpf("a_blocked_reader_woken_by_a_reset_or_shut_rd_gets_eagain_kernel_behaviour") {
        return;
    }
    let _netns = enter_netns();
    let plain = output(plain_peer(&["woken", "127.0.0.1"]));
    assert_eq!(field(&plain, "reset"), "ConnectionResetError eof", "{plain}");
    assert_eq!(field(&plain, "shut-rd"), "eof eof", "{plain}");
    let cg = TestCgroup::accelerated("woken", &[]);
    let out = output(cg.peer(&["woken", "127.0.0.1"]));
    let r = cg.report();
    assert!(r.connections >= 2, "the connections were not accelerated: {r}");
    assert_eq!(
        field(&out, "reset"),
        "BlockingIOError ConnectionResetError",
        "a blocked reader saw its peer's reset at once: update README and `accel --help`\n{out}\n{r}"
    );
    assert_eq!(
        field(&out, "shut-rd"),
        "BlockingIOError eof",
        "a blocked reader saw SHUT_RD's EOF at once: update README and `accel --help`\n{out}\n{r}"
    );
}

/// The cgroup v1 memory controller's mount, if this machine has one with a TCP memory limit.
fn memcg_v1_tcp() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 3 && f[2] == "cgroup" && f[3].split(',').any(|o| o == "memory")).then(|| PathBuf::from(f[1]))
        })
        .find(|m| m.join("memory.kmem.tcp.limit_in_bytes").exists())
}

/// A reader whose memory cgroup is at its cgroup v1 TCP limit (memory.kmem.tcp.limit_in_bytes):
/// the redirect's charge of the reader failed and the writer's send(2) returned ENOMEM, where
/// plain TCP waits; the exchange then hung (a helper's pass: 2 runs of 3 ENOMEM, one hung; 3 of 3
/// here). The direction now pauses on the TCP path near the limit, and every byte arrives.
/// Needs the v1 memory controller (this VM's), which a pure cgroup v2 machine lacks: skipped
/// there, with a line that says so.
#[test]
fn a_reader_at_its_cgroups_tcp_memory_limit_pauses_the_redirect_instead_of_failing_the_writer() {
    if !require_bpf("a_reader_at_its_cgroups_tcp_memory_limit_pauses_the_redirect_instead_of_failing_the_writer") {
        return;
    }
    let Some(v1) = memcg_v1_tcp() else {
        eprintln!("SKIPPED: no cgroup v1 memory controller with a TCP limit on this machine");
        return;
    };
    let _netns = enter_netns();
    struct Removed(PathBuf);
    impl Drop for Removed {
        fn drop(&mut self) {
            for _ in 0..100 {
                if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let memcg = v1.join(format!("skrelay-test-{}-tcpmem", std::process::id()));
    std::fs::create_dir_all(&memcg).unwrap();
    let _removed = Removed(memcg.clone());
    std::fs::write(memcg.join("memory.kmem.tcp.limit_in_bytes"), "2M").unwrap();
    let cg = TestCgroup::accelerated("tcpmem", &[]);
    let port = free_port();
    let bytes = 60 * MIB;
    // Both peers in the limited memory cgroup (cgroup v1: a hierarchy of its own, which `accel
    // run` does not change), bounded in time: the failure hung.
    let peer = |args: Vec<String>| {
        let mut c = Command::new("sh");
        c.args(["-c", &format!("echo $$ > {}/cgroup.procs && exec \"$@\"", memcg.display()), "sh"]);
        c.args(["timeout", "20", SKRELAY, "accel", "run", "--cgroup", &cg.rel, "--", "python3", PEER]).args(args);
        c
    };
    // Up to five exchanges, until two arrive whole; at least one must: a race between the
    // program's look at the counter and the kernel's charge (both directions and the TCP path
    // charge it meanwhile) can still fail some (README; 2 in 18 at a parent's limit, one in a
    // fresh-clone CI run, two of three with the machine busy with other work). Without the
    // pause every exchange failed (3 of 3, checked).
    let mut whole = 0;
    let mut tried = 0;
    let mut failed = String::new();
    for attempt in 0..5 {
        if whole == 2 {
            break;
        }
        tried += 1;
        let port = if attempt == 0 { port } else { free_port() };
        let (mut srv, mut srv_out) = start_server(peer(serve_args("127.0.0.1", port)));
        let client = peer(connect_args("127.0.0.1", port, bytes)).output().expect("run client peer");
        let client_out = String::from_utf8_lossy(&client.stdout).into_owned();
        let mut server_out = String::new();
        let _ = std::io::Read::read_to_string(&mut srv_out, &mut server_out);
        let served = srv.wait().unwrap().success();
        let line = |text: &str, key: &str| text.lines().find(|l| l.starts_with(key)).map(str::to_owned);
        let sent = |text: &str| line(text, "sent ").filter(|l| l.starts_with(&format!("sent {bytes} ")));
        let ok = client.status.success()
            && served
            && sent(&client_out).is_some()
            && sent(&server_out).is_some()
            && sent(&client_out).map(|l| l.replacen("sent", "received", 1)) == line(&server_out, "received ")
            && sent(&server_out).map(|l| l.replacen("sent", "received", 1)) == line(&client_out, "received ");
        if ok {
            whole += 1;
        } else {
            failed.push_str(&format!(
                "exchange {attempt}:\nclient: {client_out}{}\nserver: {server_out}\n",
                String::from_utf8_lossy(&client.stderr)
            ));
        }
    }
    assert!(whole >= 1, "{whole} of {tried} exchanges arrived whole:\n{failed}");
    let r = cg.report();
    assert!(r.pauses > 0, "the redirect never paused for the cgroup's TCP memory: {r}");
}

/// TCP Fast Open (a new-user pass): a client's sendto(MSG_FASTOPEN) sends a bare SYN without a
/// cookie, waits in the connect while the socket joins the map, and then sends its data by TCP
/// without passing sk_msg; with a cookie the data rides in the SYN. Either way those bytes took
/// TCP, and the redirected writes after them reached a reader that starts late first (1,000
/// bytes arrived after the next 1 MiB, 3 connections of 3). Such a connection now stays on TCP
/// (counted as left unaccelerated); every stream arrives whole, with and without server TFO.
#[test]
fn tcp_fast_open_data_is_not_overtaken_by_redirected_writes() {
    if !require_bpf("tcp_fast_open_data_is_not_overtaken_by_redirected_writes") {
        return;
    }
    let _netns = enter_netns();
    let total = (4 * MIB).to_string();
    for server in [&[][..], &["server-tfo"][..]] {
        let cg = TestCgroup::accelerated("fastopen", &[]);
        let mut args = vec!["fastopen", "127.0.0.1", &total];
        args.extend_from_slice(server);
        let out = output(cg.peer(&args));
        let r = cg.report();
        for seed in 0..3 {
            let key = |k: &str| field(&out, &format!("{k} {seed}")).to_string();
            assert_eq!(key("sent"), key("received"), "connection {seed} {server:?}, accelerated:\n{out}\n{r}");
        }
        assert!(r.races_lost > 0, "no connection was left on TCP, so the case was not met: {server:?}\n{out}\n{r}");
        drop(cg);
    }
}

/// Under `ip netns exec` skrelay's state is reached through /proc/2/root (the outer mount
/// namespace's bpffs and cgroup mount): messages named it so, a path that says nothing to the user
/// (a stranger pass: `steer reset`, a refused `accel on`, `--cgroup ../x`). They name it as the
/// host does, as `status` does.
#[test]
fn under_ip_netns_exec_messages_name_pinned_state_as_the_host_does() {
    if !require_bpf("under_ip_netns_exec_messages_name_pinned_state_as_the_host_does") {
        return;
    }
    let cg = TestCgroup::accelerated("shown", &[]);
    let ns = format!("skrelay-shown-{}", std::process::id());
    assert!(Command::new("ip").args(["netns", "add", &ns]).status().unwrap().success());
    let script = r#"
        ip link set lo up
        python3 -c 'import socket, time; l = socket.socket(); l.bind(("127.0.0.1", 9300)); l.listen(); time.sleep(30)' &
        sleep 0.5
        "$0" steer add --ports 9301 --to 127.0.0.1:9300
        "$0" status
        "$0" accel on --cgroup "$1" --small-write 64K
        "$0" accel on --cgroup ../x --small-write 64K
        "$0" steer reset
        kill $!
    "#;
    let out = Command::new("ip").args(["netns", "exec", &ns, "sh", "-c", script, SKRELAY, &cg.rel]).output().unwrap();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!all.contains("/proc/"), "not as the host names it:\n{all}");
    for said in [
        "pinned at /sys/fs/bpf/skrelay/",
        "is already accelerated (state pinned at /sys/fs/bpf/skrelay/accel/",
        "must not contain `..` (give the path below /sys/fs/cgroup",
        "pins under /sys/fs/bpf/skrelay/",
    ] {
        assert!(all.contains(said), "no `{said}` in:\n{all}");
    }
}

/// A user without root under `ip netns exec` sees no cgroup v2 mount: its fresh /sys has none
/// and the host's is out of reach. `accel on`, `off` and `run` told it to mount one (a helper's
/// README pass), which would fail or vanish with the command; they say what is the matter. Root
/// without CAP_SYS_PTRACE (a container's) cannot look outside either, and is not told to run as
/// root (a re-check pass).
#[test]
fn without_root_under_ip_netns_exec_accel_is_not_told_to_mount_a_cgroup() {
    if !require_tool("accel without root under ip netns exec", "setpriv") {
        return;
    }
    let ns = format!("skrelay-nocg-{}", std::process::id());
    assert!(Command::new("ip").args(["netns", "add", &ns]).status().unwrap().success());
    let nobody = ["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"];
    let root_without_ptrace = ["--bounding-set=-sys_ptrace"];
    let run = |who: &[&str], args: &[&str]| {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "setpriv"])
            .args(who)
            .arg(SKRELAY)
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let mut said = Vec::new();
    for (who, fix) in [(&nobody[..], "(run it as root)"), (&root_without_ptrace[..], "(run it with CAP_SYS_PTRACE)")] {
        said.push((run(who, &["accel", "on", "--cgroup", "/sys/fs/cgroup/unified/skrelay-nocg"]), fix));
        said.push((run(who, &["accel", "off", "--cgroup", "skrelay-nocg"]), fix));
        said.push((run(who, &["accel", "run", "--", "true"]), fix));
    }
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    for ((code, err), fix) in said {
        assert_eq!(code, Some(2), "{err}");
        assert!(!err.contains("mount one"), "{err}");
        assert!(
            err.contains(&format!("under `ip netns exec {ns}` this command has a /sys of its own"))
                && err.trim_end().ends_with(fix),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
    }
}

/// A relay or proxy and its local clients in one accelerated cgroup: sk_msg would move the
/// clients' bytes into the relay's sockets' psock queue, which neither its sk_skb datapath nor
/// splice(2) reads (a relay started inside `accel run` delivered a 4 MB stream 64 KiB short). So
/// a relay refuses to start inside an accelerated cgroup that covers its port, starts when
/// `--ports` leaves its port out, and `accel on` refuses a cgroup a relay already runs in.
#[test]
fn a_relay_and_accel_refuse_to_share_a_cgroup() {
    if !require_bpf("a_relay_and_accel_refuse_to_share_a_cgroup") {
        return;
    }
    let _netns = enter_netns();
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    {
        let cg = TestCgroup::accelerated("relay-inside", &[]);
        let (code, err) = exit_within(&cg, cg_command(&cg, &["relay", "--listen", &listen]));
        assert_eq!(code, Some(2), "the relay started inside an accelerated cgroup: {err}");
        assert!(err.contains("cannot run the relay in cgroup") && err.contains("--ports"), "{err}");
        let (code, err) =
            exit_within(&cg, cg_command(&cg, &["proxy", "--listen", &listen, "--upstream", "127.0.0.1:9"]));
        assert_eq!(code, Some(2), "the proxy started inside an accelerated cgroup: {err}");
        // Under `ip netns exec`, whose fresh /sys has no cgroup v2 mount: the check found no
        // accelerated cgroup, and the relay started (and lost whole streams; a helper's pass).
        let ns = format!("skrelay-accel-{}", std::process::id());
        assert!(Command::new("ip").args(["netns", "add", &ns]).status().unwrap().success());
        let mut enter = Command::new("sh");
        enter.args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec ip netns exec \"$1\" \"$2\" relay"]);
        enter.arg(cg.path()).arg(&ns).arg(SKRELAY);
        let (code, err) = exit_within(&cg, enter);
        // There, `status` names the cgroup and its pins as the host does: it showed them through
        // /proc/2/root, in JSON and in the metrics' cgroup label too (a helper's pass).
        let st = Command::new("ip").args(["netns", "exec", &ns, SKRELAY, "status", "--json"]).output().unwrap();
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        let st = String::from_utf8_lossy(&st.stdout);
        let json: serde_json::Value = serde_json::from_str(&st).unwrap_or_else(|e| panic!("{e}: {st}"));
        let shown = json["accel"]["cgroups"].as_array().map(|c| c.iter().map(|c| c["cgroup"].clone()).collect());
        assert_eq!(shown, Some(vec![serde_json::json!(cg.path())]), "{st}");
        assert!(!st.contains("/proc/"), "not as the host names it:\n{st}");
        assert_eq!(code, Some(2), "under ip netns exec, the relay started inside an accelerated cgroup: {err}");
        assert!(err.contains("cannot run the relay in cgroup"), "{err}");
        // In a cgroup namespace of its own (`unshare -C`, as containers run), where
        // /proc/self/cgroup reads `0::/`: the check found no accelerated cgroup either.
        let mut enter = Command::new("sh");
        enter.args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec unshare -C -n \"$1\" relay"]);
        enter.arg(cg.path()).arg(SKRELAY);
        let (code, err) = exit_within(&cg, enter);
        assert_eq!(code, Some(2), "in a cgroup namespace, the relay started inside an accelerated cgroup: {err}");
        assert!(err.contains("cannot run the relay in cgroup"), "{err}");
    }
    {
        // accel limited to other ports: the relay serves.
        let cg = TestCgroup::accelerated("relay-other-port", &["--ports", "9"]);
        let relay = Skrelay::spawn(cg_command(&cg, &["relay", "--listen", &listen]), "listening on");
        relay.stop(Duration::from_secs(5));
    }
    let cg = TestCgroup::unaccelerated("relay-then-accel");
    std::fs::create_dir_all(cg.path()).unwrap();
    let mut enter = Command::new("sh");
    enter.args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""]).arg(cg.path()).arg(SKRELAY);
    enter.args(["relay", "--listen", &listen]);
    let relay = Skrelay::spawn(enter, "listening on");
    let (code, out, err) = skrelay_output(&["accel", "on", "--cgroup", &cg.rel]);
    assert_eq!(code, 2, "accel on accepted a cgroup a relay runs in: {out}{err}");
    assert!(err.contains("skrelay relay (pid") && err.contains("runs in it"), "{err}");
    let (code, out, err) = skrelay_output(&["accel", "on", "--cgroup", &cg.rel, "--ports", "9"]);
    assert_eq!(code, 0, "accel on --ports without the relay's port was refused: {out}{err}");
    relay.stop(Duration::from_secs(5));
    let (code, out, err) = skrelay_output(&["accel", "off", "--cgroup", &cg.rel]);
    assert_eq!(code, 0, "{out}{err}");
    // A proxy's upstream connections are the cgroup's local connections too: accelerating its
    // upstream port was accepted, and bytes through the proxy were lost (a helper's pass).
    let mut enter = Command::new("sh");
    enter.args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""]).arg(cg.path()).arg(SKRELAY);
    enter.args(["proxy", "--listen", &listen, "--upstream", "127.0.0.1:8999"]);
    let proxy = Skrelay::spawn(enter, "listening on");
    let (code, out, err) = skrelay_output(&["accel", "on", "--cgroup", &cg.rel, "--ports", "8999"]);
    assert_eq!(code, 2, "accel on accepted the upstream port of a proxy in the cgroup: {out}{err}");
    let mut theirs = [port.parse::<u16>().unwrap(), 8999];
    theirs.sort();
    let leave_out = format!("give --ports that leave out {},{}", theirs[0], theirs[1]);
    assert!(err.contains("upstream port 8999") && err.contains(&leave_out), "{err}");
    proxy.stop(Duration::from_secs(5));
}

/// Runs `cmd` in `cg` for up to 5 s: its exit code and stderr; None when it was still running
/// (then every process of the cgroup is killed, the relay it started included).
fn exit_within(cg: &TestCgroup, mut cmd: Command) -> (Option<i32>, String) {
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
            return (status.code(), err);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::write(cg.path().join("cgroup.kill"), "1");
    let _ = child.kill();
    let _ = child.wait();
    (None, "(still running after 5 s)".into())
}

/// `skrelay ARGS` started in `cg` (`accel run --cgroup`), as a relay in that cgroup would be.
fn cg_command(cg: &TestCgroup, args: &[&str]) -> Command {
    let mut c = Command::new(SKRELAY);
    c.args(["accel", "run", "--cgroup", &cg.rel, "--", SKRELAY]).args(args);
    c
}

/// A blocking reader (no O_NONBLOCK) behind a paused stream: the direction goes back to the
/// redirect only while the reader waits inside tcp_bpf_recvmsg, never while it is blocked in
/// plain tcp_recvmsg with MSG_WAITALL (it would take later TCP bytes before redirected ones: a
/// build that skipped that check damaged 2 of 3 such streams). Before, a blocking reader never
/// let a pause resume and the connection left the map at its first pause.
#[test]
fn a_blocking_reader_lets_a_paused_stream_resume_in_order() {
    if !require_bpf("a_blocking_reader_lets_a_paused_stream_resume_in_order") {
        return;
    }
    let _netns = enter_netns();
    let total = 256 * MIB;
    // Whether a pause can resume depends on where the reader is when the sender writes next, so
    // one run may see no resume (CI once saw none in either mode while other tests loaded both
    // CPUs; here 1-4 per run). Up to 5 rounds of both modes, each checked whole; a build that
    // never lets a blocking reader's stream resume fails all 10.
    let mut seen = Vec::new();
    for round in 0..5 {
        let mut resumes = 0;
        for (name, write, waitall) in [("blocking", "1048576", false), ("waitall", "65536", true)] {
            let cg = TestCgroup::accelerated(&format!("{name}{round}"), &[]);
            let total_arg = total.to_string();
            let mut args = vec!["blocking", "127.0.0.1", total_arg.as_str(), write];
            if waitall {
                args.push("waitall");
            }
            let out = output(cg.peer(&args));
            assert!(field(&out, "sent").starts_with(&format!("{total} ")), "{name}: {out}");
            assert_eq!(field(&out, "sent"), field(&out, "received"), "{name}: stream damaged:\n{out}");
            let r = cg.report();
            assert_eq!(r.connections, 1, "{name}: {r}");
            assert!(r.pauses >= 1, "{name}: the reader started late, yet the sender never paused: {r}");
            seen.push(format!("{name}: pauses {} resumes {} stuck {}", r.pauses, r.resumes, r.stuck));
            resumes += r.resumes;
        }
        if resumes >= 1 {
            return;
        }
    }
    panic!("no paused stream went back to the redirect for a blocking reader in 5 rounds:\n{}", seen.join("\n"));
}

/// One iperf3 run (server and client), in `cg` when given, else plain loopback. Returns the
/// client's JSON report and the aggregate receive rate in Gbit/s.
fn iperf3(cg: Option<&TestCgroup>, args: &[&str]) -> (serde_json::Value, f64) {
    let port = free_port().to_string();
    let wrap = |cmd: &[&str]| -> Command {
        let mut c = match cg {
            Some(cg) => {
                let mut c = Command::new(SKRELAY);
                c.args(["accel", "run", "--cgroup", &cg.rel, "--"]);
                c.arg(cmd[0]);
                c
            }
            None => Command::new(cmd[0]),
        };
        c.args(&cmd[1..]);
        c
    };
    let mut server =
        wrap(&["iperf3", "-s", "-1", "-p", &port]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let mut json = serde_json::Value::Null;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let mut cmd = vec!["iperf3", "-c", "127.0.0.1", "-p", &port, "-t", "3", "-J"];
        cmd.extend_from_slice(args);
        let out = wrap(&cmd).output().unwrap();
        json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let refused = json["error"].as_str().is_some_and(|e| e.contains("Connection refused"));
        if !refused {
            break;
        }
    }
    let _ = server.wait();
    assert!(json["error"].is_null(), "iperf3 {args:?} failed: {}", json["error"]);
    let gbps: f64 = iperf3_bytes(&json).iter().map(|&(_, r)| r as f64 * 8.0 / 3e9).sum();
    (json, gbps)
}

/// Real iperf3 under `accel run`: -R, --bidir and -P 4 finish without errors, the receivers got
/// what the senders sent (up to what may still be in flight when iperf3 stops counting, which
/// the per-connection bound limits), and --bidir is not slower than plain loopback (it collapsed
/// to 0.03x and once failed with ENOMEM while the redirect queue was unbounded).
#[test]
fn iperf3_reverse_bidir_and_parallel_streams_under_accel() {
    if !require_bpf("iperf3_reverse_bidir_and_parallel_streams_under_accel") {
        return;
    }
    let _netns = enter_netns();
    let cg = TestCgroup::accelerated("iperf3", &[]);
    for (args, streams) in [(&["-R"][..], 1u64), (&["--bidir"][..], 2), (&["-P", "4"][..], 4)] {
        let (json, gbps) = iperf3(Some(&cg), args);
        for (sent, received) in iperf3_bytes(&json) {
            assert!(sent > 0 && received <= sent, "iperf3 {args:?}: sent {sent}, received {received}");
            assert!(
                sent - received <= streams * 32 * MIB,
                "iperf3 {args:?}: receivers got {received} of {sent} bytes: more than the bound was still queued"
            );
        }
        eprintln!("iperf3 {args:?} under accel: {gbps:.1} Gbit/s received");
    }
    // --bidir against plain loopback in the same run (best of three each, interleaved: the host
    // is shared with other builds and plain loopback alone varies by 30% between runs).
    let (mut plain, mut accel) = (0.0f64, 0.0f64);
    for _ in 0..3 {
        plain = plain.max(iperf3(None, &["--bidir"]).1);
        accel = accel.max(iperf3(Some(&cg), &["--bidir"]).1);
    }
    eprintln!("iperf3 --bidir: plain {plain:.1} Gbit/s, accel {accel:.1} Gbit/s ({:.2}x)", accel / plain);
    assert!(accel >= 0.9 * plain, "iperf3 --bidir under accel: {accel:.1} Gbit/s, plain {plain:.1} Gbit/s");
    let r = cg.report();
    assert!(r.connections >= 4 && r.bytes > 0, "{r}");
}

/// `cmd` under `accel run --cgroup` of `cg`, or plain.
fn maybe_accel(cg: Option<&TestCgroup>, cmd: &[&str]) -> Command {
    match cg {
        Some(cg) => {
            let mut c = Command::new(SKRELAY);
            c.args(["accel", "run", "--cgroup", &cg.rel, "--"]).args(cmd);
            c
        }
        None => {
            let mut c = Command::new(cmd[0]);
            c.args(&cmd[1..]);
            c
        }
    }
}

/// A redis-server (plain or in `cg`) on a free port, stopped on drop.
struct Redis {
    child: Child,
    port: String,
}

impl Redis {
    fn start(cg: Option<&TestCgroup>) -> Redis {
        let port = free_port().to_string();
        let args = ["redis-server", "--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
        let child = maybe_accel(cg, &args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let redis = Redis { child, port };
        for _ in 0..100 {
            let ping = Command::new("redis-cli").args(["-p", &redis.port, "ping"]).output().unwrap();
            if String::from_utf8_lossy(&ping.stdout).trim() == "PONG" {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not start on port {}", redis.port);
    }

    /// requests per second of SET and GET from redis-benchmark (in `cg` or plain). About a
    /// second per test: -P 16 runs ten times the requests (40,000 took 0.1 s and its figure
    /// swung 0.6-3x between rounds).
    fn benchmark(&self, cg: Option<&TestCgroup>, pipeline: &str) -> (f64, f64) {
        let n = if pipeline == "1" { "40000" } else { "400000" };
        let args = ["redis-benchmark", "-p", &self.port, "-t", "set,get", "-n", n, "-P", pipeline, "--csv"];
        let out = maybe_accel(cg, &args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "redis-benchmark failed: {text}{}", String::from_utf8_lossy(&out.stderr));
        let rps = |test: &str| -> f64 {
            text.lines()
                .find(|l| l.starts_with(&format!("\"{test}\"")))
                .and_then(|l| l.split(',').nth(1))
                .and_then(|v| v.trim_matches('"').parse().ok())
                .unwrap_or_else(|| panic!("no {test} in redis-benchmark output:\n{text}"))
        };
        (rps("SET"), rps("GET"))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = Command::new("redis-cli").args(["-p", &self.port, "shutdown", "nosave"]).output();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// redis-server and its clients in an accelerated cgroup: a 1 MiB value written with redis-cli
/// reads back with the same sha256, and redis-benchmark (SET/GET, -P 1 and -P 16) runs through
/// the redirect; its figures are printed next to plain loopback's from the same run.
#[test]
fn redis_under_accel_keeps_data_and_is_not_slower() {
    let test = "redis_under_accel_keeps_data_and_is_not_slower";
    if !require_bpf(test) || !require_tool(test, "redis-server") || !require_tool(test, "redis-benchmark") {
        return;
    }
    let _netns = enter_netns();
    let cg = TestCgroup::accelerated("redis", &[]);
    let plain = Redis::start(None);
    let accel = Redis::start(Some(&cg));

    // Data: a 1 MiB value in, the same value out, both through accelerated connections.
    let value: String = (0..(1 << 20)).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    let mut set = maybe_accel(Some(&cg), &["redis-cli", "-p", &accel.port, "-x", "set", "big"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    set.stdin.take().unwrap().write_all(value.as_bytes()).unwrap();
    let out = set.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    let got = maybe_accel(Some(&cg), &["redis-cli", "-p", &accel.port, "--raw", "get", "big"]).output().unwrap();
    let got = got.stdout.strip_suffix(b"\n").unwrap_or(&got.stdout).to_vec();
    assert_eq!(got.len(), value.len(), "GET returned {} bytes", got.len());
    assert_eq!(sha(&got), sha(value.as_bytes()), "GET returned other bytes than SET stored");

    // Three rounds each, interleaved, compared by their medians: one round each failed at 0.8x
    // on this shared machine (load 10) while the next run measured 1.35x.
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for pipeline in ["1", "16"] {
        let (mut plain_runs, mut accel_runs) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            plain_runs.push(plain.benchmark(None, pipeline));
            accel_runs.push(accel.benchmark(Some(&cg), pipeline));
        }
        let (ps, pg) =
            (median(plain_runs.iter().map(|r| r.0).collect()), median(plain_runs.iter().map(|r| r.1).collect()));
        let (as_, ag) =
            (median(accel_runs.iter().map(|r| r.0).collect()), median(accel_runs.iter().map(|r| r.1).collect()));
        eprintln!(
            "redis-benchmark -P {pipeline}, medians of 3: SET {as_:.0} vs plain {ps:.0} req/s ({:.2}x), GET {ag:.0} vs {pg:.0} ({:.2}x)",
            as_ / ps,
            ag / pg
        );
        // The shared machine's noise is about +-15%: fail only on a clear loss.
        assert!(as_ >= 0.8 * ps && ag >= 0.8 * pg, "redis under accel is slower: -P {pipeline}");
    }
    let r = cg.report();
    assert!(r.connections >= 50 && r.messages > 200_000, "redis-benchmark did not go through the redirect: {r}");
}

/// Under `ip netns exec` (a sysfs of its own: /sys/fs/bpf is a bare directory there, and accel's
/// state lives in the outer mount namespace's bpffs), a proxy started while no accel state existed
/// watched the bare directory, where the state never appears, and served on from a cgroup that
/// accel then came to cover: its upstream connections were accelerated and lost bytes (a
/// re-check pass). It now resets new clients at once, and serves again after `accel off`.
#[test]
fn a_proxy_under_a_sysfs_of_its_own_sees_accel_come_to_cover_its_cgroup() {
    if !require_bpf("a_proxy_under_a_sysfs_of_its_own_sees_accel_come_to_cover_its_cgroup") {
        return;
    }
    // What `ip netns exec` does (/sys detached, then a fresh sysfs), and a fresh sysfs mounted
    // over /sys, which leaves the cgroup2 mount below it listed in mountinfo but out of reach.
    for mount in ["umount -l /sys && mount -t sysfs sysfs /sys", "mount -t sysfs sysfs /sys"] {
        proxy_under_a_sysfs_of_its_own(mount);
    }
}

fn proxy_under_a_sysfs_of_its_own(mount: &str) {
    let _netns = enter_netns();
    let port = free_port();
    let up = std::iter::repeat_with(free_port).find(|&p| p != port).unwrap();
    let cg = TestCgroup::unaccelerated("fresh-sysfs");
    std::fs::create_dir_all(cg.path()).unwrap();
    let listen = format!("127.0.0.1:{port}");
    let upstream = format!("127.0.0.1:{up}");
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", &format!("{mount} && exec \"$0\" \"$@\"")]).args([
        SKRELAY,
        "proxy",
        "--listen",
        &listen,
        "--upstream",
        &upstream,
    ]);
    let proxy = Skrelay::spawn(cmd, "listening on");
    let home = std::fs::read_to_string(format!("/proc/{}/cgroup", proxy.pid())).unwrap();
    let home = cgroup_v2_mount().join(home.lines().find_map(|l| l.strip_prefix("0::/")).unwrap_or_default());
    std::fs::write(cg.path().join("cgroup.procs"), proxy.pid().to_string()).unwrap();
    // Served while nothing is accelerated.
    served_through_proxy(port, up);
    // accel comes to cover the proxy's cgroup (from another network namespace, whose `accel on`
    // does not see this proxy): its next client is reset.
    accel_on_unseen(&cg.rel);
    a_new_client_is_reset(&listen, &format!("{mount}: a client of a proxy whose cgroup accel covers"), &proxy);
    proxy.wait_log("skrelay accel now covers this process's cgroup: cannot run the proxy", 1, Duration::from_secs(5));
    // Off again: served.
    let (code, out, err) = skrelay_output(&["accel", "off", "--cgroup", &cg.rel]);
    assert_eq!(code, 0, "{out}{err}");
    served_through_proxy(port, up);
    assert!(proxy.log().contains("skrelay accel no longer covers this process's cgroup: serving again"));
    std::fs::write(home.join("cgroup.procs"), proxy.pid().to_string()).unwrap();
    let (status, log) = proxy.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

/// A proxy moved into an accelerated cgroup after it started (`cgclassify`, a write to
/// `cgroup.procs`) made its upstream connections there, which accel joined: their bytes went into
/// the sockets' redirect queue, past the datapath, and clients got a clean EOF with nothing, or a
/// hang (a helper's pass over the jobs combined). Its new clients are now reset, with one error
/// line; moved out again, it serves, bytes exact.
#[test]
fn a_proxy_moved_into_an_accelerated_cgroup_resets_new_clients() {
    if !require_bpf("a_proxy_moved_into_an_accelerated_cgroup_resets_new_clients") {
        return;
    }
    let _netns = enter_netns();
    let port = free_port();
    let up = std::iter::repeat_with(free_port).find(|&p| p != port).unwrap();
    let cg = TestCgroup::accelerated("proxy-moved", &[]);
    let listen = format!("127.0.0.1:{port}");
    let proxy = Skrelay::start(&["proxy", "--listen", &listen, "--upstream", &format!("127.0.0.1:{up}")]);
    let home = std::fs::read_to_string(format!("/proc/{}/cgroup", proxy.pid())).unwrap();
    let home = cgroup_v2_mount().join(home.lines().find_map(|l| l.strip_prefix("0::/")).unwrap_or_default());
    let (mut server, mut server_out) =
        start_server(cg.peer(&serve_args("127.0.0.1", up).iter().map(String::as_str).collect::<Vec<_>>()));
    std::fs::write(cg.path().join("cgroup.procs"), proxy.pid().to_string()).unwrap();
    a_new_client_is_reset(&listen, "a client of the moved proxy", &proxy);
    proxy.wait_log("was moved into another cgroup", 1, Duration::from_secs(5));
    let log = proxy.log();
    assert!(
        log.contains("this process was moved into another cgroup, and now cannot run the proxy in cgroup"),
        "{log}"
    );
    assert!(log.contains("new clients are reset until it is moved out"), "{log}");
    // Moved back: served again, and the upstream (still waiting for its one connection) gets it.
    std::fs::write(home.join("cgroup.procs"), proxy.pid().to_string()).unwrap();
    let client = output(plain_peer(&["connect", "127.0.0.1", &port.to_string(), "1000000"]));
    let mut server_text = String::new();
    std::io::Read::read_to_string(&mut server_out, &mut server_text).unwrap();
    assert!(server.wait().unwrap().success(), "{server_text}");
    assert!(field(&client, "received").starts_with("1000000 "), "{client}");
    assert_eq!(field(&client, "sent"), field(&server_text, "received"), "client -> upstream damaged");
    assert_eq!(field(&server_text, "sent"), field(&client, "received"), "upstream -> client damaged");
    // A takeover from inside that cgroup is refused naming the port it would serve, not the
    // default --listen (7777) it was not given.
    let pid = proxy.pid().to_string();
    let (code, err) =
        exit_within(&cg, cg_command(&cg, &["proxy", "--upstream", &format!("127.0.0.1:{up}"), "--takeover", &pid]));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("leave out this proxy's ports, {port},{up})")), "{err}");
    // Moved in again, then the cgroup is no longer accelerated: served again without a move
    // (clients stayed reset after `accel off`: a re-check pass).
    std::fs::write(cg.path().join("cgroup.procs"), proxy.pid().to_string()).unwrap();
    a_new_client_is_reset(&listen, "a client of the proxy moved in again", &proxy);
    let (code, out, err) = skrelay_output(&["accel", "off", "--cgroup", &cg.rel]);
    assert_eq!(code, 0, "{out}{err}");
    std::thread::sleep(Duration::from_millis(1100));
    served_through_proxy(port, up);
    assert!(proxy.log().contains("skrelay accel no longer covers this process's cgroup: serving again"));
    // Accelerated again where it stays (from another network namespace, whose `accel on` does not
    // see this proxy): it served on, and lost bytes (a re-check pass). Reset at once now.
    accel_on_unseen(&cg.rel);
    a_new_client_is_reset(&listen, "a client of the proxy accelerated where it stays", &proxy);
    proxy.wait_log("skrelay accel now covers this process's cgroup: cannot run the proxy", 1, Duration::from_secs(5));
    std::fs::write(home.join("cgroup.procs"), proxy.pid().to_string()).unwrap();
    let (status, log) = proxy.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}
