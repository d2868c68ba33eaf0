//! The userspace datapath: splice(2) from each socket into a pipe and from the pipe into the peer.
//! Payload pages move by reference; the process only drives the calls.
use super::{
    handover::{Exporter, Fds, PipeDirection, SpliceState},
    Datapath, Flow, Splice, SpliceError,
};
use crate::sys::{self, Pipe};
use mio::{net::TcpStream, Interest};
use std::{
    cell::RefCell,
    io::{self, Read, Write},
};

/// Bytes a pipe holds; also how far a source is read ahead of a slow destination.
const PIPE_SIZE: usize = 256 * 1024;
/// Rounds of (source -> pipe -> destination) per call before other pairs get their turn.
const ROUNDS_PER_CALL: usize = 16;
/// Empty pipes kept for the next pair that has bytes to move.
const SPARE_PIPES: usize = 64;

thread_local! {
    /// Pipes are held only while bytes are in them: an idle pair costs its two sockets and
    /// nothing else, and a short connection takes pipes from here instead of creating them.
    static SPARE: RefCell<Vec<(Pipe, usize)>> = const { RefCell::new(Vec::new()) };
}

/// An empty pipe and its capacity: a spare one, or a new one.
fn take_pipe() -> io::Result<(Pipe, usize)> {
    match SPARE.with(|s| s.borrow_mut().pop()) {
        Some(p) => Ok(p),
        None => Pipe::new(PIPE_SIZE),
    }
}

/// Says, at most once every 10 s per process, that a pair waits for a pipe.
fn warn_pipe_shortage(e: &io::Error) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    if (last == 0 || now >= last + 10) && LAST.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    {
        log::warn!(
            "userspace datapath: cannot open a pipe: {e}; pairs that need one wait and retry (raise the descriptor \
             limit: `ulimit -n`, or LimitNOFILE= in the unit)"
        );
    }
}

/// Closes this thread's spare pipes (two descriptors each): called when the process is short of
/// descriptors, so that they go to clients instead.
pub fn release_spare_pipes() -> usize {
    SPARE.with(|s| std::mem::take(&mut *s.borrow_mut()).len())
}

/// Keeps an empty pipe for later (or closes it when enough are kept).
fn give_pipe(pipe: (Pipe, usize)) {
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARE_PIPES {
            s.push(pipe);
        }
    });
}

pub struct UserspaceDatapath;

impl Datapath for UserspaceDatapath {
    fn name(&self) -> &'static str {
        "userspace"
    }

    fn splice(&mut self, ends: [&TcpStream; 2], skip: [u32; 2]) -> Result<Box<dyn Splice>, SpliceError> {
        // Both ends keep an urgent byte (MSG_OOB) in the stream (SO_OOBINLINE, set on the
        // listener, which accepted sockets inherit, and on each upstream connection), as on the
        // kernel datapath: without it, reading through a buffer of ours (no pipe) would leave
        // the byte out.
        for (end, n) in ends.into_iter().zip(skip) {
            discard(end, n as usize)?;
        }
        Ok(Box::new(UserspaceSplice::new()))
    }
}

struct Direction {
    /// The pipe and its capacity, held while bytes are in it (and during a call).
    pipe: Option<(Pipe, usize)>,
    in_pipe: usize,
    src_eof: bool,
    moved: u64,
    /// The most bytes one read took from the source (`Splice::traffic`).
    largest_read: usize,
    /// The source reported urgent data (EPOLLPRI) at some point: only then can a splice(2)
    /// that says EAGAIN have stopped at an urgent mark, so only then is SIOCATMARK asked after
    /// one (it was asked after every drained read: one system call a message on request/response
    /// traffic). An urgent byte whose event is not in yet waits for it, a loop turn at most.
    urgent: bool,
}

pub struct UserspaceSplice {
    dirs: [Direction; 2],
    /// Bytes each direction moved since the other last moved one, and the most of that seen.
    runs: [u64; 2],
    longest_run: u64,
}

impl UserspaceSplice {
    /// Takes no pipe yet: `advance` takes one when it has bytes to move and gives it back empty.
    fn new() -> Self {
        let direction =
            || Direction { pipe: None, in_pipe: 0, src_eof: false, moved: 0, largest_read: 0, urgent: false };
        UserspaceSplice { dirs: [direction(), direction()], runs: [0; 2], longest_run: 0 }
    }
}

/// Reads and drops `n` bytes that are known to be queued (they were peeked).
pub fn discard(mut stream: &TcpStream, n: usize) -> io::Result<()> {
    let mut buf = [0u8; 128];
    let mut left = n;
    while left > 0 {
        let got = stream.read(&mut buf[..left.min(128)])?;
        if got == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "client closed inside its token line"));
        }
        left -= got;
    }
    Ok(())
}

fn would_block(r: &io::Result<usize>) -> bool {
    matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

impl Direction {
    /// Source -> destination through a buffer of this thread, when no pipe can be opened (out of
    /// descriptors): bytes are peeked, written on, and only what was written is taken from the
    /// source, so nothing is held here between calls. Slower than splice(2), and only for the
    /// shortage: the next call tries for a pipe again.
    fn advance_without_pipe(&mut self, src: &TcpStream, dst: &TcpStream) -> io::Result<Flow> {
        thread_local! {
            static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 64 * 1024]);
        }
        BUF.with(|buf| {
            let buf = &mut buf.borrow_mut()[..];
            for _ in 0..ROUNDS_PER_CALL {
                let n = match sys::peek(src, buf) {
                    Ok(0) => {
                        self.src_eof = true;
                        return Ok(Flow::Finished);
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flow::Open),
                    Err(e) => return Err(e),
                };
                let written = match (&mut &*dst).write(&buf[..n]) {
                    Ok(w) => w,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flow::Open),
                    Err(e) => return Err(e),
                };
                let mut taken = 0;
                while taken < written {
                    match (&mut &*src).read(&mut buf[..written - taken]) {
                        Ok(0) => break,
                        Ok(got) => taken += got,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                self.moved += written as u64;
                self.largest_read = self.largest_read.max(written);
                if written < n {
                    return Ok(Flow::Open);
                }
            }
            // More may be ready: the caller looks again soon (this also retries for a pipe).
            Ok(Flow::Again)
        })
    }

    /// Source -> pipe -> destination until nothing moves, the source ends, or the round limit.
    fn advance(&mut self, src: &TcpStream, dst: &TcpStream) -> io::Result<Flow> {
        for _ in 0..ROUNDS_PER_CALL {
            let mut progressed = false;
            if let Some((pipe, capacity)) = &self.pipe {
                if !self.src_eof && self.in_pipe < *capacity {
                    let r = sys::splice(src, &pipe.write, capacity - self.in_pipe);
                    match r {
                        // splice(2) stops at an urgent byte (MSG_OOB) for good: EAGAIN, or 0 once
                        // the peer shut down, with every byte after it still queued (a stranger
                        // pass: the stream froze, then ended in a clean EOF short of them). The
                        // byte goes on in place, as the kernel datapath carries it, once the pipe
                        // is empty: a pipe has room for so many pieces, and splices cut short at
                        // urgent marks fill them long before its bytes (a write refused with
                        // EAGAIN cut the pair; a re-check pass). Nothing is held here meanwhile.
                        Ok(0) | Err(_) if (r.is_ok() || would_block(&r) && self.urgent) && sys::at_urgent_mark(src) => {
                            if self.in_pipe == 0 {
                                if let Some(byte) = sys::take_urgent_byte(src)? {
                                    rustix::io::write(&pipe.write, &[byte])?;
                                    self.in_pipe += 1;
                                    progressed = true;
                                }
                            }
                        }
                        Ok(0) => {
                            self.src_eof = true;
                            progressed = true;
                        }
                        Ok(n) => {
                            self.in_pipe += n;
                            self.largest_read = self.largest_read.max(n);
                            progressed = true;
                        }
                        _ if would_block(&r) => {}
                        Err(e) => return Err(e),
                    }
                }
                if self.in_pipe > 0 {
                    let r = sys::splice(&pipe.read, dst, self.in_pipe);
                    match r {
                        Ok(n) => {
                            self.in_pipe -= n;
                            self.moved += n as u64;
                            progressed = true;
                        }
                        _ if would_block(&r) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            if self.src_eof && self.in_pipe == 0 {
                return Ok(Flow::Finished);
            }
            if !progressed {
                return Ok(Flow::Open);
            }
        }
        Ok(Flow::Again)
    }
}

impl Splice for UserspaceSplice {
    fn advance(&mut self, dir: usize, src: &TcpStream, dst: &TcpStream) -> io::Result<Flow> {
        let d = &mut self.dirs[dir];
        if d.pipe.is_none() && !d.src_eof {
            match take_pipe() {
                Ok(pipe) => d.pipe = Some(pipe),
                // Out of descriptors for a pipe: a pair is not cut for a shortage that others'
                // connections cause; it moves its bytes through a buffer of ours meanwhile.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)) => {
                    warn_pipe_shortage(&e);
                    return d.advance_without_pipe(src, dst);
                }
                Err(e) => return Err(e),
            }
        }
        let before = d.moved;
        let flow = d.advance(src, dst);
        if d.moved > before {
            self.runs[dir] += d.moved - before;
            self.runs[1 - dir] = 0;
            self.longest_run = self.longest_run.max(self.runs[dir]);
        }
        let d = &mut self.dirs[dir];
        if d.in_pipe == 0 {
            if let Some(pipe) = d.pipe.take() {
                give_pipe(pipe);
            }
        }
        flow
    }

    fn moved(&self, dir: usize, _src: &TcpStream, _dst: &TcpStream, _ended: bool) -> u64 {
        self.dirs[dir].moved
    }

    fn interest(&self) -> Interest {
        Interest::READABLE | Interest::WRITABLE | Interest::PRIORITY
    }

    fn urgent_seen(&mut self, end: usize) {
        self.dirs[end].urgent = true;
    }

    fn traffic(&self) -> Option<super::Traffic> {
        Some(super::Traffic {
            largest_read: [self.dirs[0].largest_read, self.dirs[1].largest_read],
            longest_run: self.longest_run,
        })
    }

    fn release(&mut self) {}

    fn name(&self) -> &'static str {
        "userspace"
    }

    fn idle(&self) -> bool {
        // The sources need not be drained: a stream that never pauses joins too.
        self.dirs.iter().all(|d| !d.src_eof && d.in_pipe == 0)
    }

    /// The counters, and each pipe that holds bytes: its descriptors go with the pair, so the
    /// bytes in it are written on by the new process, in order.
    fn export(&self, ex: &mut Exporter) -> Option<SpliceState> {
        let dir = |d: &Direction, ex: &mut Exporter| PipeDirection {
            pipe: d.pipe.as_ref().map(|(p, _)| [ex.fd(&p.read), ex.fd(&p.write)]),
            capacity: d.pipe.as_ref().map_or(0, |(_, c)| *c),
            in_pipe: d.in_pipe,
            src_eof: d.src_eof,
            moved: d.moved,
        };
        let dirs = [dir(&self.dirs[0], ex), dir(&self.dirs[1], ex)];
        Some(SpliceState::Userspace { dirs })
    }
}

/// A splice(2) pair handed over by the old process, with its pipes.
pub fn import(dirs: [PipeDirection; 2], fds: &mut Fds) -> io::Result<Box<dyn Splice>> {
    Ok(Box::new(import_splice(dirs, fds)?))
}

pub(super) fn import_splice(dirs: [PipeDirection; 2], fds: &mut Fds) -> io::Result<UserspaceSplice> {
    let mut out = UserspaceSplice::new();
    for (d, state) in out.dirs.iter_mut().zip(dirs) {
        if let Some([read, write]) = state.pipe {
            d.pipe = Some((Pipe { read: fds.take(read)?, write: fds.take(write)? }, state.capacity));
        } else if state.in_pipe > 0 {
            return Err(io::Error::other("a direction with bytes in flight came without its pipe"));
        }
        d.in_pipe = state.in_pipe;
        d.src_eof = state.src_eof;
        d.moved = state.moved;
    }
    Ok(out)
}
