"""The snapshot record: what a snapshot holds (every entry's path, type, mode, size, owner and each
file's content digest), written at build time as JSON Lines (:func:`write_record`, from
:func:`_record_entries`) and read back as streamed (:func:`read_record`); the files the applier
writes at least ``HASH_AS_WRITTEN_MIN`` bytes long are hashed as they are written
(:class:`_FileHashes`), so the record does not read them again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import stat
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..digest import Digest
from ..errors import ImagevolError
from ..fstree import _walk_tree
from ..store import Store
from .options import _NEW_FILE, CHUNK, HASH_AS_WRITTEN_MIN, RECORD_VERSION

#: Entry types of a record.
_TYPES = (
    (stat.S_ISREG, "file"),
    (stat.S_ISDIR, "dir"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISCHR, "chr"),
    (stat.S_ISBLK, "blk"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "sock"),
)


def _type_of(st: os.stat_result) -> str:
    for test, name in _TYPES:
        if test(st.st_mode):
            return name
    return "other"


def _hash_at(dfd: int, name: str, algorithm: str = "sha256") -> str:
    """``algorithm:hex`` of the regular file ``name`` of ``dfd`` (never following a symlink)."""
    h = hashlib.new(algorithm)
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
    try:
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := os.readv(fd, [view]):
            h.update(view[:n])
    finally:
        os.close(fd)
    return f"{algorithm}:{h.hexdigest()}"


def _entry(dfd: int, rel: str, name: str, st: os.stat_result, content: str | None) -> list[Any]:
    """One record entry: ``[path, type, mode, size, uid, gid, extra]``; ``extra`` is the content
    digest of a file, the target of a symlink, ``major:minor`` of a device, else None."""
    typ = _type_of(st)
    extra: str | None = None
    size = 0
    if typ == "file":
        size = st.st_size
        extra = content
    elif typ == "symlink":
        extra = os.fsdecode(os.readlink(name, dir_fd=dfd))
    elif typ in ("chr", "blk"):
        extra = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return [rel, typ, stat.S_IMODE(st.st_mode), size, st.st_uid, st.st_gid, extra]


def _blob_inode(store: Store, digest: str) -> tuple[int, int] | None:
    try:
        st = os.stat(store.blob_path(Digest(digest)), follow_symlinks=False)
    except (OSError, ImagevolError):
        return None
    return st.st_dev, st.st_ino


def _record_entries(
    store: Store,
    root_fd: int,
    known: dict[tuple[int, int], str],
    hashed: dict[tuple[int, int], tuple[str, int]] | None = None,
) -> Iterator[list[Any]]:
    """The record of the tree at ``root_fd``: every entry below it and then its root (``"."``),
    children first, names sorted (:func:`_walk_tree`'s order, :func:`_record_order`). Regular files
    carry their content digest: for a hard link to a verified blob (an inode in ``known`` that is
    still the blob's) the blob's digest; for a file hashed as it was written (``hashed``: inode ->
    (digest, size), when the size still agrees) that digest; for anything else the sha256 of its
    bytes, read once per inode. Nothing is kept per entry but for files with several links."""
    linked: dict[tuple[int, int], str] = {}
    for dfd, rel, name, st in _walk_tree(root_fd):
        content = None
        if stat.S_ISREG(st.st_mode):
            ino = (st.st_dev, st.st_ino)
            content = linked.get(ino) if st.st_nlink > 1 else None
            if content is None:
                blob = known.get(ino)
                done = hashed.get(ino) if hashed is not None else None
                if blob is not None and _blob_inode(store, blob) == ino:
                    content = blob
                elif done is not None and done[1] == st.st_size:
                    content = done[0]
                else:
                    content = _hash_at(dfd, name)
                if st.st_nlink > 1:
                    linked[ino] = content
        yield _entry(dfd, rel, name, st, content)
    yield _entry(root_fd, ".", ".", os.fstat(root_fd), None)


def write_record(path: Path, header: dict[str, Any], entries: Iterable[list[Any]]) -> int:
    """Write a snapshot record to ``path`` atomically, one JSON document per line: ``header``
    (version, key, manifest digest), every entry, then ``{"end": count}``; streamed, so memory does
    not grow with the number of entries. Returns the number of entries."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, _NEW_FILE, 0o600)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="ascii", buffering=1 << 20) as f:
            f.write(json.dumps(header, sort_keys=True) + "\n")
            for e in entries:
                f.write(json.dumps(e, separators=(",", ":")) + "\n")
                count += 1
            f.write(json.dumps({"end": count}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return count


def read_record(path: Path, key: str) -> tuple[dict[str, Any], Iterator[list[Any]]] | None:
    """The header of the record at ``path`` and an iterator over its entries (read as iterated;
    ValueError from the iterator for a malformed line or a record cut short). None if there is no
    record; ValueError if its header is not a record of snapshot ``key``."""
    try:
        f = open(path, encoding="ascii")  # noqa: SIM115 - closed by the iterator
    except FileNotFoundError:
        return None
    try:
        header = json.loads(f.readline())
    except (ValueError, UnicodeDecodeError):
        f.close()
        raise ValueError("not a snapshot record") from None
    if not isinstance(header, dict) or header.get("version") != RECORD_VERSION or header.get("key") != key:
        f.close()
        raise ValueError(f"not a version-{RECORD_VERSION} record of this snapshot")

    def entries() -> Iterator[list[Any]]:
        with f:
            for count, line in enumerate(f):
                try:
                    e = json.loads(line)
                except (ValueError, UnicodeDecodeError):
                    raise ValueError(f"malformed entry on line {count + 2}") from None
                if isinstance(e, dict) and set(e) == {"end"}:
                    if e["end"] != count or f.readline():
                        raise ValueError("entry count does not match")
                    return
                if not (isinstance(e, list) and len(e) == 7 and isinstance(e[0], str)):
                    raise ValueError(f"malformed entry on line {count + 2}")
                yield e
            raise ValueError("the record is cut short")

    return header, entries()


def _record_order(rel: str) -> tuple[tuple[int, str], ...]:
    """Sort key of :func:`_walk_tree`'s order: names sorted, a directory after its children, the
    root (``"."``) last."""
    if rel == ".":
        return ((1, ""),)
    return (*((0, c) for c in rel.split("/")), (1, ""))


class _FileHashes:
    """sha256 of every file the applier writes, for the snapshot record, computed from the data as
    it is written (no re-read), in a thread of its own (hashlib releases the GIL on large buffers,
    so on two cores it overlaps decompression and writing). ``done[(dev, ino)] = (digest, size)``
    once :meth:`finish` has returned."""

    def __init__(self) -> None:
        self.done: dict[tuple[int, int], tuple[str, int]] = {}
        # Inodes given a sink so far (main thread): a small file reusing one must reset it.
        self._given: set[tuple[int, int]] = set()
        # (inode, data): None starts a file (a reused inode forgets its earlier file), b"" ends it.
        self._q: queue.Queue[tuple[tuple[int, int], bytes | None] | None] = queue.Queue(maxsize=16)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        open_: dict[tuple[int, int], tuple[Any, int]] = {}
        while (item := self._q.get()) is not None:
            if self._error is not None:
                continue
            ino, data = item
            try:
                if data is None:
                    self.done.pop(ino, None)
                    open_[ino] = (hashlib.sha256(), 0)
                elif not data:
                    h, size = open_.pop(ino)
                    self.done[ino] = (f"sha256:{h.hexdigest()}", size)
                else:
                    h, size = open_[ino]
                    h.update(data)
                    open_[ino] = (h, size + len(data))
            except BaseException as e:  # reported by finish()
                self._error = e

    def _put(self, item: tuple[tuple[int, int], bytes | None]) -> None:
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="imagevol-record-hash", daemon=True)
            self._thread.start()
        self._q.put(item)

    def sink(self, fd: int, size: int) -> _FileSink | None:
        """A sink for the new file `fd` of `size` bytes; None (nothing kept) below
        HASH_AS_WRITTEN_MIN: small files are hashed again when the record is written, so what is
        kept here grows with the bytes written, not with the number of files."""
        st = os.fstat(fd)
        ino = (st.st_dev, st.st_ino)
        if size < HASH_AS_WRITTEN_MIN:
            if ino in self._given:
                self._put((ino, None))  # a reused inode forgets its earlier file
                self._given.discard(ino)
            return None
        self._given.add(ino)
        self._put((ino, None))
        return _FileSink(self, ino)

    def forget(self, fd: int) -> None:
        """`fd` is a new file not hashed as written: forget what an earlier file of its inode had."""
        st = os.fstat(fd)
        ino = (st.st_dev, st.st_ino)
        if ino in self._given:
            self._put((ino, None))
            self._given.discard(ino)

    def finish(self) -> None:
        """Wait until everything written so far is hashed (idempotent; the thread ends)."""
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error


class _FileSink:
    __slots__ = ("_hashes", "_ino")

    def __init__(self, hashes: _FileHashes, ino: tuple[int, int]) -> None:
        self._hashes = hashes
        self._ino = ino

    def update(self, data: bytes) -> None:
        if data:
            self._hashes._put((self._ino, data))

    def close(self) -> None:
        self._hashes._put((self._ino, b""))
