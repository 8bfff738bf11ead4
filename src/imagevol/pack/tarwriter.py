"""A deterministic, streaming tar writer (for `imagevol pack`).

The same input tree gives the same bytes on any host, on any day:

* entries are written in the order the caller gives (pack walks depth first, children sorted by
  the bytes of their names);
* every header is PAX-format ustar from :mod:`tarfile` (headers only: file data is streamed by this
  module in 1 MiB pieces, never held whole in memory), with uid/gid 0, no user or group names, no
  device numbers, and one fixed mtime: 0, or ``SOURCE_DATE_EPOCH`` when set; PAX records appear only
  where ustar cannot hold a field (long or non-ASCII names, sizes of 8 GiB and more);
* the archive ends with two zero blocks and no record padding (as Go's archive/tar, buildkit).

:class:`LayerWriter` compresses on the way (none, gzip with mtime 0 and no file name, zstd
multi-threaded) and computes the blob digest, the uncompressed digest (the diff_id) and both sizes
in the same pass. zstd output of libzstd's multi-threaded mode does not depend on the number of
worker threads, so ``threads=-1`` (all CPUs) still gives the same bytes on every machine.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
from typing import Any, BinaryIO

from ..digest import Digest
from ..errors import ImagevolError, UsageError

__all__ = [
    "COMPRESSIONS",
    "GZIP_LEVEL",
    "ZSTD_LEVEL",
    "LayerWriter",
    "TarParts",
    "TarWriter",
    "source_date_epoch",
]

CHUNK = 1 << 20
BLOCK = 512
COMPRESSIONS = ("none", "gzip", "zstd")
GZIP_LEVEL = 6
ZSTD_LEVEL = 3


def source_date_epoch() -> int:
    """The fixed timestamp of packed content: ``SOURCE_DATE_EPOCH`` (seconds) if set, else 0."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(
            f"SOURCE_DATE_EPOCH={raw!r} is not an integer", hint="set it to seconds since 1970, or unset it"
        ) from None
    if value < 0:
        raise UsageError(f"SOURCE_DATE_EPOCH={raw!r} is negative")
    return value


class _Hashing:
    """A write-only stream that hashes and counts what passes, then hands it on (or drops it)."""

    def __init__(self, out: BinaryIO | None) -> None:
        self.out = out
        self.h = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.h.update(data)
        self.size += len(data)
        if self.out is not None:
            self.out.write(data)
        return len(data)

    def flush(self) -> None:
        if self.out is not None:
            self.out.flush()

    def digest(self) -> Digest:
        return Digest("sha256:" + self.h.hexdigest())


class TarWriter:
    """Writes tar entries to ``out`` (anything with ``write``). Call :meth:`close` to end the archive."""

    def __init__(self, out: Any, *, mtime: int = 0) -> None:
        self.out = out
        self.mtime = int(mtime)
        self.size = 0
        self.entries = 0
        self._closed = False

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        self.out.write(data)
        self.size += len(data)

    def _header(self, name: str, type_: bytes, mode: int, *, size: int = 0, linkname: str = "") -> None:
        if self._closed:
            raise ValueError("tar archive already closed")
        ti = tarfile.TarInfo(name)
        ti.type = type_
        ti.mode = mode & 0o7777
        ti.size = size
        ti.linkname = linkname
        ti.mtime = self.mtime
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        ti.devmajor = ti.devminor = 0
        self._write(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        self.entries += 1

    def _pad(self, size: int) -> None:
        rest = size % BLOCK
        if rest:
            self._write(bytes(BLOCK - rest))

    def add_dir(self, name: str, mode: int) -> None:
        self._header(name, tarfile.DIRTYPE, mode)

    def add_symlink(self, name: str, target: str) -> None:
        self._header(name, tarfile.SYMTYPE, 0o777, linkname=target)

    def add_hardlink(self, name: str, target: str, mode: int) -> None:
        self._header(name, tarfile.LNKTYPE, mode, linkname=target)

    def add_bytes(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._header(name, tarfile.REGTYPE, mode, size=len(data))
        self._write(data)
        self._pad(len(data))

    def add_file(self, name: str, path: str | os.PathLike[str], mode: int, size: int) -> None:
        """Stream the regular file ``path`` as entry ``name``; it must still be ``size`` bytes long.

        An output with ``add_file_part(path, size)`` (:class:`TarParts`) is handed the file instead of
        its bytes."""
        add_part = getattr(self.out, "add_file_part", None)
        if add_part is not None:
            self._header(name, tarfile.REGTYPE, mode, size=size)
            add_part(path, size)
            self.size += size
            self._pad(size)
            return
        with open(path, "rb", buffering=0) as f:
            self._header(name, tarfile.REGTYPE, mode, size=size)
            left = size
            while left:
                data = f.read(min(CHUNK, left))
                if not data:
                    raise ImagevolError(
                        f"{path} shrank while it was packed ({size - left} of {size} bytes read)",
                        hint="do not modify the directory while `imagevol pack` runs",
                    )
                self._write(data)
                left -= len(data)
            if f.read(1):
                raise ImagevolError(
                    f"{path} grew while it was packed (more than {size} bytes)",
                    hint="do not modify the directory while `imagevol pack` runs",
                )
        self._pad(size)

    def close(self) -> None:
        if not self._closed:
            self._write(bytes(2 * BLOCK))
            self._closed = True


class LayerWriter:
    """A tar layer written once: the uncompressed stream is hashed (diff_id), compressed, hashed
    again (digest) and written to ``out`` (None: only hashed). Add entries through :attr:`tar`,
    then call :meth:`finish`."""

    def __init__(self, out: BinaryIO | None, compression: str = "none", *, mtime: int = 0) -> None:
        if compression not in COMPRESSIONS:
            raise UsageError(
                f"unknown compression {compression!r}", hint="compression is one of: " + ", ".join(COMPRESSIONS)
            )
        self.compression = compression
        self.blob = _Hashing(out)
        self.raw = _Hashing(None)
        self._compressor: Any = None
        if compression == "gzip":
            # No file name and mtime 0 in the gzip header: the bytes depend on the content only.
            self._compressor = gzip.GzipFile(
                filename="",
                mode="wb",
                fileobj=self.blob,  # type: ignore[arg-type]
                compresslevel=GZIP_LEVEL,
                mtime=0,
            )
        elif compression == "zstd":
            import zstandard

            cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1)
            self._compressor = cctx.stream_writer(self.blob, closefd=False)
        self.tar = TarWriter(self, mtime=mtime)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._compressor is None:
            self.blob.write(data)  # uncompressed: one hash is both digests
        else:
            self.raw.write(data)
            self._compressor.write(data)
        return len(data)

    def finish(self) -> tuple[Digest, int, Digest, int]:
        """End the archive; returns (digest, size, diff_id, uncompressed size)."""
        self.tar.close()
        if self._compressor is not None:
            self._compressor.close()
        self.blob.flush()
        if self._compressor is None:
            return self.blob.digest(), self.blob.size, self.blob.digest(), self.blob.size
        return self.blob.digest(), self.blob.size, self.raw.digest(), self.raw.size


class TarParts:
    """An uncompressed tar layer described without reading a byte of file data: headers, padding and
    the end of the archive as ``bytes`` parts, each file's data as a
    :class:`imagevol.sinks.FileRange` of the file itself (read when the layer is hashed or sent).
    The concatenation is exactly what :class:`TarWriter` writes. Add entries through :attr:`tar`,
    then call :meth:`finish`."""

    def __init__(self, *, mtime: int = 0) -> None:
        self.parts: list[Any] = []
        self._pending = bytearray()
        self.tar = TarWriter(self, mtime=mtime)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._pending += data
        return len(data)

    def add_file_part(self, path: str | os.PathLike[str], size: int) -> None:
        from ..sinks import FileRange

        self._flush()
        if size:
            self.parts.append(FileRange(path, 0, size, file_size=size))

    def _flush(self) -> None:
        if self._pending:
            self.parts.append(bytes(self._pending))
            self._pending = bytearray()

    def finish(self) -> tuple[tuple[Any, ...], int]:
        """End the archive; returns (parts, size)."""
        self.tar.close()
        self._flush()
        return tuple(self.parts), self.tar.size
