"""One blob being written: resumable, rangeable, verified before it enters ``blobs/``.

On disk (``R/ingest/<sha256 of the digest string>/``)::

    lock        flock held by the one writer (others block on it)
    data        the partial blob, truncated to its full size (sparse) on creation
    meta.json   {"version", "digest", "size", "started_at", "updated_at", "ranges": [[start, end], ...]}

Ranges are half-open ``[start, end)`` byte ranges that were written before ``meta.json`` recorded
them. ``meta.json`` is replaced atomically (tmp + fsync + rename) and only ever grows. A killed
process loses nothing it wrote (direct writes are on the disk, buffered ones in the page cache,
which survives it), so a resumed ingest starts where the kill hit. With
``mark_complete(sync=True)`` the data is also fdatasync'ed first, which survives a power loss;
pulls skip that per-part flush (it halves throughput on a 290 MB/s disk) and rely on verification
instead: every blob is hashed before commit, and a resumed blob that fails is refetched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from ..digest import Digest, Verifier
from ..errors import DigestMismatchError, StoreError
from ..fsutil import DIRECT_ALIGN, direct_io_enabled, pread_full, pwrite_all, pwrite_direct, start_writeback
from ..fsutil import fsync_dir as _fsync_dir
from .locks import FileLock


class BlobHome(Protocol):
    """What an ingest needs of the store it writes into (the store's blob area)."""

    def has_blob(self, digest: Digest, size: int | None = None) -> bool: ...

    def blob_path(self, digest: Digest) -> Path: ...


READ_CHUNK = 1 << 20
META_VERSION = 1

Range = tuple[int, int]


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Sort and merge half-open ranges; empty ranges vanish, touching ranges join."""
    out: list[list[int]] = []
    for start, end in sorted((int(s), int(e)) for s, e in ranges):
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def missing_ranges(size: int, completed: Iterable[Range], part_size: int) -> list[Range]:
    """The gaps of ``[0, size)`` not covered by ``completed``, each split into parts <= ``part_size``."""
    if part_size <= 0:
        raise ValueError(f"part_size must be positive, got {part_size}")
    gaps: list[Range] = []
    pos = 0
    for start, end in merge_ranges(completed):
        start, end = max(start, 0), min(end, size)
        if start > pos:
            gaps.append((pos, start))
        pos = max(pos, end)
    if pos < size:
        gaps.append((pos, size))
    out: list[Range] = []
    for start, end in gaps:
        for s in range(start, end, part_size):
            out.append((s, min(s + part_size, end)))
    return out


class Ingest:
    """An exclusive, resumable write of one blob. Obtain it from :meth:`Store.ingest`.

    Threads may call :meth:`write_at` and :meth:`mark_complete` concurrently (ranged parallel
    download); :meth:`commit`, :meth:`abort` and :meth:`close` must not race with them.
    """

    def __init__(self, store: BlobHome, digest: Digest, size: int, directory: Path, lock: FileLock | None) -> None:
        self.store = store
        self.digest = digest
        self.size = size
        self.dir = directory
        self._lock = lock
        self._fd: int | None = None
        #: The O_DIRECT descriptor of the data file, opened by the first direct write.
        self._dfd: int | None = None
        #: False once direct I/O was found unavailable (switched off, or refused by the file system).
        self._direct = direct_io_enabled()
        self._mu = threading.Lock()
        self._ranges: list[Range] = []
        self._started_at = time.time()
        self._closed = False
        #: True when the blob was already in the store (another process finished it first): nothing to do.
        self.already_present = store.has_blob(digest, size)
        #: True when earlier progress was found on disk (a resumed ingest).
        self.resumed = False
        if not self.already_present:
            self._open()

    # -- paths -------------------------------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        return self.dir / "data"

    @property
    def meta_path(self) -> Path:
        return self.dir / "meta.json"

    @property
    def blob_path(self) -> Path:
        return self.store.blob_path(self.digest)

    # -- setup -------------------------------------------------------------------------------------
    def _read_meta(self) -> dict | None:
        try:
            with open(self.meta_path, "rb") as f:
                meta = json.loads(f.read(1 << 24))
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("version") != META_VERSION:
            return None
        if meta.get("digest") != str(self.digest) or meta.get("size") != self.size:
            return None
        ranges = meta.get("ranges")
        if not isinstance(ranges, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) for r in ranges
        ):
            return None
        return meta

    def _open(self) -> None:
        meta = self._read_meta()
        existed = self.data_path.exists()
        fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            st = os.fstat(fd)
            if meta is not None and existed and st.st_size == self.size:
                self._ranges = [
                    (s, e) for s, e in merge_ranges(tuple(r) for r in meta["ranges"]) if s >= 0 and e <= self.size
                ]
                self._started_at = float(meta.get("started_at", self._started_at))
                self.resumed = bool(self._ranges)
            else:
                # New, or progress we cannot trust (other size, lost data file): start from nothing.
                self._ranges = []
                if st.st_size:
                    os.ftruncate(fd, 0)
                self._check_space(fd)
                os.ftruncate(fd, self.size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._write_meta()

    def _check_space(self, fd: int) -> None:
        try:
            vfs = os.fstatvfs(fd)
        except OSError:
            return
        free = vfs.f_bavail * vfs.f_frsize
        if self.size > free:
            raise StoreError(
                f"not enough space for {self.digest.short}: need {self.size} bytes, {free} free in {self.dir}",
                hint="free space (imagevol gc) or use a store root on a larger filesystem",
            )

    def _write_meta(self, *, durable: bool = True) -> None:
        meta = {
            "version": META_VERSION,
            "digest": str(self.digest),
            "size": self.size,
            "started_at": self._started_at,
            "updated_at": time.time(),
            "ranges": [list(r) for r in self._ranges],
        }
        tmp = self.dir / f"meta.json.tmp.{os.getpid()}.{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, json.dumps(meta, separators=(",", ":")).encode())
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        # The rename need not be durable: a lost rename leaves an older, smaller part map.
        os.replace(tmp, self.meta_path)

    # -- state -------------------------------------------------------------------------------------
    def _require_open(self) -> int:
        if self._closed or self._fd is None:
            if self.already_present:
                raise StoreError(f"{self.digest} is already in the store; nothing to write")
            raise StoreError(f"ingest of {self.digest} is closed")
        return self._fd

    def completed_ranges(self) -> list[Range]:
        """Half-open ``(start, end)`` ranges known written and flushed (the persisted part map)."""
        if self.already_present:
            return [(0, self.size)] if self.size else []
        with self._mu:
            return list(self._ranges)

    def missing_ranges(self, part_size: int) -> list[Range]:
        """What remains to be written, split into parts of at most ``part_size`` bytes."""
        return missing_ranges(self.size, self.completed_ranges(), part_size)

    def sequential_prefix(self) -> int:
        """Length of the completed prefix starting at 0 (where a single-stream download resumes)."""
        ranges = self.completed_ranges()
        return ranges[0][1] if ranges and ranges[0][0] == 0 else 0

    def resume_verifier(self) -> tuple[Verifier, int]:
        """A Verifier fed with the completed prefix (re-read from disk) and that prefix's length.

        A single-stream download continues from the returned offset, feeds the verifier, and commits
        with ``verified_digest=verifier.digest()``: the blob is hashed exactly once.
        """
        fd = self._require_open()
        prefix = self.sequential_prefix()
        v = Verifier(self.digest)
        buf = bytearray(READ_CHUNK)
        view = memoryview(buf)
        pos = 0
        while pos < prefix:
            n = os.preadv(fd, [view[: min(READ_CHUNK, prefix - pos)]], pos)
            if n <= 0:
                raise StoreError(f"ingest data of {self.digest} is shorter than its part map")
            v.update(view[:n])
            pos += n
        return v, prefix

    @property
    def is_complete(self) -> bool:
        return self.completed_ranges() == ([(0, self.size)] if self.size else [])

    # -- writing -----------------------------------------------------------------------------------
    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (``os.pwrite``; safe from several threads)."""
        fd = self._require_open()
        view = memoryview(data).cast("B")
        if offset < 0 or offset + len(view) > self.size:
            raise ValueError(
                f"write of {len(view)} bytes at {offset} is outside blob {self.digest.short} of {self.size} bytes"
            )
        pwrite_all(fd, view, offset)

    def _direct_fd(self) -> int | None:
        with self._mu:
            if self._dfd is None and self._direct:
                try:
                    self._dfd = os.open(self.data_path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC | os.O_NOFOLLOW)
                except (OSError, AttributeError):  # EINVAL: no direct I/O on this file system
                    self._direct = False
            return self._dfd if self._direct else None

    def _no_direct(self) -> None:
        with self._mu:
            self._direct = False

    def write_aligned(self, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset``, its whole blocks around the page cache (O_DIRECT).

        For a download that is hashed from its receive buffers, the page cache only costs: fresh
        page-cache memory is the dearest part of a write on a VM that hands freed memory back to
        its host, and a multi-gigabyte pull would evict the node's working set. ``data`` must sit in
        memory at the same offset modulo :data:`DIRECT_ALIGN` as ``offset`` in the file (a page-aligned
        buffer filled from ``offset % DIRECT_ALIGN``). The unaligned head and tail, and everything on
        file systems without direct I/O (or with ``IMAGEVOL_DIRECT_IO=0``), are written as
        :meth:`write_at` does."""
        fd = self._require_open()
        view = data.cast("B") if data.format != "B" else data
        if offset < 0 or offset + len(view) > self.size:
            raise ValueError(
                f"write of {len(view)} bytes at {offset} is outside blob {self.digest.short} of {self.size} bytes"
            )
        whole_block = len(view) - min(len(view), -offset % DIRECT_ALIGN) >= DIRECT_ALIGN
        if not pwrite_direct(fd, self._direct_fd() if whole_block else None, offset, view):
            self._no_direct()

    def read_aligned(self, offset: int, view: memoryview) -> int:
        """Read up to ``len(view)`` bytes at ``offset`` into ``view`` (placed in memory as for
        :meth:`write_aligned`); returns the bytes read, fewer only at the end of the file. Whole
        blocks are read around the page cache where direct writes are in use (what they wrote is
        on the disk, not in memory); anything else through it."""
        fd = self._require_open()
        head = min(len(view), -offset % DIRECT_ALIGN)
        body = (len(view) - head) // DIRECT_ALIGN * DIRECT_ALIGN
        dfd = self._direct_fd() if body and self._dfd is not None else None
        if dfd is None:
            return pread_full(fd, view, offset)
        n = pread_full(fd, view[:head], offset) if head else 0
        if n < head:
            return n
        try:
            k = pread_full(dfd, view[head : head + body], offset + head)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            k = pread_full(fd, view[head : head + body], offset + head)
        if k < body or head + body == len(view):
            return head + k
        return head + body + pread_full(fd, view[head + body :], offset + head + body)

    def mark_complete(self, start: int, end: int, *, sync: bool = True) -> None:
        """Record ``[start, end)`` as written: fdatasync the data, then persist the part map atomically.

        ``sync=False`` skips the fdatasync and the part map's own fsync: what a killed process wrote
        survives in the page cache, and after a power loss verification catches any lost bytes. The
        range's writeback is started instead, so the commit's fsync finds little left to write.
        """
        fd = self._require_open()
        if not (0 <= start <= end <= self.size):
            raise ValueError(f"range ({start}, {end}) is outside blob {self.digest.short} of {self.size} bytes")
        if start == end:
            return
        if sync:
            os.fdatasync(fd)
        else:
            start_writeback(fd, start, end - start)
        with self._mu:
            self._ranges = merge_ranges([*self._ranges, (start, end)])
            self._write_meta(durable=sync)

    # -- finishing ---------------------------------------------------------------------------------
    def _hash_file(self, fd: int) -> Verifier:
        v = Verifier(self.digest)
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buf = bytearray(READ_CHUNK)
        view = memoryview(buf)
        pos = 0
        while pos < self.size:
            n = os.preadv(fd, [view[: min(READ_CHUNK, self.size - pos)]], pos)
            if n <= 0:
                break
            v.update(view[:n])
            pos += n
        return v

    def commit(self, *, verified_digest: Digest | str | None = None) -> Path:
        """Verify and move the data into ``blobs/``; returns the blob path.

        With ``verified_digest`` equal to the digest (the caller hashed every byte in order) the data
        is not re-read; otherwise it is hashed once. On mismatch the ingest is discarded and
        DigestMismatchError is raised: nothing unverified ever enters ``blobs/``.
        """
        target = self.blob_path
        if self.already_present:
            self.close()
            return target
        fd = self._require_open()
        if os.fstat(fd).st_size != self.size:
            self.abort()
            raise StoreError(f"ingest data of {self.digest} changed size underneath us; discarded")
        if verified_digest is not None:
            got = Digest(verified_digest)
            if got != self.digest:
                self.abort()
                raise DigestMismatchError(
                    f"blob does not match its digest: expected {self.digest}, got {got}",
                    hint="the source served wrong or corrupted bytes; the partial download was discarded",
                )
        else:
            v = self._hash_file(fd)
            if not v.verified():
                self.abort()
                v.verify(f"blob {self.digest.short}")  # raises DigestMismatchError
        os.fsync(fd)
        os.fchmod(fd, 0o444)
        now = time.time()
        os.utime(fd, (now, now))  # commit time: what gc and listings see
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.store.has_blob(self.digest, self.size):
            os.rename(self.data_path, target)
            _fsync_dir(target.parent)
        self._finish()
        return target

    def abort(self) -> None:
        """Discard the partial data and its part map."""
        if self._closed:
            return
        self._finish()

    def _close_fds(self) -> None:
        for fd in (self._dfd, self._fd):
            if fd is not None:
                os.close(fd)
        self._dfd = self._fd = None

    def _finish(self) -> None:
        """Remove the ingest directory (we hold its lock) and release everything."""
        self._close_fds()
        remove_ingest_dir(self.dir)
        self._closed = True
        if self._lock is not None:
            self._lock.release()

    def close(self) -> None:
        """Release the lock and keep the progress for a later resume (or clean up if already present)."""
        if self._closed:
            return
        if self.already_present:
            self._finish()
            return
        self._close_fds()
        self._closed = True
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> Ingest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten Ingest must not keep its descriptor (and lock) for the life of the process.
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"Ingest({self.digest!s}, size={self.size}, done={sum(e - s for s, e in self._ranges)})"


def remove_ingest_dir(directory: Path) -> None:
    """Remove an ingest directory whose lock the caller holds; the lock file goes last."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in sorted(names, key=lambda n: n == "lock"):
        p = directory / name
        try:
            if p.is_dir() and not p.is_symlink():
                continue
            p.unlink()
        except FileNotFoundError:
            pass
    with contextlib.suppress(OSError):
        directory.rmdir()  # may fail if a newcomer already recreated its lock file: harmless
