//! cgroup v2 directories: finding the v2 mount, resolving the user's `--cgroup` argument,
//! creating and removing directories, moving processes, and naming a cgroup's pinned state.
use crate::error::Error;
use std::{
    fs::File,
    io::Write,
    path::{Component, Path, PathBuf},
};

/// A cgroup v2 directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// Where the cgroup v2 hierarchy is mounted.
    pub mount: PathBuf,
    /// The path below the mount, without leading slash ("" is the root cgroup).
    pub rel: String,
}

/// The mount point of the cgroup v2 hierarchy, from /proc/self/mountinfo. Under `ip netns exec`,
/// whose fresh /sys has none, the outer mount namespace's, through /proc/PID/root (as for bpffs):
/// a relay started so inside an accelerated cgroup was not told, and lost whole streams.
pub fn v2_mount() -> Result<PathBuf, Error> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("cannot read /proc/self/mountinfo", e))?;
    let outer = || {
        let pid = crate::bpffs::outer_mount_ns_process()?;
        let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
        let root = Path::new("/proc").join(pid.to_string()).join("root");
        v2_mounts_in(&info)
            .into_iter()
            .filter_map(|at| Some(root.join(at.strip_prefix("/").ok()?)))
            .find(|p| is_cgroup2(p))
    };
    // A mount listed here may be hidden under a later one: `unshare -m` then a fresh sysfs
    // mounted on /sys leaves the cgroup2 mount below /sys listed but out of reach, and a relay's
    // check whether accel covers it found no cgroup (a re-check pass).
    v2_mounts_in(&info).into_iter().find(|p| is_cgroup2(p)).or_else(outer).ok_or_else(|| {
        // A user without root under `ip netns exec` sees neither: the fresh /sys has none, and
        // the host's is out of reach. It was told to mount one, which would fail or vanish with
        // the command (a helper's README pass).
        // Root without CAP_SYS_PTRACE (a container's) cannot look outside either, and was told to
        // run as root (a re-check pass).
        let (who, how) = (crate::bpffs::outside_who(), crate::bpffs::run_as());
        if let Some(name) = crate::bpffs::ip_netns_exec_name() {
            return Error::Usage(format!(
                "cannot find the cgroup v2 hierarchy: under `ip netns exec {name}` this command has a /sys of its \
                 own, without one, and only {who} can look into the host's (run it {how})"
            ));
        }
        // Without the right to look outside: this may be a namespace of its own (`unshare -m`
        // with a fresh sysfs), whose outside only `who` could search.
        if !crate::bpffs::can_look_outside() {
            return Error::Usage(format!(
                "no cgroup v2 hierarchy is mounted in this command's mount namespace, and only {who} can look \
                 into the host's, if this is another (run it {how}, or mount one with `mount -t cgroup2 none \
                 /sys/fs/cgroup/unified`)"
            ));
        }
        Error::Usage(
            "no cgroup v2 hierarchy is mounted (mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`)".into(),
        )
    })
}

/// The mount points of every cgroup2 filesystem mountinfo lists, in its order.
fn v2_mounts_in(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            left.split_whitespace().nth(4).map(|p| PathBuf::from(unescape_mountinfo(p)))
        })
        .collect()
}

/// What is at `path` from here is a cgroup2 filesystem (not a directory it hides under).
fn is_cgroup2(path: &Path) -> bool {
    const CGROUP2_SUPER_MAGIC: i64 = 0x63677270;
    rustix::fs::statfs(path).is_ok_and(|st| st.f_type == CGROUP2_SUPER_MAGIC)
}

/// mountinfo writes space, tab, newline and backslash as octal escapes (`\040`).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

use crate::sys::as_the_host_names_it;

/// `path` as reports show it: as the host names it. A cgroup or its pins reached through
/// /proc/2/root under `ip netns exec` were shown so by `status`, in JSON and in the metrics'
/// `cgroup` label, which then changed with how the command was started.
pub fn shown(path: &Path) -> PathBuf {
    crate::sys::shown(path)
}

/// The longest `pin_name` accel takes: 255 bytes (NAME_MAX) less a set-up's "PID-" prefix.
const MAX_PIN_NAME: usize = 255 - 12;

impl Cgroup {
    /// Resolves `--cgroup PATH`: absolute (below the v2 mount) or relative to the v2 mount.
    pub fn resolve(arg: &Path) -> Result<Cgroup, Error> {
        Self::resolve_in(&v2_mount()?, arg)
    }

    fn resolve_in(mount: &Path, arg: &Path) -> Result<Cgroup, Error> {
        // Under `ip netns exec` the mount is the outer namespace's, reached as /proc/PID/root/...:
        // the path the user knows (the host's) names the same cgroup.
        let host_mount = as_the_host_names_it(mount);
        let rel_path = if arg.is_absolute() {
            arg.strip_prefix(mount)
                .ok()
                .or_else(|| arg.strip_prefix(host_mount.as_deref()?).ok())
                .ok_or_else(|| {
                Error::Usage(format!(
                    "{} is not a cgroup v2 directory: cgroup v2 is mounted at {} (give a path below it, or one relative to it)",
                    arg.display(),
                    host_mount.as_deref().unwrap_or(mount).display()
                ))
            })?
        } else {
            arg
        };
        let mut parts = Vec::new();
        for c in rel_path.components() {
            match c {
                // cgroupfs refuses a name with a newline (EINVAL, which `accel on` passed on
                // with exit 1: a helper's pass); one not in UTF-8 would be named another.
                Component::Normal(p) => match p.to_str() {
                    Some(name) if !name.contains('\n') => parts.push(name.to_string()),
                    _ => {
                        return Err(Error::Usage(format!(
                        "cgroup name {:?} is not one a cgroup can have here (a newline, or not UTF-8): give another",
                        p.to_string_lossy()
                    )))
                    }
                },
                Component::CurDir | Component::RootDir => {}
                _ => {
                    return Err(Error::Usage(format!(
                        "cgroup path {} must not contain `..` (give the path below {})",
                        arg.display(),
                        shown(mount).display()
                    )))
                }
            }
        }
        let cg = Cgroup { mount: mount.to_path_buf(), rel: parts.join("/") };
        // Its state is pinned in a directory named for it (`pin_name`), with a set-up's pid in
        // front while it is built: bpffs names are at most 255 bytes.
        if cg.pin_name().len() > MAX_PIN_NAME {
            return Err(Error::Usage(format!(
                "cgroup path {} is too long for accel: its state's name in bpffs would be {} bytes, at most {MAX_PIN_NAME} \
                 fit (give a cgroup with a shorter path)",
                arg.display(),
                cg.pin_name().len()
            )));
        }
        Ok(cg)
    }

    /// The cgroup v2 process `pid` belongs to (/proc/PID/cgroup's `0::` line), if it can be read.
    pub fn of_process(pid: u32) -> Option<Cgroup> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        Self::resolve_in(&v2_mount().ok()?, Path::new(rel.trim_start_matches('/'))).ok()
    }

    /// The directory.
    pub fn path(&self) -> PathBuf {
        if self.rel.is_empty() {
            self.mount.clone()
        } else {
            self.mount.join(&self.rel)
        }
    }

    /// Creates the directory and any missing parents; returns the ones created, deepest last,
    /// so a failed command can remove exactly those.
    pub fn create(&self) -> Result<Vec<PathBuf>, Error> {
        let mut created = Vec::new();
        let mut dir = self.mount.clone();
        for part in self.rel.split('/').filter(|p| !p.is_empty()) {
            dir.push(part);
            match std::fs::create_dir(&dir) {
                Ok(()) => created.push(dir.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                    remove_dirs(&created);
                    let file = dir.parent().map(shown).unwrap_or_default();
                    return Err(Error::Usage(format!(
                        "{} is not a cgroup v2 directory: {} is a file (give a cgroup's directory below {})",
                        shown(&self.path()).display(),
                        file.display(),
                        shown(&self.mount).display()
                    )));
                }
                Err(e) => {
                    remove_dirs(&created);
                    return Err(Error::io(format!("cannot create cgroup {}", shown(&dir).display()), e));
                }
            }
        }
        if !self.path().join("cgroup.procs").exists() {
            remove_dirs(&created);
            let path = shown(&self.path());
            let what = if self.path().is_dir() { "a directory without cgroup.procs" } else { "not a directory" };
            return Err(Error::Usage(format!(
                "{} is not a cgroup v2 directory: it is {what} (give a cgroup's directory below {}, e.g. {})",
                path.display(),
                shown(&self.mount).display(),
                shown(&self.mount.join("app")).display()
            )));
        }
        Ok(created)
    }

    /// This cgroup and its ancestors up to the root, nearest first.
    /// How many directories `create` would make: this cgroup's and its ancestors' that do not
    /// exist (always the deepest ones).
    pub fn missing_dirs(&self) -> usize {
        self.lineage().iter().filter(|c| !c.rel.is_empty() && !c.path().is_dir()).count()
    }

    pub fn lineage(&self) -> Vec<Cgroup> {
        let mut out = vec![self.clone()];
        let mut rel = self.rel.as_str();
        while !rel.is_empty() {
            rel = rel.rsplit_once('/').map(|(parent, _)| parent).unwrap_or("");
            out.push(Cgroup { mount: self.mount.clone(), rel: rel.to_string() });
        }
        out
    }

    /// True when `self` is `other` or lies below it.
    /// Whether process `pid` (as this process's pid namespace numbers it) is in this cgroup or a
    /// cgroup below it, by their `cgroup.procs`. Unlike `of_process` this holds inside a cgroup
    /// namespace (`unshare -C`, containers), where /proc/PID/cgroup reads `0::/` whatever the
    /// cgroup: a relay started so inside an accelerated cgroup was not refused, and lost whole
    /// streams (a helper's pass).
    pub fn holds(&self, pid: u32) -> bool {
        fn walk(dir: &Path, pid: &str, depth: usize) -> bool {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            if procs.lines().any(|l| l.trim() == pid) {
                return true;
            }
            depth < 64
                && std::fs::read_dir(dir).is_ok_and(|d| {
                    d.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .any(|e| walk(&e.path(), pid, depth + 1))
                })
        }
        walk(&self.path(), &pid.to_string(), 0)
    }

    pub fn is_within(&self, other: &Cgroup) -> bool {
        other.rel.is_empty() || self.rel == other.rel || self.rel.starts_with(&format!("{}/", other.rel))
    }

    /// The name of this cgroup's directory of pinned state: the path below the mount with `%`,
    /// `/` and `.` percent-encoded (bpffs refuses names with a dot, and systemd's cgroups all have
    /// one: `system.slice`), so every cgroup has its own name and the name gives the path back.
    pub fn pin_name(&self) -> String {
        format!("%2F{}", self.rel.replace('%', "%25").replace('/', "%2F").replace('.', "%2E"))
    }

    /// The cgroup a pin directory name stands for (see `pin_name`).
    pub fn from_pin_name(mount: &Path, name: &str) -> Option<Cgroup> {
        let mut rest = name.strip_prefix("%2F")?;
        let mut rel = String::new();
        while let Some(i) = rest.find('%') {
            rel.push_str(&rest[..i]);
            match rest.get(i..i + 3)? {
                "%2F" => rel.push('/'),
                "%25" => rel.push('%'),
                "%2E" => rel.push('.'),
                _ => return None,
            }
            rest = &rest[i + 3..];
        }
        rel.push_str(rest);
        Some(Cgroup { mount: mount.to_path_buf(), rel })
    }

    /// The open file whose writes move a process into this cgroup ("0" moves the writer).
    pub fn procs_file(&self) -> Result<File, Error> {
        let path = self.path().join("cgroup.procs");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))
    }

    /// Whether this process may move itself into this cgroup, as cgroup v2 decides: write access
    /// to its `cgroup.procs` and to that of the common ancestor of the two cgroups. `accel run`
    /// said "the command runs in it" and was then refused at the move (a re-check pass).
    pub fn check_may_move_here(&self) -> Result<(), Error> {
        use rustix::fs::{accessat, Access, AtFlags, CWD};
        drop(self.procs_file()?);
        let Some(mine) = Cgroup::of_process(std::process::id()) else { return Ok(()) };
        let (a, b): (Vec<&str>, Vec<&str>) = (mine.rel.split('/').collect(), self.rel.split('/').collect());
        let shared = a.iter().zip(&b).take_while(|(x, y)| x == y && !x.is_empty()).count();
        let ancestor = Cgroup { mount: self.mount.clone(), rel: a[..shared].join("/") };
        let procs = ancestor.path().join("cgroup.procs");
        if accessat(CWD, &procs, Access::WRITE_OK, AtFlags::EACCESS).is_err() {
            return Err(Error::Usage(format!(
                "cannot move a process into cgroup {}: cgroup v2 takes write access to cgroup.procs of the common \
                 ancestor of that cgroup and this process's ({}), and {} is not writable for this user (run as \
                 root, or from a cgroup that shares a writable ancestor with it)",
                shown(&self.path()).display(),
                shown(&mine.path()).display(),
                shown(&procs).display()
            )));
        }
        Ok(())
    }

    /// Moves process `pid` into this cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), Error> {
        let mut f = self.procs_file()?;
        f.write_all(pid.to_string().as_bytes())
            .map_err(|e| Error::io(format!("cannot move process {pid} into cgroup {}", self.path().display()), e))
    }
}

impl std::fmt::Display for Cgroup {
    /// The path as the host names it: under `ip netns exec`, without the /proc/PID/root the
    /// outer mount is reached through.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = self.path();
        write!(f, "{}", as_the_host_names_it(&path).as_deref().unwrap_or(&path).display())
    }
}

/// Who set up a cgroup's acceleration: recorded on the cgroup directory as an extended attribute
/// (bpffs holds only BPF objects), so `accel status` can say whether that owner is still there
/// and `accel off` knows which directories skrelay created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// `on` (stays until `accel off`) or `run` (removed when its command ends).
    pub command: String,
    /// The `accel run` process, and the watcher process that cleans up if it cannot.
    pub pid: Option<Process>,
    pub watcher: Option<Process>,
    /// How many directories, from this one up, skrelay created.
    pub created: usize,
    /// How the default `--small-write` was measured: the redirect / plain ratio ("1.41"), or
    /// "none" where it could not be; None where the flag was given (or an older skrelay set it up).
    pub measured: Option<String>,
}

/// A process, told apart from a later one with the same pid by its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub start: u64,
}

impl Process {
    pub fn me() -> Process {
        Self::of(std::process::id()).unwrap_or(Process { pid: std::process::id(), start: 0 })
    }

    /// Process `pid` as it is now, None if there is none.
    pub fn of(pid: u32) -> Option<Process> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Field 22 (starttime), counted after the `(comm)` field, which may contain spaces.
        let start = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()?;
        Some(Process { pid, start })
    }

    /// Still running: the same process, and not exiting nor a zombie (killed, its parent not yet
    /// told: a helper's pass saw `status` call a killed run "running" for a second).
    pub fn alive(&self) -> bool {
        Self::of(self.pid) == Some(*self) && !crate::sys::exiting(self.pid)
    }
}

const OWNER_XATTR: &str = "trusted.skrelay.owner";

impl Owner {
    fn encode(&self) -> String {
        let p = |p: &Option<Process>| p.map_or("-".to_string(), |p| format!("{}:{}", p.pid, p.start));
        let measured = self.measured.as_ref().map(|m| format!(" measured={m}")).unwrap_or_default();
        format!(
            "command={} pid={} watcher={} created={}{measured}",
            self.command,
            p(&self.pid),
            p(&self.watcher),
            self.created
        )
    }

    fn decode(s: &str) -> Option<Owner> {
        let mut o = Owner { command: String::new(), pid: None, watcher: None, created: 0, measured: None };
        let process = |v: &str| {
            let (pid, start) = v.split_once(':')?;
            Some(Process { pid: pid.parse().ok()?, start: start.parse().ok()? })
        };
        for kv in s.split_whitespace() {
            match kv.split_once('=')? {
                ("command", v) => o.command = v.to_string(),
                ("pid", v) => o.pid = process(v),
                ("watcher", v) => o.watcher = process(v),
                ("created", v) => o.created = v.parse().ok()?,
                ("measured", v) => o.measured = Some(v.to_string()),
                _ => {}
            }
        }
        Some(o)
    }

    /// One line for `accel status` of the state of `cgroup` (as the user names it).
    pub fn describe(&self, cgroup: &Path) -> String {
        let alive = |p: &Option<Process>| p.is_some_and(|p| p.alive());
        match (self.command.as_str(), self.pid, self.watcher) {
            ("run", Some(run), _) if alive(&self.pid) => format!("owned by `accel run` (pid {}), running", run.pid),
            ("run", Some(run), Some(w)) if alive(&self.watcher) => format!(
                "owned by `accel run` (pid {}), which is gone: its watcher (pid {}) removes the state when the \
                 command's processes have exited",
                run.pid, w.pid
            ),
            ("run", run, _) => format!(
                "owned by `accel run` (pid {}), which is gone and left it: nothing will remove it (run `skrelay accel off \
                 --cgroup {}`)",
                run.map_or("?".to_string(), |p| p.pid.to_string()),
                crate::sys::shell_arg(cgroup.display())
            ),
            _ => "set up by `accel on`: stays until `skrelay accel off`".to_string(),
        }
    }

    pub fn json(&self, cgroup: &Path) -> serde_json::Value {
        let p = |p: &Option<Process>| p.map(|p| serde_json::json!({ "pid": p.pid, "alive": p.alive() }));
        serde_json::json!({
            "command": self.command,
            "process": p(&self.pid),
            "watcher": p(&self.watcher),
            "created_dirs": self.created,
            "state": self.describe(cgroup),
            "small_write_measured": self.measured,
        })
    }
}

impl Cgroup {
    /// Records who set up acceleration here.
    pub fn set_owner(&self, owner: &Owner) -> Result<(), Error> {
        xattr_set(&self.path(), OWNER_XATTR, owner.encode().as_bytes())
            .map_err(|e| Error::io(format!("cannot record the owner on cgroup {self}"), e))
    }

    /// Who set up acceleration here, if recorded.
    pub fn owner(&self) -> Option<Owner> {
        let v = xattr_get(&self.path(), OWNER_XATTR)?;
        Owner::decode(&String::from_utf8_lossy(&v))
    }

    pub fn clear_owner(&self) {
        let _ = rustix::fs::removexattr(self.path(), OWNER_XATTR);
    }

    /// Whether any process is in this cgroup or below (cgroup.events).
    pub fn populated(&self) -> bool {
        std::fs::read_to_string(self.path().join("cgroup.events"))
            .map(|e| !e.lines().any(|l| l.trim() == "populated 0"))
            .unwrap_or(false)
    }

    /// The directories skrelay created for this cgroup (`created` levels, from it up), deepest last.
    pub fn created_dirs(&self, created: usize) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> =
            self.lineage().into_iter().filter(|c| !c.rel.is_empty()).take(created).map(|c| c.path()).collect();
        dirs.reverse();
        dirs
    }
}

fn xattr_set(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    Ok(rustix::fs::setxattr(path, name, value, rustix::fs::XattrFlags::empty())?)
}

fn xattr_get(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    let n = rustix::fs::getxattr(path, name, &mut buf[..]).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// Removes directories `create` made, deepest first (best-effort clean-up); returns those that
/// stay, with why (a directory already gone is not one of them).
/// `dirs` with their inode numbers now: which directories they are, for `remove_dirs_still_ours`.
pub fn identified(dirs: &[PathBuf]) -> Vec<(PathBuf, u64)> {
    use std::os::unix::fs::MetadataExt;
    dirs.iter().filter_map(|d| Some((d.clone(), std::fs::metadata(d).ok()?.ino()))).collect()
}

/// `remove_dirs` of the directories of `created` that are still the ones identified: one removed
/// and made again at its path meanwhile is another cgroup, someone else's (an `accel run`'s
/// watcher removed such a directory: a re-check pass).
pub fn remove_dirs_still_ours(created: &[(PathBuf, u64)]) -> Vec<(PathBuf, std::io::Error)> {
    use std::os::unix::fs::MetadataExt;
    let ours: Vec<PathBuf> = created
        .iter()
        .filter(|(dir, ino)| std::fs::metadata(dir).is_ok_and(|m| m.ino() == *ino))
        .map(|(dir, _)| dir.clone())
        .collect();
    remove_dirs(&ours)
}

pub fn remove_dirs(created: &[PathBuf]) -> Vec<(PathBuf, std::io::Error)> {
    let mut stay = Vec::new();
    for dir in created.iter().rev() {
        match std::fs::remove_dir(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => stay.push((dir.clone(), e)),
            _ => {}
        }
    }
    stay
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_v2_mount_in_mountinfo() {
        let info = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                    41 31 0:38 / /sys/fs/cgroup/un\\040ified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(v2_mounts_in(info), [PathBuf::from("/sys/fs/cgroup/un ified")]);
        assert!(v2_mounts_in("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n").is_empty());
    }

    #[test]
    fn resolves_relative_and_absolute_paths() {
        let m = Path::new("/cg");
        assert_eq!(Cgroup::resolve_in(m, Path::new("a/b/")).unwrap().rel, "a/b");
        assert_eq!(Cgroup::resolve_in(m, Path::new("/cg/a/b")).unwrap().rel, "a/b");
        assert_eq!(Cgroup::resolve_in(m, Path::new("/cg")).unwrap().rel, "");
        assert!(Cgroup::resolve_in(m, Path::new("/elsewhere/a")).is_err());
        assert!(Cgroup::resolve_in(m, Path::new("a/../b")).is_err());
        let long = "x".repeat(100);
        let err = Cgroup::resolve_in(m, Path::new(&format!("{long}/{long}/{long}"))).unwrap_err().to_string();
        assert!(err.contains("is too long for accel") && err.contains("at most 243 fit"), "{err}");
        // Under `ip netns exec` the mount is reached through /proc/PID/root: the host's path
        // names the same cgroup, and is how a cgroup is shown (a helper's pass).
        let outer = Path::new("/proc/2/root/sys/fs/cgroup/unified");
        let cg = Cgroup::resolve_in(outer, Path::new("/sys/fs/cgroup/unified/a/b")).unwrap();
        assert_eq!(cg.rel, "a/b");
        assert_eq!(cg.to_string(), "/sys/fs/cgroup/unified/a/b");
        assert_eq!(Cgroup::resolve_in(outer, Path::new("/proc/2/root/sys/fs/cgroup/unified/a")).unwrap().rel, "a");
        let err = Cgroup::resolve_in(outer, Path::new("/elsewhere")).unwrap_err().to_string();
        assert!(err.contains("cgroup v2 is mounted at /sys/fs/cgroup/unified"), "{err}");
    }

    #[test]
    fn names_with_a_newline_or_not_in_utf8_are_refused() {
        use std::os::unix::ffi::OsStrExt;
        let m = Path::new("/cg");
        for bad in [Path::new("a/we\nird"), Path::new(std::ffi::OsStr::from_bytes(b"a/\xff"))] {
            let e = Cgroup::resolve_in(m, bad).unwrap_err().to_string();
            assert!(e.contains("is not one a cgroup can have here"), "{e}");
        }
        assert!(Cgroup::resolve_in(m, Path::new("we\"ird\\x")).is_ok());
    }

    #[test]
    fn pin_names_are_unique_and_reversible() {
        let m = Path::new("/cg");
        for rel in ["", "a", "a/b", "a_b", "a%2Fb", "x%y/z", "%/", "%2F", "system.slice/redis.service", "%2E."] {
            let cg = Cgroup { mount: m.into(), rel: rel.into() };
            assert!(!cg.pin_name().contains('/') && !cg.pin_name().contains('.'), "{}", cg.pin_name());
            assert_eq!(Cgroup::from_pin_name(m, &cg.pin_name()), Some(cg));
        }
        let a = Cgroup { mount: m.into(), rel: "a/b".into() };
        let b = Cgroup { mount: m.into(), rel: "a%2Fb".into() };
        assert_ne!(a.pin_name(), b.pin_name());
    }

    #[test]
    fn owners_round_trip() {
        let o = Owner {
            command: "run".into(),
            pid: Some(Process { pid: 12, start: 34 }),
            watcher: Some(Process { pid: 13, start: 35 }),
            created: 2,
            measured: Some("1.41".into()),
        };
        assert_eq!(Owner::decode(&o.encode()), Some(o));
        let on = Owner { command: "on".into(), pid: None, watcher: None, created: 0, measured: None };
        assert_eq!(Owner::decode(&on.encode()), Some(on));
        let cg = Cgroup { mount: "/cg".into(), rel: "a/b/c".into() };
        assert_eq!(cg.created_dirs(2), [PathBuf::from("/cg/a/b"), PathBuf::from("/cg/a/b/c")]);
        assert!(Process::me().alive());
    }

    #[test]
    fn lineage_and_containment() {
        let cg = Cgroup { mount: "/cg".into(), rel: "a/b".into() };
        let rels: Vec<String> = cg.lineage().into_iter().map(|c| c.rel).collect();
        assert_eq!(rels, ["a/b", "a", ""]);
        let a = Cgroup { mount: "/cg".into(), rel: "a".into() };
        let ab2 = Cgroup { mount: "/cg".into(), rel: "ab".into() };
        assert!(cg.is_within(&a));
        assert!(!ab2.is_within(&a));
        assert!(!a.is_within(&cg));
    }
}
