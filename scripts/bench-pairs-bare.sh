#!/bin/bash
# The concurrency axis on a bare, offline machine, in one call: what a lent 16-core machine runs
# (issue 11 item 5). `scripts/bench-pairs.sh --pack DIR` puts this script into DIR as run.sh; there,
# as root: `DIR/run.sh` (OUT=folder for the results, default /tmp/bench-pairs-out). It records the
# machine, checks that skrelay and bench run (else it runs them through the carried loader and
# libc), checks that the kernel datapath loads (else it measures the contenders that need no BPF),
# runs bench-pairs.sh with a hard stop, and copies into OUT, every 5 s and at the end, no more than
# the few files a device call brings back: machine.txt, preflight.txt, pairs.tsv, pairs.log,
# pairs-meta.env and logs.tgz (the daemons' logs). Here: `scripts/bench.sh --pairs-from OUT`.
# Environment (defaults are what BENCHMARKS.md's 16-CPU section used): BYTES=8G PAIR_MAX=2G
# ROUNDS=2 PAIRS=1,4,16,64 CONTENDERS=<bench-pairs.sh's, less relay-kernel-after0> LIMIT=500
# (seconds for the whole run) AUTOGROUP=0|1 (sets kernel.sched_autogroup_enabled first).
set -u
case "${1:-}" in
  -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
  "") ;;
  *) echo "run.sh: takes no arguments, only the environment of --help (got $1)" >&2; exit 2 ;;
esac
d=$(cd "$(dirname "$0")" && pwd)
o=${OUT:-/tmp/bench-pairs-out}
work=$(mktemp -d /tmp/bench-pairs.XXXXXX)
mkdir -p "$o"
if [ -n "${AUTOGROUP:-}" ]; then echo "$AUTOGROUP" >/proc/sys/kernel/sched_autogroup_enabled || exit 2; fi
{
  date -u; uname -a; echo "cpus=$(nproc)"; grep -m1 'model name' /proc/cpuinfo
  grep -E 'MemTotal|MemAvailable' /proc/meminfo; grep PRETTY_NAME /etc/os-release; ldd --version | head -1
  echo "autogroup=$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null)"; cat /proc/loadavg
} >"$o/machine.txt" 2>&1
cat "$o/machine.txt"
for b in skrelay bench; do
  if ! "$d/$b" --help >/dev/null 2>&1; then
    mv "$d/$b" "$d/$b.bin"
    printf '#!/bin/sh\nexec "%s/lib/ld-linux-x86-64.so.2" --library-path "%s/lib" "%s/%s.bin" "$@"\n' "$d" "$d" "$d" "$b" >"$d/$b"
    chmod +x "$d/$b"
    echo "$b: through the carried loader and libc"
  fi
done
RUST_LOG=warn timeout 3 "$d/skrelay" relay --listen 127.0.0.1:17299 --datapath kernel --threads 1 >"$o/preflight.txt" 2>&1
rc=$?
echo "kernel datapath preflight: exit $rc (124: it loaded and ran)" | tee -a "$o/preflight.txt"
c=${CONTENDERS:-direct,relay-kernel,relay-userspace,proxy-kernel,proxy-kernel-after0,proxy-userspace,haproxy-threads}
if [ "$rc" != 124 ]; then
  c=direct,relay-userspace,proxy-userspace,haproxy-threads
  echo "the kernel datapath does not load here: measuring $c only" | tee -a "$o/preflight.txt"
fi
( while sleep 5; do cp "$work/pairs.tsv" "$work/pairs.log" "$o/" 2>/dev/null; done ) &
copier=$!
timeout "${LIMIT:-500}" "$d/bench-pairs.sh" --out "$work" --bytes "${BYTES:-8G}" --pair-bytes-max "${PAIR_MAX:-2G}" \
  --rounds "${ROUNDS:-2}" --pairs "${PAIRS:-1,4,16,64}" --timeout 60 --contenders "$c" 2>&1 |
  tr '\r' '\n' | grep -v '^.\[K'
rc=${PIPESTATUS[0]}
kill "$copier" 2>/dev/null
cp "$work/pairs.tsv" "$work/pairs.log" "$o/"
cp "$work/pairs-meta.env" "$o/" 2>/dev/null
tar czf "$o/logs.tgz" -C "$work" .
awk '$3 == "gbps"' "$work/pairs.tsv"
rm -rf "$work" # everything of it is in $o (logs.tgz)
echo "bench-pairs exit $rc; results in $o"
exit "$rc"
