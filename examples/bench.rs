//! Load generator and report writer for `scripts/bench.sh` (issue 6). Not part of `cargo test`.
//!
//! Both ends of every measurement live in this process, a "client" and a "server" thread. What
//! lies between them (`--via`) is direct loopback, a relay (both ends are clients of the relay, and
//! order pairing makes the 1st and 2nd connection a pair) or a proxy-like contender (the client
//! connects to it and it connects to the server, which listens on `--upstream`). Each measuring
//! subcommand prints one line of `key=value` figures on stdout for bench.sh to collect.
use clap::{Args, Parser, Subcommand, ValueEnum};
use sha2::{Digest, Sha256};
use std::{
    collections::BTreeMap,
    fmt::Write as _,
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

#[derive(Args)]
struct ReportArgs {
    /// Lines of `contender<TAB>metric<TAB>value`, one per run.
    #[arg(long)]
    results: std::path::PathBuf,
    /// Lines of `key=value` about the run (date, kernel, mode, ...).
    #[arg(long)]
    meta: std::path::PathBuf,
    /// BENCHMARKS.md to write; everything below its hand-written marker is kept.
    #[arg(long)]
    out: std::path::PathBuf,
    /// gnuplot data for the chart.
    #[arg(long)]
    chart_data: std::path::PathBuf,
}

fn main() {
    let cli = Cli::parse();
    raise_fd_limit();
    let result = match cli.command {
        Cmd::Bulk(a) => bulk(a),
        Cmd::Pingpong(a) => pingpong(a),
        Cmd::ConnectRate(a) => connect_rate(a),
        Cmd::IdlePairs(a) => idle_pairs(a),
        Cmd::IdleWorker(a) => idle_worker(a),
        Cmd::Report(a) => report(a),
    };
    if let Err(e) = result {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
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

// ---------------------------------------------------------------------------------------------
// report

/// Contenders in display order: (key, name in the tables, short label for the chart).
const CONTENDERS: &[(&str, &str, &str)] = &[
    ("direct", "direct loopback (the limit)", "direct"),
    ("relay-kernel", "skrelay relay, kernel", "relay-k"),
    ("relay-userspace", "skrelay relay, userspace", "relay-u"),
    ("proxy-kernel", "skrelay proxy, kernel", "proxy-k"),
    ("proxy-userspace", "skrelay proxy, userspace", "proxy-u"),
    ("socat", "socat (fork)", "socat"),
    ("haproxy", "HAProxy 2.6, forced splice", "haproxy"),
    ("accel", "skrelay accel (loopback)", "accel"),
];

/// The hand-written part of BENCHMARKS.md starts at this line; the report keeps it.
const MARKER: &str = "<!-- Everything below this line is hand-written; scripts/bench.sh keeps it. -->";

struct Stat {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

type Results = BTreeMap<(String, String), Vec<f64>>;

fn stat(r: &Results, c: &str, m: &str) -> Option<Stat> {
    let mut v = r.get(&(c.to_string(), m.to_string()))?.clone();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Some(Stat { median, min: v[0], max: v[n - 1], n })
}

fn med(r: &Results, c: &str, m: &str) -> Option<f64> {
    stat(r, c, m).map(|s| s.median)
}

/// "12.3 (11.9-12.8)" with `prec` decimals; "-" when not measured.
fn cell(r: &Results, c: &str, m: &str, prec: usize) -> String {
    match stat(r, c, m) {
        Some(s) if s.n > 1 => format!("{:.p$} ({:.p$}-{:.p$})", s.median, s.min, s.max, p = prec),
        Some(s) => format!("{:.p$}", s.median, p = prec),
        None => "-".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b.abs() > 1e-12 => Some(a / b),
        _ => None,
    }
}

fn fmt_ratio(x: Option<f64>) -> String {
    x.map(|x| format!("{x:.2}x")).unwrap_or_else(|| "-".into())
}

fn report(a: ReportArgs) -> io::Result<()> {
    let mut r: Results = BTreeMap::new();
    for line in fs::read_to_string(&a.results)?.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if let [c, m, v] = f[..] {
            if let Ok(v) = v.parse::<f64>() {
                r.entry((c.into(), m.into())).or_default().push(v);
            }
        }
    }
    let meta: BTreeMap<String, String> = fs::read_to_string(&a.meta)?
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    let m = |k: &str| meta.get(k).cloned().unwrap_or_else(|| "?".into());
    let present: Vec<_> = CONTENDERS.iter().filter(|(c, _, _)| r.keys().any(|(rc, _)| rc == c)).collect();
    // Extra CPU over direct, per run median.
    let direct_cpu = med(&r, "direct", "cpu_s_per_gib");
    let extra = |c: &str| Some(med(&r, c, "cpu_s_per_gib")? - direct_cpu?);

    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "Generated by `scripts/bench.sh{}` on {} (git {}). Machine: {} x {}, {} RAM, Linux {}; HAProxy {}.",
        if m("mode") == "quick" { " --quick" } else { "" },
        m("date"),
        m("git"),
        m("cpus"),
        m("cpu_model"),
        m("mem"),
        m("kernel"),
        m("haproxy")
    );
    if let Some(note) = meta.get("note").filter(|n| !n.is_empty()) {
        let _ = writeln!(w, "\n> **Note:** {note}");
    }
    let _ = writeln!(
        w,
        "\nMedians of {} interleaved runs (contenders A B C A B C), min-max in brackets. Bulk: {} one way, \
         sha256-checked after the clock stops. CPU: busy time of the whole machine from /proc/stat \
         (user+system+softirq+irq; the kernel datapath's work runs in softirq and kworkers) per GiB, \
         client and server included, so the *extra over direct* is the contender's own cost. Ping-pong: \
         64-byte messages, {} round trips after {} of warm-up, one connection; pinned = every process \
         (client, server, relay/proxy) on CPU 0 with taskset. Connections: connect, 1 byte each way \
         through to the server, close, {} client threads for {} s. Idle pairs: RSS growth of the relay or \
         proxy process divided by the pairs it held. Logging: HAProxy runs without a log and skrelay with \
         RUST_LOG=warn, i.e. without its per-pair line (which costs ~5% of the connection rate).\n",
        m("runs"),
        m("bulk_bytes_h"),
        m("round_trips"),
        m("warmup"),
        m("conn_clients"),
        m("conn_secs")
    );
    let _ = writeln!(w, "![chart](BENCHMARKS.png)\n");
    let _ = writeln!(w, "## Results\n");
    let _ = writeln!(
        w,
        "| contender | throughput Gbit/s | CPU-s/GiB | extra CPU-s/GiB over direct | pinned p50 us | pinned p99 us | unpinned p50 us | unpinned p99 us | conn/s |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|");
    for (c, name, _) in &present {
        let _ = writeln!(
            w,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(&r, c, "gbps", 1),
            cell(&r, c, "cpu_s_per_gib", 2),
            extra(c).map(|x| format!("{x:+.2}")).unwrap_or_else(|| "-".into()),
            cell(&r, c, "pinned_p50_us", 1),
            cell(&r, c, "pinned_p99_us", 1),
            cell(&r, c, "unpinned_p50_us", 1),
            cell(&r, c, "unpinned_p99_us", 1),
            cell(&r, c, "conn_per_sec", 0),
        );
    }
    let _ = writeln!(w, "\n### Memory per idle pair\n");
    let _ = writeln!(
        w,
        "RLIMIT_NOFILE's hard limit on this machine is {}. An idle pair costs skrelay 2 descriptors on \
         either datapath (pipes are held only while bytes are in them); HAProxy's maxconn must fit \
         its splice pipes under that limit too. Each contender was asked for what fits ({}), and the \
         table says how many pairs it held (each verified by a byte passing through). Every daemon \
         is restarted before each idle run, so its RSS growth is its own. Kernel-side socket \
         memory is not in any process's RSS; the last column is the machine's Slab growth per pair \
         (noisy on a shared machine).\n",
        m("nofile_hard"),
        m("idle_requested")
    );
    let _ = writeln!(w, "| contender | pairs held | RSS bytes per pair | kernel Slab bytes per pair |");
    let _ = writeln!(w, "|---|---|---|---|");
    for (c, name, _) in &present {
        if stat(&r, c, "idle_bytes_per_pair").is_some() {
            let _ = writeln!(
                w,
                "| {name} | {} | {} | {} |",
                cell(&r, c, "idle_pairs_held", 0),
                cell(&r, c, "idle_bytes_per_pair", 0),
                cell(&r, c, "idle_slab_bytes_per_pair", 0)
            );
        }
    }

    // Ratios.
    let _ = writeln!(w, "\n## Ratios\n");
    let _ = writeln!(
        w,
        "Against direct loopback and against skrelay's userspace datapath of the same command (relay or \
         proxy; the relay's for the others). CPU ratios compare the *extra* CPU over direct.\n"
    );
    let _ = writeln!(
        w,
        "| contender | throughput / direct | throughput / userspace | extra CPU / userspace | pinned p50 / userspace | unpinned p99 / userspace |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|");
    let base_of = |c: &str| {
        if c.starts_with("proxy") && r.keys().any(|(k, _)| k == "proxy-userspace") {
            "proxy-userspace"
        } else {
            "relay-userspace"
        }
    };
    for (c, name, _) in &present {
        let b = base_of(c);
        let _ = writeln!(
            w,
            "| {name} | {} | {} | {} | {} | {} |",
            fmt_ratio(ratio(med(&r, c, "gbps"), med(&r, "direct", "gbps"))),
            fmt_ratio(ratio(med(&r, c, "gbps"), med(&r, b, "gbps"))),
            fmt_ratio(ratio(extra(c), extra(b))),
            fmt_ratio(ratio(med(&r, c, "pinned_p50_us"), med(&r, b, "pinned_p50_us"))),
            fmt_ratio(ratio(med(&r, c, "unpinned_p99_us"), med(&r, b, "unpinned_p99_us"))),
        );
    }

    // Targets.
    let _ = writeln!(w, "\n## Targets (issue 6)\n");
    let _ = writeln!(w, "| target | contender | measured | result |");
    let _ = writeln!(w, "|---|---|---|---|");
    let mut rows: Vec<String> = Vec::new();
    let mut target = |what: &str, who: &str, x: Option<f64>, pass: &dyn Fn(f64) -> bool| {
        let (measured, verdict) = match x {
            Some(x) => (format!("{x:.2}x"), if pass(x) { "pass" } else { "**miss**" }),
            None => ("-".into(), "not measured"),
        };
        rows.push(format!("| {what} | {who} | {measured} | {verdict} |"));
    };
    // What a user would run instead of the kernel datapath (direct is the limit, not a contender;
    // the kernel relay and proxy are one datapath, not rivals of each other).
    let proxy_others = ["relay-userspace", "proxy-userspace", "socat", "haproxy"];
    for (k, user) in [("relay-kernel", "relay-userspace"), ("proxy-kernel", "proxy-userspace")] {
        if !present.iter().any(|(c, _, _)| *c == k) {
            continue;
        }
        target("extra CPU/GiB over direct <= 0.4x skrelay userspace", k, ratio(extra(k), extra(user)), &|x| x <= 0.4);
        target("extra CPU/GiB over direct <= 0.4x HAProxy forced splice", k, ratio(extra(k), extra("haproxy")), &|x| {
            x <= 0.4
        });
        target("throughput >= 1.15x skrelay userspace", k, ratio(med(&r, k, "gbps"), med(&r, user, "gbps")), &|x| {
            x >= 1.15
        });
        target("throughput >= 1.15x HAProxy", k, ratio(med(&r, k, "gbps"), med(&r, "haproxy", "gbps")), &|x| x >= 1.15);
        target("throughput >= 0.6x direct", k, ratio(med(&r, k, "gbps"), med(&r, "direct", "gbps")), &|x| x >= 0.6);
        target(
            "pinned p50 latency <= 0.75x skrelay userspace",
            k,
            ratio(med(&r, k, "pinned_p50_us"), med(&r, user, "pinned_p50_us")),
            &|x| x <= 0.75,
        );
        let best_other = proxy_others
            .iter()
            .filter_map(|c| med(&r, c, "unpinned_p99_us"))
            .fold(None, |acc: Option<f64>, x| Some(acc.map_or(x, |a| a.min(x))));
        target(
            "unpinned p99 no worse than any other relay/proxy (ratio to the best: splice(2), socat, HAProxy)",
            k,
            ratio(med(&r, k, "unpinned_p99_us"), best_other),
            &|x| x <= 1.0,
        );
        // Reported as a ratio to the 8 KiB budget.
        target(
            "memory per idle pair <= 8 KiB in our process (ratio to 8 KiB)",
            k,
            med(&r, k, "idle_bytes_per_pair").map(|b| b / 8192.0),
            &|x| x <= 1.0,
        );
    }
    for k in ["proxy-kernel", "proxy-userspace"] {
        if present.iter().any(|(c, _, _)| *c == k) {
            target(
                "connections/s through the proxy >= HAProxy's",
                k,
                ratio(med(&r, k, "conn_per_sec"), med(&r, "haproxy", "conn_per_sec")),
                &|x| x >= 1.0,
            );
        }
    }
    if present.iter().any(|(c, _, _)| *c == "accel") {
        target(
            "accel throughput >= 2x plain loopback",
            "accel",
            ratio(med(&r, "accel", "gbps"), med(&r, "direct", "gbps")),
            &|x| x >= 2.0,
        );
        target(
            "accel pinned p50 <= 0.7x plain loopback",
            "accel",
            ratio(med(&r, "accel", "pinned_p50_us"), med(&r, "direct", "pinned_p50_us")),
            &|x| x <= 0.7,
        );
    }
    for row in rows {
        let _ = writeln!(w, "{row}");
    }
    let absent: Vec<&str> =
        ["proxy-kernel", "accel"].into_iter().filter(|k| !present.iter().any(|(c, _, _)| c == k)).collect();
    if !absent.is_empty() {
        let _ = writeln!(
            w,
            "\nNot measured in this run (the command was not in this build): {}. bench.sh picks them up \
             as soon as `skrelay proxy --help` / `skrelay accel --help` work.",
            absent.join(", ")
        );
    }
    if let Some(f) = meta.get("failures").filter(|f| f.as_str() != "0") {
        let _ = writeln!(w, "\n{f} measurement(s) failed in this run; see the log bench.sh printed.");
    }

    // Keep the hand-written part.
    let old = fs::read_to_string(&a.out).unwrap_or_default();
    let tail = old.split_once(MARKER).map(|(_, t)| t.to_string()).unwrap_or_else(|| "\n\n## What we tried\n\n".into());
    let _ = write!(w, "\n{MARKER}{tail}");
    fs::write(&a.out, md)?;

    // Chart data: one gnuplot index per panel, rows `x "label" median min max`.
    let panels = ["gbps", "extra_cpu", "pinned_p50_us", "unpinned_p99_us", "conn_per_sec", "idle_bytes_per_pair"];
    let mut dat = String::new();
    for p in panels {
        let _ = writeln!(dat, "# {p}");
        let mut x = 0;
        for (c, _, label) in &present {
            let s = if p == "extra_cpu" {
                stat(&r, c, "cpu_s_per_gib").and_then(|s| {
                    let d = direct_cpu?;
                    Some(Stat { median: s.median - d, min: s.min - d, max: s.max - d, n: s.n })
                })
            } else {
                stat(&r, c, p)
            };
            if let Some(s) = s {
                let _ = writeln!(dat, "{x} \"{label}\" {} {} {}", s.median, s.min, s.max);
                x += 1;
            }
        }
        if x == 0 {
            let _ = writeln!(dat, "0 \"-\" 0 0 0"); // gnuplot needs a row to plot
        }
        dat.push_str("\n\n");
    }
    fs::write(&a.chart_data, dat)?;
    Ok(())
}
