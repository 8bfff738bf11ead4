"""Crash safety: `imagevol pull`, `mount`, `unmount` and `gc` killed with SIGKILL.

Two kinds of kill:

* sweeps (`test_sigkill_sweep`): the command runs against a rate-limited proxy and is killed
  after a seeded random delay drawn over its measured duration. Iterations:
  ``IMAGEVOL_CRASH_ITERATIONS``, else 5 (30 when the run selects ``-m slow``); seed:
  ``IMAGEVOL_CRASH_SEED`` (default 1).
* crash points (`test_crash_point`): the command kills itself right before or after a named
  step (tests/support/crashpoint.py), to hit the narrow windows a random kill rarely does.

After every kill: `imagevol fsck` is clean; every volume `volumes` lists is mounted and complete;
no mount under the test directory that imagevol does not list; every snapshot directory is
complete (``snapshots/.build-*`` may stay until the next mount cleans it); and the next command
succeeds with the right content (a pull resumes what was downloaded).

A sweep that meets one of the regressions named below (they were bugs once, now fixed) fails
naming it; the crash points pin the same cases at fixed places.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagevol.fetch.pieces import PIECE
from tests.support import oci
from tests.support.clirun import Imagevol, content_ok, mount_options, mounts_under
from tests.support.proxy import Proxy
from tests.support.tars import E, push_image, tar_layer

pytestmark = pytest.mark.e2e

MiB = 1 << 20
RATE = 24 * MiB  # proxy pacing: a pull of the image takes about half a second

# Regressions these tests guard against (both were real bugs, fixed: volumes are recorded before a
# one-step read-only bind; gc renames a snapshot out of sight before deleting it).
BUG_ORPHAN_MOUNT = (
    "a SIGKILL left a mount `volumes` does not list (or a read-write one): create_volume must record "
    "the volume before a one-step read-only bind"
)
BUG_HALF_SNAPSHOT = (
    "a SIGKILL of gc left a partial snapshot that the next mount reused: remove_snapshot must rename it "
    "out of sight before deleting it"
)


# --------------------------------------------------------------------------- content


@dataclass
class Image:
    ref: str
    digest: str  # manifest digest
    files: dict[str, bytes] = field(default_factory=dict)
    blobs: dict[str, int] = field(default_factory=dict)  # layer/config digest -> size
    big: str = ""  # digest of the big layer


@pytest.fixture(scope="module")
def proxy(registry) -> Iterator[Proxy]:
    with Proxy(registry.url) as p:
        yield p


@pytest.fixture(scope="module")
def image(registry, proxy) -> Image:
    """1,200 small files in 30 directories (layer 1) and a 12 MiB random file (layer 2)."""
    client = oci.Client(registry)
    files = {f"d{i:02d}/f{j:02d}.txt": f"file {i}/{j}\n".encode() * (1 + j % 5) for i in range(30) for j in range(40)}
    files["big.bin"] = os.urandom(12 * MiB)
    small = [E(f"d{i:02d}", kind="dir") for i in range(30)] + [E(p, d) for p, d in files.items() if p != "big.bin"]
    layers = [tar_layer(small), tar_layer([E("big.bin", files["big.bin"])])]
    repo = f"crash/img-{os.urandom(3).hex()}"
    digest = push_image(client, repo, "t", layers)
    man = json.loads(client.get_manifest(repo, "t")[0])
    blobs = {d["digest"]: d["size"] for d in (man["config"], *man["layers"])}
    big = max(man["layers"], key=lambda d: d["size"])["digest"]
    return Image(f"{proxy.host}/{repo}:t", digest, files, blobs, big)


@pytest.fixture
def px(proxy: Proxy) -> Iterator[Proxy]:
    proxy.reset()
    proxy.rate_limit = RATE
    yield proxy
    proxy.reset()


@pytest.fixture
def iv(tmp_path: Path) -> Iterator[Imagevol]:
    c = Imagevol(tmp_path / "store", tmp_path / "home", watch=[tmp_path])
    (tmp_path / "mnt").mkdir()
    yield c
    c.cleanup()


# --------------------------------------------------------------------------- checks


def after_kill(iv: Imagevol, top: Path, image: Image, *, allow_gone: bool = False) -> set[str]:
    """The invariants; returns the known-bug signatures met (anything else fails here)."""
    hits: set[str] = set()
    iv.fsck()
    vols = iv.volumes()
    for v in vols:
        if not v["mounted"]:
            assert allow_gone, f"half-made volume: {v}"
            continue
        assert content_ok(Path(v["target"]), image.files), f"volume {v['target']} is incomplete"
    listed = {v["target"] for v in vols if v["mounted"]}
    if mounts_under(top) - listed:
        hits.add(BUG_ORPHAN_MOUNT)
    for target in mounts_under(top):
        if "ro" not in mount_options(target):
            assert target not in listed, f"volume {target} is mounted read-write"
            hits.add(BUG_ORPHAN_MOUNT)  # the window between the bind and the read-only remount
    key = image.digest.split(":", 1)[1]
    snap = iv.root / "snapshots" / key
    if snap.is_dir() and not content_ok(snap, image.files):
        hits.add(BUG_HALF_SNAPSHOT)
    return hits


def repair_known(iv: Imagevol, top: Path, image: Image, hits: set[str]) -> None:
    """Undo what a known bug left, so a sweep can go on (test-side repair, not imagevol's)."""
    if BUG_ORPHAN_MOUNT in hits:
        listed = {v["target"] for v in iv.volumes()}
        for m in sorted(mounts_under(top) - listed, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True, timeout=30)
    if BUG_HALF_SNAPSHOT in hits:
        from imagevol.materialize import remove_snapshot
        from imagevol.store import Store

        store = Store(iv.root)
        remove_snapshot(store, image.digest.split(":", 1)[1])
        store.close()


def run_killed(iv: Imagevol, args: list[str], delay: float, log: Path, crash: tuple[str, ...] = ()) -> bool:
    """Start `args`, SIGKILL its process group after `delay` s; False if it ended first (then it
    must have succeeded)."""
    p = iv.popen(*args, log=log, crash=crash)
    try:
        rc = p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
        return True
    assert rc == 0, f"{args} failed ({rc}) before the kill:\n{log.read_text(errors='replace')}"
    return False


def forget(iv: Imagevol, image: Image) -> None:
    """Drop the reference and collect, so the next command downloads and builds again."""
    for v in iv.volumes():
        iv.unmount(Path(v["target"]))
    iv.run("rm", image.ref)
    r = iv.run("gc")
    assert r.returncode == 0, r.stderr


def timed(fn) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def _full_run(config: pytest.Config) -> bool:
    expr = config.getoption("markexpr") or ""
    return "slow" in expr and "not slow" not in expr


def iterations(config: pytest.Config) -> int:
    env = os.environ.get("IMAGEVOL_CRASH_ITERATIONS")
    return int(env) if env else (30 if _full_run(config) else 5)


# --------------------------------------------------------------------------- sweeps


@pytest.mark.slow
@pytest.mark.parametrize("op", ["pull", "mount", "gc"])
def test_sigkill_sweep(request, image: Image, px: Proxy, iv: Imagevol, tmp_path: Path, op: str) -> None:
    n = iterations(request.config)
    seed = os.environ.get("IMAGEVOL_CRASH_SEED", "1")
    rnd = random.Random(f"{op}-{seed}")
    top = tmp_path / "mnt"
    hits: set[str] = set()
    killed = 0

    def prepare() -> None:
        if op == "gc":  # something for gc to delete: a snapshot and every blob
            px.rate_limit = None
            t = top / "prep"
            iv.mount_ok(image.ref, t)
            assert iv.unmount(t).returncode == 0
            assert iv.run("rm", image.ref).returncode == 0

    def command(i: int) -> list[str]:
        if op == "pull":
            return ["pull", image.ref, "--pull", "always", "--progress", "none"]
        if op == "mount":
            return ["mount", image.ref, str(top / f"t{i}"), "--progress", "none"]
        return ["gc"]

    # The command's uncut duration (process start included), the shortest of three, so that kills
    # land all over it even when a calibration run was slowed by a loaded machine; a run that ends
    # before its kill shortens it further.
    span = float("inf")
    for c in range(3):
        prepare()
        span = min(span, timed(lambda c=c: run_killed(iv, command(-1 - c), 600, tmp_path / f"calibrate{c}.log")))
        forget(iv, image)
    for i in range(n):
        prepare()
        delay = rnd.uniform(0.05, 0.9 * span)
        t0 = time.monotonic()
        if run_killed(iv, command(i), delay, tmp_path / f"{op}-{i}.log"):
            killed += 1
        else:
            span = min(span, time.monotonic() - t0)
        found = after_kill(iv, top, image)
        hits |= found
        repair_known(iv, top, image, found)
        if op == "mount":
            for v in iv.volumes():
                assert iv.unmount(Path(v["target"])).returncode == 0
        if op != "gc" and rnd.random() < 0.6:
            forget(iv, image)  # download and build again next time (resuming what was kept)
    print(f"{op}: {killed}/{n} runs killed, span {span:.2f}s, known bugs met: {len(hits)}")
    assert killed >= n // 2, f"only {killed} of {n} runs were killed: the delays miss the command"

    # The next run completes, with the right content, and leaves no half-built snapshot.
    px.rate_limit = None
    r = iv.pull(image.ref)
    assert r.returncode == 0, r.stderr
    for d, size in image.blobs.items():
        assert iv.blob(d).stat().st_size == size
    final = top / "final"
    iv.mount_ok(image.ref, final)
    if not content_ok(final, image.files):
        hits.add(BUG_HALF_SNAPSHOT)
    assert not [s for s in iv.snapshot_dirs() if s.startswith(".build-")]
    assert iv.unmount(final).returncode == 0
    iv.fsck()
    assert not hits, "; ".join(sorted(hits))


# --------------------------------------------------------------------------- crash points


@dataclass
class Point:
    id: str
    op: str  # pull | mount | unmount | gc
    spec: str
    bug: str | None = None


POINTS = [
    Point("pull-first-blob-committed", "pull", "imagevol.store.ingest:Ingest.commit@after#1"),
    Point("pull-mid-big-blob", "pull", "imagevol.store.ingest:Ingest.mark_complete@after#3"),
    Point("pull-blobs-in-ref-not-set", "pull", "imagevol.store.meta:Meta.set_ref@before"),
    Point("mount-mid-build", "mount", "imagevol.materialize.build:apply_layer@after#1"),
    Point("mount-build-renamed-not-ready", "mount", "imagevol.materialize.build:_fsync_dir@before"),
    # the snapshot's record is written, its info file not yet, the tree still a `.build-*`
    Point("mount-record-written-not-renamed", "mount", "imagevol.materialize.build:_write_info@after#1"),
    # The read-only bind is one step (open_tree + mount_setattr + move_mount): killed right after it,
    # the volume is recorded already. (A kernel without that API falls back to bind + remount.)
    # Points name the module a name is looked up in: `_bind` is imported into imagevol.volume and
    # called there (create_volume); `_umount` is called by `_teardown` in volume/subpath.py.
    Point("mount-bound", "mount", "imagevol.volume.bind:_bind_ro_atomic@after"),
    Point("mount-bound-fully", "mount", "imagevol.volume:_bind@after"),
    Point("mount-recorded-no-lease", "mount", "imagevol.store.meta:Meta.add_volume@after"),
    Point("unmount-unmounted-not-forgotten", "unmount", "imagevol.volume.subpath:_umount@after"),
    Point("gc-mid-blob-sweep", "gc", "imagevol.store.blobs:Store.remove_blob@after#2"),
    Point("gc-mid-snapshot-delete", "gc", "imagevol.fstree:_open_for_removal@before#4"),
]


@pytest.mark.parametrize(
    "point",
    [pytest.param(p, id=p.id, marks=[pytest.mark.xfail(strict=True, reason=p.bug)] if p.bug else []) for p in POINTS],
)
def test_crash_point(image: Image, px: Proxy, iv: Imagevol, tmp_path: Path, point: Point) -> None:
    px.rate_limit = None
    top = tmp_path / "mnt"
    target = top / "v"
    if point.op == "unmount":
        iv.mount_ok(image.ref, target)
        args = ["unmount", str(target)]
    elif point.op == "gc":
        iv.mount_ok(image.ref, target)
        assert iv.unmount(target).returncode == 0
        assert iv.run("rm", image.ref).returncode == 0
        args = ["gc"]
    elif point.op == "pull":
        args = ["pull", image.ref, "--progress", "none", "--concurrency", "1"]
    else:
        args = ["mount", image.ref, str(target), "--progress", "none"]
    before = {d: px.bytes_for(d) for d in image.blobs}
    r = iv.crash([point.spec], *args)
    assert r.returncode == -signal.SIGKILL, f"crash point {point.spec} was not reached ({r.returncode}):\n{r.stderr}"
    first = {d: px.bytes_for(d) - before[d] for d in image.blobs}

    hits = after_kill(iv, top, image, allow_gone=point.op == "unmount")
    assert not hits, hits
    # The command again, which must succeed (after a gc for everything but a pull, whose
    # unreferenced blobs gc may rightly reclaim: the pull must resume them instead).
    if point.op != "pull":
        assert iv.run("gc").returncode == 0
    if point.op == "pull":
        assert iv.images() == []  # every pull point is before the reference is recorded
        r2 = iv.run(*args, "--json")
        assert r2.returncode == 0, r2.stderr
        second = {d: px.bytes_for(d) - before[d] - first[d] for d in image.blobs}
        if "commit@after#1" in point.spec:  # the committed blob is not fetched again
            assert sum(1 for d in image.blobs if first[d] and not second[d]) >= 1, (first, second)
        if "mark_complete" in point.spec:  # the big blob resumes: its first piece was recorded
            assert second[image.big] <= image.blobs[image.big] - PIECE + MiB, (first, second)
        if "set_ref" in point.spec:  # everything was in: nothing is downloaded again
            assert json.loads(r2.stdout)["downloadedBytes"] == 0
            assert sum(second.values()) == 0
        for d, size in image.blobs.items():
            assert iv.blob(d).stat().st_size == size
        assert iv.run("gc").returncode == 0
    elif point.op == "unmount":
        assert iv.unmount(target).returncode == 0
        assert iv.volumes() == []
        assert str(target) not in mounts_under(top)
    else:
        vols = [v for v in iv.volumes() if v["target"] == str(target)]
        if not vols:
            iv.mount_ok(image.ref, target)
        assert content_ok(target, image.files)
        assert not [s for s in iv.snapshot_dirs() if s.startswith(".build-")]
        assert iv.unmount(target).returncode == 0
    assert not after_kill(iv, top, image)
