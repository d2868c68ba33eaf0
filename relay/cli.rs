//! Command-line types (clap derive) and nothing else.
use crate::steer::{PortList, Prefix};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::{net::SocketAddr, path::PathBuf, time::Duration};

#[derive(Parser, Debug)]
#[command(name = "skrelay", version, about = "In-kernel TCP relay and splicing proxy (eBPF sockmap)")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the command line as `Cli::parse` does, and notes which flags were given rather
    /// than defaulted where a command needs to know. A bad command line is returned as clap's
    /// error (`--help` and `--version` are errors of their own kind): see [`usage_error`].
    pub fn try_parse_command_line() -> Result<Cli, clap::Error> {
        Self::try_parse_args(std::env::args_os())
    }

    fn try_parse_args<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = <Cli as clap::CommandFactory>::command().try_get_matches_from(args)?;
        let mut cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches)?;
        let given = |flag: &str| {
            matches.subcommand().and_then(|(_, m)| m.value_source(flag)) == Some(clap::parser::ValueSource::CommandLine)
        };
        // Only ids the subcommand has: asking for another panics in a debug build.
        let kernel_flags = || -> Vec<&'static str> {
            [
                ("kernel_after", "--kernel-after"),
                ("kernel_buffer", "--kernel-buffer"),
                ("kernel_memory", "--kernel-memory"),
            ]
            .into_iter()
            .filter(|(id, _)| given(id))
            .map(|(_, flag)| flag)
            .collect()
        };
        match &mut cli.command {
            Command::Relay(args) => {
                args.listen_given = given("listen");
                args.common.kernel_flags_given = kernel_flags();
            }
            Command::Proxy(args) => {
                args.listen_given = given("listen");
                args.common.kernel_flags_given = kernel_flags();
            }
            _ => {}
        }
        Ok(cli)
    }
}

/// A bad command line as one sentence, like every other error, with where to read more:
/// `invalid value 'x' for '--pair <PAIR>': ... (see `skrelay relay --help`)`. clap's own
/// rendering spans lines (an `error:` line, indented items, tips, usage); the items and tips are
/// kept, the pointer to `--help` names the subcommand `args` (the command line) gave. `None` for `--help` and
/// `--version`, which are not errors and are printed as clap renders them.
pub fn usage_error(e: &clap::Error, args: &[String]) -> Option<String> {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        return None;
    }
    let rendered = e.to_string();
    let mut sentence = String::new();
    let mut tips = Vec::new();
    for line in rendered.lines().map(str::trim) {
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if let Some(tip) = line.strip_prefix("tip: ") {
            tips.push(tip);
        } else if let Some(values) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            sentence.push_str(&format!(" ({values})"));
        } else if !line.is_empty() {
            let line = line.strip_prefix("error: ").unwrap_or(line);
            if !sentence.is_empty() {
                sentence.push_str(if sentence.ends_with(':') { " " } else { ", " });
            }
            sentence.push_str(line);
        }
    }
    for tip in tips {
        sentence.push_str(&format!("; {tip}"));
    }
    // Rust's integer parse errors, as a user would say them (`--threads abc`: "invalid digit
    // found in string").
    for (rust, plain) in [
        ("invalid digit found in string", "not a whole number"),
        ("cannot parse integer from empty string", "empty: give a whole number"),
        ("number too large to fit in target type", "too large"),
        ("number too small to fit in target type", "too small"),
    ] {
        sentence = sentence.replace(rust, plain);
    }
    // The command whose --help to read: the subcommands named in `args`, as far as they go.
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut path = vec!["skrelay".to_string()];
    for arg in args.iter().skip(1) {
        let Some(sub) = command.find_subcommand(arg).cloned() else { continue };
        path.push(sub.get_name().to_string());
        command = sub;
    }
    let command = path.join(" ");
    Some(format!("{sentence} (see `{command} --help`)"))
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Pair TCP clients of one listener and splice each pair, in the kernel where it can.
    Relay(RelayArgs),
    /// Splice each client to a fresh connection to an upstream, in the kernel where it can.
    Proxy(ProxyArgs),
    /// Loopback acceleration: TCP between processes of one cgroup skips TCP/IP (sockops + sk_msg).
    ///
    /// What a connection queues is bounded (--max-queued); streams the redirect cannot speed up go
    /// back to plain TCP. Kernel limits (README, accel): MSG_WAITALL returns short reads; on 6.18 a
    /// thread blocked in recv gets EAGAIN, not the EOF or reset, when another thread shuts the
    /// same socket down (SHUT_WR or SHUT_RD) or the peer resets, and mid-stream where the same
    /// socket also sends in bulk (threaded or blocking echo servers and proxies); the next call
    /// says it (event-loop readers are not affected); and a reader that uses splice(2) (Go's io.Copy
    /// between TCP connections, HAProxy with splice) misses the redirected bytes: it sees an early
    /// end of a stream that fits in --max-queued, and hangs on a longer one; FIONREAD counts only
    /// redirected bytes, so a receiver that trusts it (nginx as a reverse proxy or upload target)
    /// can stall once a stream has paused; urgent data (MSG_OOB) stays inline; a socket closed with
    /// unread bytes sends a FIN, not a reset; TCP_INQ, transmit timestamps, TCP_CORK and MSG_MORE
    /// are ignored (SO_ZEROCOPY, receive timestamps, SO_PEEK_OFF and SO_RCVLOWAT keep a
    /// connection on TCP); sendfile(2) copies (nginx: `sendfile off` serves small files faster
    /// under accel). Keep such applications out of the cgroup (or give --ports only the ports of
    /// those that are safe).
    #[command(subcommand)]
    Accel(AccelCommand),
    /// Steer connections for ports and address prefixes to a listening socket of any process
    /// (BPF sk_lookup), pinned in bpffs so it works after the command exits.
    #[command(subcommand)]
    Steer(SteerCommand),
    /// Show what skrelay has attached: the steering of this network namespace, the accelerated
    /// cgroups (machine-wide: accel is per cgroup, not per namespace), and running relays.
    Status(StatusArgs),
    /// Serve the pinned steer counters of this network namespace and the accel counters of every
    /// accelerated cgroup (machine-wide) as Prometheus metrics
    /// at http://ADDR/metrics, read at each scrape (nothing is created or attached).
    Metrics(MetricsArgs),
    /// Check that this machine can run the kernel datapath: loads and attaches the programs and
    /// maps, one set per CPU as relay and proxy do by default, then removes them. Exit status 0 if
    /// it can, 2 with the reason if not.
    Probe,
}

#[derive(Subcommand, Debug)]
pub enum AccelCommand {
    /// Accelerate TCP connections whose both ends are processes of this cgroup (or its children);
    /// stays on after the command exits. Processes must be in the cgroup before they create sockets.
    On {
        /// cgroup v2 directory: absolute, or relative to the cgroup v2 mount; created if missing.
        #[arg(long, value_name = "PATH")]
        cgroup: PathBuf,
        /// Only connections with an end on one of these ports (comma-separated, e.g. 6379,8080).
        #[arg(long, value_delimiter = ',', value_name = "LIST", value_parser = parse_accel_port)]
        ports: Vec<u16>,
        #[command(flatten)]
        policy: AccelPolicyArgs,
    },
    /// Stop accelerating: new connections take the normal path at once; the state is removed if
    /// no accelerated connection is open, or once they close within --wait; otherwise it stays
    /// (draining) until `accel off` runs again.
    Off {
        /// The cgroup `accel on` accelerated (as `accel status` lists it): absolute, or relative to
        /// the cgroup v2 mount.
        #[arg(long, value_name = "PATH")]
        cgroup: PathBuf,
        /// Wait this long for accelerated connections to close; seconds.
        #[arg(long = "wait", default_value = "0", value_parser = parse_secs, value_name = "SECS", allow_negative_numbers = true)]
        wait: Duration,
        /// Remove the state even though accelerated connections are open: they keep the fast path
        /// until they close, without its half-close handling (see the README).
        #[arg(long)]
        force: bool,
    },
    /// Run a command in an accelerated cgroup (a fresh one unless --cgroup), then clean up.
    Run {
        /// Run the command in this cgroup v2 directory (absolute, or relative to the cgroup v2
        /// mount; created if missing, and removed afterwards if this command created it) instead
        /// of a fresh one. If it is accelerated already, the command runs under that acceleration
        /// (flags that ask for another policy are refused), which stays on afterwards.
        #[arg(long, value_name = "PATH")]
        cgroup: Option<PathBuf>,
        #[command(flatten)]
        policy: AccelPolicyArgs,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Show each accelerated cgroup with its counters.
    Status {
        /// Print JSON: `{"cgroups": [...], "interrupted": [...], "out_of_reach": ..., "unreadable":
        /// ...}`, as `skrelay status --json` shows under `accel`.
        #[arg(long)]
        json: bool,
    },
}

/// When a connection leaves the redirect for the normal TCP path (for good: the way back could
/// reorder bytes). Both keep what a connection can hold bounded or keep TCP's own coalescing.
#[derive(Args, Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccelPolicyArgs {
    /// Unread bytes a receiving socket may hold in its redirect queue (K/M/G suffixes allowed);
    /// above it the sender takes the normal path, where TCP flow control holds it back. At least
    /// 256K. [default: 8M]
    #[arg(long, value_parser = parse_bytes, value_name = "BYTES", allow_negative_numbers = true)]
    pub max_queued: Option<u32>,
    /// Writes below this size that keep arriving while the reader has unread data take the
    /// normal path (TCP coalesces them; each redirected write is a message and a wake-up: a
    /// one-connection stream of 16 KiB writes measured 0.70-0.80x plain while redirected).
    /// 0 turns this off. Default: measured when the cgroup is set up (about 0.5 s): 64K where a
    /// redirected stream of 64 KiB writes outruns plain loopback TCP by 1.15x, else 128K
    #[arg(long, value_parser = parse_bytes, value_name = "BYTES", allow_negative_numbers = true)]
    pub small_write: Option<u32>,
}

#[derive(Args, Debug, Clone)]
pub struct RelayArgs {
    /// Address to listen on: IP:PORT, [IPv6]:PORT or HOST:PORT (e.g. 127.0.0.1:7777, [::1]:7777,
    /// localhost:7777). A name is resolved at start-up to its first IPv4 address, else its first
    /// IPv6 one; the start line shows which.
    #[arg(long, default_value = "127.0.0.1:7777", value_parser = parse_listen, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Whether --listen was given, not defaulted (`Cli::parse_command_line`): with --takeover,
    /// one that differs from the socket taken over is refused rather than ignored.
    #[arg(skip)]
    pub listen_given: bool,
    /// How clients are paired: `order` (1st with 2nd, 3rd with 4th, ...) or `token` (a first
    /// line of 1 to 64 printable ASCII bytes; equal tokens pair; the line is not forwarded).
    #[arg(long, value_enum, default_value_t = PairBy::Order)]
    pub pair: PairBy,
    #[command(flatten)]
    pub common: SpliceArgs,
    #[command(flatten)]
    pub ports: PortsArgs,
    /// At most this many clients (1 or more) wait for a partner at once; further ones are reset at once.
    /// With --pair token, clients still sending their token line are capped at this many apart;
    /// while that cap is reached, further clients wait in the listen backlog.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..), value_name = "N", allow_negative_numbers = true)]
    pub max_pending: u32,
    /// Reset a client that has waited this long for its partner (or its token line); seconds
    /// (at least 0.001).
    #[arg(long, default_value = "30", value_parser = parse_timeout, value_name = "SECS", allow_negative_numbers = true)]
    pub pair_timeout: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct ProxyArgs {
    /// Upstream to connect each client to: IP:PORT, [IPv6]:PORT or HOST:PORT (resolved at
    /// start-up). Repeat for several; they are used round-robin.
    #[arg(long = "upstream", value_name = "ADDR", required = true)]
    pub upstreams: Vec<String>,
    /// Address to listen on: IP:PORT, [IPv6]:PORT or HOST:PORT (e.g. 127.0.0.1:7777, [::1]:7777,
    /// localhost:7777). A name is resolved at start-up to its first IPv4 address, else its first
    /// IPv6 one; the start line shows which.
    #[arg(long, default_value = "127.0.0.1:7777", value_parser = parse_listen, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Whether --listen was given, not defaulted (`Cli::parse_command_line`): with --takeover,
    /// one that differs from the socket taken over is refused rather than ignored.
    #[arg(skip)]
    pub listen_given: bool,
    #[command(flatten)]
    pub common: SpliceArgs,
    #[command(flatten)]
    pub ports: PortsArgs,
    /// Skip an upstream that has not accepted the connection within this long (it is marked
    /// down for 10 s, and tried last meanwhile); seconds (at least 0.001). A client whose every
    /// upstream fails waits up to this long for each of them, then is reset.
    #[arg(long, default_value = "5", value_parser = parse_connect_timeout, value_name = "SECS", allow_negative_numbers = true)]
    pub connect_timeout: Duration,
    /// At most this many clients wait for their upstream connection at once; meanwhile further
    /// ones are not accepted: they wait in the listen backlog (4096) for a slot.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..), value_name = "N", allow_negative_numbers = true)]
    pub max_pending: u32,
}

/// Flags every splicing command shares.
#[derive(Args, Debug, Clone)]
pub struct SpliceArgs {
    /// Where bytes move: `kernel` (BPF sockmap), `userspace` (splice(2)), or `auto` (kernel when
    /// the BPF programs load, else userspace with a warning). Both hold back a sender whose
    /// partner does not read (see --kernel-buffer).
    #[arg(long, value_enum, default_value_t = DatapathChoice::Auto)]
    pub datapath: DatapathChoice,
    /// Kernel datapath: a pair starts on splice(2) and joins the kernel's socket maps once this
    /// many bytes have passed (both ways together), a stream was seen (256 KiB one way without a
    /// turn, or reads of 32 KiB both ways: request/response traffic is faster on splice(2)) and
    /// both its queues are empty; short
    /// connections then skip the socket maps' setup cost. 0 joins at once, whatever the traffic.
    /// K, M and G suffixes.
    #[arg(long, default_value = "65536", value_parser = parse_kernel_after, value_name = "BYTES", allow_negative_numbers = true)]
    pub kernel_after: u64,
    /// Kernel datapath: bytes one direction of a pair may hold inside the host beyond the
    /// destination socket's buffers (received from one client, not yet in the send queue towards
    /// the other). A sender past it is held back by TCP flow control until its partner's client
    /// reads. At least 64K (one skb may be that large).
    /// Takes K, M and G suffixes (powers of 1024).
    #[arg(long, default_value = "16M", value_parser = parse_kernel_buffer, value_name = "BYTES", allow_negative_numbers = true)]
    pub kernel_buffer: u64,
    /// Kernel datapath: bytes all kernel pairs' budgets together may hold: at most
    /// kernel-memory / (2 x kernel-buffer) pairs are in the kernel at once, and further pairs
    /// are spliced in user space until some end (beyond its budget a direction may park up to
    /// 16 MiB before its sender's window is closed; a pair with 64 MiB parked one way for 2 s,
    /// which takes clients writing tens of MiB per call to partners that do not read them, is
    /// reset). At least 2 x kernel-buffer. K, M and G suffixes. Left out: 2G, or less on a host
    /// whose TCP memory is small: as many pairs as, each at its worst (2 x (kernel-buffer + 40
    /// MiB) when its clients do not read), stay within half of TCP's memory pressure threshold
    /// (net.ipv4.tcp_mem), past which the kernel fails the sends of such pairs; at least one
    /// (said at start, with a warning where the pairs it lets in could pass that half)
    #[arg(long, value_parser = parse_size, value_name = "BYTES", allow_negative_numbers = true)]
    pub kernel_memory: Option<u64>,
    /// On SIGINT/SIGTERM/SIGHUP (or when a handover to a --takeover process cannot be done), let live
    /// pairs finish for this long before resetting them; seconds. A second such signal, or SIGQUIT,
    /// resets them at once; SIGUSR2 is for --takeover.
    #[arg(long, default_value = "30", value_parser = parse_secs, value_name = "SECS", allow_negative_numbers = true)]
    pub drain_timeout: Duration,
    /// Reset a pair (both clients) when no byte has moved either way for this long: neither
    /// client sent anything, and neither took anything that waited for it (a client that stops
    /// reading holds its partner's bytes, and the pair, only this long). As nginx's stream
    /// proxy_timeout. Seconds: 0 (never), or at least 0.001
    #[arg(long, default_value = "600", value_parser = parse_idle_timeout, value_name = "SECS", allow_negative_numbers = true)]
    pub idle_timeout: Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (IP:PORT, [IPv6]:PORT or HOST:PORT; port 0
    /// picks a free one, shown in the start line). Anyone who can reach ADDR can read them.
    #[arg(long, value_parser = parse_listen, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Upgrade in place: take the listening socket (and the --metrics socket) of the running
    /// skrelay PID and serve it; PID then hands over its live pairs (both sockets, the bytes in
    /// flight, counters) and its clients waiting for a partner or an upstream, and exits. No
    /// client is refused meanwhile. If the handover cannot be done (fewer --threads, another
    /// --datapath, a differently built kernel datapath; waiting clients: another --pair), PID
    /// keeps them and drains. Needs the right to ptrace PID
    /// (root, PID's own user, or CAP_SYS_PTRACE); not with --ports.
    #[arg(long, value_name = "PID", value_parser = clap::value_parser!(i32).range(1..))]
    pub takeover: Option<i32>,
    /// Event loops, one thread each; a pair is served by one loop for its life. The first loop
    /// also accepts and pairs clients (so arrival order and tokens pair exactly as with one), and
    /// keeps a new pair unless it serves more than one pair over the least loaded loop. 0: one per
    /// CPU; at most 1024. The kernel datapath loads its programs and maps once per loop;
    /// --kernel-memory bounds all of them together.
    #[arg(long, default_value_t = 0, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=1024), allow_negative_numbers = true)]
    pub threads: u32,
    /// The kernel datapath's flags given on the command line (`Cli::try_parse_command_line`):
    /// with `--datapath userspace` they do nothing, and the start says so.
    #[arg(skip)]
    pub kernel_flags_given: Vec<&'static str>,
}

/// `--ports`: serve many ports from the one listener (relay and proxy).
#[derive(Args, Debug, Clone, Default)]
pub struct PortsArgs {
    /// Also take TCP connections for these ports (e.g. 7,77,777,8000-8999) on the listen address
    /// (every local address of its family for 0.0.0.0 or [::], and of IPv4 too for a dual-stack
    /// [::]), with a BPF sk_lookup program
    /// that goes away with the process.
    #[arg(long, value_name = "LIST", value_parser = parse_ports)]
    pub ports: Option<PortList>,
}

#[derive(Subcommand, Debug)]
pub enum SteerCommand {
    /// Bind ports (and address prefixes) to a target socket; re-adding a binding replaces its target.
    Add(SteerAddArgs),
    /// Show every binding with its target and hit counters.
    List(SteerListArgs),
    /// Remove bindings.
    Remove(SteerRemoveArgs),
    /// Remove every binding, the program, its link and the pins.
    Reset,
}

#[derive(Args, Debug, Clone)]
#[command(group = clap::ArgGroup::new("target").required(true).args(["to", "pid"]))]
pub struct SteerAddArgs {
    /// Ports and ranges to steer, e.g. 7,77,777,8000-8999; each item is one binding.
    #[arg(long, value_name = "LIST", value_parser = parse_ports)]
    pub ports: PortList,
    /// Local address prefix the binding applies to, e.g. 127.0.0.0/8 or 2001:db8::/32 (repeatable;
    /// default: every address of the family of --to's address, or with --pid of the target
    /// socket's own family: an [::] socket, even a dual-stack one, gets ::/0 only; add
    /// --addr 0.0.0.0/0 for its IPv4 connections). The longest matching prefix wins.
    #[arg(long = "addr", value_name = "CIDR", value_parser = parse_prefix)]
    pub addrs: Vec<Prefix>,
    /// Protocol of the connections (TCP, to a listening socket) or datagrams (UDP, to a bound
    /// socket) to steer.
    #[arg(long, value_enum, default_value_t = Proto::Tcp)]
    pub proto: Proto,
    /// The target: the socket listening (TCP) or bound (UDP) at this address, in whatever process.
    #[arg(long, value_name = "ADDR:PORT", conflicts_with_all = ["pid", "fd"], value_parser = parse_target)]
    pub to: Option<SocketAddr>,
    /// The target: process PID's descriptor --fd (taken with pidfd_getfd; needs ptrace rights).
    #[arg(long, requires = "fd", value_parser = clap::value_parser!(i32).range(1..), allow_negative_numbers = true)]
    pub pid: Option<i32>,
    /// With --pid: the descriptor number of the listening (or bound) socket in that process, as
    /// `ls -l /proc/PID/fd` shows it.
    #[arg(long, requires = "pid", value_parser = clap::value_parser!(i32).range(0..), allow_negative_numbers = true)]
    pub fd: Option<i32>,
}

#[derive(Args, Debug, Clone)]
pub struct SteerRemoveArgs {
    /// Ports and ranges of the bindings to remove, each as it was added (e.g. 7,77,8000-8999): a
    /// binding is removed whole (part of a range is refused, naming the binding).
    #[arg(long, value_name = "LIST", value_parser = parse_ports)]
    pub ports: PortList,
    /// Prefix of the bindings to remove (repeatable; default: 0.0.0.0/0 and ::/0).
    #[arg(long = "addr", value_name = "CIDR", value_parser = parse_prefix)]
    pub addrs: Vec<Prefix>,
    /// Protocol of the bindings to remove.
    #[arg(long, value_enum, default_value_t = Proto::Tcp)]
    pub proto: Proto,
}

#[derive(Args, Debug, Clone)]
pub struct SteerListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct MetricsArgs {
    /// Address to serve on: IP:PORT, [IPv6]:PORT or HOST:PORT (e.g. 127.0.0.1:9477).
    #[arg(long, value_parser = parse_listen, value_name = "ADDR")]
    pub listen: SocketAddr,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

fn parse_ports(s: &str) -> Result<PortList, String> {
    s.parse()
}

fn parse_prefix(s: &str) -> Result<Prefix, String> {
    s.parse()
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairBy {
    Order,
    Token,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatapathChoice {
    Auto,
    Kernel,
    Userspace,
}

/// A byte count: digits with an optional K, M or G suffix (powers of 1024). Digits too many for
/// any count are "too large", as a product that overflows is, not "not a byte count".
fn byte_count(s: &str, examples: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let too_large = || format!("`{s}` is too large: byte counts go up to {}G", u64::MAX >> 30);
    let n: u64 = digits.parse().map_err(|_| {
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            too_large()
        } else {
            format!("`{s}` is not a byte count (e.g. {examples})")
        }
    })?;
    n.checked_mul(1 << shift).ok_or_else(too_large)
}

/// A byte count: `4194304`, `64K`, `4M` (powers of 1024), below 4 GiB.
pub fn parse_bytes(s: &str) -> Result<u32, String> {
    let bytes = byte_count(s, "65536, 64K, 4M")?;
    u32::try_from(bytes).map_err(|_| format!("`{s}` is too large: at most 4G - 1 bytes"))
}

/// A byte count: digits with an optional K, M or G suffix (powers of 1024); never 0.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bytes = byte_count(s, "65536, 512K, 4M, 1G")?;
    if bytes == 0 {
        return Err("must be more than 0 bytes".into());
    }
    Ok(bytes)
}

/// `--kernel-after`: a byte count (K, M and G suffixes), 0 included.
pub fn parse_kernel_after(s: &str) -> Result<u64, String> {
    byte_count(s, "65536, 512K, 4M, 1G, or 0")
}

/// `--kernel-buffer`: a byte count of at least 64 KiB. The verdict sees skbs of up to 64 KiB, and
/// a budget below one would park nearly every one of them in user space.
pub fn parse_kernel_buffer(s: &str) -> Result<u64, String> {
    let bytes = parse_size(s)?;
    if bytes < 64 << 10 {
        return Err(format!("`{s}` is less than 64K, the size of one skb the kernel datapath may move at once"));
    }
    Ok(bytes)
}

impl SpliceArgs {
    /// How many event loops serve pairs: --threads, or one per CPU.
    pub fn threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        }
    }
}

/// Seconds, whole or decimal (`30`, `0.5`).
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 =
        s.trim().parse().map_err(|_| format!("`{s}` is not a number of seconds (give e.g. 30 or 0.5, no unit)"))?;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("`{s}` is not a number of seconds between 0 and 1e9"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `--idle-timeout`: 0 (never), or at least 1 ms (below that every pair would be cut between two
/// bytes; and a value the clock rounds to 0 would silently mean never).
pub fn parse_idle_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_secs(s)?;
    if d.is_zero() && s.trim().parse::<f64>().is_ok_and(|v| v == 0.0) {
        return Ok(Duration::ZERO);
    }
    if d < Duration::from_millis(1) {
        return Err(format!(
            "`{s}` seconds is too short to tell an idle pair from a busy one: give 0 (never) or at least 0.001"
        ));
    }
    Ok(d)
}

/// A timeout that something must be able to happen within: seconds, at least 1 ms. A timeout of 0
/// would close or reset every client before it could pair or connect.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_secs(s)?;
    if d < Duration::from_millis(1) {
        return Err(format!(
            "`{s}` seconds is under a millisecond, which leaves no time: every client would be reset before it \
             could pair (relay) or its upstream connection be made (proxy) (give at least 0.001)"
        ));
    }
    Ok(d)
}

/// `proxy --connect-timeout`: as `parse_timeout`, said of upstream connections alone (it told of
/// pairing, which this flag has nothing to do with: a helper's README pass).
pub fn parse_connect_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_secs(s)?;
    if d < Duration::from_millis(1) {
        return Err(format!(
            "`{s}` seconds is under a millisecond, which leaves no time: every upstream would be skipped before \
             it could accept the connection (give at least 0.001)"
        ));
    }
    Ok(d)
}

/// `[fe80::1%eth0]:PORT` as `[fe80::1%2]:PORT`: the standard parser takes a scope only as a
/// number. Anything else comes back as it is (an unknown interface too: the parser then says so).
pub fn numeric_scope(s: &str) -> std::borrow::Cow<'_, str> {
    let Some((head, rest)) = s.split_once('%') else { return s.into() };
    let Some((scope, tail)) = rest.split_once(']') else { return s.into() };
    if !head.starts_with('[') || scope.is_empty() || scope.bytes().all(|b| b.is_ascii_digit()) {
        return s.into();
    }
    let index = crate::sys::interface_index(scope);
    if index == 0 {
        return s.into();
    }
    format!("{head}%{index}]{tail}").into()
}

/// The error for an `[IPv6%IFACE]:PORT` whose interface does not exist (name resolution would
/// only say "Name or service not known"), if `s` is one.
pub fn unknown_scope(s: &str) -> Option<String> {
    let (head, rest) = s.split_once('%')?;
    let (scope, _) = rest.split_once(']')?;
    if !head.starts_with('[') || scope.is_empty() {
        return None;
    }
    // Only a link-local (or multicast) address is of one interface; on another the kernel drops
    // the scope without a word (a re-check pass: `--listen [::1%2]:80`).
    if let Ok(ip) = head[1..].parse::<std::net::Ipv6Addr>() {
        if !ip.is_unicast_link_local() && !ip.is_multicast() {
            return Some(format!(
                "`{s}`: only a link-local address (fe80::/10) is of one interface; {ip} is not, so leave out \
                 `%{scope}`"
            ));
        }
    }
    if scope.bytes().all(|b| b.is_ascii_digit()) {
        // A number is an interface index; one no interface has was taken, and matched a socket
        // on the wildcard address (a re-check pass: `--to [fe80::5%99]:P`).
        let index = match scope.parse::<u32>() {
            Ok(0) => return None,
            Ok(index) => index,
            // Too large for an index: it was "cannot resolve", as a host name (a re-check pass).
            Err(_) => u32::MAX,
        };
        let known = crate::sys::interface_name(index).is_some();
        return (!known).then(|| {
            format!(
                "`{s}` names no network interface with index {scope} in this network namespace (`ip -o link` lists \
                 them; an interface can be given by name, e.g. [fe80::1%eth0]:7777)"
            )
        });
    }
    (numeric_scope(s) == s).then(|| {
        format!(
            "`{s}` names no network interface `{scope}` (give an interface `ip link` lists, e.g. [fe80::1%eth0]:7777)"
        )
    })
}

/// `steer add --to`: the socket's own address, IP:PORT or [IPv6]:PORT (a name would say nothing of
/// which address the socket is bound to).
fn parse_target(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Some(e) = unknown_scope(s).or_else(|| misbracketed(s)) {
        return Err(e);
    }
    // A listening socket has a port of 1 to 65535: port 0 was looked for as a socket, and a port
    // past 65535 called the whole target malformed (a helper's README pass).
    if let Some((host, port)) =
        s.rsplit_once(':').filter(|(h, _)| h.parse::<std::net::IpAddr>().is_ok() || h.starts_with('['))
    {
        let digits = port.strip_prefix(['+', '-']).unwrap_or(port);
        let signed = digits.len() < port.len();
        if !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (signed || !matches!(port.parse::<u16>(), Ok(1..)))
        {
            // Said of TCP and UDP alike: the parser does not know --proto.
            return Err(format!(
                "`{s}`: `{port}` is not the port of a socket to steer to (ports are 1 to 65535; give the address and \
                 port that `ss -ltn`, or `ss -lun` for UDP, shows for {host})"
            ));
        }
    }
    numeric_scope(s).parse::<SocketAddr>().map_err(|_| {
        format!(
            "`{s}` is not IP:PORT: give the address and port the target socket is bound to, as `ss -ltn` shows it \
             (e.g. 127.0.0.1:7777 or [::1]:7777; not a host name)"
        )
    })
}

/// A port as written in an address: digits only. `u16::from_str` takes a leading `+`, which the
/// address parser does not, so `127.0.0.1:+7001` was called "not an IPv4 address" and
/// `localhost:+7001` listened on 7001 (an IPv6 stranger pass).
pub fn port_number(s: &str) -> Option<u16> {
    s.bytes().all(|b| b.is_ascii_digit()).then(|| s.parse().ok()).flatten()
}

/// One port of `accel on --ports`: accel matches single ports, not ranges.
fn parse_accel_port(s: &str) -> Result<u16, String> {
    match port_number(s).ok_or(()) {
        Ok(p) if p > 0 => Ok(p),
        _ if s.contains('-') => {
            Err(format!("`{s}`: accel --ports takes single ports (e.g. 6379,8080), not ranges; list each port"))
        }
        _ => Err(format!("`{s}` is not a port (give ports 1 to 65535, comma-separated, e.g. 6379,8080)")),
    }
}

/// The error for an address whose brackets are wrong, if `s` is one: an IPv6 address without
/// them (`::1:7777` was taken as [::1]:7777, `2001:db8::1:7777` as [2001:db8::1]:7777 though it
/// may be a whole address whose port was forgotten, `::1` was "cannot resolve `:`"), or an IPv4
/// address in them (`[127.0.0.1]:7777`: "cannot resolve"). One rule for every address flag.
pub fn misbracketed(s: &str) -> Option<String> {
    if let Some((inner, after)) = s.strip_prefix('[').and_then(|r| r.split_once(']')) {
        let port = s.rsplit_once("]:").map_or("PORT", |(_, p)| p);
        if inner.parse::<std::net::Ipv4Addr>().is_ok() {
            return Some(format!("`{s}`: brackets are for IPv6 addresses only (give {inner}:{port})"));
        }
        // Brackets hold an IPv6 address, never a name: `[:::1]:7777` and `[fe80::1%]:7777` were
        // "cannot resolve", and `[::1]7777` "`1]7777` is not a port" (an IPv6 stranger pass).
        let (addr, scope) = inner.split_once('%').map_or((inner, None), |(a, sc)| (a, Some(sc)));
        if addr.parse::<std::net::Ipv6Addr>().is_err() || scope == Some("") {
            return Some(format!(
                "`[{inner}]` is not an IPv6 address (e.g. [::1]:7777, or [fe80::1%eth0]:7777 for a link-local one)"
            ));
        }
        if after.starts_with(']') {
            return Some(format!("`{s}` has a `]` too many (e.g. [{inner}]:7777)"));
        }
        if !after.is_empty() && !after.starts_with(':') {
            return Some(format!("`{s}`: a colon goes between the address and its port (give [{inner}]:{after})"));
        }
        return None;
    }
    if s.starts_with('[') {
        return Some(format!("`{s}` has no closing `]` (an IPv6 address goes in brackets: [::1]:7777)"));
    }
    if s.matches(':').count() < 2 {
        return None;
    }
    let v6 = |a: &str| {
        let (addr, scope) = a.split_once('%').unwrap_or((a, ""));
        addr.parse::<std::net::Ipv6Addr>().is_ok() && !scope.contains(':')
    };
    // `::1:7777` is an address of its own as well as ::1 with port 7777: say both.
    let split = s.rsplit_once(':').filter(|(addr, port)| port_number(port).is_some() && v6(addr));
    Some(match (v6(s), split) {
        (true, Some((addr, port))) => format!(
            "`{s}`: an IPv6 address with a port needs brackets (give [{addr}]:{port}, or [{s}]:PORT if all of it \
             is the address)"
        ),
        (true, None) => format!("`{s}` has no port (an IPv6 address goes in brackets before its port: [{s}]:7777)"),
        (false, Some((addr, port))) => {
            format!("`{s}`: an IPv6 address with a port needs brackets (give [{addr}]:{port})")
        }
        (false, None) => format!("`{s}`: an IPv6 address with a port needs brackets (e.g. [2001:db8::1]:7777)"),
    })
}

/// `--listen`: IP:PORT, [IPv6]:PORT, or HOST:PORT resolved now, to the name's first IPv4 address
/// (else its first IPv6 one) so that `localhost:7777` means 127.0.0.1:7777 like the default.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    // Spaces around it (a quoted variable of a unit file): ` [::1]:7001` read as a missing bracket.
    let s = s.trim();
    if let Some(e) = misbracketed(s).or_else(|| unknown_scope(s)) {
        return Err(e);
    }
    if let Ok(addr) = numeric_scope(s).parse::<SocketAddr>() {
        return Ok(addr);
    }
    let no_port = || format!("`{s}` has no port (give IP:PORT, [IPv6]:PORT or HOST:PORT, e.g. localhost:7777)");
    // A bracketed IPv6 address with nothing after it (`[::1]`) has no port either.
    let Some((host, port)) = s.rsplit_once(':').filter(|(_, port)| !port.ends_with(']')) else {
        if port_number(s).is_some() {
            // A port alone (`--listen 7777`): the address is what is missing.
            return Err(format!(
                "`{s}` has no address (give 127.0.0.1:{s} for this host, 0.0.0.0:{s} for every IPv4 address, or \
                 [::]:{s} for every address)"
            ));
        }
        return Err(no_port());
    };
    if port.is_empty() {
        return Err(no_port());
    }
    port_number(port).ok_or_else(|| format!("`{port}` is not a port (ports are 0 to 65535)"))?;
    if host.is_empty() {
        return Err(format!(
            "`{s}` has no address (give 0.0.0.0:{port} for every IPv4 address, [::]:{port} for every address, or \
             127.0.0.1:{port})"
        ));
    }
    if host.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!("`{host}` is not an IPv4 address (four numbers of 0 to 255, e.g. 127.0.0.1)"));
    }
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(s)
        .map_err(|e| format!("cannot resolve `{host}`: {e} (give IP:PORT, [IPv6]:PORT or a HOST:PORT that resolves)"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("`{host}` resolves to no address (give IP:PORT or [IPv6]:PORT)"))
}

impl AccelPolicyArgs {
    /// The policy the flags give when left out (their `default_value`s, checked by a test).
    pub const DEFAULT: AccelPolicyArgs = AccelPolicyArgs { max_queued: None, small_write: None };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_need_brackets_and_ipv4_ones_none() {
        for (given, says) in [
            ("::1:7777", "needs brackets (give [::1]:7777, or [::1:7777]:PORT if all of it is the address)"),
            ("2001:db8::1:7777", "needs brackets (give [2001:db8::1]:7777, or [2001:db8::1:7777]:PORT"),
            ("fe80::1%lo:7777", "needs brackets (give [fe80::1%lo]:7777)"),
            ("::1", "has no port (an IPv6 address goes in brackets before its port: [::1]:7777)"),
            ("fe80::1%lo", "has no port"),
            ("[127.0.0.1]:7777", "brackets are for IPv6 addresses only (give 127.0.0.1:7777)"),
            ("[:::1]:7777", "`[:::1]` is not an IPv6 address (e.g. [::1]:7777"),
            ("[fe80::1%]:7777", "`[fe80::1%]` is not an IPv6 address"),
            ("[localhost]:7777", "`[localhost]` is not an IPv6 address"),
            ("[::1]7777", "a colon goes between the address and its port (give [::1]:7777)"),
            ("[::1]]:7777", "has a `]` too many (e.g. [::1]:7777)"),
            ("[::1", "has no closing `]`"),
            ("[::1:7777", "has no closing `]`"),
        ] {
            let e = parse_listen(given).unwrap_err();
            assert!(e.contains(says), "{given}: {e}");
            assert!(parse_target(given).unwrap_err().contains(says), "{given}");
        }
        assert_eq!(parse_listen(" [::1]:7777 "), Ok("[::1]:7777".parse().unwrap()));
        // A sign is no part of a port (`u16::from_str` takes `+`), and an empty port is missing.
        for s in ["127.0.0.1:+7001", "[::1]:+7001", "localhost:+7001"] {
            assert_eq!(parse_listen(s).unwrap_err(), "`+7001` is not a port (ports are 0 to 65535)", "{s}");
        }
        assert!(parse_listen("[::1]:").unwrap_err().contains("has no port"));
        assert_eq!(port_number("+80"), None);
        assert_eq!(port_number("80"), Some(80));
        assert_eq!(parse_target("\t127.0.0.1:7777"), Ok("127.0.0.1:7777".parse().unwrap()));
        // A port no listening socket has: said so, not looked for, nor the whole target malformed.
        for (given, port) in [
            ("127.0.0.1:0", "0"),
            ("127.0.0.1:70000", "70000"),
            ("[::1]:0", "0"),
            ("[::1]:65536", "65536"),
            ("127.0.0.1:+0", "+0"),
        ] {
            let e = parse_target(given).unwrap_err();
            assert!(
                e.contains(&format!("`{port}` is not the port of a socket to steer to (ports are 1 to 65535")),
                "{e}"
            );
        }
        assert!(parse_target("127.0.0.1:x").unwrap_err().contains("is not IP:PORT"));
        assert!(parse_target("[fe80::1%lo]:0").unwrap_err().contains("is not the port of a socket to steer to"));
        assert!(parse_target("127.0.0.1:-1").unwrap_err().contains("`-1` is not the port of a socket to steer to"));
        assert!(parse_target("127.0.0.1:+7001")
            .unwrap_err()
            .contains("`+7001` is not the port of a socket to steer to"));
        for fine in ["[::1]:7777", "127.0.0.1:7777", "[fe80::1%1]:7777", "[::ffff:127.0.0.1]:7777"] {
            assert_eq!(misbracketed(fine), None, "{fine}");
        }
    }

    #[test]
    fn a_link_local_scope_may_be_an_interface_name() {
        assert_eq!(parse_listen("[fe80::1%lo]:7777").unwrap(), parse_listen("[fe80::1%1]:7777").unwrap());
        assert_eq!(numeric_scope("[fe80::1%no-such-if]:7777"), "[fe80::1%no-such-if]:7777");
        assert_eq!(numeric_scope("127.0.0.1:7777"), "127.0.0.1:7777");
        let e = parse_listen("[fe80::1%no-such-if]:7777").unwrap_err();
        assert!(e.contains("names no network interface `no-such-if`"), "{e}");
        assert!(parse_target("[fe80::1%no-such-if]:7777").unwrap_err().contains("no network interface"));
        assert_eq!(unknown_scope("[fe80::1%lo]:7777"), None);
        assert_eq!(unknown_scope("[fe80::1%1]:7777"), None);
        // An index no interface has (lo is always 1; 4,000,000 is not given out here).
        let e = unknown_scope("[fe80::1%4000000]:7777").unwrap();
        assert!(e.contains("no network interface with index 4000000"), "{e}");
        assert!(parse_listen("[fe80::1%4000000]:7777").is_err());
        assert!(parse_target("[fe80::1%4000000]:7777").is_err());
        let e = parse_listen("[::1%1]:7777").unwrap_err();
        assert!(e.contains("only a link-local address (fe80::/10) is of one interface; ::1 is not"), "{e}");
        assert!(parse_target("[::ffff:127.0.0.1%lo]:7777").is_err());
        let e = parse_target("[fe80::1%4294967296]:7777").unwrap_err();
        assert!(e.contains("no network interface with index 4294967296"), "{e}");
    }

    #[test]
    fn kernel_after_takes_suffixes_and_zero() {
        assert_eq!(parse_kernel_after("64K"), Ok(65536));
        assert_eq!(parse_kernel_after("0"), Ok(0));
        // 0 with a suffix is 0 all the same (a stranger pass was told "must be more than 0 bytes").
        assert_eq!(parse_kernel_after("0M"), Ok(0));
        assert_eq!(parse_kernel_after("0k"), Ok(0));
        assert_eq!(parse_kernel_after("1M"), Ok(1 << 20));
        assert!(parse_kernel_after("-1").is_err());
        // Too many digits and too large a product read alike (a helper saw the first called
        // "not a byte count").
        for big in ["99999999999999999999999", "99999999999999999G"] {
            let want = format!("`{big}` is too large: byte counts go up to 17179869183G");
            assert_eq!(parse_kernel_after(big), Err(want.clone()));
            assert_eq!(parse_size(big), Err(want.clone()));
            assert_eq!(parse_bytes(big), Err(want));
        }
        assert_eq!(parse_bytes("4G"), Err("`4G` is too large: at most 4G - 1 bytes".to_string()));
        assert_eq!(parse_bytes("64k"), Ok(65536));
        assert!(parse_size("12X").unwrap_err().contains("is not a byte count"));
        assert!(parse_idle_timeout("1e-10").is_err());
        assert_eq!(parse_idle_timeout("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn every_command_parses_and_notes_the_kernel_flags_given_only_where_it_has_them() {
        // Asking clap for an id a subcommand lacks panics in a debug build (CI's).
        for args in [&["skrelay", "probe"][..], &["skrelay", "status"], &["skrelay", "accel", "off", "--cgroup", "x"]] {
            Cli::try_parse_args(args).unwrap();
        }
        let cli =
            Cli::try_parse_args(["skrelay", "proxy", "--upstream", "127.0.0.1:1", "--kernel-memory", "64M"]).unwrap();
        let Command::Proxy(p) = cli.command else { panic!("not proxy") };
        assert_eq!(p.common.kernel_flags_given, ["--kernel-memory"]);
        let cli = Cli::try_parse_args(["skrelay", "relay", "--listen", "127.0.0.1:1"]).unwrap();
        let Command::Relay(r) = cli.command else { panic!("not relay") };
        assert!(r.listen_given && r.common.kernel_flags_given.is_empty());
    }

    #[test]
    fn the_accel_policy_default_is_what_the_flags_default_to() {
        let cli = Cli::try_parse_from(["skrelay", "accel", "run", "--", "true"]).unwrap();
        let Command::Accel(AccelCommand::Run { policy, .. }) = cli.command else { panic!("not accel run") };
        assert_eq!(policy, AccelPolicyArgs::DEFAULT);
    }
}
