//! Real iperf3 through `skrelay proxy`: -R, --bidir and -P 4 finish without errors on the kernel
//! datapath, each receiver got what its sender sent (less at most what one pair may hold inside
//! the host when iperf3 stops counting), and --bidir through the kernel datapath does not collapse:
//! at least half of what it moves through the userspace datapath in the same run. Before the
//! kernel datapath held senders back, --bidir collapsed to 0.05x (0.22 + 0.21 Gbit/s while the
//! senders reported 2-3). Issue 10 asks for 0.9x; measured on a quiet 2-CPU machine: 0.66-0.8x
//! (directions that park at their budget move their bytes through user space while their sender
//! keeps sending: KERNEL-NOTES, "Bounding the relay's psock queue"); since the window clamp for
//! parked bytes (item 7 there), 0.71-1.05x (median 0.85x) on a machine shared with builds.
mod common;
use common::*;
use std::{
    process::{Command, Stdio},
    time::Duration,
};

const MIB: u64 = 1 << 20;

/// The most bytes one stream may have inside the host: the sender's send buffer and the
/// receiver's receive buffer at their autotuning maxima (tcp_wmem, tcp_rmem), the proxy's receive
/// buffer (4 MiB, doubled by the kernel), its send buffer (8 MiB, doubled) and the kernel
/// datapath's 16 MiB budget per direction.
fn in_host_bound() -> u64 {
    let max = |sysctl: &str| -> u64 {
        let text = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{sysctl}")).unwrap();
        text.split_whitespace().last().and_then(|v| v.parse().ok()).unwrap()
    };
    max("tcp_wmem") + max("tcp_rmem") + 8 * MIB + 16 * MIB + 16 * MIB
}

/// One iperf3 run through a proxy on `datapath`: the client's JSON report and the aggregate
/// receive rate in Gbit/s.
fn iperf3_through_proxy(datapath: &str, args: &[&str]) -> (serde_json::Value, f64) {
    let port = free_port().to_string();
    let upstream = format!("127.0.0.1:{port}");
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-p", &port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let proxy = Skrelay::start(&["proxy", "--upstream", &upstream, "--datapath", datapath, "--kernel-after", "0"]);
    let mut json = serde_json::Value::Null;
    for _ in 0..50 {
        let mut cmd = vec!["-c", "127.0.0.1", "-p", "7777", "-t", "3", "-J"];
        cmd.extend_from_slice(args);
        let out = Command::new("iperf3").args(&cmd).output().unwrap();
        json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        // The iperf3 server may not listen yet: the proxy then resets the client.
        let early = json["error"].as_str().is_some_and(|e| e.contains("reset") || e.contains("refused"));
        if !early {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = server.kill();
    let _ = server.wait();
    let (status, log) = proxy.stop(Duration::from_secs(10));
    assert!(json["error"].is_null(), "iperf3 {args:?} through the {datapath} proxy failed: {}\n{log}", json["error"]);
    assert!(status.success(), "{log}");
    let gbps: f64 = iperf3_bytes(&json).iter().map(|&(_, r)| r as f64 * 8.0 / 3e9).sum();
    (json, gbps)
}

#[test]
fn iperf3_reverse_bidir_and_parallel_streams_through_the_kernel_proxy() {
    let _netns = enter_netns();
    if !require_tool("iperf3_reverse_bidir_and_parallel_streams_through_the_kernel_proxy", "iperf3") {
        return;
    }
    if !require_bpf("iperf3_reverse_bidir_and_parallel_streams_through_the_kernel_proxy") {
        return;
    }
    for (args, streams) in [(&["-R"][..], 1u64), (&["--bidir"][..], 2), (&["-P", "4"][..], 4)] {
        let (json, gbps) = iperf3_through_proxy("kernel", args);
        for (sent, received) in iperf3_bytes(&json) {
            assert!(sent > 0 && received <= sent, "iperf3 {args:?}: sent {sent}, received {received}");
            // What may still be inside the host when iperf3 stops counting: per stream, the
            // sender's send buffer, the proxy's two sockets' buffers, the kernel budget and the
            // receiver's receive buffer (its reader is one busy process on 2 CPUs: measured up to
            // 54 MiB in all).
            assert!(
                sent - received <= streams * in_host_bound(),
                "iperf3 {args:?}: receivers got {received} of {sent} bytes: more than the bound was still queued"
            );
        }
        eprintln!("iperf3 {args:?} through the kernel proxy: {gbps:.1} Gbit/s received");
    }
    // --bidir against the userspace datapath in the same run: best of three each, interleaved
    // (the host is shared with other builds).
    let (mut user, mut kernel) = (0.0f64, 0.0f64);
    for _ in 0..3 {
        user = user.max(iperf3_through_proxy("userspace", &["--bidir"]).1);
        kernel = kernel.max(iperf3_through_proxy("kernel", &["--bidir"]).1);
    }
    eprintln!(
        "iperf3 --bidir through the proxy: userspace {user:.1} Gbit/s, kernel {kernel:.1} Gbit/s ({:.2}x)",
        kernel / user
    );
    assert!(kernel >= 0.5 * user, "iperf3 --bidir: kernel {kernel:.1} Gbit/s, userspace {user:.1} Gbit/s");
}
