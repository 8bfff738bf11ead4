"""Pieces of a large blob (imagevol.pieces), the store's direct writes (Ingest.write_aligned) and
fsutil.AlignedWriter."""

from __future__ import annotations

import hashlib
import itertools
import mmap
import os
import threading
from pathlib import Path

import pytest

from imagevol.digest import Digest
from imagevol.fetch.pieces import PIECE, Buffers, cut_at, range_start
from imagevol.fsutil import DIRECT_ALIGN, AlignedWriter, pwrite_direct, reopen_direct
from imagevol.store import Store


def test_ranges_are_cut_at_multiples_of_the_size():
    assert cut_at([(0, 10)], 4) == [(0, 4), (4, 8), (8, 10)]
    # A range that starts mid-piece gets a short first piece, then aligned ones.
    assert cut_at([(3, 9), (12, 13)], 4) == [(3, 4), (4, 8), (8, 9), (12, 13)]
    assert cut_at([], 4) == []
    got = cut_at([(5, 3 * PIECE + 7)], PIECE)
    assert [s for s, _ in got[1:]] == [PIECE, 2 * PIECE, 3 * PIECE]
    assert got[0][0] == 5 and got[-1][1] == 3 * PIECE + 7


class _Resp:
    def __init__(self, cr: str | None) -> None:
        self.headers = {} if cr is None else {"Content-Range": cr}


@pytest.mark.parametrize(
    ("header", "start"),
    [("bytes 0-99/1000", 0), ("bytes 4096-8191/*", 4096), (None, None), ("items 1-2/3", None), ("bytes x-1/2", None)],
)
def test_range_start(header, start):
    assert range_start(_Resp(header)) == start


def test_buffers_are_reused_and_bounded():
    bufs = Buffers(size=8192, limit=3)
    ring = bufs.take_many(2, lambda: False)
    assert ring is not None and [len(b) for b in ring] == [8192, 8192]
    # A second ring of two waits until both fit (never holding one while waiting for the other),
    # or gives up when told to.
    assert bufs.take_many(2, lambda: True) is None
    got: list[list[mmap.mmap] | None] = []
    t = threading.Thread(target=lambda: got.append(bufs.take_many(2, lambda: False)))
    t.start()
    t.join(0.3)
    assert t.is_alive()
    bufs.give(ring[0])
    t.join(5)
    assert got and got[0] is not None and ring[0] in got[0]  # the same memory, not a new mapping
    # A ring larger than the limit is cut to the limit.
    for b in [ring[1], *got[0]]:
        bufs.give(b)
    big = bufs.take_many(10, lambda: False)
    assert big is not None and len(big) == 3
    for b in big:
        bufs.give(b)
    bufs.clear()


def _blob(n: int) -> tuple[bytes, Digest]:
    data = os.urandom(n)
    return data, Digest("sha256:" + hashlib.sha256(data).hexdigest())


def _aligned(data: bytes, offset: int) -> tuple[mmap.mmap, memoryview]:
    """`data` in a page-aligned buffer, placed at `offset % DIRECT_ALIGN` as write_aligned wants."""
    buf = mmap.mmap(-1, len(data) + DIRECT_ALIGN)
    off = offset % DIRECT_ALIGN
    buf[off : off + len(data)] = data
    return buf, memoryview(buf)[off : off + len(data)]


@pytest.mark.parametrize("direct", ["1", "0"])
def test_write_aligned_pieces_make_the_blob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: str):
    """Pieces with unaligned heads and tails, written out of order, direct or not, give exactly
    the blob, which commits verified."""
    monkeypatch.setenv("IMAGEVOL_DIRECT_IO", direct)
    data, digest = _blob(3 * DIRECT_ALIGN * 16 + 1234)
    store = Store(tmp_path / "store")
    cuts = [0, 100, DIRECT_ALIGN * 5, DIRECT_ALIGN * 5 + 7, DIRECT_ALIGN * 30 + 1, len(data)]
    pieces = list(itertools.pairwise(cuts))
    with store.ingest(digest, len(data)) as ing:
        for s, e in reversed(pieces):
            buf, view = _aligned(data[s:e], s)
            ing.write_aligned(s, view)
            view.release()
            buf.close()
            ing.mark_complete(s, e, sync=False)
        assert ing.is_complete
        if direct == "0":
            assert ing._dfd is None  # switched off: nothing was opened O_DIRECT
        ing.commit()
    assert store.blob_path(digest).read_bytes() == data


def test_write_aligned_falls_back_when_memory_is_misaligned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A buffer not placed as promised is still written right (through the page cache)."""
    monkeypatch.setenv("IMAGEVOL_DIRECT_IO", "1")
    data, digest = _blob(DIRECT_ALIGN * 8)
    store = Store(tmp_path / "store")
    buf = mmap.mmap(-1, len(data) + DIRECT_ALIGN)
    buf[1 : 1 + len(data)] = data
    with store.ingest(digest, len(data)) as ing, memoryview(buf) as m:
        ing.write_aligned(0, m[1 : 1 + len(data)])
        ing.mark_complete(0, len(data), sync=False)
        ing.commit()
    buf.close()
    assert store.blob_path(digest).read_bytes() == data


def test_write_aligned_stays_inside_the_blob(tmp_path: Path):
    data, digest = _blob(DIRECT_ALIGN)
    store = Store(tmp_path / "store")
    with store.ingest(digest, len(data)) as ing:
        buf, view = _aligned(data + b"x", 0)
        with pytest.raises(ValueError, match="outside blob"):
            ing.write_aligned(0, view)
        view.release()
        buf.close()
        ing.abort()


# --------------------------------------------------------------------------- AlignedWriter


@pytest.mark.parametrize("direct", ["1", "0"])
@pytest.mark.parametrize("start", [0, 4096 * 3, 12345])
def test_aligned_writer_writes_what_it_was_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct, start):
    """Odd-sized writes, holes and progress callbacks: the file holds exactly the bytes, holes
    read as zeros, and each callback ran after the bytes before it were written."""
    monkeypatch.setenv("IMAGEVOL_DIRECT_IO", direct)
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    dfd = reopen_direct(fd)
    assert (dfd is None) == (direct == "0")
    expect = bytearray(start)
    seen: list[tuple[int, bytes]] = []
    w = AlignedWriter(lambda off, v: pwrite_direct(fd, dfd, off, v), start, size=64 * 1024)
    for i, n in enumerate([1, 4095, 70_000, 3, 200_000, 65536, 17]):
        if i == 3:
            w.skip(10_000)
            expect += bytes(10_000)
        data = os.urandom(n)
        w.write(data)
        expect += data
        at = len(expect)
        w.then(lambda at=at: seen.append((at, os.pread(fd, at, 0))))
    w.close()
    if dfd is not None:
        os.close(dfd)
    os.close(fd)
    assert path.read_bytes() == bytes(expect)
    assert seen and all(got == bytes(expect[:at]) for at, got in seen)


def test_aligned_writer_raises_the_writers_error():
    def boom(off: int, view: memoryview) -> None:
        raise OSError(28, "No space left on device")

    w = AlignedWriter(boom, 0, size=4096)
    with pytest.raises(OSError, match="No space"):
        for _ in range(100):
            w.write(os.urandom(4096))
        w.close()
    w.abandon()  # after an error: quiet, and idempotent
