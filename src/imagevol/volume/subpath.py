"""Paths of a volume, walked through descriptors: :func:`resolve_subpath` opens a sub path below
the snapshot without following any symbolic link (``openat2`` with ``RESOLVE_BENEATH``, else one
``O_NOFOLLOW`` component at a time); targets are reached from ``/`` the same way, identified by
device and inode, prepared (an empty directory or file), opened, and torn down (:func:`_teardown`:
unmount a bind through the parent's descriptor or empty a tree, then remove only what imagevol
made).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import BusyError, ImagevolError, UsageError
from ..fstree import force_rmtree
from .bind import UMOUNT_NOFOLLOW, _bind_mounted, _libc, _umount, mountpoints

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


# --------------------------------------------------------------------------------------------------
# sub paths


def _normalize_subpath(subpath: str) -> str:
    parts = [c for c in subpath.split("/") if c not in ("", ".")]
    return "/".join(parts)


# openat2(2) (Linux >= 5.6; one number on every architecture that has it)
_SYS_OPENAT2 = 437
RESOLVE_NO_XDEV, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x01, 0x02, 0x04, 0x08
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_DIR = _PATH_FLAGS | os.O_DIRECTORY


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int | None:
    """openat2(2) through libc's syscall(); None when the kernel (or a seccomp filter) lacks it."""
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    how = _OpenHow(flags, 0, resolve)
    fd = libc.syscall(
        _SYS_OPENAT2, ctypes.c_int(dir_fd), os.fsencode(path), ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how))
    )
    if fd < 0:
        e = ctypes.get_errno()
        if e in (errno.ENOSYS, errno.EPERM):
            return None
        raise OSError(e, os.strerror(e), path)
    return int(fd)


def _lstat_beneath(root_fd: int, parts: list[str]) -> os.stat_result:
    """The lstat of ``parts`` below the directory ``root_fd``, reached without following any symbolic
    link, magic link or mount (``openat2`` with ``RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS``, else one
    ``O_NOFOLLOW`` component at a time). OSError for anything else, a final symlink included."""
    fd = _openat2(
        root_fd,
        "/".join(parts),
        _PATH_FLAGS,
        RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV,
    )
    if fd is None:
        fd = os.dup(root_fd)
        try:
            for c in parts[:-1]:
                nfd = os.open(c, _PATH_DIR, dir_fd=fd)
                os.close(fd)
                fd = nfd
            nfd = os.open(parts[-1], _PATH_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nfd
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if st.st_dev != os.fstat(root_fd).st_dev:
        raise OSError(errno.EXDEV, "on another file system")
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, "a symbolic link")
    return st


def resolve_subpath(snapshot: Path, subpath: str, *, artifact: bool, ref: str) -> Path:
    """The path of ``subpath`` inside ``snapshot``, resolved inside the snapshot only: no symbolic
    link is followed, not even one that stays inside (as CRI-O refuses them). Every sub path that
    does not name a file or directory reached that way (missing, through or at a symlink, under a
    file) gets one and the same error, so the answer tells nothing about what lies outside the
    snapshot; ``..`` is refused before anything is looked up."""
    kind = "OCI artifact volume" if artifact else "image volume"
    if "\0" in subpath:
        raise UsageError(f'sub path "{subpath}" contains a NUL byte')
    parts = [c for c in subpath.split("/") if c not in ("", ".")]
    if ".." in parts:
        raise UsageError(
            f'sub path "{subpath}" must not contain ".." in {kind} "{ref}"',
            hint="a sub path is relative to the volume root and cannot leave it",
        )
    if not parts:
        return Path(snapshot)
    fd = os.open(snapshot, _DIR_FLAGS)
    try:
        st = _lstat_beneath(fd, parts)
        ok = stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)
    except OSError:
        ok = False
    finally:
        os.close(fd)
    if not ok:
        raise ImagevolError(
            f'sub path "{subpath}" does not exist in {kind} "{ref}"',
            hint="a sub path names a file or directory inside the volume, reached without symbolic links",
        )
    return Path(snapshot, *parts)


# --------------------------------------------------------------------------------------------------
# targets: reached from "/" without following symlinks, identified by device and inode


def _canonical(target: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(target))))


def _ident(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino]


def _recorded_ident(value: Any) -> list[int] | None:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value
    return None


def _path_changed(target: Path, what: str) -> ImagevolError:
    return ImagevolError(
        f"the volume at {target} cannot be reached safely: {what}; nothing was changed",
        hint="imagevol never follows a symbolic link to a volume target and removes only what it made; "
        "restore the path it was mounted at (or remove the volume there by hand), then retry",
    )


def _open_parent(target: Path, *, create: bool) -> int:
    """A descriptor (O_PATH) of ``target``'s parent directory, reached from ``/`` one component at a
    time without following any symbolic link; missing directories are created (0o755) when
    ``create``. FileNotFoundError when a component is missing and not ``create``."""
    parts = target.parts[1:-1]
    fd = os.open("/", _PATH_DIR)
    try:
        for i, c in enumerate(parts):
            try:
                nfd = os.open(c, _PATH_DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(c, 0o755, dir_fd=fd)
                nfd = os.open(c, _PATH_DIR, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    where = "/" + "/".join(parts[: i + 1])
                    raise _path_changed(target, f"{where} is a symbolic link or not a directory") from None
                raise
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _prepare_target(
    pfd: int, target: Path, *, source_is_dir: bool, mode: str, mounts: set[str]
) -> tuple[bool, int | None]:
    """Make the target (``target.name`` in the directory ``pfd``) ready: an empty directory, or for
    a file source an empty file; returns (created by us, original mode of an existing directory)."""
    name = target.name
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is None:
        if source_is_dir:
            os.mkdir(name, 0o755, dir_fd=pfd)
        else:
            os.close(os.open(name, _NEW_FILE, 0o444 if mode == "bind" else 0o600, dir_fd=pfd))
        return True, None
    if source_is_dir:
        if not stat.S_ISDIR(st.st_mode):
            raise ImagevolError(
                f"target {target} exists and is not a directory",
                hint="mount the volume on an empty directory or a path that does not exist yet",
            )
        fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        try:
            full = bool(os.listdir(fd))
        finally:
            os.close(fd)
        if full:
            raise ImagevolError(
                f"target {target} is not empty",
                hint="mount the volume on an empty directory or a path that does not exist yet",
            )
        if os.fspath(target) in mounts and mode != "bind":
            raise ImagevolError(f"target {target} is a mount point")
        return False, stat.S_IMODE(st.st_mode)
    if mode == "bind" and stat.S_ISREG(st.st_mode) and st.st_size == 0:
        return False, None
    raise ImagevolError(
        f"target {target} already exists; the sub path names a file",
        hint="give a target path that does not exist yet (for bind mounts: or an empty file)",
    )


def _open_target(pfd: int, target: Path, is_dir: bool, mode: str) -> int:
    flags = _DIR_FLAGS if is_dir else (_PATH_FLAGS if mode == "bind" else os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.open(target.name, flags, dir_fd=pfd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _path_changed(target, "it was replaced by a symbolic link or another kind of file") from None
        raise


def _teardown(target: Path, mode: str, side: dict[str, Any]) -> None:
    """Undo the volume at ``target``: unmount (bind) or empty (trees) it, then remove the target
    if imagevol created it, all through descriptors of the parent reached without symlinks, and
    only after the device and inode recorded at mount time match. ImagevolError (nothing changed)
    when they do not, or the path now passes through a symlink."""
    created = bool(side.get("created_target"))
    is_dir = side.get("is_dir", True) is not False
    orig_mode = side.get("target_mode") if isinstance(side.get("target_mode"), int) else None
    target_id = _recorded_ident(side.get("target_id"))
    mounted_id = _recorded_ident(side.get("mounted_id"))
    mounted = _bind_mounted(os.fspath(target), side, mountpoints()) if mode == "bind" else False
    try:
        pfd = _open_parent(target, create=False)
    except FileNotFoundError:
        if mode == "bind" and mounted:
            raise _path_changed(target, "a directory on its path is missing") from None
        return  # nothing of the volume is left
    name = target.name
    try:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            if mode == "bind" and mounted:
                raise _path_changed(target, "it is missing") from None
            return
        if mode == "bind":
            if mounted:
                if mounted_id is not None and _ident(st) != mounted_id:
                    raise _path_changed(target, "what is mounted there is not this volume")
                try:
                    _umount(f"/proc/self/fd/{pfd}/{name}", UMOUNT_NOFOLLOW)
                except OSError as e:
                    if e.errno == errno.EBUSY:
                        raise BusyError(
                            f"volume at {target} is busy: a process still uses it",
                            hint=f"stop what uses it (`fuser -vm {target}` shows it), then retry",
                        ) from None
                    if e.errno != errno.EINVAL:  # EINVAL: not mounted any more
                        raise ImagevolError(f"cannot unmount {target}: {e.strerror}") from None
            if created:
                _remove_ours(pfd, target, is_dir, target_id)
            return
        # a tree: the target directory (or file) imagevol filled
        if target_id is not None and _ident(st) != target_id:
            raise _path_changed(target, "the file there is not the one imagevol made")
        if not is_dir:
            if created:
                _remove_ours(pfd, target, is_dir, target_id)
            return
        tfd = _open_target(pfd, target, True, mode)
        try:
            if target_id is not None and _ident(os.fstat(tfd)) != target_id:
                raise _path_changed(target, "the directory there is not the one imagevol made")
            os.fchmod(tfd, stat.S_IMODE(os.fstat(tfd).st_mode) | 0o700)
            for child in os.listdir(tfd):
                force_rmtree(f"/proc/self/fd/{tfd}/{child}")
            if not created and orig_mode is not None:
                os.fchmod(tfd, orig_mode)
        finally:
            os.close(tfd)
        if created:
            _remove_ours(pfd, target, is_dir, target_id)
    finally:
        os.close(pfd)


def _remove_ours(pfd: int, target: Path, is_dir: bool, target_id: list[int] | None) -> None:
    """Remove the target imagevol created (an empty directory or a file), if it is still that one."""
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(target.name, dir_fd=pfd, follow_symlinks=False)
        if target_id is not None and _ident(st) != target_id:
            return  # not what imagevol made: left in place
        if is_dir:
            if stat.S_ISDIR(st.st_mode):
                with contextlib.suppress(OSError):
                    os.rmdir(target.name, dir_fd=pfd)
        elif not stat.S_ISDIR(st.st_mode):
            os.unlink(target.name, dir_fd=pfd)
