//! The kernel programs of probes/ driven directly, not through the skrelay binary: each test
//! loads an embedded object with aya, fills its maps by hand and checks a table of cases.
//!
//! - steer (`sk_lookup`): run with BPF_PROG_TEST_RUN (Linux 5.14+), a `struct bpf_sk_lookup` per
//!   case; the kernel reports the verdict and the cookie of the socket the program chose.
//! - relay (`sk_skb` parser + verdict): the kernel has no BPF_PROG_TEST_RUN for sk_skb programs
//!   (`sk_skb_prog_ops` in net/core/filter.c has no `.test_run`, up to 6.18: the call fails with
//!   ENOTSUPP), so the closest is real loopback sockets in a SOCKHASH that carries the programs,
//!   with the maps filled as each case needs and the per-CPU counters read back.
//!
//! Each test runs in its own network namespace. Without BPF they are skipped with a note, and
//! fail under CI=true (tests/common `require_bpf`).
mod common;

use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie, MapData, PerCpuArray, SockHash},
    programs::{SkLookup, SkSkb},
    Ebpf,
};
use common::*;
use skrelay::{
    abi::{relay_stat, RelayCount, RelayPeer, SteerCounters, SteerMatch},
    sys,
};
use std::{
    io::{self, ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    time::{Duration, Instant},
};

/// The kernel's uapi numbers and offsets, from build.rs's probe of the headers.
#[allow(non_upper_case_globals, dead_code)]
mod k {
    include!(concat!(env!("OUT_DIR"), "/kernel_layout.rs"));
}

const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;

/// BPF_PROG_TEST_RUN with a context and no packet: (the program's return value, the context
/// the kernel wrote back).
fn test_run(prog: BorrowedFd<'_>, ctx: &[u8]) -> io::Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; ctx.len()];
    let mut attr = [0u8; 80];
    let mut put = |off: usize, bytes: &[u8]| attr[off..off + bytes.len()].copy_from_slice(bytes);
    put(k::ATTR_test_prog_fd, &(prog.as_raw_fd() as u32).to_ne_bytes());
    put(k::ATTR_test_ctx_size_in, &(ctx.len() as u32).to_ne_bytes());
    put(k::ATTR_test_ctx_in, &(ctx.as_ptr() as u64).to_ne_bytes());
    put(k::ATTR_test_ctx_size_out, &(out.len() as u32).to_ne_bytes());
    put(k::ATTR_test_ctx_out, &(out.as_mut_ptr() as u64).to_ne_bytes());
    // SAFETY: `attr` is laid out by the header's offsets; ctx_in and ctx_out point to `ctx` and
    // `out`, both live for the call, and their sizes are given, so the kernel reads and writes
    // within them.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, k::BPF_PROG_TEST_RUN, attr.as_mut_ptr(), attr.len()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let retval = u32::from_ne_bytes(attr[k::ATTR_test_retval..k::ATTR_test_retval + 4].try_into().unwrap());
    Ok((retval, out))
}

// ---- steer: sk_lookup through BPF_PROG_TEST_RUN ----

const TCP: u8 = libc::IPPROTO_TCP as u8;
const UDP: u8 = libc::IPPROTO_UDP as u8;

/// A `struct bpf_sk_lookup` for a packet from 192.0.2.1:40000 (or 2001:db8::1) to `local`.
fn sk_lookup_ctx(proto: u8, local: SocketAddr) -> Vec<u8> {
    let mut ctx = vec![0u8; k::bpf_sk_lookup__SIZE];
    let mut put = |off: usize, bytes: &[u8]| ctx[off..off + bytes.len()].copy_from_slice(bytes);
    put(k::bpf_sk_lookup__protocol, &u32::from(proto).to_ne_bytes());
    put(k::bpf_sk_lookup__remote_port, &40000u16.to_be_bytes());
    put(k::bpf_sk_lookup__local_port, &u32::from(local.port()).to_ne_bytes());
    match local.ip() {
        IpAddr::V4(a) => {
            put(k::bpf_sk_lookup__family, &(libc::AF_INET as u32).to_ne_bytes());
            put(k::bpf_sk_lookup__remote_ip4, &[192, 0, 2, 1]);
            put(k::bpf_sk_lookup__local_ip4, &a.octets());
        }
        IpAddr::V6(a) => {
            put(k::bpf_sk_lookup__family, &(libc::AF_INET6 as u32).to_ne_bytes());
            put(k::bpf_sk_lookup__remote_ip6, &"2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
            put(k::bpf_sk_lookup__local_ip6, &a.octets());
        }
    }
    ctx
}

/// A `steer_ports` key as user space writes it: 32 bits of (family, proto, port) are always part
/// of the prefix, then `prefix_len` bits of the address (probes/skrelay.h, `struct steer_key`).
fn steer_key(proto: u8, prefix: &str, port: u16) -> Key<SteerMatch> {
    let (addr, len) = prefix.split_once('/').unwrap();
    let addr: IpAddr = addr.parse().unwrap();
    let mut bytes = [0u8; 16];
    let family = match addr {
        IpAddr::V4(a) => {
            bytes[..4].copy_from_slice(&a.octets());
            libc::AF_INET as u8
        }
        IpAddr::V6(a) => {
            bytes = a.octets();
            libc::AF_INET6 as u8
        }
    };
    Key::new(32 + len.parse::<u32>().unwrap(), SteerMatch { family, proto, port, addr: bytes })
}

struct Steer {
    bpf: Ebpf,
    ports: LpmTrie<MapData, SteerMatch, u32>,
    targets: MapData,
    stats: PerCpuArray<MapData, SteerCounters>,
}

impl Steer {
    fn load() -> Steer {
        let mut bpf = Ebpf::load(skrelay::bpf::objects::STEER).expect("load the steer object");
        let ports = LpmTrie::try_from(bpf.take_map("steer_ports").unwrap()).unwrap();
        let targets = match bpf.take_map("steer_targets").unwrap() {
            aya::maps::Map::SockMap(m) => m,
            _ => panic!("steer_targets is not a SOCKMAP"),
        };
        let stats = PerCpuArray::try_from(bpf.take_map("steer_stats").unwrap()).unwrap();
        let prog: &mut SkLookup = bpf.program_mut("steer_lookup").unwrap().try_into().unwrap();
        prog.load().expect("load steer_lookup");
        Steer { bpf, ports, targets, stats }
    }

    /// Binding `id` sends (proto, prefix, port) to `target`.
    fn bind(&mut self, id: u32, proto: u8, prefix: &str, port: u16, target: &impl AsFd) {
        sys::bpf::sockmap_set(self.targets.fd(), id, target).expect("set the target");
        self.ports.insert(&steer_key(proto, prefix, port), id, 0).expect("fill the trie");
    }

    fn counters(&self, id: u32) -> (u64, u64) {
        let v = self.stats.get(&id, 0).unwrap();
        (v.iter().map(|c| c.hits).sum(), v.iter().map(|c| c.refused).sum())
    }

    /// (verdict, cookie of the chosen socket or 0).
    fn lookup(&self, proto: u8, local: SocketAddr) -> (u32, u64) {
        let prog: &SkLookup = self.bpf.program("steer_lookup").unwrap().try_into().unwrap();
        let fd = prog.fd().unwrap();
        let (verdict, out) = test_run(fd.as_fd(), &sk_lookup_ctx(proto, local)).expect("BPF_PROG_TEST_RUN sk_lookup");
        let at = k::bpf_sk_lookup__cookie;
        (verdict, u64::from_ne_bytes(out[at..at + 8].try_into().unwrap()))
    }
}

/// (case, proto, destination, verdict, chosen socket (0: none), (binding, hits, refused) that
/// move).
type LookupCase = (&'static str, u8, &'static str, u32, u64, Option<(u32, u64, u64)>);

#[test]
fn steer_lookup_chooses_by_proto_family_port_and_longest_prefix() {
    let _netns = enter_netns();
    if !require_bpf("steer_lookup_chooses_by_proto_family_port_and_longest_prefix") {
        return;
    }
    let mut steer = Steer::load();
    let any4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let lo8 = TcpListener::bind("127.0.0.1:0").unwrap();
    let any6 = TcpListener::bind("[::1]:0").unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let gone = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let connected = TcpStream::connect(server.local_addr().unwrap()).unwrap();
    steer.bind(0, TCP, "0.0.0.0/0", 7001, &any4);
    steer.bind(1, TCP, "127.0.0.0/8", 7001, &lo8);
    steer.bind(2, TCP, "::/0", 7002, &any6);
    steer.bind(3, UDP, "0.0.0.0/0", 7003, &udp);
    steer.bind(4, TCP, "0.0.0.0/0", 7004, &gone);
    steer.bind(5, TCP, "0.0.0.0/0", 7005, &connected);
    drop(gone); // the kernel takes a closed socket out of the SOCKMAP

    let cookie = |s: &dyn AsFd| sys::socket_cookie(s.as_fd()).unwrap();
    let (any4_c, lo8_c, any6_c, udp_c) = (cookie(&any4), cookie(&lo8), cookie(&any6), cookie(&udp));
    let cases: [LookupCase; 10] = [
        ("the /8 beats the /0 for 127.0.0.1", TCP, "127.0.0.1:7001", SK_PASS, lo8_c, Some((1, 1, 0))),
        ("only the /0 covers 10.1.2.3", TCP, "10.1.2.3:7001", SK_PASS, any4_c, Some((0, 1, 0))),
        ("IPv6 binding, IPv6 destination", TCP, "[::1]:7002", SK_PASS, any6_c, Some((2, 1, 0))),
        ("an IPv6 binding does not take IPv4", TCP, "127.0.0.1:7002", SK_PASS, 0, None),
        ("UDP binding, UDP datagram", UDP, "127.0.0.1:7003", SK_PASS, udp_c, Some((3, 1, 0))),
        ("a UDP binding does not take TCP", TCP, "127.0.0.1:7003", SK_PASS, 0, None),
        ("a TCP binding does not take UDP", UDP, "127.0.0.1:7001", SK_PASS, 0, None),
        ("an unbound port goes the normal way", TCP, "127.0.0.1:7999", SK_PASS, 0, None),
        ("a closed target fails closed", TCP, "127.0.0.1:7004", SK_DROP, 0, Some((4, 0, 1))),
        ("a target that is not listening fails closed", TCP, "127.0.0.1:7005", SK_DROP, 0, Some((5, 0, 1))),
    ];
    let mut failures = Vec::new();
    for (name, proto, to, verdict, chosen, moved) in cases {
        let before: Vec<(u64, u64)> = (0..6).map(|id| steer.counters(id)).collect();
        let got = steer.lookup(proto, to.parse().unwrap());
        if got != (verdict, chosen) {
            failures.push(format!("{name}: got (verdict, cookie) {got:?}, want {:?}", (verdict, chosen)));
        }
        for id in 0..6u32 {
            let (h, r) = steer.counters(id);
            let delta = (h - before[id as usize].0, r - before[id as usize].1);
            let want = match moved {
                Some((m, dh, dr)) if m == id => (dh, dr),
                _ => (0, 0),
            };
            if delta != want {
                failures.push(format!("{name}: binding {id} counted (hits, refused) +{delta:?}, want +{want:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

// ---- relay: sk_skb verdict on real sockets ----

struct Relay {
    _bpf: Ebpf,
    socks: SockHash<MapData, u64>,
    targets: SockHash<MapData, u64>,
    peers: HashMap<MapData, u64, RelayPeer>,
    counts: HashMap<MapData, u64, RelayCount>,
    stats: PerCpuArray<MapData, u64>,
}

/// A peer entry with a budget that never runs out.
fn peer(cookie: u64) -> RelayPeer {
    RelayPeer { peer: cookie, budget: u64::MAX, notify: u64::MAX, taken: 0, hold: u64::MAX, base: 0, limit: 0 }
}

impl Relay {
    /// The relay object with its verdict on `socks`, as the kernel datapath sets it up.
    fn load() -> Relay {
        let mut bpf = Ebpf::load(skrelay::bpf::objects::RELAY).expect("load the relay object");
        let socks: SockHash<MapData, u64> = SockHash::try_from(bpf.take_map("socks").unwrap()).unwrap();
        let targets = SockHash::try_from(bpf.take_map("targets").unwrap()).unwrap();
        let peers = HashMap::try_from(bpf.take_map("peers").unwrap()).unwrap();
        let counts = HashMap::try_from(bpf.take_map("relay_counts").unwrap()).unwrap();
        let stats = PerCpuArray::try_from(bpf.take_map("relay_stats").unwrap()).unwrap();
        let socks_fd = socks.fd().try_clone().unwrap();
        let prog: &mut SkSkb = bpf.program_mut("relay_verdict").unwrap().try_into().unwrap();
        prog.load().unwrap_or_else(|e| panic!("load relay_verdict: {e}"));
        prog.attach(&socks_fd).unwrap_or_else(|e| panic!("attach relay_verdict: {e}"));
        Relay { _bpf: bpf, socks, targets, peers, counts, stats }
    }

    fn stats(&self) -> [u64; relay_stat::MAX as usize] {
        let mut out = [0; relay_stat::MAX as usize];
        for (i, v) in out.iter_mut().enumerate() {
            *v = self.stats.get(&(i as u32), 0).unwrap().iter().sum();
        }
        out
    }
}

/// A loopback connection: (the client's end, the end skrelay would hold).
fn connection() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (relayed, _) = l.accept().unwrap();
    for s in [&client, &relayed] {
        s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    }
    (client, relayed)
}

/// Reads what arrives within the read timeout (up to `max` bytes).
fn drain(s: &mut TcpStream, max: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; max];
    while got.len() < max {
        match s.read(&mut buf[..max - got.len()]) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("read: {e}"),
        }
    }
    got
}

/// How a case fills the maps for the relay socket `a` (and its partner `b`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Maps {
    /// Both in `targets` and `peers`, then both in `socks`: a formed pair.
    Pair,
    /// `a` in `socks` without a `peers` entry.
    NoPeerEntry,
    /// `a` in `socks` with a peer that is not in `targets`.
    PeerNotInTargets,
    /// A formed pair whose budget from user space is used up (0), with this `limit`: the
    /// verdict measures the peer itself and redirects while it holds at most `limit` bytes.
    BudgetUsedUp { limit: u64 },
}

/// Where the bytes that `a`'s client sent end up.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Lands {
    /// With `b`'s client: redirected to b's egress.
    AtPartner,
    /// In `a`'s own receive queue.
    InOwnQueue,
    /// Nowhere.
    Dropped,
    /// Nowhere yet: they wait in `a`'s queue (not read here: a read would push them on).
    Wait,
}

/// (case, maps, bytes sent before `a` joins `socks`, bytes of them user space reads before the
/// join, kick (MSG_PEEK) after joining, where the bytes land, counters that must grow).
type VerdictCase = (&'static str, Maps, bool, usize, bool, Lands, &'static [u32]);

#[test]
fn relay_verdict_redirects_passes_or_drops_as_its_maps_say() {
    let _netns = enter_netns();
    if !require_bpf("relay_verdict_redirects_passes_or_drops_as_its_maps_say") {
        return;
    }
    let mut relay = Relay::load();
    use relay_stat::{BYTES, DROPPED, EXTENDED, NO_PEER, PARKED, REDIRECTED, TRIMMED, VERDICTS};
    let used_up = |limit| Maps::BudgetUsedUp { limit };
    let cases: [VerdictCase; 10] = [
        ("a formed pair redirects to the peer", Maps::Pair, false, 0, false, Lands::AtPartner, &[VERDICTS, REDIRECTED]),
        ("no peer entry: passed to its own queue", Maps::NoPeerEntry, false, 0, false, Lands::InOwnQueue, &[NO_PEER]),
        ("peer not in targets: dropped", Maps::PeerNotInTargets, false, 0, false, Lands::Dropped, &[DROPPED]),
        ("queued before the join, then kicked", Maps::Pair, true, 0, true, Lands::AtPartner, &[REDIRECTED]),
        // KERNEL-NOTES: bytes queued before the join wait for the next segment; the kick exists
        // for this. If this case fails, the kernel changed: the kick may no longer be needed.
        ("queued before the join, never kicked", Maps::Pair, true, 0, false, Lands::Wait, &[]),
        ("no peer entry, queued before, kicked", Maps::NoPeerEntry, true, 0, true, Lands::InOwnQueue, &[NO_PEER]),
        // tcp_read_skb hands the verdict the whole skb, the 100 bytes user space read included:
        // the verdict cuts them off (from copied_seq), as it cuts a retransmission's overlap.
        (
            "partly read before the join: only the rest goes on",
            Maps::Pair,
            true,
            100,
            true,
            Lands::AtPartner,
            &[REDIRECTED, TRIMMED],
        ),
        // Past user space's budget the verdict looks at the peer itself: the peer holds nothing,
        // so 1,000 bytes fit in a 1 MiB limit (and would not fit in 500); no limit: it parks.
        ("budget used up, room within the limit", used_up(1 << 20), false, 0, false, Lands::AtPartner, &[EXTENDED]),
        ("budget used up, over the limit: parked", used_up(500), false, 0, false, Lands::InOwnQueue, &[PARKED]),
        ("budget used up, no limit: parked", used_up(0), false, 0, false, Lands::InOwnQueue, &[PARKED]),
    ];
    let mut failures = Vec::new();
    for (i, (name, maps, before, read_first, kick, lands, grow)) in cases.into_iter().enumerate() {
        let (mut a_client, mut a) = connection();
        let (mut b_client, b) = connection();
        let payload: Vec<u8> = (0..1000u32).map(|x| (x * 7 + i as u32) as u8).collect();
        let (ca, cb) = (sys::socket_cookie(&a).unwrap(), sys::socket_cookie(&b).unwrap());
        let stats0 = relay.stats();
        if before {
            a_client.write_all(&payload).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        if read_first > 0 {
            let mut head = vec![0u8; read_first];
            a.read_exact(&mut head).unwrap();
            assert_eq!(head, payload[..read_first], "{name}");
        }
        match maps {
            Maps::Pair | Maps::BudgetUsedUp { .. } => {
                relay.targets.insert(ca, a.as_raw_fd(), 0).unwrap();
                relay.targets.insert(cb, b.as_raw_fd(), 0).unwrap();
                let a_peer = match maps {
                    Maps::BudgetUsedUp { limit } => {
                        let base = sys::tcp_counters(&b).unwrap().bytes_acked + sys::send_queue_len(&b).unwrap();
                        RelayPeer { budget: 0, base, limit, ..peer(cb) }
                    }
                    _ => peer(cb),
                };
                relay.peers.insert(ca, a_peer, 0).unwrap();
                relay.peers.insert(cb, peer(ca), 0).unwrap();
                relay.counts.insert(ca, RelayCount::default(), 0).unwrap();
                relay.counts.insert(cb, RelayCount::default(), 0).unwrap();
                relay.socks.insert(cb, b.as_raw_fd(), 0).unwrap();
            }
            Maps::NoPeerEntry => {}
            Maps::PeerNotInTargets => relay.peers.insert(ca, peer(cb), 0).unwrap(),
        }
        relay.socks.insert(ca, a.as_raw_fd(), 0).unwrap();
        if kick {
            let _ = sys::peek(&a, &mut [0u8; 1]);
        }
        if !before {
            a_client.write_all(&payload).unwrap();
        }
        let at_partner = drain(&mut b_client, payload.len());
        let landed = match lands {
            Lands::AtPartner => at_partner == payload[read_first..],
            Lands::InOwnQueue => at_partner.is_empty() && drain(&mut a, payload.len()) == payload,
            Lands::Dropped => at_partner.is_empty() && drain(&mut a, payload.len()).is_empty(),
            Lands::Wait => at_partner.is_empty(),
        };
        if !landed {
            failures.push(format!("{name}: the bytes did not land {lands:?} ({} at the partner)", at_partner.len()));
        }
        // The counters are per-CPU and updated in softirq: give the last skb a moment.
        let deadline = Instant::now() + Duration::from_secs(2);
        let grown = |s: &[u64; relay_stat::MAX as usize]| grow.iter().all(|&c| s[c as usize] > stats0[c as usize]);
        while !grown(&relay.stats()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let stats = relay.stats();
        for &c in grow {
            if stats[c as usize] <= stats0[c as usize] {
                failures.push(format!("{name}: counter {c} did not grow ({:?} -> {stats:?})", stats0));
            }
        }
        let redirected = stats[BYTES as usize] - stats0[BYTES as usize];
        let want = if lands == Lands::AtPartner { (payload.len() - read_first) as u64 } else { 0 };
        if redirected != want {
            failures.push(format!("{name}: {redirected} bytes counted as redirected, want {want}"));
        }
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn the_netns_guard_returns_the_thread_to_its_namespace() {
    let outside = netns_ino();
    {
        let _netns = enter_netns();
        assert_ne!(netns_ino(), outside, "enter_netns did not move the thread");
    }
    assert_eq!(netns_ino(), outside, "dropping the guard did not bring the thread back");
}
