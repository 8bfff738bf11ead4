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

With one stream a single request covers each missing range of the blob. With more, each stream
asks for one piece at a time and no stream runs more than a window of pieces ahead of the hashing,
so a blob holds a bounded number of buffers and the process a bounded number in all.
"""

from __future__ import annotations

import contextlib
import http.client
import mmap
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import urllib3

from .digest import Digest, Verifier
from .errors import DigestMismatchError, ImagevolError, StoreError
from .manifest import Descriptor
from .store.ingest import DIRECT_ALIGN, Ingest

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

    def take(self, stop: Callable[[], bool]) -> mmap.mmap | None:
        """A buffer, or None once `stop()` says to give up waiting."""
        with self._cv:
            while self._out >= self.limit:
                if stop():
                    return None
                self._cv.wait(0.2)
            self._out += 1
            if self._free:
                return self._free.pop()
        try:
            return mmap.mmap(-1, self.size)
        except BaseException:
            self.give(None)
            raise

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


def range_start(resp: Any) -> int | None:
    """The first byte of a 206 response's Content-Range (None when absent or unparsable)."""
    unit, _, rest = resp.headers.get("Content-Range", "").partition(" ")
    try:
        return int(rest.split("-", 1)[0]) if unit.strip().lower() == "bytes" else None
    except ValueError:
        return None


def cut_pieces(gaps: list[tuple[int, int]], piece: int) -> list[tuple[int, int, int]]:
    """Cut the missing ranges of a blob at multiples of `piece` (pieces start block-aligned unless
    their gap does not): ``(start, end, end of the gap)`` each."""
    out = []
    for s, e in gaps:
        while s < e:
            cut = min(e, (s // piece + 1) * piece)
            out.append((s, cut, e))
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


class _Piece:
    __slots__ = ("buf", "end", "gap_end", "pending", "start")

    def __init__(self, start: int, end: int, gap_end: int) -> None:
        self.start, self.end, self.gap_end = start, end, gap_end
        self.buf: mmap.mmap | None = None
        self.pending = 0  # stages (hash, write) still to use the buffer

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
        self.pieces = [_Piece(*p) for p in cut_pieces(ing.missing_ranges(max(1, desc.size)), PIECE)]
        self.streams = max(1, min(len(self.pieces), streams))
        self.window = self.streams + 3  # pieces past the hashing: in flight, waiting to hash or write
        self._cv = threading.Condition()
        self._next = 0  # the next piece a stream takes
        self._hashed = 0  # pieces hashed (in order)
        self._held = 0  # buffers this blob holds
        self._failed: list[BaseException] = []
        self._writes: queue.SimpleQueue[_Piece | None] = queue.SimpleQueue()

    # -- stages ------------------------------------------------------------------------------------
    def _stop(self) -> bool:
        return bool(self._failed) or self.cancel.is_set()

    def _fail(self, e: BaseException) -> None:
        with self._cv:
            self._failed.append(e)
            self._cv.notify_all()

    def _release(self, p: _Piece) -> None:
        """One stage is done with the piece's buffer; the last one hands it back."""
        with self._cv:
            p.pending -= 1
            if p.pending > 0:
                return
            buf, p.buf = p.buf, None
            self._held -= 1
            self._cv.notify_all()
        self.buffers.give(buf)

    def _take(self) -> _Piece | None:
        with self._cv:
            while not self._stop() and self._next < len(self.pieces):
                if self._next < self._hashed + self.window and self._held < self.window:
                    p = self.pieces[self._next]
                    self._next += 1
                    self._held += 1
                    break
                self._cv.wait(0.5)
            else:
                return None
        buf = self.buffers.take(self._stop)
        if buf is None:
            with self._cv:
                self._held -= 1
            return None
        p.buf = buf
        return p

    def _receive(self) -> None:
        conn = _Conn()
        try:
            while (p := self._take()) is not None:
                try:
                    self._fill(p, conn)
                except BaseException:
                    p.pending = 1
                    self._release(p)
                    raise
                with self._cv:
                    p.pending = 2
                    self._cv.notify_all()
                self._writes.put(p)
        except BaseException as e:
            self._fail(e)
        finally:
            conn.close()

    def _fill(self, p: _Piece, conn: _Conn) -> None:
        """Receive piece `p` into its buffer, over `conn` if it is positioned at the piece."""
        desc = self.desc
        run_end = p.gap_end if self.streams == 1 else p.end
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
        """Write received pieces (in the order they arrived) and record them in the part map."""
        while (p := self._writes.get()) is not None:
            try:
                if not self._failed:
                    with p.view() as view:
                        self.ing.write_aligned(p.start, view)
                    self.ing.mark_complete(p.start, p.end, sync=False)
            except BaseException as e:
                self._fail(e)
            finally:
                self._release(p)

    def _hash_done_before(self, v: Verifier, start: int, end: int) -> None:
        """Bytes an earlier (killed) pull left behind are hashed from the file."""
        buf = bytearray(1 << 20)
        fd = os.open(self.ing.data_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with memoryview(buf) as view:
                while start < end:
                    n = os.preadv(fd, [view[: min(len(view), end - start)]], start)
                    if n <= 0:
                        raise StoreError(f"ingest data of {self.desc.digest} is shorter than its part map")
                    v.update(view[:n])
                    start += n
        finally:
            os.close(fd)

    # -- the whole ---------------------------------------------------------------------------------
    def run(self) -> Digest:
        """Fetch, write and hash every missing piece; raises RangeIgnored when the source ignores
        Range (nothing received is lost: it is in the part map), DigestMismatchError when the
        bytes do not hash to the digest, or the first other failure."""
        v = Verifier(self.desc.digest)
        order = sorted(
            [(s, e, -1) for s, e in self.done_before] + [(p.start, p.end, i) for i, p in enumerate(self.pieces)]
        )
        writer = threading.Thread(target=self._write, name="imagevol-write", daemon=True)
        receivers = [
            threading.Thread(target=self._receive, name="imagevol-part", daemon=True) for _ in range(self.streams)
        ]
        writer.start()
        for t in receivers:
            t.start()
        try:
            for s, e, i in order:
                if i < 0:
                    self._hash_done_before(v, s, e)
                    continue
                p = self.pieces[i]
                with self._cv:
                    while p.pending == 0 and not self._stop():
                        self._cv.wait(0.5)
                    if p.pending == 0:
                        break
                with p.view() as view:
                    v.update(view)
                self._release(p)
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
            for p in self.pieces:  # pieces received but never hashed (a failure cut the run short)
                if p.buf is not None:
                    p.pending = 1
                    self._release(p)
        if self._failed:
            cancelled = [e for e in self._failed if type(e) is ImagevolError and str(e) == "pull cancelled"]
            ignored = [e for e in self._failed if isinstance(e, RangeIgnored)]
            raise (ignored or [e for e in self._failed if e not in cancelled] or cancelled)[0]
        v.verify(f"blob {self.desc.digest} from {self.describe()}")
        return v.digest()
