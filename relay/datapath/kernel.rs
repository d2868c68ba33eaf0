//! The kernel datapath: both sockets of a pair join a SOCKHASH whose sk_skb stream parser and
//! verdict (probes/relay.bpf.c) redirect every skb to the peer's egress. User space never reads
//! payload; it only fills the maps and propagates end of file, which the kernel does not.
use super::{userspace::UserspaceDatapath, Datapath, Flow, Splice, SpliceError};
use crate::{
    abi::relay_stat,
    bpf,
    error::Error,
    sys::{self, TcpCounters},
};
use aya::{
    maps::{HashMap, MapData, MapError, PerCpuArray, SockHash},
    programs::SkSkb,
    Ebpf,
};
use mio::{net::TcpStream, Interest};
use std::{cell::RefCell, io, os::fd::AsRawFd, rc::Rc};

/// max_entries of the socket maps (probes/skrelay.h).
const MAX_SOCKETS: u32 = crate::abi::MAX_SOCKETS;
/// Send buffer of a spliced socket (the kernel doubles it). When a redirected skb finds its
/// egress socket's send buffer full, the kernel's psock backlog retries one jiffy later (4 ms at
/// HZ=250) and a write-space wake-up cannot bring that retry forward: with the default 4 MiB
/// (tcp_wmem max) the egress drained its buffer in ~1.5 ms and then sat idle, capping a 1 GiB
/// transfer at ~5 Gbit/s. 8 MiB (16 MiB effective) measured 13 Gbit/s; 16 and 32 MiB no better.
/// Memory is only used while bytes are in flight.
const SPLICED_SNDBUF: libc::c_int = 8 << 20;

struct RelayMaps {
    /// Carries the parser and verdict: a socket in here has its bytes redirected.
    socks: SockHash<MapData, u64>,
    /// Program-less redirect targets, filled before `socks` so no verdict finds its peer missing.
    targets: SockHash<MapData, u64>,
    /// cookie -> the peer's cookie.
    peers: HashMap<MapData, u64, u64>,
}

pub struct KernelDatapath {
    maps: Rc<RefCell<RelayMaps>>,
    /// Splices token pairs until their queues are drained (see `Handover`).
    fallback: UserspaceDatapath,
    /// Bytes a pair moves through splice(2) before it joins the maps (0: at once).
    join_after: u64,
    stats: PerCpuArray<MapData, u64>,
    /// The full map was reported (once: every pair after it would say the same).
    warned_map_full: bool,
    /// Keeps the programs loaded and attached.
    _bpf: Ebpf,
}

impl KernelDatapath {
    /// `join_after`: bytes a pair moves through splice(2) before it joins the maps (0: at once).
    pub fn load(join_after: u64) -> Result<Self, Error> {
        let mut bpf = bpf::load(bpf::objects::RELAY)?;
        let map = |bpf: &mut Ebpf, name: &str| {
            bpf.take_map(name).ok_or_else(|| Error::BpfUnavailable {
                reason: format!("the embedded object has no map `{name}`"),
                fix: "rebuild skrelay".into(),
            })
        };
        let broken = |e: MapError| bpf::unavailable("open the relay maps", &e);
        let socks: SockHash<MapData, u64> = SockHash::try_from(map(&mut bpf, "socks")?).map_err(broken)?;
        let targets: SockHash<MapData, u64> = SockHash::try_from(map(&mut bpf, "targets")?).map_err(broken)?;
        let peers: HashMap<MapData, u64, u64> = HashMap::try_from(map(&mut bpf, "peers")?).map_err(broken)?;
        let stats: PerCpuArray<MapData, u64> = PerCpuArray::try_from(map(&mut bpf, "relay_stats")?).map_err(broken)?;
        let socks_fd = socks.fd().try_clone().map_err(|e| bpf::unavailable("open the relay maps", &e))?;
        for name in ["relay_parser", "relay_verdict"] {
            let prog: &mut SkSkb = bpf.program_mut(name).and_then(|p| p.try_into().ok()).ok_or_else(|| {
                Error::BpfUnavailable { reason: format!("no program `{name}`"), fix: "rebuild skrelay".into() }
            })?;
            prog.load().map_err(|e| bpf::unavailable("load the sk_skb programs", &e))?;
            prog.attach(&socks_fd).map_err(|e| bpf::unavailable("attach the sk_skb programs", &e))?;
        }
        Ok(KernelDatapath {
            maps: Rc::new(RefCell::new(RelayMaps { socks, targets, peers })),
            fallback: UserspaceDatapath,
            join_after,
            stats,
            warned_map_full: false,
            _bpf: bpf,
        })
    }

    fn stat(&self, idx: u32) -> u64 {
        self.stats.get(&idx, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }
}

/// The kernel moves a pair's bytes in its worker threads (the socket's psock backlog). With
/// `kernel.sched_autogroup_enabled=1` (each session its own scheduling group), two CPU-bound
/// processes starved every worker thread of a 2-CPU 6.18 machine for 5-10 s at a time (measured
/// with workqueue tracepoints), and kernel pairs stalled for as long; with 0 there was no such
/// wait. Says so once, with the fix; splice(2) pairs are unaffected.
pub fn warn_if_workers_can_starve() {
    let autogroup = std::fs::read_to_string("/proc/sys/kernel/sched_autogroup_enabled");
    if autogroup.is_ok_and(|v| v.trim() == "1") {
        log::warn!(
            "kernel.sched_autogroup_enabled=1: CPU-bound processes can starve the kernel's \
             worker threads, which move the kernel datapath's bytes, and stall its pairs for seconds \
             (run `sysctl -w kernel.sched_autogroup_enabled=0`, or use --datapath userspace on a busy machine)"
        );
    }
}

impl Datapath for KernelDatapath {
    fn name(&self) -> &'static str {
        "kernel"
    }

    fn splice(&mut self, ends: [&TcpStream; 2], skip: [u32; 2]) -> Result<Box<dyn Splice>, SpliceError> {
        let acked_base = [sys::tcp_counters(ends[0])?.bytes_acked, sys::tcp_counters(ends[1])?.bytes_acked];
        let mut kernel = KernelSplice {
            maps: self.maps.clone(),
            cookies: [0; 2], // read when the pair joins: most short pairs never do
            acked_base,
            consumed: skip.map(u64::from),
            joined: Joined::default(),
            kicked_error: [None, None],
        };
        if skip == [0, 0] && self.join_after == 0 {
            return match kernel.join(ends) {
                Ok(()) => Ok(Box::new(kernel)),
                // Same semantics through splice(2): nothing of such a pair is lost.
                Err(SpliceError::NotEstablished) => {
                    let user = self.fallback.splice(ends, skip)?;
                    Ok(Box::new(Handover {
                        user,
                        kernel,
                        joined: false,
                        after: 0,
                        stays: Some(HALF_CLOSED),
                        half_closed: true,
                        user_moved: [0; 2],
                    }))
                }
                // The same semantics through splice(2), said once: the map stays full for a while.
                Err(SpliceError::MapFull(n)) => {
                    if !self.warned_map_full {
                        log::warn!(
                            "the kernel socket map is full ({n} sockets): further pairs are spliced in user space"
                        );
                        self.warned_map_full = true;
                    }
                    self.fallback.splice(ends, skip)
                }
                Err(e) => Err(e),
            };
        }
        // A pair starts on splice(2) and joins the maps once both queues are drained:
        // - with a token line, which user space must read; a socket whose queue holds a partly
        //   read skb never has the rest forwarded by the sockmap (its stream parser is handed the
        //   whole skb's length), so splice(2) discards the line and moves whatever followed it;
        // - until `join_after` bytes have passed: joining and leaving the maps costs more than a
        //   short connection's splicing (see BENCHMARKS.md, connections per second).
        let mut user = self.fallback.splice(ends, skip)?;
        user.settle(ends)?;
        let after = if skip == [0, 0] { self.join_after } else { 0 };
        Ok(Box::new(Handover {
            user,
            kernel,
            joined: false,
            after,
            stays: None,
            half_closed: false,
            user_moved: [0; 2],
        }))
    }

    fn summary(&self) -> Option<String> {
        Some(format!(
            "kernel datapath: {} skbs ({} bytes) redirected, {} passed without a peer, {} dropped",
            self.stat(relay_stat::REDIRECTED),
            self.stat(relay_stat::BYTES),
            self.stat(relay_stat::NO_PEER),
            self.stat(relay_stat::DROPPED),
        ))
    }
}

/// Which map entries a pair holds, so a failed or finished pair removes exactly those.
#[derive(Default)]
struct Joined {
    targets: [bool; 2],
    peers: [bool; 2],
    socks: [bool; 2],
}

struct KernelSplice {
    maps: Rc<RefCell<RelayMaps>>,
    cookies: [u64; 2],
    /// bytes_acked of each socket when the pair formed (an active open counts its SYN).
    acked_base: [u64; 2],
    /// Token-line bytes received on each socket that are discarded, not relayed.
    consumed: [u64; 2],
    joined: Joined,
    /// A socket error the kick read (reading it clears SO_ERROR): reported by `advance`.
    kicked_error: [Option<io::Error>; 2],
}

fn map_full_or_io(e: MapError) -> SpliceError {
    match bpf::os_error(&e).and_then(|e| e.raw_os_error()) {
        Some(libc::E2BIG) | Some(libc::ENOSPC) | Some(libc::ENOMEM) => SpliceError::MapFull(MAX_SOCKETS),
        // sock_map_update refuses sockets that are not ESTABLISHED (a client that already
        // half-closed is in CLOSE_WAIT).
        Some(libc::EOPNOTSUPP) => SpliceError::NotEstablished,
        _ => SpliceError::Io(io::Error::other(bpf::chain(&e))),
    }
}

impl KernelSplice {
    /// Puts both sockets in the maps, in the order that keeps every byte: redirect targets and
    /// peer entries first, then the map with the programs, then a kick for queued bytes.
    fn join(&mut self, ends: [&TcpStream; 2]) -> Result<(), SpliceError> {
        let result = self.try_join(ends);
        if result.is_err() {
            self.release();
        }
        result
    }

    fn try_join(&mut self, ends: [&TcpStream; 2]) -> Result<(), SpliceError> {
        self.cookies = [sys::socket_cookie(ends[0])?, sys::socket_cookie(ends[1])?];
        let [a, b] = self.cookies;
        for end in ends {
            if let Err(e) = sys::set_send_buffer(end, SPLICED_SNDBUF) {
                log::debug!("kernel datapath: send buffer stays at its default: {e}");
            }
        }
        {
            let mut maps = self.maps.borrow_mut();
            for (i, end) in ends.iter().enumerate() {
                maps.targets.insert(self.cookies[i], end.as_raw_fd(), 0).map_err(map_full_or_io)?;
                self.joined.targets[i] = true;
            }
            for (i, (from, to)) in [(a, b), (b, a)].into_iter().enumerate() {
                maps.peers.insert(from, to, 0).map_err(map_full_or_io)?;
                self.joined.peers[i] = true;
            }
            for (i, end) in ends.iter().enumerate() {
                maps.socks.insert(self.cookies[i], end.as_raw_fd(), 0).map_err(map_full_or_io)?;
                self.joined.socks[i] = true;
            }
        }
        // Bytes that arrived before the socket joined `socks` sit in its receive queue and only go
        // through the verdict when the next segment comes; a peek runs the sockmap receive path,
        // which pushes them through now, in order (KERNEL-NOTES.md).
        for (i, end) in ends.iter().enumerate() {
            let mut byte = [0u8; 1];
            match sys::peek(*end, &mut byte) {
                Ok(n) if n > 0 => {
                    log::warn!("kernel datapath: {n} byte(s) stayed in a relay socket's queue after the kick")
                }
                // A reset that came before the kick: the peek took it out of SO_ERROR.
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => self.kicked_error[i] = Some(e),
                _ => {}
            }
        }
        Ok(())
    }
}

impl Splice for KernelSplice {
    fn advance(&mut self, dir: usize, src: &TcpStream, dst: &TcpStream) -> io::Result<Flow> {
        if let Some(e) = self.kicked_error[dir].take() {
            return Err(e);
        }
        let from: TcpCounters = sys::tcp_counters(src)?;
        // A reset source has reached end of file too: the pair tells the two apart by SO_ERROR
        // before it forwards the end of file (server/pair.rs).
        if !from.fin_received() {
            return Ok(Flow::Open);
        }
        // Every byte the source sent (less what user space consumed before pairing) must have
        // been acknowledged by the destination's client before it may see the FIN.
        let sent = from.payload_received().saturating_sub(self.consumed[dir]);
        let delivered = sys::tcp_counters(dst)?.bytes_acked.saturating_sub(self.acked_base[1 - dir]);
        Ok(if delivered >= sent { Flow::Finished } else { Flow::Flushing })
    }

    /// What the destination's peer acknowledged, which is what it received: bytes still queued
    /// inside the host are not counted, and a reset source's count is not cut by one for a FIN it
    /// never sent (TCP_INFO counts a FIN in bytes_received and bytes_acked alike).
    fn moved(&self, dir: usize, src: &TcpStream, dst: &TcpStream, ended: bool) -> u64 {
        let (Ok(from), Ok(to)) = (sys::tcp_counters(src), sys::tcp_counters(dst)) else { return 0 };
        let received = from.bytes_received.saturating_sub(u64::from(ended)).saturating_sub(self.consumed[dir]);
        let acked = to.bytes_acked.saturating_sub(self.acked_base[1 - dir]);
        received.min(acked)
    }

    fn interest(&self) -> Interest {
        Interest::READABLE
    }

    fn name(&self) -> &'static str {
        "kernel"
    }

    fn release(&mut self) {
        let mut maps = self.maps.borrow_mut();
        let [a, b] = self.cookies;
        for i in 0..2 {
            if std::mem::take(&mut self.joined.socks[i]) {
                let _ = maps.socks.remove(&self.cookies[i]);
            }
        }
        for (i, from) in [a, b].into_iter().enumerate() {
            if std::mem::take(&mut self.joined.peers[i]) {
                let _ = maps.peers.remove(&from);
            }
        }
        for i in 0..2 {
            if std::mem::take(&mut self.joined.targets[i]) {
                let _ = maps.targets.remove(&self.cookies[i]);
            }
        }
    }
}

impl Drop for KernelSplice {
    fn drop(&mut self) {
        self.release();
    }
}

/// A pair that starts in user space and moves into the kernel maps as soon as user space has
/// drained both sockets' queues: bytes spliced so far are already in the destinations' send
/// queues, so whatever the kernel redirects afterwards follows them in order.
struct Handover {
    user: Box<dyn Splice>,
    kernel: KernelSplice,
    joined: bool,
    /// Bytes (both ways) that pass through splice(2) before the pair may join.
    after: u64,
    /// Why the pair stays on splice(2) for good, for the log: it can no longer join.
    stays: Option<&'static str>,
    /// A source reached end of file on splice(2): its socket is no longer established.
    half_closed: bool,
    /// Bytes moved by splice(2) each way, for the log's reason when the pair never joined.
    user_moved: [u64; 2],
}

/// Why a pair with a half-closed socket never joins (a socket does not return to ESTABLISHED).
const HALF_CLOSED: &str = "userspace: a client half-closed before the pair could join the kernel's socket maps, \
                           which take only established connections";

impl Splice for Handover {
    fn advance(&mut self, dir: usize, src: &TcpStream, dst: &TcpStream) -> io::Result<Flow> {
        if self.joined {
            self.kernel.advance(dir, src, dst)
        } else {
            let flow = self.user.advance(dir, src, dst);
            self.half_closed |= matches!(flow, Ok(Flow::Finished));
            self.user_moved[dir] = self.user.moved(dir, src, dst, false);
            flow
        }
    }

    fn moved(&self, dir: usize, src: &TcpStream, dst: &TcpStream, ended: bool) -> u64 {
        // The kernel's count covers both phases: TCP_INFO counts every byte.
        self.kernel.moved(dir, src, dst, ended)
    }

    fn interest(&self) -> Interest {
        if self.joined {
            self.kernel.interest()
        } else {
            self.user.interest()
        }
    }

    fn idle(&self) -> bool {
        self.joined || self.user.idle()
    }

    fn name(&self) -> &'static str {
        if self.joined {
            "kernel, after a userspace start"
        } else if let Some(why) = self.stays {
            why
        } else if self.half_closed && self.user_moved.iter().sum::<u64>() >= self.after {
            // Past --kernel-after (perhaps within the call that ended it): the half-close kept it.
            HALF_CLOSED
        } else if self.after > 0 {
            "userspace, below --kernel-after"
        } else {
            "userspace"
        }
    }

    fn settle(&mut self, ends: [&TcpStream; 2]) -> io::Result<()> {
        if self.joined || self.stays.is_some() {
            return Ok(());
        }
        let past_after =
            self.user.moved(0, ends[0], ends[1], false) + self.user.moved(1, ends[1], ends[0], false) >= self.after;
        if past_after && self.half_closed {
            // It would never go idle (a source at end of file is not) nor be taken by the maps.
            self.stays = Some(HALF_CLOSED);
        } else if past_after && self.user.idle() {
            match self.kernel.join(ends) {
                Ok(()) => self.joined = true,
                Err(SpliceError::NotEstablished) => self.stays = Some(HALF_CLOSED),
                // Stay on splice(2): the same bytes arrive, only not through the kernel.
                Err(e) => log::debug!("pair stays in user space: {e}"),
            }
        }
        Ok(())
    }

    fn release(&mut self) {
        self.kernel.release();
    }
}
