//! Load generator for `scripts/bench.sh` (issue 6); the `report` subcommand is in report.rs.
//! Not part of `cargo test`.
//!
//! Both ends of every measurement live in this process, a "client" and a "server" thread. What
//! lies between them (`--via`) is direct loopback, a relay (both ends are clients of the relay, and
//! order pairing makes the 1st and 2nd connection a pair) or a proxy-like contender (the client
//! connects to it and it connects to the server, which listens on `--upstream`). Each measuring
//! subcommand prints one line of `key=value` figures on stdout for bench.sh to collect.
mod report;

use clap::{Args, Parser, Subcommand, ValueEnum};
use report::ReportArgs;
use sha2::{Digest, Sha256};
use std::{
    fs,
    io::{self, BufRead, BufReader, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Barrier,
    },
    thread,
    time::{Duration, Instant},
};

#[derive(Parser)]
#[command(about = "skrelay benchmark load generator (run through scripts/bench.sh)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send --bytes one way, sha256-checked after the clock stops; CPU counted machine-wide.
    Bulk(BulkArgs),
    /// 64-byte ping-pong: warm-up, then timed round trips; p50/p99.
    Pingpong(PingArgs),
    /// Connections per second: connect, 1 byte each way through to the server, close.
    ConnectRate(ConnectArgs),
    /// Hold idle pairs open and report the relay process's RSS per pair.
    IdlePairs(IdleArgs),
    #[command(hide = true)]
    IdleWorker(WorkerArgs),
    /// Turn bench.sh's results into BENCHMARKS.md and the chart's data.
    Report(ReportArgs),
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
enum Via {
    Direct,
    Relay,
    Proxy,
}

#[derive(Args, Clone, Debug)]
struct PathArgs {
    #[arg(long, value_enum, default_value_t = Via::Direct)]
    via: Via,
    /// The relay's or proxy's listening address.
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// Where the server end listens (the proxy's upstream); for direct, any free port will do.
    #[arg(long, default_value = "127.0.0.1:0")]
    upstream: SocketAddr,
}

impl PathArgs {
    fn target(&self) -> io::Result<SocketAddr> {
        self.addr.ok_or_else(|| io::Error::other("--addr is needed with --via relay|proxy"))
    }

    fn to_args(&self) -> Vec<String> {
        let mut v = vec!["--via".into(), format!("{:?}", self.via).to_lowercase(), "--upstream".into()];
        v.push(self.upstream.to_string());
        if let Some(a) = self.addr {
            v.extend(["--addr".into(), a.to_string()]);
        }
        v
    }
}

#[derive(Args)]
struct BulkArgs {
    #[command(flatten)]
    path: PathArgs,
    #[arg(long, default_value_t = 1 << 30)]
    bytes: usize,
}

#[derive(Args)]
struct PingArgs {
    #[command(flatten)]
    path: PathArgs,
    #[arg(long, default_value_t = 20_000)]
    round_trips: usize,
    #[arg(long, default_value_t = 2_000)]
    warmup: usize,
}

#[derive(Args)]
struct ConnectArgs {
    #[command(flatten)]
    path: PathArgs,
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    #[arg(long, default_value_t = 2)]
    clients: usize,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    path: PathArgs,
    #[arg(long, default_value_t = 10_000)]
    pairs: usize,
    /// The process whose memory is measured (the relay or proxy).
    #[arg(long)]
    pid: u32,
    /// Pairs per worker process (each holds 2 descriptors per pair; RLIMIT_NOFILE caps one process).
    #[arg(long, default_value_t = 2_500)]
    per_worker: usize,
}

#[derive(Args)]
struct WorkerArgs {
    #[command(flatten)]
    path: PathArgs,
    #[arg(long)]
    pairs: usize,
}

fn main() {
    let cli = Cli::parse();
    skrelay::sys::raise_fd_limit();
    let result = match cli.command {
        Cmd::Bulk(a) => bulk(a),
        Cmd::Pingpong(a) => pingpong(a),
        Cmd::ConnectRate(a) => connect_rate(a),
        Cmd::IdlePairs(a) => idle_pairs(a),
        Cmd::IdleWorker(a) => idle_worker(a),
        Cmd::Report(a) => report::report(a),
    };
    if let Err(e) = result {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Paths

fn accept_within(listener: &TcpListener, wait: Duration) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_micros(200))
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                return Err(io::Error::new(ErrorKind::TimedOut, "the server end saw no connection"))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Opens (client, server) ends over `path` and passes a byte each way, so the path is fully set
/// up (paired, spliced, upstream connected) before anything is timed.
fn open_ends(path: &PathArgs) -> io::Result<(TcpStream, TcpStream)> {
    let wait = Duration::from_secs(5);
    let (client, server) = match path.via {
        Via::Relay => {
            let server = TcpStream::connect_timeout(&path.target()?, wait)?;
            let client = TcpStream::connect_timeout(&path.target()?, wait)?;
            (client, server)
        }
        Via::Direct | Via::Proxy => {
            let listener = TcpListener::bind(path.upstream)?;
            let to = if path.via == Via::Direct { listener.local_addr()? } else { path.target()? };
            let client = TcpStream::connect_timeout(&to, wait)?;
            let server = accept_within(&listener, wait)?;
            (client, server)
        }
    };
    let mut byte = [0u8; 1];
    for (a, b) in [(&client, &server), (&server, &client)] {
        a.set_nodelay(true)?;
        b.set_read_timeout(Some(wait))?;
        (&*a).write_all(b"h")?;
        (&*b).read_exact(&mut byte)?;
        b.set_read_timeout(None)?;
    }
    Ok((client, server))
}

// ---------------------------------------------------------------------------------------------
// /proc

/// (busy, softirq) seconds of one /proc/stat cpu line: busy is user+nice+system+irq+softirq+steal.
fn cpu_line_secs(line: &str) -> (f64, f64) {
    let f: Vec<f64> = line.split_whitespace().skip(1).map(|v| v.parse().unwrap_or(0.0)).collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ((get(0) + get(1) + get(2) + get(5) + get(6) + get(7)) / hz, get(6) / hz)
}

/// Busy CPU time of the whole machine in seconds, and the softirq part of it (the first line).
fn machine_cpu() -> (f64, f64) {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    cpu_line_secs(stat.lines().next().unwrap_or(""))
}

/// Busy seconds of each CPU, from the cpuN lines of /proc/stat.
fn per_cpu_busy() -> Vec<f64> {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| cpu_line_secs(l).0)
        .collect()
}

fn status_kib(pid: u32, key: &str) -> io::Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()))
        .ok_or_else(|| io::Error::other(format!("no {key} in /proc/{pid}/status")))
}

fn socket_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    fs::read_link(e.path()).map(|t| t.to_string_lossy().starts_with("socket:")).unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0)
}

fn meminfo_kib(key: &str) -> u64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// bulk

const CHUNK: usize = 128 * 1024;
const PATTERN: usize = 1 << 20;

/// Random bytes; chunk i of the stream is a window of them at an offset that depends on i, so a
/// lost, repeated or reordered chunk changes the stream's hash, and the sender copies nothing.
fn pattern() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..PATTERN + CHUNK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn chunks(pat: &[u8], total: usize) -> impl Iterator<Item = &[u8]> {
    let mut sent = 0usize;
    let mut i = 0u64;
    std::iter::from_fn(move || {
        if sent >= total {
            return None;
        }
        let off = (i.wrapping_mul(0x9E37_79B9) as usize % (PATTERN / 64)) * 64;
        let len = CHUNK.min(total - sent);
        sent += len;
        i += 1;
        Some(&pat[off..off + len])
    })
}

/// What the receiving thread hands back: the bytes, when the last expected one came, the machine's
/// CPU time then, and how many bytes followed (must be none).
struct Received {
    buf: Vec<u8>,
    got: usize,
    end: Instant,
    cpu: (f64, f64),
    cpus: Vec<f64>,
    extra: usize,
}

fn bulk(a: BulkArgs) -> io::Result<()> {
    let total = a.bytes;
    let pat = Arc::new(pattern());
    let mut buf = vec![0u8; total];
    for i in (0..total).step_by(4096) {
        buf[i] = 1; // fault the pages in before the clock starts
    }
    let (client, server) = open_ends(&a.path)?;
    let start = Arc::new(Barrier::new(3));
    let sender = {
        let (start, pat) = (start.clone(), pat.clone());
        thread::spawn(move || -> io::Result<()> {
            start.wait();
            for c in chunks(&pat, total) {
                (&client).write_all(c)?;
            }
            client.shutdown(Shutdown::Write)
        })
    };
    let receiver = {
        let start = start.clone();
        thread::spawn(move || -> io::Result<Received> {
            start.wait();
            let mut got = 0;
            while got < total {
                match (&server).read(&mut buf[got..])? {
                    0 => break,
                    n => got += n,
                }
            }
            let (end, cpu, cpus) = (Instant::now(), machine_cpu(), per_cpu_busy());
            // Anything after the expected bytes (there must be nothing) and then end of file.
            server.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut extra = 0;
            let mut tail = [0u8; 4096];
            loop {
                match (&server).read(&mut tail)? {
                    0 => break,
                    n => extra += n,
                }
            }
            Ok(Received { buf, got, end, cpu, cpus, extra })
        })
    };
    let (cpu0, cpus0) = (machine_cpu(), per_cpu_busy());
    let t0 = Instant::now();
    start.wait();
    let Received { buf, got, end: t1, cpu: cpu1, cpus: cpus1, extra } =
        receiver.join().map_err(|_| io::Error::other("receiver panicked"))??;
    sender.join().map_err(|_| io::Error::other("sender panicked"))??;
    let secs = (t1 - t0).as_secs_f64();
    let mut want = Sha256::new();
    for c in chunks(&pat, total) {
        want.update(c);
    }
    let ok = got == total && extra == 0 && Sha256::digest(&buf[..got]) == want.finalize();
    if !ok {
        let mut off = 0usize;
        for c in chunks(&pat, total) {
            let end = (off + c.len()).min(got);
            if let Some(i) = (off..end).find(|&i| buf[i] != c[i - off]) {
                eprintln!(
                    "DIAG first difference at byte {i} (chunk at {off}, len {}); got={got} extra={extra}",
                    c.len()
                );
                // Where do the received bytes at i come from? Search the next 64 MiB of the stream.
                let probe = &buf[i..(i + 64).min(got)];
                let mut o2 = 0usize;
                for c2 in chunks(&pat, total) {
                    if let Some(p) = c2.windows(probe.len()).position(|w| w == probe) {
                        eprintln!("DIAG bytes at {i} are stream bytes at {}", o2 + p);
                        break;
                    }
                    o2 += c2.len();
                }
                break;
            }
            off += c.len();
        }
    }
    let gib = total as f64 / (1u64 << 30) as f64;
    println!(
        "bulk bytes={total} got={got} extra={extra} secs={secs:.4} gbps={:.2} cpu_s={:.3} cpu_s_per_gib={:.3} softirq_s_per_gib={:.3} busy_per_cpu={} sha256={}",
        total as f64 * 8.0 / secs / 1e9,
        cpu1.0 - cpu0.0,
        (cpu1.0 - cpu0.0) / gib,
        (cpu1.1 - cpu0.1) / gib,
        // Each CPU's busy share of the transfer: shows where the work landed.
        cpus1.iter().zip(&cpus0).map(|(b, a)| format!("{:.0}%", 100.0 * (b - a) / secs)).collect::<Vec<_>>().join(","),
        if ok { "ok" } else { "MISMATCH" }
    );
    if ok {
        Ok(())
    } else {
        Err(io::Error::other("the bytes received differ from the bytes sent"))
    }
}

// ---------------------------------------------------------------------------------------------
// pingpong

fn pingpong(a: PingArgs) -> io::Result<()> {
    let (client, server) = open_ends(&a.path)?;
    let echo = thread::spawn(move || -> io::Result<()> {
        let mut m = [0u8; 64];
        loop {
            match (&server).read_exact(&mut m) {
                Ok(()) => (&server).write_all(&m)?,
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let mut msg = [0x5au8; 64];
    let mut back = [0u8; 64];
    let mut rtts = Vec::with_capacity(a.round_trips);
    for i in 0..a.warmup + a.round_trips {
        msg[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let t = Instant::now();
        (&client).write_all(&msg)?;
        (&client).read_exact(&mut back)?;
        let dt = t.elapsed();
        if back != msg {
            return Err(io::Error::other(format!("round trip {i} came back changed")));
        }
        if i >= a.warmup {
            rtts.push(dt.as_nanos() as u64);
        }
    }
    client.shutdown(Shutdown::Write)?;
    echo.join().map_err(|_| io::Error::other("echo panicked"))??;
    rtts.sort_unstable();
    let pct = |p: usize| rtts[(rtts.len() * p / 100).min(rtts.len() - 1)] as f64 / 1000.0;
    let mean = rtts.iter().sum::<u64>() as f64 / rtts.len() as f64 / 1000.0;
    println!(
        "pingpong n={} p50_us={:.1} p99_us={:.1} mean_us={mean:.1} max_us={:.1}",
        rtts.len(),
        pct(50),
        pct(99),
        pct(100)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// connect-rate

fn connect_rate(a: ConnectArgs) -> io::Result<()> {
    if a.path.via == Via::Relay {
        return Err(io::Error::other("connect-rate measures direct or proxy paths"));
    }
    let listener = TcpListener::bind(a.path.upstream)?;
    let to = if a.path.via == Via::Direct { listener.local_addr()? } else { a.path.target()? };
    // Server: read the byte, answer, close. The threads block in accept and end with the process.
    for _ in 0..2 {
        let l = listener.try_clone()?;
        thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).is_ok() {
                    let _ = s.write_all(b"y");
                }
            }
        });
    }
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let clients: Vec<_> = (0..a.clients)
        .map(|_| {
            let (done, errors, stop) = (done.clone(), errors.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let one = || -> io::Result<()> {
                        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
                        s.set_nodelay(true)?;
                        s.set_read_timeout(Some(Duration::from_secs(2)))?;
                        s.write_all(b"x")?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b)?;
                        if &b != b"y" {
                            return Err(io::Error::other("wrong answer"));
                        }
                        Ok(())
                    };
                    match one() {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_secs_f64(a.secs));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let secs = t0.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    let errs = errors.load(Ordering::Relaxed);
    println!("connect conns={n} errors={errs} secs={secs:.2} per_sec={:.0}", n as f64 / secs);
    if n == 0 {
        return Err(io::Error::other("no connection got through"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// idle pairs

fn idle_pairs(a: IdleArgs) -> io::Result<()> {
    let rss0 = status_kib(a.pid, "VmRSS:")?;
    let socks0 = socket_fds(a.pid);
    let slab0 = meminfo_kib("Slab:");
    let exe = std::env::current_exe()?;
    let mut workers: Vec<Child> = Vec::new();
    let (mut opened, mut held) = (0, 0);
    let mut left = a.pairs;
    while left > 0 {
        let n = left.min(a.per_worker);
        let mut child = Command::new(&exe)
            .arg("idle-worker")
            .args(a.path.to_args())
            .args(["--pairs", &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let field = |k: &str| -> usize {
            line.split_whitespace().find_map(|f| f.strip_prefix(k).and_then(|v| v.parse().ok())).unwrap_or(0)
        };
        opened += field("opened=");
        held += field("verified=");
        workers.push(child);
        left -= n;
        if field("verified=") < n {
            break; // the relay holds no more
        }
    }
    thread::sleep(Duration::from_secs(1));
    let rss1 = status_kib(a.pid, "VmRSS:")?;
    let socks1 = socket_fds(a.pid);
    let slab1 = meminfo_kib("Slab:");
    for mut w in workers {
        drop(w.stdin.take());
        let _ = w.wait();
    }
    let per_pair = |kib: i64| if held > 0 { kib as f64 * 1024.0 / held as f64 } else { 0.0 };
    println!(
        "idle requested={} opened={opened} held={held} sockets={} rss_before_kib={rss0} rss_after_kib={rss1} bytes_per_pair={:.0} kernel_slab_bytes_per_pair={:.0}",
        a.pairs,
        socks1.saturating_sub(socks0),
        per_pair(rss1 as i64 - rss0 as i64),
        per_pair(slab1 as i64 - slab0 as i64),
    );
    if held == 0 {
        return Err(io::Error::other("no pair could be opened"));
    }
    Ok(())
}

fn idle_worker(a: WorkerArgs) -> io::Result<()> {
    let wait = Duration::from_secs(1);
    let listener = match a.path.via {
        Via::Relay => None,
        _ => Some(TcpListener::bind(a.path.upstream)?),
    };
    let open = || -> io::Result<(TcpStream, TcpStream)> {
        match &listener {
            None => {
                let server = TcpStream::connect_timeout(&a.path.target()?, wait)?;
                let client = TcpStream::connect_timeout(&a.path.target()?, wait)?;
                Ok((client, server))
            }
            Some(l) => {
                let to = if a.path.via == Via::Direct { l.local_addr()? } else { a.path.target()? };
                let client = TcpStream::connect_timeout(&to, wait)?;
                Ok((client, accept_within(l, wait)?))
            }
        }
    };
    let mut pairs = Vec::with_capacity(a.pairs);
    for _ in 0..a.pairs {
        match open() {
            Ok(p) => pairs.push(p),
            Err(_) => break,
        }
    }
    drop(listener);
    // A pair counts only if a byte written at one end arrives at the other.
    for (c, _) in &pairs {
        let _ = (&*c).write(b"i");
    }
    let mut ok = vec![false; pairs.len()];
    let deadline = Instant::now() + Duration::from_secs(3);
    for (_, s) in &pairs {
        s.set_nonblocking(true)?;
    }
    while ok.iter().any(|v| !v) && Instant::now() < deadline {
        for (i, (_, s)) in pairs.iter().enumerate() {
            let mut b = [0u8; 1];
            if !ok[i] && matches!((&*s).read(&mut b), Ok(1)) {
                ok[i] = true;
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    println!("ready opened={} verified={}", pairs.len(), ok.iter().filter(|v| **v).count());
    io::stdout().flush()?;
    let _ = io::stdin().read_to_end(&mut Vec::new());
    for (c, s) in &pairs {
        // Reset on exit: no TIME_WAIT left to eat the next run's ephemeral ports.
        let _ = socket2::SockRef::from(c).set_linger(Some(Duration::ZERO));
        let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
    }
    Ok(())
}
