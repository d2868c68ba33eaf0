//! `proxy`'s upstream connections: a non-blocking connect to the next upstream of a client's
//! plan, its timeout, failover to the rest of the plan, and marking failed upstreams down. It
//! also remembers the local address of every upstream connection it made that is still open, so
//! a client that comes from one is recognised as this proxy looping into itself.
use crate::{
    datapath::handover::Exporter,
    upstream::{Upstreams, DOWN_FOR},
};
use mio::{net::TcpStream, Interest, Registry, Token};
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// A non-blocking connect to an upstream, with the upstreams still to try after it.
pub(super) struct Connecting {
    pub(super) stream: TcpStream,
    /// Its local address: a client that comes from it is this proxy looping into itself.
    pub(super) local: SocketAddr,
    /// The upstream it connects to.
    to: SocketAddr,
    idx: usize,
    deadline: Instant,
    rest: Vec<usize>,
}

impl Connecting {
    /// When the connect runs past `--connect-timeout`.
    pub(super) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// `--takeover`: what the new process needs to carry the connect on.
    pub(super) fn export(&self, ex: &mut Exporter) -> ConnectingState {
        ConnectingState {
            fd: ex.fd(&self.stream),
            local: self.local,
            idx: self.idx,
            left: self.deadline.saturating_duration_since(Instant::now()),
            rest: self.rest.clone(),
        }
    }
}

/// A connect in progress, handed over (`--takeover`).
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct ConnectingState {
    pub(super) fd: std::os::fd::RawFd,
    local: SocketAddr,
    idx: usize,
    left: Duration,
    rest: Vec<usize>,
}

/// Where a connect stands after a readiness event.
#[derive(Debug)]
pub(super) enum Progress {
    /// Still connecting.
    Waiting,
    /// Connected to this upstream address.
    Connected(SocketAddr),
    Failed(io::Error),
}

pub(super) struct Connector {
    upstreams: Upstreams,
    timeout: Duration,
    /// Local addresses of our upstream connections, connecting or spliced, with the port each
    /// connects to. The port matters: Linux gives the same ephemeral port to connections to
    /// different destinations, so a client may share one of them by chance.
    own: OwnUpstreams,
    /// Set when the last plan stopped because connect(2) failed for want of descriptors or
    /// memory here (`shortage`).
    shortage: Option<io::Error>,
    /// Whether this process still runs outside an accelerated cgroup (`watch_cgroup`).
    cgroup: Option<CgroupWatch>,
}

/// This process's cgroup, looked at before each upstream connection. A socket belongs to the
/// cgroup its process was in when it was made: a proxy moved into a cgroup that `skrelay accel`
/// accelerates (by `cgclassify`, `systemd-run --scope`, a write to `cgroup.procs`) made upstream
/// connections that accel joined, whose bytes went into their sockets' redirect queue, past
/// both datapaths: streams cut with a clean EOF, or hung (a helper's pass over the jobs
/// combined). Its clients' sockets, accepted from a listener made before, stay where they were.
struct CgroupWatch {
    /// /proc/self/cgroup, read again from its start each time (a seq file: made anew).
    file: std::fs::File,
    seen: Vec<u8>,
    /// Why no upstream connection may be made from the cgroup `seen` names.
    refused: Option<String>,
    /// The ports the accel check looks for: the listening port, then the upstreams'.
    ports: Vec<u16>,
    /// When a refusal is looked at again though nothing seen changed.
    recheck: Option<Instant>,
    /// accel's state directory, and what `stamp` last read of it: `accel on` and `off` rename
    /// directories there, which changes its modification time. The cgroup this process stays in
    /// may become accelerated, or stop being so (a re-check pass: served on, and lost bytes,
    /// after `accel off` then `on` again; stayed refusing after `accel off`).
    accel_dir: std::path::PathBuf,
    stamp: Option<(u64, i64, i64)>,
}

/// What /proc/self/cgroup holds now (a seq file, made anew by a read from its start).
fn read_from_start(file: &std::fs::File, buf: &mut [u8]) -> usize {
    use std::os::unix::fs::FileExt;
    file.read_at(buf, 0).unwrap_or(0)
}

/// The inode and modification time of `dir` (None while it does not exist): one statx.
fn stamp(dir: &std::path::Path) -> Option<(u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| (m.ino(), m.mtime(), m.mtime_nsec()))
}

/// How often a refusal is looked at again while the cgroup stays the same.
const RECHECK_REFUSAL: Duration = Duration::from_secs(1);

impl CgroupWatch {
    /// Why no upstream connection may be made now; looks again only when the cgroup changed.
    fn refused(&mut self) -> Option<&str> {
        let stamp = stamp(&self.accel_dir);
        // Without accel's state directory no cgroup is accelerated, wherever this process is:
        // one statx per upstream connection. Reading /proc/self/cgroup and walking to the
        // directory's nearest parent each time cost 8% of the proxy's CPU at 6,000 connections
        // a second (perf), about a tenth of its connection rate.
        if stamp.is_none() && self.refused.is_none() {
            self.stamp = None;
            return None;
        }
        let mut buf = [0u8; 4096];
        let n = read_from_start(&self.file, &mut buf);
        let now = Instant::now();
        let moved = buf[..n] != self.seen[..];
        if !moved && stamp == self.stamp && self.recheck.is_none_or(|at| now < at) {
            return self.refused.as_deref();
        }
        self.seen = buf[..n].to_vec();
        let had_state = std::mem::replace(&mut self.stamp, stamp).is_some();
        let was = self.refused.take();
        self.refused = crate::relay_cmd::outside_accel("proxy", &self.ports).err().map(|e| e.to_string());
        self.recheck = self.refused.as_ref().map(|_| now + RECHECK_REFUSAL);
        // A move while no accel state existed was not looked at then: what changed now is accel.
        let moved = moved && had_state;
        match (&self.refused, moved, was.is_some()) {
            (Some(why), true, _) => log::error!(
                "this process was moved into another cgroup, and now {why}: new clients are reset until it is moved \
                 out or that cgroup is no longer accelerated (live pairs are not affected)"
            ),
            (Some(why), false, false) => log::error!(
                "skrelay accel now covers this process's cgroup: {why}: new clients are reset until it is moved out \
                 or that cgroup is no longer accelerated (live pairs are not affected)"
            ),
            (Some(_), false, true) => {}
            (None, true, _) => {
                log::info!("this process was moved into another cgroup, which skrelay accel leaves alone")
            }
            (None, false, true) => log::info!("skrelay accel no longer covers this process's cgroup: serving again"),
            (None, false, false) => {}
        }
        self.refused.as_deref()
    }
}

/// An error of connect(2) or socket(2) that is this process's or host's shortage, not the
/// upstream's failure.
fn local_shortage(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Local addresses of our upstream connections, connecting or spliced, with the port each
/// connects to; shared by every thread's loop (`--threads`), since a pair may end on any.
/// IPv4-mapped addresses are kept and compared as IPv4: an upstream connection from 127.0.0.1
/// steered back to a dual-stack `[::]` listener arrives from `[::ffff:127.0.0.1]`, and the
/// other way round, which went unrecognised and looped until descriptors ran out.
#[derive(Clone, Default)]
pub(super) struct OwnUpstreams(Arc<Mutex<HashMap<SocketAddr, u16>>>);

/// How an upstream connection's local address is known when it comes back as a client: IPv4
/// for IPv4-mapped, and without the interface of a link-local address, which names the link it
/// left by and the one it came back by differently (a loop over a veth pair in one namespace made
/// 20,000 connections of one client in 3 s; a re-check pass).
fn own_key(addr: SocketAddr) -> SocketAddr {
    match crate::sys::unmapped(addr) {
        SocketAddr::V6(v6) => SocketAddr::V6(std::net::SocketAddrV6::new(*v6.ip(), v6.port(), 0, 0)),
        v4 => v4,
    }
}

impl OwnUpstreams {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, u16>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An upstream connection with local address `local`, connected to port `to`, lives on.
    pub(super) fn remember(&self, local: SocketAddr, to: u16) {
        self.table().insert(own_key(local), to);
    }

    /// The upstream connection from `local` has ended (its pair ended, or its client left).
    pub(super) fn forget(&self, local: SocketAddr) {
        self.table().remove(&own_key(local));
    }

    fn port_of(&self, addr: &SocketAddr) -> Option<u16> {
        self.table().get(&own_key(*addr)).copied()
    }
}

impl Connector {
    pub(super) fn new(upstreams: Upstreams, timeout: Duration) -> Connector {
        Connector { upstreams, timeout, own: OwnUpstreams::default(), shortage: None, cgroup: None }
    }

    /// Looks at this process's cgroup before each upstream connection from now on (see
    /// `CgroupWatch`); `listen_port` and the upstreams' ports are what an accel check covers.
    pub(super) fn watch_cgroup(&mut self, listen_port: u16) {
        let Ok(file) = std::fs::File::open("/proc/self/cgroup") else { return };
        let ports = std::iter::once(listen_port).chain(self.upstreams.addrs().iter().map(|a| a.port())).collect();
        // Where accel's state appears (the outer bpffs under `ip netns exec`: the local
        // /sys/fs/bpf there never holds it, and a proxy watching it served on from an
        // accelerated cgroup; a re-check pass).
        let accel_dir = crate::bpffs::root_to_watch().join("accel");
        let stamp = stamp(&accel_dir);
        let mut watch = CgroupWatch { file, seen: Vec::new(), refused: None, ports, recheck: None, accel_dir, stamp };
        // The cgroup at start was checked already (`relay_cmd::open`): only a change is news.
        let mut buf = [0u8; 4096];
        let n = read_from_start(&watch.file, &mut buf);
        watch.seen = buf[..n].to_vec();
        self.cgroup = Some(watch);
    }

    /// Why this process may make no upstream connection now, if it may not.
    pub(super) fn refused(&mut self) -> Option<String> {
        self.cgroup.as_mut()?.refused().map(str::to_string)
    }

    /// The port our upstream connection from `addr` connects to, if `addr` is the local address
    /// of one: a client from there to that port of ours is that connection.
    pub(super) fn own_connects_to(&self, addr: &SocketAddr) -> Option<u16> {
        self.own.port_of(addr)
    }

    #[cfg(test)]
    fn is_own(&self, addr: &SocketAddr, to: u16) -> bool {
        self.own_connects_to(addr) == Some(to)
    }

    /// `c` connected: its upstream is up (for the metrics).
    pub(super) fn connected(&mut self, c: &Connecting) {
        // Said once it is back: the log said when it went down, and nothing after (a helper's
        // failover pass).
        if self.upstreams.mark_up(c.idx) {
            log::info!("upstream {}: connected again; up", c.to);
        }
    }

    /// Starts connecting a new client to the first upstream of its round-robin plan that takes a
    /// connect, watched under `token`. None: no upstream is left to try.
    pub(super) fn connect(&mut self, registry: &Registry, token: Token) -> Option<Connecting> {
        let plan = self.upstreams.plan(Instant::now());
        self.try_plan(plan, registry, token)
    }

    fn try_plan(&mut self, mut plan: Vec<usize>, registry: &Registry, token: Token) -> Option<Connecting> {
        self.shortage = None;
        while !plan.is_empty() {
            let idx = plan.remove(0);
            let addr = self.upstreams.addr(idx);
            match TcpStream::connect(addr) {
                Ok(mut stream) => {
                    // As for accepted sockets (`sys::arm_for_clients`): urgent bytes stay in the stream,
                    // and a close before the pair ends well is a reset, from the start: an upstream
                    // connection that completed before the loop saw it, closed by a client that
                    // left or by this process's death, read as a client that said nothing (a
                    // re-check pass).
                    let _ = crate::sys::inline_urgent_data(&stream);
                    crate::sys::reset_on_close(&stream);
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    if let Err(e) = registry.register(&mut stream, token, interest) {
                        log::warn!("upstream {addr}: cannot watch the connection: {e}");
                        continue;
                    }
                    // Bound by connect(2); unknown only if the socket already failed, which
                    // `progress` then reports.
                    let local = stream.local_addr().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
                    self.own.remember(local, addr.port());
                    let deadline = Instant::now() + self.timeout;
                    return Some(Connecting { stream, local, to: addr, idx, deadline, rest: plan });
                }
                // Out of descriptors (or memory) here: no upstream would do better, and none is
                // to blame.
                Err(e) if local_shortage(&e) => {
                    // Spare pipes of this loop hold two descriptors each: close them and try
                    // the same upstream again before giving up on this client.
                    if crate::datapath::userspace::release_spare_pipes() > 0 {
                        plan.insert(0, idx);
                        continue;
                    }
                    self.shortage = Some(e);
                    return None;
                }
                Err(e) => {
                    if self.upstreams.mark_down(idx, Instant::now()) {
                        log::warn!("upstream {addr}: {e}; marked down for {DOWN_FOR:?}");
                    } else {
                        log::debug!("upstream {addr}: {e}; still down");
                    }
                }
            }
        }
        None
    }

    /// Why the last `connect` or `failed` found no connection, when the cause was this
    /// process's want of descriptors or memory rather than the upstreams.
    pub(super) fn shortage(&self) -> Option<&io::Error> {
        self.shortage.as_ref()
    }

    /// Where `c` stands; called when its socket is ready. Its TCP state says it in one call
    /// (SO_ERROR and getpeername(2) were two more per upstream connection).
    pub(super) fn progress(c: &Connecting) -> Progress {
        let Ok(t) = crate::sys::tcp_counters(&c.stream) else { return Self::progress_by_error(c) };
        if t.connecting() {
            return Progress::Waiting;
        }
        // Connected, and already reset (an upstream that answers at once and resets): a pair
        // all the same, whose first look takes the error and delivers the answer before the
        // reset (`Pair::service`). The SYN acknowledged tells it from a connect that failed.
        if !t.closed() || t.bytes_acked > 0 {
            return Progress::Connected(c.to);
        }
        match c.stream.take_error() {
            Ok(Some(e)) | Err(e) => Progress::Failed(e),
            Ok(None) => Progress::Failed(io::Error::from(io::ErrorKind::ConnectionReset)),
        }
    }

    /// `progress` where TCP_INFO cannot be read.
    fn progress_by_error(c: &Connecting) -> Progress {
        match c.stream.take_error() {
            Ok(Some(e)) | Err(e) => return Progress::Failed(e),
            Ok(None) => {}
        }
        match c.stream.peer_addr() {
            Ok(addr) => Progress::Connected(addr),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Progress::Waiting,
            Err(e) => Progress::Failed(e),
        }
    }

    /// `c` failed or timed out: its upstream is marked down and the rest of its plan is tried,
    /// watched under `token`. None: no upstream is left to try.
    pub(super) fn failed(
        &mut self,
        mut c: Connecting,
        error: io::Error,
        registry: &Registry,
        token: Token,
    ) -> Option<Connecting> {
        self.abandon(&mut c, Some(registry));
        if self.upstreams.mark_down(c.idx, Instant::now()) {
            log::warn!("upstream {}: {error}; marked down for {DOWN_FOR:?}", self.upstreams.addr(c.idx));
        } else {
            log::debug!("upstream {}: {error}; still down", self.upstreams.addr(c.idx));
        }
        self.try_plan(c.rest, registry, token)
    }

    /// Forgets `c` and stops watching it, given the registry (its client left, or it is about to
    /// be spliced: then the pair watches it on).
    pub(super) fn abandon(&mut self, c: &mut Connecting, registry: Option<&Registry>) {
        if let Some(registry) = registry {
            let _ = registry.deregister(&mut c.stream);
        }
        self.own.forget(c.local);
    }

    /// An upstream connection with local address `local`, connected to port `to`, lives on in a
    /// pair.
    pub(super) fn remember(&mut self, local: SocketAddr, to: u16) {
        self.own.remember(local, to);
    }

    /// The record of our upstream connections, for the loops of the other threads.
    pub(super) fn own(&self) -> OwnUpstreams {
        self.own.clone()
    }

    /// `--takeover`: a connect the old process started, watched under `token` from now on.
    /// None if it names an upstream this process does not have (other `--upstream` flags).
    pub(super) fn import(
        &mut self,
        c: ConnectingState,
        fd: std::os::fd::OwnedFd,
        registry: &Registry,
        token: Token,
    ) -> Option<Connecting> {
        let n = self.upstreams.addrs().len();
        if c.idx >= n || c.rest.iter().any(|&i| i >= n) {
            return None;
        }
        let mut stream = TcpStream::from_std(std::net::TcpStream::from(fd));
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE).ok()?;
        self.own.remember(c.local, self.upstreams.addr(c.idx).port());
        let to = self.upstreams.addr(c.idx);
        Some(Connecting { stream, local: c.local, to, idx: c.idx, deadline: Instant::now() + c.left, rest: c.rest })
    }

    /// The pair that held the upstream connection from `local` has ended.
    pub(super) fn forget(&mut self, local: SocketAddr) {
        self.own.forget(local);
    }
}

#[cfg(test)]
mod tests {
    //! Connects over loopback to real listeners and to ports nothing listens on.
    use super::*;
    use mio::{Events, Poll};
    use std::net::TcpListener;

    const TOKEN: Token = Token(7);

    /// A loopback port with nothing listening on it.
    fn closed_port() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    /// Polls `c` until it connects or fails, failing over as the server does.
    fn settle(connector: &mut Connector, poll: &mut Poll, mut c: Connecting) -> (Option<SocketAddr>, usize) {
        let mut events = Events::with_capacity(8);
        let mut failovers = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            poll.poll(&mut events, Some(Duration::from_millis(50))).unwrap();
            match Connector::progress(&c) {
                Progress::Waiting => {}
                Progress::Connected(addr) => return (Some(addr), failovers),
                Progress::Failed(e) => match connector.failed(c, e, poll.registry(), TOKEN) {
                    Some(next) => {
                        failovers += 1;
                        c = next;
                    }
                    None => return (None, failovers),
                },
            }
        }
        panic!("no outcome within 5 s");
    }

    #[test]
    fn connects_and_remembers_its_own_connections_until_forgotten() {
        let up = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = up.local_addr().unwrap();
        let mut poll = Poll::new().unwrap();
        let mut connector = Connector::new(Upstreams::new(vec![addr]), Duration::from_secs(1));
        let before = Instant::now();
        let c = connector.connect(poll.registry(), TOKEN).expect("connecting");
        assert!(c.deadline() >= before + Duration::from_secs(1));
        let local = c.local;
        assert!(
            connector.is_own(&local, addr.port()),
            "a client from {local} to our port {} would be this proxy's own connection",
            addr.port()
        );
        // The same local address dialling another port is someone else's connection (Linux
        // reuses an ephemeral port for different destinations).
        assert!(!connector.is_own(&local, addr.port().wrapping_add(1)));
        let (_accepted, peer) = up.accept().unwrap();
        assert_eq!(peer, local);
        let (got, failovers) = settle(&mut connector, &mut poll, c);
        assert_eq!((got, failovers), (Some(addr), 0));
        connector.forget(local);
        assert!(!connector.is_own(&local, addr.port()));
    }

    #[test]
    fn a_refusing_upstream_is_marked_down_and_the_next_one_is_tried() {
        let down = closed_port();
        let up = TcpListener::bind("127.0.0.1:0").unwrap();
        let up_addr = up.local_addr().unwrap();
        let mut poll = Poll::new().unwrap();
        let mut connector = Connector::new(Upstreams::new(vec![down, up_addr]), Duration::from_secs(1));
        // The first client's plan starts at the refusing one (round-robin from 0).
        let c = connector.connect(poll.registry(), TOKEN).expect("connecting");
        let (got, _) = settle(&mut connector, &mut poll, c);
        assert_eq!(got, Some(up_addr), "failed over to the listening upstream");
        assert!(connector.own.table().len() <= 1, "the refused connection is forgotten: {:?}", connector.own.table());
        // The refused one is marked down: the next two clients both start with the good one.
        for _ in 0..2 {
            let c = connector.connect(poll.registry(), TOKEN).expect("connecting");
            assert_eq!(settle(&mut connector, &mut poll, c), (Some(up_addr), 0));
        }
    }

    #[test]
    fn when_every_upstream_fails_there_is_nothing_left_and_nothing_remembered() {
        let mut poll = Poll::new().unwrap();
        let mut connector = Connector::new(Upstreams::new(vec![closed_port(), closed_port()]), Duration::from_secs(1));
        let outcome = match connector.connect(poll.registry(), TOKEN) {
            Some(c) => settle(&mut connector, &mut poll, c),
            None => (None, 0),
        };
        assert_eq!(outcome.0, None);
        assert!(connector.own.table().is_empty(), "{:?}", connector.own.table());
    }

    #[test]
    fn a_timed_out_connect_marks_its_upstream_down_and_fails_over() {
        let slow = TcpListener::bind("127.0.0.1:0").unwrap();
        let fast = TcpListener::bind("127.0.0.1:0").unwrap();
        let (slow_addr, fast_addr) = (slow.local_addr().unwrap(), fast.local_addr().unwrap());
        let mut poll = Poll::new().unwrap();
        let mut connector = Connector::new(Upstreams::new(vec![slow_addr, fast_addr]), Duration::from_millis(1));
        let c = connector.connect(poll.registry(), TOKEN).expect("connecting");
        let local = c.local;
        // The server's ConnectTimeout timer does this once the deadline has passed.
        let why = io::Error::new(io::ErrorKind::TimedOut, "no answer within --connect-timeout");
        let next = connector.failed(c, why, poll.registry(), TOKEN).expect("the next upstream");
        assert!(!connector.is_own(&local, slow_addr.port()), "the timed-out connection is forgotten");
        assert_eq!(settle(&mut connector, &mut poll, next), (Some(fast_addr), 0));
        let c = connector.connect(poll.registry(), TOKEN).expect("connecting");
        assert_eq!(settle(&mut connector, &mut poll, c).0, Some(fast_addr), "the slow one is down, tried last");
    }
}
