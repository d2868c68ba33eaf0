//! skrelay's pinned state lives under /sys/fs/bpf/skrelay/: this module finds (or mounts) bpffs
//! and serialises commands that change pinned state with a lock file.
use crate::error::Error;
use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// The directory skrelay pins under (`/sys/fs/bpf/skrelay`), mounting bpffs at /sys/fs/bpf first
/// if nothing is mounted there.
pub fn root() -> Result<PathBuf, Error> {
    let base = Path::new(BPFFS);
    if !is_bpffs(base) {
        let _ = std::fs::create_dir_all(base);
        let (src, dst, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
        let r = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
        if r != 0 || !is_bpffs(base) {
            let e = io::Error::last_os_error();
            return Err(Error::Usage(format!(
                "cannot mount bpffs at {BPFFS}: {e} (mount it with `mount -t bpf bpf {BPFFS}` as root)"
            )));
        }
    }
    let dir = base.join("skrelay");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    Ok(dir)
}

/// An exclusive lock on a directory of pinned state, held until dropped, so two skrelay commands
/// run at once cannot interleave their changes. The lock is flock(2) on the directory itself:
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

    /// Locks `dir` if it exists; None if it does not, or was removed (a reset) while we waited.
    pub fn acquire_existing(dir: &Path) -> Result<Option<StateLock>, Error> {
        use std::os::unix::fs::MetadataExt;
        let file = match File::open(dir) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("cannot open {}", dir.display()), e)),
        };
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::io(format!("cannot lock {}", dir.display()), io::Error::last_os_error()));
        }
        // The holder before us may have removed the directory: then what we locked is gone.
        let locked = file.metadata().map_err(|e| Error::io(format!("cannot read {}", dir.display()), e))?;
        let same = std::fs::metadata(dir).is_ok_and(|now| (now.dev(), now.ino()) == (locked.dev(), locked.ino()));
        if !same {
            return Ok(None);
        }
        remove_legacy_lock(dir);
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
