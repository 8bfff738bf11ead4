"""Where packed (or pulled) content is written: a registry repository or an OCI image layout.

Every sink takes blobs first, then child manifests by digest, then the root under the sink's own
reference (a registry tag, or a layout's ``org.opencontainers.image.ref.name``), so a reader never
sees a manifest whose content is missing.

A blob's bytes are ``data``, a whole file (``path``) or a sequence of ``parts`` (bytes and
:class:`FileRange` slices of files, concatenated: an uncompressed tar layer is its headers and
padding in memory plus the files it holds, read from where they are). A blob may come without its
digest: the sink computes it while it reads the bytes once (a registry sink while it uploads them).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..digest import Digest
from ..errors import ImagevolError
from ..manifest import Descriptor

__all__ = ["Blob", "FileRange", "PushStats", "Sink", "hash_blob", "open_sink"]

PIECE = 1 << 20


_scope = threading.local()


def stop_with(cancel: threading.Event | None) -> None:
    """Reads of blobs in this thread (hashing, uploads: :meth:`Blob.views`) raise ImagevolError
    "cancelled" between pieces once `cancel` is set (an interrupted or failed push)."""
    _scope.cancel = cancel


def _check_cancel() -> None:
    cancel = getattr(_scope, "cancel", None)
    if cancel is not None and cancel.is_set():
        raise ImagevolError("cancelled")


def _changed(path: Path | str, what: str) -> ImagevolError:
    return ImagevolError(
        f"{path} {what} while it was packed", hint="do not modify the directory while `imagevol pack` runs"
    )


class FileRange:
    """Bytes ``[start, start + length)`` of a file as a request body that can be sent again.

    Iterating opens the file and yields it in 1 MiB pieces (constant memory); a retried request
    iterates from the start again. ``on_bytes`` is told the size of every piece sent. ``file_size``:
    the size the whole file must still have when the range is read to its end (it is checked).
    """

    def __init__(
        self,
        path: Path | str,
        start: int,
        length: int,
        on_bytes: Callable[[int], None] | None = None,
        *,
        file_size: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.start = start
        self.length = length
        self.on_bytes = on_bytes
        self.file_size = file_size

    def __iter__(self) -> Iterator[bytes]:
        buf = bytearray(min(PIECE, self.length))
        for view in self.views(buf):
            if self.on_bytes is not None:
                self.on_bytes(len(view))
            yield bytes(view)

    def views(self, buf: bytearray, start: int = 0, length: int | None = None) -> Iterator[memoryview]:
        """Bytes ``[start, start + length)`` of the range read into ``buf`` (reused: each view is
        valid until the next one is asked for)."""
        left = self.length - start if length is None else length
        pos = self.start + start
        mv = memoryview(buf)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ImagevolError(
                f"cannot read {self.path}: {e.strerror}", hint="do not modify the directory while `imagevol pack` runs"
            ) from None
        try:
            while left > 0:
                _check_cancel()
                n = os.preadv(fd, [mv[: min(len(mv), left)]], pos)
                if n <= 0:
                    raise _changed(self.path, "shrank")
                pos += n
                left -= n
                yield mv[:n]
            whole = self.file_size is not None and pos == self.start + self.length == self.file_size
            if whole and os.fstat(fd).st_size != self.file_size:
                raise _changed(self.path, f"changed size (it had {self.file_size} bytes)")
        finally:
            os.close(fd)


Part = bytes | FileRange


def _part_len(p: Part) -> int:
    return p.length if isinstance(p, FileRange) else len(p)


@dataclass(eq=False)
class Blob:
    """A blob to write: its bytes are ``data``, the whole file at ``path``, or ``parts`` concatenated.

    digest: None until computed (by :func:`hash_blob`, or by the sink that writes the blob, which
    sets it). temporary: ``path`` is a scratch file owned by the caller, which a sink may move
    instead of copy.
    """

    digest: Digest | None
    size: int
    media_type: str = "application/octet-stream"
    path: Path | None = None
    data: bytes | None = None
    parts: tuple[Part, ...] | None = None
    temporary: bool = False
    what: str = ""

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.path, self.data, self.parts)) != 1:
            raise ValueError("a Blob has exactly one of path, data or parts")
        if self.parts is not None and sum(_part_len(p) for p in self.parts) != self.size:
            raise ValueError("the parts of a Blob add up to its size")

    def pieces(self) -> tuple[Part, ...]:
        if self.data is not None:
            return (self.data,)
        if self.path is not None:
            return (FileRange(self.path, 0, self.size, file_size=self.size),)
        assert self.parts is not None
        return self.parts

    def views(self, buf: bytearray, start: int = 0, length: int | None = None) -> Iterator[memoryview]:
        """Bytes ``[start, start + length)`` of the blob, as views of ``buf`` (file parts, read into
        it) or of the blob's own bytes; each view is valid until the next one is asked for."""
        left = self.size - start if length is None else length
        pos = 0
        for p in self.pieces():
            if left <= 0:
                break
            n = _part_len(p)
            if pos + n <= start:
                pos += n
                continue
            off = max(0, start - pos)
            take = min(n - off, left)
            if isinstance(p, FileRange):
                yield from p.views(buf, off, take)
            else:
                mv = memoryview(p)
                for i in range(off, off + take, PIECE):
                    _check_cancel()
                    yield mv[i : min(i + PIECE, off + take)]
            left -= take
            pos += n
        if left > 0:
            raise ValueError(f"blob {self.what or self.digest} has fewer than {start + (length or 0)} bytes")

    def read_bytes(self) -> bytes:
        """The whole blob in memory (for small blobs and tests)."""
        if self.data is not None:
            return self.data
        buf = bytearray(PIECE)
        return b"".join(bytes(v) for v in self.views(buf))


def hash_blob(blob: Blob, algorithm: str = "sha256", progress: Callable[[int], None] | None = None) -> Digest:
    """Read the blob once and return its digest (also stored in ``blob.digest`` when it had none)."""
    h = hashlib.new(algorithm)
    buf = bytearray(PIECE)
    for v in blob.views(buf):
        h.update(v)
        if progress is not None:
            progress(len(v))
    d = Digest(f"{algorithm}:{h.hexdigest()}")
    if blob.digest is None:
        blob.digest = d
    return d


@dataclass
class PushStats:
    """What a sink did (thread-safe counters)."""

    pushed: int = 0
    skipped: int = 0
    mounted: int = 0
    bytes_pushed: int = 0
    chunks: int = 0
    manifests: int = 0
    _mu: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._mu:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)


class Sink(Protocol):
    """A destination for blobs and manifests."""

    stats: PushStats

    def describe(self) -> str: ...

    def has_blob(self, digest: Digest, size: int | None = None) -> bool: ...

    def wants_digest_first(self, blob: Blob) -> bool:
        """True when the sink needs ``blob.digest`` before :meth:`put_blob` (to skip what it has);
        False when it computes the digest itself while writing the blob."""
        ...

    def put_blob(self, blob: Blob, progress: Callable[[int], None] | None = None) -> str:
        """Write one blob; returns ``pushed``, ``skipped`` (already there) or ``mounted``. A blob
        without a digest gets it set."""
        ...

    def put_manifest(self, body: bytes, media_type: str) -> Descriptor:
        """Write a (child) manifest or index by digest."""
        ...

    def put_root(self, body: bytes, media_type: str) -> Descriptor:
        """Write the root manifest or index under the sink's own reference (tag)."""
        ...

    def close(self) -> None: ...


def open_sink(
    ref: str,
    *,
    options: Any = None,
    mount_from: tuple[str, ...] | list[str] = (),
    chunk_size: int | None = None,
) -> Sink:
    """A sink for ``ref``: ``oci:PATH[:TAG]`` writes an OCI layout (created if needed), anything else
    pushes to a registry."""
    from ..reference import LayoutReference, parse_any

    r = parse_any(ref)
    if isinstance(r, LayoutReference):
        from .layout import LayoutSink

        return LayoutSink.for_reference(r)
    from .registry import DEFAULT_CHUNK_SIZE, RegistrySink

    return RegistrySink(r, options=options, mount_from=mount_from, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE)
