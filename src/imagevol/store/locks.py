"""Advisory file locks (``fcntl.flock``) shared by threads and processes.

A flock belongs to an open file description, so two ``FileLock`` objects on the same path exclude each
other even inside one process; the kernel drops the lock when its holder dies (SIGKILL included).

Lock files that may be deleted while held (the lock of an ingest directory, removed on commit) need
``recheck=True``: after the lock is taken the path must still name the locked inode, otherwise a waiter
would hold a lock on an unlinked file while a newcomer locks a fresh one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import StoreError, UsageError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_lock_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise UsageError(
            f"invalid lock name {name!r}",
            hint="use letters, digits, '.', '_' and '-' (at most 128 characters, no '..')",
        )
    return name


class FileLock:
    """One advisory lock on one file. Not reentrant; use one object per holder."""

    def __init__(self, path: str | os.PathLike[str], *, shared: bool = False, recheck: bool = False) -> None:
        self.path = Path(path)
        self.shared = shared
        self.recheck = recheck
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking=False`` return False at once if another holder has it."""
        if self._fd is not None:
            raise StoreError(f"lock {self.path} is already held by this object")
        op = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except FileNotFoundError:
                # The directory was removed (an ingest was committed or collected): recreate it.
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                continue
            try:
                fcntl.flock(fd, op)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            if self.recheck and not _same_file(fd, self.path):
                os.close(fd)  # the file was unlinked while we waited: lock the current one instead
                continue
            self._fd = fd
            if not self.shared:
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                except OSError:
                    pass
            return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def is_locked(path: str | os.PathLike[str]) -> bool:
    """True if someone holds a lock on ``path`` (probe with a non-blocking exclusive lock)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def named_lock(lock_dir: Path, name: str, *, shared: bool = False, blocking: bool = True) -> Iterator[FileLock]:
    """``lock_dir/<name>.lock``; raises StoreError if ``blocking=False`` and the lock is taken."""
    validate_lock_name(name)
    lock = FileLock(lock_dir / f"{name}.lock", shared=shared)
    if not lock.acquire(blocking):
        raise StoreError(
            f"lock {name!r} is held by another process",
            hint="wait for the other imagevol command (pull, gc, fsck) to finish",
        )
    try:
        yield lock
    finally:
        lock.release()
