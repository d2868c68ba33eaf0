//! Loading skrelay's kernel programs (built from probes/ by build.rs and embedded in the binary)
//! and turning the kernel's refusals into sentences with a fix.
use crate::error::Error;
use aya::{Ebpf, EbpfLoader};
use std::io;

/// The compiled objects, one per hook.
pub mod objects {
    use aya::include_bytes_aligned;
    pub static RELAY: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay.bpf.o"));
    pub static ACCEL: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/accel.bpf.o"));
    pub static STEER: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steer.bpf.o"));
    pub static CALIBRATE: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/calibrate.bpf.o"));
}

/// Loads an embedded object (maps are created, programs not yet loaded).
pub fn load(object: &[u8]) -> Result<Ebpf, Error> {
    EbpfLoader::new().load(object).map_err(|e| unavailable("create BPF maps", &e))
}

/// The first `io::Error` in an error's chain, where the kernel's answer is.
pub fn os_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io);
        }
        // aya's `#[error(transparent)]` I/O variants hide theirs from `source()`: an attach short
        // of descriptors was told to check dmesg (a re-check pass).
        match e.downcast_ref::<aya::programs::ProgramError>() {
            Some(aya::programs::ProgramError::IOError(io)) => return Some(io),
            Some(aya::programs::ProgramError::MapError(aya::maps::MapError::IoError(io))) => return Some(io),
            _ => {}
        }
        if let Some(aya::maps::MapError::IoError(io)) = e.downcast_ref::<aya::maps::MapError>() {
            return Some(io);
        }
        cur = e.source();
    }
    None
}

/// Explains why a BPF step failed, naming the fix.
pub fn unavailable(step: &str, err: &(dyn std::error::Error + 'static)) -> Error {
    // The whole story (a refused program's verifier log) for RUST_LOG=debug.
    log::debug!("{step}: {}", chain(err));
    let errno = os_error(err).and_then(|e| e.raw_os_error());
    // Opening or reading pinned state loads nothing: say what was refused.
    if matches!(errno, Some(libc::EPERM) | Some(libc::EACCES))
        && (step.starts_with("open ") || step.starts_with("read "))
    {
        return Error::BpfDenied { step: step.to_string() };
    }
    let (reason, fix) = match errno {
        // With every capability BPF asks for, EACCES is the verifier's refusal. Under a small
        // address-space limit aya cannot read the kernel's BTF (5 MB or more), loads without
        // it, and the verifier refuses what needs it: root was told to run as root (a
        // resource-limits pass, `ulimit -v 10000`).
        Some(libc::EACCES) if holds_bpf_capabilities() => match crate::sys::address_space_limit_kib() {
            Some(kib) => (
                format!(
                    "the kernel's BTF did not fit the address-space limit of {kib} KiB (ulimit -v), so the verifier \
                     refused the programs"
                ),
                "raise that limit, or remove it (LimitAS= in a unit), or use --datapath userspace".to_string(),
            ),
            None => (
                "the kernel's verifier refused the BPF programs".to_string(),
                "RUST_LOG=debug shows the verifier's log; check that the kernel has BTF (/sys/kernel/btf/vmlinux), or \
                 use --datapath userspace"
                    .to_string(),
            ),
        },
        Some(libc::EPERM) | Some(libc::EACCES) => {
            // CAP_PERFMON too: the relay verdict reads kernel memory (bpf_probe_read_kernel, BTF
            // casts), which a process with CAP_BPF and CAP_NET_ADMIN alone may not load.
            let fix = match in_user_namespace() {
                true => "BPF takes capabilities in the initial user namespace, which root of a user namespace has \
                         not: run as root outside it, or with --datapath userspace"
                    .to_string(),
                false => {
                    format!("run as root or grant CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON{}", missing_capabilities())
                }
            };
            ("operation not permitted".to_string(), fix)
        }
        Some(libc::ENOSYS) => (
            "the kernel has no bpf() system call".to_string(),
            "use a kernel built with CONFIG_BPF_SYSCALL, or --datapath userspace".to_string(),
        ),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(ENOTSUPP) => (
            format!("the kernel refused to {step} (invalid argument)"),
            "skrelay needs Linux 5.10 or newer with CONFIG_BPF_STREAM_PARSER; use --datapath userspace on this kernel"
                .to_string(),
        ),
        // Opening or reading pinned state loads nothing (`skrelay metrics` at its limit said it
        // could not load BPF programs: a re-check pass).
        Some(libc::EMFILE) | Some(libc::ENFILE) if step.starts_with("open ") || step.starts_with("read ") => {
            return Error::Usage(format!("cannot {step}: too many open files ({})", crate::error::RAISE_NOFILE));
        }
        Some(libc::EMFILE) | Some(libc::ENFILE) => {
            (format!("too many open files while trying to {step}"), crate::error::RAISE_NOFILE.to_string())
        }
        // BPF memory is charged to the memory cgroup since Linux 5.11, not to RLIMIT_MEMLOCK (a
        // helper's resource-limits pass: a relay under memory.max 24M was told to raise ulimit -l,
        // which changes nothing here). Each event loop loads its own programs and maps.
        Some(libc::ENOMEM) => (
            format!("out of memory while trying to {step}"),
            "free memory, or raise this process's memory cgroup limit (memory.max, or memory.limit_in_bytes on \
             cgroup v1; MemoryMax= in the unit), or run \
             fewer --threads: each event loop loads its own maps; before Linux 5.11, raise the memlock limit \
             (ulimit -l)"
                .to_string(),
        ),
        _ => (
            format!("cannot {step}: {}", chain(err)),
            "check `dmesg` and that the kernel supports BPF socket maps, or use --datapath userspace".to_string(),
        ),
    };
    Error::BpfUnavailable { reason, fix }
}

/// `unavailable` for a command that has no userspace datapath to fall back on (`steer`,
/// `accel`): the same reason and fix, without "--datapath userspace" (a steer pass was told to
/// use it, and `steer add` has no such option).
pub fn unavailable_no_fallback(step: &str, err: &(dyn std::error::Error + 'static)) -> Error {
    fallback_said_as(unavailable(step, err), None)
}

/// Rewrites where a `BpfUnavailable` fix offers `--datapath userspace`: left out (`None`), or
/// offered as `instead` ("run relay and proxy with --datapath userspace", for `probe`, which
/// takes no --datapath either).
pub fn fallback_said_as(err: Error, instead: Option<&str>) -> Error {
    let Error::BpfUnavailable { reason, fix } = err else { return err };
    let or = instead.map_or(String::new(), |s| format!(", or {s}"));
    let here = instead.map_or(String::new(), |s| format!("; {s} here"));
    let fix = [", or use --datapath userspace", ", or with --datapath userspace", ", or --datapath userspace"]
        .iter()
        .fold(fix, |fix, said| fix.replace(said, &or))
        .replace("; use --datapath userspace on this kernel", &here);
    Error::BpfUnavailable { reason, fix }
}

/// Which of the capabilities loading skrelay's programs takes this process lacks, for the fix:
/// "; this process lacks CAP_PERFMON", or, for root, "; this root process lacks ...: `capsh
/// --print` shows what drops it": the same sentence whatever was missing told a root process
/// whose bounding set dropped one to run as root (a helper's privilege pass). Empty when they
/// cannot be read or none is missing.
fn missing_capabilities() -> String {
    // capability.h: NET_ADMIN 12, PERFMON 38, BPF 39.
    lacking_note(&[(39, "CAP_BPF"), (12, "CAP_NET_ADMIN"), (38, "CAP_PERFMON")])
}

/// "; this process lacks ..." for those of `wanted` this process lacks, or nothing.
pub fn lacking_note(wanted: &[(u32, &str)]) -> String {
    let Some(names) = crate::sys::lacking_capabilities(wanted) else { return String::new() };
    let them = if names.contains(" and ") { "them" } else { "it" };
    match rustix::process::geteuid().is_root() {
        // Which set drops them (bounding set, securebits, a container) is `capsh`'s to say: a
        // root process with a full bounding set and securebits noroot was told its bounding set
        // dropped them (a re-check pass).
        true => format!("; this root process lacks {names}: `capsh --print` shows what drops {them}"),
        false => format!("; this process lacks {names}"),
    }
}

/// This process holds, effective, what loading skrelay's programs takes: CAP_SYS_ADMIN, or
/// CAP_BPF with CAP_PERFMON and CAP_NET_ADMIN.
fn holds_bpf_capabilities() -> bool {
    let Some(eff) = crate::sys::effective_capabilities(std::path::Path::new("/proc/self")) else { return false };
    let has = |cap: u32| eff & (1 << cap) != 0;
    // capability.h: NET_ADMIN 12, SYS_ADMIN 21, PERFMON 38, BPF 39.
    !in_user_namespace() && (has(21) || (has(39) && has(38) && has(12)))
}

/// This process runs in a user namespace other than the initial one (`unshare -U`, a rootless
/// container): its uid map is not the identity over every uid.
pub fn in_user_namespace() -> bool {
    std::fs::read_to_string("/proc/self/uid_map")
        .is_ok_and(|m| m.split_whitespace().collect::<Vec<_>>() != ["0", "0", "4294967295"])
}

/// "a: b: c" from an error and its sources.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !parts.last().is_some_and(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = e.source();
    }
    parts.join(": ")
}

/// The kernel-internal ENOTSUPP that BPF calls return for unsupported features (not in libc).
const ENOTSUPP: i32 = 524;
