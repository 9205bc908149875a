#!/usr/bin/env python3
"""Scrapes a cdc-egress /metrics endpoint once per line read on stdin (stdlib only).

    metrics.py PORT NAME...

For every input line, prints one line: the values of the named unlabelled metrics separated by spaces
("-" for a missing one), or "down" when the endpoint does not answer. Runs as a long-lived coprocess of
throughput.sh: a shell would read the HTTP response one byte per system call, and that polling cost
would land on the very CPUs being measured.
"""
import socket
import sys


def scrape(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            chunks = []
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
    except OSError:
        return None
    text = b"".join(chunks).decode("utf-8", "replace")
    _, _, body = text.partition("\r\n\r\n")
    values = {}
    for line in body.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            values[name] = value.strip()
    return values


def main():
    port, names = int(sys.argv[1]), sys.argv[2:]
    for _ in sys.stdin:
        values = scrape(port)
        if values is None:
            print("down", flush=True)
        else:
            print(" ".join(values.get(n, "-") for n in names), flush=True)


if __name__ == "__main__":
    main()
