//! The kernel datapath's budget: bulk through a tiny budget keeps every byte once and in order,
//! and a pair whose two clients both read slower than they send stays within its bound. Their
//! own test binary: tests/bounded_memory.rs measures host MemAvailable and must run alone.
#[macro_use]
mod common;
use common::*;
use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    thread,
    time::{Duration, Instant},
};

/// A reader that takes at most 256 KiB each 10 ms (about 25 MB/s) until `until`, then all it can.
struct SlowReader {
    inner: TcpStream,
    until: Instant,
}

impl Read for SlowReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if Instant::now() < self.until {
            thread::sleep(Duration::from_millis(10));
            let n = buf.len().min(256 << 10);
            return self.inner.read(&mut buf[..n]);
        }
        self.inner.read(buf)
    }
}

/// Both clients of a kernel pair send as fast as they can and read slower than they send. A
/// parked skb that finds its socket's psock backlog busy with the other direction's bytes waits
/// there without being charged to the receive buffer, so parking alone did not close the
/// sender's window: such a pair held ~90 MB a direction and stalled for 20 s and more (the
/// host's TCP memory under pressure dropped segments). The datapath now clamps the window of a
/// source with more than 16 MiB parked and not taken (KERNEL-NOTES, "Bounding the relay's psock
/// queue"). Checked: what the pair holds inside the kernel (`skrelay_kernel_inflight_bytes`,
/// sampled while it runs) stays within both directions' budget and clamp threshold with room for
/// the window already advertised, and every byte arrives once, in order.
#[test]
fn two_clients_that_read_slower_than_they_send_stay_within_the_bound() {
    let _netns = enter_netns();
    if !require_bpf("two_clients_that_read_slower_than_they_send_stay_within_the_bound") {
        return;
    }
    const EACH: u64 = 256 << 20;
    /// Per direction: the budget (16 MiB), the clamp threshold (16 MiB) and the window already
    /// advertised when the clamp comes (the relay's receive buffer, 8 MiB).
    const HELD_BOUND: u64 = 2 * (40 << 20);
    let relay = Skrelay::start(&["relay", "--datapath", "kernel", "--kernel-after", "0", "--metrics", "127.0.0.1:0"]);
    let a = connect("127.0.0.1:7777".parse().unwrap());
    let b = connect("127.0.0.1:7777".parse().unwrap());
    let slow_until = Instant::now() + Duration::from_secs(6);
    let side = |s: TcpStream, seed: u64| {
        let mut w = s.try_clone().unwrap();
        let writer = thread::spawn(move || {
            let sha = send_pattern(&mut w, seed, EACH)?;
            w.shutdown(Shutdown::Write)?;
            Ok::<_, std::io::Error>(sha)
        });
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let reader = thread::spawn(move || recv_all(&mut SlowReader { inner: s, until: slow_until }));
        (writer, reader)
    };
    let (wa, ra) = side(a, 200);
    let (wb, rb) = side(b, 300);
    let mut held = 0u64;
    while !(ra.is_finished() && rb.is_finished()) {
        held = held.max(relay.metrics().get("skrelay_kernel_inflight_bytes"));
        thread::sleep(Duration::from_millis(100));
    }
    let (got_a, got_b) = (ra.join().unwrap(), rb.join().unwrap());
    let (sent_a, sent_b) = (wa.join().unwrap(), wb.join().unwrap());
    let (status, log) = relay.stop(Duration::from_secs(10));
    let summary = log.lines().find(|l| l.contains("kernel datapath:") && l.contains("parkings")).unwrap_or("");
    eprintln!(
        "both clients reading slower than they send: the pair held at most {:.1} MiB; {summary}",
        held as f64 / MIB_F
    );
    let (sent_a, sent_b) = (sent_a.expect("A's write"), sent_b.expect("B's write"));
    assert_eq!(got_b.as_ref().ok(), Some(&(EACH, sent_a)), "A -> B: bytes lost, duplicated or reordered\n{log}");
    assert_eq!(got_a.as_ref().ok(), Some(&(EACH, sent_b)), "B -> A: bytes lost, duplicated or reordered\n{log}");
    assert!(held <= HELD_BOUND, "the pair held {held} bytes inside the kernel (bound {HELD_BOUND})\n{log}");
    assert!(status.success(), "{log}");
}

const MIB_F: f64 = (1 << 20) as f64;

/// Bulk transfers whose directions park at a small budget over and over keep every byte, once
/// and in order. Parking closes TCP windows and brings retransmissions; a retransmitted segment
/// that overlaps bytes the socket already had reached the verdict whole (tcp_read_skb), and about
/// one 1 GiB run in ten delivered 65,483 bytes twice before the verdict cut such heads off.
#[test]
fn bulk_through_a_small_kernel_budget_keeps_every_byte_once_and_in_order() {
    let _netns = enter_netns();
    if !require_bpf("bulk_through_a_small_kernel_budget_keeps_every_byte_once_and_in_order") {
        return;
    }
    let summary = bulk_through_a_256k_budget(100);
    assert!(!summary.contains(" in 0 parkings"), "the budget never parked a direction: {summary}");
}

/// A reader that keeps up never has its sender's window closed, however often the direction
/// parks. The relay moves a parked direction's bytes out of its source's reach (`shelter`: the
/// source's window closed at the receive buffer's floor) when the destination's client does not
/// read; it took "acknowledged nothing since the last look", 0.25 ms apart, for that, which a
/// reader that keeps up also does while the psock backlog waits out its one-jiffy retry: this
/// transfer closed the window 2-8 times, each close dropped the segments on their way, and 1 GiB
/// bulk through the kernel proxy ran at 0.65x the unbounded datapath instead of 0.81x. The
/// relay now also asks for the destination's client's window to be closed. One close is
/// allowed: a reader descheduled long enough does fill its window (twice in a transfer on a loaded
/// runner, so such a transfer is tried once more).
#[test]
fn a_reader_that_keeps_up_never_has_its_senders_window_closed() {
    let _netns = enter_netns();
    if !require_bpf("a_reader_that_keeps_up_never_has_its_senders_window_closed") {
        return;
    }
    let closed_in = |summary: &str| -> u64 {
        summary
            .split(", ")
            .find_map(|part| part.strip_suffix(" windows closed for parked bytes"))
            .and_then(|n| n.parse().ok())
            .expect("the summary counts windows closed")
    };
    // A second transfer when the first closed more than once: a loaded CI runner descheduled the
    // reader twice in one transfer (one CI run; 1 of 8 runs here beside two busy loops, 0 of 18
    // without), while the fault closed it 2-8 times in every transfer.
    let mut summary = bulk_through_a_256k_budget(200);
    if closed_in(&summary) > 1 {
        summary = bulk_through_a_256k_budget(300);
    }
    let closed = closed_in(&summary);
    assert!(closed <= 1, "a reader that keeps up had its sender's window closed {closed} times, twice: {summary}");
}

/// Four rounds of 256 MiB from A to B through a kernel relay with a 256 KiB budget, B reading
/// as fast as it can; panics unless every round arrives once and in order and the relay stops
/// cleanly. Returns the relay's closing summary line (parkings, windows closed, ...).
fn bulk_through_a_256k_budget(seed: u64) -> String {
    const EACH: u64 = 256 << 20;
    let relay = Skrelay::start(&["relay", "--datapath", "kernel", "--kernel-after", "0", "--kernel-buffer", "256K"]);
    let rounds = (0..4u64).try_for_each(|round| -> Result<(), String> {
        let mut a = connect("127.0.0.1:7777".parse().unwrap());
        let mut b = connect("127.0.0.1:7777".parse().unwrap());
        let mut w = a.try_clone().unwrap();
        let writer = thread::spawn(move || {
            let sha = send_pattern(&mut w, seed + round, EACH)?;
            w.shutdown(Shutdown::Write)?;
            Ok::<_, std::io::Error>(sha)
        });
        b.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let got = recv_all(&mut b).map_err(|e| format!("round {round}: B's read: {e}"))?;
        let sent = writer.join().unwrap().map_err(|e| format!("round {round}: A's write: {e}"))?;
        if got != (EACH, sent) {
            return Err(format!("round {round}: bytes lost, duplicated or reordered"));
        }
        b.shutdown(Shutdown::Write).unwrap();
        assert_eq!(recv_all(&mut a).unwrap().0, 0);
        Ok(())
    });
    let (status, log) = relay.stop(Duration::from_secs(10));
    if let Err(e) = rounds {
        panic!("{e}\n{log}");
    }
    assert!(status.success(), "{log}");
    let summary = log.lines().find(|l| l.contains("kernel datapath:") && l.contains("parkings")).expect("summary");
    eprintln!("{summary}");
    summary.to_string()
}

/// With the default `--kernel-after`, a pair that would join the kernel maps when the
/// `--kernel-memory` budget is already held by other pairs stays on splice(2), every byte
/// intact, and the relay says so once, as it does for pairs refused at their start
/// (`--kernel-after 0`); its path label says `userspace`. Before, only the start case warned.
#[test]
fn a_pair_that_finds_the_budget_full_when_it_would_join_says_so_once() {
    if !require_bpf("a_pair_that_finds_the_budget_full_when_it_would_join_says_so_once") {
        return;
    }
    let _netns = enter_netns();
    // Room for one kernel pair: 2 x 16 MiB.
    let relay = Skrelay::start(&[
        "relay",
        "--datapath",
        "kernel",
        "--kernel-after=65536",
        "--kernel-memory",
        "32M",
        "--metrics",
        "127.0.0.1:0",
    ]);
    // Past --kernel-after (64 KiB), then idle: a pair tries to join the maps. The first joins
    // and holds the whole budget while it stays open; the next two find it full.
    let past_kernel_after = |a: &TcpStream, b: &mut TcpStream| {
        let chunk = vec![1u8; 1 << 20];
        let writer = {
            let (mut a, chunk) = (a.try_clone().unwrap(), chunk.clone());
            thread::spawn(move || a.write_all(&chunk).unwrap())
        };
        assert!(read_n(b, 1 << 20) == chunk, "bytes before the join");
        writer.join().unwrap();
        thread::sleep(Duration::from_millis(300));
    };
    let (a, mut b) = (connect(addr()), connect(addr()));
    past_kernel_after(&a, &mut b);
    for n in 0..2 {
        let (c, mut d) = (connect(addr()), connect(addr()));
        past_kernel_after(&c, &mut d);
        exchange_both_ways(c, d, [3 + n, 5 + n], 2 << 20, "a pair past the budget");
    }
    drop((a, b));
    let m = relay.wait_pairs_ended(3, Duration::from_secs(10));
    let kernel = m.paths("kernel") + m.paths("kernel, after a userspace start");
    assert_eq!(kernel, 1, "one pair joined the maps:\n{}", m.text);
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    assert_eq!(log.matches("spliced in user space until kernel pairs end").count(), 1, "{log}");
}

/// One direction keeps moving while the other client does not read (KERNEL-NOTES, "Bounding the
/// relay's psock queue", item 9). Client A uploads without reading what B sends it, as a client
/// that sends a whole request body before it reads the reply does; B streams its reply and reads
/// A's upload only after a pause, so A's direction has parked by then. A relay socket's psock
/// has one queue for both kinds of bytes: A's parked bytes waited behind B's, which wait for A to
/// read, so B stopped receiving A's upload at ~33 MB though it read (5 of 5 runs of the first
/// case before the fix; plain TCP and the userspace datapath deliver it). Cases: B's reply fits
/// in what the pair holds (20 MiB), and B's reply does not, so both directions park (64 MiB);
/// relay and proxy. In each, B must get all of A's upload while A still reads nothing, and then
/// A gets all of B's reply.
#[test]
fn one_direction_moves_while_the_other_client_does_not_read() {
    let _netns = enter_netns();
    if !require_bpf("one_direction_moves_while_the_other_client_does_not_read") {
        return;
    }
    const UPLOAD: u64 = 50 << 20;
    let upstream = std::net::TcpListener::bind("127.0.0.1:9040").unwrap();
    for (mode, reply) in [("relay", 20u64 << 20), ("relay", 64 << 20), ("proxy", 20 << 20)] {
        let what = format!("{mode}, a reply of {} MiB", reply >> 20);
        let relay = if mode == "relay" {
            Skrelay::start(&["relay", "--datapath", "kernel", "--kernel-after", "0"])
        } else {
            Skrelay::start(&["proxy", "--datapath", "kernel", "--kernel-after", "0", "--upstream", "127.0.0.1:9040"])
        };
        let a = connect(addr());
        let b = if mode == "relay" {
            thread::sleep(Duration::from_millis(50));
            connect(addr())
        } else {
            upstream.accept().unwrap().0
        };
        let spawn_send = |s: &TcpStream, seed: u64, len: u64| {
            let mut w = s.try_clone().unwrap();
            thread::spawn(move || {
                let sha = send_pattern(&mut w, seed, len)?;
                w.shutdown(Shutdown::Write)?;
                Ok::<_, std::io::Error>(sha)
            })
        };
        let (upload, reply_sent) = (spawn_send(&a, 40, UPLOAD), spawn_send(&b, 41, reply));
        // B reads only after A's direction has parked: B's relay socket's send queue and the
        // budget hold less than A's upload.
        thread::sleep(Duration::from_millis(1500));
        let mut b_reader = b.try_clone().unwrap();
        b_reader.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let got = recv_all(&mut b_reader);
        let upload = upload.join().unwrap();
        let mut problem = match (&got, &upload) {
            (Ok(got), Ok(sent)) if *got == (UPLOAD, sent.clone()) => None,
            _ => Some(format!(
                "B did not get A's upload while A did not read: got {got:?}, upload {upload:?} (the stall at the \
                 other client's queue)"
            )),
        };
        let mut a_reader = a.try_clone().unwrap();
        a_reader.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let got = recv_all(&mut a_reader);
        let sent = reply_sent.join().unwrap();
        match (&got, &sent) {
            (Ok(got), Ok(sent)) if *got == (reply, sent.clone()) => {}
            _ => problem = problem.or(Some(format!("A did not get B's reply whole: got {got:?}, sent {sent:?}"))),
        }
        drop((a, b, a_reader, b_reader));
        if let Some(problem) = problem {
            let (_, log) = relay.stop(Duration::from_secs(10));
            panic!("{what}: {problem}\n{log}");
        }
        let (status, log) = relay.stop(Duration::from_secs(10));
        assert!(status.success(), "{what}\n{log}");
        let summary = log.lines().find(|l| l.contains("kernel datapath:") && l.contains("parkings")).unwrap_or("");
        eprintln!("{what}: {summary}");
    }
}

/// Two clients of one pair that each write hundreds of MiB in a single write(2) and never read
/// are not allowed to fill the host. Parked skbs that wait in a psock's queue are charged to no
/// socket, so the window stays open while that queue is not empty, and the psock's worker that
/// empties it runs on the CPU of the writer, which one long write keeps: before the reset, two
/// writes of 400 MiB made one pair hold 790 MB in the kernel (KERNEL-NOTES, item 11). Checked:
/// the pair either stays within the documented bound or is reset once a direction has held more
/// than 64 MiB parked for 2 s; then the kernel holds nothing for it and the relay serves the next
/// pair.
#[test]
fn two_clients_that_write_huge_blocks_without_reading_cannot_fill_the_host() {
    let _netns = enter_netns();
    if !require_bpf("two_clients_that_write_huge_blocks_without_reading_cannot_fill_the_host") {
        return;
    }
    const BLOCK: usize = 256 << 20;
    /// README: a pair whose clients do not read holds at most 2 x (--kernel-buffer + 40 MiB).
    const PAIR_BOUND: u64 = 2 * ((16 << 20) + (40 << 20));
    let relay = Skrelay::start(&["relay", "--datapath", "kernel", "--kernel-after", "0", "--metrics", "127.0.0.1:0"]);
    let block = pattern_block(60, BLOCK);
    let (a, b) = paired_clients();
    let writers: Vec<_> = [&a, &b]
        .into_iter()
        .map(|s| {
            let (mut w, block) = (s.try_clone().unwrap(), block.clone());
            // One write(2) of the whole block: the kernel sends it in one call.
            thread::spawn(move || w.write(&block))
        })
        .collect();
    // The in-flight figure is refreshed once a second: sample past the writes by more than that.
    let mut held = 0u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut settle = None;
    while Instant::now() < deadline && settle.is_none_or(|at| Instant::now() < at) {
        held = held.max(relay.metrics().get("skrelay_kernel_inflight_bytes"));
        if settle.is_none() && writers.iter().all(|w| w.is_finished()) {
            settle = Some(Instant::now() + Duration::from_millis(1500));
        }
        thread::sleep(Duration::from_millis(100));
    }
    // A direction past 64 MiB for 2 s resets its pair: give it that time and some.
    let reset_by = Instant::now() + Duration::from_secs(4);
    let mut reset = false;
    while !reset && Instant::now() < reset_by {
        reset = relay.log().contains("resetting the pair to protect the host's memory");
        thread::sleep(Duration::from_millis(100));
    }
    // Unblock writers the relay did not reset (their partner never reads).
    for s in [&a, &b] {
        let _ = s.shutdown(Shutdown::Both);
    }
    let written: Vec<usize> = writers.into_iter().map(|w| w.join().unwrap().unwrap_or(0)).collect();
    drop((a, b));
    relay.wait_pairs_ended(1, Duration::from_secs(10));
    let left = relay.wait_metrics("the kernel holds nothing for the ended pair", Duration::from_secs(5), |m| {
        m.get("skrelay_kernel_inflight_bytes") == 0
    });
    drop(left);
    exchange_both_ways(connect(addr()), connect(addr()), [61, 62], 4 << 20, "the next pair");
    let (status, log) = relay.stop(Duration::from_secs(10));
    eprintln!(
        "two writes of {} MiB without reading: held at most {:.1} MiB, written {written:?}, reset: {reset}",
        BLOCK >> 20,
        held as f64 / MIB_F
    );
    // Unless the pair was reset, no client whose partner never reads may hand over a whole block.
    assert!(
        reset || (held <= PAIR_BOUND && written.iter().all(|n| *n < BLOCK)),
        "the pair held {held} bytes inside the kernel (bound {PAIR_BOUND}), took {written:?} of {BLOCK}-byte \
         writes and was not reset\n{log}"
    );
    assert!(status.success(), "{log}");
}

/// The reset above is for memory held, not for large writes: two clients that each write
/// 150 MiB in one call and read all the time get every byte and an end of file. Their surge
/// passes 64 MiB parked for a moment (the same uncharged queue) and is read within a second;
/// before the 2 s grace such pairs were reset after every byte had arrived.
#[test]
fn huge_writes_to_partners_that_read_are_not_reset() {
    let _netns = enter_netns();
    if !require_bpf("huge_writes_to_partners_that_read_are_not_reset") {
        return;
    }
    const BLOCK: usize = 150 << 20;
    let relay = Skrelay::start(&["relay", "--datapath", "kernel", "--kernel-after", "0"]);
    let block = pattern_block(70, BLOCK);
    let want = (BLOCK as u64, sha(&block));
    let (a, b) = paired_clients();
    let sides: Vec<_> = [a, b]
        .into_iter()
        .map(|s| {
            let (mut w, block) = (s.try_clone().unwrap(), block.clone());
            let writer = thread::spawn(move || {
                w.write_all(&block)?;
                w.shutdown(Shutdown::Write)
            });
            let mut r = s;
            r.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            (writer, thread::spawn(move || recv_all(&mut r)))
        })
        .collect();
    let results: Vec<_> = sides
        .into_iter()
        .map(|(w, r)| (w.join().unwrap().map_err(|e| e.kind()), r.join().unwrap().map_err(|e| e.kind())))
        .collect();
    let (status, log) = relay.stop(Duration::from_secs(10));
    for (i, (written, got)) in results.iter().enumerate() {
        assert!(written.is_ok(), "client {i}'s write: {written:?}\n{log}");
        assert_eq!(got.as_ref().ok(), Some(&want), "client {i} did not get the other's block whole, then EOF\n{log}");
    }
    assert!(!log.contains("resetting the pair"), "{log}");
    assert!(status.success(), "{log}");
}

/// Neither direction pauses for seconds while its reader reads. Both clients read slowly (64 KiB
/// every 4 ms, ~13 MB/s) while each sends 128 MiB in 16 MiB writes, so both directions are held
/// back over and over. Held back with TCP_WINDOW_CLAMP, a window given back stayed under one
/// segment (`rcv_ssthresh` stays at the clamp) and its sender waited on backing-off zero-window
/// probes: one direction delivered nothing for 10-14 s (a helper, 3 of 3 runs). The relay now
/// closes the window with a floor-sized receive buffer instead.
#[test]
fn no_direction_pauses_while_both_clients_read_slowly() {
    let _netns = enter_netns();
    if !require_bpf("no_direction_pauses_while_both_clients_read_slowly") {
        return;
    }
    const EACH: u64 = 128 << 20;
    const WRITE: usize = 16 << 20;
    let relay = Skrelay::start(&["relay", "--datapath", "kernel", "--kernel-after", "0"]);
    let (a, b) = paired_clients();
    let sides: Vec<_> = [(a, 80u64), (b, 81)]
        .into_iter()
        .map(|(s, seed)| {
            let mut w = s.try_clone().unwrap();
            let writer = thread::spawn(move || {
                let mut p = Pattern::new(seed);
                let mut chunk = vec![0u8; WRITE];
                for _ in 0..EACH / WRITE as u64 {
                    p.fill(&mut chunk);
                    w.write_all(&chunk)?;
                }
                w.shutdown(Shutdown::Write)?;
                Ok::<_, std::io::Error>(())
            });
            let mut r = s;
            r.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let reader = thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                let mut got = Vec::with_capacity(EACH as usize);
                let (mut last, mut longest) = (Instant::now(), Duration::ZERO);
                loop {
                    let n = r.read(&mut buf)?;
                    if n == 0 {
                        return Ok::<_, std::io::Error>((got, longest));
                    }
                    got.extend_from_slice(&buf[..n]);
                    longest = longest.max(last.elapsed());
                    last = Instant::now();
                    thread::sleep(Duration::from_millis(4));
                }
            });
            (writer, reader)
        })
        .collect();
    let mut results = Vec::new();
    for (writer, reader) in sides {
        let wrote = writer.join().unwrap();
        results.push((wrote.map_err(|e| e.kind()), reader.join().unwrap()));
    }
    let (status, log) = relay.stop(Duration::from_secs(10));
    for (i, (wrote, read)) in results.iter().enumerate() {
        assert!(wrote.is_ok(), "client {i}'s writes: {wrote:?}\n{log}");
        let (got, longest) = read.as_ref().unwrap_or_else(|e| panic!("client {i}'s reads: {e}\n{log}"));
        assert_eq!(sha(got), pattern_sha(81 - i as u64, EACH), "client {i} did not get the other's bytes whole\n{log}");
        eprintln!("client {i}: longest wait for bytes {longest:?}");
        assert!(*longest < Duration::from_secs(4), "client {i} got nothing for {longest:?} while it read\n{log}");
    }
    assert!(status.success(), "{log}");
}

/// Two clients of the relay at `addr()`, paired in arrival order (A first), once their pair has
/// had time to join the kernel maps.
fn paired_clients() -> (TcpStream, TcpStream) {
    let a = connect(addr());
    thread::sleep(Duration::from_millis(50));
    let b = connect(addr());
    thread::sleep(Duration::from_millis(200));
    (a, b)
}

/// `len` bytes of pattern `seed`, shared by the threads that write them.
fn pattern_block(seed: u64, len: usize) -> std::sync::Arc<Vec<u8>> {
    let mut block = vec![0u8; len];
    Pattern::new(seed).fill(&mut block);
    std::sync::Arc::new(block)
}

fn addr() -> std::net::SocketAddr {
    "127.0.0.1:7777".parse().unwrap()
}
