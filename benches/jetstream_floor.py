#!/usr/bin/env python3
"""What nats-server itself spends per JetStream publish, with a publisher that costs it nothing extra.

    python3 benches/jetstream_floor.py [URL] [MESSAGES] [PAYLOAD_BYTES] [WINDOW]
    (defaults: nats://127.0.0.1:4222 300000 300 1024)

Creates a file-storage stream of its own (`floor_<pid>` on `floor_<pid>.>`), publishes MESSAGES
messages of PAYLOAD_BYTES each with a `Nats-Msg-Id` header and a reply subject (so each is stored,
deduplicated and acknowledged, as cdc-egress's change events are), keeping at most WINDOW
unacknowledged, checks that every ack is a success, deletes the stream and prints one JSON line:
the publish rate and nats-server's CPU per message, read from /proc/<pid>/stat when exactly one
nats-server runs on this machine. Plain protocol, stdlib only, loopback only.

It answers one question of issue 10: how much of a per-change event's cost is the broker's. The
publisher here is a tight loop of pre-built frames, so the figure is the server's own cost per
message at this rate, whatever the client does.
"""
import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jetstream  # noqa: E402 (the benches' JetStream admin helper, beside this file)


def nats_cpu_ticks():
    """(pid, utime + stime) of the machine's nats-server, or (None, None) unless exactly one runs
    (then it is the one on the loopback port; as in throughput.sh)."""
    try:
        pids = subprocess.run(["pgrep", "-x", "nats-server"], capture_output=True, text=True).stdout.split()
        if len(pids) != 1:
            return None, None
        with open(f"/proc/{pids[0]}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None, None
    return pids[0], int(fields[11]) + int(fields[12])


class Conn:
    def __init__(self, host, port):
        self.s = socket.create_connection((host, port), timeout=10)
        self.buf = b""
        greeting = self.line()
        if not greeting.startswith(b"INFO "):
            sys.exit(f"jetstream_floor.py: unexpected greeting {greeting[:80]!r}")
        self.inbox = f"_INBOX.floor{os.getpid()}"
        self.s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\n'
                       + f"SUB {self.inbox}.* 1\r\nPING\r\n".encode())
        while not self.line().startswith(b"PONG"):
            pass

    def fill(self):
        chunk = self.s.recv(1 << 20)
        if not chunk:
            sys.exit("jetstream_floor.py: the server closed the connection")
        self.buf += chunk

    def line(self):
        while b"\r\n" not in self.buf:
            self.fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def exact(self, n):
        while len(self.buf) < n + 2:
            self.fill()
        body, self.buf = self.buf[:n], self.buf[n + 2:]
        return body

    def reply(self):
        """The next MSG's payload (answering PINGs, failing on -ERR)."""
        while True:
            line = self.line()
            if line.startswith(b"MSG "):
                return self.exact(int(line.split()[-1]))
            if line.startswith(b"HMSG "):
                sys.exit(f"jetstream_floor.py: unexpected reply with headers: {line.decode()}")
            if line.startswith(b"PING"):
                self.s.sendall(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                sys.exit(f"jetstream_floor.py: server error {line.decode()}")


def main():
    args = sys.argv[1:]
    url = args[0] if args else "nats://127.0.0.1:4222"
    n = int(args[1]) if len(args) > 1 else 300_000
    size = int(args[2]) if len(args) > 2 else 300
    window = int(args[3]) if len(args) > 3 else 1024
    host, port = jetstream.address(url)
    if n < 1 or size < 0 or window < 1:
        sys.exit("jetstream_floor.py: MESSAGES and WINDOW must be at least 1, PAYLOAD_BYTES at least 0")
    stream = f"floor_{os.getpid()}"
    config = {"name": stream, "subjects": [f"{stream}.>"], "storage": "file",
              "duplicate_window": 120_000_000_000}
    r = jetstream.request(url, f"$JS.API.STREAM.CREATE.{stream}", json.dumps(config).encode())
    if "error" in r:
        sys.exit(f"jetstream_floor.py: cannot create the stream: {r['error']}")
    c = Conn(host, port)
    try:
        payload = b"x" * size
        frames = []
        for i in range(n):
            hdr = f"NATS/1.0\r\nNats-Msg-Id: {stream}:{i}\r\n\r\n".encode()
            frames.append(f"HPUB {stream}.t.{i % 10} {c.inbox}.a {len(hdr)} {len(hdr) + size}\r\n".encode()
                          + hdr + payload + b"\r\n")
        pid0, cpu0 = nats_cpu_ticks()
        t0 = time.perf_counter()
        sent = acked = 0
        while acked < n:
            if sent < n and sent - acked < window:
                upto = min(n, acked + window)
                c.s.sendall(b"".join(frames[sent:upto]))
                sent = upto
            ack = c.reply()
            if b'"error"' in ack or b'"duplicate"' in ack:
                sys.exit(f"jetstream_floor.py: publish {acked} not stored: {ack.decode()}")
            acked += 1
        seconds = time.perf_counter() - t0
        pid1, cpu1 = nats_cpu_ticks()
        pid = pid0 if pid0 == pid1 else None
    finally:
        # On a connection of its own: the one above may be what failed.
        jetstream.request(url, f"$JS.API.STREAM.DELETE.{stream}")
    tck = os.sysconf("SC_CLK_TCK")
    out = {"messages": n, "payload_bytes": size, "window": window, "seconds": round(seconds, 3),
           "messages_per_s": round(n / seconds)}
    if pid is not None:
        cpu = (cpu1 - cpu0) / tck
        out.update({"nats_server_pid": int(pid), "nats_server_cpu_s": round(cpu, 2),
                    "nats_server_cpu_us_per_message": round(cpu * 1e6 / n, 2)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
