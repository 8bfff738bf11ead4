"""Read-only volumes: a snapshot (or a sub path of it) made visible at a target path.

Modes:

``bind``
    A bind mount of the snapshot directory, then remounted ``ro,nosuid,nodev`` (never ``noexec``:
    executables in the volume run, as with CRI-O's image volumes). Writes fail with EROFS. Instant,
    whatever the size. Needs root (mount(2) through libc; no mount(8) binary needed).
``hardlink``
    Kept for compatibility; it never links into the store any more (a hard link shares the store's
    inode: whoever may write it, root or the file's owner after ``chmod u+w``, would change the
    verified blob or the shared snapshot). As root it is a ``bind`` volume; without root a ``copy``
    (reflinked where the file system allows), with a warning when bytes had to be copied.
``copy``
    A private tree: each file a reflink (``FICLONE``: a copy-on-write inode of its own, no data
    written) where the target and the store share a file system that supports it, else a copy
    (in-kernel ``copy_file_range`` where possible). Modes as the snapshot declares them, minus
    setuid/setgid (a copy is outside any nosuid mount).
``auto``
    ``bind`` when running as root, else ``copy``.

The target is created if missing (parents too); if it exists it must be an empty directory (or,
for a sub path naming a file, a missing path — or for ``bind`` an empty file). Creating the same
ref/digest/sub path on the same target again returns the existing volume. Each volume is recorded
in the store's metadata (``Meta.add_volume``) with a lease ``volume:<id>`` on its manifest so gc
keeps its content; facts the table has no column for (sub path, whether imagevol created the
target, the device and inode of the target and of the mounted root) are kept in
``R/volumes/<id>.json``.

Targets are never reached through a symbolic link after the target was canonicalized: the parent
is opened from ``/`` one component at a time with ``O_NOFOLLOW`` (missing directories created on
the way), the target is created, mounted on and filled through descriptors, and :func:`remove_volume`
walks the same way and removes only what the record proves imagevol made (device and inode);
``umount2`` gets ``UMOUNT_NOFOLLOW`` and a path through the parent's descriptor.

:func:`list_volumes` reconciles records with ``/proc/self/mountinfo``: a bind volume whose mount is
gone (reboot, manual umount) is reported ``mounted=False``; :func:`reconcile` drops such records.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..digest import Digest
from ..errors import BusyError, ImagevolError, NotFoundError, StoreError, UsageError
from ..fstree import copy_fd, force_rmtree
from ..fsutil import reflink
from ..materialize import Snapshot
from ..store import Store, VolumeRecord
from ..store.meta import pid_alive

__all__ = [
    "MODES",
    "Volume",
    "create_volume",
    "list_volumes",
    "mountpoints",
    "reconcile",
    "remove_volume",
    "resolve_subpath",
]

MODES = ("auto", "bind", "hardlink", "copy")
VOLUMES = "volumes"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

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


@dataclass
class Volume:
    id: str
    target: Path
    ref: str
    digest: Digest
    snapshot_key: str
    mode: str
    subpath: str | None
    created_at: float
    mounted: bool


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


# --------------------------------------------------------------------------------------------------
# records


def _volumes_dir(store: Store) -> Path:
    store.ensure()
    d = store.root / VOLUMES
    with contextlib.suppress(FileExistsError):
        d.mkdir(mode=0o700)
    return d


def _sidecar_path(store: Store, volume_id: str) -> Path:
    if not volume_id.isalnum():
        raise StoreError(f"invalid volume id {volume_id!r}")
    return store.root / VOLUMES / f"{volume_id}.json"


def _read_sidecar(store: Store, volume_id: str) -> dict[str, Any]:
    try:
        doc = json.loads(_sidecar_path(store, volume_id).read_bytes())
    except (OSError, ValueError, StoreError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _write_sidecar(store: Store, volume_id: str, doc: dict[str, Any]) -> None:
    path = _volumes_dir(store) / f"{volume_id}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, sort_keys=True))
    os.rename(tmp, path)


def _drop_sidecar(store: Store, volume_id: str) -> None:
    with contextlib.suppress(OSError, StoreError):
        _sidecar_path(store, volume_id).unlink()


def _target_lock(target: Path) -> str:
    return "volume-" + hashlib.sha256(os.fsencode(target)).hexdigest()[:40]


def _canonical(target: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(target))))


def _is_mounted(rec: VolumeRecord, mounts: set[str], side: dict[str, Any] | None = None) -> bool:
    if rec.mode == "bind":
        return _bind_mounted(rec.target, side if side is not None else {}, mounts)
    return os.path.lexists(rec.target)


def _volume(store: Store, rec: VolumeRecord, mounts: set[str]) -> Volume:
    side = _read_sidecar(store, rec.id)
    sub = side.get("subpath")
    return Volume(
        id=rec.id,
        target=Path(rec.target),
        ref=rec.ref or "",
        digest=rec.digest,
        snapshot_key=rec.snapshot_key or "",
        mode=rec.mode,
        subpath=sub if isinstance(sub, str) and sub else None,
        created_at=rec.created_at,
        mounted=_is_mounted(rec, mounts, side),
    )


def _forget(store: Store, rec: VolumeRecord) -> None:
    store.meta.remove_volume(rec.id)
    store.meta.remove_lease(f"volume:{rec.id}")
    _drop_sidecar(store, rec.id)


# --------------------------------------------------------------------------------------------------
# targets: reached from "/" without following symlinks, identified by device and inode


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


# --------------------------------------------------------------------------------------------------
# public API


def create_volume(
    store: Store,
    snapshot: Snapshot,
    target: str | os.PathLike[str],
    *,
    ref: str,
    mode: str = "auto",
    subpath: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> Volume:
    """Make ``snapshot`` (or its ``subpath``) visible read-only at ``target``; see the module docs.
    ``warn`` hears when ``hardlink`` was asked for and bytes had to be copied."""
    if mode not in MODES:
        raise UsageError(f"invalid volume mode {mode!r}", hint="mode must be one of: " + ", ".join(MODES))
    # Never a hard link into the store: root gets a read-only bind, everyone else a private tree.
    how = mode if mode in ("bind", "copy") else ("bind" if os.geteuid() == 0 else "copy")
    tgt = _canonical(target)
    if tgt == Path("/"):
        raise UsageError("the target of a volume cannot be /")
    artifact = snapshot.flavour != "image"
    sub = _normalize_subpath(subpath) if subpath else ""
    source = resolve_subpath(snapshot.path, sub, artifact=artifact, ref=ref) if sub else Path(snapshot.path)
    source_is_dir = os.path.isdir(source) and not os.path.islink(source)
    with store.lock(_target_lock(tgt)):
        meta = store.meta
        mounts = mountpoints()
        rec = meta.get_volume_by_target(os.fspath(tgt))
        if rec is not None and _abandoned(store, rec, mounts):
            _undo_abandoned(store, rec)  # a killed earlier attempt at this target
            rec, mounts = None, mountpoints()
        if rec is not None:
            existing = _volume(store, rec, mounts)
            same = (
                rec.digest == snapshot.digest
                and (rec.ref or "") == ref
                and (existing.subpath or "") == sub
                and rec.snapshot_key == snapshot.key
                and rec.mode == how
            )
            if existing.mounted and same:
                return existing
            if existing.mounted:
                raise ImagevolError(
                    f"target {tgt} already holds volume {existing.id} ({rec.ref or rec.digest})",
                    hint="unmount that volume first, or choose another target",
                )
            _forget(store, rec)  # stale record: its mount or tree is gone
        pfd = _open_parent(tgt, create=True)
        try:
            created, orig_mode = _prepare_target(pfd, tgt, source_is_dir=source_is_dir, mode=how, mounts=mounts)
            # Record first, then mount: a kill in between leaves a record without a mount (`volumes`
            # shows it gone; `unmount` or `volumes --prune` clears it), never a mount nobody knows.
            volume_id = secrets.token_hex(8)
            side: dict[str, Any] = {
                "subpath": sub,
                "created_target": created,
                "target_mode": orig_mode,
                "is_dir": source_is_dir,
            }
            tfd = -1
            try:
                tfd = _open_target(pfd, tgt, source_is_dir, how)
                side["target_id"] = _ident(os.fstat(tfd))
                # "mounting" until done: a record left so by a killed process (whose pid is gone) is
                # dropped by the next listing instead of showing up as a half-made volume.
                _write_sidecar(store, volume_id, {**side, "state": "mounting", "pid": os.getpid()})
                rec = meta.add_volume(volume_id, os.fspath(tgt), ref, snapshot.digest, snapshot.key, how)
                meta.add_lease(f"volume:{volume_id}", [snapshot.digest], kind="volume")
                if how == "bind":
                    _bind(source, tgt, tfd)
                    side["mounted_id"] = _ident(os.stat(tgt.name, dir_fd=pfd, follow_symlinks=False))
                    side["mount"] = _mount_entry(tgt)
                else:
                    counts = _fill(source, tgt, tfd, source_is_dir)
                    if mode == "hardlink" and counts.copied and warn is not None:
                        warn(
                            f"--mode hardlink made a copy at {tgt} ({counts.copied} file(s) copied, "
                            f"{counts.cloned} reflinked): volumes never share the store's inodes without a "
                            "read-only mount (bind, as root)"
                        )
                _write_sidecar(store, volume_id, {**side, "state": "ready"})
            except BaseException:
                with contextlib.suppress(Exception):
                    meta.remove_volume(volume_id)
                    meta.remove_lease(f"volume:{volume_id}")
                _drop_sidecar(store, volume_id)
                if tfd >= 0:
                    os.close(tfd)
                    tfd = -1
                with contextlib.suppress(OSError, ImagevolError):
                    _teardown(tgt, how, side)
                raise
            finally:
                if tfd >= 0:
                    os.close(tfd)
        finally:
            os.close(pfd)
        return Volume(
            id=volume_id,
            target=tgt,
            ref=ref,
            digest=snapshot.digest,
            snapshot_key=snapshot.key,
            mode=how,
            subpath=sub or None,
            created_at=rec.created_at,
            mounted=True,
        )


def remove_volume(store: Store, target: str | os.PathLike[str]) -> Volume:
    """Unmount (bind) or delete (copy, and trees of the old hardlink mode) the volume at ``target``
    and drop its record and lease. NotFoundError if no volume is recorded there; BusyError if the
    mount is busy; ImagevolError, with everything left in place, if the path to the target now
    passes through a symbolic link or leads to something imagevol did not make."""
    abs_target = Path(os.path.abspath(os.fspath(target)))
    tgt = _canonical(target)
    meta = store.meta
    # The recorded path first: a symlink swapped into it must not redirect the lookup elsewhere.
    key = abs_target if meta.get_volume_by_target(os.fspath(abs_target)) is not None else tgt
    with store.lock(_target_lock(key)):
        rec = meta.get_volume_by_target(os.fspath(key))
        if rec is None:
            raise NotFoundError(
                f"no imagevol volume is recorded at {target}",
                hint="only volumes imagevol created can be removed; list_volumes() shows them",
            )
        side = _read_sidecar(store, rec.id)
        path = Path(rec.target)
        _teardown(path, rec.mode, side)
        _forget(store, rec)
        return Volume(
            id=rec.id,
            target=path,
            ref=rec.ref or "",
            digest=rec.digest,
            snapshot_key=rec.snapshot_key or "",
            mode=rec.mode,
            subpath=side.get("subpath") or None,
            created_at=rec.created_at,
            mounted=False,
        )


def _abandoned(store: Store, rec: VolumeRecord, mounts: set[str]) -> bool:
    """A volume whose creating process died before it was mounted (or filled)."""
    side = _read_sidecar(store, rec.id)
    if side.get("state") != "mounting":
        return False
    pid = side.get("pid")
    return not (isinstance(pid, int) and pid_alive(pid))


def list_volumes(store: Store) -> list[Volume]:
    """Every recorded volume; ``mounted`` from ``/proc/self/mountinfo`` (bind) or the target's
    existence (trees). Volumes whose creation was killed half-way are cleaned up here."""
    mounts = mountpoints()
    out = []
    for rec in store.meta.list_volumes():
        if _abandoned(store, rec, mounts):
            tgt = Path(rec.target)
            with store.lock(_target_lock(tgt)):
                current = store.meta.get_volume(rec.id)
                if current is not None and _abandoned(store, current, mountpoints()):
                    _undo_abandoned(store, current)
                    continue
        out.append(_volume(store, rec, mounts))
    return out


def _undo_abandoned(store: Store, rec: VolumeRecord) -> None:
    with contextlib.suppress(OSError, ImagevolError):
        _teardown(Path(rec.target), rec.mode, _read_sidecar(store, rec.id))
    _forget(store, rec)


def reconcile(store: Store) -> list[Volume]:
    """Drop the records and leases of volumes that are gone (``mounted=False``); returns them."""
    removed: list[Volume] = []
    for vol in list_volumes(store):
        if vol.mounted:
            continue
        with store.lock(_target_lock(vol.target)):
            rec = store.meta.get_volume(vol.id)
            if rec is None or _is_mounted(rec, mountpoints(), _read_sidecar(store, rec.id)):
                continue
            _forget(store, rec)
        removed.append(vol)
    return removed
