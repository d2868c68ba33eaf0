#!/usr/bin/env bash
# accel with iperf3: one stream, -R, --bidir and -P 4, plain loopback and under `skrelay accel
# run`, interleaved round by round; prints every round's Gbit/s (received, all streams and
# directions), the medians and accel/plain, and the path the accel bytes took. Needs root
# (netns, cgroup, BPF) and iperf3. Not part of cargo test. Usage:
#   scripts/accel-iperf3.sh [ROUNDS] [SECS]        (defaults: 3 3)
#   SKRELAY_BEFORE=/path/to/older/skrelay adds that build's accel as a third run per round.
#   SKRELAY=BIN: use this build, build nothing (a machine without cargo, e.g. the lent 16-core one).
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,8p' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-3}
for v in "$rounds" "$secs"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "accel-iperf3: ROUNDS and SECS are whole numbers above 0, not $v (try --help)" >&2; exit 2; }
done
if [[ -n ${SKRELAY:-} ]]; then
  bins=("$(realpath "$SKRELAY")")
else
  cargo build -q --release --bin skrelay
  bins=("$PWD/target/release/skrelay")
fi
[[ -n ${SKRELAY_BEFORE:-} ]] && bins+=("$SKRELAY_BEFORE")
exec unshare -n bash -s "$rounds" "$secs" "${bins[@]}" <<'INNER'
set -euo pipefail
rounds=$1 secs=$2; shift 2
bins=("$@")
ip link set lo up
source scripts/accel-common.sh
accel_cgroup skrelay-iperf3 "${bins[@]}"
gbps() { python3 -c 'import json,sys; d=json.load(sys.stdin); e=d["end"]; print("%.2f" % ((e["sum_received"]["bits_per_second"] + e.get("sum_received_bidir_reverse", {}).get("bits_per_second", 0)) / 1e9) if "error" not in d else "error:" + d["error"])'; }
one() { # PREFIX... :: IPERF3-CLIENT-ARGS...: one server + client, prints Gbit/s
  local pre=() port=$((20000 + RANDOM % 20000)) out=""
  while [[ $1 != :: ]]; do pre+=("$1"); shift; done; shift
  "${pre[@]}" iperf3 -s -1 -p $port >/dev/null 2>&1 &
  local srv=$!
  for _ in $(seq 50); do # until the server listens (a busy machine starts it slowly)
    sleep 0.2
    out=$("${pre[@]}" iperf3 -c 127.0.0.1 -p $port -t "$secs" -J "$@" 2>/dev/null || true)
    grep -q "Connection refused" <<<"$out" || break
  done
  gbps <<<"$out"
  wait $srv || true
}
for args in "" "-R" "--bidir" "-P 4"; do
  plain="" ; declare -a got=() paths=()
  for _ in $(seq "$rounds"); do
    plain+=" $(one env :: $args)"
    for i in "${!bins[@]}"; do
      b=${bins[$i]}
      $b accel on --cgroup "$cg" >/dev/null
      got[$i]+=" $(one $b accel run --cgroup "$cg" -- :: $args)"
      paths[$i]+=" $(accel_path "$b")"
      $b accel off --cgroup "$cg" --force >/dev/null
    done
  done
  pm=$(median $plain)
  line="iperf3 ${args:-(one stream)}: plain=$pm ($plain )"
  for i in "${!bins[@]}"; do
    am=$(median ${got[$i]})
    line+=" $([[ $i == 0 ]] && echo accel || echo before)=$am ($(python3 -c "print('%.2f' % ($am / $pm))")x) (${got[$i]} ) path:${paths[$i]}"
  done
  echo "$line"
done
INNER
