//! accel: loopback acceleration for one cgroup's TCP connections. A sockops program on the cgroup
//! puts every established TCP socket in a SOCKHASH; an sk_msg program on that map moves each
//! sendmsg straight into the peer socket's receive queue when the peer is in the map too
//! (probes/accel.bpf.c). The state is pinned under /sys/fs/bpf/skrelay/accel/<cgroup>/ so it
//! outlives the command that turned it on.
pub mod calibrate;
pub mod cgroup;
mod pinned;
mod watch;

use crate::{
    abi::accel_stat,
    bpffs,
    cli::{AccelCommand, AccelPolicyArgs},
    error::Error,
    sys,
};
use aya::maps::{MapInfo, MapType};
use cgroup::{Cgroup, Owner};
use std::{
    fmt,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

pub use pinned::MAX_PORTS;

/// Consecutive small sends at a reader with unread data before a direction is demoted.
pub const SMALL_STREAK: u32 = 16;
/// The smallest `--max-queued`: below one large write, every bulk connection would be demoted.
pub const MIN_MAX_QUEUED: u32 = 256 << 10;
/// `--max-queued` when not given.
pub const DEFAULT_MAX_QUEUED: u32 = 8 << 20;

use sys::bpf::ATTACH_CGROUP_SOCK_OPS as BPF_CGROUP_SOCK_OPS;

/// The directory holding one pin directory per accelerated cgroup.
fn accel_root() -> Result<PathBuf, Error> {
    Ok(bpffs::root()?.join("accel"))
}

/// One accelerated cgroup and its counters, as `skrelay accel status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelReport {
    pub cgroup: PathBuf,
    /// Where its state is pinned.
    pub pins: PathBuf,
    /// Ports the acceleration is limited to; empty: every port.
    pub ports: Vec<u16>,
    /// False once `off` ran and connections still hold the fast path ("draining"): no new
    /// connection joins (sockops itself stays attached for the joined ones, except on state an
    /// older skrelay pinned, where `off` detaches it at once).
    pub attached: bool,
    /// The policy it was set up with (`--max-queued`, `--small-write`, given or measured).
    pub max_queued: u32,
    pub small_write: u32,
    /// Sockets in the map now (both ends of an accelerated connection count).
    pub sockets_open: u64,
    /// Sockets that joined the map since `on`.
    pub sockets_joined: u64,
    /// Connections whose both ends joined, so their data bypasses TCP/IP.
    pub connections: u64,
    /// Sockets that joined and are not closed yet, in the map or back on plain TCP (how crowded
    /// the cgroup is: see `stuck`). Counted by sockops, which `off` detaches at once from state an
    /// older skrelay pinned: while draining (`attached` false) the text leaves it out.
    pub sockets_live: u64,
    /// sendmsg calls (and their bytes) moved straight into the peer's receive queue.
    pub messages: u64,
    pub bytes: u64,
    /// sendmsg calls of a joined socket whose peer was not in the map: normal TCP path.
    pub fallbacks: u64,
    /// Sockets that could not join because another sk_msg program already holds them.
    pub insert_busy: u64,
    /// Connections that could not join for another reason (the first socket's insert failed, so
    /// the other did not try), and the latest errno.
    pub insert_failed: u64,
    pub last_errno: u64,
    /// Connections left on the normal path because the connecting end sent before the accepted
    /// end could join (both ends then leave the map, so no byte is reordered).
    pub races_lost: u64,
    /// Who set it up, and whether that process is still there.
    pub owner: Option<cgroup::Owner>,
    /// No owner could be read because this process lacks CAP_SYS_ADMIN (the record is a trusted.*
    /// attribute, which reads as absent without it): said, not left out in silence.
    pub owner_unreadable: bool,
    /// The cgroup's directory was removed after the set-up: no process can be in it, so nothing
    /// new is accelerated; the state stays pinned until `accel off`.
    pub cgroup_gone: bool,
    /// The cgroup's directory is there, but sockops no longer runs for it: the directory was
    /// removed and made again (systemd does so at each restart of a service) or the link was
    /// detached by hand (`pinned::sockops_elsewhere`). Nothing new is accelerated; `accel on`
    /// sets it up again.
    pub link_stale: bool,
    /// Times a direction paused on the TCP path because the reader held its limit unread (TCP
    /// flow control then holds the sender back), and times it went back to the redirect.
    pub pauses: u64,
    pub resumes: u64,
    /// Paused directions that gave up resuming: their sends by TCP while paused outran their
    /// redirected ones by 32 `--max-queued`, or by 2 while the cgroup has more live connections
    /// than CPUs (a writer that keeps ahead of its reader rarely lets the TCP path drain); they
    /// leave the map.
    pub stuck: u64,
    /// Directions moved to the TCP path for good: small writes streamed at a busy reader.
    pub demoted_small: u64,
    /// sendmsg calls (and bytes) of paused or demoted directions, sent by the TCP path.
    pub passed: u64,
    pub passed_bytes: u64,
    /// Sockets that left the map because their sends took the TCP path for good (plain TCP
    /// from then on, at plain speed).
    pub left: u64,
}

impl fmt::Display for AccelReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports = if self.ports.is_empty() {
            "all ports".to_string()
        } else {
            format!("ports {}", self.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(","))
        };
        let state = match (self.attached, self.sockets_open) {
            (true, _) if self.link_stale => "on, but NOT accelerating new connections".to_string(),
            (true, _) => "on".to_string(),
            (false, 0) => format!(
                "draining, and its connections have closed (`skrelay accel off --cgroup {}` removes its state)",
                crate::sys::shell_arg(self.cgroup.display())
            ),
            (false, _) => "draining (off: open connections keep the fast path)".to_string(),
        };
        writeln!(f, "accel {}: {state}, {ports}", self.cgroup.display())?;
        if self.cgroup_gone {
            writeln!(
                f,
                "  WARNING: the cgroup's directory is gone (removed after the set-up): no process can join it, so \
                 nothing new is accelerated; `skrelay accel off --cgroup {0}` removes the state, and `skrelay accel \
                 on --cgroup {0}` makes the cgroup and sets it up again",
                crate::sys::shell_arg(self.cgroup.display())
            )?;
        }
        if self.link_stale {
            let cg = crate::sys::shell_arg(self.cgroup.display());
            let fix = match self.sockets_open {
                0 => format!("`skrelay accel on --cgroup {cg}` sets it up again"),
                _ => format!(
                    "once they close, `skrelay accel off --cgroup {cg} --wait SECS` (or --force now) and `accel on` \
                     set it up again"
                ),
            };
            writeln!(
                f,
                "  WARNING: its sockops program no longer runs for this cgroup: the directory was removed and made \
                 again (as systemd does when it restarts a service), or the link was detached by hand; connections \
                 made before keep the fast path. {fix}"
            )?;
        }
        if let Some(owner) = &self.owner {
            writeln!(f, "  {}", owner.describe(&self.cgroup))?;
        } else if self.owner_unreadable {
            writeln!(
                f,
                "  set up by: not known here (the record is a trusted.* extended attribute, which takes CAP_SYS_ADMIN \
                 in the initial user namespace to read)"
            )?;
        }
        let how = match self.owner.as_ref().and_then(|o| o.measured.as_deref()) {
            Some("none") => " (the default where it could not be measured)".to_string(),
            Some(ratio) => format!(
                " (measured: a stream of 64 KiB writes redirected ran at {ratio}x plain TCP; 64K from {:.2}x)",
                calibrate::MARGIN
            ),
            None => String::new(),
        };
        writeln!(f, "  policy: --max-queued {} --small-write {}{how}", kib(self.max_queued), kib(self.small_write))?;
        // Closes are counted by the sockops program, which `off` detaches at once from state an
        // older skrelay pinned: draining, only the map says what is still open.
        let live = if self.attached { format!("{} of them live, ", self.sockets_live) } else { String::new() };
        writeln!(
            f,
            "  connections accelerated: {} ({} sockets joined, {live}{} in the map now)",
            self.connections, self.sockets_joined, self.sockets_open
        )?;
        writeln!(f, "  redirected: {} messages, {} bytes", self.messages, self.bytes)?;
        writeln!(
            f,
            "  fell back to the normal path: {} messages; {} connections left unaccelerated (bytes sent by TCP before both ends joined, TCP Fast Open, or a socket option the redirect skips)",
            self.fallbacks, self.races_lost
        )?;
        write!(
            f,
            "  paused on the TCP path (reader held its limit): {} times, resumed {}, gave up {}; small-write \
             streams moved to TCP for good: {}; sent by the TCP path while in the map: {} messages, {} bytes (not counted once \
             a socket is back on plain TCP); sockets back on plain TCP: {}",
            self.pauses, self.resumes, self.stuck, self.demoted_small, self.passed, self.passed_bytes, self.left
        )?;
        if self.insert_busy > 0 {
            write!(
                f,
                "\n  WARNING: {} sockets could not join: another sk_msg program already holds them \
                 (another accelerator attached to this cgroup, an ancestor or a child)",
                self.insert_busy
            )?;
        }
        // One socket of a connection tries and fails; its other end then does not try. So each
        // count is a connection, left on plain TCP whole (a scale pass: 3,232 counted as
        // "sockets" for 3,232 connections, with only the errno to go on).
        if self.insert_failed > 0 {
            let why = match self.last_errno as i32 {
                libc::E2BIG | libc::ENOSPC | libc::ENOMEM => format!(
                    "the socket map is full: it holds {} sockets, two per accelerated connection (accelerate fewer \
                     connections at once: narrow the cgroup, or give accel on --ports)",
                    crate::abi::MAX_SOCKETS
                ),
                errno => std::io::Error::from_raw_os_error(errno).to_string(),
            };
            write!(
                f,
                "\n  WARNING: {} connections could not join, and stay on plain TCP, whole: {why}",
                self.insert_failed
            )?;
        }
        Ok(())
    }
}

/// A byte count as the flags take it: 64K, 8M, or bytes when not a whole number of KiB.
fn kib(bytes: u32) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b if b % 1024 == 0 && b > 0 => format!("{}K", b >> 10),
        b => b.to_string(),
    }
}

impl AccelReport {
    /// The report as a JSON value (what `skrelay status --json` shows under `accel`).
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "cgroup": self.cgroup.to_string_lossy(),
            "owner": self.owner.as_ref().map(|o| o.json(&self.cgroup)),
            "owner_unreadable": self.owner_unreadable,
            "cgroup_gone": self.cgroup_gone,
            "link_stale": self.link_stale,
            "pins": self.pins.to_string_lossy(),
            "ports": self.ports,
            "attached": self.attached && !self.link_stale,
            "max_queued": self.max_queued,
            "small_write": self.small_write,
            "sockets_open": self.sockets_open,
            "sockets_joined": self.sockets_joined,
            "sockets_live": self.sockets_live,
            "connections": self.connections,
            "messages": self.messages,
            "bytes": self.bytes,
            "fallbacks": self.fallbacks,
            "insert_busy": self.insert_busy,
            "insert_failed": self.insert_failed,
            "last_errno": self.last_errno,
            "races_lost": self.races_lost,
            "pauses": self.pauses,
            "resumes": self.resumes,
            "stuck": self.stuck,
            "demoted_small": self.demoted_small,
            "passed": self.passed,
            "passed_bytes": self.passed_bytes,
            "left": self.left,
        })
    }

    /// One JSON object on one line (no trailing newline).
    pub fn to_json(&self) -> String {
        self.json().to_string()
    }
}

impl Reports {
    /// accel's part of `skrelay status`: every accelerated cgroup with its counters, and the
    /// state this version cannot read (pinned by another skrelay version), each with how to
    /// remove it.
    pub fn text(&self) -> String {
        let mut lines: Vec<String> = self.cgroups.iter().map(AccelReport::to_string).collect();
        lines.extend(self.unreadable.iter().map(Unreadable::to_string));
        lines.extend(self.interrupted.iter().map(Interrupted::to_string));
        if let Some(why) = &self.out_of_reach {
            format!(
                "accel: cannot tell which cgroups are accelerated: {why}: run this command {} to see them",
                bpffs::run_as()
            )
        } else if lines.is_empty() {
            "accel: no cgroup is accelerated".to_string()
        } else {
            lines.join("\n")
        }
    }

    /// The same as JSON (`accel status --json`, and `status --json` under `accel`): the same keys
    /// with or without cgroups.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "cgroups": self.cgroups.iter().map(AccelReport::json).collect::<Vec<_>>(),
            "unreadable": self.unreadable.iter().map(|u| serde_json::json!({
                "cgroup": u.cgroup.display().to_string(),
                "pins": u.pins.display().to_string(),
                "error": u.error,
            })).collect::<Vec<_>>(),
            "interrupted": self.interrupted.iter().map(|i| serde_json::json!({
                "cgroup": i.cgroup.display().to_string(),
                "pins": i.pins.display().to_string(),
                "pid": i.pid,
            })).collect::<Vec<_>>(),
            "out_of_reach": self.out_of_reach,
        })
    }
}

/// Accel state this version cannot read: its maps have another layout (an older or newer
/// skrelay pinned it) or are damaged. `accel off` still removes it.
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub cgroup: PathBuf,
    pub pins: PathBuf,
    pub error: String,
}

/// `Unreadable::error` when this process may not open the pins (they are mode 0600).
const DENIED: &str = "permission denied";

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.error == DENIED {
            // Pins are mode 0600: another user's (root's) state, not another version's.
            return write!(
                f,
                "accel: {}: state at {} is not readable without root (permission denied): run this command as root \
                 to see it",
                self.cgroup.display(),
                self.pins.display()
            );
        }
        write!(
            f,
            "accel: {}: state at {} cannot be read by this skrelay ({}); it was likely pinned by another version: \
             remove it with `skrelay accel off --cgroup {}`",
            self.cgroup.display(),
            self.pins.display(),
            self.error,
            crate::sys::shell_arg(self.cgroup.display())
        )
    }
}

/// What `reports` found.
pub struct Reports {
    pub cgroups: Vec<AccelReport>,
    pub unreadable: Vec<Unreadable>,
    /// What set-ups killed half-way left (`pinned::unfinished`): the next `on` or `off` removes it.
    pub interrupted: Vec<Interrupted>,
    /// Why the state cannot be looked at from here, where it may exist (`bpffs::out_of_reach`).
    pub out_of_reach: Option<String>,
}

/// What a set-up killed half-way left in bpffs. Its sockops link, if it got that far, still
/// accelerates new connections of the cgroup.
#[derive(Debug, Clone)]
pub struct Interrupted {
    pub cgroup: PathBuf,
    pub pins: PathBuf,
    /// The skrelay process that was setting it up (gone).
    pub pid: u32,
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "accel: {}: a set-up that was interrupted (skrelay pid {}, gone) left state at {}, which may still \
             accelerate new connections: `skrelay accel off --cgroup {}` removes it",
            self.cgroup.display(),
            self.pid,
            self.pins.display(),
            crate::sys::shell_arg(self.cgroup.display())
        )
    }
}

fn report_for(dir: &Path, cg: &Cgroup) -> Result<AccelReport, Error> {
    let snap = pinned::snapshot(dir)?;
    let s = |i: u32| snap.stats[i as usize];
    let attached = !pinned::is_draining(dir);
    Ok(AccelReport {
        cgroup: cgroup::shown(&cg.path()),
        pins: cgroup::shown(dir),
        ports: snap.ports,
        attached,
        link_stale: attached && pinned::sockops_elsewhere(dir, &cg.path()),
        max_queued: snap.config.max_queued,
        small_write: snap.config.small_write,
        sockets_open: snap.sockets_open,
        sockets_joined: s(accel_stat::SOCKETS),
        connections: s(accel_stat::CONNECTIONS),
        sockets_live: s(accel_stat::LIVE_SOCKETS),
        messages: s(accel_stat::MESSAGES),
        bytes: s(accel_stat::BYTES),
        fallbacks: s(accel_stat::FALLBACKS),
        insert_busy: s(accel_stat::INSERT_BUSY),
        insert_failed: s(accel_stat::INSERT_FAILED),
        last_errno: s(accel_stat::LAST_ERRNO),
        races_lost: s(accel_stat::RACES_LOST),
        owner: cg.owner(),
        owner_unreadable: lacks_cap_sys_admin() && cg.owner().is_none(),
        cgroup_gone: !cg.path().is_dir(),
        pauses: s(accel_stat::PAUSES),
        resumes: s(accel_stat::RESUMES),
        stuck: s(accel_stat::STUCK),
        demoted_small: s(accel_stat::DEMOTED_SMALL),
        passed: s(accel_stat::PASSED),
        passed_bytes: s(accel_stat::PASSED_BYTES),
        left: s(accel_stat::LEFT),
    })
}

/// The directory of accel state, if there is one; creates and mounts nothing. Under `ip netns
/// exec` (a fresh /sys) it is the outer mount namespace's, as steer's state is, with the cgroup
/// v2 mount the state is named after (`cgroup::v2_mount`).
fn existing_accel_root() -> Option<PathBuf> {
    Some(bpffs::existing_root()?.join("accel")).filter(|r| r.is_dir())
}

/// Every cgroup skrelay accelerates, with its counters. Empty when there is none (or no bpffs).
/// State this version cannot read is listed apart, so one stale pin never hides the rest. Reads
/// under a shared lock and creates nothing.
pub fn reports() -> Result<Reports, Error> {
    let mut out = Reports { cgroups: Vec::new(), unreadable: Vec::new(), interrupted: Vec::new(), out_of_reach: None };
    let Some(root) = existing_accel_root() else {
        out.out_of_reach = bpffs::out_of_reach();
        return Ok(out);
    };
    let Some(_lock) = bpffs::StateLock::acquire_shared(&root)? else { return Ok(out) };
    let mount = cgroup::v2_mount()?;
    for (pid, name, pins) in pinned::unfinished(&root) {
        if let Some(cg) = Cgroup::from_pin_name(&mount, &name) {
            out.interrupted.push(Interrupted { cgroup: cgroup::shown(&cg.path()), pins: cgroup::shown(&pins), pid });
        }
    }
    for (name, dir) in pinned::list(&root) {
        if let Some(cg) = Cgroup::from_pin_name(&mount, &name) {
            match report_for(&dir, &cg) {
                Ok(r) => out.cgroups.push(r),
                // Removed (`off`, or a watcher) while we read it: it is no longer accelerated.
                Err(_) if !pinned::is_complete(&dir) => {}
                Err(e) => {
                    // The reason alone: the generic fix (kernel support, --datapath) does not apply.
                    let error = match e {
                        Error::BpfUnavailable { reason, .. } => reason,
                        Error::BpfDenied { .. } => DENIED.into(),
                        other => other.to_string(),
                    };
                    out.unreadable.push(Unreadable {
                        cgroup: cgroup::shown(&cg.path()),
                        pins: cgroup::shown(&dir),
                        error,
                    })
                }
            }
        }
    }
    Ok(out)
}

/// The counters of one cgroup.
pub fn report_cgroup(cgroup: &Path) -> Result<AccelReport, Error> {
    let cg = Cgroup::resolve(cgroup)?;
    let root = bpffs::existing_root().unwrap_or_else(|| Path::new(bpffs::BPFFS).join("skrelay")).join("accel");
    let dir = root.join(cg.pin_name());
    let _lock = if dir.is_dir() { bpffs::StateLock::acquire_shared(&root)? } else { None };
    if !dir.is_dir() {
        return Err(Error::AccelNotOn { cgroup: cg.to_string(), pins: cgroup::shown(&dir).display().to_string() });
    }
    report_for(&dir, &cg)
}

/// The accelerated cgroup, if any, that holds process `pid` and joins connections on one of
/// `ports` (every port when its --ports is empty). A relay or proxy there must not run: sk_msg
/// would move its local clients' bytes into its sockets' psock queue, which neither its sk_skb
/// datapath nor splice(2) reads (a relay inside `accel run` lost 64 KiB of a 4 MB stream).
pub fn accelerating(pid: u32, ports: &[u16]) -> Option<AccelReport> {
    accelerating_or_why(pid, ports).ok().flatten()
}

/// `accelerating`, with why it could not be told (the accel state held by another command past
/// the readers' wait, or unreadable).
pub fn accelerating_or_why(pid: u32, ports: &[u16]) -> Result<Option<AccelReport>, Error> {
    let reports = reports()?;
    let holds = |cgroup: &Path| Cgroup::resolve(cgroup).is_ok_and(|accelerated| accelerated.holds(pid));
    if let Some(r) = reports
        .cgroups
        .into_iter()
        .find(|r| (r.ports.is_empty() || r.ports.iter().any(|p| ports.contains(p))) && holds(&r.cgroup))
    {
        return Ok(Some(r));
    }
    // State this process may not read, of a cgroup that holds it, or state out of its reach: a
    // relay run by another user in root's accelerated cgroup started without a word (a re-check
    // pass).
    if let Some(why) = reports.out_of_reach {
        return Err(Error::StateOutOfReach { what: "accel", why });
    }
    if let Some(u) = reports.unreadable.iter().find(|u| holds(&u.cgroup)) {
        return Err(Error::Usage(format!(
            "the accel state of cgroup {}, which holds this process, is not readable ({})",
            u.cgroup.display(),
            u.error
        )));
    }
    Ok(None)
}

/// A running relay or proxy inside `cg` whose ports `ports` would take in (see `accelerating`).
fn check_no_relay_inside(command: &str, cg: &Cgroup, ports: &[u16]) -> Result<(), Error> {
    for s in crate::running::servers() {
        let inside = Cgroup::of_process(s.pid).is_some_and(|c| c.is_within(cg));
        // A proxy's upstream connections are local connections of the cgroup too.
        let caught = ports.is_empty()
            || s.listening.iter().any(|a| ports.contains(&a.port()))
            || s.upstream_ports.iter().any(|p| ports.contains(p));
        if inside && caught {
            let mut at = s.listening.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
            let mut theirs: Vec<u16> = s.listening.iter().map(std::net::SocketAddr::port).collect();
            if !s.upstream_ports.is_empty() {
                let list = s.upstream_ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
                at = format!("{at}, upstream port {list}");
                theirs.extend(&s.upstream_ports);
            }
            theirs.sort_unstable();
            theirs.dedup();
            let theirs = theirs.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
            // `accel run` takes no --ports.
            let fix = if command == "on" {
                format!("stop it or move it out of the cgroup, or give --ports that leave out {theirs}")
            } else {
                "stop it or move it out of the cgroup, or run the command in another cgroup".to_string()
            };
            return Err(Error::AccelConflict {
                cgroup: cg.to_string(),
                reason: format!(
                    "skrelay {} (pid {}, listening on {at}) runs in it, and accel would move its local clients' bytes \
                     past its datapath ({fix})",
                    s.command, s.pid
                ),
            });
        }
    }
    Ok(())
}

/// What `on` did.
#[derive(Debug)]
pub struct Enabled {
    pub cgroup: Cgroup,
    pub pins: PathBuf,
    /// The `--small-write` the cgroup got and how it was chosen: None when the flag gave it.
    pub measured: Option<calibrate::Choice>,
    /// Cgroup directories `on` created (deepest last).
    pub created: Vec<PathBuf>,
}

impl Enabled {
    /// The line `accel on` prints. The root of the hierarchy is named as such: every process of
    /// the host (of the cgroup namespace) is below it, which a path like `/` does not make plain.
    pub fn summary(&self) -> String {
        let chosen = self.measured.as_ref().map(|c| format!("; {}", c.describe())).unwrap_or_default();
        let root = if self.cgroup.rel.is_empty() {
            "; this is the root cgroup: connections between ANY processes of this host (or cgroup namespace) are \
             accelerated"
        } else {
            ""
        };
        format!("accel on: {} (state pinned at {}){chosen}{root}\n", self.cgroup, cgroup::shown(&self.pins).display())
    }
}

/// `skrelay accel on`: accelerates the TCP connections between processes of `cgroup` (created if
/// missing), limited to `ports` when not empty, demoting directions to the normal path as
/// `policy` says.
pub fn on(cgroup: &Path, ports: &[u16], policy: &AccelPolicyArgs) -> Result<Enabled, Error> {
    let held = crate::sys::StopSignalsHeld::new();
    let result = on_for("on", cgroup, ports, policy, calibrate::Placement::AnyCpu);
    let result = undo_if_stopped("on", cgroup, result, &held);
    // Kept held to the end: a SIGUSR1 or SIGUSR2 that came during the set-up, let go with its
    // default action, killed `on` with no word once it had set everything up (a re-check).
    held.keep();
    result
}

/// A stop signal (SIGINT, SIGTERM, SIGHUP, SIGQUIT) is held back (`held`) during the set-up and
/// acted on after it: it killed the process half-way, leaving an interrupted set-up for the next
/// command to remove (a helper's kill loop: 12 of 25 SIGTERMs), where a starting relay says it
/// stopped. What was set up is undone, and the command says so; a set-up that failed says its
/// own error (nothing was set up), the signal then thrown away with the process.
fn undo_if_stopped(
    command: &'static str,
    cgroup: &Path,
    result: Result<Enabled, Error>,
    held: &crate::sys::StopSignalsHeld,
) -> Result<Enabled, Error> {
    let Some(signal) = crate::sys::StopSignalsHeld::pending() else { return result };
    held.keep();
    let enabled = result?;
    if let Err(e) = off(cgroup, Duration::ZERO, true) {
        log::warn!("accel: cannot undo the set-up of {}: {e}", enabled.cgroup);
    }
    let what = if command == "run" { "; the command was not run" } else { "" };
    Err(Error::StoppedSettingUp { signal, cgroup: enabled.cgroup.to_string(), what })
}

/// `on`, measuring the default `--small-write` where the cgroup's programs will run: on any CPU
/// for `accel on`, on this process's CPUs for `accel run` (its command inherits them).
fn on_for(
    command: &'static str,
    cgroup: &Path,
    ports: &[u16],
    policy: &AccelPolicyArgs,
    placement: calibrate::Placement,
) -> Result<Enabled, Error> {
    // A set-up refused part-way (no privilege, a cgroup that cannot be made) leaves no empty
    // directory in bpffs: another user's would hold root's later state.
    set_up(command, cgroup, ports, policy, placement).inspect_err(|_| remove_empty_state_dirs())
}

/// Removes `accel/` (and skrelay's directory in bpffs) if nothing is in them, under the lock.
fn remove_empty_state_dirs() {
    let Some(root) = bpffs::existing_root().map(|r| r.join("accel")) else { return };
    if let Ok(Some(_lock)) = bpffs::StateLock::acquire_existing(&root) {
        pinned::remove_if_empty(&root);
    }
    bpffs::remove_root_if_empty();
}

fn set_up(
    command: &'static str,
    cgroup: &Path,
    ports: &[u16],
    policy: &AccelPolicyArgs,
    placement: calibrate::Placement,
) -> Result<Enabled, Error> {
    check_max_queued(policy)?;
    let max_queued = policy.max_queued.unwrap_or(DEFAULT_MAX_QUEUED);
    // Distinct ports count (a scale pass: 1,024 ports and a repeat were refused as 1,025).
    let distinct = ports.iter().collect::<std::collections::BTreeSet<_>>().len();
    if distinct > MAX_PORTS {
        return Err(Error::Usage(format!(
            "--ports lists {distinct} ports; at most {MAX_PORTS} are supported (accelerate the whole cgroup without \
             --ports, or move the services that need no acceleration out of it)"
        )));
    }
    if ports.contains(&0) {
        return Err(Error::Usage("--ports: port 0 is not a port a connection can use; give ports 1 to 65535".into()));
    }
    let cg = Cgroup::resolve(cgroup)?;
    let root = accel_root()?;
    let dir = root.join(cg.pin_name());
    if dir.exists() && !stale_set_up(&cg, &dir) {
        return Err(already_on(&cg, &dir));
    }
    // Measured before the lock is taken and anything is created: it takes a while (at most
    // `calibrate::DEADLINE`), and a set-up interrupted meanwhile leaves nothing behind. A
    // measurement that cannot be made chooses the safe value.
    let measured = policy.small_write.is_none().then(|| calibrate::choose(placement));
    let small_write =
        policy.small_write.or(measured.as_ref().map(|c| c.small_write)).unwrap_or(calibrate::SMALL_WRITE_SAFE);
    let _lock = bpffs::StateLock::acquire(&root)?;
    remove_interrupted(&root, &cg.mount);
    // The directories an `on` of a set-up whose link was detached created (its record is on this
    // same directory) are still this acceleration's to remove at `off` (they stayed: a re-check
    // pass). A directory made again carries no record.
    let mut inherited = 0;
    if dir.exists() && stale_set_up(&cg, &dir) {
        inherited = cg.owner().filter(|o| o.command == "on").map_or(0, |o| o.created);
        remove_stale(&cg, &dir)?;
    }
    if dir.exists() {
        return Err(already_on(&cg, &dir));
    }
    check_nested(&root, &cg)?;
    check_no_relay_inside(command, &cg, ports)?;
    pinned::begin_set_up(&dir, cg.missing_dirs())?;
    let created = match cg.create() {
        Ok(created) => created,
        Err(e) => {
            pinned::abandon_set_up(&dir);
            return Err(e);
        }
    };
    // Recorded before the set-up, with this process: if it is killed half-way, the next `on` or
    // `off` (`remove_interrupted`) knows which directories it created, and a `run` killed after
    // the set-up and before its watcher started shows in `status` as a gone `run` that left it.
    let mut owner = Owner {
        command: command.into(),
        pid: Some(cgroup::Process::me()),
        watcher: None,
        created: created.len().max(if command == "on" { inherited } else { 0 }),
        measured: measured.as_ref().map(calibrate::Choice::record),
    };
    if let Err(e) = cg.set_owner(&owner) {
        if matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied) {
            // Without the record `off` cannot tell which cgroup directories to remove, and
            // `status` cannot say who set it up.
            cgroup::remove_dirs(&created);
            pinned::abandon_set_up(&dir);
            // Root without it was told to run as root (a re-check pass).
            let lacks = match rustix::process::geteuid().is_root() {
                true => crate::bpf::lacking_note(&[(21, "CAP_SYS_ADMIN")]),
                false => String::new(),
            };
            return Err(Error::Usage(format!(
                "cannot record who sets up acceleration on cgroup {cg} (a trusted.* extended attribute): permission \
                 denied (run as root or grant CAP_SYS_ADMIN{lacks})"
            )));
        }
        log::warn!("accel: {e}; `accel status` will not say who set it up");
    }
    let result = check_foreign(&cg).and_then(|()| pinned::create(&dir, &cg, ports, max_queued, small_write));
    if let Err(e) = result {
        cg.clear_owner();
        cgroup::remove_dirs(&created);
        pinned::abandon_set_up(&dir);
        return Err(e);
    }
    // `off` removes the directories made here; `run` records its watcher over this.
    if command == "on" {
        owner.pid = None;
        if let Err(e) = cg.set_owner(&owner) {
            log::debug!("accel: {e}");
        }
    }
    Ok(Enabled { cgroup: cg, pins: dir, measured, created })
}

/// A `--max-queued` below the least that works is refused first, whatever else is wrong (a helper
/// was told only that the cgroup was accelerated with other flags).
fn check_max_queued(policy: &AccelPolicyArgs) -> Result<(), Error> {
    match policy.max_queued {
        Some(max_queued) if max_queued < MIN_MAX_QUEUED => Err(Error::Usage(format!(
            "--max-queued {} is below {}K: every bulk connection would pause on the TCP path at its first large write; \
             give at least {}K",
            kib(max_queued),
            MIN_MAX_QUEUED >> 10,
            MIN_MAX_QUEUED >> 10
        ))),
        _ => Ok(()),
    }
}

/// The command would run under the acceleration there is, which stays on afterwards: flags that
/// ask for another policy would be silently ignored, so they are refused. Only the flags given
/// are compared. State another skrelay version pinned may not be readable: it is used as it is.
fn refuse_other_policy(cg: &Cgroup, pins: &Path, policy: &AccelPolicyArgs, target: &Path) -> Result<(), Error> {
    let Some(config) = pinned::snapshot(pins).ok().map(|s| s.config) else { return Ok(()) };
    let differs = |given: Option<u32>, set: u32| given.is_some_and(|g| g != set);
    if differs(policy.max_queued, config.max_queued) || differs(policy.small_write, config.small_write) {
        // Turning it off would take the acceleration from under a running `accel run`.
        let fix = match cg.owner().filter(|o| o.command == "run").and_then(|o| o.pid).filter(|p| p.alive()) {
            Some(run) => format!("leave the flags out to run under its settings: `accel run` pid {} uses it", run.pid),
            None => format!(
                "leave the flags out to run under its settings, or `skrelay accel off --cgroup {}` first",
                crate::sys::shell_arg(target.display())
            ),
        };
        return Err(Error::Usage(format!(
            "cgroup {cg} is already accelerated with --max-queued {} --small-write {}: the command would run with \
             those, not the ones given ({fix})",
            kib(config.max_queued),
            kib(config.small_write),
        )));
    }
    Ok(())
}

/// `on` or `run` found the cgroup draining after an `accel off` that connections kept open: it
/// accelerates no new connection, so running there would not be accelerated, and `off` must
/// remove it first (it told to run `off`, which then refused again: a helper's pass).
fn draining(cg: &Cgroup, dir: &Path) -> Error {
    Error::AccelBusy(format!("cgroup {cg} {}, and then it can be accelerated again", draining_fix(cg, dir)))
}

/// What a cgroup that is draining after `accel off` waits for, and the command that ends it.
fn draining_fix(cg: &Cgroup, dir: &Path) -> String {
    let off = format!("`skrelay accel off --cgroup {}", crate::sys::shell_arg(cg));
    match pinned::open_sockets(dir).unwrap_or(0) {
        // Its connections have closed since: a plain `off` removes it now.
        0 => {
            format!("is draining after `skrelay accel off`, and its connections have closed: {off}` removes its state")
        }
        open => format!(
            "is draining after `skrelay accel off` ({open} sockets of open connections keep the fast path, new \
             connections are not accelerated): {off} --wait SECS` removes its state once they close (or --force now)"
        ),
    }
}

/// State pinned for `cg` that is on, but whose sockops no longer runs for the cgroup at its path
/// (`pinned::sockops_elsewhere`): `on` and `run` set the cgroup up again rather than say it is
/// accelerated (they did, and nothing was: a new-user pass recreated the cgroup as systemd does).
fn stale_set_up(cg: &Cgroup, dir: &Path) -> bool {
    // A cgroup whose directory is gone is one too: `on` was told it was already accelerated.
    pinned::is_complete(dir)
        && !pinned::is_draining(dir)
        && (!cg.path().is_dir() || pinned::sockops_elsewhere(dir, &cg.path()))
}

/// Removes a stale set-up (`stale_set_up`) under the state lock, unless connections made before
/// still use its maps: removing them would take those connections off the fast path with what
/// was redirected to them unread, so that waits for `accel off --wait` (or `--force`).
fn remove_stale(cg: &Cgroup, dir: &Path) -> Result<(), Error> {
    match pinned::open_sockets(dir).unwrap_or(0) {
        0 => {
            pinned::remove(dir);
            if dir.exists() {
                // Another user's (root's) pins, which this one may not remove: it was told the
                // command ran under the stale set-up (a re-check pass).
                return Err(Error::AccelBusy(format!(
                    "cgroup {cg} was set up before its directory was removed or made again (or its sockops link was \
                     detached): that state, pinned at {}, accelerates nothing new, and this user may not remove it: `skrelay \
                     accel off --cgroup {}` as its owner (root) does, and then it can be accelerated again",
                    cgroup::shown(dir).display(),
                    crate::sys::shell_arg(cg)
                )));
            }
            log::info!(
                "accel: {cg}: removed the state of an earlier set-up whose sockops no longer ran for this cgroup (its \
                 directory was removed or made again, or its link detached)"
            );
            Ok(())
        }
        open => Err(Error::AccelBusy(format!(
            "cgroup {cg} was set up before its directory was removed or made again (or its sockops link was \
             detached): that state accelerates nothing new, and {open} sockets of connections made before still use it: `skrelay \
             accel off --cgroup {} --wait SECS` removes it once they close (or --force now), and then it can be \
             accelerated again",
            crate::sys::shell_arg(cg)
        ))),
    }
}

/// `on` found state pinned for the cgroup: accelerated, or the remains of a set-up an older
/// skrelay left when it was killed half-way (some pins missing), which `off --force` removes.
fn already_on(cg: &Cgroup, dir: &Path) -> Error {
    if pinned::is_complete(dir) && pinned::is_draining(dir) {
        return draining(cg, dir);
    }
    if pinned::is_complete(dir) {
        return Error::AccelAlreadyOn { cgroup: cg.to_string(), pins: cgroup::shown(dir).display().to_string() };
    }
    Error::Usage(format!(
        "cgroup {cg}: the accel state at {} is incomplete (a set-up was interrupted), so it is not accelerated; \
         remove it with `skrelay accel off --cgroup {} --force`",
        cgroup::shown(dir).display(),
        crate::sys::shell_arg(cg)
    ))
}

/// A socket holds one sk_msg program: a cgroup inside (or around) one skrelay already
/// accelerates would see its inserts refused.
fn check_nested(root: &Path, cg: &Cgroup) -> Result<(), Error> {
    for (name, dir) in pinned::list(root) {
        let Some(other) = Cgroup::from_pin_name(&cg.mount, &name) else { continue };
        let relation = if cg.is_within(&other) {
            "lies inside"
        } else if other.is_within(cg) {
            "contains"
        } else {
            continue;
        };
        // One already turned off and draining: `off` again would refuse again (a re-check pass).
        let fix = if pinned::is_complete(&dir) && pinned::is_draining(&dir) {
            format!("that one {}; or pick a cgroup outside it", draining_fix(&other, &dir))
        } else {
            format!(
                "turn that one off with `skrelay accel off --cgroup {}`, or pick a cgroup outside it",
                crate::sys::shell_arg(&other)
            )
        };
        return Err(Error::AccelConflict {
            cgroup: cg.to_string(),
            reason: format!(
                "it {relation} cgroup {other}, which skrelay already accelerates, and a socket can carry only one \
                 sk_msg program ({fix})"
            ),
        });
    }
    Ok(())
}

/// A sockops program already running for this cgroup (attached here or on an ancestor) that
/// puts sockets in a socket map would make our inserts fail: name it.
fn check_foreign(cg: &Cgroup) -> Result<(), Error> {
    let dir = std::fs::File::open(cg.path()).map_err(|e| Error::io(format!("cannot open cgroup {cg}"), e))?;
    let Ok(effective) = sys::bpf_prog_query(&dir, BPF_CGROUP_SOCK_OPS, true) else { return Ok(()) };
    for id in effective {
        let Some(info) = aya::programs::loaded_programs().filter_map(|p| p.ok()).find(|p| p.id() == id) else {
            continue;
        };
        let uses_sockmap = info.map_ids().ok().flatten().unwrap_or_default().into_iter().any(|m| {
            MapInfo::from_id(m)
                .ok()
                .and_then(|i| i.map_type().ok())
                .is_some_and(|t| matches!(t, MapType::SockHash | MapType::SockMap))
        });
        if !uses_sockmap {
            continue;
        }
        let at = cg
            .lineage()
            .into_iter()
            .find(|c| {
                std::fs::File::open(c.path())
                    .ok()
                    .and_then(|f| sys::bpf_prog_query(&f, BPF_CGROUP_SOCK_OPS, false).ok())
                    .is_some_and(|ids| ids.contains(&id))
            })
            .map(|c| c.to_string())
            .unwrap_or_else(|| "an ancestor".into());
        let name = info.name_as_str().unwrap_or("?").to_string();
        return Err(Error::AccelConflict {
            cgroup: cg.to_string(),
            reason: format!(
                "sockops program `{name}` (id {id}, attached to cgroup {at}) already puts these sockets in a socket \
                 map, and a socket can carry only one sk_msg program (detach it first: `bpftool cgroup tree` shows it)"
            ),
        });
    }
    Ok(())
}

/// Removes what set-ups killed half-way left (`pinned::remove_unfinished`) and, where such a
/// set-up had created its cgroup's directories (its owner record names its process), those
/// directories too once no process is in them. Under the accel root's lock. Returns the cgroups
/// whose set-ups were removed.
fn remove_interrupted(root: &Path, mount: &Path) -> Vec<Cgroup> {
    let mut cgroups = Vec::new();
    for (pid, pin_name, creates) in pinned::remove_unfinished(root) {
        let Some(cg) = Cgroup::from_pin_name(mount, &pin_name) else { continue };
        let owner = cg.owner().filter(|o| o.pid.is_some_and(|p| p.pid == pid));
        // The cgroup's own state (a later set-up of it) is another's: its directories stay.
        if !root.join(&pin_name).exists() {
            // Its owner record says what it created; killed before that record, its set-up
            // directory said what it was about to create.
            let created = match owner {
                Some(owner) => {
                    cg.clear_owner();
                    Some(owner.created)
                }
                None => creates,
            };
            // A set-up killed between its mkdirs made only the shallower ones (rmdir(2) of a
            // directory that is not there, or not empty, fails and changes nothing).
            if let Some(created) = created.filter(|_| !cg.path().is_dir() || !cg.populated()) {
                cgroup::remove_dirs(&cg.created_dirs(created));
            }
        }
        cgroups.push(cg);
    }
    cgroups
}

/// What `off` did.
#[derive(Debug)]
pub struct Disabled {
    pub cgroup: Cgroup,
    /// Accelerated sockets that were still open when the state was removed (with --force).
    pub forced_sockets: u64,
}

/// capability.h: what reading and writing trusted.* extended attributes takes.
const CAP_SYS_ADMIN: u32 = 21;

/// This process cannot read or write trusted.* extended attributes (the owner record): that
/// takes CAP_SYS_ADMIN in the initial user namespace, which root of another (`unshare -U -r`,
/// whose CapEff reads full) has not (a re-check pass: `off` from there did the original bug).
fn lacks_cap_sys_admin() -> bool {
    crate::bpf::in_user_namespace()
        || crate::sys::effective_capabilities(Path::new("/proc/self")).is_none_or(|c| c & (1 << CAP_SYS_ADMIN) == 0)
}

/// `skrelay accel off`: stops accelerating new connections at once, waits up to `drain` for
/// accelerated connections to close, then removes the pinned state. Connections still open after
/// that keep the fast path and the state stays pinned (an error says so) unless `force`.
pub fn off(cgroup: &Path, drain: Duration, force: bool) -> Result<Disabled, Error> {
    off_set_up(cgroup, drain, force, None).map(|d| d.expect("any set-up is removed"))
}

/// `off`, of the state `only` names when given: None when the cgroup's state is another set-up's
/// (an `accel off` and `on` while an `accel run` ran), which is left alone.
fn off_set_up(
    cgroup: &Path,
    drain: Duration,
    force: bool,
    only: Option<pinned::SetUp>,
) -> Result<Option<Disabled>, Error> {
    let cg = Cgroup::resolve(cgroup)?;
    let root = accel_root()?;
    let not_on =
        |dir: &Path| Error::AccelNotOn { cgroup: cg.to_string(), pins: cgroup::shown(dir).display().to_string() };
    let dir = root.join(cg.pin_name());
    {
        let _lock = bpffs::StateLock::acquire(&root)?;
        let interrupted = remove_interrupted(&root, &cg.mount);
        if !dir.is_dir() {
            // What was asked: an interrupted set-up of this cgroup is no longer there either.
            let removed = interrupted.contains(&cg);
            pinned::remove_if_empty(&root);
            bpffs::remove_root_if_empty();
            if removed {
                return Ok(Some(Disabled { cgroup: cg, forced_sockets: 0 }));
            }
            return Err(not_on(&dir));
        }
        // Another user's (root's) pins: say whose, not that capabilities are missing.
        let names: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        bpffs::check_owner("accel", &dir, names.iter().map(String::as_str))?;
        if only.is_some_and(|s| pinned::set_up_of(&dir) != Some(s)) {
            return Ok(None);
        }
        // Which cgroup directories `on` created is recorded in a trusted.* attribute, which
        // reads as absent without CAP_SYS_ADMIN: `off` removed the state, left the directories
        // and said it was done (a helper's pass, root with its capabilities dropped). Refused
        // before anything changes, as `on` is.
        if lacks_cap_sys_admin() {
            return Err(Error::Usage(format!(
                "cannot read which cgroup directories skrelay created for cgroup {cg}, to remove them with its \
                 state (a trusted.* extended attribute): permission denied (this takes CAP_SYS_ADMIN, which this \
                 process lacks: run as root outside any user namespace, with CAP_SYS_ADMIN in its bounding set)"
            )));
        }
        pinned::start_draining(&dir)?;
    }
    let set_up = pinned::set_up_of(&dir);
    // The drain runs without the lock, so other accel commands (and `status`, which takes it
    // shared) are not held up for --wait.
    let deadline = Instant::now() + drain;
    // Only the socket map is read: state pinned by another skrelay version (other counters or
    // config layout) can still be turned off and removed by this one.
    let count = |dir: &Path| if dir.is_dir() { pinned::open_sockets(dir) } else { Ok(0) };
    let mut open = count(&dir)?;
    while open > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        open = count(&dir)?;
    }
    let _lock = bpffs::StateLock::acquire(&root)?;
    if !dir.is_dir() || pinned::set_up_of(&dir) != set_up || !pinned::is_draining(&dir) {
        // Another `off` (or the watcher of an `accel run`) removed it meanwhile, and maybe an
        // `on` set it up anew, which is not ours to remove.
        return Ok(Some(Disabled { cgroup: cg, forced_sockets: 0 }));
    }
    let open = pinned::open_sockets(&dir)?;
    if open > 0 && !force {
        let waited = if drain.is_zero() { String::new() } else { format!(" after waiting {} s", drain.as_secs_f64()) };
        let wait = if drain.is_zero() { "give --wait SECS" } else { "give a longer --wait" };
        return Err(Error::AccelBusy(format!(
            "cgroup {cg}: {open} sockets of open connections still use the fast path{waited}, so the state at {} \
             stays pinned (new connections are no longer accelerated); detaching them now could lose bytes still \
             queued for them, so close them and run `skrelay accel off --cgroup {}` again, {wait}, or add --force",
            cgroup::shown(&dir).display(),
            crate::sys::shell_arg(&cg)
        )));
    }
    pinned::remove(&dir);
    pinned::remove_if_empty(&root);
    crate::bpffs::remove_root_if_empty();
    // The cgroup directories `on` created go too, unless processes still use them. Processes
    // whose connections just closed often exit a moment later: a short grace for them.
    if let Some(owner) = cg.owner() {
        let dirs = cg.created_dirs(owner.created);
        let grace = Instant::now() + EXIT_GRACE;
        // A run removes its cgroup when its command ends, if the run or its watcher is there to.
        let run_lives = owner.command == "run"
            && (owner.pid.is_some_and(|p| p.alive()) || owner.watcher.is_some_and(|p| p.alive()));
        while !dirs.is_empty() && !run_lives && cg.populated() && Instant::now() < grace {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !dirs.is_empty() && cg.populated() && run_lives {
            log::warn!(
                "accel: cgroup {cg}, which an `accel run` created, still holds its command: the run removes it when \
                 the command ends"
            );
        } else if !dirs.is_empty() && cg.populated() {
            log::warn!(
                "accel: cgroup {cg}, which skrelay created, still holds processes: it stays (rmdir it once they exit)"
            );
        } else {
            // A directory with cgroups of its own in it stays: said, with the way to remove it
            // (an accel pass saw it stay without a word).
            say_dirs_that_stay(cgroup::remove_dirs(&dirs));
        }
        if cg.path().exists() {
            cg.clear_owner();
        }
    }
    Ok(Some(Disabled { cgroup: cg, forced_sockets: open }))
}

/// What an `accel run` (or its watcher) does when its command has ended: removes the state it
/// set up (`set_up`) and the cgroup directories it created (`created`, deepest last). State that
/// an `accel off` and `on` replaced meanwhile is `on`'s and stays, and so do those directories,
/// which `on`'s record then names, so its `off` removes them. Ok(false) where the state was
/// another's.
fn end_run(
    target: &Path,
    set_up: Option<pinned::SetUp>,
    created: &[(PathBuf, u64)],
    drain: Duration,
    force: bool,
) -> Result<bool, Error> {
    match off_set_up(target, drain, force, set_up) {
        Ok(Some(_)) => Ok(true),
        Ok(None) => {
            let cg = Cgroup::resolve(target)?;
            if let Some(mut owner) = cg.owner().filter(|o| o.command == "on" && o.created < created.len()) {
                owner.created = created.len();
                if let Err(e) = cg.set_owner(&owner) {
                    log::debug!("accel: {e}");
                }
            }
            Ok(false)
        }
        // `accel off` took the acceleration away while the command ran, and left the cgroup
        // directories this run created, which held the command: they go now.
        Err(Error::AccelNotOn { .. }) => {
            // Said too (a re-check pass: `off` had said the run would remove them).
            say_dirs_that_stay(cgroup::remove_dirs_still_ours(created));
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

/// Warns for each cgroup directory skrelay created that `remove_dirs` could not remove.
fn say_dirs_that_stay(stay: Vec<(PathBuf, std::io::Error)>) {
    for (dir, e) in stay {
        let why = match e.raw_os_error() {
            Some(libc::EBUSY) | Some(libc::ENOTEMPTY) => "other cgroups are in it: rmdir it once they are gone",
            _ => "rmdir it by hand",
        };
        log::warn!("accel: cgroup directory {}, which skrelay created, stays: {e}; {why}", dir.display());
    }
}

/// How long `off` waits for the processes of a cgroup it created to exit, once the state is
/// removed, before it leaves the directory to the user.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// `skrelay accel run`: runs `cmd` in `cgroup` (or a fresh one), accelerated, and undoes what it
/// set up when the command exits. Returns the command's exit status (128 + signal if killed).
pub fn run(cgroup: Option<&Path>, policy: &AccelPolicyArgs, cmd: &[String]) -> Result<i32, Error> {
    let Some((program, args)) = cmd.split_first() else {
        return Err(Error::Usage("accel run needs a command after `--`".into()));
    };
    // Held from here until the command runs and its signals are forwarded (`spawn_in`): one that
    // comes during the set-up undoes it (`undo_if_stopped`), one after it reaches the command.
    // Let go as soon as the set-up was done, a SIGTERM before the forwarding existed killed
    // `run` with no word, the command not started or started and never told (a re-check).
    let held = crate::sys::StopSignalsHeld::new();
    // Before the half second of set-up: a command that cannot run is refused at once.
    if let Some(why) = not_runnable(program) {
        return Err(Error::Usage(format!("cannot run `{program}`: {why}")));
    }
    check_max_queued(policy)?;
    let fresh = cgroup.is_none();
    let target = match cgroup {
        Some(p) => p.to_path_buf(),
        None => PathBuf::from(format!("skrelay-run-{}", std::process::id())),
    };
    let cg = Cgroup::resolve(&target)?;
    let pins = accel_root()?.join(cg.pin_name());
    // A stale set-up is made anew by `on_for` (it said "already accelerated; the command runs in
    // it", and nothing was accelerated).
    let already = pins.is_dir() && !stale_set_up(&cg, &pins);
    if already {
        if !pinned::is_complete(&pins) || pinned::is_draining(&pins) {
            return Err(already_on(&cg, &pins));
        }
        refuse_other_policy(&cg, &pins, policy, &target)?;
        // A command that cannot be moved into the cgroup is refused before "the command runs in
        // it" is said (a new-user pass as nobody was told that, then refused).
        cg.check_may_move_here()?;
        // Whose acceleration it is says how long it stays: another `accel run`'s goes with that
        // run's processes (it said "stays accelerated afterwards" then too: a README audit).
        let whose = cg.owner().map(|o| o.describe(&cg.path())).unwrap_or_else(|| "set up by `accel on`".into());
        let stays = if whose.starts_with("set up by `accel on`") {
            "it stays accelerated afterwards, until `skrelay accel off`".to_string()
        } else {
            format!("its acceleration is not this run's ({whose})")
        };
        log::info!("accel: {cg} is already accelerated; the command runs in it, and {stays}");
    }
    let enabled = match already {
        true => None,
        false => match undo_if_stopped(
            "run",
            &target,
            on_for("run", &target, &[], policy, calibrate::Placement::ThisProcess),
            &held,
        ) {
            Ok(e) => Some(e),
            // Another `accel run` (or `on`) of this cgroup got there first: run under its
            // acceleration, as if it had been there before, unless it has another policy.
            Err(Error::AccelAlreadyOn { .. }) => {
                refuse_other_policy(&cg, &pins, policy, &target)?;
                log::info!("accel: {cg} was accelerated by another skrelay at the same moment; the command runs in it");
                None
            }
            Err(e) => return Err(e),
        },
    };
    // Undoing what we set up must not depend on this process living: a watcher does it if we
    // are killed, or when the command leaves processes behind (it waits for them to exit).
    let set_up = enabled.as_ref().and_then(|e| pinned::set_up_of(&e.pins));
    // Which directories it created, as they are now: the cgroup may be made again meanwhile.
    let created = enabled.as_ref().map(|e| cgroup::identified(&e.created)).unwrap_or_default();
    let watcher = match &enabled {
        Some(e) => {
            let (t, created) = (target.clone(), created.clone());
            let undo = move || {
                let _ = end_run(&t, set_up, &created, Duration::from_secs(10), true);
            };
            let w = match watch::Watcher::start(cg.clone(), undo) {
                Ok(w) => w,
                Err(err) => {
                    let _ = off(&target, Duration::ZERO, true);
                    return Err(err);
                }
            };
            let owner = Owner {
                command: "run".into(),
                pid: Some(cgroup::Process::me()),
                watcher: Some(w.process),
                created: e.created.len(),
                measured: e.measured.as_ref().map(calibrate::Choice::record),
            };
            if let Err(err) = cg.set_owner(&owner) {
                log::debug!("accel: {err}");
            }
            let chosen = e.measured.as_ref().map(|c| format!("; {}", c.describe())).unwrap_or_default();
            log::info!(
                "accel: {} accelerated for the command (state at {}){chosen}",
                e.cgroup,
                cgroup::shown(&e.pins).display()
            );
            Some(w)
        }
        None => None,
    };
    // A SIGUSR1 or SIGUSR2 that came during the set-up is for a command that did not exist
    // yet: passed on at its start, it killed it before it could handle them (a re-check).
    for name in crate::sys::StopSignalsHeld::discard_user_signals() {
        log::warn!("accel: {name} came while the acceleration was set up, before the command ran: not passed on");
    }
    let result = spawn_in(&cg, program, args, held);
    // Undo what we set up, whatever the command did.
    if let Some(w) = watcher {
        if cg.populated() {
            log::warn!(
                "accel: processes still run in cgroup {cg} (the command left them, or another `accel run` runs \
                 there): its acceleration{} removed when they exit, by the watcher (pid {}; `skrelay accel \
                 status` shows it)",
                if fresh { " and the cgroup are" } else { " is" },
                w.process.pid
            );
            drop(w); // the watcher takes over
        } else {
            match end_run(&target, set_up, &created, Duration::from_secs(5), false) {
                Ok(ours) => {
                    if !ours {
                        log::info!(
                            "accel: {cg} was turned off and on again while the command ran: that acceleration stays \
                             until `skrelay accel off`"
                        );
                    }
                    w.dismiss()
                }
                Err(err) => log::warn!("accel: {err} (the watcher, pid {}, removes it)", w.process.pid),
            }
        }
    }
    result
}

/// Whether `program` names an executable file, as exec looks it up: a path as it is, a bare name
/// in each directory of PATH.
/// Why `program` cannot be run, if it cannot: a path names the file itself (missing, a
/// directory, not executable); a bare name is looked up in PATH, as execvp(3) does.
fn not_runnable(program: &str) -> Option<&'static str> {
    use std::os::unix::fs::PermissionsExt;
    let why = |p: &Path| match p.metadata() {
        Err(_) => Some("no such file"),
        Ok(m) if m.is_dir() => Some("it is a directory"),
        Ok(m) if !m.is_file() => Some("not a regular file"),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Some("not executable (no x permission: chmod +x)"),
        Ok(_) => None,
    };
    if program.contains('/') {
        return why(Path::new(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let found: Vec<_> = std::env::split_paths(&path).map(|dir| why(&dir.join(program))).collect();
    if found.iter().any(Option::is_none) {
        None
    } else if found.iter().any(|w| matches!(w, Some(w) if w.starts_with("not executable"))) {
        Some("found in PATH but not executable (no x permission: chmod +x)")
    } else {
        Some("command not found")
    }
}

/// Runs the command in `cg` and waits for it, forwarding stop signals to it; `held` (the stop
/// signals held since `run` began) is let go once the forwarding is in place, so a signal that
/// came meanwhile reaches the command.
fn spawn_in(cg: &Cgroup, program: &str, args: &[String], held: crate::sys::StopSignalsHeld) -> Result<i32, Error> {
    let procs = cg.procs_file()?;
    let procs_fd = procs.as_raw_fd();
    let mut command = Command::new(program);
    command.args(args);
    let blocked = held.signals();
    // SAFETY: runs in the child between fork and exec; write(2) and sigprocmask(2) are
    // async-signal-safe. "0" moves the writing process, so the command is in the cgroup before
    // it creates any socket; the command starts with the stop signals this process holds
    // unblocked (a blocked mask survives exec).
    unsafe {
        command.pre_exec(move || {
            crate::sys::unblock(&blocked);
            let r = libc::write(procs_fd, b"0".as_ptr() as *const libc::c_void, 1);
            if r != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::Usage(format!("cannot run `{program}`: command not found")),
        _ => Error::io(format!("cannot run `{program}` in cgroup {cg}"), e),
    })?;
    drop(procs);
    // Forward termination signals to the command and stay alive to clean up after it.
    let pid = rustix::process::Pid::from_child(&child);
    // Every signal `held` holds: SIGQUIT, SIGUSR1 and SIGUSR2 too, which, let go with their
    // default action, killed `run` itself with no word and left the command untold (a re-check).
    let mut signals = signal_hook::iterator::Signals::new([
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ])
    .map_err(|e| Error::io("cannot install signal handlers", e))?;
    let handle = signals.handle();
    // The forwarding thread keeps them blocked: this thread takes them once `held` goes, and
    // signal-hook's handler wakes the forwarder.
    let forwarder = std::thread::spawn(move || {
        for sig in signals.forever() {
            // `pid` is our child, not yet reaped: the wait below only looks (WNOWAIT) until this
            // thread has ended.
            if let Some(sig) = rustix::process::Signal::from_named_raw(sig) {
                let _ = rustix::process::kill_process(pid, sig);
            }
        }
    });
    drop(held);
    // Waits for the command to end without reaping it (its pid stays ours), so the forwarder
    // cannot signal a process that took the pid after it; then stops the forwarder and reaps.
    let waited = loop {
        // SAFETY: siginfo_t is plain data, zeroed before the kernel fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes the siginfo_t it is given; WNOWAIT leaves the child unreaped.
        let r = unsafe { libc::waitid(libc::P_PID, child.id(), &mut info, libc::WEXITED | libc::WNOWAIT) };
        match r {
            0 => break Ok(()),
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => continue,
            _ => break Err(std::io::Error::last_os_error()),
        }
    };
    handle.close();
    let _ = forwarder.join();
    let status = waited.and_then(|()| child.wait()).map_err(|e| Error::io(format!("cannot wait for `{program}`"), e));
    let status = status?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// Runs one `skrelay accel` subcommand but `run` (main.rs runs that: its outcome is an exit
/// status); returns the text for stdout.
pub fn command(cmd: AccelCommand) -> Result<String, Error> {
    Ok(match cmd {
        AccelCommand::On { cgroup, ports, policy } => {
            let on = on(&cgroup, &ports, &policy)?;
            on.summary()
        }
        AccelCommand::Off { cgroup, wait, force } => {
            let off = off(&cgroup, wait, force)?;
            if off.forced_sockets > 0 {
                // They are not taken out of the map (that could lose what waits for them): a
                // helper read "detached" as "now plain TCP" and found them still redirected.
                format!(
                    "accel off: {} (state removed by --force; {} sockets of open connections keep the fast path, \
                     without its half-close handling, until they close)\n",
                    off.cgroup, off.forced_sockets
                )
            } else {
                format!("accel off: {}\n", off.cgroup)
            }
        }
        AccelCommand::Run { .. } => {
            return Err(Error::Usage("`accel run` ends with its command's exit status: call accel::run".into()))
        }
        // The shape `skrelay status --json` shows under `accel`, with or without cgroups.
        AccelCommand::Status { json: true } => {
            format!("{}\n", serde_json::to_string_pretty(&reports()?.json()).expect("json"))
        }
        AccelCommand::Status { json: false } => format!("{}\n", reports()?.text()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled(rel: &str) -> Enabled {
        let cgroup = Cgroup { mount: PathBuf::from("/sys/fs/cgroup"), rel: rel.into() };
        Enabled { cgroup, pins: PathBuf::from("/sys/fs/bpf/skrelay/accel/x"), measured: None, created: vec![] }
    }

    /// A full socket map: each failed join is a connection left on plain TCP, and the sentence
    /// names the map's size and what to do (a scale pass: "3232 sockets could not join:
    /// Argument list too long (os error 7)" for 3,232 connections).
    #[test]
    fn a_full_socket_map_is_said_as_connections_with_the_fix() {
        let report = AccelReport {
            cgroup: "/sys/fs/cgroup/x".into(),
            pins: "/sys/fs/bpf/skrelay/accel/x".into(),
            ports: vec![],
            attached: true,
            max_queued: 1 << 20,
            small_write: 64 << 10,
            sockets_open: 65536,
            sockets_joined: 65536,
            connections: 32768,
            sockets_live: 65536,
            messages: 0,
            bytes: 0,
            fallbacks: 0,
            insert_busy: 0,
            insert_failed: 3232,
            last_errno: libc::E2BIG as u64,
            races_lost: 0,
            owner: None,
            owner_unreadable: false,
            cgroup_gone: false,
            link_stale: false,
            pauses: 0,
            resumes: 0,
            stuck: 0,
            demoted_small: 0,
            passed: 0,
            passed_bytes: 0,
            left: 0,
        };
        let text = report.to_string();
        assert!(
            text.contains(
                "WARNING: 3232 connections could not join, and stay on plain TCP, whole: the socket map is full: it \
                 holds 65536 sockets"
            ),
            "{text}"
        );
        let other = AccelReport { last_errno: libc::EPERM as u64, ..report }.to_string();
        assert!(
            other.contains("3232 connections could not join, and stay on plain TCP, whole: Operation not permitted"),
            "{other}"
        );
    }

    #[test]
    fn accel_on_the_root_cgroup_says_it_covers_every_process() {
        let root = enabled("").summary();
        assert!(root.starts_with("accel on: /sys/fs/cgroup (state pinned at"), "{root}");
        assert!(root.contains("root cgroup: connections between ANY processes"), "{root}");
        let svc = enabled("system.slice/x.service").summary();
        assert!(!svc.contains("root cgroup"), "{svc}");
        assert!(svc.ends_with(")\n"), "{svc}");
    }
}
