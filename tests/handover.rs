//! `--takeover` moves live pairs and waiting clients to the new process (issue 14 item 4): a
//! 1 GiB transfer each way runs through the relay while it is taken over, and must arrive whole
//! (sha256), with the stall reported; waiting clients keep their place; the old process exits
//! within a second of the signal.
#[macro_use]
mod common;
use common::*;
use sha2::{Digest, Sha256};
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

const RELAY: &str = "127.0.0.1:7777";
const GIB: u64 = 1 << 30;

/// The 1 GiB cases run one at a time: on a 2-CPU machine the userspace one's CPU would starve the
/// kernel one's worker threads (KERNEL-NOTES), and the stall measured would not be the takeover's.
static BULK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What one side of a transfer saw: the sha256 it sent, what it received (bytes, sha256), and
/// every pause between two reads longer than 5 ms (when it ended, how long it was).
struct Side {
    sent: String,
    got: (u64, String),
    gaps: Vec<(Instant, Duration)>,
}

/// Sends `len` bytes of pattern `seed` from `s` (then shuts its write side) while reading to EOF,
/// counting what it received in `progress` and timing the pauses between reads.
fn timed_exchange(
    s: TcpStream,
    seed: u64,
    len: u64,
    progress: Arc<AtomicU64>,
) -> thread::JoinHandle<Result<Side, String>> {
    thread::spawn(move || {
        let mut w = s.try_clone().unwrap();
        let writer = thread::spawn(move || {
            let sha = send_pattern(&mut w, seed, len).map_err(|e| format!("send: {e}"))?;
            w.shutdown(std::net::Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
            Ok::<_, String>(sha)
        });
        let mut r = s;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let (mut total, mut gaps, mut last) = (0u64, Vec::new(), Instant::now());
        loop {
            let n = r.read(&mut buf).map_err(|e| format!("receive after {total} bytes: {e}"))?;
            let now = Instant::now();
            if now - last > Duration::from_millis(5) {
                gaps.push((now, now - last));
            }
            last = now;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            total += n as u64;
            progress.store(total, Ordering::Relaxed);
        }
        let sha = h.finalize().iter().map(|x| format!("{x:02x}")).collect();
        Ok(Side { sent: writer.join().unwrap()?, got: (total, sha), gaps })
    })
}

/// The `X` of the old process's "... X ms after the signal" line.
fn handover_ms(log: &str) -> f64 {
    let line = log.lines().find(|l| l.contains("ms after the signal")).unwrap_or_else(|| panic!("no handover:\n{log}"));
    let before = &line[..line.find(" ms after the signal").unwrap()];
    before.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Starts `skrelay ARGS --takeover PID` and waits for the old process to exit: returns the new
/// process, how long after its start the old one exited, and the old one's log.
fn take_over(args: &[&str], mut old: Skrelay) -> (Skrelay, Duration, String) {
    let pid = old.pid().to_string();
    let mut with: Vec<&str> = args.to_vec();
    with.extend(["--takeover", &pid]);
    let t0 = Instant::now();
    let new = Skrelay::start(&with);
    let status = old.wait(Duration::from_secs(10));
    let gone = t0.elapsed();
    old.wait_log("stopped", 1, Duration::from_secs(5));
    let old_log = old.log();
    assert!(status.success(), "the old process: {status}\n{old_log}");
    (new, gone, old_log)
}

fn a_gib_each_way_crosses_a_takeover_whole(dp: &str) {
    let _one_at_a_time = BULK.lock().unwrap_or_else(|e| e.into_inner());
    let _netns = enter_netns();
    let args = ["relay", "--datapath", dp];
    let mut relay = Skrelay::start(&args);
    let addr: SocketAddr = RELAY.parse().unwrap();
    let (a, b) = (connect(addr), connect(addr));
    let (pa, pb) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let started = Instant::now();
    let (ja, jb) = (timed_exchange(a, 11, GIB, pa.clone()), timed_exchange(b, 12, GIB, pb.clone()));
    // Two takeovers: once a quarter has crossed one way, and again at half (the second one hands
    // over maps the first one adopted). Taken on the faster direction, so that both are still
    // moving (the kernel datapath does not share evenly between the two directions of a pair).
    let mut takeovers = Vec::new();
    let mut old_logs = String::new();
    for fraction in [4, 2] {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut last = (0, Instant::now());
        let due = || {
            let (a, b) = (pa.load(Ordering::Relaxed), pb.load(Ordering::Relaxed));
            a.max(b) >= GIB / fraction && a.min(b) > 0
        };
        while !due() {
            assert!(Instant::now() < deadline, "{dp}: the transfer did not get going:\n{}", relay.log());
            let now = pa.load(Ordering::Relaxed) + pb.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, Instant::now());
            }
            if last.1.elapsed() > Duration::from_secs(10) {
                // Tell a stall of the datapath itself from the takeover's, with what the sockets hold.
                let ss = std::process::Command::new("ss").args(["-tmi"]).output().map(|o| o.stdout).unwrap_or_default();
                panic!(
                    "{dp}: the transfer stalled for 10 s at {now} bytes, {} takeover(s) done, while no takeover \
                     ran:\n{}\nrelay:\n{}\nearlier:\n{old_logs}",
                    takeovers.len(),
                    String::from_utf8_lossy(&ss),
                    relay.log()
                );
            }
            thread::sleep(Duration::from_millis(1));
        }
        let at = [pb.load(Ordering::Relaxed) >> 20, pa.load(Ordering::Relaxed) >> 20];
        let t = Instant::now();
        let (new, gone, old_log) = take_over(&args, relay);
        relay = new;
        assert!(old_log.contains("handed over 1 live pair(s) and 0 waiting client(s)"), "{dp}:\n{old_log}");
        assert!(!old_log.contains(" ended after "), "{dp}: the pair ended in the old process:\n{old_log}");
        relay.wait_log("took over 1 live pair(s) and 0 waiting client(s)", 1, Duration::from_secs(5));
        let handover = handover_ms(&old_log);
        assert!(handover < 1000.0, "{dp}: the old process took {handover} ms to hand over and exit:\n{old_log}");
        takeovers.push((t, gone, handover, at));
        old_logs.push_str(&old_log);
    }
    // Watch the rest too: a stall after the takeovers is reported with what the sockets hold.
    let mut last = (0, Instant::now());
    while !(ja.is_finished() && jb.is_finished()) {
        let now = pa.load(Ordering::Relaxed) + pb.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        }
        if last.1.elapsed() > Duration::from_secs(10) {
            let ss = std::process::Command::new("ss").args(["-tmi"]).output().map(|o| o.stdout).unwrap_or_default();
            panic!(
                "{dp}: the transfer stalled for 10 s at {now} bytes, after the takeovers:\n{}\nrelay:\n{}\nearlier:\n\
                 {old_logs}",
                String::from_utf8_lossy(&ss),
                relay.log()
            );
        }
        thread::sleep(Duration::from_millis(1));
    }
    let (sa, sb) = match (ja.join().unwrap(), jb.join().unwrap()) {
        (Ok(sa), Ok(sb)) => (sa, sb),
        (ra, rb) => panic!("{dp}: A: {:?}, B: {:?}\nold:\n{old_logs}\nnew:\n{}", ra.err(), rb.err(), relay.log()),
    };
    let took = started.elapsed();
    assert_eq!(sb.got, (GIB, sa.sent.clone()), "{dp}: A -> B\nold:\n{old_logs}\nnew:\n{}", relay.log());
    assert_eq!(sa.got, (GIB, sb.sent.clone()), "{dp}: B -> A\nold:\n{old_logs}\nnew:\n{}", relay.log());
    // The pair ends in the last process, which counts every byte of it (all processes' share).
    relay.wait_log(" ended after ", 1, Duration::from_secs(5));
    let log = relay.log();
    let ended = log.lines().find(|l| l.contains(" ended after ")).unwrap();
    assert_eq!(ended.matches(&format!("{GIB} bytes")).count(), 2, "{dp}: {ended}");
    assert!(ended.ends_with(&format!("({dp})")), "{dp}: the pair stayed on its datapath: {ended}");
    // The stall: the longest pause between two reads that overlaps the second after a signal.
    let worst = |s: &Side| s.gaps.iter().map(|(_, len)| *len).max().unwrap_or_default();
    let mut stalls = Vec::new();
    for (t, gone, handover, at) in &takeovers {
        let window = |s: &Side| {
            s.gaps
                .iter()
                .filter(|(end, len)| *end >= *t && *end - *len <= *t + *gone + Duration::from_secs(1))
                .map(|(_, len)| *len)
                .max()
                .unwrap_or_default()
        };
        let (b, a) = (window(&sb), window(&sa));
        // Where each side's longest pause around the takeover began, from the old process's exit
        // (the handover is a few ms before it; before it, the new process loads its programs).
        let began = |s: &Side| {
            let exit = *t + *gone;
            s.gaps
                .iter()
                .filter(|(end, len)| *end >= *t && *end - *len <= *t + *gone + Duration::from_secs(1))
                .max_by_key(|(_, len)| *len)
                .map(|(end, len)| {
                    let start = *end - *len;
                    if start >= exit {
                        (start - exit).as_secs_f64() * 1e3
                    } else {
                        -(exit - start).as_secs_f64() * 1e3
                    }
                })
                .unwrap_or_default()
        };
        eprintln!(
            "{dp}: those pauses began {:.0} ms (B) / {:.0} ms (A) from the old process's exit",
            began(&sb),
            began(&sa)
        );
        eprintln!(
            "{dp}: takeover at {} / {} MiB: handed over {handover:.1} ms after the signal, old process gone {:.0} ms \
             after the new one started; longest pause in reads around it {:.1} ms (B) / {:.1} ms (A)",
            at[0],
            at[1],
            gone.as_secs_f64() * 1e3,
            b.as_secs_f64() * 1e3,
            a.as_secs_f64() * 1e3
        );
        stalls.push(a.max(b));
    }
    eprintln!(
        "{dp}: 1 GiB each way across {} takeovers, whole both ways in {:.2} s ({:.2} Gbit/s each way); longest \
         pause in the whole transfer {:.1} ms (B) / {:.1} ms (A)",
        takeovers.len(),
        took.as_secs_f64(),
        GIB as f64 * 8.0 / took.as_secs_f64() / 1e9,
        worst(&sb).as_secs_f64() * 1e3,
        worst(&sa).as_secs_f64() * 1e3,
    );
    // Bounded: under 5 s, or a second beyond the longest pause away from the takeovers. The
    // kernel datapath pauses one direction of a busy pair for 2-4 s now and then on this 2-CPU
    // machine with or without a takeover (its worker threads, parking); a broken handover stalls
    // until the clients' 15 s timeouts.
    let away = |s: &Side| {
        s.gaps
            .iter()
            .filter(|(end, len)| {
                takeovers.iter().all(|(t, gone, ..)| *end < *t || *end - *len > *t + *gone + Duration::from_secs(1))
            })
            .map(|(_, len)| *len)
            .max()
            .unwrap_or_default()
    };
    let (stall, baseline) = (stalls.into_iter().max().unwrap_or_default(), away(&sa).max(away(&sb)));
    let bound = Duration::from_secs(5).max(baseline + Duration::from_secs(1));
    assert!(stall < bound, "{dp}: the transfer stalled {stall:?} at a takeover, {baseline:?} at most elsewhere");
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

per_datapath!(a_gib_each_way_crosses_a_takeover_whole);

/// Writes `bytes` and waits until the relay has seen them (a pending client is only peeked).
fn send(s: &mut TcpStream, bytes: &[u8]) {
    s.write_all(bytes).unwrap();
    thread::sleep(Duration::from_millis(50));
}

fn waiting_clients_keep_their_place_across_a_takeover(dp: &str) {
    let _netns = enter_netns();
    let addr: SocketAddr = RELAY.parse().unwrap();
    let token_addr: SocketAddr = "127.0.0.1:7778".parse().unwrap();
    let order = ["relay", "--datapath", dp];
    let token = ["relay", "--datapath", dp, "--pair", "token", "--listen", "127.0.0.1:7778"];
    let (old_order, old_token) = (Skrelay::start(&order), Skrelay::start(&token));
    // Arrival order: the first client waits with bytes for its partner queued.
    let mut first = connect(addr);
    send(&mut first, b"first, waiting");
    // By token: one client identified and waiting (bytes after its line), one inside its line.
    let mut alpha = connect(token_addr);
    send(&mut alpha, b"alpha\nearly bytes from alpha");
    let mut beta = connect(token_addr);
    send(&mut beta, b"be");
    let (new_order, gone_order, log_order) = take_over(&order, old_order);
    let (new_token, gone_token, log_token) = take_over(&token, old_token);
    assert!(log_order.contains("handed over 0 live pair(s) and 1 waiting client(s)"), "{dp}:\n{log_order}");
    assert!(log_token.contains("handed over 0 live pair(s) and 2 waiting client(s)"), "{dp}:\n{log_token}");
    new_order.wait_log("took over 0 live pair(s) and 1 waiting client(s)", 1, Duration::from_secs(5));
    new_token.wait_log("took over 0 live pair(s) and 2 waiting client(s)", 1, Duration::from_secs(5));
    for log in [&log_order, &log_token] {
        let ms = handover_ms(log);
        assert!(ms < 1000.0, "{dp}: handing over took {ms} ms:\n{log}");
    }
    // The next client in arrival order pairs with the one that waited in the old process.
    let mut second = connect(addr);
    assert_eq!(read_n(&mut second, 14), b"first, waiting");
    second.write_all(b"hello first").unwrap();
    assert_eq!(read_n(&mut first, 11), b"hello first");
    exchange_both_ways(first, second, [1, 2], 8 << 20, &format!("{dp}: order"));
    // The client inside its token line finishes it in the new process; both meet their partners.
    beta.write_all(b"ta\nfrom beta").unwrap();
    let mut beta2 = connect(token_addr);
    beta2.write_all(b"beta\n").unwrap();
    assert_eq!(read_n(&mut beta2, 9), b"from beta");
    let mut alpha2 = connect(token_addr);
    alpha2.write_all(b"alpha\n").unwrap();
    assert_eq!(read_n(&mut alpha2, 22), b"early bytes from alpha");
    exchange_both_ways(alpha, alpha2, [3, 4], 8 << 20, &format!("{dp}: token alpha"));
    exchange_both_ways(beta, beta2, [5, 6], 8 << 20, &format!("{dp}: token beta"));
    eprintln!(
        "{dp}: waiting clients moved; the old processes were gone {:.0} / {:.0} ms after the new ones started",
        gone_order.as_secs_f64() * 1e3,
        gone_token.as_secs_f64() * 1e3
    );
    for new in [new_order, new_token] {
        let (status, log) = new.stop(Duration::from_secs(10));
        assert!(status.success(), "{log}");
    }
}

per_datapath!(waiting_clients_keep_their_place_across_a_takeover);

/// A successor with a lower `--max-pending` than the clients waiting: the handed-over clients
/// keep their place (the limit holds back new ones). It reset three of five at once while both
/// logs said all five moved (a helper's pass, 2026-12-05).
#[test]
fn a_successor_with_a_lower_max_pending_keeps_every_waiting_client() {
    let _netns = enter_netns();
    let token_addr: SocketAddr = "127.0.0.1:7778".parse().unwrap();
    let token = ["relay", "--datapath", "userspace", "--pair", "token", "--listen", "127.0.0.1:7778"];
    let old = Skrelay::start(&token);
    let mut waiting: Vec<TcpStream> = (0..5)
        .map(|i| {
            let mut c = connect(token_addr);
            send(&mut c, format!("tok{i}\nfrom tok{i}").as_bytes());
            c
        })
        .collect();
    let (new, _, old_log) = take_over(&[&token[..], &["--max-pending", "2", "--metrics", "127.0.0.1:0"]].concat(), old);
    assert!(old_log.contains("handed over 0 live pair(s) and 5 waiting client(s)"), "{old_log}");
    new.wait_log("took over 0 live pair(s) and 5 waiting client(s)", 1, Duration::from_secs(5));
    for (i, c) in waiting.iter_mut().enumerate() {
        let mut partner = connect(token_addr);
        partner.write_all(format!("tok{i}\n").as_bytes()).unwrap();
        let want = format!("from tok{i}");
        assert_eq!(read_n(&mut partner, want.len()), want.as_bytes(), "{}", new.log());
        partner.write_all(b"back").unwrap();
        assert_eq!(read_n(c, 4), b"back");
    }
    let m = new.metrics();
    assert_eq!(m.get("skrelay_unpaired_clients_total{reason=\"full\"}"), 0, "{}", m.text);
    drop(waiting);
    let (status, log) = new.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

fn a_handover_the_new_process_refuses_leaves_every_pair_with_the_old_one(dp: &str) {
    let _netns = enter_netns();
    let addr: SocketAddr = RELAY.parse().unwrap();
    let mut old = Skrelay::start(&["relay", "--datapath", dp]);
    let (mut a, mut b) = (connect(addr), connect(addr));
    a.write_all(b"before").unwrap();
    assert_eq!(read_n(&mut b, 6), b"before");
    let waiting = connect(addr);
    thread::sleep(Duration::from_millis(50));
    // The new process pairs by token: the old one's waiting client (in arrival order) does not fit,
    // so it refuses everything before the commit and the old process keeps it all.
    let pid = old.pid().to_string();
    let new = Skrelay::start(&["relay", "--datapath", dp, "--pair", "token", "--takeover", &pid]);
    new.wait_log("keeps its live pairs and lets them finish", 1, Duration::from_secs(10));
    old.wait_log(
        "live pairs stay in this process and finish here, and its waiting clients are reset",
        1,
        Duration::from_secs(5),
    );
    // The live pair carries on in the old process, every byte of it.
    exchange_both_ways(a, b, [7, 8], 16 << 20, &format!("{dp}: the pair the handover left behind"));
    assert!(old.wait(Duration::from_secs(10)).success(), "{}", old.log());
    old.wait_log(" ended after ", 1, Duration::from_secs(5));
    let log = old.log();
    let ended = log.lines().find(|l| l.contains(" ended after ")).unwrap();
    assert_eq!(ended.matches(&format!("{} bytes", (16 << 20) + 6)).count(), 1, "{dp}: {ended}");
    // Its waiting client could not wait for a partner there: closed, as on any drain.
    drop(waiting);
    // The new process serves new clients.
    let (mut c, mut d) = (connect(addr), connect(addr));
    c.write_all(b"tok\nhello").unwrap();
    d.write_all(b"tok\n").unwrap();
    assert_eq!(read_n(&mut d, 5), b"hello");
    drop((c, d));
    assert!(!new.log().contains(" live pair(s) and "), "nothing was taken over:\n{}", new.log());
    let (status, log) = new.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

per_datapath!(a_handover_the_new_process_refuses_leaves_every_pair_with_the_old_one);

/// A kernel-datapath relay handed to a userspace-datapath one: a pair still on splice(2) (below
/// `--kernel-after`) moves and carries on; one in the kernel maps cannot, so the new process
/// refuses the pairs before the commit and the old one keeps them, and takes only the waiting
/// clients. (A build that took the first pair over and then found it could not carry it on reset
/// it.)
#[test]
fn a_takeover_by_the_userspace_datapath_moves_spliced_pairs_and_leaves_kernel_ones() {
    if !require_bpf("a_takeover_by_the_userspace_datapath_moves_spliced_pairs_and_leaves_kernel_ones") {
        return;
    }
    let _netns = enter_netns();
    let addr: SocketAddr = RELAY.parse().unwrap();
    // Below --kernel-after (its default): the pair is on splice(2) and moves.
    let old = Skrelay::start(&["relay", "--datapath", "kernel", "--kernel-after", "65536"]);
    let (mut a, mut b) = (connect(addr), connect(addr));
    a.write_all(b"before").unwrap();
    assert_eq!(read_n(&mut b, 6), b"before");
    let (new, _, old_log) = take_over(&["relay", "--datapath", "userspace"], old);
    assert!(old_log.contains("handed over 1 live pair(s)"), "{old_log}");
    new.wait_log("took over 1 live pair(s)", 1, Duration::from_secs(5));
    exchange_both_ways(a, b, [1, 2], 4 << 20, "a spliced pair moved to the userspace datapath");
    new.wait_log(" ended after ", 1, Duration::from_secs(5));
    let ended = new.log().lines().find(|l| l.contains(" ended after ")).unwrap().to_string();
    assert!(ended.contains(&format!("{} bytes", (4 << 20) + 6)), "{ended}");
    let (status, log) = new.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    // In the kernel maps from its first byte: refused before the commit, kept by the old process.
    // Its waiting client moves (it holds no kernel state), and pairs in the new process with the
    // next client: it used to be reset with the old process's drain.
    let mut old = Skrelay::start(&["relay", "--datapath", "kernel", "--kernel-after", "0"]);
    let (mut a, mut b) = (connect(addr), connect(addr));
    a.write_all(b"before").unwrap();
    assert_eq!(read_n(&mut b, 6), b"before");
    let mut waiting = connect(addr);
    waiting.write_all(b"early").unwrap();
    thread::sleep(Duration::from_millis(50));
    let pid = old.pid().to_string();
    let new = Skrelay::start(&["relay", "--datapath", "userspace", "--takeover", &pid]);
    new.wait_log("keeps its live pairs and lets them finish", 1, Duration::from_secs(10));
    assert!(new.log().contains("start it with --datapath kernel"), "{}", new.log());
    assert!(new.log().contains("took over its 1 waiting client(s)"), "{}", new.log());
    old.wait_log("handed over 1 waiting client(s)", 1, Duration::from_secs(5));
    let mut partner = connect(addr);
    assert_eq!(read_n(&mut partner, 5), b"early", "the waiting client's bytes, in the new process");
    partner.write_all(b"late").unwrap();
    assert_eq!(read_n(&mut waiting, 4), b"late");
    drop((waiting, partner));
    exchange_both_ways(a, b, [3, 4], 4 << 20, "a kernel pair left with the old process");
    assert!(old.wait(Duration::from_secs(10)).success(), "{}", old.log());
    old.wait_log(" ended after ", 1, Duration::from_secs(5));
    assert!(!new.log().contains(" reset"), "{}", new.log());
    let (status, log) = new.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

fn bytes_held_for_a_reader_that_stopped_move_with_their_pair(dp: &str) {
    let _netns = enter_netns();
    const LEN: u64 = 96 << 20;
    let addr: SocketAddr = RELAY.parse().unwrap();
    let args = ["relay", "--datapath", dp];
    let old = Skrelay::start(&args);
    let (a, mut b) = (connect(addr), connect(addr));
    // B does not read: A's bytes fill every buffer on the way, the userspace datapath's pipe and
    // the kernel datapath's budget (its direction parks), and A's writes block.
    let mut w = a.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let sha = send_pattern(&mut w, 21, LEN).expect("send");
        w.shutdown(std::net::Shutdown::Write).unwrap();
        sha
    });
    thread::sleep(Duration::from_millis(1500));
    assert!(!sender.is_finished(), "{dp}: {LEN} bytes fit in the buffers: the test cannot tell");
    let (new, _, old_log) = take_over(&args, old);
    assert!(old_log.contains("handed over 1 live pair(s)"), "{dp}:\n{old_log}");
    if dp == "userspace" {
        // Two sockets and the pipe that holds A's bytes.
        assert!(old_log.contains("(4 descriptor(s))"), "{dp}: the full pipe moved:\n{old_log}");
    }
    b.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let got = recv_all(&mut b).expect("B reads what A sent");
    assert_eq!(got, (LEN, sender.join().unwrap()), "{dp}: A -> B across the takeover\n{old_log}\n{}", new.log());
    // The other way still works, then both ends close cleanly.
    let mut a = a;
    b.write_all(b"the other way").unwrap();
    b.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(recv_all(&mut a).unwrap(), (13, sha(b"the other way")));
    let (status, log) = new.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    assert!(log.contains(&format!("{LEN} bytes")), "{dp}: the pair counted every byte in the new process:\n{log}");
    if dp == "kernel" {
        // The direction was parked at its budget when it moved (the count came with the maps).
        let summary = log.lines().find(|l| l.contains("parked at a budget in")).expect("the exit summary");
        let parkings = summary.split(" parked at a budget in ").nth(1).unwrap().split(' ').next().unwrap();
        assert_ne!(parkings, "0", "{dp}: {summary}");
        eprintln!("{dp}: {summary}");
    }
}

per_datapath!(bytes_held_for_a_reader_that_stopped_move_with_their_pair);

/// A pair waiting, after B's reset, for A's client to take what B sent moves with its wait: A
/// gets every byte, then the reset. The old process reset such pairs at the handover: A, paused,
/// got 128,512 of 3,000,000 bytes (a re-check pass).
fn a_pair_waiting_after_a_reset_moves_waiting(dp: &str) {
    let _netns = enter_netns();
    const LEN: u64 = 3_000_000;
    let addr: SocketAddr = RELAY.parse().unwrap();
    let args: &[&str] =
        if dp == "kernel" { &["relay", "--datapath", dp, "--kernel-after", "0"] } else { &["relay", "--datapath", dp] };
    let old = Skrelay::start(args);
    let (mut a, mut b) = (connect(addr), connect(addr));
    b.write_all(b"x").unwrap();
    assert_eq!(read_n(&mut a, 1), b"x");
    // A does not read: B's bytes wait in the relay, and B resets once the relay has them all
    // (on the kernel datapath, out of B's socket there, where a reset loses parked bytes:
    // KERNEL-NOTES item 12).
    let mut b = b;
    let want = send_pattern(&mut b, 31, LEN).unwrap();
    wait_acked(&b, Duration::from_secs(5), "B's bytes");
    if dp == "kernel" {
        wait_out_of_the_senders_socket(&a, LEN, "B's bytes");
    }
    socket2::SockRef::from(&b).set_linger(Some(Duration::ZERO)).unwrap();
    drop(b);
    thread::sleep(Duration::from_millis(300));
    let (new, _, old_log) = take_over(args, old);
    assert!(old_log.contains("handed over 1 live pair(s)"), "{dp}:\n{old_log}");
    let (got, end) = read_until_end(&mut a);
    assert_eq!((got.len() as u64, sha(&got)), (LEN, want), "{dp}: A got {} bytes\n{old_log}\n{}", got.len(), new.log());
    assert!(
        matches!(&end, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{dp}: then the reset, got {end:?}\n{}",
        new.log()
    );
    let (status, log) = new.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    // B's "x" and its LEN bytes.
    assert!(log.contains(&format!("{} bytes", LEN + 1)), "{dp}: the new process counted every byte:\n{log}");
}

per_datapath!(a_pair_waiting_after_a_reset_moves_waiting);

fn a_half_closed_pair_moves_half_closed(dp: &str) {
    let _netns = enter_netns();
    let addr: SocketAddr = RELAY.parse().unwrap();
    let args = ["relay", "--datapath", dp];
    let old = Skrelay::start(&args);
    let (mut a, mut b) = (connect(addr), connect(addr));
    // Paired (on the kernel datapath: in the maps) before anyone half-closes.
    a.write_all(b"hi").unwrap();
    assert_eq!(read_n(&mut b, 2), b"hi");
    // A sends, then half-closes: B reads A's bytes and A's EOF before the takeover.
    a.write_all(b"all of A").unwrap();
    a.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(recv_all(&mut b).unwrap(), (8, sha(b"all of A")));
    let (new, _, old_log) = take_over(&args, old);
    assert!(old_log.contains("handed over 1 live pair(s)"), "{dp}:\n{old_log}");
    // The other direction carries on in the new process, then ends the pair with FINs.
    let sent = send_pattern(&mut b, 31, 4 << 20).unwrap();
    b.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(recv_all(&mut a).unwrap(), (4 << 20, sent), "{dp}: B -> A after the takeover");
    new.wait_log(" ended after ", 1, Duration::from_secs(5));
    let log = new.log();
    let ended = log.lines().find(|l| l.contains(" ended after ")).unwrap();
    assert!(ended.contains(": 10 bytes ") && ended.contains(&format!(", {} bytes ", 4 << 20)), "{dp}: {ended}");
    assert!(ended.ends_with(&format!("({dp})")), "{dp}: {ended}");
    let (status, log) = new.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

per_datapath!(a_half_closed_pair_moves_half_closed);

fn a_successor_that_dies_before_the_commit_leaves_every_pair_with_the_old_one(dp: &str) {
    use std::os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr as UnixAddr, UnixListener},
    };
    let _netns = enter_netns();
    let addr: SocketAddr = RELAY.parse().unwrap();
    let mut old = Skrelay::start(&["relay", "--datapath", dp]);
    let (mut a, mut b) = (connect(addr), connect(addr));
    a.write_all(b"before").unwrap();
    assert_eq!(read_n(&mut b, 6), b"before");
    // The test plays a new skrelay: it listens where the old one hands over, signals it, takes a
    // duplicate of every descriptor the manifest names, and dies before it answers `ready`.
    let name = skrelay::takeover::channel_name(old.pid() as u32);
    let channel = UnixListener::bind_addr(&UnixAddr::from_abstract_name(name).unwrap()).unwrap();
    old.signal(libc::SIGUSR2);
    let (mut stream, _) = channel.accept().unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).unwrap();
    let mut manifest = vec![0u8; u32::from_le_bytes(len) as usize];
    stream.read_exact(&mut manifest).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let pidfd = skrelay::sys::pidfd_open(old.pid()).unwrap();
    let fds: Vec<_> = manifest["fds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|fd| skrelay::sys::pidfd_getfd(&pidfd, fd.as_i64().unwrap() as i32).unwrap())
        .collect();
    assert!(fds.len() >= 2, "{dp}: {manifest}");
    drop((fds, stream, channel));
    // Nobody else holds the listening socket now: the old process serves on, as if no signal had
    // come (it used to drain, and every later client was refused until a restart).
    old.wait_log("no other process holds the listening socket: serving on", 1, Duration::from_secs(5));
    // The pair lives on in the old process, every byte of it, and ends there with FINs.
    exchange_both_ways(a, b, [9, 10], 16 << 20, &format!("{dp}: after a successor died"));
    old.wait_log(" ended after ", 1, Duration::from_secs(5));
    // New clients are still served.
    let (c, d) = (connect(addr), connect(addr));
    exchange_both_ways(c, d, [11, 12], 1 << 20, &format!("{dp}: a pair that came after"));
    old.signal(libc::SIGTERM);
    assert!(old.wait(Duration::from_secs(10)).success(), "{}", old.log());
    let log = old.log();
    let ended = log.lines().find(|l| l.contains(" ended after ")).unwrap();
    assert_eq!(ended.matches(&format!("{} bytes", (16 << 20) + 6)).count(), 1, "{dp}: {ended}");
}

per_datapath!(a_successor_that_dies_before_the_commit_leaves_every_pair_with_the_old_one);
