#!/usr/bin/env python3
"""Change-event latency from a JetStream stream (stdlib only, plain NATS protocol).

    event_latency.py URL STREAM FILTER

Reads every message on subjects matching FILTER (e.g. "cdc.*.change.>") through an ephemeral pull
consumer (ack none) and prints one line of JSON: the count and percentiles of the time from the
change's commit (`commit_ts` of the payload, PostgreSQL's commit timestamp) to the message's JetStream
timestamp (the time the server stored it, i.e. just before it sent the PubAck), in milliseconds, and
the number of distinct commits, and the worst latency of each second of commits (is the tail a
backlog that grows, or periodic stalls?). Both clocks are the same machine's. Refuses non-loopback hosts.
"""
import datetime
import json
import socket
import sys
import time
from urllib.parse import urlparse


class Conn:
    def __init__(self, url):
        u = urlparse(url if "://" in url else "nats://" + url)
        host, port = u.hostname or "127.0.0.1", u.port or 4222
        if not (host == "localhost" or host == "::1" or host.startswith("127.")):
            sys.exit(f"event_latency.py: {host} is not a loopback address")
        self.s = socket.create_connection((host, port), timeout=30)
        self.f = self.s.makefile("rb", buffering=1 << 20)
        if not self.f.readline().startswith(b"INFO "):
            sys.exit("event_latency.py: unexpected greeting")
        self.inbox = f"_INBOX.lat{int(time.time() * 1e6)}"
        self.s.sendall(
            b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,"protocol":1}\r\n'
            + f"SUB {self.inbox}.* 1\r\n".encode()
        )
        self.n = 0

    def pub(self, subject, payload, reply=None):
        self.n += 1
        reply = reply or f"{self.inbox}.{self.n}"
        self.s.sendall(f"PUB {subject} {reply} {len(payload)}\r\n".encode() + payload + b"\r\n")

    def next(self):
        """-> (subject, reply, headers bytes, payload bytes)"""
        while True:
            line = self.f.readline()
            if not line:
                sys.exit("event_latency.py: connection closed")
            if line.startswith(b"PING"):
                self.s.sendall(b"PONG\r\n")
                continue
            if line.startswith(b"-ERR"):
                sys.exit(f"event_latency.py: {line.strip().decode()}")
            parts = line.split()
            if parts[0] == b"MSG":
                reply = parts[3] if len(parts) == 5 else b""
                size = int(parts[-1])
                body = self.f.read(size + 2)[:size]
                return parts[1], reply, b"", body
            if parts[0] == b"HMSG":
                reply = parts[3] if len(parts) == 6 else b""
                hlen, size = int(parts[-2]), int(parts[-1])
                body = self.f.read(size + 2)[:size]
                return parts[1], reply, body[:hlen], body[hlen:]

    def request(self, subject, payload):
        self.pub(subject, payload)
        _, _, _, body = self.next()
        return json.loads(body)


def pg_ts_us(text):
    # "2026-12-06 18:40:00.123456+00"
    t = datetime.datetime.strptime(text[:26], "%Y-%m-%d %H:%M:%S.%f")
    return int(t.replace(tzinfo=datetime.timezone.utc).timestamp() * 1_000_000)


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, int(round(p / 100 * (len(sorted_vals) - 1))))
    return sorted_vals[i]


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    url, stream, filt = sys.argv[1:]
    c = Conn(url)
    r = c.request(
        f"$JS.API.CONSUMER.CREATE.{stream}",
        json.dumps({"stream_name": stream, "config": {
            "deliver_policy": "all", "ack_policy": "none", "filter_subject": filt,
            "inactive_threshold": 60_000_000_000, "mem_storage": True}}).encode(),
    )
    if "error" in r:
        sys.exit(f"event_latency.py: consumer: {r['error']}")
    consumer, pending = r["name"], r["num_pending"]
    lat_ms, commits, got = [], set(), 0
    worst = {}  # second of the commit since the first one -> worst latency (ms) of that second
    while got < pending:
        batch = min(5000, pending - got)
        c.pub(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
              json.dumps({"batch": batch, "expires": 5_000_000_000}).encode(),
              reply=f"{c.inbox}.pull")
        n = 0
        while n < batch:
            subject, reply, hdr, body = c.next()
            if not reply.startswith(b"$JS.ACK."):
                if b" 408 " in hdr or b" 404 " in hdr:
                    break  # expired / no messages
                continue
            tok = reply.split(b".")
            # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending> (v1), or v2 with
            # domain and account hash before the stream and a random token after <pending>.
            ts_ns = int(tok[7] if len(tok) == 9 else tok[9])
            ev = json.loads(body)
            commit_us = pg_ts_us(ev["commit_ts"])
            lat = (ts_ns / 1000 - commit_us) / 1000
            lat_ms.append(lat)
            first = worst.setdefault("first_us", commit_us)
            sec = int((commit_us - first) // 1_000_000)
            worst[sec] = max(worst.get(sec, 0.0), lat)
            commits.add(ev["commit_lsn"])
            n += 1
        got += n
        if n == 0:
            break
    lat_ms.sort()
    print(json.dumps({
        "events": len(lat_ms), "commits": len(commits),
        "p50_ms": pct(lat_ms, 50), "p90_ms": pct(lat_ms, 90), "p99_ms": pct(lat_ms, 99),
        "p999_ms": pct(lat_ms, 99.9), "max_ms": lat_ms[-1] if lat_ms else None,
        "min_ms": lat_ms[0] if lat_ms else None,
        "worst_ms_by_second": [round(worst[k], 1) for k in sorted(k for k in worst if k != "first_us")],
    }))


if __name__ == "__main__":
    main()
