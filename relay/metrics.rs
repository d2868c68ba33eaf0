//! Prometheus metrics: the counters `relay` and `proxy` keep (`--metrics ADDR`), the exporter of
//! the pinned steer and accel counters (`skrelay metrics`), and the small HTTP responder that
//! serves either at `http://ADDR/metrics` in the Prometheus text format (version 0.0.4).
//!
//! The event loop only bumps atomics (`Metrics`); the responder runs in a thread of its own and
//! renders on each scrape, so a slow scraper never holds up a pair.
use crate::error::Error;
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};
use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// How a pair ended, as `skrelay_pairs_total{ending}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairEnd {
    /// Both directions finished with end of file.
    Eof,
    /// A client reset its connection, or an error cut the pair (its clients see a reset).
    Reset,
    /// `--idle-timeout` cut it: no byte moved either way for that long (its clients see a reset).
    Timeout,
    /// Cut at the drain timeout (or a second SIGTERM) while shutting down.
    Drain,
}

impl PairEnd {
    pub const ALL: [PairEnd; 4] = [PairEnd::Eof, PairEnd::Reset, PairEnd::Timeout, PairEnd::Drain];

    pub fn label(self) -> &'static str {
        match self {
            PairEnd::Eof => "eof",
            PairEnd::Reset => "reset",
            PairEnd::Timeout => "timeout",
            PairEnd::Drain => "drain",
        }
    }
}

/// Why a client ended before its pair formed, as `skrelay_unpaired_clients_total{reason}`
/// counts it (the log line of each says the same in words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpaired {
    /// Reset at once: `--max-pending` clients already waited (or were sending their token line).
    Full,
    /// Reset at `--pair-timeout`: no partner, or no whole token line, in time.
    Timeout,
    /// Reset: its first line was no token line.
    BadToken,
    /// It closed or reset its connection before a partner came.
    Left,
    /// `proxy`: reset, no upstream could be reached (each refused, failed or timed out).
    NoUpstream,
    /// Reset: skrelay stopped (SIGTERM, SIGINT) while it waited.
    Shutdown,
    /// `proxy`: reset, it was this proxy's own upstream connection (the upstream leads back).
    Loop,
    /// skrelay could not watch it, or its pair's datapath could not splice the pair (both
    /// clients count; they see a reset).
    Error,
}

impl Unpaired {
    pub const ALL: [Unpaired; 8] = [
        Unpaired::Full,
        Unpaired::Timeout,
        Unpaired::BadToken,
        Unpaired::Left,
        Unpaired::NoUpstream,
        Unpaired::Shutdown,
        Unpaired::Loop,
        Unpaired::Error,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Unpaired::Full => "full",
            Unpaired::Timeout => "timeout",
            Unpaired::BadToken => "bad_token",
            Unpaired::Left => "left",
            Unpaired::NoUpstream => "no_upstream",
            Unpaired::Shutdown => "shutdown",
            Unpaired::Loop => "loop",
            Unpaired::Error => "error",
        }
    }
}

/// Reads a value at scrape time, from the responder's thread.
pub type Sampler = Box<dyn Fn() -> u64 + Send + Sync>;

type Label = [(&'static str, &'static str); 1];
type EndLabels = [(&'static str, &'static str); 2];
type UpstreamLabel = [(&'static str, String); 1];
type PathLabel = [(&'static str, &'static str); 1];
type ReasonLabel = [(&'static str, &'static str); 1];

struct Inner {
    registry: Registry,
    pairs_active: Family<Label, Gauge>,
    pairs_total: Family<EndLabels, Counter>,
    bytes_total: Family<Label, Counter>,
    paths_total: Family<PathLabel, Counter>,
    kernel_inflight: Gauge,
    /// Each thread's part of `kernel_inflight` (`--threads`: one datapath per event loop).
    inflight_by_thread: Mutex<Vec<u64>>,
    held: Gauge,
    /// Each thread's part of `held`.
    held_by_thread: Mutex<Vec<u64>>,
    /// The metrics are served (`start`): only then do the event loops read what their pairs
    /// hold (two TCP_INFO reads a pair a second).
    served: AtomicBool,
    pending: Gauge,
    unpaired: Family<ReasonLabel, Counter>,
    /// Pairs each event loop serves now (`--threads`).
    loop_pairs: Family<UpstreamLabel, Gauge>,
    upstream_up: Family<UpstreamLabel, Gauge>,
    upstream_failures: Family<UpstreamLabel, Counter>,
    /// Log lines dropped because standard error did not take them (`log_sink`), read at each scrape.
    log_dropped: Counter,
    /// The kernel datapath's in-flight bytes, read at each scrape (see `set_inflight_sampler`).
    inflight_sampler: Mutex<Option<Sampler>>,
    /// Set when the responder is to stop (`stop_serving`).
    stop: Arc<AtomicBool>,
    /// The datapath labels of `pairs_total` and `bytes_total` (`summary`).
    datapaths: Vec<&'static str>,
}

/// The counters of one `relay` or `proxy` process. Cheap to clone (one `Arc`); every update is
/// an atomic operation, so the event loop can call these on every pair.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Metrics {
    /// The counters of a process whose pairs go to `datapaths` (the datapath it opened, and
    /// `userspace`, where a kernel datapath whose socket map is full sends further pairs). Every
    /// label combination is exported from the start, at 0.
    pub fn new(datapaths: &[&'static str]) -> Metrics {
        let mut registry = Registry::default();
        registry.register(
            "skrelay_build",
            "skrelay version of this process",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        let pairs_active = Family::<Label, Gauge>::default();
        let pairs_total = Family::<EndLabels, Counter>::default();
        let bytes_total = Family::<Label, Counter>::default();
        let paths_total = Family::<PathLabel, Counter>::default();
        let kernel_inflight = Gauge::default();
        let held = Gauge::default();
        let pending = Gauge::default();
        let unpaired = Family::<ReasonLabel, Counter>::default();
        let loop_pairs = Family::<UpstreamLabel, Gauge>::default();
        let upstream_up = Family::<UpstreamLabel, Gauge>::default();
        let upstream_failures = Family::<UpstreamLabel, Counter>::default();
        registry.register("skrelay_pairs_active", "Pairs being spliced now, by datapath", pairs_active.clone());
        registry.register(
            "skrelay_pairs",
            "Pairs that ended, by datapath and how they ended (eof, reset, timeout, drain)",
            pairs_total.clone(),
        );
        registry.register(
            "skrelay_bytes",
            "Payload bytes delivered by pairs that ended (both directions), by datapath",
            bytes_total.clone(),
        );
        registry.register(
            "skrelay_pair_paths",
            "Pairs that ended, by the path that carried them at the end, as the end-of-pair log line names it \
             (kernel; kernel, after a userspace start; userspace, below --kernel-after; ...)",
            paths_total.clone(),
        );
        registry.register(
            "skrelay_kernel_inflight_bytes",
            "Bytes the kernel datapath holds in flight between the sockets of its pairs: taken from one socket and not \
             yet in the other's send queue, plus what was moved into a partner's raised send queue while it did not read \
             (0 until the datapath reports it)",
            kernel_inflight.clone(),
        );
        registry.register(
            "skrelay_held_bytes",
            "Bytes of the pairs' streams inside this host: received from one client and not yet acknowledged by the \
             other (receive queues, the datapath, send queues), read once a second",
            held.clone(),
        );
        registry.register(
            "skrelay_pending_clients",
            "Clients waiting for their token line, their partner (relay) or their upstream connection (proxy)",
            pending.clone(),
        );
        registry.register(
            "skrelay_unpaired_clients",
            "Clients that ended before their pair formed, by reason (full: --max-pending; timeout: --pair-timeout; \
             bad_token; left: the client closed or reset; no_upstream; shutdown; loop: the proxy's own connection; error)",
            unpaired.clone(),
        );
        for why in Unpaired::ALL {
            let _ = unpaired.get_or_create(&[("reason", why.label())]);
        }
        registry.register(
            "skrelay_loop_pairs",
            "Pairs each event loop serves now (--threads; loop 0 also accepts and pairs clients)",
            loop_pairs.clone(),
        );
        registry.register(
            "skrelay_upstream_up",
            "proxy: 1 if the last connect to this upstream succeeded (or none was tried yet), 0 if it failed",
            upstream_up.clone(),
        );
        registry.register(
            "skrelay_upstream_connect_failures",
            "proxy: connects to this upstream that were refused, failed or timed out",
            upstream_failures.clone(),
        );
        let log_dropped = Counter::default();
        registry.register(
            "skrelay_log_lines_dropped",
            "Log lines dropped because standard error did not take them as fast as they came (the process never \
             waits for its log)",
            log_dropped.clone(),
        );
        for &dp in datapaths {
            let _ = pairs_active.get_or_create(&[("datapath", dp)]);
            let _ = bytes_total.get_or_create(&[("datapath", dp)]);
            for end in PairEnd::ALL {
                let _ = pairs_total.get_or_create(&[("datapath", dp), ("ending", end.label())]);
            }
        }
        Metrics {
            inner: Arc::new(Inner {
                registry,
                pairs_active,
                pairs_total,
                bytes_total,
                paths_total,
                kernel_inflight,
                inflight_by_thread: Mutex::new(Vec::new()),
                held,
                held_by_thread: Mutex::new(Vec::new()),
                served: AtomicBool::new(false),
                pending,
                unpaired,
                loop_pairs,
                upstream_up,
                upstream_failures,
                log_dropped,
                inflight_sampler: Mutex::new(None),
                stop: Arc::new(AtomicBool::new(false)),
                datapaths: datapaths.to_vec(),
            }),
        }
    }

    /// A pair started on `datapath`: counted active until the returned handle ends or drops.
    pub fn pair_started(&self, datapath: &'static str) -> PairMetric {
        self.inner.pairs_active.get_or_create(&[("datapath", datapath)]).inc();
        PairMetric { metrics: self.clone(), datapath, ended: false }
    }

    /// A pair ended on `path` (the datapath's description of how it carried the pair at the end).
    pub fn pair_path(&self, path: &'static str) {
        self.inner.paths_total.get_or_create(&[("path", path)]).inc();
    }

    /// What the process served, for its last log line: pairs by ending, bytes delivered, clients
    /// that never paired. An operator who stops it had to scrape `/metrics` just before, or add up
    /// the end-of-pair lines, to know (a helper's soak pass).
    pub fn summary(&self) -> String {
        let m = &self.inner;
        let ended = |end: PairEnd| -> u64 {
            m.datapaths
                .iter()
                .map(|&dp| m.pairs_total.get_or_create(&[("datapath", dp), ("ending", end.label())]).get())
                .sum()
        };
        let counts: Vec<u64> = PairEnd::ALL.iter().map(|&e| ended(e)).collect();
        let pairs: u64 = counts.iter().sum();
        let bytes: u64 = m.datapaths.iter().map(|&dp| m.bytes_total.get_or_create(&[("datapath", dp)]).get()).sum();
        let unpaired: u64 =
            Unpaired::ALL.iter().map(|w| m.unpaired.get_or_create(&[("reason", w.label())]).get()).sum();
        let endings: Vec<String> =
            PairEnd::ALL.iter().zip(&counts).map(|(e, n)| format!("{n} {}", e.label())).collect();
        format!(
            "{pairs} pair(s) ended ({}), {bytes} bytes delivered; {unpaired} client(s) ended before a pair formed",
            endings.join(", ")
        )
    }

    /// Clients waiting now (token line, partner or upstream connection).
    pub fn set_pending(&self, n: usize) {
        self.inner.pending.set(n as i64);
    }

    /// A client ended before its pair formed, for `why`.
    pub fn client_unpaired(&self, why: Unpaired) {
        self.inner.unpaired.get_or_create(&[("reason", why.label())]).inc();
    }

    /// Event loop `n` serves `pairs` pairs now.
    pub fn set_loop_pairs(&self, n: usize, pairs: usize) {
        self.inner.loop_pairs.get_or_create(&[("loop", n.to_string())]).set(pairs as i64);
    }

    /// `proxy`: exports `upstream` (up, no failures) before any client comes.
    pub fn upstream_known(&self, upstream: SocketAddr) {
        let label = [("upstream", upstream.to_string())];
        self.inner.upstream_up.get_or_create(&label).set(1);
        let _ = self.inner.upstream_failures.get_or_create(&label);
    }

    /// `proxy`: a connect to `upstream` succeeded (`true`) or failed.
    pub fn upstream_connected(&self, upstream: SocketAddr, ok: bool) {
        let label = [("upstream", upstream.to_string())];
        self.inner.upstream_up.get_or_create(&label).set(i64::from(ok));
        if !ok {
            self.inner.upstream_failures.get_or_create(&label).inc();
        }
    }

    /// The hook for the kernel datapath's in-flight accounting: `sampler` is called on each
    /// scrape (from the responder's thread) and its value exported as
    /// `skrelay_kernel_inflight_bytes`. Without one the gauge reads 0.
    pub fn set_inflight_sampler(&self, sampler: Option<Sampler>) {
        *self.inner.inflight_sampler.lock().unwrap_or_else(|e| e.into_inner()) = sampler;
    }

    /// Sets event loop `thread`'s part of `skrelay_kernel_inflight_bytes` (each loop calls this
    /// about once a second while it has pairs).
    pub fn set_kernel_inflight(&self, thread: usize, bytes: u64) {
        set_part(&self.inner.inflight_by_thread, &self.inner.kernel_inflight, thread, bytes);
    }

    /// Sets event loop `thread`'s part of `skrelay_held_bytes` (each loop calls this about once
    /// a second while it has pairs and the metrics are served).
    pub fn set_held(&self, thread: usize, bytes: u64) {
        set_part(&self.inner.held_by_thread, &self.inner.held, thread, bytes);
    }

    /// True once the metrics are served (`start`).
    pub fn served(&self) -> bool {
        self.inner.served.load(Ordering::Relaxed)
    }

    /// Stops answering scrapes (within `ACCEPT_WAKE`): the process that took this one over
    /// serves the metrics socket from now on.
    pub fn stop_serving(&self) {
        self.inner.stop.store(true, Ordering::Relaxed);
    }

    /// The exposition text of every metric, as served at /metrics.
    pub fn render(&self) -> String {
        if let Some(sample) = self.inner.inflight_sampler.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            self.inner.kernel_inflight.set(i64::try_from(sample()).unwrap_or(i64::MAX));
        }
        let dropped = &self.inner.log_dropped;
        dropped.inc_by(crate::log_sink::dropped_total().saturating_sub(dropped.get()));
        encode(&self.inner.registry)
    }
}

/// One pair's place in the counters: active while it lives; `end` counts how it ended and what
/// it moved. Dropped without `end` (a pair that could not be watched), it counts as a reset.
pub struct PairMetric {
    metrics: Metrics,
    datapath: &'static str,
    ended: bool,
}

impl PairMetric {
    /// The pair is carried by `datapath` now: a kernel-datapath pair whose join found the socket
    /// maps or `--kernel-memory` full stays on splice(2) and counts as `userspace` (it counted as
    /// `kernel` to its end: 22 pairs active on `kernel` with 6 in the maps; a re-check pass),
    /// and as `kernel` again once a later try joins.
    pub fn move_to(&mut self, datapath: &'static str) {
        if self.ended || self.datapath == datapath {
            return;
        }
        let m = &self.metrics.inner;
        m.pairs_active.get_or_create(&[("datapath", self.datapath)]).dec();
        m.pairs_active.get_or_create(&[("datapath", datapath)]).inc();
        self.datapath = datapath;
    }

    /// The pair ended `how`, having delivered `bytes` (both directions together).
    pub fn end(&mut self, how: PairEnd, bytes: u64) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let m = &self.metrics.inner;
        m.pairs_active.get_or_create(&[("datapath", self.datapath)]).dec();
        m.pairs_total.get_or_create(&[("datapath", self.datapath), ("ending", how.label())]).inc();
        m.bytes_total.get_or_create(&[("datapath", self.datapath)]).inc_by(bytes);
    }
}

impl Drop for PairMetric {
    fn drop(&mut self) {
        self.end(PairEnd::Reset, 0);
    }
}

/// The registry in the Prometheus text format, each metric's samples sorted by their labels
/// (the crate writes a family in hash order, which changes from scrape to scrape).
fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail; the encoder only reports the writer's errors.
    let _ = prometheus_text::encode(&mut text, registry);
    let mut out = String::with_capacity(text.len());
    let mut samples: Vec<&str> = Vec::new();
    let flush = |samples: &mut Vec<&str>, out: &mut String| {
        samples.sort_unstable();
        for s in samples.drain(..) {
            out.push_str(s);
            out.push('\n');
        }
    };
    for line in text.lines() {
        if line.starts_with('#') {
            flush(&mut samples, &mut out);
            out.push_str(line);
            out.push('\n');
        } else {
            samples.push(line);
        }
    }
    flush(&mut samples, &mut out);
    out
}

/// `skrelay metrics`: the pinned steer and accel counters of this network namespace, read (never
/// created) at each scrape through the same code as `skrelay status --json`.
pub fn pinned_exposition() -> Result<String, Error> {
    // Steer and accel only: `status`'s relays section (every process's descriptors, and a 1 s
    // question to each relay's --metrics) cost a helper's scrapes 1 s per frozen relay, and
    // nothing of it is exported.
    let (steer, accel) = (crate::steer::status()?.json(), crate::accel::reports()?.json());
    // State this user may not read would be exported as if it had no bindings or cgroups (an
    // alert on a gone target would never fire): an error, as `status` says it.
    let unreadable = |what: &str, pins: &serde_json::Value| {
        Error::Usage(format!(
            "cannot read the pinned {what} state at {}: permission denied (run `skrelay metrics` as root)",
            pins.as_str().unwrap_or("?")
        ))
    };
    if let Some(why) = accel["out_of_reach"].as_str() {
        return Err(Error::Usage(format!(
            "cannot read skrelay's pinned state: {why} (run `skrelay metrics` {})",
            crate::bpffs::run_as()
        )));
    }
    if !steer["unreadable"].is_null() {
        return Err(unreadable("steer", &steer["unreadable"]["pins"]));
    }
    if let Some(u) = accel["unreadable"].as_array().and_then(|u| u.iter().find(|u| u["error"] == "permission denied")) {
        return Err(unreadable("accel", &u["pins"]));
    }
    Ok(pinned_from_status(&steer, &accel))
}

/// Builds the exposition from `skrelay status --json`'s `steer` and `accel` objects.
pub fn pinned_from_status(steer: &serde_json::Value, accel: &serde_json::Value) -> String {
    type Labels = Vec<(&'static str, String)>;
    let mut registry = Registry::default();
    registry.register(
        "skrelay_build",
        "skrelay version of this exporter",
        Info::new([("version", env!("CARGO_PKG_VERSION"))]),
    );
    let str_of = |v: &serde_json::Value, k: &str| match &v[k] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    };
    let u64_of = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    let list = |v: &serde_json::Value, k: &str| v[k].as_array().cloned().unwrap_or_default();
    // A dual-stack funnel's prefixes, comma-separated (`::/0,0.0.0.0/0`): its hits are for both.
    let prefixes_of = |f: &serde_json::Value| {
        let all: Vec<String> = list(f, "prefixes").iter().map(|p| p.as_str().unwrap_or_default().to_string()).collect();
        if all.is_empty() {
            str_of(f, "prefix")
        } else {
            all.join(",")
        }
    };

    let attached = Gauge::<i64>::default();
    attached.set(i64::from(steer["attached"].as_bool().unwrap_or(false)));
    registry.register("skrelay_steer_attached", "1 if a steering program or --ports funnel is attached", attached);
    let hits = Family::<Labels, Counter>::default();
    let refused = Family::<Labels, Counter>::default();
    let alive = Family::<Labels, Gauge>::default();
    let listening = Family::<Labels, Gauge>::default();
    for b in list(steer, "bindings") {
        let labels: Labels = vec![
            ("proto", str_of(&b, "proto")),
            ("prefix", str_of(&b, "prefix")),
            ("ports", str_of(&b, "ports")),
            ("target", str_of(&b["target"], "local")),
        ];
        hits.get_or_create(&labels).inc_by(u64_of(&b, "hits"));
        refused.get_or_create(&labels).inc_by(u64_of(&b, "refused"));
        alive.get_or_create(&labels).set(i64::from(b["target"]["alive"].as_bool().unwrap_or(false)));
        let takes =
            b["target"]["alive"].as_bool().unwrap_or(false) && b["target"]["listening"].as_bool().unwrap_or(false);
        listening.get_or_create(&labels).set(i64::from(takes));
    }
    registry.register(
        "skrelay_steer_hits",
        "Lookups answered with the binding's target: each SYN (a retransmitted one again) and UDP datagram",
        hits,
    );
    registry.register(
        "skrelay_steer_refused",
        "Lookups for the binding refused (dropped) because its target socket was gone or took nothing",
        refused,
    );
    registry.register("skrelay_steer_target_alive", "1 if the binding's target socket still exists", alive);
    registry.register(
        "skrelay_steer_target_listening",
        "1 if the binding's target takes what is steered to it (TCP: listening; UDP: not connected); 0: it refuses all",
        listening,
    );
    let funnel_hits = Family::<Labels, Counter>::default();
    for f in list(steer, "funnels") {
        let labels: Labels =
            vec![("pid", str_of(&f, "pid")), ("prefix", prefixes_of(&f)), ("ports", str_of(&f, "ports"))];
        funnel_hits.get_or_create(&labels).inc_by(u64_of(&f, "hits"));
    }
    registry.register(
        "skrelay_steer_funnel_hits",
        "Lookups (each SYN, a retransmitted one again) a running relay's or proxy's --ports steered to its listener",
        funnel_hits,
    );

    let accel_counters = [
        ("connections", "skrelay_accel_connections", "Accelerated connections"),
        ("messages", "skrelay_accel_messages", "Writes redirected between accelerated sockets"),
        ("bytes", "skrelay_accel_bytes", "Bytes redirected between accelerated sockets"),
        (
            "fallbacks",
            "skrelay_accel_fallbacks",
            "Writes of joined sockets whose peer was not in the map: sent by plain TCP",
        ),
        ("left", "skrelay_accel_sockets_left", "Sockets that left the redirect map for plain TCP for good"),
    ];
    let families: Vec<Family<Labels, Counter>> = accel_counters.iter().map(|_| Family::default()).collect();
    let open = Family::<Labels, Gauge>::default();
    let accelerating = Family::<Labels, Gauge>::default();
    let cgroups = list(accel, "cgroups");
    for c in &cgroups {
        let labels: Labels = vec![("cgroup", str_of(c, "cgroup"))];
        for ((key, _, _), family) in accel_counters.iter().zip(&families) {
            family.get_or_create(&labels).inc_by(u64_of(c, key));
        }
        open.get_or_create(&labels).set(i64::try_from(u64_of(c, "sockets_open")).unwrap_or(i64::MAX));
        // "attached" is false when draining or stale (the cgroup made again, the link detached).
        let on = c["attached"].as_bool() == Some(true) && c["cgroup_gone"].as_bool() != Some(true);
        accelerating.get_or_create(&labels).set(i64::from(on));
    }
    for ((_, name, help), family) in accel_counters.iter().zip(families) {
        registry.register(*name, *help, family);
    }
    registry.register("skrelay_accel_sockets_open", "Sockets in the cgroup's redirect map now", open);
    // A stale set-up scraped as an idle healthy one (a re-check pass).
    registry.register(
        "skrelay_accel_accelerating",
        "1 while new connections in the cgroup are accelerated; 0 when it is draining after accel off, its directory \
         is gone, or it was made again or its sockops link detached (see skrelay status)",
        accelerating,
    );
    let unreadable = Gauge::<i64>::default();
    unreadable.set(list(accel, "unreadable").len() as i64);
    registry.register(
        "skrelay_accel_unreadable",
        "Accel states this skrelay cannot read (pinned by another version: see skrelay status)",
        unreadable,
    );
    encode(&registry)
}

/// The labels a process's pairs can carry: the datapath it opened, and `userspace` (where a
/// kernel datapath whose socket map is full sends further pairs).
pub fn datapath_labels(opened: &'static str) -> Vec<&'static str> {
    if opened == "userspace" {
        vec![opened]
    } else {
        vec![opened, "userspace"]
    }
}

/// `--metrics ADDR` of `relay` and `proxy`: binds ADDR and serves `metrics` there from a thread
/// of its own; returns the address bound (port 0 picks one). None: nothing to serve.
/// `taken`: the metrics socket of a process this one takes over (`--takeover`), served instead
/// of binding ADDR when it is bound there (or ADDR's port is 0).
pub fn start(
    addr: Option<SocketAddr>,
    metrics: &Metrics,
    taken: Option<TcpListener>,
) -> Result<Option<SocketAddr>, Error> {
    let Some(addr) = addr else { return Ok(None) };
    let taken = taken.filter(|l| l.local_addr().is_ok_and(|a| a == addr || (addr.port() == 0 && a.ip() == addr.ip())));
    let listener = match taken {
        Some(l) => l,
        None => bind(addr, "--metrics")?,
    };
    let bound = listener.local_addr().unwrap_or(addr);
    metrics.inner.served.store(true, Ordering::Relaxed);
    let m = metrics.clone();
    let stop = metrics.inner.stop.clone();
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || serve(&listener, move || Ok(m.render()), Spare::Keep, &stop))
        .map_err(|e| Error::io("cannot start the metrics thread", e))?;
    Ok(Some(bound))
}

/// Sets `thread`'s part of a gauge that sums the event loops' parts.
fn set_part(parts: &Mutex<Vec<u64>>, gauge: &Gauge, thread: usize, bytes: u64) {
    let mut parts = parts.lock().unwrap_or_else(|e| e.into_inner());
    if parts.len() <= thread {
        parts.resize(thread + 1, 0);
    }
    parts[thread] = bytes;
    let total: u64 = parts.iter().sum();
    gauge.set(i64::try_from(total).unwrap_or(i64::MAX));
}

/// `skrelay metrics --listen ADDR`: serves the pinned steer and accel counters until SIGINT or
/// SIGTERM, then returns (exit 0, as `relay` and `proxy` do). The first reading happens before
/// binding, so a state that cannot be read is refused at once.
pub fn run(args: crate::cli::MetricsArgs) -> Result<(), Error> {
    pinned_exposition()?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).map_err(|e| Error::io("cannot handle signals", e))?;
    }
    let listener = bind(args.listen, "--listen")?;
    let bound = listener.local_addr().unwrap_or(args.listen);
    log::info!("serving the pinned steer and accel counters at http://{bound}/metrics");
    // Its rendering opens the pinned maps (about 6 descriptors): a spare held would be one they
    // lack (a re-check pass: 500 under a limit of 12 that answered before), and no clients
    // compete with it for descriptors.
    serve(&listener, || pinned_exposition().map_err(|e| format!("skrelay: {e}")), Spare::None, &stop);
    log::info!("stopped");
    Ok(())
}

/// Binds the metrics listener (`--metrics ADDR`, `skrelay metrics --listen ADDR`).
pub fn bind(addr: SocketAddr, flag: &'static str) -> Result<TcpListener, Error> {
    let listener = TcpListener::bind(addr).map_err(|source| Error::MetricsListen { addr, flag, source })?;
    crate::relay_cmd::warn_if_taken_away(listener.local_addr().unwrap_or(addr), flag);
    Ok(listener)
}

/// How long the responder waits for a scrape before it looks whether it was told to stop.
const ACCEPT_WAKE: Duration = Duration::from_millis(200);

/// How often a scrape that cannot be accepted is said.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

/// How long one scraper may take to send its request and read the answer, from its accept.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest request head read; a longer one is answered 431.
const MAX_REQUEST: usize = 8 << 10;
/// Connections held at once: one more closes the oldest. Served one at a time, each silent
/// connection held the next scrape back by IO_TIMEOUT (20 of them: 40 s; a helper's leak pass);
/// now they wait side by side, and a scraper is answered as soon as its request is in (in the
/// loop's turn that accepts the next one). Few: in a descriptor shortage each is one a client
/// cannot have.
const MAX_HELD: usize = 4;

/// Whether the responder keeps a descriptor for a scrape (`serve`): where clients compete for
/// descriptors (relay, proxy), and its rendering needs none.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Spare {
    Keep,
    None,
}

/// A scraper's connection: its request so far, then the answer left to send.
struct Held {
    stream: TcpStream,
    /// The scraper's address (no port): the address holding the most connections gives one up
    /// first (`evictee`).
    peer: std::net::IpAddr,
    since: Instant,
    head: Vec<u8>,
    answer: Option<(Vec<u8>, usize)>,
}

/// Answers the connections to `listener`, forever: GET or HEAD /metrics gets `render`'s text
/// (500 with its error if it fails), anything else 404 or 405 (400 if not HTTP). Up to
/// `MAX_HELD` connections are served side by side, each for `IO_TIMEOUT` at most from its accept,
/// one request each. Returns once `stop` is set (within `ACCEPT_WAKE`), leaving the socket to
/// whoever else holds it.
pub fn serve(listener: &TcpListener, render: impl Fn() -> Result<String, String>, spare_fd: Spare, stop: &AtomicBool) {
    // The socket stays blocking (a process taking it over shares its flags); SO_RCVTIMEO bounds
    // an accept(2) that finds the connection already taken by that other process.
    let wake = socket2::SockRef::from(listener).set_read_timeout(Some(ACCEPT_WAKE));
    // A failing accept(2) (out of descriptors) is said once per ACCEPT_WARN_EVERY, not per retry.
    let mut warned: Option<(Instant, u64)> = None;
    let mut held: Vec<Held> = Vec::new();
    // One descriptor kept for a scrape (`Spare::Keep`): clients that took every other one stopped the metrics
    // (and `status`, which reads them) for as long as they stayed (a helper's operations pass),
    // just when an operator needs them. It is given up for the accept(2) that finds none left,
    // and taken again once one is free.
    let mut spare: Option<std::fs::File> = None;
    while !stop.load(Ordering::Relaxed) {
        if spare.is_none() && spare_fd == Spare::Keep {
            spare = std::fs::File::open("/dev/null").ok();
        }
        let now = Instant::now();
        held.retain(|h| now.duration_since(h.since) < IO_TIMEOUT);
        // Wait in poll(2), not in accept(2): a blocking accept(2) reserves a descriptor while it
        // waits, and in a shortage that was the one a closing pair had just given back, so
        // clients could not be accepted while the process was idle.
        let (waiting, ready) = wait(listener, &held);
        for i in ready.into_iter().rev() {
            if !progress(&mut held[i], &render) {
                held.remove(i);
            }
        }
        if !waiting {
            continue;
        }
        let mut accepted = listener.accept();
        if matches!(&accepted, Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)))
            && spare.take().is_some()
        {
            accepted = listener.accept();
        }
        match accepted {
            Ok((stream, from)) => {
                if stream.set_nonblocking(true).is_ok() {
                    let mut h = Held {
                        stream,
                        peer: from.ip(),
                        since: Instant::now(),
                        head: Vec::with_capacity(512),
                        answer: None,
                    };
                    // A scraper's request is often in by the time it is accepted: answered now,
                    // it needs no place among the held.
                    if progress(&mut h, &render) {
                        held.push(h);
                        if held.len() > MAX_HELD {
                            // A request may be in that the loop has not read yet (it accepts
                            // first): read each silent one's before choosing.
                            for i in (0..held.len()).rev() {
                                if held[i].head.is_empty() && !progress(&mut held[i], &render) {
                                    held.remove(i);
                                }
                            }
                        }
                        if held.len() > MAX_HELD {
                            held.remove(evictee(&held));
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if wake.is_ok() && matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                match &mut warned {
                    Some((at, more)) if at.elapsed() < ACCEPT_WARN_EVERY => *more += 1,
                    _ => {
                        let more = warned.map_or(0, |(_, more)| more);
                        let since = if more > 0 {
                            format!("; {more} more failed since the last warning")
                        } else {
                            String::new()
                        };
                        log::warn!(
                            "metrics: cannot accept a scrape: {e} (retrying every 100ms, said once per \
                             {ACCEPT_WARN_EVERY:?}{since})"
                        );
                        warned = Some((Instant::now(), 0));
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Which of `held` (more than `MAX_HELD`, the newest last) to close for the newest. Among the
/// connections of the address that holds the most (all of them when no address holds more than
/// one): the oldest one other than the newest that has sent nothing, else the oldest whose
/// request is not complete, else the oldest. A flood of connections that send nothing (6,500 a
/// second in a helper's pass closed 23 of 94 scrapes unanswered) then closes its own
/// connections, not a scraper's that is under way; the newest, whose request may simply not be
/// in yet, is not the one closed because it sent nothing (four connections holding half a request
/// each closed 7 of 12 scrapes so: a bounds pass); and connections from one address do not
/// close a scraper's from another (the same four, reconnecting as soon as they were closed,
/// still closed up to half the scrapes from their own address: a re-check).
fn evictee(held: &[Held]) -> usize {
    let from = |h: &Held| held.iter().filter(|o| o.peer == h.peer).count();
    let most = held.iter().map(from).max().unwrap_or(0);
    let group: Vec<usize> = (0..held.len()).filter(|&i| most <= 1 || from(&held[i]) == most).collect();
    let newest = held.len().saturating_sub(1);
    group
        .iter()
        .copied()
        .find(|&i| i != newest && held[i].head.is_empty() && held[i].answer.is_none())
        .or_else(|| group.iter().copied().find(|&i| held[i].answer.is_none()))
        .unwrap_or(group.first().copied().unwrap_or(0))
}

/// Waits at most `ACCEPT_WAKE` (or until the oldest held connection's time is up) for a
/// connection on `listener` or for one of `held` to be readable (writable once it has an
/// answer). Returns whether `listener` has one (or poll(2) failed, so accept(2) should say why),
/// and which of `held` are ready.
fn wait(listener: &TcpListener, held: &[Held]) -> (bool, Vec<usize>) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = vec![PollFd::new(listener, PollFlags::IN)];
    for h in held {
        let want = if h.answer.is_some() { PollFlags::OUT } else { PollFlags::IN };
        fds.push(PollFd::new(&h.stream, want));
    }
    let until = held.iter().map(|h| (h.since + IO_TIMEOUT).saturating_duration_since(Instant::now())).min();
    let timeout = until.map_or(ACCEPT_WAKE, |u| u.min(ACCEPT_WAKE));
    let timeout = Timespec { tv_sec: 0, tv_nsec: timeout.as_nanos() as _ };
    match poll(&mut fds, Some(&timeout)) {
        Ok(0) => (false, vec![]),
        Ok(_) => (
            !fds[0].revents().is_empty(),
            fds[1..].iter().enumerate().filter(|(_, f)| !f.revents().is_empty()).map(|(i, _)| i).collect(),
        ),
        Err(rustix::io::Errno::INTR) => (false, vec![]),
        Err(_) => (true, vec![]),
    }
}

/// Reads what `h` sent, or sends what is left of its answer; false once it is done with (answered,
/// closed, or failed).
fn progress(h: &mut Held, render: &impl Fn() -> Result<String, String>) -> bool {
    if h.answer.is_none() {
        let mut buf = [0u8; 1024];
        let mut ended = false;
        loop {
            match h.stream.read(&mut buf) {
                // A scraper may end its side once its request is sent (`printf ... | nc -N`).
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(n) => h.head.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("metrics: {e}");
                    return false;
                }
            }
            if h.head.len() >= MAX_REQUEST {
                break;
            }
        }
        let complete = head_complete(&h.head);
        if !complete && h.head.len() < MAX_REQUEST {
            // Closed before a whole request came: nothing to answer.
            return !ended;
        }
        h.answer = Some((answer(&h.head, render), 0));
    }
    let Some((out, sent)) = &mut h.answer else { return false };
    while *sent < out.len() {
        match h.stream.write(&out[*sent..]) {
            Ok(n) => *sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::debug!("metrics: {e}");
                return false;
            }
        }
    }
    false
}

/// A request head without the empty lines a client may send before it (RFC 9112 2.2: a server
/// should ignore at least one).
fn without_leading_lines(head: &[u8]) -> &[u8] {
    let start = head.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(head.len());
    &head[start..]
}

/// Whether a request head has come in whole (its empty line).
fn head_complete(head: &[u8]) -> bool {
    let head = without_leading_lines(head);
    head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
}

/// The answer to a request whose head is `head` (complete, or `MAX_REQUEST` long).
fn answer(head: &[u8], render: &impl Fn() -> Result<String, String>) -> Vec<u8> {
    if !head_complete(head) {
        return response("431 Request Header Fields Too Large", "text/plain", "request too large\n", true);
    }
    let line = without_leading_lines(head).split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, target, version) =
        (words.next().unwrap_or(""), words.next().unwrap_or(""), words.next().unwrap_or(""));
    // Not a request line (METHOD TARGET HTTP/x): nothing to answer but 400.
    if !version.starts_with("HTTP/") || words.next().is_some() {
        return response("400 Bad Request", "text/plain", "use GET /metrics\n", true);
    }
    // The absolute form a client sends to a proxy (RFC 9112 3.2.2), which a server must take too.
    let target = match target.split_once("://") {
        // The authority ends at the first '/', '?' or '#'; without a '/' the path is empty.
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => match rest.find(['/', '?', '#']) {
            Some(at) if rest[at..].starts_with('/') => &rest[at..],
            _ => "/",
        },
        _ => target,
    };
    let path = target.split('?').next().unwrap_or("");
    let body_too = method != "HEAD";
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => match render() {
            Ok(text) => response("200 OK", CONTENT_TYPE, &text, body_too),
            Err(why) => response("500 Internal Server Error", "text/plain", &format!("{why}\n"), body_too),
        },
        ("GET" | "HEAD", _) => {
            response("404 Not Found", "text/plain", "skrelay serves its metrics at /metrics\n", body_too)
        }
        _ => response("405 Method Not Allowed", "text/plain", "use GET /metrics\n", true),
    }
}

/// The response header that names the process that answered.
pub const PID_HEADER: &str = "X-Skrelay-Pid";

fn response(status: &str, content_type: &str, body: &str, with_body: bool) -> Vec<u8> {
    // A 405 names the methods there are (RFC 9110 15.5.6).
    let allow = if status.starts_with("405") { "Allow: GET, HEAD\r\n" } else { "" };
    // Which process answered: during a --takeover both accept on the one metrics socket, and
    // `status` showed one's numbers under the other (an operator's pass).
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}{PID_HEADER}: {}\r\n\
         Connection: close\r\n\r\n",
        body.len(),
        std::process::id()
    )
    .into_bytes();
    if with_body {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which held connection gives way: the crowded address's, then the rules within it.
    #[test]
    fn the_address_holding_the_most_connections_gives_one_up_first() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        let held = |peer: &str, head: &[u8]| Held {
            stream: TcpStream::connect(at).unwrap(),
            peer: peer.parse().unwrap(),
            since: Instant::now(),
            head: head.to_vec(),
            answer: None,
        };
        // Four half requests from one address, then a scraper from another whose request is not
        // in yet, then one more half request: one of the four goes, the oldest.
        let mut h: Vec<Held> = (0..4).map(|_| held("10.0.0.9", b"GET /metr")).collect();
        h.push(held("10.0.0.1", b""));
        h.push(held("10.0.0.9", b""));
        assert_eq!(evictee(&h), 0);
        // All from one address: the oldest other that sent nothing (the scraper, here), never
        // the newest for that.
        let mut h: Vec<Held> = (0..3).map(|_| held("10.0.0.9", b"GET /metr")).collect();
        h.push(held("10.0.0.9", b""));
        h.push(held("10.0.0.9", b""));
        assert_eq!(evictee(&h), 3);
        // Each from its own address: as before, the oldest silent one other than the newest.
        let mut h = vec![held("10.0.0.1", b"GET /me"), held("10.0.0.2", b""), held("10.0.0.3", b"")];
        h.push(held("10.0.0.4", b""));
        h.push(held("10.0.0.5", b""));
        assert_eq!(evictee(&h), 1);
    }

    #[test]
    fn pairs_are_counted_by_datapath_and_ending() {
        let m = Metrics::new(&["kernel", "userspace"]);
        let mut a = m.pair_started("kernel");
        let b = m.pair_started("userspace");
        let text = m.render();
        assert!(text.contains("skrelay_pairs_active{datapath=\"kernel\"} 1\n"), "{text}");
        assert!(text.contains("skrelay_pairs_total{datapath=\"kernel\",ending=\"timeout\"} 0\n"), "{text}");
        a.end(PairEnd::Eof, 1000);
        a.end(PairEnd::Reset, 5); // a second end changes nothing
        drop(a);
        drop(b); // never ended: a reset
        m.set_pending(3);
        let text = m.render();
        assert!(text.contains("skrelay_pairs_active{datapath=\"kernel\"} 0\n"), "{text}");
        assert!(text.contains("skrelay_pairs_active{datapath=\"userspace\"} 0\n"), "{text}");
        assert!(text.contains("skrelay_pairs_total{datapath=\"kernel\",ending=\"eof\"} 1\n"), "{text}");
        assert!(text.contains("skrelay_pairs_total{datapath=\"kernel\",ending=\"reset\"} 0\n"), "{text}");
        assert!(text.contains("skrelay_pairs_total{datapath=\"userspace\",ending=\"reset\"} 1\n"), "{text}");
        assert!(text.contains("skrelay_bytes_total{datapath=\"kernel\"} 1000\n"), "{text}");
        assert!(text.contains("skrelay_pending_clients 3\n"), "{text}");
        assert!(text.contains(&format!("skrelay_build_info{{version=\"{}\"}} 1\n", env!("CARGO_PKG_VERSION"))));
        assert!(text.contains("skrelay_kernel_inflight_bytes 0\n"), "{text}");
        // Its value is the process's (other unit tests drop lines too).
        assert!(text.contains("skrelay_log_lines_dropped_total "), "{text}");
        // Samples in label order, the same in every scrape.
        let kernel_ends = "skrelay_pairs_total{datapath=\"kernel\",ending=\"drain\"} 0\n\
                           skrelay_pairs_total{datapath=\"kernel\",ending=\"eof\"} 1\n\
                           skrelay_pairs_total{datapath=\"kernel\",ending=\"reset\"} 0\n\
                           skrelay_pairs_total{datapath=\"kernel\",ending=\"timeout\"} 0\n";
        assert!(text.contains(kernel_ends), "{text}");
        m.set_inflight_sampler(Some(Box::new(|| 4096)));
        assert!(m.render().contains("skrelay_kernel_inflight_bytes 4096\n"));
        m.pair_path("kernel, after a userspace start");
        m.pair_path("kernel, after a userspace start");
        m.pair_path("userspace, below --kernel-after");
        let text = m.render();
        assert!(text.contains("skrelay_pair_paths_total{path=\"kernel, after a userspace start\"} 2\n"), "{text}");
        assert!(text.contains("skrelay_pair_paths_total{path=\"userspace, below --kernel-after\"} 1\n"), "{text}");
    }

    /// What the endpoint answers, as HTTP asks (an observability pass): the absolute form, empty
    /// lines before the request line, and a 405 that names the methods there are.
    #[test]
    fn requests_are_answered_as_http_asks() {
        let render = || Ok::<_, String>("skrelay_up 1\n".to_string());
        let status = |head: &str| {
            let out = String::from_utf8(answer(head.as_bytes(), &render)).unwrap();
            out.lines().next().unwrap().to_string()
        };
        assert_eq!(status("GET /metrics HTTP/1.1\r\n\r\n"), "HTTP/1.1 200 OK");
        assert_eq!(status("GET http://127.0.0.1:9090/metrics HTTP/1.1\r\n\r\n"), "HTTP/1.1 200 OK");
        assert_eq!(status("GET HTTP://host/metrics?x=1 HTTP/1.1\r\n\r\n"), "HTTP/1.1 200 OK");
        assert_eq!(status("GET http://host HTTP/1.1\r\n\r\n"), "HTTP/1.1 404 Not Found");
        assert_eq!(status("GET http://h?x=/metrics HTTP/1.1\r\n\r\n"), "HTTP/1.1 404 Not Found");
        assert_eq!(status("\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n"), "HTTP/1.1 200 OK");
        assert!(!head_complete(b"\r\n\r\nGET /metrics HTTP/1.1\r\n"), "the empty lines before it end nothing");
        assert_eq!(status("GET /other HTTP/1.1\r\n\r\n"), "HTTP/1.1 404 Not Found");
        // Which process answered (`status` during a --takeover, when two accept on the socket).
        let ok = String::from_utf8(answer(b"GET /metrics HTTP/1.1\r\n\r\n", &render)).unwrap();
        assert!(ok.contains(&format!("\r\nX-Skrelay-Pid: {}\r\n", std::process::id())), "{ok}");
        let delete = String::from_utf8(answer(b"DELETE /metrics HTTP/1.1\r\n\r\n", &render)).unwrap();
        assert!(delete.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{delete}");
        assert!(delete.contains("\r\nAllow: GET, HEAD\r\n"), "{delete}");
        assert_eq!(status("nonsense\r\n\r\n"), "HTTP/1.1 400 Bad Request");
    }

    #[test]
    fn upstreams_go_down_and_up() {
        let m = Metrics::new(&["userspace"]);
        let up: SocketAddr = "127.0.0.1:80".parse().unwrap();
        m.upstream_known(up);
        assert!(m.render().contains("skrelay_upstream_up{upstream=\"127.0.0.1:80\"} 1\n"));
        m.upstream_connected(up, false);
        m.upstream_connected(up, false);
        let text = m.render();
        assert!(text.contains("skrelay_upstream_up{upstream=\"127.0.0.1:80\"} 0\n"), "{text}");
        assert!(text.contains("skrelay_upstream_connect_failures_total{upstream=\"127.0.0.1:80\"} 2\n"), "{text}");
        m.upstream_connected(up, true);
        assert!(m.render().contains("skrelay_upstream_up{upstream=\"127.0.0.1:80\"} 1\n"));
    }

    #[test]
    fn pinned_counters_come_from_the_status_json() {
        let steer = serde_json::json!({
            "attached": true,
            "bindings": [{"proto": "tcp", "prefix": "0.0.0.0/0", "ports": "80", "hits": 7, "refused": 2,
                          "target": {"local": "127.0.0.1:8080", "alive": true}}],
            "funnels": [{"pid": 42, "prefix": "127.0.0.1/32", "ports": "7,77", "hits": 3}],
        });
        let accel = serde_json::json!({
            "cgroups": [{"cgroup": "/sys/fs/cgroup/app", "connections": 5, "messages": 9, "bytes": 1234,
                         "fallbacks": 1, "left": 3, "sockets_open": 4, "attached": true, "cgroup_gone": false},
                        {"cgroup": "/sys/fs/cgroup/again", "attached": false, "link_stale": true}],
            "unreadable": [],
        });
        let text = pinned_from_status(&steer, &accel);
        let b = "{proto=\"tcp\",prefix=\"0.0.0.0/0\",ports=\"80\",target=\"127.0.0.1:8080\"}";
        assert!(text.contains(&format!("skrelay_steer_hits_total{b} 7\n")), "{text}");
        assert!(text.contains(&format!("skrelay_steer_refused_total{b} 2\n")), "{text}");
        assert!(text.contains("skrelay_steer_funnel_hits_total{pid=\"42\",prefix=\"127.0.0.1/32\",ports=\"7,77\"} 3\n"));
        assert!(text.contains("skrelay_accel_bytes_total{cgroup=\"/sys/fs/cgroup/app\"} 1234\n"), "{text}");
        assert!(text.contains("skrelay_accel_fallbacks_total{cgroup=\"/sys/fs/cgroup/app\"} 1\n"), "{text}");
        assert!(text.contains("skrelay_accel_sockets_left_total{cgroup=\"/sys/fs/cgroup/app\"} 3\n"), "{text}");
        assert!(text.contains("skrelay_accel_sockets_open{cgroup=\"/sys/fs/cgroup/app\"} 4\n"), "{text}");
        assert!(text.contains("skrelay_accel_accelerating{cgroup=\"/sys/fs/cgroup/app\"} 1\n"), "{text}");
        assert!(text.contains("skrelay_accel_accelerating{cgroup=\"/sys/fs/cgroup/again\"} 0\n"), "{text}");
        assert!(text.contains("skrelay_steer_attached 1\n"), "{text}");
    }
}
