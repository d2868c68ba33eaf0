//! `skrelay relay`: pair clients of one listener and splice each pair.
use crate::{
    cli::{DatapathChoice, PairBy, PortsArgs, RelayArgs, SpliceArgs},
    datapath::{
        self,
        budget::{Limits, DEFAULT_TOTAL},
    },
    error::Error,
    metrics::{self, Metrics},
    server::{self, Partnering, Server, ServerConfig},
    steer::{self, funnel::TakenBy, Funnel, PortList},
    systemd,
    takeover::{self, Handover},
};
use mio::net::TcpListener;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub fn run(args: RelayArgs) -> Result<(), Error> {
    // Known for a relay or proxy by other skrelay commands under any binary name.
    crate::sys::name_this_process(c"skrelay");
    crate::sys::CARRIES_CONNECTIONS.store(true, std::sync::atomic::Ordering::Relaxed);
    // Until the event loop handles them (`Server::new`).
    let held = crate::sys::StopSignalsHeld::new();
    let Opened {
        threads,
        datapaths,
        listening: Listening { listener, metrics: taken_metrics, handover, named },
        notes,
    } = open("relay", &[args.listen.port()], args.listen, args.listen_given, &args.common, &args.ports)
        .map_err(|e| held.keep_if_stopped(e))?;
    let datapath = datapaths[0].name();
    let addr = listener.local_addr().unwrap_or(args.listen);
    let dual_stack = addr.is_ipv6() && !crate::sys::v6only(&listener);
    metrics_outside_ports(args.common.metrics, addr, dual_stack, args.ports.ports.as_ref(), "relayed as a client")?;
    let metrics = Metrics::new(&metrics::datapath_labels(datapath));
    let served = metrics::start(args.common.metrics, &metrics, taken_metrics)?;
    let config = ServerConfig {
        listen: args.listen,
        partnering: Partnering::Clients(args.pair),
        max_pending: args.max_pending as usize,
        pair_timeout: args.pair_timeout,
        drain_timeout: args.common.drain_timeout,
        idle_timeout: args.common.idle_timeout,
        metrics,
    };
    // Attached before the first log line so "listening" means every port is served; dropped
    // (detached) when run() returns, and by the kernel if the process dies.
    let _funnel = match &args.ports.ports {
        Some(ports) => Some(funnel(&listener, addr, ports)?),
        None => None,
    };
    let pairing = match args.pair {
        PairBy::Order => "pairing clients in arrival order",
        PairBy::Token => "pairing clients by their token line",
    };
    say_notes(notes);
    datapath::note_host_settings(&datapaths);
    // "listening" once the event loops exist: a process short of descriptors failed after it.
    let mut server = Server::new(listener, datapaths, config)?;
    drop(held);
    check_descriptors()?;
    // Before the start line, which would read as fully working; after a takeover's commit:
    // looking through every BPF program takes a while, which held the old process mid-handover
    // for a second `--takeover` to meet.
    let taking_over = handover.is_some();
    if !taking_over {
        warn_if_taken_away(addr, named);
    }
    log::info!("listening on {addr}: {pairing}, {datapath} datapath, {}{}", loops(threads), metrics_note(served));
    serving(&mut server, handover, addr)?;
    if taking_over {
        warn_if_taken_away(addr, named);
    }
    server.run()
}

/// What `relay` and `proxy` open before they differ.
pub struct Opened {
    pub threads: usize,
    /// One per event loop.
    pub datapaths: Vec<Box<dyn datapath::Datapath>>,
    pub listening: Listening,
    /// What to say at start, once the command's own checks have passed (`say_notes`): said
    /// before them, a start refused a moment later began with lines about pairs that never came
    /// (a new-user pass).
    pub notes: Vec<(log::Level, String)>,
}

/// Logs the start notes of `open`.
pub fn say_notes(notes: Vec<(log::Level, String)>) {
    for (level, note) in notes {
        log::log!(level, "{note}");
    }
}

/// Checks what must hold before anything is bound or taken over (a `--takeover` refused later
/// would leave nobody serving): `serves` (the listening port first) outside an accelerated
/// cgroup, the privilege `--ports` needs. Then opens the datapaths and the listening socket (`listening`).
pub fn open(
    command: &'static str,
    serves: &[u16],
    listen: SocketAddr,
    listen_given: bool,
    common: &SpliceArgs,
    ports: &PortsArgs,
) -> Result<Opened, Error> {
    // A takeover without --listen serves the old process's port, not the default (whose number
    // the refusal named: a helper's pass).
    let taken_ports: Vec<u16> = match common.takeover {
        Some(pid) if !listen_given => crate::running::servers()
            .into_iter()
            .find(|s| i64::from(s.pid) == i64::from(pid))
            .map(|s| s.listening.iter().map(SocketAddr::port).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    let serves: Vec<u16> = match taken_ports.is_empty() {
        true => serves.to_vec(),
        false => taken_ports.into_iter().chain(serves.iter().skip(1).copied()).collect(),
    };
    let unchecked = outside_accel(command, &serves)?;
    if ports.ports.is_some() {
        crate::steer::funnel::check_privilege()?;
    }
    if common.datapath == DatapathChoice::Userspace && !common.kernel_flags_given.is_empty() {
        log::warn!(
            "{} only shape{} the kernel datapath: with --datapath userspace {} nothing",
            common.kernel_flags_given.join(" and "),
            if common.kernel_flags_given.len() == 1 { "s" } else { "" },
            if common.kernel_flags_given.len() == 1 { "it does" } else { "they do" }
        );
    }
    let threads = common.threads();
    let (limits, tcp_memory_note) = kernel_limits(common);
    let datapaths = datapath::open(common.datapath, common.kernel_after, limits, threads)?;
    let listening = listening(listen, listen_given, common, ports, command)?;
    crate::sys::arm_for_clients(&listening.listener)
        .map_err(|e| Error::io("cannot set the options of the listening socket", e))?;
    // Said once the port is ours: before, it came ahead of the error that stopped the start (a
    // port below 1024 without root), and read as its cause (a new-user pass).
    let mut notes: Vec<(log::Level, String)> = unchecked.into_iter().map(|w| (log::Level::Warn, w)).collect();
    if datapaths.first().is_some_and(|d| d.name() == "kernel") {
        notes.extend(tcp_memory_note);
    }
    Ok(Opened { threads, datapaths, listening, notes })
}

/// What kernel pairs may hold: `--kernel-memory` as given or, left out, 2G or less on a host
/// whose TCP memory is small (`Limits::default_total`); and what to say of it at start: how many
/// pairs the host's TCP memory lowered the default to, or a warning when the pairs a given
/// `--kernel-memory` lets in could push the host's TCP memory past its pressure threshold.
fn kernel_limits(common: &SpliceArgs) -> (Limits, Option<(log::Level, String)>) {
    let per_direction = common.kernel_buffer;
    let pressure = crate::sys::tcp_memory_pressure_threshold();
    let given = common.kernel_memory.is_some();
    let total = common.kernel_memory.unwrap_or_else(|| Limits::default_total(per_direction, pressure.map(|p| p.0)));
    let limits = Limits { per_direction, total };
    let Some((pressure, read)) = pressure else { return (limits, None) };
    let worst = Limits::worst_per_pair(per_direction);
    let fit = Limits::pairs_within_tcp_memory(per_direction, pressure);
    let pairs = limits.max_pairs() as u64;
    let threshold = match read {
        true => format!("TCP's memory pressure threshold (net.ipv4.tcp_mem: {})", size(pressure)),
        false => format!(
            "TCP's memory pressure threshold ({}: net.ipv4.tcp_mem's default, 1/16 of the memory; the host's \
             setting does not show in this network namespace)",
            size(pressure)
        ),
    };
    let at_worst = pairs.saturating_mul(worst);
    let note = if at_worst > pressure / 2 {
        // A given --kernel-memory that lets in more pairs than fit, or a --kernel-buffer so large
        // that one pair alone passes the half (the default still lets one pair in).
        let fix = if pairs > fit {
            match given {
                true => format!(
                    "leave --kernel-memory out for {fit} pair(s) here, or give at most {}",
                    size(fit * 2 * per_direction)
                ),
                false => "give a smaller --kernel-memory".to_string(),
            }
        } else {
            "lower --kernel-buffer".to_string()
        };
        Some((
            log::Level::Warn,
            format!(
                "kernel datapath: {pairs} pair(s) in the kernel at once (--kernel-memory {}{}) may hold up to {} \
                 when their clients do not read, more than half of {threshold}: past it the kernel fails the sends \
                 of such pairs, which then stall or are reset ({fix})",
                size(total),
                if given { "" } else { " by default" },
                size(at_worst)
            ),
        ))
    } else if !given && total < DEFAULT_TOTAL {
        Some((
            log::Level::Info,
            format!(
                "kernel datapath: at most {pairs} pair(s) in the kernel at once (--kernel-memory defaults to {} on \
                 this host): each may hold up to {} when its clients do not read, and together they stay within \
                 half of {threshold}; further pairs are spliced in user space",
                size(total),
                size(worst)
            ),
        ))
    } else {
        None
    };
    (limits, note)
}

/// A byte count as the K/M/G suffixes the flags take, exact: "192 MiB", "1152 KiB", "1000 bytes"
/// (whole MiB alone said "1 MiB" for 1152 KiB, and told a user who gave 1280K to give at most
/// "1 MiB": a re-check pass).
fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        // Not a count one would give (1/16 of the memory): to a tenth of a MiB.
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / 1048576.0),
        b => format!("{b} bytes"),
    }
}

/// Fewer spare descriptors than this at start get a warning: a relay that starts with one or two
/// left serves almost nobody, in silence (a helper's churn pass: 1 spare under `ulimit -n 34`).
const FEW_DESCRIPTORS: u64 = 256;

/// The fewest descriptors the commands that report pinned state (status, steer list, accel
/// status, metrics) need: under fewer, a map, a link or a /proc file that could not be opened was taken
/// for state that is not there (`steer list` showed live targets as gone with 0 hits, exit 0;
/// `accel status` blamed another skrelay version: a re-check pass at `prlimit --nofile=9`).
pub const COMMAND_DESCRIPTORS: u64 = 32;

/// Refuses to run `command` with fewer than `COMMAND_DESCRIPTORS` free under RLIMIT_NOFILE (its
/// soft limit raised to the hard one first): under the limit, or with most of it taken by
/// descriptors the command inherited (a helper's 55 of 64: every target read as gone or exited,
/// every counter 0, exit 0).
pub fn command_descriptors(command: &str) -> Result<(), Error> {
    let limit = crate::sys::raise_fd_limit();
    if limit < COMMAND_DESCRIPTORS {
        return Err(Error::Usage(format!(
            "`skrelay {command}` needs at least {COMMAND_DESCRIPTORS} open files to read skrelay's state, and the \
             limit is {limit} ({})",
            crate::error::RAISE_NOFILE
        )));
    }
    let open = open_descriptors(limit);
    if limit.saturating_sub(open) < COMMAND_DESCRIPTORS {
        return Err(Error::Usage(format!(
            "`skrelay {command}` needs at least {COMMAND_DESCRIPTORS} free open files to read skrelay's state, and \
             {open} of its limit of {limit} are in use, inherited from the process that ran it (close them there, \
             or {})",
            crate::error::RAISE_NOFILE
        )));
    }
    Ok(())
}

/// Descriptors open under `limit` (one inherited above it takes none of its numbers), less the one
/// that lists them; all of them where none is left to list them with.
fn open_descriptors(limit: u64) -> u64 {
    match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d
            .flatten()
            .filter(|e| e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n < limit))
            .count()
            .saturating_sub(1) as u64,
        Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE)) => limit,
        Err(_) => 0,
    }
}

/// Warns when the descriptor limit (already raised to its hard limit, `Server::new`) leaves few
/// for clients once this process's own are open, and refuses to start when not even one pair's
/// two fit: such a relay accepted one client at a time and never its partner, resetting each at
/// `--pair-timeout` (a helper's resource-limits pass, `ulimit -n 20`).
pub fn check_descriptors() -> Result<(), Error> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX);
    let open = open_descriptors(limit);
    let spare = limit.saturating_sub(open);
    if spare < 2 {
        return Err(Error::Usage(format!(
            "cannot serve clients: {spare} descriptor(s) are left under the limit of {limit} ({open} are open), and \
             each pair takes two ({})",
            crate::error::RAISE_NOFILE
        )));
    }
    if spare < FEW_DESCRIPTORS {
        log::warn!(
            "only {spare} descriptors are left for clients (the limit is {limit}, {open} are open): each pair takes \
             two, and a userspace pair moving bytes two more ({})",
            crate::error::RAISE_NOFILE
        );
    }
    Ok(())
}

/// Warns when connections to `addr`, where this process listens (`flag`), go elsewhere: another
/// process's `--ports` or a `skrelay steer` binding takes them first.
pub fn warn_if_taken_away(addr: SocketAddr, flag: &str) {
    // `--listen ADDR`, or `the socket systemd passed (ADDR)`.
    let subject = if flag.starts_with("--") { format!("{flag} {addr}") } else { format!("{flag} ({addr})") };
    match crate::steer::funnel::taken_from(addr) {
        Some(TakenBy::Known(who)) => log::warn!(
            "{subject}: {who}, which takes the connections it covers before this listener sees them: it gets \
             none of those while that lasts (listen on another port, or remove that steering)"
        ),
        Some(TakenBy::Unreadable) => log::warn!(
            "{subject}: `skrelay steer` has bindings in this network namespace that this user cannot read; \
             if one takes port {}, this listener gets none of its connections (check with `skrelay steer list` \
             as root)",
            addr.port()
        ),
        Some(TakenBy::OutOfReach) => log::warn!(
            "{subject}: this user cannot tell whether `skrelay steer` has bindings in this network namespace \
             (its state is in the mount namespace outside this one, which only {} can look into); if one takes port \
             {}, this listener gets none of its connections (check with `skrelay steer list` {})",
            crate::bpffs::outside_who(),
            addr.port(),
            crate::bpffs::run_as()
        ),
        None => {}
    }
}

/// Whether `--ports` steers connections to `addr` to this process's listener on `listen`: its
/// ports at the listen address, or at every local address of its family for a wildcard one (of
/// both families for a dual-stack `[::]`, whose funnel takes `0.0.0.0/0` too: an IPv4 address
/// there was let through, and its scrapes or upstream connections taken as clients; an IPv6
/// stranger pass).
pub fn steered_here(addr: SocketAddr, listen: SocketAddr, dual_stack: bool, ports: &PortList) -> bool {
    let listen = crate::sys::unmapped(listen);
    let mut addr = crate::sys::unmapped(addr);
    match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        IpAddr::V6(v6) if v6.is_unspecified() => addr.set_ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        _ => {}
    }
    // A link-local address keeps its interface (scope) for both checks.
    let at = if listen.ip().is_unspecified() {
        (addr.is_ipv6() == listen.is_ipv6() || (dual_stack && addr.is_ipv4())) && crate::sys::is_local_address(addr)
    } else {
        crate::sys::same_local_ip(addr, listen)
    };
    at && ports.items().iter().any(|r| r.contains(addr.port()))
}

/// Refuses a `--metrics` address that is the listener's own, or whose port `--ports` steers to
/// the listener: every scrape would be taken as a client (`what`) instead of answered, and the
/// start line would promise metrics. `dual_stack`: the listener is a `[::]` that takes IPv4 too.
pub fn metrics_outside_ports(
    metrics: Option<SocketAddr>,
    listen: SocketAddr,
    dual_stack: bool,
    ports: Option<&PortList>,
    what: &str,
) -> Result<(), Error> {
    let Some(m) = metrics else { return Ok(()) };
    let overlaps = if m.is_ipv4() == listen.is_ipv4() {
        m.ip() == listen.ip() || m.ip().is_unspecified() || listen.ip().is_unspecified()
    } else {
        // A [::] socket is dual-stack unless the host says otherwise: it holds its port on every
        // IPv4 address as well.
        if m.is_ipv6() {
            m.ip().is_unspecified()
                && std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|v| v.trim() == "0")
        } else {
            listen.ip().is_unspecified() && dual_stack
        }
    };
    if m.port() != 0 && m.port() == listen.port() && overlaps {
        return Err(Error::Usage(format!(
            "cannot serve metrics on {m}: this process listens for clients on {listen} (pick another --metrics port)"
        )));
    }
    let Some(ports) = ports else { return Ok(()) };
    if m.port() != 0 && steered_here(m, listen, dual_stack, ports) {
        return Err(Error::Usage(format!(
            "cannot serve metrics on {m}: --ports steers port {} at that address to this process, so every scrape \
             would be {what} (pick a --metrics port outside --ports)",
            m.port()
        )));
    }
    Ok(())
}

/// Refuses to serve `ports` from inside a cgroup that `skrelay accel` accelerates on them: its
/// sk_msg program would redirect local clients' bytes past this process's datapath. Ok(Some):
/// it could not tell, and the warning to log says why.
pub fn outside_accel(command: &'static str, ports: &[u16]) -> Result<Option<String>, Error> {
    let r = match crate::accel::accelerating_or_why(std::process::id(), ports) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(None),
        Err(e) => {
            return Ok(Some(format!(
                "cannot check whether skrelay accel accelerates this {command}'s cgroup ({e}): if it does, its local \
                 clients' bytes would go past the datapath (`skrelay accel status` shows what is accelerated)"
            )));
        }
    };
    let list = |p: &[u16]| p.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    Err(Error::InsideAccel {
        command,
        cgroup: r.cgroup.display().to_string(),
        limit: if r.ports.is_empty() { " on every port".into() } else { format!(" on ports {}", list(&r.ports)) },
        ports: list(ports),
    })
}

/// The listening socket and where it came from.
pub struct Listening {
    pub listener: TcpListener,
    /// `--takeover`: the old process's metrics socket, if it served metrics.
    pub metrics: Option<std::net::TcpListener>,
    /// `--takeover`: the old process, to be told to hand over once this one serves.
    pub handover: Option<Handover>,
    /// Where the socket came from, as warnings about its address name it: `--listen`, or the
    /// socket systemd passed or a takeover took (a warning named `--listen` where none was given:
    /// an operator's pass).
    pub named: &'static str,
}

/// The listening socket: taken from the running skrelay `--takeover` names, else the one
/// systemd passed (socket activation), else `listen` bound now. A `--listen` given with
/// `--takeover` must name the socket taken over (a takeover cannot move to another address).
pub fn listening(
    listen: SocketAddr,
    listen_given: bool,
    common: &SpliceArgs,
    ports: &PortsArgs,
    command: &str,
) -> Result<Listening, Error> {
    if let Some(pid) = common.takeover {
        if ports.ports.is_some() {
            return Err(Error::Usage(
                "--takeover cannot be combined with --ports yet: a takeover carries the listening socket and the \
                 live pairs, not a --ports funnel (stop the running process and start this one with --ports instead)"
                    .into(),
            ));
        }
        let taken = takeover::take(pid, command)?;
        // Refused before the old process is told anything: it keeps serving as it was.
        if let Ok(old) = taken.listener.local_addr() {
            let same = old == listen || (listen.port() == 0 && old.ip() == listen.ip());
            if listen_given && !same {
                return Err(Error::Usage(format!(
                    "--listen {listen} differs from the socket of process {pid}, which listens on {old}: a takeover \
                     serves the socket it takes (leave out --listen, or stop process {pid} and start this one)"
                )));
            }
        }
        let addr = taken.listener.local_addr().map_or("?".into(), |a| a.to_string());
        // Nothing is taken from it yet: a start-up error from here on leaves it serving.
        log::info!("holds a copy of the listening socket of process {pid} ({addr}); taking over once ready");
        taken.listener.set_nonblocking(true).map_err(|e| Error::io("cannot use the socket taken over", e))?;
        return Ok(Listening {
            listener: TcpListener::from_std(taken.listener),
            metrics: taken.metrics,
            handover: Some(taken.handover),
            named: "the listening socket taken over",
        });
    }
    let (listener, named) = match systemd::listener()? {
        Some(l) => {
            let addr = l.local_addr().map_or("?".into(), |a| a.to_string());
            let ignored = if listen_given { format!("; --listen {listen} is not used") } else { String::new() };
            log::info!("serving the socket systemd passed ({addr}){ignored}");
            (TcpListener::from_std(l), "the socket systemd passed")
        }
        None => (server::listen(listen)?, "--listen"),
    };
    Ok(Listening { listener, metrics: None, handover: None, named })
}

/// Called once the server watches its socket, before it accepts anyone: takes over the live
/// pairs and waiting clients of the process taken over (which then exits; or, if they cannot
/// move, stops accepting and drains) and tells the service manager that this one is ready.
pub fn serving(server: &mut Server, handover: Option<Handover>, addr: SocketAddr) -> Result<(), Error> {
    if let Some(h) = handover {
        let pid = h.pid;
        server.take_over(h)?;
        log::info!("process {pid} no longer accepts; this one serves {addr}");
    }
    systemd::notify(&format!("READY=1\nSTATUS=listening on {addr}"));
    Ok(())
}

/// The start line's mention of `--threads`.
pub fn loops(threads: usize) -> String {
    match threads {
        1 => "1 event loop".into(),
        n => format!("{n} event loops"),
    }
}

/// The start line's mention of `--metrics`.
pub fn metrics_note(served: Option<std::net::SocketAddr>) -> String {
    // A URL that opens, as `status` gives it, and where it listens when that is every address.
    served
        .map(|a| {
            let every =
                if a.ip().is_unspecified() { format!(" (listening on {a}: every address)") } else { String::new() };
            format!("; metrics at {}{every}", crate::running::metrics_url(a))
        })
        .unwrap_or_default()
}

/// `--ports`: steers the listed ports to the listener, warning about sockets it shadows.
pub fn funnel(
    listener: &impl std::os::fd::AsFd,
    addr: std::net::SocketAddr,
    ports: &steer::PortList,
) -> Result<Funnel, Error> {
    for other in steer::funnel::shadowed(addr, ports) {
        if addr.is_ipv4() && other.is_ipv6() {
            log::warn!(
                "port {}: {other} is served by another socket; unless it is IPv6-only, skrelay takes its IPv4 \
                 connections while it runs",
                other.port()
            );
        } else {
            log::warn!(
                "port {}: {other} is served by another socket; skrelay takes its connections while it runs",
                other.port()
            );
        }
    }
    let funnel = Funnel::attach(listener, addr, ports)?;
    let n = funnel.ports();
    log::info!("--ports: {n} port{} ({ports}) steered to {addr} with BPF sk_lookup", if n == 1 { "" } else { "s" });
    Ok(funnel)
}

#[cfg(test)]
mod tests {
    use super::size;

    #[test]
    fn sizes_are_said_exactly_in_the_units_the_flags_take() {
        assert_eq!(size(2 << 30), "2 GiB");
        assert_eq!(size(192 << 20), "192 MiB");
        assert_eq!(size(1152 << 10), "1152 KiB");
        assert_eq!(size(1000), "1000 bytes");
        assert_eq!(size(1_579_761_408), "1506.6 MiB");
    }
}
