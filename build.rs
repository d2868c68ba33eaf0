//! Builds the kernel programs in probes/ with clang and a host-side probe of the shared header's
//! layout (checked against relay/abi.rs by a test).
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
    printf("pub const SOCK_KEY_SIZE: usize = %zu;\n", sizeof(struct sock_key));
    F(sock_key, local_ip6); F(sock_key, remote_ip6); F(sock_key, local_port); F(sock_key, remote_port);
    printf("pub const RELAY_STAT_VERDICTS: u32 = %d;\n", RELAY_STAT_VERDICTS);
    printf("pub const RELAY_STAT_REDIRECTED: u32 = %d;\n", RELAY_STAT_REDIRECTED);
    printf("pub const RELAY_STAT_NO_PEER: u32 = %d;\n", RELAY_STAT_NO_PEER);
    printf("pub const RELAY_STAT_DROPPED: u32 = %d;\n", RELAY_STAT_DROPPED);
    printf("pub const RELAY_STAT_BYTES: u32 = %d;\n", RELAY_STAT_BYTES);
    printf("pub const RELAY_STAT_MAX: u32 = %d;\n", RELAY_STAT_MAX);
    printf("pub const ACCEL_CONFIG_SIZE: usize = %zu;\n", sizeof(struct accel_config));
    F(accel_config, filter_ports); F(accel_config, max_queued); F(accel_config, small_write);
    F(accel_config, small_streak);
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
    printf("pub const ACCEL_STAT_MAX: u32 = %d;\n", ACCEL_STAT_MAX);
    printf("pub const STEER_MAX_BINDINGS: u32 = %d;\n", STEER_MAX_BINDINGS);
    printf("pub const STEER_MAX_PORT_ENTRIES: u32 = %d;\n", STEER_MAX_PORT_ENTRIES);
    printf("pub const STEER_KEY_SIZE: usize = %zu;\n", sizeof(struct steer_key));
    F(steer_key, prefixlen); F(steer_key, family); F(steer_key, proto); F(steer_key, port); F(steer_key, addr);
    printf("pub const STEER_BINDING_SIZE: usize = %zu;\n", sizeof(struct steer_binding));
    F(steer_binding, cookie); F(steer_binding, pid); F(steer_binding, port_lo); F(steer_binding, port_hi);
    F(steer_binding, family); F(steer_binding, proto); F(steer_binding, prefixlen); F(steer_binding, target_family);
    F(steer_binding, target_port); F(steer_binding, addr); F(steer_binding, target_addr); F(steer_binding, comm);
    printf("pub const STEER_COUNTERS_SIZE: usize = %zu;\n", sizeof(struct steer_counters));
    F(steer_counters, hits); F(steer_counters, refused);
    return 0;
}
"#,
    )
    .unwrap();
    let layout_bin = out.join("layout");
    let ok = Command::new(&clang)
        .arg(format!("-I{arch_include}"))
        .arg("-Iprobes")
        .arg(&layout_c)
        .arg("-o")
        .arg(&layout_bin)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        fail("cannot build the host layout probe of probes/skrelay.h");
    }
    let printed = Command::new(&layout_bin).output().expect("run layout probe");
    std::fs::write(out.join("c_layout.rs"), printed.stdout).unwrap();
}

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
