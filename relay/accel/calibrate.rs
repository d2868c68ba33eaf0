//! The default `--small-write`, measured on this machine when `accel on` (or `accel run`) sets a
//! cgroup up without the flag.
//!
//! Whether redirecting a stream of 64 KiB writes wins depends on the machine, not on accel: the
//! redirect moved such a stream at 30-38 Gbit/s on every machine measured, while plain loopback
//! TCP moved it at 11-16 Gbit/s on a 2-vCPU VM and 35-44 Gbit/s on a 16-core Xeon, with 2, 4, 8
//! or 16 of its CPUs (BENCHMARKS.md, accel). So the redirect doubles such streams on one machine
//! and slows them by 10-20% on the other. `accel on` times both paths on one loopback
//! connection (probes/calibrate.bpf.c, the bare redirect accel_msg does), and keeps 64 KiB
//! writes on the redirect only where it clearly wins.
use crate::{bpf, error::Error};
use aya::{
    maps::{HashMap, MapData, SockHash},
    programs::SkMsg,
    Ebpf,
};
use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

/// The write size the measurement streams: the smallest that the default `--small-write` may
/// leave on the redirect (`SMALL_WRITE_WINS`).
pub const WRITE: usize = 64 << 10;
/// `--small-write` where the redirect wins 64 KiB streams: writes of 64 KiB and more stay on it.
pub const SMALL_WRITE_WINS: u32 = 64 << 10;
/// `--small-write` elsewhere (or when nothing could be measured): streams of writes below
/// 128 KiB take plain TCP (256 KiB and 1 MiB writes won on every machine measured).
pub const SMALL_WRITE_SAFE: u32 = 128 << 10;
/// How much faster the redirect must be to keep 64 KiB streams. The median ratio was 1.11-1.63
/// on the 2-vCPU VM (where a 1 s stream runs 2x redirected) and 0.71-0.91 on the 16-core Xeon
/// (0.80-0.90x): the margin sits between them, so a machine where the redirect wins little keeps
/// plain TCP, which costs it only that gain, where a wrong choice the other way costs up to 20%.
pub const MARGIN: f64 = 1.15;
/// Time per round; five rounds of each path, interleaved (plain, redirect, plain, ...): about
/// 0.4 s in all.
const ROUND: Duration = Duration::from_millis(40);
const ROUNDS: usize = 5;
/// The whole measurement gives up after this long (a loopback that drops packets, a machine
/// too busy to measure), and the safe value is chosen.
pub const DEADLINE: Duration = Duration::from_secs(2);
/// Bytes the writer may be ahead of the reader: the redirect queue has no bound of its own.
const AHEAD_MAX: u64 = 8 << 20;

/// Which CPUs the measurement runs on: those of the processes the cgroup will hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// `accel on`: the cgroup's processes start elsewhere, on any CPU.
    AnyCpu,
    /// `accel run`: its command inherits this process's CPUs (`taskset`, a cpuset).
    ThisProcess,
}

/// What the measurement found: both paths' throughput for 64 KiB writes on one connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Medians of the rounds, Gbit/s.
    pub plain_gbps: f64,
    pub redirect_gbps: f64,
    /// Median of the rounds' redirect / plain ratios (each pair of rounds ran back to back).
    pub ratio: f64,
}

impl Calibration {
    /// The `--small-write` this machine gets by default.
    pub fn small_write(&self) -> u32 {
        if self.ratio >= MARGIN {
            SMALL_WRITE_WINS
        } else {
            SMALL_WRITE_SAFE
        }
    }
}

/// The default `--small-write` and why, for `accel on`'s output.
#[derive(Debug, Clone)]
pub struct Choice {
    pub small_write: u32,
    /// The measurement, or why there is none.
    pub measured: Result<Calibration, String>,
}

impl Choice {
    /// What the owner record keeps of it (`Owner::measured`): the ratio, or "none".
    pub fn record(&self) -> String {
        self.measured.as_ref().map_or("none".to_string(), |c| format!("{:.2}", c.ratio))
    }

    pub fn describe(&self) -> String {
        let size = |b: u32| format!("{}K", b >> 10);
        match &self.measured {
            // The choice rests on the ratio of rounds run back to back; the rates of all rounds
            // vary more than a pair's, so their medians can even point the other way.
            Ok(c) => format!(
                "--small-write {} (measured here: a stream of 64 KiB writes moved {:.2}x as fast redirected as on \
                 plain loopback TCP, the median of 5 pairs of rounds run back to back; 64K is chosen from \
                 {MARGIN:.2}x; median rates over all rounds, which vary more: {:.1} Gbit/s redirected, {:.1} plain)",
                size(self.small_write),
                c.ratio,
                c.redirect_gbps,
                c.plain_gbps
            ),
            Err(why) => format!("--small-write {} (not measured: {why})", size(self.small_write)),
        }
    }
}

/// Measures and chooses. A failed measurement (no loopback in this network namespace, a socket
/// already in another sk_msg map, a loopback that drops packets) chooses the safe value, as does
/// a skrelay that runs in an accelerated cgroup itself (its test connection would be accelerated).
pub fn choose(placement: Placement) -> Choice {
    let measured = match super::accelerating(std::process::id(), &[]) {
        Some(r) => Err(format!(
            "skrelay itself runs in cgroup {}, which is accelerated, so its test connection would be too; run it \
             from outside that cgroup to measure",
            r.cgroup.display()
        )),
        None => measure_within(placement, DEADLINE),
    };
    match measured {
        Ok(c) => Choice { small_write: c.small_write(), measured: Ok(c) },
        Err(e) => Choice { small_write: SMALL_WRITE_SAFE, measured: Err(e) },
    }
}

/// `measure` on a thread of its own, placed as asked, given up after `deadline` (the thread
/// then ends by its own timeouts).
fn measure_within(placement: Placement, deadline: Duration) -> Result<Calibration, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = thread::Builder::new().name("calibrate".into()).spawn(move || {
        if placement == Placement::AnyCpu {
            spread_over_online_cpus();
        }
        let _ = tx.send(measure(Instant::now() + deadline));
    });
    spawned.map_err(|e| format!("cannot start the measurement: {e}"))?;
    rx.recv_timeout(deadline + Duration::from_millis(500))
        .unwrap_or_else(|_| Err(format!("it took longer than {} s", deadline.as_secs_f64())))
}

/// Lets this thread (and the threads it starts) run on every online CPU, as the processes of a
/// cgroup set up by `accel on` may; where a cpuset forbids that, it keeps the CPUs it has.
fn spread_over_online_cpus() {
    let Ok(cpus) = aya::util::online_cpus() else { return };
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it for cpu < CPU_SETSIZE
    // (checked); sched_setaffinity reads `size_of::<cpu_set_t>()` bytes of it and only changes
    // the calling thread's mask (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in cpus.into_iter().map(|c| c as usize).filter(|&c| c < libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Five interleaved rounds of each path on fresh loopback connections (about 0.4 s). Each
/// redirect round is compared with the plain round just before it (the two ran under the same
/// load), and the median of the ratios decides; the throughputs shown are the medians.
/// An error once `deadline` has passed.
pub fn measure(deadline: Instant) -> Result<Calibration, String> {
    let mut redirect = Redirect::load().map_err(|e| e.to_string())?;
    let gbps = |(b, t): (u64, Duration)| b as f64 * 8.0 / t.as_secs_f64().max(1e-9) / 1e9;
    let (mut plain, mut redirected) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let round = stream(None, deadline).map_err(|e| format!("plain loopback stream: {}", explain(&e)))?;
        plain.push(gbps(round));
        let round = stream(Some(&mut redirect), deadline).map_err(|e| format!("redirected stream: {}", explain(&e)))?;
        redirected.push(gbps(round));
    }
    log::debug!("accel: --small-write measurement, Gbit/s per round: plain {plain:.1?}, redirected {redirected:.1?}");
    let ratio = median(plain.iter().zip(&redirected).map(|(p, r)| r / p.max(f64::MIN_POSITIVE)).collect());
    Ok(Calibration { plain_gbps: median(plain), redirect_gbps: median(redirected), ratio })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// An error of the test connection, with the likely cause where the kernel's words do not say it.
fn explain(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NetworkUnreachable | io::ErrorKind::AddrNotAvailable => {
            format!("{e} (is `lo` up in this network namespace? `ip link set lo up`)")
        }
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => format!("{e} (the loopback connection stalled)"),
        _ => e.to_string(),
    }
}

/// The calibration program, attached to its socket map.
struct Redirect {
    bpf: Ebpf,
}

impl Redirect {
    fn load() -> Result<Redirect, Error> {
        let mut bpf = bpf::load(bpf::objects::CALIBRATE)?;
        let socks_fd = {
            let socks: SockHash<&MapData, u32> = SockHash::try_from(bpf.map("cal_socks").ok_or_else(missing)?)
                .map_err(|e| bpf::unavailable_no_fallback("open the calibration socket map", &e))?;
            socks.fd().try_clone().map_err(|e| bpf::unavailable_no_fallback("open the calibration socket map", &e))?
        };
        let msg: &mut SkMsg = bpf.program_mut("cal_msg").and_then(|p| p.try_into().ok()).ok_or_else(missing)?;
        msg.load().map_err(|e| bpf::unavailable_no_fallback("load the calibration sk_msg program", &e))?;
        msg.attach(&socks_fd).map_err(|e| bpf::unavailable_no_fallback("attach the calibration sk_msg program", &e))?;
        Ok(Redirect { bpf })
    }

    /// Puts both ends of one connection in the map, each redirecting into the other.
    fn join(&mut self, a: &TcpStream, b: &TcpStream) -> io::Result<()> {
        let broken = |e: aya::maps::MapError| match &e {
            aya::maps::MapError::SyscallError(s) => io::Error::new(s.io_error.kind(), format!("{e}: {}", s.io_error)),
            _ => io::Error::other(e.to_string()),
        };
        let (pa, pb) = (u32::from(a.local_addr()?.port()), u32::from(b.local_addr()?.port()));
        let mut peers: HashMap<&mut MapData, u32, u32> =
            HashMap::try_from(self.bpf.map_mut("cal_peers").ok_or_else(|| io::Error::other("no map cal_peers"))?)
                .map_err(broken)?;
        // The previous round's connection is closed (its sockets left `cal_socks` with it).
        let old: Vec<u32> = peers.keys().filter_map(Result::ok).collect();
        for k in old {
            peers.remove(&k).map_err(broken)?;
        }
        peers.insert(pa, pb, 0).map_err(broken)?;
        peers.insert(pb, pa, 0).map_err(broken)?;
        let mut socks: SockHash<&mut MapData, u32> =
            SockHash::try_from(self.bpf.map_mut("cal_socks").ok_or_else(|| io::Error::other("no map cal_socks"))?)
                .map_err(broken)?;
        socks.insert(pa, a.as_raw_fd(), 0).map_err(broken)?;
        socks.insert(pb, b.as_raw_fd(), 0).map_err(broken)?;
        Ok(())
    }
}

fn missing() -> Error {
    Error::BpfUnavailable {
        reason: "the embedded calibration object is incomplete".into(),
        fix: "rebuild skrelay".into(),
    }
}

/// One round: a writer streams 64 KiB writes for `ROUND` at a blocking reader on another
/// thread. Returns the bytes the reader got and the time from the first write to its last read.
fn stream(redirect: Option<&mut Redirect>, deadline: Instant) -> io::Result<(u64, Duration)> {
    let late = || io::Error::new(io::ErrorKind::TimedOut, "no time left");
    let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()).ok_or_else(late)?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let mut writer = TcpStream::connect_timeout(&listener.local_addr()?, left)?;
    listener.set_nonblocking(true)?;
    let (mut reader, _) = listener.accept()?; // connected: the connection is in the backlog
    reader.set_nonblocking(false)?;
    writer.set_write_timeout(Some(left))?;
    drop(listener);
    if let Some(r) = redirect {
        r.join(&writer, &reader)?;
    }
    // The reader wakes now and then to see whether the writer is done: a redirected socket's
    // blocked read can also end in EAGAIN (tcp_bpf_recvmsg), which it retries.
    reader.set_read_timeout(Some(Duration::from_millis(20)))?;
    let total = Arc::new(AtomicU64::new(u64::MAX));
    let taken = Arc::new(AtomicU64::new(0));
    let (t, k) = (Arc::clone(&total), Arc::clone(&taken));
    let start = Instant::now();
    let read_side = thread::spawn(move || -> io::Result<(u64, Instant)> {
        let mut buf = vec![0u8; 256 << 10];
        let (mut got, mut last) = (0u64, Instant::now());
        while got < t.load(Ordering::Acquire) && Instant::now() < deadline {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    got += n as u64;
                    last = Instant::now();
                    k.store(got, Ordering::Release);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((got, last))
    });
    let chunk = vec![0x5au8; WRITE];
    let mut sent = 0u64;
    let result = (|| {
        while start.elapsed() < ROUND && Instant::now() < deadline {
            while sent.saturating_sub(taken.load(Ordering::Acquire)) > AHEAD_MAX {
                if read_side.is_finished() {
                    return Err(io::Error::other("the reader stopped early"));
                }
                thread::yield_now();
            }
            writer.write_all(&chunk)?;
            sent += WRITE as u64;
        }
        Ok(())
    })();
    total.store(if result.is_ok() { sent } else { 0 }, Ordering::Release);
    let read = read_side.join().map_err(|_| io::Error::other("the reader panicked"))?;
    result?;
    let (got, last) = read?;
    if got != sent {
        return Err(io::Error::new(io::ErrorKind::TimedOut, format!("{got} of {sent} bytes arrived in time")));
    }
    Ok((got, last.saturating_duration_since(start)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redirect_keeps_64k_streams_only_where_it_clearly_wins() {
        let c = |ratio| Calibration { plain_gbps: 20.0, redirect_gbps: 20.0 * ratio, ratio };
        assert_eq!(c(2.0).small_write(), SMALL_WRITE_WINS);
        assert_eq!(c(1.15).small_write(), SMALL_WRITE_WINS);
        assert_eq!(c(1.14).small_write(), SMALL_WRITE_SAFE);
        assert_eq!(c(0.75).small_write(), SMALL_WRITE_SAFE);
        let choice = Choice { small_write: SMALL_WRITE_SAFE, measured: Err("no loopback".into()) };
        assert_eq!(choice.describe(), "--small-write 128K (not measured: no loopback)");
    }
}
