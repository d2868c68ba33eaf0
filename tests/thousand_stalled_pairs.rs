//! A global limit holds with 1,000 stalled pairs at once (issue 10): every pair's sender writes
//! without pause while its partner does not read. On the kernel datapath at most
//! `--kernel-memory / (2 x --kernel-buffer)` pairs join the kernel maps and the rest are spliced in
//! user space ("joins held back", logged once); every sender is held back by TCP flow control;
//! the host's memory falls by no more than the documented total (README, "Bounded memory":
//! --kernel-memory for the kernel pairs' queues, the pipes of the pairs spliced in user space, and
//! socket buffers, which the kernel bounds host-wide by net.ipv4.tcp_mem); and once the partners
//! read, every pair delivers exactly what its sender wrote.
//!
//! In a test binary of its own: it takes a few GiB of socket memory for a few seconds, and
//! measures host MemAvailable, which nothing else may disturb.
mod common;
use common::*;
use sha2::{Digest, Sha256};
use std::{
    io::{ErrorKind, Read},
    net::{Shutdown, SocketAddr},
    time::{Duration, Instant},
};

const PAIRS: usize = 1000;
const STALL: Duration = Duration::from_secs(6);
/// --kernel-buffer and --kernel-memory for the run: 64M / (2 x 256K) = 128 kernel pairs.
const KERNEL_BUFFER: &str = "256K";
const KERNEL_MEMORY: u64 = 64 << 20;
/// What one stalled pair may hold on loopback with default buffers (README): the sender's send
/// buffer (tcp_wmem max 4 MiB), the relay's receive buffer (tcp_rmem max 6 MiB), its pipe or
/// kernel budget, its send buffer (16 MiB on a kernel pair, which sets 8 MiB) and the partner's
/// receive buffer (6 MiB). Measured: at most 23.7 MiB pushed by one sender.
const PER_PAIR: u64 = 36 << 20;
/// Pipes of a pair spliced in user space (relay/datapath/userspace.rs: 256 KiB each way).
const PIPES_PER_PAIR: u64 = 2 * (256 << 10);
/// Whatever else moves MemAvailable on a shared host meanwhile.
const SLACK: u64 = 256 << 20;

/// net.ipv4.tcp_mem's hard limit in bytes: what all TCP socket buffers of the host may hold.
fn tcp_mem_max() -> u64 {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem").unwrap();
    let pages: u64 = s.split_whitespace().nth(2).and_then(|v| v.parse().ok()).expect("tcp_mem");
    pages * 4096
}

fn mem_available() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("MemAvailable in /proc/meminfo")
        * 1024
}

#[test]
fn a_thousand_stalled_pairs_stay_within_the_global_limit_and_lose_nothing() {
    // Only the initial network namespace shows net.ipv4.tcp_mem (it is host-wide).
    let tcp_mem = tcp_mem_max();
    let _netns = enter_netns();
    if !require_bpf("a_thousand_stalled_pairs_stay_within_the_global_limit_and_lose_nothing") {
        return;
    }
    let memory = format!("{}M", KERNEL_MEMORY >> 20);
    let relay = Skrelay::start(&[
        "relay",
        "--datapath",
        "kernel",
        "--kernel-after",
        "0",
        "--kernel-buffer",
        KERNEL_BUFFER,
        "--kernel-memory",
        &memory,
        "--max-pending",
        "4000",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let addr: SocketAddr = "127.0.0.1:7777".parse().unwrap();
    let before = mem_available();
    let mut senders = Vec::with_capacity(PAIRS);
    let mut readers = Vec::with_capacity(PAIRS);
    for i in 0..PAIRS {
        // Arrival order pairs each sender with the reader that connects right after it.
        let a = connect(addr);
        let b = connect(addr);
        senders.push(PatternSender::new(a, 5000 + i as u64));
        readers.push(b);
    }
    // Every sender writes while it can; nobody reads.
    let t0 = Instant::now();
    let mut late = Vec::new();
    while t0.elapsed() < STALL {
        let moved: u64 = senders.iter_mut().map(PatternSender::push).sum();
        if t0.elapsed() > STALL / 2 {
            late.push(before.saturating_sub(mem_available()));
        }
        if moved == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    late.sort_unstable();
    let fell = late[late.len() / 2];
    let pushed: u64 = senders.iter().map(|s| s.pushed).sum();
    let most = senders.iter().map(|s| s.pushed).max().unwrap();
    eprintln!(
        "{PAIRS} stalled pairs: senders pushed {:.0} MiB in all, at most {:.2} MiB one; MemAvailable fell by \
         {:.0} MiB (median, second half of {STALL:?})",
        pushed as f64 / 1048576.0,
        most as f64 / 1048576.0,
        fell as f64 / 1048576.0
    );
    assert!(most <= PER_PAIR, "a sender pushed {most} bytes to a partner that did not read");
    let bound = KERNEL_MEMORY + PAIRS as u64 * PIPES_PER_PAIR + tcp_mem + SLACK;
    assert!(fell <= bound, "host MemAvailable fell by {fell} bytes, over the documented {bound}");
    // The partners read: each gets exactly what its sender wrote, then EOF.
    for s in &senders {
        s.stream.shutdown(Shutdown::Write).unwrap();
    }
    // All partners read at once, as real clients would: at this scale the host's TCP memory is at
    // net.ipv4.tcp_mem, and a relay's send to one partner waits until others free some.
    let mut buf = vec![0u8; 256 * 1024];
    let mut got: Vec<(u64, Sha256, bool)> = (0..PAIRS).map(|_| (0, Sha256::new(), false)).collect();
    for b in &readers {
        b.set_nonblocking(true).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut done = 0;
    while done < PAIRS {
        let mut moved = false;
        for (i, b) in readers.iter_mut().enumerate() {
            let (n, h, eof) = &mut got[i];
            if *eof {
                continue;
            }
            loop {
                match b.read(&mut buf) {
                    Ok(0) => {
                        *eof = true;
                        done += 1;
                        break;
                    }
                    Ok(k) => {
                        h.update(&buf[..k]);
                        *n += k as u64;
                        moved = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => panic!("pair {i}: reading after the stall: {e} ({n} of {} bytes)", senders[i].pushed),
                }
            }
        }
        assert!(Instant::now() < deadline, "only {done} of {PAIRS} partners got their EOF within 120 s");
        if !moved {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    for (i, ((n, h, _), s)) in got.into_iter().zip(senders).enumerate() {
        assert_eq!(n, s.pushed, "pair {i}: bytes lost or duplicated");
        assert!(h.finalize() == s.sha.finalize(), "pair {i}: bytes damaged or reordered");
    }
    // The other way ends too, so every pair ends before the relay is stopped.
    drop(readers);
    let m = relay.wait_pairs_ended(PAIRS as u64, Duration::from_secs(20));
    // Pairs past the budget are spliced in user space: counted under that datapath.
    let held_back = m.pairs_ended("userspace");
    assert!(held_back > 0, "no pair was held back from the kernel maps:\n{}", m.text);
    assert_eq!(m.pairs_ended("kernel") + held_back, PAIRS as u64, "{}", m.text);
    eprintln!("{held_back} of {PAIRS} pairs were spliced in user space");
    let (status, log) = relay.stop(Duration::from_secs(30));
    assert!(status.success(), "{log}");
    assert!(
        log.contains("hold the whole --kernel-memory budget") && log.contains("spliced in user space"),
        "the pairs past the limit were not held back from the kernel maps:\n{}",
        log.lines().filter(|l| !l.contains(" ended after ")).collect::<Vec<_>>().join("\n")
    );
    let summary = log.lines().find(|l| l.contains("kernel datapath:") && l.contains("parkings")).unwrap_or("");
    eprintln!("{summary}");
}
