"""Ingest: range math, resumable writes across SIGKILL, one writer per digest across processes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from imagevol.digest import Digest, digest_bytes
from imagevol.errors import DigestMismatchError, InvalidDigestError, StoreError
from imagevol.store import Ingest, Store, merge_ranges, missing_ranges


def _blobs(store: Store) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(store.root / "blobs"):
        out.extend(os.path.join(dirpath, f) for f in files)
    return sorted(out)


def _ingest_entries(store: Store) -> list[str]:
    try:
        return sorted(os.listdir(store.root / "ingest"))
    except FileNotFoundError:
        return []


# -- range math ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ranges", "merged"),
    [
        ([], []),
        ([(0, 0)], []),
        ([(5, 3)], []),
        ([(0, 10)], [(0, 10)]),
        ([(10, 20), (0, 10)], [(0, 20)]),
        ([(0, 5), (6, 8)], [(0, 5), (6, 8)]),
        ([(0, 5), (3, 8), (7, 9)], [(0, 9)]),
        ([(4, 6), (0, 10)], [(0, 10)]),
        ([(0, 1), (0, 1)], [(0, 1)]),
    ],
)
def test_merge_ranges(ranges, merged):
    assert merge_ranges(ranges) == merged


@pytest.mark.parametrize(
    ("size", "completed", "part", "missing"),
    [
        (0, [], 4, []),
        (10, [], 4, [(0, 4), (4, 8), (8, 10)]),
        (10, [], 10, [(0, 10)]),
        (10, [], 100, [(0, 10)]),
        (10, [(0, 10)], 3, []),
        (10, [(0, 4)], 4, [(4, 8), (8, 10)]),
        (10, [(6, 10)], 4, [(0, 4), (4, 6)]),
        (10, [(2, 4), (6, 8)], 100, [(0, 2), (4, 6), (8, 10)]),
        (10, [(2, 4), (6, 8)], 1, [(0, 1), (1, 2), (4, 5), (5, 6), (8, 9), (9, 10)]),
        (10, [(4, 6), (0, 2)], 3, [(2, 4), (6, 9), (9, 10)]),
        (10, [(0, 3), (3, 10)], 2, []),
        (10, [(0, 20)], 2, []),
        (1, [], 1, [(0, 1)]),
    ],
)
def test_missing_ranges(size, completed, part, missing):
    assert missing_ranges(size, completed, part) == missing
    # the parts and the completed ranges tile [0, size) exactly
    clipped = [(max(s, 0), min(e, size)) for s, e in completed]
    assert merge_ranges([*clipped, *missing]) == ([(0, size)] if size else [])
    assert all(e - s <= part for s, e in missing)


@pytest.mark.parametrize("part", [0, -1])
def test_missing_ranges_rejects_bad_part_size(part):
    with pytest.raises(ValueError):
        missing_ranges(10, [], part)


# -- basic ingest ----------------------------------------------------------------------------------
def test_ingest_out_of_order_parts_then_commit(tmp_path):
    store = Store(tmp_path / "store")
    data = os.urandom(300_001)
    d = digest_bytes(data)
    with store.ingest(d, len(data)) as ing:
        assert isinstance(ing, Ingest) and not ing.already_present and not ing.resumed
        assert ing.completed_ranges() == []
        parts = ing.missing_ranges(100_000)
        assert parts == [(0, 100_000), (100_000, 200_000), (200_000, 300_000), (300_000, 300_001)]
        for s, e in reversed(parts):
            ing.write_at(s, memoryview(data)[s:e])
            ing.mark_complete(s, e)
        assert ing.completed_ranges() == [(0, len(data))]
        assert ing.is_complete and ing.sequential_prefix() == len(data)
        path = ing.commit()
    assert path == store.blob_path(d) and path.read_bytes() == data
    assert (path.stat().st_mode & 0o777) == 0o444
    assert store.has_blob(d, len(data)) and not store.has_blob(d, len(data) + 1)
    assert _ingest_entries(store) == []


def test_parallel_ranged_writes_from_threads(tmp_path):
    store = Store(tmp_path)
    data = os.urandom(1 << 20)
    d = digest_bytes(data)
    with store.ingest(d, len(data)) as ing:

        def fetch(r):
            s, e = r
            ing.write_at(s, data[s:e])
            ing.mark_complete(s, e)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(fetch, ing.missing_ranges(37_000)))
        assert ing.completed_ranges() == [(0, len(data))]
        meta = json.loads((ing.dir / "meta.json").read_text())
        assert meta["ranges"] == [[0, len(data)]] and meta["digest"] == d and meta["size"] == len(data)
        ing.commit()
    assert store.open_blob(d).read() == data


def test_empty_blob(tmp_path):
    store = Store(tmp_path)
    d = digest_bytes(b"")
    with store.ingest(d, 0) as ing:
        assert ing.missing_ranges(10) == []
        assert ing.is_complete
        ing.commit()
    assert store.has_blob(d, 0)


def test_commit_refuses_wrong_bytes_and_discards(tmp_path):
    store = Store(tmp_path)
    data = b"the right bytes" * 1000
    d = digest_bytes(data)
    with store.ingest(d, len(data)) as ing:
        ing.write_at(0, data[:-1] + b"X")
        ing.mark_complete(0, len(data))
        with pytest.raises(DigestMismatchError):
            ing.commit()
    assert _blobs(store) == []
    assert _ingest_entries(store) == []
    assert not store.has_blob(d)
    # a fresh attempt starts from nothing
    with store.ingest(d, len(data)) as ing:
        assert ing.completed_ranges() == [] and not ing.resumed


def test_commit_with_verified_digest_skips_rehash(tmp_path, monkeypatch):
    store = Store(tmp_path)
    data = os.urandom(5000)
    d = digest_bytes(data)

    def boom(self, fd):
        raise AssertionError("must not re-read the data")

    monkeypatch.setattr(Ingest, "_hash_file", boom)
    with store.ingest(d, len(data)) as ing:
        ing.write_at(0, data)
        ing.mark_complete(0, len(data))
        ing.commit(verified_digest=d)
    assert store.read_blob(d, 10_000) == data


def test_commit_with_other_verified_digest_is_refused(tmp_path):
    store = Store(tmp_path)
    data = os.urandom(5000)
    d = digest_bytes(data)
    with store.ingest(d, len(data)) as ing:
        ing.write_at(0, data)
        with pytest.raises(DigestMismatchError):
            ing.commit(verified_digest=digest_bytes(b"other"))
    assert _blobs(store) == [] and _ingest_entries(store) == []


def test_abort_discards(tmp_path):
    store = Store(tmp_path)
    data = os.urandom(1000)
    d = digest_bytes(data)
    ing = store.ingest(d, len(data))
    ing.write_at(0, data[:500])
    ing.mark_complete(0, 500)
    ing.abort()
    assert _ingest_entries(store) == []
    with pytest.raises(StoreError):
        ing.write_at(0, b"x")
    with store.ingest(d, len(data)) as again:
        assert again.completed_ranges() == []


def test_write_bounds(tmp_path):
    store = Store(tmp_path)
    d = digest_bytes(b"0123456789")
    with store.ingest(d, 10) as ing:
        with pytest.raises(ValueError):
            ing.write_at(5, b"123456")
        with pytest.raises(ValueError):
            ing.write_at(-1, b"1")
        with pytest.raises(ValueError):
            ing.mark_complete(5, 11)
        with pytest.raises(ValueError):
            ing.mark_complete(6, 5)
        ing.write_at(4, b"456789")
        ing.abort()


def test_exception_inside_with_keeps_progress(tmp_path):
    store = Store(tmp_path)
    data = os.urandom(4000)
    d = digest_bytes(data)
    with pytest.raises(RuntimeError), store.ingest(d, len(data)) as ing:
        ing.write_at(0, data[:1000])
        ing.mark_complete(0, 1000)
        raise RuntimeError("network went away")
    with store.ingest(d, len(data)) as ing:
        assert ing.resumed and ing.completed_ranges() == [(0, 1000)]
        assert ing.sequential_prefix() == 1000


def test_resume_verifier_hashes_prefix_once(tmp_path):
    store = Store(tmp_path)
    data = os.urandom(3 * (1 << 20) + 17)
    d = digest_bytes(data)
    with store.ingest(d, len(data)) as ing:
        ing.write_at(0, data[:2_500_000])
        ing.mark_complete(0, 2_500_000)
        ing.write_at(2_600_000, data[2_600_000:2_700_000])
        ing.mark_complete(2_600_000, 2_700_000)
    with store.ingest(d, len(data)) as ing:
        v, offset = ing.resume_verifier()
        assert offset == ing.sequential_prefix() == 2_500_000
        rest = data[offset:]
        ing.write_at(offset, rest)
        v.update(rest)
        ing.mark_complete(offset, len(data))
        ing.commit(verified_digest=v.digest())
    assert store.has_blob(d, len(data))


def test_changed_size_resets_progress(tmp_path):
    store = Store(tmp_path)
    data = os.urandom(1000)
    d = digest_bytes(data)
    with store.ingest(d, 2000) as ing:  # a descriptor that lied about the size
        ing.write_at(0, data)
        ing.mark_complete(0, 1000)
    with store.ingest(d, len(data)) as ing:
        assert ing.completed_ranges() == [] and not ing.resumed
        assert os.path.getsize(ing.data_path) == len(data)
        ing.write_at(0, data)
        ing.commit()
    assert store.has_blob(d, 1000)


def test_corrupt_meta_json_restarts(tmp_path):
    store = Store(tmp_path)
    data = os.urandom(1000)
    d = digest_bytes(data)
    with store.ingest(d, len(data)) as ing:
        ing.write_at(0, data[:10])
        ing.mark_complete(0, 10)
        meta_path = ing.meta_path
    meta_path.write_text("{not json")
    with store.ingest(d, len(data)) as ing:
        assert ing.completed_ranges() == []


def test_ingest_dir_is_named_by_hash_of_key(tmp_path):
    store = Store(tmp_path)
    d = digest_bytes(b"abc")
    with store.ingest(d, 3) as ing:
        assert ing.dir == store.root / "ingest" / hashlib.sha256(str(d).encode()).hexdigest()
        assert sorted(os.listdir(ing.dir)) == ["data", "lock", "meta.json"]
        ing.abort()


def test_nonblocking_ingest_when_busy(tmp_path):
    store = Store(tmp_path)
    d = digest_bytes(b"abc")
    with store.ingest(d, 3), pytest.raises(StoreError, match="another process"):
        store.ingest(d, 3, blocking=False)


def test_ingest_of_present_blob(tmp_path):
    store = Store(tmp_path)
    d = store.put_bytes(b"abc")
    with store.ingest(d, 3) as ing:
        assert ing.already_present
        assert ing.missing_ranges(1) == []
        with pytest.raises(StoreError):
            ing.write_at(0, b"a")
        assert ing.commit() == store.blob_path(d)
    assert _ingest_entries(store) == []


@pytest.mark.parametrize("bad", ["sha256:../../x", "sha256:" + "A" * 64, "../../etc/passwd", "sha256:/abs"])
def test_ingest_refuses_bad_digest_before_any_path(tmp_path, bad):
    store = Store(tmp_path / "store")
    with pytest.raises(InvalidDigestError):
        store.ingest(bad, 1)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", [-1, 1.5, True, "10"])
def test_ingest_refuses_bad_size(tmp_path, size):
    with pytest.raises(StoreError):
        Store(tmp_path).ingest(digest_bytes(b"x"), size)  # type: ignore[arg-type]


# -- crash and concurrency across processes --------------------------------------------------------
_CRASHING_WRITER = r"""
import os, signal, sys
from imagevol.digest import Digest
from imagevol.store import Store
root, digest, part, datafile = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
data = open(datafile, "rb").read()
ing = Store(root).ingest(Digest(digest), len(data))
for start in (0, 2 * part):
    ing.write_at(start, data[start:start + part])
    ing.mark_complete(start, start + part)
ing.write_at(part, b"\xff" * part)   # written, never marked complete: must not be trusted
sys.stdout.write("about to die\n"); sys.stdout.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_resume_after_sigkill(tmp_path):
    root = tmp_path / "store"
    part = 64 * 1024
    data = os.urandom(3 * part + 1234)
    d = digest_bytes(data)
    datafile = tmp_path / "payload"
    datafile.write_bytes(data)
    proc = subprocess.run(
        [sys.executable, "-c", _CRASHING_WRITER, str(root), d, str(part), str(datafile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout == "about to die\n"

    store = Store(root)
    assert not store.has_blob(d)
    assert _blobs(store) == []
    # the dead writer's lock was released by the kernel: this does not block
    with store.ingest(d, len(data), blocking=False) as ing:
        assert ing.resumed
        assert ing.completed_ranges() == [(0, part), (2 * part, 3 * part)]
        assert ing.sequential_prefix() == part
        missing = ing.missing_ranges(part)
        assert missing == [(part, 2 * part), (3 * part, len(data))]
        for s, e in missing:
            ing.write_at(s, data[s:e])
            ing.mark_complete(s, e)
        path = ing.commit()
    assert path.read_bytes() == data
    assert _ingest_entries(store) == []


_RACING_WRITER = r"""
import os, sys, time
from imagevol.digest import Digest
from imagevol.store import Store
root, digest, datafile, side, go = sys.argv[1:6]
data = open(datafile, "rb").read()
d = Digest(digest)
while not os.path.exists(go):
    time.sleep(0.002)
store = Store(root)
with store.ingest(d, len(data)) as ing:
    if store.has_blob(d):
        assert ing.already_present
        with open(side, "a") as f:
            f.write("found\n")
    else:
        with open(side, "a") as f:
            f.write("wrote\n")
        time.sleep(0.4)   # make sure the other process arrives while we hold the ingest
        for s, e in ing.missing_ranges(4096):
            ing.write_at(s, data[s:e])
            ing.mark_complete(s, e, sync=False)
        ing.commit()
print(store.has_blob(d, len(data)))
"""


def test_two_processes_one_download(tmp_path):
    root = tmp_path / "store"
    data = os.urandom(50_000)
    d = digest_bytes(data)
    datafile, side, go = tmp_path / "payload", tmp_path / "side", tmp_path / "go"
    datafile.write_bytes(data)
    Store(root).ensure()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACING_WRITER, str(root), d, str(datafile), str(side), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(0.3)  # let both interpreters start and poll for the go file
    go.write_text("go")
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert out.strip() == "True"
    assert sorted(side.read_text().split()) == ["found", "wrote"]
    store = Store(root)
    assert store.read_blob(d, len(data)) == data
    assert _ingest_entries(store) == []


def test_waiter_recovers_when_holder_aborts(tmp_path):
    """A waiter blocked on an ingest whose holder aborts (removing the dir) gets a valid fresh lock."""
    import threading

    store = Store(tmp_path)
    data = os.urandom(1000)
    d = digest_bytes(data)
    first = store.ingest(d, len(data))
    got: list[Ingest] = []
    t = threading.Thread(target=lambda: got.append(store.ingest(d, len(data))))
    t.start()
    time.sleep(0.2)
    assert not got  # blocked
    first.abort()
    t.join(10)
    assert got
    second = got[0]
    assert not second.already_present and second.completed_ranges() == []
    # its lock is the one on disk now: a third taker is refused
    with pytest.raises(StoreError):
        store.ingest(d, len(data), blocking=False)
    second.write_at(0, data)
    second.commit()
    assert store.has_blob(Digest(d))


def test_meta_json_is_written_atomically(tmp_path):
    store = Store(tmp_path)
    d = digest_bytes(b"x" * 100)
    with store.ingest(d, 100) as ing:
        for i in range(10):
            ing.write_at(i * 10, b"x" * 10)
            ing.mark_complete(i * 10, i * 10 + 10)
        leftovers = [n for n in os.listdir(ing.dir) if n.startswith("meta.json.tmp")]
        assert leftovers == []
        assert json.loads(Path(ing.meta_path).read_text())["ranges"] == [[0, 100]]
        ing.commit()
