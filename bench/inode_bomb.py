#!/usr/bin/env python3
"""Peak RSS and time of applying an inode bomb: one gzip layer of N empty entries (1,000 empty
files per directory; 400,000 entries gzip to 2.5 MB). Each run is a child process of its own
(ru_maxrss is per process), applying with the `src` tree given (so the commit before a change can
be measured against the one after), with the entry limit lifted where the tree has one. Usage:

    python bench/inode_bomb.py [--entries 400000] [--dir /var/tmp] [--src SRC ...] [--rounds 1]

Prints one line per run: src, entries, seconds, peak RSS before and after the call (MB).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import io, os, resource, shutil, sys, tempfile, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from tests.support.tars import many_entries_gz
from imagevol.unpack.applier import ApplyOptions, apply_layer
blob = many_entries_gz(int(sys.argv[3]))
kw = {"max_entries": None} if "max_entries" in ApplyOptions.__dataclass_fields__ else {}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
d = tempfile.mkdtemp(dir=sys.argv[4])
try:
    t = time.monotonic()
    apply_layer(d, io.BytesIO(blob), options=ApplyOptions(**kw))
    took = time.monotonic() - t
finally:
    shutil.rmtree(d)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{took:.1f} {before / 1024:.0f} {peak / 1024:.0f} {len(blob)}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=400_000)
    ap.add_argument("--dir", default="/var/tmp", help="where the layer is applied (its file system matters)")
    ap.add_argument("--src", nargs="+", default=[str(REPO / "src")], help="imagevol src trees to compare")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    for _ in range(args.rounds):
        for src in args.src:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, os.path.abspath(src), str(REPO), str(args.entries), args.dir],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            took, before, peak, gz = out
            print(f"{src}: {args.entries} entries ({int(gz) / 1e6:.1f} MB gzip) {took} s, RSS {before} -> {peak} MB")


if __name__ == "__main__":
    main()
