//! The userspace datapath: splice(2) from each socket into a pipe and from the pipe into the peer.
//! Payload pages move by reference; the process only drives the calls.
use super::{Datapath, Flow, Splice, SpliceError};
use crate::sys::{self, Pipe};
use mio::{net::TcpStream, Interest};
use std::{
    io::{self, Read},
    os::fd::AsRawFd,
};

/// Bytes a pipe holds; also how far a source is read ahead of a slow destination.
const PIPE_SIZE: usize = 256 * 1024;
/// Rounds of (source -> pipe -> destination) per call before other pairs get their turn.
const ROUNDS_PER_CALL: usize = 16;

pub struct UserspaceDatapath;

impl Datapath for UserspaceDatapath {
    fn name(&self) -> &'static str {
        "userspace"
    }

    fn splice(&mut self, ends: [&TcpStream; 2], skip: [u32; 2]) -> Result<Box<dyn Splice>, SpliceError> {
        for (end, n) in ends.into_iter().zip(skip) {
            discard(end, n as usize)?;
        }
        Ok(Box::new(UserspaceSplice::new()?))
    }
}

struct Direction {
    pipe: Pipe,
    capacity: usize,
    in_pipe: usize,
    src_eof: bool,
    /// The last read from the source found its queue empty.
    src_drained: bool,
    moved: u64,
}

pub struct UserspaceSplice {
    dirs: [Direction; 2],
}

impl UserspaceSplice {
    pub fn new() -> io::Result<Self> {
        let direction = || -> io::Result<Direction> {
            let (pipe, capacity) = Pipe::new(PIPE_SIZE)?;
            Ok(Direction { pipe, capacity, in_pipe: 0, src_eof: false, src_drained: false, moved: 0 })
        };
        Ok(UserspaceSplice { dirs: [direction()?, direction()?] })
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

impl Splice for UserspaceSplice {
    fn advance(&mut self, dir: usize, src: &TcpStream, dst: &TcpStream) -> io::Result<Flow> {
        let d = &mut self.dirs[dir];
        for _ in 0..ROUNDS_PER_CALL {
            let mut progressed = false;
            if !d.src_eof && d.in_pipe < d.capacity {
                let r = sys::splice(src.as_raw_fd(), d.pipe.write.as_raw_fd(), d.capacity - d.in_pipe);
                d.src_drained = would_block(&r);
                match r {
                    Ok(0) => d.src_eof = true,
                    Ok(n) => d.in_pipe += n,
                    _ if would_block(&r) => {}
                    Err(e) => return Err(e),
                }
                progressed |= !would_block(&r);
            }
            if d.in_pipe > 0 {
                let r = sys::splice(d.pipe.read.as_raw_fd(), dst.as_raw_fd(), d.in_pipe);
                match r {
                    Ok(n) => {
                        d.in_pipe -= n;
                        d.moved += n as u64;
                        progressed = true;
                    }
                    _ if would_block(&r) => {}
                    Err(e) => return Err(e),
                }
            }
            if d.src_eof && d.in_pipe == 0 {
                return Ok(Flow::Finished);
            }
            if !progressed {
                return Ok(Flow::Open);
            }
        }
        Ok(Flow::Again)
    }

    fn moved(&self, dir: usize, _src: &TcpStream) -> u64 {
        self.dirs[dir].moved
    }

    fn interest(&self) -> Interest {
        Interest::READABLE | Interest::WRITABLE
    }

    fn release(&mut self) {}

    fn idle(&self) -> bool {
        self.dirs.iter().all(|d| d.src_drained && !d.src_eof && d.in_pipe == 0)
    }
}
