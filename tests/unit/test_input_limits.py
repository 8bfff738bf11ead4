"""Hostile tar layers (issue "Trust the store", item 11): PAX numbers of thousands of digits,
more hard links to one file than the file system allows, inode bombs (a layer of hundreds of
thousands of empty entries) and the memory the applier keeps per entry.

Every refusal is a ContentRefusedError (exit code 4) with a message naming what was wrong.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

import imagevol.unpack.applier as applier_mod
import imagevol.unpack.paths as paths_mod
from imagevol.errors import ContentRefusedError, LimitExceededError, UnsafeContentError
from imagevol.unpack.applier import DEFAULT_MAX_ENTRIES, ApplyOptions, apply_layer
from tests.support.tars import hardlinks_gz, many_entries_gz

MTIME = 1_600_000_000


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def F(name: str, data: bytes = b"", pax: dict[str, str] | None = None) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
    if pax:
        ti.pax_headers = dict(pax)
    return ti, data


def D(name: str, mtime: int = MTIME) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, mtime
    return ti, None


def FIFO(name: str) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = tarfile.FIFOTYPE, 0o644, MTIME
    return ti, None


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of its own: creating 100,000 files on the shared disk takes minutes on this machine."""
    if os.geteuid() != 0:
        if os.environ.get("IMAGEVOL_ALLOW_SKIP") == "1":
            pytest.skip("needs root (mounts a tmpfs)")
        pytest.fail("needs root (mounts a tmpfs); IMAGEVOL_ALLOW_SKIP=1 skips", pytrace=False)
    d = tmp_path / "tmpfs"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,nr_inodes=400k", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=True)


# --------------------------------------------------------------------------- PAX numbers


@pytest.mark.parametrize("key", ["size", "uid", "gid", "mtime"])
def test_pax_number_of_5000_digits_refused(root, key) -> None:
    """Found by this issue: int() of 5000 digits raised ValueError ("unexpected", exit 1)."""
    layer = _tar([F("a", b"x", pax={key: "1" * 5000})])
    with pytest.raises(ContentRefusedError) as ei:
        apply_layer(root, io.BytesIO(layer), options=ApplyOptions(preserve_owner=True))
    assert f"PAX {key} has 5000 " in ei.value.message
    assert ei.value.exit_code == 4


def test_pax_numbers_with_leading_zeros_still_read(root) -> None:
    layer = _tar([F("a", b"x", pax={"uid": "0" * 28 + "1000", "mtime": "1700000000.123456789"})])
    apply_layer(root, io.BytesIO(layer), options=ApplyOptions(preserve_owner=True))
    st = (root / "a").stat()
    assert st.st_uid == 1000
    assert st.st_mtime_ns == 1_700_000_000_123_456_789


# --------------------------------------------------------------------------- hard links


def _fs_type(path: Path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True).stdout


def test_more_hard_links_than_the_file_system_allows_refused(root) -> None:
    """Found by this issue: 70,000 links to one file ended in `unexpected OSError: Too many links`
    (exit 1). ext4 allows 65,000 links per inode: the layer is refused as malformed (exit 4)."""
    fs = _fs_type(root).strip()
    if fs != "ext2/ext3":  # how stat(1) names ext4
        pytest.fail(f"this test needs ext4 (a link limit of 65,000) under {root}, not {fs}", pytrace=False)
    with pytest.raises(UnsafeContentError) as ei:
        apply_layer(root, io.BytesIO(hardlinks_gz(70_000)))
    assert "too many links" in ei.value.message
    assert "'l0064999'" in ei.value.message  # the file and 64,999 links: 65,000
    assert ei.value.exit_code == 4


# --------------------------------------------------------------------------- entry count


def test_entry_limit_refuses_with_a_hint(root) -> None:
    layer = many_entries_gz(150, per_dir=1000)
    with pytest.raises(LimitExceededError) as ei:
        apply_layer(root, io.BytesIO(layer), options=ApplyOptions(max_entries=100))
    assert ei.value.message == "layer holds more than 100 entries (at 'd000000/f000099')"
    assert "--max-entries" in (ei.value.hint or "")
    assert ei.value.exit_code == 4
    stats = apply_layer(root, io.BytesIO(layer), options=ApplyOptions(max_entries=150))
    assert stats.files == 149 and stats.dirs == 1
    assert ApplyOptions().max_entries == DEFAULT_MAX_ENTRIES == 1_000_000
    assert ApplyOptions(max_entries=None).max_entries is None


# --------------------------------------------------------------------------- memory per entry


def _peak(root: Path, n: int) -> int:
    layer = many_entries_gz(n)
    tracemalloc.start()
    try:
        stats = apply_layer(root, io.BytesIO(layer))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats.files + stats.dirs == n
    return peak


def test_memory_flat_in_the_number_of_entries(tmpfs) -> None:
    """Found by this issue: the applier kept every path it wrote (and every ancestor) in memory,
    ~150 bytes per entry: 15.7 MB of Python objects for 100,000 entries against 1.5 MB for 10,000
    (ratio 10.6). Now the state moves to a database file past SPILL_AT items: 2.6 MB (ratio 1.8)."""
    (tmpfs / "a").mkdir()
    (tmpfs / "b").mkdir()
    small = _peak(tmpfs / "a", 10_000)
    large = _peak(tmpfs / "b", 100_000)
    assert large < 3 * small, (small, large)


def _image_of(store, layer_gz: bytes):
    """A one-layer image manifest in `store` for the gzip layer `layer_gz`."""
    import gzip
    import hashlib
    import json

    from imagevol import mediatypes as mt
    from imagevol.manifest import parse_manifest

    def desc(media_type: str, data: bytes) -> dict:
        return {"mediaType": media_type, "digest": str(store.put_bytes(data)), "size": len(data)}

    diff_id = "sha256:" + hashlib.sha256(gzip.decompress(layer_gz)).hexdigest()
    cfg = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": desc(mt.OCI_CONFIG, json.dumps(cfg).encode()),
        "layers": [desc(mt.OCI_LAYER_GZIP, layer_gz)],
    }
    raw = json.dumps(doc).encode()
    store.put_bytes(raw)
    return parse_manifest(raw)


def _snapshot_peaks(root: Path, n: int) -> tuple[int, int]:
    """tracemalloc peaks of materializing an image of `n` empty entries (its record included) and
    of checking the snapshot against its record."""
    from imagevol.materialize import check_snapshots, materialize
    from imagevol.store import Store

    store = Store(root / "store")
    m = _image_of(store, many_entries_gz(n))
    tracemalloc.start()
    try:
        snap = materialize(store, m)
        build = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        res = check_snapshots(store)
        check = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert snap.files == n - (n + 1000) // 1001 and res.checked == 1 and res.damaged == {}, res
    return build, check


def test_snapshot_record_memory_flat_in_the_number_of_entries(tmpfs) -> None:
    """The snapshot record (fsck's reference) was built as a list of every entry, with a digest
    per inode kept from extraction, and checked by loading it whole: ~300 bytes per entry, so the
    inode bomb's memory came back through the record. Now the record is streamed to its file and
    read beside the tree in one order; only files of 1 MiB or more are hashed as written."""
    (tmpfs / "a").mkdir()
    (tmpfs / "b").mkdir()
    small = _snapshot_peaks(tmpfs / "a", 10_000)
    large = _snapshot_peaks(tmpfs / "b", 100_000)
    assert large[0] < 3 * small[0], ("materialize", small, large)
    assert large[1] < 3 * small[1], ("check", small, large)


def _tree(root: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            kind = "d" if p.is_dir() else "f"
            out[str(p.relative_to(root))] = (kind, st.st_mtime_ns, st.st_mode, p.read_bytes() if kind == "f" else b"")
    return out


def _lower(root: Path) -> None:
    for d in ("keep", "gone", "opq", "opq/sub"):
        (root / d).mkdir()
    for f in ("keep/old", "gone/x", "opq/lower", "opq/sub/lower", "top"):
        (root / f).write_bytes(b"lower")
    for d in ("keep", "gone", "opq", "opq/sub"):
        os.utime(root / d, ns=(1, 1))


WHITEOUT_LAYER = [
    F("keep/new", b"new"),  # a directory changed without an entry of its own keeps its times
    F("keep/.wh.old"),
    F("same", b"same"),
    F(".wh.same"),  # a file and its whiteout in one layer: the file stays
    F("opq/mine", b"mine"),
    F("opq/.wh..wh..opq"),  # an opaque marker after a child keeps that child
    F(".wh.gone"),
    D("d", mtime=1_234_567_890),
    F("d/f", b"f"),
    F(".wh.top"),
]


@pytest.mark.parametrize("spill_at", [1, 3, 7])
def test_state_moved_to_disk_gives_the_same_tree(tmp_path, monkeypatch, spill_at) -> None:
    """The database past SPILL_AT items answers as the dicts did: whiteouts, opaque markers, kept
    directory times and fixups give the same tree, and the database file is never in it."""
    layer = _tar(WHITEOUT_LAYER)
    expected_root = tmp_path / "mem"
    expected_root.mkdir()
    _lower(expected_root)
    apply_layer(expected_root, io.BytesIO(layer))
    monkeypatch.setattr(paths_mod, "SPILL_AT", spill_at)
    root = tmp_path / "disk"
    root.mkdir()
    _lower(root)
    apply_layer(root, io.BytesIO(layer))
    assert _tree(root) == _tree(expected_root)
    assert sorted(os.listdir(root / "opq")) == ["mine"]
    assert not (root / "gone").exists() and (root / "same").exists()
    assert (root / "d").stat().st_mtime_ns == 1_234_567_890 * 10**9
    assert (root / "keep").stat().st_mtime_ns == 1


def test_state_moved_to_disk_keeps_the_root_times(tmp_path, monkeypatch) -> None:
    """The database file is created in the root and unlinked at once: the root's mtime, which a
    layer that writes only below existing directories leaves alone, must not change."""
    monkeypatch.setattr(paths_mod, "SPILL_AT", 1)
    (tmp_path / "usr").mkdir()
    os.utime(tmp_path, ns=(5, 7))
    apply_layer(tmp_path, io.BytesIO(_tar([F(f"usr/f{i}") for i in range(10)])))
    assert sorted(os.listdir(tmp_path)) == ["usr"]
    assert tmp_path.stat().st_mtime_ns == 7


def test_state_moved_to_disk_refuses_duplicates(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(paths_mod, "SPILL_AT", 2)
    layer = _tar([F("a"), F("b"), F("c"), F("a", b"again")])
    with pytest.raises(UnsafeContentError, match="writes this path twice"):
        apply_layer(tmp_path, io.BytesIO(layer), options=ApplyOptions(duplicates="refuse"))
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c"]


def test_warnings_are_capped(root) -> None:
    """A layer of 1,500 FIFOs (skipped by default) kept and printed 1,500 warnings: now the first
    MAX_WARNINGS and a count."""
    seen: list[str] = []
    stats = apply_layer(root, io.BytesIO(_tar([FIFO(f"p{i}") for i in range(1500)])), warn=seen.append)
    assert len(stats.skipped) == 1001 == len(seen)
    assert stats.skipped[-1] == "500 more warnings not shown (only the first 1000 are)"


# --------------------------------------------------------------------------- the store's own blobs


def test_store_blob_that_is_a_fifo_refused_without_blocking(tmp_path) -> None:
    """The sibling of the layout FIFO in the store: `Store.open_blob` opened a FIFO put in place of
    a blob without O_NONBLOCK and blocked for ever. Run in a child with a timeout (a hang fails the
    test instead of hanging it): now a StoreError naming the blob."""
    code = f"""
import os
from imagevol.errors import StoreError
from imagevol.store import Store
s = Store({str(tmp_path / "store")!r})
s.ensure()
d = s.put_bytes(b"hello")
p = s.blob_path(d)
os.chmod(p.parent, 0o700)
os.unlink(p)
os.mkfifo(p)
try:
    s.read_blob(d, 100)
except StoreError as e:
    print(e.message)
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(applier_mod.__file__).parents[2]), os.getcwd()]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20, env=env)
    assert r.returncode == 0, r.stderr
    assert "in the store is not a regular file (mode 10" in r.stdout, r.stdout
