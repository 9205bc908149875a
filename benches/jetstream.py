#!/usr/bin/env python3
"""Minimal JetStream admin over the plain NATS text protocol (stdlib only).

    jetstream.py URL info   STREAM          -> prints the stream's message count (or "absent")
    jetstream.py URL count  STREAM FILTER   -> prints the number of messages on subjects matching FILTER
                                               (e.g. "cdc.src.batch.>"; "absent" without the stream)
    jetstream.py URL delete STREAM          -> deletes the stream; exit 0 if deleted or absent

Only what the benchmarks need: request/reply on $JS.API.STREAM.<op>.<name>. Refuses non-loopback
hosts, like the test harness.
"""
import ipaddress
import json
import os
import socket
import sys
import time
from urllib.parse import urlparse


def address(url):
    """(host, port) of a NATS URL; exits unless the host is a loopback address."""
    u = urlparse(url if "://" in url else "nats://" + url)
    host, port = u.hostname or "127.0.0.1", u.port or 4222
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        sys.exit(f"{os.path.basename(sys.argv[0])}: {host} is not a loopback address")
    return host, port


def request(url, subject, payload=b"", timeout=5.0):
    host, port = address(url)
    s = socket.create_connection((host, port), timeout=timeout)
    f = s.makefile("rb")
    line = f.readline()
    if not line.startswith(b"INFO "):
        sys.exit(f"jetstream.py: unexpected greeting {line[:80]!r}")
    inbox = f"_INBOX.bench{int(time.time() * 1e6)}"
    s.sendall(
        b'CONNECT {"verbose":false,"pedantic":false,"headers":false,"protocol":1}\r\n'
        + f"SUB {inbox} 1\r\n".encode()
        + f"PUB {subject} {inbox} {len(payload)}\r\n".encode()
        + payload
        + b"\r\nPING\r\n"
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = f.readline()
        if not line:
            break
        if line.startswith(b"PING"):
            s.sendall(b"PONG\r\n")
        elif line.startswith(b"-ERR"):
            sys.exit(f"jetstream.py: server error {line.strip().decode()}")
        elif line.startswith(b"MSG "):
            size = int(line.split()[-1])
            body = f.read(size + 2)[:size]
            s.close()
            return json.loads(body)
    s.close()
    sys.exit(f"jetstream.py: no reply on {subject} (is JetStream enabled?)")


def count(url, stream, subjects_filter):
    """Messages per subject matching the filter (STREAM.INFO with subjects_filter), summed over all
    pages of the subject list; None when the stream does not exist."""
    total, offset = 0, 0
    while True:
        payload = json.dumps({"subjects_filter": subjects_filter, "offset": offset}).encode()
        r = request(url, f"$JS.API.STREAM.INFO.{stream}", payload)
        if "error" in r:
            if r["error"].get("code") == 404:
                return None
            sys.exit(f"jetstream.py: info {stream}: {r['error']}")
        subjects = r["state"].get("subjects") or {}
        total += sum(subjects.values())
        offset += len(subjects)
        # The server pages long subject lists: "total" is the number of matching subjects.
        if not subjects or offset >= r.get("total", offset):
            return total


def main():
    if len(sys.argv) == 5 and sys.argv[2] == "count":
        n = count(sys.argv[1], sys.argv[3], sys.argv[4])
        print("absent" if n is None else n)
        return
    if len(sys.argv) != 4 or sys.argv[2] not in ("info", "delete"):
        sys.exit(__doc__)
    url, op, stream = sys.argv[1:]
    if op == "info":
        r = request(url, f"$JS.API.STREAM.INFO.{stream}")
        if "error" in r:
            print("absent" if r["error"].get("code") == 404 else f"error {r['error']}")
        else:
            print(r["state"]["messages"])
    else:
        r = request(url, f"$JS.API.STREAM.DELETE.{stream}")
        if r.get("success") or r.get("error", {}).get("code") == 404:
            return
        sys.exit(f"jetstream.py: delete {stream}: {r}")


if __name__ == "__main__":
    main()
