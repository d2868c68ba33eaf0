//! What a datapath hands to the skrelay that takes over (`--takeover`): each pair's splice state
//! (byte counters, half-close state, the pipes that hold its bytes in flight) and, on the kernel
//! datapath, the maps its pairs live in. Descriptors travel as the old process's numbers; the new
//! process duplicates each one with pidfd_getfd(2) before it agrees to take anything over, so a
//! handover that fails half-way leaves every descriptor with the old process (server/handover.rs).
use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
};

/// One spliced pair's state in its datapath.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SpliceState {
    /// splice(2) through two pipes.
    Userspace { dirs: [PipeDirection; 2] },
    /// Both sockets in the kernel maps.
    Kernel(KernelSpliceState),
    /// A kernel-datapath pair that starts on splice(2) and joins the maps later.
    Handover {
        user: Box<SpliceState>,
        kernel: KernelSpliceState,
        joined: bool,
        after: u64,
        /// It stays on splice(2) for good: a client half-closed before it could join.
        stays: bool,
        half_closed: bool,
        user_moved: [u64; 2],
        /// Its last try to join found the maps or --kernel-memory full (absent from older
        /// versions: false).
        #[serde(default)]
        refused: bool,
    },
}

impl SpliceState {
    /// Whether splice(2) alone carries this pair: it is not in the kernel maps and holds no map
    /// entry (a kernel-datapath pair below `--kernel-after` is such a pair), so any datapath can
    /// carry it on.
    pub fn pipes_only(&self) -> bool {
        match self {
            SpliceState::Userspace { .. } => true,
            SpliceState::Kernel(_) => false,
            SpliceState::Handover { user, kernel, joined, .. } => {
                !joined
                    && kernel.directions.is_empty()
                    && !kernel.counted
                    && !(kernel.targets.iter().chain(&kernel.peers).chain(&kernel.socks).any(|&b| b))
                    && user.pipes_only()
            }
        }
    }

    /// The pipes of a pair that `pipes_only` accepts.
    pub fn into_pipes(self) -> Option<[PipeDirection; 2]> {
        if !self.pipes_only() {
            return None;
        }
        match self {
            SpliceState::Userspace { dirs } => Some(dirs),
            SpliceState::Handover { user, .. } => user.into_pipes(),
            SpliceState::Kernel(_) => None,
        }
    }
}

/// One direction of a splice(2) pair: its pipe (old descriptors: read, write) while bytes are in
/// it, and its counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PipeDirection {
    pub pipe: Option<[RawFd; 2]>,
    pub capacity: usize,
    pub in_pipe: usize,
    pub src_eof: bool,
    pub moved: u64,
}

/// A kernel pair: what it put in the maps and what user space knows of each direction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelSpliceState {
    pub cookies: [u64; 2],
    pub acked_base: [u64; 2],
    pub consumed: [u64; 2],
    /// Map entries it holds: targets, peers, socks (each per end), and whether it is counted.
    pub targets: [bool; 2],
    pub peers: [bool; 2],
    pub socks: [bool; 2],
    pub counted: bool,
    /// Directions 0 and 1 while the pair is in the maps.
    pub directions: Vec<KernelDirection>,
}

/// User space's part of one direction of a kernel pair (the maps hold the rest).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelDirection {
    pub cookie: u64,
    pub peer: u64,
    pub base: u64,
    pub taken: u64,
    pub written: u64,
    /// The next wait (microseconds) while its bytes are parked.
    pub parked_us: Option<u64>,
    pub dst_acked: u64,
    pub unconsumed: u64,
    /// The source's window clamp before it was narrowed for parked bytes (the narrowed clamp is
    /// the socket's own setting, so it moves by itself; this is what to give back).
    #[serde(default)]
    pub held: Option<u32>,
    /// Its destination's send buffer was raised for it, and it gets no budget until that
    /// buffer's queue is read down (the raised buffer is the socket's own setting).
    #[serde(default)]
    pub frozen: bool,
    /// The destination's send queue when its buffer was raised: what it holds beyond that still
    /// counts as in flight (a takeover without it showed 0 bytes in flight where 17 MB waited).
    #[serde(default)]
    pub shelter_base: Option<u64>,
    /// A socket error read out of SO_ERROR, not reported yet.
    pub error: Option<SavedError>,
}

/// An `io::Error` that crosses processes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedError {
    pub errno: Option<i32>,
    pub message: String,
}

impl SavedError {
    pub fn save(e: &io::Error) -> SavedError {
        SavedError { errno: e.raw_os_error(), message: e.to_string() }
    }

    pub fn restore(&self) -> io::Error {
        match self.errno {
            Some(n) => io::Error::from_raw_os_error(n),
            None => io::Error::other(self.message.clone()),
        }
    }
}

/// The kernel datapath's maps (old descriptors). The programs are not among them: the verdict
/// stays attached to `socks` for as long as the map lives, whoever holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelMaps {
    pub socks: RawFd,
    pub targets: RawFd,
    pub peers: RawFd,
    pub counts: RawFd,
    pub events: RawFd,
    pub stats: RawFd,
    /// The exit summary's counts kept in user space.
    pub parkings: u64,
    #[serde(default)]
    pub unreported: u64,
    #[serde(default)]
    pub holds: u64,
    #[serde(default)]
    pub unsticks: u64,
    #[serde(default)]
    pub runaways: u64,
}

/// Collects the descriptors an export names, so the new process knows what to duplicate.
#[derive(Debug, Default)]
pub struct Exporter {
    pub fds: Vec<RawFd>,
}

impl Exporter {
    /// Names `fd` in the manifest.
    pub fn fd(&mut self, fd: &impl AsRawFd) -> RawFd {
        let n = fd.as_raw_fd();
        self.fds.push(n);
        n
    }
}

/// The descriptors taken from the old process, by the number they had there.
#[derive(Debug, Default)]
pub struct Fds {
    fds: HashMap<RawFd, OwnedFd>,
}

impl Fds {
    pub fn insert(&mut self, old: RawFd, fd: OwnedFd) {
        self.fds.insert(old, fd);
    }

    /// The duplicate of the old process's descriptor `old` (each is taken once).
    pub fn take(&mut self, old: RawFd) -> io::Result<OwnedFd> {
        self.fds.remove(&old).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("descriptor {old} of the old process was not handed over"))
        })
    }

    pub fn len(&self) -> usize {
        self.fds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }
}
