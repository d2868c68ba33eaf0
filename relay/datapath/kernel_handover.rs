//! The kernel datapath's part of `--takeover` (a child of kernel.rs, so that file only gains a
//! few delegating lines).
//!
//! Sockets never leave the maps on the way. Removing a socket from a SOCKHASH while its psock
//! queue holds redirected bytes loses them: the last unlink drops the psock (sk_psock_drop), and
//! sk_psock_destroy purges `ingress_skb` and `ingress_msg` (net/core/skmsg.c,
//! `__sk_psock_zap_ingress`). So the new process adopts the old one's maps (pidfd_getfd of their
//! descriptors): the verdict stays attached to `socks` for as long as the map lives, the
//! sockets stay in it, and the kernel keeps moving the pair's bytes while the processes change
//! places. What moves through user space is only the bookkeeping of each direction (`Direction`:
//! taken, written, unconsumed, parked) and the errors not yet reported; `relay_peer` and
//! `relay_count` are in the maps already.
use super::{locked, Direction, Handover, Joined, KernelDatapath, KernelSplice, KernelState, KEPT_OUT};
use crate::{
    abi::{RelayCount, RelayPeer},
    datapath::{
        handover::{Exporter, Fds, KernelDirection, KernelMaps, KernelSpliceState, SavedError, SpliceState},
        userspace, Splice,
    },
    sys,
};
use aya::maps::{HashMap, IterableMap, Map, MapData, PerCpuArray, RingBuf, SockHash};
use mio::net::TcpStream;
use std::{
    cmp::Reverse,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// The maps taken from the old process, checked, not yet in use.
pub(super) struct Adopted {
    socks: SockHash<MapData, u64>,
    targets: SockHash<MapData, u64>,
    peers: HashMap<MapData, u64, RelayPeer>,
    counts: HashMap<MapData, u64, RelayCount>,
    events: RingBuf<MapData>,
    stats: PerCpuArray<MapData, u64>,
    parkings: u64,
    unreported: u64,
    holds: u64,
    unsticks: u64,
    runaways: u64,
}

/// The maps, when kernel pairs are in them (else the new process keeps its own programs: that is
/// how a new relay.bpf.c comes into use, see ARCHITECTURE.md).
pub(super) fn export_maps(dp: &KernelDatapath, ex: &mut Exporter) -> Option<KernelMaps> {
    let state = locked(&dp.state);
    if state.pairs == 0 && state.directions.is_empty() {
        return None;
    }
    Some(KernelMaps {
        socks: ex.fd(&state.socks.fd().as_fd()),
        targets: ex.fd(&state.targets.fd().as_fd()),
        peers: ex.fd(&state.peers.map().fd().as_fd()),
        counts: ex.fd(&state.counts.map().fd().as_fd()),
        events: ex.fd(&dp.events.as_raw_fd()),
        stats: ex.fd(&dp.stats.map().fd().as_fd()),
        parkings: state.parkings,
        unreported: state.unreported,
        holds: state.holds,
        unsticks: state.unsticks,
        runaways: state.runaways,
    })
}

/// What describes a map well enough to tell the same layout: type, sizes, flags, name.
fn layout(fd: BorrowedFd<'_>) -> Result<String, String> {
    let fail = |e: &dyn std::fmt::Display| format!("cannot read a map's description: {e}");
    let m = MapData::from_fd(fd.try_clone_to_owned().map_err(|e| fail(&e))?).map_err(|e| fail(&e))?;
    let i = m.info().map_err(|e| fail(&e))?;
    Ok(format!(
        "{:?}/{}/{}/{}/{:#x}/{}",
        i.map_type().ok(),
        i.key_size(),
        i.value_size(),
        i.max_entries(),
        i.map_flags(),
        String::from_utf8_lossy(i.name())
    ))
}

/// Takes the old process's maps and checks that they have the layout this binary's programs
/// use (a relay.bpf.c whose maps changed cannot carry on the old pairs).
pub(super) fn check_maps(dp: &KernelDatapath, maps: &KernelMaps, fds: &mut Fds) -> Result<Adopted, String> {
    let take = |fds: &mut Fds, fd, name: &str, ours: BorrowedFd<'_>| -> Result<MapData, String> {
        let owned = fds.take(fd).map_err(|e| e.to_string())?;
        let data = MapData::from_fd(owned).map_err(|e| format!("the old process's map `{name}`: {e}"))?;
        let (theirs, mine) = (layout(data.fd().as_fd())?, layout(ours)?);
        if theirs != mine {
            return Err(format!(
                "the old process's map `{name}` is laid out as {theirs} and this skrelay's as {mine}: its kernel \
                 programs differ too much to carry on its pairs (let it drain instead: stop it with SIGTERM)"
            ));
        }
        Ok(data)
    };
    let state = locked(&dp.state);
    let bad = |name: &'static str| move |e: aya::maps::MapError| format!("the old process's map `{name}`: {e}");
    let socks = take(fds, maps.socks, "socks", state.socks.fd().as_fd())?;
    let targets = take(fds, maps.targets, "targets", state.targets.fd().as_fd())?;
    let peers = take(fds, maps.peers, "peers", state.peers.map().fd().as_fd())?;
    let counts = take(fds, maps.counts, "relay_counts", state.counts.map().fd().as_fd())?;
    let events = take(fds, maps.events, "relay_events", dp.events.as_fd())?;
    let stats = take(fds, maps.stats, "relay_stats", dp.stats.map().fd().as_fd())?;
    Ok(Adopted {
        socks: SockHash::try_from(Map::from_map_data(socks).map_err(bad("socks"))?).map_err(bad("socks"))?,
        targets: SockHash::try_from(Map::from_map_data(targets).map_err(bad("targets"))?).map_err(bad("targets"))?,
        peers: HashMap::try_from(Map::from_map_data(peers).map_err(bad("peers"))?).map_err(bad("peers"))?,
        counts: HashMap::try_from(Map::from_map_data(counts).map_err(bad("relay_counts"))?)
            .map_err(bad("relay_counts"))?,
        events: RingBuf::try_from(Map::from_map_data(events).map_err(bad("relay_events"))?)
            .map_err(bad("relay_events"))?,
        stats: PerCpuArray::try_from(Map::from_map_data(stats).map_err(bad("relay_stats"))?)
            .map_err(bad("relay_stats"))?,
        parkings: maps.parkings,
        unreported: maps.unreported,
        holds: maps.holds,
        unsticks: maps.unsticks,
        runaways: maps.runaways,
    })
}

/// From now on the datapath's pairs live in the adopted maps. This process's own programs,
/// attached to its own (empty) `socks`, stay loaded and unused.
pub(super) fn install_maps(dp: &mut KernelDatapath, adopted: Adopted) {
    let mut state = locked(&dp.state);
    assert!(state.pairs == 0 && state.directions.is_empty(), "maps are adopted before any pair joins");
    state.socks = adopted.socks;
    state.targets = adopted.targets;
    state.peers = adopted.peers;
    state.counts = adopted.counts;
    state.parkings = adopted.parkings;
    state.unreported = adopted.unreported;
    state.holds = adopted.holds;
    state.unsticks = adopted.unsticks;
    state.runaways = adopted.runaways;
    dp.events = adopted.events;
    dp.stats = adopted.stats;
}

pub(super) fn export_splice(k: &KernelSplice) -> KernelSpliceState {
    let state = locked(&k.state);
    let directions = k
        .cookies
        .iter()
        .filter_map(|cookie| {
            let d = state.directions.get(cookie)?;
            Some(KernelDirection {
                cookie: *cookie,
                peer: d.peer,
                base: d.base,
                taken: d.taken,
                written: d.written,
                parked_us: d.parked.map(|p| p.as_micros() as u64),
                dst_acked: d.dst_acked,
                unconsumed: d.unconsumed,
                held: d.held,
                frozen: d.frozen,
                shelter_base: d.shelter_base,
                error: state.errors.get(cookie).map(SavedError::save),
            })
        })
        .collect();
    KernelSpliceState {
        cookies: k.cookies,
        acked_base: k.acked_base,
        consumed: k.consumed,
        targets: k.joined.targets,
        peers: k.joined.peers,
        socks: k.joined.socks,
        counted: k.joined.counted,
        directions,
    }
}

/// A kernel pair handed over: its directions' bookkeeping enters this process's state, and a
/// direction that was parked (or has bytes to consume) is looked at at once.
pub(super) fn import_splice(
    state: &Arc<Mutex<KernelState>>,
    s: KernelSpliceState,
    ends: [&TcpStream; 2],
) -> io::Result<KernelSplice> {
    if s.socks.iter().any(|&b| b) || s.counted {
        for (i, end) in ends.iter().enumerate() {
            if sys::socket_cookie(*end)? != s.cookies[i] {
                return Err(io::Error::other("a socket handed over is not the one in the kernel maps"));
            }
        }
    }
    let mut st = locked(state);
    let now = Instant::now();
    for d in s.directions {
        let Some(i) = s.cookies.iter().position(|c| *c == d.cookie) else {
            return Err(io::Error::other("a direction handed over names neither socket of its pair"));
        };
        let direction = Direction {
            src: ends[i].as_raw_fd(),
            dst: ends[1 - i].as_raw_fd(),
            peer: d.peer,
            base: d.base,
            taken: d.taken,
            written: d.written,
            parked: d.parked_us.map(Duration::from_micros),
            dst_acked: d.dst_acked,
            unconsumed: d.unconsumed,
            held: d.held,
            last_moved: (0, 0),
            stuck_since: None,
            frozen: d.frozen,
            runaway: false,
            runaway_since: None,
            shelter_base: d.shelter_base,
            // Set again by the pair's next look if its partner's client reset (`discard`).
            discarding: false,
            discarding_from: 0,
        };
        if direction.parked.is_some() || direction.unconsumed > 0 || direction.held.is_some() || direction.frozen {
            st.rechecks.push(Reverse((now, d.cookie)));
        }
        st.directions.insert(d.cookie, direction);
        if let Some(e) = d.error {
            st.errors.insert(d.cookie, e.restore());
        }
    }
    if s.counted {
        st.pairs += 1;
        st.all_pairs.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
    Ok(KernelSplice {
        state: state.clone(),
        cookies: s.cookies,
        acked_base: s.acked_base,
        consumed: s.consumed,
        joined: Joined { targets: s.targets, peers: s.peers, socks: s.socks, counted: s.counted },
        taken_back: [0; 2],
    })
}

/// Any pair of the kernel datapath handed over: in the maps, before joining them, or on splice(2)
/// for good.
pub(super) fn import(
    dp: &KernelDatapath,
    state: SpliceState,
    ends: [&TcpStream; 2],
    fds: &mut Fds,
) -> io::Result<Box<dyn Splice>> {
    Ok(match state {
        SpliceState::Userspace { dirs } => userspace::import(dirs, fds)?,
        SpliceState::Kernel(k) => Box::new(import_splice(&dp.state, k, ends)?),
        SpliceState::Handover { user, kernel, joined, after, stays, half_closed, user_moved, refused } => {
            let SpliceState::Userspace { dirs } = *user else {
                return Err(io::Error::other("a pair before joining the kernel maps came without its pipes"));
            };
            Box::new(Handover {
                user: userspace::import(dirs, fds)?,
                kernel: import_splice(&dp.state, kernel, ends)?,
                joined,
                after,
                for_streams: dp.join_after > 0,
                stays: stays.then_some(if refused { KEPT_OUT } else { super::not_established(ends) }),
                half_closed,
                user_moved,
                refused,
            })
        }
    })
}

pub(super) fn export_handover(h: &Handover, ex: &mut Exporter) -> Option<SpliceState> {
    Some(SpliceState::Handover {
        user: Box::new(h.user.export(ex)?),
        kernel: export_splice(&h.kernel),
        joined: h.joined,
        after: h.after,
        stays: h.stays.is_some(),
        half_closed: h.half_closed,
        user_moved: h.user_moved,
        refused: h.refused,
    })
}
