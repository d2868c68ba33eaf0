//! Loopback load generator for the accel write-size sweep (scripts/accel-sweep.sh). Not part of
//! `cargo test`.
//!
//! `accel_load WRITE CONNS SECS [block|poll]` opens CONNS loopback connections inside this
//! process; on each, one thread writes WRITE bytes per write(2) for SECS seconds while another
//! reads 256 KiB at a time, blocking in read(2) (`block`, the default) or as event loops do
//! (`poll`: a non-blocking socket, poll(2) when it would block). Prints `write=W conns=N gbps=X`
//! from the bytes the readers got. Run it plain and under `skrelay accel run` to compare: both
//! ends are in this process, so both are in the cgroup.
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (write, conns, secs, poll) = match args.as_slice() {
        [w, c, s] => (w, c, s, false),
        [w, c, s, m] if m == "block" || m == "poll" => (w, c, s, m == "poll"),
        _ => {
            eprintln!("usage: accel_load WRITE_BYTES CONNS SECS [block|poll]");
            std::process::exit(2);
        }
    };
    let write: usize = write.parse().expect("WRITE_BYTES");
    let conns: usize = conns.parse().expect("CONNS");
    let secs: f64 = secs.parse().expect("SECS");

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    let mut pairs = Vec::new();
    for _ in 0..conns {
        let c = TcpStream::connect(addr).expect("connect");
        let (s, _) = listener.accept().expect("accept");
        pairs.push((c, s));
    }
    // Let every accepted end join before the first write (a send before that keeps the
    // connection on the normal path).
    thread::sleep(Duration::from_millis(100));

    let stop = Arc::new(AtomicBool::new(false));
    let got = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    let start = Instant::now();
    for (mut c, mut s) in pairs {
        let stop_w = stop.clone();
        threads.push(thread::spawn(move || {
            let buf = vec![0x5au8; write];
            while !stop_w.load(Ordering::Relaxed) {
                if c.write_all(&buf).is_err() {
                    break;
                }
            }
            let _ = c.shutdown(std::net::Shutdown::Write);
        }));
        let got = got.clone();
        threads.push(thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            s.set_nonblocking(poll).expect("set_nonblocking");
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        got.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        use std::os::fd::AsRawFd;
                        let mut pfd = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                        // SAFETY: one valid pollfd for the duration of the call.
                        unsafe { libc::poll(&mut pfd, 1, 100) };
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }));
    }
    thread::sleep(Duration::from_secs_f64(secs));
    let bytes = got.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    println!("write={write} conns={conns} gbps={:.2}", bytes as f64 * 8.0 / elapsed / 1e9);
}
