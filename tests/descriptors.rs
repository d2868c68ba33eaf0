//! Out of descriptors: what a process short of them does with its clients. Run under a small
//! `RLIMIT_NOFILE` (prlimit), with real sockets. Pairs already served must not be cut because
//! others' connections took the descriptors, and a proxy must not blame its upstreams for a
//! shortage of its own.
mod common;
use common::*;
use std::{
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    thread,
    time::Duration,
};

fn addr() -> SocketAddr {
    "127.0.0.1:7777".parse().unwrap()
}

fn under_nofile(limit: u32, args: &[&str]) -> Skrelay {
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--nofile={limit}:{limit}")).arg(SKRELAY).args(args);
    Skrelay::spawn(cmd, "listening on")
}

/// A client of the relay whose small receive buffer leaves what it has not read in the relay.
fn small_receiver() -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(64 << 10).unwrap();
    s.connect(&addr().into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

/// The userspace datapath takes a pipe when a direction has bytes to move. With the descriptors
/// gone, a pair that needed one was reset mid-stream ("Too many open files": 3 of 14 pairs in a
/// helper's pass); it now waits for one, its bytes held in its socket, and every stream is whole.
#[test]
fn userspace_pairs_wait_for_a_pipe_instead_of_being_reset() {
    let _netns = enter_netns();
    let relay = under_nofile(64, &["relay", "--datapath", "userspace", "--threads", "1", "--metrics", "127.0.0.1:0"]);
    const PAIRS: usize = 14;
    const LEN: u64 = 16_000_000;
    // Small receive buffers: what a reader has not taken waits in the relay, in its pipes.
    let mut ends = Vec::new();
    for _ in 0..PAIRS {
        let a = small_receiver();
        let b = small_receiver();
        ends.push((a, b));
    }
    // Every client sends at once; nobody reads for a while, so pipes fill and stay taken.
    let mut senders = Vec::new();
    for (i, (a, b)) in ends.iter().enumerate() {
        for (j, s) in [a, b].into_iter().enumerate() {
            let mut s = s.try_clone().unwrap();
            let seed = (i * 2 + j) as u64;
            senders.push(thread::spawn(move || {
                let sha = send_pattern(&mut s, seed, LEN).unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap();
                sha
            }));
        }
    }
    thread::sleep(Duration::from_secs(1));
    let readers: Vec<_> = ends
        .into_iter()
        .flat_map(|(a, b)| [b, a])
        .map(|mut s| {
            thread::spawn(move || {
                let (got, end) = read_until_end(&mut s);
                (sha(&got), got.len() as u64, end.is_ok())
            })
        })
        .collect();
    let sent: Vec<String> = senders.into_iter().map(|t| t.join().unwrap()).collect();
    for (i, r) in readers.into_iter().enumerate() {
        let (sha, len, eof) = r.join().unwrap();
        // Reader i reads the stream of sender i (b reads a's, a reads b's).
        assert!(eof && len == LEN && sha == sent[i], "stream {i}: {len} bytes, eof {eof}\n{}", relay.log());
    }
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    assert!(!log.contains("Too many open files (os error 24)) after"), "a pair was cut:\n{log}");
}

/// A proxy out of descriptors marked its healthy upstream down, counted connect failures against
/// it, and reset each client as `no_upstream` with two warnings per client. Now the upstream is
/// left alone, the clients count as `error`, and the shortage is said once.
/// A proxy short of descriptors for a client's upstream connection blames no upstream, and the
/// client waits for one instead of being reset. Resetting it freed a descriptor, with which the
/// accept loop took the next client from the backlog, which was reset in turn: a helper saw 12
/// of 30 clients reset in one burst under one limit, and none under the next (2026-12-05).
#[test]
fn a_proxy_out_of_descriptors_does_not_blame_its_upstream() {
    let _netns = enter_netns();
    serve_echo(TcpListener::bind("127.0.0.1:8080").unwrap());
    let proxy = under_nofile(
        48,
        &[
            "proxy",
            "--upstream",
            "127.0.0.1:8080",
            "--datapath",
            "userspace",
            "--threads",
            "1",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    // Which runs out first, accept(2) or the upstream's socket(2), depends on how many
    // descriptors are left when the last pair forms (a CI run stopped at accept(2)). A
    // connection to the metrics port that sends nothing holds one descriptor for up to 2 s;
    // closing it once the pairs stopped forming lets in one client whose upstream connection
    // cannot be opened.
    let held = TcpStream::connect(proxy.metrics_addr()).unwrap();
    thread::sleep(Duration::from_millis(100));
    // Each client says who it is; a served one costs the proxy two descriptors while it lives.
    let mut clients: Vec<(usize, TcpStream)> = (0..40)
        .map(|i| {
            let mut c = TcpStream::connect_timeout(&addr(), Duration::from_secs(5)).expect("connect");
            c.write_all(format!("{i:04}").as_bytes()).unwrap();
            (i, c)
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !["cannot accept more clients now", "cannot open a connection to an upstream"]
        .iter()
        .any(|said| proxy.log().contains(said))
    {
        assert!(std::time::Instant::now() < deadline, "the proxy never ran short:\n{}", proxy.log());
        thread::sleep(Duration::from_millis(20));
    }
    drop(held);
    thread::sleep(Duration::from_millis(500));
    // The clients are served in the order they came, each as the one before it leaves: every
    // one gets its own bytes back, none is reset.
    for (i, c) in clients.iter_mut() {
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut got = [0u8; 4];
        std::io::Read::read_exact(c, &mut got).unwrap_or_else(|e| panic!("client {i}: {e}\n{}", proxy.log()));
        assert_eq!(&got, format!("{i:04}").as_bytes(), "client {i}");
        c.shutdown(std::net::Shutdown::Both).unwrap();
    }
    let m = proxy.metrics();
    assert_eq!(m.get("skrelay_unpaired_clients_total{reason=\"error\"}"), 0, "{}", m.text);
    assert_eq!(m.get("skrelay_upstream_connect_failures_total{upstream=\"127.0.0.1:8080\"}"), 0, "{}", m.text);
    assert_eq!(m.get("skrelay_upstream_up{upstream=\"127.0.0.1:8080\"}"), 1, "{}", m.text);
    assert_eq!(m.get("skrelay_unpaired_clients_total{reason=\"no_upstream\"}"), 0, "{}", m.text);
    drop(clients);
    let (status, log) = proxy.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    assert!(!log.contains("marked down"), "the upstream was blamed:\n{log}");
    assert!(log.contains("accepting clients again"), "{log}");
    // One shortage, one warning (of whichever call ran short first).
    let said = log.matches("cannot open a connection to an upstream").count()
        + log.matches("cannot accept more clients now").count();
    assert_eq!(said, 1, "said once:\n{log}");
}

/// Empty pipes kept for later hold two descriptors each. When accept(2) runs out, those of the
/// accepting loop are closed first, so clients get the descriptors instead of the spares.
#[test]
fn spare_pipes_give_way_to_clients() {
    let _netns = enter_netns();
    let relay = under_nofile(64, &["relay", "--datapath", "userspace", "--threads", "1", "--metrics", "127.0.0.1:0"]);
    // Eight streams at once, none read for a while: each holds a pipe, kept as a spare after.
    const PAIRS: usize = 4;
    const LEN: u64 = 16_000_000;
    let mut ends = Vec::new();
    for _ in 0..PAIRS {
        ends.push((small_receiver(), small_receiver()));
    }
    let senders: Vec<_> = ends
        .iter()
        .flat_map(|(a, b)| [a, b])
        .enumerate()
        .map(|(seed, s)| {
            let mut s = s.try_clone().unwrap();
            thread::spawn(move || {
                send_pattern(&mut s, seed as u64, LEN).unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap();
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(500));
    let readers: Vec<_> = ends
        .into_iter()
        .flat_map(|(a, b)| [a, b])
        .map(|mut s| thread::spawn(move || read_until_end(&mut s).0.len() as u64))
        .collect();
    senders.into_iter().for_each(|t| t.join().unwrap());
    assert!(readers.into_iter().all(|r| r.join().unwrap() == LEN), "{}", relay.log());
    relay.wait_pairs_ended(PAIRS as u64, Duration::from_secs(10));
    // Silent clients, more than fit beside eight spare pipes (16 descriptors) under 64.
    const CLIENTS: usize = 46;
    let silent: Vec<TcpStream> = (0..CLIENTS).map(|_| connect(addr())).collect();
    let m = relay.wait_metrics("every silent client paired", Duration::from_secs(5), |m| {
        m.get("skrelay_pairs_active{datapath=\"userspace\"}") == (CLIENTS / 2) as u64
    });
    drop(silent);
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}\n{}", m.text);
    assert!(!log.contains("cannot accept more clients now"), "{log}");
}

/// Out of descriptors, a scrape that could not be accepted was warned of every 100 ms (91 lines
/// in 9 s in a helper's pass), and "accepting clients again" came after every client let in
/// while the shortage itself was said once per 10 s. Both are said once per shortage now. A
/// scrape is still answered: the responder keeps one descriptor for it.
#[test]
fn a_shortage_is_said_once_by_the_metrics_responder_and_the_accept_loop() {
    let _netns = enter_netns();
    let relay = under_nofile(40, &["relay", "--datapath", "userspace", "--threads", "1", "--metrics", "127.0.0.1:0"]);
    let metrics = relay.metrics_addr();
    let mut silent: Vec<TcpStream> =
        (0..40).filter_map(|_| TcpStream::connect_timeout(&addr(), Duration::from_secs(5)).ok()).collect();
    relay.wait_log("cannot accept more clients now", 1, Duration::from_secs(5));
    // The responder keeps a descriptor for a scrape, which is answered in the shortage (the
    // metrics, and `status` with them, went dark while clients held every descriptor: a helper's
    // operations pass).
    let m = scrape(metrics);
    assert!(m.get("skrelay_pairs_active{datapath=\"userspace\"}") > 0, "{}", m.text);
    // A silent one takes that descriptor; the next waits in the responder's backlog, which
    // cannot take it either.
    let _silent_scrape = TcpStream::connect(metrics).unwrap();
    thread::sleep(Duration::from_millis(200));
    let scrape = TcpStream::connect(metrics).unwrap();
    thread::sleep(Duration::from_millis(1500));
    // Clients leave and come: accepting resumes and stops again, within one warning's 10 s.
    for _ in 0..4 {
        drop(silent.remove(0));
        thread::sleep(Duration::from_millis(200));
        if let Ok(c) = TcpStream::connect_timeout(&addr(), Duration::from_secs(5)) {
            silent.push(c);
        }
        thread::sleep(Duration::from_millis(200));
    }
    drop(scrape);
    drop(silent);
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    assert_eq!(log.matches("metrics: cannot accept a scrape").count(), 1, "{log}");
    let (said, again) =
        (log.matches("cannot accept more clients now").count(), log.matches("accepting clients again").count());
    assert!(said >= 1 && again <= said, "{said} shortage line(s), {again} `again` line(s):\n{log}");
}

/// A token relay out of descriptors: its waiting clients held every one while their partners
/// waited in the listen backlog, so nobody paired until `--pair-timeout` reset them all (a
/// helper's run: 0 of 20 pairs). A waiter now makes room for the next client of the backlog (the
/// newest, while none has waited 2 s), so pairs form while the shortage lasts.
#[test]
fn token_waiters_holding_every_descriptor_make_room_for_their_partners() {
    let _netns = enter_netns();
    let relay = under_nofile(32, &["relay", "--pair", "token", "--datapath", "userspace", "--threads", "1"]);
    // More first halves than descriptors are left (about 20 under 32).
    const N: usize = 30;
    let side = |i: usize| {
        thread::spawn(move || {
            let mut s = connect(addr());
            s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
            if s.write_all(format!("fw{i}\nhi").as_bytes()).is_err() {
                return false;
            }
            let mut got = [0u8; 2];
            std::io::Read::read_exact(&mut s, &mut got).is_ok_and(|()| &got == b"hi")
        })
    };
    let first: Vec<_> = (0..N).map(side).collect();
    thread::sleep(Duration::from_millis(500));
    let second: Vec<_> = (0..N).map(side).collect();
    let paired = |v: Vec<thread::JoinHandle<bool>>| v.into_iter().map(|t| t.join().unwrap()).filter(|&p| p).count();
    let (a, b) = (paired(first), paired(second));
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    assert_eq!(a, b, "{log}");
    assert!(a >= 3, "{a} of {N} pairs formed within 8 s (--pair-timeout is 30 s):\n{log}");
    // All the waiters are younger than 2 s here: the newest makes room.
    assert!(log.contains("the newest waiting client makes room for the next one"), "{log}");
    // The start said how few descriptors there were.
    assert!(log.contains("descriptors are left for clients (the limit is 32,"), "{log}");
}

/// Strangers' waiting clients hold every descriptor (each with a token of its own, nobody to
/// pair with). A newcomer was reset 0.3 s after its accept even with nobody in the backlog, and a
/// pair's second half made room by resetting the first: 0 of 4 pairs formed (a helper's token
/// pass). Now a waiter yields only for a client in the backlog, and the one that waited longest
/// once it has waited 2 s: every pair forms.
#[test]
fn pairs_form_while_strangers_hold_every_descriptor() {
    let _netns = enter_netns();
    let relay = under_nofile(32, &["relay", "--pair", "token", "--datapath", "userspace", "--threads", "1"]);
    let mut strangers = Vec::new();
    let held = |pid: i32| std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    while held(relay.pid()) < 32 && strangers.len() < 40 {
        let mut s = connect(addr());
        s.write_all(format!("stranger{}\n", strangers.len()).as_bytes()).unwrap();
        strangers.push(s);
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(2500));
    for (round, gap) in [0u64, 0, 500, 1000].into_iter().enumerate() {
        let side = move |name: &'static str, after: u64| {
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(after));
                let mut s = connect(addr());
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s.write_all(format!("pair{round}\nfrom-{name}").as_bytes()).unwrap();
                let mut got = [0u8; 6];
                std::io::Read::read_exact(&mut s, &mut got).map(|()| got.to_vec())
            })
        };
        let (a, b) = (side("A", 0), side("B", gap));
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        let ok = matches!((&a, &b), (Ok(x), Ok(y)) if x == b"from-B" && y == b"from-A");
        assert!(ok, "round {round}, B {gap} ms after A: A {a:?}, B {b:?}\n{}", relay.log());
    }
    drop(strangers);
}

/// A descriptor limit that leaves room for no pair: the relay warned "only 0 descriptors are
/// left" and served anyway, accepting one client at a time and never its partner (a helper's
/// resource-limits pass: 0 of 30 pairs under `ulimit -n 20`). It now refuses to start, exit 2;
/// one limit higher, with two to spare, it serves.
#[test]
fn a_limit_that_leaves_no_room_for_a_pair_is_refused_at_start() {
    let _netns = enter_netns();
    let mut refused = Vec::new();
    for limit in 3..40u32 {
        let out = Command::new("prlimit")
            .arg(format!("--nofile={limit}:{limit}"))
            .arg(SKRELAY)
            .args(["relay", "--datapath", "userspace", "--threads", "1", "--drain-timeout", "0.001"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A relay that starts serves until stopped: look at what it says within 3 s.
        let pid = out.id() as i32;
        let started = std::time::Instant::now();
        let mut child = out;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if started.elapsed() > Duration::from_secs(3) {
                // SAFETY: kill(2) of our own child, still running.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                let _ = child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
        match status {
            // Too few for the dynamic loader itself.
            Some(s) if s.code() == Some(127) && err.contains("error while loading shared libraries") => {}
            Some(s) => {
                assert_eq!(s.code(), Some(2), "limit {limit}: {err}");
                assert!(!err.contains("listening on"), "limit {limit}: {err}");
                refused.push((limit, err));
            }
            None => {
                assert!(err.contains("listening on"), "limit {limit}: {err}");
                assert!(err.contains("only 2 descriptors are left for clients"), "limit {limit}: {err}");
                let last = refused.last().map(|(_, e)| e.as_str()).unwrap_or_default();
                assert!(
                    last.contains("cannot serve clients: 1 descriptor(s) are left under the limit of")
                        && last.contains("and each pair takes two (raise the descriptor limit"),
                    "one limit lower: {last}"
                );
                return;
            }
        }
    }
    panic!("no limit up to 40 let the relay start: {refused:?}");
}
