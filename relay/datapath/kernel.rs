//! The kernel datapath: both sockets of a pair join a SOCKHASH whose sk_skb stream parser and
//! verdict (probes/relay.bpf.c) redirect every skb to the peer's egress. User space never reads
//! payload; it only fills the maps and propagates end of file, which the kernel does not.
use super::{
    budget::{self, Limits, Measure},
    userspace::UserspaceDatapath,
    Datapath, Flow, Splice, SpliceError,
};
use crate::{
    abi::{relay_count_flags, relay_stat, RelayCount, RelayPeer},
    bpf,
    error::Error,
    sys::{self, TcpCounters},
};
use aya::{
    maps::{HashMap, MapData, MapError, PerCpuArray, RingBuf, SockHash},
    programs::SkSkb,
    Ebpf,
};
use mio::{net::TcpStream, Interest};
use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap as Table},
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Instant,
};

/// max_entries of the socket maps (probes/skrelay.h).
const MAX_SOCKETS: u32 = crate::abi::MAX_SOCKETS;
/// Send buffer of a spliced socket (the kernel doubles it). When a redirected skb finds its
/// egress socket's send buffer full, the kernel's psock backlog retries one jiffy later (4 ms at
/// HZ=250) and a write-space wake-up cannot bring that retry forward: with the default 4 MiB
/// (tcp_wmem max) the egress drained its buffer in ~1.5 ms and then sat idle, capping a 1 GiB
/// transfer at ~5 Gbit/s. 8 MiB (16 MiB effective) measured 13 Gbit/s; 16 and 32 MiB no better.
/// Memory is only used while bytes are in flight.
const SPLICED_SNDBUF: libc::c_int = 8 << 20;
/// Receive buffer of a spliced socket (the kernel doubles it): what a parked direction holds at
/// most before TCP's window closes on its sender (tcp_rmem's maximum is often 32 MiB), and less
/// than a catch-up peeks at once (`CATCH_UP_MAX`). Every parking moves about this much through
/// user space, so it is no larger than the window needs: 1 GiB through the proxy, 6 interleaved
/// rounds, 2 MiB gave 15.6-16.1 Gbit/s against 14.0-15.0 at 4 MiB (parked bytes halved, as many
/// parkings); 1 MiB 16.0-16.1; 256 KiB starved the pair (4.2); 8 MiB and autotuning (up to
/// tcp_rmem's 32 MiB) 11.8-12.5.
const SPLICED_RCVBUF: libc::c_int = 2 << 20;
/// The window clamp a socket gets with its buffer back after a hold: what the buffer
/// (`SPLICED_RCVBUF`, doubled by the kernel) holds.
const WINDOW_CLAMP_BACK: u32 = (2 * SPLICED_RCVBUF) as u32;

/// The maps and the budget of every direction in them, shared by the datapath and its pairs.
struct KernelState {
    /// Carries the parser and verdict: a socket in here has its bytes redirected.
    socks: SockHash<MapData, u64>,
    /// Program-less redirect targets, filled before `socks` so no verdict finds its peer missing.
    targets: SockHash<MapData, u64>,
    /// cookie -> the peer's cookie and the socket's budget (written by user space only).
    peers: HashMap<MapData, u64, RelayPeer>,
    /// cookie -> bytes its verdict redirected and parked (written by the verdict only).
    counts: HashMap<MapData, u64, RelayCount>,
    /// The directions of the pairs in the maps, by their source's cookie.
    directions: Table<u64, Direction>,
    /// When to look at a parked direction again.
    rechecks: BinaryHeap<Reverse<(Instant, u64)>>,
    limits: Limits,
    /// Pairs in this datapath's maps now.
    pairs: usize,
    /// Pairs in the maps of every thread's datapath (`--threads`), bounded by `limits`.
    all_pairs: Arc<AtomicUsize>,
    /// A socket error that reading a socket took out of SO_ERROR, by cookie: reported by `advance`.
    errors: Table<u64, io::Error>,
    /// Times a direction parked at its budget, for the exit summary.
    parkings: u64,
    /// Where a catch-up peeks parked bytes (`CATCH_UP_MAX`; allocated at the first catch-up).
    scratch: Vec<u8>,
    /// When `sweep` looks at every direction next (None while no pair is in the maps).
    next_sweep: Option<Instant>,
    /// Directions the sweep found parked or past their budget with no report from the verdict.
    unreported: u64,
    /// Times a source's window was clamped because too many of its bytes were parked.
    holds: u64,
    /// Times `unstick` raised a socket's buffer so one direction stopped holding the other.
    unsticks: u64,
    /// Pairs reset because a direction's parked bytes passed `RUNAWAY_AT`.
    runaways: u64,
    /// Bytes the verdict redirected toward sockets whose clients had reset them (`discard`),
    /// counted as their pairs leave the maps.
    toward_reset: u64,
}

/// The state's lock. Only the thread that serves the datapath's pairs takes it: the lock is what
/// lets a server (its datapath and pairs) move to another thread (`--threads`, `--takeover`).
fn locked(state: &Mutex<KernelState>) -> MutexGuard<'_, KernelState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// How often every direction is looked at whether or not the verdict reported it: a report that
/// was lost (the ring buffer full) must not leave a parked direction waiting for good.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// One direction of a pair in the maps: its source's bytes go to its destination.
struct Direction {
    /// The sockets' descriptors; the pair owns them and removes this entry before closing them.
    src: RawFd,
    dst: RawFd,
    peer: u64,
    /// The destination's bytes_acked + send queue when the direction joined: `Measure::new`.
    base: u64,
    /// Parked bytes user space took from the source (`relay_peer.taken`) and wrote on.
    taken: u64,
    written: u64,
    /// None while the verdict redirects; the next wait while its bytes are parked.
    parked: Option<std::time::Duration>,
    /// The destination's bytes_acked at the last look while parked: while its client reads,
    /// a parked direction is looked at again soon; once it stops, the looks back off.
    dst_acked: u64,
    /// Parked bytes written on but still in the source's psock queue: consumed once the verdict
    /// redirects again, so that the receive window stays closed while user space catches up.
    unconsumed: u64,
    /// Some while `hold_back` keeps the source's window closed (its receive buffer at the floor):
    /// 0, or the window clamp to give back when an older skrelay held it with one.
    held: Option<u32>,
    /// Where the direction stood at the last look (what had entered the destination, and
    /// `taken`) and since when it has not moved: `unstick`.
    last_moved: (u64, u64),
    stuck_since: Option<Instant>,
    /// The destination's send buffer was raised to take this direction's bytes that waited on
    /// its psock (`unstick`): until the destination's send queue is back within
    /// `SPLICED_SNDBUF`, the direction gets no budget and its parked bytes wait.
    frozen: bool,
    /// Its pair is being reset: its parked bytes stayed past `RUNAWAY_AT` for `RUNAWAY_GRACE`.
    runaway: bool,
    /// Since when its parked bytes have been past `RUNAWAY_AT`.
    runaway_since: Option<Instant>,
    /// `shelter`: the destination's send queue when its buffer was raised. What it holds beyond
    /// that was moved there from the kernel datapath's queues and still counts as in flight.
    shelter_base: Option<u64>,
    /// The destination's client reset it: what the source sends is dropped (`discard`), and
    /// nothing else is done for the direction.
    discarding: bool,
    /// The bytes the verdict had redirected when `discarding` began: what it redirects after
    /// goes to a reset socket, where the kernel drops it (KERNEL-NOTES item 21).
    discarding_from: u64,
}

/// Bytes parked and not yet taken past which the source's window is clamped (`hold_back`).
/// Parking closes the sender's window by itself only for skbs that reach the psock's message
/// queue, which is charged to the receive buffer (`SPLICED_RCVBUF`, doubled). A parked skb that finds the
/// psock's backlog queue busy (the socket is also the destination of its pair's other direction,
/// and that direction's bytes wait for room in its send queue) waits there uncharged, and the
/// window stays open: a bidirectional pair whose clients read slower than they send parked
/// ~90 MB a direction before this. So past 16 MiB (four times the receive buffer; twice before it
/// shrank to 2 MiB), the window is clamped.
const HOLD_AT: u64 = 16 << 20;
/// Bytes parked and not yet taken below which a clamped window is given back.
const RELEASE_AT: u64 = 4 << 20;
/// Bytes parked and not yet taken past which the pair is reset: its sender was not held back.
/// Four times `HOLD_AT`. Parked skbs that wait in the psock's queue are charged to nothing, so
/// while that queue is not empty the window stays open; the psock's worker empties it, but it
/// runs on the CPU whose softirq queued the work, and a client inside one write(2) of hundreds of
/// MiB keeps that CPU (the kernel does not preempt it here): two clients that each wrote
/// 400 MiB in one call without reading made one pair hold 790 MB (KERNEL-NOTES, item 11).
const RUNAWAY_AT: u64 = 4 * HOLD_AT;
/// How long a direction may hold more than `RUNAWAY_AT` before its pair is reset: a partner that
/// reads takes such a surge in well under a second (helper: 150 MiB writes read at full speed
/// were reset at once before this grace, after every byte had arrived).
const RUNAWAY_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// The window, in bytes, from which a destination's client counts as reading (`shelter`): a
/// receiver whose buffer is full advertises 0 (Linux never advertises less than a segment), and
/// 64 KiB is a segment on loopback.
const PARTNER_READS_WINDOW: u32 = 64 << 10;

/// Whether a socket has as many bytes in flight (sent, not acknowledged) as its peer's last
/// window allows: a peer that takes nothing more leaves its last window open and used up.
fn window_used_up(fd: BorrowedFd<'_>, tcp: sys::TcpCounters) -> bool {
    match (tcp.snd_wnd, tcp.notsent, sys::send_queue_len(fd)) {
        (Some(window), Some(notsent), Ok(queued)) => queued.saturating_sub(u64::from(notsent)) >= u64::from(window),
        _ => false,
    }
}

/// How long a direction's bytes may not move before `unstick` looks at what holds them: longer
/// than the psock backlog's retries in a busy bidirectional pair (a jiffy each).
const STUCK_AFTER: std::time::Duration = std::time::Duration::from_millis(100);
/// Room `unstick` adds beyond what it measured: skbs a verdict was deciding on meanwhile, and
/// the kernel's per-skb overhead.
const UNSTICK_SLACK: u64 = 2 << 20;

pub struct KernelDatapath {
    state: Arc<Mutex<KernelState>>,
    /// The verdict's reports of sockets that need their next budget, or parked.
    events: RingBuf<MapData>,
    /// When `tend` wants to run next.
    next_recheck: Option<Instant>,
    /// Splices token pairs until their queues are drained (see `Handover`).
    fallback: UserspaceDatapath,
    /// Bytes a pair moves through splice(2) before it joins the maps (0: at once).
    join_after: u64,
    stats: PerCpuArray<MapData, u64>,
    /// The full map was reported (once: every pair after it would say the same).
    /// Keeps the programs loaded and attached.
    _bpf: Ebpf,
}

impl KernelDatapath {
    /// `join_after`: bytes a pair moves through splice(2) before it joins the maps (0: at once).
    /// `limits`: what the pairs in the maps may hold (see budget.rs).
    /// `all_pairs`: shared by the datapaths of every thread, which `limits` bound together.
    pub fn load(join_after: u64, limits: Limits, all_pairs: Arc<AtomicUsize>) -> Result<Self, Error> {
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
        let peers: HashMap<MapData, u64, RelayPeer> = HashMap::try_from(map(&mut bpf, "peers")?).map_err(broken)?;
        let counts: HashMap<MapData, u64, RelayCount> =
            HashMap::try_from(map(&mut bpf, "relay_counts")?).map_err(broken)?;
        let events = RingBuf::try_from(map(&mut bpf, "relay_events")?).map_err(broken)?;
        let stats: PerCpuArray<MapData, u64> = PerCpuArray::try_from(map(&mut bpf, "relay_stats")?).map_err(broken)?;
        let socks_fd = socks.fd().try_clone().map_err(|e| bpf::unavailable("open the relay maps", &e))?;
        // Verdict only, no stream parser: with a parser, a socket whose bytes park deadlocks
        // (KERNEL-NOTES.md, "Bounding the relay's psock queue").
        let prog: &mut SkSkb = bpf.program_mut("relay_verdict").and_then(|p| p.try_into().ok()).ok_or_else(|| {
            Error::BpfUnavailable { reason: "no program `relay_verdict`".into(), fix: "rebuild skrelay".into() }
        })?;
        prog.load().map_err(|e| bpf::unavailable("load the sk_skb programs", &e))?;
        prog.attach(&socks_fd).map_err(|e| bpf::unavailable("attach the sk_skb programs", &e))?;
        Ok(KernelDatapath {
            state: Arc::new(Mutex::new(KernelState {
                socks,
                targets,
                peers,
                counts,
                directions: Table::new(),
                rechecks: BinaryHeap::new(),
                limits,
                pairs: 0,
                all_pairs,
                errors: Table::new(),
                parkings: 0,
                scratch: Vec::new(),
                next_sweep: None,
                unreported: 0,
                holds: 0,
                unsticks: 0,
                runaways: 0,
                toward_reset: 0,
            })),
            events,
            next_recheck: None,
            fallback: UserspaceDatapath,
            join_after,
            stats,
            _bpf: bpf,
        })
    }

    fn stat(&self, idx: u32) -> u64 {
        self.stats.get(&idx, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }
}

/// Says once per process (every event loop's datapath shares it) that the socket map or the
/// `--kernel-memory` budget is full: from then on pairs that would join the kernel, at their
/// start (`--kernel-after 0`) or after `--kernel-after` bytes, stay on splice(2) until kernel
/// pairs end. The same semantics, only not in the kernel; the metrics' path label counts them.
fn warn_full_once(e: &SpliceError) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        log::warn!("{e}: further pairs are spliced in user space until kernel pairs end");
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

/// On loopback a segment is received on the sending process's CPU (without RPS), so the verdict
/// runs there and queues the psock backlog, which sends the bytes on, on that CPU's kernel worker:
/// each direction's kernel work shares its sender's CPU while other CPUs idle. On a 16-core
/// machine, RPS on `lo` across all CPUs took iperf3 `--bidir` through the kernel proxy from 0.64x
/// to 0.99x of the userspace datapath and `-P 4` from 0.71x to 1.03x (one stream: no change; on 2
/// CPUs: no gain). RPS is a setting of the network namespace's `lo`, for every flow on it, so
/// skrelay names it rather than sets it: once, at start, with 8 or more CPUs and RPS off on `lo`.
pub fn note_if_loopback_rps_is_off() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rps = std::fs::read_to_string("/sys/class/net/lo/queues/rx-0/rps_cpus");
    if cpus >= 8 && rps.is_ok_and(|mask| rps_mask_is_empty(&mask)) {
        log::info!(
            "for clients on this machine: RPS is off on lo, so the kernel datapath sends each \
             direction's bytes on its sending client's CPU; with many streams on {cpus} CPUs, \
             spreading loopback's receive work over them (RPS) moved them 1.4-1.75x faster on 16 cores (run `echo {} > \
             /sys/class/net/lo/queues/rx-0/rps_cpus` in this network namespace; README, Kernel requirements)",
            rps_mask_all(cpus)
        );
    }
}

/// `rps_cpus` is a hex CPU mask in comma-separated 32-bit words (`00000000,00000000`).
fn rps_mask_is_empty(mask: &str) -> bool {
    mask.trim().chars().all(|c| c == '0' || c == ',')
}

/// The mask of CPUs 0..cpus, in the form `rps_cpus` takes.
fn rps_mask_all(cpus: usize) -> String {
    let mut words: Vec<String> = Vec::new();
    let mut left = cpus;
    while left > 0 {
        let n = left.min(32);
        words.push(format!("{:x}", if n == 32 { u32::MAX } else { (1u32 << n) - 1 }));
        left -= n;
    }
    words.reverse();
    for w in words.iter_mut().skip(1) {
        *w = format!("{:0>8}", w);
    }
    words.join(",")
}

impl Datapath for KernelDatapath {
    fn name(&self) -> &'static str {
        "kernel"
    }

    // --takeover (kernel_handover.rs).
    fn export(&self, ex: &mut super::handover::Exporter) -> Option<super::handover::KernelMaps> {
        handover::export_maps(self, ex)
    }

    fn check_maps(
        &self,
        maps: &super::handover::KernelMaps,
        fds: &mut super::handover::Fds,
    ) -> Result<Box<dyn std::any::Any>, String> {
        handover::check_maps(self, maps, fds).map(|a| Box::new(a) as Box<dyn std::any::Any>)
    }

    fn install_maps(&mut self, checked: Box<dyn std::any::Any>) {
        if let Ok(adopted) = checked.downcast::<handover::Adopted>() {
            handover::install_maps(self, *adopted);
        }
    }

    fn import(
        &mut self,
        state: super::handover::SpliceState,
        ends: [&TcpStream; 2],
        fds: &mut super::handover::Fds,
    ) -> io::Result<Box<dyn Splice>> {
        handover::import(self, state, ends, fds)
    }

    fn carries(&self, _state: &super::handover::SpliceState) -> bool {
        true
    }

    fn splice(&mut self, ends: [&TcpStream; 2], skip: [u32; 2]) -> Result<Box<dyn Splice>, SpliceError> {
        let acked_base = [sys::tcp_counters(ends[0])?.bytes_acked, sys::tcp_counters(ends[1])?.bytes_acked];
        let mut kernel = KernelSplice {
            state: self.state.clone(),
            cookies: [0; 2], // read when the pair joins: most short pairs never do
            acked_base,
            consumed: skip.map(u64::from),
            joined: Joined::default(),
            taken_back: [0; 2],
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
                        for_streams: false,
                        stays: Some(not_established(ends)),
                        half_closed: true,
                        user_moved: [0; 2],
                        refused: false,
                    }))
                }
                // The same semantics through splice(2), said once: the map stays full for a while.
                Err(e @ (SpliceError::MapFull(_) | SpliceError::OverBudget(_))) => {
                    warn_full_once(&e);
                    self.fallback.splice(ends, skip)
                }
                Err(e) => Err(e),
            };
        }
        // A pair starts on splice(2) and joins the maps once its pipes are empty:
        // - with a token line, which splice(2) discards (the verdict would also cut off a partly
        //   read skb's head, from copied_seq; the token path predates that and stays);
        // - until `join_after` bytes have passed: joining and leaving the maps costs more than a
        //   short connection's splicing (see BENCHMARKS.md, connections per second);
        // - and, with `join_after` above 0, until its traffic shows a stream (`STREAM_RUN`), token
        //   pairs too (they joined at once, whatever their traffic).
        let mut user = self.fallback.splice(ends, skip)?;
        user.settle(ends)?;
        let after = self.join_after;
        Ok(Box::new(Handover {
            user,
            kernel,
            joined: false,
            after,
            for_streams: self.join_after > 0,
            stays: None,
            half_closed: false,
            user_moved: [0; 2],
            refused: false,
        }))
    }

    fn tally(&self) -> Vec<u64> {
        let state = locked(&self.state);
        vec![
            self.stat(relay_stat::REDIRECTED),
            self.stat(relay_stat::BYTES),
            self.stat(relay_stat::NO_PEER),
            self.stat(relay_stat::DROPPED),
            self.stat(relay_stat::PARKED),
            state.parkings,
            self.stat(relay_stat::EVENTS_LOST),
            self.stat(relay_stat::TRIMMED),
            state.unreported,
            state.holds,
            self.stat(relay_stat::EXTENDED),
            state.unsticks,
            state.runaways,
            state.toward_reset,
        ]
    }

    fn summary(&self, tally: &[u64]) -> Option<String> {
        let &[redirected, bytes, no_peer, dropped, parked, parkings, lost, trimmed, unreported, holds, extended, unsticks, runaways, toward_reset] =
            tally
        else {
            return None;
        };
        Some(format!(
            "kernel datapath: {redirected} skbs ({bytes} bytes) redirected ({extended} of them past a budget on the \
             verdict's own measure; {toward_reset} of the bytes toward clients that had reset, where the kernel \
             dropped them), {no_peer} passed without a peer, \
             {dropped} dropped, {parked} bytes parked at a budget in {parkings} parkings, {lost} budget reports \
             lost, {trimmed} repeated bytes trimmed, {unreported} directions looked at without a report, \
             {holds} windows closed for parked bytes, {unsticks} send buffers raised to take what waited (so \
             one direction would not hold the other, or a reset lose parked bytes), {runaways} pairs reset because their window did not hold a sender"
        ))
    }

    fn events(&self) -> Option<RawFd> {
        Some(self.events.as_raw_fd())
    }

    fn tend(&mut self, now: Instant) -> Option<Instant> {
        let mut cookies = Vec::new();
        while let Some(item) = self.events.next() {
            if let Ok(cookie) = <[u8; 8]>::try_from(&item[..8.min(item.len())]) {
                cookies.push(u64::from_ne_bytes(cookie));
            }
        }
        let mut state = locked(&self.state);
        for cookie in cookies {
            state.review(cookie, now);
        }
        state.recheck_parked(now);
        state.sweep(now);
        let recheck = state.rechecks.peek().map(|Reverse((at, _))| *at);
        self.next_recheck = [recheck, state.next_sweep].into_iter().flatten().min();
        self.next_recheck
    }

    fn over_limits(&self) -> Option<(usize, usize)> {
        let state = locked(&self.state);
        let (now, max) = (state.all_pairs.load(Ordering::Acquire), state.limits.max_pairs());
        (now > max).then_some((now, max))
    }

    /// Bytes that left a source and are not yet in its destination's send queue: on the
    /// destination's psock queue, or parked in the source's own queue and not yet written on;
    /// and what `shelter` moved into a raised send queue.
    fn in_flight(&self) -> u64 {
        let state = locked(&self.state);
        state
            .directions
            .iter()
            // Dropped, not held: the destination's client reset it (`discard`).
            .filter(|(_, d)| !d.discarding)
            .filter_map(|(cookie, d)| {
                let sheltered = d
                    .shelter_base
                    .map_or(0, |base| sys::send_queue_len(borrow_fd(d.dst)).unwrap_or(0).saturating_sub(base));
                state.measure(*cookie, d).ok().map(|m| m.in_flight + m.parked.saturating_sub(d.written) + sheltered)
            })
            .sum()
    }
}

/// Raises `fd`'s send buffer to `bytes` (as the kernel counts it, doubled), checking what the
/// kernel set: without CAP_NET_ADMIN, SO_SNDBUF stops at net.core.wmem_max, which may be less
/// than the buffer had. Otherwise sets `fallback` back and says false.
fn raise_send_buffer(fd: BorrowedFd<'_>, bytes: u64, fallback: libc::c_int) -> bool {
    let half = clamp_c_int(bytes / 2);
    let set = sys::set_send_buffer(fd, half);
    if set.is_err() || !sys::socket_memory(fd).is_ok_and(|m| m.sndbuf >= 2 * half as u64) {
        log::debug!("kernel datapath: cannot raise a send buffer to {bytes} bytes: {set:?}");
        let _ = sys::set_send_buffer(fd, fallback);
        return false;
    }
    true
}

/// A buffer size for setsockopt, at most `c_int::MAX`.
fn clamp_c_int(bytes: u64) -> libc::c_int {
    libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX)
}

/// Writes what the destination's send buffer takes now (0 when it is full).
fn write_some(dst: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    use rustix::net::SendFlags;
    let mut done = 0;
    while done < buf.len() {
        match rustix::net::send(dst, &buf[done..], SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(rustix::io::Errno::AGAIN) => break,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

/// Reads and drops up to the next `n` bytes of a socket's psock queue (bytes already peeked and
/// written on); returns how many it dropped. It may stop short: tcp_bpf's recvmsg answers EAGAIN
/// while the TCP receive queue holds skbs its verdict has not taken yet, even with bytes in the
/// psock queue; the rest is dropped at a later look.
fn consume(src: BorrowedFd<'_>, n: u64, scratch: &mut [u8]) -> io::Result<u64> {
    let mut left = usize::try_from(n).unwrap_or(usize::MAX);
    while left > 0 {
        let want = left.min(scratch.len());
        match rustix::net::recv(src, &mut scratch[..want], rustix::net::RecvFlags::DONTWAIT) {
            Ok((0, _)) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "parked bytes vanished")),
            Ok((got, _)) => left -= got,
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n - left as u64)
}

/// Borrows a descriptor that a live pair owns.
fn borrow_fd(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: a `Direction` lives only while its pair holds both sockets open: the pair removes
    // it (release) before it closes them, and the borrow never outlives the call it is made for.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

impl KernelState {
    fn measure(&self, cookie: u64, d: &Direction) -> io::Result<Measure> {
        let c = self.counts.get(&cookie, 0).map_err(|e| io::Error::other(bpf::chain(&e)))?;
        let dst = borrow_fd(d.dst);
        let entered = sys::tcp_counters(dst)?.bytes_acked + sys::send_queue_len(dst)?;
        Ok(Measure::new(d.base, c.redirected, c.parked, d.written, entered))
    }

    /// The verdict asked for `cookie`'s next budget, or parked its bytes.
    fn review(&mut self, cookie: u64, now: Instant) {
        let Some(d) = self.directions.get(&cookie).filter(|d| !d.discarding) else { return };
        if self.counts.get(&cookie, 0).is_ok_and(|c| c.flags & relay_count_flags::BROKEN != 0) {
            // The verdict could not cut a repeated head off a skb and dropped it and all after
            // it: the stream has a hole, so the pair must end in a reset. Shutting the source's
            // read side makes it readable, so the server calls `advance`, which reports this.
            log::error!("kernel datapath: socket {cookie:#x} lost bytes it could not trim; resetting its pair");
            self.errors.insert(cookie, io::Error::other("the kernel datapath could not trim a retransmitted skb"));
            let _ = socket2::SockRef::from(&borrow_fd(d.src)).shutdown(std::net::Shutdown::Read);
            return;
        }
        if d.parked.is_some() {
            self.hold_back(cookie);
            return; // already being looked after
        }
        let Ok(m) = self.measure(cookie, d) else { return };
        if m.parked == d.taken && self.grant(cookie, m) {
            return;
        }
        self.parkings += 1;
        self.directions.get_mut(&cookie).expect("present").parked = Some(budget::RECHECK_FIRST);
        self.rechecks.push(Reverse((now, cookie)));
        log::debug!("kernel datapath: socket {cookie:#x} parks at its budget");
    }

    /// Looks at every redirecting direction every `SWEEP_EVERY`: one the verdict parked, or that
    /// went past the point where it asks for its next budget, without a report reaching user
    /// space (a full ring buffer loses reports) is reviewed as if the report had come.
    fn sweep(&mut self, now: Instant) {
        if self.directions.is_empty() {
            self.next_sweep = None;
            return;
        }
        match self.next_sweep {
            Some(at) if at > now => return,
            None => {
                self.next_sweep = Some(now + SWEEP_EVERY);
                return;
            }
            Some(_) => self.next_sweep = Some(now + SWEEP_EVERY),
        }
        let missed: Vec<(u64, bool)> = self
            .directions
            .iter()
            .filter(|(_, d)| d.parked.is_none())
            .filter_map(|(cookie, d)| {
                let (Ok(c), Ok(p)) = (self.counts.get(cookie, 0), self.peers.get(cookie, 0)) else { return None };
                let parked = c.parked != d.taken;
                (parked || c.redirected > p.notify).then_some((*cookie, parked))
            })
            .collect();
        for (cookie, parked) in missed {
            self.unreported += 1;
            if parked {
                log::info!("kernel datapath: socket {cookie:#x} parked before its report reached user space");
            }
            self.review(cookie, now);
        }
        // A direction that does not park (its source sends nothing more) is looked at only here.
        let redirecting: Vec<u64> =
            self.directions.iter().filter(|(_, d)| d.parked.is_none()).map(|(c, _)| *c).collect();
        for cookie in redirecting {
            self.thaw(cookie);
            self.unstick(cookie, now);
        }
    }

    /// Clamps the source's receive window while too many of its bytes are parked and not yet
    /// taken (`HOLD_AT`), and gives the window back once they are down to `RELEASE_AT` or the
    /// direction redirects again.
    fn hold_back(&mut self, cookie: u64) {
        let Some(d) = self.directions.get(&cookie).filter(|d| !d.discarding) else { return };
        let Ok(c) = self.counts.get(&cookie, 0) else { return };
        let waiting = c.parked.saturating_sub(d.taken);
        let src = borrow_fd(d.src);
        let since = match (waiting > RUNAWAY_AT, d.runaway_since) {
            (false, _) => None,
            (true, None) => Some(Instant::now()),
            (true, Some(at)) => Some(at),
        };
        self.directions.get_mut(&cookie).expect("present").runaway_since = since;
        let d = self.directions.get(&cookie).expect("present");
        if since.is_some_and(|at| at.elapsed() >= RUNAWAY_GRACE) && !d.runaway {
            log::warn!(
                "kernel datapath: socket {cookie:#x} has held more than {} MiB past its budget for {} s ({waiting} \
                 bytes now) that its TCP window did not hold back (its client writes many MiB per call and its \
                 partner does not read them): resetting the pair to protect the host's memory",
                RUNAWAY_AT >> 20,
                RUNAWAY_GRACE.as_secs()
            );
            self.runaways += 1;
            self.directions.get_mut(&cookie).expect("present").runaway = true;
            self.errors.insert(cookie, io::Error::other("the kernel datapath could not hold its sender back"));
            let _ = socket2::SockRef::from(&src).shutdown(std::net::Shutdown::Read);
            return;
        }
        match d.held {
            None if d.parked.is_some() && waiting > HOLD_AT => {
                self.absorb_ahead(cookie);
                let Some(d) = self.directions.get(&cookie) else { return };
                let src = borrow_fd(d.src);
                // The receive buffer at the kernel's floor, not TCP_WINDOW_CLAMP: a clamp given
                // back left `rcv_ssthresh` at the clamp, the window stayed under one segment and
                // the sender sat on backing-off zero-window probes (one direction paused 10-14 s
                // with two slow readers). A floor-sized buffer closes the window outright and
                // leaves `rcv_ssthresh` alone, so the window reopens when the buffer comes back.
                if let Err(e) = sys::set_recv_buffer(src, 1) {
                    return log::debug!("kernel datapath: cannot close socket {cookie:#x}'s window: {e}");
                }
                self.holds += 1;
                log::debug!("kernel datapath: socket {cookie:#x} holds {waiting} parked bytes: window closed");
                self.directions.get_mut(&cookie).expect("present").held = Some(0);
            }
            Some(clamp) if !d.frozen && (d.parked.is_none() || waiting <= RELEASE_AT) => {
                if let Err(e) = sys::set_recv_buffer(src, SPLICED_RCVBUF) {
                    log::debug!("kernel datapath: cannot give socket {cookie:#x}'s window back: {e}");
                }
                // A window clamp of an older skrelay that handed this pair over (`--takeover`);
                // else the window clamp is raised to what the buffer given back holds: segments
                // that came while the buffer was at its floor can leave the clamp, and with it
                // `rcv_ssthresh`, at about 2.3 KB, which no later segment grows again (a window
                // of 3 KB for minutes, ~20 KB/s, in 2 of 12-15 TLS transfers of 200 MiB).
                let _ = sys::set_tcp_window_clamp(src, if clamp > 0 { clamp } else { WINDOW_CLAMP_BACK });
                self.directions.get_mut(&cookie).expect("present").held = None;
            }
            _ => {}
        }
    }

    /// Writes the direction's next budget; false if the verdict parked bytes meanwhile (they
    /// must be moved first: until `taken` catches up, it parks every skb).
    fn grant(&mut self, cookie: u64, m: Measure) -> bool {
        let Some(d) = self.directions.get(&cookie) else { return true };
        // A frozen direction gets no room: its next skb parks (`unstick`).
        let limit = if d.frozen { 0 } else { self.limits.per_direction };
        let (budget, notify) = budget::grant(m, limit);
        let peer = RelayPeer { peer: d.peer, budget, notify, taken: d.taken, hold: HOLD_AT, base: d.base, limit };
        if self.peers.insert(cookie, peer, 0).is_err() {
            return false;
        }
        // A skb parked between the measure and the write saw the old budget: look again.
        self.counts.get(&cookie, 0).is_ok_and(|c| c.parked == peer.taken)
    }

    /// Looks at the parked directions that are due: once a destination has drained enough,
    /// moves the parked bytes on and lets the verdict redirect again.
    fn recheck_parked(&mut self, now: Instant) {
        while let Some(Reverse((at, cookie))) = self.rechecks.peek().copied() {
            if at > now {
                break;
            }
            self.rechecks.pop();
            self.hold_back(cookie);
            if self.directions.get(&cookie).is_some_and(|d| d.parked.is_none() && d.unconsumed > 0) {
                // Redirecting again, with written bytes still to drop from its queue.
                let _ = self.drop_written(cookie);
                if self.directions.get(&cookie).is_some_and(|d| d.unconsumed > 0) {
                    self.rechecks.push(Reverse((now + budget::RECHECK_FIRST, cookie)));
                }
                continue;
            }
            let Some(delay) = self.directions.get(&cookie).and_then(|d| d.parked) else { continue };
            let next = match self.unpark(cookie) {
                Ok(true) => {
                    if self.directions.get(&cookie).is_some_and(|d| d.unconsumed > 0) {
                        self.rechecks.push(Reverse((now + budget::RECHECK_FIRST, cookie)));
                    }
                    continue;
                }
                Ok(false) if self.destination_reads(cookie) => {
                    self.unstick(cookie, now);
                    budget::RECHECK_FIRST
                }
                Ok(false) => {
                    // Just sheltered: its bytes move once the destination's psock has emptied
                    // into the raised buffer (a few ms), and a reset may come in tens: look soon.
                    let sheltered = self.shelter(cookie);
                    self.unstick(cookie, now);
                    if sheltered {
                        budget::RECHECK_FIRST
                    } else {
                        budget::backoff(delay)
                    }
                }
                Err(Progress) => budget::RECHECK_FIRST,
            };
            if let Some(d) = self.directions.get_mut(&cookie) {
                d.parked = Some(next);
                self.rechecks.push(Reverse((now + next, cookie)));
            }
        }
    }

    /// Frees a direction whose parked bytes wait behind the other direction's in a psock queue.
    ///
    /// A socket's psock has one queue, worked in order (KERNEL-NOTES, "Bounding the relay's
    /// psock queue", item 9): the bytes its pair's other direction redirected to it, waiting for
    /// room in its send queue, and its own skbs the verdict parked while that queue was not
    /// empty. So when client A neither reads nor stops sending, A's parked bytes waited behind
    /// B's until A read, and B, reading, stopped receiving A's stream. The verdict reports such a
    /// direction when its parked bytes pass `HOLD_AT` (`hold_back`), and this looks at every
    /// direction whose bytes have not moved for `STUCK_AFTER`; both free it with `absorb_ahead`.
    fn unstick(&mut self, cookie: u64, now: Instant) {
        let Some(d) = self.directions.get(&cookie).filter(|d| !d.discarding) else { return };
        let Ok(m) = self.measure(cookie, d) else { return };
        let waiting = m.in_flight > 0 || m.parked != d.taken;
        let dst = borrow_fd(d.dst);
        let Ok(entered) = sys::tcp_counters(dst).and_then(|c| Ok(c.bytes_acked + sys::send_queue_len(dst)?)) else {
            return;
        };
        let at = (entered, d.taken);
        let d = self.directions.get_mut(&cookie).expect("present");
        if !waiting || d.last_moved != at {
            d.last_moved = at;
            d.stuck_since = waiting.then_some(now);
            return;
        }
        match d.stuck_since {
            Some(since) if now.duration_since(since) >= STUCK_AFTER => {}
            Some(_) => return,
            None => return d.stuck_since = Some(now),
        }
        self.absorb_ahead(cookie);
    }

    /// When some of this direction's parked bytes wait in its source's psock queue behind the
    /// other direction's bytes (which wait for room in the source's send queue: its client does
    /// not read), freezes the other direction and raises the source's send buffer to take what
    /// waits: then the parked bytes reach the psock's message queue, where they are charged to
    /// the source's receive buffer and so close its window, and the catch-up can see them.
    /// The bytes moved were held already (the other direction's budget), so the pair holds no
    /// more than before; the send buffer is lowered again once its client has read it down
    /// (`thaw`).
    fn absorb_ahead(&mut self, cookie: u64) -> bool {
        let Some(d) = self.directions.get(&cookie) else { return false };
        let src = borrow_fd(d.src);
        let Ok(c) = self.counts.get(&cookie, 0) else { return false };
        let visible = sys::readable_len(src).unwrap_or(0).saturating_sub(d.unconsumed);
        if c.parked.saturating_sub(d.taken) <= visible {
            return false;
        }
        // A socket whose client reset takes nothing more: raising its buffer would only repeat.
        if sys::tcp_counters(src).is_ok_and(|c| c.closed()) {
            return false;
        }
        let peer = d.peer;
        let Some(other) = self.directions.get(&peer) else { return false };
        if other.frozen || other.discarding {
            return false;
        }
        let Ok(om) = self.measure(peer, other) else { return false };
        if om.in_flight == 0 {
            return false;
        }
        self.directions.get_mut(&peer).expect("present").frozen = true;
        self.grant(peer, om);
        // Measured after the freeze: nothing more is redirected to the source.
        let Some(other) = self.directions.get(&peer) else { return false };
        let Ok(om) = self.measure(peer, other) else { return false };
        let Ok(mem) = sys::socket_memory(src) else { return false };
        let raised = mem.wmem_queued.max(2 * SPLICED_SNDBUF as u64) + 2 * om.in_flight + UNSTICK_SLACK;
        // The queue cannot move this way: put the budget back.
        if !raise_send_buffer(src, raised, SPLICED_SNDBUF) {
            self.directions.get_mut(&peer).expect("present").frozen = false;
            if let Some(other) = self.directions.get(&peer) {
                if other.parked.is_none() {
                    if let Ok(om) = self.measure(peer, other) {
                        self.grant(peer, om);
                    }
                }
            }
            return false;
        }
        self.unsticks += 1;
        log::debug!(
            "kernel datapath: socket {cookie:#x}'s client does not read: its send buffer takes the {} byte(s) that \
             waited for it, so its own parked bytes behind them are charged and move on",
            om.in_flight
        );
        true
    }

    /// Moves a parked direction's bytes out of its source's psock while its destination's
    /// client does not read. There the kernel throws them away if the source's client resets
    /// (KERNEL-NOTES item 12), although TCP acknowledged them: a partner that read later lost up
    /// to 10 MB of a 40 MiB reply. So the direction is frozen (nothing more is redirected), its
    /// source's window is closed at the receive buffer's floor (nothing more arrives), and its
    /// destination's send buffer is raised to take what waits on its psock and what is parked;
    /// the catch-up then writes the parked bytes there. The pair holds no more than before: the
    /// same bytes, in a queue a reset of the other end leaves alone. `thaw` undoes it once the
    /// destination's client has read its queue down.
    fn shelter(&mut self, cookie: u64) -> bool {
        let Some(d) = self.directions.get(&cookie).filter(|d| !d.discarding) else { return false };
        // Frozen already (here or by `absorb_ahead`): the buffer is topped up if bytes parked
        // since (the window closes one window's worth later) would not fit.
        let frozen = d.frozen;
        let Ok(c) = self.counts.get(&cookie, 0) else { return false };
        let parked = c.parked.saturating_sub(d.taken);
        let (src, dst) = (borrow_fd(d.src), borrow_fd(d.dst));
        let (Ok(src_tcp), Ok(dst_tcp)) = (sys::tcp_counters(src), sys::tcp_counters(dst)) else { return false };
        if parked == 0 || src_tcp.closed() || dst_tcp.closed() {
            return false;
        }
        // A client that does not read has a full receive buffer: its window is closed. One whose
        // window is open reads; that it acknowledged nothing since the last look (0.25 ms) says
        // only that nothing reached it (the psock backlog waits out its one-jiffy retry) or that
        // it was busy for a moment. Without this, a bulk transfer to a reader that kept up was
        // sheltered at nearly every parking, and the close dropped the segments on their way
        // to the source (1 GiB through the kernel proxy: 0.65x the unbounded datapath, 0.81x
        // with this, 10 interleaved rounds; 1-14 pruned segments a run before, none after).
        //
        // An open window that is used up is closed all the same: everything it allowed is in
        // flight, unacknowledged. Seen 2026-12-07 (tests/proxy.rs beside a busy loop, 1 run in
        // 3-6): an upstream that had stopped reading last advertised 93 KiB, acknowledged nothing
        // for the 550 ms before the client's reset with 16.5 MB queued toward it, the direction
        // was never sheltered, and the reset lost the 4.1 MB parked meanwhile.
        if !frozen && dst_tcp.snd_wnd.is_some_and(|w| w >= PARTNER_READS_WINDOW) && !window_used_up(dst, dst_tcp) {
            return false;
        }
        let Ok(m) = self.measure(cookie, d) else { return false };
        let Ok(mem) = sys::socket_memory(dst) else { return false };
        // At most what the direction may hold besides (its budget, `hold` parked): bytes parked
        // beyond that are a runaway's (item 11), which the reset bounds; raising for them took
        // two 256 MiB writes whole into the send queues.
        let cap = 2 * SPLICED_SNDBUF as u64 + 2 * (self.limits.per_direction + HOLD_AT) + UNSTICK_SLACK;
        let raised =
            (mem.wmem_queued.max(2 * SPLICED_SNDBUF as u64) + 2 * (m.in_flight + parked) + UNSTICK_SLACK).min(cap);
        if frozen && mem.sndbuf >= raised {
            return false;
        }
        if mem.sndbuf < raised && !raise_send_buffer(dst, raised, clamp_c_int(mem.sndbuf / 2).max(SPLICED_SNDBUF)) {
            return false;
        }
        if frozen {
            log::debug!("kernel datapath: socket {cookie:#x}: {parked} parked byte(s) now, partner's buffer topped up");
            return true;
        }
        let queued = sys::send_queue_len(dst).unwrap_or(0);
        if d.held.is_none() {
            if let Err(e) = sys::set_recv_buffer(src, 1) {
                log::debug!("kernel datapath: cannot close socket {cookie:#x}'s window: {e}");
            } else {
                self.holds += 1;
                self.directions.get_mut(&cookie).expect("present").held = Some(0);
            }
        }
        let d = self.directions.get_mut(&cookie).expect("present");
        d.frozen = true;
        d.shelter_base = Some(queued);
        self.unsticks += 1;
        log::debug!(
            "kernel datapath: socket {cookie:#x}'s partner does not read: its {parked} parked byte(s) move to the \
             partner's send queue, out of reach of its client's reset"
        );
        true
    }

    /// Gives a frozen direction its budget back once its destination's client has read the send
    /// queue down to the usual send buffer; false while it stays frozen.
    fn thaw(&mut self, cookie: u64) -> bool {
        let Some(d) = self.directions.get(&cookie) else { return true };
        if !d.frozen {
            return true;
        }
        // A sheltered direction's parked bytes move first: thawed with them still parked, it was
        // sheltered again at the next look, four times over the same 27.5 MB, which a reset
        // 20-30 ms later then threw away (a helper's pass).
        if d.parked.is_some() && self.counts.get(&cookie, 0).is_ok_and(|c| c.parked != d.taken) {
            return false;
        }
        let dst = borrow_fd(d.dst);
        match sys::socket_memory(dst) {
            Ok(mem) if mem.wmem_queued < 2 * SPLICED_SNDBUF as u64 => {}
            _ => return false,
        }
        if let Err(e) = sys::set_send_buffer(dst, SPLICED_SNDBUF) {
            log::debug!("kernel datapath: cannot lower socket {:#x}'s send buffer: {e}", d.peer);
        }
        let d = self.directions.get_mut(&cookie).expect("present");
        d.frozen = false;
        d.shelter_base = None;
        if d.parked.is_none() {
            if let Ok(m) = self.measure(cookie, self.directions.get(&cookie).expect("present")) {
                self.grant(cookie, m);
            }
        }
        // A window closed while frozen (`shelter`) opens again now, not at the next parking.
        self.hold_back(cookie);
        true
    }

    /// Whether the destination's client acknowledged bytes since the last look: it reads, so
    /// room will come soon (a receiver that keeps up is not made to wait for a backed-off timer).
    fn destination_reads(&mut self, cookie: u64) -> bool {
        let Some(d) = self.directions.get_mut(&cookie) else { return false };
        let Ok(c) = sys::tcp_counters(borrow_fd(d.dst)) else { return false };
        let reads = c.bytes_acked != d.dst_acked;
        d.dst_acked = c.bytes_acked;
        reads
    }

    /// `Splice::discard`: the destination of direction `cookie` was reset by its own client.
    /// What the source parked for it is taken and dropped, and the verdict gets a budget it
    /// never reaches, so it redirects every skb toward the reset socket, where the kernel drops
    /// it: that socket's psock stopped sending at its first failed send (KERNEL-NOTES item 21;
    /// 134 GB in 8 s, no memory held). Kept parked, those bytes filled the source's
    /// receive buffer and its client, blocked writing them, stopped reading what the reset
    /// client had sent it (an echo server behind the proxy: the pair waited until
    /// --idle-timeout, holding 27 MB; a helper's pass).
    fn discard(&mut self, cookie: u64) -> io::Result<()> {
        let Some(d) = self.directions.get_mut(&cookie) else { return Ok(()) };
        if !d.discarding {
            d.discarding = true;
            d.discarding_from = self.counts.get(&cookie, 0).map_or(0, |c| c.redirected);
            d.frozen = false;
            d.shelter_base = None;
            log::debug!("kernel datapath: socket {cookie:#x}'s partner was reset by its client: its bytes are dropped");
        }
        let src = borrow_fd(d.src);
        // A window closed by `hold_back` opens again; the reads below advertise it.
        if let Some(clamp) = d.held.take() {
            let _ = sys::set_recv_buffer(src, SPLICED_RCVBUF);
            let _ = sys::set_tcp_window_clamp(src, if clamp > 0 { clamp } else { WINDOW_CLAMP_BACK });
        }
        if self.scratch.is_empty() {
            self.scratch = vec![0u8; CATCH_UP_MAX];
        }
        for _ in 0..UNPARK_ROUNDS {
            sys::drop_received(src, &mut self.scratch, super::DISCARD_PER_CALL)?;
            let parked = self.counts.get(&cookie, 0).map_err(|e| io::Error::other(bpf::chain(&e)))?.parked;
            let d = self.directions.get_mut(&cookie).expect("present");
            (d.taken, d.unconsumed, d.parked) = (parked, 0, None);
            let never = u64::MAX / 2;
            let peer = RelayPeer {
                peer: d.peer,
                budget: never,
                notify: never,
                taken: parked,
                hold: never,
                base: d.base,
                limit: 0,
            };
            self.peers.insert(cookie, peer, 0).map_err(|e| io::Error::other(bpf::chain(&e)))?;
            // A skb parked between the count and the write: take it too.
            if self.counts.get(&cookie, 0).is_ok_and(|c| c.parked == parked) {
                break;
            }
        }
        Ok(())
    }

    /// Moves a parked direction's bytes on if its destination has room: Ok(true) when the
    /// verdict redirects again, Ok(false) when nothing could move, Err(Progress) when some did.
    ///
    /// The verdict parks every skb while `taken` differs from its parked count, so none
    /// overtakes. Catching up with a source that keeps sending is the hard part: every byte read
    /// frees receive memory and the window update lets the sender refill at once, so taking and
    /// writing in turns seldom caught up (70-90% of a 1 GiB bulk transfer went through user space
    /// once it parked). So parked bytes are **peeked** and written on, and consumed only once
    /// `taken` is published: meanwhile the receive memory stays charged, the source's window
    /// closes (its receive buffer is fixed at join, `SPLICED_RCVBUF`) and its sender stops, so
    /// user space catches up.
    fn unpark(&mut self, cookie: u64) -> Result<bool, Progress> {
        // A frozen direction's parked bytes move too, into the room its destination's raised
        // send buffer has (`shelter`); it only gets no budget until thawed (`grant`).
        self.thaw(cookie);
        let Some(d) = self.directions.get(&cookie) else { return Ok(true) };
        if d.discarding {
            return Ok(true);
        }
        let Ok(m) = self.measure(cookie, d) else { return Ok(false) };
        // Bytes the verdict redirected before it parked may still wait on the destination's psock
        // (its backlog moves them into the send queue): written now, parked bytes would overtake
        // them. Wait until all of them are in the send queue.
        if !budget::may_unpark(m) {
            return Ok(false);
        }
        if self.scratch.is_empty() {
            self.scratch = vec![0u8; CATCH_UP_MAX];
        }
        let mut moved = false;
        let idle = |moved: bool| if moved { Err(Progress) } else { Ok(false) };
        for _ in 0..UNPARK_ROUNDS {
            let parked = match self.counts.get(&cookie, 0) {
                Ok(c) => c.parked,
                Err(_) => return Ok(false),
            };
            let d = self.directions.get(&cookie).expect("present");
            let (src, dst) = (borrow_fd(d.src), borrow_fd(d.dst));
            if d.taken == parked {
                // Caught up while frozen: it stays parked (and looked at) until thawed. What it
                // wrote on stays in the queue until then: consumed after the window is given
                // back, it makes TCP advertise the window (a sender facing a zero window learns
                // of the new one from a read, or from its next zero-window probe, backed off to
                // seconds: 20 s without it).
                if d.frozen {
                    return idle(moved);
                }
                // Caught up, everything written on: the verdict may redirect again. Then the
                // written bytes leave the socket's queue.
                let Ok(m) = self.measure(cookie, d) else { return Ok(false) };
                if self.grant(cookie, m) {
                    self.directions.get_mut(&cookie).expect("present").parked = None;
                    self.hold_back(cookie);
                    log::debug!("kernel datapath: socket {cookie:#x} redirects again");
                    return self.drop_written(cookie).map(|()| true);
                }
                continue; // a skb parked meanwhile: take it too
            }
            // Only what is in the socket's psock queue (FIONREAD counts it on a psock socket):
            // with that queue empty, tcp_bpf_recvmsg reads the TCP receive queue instead, which
            // holds bytes the verdict has not seen yet. The queue starts with the bytes written
            // on but not consumed yet.
            let ready = match sys::readable_len(src) {
                Ok(n) => n,
                Err(e) => return self.failed(cookie, e),
            };
            let have = ready.min(self.scratch.len() as u64);
            if have <= d.unconsumed {
                if d.unconsumed >= self.scratch.len() as u64 {
                    // More parked than one peek holds: consume, and catch up in several steps.
                    let before = d.unconsumed;
                    self.drop_written(cookie)?;
                    if self.directions.get(&cookie).is_some_and(|d| d.unconsumed < before) {
                        moved = true;
                        continue;
                    }
                    return idle(moved);
                }
                return idle(moved); // the rest is still on its way (psock backlog)
            }
            let want = (parked - d.taken).min(have - d.unconsumed);
            let skip = d.unconsumed as usize;
            let n = match sys::peek(src, &mut self.scratch[..skip + want as usize]) {
                Ok(n) if n > skip => n,
                Ok(_) => return idle(moved),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return idle(moved),
                Err(e) => return self.failed(cookie, e),
            };
            let written = match write_some(dst, &self.scratch[skip..n]) {
                Ok(w) => w as u64,
                Err(e) => return self.failed(cookie, e),
            };
            if written == 0 {
                return idle(moved);
            }
            moved = true;
            let d = self.directions.get_mut(&cookie).expect("present");
            d.taken += written;
            d.written += written;
            d.unconsumed += written;
        }
        idle(moved)
    }

    /// Drops from the source's psock queue the parked bytes already written on (`unconsumed`),
    /// as far as the socket lets it now.
    fn drop_written(&mut self, cookie: u64) -> Result<(), Progress> {
        let Some(d) = self.directions.get(&cookie) else { return Ok(()) };
        if d.unconsumed == 0 {
            return Ok(());
        }
        match consume(borrow_fd(d.src), d.unconsumed, &mut self.scratch) {
            Ok(n) => {
                self.directions.get_mut(&cookie).expect("present").unconsumed -= n;
                Ok(())
            }
            Err(e) => self.failed(cookie, e).map(|_| ()),
        }
    }

    /// Reading a socket took its error out of SO_ERROR: keep it for `advance` to report.
    fn failed(&mut self, cookie: u64, e: io::Error) -> Result<bool, Progress> {
        self.errors.insert(cookie, e);
        if let Some(d) = self.directions.get_mut(&cookie) {
            d.parked = Some(budget::RECHECK_MAX);
        }
        Ok(false)
    }
}

/// How long a cut pair's count waits for a psock backlog that was sending when the pair left
/// the maps (`moved_at_cut`).
const CUT_SETTLE_MAX: std::time::Duration = std::time::Duration::from_millis(5);
/// How long a failed join waits for the psock's backlog to send on what the verdict redirected
/// (`take_back`): the worker waits a tick and more on a busy machine (KERNEL-NOTES item 14).
const TAKE_BACK_MAX: std::time::Duration = std::time::Duration::from_millis(50);

/// Some parked bytes moved: look again soon.
struct Progress;

/// The most parked bytes one catch-up peeks: more than the source's receive buffer holds
/// (`SPLICED_RCVBUF`, doubled by the kernel), so the window closes before it fills.
const CATCH_UP_MAX: usize = 12 << 20;
/// Reads and writes of one look at a parked direction before other work gets its turn.
const UNPARK_ROUNDS: usize = 64;

/// Runs the bytes waiting in a socket's receive queue through the verdict: a peek goes through
/// the sockmap's receive path (KERNEL-NOTES.md). A reset that came before is returned: the peek
/// took it out of SO_ERROR.
fn kick(fd: impl AsFd) -> io::Result<()> {
    let mut byte = [0u8; 1];
    match sys::peek(fd, &mut byte) {
        // Parked bytes (the verdict passed them to this socket's own queue, where the peek
        // finds them) are the catch-up's to move: not a fault (every stream of a helper's pairs
        // that showed this was whole), so only for debugging.
        Ok(n) if n > 0 => {
            log::debug!("kernel datapath: {n} byte(s) wait in a relay socket's own queue after the kick");
            Ok(())
        }
        Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
        _ => Ok(()),
    }
}

/// Which map entries a pair holds, so a failed or finished pair removes exactly those.
#[derive(Default)]
struct Joined {
    targets: [bool; 2],
    peers: [bool; 2],
    socks: [bool; 2],
    /// Counted in `KernelState::pairs`.
    counted: bool,
}

struct KernelSplice {
    state: Arc<Mutex<KernelState>>,
    cookies: [u64; 2],
    /// bytes_acked of each socket when the pair formed (an active open counts its SYN).
    acked_base: [u64; 2],
    /// Token-line bytes received on each socket that are discarded, not relayed.
    consumed: [u64; 2],
    joined: Joined,
    /// Bytes each way a verdict moved during a join that then failed (`take_back`): splice(2)
    /// never saw them, so the pair's count adds them.
    taken_back: [u64; 2],
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
    /// Whether nothing of direction `dir` is left to reach `dst`'s client: its send queue is
    /// empty and nothing waits on its psock or in user space's hands. What else `bytes_received`
    /// counts never comes: a FIN received before the reset (no byte), and the bytes the verdict
    /// parked in the reset source's own queue, which went with its psock at the reset
    /// (KERNEL-NOTES item 12). Waiting for those held the partner until --idle-timeout once the
    /// wait after a reset was no longer 1 s (a re-check pass: a client that half-closed and then
    /// reset left its partner, which had every byte, waiting 600 s).
    fn nothing_more_to_deliver(&self, dir: usize, dst: &TcpStream) -> bool {
        if !sys::send_queue_len(dst).is_ok_and(|n| n == 0) {
            return false;
        }
        let state = locked(&self.state);
        let cookie = self.cookies[dir];
        match state.directions.get(&cookie) {
            Some(d) => state.measure(cookie, d).is_ok_and(|m| m.in_flight == 0) && d.taken == d.written,
            None => true,
        }
    }

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
        let mut state = locked(&self.state);
        let state = &mut *state;
        // The pair's place under --kernel-memory, taken before any map holds its sockets and
        // given back by `release` (counted once for every thread's datapath).
        let max = state.limits.max_pairs();
        if state.all_pairs.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_err() {
            return Err(SpliceError::OverBudget(state.limits.total));
        }
        state.pairs += 1;
        self.joined.counted = true;
        self.cookies = [sys::socket_cookie(ends[0])?, sys::socket_cookie(ends[1])?];
        let [a, b] = self.cookies;
        for end in ends {
            if let Err(e) = sys::set_send_buffer(end, SPLICED_SNDBUF) {
                log::debug!("kernel datapath: send buffer stays at its default: {e}");
            }
            if let Err(e) = sys::set_recv_buffer(end, SPLICED_RCVBUF) {
                log::debug!("kernel datapath: receive buffer stays autotuned: {e}");
            }
        }
        // What entered each destination's send queue before the join (spliced): the budget counts
        // what the verdict redirects beyond it and the send queue has not taken yet.
        let mut base = [0u64; 2];
        for (i, end) in ends.iter().enumerate() {
            base[i] = sys::tcp_counters(*end)?.bytes_acked + sys::send_queue_len(*end)?;
        }
        for (i, end) in ends.iter().enumerate() {
            state.targets.insert(self.cookies[i], end.as_raw_fd(), 0).map_err(map_full_or_io)?;
            self.joined.targets[i] = true;
        }
        for (i, (from, to)) in [(a, b), (b, a)].into_iter().enumerate() {
            // Direction i's destination is end 1-i; what it already holds counts.
            let (budget, notify) =
                budget::grant(Measure::new(base[1 - i], 0, 0, 0, base[1 - i]), state.limits.per_direction);
            state.counts.insert(from, RelayCount::default(), 0).map_err(map_full_or_io)?;
            let peer = RelayPeer {
                peer: to,
                budget,
                notify,
                taken: 0,
                hold: HOLD_AT,
                base: base[1 - i],
                limit: state.limits.per_direction,
            };
            state.peers.insert(from, peer, 0).map_err(map_full_or_io)?;
            self.joined.peers[i] = true;
            let (src, dst) = (ends[i].as_raw_fd(), ends[1 - i].as_raw_fd());
            let direction = Direction {
                src,
                dst,
                peer: to,
                base: base[1 - i],
                taken: 0,
                written: 0,
                parked: None,
                dst_acked: 0,
                unconsumed: 0,
                held: None,
                last_moved: (0, 0),
                stuck_since: None,
                frozen: false,
                runaway: false,
                runaway_since: None,
                shelter_base: None,
                discarding: false,
                discarding_from: 0,
            };
            state.directions.insert(from, direction);
        }
        // sock_map takes only established sockets. A client that half-closed since the pair chose
        // to join is seen here, before any verdict can run; one whose FIN comes between the two
        // inserts fails the second, after the first socket's verdict may have taken bytes.
        for end in ends {
            if !sys::tcp_counters(end)?.established() {
                return Err(SpliceError::NotEstablished);
            }
        }
        for (i, end) in ends.iter().enumerate() {
            if let Err(e) = state.socks.insert(self.cookies[i], end.as_raw_fd(), 0) {
                if std::mem::take(&mut self.joined.socks[0]) {
                    self.taken_back[0] = take_back(state, a, ends, base[1]).map_err(SpliceError::Cut)?;
                }
                return Err(map_full_or_io(e));
            }
            self.joined.socks[i] = true;
            if i == 0 {
                join_pause_for_tests();
            }
        }
        // Bytes that arrived before the socket joined `socks` sit in its receive queue and only go
        // through the verdict when the next segment comes; a peek runs the sockmap receive path,
        // which pushes them through now, in order (KERNEL-NOTES.md).
        for (i, end) in ends.iter().enumerate() {
            if let Err(e) = kick(*end) {
                state.errors.insert(self.cookies[i], e);
            }
        }
        Ok(())
    }
}

/// The second socket of a pair could not join `socks` (its client half-closed a moment before)
/// after the first, `a`, had: a's verdict may have taken bytes off its receive queue meanwhile,
/// redirected into the second one's psock, which `release` drops with whatever it still queues (a
/// soak lost 1,548 bytes so, and then the stream ended in an EOF), or parked in its own. So: take
/// `a` out of `socks` (its verdict stops), wait (a few ms at most) until what it redirected has
/// entered the second socket's send queue, where splice(2) continues after it in order, and
/// return that count. Parked bytes, a broken stream or a redirect that does not land cannot be
/// handed back in order: the error resets the pair.
fn take_back(state: &mut KernelState, a: u64, ends: [&TcpStream; 2], dst_base: u64) -> io::Result<u64> {
    let _ = state.socks.remove(&a);
    let Ok(c) = state.counts.get(&a, 0) else { return Ok(0) };
    let lost = |what: &str| {
        io::Error::other(format!("a client half-closed while the pair joined the kernel's socket maps, and {what}"))
    };
    if c.flags & relay_count_flags::BROKEN != 0 {
        return Err(lost("the stream it had started to redirect has a hole"));
    }
    if c.parked > 0 {
        return Err(lost(&format!("{} bytes parked meanwhile cannot be handed back in order", c.parked)));
    }
    let deadline = std::time::Instant::now() + TAKE_BACK_MAX;
    loop {
        let to = sys::tcp_counters(ends[1])?;
        if to.bytes_acked + sys::send_queue_len(ends[1])? >= dst_base + c.redirected {
            log::debug!(
                "kernel datapath: a client half-closed while its pair joined; {} bytes the verdict took meanwhile were sent on",
                c.redirected
            );
            return Ok(c.redirected);
        }
        if std::time::Instant::now() >= deadline || to.closed() {
            return Err(lost(&format!("{} bytes it redirected meanwhile did not arrive", c.redirected)));
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// Tests only: `SKRELAY_TEST_JOIN_PAUSE_MS` holds a join for that long after its first socket
/// enters `socks`, so that a test can half-close a client between the two inserts (a race a soak met
/// once in thousands of pairs). Unset, it costs one read of a static.
fn join_pause_for_tests() {
    static PAUSE: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    let pause = PAUSE.get_or_init(|| {
        std::env::var("SKRELAY_TEST_JOIN_PAUSE_MS").ok()?.parse().ok().map(std::time::Duration::from_millis)
    });
    if let Some(d) = pause {
        std::thread::sleep(*d);
    }
}

impl Splice for KernelSplice {
    fn advance(&mut self, dir: usize, src: &TcpStream, dst: &TcpStream) -> io::Result<Flow> {
        // An error taken while moving either direction ends the pair: the other direction may
        // have finished already, and its `advance` is no longer called.
        {
            let mut state = locked(&self.state);
            if let Some(e) = state.errors.remove(&self.cookies[dir]) {
                return Err(e);
            }
            if let Some(e) = state.errors.remove(&self.cookies[1 - dir]) {
                return Err(e);
            }
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

    /// A reset source received no FIN: every byte it counts is payload, to be acknowledged by
    /// the destination's client before the destination is reset (parked bytes move meanwhile).
    fn flush_reset(&mut self, dir: usize, src: &TcpStream, dst: &TcpStream) -> bool {
        {
            let state = locked(&self.state);
            // A pair reset to give back memory its window did not bound resets now: waiting for
            // the partner to read what is held would keep that memory.
            if self.cookies.iter().any(|c| state.directions.get(c).is_some_and(|d| d.runaway)) {
                return true;
            }
        }
        let (Ok(from), Ok(to)) = (sys::tcp_counters(src), sys::tcp_counters(dst)) else { return true };
        // Only the destination's own end makes waiting pointless. An error the other direction
        // took does not: it is most often its write to the reset socket, and the partner's
        // client lost what waited for it (reset 0.03-0.2 s after, 31 MB of a reply unread).
        if to.closed() {
            return true;
        }
        let sent = from.bytes_received.saturating_sub(self.consumed[dir]);
        to.bytes_acked.saturating_sub(self.acked_base[1 - dir]) >= sent || self.nothing_more_to_deliver(dir, dst)
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

    /// Out of the maps (`release`), the psock's backlog may still be sending one skb: unless the
    /// destination was reset already (nothing more goes out), wait until its send queue stops
    /// changing (a few ms at most), then count what it sent: acknowledged, or on its way to the
    /// client ahead of the reset.
    fn moved_at_cut(&mut self, dir: usize, src: &TcpStream, dst: &TcpStream, ended: bool, dst_reset: bool) -> u64 {
        let open = sys::tcp_counters(dst).is_ok_and(|c| !c.closed());
        let deadline = std::time::Instant::now() + if open { CUT_SETTLE_MAX } else { std::time::Duration::ZERO };
        let mut last = sys::send_queue_len(dst).ok();
        while std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_micros(200));
            let now = sys::send_queue_len(dst).ok();
            if now == last {
                break;
            }
            last = now;
        }
        let (Ok(from), Ok(to)) = (sys::tcp_counters(src), sys::tcp_counters(dst)) else { return 0 };
        // Sent and not acknowledged reaches the client ahead of our reset, unless the client
        // reset the destination itself (its send queue is purged).
        let in_flight = if dst_reset {
            0
        } else {
            sys::send_queue_len(dst).unwrap_or(0).saturating_sub(sys::unsent_len(dst).unwrap_or(0))
        };
        // A finished direction's FIN counts in the source's bytes_received, and is no byte. On
        // the destination it counts only once sent on, and then behind every byte of the
        // direction: `received` caps it. Taken off there too, it cut one byte off a count whose
        // client reset instead of acknowledging the FIN (999 of 1,000 bytes, all acknowledged).
        let fin = u64::from(ended);
        let received = from.bytes_received.saturating_sub(fin).saturating_sub(self.consumed[dir]);
        let sent = (to.bytes_acked + in_flight).saturating_sub(self.acked_base[1 - dir]);
        received.min(sent)
    }

    fn interest(&self) -> Interest {
        Interest::READABLE
    }

    fn discard(&mut self, dir: usize, _src: &TcpStream, _max: u64) -> io::Result<u64> {
        locked(&self.state).discard(self.cookies[dir]).map(|()| 0)
    }

    fn name(&self) -> &'static str {
        "kernel"
    }

    fn export(&self, _ex: &mut super::handover::Exporter) -> Option<super::handover::SpliceState> {
        Some(super::handover::SpliceState::Kernel(handover::export_splice(self)))
    }

    fn describe(&self) -> Option<String> {
        let state = locked(&self.state);
        let dirs: Vec<String> = self
            .cookies
            .iter()
            .enumerate()
            .map(|(i, cookie)| {
                let Some(d) = state.directions.get(cookie) else { return format!("direction {i}: not joined") };
                let counts = state.counts.get(cookie, 0).ok();
                let m = state.measure(*cookie, d).ok();
                let known = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
                format!(
                    "direction {i} {}{}{}: {} bytes redirected, {} parked (taken {}, written {}, unconsumed {}), \
                     {} in flight{}",
                    if d.parked.is_some() { "parked" } else { "redirecting" },
                    if d.held.is_some() { ", window closed" } else { "" },
                    if d.frozen { ", frozen (no budget until its destination's client reads)" } else { "" },
                    known(counts.map(|c| c.redirected)),
                    known(counts.map(|c| c.parked)),
                    d.taken,
                    d.written,
                    d.unconsumed,
                    known(m.map(|m| m.in_flight)),
                    if state.errors.contains_key(cookie) { ", an error to report" } else { "" },
                )
            })
            .collect();
        Some(dirs.join("; "))
    }

    fn release(&mut self) {
        let mut state = locked(&self.state);
        let [a, b] = self.cookies;
        for i in 0..2 {
            if std::mem::take(&mut self.joined.socks[i]) {
                let _ = state.socks.remove(&self.cookies[i]);
            }
        }
        for (i, from) in [a, b].into_iter().enumerate() {
            if std::mem::take(&mut self.joined.peers[i]) {
                if let Some(d) = state.directions.get(&from).filter(|d| d.discarding) {
                    let redirected = state.counts.get(&from, 0).map_or(d.discarding_from, |c| c.redirected);
                    state.toward_reset += redirected.saturating_sub(d.discarding_from);
                }
                let _ = state.peers.remove(&from);
                let _ = state.counts.remove(&from);
                state.directions.remove(&from);
                state.errors.remove(&from);
            }
        }
        for i in 0..2 {
            if std::mem::take(&mut self.joined.targets[i]) {
                let _ = state.targets.remove(&self.cookies[i]);
            }
        }
        if std::mem::take(&mut self.joined.counted) {
            state.pairs -= 1;
            state.all_pairs.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for KernelSplice {
    fn drop(&mut self) {
        self.release();
    }
}

/// A pair that starts in user space and moves into the kernel maps as soon as both its pipes are
/// empty: bytes spliced so far are already in the destinations' send queues, so whatever the
/// kernel redirects afterwards follows them in order. The sources need not be drained, so a
/// stream that never pauses joins too: what they still queue goes through the verdict at the
/// join's kick, less the head of an skb splice(2) read part of (cut from copied_seq).
struct Handover {
    user: Box<dyn Splice>,
    kernel: KernelSplice,
    joined: bool,
    /// Bytes (both ways) that pass through splice(2) before the pair may join.
    after: u64,
    /// It joins only once its traffic shows a stream (`STREAM_RUN`): with a `--kernel-after`
    /// above 0.
    for_streams: bool,
    /// Why the pair stays on splice(2) for good, for the log: it can no longer join.
    stays: Option<&'static str>,
    /// A source reached end of file on splice(2): its socket is no longer established.
    half_closed: bool,
    /// Bytes moved by splice(2) each way, for the log's reason when the pair never joined.
    user_moved: [u64; 2],
    /// Its last try to join found the maps or `--kernel-memory` full: if it never joins, that,
    /// not a later half-close, is why (labelled as the pairs spliced in user space from the start).
    refused: bool,
}

use super::KEPT_OUT;

/// Why a pair past --kernel-after never joined: every look found a pipe still holding bytes (its
/// reader slow or stopped) until it ended.
const PIPES_NEVER_EMPTY: &str =
    "userspace, past --kernel-after but a pipe still held bytes whenever it could have joined";

/// What shows a stream, for a pair past --kernel-after to join the maps: one direction moving
/// `STREAM_RUN` bytes while the other moves none, or both directions reading `BOTH_WAYS_READ` at
/// once. Request/response traffic (HTTP keep-alive, redis, PostgreSQL) turns around after each
/// message, and moves faster on splice(2), where one event loop wake-up serves many sockets, than
/// through the psock's worker, woken for each message: 50 wrk connections fetching 4 KiB from
/// nginx, 24k requests/s through pairs that joined against 35k on splice(2); 40 and 64 KiB
/// replies, 0.5-0.66x (helpers' passes; KERNEL-NOTES item 16).
pub const STREAM_RUN: u64 = 256 << 10;
/// See `STREAM_RUN`.
pub const BOTH_WAYS_READ: usize = 32 * 1024;

/// Why a pair past --kernel-after never joined: its traffic was request/response (`STREAM_RUN`).
const REQUEST_RESPONSE: &str = "userspace, past --kernel-after as request/response (faster on splice(2))";

/// Why a pair past --kernel-after never joined: it moved bytes one way only, and ended before
/// they made a stream (`STREAM_RUN`); its traffic never turned around, so it was no
/// request/response either (a helper's pass found 150 KB sent by `nc -N` labelled so).
const ONE_WAY_SHORT: &str = "userspace, past --kernel-after but ended one way before it showed a stream (256 KiB)";

/// Why a pair with a half-closed socket never joins (a socket does not return to ESTABLISHED).
const HALF_CLOSED: &str = "userspace: one end half-closed before the pair could join the kernel's socket maps, \
                           which take only established connections";

/// Why a pair with a socket reset (or closed) before its join never joined: "half-closed" it was
/// called (a helper's upstream that reset at once).
const CLOSED_FIRST: &str = "userspace: one end was reset or closed before the pair could join the kernel's socket \
                            maps, which take only established connections";

/// Which of the two says why `ends` could not join (`SpliceError::NotEstablished`).
pub(super) fn not_established(ends: [&TcpStream; 2]) -> &'static str {
    match ends.iter().any(|e| sys::tcp_counters(e).is_ok_and(|c| c.closed())) {
        true => CLOSED_FIRST,
        false => HALF_CLOSED,
    }
}

impl Handover {
    /// Whether the pair may join for its traffic: a stream seen (`STREAM_RUN`), or it joins
    /// whatever it moves (`--kernel-after 0`).
    fn bulk(&self) -> bool {
        !self.for_streams
            || self
                .user
                .traffic()
                .is_none_or(|t| t.longest_run >= STREAM_RUN || t.largest_read.iter().all(|&r| r >= BOTH_WAYS_READ))
    }

    /// Bytes moved one way while the pair was not in the maps: splice(2)'s count, and what a
    /// failed join's verdict moved meanwhile (`take_back`), which splice(2) never saw.
    /// Why a pair past --kernel-after that showed no stream stayed on splice(2): its traffic
    /// turned around (request/response), or it moved bytes one way only, too few for a stream.
    fn no_stream(&self) -> &'static str {
        if self.user_moved.iter().all(|&m| m > 0) {
            REQUEST_RESPONSE
        } else {
            ONE_WAY_SHORT
        }
    }

    fn spliced(&self, dir: usize, src: &TcpStream, dst: &TcpStream, ended: bool) -> u64 {
        self.user.moved(dir, src, dst, ended) + self.kernel.taken_back[dir]
    }
}

impl Splice for Handover {
    fn advance(&mut self, dir: usize, src: &TcpStream, dst: &TcpStream) -> io::Result<Flow> {
        if self.joined {
            self.kernel.advance(dir, src, dst)
        } else {
            let flow = self.user.advance(dir, src, dst);
            self.half_closed |= matches!(flow, Ok(Flow::Finished));
            self.user_moved[dir] = self.spliced(dir, src, dst, false);
            flow
        }
    }

    fn discard(&mut self, dir: usize, src: &TcpStream, max: u64) -> io::Result<u64> {
        if self.joined {
            self.kernel.discard(dir, src, max)
        } else {
            self.user.discard(dir, src, max)
        }
    }

    fn flush_reset(&mut self, dir: usize, src: &TcpStream, dst: &TcpStream) -> bool {
        if self.joined {
            self.kernel.flush_reset(dir, src, dst)
        } else {
            let delivered = self.user.flush_reset(dir, src, dst);
            self.user_moved[dir] = self.spliced(dir, src, dst, false);
            delivered
        }
    }

    fn moved_at_cut(&mut self, dir: usize, src: &TcpStream, dst: &TcpStream, ended: bool, dst_reset: bool) -> u64 {
        if self.joined {
            self.kernel.moved_at_cut(dir, src, dst, ended, dst_reset)
        } else {
            self.user.moved_at_cut(dir, src, dst, ended, dst_reset) + self.kernel.taken_back[dir]
        }
    }

    fn moved(&self, dir: usize, src: &TcpStream, dst: &TcpStream, ended: bool) -> u64 {
        if self.joined {
            // The kernel's count covers both phases: TCP_INFO counts every byte.
            self.kernel.moved(dir, src, dst, ended)
        } else {
            // Never joined: splice(2)'s own count. The pair may end before its last bytes are
            // acknowledged, so the acknowledgements would come out short.
            self.spliced(dir, src, dst, ended)
        }
    }

    fn interest(&self) -> Interest {
        if self.joined {
            self.kernel.interest()
        } else {
            self.user.interest()
        }
    }

    fn urgent_seen(&mut self, end: usize) {
        self.user.urgent_seen(end);
    }

    fn idle(&self) -> bool {
        self.joined || self.user.idle()
    }

    fn describe(&self) -> Option<String> {
        if self.joined {
            self.kernel.describe()
        } else {
            self.user.describe()
        }
    }

    fn name(&self) -> &'static str {
        if self.joined {
            "kernel, after a userspace start"
        } else if let Some(why) = self.stays {
            why
        } else if self.refused {
            KEPT_OUT
        } else if self.half_closed && self.user_moved.iter().sum::<u64>() >= self.after {
            // Past --kernel-after (perhaps within the call that ended it): the half-close kept
            // it, unless its request/response traffic had kept it already.
            if self.bulk() {
                HALF_CLOSED
            } else {
                self.no_stream()
            }
        } else if self.after > 0 && self.user_moved.iter().sum::<u64>() >= self.after && !self.bulk() {
            self.no_stream()
        } else if self.after > 0 && self.user_moved.iter().sum::<u64>() >= self.after {
            PIPES_NEVER_EMPTY
        } else if self.after > 0 {
            "userspace, below --kernel-after"
        } else {
            // A token pair before its join (not "userspace": that names a pair the kernel
            // datapath had to leave on splice(2), and the metrics label it so).
            "userspace, before joining the kernel"
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
            // Request/response so far: the rest of its traffic may still be a stream, and then
            // the half-close is why it stays (`name` says which, at its end).
            if self.refused {
                self.stays = Some(KEPT_OUT);
            } else if self.bulk() {
                self.stays = Some(HALF_CLOSED);
            }
        } else if past_after && self.bulk() && self.user.idle() {
            match self.kernel.join(ends) {
                Ok(()) => self.joined = true,
                Err(SpliceError::NotEstablished) => self.stays = Some(not_established(ends)),
                Err(SpliceError::Cut(e)) => return Err(e),
                // Stay on splice(2), and try again later: the same bytes arrive, only not
                // through the kernel.
                Err(e) => {
                    self.refused = matches!(e, SpliceError::MapFull(_) | SpliceError::OverBudget(_));
                    if self.refused {
                        warn_full_once(&e);
                    }
                    log::debug!("pair stays in user space: {e}");
                }
            }
        }
        Ok(())
    }

    fn release(&mut self) {
        self.kernel.release();
    }

    fn export(&self, ex: &mut super::handover::Exporter) -> Option<super::handover::SpliceState> {
        handover::export_handover(self, ex)
    }
}

/// `--takeover`: what the kernel datapath hands over and takes over.
#[path = "kernel_handover.rs"]
mod handover;

#[cfg(test)]
mod tests {
    use super::{not_established, rps_mask_all, rps_mask_is_empty, CLOSED_FIRST, HALF_CLOSED};
    use mio::net::TcpStream;
    use std::time::Duration;

    /// Connected pairs over loopback: (ours, as the event loop holds it; its peer).
    fn pair() -> (TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (TcpStream::from_std(ours), l.accept().unwrap().0)
    }

    #[test]
    fn a_pair_that_cannot_join_says_whether_an_end_half_closed_or_was_reset() {
        let (a, a_peer) = pair();
        let (b, _b_peer) = pair();
        a_peer.shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(not_established([&a, &b]), HALF_CLOSED);
        socket2::SockRef::from(&a_peer).set_linger(Some(Duration::ZERO)).unwrap();
        drop(a_peer);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(not_established([&b, &a]), CLOSED_FIRST);
    }

    #[test]
    fn rps_masks_read_and_written_as_the_kernel_has_them() {
        assert!(rps_mask_is_empty("0\n"));
        assert!(rps_mask_is_empty("00000000,00000000\n"));
        assert!(!rps_mask_is_empty("0000ffff\n"));
        assert!(!rps_mask_is_empty("00000001,00000000\n"));
        assert_eq!(rps_mask_all(8), "ff");
        assert_eq!(rps_mask_all(16), "ffff");
        assert_eq!(rps_mask_all(32), "ffffffff");
        assert_eq!(rps_mask_all(40), "ff,ffffffff");
        assert_eq!(rps_mask_all(65), "1,ffffffff,ffffffff");
    }
}
