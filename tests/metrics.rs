//! `--metrics` of relay and proxy, and `skrelay metrics`: scraped with curl (a real client) after
//! sha256-checked transfers; the counters must equal what moved, on both datapaths.
#[macro_use]
mod common;
use common::*;
use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::Command,
    time::{Duration, Instant},
};

const RELAY: &str = "127.0.0.1:7777";
const MIB: u64 = 1 << 20;

fn addr() -> SocketAddr {
    RELAY.parse().unwrap()
}

/// The URL the start line names (`metrics at http://ADDR/metrics`).
fn metrics_url(log: &str) -> String {
    let at = log.find("metrics at http://").unwrap_or_else(|| panic!("no metrics URL in the start line:\n{log}"));
    log[at + "metrics at ".len()..].split_whitespace().next().unwrap().to_string()
}

/// GET `url` with curl; asserts a 200 in the Prometheus text format.
fn scrape(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "5", "-D", "/dev/stderr", url])
        .output()
        .expect("run curl (scripts/setup.sh)");
    let head = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "curl {url} failed: {head}");
    assert!(head.contains("text/plain; version=0.0.4"), "not the Prometheus text format: {head}");
    String::from_utf8(out.stdout).unwrap()
}

/// The value of the sample `series` (name and labels, exactly as exported).
fn value(text: &str, series: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.strip_prefix(series).is_some_and(|r| r.starts_with(' ')))
        .unwrap_or_else(|| panic!("no `{series}` in the scrape:\n{text}"));
    line[series.len() + 1..].trim().parse().unwrap_or_else(|_| panic!("not a number: {line}"))
}

/// Scrapes until `series` reads `want` (the loop may not have acted on an event yet).
fn wait_value(url: &str, series: &str, want: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(url);
        if value(&text, series) == want {
            return text;
        }
        assert!(Instant::now() < deadline, "`{series}` never read {want}:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn reset(s: TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt reads `linger`, a live local of the size passed, on a socket we own.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
    drop(s);
}

fn relay_counters_equal_the_bytes_moved_on_both_datapaths(dp: &str) {
    let _netns = enter_netns();
    const LEN: u64 = 32 * MIB;
    let relay = Skrelay::start(&["relay", "--datapath", dp, "--metrics", "127.0.0.1:0"]);
    let url = metrics_url(&relay.log());
    let text = scrape(&url);
    assert!(text.contains(&format!("skrelay_build_info{{version=\"{}\"}} 1\n", env!("CARGO_PKG_VERSION"))));
    assert_eq!(value(&text, "skrelay_kernel_inflight_bytes"), 0, "{text}");
    let active = format!("skrelay_pairs_active{{datapath=\"{dp}\"}}");
    let total = |ending: &str| format!("skrelay_pairs_total{{datapath=\"{dp}\",ending=\"{ending}\"}}");
    let bytes = format!("skrelay_bytes_total{{datapath=\"{dp}\"}}");

    // A waits for its partner; once B comes the pair is active.
    let mut a = connect(addr());
    wait_value(&url, "skrelay_pending_clients", 1);
    let mut b = connect(addr());
    a.write_all(b"x").unwrap();
    assert_eq!(read_n(&mut b, 1), b"x");
    let text = wait_value(&url, &active, 1);
    assert_eq!(value(&text, "skrelay_pending_clients"), 0, "{text}");

    // Both ways at once, sha256 checked; then the pair ends with EOF both ways.
    exchange_both_ways(a, b, [1, 2], LEN, dp);
    let text = wait_value(&url, &total("eof"), 1);
    assert_eq!(value(&text, &bytes), 2 * LEN + 1, "{dp}: bytes counted:\n{text}");
    assert_eq!(value(&text, &active), 0, "{text}");
    assert_eq!(value(&text, &total("reset")), 0, "{text}");

    // A pair one of whose clients resets counts as a reset; what it moved counts too.
    let mut c = connect(addr());
    let mut d = connect(addr());
    c.write_all(&[7u8; 1000]).unwrap();
    assert_eq!(read_n(&mut d, 1000), vec![7u8; 1000]);
    reset(c);
    let mut rest = Vec::new();
    assert!(d.read_to_end(&mut rest).is_err(), "{dp}: the partner of a reset client must see a reset");
    let text = wait_value(&url, &total("reset"), 1);
    assert_eq!(value(&text, &bytes), 2 * LEN + 1 + 1000, "{dp}:\n{text}");
    assert_eq!(value(&text, &total("eof")), 1, "{text}");
    assert_eq!(value(&text, &active), 0, "{text}");
    if dp == "kernel" {
        // The map-full fallback's label is exported too, and nothing went there.
        assert_eq!(value(&text, "skrelay_pairs_active{datapath=\"userspace\"}"), 0, "{text}");
        assert_eq!(value(&text, "skrelay_bytes_total{datapath=\"userspace\"}"), 0, "{text}");
    }
    eprintln!("{dp}: after 2 x {LEN} bytes + 1 + 1000:\n{text}");
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    // The last line says what the process served.
    let want = format!(
        "stopped: 2 pair(s) ended (1 eof, 1 reset, 0 timeout, 0 drain), {} bytes delivered; 0 client(s) ended \
         before a pair formed",
        2 * LEN + 1 + 1000
    );
    assert!(log.contains(&want), "{dp}: no `{want}` in\n{log}");
}

per_datapath!(relay_counters_equal_the_bytes_moved_on_both_datapaths);

fn proxy_counters_follow_pairs_and_upstreams_on_both_datapaths(dp: &str) {
    let _netns = enter_netns();
    const LEN: u64 = 16 * MIB;
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = upstream.local_addr().unwrap().to_string();
    // Nothing listens here: every connect to it is refused.
    let dead = format!("127.0.0.1:{}", free_port());
    let proxy = Skrelay::start(&[
        "proxy",
        "--datapath",
        dp,
        "--upstream",
        &dead,
        "--upstream",
        &up,
        "--metrics",
        "127.0.0.1:0",
    ]);
    let url = metrics_url(&proxy.log());
    let text = scrape(&url);
    for u in [&dead, &up] {
        assert_eq!(value(&text, &format!("skrelay_upstream_up{{upstream=\"{u}\"}}")), 1, "{text}");
        assert_eq!(value(&text, &format!("skrelay_upstream_connect_failures_total{{upstream=\"{u}\"}}")), 0);
    }
    let server = std::thread::spawn(move || {
        let (s, _) = upstream.accept().unwrap();
        exchange(s, 4, LEN).join().unwrap()
    });
    // The first client's turn starts at the dead upstream: refused, then the live one.
    let client = exchange(connect(addr()), 3, LEN);
    let (sent_c, got_c) = client.join().unwrap();
    let (sent_s, got_s) = server.join().unwrap();
    assert_eq!(got_s, (LEN, sent_c), "{dp}: client -> upstream");
    assert_eq!(got_c, (LEN, sent_s), "{dp}: upstream -> client");
    let text = wait_value(&url, &format!("skrelay_pairs_total{{datapath=\"{dp}\",ending=\"eof\"}}"), 1);
    assert_eq!(value(&text, &format!("skrelay_bytes_total{{datapath=\"{dp}\"}}")), 2 * LEN, "{text}");
    assert_eq!(value(&text, &format!("skrelay_upstream_up{{upstream=\"{dead}\"}}")), 0, "{text}");
    assert_eq!(value(&text, &format!("skrelay_upstream_connect_failures_total{{upstream=\"{dead}\"}}")), 1);
    assert_eq!(value(&text, &format!("skrelay_upstream_up{{upstream=\"{up}\"}}")), 1, "{text}");
    assert_eq!(value(&text, &format!("skrelay_upstream_connect_failures_total{{upstream=\"{up}\"}}")), 0);
    assert_eq!(value(&text, "skrelay_pending_clients"), 0, "{text}");
    let (status, log) = proxy.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

per_datapath!(proxy_counters_follow_pairs_and_upstreams_on_both_datapaths);

/// Clients that end before their pair forms are counted by why, with every reason exported from
/// the start at 0: the cases a relay client can cause, and a proxy client no upstream answers.
#[test]
fn clients_that_never_paired_are_counted_by_reason() {
    let _netns = enter_netns();
    let relay = Skrelay::start(&[
        "relay",
        "--datapath",
        "userspace",
        "--pair",
        "token",
        "--max-pending",
        "1",
        "--pair-timeout",
        "1",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let url = metrics_url(&relay.log());
    let unpaired = |why: &str| format!("skrelay_unpaired_clients_total{{reason=\"{why}\"}}");
    let text = scrape(&url);
    for why in ["full", "timeout", "bad_token", "left", "no_upstream", "shutdown", "loop", "error"] {
        assert_eq!(value(&text, &unpaired(why)), 0, "{text}");
    }
    let mut bad = connect(addr());
    bad.write_all(b"no\ttab\n").unwrap();
    wait_value(&url, &unpaired("bad_token"), 1);
    drop(connect(addr()));
    wait_value(&url, &unpaired("left"), 1);
    // One waits (--max-pending 1); a second with another token is one too many.
    let mut waiting = connect(addr());
    waiting.write_all(b"one\n").unwrap();
    wait_value(&url, "skrelay_pending_clients", 1);
    // The relay resets it once its token line came: its write may already meet that reset.
    if let Ok(mut extra) = TcpStream::connect(addr()) {
        let _ = extra.write_all(b"two\n");
    }
    wait_value(&url, &unpaired("full"), 1);
    // The waiting one is reset at --pair-timeout.
    let text = wait_value(&url, &unpaired("timeout"), 1);
    assert_eq!(value(&text, &unpaired("bad_token")), 1, "{text}");
    assert_eq!(value(&text, &unpaired("left")), 1, "{text}");
    assert_eq!(value(&text, "skrelay_pending_clients"), 0, "{text}");
    assert!(waiting.read(&mut [0u8; 1]).is_err(), "a client reset at --pair-timeout sees a reset");
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");

    let dead = format!("127.0.0.1:{}", free_port());
    let proxy = Skrelay::start(&["proxy", "--datapath", "userspace", "--upstream", &dead, "--metrics", "127.0.0.1:0"]);
    let url = metrics_url(&proxy.log());
    // The proxy resets it as soon as its upstream refuses, which may come before connect(2) returns.
    let r = first_read_of_a_client_of(addr());
    assert!(matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset), "expected a reset, got {r:?}");
    wait_value(&url, &unpaired("no_upstream"), 1);
    let (status, log) = proxy.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

#[test]
fn a_bad_metrics_address_is_refused_with_exit_status_2() {
    let _netns = enter_netns();
    let one_sentence = |args: &[&str], expect: &str| {
        let (code, out, err) = skrelay_output(args);
        assert_eq!(code, 2, "skrelay {args:?}: exit {code}: {out}{err}");
        assert!(err.contains(expect), "skrelay {args:?}: stderr lacks `{expect}`:\n{err}");
        assert!(!err.contains("panicked") && !err.contains("listening on"), "{err}");
    };
    one_sentence(&["relay", "--datapath", "userspace", "--metrics", "127.0.0.1:99999"], "invalid value");
    one_sentence(&["proxy", "--upstream", "127.0.0.1:1", "--metrics", "nowhere"], "has no port");
    one_sentence(&["metrics", "--listen", "localhost"], "invalid value 'localhost'");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let expect = format!("skrelay: cannot serve metrics on {taken}: address already in use");
    one_sentence(&["relay", "--datapath", "userspace", "--metrics", &taken], &expect);
    one_sentence(
        &["relay", "--datapath", "userspace", "--metrics", "192.0.2.1:9477"],
        "skrelay: cannot serve metrics on 192.0.2.1:9477: address not available",
    );
    // The relay's own address: the relay binds first, so metrics is the one refused.
    one_sentence(&["relay", "--datapath", "userspace", "--metrics", RELAY], "pick another --metrics port");
    // Across families: a dual-stack [::] socket holds its port on every IPv4 address too, so the
    // socket in the way is the relay's own, not "another socket" (a helper's new-user pass).
    for (listen, metrics) in
        [("0.0.0.0:7790", "[::]:7790"), ("[::]:7791", "127.0.0.1:7791"), ("127.0.0.1:7792", "[::]:7792")]
    {
        one_sentence(
            &["relay", "--datapath", "userspace", "--listen", listen, "--metrics", metrics],
            &format!("cannot serve metrics on {metrics}: this process listens for clients on {listen}"),
        );
    }
    // A --metrics port that --ports steers to the listener: every scrape would be taken as a
    // client (two scrapers were paired with each other), so it is refused at start. (Under
    // `timeout`: a build without the check starts and serves.)
    if require_bpf("a_bad_metrics_address_is_refused_with_exit_status_2") {
        let refused_at_start = |args: &[&str], expect: &str| {
            let out = Command::new("timeout").arg("10").arg(SKRELAY).args(args).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "skrelay {args:?}: {err}");
            assert!(err.contains(expect) && err.trim_end().lines().count() == 1, "skrelay {args:?}: {err}");
        };
        refused_at_start(
            &["relay", "--datapath", "userspace", "--ports", "9000-9100", "--metrics", "127.0.0.1:9050"],
            "cannot serve metrics on 127.0.0.1:9050: --ports steers port 9050 at that address to this process",
        );
        let proxy = ["proxy", "--datapath", "userspace", "--upstream", "127.0.0.1:1", "--listen", "0.0.0.0:7777"];
        refused_at_start(
            &[&proxy[..], &["--ports", "9050", "--metrics", "127.0.0.1:9050"]].concat(),
            "so every scrape would be proxied upstream (pick a --metrics port outside --ports)",
        );
        // A dual-stack [::] listener's funnel takes IPv4 too (an IPv6 stranger pass: started, and
        // its scrapes waited for a partner).
        let dual = ["--datapath", "userspace", "--listen", "[::]:7777", "--ports", "9050"];
        refused_at_start(
            &[&["relay"], &dual[..], &["--metrics", "127.0.0.1:9050"]].concat(),
            "cannot serve metrics on 127.0.0.1:9050: --ports steers port 9050 at that address to this process",
        );
        refused_at_start(
            &[&["proxy"], &dual[..], &["--upstream", "127.0.0.1:9050"]].concat(),
            "cannot proxy to upstream 127.0.0.1:9050: --ports steers port 9050 at that address to this proxy",
        );
    }
    // Nothing was left listening by the refused commands.
    assert!(TcpStream::connect(addr()).is_err());
}

#[test]
fn the_responder_answers_only_metrics_and_bounds_what_it_reads() {
    let _netns = enter_netns();
    let relay = Skrelay::start(&["relay", "--datapath", "userspace", "--metrics", "127.0.0.1:0"]);
    let url = metrics_url(&relay.log());
    let base = url.trim_end_matches("/metrics");
    let code = |args: &[&str]| {
        let out =
            Command::new("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}"]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(code(&[&format!("{base}/")]), "404");
    assert_eq!(code(&["-X", "POST", &url]), "405");
    assert_eq!(code(&[&format!("{url}?x=1")]), "200");
    // What is not an HTTP request line at all is a bad request, not a wrong method.
    let mut raw = TcpStream::connect(base.trim_start_matches("http://")).unwrap();
    raw.write_all(b"garbage\r\n\r\n").unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 Bad Request"), "{answer}");
    // A scraper that ends its side once its request is sent (`printf ... | nc -N`) is answered
    // (the rewritten responder took the end for a scraper that left, a re-check's find).
    let mut ended = TcpStream::connect(base.trim_start_matches("http://")).unwrap();
    ended.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    ended.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    ended.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    // Clients that connect and say nothing do not hold a scrape back: served one at a time,
    // each held it 2 s (20 of them: 40 s; a helper's leak pass). Nor does one that asks and
    // never reads its answer. They are closed 2 s after their accept.
    let silent: Vec<TcpStream> =
        (0..40).map(|_| TcpStream::connect(base.trim_start_matches("http://")).unwrap()).collect();
    let mut unread = TcpStream::connect(base.trim_start_matches("http://")).unwrap();
    unread.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let t0 = Instant::now();
    scrape(&url);
    assert!(t0.elapsed() < Duration::from_secs(1), "silent clients held the scrape {:?}", t0.elapsed());
    let mut last = silent.into_iter().last().unwrap();
    last.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t0 = Instant::now();
    assert_eq!(last.read(&mut [0u8; 1]).unwrap_or(0), 0, "a silent client got an answer");
    assert!(t0.elapsed() < Duration::from_millis(2500), "a silent client was held {:?}", t0.elapsed());
    drop(unread);
    // A flood of connections that say nothing closes its own, not a scraper's under way: the
    // oldest held connection was closed for each new one, so 6,500 connections a second left
    // 23 of 94 scrapes unanswered (a helper's pass).
    let mut asking = TcpStream::connect(base.trim_start_matches("http://")).unwrap();
    asking.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let flood: Vec<TcpStream> =
        (0..20).map(|_| TcpStream::connect(base.trim_start_matches("http://")).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    asking.write_all(b"\r\n").unwrap();
    asking.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = String::new();
    let _ = asking.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "a scrape under way was closed by a flood: {answer:?}");
    drop(flood);
    // Connections holding half a request each, as many as are held, do not close a scraper
    // whose request is not in yet when it is accepted: it was the one "that sent nothing", and
    // 7 of 12 scrapes failed (a bounds pass).
    let halves: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut h = TcpStream::connect(base.trim_start_matches("http://")).unwrap();
            h.write_all(b"GET /metr").unwrap();
            h
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    for i in 0..3 {
        let mut late = TcpStream::connect(base.trim_start_matches("http://")).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        late.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        late.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = String::new();
        let _ = late.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "scrape {i} beside half requests: {answer:?}");
    }
    drop(halves);
    // A request head without end is cut at 8 KiB.
    let mut big = TcpStream::connect(base.trim_start_matches("http://")).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = big.write_all(&vec![b'a'; 64 << 10]);
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

#[test]
fn skrelay_metrics_serves_the_pinned_steer_counters() {
    let _netns = enter_netns();
    if !require_bpf("skrelay_metrics_serves_the_pinned_steer_counters") {
        return;
    }
    struct SteerReset;
    impl Drop for SteerReset {
        fn drop(&mut self) {
            let _ = skrelay_output(&["steer", "reset"]);
        }
    }
    let _reset = SteerReset;
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = target.local_addr().unwrap().to_string();
    skrelay_ok(&["steer", "add", "--ports", "7000-7009", "--to", &to]);
    let port = free_port();
    let exporter = Skrelay::start_until(&["metrics", "--listen", &format!("127.0.0.1:{port}")], "serving");
    let url = format!("http://127.0.0.1:{port}/metrics");
    let series = format!("{{proto=\"tcp\",prefix=\"0.0.0.0/0\",ports=\"7000-7009\",target=\"{to}\"}}");
    let text = scrape(&url);
    assert_eq!(value(&text, &format!("skrelay_steer_hits_total{series}")), 0, "{text}");
    assert_eq!(value(&text, "skrelay_steer_attached"), 1, "{text}");
    // Three connections steered, each with a sha256-checked payload.
    for i in 0..3u16 {
        let mut c = connect(format!("127.0.0.1:{}", 7000 + i).parse().unwrap());
        let (mut s, _) = target.accept().unwrap();
        let sent = send_pattern(&mut c, u64::from(i), 100_000).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(recv_all(&mut s).unwrap(), (100_000, sent));
    }
    let text = scrape(&url);
    assert_eq!(value(&text, &format!("skrelay_steer_hits_total{series}")), 3, "{text}");
    assert_eq!(value(&text, &format!("skrelay_steer_refused_total{series}")), 0, "{text}");
    assert_eq!(value(&text, &format!("skrelay_steer_target_alive{series}")), 1, "{text}");
    assert_eq!(value(&text, &format!("skrelay_steer_target_listening{series}")), 1, "{text}");
    // Shut down but open: alive, and taking nothing (an alert on alive alone missed it).
    socket2::SockRef::from(&target).shutdown(std::net::Shutdown::Both).unwrap();
    let text = scrape(&url);
    assert_eq!(value(&text, &format!("skrelay_steer_target_alive{series}")), 1, "{text}");
    assert_eq!(value(&text, &format!("skrelay_steer_target_listening{series}")), 0, "{text}");
    // The target gone: connections are refused and counted as such.
    drop(target);
    assert!(TcpStream::connect("127.0.0.1:7001").is_err());
    let text = scrape(&url);
    assert_eq!(value(&text, &format!("skrelay_steer_refused_total{series}")), 1, "{text}");
    assert_eq!(value(&text, &format!("skrelay_steer_target_alive{series}")), 0, "{text}");
    // Reading created nothing: after a reset the exporter shows no binding and attaches nothing.
    skrelay_ok(&["steer", "reset"]);
    let text = scrape(&url);
    assert_eq!(value(&text, "skrelay_steer_attached"), 0, "{text}");
    assert!(!text.contains("skrelay_steer_hits_total{"), "{text}");
    let state = format!("/sys/fs/bpf/skrelay/{}", netns_ino());
    assert!(!std::path::Path::new(&state).join("link").exists(), "the exporter re-created state at {state}");
    drop(exporter);
}

#[test]
fn skrelay_metrics_serves_the_pinned_accel_counters() {
    if !require_bpf("skrelay_metrics_serves_the_pinned_accel_counters") {
        return;
    }
    let _netns = enter_netns();
    const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/accel_peer.py");
    const BYTES: u64 = 8 * MIB;
    /// Turns the test's cgroup off and removes it, panics included.
    struct Cgroup(String);
    impl Drop for Cgroup {
        fn drop(&mut self) {
            let _ = skrelay_output(&["accel", "off", "--cgroup", &self.0, "--force"]);
            let _ = std::fs::remove_dir(cgroup_v2_mount().join(&self.0));
        }
    }
    let cg = Cgroup(format!("skrelay-test-{}-metrics", std::process::id()));
    skrelay_ok(&["accel", "on", "--cgroup", &cg.0]);
    let port = free_port();
    let exporter = Skrelay::start_until(&["metrics", "--listen", &format!("127.0.0.1:{port}")], "serving");
    let url = format!("http://127.0.0.1:{port}/metrics");
    let peer = |args: &[&str]| {
        let mut c = Command::new(SKRELAY);
        c.args(["accel", "run", "--cgroup", &cg.0, "--", "python3", PEER]).args(args);
        c
    };
    // A server and a client in the cgroup exchange BYTES each way, sha256 checked by the peers.
    let peer_port = free_port().to_string();
    let mut server = peer(&["serve", "127.0.0.1", &peer_port]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut server_out = std::io::BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut server_out, &mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    let client = peer(&["connect", "127.0.0.1", &peer_port, &BYTES.to_string()]).output().unwrap();
    assert!(client.status.success(), "{}", String::from_utf8_lossy(&client.stderr));
    let mut server_text = String::new();
    server_out.read_to_string(&mut server_text).unwrap();
    assert!(server.wait().unwrap().success(), "{server_text}");
    let client_text = String::from_utf8_lossy(&client.stdout);
    let field = |text: &str, key: &str| -> String {
        text.lines().find_map(|l| l.strip_prefix(&format!("{key} "))).unwrap_or_default().to_string()
    };
    assert!(field(&client_text, "sent").starts_with(&format!("{BYTES} ")), "{client_text}");
    assert_eq!(field(&client_text, "sent"), field(&server_text, "received"), "client -> server");
    assert_eq!(field(&server_text, "sent"), field(&client_text, "received"), "server -> client");

    // The exporter's figures are the pinned counters, as `accel status` reads them.
    let report = skrelay::accel::report_cgroup(&cgroup_v2_mount().join(&cg.0)).unwrap();
    let label = format!("{{cgroup=\"{}\"}}", report.cgroup.display());
    let text = scrape(&url);
    assert_eq!(value(&text, &format!("skrelay_accel_connections_total{label}")), report.connections, "{text}");
    assert_eq!(value(&text, &format!("skrelay_accel_bytes_total{label}")), report.bytes, "{text}");
    assert_eq!(value(&text, &format!("skrelay_accel_fallbacks_total{label}")), report.fallbacks, "{text}");
    assert_eq!(value(&text, &format!("skrelay_accel_messages_total{label}")), report.messages, "{text}");
    assert_eq!(value(&text, &format!("skrelay_accel_sockets_left_total{label}")), report.left, "{text}");
    assert_eq!(report.connections, 1, "{report}");
    // Both streams and the client's 8-byte header, through the redirect or (held back) TCP.
    assert!(report.bytes > 0 && report.bytes + report.passed_bytes <= 2 * BYTES + 8, "{report}");
    drop(cg);
    let text = scrape(&url);
    assert!(!text.contains(&label), "an accel state that is off is still exported:\n{text}");
    // Stopped as `relay` and `proxy` are: SIGTERM ends it with exit 0 (was 143, killed).
    let (status, log) = exporter.stop(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "skrelay metrics on SIGTERM: {status:?}\n{log}");
}

/// `skrelay metrics` exports no relay's figures, so it asks no relay for them: it built
/// `status`'s relays section on every scrape, which asks each relay's --metrics with a 1 s
/// timeout, and a helper's scrapes took 1 s per relay in a frozen cgroup (a Prometheus with its
/// 10 s timeout failed behind a few parallel scrapes).
#[test]
fn skrelay_metrics_does_not_wait_for_frozen_relays() {
    let _netns = enter_netns();
    let cg = cgroup_v2_mount().join(format!("skrelay-frozen-{}", std::process::id()));
    std::fs::create_dir(&cg).unwrap();
    struct Thaw(std::path::PathBuf);
    impl Drop for Thaw {
        fn drop(&mut self) {
            let _ = std::fs::write(self.0.join("cgroup.freeze"), "0");
            for _ in 0..100 {
                if std::fs::remove_dir(&self.0).is_ok() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let _thaw = Thaw(cg.clone());
    let relays: Vec<Skrelay> = (0..6)
        .map(|i| {
            let listen = format!("127.0.0.1:{}", 7790 + i);
            Skrelay::start(&["relay", "--datapath", "userspace", "--listen", &listen, "--metrics", "127.0.0.1:0"])
        })
        .collect();
    for r in &relays {
        std::fs::write(cg.join("cgroup.procs"), r.pid().to_string()).unwrap();
    }
    std::fs::write(cg.join("cgroup.freeze"), "1").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(cg.join("cgroup.events")).unwrap().contains("frozen 1") {
        assert!(Instant::now() < deadline, "the cgroup did not freeze");
        std::thread::sleep(Duration::from_millis(10));
    }
    let port = free_port();
    let exporter = Skrelay::start_until(&["metrics", "--listen", &format!("127.0.0.1:{port}")], "serving");
    let started = Instant::now();
    let text = scrape(&format!("http://127.0.0.1:{port}/metrics"));
    let took = started.elapsed();
    assert!(text.contains("skrelay_steer_attached"), "{text}");
    // Asked, six relays took 6 s; unasked, well under one (up to 2 s more while a test beside this
    // one holds the accel state's lock, which readers wait for).
    assert!(took < Duration::from_secs(3), "a scrape took {took:?}");
    drop(exporter);
    drop(relays);
}
