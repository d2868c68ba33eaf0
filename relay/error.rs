//! Errors that reach the user: each variant reads as one sentence with the fix.
use std::{io, net::SocketAddr};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// SIGINT or SIGTERM came while a relay or proxy was still starting: it stopped there, as
    /// asked, before serving anything (exit 0, as a stop signal's drain ends).
    #[error("{0} while starting: stopped before serving anything")]
    StoppedStarting(&'static str),

    /// A stop signal came while `accel on` or `accel run` set up acceleration: what it had set up
    /// was removed, and nothing was done (exit 2: what was asked did not happen).
    #[error("{signal} while setting up acceleration of cgroup {cgroup}: stopped, and nothing of it is left{what}")]
    StoppedSettingUp { signal: &'static str, cgroup: String, what: &'static str },

    #[error("cannot listen on {addr}: {}", listen_reason(.source, "--listen", .addr))]
    Listen { addr: SocketAddr, source: io::Error },

    #[error("cannot serve metrics on {addr}: {}", listen_reason(.source, .flag, .addr))]
    MetricsListen { addr: SocketAddr, flag: &'static str, source: io::Error },

    #[error("cannot load BPF programs: {reason} ({fix})")]
    BpfUnavailable { reason: String, fix: String },

    /// Reading what is already attached (pins, maps) was refused: nothing was to be loaded.
    #[error("cannot {step}: permission denied (run as root or grant CAP_BPF and CAP_NET_ADMIN)")]
    BpfDenied { step: String },

    #[error("{what}: {}", io_reason(.what, .source))]
    Io { what: String, source: io::Error },

    /// Pinned state of another user: pins are mode 0600, which capabilities other than
    /// CAP_DAC_OVERRIDE do not reach.
    #[error(
        "the {what} state at {dir} belongs to {owner} and its pins are open to their owner only (mode 0600): run \
         this command as {}",
        if .owner == "root" { "root".to_string() } else { format!("{} or root", .owner) }
    )]
    StateOwned { what: &'static str, dir: String, owner: String },

    /// Pinned state may exist where this process cannot look (`bpffs::out_of_reach`).
    #[error("cannot tell whether {what} state exists: {why} (run this command {})", crate::bpffs::run_as())]
    StateOutOfReach { what: &'static str, why: String },

    #[error("cannot {step}: {}", steer_map_reason(.source))]
    SteerMap { step: &'static str, source: io::Error },

    #[error("{0}")]
    Usage(String),

    /// The other event loops' threads (`--threads`) could not be started.
    #[error("cannot start the threads of {loops} event loops: {}", threads_reason(.source))]
    Threads { loops: usize, source: io::Error },

    #[error(
        "cgroup {cgroup} is already accelerated (state pinned at {pins}): run `skrelay accel off --cgroup {}` first",
        crate::sys::shell_arg(.cgroup)
    )]
    AccelAlreadyOn { cgroup: String, pins: String },

    #[error("cgroup {cgroup} is not accelerated by skrelay (nothing pinned at {pins}); `skrelay accel status` lists the ones that are")]
    AccelNotOn { cgroup: String, pins: String },

    #[error("cannot accelerate cgroup {cgroup}: {reason}")]
    AccelConflict { cgroup: String, reason: String },

    #[error(
        "cannot run the {command} in cgroup {cgroup}: skrelay accel accelerates it{limit}, and would move its local \
         clients' bytes into its sockets' queue, past its datapath (run the {command} outside that cgroup, or \
         accelerate it with `skrelay accel on --ports` that leave out this {command}'s ports, {ports})"
    )]
    InsideAccel { command: &'static str, cgroup: String, limit: String, ports: String },

    #[error("{0}")]
    AccelBusy(String),
}

impl Error {
    /// A steer map operation the kernel refused, from aya's error or an io::Error.
    pub fn steer_map(step: &'static str, err: &(dyn std::error::Error + 'static)) -> Self {
        let source = crate::bpf::os_error(err)
            .map(|e| io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO)))
            .unwrap_or_else(|| io::Error::other(crate::bpf::chain(err)));
        Error::SteerMap { step, source }
    }

    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }

    /// Refused for want of privilege or ownership (not a failure of the step itself).
    pub fn is_refusal(&self) -> bool {
        match self {
            Error::BpfDenied { .. } | Error::StateOwned { .. } | Error::StateOutOfReach { .. } => true,
            Error::Io { source, .. } | Error::SteerMap { source, .. } => {
                source.kind() == io::ErrorKind::PermissionDenied || source.raw_os_error() == Some(libc::EPERM)
            }
            Error::BpfUnavailable { reason, .. } => reason.starts_with("operation not permitted"),
            _ => false,
        }
    }

    /// The process exit status for this error: 2 for anything the user can fix by changing the
    /// command or the machine's set-up, 1 for failures while running.
    pub fn exit_code(&self) -> i32 {
        match self {
            // Refused for want of privilege: the user's to fix (run as root).
            Error::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => 2,
            // A read-only file system (bpffs or cgroupfs mounted read-only): the set-up's to fix.
            Error::Io { source, .. } if source.raw_os_error() == Some(libc::EROFS) => 2,
            // Out of descriptors: the limit is the user's to raise.
            Error::Io { source, .. } | Error::SteerMap { source, .. } if out_of_descriptors(source) => 2,
            Error::Io { .. } | Error::SteerMap { .. } => 1,
            Error::StoppedStarting(_) => 0,
            _ => 2,
        }
    }
}

fn steer_map_reason(e: &io::Error) -> String {
    if out_of_descriptors(e) {
        return format!("{e} ({RAISE_NOFILE})");
    }
    format!("{e} (the pinned steering state may come from an incompatible skrelay: `skrelay steer reset` clears it)")
}

/// The fix for a process out of descriptors, as every message that meets one says it.
pub const RAISE_NOFILE: &str = "raise the descriptor limit: `ulimit -n`, or LimitNOFILE= in the unit";

fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// An I/O error as the end of a sentence; a refusal names the fix. `what` says what failed (a
/// path in it tells which file system is read-only).
fn io_reason(what: &str, e: &io::Error) -> String {
    match e.kind() {
        // Root of a user namespace: its capabilities reach nothing outside it (a re-check pass
        // was pointed at `capsh` instead).
        io::ErrorKind::PermissionDenied if crate::bpf::in_user_namespace() => "permission denied: this process runs \
             in a user namespace, whose capabilities reach nothing outside it (run it as root outside this user \
             namespace)"
            .to_string(),
        io::ErrorKind::PermissionDenied if rustix::process::geteuid().is_root() => match missing_capabilities(e) {
            // Named where it can be (a new-user pass without CAP_NET_ADMIN was told only that
            // "a capability" was missing).
            Some(missing) => format!(
                "permission denied, as root: this process lacks {missing} (its bounding set; `capsh --print` shows \
                 it): run it with {missing}"
            ),
            None => "permission denied, as root: a capability this needs is missing from this process (its \
                     bounding set; `capsh --print` shows it), or it runs in a user namespace"
                .into(),
        },
        io::ErrorKind::PermissionDenied => "permission denied (run as root)".into(),
        _ if e.raw_os_error() == Some(libc::EROFS) => {
            let example = if what.contains("cgroup") && !what.contains("/sys/fs/bpf") {
                "`mount -o remount,rw` on the cgroup v2 mount (`findmnt -t cgroup2` shows it)"
            } else {
                "e.g. `mount -o remount,rw /sys/fs/bpf`"
            };
            format!("the file system is mounted read-only (remount it read-write, {example})")
        }
        _ if out_of_descriptors(e) => format!("{e} ({RAISE_NOFILE})"),
        _ => e.to_string(),
    }
}

/// The capabilities whose lack can explain `e` that this process's effective set lacks, named
/// as `capsh` names them; None if it has them all or the set cannot be read. EACCES is a file's
/// permission bits, which root passes with CAP_DAC_OVERRIDE (a re-check pass: a cgroup that
/// could not be made for want of it was blamed on the CAP_SYS_PTRACE it also lacked); EPERM a
/// capability check, of those skrelay's commands use.
fn missing_capabilities(e: &io::Error) -> Option<String> {
    const USED: [(u32, &str); 5] =
        [(12, "CAP_NET_ADMIN"), (19, "CAP_SYS_PTRACE"), (21, "CAP_SYS_ADMIN"), (38, "CAP_PERFMON"), (39, "CAP_BPF")];
    const DAC: [(u32, &str); 1] = [(1, "CAP_DAC_OVERRIDE")];
    let candidates: &[(u32, &str)] = match e.raw_os_error() {
        Some(libc::EACCES) => &DAC,
        Some(libc::EPERM) => &USED,
        _ => return None,
    };
    crate::sys::lacking_capabilities(candidates)
}

fn threads_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        // How many more tasks fit is not known: `--threads 1` needs none (a re-check pass: the
        // one-fewer it named failed too).
        // A thread's stack that does not fit an address-space limit fails the same way (a
        // re-check pass: `prlimit --as=8M` was told of pids.max).
        Some(libc::EAGAIN) => format!(
            "no more tasks allowed (raise the task limit: pids.max of its cgroup, TasksMax= in the unit, or `ulimit \
             -u`{}; or serve with fewer loops: --threads 1 runs its one loop in the main thread)",
            match crate::sys::address_space_limit_kib() {
                Some(kib) => format!(
                    ", or the address-space limit of {kib} KiB that thread stacks count against: `ulimit -v`, LimitAS="
                ),
                None => String::new(),
            }
        ),
        _ => e.to_string(),
    }
}

fn listen_reason(e: &io::Error, flag: &str, addr: &SocketAddr) -> String {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => {
            format!("address already in use (another socket has it: stop it or pick another {flag} port)")
        }
        // For IPv6 the wildcard is [::]; a link-local address is one of an interface (an IPv6
        // stranger pass was told "not an address of this machine" for one on another interface,
        // and to use 0.0.0.0).
        Some(libc::EADDRNOTAVAIL) => match addr {
            SocketAddr::V6(a) if a.scope_id() != 0 => format!(
                "address not available (interface {} has no such address: use one `ip addr` lists on it, or [::])",
                crate::sys::interface_name(a.scope_id()).unwrap_or_else(|| format!("%{}", a.scope_id()))
            ),
            SocketAddr::V6(_) => {
                "address not available (it is not an address of this machine: use one `ip addr` shows, or [::])".into()
            }
            SocketAddr::V4(_) => {
                "address not available (it is not an address of this machine: use one `ip addr` shows, or 0.0.0.0)"
                    .into()
            }
        },
        Some(libc::EACCES) => "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)".into(),
        // bind(2) of a link-local IPv6 address without its interface.
        Some(libc::EINVAL) if matches!(addr, SocketAddr::V6(a) if a.scope_id() == 0 && (a.ip().segments()[0] & 0xffc0) == 0xfe80) => format!(
            "invalid argument (a link-local address needs its interface: {flag} [fe80::1%eth0]:7777, as `ip addr` names it)"
        ),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_not_of_this_machine_names_the_wildcard_of_its_family() {
        let gone = || io::Error::from_raw_os_error(libc::EADDRNOTAVAIL);
        let e = Error::Listen { addr: "10.1.2.3:7777".parse().unwrap(), source: gone() };
        assert!(e.to_string().contains("use one `ip addr` shows, or 0.0.0.0)"), "{e}");
        let e = Error::Listen { addr: "[fd00::9]:7777".parse().unwrap(), source: gone() };
        assert!(e.to_string().contains("use one `ip addr` shows, or [::])"), "{e}");
        let e = Error::Listen { addr: "[fe80::a%1]:7777".parse().unwrap(), source: gone() };
        assert!(
            e.to_string().contains("interface lo has no such address: use one `ip addr` lists on it, or [::])"),
            "{e}"
        );
    }

    #[test]
    fn a_link_local_address_without_its_interface_is_explained() {
        let einval = io::Error::from_raw_os_error(libc::EINVAL);
        let e = Error::Listen { addr: "[fe80::1]:7777".parse().unwrap(), source: einval };
        assert!(e.to_string().contains("needs its interface: --listen [fe80::1%eth0]:7777"), "{e}");
        let e = Error::Listen {
            addr: "127.0.0.1:7777".parse().unwrap(),
            source: io::Error::from_raw_os_error(libc::EINVAL),
        };
        assert!(!e.to_string().contains("link-local"), "{e}");
    }

    #[test]
    fn state_of_another_user_names_who_to_run_as() {
        let e = Error::StateOwned { what: "steering", dir: "/sys/fs/bpf/skrelay/1".into(), owner: "alice".into() };
        assert!(e.to_string().ends_with("run this command as alice or root"), "{e}");
        assert_eq!(e.exit_code(), 2);
        let e = Error::StateOwned { what: "steering", dir: "/sys/fs/bpf/skrelay/1".into(), owner: "root".into() };
        assert!(e.to_string().ends_with("run this command as root"), "{e}");
    }

    #[test]
    fn a_refusal_for_want_of_privilege_names_the_fix_and_is_the_users_to_fix() {
        let denied = Error::io("cannot unpin /sys/fs/bpf/x", io::Error::from_raw_os_error(libc::EACCES));
        // Root lacking a capability is told so, not to run as root.
        let want = match rustix::process::geteuid().is_root() {
            // What it lacks is named when it lacks one skrelay uses (`missing_capabilities`).
            true => "cannot unpin /sys/fs/bpf/x: permission denied, as root: ",
            false => "cannot unpin /sys/fs/bpf/x: permission denied (run as root)",
        };
        assert!(denied.to_string().starts_with(want), "{denied}");
        assert_eq!(denied.exit_code(), 2);
        let ro = Error::io("cannot create /sys/fs/bpf/skrelay", io::Error::from_raw_os_error(libc::EROFS));
        assert_eq!(
            ro.to_string(),
            "cannot create /sys/fs/bpf/skrelay: the file system is mounted read-only (remount it read-write, e.g. \
             `mount -o remount,rw /sys/fs/bpf`)"
        );
        assert_eq!(ro.exit_code(), 2);
        let ro_cgroup =
            Error::io("cannot create cgroup /sys/fs/cgroup/unified/x", io::Error::from_raw_os_error(libc::EROFS));
        assert!(
            ro_cgroup.to_string().contains("on the cgroup v2 mount (`findmnt -t cgroup2` shows it)"),
            "{ro_cgroup}"
        );
        // Out of descriptors, the fix is the limit, whichever step met it.
        let short = Error::io("cannot handle signals", io::Error::from_raw_os_error(libc::EMFILE));
        assert!(short.to_string().ends_with(&format!("({RAISE_NOFILE})")), "{short}");
        assert_eq!(short.exit_code(), 2);
        let maps = crate::bpf::unavailable("create BPF maps", &io::Error::from_raw_os_error(libc::EMFILE));
        assert_eq!(
            maps.to_string(),
            format!("cannot load BPF programs: too many open files while trying to create BPF maps ({RAISE_NOFILE})")
        );
        // Only a refusal means "may not read": root short of descriptors was told it could not.
        assert!(Error::io("cannot open x", io::Error::from_raw_os_error(libc::EACCES)).is_refusal());
        assert!(!Error::io("cannot open x", io::Error::from_raw_os_error(libc::EMFILE)).is_refusal());
        // aya's transparent I/O variant: the errno was lost, and the fix said was "check dmesg".
        let attach = aya::programs::ProgramError::IOError(io::Error::from_raw_os_error(libc::EMFILE));
        let attach = crate::bpf::unavailable("attach the sk_skb programs", &attach);
        assert!(attach.to_string().ends_with(&format!("({RAISE_NOFILE})")), "{attach}");
        // Out of memory: the memory cgroup is what limits BPF memory now, not ulimit -l.
        let short = crate::bpf::unavailable("create BPF maps", &io::Error::from_raw_os_error(libc::ENOMEM));
        assert!(short.to_string().contains("raise this process's memory cgroup limit (memory.max"), "{short}");
        assert_eq!(short.exit_code(), 2);
        let failed = Error::io("cannot unpin /sys/fs/bpf/x", io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(failed.exit_code(), 1);
        let open = crate::bpf::unavailable("open the accel socket map", &io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(
            open.to_string(),
            "cannot open the accel socket map: permission denied (run as root or grant CAP_BPF and CAP_NET_ADMIN)"
        );
        let load = crate::bpf::unavailable("create BPF maps", &io::Error::from_raw_os_error(libc::EPERM));
        assert!(load.to_string().starts_with("cannot load BPF programs: operation not permitted"), "{load}");
    }
}
