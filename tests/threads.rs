//! `--threads N` (issue 11 item 1): several event loops serve pairs, one loop per pair, and
//! pairing keeps its exact semantics across them: arrival order, tokens, bytes sent before the
//! partner came. A drain waits for the pairs of every loop; a takeover moves the pairs of every
//! loop (each loop's kernel maps with them); one that cannot (the new process runs fewer loops
//! than the old one has kernel maps in use) leaves them to drain, whole, in the old process.
#[macro_use]
mod common;
use common::*;
use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    thread,
    time::Duration,
};

const RELAY: &str = "127.0.0.1:7777";
const SKRELAY: &str = env!("CARGO_BIN_EXE_skrelay");

/// `skrelay ARGS` with debug logging, so that each pair's loop is in the log ("thread N").
fn start_debug(args: &[&str], dp: &str) -> Skrelay {
    let mut cmd = Command::new(SKRELAY);
    cmd.args(args).env("RUST_LOG", "debug,aya=info");
    if dp == "kernel" {
        cmd.args(["--kernel-after", "0"]);
    }
    Skrelay::spawn(cmd, "listening on")
}

/// The loops that `pairs` pairs were spliced on, from "paired A <-> B (DATAPATH, thread N)"
/// lines (waiting for them: the log is read from a pipe, behind the process).
fn loops_used(relay: &Skrelay, pairs: usize) -> BTreeSet<usize> {
    relay.wait_log("paired ", pairs, Duration::from_secs(5));
    relay
        .log()
        .lines()
        .filter(|l| l.contains("paired "))
        .filter_map(|l| l.rsplit("thread ").next()?.trim_end_matches(')').parse().ok())
        .collect()
}

/// Client `i` of a relay: connects, says who it is at once (before any partner exists).
fn client(i: usize) -> TcpStream {
    let mut s = connect(RELAY.parse::<SocketAddr>().unwrap());
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    writeln!(s, "client {i}").unwrap();
    s
}

/// `n` clients connected one after another, each checked to hear its partner in arrival order
/// (client 2k with 2k+1).
fn paired_in_order(n: usize, relay: &Skrelay) -> Vec<TcpStream> {
    let clients: Vec<TcpStream> = (0..n).map(client).collect();
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(hear_line(c), format!("client {}", i ^ 1), "client {i}'s partner\n{}", relay.log());
    }
    clients
}

/// Moves `len` bytes each way through every pair of `clients` (2k with 2k+1) at once, each
/// checked by sha256, then EOF.
fn exchange_pairs(clients: Vec<TcpStream>, len: u64, what: &'static str) {
    let mut it = clients.into_iter();
    let mut runs = Vec::new();
    let mut k = 0u64;
    while let (Some(a), Some(b)) = (it.next(), it.next()) {
        runs.push(thread::spawn(move || exchange_both_ways(a, b, [2 * k, 2 * k + 1], len, what)));
        k += 1;
    }
    runs.into_iter().for_each(|r| r.join().unwrap());
}

fn hear_line(s: &TcpStream) -> String {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("a line from the partner");
    line.trim_end().to_string()
}

/// 24 clients connect one after another, each sending its name at once: client 2k must be paired
/// with 2k+1 however the pairs are spread over 4 loops. Then each pair moves 4 MiB each way.
fn arrival_order_pairs_exactly_across_loops(dp: &str) {
    let _netns = enter_netns();
    let relay = start_debug(&["relay", "--datapath", dp, "--threads", "4", "--metrics", "127.0.0.1:0"], dp);
    assert!(relay.log().contains("4 event loops"), "{}", relay.log());
    let clients = paired_in_order(24, &relay);
    // All 12 pairs are live at once, so they were spread over every loop, and the metrics say
    // how many each serves.
    let used = loops_used(&relay, 12);
    assert_eq!(used, (0..4).collect(), "{dp}: loops that served pairs\n{}", relay.log());
    let m = relay.metrics();
    let per_loop: Vec<u64> = (0..4).map(|n| m.get(&format!("skrelay_loop_pairs{{loop=\"{n}\"}}"))).collect();
    assert_eq!(per_loop.iter().sum::<u64>(), 12, "{dp}: {per_loop:?}\n{}", m.text);
    assert!(per_loop.iter().all(|&n| n > 0), "{dp}: {per_loop:?}");
    exchange_pairs(clients, 4 << 20, "pair");
    relay.wait_log(" ended after ", 12, Duration::from_secs(10));
    let m = relay.metrics();
    assert_eq!((0..4).map(|n| m.get(&format!("skrelay_loop_pairs{{loop=\"{n}\"}}"))).sum::<u64>(), 0, "{}", m.text);
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}
per_datapath!(arrival_order_pairs_exactly_across_loops);

/// 16 tokens, each sent by two clients that connect far apart and in mixed order, with bytes
/// after the token line: each client gets exactly its own partner's bytes, over 3 loops.
fn tokens_pair_exactly_across_loops(dp: &str) {
    let _netns = enter_netns();
    let relay = start_debug(&["relay", "--datapath", dp, "--pair", "token", "--threads", "3"], dp);
    let order: Vec<(usize, usize)> = (0..16).map(|t| (t, 0)).chain((0..16).rev().map(|t| (t, 1))).collect::<Vec<_>>();
    let mut ends: Vec<[Option<TcpStream>; 2]> = (0..16).map(|_| [None, None]).collect();
    for &(t, side) in &order {
        let mut s = connect(RELAY.parse::<SocketAddr>().unwrap());
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(s, "token-{t}\nfrom {t}/{side}\n").unwrap();
        ends[t][side] = Some(s);
    }
    for (t, [a, b]) in ends.iter().enumerate() {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        assert_eq!(hear_line(a), format!("from {t}/1"), "{dp}: token {t}\n{}", relay.log());
        assert_eq!(hear_line(b), format!("from {t}/0"), "{dp}: token {t}\n{}", relay.log());
    }
    assert_eq!(loops_used(&relay, 16).len(), 3, "{dp}: 16 live pairs use every loop\n{}", relay.log());
    let runs: Vec<_> = ends
        .into_iter()
        .enumerate()
        .map(|(t, [a, b])| {
            let (a, b, t) = (a.unwrap(), b.unwrap(), t as u64);
            thread::spawn(move || exchange_both_ways(a, b, [100 + t, 200 + t], 1 << 20, "token pair"))
        })
        .collect();
    runs.into_iter().for_each(|r| r.join().unwrap());
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}
per_datapath!(tokens_pair_exactly_across_loops);

/// SIGTERM while 6 pairs on 3 loops are mid-transfer: the process stays until the last of them
/// has finished, every byte arrives, and it exits 0.
fn a_drain_waits_for_the_pairs_of_every_loop(dp: &str) {
    let _netns = enter_netns();
    let mut relay = start_debug(&["relay", "--datapath", dp, "--threads", "3"], dp);
    let clients = paired_in_order(12, &relay);
    assert_eq!(loops_used(&relay, 6).len(), 3, "{}", relay.log());
    relay.signal(libc::SIGTERM);
    relay.wait_log("no longer accepting", 1, Duration::from_secs(5));
    thread::sleep(Duration::from_millis(300));
    assert!(relay.child.try_wait().unwrap().is_none(), "{dp}: exited with live pairs\n{}", relay.log());
    exchange_pairs(clients, 8 << 20, "draining pair");
    let status = relay.wait(Duration::from_secs(10));
    thread::sleep(Duration::from_millis(50));
    let log = relay.log();
    assert!(status.success(), "{dp}: {status}\n{log}");
    assert_eq!(log.matches(" ended after ").count(), 6, "{dp}:\n{log}");
    assert!(!log.contains("drain timeout"), "{dp}:\n{log}");
}
per_datapath!(a_drain_waits_for_the_pairs_of_every_loop);

/// SIGTERM with nothing live ends the process at once, however many loops: the front used to
/// look whether a worker's thread had finished right after the worker woke it, a moment before
/// the thread returned, and then slept until its next timer (3 s here, 2 rounds in 3 after a few
/// clients with bad token lines).
fn an_idle_stop_is_prompt_with_several_loops(dp: &str) {
    let _netns = enter_netns();
    for round in 0..5 {
        let mut relay = start_debug(&["relay", "--datapath", dp, "--pair", "token", "--threads", "4"], dp);
        for line in ["", "bin\x01ary", "a token longer than sixty-four bytes, which the relay refuses to read"] {
            let mut s = connect(RELAY.parse::<SocketAddr>().unwrap());
            // One write: the relay may close a client as soon as it has seen too much of a line,
            // and a second write would then meet the reset.
            let _ = s.write_all(format!("{line}\n").as_bytes());
        }
        relay.wait_log("bad token line", 3, Duration::from_secs(5));
        let asked = std::time::Instant::now();
        relay.signal(libc::SIGTERM);
        let status = relay.wait(Duration::from_secs(10));
        let took = asked.elapsed();
        assert!(status.success(), "{dp}: {status}\n{}", relay.log());
        assert!(took < Duration::from_secs(1), "{dp} round {round}: idle stop took {took:?}\n{}", relay.log());
    }
}
per_datapath!(an_idle_stop_is_prompt_with_several_loops);

/// Starts `skrelay ARGS --takeover PID` (debug log) and returns it.
fn taker(args: &[&str], old: &Skrelay, dp: &str) -> Skrelay {
    let pid = old.pid().to_string();
    let mut with = args.to_vec();
    with.extend(["--takeover", &pid]);
    start_debug(&with, dp)
}

/// 6 live pairs on 3 loops, each with bytes already through, are taken over by a process with 3
/// loops; the transfers go on and arrive whole; the old process exits.
fn a_takeover_moves_the_pairs_of_every_loop(dp: &str) {
    let _netns = enter_netns();
    let args = ["relay", "--datapath", dp, "--threads", "3"];
    let mut old = start_debug(&args, dp);
    let clients = paired_in_order(12, &old);
    assert_eq!(loops_used(&old, 6).len(), 3, "{}", old.log());
    let new = taker(&args, &old, dp);
    let status = old.wait(Duration::from_secs(10));
    thread::sleep(Duration::from_millis(50));
    let old_log = old.log();
    assert!(status.success(), "{dp}: the old process {status}\n{old_log}");
    assert!(old_log.contains("handing over 6 live pair(s)"), "{dp}: the count before, of every loop:\n{old_log}");
    assert!(old_log.contains("handed over 6 live pair(s)"), "{dp}:\n{old_log}");
    new.wait_log("took over 6 live pair(s)", 1, Duration::from_secs(5));
    exchange_pairs(clients, 8 << 20, "pair taken over");
    new.wait_log(" ended after ", 6, Duration::from_secs(10));
    let (status, log) = new.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}
per_datapath!(a_takeover_moves_the_pairs_of_every_loop);

/// The old process's kernel pairs are in the maps of 3 loops; a new process with 1 loop cannot
/// carry them on, says what to run instead, and the old process lets them finish, whole.
#[test]
fn a_takeover_by_fewer_loops_leaves_kernel_pairs_to_drain() {
    if !require_bpf("a_takeover_by_fewer_loops_leaves_kernel_pairs_to_drain") {
        return;
    }
    let _netns = enter_netns();
    let mut old = start_debug(&["relay", "--datapath", "kernel", "--threads", "3"], "kernel");
    let clients = paired_in_order(12, &old);
    let new = taker(&["relay", "--datapath", "kernel", "--threads", "1"], &old, "kernel");
    new.wait_log("keeps its live pairs", 1, Duration::from_secs(10));
    assert!(new.log().contains("start it with --threads 3"), "{}", new.log());
    old.wait_log("stay in this process", 1, Duration::from_secs(5));
    exchange_pairs(clients, 8 << 20, "pair left to drain");
    let status = old.wait(Duration::from_secs(10));
    assert!(status.success(), "{status}\n{}", old.log());
    let (status, log) = new.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

/// A process that may start no more tasks (`pids.max`, `TasksMax=`, `ulimit -u`) could not start
/// its loops' threads: it said "listening" (and READY) first, then failed with exit 1 and an OS
/// error (a helper's resource-limits pass). Now it fails before listening, exit 2, with the fix.
#[test]
fn a_process_that_may_start_no_threads_says_so_before_listening() {
    if !require_tool("a_process_that_may_start_no_threads_says_so_before_listening", "setpriv") {
        return;
    }
    let _netns = enter_netns();
    // RLIMIT_NPROC binds an unprivileged user only: nobody, with this process as its one task.
    let out = Command::new("prlimit")
        .args(["--nproc=1:1", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SKRELAY])
        .args(["relay", "--datapath", "userspace", "--threads", "3"])
        .output()
        .expect("prlimit (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!err.contains("listening"), "{err}");
    assert!(
        err.contains(
            "skrelay: cannot start the threads of 3 event loops: no more tasks allowed (raise the task limit: \
             pids.max of its cgroup, TasksMax= in the unit, or `ulimit -u`; or serve with fewer loops: --threads 1 runs \
             its one loop in the main thread)"
        ),
        "{err}"
    );
}
