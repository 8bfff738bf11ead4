#!/usr/bin/env python3
"""What the CSI plugin's private-content check (KEP-2535 for every digest) costs a publish.

Starts a loopback docker-registry with basic auth and pushes one image of --layers random layers
of --layer-kib KiB. Volume A publishes it with its secret (the download; every digest is marked
private). Then, per round, in-process `Publisher.publish` (a real bind mount, as root) of the same
image, served from the store, by:

- ``checked``: credentials the plugin has not seen (a fresh secret: another identity), so each
  private digest is confirmed at the registry (manifest GET, a 4 KiB ranged GET per blob);
- ``cached``: the same credentials again (answers cached in the store);
- ``owner``: volume A's own secret (its pull fetched the content: cached since).

Each publish is unpublished before the next. Usage (as root):

    python bench/private_check.py [--layers 8] [--layer-kib 1024] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from imagevol.csi.attrs import parse_attributes  # noqa: E402
from imagevol.csi.publisher import PluginConfig, Publisher  # noqa: E402
from imagevol.platform import parse_platform  # noqa: E402
from tests.support import oci  # noqa: E402
from tests.support.proxy import Proxy  # noqa: E402
from tests.support.registry import Registry  # noqa: E402
from tests.support.tars import E, push_image, tar_layer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--layer-kib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ivbench-") as tmp:
        t = Path(tmp)
        reg = Registry.start(t / "reg", auth="basic")
        px = Proxy(reg.url).start()
        try:
            user, password = next(iter(reg.users.items()))
            layers = [tar_layer([E(f"w{i}.bin", os.urandom(args.layer_kib << 10))]) for i in range(args.layers)]
            push_image(oci.Client(reg), "bench/private", "v1", layers)
            node = [parse_platform("linux/amd64")]
            pub = Publisher(PluginConfig(root=t / "store", node_id="n1", platforms=node))
            spec = parse_attributes({"image": f"{px.host}/bench/private:v1"}, node)
            owner = {"username": user, "password": password}
            (t / "pods").mkdir()
            n = 0

            def publish(secrets: dict[str, str]) -> tuple[float, int]:
                nonlocal n
                n += 1
                target = t / "pods" / str(n) / "mount"
                target.parent.mkdir()
                before = len(px.requests)
                t0 = time.perf_counter()
                pub.publish(f"vol-{n}", target, spec, secrets=secrets)
                secs = time.perf_counter() - t0
                pub.unpublish(f"vol-{n}", target)
                return secs, len(px.requests) - before

            publish(owner)  # the download
            out: dict[str, list[tuple[float, int]]] = {"checked": [], "cached": [], "owner": []}
            for r in range(args.rounds):
                fresh = {**owner, "note": f"round {r}"}  # another secret: another identity
                out["checked"].append(publish(fresh))
                out["cached"].append(publish(fresh))
                out["owner"].append(publish(owner))
            result = {
                k: {
                    "median_ms": round(1000 * statistics.median(s for s, _ in v), 1),
                    "requests": sorted({q for _, q in v}),
                }
                for k, v in out.items()
            }
            print(json.dumps({"layers": args.layers, "layer_kib": args.layer_kib, "rounds": args.rounds, **result}))
        finally:
            px.stop()
            reg.stop()


if __name__ == "__main__":
    main()
