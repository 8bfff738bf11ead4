"""The kernel's mount interface for volumes: ``mount(2)``/``umount2(2)`` through libc, the mount
table of ``/proc/self/mountinfo`` (:func:`mountpoints`, and whether a bind volume is still mounted
wherever its mount now is), and the read-only bind itself: a detached clone made
``ro,nosuid,nodev`` and attached in one step (``open_tree`` + ``mount_setattr`` + ``move_mount``),
else a bind mount remounted read-only. The lowest room of the volume package: it knows nothing of
records, modes or targets.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
from pathlib import Path
from typing import Any

from ..errors import ImagevolError

# mount(2) flags (linux/mount.h)
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

# --------------------------------------------------------------------------------------------------
# mount(2) / umount2(2)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc (see fsutil.libc)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    libc.mount.restype = ctypes.c_int
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.umount2.restype = ctypes.c_int
    return libc


def _mount(source: str | None, target: str, flags: int) -> None:
    libc = _libc()
    src = os.fsencode(source) if source is not None else None
    if libc.mount(src, os.fsencode(target), None, flags, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), target)


UMOUNT_NOFOLLOW = 8


def _umount(target: str, flags: int = 0) -> None:
    if _libc().umount2(os.fsencode(target), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), target)


def _unescape(field: bytes) -> str:
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i] == 0x5C and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return os.fsdecode(bytes(out))


def mountpoints() -> set[str]:
    """Mount points of this mount namespace (``/proc/self/mountinfo``)."""
    return {point for _, _, point in _mount_table()}


def _mount_table() -> list[tuple[int, str, str]]:
    """(mount id, root of the mount inside its file system, mount point) of every mount."""
    out: list[tuple[int, str, str]] = []
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split(b" ")
                if len(fields) > 4 and fields[0].isdigit():
                    out.append((int(fields[0]), _unescape(fields[3]), _unescape(fields[4])))
    except OSError:
        pass
    return out


def _mount_entry(target: Path) -> dict[str, Any] | None:
    """The mount id and root of the mount on top of ``target`` (the last one mounted there)."""
    found = [(mid, root) for mid, root, point in _mount_table() if point == os.fspath(target)]
    return {"id": found[-1][0], "root": found[-1][1]} if found else None


def _bind_mounted(target: str, side: dict[str, Any], mounts: set[str]) -> bool:
    """Whether a bind volume is still mounted: at its path, or (a parent renamed by whoever owns
    it) wherever its mount, recognized by the mount id and root recorded at mount time, now is."""
    if target in mounts:
        return True
    m = side.get("mount")
    if not isinstance(m, dict):
        return False
    return any(mid == m.get("id") and root == m.get("root") for mid, root, _ in _mount_table())


# The new mount API (Linux >= 5.12; the same syscall numbers on every architecture): a detached
# clone of the source, made read-only,nosuid,nodev, then attached. The target never shows a
# writable mount, not even for an instant, and a kill leaves either no mount or a read-only one.
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
_OPEN_TREE_CLONE, _AT_EMPTY_PATH, _AT_FDCWD = 1, 0x1000, -100
_MOVE_MOUNT_F_EMPTY_PATH, _MOVE_MOUNT_T_EMPTY_PATH = 0x4, 0x40
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _bind_ro_atomic(src: str, tgt: str, tgt_fd: int) -> bool:
    """Attach a read-only clone of `src` on the file or directory open as `tgt_fd` (whose path is
    `tgt`, for messages) in one step; False when the kernel lacks the API."""
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(src), _OPEN_TREE_CLONE | os.O_CLOEXEC)
    if fd < 0:
        e = ctypes.get_errno()
        if e in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
            return False
        raise OSError(e, os.strerror(e), src)
    try:
        attr = _MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0, 0, 0)
        if libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)) < 0:
            e = ctypes.get_errno()
            if e in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
                return False
            raise OSError(e, os.strerror(e), src)
        how = _MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_T_EMPTY_PATH
        if libc.syscall(_SYS_MOVE_MOUNT, fd, b"", tgt_fd, b"", how) < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), tgt)
        return True
    finally:
        os.close(fd)


def _bind(source: Path, target: Path, target_fd: int) -> None:
    """Bind ``source`` read-only on ``target``, open as ``target_fd`` (the mount goes on that very
    inode, whatever the path names by now)."""
    src, tgt = os.fspath(source), os.fspath(target)
    try:
        if _bind_ro_atomic(src, tgt, target_fd):
            return
    except OSError as e:
        raise ImagevolError(
            f"cannot bind-mount the volume at {tgt}: {e.strerror}",
            hint="bind mounts need root (CAP_SYS_ADMIN); use --mode hardlink or --mode copy otherwise",
        ) from None
    try:
        _mount(src, f"/proc/self/fd/{target_fd}", MS_BIND)
    except OSError as e:
        raise ImagevolError(
            f"cannot bind-mount the volume at {tgt}: {e.strerror}",
            hint="bind mounts need root (CAP_SYS_ADMIN); use --mode hardlink or --mode copy otherwise",
        ) from None
    # Keep the flags a (user-namespace) mount may have locked, add ro,nosuid,nodev; never noexec.
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    try:
        f_flag = os.statvfs(tgt).f_flag
    except OSError:
        f_flag = 0
    for st_flag, ms_flag in (
        (getattr(os, "ST_NOEXEC", 8), MS_NOEXEC),
        (getattr(os, "ST_NOATIME", 1024), MS_NOATIME),
        (getattr(os, "ST_NODIRATIME", 2048), MS_NODIRATIME),
        (getattr(os, "ST_RELATIME", 4096), MS_RELATIME),
    ):
        if f_flag & st_flag:
            flags |= ms_flag
    try:
        _mount(None, tgt, flags)
    except OSError as e:
        with contextlib.suppress(OSError):
            _umount(tgt)
        raise ImagevolError(f"cannot make the volume at {tgt} read-only: {e.strerror}") from None
