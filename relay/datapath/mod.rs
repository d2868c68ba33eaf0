//! How the bytes of a spliced pair move: in the kernel (sk_skb programs on a SOCKHASH) or in user
//! space (splice(2) through pipes). The pairing and proxy code see only these two traits.
pub mod budget;
pub mod handover;
pub mod kernel;
pub mod userspace;

use crate::{cli::DatapathChoice, error::Error};
use mio::{net::TcpStream, Interest};
use std::{io, os::fd::RawFd, time::Instant};

/// Where one direction of a pair stands after `Splice::advance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Still open; the next readiness event moves it on.
    Open,
    /// More is ready to move than one call moves: call again soon (fairness between pairs).
    Again,
    /// The source has reached end of file but some of its bytes have not left yet: look again
    /// after a short delay.
    Flushing,
    /// The source has reached end of file and every byte it sent left through the destination:
    /// the destination's write side may be shut down now. A reset source has reached end of file
    /// too: the caller tells the two apart by the source's SO_ERROR before it shuts anything down.
    Finished,
}

/// The shape of a pair's traffic (`Splice::traffic`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// The most bytes one read took from each direction's source.
    pub largest_read: [usize; 2],
    /// The most bytes one direction moved while the other moved none: a request/response
    /// exchange turns around after each message, a stream does not.
    pub longest_run: u64,
}

/// The most bytes one `Splice::discard` call drops: a fast sender toward a reset client is not
/// read for long at a time, and the pair looks again soon.
pub const DISCARD_PER_CALL: usize = 4 << 20;

/// The path (`Splice::name`) of a pair the kernel datapath carried on splice(2) because its maps
/// or `--kernel-memory` were full (until 2026-12-08 the bare "userspace" of the userspace
/// datapath, which gave no reason where every other pair kept on splice(2) said why: a new-user
/// pass).
pub const KEPT_OUT: &str = "userspace, the socket map or --kernel-memory was full";

/// Whether a pair's path says splice(2) alone carries it: the userspace datapath's pairs, and
/// those the kernel datapath kept out (`KEPT_OUT`). The pair metrics count both under `userspace`.
pub fn spliced_alone(path: &str) -> bool {
    path == "userspace" || path == KEPT_OUT
}

/// One spliced pair's state in a datapath. Directions are numbered by their source: 0 moves
/// bytes from end 0 to end 1, 1 the other way.
pub trait Splice: Send {
    /// Moves what can move now from `src` to `dst` and says where the direction stands.
    fn advance(&mut self, dir: usize, src: &TcpStream, dst: &TcpStream) -> io::Result<Flow>;
    /// `src` was reset (its error taken): moves what it still holds toward `dst`, and says
    /// whether `dst`'s client has acknowledged every byte `src` received, so that resetting
    /// `dst` now loses none of them. An error moving them: nothing more can be delivered.
    fn flush_reset(&mut self, dir: usize, src: &TcpStream, dst: &TcpStream) -> bool {
        match self.advance(dir, src, dst) {
            Ok(Flow::Finished) => crate::sys::send_queue_len(dst).map_or(true, |n| n == 0),
            Ok(_) => false,
            Err(_) => true,
        }
    }
    /// Payload bytes moved so far in `dir`: handed to the destination's peer, not merely taken
    /// in. `ended`: the direction finished and the destination's write side was shut down (so a
    /// FIN was received on `src` and sent on `dst`, neither of them a byte).
    fn moved(&self, dir: usize, src: &TcpStream, dst: &TcpStream, ended: bool) -> u64;
    /// Payload bytes moved in `dir` by a pair that is cut or reset: called after `release`, once
    /// its sockets are reset (`sys::abort`), or, where that is refused, just before the close
    /// that resets them. The reset throws away what the destination's send queue holds unsent;
    /// what was sent reaches its client before the reset (a client whose window is closed has
    /// nothing in flight: a zero-window probe carries no new byte). `dst_reset`: the
    /// destination's own client reset it before the cut, and it lost its whole send queue.
    /// `ended` as for `moved` (a direction that finished: its FIN, no byte, may still be
    /// queued). By default `moved` less what was lost.
    fn moved_at_cut(&mut self, dir: usize, src: &TcpStream, dst: &TcpStream, ended: bool, dst_reset: bool) -> u64 {
        self.moved(dir, src, dst, ended).saturating_sub(lost_at_cut(dst, ended, dst_reset))
    }
    /// The readiness this datapath needs from both sockets.
    fn interest(&self) -> Interest;
    /// End `end`'s socket reported urgent data (EPOLLPRI, where `interest` asks for it): from
    /// now on a read from it that finds nothing may have stopped at its urgent mark.
    fn urgent_seen(&mut self, _end: usize) {}
    /// Takes the pair out of the datapath; called before its sockets are closed.
    fn release(&mut self);
    /// Which datapath moves this pair's bytes, for the log.
    fn name(&self) -> &'static str;
    /// Direction `dir`'s destination was reset by its own client: nothing its source sends can
    /// reach it any more. Takes what the source has for it and drops it, so that the source's
    /// client, which may be blocked writing to it, goes on reading what the reset end sent (an
    /// echo server behind the proxy stopped, and the pair waited for it until --idle-timeout).
    /// Never counted as moved. Drops at most `max` bytes (and `DISCARD_PER_CALL` a call) and
    /// says how many it read; the kernel datapath drops all that comes from then on, in the
    /// kernel, at the sender's cost. Err: reading the source failed (its client reset too).
    fn discard(&mut self, _dir: usize, src: &TcpStream, max: u64) -> io::Result<u64> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 64 * 1024]);
        }
        let max = usize::try_from(max).unwrap_or(usize::MAX).min(DISCARD_PER_CALL);
        SCRATCH.with(|s| crate::sys::drop_received(src, &mut s.borrow_mut(), max)).map(|n| n as u64)
    }
    /// Nothing taken from the sources waits in user space: every byte moved so far is in the
    /// destinations' send queues (what the sources still queue may be partly read: the kernel's
    /// verdict cuts off what was read, from copied_seq), and no source has ended.
    fn idle(&self) -> bool {
        false
    }
    /// What the pair's traffic looked like so far: how a pair on splice(2) tells a stream from
    /// request/response traffic, which the kernel datapath carries more slowly. None: unknown.
    fn traffic(&self) -> Option<Traffic> {
        None
    }
    /// Where the pair's bytes stand inside the datapath, for the log of a pair that does not
    /// finish when asked to (drain).
    fn describe(&self) -> Option<String> {
        None
    }

    /// Called after both directions advanced: a chance to change how the pair is spliced.
    fn settle(&mut self, _ends: [&TcpStream; 2]) -> io::Result<()> {
        Ok(())
    }
    /// The pair's state for the skrelay that takes over (`--takeover`), with the descriptors it
    /// names recorded in `ex`; None if this splice cannot be handed over.
    fn export(&self, _ex: &mut handover::Exporter) -> Option<handover::SpliceState> {
        None
    }
}

/// A way of splicing pairs.
pub trait Datapath: Send {
    fn name(&self) -> &'static str;
    /// Starts splicing `ends`. The first `skip[i]` bytes queued on end `i` (a token line, seen
    /// with MSG_PEEK and still queued) are discarded, never forwarded. Every reason the kernel
    /// cannot take a pair (a full map, a socket no longer established) is the datapath's to
    /// answer, with a splice(2) pair: an error means the pair cannot be spliced at all.
    fn splice(&mut self, ends: [&TcpStream; 2], skip: [u32; 2]) -> Result<Box<dyn Splice>, SpliceError>;
    /// Counters for the exit log, which the caller sums over every thread's datapath.
    fn tally(&self) -> Vec<u64> {
        Vec::new()
    }
    /// One line of counters for the exit log, from `tally` summed over the threads' datapaths;
    /// None if the datapath keeps none.
    fn summary(&self, _tally: &[u64]) -> Option<String> {
        None
    }
    /// A descriptor the event loop watches for the datapath's own events; when it is readable,
    /// or when the instant `tend` returned has passed, the loop calls `tend`.
    fn events(&self) -> Option<RawFd> {
        None
    }
    /// Acts on the datapath's own events and timers; returns when it wants to run again.
    fn tend(&mut self, _now: Instant) -> Option<Instant> {
        None
    }
    /// Bytes inside the kernel between the sockets of this datapath's pairs: taken from one
    /// socket and not yet in the other's send queue.
    fn in_flight(&self) -> u64 {
        0
    }
    /// After a takeover: (kernel pairs of every thread, how many `--kernel-memory` makes room
    /// for) when the pairs carried on are more than this process's limits allow; None otherwise.
    fn over_limits(&self) -> Option<(usize, usize)> {
        None
    }
    /// What the datapath itself hands over beside its pairs (the kernel maps while pairs are in
    /// them); None: nothing.
    fn export(&self, _ex: &mut handover::Exporter) -> Option<handover::KernelMaps> {
        None
    }
    /// Takes over the old process's kernel maps: checked now, installed by `install`. Nothing
    /// is changed here, so a handover that does not go through leaves this datapath as it was.
    fn check_maps(
        &self,
        _maps: &handover::KernelMaps,
        _fds: &mut handover::Fds,
    ) -> Result<Box<dyn std::any::Any>, String> {
        Err(format!(
            "the old process has pairs in the kernel maps and this one runs the {} datapath (start it with \
             --datapath kernel)",
            self.name()
        ))
    }
    /// Uses the maps `check_maps` accepted from now on; called before any pair is spliced.
    fn install_maps(&mut self, _checked: Box<dyn std::any::Any>) {}
    /// A pair handed over, carried on with `ends` (this process's descriptors). `fds` holds the
    /// pipes it names.
    fn import(
        &mut self,
        state: handover::SpliceState,
        ends: [&TcpStream; 2],
        fds: &mut handover::Fds,
    ) -> io::Result<Box<dyn Splice>> {
        let _ = ends;
        match state.into_pipes() {
            Some(dirs) => userspace::import(dirs, fds),
            None => Err(io::Error::other(format!("the {} datapath cannot carry on a kernel pair", self.name()))),
        }
    }
    /// Whether `import` can carry on a pair in this state: asked of every pair before the old
    /// process lets go of any (a pair refused after that would be reset).
    fn carries(&self, state: &handover::SpliceState) -> bool {
        state.pipes_only()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("the kernel socket map is full ({0} sockets)")]
    MapFull(u32),
    #[error("a socket that is not established (e.g. already half-closed) cannot join a socket map")]
    NotEstablished,
    #[error("the kernel pairs hold the whole --kernel-memory budget ({0} bytes)")]
    OverBudget(u64),
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The kernel took bytes of the pair that cannot be handed back in order: it must be reset.
    #[error("{0}")]
    Cut(io::Error),
}

/// Opens the datapath the user chose, one for each of `threads` event loops (each its own BPF
/// programs and maps; `limits` bound the kernel pairs of all of them together). `auto` takes the
/// kernel when its programs load and says why in one warning when they do not.
/// `kernel_after`: bytes a kernel-datapath pair moves through splice(2) before it joins the maps;
/// `limits`: what kernel pairs may hold (budget.rs).
/// `skrelay probe`: loads and attaches the kernel datapath's programs and maps as many times as a
/// relay or proxy with the default `--threads` does (one set per event loop), then removes them.
/// One set said ok where a relay with two loops ran out of memory (a helper's resource-limits
/// pass: a memory cgroup too small for the second set).
pub fn probe() -> Result<String, Error> {
    let loops = std::thread::available_parallelism().map_or(1, |n| n.get());
    // `probe` has no --datapath: a fix naming it means relay's and proxy's (a re-check pass ran
    // `probe --datapath userspace`).
    let loaded = open(DatapathChoice::Kernel, 0, Default::default(), loops)
        .map_err(|e| crate::bpf::fallback_said_as(e, Some("run relay and proxy with --datapath userspace")))?;
    let what = match loaded.len() {
        1 => "its programs and maps loaded for 1 event loop".to_string(),
        n => format!("its programs and maps loaded for {n} event loops, one per CPU, as relay and proxy load them"),
    };
    Ok(format!("kernel datapath: ok ({what})\n"))
}

pub fn open(
    choice: DatapathChoice,
    kernel_after: u64,
    limits: budget::Limits,
    threads: usize,
) -> Result<Vec<Box<dyn Datapath>>, Error> {
    let userspace = |n| (0..n).map(|_| Box::new(userspace::UserspaceDatapath) as Box<dyn Datapath>).collect();
    if choice != DatapathChoice::Userspace {
        limits.check().map_err(Error::Usage)?;
    }
    let all_pairs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = || kernel::KernelDatapath::load(kernel_after, limits, all_pairs.clone());
    let first = match choice {
        DatapathChoice::Userspace => return Ok(userspace(threads)),
        DatapathChoice::Kernel => load()?,
        DatapathChoice::Auto => match load() {
            Ok(k) => k,
            Err(e) => {
                log::warn!("kernel datapath unavailable, splicing in user space instead: {e}");
                return Ok(userspace(threads));
            }
        },
    };
    let mut all: Vec<Box<dyn Datapath>> = vec![Box::new(first)];
    for n in 1..threads {
        if let Some(signal) = crate::sys::StopSignalsHeld::pending() {
            return Err(Error::StoppedStarting(signal));
        }
        match load() {
            Ok(k) => all.push(Box::new(k)),
            // `auto`: every loop on one datapath, said once, as when the first load fails.
            Err(e) if choice == DatapathChoice::Auto => {
                log::warn!(
                    "kernel datapath unavailable for event loop {n} (loops 0 to {}), splicing in user space instead: {e}",
                    threads - 1
                );
                return Ok(userspace(threads));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(all)
}

/// What the host's settings mean for the kernel datapath (the scheduler's autogroups, RPS on
/// `lo`), said once when `datapaths` are the kernel's: after every start-up check has passed, so
/// that a command refused at start says only why.
pub fn note_host_settings(datapaths: &[Box<dyn Datapath>]) {
    if datapaths.first().is_some_and(|d| d.name() == "kernel") {
        kernel::warn_if_workers_can_starve();
        kernel::note_if_loopback_rps_is_off();
    }
}

/// Payload bytes a cut or reset pair's destination socket holds that its client will never get
/// (see `Splice::moved_at_cut`): what is not sent yet, or, when the destination was reset by its
/// client (`reset`: its send queue purged), everything not acknowledged (SIOCOUTQ still counts
/// it). A FIN still queued counts in both and is no byte.
pub fn lost_at_cut(dst: &TcpStream, ended: bool, reset: bool) -> u64 {
    let queued = if reset { crate::sys::send_queue_len(dst) } else { crate::sys::unsent_len(dst) };
    queued.unwrap_or(0).saturating_sub(u64::from(ended))
}
