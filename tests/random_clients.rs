//! Clients that behave at random, many pairs at once, on every datapath: write sizes from 1 byte
//! to 256 KiB, pauses in writing and in reading (slow readers hold their partner's bytes), lengths
//! from nothing to megabytes, bytes sent before the partner arrives, one side finishing long
//! before the other (half-close), and request/response turns. Whatever they do, each client gets
//! exactly what its partner sent, once and in order, then EOF. The seed is in every failure;
//! `SKRELAY_TEST_SEED=N cargo test --test random_clients` repeats a run.
#[macro_use]
mod common;
use common::*;
use sha2::{Digest, Sha256};
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

/// splitmix64: small, seedable, good enough to pick behaviours.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    /// 0..n
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// 1..=max, skewed towards small values (half the draws below max/16).
    fn size(&mut self, max: u64) -> u64 {
        let cap = if self.below(2) == 0 { (max / 16).max(1) } else { max };
        1 + self.below(cap)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// How one client behaves.
#[derive(Clone, Debug)]
struct Client {
    /// Bytes it sends (pattern `seed`), in writes of 1..=`write_max`, then shuts down its write side.
    len: u64,
    write_max: u64,
    /// After about this many bytes written, it sleeps `write_pause_ms` (0: never).
    write_pause_every: u64,
    write_pause_ms: u64,
    /// Reads of 1..=`read_max` bytes; after about this many bytes read, it sleeps `read_pause_ms`.
    read_max: u64,
    read_pause_every: u64,
    read_pause_ms: u64,
    /// Before its first read (a reader that starts late: its partner's bytes wait for it).
    read_start_ms: u64,
    /// Request/response turns before the stream: in turn i the first client sends `turns[i]`
    /// bytes and the second answers with `turns[i]` bytes after reading them all.
    turns: Vec<u64>,
}

impl Client {
    fn random(rng: &mut Rng, turns: &[u64]) -> Client {
        let len = match rng.below(4) {
            0 => rng.below(4096),
            1 => rng.size(1 << 20),
            _ => rng.size(6 << 20),
        };
        Client {
            len,
            write_max: rng.size(256 << 10),
            write_pause_every: if rng.chance(40) { rng.size(2 << 20) } else { 0 },
            write_pause_ms: rng.below(30),
            read_max: rng.size(256 << 10),
            read_pause_every: if rng.chance(40) { rng.size(2 << 20) } else { 0 },
            read_pause_ms: rng.below(60),
            read_start_ms: if rng.chance(25) { rng.below(400) } else { 0 },
            turns: turns.to_vec(),
        }
    }
}

/// Pattern bytes of `seed` from offset 0 on, handed out in pieces of any size.
struct Source {
    pattern: Pattern,
    block: Vec<u8>,
    at: usize,
    hash: Sha256,
}

impl Source {
    fn new(seed: u64) -> Source {
        Source { pattern: Pattern::new(seed), block: Vec::new(), at: 0, hash: Sha256::new() }
    }

    /// The next `n` bytes at most (fewer at a block's end), hashed as sent.
    fn take(&mut self, n: usize) -> &[u8] {
        if self.at == self.block.len() {
            self.block = vec![0u8; 64 << 10];
            self.pattern.fill(&mut self.block);
            self.at = 0;
        }
        let end = (self.at + n).min(self.block.len());
        let piece = &self.block[self.at..end];
        self.hash.update(piece);
        self.at = end;
        piece
    }
}

fn write_n(
    s: &mut TcpStream,
    src: &mut Source,
    n: u64,
    max: u64,
    rng: &mut Rng,
    pause: (u64, u64),
) -> std::io::Result<()> {
    let (mut left, mut since_pause) = (n, 0u64);
    while left > 0 {
        let want = rng.size(max).min(left) as usize;
        let piece = src.take(want);
        s.write_all(piece)?;
        left -= piece.len() as u64;
        since_pause += piece.len() as u64;
        if pause.0 > 0 && since_pause >= pause.0 {
            since_pause = 0;
            thread::sleep(Duration::from_millis(pause.1));
        }
    }
    Ok(())
}

/// Reads exactly `n` bytes (or to EOF when `n` is None) into `hash`; returns how many came.
fn read_n(s: &mut TcpStream, n: Option<u64>, c: &Client, rng: &mut Rng, hash: &mut Sha256) -> std::io::Result<u64> {
    let mut buf = vec![0u8; c.read_max as usize];
    let (mut got, mut since_pause) = (0u64, 0u64);
    while n.is_none_or(|n| got < n) {
        let mut want = rng.size(c.read_max) as usize;
        if let Some(n) = n {
            want = want.min((n - got) as usize);
        }
        let k = s.read(&mut buf[..want])?;
        if k == 0 {
            break;
        }
        hash.update(&buf[..k]);
        got += k as u64;
        since_pause += k as u64;
        if c.read_pause_every > 0 && since_pause >= c.read_pause_every {
            since_pause = 0;
            thread::sleep(Duration::from_millis(c.read_pause_ms));
        }
    }
    Ok(got)
}

/// What one client sent and received: (bytes sent, sha256 sent, bytes received, sha256 received).
type Outcome = Result<(u64, String, u64, String), String>;

/// Runs client `c` on `s`: the turns (as first or second), then its stream and its reading at
/// once, until its partner's EOF.
fn run_client(s: TcpStream, c: Client, seed: u64, first: bool, rng_seed: u64) -> Outcome {
    let hex = |h: Sha256| h.finalize().iter().map(|b| format!("{b:02x}")).collect::<String>();
    s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    let mut rng = Rng(rng_seed);
    let mut src = Source::new(seed);
    let mut received = Sha256::new();
    let mut s = s;
    let mut sent = 0u64;
    let mut got = 0u64;
    for (i, &n) in c.turns.iter().enumerate() {
        if first {
            write_n(&mut s, &mut src, n, c.write_max, &mut rng, (0, 0)).map_err(|e| format!("turn {i} send: {e}"))?;
            sent += n;
        }
        let k = read_n(&mut s, Some(n), &c, &mut rng, &mut received).map_err(|e| format!("turn {i} read: {e}"))?;
        got += k;
        if k < n {
            return Err(format!("turn {i}: EOF after {k} of {n} bytes"));
        }
        if !first {
            write_n(&mut s, &mut src, n, c.write_max, &mut rng, (0, 0)).map_err(|e| format!("turn {i} answer: {e}"))?;
            sent += n;
        }
    }
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let plan = c.clone();
    let mut wrng = Rng(rng.next());
    let writer = thread::spawn(move || {
        write_n(&mut w, &mut src, plan.len, plan.write_max, &mut wrng, (plan.write_pause_every, plan.write_pause_ms))
            .and_then(|()| w.shutdown(Shutdown::Write))
            .map(|()| src.hash)
            .map_err(|e| format!("stream send: {e}"))
    });
    thread::sleep(Duration::from_millis(c.read_start_ms));
    let k =
        read_n(&mut s, None, &c, &mut rng, &mut received).map_err(|e| format!("stream read after {got} bytes: {e}"));
    let sent_hash = writer.join().map_err(|_| "writer panicked".to_string())??;
    got += k?;
    Ok((sent + c.len, hex(sent_hash), got, hex(received)))
}

fn test_seed() -> u64 {
    std::env::var("SKRELAY_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    })
}

/// `pairs` pairs of random clients through a relay started with `args`, in rounds of `at_once`.
fn random_pairs(args: &[&str], pairs: usize, at_once: usize) {
    let seed = test_seed();
    let what = format!("skrelay {} (SKRELAY_TEST_SEED={seed})", args.join(" "));
    eprintln!("{what}");
    let _netns = enter_netns();
    let mut argv = vec!["relay"];
    argv.extend_from_slice(args);
    let relay = Skrelay::start(&argv);
    let addr: SocketAddr = "127.0.0.1:7777".parse().unwrap();
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut failures = Vec::new();
    let token = args.contains(&"token");
    for round in 0..pairs.div_ceil(at_once) {
        let mut running = Vec::new();
        for i in 0..at_once.min(pairs - round * at_once) {
            let id = round * at_once + i;
            let turns: Vec<u64> =
                if rng.chance(35) { (0..1 + rng.below(20)).map(|_| rng.size(48 << 10)).collect() } else { Vec::new() };
            let plans = [Client::random(&mut rng, &turns), Client::random(&mut rng, &turns)];
            let seeds = [rng.next(), rng.next()];
            let rng_seeds = [rng.next(), rng.next()];
            running.push((id, plans, seeds, rng_seeds, [None, None]));
        }
        // In order the relay pairs the 1st client with the 2nd, so each pair connects in turn;
        // with tokens every client of the round connects in a random order and says its pair's
        // token first. Either way a client starts its turns (or stream) before its partner may
        // have come: those bytes wait for it.
        let mut order: Vec<(usize, usize)> = (0..running.len()).flat_map(|i| [(i, 0), (i, 1)]).collect();
        if token {
            for k in (1..order.len()).rev() {
                order.swap(k, rng.below(k as u64 + 1) as usize);
            }
        }
        for (i, end) in order {
            let (id, plans, seeds, rng_seeds, handles) = &mut running[i];
            let mut s = connect(addr);
            if token {
                s.write_all(format!("pair-{id}\n").as_bytes()).unwrap();
            }
            let (c, sd, rs) = (plans[end].clone(), seeds[end], rng_seeds[end]);
            handles[end] = Some(thread::spawn(move || run_client(s, c, sd, end == 0, rs)));
        }
        let running: Vec<_> = running
            .into_iter()
            .map(|(id, plans, seeds, _, handles)| (id, plans, seeds, handles.map(|h| h.expect("connected"))))
            .collect();
        for (id, plans, seeds, handles) in running {
            let out: Vec<Outcome> = handles.map(|h| h.join().unwrap_or(Err("panicked".into()))).into();
            let ok = match (&out[0], &out[1]) {
                (Ok(a), Ok(b)) => a.0 == b.2 && a.1 == b.3 && b.0 == a.2 && b.1 == a.3,
                _ => false,
            };
            if !ok {
                failures.push(format!("pair {id}: {out:?}\n  seeds {seeds:?}\n  A {:?}\n  B {:?}", plans[0], plans[1]));
            }
        }
    }
    let (status, log) = relay.stop(Duration::from_secs(20));
    assert!(
        failures.is_empty(),
        "{what}: {} of {pairs} pairs damaged (sent len, sha; received len, sha):\n{}\n{log}",
        failures.len(),
        failures.join("\n")
    );
    assert!(status.success(), "{what}\n{log}");
    eprintln!("{what}: {pairs} pairs whole in {:.1?}", started.elapsed());
}

fn random_clients_get_every_byte_once_in_order(dp: &str) {
    random_pairs(&["--datapath", dp], 48, 16);
}

per_datapath!(random_clients_get_every_byte_once_in_order);

/// The same with every pair in the socket maps from its first byte.
#[test]
fn random_clients_get_every_byte_once_in_order_with_kernel_after_0() {
    if require_bpf("random_clients_get_every_byte_once_in_order_with_kernel_after_0") {
        random_pairs(&["--datapath", "kernel", "--kernel-after", "0"], 48, 16);
    }
}

/// The same with small per-direction budgets, so that slow readers park bytes at the budget and
/// user space catches them up.
#[test]
fn random_clients_get_every_byte_once_in_order_past_a_small_kernel_buffer() {
    if require_bpf("random_clients_get_every_byte_once_in_order_past_a_small_kernel_buffer") {
        random_pairs(&["--datapath", "kernel", "--kernel-after", "0", "--kernel-buffer", "64K"], 48, 16);
    }
}

/// Clients paired by a token line, arriving in a random order.
fn random_clients_paired_by_token_get_every_byte_once_in_order(dp: &str) {
    random_pairs(&["--datapath", dp, "--pair", "token"], 48, 16);
}

per_datapath!(random_clients_paired_by_token_get_every_byte_once_in_order);
