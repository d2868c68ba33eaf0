//! Builds the kernel programs in probes/ with clang, and two host-side probes whose output the
//! layout tests compare with the Rust side: the shared header's layout (relay/abi.rs) and the
//! kernel uapi constants and offsets that relay/sys.rs writes by hand.
use std::{env, path::PathBuf, process::Command};

const SETUP_HINT: &str = "run scripts/setup.sh to install clang, llvm, libbpf-dev and linux-libc-dev";

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".into());
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-changed=probes");

    let version = Command::new(&clang).arg("--version").output();
    if !matches!(&version, Ok(o) if o.status.success()) {
        fail(&format!("cannot run `{clang}` to build the BPF programs in probes/: {SETUP_HINT}"));
    }
    for header in ["/usr/include/bpf/bpf_helpers.h", "/usr/include/linux/bpf.h"] {
        if !std::path::Path::new(header).exists() {
            fail(&format!("{header} is missing: {SETUP_HINT}"));
        }
    }
    let arch_include = format!("/usr/include/{}-linux-gnu", target_triple_arch());

    let mut probes: Vec<PathBuf> = std::fs::read_dir("probes")
        .expect("probes/ directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".bpf.c"))
        .collect();
    probes.sort();
    for src in probes {
        let name = src.file_name().unwrap().to_string_lossy().replace(".bpf.c", ".bpf.o");
        let obj = out.join(&name);
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf", "-mcpu=v3"])
            .arg(format!("-D__TARGET_ARCH_{}", bpf_target_arch()))
            .arg(format!("-I{arch_include}"))
            .arg("-Iprobes")
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status()
            .unwrap_or_else(|e| fail(&format!("cannot run {clang}: {e}: {SETUP_HINT}")));
        if !status.success() {
            fail(&format!("clang failed to build {}", src.display()));
        }
    }

    // Host probe of the shared header: sizes, offsets and constants, read back by the abi test.
    let layout_c = out.join("layout.c");
    std::fs::write(
        &layout_c,
        r#"#include <stdio.h>
#include <stddef.h>
#include "skrelay.h"
#define F(s, m) printf("pub const " #s "__" #m ": usize = %zu;\n", offsetof(struct s, m))
int main(void) {
    printf("pub const MAX_SOCKETS: u32 = %d;\n", MAX_SOCKETS);
    printf("pub const ACCEL_MAX_PORTS: u32 = %d;\n", ACCEL_MAX_PORTS);
    printf("pub const ACCEL_FLAG_KNOWS_DRAINING: u32 = %d;\n", ACCEL_FLAG_KNOWS_DRAINING);
    printf("pub const ACCEL_FLAG_DRAINING: u32 = %d;\n", ACCEL_FLAG_DRAINING);
    printf("pub const SOCK_KEY_SIZE: usize = %zu;\n", sizeof(struct sock_key));
    F(sock_key, local_ip6); F(sock_key, remote_ip6); F(sock_key, local_port); F(sock_key, remote_port);
    printf("pub const RELAY_STAT_VERDICTS: u32 = %d;\n", RELAY_STAT_VERDICTS);
    printf("pub const RELAY_STAT_REDIRECTED: u32 = %d;\n", RELAY_STAT_REDIRECTED);
    printf("pub const RELAY_STAT_NO_PEER: u32 = %d;\n", RELAY_STAT_NO_PEER);
    printf("pub const RELAY_STAT_DROPPED: u32 = %d;\n", RELAY_STAT_DROPPED);
    printf("pub const RELAY_STAT_BYTES: u32 = %d;\n", RELAY_STAT_BYTES);
    printf("pub const RELAY_STAT_EVENTS_LOST: u32 = %d;\n", RELAY_STAT_EVENTS_LOST);
    printf("pub const RELAY_STAT_MAX: u32 = %d;\n", RELAY_STAT_MAX);
    printf("pub const RELAY_PEER_SIZE: usize = %zu;\n", sizeof(struct relay_peer));
    F(relay_peer, peer); F(relay_peer, budget); F(relay_peer, notify); F(relay_peer, taken);
    F(relay_peer, hold); F(relay_peer, base); F(relay_peer, limit);
    printf("pub const RELAY_STAT_PARKED: u32 = %d;\n", RELAY_STAT_PARKED);
    printf("pub const RELAY_STAT_TRIMMED: u32 = %d;\n", RELAY_STAT_TRIMMED);
    printf("pub const RELAY_STAT_BROKEN: u32 = %d;\n", RELAY_STAT_BROKEN);
    printf("pub const RELAY_STAT_EXTENDED: u32 = %d;\n", RELAY_STAT_EXTENDED);
    printf("pub const RELAY_COUNT_SEQ_KNOWN: u32 = %d;\n", RELAY_COUNT_SEQ_KNOWN);
    printf("pub const RELAY_COUNT_BROKEN: u32 = %d;\n", RELAY_COUNT_BROKEN);
    printf("pub const RELAY_COUNT_SIZE: usize = %zu;\n", sizeof(struct relay_count));
    F(relay_count, redirected); F(relay_count, parked); F(relay_count, next_seq); F(relay_count, flags);
    printf("pub const ACCEL_CONFIG_SIZE: usize = %zu;\n", sizeof(struct accel_config));
    F(accel_config, filter_ports); F(accel_config, max_queued); F(accel_config, small_write);
    F(accel_config, small_streak); F(accel_config, cpus); F(accel_config, flags);
    F(accel_config, woken_wake_function);
    printf("pub const ACCEL_STAT_SOCKETS: u32 = %d;\n", ACCEL_STAT_SOCKETS);
    printf("pub const ACCEL_STAT_CONNECTIONS: u32 = %d;\n", ACCEL_STAT_CONNECTIONS);
    printf("pub const ACCEL_STAT_MESSAGES: u32 = %d;\n", ACCEL_STAT_MESSAGES);
    printf("pub const ACCEL_STAT_BYTES: u32 = %d;\n", ACCEL_STAT_BYTES);
    printf("pub const ACCEL_STAT_FALLBACKS: u32 = %d;\n", ACCEL_STAT_FALLBACKS);
    printf("pub const ACCEL_STAT_INSERT_BUSY: u32 = %d;\n", ACCEL_STAT_INSERT_BUSY);
    printf("pub const ACCEL_STAT_INSERT_FAILED: u32 = %d;\n", ACCEL_STAT_INSERT_FAILED);
    printf("pub const ACCEL_STAT_LAST_ERRNO: u32 = %d;\n", ACCEL_STAT_LAST_ERRNO);
    printf("pub const ACCEL_STAT_RACES_LOST: u32 = %d;\n", ACCEL_STAT_RACES_LOST);
    printf("pub const ACCEL_STAT_PAUSES: u32 = %d;\n", ACCEL_STAT_PAUSES);
    printf("pub const ACCEL_STAT_RESUMES: u32 = %d;\n", ACCEL_STAT_RESUMES);
    printf("pub const ACCEL_STAT_DEMOTED_SMALL: u32 = %d;\n", ACCEL_STAT_DEMOTED_SMALL);
    printf("pub const ACCEL_STAT_PASSED: u32 = %d;\n", ACCEL_STAT_PASSED);
    printf("pub const ACCEL_STAT_PASSED_BYTES: u32 = %d;\n", ACCEL_STAT_PASSED_BYTES);
    printf("pub const ACCEL_STAT_LEFT: u32 = %d;\n", ACCEL_STAT_LEFT);
    printf("pub const ACCEL_STAT_STUCK: u32 = %d;\n", ACCEL_STAT_STUCK);
    printf("pub const ACCEL_STAT_LIVE_SOCKETS: u32 = %d;\n", ACCEL_STAT_LIVE_SOCKETS);
    printf("pub const ACCEL_STAT_MAX: u32 = %d;\n", ACCEL_STAT_MAX);
    printf("pub const STEER_MAX_BINDINGS: u32 = %d;\n", STEER_MAX_BINDINGS);
    printf("pub const STEER_MAX_PORT_ENTRIES: u32 = %d;\n", STEER_MAX_PORT_ENTRIES);
    printf("pub const STEER_KEY_SIZE: usize = %zu;\n", sizeof(struct steer_key));
    F(steer_key, prefixlen); F(steer_key, family); F(steer_key, proto); F(steer_key, port); F(steer_key, addr);
    printf("pub const STEER_BINDING_SIZE: usize = %zu;\n", sizeof(struct steer_binding));
    F(steer_binding, cookie); F(steer_binding, pid); F(steer_binding, port_lo); F(steer_binding, port_hi);
    F(steer_binding, family); F(steer_binding, proto); F(steer_binding, prefixlen); F(steer_binding, target_family);
    F(steer_binding, target_port); F(steer_binding, target_scope); F(steer_binding, addr); F(steer_binding, target_addr); F(steer_binding, comm);
    printf("pub const STEER_COUNTERS_SIZE: usize = %zu;\n", sizeof(struct steer_counters));
    F(steer_counters, hits); F(steer_counters, refused);
    return 0;
}
"#,
    )
    .unwrap();
    host_probe(&clang, &arch_include, &layout_c, &out.join("c_layout.rs"));

    // Host probe of the kernel's uapi headers: the bpf(2) commands, `union bpf_attr` members,
    // TCP_INFO offsets and socket constants that relay/sys.rs (and tests/probes.rs) spell out by
    // hand, read back by sys.rs's layout tests.
    let kernel_c = out.join("kernel_layout.c");
    std::fs::write(&kernel_c, KERNEL_LAYOUT_C).unwrap();
    host_probe(&clang, &arch_include, &kernel_c, &out.join("kernel_layout.rs"));
}

/// Compiles and runs a C program on the host; what it prints (Rust constants) goes to `rs`.
fn host_probe(clang: &str, arch_include: &str, c: &std::path::Path, rs: &std::path::Path) {
    let bin = c.with_extension("bin");
    let ok = Command::new(clang)
        .arg(format!("-I{arch_include}"))
        .arg("-Iprobes")
        .arg(c)
        .arg("-o")
        .arg(&bin)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        fail(&format!("cannot build the host layout probe {}: {SETUP_HINT}", c.display()));
    }
    let printed = Command::new(&bin).output().expect("run layout probe");
    std::fs::write(rs, printed.stdout).unwrap();
}

const KERNEL_LAYOUT_C: &str = r#"#include <stdio.h>
#include <stddef.h>
#include <linux/bpf.h>
#include <linux/tcp.h>
#include <linux/sockios.h>
#include <asm/socket.h>
#include <linux/sock_diag.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#define C(name) printf("pub const " #name ": u64 = %llu;\n", (unsigned long long)(name))
#define A(name, m) printf("pub const ATTR_%s: usize = %zu;\n", #name, offsetof(union bpf_attr, m))
#define O(s, m) printf("pub const %s__%s: usize = %zu;\n", #s, #m, offsetof(struct s, m))
#define S(s) printf("pub const %s__SIZE: usize = %zu;\n", #s, sizeof(struct s))
int main(void) {
    C(BPF_MAP_LOOKUP_ELEM); C(BPF_MAP_UPDATE_ELEM); C(BPF_MAP_DELETE_ELEM); C(BPF_OBJ_GET);
    C(BPF_PROG_GET_FD_BY_ID); C(BPF_OBJ_GET_INFO_BY_FD); C(BPF_PROG_QUERY); C(BPF_LINK_UPDATE);
    C(BPF_PROG_TEST_RUN); C(BPF_F_REPLACE); C(BPF_F_QUERY_EFFECTIVE);
    C(BPF_TCP_ESTABLISHED); C(BPF_TCP_SYN_SENT); C(BPF_TCP_TIME_WAIT); C(BPF_TCP_CLOSE); C(BPF_TCP_CLOSE_WAIT); C(BPF_TCP_LAST_ACK);
    C(BPF_TCP_CLOSING); C(SO_COOKIE); C(SIOCGSKNS); C(SIOCATMARK);
    C(SO_MEMINFO); C(SK_MEMINFO_VARS); C(SK_MEMINFO_WMEM_QUEUED); C(SK_MEMINFO_SNDBUF);
    C(BPF_LINK_GET_FD_BY_ID); C(BPF_LINK_GET_NEXT_ID); C(BPF_LINK_TYPE_NETNS); C(BPF_LINK_TYPE_CGROUP); C(BPF_SK_LOOKUP);
    C(BPF_CGROUP_SOCK_OPS);
    A(map_fd, map_fd); A(key, key); A(value, value); A(flags, flags);
    A(pathname, pathname); A(bpf_fd, bpf_fd); A(file_flags, file_flags);
    A(prog_id, prog_id); A(next_id, next_id); A(open_flags, open_flags);
    A(start_id, start_id); A(link_id, link_id);
    A(info_bpf_fd, info.bpf_fd); A(info_info_len, info.info_len); A(info_info, info.info);
    A(link_update_link_fd, link_update.link_fd); A(link_update_new_prog_fd, link_update.new_prog_fd); A(link_update_flags, link_update.flags); A(link_update_old_prog_fd, link_update.old_prog_fd);
    A(query_target_fd, query.target_fd); A(query_attach_type, query.attach_type); A(query_query_flags, query.query_flags); A(query_attach_flags, query.attach_flags);
    A(query_prog_ids, query.prog_ids); A(query_prog_cnt, query.prog_cnt);
    A(test_prog_fd, test.prog_fd); A(test_retval, test.retval); A(test_data_size_in, test.data_size_in); A(test_data_in, test.data_in); A(test_repeat, test.repeat);
    A(test_ctx_size_in, test.ctx_size_in); A(test_ctx_size_out, test.ctx_size_out); A(test_ctx_in, test.ctx_in); A(test_ctx_out, test.ctx_out); A(test_flags, test.flags);
    O(bpf_link_info, type); O(bpf_link_info, id); O(bpf_link_info, prog_id);
    printf("pub const bpf_link_info__netns_netns_ino: usize = %zu;\n", offsetof(struct bpf_link_info, netns.netns_ino));
    printf("pub const bpf_link_info__netns_attach_type: usize = %zu;\n", offsetof(struct bpf_link_info, netns.attach_type));
    printf("pub const bpf_link_info__cgroup_cgroup_id: usize = %zu;\n", offsetof(struct bpf_link_info, cgroup.cgroup_id));
    O(tcp_info, tcpi_state); O(tcp_info, tcpi_bytes_acked); O(tcp_info, tcpi_bytes_received); O(tcp_info, tcpi_snd_wnd);
    O(tcp_info, tcpi_unacked);
    S(bpf_sk_lookup); O(bpf_sk_lookup, cookie); O(bpf_sk_lookup, family); O(bpf_sk_lookup, protocol);
    O(bpf_sk_lookup, remote_ip4); O(bpf_sk_lookup, remote_ip6); O(bpf_sk_lookup, remote_port);
    O(bpf_sk_lookup, local_ip4); O(bpf_sk_lookup, local_ip6); O(bpf_sk_lookup, local_port);
    C(SOCK_DESTROY); C(NETLINK_SOCK_DIAG); C(INET_DIAG_NOCOOKIE); S(nlmsghdr);
    S(inet_diag_req_v2); O(inet_diag_req_v2, sdiag_family); O(inet_diag_req_v2, sdiag_protocol); O(inet_diag_req_v2, idiag_states); O(inet_diag_req_v2, id);
    S(inet_diag_sockid); O(inet_diag_sockid, idiag_sport); O(inet_diag_sockid, idiag_dport); O(inet_diag_sockid, idiag_src);
    O(inet_diag_sockid, idiag_dst); O(inet_diag_sockid, idiag_if); O(inet_diag_sockid, idiag_cookie);
    return 0;
}
"#;

fn target_triple_arch() -> String {
    env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into())
}

fn bpf_target_arch() -> &'static str {
    match target_triple_arch().as_str() {
        "aarch64" => "arm64",
        "riscv64" => "riscv",
        "s390x" => "s390",
        _ => "x86",
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    println!("cargo:warning={msg}");
    std::process::exit(1);
}
