//! Relay semantics 3 and 4: half-close keeps the other direction open and delivers every byte
//! before EOF; a reset on one side resets the other; a pending client that leaves is forgotten.
#[macro_use]
mod common;
use common::*;
use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

fn addr() -> SocketAddr {
    "127.0.0.1:7777".parse().unwrap()
}

fn half_close_delivers_every_byte_then_eof_and_the_other_way_stays_open(dp: &str) {
    let _netns = enter_netns();
    const LEN: u64 = 8 << 20;
    let relay = Skrelay::start(&["relay", "--datapath", dp, "--metrics", "127.0.0.1:0"]);
    let mut a = connect(addr());
    let mut b = connect(addr());
    // A sends 8 MiB and shuts down its write side at once: the FIN must not overtake data.
    // B reads meanwhile: 8 MiB need not fit in the sockets' buffers along the way (on the
    // userspace datapath they sometimes do not, and A's write would wait for its timeout).
    let mut reader = b.try_clone().unwrap();
    let receiving = thread::spawn(move || recv_all(&mut reader).unwrap());
    let sent = send_pattern(&mut a, 3, LEN).unwrap();
    a.shutdown(Shutdown::Write).unwrap();
    let t = Instant::now();
    let (n, got) = receiving.join().unwrap();
    assert_eq!((n, &got), (LEN, &sent), "{dp}: B reads all of A, then EOF");
    eprintln!("{dp}: EOF {:?} after A's last byte was written", t.elapsed());
    // B can still talk to A, for as long as it likes, until B closes.
    let mut replies = 0;
    for round in 0..3u64 {
        let msg = format!("reply {round} from B\n");
        replies += msg.len() as u64;
        b.write_all(msg.as_bytes()).unwrap();
        assert_eq!(read_n(&mut a, msg.len()), msg.as_bytes(), "{dp}");
        thread::sleep(Duration::from_millis(50));
    }
    let sent_b = send_pattern(&mut b, 4, 1 << 20).unwrap();
    b.shutdown(Shutdown::Write).unwrap();
    let (n, got) = recv_all(&mut a).unwrap();
    assert_eq!((n, got), (1 << 20, sent_b), "{dp}: A reads B's bytes then EOF");
    let m = relay.wait_pairs_ended(1, Duration::from_secs(5));
    assert_eq!(m.pairs(dp, "eof"), 1, "{dp}: a pair that ended with EOF both ways:\n{}", m.text);
    assert_eq!(m.bytes(dp), LEN + replies + (1 << 20), "{dp}: every byte counted once:\n{}", m.text);
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

per_datapath!(half_close_delivers_every_byte_then_eof_and_the_other_way_stays_open);

fn a_reset_on_one_side_resets_the_other(dp: &str) {
    let _netns = enter_netns();
    let relay = Skrelay::start(&["relay", "--datapath", dp, "--metrics", "127.0.0.1:0"]);
    let mut a = connect(addr());
    let mut b = connect(addr());
    a.write_all(b"hello").unwrap();
    assert_eq!(read_n(&mut b, 5), b"hello");
    // SO_LINGER 0: close sends RST.
    socket2::SockRef::from(&a).set_linger(Some(Duration::ZERO)).unwrap();
    drop(a);
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    let r = b.read(&mut buf);
    assert!(matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset), "{dp}: B should see a reset, got {r:?}");
    let m = relay.wait_pairs_ended(1, Duration::from_secs(5));
    assert_eq!((m.pairs(dp, "reset"), m.pairs(dp, "eof")), (1, 0), "{dp}: the pair ended in a reset:\n{}", m.text);
    // The relay keeps serving.
    let mut c = connect(addr());
    let mut d = connect(addr());
    c.write_all(b"still here").unwrap();
    assert_eq!(read_n(&mut d, 10), b"still here", "{dp}");
    drop((c, d));
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

per_datapath!(a_reset_on_one_side_resets_the_other);

fn a_client_that_resets_mid_stream_resets_its_partner_only(dp: &str) {
    let _netns = enter_netns();
    let relay = Skrelay::start(&["relay", "--datapath", dp, "--metrics", "127.0.0.1:0"]);
    let a = connect(addr());
    let mut b = connect(addr());
    // A streams until told to stop; its bytes are in flight through the relay when it resets.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut w = a.try_clone().unwrap();
    let flag = stop.clone();
    let writer = thread::spawn(move || {
        let mut p = Pattern::new(9);
        let mut buf = vec![0u8; 64 * 1024];
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            p.fill(&mut buf);
            w.write_all(&buf).unwrap();
        }
        w
    });
    let _ = read_n(&mut b, 1 << 20);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // Keep reading so the writer is never stuck on a full window, until it has stopped.
    let mut sink = vec![0u8; 256 * 1024];
    b.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    while !writer.is_finished() {
        let _ = b.read(&mut sink);
    }
    drop(writer.join().unwrap());
    socket2::SockRef::from(&a).set_linger(Some(Duration::ZERO)).unwrap();
    drop(a); // the last descriptor: close sends the RST
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let end = loop {
        match b.read(&mut sink) {
            Ok(0) => break Ok(0),
            Ok(_) => continue,
            Err(e) => break Err(e),
        }
    };
    assert!(
        matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{dp}: B must see the reset, got {end:?}"
    );
    let m = relay.wait_pairs_ended(1, Duration::from_secs(5));
    assert_eq!((m.pairs(dp, "reset"), m.pairs(dp, "eof")), (1, 0), "{dp}: the pair ended in a reset:\n{}", m.text);
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

per_datapath!(a_client_that_resets_mid_stream_resets_its_partner_only);

fn a_pending_client_that_leaves_does_not_take_a_partner(dp: &str) {
    let _netns = enter_netns();
    let relay = Skrelay::start(&["relay", "--datapath", dp]);
    // One leaves quietly (FIN, nothing sent), one leaves with a reset.
    drop(connect(addr()));
    relay.wait_log("left before a partner came", 1, Duration::from_secs(5));
    let r = connect(addr());
    socket2::SockRef::from(&r).set_linger(Some(Duration::ZERO)).unwrap();
    drop(r);
    relay.wait_log("reset: Connection reset by peer", 1, Duration::from_secs(5));
    let mut b = connect(addr());
    let mut c = connect(addr());
    b.write_all(b"b to c").unwrap();
    assert_eq!(read_n(&mut c, 6), b"b to c", "{dp}");
    c.write_all(b"c to b").unwrap();
    assert_eq!(read_n(&mut b, 6), b"c to b", "{dp}");
    drop((b, c));
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

per_datapath!(a_pending_client_that_leaves_does_not_take_a_partner);

fn a_relay_killed_mid_transfer_leaves_its_readers_a_reset_not_an_eof(dp: &str) {
    // SIGKILL mid-transfer used to look like a complete stream to the reader (a clean EOF). Both
    // relay and proxy, both datapaths, and a pair whose other direction had already ended with
    // an EOF (a half-closed socket must still reset for the direction still running).
    let _netns = enter_netns();
    let upstream = std::net::TcpListener::bind("127.0.0.1:9000").unwrap();
    for command in ["relay", "proxy"] {
        for kernel_after in ["0", "65536"] {
            if dp == "userspace" && kernel_after != "0" {
                continue;
            }
            let what = format!("{dp} {command} --kernel-after {kernel_after}");
            let args = match command {
                "relay" => vec!["relay", "--datapath", dp, "--kernel-after", kernel_after],
                _ => {
                    vec!["proxy", "--datapath", dp, "--kernel-after", kernel_after, "--upstream", "127.0.0.1:9000"]
                }
            };
            let mut relay = Skrelay::start(&args);
            let (mut a, mut b) = match command {
                "relay" => (connect(addr()), connect(addr())),
                _ => {
                    let a = connect(addr());
                    let (b, _) = upstream.accept().unwrap();
                    b.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                    (a, b)
                }
            };
            // B -> A ends first and A reads its EOF: that direction was whole.
            b.write_all(b"all of it").unwrap();
            b.shutdown(Shutdown::Write).unwrap();
            let (got, end) = read_until_end(&mut a);
            assert_eq!((got.len(), end.is_ok()), (9, true), "{what}: {end:?}");
            // A -> B is cut: A writes without end, B reads 4 MiB, then the relay dies.
            let mut writer = a.try_clone().unwrap();
            let writing = thread::spawn(move || send_pattern(&mut writer, 5, 1 << 40).is_err());
            let mut seen = 0;
            let mut buf = vec![0u8; 64 * 1024];
            while seen < 4 << 20 {
                seen += b.read(&mut buf).unwrap();
            }
            relay.child.kill().unwrap();
            relay.wait(Duration::from_secs(5));
            let (_, r) = read_until_end(&mut b);
            assert!(
                matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
                "{what}: the reader of a cut stream got {r:?} instead of a reset"
            );
            assert!(writing.join().unwrap(), "{what}: the writer's sends must fail too");
        }
    }
}

per_datapath!(a_relay_killed_mid_transfer_leaves_its_readers_a_reset_not_an_eof);

/// The end-of-pair line counts what each receiver got, on every ending: a FIN is not a byte, a
/// reset is not a FIN, and bytes still queued inside the host are not delivered.
fn the_end_of_pair_line_counts_exactly_what_each_receiver_got(dp: &str) {
    let _netns = enter_netns();
    for reset in [false, true] {
        let relay = Skrelay::start(&["relay", "--datapath", dp, "--metrics", "127.0.0.1:0"]);
        let mut a = connect(addr());
        let mut b = connect(addr());
        send_pattern(&mut a, 9, 100_000).unwrap();
        assert_eq!(read_n(&mut b, 100_000).len(), 100_000);
        b.write_all(b"0123456789").unwrap();
        assert_eq!(read_n(&mut a, 10), b"0123456789");
        if reset {
            socket2::SockRef::from(&a).set_linger(Some(Duration::ZERO)).unwrap();
            drop((a, b));
        } else {
            a.shutdown(Shutdown::Write).unwrap();
            b.shutdown(Shutdown::Write).unwrap();
            expect_eof(&mut a);
            expect_eof(&mut b);
        }
        let m = relay.wait_pairs_ended(1, Duration::from_secs(5));
        let ending = if reset { "reset" } else { "eof" };
        assert_eq!(m.pairs(dp, ending), 1, "{dp}: one pair, ended by {ending}:\n{}", m.text);
        assert_eq!(m.bytes(dp), 100_010, "{dp}, {ending}: exactly what the receivers got:\n{}", m.text);
        let (_, log) = relay.stop(Duration::from_secs(10));
        let line = log.lines().find(|l| l.contains("pair ") && l.contains(" bytes ")).expect("end-of-pair line");
        assert!(
            line.contains(": 100000 bytes ") && line.contains(", 10 bytes "),
            "{dp}, {}: exact counts expected (100000 and 10): {line}",
            if reset { "reset" } else { "FIN" }
        );
    }
}

per_datapath!(the_end_of_pair_line_counts_exactly_what_each_receiver_got);

/// A sends 1,000 bytes and closes; B, which received them and read none, closes right after,
/// which resets it (unread data), before it acknowledged the FIN the relay sent on. B got every
/// byte: the count must say 1,000 (the kernel datapath said 999, taking off a FIN that B never
/// acknowledged; a helper's new-user pass, 2026-12-05), with `--kernel-after 0` and after a
/// userspace start.
fn a_receiver_that_resets_instead_of_acknowledging_the_fin_is_counted_exactly(dp: &str) {
    let _netns = enter_netns();
    for (kernel_after, n) in [("0", 1_000u64), ("64K", 100_000)] {
        let relay =
            Skrelay::start(&["relay", "--datapath", dp, "--kernel-after", kernel_after, "--metrics", "127.0.0.1:0"]);
        let mut a = connect(addr());
        let b = connect(addr());
        // Paired (in the kernel maps with `--kernel-after 0`) before the first byte.
        thread::sleep(Duration::from_millis(200));
        send_pattern(&mut a, 3, n).unwrap();
        // Until b's TCP has it all (its client reads nothing).
        let deadline = Instant::now() + Duration::from_secs(5);
        while skrelay::sys::readable_len(&b).unwrap() < n {
            assert!(Instant::now() < deadline, "{dp}: b did not receive {n} bytes");
            thread::sleep(Duration::from_millis(5));
        }
        // b's TCP acknowledges what it got within its delayed-ACK timer (200 ms at most): bytes
        // it had not acknowledged when it reset are documented as not counted.
        thread::sleep(Duration::from_millis(300));
        drop(a);
        // The relay sends the FIN on; b closes before it acknowledges it.
        thread::sleep(Duration::from_millis(2));
        drop(b);
        let m = relay.wait_pairs_ended(1, Duration::from_secs(5));
        assert_eq!(m.bytes(dp), n, "{dp}, --kernel-after {kernel_after}: b received {n}:\n{}", m.text);
        let (_, log) = relay.stop(Duration::from_secs(10));
        let line = log.lines().find(|l| l.contains("pair ") && l.contains(" bytes ")).expect("end-of-pair line");
        assert!(line.contains(&format!(": {n} bytes ")), "{dp}, --kernel-after {kernel_after}: {n} expected: {line}");
    }
}

per_datapath!(a_receiver_that_resets_instead_of_acknowledging_the_fin_is_counted_exactly);

/// A kernel pair's direction that passed its budget leaves the socket map until its partner
/// reads. If its client half-closes meanwhile, the socket can never join again (a socket map
/// takes only ESTABLISHED sockets): what waits in its queue must still arrive, then the EOF, and
/// the end-of-pair line must count exactly what each side received.
fn a_sender_that_half_closes_while_held_back_is_relayed_intact_then_eof(dp: &str) {
    let _netns = enter_netns();
    // More than the destination's send queue (8 MiB SO_SNDBUF, 16 MiB with overhead) and B's receive
    // buffer hold, so the direction must park.
    const LEN: u64 = 48 << 20;
    let relay = Skrelay::start(&["relay", "--datapath", dp, "--kernel-buffer", "256K", "--metrics", "127.0.0.1:0"]);
    let mut a = connect(addr());
    let mut b = connect(addr());
    let mut w = a.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let sha = send_pattern(&mut w, 5, LEN).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
        sha
    });
    // B does not read while A is held back at its budget (and half-closes, once its last
    // bytes fit in the buffers).
    thread::sleep(Duration::from_secs(2));
    let (n, got) = recv_all(&mut b).unwrap();
    let sent = writer.join().unwrap();
    assert_eq!((n, &got), (LEN, &sent), "{dp}: B reads all of A, then EOF");
    // The other way still works, then closes.
    let back = send_pattern(&mut b, 6, 1 << 20).unwrap();
    b.shutdown(Shutdown::Write).unwrap();
    assert_eq!(recv_all(&mut a).unwrap(), (1 << 20, back), "{dp}: A reads B's bytes then EOF");
    let m = relay.wait_pairs_ended(1, Duration::from_secs(5));
    assert_eq!(m.pairs(dp, "eof"), 1, "{dp}: the pair ended with EOF both ways:\n{}", m.text);
    assert_eq!(m.bytes(dp), LEN + (1 << 20), "{dp}: exactly what the receivers got:\n{}", m.text);
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    let line = log.lines().find(|l| l.contains(" ended after ")).expect("end-of-pair line");
    assert!(line.contains(&format!(": {LEN} bytes ")), "{dp}: exact count A -> B: {line}");
    assert!(line.contains(&format!(", {} bytes ", 1 << 20)), "{dp}: exact count B -> A: {line}");
    if dp == "kernel" {
        assert!(log.contains(" parkings") && !log.contains(" in 0 parkings"), "{log}");
    }
}

per_datapath!(a_sender_that_half_closes_while_held_back_is_relayed_intact_then_eof);

/// What a client sent just before it reset its connection reaches its partner, then the reset,
/// as with TCP end to end: a server that writes its reply and resets (or closes with input
/// unread, which Linux turns into a reset) must not lose the reply. A's bytes are all
/// acknowledged by the relay before A resets (on the kernel datapath, and moved out of A's socket
/// there, where a reset loses parked bytes: KERNEL-NOTES item 12), and B reads only afterwards. Before, the pair reset
/// B at once: on the kernel datapath with `--kernel-after 0` B got 0 bytes in 4 of 6 tries, and
/// on splice(2) B lost them whenever the bytes and the reset were seen in one wake-up.
fn bytes_sent_just_before_a_reset_reach_the_partner_then_the_reset(dp: &str) {
    let _netns = enter_netns();
    let joins: &[&[&str]] = if dp == "kernel" { &[&[], &["--kernel-after", "0"]] } else { &[&[]] };
    for extra in joins {
        let relay = Skrelay::start(&[&["relay", "--datapath", dp, "--metrics", "127.0.0.1:0"], *extra].concat());
        for (i, len) in [16u64, 5_000, 100_000, 3_000_000].into_iter().enumerate() {
            let a = connect(addr());
            let mut b = connect(addr());
            // Paired first: a client that resets while it waits is paired with nobody.
            relay.wait_metrics("the pair formed", Duration::from_secs(5), |m| {
                m.sum("skrelay_pairs_active") == 1 && m.sum("skrelay_pairs_total") == i as u64
            });
            // B does not read yet: the relay holds what B's window does not take. On the kernel
            // datapath, A resets once those bytes have left its socket on the relay (a reset in
            // the milliseconds before loses them there: KERNEL-NOTES item 12).
            let mut a = a;
            let want = send_pattern(&mut a, 40 + i as u64, len).unwrap();
            wait_acked(&a, Duration::from_secs(5), &format!("all {len} bytes"));
            if dp == "kernel" {
                wait_out_of_the_senders_socket(&b, len, &format!("{dp} {extra:?}: A's {len} bytes"));
            }
            socket2::SockRef::from(&a).set_linger(Some(Duration::ZERO)).unwrap();
            drop(a);
            thread::sleep(Duration::from_millis(100));
            let (got, end) = read_until_end(&mut b);
            assert_eq!(
                (got.len() as u64, sha(&got)),
                (len, want),
                "{dp} {extra:?}: B must get all {len} bytes A sent before its reset\n{}",
                relay.log()
            );
            assert!(
                matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
                "{dp} {extra:?}: then the reset, got {end:?}"
            );
        }
        let m = relay.wait_pairs_ended(4, Duration::from_secs(5));
        assert_eq!(m.pairs(dp, "reset"), 4, "{dp} {extra:?}:\n{}", m.text);
        let (status, log) = relay.stop(Duration::from_secs(10));
        assert!(status.success(), "{log}");
    }
}

per_datapath!(bytes_sent_just_before_a_reset_reach_the_partner_then_the_reset);

/// The same for a partner that reads slowly: the pair waited 1 s in all for A's bytes to reach
/// B's client and then reset B, though B was reading all along (a helper's pass: a client reading
/// 5 MB/s lost ~20 MB of a 30 MB reply on the kernel datapath, up to 15.6 MB on splice(2)). The
/// wait now lasts while B's client takes bytes, and ends 1 s after it stops.
fn a_slow_reader_gets_everything_sent_before_a_reset(dp: &str) {
    let _netns = enter_netns();
    let relay = Skrelay::start(&["relay", "--datapath", dp, "--kernel-after", "0"]);
    const LEN: u64 = 24 << 20;
    let a = connect(addr());
    // A small receive buffer, so that what the relay holds, not B's socket, waits for B.
    let b = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    b.set_recv_buffer_size(64 << 10).unwrap();
    b.connect(&addr().into()).unwrap();
    let mut b: TcpStream = b.into();
    b.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    // B reads 8 MB/s: 3 s for all of it, well past the 1 s the relay used to give it.
    let reader = thread::spawn(move || {
        let (mut got, started, mut buf) = (Vec::new(), std::time::Instant::now(), vec![0u8; 64 << 10]);
        loop {
            match b.read(&mut buf) {
                Ok(0) => return (got, Ok(())),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, Err(e)),
            }
            let due = Duration::from_secs_f64(got.len() as f64 / 8e6);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                thread::sleep(wait);
            }
        }
    });
    let want = send_then_reset(a, 77, LEN);
    let (got, end) = reader.join().unwrap();
    assert_eq!((got.len() as u64, sha(&got)), (LEN, want), "{dp}: B must get all of A's bytes\n{}", relay.log());
    assert!(matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset), "{dp}: then the reset, got {end:?}");
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

per_datapath!(a_slow_reader_gets_everything_sent_before_a_reset);

/// A waiting client that sent bytes and then reset is gone once skrelay sees the reset: a client
/// that comes later is not paired with it. Before, the next arrival, even seconds later, was
/// paired with the dead socket, got its bytes and a reset at once: one misbehaving client knocked
/// out the next. (One that had connected before the reset still gets them: the test above.)
fn a_client_that_reset_while_waiting_is_not_paired_with_a_later_one(dp: &str) {
    let _netns = enter_netns();
    for pair in ["order", "token"] {
        let relay = Skrelay::start(&["relay", "--datapath", dp, "--pair", pair, "--metrics", "127.0.0.1:0"]);
        let token: &[u8] = if pair == "token" { b"t\n" } else { b"" };
        let mut a = connect(addr());
        a.write_all(token).unwrap();
        drop(send_then_reset(a, 9, 5_000));
        relay.wait_metrics("the reset client counted as left", Duration::from_secs(5), |m| {
            m.get("skrelay_unpaired_clients_total{reason=\"left\"}") == 1
        });
        let (mut b, mut c) = (connect(addr()), connect(addr()));
        b.write_all(token).unwrap();
        c.write_all(token).unwrap();
        b.write_all(b"hello").unwrap();
        assert_eq!(read_n(&mut c, 5), b"hello", "{dp} {pair}: C must get B's bytes, not A's\n{}", relay.log());
        c.write_all(b"back").unwrap();
        assert_eq!(read_n(&mut b, 4), b"back", "{dp} {pair}\n{}", relay.log());
        drop((b, c));
        let m = relay.wait_pairs_ended(1, Duration::from_secs(5));
        assert_eq!(m.pairs(dp, "eof"), 1, "{dp} {pair}: B and C were a whole pair\n{}", m.text);
        let (status, log) = relay.stop(Duration::from_secs(10));
        assert!(status.success() && log.contains("reset before it was paired"), "{log}");
    }
}

per_datapath!(a_client_that_reset_while_waiting_is_not_paired_with_a_later_one);

/// The same when the token line, the bytes and the reset come in a burst: the line was taken, the
/// client waited, and the reset was not seen, so the next client with that token was paired with
/// the dead one (1 client of 50 in 5 of 24 bursts in a helper's pass; 5 of 18 here before the
/// fix). Not deterministic: 100 such clients make one bad pairing likely without the fix.
fn a_client_whose_token_bytes_and_reset_came_at_once_is_not_paired(dp: &str) {
    let _netns = enter_netns();
    let relay = Skrelay::start(&["relay", "--datapath", dp, "--pair", "token", "--metrics", "127.0.0.1:0"]);
    const N: usize = 100;
    for i in 0..N {
        let mut a = connect(addr());
        a.write_all(format!("dead{i}\n").as_bytes()).unwrap();
        a.write_all(&[b'x'; 1000]).unwrap();
        socket2::SockRef::from(&a).set_linger(Some(Duration::ZERO)).unwrap();
    }
    relay.wait_metrics("every reset client counted as left", Duration::from_secs(5), |m| {
        m.get("skrelay_unpaired_clients_total{reason=\"left\"}") == N as u64
    });
    let partners: Vec<_> = (0..N)
        .map(|i| {
            let mut b = connect(addr());
            b.write_all(format!("dead{i}\n").as_bytes()).unwrap();
            b
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for (i, mut b) in partners.into_iter().enumerate() {
        b.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 1];
        match b.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("{dp}: partner {i} was paired with a dead client: {other:?}\n{}", relay.log()),
        }
    }
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

per_datapath!(a_client_whose_token_bytes_and_reset_came_at_once_is_not_paired);

/// A client that sends, half-closes and resets once all is acknowledged: its partner gets every
/// byte, then its end (the EOF or the reset), at once. On the kernel datapath the FIN counted in what the relay had
/// received (and parked bytes a reset throws away would too), so the pair waited for one byte
/// that never comes, until --idle-timeout: 600 s (a re-check pass).
fn a_half_close_then_a_reset_reaches_the_partner_at_once(dp: &str) {
    let _netns = enter_netns();
    let joins: &[&[&str]] = if dp == "kernel" { &[&[], &["--kernel-after", "0"]] } else { &[&[]] };
    for extra in joins {
        let relay = Skrelay::start(&[&["relay", "--datapath", dp], *extra].concat());
        let mut a = connect(addr());
        let mut b = connect(addr());
        b.write_all(b"x").unwrap();
        assert_eq!(read_n(&mut a, 1), b"x");
        let want = send_pattern(&mut b, 9, 3_000_000).unwrap();
        b.shutdown(std::net::Shutdown::Write).unwrap();
        wait_acked(&b, Duration::from_secs(10), &format!("b's bytes ({dp} {extra:?})"));
        socket2::SockRef::from(&b).set_linger(Some(Duration::ZERO)).unwrap();
        drop(b);
        let t0 = Instant::now();
        let (got, end) = read_until_end(&mut a);
        assert_eq!((got.len(), sha(&got)), (3_000_000, want), "{dp} {extra:?}: a must get all of b's bytes");
        // Then its end of file (b's stream was whole: userspace passes the FIN on first) or the
        // reset, within read_until_end's 5 s.
        assert!(
            end.is_ok() || matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "{dp} {extra:?}: then an end of file or the reset, got {end:?} after {:?}\n{}",
            t0.elapsed(),
            relay.log()
        );
        let (status, log) = relay.stop(Duration::from_secs(10));
        assert!(status.success(), "{log}");
    }
}

per_datapath!(a_half_close_then_a_reset_reaches_the_partner_at_once);

/// A client that sent bytes and reset, and at once connected again with its token: the relay took
/// clients that connected before it saw the reset first, to pair them with the dead client, and
/// took the reconnection too, which read back its own old bytes while its real partner waited out
/// --pair-timeout (19 of 40 in a helper's token pass). A reset client is now paired with nobody.
fn a_client_that_reconnects_right_after_its_reset_is_not_paired_with_its_dead_self(dp: &str) {
    let _netns = enter_netns();
    for pairing in ["token", "order"] {
        let relay = Skrelay::start(&["relay", "--datapath", dp, "--pair", pairing]);
        for i in 0..40 {
            let line = if pairing == "token" { format!("again{i}\n") } else { String::new() };
            let mut a = connect(addr());
            a.write_all(format!("{line}old").as_bytes()).unwrap();
            thread::sleep(Duration::from_millis(20));
            let port = a.local_addr().unwrap().port();
            socket2::SockRef::from(&a).set_linger(Some(Duration::ZERO)).unwrap();
            drop(a);
            // The reconnection comes after the reset reached the relay's socket (which leaves
            // the table at once), whenever the relay's loop looks at it.
            let relay_end = format!("0100007F:{:04X} 0100007F:{port:04X}", addr().port());
            let deadline = Instant::now() + Duration::from_secs(2);
            while std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap().contains(&relay_end) {
                assert!(Instant::now() < deadline, "{dp}: the reset never reached the relay's socket");
                thread::sleep(Duration::from_millis(1));
            }
            let mut again = connect(addr());
            again.write_all(format!("{line}new").as_bytes()).unwrap();
            thread::sleep(Duration::from_millis(30));
            let mut b = connect(addr());
            b.write_all(format!("{line}from-b").as_bytes()).unwrap();
            assert_eq!(read_n(&mut again, 6), b"from-b", "{dp}, {pairing}, round {i}\n{}", relay.log());
            assert_eq!(read_n(&mut b, 3), b"new", "{dp}, {pairing}, round {i}");
        }
        let (status, log) = relay.stop(Duration::from_secs(10));
        assert!(status.success(), "{log}");
    }
}

per_datapath!(a_client_that_reconnects_right_after_its_reset_is_not_paired_with_its_dead_self);

/// A token client that sends its line and closes in one segment (corked here, so the line and
/// the FIN travel together) is let go at once as having left, like one that closes later. Its
/// line was taken, and no later event came for the close: it held a pending slot until
/// --pair-timeout, counted as a timeout (1 client in 4-12 in a helper's pass).
#[test]
fn a_token_client_whose_line_and_close_came_at_once_is_let_go_at_once() {
    let _netns = enter_netns();
    let relay = Skrelay::start(&["relay", "--pair", "token", "--pair-timeout", "10", "--metrics", "127.0.0.1:0"]);
    const N: u64 = 10;
    for i in 0..N {
        let mut a = connect(addr());
        socket2::SockRef::from(&a).set_cork(true).unwrap();
        a.write_all(format!("alone{i}\n").as_bytes()).unwrap();
        a.shutdown(Shutdown::Write).unwrap();
        a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t = Instant::now();
        let r = a.read(&mut [0u8; 16]);
        assert!(
            matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset) && t.elapsed() < Duration::from_secs(2),
            "client {i}: {r:?} after {:?}\n{}",
            t.elapsed(),
            relay.log()
        );
    }
    let m = relay.metrics();
    assert_eq!(m.get("skrelay_unpaired_clients_total{reason=\"left\"}"), N, "{}", m.text);
    assert_eq!(m.get("skrelay_pending_clients"), 0, "{}", m.text);
}

/// A client that half-closed and then reset while its partner was still sending: the end-of-pair
/// line names the reset, not the EPIPE the relay's next write to it met (it said "Broken pipe").
fn a_reset_after_a_half_close_is_logged_as_the_clients_reset(dp: &str) {
    let _netns = enter_netns();
    let relay = Skrelay::start(&["relay", "--datapath", dp]);
    let (mut a, mut b) = (connect(addr()), connect(addr()));
    // Paired (and on the kernel datapath in the maps) before A half-closes.
    a.write_all(b"x").unwrap();
    assert_eq!(read_n(&mut b, 1), b"x");
    a.write_all(&[1u8; 100_000]).unwrap();
    a.shutdown(Shutdown::Write).unwrap();
    let (got, end) = read_until_end(&mut b);
    assert!(got.len() == 100_000 && end.is_ok(), "{dp}: B gets A's bytes, then EOF");
    let a_addr = a.local_addr().unwrap();
    let writer = thread::spawn(move || {
        let chunk = vec![2u8; 64 << 10];
        while b.write_all(&chunk).is_ok() {}
    });
    thread::sleep(Duration::from_millis(200));
    socket2::SockRef::from(&a).set_linger(Some(Duration::ZERO)).unwrap();
    drop(a);
    writer.join().unwrap();
    relay.wait_log(" <-> ", 1, Duration::from_secs(10));
    let log = relay.log();
    let line = log.lines().find(|l| l.contains(" <-> ")).unwrap();
    eprintln!("{dp}: {line}");
    assert!(line.contains(&format!("reset ({a_addr}: Connection reset by peer")), "{dp}: {line}");
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

per_datapath!(a_reset_after_a_half_close_is_logged_as_the_clients_reset);

fn pairs_cut_at_the_drain_timeout_log_what_their_clients_received(dp: &str) {
    // The kernel datapath logged one 32 KiB write less than the client had read for about half
    // the directions cut at the drain timeout: it counted before taking the pair out of the maps,
    // and the psock's backlog sent one more skb before the reset.
    let _netns = enter_netns();
    let mut relay = Skrelay::start(&["relay", "--datapath", dp, "--drain-timeout", "0.7"]);
    let mut readers = Vec::new();
    for _ in 0..3 {
        let (a, b) = (connect(addr()), connect(addr()));
        for (from, to) in [(&a, &b), (&b, &a)] {
            let mut w = from.try_clone().unwrap();
            thread::spawn(move || {
                let chunk = vec![7u8; 32 << 10];
                while w.write_all(&chunk).is_ok() {
                    thread::sleep(Duration::from_millis(10));
                }
            });
            let mut r = to.try_clone().unwrap();
            let key = format!("{} -> {}", from.local_addr().unwrap(), to.local_addr().unwrap());
            readers.push(thread::spawn(move || {
                r.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let (mut n, mut buf) = (0u64, vec![0u8; 1 << 20]);
                let end = loop {
                    match r.read(&mut buf) {
                        // After a reset only one call on the socket returns ECONNRESET, and this
                        // client's writer thread may take it (EPIPE's sock_error); the reader
                        // then sees end of file. The state tells a reset (CLOSE) from the FIN of
                        // a stream that ended (CLOSE_WAIT).
                        Ok(0) if skrelay::sys::tcp_counters(&r).is_ok_and(|c| c.closed()) => {
                            break "reset (its error taken by the writer thread)".to_string()
                        }
                        Ok(0) => break "EOF".to_string(),
                        Ok(k) => n += k as u64,
                        Err(e) => break e.kind().to_string(),
                    }
                };
                (key, n, end)
            }));
        }
    }
    thread::sleep(Duration::from_secs(1));
    relay.signal(libc::SIGTERM);
    assert!(relay.wait(Duration::from_secs(10)).success(), "{}", relay.log());
    relay.wait_log("stopped", 1, Duration::from_secs(5));
    let log = relay.log();
    for reader in readers {
        let (key, got, end) = reader.join().unwrap();
        assert_ne!(end, "EOF", "{dp}: {key}: a cut stream must end in a reset:\n{log}");
        let logged = format!("{got} bytes {key}");
        assert!(log.contains(&logged), "{dp}: the client read {got} bytes of {key}, the log says otherwise:\n{log}");
    }
}

per_datapath!(pairs_cut_at_the_drain_timeout_log_what_their_clients_received);

/// A pair cut while its client reads (an observability pass): the count was taken before the
/// reset, and the send queue went on draining into the reading client until the reset (up to
/// 5 ms of settling per direction, then the log line), so the line said up to 333 KB less than
/// the client had read, for a SIGQUIT, a second stop signal or the drain timeout. Now both
/// clients are reset first and counted after. A reader at full speed and one at about 80 MB/s
/// (its window keeps opening, and the relay keeps sending into it, through the cut); the kernel
/// datapath from the first byte and after its userspace start (the default --kernel-after).
fn a_pair_cut_while_its_client_reads_logs_what_it_read(dp: &str) {
    let _netns = enter_netns();
    for (round, (after, paced)) in
        [("0", true), ("0", false), ("65536", true), ("65536", false)].into_iter().enumerate()
    {
        let mut args = vec!["relay", "--datapath", dp];
        if dp == "kernel" {
            args.extend(["--kernel-after", after]);
        }
        let mut relay = Skrelay::start(&args);
        let (mut a, mut b) = (connect(addr()), connect(addr()));
        let key = format!("bytes {} -> {}", a.local_addr().unwrap(), b.local_addr().unwrap());
        a.write_all(b"x").unwrap();
        assert_eq!(read_n(&mut b, 1), b"x");
        let writer = thread::spawn(move || {
            let chunk = vec![3u8; 1 << 20];
            while a.write_all(&chunk).is_ok() {}
            a
        });
        // B does not read while a backlog builds, then reads through the cut.
        thread::sleep(Duration::from_millis(200));
        let reader = thread::spawn(move || {
            b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let (mut n, mut buf) = (1u64, vec![0u8; if paced { 16 << 10 } else { 1 << 20 }]);
            let end = loop {
                match b.read(&mut buf) {
                    Ok(0) => break "EOF".to_string(),
                    Ok(k) => n += k as u64,
                    Err(e) => break e.kind().to_string(),
                }
                if paced {
                    thread::sleep(Duration::from_micros(200));
                }
            };
            (n, end)
        });
        thread::sleep(Duration::from_millis(30));
        relay.signal(libc::SIGQUIT);
        assert!(relay.wait(Duration::from_secs(10)).success(), "{}", relay.log());
        let (got, end) = reader.join().unwrap();
        drop(writer.join().unwrap());
        relay.wait_log("stopped", 1, Duration::from_secs(5));
        let log = relay.log();
        let what = format!("{dp}, round {round} (--kernel-after {after}, paced reader: {paced})");
        assert_ne!(end, "EOF", "{what}: a cut stream must end in a reset:\n{log}");
        assert!(got > 1 << 20, "{what}: the cut came only {got} bytes into the stream");
        let logged = format!("{got} {key}");
        assert!(log.contains(&logged), "{what}: the client read {got} {key}, the log says:\n{log}");
    }
}

per_datapath!(a_pair_cut_while_its_client_reads_logs_what_it_read);

/// A cut reaches a client whose relay socket is in LAST-ACK (the client half-closed, the other
/// way finished too, and what it has not read still waits in our send queue): the kernel's abort
/// sends no reset in that state, and such a client stayed in FIN-WAIT-2 after the relay had
/// exited, learning of the cut only if it read (a re-check pass). It is reset at once.
fn a_cut_resets_a_client_whose_relay_socket_is_in_last_ack(dp: &str) {
    let _netns = enter_netns();
    let mut relay = Skrelay::start(&["relay", "--datapath", dp]);
    let (mut a, mut b) = (connect(addr()), connect(addr()));
    a.write_all(b"x").unwrap();
    assert_eq!(read_n(&mut b, 1), b"x");
    // B sends more than A takes, then half-closes; A sends some, then half-closes; neither reads.
    b.set_nonblocking(true).unwrap();
    let chunk = vec![4u8; 64 << 10];
    let mut sent = 0;
    let t0 = Instant::now();
    while sent < 5_500_000 && t0.elapsed() < Duration::from_secs(5) {
        match b.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("{dp}: {e}"),
        }
    }
    b.shutdown(Shutdown::Write).unwrap();
    thread::sleep(Duration::from_millis(300));
    a.write_all(&vec![5u8; 300_000]).unwrap();
    a.shutdown(Shutdown::Write).unwrap();
    thread::sleep(Duration::from_millis(700));
    relay.signal(libc::SIGQUIT);
    assert!(relay.wait(Duration::from_secs(10)).success(), "{}", relay.log());
    // B has read nothing since: its socket learns of the cut by the reset alone.
    let deadline = Instant::now() + Duration::from_secs(3);
    let state = loop {
        let c = skrelay::sys::tcp_counters(&b).unwrap();
        if c.closed() || Instant::now() > deadline {
            break c;
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert!(state.closed(), "{dp}: B was not reset: {state:?}\n{}", relay.log());
}

per_datapath!(a_cut_resets_a_client_whose_relay_socket_is_in_last_ack);

/// A client that resets while its partner does not read: the pair's line counts what reached the
/// partner's client, not what was written into a send queue the reset then threw away (the
/// userspace datapath counted 4 MB for 128 KB received; a proxy helper found it).
fn a_reset_pair_logs_only_what_reached_the_other_client(dp: &str) {
    let _netns = enter_netns();
    let relay = Skrelay::start(&["relay", "--datapath", dp]);
    // A pair whose first byte went through, then b stops reading and a sends until it is held
    // back; returns both clients, the log's key for a -> b, and what a sent.
    let held_back_pair = || {
        let mut a = connect(addr());
        let mut b = connect(addr());
        let key = format!("bytes {} -> {}", a.local_addr().unwrap(), b.local_addr().unwrap());
        a.write_all(b"x").unwrap();
        assert_eq!(read_n(&mut b, 1), b"x");
        a.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
        let chunk = vec![5u8; 64 << 10];
        let mut sent = 1u64;
        while let Ok(n) = a.write(&chunk) {
            sent += n as u64;
        }
        (a, b, key, sent)
    };
    let reset = |s: TcpStream| {
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        drop(s);
    };
    // The count the end-of-pair line gives for `key`, and the log.
    let read_log = |key: &str| {
        relay.wait_log(key, 1, Duration::from_secs(10));
        let log = relay.log();
        let line = log.lines().find(|l| l.contains(key)).unwrap();
        let logged: u64 = line.split(&format!(" {key}")).next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
        (logged, log)
    };

    let (a, mut b, key, sent) = held_back_pair();
    reset(a);
    // The pair waits for b to read what it holds for b (as long as a live pair would), then
    // resets b.
    thread::sleep(Duration::from_millis(1500));
    b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The first byte ("x") was read above.
    let (mut got, mut buf) = (1u64, vec![0u8; 1 << 20]);
    let end = loop {
        match b.read(&mut buf) {
            Ok(0) => break "EOF".to_string(),
            Ok(k) => got += k as u64,
            Err(e) => break e.kind().to_string(),
        }
    };
    assert_ne!(end, "EOF", "{dp}: a reset must reach b as a reset");
    let (logged, log) = read_log(&key);
    assert!(got < sent, "{dp}: the test needs bytes lost to the reset (sent {sent}, got {got})");
    assert_eq!(logged, got, "{dp}: the log counts {logged} bytes, b received {got} (a sent {sent}):\n{log}");

    // The other way round: the receiving client resets with bytes unread, while the sender is
    // held back. Its TCP acknowledged what it holds; what the relay still queued for it is lost.
    let (_a, b, key, _) = held_back_pair();
    let unread = skrelay::sys::readable_len(&b).unwrap();
    reset(b);
    let (logged, log) = read_log(&key);
    assert_eq!(logged, 1 + unread, "{dp}: the log counts {logged} bytes, b held {} when it reset:\n{log}", 1 + unread);
}

per_datapath!(a_reset_pair_logs_only_what_reached_the_other_client);

/// B sends 40 MiB while A uploads and does not read for 3 s, and resets once all of B's bytes
/// are acknowledged: A gets all 40 MiB, then the reset (A's pause once cost it what the pair
/// held when A had acknowledged nothing for 1 s). On the kernel datapath the part that
/// parked in B's relay socket went with its psock at the reset (KERNEL-NOTES item 12): A got
/// 33.3 MB, every run. Now a parked direction whose partner does not read moves its parked
/// bytes to the partner's send queue and closes its source's window meanwhile (`shelter`).
fn a_reset_clients_acknowledged_bytes_reach_a_partner_that_reads_later(dp: &str) {
    let _netns = enter_netns();
    const FROM_B: u64 = 40 << 20;
    let relay = Skrelay::start(&["relay", "--datapath", dp]);
    let mut a = connect(addr());
    let b = connect(addr());
    let mut upload = a.try_clone().unwrap();
    let uploading = thread::spawn(move || send_pattern_mib(&mut upload, 1, 60));
    let sending = thread::spawn(move || {
        let mut b = b;
        send_pattern_mib(&mut b, 2, FROM_B >> 20).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while unacked(&b) > 0 {
            assert!(Instant::now() < deadline, "the relay never took B's bytes");
            thread::sleep(Duration::from_millis(5));
        }
        socket2::SockRef::from(&b).set_linger(Some(Duration::ZERO)).unwrap();
    });
    thread::sleep(Duration::from_secs(3));
    let (got, end) = read_until_end(&mut a);
    sending.join().unwrap();
    let upload = uploading.join().unwrap();
    let reset = |r: &std::io::Result<()>| matches!(r, Err(e) if e.kind() == ErrorKind::ConnectionReset);
    assert!(reset(&end) || (end.is_ok() && reset(&upload)), "{dp}: {end:?} (upload: {upload:?})\n{}", relay.log());
    let mut want = vec![0u8; FROM_B as usize];
    Pattern::new(2).fill(&mut want);
    assert!(got[..] == want[..got.len()], "{dp}: A's bytes are not B's, in order");
    assert_eq!(got.len() as u64, FROM_B, "{dp}: A got {} of B's {FROM_B} bytes\n{}", got.len(), relay.log());
}

per_datapath!(a_reset_clients_acknowledged_bytes_reach_a_partner_that_reads_later);

/// A client that half-closes while its pair joins the kernel maps (a soak: 1 pair in 2,000-9,000
/// ended short, then with an EOF). The first socket enters `socks` with its verdict, the second
/// no longer can (CLOSE_WAIT), and the pair goes back to splice(2): what the first socket's
/// verdict redirected meanwhile into the second's psock was dropped with it, or at least left
/// uncounted. The race is widened with the test-only pause between the two inserts
/// (`SKRELAY_TEST_JOIN_PAUSE_MS`): B half-closes and A writes while it lasts. B must read every
/// byte of A, then EOF, and the pair's count must hold them all.
#[test]
fn a_client_that_half_closes_while_the_pair_joins_loses_nothing() {
    let _netns = enter_netns();
    if !require_bpf("a_client_that_half_closes_while_the_pair_joins_loses_nothing") {
        return;
    }
    for after in ["0", "64K"] {
        let mut cmd = std::process::Command::new(SKRELAY);
        cmd.args(["relay", "--datapath", "kernel", "--kernel-after", after, "--metrics", "127.0.0.1:0"])
            .env("SKRELAY_TEST_JOIN_PAUSE_MS", "300")
            .env("RUST_LOG", "debug");
        let relay = Skrelay::spawn(cmd, "listening on");
        let mut a = connect(addr());
        let mut b = connect(addr());
        let mut head = 0u64;
        if after != "0" {
            // Past --kernel-after, and a stream (256 KiB one way): the pair joins once the last
            // of it is spliced.
            let sent = send_pattern(&mut b, 5, 256 << 10).unwrap();
            assert_eq!(sha(&read_n(&mut a, 256 << 10)), sent, "--kernel-after {after}");
            head = 256 << 10;
        }
        // Inside the pause: B half-closes, then A writes (its verdict, if it joined, takes it).
        thread::sleep(Duration::from_millis(100));
        b.shutdown(Shutdown::Write).unwrap();
        thread::sleep(Duration::from_millis(20));
        const LEN: u64 = 1 << 20;
        let sent = send_pattern(&mut a, 6, LEN).unwrap();
        a.shutdown(Shutdown::Write).unwrap();
        let (n, got) = recv_all(&mut b).unwrap();
        assert_eq!((n, &got), (LEN, &sent), "--kernel-after {after}: B reads all of A, then EOF");
        expect_eof(&mut a);
        let m = relay.wait_pairs_ended(1, Duration::from_secs(5));
        assert_eq!(m.pairs("kernel", "eof"), 1, "--kernel-after {after}:\n{}", m.text);
        assert_eq!(m.bytes("kernel"), head + LEN, "--kernel-after {after}: every byte counted:\n{}", m.text);
        let (status, log) = relay.stop(Duration::from_secs(10));
        assert!(status.success(), "{log}");
        // The case met: the first socket's verdict took A's bytes before the join failed.
        assert!(log.contains("half-closed while its pair joined; "), "--kernel-after {after}: not met:\n{log}");
    }
}

/// The other end of the race above: while the join waits between its inserts, the first socket's
/// verdict has more of A's bytes than B (not reading) has room for, so it parks some in A's own
/// psock, and then B half-closes. Parked bytes cannot be handed back to splice(2) in order, so the
/// pair must end in resets, never in a clean EOF after a short stream; what B did get is A's
/// bytes from the start, in order.
#[test]
fn bytes_parked_while_a_failed_join_waited_end_the_pair_in_resets() {
    let _netns = enter_netns();
    if !require_bpf("bytes_parked_while_a_failed_join_waited_end_the_pair_in_resets") {
        return;
    }
    let mut cmd = std::process::Command::new(SKRELAY);
    cmd.args(["relay", "--datapath", "kernel", "--kernel-after", "0", "--kernel-buffer", "64K"])
        .env("SKRELAY_TEST_JOIN_PAUSE_MS", "500")
        .env("RUST_LOG", "debug");
    let relay = Skrelay::spawn(cmd, "listening on");
    let mut a = connect(addr());
    let mut b = connect(addr());
    // Inside the pause: A writes far more than B's buffers and the 64 KiB budget hold, then B
    // half-closes while A's writes still wait.
    const LEN: u64 = 64 << 20;
    let mut writer = a.try_clone().unwrap();
    let sending = thread::spawn(move || send_pattern(&mut writer, 7, LEN));
    thread::sleep(Duration::from_millis(300));
    b.shutdown(Shutdown::Write).unwrap();
    let (got, end) = read_until_end(&mut b);
    assert!(
        matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "B must see a reset after {} bytes, not {end:?}\n{}",
        got.len(),
        relay.log()
    );
    let mut want = vec![0u8; got.len().next_multiple_of(8)];
    Pattern::new(7).fill(&mut want);
    assert!(got[..] == want[..got.len()], "B's {} bytes are not A's first ones, in order", got.len());
    let upload = sending.join().unwrap();
    let (_, a_end) = read_until_end(&mut a);
    let reset = |r: &std::io::Result<()>| matches!(r, Err(e) if e.kind() == ErrorKind::ConnectionReset);
    assert!(upload.is_err() || reset(&a_end), "A must see a reset: upload {upload:?}, read {a_end:?}");
    let (_, log) = relay.stop(Duration::from_secs(10));
    // The case met: bytes were parked before the join failed.
    assert!(log.contains("parked meanwhile cannot be handed back in order"), "not met:\n{log}");
}

/// Two clients of a relay in arrival order, A first, once their pair has formed.
fn paired_in_order() -> (TcpStream, TcpStream) {
    let a = connect(addr());
    thread::sleep(Duration::from_millis(30));
    let b = connect(addr());
    thread::sleep(Duration::from_millis(100));
    (a, b)
}

/// A client that ends its stream (FIN) and then resets, every byte acknowledged by the relay:
/// its partner, reading a moment later, gets every byte. On splice(2) the finished direction
/// counted as delivered once its bytes were in the partner's send queue, which the partner's
/// reset then threw away (a re-check pass: 127,973 of 1,000,000 bytes, 10 of 10 runs).
fn a_fin_then_a_reset_loses_nothing_the_relay_acknowledged(dp: &str) {
    let _netns = enter_netns();
    let relay = Skrelay::start(&["relay", "--datapath", dp]);
    let (mut a, mut b) = paired_in_order();
    const LEN: u64 = 1_000_000;
    let want = send_pattern(&mut a, 41, LEN).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while unacked(&a) > 0 {
        assert!(Instant::now() < deadline, "{dp}: the relay never took all {LEN} bytes");
        thread::sleep(Duration::from_millis(2));
    }
    a.shutdown(Shutdown::Write).unwrap();
    thread::sleep(Duration::from_millis(50));
    socket2::SockRef::from(&a).set_linger(Some(Duration::ZERO)).unwrap();
    drop(a);
    thread::sleep(Duration::from_millis(200));
    let (got, end) = read_until_end(&mut b);
    assert_eq!((got.len() as u64, sha(&got)), (LEN, want), "{dp}: {end:?}\n{}", relay.log());
}

per_datapath!(a_fin_then_a_reset_loses_nothing_the_relay_acknowledged);

/// B answers and ends its stream, A sends bytes B never reads and ends its own, then B resets:
/// with A's FIN and B's reset in one batch of events (the relay stopped meanwhile), A's FIN came
/// first and the pair ended as if both ends had finished, its reset unseen (a re-check pass,
/// once SO_ERROR was read on EPOLLERR only). It ends in a reset.
fn a_reset_behind_the_last_fin_is_not_taken_for_an_orderly_end(dp: &str) {
    let _netns = enter_netns();
    let relay = Skrelay::start(&["relay", "--datapath", dp, "--metrics", "127.0.0.1:0"]);
    let (mut a, mut b) = paired_in_order();
    b.write_all(b"response").unwrap();
    b.shutdown(Shutdown::Write).unwrap();
    let (got, end) = read_until_end(&mut a);
    assert_eq!((&got[..], end.map_err(|e| e.kind())), (&b"response"[..], Ok(())), "{dp}");
    a.write_all(&[b'r'; 120]).unwrap();
    thread::sleep(Duration::from_millis(100));
    relay.signal(libc::SIGSTOP);
    thread::sleep(Duration::from_millis(50));
    a.shutdown(Shutdown::Write).unwrap();
    thread::sleep(Duration::from_millis(20));
    socket2::SockRef::from(&b).set_linger(Some(Duration::ZERO)).unwrap();
    drop(b);
    thread::sleep(Duration::from_millis(50));
    relay.signal(libc::SIGCONT);
    let m = relay.wait_pairs_ended(1, Duration::from_secs(5));
    assert_eq!((m.pairs(dp, "reset"), m.pairs(dp, "eof")), (1, 0), "{dp}:\n{}\n{}", m.text, relay.log());
}

per_datapath!(a_reset_behind_the_last_fin_is_not_taken_for_an_orderly_end);

/// Urgent data (MSG_OOB) is a byte of the stream, carried in place, each way. splice(2) stops at
/// an urgent byte for good, so the userspace datapath (and the kernel datapath's start, below
/// `--kernel-after`) froze there, and a half-close after it ended the stream in a clean EOF
/// without every byte behind it (a stranger pass: 27 of 27 runs). Each client sends 1,000 bytes,
/// the urgent byte, then 200 KiB (past the default `--kernel-after`), and half-closes.
fn urgent_data_is_carried_in_place(dp: &str, extra: &[&str]) {
    let _netns = enter_netns();
    let mut args = vec!["relay", "--datapath", dp, "--metrics", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let relay = Skrelay::start(&args);
    let a = connect(addr());
    let b = connect(addr());
    const TAIL: usize = 200 << 10;
    let sender = |mut s: TcpStream, fill: u8| {
        thread::spawn(move || {
            let mut sent = vec![fill; 1000];
            s.write_all(&sent).unwrap();
            thread::sleep(Duration::from_millis(200));
            socket2::SockRef::from(&s).send_out_of_band(b"!").unwrap();
            sent.push(b'!');
            let tail: Vec<u8> = (0..TAIL).map(|i| fill.wrapping_add((i % 7) as u8)).collect();
            s.write_all(&tail).unwrap();
            sent.extend_from_slice(&tail);
            s.shutdown(Shutdown::Write).unwrap();
            sent
        })
    };
    let receiver = |mut s: TcpStream| {
        thread::spawn(move || {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let (got, end) = read_until_end(&mut s);
            (got, end.map_err(|e| e.kind()))
        })
    };
    let (ra, rb) = (receiver(a.try_clone().unwrap()), receiver(b.try_clone().unwrap()));
    let (sa, sb) = (sender(a, b'a'), sender(b, b'k'));
    let (sent_a, sent_b) = (sa.join().unwrap(), sb.join().unwrap());
    let (got_b, end_b) = rb.join().unwrap();
    let (got_a, end_a) = ra.join().unwrap();
    assert_eq!((got_b.len(), sha(&got_b), end_b), (sent_a.len(), sha(&sent_a), Ok(())), "{dp} {extra:?}: A -> B");
    assert_eq!((got_a.len(), sha(&got_a), end_a), (sent_b.len(), sha(&sent_b), Ok(())), "{dp} {extra:?}: B -> A");
    let m = relay.wait_pairs_ended(1, Duration::from_secs(5));
    assert_eq!(m.bytes(dp), 2 * (1001 + TAIL as u64), "{dp} {extra:?}: every byte counted once:\n{}", m.text);
}

fn urgent_data_is_carried_in_place_from_the_first_byte(dp: &str) {
    urgent_data_is_carried_in_place(dp, &[]);
}

per_datapath!(urgent_data_is_carried_in_place_from_the_first_byte);

/// The kernel datapath by default: the urgent byte comes while the pair still splices.
#[test]
fn urgent_data_is_carried_in_place_before_the_kernel_datapath_takes_over() {
    if require_bpf("urgent_data_is_carried_in_place_before_the_kernel_datapath_takes_over") {
        urgent_data_is_carried_in_place("kernel", &["--kernel-after", "64K"]);
    }
}

/// An urgent byte in a stream that goes on without ending: splice(2) stops at it with EAGAIN,
/// and the pair learns of it by the socket's EPOLLPRI (it asked SIOCATMARK after every drained
/// read before; now only once a socket has reported urgent data), so its partner gets it and
/// what follows at once, not when the sender ends. Each urgent byte is sent after the previous
/// message arrived, so every one meets a pair that has drained its source.
fn urgent_bytes_in_a_stream_that_goes_on(dp: &str) {
    let _netns = enter_netns();
    let relay = Skrelay::start(&["relay", "--datapath", dp]);
    let mut a = connect(addr());
    let mut b = connect(addr());
    b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for round in 0..20u8 {
        let head = [b'a' + round; 5];
        a.write_all(&head).unwrap();
        assert_eq!(read_n(&mut b, 5), head, "{dp} round {round}: head\n{}", relay.log());
        socket2::SockRef::from(&a).send_out_of_band(b"!").unwrap();
        a.write_all(b"tail").unwrap();
        let started = Instant::now();
        assert_eq!(&read_n(&mut b, 5), b"!tail", "{dp} round {round}: the urgent byte and its tail\n{}", relay.log());
        assert!(started.elapsed() < Duration::from_secs(1), "{dp} round {round}: {:?}", started.elapsed());
    }
    drop((a, b));
}

per_datapath!(urgent_bytes_in_a_stream_that_goes_on);

/// Urgent bytes before the partner comes, two of them (the second urgent pointer made the kernel
/// drop the first byte from the queue unless SO_OOBINLINE was set: `midYtail`, then a clean
/// EOF), and urgent bytes that come one by one while the partner does not read (each cuts a
/// splice short, and the pipe ran out of pieces before bytes: the pair was reset with "Resource
/// temporarily unavailable", 9 of 10 runs). A re-check pass found both.
fn urgent_bytes_before_the_partner_and_while_it_does_not_read(dp: &str) {
    let _netns = enter_netns();
    let relay = Skrelay::start(&["relay", "--datapath", dp]);
    let oob = |s: &TcpStream, b: &[u8]| socket2::SockRef::from(s).send_out_of_band(b).unwrap();
    let mut a = connect(addr());
    oob(&a, b"X");
    thread::sleep(Duration::from_millis(50));
    a.write_all(b"mid").unwrap();
    oob(&a, b"Y");
    a.write_all(b"tail").unwrap();
    a.shutdown(Shutdown::Write).unwrap();
    thread::sleep(Duration::from_millis(300));
    let mut b = connect(addr());
    let (got, end) = read_until_end(&mut b);
    assert_eq!(
        (String::from_utf8_lossy(&got).to_string(), end.map_err(|e| e.kind())),
        ("XmidYtail".into(), Ok(())),
        "{dp}"
    );
    drop((a, b));

    // B does not read for 3 s while A sends 10 bytes and an urgent byte, 60,000 times, paced so
    // that urgent bytes come one by one. (The pass's Python client reset a release build's pair 3
    // of 3 times before the fix; this test's debug build reads too slowly for the pieces to run
    // out, so here it checks the bytes, not that case.)
    let a = connect(addr());
    let mut b = connect(addr());
    let sender = thread::spawn(move || {
        let mut a = a;
        let mut sent = Vec::with_capacity(660_000);
        for i in 0..60_000u32 {
            let chunk = [(i % 251) as u8; 10];
            a.write_all(&chunk).unwrap();
            socket2::SockRef::from(&a).send_out_of_band(b"U").unwrap();
            sent.extend_from_slice(&chunk);
            sent.push(b'U');
            let t = Instant::now();
            while t.elapsed() < Duration::from_micros(20) {
                std::hint::spin_loop();
            }
        }
        a.shutdown(Shutdown::Write).unwrap();
        sent
    });
    thread::sleep(Duration::from_secs(3));
    let (got, end) = read_until_end(&mut b);
    let sent = sender.join().unwrap();
    assert_eq!(
        (got.len(), sha(&got), end.map_err(|e| e.kind())),
        (sent.len(), sha(&sent), Ok(())),
        "{dp}:\n{}",
        relay.log()
    );
}

per_datapath!(urgent_bytes_before_the_partner_and_while_it_does_not_read);

/// Both clients of a pair gone: each sent a byte and closed at once without reading, so each
/// relay socket is reset by its client when the partner's byte reaches it. Nothing can be
/// delivered any more, but the pair waited for the reset socket's send queue to empty, which
/// SIOCOUTQ never says of a reset socket (it still counts what the reset threw away): every such
/// pair, two descriptors each, was held until --idle-timeout (600 s), and 700 of them in a
/// second took a relay's last descriptor (a bounds pass). Relay and proxy (whose upstream
/// answers a byte and closes), both with the default idle timeout.
fn pairs_whose_clients_are_both_gone_end_at_once(dp: &str) {
    let _netns = enter_netns();
    const PAIRS: u64 = 40;
    let upstream = std::net::TcpListener::bind("127.0.0.1:9000").unwrap();
    let serving = thread::spawn(move || {
        for _ in 0..PAIRS {
            let (mut b, _) = upstream.accept().unwrap();
            let _ = b.write_all(b"b");
        }
    });
    let kernel_after = if dp == "kernel" { "0" } else { "65536" };
    let common = ["--datapath", dp, "--kernel-after", kernel_after, "--metrics", "127.0.0.1:0"];
    for command in ["relay", "proxy"] {
        let mut args = vec![command];
        args.extend(common);
        if command == "proxy" {
            args.extend(["--upstream", "127.0.0.1:9000"]);
        }
        let relay = Skrelay::start(&args);
        for _ in 0..PAIRS {
            let clients = if command == "relay" { 2 } else { 1 };
            let mut ends: Vec<TcpStream> = (0..clients).map(|_| connect(addr())).collect();
            for s in &mut ends {
                s.write_all(b"a").unwrap();
            }
        }
        let m = relay.wait_pairs_ended(PAIRS, Duration::from_secs(10));
        assert_eq!(m.sum("skrelay_pairs_active"), 0, "{command} {dp}:\n{}\n{}", m.text, relay.log());
        let (status, log) = relay.stop(Duration::from_secs(10));
        assert!(status.success(), "{command} {dp}: {log}");
    }
    serving.join().unwrap();
}

per_datapath!(pairs_whose_clients_are_both_gone_end_at_once);
