//! `skrelay status` shows what is attached, whoever attached it: pinned steering, the `--ports`
//! funnels of running relays and proxies, and accelerated cgroups, each in one JSON shape.
//! Two funnels cannot silently split ports between them.
mod common;
use common::*;
use std::{collections::BTreeSet, time::Duration};

struct Reset;

impl Drop for Reset {
    fn drop(&mut self) {
        let _ = skrelay_output(&["steer", "reset"]);
    }
}

fn ok(args: &[&str]) -> String {
    skrelay_ok(args)
}

fn status_json() -> serde_json::Value {
    serde_json::from_str(&ok(&["status", "--json"])).unwrap()
}

fn keys(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn status_lists_the_ports_funnels_of_running_relays_and_overlaps_are_refused() {
    let _netns = enter_netns();
    if !require_bpf("status_lists_the_ports_funnels_of_running_relays_and_overlaps_are_refused") {
        return;
    }
    let _reset = Reset;
    let empty = status_json();
    assert!(ok(&["status"]).contains("steer: nothing attached"));
    assert_eq!(empty["steer"]["funnels"], serde_json::json!([]), "{empty}");

    let a = Skrelay::start(&["relay", "--datapath", "userspace", "--listen", "127.0.0.1:7000", "--ports", "9000-9015"]);
    let text = ok(&["status"]);
    assert!(!text.contains("nothing attached"), "status hides a running relay's --ports:\n{text}");
    assert!(
        text.contains(&format!(
            "--ports of process {}: 16 ports (9000-9015) on 127.0.0.1/32 -> 127.0.0.1:7000",
            a.pid()
        )),
        "{text}"
    );
    let st = status_json();
    assert_eq!(keys(&st["steer"]), keys(&empty["steer"]), "one JSON shape: {st} vs {empty}");
    assert_eq!(st["steer"]["attached"], true, "{st}");
    let funnels = st["steer"]["funnels"].as_array().unwrap();
    assert_eq!(funnels.len(), 1, "{st}");
    assert_eq!(funnels[0]["pid"], a.pid(), "{st}");
    assert_eq!(funnels[0]["ports"], "9000-9015", "{st}");
    assert_eq!(funnels[0]["target"], "127.0.0.1:7000", "{st}");

    // A second relay whose --ports overlap used to say "16 ports steered" while 9006-9015 kept
    // going to the first: refused, naming the owner.
    let (code, _, err) =
        skrelay_output(&["relay", "--datapath", "userspace", "--listen", "127.0.0.1:7001", "--ports", "9006-9021"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!(
            "cannot take --ports 9006-9015: process {} already takes them for 127.0.0.1:7000",
            a.pid()
        )),
        "{err}"
    );
    assert!(std::net::TcpStream::connect("127.0.0.1:7001").is_err(), "the refused relay left a listener");
    // Also when the first one listens on every address.
    let (code, _, err) =
        skrelay_output(&["proxy", "--listen", "0.0.0.0:7002", "--ports", "9015", "--upstream", "127.0.0.1:7000"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("cannot take --ports 9015: process {} already takes it for", a.pid()))
            && err.contains("leave that port out"),
        "{err}"
    );

    // Disjoint ports are fine, and both are listed.
    let b = Skrelay::start(&["relay", "--datapath", "userspace", "--listen", "127.0.0.1:7003", "--ports", "9100"]);
    let st = status_json();
    let pids: BTreeSet<i64> =
        st["steer"]["funnels"].as_array().unwrap().iter().map(|f| f["pid"].as_i64().unwrap()).collect();
    assert_eq!(pids, [a.pid() as i64, b.pid() as i64].into_iter().collect(), "{st}");

    // And `steer add` cannot take a port a running --ports holds.
    let (code, _, err) = skrelay_output(&["steer", "add", "--ports", "9010", "--to", "127.0.0.1:7000"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!(
            "cannot bind tcp 0.0.0.0/0 port 9010: process {} takes tcp port 9010 on 127.0.0.1/32 with --ports while it \
             runs (stop it, or leave that port out)",
            a.pid()
        )),
        "{err}"
    );

    // A port pinned by `steer add` is refused too: the pinned binding would keep it.
    ok(&["steer", "add", "--ports", "9200", "--to", "127.0.0.1:7000"]);
    let (code, _, err) =
        skrelay_output(&["relay", "--datapath", "userspace", "--listen", "127.0.0.1:7004", "--ports", "9199-9201"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`skrelay steer` already binds tcp 0.0.0.0/0 port 9200 to 127.0.0.1:7000"), "{err}");
    assert!(err.contains("(remove it with `skrelay steer remove --ports 9200`,"), "{err}");
    // A binding of a narrower prefix: the command it suggests must name the prefix, or it removes
    // nothing (`steer remove` takes every address by default; a helper's pass, 2026-12-05).
    ok(&["steer", "add", "--ports", "9300", "--addr", "127.0.0.2/32", "--to", "127.0.0.1:7000"]);
    let (code, _, err) =
        skrelay_output(&["relay", "--datapath", "userspace", "--listen", "0.0.0.0:7005", "--ports", "9300"]);
    assert_eq!(code, 2, "{err}");
    let fix = "skrelay steer remove --ports 9300 --addr 127.0.0.2/32";
    assert!(err.contains(&format!("(remove it with `{fix}`,")), "{err}");
    ok(&fix.split(' ').skip(1).collect::<Vec<_>>());
    let st = status_json();
    assert_eq!(keys(&st["steer"]), keys(&empty["steer"]), "one JSON shape: {st} vs {empty}");

    // A funnel goes with its process, and so does its line.
    let (status, log) = a.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    let st = status_json();
    assert_eq!(st["steer"]["funnels"].as_array().unwrap().len(), 1, "{st}");
    drop(b);
}

#[test]
fn accel_status_json_has_one_shape_with_or_without_cgroups() {
    // It printed a bare object per cgroup, one per line, and nothing at all for none, while
    // `status --json` had {"cgroups": [...]}.
    let _netns = enter_netns();
    if !require_bpf("accel_status_json_has_one_shape_with_or_without_cgroups") {
        return;
    }
    let own: serde_json::Value = serde_json::from_str(&ok(&["accel", "status", "--json"])).unwrap();
    assert!(own["cgroups"].is_array(), "{own}");
    assert_eq!(keys(&own), keys(&status_json()["accel"]));
}

/// Accel state pinned by another skrelay version (here: a counters map of the old, shorter
/// layout) must not break `status` for everything else, and `accel off` of this version must
/// still remove it: after an upgrade the user has no other binary to clean up with.
#[test]
fn accel_state_of_another_version_is_reported_and_accel_off_removes_it() {
    let _netns = enter_netns();
    if !require_bpf("accel_state_of_another_version_is_reported_and_accel_off_removes_it") {
        return;
    }
    let rel = format!("skrelay-test-{}-foreign", std::process::id());
    ok(&["accel", "on", "--cgroup", &rel]);
    let pins = std::path::Path::new("/sys/fs/bpf/skrelay/accel").join(format!("%2F{rel}"));
    assert!(pins.join("accel_stats").exists(), "no pinned accel_stats in {}", pins.display());
    // What the previous release pinned: 9 per-CPU counters where this one has more.
    std::fs::remove_file(pins.join("accel_stats")).unwrap();
    let made = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(pins.join("accel_stats"))
        .args(["type", "percpu_array", "key", "4", "value", "8", "entries", "9", "name", "accel_stats"])
        .status()
        .expect("run bpftool (scripts/setup.sh)");
    assert!(made.success(), "bpftool map create failed");

    let text = ok(&["status"]);
    assert!(text.contains("cannot be read by this skrelay") && text.contains("accel off --cgroup"), "{text}");
    let st = status_json();
    assert_eq!(st["accel"]["unreadable"].as_array().map(Vec::len), Some(1), "{st}");
    let own: serde_json::Value = serde_json::from_str(&ok(&["accel", "status", "--json"])).unwrap();
    assert_eq!(keys(&own), keys(&st["accel"]), "one JSON shape: {own}");

    ok(&["accel", "off", "--cgroup", &rel]);
    assert!(!pins.exists(), "accel off left {} behind", pins.display());
    let st = status_json();
    assert_eq!(st["accel"]["unreadable"], serde_json::json!([]), "{st}");
    let _ = std::fs::remove_dir(cgroup_v2_mount().join(&rel));
}

#[test]
fn read_only_commands_answer_on_a_bare_bpffs_and_leave_nothing_behind() {
    // A private mount namespace whose /sys/fs/bpf is an empty tmpfs: skrelay could mount bpffs
    // over it (CAP_SYS_ADMIN is kept), but commands that only look must not mount, create or lock
    // anything there: they answer that nothing is attached and leave the directory as it was.
    let _netns = enter_netns();
    let commands =
        ["steer list", "steer list --json", "status", "status --json", "accel status", "accel status --json"];
    let script = format!(
        "mount -t tmpfs none /sys/fs/bpf || exit 9; for c in {}; do {SKRELAY} $c || exit 10; echo ===; done; \
         echo FSTYPE=$(stat -f -c %T /sys/fs/bpf) ENTRIES=$(ls -A /sys/fs/bpf | wc -l)",
        commands.iter().map(|c| format!("'{c}'")).collect::<Vec<_>>().join(" ")
    );
    let out = std::process::Command::new("unshare").args(["-m", "sh", "-c", &script]).output().expect("unshare");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    let answers: Vec<&str> = stdout.split("===\n").collect();
    assert_eq!(answers.len(), commands.len() + 1, "{stdout}");
    assert_eq!(answers[0].trim(), "no steering bindings in this network namespace");
    assert_eq!(serde_json::from_str::<serde_json::Value>(answers[1]).unwrap(), serde_json::json!([]));
    assert!(
        answers[2].contains("steer: nothing attached") && answers[2].contains("accel: no cgroup"),
        "{}",
        answers[2]
    );
    let status: serde_json::Value = serde_json::from_str(answers[3]).unwrap();
    assert_eq!(status["steer"]["attached"], false);
    assert_eq!(status["accel"]["cgroups"], serde_json::json!([]));
    assert_eq!(answers[4].trim(), "accel: no cgroup is accelerated");
    assert_eq!(serde_json::from_str::<serde_json::Value>(answers[5]).unwrap()["cgroups"], serde_json::json!([]));
    assert_eq!(answers[6].trim(), "FSTYPE=tmpfs ENTRIES=0", "a read-only command mounted or created something");
    assert!(stderr.is_empty(), "{stderr}");
}

/// `skrelay SUBCOMMAND` as user nobody without capabilities.
fn as_nobody(args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", SKRELAY]).args(args);
    exit_and_output(cmd)
}

/// What `cmd` exited with and wrote (stdout, stderr).
fn exit_and_output(mut cmd: std::process::Command) -> (i32, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Steering pinned by root (mode 0600) made an unprivileged `status` exit 2 with nothing but the
/// steer error: it says the steer state is not readable without root and shows the rest, as for
/// accel state it cannot read.
#[test]
fn status_without_root_shows_root_pinned_steering_as_unreadable_and_the_rest() {
    let _netns = enter_netns();
    if !require_bpf("status_without_root_shows_root_pinned_steering_as_unreadable_and_the_rest")
        || !require_tool("status_without_root_shows_root_pinned_steering_as_unreadable_and_the_rest", "setpriv")
    {
        return;
    }
    let _reset = Reset;
    let _l = std::net::TcpListener::bind("127.0.0.1:9300").unwrap();
    ok(&["steer", "add", "--ports", "9301", "--to", "127.0.0.1:9300"]);
    let dir = format!("/sys/fs/bpf/skrelay/{}", netns_ino());

    let (code, out, err) = as_nobody(&["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("steer: state pinned at {dir} is not readable without root")), "{out}{err}");
    assert!(out.contains("accel: ") && out.contains("relays: "), "the other sections are missing:\n{out}");

    let (code, out, err) = as_nobody(&["status", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["steer"]["unreadable"]["pins"], serde_json::json!(dir), "{st}");
    assert!(st["steer"]["unreadable"]["error"].as_str().is_some_and(|e| e.contains("permission denied")), "{st}");
    assert_eq!(st["steer"]["attached"], true, "{st}");
    assert!(st["accel"]["cgroups"].is_array() && st["relays"]["processes"].is_array(), "{st}");
    // One JSON shape: root sees the same keys, with no unreadable state.
    let root = status_json();
    assert_eq!(keys(&root["steer"]), keys(&st["steer"]), "{root} vs {st}");
    assert_eq!(root["steer"]["unreadable"], serde_json::Value::Null, "{root}");
    // `skrelay metrics` cannot export bindings it may not read: it said `attached 1` with no
    // binding series (an alert on a gone target never fired). It refuses at start, as documented.
    let out = std::process::Command::new("timeout")
        .args(["10", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", SKRELAY])
        .args(["metrics", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("cannot read the pinned steer state at {dir}: permission denied")), "{err}");
}

/// A root relay's `--ports` seen by a user who may not list BPF links: status said "steer:
/// nothing attached" (JSON `attached: false`) while the port was steered, and "no relay or proxy
/// is running" above the line counting the ones not shown. Now it says what it cannot know.
#[test]
fn status_without_root_does_not_deny_what_it_cannot_see() {
    let _netns = enter_netns();
    if !require_bpf("status_without_root_does_not_deny_what_it_cannot_see")
        || !require_tool("status_without_root_does_not_deny_what_it_cannot_see", "setpriv")
    {
        return;
    }
    let relay = Skrelay::start(&["relay", "--datapath", "userspace", "--listen", "127.0.0.1:7010", "--ports", "9400"]);
    let (code, out, err) = as_nobody(&["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("running --ports funnels cannot be listed without root"), "{out}");
    assert!(!out.contains("nothing attached") && !out.contains("no relay or proxy is running"), "{out}");
    let (code, out, err) = as_nobody(&["status", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["steer"]["attached"], serde_json::Value::Null, "{st}");
    assert_eq!(st["steer"]["funnels_unlisted"], true, "{st}");
    let root = status_json();
    assert_eq!(root["steer"]["attached"], true, "{root}");
    assert_eq!(keys(&root["steer"]), keys(&st["steer"]), "one JSON shape: {root} vs {st}");
    let (status, log) = relay.stop(Duration::from_secs(10));
    assert!(status.success(), "{log}");
}

/// `skrelay` as user nobody under a sysfs of its own (what `ip netns exec` mounts), where
/// /sys/fs/bpf is a bare directory and root's state lives in the outer mount namespace's bpffs,
/// out of nobody's reach. A stranger pass was told "no steering bindings in this network
/// namespace" (exit 0) and "accel: no cgroup is accelerated" while root's bindings were live, and
/// its relay on a steered port started without a word.
fn as_nobody_under_a_sysfs_of_its_own(secs: &str, args: &[&str]) -> (i32, String, String) {
    // As `ip netns exec` does, the sysfs named after the network namespace.
    let script = "umount -l /sys && mount -t sysfs skrelay-test-netns /sys && exec setpriv --reuid=65534 \
                  --regid=65534 --clear-groups --inh-caps=-all \"$0\" \"$@\"";
    let mut cmd = std::process::Command::new("timeout");
    cmd.args(["-s", "INT", secs, "unshare", "-m", "--propagation", "private", "sh", "-c", script, SKRELAY]).args(args);
    exit_and_output(cmd)
}

#[test]
fn without_root_under_a_sysfs_of_its_own_skrelay_says_it_cannot_tell_what_is_pinned() {
    let _netns = enter_netns();
    let name = "without_root_under_a_sysfs_of_its_own_skrelay_says_it_cannot_tell_what_is_pinned";
    if !require_bpf(name) || !require_tool(name, "setpriv") || !require_tool(name, "unshare") {
        return;
    }
    let _reset = Reset;
    let _l = std::net::TcpListener::bind("127.0.0.1:9300").unwrap();
    ok(&["steer", "add", "--ports", "9301", "--to", "127.0.0.1:9300"]);
    let cannot_tell = "here holds no bpffs (a mount namespace of its own, as `ip netns exec` makes), and only root \
                       can look into the one outside";

    let (code, out, err) = as_nobody_under_a_sysfs_of_its_own("10", &["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("steer: cannot tell whether bindings are pinned: /sys/fs/bpf") && out.contains(cannot_tell),
        "{out}{err}"
    );
    assert!(out.contains("accel: cannot tell which cgroups are accelerated"), "{out}{err}");
    assert!(!out.contains("nothing attached") && !out.contains("no cgroup is accelerated"), "{out}");

    let (code, out, err) = as_nobody_under_a_sysfs_of_its_own("10", &["status", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    let dir = format!("/sys/fs/bpf/skrelay/{}", netns_ino());
    assert_eq!(st["steer"]["unreadable"]["pins"], serde_json::json!(dir), "{st}");
    // Not known to be pinned or attached (a re-check pass: `attached: true` in an empty namespace).
    let null = serde_json::Value::Null;
    assert_eq!((&st["steer"]["attached"], &st["steer"]["pinned"]), (&null, &null), "{st}");
    assert!(st["accel"]["out_of_reach"].as_str().is_some_and(|w| w.contains(cannot_tell)), "{st}");
    assert_eq!(status_json()["accel"]["out_of_reach"], serde_json::Value::Null, "root sees it");

    let (code, out, err) = as_nobody_under_a_sysfs_of_its_own("10", &["steer", "list"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("cannot tell whether steering state exists") && err.contains("(run this command as root)"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
    let (code, out, err) = as_nobody_under_a_sysfs_of_its_own("10", &["steer", "reset"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("cannot tell whether steering state exists"), "{err}");
    let (code, out, err) = as_nobody_under_a_sysfs_of_its_own("10", &["steer", "remove", "--ports", "9301"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("cannot tell whether steering state exists"), "{err}");

    let (code, out, err) = as_nobody_under_a_sysfs_of_its_own("10", &["accel", "status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("accel: cannot tell which cgroups are accelerated"), "{out}{err}");

    let (code, _, err) = as_nobody_under_a_sysfs_of_its_own("10", &["metrics", "--listen", "127.0.0.1:0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot read skrelay's pinned state: /sys/fs/bpf here holds no bpffs"), "{err}");

    // Where /sys/fs/bpf simply has no bpffs (a container or host that never mounted one), root's
    // commands would pin right there: nothing pinned is true, and said.
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(
            "umount -l /sys && mount -t sysfs sysfs /sys && exec setpriv --reuid=65534 --regid=65534 \
             --clear-groups --inh-caps=-all \"$0\" steer list",
        )
        .arg(SKRELAY);
    let (code, out, err) = exit_and_output(cmd);
    assert_eq!((code, out.trim()), (0, "no steering bindings in this network namespace"), "{err}");

    // A relay on the steered port is warned that it may get none of its connections.
    let (_, _, err) = as_nobody_under_a_sysfs_of_its_own(
        "1",
        &["relay", "--datapath", "userspace", "--listen", "127.0.0.1:9301", "--drain-timeout", "0.1"],
    );
    assert!(err.contains("this user cannot tell whether `skrelay steer` has bindings"), "{err}");
    // Nor whether accel covers its cgroup: it started without a word (a re-check pass).
    assert!(err.contains("cannot check whether skrelay accel accelerates this relay's cgroup"), "{err}");
}

/// Accel state root pinned is, for another user, state it may not read, not state of another
/// skrelay version: `status` says so and names who can see it.
#[test]
fn status_without_root_says_root_pinned_accel_state_needs_root() {
    let _netns = enter_netns();
    if !require_bpf("status_without_root_says_root_pinned_accel_state_needs_root")
        || !require_tool("status_without_root_says_root_pinned_accel_state_needs_root", "setpriv")
    {
        return;
    }
    let rel = format!("skrelay-status-denied-{}", std::process::id());
    ok(&["accel", "on", "--cgroup", &rel, "--small-write", "64K"]);
    let (code, out, err) = as_nobody(&["status"]);
    ok(&["accel", "off", "--cgroup", &rel, "--force"]);
    assert_eq!(code, 0, "{out}{err}");
    let line = out.lines().find(|l| l.contains(&rel)).unwrap_or_else(|| panic!("no line for {rel}:\n{out}"));
    assert!(line.contains("is not readable without root (permission denied)"), "{line}");
    assert!(!line.contains("another version"), "{line}");
}

/// Pins without their link (a `steer add` killed before it pinned the link, or a `reset` killed
/// part-way) steer nothing but hold maps: `status` shows them and names `steer reset`, which
/// takes them, rather than "nothing attached".
#[test]
fn status_shows_steer_pins_left_without_a_link_and_reset_removes_them() {
    let _netns = enter_netns();
    if !require_bpf("status_shows_steer_pins_left_without_a_link_and_reset_removes_them") {
        return;
    }
    let _reset = Reset;
    let _l = std::net::TcpListener::bind("127.0.0.1:9310").unwrap();
    ok(&["steer", "add", "--ports", "9311", "--to", "127.0.0.1:9310"]);
    let dir = format!("/sys/fs/bpf/skrelay/{}", netns_ino());
    std::fs::remove_file(format!("{dir}/link")).unwrap();
    let text = ok(&["status"]);
    assert!(
        text.contains(&format!("left at {dir} by an interrupted command")) && text.contains("`skrelay steer reset`"),
        "{text}"
    );
    let st = status_json();
    assert_eq!(st["steer"]["leftover"]["pins"], serde_json::json!(dir), "{st}");
    assert!(st["steer"]["leftover"]["count"].as_u64().is_some_and(|n| n > 0), "{st}");
    ok(&["steer", "reset"]);
    assert!(ok(&["status"]).contains("steer: nothing attached"));
    assert_eq!(status_json()["steer"]["leftover"], serde_json::Value::Null);
}
