#!/usr/bin/env python3
"""The machine's one-pass limit: fetch a manifest's blobs concurrently to disk and verify sha256,
nothing else (no store, no metadata, no resume, no materialization).

Usage: onepass.py REGISTRY_URL REPO TAG OUTDIR [--part-size MiB] [--parts N] [--concurrency N]

Like a good curl: one stream per blob, and a blob larger than the part size is split into N
contiguous ranges fetched in parallel (pwrite at their offsets). A single-stream blob is hashed as
it passes; a ranged blob is hashed by one thread that follows its contiguous downloaded prefix,
reading it back from the page cache, so hashing overlaps the download (sha256 is sequential).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import urllib3

CHUNK = 1 << 20
ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


class Ranged:
    """Per-part write positions of one blob and a prefix-following hasher."""

    def __init__(self, fd: int, size: int, bounds: list[tuple[int, int]]) -> None:
        self.fd = fd
        self.size = size
        self.bounds = bounds
        self.pos = [s for s, _ in bounds]
        self.cv = threading.Condition()
        self.h = hashlib.sha256()
        self.futs: list = []

    def advance(self, i: int, pos: int) -> None:
        with self.cv:
            self.pos[i] = pos
            self.cv.notify()

    def prefix(self) -> int:
        end = 0
        for (_s, e), p in zip(self.bounds, self.pos, strict=True):
            if p < e:
                return p
            end = e
        return end

    def hash_all(self) -> str:
        done = 0
        buf = bytearray(8 * CHUNK)
        view = memoryview(buf)
        while done < self.size:
            with self.cv:
                while (end := self.prefix()) <= done:
                    self.cv.wait(0.5)
                    for f in self.futs:
                        if f.done() and f.exception() is not None:
                            raise f.exception()
            while done < end:
                n = os.preadv(self.fd, [view[: min(len(buf), end - done)]], done)
                self.h.update(view[:n])
                done += n
        return self.h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("registry")
    ap.add_argument("repo")
    ap.add_argument("tag")
    ap.add_argument("outdir")
    ap.add_argument("--part-size", type=int, default=64, help="MiB; larger blobs are ranged")
    ap.add_argument("--parts", type=int, default=4, help="ranged streams per large blob")
    ap.add_argument("--concurrency", type=int, default=4, help="blobs at once")
    a = ap.parse_args()
    pool = urllib3.PoolManager(maxsize=64)
    base = f"{a.registry}/v2/{a.repo}"
    r = pool.request("GET", f"{base}/manifests/{a.tag}", headers={"Accept": ACCEPT})
    if r.status != 200:
        print(f"manifest: HTTP {r.status}", file=sys.stderr)
        return 1
    manifest = json.loads(r.data)
    blobs = {d["digest"]: d["size"] for d in [manifest["config"], *manifest["layers"]]}
    os.makedirs(a.outdir, exist_ok=True)
    part_size = a.part_size << 20
    streams = ThreadPoolExecutor(max_workers=a.concurrency * a.parts)

    def ranged_get(url: str, start: int, end: int, fd: int, st: Ranged | None, i: int) -> None:
        resp = pool.request(
            "GET", url, headers={"Range": f"bytes={start}-{end - 1}"}, preload_content=False, redirect=True
        )
        if resp.status != 206:
            raise RuntimeError(f"{url}: HTTP {resp.status} to a Range request")
        pos = start
        while pos < end and (chunk := resp.read(min(CHUNK, end - pos))):
            os.pwrite(fd, chunk, pos)
            pos += len(chunk)
            if st is not None:
                st.advance(i, pos)
        resp.release_conn()
        if pos != end:
            raise RuntimeError(f"{url}: range {start}-{end} cut at {pos}")

    def fetch(digest: str, size: int) -> None:
        url = f"{base}/blobs/{digest}"
        fd = os.open(os.path.join(a.outdir, digest.split(":")[1]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        rfd = os.open(os.path.join(a.outdir, digest.split(":")[1]), os.O_RDONLY)
        try:
            if size > part_size and a.parts > 1:
                step = -(-size // a.parts)
                bounds = [(s, min(size, s + step)) for s in range(0, size, step)]
                st = Ranged(rfd, size, bounds)
                st.futs = [streams.submit(ranged_get, url, s, e, fd, st, i) for i, (s, e) in enumerate(bounds)]
                got = st.hash_all()
                for f in st.futs:
                    f.result()
            else:
                h = hashlib.sha256()
                resp = pool.request("GET", url, preload_content=False, redirect=True)
                if resp.status != 200:
                    raise RuntimeError(f"{url}: HTTP {resp.status}")
                pos = 0
                while chunk := resp.read(CHUNK):
                    os.pwrite(fd, chunk, pos)
                    h.update(chunk)
                    pos += len(chunk)
                resp.release_conn()
                got = h.hexdigest()
            if "sha256:" + got != digest:
                raise RuntimeError(f"{digest}: got sha256:{got}")
        finally:
            os.close(fd)
            os.close(rfd)

    with ThreadPoolExecutor(max_workers=a.concurrency) as blobs_pool:
        for f in [blobs_pool.submit(fetch, d, s) for d, s in sorted(blobs.items(), key=lambda x: x[1])]:
            f.result()
    streams.shutdown()
    print(json.dumps({"blobs": len(blobs), "bytes": sum(blobs.values())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
