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
use std::{io, net::SocketAddr};

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
}

impl Pending {
    pub(super) fn new(stream: TcpStream, addr: SocketAddr, serial: u64, key: Option<String>) -> Pending {
        Pending { stream, addr, serial, key, skip: 0, upstream: None }
    }

    /// Looks at the client after a readiness event: reads its token line if it has none yet,
    /// or notices that it left.
    pub(super) fn look(&mut self) -> Look {
        let mut buf = [0u8; MAX_TOKEN + 2];
        let peeked = sys::peek(&self.stream, &mut buf);
        if self.key.is_some() {
            return match self.gone_after(peeked) {
                Some(why) => Look::Gone(why),
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
            TokenLine::Incomplete if sys::tcp_counters(&self.stream).is_ok_and(|c| c.fin_received()) => {
                Look::Gone("closed before ending its token line".into())
            }
            TokenLine::Incomplete => Look::Waiting,
            TokenLine::Malformed(why) => Look::Gone(format!("bad token line: {why}")),
            TokenLine::Complete { token, line_len } => {
                self.skip = line_len as u32;
                self.key = Some(token);
                Look::Identified
            }
        }
    }

    /// Why a waiting client is gone, if it is: checked before it takes a partner, since the loop
    /// may not have seen its close or reset yet.
    pub(super) fn gone(&self) -> Option<String> {
        let mut buf = [0u8; MAX_TOKEN + 2];
        self.gone_after(sys::peek(&self.stream, &mut buf))
    }

    /// A waiting client is gone when it closed without sending anything, or its connection
    /// failed. One that sent bytes and then shut down its write side still waits: its bytes and
    /// its EOF will reach the partner.
    fn gone_after(&self, peeked: io::Result<usize>) -> Option<String> {
        match peeked {
            Ok(n)
                if n <= self.skip as usize
                    && (n == 0 || sys::tcp_counters(&self.stream).is_ok_and(|c| c.fin_received())) =>
            {
                Some(match self.upstream {
                    Some(_) => "left before its upstream connection was made".into(),
                    None => "left before a partner came".into(),
                })
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

    /// Why it is closed at `--pair-timeout`.
    pub(super) fn timed_out(&self) -> &'static str {
        if self.key.is_some() {
            "no partner came within --pair-timeout"
        } else {
            "no token line within --pair-timeout"
        }
    }
}
