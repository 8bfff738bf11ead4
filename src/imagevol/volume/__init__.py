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

This module composes the rooms: :mod:`.modes` (the modes and the private trees), :mod:`.subpath`
(sub paths and the descriptor walk to targets), :mod:`.bind` (mount(2), the mount table and the
read-only bind) and :mod:`.records` (records, listing, reconcile).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ImagevolError, NotFoundError, UsageError
from ..materialize import Snapshot
from ..store import Store
from .bind import _bind, _mount_entry, mountpoints
from .modes import MODES, _fill
from .records import (
    Volume,
    _abandoned,
    _drop_sidecar,
    _forget,
    _read_sidecar,
    _target_lock,
    _undo_abandoned,
    _volume,
    _write_sidecar,
    list_volumes,
    reconcile,
)
from .subpath import (
    _canonical,
    _ident,
    _normalize_subpath,
    _open_parent,
    _open_target,
    _prepare_target,
    _teardown,
    resolve_subpath,
)

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
