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
/// How much faster the redirect must be to keep 64 KiB streams: one round of each path swings
/// by up to 30% on a busy machine, and a wrong choice for the redirect costs up to 20%, a wrong
/// choice for plain TCP only the redirect's gain.
pub const MARGIN: f64 = 1.25;
/// Time per round; two rounds of each path, interleaved (plain, redirect, plain, redirect).
const ROUND: Duration = Duration::from_millis(60);
/// Bytes the writer may be ahead of the reader: the redirect queue has no bound of its own.
const AHEAD_MAX: u64 = 8 << 20;

/// What the measurement found: both paths' throughput for 64 KiB writes on one connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    pub plain_gbps: f64,
    pub redirect_gbps: f64,
}

impl Calibration {
    /// The `--small-write` this machine gets by default.
    pub fn small_write(&self) -> u32 {
        if self.redirect_gbps >= MARGIN * self.plain_gbps {
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
    pub fn describe(&self) -> String {
        let size = |b: u32| format!("{}K", b >> 10);
        match &self.measured {
            Ok(c) => format!(
                "--small-write {} (measured here: a stream of 64 KiB writes moved at {:.1} Gbit/s redirected, {:.1} on \
                 plain loopback TCP, {:.2}x; 64 KiB streams stay redirected from {MARGIN:.2}x)",
                size(self.small_write),
                c.redirect_gbps,
                c.plain_gbps,
                c.redirect_gbps / c.plain_gbps.max(f64::MIN_POSITIVE)
            ),
            Err(why) => format!("--small-write {} (not measured: {why})", size(self.small_write)),
        }
    }
}

/// Measures and chooses. A failed measurement (no loopback in this network namespace, a socket
/// already in another sk_msg map) chooses the safe value.
pub fn choose() -> Choice {
    match measure() {
        Ok(c) => Choice { small_write: c.small_write(), measured: Ok(c) },
        Err(e) => Choice { small_write: SMALL_WRITE_SAFE, measured: Err(e) },
    }
}

/// Two interleaved rounds of each path on fresh loopback connections (about 0.3 s).
pub fn measure() -> Result<Calibration, String> {
    let mut redirect = Redirect::load().map_err(|e| e.to_string())?;
    let (mut plain_bytes, mut plain_time, mut red_bytes, mut red_time) = (0, Duration::ZERO, 0, Duration::ZERO);
    for _ in 0..2 {
        let (b, t) = stream(None).map_err(|e| format!("plain loopback stream: {e}"))?;
        plain_bytes += b;
        plain_time += t;
        let (b, t) = stream(Some(&mut redirect)).map_err(|e| format!("redirected stream: {e}"))?;
        red_bytes += b;
        red_time += t;
    }
    let gbps = |b: u64, t: Duration| b as f64 * 8.0 / t.as_secs_f64().max(1e-9) / 1e9;
    Ok(Calibration { plain_gbps: gbps(plain_bytes, plain_time), redirect_gbps: gbps(red_bytes, red_time) })
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
                .map_err(|e| bpf::unavailable("open the calibration socket map", &e))?;
            socks.fd().try_clone().map_err(|e| bpf::unavailable("open the calibration socket map", &e))?
        };
        let msg: &mut SkMsg = bpf.program_mut("cal_msg").and_then(|p| p.try_into().ok()).ok_or_else(missing)?;
        msg.load().map_err(|e| bpf::unavailable("load the calibration sk_msg program", &e))?;
        msg.attach(&socks_fd).map_err(|e| bpf::unavailable("attach the calibration sk_msg program", &e))?;
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
fn stream(redirect: Option<&mut Redirect>) -> io::Result<(u64, Duration)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let mut writer = TcpStream::connect(listener.local_addr()?)?;
    let (mut reader, _) = listener.accept()?;
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
        while got < t.load(Ordering::Acquire) {
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
        while start.elapsed() < ROUND {
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
        return Err(io::Error::other(format!("{got} of {sent} bytes arrived")));
    }
    Ok((got, last.saturating_duration_since(start)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redirect_keeps_64k_streams_only_where_it_clearly_wins() {
        let c = |r| Calibration { plain_gbps: 20.0, redirect_gbps: r };
        assert_eq!(c(40.0).small_write(), SMALL_WRITE_WINS);
        assert_eq!(c(25.0).small_write(), SMALL_WRITE_WINS);
        assert_eq!(c(24.9).small_write(), SMALL_WRITE_SAFE);
        assert_eq!(c(15.0).small_write(), SMALL_WRITE_SAFE);
        let choice = Choice { small_write: SMALL_WRITE_SAFE, measured: Err("no loopback".into()) };
        assert_eq!(choice.describe(), "--small-write 128K (not measured: no loopback)");
    }
}
