//! The accept-and-splice loop: one mio thread accepts clients, finds each one its partner, hands
//! the pair to the datapath and then only propagates end of file and resets. Payload never
//! passes through here on the kernel datapath.
use crate::{
    cli::PairBy,
    datapath::{userspace::UserspaceDatapath, Datapath, Flow, Splice, SpliceError},
    error::Error,
    metrics::{Metrics, PairEnd, PairMetric},
    pairing::{parse_token_line, Matcher, TokenLine, MAX_TOKEN},
    sys,
    upstream::{Upstreams, DOWN_FOR},
};
use mio::{
    event::Event,
    net::{TcpListener, TcpStream},
    Events, Interest, Poll, Token,
};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR2};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    io,
    net::{Shutdown, SocketAddr},
    time::{Duration, Instant},
};

/// Where a client's partner comes from.
pub enum Partnering {
    /// `relay`: another client of the same listener.
    Clients(PairBy),
    /// `proxy`: a fresh connection to an upstream.
    Upstreams { upstreams: Upstreams, connect_timeout: Duration },
}

/// What the loop needs to know, whichever command started it.
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub partnering: Partnering,
    pub max_pending: usize,
    pub pair_timeout: Duration,
    pub drain_timeout: Duration,
    /// Counters for `--metrics` (kept whether or not they are served).
    pub metrics: Metrics,
}

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const FIRST_SLOT_TOKEN: usize = 2;
/// First and longest wait between checks that a half-closed source's bytes have all left.
const FLUSH_CHECK_FIRST: Duration = Duration::from_millis(1);
const FLUSH_CHECK_MAX: Duration = Duration::from_millis(100);
/// How long to wait before accepting again when the process is out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

fn token(slot: usize, end: usize) -> Token {
    Token(FIRST_SLOT_TOKEN + slot * 2 + end)
}

fn slot_of(token: Token) -> (usize, usize) {
    let n = token.0 - FIRST_SLOT_TOKEN;
    (n / 2, n % 2)
}

/// A client waiting for its token line or its partner.
struct Pending {
    stream: TcpStream,
    addr: SocketAddr,
    serial: u64,
    /// The key it pairs on: the token, or "" in order mode; None until the token line is read.
    key: Option<String>,
    /// Bytes at the head of its queue that are not to be forwarded (its token line, which stays
    /// queued until the datapath discards it: reading it here would split an skb that the kernel
    /// datapath then never forwards).
    skip: u32,
    /// `proxy`: the upstream connection being made for it.
    upstream: Option<Connecting>,
}

/// A non-blocking connect to an upstream, with the upstreams still to try after it.
struct Connecting {
    stream: TcpStream,
    /// Its local address: a client that comes from it is this proxy looping into itself.
    local: SocketAddr,
    idx: usize,
    deadline: Instant,
    rest: Vec<usize>,
}

/// Two spliced connections.
struct Pair {
    ends: [TcpStream; 2],
    addrs: [SocketAddr; 2],
    splice: Box<dyn Splice>,
    since: Instant,
    serial: u64,
    /// Direction i (from end i) has finished and end 1-i's write side is shut down.
    shut: [bool; 2],
    flush_delay: Duration,
    /// `proxy`: the local address of the upstream end (see `Connecting::local`).
    upstream_local: Option<SocketAddr>,
    /// Its place in the metrics (active until it ends).
    metric: PairMetric,
}

enum Slot {
    Pending(Pending),
    Pair(Pair),
}

/// How a pair ended, for the log and for what its clients see.
enum Ending {
    Done,
    Reset { end: usize, error: io::Error },
    Drained,
}

pub struct Server {
    poll: Poll,
    listener: Option<TcpListener>,
    signals: Signals,
    datapath: Box<dyn Datapath>,
    config: ServerConfig,
    slots: Slab<Slot>,
    matcher: Matcher<usize>,
    pending: usize,
    pairs: usize,
    serial: u64,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    again: Vec<(usize, u64)>,
    accept_retry: Option<Instant>,
    drain_deadline: Option<Instant>,
    warned_map_full: bool,
    /// `proxy`: local addresses of our upstream connections, with the port each connects to, to
    /// recognise one coming back in. The port matters: Linux gives the same ephemeral port to
    /// connections to different destinations, so a client may share one of them by chance.
    own_upstreams: HashMap<SocketAddr, u16>,
}

/// Binds the listening socket with a backlog deep enough for bursts of thousands of clients.
pub fn listen(addr: SocketAddr) -> Result<TcpListener, Error> {
    use socket2::{Domain, Socket, Type};
    let fail = |source| Error::Listen { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), None).map_err(fail)?;
    socket.set_reuse_address(true).map_err(fail)?;
    socket.bind(&addr.into()).map_err(fail)?;
    socket.listen(4096).map_err(fail)?;
    Ok(TcpListener::from_std(socket.into()))
}

impl Server {
    pub fn new(mut listener: TcpListener, datapath: Box<dyn Datapath>, config: ServerConfig) -> Result<Self, Error> {
        let poll = Poll::new().map_err(|e| Error::io("cannot create the event loop", e))?;
        // SIGUSR2: a new skrelay took our sockets (--takeover) and asks us to hand over.
        let mut signals =
            Signals::new([SIGINT, SIGTERM, SIGUSR2]).map_err(|e| Error::io("cannot handle signals", e))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .and_then(|_| poll.registry().register(&mut signals, SIGNALS, Interest::READABLE))
            .map_err(|e| Error::io("cannot register with the event loop", e))?;
        sys::raise_fd_limit();
        Ok(Server {
            poll,
            listener: Some(listener),
            signals,
            datapath,
            config,
            slots: Slab::new(),
            matcher: Matcher::default(),
            pending: 0,
            pairs: 0,
            serial: 0,
            timers: BinaryHeap::new(),
            again: Vec::new(),
            accept_retry: None,
            drain_deadline: None,
            warned_map_full: false,
            own_upstreams: HashMap::new(),
        })
    }

    pub fn run(mut self) -> Result<(), Error> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.next_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io("event loop failed", e));
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    SIGNALS => self.on_signal(),
                    t => {
                        let (slot, end) = slot_of(t);
                        self.on_socket(slot, end, event);
                    }
                }
            }
            for (slot, serial) in std::mem::take(&mut self.again) {
                if self.is_pair(slot, serial) {
                    self.service(slot, false);
                }
            }
            self.fire_timers();
            if self.accept_retry.is_some_and(|t| Instant::now() >= t) {
                self.accept_retry = None;
                self.accept();
            }
            if let Some(deadline) = self.drain_deadline {
                if self.pairs == 0 && self.pending == 0 {
                    break;
                }
                if Instant::now() >= deadline {
                    log::warn!("drain timeout: closing {} live pair(s)", self.pairs);
                    self.end_all(|| Ending::Drained);
                    break;
                }
            }
        }
        if let Some(summary) = self.datapath.summary() {
            log::info!("{summary}");
        }
        log::info!("stopped");
        Ok(())
    }

    fn next_timeout(&self) -> Option<Duration> {
        if !self.again.is_empty() {
            return Some(Duration::ZERO);
        }
        let deadlines = [self.timers.peek().map(|Reverse((t, _, _))| *t), self.drain_deadline, self.accept_retry];
        deadlines.into_iter().flatten().min().map(|t| t.saturating_duration_since(Instant::now()))
    }

    fn next_serial(&mut self) -> u64 {
        self.serial += 1;
        self.serial
    }

    fn is_pair(&self, slot: usize, serial: u64) -> bool {
        matches!(self.slots.get(slot), Some(Slot::Pair(p)) if p.serial == serial)
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, addr)) => self.admit(stream, addr),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
                    ) =>
                {
                    log::warn!("cannot accept more clients now: {e} (retrying in {ACCEPT_BACKOFF:?})");
                    self.accept_retry = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
                Err(e) => log::debug!("accept: {e}"),
            }
        }
    }

    fn admit(&mut self, mut stream: TcpStream, addr: SocketAddr) {
        // Clients still sending their token line are capped like waiting ones, so slow senders
        // cannot pile up; a client that would wait is checked again once it is identified.
        let unidentified = self.pending - self.matcher.waiting();
        if matches!(self.config.partnering, Partnering::Clients(_)) && unidentified >= self.config.max_pending {
            log::warn!(
                "client {addr} closed: {unidentified} clients are already sending their token line (--max-pending)"
            );
            return;
        }
        if matches!(self.config.partnering, Partnering::Upstreams { .. }) {
            // One of our own upstream connections: the upstream leads back to this proxy. Without
            // this each looped connection would open another, until the process ran out of files.
            let to = stream.local_addr().map(|a| a.port()).ok();
            if self.own_upstreams.get(&addr).is_some_and(|&port| Some(port) == to) {
                sys::reset_on_close(&stream);
                log::error!(
                    "client {addr} reset: it is this proxy's own upstream connection (the upstream leads back \
                     to this proxy: give --upstream the address of the server to proxy to)"
                );
                return;
            }
            if self.pending >= self.config.max_pending {
                sys::reset_on_close(&stream);
                log::warn!(
                    "client {addr} reset: {} clients already wait for their upstream connection (--max-pending)",
                    self.pending
                );
                return;
            }
        }
        let _ = stream.set_nodelay(true);
        let entry = self.slots.vacant_entry();
        let slot = entry.key();
        if let Err(e) = self.poll.registry().register(&mut stream, token(slot, 0), Interest::READABLE) {
            log::warn!("client {addr} closed: cannot watch it: {e}");
            return;
        }
        self.serial += 1;
        let serial = self.serial;
        let since = Instant::now();
        let key = match self.config.partnering {
            Partnering::Clients(PairBy::Token) => None,
            _ => Some(String::new()),
        };
        entry.insert(Slot::Pending(Pending { stream, addr, serial, key, skip: 0, upstream: None }));
        self.pending += 1;
        self.config.metrics.set_pending(self.pending);
        log::debug!("client {addr} connected");
        match &mut self.config.partnering {
            Partnering::Clients(by) => {
                let by = *by;
                self.timers.push(Reverse((since + self.config.pair_timeout, slot, serial)));
                match by {
                    PairBy::Order => self.offer(slot),
                    PairBy::Token => self.on_pending(slot),
                }
            }
            Partnering::Upstreams { upstreams, .. } => {
                let plan = upstreams.plan(Instant::now());
                self.connect_upstream(slot, plan);
            }
        }
    }

    fn on_socket(&mut self, slot: usize, end: usize, event: &Event) {
        match self.slots.get(slot) {
            Some(Slot::Pending(_)) if end == 1 => self.on_upstream(slot),
            Some(Slot::Pending(_)) => self.on_pending(slot),
            Some(Slot::Pair(_)) => {
                let check = event.is_error() || event.is_read_closed() || event.is_write_closed();
                self.service(slot, check);
            }
            None => {}
        }
    }

    /// Reads a pending client's token line, or notices that it left.
    fn on_pending(&mut self, slot: usize) {
        let Some(Slot::Pending(p)) = self.slots.get_mut(slot) else {
            return;
        };
        let mut buf = [0u8; MAX_TOKEN + 2];
        let peeked = sys::peek(&p.stream, &mut buf);
        if p.key.is_some() {
            if let Some(why) = Self::gone(p, peeked) {
                self.drop_pending(slot, &why);
            }
            return;
        }
        let n = match peeked {
            Ok(0) => return self.drop_pending(slot, "closed before sending a token line"),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => return self.drop_pending(slot, &e.to_string()),
        };
        match parse_token_line(&buf[..n]) {
            TokenLine::Incomplete => {
                if sys::tcp_counters(&p.stream).is_ok_and(|c| c.fin_received()) {
                    self.drop_pending(slot, "closed before ending its token line");
                }
            }
            TokenLine::Malformed(why) => self.drop_pending(slot, &format!("bad token line: {why}")),
            TokenLine::Complete { token, line_len } => {
                p.skip = line_len as u32;
                p.key = Some(token);
                self.offer(slot);
            }
        }
    }

    /// Why a waiting client is gone, if it is: it closed without sending anything, or its
    /// connection failed. One that sent bytes and then shut down its write side still waits: its
    /// bytes and its EOF will reach the partner.
    fn gone(p: &Pending, peeked: io::Result<usize>) -> Option<String> {
        match peeked {
            Ok(n)
                if n <= p.skip as usize && (n == 0 || sys::tcp_counters(&p.stream).is_ok_and(|c| c.fin_received())) =>
            {
                Some(match p.upstream {
                    Some(_) => "left before its upstream connection was made".into(),
                    None => "left before a partner came".into(),
                })
            }
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                // A client that reset while its upstream connection was being made resets that
                // connection too, as it would once spliced.
                if let Some(c) = &p.upstream {
                    sys::reset_on_close(&c.stream);
                }
                Some(e.to_string())
            }
            _ => None,
        }
    }

    /// Drops a waiting client that is gone; true if it was.
    fn pending_gone(&mut self, slot: usize) -> bool {
        let Some(Slot::Pending(p)) = self.slots.get(slot) else { return true };
        let mut buf = [0u8; MAX_TOKEN + 2];
        match Self::gone(p, sys::peek(&p.stream, &mut buf)) {
            Some(why) => {
                self.drop_pending(slot, &why);
                true
            }
            None => false,
        }
    }

    fn offer(&mut self, slot: usize) {
        let Some(Slot::Pending(p)) = self.slots.get(slot) else {
            return;
        };
        let key = p.key.clone().unwrap_or_default();
        match self.matcher.offer(&key, slot) {
            // The loop may not have seen the waiting client's close or reset yet: look now, so
            // a client that is gone never takes a partner.
            Some(partner) if self.pending_gone(partner) => self.offer(slot),
            Some(partner) => self.form_pair(partner, slot),
            None if self.matcher.waiting() > self.config.max_pending => {
                let why = format!("{} clients already wait for a partner (--max-pending)", self.config.max_pending);
                self.drop_pending(slot, &why);
            }
            None => {}
        }
    }

    fn take_pending(&mut self, slot: usize) -> Option<Pending> {
        match self.slots.get(slot) {
            Some(Slot::Pending(_)) => {}
            _ => return None,
        }
        let Slot::Pending(mut p) = self.slots.remove(slot) else { unreachable!() };
        self.pending -= 1;
        self.config.metrics.set_pending(self.pending);
        if let Some(key) = &p.key {
            self.matcher.withdraw(key, slot);
        }
        let _ = self.poll.registry().deregister(&mut p.stream);
        if let Some(c) = p.upstream.as_mut() {
            let _ = self.poll.registry().deregister(&mut c.stream);
            self.own_upstreams.remove(&c.local);
        }
        Some(p)
    }

    fn drop_pending(&mut self, slot: usize, why: &str) {
        if let Some(p) = self.take_pending(slot) {
            log::info!("client {} closed: {why}", p.addr);
        }
    }

    fn form_pair(&mut self, first: usize, second: usize) {
        let (Some(a), Some(b)) = (self.take_pending(first), self.take_pending(second)) else {
            return;
        };
        self.splice_pair([a.stream, b.stream], [a.addr, b.addr], [a.skip, b.skip], None);
    }

    /// Hands two connected sockets to the datapath and starts watching them as a pair.
    /// `upstream_local`: `proxy`'s upstream end's local address, remembered while the pair lives.
    fn splice_pair(
        &mut self,
        ends: [TcpStream; 2],
        addrs: [SocketAddr; 2],
        skip: [u32; 2],
        upstream_local: Option<SocketAddr>,
    ) {
        let mut datapath = self.datapath.name();
        let splice = match self.datapath.splice([&ends[0], &ends[1]], skip) {
            Ok(s) => s,
            Err(SpliceError::MapFull(n)) => {
                if !self.warned_map_full {
                    log::warn!("the kernel socket map is full ({n} sockets): further pairs are spliced in user space");
                    self.warned_map_full = true;
                }
                datapath = UserspaceDatapath.name();
                // The token lines (skip) are discarded here too.
                match UserspaceDatapath.splice([&ends[0], &ends[1]], skip) {
                    Ok(s) => s,
                    Err(e) => return log::error!("pair {} <-> {} closed: {e}", addrs[0], addrs[1]),
                }
            }
            Err(e) => return log::error!("pair {} <-> {} closed: cannot splice it: {e}", addrs[0], addrs[1]),
        };
        // Until the pair ends well, any close of its sockets (ours, or the kernel's when this
        // process dies) resets them: a stream we did not finish must not look finished. A shutdown
        // that forwards one direction's EOF still sends its FIN; the socket keeps resetting on
        // close because the other direction may still be unfinished.
        for end in &ends {
            sys::reset_on_close(end);
        }
        let serial = self.next_serial();
        let entry = self.slots.vacant_entry();
        let slot = entry.key();
        let mut pair = Pair {
            ends,
            addrs,
            splice,
            since: Instant::now(),
            serial,
            shut: [false; 2],
            flush_delay: FLUSH_CHECK_FIRST,
            upstream_local,
            metric: self.config.metrics.pair_started(datapath),
        };
        let interest = pair.splice.interest();
        for (i, end) in pair.ends.iter_mut().enumerate() {
            if let Err(e) = self.poll.registry().register(end, token(slot, i), interest) {
                return log::error!("pair {} <-> {} closed: cannot watch it: {e}", addrs[0], addrs[1]);
            }
        }
        entry.insert(Slot::Pair(pair));
        self.pairs += 1;
        if let Some(local) = upstream_local {
            self.own_upstreams.insert(local, addrs[1].port());
        }
        log::debug!("paired {} <-> {} ({})", addrs[0], addrs[1], self.slots_pair_name(slot));
        // Bytes and EOFs that came before the pair formed are acted on now, not at the next event.
        self.service(slot, true);
    }

    /// Moves a pair on: both directions, EOF propagation, errors.
    fn service(&mut self, slot: usize, check_errors: bool) {
        let Some(Slot::Pair(pair)) = self.slots.get_mut(slot) else {
            return;
        };
        // A reset is acted on before anything else: no FIN may reach the partner first.
        if check_errors {
            for end in 0..2 {
                if let Some(error) = sys::take_socket_error(&pair.ends[end]) {
                    return self.end_pair(slot, Ending::Reset { end, error });
                }
            }
        }
        let mut flushing = false;
        let mut again = false;
        for dir in 0..2 {
            if pair.shut[dir] {
                continue;
            }
            let (src, dst) = (&pair.ends[dir], &pair.ends[1 - dir]);
            let flow = pair.splice.advance(dir, src, dst);
            log::trace!("pair {} <-> {} dir {dir}: {flow:?}", pair.addrs[0], pair.addrs[1]);
            match flow {
                Ok(Flow::Open) => {}
                Ok(Flow::Again) => again = true,
                Ok(Flow::Flushing) => flushing = true,
                Ok(Flow::Finished) => {
                    let _ = dst.shutdown(Shutdown::Write);
                    pair.shut[dir] = true;
                }
                Err(error) => {
                    // A failed read names the source; a failed write the destination.
                    let end = if sys::take_socket_error(src).is_some() { dir } else { 1 - dir };
                    return self.end_pair(slot, Ending::Reset { end, error });
                }
            }
        }
        if pair.shut == [true, true] {
            return self.end_pair(slot, Ending::Done);
        }
        let interest = pair.splice.interest();
        if let Err(error) = pair.splice.settle([&pair.ends[0], &pair.ends[1]]) {
            return self.end_pair(slot, Ending::Reset { end: 0, error });
        }
        if pair.splice.interest() != interest {
            for (i, end) in pair.ends.iter_mut().enumerate() {
                let _ = self.poll.registry().reregister(end, token(slot, i), pair.splice.interest());
            }
        }
        if flushing {
            let at = Instant::now() + pair.flush_delay;
            pair.flush_delay = (pair.flush_delay * 2).min(FLUSH_CHECK_MAX);
            self.timers.push(Reverse((at, slot, pair.serial)));
        }
        if again {
            self.again.push((slot, pair.serial));
        }
    }

    fn slots_pair_name(&self, slot: usize) -> &'static str {
        match self.slots.get(slot) {
            Some(Slot::Pair(p)) => p.splice.name(),
            _ => "",
        }
    }

    fn end_pair(&mut self, slot: usize, ending: Ending) {
        let Some(Slot::Pair(_)) = self.slots.get(slot) else {
            return;
        };
        let Slot::Pair(mut pair) = self.slots.remove(slot) else { unreachable!() };
        self.pairs -= 1;
        if let Some(local) = pair.upstream_local {
            self.own_upstreams.remove(&local);
        }
        let moved = [
            pair.splice.moved(0, &pair.ends[0], &pair.ends[1], pair.shut[0]),
            pair.splice.moved(1, &pair.ends[1], &pair.ends[0], pair.shut[1]),
        ];
        pair.splice.release();
        let counted = match &ending {
            Ending::Done => PairEnd::Eof,
            Ending::Reset { .. } => PairEnd::Reset,
            Ending::Drained => PairEnd::Drain,
        };
        pair.metric.end(counted, moved[0] + moved[1]);
        for end in pair.ends.iter_mut() {
            let _ = self.poll.registry().deregister(end);
        }
        let [a, b] = pair.addrs;
        let how = match &ending {
            Ending::Done => {
                // Both directions finished: the only close that may look like an orderly one.
                for e in &pair.ends {
                    sys::close_gracefully(e);
                }
                "ended".to_string()
            }
            // Its streams were cut: they stay armed to reset (see splice_pair).
            Ending::Drained => "reset at the drain timeout".to_string(),
            Ending::Reset { end, error } => {
                // What one end's client did to its connection, the other's client sees too.
                for e in &pair.ends {
                    sys::reset_on_close(e);
                }
                format!("reset ({}: {error})", pair.addrs[*end])
            }
        };
        log::info!(
            "pair {a} <-> {b} {how} after {:.3}s: {} bytes {a} -> {b}, {} bytes {b} -> {a} ({})",
            pair.since.elapsed().as_secs_f64(),
            moved[0],
            moved[1],
            pair.splice.name(),
        );
    }

    fn end_all(&mut self, ending: fn() -> Ending) {
        let slots: Vec<usize> = self.slots.iter().map(|(k, _)| k).collect();
        for slot in slots {
            match self.slots.get(slot) {
                Some(Slot::Pair(_)) => self.end_pair(slot, ending()),
                Some(Slot::Pending(_)) => self.drop_pending(slot, "skrelay is shutting down"),
                None => {}
            }
        }
    }

    /// `proxy`: starts connecting the client in `slot` to the first upstream of `plan` that
    /// takes a connect; resets the client when none is left.
    fn connect_upstream(&mut self, slot: usize, mut plan: Vec<usize>) {
        let Partnering::Upstreams { upstreams, connect_timeout } = &mut self.config.partnering else { return };
        while !plan.is_empty() {
            let idx = plan.remove(0);
            let addr = upstreams.addr(idx);
            match TcpStream::connect(addr) {
                Ok(mut stream) => {
                    let Some(Slot::Pending(p)) = self.slots.get_mut(slot) else { return };
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    if let Err(e) = self.poll.registry().register(&mut stream, token(slot, 1), interest) {
                        log::warn!("upstream {addr}: cannot watch the connection: {e}");
                        continue;
                    }
                    let deadline = Instant::now() + *connect_timeout;
                    // Bound by connect(2); unknown only if the socket already failed, which
                    // on_upstream then reports.
                    let local = stream.local_addr().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
                    self.own_upstreams.insert(local, addr.port());
                    p.upstream = Some(Connecting { stream, local, idx, deadline, rest: plan });
                    self.timers.push(Reverse((deadline, slot, p.serial)));
                    return;
                }
                Err(e) => {
                    log::warn!("upstream {addr}: {e}; marked down for {:?}", DOWN_FOR);
                    upstreams.mark_down(idx, Instant::now());
                }
            }
        }
        if let Some(p) = self.take_pending(slot) {
            sys::reset_on_close(&p.stream);
            log::warn!("client {} reset: no upstream could be reached", p.addr);
        }
    }

    /// `proxy`: the upstream connection of a waiting client is ready (or failed).
    fn on_upstream(&mut self, slot: usize) {
        let Some(Slot::Pending(p)) = self.slots.get(slot) else { return };
        let Some(c) = &p.upstream else { return };
        match c.stream.take_error() {
            Ok(Some(e)) | Err(e) => return self.upstream_failed(slot, e),
            Ok(None) => {}
        }
        let upstream_addr = match c.stream.peer_addr() {
            Ok(a) => a,
            // Not connected: still connecting, or reset just after take_error looked.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                if sys::tcp_counters(&c.stream).is_ok_and(|t| t.closed()) {
                    let reset = io::Error::from(io::ErrorKind::ConnectionReset);
                    return self.upstream_failed(slot, reset);
                }
                return;
            }
            Err(e) => return self.upstream_failed(slot, e),
        };
        let Some(mut p) = self.take_pending(slot) else { return };
        let c = p.upstream.take().expect("connecting");
        if let Partnering::Upstreams { upstreams, .. } = &mut self.config.partnering {
            upstreams.mark_up(c.idx);
        }
        let _ = c.stream.set_nodelay(true);
        self.splice_pair([p.stream, c.stream], [p.addr, upstream_addr], [0, 0], Some(c.local));
    }

    fn upstream_failed(&mut self, slot: usize, error: io::Error) {
        let Some(Slot::Pending(p)) = self.slots.get_mut(slot) else { return };
        let Some(mut c) = p.upstream.take() else { return };
        let _ = self.poll.registry().deregister(&mut c.stream);
        self.own_upstreams.remove(&c.local);
        let Partnering::Upstreams { upstreams, .. } = &mut self.config.partnering else { return };
        upstreams.mark_down(c.idx, Instant::now());
        log::warn!("upstream {}: {error}; marked down for {:?}", upstreams.addr(c.idx), DOWN_FOR);
        self.connect_upstream(slot, c.rest);
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, slot, serial))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            match self.slots.get(slot) {
                Some(Slot::Pending(p)) if p.serial == serial => match &p.upstream {
                    Some(c) if c.deadline <= now => {
                        let why = io::Error::new(io::ErrorKind::TimedOut, "no answer within --connect-timeout");
                        self.upstream_failed(slot, why);
                    }
                    Some(_) => {}
                    None => {
                        let why = if p.key.is_some() {
                            "no partner came within --pair-timeout"
                        } else {
                            "no token line within --pair-timeout"
                        };
                        self.drop_pending(slot, why);
                    }
                },
                Some(Slot::Pair(p)) if p.serial == serial => self.service(slot, true),
                _ => {}
            }
        }
    }

    fn on_signal(&mut self) {
        let signals: Vec<i32> = self.signals.pending().collect();
        for signal in signals {
            let name = match signal {
                SIGINT => "SIGINT",
                SIGUSR2 => "SIGUSR2 (handing over to the skrelay that took over)",
                _ => "SIGTERM",
            };
            // Handing over while already stopping changes nothing.
            if signal == SIGUSR2 && self.drain_deadline.is_some() {
                continue;
            }
            if self.drain_deadline.is_some() {
                log::warn!("{name} again: closing {} live pair(s) now", self.pairs);
                self.end_all(|| Ending::Drained);
                self.drain_deadline = Some(Instant::now());
                continue;
            }
            crate::systemd::notify(&format!("STOPPING=1\nSTATUS=draining {} live pair(s)", self.pairs));
            if let Some(mut listener) = self.listener.take() {
                let _ = self.poll.registry().deregister(&mut listener);
            }
            // Handing over, a proxy's accepted clients still get their upstream connection and
            // drain as pairs: they came through the socket the new process serves, and closing
            // them would be the refusal --takeover avoids. (A relay's waiting clients cannot meet
            // a partner here any more.)
            let keep = signal == SIGUSR2 && matches!(self.config.partnering, Partnering::Upstreams { .. });
            if signal == SIGUSR2 {
                self.config.metrics.stop_serving();
            }
            let waiting: Vec<usize> =
                self.slots.iter().filter(|(_, s)| matches!(s, Slot::Pending(_))).map(|(k, _)| k).collect();
            for slot in waiting.into_iter().filter(|_| !keep) {
                self.drop_pending(slot, "skrelay is shutting down");
            }
            log::info!(
                "{name}: no longer accepting; letting {} live pair(s) finish (up to {:?})",
                self.pairs,
                self.config.drain_timeout
            );
            self.drain_deadline = Some(Instant::now() + self.config.drain_timeout);
        }
    }
}
