#!/usr/bin/env bash
# The concurrency axis of the benchmark (issue 11): N concurrent one-way bulk pairs through each
# contender, aggregate Gbit/s and machine-wide CPU-seconds per GiB, every pair sha256-checked.
#
#   scripts/bench-pairs.sh [--pairs 1,4,16,64] [--rounds 3] [--bytes 1G] [--out DIR]
#                          [--contenders a,b,...] [--skrelay BIN] [--bench BIN] [--haproxy CMD]
#                          [--settle SECS] [--pair-bytes-max BYTES] [--timeout SECS]
#                          [--prototype "LOADER OBJ"]
#   scripts/bench-pairs.sh --pack DIR     bundle binaries + HAProxy for a bare machine (see below)
#
# Contenders: direct (loopback, the limit); relay-kernel, relay-kernel-after0, relay-userspace;
# proxy-kernel, proxy-kernel-after0, proxy-userspace (skrelay with default flags, with
# --kernel-after 0, and --datapath userspace); haproxy-threads (nbthread = CPUs, forced splice);
# proxy-prototype, only when asked for: the first sockmap prototype's proxy (issue 11 item 3;
# ../shared/reference/spike: --prototype "target/release/loader bpf/relay.bpf.o", built there;
# it has no --metrics, so its pairs show no paths).
# Rounds interleave them (for each N: A B C ...), so drift hits all; the report takes medians.
# Each measurement sends --bytes in all (bytes/N per pair); the receivers hold every byte until
# the clock stops, then sha256 each pair: --bytes is also the memory a measurement needs.
# --pair-bytes-max caps what one pair sends (a measurement then sends less than --bytes at small
# N): on a fast machine, one pair's 8 GiB would take longer to hash than to send.
# skrelay runs with --metrics, and each measurement reads skrelay_pair_paths_total: which path
# (kernel, kernel after a splice(2) start, splice(2)) carried each pair. CPU is counted machine-wide
# (cpu_s_per_gib) and, for a shared machine, without the CPU time of every process but the bench,
# the daemon and the kernel's threads (own_cpu_s_per_gib; others_cpu_s says how much was taken out).
#
# --timeout SECS (default 120): a measurement still running then has stalled; the run stops.
# --settle SECS (for a shared machine): before each measurement wait, up to SECS, for a moment in
# which the rest of the machine is busy less than 20% of one CPU over half a second.
#
# Output in DIR (default a new /tmp/skrelay-pairs.XXXXXX): pairs.tsv (contender N metric value
# round), pairs-meta.env, pairs.log, one log per daemon. scripts/bench.sh --pairs-from DIR turns it
# into BENCHMARKS.md's concurrency section and chart. Any failure (a daemon that does not start, a
# measurement that fails or times out, a sha256 mismatch, a pair skrelay did not end by EOF) stops
# the run with a message and exit status 1; a missing tool or bad argument exits 2.
#
# Needs: Linux with BPF (root) for skrelay's kernel datapath; bash, coreutils, awk, timeout. No
# compiler, no network, no ss: listening is read from /proc/net/tcp. On a bare machine: here run
# `scripts/bench-pairs.sh --pack DIR` (builds release skrelay and bench, copies them, this script,
# scripts/bench-pairs-bare.sh as DIR/run.sh, and the haproxy binary with its shared libraries and
# loader; about 25 MiB), carry DIR over, and there run (as root) `OUT=OUT DIR/run.sh` (16 cores:
# about 4 minutes, 8 GiB of memory; see its header); bring OUT back and run
# `scripts/bench.sh --pairs-from OUT` here. HAProxy runs on the carried loader and libraries
# (DIR/haproxy.sh); skrelay and bench use the bare machine's libc when it runs them (same or newer
# glibc), else run.sh puts them on the carried one. With the device tool: pack into
# `target/bench-pack` (ignored), carry it, and run `OUT=$OUT target/bench-pack/run.sh`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

pairs=1,4,16,64
rounds=3
bytes=1G
out=""
only=""
sk=""
bench=""
haproxy_cmd=""
pack=""
settle=0
pair_max=""
limit=120
prototype=""
die() { echo "bench-pairs: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --pairs|--rounds|--bytes|--out|--contenders|--skrelay|--bench|--haproxy|--pack|--settle|--pair-bytes-max|--timeout|--prototype)
      [ $# -ge 2 ] || die "$1 needs a value (try --help)" ;;
  esac
  case "$1" in
    --pairs) pairs="$2"; shift ;;
    --rounds) rounds="$2"; shift ;;
    --bytes) bytes="$2"; shift ;;
    --out) out="$2"; shift ;;
    --contenders) only="$2"; shift ;;
    --skrelay) sk="$2"; shift ;;
    --bench) bench="$2"; shift ;;
    --haproxy) haproxy_cmd="$2"; shift ;;
    --pack) pack="$2"; shift ;;
    --settle) settle="$2"; shift ;;
    --pair-bytes-max) pair_max="$2"; shift ;;
    --timeout) limit="$2"; shift ;;
    --prototype) prototype="$2"; shift ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (try --help)" ;;
  esac
  shift
done

# --- the arguments, checked before anything is built or run ----------------------------------
size() { # option value: bytes (more than 0), with an optional K, M or G suffix
  local digits=${2%[GgMmKk]} shift=0
  case "$2" in
    *[Gg]) shift=30 ;;
    *[Mm]) shift=20 ;;
    *[Kk]) shift=10 ;;
  esac
  case "$digits" in
    ''|*[!0-9]*|0*) die "$1 takes a number above 0 with an optional K, M or G suffix, not $2" ;;
  esac
  echo $(( digits << shift ))
}
bytes=$(size --bytes "$bytes")
pair_max=$(size --pair-bytes-max "${pair_max:-$bytes}")
avail_kib=$(awk '/MemAvailable/ {print $2}' /proc/meminfo)
[ $(( bytes >> 10 )) -lt $(( avail_kib / 2 )) ] ||
  die "--bytes $bytes needs that much memory for the receivers; only $(( avail_kib >> 10 )) MiB available (use a smaller --bytes)"
IFS=, read -r -a ns <<<"$pairs"
for n in "${ns[@]}"; do
  case "$n" in ''|*[!0-9]*|0) die "--pairs takes a list of counts like 1,4,16,64, not $pairs" ;; esac
done
case "$rounds" in ''|*[!0-9]*|0) die "--rounds takes a count, not $rounds" ;; esac
case "$settle" in ''|*[!0-9]*) die "--settle takes whole seconds, not $settle" ;; esac
case "$limit" in ''|*[!0-9]*|0) die "--timeout takes whole seconds, not $limit" ;; esac

# --- a bundle for a machine without a compiler or network --------------------------------------
if [ -n "$pack" ]; then
  root=$(cd "$here/.." && pwd)
  command -v haproxy >/dev/null || die "cannot pack: haproxy is not installed (scripts/setup.sh --bench installs it)"
  (cd "$root" && cargo build --release --quiet --bin skrelay --example bench)
  mkdir -p "$pack/lib"
  cp "$root/target/release/skrelay" "$root/target/release/examples/bench" "$here/bench-pairs.sh" "$pack/"
  cp "$here/bench-pairs-bare.sh" "$pack/run.sh"
  hp=$(command -v haproxy)
  cp "$hp" "$pack/haproxy"
  ldd "$hp" | awk '/=> \//{print $3} /^\t\/.*ld-linux/{print $1}' | while read -r lib; do cp -L "$lib" "$pack/lib/"; done
  loader=$(ls "$pack"/lib/ld-linux-* | head -1)
  cat >"$pack/haproxy.sh" <<EOF
#!/bin/sh
# HAProxy through the carried loader and libraries (the bare machine has none of them).
d=\$(cd "\$(dirname "\$0")" && pwd)
exec "\$d/lib/$(basename "$loader")" --library-path "\$d/lib" "\$d/haproxy" "\$@"
EOF
  chmod +x "$pack/haproxy.sh"
  echo "bench-pairs: packed into $pack ($(du -sh "$pack" | cut -f1)); run there as root:" >&2
  echo "  OUT=DIR2 $pack/run.sh     (or by hand: $pack/bench-pairs.sh --out DIR2 --bytes 8G --pair-bytes-max 2G --rounds 2)" >&2
  echo "then here: scripts/bench.sh --pairs-from DIR2" >&2
  exit 0
fi

# --- what runs ---------------------------------------------------------------------------------
# Next to this script (a packed bundle), else this checkout's release build.
if [ -z "$sk" ]; then
  if [ -x "$here/skrelay" ]; then sk="$here/skrelay"; else sk="$here/../target/release/skrelay"; fi
fi
if [ -z "$bench" ]; then
  if [ -x "$here/bench" ]; then bench="$here/bench"; else bench="$here/../target/release/examples/bench"; fi
fi
if [ -z "$haproxy_cmd" ]; then
  if [ -x "$here/haproxy.sh" ]; then haproxy_cmd="$here/haproxy.sh"; else haproxy_cmd=haproxy; fi
fi
[ -x "$sk" ] || die "no skrelay binary at $sk (cargo build --release, or --skrelay BIN)"
[ -x "$bench" ] || die "no bench binary at $bench (cargo build --release --example bench, or --bench BIN)"
for t in timeout awk nproc; do command -v "$t" >/dev/null || die "$t is missing (coreutils/gawk; scripts/setup.sh --bench)"; done


all=(direct relay-kernel relay-kernel-after0 relay-userspace proxy-kernel proxy-kernel-after0 proxy-userspace haproxy-threads)
if [ -n "$only" ]; then
  IFS=, read -r -a contenders <<<"$only"
  for c in "${contenders[@]}"; do
    [[ " ${all[*]} proxy-prototype " == *" $c "* ]] || die "unknown contender $c (known: ${all[*]} proxy-prototype)"
  done
else
  contenders=("${all[@]}")
fi
if [[ " ${contenders[*]} " == *" proxy-prototype "* ]]; then
  read -r -a proto <<<"$prototype"
  [ "${#proto[@]}" = 2 ] && [ -x "${proto[0]}" ] && [ -r "${proto[1]}" ] ||
    die "proxy-prototype needs --prototype \"LOADER OBJ\": the spike's loader binary and its relay.bpf.o"
fi
if [[ " ${contenders[*]} " == *" haproxy-threads "* ]]; then
  read -r -a hp <<<"$haproxy_cmd"
  command -v "${hp[0]}" >/dev/null ||
    die "haproxy not found ($haproxy_cmd): scripts/setup.sh --bench installs it, or pass --haproxy CMD, or leave haproxy-threads out with --contenders"
  # awk reads all of it: `head` closing the pipe early killed haproxy -v with SIGPIPE, and
  # pipefail then the whole run (exit 141, no message: 5 runs in 60).
  haproxy_version=$("${hp[@]}" -v 2>/dev/null | awk 'NR == 1 {print $3}')
  [ -n "$haproxy_version" ] || die "$haproxy_cmd -v does not run (missing shared libraries? see --pack)"
fi

out=${out:-$(mktemp -d /tmp/skrelay-pairs.XXXXXX)}
mkdir -p "$out"
results="$out/pairs.tsv"
log="$out/pairs.log"
: >"$results"
: >"$log"
echo "bench-pairs: logs and raw results in $out" >&2

# --- daemons -----------------------------------------------------------------------------------
upstream=127.0.0.1:17200
declare -A addr via metrics pid
daemons=()
cleanup() {
  for p in "${daemons[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${daemons[@]}"; do wait "$p" 2>/dev/null || true; done
  daemons=()
}
trap cleanup EXIT

listening() { # port: is something listening on 127.0.0.1:port or *:port (from /proc/net/tcp)?
  local hex
  hex=$(printf '%04X' "$1")
  awk -v p="$hex" 'NR > 1 && $4 == "0A" && substr($2, index($2, ":") + 1) == p { f = 1 } END { exit !f }' /proc/net/tcp
}

start() { # name port via metrics-port cmd...
  local name=$1 port=$2 kind=$3 mport=$4
  shift 4
  # Another process on the port would be taken for the contender.
  listening "$port" && die "$name cannot run: port $port is already taken (ss -ltnp 'sport = :$port' shows by whom)"
  echo "$name: $*" >>"$log"
  "$@" >>"$out/$name.log" 2>&1 &
  local p=$!
  daemons+=("$p")
  for _ in $(seq 100); do
    if listening "$port"; then
      addr[$name]=127.0.0.1:$port; via[$name]=$kind; pid[$name]=$p
      [ "$mport" = - ] || metrics[$name]=127.0.0.1:$mport
      return 0
    fi
    kill -0 "$p" 2>/dev/null || break
    sleep 0.1
  done
  echo "bench-pairs: $name did not start listening on port $port; its output:" >&2
  tail -5 "$out/$name.log" >&2
  exit 1
}

# Without the per-pair log line, as HAProxy runs without a log section.
export RUST_LOG=warn
# Every pair of the 64-pair point in the kernel, as measured before --kernel-memory's default
# followed the host's TCP memory (6 kernel pairs on a 24 GiB host, 36 on 128 GiB): these pairs'
# readers keep up, far from the worst case that default guards against (README, "Bounded memory").
km=(--kernel-memory 2G)
via[direct]=direct
for c in "${contenders[@]}"; do
  case "$c" in
    relay-kernel) start "$c" 17201 relay 17291 "$sk" relay --listen 127.0.0.1:17201 --datapath kernel "${km[@]}" --metrics 127.0.0.1:17291 ;;
    relay-kernel-after0) start "$c" 17202 relay 17292 "$sk" relay --listen 127.0.0.1:17202 --datapath kernel "${km[@]}" --kernel-after 0 --metrics 127.0.0.1:17292 ;;
    relay-userspace) start "$c" 17203 relay 17293 "$sk" relay --listen 127.0.0.1:17203 --datapath userspace --metrics 127.0.0.1:17293 ;;
    proxy-kernel) start "$c" 17204 proxy 17294 "$sk" proxy --upstream $upstream --listen 127.0.0.1:17204 --datapath kernel "${km[@]}" --metrics 127.0.0.1:17294 ;;
    proxy-kernel-after0) start "$c" 17205 proxy 17295 "$sk" proxy --upstream $upstream --listen 127.0.0.1:17205 --datapath kernel "${km[@]}" --kernel-after 0 --metrics 127.0.0.1:17295 ;;
    proxy-userspace) start "$c" 17206 proxy 17296 "$sk" proxy --upstream $upstream --listen 127.0.0.1:17206 --datapath userspace --metrics 127.0.0.1:17296 ;;
    proxy-prototype) start "$c" 17208 proxy - "${proto[0]}" relay --port=17208 --proxy=$upstream --obj="${proto[1]}" ;;
    haproxy-threads)
      cat >"$out/haproxy.cfg" <<EOF
global
    maxconn 4096
    nbthread $(nproc)
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    option splice-request
    option splice-response
frontend bench
    bind 127.0.0.1:17207
    default_backend upstream
backend upstream
    server s1 $upstream
EOF
      start "$c" 17207 proxy - "${hp[@]}" -db -f "$out/haproxy.cfg" ;;
  esac
done

# --- measuring ---------------------------------------------------------------------------------
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }
hz=$(getconf CLK_TCK 2>/dev/null || echo 100)
settled=0; unsettled=0
settle_down() { # wait up to $settle s for half a second with the machine < 20% of a CPU busy
  [ "$settle" -gt 0 ] || return 0
  local deadline=$(( $(date +%s) + settle )) a b
  while :; do
    a=$(busy_ticks); sleep 0.5; b=$(busy_ticks)
    if [ $(( (b - a) * 100 * 2 )) -lt $(( 20 * hz )) ]; then settled=$((settled + 1)); return 0; fi
    if [ "$(date +%s)" -ge "$deadline" ]; then unsettled=$((unsettled + 1)); return 0; fi
  done
}

field() { sed -n "s/.*[ ]$1=\([^ ]*\).*/\1/p"; }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$results"; }

# One unrecorded warm-up measurement per contender: the first after a daemon starts ran at 3-4
# Gbit/s and 2.2-3.3 CPU-s/GiB for every contender, direct loopback included, where the rest ran
# at 6-10 Gbit/s and 1.0-1.5: the machine's first allocation of that size (a smaller warm-up did
# not help), so the warm-up sends what one pair sends.
for c in "${contenders[@]}"; do
  printf '\r\033[K warm-up, %s' "$c" >&2
  cmd=("$bench" bulk-pairs --pairs 1 --bytes $(( pair_max < bytes ? pair_max : bytes )) --via "${via[$c]}" --upstream $upstream)
  [ -n "${addr[$c]:-}" ] && cmd+=(--addr "${addr[$c]}")
  [ -n "${metrics[$c]:-}" ] && cmd+=(--metrics "${metrics[$c]}")
  timeout "$limit" "${cmd[@]}" >>"$log" 2>&1 || die "$c: the warm-up measurement failed: ${cmd[*]} (see $log)"
done
total=$(( rounds * ${#ns[@]} * ${#contenders[@]} )); step=0; t0=$(date +%s)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
echo "bench-pairs: $rounds round(s) x pairs ${ns[*]} x ${contenders[*]}; $(( bytes >> 20 )) MiB per measurement" >&2
for r in $(seq "$rounds"); do
  for n in "${ns[@]}"; do
    for c in "${contenders[@]}"; do
      step=$((step + 1))
      el=$(( $(date +%s) - t0 ))
      printf '\r\033[K[%d/%d %dm%02ds] round %d, %d pairs, %s' "$step" "$total" $((el / 60)) $((el % 60)) "$r" "$n" "$c" >&2
      settle_down
      b=$(( pair_max * n < bytes ? pair_max * n : bytes ))
      cmd=("$bench" bulk-pairs --pairs "$n" --bytes "$b" --via "${via[$c]}" --upstream $upstream)
      [ -n "${addr[$c]:-}" ] && cmd+=(--addr "${addr[$c]}")
      [ -n "${metrics[$c]:-}" ] && cmd+=(--metrics "${metrics[$c]}")
      [ -n "${pid[$c]:-}" ] && cmd+=(--own-pid "${pid[$c]}")
      rc=0
      o=$(timeout "$limit" "${cmd[@]}" 2>"$out/last.err") || rc=$?
      cat "$out/last.err" >>"$log"
      if [ "$rc" != 0 ]; then
        echo "$c n=$n round=$r: FAILED (exit $rc$([ "$rc" = 124 ] && echo ", stalled: still running after $limit s (--timeout)")): ${cmd[*]}: $o" >>"$log"
        echo >&2
        echo "bench-pairs: $c with $n pairs (round $r) failed (exit $rc): ${cmd[*]}" >&2
        [ -n "$o" ] && echo "$o" >&2
        tail -5 "$out/last.err" >&2
        echo "bench-pairs: full log: $log" >&2
        exit 1
      fi
      echo "$c n=$n round=$r: $o" >>"$log"
      for m in gbps cpu_s_per_gib own_cpu_s_per_gib others_cpu_s softirq_s_per_gib pair_gbps_min pair_gbps_max; do
        record "$c" "$n" "$m" "$(field $m <<<"$o")" "$r"
      done
      p=$(field paths <<<"$o")
      if [ -n "$p" ] && [ "$p" != none ]; then
        IFS=, read -r -a kv <<<"$p"
        for x in "${kv[@]}"; do record "$c" "$n" "path:${x%%:*}" "${x##*:}" "$r"; done
      fi
    done
  done
done
echo >&2
cleanup

cat >"$out/pairs-meta.env" <<EOF
date=$(date -u '+%Y-%m-%d %H:%M UTC')
git=$(git -C "$here/.." rev-parse --short HEAD 2>/dev/null || echo "packed build")
rounds=$rounds
pairs=$pairs
bytes_h=$(( bytes >> 20 )) MiB$([ "$pair_max" -lt "$bytes" ] && echo " (at most $(( pair_max >> 20 )) MiB per pair)")
cpus=$(nproc)
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)
kernel=$(uname -r)
haproxy=${haproxy_version:-not run}
autogroup=$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo '?')
load=$load_before -> $(cut -d' ' -f1-3 /proc/loadavg)
minutes=$(( ($(date +%s) - t0 + 59) / 60 ))
settle=$([ "$settle" -gt 0 ] && echo "up to $settle s before each measurement: $settled found the machine quiet, $unsettled did not" || echo off)
EOF
echo "bench-pairs: done in $(( $(date +%s) - t0 )) s; results in $results" >&2
