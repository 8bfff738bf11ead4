"""Writing: a build's blobs, then its child manifests, then its root, into a sink (a registry or
an OCI layout). :func:`_push_blobs` writes blobs in parallel, largest first, each once, and names a
blob that has no digest yet from the digest cache or by reading it (first, or while it is written);
:func:`write` writes a finished :class:`~imagevol.pack.build.Built`."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence

from ..digest import Digest, digest_bytes
from ..manifest import Descriptor
from ..progress import ProgressFn
from ..sinks import Blob, Sink, hash_blob
from ..sinks.digestcache import DigestCache
from .build import Built, _CacheInfo, _emit, _run_parallel
from .spec import DEFAULT_CONCURRENCY

# ------------------------------------------------------------------------------------------------
# Writing


def _push_blobs(
    blobs: Sequence[Blob],
    sink: Sink,
    *,
    concurrency: int,
    progress: ProgressFn | None,
    cache: DigestCache | None = None,
    cache_info: Mapping[int, _CacheInfo] | None = None,
    written: set[Digest] | None = None,
) -> None:
    """Write blobs in parallel (bounded), largest first. A blob without a digest gets one: from the
    cache when the destination has it (then it is not read at all), else by reading it, first or while
    the sink writes it (:meth:`Sink.wants_digest_first`). ``written``: digests written so far (a blob
    of the same content is written once); updated."""
    written = set() if written is None else written
    infos = cache_info or {}
    mu = threading.Lock()

    def one(blob: Blob) -> None:
        info = infos.get(id(blob))
        read_here = blob.digest is None
        if blob.digest is None and cache is not None and info is not None:
            known = cache.get(info.key)
            if known is not None and sink.has_blob(known, blob.size):
                blob.digest = known
                sink.stats.add(skipped=1)
                with mu:
                    written.add(known)
                _emit(progress, "blob-start", digest=str(known), size=blob.size)
                _emit(progress, "blob-done", digest=str(known), size=blob.size, cached=True, message="skipped")
                return
        started = time.time_ns()
        if blob.digest is None and sink.wants_digest_first(blob):
            hash_blob(blob)
        # A blob hashed while it is written is named by its path until its digest is known.
        label = str(blob.digest) if blob.digest is not None else f"upload:{blob.what}"
        _emit(progress, "blob-start", digest=label, size=blob.size)
        if blob.digest is not None:
            with mu:
                duplicate = blob.digest in written
                written.add(blob.digest)
            if duplicate:  # the same content as another blob, which is written
                _emit(progress, "blob-done", digest=label, size=blob.size, cached=True, message="duplicate")
                return

        def tick(n: int) -> None:
            _emit(progress, "bytes", digest=label, n=n)

        how = sink.put_blob(blob, tick if progress is not None else None)
        assert blob.digest is not None
        with mu:
            written.add(blob.digest)
        if read_here and cache is not None and info is not None:
            cache.put(info.key, blob.digest, info.newest_ctime_ns, started)
        message = how if label == blob.digest else f"{how} {blob.digest}"
        _emit(progress, "blob-done", digest=label, size=blob.size, cached=how != "pushed", message=message)

    order = sorted(blobs, key=lambda x: (-x.size, x.digest or "", x.what))
    _run_parallel([lambda x=x: one(x) for x in order], concurrency)


def _write_documents(built: Built, sink: Sink, progress: ProgressFn | None, concurrency: int) -> Descriptor:
    """The child manifests (in parallel), then the root under the sink's tag."""
    children: dict[Digest, tuple[bytes, str]] = {}
    for body, media_type in built.children:
        children.setdefault(digest_bytes(body), (body, media_type))
    _run_parallel([lambda c=c: sink.put_manifest(*c) for c in children.values()], concurrency)
    root = sink.put_root(built.body, built.media_type)
    _emit(progress, "done", digest=str(root.digest), size=root.size)
    return root


def write(
    built: Built, sink: Sink, *, concurrency: int = DEFAULT_CONCURRENCY, progress: ProgressFn | None = None
) -> Descriptor:
    """Blobs in parallel (bounded), then the child manifests, then the root under the sink's tag."""
    blobs = list(built.blobs.values())
    _emit(progress, "resolved", digest=str(built.digest), size=sum(x.size for x in blobs))
    _push_blobs(blobs, sink, concurrency=concurrency, progress=progress)
    return _write_documents(built, sink, progress, concurrency)
