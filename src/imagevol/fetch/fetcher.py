"""The fetcher: downloads a manifest's blobs into the store. Blobs are fetched concurrently
(bounded); a large blob is split into ranged parts fetched in parallel when the server honours
Range (a 200 answer falls back to one stream); every blob is verified before it enters the store;
an interrupted fetch resumes from the parts already on disk; two processes fetching one blob
download it once (the store's ingest lock); :meth:`_Fetcher.cancel` stops it at once.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import socket
import threading
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import urllib3

from ..digest import Digest, Verifier
from ..errors import (
    DigestMismatchError,
    ImagevolError,
    IngestBusyError,
    SizeMismatchError,
    TransportError,
)
from ..fsutil import AlignedWriter
from ..manifest import Descriptor
from ..progress import ProgressEvent, ProgressFn
from ..registry.client import interruptible_by
from ..sources.base import Source
from ..sources.registry import RegistrySource
from ..store import Store
from .pieces import PIECE, Buffers, PieceFetch, RangeIgnored
from .stream import LayerStream

CHUNK = 1 << 20
# A streamed blob's progress is recorded in the ingest's part map at least this often, so a killed
# pull loses at most this much of it (large blobs fetched in pieces record every 4 MiB piece).
MARK_EVERY = 8 << 20
# What a cut connection raises while a body is read (retried from the last byte received).
_CUT = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


class _Lane:
    """Calls made in order by a thread of its own, at most `depth` waiting (a bounded pipeline
    stage). The first error is raised to the producer by its next put, or by drain."""

    def __init__(self, name: str, depth: int = 8) -> None:
        self._q: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            fn, args, kwargs = item
            if self._error is None:
                try:
                    fn(*args, **kwargs)
                except BaseException as e:
                    self._error = e
            self._q.task_done()
        self._q.task_done()

    def put(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self._error is not None:
            raise self._error
        self._q.put((fn, args, kwargs))

    def drain(self) -> None:
        """Wait until every call made so far has run; raise the first error."""
        self._q.join()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()


class _Fetcher:
    """Downloads blobs into the store: concurrent, ranged, resumable, verified."""

    def __init__(
        self,
        store: Store,
        source: Source,
        *,
        concurrency: int,
        part_size: int,
        parts_per_blob: int,
        progress: ProgressFn | None,
        retries: int = 5,
        cancel: threading.Event | None = None,
    ) -> None:
        self.retries = retries
        self.store = store
        self.source = source
        self.concurrency = max(1, concurrency)
        self.part_size = max(1 << 20, part_size)
        self.parts_per_blob = max(1, parts_per_blob)
        self.progress = progress
        self.downloaded = 0
        self.reused = 0
        self._mu = threading.Lock()
        self._cancel = cancel if cancel is not None else threading.Event()
        self._resumed: dict[str, bool] = {}
        #: Blobs whose bytes are handed on as they arrive (extraction while pulling).
        self.taps: dict[str, LayerStream] = {}
        self._done: dict[str, threading.Event] = {}
        #: Why a blob's fetch failed (or never started), by digest.
        self.errors: dict[str, BaseException] = {}
        self._buffers = Buffers()
        #: Responses being read, so that :meth:`cancel` can wake a read blocked on its socket.
        self._streams: weakref.WeakSet[Any] = weakref.WeakSet()
        self._streams_mu = threading.Lock()
        #: Why the fetcher cancelled itself (the first failure, or an interrupt): what the blobs
        #: this cancelled report to whoever waits for them, instead of "pull cancelled".
        self._cause: BaseException | None = None

    def cancel(self) -> None:
        """Stop the pull at once: the event every receiving, hashing and writing loop checks between
        reads is set, and the sockets of the responses in flight are shut down, so that a read
        blocked on one (a slow or stalled registry) returns now instead of at its next byte or its
        timeout. What was received is recorded in the ingests' part maps for the next pull."""
        self._cancel.set()
        with self._streams_mu:
            streams = list(self._streams)
        for stream in streams:
            _shut_down(stream)

    def _open_range(self, source: RegistrySource, desc: Descriptor, start: int, end: int | None) -> Any:
        interruptible_by(self._cancel)  # called in the receiving threads of a blob in pieces
        return self._opened(source.open_range(desc, start, end))

    def _opened(self, stream: Any) -> Any:
        """Track a response being read (see :meth:`cancel`); one opened after a cancel is shut at once."""
        with self._streams_mu:
            self._streams.add(stream)
        if self._cancel.is_set():
            _shut_down(stream)
        return stream

    def done_event(self, digest: Digest) -> threading.Event:
        """Set once the blob's fetch has ended, well or not (the store says which)."""
        with self._mu:
            return self._done.setdefault(str(digest), threading.Event())

    def _emit(self, ev: ProgressEvent) -> None:
        if self.progress is not None:
            self.progress(ev)

    def _count(self, digest: Digest, n: int) -> None:
        with self._mu:
            self.downloaded += n
        self._emit(ProgressEvent("bytes", str(digest), n=n))

    def fetch_all(self, descs: Iterable[Descriptor]) -> None:
        descs = list(descs)
        todo = []
        try:
            for d in descs:
                if self.store.has_blob(d.digest, d.size):
                    self.reused += d.size
                    self._emit(ProgressEvent("blob-done", str(d.digest), size=d.size, cached=True))
                    self._ended(d, None)
                else:
                    todo.append(d)
            if not todo:
                return
            # Small blobs first so configs and metadata land early; big ones get the parallel parts.
            todo.sort(key=lambda d: d.size)
            pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="imagevol-blob")
            try:
                futures = [pool.submit(self.fetch, d) for d in todo]
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                for f in done:
                    if f.exception() is not None:
                        raise f.exception()  # type: ignore[misc]
            except BaseException as e:
                # An error, or an interrupt (Ctrl-C, SIGTERM) while waiting: the fetches in flight
                # stop now, before the pool is waited for, not when their blobs are done.
                if self._cause is None:
                    self._cause = e
                self.cancel()
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        except BaseException as e:
            for d in descs:  # whoever waits for a blob that will not come hears why
                self._ended(d, e)
            raise
        finally:
            self._buffers.clear()

    def _ended(self, desc: Descriptor, error: BaseException | None) -> None:
        if error is not None and self._cause is not None and _cancelled(error):
            error = self._cause  # cancelled because another blob failed: that is the reason
        if error is not None:
            self.errors.setdefault(str(desc.digest), error)
        tap = self.taps.get(str(desc.digest))
        if tap is not None:
            if error is None:
                tap.finish()
            else:
                tap.fail(error)
        self.done_event(desc.digest).set()

    def fetch(self, desc: Descriptor) -> None:
        if desc.data is not None:
            self.store.put_bytes(desc.data, desc.digest)
            self._ended(desc, None)
            return
        self._emit(ProgressEvent("blob-start", str(desc.digest), size=desc.size))
        try:
            try:
                self._fetch_once(desc)
            except DigestMismatchError as e:
                if not self._resumed.get(str(desc.digest)) or isinstance(e, SizeMismatchError):
                    raise
                # The resumed part map named bytes that did not survive (a power loss drops the page
                # cache; a killed process does not): the ingest was discarded, fetch it afresh once.
                self._resumed[str(desc.digest)] = False
                self._fetch_once(desc)
        except BaseException as e:
            self._ended(desc, e)
            raise
        self._ended(desc, None)
        self._emit(ProgressEvent("blob-done", str(desc.digest), size=desc.size))

    def _ingest(self, desc: Descriptor) -> Any:
        """The blob's ingest, once no other process holds it; waiting for one ends when the pull is
        cancelled (a blocking lock could not be interrupted in this thread)."""
        while True:
            try:
                return self.store.ingest(desc.digest, desc.size, blocking=False)
            except IngestBusyError:
                if self._cancel.wait(0.1):
                    raise ImagevolError("pull cancelled") from None

    def _fetch_once(self, desc: Descriptor) -> None:
        interruptible_by(self._cancel)  # the registry's retry waits in this thread end on a cancel
        with self._ingest(desc) as ing:
            if ing.already_present:  # another process fetched it while we waited for its lock
                with self._mu:
                    self.reused += desc.size
                self._emit(ProgressEvent("bytes", str(desc.digest), n=desc.size, cached=True))
                return
            done_before = sum(e - s for s, e in ing.completed_ranges())
            self._resumed[str(desc.digest)] = bool(done_before)
            if done_before:
                with self._mu:
                    self.reused += done_before
                self._emit(ProgressEvent("bytes", str(desc.digest), n=done_before, cached=True))
            tap = None if done_before else self.taps.get(str(desc.digest))
            try:
                if tap is not None:
                    verified = self._stream(desc, ing, tap)  # in order, for the consumer
                elif desc.size >= PIECE and isinstance(self.source, RegistrySource):
                    verified = self._fetch_pieces(desc, ing)
                else:
                    verified = self._stream(desc, ing)
            except DigestMismatchError:
                ing.abort()  # wrong bytes are not progress: the next attempt starts afresh
                raise
            ing.commit(verified_digest=verified)

    def _retry_or_raise(self, desc: Descriptor, attempts: int, pos: int, err: BaseException | None) -> None:
        if self._cancel.is_set():
            raise ImagevolError("pull cancelled")
        if attempts > self.retries:
            why = f"{type(err).__name__}: {err}" if err else "the connection closed early"
            raise TransportError(
                f"blob {desc.digest} from {self.source.describe()} was cut at byte {pos} of {desc.size} "
                f"{attempts} times ({why})",
                hint="the bytes received are kept: run the pull again to resume",
            )
        if self._cancel.wait(min(5.0, 0.25 * (2 ** (attempts - 1)))):
            raise ImagevolError("pull cancelled")

    def _stream(self, desc: Descriptor, ing: Any, tap: LayerStream | None = None) -> Digest | None:
        """One stream from the resume point, hashed as it passes: the blob is read once. A cut
        connection resumes with a Range request from the last byte received.

        With a `tap` (extraction while pulling), the bytes also go to its consumer, and writing and
        hashing move to threads of their own so that receiving never waits for them: on two cores
        one thread doing all three was the pipeline's bottleneck. The writes are gathered into
        aligned buffers and go around the page cache (fsutil.AlignedWriter, Ingest.write_aligned)."""
        verifier, offset = ing.resume_verifier()
        writer: AlignedWriter | None = None
        hasher = _Lane("imagevol-hash") if tap is not None else None
        attempts = 0
        try:
            while offset < desc.size:
                start = offset
                f = self._opened(self.source.open_blob(desc, offset))
                if tap is not None:
                    writer = AlignedWriter(ing.write_aligned, offset)
                err: BaseException | None = None
                ended = False  # the body ended where its own length said it would
                skip = 0
                try:
                    if offset and getattr(getattr(f, "resp", None), "status", 206) == 200:
                        if tap is None:
                            verifier, offset, start = Verifier(desc.digest), 0, 0  # Range ignored: restart
                        else:
                            skip = offset  # the consumer has these bytes: read past them
                    last_mark = offset
                    while not self._cancel.is_set():
                        try:
                            chunk = f.read(CHUNK)
                        except _CUT as e:
                            err = e
                            break
                        if not chunk:
                            ended = True
                            break
                        if skip:
                            if len(chunk) <= skip:
                                skip -= len(chunk)
                                continue
                            chunk, skip = chunk[skip:], 0
                        if offset + len(chunk) > desc.size:
                            raise SizeMismatchError.of(
                                f"blob {desc.digest}", self.source.describe(), desc.size, f"more than {desc.size}"
                            )
                        if writer is not None and hasher is not None and tap is not None:
                            writer.write(chunk)
                            hasher.put(verifier.update, chunk)
                            tap.feed(offset, chunk)
                        else:
                            ing.write_at(offset, chunk)
                            verifier.update(chunk)
                        offset += len(chunk)
                        self._count(desc.digest, len(chunk))
                        if offset - last_mark >= MARK_EVERY:
                            if writer is not None:
                                writer.then(functools.partial(ing.mark_complete, start, offset, sync=False))
                            else:
                                ing.mark_complete(start, offset, sync=False)
                            last_mark = offset
                finally:
                    with contextlib.suppress(Exception):
                        f.close()
                if writer is not None:
                    w, writer = writer, None
                    w.close()  # every byte received is written before the part map says so
                ing.mark_complete(start, offset, sync=False)
                if ended and offset < desc.size and not self._cancel.is_set():
                    # Not a cut (that raises): the body was whole, and the blob is shorter than stated.
                    raise SizeMismatchError.of(f"blob {desc.digest}", self.source.describe(), desc.size, offset)
                if offset < desc.size:
                    attempts += 1
                    self._retry_or_raise(desc, attempts, offset, err)
            if hasher is not None:
                hasher.drain()
        finally:
            if writer is not None:
                writer.abandon()
            if hasher is not None:
                hasher.close()
        verifier.verify(f"blob {desc.digest} from {self.source.describe()}")
        return verifier.digest()

    def _fetch_pieces(self, desc: Descriptor, ing: Any) -> Digest | None:
        """Fetch a large blob in pieces (:class:`PieceFetch`), hashed in order from the receive
        buffers and written around the page cache; a blob over the part size is fetched over
        `parts_per_blob` streams, in runs of the part size. A source that ignores Range gets one
        plain stream."""
        assert isinstance(self.source, RegistrySource)
        source = self.source
        job = PieceFetch(
            desc,
            ing,
            open_range=lambda start, end: self._open_range(source, desc, start, end),
            describe=source.describe,
            buffers=self._buffers,
            streams=self.parts_per_blob if desc.size > self.part_size else 1,
            run_size=self.part_size,
            cancel=self._cancel,
            count=lambda n: self._count(desc.digest, n),
            retry_or_raise=lambda attempts, pos, err: self._retry_or_raise(desc, attempts, pos, err),
        )
        try:
            return job.run()
        except RangeIgnored:
            return self._stream(desc, ing)


def _cancelled(e: BaseException) -> bool:
    """True for the error a cancelled fetch raises."""
    return type(e) is ImagevolError and str(e) == "pull cancelled"


def _shut_down(stream: Any) -> None:
    """Shut down the socket under a urllib3 response (or a reader of one): a read blocked on it
    returns at once (end of data), in whatever thread it waits. Anything else is left alone."""
    resp = getattr(stream, "resp", stream)
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's: works under TLS too
