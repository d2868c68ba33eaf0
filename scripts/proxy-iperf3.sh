#!/usr/bin/env bash
# iperf3 through `skrelay proxy`: direct loopback, the kernel datapath and the userspace one,
# interleaved round by round (every other round in reverse order), in a private network namespace.
# Prints every round's Gbit/s received (all streams and both directions), the medians, and each
# datapath against the userspace one and against direct (issue 10 item 3 asks kernel >= 0.9x
# userspace for --bidir). Needs root (netns, BPF) and iperf3. Not part of cargo test. Usage:
#   scripts/proxy-iperf3.sh [ROUNDS] [SECS] [IPERF3-ARGS...]   (defaults: 3 10 --bidir)
#   SKRELAY=BIN: use this build, build nothing (a machine without cargo, e.g. the lent 16-core one).
# The proxies' logs: /tmp/proxy-iperf3-kernel.log and -userspace.log (the last round's).
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,9p' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-10}
for v in "$rounds" "$secs"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "proxy-iperf3: ROUNDS and SECS are whole numbers above 0, not $v (try --help)" >&2; exit 2; }
done
shift 2 2>/dev/null || shift $#
args=("$@")
[[ ${#args[@]} -gt 0 ]] || args=(--bidir)
if [[ -n ${SKRELAY:-} ]]; then
  S=$(realpath "$SKRELAY")
else
  cargo build -q --release --bin skrelay
  S=$PWD/target/release/skrelay
fi
exec unshare -n bash -s "$S" "$rounds" "$secs" "${args[@]}" <<'INNER'
set -euo pipefail
S=$1 rounds=$2 secs=$3; shift 3
args=("$@")
ip link set lo up
median() { python3 -c 'import sys,statistics; print("%.2f" % statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
ratio() { python3 -c 'import sys; print("%.2f" % (float(sys.argv[1]) / float(sys.argv[2])))' "$1" "$2"; }
gbps() { python3 -c 'import json,sys; d=json.load(sys.stdin); e=d["end"]; print("%.2f" % ((e["sum_received"]["bits_per_second"] + e.get("sum_received_bidir_reverse", {}).get("bits_per_second", 0)) / 1e9) if "error" not in d else "error")'; }
port=30000
one() { # CONTENDER: one iperf3 server (+ proxy) and client; prints Gbit/s received
  local c=$1 up=$((port += 2)) to proxy=""
  iperf3 -s -1 -p $up >/dev/null 2>&1 &
  local srv=$!
  to=$up
  if [[ $c != direct ]]; then
    to=$((up + 1))
    RUST_LOG=warn "$S" proxy --listen 127.0.0.1:$to --upstream 127.0.0.1:$up --datapath "$c" >/tmp/proxy-iperf3-$c.log 2>&1 &
    proxy=$!
  fi
  local out=""
  for _ in $(seq 50); do # until the server and the proxy listen
    sleep 0.1
    out=$(iperf3 -c 127.0.0.1 -p $to -t "$secs" -J "${args[@]}" 2>/dev/null || true)
    grep -q "Connection refused" <<<"$out" || break
  done
  gbps <<<"$out"
  wait $srv 2>/dev/null || true
  if [[ -n $proxy ]]; then kill $proxy; wait $proxy 2>/dev/null || true; fi
}
declare -A got=()
contenders=(direct kernel userspace)
for r in $(seq "$rounds"); do
  order=("${contenders[@]}")
  (( r % 2 )) || order=(userspace kernel direct)
  for c in "${order[@]}"; do got[$c]+=" $(one "$c")"; done
done
printf '# iperf3 %s, %s rounds of %s s, Gbit/s received (every round)\n' "${args[*]}" "$rounds" "$secs"
for c in "${contenders[@]}"; do
  echo "$c: median $(median ${got[$c]}) (${got[$c]} )"
done
k=$(median ${got[kernel]}) u=$(median ${got[userspace]}) d=$(median ${got[direct]})
echo "kernel/userspace $(ratio "$k" "$u")x, kernel/direct $(ratio "$k" "$d")x, userspace/direct $(ratio "$u" "$d")x"
INNER
