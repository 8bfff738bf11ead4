"""Trees deeper than PATH_MAX and Python's recursion limit: made and removed one component at a
time, without the code under test (so a test that fails still leaves nothing pytest's own
recursive cleanup of the temp directory would choke on)."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def make_deep(top: Path, depth: int, *, seal: bool = False) -> None:
    """``top/a/a/.../a/f``, ``depth`` directories deep; read-only like a snapshot when ``seal``."""
    top.mkdir()
    fds = [os.open(top, _DIR)]
    try:
        for _ in range(depth):
            os.mkdir("a", 0o755, dir_fd=fds[-1])
            fds.append(os.open("a", _DIR, dir_fd=fds[-1]))
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fds[-1]))
        if seal:
            for fd in fds:
                os.fchmod(fd, 0o555)
    finally:
        for fd in fds:
            os.close(fd)


def rm_deep(top: Path) -> None:
    """Remove ``top`` whatever its depth (best effort: mount points and the like are left)."""
    if not os.path.lexists(top) or os.path.islink(top) or not os.path.isdir(top):
        with contextlib.suppress(OSError):
            os.unlink(top)
        return
    pfd = os.open(top.parent, _DIR)
    stack: list[tuple[int, str, int, set[str]]] = [(pfd, top.name, os.open(top, _DIR, dir_fd=pfd), set())]
    try:
        while stack:
            parent, name, fd, skip = stack[-1]
            with contextlib.suppress(OSError):
                os.fchmod(fd, 0o700)
            child = None
            for n in os.listdir(fd):
                if n in skip:
                    continue
                st = os.stat(n, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    child = n
                    break
                with contextlib.suppress(OSError):
                    os.unlink(n, dir_fd=fd)
            if child is not None:
                try:
                    stack.append((fd, child, os.open(child, _DIR, dir_fd=fd), set()))
                except OSError:
                    skip.add(child)
                continue
            stack.pop()
            os.close(fd)
            try:
                os.rmdir(name, dir_fd=parent)
            except OSError:
                if stack:
                    stack[-1][3].add(name)
    finally:
        for _, _, fd, _ in stack:
            with contextlib.suppress(OSError):
                os.close(fd)
        os.close(pfd)
