# Sourced by scripts/accel-{iperf3,sweep,latency}.sh inside their private network namespace:
# a cgroup of their own that is cleaned up on exit, whichever skrelay builds they ran.

# The cgroup v2 mount, as skrelay finds it (/sys/fs/cgroup or /sys/fs/cgroup/unified, ...).
cgroup2_root() { awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts; }

# accel_cgroup NAME BIN...: sets $cg to NAME-<pid> and, on exit, turns accel off there with each
# BIN and removes the cgroup.
accel_cgroup() {
  cg=$1-$$
  shift
  accel_bins=("$@")
  trap 'for b in "${accel_bins[@]}"; do "$b" accel off --cgroup "$cg" --force >/dev/null 2>&1 || true; done
        rmdir "$(cgroup2_root)/$cg" 2>/dev/null || true' EXIT
}

median() { python3 -c 'import sys,statistics; print("%.2f" % statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

# accel_path BIN: where cgroup $cg's accel bytes went, from `BIN accel status --json`: MiB
# redirected / MiB sent by TCP while in the map / pauses / resumes / small-write demotions /
# sockets back on plain TCP / pauses given up.
accel_path() {
  "$1" accel status --json | python3 -c 'import json,sys; d=[c for c in json.load(sys.stdin)["cgroups"] if c["cgroup"].endswith("/"+sys.argv[1])][0]; print("%d/%d/%d/%d/%d/%d/%d" % (d["bytes"]>>20, d["passed_bytes"]>>20, d["pauses"], d["resumes"], d["demoted_small"], d["left"], d["stuck"]))' "$cg"
}
