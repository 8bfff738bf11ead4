"""Content digests: validation before any use, and streaming verification.

A digest is validated before it is used to build a path (`blobs/<alg>/<hex>`): an unchecked digest
from a manifest is a path traversal waiting to happen (CVE-2024-3727).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from .errors import DigestMismatchError, InvalidDigestError

# Algorithms imagevol verifies, with the exact length of their lowercase hex encoding.
ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}

_GRAMMAR = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


class Digest(str):
    """A validated `algorithm:hex` digest. It is a `str`, so it prints and serializes as itself."""

    __slots__ = ()

    def __new__(cls, value: str) -> Digest:
        if isinstance(value, Digest):
            return value
        if not isinstance(value, str):
            raise InvalidDigestError(f"digest must be a string, got {type(value).__name__}")
        if not _GRAMMAR.match(value):
            raise InvalidDigestError(
                f"invalid digest {value!r}: expected 'algorithm:hex', e.g. 'sha256:' followed by 64 hex digits"
            )
        alg, _, hx = value.partition(":")
        want = ALGORITHMS.get(alg)
        if want is None:
            raise InvalidDigestError(
                f"unsupported digest algorithm {alg!r} in {value!r}",
                hint="supported algorithms: " + ", ".join(ALGORITHMS),
            )
        if len(hx) != want:
            raise InvalidDigestError(f"invalid digest {value!r}: {alg} needs {want} hex digits, got {len(hx)}")
        if not re.fullmatch(r"[0-9a-f]+", hx):
            raise InvalidDigestError(f"invalid digest {value!r}: the hex part must be lowercase 0-9a-f")
        return super().__new__(cls, value)

    @property
    def algorithm(self) -> str:
        return self.partition(":")[0]

    @property
    def hex(self) -> str:  # type: ignore[override]
        return self.partition(":")[2]

    @property
    def short(self) -> str:
        """The first 12 hex digits, for display."""
        return self.hex[:12]

    def hasher(self) -> Any:
        return hashlib.new(self.algorithm)

    def __repr__(self) -> str:
        return f"Digest({str.__repr__(self)})"


def is_digest(value: str) -> bool:
    try:
        Digest(value)
    except InvalidDigestError:
        return False
    return True


def digest_bytes(data: bytes | bytearray | memoryview, algorithm: str = "sha256") -> Digest:
    return Digest(f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}")


class Verifier:
    """Hashes a stream as it passes; :meth:`verify` raises if the result is not the expected digest."""

    __slots__ = ("_h", "expected", "size")

    def __init__(self, expected: Digest | str) -> None:
        self.expected = Digest(expected)
        self._h = self.expected.hasher()
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)
        self.size += len(data)

    def digest(self) -> Digest:
        return Digest(f"{self.expected.algorithm}:{self._h.hexdigest()}")

    def verified(self) -> bool:
        return self.digest() == self.expected

    def verify(self, what: str = "content") -> None:
        got = self.digest()
        if got != self.expected:
            raise DigestMismatchError(
                f"{what} does not match its digest: expected {self.expected}, got {got} ({self.size} bytes)",
                hint="the source served wrong or corrupted bytes; nothing was stored",
            )


def verify_bytes(data: bytes, expected: Digest | str, what: str = "content") -> None:
    v = Verifier(expected)
    v.update(data)
    v.verify(what)
