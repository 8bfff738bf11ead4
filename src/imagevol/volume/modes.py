"""How a volume is made: the :data:`MODES` a caller may ask for, and the private trees of
``copy`` (and of ``hardlink`` without root): each file a reflink where the file system allows,
else a copy, with the snapshot's modes minus setuid/setgid and its hard links kept
(:func:`_fill`, :func:`_replicate`).
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImagevolError
from ..fstree import copy_fd
from ..fsutil import reflink
from .subpath import _DIR_FLAGS, _NEW_FILE

MODES = ("auto", "bind", "hardlink", "copy")


# --------------------------------------------------------------------------------------------------
# trees (copy mode; hardlink without root)


# Copy volumes live outside any nosuid mount: setuid/setgid files are copied without those bits
# (the snapshot under the 0700 store root keeps them).
_SETID = stat.S_ISUID | stat.S_ISGID


@dataclass
class _Copied:
    """How the files of a tree were made: reflinks (no data written) or copies."""

    cloned: int = 0
    copied: int = 0


def _copy_into(sfd: int, dfd: int, counts: _Copied) -> None:
    if reflink(sfd, dfd):
        counts.cloned += 1
    else:
        copy_fd(sfd, dfd)
        counts.copied += 1


def _replicate(
    src_fd: int,
    dst_fd: int,
    as_root: bool,
    counts: _Copied,
    root_fd: int,
    dst_path: str = "",
    seen: dict[tuple[int, int], str] | None = None,
) -> None:
    """Recreate the content of directory ``src_fd`` in the empty directory ``dst_fd`` (whose path
    is ``dst_path`` below the volume root ``root_fd``). Files are private inodes (reflinks or copies)
    with the snapshot's modes minus setuid/setgid. Hard links are kept: a file with several names
    is copied once, then linked inside the volume."""
    seen = {} if seen is None else seen
    for name in sorted(os.listdir(src_fd)):
        st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
        mode = stat.S_IMODE(st.st_mode)
        rel = os.path.join(dst_path, name) if dst_path else name
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o700, dir_fd=dst_fd)
            sfd = os.open(name, _DIR_FLAGS, dir_fd=src_fd)
            dfd = os.open(name, _DIR_FLAGS, dir_fd=dst_fd)
            try:
                _replicate(sfd, dfd, as_root, counts, root_fd, rel, seen)
                if as_root:
                    os.fchown(dfd, st.st_uid, st.st_gid)
                os.fchmod(dfd, mode)
                os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(sfd)
                os.close(dfd)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=src_fd), name, dir_fd=dst_fd)
            if as_root:
                os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_fd, follow_symlinks=False)
        elif stat.S_ISREG(st.st_mode):
            first = seen.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None
            if first is not None:
                os.link(first, name, src_dir_fd=root_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
                continue
            if st.st_nlink > 1:
                seen[(st.st_dev, st.st_ino)] = rel
            sfd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
            try:
                dfd = os.open(name, _NEW_FILE, 0o600, dir_fd=dst_fd)
                try:
                    _copy_into(sfd, dfd, counts)
                    if as_root:
                        os.fchown(dfd, st.st_uid, st.st_gid)
                    os.fchmod(dfd, mode & ~_SETID)  # outside a nosuid mount: no setuid
                    os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(dfd)
            finally:
                os.close(sfd)
        else:  # device nodes and FIFOs: recreated when allowed, else left out
            with contextlib.suppress(OSError):
                os.mknod(name, stat.S_IFMT(st.st_mode) | mode, st.st_rdev, dir_fd=dst_fd)


def _fill(source: Path, target: Path, target_fd: int, is_dir: bool) -> _Copied:
    """Fill the target (open as ``target_fd``: an empty directory, or for a file source an empty
    file imagevol created) with private copies of ``source``."""
    counts = _Copied()
    try:
        if not is_dir:
            st = os.stat(source, follow_symlinks=False)
            sfd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                _copy_into(sfd, target_fd, counts)
            finally:
                os.close(sfd)
            os.fchmod(target_fd, stat.S_IMODE(st.st_mode) & ~_SETID)
            return counts
        sfd = os.open(source, _DIR_FLAGS)
        try:
            _replicate(sfd, target_fd, os.geteuid() == 0, counts, target_fd)
            os.fchmod(target_fd, stat.S_IMODE(os.fstat(sfd).st_mode))
        finally:
            os.close(sfd)
    except OSError as e:
        raise ImagevolError(f"cannot copy the volume into {target}: {e.strerror or e}") from None
    return counts
