//! `--ports` on `skrelay relay`: many ports, one listener, through an unpinned sk_lookup link
//! that dies with the process (SIGKILL included). Each test in a private network namespace.
mod common;

use common::*;
use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

fn refused(port: u16) -> bool {
    match TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(2)) {
        Err(e) => e.kind() == ErrorKind::ConnectionRefused,
        Ok(_) => false,
    }
}

/// 50 distinct pseudo-random ports in lo..lo+1000.
fn sample_ports(lo: u16) -> Vec<u16> {
    let mut seed = 0x9e3779b97f4a7c15_u64;
    let mut v = Vec::new();
    while v.len() < 50 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let p = lo + (seed >> 33) as u16 % 1000;
        if !v.contains(&p) {
            v.push(p);
        }
    }
    v
}

#[test]
fn relay_serves_a_thousand_ports_and_sigkill_takes_them_away() {
    let _netns = enter_netns();
    if !require_bpf("--ports") {
        return;
    }
    // A socket already serving a port of the range: ours wins while we run, with a warning.
    let squatter = TcpListener::bind("127.0.0.1:20005").unwrap();
    let mut relay =
        Skrelay::start(&["relay", "--listen", "127.0.0.1:7000", "--ports", "20000-20999", "--pair", "order"]);
    assert!(relay.log().contains("127.0.0.1:20005 is served by another socket"), "{}", relay.log());
    assert_eq!(sk_lookup_links(), 1);

    let mut ports = sample_ports(20000);
    ports[0] = 20005;
    for (i, pair) in ports.chunks(2).enumerate() {
        let mut a = connect(SocketAddr::from(([127, 0, 0, 1], pair[0])));
        let mut b = connect(SocketAddr::from(([127, 0, 0, 1], pair[1])));
        let (ping, pong) = (format!("ping {i} via {}", pair[0]), format!("pong {i} via {}", pair[1]));
        a.write_all(ping.as_bytes()).unwrap();
        assert_eq!(read_n(&mut b, ping.len()), ping.as_bytes(), "pair via ports {pair:?}");
        b.write_all(pong.as_bytes()).unwrap();
        assert_eq!(read_n(&mut a, pong.len()), pong.as_bytes());
    }
    squatter.set_nonblocking(true).unwrap();
    assert!(squatter.accept().is_err(), "the squatter's port went to the relay");
    assert!(refused(21000) && refused(19999), "ports outside the list are untouched");

    relay.signal(libc::SIGKILL);
    relay.wait(Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(5);
    while sk_lookup_links() != 0 {
        assert!(Instant::now() < deadline, "bpftool link still shows an sk_lookup link after SIGKILL");
        std::thread::sleep(Duration::from_millis(20));
    }
    for &p in &ports[1..6] {
        assert!(refused(p), "port {p} must be refused once the relay is gone");
    }
    // The squatter has its port back.
    let _c = TcpStream::connect("127.0.0.1:20005").unwrap();
    squatter.set_nonblocking(false).unwrap();
    let (mut s, _) = squatter.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let _ = s.read(&mut [0u8; 1]);
}

/// A dual-stack `[::]` listener takes IPv4 clients on its own port, so its `--ports` take them
/// too: they steered IPv6 only, and IPv4 clients of the other ports were refused (a helper's
/// IPv6 pass). An IPv6-only one (`net.ipv6.bindv6only=1`) leaves IPv4 alone.
#[test]
fn relay_on_the_ipv6_wildcard_takes_every_local_address_it_listens_on() {
    let _netns = enter_netns();
    if !require_bpf("--ports v6") {
        return;
    }
    let relay = Skrelay::start(&["relay", "--listen", "[::]:7001", "--ports", "7,77"]);
    let mut a = connect("[::1]:7".parse().unwrap());
    let mut b = connect("127.0.0.1:77".parse().unwrap());
    a.write_all(b"six").unwrap();
    assert_eq!(read_n(&mut b, 3), b"six", "a dual-stack listener's --ports take IPv4 too");
    drop((a, b));
    let status = skrelay_output(&["status"]).1;
    assert!(status.contains("(7,77) on ::/0, 0.0.0.0/0 -> [::]:7001"), "{status}");
    let json: serde_json::Value = serde_json::from_str(&skrelay_output(&["status", "--json"]).1).unwrap();
    let funnel = &json["steer"]["funnels"][0];
    assert_eq!(funnel["prefix"], "::/0", "one CIDR, as before: {funnel}");
    assert_eq!(funnel["prefixes"], serde_json::json!(["::/0", "0.0.0.0/0"]), "{funnel}");
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    assert_eq!(sk_lookup_links(), 0, "a clean exit detaches too");
    // The IPv4 client is named as such (it read [::ffff:127.0.0.1]:PORT).
    assert!(log.contains("<-> 127.0.0.1:") && !log.contains("::ffff:"), "{log}");
    std::fs::write("/proc/sys/net/ipv6/bindv6only", "1").unwrap();
    let relay = Skrelay::start(&["relay", "--listen", "[::]:7001", "--ports", "7,77"]);
    let mut a = connect("[::1]:7".parse().unwrap());
    let mut b = connect("[::1]:77".parse().unwrap());
    a.write_all(b"six").unwrap();
    assert_eq!(read_n(&mut b, 3), b"six");
    assert!(refused(7), "an IPv6-only funnel leaves IPv4 alone");
    drop((a, b));
    let (status, log) = relay.stop(Duration::from_secs(10));
    std::fs::write("/proc/sys/net/ipv6/bindv6only", "0").unwrap();
    assert!(status.success(), "{log}");
}

#[test]
fn bad_port_lists_are_start_up_errors() {
    let _netns = enter_netns();
    for (list, want) in [
        ("0", "port 0 is out of range"),
        ("70000", "port 70000 is out of range"),
        ("9-3", "range 9-3 runs backwards"),
        ("abc", "`abc` is not a port"),
    ] {
        let (code, _, err) = skrelay_output(&["relay", "--listen", "127.0.0.1:7002", "--ports", list]);
        assert_eq!(code, 2, "--ports {list}: {err}");
        assert!(err.contains(want), "--ports {list}: {err}");
    }
}

/// Without BPF rights, `--ports` warned that the datapath falls back to user space and then
/// failed to load BPF anyway: one sentence that says what --ports needs, for relay and proxy.
#[test]
fn ports_without_bpf_rights_is_one_sentence_without_a_fallback_warning() {
    let _netns = enter_netns();
    if !require_tool("ports_without_bpf_rights_is_one_sentence_without_a_fallback_warning", "setpriv") {
        return;
    }
    for args in [
        vec!["relay", "--listen", "127.0.0.1:7000", "--ports", "7001-7002"],
        vec!["proxy", "--listen", "127.0.0.1:7000", "--ports", "7001-7002", "--upstream", "127.0.0.1:7010"],
    ] {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", SKRELAY])
            .args(&args)
            .output()
            .expect("run setpriv (util-linux)");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(
            err.trim_end(),
            "skrelay: --ports needs CAP_BPF and CAP_NET_ADMIN (or root) to attach its sk_lookup program: run as \
             root, grant them, or leave out --ports",
            "{args:?}"
        );
    }
}

/// Connect latency with and without sk_lookup attached: `cargo test --release --test ports --
/// --ignored --nocapture connect_latency`.
#[test]
#[ignore]
fn connect_latency_with_and_without_sk_lookup() {
    let _netns = enter_netns();
    let l = TcpListener::bind("127.0.0.1:7003").unwrap();
    let measure = |port: u16| {
        let n = 10_000;
        let t = Instant::now();
        for _ in 0..n {
            let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let (s, _) = l.accept().unwrap();
            sys_reset(&c);
            sys_reset(&s);
        }
        t.elapsed() / n
    };
    let direct = measure(7003);
    let ports: skrelay::steer::PortList = "20000-20999".parse().unwrap();
    let funnel = skrelay::steer::Funnel::attach(&l, "127.0.0.1:7003".parse().unwrap(), &ports).unwrap();
    let funnel_port = measure(20500);
    let direct_with_prog = measure(7003);
    println!(
        "connect+accept, mean of 10,000: no sk_lookup {direct:?}; sk_lookup attached, unbound port {direct_with_prog:?}; \
         steered port {funnel_port:?} ({} hits)",
        funnel.hits()
    );
}

/// Closes with RST so 10,000 connections leave no TIME_WAIT behind.
fn sys_reset(s: &TcpStream) {
    skrelay::sys::reset_on_close(s);
}

#[test]
fn an_ipv4_funnel_warns_about_a_dual_stack_ipv6_wildcard_socket_it_shadows() {
    let _netns = enter_netns();
    if !require_bpf("--ports") {
        return;
    }
    // [::]:20105 without IPV6_V6ONLY (Go's and Java's default listener) takes IPv4 connections too.
    let dual = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
    dual.set_only_v6(false).unwrap();
    dual.bind(&"[::]:20105".parse::<SocketAddr>().unwrap().into()).unwrap();
    dual.listen(16).unwrap();
    let dual: TcpListener = dual.into();
    let relay = Skrelay::start(&["relay", "--listen", "127.0.0.1:7010", "--ports", "20105", "--pair", "order"]);
    assert!(relay.log().contains("[::]:20105 is served by another socket"), "{}", relay.log());
    let _c = connect(SocketAddr::from(([127, 0, 0, 1], 20105)));
    dual.set_nonblocking(true).unwrap();
    assert!(dual.accept().is_err(), "the IPv4 connection went to the relay, as the warning says");
}

/// The other order: a listener started on a port that something already steers away gets no
/// connection at all, and nothing said so (a helper's pass): a relay's `--listen` inside another
/// relay's `--ports`, a metrics responder there, and a proxy on a port `skrelay steer` binds.
#[test]
fn a_listener_on_a_port_steered_elsewhere_is_warned_about() {
    let _netns = enter_netns();
    if !require_bpf("--ports") {
        return;
    }
    let _first = Skrelay::start(&["relay", "--listen", "127.0.0.1:7020", "--ports", "7021,7022"]);
    let second = Skrelay::start(&["relay", "--listen", "127.0.0.1:7021", "--metrics", "127.0.0.1:7022"]);
    second.wait_log("takes the connections it covers", 2, Duration::from_secs(5));
    let log = second.log();
    // The --listen warning comes before the start line, which would read as fully working (a
    // stranger pass); only after a takeover's handover does it come later.
    let (warned, started) = (log.find("--listen 127.0.0.1:7021: process "), log.find("listening on 127.0.0.1:7021"));
    assert!(warned.is_some() && started.is_some() && warned < started, "{log}");
    for (flag, port) in [("--listen", 7021), ("--metrics", 7022)] {
        let want = format!("{flag} 127.0.0.1:{port}: process ");
        assert!(log.contains(&want) && log.contains(&format!("takes port {port} with its --ports")), "{log}");
    }
    let target = TcpListener::bind("127.0.0.1:7030").unwrap();
    skrelay_ok(&["steer", "add", "--ports", "7031", "--to", "127.0.0.1:7030"]);
    let proxy = Skrelay::start(&["proxy", "--listen", "127.0.0.1:7031", "--upstream", "127.0.0.1:7030"]);
    proxy.wait_log("takes the connections it covers", 1, Duration::from_secs(5));
    let log = proxy.log();
    drop(proxy);
    // A service user cannot read root's bindings; it was told nothing and got no connection.
    let mut cmd = skrelay_as_nobody("+net_bind_service");
    cmd.args(["relay", "--datapath", "userspace", "--listen", "127.0.0.1:7031"]);
    let service = Skrelay::spawn(cmd, "listening on");
    service.wait_log("cannot read", 1, Duration::from_secs(5));
    let service_log = service.log();
    let _ = skrelay_output(&["steer", "reset"]);
    assert!(
        service_log.contains(
            "--listen 127.0.0.1:7031: `skrelay steer` has bindings in this network namespace that this user cannot \
             read; if one takes port 7031, this listener gets none of its connections (check with `skrelay steer \
             list` as root)"
        ),
        "{service_log}"
    );
    drop(target);
    assert!(log.contains("--listen 127.0.0.1:7031: `skrelay steer` binds tcp 0.0.0.0/0 port 7031 to"), "{log}");
    // A port nobody steers: no such line.
    let quiet = Skrelay::start(&["relay", "--listen", "127.0.0.1:7040"]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!quiet.log().contains("takes the connections it covers"), "{}", quiet.log());
}

/// A service user's `--ports` (CAP_BPF and CAP_NET_ADMIN, no CAP_PERFMON, as the contrib units
/// may run): aya names programs only where a tracepoint program may load, so its sk_lookup
/// program had no name, and root, looking for the name, saw no funnel: `status` said nothing was
/// attached and `steer add` on its ports said "bound" while the connections kept going to the
/// relay (a helper's privilege pass).
#[test]
fn a_service_users_ports_are_seen_by_root() {
    let _netns = enter_netns();
    if !require_bpf("--ports") || !require_tool("a_service_users_ports_are_seen_by_root", "setpriv") {
        return;
    }
    let mut cmd = skrelay_as_nobody("+bpf,+net_admin");
    cmd.args(["relay", "--datapath", "userspace", "--listen", "127.0.0.1:7050", "--ports", "7051"]);
    let relay = Skrelay::spawn(cmd, "listening on");
    let _target = TcpListener::bind("127.0.0.1:7052").unwrap();
    let (code, out, err) = skrelay_output(&["steer", "add", "--ports", "7051", "--to", "127.0.0.1:7052"]);
    let _ = skrelay_output(&["steer", "reset"]);
    assert_eq!(code, 2, "steer add took a port a service user's --ports holds: {out}{err}\n{}", relay.log());
    assert!(err.contains("7051"), "{err}");
    let status = skrelay_ok(&["status"]);
    assert!(status.contains("7051"), "status does not show the service user's --ports:\n{status}");
}

/// A relay listening on an IPv4 address written in IPv6 form (`[::ffff:127.0.0.1]`) takes the
/// IPv4 connections to that address: its `--ports` bound an IPv6 prefix no IPv4 connection met,
/// and said the ports were steered (a helper's pass).
#[test]
fn ports_of_a_relay_on_an_ipv4_mapped_address_are_steered() {
    let _netns = enter_netns();
    if !require_bpf("--ports") {
        return;
    }
    let _relay = Skrelay::start(&["relay", "--listen", "[::ffff:127.0.0.1]:7097", "--ports", "7098"]);
    let mut a = connect(SocketAddr::from(([127, 0, 0, 1], 7098)));
    let mut b = connect(SocketAddr::from(([127, 0, 0, 1], 7097)));
    a.write_all(b"mapped").unwrap();
    let mut got = [0u8; 6];
    b.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"mapped");
}

/// A link-local listener's funnel names its target with the interface, as `status` names the
/// relay's own address (/proc/net shows no interface: the funnel line said `[fe80::1]:7811`
/// while the relay's line said `[fe80::1%1]:7811`, a stranger pass).
#[test]
fn a_link_local_listeners_funnel_is_shown_with_its_interface() {
    let _netns = enter_netns();
    if !require_bpf("--ports") {
        return;
    }
    let up =
        std::process::Command::new("ip").args(["addr", "add", "fe80::1/64", "dev", "lo", "nodad"]).status().unwrap();
    assert!(up.success());
    let _relay = Skrelay::start(&["relay", "--listen", "[fe80::1%lo]:7811", "--ports", "7812"]);
    let text = skrelay_ok(&["status"]);
    assert!(text.contains("on fe80::1/128 -> [fe80::1%1]:7811"), "{text}");
}
