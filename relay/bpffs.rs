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

/// The parent's pid (0 when it has none visible here, as for a namespace's init).
fn parent_pid() -> i32 {
    rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get())
}

/// Whether this process has a mount namespace of its own, made for it: not PID 1's, nor its
/// parent's (`ip netns exec` unshares it and then runs the command in the same process).
fn in_own_mount_ns() -> bool {
    let own = std::fs::read_link("/proc/self/ns/mnt").ok();
    let parent = std::fs::read_link(format!("/proc/{}/ns/mnt", parent_pid())).ok();
    own.is_some() && parent.is_some() && own != parent
}

/// The directory skrelay pins under (`/sys/fs/bpf/skrelay`), mounting bpffs at /sys/fs/bpf first
/// if nothing is mounted there.
///
/// `ip netns exec` runs the command in a mount namespace of its own with a fresh sysfs on /sys,
/// so /sys/fs/bpf is a bare sysfs directory there, and a bpffs mounted on it would vanish with the
/// command, taking the pins (and so the steering) along. Then the pins go to the bpffs of PID 1's
/// or else the parent process's mount namespace (through /proc/PID/root), which outlives the
/// command and where skrelay run from the host finds them; without one it is an error that says
/// what works.
pub fn root() -> Result<PathBuf, Error> {
    let mut base = PathBuf::from(BPFFS);
    if under_fresh_sysfs() {
        let Some(outer) = outer_bpffs() else {
            return Err(Error::Usage(format!(
                "cannot mount bpffs at {BPFFS}: this command runs in a mount namespace of its own with a fresh /sys \
                 (as under `ip netns exec`), where a bpffs would vanish when it exits, taking the pinned state along \
                 (mount bpffs at {BPFFS} on the host first, or run skrelay with `nsenter --net=/run/netns/NAME`)"
            )));
        };
        base = outer;
    }
    let base = base.as_path();
    if !is_bpffs(base) {
        let _ = std::fs::create_dir_all(base);
        let mounted = rustix::mount::mount("bpf", BPFFS, "bpf", rustix::mount::MountFlags::empty(), None);
        if mounted.is_err() || !is_bpffs(base) {
            let e = mounted.err().map_or_else(|| io::Error::other("not a bpffs after mounting"), io::Error::from);
            return Err(Error::Usage(format!(
                "cannot mount bpffs at {BPFFS}: {e} (mount it with `mount -t bpf bpf {BPFFS}` as root)"
            )));
        }
    }
    let dir = base.join("skrelay");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    Ok(dir)
}

/// The directory skrelay pins under, found as `root` finds it, if skrelay pinned anything there;
/// `None` when there is no bpffs or no such directory. Mounts and creates nothing: for commands
/// that only look.
pub fn existing_root() -> Option<PathBuf> {
    let base = if under_fresh_sysfs() { outer_bpffs()? } else { PathBuf::from(BPFFS) };
    let dir = base.join("skrelay");
    (is_bpffs(&base) && dir.is_dir()).then_some(dir)
}

/// /sys/fs/bpf is a bare sysfs directory of a mount namespace of our own (`ip netns exec`).
fn under_fresh_sysfs() -> bool {
    fs_type(Path::new(BPFFS)) == Some(SYSFS_MAGIC) && in_own_mount_ns()
}

/// The bpffs of PID 1's or else the parent process's mount namespace.
fn outer_bpffs() -> Option<PathBuf> {
    ["1".to_string(), parent_pid().to_string()]
        .into_iter()
        .map(|pid| Path::new("/proc").join(pid).join("root").join(BPFFS.trim_start_matches('/')))
        .find(|p| is_bpffs(p))
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
        loop {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
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
        if shared { file.lock_shared() } else { file.lock() }
            .map_err(|e| Error::io(format!("cannot lock {}", dir.display()), e))?;
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

/// Older skrelay locked with a file in /run/skrelay, one per directory, never removed: removes
/// this directory's (and /run/skrelay once empty).
fn remove_legacy_lock(dir: &Path) {
    let run = Path::new("/run/skrelay");
    let name = dir.to_string_lossy().replace('/', "_");
    if std::fs::remove_file(run.join(format!("{name}.lock"))).is_ok() {
        let _ = std::fs::remove_dir(run);
    }
}
