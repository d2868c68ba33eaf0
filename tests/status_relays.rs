//! `skrelay status` lists the relay and proxy processes of its network namespace: what they
//! listen on, their datapath, the connections they hold and where they serve metrics.
#[macro_use]
mod common;
use common::*;
use std::{io::Write, time::Duration};

fn relays() -> Vec<serde_json::Value> {
    let st: serde_json::Value = serde_json::from_str(&skrelay_ok(&["status", "--json"])).unwrap();
    st["relays"]["processes"].as_array().unwrap_or_else(|| panic!("no relays.processes: {st}")).clone()
}

fn find(pid: i32) -> Option<serde_json::Value> {
    relays().into_iter().find(|p| p["pid"] == pid)
}

fn status_lists_running_relays_and_proxies(dp: &str) {
    let _netns = enter_netns();
    assert!(skrelay_ok(&["status"]).contains("relays: no relay or proxy is running"));
    let relay = Skrelay::start(&["relay", "--datapath", dp, "--metrics", "127.0.0.1:0"]);
    let log = relay.log();
    let url = log[log.find("metrics at ").unwrap() + 11..].split_whitespace().next().unwrap().to_string();
    let proxy =
        Skrelay::start(&["proxy", "--datapath", "userspace", "--listen", "[::1]:7780", "--upstream", "127.0.0.1:7777"]);
    let r = find(relay.pid()).unwrap_or_else(|| panic!("relay {} not listed: {:?}", relay.pid(), relays()));
    assert_eq!(r["command"], "relay");
    assert_eq!(r["listening"], serde_json::json!(["127.0.0.1:7777"]), "{r}");
    assert_eq!(r["datapath"], dp, "{r}");
    assert_eq!(r["metrics"], url.as_str(), "{r}");
    assert_eq!(r["connections"], 0, "{r}");
    let p = find(proxy.pid()).unwrap();
    assert_eq!(p["command"], "proxy");
    assert_eq!(p["listening"], serde_json::json!(["[::1]:7780"]), "{p}");
    assert_eq!(p["metrics"], serde_json::Value::Null, "{p}");
    // A waits in the relay; B's upstream connection is the relay's second client: 2 each.
    let a = connect("127.0.0.1:7777".parse().unwrap());
    // A client waiting for its partner is shown (an observability pass: `status` showed none).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while find(relay.pid()).unwrap()["waiting_clients"] != 1 {
        assert!(std::time::Instant::now() < deadline, "{:?}", relays());
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = skrelay_ok(&["status"]);
    assert!(text.contains("; 0 pair(s)") && text.contains("; 1 client(s) waiting to be paired"), "{text}");
    let b = connect("[::1]:7780".parse().unwrap());
    while find(relay.pid()).unwrap()["connections"] != 2 || find(proxy.pid()).unwrap()["connections"] != 2 {
        assert!(std::time::Instant::now() < deadline, "{:?}", relays());
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = skrelay_ok(&["status"]);
    assert!(
        text.contains(&format!(
            "relay (pid {}): listening on 127.0.0.1:7777, {dp} datapath, 2 connection(s), metrics at {url}",
            relay.pid()
        )),
        "{text}"
    );
    // In-flight bytes in the kernel are a kernel datapath's figure: a userspace relay showed
    // "0 byte(s) in flight in the kernel between their sockets (send queues not counted)".
    let line = text.lines().find(|l| l.contains(&format!("relay (pid {})", relay.pid()))).unwrap();
    assert_eq!(line.contains("in flight in the kernel"), dp == "kernel", "{line}");
    assert_eq!(r["kernel_inflight_bytes"].is_null(), dp != "kernel", "{r}");
    drop((a, b));
    let pid = relay.pid();
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    assert!(find(pid).is_none(), "a stopped relay is still listed");
    drop(proxy);
}

per_datapath!(status_lists_running_relays_and_proxies);

/// Unread bytes (FIONREAD).
fn unread(s: &std::net::TcpStream) -> i32 {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, a live local.
    assert_eq!(unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) }, 0);
    n
}

/// `status` says what a relay's pairs hold on their way, on either datapath: the kernel
/// datapath's in-flight figure alone left out the send queues (0 or half of it while 10 MB
/// waited for a client that did not read: a helper's pass). Here a token pair, whose token
/// lines are no bytes of the stream: what A handed to its TCP, less what A's socket still holds
/// and what B's holds unread, is exactly what the relay holds.
fn status_shows_what_a_relays_pairs_hold(dp: &str) {
    for pair in ["token", "order"] {
        pairs_hold(dp, pair);
    }
}

fn pairs_hold(dp: &str, pair: &str) {
    let _netns = enter_netns();
    let relay = Skrelay::start(&["relay", "--pair", pair, "--datapath", dp, "--metrics", "127.0.0.1:0"]);
    let mut a = connect("127.0.0.1:7777".parse().unwrap());
    // Bytes before the partner came: on the kernel datapath (`--kernel-after 0`) a pair in
    // arrival order joins the maps as it forms, they move at once, and were taken for an
    // acknowledged SYN, held for good (a re-check pass).
    if pair == "token" {
        a.write_all(b"pair-7\n").unwrap();
    }
    a.write_all(&[7u8; 20000]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut b = connect("127.0.0.1:7777".parse().unwrap());
    if pair == "token" {
        b.write_all(b"pair-7\r\n").unwrap();
    }
    assert_eq!(read_n(&mut b, 20000), vec![7u8; 20000]);
    // Less than the userspace datapath holds before it stops the sender (7-24 MiB: README).
    const SENT: u64 = 6 << 20;
    let writer = a.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut w = writer;
        send_pattern(&mut w, 3, SENT).unwrap()
    });
    // Not a byte moves once every buffer on the way is full: then the figure must be exact.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut last = (0, 0, serde_json::Value::Null);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let r = find(relay.pid()).unwrap();
        let (outq, inq) = (unacked(&a), unread(&b));
        if sender.is_finished() && r["pairs"] == 1 {
            let want = SENT - outq as u64 - inq as u64;
            if r["held_bytes"] == want && last == (outq, inq, r["held_bytes"].clone()) {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "held_bytes never matched: A's socket holds {outq}, B's {inq}, of {SENT}: {r}\n{}",
            relay.log()
        );
        last = (outq, inq, r["held_bytes"].clone());
    }
    let text = skrelay_ok(&["status"]);
    let line = text.lines().find(|l| l.contains(&format!("relay (pid {})", relay.pid()))).unwrap();
    assert!(line.contains(&format!("1 pair(s) holding {} byte(s) on their way", last.2)), "{line}");
    let sent = sender.join().unwrap();
    a.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(recv_all(&mut b).unwrap(), (SENT, sent));
    // All taken, the FIN too: nothing held.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while find(relay.pid()).unwrap()["held_bytes"] != 0 {
        assert!(std::time::Instant::now() < deadline, "{:?}", find(relay.pid()));
        std::thread::sleep(Duration::from_millis(100));
    }
    drop((a, b));
}

per_datapath!(status_shows_what_a_relays_pairs_hold);

/// `status --json` shows what a running relay holds inside the kernel (issue 10): while B does
/// not read, A's bytes wait in the kernel (on B's psock queue, up to --kernel-buffer, and parked
/// in A's own queue, up to its 4 MiB receive buffer); once B has read them all, none.
#[test]
fn status_shows_the_bytes_a_kernel_relay_holds_in_flight() {
    let _netns = enter_netns();
    if !require_bpf("status_shows_the_bytes_a_kernel_relay_holds_in_flight") {
        return;
    }
    const BUDGET: u64 = 1 << 20;
    let relay = Skrelay::start(&[
        "relay",
        "--datapath",
        "kernel",
        "--kernel-after",
        "0",
        "--kernel-buffer",
        "1M",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let mut a = connect("127.0.0.1:7777".parse().unwrap());
    let mut b = connect("127.0.0.1:7777".parse().unwrap());
    let writer = std::thread::spawn(move || {
        let sha = send_pattern(&mut a, 9, 64 << 20).unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        (sha, a)
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut most = 0u64;
    loop {
        let r = find(relay.pid()).unwrap();
        let inflight = r["kernel_inflight_bytes"].as_u64().unwrap_or_else(|| panic!("no kernel_inflight_bytes: {r}"));
        most = most.max(inflight);
        assert!(inflight <= BUDGET + (10 << 20), "{inflight} bytes in flight, over --kernel-buffer + 10 MiB: {r}");
        if inflight > 0 && r["pairs"] == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "status never showed bytes in flight: {r}\n{}", relay.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = recv_all(&mut b).unwrap();
    let (sent, _a) = writer.join().unwrap();
    assert_eq!(got, (64 << 20, sent));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while find(relay.pid()).unwrap()["kernel_inflight_bytes"] != 0 {
        assert!(std::time::Instant::now() < deadline, "bytes still in flight after B read them all");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("status showed up to {most} bytes in flight in the kernel while B did not read");
    drop(b);
}

/// A relay whose metrics do not answer (stopped here with SIGSTOP) is said to be so: `status`
/// left the pairs out as for a relay without --metrics. A link-local --metrics address keeps its
/// interface, without which the URL was of no use and the figures were missing (a helper's IPv6
/// pass).
#[test]
fn status_says_a_stopped_relay_is_stopped_and_keeps_a_link_locals_interface() {
    let _netns = enter_netns();
    let relay = Skrelay::start(&["relay", "--datapath", "userspace", "--metrics", "127.0.0.1:0"]);
    assert_eq!(find(relay.pid()).unwrap()["metrics_answered"], true);
    // SAFETY: kill(2) on the relay this test started.
    unsafe { libc::kill(relay.pid(), libc::SIGSTOP) };
    // Clients that connect meanwhile wait in its listen backlog, which status reads from
    // /proc/net/tcp: it said nothing of them.
    let at = "127.0.0.1:7777".parse().unwrap();
    let (mut a, mut b) = (connect(at), connect(at));
    let r = find(relay.pid()).unwrap();
    let text = skrelay_ok(&["status"]);
    // SAFETY: as above.
    unsafe { libc::kill(relay.pid(), libc::SIGCONT) };
    assert_eq!(r["backlog_clients"], 2, "{r}");
    assert!(text.contains("; 2 client(s) in its listen backlog, not yet accepted"), "{text}");
    a.write_all(b"hi").unwrap();
    assert_eq!(read_n(&mut b, 2), b"hi", "the clients of the backlog are paired once it runs again");
    assert_eq!(find(relay.pid()).unwrap()["backlog_clients"], 0);
    drop((a, b));
    // Stopped: its metrics are not asked (null, not "did not answer"), and it is said so. They
    // were waited for, and it was listed as serving (a helper's pass).
    assert_eq!(
        (r["metrics_answered"].clone(), r["pairs"].clone()),
        (serde_json::Value::Null, serde_json::Value::Null),
        "{r}"
    );
    assert_eq!(r["stopped"], true, "{r}");
    assert!(text.contains(&format!("(pid {}): stopped (SIGCONT resumes it;", relay.pid())), "{text}");
    // A userspace relay moves nothing while stopped: it read "its kernel pairs move bytes".
    assert!(text.contains("meanwhile nothing happens: its pairs' bytes wait)"), "{text}");
    assert!(find(relay.pid()).unwrap()["stopped"] == false);
    // A frozen cgroup stops it too: it read as running, and its metrics were waited for (1 s).
    let cg = cgroup_v2_mount().join(format!("skrelay-frozen-status-{}", std::process::id()));
    std::fs::create_dir(&cg).unwrap();
    std::fs::write(cg.join("cgroup.procs"), relay.pid().to_string()).unwrap();
    std::fs::write(cg.join("cgroup.freeze"), "1").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(cg.join("cgroup.events")).unwrap().contains("frozen 1") {
        assert!(std::time::Instant::now() < deadline, "the cgroup did not freeze");
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = std::time::Instant::now();
    let text = skrelay_ok(&["status"]);
    let took = started.elapsed();
    let r = find(relay.pid()).unwrap();
    std::fs::write(cg.join("cgroup.freeze"), "0").unwrap();
    drop(relay);
    let _ = (0..100).find(|_| {
        std::thread::sleep(Duration::from_millis(50));
        std::fs::remove_dir(&cg).is_ok()
    });
    assert!(text.contains(": frozen (its cgroup /skrelay-frozen-status-"), "{text}");
    assert!(took < Duration::from_millis(900), "status waited {took:?} for a frozen relay");
    assert_eq!((r["stopped"].clone(), r["metrics_answered"].clone()), (true.into(), serde_json::Value::Null), "{r}");
    // Link-local on lo: fe80::1 with lo's index as its interface.
    let up =
        std::process::Command::new("ip").args(["addr", "add", "fe80::1/64", "dev", "lo", "nodad"]).status().unwrap();
    assert!(up.success());
    let relay = Skrelay::start(&["relay", "--datapath", "userspace", "--metrics", "[fe80::1%lo]:0"]);
    let r = find(relay.pid()).unwrap();
    let url = r["metrics"].as_str().unwrap_or_else(|| panic!("{r}"));
    assert!(url.starts_with("http://[fe80::1%1]:"), "{r}");
    assert_eq!((r["metrics_answered"].clone(), r["pairs"].clone()), (true.into(), 0.into()), "{r}");
    drop(relay);
    // Every address: a URL that opens (`http://0.0.0.0:PORT/metrics` did not), and where it
    // listens.
    for (any, open) in [("0.0.0.0", "127.0.0.1"), ("[::]", "[::1]")] {
        let relay = Skrelay::start(&["relay", "--datapath", "userspace", "--metrics", &format!("{any}:0")]);
        let r = find(relay.pid()).unwrap();
        let url = r["metrics"].as_str().unwrap_or_else(|| panic!("{r}"));
        assert!(url.starts_with(&format!("http://{open}:")), "{r}");
        assert_eq!(r["metrics_answered"], true, "{r}");
        let text = skrelay_ok(&["status"]);
        assert!(text.contains(&format!("metrics at {url} (listening on {any}:")), "{text}");
    }
    // IPv6 disabled: `[::]` still listens (for IPv4), and ::1 is no address to reach it at.
    for f in ["all", "lo"] {
        std::fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1").unwrap();
    }
    let relay = Skrelay::start(&["relay", "--datapath", "userspace", "--metrics", "[::]:0"]);
    let r = find(relay.pid()).unwrap();
    assert!(r["metrics"].as_str().is_some_and(|u| u.starts_with("http://127.0.0.1:")), "{r}");
    assert_eq!(r["metrics_answered"], true, "{r}");
}

/// A relay or proxy run from a copy of the binary under another name (`sk`) was taken for
/// another program: `status` did not list it, `--takeover` refused it and `accel on` accelerated
/// its cgroup, which then cut its streams (a helper's pass over the jobs combined). It names
/// itself `skrelay` now.
#[test]
fn a_relay_under_another_binary_name_is_known() {
    let _netns = enter_netns();
    let dir = std::env::temp_dir().join(format!("skrelay-renamed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sk = dir.join("sk");
    // Copied by a child `cp`, not fs::copy: a descriptor open for writing in this process would
    // be inherited by another test thread's fork until that child execs, and exec of `sk` in
    // that window fails with ETXTBSY (it did, once, in CI).
    let copied = std::process::Command::new("cp").arg(env!("CARGO_BIN_EXE_skrelay")).arg(&sk).status().unwrap();
    assert!(copied.success(), "cp skrelay: {copied}");
    let mut cmd = std::process::Command::new(&sk);
    cmd.args(["proxy", "--datapath", "userspace", "--listen", "127.0.0.1:7790", "--upstream", "127.0.0.1:7791"]);
    let proxy = Skrelay::spawn(cmd, "listening on");
    let p = find(proxy.pid()).unwrap_or_else(|| panic!("proxy {} not listed: {:?}", proxy.pid(), relays()));
    assert_eq!(p["command"], "proxy", "{p}");
    assert_eq!(p["listening"], serde_json::json!(["127.0.0.1:7790"]), "{p}");
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", proxy.pid())).unwrap();
    assert_eq!(comm.trim_end(), "skrelay");
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}
