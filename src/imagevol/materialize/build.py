"""The build of a snapshot: :func:`materialize` builds a manifest's tree in ``snapshots/.build-*``
under the snapshot lock, records it, and renames it into place; :class:`_Builder` holds the build's
primitives (directories opened without following links, raw blobs hard-linked or copied, tars
applied with the safe applier and their diff-ids checked as they stream, :class:`_Tee`) and
dispatches to the flavour mixins (:mod:`.image`, :mod:`.artifact`, :mod:`.modelpack`,
:mod:`.kitops`, :mod:`.dockermodel`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import queue
import tarfile
import tempfile
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from .. import mediatypes as mt
from ..digest import Digest
from ..errors import ContentRefusedError, DigestMismatchError, ImagevolError, UnsafeContentError
from ..fstree import _seal, copy_fd, force_rmtree
from ..fsutil import fsync_dir as _fsync_dir
from ..manifest import Descriptor, Manifest
from ..manifest import flavour as manifest_flavour
from ..store import Store
from ..unpack.applier import ApplyOptions, apply_layer, clean_path
from ..unpack.compression import open_decompressed
from .artifact import _ArtifactFlavour
from .dockermodel import _DockerModelFlavour
from .image import _ImageFlavour
from .kitops import _KitOpsFlavour
from .modelpack import _ModelPackFlavour
from .options import _DIR_FLAGS, _NEW_FILE, BUILD_PREFIX, CHUNK, PROBE_LIMIT, RECORD_VERSION, MaterializeOptions
from .paths import _precheck_paths, _read_upto, _tar_base, looks_like_tar
from .record import _FileHashes, _record_entries, write_record
from .snapshots import (
    Snapshot,
    _clean_builds,
    _info_path,
    _lock_name,
    _record_path,
    _reuse,
    _write_info,
    snapshot_key,
    snapshots_dir,
)


class _Tee:
    """A read-only stream that hashes what passes through it. The hashing runs in a thread of its
    own (hashlib releases the GIL on large buffers), so on two cores it overlaps decompression and
    writing instead of adding to them; small reads are batched, and at most a few MiB wait."""

    BATCH = 256 << 10

    def __init__(self, f: BinaryIO, hasher: Any | None) -> None:
        self._f = f
        self._h = hasher
        self.size = 0
        self._buf = bytearray()
        self._q: queue.Queue[bytes | None] | None = None
        self._thread: threading.Thread | None = None
        if hasher is not None:
            self._q = queue.Queue(maxsize=8)
            self._thread = threading.Thread(target=self._run, name="imagevol-diffid", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self._q is not None
        while (item := self._q.get()) is not None:
            self._h.update(item)

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if data and self._q is not None:
            if len(data) >= self.BATCH and not self._buf:
                self._q.put(data)
            else:
                self._buf += data
                if len(self._buf) >= self.BATCH:
                    self._q.put(bytes(self._buf))
                    self._buf.clear()
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    def close(self) -> None:
        """Stop the hashing thread (idempotent); called on every path out of the layer."""
        if self._thread is not None and self._q is not None:
            if self._buf:
                self._q.put(bytes(self._buf))
                self._buf.clear()
            self._q.put(None)
            self._thread.join()
            self._thread = None

    def hexdigest(self) -> str:
        assert self._h is not None
        self.close()
        return self._h.hexdigest()


class LayerFeed(Protocol):
    """Where the builder finds blobs that may still be downloading (extraction while pulling)."""

    def wait(self, digest: Digest) -> None:
        """Return once the blob is in the store; raise why it will not be."""

    def open(self, layer: Descriptor) -> AbstractContextManager[BinaryIO]:
        """The layer's bytes, in order: as they download, or from the store."""
        ...


class _Builder(_ImageFlavour, _ArtifactFlavour, _ModelPackFlavour, _KitOpsFlavour, _DockerModelFlavour):
    """One build: the tree at ``root`` for ``manifest``. The flavours (how layers become files) are
    mixins, one module each; this class holds what they share."""

    def __init__(
        self,
        store: Store,
        manifest: Manifest,
        root: Path,
        opts: MaterializeOptions,
        warn: Callable[[str], None] | None,
        feed: LayerFeed | None = None,
    ) -> None:
        self.store = store
        self.feed = feed
        self.m = manifest
        self.opts = opts
        self._warn_cb = warn
        self.warnings: list[str] = []
        self.contents: dict[str, str | None] = {}
        self.image_opts = opts.apply if opts.apply is not None else ApplyOptions()
        self.artifact_opts = dataclasses.replace(self.image_opts, whiteouts=False)
        self.root_fd = os.open(root, _DIR_FLAGS)
        os.fchmod(self.root_fd, 0o755)  # the root's mode unless a layer declares `./`
        #: (st_dev, st_ino) -> digest of the files that are hard links to verified blobs, whose
        #: content the snapshot record takes from the blob's name instead of reading them.
        self.known: dict[tuple[int, int], str] = {}
        self.hashes = _FileHashes()

    def _know(self, pfd: int, name: str, digest: Digest) -> None:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        self.known[(st.st_dev, st.st_ino)] = str(digest)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.hashes.finish()
        os.close(self.root_fd)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        if self._warn_cb is not None:
            self._warn_cb(msg)

    @staticmethod
    def _what(i: int, layer: Descriptor) -> str:
        return f"layer {i} ({layer.digest.short}, {layer.media_type or 'no media type'})"

    # -- primitives

    def _open_dir(self, parts: list[str], what: str) -> int:
        """Open (creating as needed, 0o755) the directory ``parts`` below the root, following nothing."""
        fd = os.dup(self.root_fd)
        try:
            for i, c in enumerate(parts):
                try:
                    nfd = os.open(c, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(c, 0o755, dir_fd=fd)
                    nfd = os.open(c, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(nfd, 0o755)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafeContentError(
                            f"{what}: {'/'.join(parts[: i + 1])!r} is a symbolic link or not a directory",
                            hint="a path of an artifact may not pass through a symlink or a file of another layer",
                        ) from None
                    raise
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _claim(self, pfd: int, name: str, what: str, path: str) -> None:
        try:
            os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        raise UnsafeContentError(
            f"{what}: {path!r} is already provided by an earlier layer",
            hint="an artifact may name each file only once",
        )

    def place_raw(
        self,
        layer: Descriptor,
        parts: list[str],
        what: str,
        *,
        mode: int | None = None,
        compression: str = "none",
    ) -> None:
        """The blob as the file ``parts``: a hard link, or a copy (other file system, a ``mode``
        other than 0o444, or a compressed blob, which is decompressed)."""
        path = "/".join(parts)
        pfd = self._open_dir(parts[:-1], what)
        try:
            name = parts[-1]
            self._claim(pfd, name, what, path)
            if mode is None and compression == "none":
                try:
                    os.link(self.store.blob_path(layer.digest), name, dst_dir_fd=pfd, follow_symlinks=False)
                    self._know(pfd, name, layer.digest)
                    return
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES, errno.EOPNOTSUPP):
                        raise
            self._copy_blob(layer, pfd, name, 0o444 if mode is None else mode, compression, what)
        finally:
            os.close(pfd)

    def _copy_blob(self, layer: Descriptor, pfd: int, name: str, mode: int, compression: str, what: str) -> None:
        dfd = os.open(name, _NEW_FILE, 0o600, dir_fd=pfd)
        try:
            self.hashes.forget(dfd)  # not hashed as copied
            with self.store.open_blob(layer.digest) as f:
                if compression == "none":
                    copy_fd(f.fileno(), dfd)
                else:
                    opts = self.artifact_opts
                    data = open_decompressed(f, compression, max_ratio=opts.max_ratio, max_size=opts.max_size)
                    while chunk := data.read(CHUNK):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(dfd, view) :]
            os.fchmod(dfd, mode)
        finally:
            os.close(dfd)

    def apply(
        self,
        layer: Descriptor,
        dir_fd: int,
        compression: str | None,
        options: ApplyOptions,
        what: str,
        expect: Digest | None = None,
    ) -> None:
        """Apply a tar layer onto the directory ``dir_fd``; verify its uncompressed digest if given."""
        opened = self.feed.open(layer) if self.feed is not None else self.store.open_blob(layer.digest)
        with opened as f:
            data = open_decompressed(f, compression, max_ratio=options.max_ratio, max_size=options.max_size)
            tee = _Tee(data, expect.hasher() if expect is not None else None)
            try:
                apply_layer(
                    f"/proc/self/fd/{dir_fd}",
                    tee,
                    compression="none",
                    options=options,
                    warn=self.warn,
                    file_sink=self.hashes.sink,
                )
                tee.drain()
            except UnsafeContentError as e:
                raise UnsafeContentError(f"{what}: {e.message}", e.hint) from None
            except ContentRefusedError as e:
                raise type(e)(f"{what}: {e.message}", e.hint) from None
            finally:
                tee.close()
        if expect is not None:
            got = f"{expect.algorithm}:{tee.hexdigest()}"
            if got != expect:
                raise DigestMismatchError(
                    f"{what}: uncompressed content does not match its diff_id: expected {expect}, got {got}",
                    hint="the image's config and layers disagree; the snapshot was discarded",
                )

    def probe_tar(self, layer: Descriptor, compression: str | None) -> tuple[bool, list[str]]:
        """(is it a tar, components of its first named entry) — reads only the first headers."""
        try:
            with self.store.open_blob(layer.digest) as f:
                head = _read_upto(open_decompressed(f, compression), 512)
        except ContentRefusedError:
            return False, []
        if not looks_like_tar(head):
            return False, []
        # The probe inflates at most PROBE_LIMIT bytes (a huge first member must not be inflated
        # just to find the next header); the extraction itself runs under the configured limits.
        limit = PROBE_LIMIT if self.artifact_opts.max_size is None else min(PROBE_LIMIT, self.artifact_opts.max_size)
        try:
            with (
                self.store.open_blob(layer.digest) as f,
                tarfile.open(
                    fileobj=open_decompressed(f, compression, max_ratio=self.artifact_opts.max_ratio, max_size=limit),
                    mode="r|",
                ) as tf,
            ):
                for i, member in enumerate(tf):
                    parts = clean_path(member.name)
                    if parts:
                        return True, parts
                    if i >= 64:
                        break
        except (tarfile.TarError, ContentRefusedError, UnicodeError, ValueError, EOFError):
            pass
        return True, []

    def extract_for(
        self,
        layer: Descriptor,
        parts: list[str],
        first: list[str],
        compression: str | None,
        what: str,
        expect: Digest | None = None,
    ) -> list[str]:
        base = [] if layer.annotations.get(mt.ANN_IMAGEVOL_ROOT) == "true" else _tar_base(parts, first)
        fd = self._open_dir(base, what)
        try:
            self.apply(layer, fd, compression, self.artifact_opts, what, expect)
        finally:
            os.close(fd)
        return base

    def untitled(self, i: int, layer: Descriptor, what: str) -> list[str] | None:
        if self.opts.name_untitled == "digest":
            return [layer.digest.hex]
        self.warn(f"{what} has no title annotation: skipped (CRI-O does the same)")
        self.contents[str(layer.digest)] = None
        return None

    def run(self, fl: str) -> int:
        if self.feed is not None and fl != "image":  # only image layers are read as they download
            for d in (self.m.config, *self.m.layers):
                self.feed.wait(d.digest)
            self.feed = None
        {
            "image": self.image,
            "artifact": self.artifact,
            "modelpack": self.modelpack,
            "kitops": self.kitops,
            "docker-model": self.docker_model,
        }[fl]()
        return _seal(self.root_fd)


def materialize(
    store: Store,
    manifest: Manifest,
    *,
    options: MaterializeOptions | None = None,
    warn: Callable[[str], None] | None = None,
    feed: LayerFeed | None = None,
) -> Snapshot:
    """Materialize ``manifest`` (whose config and layers are in ``store``, verified) into a
    read-only snapshot, or return the existing one (``created=False``). See the module docs.

    With a ``feed``, blobs may still be downloading: image layers are applied as their bytes
    arrive, and the snapshot is kept only if every blob was verified in the end."""
    opts = options if options is not None else MaterializeOptions()
    fl = manifest_flavour(manifest)
    key = snapshot_key(manifest, opts)
    snaps = snapshots_dir(store)
    found = _reuse(store, snaps, key, manifest, fl)
    if found is not None:
        return found
    if fl != "image":
        _precheck_paths(manifest)
    with store.lock(_lock_name(key)):
        found = _reuse(store, snaps, key, manifest, fl)
        if found is not None:
            return found
        _clean_builds(store, snaps, key)
        final = snaps / key
        store.meta.set_snapshot(key, str(final), "building", digest=manifest.digest)
        build = Path(tempfile.mkdtemp(prefix=f"{BUILD_PREFIX}{key}-", dir=snaps))
        try:
            builder = _Builder(store, manifest, build, opts, warn, feed)
            try:
                files = builder.run(fl)
                builder.hashes.finish()
                write_record(
                    _record_path(snaps, key),
                    {"version": RECORD_VERSION, "key": key, "digest": str(manifest.digest)},
                    _record_entries(store, builder.root_fd, builder.known, builder.hashes.done),
                )
            finally:
                builder.close()
            info = {
                "flavour": fl,
                "files": files,
                "warnings": builder.warnings,
                "contents": builder.contents,
                "digest": str(manifest.digest),
            }
            _write_info(snaps, key, info)
            os.rename(build, final)
            _fsync_dir(snaps)
        except BaseException:
            with contextlib.suppress(OSError, ImagevolError):
                force_rmtree(build)
            with contextlib.suppress(OSError):
                _info_path(snaps, key).unlink()
            with contextlib.suppress(OSError):
                _record_path(snaps, key).unlink()
            with contextlib.suppress(Exception):
                store.meta.remove_snapshot(key)
            raise
        store.meta.set_snapshot(key, str(final), "ready", digest=manifest.digest)
        return Snapshot(
            key=key,
            path=final,
            digest=manifest.digest,
            flavour=fl,
            files=files,
            warnings=list(builder.warnings),
            created=True,
            contents=dict(builder.contents),
        )
