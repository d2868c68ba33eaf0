//! Shared test fixture: a private network namespace per test, the skrelay binary as a child
//! process with its log captured, deterministic payloads checked by sha256, and the rule that a
//! test needing BPF fails under CI=true instead of skipping.
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::{
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

pub const SKRELAY: &str = env!("CARGO_BIN_EXE_skrelay");

/// The calling thread's stay in a private network namespace: entered by `enter_netns`, left
/// (back to the namespace the thread came from) when dropped, panics included. Bind it for the
/// whole test: `let _netns = enter_netns();` (`let _ = ...` would leave at once).
#[must_use = "the thread leaves the namespace when this guard drops: bind it with `let _netns = ...`"]
pub struct NetNs {
    original: std::fs::File,
}

/// Moves the calling thread (and the threads and processes it starts) into a fresh network
/// namespace with `lo` up, so tests never touch the host's ports or sk_lookup programs, until
/// the returned guard drops.
pub fn enter_netns() -> NetNs {
    let original = std::fs::File::open("/proc/thread-self/ns/net").expect("open this thread's network namespace");
    // SAFETY: unshare(2) takes flags only; CLONE_NEWNET moves just the calling thread.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "unshare(CLONE_NEWNET) failed: {} (tests must run as root)", std::io::Error::last_os_error());
    let guard = NetNs { original };
    let st = Command::new("ip").args(["link", "set", "lo", "up"]).status().expect("run ip (scripts/setup.sh)");
    assert!(st.success(), "ip link set lo up failed");
    skrelay::sys::raise_fd_limit();
    guard
}

impl Drop for NetNs {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: setns(2) takes a descriptor we own for the call and flags only.
        let r = unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        if r != 0 && !std::thread::panicking() {
            panic!("cannot return to the original network namespace: {}", std::io::Error::last_os_error());
        }
    }
}

/// The inode of the calling thread's network namespace (what bpftool prints as `netns_ino` and
/// skrelay names its pinned steering state by).
pub fn netns_ino() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
}

/// The sk_lookup links attached to this thread's network namespace, as `bpftool link` shows them.
pub fn sk_lookup_links() -> usize {
    let out = Command::new("bpftool").args(["link", "show"]).output().expect("run bpftool (scripts/setup.sh)");
    assert!(out.status.success(), "bpftool link show failed");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().filter(|l| l.contains(&format!("netns_ino {} ", netns_ino())) && l.contains("sk_lookup")).count()
}

/// Where cgroup v2 is mounted, found as skrelay finds it (/proc/self/mountinfo).
pub fn cgroup_v2_mount() -> std::path::PathBuf {
    skrelay::accel::cgroup::v2_mount().unwrap_or_else(|e| panic!("{e}"))
}

/// True when this process can load BPF programs. When it cannot: under CI=true the test fails
/// (a missing capability must not pass silently); elsewhere the test is skipped with a note.
pub fn require_bpf(test: &str) -> bool {
    let probe = Command::new(SKRELAY).arg("probe").output().expect("run skrelay probe");
    if probe.status.success() {
        return true;
    }
    let why = String::from_utf8_lossy(&probe.stderr).trim().to_string();
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: BPF is unavailable under CI=true: {why}");
    }
    eprintln!("SKIPPED {test}: BPF unavailable: {why}");
    false
}

/// The datapaths a test runs on: both where BPF works, else userspace (see `require_bpf`).
pub fn datapaths(test: &str) -> Vec<&'static str> {
    if require_bpf(test) {
        vec!["kernel", "userspace"]
    } else {
        vec!["userspace"]
    }
}

/// One test case per datapath: `per_datapath!(name);` next to `fn name(dp: &str)` defines the
/// test cases `name::kernel` and `name::userspace`, each calling `name` with its datapath. The
/// kernel case follows `require_bpf`: it fails under CI=true where BPF is unavailable, and is
/// skipped with a note elsewhere. (Use with `#[macro_use] mod common;`.)
#[allow(unused_macros)]
macro_rules! per_datapath {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[test]
            fn kernel() {
                if $crate::common::require_bpf(concat!(stringify!($name), "::kernel")) {
                    super::$name("kernel");
                }
            }

            #[test]
            fn userspace() {
                super::$name("userspace");
            }
        }
    )+};
}

/// One scrape of a relay's or proxy's `--metrics` endpoint, parsed: each sample (its name with
/// its labels, as written: `skrelay_pairs_total{datapath="kernel",ending="eof"}`) and its value.
pub struct Scrape {
    pub text: String,
    samples: std::collections::BTreeMap<String, u64>,
}

impl Scrape {
    pub fn parse(text: String) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (key, value) = l.rsplit_once(' ')?;
                Some((key.to_string(), value.parse::<f64>().ok()? as u64))
            })
            .collect();
        Scrape { text, samples }
    }

    /// The value of sample `key`; a sample the process does not export fails the test (so a
    /// misspelt name cannot pass as 0).
    pub fn get(&self, key: &str) -> u64 {
        *self.samples.get(key).unwrap_or_else(|| panic!("no sample `{key}` in the scrape:\n{}", self.text))
    }

    /// The value of a sample whose labels appear on first use (`skrelay_pair_paths_total`): 0
    /// when absent.
    pub fn count(&self, key: &str) -> u64 {
        self.samples.get(key).copied().unwrap_or(0)
    }

    /// The sum over every label set of metric `name` (`skrelay_pairs_total`: every pair ended).
    pub fn sum(&self, name: &str) -> u64 {
        let prefix = format!("{name}{{");
        let sum: u64 = self.samples.iter().filter(|(k, _)| k.starts_with(&prefix) || *k == name).map(|(_, v)| v).sum();
        assert!(
            self.samples.keys().any(|k| k.starts_with(&prefix) || k == name),
            "no metric `{name}` in the scrape:\n{}",
            self.text
        );
        sum
    }

    /// Pairs that ended on `datapath` (`kernel` or `userspace`), however they ended.
    pub fn pairs_ended(&self, datapath: &str) -> u64 {
        ["eof", "reset", "timeout", "drain"]
            .iter()
            .map(|e| self.get(&format!("skrelay_pairs_total{{datapath=\"{datapath}\",ending=\"{e}\"}}")))
            .sum()
    }

    /// Pairs that ended on `datapath` the way `ending` names (eof, reset, timeout, drain).
    pub fn pairs(&self, datapath: &str, ending: &str) -> u64 {
        self.get(&format!("skrelay_pairs_total{{datapath=\"{datapath}\",ending=\"{ending}\"}}"))
    }

    /// Payload bytes of the pairs that ended on `datapath`, both directions together.
    pub fn bytes(&self, datapath: &str) -> u64 {
        self.get(&format!("skrelay_bytes_total{{datapath=\"{datapath}\"}}"))
    }

    /// Pairs that ended carried the way `path` says (`kernel, after a userspace start`, ...).
    pub fn paths(&self, path: &str) -> u64 {
        self.count(&format!("skrelay_pair_paths_total{{path=\"{path}\"}}"))
    }
}

/// GET http://ADDR/metrics: the body of a 200 answer.
pub fn scrape(addr: SocketAddr) -> Scrape {
    let mut s = connect(addr);
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: skrelay\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap_or_else(|e| panic!("read the metrics of {addr}: {e}"));
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP answer: {answer}"));
    assert!(head.starts_with("HTTP/1.1 200"), "metrics of {addr}: {head}\n{body}");
    Scrape::parse(body.to_string())
}

/// A running skrelay process whose stderr is collected.
pub struct Skrelay {
    pub child: Child,
    log: Arc<Mutex<String>>,
}

impl Skrelay {
    /// Starts `skrelay ARGS` and waits until it logs that it listens (or exits).
    pub fn start(args: &[&str]) -> Skrelay {
        Self::start_until(args, "listening on")
    }

    /// Starts `skrelay ARGS` and waits until its log contains `ready`.
    ///
    /// A kernel-datapath relay or proxy gets `--kernel-after 0` unless the test says otherwise:
    /// the tests check the kernel maps' semantics from a pair's first byte, where by default a
    /// pair joins them only after 64 KiB (tested through `spawn`, which adds nothing).
    pub fn start_until(args: &[&str], ready: &str) -> Skrelay {
        let mut cmd = Command::new(SKRELAY);
        cmd.args(args);
        let kernel = args.windows(2).any(|w| w == ["--datapath", "kernel"]);
        if kernel && !args.iter().any(|a| a.starts_with("--kernel-after")) {
            cmd.args(["--kernel-after", "0"]);
        }
        Self::spawn(cmd, ready)
    }

    /// Starts a command that runs skrelay (e.g. under setpriv) and waits for `ready` in its log.
    pub fn spawn(mut cmd: Command, ready: &str) -> Skrelay {
        let args = format!("{cmd:?}");
        // A test that sets RUST_LOG itself (to read debug lines) keeps it.
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", std::env::var("SKRELAY_TEST_LOG").unwrap_or_else(|_| "info".into()));
        }
        let mut child =
            cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn skrelay");
        let log = Arc::new(Mutex::new(String::new()));
        for pipe in
            [Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stdout.take().unwrap())]
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        let mut s = Skrelay { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !s.log().contains(ready) {
            if let Ok(Some(status)) = s.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                panic!("{args} exited with {status} before `{ready}`:\n{}", s.log());
            }
            assert!(Instant::now() < deadline, "{args} did not log `{ready}`:\n{}", s.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        s
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `text` `count` times.
    pub fn wait_log(&self, text: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.log().matches(text).count() < count {
            assert!(Instant::now() < deadline, "log never had {count}x `{text}`:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Where this relay or proxy (started with `--metrics ADDR`) serves its metrics, as its start
    /// line says (`metrics at http://ADDR/metrics`).
    pub fn metrics_addr(&self) -> SocketAddr {
        let log = self.log();
        let at = log
            .find("metrics at http://")
            .unwrap_or_else(|| panic!("no metrics address (start with --metrics):\n{log}"));
        let url = log[at + "metrics at http://".len()..].split_whitespace().next().unwrap();
        url.trim_end_matches("/metrics").parse().unwrap_or_else(|e| panic!("metrics address {url}: {e}"))
    }

    /// A scrape of this relay's or proxy's metrics (started with `--metrics 127.0.0.1:0`).
    pub fn metrics(&self) -> Scrape {
        scrape(self.metrics_addr())
    }

    /// Scrapes until `done` holds for the scrape, at most `timeout`; returns that scrape.
    pub fn wait_metrics(&self, what: &str, timeout: Duration, done: impl Fn(&Scrape) -> bool) -> Scrape {
        let addr = self.metrics_addr();
        let deadline = Instant::now() + timeout;
        loop {
            let m = scrape(addr);
            if done(&m) {
                return m;
            }
            assert!(Instant::now() < deadline, "the metrics never showed {what}:\n{}\nlog:\n{}", m.text, self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until at least `n` pairs ended (every datapath, every ending); returns that scrape.
    pub fn wait_pairs_ended(&self, n: u64, timeout: Duration) -> Scrape {
        self.wait_metrics(&format!("{n} pairs ended"), timeout, |m| m.sum("skrelay_pairs_total") >= n)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) takes integers only; the child is not reaped while `self` lives.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Sends SIGTERM and waits (at most `timeout`) for the exit status.
    pub fn stop(mut self, timeout: Duration) -> (ExitStatus, String) {
        self.signal(libc::SIGTERM);
        let status = self.wait(timeout);
        std::thread::sleep(Duration::from_millis(50));
        (status, self.log())
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("skrelay did not exit within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Skrelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process (a real client or server) that is killed when the test ends, however it ends.
pub struct Reaper(pub std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `skrelay ARGS` to completion: (exit code, stdout, stderr).
pub fn skrelay_output(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(SKRELAY).args(args).output().expect("run skrelay");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `skrelay ARGS`, asserts it succeeded, and returns its stdout.
pub fn skrelay_ok(args: &[&str]) -> String {
    let (code, out, err) = skrelay_output(args);
    assert_eq!(code, 0, "skrelay {args:?} failed:\n{out}{err}");
    out
}

/// A deterministic, non-repeating byte stream: every 8-byte word is a function of the seed and
/// its offset, so a lost, duplicated or reordered block changes the hash.
pub struct Pattern {
    seed: u64,
    offset: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern { seed, offset: 0 }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        assert!(buf.len().is_multiple_of(8), "pattern chunks must be multiples of 8 bytes");
        for (i, chunk) in buf.chunks_mut(8).enumerate() {
            let word = splitmix(self.seed ^ (self.offset / 8 + i as u64));
            chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
        }
        self.offset += buf.len() as u64;
    }
}

/// A client that writes pattern `seed` on a nonblocking socket while it takes bytes, and hashes
/// what it wrote: the sender of a partner that does not read (tests/thousand_stalled_pairs.rs,
/// tests/tcp_memory.rs).
pub struct PatternSender {
    pub stream: TcpStream,
    pattern: Pattern,
    chunk: Vec<u8>,
    at: usize,
    /// Bytes written so far.
    pub pushed: u64,
    /// sha256 of them.
    pub sha: Sha256,
}

impl PatternSender {
    pub fn new(stream: TcpStream, seed: u64) -> Self {
        stream.set_nonblocking(true).unwrap();
        PatternSender {
            stream,
            pattern: Pattern::new(seed),
            chunk: vec![0u8; 64 * 1024],
            at: 64 * 1024,
            pushed: 0,
            sha: Sha256::new(),
        }
    }

    /// Writes until the socket would block; bytes written. A write error fails the test.
    pub fn push(&mut self) -> u64 {
        let mut n = 0;
        loop {
            if self.at == self.chunk.len() {
                self.pattern.fill(&mut self.chunk);
                self.at = 0;
            }
            match self.stream.write(&self.chunk[self.at..]) {
                Ok(k) => {
                    self.sha.update(&self.chunk[self.at..self.at + k]);
                    self.at += k;
                    self.pushed += k as u64;
                    n += k as u64;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return n,
                Err(e) => panic!("a sender's write failed after {} bytes: {e}", self.pushed),
            }
        }
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

/// Writes `mib` MiB of pattern `seed` in 1 MiB writes (as the clients that found the reset bugs
/// did; `send_pattern` writes 64 KiB at a time), stopping at the first error.
pub fn send_pattern_mib(w: &mut impl Write, seed: u64, mib: u64) -> std::io::Result<()> {
    let mut block = vec![0u8; 1 << 20];
    let mut pattern = Pattern::new(seed);
    for _ in 0..mib {
        pattern.fill(&mut block);
        w.write_all(&block)?;
    }
    Ok(())
}

/// sha256 of the first `len` bytes of pattern `seed`.
pub fn pattern_sha(seed: u64, len: u64) -> String {
    send_pattern(&mut std::io::sink(), seed, len).expect("a sink takes every byte")
}

/// Writes `len` bytes of pattern `seed`; returns their sha256.
pub fn send_pattern(w: &mut impl Write, seed: u64, len: u64) -> std::io::Result<String> {
    let mut p = Pattern::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(hex(&h.finalize()))
}

/// Sends `len` bytes of pattern `seed` from `s` and then shuts down its write side, while reading
/// everything from `s` to EOF: (sha sent, (bytes received, sha received)).
pub fn exchange(s: std::net::TcpStream, seed: u64, len: u64) -> std::thread::JoinHandle<(String, (u64, String))> {
    std::thread::spawn(move || {
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let sha = send_pattern(&mut w, seed, len).expect("send");
            w.shutdown(std::net::Shutdown::Write).unwrap();
            sha
        });
        let mut r = s;
        let got = recv_all(&mut r).expect("receive");
        (writer.join().unwrap(), got)
    })
}

/// Sends `len` bytes of pattern each way between `a` and `b` at once (`seeds[0]` from A,
/// `seeds[1]` from B), each shutting down its write side after its bytes, and asserts that each
/// side got exactly what the other sent, then EOF. `what` names the case in the failure.
pub fn exchange_both_ways(a: std::net::TcpStream, b: std::net::TcpStream, seeds: [u64; 2], len: u64, what: &str) {
    let (ja, jb) = (exchange(a, seeds[0], len), exchange(b, seeds[1], len));
    let (sent_a, got_a) = ja.join().unwrap();
    let (sent_b, got_b) = jb.join().unwrap();
    assert_eq!(got_b, (len, sent_a), "{what}: A -> B");
    assert_eq!(got_a, (len, sent_b), "{what}: B -> A");
}

/// Reads to EOF: (bytes, sha256).
pub fn recv_all(r: &mut impl Read) -> std::io::Result<(u64, String)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok((total, hex(&h.finalize()))),
            Ok(n) => {
                h.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

pub fn sha(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Connects a client to `addr` and reads one byte: how a client the relay resets at once sees it.
/// The reset can come before connect(2) returns (the relay accepts and resets within microseconds
/// on loopback, and a loaded machine may not run this thread in between), which then reports it.
pub fn first_read_of_a_client_of(addr: SocketAddr) -> std::io::Result<usize> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(5)).and_then(|mut c| {
        c.set_read_timeout(Some(Duration::from_secs(15)))?;
        c.read(&mut [0u8; 1])
    })
}

/// Connects with a deadline and read/write timeouts so a broken relay fails the test, not hangs it.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    // Short enough that a stalled relay fails the test instead of passing late.
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

/// Reads exactly `n` bytes.
pub fn read_n(s: &mut impl Read, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap_or_else(|e| panic!("read {n} bytes: {e}"));
    v
}

/// Asserts the next read sees EOF.
pub fn expect_eof(s: &mut TcpStream) {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => {}
        other => panic!("expected EOF, got {other:?}"),
    }
}

/// Sends `bytes` and reads one answer: Err(ConnectionReset) if the peer reset the connection,
/// seen on the write or on the read. A reset that comes before the write is reported by the
/// write, once (SO_ERROR is cleared), and the read after it sees 0: taking that 0 for a clean EOF
/// failed a CI run whose client was descheduled between its connect and its write.
pub fn send_then_read(s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<usize> {
    if let Err(e) = s.write_all(bytes) {
        if e.kind() == std::io::ErrorKind::ConnectionReset {
            return Err(e);
        }
    }
    s.read(&mut [0u8; 64])
}

/// Free port on 127.0.0.1 in this netns (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// True when `tool` is installed (scripts/setup.sh installs it). Missing under CI=true fails the
/// test; elsewhere it is skipped with a note.
pub fn require_tool(test: &str, tool: &str) -> bool {
    let found =
        Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "{test}: {tool} is missing under CI=true (run scripts/setup.sh)"
        );
        eprintln!("SKIPPED {test}: {tool} is not installed (scripts/setup.sh installs it)");
    }
    found
}

/// iperf3's summary (sum_sent / sum_received and, for --bidir, the reverse pair) in bytes.
pub fn iperf3_bytes(json: &serde_json::Value) -> Vec<(u64, u64)> {
    let end = &json["end"];
    let pair = |s: &str, r: &str| (end[s]["bytes"].as_u64().unwrap_or(0), end[r]["bytes"].as_u64().unwrap_or(0));
    let mut out = vec![pair("sum_sent", "sum_received")];
    if end.get("sum_sent_bidir_reverse").is_some() {
        out.push(pair("sum_sent_bidir_reverse", "sum_received_bidir_reverse"));
    }
    out
}

/// Bytes outstanding on a socket, sent or not, until its peer acknowledges them (SIOCOUTQ).
pub fn unacked(s: &std::net::TcpStream) -> i32 {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (= SIOCOUTQ) writes one int through the pointer, a live local.
    assert_eq!(unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) }, 0);
    n
}

/// Bytes received on a socket and not yet read (SIOCINQ).
pub fn unread(s: &std::net::TcpStream) -> i32 {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD (= SIOCINQ) writes one int through the pointer, a live local.
    assert_eq!(unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) }, 0);
    n
}

/// The send queue (`ss` Send-Q: written, not yet acknowledged) of the established socket of this
/// network namespace whose peer is `peer`, e.g. the relay's socket toward a test client; 0 when
/// there is none.
pub fn send_queue_toward(peer: std::net::SocketAddr) -> u64 {
    let out = std::process::Command::new("ss")
        .args(["-tnH", "state", "established", "dst", &peer.to_string()])
        .output()
        .expect("ss");
    // With a state filter the columns are Recv-Q Send-Q Local Peer.
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()).sum()
}

/// Waits until `len` bytes on their way to the client `b` have reached b's receive queue or the
/// relay's send queue toward b; panics, naming `what`, after 5 s. On the kernel datapath, bytes
/// that b's window does not take park in the sender's socket on the relay, and a reset of the
/// sender loses them there (KERNEL-NOTES item 12) until the relay shelters them in b's send
/// queue, within milliseconds: a test that means to check what a reset leaves whole resets after
/// this, not in the race before it.
pub fn wait_out_of_the_senders_socket(b: &std::net::TcpStream, len: u64, what: &str) {
    wait_out_of_the_senders_socket_while_read(b, len, &AtomicU64::new(0), what)
}

/// `wait_out_of_the_senders_socket` while b's reader reads (`read_until_end_counting` counts
/// what it has read in `read`).
pub fn wait_out_of_the_senders_socket_while_read(b: &std::net::TcpStream, len: u64, read: &AtomicU64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let out = || read.load(Ordering::Acquire) + (unread(b) as u64) + send_queue_toward(b.local_addr().unwrap());
    while out() < len {
        assert!(Instant::now() < deadline, "{what} never left the sender's socket on the relay");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until the peer has acknowledged everything `s` sent; panics, naming `what`, after
/// `timeout`.
pub fn wait_acked(s: &std::net::TcpStream, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while unacked(s) > 0 {
        assert!(Instant::now() < deadline, "the peer never took {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Writes `len` pattern bytes (seed `seed`), waits until the peer has acknowledged all of them,
/// then resets the connection (SO_LINGER 0 close). Returns their sha256.
pub fn send_then_reset(mut s: std::net::TcpStream, seed: u64, len: u64) -> String {
    let want = send_pattern(&mut s, seed, len).unwrap();
    wait_acked(&s, Duration::from_secs(5), &format!("all {len} bytes"));
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
    want
}

/// Reads until the stream ends: every byte read, then how it ended (Ok at EOF, the error at a
/// reset).
pub fn read_until_end(s: &mut std::net::TcpStream) -> (Vec<u8>, std::io::Result<()>) {
    read_until_end_counting(s, &AtomicU64::new(0))
}

/// `read_until_end`, counting what it has read so far in `read`, for another thread to see.
pub fn read_until_end_counting(s: &mut std::net::TcpStream, read: &AtomicU64) -> (Vec<u8>, std::io::Result<()>) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, Ok(())),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                read.store(got.len() as u64, Ordering::Release);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (got, Err(e)),
        }
    }
}

/// Serves `listener` as an echo server on threads of this test: each connection gets back what
/// it sends, and an EOF after its own.
pub fn serve_echo(listener: std::net::TcpListener) {
    std::thread::spawn(move || {
        for c in listener.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = c.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

/// skrelay run as user nobody with exactly `caps` (setpriv's form, e.g. "+bpf,+net_admin"), as a
/// service user would run it: inherited, ambient and bounding sets all set to them.
pub fn skrelay_as_nobody(caps: &str) -> Command {
    let caps = format!("-all,{caps}");
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args([format!("--inh-caps={caps}"), format!("--ambient-caps={caps}"), format!("--bounding-set={caps}")])
        .arg(SKRELAY);
    c
}
