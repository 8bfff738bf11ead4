#!/usr/bin/env python3
"""oras-py as a peer, in a process of its own (for fair whole-process timing).

oras_cli.py push HOST/REPO:TAG FILE...     push the files as an ORAS artifact (titles = base names)
oras_cli.py pull HOST/REPO:TAG OUTDIR      pull the artifact's files into OUTDIR
"""

from __future__ import annotations

import logging
import sys

import oras.client


def main() -> int:
    op, target, *rest = sys.argv[1:]
    logging.getLogger("oras").setLevel(logging.WARNING)
    host = target.split("/", 1)[0]
    client = oras.client.OrasClient(hostname=host, insecure=True)
    if op == "push":
        client.push(target=target, files=rest, disable_path_validation=True, quiet=True)
    elif op == "pull":
        files = client.pull(target=target, outdir=rest[0])
        print("\n".join(files))
    else:
        print(f"unknown operation {op}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
