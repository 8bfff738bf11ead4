#!/usr/bin/env python3
"""What it costs that no volume and no export shares an inode with the store.

For a blob of --size-mib (random bytes) in a store, on each file system given (ext4: the
--workdir; xfs: a loop-mounted XFS image with reflink=1, made here when mkfs.xfs exists):

- export (`pull --output oci:DIR`): ``LayoutSink.put_blob_file`` with ``mode="link"`` (the old
  hard link) vs ``mode="clone"`` (now: FICLONE where the file system can, else copy_file_range,
  then fsync);
- a volume without root (`--mode hardlink` / `auto`): the old hard link of the snapshot's file
  vs ``create_volume(mode="copy")`` (now: a reflink or a copy per file).

Time: wall seconds of the operation alone, median of --rounds, each run after sync and a dropped
page cache (needs root). Disk: the file system's used blocks after the operation minus before
(statvfs, after sync). Usage (as root):

    python bench/trust_store.py [--size-mib 1024] [--rounds 3] [--workdir /tmp] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from imagevol import mediatypes as mt  # noqa: E402
from imagevol.manifest import parse_manifest  # noqa: E402
from imagevol.materialize import force_rmtree, materialize  # noqa: E402
from imagevol.sinks.layout import LayoutSink  # noqa: E402
from imagevol.store import Store  # noqa: E402
from imagevol.volume import create_volume, remove_volume  # noqa: E402

MIB = 1 << 20


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def used_bytes(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def store_with_blob(root: Path, size: int) -> tuple[Store, Path, object]:
    store = Store(root)
    data = os.urandom(size)
    d = store.put_bytes(data)
    cfg = store.put_bytes(b"{}")
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": "application/vnd.example",
        "config": {"mediaType": mt.OCI_EMPTY, "digest": str(cfg), "size": 2},
        "layers": [
            {"mediaType": "application/x", "digest": str(d), "size": size, "annotations": {mt.ANN_TITLE: "w.bin"}}
        ],
    }
    raw = json.dumps(doc).encode()
    store.put_bytes(raw)
    snap = materialize(store, parse_manifest(raw))
    return store, store.blob_path(d), snap


def measure(fs: str, base: Path, size: int, rounds: int) -> dict[str, dict[str, float]]:
    store, blob, snap = store_with_blob(base / "store", size)
    out: dict[str, dict[str, float]] = {}

    def run(name: str, op: Callable[[Path], None], undo: Callable[[Path], None]) -> None:
        times, disk = [], []
        for i in range(rounds):
            dest = base / f"{name}-{i}"
            drop_caches()
            before = used_bytes(base)
            t0 = time.perf_counter()
            op(dest)
            times.append(time.perf_counter() - t0)
            disk.append(used_bytes(base) - before)
            undo(dest)
        out[name] = {"seconds": statistics.median(times), "disk_mib": statistics.median(disk) / MIB}
        print(f"{fs:5} {name:22} {out[name]['seconds']:7.3f} s  {out[name]['disk_mib']:8.1f} MiB", flush=True)

    digest = f"sha256:{blob.name}"

    def export(mode: str) -> Callable[[Path], None]:
        return lambda dest: LayoutSink(dest, tag="t").put_blob_file(blob, digest, size, mode=mode)

    run("export-hardlink-old", export("link"), shutil.rmtree)
    run("export-clone-new", export("clone"), shutil.rmtree)

    def old_tree(dest: Path) -> None:
        dest.mkdir()
        os.link(snap.path / "w.bin", dest / "w.bin")

    def new_tree(dest: Path) -> None:
        create_volume(store, snap, dest, ref="bench", mode="copy")

    run("volume-hardlink-old", old_tree, force_rmtree)
    run("volume-copy-new", new_tree, lambda dest: remove_volume(store, dest))
    return out


def xfs_mount(workdir: Path, size: int) -> tuple[Path, Path] | None:
    if shutil.which("mkfs.xfs") is None:
        return None
    image = workdir / "xfs.img"
    with open(image, "wb") as f:
        f.truncate(4 * size + (1 << 30))
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    mnt = workdir / "xfs"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    return image, mnt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (it drops the page cache and mounts an XFS image)")
    size = args.size_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="trust-bench-", dir=args.workdir))
    results: dict[str, object] = {"size_mib": args.size_mib, "rounds": args.rounds, "kernel": os.uname().release}
    xfs = None
    try:
        (work / "ext4").mkdir()
        results["ext4"] = measure("ext4", work / "ext4", size, args.rounds)
        xfs = xfs_mount(work, size)
        if xfs is not None:
            results["xfs-reflink"] = measure("xfs", xfs[1], size, args.rounds)
    finally:
        if xfs is not None:
            subprocess.run(["umount", "-l", str(xfs[1])], check=False)  # the store's files may be open
            xfs[1].rmdir()
            xfs[0].unlink()
        force_rmtree(work)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
