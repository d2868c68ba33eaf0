#!/usr/bin/env bash
# Installs the Debian packages skrelay's build and test suite need, and nothing else.
# Idempotent: packages already present are not downloaded again.
#   scripts/setup.sh --bench   also what scripts/bench.sh and scripts/bench-pairs.sh compare with
#                              and draw with (HAProxy, gnuplot, taskset)
set -euo pipefail

packages=(
  clang llvm libbpf-dev linux-libc-dev   # build.rs compiles probes/*.bpf.c
  iproute2 bpftool                       # tests: netns set-up, pinned-state inspection
  netcat-openbsd ncat socat iperf3 curl  # tests: real clients
  strace                                 # tests: a command killed at a chosen system call
  libcap2-bin                            # tests: capsh, root without a capability
  redis-server                           # tests: accel with a real service (brings redis-tools)
  nginx wrk                              # tests: accel_services (the test runs its own nginx)
  postgresql                             # tests: accel_services (own cluster in a temp dir; pgbench, psql)
  python3                                # tests: http.server upstream
  systemd                                # tests: systemd-socket-activate, systemd-analyze verify
)

case "${1:-}" in
  --bench) packages+=(haproxy gnuplot-nox util-linux) ;; # socat is above
  -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
  "") ;;
  *) echo "setup: unknown argument $1 (only --bench)" >&2; exit 2 ;;
esac

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# BPF programs need bpffs for pinned state (steer, accel); mount it if the system has not.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  [ "$(id -u)" -eq 0 ] && mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true
fi
echo "setup: ok (clang $(clang --version | head -1 | grep -o '[0-9][0-9.]*' | head -1))"
