//! The scripts a new user runs from README: each answers `--help` with its usage and exit 0, and
//! refuses a bad argument with one line and exit 2, before it builds or measures anything (a
//! new-user pass found `--help` starting a benchmark, a Rust panic and bash's own usage text,
//! and `bench.sh --pairs abc` refused only after a full run).
use std::{
    process::Command,
    time::{Duration, Instant},
};

/// Runs `bash scripts/NAME ARGS` (`python3` for a .py) from the repository root: (exit code,
/// stdout, stderr, time).
fn script(name: &str, args: &[&str]) -> (i32, String, String, Duration) {
    let t = Instant::now();
    let interpreter = if name.ends_with(".py") { "python3" } else { "bash" };
    let out = Command::new("timeout")
        .args(["20", interpreter, &format!("scripts/{name}")])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr), t.elapsed())
}

const SCRIPTS: [&str; 9] = [
    "accel-bench.py",
    "setup.sh",
    "bench.sh",
    "bench-pairs.sh",
    "bench-pairs-bare.sh",
    "accel-latency.sh",
    "accel-iperf3.sh",
    "accel-sweep.sh",
    "proxy-iperf3.sh",
];

#[test]
fn every_script_answers_help_with_its_usage() {
    for name in SCRIPTS {
        let (code, out, err, took) = script(name, &["--help"]);
        assert_eq!(code, 0, "{name} --help: exit {code}\n{out}{err}");
        assert!(out.lines().count() >= 2 && out.starts_with('#'), "{name} --help prints its header:\n{out}{err}");
        assert!(err.is_empty(), "{name} --help: {err}");
        assert!(took < Duration::from_secs(5), "{name} --help ran for {took:?}: it started work");
    }
    // From inside scripts/ too: bench.sh read its help from ./bench.sh after moving to the
    // repository root (a new-user pass).
    for name in SCRIPTS.iter().filter(|n| n.ends_with(".sh")) {
        let out = Command::new("timeout")
            .args(["20", "bash", &format!("./{name}"), "--help"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts"))
            .output()
            .unwrap();
        let (out, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.starts_with('#') && err.is_empty(), "cd scripts && ./{name} --help:\n{out}{err}");
    }
    // Every script in scripts/ is in the list (accel-common.sh is sourced, not run).
    let mut on_disk: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| (n.ends_with(".sh") || n.ends_with(".py")) && n != "accel-common.sh")
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = SCRIPTS.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed, "a script without this test's check");
}

#[test]
fn a_bad_argument_is_one_line_and_exit_2_before_any_work() {
    let cases: [(&str, &[&str], &str); 10] = [
        ("setup.sh", &["--nope"], "unknown argument"),
        ("accel-bench.py", &["x"], "takes no arguments"),
        ("bench.sh", &["--quick", "--pairs", "abc"], "--pairs takes a list of counts"),
        ("bench-pairs.sh", &["--bytes", "0"], "--bytes takes a number above 0"),
        ("bench-pairs.sh", &["--bytes", "1xG"], "--bytes takes a number above 0"),
        ("bench-pairs-bare.sh", &["x"], "takes no arguments"),
        ("accel-latency.sh", &["0"], "whole numbers above 0"),
        ("accel-iperf3.sh", &["1", "abc"], "whole numbers above 0"),
        ("accel-sweep.sh", &["64", "1", "1", "foo"], "block or poll"),
        ("proxy-iperf3.sh", &["abc"], "whole numbers above 0"),
    ];
    for (name, args, want) in cases {
        let (code, out, err, took) = script(name, args);
        assert_eq!(code, 2, "{name} {args:?}: exit {code}\n{out}{err}");
        assert!(
            err.contains(want) && err.trim_end().lines().count() == 1,
            "{name} {args:?}: one line with `{want}`:\n{err}"
        );
        assert!(took < Duration::from_secs(5), "{name} {args:?} ran for {took:?} before refusing");
    }
}
