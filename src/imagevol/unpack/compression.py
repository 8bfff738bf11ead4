"""Streaming decompression of layer blobs: gzip, zstd or none, sniffed when not declared.

Docker's `rootfs.diff.tar` media type is sometimes used for compressed bytes, so a caller that does
not trust the media type passes ``compression=None`` and the first bytes decide. Output is produced
in bounded pieces whatever the input (a zstd frame of a few bytes may expand to gigabytes), so the
optional decompression-bomb limits are checked before much more than one buffer is ever produced.
"""

from __future__ import annotations

import io
import zlib

try:  # ISA-L inflates 1.5x faster than zlib here (docs/performance.md); zlib is the fallback.
    from isal import isal_zlib as _inflate
except ImportError:  # pragma: no cover - isal is a declared dependency
    _inflate = zlib  # type: ignore[assignment]
from typing import Any, BinaryIO

import zstandard

from ..errors import ContentRefusedError, LimitExceededError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
COMPRESSIONS = ("gzip", "zstd", "none")

# Compressed bytes read from the source at a time, and decompressed bytes handed out at a time.
_IN_CHUNK = 1 << 20
_OUT_CHUNK = 1 << 20
# The ratio limit only applies beyond this much output: the first few KiB of any stream (a tar
# header block of zeros, say) compress far better than the stream as a whole.
RATIO_GRACE = 1 << 20


def sniff(head: bytes) -> str:
    """'gzip', 'zstd' or 'none' from the first bytes of a blob (at least 4 bytes for zstd)."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


class _Source:
    """The compressed input: bytes already peeked, then the caller's stream; counts what was read."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._head = b""
        self.consumed = 0

    def peek_head(self, n: int) -> bytes:
        while len(self._head) < n:
            more = self._f.read(n - len(self._head))
            if not more:
                break
            self._head += more
        return self._head[:n]

    def read_some(self, n: int = _IN_CHUNK) -> bytes:
        """Up to `n` bytes (fewer at the end, b'' past it), as the caller's stream hands them out."""
        if self._head:
            data, self._head = self._head[:n], self._head[n:]
        else:
            data = self._f.read(n)
        self.consumed += len(data)
        return data


# Each decoder is a function `produce(n) -> bytes` that returns the next 1..n decompressed bytes, or
# b'' at the end of the stream. The bytes the decompressor returns are handed out as they are: the
# stream makes no copies of its own (layers are gigabytes; every copy is a pass over them).


class _Gzip:
    """gzip via zlib (ISA-L): multi-member streams, CRC/size checked, output bounded per call."""

    def __init__(self, src: _Source) -> None:
        self._src = src
        self._d = _inflate.decompressobj(16 + zlib.MAX_WBITS)
        self._tail = b""
        self._done = False

    def _next_member(self) -> bool:
        """After a member ended: start the next one, or finish. Trailing zero padding is tolerated."""
        data = self._d.unused_data
        while len(data) < 2:
            more = self._src.read_some()
            if not more:
                break
            data += more
        if not data:
            return False
        if data.startswith(GZIP_MAGIC):
            self._d = _inflate.decompressobj(16 + zlib.MAX_WBITS)
            self._tail = data
            return True
        while data:
            if data.count(0) != len(data):
                raise ContentRefusedError(
                    "layer blob has trailing garbage after its gzip stream",
                    hint="the blob is not a valid gzip stream; check the layer's media type",
                )
            data = self._src.read_some()
        return False

    def produce(self, want: int) -> bytes:
        while not self._done:
            if self._d.eof and not self._next_member():
                self._done = True
                break
            if self._d.unconsumed_tail:
                data = self._d.unconsumed_tail
            elif self._tail:
                data, self._tail = self._tail, b""
            else:
                data = self._src.read_some()
                if not data:
                    raise ContentRefusedError(
                        "gzip layer stream is truncated",
                        hint="the blob ended before its gzip trailer; fetch it again",
                    )
            try:
                out = self._d.decompress(data, want)
            except (zlib.error, _inflate.error) as e:
                raise ContentRefusedError(
                    f"gzip layer stream is corrupt: {e}",
                    hint="the blob is not valid gzip; check the layer's media type",
                ) from None
            if out:
                return out
        return b""


class _Zstd:
    """zstd via the `zstandard` package: all frames of the stream, output bounded per call."""

    def __init__(self, src: _Source) -> None:
        self._r = zstandard.ZstdDecompressor().stream_reader(
            _SourceFile(src), read_size=_IN_CHUNK, read_across_frames=True, closefd=False
        )

    def produce(self, want: int) -> bytes:
        try:
            return self._r.read(want)
        except zstandard.ZstdError as e:
            raise ContentRefusedError(
                f"zstd layer stream is corrupt: {e}",
                hint="the blob is not valid zstd; check the layer's media type",
            ) from None


class _SourceFile(io.RawIOBase):
    """A _Source as the file object `zstandard` reads from."""

    def __init__(self, src: _Source) -> None:
        self._src = src

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        return self._src.read_some(_IN_CHUNK if n is None or n < 0 else n)

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._src.read_some(len(b))
        b[: len(data)] = data
        return len(data)


class DecompressedStream(io.RawIOBase):
    """The decompressed bytes of a layer blob, with the decompression-bomb limits applied.

    ``read(n)`` returns between 1 and ``n`` bytes (fewer than asked is not the end; b'' is), the
    contract of a raw stream, without copying what the decompressor produced.
    """

    def __init__(self, produce: Any, src: _Source, max_ratio: float | None, max_size: int | None) -> None:
        self._produce = produce
        self._src = src
        self._max_ratio = max_ratio
        self._max_size = max_size
        self.produced = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:  # type: ignore[override]
        if n is None or n < 0:
            parts = []
            while data := self.read(_OUT_CHUNK):
                parts.append(data)
            return b"".join(parts)
        if n == 0:
            return b""
        data = self._produce(n)
        if data:
            self._count(len(data))
        return data

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def _count(self, n: int) -> None:
        self.produced += n
        if self._max_size is not None and self.produced > self._max_size:
            raise LimitExceededError(
                f"layer decompresses to more than max_size={self._max_size} bytes",
                hint="raise the limit (`imagevol mount --max-size`, max_size in the API) if the content is trusted",
            )
        ratio_limit = None if self._max_ratio is None else self._max_ratio * self._src.consumed + RATIO_GRACE
        if ratio_limit is not None and self.produced > ratio_limit:
            raise LimitExceededError(
                f"layer decompression ratio exceeds max_ratio={self._max_ratio:g} "
                f"({self.produced} bytes out of {self._src.consumed} compressed bytes so far)",
                hint="raise the limit (`imagevol mount --max-ratio`, 0 for none; max_ratio in the API) "
                "if the content is trusted",
            )


def open_decompressed(
    f: BinaryIO,
    compression: str | None = None,
    *,
    max_ratio: float | None = None,
    max_size: int | None = None,
) -> BinaryIO:
    """A readable stream of the decompressed bytes of `f`, decompressed as they are read.

    `compression` is 'gzip', 'zstd' or 'none'; None sniffs the first bytes. `max_size` caps the
    decompressed size in bytes and `max_ratio` the ratio of decompressed to compressed bytes
    (beyond a grace of :data:`RATIO_GRACE` bytes); exceeding either raises ContentRefusedError.
    The returned stream does not close `f`.
    """
    if max_ratio is not None and not max_ratio > 0:
        raise ValueError(f"max_ratio must be positive, got {max_ratio!r}")
    if max_size is not None and max_size < 0:
        raise ValueError(f"max_size must not be negative, got {max_size!r}")
    src = _Source(f)
    if compression is None:
        compression = sniff(src.peek_head(4))
    produce: Any
    if compression == "gzip":
        produce = _Gzip(src).produce
    elif compression == "zstd":
        produce = _Zstd(src).produce
    elif compression == "none":
        produce = src.read_some
    else:
        raise ContentRefusedError(
            f"unsupported layer compression {compression!r}",
            hint="supported: " + ", ".join(COMPRESSIONS),
        )
    return DecompressedStream(produce, src, max_ratio, max_size)  # type: ignore[return-value]
