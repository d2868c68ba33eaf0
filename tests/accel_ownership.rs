//! Who owns an accelerated cgroup, and that its state goes however its owner ends: `accel run`
//! killed with SIGKILL, a command that leaves a process behind, `accel off` after an `accel on`
//! that created the cgroup.
mod common;
use common::*;
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

fn ok(args: &[&str]) -> String {
    skrelay_ok(args)
}

/// The tests of this file share the accel root in bpffs, and every `accel on` or `off` removes
/// what set-ups killed half-way left there (any dead process's). One test fabricates such
/// leftovers and looks for them in `status`: a test beside it that ran `accel on` meanwhile
/// removed them (a fresh-clone CI run, 2026-12-05). So they run one at a time.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ACCEL_ROOT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ACCEL_ROOT.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn v2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            left.split_whitespace().nth(4).map(PathBuf::from)
        })
        .expect("a cgroup v2 mount")
}

fn pins_of(cgroup: &Path) -> PathBuf {
    let rel = cgroup.strip_prefix(v2_mount()).unwrap().to_string_lossy().replace('%', "%25").replace('/', "%2F");
    PathBuf::from(format!("/sys/fs/bpf/skrelay/accel/%2F{rel}"))
}

fn wait_gone(path: &Path, within: Duration, why: &str) {
    let deadline = Instant::now() + within;
    while path.exists() {
        assert!(Instant::now() < deadline, "{} still exists: {why}\n{}", path.display(), ok(&["accel", "status"]));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The status lines of one cgroup.
fn status_of(cgroup: &Path) -> String {
    let all = ok(&["accel", "status"]);
    let head = format!("accel {}:", cgroup.display());
    let start = all.find(&head).unwrap_or_else(|| panic!("{} is not in accel status:\n{all}", cgroup.display()));
    all[start..].lines().take(3).collect::<Vec<_>>().join("\n")
}

#[test]
fn accel_run_killed_with_sigkill_leaves_nothing_once_its_command_ends() {
    let _serial = one_at_a_time();
    if !require_bpf("accel_run_killed_with_sigkill_leaves_nothing_once_its_command_ends") {
        return;
    }
    let _netns = enter_netns();
    let mut run = Reaper(
        Command::new(SKRELAY)
            .args(["accel", "run", "--", "sleep", "2"])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Its first line names the cgroup (after a line saying it waits, if another test's accel
    // command holds the state's lock).
    let mut stderr = BufReader::new(run.0.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("skrelay-run-") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "run did not name its cgroup");
    }
    let cgroup = PathBuf::from(line.split_whitespace().find(|w| w.contains("skrelay-run-")).unwrap());
    let pins = pins_of(&cgroup);
    assert!(pins.exists(), "{line}");
    let pid = run.0.id();
    let st = status_of(&cgroup);
    assert!(st.contains(&format!("owned by `accel run` (pid {pid}), running")), "{st}");
    run.0.kill().unwrap();
    run.0.wait().unwrap();
    // The owner is gone and status says so, and who will clean up.
    let st = status_of(&cgroup);
    assert!(st.contains(&format!("owned by `accel run` (pid {pid}), which is gone: its watcher (pid")), "{st}");
    // The command (sleep 2) ends; the watcher removes the pins and the cgroup `run` made.
    wait_gone(&pins, Duration::from_secs(10), "pins of a killed accel run");
    wait_gone(&cgroup, Duration::from_secs(5), "the cgroup of a killed accel run");
}

#[test]
fn a_command_that_leaves_a_process_behind_is_cleaned_up_after_when_it_exits() {
    let _serial = one_at_a_time();
    if !require_bpf("a_command_that_leaves_a_process_behind_is_cleaned_up_after_when_it_exits") {
        return;
    }
    let _netns = enter_netns();
    let out = Command::new(SKRELAY)
        .args(["accel", "run", "--", "sh", "-c", "sleep 1 >/dev/null 2>&1 &"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("processes still run in cgroup"), "{log}");
    assert!(log.contains("are removed when they exit, by the watcher"), "{log}");
    let cgroup = PathBuf::from(log.split_whitespace().find(|w| w.contains("skrelay-run-")).unwrap());
    let cgroup = PathBuf::from(cgroup.to_string_lossy().trim_end_matches(':'));
    wait_gone(&pins_of(&cgroup), Duration::from_secs(10), "pins of a run whose command left a process");
    wait_gone(&cgroup, Duration::from_secs(5), "the cgroup of a run whose command left a process");
}

/// Turns acceleration off and removes these cgroups (relative to the v2 mount, innermost first)
/// however the test ends.
struct Cleanup(PathBuf, Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for cg in &self.1 {
            let _ = skrelay_output(&["accel", "off", "--cgroup", cg, "--force"]);
            // After a failing test the cgroup may still hold the test's processes: kill them and
            // retry, since a populated cgroup cannot be removed until they have exited.
            let dir = self.0.join(cg);
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            for _ in 0..50 {
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn accel_off_removes_the_cgroup_that_on_created_and_only_that() {
    let _serial = one_at_a_time();
    if !require_bpf("accel_off_removes_the_cgroup_that_on_created_and_only_that") {
        return;
    }
    let _netns = enter_netns();
    let mount = v2_mount();
    let outer = format!("skrelay-own-{}", std::process::id());
    let _cleanup = Cleanup(mount.clone(), vec![format!("{outer}/inner"), outer.clone()]);
    let made = mount.join(&outer).join("inner");
    ok(&["accel", "on", "--cgroup", &format!("{outer}/inner")]);
    let st = status_of(&made);
    assert!(st.contains("set up by `accel on`: stays until `skrelay accel off`"), "{st}");
    // Another user, with the capabilities accel needs, may not open root's pins (mode 0600): it
    // is told whose they are, not to grant what it has (a helper's privilege pass).
    let out = skrelay_as_nobody("+bpf,+net_admin,+perfmon,+sys_admin")
        .args(["accel", "off", "--cgroup", &format!("{outer}/inner")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("belongs to root and its pins are open to their owner only")
            && err.contains("run this command as root"),
        "{err}"
    );
    assert!(made.exists(), "{err}");
    // skrelay under `wrapper` (a command that drops what root has, then runs its arguments).
    let as_less_than_root = |wrapper: &[&str], args: &[&str]| {
        Command::new(wrapper[0]).args(&wrapper[1..]).arg("--").arg(SKRELAY).args(args).output().unwrap()
    };
    let off = ["accel", "off", "--cgroup", &format!("{outer}/inner")];
    let no_sys_admin = ["setpriv", "--inh-caps=-all", "--bounding-set=-sys_admin"];
    // Root without CAP_SYS_ADMIN cannot read the record of the directories `on` created (a
    // trusted.* attribute reads as absent): refused before anything changes, not an `off` that
    // removed the state, kept the directories and said it was done (a helper's privilege pass).
    // So is root of a user namespace, whose CapEff reads full (a re-check pass).
    for (wrapper, fix) in [
        (&no_sys_admin[..], "CAP_SYS_ADMIN, which this process lacks"),
        (&["unshare", "-U", "-r"][..], "outside any user namespace"),
    ] {
        let out = as_less_than_root(wrapper, &off);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{wrapper:?}: {err}");
        assert!(err.contains("created for cgroup") && err.contains(fix), "{wrapper:?}: {err}");
        assert!(made.exists() && status_of(&made).contains("set up by `accel on`"), "{wrapper:?}: {err}");
    }
    // And `status` says it cannot tell who set it up, rather than leaving the line out.
    let out = as_less_than_root(&no_sys_admin, &["accel", "status"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("set up by: not known here") && shown.contains("CAP_SYS_ADMIN"), "{shown}");
    ok(&["accel", "off", "--cgroup", &format!("{outer}/inner")]);
    assert!(!made.exists() && !mount.join(&outer).exists(), "accel off left the cgroups accel on created");
    // A cgroup that was there before stays.
    std::fs::create_dir(mount.join(&outer)).unwrap();
    ok(&["accel", "on", "--cgroup", &outer]);
    ok(&["accel", "off", "--cgroup", &outer]);
    assert!(mount.join(&outer).exists(), "accel off removed a cgroup it did not create");
    std::fs::remove_dir(mount.join(&outer)).unwrap();
}

/// `err` says of each of `dirs` (under `mount`) that it stays, other cgroups being in it.
fn assert_said_to_stay(err: &str, mount: &std::path::Path, dirs: [&str; 2]) {
    for dir in dirs {
        let said = format!(
            "accel: cgroup directory {}, which skrelay created, stays: Device or resource busy (os error 16); other \
             cgroups are in it: rmdir it once they are gone",
            mount.join(dir).display()
        );
        assert!(err.contains(&said), "{err}");
    }
}

/// A cgroup directory `accel on` created that has cgroups of its own in it by the time of `off`
/// stays, and `off` says so, with the way to remove it (an accel pass saw it stay without a word).
#[test]
fn a_created_cgroup_that_holds_other_cgroups_stays_and_off_says_so() {
    let _serial = one_at_a_time();
    if !require_bpf("a_created_cgroup_that_holds_other_cgroups_stays_and_off_says_so") {
        return;
    }
    let _netns = enter_netns();
    let mount = v2_mount();
    let outer = format!("skrelay-kept-{}", std::process::id());
    let inner = format!("{outer}/inner");
    let _cleanup = Cleanup(mount.clone(), vec![format!("{inner}/child"), inner.clone(), outer.clone()]);
    ok(&["accel", "on", "--cgroup", &inner]);
    std::fs::create_dir(mount.join(&inner).join("child")).unwrap();
    let (code, _, err) = skrelay_output(&["accel", "off", "--cgroup", &inner]);
    assert_eq!(code, 0, "{err}");
    assert_said_to_stay(&err, &mount, [&inner, &outer]);
    assert!(mount.join(&inner).join("child").exists());
}

/// An `accel run` whose acceleration `accel off` took away while its command ran removes the
/// directories it created when the command ends; one that stays (the command made a cgroup in
/// it) is said, as `off` says it (a re-check pass: the run left it without a word).
#[test]
fn a_run_ended_after_off_says_which_created_cgroups_stay() {
    let _serial = one_at_a_time();
    if !require_bpf("a_run_ended_after_off_says_which_created_cgroups_stay") {
        return;
    }
    let _netns = enter_netns();
    let mount = v2_mount();
    let outer = format!("skrelay-runoff-{}", std::process::id());
    let inner = format!("{outer}/q");
    let kid = mount.join(&inner).join("k");
    let _cleanup = Cleanup(mount.clone(), vec![format!("{inner}/k"), inner.clone(), outer.clone()]);
    let script = format!("mkdir {} && sleep 2", kid.display());
    let run = Command::new(SKRELAY)
        .args(["accel", "run", "--cgroup", &inner, "--", "sh", "-c", &script])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !kid.exists() {
        assert!(Instant::now() < deadline, "the command did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, _, err) = skrelay_output(&["accel", "off", "--cgroup", &inner]);
    assert_eq!(code, 0, "{err}");
    let out = run.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_said_to_stay(&err, &mount, [&inner, &outer]);
    assert!(kid.exists());
}

/// Every systemd cgroup has a dot in its name (`system.slice/redis.service`), and bpffs refuses
/// names with a dot: `accel on` and `accel run` of such a cgroup failed as root with "permission
/// denied (run as root)" and left empty directories in bpffs.
#[test]
fn cgroups_with_dots_in_their_names_are_accelerated() {
    let _serial = one_at_a_time();
    if !require_bpf("cgroups_with_dots_in_their_names_are_accelerated") {
        return;
    }
    let _netns = enter_netns();
    let mount = v2_mount();
    let outer = format!("skrelay-dot-{}.slice", std::process::id());
    let inner = format!("{outer}/x.service");
    let _cleanup = Cleanup(mount.clone(), vec![inner.clone(), outer.clone()]);
    ok(&["accel", "on", "--cgroup", &inner]);
    let st = status_of(&mount.join(&inner));
    assert!(st.contains("set up by `accel on`"), "{st}");
    ok(&["accel", "run", "--cgroup", &inner, "--", "true"]);
    ok(&["accel", "off", "--cgroup", &inner]);
    assert!(!mount.join(&outer).exists(), "accel off left the cgroups accel on created");
}

/// `accel run --cgroup` of a cgroup `accel on` set up runs the command in it under its policy,
/// says so, and leaves it on; a policy flag that asks for another one is refused (it would be
/// silently ignored) and changes nothing.
#[test]
fn accel_run_in_a_cgroup_already_on_uses_it_and_refuses_other_settings() {
    let _serial = one_at_a_time();
    if !require_bpf("accel_run_in_a_cgroup_already_on_uses_it_and_refuses_other_settings") {
        return;
    }
    let _netns = enter_netns();
    let mount = v2_mount();
    let cg = format!("skrelay-own-run-{}", std::process::id());
    let _cleanup = Cleanup(mount.clone(), vec![cg.clone()]);
    ok(&["accel", "on", "--cgroup", &cg, "--max-queued", "16M", "--small-write", "64K"]);
    let (code, out, err) =
        skrelay_output(&["accel", "run", "--cgroup", &cg, "--", "sh", "-c", "tail -n1 /proc/self/cgroup"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.trim(), format!("0::/{cg}"), "the command ran outside the cgroup: {err}");
    assert!(
        err.contains("is already accelerated; the command runs in it, and it stays accelerated afterwards"),
        "{err}"
    );
    assert!(status_of(&mount.join(&cg)).contains("set up by `accel on`"), "accel run took the cgroup over");
    // A user who may not move a process into the cgroup is refused before being told the command
    // runs in it (a new-user pass as nobody was told that, then refused).
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", SKRELAY, "accel", "run", "--cgroup", &cg])
        .args(["--", "true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cgroup.procs: permission denied") && !err.contains("runs in it"), "{err}");
    // Nor when the cgroup's cgroup.procs is the user's but the common ancestor's is not (cgroup v2
    // asks both): it was told the command ran in it, then refused (a re-check pass).
    std::os::unix::fs::chown(mount.join(&cg).join("cgroup.procs"), Some(65534), None).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", SKRELAY, "accel", "run", "--cgroup", &cg])
        .args(["--", "true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("takes write access to cgroup.procs of the common ancestor") && !err.contains("runs in it"),
        "{err}"
    );
    let (code, out, err) =
        skrelay_output(&["accel", "run", "--cgroup", &cg, "--max-queued", "2M", "--", "echo", "ran"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(!out.contains("ran"), "the command ran: {out}");
    assert!(err.contains("is already accelerated with --max-queued 16M --small-write 64K"), "{err}");
    assert!(pins_of(&mount.join(&cg)).exists(), "the refused run removed the acceleration");
    // A value no cgroup could take is refused as such first (it was told the cgroup's flags).
    let (code, _, err) = skrelay_output(&["accel", "run", "--cgroup", &cg, "--max-queued", "100K", "--", "true"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--max-queued 100K is below 256K") && !err.contains("already accelerated"), "{err}");
    // Only the flags given are compared: a left-out --max-queued is not the default 8M.
    let (code, out, err) =
        skrelay_output(&["accel", "run", "--cgroup", &cg, "--small-write", "64K", "--", "echo", "ran"]);
    assert_eq!((code, out.trim()), (0, "ran"), "{err}");
    let (code, out, err) =
        skrelay_output(&["accel", "run", "--cgroup", &cg, "--max-queued", "8M", "--", "echo", "ran"]);
    assert_eq!(code, 2, "an explicit --max-queued 8M on a 16M cgroup was ignored: {out}{err}");
    ok(&["accel", "off", "--cgroup", &cg]);

    // Owned by a running `accel run`: the refusal does not advise `accel off`, which would take
    // the acceleration from under it.
    let mut first = Command::new(SKRELAY)
        .args(["accel", "run", "--cgroup", &cg, "--small-write", "64K", "--", "sleep", "1"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok(&["accel", "status"]).contains("owned by `accel run`") {
        assert!(Instant::now() < deadline, "the first run never set up the cgroup");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, out, err) =
        skrelay_output(&["accel", "run", "--cgroup", &cg, "--max-queued", "2M", "--", "echo", "ran"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains(&format!("`accel run` pid {} uses it", first.id())) && !err.contains("accel off"), "{err}");
    assert!(first.wait().unwrap().success());
}

#[test]
fn two_accel_runs_of_one_cgroup_started_at_once_both_run_and_leave_nothing() {
    let _serial = one_at_a_time();
    // The second used to fail with "already accelerated: run `accel off` first" (advice that
    // would take the acceleration away from the first) when both started at the same moment.
    if !require_bpf("two_accel_runs_of_one_cgroup_started_at_once_both_run_and_leave_nothing") {
        return;
    }
    let _netns = enter_netns();
    let name = format!("skrelay-test-{}-race", std::process::id());
    let cgroup = v2_mount().join(&name);
    for round in 0..3 {
        let runs: Vec<_> = (0..2)
            .map(|_| {
                Command::new(SKRELAY)
                    .args(["accel", "run", "--cgroup", &name, "--", "sleep", "0.5"])
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for run in runs {
            let out = run.wait_with_output().unwrap();
            assert!(out.status.success(), "round {round}: {}", String::from_utf8_lossy(&out.stderr));
        }
        wait_gone(&pins_of(&cgroup), Duration::from_secs(10), "both runs ended");
        wait_gone(&cgroup, Duration::from_secs(10), "the cgroup a run created");
    }
}

/// Whether a process is in `cgroup` (it exists and lists one).
fn populated(cgroup: &Path) -> bool {
    std::fs::read_to_string(cgroup.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
}

/// Starts `accel run --cgroup NAME FLAGS -- CMD` and returns once the cgroup is accelerated and
/// the command in it (the pins come before the command moves in).
fn run_accelerated(name: &str, flags: &[&str], cmd: &[&str]) -> std::process::Child {
    let cgroup = v2_mount().join(name);
    let run = Command::new(SKRELAY)
        .args(["accel", "run", "--cgroup", name])
        .args(flags)
        .arg("--")
        .args(cmd)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(pins_of(&cgroup).exists() && populated(&cgroup)) {
        assert!(Instant::now() < deadline, "the run did not accelerate {}", cgroup.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    run
}

#[test]
fn accel_off_during_an_accel_run_leaves_the_runs_cgroup_to_the_run_which_removes_it() {
    let _serial = one_at_a_time();
    // The cgroup the run created stayed behind, empty, for good.
    if !require_bpf("accel_off_during_an_accel_run_leaves_the_runs_cgroup_to_the_run_which_removes_it") {
        return;
    }
    let _netns = enter_netns();
    let name = format!("skrelay-test-{}-offrun", std::process::id());
    let cgroup = v2_mount().join(&name);
    let run = run_accelerated(&name, &[], &["sleep", "1"]);
    ok(&["accel", "off", "--cgroup", &name]);
    assert!(cgroup.exists(), "it holds the run's command");
    let out = run.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_gone(&cgroup, Duration::from_secs(5), "the run that created it ended");
}

/// An `accel run` killed together with its watcher leaves its state: `status` names the command
/// that removes it, quoted so that it can be pasted (the path has a space), and that `accel off`
/// does not promise that the dead run will remove the cgroup its command still holds (a re-check
/// pass: it did, and the cgroup stayed for good).
#[test]
fn a_run_killed_with_its_watcher_is_removed_by_the_command_status_names() {
    let _serial = one_at_a_time();
    if !require_bpf("a_run_killed_with_its_watcher_is_removed_by_the_command_status_names") {
        return;
    }
    let _netns = enter_netns();
    let name = format!("skrelay-test-{} dead run", std::process::id());
    let cgroup = v2_mount().join(&name);
    let mut run = run_accelerated(&name, &[], &["sleep", "30"]);
    let json: serde_json::Value = serde_json::from_str(&ok(&["accel", "status", "--json"])).unwrap();
    let me = json["cgroups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cgroup"].as_str() == Some(cgroup.to_str().unwrap()))
        .unwrap_or_else(|| panic!("{json}"))
        .clone();
    let watcher = me["owner"]["watcher"]["pid"].as_u64().unwrap_or_else(|| panic!("{me}"));
    sigkill(watcher as i32);
    run.kill().unwrap();
    run.wait().unwrap();
    let st = status_of(&cgroup);
    let want = format!("nothing will remove it (run `skrelay accel off --cgroup '{}'`)", cgroup.display());
    assert!(st.contains(&want), "{st}");
    // Pasted as printed.
    let command = format!("skrelay accel off --cgroup '{}'", cgroup.display()).replacen("skrelay", SKRELAY, 1);
    let out = Command::new("sh").args(["-c", &command]).env("RUST_LOG", "info").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!pins_of(&cgroup).exists(), "{err}");
    assert!(!err.contains("the run removes it"), "{err}");
    assert!(err.contains("still holds processes: it stays (rmdir it once they exit)"), "{err}");
    for pid in std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap().split_whitespace() {
        sigkill(pid.parse().unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(&cgroup).is_err() {
        assert!(Instant::now() < deadline, "{} stays busy", cgroup.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigkill(pid: i32) {
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success(), "kill {pid}");
}

/// `accel off` and then `accel on` while an `accel run` of the same cgroup still runs: the state is
/// now `on`'s, which stays until `accel off`, so the run (or its watcher) must not remove it when
/// its command ends (it did: a helper's new-user pass, 2026-12-05). The cgroup the run created
/// goes to `on`'s record, so the later `off` removes it.
#[test]
fn an_accel_on_made_while_a_run_ran_outlives_the_run() {
    let _serial = one_at_a_time();
    if !require_bpf("an_accel_on_made_while_a_run_ran_outlives_the_run") {
        return;
    }
    let _netns = enter_netns();
    for leftover in [false, true] {
        let name = format!("skrelay-test-{}-onrun-{leftover}", std::process::id());
        let _cleanup = Cleanup(v2_mount(), vec![name.clone()]);
        let cgroup = v2_mount().join(&name);
        // With `leftover` the command leaves a process behind, and the watcher cleans up.
        let cmd: &[&str] = if leftover { &["sh", "-c", "sleep 2 >/dev/null 2>&1 &"] } else { &["sleep", "2"] };
        let run = run_accelerated(&name, &["--small-write", "0"], cmd);
        ok(&["accel", "off", "--cgroup", &name]);
        ok(&["accel", "on", "--cgroup", &name, "--small-write", "0"]);
        let out = run.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // The command (and what it left) has ended; the watcher polls every 100 ms.
        let deadline = Instant::now() + Duration::from_secs(5);
        while populated(&cgroup) {
            assert!(Instant::now() < deadline, "the command's processes did not end");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            pins_of(&cgroup).exists(),
            "the run removed the state `accel on` set up after it (leftover: {leftover})"
        );
        let status = status_of(&cgroup);
        assert!(status.contains("stays until `skrelay accel off`"), "{status}");
        ok(&["accel", "off", "--cgroup", &name]);
        wait_gone(&pins_of(&cgroup), Duration::from_secs(2), "accel off");
        wait_gone(&cgroup, Duration::from_secs(3), "the cgroup the run created, now `on`'s, after off");
    }
}

/// A cgroup removed after `accel on`: `status` said "on" as if nothing had happened (a helper's
/// new-user pass, 2026-12-05). It says the directory is gone, and `off` removes the state.
#[test]
fn a_cgroup_removed_after_accel_on_is_shown_as_gone_and_off_removes_its_state() {
    let _serial = one_at_a_time();
    if !require_bpf("a_cgroup_removed_after_accel_on_is_shown_as_gone_and_off_removes_its_state") {
        return;
    }
    let _netns = enter_netns();
    let name = format!("skrelay-test-{}-gone", std::process::id());
    let _cleanup = Cleanup(v2_mount(), vec![name.clone()]);
    let cgroup = v2_mount().join(&name);
    ok(&["accel", "on", "--cgroup", &name, "--small-write", "0"]);
    assert!(!status_of(&cgroup).contains("is gone"), "{}", status_of(&cgroup));
    std::fs::remove_dir(&cgroup).unwrap();
    let status = status_of(&cgroup);
    assert!(status.contains("WARNING: the cgroup's directory is gone"), "{status}");
    let report = report_of(&cgroup);
    assert_eq!(report["cgroup_gone"], true, "{report}");
    ok(&["accel", "off", "--cgroup", &name]);
    wait_gone(&pins_of(&cgroup), Duration::from_secs(2), "accel off of a removed cgroup");
    // `on` of a removed cgroup makes it and sets it up again (it said "already accelerated": a
    // re-check pass).
    ok(&["accel", "on", "--cgroup", &name, "--small-write", "0"]);
    std::fs::remove_dir(&cgroup).unwrap();
    let (code, _, err) = skrelay_output(&["accel", "on", "--cgroup", &name, "--small-write", "0"]);
    assert_eq!(code, 0, "{err}");
    assert!(cgroup.is_dir() && !status_of(&cgroup).contains("WARNING"), "{}", status_of(&cgroup));
    ok(&["accel", "off", "--cgroup", &name]);
}

/// `cgroup`'s report in `status --json`.
fn report_of(cgroup: &Path) -> serde_json::Value {
    let json: serde_json::Value = serde_json::from_str(&ok(&["status", "--json"])).unwrap();
    let reports = json["accel"]["cgroups"].as_array().expect("accel reports");
    let report = reports.iter().find(|r| r["cgroup"] == cgroup.to_string_lossy().as_ref());
    report.unwrap_or_else(|| panic!("{} is not in status --json: {json}", cgroup.display())).clone()
}

/// Connections accelerated in `cgroup` so far, from `status --json`.
fn connections_of(cgroup: &Path) -> u64 {
    report_of(cgroup)["connections"].as_u64().expect("connections")
}

/// One loopback connection made and used inside `name`, by `accel run` of a set-up there is.
fn one_exchange_in(name: &str) {
    let exchange = "import socket\nl = socket.socket()\nl.bind(('127.0.0.1', 0))\nl.listen()\n\
                    c = socket.create_connection(l.getsockname())\ns, _ = l.accept()\nc.sendall(b'x' * 10)\n\
                    assert s.recv(10) == b'x' * 10\n";
    let (code, out, err) =
        skrelay_output(&["accel", "run", "--cgroup", name, "--", "/usr/bin/python3", "-c", exchange]);
    assert_eq!(code, 0, "{out}{err}");
}

/// A cgroup removed and made again at its path after `accel on` (systemd does so at every
/// restart of a service): sockops stays with the old cgroup, so nothing new was accelerated while
/// `status` said "on", `on` said "already accelerated" and `run` that "the command runs in it" (a
/// new-user pass, 2026-12-08). `status` says so, and `run` (as `on`) sets the cgroup up again.
/// The same for a sockops link detached by hand.
#[test]
fn a_cgroup_made_again_after_accel_on_is_said_and_set_up_again() {
    let _serial = one_at_a_time();
    if !require_bpf("a_cgroup_made_again_after_accel_on_is_said_and_set_up_again") {
        return;
    }
    let _netns = enter_netns();
    let name = format!("skrelay-test-{}-again", std::process::id());
    let _cleanup = Cleanup(v2_mount(), vec![name.clone()]);
    let cgroup = v2_mount().join(&name);
    std::fs::create_dir(&cgroup).unwrap();
    ok(&["accel", "on", "--cgroup", &name, "--small-write", "0"]);
    one_exchange_in(&name);
    assert_eq!(connections_of(&cgroup), 1, "{}", status_of(&cgroup));
    assert!(!status_of(&cgroup).contains("NOT accelerating"), "{}", status_of(&cgroup));

    std::fs::remove_dir(&cgroup).unwrap();
    std::fs::create_dir(&cgroup).unwrap();
    let status = status_of(&cgroup);
    assert!(status.contains("on, but NOT accelerating new connections"), "{status}");
    assert!(status.contains("WARNING: its sockops program no longer runs for this cgroup"), "{status}");
    let report = report_of(&cgroup);
    assert_eq!((&report["link_stale"], &report["attached"]), (&true.into(), &false.into()), "{report}");
    // A service user, who may not open root's pins, was told the command ran in it (a re-check
    // pass); it may not remove root's state either, and is told so.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=+bpf,+net_admin,+perfmon"])
        .args(["--ambient-caps=+bpf,+net_admin,+perfmon", SKRELAY, "accel", "run", "--cgroup", &name])
        .args(["--small-write", "0", "--", "true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("accelerates nothing new, and this user may not remove it") && !err.contains("runs in it"),
        "{err}"
    );
    // `run` (it said "already accelerated; the command runs in it") accelerates the cgroup for
    // the command, as one that was not, and `on` sets it up again.
    let (code, out, err) = skrelay_output(&["accel", "run", "--cgroup", &name, "--small-write", "0", "--", "true"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("removed the state of an earlier set-up") && err.contains("accelerated for the command"),
        "{err}"
    );
    wait_gone(&pins_of(&cgroup), Duration::from_secs(2), "the run's acceleration goes with it");
    ok(&["accel", "on", "--cgroup", &name, "--small-write", "0"]);
    one_exchange_in(&name);
    assert_eq!(connections_of(&cgroup), 1, "{}", status_of(&cgroup));

    // A link detached by hand: the same, and `on` sets it up again.
    let link = sockops_link_id(&pins_of(&cgroup));
    let detach = Command::new("bpftool").args(["link", "detach", "id", &link.to_string()]).output().unwrap();
    assert!(detach.status.success(), "{}", String::from_utf8_lossy(&detach.stderr));
    assert!(status_of(&cgroup).contains("NOT accelerating"), "{}", status_of(&cgroup));
    let (code, _, err) = skrelay_output(&["accel", "on", "--cgroup", &name, "--small-write", "0"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("removed the state of an earlier set-up"), "{err}");
    one_exchange_in(&name);
    assert_eq!(connections_of(&cgroup), 1, "{}", status_of(&cgroup));
    ok(&["accel", "off", "--cgroup", &name]);

    // A cgroup `on` created, set up again after its link was detached: `off` still removes it
    // (the second `on` recorded that it created none, and it stayed: a re-check pass).
    let made = format!("skrelay-test-{}-made", std::process::id());
    let _cleanup_made = Cleanup(v2_mount(), vec![made.clone()]);
    ok(&["accel", "on", "--cgroup", &made, "--small-write", "0"]);
    let link = sockops_link_id(&pins_of(&v2_mount().join(&made)));
    let detach = Command::new("bpftool").args(["link", "detach", "id", &link.to_string()]).output().unwrap();
    assert!(detach.status.success(), "{}", String::from_utf8_lossy(&detach.stderr));
    ok(&["accel", "on", "--cgroup", &made, "--small-write", "0"]);
    ok(&["accel", "off", "--cgroup", &made]);
    wait_gone(&v2_mount().join(&made), Duration::from_secs(3), "the cgroup the first `on` created");
}

/// An `accel run` whose cgroup was removed and made again by someone else while its command ran
/// (its processes moved out first) removed that other cgroup when it ended: it knew its
/// directory by path alone (a re-check pass). It leaves a directory that is not the one it made.
#[test]
fn an_accel_run_leaves_a_cgroup_made_again_at_its_path() {
    let _serial = one_at_a_time();
    if !require_bpf("an_accel_run_leaves_a_cgroup_made_again_at_its_path") {
        return;
    }
    let _netns = enter_netns();
    let name = format!("skrelay-test-{}-remade", std::process::id());
    let _cleanup = Cleanup(v2_mount(), vec![name.clone()]);
    let cgroup = v2_mount().join(&name);
    let mut first = run_accelerated(&name, &["--small-write", "0"], &["sleep", "1.5"]);
    for pid in std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap().split_whitespace() {
        std::fs::write(v2_mount().join("cgroup.procs"), pid).unwrap();
    }
    std::fs::remove_dir(&cgroup).unwrap();
    std::fs::create_dir(&cgroup).unwrap();
    let (code, out, err) = skrelay_output(&["accel", "run", "--cgroup", &name, "--small-write", "0", "--", "true"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(first.wait().unwrap().success());
    std::thread::sleep(Duration::from_millis(500)); // its watcher, if it took over
    assert!(cgroup.is_dir(), "the first run removed a cgroup it had not made");
}

/// The id of the sockops link pinned in `pins` (bpftool).
fn sockops_link_id(pins: &Path) -> u32 {
    let out = Command::new("bpftool").args(["-j", "link", "show", "pinned"]).arg(pins.join("sockops_link")).output();
    let out = out.expect("bpftool");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let link: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    link["id"].as_u64().expect("a link id") as u32
}

/// A set-up killed half-way (after it attached sockops, before its state was in place) leaves
/// its state in `accel-setup/PID-NAME`, which `status` shows as such: the next `on` or `off` removes it,
/// detaching the sockops program it left on the cgroup. State missing some of its pins (what an
/// older skrelay left when killed) is refused by `on` and `run` with the fix, and `off --force`
/// removes it.
#[test]
fn what_an_interrupted_set_up_leaves_is_removed_or_refused_with_the_fix() {
    let _serial = one_at_a_time();
    if !require_bpf("what_an_interrupted_set_up_leaves_is_removed_or_refused_with_the_fix") {
        return;
    }
    let _netns = enter_netns();
    let mount = v2_mount();
    let (a, b) =
        (format!("skrelay-own-cut-a-{}", std::process::id()), format!("skrelay-own-cut-b-{}", std::process::id()));
    let _cleanup = Cleanup(mount.clone(), vec![a.clone(), b.clone()]);
    let sockops_on = |cg: &str| {
        let out = Command::new("bpftool").args(["cgroup", "show"]).arg(mount.join(cg)).output().unwrap();
        String::from_utf8_lossy(&out.stdout).contains("sock_ops")
    };
    // What a set-up killed after attaching leaves: its whole state, under a dead process's name.
    ok(&["accel", "on", "--cgroup", &a, "--small-write", "64K"]);
    assert!(sockops_on(&a));
    // Its process a zombie (killed, its parent not yet told): a set-up as dead as a reaped one,
    // which `status` hid and `off` said was not there for as long as the parent did not wait
    // (a helper's kill loop).
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(format!("/proc/{dead}/stat")).is_ok_and(|s| s.contains(") Z ")) {
        assert!(Instant::now() < deadline, "`true` never exited");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pins = pins_of(&mount.join(&a));
    let left = Path::new("/sys/fs/bpf/skrelay/accel-setup")
        .join(format!("{dead}-{}", pins.file_name().unwrap().to_string_lossy()));
    std::fs::create_dir_all(left.parent().unwrap()).unwrap();
    std::fs::rename(&pins, &left).unwrap();
    let status = ok(&["accel", "status"]);
    let a_path = mount.join(&a).display().to_string();
    assert!(!status.contains(&format!("accel {a_path}:")), "a set-up's leftovers are listed as accelerated: {status}");
    assert!(
        status.contains(&format!("accel: {a_path}: a set-up that was interrupted (skrelay pid {dead}, gone)")),
        "status does not show the interrupted set-up: {status}"
    );
    ok(&["accel", "on", "--cgroup", &b, "--small-write", "64K"]);
    assert!(!left.exists(), "the next `accel on` left {} in place", left.display());
    assert!(!sockops_on(&a), "the interrupted set-up's sockops program is still attached to {a}");
    ok(&["accel", "off", "--cgroup", &b]);
    gone.wait().unwrap();
    // Named with a start time (`PID_START-NAME`): a live process with that pid but another start
    // time is not the one that set it up.
    ok(&["accel", "on", "--cgroup", &a, "--small-write", "64K"]);
    let left = Path::new("/sys/fs/bpf/skrelay/accel-setup").join(format!(
        "{}_1-{}",
        std::process::id(),
        pins.file_name().unwrap().to_string_lossy()
    ));
    std::fs::rename(&pins, &left).unwrap();
    let status = ok(&["accel", "status"]);
    assert!(
        status.contains(&format!("a set-up that was interrupted (skrelay pid {}, gone)", std::process::id())),
        "a set-up whose pid another process has is not shown as interrupted: {status}"
    );
    ok(&["accel", "off", "--cgroup", &a]);
    assert!(!left.exists(), "`accel off` left {} in place", left.display());
    assert!(!sockops_on(&a), "the interrupted set-up's sockops program is still attached to {a}");

    // What an older skrelay left: a state directory without its pins.
    std::fs::create_dir_all(&pins).unwrap();
    let (code, out, err) = skrelay_output(&["accel", "on", "--cgroup", &a]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("is incomplete (a set-up was interrupted)") && err.contains("accel off --cgroup"), "{err}");
    let (code, out, err) = skrelay_output(&["accel", "run", "--cgroup", &a, "--", "echo", "ran"]);
    assert_eq!(code, 2, "accel run used an incomplete state: {out}{err}");
    assert!(!out.contains("ran"), "{out}");
    ok(&["accel", "off", "--cgroup", &a, "--force"]);
    assert!(!pins.exists(), "accel off --force left {}", pins.display());
}

/// Turning the last cgroup off leaves no empty `accel` or `accel-setup` directory in bpffs
/// (nothing is left behind, not even an empty skrelay/), and an `off` refused because nothing is
/// on creates none. Run against a bpffs of its own (a private mount namespace), which
/// other tests' accel state cannot share.
#[test]
fn the_last_off_leaves_no_empty_directory_in_bpffs() {
    let _serial = one_at_a_time();
    if !require_bpf("the_last_off_leaves_no_empty_directory_in_bpffs") {
        return;
    }
    let _netns = enter_netns();
    let mount = v2_mount();
    let cg = format!("skrelay-own-empty-{}", std::process::id());
    let _cleanup = Cleanup(mount.clone(), vec![cg.clone()]);
    let script = r#"set -e
mount -t bpf bpf /sys/fs/bpf
# A refused off (nothing is on) writes nothing.
if "$0" accel off --cgroup "$1" 2>/dev/null; then echo "off of a cgroup never on succeeded"; exit 1; fi
if ls -A /sys/fs/bpf | grep skrelay; then echo "a refused off left that"; exit 1; fi
"$0" accel on --cgroup "$1" --small-write 64K >/dev/null
ls /sys/fs/bpf/skrelay
"$0" accel off --cgroup "$1" >/dev/null
echo after:; ls -A /sys/fs/bpf | grep skrelay || true"#;
    let out = Command::new("unshare").args(["-m", "sh", "-c", script, SKRELAY, &cg]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let (before, after) = stdout.split_once("after:").unwrap();
    assert!(before.contains("accel"), "accel on pinned nothing under skrelay/: {before}");
    assert_eq!(after.trim(), "", "left in /sys/fs/bpf after the last off");
}

/// `accel run` killed (SIGKILL) in the middle of its set-up: everything is pinned and attached
/// in `accel-setup/`, and the rename that puts it in place is where strace kills it. What it
/// left (pins, a sockops link that still accelerates, the cgroup it created) is shown by
/// `status` with the fix, and `accel off` removes all of it, exit 0. Before, status showed
/// nothing, and off removed the pins but said "not accelerated" (exit 2) and left the cgroup.
/// Killed between making its cgroup's directories and recording them on the cgroup (the first
/// setxattr), it left those directories and `off` said it had removed everything (a re-check):
/// the set-up directory now says what it is about to make. In a bpffs of its own, as above.
#[test]
fn a_set_up_killed_half_way_is_shown_and_removed_by_off() {
    let _serial = one_at_a_time();
    let test = "a_set_up_killed_half_way_is_shown_and_removed_by_off";
    if !require_bpf(test) || !require_tool(test, "strace") {
        return;
    }
    let _netns = enter_netns();
    let mount = v2_mount();
    let cg = format!("skrelay-own-killed-{}", std::process::id());
    let _cleanup = Cleanup(mount.clone(), vec![format!("{cg}/a/b"), format!("{cg}/a"), cg.clone()]);
    let script = r#"mount -t bpf bpf /sys/fs/bpf || exit 1
strace -o /dev/null -f -e trace=$2 -e inject=$2:signal=SIGKILL:when=1 \
  "$0" accel run --cgroup "$1" --small-write 64K -- true
echo "run: $?"
echo status:; "$0" accel status
"$0" accel off --cgroup "$1" || exit 1
echo after:; ls -A /sys/fs/bpf | grep skrelay || true"#;
    for (at, target) in [("rename,renameat,renameat2", cg.clone()), ("setxattr", format!("{cg}/a/b"))] {
        let out = Command::new("unshare").args(["-m", "sh", "-c", script, SKRELAY, &target, at]).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{at}: {stdout}{stderr}");
        assert!(stdout.contains("run: 137"), "strace did not kill the set-up at {at}: {stdout}{stderr}");
        let (_, rest) = stdout.split_once("status:").unwrap();
        let (status, after) = rest.split_once("after:").unwrap();
        assert!(
            status.contains("a set-up that was interrupted") && status.contains("`skrelay accel off --cgroup"),
            "{at}: status does not show the interrupted set-up: {status}"
        );
        assert_eq!(after.trim(), "", "{at}: left in /sys/fs/bpf after accel off");
        assert!(!mount.join(&cg).exists(), "{at}: the cgroup the killed run created is still there");
    }
}

/// `accel off` of a cgroup `on` created, whose last process exits a moment after off removed the
/// state (its connections closed just before it exits): the cgroup goes too. Before, off said
/// "still holds processes: it stays" and the user had to rmdir it.
#[test]
fn off_waits_a_moment_for_the_last_process_of_a_cgroup_it_created() {
    let _serial = one_at_a_time();
    if !require_bpf("off_waits_a_moment_for_the_last_process_of_a_cgroup_it_created") {
        return;
    }
    let _netns = enter_netns();
    let mount = v2_mount();
    let cg = format!("skrelay-own-grace-{}", std::process::id());
    let _cleanup = Cleanup(mount.clone(), vec![cg.clone()]);
    ok(&["accel", "on", "--cgroup", &cg, "--small-write", "64K"]);
    let mut last = Command::new(SKRELAY)
        .args(["accel", "run", "--cgroup", &cg, "--", "sleep", "0.4"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let procs = mount.join(&cg).join("cgroup.procs");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&procs).unwrap_or_default().trim().is_empty() {
        assert!(Instant::now() < deadline, "the command never ran in {cg}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (code, out, err) = skrelay_output(&["accel", "off", "--cgroup", &cg]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!mount.join(&cg).exists(), "off left the cgroup it created: {err}");
    assert!(last.wait().unwrap().success());
}

/// An `accel on` refused for want of privilege left `skrelay/` and `skrelay/accel/` in bpffs,
/// owned by that user, where root's later state was then pinned. Run against a bpffs of its own.
#[test]
fn a_refused_unprivileged_accel_on_leaves_nothing_in_bpffs() {
    let _serial = one_at_a_time();
    if !require_bpf("a_refused_unprivileged_accel_on_leaves_nothing_in_bpffs") {
        return;
    }
    let _netns = enter_netns();
    let cg = format!("skrelay-nobody-{}", std::process::id());
    let script = r#"mount -t bpf bpf /sys/fs/bpf || exit 9
setpriv --reuid=65534 --regid=65534 --clear-groups "$0" accel on --cgroup "$1"
echo "rc=$?"
echo left:; ls -A /sys/fs/bpf"#;
    let out = std::process::Command::new("unshare").args(["-m", "sh", "-c", script, SKRELAY, &cg]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("rc=2"), "{stdout}{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
    let left = stdout.split_once("left:").unwrap().1;
    assert!(!left.contains("skrelay"), "left in bpffs: {left}\n{stderr}");
}

/// Without CAP_SYS_ADMIN the owner record (a trusted.* xattr) could not be written: `accel on`
/// said nothing, exited 0, and `status` lost who set it up. It is refused now, changing nothing.
#[test]
fn accel_on_without_cap_sys_admin_is_refused_and_changes_nothing() {
    let _serial = one_at_a_time();
    if !require_bpf("accel_on_without_cap_sys_admin_is_refused_and_changes_nothing") {
        return;
    }
    let _netns = enter_netns();
    let mount = v2_mount();
    let cg = format!("skrelay-nosysadmin-{}", std::process::id());
    std::fs::create_dir(mount.join(&cg)).unwrap();
    let _cleanup = Cleanup(mount.clone(), vec![cg.clone()]);
    let out = skrelay_as_nobody("+bpf,+net_admin,+perfmon")
        .args(["accel", "on", "--cgroup", &cg, "--small-write", "64K"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("(run as root or grant CAP_SYS_ADMIN)"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
    let status = ok(&["accel", "status"]);
    assert!(!status.contains(&cg), "{status}");
    assert!(mount.join(&cg).is_dir(), "the cgroup that was there is gone");
}

/// A stop signal during the set-up of `accel on` (the half second it measures and pins) killed it
/// half-way: exit 143, no word, and an interrupted set-up for the next command to remove (a
/// helper's kill loop, 12 of 25 SIGTERMs). It is held back until the set-up is done, which is
/// then undone: exit 2 and one sentence, and nothing left (the cgroup it made included).
#[test]
fn a_sigterm_while_accel_on_sets_up_undoes_it_and_says_so() {
    let _serial = one_at_a_time();
    if !require_bpf("a_sigterm_while_accel_on_sets_up_undoes_it_and_says_so") {
        return;
    }
    let _netns = enter_netns();
    let mount = v2_mount();
    let name = format!("skrelay-own-term-{}", std::process::id());
    let _cleanup = Cleanup(mount.clone(), vec![name.clone()]);
    let child = Command::new(SKRELAY)
        .args(["accel", "on", "--cgroup", &name])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Sent once the stop signals are held (SigBlk has SIGTERM, bit 15), which they are for the
    // whole set-up.
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let blocked = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .unwrap_or(0);
        if blocked & (1 << (libc::SIGTERM - 1)) != 0 {
            break;
        }
        assert!(Instant::now() < deadline, "accel on never held its stop signals");
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: kill(2) on our own child, not yet waited for (its pid cannot be reused).
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("skrelay: SIGTERM while setting up acceleration of cgroup")
            && err.contains("stopped, and nothing of it is left"),
        "{err}"
    );
    assert!(!mount.join(&name).exists(), "the cgroup accel on made is still there");
    assert!(!pins_of(&mount.join(&name)).exists(), "its pins are still there");
    let st = ok(&["accel", "status"]);
    assert!(!st.contains(&name), "{st}");
}

/// A stop signal that reaches `accel run` after its set-up and before the command's signals are
/// forwarded: `run` let its stop signals go once the set-up was done, so such a SIGTERM killed
/// `run` itself with no word (8 of 8 sent as soon as it said the cgroup was accelerated; a
/// re-check), its command not started or started and never told. They are held until the
/// forwarding is in place: the command gets the signal, and `run` exits with its status.
#[test]
fn a_sigterm_right_after_accel_runs_set_up_reaches_the_command() {
    let _serial = one_at_a_time();
    if !require_bpf("a_sigterm_right_after_accel_runs_set_up_reaches_the_command") {
        return;
    }
    let _netns = enter_netns();
    // SIGQUIT too (and SIGUSR1/2): forwarded, where let go with its default action it killed
    // `run` (a re-check).
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGQUIT, "SIGQUIT")] {
        a_signal_right_after_accel_runs_set_up_reaches_the_command(signal, name);
    }
}

fn a_signal_right_after_accel_runs_set_up_reaches_the_command(signal: i32, name: &str) {
    use std::io::{BufRead, Read};
    use std::os::unix::process::ExitStatusExt;
    let command =
        format!("import signal, sys, time\nsignal.signal(signal.{name}, lambda *a: sys.exit(5))\ntime.sleep(20)");
    let started = Instant::now();
    let mut run = Command::new(SKRELAY);
    // Python itself, not whatever `python3` is first in PATH: a pyenv shim is a bash script,
    // and bash, starting, ignored a SIGQUIT forwarded within its first millisecond (the kernel's
    // signal_generate said so), so the command slept on (a soak under CPU load, 10 of 25 runs).
    run.args(["accel", "run", "--", "/usr/bin/python3", "-c", &command]).stderr(std::process::Stdio::piped());
    // The command inherits what `run` inherited: under a shell that ran the tests in the
    // background (SIGINT and SIGQUIT ignored), a signal forwarded before python set its handler
    // was ignored, and the command slept its 20 s (a fresh-clone CI run). `run` passes the
    // dispositions on unchanged, as the shell would; the test starts it with the defaults.
    // SAFETY: signal(2) is async-signal-safe, in the child between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut run, move || {
            libc::signal(signal, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = run.spawn().unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    loop {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "accel run ended first:\n{said}");
        said.push_str(&line);
        if line.contains("accelerated for the command") {
            break;
        }
    }
    // SAFETY: kill(2) on our own child, not yet waited for (its pid cannot be reused).
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let status = child.wait().unwrap();
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    assert_eq!(status.signal(), None, "{name}: accel run was killed by the signal itself:\n{said}{rest}");
    let told = [Some(5), Some(128 + signal)];
    assert!(told.contains(&status.code()), "{name}: {status:?}: the command was not told:\n{said}{rest}");
    assert!(started.elapsed() < Duration::from_secs(15), "the command ran on");
    let cg = v2_mount().join(format!("skrelay-run-{}", child.id()));
    wait_gone(&cg, Duration::from_secs(5), "the run's cgroup");
}
