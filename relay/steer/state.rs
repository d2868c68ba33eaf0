//! The steering state of one network namespace: the sk_lookup program's maps and link, pinned
//! under /sys/fs/bpf/skrelay/<netns inode>/ so they outlive the command, read and written under
//! a lock (bpffs::StateLock) so two commands cannot interleave.
//!
//! Pins: `link` (the sk_lookup link, which keeps the program attached), and the maps by their
//! names in probes/steer.bpf.c. `steer_info[0]` holds the version of the program behind the link:
//! a binary whose embedded program differs swaps it in place with BPF_LINK_UPDATE, keeping every
//! map (and so every binding) as it is.
use super::{
    bindings::BindingKey,
    plan::{self, Plan},
    record::Record,
    target::Target,
};
use crate::{
    abi::{SteerBinding, SteerCounters, SteerMatch},
    bpf, bpffs,
    error::Error,
    sys,
};
use aya::{
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues},
    programs::{
        links::{FdLink, PinnedLink},
        SkLookup,
    },
    Ebpf, EbpfLoader,
};
use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
};

pub const MAPS: [&str; 5] = ["steer_ports", "steer_targets", "steer_bindings", "steer_stats", "steer_info"];
pub const LINK: &str = "link";
pub const PROGRAM: &str = "steer_lookup";

/// Version of the embedded steer program: a hash of the object, so any change to it counts.
pub fn program_version() -> u64 {
    // FNV-1a, 64 bits.
    bpf::objects::STEER.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3))
}

/// Where this network namespace's steering state is pinned (mounting bpffs if needed).
pub fn dir() -> Result<PathBuf, Error> {
    Ok(bpffs::root()?.join(netns_name()?))
}

/// Where this network namespace's steering state would be pinned, if skrelay has pinned anything
/// on this machine; mounts and creates nothing (read-only commands).
pub fn existing_dir() -> Result<Option<PathBuf>, Error> {
    let name = netns_name()?;
    Ok(bpffs::existing_root().map(|root| root.join(name)))
}

/// Where `existing_dir` found nothing: Ok if nothing is pinned, an error if this process cannot
/// look where it would be (`bpffs::out_of_reach`).
pub fn nothing_or_out_of_reach() -> Result<(), Error> {
    match bpffs::out_of_reach() {
        Some(why) => Err(Error::StateOutOfReach { what: "steering", why }),
        None => Ok(()),
    }
}

pub(super) fn netns_name() -> Result<String, Error> {
    let ns = sys::own_netns_inode().map_err(|e| Error::io("cannot read this network namespace", e))?;
    Ok(ns.to_string())
}

/// Whether anything is pinned in `dir`.
pub fn exists(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

/// Refuses pinned state this process may not open, naming its owner (`bpffs::check_owner`).
fn check_owner(dir: &Path) -> Result<(), Error> {
    crate::bpffs::check_owner("steering", dir, MAPS.iter().copied().chain([LINK]))
}

/// The maps of a steer program instance, pinned (steer) or not (a funnel). Only the steer
/// module writes them: `State::apply` and `Funnel::attach`.
pub(super) struct Maps {
    pub(super) ports: LpmTrie<MapData, SteerMatch, u32>,
    pub(super) targets: MapData,
    pub(super) bindings: HashMap<MapData, u32, SteerBinding>,
    stats: PerCpuArray<MapData, SteerCounters>,
    info: Array<MapData, u64>,
}

fn broken(e: impl std::error::Error + 'static) -> Error {
    unavailable("open the steering maps", &e)
}

/// Like `bpf::unavailable`, with steering's own fix where the kernel lacks what it needs (the
/// generic fix talks about the relay's stream parser).
pub fn unavailable(step: &str, err: &(dyn std::error::Error + 'static)) -> Error {
    let errno = bpf::os_error(err).and_then(|e| e.raw_os_error());
    match bpf::unavailable_no_fallback(step, err) {
        // Steering loads no program that reads kernel memory: CAP_PERFMON is not needed.
        Error::BpfUnavailable { reason, fix } if fix.contains("CAP_PERFMON") => {
            // Which of them this process lacks, as the relay's says (a re-check pass: root without
            // them was told to run as root).
            let lacks = bpf::lacking_note(&[(39, "CAP_BPF"), (12, "CAP_NET_ADMIN")]);
            Error::BpfUnavailable { reason, fix: format!("run as root or grant CAP_BPF and CAP_NET_ADMIN{lacks}") }
        }
        Error::BpfUnavailable { reason, .. }
            if !matches!(
                errno,
                Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::ENOMEM) | Some(libc::EMFILE) | Some(libc::ENFILE)
            ) =>
        {
            Error::BpfUnavailable {
                reason,
                fix: "steering needs Linux 5.9 or newer with BPF sk_lookup and bpf links; check `dmesg`".into(),
            }
        }
        other => other,
    }
}

impl Maps {
    /// Takes the steer maps out of a loaded object.
    pub fn take(bpf: &mut Ebpf) -> Result<Maps, Error> {
        let mut take = |name: &str| {
            bpf.take_map(name).ok_or_else(|| Error::BpfUnavailable {
                reason: format!("the embedded steer object has no map `{name}`"),
                fix: "rebuild skrelay".into(),
            })
        };
        Self::from_maps(&mut take)
    }

    /// Opens the maps pinned in `dir`, creating nothing (aya's loader would create and pin a
    /// missing one).
    fn from_pins(dir: &Path) -> Result<Maps, Error> {
        let mut open = |name: &str| {
            let path = dir.join(name);
            MapData::from_pin(&path)
                .and_then(Map::from_map_data)
                .map_err(|e| unavailable(&format!("open the pinned steering map {}", path.display()), &e))
        };
        Self::from_maps(&mut open)
    }

    fn from_maps(get: &mut dyn FnMut(&str) -> Result<Map, Error>) -> Result<Maps, Error> {
        let ports = LpmTrie::try_from(get("steer_ports")?).map_err(broken)?;
        let targets = match get("steer_targets")? {
            Map::SockMap(m) => m,
            _ => return Err(broken(std::io::Error::other("steer_targets is not a SOCKMAP"))),
        };
        let bindings = HashMap::try_from(get("steer_bindings")?).map_err(broken)?;
        let stats = PerCpuArray::try_from(get("steer_stats")?).map_err(broken)?;
        let info = Array::try_from(get("steer_info")?).map_err(broken)?;
        Ok(Maps { ports, targets, bindings, stats, info })
    }

    /// Every binding this version can read, by id. A walk of the map that meets an error (its
    /// keys walk stops there) is walked again, and one that still does is said, not taken
    /// silently for the whole (`steer list` once showed 2 of 6 bindings, exit 0, in a stranger
    /// pass; not reproduced).
    pub(super) fn records(&self) -> BTreeMap<u32, Record> {
        let mut walks = 0;
        loop {
            walks += 1;
            let mut out = BTreeMap::new();
            let mut error = None;
            for entry in self.bindings.iter() {
                match entry {
                    Ok((id, b)) => {
                        if let Some(r) = Record::decode(&b) {
                            out.insert(id, r);
                        }
                    }
                    Err(e) => error = Some(e),
                }
            }
            match error {
                Some(_) if walks < 3 => continue,
                Some(e) => {
                    log::warn!(
                        "steer state: the bindings map could not be read whole ({e}); what follows may miss some"
                    );
                    return out;
                }
                None => return out,
            }
        }
    }

    /// (hits, refused) of a binding, summed over CPUs.
    pub(super) fn counters(&self, id: u32) -> SteerCounters {
        let mut sum = SteerCounters::default();
        if let Ok(values) = self.stats.get(&id, 0) {
            for v in values.iter() {
                sum.hits += v.hits;
                sum.refused += v.refused;
            }
        }
        sum
    }

    fn reset_counters(&mut self, id: u32) -> Result<(), Error> {
        let n = aya::util::nr_cpus().map_err(|(_, e)| Error::io("cannot count CPUs", e))?;
        let zeros = PerCpuValues::try_from(vec![SteerCounters::default(); n]).map_err(broken)?;
        self.stats.set(id, zeros, 0).map_err(|e| Error::steer_map("reset a steering counter", &e))
    }

    /// The cookie of the socket a binding sends to, `None` once that socket has closed.
    pub(super) fn target_cookie(&self, id: u32) -> Option<u64> {
        sys::bpf::sockmap_cookie(self.targets.fd(), id).ok().flatten()
    }
}

/// Loads the steer object and its program (not attached).
pub fn load_program(bpf: &mut Ebpf) -> Result<&mut SkLookup, Error> {
    let prog: &mut SkLookup = bpf.program_mut(PROGRAM).and_then(|p| p.try_into().ok()).ok_or_else(|| {
        Error::BpfUnavailable { reason: format!("no program `{PROGRAM}`"), fix: "rebuild skrelay".into() }
    })?;
    prog.load().map_err(|e| unavailable("load the sk_lookup program", &e))?;
    Ok(prog)
}

/// Opens the current network namespace for attaching sk_lookup programs.
pub fn netns_file() -> Result<File, Error> {
    File::open("/proc/thread-self/ns/net").map_err(|e| Error::io("cannot open this network namespace", e))
}

/// The pinned state of this network namespace, locked for the life of the value: shared by
/// commands that only read it, exclusive for those that change it. Its maps are private: a
/// change is planned (`plan::plan`) and then applied here.
pub struct State {
    dir: PathBuf,
    maps: Maps,
    _lock: bpffs::StateLock,
}

impl State {
    /// Opens the state for reading (a shared lock) if anything is pinned; `None` if steering was
    /// never set up here, or the state was left by a dead namespace whose inode number this one
    /// now has (the next change removes it). Creates, mounts and removes nothing.
    pub fn open_read_only() -> Result<Option<State>, Error> {
        let Some(dir) = existing_dir()? else { return nothing_or_out_of_reach().map(|()| None) };
        if !dir.join(LINK).exists() {
            return Ok(None);
        }
        let Some(lock) = bpffs::StateLock::acquire_shared(&dir)? else {
            return Ok(None); // reset while we waited for the lock
        };
        check_owner(&dir)?;
        if !dir.join(LINK).exists() || is_stale(&dir)? {
            return Ok(None);
        }
        let maps = Maps::from_pins(&dir)?;
        Ok(Some(State { dir, maps, _lock: lock }))
    }

    /// Opens the state for changing it (an exclusive lock) if anything is pinned; `None` as for
    /// `open_read_only`, except that stale state is removed (with a warning).
    pub fn open() -> Result<Option<State>, Error> {
        let Some(dir) = existing_dir()? else { return nothing_or_out_of_reach().map(|()| None) };
        // Looking must not create anything: no lock (which makes the directory) without state.
        if !dir.join(LINK).exists() {
            return Ok(None);
        }
        let Some(lock) = bpffs::StateLock::acquire_existing(&dir)? else {
            return Ok(None); // reset while we waited for the lock
        };
        check_owner(&dir)?;
        if !dir.join(LINK).exists() || remove_if_stale(&dir)? {
            return Ok(None);
        }
        let maps = Maps::from_pins(&dir)?;
        Ok(Some(State { dir, maps, _lock: lock }))
    }

    /// Opens the state, creating and attaching it if needed, and swaps in this binary's program
    /// if the link runs another version. Returns a line for the user when something changed.
    pub fn open_or_create() -> Result<(State, Option<String>), Error> {
        let dir = dir()?;
        let lock = bpffs::StateLock::acquire(&dir)?;
        check_owner(&dir)?;
        if remove_if_stale(&dir)? {
            // The directory, which the lock holds, went with the stale state: start again.
            drop(lock);
            return Self::open_or_create();
        }
        // Map pins without a link steer nothing: what a `steer reset` or a first set-up killed
        // part-way left (`remove_all` unpins the link first). Their entries may be half removed,
        // so they are cleared, not taken over.
        let cleared = match exists(&dir) && !dir.join(LINK).exists() {
            true => unpin_all(&dir)?,
            false => 0,
        };
        // A set-up that fails before its link is pinned (out of descriptors, say) leaves map pins
        // that steer nothing: a first one takes them back, leaving nothing behind.
        let fresh = !exists(&dir);
        match Self::set_up(&dir) {
            Ok((maps, note)) if cleared > 0 => {
                let cleared = format!(
                    "removed {} that an interrupted skrelay command left in {} (without a link {} steered nothing)",
                    if cleared == 1 { "1 pin".to_string() } else { format!("{cleared} pins") },
                    sys::shown(&dir).display(),
                    if cleared == 1 { "it" } else { "they" },
                );
                let note = Some(note.map_or(cleared.clone(), |n| format!("{cleared}; {n}")));
                Ok((State { dir, maps, _lock: lock }, note))
            }
            Ok((maps, note)) => Ok((State { dir, maps, _lock: lock }, note)),
            Err(e) => {
                if fresh {
                    let _ = remove_all(&dir);
                    drop(lock);
                    bpffs::remove_root_if_empty();
                }
                Err(e)
            }
        }
    }

    /// `open_or_create`'s work in `dir`, under its lock: the maps, and a line for the user.
    fn set_up(dir: &Path) -> Result<(Maps, Option<String>), Error> {
        let mut bpf = loader(dir).map_err(|e| unavailable("create the steering maps", &e))?;
        let mut maps = Maps::take(&mut bpf)?;
        let link_path = dir.join(LINK);
        let ours = program_version();
        let mut note = None;
        if link_path.exists() && link_detached(dir) {
            // Detached by hand (`bpftool link detach`): nothing is steered. A new link for the
            // same maps steers the bindings again.
            std::fs::remove_file(&link_path)
                .map_err(|e| Error::io(format!("cannot unpin {}", link_path.display()), e))?;
            note = Some(format!(
                "the steering link was detached (not by skrelay), so nothing was steered: attached it again, {} kept",
                match maps.records().len() {
                    1 => "1 binding".to_string(),
                    n => format!("{n} bindings"),
                }
            ));
        }
        if !link_path.exists() {
            let prog = load_program(&mut bpf)?;
            let netns = netns_file()?;
            let id = prog.attach(&netns).map_err(|e| unavailable("attach the sk_lookup program", &e))?;
            let link: FdLink = prog.take_link(id).map_err(|e| unavailable("keep the sk_lookup link", &e))?.into();
            link.pin(&link_path).map_err(|e| unavailable("pin the sk_lookup link", &e))?;
            maps.info.set(0, ours, 0).map_err(|e| Error::steer_map("record the program version", &e))?;
        } else {
            let theirs = maps.info.get(&0, 0).unwrap_or(0);
            if theirs != ours {
                let prog = load_program(&mut bpf)?;
                let info = PinnedLink::from_pin(&link_path)
                    .map(FdLink::from)
                    .and_then(|l| l.info())
                    .map_err(|e| unavailable("read the pinned sk_lookup link", &e))?;
                let link_id = info.id();
                let old = aya::programs::loaded_programs()
                    .filter_map(Result::ok)
                    .find(|p| p.id() == info.program_id())
                    .ok_or_else(|| Error::io("cannot open the old program", std::io::ErrorKind::NotFound.into()))?
                    .fd()
                    .map_err(|e| unavailable("open the old sk_lookup program", &e))?;
                let new = prog.fd().map_err(|e| unavailable("load the sk_lookup program", &e))?;
                // aya's links lend no descriptor for BPF_LINK_UPDATE: open the pin for it.
                let link = sys::bpf::obj_get(&link_path).map_err(|e| Error::io("cannot open the pinned link", e))?;
                sys::bpf::link_update(&link, new, old)
                    .map_err(|e| Error::io("cannot swap the steering program in place", e))?;
                maps.info.set(0, ours, 0).map_err(|e| Error::steer_map("record the program version", &e))?;
                // Version 0: a first `steer add` killed between pinning the link and recording
                // the version; the program it attached may be any build's, so it is swapped too.
                note = Some(match theirs {
                    0 => format!(
                        "swapped in this binary's steering program (link {link_id}): an interrupted skrelay command \
                         left its version unrecorded; bindings kept"
                    ),
                    _ => format!(
                        "upgraded the steering program in place (link {link_id}, version {theirs:016x} -> \
                         {ours:016x}); bindings kept"
                    ),
                });
            }
        }
        Ok((maps, note))
    }

    /// Where the state is pinned.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// (link id, program id) of the pinned link.
    pub fn link_ids(&self) -> Option<(u32, u32)> {
        pinned_link_ids(&self.dir)
    }

    /// Whether the pinned link was detached by hand, so that nothing is steered (see
    /// `holds_live_target`).
    pub fn detached(&self) -> bool {
        link_detached(&self.dir)
    }

    /// The version of the program the link runs (see `program_version`).
    pub fn program_version(&self) -> u64 {
        self.maps.info.get(&0, 0).unwrap_or(0)
    }

    /// Every binding this version can read, by id.
    pub fn records(&self) -> BTreeMap<u32, Record> {
        self.maps.records()
    }

    /// What each binding matches, by id.
    pub fn keys(&self) -> BTreeMap<u32, BindingKey> {
        self.records().into_iter().map(|(id, r)| (id, r.key)).collect()
    }

    /// (hits, refused) of a binding, summed over CPUs.
    pub fn counters(&self, id: u32) -> SteerCounters {
        self.maps.counters(id)
    }

    /// Whether the socket binding `id` sends to is still open: the socket map still holds the
    /// socket whose cookie the binding recorded.
    pub fn target_alive(&self, id: u32, record: &Record) -> bool {
        self.maps.target_cookie(id) == Some(record.cookie)
    }

    /// Per binding (by id), how many of the ports it should own are not steered to it: the trie
    /// entries a command killed part-way left unwritten (or moved to another binding). Only
    /// bindings with such ports are listed.
    pub fn unsteered(&self) -> BTreeMap<u32, u32> {
        let mut out = BTreeMap::new();
        for e in plan::entries_of(&self.keys()) {
            // An LPM lookup with the entry's own prefix length finds the entry itself if it is
            // there, else a shorter prefix's entry (another binding's id) or nothing.
            let now = self.maps.ports.get(&e.slot.trie_key(e.port), 0).ok();
            if let Some(id) = e.owner.filter(|id| now != Some(*id)) {
                *out.entry(id).or_insert(0) += 1;
            }
        }
        out
    }

    /// Writes every trie entry the bindings call for that is missing or owned by the wrong
    /// binding (see `unsteered`), so the records and the trie agree again before a change is
    /// planned. Returns how many it wrote.
    pub fn repair(&mut self) -> Result<usize, Error> {
        let mut written = 0;
        for e in plan::entries_of(&self.keys()) {
            let (key, Some(id)) = (e.slot.trie_key(e.port), e.owner) else { continue };
            if self.maps.ports.get(&key, 0).ok() != Some(id) {
                self.maps.ports.insert(&key, id, 0).map_err(|e| Error::steer_map("update the port map", &e))?;
                written += 1;
            }
        }
        Ok(written)
    }

    /// Writes a plan: the new and replaced bindings' targets and records (new ones with fresh
    /// counters), then the trie entries, then what removed bindings leave. `target` is where the
    /// new and replaced bindings send to.
    pub fn apply(&mut self, plan: &Plan, target: Option<&Target>) -> Result<(), Error> {
        let binds = plan.added.iter().map(|b| (b, true)).chain(plan.replaced.iter().map(|b| (b, false)));
        for (&(id, key), new) in binds {
            let Some(target) = target else {
                return Err(Error::Usage(format!("binding {key} needs a target socket")));
            };
            // A new target starts from zero: the old one's refusals read as the new one's (a
            // helper's pass). Re-adding the same socket keeps them.
            let same_target = !new
                && self
                    .maps
                    .bindings
                    .get(&id, 0)
                    .ok()
                    .and_then(|b| Record::decode(&b))
                    .is_some_and(|r| r.cookie == target.cookie);
            if !same_target {
                self.maps.reset_counters(id)?;
            }
            set_target(&self.maps, id, target)?;
            let record =
                Record { key, target: target.local, pid: target.pid, comm: target.comm.clone(), cookie: target.cookie };
            self.maps.bindings.insert(id, record.encode(), 0).map_err(|e| Error::steer_map("record a binding", &e))?;
        }
        for change in &plan.ports {
            let tkey = change.slot.trie_key(change.port);
            match change.owner {
                Some(id) => self.maps.ports.insert(&tkey, id, 0),
                None => self.maps.ports.remove(&tkey),
            }
            .map_err(|e| Error::steer_map("update the port map", &e))?;
        }
        // The record goes first: a command killed between the two leaves a target entry no record
        // names (unseen, and the next binding of that id overwrites it), never a recorded binding
        // without its target, which `steer list` showed as "(gone)" while its socket lived and
        // the repair said it was steered again (a helper's pass).
        for &(id, _) in &plan.removed {
            self.maps.bindings.remove(&id).map_err(|e| Error::steer_map("remove a binding", &e))?;
            sys::bpf::sockmap_clear(self.maps.targets.fd(), id)
                .map_err(|e| Error::steer_map("clear a steering target", &e))?;
        }
        Ok(())
    }
}

fn set_target(maps: &Maps, id: u32, target: &Target) -> Result<(), Error> {
    sys::bpf::sockmap_set(maps.targets.fd(), id, &target.fd).map_err(|e| match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => Error::Usage(format!(
            "the kernel refused the target socket at {} (sk_lookup takes listening TCP and unconnected UDP sockets)",
            target.local
        )),
        _ => Error::steer_map("put the target socket into the steering map", &e),
    })
}

/// (link id, program id) of the link pinned in `dir`.
pub fn pinned_link_ids(dir: &Path) -> Option<(u32, u32)> {
    let info = FdLink::from(PinnedLink::from_pin(dir.join(LINK)).ok()?).info().ok()?;
    Some((info.id(), info.program_id()))
}

/// Whether the pinned link in `dir` is attached to a live namespace, and which: its netns inode,
/// or 0 once that namespace is gone (the kernel detaches the link then).
fn link_netns(dir: &Path) -> Option<u32> {
    let link = sys::bpf::obj_get(&dir.join(LINK)).ok()?;
    sys::bpf::netns_link(&link).ok().flatten().map(|l| l.netns_ino)
}

/// State is named by the namespace's inode number, which the kernel hands to a new namespace once
/// the old one is gone; the pinned link then still exists, detached. Such state belongs to no one:
/// it is removed here (under the caller's lock), so this namespace never adopts it. True if it was.
fn remove_if_stale(dir: &Path) -> Result<bool, Error> {
    match is_stale(dir)? {
        true => {
            let bindings = Maps::from_pins(dir).map_or(0, |m| m.records().len());
            remove_all(dir)?;
            log::warn!(
                "removed stale steering state at {} ({bindings} bindings): it was left by a network namespace that no \
                 longer exists and whose inode number this one now has",
                sys::shown(dir).display()
            );
            Ok(true)
        }
        false => Ok(false),
    }
}

/// Whether the state in `dir` was left by a dead namespace (see `remove_if_stale`); an error if
/// it is attached to another, live one.
fn is_stale(dir: &Path) -> Result<bool, Error> {
    let own = sys::own_netns_inode().map_err(|e| Error::io("cannot read this network namespace", e))?;
    match link_netns(dir) {
        Some(ino) if ino != 0 && u64::from(ino) != own => Err(Error::Usage(format!(
            "the steering state at {} is attached to another network namespace (inode {ino}), not this one \
             (inode {own}): it was moved there by hand; remove it with `rm -r {}`",
            sys::shown(dir).display(),
            dir.display()
        ))),
        Some(0) => Ok(!holds_live_target(dir)),
        _ => Ok(false),
    }
}

/// Whether any binding pinned in `dir` still has its target socket in the socket map. A socket
/// keeps its network namespace alive and steer takes targets of its own namespace only, so state
/// whose link reports no namespace (0) but holds a live target was detached by hand (`bpftool
/// link detach`) in a namespace that still exists, not left by a dead one.
fn holds_live_target(dir: &Path) -> bool {
    Maps::from_pins(dir).is_ok_and(|m| m.records().keys().any(|&id| m.target_cookie(id).is_some()))
}

/// Whether the pinned link in `dir` is detached from its (live) network namespace: see
/// `holds_live_target`.
pub fn link_detached(dir: &Path) -> bool {
    link_netns(dir) == Some(0) && holds_live_target(dir)
}

/// The state directories left by network namespaces that no longer exist, with the number of
/// their bindings: `status` counts them and `steer reset` (or the next `steer add`) removes them.
/// This namespace's own name is among them when a dead namespace had its inode number (the
/// kernel reuses them: a helper got the same one 3 times in 3), which `status` used to call
/// pins left by an interrupted command.
pub fn dead_states() -> Vec<(PathBuf, usize)> {
    let Some(root) = bpffs::existing_root() else { return Vec::new() };
    let Ok(entries) = std::fs::read_dir(&root) else { return Vec::new() };
    let mut dead: Vec<(PathBuf, usize)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|dir| dir.join(LINK).exists() && link_netns(dir) == Some(0) && !holds_live_target(dir))
        .map(|dir| {
            let bindings = Maps::from_pins(&dir).map_or(0, |m| m.records().len());
            (dir, bindings)
        })
        .collect();
    dead.sort();
    dead
}

/// Removes the state of every namespace that no longer exists (their pins keep programs and
/// maps in memory; `steer add` and `steer reset` sweep them). Returns how many it removed.
pub fn sweep_stale() -> usize {
    let mut removed = 0;
    for (dir, _) in dead_states() {
        if let Ok(Some(_lock)) = bpffs::StateLock::acquire_existing(&dir) {
            if link_netns(&dir) == Some(0) && !holds_live_target(&dir) && remove_all(&dir).is_ok() {
                log::info!(
                    "removed {}: steering state of a network namespace that no longer exists",
                    sys::shown(&dir).display()
                );
                removed += 1;
            }
        }
    }
    removed
}

/// A loader that reuses (or creates and pins) every steer map under `dir`.
fn loader(dir: &Path) -> Result<Ebpf, aya::EbpfError> {
    let mut l = EbpfLoader::new();
    for name in MAPS {
        l.map_pin_path(name, dir.join(name));
    }
    l.load(bpf::objects::STEER)
}

/// Removes every pin in `dir` and the directory: the link goes with its last reference, which
/// detaches the program; the maps go with the program.
pub fn remove_all(dir: &Path) -> Result<usize, Error> {
    let removed = unpin_all(dir)?;
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io(format!("cannot remove {}", dir.display()), e))
        }
        _ => Ok(removed),
    }
}

/// Removes every pin in `dir`, the link first; keeps the directory (and so its lock).
fn unpin_all(dir: &Path) -> Result<usize, Error> {
    check_owner(dir)?;
    let mut removed = 0;
    // A directory that cannot be listed (out of descriptors) is said as such: it went on to
    // "Directory not empty", with every pin left.
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => Some(entries),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(format!("cannot list {}", dir.display()), e)),
    };
    if let Some(entries) = entries {
        // The link first: steering stops at once, and a command killed part-way leaves only maps,
        // which steer nothing and which the next `steer add` clears (it used to take them over,
        // stale port entries and all: a helper's pass found 59,000 ports steered that `steer
        // list` did not show).
        let mut pins: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        pins.sort_by_key(|p| p.file_name() != Some(std::ffi::OsStr::new(LINK)));
        for pin in pins {
            std::fs::remove_file(&pin).map_err(|err| Error::io(format!("cannot unpin {}", pin.display()), err))?;
            removed += 1;
        }
    }
    Ok(removed)
}
