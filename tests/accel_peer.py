#!/usr/bin/env python3
"""TCP peers for tests/accel.rs, run inside (or outside) an accelerated cgroup.

Every byte stream is a sequence of 64 KiB chunks, each starting with its index, so a lost,
duplicated or reordered chunk changes the sha256 the test compares. Results are printed as
`key value...` lines on stdout.

  serve HOST PORT             accept one connection; echo-less exchange: send BYTES (from the
                              client's first 8 bytes) while reading to EOF; print sha256s
  connect HOST PORT BYTES     connect, send BYTES while reading to EOF; print sha256s
  halfclose HOST              client sends, shuts down writing; server reads to EOF, replies, closes
  reset HOST                  client sends 1 MiB then resets; server reads after the RST arrived
  rpc-serve HOST PORT ROUNDS  request/response server: read an 8-byte request, work 50 ms, reply
  rpc-connect HOST PORT ROUNDS [poll]
                              send a request, wait for the reply; after the last request
                              half-close first. Print `rpc ok` or the error. Without `poll` the
                              reply is read with a blocking recv (which must never fail with
                              EAGAIN: the 6.18 limitation in README); with `poll`, as everywhere
                              else here, the way event loops read.
  stall HOST BYTES SECS [WRITE]
                              the client sends BYTES (blocking sendall, WRITE bytes at a time,
                              64 KiB by default) while the server reads nothing for SECS; prints
                              what the client had handed to the kernel by then (`held`), how far
                              host MemAvailable fell (`memdrop`) and how far kmalloc-1k slabs
                              grew (`slabgrowth`: one struct sk_msg per redirected message), then
                              the server reads everything: sha256 of both sides
  small HOST BYTES WRITE      the client sends BYTES in WRITE-byte send(2) calls while the server
                              reads; sha256 of both sides
  blocking HOST BYTES WRITE [waitall]
                              the client sends BYTES in WRITE-byte send(2) calls; the server
                              starts reading 0.2 s late (so the sender pauses), then reads with
                              blocking recv(2) calls of 256 KiB (with MSG_WAITALL: waits inside
                              tcp_recvmsg whenever the TCP path has fewer bytes); prints sha256 of
                              both sides and `eagain N` (6.18: a blocked recv woken without data
                              can fail with EAGAIN; counted and retried); exits 3 after 60 s
  pause HOST BYTES            both ends queue data unread, print `ready`, wait for a line on stdin,
                              then finish the exchange: a window for `accel off` with bytes queued
  splice HOST BYTES           the client sends BYTES and half-closes; the server reads with
                              splice(2) into a pipe until splice returns 0 (or 10 s pass, `timeout`);
                              sha256 of both sides
  fionread HOST BYTES         the client sends BYTES and half-closes while the server reads
                              nothing for 1.5 s (so an accelerated sender pauses and sends the
                              rest by TCP); then the server reads, peeking and then asking
                              FIONREAD before each read: `fionread-short N MAX` counts the looks
                              where FIONREAD said less than the peek found (MAX: the most it
                              missed);
                              sha256 of both sides
  oob HOST                    the client sends 10 x "A", one urgent byte "!" (MSG_OOB), 10 x "B"
                              and closes; the server prints the urgent byte (`urgent`) and the
                              inline stream (`inline`)
  request-eof HOST ROUNDS     ROUNDS connections, HTTP/1.0 style: the client sends a 1,000-byte
                              request, half-closes and reads the reply with blocking recv(2) to
                              EOF; the server reads the request with blocking recv(2) to EOF
                              (blocked there when the client's FIN comes), works 50 ms, replies
                              and closes. `request-eof OK ROUNDS` and each failure's errno
  options HOST                what socket options the redirect would skip do, each set after the
                              connection is up and before its bytes: `zerocopy N` (completions of
                              16 MSG_ZEROCOPY sends of 64 KiB seen within 2 s), `rx-stamp yes|no`
                              (an SCM_TIMESTAMPNS cmsg with SO_TIMESTAMPNS), `rcvlowat P R` (did
                              poll report POLLIN for 1,000 bytes under SO_RCVLOWAT 50,000; what a
                              blocking recv then returned once 60,000 more came)
  woken HOST                  a thread blocked in a blocking recv(2) is woken without data, two
                              ways: the peer resets (SO_LINGER 0), and another thread calls
                              shutdown(SHUT_RD). Prints `reset FIRST NEXT` and `shut-rd FIRST
                              NEXT`: what the blocked recv and the call after it returned
                              (`eof`, a byte count, or the exception's name)
  fastopen HOST BYTES [server-tfo]
                              TCP Fast Open: the client's first 1,000 bytes go with
                              sendto(MSG_FASTOPEN), the rest of BYTES by sendall, then it
                              half-closes; the server (with TCP_FASTOPEN when `server-tfo`)
                              starts reading 0.3 s after its accept. Three connections (the
                              first fetches a cookie, later ones may carry data in the SYN);
                              sha256 of both sides of each as `sent N` / `received N` lines
"""
import array
import errno
import fcntl
import termios
import hashlib
import os
import select
import socket
import struct
import sys
import threading
import time

CHUNK = 64 * 1024


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def recv_ready(sock, n):
    """Up to n bytes (b"" at EOF), read the way event loops do: poll for POLLIN, then a
    non-blocking recv, retrying when it says EAGAIN. Every reader here uses this except the
    blocking rpc client: on 6.18 a blocking recv on an accelerated socket can fail with EAGAIN
    after an empty wake-up (README, accel limitation), and the other tests are not about that."""
    p = select.poll()
    p.register(sock, select.POLLIN)
    while True:
        p.poll()
        try:
            return sock.recv(n, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            continue


def chunk(seed, i):
    base = hashlib.sha256(struct.pack("<QQ", seed, i % 64)).digest() * (CHUNK // 32)
    return struct.pack("<QQ", seed, i) + base[16:]


def send_stream(sock, seed, total, out, shut=True, head=b""):
    """Sends the stream of `seed` up to `total` bytes; `head`: its first bytes, already sent
    some other way (they count, and the rest starts at chunk 1)."""
    h = hashlib.sha256(head)
    sent = len(head)
    i = 1 if head else 0
    while sent < total:
        data = chunk(seed, i)[: min(CHUNK, total - sent)]
        sock.sendall(data)
        h.update(data)
        sent += len(data)
        i += 1
    if shut:
        sock.shutdown(socket.SHUT_WR)
    out["sent"] = (sent, h.hexdigest())


def recv_stream(sock, out):
    h = hashlib.sha256()
    got = 0
    while True:
        b = recv_ready(sock, 256 * 1024)
        if not b:
            break
        h.update(b)
        got += len(b)
    out["received"] = (got, h.hexdigest())


def exchange(sock, seed, total):
    out = {}
    t = threading.Thread(target=send_stream, args=(sock, seed, total, out))
    t.start()
    recv_stream(sock, out)
    t.join()
    print("sent %d %s" % out["sent"])
    print("received %d %s" % out["received"])
    sys.stdout.flush()


def serve(host, port):
    lst = socket.socket(family(host))
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((host, port))
    lst.listen()
    print("listening", flush=True)
    conn, _ = lst.accept()
    total = struct.unpack("<Q", recv_exact(conn, 8))[0]
    exchange(conn, 2, total)


def connect(host, port, total):
    sock = socket.create_connection((host, port))
    sock.sendall(struct.pack("<Q", total))
    exchange(sock, 1, total)


def read_to_eof(sock, size=65536):
    """Blocking recv(2) calls until the end of the stream: every byte read."""
    data = b""
    while True:
        b = sock.recv(size)
        if not b:
            return data
        data += b


def recv_exact(sock, n, blocking=False):
    b = b""
    while len(b) < n:
        r = sock.recv(n - len(b)) if blocking else recv_ready(sock, n - len(b))
        if not r:
            raise EOFError("connection closed after %d of %d bytes" % (len(b), n))
        b += r
    return b


def pair(host):
    lst = socket.socket(family(host))
    lst.bind((host, 0))
    lst.listen()
    cli = socket.socket(family(host))
    cli.connect(lst.getsockname()[:2])
    srv, _ = lst.accept()
    return cli, srv


def halfclose(host):
    cli, srv = pair(host)
    cli.sendall(b"request " * 1000)
    cli.shutdown(socket.SHUT_WR)
    req = b""
    while True:
        b = recv_ready(srv, 65536)
        if not b:
            break
        req += b
    srv.sendall(b"reply:" + hashlib.sha256(req).hexdigest().encode())
    srv.close()
    reply = b""
    while True:
        b = recv_ready(cli, 65536)
        if not b:
            break
        reply += b
    print("request %d" % len(req))
    print("reply %s" % reply.decode())
    # Writing after the peer closed: the first send succeeds or fails, then EPIPE/ECONNRESET.
    errs = []
    for _ in range(3):
        try:
            cli.send(b"x")
            errs.append("ok")
        except OSError as e:
            errs.append(type(e).__name__)
        time.sleep(0.05)
    print("after-close %s" % ",".join(errs))


def reset(host):
    cli, srv = pair(host)
    cli.sendall(b"r" * (1 << 20))
    cli.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    cli.close()
    time.sleep(0.2)
    got = 0
    outcome = "eof"
    try:
        while True:
            b = recv_ready(srv, 65536)
            if not b:
                break
            got += len(b)
    except OSError as e:
        outcome = type(e).__name__
    print("before-error %d" % got)
    print("outcome %s" % outcome)
    try:
        srv.send(b"x")
        print("send ok")
    except OSError as e:
        print("send %s" % type(e).__name__)


def rpc_serve(host, port, rounds):
    lst = socket.socket(family(host))
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((host, port))
    lst.listen()
    print("listening", flush=True)
    conn, _ = lst.accept()
    for _ in range(rounds):
        req = recv_exact(conn, 8)
        time.sleep(0.05)  # the server's work: the client is blocked in recv meanwhile
        conn.sendall(b"re" + req[2:])
    conn.close()
    print("served %d" % rounds)


def rpc_connect(host, port, rounds, blocking):
    sock = socket.create_connection((host, port))
    outcome = "ok"
    for i in range(rounds):
        req = b"rq%06d" % i
        sock.sendall(req)
        if i == rounds - 1:
            sock.shutdown(socket.SHUT_WR)  # last request: half-close, then wait for the reply
        try:
            if recv_exact(sock, 8, blocking) != b"re" + req[2:]:
                outcome = "wrong-reply-in-round-%d" % i
                break
        except OSError as e:
            outcome = "%s-in-round-%d" % (type(e).__name__, i)
            break
    print("rpc %s" % outcome)


def pause(host, total):
    cli, srv = pair(host)
    outs = [{}, {}]
    queued = []
    for sock, seed in ((cli, 1), (srv, 2)):
        sock.setblocking(False)
        h = hashlib.sha256()
        sent = i = 0
        try:
            while sent < total // 2:
                data = chunk(seed, i)
                n = sock.send(data)
                h.update(data[:n])
                sent += n
                if n < len(data):
                    break
                i += 1
        except BlockingIOError:
            pass
        sock.setblocking(True)
        queued.append((sock, seed, sent, h, i))
    print("ready %d %d" % (queued[0][2], queued[1][2]), flush=True)
    sys.stdin.readline()

    def finish(sock, seed, sent, h, i, out):
        # Resume the stream exactly where the non-blocking phase stopped.
        first = True
        while sent < total:
            data = chunk(seed, i)
            if first:
                data = data[sent - i * CHUNK:]
                first = False
            data = data[: total - sent]
            sock.sendall(data)
            h.update(data)
            sent += len(data)
            i += 1
        sock.shutdown(socket.SHUT_WR)
        out["sent"] = (sent, h.hexdigest())

    threads = []
    for (sock, seed, sent, h, i), out in zip(queued, outs):
        threads.append(threading.Thread(target=finish, args=(sock, seed, sent, h, i, out)))
        threads.append(threading.Thread(target=recv_stream, args=(sock, out)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, out in (("client", outs[0]), ("server", outs[1])):
        print("%s sent %d %s" % ((name,) + out["sent"]))
        print("%s received %d %s" % ((name,) + out["received"]))


def small(host, total, write, late):
    cli, srv = pair(host)
    time.sleep(0.05)  # let the accepted end join before the first send
    out = {}

    def writer():
        h = hashlib.sha256()
        sent = i = 0
        while sent < total:
            block = chunk(1, i)
            for off in range(0, len(block), write):
                data = block[off : off + write][: total - sent]
                if not data:
                    break
                cli.sendall(data)
                h.update(data)
                sent += len(data)
            i += 1
        cli.shutdown(socket.SHUT_WR)
        out["sent"] = (sent, h.hexdigest())

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(late)  # a reader that starts behind its writer
    recv_stream(srv, out)
    t.join()
    print("sent %d %s" % out["sent"])
    print("received %d %s" % out["received"])
    print("rcvbuf %d" % srv.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


def blocking(host, total, write, waitall):
    cli, srv = pair(host)
    time.sleep(0.05)  # let the accepted end join before the first send
    out = {}

    def watchdog():
        time.sleep(60)
        print("hang: the transfer did not finish in 60 s", flush=True)
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()

    def writer():
        h = hashlib.sha256()
        sent = i = 0
        while sent < total:
            block = b"".join(chunk(1, i + j) for j in range(max(1, write // CHUNK)))[:write]
            i += max(1, write // CHUNK)
            data = block[: total - sent]
            cli.sendall(data)
            h.update(data)
            sent += len(data)
        cli.shutdown(socket.SHUT_WR)
        out["sent"] = (sent, h.hexdigest())

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.2)
    h = hashlib.sha256()
    got = eagain = 0
    flags = socket.MSG_WAITALL if waitall else 0
    while True:
        try:
            b = srv.recv(256 * 1024, flags)
        except BlockingIOError:
            eagain += 1
            continue
        if not b:
            break
        h.update(b)
        got += len(b)
    t.join()
    print("eagain %d" % eagain)
    print("sent %d %s" % out["sent"])
    print("received %d %s" % (got, h.hexdigest()))


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def kmalloc_1k():
    """Bytes in kmalloc-1k slabs, where the kernel allocates a struct sk_msg per redirected message."""
    with open("/proc/slabinfo") as f:
        for line in f:
            if line.startswith("kmalloc-1k "):
                fields = line.split()
                return int(fields[1]) * int(fields[3])
    raise RuntimeError("no kmalloc-1k in /proc/slabinfo")


def stall(host, total, secs, write=CHUNK):
    cli, srv = pair(host)
    time.sleep(0.05)  # let the accepted end join before the first send
    progress = {"sent": 0}
    out = {}

    def writer():
        h = hashlib.sha256()
        i = 0
        while progress["sent"] < total:
            data = chunk(1, i)[: min(CHUNK, total - progress["sent"])]
            for at in range(0, len(data), write):
                cli.sendall(data[at : at + write])
                progress["sent"] += len(data[at : at + write])
            h.update(data)
            i += 1
        cli.shutdown(socket.SHUT_WR)
        out["sent"] = (progress["sent"], h.hexdigest())

    before = mem_available()
    slab_before = kmalloc_1k()
    t = threading.Thread(target=writer)
    t.start()
    low, slab_high = before, slab_before
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        time.sleep(0.25)
        low = min(low, mem_available())
        slab_high = max(slab_high, kmalloc_1k())
    print("held %d" % progress["sent"])
    print("memdrop %d" % max(0, before - low))
    print("slabgrowth %d" % max(0, slab_high - slab_before), flush=True)
    t0 = time.monotonic()
    recv_stream(srv, out)
    t.join()
    print("drain-seconds %.2f" % (time.monotonic() - t0))
    print("sent %d %s" % out["sent"])
    print("received %d %s" % out["received"])


def streaming_pair(host, seed, total):
    """A connected pair whose client sends `total` bytes and half-closes, from a thread:
    (client socket, server socket, the thread, where it puts its `sent` count and sha256). The
    caller keeps the client open until it has read everything."""
    cli, srv = pair(host)
    time.sleep(0.05)  # let the accepted end join before the first send
    out = {}
    t = threading.Thread(target=send_stream, args=(cli, seed, total, out))
    t.start()
    return cli, srv, t, out


def splice_reader(host, total):
    cli, srv, t, out = streaming_pair(host, 1, total)
    r, w = os.pipe()
    h = hashlib.sha256()
    got = 0
    deadline = time.monotonic() + 10
    srv.setblocking(False)
    while True:
        if time.monotonic() > deadline:
            print("timeout")
            break
        try:
            n = os.splice(srv.fileno(), w, 1 << 20)
        except BlockingIOError:
            select.select([srv], [], [], 0.1)
            continue
        if n == 0:
            break
        while n > 0:
            b = os.read(r, n)
            h.update(b)
            got += len(b)
            n -= len(b)
    t.join()
    print("sent %d %s" % out["sent"])
    print("received %d %s" % (got, h.hexdigest()))


def fionread_reader(host, total):
    cli, srv, t, out = streaming_pair(host, 2, total)
    time.sleep(1.5)
    h = hashlib.sha256()
    got, short, most = 0, 0, 0
    srv.setblocking(False)
    while True:
        # Peek first: bytes only arrive in between, so plain TCP's FIONREAD, asked second, is
        # never below the peek (asked first, it was, 16 times in one CI run).
        try:
            peek = len(srv.recv(1 << 20, socket.MSG_PEEK))
        except BlockingIOError:
            peek = 0
        q = array.array("i", [0])
        fcntl.ioctl(srv.fileno(), termios.FIONREAD, q, True)
        if q[0] < peek:
            short += 1
            most = max(most, peek - q[0])
        b = recv_ready(srv, 1 << 20)
        if not b:
            break
        h.update(b)
        got += len(b)
    t.join()
    print("fionread-short %d %d" % (short, most))
    print("sent %d %s" % out["sent"])
    print("received %d %s" % (got, h.hexdigest()))


def oob(host):
    cli, srv = pair(host)
    time.sleep(0.05)
    cli.sendall(b"A" * 10)
    cli.send(b"!", socket.MSG_OOB)
    cli.sendall(b"B" * 10)
    cli.close()
    time.sleep(0.3)
    try:
        print("urgent %r" % srv.recv(1, socket.MSG_OOB))
    except OSError as e:
        print("urgent error %s" % e)
    print("inline %r" % read_to_eof(srv, 100))


def request_eof_exchange(i, cli, srv, failures):
    """HTTP/1.0 style on one connection: the client sends a request, half-closes and reads the
    reply to EOF with blocking recv; the server reads the request to EOF with blocking recv.
    True when both sides got what the other sent; an error the client met goes to `failures`."""
    req = chunk(i, 0)[:1000]
    got = {}

    def serve():
        b = read_to_eof(srv)
        got["request"] = b
        time.sleep(0.05)
        srv.sendall(b"reply to " + b[:8])
        srv.close()

    t = threading.Thread(target=serve)
    t.start()
    time.sleep(0.01)  # the server is blocked in recv
    cli.sendall(req)
    cli.shutdown(socket.SHUT_WR)
    reply = b""
    try:
        reply = read_to_eof(cli)
    except OSError as e:
        failures.append(errno.errorcode.get(e.errno, str(e.errno)))
    t.join()
    cli.close()
    return reply == b"reply to " + req[:8] and got.get("request") == req


def request_eof(host, rounds):
    failures = []
    ok = sum(request_eof_exchange(i, *pair(host), failures) for i in range(rounds))
    print("request-eof %d %d %s" % (ok, rounds, " ".join(failures)))


def request_eof_later(host, rounds):
    """request_eof on connections made (and used once) before a line on stdin: the test runs
    `accel off` in between, and the half-close that follows must still end in a clean EOF."""
    conns = []
    for i in range(rounds):
        cli, srv = pair(host)
        cli.sendall(b"ping")
        recv_exact(srv, 4, blocking=True)
        srv.sendall(b"pong")
        recv_exact(cli, 4, blocking=True)
        conns.append((cli, srv))
    print("ready", flush=True)
    sys.stdin.readline()
    failures = []
    ok = sum(request_eof_exchange(i, cli, srv, failures) for i, (cli, srv) in enumerate(conns))
    print("request-eof %d %d %s" % (ok, rounds, " ".join(failures)), flush=True)


def options(host):
    SO_ZEROCOPY, MSG_ZEROCOPY, SO_EE_ORIGIN_ZEROCOPY = 60, 0x4000000, 5
    cli, srv = pair(host)
    time.sleep(0.05)
    cli.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
    out = {}
    t = threading.Thread(target=recv_stream, args=(srv, out))
    t.start()
    for i in range(16):
        cli.sendall(chunk(1, i), MSG_ZEROCOPY)
    done, deadline = set(), time.monotonic() + 2
    while len(done) < 16 and time.monotonic() < deadline:
        select.select([], [], [cli], 0.1)
        try:
            _, anc, _, _ = cli.recvmsg(0, 1024, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        for level, kind, data in anc:
            errno_, origin, _, _, _, info, lo = struct.unpack("=IBBBBII", data[:16])
            if origin == SO_EE_ORIGIN_ZEROCOPY:
                done.update(range(info, lo + 1))
    cli.shutdown(socket.SHUT_WR)
    t.join()
    print("zerocopy %d" % len(done & set(range(16))))

    cli, srv = pair(host)
    time.sleep(0.05)
    SO_TIMESTAMPNS = 35  # and SCM_TIMESTAMPNS (asm-generic)
    srv.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    time.sleep(0.1)  # the kernel turns receive timestamps on from a work item, a moment later
    cli.sendall(b"x" * 1000)
    _, anc, _, _ = srv.recvmsg(1000, 1024)
    print("rx-stamp %s" % ("yes" if any(k == SO_TIMESTAMPNS for _, k, _ in anc) else "no"))

    cli, srv = pair(host)
    time.sleep(0.05)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 50000)
    cli.sendall(b"x" * 1000)
    p = select.poll()
    p.register(srv, select.POLLIN)
    early = "yes" if p.poll(200) else "no"
    cli.sendall(b"y" * 60000)
    time.sleep(0.1)
    print("rcvlowat %s %d" % (early, len(srv.recv(100000))))


def fastopen(host, total, server_tfo):
    lst = socket.socket(family(host))
    if server_tfo:
        lst.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)
    lst.bind((host, 0))
    lst.listen()
    addr = lst.getsockname()[:2]
    for seed in range(3):
        out = {}

        def serve_late():
            srv, _ = lst.accept()
            time.sleep(0.3)  # redirected bytes then wait beside the TCP ones
            recv_stream(srv, out)
            srv.close()

        t = threading.Thread(target=serve_late)
        t.start()
        cli = socket.socket(family(host))
        first = chunk(seed, 0)[:1000]
        cli.sendto(first, socket.MSG_FASTOPEN, addr)
        sent = {}
        send_stream(cli, seed, total, sent, head=first)
        t.join()
        cli.close()
        print("sent %d %d %s" % (seed, *sent["sent"]))
        print("received %d %d %s" % (seed, *out["received"]))


def woken(host):
    def outcome(sock):
        try:
            b = sock.recv(10)
            return "eof" if not b else str(len(b))
        except OSError as e:
            return type(e).__name__

    def blocked(sock, wake):
        got = []
        t = threading.Thread(target=lambda: got.append(outcome(sock)))
        t.start()
        time.sleep(0.2)
        wake()
        t.join(5)
        first = got[0] if got else "blocked"
        return first, outcome(sock) if got else "-"

    cli, srv = pair(host)
    cli.sendall(b"hello")
    recv_exact(srv, 5, blocking=True)

    def reset_peer():
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        cli.close()

    print("reset %s %s" % blocked(srv, reset_peer))
    srv.close()
    cli, srv = pair(host)
    cli.sendall(b"hello")
    recv_exact(srv, 5, blocking=True)
    print("shut-rd %s %s" % blocked(srv, lambda: srv.shutdown(socket.SHUT_RD)))
    cli.close()
    srv.close()


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "serve":
        serve(args[0], int(args[1]))
    elif mode == "connect":
        connect(args[0], int(args[1]), int(args[2]))
    elif mode == "halfclose":
        halfclose(args[0])
    elif mode == "reset":
        reset(args[0])
    elif mode == "rpc-serve":
        rpc_serve(args[0], int(args[1]), int(args[2]))
    elif mode == "rpc-connect":
        rpc_connect(args[0], int(args[1]), int(args[2]), args[3:] != ["poll"])
    elif mode == "small":
        small(args[0], int(args[1]), int(args[2]), float(args[3]) if args[3:] else 0.0)
    elif mode == "stall":
        stall(args[0], int(args[1]), float(args[2]), *[int(a) for a in args[3:]])
    elif mode == "blocking":
        blocking(args[0], int(args[1]), int(args[2]), args[3:] == ["waitall"])
    elif mode == "pause":
        pause(args[0], int(args[1]))
    elif mode == "splice":
        splice_reader(args[0], int(args[1]))
    elif mode == "fionread":
        fionread_reader(args[0], int(args[1]))
    elif mode == "oob":
        oob(args[0])
    elif mode == "options":
        options(args[0])
    elif mode == "request-eof":
        request_eof(args[0], int(args[1]))
    elif mode == "request-eof-later":
        request_eof_later(args[0], int(args[1]))
    elif mode == "woken":
        woken(args[0])
    elif mode == "fastopen":
        fastopen(args[0], int(args[1]), args[2:] == ["server-tfo"])
    else:
        sys.exit("unknown mode " + mode)
