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
    // SAFETY: `libc::statfs` is plain old data, for which all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and statfs writes one `struct statfs` into `st`.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// The directory skrelay pins under (`/sys/fs/bpf/skrelay`), mounting bpffs at /sys/fs/bpf first
/// if nothing is mounted there.
pub fn root() -> Result<PathBuf, Error> {
    let base = Path::new(BPFFS);
    if !is_bpffs(base) {
        let _ = std::fs::create_dir_all(base);
        let (src, dst, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
        // SAFETY: three NUL-terminated static strings and no mount data (null is allowed).
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
/// run at once cannot interleave their changes.
pub struct StateLock {
    _file: File,
}

impl StateLock {
    pub fn acquire(dir: &Path) -> Result<StateLock, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        // bpffs holds only BPF objects: the lock is a file beside it in /run.
        let name = dir.to_string_lossy().replace('/', "_");
        let lock_dir = Path::new("/run/skrelay");
        std::fs::create_dir_all(lock_dir).map_err(|e| Error::io("cannot create /run/skrelay", e))?;
        let path = lock_dir.join(format!("{name}.lock"));
        let file = File::create(&path).map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        // SAFETY: flock on the open descriptor of `file`, which outlives the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::io(format!("cannot lock {}", path.display()), io::Error::last_os_error()));
        }
        Ok(StateLock { _file: file })
    }
}
