//! The watcher of an `accel run`: a process forked before the command starts, in a session of its
//! own and outside the cgroup, that removes the acceleration state (and the cgroup `run` made)
//! when `accel run` cannot: it was killed (SIGKILL included), or the command left processes
//! running. It waits for the cgroup to empty first, so no accelerated connection loses a byte.
use super::cgroup::{Cgroup, Process};
use crate::error::Error;
use std::{
    io::Read,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

/// `accel run` cleaned up itself: the watcher exits.
const DONE: u8 = b'd';

/// The `accel run` side: the write end of a pipe whose other end the watcher reads. It closes
/// on exec (the command does not hold it) and when this process dies, which the watcher sees.
pub struct Watcher {
    pipe: OwnedFd,
    pub process: Process,
}

impl Watcher {
    /// Forks the watcher. Call while this process has one thread: the child runs Rust code.
    /// `cleanup` runs in the watcher once the cgroup is empty, unless `dismiss` was called.
    pub fn start(cg: Cgroup, cleanup: impl FnOnce()) -> Result<Watcher, Error> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the live two-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(Error::io("cannot create the watcher's pipe", std::io::Error::last_os_error()));
        }
        // SAFETY: pipe2 succeeded: both descriptors are new and owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: `accel run` is single-threaded when it starts the watcher, so the child may run
        // ordinary code; it leaves with _exit and never returns into the caller's stack.
        match unsafe { libc::fork() } {
            -1 => Err(Error::io("cannot start the watcher", std::io::Error::last_os_error())),
            0 => {
                drop(write);
                watch(read, cg, cleanup);
                // SAFETY: _exit ends the forked child without running the parent's destructors.
                unsafe { libc::_exit(0) }
            }
            pid => {
                drop(read);
                let process = Process::of(pid as u32).unwrap_or(Process { pid: pid as u32, start: 0 });
                Ok(Watcher { pipe: write, process })
            }
        }
    }

    /// Everything was cleaned up here: the watcher has nothing to do.
    pub fn dismiss(self) {
        // SAFETY: writes one byte from a live one-byte array to the pipe we own.
        let _ = unsafe { libc::write(self.pipe.as_raw_fd(), [DONE].as_ptr() as *const libc::c_void, 1) };
    }
}

fn watch(read: OwnedFd, cg: Cgroup, cleanup: impl FnOnce()) {
    // Out of the terminal's session (Ctrl-C is for the command) and off its output pipes, so a
    // caller reading `accel run`'s output to its end does not wait for the watcher.
    // SAFETY: plain syscalls on descriptors this process owns, in the forked watcher.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            libc::close(null);
        }
    }
    let mut byte = [0u8; 1];
    let mut pipe = std::fs::File::from(read);
    if matches!(pipe.read(&mut byte), Ok(1) if byte[0] == DONE) {
        return;
    }
    // `accel run` is gone (or handed over): wait for the command's processes to exit.
    while cg.populated() {
        std::thread::sleep(Duration::from_millis(100));
    }
    cleanup();
}
