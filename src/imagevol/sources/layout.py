"""OCI image layouts on disk (`oci:PATH[:TAG|@DIGEST]`), read side.

The layout's `index.json` is the root; a tag names the entry whose
`org.opencontainers.image.ref.name` annotation equals it (skopeo's and umoci's convention).
Every blob path is built from a validated digest and checked to stay inside the layout.

A layout directory is not trusted either (it may come from anyone's unpacked tarball): every file in
it (``oci-layout``, ``index.json``, each blob) is reached from a descriptor of the layout directory,
one component at a time with ``O_NOFOLLOW``, and must be a regular file. It is opened ``O_PATH``
first and its type checked with ``fstat`` before it is opened for reading, so a FIFO never blocks
the open, a device is never opened at all, and a symlink (even to a file inside the layout) is
refused (UnsafeContentError, exit code 4) naming the file and what it is. Reads are bounded:
``oci-layout``, ``index.json`` and manifests by MAX_MANIFEST_SIZE, a blob by its descriptor's size
(a blob of another size is refused before it is read). The layout path the user gives may itself be
a symlink: only what is inside the layout is restricted.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .. import mediatypes as mt
from ..digest import Digest, digest_bytes
from ..errors import (
    DigestMismatchError,
    ManifestError,
    NotFoundError,
    SizeMismatchError,
    UnsafeContentError,
    UsageError,
)
from ..manifest import MAX_MANIFEST_SIZE, Descriptor, Index, Manifest, parse_manifest
from ..reference import LayoutReference

_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _kind(mode: int) -> str:
    """What a file that is not a regular file is, for a message."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return f"not a regular file (mode {mode:o})"


def _refused(parts: list[str], mode: int, where: str) -> UnsafeContentError:
    return UnsafeContentError(
        f"{'/'.join(parts)} in OCI layout {where!r} is {_kind(mode)}, not a regular file",
        hint="every file and directory inside an OCI layout must be a real one (no symlinks, FIFOs or "
        "devices); copy the layout with `cp -rL` to replace symlinks by the files they point at",
    )


def open_layout_file(layout: str | os.PathLike[str], parts: list[str], where: str) -> int:
    """A read descriptor of the regular file `parts` inside the layout directory `layout`, reached
    without following any symlink, and opened for reading only once it is known to be a regular
    file (`where` names the layout in messages). FileNotFoundError if it does not exist;
    UnsafeContentError if it, or a directory on the way, is something else."""
    fd = os.open(layout, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the user's path may be a link
    try:
        for i, c in enumerate(parts[:-1]):
            try:
                nfd = os.open(c, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise _refused(parts[: i + 1], os.stat(c, dir_fd=fd, follow_symlinks=False).st_mode, where) from None
            os.close(fd)
            fd = nfd
        pfd = os.open(parts[-1], _PATH_FLAGS, dir_fd=fd)
        try:
            st = os.fstat(pfd)
            if not stat.S_ISREG(st.st_mode):
                raise _refused(parts, st.st_mode, where)
            # Reopening the O_PATH descriptor opens the very inode checked above.
            return os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(pfd)
    finally:
        os.close(fd)


def read_layout_file(layout: str | os.PathLike[str], parts: list[str], max_size: int, where: str) -> bytes:
    """A small regular file of a layout, whole (see :func:`open_layout_file`); ManifestError above
    `max_size` (checked before reading, and never more than max_size + 1 bytes are read)."""
    fd = open_layout_file(layout, parts, where)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        what = "/".join(parts)
        if size > max_size:
            raise ManifestError(f"{what} in OCI layout {where!r} is {size} bytes, over the {max_size} byte limit")
        raw = f.read(max_size + 1)
        if len(raw) > max_size:
            raise ManifestError(f"{what} in OCI layout {where!r} is over the {max_size} byte limit")
        return raw


class LayoutSource:
    """A Source reading one reference out of an OCI image layout directory."""

    def __init__(self, ref: LayoutReference) -> None:
        self.ref = ref
        self.path = Path(ref.path)
        if not self.path.is_dir():
            raise NotFoundError(
                f"OCI layout {ref.path!r} does not exist or is not a directory",
                hint="an `oci:` reference names a directory holding oci-layout and index.json",
            )
        try:
            raw = self._read_file(["oci-layout"], MAX_MANIFEST_SIZE)
        except FileNotFoundError:
            raise UsageError(
                f"{ref.path!r} is not an OCI image layout: it has no oci-layout file",
                hint="create one with `skopeo copy ... oci:DIR:TAG` or `imagevol pull --output oci:DIR:TAG`",
            ) from None
        try:
            version = json.loads(raw).get("imageLayoutVersion")
        except (ValueError, AttributeError):
            version = None
        if version != "1.0.0":
            raise ManifestError(f"{ref.path}/oci-layout: unsupported imageLayoutVersion {version!r}")

    def describe(self) -> str:
        return f"OCI layout {self.ref}"

    def _blob_parts(self, digest: Digest) -> list[str]:
        d = Digest(digest)  # validated before it becomes a path
        return ["blobs", d.algorithm, d.hex]

    def _open(self, parts: list[str]) -> int:
        return open_layout_file(self.path, parts, self.ref.path)

    def _read_file(self, parts: list[str], max_size: int) -> bytes:
        return read_layout_file(self.path, parts, max_size, self.ref.path)

    def _read_index(self) -> Index:
        try:
            raw = self._read_file(["index.json"], MAX_MANIFEST_SIZE)
        except FileNotFoundError:
            raise ManifestError(f"OCI layout {self.ref.path!r} has no index.json") from None
        top = parse_manifest(raw, mt.OCI_INDEX, where=f"{self.ref.path}/index.json")
        if not isinstance(top, Index):
            raise ManifestError(f"{self.ref.path}/index.json is not an image index")
        return top

    def resolve(self) -> tuple[Descriptor, Manifest | Index]:
        top = self._read_index()
        if self.ref.digest is not None:
            for d in (*top.manifests, *top.ignored):
                if d.digest == self.ref.digest:
                    return d, self.manifest(d)
            # A digest of a nested manifest is used as is, if the blob exists.
            try:
                raw = self._read_file(self._blob_parts(self.ref.digest), MAX_MANIFEST_SIZE)
            except FileNotFoundError:
                raise NotFoundError(f"{self.ref.digest} is not in OCI layout {self.ref.path!r}") from None
            doc = parse_manifest(raw, None, expected_digest=self.ref.digest, where=f"{self.ref}")
            return Descriptor(doc.media_type, self.ref.digest, len(raw)), doc
        entries = list(top.manifests)
        if self.ref.tag is not None:
            named = [d for d in entries if d.annotations.get(mt.ANN_REF_NAME) == self.ref.tag]
            if not named:
                tags = sorted({d.annotations[mt.ANN_REF_NAME] for d in entries if mt.ANN_REF_NAME in d.annotations})
                raise NotFoundError(
                    f"tag {self.ref.tag!r} not found in OCI layout {self.ref.path!r}",
                    hint=("tags present: " + ", ".join(tags)) if tags else "the layout has no tagged entries",
                )
            d = named[0]
            return d, self.manifest(d)
        if len(entries) == 1:
            return entries[0], self.manifest(entries[0])
        if not entries:
            raise NotFoundError(f"OCI layout {self.ref.path!r} holds no manifests")
        tags = sorted({d.annotations.get(mt.ANN_REF_NAME, "") for d in entries} - {""})
        raise UsageError(
            f"OCI layout {self.ref.path!r} holds {len(entries)} manifests; name one",
            hint="use oci:PATH:TAG" + (f" (tags: {', '.join(tags)})" if tags else "") + " or oci:PATH@DIGEST",
        )

    def _read_small(self, digest: Digest, max_size: int) -> bytes:
        try:
            return self._read_file(self._blob_parts(digest), max_size)
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is missing from OCI layout {self.ref.path!r}") from None

    def manifest(self, desc: Descriptor) -> Manifest | Index:
        raw = self._read_small(desc.digest, MAX_MANIFEST_SIZE)
        if len(raw) != desc.size:
            raise SizeMismatchError.of(f"manifest {desc.digest}", self.describe(), desc.size, len(raw))
        return parse_manifest(raw, desc.media_type, expected_digest=desc.digest, where=f"manifest {desc.digest}")

    def blob_bytes(self, desc: Descriptor, max_size: int) -> bytes:
        if desc.data is not None:
            return desc.data
        if desc.size > max_size:
            raise ManifestError(f"blob {desc.digest} is {desc.size} bytes, over the {max_size} byte limit")
        raw = self._read_small(desc.digest, max_size)
        if len(raw) != desc.size:
            raise SizeMismatchError.of(f"blob {desc.digest}", self.describe(), desc.size, len(raw))
        if digest_bytes(raw, desc.digest.algorithm) != desc.digest:
            raise DigestMismatchError(f"blob {desc.digest} in OCI layout {self.ref.path!r} does not match its digest")
        return raw

    def open_blob(self, desc: Descriptor, offset: int = 0) -> BinaryIO:
        """The blob's bytes from `offset`; a blob whose size is not its descriptor's is refused here,
        so no more than the descriptor's size is ever read."""
        try:
            fd = self._open(self._blob_parts(desc.digest))
        except FileNotFoundError:
            raise NotFoundError(f"blob {desc.digest} is missing from OCI layout {self.ref.path!r}") from None
        f = os.fdopen(fd, "rb")
        size = os.fstat(fd).st_size
        if size != desc.size:
            f.close()
            raise SizeMismatchError.of(f"blob {desc.digest}", self.describe(), desc.size, size)
        if offset:
            f.seek(offset)
        return f
