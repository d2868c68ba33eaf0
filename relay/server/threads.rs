//! `--threads N`: one event loop per thread. The first loop (the front) accepts, finds partners
//! and connects upstreams, and serves pairs like the others; each pair it forms stays with it or
//! goes to the least loaded loop (`Threads::pick`), whose thread serves both its sockets until the
//! pair ends. Pairing stays in one place, so arrival order and tokens mean exactly what they mean
//! with one thread.
//!
//! Each loop is a `Server` of its own (its own poll, timers and datapath: a kernel datapath per
//! loop, with its own programs and maps, whose pairs `--kernel-memory` bounds together). The
//! front talks to the others by `Order`s on a channel, with a mio `Waker`; a loop that stops
//! wakes the front. `--takeover` calls them back (`recall`): their threads return their servers,
//! so the front hands over every pair of every loop at once.
use super::Server;
use mio::{net::TcpStream, Waker};
use std::{
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc::{self, Receiver, Sender, TryRecvError},
        Arc,
    },
    thread::JoinHandle,
    time::Instant,
};

/// What the front asks of another loop.
pub(super) enum Order {
    /// Serve this pair from now on.
    Pair(Formed),
    /// Stop taking pairs; let the live ones finish until `Instant`, then reset them.
    Drain(Instant),
    /// Reset every live pair now (the stop signal, named, came again).
    EndAll(&'static str),
    /// Stop at once and give the server back to the front (`--takeover`).
    Stop,
}

/// A pair formed by the front, not yet spliced.
pub(super) struct Formed {
    pub(super) ends: [TcpStream; 2],
    pub(super) addrs: [SocketAddr; 2],
    pub(super) skip: [u32; 2],
    pub(super) upstream_local: Option<SocketAddr>,
    /// Its sockets are registered with the poll of the loop that holds it.
    pub(super) watched: bool,
}

/// How many pairs more than the least loaded worker the front may serve and still keep a new pair.
const FRONT_SLACK: usize = 1;

/// The front's end of a worker loop's orders.
pub(super) struct Link {
    orders: Sender<Order>,
    waker: Arc<Waker>,
    nudged: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
}

/// One loop's place among the threads.
pub(super) struct Threads {
    /// This loop's index; 0 is the front.
    pub(super) me: usize,
    /// Pairs each loop serves or has been sent (the front picks the least loaded).
    loads: Arc<[AtomicUsize]>,
    /// Wakes this loop (a worker: an order came; the front: a worker stopped).
    waker: Arc<Waker>,
    /// A worker's orders, and its `Worker::nudged`.
    inbox: Option<(Receiver<Order>, Arc<AtomicBool>)>,
    /// The front: the other loops.
    workers: Vec<Worker>,
}

struct Worker {
    orders: Sender<Order>,
    waker: Arc<Waker>,
    /// Set when the worker was woken and has not yet looked at its orders: orders sent meanwhile
    /// need no wake-up of their own (a burst of pairs costs one).
    nudged: Arc<AtomicBool>,
    /// Set when the worker's thread leaves (`Ended`), just before it wakes the front: its
    /// `JoinHandle` says finished only once the thread has returned, a moment later, and a
    /// front that looked in between would sleep until its next timer (3 s into a drain).
    done: Arc<AtomicBool>,
    run: Run,
    /// A thread started ahead (`reserve`) that waits for this worker's server.
    reserved: Option<Reserved>,
}

/// A thread that waits for the server it is to run.
struct Reserved {
    handle: JoinHandle<Option<Server>>,
    server: Sender<Box<Server>>,
}

/// Tells the front that a worker's loop ended, when its thread leaves, by returning or by a
/// panic (whose pairs the unwinding resets): the done flag first, then the wake-up.
struct Ended {
    front: Arc<Waker>,
    done: Arc<AtomicBool>,
}

impl Drop for Ended {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        let _ = self.front.wake();
    }
}

enum Run {
    /// Built, or called back: its server waits here for a thread.
    Idle(Box<Server>),
    /// Its thread, which returns the server when its loop ends (`None`: a reserved thread
    /// that was never given one).
    Running(JoinHandle<Option<Server>>),
    /// Its thread ended (or died: the reason was logged).
    Finished,
}

impl Threads {
    /// The front's part, for `n` loops; `waker` wakes the front's loop (registered by the caller).
    pub(super) fn front(n: usize, waker: Waker) -> Threads {
        Threads {
            me: 0,
            loads: (0..n.max(1)).map(|_| AtomicUsize::new(0)).collect(),
            waker: Arc::new(waker),
            inbox: None,
            workers: Vec::new(),
        }
    }

    /// The part of worker loop `me`, whose `waker` is registered with its own poll; returns the
    /// front's way to give it orders.
    pub(super) fn worker(&self, me: usize, waker: Waker) -> (Threads, Link) {
        let (tx, rx) = mpsc::channel();
        let waker = Arc::new(waker);
        let nudged = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let threads = Threads {
            me,
            loads: self.loads.clone(),
            waker: waker.clone(),
            inbox: Some((rx, nudged.clone())),
            workers: Vec::new(),
        };
        (threads, Link { orders: tx, waker, nudged, done })
    }

    /// The front: adds a worker loop, to start with `start`.
    pub(super) fn add(&mut self, server: Server, link: Link) {
        let Link { orders, waker, nudged, done } = link;
        self.workers.push(Worker { orders, waker, nudged, done, run: Run::Idle(Box::new(server)), reserved: None });
    }

    pub(super) fn count(&self) -> usize {
        self.loads.len()
    }

    /// The loop a new pair goes to, counted as its from now on: the front while it serves at
    /// most `FRONT_SLACK` pairs more than the least loaded running worker (a pair it keeps costs
    /// no hand-off between threads: short connections mostly stay), else that worker.
    pub(super) fn pick(&self) -> usize {
        let load = |i: usize| self.loads[i].load(Ordering::Relaxed);
        let running = |i: usize| matches!(&self.workers[i - 1].run, Run::Running(h) if !h.is_finished());
        let least = (1..self.loads.len()).filter(|&i| running(i)).min_by_key(|&i| (load(i), i));
        let n = match least {
            Some(w) if load(self.me) > load(w) + FRONT_SLACK => w,
            _ => self.me,
        };
        self.loads[n].fetch_add(1, Ordering::Relaxed);
        n
    }

    /// Pair counted for loop `from` by `pick` is served by this loop instead.
    pub(super) fn took_back(&self, from: usize) {
        self.loads[from].fetch_sub(1, Ordering::Relaxed);
        self.loads[self.me].fetch_add(1, Ordering::Relaxed);
    }

    /// A pair of this loop's ended (or could not be spliced).
    pub(super) fn released(&self) {
        self.loads[self.me].fetch_sub(1, Ordering::Relaxed);
    }

    /// A pair handed over joined loop `n`.
    pub(super) fn adopted(&self, n: usize) {
        self.loads[n].fetch_add(1, Ordering::Relaxed);
    }

    /// Pairs of every loop.
    pub(super) fn pairs(&self) -> usize {
        self.loads.iter().map(|l| l.load(Ordering::Relaxed)).sum()
    }

    /// Sends pair `formed` to worker loop `n` (1..); gives it back if that loop is gone.
    pub(super) fn send(&self, n: usize, formed: Formed) -> Option<Formed> {
        let w = &self.workers[n - 1];
        match w.orders.send(Order::Pair(formed)) {
            Ok(()) => {
                if !w.nudged.swap(true, Ordering::AcqRel) {
                    let _ = w.waker.wake();
                }
                None
            }
            Err(mpsc::SendError(Order::Pair(f))) => Some(f),
            Err(_) => unreachable!("sent a pair"),
        }
    }

    /// Tells every running worker `order` (made anew for each).
    pub(super) fn tell(&self, order: impl Fn() -> Order) {
        for w in &self.workers {
            if matches!(w.run, Run::Running(_)) && w.orders.send(order()).is_ok() {
                w.nudged.store(true, Ordering::Release);
                let _ = w.waker.wake();
            }
        }
    }

    /// A worker: the next order, if one came.
    pub(super) fn next_order(&self) -> Option<Order> {
        let (inbox, nudged) = self.inbox.as_ref()?;
        // Cleared before looking: an order sent after this wakes the loop again.
        nudged.store(false, Ordering::Release);
        match inbox.try_recv() {
            Ok(order) => Some(order),
            Err(TryRecvError::Empty) => None,
            // The front is gone: nothing will come, finish what is here.
            Err(TryRecvError::Disconnected) => Some(Order::Drain(Instant::now())),
        }
    }

    /// The front, before the process says it listens: starts the thread of every idle worker,
    /// which waits for its server until `start`. A process that may have no more tasks
    /// (`pids.max`, `TasksMax=`, RLIMIT_NPROC) failed after "listening" and READY (a helper's
    /// resource-limits pass).
    pub(super) fn reserve(&mut self) -> io::Result<()> {
        for (i, w) in self.workers.iter_mut().enumerate() {
            if matches!(w.run, Run::Idle(_)) && w.reserved.is_none() {
                let (tx, rx) = mpsc::channel::<Box<Server>>();
                let (front, done) = (self.waker.clone(), w.done.clone());
                let handle = std::thread::Builder::new().name(format!("skrelay-{}", i + 1)).spawn(move || {
                    // Dropped unused (the process stopped before serving): nothing to tell.
                    let server = rx.recv().ok()?;
                    let _ended = Ended { front, done };
                    let mut server = *server;
                    server.serve();
                    Some(server)
                })?;
                w.reserved = Some(Reserved { handle, server: tx });
            }
        }
        Ok(())
    }

    /// The front: runs every idle worker's loop, in its reserved thread or a new one.
    pub(super) fn start(&mut self) -> io::Result<()> {
        self.reserve()?;
        for w in &mut self.workers {
            if let Run::Idle(_) = w.run {
                let Run::Idle(server) = std::mem::replace(&mut w.run, Run::Finished) else { unreachable!() };
                let Some(Reserved { handle, server: to }) = w.reserved.take() else { unreachable!("reserved") };
                w.done.store(false, Ordering::Release);
                // The thread waits in recv until this is sent or dropped.
                match to.send(server) {
                    Ok(()) => w.run = Run::Running(handle),
                    Err(mpsc::SendError(server)) => {
                        w.run = Run::Idle(server);
                        return Err(io::Error::other("an event loop's thread ended before it was started"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Every worker's loop has ended.
    pub(super) fn all_finished(&self) -> bool {
        self.workers.iter().all(|w| match &w.run {
            Run::Running(h) => w.done.load(Ordering::Acquire) || h.is_finished(),
            _ => true,
        })
    }

    /// The front: waits for every running worker's thread and keeps its server (idle again).
    pub(super) fn join(&mut self) {
        for (i, w) in self.workers.iter_mut().enumerate() {
            if let Run::Running(_) = w.run {
                let Run::Running(handle) = std::mem::replace(&mut w.run, Run::Finished) else { unreachable!() };
                match handle.join() {
                    Ok(Some(server)) => w.run = Run::Idle(Box::new(server)),
                    Ok(None) => {}
                    Err(_) => log::error!("event loop {} died; its pairs were reset", i + 1),
                }
            }
        }
    }

    /// The front, for `--takeover`: stops every worker's loop and takes its server back.
    pub(super) fn recall(&mut self) {
        self.tell(|| Order::Stop);
        self.join();
    }

    /// The servers of the idle workers, by loop index - 1.
    pub(super) fn idle(&mut self) -> impl Iterator<Item = &mut Server> {
        self.workers.iter_mut().filter_map(|w| match &mut w.run {
            Run::Idle(s) => Some(&mut **s),
            _ => None,
        })
    }

    /// The server of idle worker loop `n` (1..), to read.
    pub(super) fn idle_at_ref(&self, n: usize) -> Option<&Server> {
        match &self.workers.get(n.checked_sub(1)?)?.run {
            Run::Idle(s) => Some(&**s),
            _ => None,
        }
    }

    /// The server of idle worker loop `n` (1..).
    pub(super) fn idle_at(&mut self, n: usize) -> Option<&mut Server> {
        match &mut self.workers.get_mut(n.checked_sub(1)?)?.run {
            Run::Idle(s) => Some(&mut **s),
            _ => None,
        }
    }
}
