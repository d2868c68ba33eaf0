//! The accept-and-splice loop: one mio loop accepts clients, finds each one its partner, hands
//! the pair to the datapath (its own, or another thread's loop: `threads`) and then only
//! propagates end of file and resets. Payload never passes through here on the kernel datapath.
//!
//! The loop only dispatches events and timers; each concept owns its state and answers with an
//! outcome the loop acts on, and none calls another:
//! - `listener`: the listening socket, made in one place;
//! - `pending`: a client waiting for its token line, its partner or its upstream connection;
//! - `connector`: `proxy`'s upstream connections (connect, timeout, failover, mark-down);
//! - `pair`: two spliced connections, their end-of-file and reset propagation;
//! - `timers`: deadlines typed by what they are for;
//! - `threads`: the other threads' loops (`--threads`), each a `Server` that only serves pairs.
//!
//! How a pair ends is accounted in one place, `Server::account_end`.
mod connector;
mod handover;
mod listener;
mod pair;
mod pending;
mod threads;
mod throttle;
mod timers;

pub use listener::listen;

use self::{
    connector::{Connector, OwnUpstreams, Progress},
    pair::{reset_on_close, Ended, Ending, Pair, Step},
    pending::{Look, Pending},
    threads::{Formed, Order, Threads},
    throttle::Throttled,
    timers::{Timer, Timers},
};
use crate::{
    cli::PairBy,
    datapath::{userspace::UserspaceDatapath, Datapath},
    error::Error,
    metrics::{Metrics, PairEnd, PairMetric, Unpaired},
    pairing::Matcher,
    sys,
    upstream::Upstreams,
};
use mio::{
    event::Event,
    net::{TcpListener, TcpStream},
    Events, Interest, Poll, Token, Waker,
};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

/// Set once this process has taken descriptors over from another (`--takeover`), which may hold
/// them still (stopped or slow to exit). Closing a descriptor removes it from our epoll only
/// when it was the socket's last one, so until then a pair's sockets leave the poll explicitly
/// before they close: a registration left behind would wake a slot's next pair with the old
/// socket's events. Otherwise the close removes them, one EPOLL_CTL_DEL fewer per socket.
static TOOK_OVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn took_over() -> bool {
    TOOK_OVER.load(std::sync::atomic::Ordering::Relaxed)
}

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
    /// A pair with no byte moving either way for this long is reset (`--idle-timeout`; zero: never).
    pub idle_timeout: Duration,
    /// Counters for `--metrics` (kept whether or not they are served).
    pub metrics: Metrics,
}

/// What a loop's `serve` ended with.
enum Served {
    /// Drained (or every pair closed): the loop's work is done.
    Stopped,
    /// Everything went to the process that took over (`--takeover`); nothing may be dropped.
    HandedOver,
    /// A worker loop called back by the front (`--takeover`), its pairs untouched.
    Recalled,
    Failed(Error),
}

/// How often pairs are looked at for `--idle-timeout`: a tenth of it, between 50 ms and 5 s.
fn idle_check_every(timeout: Duration) -> Duration {
    (timeout / 10).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

/// How often the kernel in-flight gauge is read while pairs live.
const INFLIGHT_EVERY: Duration = Duration::from_secs(1);
/// How long a drain waits before it logs where each remaining pair stands.
const DRAIN_REPORT_AFTER: Duration = Duration::from_secs(3);

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
/// The datapath's own events (the kernel datapath's budget reports).
const DATAPATH: Token = Token(2);
/// Another thread's loop has news for this one (threads.rs).
const INBOX: Token = Token(3);
const FIRST_SLOT_TOKEN: usize = 4;
/// How long to wait before accepting again when the process is out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long accept(2) may find no descriptor before a token relay's waiting client makes
/// room (`yield_a_waiter`): pairs that end free theirs within that, and then nobody yields.
const YIELD_AFTER: Duration = Duration::from_millis(300);
/// How long a token relay's client waits for its partner before it is the first to give its
/// descriptor back in a shortage (`yield_a_waiter`).
const STALE_WAITER: Duration = Duration::from_secs(2);
/// How often a loop short of descriptors says so.
const SHORTAGE_WARN_EVERY: Duration = Duration::from_secs(10);

/// The token of end `end` of the client or pair in `slot` (a pending client is end 0, its
/// upstream connection end 1).
fn token(slot: usize, end: usize) -> Token {
    Token(FIRST_SLOT_TOKEN + slot * 2 + end)
}

fn tokens(slot: usize) -> [Token; 2] {
    [token(slot, 0), token(slot, 1)]
}

fn slot_of(token: Token) -> (usize, usize) {
    let n = token.0 - FIRST_SLOT_TOKEN;
    (n / 2, n % 2)
}

enum Slot {
    Pending(Pending),
    Pair(Pair),
}

/// How clients find partners, with the state that takes.
enum Partners {
    Clients {
        by: PairBy,
        matcher: Matcher<usize>,
    },
    Upstreams(Connector),
    /// A worker loop (`--threads`): the front finds partners and sends pairs here. `own`: a
    /// proxy's record of its upstream connections, which a pair ending here leaves.
    Front {
        own: Option<OwnUpstreams>,
    },
}

pub struct Server {
    poll: Poll,
    listener: Option<TcpListener>,
    /// The front loop's only.
    signals: Option<Signals>,
    datapath: Box<dyn Datapath>,
    partners: Partners,
    max_pending: usize,
    pair_timeout: Duration,
    drain_timeout: Duration,
    idle_timeout: Duration,
    /// When the pairs are looked at for `--idle-timeout` next (while pairs live and it is set).
    idle_due: Option<Instant>,
    slots: Slab<Slot>,
    pending: usize,
    pairs: usize,
    serial: u64,
    timers: Timers,
    /// Pairs to service again this turn (more was ready than one call moves).
    again: Vec<(usize, u64)>,
    accept_retry: Option<Instant>,
    /// When the loop last warned that it ran out of descriptors (or memory) for new clients: once
    /// per `SHORTAGE_WARN_EVERY`, not once per client or retry.
    shortage_warned: Option<Instant>,
    /// Accepting stopped for want of descriptors; the first client accepted after says so.
    accept_short: bool,
    /// Clients that waited in the accept queue before the listener was armed (`sys::arm_for_clients`),
    /// which did not inherit its options: the next this many accepted are armed one by one (a
    /// re-check pass: the client that started a socket-activated relay read a clean EOF where a
    /// reset was due).
    unarmed_backlog: usize,
    /// Since when accept(2) has found no descriptor, without one accepted since.
    short_since: Option<Instant>,
    /// `proxy`: clients (slot, serial) accepted when no descriptor was left for their upstream
    /// connection. They wait, accepting stops, and their connections are tried again at each
    /// `accept_retry` before anyone else is accepted (resetting each of them let the accept loop
    /// take the next client from the backlog with the descriptor the reset freed, and reset it
    /// too: a helper saw 12 of 30 clients reset in a burst, or none, by the limit's parity).
    held_for_descriptors: Vec<(usize, u64)>,
    /// Accepting paused while `--max-pending` clients wait for their upstream connection (proxy)
    /// or send their token line (relay): further clients wait in the listen backlog, as behind
    /// HAProxy's maxconn (`slots_full`).
    accept_full: bool,
    /// When a client waiting in the backlog behind a full `--max-pending` was last said, and
    /// whether it was said in this spell of `accept_full` (a spell with nobody waiting behind it
    /// is normal traffic, not a warning: a helper's pass, one client and `--max-pending 1`).
    backlog_warned: Option<Instant>,
    backlog_said: bool,
    /// Clients reset for a full `--max-pending`, and a proxy's clients reset for want of a
    /// reachable upstream: a flood of clients must not become a log line each (a proxy pass: 13,000
    /// lines in the 0.8 s an upstream restarted).
    full_warnings: Throttled,
    no_upstream_warnings: Throttled,
    drain_deadline: Option<Instant>,
    /// The signal that started this process's stop (drain or handover), for the log.
    stopped_by: Option<&'static str>,
    /// When a drain logs where its remaining pairs stand.
    drain_report: Option<Instant>,
    /// Set once every pair and waiting client went to the process that took over (`hand_over`).
    handed_over: bool,
    /// `--metrics` counters, and each live pair's place in them (by slot).
    metrics: Metrics,
    pair_metrics: HashMap<usize, PairMetric>,
    /// When the kernel in-flight gauge is read again (while pairs live).
    inflight_due: Option<Instant>,
    /// When the datapath wants `tend` called again.
    datapath_due: Option<Instant>,
    /// This loop's place among the threads' loops.
    threads: Threads,
}

impl Server {
    /// The front loop, with one more loop for each datapath after the first (`--threads`: one
    /// datapath per thread), started by `run`.
    pub fn new(
        mut listener: TcpListener,
        datapaths: Vec<Box<dyn Datapath>>,
        config: ServerConfig,
    ) -> Result<Self, Error> {
        let mut datapaths = datapaths.into_iter();
        let first = datapaths.next().ok_or_else(|| Error::Usage("no datapath to serve pairs with".into()))?;
        let poll = Poll::new().map_err(|e| Error::io("cannot create the event loop", e))?;
        let waker = Waker::new(poll.registry(), INBOX).map_err(|e| Error::io("cannot create the event loop", e))?;
        let threads = Threads::front(1 + datapaths.len(), waker);
        // SIGUSR2: a new skrelay took our sockets (--takeover) and asks us to hand over. SIGHUP
        // (the terminal or session went away) drains as SIGTERM does, SIGQUIT (Ctrl-\\) stops at
        // once, SIGUSR1 is said and ignored: left at their defaults, each killed the process with
        // no drain and no word (a helper's pass: every pair of a relay started from an ssh
        // session cut when the session hung up).
        // A SIGHUP ignored when we start (`nohup`) stays ignored: that is what the user asked for.
        let hangup = Some(SIGHUP).filter(|&s| !sys::signal_ignored(s));
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGQUIT, SIGUSR1, SIGUSR2].into_iter().chain(hangup))
            .map_err(|e| Error::io("cannot handle signals", e))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .and_then(|_| poll.registry().register(&mut signals, SIGNALS, Interest::READABLE))
            .and_then(|_| watch_datapath(&poll, first.as_ref()))
            .map_err(|e| Error::io("cannot register with the event loop", e))?;
        sys::raise_fd_limit();
        let partners = match config.partnering {
            Partnering::Clients(by) => Partners::Clients { by, matcher: Matcher::default() },
            Partnering::Upstreams { upstreams, connect_timeout } => {
                let mut connector = Connector::new(upstreams, connect_timeout);
                connector.watch_cgroup(listener.local_addr().map_or(0, |a| a.port()));
                Partners::Upstreams(connector)
            }
        };
        let own = match &partners {
            Partners::Upstreams(connector) => Some(connector.own()),
            _ => None,
        };
        let limits = (config.max_pending, config.pair_timeout, config.drain_timeout, config.idle_timeout);
        for n in 0..threads.count() {
            config.metrics.set_loop_pairs(n, 0);
        }
        // Armed by `relay_cmd::open` already: what waits now came before (or is armed twice).
        let unarmed_backlog = sys::accept_queue_len(&listener).map_or(0, |n| n as usize);
        let mut front =
            Server::with(poll, Some(listener), Some(signals), first, partners, threads, limits, &config.metrics);
        front.unarmed_backlog = unarmed_backlog;
        for (i, datapath) in datapaths.enumerate() {
            let poll = Poll::new().map_err(|e| Error::io("cannot create an event loop", e))?;
            let waker = Waker::new(poll.registry(), INBOX).map_err(|e| Error::io("cannot create an event loop", e))?;
            watch_datapath(&poll, datapath.as_ref())
                .map_err(|e| Error::io("cannot register with the event loop", e))?;
            let (threads, link) = front.threads.worker(i + 1, waker);
            let partners = Partners::Front { own: own.clone() };
            let worker = Server::with(poll, None, None, datapath, partners, threads, limits, &config.metrics);
            front.threads.add(worker, link);
        }
        let loops = front.threads.count();
        front.threads.reserve().map_err(|source| Error::Threads { loops, source })?;
        Ok(front)
    }

    #[allow(clippy::too_many_arguments)]
    fn with(
        poll: Poll,
        listener: Option<TcpListener>,
        signals: Option<Signals>,
        datapath: Box<dyn Datapath>,
        partners: Partners,
        threads: Threads,
        (max_pending, pair_timeout, drain_timeout, idle_timeout): (usize, Duration, Duration, Duration),
        metrics: &Metrics,
    ) -> Server {
        Server {
            poll,
            listener,
            signals,
            datapath,
            partners,
            max_pending,
            pair_timeout,
            drain_timeout,
            idle_timeout,
            idle_due: None,
            metrics: metrics.clone(),
            pair_metrics: HashMap::new(),
            inflight_due: None,
            slots: Slab::new(),
            pending: 0,
            pairs: 0,
            serial: 0,
            timers: Timers::default(),
            again: Vec::new(),
            accept_retry: None,
            shortage_warned: None,
            accept_short: false,
            short_since: None,
            held_for_descriptors: Vec::new(),
            accept_full: false,
            backlog_warned: None,
            backlog_said: false,
            unarmed_backlog: 0,
            full_warnings: Throttled::new("reset for --max-pending or for want of descriptors"),
            no_upstream_warnings: Throttled::new("reset because no upstream could be reached"),
            drain_deadline: None,
            stopped_by: None,
            drain_report: None,
            handed_over: false,
            datapath_due: None,
            threads,
        }
    }

    /// Serves until drained (or handed over): the front loop here, each other loop in a thread
    /// of its own.
    pub fn run(mut self) -> Result<(), Error> {
        let loops = self.threads.count();
        self.threads.start().map_err(|source| Error::Threads { loops, source })?;
        let served = self.serve();
        self.say_unsaid(Instant::now(), true);
        match served {
            Served::Stopped | Served::Recalled => {}
            Served::HandedOver => {
                // The new process owns every socket and kernel map entry now: no destructor of
                // ours may run (a kernel pair's would take its sockets out of the maps), so the
                // server, with every loop's, is forgotten, not dropped, and the process exits
                // when the command returns.
                // What it ended itself; the pairs handed over end, and count, in the new process.
                log::info!("stopped: {}", self.metrics.summary());
                std::mem::forget(self);
                return Ok(());
            }
            Served::Failed(e) => return Err(e),
        }
        self.threads.join();
        // One exit line for the datapaths of every loop.
        let mut tally = self.datapath.tally();
        for worker in self.threads.idle() {
            for (sum, n) in tally.iter_mut().zip(worker.datapath.tally()) {
                *sum += n;
            }
        }
        if let Some(summary) = self.datapath.summary(&tally) {
            log::info!("{summary}");
        }
        log::info!("stopped: {}", self.metrics.summary());
        Ok(())
    }

    /// One loop's events until its work is done.
    fn serve(&mut self) -> Served {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.next_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Served::Failed(Error::io("event loop failed", e));
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    SIGNALS => {
                        self.on_signal();
                        if self.handed_over {
                            return Served::HandedOver;
                        }
                    }
                    INBOX => {
                        if self.on_orders() {
                            return Served::Recalled;
                        }
                    }
                    DATAPATH => self.datapath_due = Some(Instant::now()),
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
            if self.datapath_due.is_some_and(|t| Instant::now() >= t) {
                self.datapath_due = self.datapath.tend(Instant::now());
            }
            self.sample_inflight();
            self.reset_idle_pairs();
            self.fire_timers();
            self.say_unsaid(Instant::now(), false);
            if self.accept_retry.is_some_and(|t| Instant::now() >= t) {
                self.accept_retry = None;
                self.retry_held();
                self.accept();
            }
            if self.accept_full && self.slots_full().is_none() {
                self.accept_full = false;
                self.backlog_said = false;
                self.accept();
            }
            if let Some(deadline) = self.drain_deadline {
                if self.pairs == 0 && self.pending == 0 && self.threads.all_finished() {
                    break;
                }
                if self.drain_report.is_some_and(|t| Instant::now() >= t) {
                    // Pairs that outlive the first seconds of a drain: say where each stands.
                    self.drain_report = None;
                    for (_, slot) in self.slots.iter() {
                        if let Slot::Pair(pair) = slot {
                            log::info!("still live: {}", pair.describe());
                        }
                    }
                }
                if Instant::now() >= deadline {
                    if self.pairs > 0 {
                        // Each loop closes its own pairs at the shared deadline: with several,
                        // say whose, so the counts add up to the drain's "letting N" line.
                        let of = match self.threads.count() {
                            1 => String::new(),
                            _ => format!(" of event loop {}", self.threads.me),
                        };
                        log::warn!("drain timeout: closing {} live pair(s){of}", self.pairs);
                    }
                    self.end_all(|| Ending::Drained);
                    // The other loops have the same deadline: the front waits for them in `run`.
                    break;
                }
            }
        }
        Served::Stopped
    }

    /// A worker loop's orders from the front; true when it is called back (`Order::Stop`).
    fn on_orders(&mut self) -> bool {
        while let Some(order) = self.threads.next_order() {
            match order {
                Order::Pair(f) => self.splice_here(f),
                Order::Drain(deadline) => self.start_drain(deadline),
                Order::EndAll(signal) => {
                    self.end_all(|| Ending::CutBySignal(signal));
                    self.drain_deadline = Some(Instant::now());
                }
                Order::Stop => return true,
            }
        }
        false
    }

    fn start_drain(&mut self, deadline: Instant) {
        self.drain_deadline = Some(deadline);
        self.drain_report = Some(Instant::now() + DRAIN_REPORT_AFTER);
    }

    fn next_timeout(&self) -> Option<Duration> {
        if !self.again.is_empty() {
            return Some(Duration::ZERO);
        }
        let deadlines = [
            self.timers.next(),
            self.drain_deadline,
            self.drain_report,
            self.accept_retry,
            self.datapath_due,
            self.inflight_due,
            self.idle_due,
            self.full_warnings.due(),
            self.no_upstream_warnings.due(),
        ];
        deadlines.into_iter().flatten().min().map(|t| t.saturating_duration_since(Instant::now()))
    }

    fn next_serial(&mut self) -> u64 {
        self.serial += 1;
        self.serial
    }

    fn is_pair(&self, slot: usize, serial: u64) -> bool {
        matches!(self.slots.get(slot), Some(Slot::Pair(p)) if p.serial() == serial)
    }

    fn pending_mut(&mut self, slot: usize, serial: Option<u64>) -> Option<&mut Pending> {
        match self.slots.get_mut(slot) {
            Some(Slot::Pending(p)) if serial.is_none_or(|s| s == p.serial) => Some(p),
            _ => None,
        }
    }

    /// Why no client is to be accepted now, when the clients waiting are all in a state that
    /// ends by itself within moments: a proxy's, connecting to their upstream; a token relay's
    /// still sending their token line (a client that would wait for a partner beyond the cap is
    /// still reset, in `offer`: that wait may never end).
    fn slots_full(&self) -> Option<String> {
        match &self.partners {
            Partners::Upstreams(_) if self.pending >= self.max_pending => {
                Some(format!("{} clients already wait for their upstream connection", self.pending))
            }
            Partners::Clients { matcher, .. } if self.pending - matcher.waiting() >= self.max_pending => {
                Some(format!("{} clients are already sending their token line", self.pending - matcher.waiting()))
            }
            _ => None,
        }
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            // Clients wait for the descriptors their upstream connections need: later ones wait
            // in the backlog, behind them.
            if !self.held_for_descriptors.is_empty() {
                return;
            }
            // A burst beyond --max-pending (a reconnect storm) waits in the listen backlog for a
            // slot instead of being reset (476 of 1,500 healthy clients were) where the slots
            // free within milliseconds by themselves.
            if let Some(full) = self.slots_full() {
                self.accept_full = true;
                // Said when a client does wait behind it, once per 10 s: a storm pauses and
                // resumes with every slot. Its own clock: sharing the resets' one-second clock
                // turned the next reset's line (naming its client) into a debug line.
                if !self.backlog_said && sys::accept_queue_len(listener).is_ok_and(|n| n > 0) {
                    self.backlog_said = true;
                    let now = Instant::now();
                    if self.backlog_warned.is_none_or(|at| now >= at + SHORTAGE_WARN_EVERY) {
                        self.backlog_warned = Some(now);
                        log::warn!(
                            "{full} (--max-pending): further clients wait in the listen backlog (said once per \
                             {SHORTAGE_WARN_EVERY:?})"
                        );
                    }
                }
                return;
            }
            // A slot is free: a spell of full slots ends here, even if this turn fills it again.
            self.backlog_said = false;
            match listener.accept() {
                Ok((stream, addr)) => {
                    if self.unarmed_backlog > 0 {
                        self.unarmed_backlog -= 1;
                        let _ = sys::arm_for_clients(&stream);
                    }
                    self.short_since = None;
                    if std::mem::take(&mut self.accept_short) {
                        log::info!("accepting clients again");
                    }
                    // An IPv4 client of a dual-stack [::] listener, named as IPv4 in every line
                    // about it (it read [::ffff:127.0.0.1]:PORT).
                    self.admit(stream, sys::unmapped(addr))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
                    ) =>
                {
                    // Spare pipes of this loop hold two descriptors each; clients need them more.
                    let released = crate::datapath::userspace::release_spare_pipes();
                    if released > 0 {
                        log::debug!("closed {released} spare pipes for want of descriptors");
                        continue;
                    }
                    let since = *self.short_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= YIELD_AFTER && self.yield_a_waiter() {
                        continue;
                    }
                    if self.warn_of_shortage() {
                        log::warn!(
                            "cannot accept more clients now: {e} (retrying every {ACCEPT_BACKOFF:?}; clients wait in the \
                             listen backlog; raise the descriptor limit: `ulimit -n`, or LimitNOFILE= in the unit)"
                        );
                        // "accepting clients again" answers this line, once.
                        self.accept_short = true;
                    }
                    self.accept_retry = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
                Err(e) => log::debug!("accept: {e}"),
            }
        }
    }

    /// Out of descriptors, a token relay's waiting clients could hold every one while their
    /// partners wait in the listen backlog, so that nobody pairs until `--pair-timeout` resets them
    /// all (a helper's run: 20 waiters at the limit, 0 of 20 pairs). So a waiting client gives its
    /// descriptor back (a reset, counted as `full`) for the next client of the backlog, when
    /// accept(2) has found none for `YIELD_AFTER`, a client does wait in the backlog, and no
    /// client accepted so is still sending its token line: one at a time. Which one: the one that
    /// has waited longest once it has waited `STALE_WAITER` (a partner would have come by then),
    /// else the newest. Always the newest, whatever the backlog held, let strangers holding every
    /// descriptor reset each newcomer 0.3 s after its accept, and its partner too: no pair formed
    /// (a helper's token pass: 0 of 8). Not in order mode, where the next client always pairs
    /// with the one waiter.
    fn yield_a_waiter(&mut self) -> bool {
        let Partners::Clients { by: PairBy::Token, matcher } = &self.partners else { return false };
        if matcher.waiting() == 0 || self.pending > matcher.waiting() {
            return false;
        }
        if !self.listener.as_ref().is_some_and(|l| sys::accept_queue_len(l).is_ok_and(|n| n > 0)) {
            return false;
        }
        let waiters: Vec<(u64, Instant, usize)> = self
            .slots
            .iter()
            .filter_map(|(slot, s)| match s {
                Slot::Pending(p) if p.key.is_some() => Some((p.serial, p.admitted, slot)),
                _ => None,
            })
            .collect();
        let oldest = waiters.iter().min().filter(|(_, admitted, _)| admitted.elapsed() >= STALE_WAITER);
        let Some(&(_, _, slot)) = oldest.or_else(|| waiters.iter().max()) else { return false };
        let which = if oldest.is_some() { "the client that waited longest" } else { "the newest waiting client" };
        let why = format!(
            "out of descriptors, {which} makes room for the next one in the listen backlog ({})",
            crate::error::RAISE_NOFILE
        );
        self.drop_pending(slot, &why, Unpaired::Full);
        true
    }

    fn admit(&mut self, mut stream: TcpStream, addr: SocketAddr) {
        match &self.partners {
            Partners::Clients { matcher, .. } => {
                // Clients still sending their token line are capped like waiting ones, so slow
                // senders cannot pile up; a client that would wait is checked again once it is
                // identified.
                let unidentified = self.pending - matcher.waiting();
                if unidentified >= self.max_pending {
                    reset_on_close(&stream);
                    self.metrics.client_unpaired(Unpaired::Full);
                    self.warn_full(format!(
                        "client {addr} reset: {unidentified} clients are already sending their token line (--max-pending)"
                    ));
                    return;
                }
            }
            Partners::Upstreams(connector) => {
                // One of our own upstream connections: the upstream leads back to this proxy.
                // Without this each looped connection would open another, until the process ran
                // out of files.
                // The port it came to is looked up only for a client from such an address.
                let to = |port| stream.local_addr().is_ok_and(|a| a.port() == port);
                if connector.own_connects_to(&addr).is_some_and(to) {
                    reset_on_close(&stream);
                    self.metrics.client_unpaired(Unpaired::Loop);
                    log::error!(
                        "client {addr} reset: it is this proxy's own upstream connection (the upstream leads back \
                         to this proxy: give --upstream the address of the server to proxy to)"
                    );
                    return;
                }
                // A client that reset in the listen backlog without sending a byte has nothing
                // for an upstream: opening a connection for it only made the upstream accept one
                // that is reset at once.
                if sys::tcp_counters(&stream).is_ok_and(|t| t.closed() && t.payload_received() == 0) {
                    self.metrics.client_unpaired(Unpaired::Left);
                    log::info!("client {addr} reset: it was gone (reset) before it was accepted");
                    return;
                }
                if self.pending >= self.max_pending {
                    reset_on_close(&stream);
                    self.metrics.client_unpaired(Unpaired::Full);
                    self.warn_full(format!(
                        "client {addr} reset: {} clients already wait for their upstream connection (--max-pending)",
                        self.pending
                    ));
                    return;
                }
            }
            // Only the front accepts.
            Partners::Front { .. } => return,
        }
        // A client closed before its pair forms (no partner in time, a bad token line, a drain, a
        // failed upstream, this process killed) was never served: it sees a reset, never an EOF
        // that reads as a partner who said nothing. Pairing keeps it (see pair.rs). The socket
        // comes so from the listener (`sys::arm_for_clients`), with TCP_NODELAY.
        let slot = self.slots.vacant_key();
        if let Err(e) = self.poll.registry().register(&mut stream, token(slot, 0), Interest::READABLE) {
            self.metrics.client_unpaired(Unpaired::Error);
            log::warn!("client {addr} reset: cannot watch it: {e}");
            return;
        }
        let serial = self.next_serial();
        let key = match self.partners {
            Partners::Clients { by: PairBy::Token, .. } => None,
            _ => Some(String::new()),
        };
        self.slots.insert(Slot::Pending(Pending::new(stream, addr, serial, key)));
        self.pending += 1;
        self.metrics.set_pending(self.pending);
        log::debug!("client {addr} connected");
        match &mut self.partners {
            Partners::Clients { by, .. } => {
                self.timers.set(Instant::now() + self.pair_timeout, Timer::PairTimeout { slot, serial });
                match by {
                    PairBy::Order => self.offer(slot),
                    PairBy::Token => self.on_pending(slot),
                }
            }
            Partners::Upstreams(_) => self.connect_upstream(slot, serial),
            Partners::Front { .. } => {}
        }
    }

    fn on_socket(&mut self, slot: usize, end: usize, event: &Event) {
        match self.slots.get_mut(slot) {
            Some(Slot::Pending(_)) if end == 1 => self.on_upstream(slot),
            Some(Slot::Pending(_)) => self.on_pending(slot),
            Some(Slot::Pair(pair)) => {
                if event.is_priority() {
                    pair.urgent_seen(end);
                }
                // A TCP socket's pending error (SO_ERROR) is set only by a reset or a timeout,
                // both of which epoll reports as EPOLLERR: a FIN alone (read closed) or both ends
                // finished (hang-up) cannot carry one, so SO_ERROR is read only for EPOLLERR. A
                // reset that comes after this event is still acted on before its end's FIN is
                // forwarded (`Pair::service` reads SO_ERROR at end of file), and comes with its
                // own event.
                self.service(slot, event.is_error());
            }
            None => {}
        }
    }

    /// A pending client's socket is ready: its token line, or its leaving.
    fn on_pending(&mut self, slot: usize) {
        let Some(p) = self.pending_mut(slot, None) else { return };
        match p.look() {
            Look::Waiting => {}
            Look::Identified => {
                let serial = p.serial;
                self.offer(slot);
                // A client whose line and close (or line, bytes and reset) came in one readiness
                // event gets no later event for them: look once more while it waits. A client
                // that sent only its line and closed would otherwise hold its slot until
                // --pair-timeout.
                let Some(p) = self.pending_mut(slot, Some(serial)) else { return };
                if p.reset_after_sending() {
                    self.let_go_after_reset(slot, serial);
                } else if let Some(why) = p.gone() {
                    self.drop_pending(slot, &why, Unpaired::Left);
                }
            }
            Look::Gone(why) => {
                // A bad token line is ours to refuse; anything else, the client left.
                let reason = if why.starts_with("bad token line") { Unpaired::BadToken } else { Unpaired::Left };
                self.drop_pending(slot, &why, reason)
            }
            Look::ResetAfterSending => {
                let serial = p.serial;
                self.let_go_after_reset(slot, serial);
            }
        }
    }

    /// A waiting client sent bytes and then reset: nobody is paired with it any more. Clients
    /// that connected before the reset was seen were taken first, to get its bytes and then the
    /// reset, but "before it was seen" took in a client that reconnected right after its own
    /// reset (with its token): it read back its own old bytes, and its real partner waited out
    /// --pair-timeout (19 of 40 quick reconnects; a helper's token pass). A partner paired with a
    /// dead client gets nothing it can use, so none is.
    fn let_go_after_reset(&mut self, slot: usize, serial: u64) {
        if self.pending_mut(slot, Some(serial)).is_some() {
            self.drop_pending(slot, pending::RESET_AFTER_SENDING, Unpaired::Left);
        }
    }

    /// Offers an identified client a partner, or lets it wait.
    fn offer(&mut self, slot: usize) {
        let Some(p) = self.pending_mut(slot, None) else { return };
        // It may have reset already (with its connection, or its token line): it takes nobody.
        // Said as the peek says it where it can ("Connection reset by peer": nothing sent).
        // A client that only closed is offered as before, and counted `full` where it is.
        if p.reset_after_sending() {
            let why = p.gone().unwrap_or_else(|| pending::RESET_AFTER_SENDING.into());
            return self.drop_pending(slot, &why, Unpaired::Left);
        }
        let key = p.key.clone().unwrap_or_default();
        let handed_over = p.handed_over;
        let Partners::Clients { matcher, .. } = &mut self.partners else { return };
        match matcher.offer(&key, slot) {
            // The loop may not have seen the waiting client's close or reset yet: look now, so
            // a client that is gone never takes a partner.
            Some(partner) => match self.pending_mut(partner, None).map(|p| p.gone_or_reset()) {
                Some(None) => self.form_pair(partner, slot),
                Some(Some(why)) => {
                    self.drop_pending(partner, &why, Unpaired::Left);
                    self.offer(slot)
                }
                None => self.offer(slot),
            },
            None if matcher.waiting() > self.max_pending && !handed_over => {
                let why = match self.max_pending {
                    1 => "1 client already waits for a partner (--max-pending)".to_string(),
                    n => format!("{n} clients already wait for a partner (--max-pending)"),
                };
                self.drop_pending(slot, &why, Unpaired::Full);
            }
            None => {}
        }
    }

    /// Takes a pending client out of its slot, the matcher and the event loop.
    fn take_pending(&mut self, slot: usize) -> Option<Pending> {
        self.take_pending_still_watched(slot, false)
    }

    /// `take_pending`, but with `watched` its sockets (the client's, its upstream connection's)
    /// stay registered with this loop: for a pair about to form, which `splice_here` registers
    /// again under its own tokens (one epoll_ctl per socket, where leaving and joining took two).
    fn take_pending_still_watched(&mut self, slot: usize, watched: bool) -> Option<Pending> {
        self.pending_mut(slot, None)?;
        let Slot::Pending(mut p) = self.slots.remove(slot) else { unreachable!() };
        self.pending -= 1;
        self.metrics.set_pending(self.pending);
        let registry = self.poll.registry();
        if !watched {
            let _ = registry.deregister(&mut p.stream);
        }
        match &mut self.partners {
            Partners::Clients { matcher, .. } => {
                if let Some(key) = &p.key {
                    matcher.withdraw(key, slot);
                }
            }
            Partners::Upstreams(connector) => {
                if let Some(c) = p.upstream.as_mut() {
                    connector.abandon(c, (!watched).then_some(registry));
                }
            }
            Partners::Front { .. } => {}
        }
        Some(p)
    }

    /// Lets a waiting client go, for `reason`. It sees a reset (set at `admit`) whatever the
    /// reason, also one that only half-closed. A full --max-pending is a warning, as at `admit`.
    fn drop_pending(&mut self, slot: usize, why: &str, reason: Unpaired) {
        let Some(p) = self.take_pending(slot) else { return };
        self.metrics.client_unpaired(reason);
        match reason {
            Unpaired::Full => self.warn_full(format!("client {} reset: {why}", p.addr)),
            // Said once for all of them (`drop_all_pending`): a stop with 1,000 clients waiting
            // wrote 1,000 lines.
            Unpaired::Shutdown => log::debug!("client {} reset: {why}", p.addr),
            _ => log::info!("client {} reset: {why}", p.addr),
        }
    }

    /// Resets every client still waiting, as skrelay stops, and says how many in one line.
    fn drop_all_pending(&mut self) {
        let waiting: Vec<usize> =
            self.slots.iter().filter(|(_, s)| matches!(s, Slot::Pending(_))).map(|(k, _)| k).collect();
        let n = waiting.len();
        for slot in waiting {
            self.drop_pending(slot, "skrelay is shutting down", Unpaired::Shutdown);
        }
        if n > 0 {
            let what = match self.partners {
                Partners::Upstreams(_) => "waiting for their upstream connection",
                _ => "waiting to be paired",
            };
            log::info!("reset {n} client(s) {what}: skrelay is shutting down");
        }
    }

    /// A client reset for a full `--max-pending`: a warning at most once a second, which counts
    /// the ones in between (logged at debug level); `skrelay_unpaired_clients_total{reason="full"}`
    /// counts them all.
    fn warn_full(&mut self, line: String) {
        self.full_warnings.warn(line);
    }

    /// What the throttled warnings have not said yet, once its second is over (or at the end).
    fn say_unsaid(&mut self, now: Instant, at_end: bool) {
        self.full_warnings.say_unsaid(now, at_end);
        self.no_upstream_warnings.say_unsaid(now, at_end);
    }

    fn form_pair(&mut self, first: usize, second: usize) {
        let (Some(a), Some(b)) =
            (self.take_pending_still_watched(first, true), self.take_pending_still_watched(second, true))
        else {
            return;
        };
        self.splice_pair([a.stream, b.stream], [a.addr, b.addr], [a.skip, b.skip], None);
    }

    /// Hands two connected sockets to the loop with the fewest pairs (this one while draining:
    /// the others may be stopping), to splice and watch as a pair. `upstream_local`: `proxy`'s
    /// upstream end's local address, remembered while the pair lives.
    fn splice_pair(
        &mut self,
        ends: [TcpStream; 2],
        addrs: [SocketAddr; 2],
        skip: [u32; 2],
        upstream_local: Option<SocketAddr>,
    ) {
        let mut formed = Formed { ends, addrs, skip, upstream_local, watched: true };
        let to = if self.drain_deadline.is_some() { self.threads.me } else { self.threads.pick() };
        if to == self.threads.me {
            return self.splice_here(formed);
        }
        for end in &mut formed.ends {
            let _ = self.poll.registry().deregister(end);
        }
        formed.watched = false;
        if let Some(formed) = self.threads.send(to, formed) {
            self.threads.took_back(to);
            self.splice_here(formed);
        }
    }

    /// Hands a formed pair, counted as this loop's, to the datapath and starts watching it.
    fn splice_here(&mut self, Formed { mut ends, addrs, skip, upstream_local, watched }: Formed) {
        // Before the datapath moves anything: with --kernel-after 0 it joins the maps at once,
        // and bytes sent before the pair formed were acknowledged before `Pair::new` looked,
        // which then took them for an upstream's SYN (held for the pair's life: a re-check).
        let acked_base = [&ends[0], &ends[1]].map(|e| crate::sys::tcp_counters(e).map_or(0, |c| c.bytes_acked));
        let splice = match self.datapath.splice([&ends[0], &ends[1]], skip) {
            Ok(s) => s,
            Err(e) => {
                if watched {
                    ends.iter_mut().for_each(|end| drop(self.poll.registry().deregister(end)));
                }
                self.threads.released();
                // Streams we could not finish: reset, never closed as if they were whole.
                ends.iter().for_each(reset_on_close);
                (0..2).for_each(|_| self.metrics.client_unpaired(Unpaired::Error));
                // A client that half-closed mid-join (take_back) is not a fault of ours to shout.
                if matches!(e, crate::datapath::SpliceError::Cut(_)) {
                    return log::info!("pair {} <-> {} reset: {e}", addrs[0], addrs[1]);
                }
                return log::error!("pair {} <-> {} reset: cannot splice it: {e}", addrs[0], addrs[1]);
            }
        };
        // A pair the kernel datapath had to splice in user space (maps full, budget spent)
        // counts as userspace.
        let label =
            if crate::datapath::spliced_alone(splice.name()) { UserspaceDatapath.name() } else { self.datapath.name() };
        let serial = self.next_serial();
        let slot = self.slots.vacant_key();
        let mut pair = Pair::new(ends, addrs, splice, serial, upstream_local, skip, acked_base);
        if let Err(e) = pair.register(self.poll.registry(), tokens(slot), watched) {
            self.threads.released();
            (0..2).for_each(|_| self.metrics.client_unpaired(Unpaired::Error));
            return log::error!("pair {} <-> {} reset: cannot watch it: {e}", addrs[0], addrs[1]);
        }
        log::debug!("paired {} <-> {} ({}, thread {})", addrs[0], addrs[1], pair.datapath(), self.threads.me);
        self.slots.insert(Slot::Pair(pair));
        self.pair_metrics.insert(slot, self.metrics.pair_started(label));
        self.pairs += 1;
        self.metrics.set_loop_pairs(self.threads.me, self.pairs);
        self.watch_idle();
        if let Some(local) = upstream_local {
            self.remember_upstream(local, addrs[1].port());
        }
        // Bytes and EOFs that came before the pair formed are acted on now, not at the next event.
        self.service(slot, true);
    }

    /// `proxy`: the upstream connection from `local` (to port `to`) lives on in a pair.
    fn remember_upstream(&mut self, local: SocketAddr, to: u16) {
        match &mut self.partners {
            Partners::Upstreams(connector) => connector.remember(local, to),
            Partners::Front { own: Some(own) } => own.remember(local, to),
            _ => {}
        }
    }

    /// Moves a pair on and does what it asks: a timer, another turn, new readiness, its end.
    fn service(&mut self, slot: usize, check_errors: bool) {
        let process = self.datapath.name();
        let Some(Slot::Pair(pair)) = self.slots.get_mut(slot) else {
            return;
        };
        match pair.service(check_errors) {
            Step::Ended(ending) => self.end_pair(slot, ending),
            Step::Live { flush_check, again, interest } => {
                let serial = pair.serial();
                if let (Some(on), Some(metric)) =
                    (carried_by(process, pair.datapath()), self.pair_metrics.get_mut(&slot))
                {
                    metric.move_to(on);
                }
                if let Some(interest) = interest {
                    pair.reregister(self.poll.registry(), tokens(slot), interest);
                }
                if let Some(delay) = flush_check {
                    let at = Instant::now() + delay;
                    if pair.flush_timer_wanted(at) {
                        self.timers.set(at, Timer::FlushCheck { slot, serial });
                    }
                }
                if again {
                    self.again.push((slot, serial));
                }
            }
        }
    }

    fn end_pair(&mut self, slot: usize, ending: Ending) {
        let Some(Slot::Pair(_)) = self.slots.get(slot) else {
            return;
        };
        let Slot::Pair(mut pair) = self.slots.remove(slot) else { unreachable!() };
        self.pairs -= 1;
        self.threads.released();
        self.metrics.set_loop_pairs(self.threads.me, self.pairs);
        if took_over() {
            pair.deregister(self.poll.registry());
        }
        let counted = match &ending {
            Ending::Done => PairEnd::Eof,
            Ending::Reset { .. } => PairEnd::Reset,
            Ending::Drained | Ending::CutBySignal(_) => PairEnd::Drain,
            Ending::Idle(_) => PairEnd::Timeout,
        };
        let ended = pair.end(ending);
        let on = carried_by(self.datapath.name(), ended.datapath);
        if let Some(mut metric) = self.pair_metrics.remove(&slot) {
            if let Some(on) = on {
                metric.move_to(on);
            }
            metric.end(counted, ended.moved[0] + ended.moved[1]);
        }
        self.metrics.pair_path(ended.datapath);
        self.account_end(&ended);
        if self.pairs == 0 {
            // The last one: the gauge reads 0 now, not at the next once-a-second sample.
            self.inflight_due = Some(Instant::now());
        }
    }

    /// Starts the `--idle-timeout` looks when a pair arrives and none are due.
    fn watch_idle(&mut self) {
        if !self.idle_timeout.is_zero() && self.idle_due.is_none() {
            self.idle_due = Some(Instant::now() + idle_check_every(self.idle_timeout));
        }
    }

    /// `--idle-timeout`: resets the pairs where no byte moved either way for that long. Looks at
    /// every pair's TCP_INFO (two reads a pair) each `idle_check_every`, so a pair is reset
    /// within a tenth of the timeout (at most 5 s) after its last byte plus the timeout.
    fn reset_idle_pairs(&mut self) {
        let now = Instant::now();
        if self.idle_due.is_none_or(|t| now < t) {
            return;
        }
        let mut idle = Vec::new();
        for (slot, entry) in self.slots.iter_mut() {
            if let Slot::Pair(pair) = entry {
                let quiet = pair.idle_for(now);
                if quiet >= self.idle_timeout {
                    idle.push((slot, pair.idle_ending(quiet)));
                }
            }
        }
        for (slot, ending) in idle {
            self.end_pair(slot, ending);
        }
        self.idle_due = (self.pairs > 0).then(|| now + idle_check_every(self.idle_timeout));
    }

    /// Reads what the datapath holds in flight into the metrics, once a second while pairs live
    /// (a last time when the last one ends).
    fn sample_inflight(&mut self) {
        let now = Instant::now();
        if self.inflight_due.is_some_and(|t| now < t) {
            return;
        }
        self.metrics.set_kernel_inflight(self.threads.me, self.datapath.in_flight());
        if self.metrics.served() {
            let pairs = self.slots.iter().filter_map(|(_, e)| if let Slot::Pair(p) = e { Some(p) } else { None });
            self.metrics.set_held(self.threads.me, pairs.filter_map(Pair::held).sum());
        }
        self.inflight_due = (self.pairs > 0).then(|| now + INFLIGHT_EVERY);
    }

    /// Every pair that ends passes here once, before its sockets close.
    fn account_end(&mut self, ended: &Ended) {
        match (ended.upstream_local, &mut self.partners) {
            (Some(local), Partners::Upstreams(connector)) => connector.forget(local),
            (Some(local), Partners::Front { own: Some(own) }) => own.forget(local),
            _ => {}
        }
        let [a, b] = ended.addrs;
        // `proxy`: the local end of the connection to the upstream, which is how the upstream's
        // own log names this client (IPv4-mapped shown as IPv4, as the upstream shows it).
        let from = ended
            .upstream_local
            .map(|l| format!("; upstream connection from {}", sys::unmapped(l)))
            .unwrap_or_default();
        log::info!(
            "pair {a} <-> {b} {} after {:.3}s: {} bytes {a} -> {b}, {} bytes {b} -> {a} ({}){from}",
            ended.how,
            ended.lasted.as_secs_f64(),
            ended.moved[0],
            ended.moved[1],
            ended.datapath,
        );
    }

    fn end_all(&mut self, ending: impl Fn() -> Ending) {
        let slots: Vec<usize> = self.slots.iter().map(|(k, _)| k).collect();
        for slot in slots {
            if let Some(Slot::Pair(_)) = self.slots.get(slot) {
                self.end_pair(slot, ending());
            }
        }
        self.drop_all_pending();
    }

    /// `proxy`: no upstream is left to try for the client in `slot`, or this process could not
    /// open a connection at all (out of descriptors: not the upstreams' fault, and the client
    /// waits for one, `held_for_descriptors`).
    fn no_upstream(&mut self, slot: usize) {
        let shortage = match &self.partners {
            Partners::Upstreams(connector) => connector.shortage().map(|e| e.to_string()),
            _ => None,
        };
        if let Some(e) = shortage {
            let Some(p) = self.pending_mut(slot, None) else { return };
            let (addr, serial) = (p.addr, p.serial);
            self.held_for_descriptors.push((slot, serial));
            if self.warn_of_shortage() {
                log::warn!(
                    "cannot open a connection to an upstream for client {addr}: {e} (it waits, and further clients \
                     wait in the listen backlog, retrying every {ACCEPT_BACKOFF:?}; raise the descriptor limit: \
                     `ulimit -n`, or LimitNOFILE= in the unit; said once per {SHORTAGE_WARN_EVERY:?})"
                );
                self.accept_short = true;
            } else {
                log::debug!("client {addr} waits for a descriptor for its upstream connection: {e}");
            }
            self.accept_retry = Some(Instant::now() + ACCEPT_BACKOFF);
            return;
        }
        let Some(p) = self.take_pending(slot) else { return };
        reset_on_close(&p.stream);
        // A client that sent bytes and then reset was held for its upstream connection (its
        // bytes were to reach the upstream, then its reset): it left; nobody reset it.
        if sys::tcp_counters(&p.stream).is_ok_and(|c| c.closed()) {
            self.metrics.client_unpaired(Unpaired::Left);
            log::info!("client {} reset before its upstream answered; no upstream could be reached", p.addr);
        } else {
            self.metrics.client_unpaired(Unpaired::NoUpstream);
            self.no_upstream_warnings.warn(format!("client {} reset: no upstream could be reached", p.addr));
        }
    }

    /// `proxy`: starts the upstream connection of the waiting client in `slot`; with no upstream
    /// to try, or no descriptor to try it with, `no_upstream`.
    fn connect_upstream(&mut self, slot: usize, serial: u64) {
        let Partners::Upstreams(connector) = &mut self.partners else { return };
        if connector.refused().is_some() {
            if let Some(p) = self.take_pending(slot) {
                reset_on_close(&p.stream);
                self.metrics.client_unpaired(Unpaired::NoUpstream);
                log::warn!("client {} reset: this process may not connect upstream from its cgroup", p.addr);
            }
            return;
        }
        match connector.connect(self.poll.registry(), token(slot, 1)) {
            Some(c) => {
                self.timers.set(c.deadline(), Timer::ConnectTimeout { slot, serial });
                self.pending_mut(slot, Some(serial)).expect("a waiting client").upstream = Some(c);
            }
            None => self.no_upstream(slot),
        }
    }

    /// `proxy`: tries the upstream connections of the clients held for want of descriptors again,
    /// in the order they came; one that runs short again keeps its place and the rest behind it.
    fn retry_held(&mut self) {
        while !self.held_for_descriptors.is_empty() {
            let (slot, serial) = self.held_for_descriptors.remove(0);
            // Gone meanwhile (left, or the process drains), or already connecting.
            if self.pending_mut(slot, Some(serial)).is_none_or(|p| p.upstream.is_some()) {
                continue;
            }
            let held = self.held_for_descriptors.len();
            self.connect_upstream(slot, serial);
            if self.held_for_descriptors.len() > held {
                // Short again (`no_upstream` held it at the end): back to the head of the line.
                let again = self.held_for_descriptors.pop().expect("just held");
                self.held_for_descriptors.insert(0, again);
                return;
            }
        }
    }

    /// Whether to warn of a shortage of descriptors now (at most once per `SHORTAGE_WARN_EVERY`).
    fn warn_of_shortage(&mut self) -> bool {
        let now = Instant::now();
        if self.shortage_warned.is_some_and(|at| now < at + SHORTAGE_WARN_EVERY) {
            return false;
        }
        self.shortage_warned = Some(now);
        true
    }

    /// `proxy`: the upstream connection of a waiting client is ready (or failed).
    fn on_upstream(&mut self, slot: usize) {
        let Some(c) = self.pending_mut(slot, None).and_then(|p| p.upstream.as_ref()) else { return };
        match Connector::progress(c) {
            Progress::Waiting => {}
            Progress::Failed(e) => self.upstream_failed(slot, e),
            Progress::Connected(upstream_addr) => {
                let Some(mut p) = self.take_pending_still_watched(slot, true) else { return };
                let c = p.upstream.take().expect("connecting");
                if let Partners::Upstreams(connector) = &mut self.partners {
                    connector.connected(&c);
                }
                let _ = c.stream.set_nodelay(true);
                self.splice_pair([p.stream, c.stream], [p.addr, upstream_addr], [0, 0], Some(c.local));
            }
        }
    }

    /// `proxy`: a waiting client's upstream connection failed or timed out: the next upstream.
    fn upstream_failed(&mut self, slot: usize, error: io::Error) {
        let Partners::Upstreams(connector) = &mut self.partners else { return };
        let Some(Slot::Pending(p)) = self.slots.get_mut(slot) else { return };
        let Some(c) = p.upstream.take() else { return };
        match connector.failed(c, error, self.poll.registry(), token(slot, 1)) {
            Some(c) => {
                self.timers.set(c.deadline(), Timer::ConnectTimeout { slot, serial: p.serial });
                p.upstream = Some(c);
            }
            None => self.no_upstream(slot),
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some((at, timer)) = self.timers.pop_due(now) {
            match timer {
                Timer::PairTimeout { slot, serial } => {
                    if let Some(p) = self.pending_mut(slot, Some(serial)) {
                        let why = p.timed_out();
                        self.drop_pending(slot, why, Unpaired::Timeout);
                    }
                }
                Timer::ConnectTimeout { slot, serial } => {
                    let due = self.pending_mut(slot, Some(serial)).and_then(|p| p.upstream.as_ref());
                    if due.is_some_and(|c| c.deadline() <= now) {
                        let why = io::Error::new(io::ErrorKind::TimedOut, "no answer within --connect-timeout");
                        self.upstream_failed(slot, why);
                    }
                }
                Timer::FlushCheck { slot, serial } => {
                    let live = match self.slots.get_mut(slot) {
                        Some(Slot::Pair(p)) => p.serial() == serial && p.flush_timer_fired(at),
                        _ => false,
                    };
                    if live {
                        self.service(slot, true);
                    }
                }
            }
        }
    }

    fn on_signal(&mut self) {
        let Some(signals) = self.signals.as_mut() else { return };
        let signals: Vec<i32> = signals.pending().collect();
        for signal in signals {
            let mut name = match signal {
                SIGINT => "SIGINT",
                SIGHUP => "SIGHUP",
                SIGQUIT => "SIGQUIT",
                SIGUSR2 => "SIGUSR2 (handing over to the skrelay that took over)",
                _ => "SIGTERM",
            };
            if signal == SIGUSR1 {
                let doing = if self.drain_deadline.is_some() { "draining on" } else { "serving on" };
                // Under `nohup` SIGHUP stays ignored (see `Server::new`): not one to name.
                let stoppers = if sys::signal_ignored(SIGHUP) {
                    "SIGTERM or SIGINT stop"
                } else {
                    "SIGTERM, SIGINT or SIGHUP stop"
                };
                log::warn!(
                    "SIGUSR1 means nothing to skrelay: {doing} ({stoppers} it after a drain, SIGQUIT at once; SIGUSR2 is \
                     for --takeover)"
                );
                continue;
            }
            // Handing over while already stopping changes nothing; said, as every other signal
            // is (it left no line: a README audit).
            if signal == SIGUSR2 && self.drain_deadline.is_some() {
                log::warn!(
                    "SIGUSR2 while stopping: nothing is handed over (only a serving skrelay hands over); still \
                     letting {} live pair(s) finish",
                    self.threads.pairs()
                );
                continue;
            }
            if self.drain_deadline.is_some() {
                // Any stop signal cuts a drain short, not only the one that started it: named as
                // such (`SIGINT after SIGHUP`, where it said "SIGINT again": an operator's pass).
                let again = match self.stopped_by {
                    _ if signal == SIGQUIT => String::new(),
                    Some(first) if first != name => format!(" after {first}"),
                    _ => " again".into(),
                };
                log::warn!("{name}{again}: closing {} live pair(s) now", self.threads.pairs());
                self.close_all_now(name);
                continue;
            }
            self.stopped_by = Some(name);
            let status = match signal {
                SIGUSR2 => format!("handing {} live pair(s) over to the skrelay that took over", self.threads.pairs()),
                // SIGQUIT closes them at once (it said "draining": an operator's pass).
                SIGQUIT => format!("closing {} live pair(s) now", self.threads.pairs()),
                _ => format!("draining {} live pair(s)", self.threads.pairs()),
            };
            if signal != SIGUSR2 {
                crate::systemd::notify(&format!("STOPPING=1\nSTATUS={status}"));
            }
            let mut listener = self.listener.take();
            if let Some(l) = listener.as_mut() {
                let _ = self.poll.registry().deregister(l);
            }
            // Handing over, a proxy's accepted clients still get their upstream connection and
            // drain as pairs: they came through the socket the new process serves, and closing
            // them would be the refusal --takeover avoids. (A relay's waiting clients cannot meet
            // a partner here any more.)
            let keep = signal == SIGUSR2 && matches!(self.partners, Partners::Upstreams(_));
            if signal == SIGUSR2 {
                // Live pairs and waiting clients move to the new process, and this one exits;
                // if they cannot, they stay and finish here (server/handover.rs). Every loop's
                // pairs go: the other loops stop and give their servers back first.
                self.threads.recall();
                let handed = self.hand_over();
                if let Err(why) = &handed {
                    if listener.as_ref().is_some_and(|l| sys::socket_held_elsewhere(l) == Some(false)) {
                        // No other process holds the listening socket (the new one died during
                        // the handover, or none came): draining would leave the address unserved
                        // until someone restarts skrelay (a helper's pass: every connection
                        // refused for seconds after a successor was killed mid-handover).
                        self.serve_on(listener.take(), why);
                        continue;
                    }
                }
                crate::systemd::notify(&format!("STOPPING=1\nSTATUS={status}"));
                self.metrics.stop_serving();
                match handed {
                    Ok(true) => {
                        self.handed_over = true;
                        return;
                    }
                    // The waiting clients went; the live pairs drain here.
                    Ok(false) => {}
                    Err(why) if keep => {
                        name = "SIGUSR2 (the pairs were not taken over)";
                        log::warn!("live pairs and waiting clients stay in this process and finish here: {why}")
                    }
                    Err(why) => {
                        name = "SIGUSR2 (the pairs were not taken over)";
                        let waiting = if self.pending > 0 { ", and its waiting clients are reset" } else { "" };
                        log::warn!("live pairs stay in this process and finish here{waiting}: {why}")
                    }
                }
                if let Err(e) = self.threads.start() {
                    log::error!("cannot restart the event loops' threads: {e}; their pairs wait");
                }
            }
            if signal == SIGQUIT {
                log::warn!("SIGQUIT: no longer accepting; closing {} live pair(s) now", self.threads.pairs());
            } else {
                log::info!(
                    "{name}: no longer accepting; letting {} live pair(s) finish (up to {}s)",
                    self.threads.pairs(),
                    self.drain_timeout.as_secs_f64()
                );
            }
            if !keep {
                self.drop_all_pending();
            }
            let deadline = Instant::now() + self.drain_timeout;
            self.start_drain(deadline);
            self.threads.tell(move || Order::Drain(deadline));
            if signal == SIGQUIT {
                self.close_all_now(name);
            }
        }
    }

    /// Ends every live pair at once with a reset (a second stop signal, or SIGQUIT), in every
    /// event loop, and lets the process exit.
    fn close_all_now(&mut self, name: &'static str) {
        self.end_all(|| Ending::CutBySignal(name));
        self.threads.tell(|| Order::EndAll(name));
        self.drain_deadline = Some(Instant::now());
    }
}

impl Server {
    /// After a SIGUSR2 whose handover failed with no other process holding the listening socket:
    /// accept again and keep everything, as if the signal had not come.
    fn serve_on(&mut self, listener: Option<TcpListener>, why: &str) {
        log::warn!(
            "SIGUSR2: nothing was taken over ({why}), and no other process holds the listening socket: serving on"
        );
        if let Some(mut l) = listener {
            match self.poll.registry().register(&mut l, LISTENER, Interest::READABLE) {
                Ok(()) => self.listener = Some(l),
                Err(e) => log::error!("cannot watch the listening socket again: {e}; accepting no more clients"),
            }
        }
        if let Err(e) = self.threads.start() {
            log::error!("cannot restart the event loops' threads: {e}; their pairs wait");
        }
        self.accept();
    }
}

/// Watches `datapath`'s own events, if it has any.
fn watch_datapath(poll: &Poll, datapath: &dyn Datapath) -> io::Result<()> {
    match datapath.events() {
        Some(fd) => poll.registry().register(&mut mio::unix::SourceFd(&fd), DATAPATH, Interest::READABLE),
        None => Ok(()),
    }
}

/// The datapath label a pair's path (`Splice::name`) puts it under in the pair metrics, where it
/// says: `userspace` while the kernel datapath keeps it out of full maps or `--kernel-memory`,
/// `process` (this process's datapath) once it is in the maps (a kept-out pair joins when a
/// kernel pair ends: it stayed counted as userspace to its end; a re-check pass).
fn carried_by(process: &'static str, path: &str) -> Option<&'static str> {
    if crate::datapath::spliced_alone(path) {
        Some(UserspaceDatapath.name())
    } else if path.starts_with("kernel") {
        Some(process)
    } else {
        None
    }
}
