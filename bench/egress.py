#!/usr/bin/env python3
"""What the egress policy (--allow-registry, src/imagevol/registry/egress.py) costs per connection.

A loopback HTTP server answers every GET with two bytes and `Connection: close`, so each request
makes a new connection: resolve `localhost`, connect, send, read. Rounds alternate a plain urllib3
PoolManager and the CheckedPoolManager the policy uses (every resolved address checked, the
connection made to the checked address), and print the median time per request of each. Also
times one address check alone, and one read of the host's interface addresses (getifaddrs(3),
cached 5 s by the policy).
Usage:

    python bench/egress.py [--requests 300] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import timeit
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import urllib3

from imagevol.registry import egress
from imagevol.registry.egress import CheckedPoolManager, EgressPolicy


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"ok")


def _per_request_us(pm: urllib3.PoolManager, url: str, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        r = pm.request("GET", url, retries=False)
        assert r.status == 200
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://localhost:{srv.server_address[1]}/"
    policy = EgressPolicy.parse(["127.0.0.1:*", "[::1]:*", "localhost:*"])
    plain = urllib3.PoolManager(maxsize=1)
    checked = CheckedPoolManager(policy.check_address, maxsize=1)
    a: list[float] = []
    b: list[float] = []
    for i in range(args.rounds):
        order = [(plain, a), (checked, b)] if i % 2 == 0 else [(checked, b), (plain, a)]
        for pm, out in order:
            out.append(_per_request_us(pm, url, args.requests))
    srv.shutdown()
    ifaddrs = timeit.timeit(egress._getifaddrs, number=1000) * 1000
    check = timeit.timeit(lambda: policy.check_address("localhost", 80, "127.0.0.1"), number=10000) * 100
    public = EgressPolicy.parse(["*"])
    check_public = timeit.timeit(lambda: public.check_address("x", 80, "192.0.2.77"), number=10000) * 100
    print(
        f"new connection + GET: plain urllib3 {statistics.median(a):.0f} us, checked "
        f"{statistics.median(b):.0f} us (median of {args.rounds} rounds of {args.requests}); "
        f"one address check {check:.1f} us (loopback, admitted), {check_public:.1f} us (public); "
        f"getifaddrs {ifaddrs:.0f} us"
    )


if __name__ == "__main__":
    main()
