"""What the snapshot record costs a cold mount: imagevol at a base commit (before records) against
the working tree, side by side, over a loopback docker-registry.

    .venv/bin/python bench/record_cost.py [--tree NAME=COMMIT ...] [--size-mib 1024] [--rounds 3]

Trees default to ``base=0e81381`` (before records) and ``record=WORKTREE`` (the working tree).

The model of bench/run.py (two random shards, small files) is pushed twice with `imagevol pack`:
as a tar+gzip image (`--format image --compression gzip`: its files are extracted from the layers,
so the record hashes them) and as an artifact (`--format artifact`: raw files are hard links to
verified blobs, whose digest the record takes without reading them). Every round mounts each
reference into a fresh store with each tree (order rotating), `--mode bind`; reported: the
median wall time of the whole command, its CPU seconds, and the in-process seconds minus the pull
(materialize + mount). Needs root (bind mounts) and docker-registry.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.lib import proc  # noqa: E402
from bench.lib.model import make_model  # noqa: E402
from bench.lib.scenarios import force_unmount_below, rmtree  # noqa: E402

from tests.support.registry import Registry  # noqa: E402


def _tree_at(commit: str, dest: Path) -> Path:
    """``src/imagevol`` of ``commit`` (``WORKTREE``: the working tree) as a package under ``dest``."""
    dest.mkdir(parents=True)
    if commit == "WORKTREE":
        shutil.copytree(REPO / "src" / "imagevol", dest / "imagevol")
        return dest
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "src/imagevol"], check=True, capture_output=True
    ).stdout
    tar_path = dest / "src.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tf:
        tf.extractall(dest, filter="data")
    (dest / "src" / "imagevol").rename(dest / "imagevol")
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tree",
        action="append",
        default=[],
        help="NAME=COMMIT (or NAME=WORKTREE) to compare; default base=0e81381 record=WORKTREE",
    )
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="record-cost-", dir=args.workdir))
    reg = None
    try:
        specs = [t.split("=", 1) for t in (args.tree or ["base=0e81381", "record=WORKTREE"])]
        trees = {name: _tree_at(commit, work / name) for name, commit in specs}
        model = work / "model"
        make_model(model, args.size_mib)
        reg = Registry.start(work / "registry")
        env = {**os.environ, "PYTHONPATH": str(_tree_at("WORKTREE", work / "packer")), "IMAGEVOL_PACK_CACHE": "off"}
        refs = {}
        for fmt, extra in (("image", ["--compression", "gzip"]), ("artifact", [])):
            ref = f"{reg.host}/bench/record-{fmt}:v1"
            subprocess.run(
                [sys.executable, "-m", "imagevol", "pack", str(model), ref, "--format", fmt, *extra, "--no-explain"],
                check=True,
                env=env,
                capture_output=True,
            )
            refs[fmt] = ref
        rows: dict[tuple[str, str], list[dict[str, float]]] = {}
        for rnd in range(args.rounds):
            names = list(trees)
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for fmt, ref in refs.items():
                for name in order:
                    store, target = work / "store", work / "target"
                    run_env = {**os.environ, "PYTHONPATH": str(trees[name])}
                    base = [sys.executable, "-m", "imagevol", "--root", str(store)]
                    m = proc.run(
                        [*base, "mount", ref, str(target), "--mode", "bind", "--progress", "none", "--json"],
                        timeout=1800,
                        env=run_env,
                    )
                    doc = json.loads(m.stdout)
                    pull_s = (doc.get("pull") or {}).get("seconds") or 0.0
                    rows.setdefault((fmt, name), []).append(
                        {"wall_s": m.seconds, "cpu_s": m.cpu_s, "after_pull_s": doc["seconds"] - pull_s}
                    )
                    proc.run([*base, "unmount", str(target)], timeout=300, env=run_env, check=False)
                    force_unmount_below(target)
                    rmtree(store)
                    rmtree(target)
        shown = ", ".join(f"{n}={c}" for n, c in specs)
        print(f"{args.size_mib} MiB model, {args.rounds} rounds, medians; trees: {shown}")
        print(f"{'reference':<10} {'tree':<10} {'wall s':>8} {'cpu s':>8} {'after pull s':>13}")
        for (fmt, name), runs in sorted(rows.items()):
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"{fmt:<10} {name:<10} {med['wall_s']:8.2f} {med['cpu_s']:8.2f} {med['after_pull_s']:13.2f}")
        return 0
    finally:
        if reg is not None:
            reg.stop()
        force_unmount_below(work)
        rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
