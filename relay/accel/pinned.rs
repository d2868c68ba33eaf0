//! One accelerated cgroup's kernel state, pinned in its own bpffs directory so it outlives the
//! command: the maps of probes/accel.bpf.c and the sockops link. The sk_msg program is attached
//! to the `socks` map (aya 0.14 uses BPF_PROG_ATTACH there, not a link): the pinned map keeps it.
use super::cgroup::Cgroup;
use crate::{
    abi::{accel_stat, AccelConfig, SockKey, ACCEL_FLAG_DRAINING, ACCEL_FLAG_KNOWS_DRAINING},
    bpf,
    error::Error,
};
use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, SockHash},
    programs::{links::FdLink, links::PinnedLink, CgroupAttachMode, SkMsg, SockOps},
};
use std::{
    fs::File,
    path::{Path, PathBuf},
};

/// max_entries of `accel_ports` (probes/skrelay.h).
pub const MAX_PORTS: usize = crate::abi::ACCEL_MAX_PORTS as usize;

const MAPS: [&str; 6] =
    ["accel_socks", "accel_members", "accel_listeners", "accel_ports", "accel_config", "accel_stats"];
const SOCKOPS_LINK: &str = "sockops_link";

fn missing(what: &str) -> Error {
    Error::BpfUnavailable { reason: format!("the embedded accel object has no {what}"), fix: "rebuild skrelay".into() }
}

/// Where a set-up builds its state before it moves into place (`create`): beside the accel root,
/// so `list` never sees a half-built directory.
fn setup_root(dir: &Path) -> PathBuf {
    dir.parent().map_or_else(|| PathBuf::from(SETUP_DIR), |root| root.with_file_name(SETUP_DIR))
}
const SETUP_DIR: &str = "accel-setup";

/// This process's set-up directory for `dir` (`accel-setup/PID_START-NAME`: its pid and start
/// time, so that neither a zombie nor a process that got the pid later is taken for it; bpffs
/// refuses a `.` in a name).
fn building(dir: &Path) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let me = super::cgroup::Process::me();
    setup_root(dir).join(format!("{}_{}-{name}", me.pid, me.start))
}

/// Marks a set-up of `dir` as under way, before anything else of it is made (its cgroup's
/// directories included): a set-up killed from here on leaves its directory in `accel-setup`,
/// which the next `on` or `off` finds (`remove_unfinished`). `creates`: how many cgroup
/// directories the set-up is about to make, recorded in that directory (`creates_N`, removed by
/// `create` once the owner record on the cgroup says it) so that they are removed with it (a
/// set-up killed before this directory, and then one killed between its mkdirs and the owner
/// record, left cgroups nothing named: a helper's kill loop and its re-check). Undone by
/// `abandon_set_up` or taken over by `create`.
pub fn begin_set_up(dir: &Path, creates: usize) -> Result<(), Error> {
    let building = building(dir);
    remove(&building);
    if std::fs::create_dir_all(setup_root(dir)).is_ok() {
        crate::bpffs::claim_if_planted(&setup_root(dir));
    }
    let made = if creates > 0 { building.join(format!("{CREATES}{creates}")) } else { building.clone() };
    std::fs::create_dir_all(&made).map_err(|e| Error::io(format!("cannot create {}", made.display()), e))
}
const CREATES: &str = "creates_";

/// How many cgroup directories the set-up that left `building` was about to make (`begin_set_up`).
fn creates(building: &Path) -> Option<usize> {
    std::fs::read_dir(building)
        .ok()?
        .flatten()
        .find_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix(CREATES)).and_then(|n| n.parse().ok()))
}

fn remove_creates_marker(building: &Path) {
    if let Some(n) = creates(building) {
        let _ = std::fs::remove_dir(building.join(format!("{CREATES}{n}")));
    }
}

/// Removes what `begin_set_up` made, for a set-up that stops before `create`.
pub fn abandon_set_up(dir: &Path) {
    let building = building(dir);
    remove_creates_marker(&building);
    remove(&building);
}

/// Loads the programs, pins the maps, attaches sk_msg to the socket map and sockops to the
/// cgroup, and pins the sockops link, all in the directory `begin_set_up` made
/// (`accel-setup/PID_START-NAME`), which then takes `dir`'s name in one rename: a set-up that is
/// killed half-way never leaves a `dir` that looks accelerated but is not (`remove_unfinished`
/// removes what it left). On failure everything pinned so far is removed, that directory too.
pub fn create(dir: &Path, cgroup: &Cgroup, ports: &[u16], max_queued: u32, small_write: u32) -> Result<(), Error> {
    let building = building(dir);
    std::fs::create_dir_all(&building).map_err(|e| Error::io(format!("cannot create {}", building.display()), e))?;
    // The owner record on the cgroup names what it created by now.
    remove_creates_marker(&building);
    let result = create_in(&building, cgroup, ports, max_queued, small_write).and_then(|()| {
        std::fs::rename(&building, dir)
            .map_err(|e| Error::io(format!("cannot move {} to {}", building.display(), dir.display()), e))
    });
    if result.is_err() {
        remove(&building);
    }
    result
}

/// Set-ups that were killed half-way: what they left in `accel-setup` (their process is gone),
/// as (pid, the pin name of the cgroup being set up, the directory). Gone: no such process, a
/// zombie (killed, its parent not yet told: such a set-up was hidden, and `off` said nothing was
/// there, for as long as the parent did not wait; a helper's kill loop), or another process
/// with that pid (its start time differs; `PID-NAME`, from before 2026-12-07, has none).
pub fn unfinished(root: &Path) -> Vec<(u32, String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(setup_root(&root.join("x"))) else { return Vec::new() };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let (who, pin_name) = name.split_once('-')?;
            let (pid, start) = match who.split_once('_') {
                Some((pid, start)) => (pid.parse::<u32>().ok()?, Some(start.parse::<u64>().ok()?)),
                None => (who.parse::<u32>().ok()?, None),
            };
            let alive = match start {
                Some(start) => super::cgroup::Process { pid, start }.alive(),
                None => Path::new(&format!("/proc/{pid}")).exists() && !crate::sys::exiting(pid),
            };
            (!alive).then(|| (pid, pin_name.to_string(), entry.path()))
        })
        .collect()
}

/// Removes what set-ups that were killed half-way left in `accel-setup` (`unfinished`): a
/// sockops link among it would keep accelerating the cgroup with no state anyone lists. Returns
/// the (pid, pin name, cgroup directories it was about to make, if it said so before it made
/// them: `begin_set_up`) of each.
pub fn remove_unfinished(root: &Path) -> Vec<(u32, String, Option<usize>)> {
    unfinished(root)
        .into_iter()
        .map(|(pid, pin_name, dir)| {
            log::info!("accel: removing what an interrupted set-up left at {}", super::cgroup::shown(&dir).display());
            let creates = creates(&dir);
            remove_creates_marker(&dir);
            remove(&dir);
            (pid, pin_name, creates)
        })
        .collect()
}

/// Removes the accel root and the set-up directory beside it when nothing is left in them (after
/// the last `off`), so no empty directory stays in bpffs. Called under the root's state lock:
/// a command waiting for that lock finds the directory gone and starts over (`StateLock`).
pub fn remove_if_empty(root: &Path) {
    let _ = std::fs::remove_dir(setup_root(&root.join("x")));
    let _ = std::fs::remove_dir(root);
}

fn create_in(dir: &Path, cgroup: &Cgroup, ports: &[u16], max_queued: u32, small_write: u32) -> Result<(), Error> {
    let mut bpf = bpf::load(bpf::objects::ACCEL)?;
    for name in MAPS {
        let map = bpf.map(name).ok_or_else(|| missing(&format!("map `{name}`")))?;
        map.pin(dir.join(name)).map_err(|e| bpf::unavailable_no_fallback("pin the accel maps", &e))?;
    }
    {
        let broken = |e: MapError| bpf::unavailable_no_fallback("fill the accel maps", &e);
        let mut port_map: HashMap<&mut MapData, u32, u8> =
            HashMap::try_from(bpf.map_mut("accel_ports").ok_or_else(|| missing("map `accel_ports`"))?)
                .map_err(broken)?;
        for &p in ports {
            port_map.insert(u32::from(p), 1, 0).map_err(broken)?;
        }
        let mut config: Array<&mut MapData, AccelConfig> =
            Array::try_from(bpf.map_mut("accel_config").ok_or_else(|| missing("map `accel_config`"))?)
                .map_err(broken)?;
        let value = AccelConfig {
            filter_ports: u32::from(!ports.is_empty()),
            max_queued,
            small_write,
            small_streak: super::SMALL_STREAK,
            cpus: std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX)),
            flags: ACCEL_FLAG_KNOWS_DRAINING,
            woken_wake_function: crate::sys::kernel_symbol("woken_wake_function").unwrap_or(0),
        };
        config.set(0, value, 0).map_err(broken)?;
    }
    let socks_fd = {
        let socks: SockHash<&MapData, SockKey> =
            SockHash::try_from(bpf.map("accel_socks").ok_or_else(|| missing("map `accel_socks`"))?)
                .map_err(|e| bpf::unavailable_no_fallback("open the accel socket map", &e))?;
        socks.fd().try_clone().map_err(|e| bpf::unavailable_no_fallback("open the accel socket map", &e))?
    };

    let msg: &mut SkMsg =
        bpf.program_mut("accel_msg").and_then(|p| p.try_into().ok()).ok_or_else(|| missing("program `accel_msg`"))?;
    msg.load().map_err(|e| bpf::unavailable_no_fallback("load the sk_msg program", &e))?;
    let id = msg.attach(&socks_fd).map_err(|e| bpf::unavailable_no_fallback("attach the sk_msg program", &e))?;
    // Dropping the attachment would detach it: the pinned map keeps the program attached instead.
    std::mem::forget(msg.take_link(id).map_err(|e| bpf::unavailable_no_fallback("attach the sk_msg program", &e))?);

    let ops: &mut SockOps = bpf
        .program_mut("accel_sockops")
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| missing("program `accel_sockops`"))?;
    ops.load().map_err(|e| bpf::unavailable_no_fallback("load the sockops program", &e))?;
    let cg_dir = File::open(cgroup.path()).map_err(|e| Error::io(format!("cannot open cgroup {cgroup}"), e))?;
    let id = ops
        .attach(cg_dir, CgroupAttachMode::Single)
        .map_err(|e| bpf::unavailable_no_fallback("attach sockops to the cgroup", &e))?;
    let link = ops.take_link(id).map_err(|e| bpf::unavailable_no_fallback("attach sockops to the cgroup", &e))?;
    let link: FdLink = link.try_into().map_err(|_| Error::BpfUnavailable {
        reason: "the kernel attached sockops without a bpf_link, which cannot be pinned".into(),
        fix: "skrelay accel needs Linux 5.19 or newer".into(),
    })?;
    link.pin(dir.join(SOCKOPS_LINK)).map_err(|e| bpf::unavailable_no_fallback("pin the sockops link", &e))?;
    Ok(())
}

/// Detaches sockops from the cgroup: no new connection joins; joined ones stay accelerated while
/// the maps live, without sockops' callbacks.
pub fn detach_sockops(dir: &Path) -> Result<(), Error> {
    let path = dir.join(SOCKOPS_LINK);
    if !path.exists() {
        return Ok(());
    }
    let link =
        PinnedLink::from_pin(&path).map_err(|e| bpf::unavailable_no_fallback("open the pinned sockops link", &e))?;
    let link = link.unpin().map_err(|e| Error::io(format!("cannot remove {}", path.display()), e))?;
    drop(link); // the last reference: the kernel detaches the program
    Ok(())
}

/// `accel off`: no new connection joins. The joined ones keep sockops (its FIN, RTT and close
/// callbacks take a half-closed socket out of the map, without which a blocking reader that
/// half-closed got EAGAIN at the end, 20 of 20 after `off` in a helper's pass), where the
/// set-up's program honours the draining flag; state another version pinned has sockops
/// detached at once, as before. `remove` detaches it.
pub fn start_draining(dir: &Path) -> Result<(), Error> {
    let flagged = (|| {
        let mut config: Array<MapData, AccelConfig> = Array::try_from(open_map(dir, "accel_config").ok()?).ok()?;
        let mut value = config.get(&0, 0).ok()?;
        if value.flags & ACCEL_FLAG_KNOWS_DRAINING == 0 {
            return None;
        }
        value.flags |= ACCEL_FLAG_DRAINING;
        config.set(0, value, 0).ok()
    })();
    match flagged {
        Some(()) => Ok(()),
        None => detach_sockops(dir),
    }
}

/// True once `accel off` ran on `dir` (`start_draining`): new connections are no longer
/// accelerated.
pub fn is_draining(dir: &Path) -> bool {
    if !is_attached(dir) {
        return true;
    }
    let config = open_map(dir, "accel_config").ok().and_then(|m| Array::<MapData, AccelConfig>::try_from(m).ok());
    config.and_then(|c| c.get(&0, 0).ok()).is_some_and(|v| v.flags & ACCEL_FLAG_DRAINING != 0)
}

/// True while every map is pinned in `dir` (false once `remove` started).
pub fn is_complete(dir: &Path) -> bool {
    MAPS.iter().all(|name| dir.join(name).exists())
}

/// Which set-up pinned `dir`: a later set-up of the same cgroup (`accel off`, then `on`) is
/// another directory, which bpffs gives another inode (a rename keeps it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetUp(u64);

pub fn set_up_of(dir: &Path) -> Option<SetUp> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| SetUp(m.ino()))
}

/// True while sockops is attached (the link is pinned).
pub fn is_attached(dir: &Path) -> bool {
    dir.join(SOCKOPS_LINK).exists()
}

/// Whether the pinned sockops link of `dir` no longer runs for the cgroup at `cgroup` (a
/// directory that exists): its link was detached by hand (`bpftool link detach`), or that cgroup
/// was removed and made again at the same path (systemd does so at every restart of a service),
/// which leaves the link on the old cgroup, or on none once that is released. Either way, new
/// connections there are not accelerated while the state says "on" (a new-user pass). False
/// when it cannot be told (no link pinned, the link or the directory cannot be read).
pub fn sockops_elsewhere(dir: &Path, cgroup: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let link = match crate::sys::bpf::obj_get(&dir.join(SOCKOPS_LINK)) {
        Ok(link) => link,
        // Root's pins are mode 0600: a service user with CAP_BPF and CAP_NET_ADMIN cannot open
        // them, and its `accel run` was told the command ran in a stale set-up (a re-check
        // pass). Such a user can ask the cgroup what runs there: a set-up attaches sockops to
        // the cgroup itself, so none there is a stale set-up.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let Ok(cg) = std::fs::File::open(cgroup) else { return false };
            let attached = crate::sys::bpf_prog_query(&cg, crate::sys::bpf::ATTACH_CGROUP_SOCK_OPS, false);
            return attached.is_ok_and(|progs| progs.is_empty());
        }
        Err(_) => return false,
    };
    let Ok(Some(target)) = crate::sys::bpf::cgroup_link_target(&link) else { return false };
    // A cgroup v2 directory's inode number is its cgroup id.
    std::fs::metadata(cgroup).is_ok_and(|m| m.ino() != target)
}

/// Removes every pin in `dir` and the directory (best effort: used on error paths too). The maps
/// go when their last reference does, which removes the sockets from the map and the sk_msg
/// program from the sockets.
pub fn remove(dir: &Path) {
    let _ = detach_sockops(dir);
    for name in MAPS {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let _ = std::fs::remove_dir(dir);
}

fn open_map(dir: &Path, name: &str) -> Result<Map, Error> {
    let path = dir.join(name);
    let data =
        MapData::from_pin(&path).map_err(|e| bpf::unavailable_no_fallback(&format!("open {}", path.display()), &e))?;
    Map::from_map_data(data).map_err(|e| bpf::unavailable_no_fallback(&format!("open {}", path.display()), &e))
}

/// What the pinned maps of one accelerated cgroup say.
pub struct Snapshot {
    pub ports: Vec<u16>,
    /// Sockets in the socket map now (each open accelerated connection counts twice).
    pub sockets_open: u64,
    /// Counters summed over CPUs, by `accel_stat` index (LAST_ERRNO: the largest).
    pub stats: Vec<u64>,
    /// The policy `on` (or `run`) set.
    pub config: AccelConfig,
}

pub fn snapshot(dir: &Path) -> Result<Snapshot, Error> {
    let broken = |e: MapError| bpf::unavailable_no_fallback("read the accel maps", &e);
    let stats_map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(open_map(dir, "accel_stats")?).map_err(broken)?;
    let mut stats = Vec::new();
    for idx in 0..accel_stat::MAX {
        let per_cpu = stats_map.get(&idx, 0).map_err(broken)?;
        stats.push(if idx == accel_stat::LAST_ERRNO {
            per_cpu.iter().copied().max().unwrap_or(0)
        } else {
            // Wrapping: a gauge's per-CPU slots may each have wrapped below zero.
            per_cpu.iter().fold(0u64, |sum, &v| sum.wrapping_add(v))
        });
    }
    let socks: SockHash<MapData, SockKey> = SockHash::try_from(open_map(dir, "accel_socks")?).map_err(broken)?;
    let sockets_open = socks.keys().filter(|k| k.is_ok()).count() as u64;
    let config: Array<MapData, AccelConfig> = Array::try_from(open_map(dir, "accel_config")?).map_err(broken)?;
    let config = config.get(&0, 0).map_err(broken)?;
    let mut ports = Vec::new();
    if config.filter_ports != 0 {
        let port_map: HashMap<MapData, u32, u8> = HashMap::try_from(open_map(dir, "accel_ports")?).map_err(broken)?;
        ports = port_map.keys().filter_map(|k| k.ok()).filter_map(|p| u16::try_from(p).ok()).collect();
        ports.sort_unstable();
    }
    Ok(Snapshot { ports, sockets_open, stats, config })
}

/// Sockets of open connections in the cgroup's socket map. Reads only that map, whose layout
/// every skrelay version shares, so `off` works on state another version pinned.
pub fn open_sockets(dir: &Path) -> Result<u64, Error> {
    if !dir.join("accel_socks").exists() {
        return Ok(0); // an incomplete state (an interrupted set-up of an older version): no sockets
    }
    let broken = |e: MapError| bpf::unavailable_no_fallback("read the accel socket map", &e);
    let socks: SockHash<MapData, SockKey> = SockHash::try_from(open_map(dir, "accel_socks")?).map_err(broken)?;
    Ok(socks.keys().filter(|k| k.is_ok()).count() as u64)
}

/// The pin directories under `root` (one per accelerated cgroup), by name.
pub fn list(root: &Path) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(root)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| (e.file_name().to_string_lossy().into_owned(), e.path())).collect())
        .unwrap_or_default();
    out.sort();
    out
}
