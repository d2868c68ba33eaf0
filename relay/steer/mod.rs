//! Steering: a BPF sk_lookup program hands connections for bound (protocol, local address
//! prefix, port range) triples to a chosen listening socket, ours or another process's.
//!
//! - `skrelay steer ...` pins the program, its maps and its link per network namespace, so the
//!   bindings outlive the command (state.rs); targets are found and duplicated by target.rs.
//! - `--ports` on relay/proxy attaches the same program unpinned for the life of the process
//!   (funnel.rs).
//!
//! The binding model (bindings.rs) is shared: longest prefix wins, then the narrowest port range.
//! A binding whose target socket has closed refuses connections (fail closed).
//!
//! A change is planned first (plan.rs: precedence and capacity, pure), then written by
//! `State::apply`; the pinned record is encoded and decoded by record.rs only. The functions here
//! return values; command.rs renders them for `skrelay steer`, and main.rs prints.
pub mod bindings;
pub mod command;
pub mod funnel;
pub mod plan;
pub mod ports;
pub mod record;
pub mod state;
pub mod target;

pub use bindings::{BindingKey, Prefix};
pub use command::command;
pub use funnel::Funnel;
pub use ports::{PortList, PortRange};

use crate::{
    cli::{SteerAddArgs, SteerRemoveArgs},
    error::Error,
};
use plan::{plan, Limits};
use record::Record;
use serde_json::json;
use state::State;
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Instant,
};
use target::Target;

/// What `steer add` did.
#[derive(Debug)]
pub struct Added {
    /// The target, as `steer add` describes it.
    pub target: TargetView,
    /// A line when the pinned program was swapped for this binary's.
    pub upgraded: Option<String>,
    /// Each binding, in the order asked: new (`None`) or replaced (what it sent to before).
    pub bindings: Vec<(BindingKey, Option<Record>)>,
    /// Other sockets bound where the bindings steer, whose connections now go to the target.
    pub bypassed: Vec<std::net::SocketAddr>,
}

/// The socket bindings send to.
#[derive(Debug, Clone)]
pub struct TargetView {
    pub local: SocketAddr,
    pub pid: u32,
    pub comm: String,
    pub cookie: u64,
    /// SO_REUSEPORT: what is steered to it is spread over its reuseport group by the kernel.
    pub reuse_port: bool,
    /// The interface it is bound to: what arrives elsewhere is dropped.
    pub device: Option<String>,
}

/// `steer add`: binds every (prefix, port item) pair to the target socket.
pub fn add(args: &SteerAddArgs) -> Result<Added, Error> {
    let started = Instant::now();
    let target = match (args.to, args.pid, args.fd) {
        // An IPv4 address in IPv6 form names an IPv4 listener as much as a dual-stack one.
        (Some(addr), None, None) => Target::at(args.proto, crate::sys::unmapped(addr))
            .or_else(|e| Target::at(args.proto, addr).map_err(|_| e))?,
        (None, Some(pid), Some(fd)) => Target::from_process(args.proto, pid, fd)?,
        _ => return Err(Error::Usage("give the target as --to ADDR:PORT or as --pid PID --fd FD".into())),
    };
    // Default: every address of the family the user named in --to (a dual-stack [::] socket found
    // for --to 127.0.0.1:P gets IPv4; so does one for --to [::ffff:127.0.0.1]:P, an IPv4 address
    // in IPv6 form, which sk_lookup sees as IPv4), else of the target socket's own family.
    let default_v6 = args.to.map_or(target.local.is_ipv6(), |a| match a.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().is_none(),
        std::net::IpAddr::V4(_) => false,
    });
    let prefixes = if args.addrs.is_empty() { vec![Prefix::any(default_v6)] } else { args.addrs.clone() };
    for p in &prefixes {
        if !target.accepts_family(p.addr.is_ipv6()) {
            return Err(Error::Usage(format!(
                "the target {} socket at {} cannot take connections to {p} ({}): bind an {} prefix",
                target.proto.name().to_uppercase(),
                target.local,
                if p.addr.is_ipv6() { "IPv6" } else { "IPv4" },
                if target.local.is_ipv6() { "IPv6" } else { "IPv4" },
            )));
        }
    }
    let keys: Vec<BindingKey> = prefixes
        .iter()
        .flat_map(|&prefix| {
            args.ports.items().iter().map(move |&ports| BindingKey { proto: args.proto, prefix, ports })
        })
        .collect();

    // A running relay's or proxy's --ports would keep such ports whichever way the programs run
    // (its funnel refuses ports already bound): refuse rather than report a binding that is not.
    for f in funnel::running() {
        for key in &keys {
            // What it steers of this key: its (protocol, prefix, port) entries, not every port of
            // it at every prefix of it for either protocol (a steer pass: pinned state with UDP
            // 5301-5310 and TCP on 10.9.0.0/16 refused TCP 5305 on 0.0.0.0/0, naming all of its
            // prefixes, and let a UDP binding of 5305 through, which then got no datagram). A
            // running --ports funnel steers TCP only.
            let taking = f.taking(key.proto.ipproto(), &[key.prefix], |p| key.ports.contains(p));
            if !taking.is_empty() {
                let those = if taking.ports().len() == 1 { "that port" } else { "those ports" };
                return Err(Error::Usage(format!(
                    "cannot bind {key}: {} takes {} {}{} ({})",
                    f.owner(),
                    key.proto.name(),
                    taking.describe(),
                    if f.pinned_elsewhere { "" } else { " with --ports while it runs" },
                    f.fix(those)
                )));
            }
        }
    }
    // What cannot fit even empty maps is refused before any state is created; the plan against
    // the bindings there are is checked again below, before any map is written.
    plan(&Default::default(), &keys, &[], Limits::MAPS).map_err(|e| Error::Usage(e.alone()))?;
    state::sweep_stale();
    let (mut st, upgraded) = State::open_or_create()?;
    repair(&mut st)?;
    let before = st.records();
    let existing = before.iter().map(|(id, r)| (*id, r.key)).collect();
    let plan = plan(&existing, &keys, &[], Limits::MAPS).map_err(|e| Error::Usage(e.to_string()))?;
    st.apply(&plan, Some(&target))?;
    log::debug!("steer add: {} port entries written in {:?}", plan.ports.len(), started.elapsed());
    let all: Vec<BindingKey> = existing.values().copied().chain(keys.iter().copied()).collect();
    let bypassed = funnel::bypassed(args.proto, &keys, &all, target.local);
    let mut bindings = Vec::new();
    for key in keys {
        if bindings.iter().any(|(k, _)| *k == key) {
            continue;
        }
        let was = plan.replaced.iter().find(|(_, k)| *k == key).and_then(|(id, _)| before.get(id).cloned());
        bindings.push((key, was));
    }
    let target = TargetView {
        local: target.local,
        pid: target.pid,
        comm: target.comm,
        cookie: target.cookie,
        reuse_port: target.reuse_port,
        device: target.device,
    };
    Ok(Added { target, upgraded, bindings, bypassed })
}

/// `steer remove`: removes the named bindings, all or none. Returns them.
pub fn remove(args: &SteerRemoveArgs) -> Result<Vec<BindingKey>, Error> {
    let nothing = || {
        let ports = if args.ports.ports().len() == 1 { "port" } else { "ports" };
        Error::Usage(format!(
            "there is no {} binding for {ports} {} in this network namespace (see `skrelay steer list`)",
            args.proto.name(),
            args.ports
        ))
    };
    let Some(mut st) = State::open()? else { return Err(nothing()) };
    repair(&mut st)?;
    let existing = st.keys();
    // Without --addr: the bindings `add` makes by default, on every address of either family.
    let explicit = !args.addrs.is_empty();
    let prefixes = if explicit { args.addrs.clone() } else { vec![Prefix::any(false), Prefix::any(true)] };
    // Ports inside a binding of a range (or overlapping bindings) are not bindings of their own:
    // say which bindings hold them, since a binding is removed whole.
    // The bindings of `prefixes` that hold some of `ports`, in order.
    let holding = |ports: PortRange, prefixes: &[Prefix]| {
        let mut holders: Vec<BindingKey> = existing
            .values()
            .filter(|k| k.proto == args.proto && prefixes.contains(&k.prefix))
            .filter(|k| k.ports.lo <= ports.hi && ports.lo <= k.ports.hi)
            .copied()
            .collect();
        holders.sort_by_key(|k| (k.ports.lo, k.ports.hi, k.prefix.to_string()));
        holders.dedup();
        holders
    };
    let missing = |ports: PortRange, prefixes: &[Prefix], otherwise: String| {
        let holders = holding(ports, prefixes);
        if holders.is_empty() {
            return Error::Usage(otherwise);
        }
        let names: Vec<String> = holders.iter().map(|k| k.to_string()).collect();
        let mut own: Vec<String> = holders.iter().map(|k| k.ports.to_string()).collect();
        own.dedup();
        let mut addrs: Vec<String> =
            holders.iter().filter(|_| explicit).map(|k| format!(" --addr {}", k.prefix)).collect();
        addrs.sort();
        addrs.dedup();
        let (what, are, its) = if ports.lo == ports.hi { ("port", "is", "its") } else { ("ports", "are", "their") };
        // Within each binding, or overlapping them (9000-9050 is not within 9000-9010).
        let relation = if holders.iter().all(|k| k.ports.lo <= ports.lo && ports.hi <= k.ports.hi) {
            "within"
        } else {
            "overlapping"
        };
        // The command must name the protocol: without it, it would remove a TCP binding.
        let proto = if args.proto == crate::cli::Proto::Udp { " --proto udp" } else { "" };
        Error::Usage(format!(
            "{what} {ports} {are} not a binding of {its} own but {relation} {}; a binding is removed whole \
             (`skrelay steer remove --ports {}{}{proto}`, then add back the ports that should stay)",
            names.join(" and "),
            own.join(","),
            addrs.concat()
        ))
    };
    let mut doomed = Vec::new();
    for &ports in args.ports.items() {
        let mut found = false;
        for &prefix in &prefixes {
            let key = BindingKey { proto: args.proto, prefix, ports };
            if existing.values().any(|k| *k == key) {
                doomed.push(key);
                found = true;
            } else if explicit {
                let otherwise =
                    format!("there is no binding {key} in this network namespace (see `skrelay steer list`)");
                return Err(missing(ports, &[prefix], otherwise));
            }
        }
        if !found {
            // The same ports bound on other prefixes: name them, with the --addr that removes each
            // (a helper's pass: the overlapping binding on every address was named instead).
            let mut elsewhere: Vec<BindingKey> =
                existing.values().filter(|k| k.proto == args.proto && k.ports == ports).copied().collect();
            elsewhere.sort_by_key(|k| k.prefix.to_string());
            elsewhere.dedup();
            if !elsewhere.is_empty() {
                let proto = if args.proto == crate::cli::Proto::Udp { " --proto udp" } else { "" };
                let addrs: Vec<String> = elsewhere.iter().map(|k| format!(" --addr {}", k.prefix)).collect();
                let names: Vec<String> = elsewhere.iter().map(|k| k.to_string()).collect();
                let (is, its) = if elsewhere.len() == 1 { ("is", "its") } else { ("are", "their") };
                let rest = if args.ports.items().len() > 1 {
                    "; nothing was removed: remove the other --ports with a command of their own"
                } else {
                    ""
                };
                // Ranges on every address that hold these ports are named too (a steer pass was
                // pointed at a /24 binding alone where 0.0.0.0/0 9000-9099 held the port).
                let ranges = holding(ports, &prefixes);
                let within = match ranges.len() {
                    0 => String::new(),
                    _ => format!(
                        "; on 0.0.0.0/0 or ::/0 {} part of {}, which a remove takes whole",
                        match ports.lo == ports.hi {
                            true => "it is",
                            false if ranges.iter().all(|k| k.ports.lo <= ports.lo && ports.hi <= k.ports.hi) =>
                                "they are",
                            false => "some of them are",
                        },
                        ranges.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(" and ")
                    ),
                };
                return Err(Error::Usage(format!(
                    "there is no {} binding for {} {ports} on 0.0.0.0/0 or ::/0 in this network namespace, but there \
                     {is} {}: give {its} --addr (`skrelay steer remove --ports {ports}{}{proto}`{rest}){within}",
                    args.proto.name(),
                    if ports.lo == ports.hi { "port" } else { "ports" },
                    names.join(" and "),
                    addrs.concat()
                )));
            }
            // A binding of the other protocol on these ports: the user left out (or gave) --proto.
            let meets = |k: &&BindingKey| k.ports.lo <= ports.hi && ports.lo <= k.ports.hi;
            let other_proto: Vec<&BindingKey> =
                existing.values().filter(|k| k.proto != args.proto).filter(meets).collect();
            let same_proto_elsewhere = existing.values().filter(|k| k.proto == args.proto).any(|k| meets(&k));
            let fix = if !other_proto.is_empty() {
                let flag = if args.proto == crate::cli::Proto::Udp { "--proto tcp" } else { "--proto udp" };
                let addr =
                    if other_proto.iter().any(|k| prefixes.contains(&k.prefix)) { "" } else { " and its --addr" };
                format!("the binding there is not {}: give {flag}{addr}; see `skrelay steer list`", args.proto.name())
            } else if same_proto_elsewhere {
                "give its --addr; see `skrelay steer list`".to_string()
            } else {
                // No binding of this protocol takes these ports on any address (a steer pass
                // was told to give an --addr that could not help).
                "see `skrelay steer list`".to_string()
            };
            let otherwise = format!(
                "there is no {} binding for {} {ports} on 0.0.0.0/0 or ::/0 in this network namespace ({fix})",
                args.proto.name(),
                if ports.lo == ports.hi { "port" } else { "ports" }
            );
            return Err(missing(ports, &prefixes, otherwise));
        }
    }
    let plan = plan(&existing, &[], &doomed, Limits::MAPS).map_err(|e| Error::Usage(e.to_string()))?;
    st.apply(&plan, None)?;
    Ok(plan.removed.into_iter().map(|(_, key)| key).collect())
}

/// Makes the trie agree with the records before a change: a command killed part-way leaves
/// bindings recorded whose ports are not (or no longer) steered to them. The records are what
/// `steer list` shows, so they win: such a binding works again, and a `remove` that was killed
/// can be run again.
fn repair(st: &mut State) -> Result<(), Error> {
    let written = st.repair()?;
    if written > 0 {
        let entries = if written == 1 { "1 port entry".to_string() } else { format!("{written} port entries") };
        log::warn!(
            "repaired {entries} that an interrupted skrelay command left unwritten: every binding `skrelay steer \
             list` shows is steered again"
        );
    }
    Ok(())
}

/// What `steer reset` removed: how many pins, and where (`None`: there was nothing), and how
/// many states of network namespaces that no longer exist.
#[derive(Debug)]
pub struct Reset {
    pub removed: usize,
    pub dir: Option<PathBuf>,
    pub dead: usize,
    /// Steering of this network namespace pinned in a bpffs this mount namespace does not see,
    /// which this reset could not reach.
    pub elsewhere: Vec<funnel::Running>,
}

/// Links of this network namespace's steering pinned in a bpffs out of this mount namespace's
/// sight (`status` shows them): `list` and `reset` say so instead of "nothing" (a helper's pass).
/// Also the links whose holder this command cannot see (root in a pid namespace of its own: a
/// relay's `--ports` outside it), which it cannot tell from those.
fn pinned_elsewhere() -> Vec<funnel::Running> {
    funnel::running().into_iter().filter(|f| f.pinned_elsewhere || f.pid.is_none()).collect()
}

/// The line `list` and `reset` add for each of `pinned_elsewhere`.
pub fn elsewhere_warning(f: &funnel::Running) -> String {
    let (ports, are) = match f.ports.len() {
        1 => ("port", "is"),
        _ => ("ports", "are"),
    };
    match f.pinned_elsewhere {
        true => format!(
            "WARNING: {ports} {} {are} steered by state pinned in a bpffs this mount namespace does not see \
             (sk_lookup link {}): run skrelay steer in the mount namespace whose bpffs holds it to list or remove it",
            f.port_list(),
            f.link_id
        ),
        // A steer pass: a relay's --ports outside this pid namespace was called pinned state.
        false => format!(
            "WARNING: {ports} {} {are} steered by sk_lookup link {}, whose holder this command cannot see (a \
             process's --ports, or steering pinned in a bpffs out of sight): run `skrelay status` {} in the host's \
             pid namespace to tell",
            f.port_list(),
            f.link_id,
            crate::bpffs::run_as_seeing_all()
        ),
    }
}

/// `steer reset`: unpins everything; the link (and so the program) goes with its last reference.
/// What dead network namespaces left (nobody else can reset it) goes too.
pub fn reset() -> Result<Reset, Error> {
    let dead = state::sweep_stale();
    let elsewhere = pinned_elsewhere();
    let Some(dir) = state::existing_dir()? else {
        state::nothing_or_out_of_reach()?;
        return Ok(Reset { removed: 0, dir: None, dead, elsewhere });
    };
    let removed = match crate::bpffs::StateLock::acquire_existing(&dir)? {
        Some(_lock) => state::remove_all(&dir)?,
        None => 0,
    };
    crate::bpffs::remove_root_if_empty();
    Ok(Reset { removed, dir: Some(dir), dead, elsewhere })
}

/// One binding as `steer list` shows it.
#[derive(Debug, Clone)]
pub struct BindingView {
    pub id: u32,
    pub record: Record,
    /// The target socket is still open (its cookie is in the map).
    pub alive: bool,
    /// The target takes what is steered to it: a TCP target listens (a listener shut down but
    /// not closed stays in the map and refuses every steered connection), a UDP target is not
    /// connected (the kernel assigns datagrams to unconnected sockets only).
    pub listening: bool,
    /// The process recorded at `steer add` still runs (the socket may outlive it: a fork, a
    /// binary upgrade, a `--takeover`).
    pub process_running: bool,
    pub hits: u64,
    pub refused: u64,
    /// Ports of the binding that are not steered to it: a command was killed part-way (the
    /// next `steer add` or `steer remove` repairs it).
    pub unsteered: u32,
}

impl BindingView {
    pub fn key(&self) -> BindingKey {
        self.record.key
    }

    /// A line for a binding a killed command left half written, naming the fix.
    pub fn incomplete(&self) -> Option<String> {
        (self.unsteered > 0).then(|| {
            let (n, is) = if self.unsteered == 1 {
                ("1 of its ports".to_string(), "is")
            } else {
                (format!("{} of its ports", self.unsteered), "are")
            };
            format!(
                "binding {} is incomplete: {n} {is} not steered to it (a skrelay command was interrupted part-way); \
                 add it again or remove it (any `skrelay steer add` or `steer remove` repairs it)",
                self.key()
            )
        })
    }

    pub fn json(&self) -> serde_json::Value {
        let key = self.key();
        json!({
            "id": self.id,
            "proto": key.proto.name(),
            "prefix": key.prefix.to_string(),
            "ports": key.ports.to_string(),
            "target": {
                "pid": self.record.pid,
                "process": self.record.comm,
                // Unknown (null) from a pid namespace of its own, whose /proc may not show it.
                "process_running": if !self.process_running && crate::bpffs::in_pid_namespace_of_its_own() {
                    serde_json::Value::Null
                } else {
                    serde_json::Value::Bool(self.process_running)
                },
                "local": self.record.target.to_string(),
                "cookie": self.record.cookie,
                "alive": self.alive,
                "listening": self.listening,
            },
            "hits": self.hits,
            "refused": self.refused,
            "complete": self.unsteered == 0,
            "unsteered_ports": self.unsteered,
        })
    }
}

/// Whether process `pid` still runs the program recorded at `steer add` (its pid may have been
/// reused since, or the socket moved on to a child or a successor).
fn running(pid: u32, comm: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == comm)
        && !crate::sys::exiting(pid)
}

/// The socket inodes each process holds, read once per process and listing (a helper's 500
/// bindings of one pid with 10,000 descriptors took 20 s read per binding); `None` where its
/// descriptors cannot be read (another user's process, without root).
#[derive(Default)]
struct HeldSockets(std::collections::HashMap<u32, Option<std::collections::HashSet<u64>>>);

impl HeldSockets {
    /// Whether process `pid` holds the socket with inode `inode`, whatever its name now (it may
    /// have exec'd or renamed itself since `steer add`: socket activation, a server that names
    /// its workers); `None` if its descriptors cannot be read.
    fn holds(&mut self, pid: u32, inode: u32) -> Option<bool> {
        let held = self.0.entry(pid).or_insert_with(|| {
            let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
            let inodes = fds
                .flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
                .collect();
            Some(inodes)
        });
        let held = held.as_ref()?.contains(&u64::from(inode));
        Some(held && !crate::sys::exiting(pid))
    }
}

fn views(st: &State) -> Vec<BindingView> {
    let unsteered = st.unsteered();
    // The sockets themselves, by cookie (sock_diag): a target shut down while another socket
    // listens at its address read as listening by address (a helper's pass), and a UDP target
    // connected after `steer add` (which then takes no steered datagram) as healthy.
    let diag = |protocol: libc::c_int, states: u32| {
        crate::sys::diag_sockets(protocol as u8, states)
            .inspect_err(|e| {
                // Once: a relay's metrics scrapes read this every time.
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    log::warn!(
                    "cannot ask the kernel for the target sockets' states (sock_diag: {e}): whether a target listens \
                     is judged by its address, and whether its process runs by its name"
                )
                })
            })
            .ok()
    };
    let tcp_listening = diag(libc::IPPROTO_TCP, 1 << target::STATE_LISTEN);
    let udp = if st.records().values().any(|r| r.key.proto == crate::cli::Proto::Udp) {
        diag(libc::IPPROTO_UDP, !0)
    } else {
        None
    };
    let mut held = HeldSockets::default();
    let mut listeners = Vec::new();
    for f in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        listeners.extend(
            target::parse_proc_net(&std::fs::read_to_string(f).unwrap_or_default())
                .into_iter()
                .filter(|s| s.state == target::STATE_LISTEN)
                .map(|s| s.local),
        );
    }
    let mut v: Vec<BindingView> = st
        .records()
        .into_iter()
        .map(|(id, record)| {
            let c = st.counters(id);
            let alive = st.target_alive(id, &record);
            let by_address = || {
                listeners
                    .iter()
                    .any(|l: &std::net::SocketAddr| (l.ip(), l.port()) == (record.target.ip(), record.target.port()))
            };
            let (listening, diag) = match record.key.proto {
                crate::cli::Proto::Tcp => match &tcp_listening {
                    Some(m) => (m.contains_key(&record.cookie), m.get(&record.cookie)),
                    None => (by_address(), None),
                },
                // An unconnected UDP socket is in TCP_CLOSE.
                crate::cli::Proto::Udp => {
                    let s = udp.as_ref().and_then(|m| m.get(&record.cookie));
                    (s.is_none_or(|s| s.state == target::STATE_CLOSE), s)
                }
            };
            let unsteered = unsteered.get(&id).copied().unwrap_or(0);
            // Its name, or holding the target whatever its name. Not holding it does not say
            // it exited: a live process may have handed the socket on (a pid reused by a program
            // of the same name reads as running, as the README says).
            let process_running = running(record.pid, &record.comm)
                || diag.is_some_and(|d| held.holds(record.pid, d.inode) == Some(true));
            BindingView { id, record, alive, listening, process_running, hits: c.hits, refused: c.refused, unsteered }
        })
        .collect();
    v.sort_by_key(|b| {
        let k = b.key();
        (k.proto.name(), k.prefix.family(), k.prefix.bytes(), k.prefix.len, k.ports)
    });
    v
}

/// `steer list`: every pinned binding of this network namespace. Reads under a shared lock and
/// creates nothing.
pub fn list() -> Result<Listing, Error> {
    let st = State::open_read_only()?;
    Ok(Listing {
        bindings: st.as_ref().map(views).unwrap_or_default(),
        detached: st.as_ref().is_some_and(State::detached),
        elsewhere: pinned_elsewhere(),
        leftover: match st {
            Some(_) => None,
            None => leftover_pins()?,
        },
    })
}

/// Pins without a link in this namespace's state directory (`Status::leftover`).
fn leftover_pins() -> Result<Option<(PathBuf, usize)>, Error> {
    Ok(state::existing_dir()?
        .filter(|dir| !dir.join(state::LINK).exists())
        .and_then(|dir| std::fs::read_dir(&dir).ok().map(|d| (dir.clone(), d.count())))
        .filter(|(_, n)| *n > 0))
}

/// What `steer list` shows.
#[derive(Debug)]
pub struct Listing {
    pub bindings: Vec<BindingView>,
    /// The link was detached by hand: the bindings steer nothing until the next `steer add`.
    pub detached: bool,
    /// Steering pinned in a bpffs this mount namespace does not see.
    pub elsewhere: Vec<funnel::Running>,
    /// Pins without a link, left by an interrupted command (`Status::leftover`).
    pub leftover: Option<(PathBuf, usize)>,
}

/// The warning for a link detached by hand, as `status` and `steer list` show it.
pub const DETACHED_WARNING: &str = "the sk_lookup link was detached (not by skrelay): nothing is steered; the next \
                                    `skrelay steer add` attaches it again with these bindings, `skrelay steer reset` \
                                    removes them";

/// The pinned part of steering's status.
#[derive(Debug)]
pub struct Pinned {
    pub dir: PathBuf,
    pub link_id: u32,
    pub program_id: u32,
    pub program_version: u64,
    pub bindings: Vec<BindingView>,
    /// The link was detached by hand: nothing is steered until the next `steer add`.
    pub detached: bool,
}

impl Pinned {
    /// Whether the link runs this binary's program.
    pub fn current(&self) -> bool {
        self.program_version == state::program_version()
    }
}

/// What steering has attached in this network namespace: the pinned bindings, and the
/// `--ports` funnels of running relays and proxies.
#[derive(Debug)]
pub struct Status {
    pub pinned: Option<Pinned>,
    /// Pinned state this user may not read (root's pins are mode 0600).
    pub unreadable: Option<Unreadable>,
    /// Pins without a link (a command killed before it pinned the link, or during `reset`):
    /// nothing is attached, but they hold maps in memory until `steer reset` (or the next
    /// `steer add`) takes them. The directory and how many pins.
    pub leftover: Option<(PathBuf, usize)>,
    pub funnels: Vec<funnel::Running>,
    /// This user may not list BPF links (it takes CAP_SYS_ADMIN), so other processes' running
    /// `--ports` funnels are not known: `funnels` is empty whatever runs.
    pub funnels_unlisted: bool,
    /// States left by network namespaces that no longer exist (directory, bindings): they hold
    /// memory until `steer reset` or the next `steer add` removes them.
    pub dead: Vec<(PathBuf, usize)>,
}

/// Pinned steering state that could not be read for want of privilege: `status` says so and goes
/// on with the rest, as it does for accel state it cannot read.
#[derive(Debug)]
pub struct Unreadable {
    pub dir: PathBuf,
    /// Why, in a few words.
    pub error: String,
    /// Whether anything is known to be pinned there (not where the state is out of reach).
    pub pinned: bool,
}

/// Steering's part of `skrelay status`. Reads under a shared lock and creates nothing.
pub fn status() -> Result<Status, Error> {
    let funnels = funnel::running();
    let funnels_unlisted = !funnel::listable();
    let st = match State::open_read_only() {
        Ok(st) => st,
        Err(Error::BpfDenied { .. } | Error::StateOwned { .. }) => {
            let dir = state::existing_dir()?.unwrap_or_default();
            let unreadable = Some(Unreadable { dir, error: "permission denied".into(), pinned: true });
            let dead = state::dead_states();
            return Ok(Status { pinned: None, unreadable, leftover: None, funnels, funnels_unlisted, dead });
        }
        Err(Error::StateOutOfReach { why, .. }) => {
            // Where root's commands would have pinned it, as seen from outside.
            let dir = Path::new(crate::bpffs::BPFFS).join("skrelay").join(state::netns_name()?);
            let unreadable = Some(Unreadable { dir, error: why, pinned: false });
            return Ok(Status {
                pinned: None,
                unreadable,
                leftover: None,
                funnels,
                funnels_unlisted,
                dead: Vec::new(),
            });
        }
        Err(e) => return Err(e),
    };
    let pinned = st.map(|st| {
        let (link_id, program_id) = st.link_ids().unwrap_or((0, 0));
        Pinned {
            dir: st.dir().to_path_buf(),
            link_id,
            program_id,
            program_version: st.program_version(),
            bindings: views(&st),
            detached: st.detached(),
        }
    });
    let dead = state::dead_states();
    let leftover = match &pinned {
        Some(_) => None,
        None => leftover_pins()?.filter(|(dir, _)| !dead.iter().any(|(d, _)| d == dir)),
    };
    Ok(Status { pinned, unreadable: None, leftover, funnels, funnels_unlisted, dead })
}

impl Status {
    /// The JSON `skrelay status --json` shows under `steer`: the same keys whatever is attached.
    pub fn json(&self) -> serde_json::Value {
        let attached = self.pinned.as_ref().is_some_and(|p| !p.detached)
            || self.unreadable.as_ref().is_some_and(|u| u.pinned)
            || !self.funnels.is_empty();
        // Out of reach (`bpffs::out_of_reach`): whether anything is pinned or attached is unknown.
        let unknown = self.unreadable.as_ref().is_some_and(|u| !u.pinned);
        let mut json = json!({
            // Unknown (null) where nothing is pinned and this user cannot list funnels.
            "attached": if attached || (!self.funnels_unlisted && !unknown) { json!(attached) } else { json!(null) },
            "funnels_unlisted": self.funnels_unlisted,
            "pinned": null,
            "link_id": null,
            "program_id": null,
            "program_version": null,
            "current": null,
            "bindings": [],
            "funnels": self.funnels.iter().map(funnel::Running::json).collect::<Vec<_>>(),
            "unreadable": null,
            "leftover": null,
            "detached": null,
            "dead_namespaces": self.dead.iter().map(|(dir, n)| json!({ "pins": crate::sys::shown(dir).display().to_string(), "bindings": n })).collect::<Vec<_>>(),
        });
        if let Some((dir, pins)) = &self.leftover {
            json["leftover"] = json!({ "pins": crate::sys::shown(dir).display().to_string(), "count": pins });
        }
        if let Some(u) = self.unreadable.as_ref().filter(|u| u.pinned) {
            json["pinned"] = json!(crate::sys::shown(&u.dir).display().to_string());
        }
        if let Some(u) = &self.unreadable {
            json["unreadable"] = json!({ "pins": crate::sys::shown(&u.dir).display().to_string(), "error": u.error });
        }
        if let Some(p) = &self.pinned {
            json["pinned"] = json!(crate::sys::shown(&p.dir).display().to_string());
            json["link_id"] = json!(p.link_id);
            json["program_id"] = json!(p.program_id);
            json["program_version"] = json!(format!("{:016x}", p.program_version));
            json["current"] = json!(p.current());
            json["detached"] = json!(p.detached);
            json["bindings"] = json!(p.bindings.iter().map(BindingView::json).collect::<Vec<_>>());
        }
        json
    }

    /// The lines `skrelay status` shows.
    pub fn text(&self) -> String {
        let mut lines = Vec::new();
        match &self.pinned {
            None if let Some(u) = self.unreadable.as_ref().filter(|u| !u.pinned) => lines.push(format!(
                "steer: cannot tell whether bindings are pinned: {}: run `skrelay status` {} to see them",
                u.error,
                crate::bpffs::run_as()
            )),
            None if let Some(u) = &self.unreadable => lines.push(format!(
                "steer: state pinned at {} is not readable without root ({}): run `skrelay status` as root to \
                     see its bindings",
                crate::sys::shown(&u.dir).display(),
                u.error
            )),
            None if let Some((dir, pins)) = &self.leftover => lines.push(format!(
                "steer: no pinned bindings; {} left at {} by an interrupted command (no link: nothing is steered; \
                 `skrelay steer reset` removes them)",
                plural(*pins, "pin"),
                crate::sys::shown(dir).display()
            )),
            None if self.funnels.is_empty() && self.funnels_unlisted => lines.push(format!(
                "steer: no pinned bindings; running --ports funnels cannot be listed {} (run `skrelay status` {} to \
                 see them)",
                if crate::bpf::in_user_namespace() { "from a user namespace" } else { "without root" },
                if crate::bpf::in_user_namespace() { "as root outside this user namespace" } else { "as root" }
            )),
            None if self.funnels.is_empty() => lines.push("steer: nothing attached".to_string()),
            None => lines.push("steer: no pinned bindings".to_string()),
            Some(p) => {
                let views = &p.bindings;
                // Distinct ports of each protocol: overlapping bindings and prefixes count a port
                // once, and TCP's and UDP's are told apart (TCP 1-65535 and 10 UDP ports read as
                // "65545 ports": a steer pass).
                let count = |proto: crate::cli::Proto| {
                    views
                        .iter()
                        .filter(|b| b.key().proto == proto)
                        .flat_map(|b| b.key().ports.ports())
                        .collect::<std::collections::HashSet<_>>()
                        .len()
                };
                let ports = match (count(crate::cli::Proto::Tcp), count(crate::cli::Proto::Udp)) {
                    (n, 0) => plural(n, "port"),
                    (0, n) => plural(n, "UDP port"),
                    (tcp, udp) => format!("{} and {}", plural(tcp, "TCP port"), plural(udp, "UDP port")),
                };
                // What is wrong with some of them, after the ports: "2 bindings with their target
                // gone" (a count of bindings, not of ports: a steer pass read it as ports).
                let mut wrong = Vec::new();
                match views.iter().filter(|b| !b.alive).count() {
                    0 => {}
                    _ if views.len() == 1 => wrong.push("its target gone".to_string()),
                    n => wrong.push(format!(
                        "{} with {} target gone",
                        plural(n, "binding"),
                        if n == 1 { "its" } else { "their" }
                    )),
                }
                match views.iter().filter(|b| b.alive && !b.listening).count() {
                    0 => {}
                    n => wrong.push(format!(
                        "{} whose target takes nothing (not listening, or a connected UDP socket)",
                        plural(n, "binding")
                    )),
                }
                let incomplete: Vec<String> = views.iter().filter_map(BindingView::incomplete).collect();
                if !incomplete.is_empty() {
                    wrong.push(format!("{} incomplete", incomplete.len()));
                }
                let wrong: String = wrong.iter().map(|w| format!("; {w}")).collect();
                let hits: u64 = views.iter().map(|b| b.hits).sum();
                let refused: u64 = views.iter().map(|b| b.refused).sum();
                lines.push(format!(
                    "steer: {} ({}{wrong}), {}, \
                     {refused} refused\n  \
                     sk_lookup link {}, program {}, version {:016x}{}\n  pinned at {}",
                    plural(views.len(), "binding"),
                    ports,
                    plural(hits as usize, "hit"),
                    p.link_id,
                    p.program_id,
                    p.program_version,
                    if p.current() { "" } else { " (older than this binary: `steer add` upgrades it)" },
                    crate::sys::shown(&p.dir).display()
                ));
                lines.extend(incomplete.iter().map(|l| format!("  WARNING: {l}")));
                if p.detached {
                    lines.push(format!("  WARNING: {DETACHED_WARNING}"));
                }
            }
        }
        if !self.dead.is_empty() {
            let bindings: usize = self.dead.iter().map(|(_, n)| n).sum();
            let parent = self.dead[0].0.parent().map_or(String::new(), |p| p.display().to_string());
            lines.push(format!(
                "  {} of network namespaces that no longer exist ({}) left under {parent}: nothing is steered by them, \
                 but they hold memory until `skrelay steer reset` (or the next `steer add`) removes them",
                plural(self.dead.len(), "steering state"),
                plural(bindings, "binding"),
            ));
        }
        // Pinned bindings shown, and the running processes' --ports out of this user's sight:
        // said after them as where nothing is pinned (a re-check pass from a user namespace
        // saw only the bindings, where root saw a relay's --ports too).
        if self.pinned.is_some() && self.funnels.is_empty() && self.funnels_unlisted {
            lines.push(format!(
                "  running --ports funnels cannot be listed {} (run `skrelay status` {} to see them)",
                if crate::bpf::in_user_namespace() { "from a user namespace" } else { "without root" },
                if crate::bpf::in_user_namespace() { "as root outside this user namespace" } else { "as root" }
            ));
        }
        for f in self.funnels.iter().filter(|f| f.pinned_elsewhere) {
            lines.push(format!(
                "  pinned in a bpffs this mount namespace does not see: {}, {} (sk_lookup link {}; run skrelay \
                 where that bpffs is mounted to list or change it)",
                f.describe(),
                plural(f.hits as usize, "hit"),
                f.link_id
            ));
        }
        for f in self.funnels.iter().filter(|f| !f.pinned_elsewhere) {
            // Its holder out of sight, the owner says what it may be: "goes with the process"
            // then contradicted it (a re-check pass).
            let lives = if f.pid.is_some() { ", goes with the process" } else { "" };
            lines.push(format!(
                "  --ports of {}: {} ({}) on {} -> {}, {} (sk_lookup link {}{lives})",
                f.owner(),
                plural(f.ports.len(), "port"),
                f.port_list(),
                f.prefix_list(),
                f.target.map_or("its listening socket".to_string(), |t| t.to_string()),
                plural(f.hits as usize, "hit"),
                f.link_id
            ));
        }
        lines.join("\n")
    }
}

/// "1 port", "2 ports".
fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}
