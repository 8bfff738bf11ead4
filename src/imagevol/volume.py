"""Read-only volumes: a snapshot (or a sub path of it) made visible at a target path.

Modes:

``bind``
    A bind mount of the snapshot directory, then remounted ``ro,nosuid,nodev`` (never ``noexec``:
    executables in the volume run, as with CRI-O's image volumes). Writes fail with EROFS. Instant,
    whatever the size. Needs root (mount(2) through libc; no mount(8) binary needed).
``hardlink``
    A tree of hard links to the snapshot's files, directories recreated and then made read-only like
    their originals, symlinks recreated. Links share the inode, and with it the read-only mode of
    the sealed snapshot. No file data is written. Needs the target on the store's file system.
``copy``
    A full copy (in-kernel ``copy_file_range`` where possible), modes a-w like the snapshot.
``auto``
    ``bind`` when running as root, else ``hardlink``.

The target is created if missing (parents too); if it exists it must be an empty directory (or,
for a sub path naming a file, a missing path — or for ``bind`` an empty file). Creating the same
ref/digest/sub path on the same target again returns the existing volume. Each volume is recorded
in the store's metadata (``Meta.add_volume``) with a lease ``volume:<id>`` on its manifest so gc
keeps its content; facts the table has no column for (sub path, whether imagevol created the
target) are kept in ``R/volumes/<id>.json``.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .digest import Digest
from .errors import BusyError, ImagevolError, NotFoundError, StoreError, UsageError
from .materialize import Snapshot, copy_fd, force_rmtree
from .store import Store, VolumeRecord
from .store.meta import pid_alive

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


def _umount(target: str) -> None:
    if _libc().umount2(os.fsencode(target), 0) != 0:
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
    out: set[str] = set()
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split(b" ")
                if len(fields) > 4:
                    out.add(_unescape(fields[4]))
    except OSError:
        pass
    return out


# The new mount API (Linux >= 5.12; the same syscall numbers on every architecture): a detached
# clone of the source, made read-only,nosuid,nodev, then attached. The target never shows a
# writable mount, not even for an instant, and a kill leaves either no mount or a read-only one.
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
_OPEN_TREE_CLONE, _AT_EMPTY_PATH, _AT_FDCWD = 1, 0x1000, -100
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _bind_ro_atomic(src: str, tgt: str) -> bool:
    """Attach a read-only clone of `src` at `tgt` in one step; False when the kernel lacks the API."""
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
        if libc.syscall(_SYS_MOVE_MOUNT, fd, b"", _AT_FDCWD, os.fsencode(tgt), _MOVE_MOUNT_F_EMPTY_PATH) < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), tgt)
        return True
    finally:
        os.close(fd)


def _bind(source: Path, target: Path) -> None:
    src, tgt = os.fspath(source), os.fspath(target)
    try:
        if _bind_ro_atomic(src, tgt):
            return
    except OSError as e:
        raise ImagevolError(
            f"cannot bind-mount the volume at {tgt}: {e.strerror}",
            hint="bind mounts need root (CAP_SYS_ADMIN); use --mode hardlink or --mode copy otherwise",
        ) from None
    try:
        _mount(src, tgt, MS_BIND)
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


def resolve_subpath(snapshot: Path, subpath: str, *, artifact: bool, ref: str) -> Path:
    """The path of ``subpath`` inside ``snapshot``, walked one component at a time without following
    any link: a symlink component is refused (as CRI-O does), a missing one is an error naming the
    sub path and the volume; ``..`` is refused."""
    kind = "OCI artifact volume" if artifact else "image volume"
    if "\0" in subpath:
        raise UsageError(f'sub path "{subpath}" contains a NUL byte')
    parts = [c for c in subpath.split("/") if c not in ("", ".")]
    if ".." in parts:
        raise UsageError(
            f'sub path "{subpath}" must not contain ".." in {kind} "{ref}"',
            hint="a sub path is relative to the volume root and cannot leave it",
        )
    fd = os.open(snapshot, _DIR_FLAGS)
    try:
        for i, c in enumerate(parts):
            try:
                st = os.stat(c, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                raise ImagevolError(f'sub path "{subpath}" does not exist in {kind} "{ref}"') from None
            except NotADirectoryError:
                raise ImagevolError(f'sub path "{subpath}" does not exist in {kind} "{ref}"') from None
            if stat.S_ISLNK(st.st_mode):
                raise ImagevolError(
                    f'sub path "{subpath}" passes through a symbolic link ("{"/".join(parts[: i + 1])}") '
                    f'in {kind} "{ref}"',
                    hint="symlinks are not followed in sub paths (they could leave the volume)",
                )
            if i == len(parts) - 1:
                break
            if not stat.S_ISDIR(st.st_mode):
                raise ImagevolError(f'sub path "{subpath}" does not exist in {kind} "{ref}"')
            nfd = os.open(c, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)
    return Path(snapshot, *parts)


# --------------------------------------------------------------------------------------------------
# trees (hardlink and copy modes)


# Hard-link and copy volumes live outside any nosuid mount: setuid/setgid files are copied
# without those bits instead of linked (the snapshot under the 0700 store root keeps them).
_SETID = stat.S_ISUID | stat.S_ISGID


def _replicate(
    src_fd: int,
    dst_fd: int,
    how: str,
    as_root: bool,
    dst_path: str = "",
    seen: dict[tuple[int, int], str] | None = None,
) -> None:
    """Recreate the content of directory ``src_fd`` in the empty directory ``dst_fd`` (whose path is
    ``dst_path``). Copies keep hard links: a file with several names is copied once, then linked."""
    seen = {} if seen is None else seen
    for name in sorted(os.listdir(src_fd)):
        st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o700, dir_fd=dst_fd)
            sfd = os.open(name, _DIR_FLAGS, dir_fd=src_fd)
            dfd = os.open(name, _DIR_FLAGS, dir_fd=dst_fd)
            try:
                _replicate(sfd, dfd, how, as_root, os.path.join(dst_path, name) if dst_path else "", seen)
                if as_root:
                    os.fchown(dfd, st.st_uid, st.st_gid)
                os.fchmod(dfd, mode & ~0o222)
                os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(sfd)
                os.close(dfd)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=src_fd), name, dir_fd=dst_fd)
            if as_root:
                os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_fd, follow_symlinks=False)
        elif how == "hardlink" and not (st.st_mode & _SETID):
            os.link(name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
        elif stat.S_ISREG(st.st_mode):
            first = seen.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 and dst_path else None
            if first is not None:
                os.link(first, name, dst_dir_fd=dst_fd, follow_symlinks=False)
                continue
            if st.st_nlink > 1 and dst_path:
                seen[(st.st_dev, st.st_ino)] = os.path.join(dst_path, name)
            sfd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
            try:
                dfd = os.open(name, _NEW_FILE, 0o600, dir_fd=dst_fd)
                try:
                    copy_fd(sfd, dfd)
                    if as_root:
                        os.fchown(dfd, st.st_uid, st.st_gid)
                    os.fchmod(dfd, mode & ~0o222 & ~_SETID)  # outside a nosuid mount: no setuid
                    os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(dfd)
            finally:
                os.close(sfd)
        else:  # device nodes and FIFOs: recreated when allowed, else left out
            with contextlib.suppress(OSError):
                os.mknod(name, stat.S_IFMT(st.st_mode) | (mode & ~0o222), st.st_rdev, dir_fd=dst_fd)


def _copy_file(src: Path, dst: Path, how: str) -> None:
    st = os.stat(src, follow_symlinks=False)
    if how == "hardlink" and not (st.st_mode & _SETID):
        os.link(src, dst, follow_symlinks=False)
        return
    sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, _NEW_FILE, 0o600)
        try:
            copy_fd(sfd, dfd)
            os.fchmod(dfd, stat.S_IMODE(st.st_mode) & ~0o222 & ~_SETID)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _fill(source: Path, target: Path, how: str, is_dir: bool) -> None:
    try:
        if not is_dir:
            _copy_file(source, target, how)
            return
        sfd = os.open(source, _DIR_FLAGS)
        try:
            dfd = os.open(target, _DIR_FLAGS)
            try:
                _replicate(sfd, dfd, how, os.geteuid() == 0, os.fspath(target))
                os.fchmod(dfd, stat.S_IMODE(os.fstat(sfd).st_mode) & ~0o222)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
    except OSError as e:
        if how == "hardlink" and e.errno == errno.EXDEV:
            raise ImagevolError(
                f"cannot hard-link the volume into {target}: it is on another file system than the store",
                hint="put the target on the store's file system, or use --mode copy (or bind, as root)",
            ) from None
        raise ImagevolError(f"cannot {how} the volume into {target}: {e.strerror or e}") from None


def _empty_tree(target: Path) -> None:
    """Remove everything inside the directory ``target`` (which stays)."""
    fd = os.open(target, _DIR_FLAGS)
    try:
        st = os.fstat(fd)
        os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)
        names = os.listdir(fd)
    finally:
        os.close(fd)
    for name in names:
        force_rmtree(target / name)


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


def _is_mounted(rec: VolumeRecord, mounts: set[str]) -> bool:
    if rec.mode == "bind":
        return rec.target in mounts
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
        mounted=_is_mounted(rec, mounts),
    )


def _forget(store: Store, rec: VolumeRecord) -> None:
    store.meta.remove_volume(rec.id)
    store.meta.remove_lease(f"volume:{rec.id}")
    _drop_sidecar(store, rec.id)


def _prepare_target(target: Path, *, source_is_dir: bool, mode: str, mounts: set[str]) -> tuple[bool, int | None]:
    """Make the target ready; returns (created by us, original mode of an existing directory)."""
    try:
        st = os.stat(target, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is None:
        target.parent.mkdir(parents=True, exist_ok=True)
        if source_is_dir:
            os.mkdir(target, 0o755)
        elif mode == "bind":
            os.close(os.open(target, _NEW_FILE, 0o444))
        return True, None
    if source_is_dir:
        if not stat.S_ISDIR(st.st_mode):
            raise ImagevolError(
                f"target {target} exists and is not a directory",
                hint="mount the volume on an empty directory or a path that does not exist yet",
            )
        if os.listdir(target):
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


def _undo_target(target: Path, *, created: bool, orig_mode: int | None, is_dir: bool) -> None:
    with contextlib.suppress(OSError, ImagevolError):
        if is_dir and target.is_dir() and not target.is_symlink():
            _empty_tree(target)
            if created:
                os.rmdir(target)
            elif orig_mode is not None:
                os.chmod(target, orig_mode)
        elif created:
            os.unlink(target)


def _remove_created(target: Path, is_dir: bool) -> None:
    """Remove the (empty) mount point imagevol created for a bind volume."""
    with contextlib.suppress(OSError):
        if is_dir:
            os.rmdir(target)
        else:
            os.unlink(target)


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
) -> Volume:
    """Make ``snapshot`` (or its ``subpath``) visible read-only at ``target``; see the module docs."""
    if mode not in MODES:
        raise UsageError(f"invalid volume mode {mode!r}", hint="mode must be one of: " + ", ".join(MODES))
    how = ("bind" if os.geteuid() == 0 else "hardlink") if mode == "auto" else mode
    tgt = _canonical(target)
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
                and (mode == "auto" or rec.mode == how)
            )
            if existing.mounted and same:
                return existing
            if existing.mounted:
                raise ImagevolError(
                    f"target {tgt} already holds volume {existing.id} ({rec.ref or rec.digest})",
                    hint="unmount that volume first, or choose another target",
                )
            _forget(store, rec)  # stale record: its mount or tree is gone
        created, orig_mode = _prepare_target(tgt, source_is_dir=source_is_dir, mode=how, mounts=mounts)
        # Record first, then mount: a kill in between leaves a record without a mount (`volumes`
        # shows it gone; `unmount` or `volumes --prune` clears it), never a mount nobody knows.
        volume_id = secrets.token_hex(8)
        side = {"subpath": sub, "created_target": created, "target_mode": orig_mode, "is_dir": source_is_dir}
        try:
            # "mounting" until done: a record left so by a killed process (whose pid is gone) is
            # dropped by the next listing instead of showing up as a half-made volume.
            _write_sidecar(store, volume_id, {**side, "state": "mounting", "pid": os.getpid()})
            rec = meta.add_volume(volume_id, os.fspath(tgt), ref, snapshot.digest, snapshot.key, how)
            meta.add_lease(f"volume:{volume_id}", [snapshot.digest], kind="volume")
            if how == "bind":
                _bind(source, tgt)
            else:
                _fill(source, tgt, how, source_is_dir)
            _write_sidecar(store, volume_id, {**side, "state": "ready"})
        except BaseException:
            with contextlib.suppress(Exception):
                meta.remove_volume(volume_id)
                meta.remove_lease(f"volume:{volume_id}")
            _drop_sidecar(store, volume_id)
            if how == "bind":
                with contextlib.suppress(OSError):
                    _umount(os.fspath(tgt))
                if created:
                    _remove_created(tgt, source_is_dir)
            else:
                _undo_target(tgt, created=created, orig_mode=orig_mode, is_dir=source_is_dir)
            raise
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
    """Unmount (bind) or delete (hardlink, copy) the volume at ``target`` and drop its record and
    lease. NotFoundError if no volume is recorded there; BusyError if the mount is busy."""
    tgt = _canonical(target)
    with store.lock(_target_lock(tgt)):
        meta = store.meta
        rec = meta.get_volume_by_target(os.fspath(tgt))
        if rec is None:
            alt = os.path.abspath(os.fspath(target))
            rec = meta.get_volume_by_target(alt) if alt != os.fspath(tgt) else None
        if rec is None:
            raise NotFoundError(
                f"no imagevol volume is recorded at {target}",
                hint="only volumes imagevol created can be removed; list_volumes() shows them",
            )
        side = _read_sidecar(store, rec.id)
        created = bool(side.get("created_target"))
        is_dir = side.get("is_dir", True) is not False
        orig_mode = side.get("target_mode") if isinstance(side.get("target_mode"), int) else None
        path = Path(rec.target)
        if rec.mode == "bind":
            if rec.target in mountpoints():
                try:
                    _umount(rec.target)
                except OSError as e:
                    if e.errno == errno.EBUSY:
                        raise BusyError(
                            f"volume at {rec.target} is busy: a process still uses it",
                            hint=f"stop what uses it (`fuser -vm {rec.target}` shows it), then retry",
                        ) from None
                    if e.errno != errno.EINVAL:  # EINVAL: not mounted any more
                        raise ImagevolError(f"cannot unmount {rec.target}: {e.strerror}") from None
            if created:
                _remove_created(path, is_dir)
        elif os.path.lexists(path):
            try:
                _undo_target(path, created=created, orig_mode=orig_mode, is_dir=is_dir)
            except OSError as e:
                raise ImagevolError(f"cannot remove the volume tree at {rec.target}: {e.strerror}") from None
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
    existence (hardlink, copy). Volumes whose creation was killed half-way are cleaned up here."""
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
    side = _read_sidecar(store, rec.id)
    path = Path(rec.target)
    created = bool(side.get("created_target"))
    is_dir = side.get("is_dir", True) is not False
    with contextlib.suppress(OSError):
        if rec.mode == "bind":
            if rec.target in mountpoints():
                _umount(rec.target)
            if created:
                _remove_created(path, is_dir)
        elif os.path.lexists(path):
            orig = side.get("target_mode") if isinstance(side.get("target_mode"), int) else None
            _undo_target(path, created=created, orig_mode=orig, is_dir=is_dir)
    _forget(store, rec)


def reconcile(store: Store) -> list[Volume]:
    """Drop the records and leases of volumes that are gone (``mounted=False``); returns them."""
    removed: list[Volume] = []
    for vol in list_volumes(store):
        if vol.mounted:
            continue
        with store.lock(_target_lock(vol.target)):
            rec = store.meta.get_volume(vol.id)
            if rec is None or _is_mounted(rec, mountpoints()):
                continue
            _forget(store, rec)
        removed.append(vol)
    return removed
