#!/usr/bin/env python3
"""Which HTTP client to build the blob fetcher on: httpx vs urllib3, one and four ranged streams,
against a loopback docker-registry started here. Usage: python bench/http_clients.py [--mib 1024]"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import urllib3

from tests.support.registry import Registry


def push(reg: Registry, path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    digest = "sha256:" + h.hexdigest()
    pm = urllib3.PoolManager()
    r = pm.request("POST", f"{reg.url}/v2/bench/blobs/uploads/")
    loc = r.headers["Location"]
    loc = loc if loc.startswith("http") else reg.url + loc
    with open(path, "rb") as f:
        r = pm.request(
            "PUT",
            loc + ("&" if "?" in loc else "?") + f"digest={digest}",
            body=f,
            headers={"Content-Length": str(path.stat().st_size)},
        )
    assert r.status == 201, r.status
    return digest


def run(lib: str, n: int, url: str, size: int, out: Path) -> float:
    fd = os.open(out, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    step = (size + n - 1) // n
    client = httpx.Client() if lib == "httpx" else urllib3.PoolManager(maxsize=16)

    def part(start: int, end: int) -> None:
        headers = {"Range": f"bytes={start}-{end - 1}"}
        off = start
        if lib == "httpx":
            with client.stream("GET", url, headers=headers) as r:
                for chunk in r.iter_raw(1 << 20):
                    os.pwrite(fd, chunk, off)
                    off += len(chunk)
        else:
            r = client.request("GET", url, headers=headers, preload_content=False)
            while chunk := r.read(1 << 20):
                os.pwrite(fd, chunk, off)
                off += len(chunk)
            r.release_conn()

    t = time.monotonic()
    threads = [threading.Thread(target=part, args=(i * step, min(size, (i + 1) * step))) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    os.close(fd)
    return time.monotonic() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "blob"
        with open(src, "wb") as f:
            for _ in range(a.mib):
                f.write(os.urandom(1 << 20))
        with Registry.start(Path(tmp) / "reg") as reg:
            digest = push(reg, src)
            url = f"{reg.url}/v2/bench/blobs/{digest}"
            size = src.stat().st_size
            results: dict[tuple[str, int], list[float]] = {}
            for _ in range(a.rounds):
                for lib in ("httpx", "urllib3"):
                    for n in (1, 4):
                        results.setdefault((lib, n), []).append(run(lib, n, url, size, Path(tmp) / "out"))
    for (lib, n), times in sorted(results.items()):
        med = sorted(times)[len(times) // 2]
        print(f"{lib:8} streams={n}  median {med:.2f} s  {a.mib / med:.0f} MiB/s")


if __name__ == "__main__":
    main()
