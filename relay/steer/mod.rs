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
pub mod bindings;
pub mod funnel;
pub mod ports;
pub mod state;
pub mod target;

pub use bindings::{BindingKey, Prefix};
pub use funnel::Funnel;
pub use ports::{PortList, PortRange};

use crate::{
    abi::{SteerBinding, STEER_MAX_BINDINGS},
    cli::{SteerAddArgs, SteerListArgs, SteerRemoveArgs},
    error::Error,
    status::Section,
    sys,
};
use bindings::{addr_from_bytes, owner, rank};
use serde_json::json;
use state::{key_of, State};
use std::{collections::BTreeMap, net::SocketAddr, time::Instant};
use target::Target;

/// `steer add`: binds every (prefix, port item) pair to the target socket.
pub fn add(args: SteerAddArgs) -> Result<(), Error> {
    let started = Instant::now();
    let target = match (args.to, args.pid, args.fd) {
        (Some(addr), None, None) => Target::at(args.proto, addr)?,
        (None, Some(pid), Some(fd)) => Target::from_process(args.proto, pid, fd)?,
        _ => return Err(Error::Usage("give the target as --to ADDR:PORT or as --pid PID --fd FD".into())),
    };
    // Default: every address of the family the user named in --to (a dual-stack [::] socket found
    // for --to 127.0.0.1:P gets IPv4), else of the target socket's own family.
    let default_v6 = args.to.map_or(target.local.is_ipv6(), |a| a.is_ipv6());
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
        for key in keys.iter().filter(|k| k.proto == crate::cli::Proto::Tcp) {
            if funnel::prefixes_meet(&key.prefix, &f.prefix) && f.ports.iter().any(|p| key.ports.contains(*p)) {
                return Err(Error::Usage(format!(
                    "cannot bind {key}: {} takes port(s) of it on {} with --ports while it runs (stop it, or leave \
                     those ports out)",
                    f.owner(),
                    f.prefix
                )));
            }
        }
    }
    state::sweep_stale();
    let (mut st, note) = State::open_or_create()?;
    if let Some(note) = note {
        println!("{note}");
    }
    let existing: BTreeMap<u32, SteerBinding> = st.maps.bindings();
    let mut keyed: BTreeMap<u32, BindingKey> = existing.iter().filter_map(|(id, b)| Some((*id, key_of(b)?))).collect();
    let new_count = keys.iter().filter(|k| !keyed.values().any(|e| e == *k)).count();
    if keyed.len() + new_count > STEER_MAX_BINDINGS as usize {
        return Err(Error::Usage(format!(
            "too many bindings: {} exist, {new_count} more would pass the limit of {STEER_MAX_BINDINGS} \
             (bind ranges like 8000-8999 instead of single ports)",
            keyed.len()
        )));
    }
    let record = |key: &BindingKey| SteerBinding {
        cookie: target.cookie,
        pid: target.pid,
        port_lo: key.ports.lo,
        port_hi: key.ports.hi,
        family: key.prefix.family(),
        proto: key.proto.ipproto(),
        prefixlen: key.prefix.len,
        target_family: Prefix::host(target.local.ip()).family(),
        target_port: target.local.port(),
        addr: key.prefix.bytes(),
        target_addr: bindings::addr_bytes(target.local.ip()),
        comm: comm_bytes(&target.comm),
        ..Default::default()
    };
    let to = format!("{} (pid {} {}, cookie {})", target.local, target.pid, target.comm, target.cookie);
    let mut ports_written = 0usize;
    for key in &keys {
        if let Some((&id, _)) = keyed.iter().find(|(_, e)| *e == key) {
            let old = existing[&id];
            set_target(&mut st, id, &target)?;
            st.maps.bindings.insert(id, record(key), 0).map_err(|e| Error::steer_map("record a binding", &e))?;
            println!(
                "replaced binding {key}: now -> {to}, was -> {} (pid {} {})",
                SocketAddr::new(addr_from_bytes(old.target_family, old.target_addr), old.target_port),
                old.pid,
                comm_str(&old.comm)
            );
            continue;
        }
        let id = (0..STEER_MAX_BINDINGS).find(|i| !keyed.contains_key(i)).expect("checked above");
        st.maps.reset_counters(id)?;
        set_target(&mut st, id, &target)?;
        st.maps.bindings.insert(id, record(key), 0).map_err(|e| Error::steer_map("record a binding", &e))?;
        // The new binding takes each port unless an equally specific, narrower one owns it.
        for port in key.ports.ports() {
            let tkey = key.trie_key(port);
            let keep = st
                .maps
                .ports
                .get(&tkey, 0)
                .ok()
                .and_then(|cur| keyed.get(&cur))
                .is_some_and(|cur| cur.same_slot(key) && rank(&cur.ports) <= rank(&key.ports));
            if !keep {
                st.maps.ports.insert(&tkey, id, 0).map_err(|e| Error::steer_map("fill the port map", &e))?;
                ports_written += 1;
            }
        }
        keyed.insert(id, *key);
        println!("bound {key} -> {to}");
    }
    log::debug!("steer add: {ports_written} port entries written in {:?}", started.elapsed());
    Ok(())
}

fn set_target(st: &mut State, id: u32, target: &Target) -> Result<(), Error> {
    sys::bpf::sockmap_set(st.maps.targets.fd(), id, &target.fd).map_err(|e| match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => Error::Usage(format!(
            "the kernel refused the target socket at {} (sk_lookup takes listening TCP and unconnected UDP sockets)",
            target.local
        )),
        _ => Error::steer_map("put the target socket into the steering map", &e),
    })
}

fn comm_bytes(s: &str) -> [u8; 16] {
    let mut b = [0u8; 16];
    let n = s.len().min(15);
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
    b
}

fn comm_str(b: &[u8; 16]) -> String {
    String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap_or_default()).into_owned()
}

/// `steer remove`: removes the named bindings, all or none.
pub fn remove(args: SteerRemoveArgs) -> Result<(), Error> {
    let nothing = || {
        Error::Usage(format!(
            "there is no {} binding for ports {} in this network namespace (see `skrelay steer list`)",
            args.proto.name(),
            args.ports
        ))
    };
    let Some(mut st) = State::open()? else { return Err(nothing()) };
    let mut keyed: BTreeMap<u32, BindingKey> =
        st.maps.bindings().iter().filter_map(|(id, b)| Some((*id, key_of(b)?))).collect();
    // Without --addr: the bindings `add` makes by default, on every address of either family.
    let explicit = !args.addrs.is_empty();
    let prefixes = if explicit { args.addrs.clone() } else { vec![Prefix::any(false), Prefix::any(true)] };
    let mut doomed = Vec::new();
    for &ports in args.ports.items() {
        let mut found = false;
        for &prefix in &prefixes {
            let key = BindingKey { proto: args.proto, prefix, ports };
            match keyed.iter().find(|(_, k)| **k == key) {
                Some((&id, _)) => {
                    doomed.push((id, key));
                    found = true;
                }
                None if explicit => {
                    return Err(Error::Usage(format!(
                        "there is no binding {key} in this network namespace (see `skrelay steer list`)"
                    )))
                }
                None => {}
            }
        }
        if !found {
            return Err(Error::Usage(format!(
                "there is no {} binding for port {ports} on 0.0.0.0/0 or ::/0 in this network namespace \
                 (give its --addr; see `skrelay steer list`)",
                args.proto.name()
            )));
        }
    }
    for (id, key) in doomed {
        keyed.remove(&id);
        let rivals: Vec<(u32, &BindingKey)> =
            keyed.iter().filter(|(_, k)| k.same_slot(&key)).map(|(i, k)| (*i, k)).collect();
        for port in key.ports.ports() {
            let tkey = key.trie_key(port);
            if st.maps.ports.get(&tkey, 0).ok() != Some(id) {
                continue;
            }
            match owner(rivals.iter().copied(), port) {
                Some(next) => st.maps.ports.insert(&tkey, next, 0),
                None => st.maps.ports.remove(&tkey),
            }
            .map_err(|e| Error::steer_map("update the port map", &e))?;
        }
        sys::bpf::sockmap_clear(st.maps.targets.fd(), id)
            .map_err(|e| Error::steer_map("clear a steering target", &e))?;
        st.maps.bindings.remove(&id).map_err(|e| Error::steer_map("remove a binding", &e))?;
        println!("removed binding {key}");
    }
    Ok(())
}

/// `steer reset`: unpins everything; the link (and so the program) goes with its last reference.
pub fn reset() -> Result<(), Error> {
    let dir = state::dir()?;
    let removed = match crate::bpffs::StateLock::acquire_existing(&dir)? {
        Some(_lock) => state::remove_all(&dir)?,
        None => 0,
    };
    if removed == 0 {
        println!("no steering state in this network namespace: nothing to reset");
    } else {
        println!("removed every binding, the sk_lookup program and its link ({removed} pins under {})", dir.display());
    }
    Ok(())
}

/// One binding as `steer list` shows it.
pub struct BindingView {
    pub id: u32,
    pub key: BindingKey,
    pub record: SteerBinding,
    /// The target socket is still open (its cookie is in the map).
    pub alive: bool,
    pub hits: u64,
    pub refused: u64,
}

impl BindingView {
    pub fn target(&self) -> SocketAddr {
        SocketAddr::new(addr_from_bytes(self.record.target_family, self.record.target_addr), self.record.target_port)
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "id": self.id,
            "proto": self.key.proto.name(),
            "prefix": self.key.prefix.to_string(),
            "ports": self.key.ports.to_string(),
            "target": {
                "pid": self.record.pid,
                "process": comm_str(&self.record.comm),
                "local": self.target().to_string(),
                "cookie": self.record.cookie,
                "alive": self.alive,
            },
            "hits": self.hits,
            "refused": self.refused,
        })
    }
}

fn views(st: &State) -> Vec<BindingView> {
    let mut v: Vec<BindingView> = st
        .maps
        .bindings()
        .into_iter()
        .filter_map(|(id, record)| {
            let key = key_of(&record)?;
            let c = st.maps.counters(id);
            let alive = st.maps.target_cookie(id) == Some(record.cookie);
            Some(BindingView { id, key, record, alive, hits: c.hits, refused: c.refused })
        })
        .collect();
    v.sort_by_key(|b| (b.key.proto.name(), b.key.prefix.family(), b.key.prefix.bytes(), b.key.prefix.len, b.key.ports));
    v
}

/// `steer list`.
pub fn list(args: SteerListArgs) -> Result<(), Error> {
    let st = State::open()?;
    let views = st.as_ref().map(views).unwrap_or_default();
    if args.json {
        let all: Vec<serde_json::Value> = views.iter().map(BindingView::json).collect();
        println!("{}", serde_json::to_string_pretty(&all).expect("json"));
        return Ok(());
    }
    if views.is_empty() {
        println!("no steering bindings in this network namespace");
        return Ok(());
    }
    println!(
        "{:<5} {:<20} {:<13} {:<24} {:<18} {:>8} {:>10} {:>8}",
        "PROTO", "PREFIX", "PORTS", "TARGET", "PROCESS", "COOKIE", "HITS", "REFUSED"
    );
    for b in &views {
        let process = format!("{}/{}", b.record.pid, comm_str(&b.record.comm));
        let target = if b.alive { b.target().to_string() } else { format!("{} (gone)", b.target()) };
        println!(
            "{:<5} {:<20} {:<13} {:<24} {:<18} {:>8} {:>10} {:>8}",
            b.key.proto.name(),
            b.key.prefix.to_string(),
            b.key.ports.to_string(),
            target,
            process,
            b.record.cookie,
            b.hits,
            b.refused
        );
    }
    Ok(())
}

/// The steering part of `skrelay status`: the pinned bindings, and the `--ports` funnels of
/// running relays and proxies. The JSON has the same keys whatever is attached.
pub fn status_section() -> Result<Section, Error> {
    let st = State::open()?;
    let funnels = funnel::running();
    let mut lines = Vec::new();
    let mut json = json!({
        "attached": st.is_some() || !funnels.is_empty(),
        "pinned": null,
        "link_id": null,
        "program_id": null,
        "program_version": null,
        "current": null,
        "bindings": [],
        "funnels": funnels.iter().map(funnel::Running::json).collect::<Vec<_>>(),
    });
    match &st {
        None if funnels.is_empty() => lines.push("steer: nothing attached".to_string()),
        None => lines.push("steer: no pinned bindings".to_string()),
        Some(st) => {
            let views = views(st);
            let (link, prog) = st.link_ids().unwrap_or((0, 0));
            let version = st.maps.info.get(&0, 0).unwrap_or(0);
            let ports: u64 = views.iter().map(|b| u64::from(b.key.ports.len())).sum();
            let gone = views.iter().filter(|b| !b.alive).count();
            let hits: u64 = views.iter().map(|b| b.hits).sum();
            let refused: u64 = views.iter().map(|b| b.refused).sum();
            lines.push(format!(
                "steer: {} bindings ({ports} ports, {gone} with their target gone), {hits} hits, {refused} refused\n  \
                 sk_lookup link {link}, program {prog}, version {version:016x}{}\n  pinned at {}",
                views.len(),
                if version == state::program_version() {
                    ""
                } else {
                    " (older than this binary: `steer add` upgrades it)"
                },
                st.dir.display()
            ));
            json["pinned"] = json!(st.dir.display().to_string());
            json["link_id"] = json!(link);
            json["program_id"] = json!(prog);
            json["program_version"] = json!(format!("{version:016x}"));
            json["current"] = json!(version == state::program_version());
            json["bindings"] = json!(views.iter().map(BindingView::json).collect::<Vec<_>>());
        }
    }
    for f in &funnels {
        lines.push(format!(
            "  --ports of {}: {} ports ({}) on {} -> {}, {} hits (sk_lookup link {}, goes with the process)",
            f.owner(),
            f.ports.len(),
            f.port_list(),
            f.prefix,
            f.target.map_or("its listening socket".to_string(), |t| t.to_string()),
            f.hits,
            f.link_id
        ));
    }
    Ok(Section { name: "steer", text: lines.join("\n"), json })
}
