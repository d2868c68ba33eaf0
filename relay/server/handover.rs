//! `--takeover`: live pairs and waiting clients move to the new process (takeover.rs has the
//! channel and the order of the steps; this is what the loop hands over and takes over).
//!
//! The old process freezes (its loop does nothing else meanwhile), writes a manifest of every
//! pair (both sockets, the datapath's state: counters, half-close state, the pipes holding bytes
//! in flight, the kernel maps) and every waiting client (socket, token, time waited, a proxy's
//! upstream connection being made), and exits once the new process has duplicated them all. The
//! new process takes them before it accepts its first client, so no pair it makes itself ever
//! lands in maps it replaces.
use super::{
    connector::ConnectingState,
    pair::{Ending, Pair},
    pending::Pending,
    token, tokens, Partners, Server, Slot, Timer,
};
use crate::{
    cli::PairBy,
    datapath::{
        handover::{Exporter, Fds, KernelMaps, SpliceState},
        userspace::UserspaceDatapath,
        Datapath,
    },
    takeover::{Channel, Handover},
};
use mio::{net::TcpStream, Interest};
use serde::{Deserialize, Serialize};
use std::{
    net::SocketAddr,
    os::fd::RawFd,
    time::{Duration, Instant},
};

/// How long the new process waits for the old one to connect, then for its manifest and its
/// commit; and how long the old one waits for `ready`.
const CONNECT_WAIT: Duration = Duration::from_secs(5);
const MESSAGE_WAIT: Duration = Duration::from_secs(30);

/// The manifest's version: a new process refuses one it does not know (the old one then drains).
/// 2: one set of kernel maps per event loop (`--threads`).
const VERSION: u32 = 2;
/// The version of a manifest that carries a pair waiting, after one end's reset, for its partner
/// to take that end's last bytes (`PairState::resetting`): a process that does not know it would
/// carry such a pair on as a live one (and might end it with an EOF), so it refuses the manifest,
/// and the old process drains. Other manifests stay version 2 for the processes that read it.
const VERSION_RESETTING: u32 = 3;

#[derive(Serialize, Deserialize)]
struct Manifest {
    version: u32,
    datapath: String,
    /// Each event loop's kernel maps, by loop (None: no pair in them).
    maps: Vec<Option<KernelMaps>>,
    pairs: Vec<PairState>,
    /// In arrival order.
    pending: Vec<PendingState>,
    /// Every descriptor named above, for the new process to duplicate first.
    fds: Vec<RawFd>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct PairState {
    /// The event loop that served it (its kernel maps are that loop's).
    #[serde(default)]
    pub(super) thread: usize,
    pub(super) ends: [RawFd; 2],
    pub(super) addrs: [SocketAddr; 2],
    pub(super) lasted: Duration,
    pub(super) shut: [bool; 2],
    pub(super) upstream_local: Option<SocketAddr>,
    pub(super) splice: SpliceState,
    /// How long no byte has moved (`--idle-timeout`); 0 from a process that did not say.
    #[serde(default)]
    pub(super) idle: Duration,
    /// The end that was reset and its error (an errno), while the pair waits for the partner's
    /// client to take what that end sent (`Pair::resetting`). Such pairs were reset at the
    /// handover, and the partner lost what it had not read yet (2.87 MB of 3 MB in a re-check
    /// pass, once the wait could last --idle-timeout).
    #[serde(default)]
    pub(super) resetting: Option<(usize, i32)>,
    /// Each end's token line (received bytes that are not the pair's); None from a process that
    /// did not say (before 2026-12-07), taken as none.
    #[serde(default)]
    pub(super) skip: Option<[u64; 2]>,
    /// Each end's bytes acknowledged before the pair formed (an upstream connection's SYN).
    #[serde(default)]
    pub(super) acked_base: Option<[u64; 2]>,
}

#[derive(Serialize, Deserialize)]
struct PendingState {
    fd: RawFd,
    addr: SocketAddr,
    key: Option<String>,
    skip: u32,
    waited: Duration,
    upstream: Option<ConnectingState>,
}

/// A handover channel's error in words: a closed channel is a new process that went away (it
/// read `failed to fill whole buffer`, or a bare reset, when a successor died mid-handover).
fn channel_error(e: &std::io::Error) -> String {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    match e.kind() {
        UnexpectedEof | ConnectionReset | BrokenPipe => "it closed the handover channel (did it exit?)".into(),
        _ => e.to_string(),
    }
}

impl Server {
    /// The old process, on SIGUSR2: hands everything to the process taking over, or says why not
    /// (it then keeps everything and drains). After Ok the new process owns every socket, and
    /// the caller must stop without running a destructor of ours (see `Server::run`).
    /// `Ok(false)`: the new process took the waiting clients only (a relay's: they hold no kernel
    /// state) and this process keeps its live pairs and drains them.
    pub(super) fn hand_over(&mut self) -> Result<bool, String> {
        let started = Instant::now();
        let mut channel = Channel::connect().map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound => {
                "no `skrelay --takeover` waits for them: a SIGUSR2 sent by hand, or a new process that is an \
                 older skrelay or gave up waiting; SIGTERM stops a relay"
                    .to_string()
            }
            _ => format!("cannot reach the skrelay taking over: {e}"),
        })?;
        log::info!(
            "SIGUSR2 (handing over to the skrelay that took over): no longer accepting; handing over {} live \
             pair(s) and {} waiting client(s)",
            self.threads.pairs(),
            self.pending
        );
        let (manifest, pairs, pending) = self.manifest()?;
        let text = serde_json::to_vec(&manifest).map_err(|e| format!("cannot write the manifest: {e}"))?;
        channel.send(&text).map_err(|e| format!("cannot send the manifest: {}", channel_error(&e)))?;
        let answer =
            channel.recv(MESSAGE_WAIT).map_err(|e| format!("no answer from the new process: {}", channel_error(&e)))?;
        if answer == WAITING_ONLY && matches!(self.partners, Partners::Clients { .. }) {
            channel.send(b"commit").map_err(|e| format!("cannot confirm to the new process: {}", channel_error(&e)))?;
            // The new process holds each socket now: closing ours sends no reset.
            let waiting: Vec<usize> =
                self.slots.iter().filter(|(_, s)| matches!(s, Slot::Pending(_))).map(|(k, _)| k).collect();
            for slot in waiting {
                drop(self.take_pending(slot));
            }
            log::info!(
                "handed over {pending} waiting client(s) to process {}; the live pairs stay here (it cannot carry \
                 them on)",
                channel.peer_pid().unwrap_or(0)
            );
            return Ok(false);
        }
        if answer != b"ready" {
            let answer = String::from_utf8_lossy(&answer);
            return Err(format!("the new process refused them: {}", answer.strip_prefix("abort: ").unwrap_or(&answer)));
        }
        channel.send(b"commit").map_err(|e| format!("cannot confirm to the new process: {}", channel_error(&e)))?;
        // From here on the new process owns every socket: nothing of ours may touch them (no
        // destructor runs: a kernel pair's would take its sockets out of the maps).
        log::info!(
            "handed over {pairs} live pair(s) and {pending} waiting client(s) ({} descriptor(s)) to process {} \
             {:.1} ms after the signal; exiting",
            manifest.fds.len(),
            channel.peer_pid().unwrap_or(0),
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(true)
    }

    /// What every loop holds: the front's waiting clients, and the pairs and kernel maps of the
    /// front and of every worker (called back by now).
    fn manifest(&mut self) -> Result<(Manifest, usize, usize), String> {
        let mut ex = Exporter::default();
        let mut maps = vec![self.datapath.export(&mut ex)];
        let mut pairs = self.export_pairs(&mut ex)?;
        for worker in self.threads.idle() {
            maps.push(worker.datapath.export(&mut ex));
            pairs.extend(worker.export_pairs(&mut ex)?);
        }
        let mut pending: Vec<(u64, PendingState)> = Vec::new();
        for (_, slot) in self.slots.iter() {
            if let Slot::Pending(p) = slot {
                pending.push((
                    p.serial,
                    PendingState {
                        fd: ex.fd(&p.stream),
                        addr: p.addr,
                        key: p.key.clone(),
                        skip: p.skip,
                        waited: p.admitted.elapsed(),
                        upstream: p.upstream.as_ref().map(|c| c.export(&mut ex)),
                    },
                ));
            }
        }
        pending.sort_by_key(|(serial, _)| *serial);
        let (n_pairs, n_pending) = (pairs.len(), pending.len());
        let manifest = Manifest {
            version: if pairs.iter().any(|p| p.resetting.is_some()) { VERSION_RESETTING } else { VERSION },
            datapath: self.datapath.name().to_string(),
            maps,
            pairs,
            pending: pending.into_iter().map(|(_, p)| p).collect(),
            fds: ex.fds,
        };
        Ok((manifest, n_pairs, n_pending))
    }

    /// This loop's pairs, for the manifest.
    fn export_pairs(&self, ex: &mut Exporter) -> Result<Vec<PairState>, String> {
        let mut pairs = Vec::new();
        for (_, slot) in self.slots.iter() {
            if let Slot::Pair(p) = slot {
                let mut state = p.export(ex).ok_or("a pair's datapath cannot hand it over")?;
                state.thread = self.threads.me;
                pairs.push(state);
            }
        }
        Ok(pairs)
    }

    /// The new process, before it accepts anyone: tells the old process to hand over and takes
    /// what it hands over. Whatever goes wrong before the commit leaves everything with the old
    /// process, which then drains; this process serves new clients either way.
    /// Takes over process `handover.pid`'s pairs. An error: it exited first and another process
    /// serves its listening socket (another `--takeover` won), so this one must not serve.
    pub fn take_over(&mut self, mut handover: Handover) -> Result<(), crate::error::Error> {
        let old = handover.pid;
        let mut channel = match handover.start(CONNECT_WAIT) {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(()),
            // Killed, with nobody else holding the socket: this process serves it alone.
            Err(e) if self.listener.as_ref().is_some_and(|l| crate::sys::socket_held_elsewhere(l) == Some(false)) => {
                log::warn!("{e}; this one serves its address alone");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let started = Instant::now();
        let mut taken = match self.prepare(&handover, &mut channel) {
            Ok(t) => t,
            Err(why) => {
                log::warn!("process {old} keeps its live pairs and lets them finish: {why}");
                let _ = channel.send(format!("abort: {why}").as_bytes());
                return Ok(());
            }
        };
        let waiting_only = taken.waiting_only.take();
        let ready: &[u8] = if waiting_only.is_some() { WAITING_ONLY } else { b"ready" };
        let committed = channel.send(ready).and_then(|()| channel.recv(MESSAGE_WAIT));
        match committed {
            Ok(m) if m == b"commit" => {}
            other => {
                let why = other.map_or_else(|e| e.to_string(), |m| String::from_utf8_lossy(&m).into_owned());
                // Only duplicates are dropped: the old process still holds every socket.
                log::warn!("process {old} did not confirm the handover ({why}): it keeps its live pairs");
                return Ok(());
            }
        }
        let (pairs, pending) = self.install(taken);
        match waiting_only {
            None => log::info!(
                "took over {pairs} live pair(s) and {pending} waiting client(s) from process {old} in {:.1} ms",
                started.elapsed().as_secs_f64() * 1e3
            ),
            Some(why) => log::warn!(
                "process {old} keeps its live pairs and lets them finish: {why}; took over its {pending} waiting \
                 client(s) in {:.1} ms",
                started.elapsed().as_secs_f64() * 1e3
            ),
        }
        if let Some((kernel, room)) = self.datapath.over_limits() {
            log::warn!(
                "the {kernel} kernel pairs taken over are more than this process's --kernel-memory and \
                 --kernel-buffer make room for ({room}): they carry on in the kernel, and new pairs are spliced in \
                 user space until enough of them end"
            );
        }
        Ok(())
    }

    /// Reads the manifest and duplicates every descriptor it names; checks the kernel maps.
    /// Nothing here changes anything the old process holds.
    fn prepare(&self, handover: &Handover, channel: &mut Channel) -> Result<Taken, String> {
        let text = channel.recv(MESSAGE_WAIT).map_err(|e| format!("no manifest came: {e}"))?;
        let manifest = read_manifest(&text)?;
        let mut fds = Fds::default();
        for &fd in &manifest.fds {
            let dup = handover.getfd(fd).map_err(|e| format!("cannot take its descriptor {fd}: {e}"))?;
            fds.insert(fd, dup);
        }
        for p in &manifest.pending {
            // A relay's client waits for a partner (in order: key ""; by token: its token, or
            // none yet); a proxy's for its upstream connection.
            let fits = match &self.partners {
                Partners::Clients { by: PairBy::Order, .. } => p.upstream.is_none() && p.key.as_deref() == Some(""),
                Partners::Clients { by: PairBy::Token, .. } => p.upstream.is_none() && p.key.as_deref() != Some(""),
                // Connecting, or waiting for a descriptor to connect with (`held_for_descriptors`).
                Partners::Upstreams(_) => p.upstream.is_some() || p.key.as_deref() == Some(""),
                Partners::Front { .. } => false,
            };
            if !fits {
                return Err("its waiting clients do not fit this command's pairing (run it with the same flags)".into());
            }
        }
        match self.check_pairs(&manifest, &mut fds) {
            Ok(maps) => Ok(Taken { manifest, fds, maps, waiting_only: None }),
            // A relay's waiting clients still move: they hold no kernel state, and this process
            // serves the listener where their partners will come. The pairs stay and drain there.
            Err(why) if matches!(self.partners, Partners::Clients { .. }) && !manifest.pending.is_empty() => {
                let mut manifest = manifest;
                manifest.pairs.clear();
                manifest.maps = manifest.maps.iter().map(|_| None).collect();
                Ok(Taken { manifest, fds, maps: Vec::new(), waiting_only: Some(why) })
            }
            Err(why) => Err(why),
        }
    }

    /// Checks that this process can carry on the manifest's pairs: each loop's kernel maps (taken
    /// from `fds`), by loop.
    fn check_pairs(&self, manifest: &Manifest, fds: &mut Fds) -> Result<Vec<Option<Box<dyn std::any::Any>>>, String> {
        // Each loop's maps go to the loop of the same place here, which must exist.
        let mut maps = Vec::new();
        for (n, loop_maps) in manifest.maps.iter().enumerate() {
            let Some(loop_maps) = loop_maps else {
                maps.push(None);
                continue;
            };
            let datapath = match n {
                0 => &self.datapath,
                n => match self.threads.idle_at_ref(n) {
                    Some(worker) => &worker.datapath,
                    None => {
                        return Err(format!(
                            "its event loop {} has pairs in kernel maps of its own and this process runs {} event \
                             loop(s) (start it with --threads {})",
                            n,
                            self.threads.count(),
                            manifest.maps.len()
                        ))
                    }
                },
            };
            maps.push(Some(datapath.check_maps(loop_maps, fds)?));
        }
        if manifest.pairs.iter().any(|p| !self.datapath.carries(&p.splice)) {
            return Err(format!(
                "it has pairs in the kernel maps and this process runs the {} datapath (start it with --datapath \
                 kernel)",
                self.datapath.name()
            ));
        }
        Ok(maps)
    }

    /// Carries on what was taken over. Committed: a pair that cannot be carried on now is reset.
    fn install(&mut self, taken: Taken) -> (usize, usize) {
        let Taken { manifest, mut fds, maps, .. } = taken;
        let loops = self.threads.count();
        for (n, checked) in maps.into_iter().enumerate() {
            if let (Some(checked), Some(server)) = (checked, self.loop_mut(n)) {
                server.adopt_maps(checked);
            }
        }
        let mut pairs = 0;
        for state in kernel_pairs_first(manifest.pairs) {
            // A pair in kernel maps stays with them; any other may go to any loop.
            let n = if manifest.maps.get(state.thread).is_some_and(|m| m.is_some()) {
                state.thread
            } else {
                state.thread % loops
            };
            if let Some(server) = self.loop_mut(n) {
                pairs += usize::from(server.import_pair(state, &mut fds));
            }
        }
        let mut pending = 0;
        for state in manifest.pending {
            pending += usize::from(self.import_pending(state, &mut fds));
        }
        self.datapath_due = Some(Instant::now());
        for worker in self.threads.idle() {
            worker.datapath_due = Some(Instant::now());
        }
        (pairs, pending)
    }

    /// Loop `n`'s server (0: this one), before the other loops' threads start.
    fn loop_mut(&mut self, n: usize) -> Option<&mut Server> {
        match n {
            0 => Some(self),
            n => self.threads.idle_at(n),
        }
    }

    /// Uses the old process's maps from now on (`check_maps` accepted them).
    fn adopt_maps(&mut self, checked: Box<dyn std::any::Any>) {
        self.datapath.install_maps(checked);
        // Its reports now come on the adopted ring buffer (the replaced one closed, which took
        // it out of the event loop).
        if let Some(fd) = self.datapath.events() {
            let source = &mut mio::unix::SourceFd(&fd);
            let registry = self.poll.registry();
            if let Err(e) = registry
                .register(source, super::DATAPATH, Interest::READABLE)
                .or_else(|_| registry.reregister(source, super::DATAPATH, Interest::READABLE))
            {
                log::error!("cannot watch the kernel datapath's reports: {e}");
            }
        }
    }

    fn import_pair(&mut self, mut state: PairState, fds: &mut Fds) -> bool {
        super::TOOK_OVER.store(true, std::sync::atomic::Ordering::Relaxed);
        let addrs = state.addrs;
        let ends = match (fds.take(state.ends[0]), fds.take(state.ends[1])) {
            (Ok(a), Ok(b)) => [a, b].map(|fd| TcpStream::from_std(std::net::TcpStream::from(fd))),
            _ => return false,
        };
        let splice_state = std::mem::replace(&mut state.splice, SpliceState::Userspace { dirs: Default::default() });
        let splice = match self.datapath.import(splice_state, [&ends[0], &ends[1]], fds) {
            Ok(s) => s,
            Err(e) => {
                // Both ends are armed to reset on close: their clients see a reset.
                return log_false(format!("pair {} <-> {} reset: cannot carry it on: {e}", addrs[0], addrs[1]));
            }
        };
        let label =
            if crate::datapath::spliced_alone(splice.name()) { UserspaceDatapath.name() } else { self.datapath.name() };
        let serial = self.next_serial();
        let slot = self.slots.vacant_key();
        let mut pair = Pair::import(ends, state, splice, serial);
        if let Err(e) = pair.register(self.poll.registry(), tokens(slot), false) {
            let ended = pair.end(Ending::Reset { end: 0, error: e });
            return log_false(format!("pair {} <-> {} {}: cannot watch it", addrs[0], addrs[1], ended.how));
        }
        if let Some(local) = pair.upstream_local() {
            self.remember_upstream(local, addrs[1].port());
        }
        self.slots.insert(Slot::Pair(pair));
        self.pair_metrics.insert(slot, self.metrics.pair_started(label));
        self.pairs += 1;
        self.threads.adopted(self.threads.me);
        self.metrics.set_loop_pairs(self.threads.me, self.pairs);
        self.watch_idle();
        // What came while the processes changed places is moved now.
        self.service(slot, true);
        true
    }

    fn import_pending(&mut self, state: PendingState, fds: &mut Fds) -> bool {
        super::TOOK_OVER.store(true, std::sync::atomic::Ordering::Relaxed);
        let Ok(fd) = fds.take(state.fd) else { return false };
        let mut stream = TcpStream::from_std(std::net::TcpStream::from(fd));
        let slot = self.slots.vacant_key();
        if let Err(e) = self.poll.registry().register(&mut stream, token(slot, 0), Interest::READABLE) {
            super::pair::reset_on_close(&stream);
            return log_false(format!("client {} reset: cannot watch it: {e}", state.addr));
        }
        let serial = self.next_serial();
        let mut p = Pending::new(stream, state.addr, serial, state.key);
        p.skip = state.skip;
        p.admitted = Instant::now().checked_sub(state.waited).unwrap_or_else(Instant::now);
        p.handed_over = true;
        if let (Some(c), Partners::Upstreams(connector)) = (state.upstream, &mut self.partners) {
            match fds.take(c.fd).ok().and_then(|fd| connector.import(c, fd, self.poll.registry(), token(slot, 1))) {
                Some(c) => {
                    self.timers.set(c.deadline(), Timer::ConnectTimeout { slot, serial });
                    p.upstream = Some(c);
                }
                None => {
                    let _ = self.poll.registry().deregister(&mut p.stream);
                    super::pair::reset_on_close(&p.stream);
                    return log_false(format!("client {} reset: its upstream connection could not move", p.addr));
                }
            }
        }
        let identified = p.key.is_some();
        let timeout_at = p.admitted + self.pair_timeout;
        self.slots.insert(Slot::Pending(p));
        self.pending += 1;
        self.metrics.set_pending(self.pending);
        match &self.partners {
            Partners::Clients { .. } => {
                self.timers.set(timeout_at, Timer::PairTimeout { slot, serial });
                if identified {
                    self.offer(slot);
                } else {
                    self.on_pending(slot);
                }
            }
            // Its upstream connection may have completed meanwhile; one the old process had no
            // descriptor for is made here.
            Partners::Upstreams(_) => {
                if self.pending_mut(slot, Some(serial)).is_some_and(|p| p.upstream.is_some()) {
                    self.on_upstream(slot);
                } else {
                    self.connect_upstream(slot, serial);
                }
            }
            Partners::Front { .. } => {}
        }
        true
    }
}

/// The manifest in `text`, of this version or of version 1 (a skrelay from before `--threads`:
/// one event loop, whose maps are loop 0's and whose pairs all were on it).
fn read_manifest(text: &[u8]) -> Result<Manifest, String> {
    let unreadable = |e: serde_json::Error| format!("unreadable manifest: {e}");
    let mut value: serde_json::Value = serde_json::from_slice(text).map_err(unreadable)?;
    let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    if version == 1 {
        let maps = value.get_mut("maps").map(serde_json::Value::take).unwrap_or_default();
        value["maps"] = serde_json::Value::Array(vec![maps]);
        value["version"] = VERSION.into();
    } else if version != u64::from(VERSION) && version != u64::from(VERSION_RESETTING) {
        return Err(format!(
            "its manifest is version {version} and this skrelay reads 1, {VERSION} and {VERSION_RESETTING}"
        ));
    }
    serde_json::from_value(value).map_err(unreadable)
}

/// What `prepare` took, waiting for the old process's commit.
struct Taken {
    manifest: Manifest,
    fds: Fds,
    /// By event loop.
    maps: Vec<Option<Box<dyn std::any::Any>>>,
    /// Only the waiting clients are taken, for this reason (the pairs cannot be carried on).
    waiting_only: Option<String>,
}

/// The new process's answer when it takes a relay's waiting clients and not its pairs; an older
/// skrelay reads it as a refusal and keeps everything, as before.
const WAITING_ONLY: &[u8] = b"ready-waiting";

fn log_false(line: String) -> bool {
    log::error!("{line}");
    false
}

/// The pairs in the order they are carried on: those that hold a place under --kernel-memory
/// (in the maps, or counted) first. A pair on splice(2) may join the maps at its first look, in
/// `import_pair`: it took the room of kernel pairs carried on after it, which then put the
/// process over its budget (a helper's pass: 8 and 12 kernel pairs where 6 fit, with the same
/// flags, and a warning that blamed the pairs taken over).
fn kernel_pairs_first(pairs: Vec<PairState>) -> Vec<PairState> {
    let (kernel, pipes): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|p| !p.splice.pipes_only());
    kernel.into_iter().chain(pipes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_holding_kernel_budget_are_carried_on_first() {
        let pair = |port: u16, splice: SpliceState| PairState {
            thread: 0,
            ends: [5, 6],
            addrs: [format!("127.0.0.1:{port}").parse().unwrap(), "127.0.0.1:2".parse().unwrap()],
            lasted: Duration::from_secs(1),
            shut: [false; 2],
            upstream_local: None,
            splice,
            idle: Duration::ZERO,
            resetting: None,
            skip: None,
            acked_base: None,
        };
        let kernel = || crate::datapath::handover::KernelSpliceState {
            cookies: [1, 2],
            acked_base: [0; 2],
            consumed: [0; 2],
            targets: [true; 2],
            peers: [true; 2],
            socks: [true; 2],
            counted: true,
            directions: vec![],
        };
        let pipes = || SpliceState::Userspace { dirs: Default::default() };
        let handover = |k, joined| SpliceState::Handover {
            user: Box::new(pipes()),
            kernel: k,
            joined,
            after: 65536,
            stays: false,
            half_closed: false,
            user_moved: [0; 2],
            refused: true,
        };
        let mut not_joined = kernel();
        (not_joined.targets, not_joined.peers, not_joined.socks, not_joined.counted) =
            ([false; 2], [false; 2], [false; 2], false);
        let order = kernel_pairs_first(vec![
            pair(10, pipes()),
            pair(11, handover(not_joined, false)),
            pair(12, SpliceState::Kernel(kernel())),
            pair(13, pipes()),
            pair(14, handover(kernel(), true)),
        ]);
        let ports: Vec<u16> = order.iter().map(|p| p.addrs[0].port()).collect();
        assert_eq!(ports, [12, 14, 10, 11, 13]);
    }

    #[test]
    fn a_version_1_manifest_is_one_loop_of_version_2() {
        // A pair as version 1 wrote it: no `thread`.
        let pair = PairState {
            thread: 3,
            ends: [5, 6],
            addrs: ["127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap()],
            lasted: Duration::from_secs(1),
            shut: [false, true],
            upstream_local: None,
            splice: SpliceState::Userspace { dirs: Default::default() },
            idle: Duration::from_secs(2),
            resetting: Some((1, libc::ECONNRESET)),
            skip: Some([3, 0]),
            acked_base: Some([0, 1]),
        };
        let mut pair = serde_json::to_value(pair).unwrap();
        pair.as_object_mut().unwrap().remove("thread");
        pair.as_object_mut().unwrap().remove("resetting");
        // Nor what `held` needs (before 2026-12-07).
        pair.as_object_mut().unwrap().remove("skip");
        pair.as_object_mut().unwrap().remove("acked_base");
        // Nor `idle` (before --idle-timeout): such a pair starts its idle clock afresh.
        pair.as_object_mut().unwrap().remove("idle");
        let v1 = serde_json::json!({
            "version": 1, "datapath": "kernel", "maps": null, "pairs": [pair], "pending": [], "fds": [5, 6]
        });
        let m = read_manifest(v1.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((m.version, m.maps.len(), m.maps[0].is_none()), (VERSION, 1, true));
        assert_eq!((m.pairs.len(), m.pairs[0].thread, m.pairs[0].shut), (1, 0, [false, true]));
        assert_eq!(m.pairs[0].idle, Duration::ZERO);
        assert_eq!(m.pairs[0].resetting, None, "a pair from an older process is live");
        assert_eq!((m.pairs[0].skip, m.pairs[0].acked_base), (None, None));
        // A manifest that carries a resetting pair is version 3, read as well.
        let v3 = r#"{"version":3,"datapath":"kernel","maps":[],"pairs":[],"pending":[],"fds":[]}"#;
        assert!(read_manifest(v3.as_bytes()).is_ok());
        let v9 = r#"{"version":9,"datapath":"kernel","maps":[],"pairs":[],"pending":[],"fds":[]}"#;
        assert!(read_manifest(v9.as_bytes()).err().is_some_and(|e| e.contains("version 9")));
    }
}
