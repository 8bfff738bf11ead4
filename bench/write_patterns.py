#!/usr/bin/env python3
"""How a pull should receive, write and hash a large blob.

Starts a loopback docker-registry, pushes two random blobs of --size-mib each, then per round
downloads both blobs at once (one thread per blob). Four patterns with 4 ranged GET streams per
blob (urllib3, ``read(1 MiB)``, ``os.pwrite``), each file hashed back from the page cache after:

- layout ``stripes``: the blob in 4 contiguous stripes, one per stream;
  layout ``parts``: 64 MiB parts dealt round-robin to the 4 streams (they write side by side);
- ``truncate``: the file is ftruncated to its full size first; ``grow``: it grows as written.

Two with one plain GET per blob, received into a reused page-aligned 4 MiB buffer
(``readinto``), hashed from it, and written from it:

- ``single+buffered``: ``os.pwrite`` through the page cache;
- ``single+direct``: ``os.pwrite`` on an ``O_DIRECT`` descriptor (around the page cache).

Every run starts from the same memory: sync, drop the page cache, read the registry's storage
back in (bench/lib/scenarios.py ``settle``, needs root). Patterns alternate within a round (the
order rotates from round to round). Usage (as root):

    python bench/write_patterns.py [--size-mib 1024] [--rounds 5] [--out bench/results/write_patterns.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import mmap
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import urllib3  # noqa: E402
from bench.lib.model import write_random  # noqa: E402
from bench.lib.proc import process_cpu_s, system_busy_s, wait_quiet  # noqa: E402
from bench.lib.scenarios import settle  # noqa: E402

from tests.support.registry import Registry  # noqa: E402

MIB = 1 << 20
# A run is "undisturbed" when the rest of the machine used less than this many CPUs on average
# while it ran (others' CPU seconds / wall seconds). The medians are given over all runs and over
# these alone: on a shared machine a test suite next door can double a run.
UNDISTURBED = 0.25
STREAMS = 4
PART = 64 * MIB
READ = 1 * MIB
HASH_BUF = 8 * MIB
PATTERNS = ("stripes+truncate", "stripes+grow", "parts+truncate", "parts+grow", "single+buffered", "single+direct")
SINGLE_BUF = 4 * MIB
TIMEOUT = urllib3.Timeout(connect=10.0, read=120.0)


# --------------------------------------------------------------------------- other users' CPU

PF_KTHREAD = 0x00200000


def process_times() -> dict[tuple[int, int], tuple[float, int]]:
    """(pid, start time) -> (CPU seconds, parent pid) of every user-space process; kernel threads
    are left out. CPU seconds are utime + stime + cutime + cstime: reaped children count for their
    parent."""
    clk = os.sysconf("SC_CLK_TCK")
    out: dict[tuple[int, int], tuple[float, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[6]) & PF_KTHREAD:
            continue
        out[(int(name), int(fields[19]))] = (sum(int(x) for x in fields[11:15]) / clk, int(fields[1]))
    return out


class OtherCPU:
    """What the rest of the machine burned while a run went on, in two shares:

    - ``other_cpu_s``: other users' processes (every user-space process but ``exclude``: this
      process, which reaps the timed command, and the registry); a test suite next door lands here;
    - ``kernel_etc_s``: the rest of /proc/stat's busy time (softirq, kernel threads such as the
      writeback of what the run wrote, steal): mostly caused by the run itself.
    """

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.t0 = process_times()
        self.busy0 = system_busy_s()

    def stop(self, own_cpu_s: float) -> dict[str, float]:
        """``own_cpu_s``: CPU of the run itself and of the excluded processes meanwhile."""
        busy = system_busy_s() - self.busy0
        t1 = process_times()
        others = sum(v - self.t0.get(k, (0.0, 0))[0] for k, (v, _) in t1.items() if k[0] not in self.exclude)
        # A process that ended meanwhile was reaped by its parent, whose cutime took all it had burned
        # (before the run too): take back what it had at the start.
        others -= sum(v for k, (v, ppid) in self.t0.items() if k not in t1 and ppid not in self.exclude)
        others = max(0.0, others)
        return {
            "other_cpu_s": round(others, 3),
            "kernel_etc_s": round(max(0.0, busy - own_cpu_s - others), 3),
            "machine_busy_s": round(busy, 3),
        }


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- setup


def push_blob(pm: urllib3.PoolManager, reg: Registry, repo: str, path: Path, digest: str) -> None:
    """Monolithic upload, as tests/support/oci.py ``Client.push_blob`` does (POST, then PUT the
    whole body with ``digest=``), but streamed from the file instead of held in memory."""
    r = pm.request("POST", f"{reg.url}/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"}, timeout=TIMEOUT)
    if r.status != 202:
        raise RuntimeError(f"POST upload -> HTTP {r.status}: {r.data[:300]!r}")
    loc = r.headers["Location"]
    loc = loc if loc.startswith("http") else reg.url + loc
    with open(path, "rb") as f:
        r = pm.request(
            "PUT",
            loc + ("&" if "?" in loc else "?") + f"digest={digest}",
            body=f,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(path.stat().st_size)},
            timeout=urllib3.Timeout(connect=10.0, read=600.0),
        )
    if r.status != 201:
        raise RuntimeError(f"PUT blob -> HTTP {r.status}: {r.data[:300]!r}")


# --------------------------------------------------------------------------- one run


def ranges_for(layout: str, size: int) -> list[list[tuple[int, int]]]:
    """Per stream, the [start, end) ranges it fetches, in order."""
    if layout == "stripes":
        step = -(-size // STREAMS)
        return [[(i * step, min(size, (i + 1) * step))] for i in range(STREAMS) if i * step < size]
    streams: list[list[tuple[int, int]]] = [[] for _ in range(STREAMS)]
    for k, start in enumerate(range(0, size, PART)):
        streams[k % STREAMS].append((start, min(size, start + PART)))
    return [s for s in streams if s]


def stream(pm: urllib3.PoolManager, url: str, fd: int, ranges: list[tuple[int, int]]) -> None:
    for start, end in ranges:
        r = pm.request(
            "GET",
            url,
            headers={"Range": f"bytes={start}-{end - 1}"},
            preload_content=False,
            timeout=TIMEOUT,
            retries=False,
        )
        if r.status != 206:
            raise RuntimeError(f"GET {url} range {start}-{end - 1} -> HTTP {r.status}")
        off = start
        while chunk := r.read(READ):
            os.pwrite(fd, chunk, off)
            off += len(chunk)
        r.release_conn()
        if off != end:
            raise RuntimeError(f"range {start}-{end - 1}: got {off - start} bytes, wanted {end - start}")


def hash_file(fd: int, size: int, buf: bytearray) -> str:
    """sha256 of the file, read back with preadv into a reused buffer (from the page cache)."""
    h = hashlib.sha256()
    mv = memoryview(buf)
    off = 0
    while off < size:
        n = os.preadv(fd, [buf], off)
        if n <= 0:
            raise RuntimeError(f"short read at {off} of {size}")
        h.update(mv[:n])
        off += n
    return "sha256:" + h.hexdigest()


def fetch_single(url: str, path: Path, size: int, how: str, out: dict[str, Any]) -> None:
    """One GET; each 4 MiB is received into the same aligned buffer, hashed there, then written."""
    pm = urllib3.PoolManager(maxsize=1)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | (os.O_DIRECT if how == "direct" else 0), 0o644)
    buf = mmap.mmap(-1, SINGLE_BUF)
    h = hashlib.sha256()
    try:
        r = pm.request("GET", url, preload_content=False, timeout=TIMEOUT, retries=False)
        if r.status != 200:
            raise RuntimeError(f"GET {url} -> HTTP {r.status}")
        with memoryview(buf) as mv:
            off = 0
            while off < size:
                want = min(SINGLE_BUF, size - off)
                got = 0
                while got < want:
                    n = r._fp.readinto(mv[got:want])
                    if not n:
                        raise RuntimeError(f"{url}: body ended at {off + got} of {size}")
                    got += n
                h.update(mv[:got])
                body = got // 4096 * 4096 if how == "direct" else got
                os.pwrite(fd, mv[:body], off)
                if body < got:  # the unaligned tail of the blob, through the page cache
                    tail = os.open(path, os.O_WRONLY)
                    os.pwrite(tail, mv[body:got], off + body)
                    os.close(tail)
                off += got
        r.release_conn()
        out["downloaded_at"] = time.monotonic()
        out["digest"] = "sha256:" + h.hexdigest()
    finally:
        os.close(fd)
        buf.close()
        pm.clear()


def fetch_blob(
    url: str, path: Path, size: int, layout: str, prealloc: str, buf: bytearray, out: dict[str, Any]
) -> None:
    if layout == "single":
        fetch_single(url, path, size, prealloc, out)
        return
    pm = urllib3.PoolManager(maxsize=STREAMS)
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
    try:
        if prealloc == "truncate":
            os.ftruncate(fd, size)
        errors: list[BaseException] = []

        def one(ranges: list[tuple[int, int]]) -> None:
            try:
                stream(pm, url, fd, ranges)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=one, args=(rs,)) for rs in ranges_for(layout, size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        out["downloaded_at"] = time.monotonic()
        out["digest"] = hash_file(fd, size, buf)
    finally:
        os.close(fd)
        pm.clear()


def one_run(
    pattern: str, reg: Registry, blobs: list[tuple[str, int]], work: Path, bufs: list[bytearray]
) -> dict[str, Any]:
    layout, prealloc = pattern.split("+")
    if not settle(reg.storage_dir):
        raise RuntimeError("could not drop the page cache (needs root and /proc/sys/vm/drop_caches)")
    waited, quiet = wait_quiet()
    load = os.getloadavg()
    outs: list[dict[str, Any]] = [{} for _ in blobs]
    errors: list[BaseException] = []
    paths = [work / f"out-{i}" for i in range(len(blobs))]

    def go(i: int) -> None:
        digest, size = blobs[i]
        try:
            fetch_blob(f"{reg.url}/v2/bench/blobs/{digest}", paths[i], size, layout, prealloc, bufs[i], outs[i])
        except BaseException as e:
            errors.append(e)

    reg_cpu0 = process_cpu_s(reg.pid) if reg.pid else 0.0
    meter = OtherCPU({os.getpid(), reg.pid or -1})
    c0 = os.times()
    t0 = time.monotonic()
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(blobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    c1 = os.times()
    reg_cpu = (process_cpu_s(reg.pid) if reg.pid else 0.0) - reg_cpu0
    shares = meter.stop(c1.user - c0.user + c1.system - c0.system + reg_cpu)
    try:
        if errors:
            raise errors[0]
        for (digest, _), out in zip(blobs, outs, strict=True):
            if out["digest"] != digest:
                raise RuntimeError(f"{pattern}: downloaded {out['digest']}, wanted {digest}")
    finally:
        for p in paths:
            p.unlink(missing_ok=True)
    return {
        "pattern": pattern,
        "load_before": [round(x, 2) for x in load],
        "wall_s": round(wall, 3),
        "download_s": round(max(o["downloaded_at"] for o in outs) - t0, 3),
        "user_s": round(c1.user - c0.user, 3),
        "sys_s": round(c1.system - c0.system, 3),
        "registry_cpu_s": round(reg_cpu, 3),
        **shares,
        "quiet_wait_s": round(waited, 1),
        "quiet": quiet,
    }


# --------------------------------------------------------------------------- report


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    med: dict[str, dict[str, Any]] = {}
    for p in PATTERNS:
        rs = [r for r in runs if r["pattern"] == p]
        if not rs:
            continue
        walls = [r["wall_s"] for r in rs]
        calm = [r["wall_s"] for r in rs if r["other_cpu_s"] < UNDISTURBED * r["wall_s"]]
        med[p] = {
            "n": len(rs),
            "wall_s": round(statistics.median(walls), 3),
            "wall_min_s": min(walls),
            "wall_max_s": max(walls),
            "download_s": round(statistics.median(r["download_s"] for r in rs), 3),
            "sys_s": round(statistics.median(r["sys_s"] for r in rs), 3),
            "sys_min_s": min(r["sys_s"] for r in rs),
            "sys_max_s": max(r["sys_s"] for r in rs),
            "user_s": round(statistics.median(r["user_s"] for r in rs), 3),
            "registry_cpu_s": round(statistics.median(r["registry_cpu_s"] for r in rs), 3),
            "other_cpu_s": round(statistics.median(r["other_cpu_s"] for r in rs), 3),
            "kernel_etc_s": round(statistics.median(r["kernel_etc_s"] for r in rs), 3),
            "not_quiet": sum(not r["quiet"] for r in rs),
            "undisturbed_n": len(calm),
            "undisturbed_wall_s": round(statistics.median(calm), 3) if calm else None,
            "undisturbed_wall_min_s": min(calm) if calm else None,
            "undisturbed_wall_max_s": max(calm) if calm else None,
            "load1_before": round(statistics.median(r["load_before"][0] for r in rs), 2),
            "load1_before_min": min(r["load_before"][0] for r in rs),
            "load1_before_max": max(r["load_before"][0] for r in rs),
        }
    return med


def undisturbed(m: dict[str, Any]) -> str:
    if not m["undisturbed_n"]:
        return f"none of {m['n']}"
    return (
        f"{m['undisturbed_n']} of {m['n']}: {m['undisturbed_wall_s']:.2f} s "
        f"({m['undisturbed_wall_min_s']:.2f}-{m['undisturbed_wall_max_s']:.2f})"
    )


def table(med: dict[str, dict[str, Any]], total_mib: int) -> str:
    lines = [
        "| pattern | median wall | min-max | MiB/s | undisturbed runs: median wall (min-max) | median download "
        "| median sys | median user | registry CPU | others' CPU | load1 before (median, min-max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p, m in med.items():
        lines.append(
            f"| {p} | {m['wall_s']:.2f} s | {m['wall_min_s']:.2f}-{m['wall_max_s']:.2f} s "
            f"| {total_mib / m['wall_s']:.0f} | {undisturbed(m)} | {m['download_s']:.2f} s "
            f"| {m['sys_s']:.2f} s ({m['sys_min_s']:.2f}-{m['sys_max_s']:.2f}) | {m['user_s']:.2f} s "
            f"| {m['registry_cpu_s']:.2f} s | {m['other_cpu_s']:.2f} s "
            f"| {m['load1_before']:.2f} ({m['load1_before_min']:.2f}-{m['load1_before_max']:.2f}) |"
        )
    return "\n".join(lines)


def machine(work: Path) -> dict[str, Any]:
    def sh(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "filesystem": sh("findmnt", "-n", "-o", "FSTYPE", "--target", str(work)),
        "python": platform.python_version(),
        "urllib3": urllib3.__version__,
        "registry": sh("/usr/bin/docker-registry", "--version"),
        "commit": sh("git", "-C", str(REPO), "rev-parse", "HEAD"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="size of each of the two blobs (default 1024)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; every pattern runs once per round (default 5)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "write_patterns.json")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("write_patterns.py needs root: it drops the page cache before every run")
    # SIGTERM/SIGHUP unwind through the finally blocks (registry stopped, scratch removed) like Ctrl-C.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    size = a.size_mib * MIB
    runs: list[dict[str, Any]] = []
    orders: list[list[str]] = []
    t_all = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="imagevol-write-patterns-") as tmp:
        work = Path(tmp)
        facts = machine(work)
        reg = Registry.start(work / "registry")
        try:
            pm = urllib3.PoolManager()
            blobs: list[tuple[str, int]] = []
            for i in range(2):
                src = work / f"blob-{i}"
                digest = write_random(src, size)
                push_blob(pm, reg, "bench", src, digest)
                src.unlink()
                blobs.append((digest, size))
                log(f"pushed blob {i}: {digest[:19]}... {a.size_mib} MiB")
            bufs = [bytearray(HASH_BUF) for _ in blobs]
            for rnd in range(a.rounds):
                order = list(PATTERNS[rnd % len(PATTERNS) :] + PATTERNS[: rnd % len(PATTERNS)])
                orders.append(order)
                for p in order:
                    r = one_run(p, reg, blobs, work, bufs)
                    r["round"] = rnd + 1
                    runs.append(r)
                    log(
                        f"round {rnd + 1}/{a.rounds} {p:17} wall {r['wall_s']:.2f} s (download {r['download_s']:.2f})"
                        f" user {r['user_s']:.2f} sys {r['sys_s']:.2f} registry {r['registry_cpu_s']:.2f}"
                        f" others {r['other_cpu_s']:.2f} kernel {r['kernel_etc_s']:.2f} load {r['load_before'][0]:.2f}"
                        + ("" if r["quiet"] else " (machine not quiet)")
                    )
        finally:
            reg.stop()
    med = summarize(runs)
    tab = table(med, 2 * a.size_mib)
    doc = {
        "command": "python bench/write_patterns.py " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "size_mib_per_blob": a.size_mib,
        "blobs": 2,
        "streams_per_blob": STREAMS,
        "part_mib": PART // MIB,
        "read_mib": READ // MIB,
        "rounds": a.rounds,
        "what": (
            "both blobs downloaded at once (one thread each); stripes/parts: 4 ranged GET streams per blob (urllib3, "
            "read(1 MiB), pwrite), then each file hashed back from the page cache (preadv, 8 MiB buffer); single: "
            "one GET per blob, readinto a reused aligned 4 MiB buffer, sha256 from it, pwrite buffered or O_DIRECT; "
            "wall_s covers download and hash, download_s the download only; user/sys are this process's "
            "(os.times); page cache dropped and the registry's storage read back in before every run, then up to "
            "45 s of waiting for less than 0.2 CPU busy elsewhere (bench/lib/proc.py wait_quiet; quiet=false when "
            "the run had to start anyway); other_cpu_s: other users' processes during the run (undisturbed runs: "
            "less than 0.25 CPU on average); kernel_etc_s: the rest of the machine's busy time (softirq, kernel "
            "threads, steal)"
        ),
        "machine": facts,
        "orders": orders,
        "medians": med,
        "runs": runs,
        "total_s": round(time.monotonic() - t_all, 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\n2 x {a.size_mib} MiB at once, median of {a.rounds} rounds\n")
    print(tab)
    print(f"\nwrote {a.out} ({doc['total_s']} s in all)")


if __name__ == "__main__":
    main()
