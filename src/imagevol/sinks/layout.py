"""OCI image layouts on disk, write side (`imagevol pack DIR oci:PATH:TAG`, `pull --output`).

The layout is created if needed (``oci-layout``, ``blobs/sha256/``, ``index.json``). Blobs are
written under a temporary name and renamed into place, so a blob path never holds partial content;
``index.json`` is rewritten atomically (temporary file, fsync, rename) under an flock on the layout
directory, and a tag replaces the entry of the same ``org.opencontainers.image.ref.name`` (the
convention skopeo and umoci follow), keeping every other entry as it was.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .. import mediatypes as mt
from ..digest import Digest, digest_bytes
from ..errors import DigestMismatchError, ManifestError, UsageError
from ..fsutil import fsync_dir as _fsync_dir
from ..fsutil import reflink
from ..manifest import MAX_MANIFEST_SIZE, Descriptor
from ..reference import LayoutReference
from ..sources.layout import read_layout_file
from . import PIECE, Blob, PushStats

__all__ = ["LayoutSink"]

LAYOUT_VERSION = "1.0.0"
# Blobs without a digest from this size on are hashed while they are copied in.
STREAM_MIN_SIZE = 32 << 20


class LayoutSink:
    """Writes blobs, manifests and tags into an OCI image layout directory."""

    def __init__(self, path: str | os.PathLike[str], *, tag: str | None = None) -> None:
        self.path = Path(path)
        self.tag_name = tag
        self.stats = PushStats()
        self._init_layout()

    @classmethod
    def for_reference(cls, ref: LayoutReference) -> LayoutSink:
        if ref.digest is not None:
            raise UsageError(
                f"cannot write to {ref}: a digest names existing content",
                hint="write to oci:PATH:TAG (or oci:PATH for an untagged entry)",
            )
        return cls(ref.path, tag=ref.tag)

    def describe(self) -> str:
        return f"OCI layout {self.path}" + (f":{self.tag_name}" if self.tag_name else "")

    # --- layout skeleton ----------------------------------------------------------------------
    def _init_layout(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"{self.path} exists and is not a directory", hint="an OCI layout is a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        marker = self.path / "oci-layout"
        if os.path.lexists(marker):
            raw = read_layout_file(self.path, ["oci-layout"], MAX_MANIFEST_SIZE, str(self.path))  # regular files only
            try:
                version = json.loads(raw).get("imageLayoutVersion")
            except (ValueError, AttributeError):
                version = None
            if version != LAYOUT_VERSION:
                raise ManifestError(f"{marker}: unsupported imageLayoutVersion {version!r}")
        else:
            if any(self.path.iterdir()):
                raise UsageError(
                    f"{self.path} is not empty and not an OCI layout (no oci-layout file)",
                    hint="write the layout into a new or empty directory",
                )
            self._atomic_write(marker, json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode())
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        index = self.path / "index.json"
        if not index.exists():
            with self._locked():
                if not index.exists():
                    self._write_index({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []})

    def _atomic_write(self, target: Path, data: bytes) -> None:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        _fsync_dir(target.parent)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # --- blobs --------------------------------------------------------------------------------
    def blob_path(self, digest: Digest | str) -> Path:
        d = Digest(digest)  # validated before it becomes a path
        return self.path / "blobs" / d.algorithm / d.hex

    def has_blob(self, digest: Digest, size: int | None = None) -> bool:
        try:
            st = self.blob_path(digest).lstat()
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False  # a link or a FIFO is no blob: it is replaced by the real one
        return size is None or st.st_size == size

    def _tmp_blob(self, digest: Digest) -> Path:
        d = self.blob_path(digest)
        d.parent.mkdir(parents=True, exist_ok=True)
        return d.with_name(f".tmp-{d.name[:16]}-{os.getpid()}-{os.urandom(4).hex()}")

    def put_blob_bytes(self, data: bytes, digest: Digest | str | None = None) -> Digest:
        """Write ``data`` as a blob (verified against ``digest`` when given); returns its digest."""
        d = Digest(digest) if digest is not None else digest_bytes(data)
        if digest_bytes(data, d.algorithm) != d:
            raise DigestMismatchError(f"blob data does not match {d}")
        if self.has_blob(d, len(data)):
            return d
        tmp = self._tmp_blob(d)
        self._finish_tmp(tmp, d, lambda fd: _write_all(fd, data))
        return d

    def _finish_tmp(self, tmp: Path, digest: Digest, fill: Callable[[int], None]) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            try:
                fill(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.blob_path(digest))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def put_blob_file(
        self,
        path: str | os.PathLike[str],
        digest: Digest | str,
        size: int,
        *,
        mode: str = "link",
        progress: Callable[[int], None] | None = None,
    ) -> bool:
        """Put the file ``path`` (exactly the blob's bytes) into the layout; False if already there.

        mode ``link``: a hard link (the layout shares the inode: never for the store's blobs, whose
        inodes must not become writable through the layout), falling back to a verified copy across
        file systems; ``clone``: a private inode, a reflink where the file systems allow, else an
        in-kernel copy (for verified sources: the store); ``move``: rename a scratch file (chmod
        0644); ``copy``: a copy, hashed on the way and refused if it does not match.
        """
        d = Digest(digest)
        if mode not in ("link", "clone", "move", "copy"):
            raise ValueError(f"mode must be link, clone, move or copy, not {mode!r}")
        if self.has_blob(d, size):
            return False
        src = Path(path)
        if os.stat(src).st_size != size:
            raise DigestMismatchError(f"{src} is {os.stat(src).st_size} bytes, expected {size} for {d}")
        target = self.blob_path(d)
        if mode == "clone":
            self._clone(src, d, size)
            if progress:
                progress(size)
            return True
        try:
            if mode == "link":
                try:
                    os.link(src, target)
                except FileExistsError:
                    if not self.has_blob(d, size):  # a symlink or a FIFO holds the name: replace it
                        tmp = target.with_name(f".tmp-link-{os.getpid()}-{os.urandom(4).hex()}")
                        os.link(src, tmp)
                        os.replace(tmp, target)
                if progress:
                    progress(size)
                return True
            if mode == "move":
                os.chmod(src, 0o644)
                os.replace(src, target)
                if progress:
                    progress(size)
                return True
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES, errno.EOPNOTSUPP):
                raise
        self._copy_verified(src, d, size, progress)
        if mode == "move":
            with contextlib.suppress(FileNotFoundError):
                src.unlink()
        return True

    def _clone(self, src: Path, d: Digest, size: int) -> None:
        """``src`` as the blob ``d``: a reflink (no bytes written) or an in-kernel copy, in a file
        of the layout's own (0644), renamed into place."""
        from ..fstree import copy_fd

        bdir = self.path / "blobs" / d.algorithm
        bdir.mkdir(parents=True, exist_ok=True)
        tmp = bdir / f".tmp-{os.getpid()}-{os.urandom(6).hex()}"
        sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)

        def fill(fd: int) -> None:
            n = size if reflink(sfd, fd) else copy_fd(sfd, fd)
            if n != size:
                raise DigestMismatchError(f"{src} is {n} bytes, expected {size} for {d}")

        try:
            self._finish_tmp(tmp, d, fill)
        finally:
            os.close(sfd)

    def _copy_verified(self, src: Path, d: Digest, size: int, progress: Callable[[int], None] | None) -> None:
        self._copy_blob(Blob(d, size, path=src, what=str(src)), progress)  # verified against d

    def _copy_blob(self, blob: Blob, progress: Callable[[int], None] | None) -> bool:
        """Write the blob's bytes (read once, into one reused buffer) under their digest: checked
        against ``blob.digest`` when it has one, else computed on the way and set. False when the
        layout turned out to have the blob already (the copy is dropped)."""
        want = blob.digest
        h = hashlib.new(want.algorithm if want is not None else "sha256")
        d = self.path / "blobs" / h.name
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".tmp-{os.getpid()}-{os.urandom(6).hex()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            try:
                n = 0
                for view in blob.views(bytearray(min(PIECE, max(blob.size, 1)))):
                    h.update(view)
                    _write_all(fd, view)
                    n += len(view)
                    if progress:
                        progress(len(view))
                os.fsync(fd)
            finally:
                os.close(fd)
            got = Digest(f"{h.name}:{h.hexdigest()}")
            if (want is not None and got != want) or n != blob.size:
                raise DigestMismatchError(
                    f"{blob.what or 'a blob'} changed: it is now {got} ({n} bytes), expected "
                    f"{want or 'the bytes it was packed with'} ({blob.size} bytes)",
                    hint="do not modify the directory while it is packed",
                )
            if blob.digest is None:
                blob.digest = got
            if self.has_blob(got, blob.size):
                tmp.unlink()
                return False
            os.replace(tmp, self.blob_path(got))
            return True
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def wants_digest_first(self, blob: Blob) -> bool:
        # Small blobs: hashed first, so one the layout has is not written again. Large ones are
        # hashed while they are copied (read once); the digest cache spares unchanged files both.
        return blob.size < STREAM_MIN_SIZE

    def put_blob(self, blob: Blob, progress: Callable[[int], None] | None = None) -> str:
        if blob.digest is not None and self.has_blob(blob.digest, blob.size):
            self.stats.add(skipped=1)
            return "skipped"
        if blob.data is not None:
            blob.digest = self.put_blob_bytes(blob.data, blob.digest)
            if progress:
                progress(blob.size)
        elif blob.path is not None and blob.digest is not None:
            self.put_blob_file(
                blob.path, blob.digest, blob.size, mode="move" if blob.temporary else "copy", progress=progress
            )
        elif not self._copy_blob(blob, progress):
            self.stats.add(skipped=1)
            return "skipped"
        self.stats.add(pushed=1, bytes_pushed=blob.size)
        return "pushed"

    # --- manifests and tags -------------------------------------------------------------------
    def put_manifest(self, body: bytes, media_type: str) -> Descriptor:
        d = self.put_blob_bytes(body)
        self.stats.add(manifests=1)
        return Descriptor(media_type, d, len(body))

    def put_root(self, body: bytes, media_type: str) -> Descriptor:
        desc = self.put_manifest(body, media_type)
        self.tag(desc, self.tag_name)
        return desc

    def _read_index(self) -> dict[str, Any]:
        p = self.path / "index.json"
        try:
            doc = json.loads(read_layout_file(self.path, ["index.json"], MAX_MANIFEST_SIZE, str(self.path)))
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []}
        except ValueError as e:
            raise ManifestError(f"{p} is not valid JSON: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("manifests", []), list):
            raise ManifestError(f"{p} is not an image index")
        doc.setdefault("manifests", [])
        return doc

    def _write_index(self, doc: dict[str, Any]) -> None:
        self._atomic_write(self.path / "index.json", json.dumps(doc, separators=(",", ":")).encode())

    def tag(self, descriptor: Descriptor, name: str | None) -> None:
        """Point ``name`` at ``descriptor`` in index.json (replacing what it named before); with
        ``name`` None, add an untagged entry (once per digest)."""
        if not self.has_blob(descriptor.digest):
            raise UsageError(f"cannot tag {descriptor.digest}: it is not in the layout {self.path}")
        entry = Descriptor(descriptor.media_type, descriptor.digest, descriptor.size).to_dict()
        annotations = {k: v for k, v in descriptor.annotations.items() if k != mt.ANN_REF_NAME}
        if name is not None:
            annotations[mt.ANN_REF_NAME] = name
        if annotations:
            entry["annotations"] = annotations
        if descriptor.platform is not None:
            entry["platform"] = descriptor.platform.to_dict()
        with self._locked():
            doc = self._read_index()

            def keep(e: Any) -> bool:
                if not isinstance(e, dict):
                    return True
                ann = e.get("annotations") or {}
                if name is not None:
                    return ann.get(mt.ANN_REF_NAME) != name
                return not (e.get("digest") == str(descriptor.digest) and mt.ANN_REF_NAME not in ann)

            doc["manifests"] = [e for e in doc["manifests"] if keep(e)] + [entry]
            doc.setdefault("schemaVersion", 2)
            self._write_index(doc)

    def close(self) -> None:
        pass


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
