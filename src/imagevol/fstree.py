"""Descriptor-based file-system tree primitives shared by the materializer, the volumes and the layout
sink: copying, removing a sealed tree of any depth without following symlinks or crossing mounts,
and walking a tree from a directory descriptor."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import ImagevolError

__all__ = ["CHUNK", "copy_fd", "count_files", "force_rmtree"]

CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def copy_fd(src: int, dst: int) -> int:
    """Copy the rest of ``src`` to ``dst`` (in-kernel when possible); returns the bytes copied."""
    total = 0
    try:
        while True:
            n = os.copy_file_range(src, dst, 1 << 30)
            if n == 0:
                return total
            total += n
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF):
            raise
    while True:
        data = os.read(src, CHUNK)
        if not data:
            return total
        view = memoryview(data)
        while view:
            view = view[os.write(dst, view) :]
        total += len(data)


def force_rmtree(path: str | os.PathLike[str]) -> None:
    """Remove ``path`` and everything below it, making directories writable first (sealed trees)
    and never following a symlink or crossing into another file system. Iterative: a tree of any
    depth is removed (no recursion, one open descriptor per level)."""
    path = os.fspath(path)
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    parent, name = os.path.split(os.path.abspath(path))
    pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _rmtree_at(pfd, name, st.st_dev)
    finally:
        os.close(pfd)


def _open_for_removal(pfd: int, name: str, dev: int) -> int:
    fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
    try:
        st = os.fstat(fd)
        if st.st_dev != dev:
            raise ImagevolError(f"refusing to remove {name!r}: it is on another file system (a mount point?)")
        if stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _rmtree_at(pfd: int, name: str, dev: int) -> None:
    """Remove the directory ``name`` of ``pfd`` and its content, depth first, with an explicit stack
    of (parent fd, name, fd, names left) frames. What cannot be removed (a mount point inside, an
    immutable file) is left with its parents, everything else goes; then the first error is raised."""
    fd = _open_for_removal(pfd, name, dev)
    stack: list[tuple[int, str, int, list[str]]] = [(pfd, name, fd, os.listdir(fd))]
    failed: list[BaseException] = []
    try:
        while stack:
            parent_fd, dname, dfd, pending = stack[-1]
            if pending:
                child = pending.pop()
                try:
                    cst = os.stat(child, dir_fd=dfd, follow_symlinks=False)
                    if stat.S_ISDIR(cst.st_mode):
                        cfd = _open_for_removal(dfd, child, dev)
                        try:
                            names = os.listdir(cfd)
                        except BaseException:
                            os.close(cfd)
                            raise
                        stack.append((dfd, child, cfd, names))
                    else:
                        os.unlink(child, dir_fd=dfd)
                except FileNotFoundError:
                    pass
                except (OSError, ImagevolError) as e:
                    failed.append(e)
                continue
            stack.pop()
            os.close(dfd)
            try:
                os.rmdir(dname, dir_fd=parent_fd)
            except OSError as e:
                if not (failed and e.errno in (errno.ENOTEMPTY, errno.EEXIST)):
                    failed.append(e)
    finally:
        for _, _, dfd, _ in stack:
            os.close(dfd)
    if failed:
        raise failed[0]


def _walk_tree(fd: int) -> Iterator[tuple[int, str, str, os.stat_result]]:
    """(dir fd, relative path, name, lstat) of every entry below ``fd``, children before their
    directory, names in sorted order. Iterative (an explicit stack of open directories): any depth
    is walked."""
    stack: list[tuple[int, list[str], str, os.stat_result | None, int | None]] = [
        (fd, sorted(os.listdir(fd), reverse=True), "", None, None)
    ]
    try:
        while stack:
            dfd, pending, drel, dst, parent = stack[-1]
            if pending:
                name = pending.pop()
                rel = f"{drel}/{name}" if drel else name
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    cfd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                    try:
                        names = sorted(os.listdir(cfd), reverse=True)
                    except BaseException:
                        os.close(cfd)
                        raise
                    stack.append((cfd, names, rel, st, dfd))
                else:
                    yield dfd, rel, name, st
                continue
            stack.pop()
            if parent is not None:
                os.close(dfd)
                assert dst is not None
                yield parent, drel, drel.rsplit("/", 1)[-1], dst
    finally:
        for dfd, _, _, _, parent in stack:
            if parent is not None:
                os.close(dfd)


def _walk_fd(fd: int) -> Iterator[tuple[int, str, os.stat_result]]:
    """(dir fd, name, lstat) of every entry below ``fd``, children before their directory."""
    for dfd, _, name, st in _walk_tree(fd):
        yield dfd, name, st


def _seal(root_fd: int) -> int:
    """The number of regular files. Modes stay as the layers declared them: read-only comes from
    the volume's mount, not from stripped write bits."""
    return sum(1 for _, _, st in _walk_fd(root_fd) if stat.S_ISREG(st.st_mode))


def count_files(path: Path) -> int:
    fd = os.open(path, _DIR_FLAGS)
    try:
        return sum(1 for _, _, st in _walk_fd(fd) if stat.S_ISREG(st.st_mode))
    finally:
        os.close(fd)
