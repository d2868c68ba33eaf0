#!/usr/bin/env bash
# accel request/response latency: examples/bench's 64-byte ping-pong (one connection, a client
# thread and an echo thread, N round trips after a warm-up), plain loopback and under
# `skrelay accel run`, interleaved round by round (plain, accel, plain pinned, accel pinned), so
# a machine shared with other jobs disturbs both alike. Pinned: every thread on CPU 0 (taskset).
# Prints each run, then the medians of the rounds and accel/plain. Needs root (netns, cgroup,
# BPF). Not part of cargo test. Usage:
#   scripts/accel-latency.sh [ROUNDS] [ROUND_TRIPS]     (defaults: 7 20000)
#   SKRELAY=BIN BENCH=BIN: use these builds (skrelay, examples/bench), build nothing (a machine
#   without cargo, e.g. the lent 16-core one).
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,10p' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
rounds=${1:-7}
trips=${2:-20000}
for v in "$rounds" "$trips"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "accel-latency: ROUNDS and ROUND_TRIPS are whole numbers above 0, not $v (try --help)" >&2; exit 2; }
done
if [[ -n ${SKRELAY:-} && -n ${BENCH:-} ]]; then
  S=$(realpath "$SKRELAY") B=$(realpath "$BENCH")
else
  cargo build -q --release --bin skrelay --example bench
  S=$PWD/target/release/skrelay
  B=$PWD/target/release/examples/bench
fi
exec unshare -n bash -s "$S" "$B" "$rounds" "$trips" <<'INNER'
set -euo pipefail
S=$1 B=$2 rounds=$3 trips=$4
ip link set lo up
source scripts/accel-common.sh
accel_cgroup skrelay-latency "$S"
run() { # label, command...: one ping-pong, prints "label p50 p99 [messages redirected]"
  local label=$1; shift
  local out path=""
  [[ $label == accel* ]] && $S accel on --cgroup "$cg" >/dev/null
  out=$("$@" "$B" pingpong --round-trips "$trips" --warmup 2000 2>/dev/null)
  if [[ $label == accel* ]]; then
    # Proof of the path: every round trip is two sendmsg calls through the redirect.
    path=$($S accel status --json | python3 -c 'import json,sys; d=[c for c in json.load(sys.stdin)["cgroups"] if c["cgroup"].endswith("/"+sys.argv[1])][0]; print("redirected=%d tcp_path=%d left=%d" % (d["messages"], d["passed"], d["left"]))' "$cg")
    $S accel off --cgroup "$cg" --force >/dev/null
  fi
  echo "$label $(sed -E 's/.*p50_us=([0-9.]+) p99_us=([0-9.]+).*/\1 \2/' <<<"$out") $path"
}
results=$(
  for i in $(seq "$rounds"); do
    run plain env
    run accel "$S" accel run --cgroup "$cg" --
    run plain-pinned taskset -c 0
    run accel-pinned taskset -c 0 "$S" accel run --cgroup "$cg" --
  done
)
echo "$results"
python3 - "$results" <<'PY'
import statistics, sys
rows = [l.split() for l in sys.argv[1].splitlines()]
med = {}
for label in ("plain", "accel", "plain-pinned", "accel-pinned"):
    p50 = [float(r[1]) for r in rows if r[0] == label]
    p99 = [float(r[2]) for r in rows if r[0] == label]
    med[label] = (statistics.median(p50), statistics.median(p99), min(p50), max(p50), min(p99), max(p99))
print(f"medians of {len(rows) // 4} rounds (us): p50 (min-max)  p99 (min-max)")
for label, (p50, p99, a, b, c, d) in med.items():
    print(f"  {label:13} p50 {p50:7.1f} ({a:.1f}-{b:.1f})  p99 {p99:7.1f} ({c:.1f}-{d:.1f})")
for kind in ("", "-pinned"):
    p, a = med["plain" + kind], med["accel" + kind]
    print(f"accel/plain{kind or ' unpinned'}: p50 {a[0] / p[0]:.2f}x, p99 {a[1] / p[1]:.2f}x")
PY
INNER
