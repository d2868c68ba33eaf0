#!/usr/bin/env bash
# accel write-size sweep: for each write size and connection count, examples/accel_load plain
# and under `skrelay accel run` in the same run, one after the other; prints accel/plain and
# which path the bytes took (redirect, TCP path while paused, sockets that left the map).
# Needs root (netns, cgroup, BPF). Usage:
#   scripts/accel-sweep.sh [SIZES] [CONNS] [SECS] [block|poll]
#   (defaults: "64 1024 4096 16384 65536 1048576" "1 4 16 64" 2 block; poll: event-loop readers)
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=${1:-"64 1024 4096 16384 65536 1048576"}
conns=${2:-"1 4 16 64"}
secs=${3:-2}
mode=${4:-block}
cargo build -q --release --bin skrelay --example accel_load
S=$PWD/target/release/skrelay
L=$PWD/target/release/examples/accel_load
exec unshare -n bash -s "$S" "$L" "$sizes" "$conns" "$secs" "$mode" <<'INNER'
set -euo pipefail
S=$1 L=$2 sizes=$3 conns=$4 secs=$5 mode=$6
ip link set lo up
cg=skrelay-sweep-$$
trap '$S accel off --cgroup $cg --force >/dev/null 2>&1 || true; rmdir /sys/fs/cgroup/unified/$cg 2>/dev/null || true' EXIT
printf '%-8s %-6s %8s %8s %6s  %s\n' write conns plain accel ratio "accel path (MiB redirected / MiB TCP path / pauses / resumes / small-write demotions / sockets left / gave up resuming)"
for w in $sizes; do
  for n in $conns; do
    plain=$($L "$w" "$n" "$secs" "$mode" | sed 's/.*gbps=//')
    $S accel on --cgroup "$cg" >/dev/null
    accel=$($S accel run --cgroup "$cg" -- "$L" "$w" "$n" "$secs" "$mode" 2>/dev/null | sed 's/.*gbps=//')
    path=$($S accel status --json | python3 -c 'import json,sys; d=[c for c in json.load(sys.stdin)["cgroups"] if c["cgroup"].endswith("/"+sys.argv[1])][0]; print("%d / %d / %d / %d / %d / %d / %d" % (d["bytes"]>>20, d["passed_bytes"]>>20, d["pauses"], d["resumes"], d["demoted_small"], d["left"], d["stuck"]))' "$cg")
    $S accel off --cgroup "$cg" --force >/dev/null
    printf '%-8s %-6s %8s %8s %6s  %s\n' "$w" "$n" "$plain" "$accel" "$(python3 -c "print('%.2f' % ($accel / $plain))")" "$path"
  done
done
INNER
