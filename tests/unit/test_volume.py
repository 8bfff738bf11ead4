"""Volumes: bind (read-only, executables run), hardlink and copy trees, sub paths, records, leases,
reconciliation with /proc/self/mountinfo."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagevol import mediatypes as mt
from imagevol.errors import ImagevolError, NotFoundError, UsageError
from imagevol.materialize import Snapshot, force_rmtree, materialize
from imagevol.store import Store
from imagevol.volume import (
    create_volume,
    list_volumes,
    mountpoints,
    reconcile,
    remove_volume,
    resolve_subpath,
)
from tests.support import need
from tests.support.blobs import gz
from tests.unit.test_materialize import Builder, tar, tree

root_only = need.root_only("bind mounts need root")
REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"


def mounted(path: Path) -> bool:
    return str(path) in mountpoints()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def image(store: Store, tmp_path: Path) -> Snapshot:
    b = Builder(store)
    layer = tar(
        [
            ("bin", None),
            ("bin/hello", ("mode", b"#!/bin/sh\necho hello from the volume\n", 0o755)),
            ("data", None),
            ("data/weights.bin", b"w" * 1000),
            ("data/sub", None),
            ("data/sub/x.txt", b"x"),
            ("esc", ("symlink", "/etc")),
            ("rel", ("symlink", "data")),
        ]
    )
    return materialize(store, b.image([layer]))


@pytest.fixture
def artifact(store: Store) -> Snapshot:
    b = Builder(store)
    m = b.manifest(
        [
            b.desc("application/x", b"model", {mt.ANN_TITLE: "models/m.bin"}),
            b.desc(mt.OCI_LAYER_GZIP, gz(tar([("cfg/a.json", b"{}")])), {mt.ANN_TITLE: "cfg"}),
        ],
        artifact_type="application/vnd.example",
    )
    return materialize(store, m)


@pytest.fixture
def world_dir_unit() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp dirs are 0700), for setpriv'd users."""
    need.need_root("setpriv'd users")
    need.need_tool("setpriv")
    d = Path(tempfile.mkdtemp(prefix="imagevol-vol-", dir="/tmp"))
    os.chmod(d, 0o777)
    yield d
    for m in sorted((p for p in mountpoints() if p.startswith(str(d) + "/")), reverse=True):
        subprocess.run(["umount", "-l", m], check=False)
    subprocess.run(["chmod", "-R", "u+w", str(d)], check=False)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def cleanup():
    targets: list[tuple[Store, Path]] = []
    yield targets
    for store, target in targets:
        try:
            remove_volume(store, target)
        except (NotFoundError, ImagevolError):
            pass
        while mounted(target):  # never leave a mount behind, whatever happened
            subprocess.run(["umount", "-l", str(target)], check=False)


# -- sub paths -------------------------------------------------------------------------------------
def test_resolve_subpath(image: Snapshot) -> None:
    assert resolve_subpath(image.path, "data/sub", artifact=False, ref="r") == image.path / "data/sub"
    assert resolve_subpath(image.path, "/data//./sub/", artifact=False, ref="r") == image.path / "data/sub"
    assert resolve_subpath(image.path, "data/weights.bin", artifact=False, ref="r") == image.path / "data/weights.bin"
    with pytest.raises(ImagevolError) as e:
        resolve_subpath(image.path, "nope/x", artifact=False, ref="example.com/img:1")
    assert str(e.value) == 'sub path "nope/x" does not exist in image volume "example.com/img:1"'
    assert e.value.exit_code == 1
    with pytest.raises(ImagevolError) as e:
        resolve_subpath(image.path, "nope", artifact=True, ref="example.com/art:1")
    assert str(e.value) == 'sub path "nope" does not exist in OCI artifact volume "example.com/art:1"'
    with pytest.raises(ImagevolError, match="does not exist"):
        resolve_subpath(image.path, "data/weights.bin/deeper", artifact=False, ref="r")
    for sub in ("esc", "esc/passwd", "rel/sub"):  # symlinks are not followed, even inside
        with pytest.raises(ImagevolError, match=f'^sub path "{sub}" does not exist in image volume "r"$'):
            resolve_subpath(image.path, sub, artifact=False, ref="r")
    with pytest.raises(UsageError):
        resolve_subpath(image.path, "data/../..", artifact=False, ref="r")


# -- bind ------------------------------------------------------------------------------------------
@root_only
def test_bind_volume_is_read_only_and_executables_run(store: Store, image: Snapshot, tmp_path: Path, cleanup) -> None:
    target = tmp_path / "mnt" / "vol"
    cleanup.append((store, target))
    vol = create_volume(store, image, target, ref="example.com/img:1", mode="bind")
    assert vol.mode == "bind" and vol.mounted and vol.target == target and vol.subpath is None
    assert vol.snapshot_key == image.key and vol.digest == image.digest
    assert mounted(target)
    assert (target / "data/weights.bin").read_bytes() == b"w" * 1000
    with pytest.raises(OSError) as e:
        (target / "new").write_text("x")
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        os.open(target / "data/weights.bin", os.O_WRONLY)
    assert e.value.errno == errno.EROFS
    out = subprocess.run([str(target / "bin/hello")], capture_output=True, check=True, text=True)
    assert out.stdout == "hello from the volume\n"
    line = next(ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if ln.split()[4] == str(target))
    opts = line.split()[5].split(",")
    assert "ro" in opts and "nosuid" in opts and "nodev" in opts and "noexec" not in opts

    # recorded, with a lease so gc keeps the content
    (rec,) = store.meta.list_volumes()
    assert rec.id == vol.id and rec.target == str(target) and rec.mode == "bind" and rec.ref == "example.com/img:1"
    lease = store.meta.get_lease(f"volume:{vol.id}")
    assert lease is not None and lease.kind == "volume" and lease.roots == (image.digest,)

    removed = remove_volume(store, target)
    assert removed.id == vol.id and not removed.mounted
    assert not mounted(target)
    assert str(target) not in Path("/proc/self/mountinfo").read_text()
    assert not target.exists()  # created by imagevol, removed with the volume
    assert store.meta.list_volumes() == [] and store.meta.get_lease(f"volume:{vol.id}") is None


@root_only
def test_bind_is_idempotent_and_second_mount_is_fast(store: Store, image: Snapshot, tmp_path: Path, cleanup) -> None:
    target = tmp_path / "vol"
    cleanup.append((store, target))
    first = create_volume(store, image, target, ref="r:1")
    assert first.mode == "bind"  # auto as root
    again = create_volume(store, image, target, ref="r:1")
    assert again.id == first.id
    assert sum(1 for ln in Path("/proc/self/mountinfo").read_text().splitlines() if ln.split()[4] == str(target)) == 1
    with pytest.raises(ImagevolError, match="already holds"):
        create_volume(store, image, target, ref="other:2")

    other = tmp_path / "vol2"
    cleanup.append((store, other))
    t0 = time.monotonic()
    snap = materialize(store, _manifest_of(store, image))
    create_volume(store, snap, other, ref="r:1")
    assert time.monotonic() - t0 < 1.0
    assert not snap.created


def _manifest_of(store: Store, snap: Snapshot):
    from imagevol.manifest import parse_manifest

    return parse_manifest(store.read_blob(snap.digest, 1 << 20))


@root_only
def test_bind_subpath_dir_and_file(store: Store, artifact: Snapshot, image: Snapshot, tmp_path: Path, cleanup) -> None:
    d = tmp_path / "cfg"
    cleanup.append((store, d))
    vol = create_volume(store, artifact, d, ref="a:1", mode="bind", subpath="cfg")
    assert vol.subpath == "cfg" and tree(d) == {"a.json": "{}"}
    assert list_volumes(store)[0].subpath == "cfg"

    f = tmp_path / "deep" / "m.bin"
    cleanup.append((store, f))
    create_volume(store, artifact, f, ref="a:1", mode="bind", subpath="models/m.bin")
    assert f.read_bytes() == b"model"
    with pytest.raises(OSError):
        f.write_bytes(b"x")

    with pytest.raises(ImagevolError, match='sub path "nope" does not exist in OCI artifact volume "a:1"'):
        create_volume(store, artifact, tmp_path / "x", ref="a:1", mode="bind", subpath="nope")
    with pytest.raises(ImagevolError, match='sub path "esc" does not exist in image volume "i:1"'):
        create_volume(store, image, tmp_path / "y", ref="i:1", mode="bind", subpath="esc")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

    remove_volume(store, f)
    assert not f.exists() and not mounted(f)


def test_target_must_be_empty_directory(store: Store, image: Snapshot, tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    with pytest.raises(ImagevolError, match=f"target {full} is not empty"):
        create_volume(store, image, full, ref="r", mode="hardlink")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ImagevolError, match=f"target {afile} exists and is not a directory"):
        create_volume(store, image, afile, ref="r", mode="hardlink")
    with pytest.raises(UsageError):
        create_volume(store, image, tmp_path / "t", ref="r", mode="overlay")
    assert store.meta.list_volumes() == []


def test_remove_unknown_target(store: Store, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=str(tmp_path / "nothing")):
        remove_volume(store, tmp_path / "nothing")


# -- hardlink and copy -----------------------------------------------------------------------------
@root_only
def test_hardlink_mode_as_root_is_a_read_only_bind(store: Store, image: Snapshot, tmp_path: Path, cleanup) -> None:
    """`hardlink` never links into the store: as root it is a read-only bind; root cannot write,
    append or chmod through it (a hard link shares the snapshot's inode, and root ignores modes)."""
    target = tmp_path / "hl"
    cleanup.append((store, target))
    vol = create_volume(store, image, target, ref="r:1", mode="hardlink")
    assert vol.mode == "bind" and vol.mounted and mounted(target)
    assert tree(target) == tree(image.path)
    for attempt in (
        lambda: open(target / "data/weights.bin", "ab"),  # noqa: SIM115
        lambda: os.chmod(target / "data/weights.bin", 0o666),
        lambda: os.chown(target / "data/weights.bin", 1000, 1000),
        lambda: (target / "new").write_text("x"),
    ):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    assert (image.path / "data/weights.bin").read_bytes() == b"w" * 1000
    assert create_volume(store, image, target, ref="r:1", mode="hardlink").id == vol.id
    remove_volume(store, target)
    assert not target.exists() and not mounted(target)


def test_copy_volume_files_are_private_inodes(store: Store, artifact: Snapshot, tmp_path: Path) -> None:
    """A copy (what `hardlink` and `auto` make without root) shares no inode with the store: writing
    into it, as its owner may, changes neither the snapshot nor the verified blob."""
    target = tmp_path / "cp"
    create_volume(store, artifact, target, ref="a", mode="copy")
    blob = next(p for p in (store.root / "blobs" / "sha256").iterdir() if p.read_bytes() == b"model")
    snap_file = artifact.path / "models/m.bin"
    assert snap_file.stat().st_ino == blob.stat().st_ino  # the snapshot links the raw blob
    mine = target / "models/m.bin"
    assert mine.stat().st_ino not in (blob.stat().st_ino, snap_file.stat().st_ino)
    os.chmod(mine, 0o644)
    with open(mine, "ab") as f:
        f.write(b" changed")
    assert mine.read_bytes() == b"model changed"
    assert blob.read_bytes() == b"model" and snap_file.read_bytes() == b"model"
    remove_volume(store, target)


def test_copy_into_existing_empty_dir_restores_it(store: Store, artifact: Snapshot, tmp_path: Path) -> None:
    target = tmp_path / "existing"
    target.mkdir(mode=0o750)
    os.chmod(target, 0o750)
    create_volume(store, artifact, target, ref="a", mode="copy", subpath="models")
    assert tree(target) == {"m.bin": "model"}
    remove_volume(store, target)
    assert target.is_dir() and list(target.iterdir()) == [] and stat.S_IMODE(target.stat().st_mode) == 0o750


def test_copy_volume(store: Store, image: Snapshot, tmp_path: Path) -> None:
    target = tmp_path / "cp"
    create_volume(store, image, target, ref="r", mode="copy")
    assert tree(target) == tree(image.path)
    st = (target / "data/weights.bin").stat()
    assert st.st_ino != (image.path / "data/weights.bin").stat().st_ino
    assert stat.S_IMODE(st.st_mode) == 0o644  # the modes the layer declares
    assert stat.S_IMODE((target / "bin/hello").stat().st_mode) == 0o755
    remove_volume(store, target)
    assert not target.exists()


def test_reconcile_tree_volume_deleted_by_hand(store: Store, image: Snapshot, tmp_path: Path) -> None:
    from imagevol.materialize import force_rmtree

    target = tmp_path / "gone"
    vol = create_volume(store, image, target, ref="r", mode="copy")
    force_rmtree(target)
    (v,) = list_volumes(store)
    assert not v.mounted
    assert [x.id for x in reconcile(store)] == [vol.id]
    assert store.meta.list_volumes() == [] and store.meta.get_lease(f"volume:{vol.id}") is None


# -- reconciliation with mountinfo -----------------------------------------------------------------
@root_only
def test_list_volumes_after_manual_umount(store: Store, image: Snapshot, tmp_path: Path, cleanup) -> None:
    a, c = tmp_path / "a", tmp_path / "c"
    cleanup.extend([(store, a), (store, c)])
    va = create_volume(store, image, a, ref="r:a", mode="bind")
    vc = create_volume(store, image, c, ref="r:c", mode="bind")
    assert {v.id: v.mounted for v in list_volumes(store)} == {va.id: True, vc.id: True}
    subprocess.run(["umount", str(a)], check=True)
    assert {v.id: v.mounted for v in list_volumes(store)} == {va.id: False, vc.id: True}
    assert [v.id for v in reconcile(store)] == [va.id]
    assert [v.id for v in list_volumes(store)] == [vc.id]
    assert store.meta.get_lease(f"volume:{va.id}") is None
    assert store.meta.get_lease(f"volume:{vc.id}") is not None
    # a stale target can be mounted again
    again = create_volume(store, image, a, ref="r:a", mode="bind")
    assert again.mounted and mounted(a)


@root_only
def test_busy_volume_cannot_be_removed(store: Store, image: Snapshot, tmp_path: Path, cleanup) -> None:
    target = tmp_path / "busy"
    cleanup.append((store, target))
    create_volume(store, image, target, ref="r", mode="bind")
    proc = subprocess.Popen(["sleep", "30"], cwd=target)
    try:
        time.sleep(0.2)
        with pytest.raises(ImagevolError, match="busy"):
            remove_volume(store, target)
        assert mounted(target) and len(store.meta.list_volumes()) == 1
    finally:
        proc.kill()
        proc.wait()
    remove_volume(store, target)
    assert not mounted(target)


def test_sidecar_keeps_subpath(store: Store, artifact: Snapshot, tmp_path: Path) -> None:
    target = tmp_path / "s"
    vol = create_volume(store, artifact, target, ref="a", mode="copy", subpath="/cfg/")
    assert vol.subpath == "cfg"
    side = json.loads((store.root / "volumes" / f"{vol.id}.json").read_text())
    assert side["subpath"] == "cfg" and side["created_target"] is True
    remove_volume(store, target)
    assert not (store.root / "volumes" / f"{vol.id}.json").exists()


# -- without root: hardlink and auto never link into the store ----------------------------------------
_AS_USER = r"""
import json, os, sys
from pathlib import Path
from imagevol import mediatypes as mt
from imagevol.materialize import materialize
from imagevol.store import Store
from imagevol.volume import create_volume, remove_volume
from tests.unit.test_materialize import Builder

base = Path(sys.argv[1])
store = Store(base / "store")
b = Builder(store)
m = b.manifest([b.desc("application/x", b"model", {mt.ANN_TITLE: "m.bin"})], artifact_type="application/vnd.example")
snap = materialize(store, m)
blob = store.blob_path(m.layers[0].digest)
out = {}
for mode in ("hardlink", "auto"):
    warnings = []
    target = base / mode
    vol = create_volume(store, snap, target, ref="a:1", mode=mode, warn=warnings.append)
    f = target / "m.bin"
    shared = f.stat().st_ino in (blob.stat().st_ino, (snap.path / "m.bin").stat().st_ino)
    os.chmod(f, 0o644)  # the owner of the file may
    with open(f, "ab") as w:
        w.write(b" changed")
    out[mode] = {"mode": vol.mode, "shared": shared, "warnings": warnings, "blob": blob.read_bytes().decode()}
    remove_volume(store, target)
print(json.dumps(out))
"""


def test_without_root_hardlink_and_auto_make_private_copies(world_dir_unit: Path) -> None:
    """Run as uid 1000 (setpriv): `--mode hardlink` used to hard-link the store's blob into the
    target, so the owner's `chmod u+w` and a write changed the verified blob. Now a copy (a
    reflink where the file system allows), with a warning for `hardlink`."""
    r = subprocess.run(
        [
            "setpriv",
            "--reuid=1000",
            "--regid=1000",
            "--clear-groups",
            sys.executable,
            "-c",
            _AS_USER,
            str(world_dir_unit),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(world_dir_unit),
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(REPO)])},
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for mode in ("hardlink", "auto"):
        assert out[mode]["mode"] == "copy" and out[mode]["shared"] is False, out
        assert out[mode]["blob"] == "model", "the verified blob changed through a volume"
    (w,) = out["hardlink"]["warnings"]  # ext4 here: no reflinks, a copy
    assert "--mode hardlink made a copy" in w
    assert out["auto"]["warnings"] == []


# -- sub paths resolved inside the snapshot only --------------------------------------------------
@pytest.mark.parametrize("kernel", ["openat2", "no-openat2"])
def test_subpath_errors_tell_nothing_about_the_host(store: Store, tmp_path: Path, monkeypatch, kernel: str) -> None:
    """`host -> /` in the image: sub paths through it, missing ones, ones under a file and a final
    symlink all get the same error (only the sub path differs), with openat2 and with the
    per-component O_NOFOLLOW walk of kernels without it."""
    import imagevol.volume.subpath as volume

    if kernel == "no-openat2":
        monkeypatch.setattr(volume, "_openat2", lambda *a: None)
    else:
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        try:
            have = volume._openat2(fd, "etc", os.O_PATH | os.O_CLOEXEC, volume.RESOLVE_BENEATH)
        finally:
            os.close(fd)
        assert have is not None, "this kernel has openat2 (5.6+)"
        os.close(have)
    b = Builder(store)
    layer = tar([("host", ("symlink", "/")), ("inner", ("symlink", "data")), ("data", None), ("data/f", b"f")])
    snap = materialize(store, b.image([layer]))
    texts = set()
    for sub in ("host/etc/shadow", "host/etc/missing", "host/etc", "host", "inner/f", "inner", "data/f/x", "nope"):
        with pytest.raises(ImagevolError) as e:
            resolve_subpath(snap.path, sub, artifact=False, ref="r")
        assert e.value.exit_code == 1
        texts.add((str(e.value).replace(f'"{sub}"', '"X"'), e.value.hint))
    assert texts == {
        (
            'sub path "X" does not exist in image volume "r"',
            "a sub path names a file or directory inside the volume, reached without symbolic links",
        )
    }
    assert resolve_subpath(snap.path, "data/f", artifact=False, ref="r") == snap.path / "data/f"
    assert resolve_subpath(snap.path, "data", artifact=False, ref="r") == snap.path / "data"


# -- removal goes through descriptors and removes only what imagevol made -----------------------------
def test_remove_refuses_a_target_that_is_not_the_one_made(store: Store, image: Snapshot, tmp_path: Path) -> None:
    """The volume's directory was moved away and another one put at its path: removing the volume
    used to empty that one. Now the recorded device and inode do not match: refused, untouched."""
    target = tmp_path / "v"
    create_volume(store, image, target, ref="r", mode="copy")
    os.rename(target, tmp_path / "moved")
    target.mkdir()
    (target / "keep.txt").write_text("someone else's")
    with pytest.raises(ImagevolError, match="not the one imagevol made") as e:
        remove_volume(store, target)
    assert e.value.hint and "nothing was changed" in str(e.value)
    assert (target / "keep.txt").read_text() == "someone else's"
    assert len(store.meta.list_volumes()) == 1
    force_rmtree(target)
    os.rename(tmp_path / "moved", target)
    remove_volume(store, target)
    assert not target.exists() and store.meta.list_volumes() == []


def test_abandoned_volume_is_not_undone_through_a_swapped_parent(store: Store, image: Snapshot, tmp_path: Path) -> None:
    """A volume whose creator died is undone by the next listing: that went through the recorded
    path, so a parent swapped for a symlink led it to empty another directory. Now the parent is
    opened without following symlinks: nothing outside is touched (the record is dropped)."""
    parent = tmp_path / "models"
    target = parent / "data"
    vol = create_volume(store, image, target, ref="r", mode="copy")
    side_path = store.root / "volumes" / f"{vol.id}.json"
    side = json.loads(side_path.read_text())
    side.update(state="mounting", pid=2**22 + 12345)  # no such process
    side_path.write_text(json.dumps(side))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    (elsewhere / "data" / "precious.db").write_text("precious")
    os.rename(parent, tmp_path / "models.old")
    os.symlink(elsewhere, parent)
    assert list_volumes(store) == []
    assert (elsewhere / "data" / "precious.db").read_text() == "precious"
    assert (tmp_path / "models.old" / "data" / "data" / "weights.bin").exists()  # left in place


# -- reflinks where the file system has them ---------------------------------------------------------
@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    """A loop-mounted XFS with reflink=1 (root, mkfs.xfs from xfsprogs)."""
    need.need_root("a loop-mounted XFS")
    need.need_tool("mkfs.xfs")
    image = tmp_path / "xfs.img"
    with open(image, "wb") as f:
        f.truncate(512 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    mnt = tmp_path / "xfs"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_copies_and_exports_are_reflinks_on_xfs(xfs: Path) -> None:
    """On a file system with reflinks, a copy volume and an exported blob are clones: inodes of
    their own (a write stays private) that take no data blocks."""
    from imagevol.sinks.layout import LayoutSink

    store = Store(xfs / "store")
    data = os.urandom(64 << 20)
    b = Builder(store)
    m = b.manifest([b.desc("application/x", data, {mt.ANN_TITLE: "w.bin"})], artifact_type="application/vnd.example")
    snap = materialize(store, m)
    blob = store.blob_path(m.layers[0].digest)

    def used() -> int:
        os.sync()
        st = os.statvfs(xfs)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    before = used()
    create_volume(store, snap, xfs / "vol", ref="a", mode="copy")
    LayoutSink(xfs / "layout", tag="t").put_blob_file(blob, m.layers[0].digest, len(data), mode="clone")
    assert used() - before < 8 << 20  # two 64 MiB files, no data blocks of their own
    for f in (xfs / "vol" / "w.bin", xfs / "layout" / "blobs" / "sha256" / blob.name):
        assert f.stat().st_ino != blob.stat().st_ino and f.read_bytes() == data
        os.chmod(f, 0o644)
        with open(f, "r+b") as w:
            w.write(b"private")
    assert blob.read_bytes() == data and (snap.path / "w.bin").read_bytes() == data
    remove_volume(store, xfs / "vol")


@root_only
def test_a_bind_volume_moved_with_its_parent_is_not_forgotten(
    store: Store, image: Snapshot, tmp_path: Path, cleanup
) -> None:
    """Whoever owns a parent of a bind volume can rename it: the mount moves along. Listings and
    `reconcile` used to find nothing at the recorded path and drop the record (a live mount nobody
    knew), and removal rmdir'ed whatever was at the path. Now the mount is recognized by the id
    and root recorded at mount time: still listed, kept by reconcile, removal refused."""
    parent = tmp_path / "models"
    target = parent / "data"
    cleanup.append((store, target))
    vol = create_volume(store, image, target, ref="r", mode="bind")
    os.rename(parent, tmp_path / "models.old")
    moved = tmp_path / "models.old" / "data"
    cleanup.append((store, moved))
    assert mounted(moved) and not mounted(target)
    assert [(v.id, v.mounted) for v in list_volumes(store)] == [(vol.id, True)]
    assert reconcile(store) == [] and store.meta.get_volume(vol.id) is not None
    target.mkdir(parents=True)  # something else at the recorded path
    with pytest.raises(ImagevolError, match="cannot be reached safely"):
        remove_volume(store, target)
    assert target.is_dir() and mounted(moved)
    os.rmdir(target)
    os.rmdir(parent)
    os.rename(tmp_path / "models.old", parent)
    remove_volume(store, target)
    assert not mounted(target) and not target.exists() and store.meta.list_volumes() == []


def test_target_parents_are_created_without_following_symlinks(tmp_path: Path) -> None:
    """Mount-time creation of a target's parents walks from / with O_NOFOLLOW: a component that
    became a symlink after the target was canonicalized (a race with its owner) is refused, and
    nothing is created behind it (`Path.mkdir(parents=True)` followed it)."""
    from imagevol.volume.subpath import _open_parent

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(elsewhere)
    with pytest.raises(ImagevolError, match="is a symbolic link or not a directory"):
        _open_parent(tmp_path / "link" / "a" / "target", create=True)
    assert list(elsewhere.iterdir()) == []
    fd = _open_parent(tmp_path / "new" / "a" / "target", create=True)
    try:
        assert os.fstat(fd).st_ino == (tmp_path / "new" / "a").stat().st_ino
    finally:
        os.close(fd)


def test_gc_reclaims_snapshots_built_the_old_way(store: Store, artifact: Snapshot) -> None:
    """Snapshots keyed by the bare manifest hex were sealed the old way (write bits stripped); no
    mount reuses them, so gc reclaims them even while their manifest is kept by a reference."""
    from imagevol.compose import gc

    m = _manifest_of(store, artifact)
    store.meta.set_ref("example.com/a:1", m.digest, media_type=m.media_type)
    legacy = store.root / "snapshots" / m.digest.hex
    legacy.mkdir()
    (legacy / "old.txt").write_text("sealed the old way")
    os.chmod(legacy / "old.txt", 0o444)
    os.chmod(legacy, 0o555)
    store.meta.set_snapshot(m.digest.hex, str(legacy), "ready", digest=m.digest)
    res = gc(root=store)
    assert res.removed_snapshots == [m.digest.hex]
    assert not legacy.exists() and artifact.path.is_dir()
    assert store.meta.get_snapshot(artifact.key) is not None and store.meta.get_snapshot(m.digest.hex) is None


def test_copy_of_a_file_sub_path(store: Store, image: Snapshot, tmp_path: Path) -> None:
    target = tmp_path / "deep" / "hello"
    vol = create_volume(store, image, target, ref="r", mode="copy", subpath="bin/hello")
    assert vol.mode == "copy" and target.read_bytes() == (image.path / "bin/hello").read_bytes()
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert target.stat().st_ino != (image.path / "bin/hello").stat().st_ino
    remove_volume(store, target)
    assert not target.exists() and (tmp_path / "deep").is_dir()
