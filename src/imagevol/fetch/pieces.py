"""Fetching one large blob in pieces: received into reused aligned buffers, hashed in order from
those buffers, and written around the page cache, in three stages that overlap.

Why this shape (numbers in docs/performance.md):

- sha256 is sequential, so a blob must be hashed in order. Hashing the bytes where they were
  received reads them once; re-reading a file from the page cache after a parallel download was a
  second pass over memory, and its tail ran after the last byte arrived.
- On a VM that hands freed memory back to its host, fresh memory is the dearest part of a write:
  buffered writes of a 2 GiB pull cost 1-5 s of system time depending on what the host had kept.
  Direct writes from buffers the process reuses cost 0.2 s, leave the node's page cache to its
  workloads, and find the data on disk when the blob is committed (its fsync has nothing to flush).
- Receiving, hashing and writing each wait on something different (the network, the CPU, the
  disk), so each has a thread of its own.

With one stream a single request covers each missing range of the blob. With more (for links
where one connection is slow), the blob is cut into runs of the part size, each fetched by one
request; a stream keeps a piece for the hashing only when the hashing is a few pieces behind it,
and otherwise writes it at once and lets the hashing read it back from the file (at disk speed,
while the next runs download), so memory stays bounded whatever the number of streams.
"""

from __future__ import annotations

import contextlib
import http.client
import mmap
import queue
import threading
from collections.abc import Callable
from typing import Any

import urllib3

from ..digest import Digest, Verifier
from ..errors import DigestMismatchError, ImagevolError, SizeMismatchError, StoreError
from ..fsutil import DIRECT_ALIGN
from ..manifest import Descriptor
from ..store.ingest import Ingest

#: Large blobs are received in pieces of this size (cut at multiples of it), each into one buffer.
PIECE = 4 << 20
#: Buffers one process holds at most, across all its blobs (48 MiB).
MAX_BUFFERS = 12
#: What a cut connection raises while a body is read (retried from the last byte received).
CUT = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OSError, http.client.HTTPException)


class Buffers:
    """Page-aligned receive buffers, reused from piece to piece and blob to blob, at most `limit`
    out at once (:meth:`take` waits for one). Bytes land in memory the process has already
    touched, and the alignment lets the store write them with O_DIRECT."""

    def __init__(self, size: int = PIECE + DIRECT_ALIGN, limit: int = MAX_BUFFERS) -> None:
        self.size = size
        self.limit = limit
        self._free: list[mmap.mmap] = []
        self._out = 0
        self._cv = threading.Condition()

    def take_many(self, n: int, stop: Callable[[], bool]) -> list[mmap.mmap] | None:
        """`n` buffers at once (a stream's ring: holding some while waiting for more could
        deadlock two streams), or None once `stop()` says to give up waiting."""
        n = min(n, self.limit)
        with self._cv:
            while self._out + n > self.limit:
                if stop():
                    return None
                self._cv.wait(0.2)
            self._out += n
            got = [self._free.pop() for _ in range(min(n, len(self._free)))]
        try:
            while len(got) < n:
                got.append(mmap.mmap(-1, self.size))
        except BaseException:
            for b in got:
                self.give(b)
            for _ in range(n - len(got)):
                self.give(None)
            raise
        return got

    def give(self, buf: mmap.mmap | None) -> None:
        with self._cv:
            self._out -= 1
            if buf is not None:
                self._free.append(buf)
            self._cv.notify()

    def clear(self) -> None:
        """Unmap the idle buffers (those still out are unmapped when their owners drop them)."""
        with self._cv:
            free, self._free = self._free, []
        for buf in free:
            with contextlib.suppress(BufferError):
                buf.close()


def recv_into(resp: Any, view: memoryview) -> int:
    """Read up to len(view) body bytes of a urllib3 response straight into `view`; 0 at the end.

    urllib3's read() returns a new bytes object per call (its readinto copies one), so a plain body
    is read through the http.client response beneath it: the socket fills the buffer."""
    fp = getattr(resp, "_fp", None)
    if fp is not None and hasattr(fp, "readinto") and resp.headers.get("Content-Encoding", "identity") == "identity":
        return fp.readinto(view)
    data = resp.read(len(view))
    view[: len(data)] = data
    return len(data)


def body_complete(resp: Any) -> bool:
    """True when a response that gave no more bytes ended where its own length said (a clean end),
    False when its connection was cut short of its Content-Length."""
    fp = getattr(resp, "_fp", None)
    return not getattr(fp, "length", None)


def range_start(resp: Any) -> int | None:
    """The first byte of a 206 response's Content-Range (None when absent or unparsable)."""
    unit, _, rest = resp.headers.get("Content-Range", "").partition(" ")
    try:
        return int(rest.split("-", 1)[0]) if unit.strip().lower() == "bytes" else None
    except ValueError:
        return None


def cut_at(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Cut ranges at the multiples of `size` (so that the pieces after the first of a range start
    block-aligned)."""
    out = []
    for s, e in ranges:
        while s < e:
            cut = min(e, (s // size + 1) * size)
            out.append((s, cut))
            s = cut
    return out


class RangeIgnored(Exception):
    """The source answered a Range request with the whole blob."""


class _Conn:
    """A receiving stream's open response, and the blob offset of the next byte it gives."""

    __slots__ = ("pos", "resp")

    def __init__(self) -> None:
        self.resp: Any = None
        self.pos = -1

    def close(self) -> None:
        if self.resp is not None:
            resp, self.resp = self.resp, None
            with contextlib.suppress(Exception):
                resp.close()  # unread body: the connection is not reused


_WAITING, _IN_MEMORY, _ON_DISK = 0, 1, 2


class _Ring:
    """A stream's own buffers: a piece is received into a free one, which comes back when the
    hashing and the writing are done with it (or, once the stream has ended, goes to the pool)."""

    __slots__ = ("closed", "free")

    def __init__(self, bufs: list[mmap.mmap]) -> None:
        self.free = bufs
        self.closed = False


class _Piece:
    __slots__ = ("buf", "end", "pending", "ring", "start", "state")

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.buf: mmap.mmap | None = None
        self.ring: _Ring | None = None
        self.pending = 0  # stages (hash, write) still to use the buffer
        self.state = _WAITING

    def view(self) -> memoryview:
        assert self.buf is not None
        off = self.start % DIRECT_ALIGN
        return memoryview(self.buf)[off : off + self.end - self.start]


class PieceFetch:
    """One blob's fetch: :meth:`run` returns the verified digest, or raises."""

    def __init__(
        self,
        desc: Descriptor,
        ing: Ingest,
        *,
        open_range: Callable[[int, int | None], Any],
        describe: Callable[[], str],
        buffers: Buffers,
        streams: int,
        run_size: int,
        cancel: threading.Event,
        count: Callable[[int], None],
        retry_or_raise: Callable[[int, int, BaseException | None], None],
    ) -> None:
        self.desc = desc
        self.ing = ing
        self.open_range = open_range
        self.describe = describe
        self.buffers = buffers
        self.cancel = cancel
        self.count = count
        self.retry_or_raise = retry_or_raise
        self.done_before = ing.completed_ranges()
        gaps = ing.missing_ranges(max(1, desc.size))
        # One request per missing range with one stream; runs of `run_size` with more.
        runs = gaps if streams <= 1 else cut_at(gaps, max(PIECE, run_size))
        self.streams = max(1, min(len(runs), streams))
        self.pieces: list[_Piece] = []
        self.runs: list[tuple[int, int]] = []  # (first piece, end piece) of each request
        for s, e in runs:
            first = len(self.pieces)
            self.pieces += [_Piece(a, b) for a, b in cut_at([(s, e)], PIECE)]
            self.runs.append((first, len(self.pieces)))
        # A stream's ring: one buffer receiving, one being hashed, one being written.
        self.ring_size = 3 if self.streams == 1 else 2
        # Pieces further than this past the hashing are written at once and read back when their turn comes.
        self.window = 2 * self.streams + 1
        self._cv = threading.Condition()
        self._next_run = 0
        self._hashed = 0  # pieces hashed (in order)
        self._failed: list[BaseException] = []
        self._writes: queue.SimpleQueue[_Piece | None] = queue.SimpleQueue()

    # -- coordination ------------------------------------------------------------------------------
    def _stop(self) -> bool:
        return bool(self._failed) or self.cancel.is_set()

    def _fail(self, e: BaseException) -> None:
        with self._cv:
            self._failed.append(e)
            self._cv.notify_all()

    def _release(self, p: _Piece) -> None:
        """One stage is done with the piece's buffer; the last one hands it back to its ring."""
        with self._cv:
            p.pending -= 1
            if p.pending > 0:
                return
            buf, ring, p.buf, p.ring = p.buf, p.ring, None, None
            if ring is not None and not ring.closed and buf is not None:
                ring.free.append(buf)
                self._cv.notify_all()
                return
        self.buffers.give(buf)

    def _free_buffer(self, ring: _Ring) -> mmap.mmap | None:
        with self._cv:
            while not ring.free and not self._stop():
                self._cv.wait(0.5)
            return ring.free.pop() if ring.free and not self._stop() else None

    # -- stages ------------------------------------------------------------------------------------
    def _receive(self) -> None:
        bufs = self.buffers.take_many(self.ring_size, self._stop)
        if bufs is None:
            return
        ring = _Ring(bufs)
        conn = _Conn()
        try:
            while True:
                with self._cv:
                    if self._stop() or self._next_run >= len(self.runs):
                        return
                    first, end = self.runs[self._next_run]
                    self._next_run += 1
                for i in range(first, end):
                    self._piece(self.pieces[i], i, ring, conn, self.pieces[end - 1].end)
        except BaseException as e:
            self._fail(e)
        finally:
            conn.close()
            with self._cv:
                ring.closed = True
                free, ring.free = ring.free, []
            for buf in free:
                self.buffers.give(buf)

    def _piece(self, p: _Piece, i: int, ring: _Ring, conn: _Conn, run_end: int) -> None:
        buf = self._free_buffer(ring)
        if buf is None:
            raise ImagevolError("pull cancelled")
        p.buf, p.ring, p.pending = buf, ring, 1
        try:
            self._fill(p, conn, run_end)
            with self._cv:
                keep = i < self._hashed + self.window
                if keep:
                    p.pending, p.state = 2, _IN_MEMORY
                    self._cv.notify_all()
            if keep:
                self._writes.put(p)
                return
            # Far ahead of the hashing: write it now, so the buffer serves the next piece.
            with p.view() as view:
                self.ing.write_aligned(p.start, view)
            self.ing.mark_complete(p.start, p.end, sync=False)
            with self._cv:
                p.state = _ON_DISK
                self._cv.notify_all()
        finally:
            if p.state != _IN_MEMORY:
                self._release(p)

    def _fill(self, p: _Piece, conn: _Conn, run_end: int) -> None:
        """Receive piece `p` into its buffer, over `conn` if it is positioned at the piece."""
        desc = self.desc
        got, attempts = 0, 0
        with p.view() as view:
            while got < len(view):
                if self._stop():
                    raise ImagevolError("pull cancelled")
                if conn.resp is None or conn.pos != p.start + got:
                    conn.close()
                    conn.pos = p.start + got
                    whole = conn.pos == 0 and run_end == desc.size  # a plain GET, as every client sends
                    conn.resp = resp = self.open_range(conn.pos, None if whole else run_end)
                    if resp.status == 200 and not whole:
                        raise RangeIgnored
                    if range_start(resp) not in (None, conn.pos):
                        raise DigestMismatchError(
                            f"blob {desc.digest}: {self.describe()} answered a request for bytes "
                            f"{conn.pos}-{run_end - 1} with {resp.headers.get('Content-Range')}",
                            hint="the registry served a wrong range; nothing was stored",
                        )
                err: BaseException | None = None
                try:
                    n = recv_into(conn.resp, view[got:])
                except CUT as e:
                    n, err = 0, e
                if n <= 0 and err is None and not self._stop() and conn.resp.status == 200 and body_complete(conn.resp):
                    # Not a cut: the whole blob was served, and it is shorter than its descriptor states.
                    raise SizeMismatchError.of(f"blob {desc.digest}", self.describe(), desc.size, conn.pos)
                if n <= 0:  # cut: ask again from the last byte received
                    conn.close()
                    attempts += 1
                    self.retry_or_raise(attempts, p.start + got, err)
                    continue
                got += n
                conn.pos += n
                self.count(n)
        if conn.pos == run_end:
            extra = 0
            with contextlib.suppress(*CUT):
                extra = recv_into(conn.resp, memoryview(bytearray(1)))
            if extra:
                raise DigestMismatchError(
                    f"blob {desc.digest}: the range ending at byte {conn.pos - 1} from {self.describe()} "
                    "came with extra bytes",
                    hint="the registry served a wrong range; nothing was stored",
                )
            conn.resp.release_conn()  # read to its end: the connection goes back to the pool
            conn.resp = None

    def _write(self) -> None:
        """Write the pieces kept for the hashing, in the order they arrived, and record them (also
        when the pull is cancelled: they were received whole, and the next pull need not ask again)."""
        while (p := self._writes.get()) is not None:
            try:
                if not self._failed or self.cancel.is_set():
                    with p.view() as view:
                        self.ing.write_aligned(p.start, view)
                    self.ing.mark_complete(p.start, p.end, sync=False)
            except BaseException as e:
                self._fail(e)
            finally:
                self._release(p)

    def _hash_from_file(self, v: Verifier, start: int, end: int, buf: mmap.mmap) -> None:
        """Bytes already in the file (written ahead, or left by a killed pull) are read back."""
        with memoryview(buf) as view:
            while start < end:
                if self.cancel.is_set():  # a resumed blob's done part may be gigabytes: stop between pieces
                    raise ImagevolError("pull cancelled")
                off = start % DIRECT_ALIGN  # placed as the file is, so the read can be direct
                want = view[off : off + min(PIECE, end - start)]
                n = self.ing.read_aligned(start, want)
                if n <= 0:
                    raise StoreError(f"ingest data of {self.desc.digest} is shorter than its part map")
                v.update(want[:n])
                start += n

    # -- the whole ---------------------------------------------------------------------------------
    def run(self) -> Digest:
        """Fetch, write and hash every missing piece; raises RangeIgnored when the source ignores
        Range (nothing received is lost: it is in the part map), DigestMismatchError when the
        bytes do not hash to the digest, or the first other failure."""
        v = Verifier(self.desc.digest)
        order = sorted(
            [(s, e, -1) for s, e in self.done_before] + [(p.start, p.end, i) for i, p in enumerate(self.pieces)]
        )
        readback: Any = None  # an aligned buffer for reading back, made when first needed
        writer = threading.Thread(target=self._write, name="imagevol-write", daemon=True)
        receivers = [
            threading.Thread(target=self._receive, name="imagevol-part", daemon=True) for _ in range(self.streams)
        ]
        writer.start()
        for t in receivers:
            t.start()
        try:
            for s, e, i in order:
                if i >= 0:
                    p = self.pieces[i]
                    with self._cv:
                        while p.state == _WAITING and not self._stop():
                            self._cv.wait(0.5)
                    if p.state == _WAITING:
                        break
                    if p.state == _IN_MEMORY:
                        with p.view() as view:
                            v.update(view)
                        self._release(p)
                if i < 0 or p.state == _ON_DISK:
                    if readback is None:
                        readback = mmap.mmap(-1, PIECE + DIRECT_ALIGN)
                    self._hash_from_file(v, s, e, readback)
                if i >= 0:
                    with self._cv:
                        self._hashed += 1
                        self._cv.notify_all()
        except BaseException as e:
            self._fail(e)
        finally:
            if self._hashed < len(self.pieces) and not self._failed:
                self._fail(ImagevolError("pull cancelled"))
            for t in receivers:
                t.join()
            self._writes.put(None)
            writer.join()
            for p in self.pieces:  # received, never hashed: a failure cut the run short
                if p.buf is not None:
                    p.pending = 1
                    self._release(p)
            if readback is not None:
                readback.close()
        if self._failed:
            cancelled = [e for e in self._failed if type(e) is ImagevolError and str(e) == "pull cancelled"]
            ignored = [e for e in self._failed if isinstance(e, RangeIgnored)]
            raise (ignored or [e for e in self._failed if e not in cancelled] or cancelled)[0]
        v.verify(f"blob {self.desc.digest} from {self.describe()}")
        return v.digest()
