"""Mount: pull (or find) the manifest for this node, materialize it once, expose it read-only.

imagevol.mount("registry.example.com/models/llama:v1", "/mnt/llama", root="/var/lib/imagevol")
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .materialize import MaterializeOptions, Snapshot, materialize, remove_snapshot
from .platform import Platform
from .pull import ProgressFn, PullResult, pull
from .reference import LayoutReference, Reference
from .sources.registry import RegistryOptions
from .store import GcResult, Store
from .store import gc as store_gc
from .unpack.applier import DEFAULT_MAX_RATIO, ApplyOptions
from .volume import Volume, create_volume, list_volumes, reconcile, remove_volume


@dataclass
class MountResult:
    """A volume and how it came to be."""

    volume: Volume
    pull: PullResult
    snapshot: Snapshot
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        v = self.volume
        return {
            "target": str(v.target),
            "id": v.id,
            "reference": v.ref,
            "digest": str(v.digest),
            "mode": v.mode,
            "subpath": v.subpath,
            "snapshot": str(self.snapshot.path),
            "flavour": self.snapshot.flavour,
            "files": self.snapshot.files,
            "snapshotCreated": self.snapshot.created,
            "pull": self.pull.to_dict(),
            "seconds": round(self.seconds, 3),
            "warnings": self.warnings,
        }


def mount(
    ref: str | Reference | LayoutReference,
    target: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | Store,
    platforms: list[Platform] | None = None,
    policy: str = "native",
    pull_policy: str = "missing",
    subpath: str | None = None,
    mode: str = "auto",
    name_untitled: str = "skip",
    max_ratio: float | None = DEFAULT_MAX_RATIO,
    max_size: int | None = None,
    options: RegistryOptions | None = None,
    progress: ProgressFn | None = None,
    warn: Callable[[str], None] | None = None,
    **pull_kwargs: Any,
) -> MountResult:
    """Mount `ref` read-only at `target` (bind mount as root, else a read-only hard-link tree).

    Content is pulled per `pull_policy`, materialized once into a snapshot shared by every volume of
    the same manifest, and held by a lease until :func:`unmount`. `max_ratio` / `max_size` bound how
    far a compressed layer may expand (decompression bombs); None lifts a limit.
    """
    t0 = time.monotonic()
    store = root if isinstance(root, Store) else Store(root)
    warnings: list[str] = []

    def _warn(msg: str) -> None:
        warnings.append(msg)
        if warn is not None:
            warn(msg)

    # gc waits while a mount is under way (it takes this lock exclusively), so content found in the
    # store by the pull cannot vanish before the volume's own lease holds it.
    with store.lock("gc", shared=True):
        res = pull(
            ref,
            root=store,
            platforms=platforms,
            policy=policy,
            pull_policy=pull_policy,
            options=options,
            progress=progress,
            **pull_kwargs,
        )
        for w in res.warnings:
            _warn(w)
        lease = f"mount:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        store.meta.add_lease(lease, [res.root_digest, res.digest], kind="pull", pid=os.getpid())
        try:
            apply = ApplyOptions(max_ratio=max_ratio, max_size=max_size)
            options_m = MaterializeOptions(name_untitled=name_untitled, apply=apply)
            snap = materialize(store, res.manifest, options=options_m, warn=_warn)
            vol = create_volume(store, snap, target, ref=res.reference, mode=mode, subpath=subpath)
        finally:
            store.meta.remove_lease(lease)
    return MountResult(vol, res, snap, time.monotonic() - t0, warnings)


def unmount(target: str | os.PathLike[str], *, root: str | os.PathLike[str] | Store) -> Volume:
    """Unmount (or remove) the volume at `target` and release its content to gc."""
    store = root if isinstance(root, Store) else Store(root)
    return remove_volume(store, target)


def volumes(*, root: str | os.PathLike[str] | Store, reconcile_stale: bool = False) -> list[Volume]:
    """Recorded volumes, checked against the kernel's mount table; optionally drop stale ones."""
    store = root if isinstance(root, Store) else Store(root)
    if reconcile_stale:
        reconcile(store)
    return list_volumes(store)


def gc(*, root: str | os.PathLike[str] | Store, dry_run: bool = False) -> GcResult:
    """Reclaim blobs, snapshots and stale downloads that no reference, volume or pull holds."""
    store = root if isinstance(root, Store) else Store(root)
    return store_gc(store, dry_run=dry_run, remove_snapshot=lambda key, dry: remove_snapshot(store, key, dry_run=dry))
