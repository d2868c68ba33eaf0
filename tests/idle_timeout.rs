//! `--idle-timeout`: a pair where no byte moves either way for that long is reset, both clients,
//! on both datapaths: a pair of silent clients, and a pair whose reader stopped reading (its
//! partner's bytes wait, and the sender is held back). A pair that keeps talking lives on, and
//! 0 turns the timeout off.
#[macro_use]
mod common;
use common::*;
use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

fn addr() -> SocketAddr {
    "127.0.0.1:7777".parse().unwrap()
}

fn relay_args(dp: &str, idle: &str) -> Vec<String> {
    let mut args: Vec<String> =
        ["relay", "--datapath", dp, "--idle-timeout", idle, "--metrics", "127.0.0.1:0"].map(String::from).into();
    if dp == "kernel" {
        // Into the socket maps at once: the idle check must see bytes the kernel moves.
        args.extend(["--kernel-after".into(), "0".into()]);
    }
    args
}

/// Reads until the relay cuts the connection; returns how it ended and when.
fn read_until_cut(s: &mut TcpStream) -> (std::io::Result<usize>, Instant) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(n) if n > 0 => continue,
            r => return (r, Instant::now()),
        }
    }
}

fn idle_pairs_are_reset_and_busy_ones_live(dp: &str) {
    let _netns = enter_netns();
    let args = relay_args(dp, "1");
    let relay = Skrelay::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut a = connect(addr());
    let mut b = connect(addr());
    // Busy for 2.5 s (a message every 0.3 s, one way only): more than twice the timeout.
    let mut quiet = Instant::now();
    for i in 0..8u8 {
        thread::sleep(Duration::from_millis(300));
        a.write_all(&[i; 100]).unwrap();
        assert_eq!(read_n(&mut b, 100), vec![i; 100], "{dp}: message {i}");
        quiet = Instant::now();
    }
    // Silent from here: both clients are reset about a second later.
    for (name, s) in [("a", &mut a), ("b", &mut b)] {
        let (r, at) = read_until_cut(s);
        assert!(
            matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "{dp}: client {name} of an idle pair should be reset, got {r:?}"
        );
        let after = at - quiet;
        assert!(
            after >= Duration::from_millis(900) && after < Duration::from_secs(4),
            "{dp}: {name} reset after {after:?}"
        );
    }
    relay.wait_log("reset: idle for", 1, Duration::from_secs(5));
    let m = relay.wait_metrics("an idle pair", Duration::from_secs(5), |m| m.pairs_ended(dp) == 1);
    assert_eq!(m.pairs(dp, "timeout"), 1, "{dp}: the idle pair is counted as a timeout");
    assert_eq!(m.bytes(dp), 800, "{dp}: what it moved before it went quiet");

    // A client that stops reading: its partner's bytes wait and the partner is held back; once
    // nothing has moved for the timeout, both are reset and the sender's write fails.
    let mut c = connect(addr());
    let mut d = connect(addr());
    c.write_all(b"hi").unwrap();
    assert_eq!(read_n(&mut d, 2), b"hi");
    let t0 = Instant::now();
    let chunk = vec![7u8; 1 << 16];
    let mut sent = 0u64;
    let err = loop {
        match c.write(&chunk) {
            Ok(n) => sent += n as u64,
            Err(e) => break e,
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{dp}: the stalled sender was never cut ({sent} bytes sent)");
    };
    assert!(
        matches!(err.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe),
        "{dp}: the held-back sender should see the reset, got {err:?}"
    );
    assert!(sent > 1 << 20, "{dp}: only {sent} bytes went before the cut: it came before the sender was held back");
    relay.wait_log("reset: idle for", 2, Duration::from_secs(5));
    let m = relay.wait_metrics("a stalled pair", Duration::from_secs(5), |m| m.pairs_ended(dp) == 2);
    assert_eq!(m.pairs(dp, "timeout"), 2, "{dp}");
    drop(d);
}
per_datapath!(idle_pairs_are_reset_and_busy_ones_live);

/// A client that resets while its partner reads nothing: the pair waits for the partner to take
/// what the reset client sent (a reader paused for 2 s gets all of it, then the reset: it lost
/// 920 KB of 1 MiB when the wait ended after 1 s without an acknowledgement), but no longer than
/// `--idle-timeout`, as a live pair; its line names the reset and the wait. On the kernel
/// datapath the client resets once its bytes have left its own socket on the relay: a reset
/// within a millisecond or two of their acknowledgement loses the ones still parked there (the
/// caveat of KERNEL-NOTES item 12, which failed this test once in CI: 113 KB of 1 MiB).
fn a_reset_waits_for_a_partner_that_reads_nothing_until_the_idle_timeout(dp: &str) {
    let _netns = enter_netns();
    let args = relay_args(dp, "3");
    let relay = Skrelay::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // A pair where a sent 1 MiB that b has not read, all of it taken by the relay, then reset.
    let reset_with_bytes_waiting = || {
        let mut a = connect(addr());
        let mut b = connect(addr());
        a.write_all(b"hi").unwrap();
        assert_eq!(read_n(&mut b, 2), b"hi");
        a.write_all(&vec![3u8; 1 << 20]).unwrap();
        wait_acked(&a, Duration::from_secs(10), &format!("a's bytes ({dp})"));
        if dp == "kernel" {
            wait_out_of_the_senders_socket(&b, 1 << 20, &format!("a's bytes ({dp})"));
        }
        socket2::SockRef::from(&a).set_linger(Some(Duration::ZERO)).unwrap();
        drop(a);
        (b, Instant::now())
    };
    // A reader that pauses gets every byte, then the reset.
    let (mut b, _) = reset_with_bytes_waiting();
    thread::sleep(Duration::from_secs(2));
    b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (mut got, mut buf) = (0usize, vec![0u8; 1 << 16]);
    let end = loop {
        match b.read(&mut buf) {
            Ok(0) => break Ok(0),
            Ok(n) => got += n,
            Err(e) => break Err(e),
        }
    };
    assert!(matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset), "{dp}: b got {end:?}");
    assert_eq!(got, 1 << 20, "{dp}: a reader paused for 2 s got {got} of 1 MiB\n{}", relay.log());
    // A reader that takes nothing holds the pair for the timeout, then is reset, even while it
    // keeps writing (what it sends goes nowhere).
    let (mut b, reset_at) = reset_with_bytes_waiting();
    let mut chatty = b.try_clone().unwrap();
    let chatter = thread::spawn(move || {
        for _ in 0..40 {
            thread::sleep(Duration::from_millis(300));
            if chatty.write_all(&[1u8; 100]).is_err() {
                break;
            }
        }
    });
    relay.wait_log("then took nothing", 1, Duration::from_secs(10));
    let waited = reset_at.elapsed();
    assert!(
        waited >= Duration::from_millis(2700) && waited < Duration::from_secs(7),
        "{dp}: the pair waited {waited:?} for b after a's reset\n{}",
        relay.log()
    );
    let log = relay.log();
    let line = log.lines().find(|l| l.contains("then took nothing")).unwrap();
    assert!(line.contains("reset (") && line.contains("--idle-timeout"), "{dp}: {line}");
    // b gets what reached its socket, then the reset, never an end of file.
    let (r, _) = read_until_cut(&mut b);
    assert!(matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset), "{dp}: b got {r:?}");
    chatter.join().unwrap();
}
per_datapath!(a_reset_waits_for_a_partner_that_reads_nothing_until_the_idle_timeout);

/// `--takeover`: the new process's clock runs on from the old one's, so an upgrade does not give
/// a quiet pair a whole new timeout (upgraded more often than the timeout, it would never be cut).
fn a_takeover_keeps_the_idle_clock_running(dp: &str) {
    let _netns = enter_netns();
    let old = Skrelay::start(&["relay", "--datapath", dp, "--idle-timeout", "2"]);
    let mut a = connect(addr());
    let mut b = connect(addr());
    a.write_all(b"hi").unwrap();
    assert_eq!(read_n(&mut b, 2), b"hi");
    let quiet = Instant::now();
    thread::sleep(Duration::from_millis(1200));
    let pid = old.pid().to_string();
    let new = Skrelay::start(&["relay", "--datapath", dp, "--idle-timeout", "2", "--takeover", &pid]);
    let mut old = old;
    assert!(old.wait(Duration::from_secs(10)).success(), "{}", old.log());
    assert!(old.log().contains("handed over 1 live pair(s)"), "{dp}:\n{}", old.log());
    let (r, at) = read_until_cut(&mut a);
    assert!(matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset), "{dp}: got {r:?}");
    let after = at - quiet;
    assert!(
        after >= Duration::from_millis(1900) && after < Duration::from_millis(3000),
        "{dp}: a pair quiet since {:?} before the takeover was reset {after:?} after its last byte \
         (a new clock would say 3.2 s or more)",
        Duration::from_millis(1200)
    );
    new.wait_log("reset: idle for at least", 1, Duration::from_secs(5));
}
per_datapath!(a_takeover_keeps_the_idle_clock_running);

#[test]
fn an_idle_timeout_of_0_never_cuts_and_a_bad_one_is_refused() {
    let _netns = enter_netns();
    let relay = Skrelay::start(&["relay", "--datapath", "userspace", "--idle-timeout", "0"]);
    let mut a = connect(addr());
    let mut b = connect(addr());
    a.write_all(b"one").unwrap();
    assert_eq!(read_n(&mut b, 3), b"one");
    thread::sleep(Duration::from_millis(1500));
    b.write_all(b"two").unwrap();
    assert_eq!(read_n(&mut a, 3), b"two", "a silent pair was cut with --idle-timeout 0");
    assert!(!relay.log().contains("idle for"), "{}", relay.log());
    for (bad, why) in [
        ("-1", "not a number of seconds"),
        ("soon", "not a number of seconds"),
        ("1e-10", "give 0 (never) or at least 0.001"),
    ] {
        let (code, _, err) = skrelay_output(&["proxy", "--upstream", "127.0.0.1:9", "--idle-timeout", bad]);
        assert_eq!(code, 2, "--idle-timeout {bad}: {err}");
        assert!(err.contains(why), "--idle-timeout {bad}: {err}");
    }
}

/// A pair whose client a sent 2 MiB that b does not read, all acknowledged by the relay, and
/// then reset: b, and when a reset.
fn pair_whose_first_client_sent_2_mib_and_reset(dp: &str) -> (TcpStream, Instant) {
    let mut a = connect(addr());
    let b = connect(addr());
    a.write_all(b"hi").unwrap();
    assert_eq!(read_n(&mut &b, 2), b"hi");
    a.write_all(&vec![5u8; 2 << 20]).unwrap();
    wait_acked(&a, Duration::from_secs(10), &format!("a's bytes ({dp})"));
    socket2::SockRef::from(&a).set_linger(Some(Duration::ZERO)).unwrap();
    drop(a);
    (b, Instant::now())
}

/// CPU ticks (utime + stime) process `pid` has used.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap().split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// After a client's reset, its partner sends on at full speed and reads nothing: what it sends
/// toward the reset client is dropped (so that one blocked writing can go on reading), but on
/// splice(2) only up to a bound, after which it is held back again: read at full speed until
/// --idle-timeout it took 90% of a CPU (a re-check pass). It is not counted as held (it was:
/// tens of GB), and the pair is cut at the timeout.
fn a_partner_sending_on_toward_a_reset_client_costs_little_and_is_cut_at_the_idle_timeout(dp: &str) {
    let _netns = enter_netns();
    let args = relay_args(dp, "3");
    let relay = Skrelay::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (b, reset_at) = pair_whose_first_client_sent_2_mib_and_reset(dp);
    b.set_nonblocking(true).unwrap();
    let mut w = b.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let chunk = vec![6u8; 1 << 16];
        let started = Instant::now();
        loop {
            match w.write(&chunk) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(1)),
                Err(e) => return Ok(e),
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err("never cut");
            }
        }
    });
    thread::sleep(Duration::from_millis(500));
    let (ticks, from) = (cpu_ticks(relay.pid()), Instant::now());
    thread::sleep(Duration::from_millis(1500));
    let used = (cpu_ticks(relay.pid()) - ticks) as f64 / 100.0 / from.elapsed().as_secs_f64();
    let held = relay.metrics().get("skrelay_held_bytes");
    let end = sender.join().unwrap();
    let cut_after = reset_at.elapsed();
    assert!(
        used < 0.25,
        "{dp}: skrelay used {:.0}% of a CPU for a partner sending toward a reset client",
        used * 100.0
    );
    assert!(held < 64 << 20, "{dp}: {held} bytes counted as held");
    assert!(
        matches!(&end, Ok(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe)),
        "{dp}: the partner should be cut, got {end:?}\n{}",
        relay.log()
    );
    assert!(
        cut_after > Duration::from_millis(2900) && cut_after < Duration::from_secs(5),
        "{dp}: cut after {cut_after:?}"
    );
    // The kernel datapath's stop line tells those bytes from the ones redirected to a reader.
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    if dp == "kernel" {
        let said = " of the bytes toward clients that had reset, where the kernel dropped them";
        let line = log.lines().find(|l| l.contains(said)).unwrap_or_else(|| panic!("no stop line:\n{log}"));
        let before = &line[..line.find(said).unwrap()];
        let toward: u64 = before.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(toward > 1 << 20, "{toward} bytes toward the reset client:\n{line}");
    }
}
per_datapath!(a_partner_sending_on_toward_a_reset_client_costs_little_and_is_cut_at_the_idle_timeout);

/// `--takeover` carries a resetting pair's idle clock on too: the new process compared the
/// partner's acknowledgements with all four counters at its first look and started a new
/// timeout (a re-check pass: cut 3 s after the takeover instead of 3 s after the reset).
fn a_takeover_keeps_a_resetting_pairs_idle_clock_running(dp: &str) {
    let _netns = enter_netns();
    let args = relay_args(dp, "3");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let old = Skrelay::start(&args);
    let (b, reset_at) = pair_whose_first_client_sent_2_mib_and_reset(dp);
    thread::sleep(Duration::from_millis(1500));
    let pid = old.pid().to_string();
    let new = Skrelay::start(&[&args[..], &["--takeover", &pid]].concat());
    let mut old = old;
    assert!(old.wait(Duration::from_secs(10)).success(), "{}", old.log());
    assert!(old.log().contains("handed over 1 live pair(s)"), "{dp}:\n{}", old.log());
    new.wait_log("then took nothing", 1, Duration::from_secs(10));
    let cut_after = reset_at.elapsed();
    assert!(
        cut_after > Duration::from_millis(2900) && cut_after < Duration::from_millis(4000),
        "{dp}: cut {cut_after:?} after the reset (a new clock would say 4.5 s or more)\n{}",
        new.log()
    );
    drop(b);
}
per_datapath!(a_takeover_keeps_a_resetting_pairs_idle_clock_running);
