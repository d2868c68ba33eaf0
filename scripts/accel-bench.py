#!/usr/bin/env python3
"""Loopback throughput and 64-byte ping-pong latency between two threads of one process.
Run it plain and under `skrelay accel run -- python3 scripts/accel-bench.py` to compare."""
import socket, sys, threading, time

USAGE = """# scripts/accel-bench.py: loopback throughput (1 GiB, 256 KiB writes) and 64-byte ping-pong
# latency (p50, p99) between two threads of one process, in one line.
#   python3 scripts/accel-bench.py                                   plain loopback
#   skrelay accel run -- python3 scripts/accel-bench.py              under accel
# Takes no arguments."""

if sys.argv[1:] in (["-h"], ["--help"]):
    print(USAGE)
    sys.exit(0)
if sys.argv[1:]:
    print(f"accel-bench.py: takes no arguments (got {' '.join(sys.argv[1:])}; see --help)", file=sys.stderr)
    sys.exit(2)

def pair():
    l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen()
    c = socket.socket(); c.connect(l.getsockname()); s, _ = l.accept()
    time.sleep(0.05)  # let the accepted end join before the first send
    return c, s

def throughput(total=1 << 30):
    c, s = pair()
    buf = b"x" * (256 * 1024)
    def sink():
        got = 0
        while got < total:
            got += len(s.recv(1 << 20))
    t = threading.Thread(target=sink); t0 = time.perf_counter(); t.start()
    sent = 0
    while sent < total:
        c.sendall(buf); sent += len(buf)
    t.join()
    return total * 8 / (time.perf_counter() - t0) / 1e9

def pingpong(n=20000):
    c, s = pair()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"p" * 64
    def echo():
        for _ in range(n):
            b = s.recv(64)
            while len(b) < 64: b += s.recv(64 - len(b))
            s.sendall(b)
    t = threading.Thread(target=echo); t.start()
    lat = []
    for _ in range(n):
        t0 = time.perf_counter_ns(); c.sendall(msg)
        b = c.recv(64)
        while len(b) < 64: b += c.recv(64 - len(b))
        lat.append(time.perf_counter_ns() - t0)
    t.join(); lat.sort()
    return lat[len(lat) // 2] / 1000, lat[len(lat) * 99 // 100] / 1000

gbps = throughput()
p50, p99 = pingpong()
print(f"throughput {gbps:.1f} Gbit/s; ping-pong 64 B p50 {p50:.1f} us p99 {p99:.1f} us")
