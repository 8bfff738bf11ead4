"""Paths of artifact layers: which annotation names a layer's path (:func:`_layer_path`), the
applier's length and depth limits for titles and file paths (:func:`_precheck_paths`), splitting
a path into components that cannot escape (:func:`safe_parts`), and tar probing: whether a blob's
first block is a tar header (:func:`looks_like_tar`) and where a tar that belongs to a path is
extracted (:func:`_tar_base`).
"""

from __future__ import annotations

import os
from typing import BinaryIO

from .. import mediatypes as mt
from ..errors import UnsafeContentError
from ..manifest import Descriptor, Manifest
from ..unpack.applier import MAX_DEPTH, PATH_MAX
from .options import NAME_MAX


def _layer_path(layer: Descriptor, fl: str) -> str | None:
    """The path annotation of a layer: for ModelPack the file path first, else the OCI title first."""
    keys = (
        (mt.ANN_CNCF_FILEPATH, mt.ANN_CNAI_FILEPATH, mt.ANN_TITLE)
        if fl == "modelpack"
        else (mt.ANN_TITLE, mt.ANN_CNCF_FILEPATH, mt.ANN_CNAI_FILEPATH)
    )
    for k in keys:
        v = layer.annotations.get(k)
        if v:
            return v
    return None


def _check_limits(path: str, what: str) -> None:
    """The limits the applier puts on tar entry paths, for titles, ModelPack and Kitfile paths:
    at most PATH_MAX - 1 bytes and MAX_DEPTH components (UnsafeContentError)."""
    try:
        size = len(os.fsencode(path))
    except UnicodeEncodeError:
        raise UnsafeContentError(f"{what}: path {path!r} is not valid Unicode (a lone surrogate)") from None
    if size >= PATH_MAX:
        raise UnsafeContentError(
            f"{what}: path {path[:60]!r}... is {size} bytes long, the limit is {PATH_MAX - 1}",
            hint="titles and file paths of artifacts are held to the limits of image layer paths",
        )
    if path.count("/") >= MAX_DEPTH and len([c for c in path.split("/") if c not in ("", ".")]) > MAX_DEPTH:
        raise UnsafeContentError(
            f"{what}: path {path[:60]!r}... has more than {MAX_DEPTH} components",
            hint="titles and file paths of artifacts are held to the limits of image layer paths",
        )


def _precheck_paths(manifest: Manifest) -> None:
    """Refuse an over-long or over-deep title / file path annotation before anything is built."""
    for i, layer in enumerate(manifest.layers):
        for k in (mt.ANN_TITLE, mt.ANN_CNCF_FILEPATH, mt.ANN_CNAI_FILEPATH):
            v = layer.annotations.get(k)
            if isinstance(v, str) and v:
                _check_limits(v, f"layer {i} ({layer.digest.short}, {layer.media_type or 'no media type'}): {k}")


def safe_parts(path: str, what: str, *, normalize: bool = False) -> list[str]:
    """Split a title / file path into components, refusing anything that could escape.

    Refused (UnsafeContentError): empty, NUL, absolute, longer than the applier's PATH_MAX - 1 bytes
    or deeper than its MAX_DEPTH components, a ``..`` component, and — unless
    ``normalize`` — empty or ``.`` components (one trailing ``/`` is tolerated) and the bare ``.``.
    With ``normalize`` (Kitfile paths), ``./`` components are dropped and ``.`` means the root.
    """
    if not isinstance(path, str) or not path:
        raise UnsafeContentError(f"{what}: empty path")
    if "\0" in path:
        raise UnsafeContentError(f"{what}: path {path!r} contains a NUL byte")
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise UnsafeContentError(f"{what}: path {path!r} is not valid Unicode (a lone surrogate)") from None
    if path.startswith("/"):
        raise UnsafeContentError(f"{what}: path {path!r} is absolute", hint="paths must be relative to the volume")
    _check_limits(path, what)
    parts = path.split("/")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    out: list[str] = []
    for c in parts:
        if normalize and c in ("", "."):
            continue
        if c == "..":
            raise UnsafeContentError(f"{what}: path {path!r} has a '..' component", hint="it would escape the volume")
        if c in ("", "."):
            raise UnsafeContentError(f"{what}: path {path!r} has an empty or '.' component")
        if len(os.fsencode(c)) > NAME_MAX:
            raise UnsafeContentError(f"{what}: path {path[:80]!r}... has a component longer than {NAME_MAX} bytes")
        out.append(c)
    if not out and not normalize:
        raise UnsafeContentError(f"{what}: path {path!r} names the volume root itself")
    return out


def _octal(field_: bytes) -> int | None:
    s = field_.replace(b"\0", b" ").strip()
    if not s:
        return None
    try:
        return int(s, 8)
    except ValueError:
        return None


def looks_like_tar(block: bytes) -> bool:
    """True if ``block`` (the first 512 bytes of a stream) is a valid tar header: its checksum
    matches (ustar, GNU and v7 headers all carry one). An all-zero block (an empty archive) is not
    taken for a tar: such a layer is placed as a file."""
    if len(block) < 512 or not block.strip(b"\0"):
        return False
    stored = _octal(block[148:156])
    if stored is None:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:512])
    signed = unsigned - 256 * sum(1 for b in block[:148] if b > 127) - 256 * sum(1 for b in block[156:512] if b > 127)
    return stored in (unsigned, signed)


def _tar_base(parts: list[str], first: list[str]) -> list[str]:
    """Where a tar that belongs to path ``parts`` is extracted, from its first entry's components."""
    if not parts:
        return []
    if first[: len(parts)] == parts or (first and len(first) < len(parts) and parts[: len(first)] == first):
        return []  # entries carry the full path (the first entry may be a parent directory of it)
    if first[:1] == parts[-1:]:
        return parts[:-1]  # entries carry the last component
    return parts  # entries are the directory's content


def _read_upto(f: BinaryIO, n: int) -> bytes:
    """`n` bytes of `f`, fewer only at its end (raw streams may hand out less per read)."""
    parts: list[bytes] = []
    got = 0
    while got < n and (data := f.read(n - got)):
        parts.append(data)
        got += len(data)
    return b"".join(parts)
