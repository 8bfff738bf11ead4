"""Volume records: the :class:`Volume` a caller sees, the sidecar ``R/volumes/<id>.json`` of
facts the metadata table has no column for, the per-target lock, and the listing:
:func:`list_volumes` reconciles records with the mount table (cleaning up volumes whose creation
was killed half-way) and :func:`reconcile` drops the records and leases of volumes that are gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..digest import Digest
from ..errors import ImagevolError, StoreError
from ..store import Store, VolumeRecord
from ..store.meta import pid_alive
from .bind import _bind_mounted, mountpoints
from .subpath import _teardown

VOLUMES = "volumes"


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
