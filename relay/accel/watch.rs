//! The watcher of an `accel run`: a process forked before the command starts, in a session of its
//! own and outside the cgroup, that removes the acceleration state (and the cgroup `run` made)
//! when `accel run` cannot: it was killed (SIGKILL included), or the command left processes
//! running. It waits for the cgroup to empty first, so no accelerated connection loses a byte.
use super::cgroup::{Cgroup, Process};
use crate::error::Error;
use std::{io::Read, os::fd::OwnedFd, time::Duration};

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
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| Error::io("cannot create the watcher's pipe", e.into()))?;
        // SAFETY: `accel run` is single-threaded when it starts the watcher, so the child may run
        // ordinary code; it leaves with _exit and never returns into the caller's stack.
        match unsafe { libc::fork() } {
            -1 => Err(Error::io("cannot start the watcher", std::io::Error::last_os_error())),
            0 => {
                drop(write);
                // `accel run` holds its stop signals while it starts the watcher; the watcher
                // answers them as a process does (a mask survives fork).
                crate::sys::unblock(&crate::sys::StopSignalsHeld::set());
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
        let _ = rustix::io::write(&self.pipe, &[DONE]);
    }
}

fn watch(read: OwnedFd, cg: Cgroup, cleanup: impl FnOnce()) {
    // Out of the terminal's session (Ctrl-C is for the command) and off its output pipes, so a
    // caller reading `accel run`'s output to its end does not wait for the watcher.
    let _ = rustix::process::setsid();
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        let _ = rustix::stdio::dup2_stdin(&null);
        let _ = rustix::stdio::dup2_stdout(&null);
        let _ = rustix::stdio::dup2_stderr(&null);
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
