//! Two spliced connections. The datapath moves their bytes; the pair propagates what the kernel
//! does not: end of file, one direction at a time, and resets, to both clients. SO_ERROR, which
//! reading clears, is read in one place: `Pair::take_error`.
use super::handover::PairState;
use crate::{
    datapath::{handover::Exporter, Flow, Splice},
    sys,
};
use mio::{net::TcpStream, Interest, Registry, Token};
use socket2::SockRef;
use std::{
    io,
    net::{Shutdown, SocketAddr},
    time::{Duration, Instant},
};

/// First and longest wait between checks that a half-closed source's bytes have all left (or
/// that a reset end's bytes have reached the partner's client), while bytes move.
const FLUSH_CHECK_FIRST: Duration = Duration::from_millis(1);
const FLUSH_CHECK_MAX: Duration = Duration::from_millis(100);
/// The longest wait between those checks while no byte moves either way: a tenth of how long
/// nothing has moved, from 100 ms up to this. A pair whose partner's client does not read was
/// looked at 10 times a second until --idle-timeout (a bounds pass: 1,000 such pairs, from
/// clients that sent and reset, took 4% of a CPU for 600 s); a tenth keeps the end of a stalled
/// flush at most a tenth of the stall late (a flat 1 s made it 0.3 s late after a 0.5 s pause on
/// the kernel datapath, whose flush is only looked at: a re-check pass).
const FLUSH_CHECK_STALLED_MAX: Duration = Duration::from_secs(1);
/// What a pair waiting after a reset drops of its partner's bytes toward the reset end beyond
/// twice what the partner's client acknowledged meanwhile, at once and each second since
/// (`finish_reset`): reading 16 MiB a second costs about 1% of a CPU.
const DROP_SLACK: u64 = 16 << 20;
const DROP_RATE: u64 = 16 << 20;

use crate::sys::close_gracefully;
pub(super) use crate::sys::reset_on_close;

pub(super) struct Pair {
    ends: [TcpStream; 2],
    addrs: [SocketAddr; 2],
    splice: Box<dyn Splice>,
    since: Instant,
    serial: u64,
    /// Direction i (from end i) has finished and end 1-i's write side is shut down.
    shut: [bool; 2],
    flush_delay: Duration,
    /// The counters (`counters`) at the last of those checks, and since when they have not
    /// changed.
    flush_seen: Option<([u64; 4], Instant)>,
    /// `proxy`: the local address of the upstream end (see `Connecting::local`).
    upstream_local: Option<SocketAddr>,
    /// An end was reset (its error taken): the partner is reset once what that end received
    /// before its reset has reached the partner's client, or once that client has taken nothing
    /// for `--idle-timeout` (`Server::reset_idle_pairs`), as a live pair would be.
    /// The end that was reset, and its error.
    resetting: Option<(usize, io::Error)>,
    /// While `resetting`: when dropping what the partner sends toward the reset end began, the
    /// partner's bytes_acked then, and the bytes dropped since (`finish_reset`).
    dropping: Option<(Instant, u64, u64)>,
    /// When bytes last moved (`--idle-timeout`), and the counters that showed it.
    active: Activity,
    /// The deadline of the flush check the loop has set for this pair, if one is pending: one
    /// at a time. A timer set at every service piled up (each fired one set another), and a
    /// resetting pair whose partner sent on was serviced more and more often: skrelay's CPU grew
    /// with the pair's age (a hostile pass: 0.33 to 1.05 CPUs in 20 s with 40 pairs).
    flush_timer: Option<Instant>,
    /// Each end's bytes that are not the pair's to deliver (`held`): received, its token line;
    /// acknowledged, an upstream connection's SYN.
    skip: [u64; 2],
    acked_base: [u64; 2],
}

/// What `Pair::idle_for` compares: each socket's bytes received from its client and bytes its
/// client acknowledged (TCP_INFO). Either moves while any byte moves, on both datapaths.
struct Activity {
    at: Instant,
    seen: [u64; 4],
}

/// How a pair ended, for the log and for what its clients see.
#[derive(Debug)]
pub(super) enum Ending {
    /// Both directions finished: the only ending that closes with FINs.
    Done,
    /// A socket error on `end` (or a failure to move the pair on): both clients are reset.
    Reset { end: usize, error: io::Error },
    /// Cut at the drain timeout: both clients are reset.
    Drained,
    /// Cut while draining, when the stop signal (named) came again: both clients are reset.
    CutBySignal(&'static str),
    /// No byte moved either way for this long (`--idle-timeout`): both clients are reset.
    Idle(Duration),
}

/// What `Pair::service` left to do for the loop.
#[derive(Debug)]
pub(super) enum Step {
    Live {
        /// Look again after this long (a source at end of file has bytes in flight).
        flush_check: Option<Duration>,
        /// More is ready than one turn moves: service again after the other pairs.
        again: bool,
        /// The datapath now needs this readiness from both sockets.
        interest: Option<Interest>,
    },
    Ended(Ending),
}

/// A pair that has ended, with what its end-of-pair line reports. The sockets of a pair that
/// ended well close when it is dropped, so the line can be written before either client sees the
/// close; a cut pair's were reset before they were counted, and are closed already.
pub(super) struct Ended {
    pub(super) addrs: [SocketAddr; 2],
    /// "ended", "reset (...)", "reset at the drain timeout".
    pub(super) how: String,
    pub(super) lasted: Duration,
    /// Payload bytes delivered from end i to end 1-i.
    pub(super) moved: [u64; 2],
    /// Which datapath moved the bytes.
    pub(super) datapath: &'static str,
    pub(super) upstream_local: Option<SocketAddr>,
    _ends: Option<[TcpStream; 2]>,
}

impl Pair {
    /// A pair of connected sockets that `splice` moves. Until the pair ends well, any close of
    /// its sockets (ours, or the kernel's when this process dies) resets them: a stream we did not
    /// finish must not look finished. They come armed so (`reset_on_close`: a client by its
    /// listener, `sys::arm_for_clients`, an upstream connection when it is made). A shutdown that
    /// forwards one direction's EOF still sends its FIN; the socket keeps resetting on close
    /// because the other direction may be unfinished.
    pub(super) fn new(
        ends: [TcpStream; 2],
        addrs: [SocketAddr; 2],
        splice: Box<dyn Splice>,
        serial: u64,
        upstream_local: Option<SocketAddr>,
        skip: [u32; 2],
        acked_base: [u64; 2],
    ) -> Pair {
        Pair {
            ends,
            addrs,
            splice,
            since: Instant::now(),
            serial,
            shut: [false; 2],
            flush_delay: FLUSH_CHECK_FIRST,
            flush_seen: None,
            resetting: None,
            dropping: None,
            flush_timer: None,
            upstream_local,
            active: Activity { at: Instant::now(), seen: [0; 4] },
            skip: skip.map(u64::from),
            acked_base,
        }
    }

    /// Bytes of the pair's streams inside this host: received from one client's TCP and not yet
    /// acknowledged by the other's, wherever they wait (the relay's receive queues, the kernel
    /// datapath's psock queues, the pipes, the send queues). None if a socket cannot be read.
    /// `acked_base` (given to `new`): what each end counted acknowledged before the datapath
    /// moved anything (an upstream connection's SYN), no byte of the pair's.
    pub(super) fn held(&self) -> Option<u64> {
        let c = [sys::tcp_counters(&self.ends[0]).ok()?, sys::tcp_counters(&self.ends[1]).ok()?];
        Some(
            (0..2)
                .map(|dir| {
                    // Toward a socket its client reset nothing waits: its send queue went with
                    // the reset, and what comes for it is dropped (`finish_reset`). Counted, a
                    // partner sending on made it tens of GB (a re-check pass).
                    if c[1 - dir].closed() {
                        return 0;
                    }
                    let taken = c[dir].payload_received_but_reset().saturating_sub(self.skip[dir]);
                    let given = c[1 - dir].acked_but_fin().saturating_sub(self.acked_base[1 - dir]);
                    taken.saturating_sub(given)
                })
                .sum(),
        )
    }

    pub(super) fn serial(&self) -> u64 {
        self.serial
    }

    /// A flush check is due at `at`: whether the loop must set a timer for it (none is pending
    /// at or before `at`).
    pub(super) fn flush_timer_wanted(&mut self, at: Instant) -> bool {
        if self.flush_timer.is_some_and(|pending| pending <= at) {
            return false;
        }
        self.flush_timer = Some(at);
        true
    }

    /// A flush check set for `at` fired: whether it is the pending one (a later one, replaced
    /// by an earlier, is not).
    pub(super) fn flush_timer_fired(&mut self, at: Instant) -> bool {
        if self.flush_timer != Some(at) {
            return false;
        }
        self.flush_timer = None;
        true
    }

    pub(super) fn upstream_local(&self) -> Option<SocketAddr> {
        self.upstream_local
    }

    /// `--takeover`: the pair's state for the new process, its descriptors recorded in `ex`.
    pub(super) fn export(&self, ex: &mut Exporter) -> Option<PairState> {
        Some(PairState {
            thread: 0,
            ends: [ex.fd(&self.ends[0]), ex.fd(&self.ends[1])],
            addrs: self.addrs,
            lasted: self.since.elapsed(),
            shut: self.shut,
            upstream_local: self.upstream_local,
            splice: self.splice.export(ex)?,
            // How long it has been quiet: the new process's --idle-timeout runs on from there.
            idle: self.active.at.elapsed(),
            resetting: self
                .resetting
                .as_ref()
                .map(|(end, error)| (*end, error.raw_os_error().unwrap_or(libc::ECONNRESET))),
            skip: Some(self.skip),
            acked_base: Some(self.acked_base),
        })
    }

    /// `--takeover`: a pair handed over by the old process, carried on with `ends` (already
    /// armed to reset on close there: the option belongs to the socket).
    pub(super) fn import(ends: [TcpStream; 2], state: PairState, splice: Box<dyn Splice>, serial: u64) -> Pair {
        let mut pair = Pair {
            ends,
            addrs: state.addrs,
            splice,
            since: Instant::now().checked_sub(state.lasted).unwrap_or_else(Instant::now),
            serial,
            shut: state.shut,
            flush_delay: FLUSH_CHECK_FIRST,
            flush_seen: None,
            resetting: state
                .resetting
                .filter(|(end, _)| *end < 2)
                .map(|(end, errno)| (end, io::Error::from_raw_os_error(errno))),
            dropping: None,
            flush_timer: None,
            upstream_local: state.upstream_local,
            active: Activity { at: Instant::now(), seen: [0; 4] },
            skip: state.skip.unwrap_or_default(),
            // From a process that did not say: an upstream connection's SYN, as `new` finds it.
            acked_base: state.acked_base.unwrap_or([0, u64::from(state.upstream_local.is_some())]),
        };
        // The idle clock runs on from the old process's (a pair quiet for most of the timeout
        // is not given a new one by each upgrade), against the counters as they are now.
        let now = Instant::now();
        pair.active =
            Activity { at: now.checked_sub(state.idle).unwrap_or(now), seen: pair.idle_counters().unwrap_or([0; 4]) };
        pair
    }

    /// End `end` reported urgent data (EPOLLPRI): see `Splice::urgent_seen`.
    pub(super) fn urgent_seen(&mut self, end: usize) {
        self.splice.urgent_seen(end);
    }

    pub(super) fn datapath(&self) -> &'static str {
        self.splice.name()
    }

    /// Watches both sockets for the readiness the datapath needs, end i under `tokens[i]`;
    /// `watched`: they are registered already (as a waiting client, or its upstream connection).
    pub(super) fn register(&mut self, registry: &Registry, tokens: [Token; 2], watched: bool) -> io::Result<()> {
        let interest = self.splice.interest();
        for (end, token) in self.ends.iter_mut().zip(tokens) {
            match watched {
                true => registry.reregister(end, token, interest)?,
                false => registry.register(end, token, interest)?,
            }
        }
        Ok(())
    }

    pub(super) fn reregister(&mut self, registry: &Registry, tokens: [Token; 2], interest: Interest) {
        for (end, token) in self.ends.iter_mut().zip(tokens) {
            let _ = registry.reregister(end, token, interest);
        }
    }

    pub(super) fn deregister(&mut self, registry: &Registry) {
        for end in self.ends.iter_mut() {
            let _ = registry.deregister(end);
        }
    }

    /// The ending of a pair idle for `quiet` (`--idle-timeout`): a resetting pair's says which
    /// reset it was waiting to pass on.
    pub(super) fn idle_ending(&mut self, quiet: Duration) -> Ending {
        match self.resetting.take() {
            Some((end, error)) => {
                // A reset that came after the client's FIN reads EPIPE (`end` says so of a plain
                // one); this message replaces it, so it is said here.
                let error = if error.kind() == io::ErrorKind::BrokenPipe {
                    io::Error::from_raw_os_error(libc::ECONNRESET)
                } else {
                    error
                };
                let quiet = quiet.as_secs_f64();
                let why =
                    format!("{error}; its partner's client then took nothing of what it had sent for {quiet:.3}s");
                Ending::Reset { end, error: io::Error::new(error.kind(), format!("{why}, --idle-timeout")) }
            }
            None => Ending::Idle(quiet),
        }
    }

    /// How long no byte has moved either way (received from a client, or acknowledged by one),
    /// as of `now`. Reads both sockets' TCP_INFO; a socket it cannot read counts as active (its
    /// error is the pair's business when it is serviced).
    pub(super) fn idle_for(&mut self, now: Instant) -> Duration {
        // A resetting pair waits only for its partner's client to take what it holds: what that
        // client sends goes nowhere (a client writing 100 bytes every 0.5 s and reading nothing
        // held such a pair past the timeout; a re-check pass).
        match self.idle_counters() {
            Some(seen) if seen == self.active.seen => {}
            seen => self.active = Activity { at: now, seen: seen.unwrap_or([0; 4]) },
        }
        now.saturating_duration_since(self.active.at)
    }

    /// The counters `idle_for` compares: `counters`, or for a resetting pair only its partner's
    /// bytes acknowledged. A takeover's first look compared these with all four and restarted
    /// a resetting pair's clock (a re-check pass: cut 3 s after the takeover, not after the reset).
    fn idle_counters(&self) -> Option<[u64; 4]> {
        let resetting = self.resetting.as_ref().map(|(end, _)| 2 * (1 - end) + 1);
        self.counters().map(|mut c| {
            if let Some(keep) = resetting {
                (0..4).filter(|&i| i != keep).for_each(|i| c[i] = 0);
            }
            c
        })
    }

    /// Both sockets' bytes received from their clients and acknowledged by them (None if a
    /// socket cannot be read).
    fn counters(&self) -> Option<[u64; 4]> {
        let mut seen = [0u64; 4];
        for (i, end) in self.ends.iter().enumerate() {
            let c = sys::tcp_counters(end).ok()?;
            (seen[2 * i], seen[2 * i + 1]) = (c.bytes_received, c.bytes_acked);
        }
        Some(seen)
    }

    /// Where the pair stands, for the log of a pair that does not finish when asked to.
    pub(super) fn describe(&self) -> String {
        let ends: Vec<String> = (0..2)
            .map(|i| match sys::tcp_counters(&self.ends[i]) {
                Ok(c) => {
                    let count = |n: io::Result<u64>| n.map_or("?".to_string(), |n| n.to_string());
                    format!(
                        "{}: {}, {} bytes received, {} acknowledged, {} readable, {} in the send queue, {}",
                        self.addrs[i],
                        sys::tcp_state_name(c.state),
                        c.bytes_received,
                        c.bytes_acked,
                        count(sys::readable_len(&self.ends[i])),
                        count(sys::send_queue_len(&self.ends[i])),
                        if self.shut[i] { "our side finished" } else { "open" }
                    )
                }
                Err(e) => format!("{}: {e}", self.addrs[i]),
            })
            .collect();
        let inside = self.splice.describe().map(|d| format!("; {}: {d}", self.splice.name())).unwrap_or_default();
        // Named by its clients, as its end-of-pair line is (the serial counts every client, paired
        // or not, and appeared nowhere else).
        format!(
            "pair {} <-> {}, live for {:.1?}: {}{inside}",
            self.addrs[0],
            self.addrs[1],
            self.since.elapsed(),
            ends.join("; ")
        )
    }

    /// The pending error of end `end`, which reading clears: the only place SO_ERROR is read.
    fn take_error(&self, end: usize) -> Option<io::Error> {
        SockRef::from(&self.ends[end]).take_error().ok().flatten()
    }

    /// Which end an error from moving direction `dir` came from: the source when a read failed,
    /// the destination when a write did. The call that returned the error has usually cleared
    /// SO_ERROR already; then the end the error closed (TCP CLOSE) names it.
    fn failed_end(&self, dir: usize) -> usize {
        if self.take_error(dir).is_some() {
            return dir;
        }
        let closed = |end: usize| sys::tcp_counters(&self.ends[end]).is_ok_and(|c| c.closed());
        if closed(dir) && !closed(1 - dir) {
            dir
        } else {
            1 - dir
        }
    }

    /// Moves the pair on: both directions, end-of-file propagation, errors. `check_errors`:
    /// look for a reset first (the socket reported an error or a hang-up, or a timer fired).
    pub(super) fn service(&mut self, check_errors: bool) -> Step {
        // A reset is acted on before anything else: no FIN may reach the partner first. What
        // the reset end's client sent before its reset still reaches the partner's client first,
        // as with TCP end to end (a reader gets the bytes sent before a reset, then the reset): a
        // server that writes a reply and resets (or closes with input unread) lost the reply
        // when the pair reset the client at once.
        if check_errors && self.resetting.is_none() {
            for end in 0..2 {
                if let Some(error) = self.take_error(end) {
                    return self.start_reset(end, error);
                }
            }
        }
        if self.resetting.is_some() {
            return self.finish_reset();
        }
        let mut flushing = false;
        let mut again = false;
        // Ends whose SO_ERROR this call has read, one bit each.
        let mut checked: u8 = if check_errors { 0b11 } else { 0 };
        for dir in 0..2 {
            if self.shut[dir] {
                continue;
            }
            let (src, dst) = (&self.ends[dir], &self.ends[1 - dir]);
            let flow = self.splice.advance(dir, src, dst);
            log::trace!("pair {} <-> {} dir {dir}: {flow:?}", self.addrs[0], self.addrs[1]);
            match flow {
                Ok(Flow::Open) => {}
                Ok(Flow::Again) => again = true,
                Ok(Flow::Flushing) => flushing = true,
                Ok(Flow::Finished) => {
                    // The source's end of file is forwarded only if it was not a reset (a reset
                    // socket has reached end of file too, with its error pending).
                    if let Some(error) = self.take_error(dir) {
                        return self.start_reset(dir, error);
                    }
                    checked |= 1 << dir;
                    let _ = dst.shutdown(Shutdown::Write);
                    self.shut[dir] = true;
                }
                // A read can return the source's reset itself (taking SO_ERROR) once its queue
                // is empty, with bytes still in a pipe or a send queue: the same grace applies.
                Err(error) => {
                    let end = self.failed_end(dir);
                    return self.start_reset(end, error);
                }
            }
        }
        if self.shut == [true, true] {
            // The one close that looks orderly: an end whose direction finished earlier may have
            // been reset since (its client closed with our bytes unread), with its event still
            // queued behind this one, so it is looked at once more (a re-check pass: such a pair
            // ended "ended", its partner given a FIN, once SO_ERROR was read on EPOLLERR only).
            for end in 0..2 {
                if checked & (1 << end) == 0 {
                    if let Some(error) = self.take_error(end) {
                        return self.start_reset(end, error);
                    }
                }
            }
            return Step::Ended(Ending::Done);
        }
        let interest = self.splice.interest();
        if let Err(error) = self.splice.settle([&self.ends[0], &self.ends[1]]) {
            return Step::Ended(Ending::Reset { end: 0, error });
        }
        let flush_check = flushing.then(|| self.next_flush_check());
        let now = self.splice.interest();
        Step::Live { flush_check, again, interest: (now != interest).then_some(now) }
    }

    /// End `end` was reset (or failed with `error`): the partner is reset once what `end`
    /// received before has reached the partner's client (or once that client has taken nothing
    /// for `--idle-timeout`: `Server::reset_idle_pairs`). As with TCP end to end, a client that
    /// pauses longer than a moment (a 2 s pause lost 920 KB of a 1 MiB reply when the wait was
    /// 1 s without an acknowledgement; a helper's pass) still gets every byte, then the reset.
    fn start_reset(&mut self, end: usize, error: io::Error) -> Step {
        self.resetting = Some((end, error));
        self.finish_reset()
    }

    /// The reset `start_reset` began: done once delivered, else look again soon.
    fn finish_reset(&mut self) -> Step {
        let Some((end, _)) = &self.resetting else { return Step::Ended(Ending::Drained) };
        let end = *end;
        // What the partner's client sends toward a client that reset can never reach it: it is
        // dropped, so that the partner's client, which may be blocked writing it (an echo
        // server), goes on reading what the reset client sent (a helper's pass: the proxy held
        // the echo back, the upstream stopped reading, and the pair waited for --idle-timeout).
        // Up to `DROP_SLACK`, twice what the partner's client takes, and `DROP_RATE` a second:
        // a partner that only sends (both clients one's, on splice(2)) is held back again, not
        // read at full speed for --idle-timeout (a re-check pass: 90% of a CPU), and one that
        // answers many times what it reads (an echo writing each chunk 5 times stalled until
        // --idle-timeout with 2 times alone; a re-check pass) still gets through.
        if !self.shut[1 - end] && sys::tcp_counters(&self.ends[end]).is_ok_and(|c| c.closed()) {
            let acked = sys::tcp_counters(&self.ends[1 - end]).map_or(0, |c| c.bytes_acked);
            let (began, since, dropped) = *self.dropping.get_or_insert((Instant::now(), acked, 0));
            let by_time = (DROP_RATE as f64 * began.elapsed().as_secs_f64()) as u64;
            let room = (DROP_SLACK + 2 * acked.saturating_sub(since) + by_time).saturating_sub(dropped);
            if room > 0 {
                match self.splice.discard(1 - end, &self.ends[1 - end], room) {
                    Ok(n) => self.dropping = Some((began, since, dropped + n)),
                    Err(e) => log::debug!("pair {}: dropping what goes to a reset client: {e}", self.serial),
                }
            }
        }
        // A direction that finished before its source's reset (a FIN, then a reset) has handed
        // every byte to the destination's send queue, not to its client: the partner's reset
        // would throw that queue away (a re-check pass: 127,973 of 1,000,000 bytes through
        // splice(2)), so it waits until the queue is empty, as `flush_reset` does.
        // A partner its own client reset (CLOSE) has lost its queue already, and nothing more
        // can reach that client: nothing to wait for. Its SIOCOUTQ still counts what the reset
        // threw away, so a wait for an empty queue held such a pair (both clients gone) until
        // --idle-timeout (a re-check pass: held for the whole grace; a bounds pass: 700 clients
        // that each sent a byte and closed held 1,024 descriptors for 600 s).
        let partner = &self.ends[1 - end];
        let delivered = sys::tcp_counters(partner).is_ok_and(|c| c.closed())
            || if self.shut[end] {
                sys::send_queue_len(partner).map_or(true, |n| n == 0)
            } else {
                self.splice.flush_reset(end, &self.ends[end], partner)
            };
        if delivered {
            let (end, error, ..) = self.resetting.take().expect("resetting");
            return Step::Ended(Ending::Reset { end, error });
        }
        Step::Live { flush_check: Some(self.next_flush_check()), again: false, interest: None }
    }

    /// How long until the next check of a flush or a reset's delivery: twice the last wait, up
    /// to 100 ms while bytes move, and while none has moved since the last check up to a tenth
    /// of how long none has (at most `FLUSH_CHECK_STALLED_MAX`).
    fn next_flush_check(&mut self) -> Duration {
        let now = Instant::now();
        let max = match (self.counters(), self.flush_seen) {
            (Some(seen), Some((last, since))) if seen == last => {
                ((now - since) / 10).clamp(FLUSH_CHECK_MAX, FLUSH_CHECK_STALLED_MAX)
            }
            (seen, _) => {
                self.flush_seen = seen.map(|c| (c, now));
                FLUSH_CHECK_MAX
            }
        };
        let delay = self.flush_delay.min(max);
        self.flush_delay = (delay * 2).min(max);
        delay
    }

    /// Ends the pair: takes it out of the datapath and sets how its sockets close (FINs only
    /// when both directions finished, resets otherwise). Deregister it first.
    pub(super) fn end(mut self, ending: Ending) -> Ended {
        let cut = matches!(ending, Ending::Drained | Ending::CutBySignal(_) | Ending::Idle(_) | Ending::Reset { .. });
        // Which ends their own client reset (before ours: after it every end is CLOSE).
        let reset_by_client = self.ends.each_ref().map(|e| sys::tcp_counters(e).is_ok_and(|c| c.closed()));
        let moved = if cut {
            // Cut or reset: out of the datapath first, so that nothing moves after it is counted,
            // and what the reset throws away from a send queue is not counted as delivered.
            self.splice.release();
            // Then both clients are reset, and counted after: a send queue whose client reads
            // goes on sending until the reset, so a count taken before it came out short (a
            // drain cut logged 333 KB less than its client had read). Where the kernel refuses
            // (no CAP_NET_ADMIN), the count comes just before the close that resets them.
            self.ends.iter().for_each(reset_on_close);
            let aborted = self.ends.each_ref().map(sys::abort);
            for e in aborted.iter().filter_map(|r| r.as_ref().err()) {
                log::debug!("pair {}: counting before the reset: {e}", self.serial);
                // Once a process: an operator whose service blocks netlink (systemd's
                // RestrictAddressFamilies without AF_NETLINK, as the shipped units had: an
                // operations pass) or lacks CAP_NET_ADMIN gets the less exact count in silence.
                // Only for what stops every abort (not a socket its client closed meanwhile).
                let refused = matches!(
                    e.raw_os_error(),
                    Some(libc::EPERM | libc::EACCES | libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT | libc::EOPNOTSUPP)
                );
                static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
                if refused && !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    log::warn!(
                        "cannot reset the clients of a cut pair before counting it ({e}): cut pairs are counted just \
                         before their reset, and a client still reading may take more than its line says (grant \
                         CAP_NET_ADMIN; under systemd, allow AF_NETLINK in RestrictAddressFamilies)"
                    );
                }
            }
            [
                self.splice.moved_at_cut(0, &self.ends[0], &self.ends[1], self.shut[0], reset_by_client[1]),
                self.splice.moved_at_cut(1, &self.ends[1], &self.ends[0], self.shut[1], reset_by_client[0]),
            ]
        } else {
            [
                self.splice.moved(0, &self.ends[0], &self.ends[1], self.shut[0]),
                self.splice.moved(1, &self.ends[1], &self.ends[0], self.shut[1]),
            ]
        };
        self.splice.release();
        let how = match ending {
            Ending::Done => {
                // Both directions finished: the only close that may look like an orderly one.
                self.ends.iter().for_each(close_gracefully);
                "ended".to_string()
            }
            // Its streams were cut: they stay armed to reset (see `Pair::new`).
            Ending::Drained => "reset at the drain timeout".to_string(),
            Ending::CutBySignal("SIGQUIT") => "reset: SIGQUIT stops at once".to_string(),
            Ending::CutBySignal(signal) => format!("reset: {signal} while draining"),
            // At least: the last byte moved at most one look (a tenth of the timeout) earlier.
            Ending::Idle(idle) => format!("reset: idle for at least {:.3}s (--idle-timeout)", idle.as_secs_f64()),
            Ending::Reset { end, error } => {
                // What one end's client did to its connection, the other's client sees too (both
                // were reset above). A write to a socket whose client reset fails with EPIPE once
                // another call took the reset's error: name what the client did, not what our
                // write met.
                let by_client = error.kind() == io::ErrorKind::BrokenPipe && reset_by_client[end];
                let error = if by_client { io::Error::from_raw_os_error(libc::ECONNRESET) } else { error };
                format!("reset ({}: {error})", self.addrs[end])
            }
        };
        Ended {
            addrs: self.addrs,
            how,
            lasted: self.since.elapsed(),
            moved,
            datapath: self.splice.name(),
            upstream_local: self.upstream_local,
            // A cut pair's close now: where the reset above was refused, it is that reset.
            _ends: (!cut).then_some(self.ends),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Pairs over real loopback TCP connections, spliced by the userspace datapath (the kernel
    //! datapath needs BPF privileges; the integration tests run both).
    use super::*;
    use crate::datapath::{userspace::UserspaceDatapath, Datapath};
    use std::{
        io::{ErrorKind, Read, Write},
        net::{TcpListener, TcpStream as StdStream},
        thread,
    };

    /// Two connected loopback sockets: the client's end (blocking) and the relay's end.
    fn connection(listener: &TcpListener) -> (StdStream, TcpStream) {
        let client = StdStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (client, TcpStream::from_std(ours))
    }

    /// A pair between two clients, `a` on end 0 and `b` on end 1.
    fn pair() -> (Pair, StdStream, StdStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        // As `relay_cmd::open` arms its listener: a pair's ends come armed (`Pair::new`).
        crate::sys::arm_for_clients(&listener).unwrap();
        let (a, a_end) = connection(&listener);
        let (b, b_end) = connection(&listener);
        let splice = UserspaceDatapath.splice([&a_end, &b_end], [0, 0]).unwrap();
        let addrs = [a.local_addr().unwrap(), b.local_addr().unwrap()];
        (Pair::new([a_end, b_end], addrs, splice, 1, None, [0, 0], [0, 0]), a, b)
    }

    #[test]
    fn a_pair_has_one_flush_timer_pending_at_a_time() {
        let (mut pair, _a, _b) = pair();
        let now = Instant::now();
        let (soon, later) = (now + Duration::from_millis(10), now + Duration::from_millis(50));
        assert!(pair.flush_timer_wanted(later));
        // Each service asks again: no second timer while one is due no later.
        assert!(!pair.flush_timer_wanted(later));
        assert!(!pair.flush_timer_wanted(now + Duration::from_secs(1)));
        // An earlier one replaces it; the later one, when it fires, is stale.
        assert!(pair.flush_timer_wanted(soon));
        assert!(!pair.flush_timer_fired(later));
        assert!(pair.flush_timer_fired(soon));
        assert!(!pair.flush_timer_fired(soon), "fired once");
        assert!(pair.flush_timer_wanted(later), "none pending: a new one is set");
    }

    /// Services the pair (as readiness events would) until it ends or `until` says stop.
    fn run(pair: &mut Pair, check_errors: bool, until: impl Fn(&Pair) -> bool) -> Option<Ending> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Step::Ended(ending) = pair.service(check_errors) {
                return Some(ending);
            }
            if until(pair) {
                return None;
            }
            thread::sleep(Duration::from_millis(1));
        }
        panic!("the pair did not move on within 5 s");
    }

    /// Bytes the pair delivered from end `dir` so far.
    fn moved(pair: &Pair, dir: usize) -> u64 {
        pair.splice.moved(dir, &pair.ends[dir], &pair.ends[1 - dir], false)
    }

    fn read_to_end(s: &mut StdStream) -> io::Result<Vec<u8>> {
        let mut got = Vec::new();
        s.read_to_end(&mut got).map(|_| got)
    }

    fn is_reset<T: std::fmt::Debug>(r: io::Result<T>) -> bool {
        matches!(r, Err(e) if e.kind() == ErrorKind::ConnectionReset)
    }

    #[test]
    fn a_flush_that_stalls_is_looked_at_less_often_the_longer_it_stalls() {
        let (mut pair, mut a, mut b) = pair();
        let waits: Vec<Duration> = (0..10).map(|_| pair.next_flush_check()).collect();
        assert_eq!(waits[0], FLUSH_CHECK_FIRST);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
        assert_eq!(waits[9], FLUSH_CHECK_MAX, "stalled a moment only: {waits:?}");
        // Stalled for 5 s: a tenth of it; for 20 s: 1 s at most.
        let stalled = |pair: &mut Pair, ago: Duration| {
            let (seen, _) = pair.flush_seen.expect("seen");
            pair.flush_seen = Some((seen, Instant::now() - ago));
            (0..12).map(|_| pair.next_flush_check()).max().unwrap()
        };
        let tenth = stalled(&mut pair, Duration::from_secs(5));
        assert!(tenth >= Duration::from_millis(490) && tenth <= Duration::from_millis(510), "{tenth:?}");
        assert_eq!(stalled(&mut pair, Duration::from_secs(20)), Duration::from_secs(1));
        // A byte moves (a's client sends, b's acknowledges): the next wait is 100 ms at most.
        a.write_all(b"x").unwrap();
        run(&mut pair, false, |p| moved(p, 0) == 1);
        let mut buf = [0u8; 1];
        b.read_exact(&mut buf).unwrap();
        thread::sleep(Duration::from_millis(50));
        assert_eq!(pair.next_flush_check(), FLUSH_CHECK_MAX);
    }

    #[test]
    fn each_eof_is_forwarded_after_its_bytes_and_both_make_the_pair_done() {
        let (mut pair, mut a, mut b) = pair();
        a.write_all(b"from a").unwrap();
        a.shutdown(Shutdown::Write).unwrap();
        assert!(run(&mut pair, false, |p| p.shut[0]).is_none(), "one direction finished, the pair lives");
        assert_eq!(read_to_end(&mut b).unwrap(), b"from a", "b reads a's bytes, then a's EOF");
        // The other way stays open after the half-close.
        b.write_all(b"and from b").unwrap();
        run(&mut pair, false, |p| moved(p, 1) == 10);
        let mut buf = [0u8; 10];
        a.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"and from b");
        b.shutdown(Shutdown::Write).unwrap();
        let ending = run(&mut pair, false, |_| false).expect("ended");
        assert!(matches!(ending, Ending::Done), "{ending:?}");
        let ended = pair.end(ending);
        assert_eq!((ended.how.as_str(), ended.moved), ("ended", [6, 10]));
        assert_eq!(ended.datapath, "userspace");
        drop(ended);
        assert_eq!(read_to_end(&mut a).unwrap(), b"", "a sees b's EOF and an orderly close");
        assert_eq!(read_to_end(&mut b).unwrap(), b"", "so does b");
    }

    #[test]
    fn a_reset_on_one_end_resets_the_other_and_the_log_names_it() {
        // Seen by its pending error (an error or hang-up event), or by a failed read or write,
        // which clears that error; the partner may be sending at the time.
        for (check_errors, partner_sends) in [(true, false), (false, false), (false, true)] {
            for who in 0..2 {
                let (mut pair, a, b) = pair();
                let (mut gone, mut other) = if who == 0 { (a, b) } else { (b, a) };
                gone.write_all(b"hello").unwrap();
                run(&mut pair, check_errors, |p| moved(p, who) == 5);
                SockRef::from(&gone).set_linger(Some(Duration::ZERO)).unwrap();
                drop(gone); // RST
                thread::sleep(Duration::from_millis(20));
                if partner_sends {
                    other.write_all(b"to nobody").unwrap();
                    thread::sleep(Duration::from_millis(20));
                }
                let ending = run(&mut pair, check_errors, |_| false).expect("ended");
                let Ending::Reset { end, .. } = &ending else { panic!("{ending:?}") };
                assert_eq!(*end, who, "the reset end (check_errors {check_errors}, partner_sends {partner_sends})");
                drop(pair.end(ending));
                let mut buf = [0u8; 5];
                other.read_exact(&mut buf).unwrap();
                assert!(is_reset(read_to_end(&mut other)), "the partner is reset too, after the bytes sent before");
            }
        }
    }

    #[test]
    fn a_source_reset_after_its_fin_is_a_reset_not_an_eof() {
        let (mut pair, mut a, mut b) = pair();
        a.write_all(b"partial").unwrap();
        a.shutdown(Shutdown::Write).unwrap();
        SockRef::from(&a).set_linger(Some(Duration::ZERO)).unwrap();
        drop(a); // FIN, then RST
        thread::sleep(Duration::from_millis(20));
        let ending = run(&mut pair, false, |_| false).expect("ended");
        assert!(matches!(ending, Ending::Reset { end: 0, .. }), "{ending:?}");
        drop(pair.end(ending));
        let mut buf = [0u8; 7];
        b.read_exact(&mut buf).unwrap();
        assert!(is_reset(read_to_end(&mut b)), "b reads the bytes, then a reset, never an EOF");
    }

    #[test]
    fn a_drained_pair_resets_both_clients_and_counts_what_was_delivered() {
        let (mut pair, mut a, mut b) = pair();
        a.write_all(b"12345").unwrap();
        run(&mut pair, false, |p| moved(p, 0) == 5);
        let ended = pair.end(Ending::Drained);
        assert_eq!((ended.how.as_str(), ended.moved), ("reset at the drain timeout", [5, 0]));
        drop(ended);
        let mut buf = [0u8; 5];
        b.read_exact(&mut buf).unwrap();
        assert!(is_reset(read_to_end(&mut b)));
        assert!(is_reset(read_to_end(&mut a)));
    }
}
