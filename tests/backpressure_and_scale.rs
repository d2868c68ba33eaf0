//! Relay semantics 5 and 6: a slow reader loses nothing while memory stays bounded, and 2,000
//! concurrent pairs each exchange a checked 64 KiB both ways.
#[macro_use]
mod common;
use common::*;
use mio::{net::TcpStream as MioStream, Events, Interest, Poll, Token};
use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

fn addr() -> SocketAddr {
    "127.0.0.1:7777".parse().unwrap()
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Bytes charged to the TCP sockets of this network namespace (`ss -tm`: rmem + wmem + queued).
fn netns_socket_bytes() -> u64 {
    let out = Command::new("ss").args(["-tmnH"]).output().expect("ss");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut total = 0;
    for skmem in text.split("skmem:(").skip(1) {
        let fields = skmem.split(')').next().unwrap_or("");
        for f in fields.split(',') {
            for prefix in ["r", "t", "w"] {
                if let Some(v) = f.strip_prefix(prefix).and_then(|v| v.parse::<u64>().ok()) {
                    total += v;
                }
            }
        }
    }
    total
}

/// System-wide TCP memory in pages (/proc/net/sockstat `mem`).
fn sockstat_tcp_pages() -> u64 {
    let s = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "mem").nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn a_slow_reader_loses_nothing_and_memory_stays_bounded(dp: &str) {
    let _netns = enter_netns();
    const LEN: u64 = 40 << 20;
    const RATE: f64 = 10.0 * 1024.0 * 1024.0; // bytes per second
    let relay = Skrelay::start(&["relay", "--datapath", dp]);
    let pid = relay.pid();
    let rss_before = rss_kib(pid);
    let pages_before = sockstat_tcp_pages();
    let mut a = connect(addr());
    let mut b = connect(addr());
    let writer = thread::spawn(move || {
        let sha = send_pattern(&mut a, 21, LEN).unwrap();
        a.shutdown(Shutdown::Write).unwrap();
        (sha, a)
    });
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        thread::spawn(move || {
            let (mut rss, mut sock, mut pages) = (0u64, 0u64, 0u64);
            while !done.load(Ordering::Relaxed) {
                rss = rss.max(rss_kib(pid));
                sock = sock.max(netns_socket_bytes());
                pages = pages.max(sockstat_tcp_pages());
                thread::sleep(Duration::from_millis(100));
            }
            (rss, sock, pages)
        })
    };
    // Read at ~10 MiB/s.
    let t0 = Instant::now();
    let mut hasher = Vec::with_capacity(LEN as usize);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = b.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.extend_from_slice(&buf[..n]);
        let due = Duration::from_secs_f64(hasher.len() as f64 / RATE);
        if let Some(wait) = due.checked_sub(t0.elapsed()) {
            thread::sleep(wait);
        }
    }
    done.store(true, Ordering::Relaxed);
    let (sent, _a) = writer.join().unwrap();
    let (rss, sock, pages) = sampler.join().unwrap();
    assert_eq!((hasher.len() as u64, sha(&hasher)), (LEN, sent), "{dp}: bytes lost or reordered");
    eprintln!(
        "{dp}: 40 MiB to a 10 MiB/s reader in {:.1}s; relay RSS max {} KiB (start {rss_before}); \
         netns socket memory max {} KiB; system TCP mem max {} pages (start {pages_before})",
        t0.elapsed().as_secs_f64(),
        rss,
        sock / 1024,
        pages
    );
    assert!(rss < rss_before + 16 * 1024, "{dp}: relay RSS grew to {rss} KiB");
    // Four sockets' buffers on loopback (autotuned up to tcp_rmem/tcp_wmem max) bound this.
    assert!(sock < 64 << 20, "{dp}: socket memory in this netns reached {sock} bytes");
    drop(b);
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

per_datapath!(a_slow_reader_loses_nothing_and_memory_stays_bounded);

/// One client socket of the scale test.
struct Client {
    stream: MioStream,
    seed: u64,
    expect_seed: u64,
    out: Vec<u8>,
    written: usize,
    got: Vec<u8>,
}

fn two_thousand_concurrent_pairs_each_exchange_64_kib_both_ways(dp: &str) {
    let _netns = enter_netns();
    const PAIRS: usize = 2000;
    const LEN: usize = 64 * 1024;
    let relay = Skrelay::start(&["relay", "--datapath", dp, "--max-pending", "4000", "--metrics", "127.0.0.1:0"]);
    let t0 = Instant::now();
    // Connect all 4,000 clients first (arrival order pairs 2i with 2i+1), then exchange.
    let mut clients: Vec<Client> = (0..2 * PAIRS)
        .map(|i| {
            let s = connect(addr());
            s.set_nonblocking(true).unwrap();
            let mut out = vec![0u8; LEN];
            Pattern::new(1000 + i as u64).fill(&mut out);
            Client {
                stream: MioStream::from_std(s),
                seed: 1000 + i as u64,
                expect_seed: 1000 + (i ^ 1) as u64,
                out,
                written: 0,
                got: Vec::new(),
            }
        })
        .collect();
    let connected = t0.elapsed();
    let mut poll = Poll::new().unwrap();
    for (i, c) in clients.iter_mut().enumerate() {
        poll.registry().register(&mut c.stream, Token(i), Interest::READABLE | Interest::WRITABLE).unwrap();
    }
    let mut events = Events::with_capacity(4096);
    let mut complete = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while complete < 2 * PAIRS {
        assert!(Instant::now() < deadline, "{dp}: only {complete} of {} clients done", 2 * PAIRS);
        poll.poll(&mut events, Some(Duration::from_millis(100))).unwrap();
        for ev in events.iter() {
            let c = &mut clients[ev.token().0];
            while c.written < LEN {
                match c.stream.write(&c.out[c.written..]) {
                    Ok(n) => c.written += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{dp}: write: {e}"),
                }
            }
            let before = c.got.len();
            let mut buf = [0u8; 16384];
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => panic!("{dp}: client {} got EOF after {} bytes", c.seed, c.got.len()),
                    Ok(n) => c.got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{dp}: read: {e}"),
                }
            }
            if before < LEN && c.got.len() >= LEN {
                complete += 1;
            }
        }
    }
    for c in &clients {
        assert_eq!(c.got.len(), LEN, "{dp}: client {} got extra bytes", c.seed);
        assert_eq!(sha(&c.got), pattern_sha(c.expect_seed, LEN as u64), "{dp}: client {} got wrong bytes", c.seed);
    }
    let relay_rss = rss_kib(relay.pid());
    eprintln!(
        "{dp}: {PAIRS} pairs connected in {:.2}s, all exchanged 64 KiB both ways (sha256 checked) in {:.2}s; relay RSS {relay_rss} KiB",
        connected.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    drop(clients);
    // A kernel relay whose socket map fills sends further pairs to userspace: count both.
    let m = relay.wait_pairs_ended(PAIRS as u64, Duration::from_secs(30));
    let eof = m.pairs(dp, "eof") + if dp == "kernel" { m.pairs("userspace", "eof") } else { 0 };
    assert_eq!(eof, PAIRS as u64, "{dp}: every pair ended with EOF both ways:\n{}", m.text);
    assert_eq!(m.sum("skrelay_bytes_total"), 2 * 65536 * PAIRS as u64, "{dp}: 64 KiB each way:\n{}", m.text);
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

per_datapath!(two_thousand_concurrent_pairs_each_exchange_64_kib_both_ways);
