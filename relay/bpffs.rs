//! skrelay's pinned state lives under /sys/fs/bpf/skrelay/: this module finds (or mounts) bpffs
//! and serialises commands that change pinned state with a lock file.
use crate::error::Error;
use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
};

pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

const SYSFS_MAGIC: i64 = 0x62656572;

fn fs_type(path: &Path) -> Option<i64> {
    rustix::fs::statfs(path).ok().map(|st| st.f_type)
}

fn is_bpffs(path: &Path) -> bool {
    fs_type(path) == Some(BPF_FS_MAGIC)
}

/// A process's mount namespace ("mnt:[inode]"), None where it cannot be read (PID 1 of a
/// sandbox may refuse even root).
fn mount_ns(pid: &str) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()
}

/// A process's parent, from /proc/PID/stat (None at the top or when it cannot be read).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
    (ppid > 0).then_some(ppid)
}

/// The nearest process, PID 1 first, then our ancestors from the parent up, whose mount
/// namespace is readable and not ours: where a command that got a mount namespace of its own
/// came from (`ip netns exec` unshares one and runs the command in the same process; under
/// `ip netns exec NS sh -c ...` the shell shares it, and its caller does not). Where PID 1's
/// cannot be read (a sandbox's init may refuse even root), kthreadd's, PID 2, stands for it:
/// kernel threads live in the initial mount namespace. Without it an orphan of `ip netns exec NS
/// setsid -f ...` had no ancestor to compare with, mounted a bpffs in its own namespace, and the
/// steering it reported vanished with it.
pub fn outer_mount_ns_process() -> Option<i32> {
    let own = mount_ns("self")?;
    let differs = |pid: i32| mount_ns(&pid.to_string()).is_some_and(|ns| ns != own);
    if differs(1) {
        return Some(1);
    }
    if mount_ns("1").is_none() && is_kthreadd(2) && differs(2) {
        return Some(2);
    }
    let mut pid = rustix::process::getppid().map(|p| p.as_raw_nonzero().get())?;
    for _ in 0..64 {
        if differs(pid) {
            return Some(pid);
        }
        pid = parent_of(pid)?;
    }
    None
}

/// PID `pid` is the kernel's kthreadd (PID 2 outside a pid namespace of our own).
fn is_kthreadd(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "kthreadd")
        && parent_of(pid).is_none()
}

/// The directory skrelay pins under (`/sys/fs/bpf/skrelay`), mounting bpffs at /sys/fs/bpf first
/// if nothing is mounted there.
///
/// `ip netns exec` runs the command in a mount namespace of its own with a fresh sysfs on /sys,
/// so /sys/fs/bpf is a bare sysfs directory there, and a bpffs mounted on it would vanish with the
/// command, taking the pins (and so the steering) along. The same holds for any mount namespace
/// of our own without a bpffs (`unshare -m`): nothing tells whether it outlives the command. Then
/// the pins go to the bpffs of PID 1's or else the nearest ancestor's mount namespace (through
/// /proc/PID/root), which outlives the command and where skrelay run from the host finds them
/// (and `status` and `steer reset` there, once this network namespace is gone); without one it is
/// an error that says what works.
pub fn root() -> Result<PathBuf, Error> {
    let mut base = PathBuf::from(BPFFS);
    if let Some(own) = own_mount_ns_without_bpffs() {
        let Some(outer) = outer_bpffs() else {
            let (how, fix) = match own {
                OwnMountNs::FreshSysfs => (
                    "with a fresh /sys (as under `ip netns exec`)",
                    "mount bpffs at /sys/fs/bpf on the host first, or run skrelay with `nsenter --net=/run/netns/NAME`",
                ),
                OwnMountNs::NoBpffs => (
                    "without a bpffs at /sys/fs/bpf (as under `unshare -m`)",
                    "mount bpffs at /sys/fs/bpf where that namespace was made, or here with `mount -t bpf bpf \
                     /sys/fs/bpf` if the namespace lasts as long as the pinned state should",
                ),
            };
            return Err(Error::Usage(format!(
                "cannot mount bpffs at {BPFFS}: this command runs in a mount namespace of its own {how}, where a bpffs \
                 would vanish with that namespace, taking the pinned state along ({fix})"
            )));
        };
        base = outer;
    }
    let base = base.as_path();
    // Under `ip netns exec` (its sysfs on /sys) with the outer namespace out of sight (root
    // without CAP_SYS_PTRACE cannot tell it runs in one of its own): a bpffs mounted here would
    // vanish with the command, and `steer add` said "bound" for steering gone a moment later (a
    // re-check pass).
    if !is_bpffs(base) && sysfs_of_a_netns() && rustix::process::geteuid().is_root() {
        let name = ip_netns_exec_name().unwrap_or_else(|| "NAME".into());
        // With CAP_SYS_PTRACE, what hides the outside is a pid namespace of its own, whose /proc
        // shows no process beyond it (`unshare --pid --mount-proc`): root was told to get the
        // capability it had (a re-check pass).
        let reach = match can_look_outside() {
            true => "the host's is out of sight: its /proc shows no process outside a pid namespace of its own (run \
                     it outside that pid namespace"
                .to_string(),
            false => format!("only {} can reach the host's (run it {}", outside_who(), run_as()),
        };
        return Err(Error::Usage(format!(
            "cannot pin skrelay's state: under `ip netns exec {name}` this command has a /sys of its own, where a \
             bpffs would vanish with it, and {reach}, or join the namespace without a mount namespace of its own: \
             `nsenter --net=/run/netns/{name}`)"
        )));
    }
    if !is_bpffs(base) {
        let _ = std::fs::create_dir_all(base);
        let mounted = rustix::mount::mount("bpf", BPFFS, "bpf", rustix::mount::MountFlags::empty(), None);
        if mounted.is_err() || !is_bpffs(base) {
            let e = mounted.err().map_or_else(|| io::Error::other("not a bpffs after mounting"), io::Error::from);
            // A service user under `ip netns exec` sees no process outside its mount namespace,
            // so `own_mount_ns_without_bpffs` could not tell; mounting as root would not help.
            if let Some(name) = ip_netns_exec_name() {
                return Err(Error::Usage(format!(
                    "cannot mount bpffs at {BPFFS}: {e}; under `ip netns exec {name}` the command has a /sys of its \
                     own, where a bpffs would vanish with it, and the host's is out of reach without root (join \
                     the namespace without a mount namespace of its own: `nsenter --net=/run/netns/{name}` as \
                     root, then drop privileges, or NetworkNamespacePath=/run/netns/{name} in a systemd unit)"
                )));
            }
            return Err(Error::Usage(format!(
                "cannot mount bpffs at {BPFFS}: {e} (mount it with `mount -t bpf bpf {BPFFS}` as root)"
            )));
        }
        // PID 1 shares this mount namespace (else `own_mount_ns_without_bpffs` would have
        // looked outside), but in a pid namespace of its own PID 1 may be a shell that exits
        // with the command (`unshare -fpm`): "bound", exit 0, and the steering gone with the
        // namespace a moment later, in silence (a steer pass).
        if !is_kthreadd(2) {
            log::warn!(
                "mounted a bpffs at {BPFFS} (none was there) in a mount namespace of a pid namespace of its own: \
                 what skrelay pins there lasts only as long as that namespace (mount bpffs where the namespace \
                 is made to keep it longer)"
            );
        }
    }
    let dir = base.join("skrelay");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    share_root(&dir);
    Ok(dir)
}

/// The NAME when this command runs under `ip netns exec NAME`, read from what that leaves
/// behind: a sysfs on /sys mounted with the namespace's name as its source, and
/// /run/netns/NAME being this process's network namespace. Needs no privilege.
pub(crate) fn ip_netns_exec_name() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The last mount on /sys is the one in sight: "... /sys opts - sysfs SOURCE opts".
    let source = mounts.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut fs = right.split_whitespace();
        (left.split_whitespace().nth(4) == Some("/sys") && fs.next() == Some("sysfs")).then(|| fs.next())?
    })?;
    if source == "sysfs" || source.contains('/') {
        return None;
    }
    let ns = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let ours = ns(Path::new("/proc/self/ns/net"))?;
    (ns(&Path::new("/run/netns").join(source)) == Some(ours)).then(|| source.to_string())
}

/// skrelay's directory holds one directory of state per network namespace (steer) and accel's:
/// root's and a service user's (CAP_BPF and CAP_NET_ADMIN) side by side. Made by root with the
/// default mode, the service user could not create its own (`steer add` refused); made by the
/// service user, it could rename root's accel state out of `status`'s sight. So it belongs to
/// root and is sticky and open to all, as /tmp: anyone may add a directory, only its owner may
/// remove or rename it. Root takes it over when it finds it another user's; others leave it as is.
fn share_root(dir: &Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    const SHARED: u32 = 0o1777;
    let Ok(meta) = std::fs::metadata(dir) else { return };
    let root = rustix::process::geteuid().is_root();
    if root && meta.uid() != 0 {
        let _ = rustix::fs::chown(dir, Some(rustix::process::Uid::ROOT), Some(rustix::process::Gid::ROOT));
    }
    if (meta.uid() == rustix::process::geteuid().as_raw() || root) && meta.mode() & 0o7777 != SHARED {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(SHARED));
    }
}

/// The directory skrelay pins under, found as `root` finds it, if skrelay pinned anything there;
/// `None` when there is no bpffs or no such directory. Mounts and creates nothing: for commands
/// that only look.
pub fn existing_root() -> Option<PathBuf> {
    let base = looked_at_base()?;
    let dir = base.join("skrelay");
    (is_bpffs(&base) && dir.is_dir()).then_some(dir)
}

/// Where `existing_root` looks, whether or not anything is there yet: /sys/fs/bpf, or the outer
/// mount namespace's bpffs under a mount namespace of our own without one (`ip netns exec`
/// mounts a fresh sysfs, where /sys/fs/bpf is a bare directory that never holds skrelay's
/// state). For a watcher that must see the state appear.
pub fn root_to_watch() -> PathBuf {
    looked_at_base().unwrap_or_else(|| PathBuf::from(BPFFS)).join("skrelay")
}

fn looked_at_base() -> Option<PathBuf> {
    if own_mount_ns_without_bpffs().is_some() {
        outer_bpffs()
    } else {
        Some(PathBuf::from(BPFFS))
    }
}

/// Why this process cannot look at skrelay's pinned state, where it may exist: /sys/fs/bpf here
/// has no bpffs, and the mount namespace outside, where root's commands pin their state when
/// /sys/fs/bpf is a bare directory (`root`), cannot be looked into without privilege. A command
/// that only looks says so rather than "nothing" (a stranger pass: a user under `ip netns exec`
/// was told no steering existed while root's bindings took its relay's port).
pub fn out_of_reach() -> Option<String> {
    // Root in a pid namespace of its own (`ip netns exec NS unshare --pid --mount-proc`): PID 1
    // is its own, and no ancestor is in sight, so nothing said the outside existed, and `status`
    // said nothing was accelerated or steered (a new-user pass).
    if fs_type(Path::new(BPFFS)) == Some(SYSFS_MAGIC)
        && sysfs_of_a_netns()
        && can_look_outside()
        && in_pid_namespace_of_its_own()
        && outer_mount_ns_process().is_none()
    {
        return Some(format!(
            "{BPFFS} here holds no bpffs (a mount namespace of its own, as `ip netns exec` makes), and the one \
             outside, where skrelay pins its state, is out of sight: this command's /proc shows no process outside \
             its pid namespace"
        ));
    }
    if fs_type(Path::new(BPFFS)) != Some(SYSFS_MAGIC)
        || mount_ns("1").is_some()
        || outer_mount_ns_process().is_some()
        || !sysfs_of_a_netns()
    {
        return None;
    }
    Some(format!(
        "{BPFFS} here holds no bpffs (a mount namespace of its own, as `ip netns exec` makes), and only {} can \
         look into the one outside, where skrelay pins its state",
        outside_who()
    ))
}

/// Whether this process may look into other root processes (root with CAP_SYS_PTRACE
/// effective, in the initial user namespace): their descriptors, and the mount namespace outside
/// this one. Root of a user namespace has CAP_SYS_PTRACE there only, which reaches no process
/// outside it.
pub fn can_look_outside() -> bool {
    const CAP_SYS_PTRACE: u32 = 19;
    rustix::process::geteuid().is_root()
        && !crate::bpf::in_user_namespace()
        && crate::sys::effective_capabilities(Path::new("/proc/self")).is_some_and(|c| c & (1 << CAP_SYS_PTRACE) != 0)
}

/// Whether this process sees every process of the machine and may look into each: it can look
/// outside (`can_look_outside`) and its /proc is not that of a pid namespace of its own (where
/// PID 2 is not the kernel's kthreadd).
pub fn sees_every_process() -> bool {
    can_look_outside() && is_kthreadd(2)
}

/// This process's /proc is that of a pid namespace of its own (PID 2 is not the kernel's
/// kthreadd): it shows no process outside it.
pub fn in_pid_namespace_of_its_own() -> bool {
    !is_kthreadd(2)
}

/// How to run a command so that it sees every process (`sees_every_process`): as `run_as`
/// says, or "as root" for root that could look outside but is in a pid namespace of its own.
pub fn run_as_seeing_all() -> &'static str {
    if can_look_outside() {
        "as root"
    } else {
        run_as()
    }
}

/// Who may look into the mount namespace outside this one (through /proc/PID/root, which takes
/// the right to ptrace that process): root; and for root without it (a container's root, or
/// `capsh --drop=cap_sys_ptrace`), a process with CAP_SYS_PTRACE. Root was told to run as root
/// (a re-check pass). In a user namespace, root outside it: root there was told to get the
/// CAP_SYS_PTRACE it had (a steer pass).
pub fn outside_who() -> &'static str {
    if can_look_outside() && in_pid_namespace_of_its_own() {
        "a process outside this pid namespace"
    } else if crate::bpf::in_user_namespace() {
        "root outside this user namespace"
    } else if rustix::process::geteuid().is_root() {
        "a process with CAP_SYS_PTRACE"
    } else {
        "root"
    }
}

/// How to run a command so that it can look outside (`outside_who`): "as root", or for root
/// "with CAP_SYS_PTRACE", or "as root outside this user namespace".
pub fn run_as() -> &'static str {
    if can_look_outside() && in_pid_namespace_of_its_own() {
        "outside this pid namespace"
    } else if crate::bpf::in_user_namespace() {
        "as root outside this user namespace"
    } else if rustix::process::geteuid().is_root() {
        "with CAP_SYS_PTRACE"
    } else {
        "as root"
    }
}

/// /sys is a sysfs that `ip netns exec` mounted, which names it after the network namespace (a
/// host's or a container's is named `sysfs`): there is a mount namespace outside this one. Where
/// /sys/fs/bpf simply has no bpffs (a host or container that never mounted one), root's commands
/// pin in this same namespace, and "nothing pinned" is true (a re-check pass).
fn sysfs_of_a_netns() -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS";
    // the last mount listed at /sys is the one seen there.
    let sys = mountinfo.lines().rfind(|l| l.split(' ').nth(4) == Some("/sys"));
    sys.and_then(|l| l.split_once(" - ")).is_some_and(|(_, fs)| {
        let mut f = fs.split(' ');
        f.next() == Some("sysfs") && f.next().is_some_and(|source| source != "sysfs")
    })
}

/// Why a mount namespace of our own has no bpffs at /sys/fs/bpf.
enum OwnMountNs {
    /// /sys is a sysfs of its own (`ip netns exec` mounts one for the network namespace).
    FreshSysfs,
    /// /sys is the outer namespace's, without a bpffs on /sys/fs/bpf (`unshare -m`, or unmounted).
    NoBpffs,
}

/// /sys/fs/bpf is a bare sysfs directory of a mount namespace of our own, and why.
fn own_mount_ns_without_bpffs() -> Option<OwnMountNs> {
    use std::os::unix::fs::MetadataExt;
    if fs_type(Path::new(BPFFS)) != Some(SYSFS_MAGIC) {
        return None;
    }
    let outer = outer_mount_ns_process()?;
    // A sysfs mounted for another network namespace is another superblock: another device.
    let dev = |p: &Path| std::fs::metadata(p).ok().map(|m| m.dev());
    let outer_sys = Path::new("/proc").join(outer.to_string()).join("root/sys");
    match (dev(Path::new("/sys")), dev(&outer_sys)) {
        (Some(ours), Some(theirs)) if ours == theirs => Some(OwnMountNs::NoBpffs),
        _ => Some(OwnMountNs::FreshSysfs),
    }
}

/// skrelay's directory is open to all (`share_root`), so anyone can make the directory another
/// user's state will go in before that user does (a namespace's inode number is no secret): root
/// then pinned its steering into a directory nobody owned, and nobody removed it (a helper's
/// pass). An empty directory of another user's is made again, root's, before root uses it; one
/// with pins in it is that user's state, which root may run commands on.
pub fn claim_if_planted(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::geteuid();
    let Ok(meta) = std::fs::metadata(dir) else { return };
    let empty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none());
    if me.is_root() && meta.uid() != 0 && empty && std::fs::remove_dir(dir).is_ok() {
        let _ = std::fs::create_dir(dir);
    }
}

/// Refuses pinned state (`names` in `dir`) this process may not open, naming its owner. Pins are
/// mode 0600, so a user with CAP_BPF and CAP_NET_ADMIN cannot open root's: opening one reads as a
/// missing capability, which that user has.
pub fn check_owner<'a>(what: &'static str, dir: &Path, names: impl Iterator<Item = &'a str>) -> Result<(), Error> {
    use rustix::fs::{accessat, Access, AtFlags, CWD};
    use std::os::unix::fs::MetadataExt;
    for name in names {
        let path = dir.join(name);
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        // With the effective ids and capabilities (CAP_DAC_OVERRIDE passes).
        if accessat(CWD, &path, Access::READ_OK | Access::WRITE_OK, AtFlags::EACCESS).is_err() {
            let dir = crate::sys::shown(dir).display().to_string();
            return Err(Error::StateOwned { what, dir, owner: user_name(meta.uid()) });
        }
    }
    Ok(())
}

/// The name of user `uid` (from /etc/passwd), or `uid N`.
fn user_name(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2].parse() == Ok(uid))
        .map_or_else(|| format!("uid {uid}"), |f| f[0].to_string())
}

/// The bpffs of PID 1's mount namespace, or else of the nearest ancestor's in another one.
fn outer_bpffs() -> Option<PathBuf> {
    let at = |pid: i32| Path::new("/proc").join(pid.to_string()).join("root").join(BPFFS.trim_start_matches('/'));
    [Some(1), outer_mount_ns_process()].into_iter().flatten().map(at).find(|p| is_bpffs(p))
}

/// Removes skrelay's directory in bpffs when nothing is left in it (after `steer reset` and the
/// last `accel off`), so no empty directory stays behind. Every state directory in it is locked
/// by the command using it (`StateLock`), which keeps it from being empty meanwhile, and a
/// command about to create one creates this directory again (`StateLock::acquire`).
pub fn remove_root_if_empty() {
    if let Some(root) = existing_root() {
        let _ = std::fs::remove_dir(root);
    }
}

/// A lock on a directory of pinned state, held until dropped: exclusive for commands that change
/// the state, so two run at once cannot interleave their changes, shared for commands that only
/// read it, so they never see a change half made. The lock is flock(2) on the directory itself:
/// nothing is left behind when the state goes (a lock file in /run stayed for every network
/// namespace ever used).
pub struct StateLock {
    _dir: File,
}

impl StateLock {
    /// Locks `dir`, creating it if missing.
    pub fn acquire(dir: &Path) -> Result<StateLock, Error> {
        let mut retries = 0;
        loop {
            match std::fs::create_dir_all(dir) {
                // A parent removed by `remove_root_if_empty` between its creation and `dir`'s.
                Err(e) if e.kind() == io::ErrorKind::NotFound && retries < 100 => {
                    retries += 1;
                    continue;
                }
                Err(e) => return Err(Error::io(format!("cannot create {}", dir.display()), e)),
                // Created again after `remove_root_if_empty`, perhaps: shared as `root` makes it.
                Ok(()) => {
                    if let Some(parent) = dir.parent().filter(|p| p.file_name().is_some_and(|n| n == "skrelay")) {
                        share_root(parent);
                    }
                    claim_if_planted(dir);
                }
            }
            if let Some(lock) = Self::acquire_existing(dir)? {
                return Ok(lock);
            }
        }
    }

    /// Locks `dir` exclusively if it exists; None if it does not, or was removed (a reset) while
    /// we waited.
    pub fn acquire_existing(dir: &Path) -> Result<Option<StateLock>, Error> {
        Self::lock(dir, false)
    }

    /// Locks `dir` shared (with other readers) if it exists; None as for `acquire_existing`.
    pub fn acquire_shared(dir: &Path) -> Result<Option<StateLock>, Error> {
        Self::lock(dir, true)
    }

    fn lock(dir: &Path, shared: bool) -> Result<Option<StateLock>, Error> {
        use std::os::unix::fs::MetadataExt;
        let file = match File::open(dir) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("cannot open {}", dir.display()), e)),
        };
        let attempt = if shared { file.try_lock_shared() } else { file.try_lock() };
        if let Err(std::fs::TryLockError::WouldBlock) = attempt {
            // Held by another skrelay command changing this state (briefly, as a rule): say what
            // we wait for, in case it is not brief.
            log::info!(
                "waiting for another skrelay command that holds {} (`fuser -v {}` names it)",
                crate::sys::shown(dir).display(),
                dir.display()
            );
        }
        if !matches!(attempt, Ok(())) {
            if shared {
                wait_shared(&file, dir)?;
            } else {
                file.lock().map_err(|e| Error::io(format!("cannot lock {}", dir.display()), e))?;
            }
        }
        // The holder before us may have removed the directory: then what we locked is gone.
        let locked = file.metadata().map_err(|e| Error::io(format!("cannot read {}", dir.display()), e))?;
        let same = std::fs::metadata(dir).is_ok_and(|now| (now.dev(), now.ino()) == (locked.dev(), locked.ino()));
        if !same {
            return Ok(None);
        }
        if !shared {
            remove_legacy_lock(dir);
        }
        Ok(Some(StateLock { _dir: file }))
    }
}

/// How long a command that only reads pinned state (`status`, `steer list`, a metrics scrape)
/// waits for one that changes it: changes take well under a second, so a longer hold is a command
/// stopped (Ctrl-Z) or hung, which must not stall every reader with it.
const READ_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes `file`'s shared lock, waiting at most `READ_WAIT` for the exclusive holder.
fn wait_shared(file: &File, dir: &Path) -> Result<(), Error> {
    let deadline = std::time::Instant::now() + READ_WAIT;
    loop {
        match file.try_lock_shared() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Usage(format!(
                    "{} is locked by another skrelay command changing it, for more than {}s: `fuser -v {}` names it (a \
                     command stopped with Ctrl-Z holds it until it is resumed or killed)",
                    crate::sys::shown(dir).display(),
                    READ_WAIT.as_secs(),
                    dir.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::io(format!("cannot lock {}", crate::sys::shown(dir).display()), e))
            }
        }
    }
}

/// Older skrelay locked with a file in /run/skrelay, one per directory, never removed: removes
/// this directory's (and /run/skrelay once empty).
fn remove_legacy_lock(dir: &Path) {
    let run = Path::new("/run/skrelay");
    let name = dir.to_string_lossy().replace('/', "_");
    if std::fs::remove_file(run.join(format!("{name}.lock"))).is_ok() {
        let _ = std::fs::remove_dir(run);
    }
}
