//! A client that has no partner yet: it is sending its token line (`--pair token`), waiting for
//! a partner, or (`proxy`) waiting for its upstream connection. Its bytes are only ever peeked
//! here: the datapath discards the token line later (reading part of an skb here would stall the
//! kernel datapath, KERNEL-NOTES).
use super::{connector::Connecting, pair::reset_on_close};
use crate::{
    pairing::{parse_token_line, TokenLine, MAX_TOKEN},
    sys,
};
use mio::net::TcpStream;
use std::{io, net::SocketAddr, time::Instant};

pub(super) struct Pending {
    pub(super) stream: TcpStream,
    pub(super) addr: SocketAddr,
    pub(super) serial: u64,
    /// The key it pairs on: the token, or "" in order mode and for `proxy`; None until the token
    /// line is read.
    pub(super) key: Option<String>,
    /// Bytes at the head of its queue that are not to be forwarded (its token line).
    pub(super) skip: u32,
    /// `proxy`: the upstream connection being made for it.
    pub(super) upstream: Option<Connecting>,
    /// When it came (its `--pair-timeout` runs from here, across a takeover too).
    pub(super) admitted: Instant,
    /// Handed over by the process this one took over from: it keeps its place even beyond this
    /// process's `--max-pending`, which holds back new clients only.
    pub(super) handed_over: bool,
}

/// What a look at a pending client found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Look {
    /// Nothing new: it keeps waiting.
    Waiting,
    /// Its token line is complete: `key` and `skip` are set, it can be offered a partner.
    Identified,
    /// It left, or broke the rules: close it, for this reason.
    Gone(String),
    /// `relay`: it sent bytes and then reset its connection while it waited for a partner: it
    /// takes none (`Server::let_go_after_reset`).
    ResetAfterSending,
}

/// Why a waiting client that sent bytes and then reset is let go.
pub(super) const RESET_AFTER_SENDING: &str = "reset before it was paired (its bytes go nowhere)";

impl Pending {
    pub(super) fn new(stream: TcpStream, addr: SocketAddr, serial: u64, key: Option<String>) -> Pending {
        Pending { stream, addr, serial, key, skip: 0, upstream: None, admitted: Instant::now(), handed_over: false }
    }

    /// Looks at the client after a readiness event: reads its token line if it has none yet,
    /// or notices that it left.
    pub(super) fn look(&mut self) -> Look {
        let mut buf = [0u8; MAX_TOKEN + 2];
        let peeked = sys::peek(&self.stream, &mut buf);
        self.look_at(peeked, &buf)
    }

    /// `look`, given what a peek found. More bytes and a FIN may have come since: the TCP
    /// counters, read after it, are what tells a client that left from one that went on.
    fn look_at(&mut self, peeked: io::Result<usize>, buf: &[u8]) -> Look {
        if self.key.is_some() {
            return match self.gone_after(peeked) {
                Some(why) => Look::Gone(why),
                // A peek returns the queued bytes before the reset's error: the state says it.
                None if self.reset_after_sending() => Look::ResetAfterSending,
                None => Look::Waiting,
            };
        }
        let n = match peeked {
            Ok(0) => return Look::Gone("closed before sending a token line".into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Look::Waiting,
            Err(e) => return Look::Gone(e.to_string()),
        };
        match parse_token_line(&buf[..n]) {
            // A reset leaves the state CLOSE, a FIN CLOSE_WAIT: said as the client did it.
            TokenLine::Incomplete if self.closed_after(n) => Look::Gone(
                if sys::tcp_counters(&self.stream).is_ok_and(|c| c.closed()) {
                    "reset before ending its token line"
                } else {
                    "closed before ending its token line"
                }
                .into(),
            ),
            TokenLine::Incomplete if n < buf.len() && self.peek_stops_at_urgent_mark(n) => Look::Gone(
                "bad token line: it has an urgent byte (MSG_OOB) in it, which a peek cannot read past (send the line \
                 without one)"
                    .into(),
            ),
            TokenLine::Incomplete => Look::Waiting,
            TokenLine::Malformed(why) => Look::Gone(format!("bad token line: {why}")),
            TokenLine::Complete { token, line_len } => {
                self.skip = line_len as u32;
                self.key = Some(token);
                Look::Identified
            }
        }
    }

    /// A peek that found `n` bytes and no whole line stopped at an urgent mark (MSG_PEEK stops
    /// there once it has copied a byte, every time: KERNEL-NOTES): more than `n` bytes are
    /// queued, and a second peek, made after they were counted, still finds `n`. Such a client
    /// waited out `--pair-timeout` and was told it sent no token line (a re-check pass).
    fn peek_stops_at_urgent_mark(&self, n: usize) -> bool {
        let mut again = [0u8; MAX_TOKEN + 2];
        sys::readable_len(&self.stream).is_ok_and(|queued| queued > n as u64)
            && sys::peek(&self.stream, &mut again).is_ok_and(|m| m == n)
    }

    /// `gone`, or reset after sending bytes (`reset_after_sending`): either way no partner for it.
    pub(super) fn gone_or_reset(&self) -> Option<String> {
        self.gone().or_else(|| self.reset_after_sending().then(|| RESET_AFTER_SENDING.into()))
    }

    /// A relay's waiting client that sent bytes and then reset (its TCP state is CLOSE; a peek
    /// still returns its bytes).
    pub(super) fn reset_after_sending(&self) -> bool {
        self.upstream.is_none() && sys::tcp_counters(&self.stream).is_ok_and(|c| c.closed())
    }

    /// Why a waiting client is gone, if it is: checked before it takes a partner, since the loop
    /// may not have seen its close or reset yet.
    pub(super) fn gone(&self) -> Option<String> {
        let mut buf = [0u8; MAX_TOKEN + 2];
        self.gone_after(sys::peek(&self.stream, &mut buf))
    }

    /// A relay's waiting client is gone when it closed without sending anything, or its
    /// connection failed. One that sent bytes and then shut down its write side still waits: its
    /// bytes and its EOF will reach the partner. A proxy's client that shut down its write side
    /// without sending anything waits for its upstream connection too: it may be half-closed
    /// and waiting for what the upstream says first (a banner), which an EOF cannot tell from a
    /// close; the upstream then gets the EOF, as from any TCP proxy.
    fn gone_after(&self, peeked: io::Result<usize>) -> Option<String> {
        match peeked {
            Ok(n)
                if self.upstream.is_none()
                    && n <= self.skip as usize
                    && (n == 0 || self.closed_after(self.skip as usize)) =>
            {
                Some("left before a partner came".into())
            }
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                // A client that reset while its upstream connection was being made resets that
                // connection too, as it would once spliced.
                if let Some(c) = &self.upstream {
                    reset_on_close(&c.stream);
                }
                Some(e.to_string())
            }
            _ => None,
        }
    }

    /// Its FIN has come, and no byte beyond the first `n`: read from the counters after a peek of
    /// at most `n` bytes, whose answer the bytes and FIN that came since would make a lie (a soak
    /// saw 5 clients in 10,000 that sent their token line, bytes and a FIN reset as "left").
    fn closed_after(&self, n: usize) -> bool {
        sys::tcp_counters(&self.stream).is_ok_and(|c| c.fin_received() && c.payload_received() <= n as u64)
    }

    /// Why it is closed at `--pair-timeout`.
    pub(super) fn timed_out(&self) -> &'static str {
        if self.key.is_some() {
            "no partner came within --pair-timeout"
        } else {
            "no token line within --pair-timeout"
        }
    }
}

#[cfg(test)]
mod tests {
    //! Clients over loopback TCP, looked at as the loop does after a readiness event.
    use super::*;
    use std::{
        io::Write,
        net::{Shutdown, TcpListener, TcpStream as StdStream},
        thread,
        time::Duration,
    };

    /// A connected client and the pending entry for its accepted end (`key` as `admit` sets it).
    fn client(key: Option<String>) -> (StdStream, Pending) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = StdStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, addr) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        (client, Pending::new(TcpStream::from_std(ours), addr, 1, key))
    }

    /// Looks until the answer is not `Waiting` (bytes take a moment to cross loopback).
    fn look(p: &mut Pending) -> Look {
        for _ in 0..100 {
            match p.look() {
                Look::Waiting => thread::sleep(Duration::from_millis(5)),
                other => return other,
            }
        }
        Look::Waiting
    }

    #[test]
    fn a_token_line_is_peeked_and_stays_queued_for_the_datapath_to_discard() {
        let (mut c, mut p) = client(None);
        c.write_all(b"tok").unwrap();
        thread::sleep(Duration::from_millis(20));
        assert_eq!(p.look(), Look::Waiting, "an incomplete line waits");
        c.write_all(b"en\r\nhello").unwrap();
        assert_eq!(look(&mut p), Look::Identified);
        assert_eq!((p.key.as_deref(), p.skip), (Some("token"), 7));
        let mut buf = [0u8; 16];
        assert_eq!(sys::peek(&p.stream, &mut buf).unwrap(), 12, "nothing was read");
        assert_eq!(p.gone(), None);
        assert_eq!(p.timed_out(), "no partner came within --pair-timeout");
    }

    #[test]
    fn bad_or_unfinished_token_lines_and_silent_leavers_are_gone() {
        let (mut c, mut p) = client(None);
        c.write_all(b"a\x01b\n").unwrap();
        assert_eq!(look(&mut p), Look::Gone("bad token line: token has bytes that are not printable ASCII".into()));

        let (mut c, mut p) = client(None);
        c.write_all(b"half").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(look(&mut p), Look::Gone("closed before ending its token line".into()));

        let (mut c, mut p) = client(None);
        c.write_all(b"half").unwrap();
        socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
        drop(c);
        assert_eq!(look(&mut p), Look::Gone("reset before ending its token line".into()));

        let (c, mut p) = client(None);
        assert_eq!(p.timed_out(), "no token line within --pair-timeout");
        drop(c);
        assert_eq!(look(&mut p), Look::Gone("closed before sending a token line".into()));
    }

    #[test]
    fn a_waiting_client_that_sent_bytes_then_half_closed_still_waits() {
        let (mut c, mut p) = client(Some(String::new()));
        c.write_all(b"bytes for the partner").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        thread::sleep(Duration::from_millis(20));
        assert_eq!(p.look(), Look::Waiting);
        assert_eq!(p.gone(), None, "its bytes and its EOF will reach the partner");

        let (c, mut p) = client(Some(String::new()));
        drop(c);
        assert_eq!(look(&mut p), Look::Gone("left before a partner came".into()));
    }

    /// The loop peeks, then reads the TCP counters: bytes and a FIN that arrive in between made
    /// a client that went on look like one that left (a soak: 5 in 10,000 token clients reset).
    /// Given the stale peek, it still waits.
    #[test]
    fn bytes_and_a_fin_that_come_after_the_peek_are_not_a_departure() {
        let (mut c, mut p) = client(None);
        c.write_all(b"token\n").unwrap();
        assert_eq!(look(&mut p), Look::Identified);
        c.write_all(b"bytes for the partner").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        thread::sleep(Duration::from_millis(20));
        assert_eq!(p.look_at(Ok(6), b"token\n"), Look::Waiting, "the peek saw the line alone");
        assert_eq!(p.look(), Look::Waiting);

        let (mut c, mut p) = client(None);
        c.write_all(b"tok").unwrap();
        c.write_all(b"en\nbytes").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        thread::sleep(Duration::from_millis(20));
        assert_eq!(p.look_at(Ok(3), b"tok"), Look::Waiting, "the peek saw part of the line");
        assert_eq!(p.look(), Look::Identified);
    }
}
