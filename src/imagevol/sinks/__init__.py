"""Where packed (or pulled) content is written: a registry repository or an OCI image layout.

Every sink takes blobs first, then child manifests by digest, then the root under the sink's own
reference (a registry tag, or a layout's ``org.opencontainers.image.ref.name``), so a reader never
sees a manifest whose content is missing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..digest import Digest
from ..errors import ImagevolError
from ..manifest import Descriptor

__all__ = ["Blob", "FileRange", "PushStats", "Sink", "open_sink"]

PIECE = 1 << 20


@dataclass
class Blob:
    """A blob to write: its bytes are ``data``, or the whole file at ``path``.

    temporary: ``path`` is a scratch file owned by the caller, which a sink may move instead of copy.
    """

    digest: Digest
    size: int
    media_type: str = "application/octet-stream"
    path: Path | None = None
    data: bytes | None = None
    temporary: bool = False
    what: str = ""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("a Blob has either path or data")


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


class FileRange:
    """Bytes ``[start, start + length)`` of a file as a request body that can be sent again.

    Each iteration opens the file and yields it in 1 MiB pieces (constant memory); a retried request
    iterates from the start again. ``on_bytes`` is told the size of every piece sent.
    """

    def __init__(
        self, path: Path | str, start: int, length: int, on_bytes: Callable[[int], None] | None = None
    ) -> None:
        self.path = Path(path)
        self.start = start
        self.length = length
        self.on_bytes = on_bytes

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.start)
            left = self.length
            while left:
                data = f.read(min(PIECE, left))
                if not data:
                    raise ImagevolError(
                        f"{self.path} is shorter than when it was packed",
                        hint="do not modify the directory while `imagevol pack` runs",
                    )
                left -= len(data)
                if self.on_bytes is not None:
                    self.on_bytes(len(data))
                yield data


class Sink(Protocol):
    """A destination for blobs and manifests."""

    stats: PushStats

    def describe(self) -> str: ...

    def has_blob(self, digest: Digest, size: int | None = None) -> bool: ...

    def put_blob(self, blob: Blob, progress: Callable[[int], None] | None = None) -> str:
        """Write one blob; returns ``pushed``, ``skipped`` (already there) or ``mounted``."""
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
