//! `skrelay proxy`: each client is spliced to a fresh upstream connection with the relay's
//! semantics (order, pre-connect bytes, half-close, reset), upstreams are used round-robin, a
//! failing one is skipped, and real clients (curl, nc) work through it.
#[macro_use]
mod common;
use common::*;
use std::{
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{atomic::AtomicU64, Arc},
    thread,
    time::{Duration, Instant},
};

fn proxy_addr() -> SocketAddr {
    "127.0.0.1:7777".parse().unwrap()
}

/// Connects a client to the proxy and reads one byte: how a client the proxy resets sees it.
fn first_read_of_a_new_client() -> std::io::Result<usize> {
    first_read_of_a_client_of(proxy_addr())
}

/// A client through the proxy and the upstream's end of its connection.
fn through(upstream: &TcpListener) -> (TcpStream, TcpStream) {
    let client = connect(proxy_addr());
    let (server, _) = upstream.accept().unwrap();
    server.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    (client, server)
}

/// An upstream that never answers: a listener whose accept queue is full, so SYNs to it are
/// dropped. Returns it and the connections that fill its queue (drop them and accept to make it
/// answer).
fn silent_upstream(addr: &str) -> (socket2::Socket, Vec<TcpStream>) {
    let addr: SocketAddr = addr.parse().unwrap();
    let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener.bind(&addr.into()).unwrap();
    listener.listen(0).unwrap();
    let fill = (0..2).filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()).collect();
    (listener, fill)
}

/// An upstream connection that completes while the proxy cannot see it yet (stopped here; busy
/// in life), then the proxy dies: the upstream read a clean EOF, a client that said nothing,
/// where its client was reset (a re-check pass). It is armed to reset from when it is made.
#[test]
fn an_upstream_connection_the_proxy_had_not_seen_complete_is_reset_when_the_proxy_dies() {
    let _netns = enter_netns();
    let (upstream, fill) = silent_upstream("127.0.0.1:9000");
    let mut proxy = Skrelay::start(&["proxy", "--upstream", "127.0.0.1:9000", "--connect-timeout", "30"]);
    let mut client = connect(proxy_addr());
    // Its SYN is dropped while the upstream's queue is full; stopped, the proxy cannot see the
    // retransmitted one answered once the queue has room.
    thread::sleep(Duration::from_millis(200));
    proxy.signal(libc::SIGSTOP);
    let fill_ports: Vec<u16> = fill.iter().map(|s| s.local_addr().unwrap().port()).collect();
    drop(fill);
    upstream.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let server = loop {
        assert!(Instant::now() < deadline, "the proxy's upstream connection never completed");
        match upstream.accept() {
            Ok((s, peer)) if peer.as_socket().is_some_and(|p| fill_ports.contains(&p.port())) => drop(s),
            Ok((s, _)) => break TcpStream::from(s),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    };
    proxy.child.kill().unwrap();
    proxy.wait(Duration::from_secs(5));
    server.set_nonblocking(false).unwrap();
    server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let r = (&server).read(&mut [0u8; 1]);
    assert!(matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset), "the upstream connection: {r:?}");
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let r = client.read(&mut [0u8; 1]);
    assert!(matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset), "the client: {r:?}");
}

fn every_byte_arrives_in_order_both_ways_and_half_close_keeps_the_other_way(dp: &str) {
    let _netns = enter_netns();
    const LEN: u64 = 64 << 20;
    let upstream = TcpListener::bind("127.0.0.1:9000").unwrap();
    let proxy = Skrelay::start(&["proxy", "--datapath", dp, "--upstream", "127.0.0.1:9000"]);
    let (client, server) = through(&upstream);
    let (jc, js) = (exchange(client, 1, LEN), exchange(server, 2, LEN));
    let (sent_c, got_c) = jc.join().unwrap();
    let (sent_s, got_s) = js.join().unwrap();
    assert_eq!(got_s, (LEN, sent_c), "{dp}: client -> upstream");
    assert_eq!(got_c, (LEN, sent_s), "{dp}: upstream -> client");

    // Half-close: the client finishes its request, the upstream answers afterwards.
    let (mut client, mut server) = through(&upstream);
    client.write_all(b"request").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (n, got) = recv_all(&mut server).unwrap();
    assert_eq!((n, got), (7, sha(b"request")), "{dp}");
    // The client reads while the answer is sent: 4 MiB need not fit in the buffers between.
    let receiving = thread::spawn(move || recv_all(&mut client).unwrap());
    let answer = send_pattern(&mut server, 3, 4 << 20).unwrap();
    server.shutdown(Shutdown::Write).unwrap();
    assert_eq!(receiving.join().unwrap(), (4 << 20, answer), "{dp}: answer after half-close");
    let (status, log) = proxy.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

per_datapath!(every_byte_arrives_in_order_both_ways_and_half_close_keeps_the_other_way);

fn bytes_sent_while_the_upstream_connection_is_made_arrive_in_order(dp: &str) {
    // The first upstream never answers (its accept queue is full, so SYNs are dropped): the
    // client's early bytes wait out --connect-timeout and then reach the second upstream.
    let _netns = enter_netns();
    let (_blackhole, _fill) = silent_upstream("127.0.0.1:9001");
    let upstream = TcpListener::bind("127.0.0.1:9002").unwrap();
    let proxy = Skrelay::start(&[
        "proxy",
        "--datapath",
        dp,
        "--connect-timeout",
        "0.5",
        "--upstream",
        "127.0.0.1:9001",
        "--upstream",
        "127.0.0.1:9002",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let t0 = Instant::now();
    let mut client = connect(proxy_addr());
    let early = send_pattern(&mut client, 8, 1 << 20).unwrap();
    let (mut server, _) = upstream.accept().unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(400), "{dp}: the first upstream was not waited for");
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(recv_all(&mut server).unwrap(), (1 << 20, early), "{dp}");
    let m = proxy.wait_metrics("the first upstream marked down", Duration::from_secs(5), |m| {
        m.get("skrelay_upstream_up{upstream=\"127.0.0.1:9001\"}") == 0
    });
    assert_eq!(m.get("skrelay_upstream_connect_failures_total{upstream=\"127.0.0.1:9001\"}"), 1, "{dp}:\n{}", m.text);
    assert_eq!(m.get("skrelay_upstream_up{upstream=\"127.0.0.1:9002\"}"), 1, "{dp}:\n{}", m.text);
    assert_eq!(m.get("skrelay_upstream_connect_failures_total{upstream=\"127.0.0.1:9002\"}"), 0, "{dp}:\n{}", m.text);
    // Marked down: the next client goes straight to the second upstream.
    let t1 = Instant::now();
    let mut c2 = connect(proxy_addr());
    let (mut s2, _) = upstream.accept().unwrap();
    assert!(t1.elapsed() < Duration::from_millis(400), "{dp}: a down upstream was tried again");
    c2.write_all(b"fast").unwrap();
    assert_eq!(read_n(&mut s2, 4), b"fast");
}

per_datapath!(bytes_sent_while_the_upstream_connection_is_made_arrive_in_order);

#[test]
fn upstreams_are_used_round_robin_and_a_refusing_one_is_skipped() {
    let _netns = enter_netns();
    let ups: Vec<TcpListener> = (0..2).map(|i| TcpListener::bind(("127.0.0.1", 9010 + i)).unwrap()).collect();
    for u in &ups {
        u.set_nonblocking(true).unwrap();
    }
    // 9012 refuses: nothing listens there.
    let _proxy = Skrelay::start(&[
        "proxy",
        "--datapath",
        "userspace",
        "--upstream",
        "127.0.0.1:9010",
        "--upstream",
        "127.0.0.1:9012",
        "--upstream",
        "127.0.0.1:9011",
    ]);
    let mut served = [0usize; 2];
    let mut clients = vec![];
    for i in 0..6 {
        let mut c = connect(proxy_addr());
        c.write_all(format!("client {i}").as_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        'wait: loop {
            for (k, u) in ups.iter().enumerate() {
                if let Ok((s, _)) = u.accept() {
                    served[k] += 1;
                    clients.push((c, s));
                    break 'wait;
                }
            }
            assert!(Instant::now() < deadline, "client {i} reached no upstream");
            thread::sleep(Duration::from_millis(5));
        }
    }
    assert_eq!(served, [3, 3], "round-robin over the two live upstreams");
    for (i, (_c, s)) in clients.iter_mut().enumerate() {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let want = format!("client {i}");
        assert_eq!(read_n(s, want.len()), want.as_bytes());
    }
}

#[test]
fn a_client_is_reset_when_no_upstream_can_be_reached_and_the_proxy_keeps_serving() {
    let _netns = enter_netns();
    let proxy = Skrelay::start(&[
        "proxy",
        "--datapath",
        "userspace",
        "--upstream",
        "127.0.0.1:9020",
        "--metrics",
        "127.0.0.1:0",
    ]);
    // The proxy accepts, fails to reach the upstream and resets the client, all within microseconds
    // on loopback: the reset may already be there when connect(2) reports, so it counts there too.
    let r = first_read_of_a_new_client();
    assert!(matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset), "expected a reset, got {r:?}");
    let m = proxy.wait_metrics("a failed connect", Duration::from_secs(5), |m| {
        m.get("skrelay_upstream_connect_failures_total{upstream=\"127.0.0.1:9020\"}") > 0
    });
    assert_eq!(m.get("skrelay_upstream_connect_failures_total{upstream=\"127.0.0.1:9020\"}"), 1, "{}", m.text);
    assert_eq!(m.get("skrelay_upstream_up{upstream=\"127.0.0.1:9020\"}"), 0, "{}", m.text);
    assert_eq!(m.sum("skrelay_pairs_total"), 0, "a client without an upstream is no pair:\n{}", m.text);
    // The upstream comes up: the next client is served (down upstreams are still tried last).
    let upstream = TcpListener::bind("127.0.0.1:9020").unwrap();
    let (mut c, mut s) = through(&upstream);
    c.write_all(b"up now").unwrap();
    assert_eq!(read_n(&mut s, 6), b"up now");
}

fn a_reset_on_either_side_reaches_the_other(dp: &str) {
    let _netns = enter_netns();
    let upstream = TcpListener::bind("127.0.0.1:9030").unwrap();
    let _proxy = Skrelay::start(&["proxy", "--datapath", dp, "--upstream", "127.0.0.1:9030"]);
    for upstream_resets in [false, true] {
        let (c, s) = through(&upstream);
        let (resetter, mut other) = if upstream_resets { (s, c) } else { (c, s) };
        socket2::SockRef::from(&resetter).set_linger(Some(Duration::ZERO)).unwrap();
        drop(resetter);
        other.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let r = other.read(&mut [0u8; 4]);
        assert!(
            matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "{dp}, upstream resets: {upstream_resets}: got {r:?}"
        );
    }
}

per_datapath!(a_reset_on_either_side_reaches_the_other);

/// An upstream that writes its reply and resets (as a server does that closes with a request
/// unread): the client reads the whole reply, then the reset, as it would talking to the
/// upstream directly.
fn an_upstream_reply_followed_by_a_reset_reaches_the_client_first(dp: &str) {
    let _netns = enter_netns();
    let upstream = TcpListener::bind("127.0.0.1:9035").unwrap();
    let proxy =
        Skrelay::start(&["proxy", "--datapath", dp, "--upstream", "127.0.0.1:9035", "--metrics", "127.0.0.1:0"]);
    for (i, len) in [16u64, 100_000].into_iter().enumerate() {
        let (mut client, server) = through(&upstream);
        let want = send_then_reset(server, 60 + i as u64, len);
        thread::sleep(Duration::from_millis(100));
        let (got, end) = read_until_end(&mut client);
        assert_eq!((got.len() as u64, sha(&got)), (len, want), "{dp}: the reply of {len} bytes");
        assert!(matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset), "{dp}: then the reset, got {end:?}");
    }
    let m = proxy.wait_pairs_ended(2, Duration::from_secs(5));
    assert_eq!(m.pairs(dp, "reset"), 2, "{dp}:\n{}", m.text);
}

per_datapath!(an_upstream_reply_followed_by_a_reset_reaches_the_client_first);

#[test]
fn start_up_errors_are_one_sentence_and_exit_status_2() {
    let _netns = enter_netns();
    let (code, _, err) = skrelay_output(&["proxy", "--upstream", "no-such-host.invalid:80"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("skrelay: cannot resolve upstream `no-such-host.invalid:80`"), "{err}");
    let (code, _, err) = skrelay_output(&["proxy"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--upstream <ADDR>"), "{err}");
    let (code, _, err) = skrelay_output(&["proxy", "--upstream", "127.0.0.1:80", "--ports", "9-3"]);
    assert_eq!(code, 2, "{err}");
}

fn curl_downloads_a_file_from_python_http_server_through_the_proxy(dp: &str) {
    let _netns = enter_netns();
    // One directory per case: the kernel and userspace cases run at the same time.
    let dir = std::env::temp_dir().join(format!("skrelay-proxy-http-{}-{dp}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut blob = vec![0u8; 6 << 20];
    Pattern::new(42).fill(&mut blob);
    std::fs::write(dir.join("blob.bin"), &blob).unwrap();
    let _server = Reaper(
        Command::new("python3")
            .args(["-m", "http.server", "9040", "--bind", "127.0.0.1"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect("127.0.0.1:9040").is_err() {
        assert!(Instant::now() < deadline, "http.server did not start");
        thread::sleep(Duration::from_millis(20));
    }
    let proxy = Skrelay::start(&["proxy", "--datapath", dp, "--upstream", "localhost:9040"]);
    for _ in 0..3 {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20", "http://127.0.0.1:7777/blob.bin"])
            .output()
            .expect("curl");
        assert!(out.status.success(), "{dp}: curl: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(sha(&out.stdout), sha(&blob), "{dp}: downloaded file differs");
    }
    let (status, log) = proxy.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

per_datapath!(curl_downloads_a_file_from_python_http_server_through_the_proxy);

#[test]
fn one_echo_service_answers_on_7_77_and_777_through_proxy_ports_with_real_nc() {
    // The seed's demo: ncat echoes on 8007; skrelay proxy listens on 7777 and takes 7, 77, 777.
    let _netns = enter_netns();
    if !require_bpf("proxy: one_echo_service_answers_on_7_77_and_777_through_proxy_ports_with_real_nc") {
        return;
    }
    let _echo = Reaper(
        Command::new("ncat")
            .args(["-4lke", "/bin/cat", "127.0.0.1", "8007"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ncat"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect("127.0.0.1:8007").is_err() {
        assert!(Instant::now() < deadline, "ncat did not start");
        thread::sleep(Duration::from_millis(20));
    }
    let _proxy =
        Skrelay::start(&["proxy", "--listen", "127.0.0.1:7777", "--ports", "7,77,777", "--upstream", "127.0.0.1:8007"]);
    // nc without -N: `ncat -e` drops the echo when its client half-closes first (KERNEL-NOTES).
    for port in ["7", "77", "777", "7777"] {
        let mut nc = Reaper(
            Command::new("nc")
                .args(["127.0.0.1", port])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("nc"),
        );
        let mut stdin = nc.0.stdin.take().unwrap();
        stdin.write_all(format!("hello on {port}\n").as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(nc.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line, format!("hello on {port}\n"), "port {port}");
    }
    // A port outside the list is refused.
    assert!(TcpStream::connect("127.0.0.1:778").is_err());
}

/// Open file descriptors of a process.
/// Sockets `pid` holds open (its pipes, which the splice(2) datapath keeps for reuse, are not).
fn open_sockets(pid: i32) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0 };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

#[test]
fn a_proxy_whose_upstream_is_itself_is_refused_at_start_up() {
    // It used to accept one client and open ~18,000 sockets a second until EMFILE killed it.
    let _netns = enter_netns();
    let cases: [&[&str]; 5] = [
        &["--listen", "127.0.0.1:7777", "--upstream", "127.0.0.1:7777"],
        &["--listen", "[::ffff:127.0.0.1]:7777", "--upstream", "127.0.0.1:7777"],
        &["--listen", "0.0.0.0:7777", "--upstream", "127.0.0.5:7777"],
        &["--listen", "localhost:7777", "--upstream", "localhost:7777"],
        &["--listen", "127.0.0.1:7777", "--ports", "7,77", "--upstream", "127.0.0.1:77"],
    ];
    for case in cases {
        let args = [&["proxy", "--datapath", "userspace"][..], case].concat();
        let (code, _, err) = skrelay_output(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("skrelay: cannot proxy to upstream 127.0.0."), "{args:?}: {err}");
        assert!(err.contains("so every client would loop back into the proxy"), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one sentence: {err}");
    }
    // Its own metrics responder is no upstream either (it was accepted).
    let args = ["proxy", "--upstream", "127.0.0.1:7779", "--metrics", "127.0.0.1:7779", "--datapath", "userspace"];
    let (code, _, err) = skrelay_output(&args);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("it is this proxy's own --metrics address (127.0.0.1:7779)"), "{err}");
    assert_eq!(err.lines().count(), 1, "one sentence: {err}");
    let args =
        ["proxy", "--upstream", "127.0.0.1:7779", "--metrics", "[::ffff:127.0.0.1]:7779", "--datapath", "userspace"];
    let (code, _, err) = skrelay_output(&args);
    assert_eq!(code, 2, "an IPv4 metrics address in IPv6 form: {err}");
    // A link-local address of this machine under a wildcard listener: binding it to see whether
    // it is local took no interface, failed, and the loop was caught only per client.
    let ip = |args: &[&str]| Command::new("ip").args(args).status().unwrap().success();
    assert!(ip(&["link", "add", "ll0", "type", "veth", "peer", "name", "ll1"]));
    assert!(ip(&["link", "set", "ll0", "up"]) && ip(&["link", "set", "ll1", "up"]));
    assert!(ip(&["addr", "add", "fe80::a/64", "dev", "ll0", "nodad"]));
    // Under `timeout`: a proxy that starts would serve until killed (124).
    let out = Command::new("timeout")
        .args(["5", SKRELAY, "proxy", "--listen", "[::]:7300", "--upstream", "[fe80::a%ll0]:7300"])
        .args(["--datapath", "userspace"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a link-local upstream that is this proxy: {err}");
    assert!(err.contains("so every client would loop back into the proxy"), "{err}");
    // The same through --ports, and a --metrics address that --ports would steer (a re-check
    // pass: both started).
    for (args, says) in [
        (
            &["proxy", "--listen", "[::]:7300", "--upstream", "[fe80::a%ll0]:8000", "--ports", "8000"][..],
            "--ports steers port 8000 at that address to this proxy",
        ),
        (
            &[
                "proxy",
                "--listen",
                "[::]:7300",
                "--upstream",
                "[::1]:7400",
                "--metrics",
                "[fe80::a%ll0]:8001",
                "--ports",
                "8001",
            ][..],
            "cannot serve metrics on [fe80::a%",
        ),
    ] {
        let out = Command::new("timeout")
            .arg("5")
            .arg(SKRELAY)
            .args(args)
            .args(["--datapath", "userspace"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // On the kernel datapath too the refusal is one sentence: its start notes (how many pairs
    // the kernel holds) came first (a new-user pass, 2026-12-08).
    if require_bpf("a_proxy_whose_upstream_is_itself_is_refused_at_start_up (kernel datapath)") {
        let out = Command::new("timeout")
            .args(["5", SKRELAY, "proxy", "--listen", "127.0.0.1:7881", "--ports", "7882"])
            .args(["--upstream", "127.0.0.1:7882", "--datapath", "kernel"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("every client would loop back") && err.lines().count() == 1, "one sentence: {err}");
    }
    // An upstream on another port of the same address is fine.
    let _up = TcpListener::bind("127.0.0.1:7778").unwrap();
    let _proxy = Skrelay::start(&["proxy", "--datapath", "userspace", "--upstream", "127.0.0.1:7778"]);
}

#[test]
fn a_loop_the_start_up_check_cannot_see_costs_one_reset_per_client() {
    // The upstream (9050) is steered back to the proxy's own listener after it started, so
    // only the running proxy can see the loop: each client then costs one upstream connection,
    // which comes back in, is recognised and reset, and the client is reset with it.
    let _netns = enter_netns();
    if !require_bpf("proxy: a_loop_the_start_up_check_cannot_see_costs_one_reset_per_client") {
        return;
    }
    let proxy = Skrelay::start(&["proxy", "--datapath", "userspace", "--upstream", "127.0.0.1:9050"]);
    let (code, out, err) = skrelay_output(&["steer", "add", "--ports", "9050", "--to", "127.0.0.1:7777"]);
    assert_eq!(code, 0, "{out}{err}");
    let sockets = open_sockets(proxy.pid());
    for i in 1..=3 {
        let r = first_read_of_a_new_client();
        assert!(matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset), "client {i}: got {r:?}");
        proxy.wait_log("it is this proxy's own upstream connection", i, Duration::from_secs(5));
    }
    thread::sleep(Duration::from_millis(500));
    let log = proxy.log();
    assert_eq!(log.matches("own upstream connection").count(), 3, "one loop per client:\n{log}");
    assert!(log.lines().count() < 20, "a loop must not flood the log:\n{log}");
    assert!(
        open_sockets(proxy.pid()) <= sockets,
        "sockets left open: {} > {sockets}\n{log}",
        open_sockets(proxy.pid())
    );
    let (code, out, err) = skrelay_output(&["steer", "reset"]);
    assert_eq!(code, 0, "{out}{err}");
    // The proxy still serves once the upstream is real (the kernel may detach the steering
    // link a moment after reset: until then a client is still looped, and reset).
    let upstream = TcpListener::bind("127.0.0.1:9050").unwrap();
    upstream.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut c, mut s) = 'retry: loop {
        let c = connect(proxy_addr());
        let tried = Instant::now();
        while tried.elapsed() < Duration::from_millis(500) {
            if let Ok((s, _)) = upstream.accept() {
                break 'retry (c, s);
            }
            thread::sleep(Duration::from_millis(10));
        }
        assert!(Instant::now() < deadline, "the proxy did not reach its real upstream:\n{}", proxy.log());
    };
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    c.write_all(b"real").unwrap();
    assert_eq!(read_n(&mut s, 4), b"real");
}

/// The same loop across address families: a dual-stack `[::]` proxy whose IPv4 upstream is
/// steered back to it sees its own connection from `[::ffff:127.0.0.1]`, which it compared with
/// the `127.0.0.1` it had connected from, so one client made it loop until descriptors ran out
/// (a helper's IPv6 pass: 10,000 pairs in 5 s). Likewise an IPv4 proxy with an IPv4-mapped upstream.
#[test]
fn a_loop_through_an_ipv4_mapped_address_is_recognised_too() {
    let _netns = enter_netns();
    if !require_bpf("proxy: a_loop_through_an_ipv4_mapped_address_is_recognised_too") {
        return;
    }
    for (listen, upstream, to) in
        [("[::]:7777", "127.0.0.1:9051", "[::]:7777"), ("127.0.0.1:7777", "[::ffff:127.0.0.1]:9051", "127.0.0.1:7777")]
    {
        let proxy = Skrelay::start(&["proxy", "--datapath", "userspace", "--listen", listen, "--upstream", upstream]);
        let (code, out, err) = skrelay_output(&["steer", "add", "--ports", "9051", "--to", to, "--addr", "0.0.0.0/0"]);
        assert_eq!(code, 0, "{out}{err}");
        let r = first_read_of_a_new_client();
        assert!(matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset), "{listen}: got {r:?}");
        proxy.wait_log("it is this proxy's own upstream connection", 1, Duration::from_secs(5));
        thread::sleep(Duration::from_millis(300));
        let log = proxy.log();
        assert_eq!(log.matches("own upstream connection").count(), 1, "{listen}: one loop per client:\n{log}");
        let (code, out, err) = skrelay_output(&["steer", "reset"]);
        assert_eq!(code, 0, "{out}{err}");
    }
}

/// A burst of healthy clients, many more than `--max-pending`, against an upstream that answers
/// at once: every one is served (the slots free within milliseconds), none reset.
#[test]
fn a_burst_beyond_max_pending_is_served_not_reset() {
    let _netns = enter_netns();
    serve_echo(std::net::TcpListener::bind("127.0.0.1:9061").unwrap());
    let proxy = Skrelay::start(&[
        "proxy",
        "--datapath",
        "userspace",
        "--max-pending",
        "8",
        "--upstream",
        "127.0.0.1:9061",
        "--metrics",
        "127.0.0.1:0",
    ]);
    // All connect (the kernel completes each handshake) before any is read from.
    let mut clients: Vec<TcpStream> = (0..300).map(|_| connect(proxy_addr())).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.write_all(format!("{i:05}").as_bytes()).unwrap();
    }
    for (i, c) in clients.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut got = [0u8; 5];
        let r = c.read_exact(&mut got);
        assert!(r.is_ok() && got == *format!("{i:05}").as_bytes(), "client {i}: {r:?}\n{}", proxy.log());
    }
    let m = proxy.metrics();
    assert_eq!(m.get("skrelay_unpaired_clients_total{reason=\"full\"}"), 0, "{}", m.text);
}

/// Clients beyond `--max-pending` waiting for their upstream connection were reset at once: a
/// burst of 1,500 healthy clients against an upstream that answers at once lost 476 (a helper's
/// scale pass). Now the proxy stops accepting while the slots are full, so further clients wait
/// in the listen backlog (as behind HAProxy's maxconn) and are served when a slot frees.
#[test]
fn clients_beyond_max_pending_wait_in_the_backlog_and_are_served() {
    // The upstream does not answer at first (its accept queue is full, so SYNs are dropped): two
    // clients wait for their upstream connection, the third waits in the listen backlog.
    let _netns = enter_netns();
    let (blackhole, fill) = silent_upstream("127.0.0.1:9060");
    let proxy = Skrelay::start(&[
        "proxy",
        "--datapath",
        "userspace",
        "--max-pending",
        "2",
        "--connect-timeout",
        "10",
        "--upstream",
        "127.0.0.1:9060",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let mut waiting: Vec<TcpStream> = (0..2).map(|_| connect(proxy_addr())).collect();
    proxy.wait_metrics("two clients waiting", Duration::from_secs(5), |m| m.get("skrelay_pending_clients") == 2);
    let mut third = connect(proxy_addr());
    third.write_all(b"third").unwrap();
    third.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let r = third.read(&mut [0u8; 16]);
    assert!(matches!(&r, Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut), "{r:?}");
    let m = proxy.metrics();
    assert_eq!(m.get("skrelay_pending_clients"), 2, "{}", m.text);
    assert_eq!(m.get("skrelay_unpaired_clients_total{reason=\"full\"}"), 0, "{}", m.text);
    proxy.wait_log("further clients wait in the listen backlog", 1, Duration::from_secs(5));
    // The upstream answers from now on (an echo server): the waiting clients' SYNs get through
    // at their retransmission, slots free, and the third client is accepted and served.
    drop(fill);
    serve_echo(blackhole.into());
    third.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    assert_eq!(read_n(&mut third, 5), b"third", "{}", proxy.log());
    for (i, c) in waiting.iter_mut().enumerate() {
        c.write_all(b"early").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        assert_eq!(read_n(c, 5), b"early", "client {i}\n{}", proxy.log());
    }
    let m = proxy.metrics();
    assert_eq!(m.get("skrelay_unpaired_clients_total{reason=\"full\"}"), 0, "{}", m.text);
}

#[test]
fn a_client_that_leaves_while_its_upstream_connection_is_made_is_logged_in_proxy_words() {
    // The proxy used to log the relay's "left before a partner came". A client that closes
    // (which the proxy cannot tell from a half-close) waits for its upstream connection like any.
    let _netns = enter_netns();
    let (_blackhole, _fill) = silent_upstream("127.0.0.1:9070");
    let proxy = Skrelay::start(&[
        "proxy",
        "--datapath",
        "userspace",
        "--upstream",
        "127.0.0.1:9070",
        "--connect-timeout",
        "0.5",
    ]);
    drop(connect(proxy_addr()));
    proxy.wait_log("--connect-timeout", 1, Duration::from_secs(5));
    assert!(!proxy.log().contains("partner"), "{}", proxy.log());
}

/// A client that sent bytes and then reset while its upstream connection was being made is held
/// (its bytes were to reach the upstream, then its reset). When no upstream answered, it was
/// counted `no_upstream` and logged "client ... reset: no upstream could be reached", as if the
/// proxy had reset it; it left, and is counted so.
#[test]
fn a_client_that_resets_while_its_upstream_connection_is_made_is_counted_as_left() {
    let _netns = enter_netns();
    let (_blackhole, _fill) = silent_upstream("127.0.0.1:9071");
    let proxy = Skrelay::start(&[
        "proxy",
        "--datapath",
        "userspace",
        "--upstream",
        "127.0.0.1:9071",
        "--connect-timeout",
        "0.5",
        "--metrics",
        "127.0.0.1:0",
    ]);
    send_then_reset(connect(proxy_addr()), 3, 1000);
    let m = proxy
        .wait_metrics("the client counted", Duration::from_secs(5), |m| m.sum("skrelay_unpaired_clients_total") > 0);
    assert_eq!(m.get("skrelay_unpaired_clients_total{reason=\"left\"}"), 1, "{}\n{}", m.text, proxy.log());
    let log = proxy.log();
    assert!(log.contains("reset before its upstream answered"), "{log}");
    assert!(!log.contains("reset: no upstream could be reached"), "{log}");
}

fn a_client_that_half_closes_at_once_still_gets_what_the_upstream_says_first(dp: &str) {
    // A banner grab (`nc -N host port </dev/null`): the client shuts down its write side before
    // the upstream connection is made. It was taken for gone and reset (always on the kernel
    // datapath, by timing on the userspace one).
    let _netns = enter_netns();
    let upstream = std::net::TcpListener::bind("127.0.0.1:9080").unwrap();
    thread::spawn(move || {
        for s in upstream.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(50));
                let _ = s.write_all(b"banner\n");
                let _ = s.read_to_end(&mut Vec::new());
            });
        }
    });
    let proxy = Skrelay::start(&["proxy", "--datapath", dp, "--upstream", "127.0.0.1:9080"]);
    for round in 0..5 {
        let mut c = connect(proxy_addr());
        c.shutdown(std::net::Shutdown::Write).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let r = c.read_to_end(&mut got);
        assert!(r.is_ok() && got == b"banner\n", "{dp}, round {round}: {r:?} {got:?}\n{}", proxy.log());
    }
}

per_datapath!(a_client_that_half_closes_at_once_still_gets_what_the_upstream_says_first);

/// Each client that found its only upstream refusing logged "marked down for 10s" again for an
/// upstream already down (two lines a client: 4,003 lines for 2,000 clients in a helper's pass).
/// The upstream's going down is said once; each client's reset still is.
#[test]
fn an_upstream_going_down_is_said_once_not_once_per_client() {
    let _netns = enter_netns();
    let proxy = Skrelay::start(&[
        "proxy",
        "--datapath",
        "userspace",
        "--upstream",
        "127.0.0.1:9081",
        "--metrics",
        "127.0.0.1:0",
    ]);
    for _ in 0..10 {
        let r = first_read_of_a_new_client();
        assert!(matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset), "expected a reset, got {r:?}");
    }
    // Back: said once too (nothing said so; a helper's failover pass).
    let _up = std::net::TcpListener::bind("127.0.0.1:9081").unwrap();
    for _ in 0..3 {
        let c = std::net::TcpStream::connect(proxy_addr()).unwrap();
        drop(c);
    }
    proxy.wait_log("connected again", 1, Duration::from_secs(5));
    // Each of the three clients' upstream connections is taken before the listener goes: one
    // still on its way found the port closed and said "marked down" a second time (a fresh-clone
    // CI run). Taken and dropped, their pairs end.
    _up.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut taken = 0;
    while taken < 3 && std::time::Instant::now() < deadline {
        match _up.accept() {
            Ok(_) => taken += 1,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    drop(_up);
    let (status, log) = proxy.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    assert_eq!(log.matches("marked down for 10s").count(), 1, "{log}");
    // Each client counted once: a line of its own, or in a count of those a flood's warning
    // left unsaid (at most one such warning a second: a proxy pass saw 13,000 lines in 0.8 s).
    let own = log.matches("reset: no upstream could be reached").count();
    let counted: usize = log
        .split(" more reset because no upstream could be reached")
        .chain(log.split(" more clients reset because no upstream could be reached"))
        .filter_map(|before| before.rsplit(['(', ' ', '\n']).next()?.parse::<usize>().ok())
        .sum();
    assert_eq!(own + counted, 10, "{log}");
    assert!(own < 10, "ten clients in a row each had a line of their own:\n{log}");
    assert_eq!(log.matches("upstream 127.0.0.1:9081: connected again; up").count(), 1, "{log}");
}

/// A multicast or broadcast upstream was taken at start, and every client was then reset.
#[test]
fn an_upstream_no_tcp_connection_can_reach_is_refused_at_start() {
    let _netns = enter_netns();
    for up in ["224.0.0.1:80", "255.255.255.255:80", "[ff02::1]:80"] {
        // Under `timeout`: a build that takes the address starts and serves.
        let out =
            std::process::Command::new("timeout").args(["5", SKRELAY, "proxy", "--upstream", up]).output().unwrap();
        let (code, err) = (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr));
        assert_eq!(code, 2, "{up}: {err}");
        assert!(err.contains("is a multicast or broadcast address"), "{up}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{up}: one sentence: {err}");
    }
}

/// An upstream echoes 30 MiB of a client's upload, waits until the proxy has acknowledged all of
/// it and moved it on toward the client, and resets. The client reads only from 0.6 s on: it gets every echoed byte, then the
/// reset. On the kernel datapath it was reset 0.03-0.2 s after the upstream, the reply unread
/// (a helper's pass: 12 of 16 clients): the other direction's write to the reset socket had
/// failed, and that error was taken for "nothing more to wait for".
fn a_reply_acknowledged_before_the_upstreams_reset_reaches_a_client_that_reads_late(dp: &str) {
    let _netns = enter_netns();
    const UPLOAD: u64 = 50 << 20;
    const ECHO_UNTIL: usize = 30 << 20;
    let upstream = TcpListener::bind("127.0.0.1:9090").unwrap();
    let proxy = Skrelay::start(&["proxy", "--datapath", dp, "--upstream", "127.0.0.1:9090"]);
    // Not every round met it before the fix (4 rounds failed in 1 of 4 runs): six.
    for round in 0..6 {
        let listener = upstream.try_clone().unwrap();
        let (to_server, client_end) = std::sync::mpsc::channel::<(TcpStream, Arc<AtomicU64>)>();
        let server = thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            // A slow start: the upload parks at the proxy, so its direction is still moving
            // parked bytes, and meets the reset, when the upstream resets.
            thread::sleep(Duration::from_millis(300));
            let mut buf = vec![0u8; 1 << 20];
            let mut echoed = 0;
            while echoed < ECHO_UNTIL {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0, "the client's upload ended early");
                c.write_all(&buf[..n]).unwrap();
                echoed += n;
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while unacked(&c) > 0 {
                assert!(Instant::now() < deadline, "the proxy never took the echo");
                thread::sleep(Duration::from_millis(5));
            }
            // Then out of the proxy's socket, where it may park a few ms, and a reset loses what
            // is parked there (KERNEL-NOTES item 12: a CPU-loaded soak lost 9.5 MB at once).
            let (client, read) = client_end.recv().unwrap();
            wait_out_of_the_senders_socket_while_read(&client, echoed as u64, &read, "the echo");
            socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
            echoed
        });
        let mut client = connect(proxy_addr());
        let read = Arc::new(AtomicU64::new(0));
        to_server.send((client.try_clone().unwrap(), Arc::clone(&read))).unwrap();
        let mut upload = client.try_clone().unwrap();
        // In 1 MiB writes, as a helper's client. The upload stops with an error once the proxy
        // resets the client.
        let uploading = thread::spawn(move || send_pattern_mib(&mut upload, round, UPLOAD >> 20));
        thread::sleep(Duration::from_millis(600));
        let (got, end) = read_until_end_counting(&mut client, &read);
        let echoed = server.join().unwrap();
        // The reset reaches the reader, or the writer if its write took the socket's error
        // first (then the reader gets 0, as Linux gives after a reset was reported).
        let upload = uploading.join().unwrap();
        let reset = |r: &std::io::Result<()>| matches!(r, Err(e) if e.kind() == ErrorKind::ConnectionReset);
        assert!(
            reset(&end) || (end.is_ok() && reset(&upload)),
            "{dp} round {round}: {end:?} after {} bytes (upload: {upload:?})\n{}",
            got.len(),
            proxy.log()
        );
        assert_eq!(
            got.len(),
            echoed,
            "{dp} round {round}: the client got {} of the {echoed} echoed bytes\n{}",
            got.len(),
            proxy.log()
        );
        let mut want = vec![0u8; echoed.next_multiple_of(8)];
        Pattern::new(round).fill(&mut want);
        assert!(got[..] == want[..echoed], "{dp} round {round}: the echo differs from the upload");
    }
}

per_datapath!(a_reply_acknowledged_before_the_upstreams_reset_reaches_a_client_that_reads_late);

/// A client that connects, sends nothing and resets while it waits in the listen backlog (the
/// proxy stopped meanwhile) costs the upstream nothing: the proxy opened a connection for it,
/// which the upstream accepted and saw reset at once (a helper's churn pass). It counts as left.
#[test]
fn a_client_gone_before_it_was_accepted_opens_no_upstream_connection() {
    let _netns = enter_netns();
    let upstream = TcpListener::bind("127.0.0.1:9070").unwrap();
    upstream.set_nonblocking(true).unwrap();
    let proxy = Skrelay::start(&[
        "proxy",
        "--datapath",
        "userspace",
        "--upstream",
        "127.0.0.1:9070",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let signal = |sig: &str| {
        assert!(Command::new("kill").args([sig, &proxy.pid().to_string()]).status().unwrap().success());
    };
    signal("-STOP");
    let gone = connect(proxy_addr());
    socket2::SockRef::from(&gone).set_linger(Some(Duration::ZERO)).unwrap();
    drop(gone);
    thread::sleep(Duration::from_millis(100));
    signal("-CONT");
    let m = proxy.wait_metrics("the client counted", Duration::from_secs(5), |m| {
        m.get("skrelay_unpaired_clients_total{reason=\"left\"}") == 1
    });
    thread::sleep(Duration::from_millis(300));
    assert!(
        matches!(upstream.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "the upstream got a connection for a client that was gone:\n{}\n{}",
        m.text,
        proxy.log()
    );
}

/// The end-of-pair line names the proxy's end of the upstream connection: the address the
/// upstream's own log has for this client.
/// An IPv4-mapped upstream (`[::ffff:127.0.0.1]`) is named in IPv4, as the upstream names it.
#[test]
fn the_end_of_pair_line_names_the_upstream_connections_local_address() {
    let _netns = enter_netns();
    let upstream = TcpListener::bind("127.0.0.1:9080").unwrap();
    for to in ["127.0.0.1:9080", "[::ffff:127.0.0.1]:9080"] {
        let proxy = Skrelay::start(&["proxy", "--upstream", to]);
        let mut client = connect(proxy_addr());
        let (mut server, seen_from) = upstream.accept().unwrap();
        client.write_all(b"ping").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_n(&mut server, 4), b"ping");
        drop(server);
        assert_eq!(recv_all(&mut client).unwrap().0, 0);
        proxy.wait_log(" ended after ", 1, Duration::from_secs(5));
        let log = proxy.log();
        let line = log.lines().find(|l| l.contains(" ended after ")).unwrap();
        assert!(line.ends_with(&format!("; upstream connection from {seen_from}")), "{to}: {line}");
        let _ = proxy.stop(Duration::from_secs(5));
    }
}

/// A link-local upstream on another interface that leads back to this proxy (a veth pair with
/// both ends here) is a loop the start cannot see: the connection leaves by one interface and
/// comes back by the other, named by the other's index. It was not recognised as the proxy's own,
/// and one client became 20,000 connections in 3 s (a re-check pass); now it is one reset.
#[test]
fn a_link_local_loop_through_another_interface_costs_one_reset_per_client() {
    let _netns = enter_netns();
    let ip = |args: &[&str]| Command::new("ip").args(args).status().unwrap().success();
    assert!(ip(&["link", "add", "ll0", "type", "veth", "peer", "name", "ll1"]));
    assert!(ip(&["link", "set", "ll0", "up"]) && ip(&["link", "set", "ll1", "up"]));
    assert!(ip(&["addr", "add", "fe80::a/64", "dev", "ll0", "nodad"]));
    assert!(ip(&["addr", "add", "fe80::b/64", "dev", "ll1", "nodad"]));
    let proxy = Skrelay::start(&[
        "proxy",
        "--datapath",
        "userspace",
        "--listen",
        "[::]:7300",
        "--upstream",
        "[fe80::a%ll1]:7300",
        "--metrics",
        "127.0.0.1:9300",
    ]);
    let mut c = TcpStream::connect("[::1]:7300").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let got = send_then_read(&mut c, b"x");
    assert!(matches!(&got, Err(e) if e.kind() == ErrorKind::ConnectionReset), "{got:?}\n{}", proxy.log());
    thread::sleep(Duration::from_millis(500));
    let m = proxy.metrics();
    assert_eq!(m.get("skrelay_unpaired_clients_total{reason=\"loop\"}"), 1, "{}\n{}", m.text, proxy.log());
    let (status, log) = proxy.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

/// An upstream that writes a 24 MiB reply in one write(2), waits 1 s and resets, to clients that
/// read only after 3 s: a helper's pass saw clients of the kernel proxy (default `--kernel-after`)
/// 0.3-3.7 MB short and took it for bytes skrelay lost. They are the upstream's own: the write
/// returned once its send buffer took the rest, the proxy had closed its window (the client did
/// not read), and the reset (SO_LINGER 0) threw away what its send queue still held. Every byte
/// the upstream's TCP got acknowledged reaches its client, then the reset (KERNEL-NOTES item 18).
fn an_upstream_reset_delivers_every_byte_it_had_handed_over(dp: &str) {
    let _netns = enter_netns();
    const REPLY: u64 = 24 << 20;
    let mut reply = vec![0u8; REPLY as usize];
    Pattern::new(11).fill(&mut reply);
    let reply = std::sync::Arc::new(reply);
    let up = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = up.local_addr().unwrap().to_string();
    let sent = reply.clone();
    let upstream = std::thread::spawn(move || {
        let mut served = Vec::new();
        for conn in up.incoming().take(4) {
            let (mut conn, reply) = (conn.unwrap(), sent.clone());
            served.push(std::thread::spawn(move || {
                conn.write_all(&reply).unwrap();
                std::thread::sleep(Duration::from_secs(1));
                let unsent = unacked(&conn) as u64;
                socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO)).unwrap();
                REPLY - unsent
            }));
        }
        served.into_iter().map(|t| t.join().unwrap()).collect::<Vec<_>>()
    });
    // The kernel case as the helper ran it: the pair joins the kernel after a userspace start.
    let mut args = vec!["proxy", "--datapath", dp, "--listen", "127.0.0.1:7271", "--upstream", &up_addr];
    if dp == "kernel" {
        args.extend(["--kernel-after", "65536"]);
    }
    let proxy = Skrelay::start(&args);
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let mut c = connect("127.0.0.1:7271".parse().unwrap());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(3));
                read_until_end(&mut c)
            })
        })
        .collect();
    let mut got = Vec::new();
    for client in clients {
        let (bytes, end) = client.join().unwrap();
        assert!(end.is_err(), "a client got a clean end, not the upstream's reset, after {} bytes", bytes.len());
        assert!(bytes[..] == reply[..bytes.len()], "a client got other bytes than the reply's first {}", bytes.len());
        got.push(bytes.len() as u64);
    }
    let mut acknowledged = upstream.join().unwrap();
    got.sort_unstable();
    acknowledged.sort_unstable();
    assert_eq!(got, acknowledged, "what each client got against what its upstream's TCP handed over\n{}", proxy.log());
}

per_datapath!(an_upstream_reset_delivers_every_byte_it_had_handed_over);

/// A client that sends and then resets with the upstream's echo unread (as `ncat --send-only`
/// does, closing with input unread): the upstream, an echo server, gets every byte the proxy
/// took, in order, then the reset, at once. Before, the proxy held back the echo meant for the
/// client that was gone, so the upstream, blocked writing it, stopped reading what the client had
/// sent, and the pair stalled until --idle-timeout holding 27 MB (a helper's pass: every time on
/// splice(2), under load on the kernel datapath).
fn a_client_that_resets_with_the_echo_unread_does_not_stall_its_upstream(dp: &str) {
    reset_with_the_echo_unread(dp, 1, Duration::from_secs(3));
}

per_datapath!(a_client_that_resets_with_the_echo_unread_does_not_stall_its_upstream);

/// The same with an echo that writes each chunk back five times: on splice(2) the drop was
/// bounded by twice what the upstream took, and such a pair stalled until --idle-timeout, the
/// upstream short of 2-14 MB (a re-check pass); it now also drops 16 MiB a second.
fn an_echo_that_answers_five_times_what_it_reads_is_not_stalled_either(dp: &str) {
    reset_with_the_echo_unread(dp, 5, Duration::from_secs(10));
}

per_datapath!(an_echo_that_answers_five_times_what_it_reads_is_not_stalled_either);

/// A client writes without reading to an upstream that echoes each chunk `copies` times, then
/// resets; the upstream must get every byte the proxy acknowledged, then the reset, `within`.
fn reset_with_the_echo_unread(dp: &str, copies: usize, within: Duration) {
    let _netns = enter_netns();
    let upstream = TcpListener::bind("127.0.0.1:9037").unwrap();
    let proxy = Skrelay::start(&["proxy", "--datapath", dp, "--upstream", "127.0.0.1:9037", "--idle-timeout", "60"]);
    let (mut client, server) = through(&upstream);
    // The upstream echoes what it reads, blocking on each write, as `cat` does.
    let echo = thread::spawn(move || {
        let mut server = server;
        server.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        server.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        // Once a write fails (the reset), it reads on: what its socket took is counted, not
        // what a `cat` would have read before it died.
        let (mut got, mut buf, mut write_error) = (Vec::new(), vec![0u8; 64 << 10], None);
        let end = loop {
            match server.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    for _ in 0..copies {
                        if write_error.is_none() {
                            write_error = server.write_all(&buf[..n]).err();
                        }
                    }
                }
                Err(e) => break Err(e),
            }
        };
        // The reset comes to whichever call meets it first.
        let reset = |e: &std::io::Error| matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe);
        let end = match (end, write_error) {
            (Ok(()), Some(e)) if reset(&e) => Err(std::io::Error::from(ErrorKind::ConnectionReset)),
            (end, _) => end,
        };
        (got, end, Instant::now())
    });
    // The client writes without reading until nothing more goes for half a second: the echo fills
    // the way back and the upstream stops reading. Then it resets.
    let mut pattern = vec![0u8; 192 << 20];
    Pattern::new(5).fill(&mut pattern);
    client.set_nonblocking(true).unwrap();
    let (mut sent, mut last) = (0, Instant::now());
    while sent < pattern.len() && last.elapsed() < Duration::from_millis(500) {
        match client.write(&pattern[sent..(sent + (1 << 20)).min(pattern.len())]) {
            Ok(n) => (sent, last) = (sent + n, Instant::now()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(1)),
            Err(e) => panic!("{dp}: the client's write failed: {e}"),
        }
    }
    assert!(sent < pattern.len(), "{dp}: the way back never filled");
    // What the proxy has not acknowledged is lost with the reset, as with TCP end to end.
    let unacked = unacked(&client) as usize;
    socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO)).unwrap();
    drop(client);
    let reset_at = Instant::now();
    let (got, end, ended_at) = echo.join().unwrap();
    assert!(
        got.len() >= sent - unacked && got.len() <= sent,
        "{dp}: the upstream got {} bytes of the {} the proxy took\n{}",
        got.len(),
        sent - unacked,
        proxy.log()
    );
    assert!(got[..] == pattern[..got.len()], "{dp}: the upstream's bytes are not the client's, in order");
    assert!(
        matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{dp}: the upstream should see the reset after {} bytes, got {end:?}\n{}",
        got.len(),
        proxy.log()
    );
    let took = ended_at - reset_at;
    assert!(took < within, "{dp}: the upstream was reset {took:?} after the client");
}
