#!/usr/bin/env bash
# Benchmarks skrelay against what users pick instead and writes BENCHMARKS.md + BENCHMARKS.png.
#
#   scripts/bench.sh           full run, 7-10 minutes on a 2-core machine
#   scripts/bench.sh --quick   smoke run, about a minute (smaller transfers, fewer round trips);
#                              it too rewrites BENCHMARKS.md's first section and BENCHMARKS.png
#                              (`git checkout BENCHMARKS.md BENCHMARKS.png` gives the committed ones back)
#   scripts/bench.sh --note "text"   adds a note under the header (e.g. "busy machine")
#   scripts/bench.sh --pairs 1,4,16,64   also the concurrency axis (scripts/bench-pairs.sh: N
#                              concurrent bulk pairs; full: 3 rounds of 1 GiB, about 6 minutes more
#                              on 2 cores; quick: 2 rounds of 256 MiB), written to its own section of
#                              BENCHMARKS.md and BENCHMARKS-pairs-<CPUs>cpu.svg
#   scripts/bench.sh --pairs-only 1,4,16,64   only the concurrency axis (the rest of BENCHMARKS.md stays)
#   scripts/bench.sh --pairs-from DIR   only the report of a scripts/bench-pairs.sh run (e.g. from a
#                              bare machine, see scripts/bench-pairs.sh --help)
#
# Contenders run interleaved (A B C A B C) so drift hits all of them; the report takes medians.
# skrelay proxy and skrelay accel are measured when this build has them (`--help` succeeds).
# A contender that cannot start or a measurement that fails (a sha256 mismatch included) stops the
# run with a message and exit status 1. Not part of cargo test or CI. Needs root (BPF, taskset of
# other processes) and the tools scripts/setup.sh --bench installs.
set -euo pipefail
# Its own path before the cd, for --help (`cd scripts && ./bench.sh --help` read ./bench.sh from
# the repository root: a new-user pass).
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
root=$(pwd)

mode=full
note=""
pairs=""
pairs_only=no
pairs_from=""
while [ $# -gt 0 ]; do
  case "$1" in
    --note|--pairs|--pairs-only|--pairs-from)
      [ $# -ge 2 ] || { echo "bench.sh: $1 needs a value (try --help)" >&2; exit 2; } ;;
  esac
  case "$1" in
    --quick) mode=quick ;;
    --note) note="$2"; shift ;;
    --pairs) pairs="$2"; shift ;;
    --pairs-only) pairs="$2"; pairs_only=yes; shift ;;
    --pairs-from) pairs_from="$2"; shift ;;
    -h|--help) sed -n '2,21p' "$self"; exit 0 ;;
    *) echo "bench.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

# Checked before anything runs: the concurrency axis comes last.
if [ -n "$pairs" ]; then
  IFS=, read -r -a counts <<<"$pairs"
  for n in "${counts[@]}"; do
    case "$n" in ''|*[!0-9]*|0) echo "bench.sh: --pairs takes a list of counts like 1,4,16,64, not $pairs" >&2; exit 2 ;; esac
  done
fi

if [ "$mode" = quick ]; then
  runs=3; bulk_bytes=$((256 << 20)); round_trips=5000; warmup=1000; conn_secs=1; idle_runs=1; idle_pairs=1000
  pairs_rounds=2; pairs_bytes=256M
else
  runs=5; bulk_bytes=$((1 << 30)); round_trips=20000; warmup=2000; conn_secs=3; idle_runs=3; idle_pairs=10000
  pairs_rounds=3; pairs_bytes=1G
fi
conn_clients=2

# The concurrency axis's report: its section of BENCHMARKS.md and its chart.
pairs_report() { # dir
  local d=$1 cpus chart
  [ -s "$d/pairs.tsv" ] && [ -s "$d/pairs-meta.env" ] ||
    { echo "bench.sh: $d has no pairs.tsv / pairs-meta.env of scripts/bench-pairs.sh" >&2; exit 2; }
  [ -n "$note" ] && echo "note=$note" >>"$d/pairs-meta.env"
  cpus=$(sed -n 's/^cpus=//p' "$d/pairs-meta.env")
  chart="BENCHMARKS-pairs-${cpus}cpu.svg"
  "$bench" report-pairs --results "$d/pairs.tsv" --meta "$d/pairs-meta.env" --out BENCHMARKS.md \
    --chart-data "$d/pairs-chart.dat" --chart "$chart"
  gnuplot -e "datafile='$d/pairs-chart.dat'; outfile='$chart'; subtitle='$(sed -n 's/^date=//p' "$d/pairs-meta.env"), Linux $(sed -n 's/^kernel=//p' "$d/pairs-meta.env"), $cpus CPUs'" scripts/bench-pairs.gp
  echo "bench: wrote the $cpus-CPU concurrency section of BENCHMARKS.md and $chart" >&2
}

# --- tools -------------------------------------------------------------------------------------
need=()
command -v gnuplot >/dev/null || need+=(gnuplot)
command -v cargo >/dev/null || need+=(cargo)
if [ -z "$pairs_from" ]; then
  command -v haproxy >/dev/null || need+=(haproxy)
  command -v taskset >/dev/null || need+=(taskset)
  [ "$pairs_only" = yes ] || command -v socat >/dev/null || need+=(socat)
fi
if [ "${#need[@]}" -gt 0 ]; then
  echo "bench: ${need[*]} missing: run scripts/setup.sh --bench (cargo: https://rustup.rs)" >&2
  exit 2
fi
echo "bench: building (release)" >&2
cargo build --release --quiet --bin skrelay --example bench
sk="$root/target/release/skrelay"
bench="$root/target/release/examples/bench"

if [ -n "$pairs_from" ]; then
  pairs_report "$pairs_from"
  exit 0
fi
if [ "$pairs_only" = yes ]; then
  d=$(mktemp -d /tmp/skrelay-pairs.XXXXXX)
  scripts/bench-pairs.sh --pairs "$pairs" --rounds "$pairs_rounds" --bytes "$pairs_bytes" --out "$d" \
    --skrelay "$sk" --bench "$bench"
  pairs_report "$d"
  exit 0
fi

work=$(mktemp -d /tmp/skrelay-bench.XXXXXX)
results="$work/results.tsv"
log="$work/bench.log"
: >"$results"
echo "bench: logs and raw results in $work" >&2

# --- contenders --------------------------------------------------------------------------------
upstream=127.0.0.1:17100
declare -A addr pid via cmdline
contenders=(direct)
via[direct]=direct
daemons=()

cleanup() {
  for p in "${daemons[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${daemons[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

wait_listening() { # name port
  for _ in $(seq 100); do
    ss -ltnH "sport = :$2" | grep -q . && return 0
    sleep 0.1
  done
  echo "bench: $1 did not start listening on port $2; see $work/$1.log" >&2
  return 1
}

start() { # name port via cmd...
  local name=$1 port=$2 kind=$3
  shift 3
  # Another process on the port would be taken for the contender.
  if ss -ltnH "sport = :$port" | grep -q .; then
    echo "bench: $name cannot run: port $port is already taken (ss -ltnp 'sport = :$port' shows by whom)" >&2
    exit 1
  fi
  cmdline[$name]=$(printf '%q ' "$@")
  "$@" >>"$work/$name.log" 2>&1 &
  local p=$!
  daemons+=("$p")
  if wait_listening "$name" "$port"; then
    contenders+=("$name"); addr[$name]=127.0.0.1:$port; pid[$name]=$p; via[$name]=$kind
  else
    echo "bench: $name cannot run: $(tail -3 "$work/$name.log")" >&2
    exit 1
  fi
}

have_proxy=no; have_accel=no
"$sk" proxy --help >/dev/null 2>&1 && have_proxy=yes
"$sk" accel --help >/dev/null 2>&1 && have_accel=yes

# Like HAProxy below (no log section), skrelay runs without its per-pair log line.
export RUST_LOG=warn
start relay-kernel 17001 relay "$sk" relay --listen 127.0.0.1:17001 --datapath kernel
start relay-userspace 17002 relay "$sk" relay --listen 127.0.0.1:17002 --datapath userspace
if [ $have_proxy = yes ]; then
  start proxy-kernel 17003 proxy "$sk" proxy --upstream $upstream --listen 127.0.0.1:17003 --datapath kernel
  start proxy-userspace 17004 proxy "$sk" proxy --upstream $upstream --listen 127.0.0.1:17004 --datapath userspace
  # The default kernel datapath keeps request/response pairs on splice(2); this one joins every
  # pair to the maps at once, which is what the kernel path itself costs per message.
  start proxy-kernel-after0 17007 proxy "$sk" proxy --upstream $upstream --listen 127.0.0.1:17007 --datapath kernel --kernel-after 0
fi
start socat 17005 proxy socat TCP-LISTEN:17005,bind=127.0.0.1,fork,reuseaddr,backlog=4096 TCP:$upstream
# HAProxy reserves ~2.5 descriptors per connection (2 sockets + a share of splice pipes) and
# refuses to start when that exceeds RLIMIT_NOFILE's hard limit.
haproxy_maxconn=$(( ($(ulimit -Hn) - 200) * 2 / 5 ))
cat >"$work/haproxy.cfg" <<EOF
global
    maxconn $haproxy_maxconn
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    option splice-request
    option splice-response
frontend bench
    bind 127.0.0.1:17006
    maxconn $haproxy_maxconn
    default_backend upstream
backend upstream
    server s1 $upstream
EOF
start haproxy 17006 proxy haproxy -db -f "$work/haproxy.cfg"
if [ $have_accel = yes ]; then
  contenders+=(accel); via[accel]=direct
fi

# --- running one measurement --------------------------------------------------------------------
step=0; total_steps=0; t_start=$(date +%s)
progress() {
  local el=$(( $(date +%s) - t_start ))
  printf '\r\033[K[%3d/%d %3d%% %dm%02ds] %s' "$step" "$total_steps" $(( step * 100 / (total_steps > 0 ? total_steps : 1) )) \
    $(( el / 60 )) $(( el % 60 )) "$*" >&2
}

restart() { # contender: a fresh daemon, so an idle-pairs run measures its own heap growth
  local c=$1 p=${pid[$1]:-}
  [ -n "$p" ] && [ -n "${cmdline[$1]:-}" ] || return 0
  kill "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  eval "${cmdline[$c]}" '>>"$work/$c.log" 2>&1 &'
  pid[$c]=$!
  daemons+=("${pid[$c]}")
  wait_listening "$c" "${addr[$c]##*:}"
}

pin() { # contender cpus: move the daemon (all its threads) to these CPUs
  local p=${pid[$1]:-}
  [ -n "$p" ] || return 0
  taskset -a -p -c "$2" "$p" >/dev/null 2>&1 || true
}

# measure contender metric-prefix subcommand args...: runs the bench client through the contender.
measure() {
  local c=$1 what=$2
  shift 2
  local cmd=("$bench" "$@" --via "${via[$c]}" --upstream "$upstream")
  [ -n "${addr[$c]:-}" ] && cmd+=(--addr "${addr[$c]}")
  [ "$c" = accel ] && cmd=("$sk" accel run -- "${cmd[@]}")
  [ "$what" = pinned ] && cmd=(taskset -c 0 "${cmd[@]}")
  local out
  if out=$(timeout 300 "${cmd[@]}" 2>>"$log"); then
    echo "$c $what: $out" >>"$log"
    echo "$out"
  else
    echo "$c $what: FAILED: ${cmd[*]}" >>"$log"
    echo >&2
    echo "bench: $c $what failed: ${cmd[*]}" >&2
    grep -v '^[^ ]* [^ ]*: ' "$log" | tail -5 >&2 || true
    echo "bench: full log: $log" >&2
    return 1
  fi
}

field() { sed -n "s/.*[ ]$1=\([^ ]*\).*/\1/p"; }
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$results"; }

proxyish=(); idleish=()
for c in "${contenders[@]}"; do
  case "${via[$c]}" in proxy) proxyish+=("$c") ;; esac
  case "$c" in relay-*|proxy-*|haproxy) idleish+=("$c") ;; esac
done
conn_set=(direct "${proxyish[@]}")
total_steps=$(( runs * ${#contenders[@]} * 3 + runs * ${#conn_set[@]} + idle_runs * ${#idleish[@]} ))

echo "bench: $mode run; contenders: ${contenders[*]}" >&2
# One unrecorded bulk transfer first: the machine's first allocation of that size made the first
# measurement 2-3x slower and costlier, whichever contender it was (scripts/bench-pairs.sh).
progress "bulk warm-up"
measure direct bulk bulk --bytes "$bulk_bytes" >/dev/null || exit 1
for r in $(seq "$runs"); do
  for c in "${contenders[@]}"; do
    step=$((step + 1)); progress "bulk $c (run $r/$runs)"
    if out=$(measure "$c" bulk bulk --bytes "$bulk_bytes"); then
      record "$c" gbps "$(field gbps <<<"$out")"
      record "$c" cpu_s_per_gib "$(field cpu_s_per_gib <<<"$out")"
      record "$c" softirq_s_per_gib "$(field softirq_s_per_gib <<<"$out")"
    else
      exit 1 # measure said why
    fi
  done
done
for r in $(seq "$runs"); do
  for c in "${contenders[@]}"; do
    step=$((step + 1)); progress "ping-pong unpinned $c (run $r/$runs)"
    if out=$(measure "$c" unpinned pingpong --round-trips "$round_trips" --warmup "$warmup"); then
      record "$c" unpinned_p50_us "$(field p50_us <<<"$out")"
      record "$c" unpinned_p99_us "$(field p99_us <<<"$out")"
    else
      exit 1 # measure said why
    fi
  done
done
for r in $(seq "$runs"); do
  for c in "${contenders[@]}"; do
    step=$((step + 1)); progress "ping-pong pinned to CPU 0 $c (run $r/$runs)"
    pin "$c" 0
    if out=$(measure "$c" pinned pingpong --round-trips "$round_trips" --warmup "$warmup"); then
      record "$c" pinned_p50_us "$(field p50_us <<<"$out")"
      record "$c" pinned_p99_us "$(field p99_us <<<"$out")"
    else
      exit 1 # measure said why
    fi
    pin "$c" "0-$(( $(nproc) - 1 ))"
  done
done
for r in $(seq "$runs"); do
  for c in "${conn_set[@]}"; do
    step=$((step + 1)); progress "connections/s $c (run $r/$runs)"
    if out=$(measure "$c" connect connect-rate --secs "$conn_secs" --clients "$conn_clients"); then
      record "$c" conn_per_sec "$(field per_sec <<<"$out")"
    else
      exit 1 # measure said why
    fi
  done
done
# Idle pairs: what fits under RLIMIT_NOFILE's hard limit (the daemons cannot raise it past that),
# less some descriptors for the listener, epoll, BPF maps and logs.
nofile_hard=$(ulimit -Hn)
idle_requested=""
for r in $(seq "$idle_runs"); do
  for c in "${idleish[@]}"; do
    want=$(( (nofile_hard - 100) / 2 ))
    [ "$c" = haproxy ] && want=$(( haproxy_maxconn - 10 ))
    [ "$want" -gt "$idle_pairs" ] && want=$idle_pairs
    [ "$r" = 1 ] && idle_requested+="${idle_requested:+, }$c $want"
    step=$((step + 1)); progress "idle pairs $c: $want (run $r/$idle_runs)"
    restart "$c"
    if out=$(measure "$c" idle idle-pairs --pairs "$want" --pid "${pid[$c]}"); then
      record "$c" idle_bytes_per_pair "$(field bytes_per_pair <<<"$out")"
      record "$c" idle_slab_bytes_per_pair "$(field kernel_slab_bytes_per_pair <<<"$out")"
      record "$c" idle_pairs_held "$(field held <<<"$out")"
    else
      exit 1 # measure said why
    fi
    sleep 1 # let the daemon close the previous pairs
  done
done
progress "done"; echo >&2

# --- report ------------------------------------------------------------------------------------
cleanup; daemons=()
failures=$(grep -c ': FAILED: ' "$log" || true)
cat >"$work/meta.env" <<EOF
date=$(date -u '+%Y-%m-%d %H:%M UTC')
git=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- relay probes examples scripts || echo ' + uncommitted changes')
mode=$mode
note=$note
runs=$runs (connections: $runs, idle pairs: $idle_runs)
bulk_bytes_h=$(( bulk_bytes >> 20 )) MiB
round_trips=$round_trips
warmup=$warmup
conn_clients=$conn_clients
conn_secs=$conn_secs
cpus=$(nproc)
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)
kernel=$(uname -r)
haproxy=$(haproxy -v | head -1 | awk '{print $3}')
nofile_hard=$nofile_hard
idle_requested=$idle_requested
failures=$failures
EOF
"$bench" report --results "$results" --meta "$work/meta.env" --out BENCHMARKS.md --chart-data "$work/chart.dat"
gnuplot -e "datafile='$work/chart.dat'; outfile='BENCHMARKS.png'; subtitle='$mode run, $(date -u +%Y-%m-%d), Linux $(uname -r), $(nproc) vCPUs'" scripts/bench.gp
echo "bench: wrote BENCHMARKS.md and BENCHMARKS.png ($failures failed measurement(s); log: $log)" >&2
if [ -n "$pairs" ]; then
  scripts/bench-pairs.sh --pairs "$pairs" --rounds "$pairs_rounds" --bytes "$pairs_bytes" --out "$work/pairs" \
    --skrelay "$sk" --bench "$bench"
  pairs_report "$work/pairs"
fi
