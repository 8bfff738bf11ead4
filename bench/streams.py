#!/usr/bin/env python3
"""What `imagevol pull --streams N` gains on a link where one connection is slow.

Starts a loopback docker-registry and, in front of it, the test suite's reverse proxy
(tests/support/proxy.py) pacing every connection on its own to --conn-mib MiB/s (as a CDN or an
object store that throttles per connection does; many connections are not limited together).
Pushes one random blob of --size-mib as an artifact (`imagevol pack --format artifact`), then
per round pulls it through the proxy into a fresh store with each --streams value, alternating
(the order rotates from round to round). Each pull is a whole `imagevol pull` process; the proxy
counts the bytes it sent (every stream count must move the blob once). Usage:

    python bench/streams.py [--size-mib 512] [--conn-mib 64] [--streams 1 2 4] [--rounds 3]
        [--out bench/results/streams.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.lib.model import write_random  # noqa: E402

from tests.support.proxy import Proxy  # noqa: E402
from tests.support.registry import Registry  # noqa: E402

MIB = 1 << 20


def imagevol() -> list[str]:
    return [sys.executable, "-m", "imagevol"]


def one_pull(ref: str, root: Path, streams: int, env: dict[str, str]) -> dict[str, Any]:
    cmd = [*imagevol(), "--root", str(root), "pull", ref, "--streams", str(streams), "--progress", "none", "--json"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    doc = json.loads(r.stdout)
    return {"streams": streams, "wall_s": round(wall, 3), "downloaded": doc.get("downloadedBytes")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=512, help="blob size (default 512)")
    ap.add_argument("--conn-mib", type=float, default=64, help="MiB/s each connection is paced to (default 64)")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4], help="stream counts (default 1 2 4)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "streams.json")
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGEVOL_ROOT", "PYTHONDONTWRITEBYTECODE")}
    runs: list[dict[str, Any]] = []
    t_all = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="imagevol-streams-") as tmp:
        work = Path(tmp)
        reg = Registry.start(work / "registry")
        proxy = Proxy(reg.url).start()
        try:
            model = work / "model"
            model.mkdir()
            write_random(model / "weights.bin", a.size_mib * MIB)
            pack = ["pack", str(model), f"{reg.host}/bench/streams:v1", "--format", "artifact", "--no-explain"]
            r = subprocess.run(
                [*imagevol(), "--root", str(work / "pack-root"), *pack, "--progress", "none"],
                capture_output=True,
                text=True,
                env={**env, "IMAGEVOL_PACK_CACHE": "off"},
                timeout=3600,
            )
            if r.returncode != 0:
                sys.exit(f"pack failed: {r.stderr[-2000:]}")
            ref = f"127.0.0.1:{proxy.port}/bench/streams:v1"
            proxy.conn_rate_limit = a.conn_mib * MIB
            for rnd in range(a.rounds):
                k = rnd % len(a.streams)
                for n in a.streams[k:] + a.streams[:k]:
                    root = work / f"root-{rnd}-{n}"
                    sent0 = proxy.bytes_for("/blobs/")
                    run = one_pull(ref, root, n, env)
                    run["proxy_sent"] = proxy.bytes_for("/blobs/") - sent0
                    run["round"] = rnd + 1
                    runs.append(run)
                    shutil.rmtree(root)
                    print(
                        f"round {rnd + 1}/{a.rounds} --streams {n}: {run['wall_s']:.2f} s "
                        f"({a.size_mib / run['wall_s']:.0f} MiB/s), proxy sent {run['proxy_sent'] / MIB:.0f} MiB",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            proxy.stop()
            reg.stop()
    med = {}
    for n in a.streams:
        walls = [r["wall_s"] for r in runs if r["streams"] == n]
        med[str(n)] = {
            "wall_s": round(statistics.median(walls), 3),
            "wall_min_s": min(walls),
            "wall_max_s": max(walls),
            "mib_per_s": round(a.size_mib / statistics.median(walls)),
        }
    doc = {
        "command": "python bench/streams.py " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "size_mib": a.size_mib,
        "conn_mib_per_s": a.conn_mib,
        "rounds": a.rounds,
        "commit": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "medians": med,
        "runs": runs,
        "total_s": round(time.monotonic() - t_all, 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\n{a.size_mib} MiB blob, each connection paced to {a.conn_mib:g} MiB/s, median of {a.rounds}\n")
    print("| --streams | median wall | min-max | MiB/s |\n|---|---|---|---|")
    for n, m in med.items():
        print(f"| {n} | {m['wall_s']:.2f} s | {m['wall_min_s']:.2f}-{m['wall_max_s']:.2f} s | {m['mib_per_s']} |")
    print(f"\nwrote {a.out} ({doc['total_s']} s in all)")


if __name__ == "__main__":
    main()
