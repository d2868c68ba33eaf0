#!/usr/bin/env bash
# accel write-size sweep: for each write size and connection count, examples/accel_load plain
# and under `skrelay accel run`, interleaved round by round (plain, accel, [accel with the
# before-build]; every other round in reverse), so a machine shared with other jobs disturbs each
# alike; prints the median of
# the rounds, accel/plain, every round, and which path the accel bytes took in each round.
# Needs root (netns, cgroup, BPF). Not part of cargo test. Usage:
#   scripts/accel-sweep.sh [SIZES] [CONNS] [SECS] [block|poll] [ROUNDS]
#   (defaults: "64 1024 4096 16384 65536 1048576" "1 4 16 64" 1 block 3; poll: event-loop readers)
#   SKRELAY_BEFORE=/path/to/older/skrelay adds that build's accel as a third run per round
#   (before/after in the same run). BEFORE_FLAGS="--small-write 128K" (say) passes those flags to
#   that run's `accel on`: with SKRELAY_BEFORE set to this build, one run compares two settings. SKRELAY=BIN ACCEL_LOAD=BIN: use these builds, build nothing
#   (a machine without cargo, e.g. the lent 16-core one).
# Path per round: MiB redirected / MiB sent by TCP while in the map / pauses / resumes /
# small-write demotions / sockets back on plain TCP / pauses given up.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,15p' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
sizes=${1:-"64 1024 4096 16384 65536 1048576"}
conns=${2:-"1 4 16 64"}
secs=${3:-1}
mode=${4:-block}
rounds=${5:-3}
for v in $sizes $conns "$secs" "$rounds"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "accel-sweep: SIZES, CONNS, SECS and ROUNDS are whole numbers above 0, not $v (try --help)" >&2; exit 2; }
done
[[ $mode == block || $mode == poll ]] || { echo "accel-sweep: the mode is block or poll, not $mode (try --help)" >&2; exit 2; }
if [[ -n ${SKRELAY:-} && -n ${ACCEL_LOAD:-} ]]; then
  S=$(realpath "$SKRELAY") L=$(realpath "$ACCEL_LOAD")
else
  cargo build -q --release --bin skrelay --example accel_load
  S=$PWD/target/release/skrelay
  L=$PWD/target/release/examples/accel_load
fi
bins=("$S")
[[ -n ${SKRELAY_BEFORE:-} ]] && bins+=("$SKRELAY_BEFORE")
exec unshare -n bash -s "$L" "$sizes" "$conns" "$secs" "$mode" "$rounds" "${BEFORE_FLAGS:-}" "${bins[@]}" <<'INNER'
set -euo pipefail
L=$1 sizes=$2 conns=$3 secs=$4 mode=$5 rounds=$6 before_flags=$7; shift 7
bins=("$@")
ip link set lo up
source scripts/accel-common.sh
accel_cgroup skrelay-sweep "${bins[@]}"
ratio() { python3 -c 'import sys; print("%.2f" % (float(sys.argv[1]) / float(sys.argv[2])))' "$1" "$2"; }
label() { [[ $1 == 0 ]] && echo accel || echo before; }
printf '# %s readers, %s s per run, %s rounds; median Gbit/s (every round), accel/plain of the medians%s\n' "$mode" "$secs" "$rounds" "${before_flags:+; before: accel on $before_flags}"
for w in $sizes; do
  for n in $conns; do
    plain="" ; declare -a got=() paths=()
    # Every other round runs in reverse order (plain, accel, before; then before, accel, plain):
    # a fixed order let whatever the previous run left (memory to reclaim, a warm cache) weigh
    # on the same contender every round.
    for r in $(seq "$rounds"); do
      order=(plain "${!bins[@]}")
      (( r % 2 )) || order=($(printf '%s\n' "${order[@]}" | tac))
      for i in "${order[@]}"; do
        if [[ $i == plain ]]; then
          plain+=" $($L "$w" "$n" "$secs" "$mode" | sed 's/.*gbps=//')"
          continue
        fi
        b=${bins[$i]} flags=()
        [[ $i == 0 ]] || read -ra flags <<<"$before_flags"
        $b accel on --cgroup "$cg" "${flags[@]}" >/dev/null
        got[$i]+=" $($b accel run --cgroup "$cg" -- "$L" "$w" "$n" "$secs" "$mode" 2>/dev/null | sed 's/.*gbps=//')"
        paths[$i]+=" $(accel_path "$b")"
        $b accel off --cgroup "$cg" --force >/dev/null
      done
    done
    pm=$(median $plain)
    line="write=$w conns=$n plain=$pm ($plain )"
    for i in "${!bins[@]}"; do
      am=$(median ${got[$i]})
      line+=" $(label "$i")=$am ($(ratio "$am" "$pm")x) (${got[$i]} ) path:${paths[$i]}"
    done
    echo "$line"
  done
done
INNER
