"""A layer handed on as it downloads: :class:`LayerStream` carries the bytes of one blob from the
fetcher's receiving thread to a consumer in another thread (extraction while pulling), and ends
only once the blob is verified; a blob not streamed after all is read from the store.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from ..errors import ImagevolError
from ..manifest import Descriptor
from ..store import Store


class LayerStream:
    """The bytes of one blob as its download goes, for a consumer in another thread (extraction
    while pulling). The fetcher writes each piece to the store's ingest as usual (the blob stays
    resumable and is verified and committed as any other) and hands the same bytes object on: no
    copy, at most `max_buffered` bytes waiting. The consumer's reads end only once the whole blob
    has been verified; a wrong digest or a failed download is raised to it instead, so whatever it
    built from the bytes can be discarded.

    When the blob is not streamed after all (present already, or resumed from an earlier partial
    download), the consumer reads it from the store once it is committed.
    """

    def __init__(self, desc: Descriptor, store: Store, max_buffered: int = 32 << 20) -> None:
        self.desc = desc
        self._store = store
        self._max = max_buffered
        self._cv = threading.Condition()
        self._q: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._fed = 0  # bytes accepted from the download, in order
        self._read = 0  # bytes handed to the consumer
        self._state: str | None = None  # None: running; "ok": all fed and verified; "store": read the blob
        self._error: BaseException | None = None
        self._closed = False
        self._file: Any = None
        self.streamed = False

    # -- download side
    def feed(self, offset: int, chunk: bytes) -> None:
        """The blob's bytes at `offset` (in order; a resent range is skipped up to what was fed)."""
        end = offset + len(chunk)
        with self._cv:
            if self._closed or end <= self._fed:
                return
            if offset > self._fed:
                raise ImagevolError(f"blob {self.desc.digest}: stream skipped from byte {self._fed} to {offset}")
            if offset < self._fed:
                chunk = chunk[self._fed - offset :]
            while self._buffered >= self._max and not self._closed:
                self._cv.wait()
            if self._closed:
                return
            self.streamed = True
            self._q.append(chunk)
            self._buffered += len(chunk)
            self._fed = end
            self._cv.notify_all()

    def finish(self) -> None:
        with self._cv:
            self._state = "ok" if self.streamed else "store"
            self._cv.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cv:
            if self._state is None:
                self._error = error
            self._cv.notify_all()

    # -- consumer side
    def read(self, n: int = -1) -> bytes:
        if self._file is not None:
            return self._file.read(n)
        with self._cv:
            while not self._q and self._state is None and self._error is None:
                self._cv.wait()
            if self._q:
                chunk = self._q.popleft()
                if 0 < n < len(chunk):
                    self._q.appendleft(chunk[n:])
                    chunk = chunk[:n]
                self._buffered -= len(chunk)
                self._read += len(chunk)
                self._cv.notify_all()
                return chunk
            if self._error is not None:
                raise self._error
            if self._state == "ok":
                return b""
        # Not streamed: the verified blob from the store, from where the consumer is.
        self._file = self._store.open_blob(self.desc.digest)
        if self._read:
            self._file.seek(self._read)
        return self._file.read(n)

    def close(self) -> None:
        """The consumer is done (or gave up): the download goes on into the store unhindered."""
        with self._cv:
            self._closed = True
            self._q.clear()
            self._buffered = 0
            self._cv.notify_all()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> LayerStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
