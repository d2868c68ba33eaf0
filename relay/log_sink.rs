//! Where a relay's or a proxy's log goes: standard error, written by a thread of its own, so that
//! a reader that does not keep up never stops the event loops.
//!
//! Every client makes log lines (its pair's end, its reset), and a write to standard error blocks
//! once its reader stops taking them: a pipe nobody drains (`skrelay relay 2>&1 | less`, paused),
//! a terminal stopped with Ctrl-S, a stalled journald. Written from the event loops, that one
//! blocked write stopped every pairing, join and reset in the process until the reader came back,
//! and clients could fill the pipe themselves (a stranger's pass: 1,500 pairs that closed at once,
//! then no new pair was served). Here the loops only queue the line; what waits is bounded by
//! `QUEUED_LOG_BYTES`, past which lines are dropped and counted, and the count is logged once the
//! reader takes lines again.
use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The most log bytes that wait for standard error; past it, lines are dropped and counted.
pub const QUEUED_LOG_BYTES: usize = 1 << 20;

#[derive(Default)]
struct Queue {
    lines: VecDeque<Vec<u8>>,
    /// Bytes in `lines`, and in the line being written.
    bytes: usize,
    dropped: u64,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a line is queued, and when one has been written.
    changed: Condvar,
}

static SHARED: OnceLock<Arc<Shared>> = OnceLock::new();

/// Every line dropped since start (`skrelay_log_lines_dropped_total`).
static DROPPED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// How many log lines were dropped since start because standard error did not take them.
pub fn dropped_total() -> u64 {
    DROPPED_TOTAL.load(Ordering::Relaxed)
}

/// A writer for the logger: each write is one line (env_logger writes a record with one
/// `write_all`), queued for the log thread, or dropped when `QUEUED_LOG_BYTES` wait already.
pub struct QueuedStderr(Arc<Shared>);

impl Write for QueuedStderr {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut q = self.0.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.bytes + line.len() > QUEUED_LOG_BYTES {
            q.dropped += 1;
            DROPPED_TOTAL.fetch_add(1, Ordering::Relaxed);
        } else {
            q.bytes += line.len();
            q.lines.push_back(line.to_vec());
            self.0.changed.notify_all();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Starts the log thread and returns the writer that feeds it; where no thread can be started,
/// standard error itself (written in place, as before).
pub fn start() -> Box<dyn Write + Send> {
    let shared = Arc::new(Shared::default());
    let feed = shared.clone();
    let thread = std::thread::Builder::new().name("log".into());
    match crate::sys::with_signals_blocked(|| thread.spawn(move || write_lines(&feed))) {
        Ok(_) => {
            let _ = SHARED.set(shared.clone());
            Box::new(QueuedStderr(shared))
        }
        Err(_) => Box::new(io::stderr()),
    }
}

/// The log thread: writes the queued lines to standard error in order, blocking as long as its
/// reader makes it; says how many were dropped once it takes lines again.
fn write_lines(shared: &Shared) {
    let mut stderr = io::stderr();
    loop {
        let line = {
            let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            while q.lines.is_empty() {
                q = shared.changed.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            q.lines.pop_front().expect("a queued line")
        };
        // A reader that went away (EPIPE) or a full disk: the line is lost, as it would have been.
        let _ = stderr.write_all(&line);
        let dropped = {
            let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.bytes -= line.len();
            shared.changed.notify_all();
            // Said once half the queue is free: said at each line while the reader stays slow,
            // the count would take the room of the lines themselves.
            if q.bytes <= QUEUED_LOG_BYTES / 2 {
                std::mem::take(&mut q.dropped)
            } else {
                0
            }
        };
        if dropped > 0 {
            log::warn!(
                "{dropped} log lines were dropped: standard error did not take them as fast as they came, and \
                 skrelay does not wait for its log (at most {} KiB of lines wait; read the log faster, or lower \
                 RUST_LOG)",
                QUEUED_LOG_BYTES >> 10
            );
        }
    }
}

/// Waits until every queued line is written, or until `within` has passed (a reader that takes
/// nothing does not hold an exit longer): called before the process says its last word and exits.
pub fn drain(within: Duration) {
    let Some(shared) = SHARED.get() else { return };
    let until = Instant::now() + within;
    let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
    while q.bytes > 0 {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        q = shared.changed.wait_timeout(q, left).unwrap_or_else(|e| e.into_inner()).0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_past_the_bound_are_dropped_and_counted() {
        let shared = Arc::new(Shared::default());
        let mut w = QueuedStderr(shared.clone());
        let line = vec![b'x'; 1000];
        let fit = QUEUED_LOG_BYTES / line.len();
        for _ in 0..fit + 5 {
            assert_eq!(w.write(&line).unwrap(), line.len());
        }
        let q = shared.queue.lock().unwrap();
        assert_eq!(q.lines.len(), fit);
        assert_eq!(q.bytes, fit * line.len());
        assert_eq!(q.dropped, 5);
    }
}
