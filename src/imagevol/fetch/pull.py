"""Pull: resolve a reference for a node, then fetch the chosen manifest's blobs into the store.

Fast and safe: blobs of a manifest are fetched concurrently (bounded); a large blob is split into
ranged parts fetched in parallel when the server honours Range (a 200 answer falls back to one
stream); every blob is verified before it enters the store; an interrupted pull resumes from the
parts already on disk; two processes pulling one blob download it once (the store's ingest lock).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import queue
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import urllib3

from ..digest import Digest, Verifier
from ..errors import (
    DigestMismatchError,
    ImagevolError,
    IngestBusyError,
    NotFoundError,
    SizeMismatchError,
    TransportError,
    UsageError,
)
from ..fsutil import AlignedWriter
from ..manifest import Descriptor, Index, Manifest
from ..platform import Platform, host_platform
from ..progress import ProgressEvent, ProgressFn
from ..reference import LayoutReference, Reference, parse_any, ref_key
from ..registry.client import interruptible_by
from ..registry.transport import RegistryOptions
from ..resolve.select import Selection, select_manifest
from ..sources.base import Source
from ..sources.factory import open_source
from ..sources.registry import RegistrySource
from ..sources.storesrc import StoreSource
from ..store import Store
from .pieces import PIECE, Buffers, PieceFetch, RangeIgnored

PULL_POLICIES = ("always", "missing", "never")
CHUNK = 1 << 20
DEFAULT_PART_SIZE = 64 << 20
DEFAULT_CONCURRENCY = 4
DEFAULT_PARTS_PER_BLOB = 1
# A streamed blob's progress is recorded in the ingest's part map at least this often, so a killed
# pull loses at most this much of it (large blobs fetched in pieces record every 4 MiB piece).
MARK_EVERY = 8 << 20
# What a cut connection raises while a body is read (retried from the last byte received).
_CUT = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


@dataclass
class PullResult:
    """What a pull resolved and fetched."""

    reference: str
    root_digest: Digest
    digest: Digest
    manifest: Manifest
    selection: Selection
    source: str
    downloaded: int = 0
    reused: int = 0
    blobs: int = 0
    seconds: float = 0.0
    offline: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "rootDigest": str(self.root_digest),
            "digest": str(self.digest),
            "kind": self.manifest.kind,
            "platform": str(self.selection.platform) if self.selection.platform else None,
            "how": self.selection.how,
            "source": self.source,
            "downloadedBytes": self.downloaded,
            "reusedBytes": self.reused,
            "blobs": self.blobs,
            "seconds": round(self.seconds, 3),
            "offline": self.offline,
            "warnings": self.warnings,
        }


def _needed(manifest: Manifest) -> list[Descriptor]:
    out: list[Descriptor] = []
    seen: set[str] = set()
    for d in (manifest.config, *manifest.layers):
        if d.data is not None and d is manifest.config:
            continue
        if str(d.digest) not in seen:
            seen.add(str(d.digest))
            out.append(d)
    return out


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


def _store_manifests(store: Store, source: Source, sel: Selection, root_doc: Manifest | Index) -> None:
    """Keep the root, every index walked and the chosen manifest, with parent -> child links."""
    store.put_bytes(root_doc.raw, sel.root.digest)
    chain: list[Digest] = [sel.root.digest]
    for step in sel.steps:
        if step.chosen is None:
            continue
        entry = next((e for e in step.entries if e.position == step.chosen), None)
        if entry is None:
            continue
        child = entry.descriptor
        doc = source.manifest(child)
        store.put_bytes(doc.raw, child.digest)
        store.meta.set_children(Digest(step.digest), [child.digest])
        chain.append(child.digest)
    m = sel.manifest
    store.put_bytes(m.raw, sel.descriptor.digest)
    if m.config.data is not None:
        # An inline config (the empty descriptor's `data`) is stored like any other: it is recorded
        # as a child below, and fsck holds every recorded child of held content to be present.
        store.put_bytes(m.config.data, m.config.digest)
    store.meta.set_children(
        sel.descriptor.digest, [d.digest for d in _needed(m)] + ([m.config.digest] if m.config.data is not None else [])
    )


def _offline(store: Store, ref: Reference | LayoutReference) -> StoreSource | None:
    key = ref_key(ref)
    rec = store.meta.get_ref(key)
    if rec is not None and store.has_blob(rec.digest):
        return StoreSource(store, rec.digest, rec.media_type, key)
    if ref.digest is not None and store.has_blob(ref.digest):
        return StoreSource(store, ref.digest, "", key)
    return None


def _complete(store: Store, sel: Selection) -> bool:
    return all(d.data is not None or store.has_blob(d.digest, d.size) for d in _needed(sel.manifest))


@dataclass
class PullPlan:
    """A resolved pull (:func:`plan_pull`): the manifest chosen for the node, and what fetching it
    takes. :meth:`run` fetches; a caller may first tap blobs (``fetcher.taps``) to consume them
    while they download, or wait on single blobs (``fetcher.done_event``)."""

    store: Store
    key: str
    selection: Selection
    t0: float
    progress: ProgressFn | None = None
    offline: PullResult | None = None
    source: Source | None = None
    resolved: Any = None
    fetcher: _Fetcher | None = None

    @property
    def manifest(self) -> Manifest:
        return self.selection.manifest

    def missing(self) -> list[Descriptor]:
        """Blobs of the manifest not in the store yet."""
        return [d for d in _needed(self.manifest) if d.data is None and not self.store.has_blob(d.digest, d.size)]

    def run(self) -> PullResult:
        """Fetch what is missing into the store (nothing for a pull satisfied by the store)."""
        if self.offline is not None:
            return self.offline
        assert self.source is not None and self.fetcher is not None
        store, sel, source, fetcher = self.store, self.selection, self.source, self.fetcher
        try:
            with store.hold([sel.root.digest, sel.descriptor.digest]):
                _store_manifests(store, source, sel, self.resolved[1])
                fetcher.fetch_all(_needed(sel.manifest))
                store.meta.set_ref(
                    self.key,
                    sel.root.digest,
                    media_type=self.resolved[1].media_type,
                    platform=str(sel.platform) if sel.platform else None,
                    source=source.describe(),
                )
        except BaseException as e:
            for d in _needed(sel.manifest):  # nobody may wait for a blob that will not come
                fetcher._ended(d, e)
            raise
        if self.progress:
            self.progress(ProgressEvent("done", str(sel.descriptor.digest)))
        return PullResult(
            self.key,
            sel.root.digest,
            sel.descriptor.digest,
            sel.manifest,
            sel,
            source.describe(),
            downloaded=fetcher.downloaded,
            reused=fetcher.reused,
            blobs=len(_needed(sel.manifest)),
            seconds=time.monotonic() - self.t0,
            warnings=sel.warnings,
        )


def plan_pull(
    ref: str | Reference | LayoutReference,
    *,
    root: str | os.PathLike[str] | Store,
    platforms: list[Platform] | None = None,
    policy: str = "native",
    pull_policy: str = "missing",
    options: RegistryOptions | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    part_size: int = DEFAULT_PART_SIZE,
    parts_per_blob: int = DEFAULT_PARTS_PER_BLOB,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> PullPlan:
    """Resolve `ref` for the node and say what pulling it takes; :meth:`PullPlan.run` fetches.
    Arguments as :func:`pull`."""
    if pull_policy not in PULL_POLICIES:
        raise UsageError(f"unknown pull policy {pull_policy!r}", hint="use always, missing or never")
    t0 = time.monotonic()
    r = parse_any(ref) if isinstance(ref, str) else ref
    store = root if isinstance(root, Store) else Store(root)
    node = platforms or [host_platform()]
    key = ref_key(r)

    if pull_policy in ("missing", "never"):
        src = _offline(store, r)
        if src is not None:
            try:
                sel = select_manifest(src, node, policy=policy)
                if _complete(store, sel):
                    if progress:
                        progress(ProgressEvent("resolved", str(sel.descriptor.digest), message="in store"))
                    done = PullResult(
                        key,
                        sel.root.digest,
                        sel.descriptor.digest,
                        sel.manifest,
                        sel,
                        src.describe(),
                        reused=sel.manifest.total_size,
                        offline=True,
                        seconds=time.monotonic() - t0,
                        warnings=sel.warnings,
                    )
                    return PullPlan(store, key, sel, t0, progress, offline=done)
            except NotFoundError:
                pass  # e.g. another platform's manifest was never fetched: go to the source
        if pull_policy == "never":
            raise NotFoundError(
                f"{key} is not in the store at {store.root} (pull policy never)",
                hint="pull it first (`imagevol pull`), or use --pull missing",
            )

    source = open_source(ref if isinstance(ref, str) else r, options=options)
    resolved = source.resolve()
    chosen_ref = getattr(source, "ref", r)
    if chosen_ref != r:  # a short name resolved through a search registry
        key = ref_key(chosen_ref)
    sel = select_manifest(source, node, policy=policy, resolved=resolved)
    if progress:
        progress(
            ProgressEvent(
                "resolved", str(sel.descriptor.digest), size=sel.manifest.total_size, message=source.describe()
            )
        )
    fetcher = _Fetcher(
        store,
        source,
        concurrency=concurrency,
        part_size=part_size,
        parts_per_blob=parts_per_blob,
        progress=progress,
        retries=options.retries if options is not None else 5,
        cancel=cancel,
    )
    return PullPlan(store, key, sel, t0, progress, source=source, resolved=resolved, fetcher=fetcher)


def pull(
    ref: str | Reference | LayoutReference,
    *,
    root: str | os.PathLike[str] | Store,
    platforms: list[Platform] | None = None,
    policy: str = "native",
    pull_policy: str = "missing",
    options: RegistryOptions | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    part_size: int = DEFAULT_PART_SIZE,
    parts_per_blob: int = DEFAULT_PARTS_PER_BLOB,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> PullResult:
    """Resolve `ref` for the node (`platforms`, a preference list; default this host) and make the
    chosen manifest's content present and verified in the store at `root`.

    pull_policy as in Kubernetes: `always` resolves at the source; `missing` (IfNotPresent) uses
    the store when the reference was pulled before and its content is complete; `never` uses only
    the store and fails clearly when content is absent. Setting `cancel` stops the pull at the next
    piece of each stream ("pull cancelled"); what was received is kept for the next pull.
    """
    return plan_pull(
        ref,
        root=root,
        platforms=platforms,
        policy=policy,
        pull_policy=pull_policy,
        options=options,
        concurrency=concurrency,
        part_size=part_size,
        parts_per_blob=parts_per_blob,
        progress=progress,
        cancel=cancel,
    ).run()


def export_layout(store: Store, result: PullResult, dest: str | LayoutReference) -> Descriptor:
    """Write the pulled manifest and its blobs into an OCI layout (`oci:DIR[:TAG]`), as `skopeo copy`
    without `--all` does: the tag names the manifest chosen for the node. Blobs are files of the
    layout's own: reflinks of the store's verified files where the file systems allow, else
    in-kernel copies; never hard links (a writable name for an inode the store serves from)."""
    from ..sinks.layout import LayoutSink

    ref = parse_any(dest) if isinstance(dest, str) else dest
    if not isinstance(ref, LayoutReference):
        raise UsageError(f"--output must be an OCI layout (oci:DIR[:TAG]), not {dest!r}")
    sink = LayoutSink.for_reference(ref)
    m = result.manifest
    for d in (m.config, *m.layers):
        if d.data is not None and not store.has_blob(d.digest):
            sink.put_blob_bytes(d.data, d.digest)
        else:
            sink.put_blob_file(store.blob_path(d.digest), d.digest, d.size, mode="clone")
    desc = sink.put_manifest(m.raw, m.media_type)
    sink.tag(desc, ref.tag)
    return desc
