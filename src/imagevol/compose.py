"""Mount: pull (or find) the manifest for this node, materialize it once, expose it read-only.

imagevol.mount("registry.example.com/models/llama:v1", "/mnt/llama", root="/var/lib/imagevol")
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .digest import Digest
from .errors import (
    ContentRefusedError,
    DigestMismatchError,
    ImagevolError,
    LimitExceededError,
    StoreError,
    UnsafeContentError,
)
from .fetch import LayerStream, PullPlan, PullResult, plan_pull
from .manifest import Descriptor
from .materialize import (
    MaterializeOptions,
    Snapshot,
    check_snapshots,
    clean_stale_builds,
    find_snapshot,
    manifest_flavour,
    materialize,
    remove_snapshot,
)
from .platform import Platform
from .progress import ProgressFn
from .reference import LayoutReference, Reference
from .registry.transport import RegistryOptions
from .sources.registry import RegistrySource
from .store import FsckResult, GcResult, Store
from .store import fsck as store_fsck
from .store import gc as store_gc
from .unpack.applier import DEFAULT_MAX_ENTRIES, DEFAULT_MAX_RATIO, ApplyOptions
from .volume import Volume, create_volume, list_volumes, reconcile, remove_volume


@dataclass
class MountResult:
    """A volume and how it came to be."""

    volume: Volume
    pull: PullResult
    snapshot: Snapshot
    seconds: float
    warnings: list[str] = field(default_factory=list)
    #: Layers extracted while they downloaded (digests); empty when the pull came first.
    streamed: list[str] = field(default_factory=list)

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
            "streamedLayers": self.streamed,
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
    max_entries: int | None = DEFAULT_MAX_ENTRIES,
    options: RegistryOptions | None = None,
    progress: ProgressFn | None = None,
    warn: Callable[[str], None] | None = None,
    stream: bool = True,
    **pull_kwargs: Any,
) -> MountResult:
    """Mount `ref` read-only at `target` (a read-only bind mount as root, else a private copy).

    Content is pulled per `pull_policy`, materialized once into a snapshot shared by every volume of
    the same manifest, and held by a lease until :func:`unmount`. `max_ratio` / `max_size` bound how
    far a compressed layer may expand (decompression bombs), `max_entries` how many tar entries one
    layer may hold (inode bombs); None lifts a limit. With `stream`
    (the default), an image's largest missing layer is extracted while it downloads (see
    :func:`pull_and_materialize`); False pulls everything first.
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
        plan = plan_pull(
            ref,
            root=store,
            platforms=platforms,
            policy=policy,
            pull_policy=pull_policy,
            options=options,
            progress=progress,
            **pull_kwargs,
        )
        sel = plan.selection
        lease = f"mount:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        store.meta.add_lease(lease, [sel.root.digest, sel.descriptor.digest], kind="pull", pid=os.getpid())
        try:
            apply = ApplyOptions(max_ratio=max_ratio, max_size=max_size, max_entries=max_entries)
            options_m = MaterializeOptions(name_untitled=name_untitled, apply=apply)
            res, snap, streamed = pull_and_materialize(plan, options_m, _warn, stream=stream)
            vol = create_volume(store, snap, target, ref=res.reference, mode=mode, subpath=subpath, warn=_warn)
        finally:
            store.meta.remove_lease(lease)
    return MountResult(vol, res, snap, time.monotonic() - t0, warnings, streamed)


def pull_and_materialize(
    plan: PullPlan,
    options: MaterializeOptions,
    warn: Callable[[str], None] | None = None,
    *,
    stream: bool = True,
) -> tuple[PullResult, Snapshot, list[str]]:
    """Run `plan` and materialize its manifest with `options`: the one way from a planned pull to a
    ready snapshot (``imagevol mount`` and the CSI plugin's publish both come here).

    With `stream`, and where the extraction can overlap the download (:func:`_can_overlap`), the
    largest missing layer is extracted while it downloads (:func:`_stream_and_materialize`);
    otherwise the pull comes first, then the materialization (which finds a ready snapshot at
    once). Returns the pull's result, the snapshot and the layers extracted while they downloaded
    (digests). The pull's warnings go to `warn`. The caller holds the gc lock (shared) and keeps
    the content it needs leased: nothing here takes a lease.
    """

    def _warn(msg: str) -> None:
        if warn is not None:
            warn(msg)

    if stream and _can_overlap(plan, options):
        return _stream_and_materialize(plan, options, _warn)
    res = plan.run()
    for w in res.warnings:
        _warn(w)
    snap = materialize(plan.store, res.manifest, options=options, warn=_warn)
    return res, snap, []


def _can_overlap(plan: PullPlan, options: MaterializeOptions) -> bool:
    """Extraction can overlap the download: an image from a registry, not materialized yet, with
    layers still to fetch."""
    if plan.offline is not None or plan.fetcher is None or not isinstance(plan.source, RegistrySource):
        return False
    m = plan.manifest
    if manifest_flavour(m) != "image" or find_snapshot(plan.store, m, options) is not None:
        return False
    missing = {str(d.digest) for d in plan.missing()}
    return any(str(d.digest) in missing for d in m.layers)


class _Feed:
    """The materializer's view of a pull in progress: blobs wait for their fetch; the tapped layer
    is read as it arrives."""

    def __init__(self, plan: PullPlan, taps: dict[str, LayerStream], missing: set[str]) -> None:
        assert plan.fetcher is not None
        self.store = plan.store
        self.fetcher = plan.fetcher
        self.taps = dict(taps)
        self.fetched = missing

    def wait(self, digest: Digest) -> None:
        if str(digest) not in self.fetched:
            return  # in the store already, or not a blob the pull fetches (inline data)
        self.fetcher.done_event(digest).wait()
        if not self.store.has_blob(digest):
            err = self.fetcher.errors.get(str(digest))
            if err is not None:
                raise err
            raise StoreError(f"blob {digest} did not arrive in the store", hint="run the mount again")

    def open(self, layer: Descriptor) -> Any:
        tap = self.taps.pop(str(layer.digest), None)  # a layer listed twice streams once
        if tap is not None:
            return tap
        self.wait(layer.digest)
        return self.store.open_blob(layer.digest)


def _stream_and_materialize(
    plan: PullPlan, options: MaterializeOptions, warn: Callable[[str], None]
) -> tuple[PullResult, Snapshot, list[str]]:
    """Pull in a thread of its own while the snapshot is built from what arrives.

    The largest missing layer is fetched as one ordered stream and extracted as it comes, instead
    of after the whole pull: the download and the extraction overlap (docs/performance.md). Its
    bytes still go to the store (resumable, verified, committed like any blob); the extraction
    ends only after that verification, and a mismatch fails the build, which is then discarded,
    so nothing unverified is ever exposed. Other blobs are fetched as usual; the materializer waits
    for each as it needs it. If the build fails, the pull is cancelled (what arrived is kept).
    """
    assert plan.fetcher is not None
    fetcher = plan.fetcher
    missing = {str(d.digest) for d in plan.missing()}
    big = max((d for d in plan.manifest.layers if str(d.digest) in missing), key=lambda d: d.size)
    tap = LayerStream(big, plan.store)
    taps = {str(big.digest): tap}
    fetcher.taps.update(taps)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = plan.run()
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=run, name="imagevol-pull", daemon=True)
    thread.start()
    try:
        snap = materialize(plan.store, plan.manifest, options=options, warn=warn, feed=_Feed(plan, taps, missing))
    except ContentRefusedError as e:
        if isinstance(e, (UnsafeContentError, LimitExceededError, DigestMismatchError)) or not tap.streamed:
            fetcher.cancel()  # refused by policy whatever the bytes: no use downloading the rest
        tap.close()
        thread.join()
        # Bytes that do not parse may simply be bytes that do not verify: if the download says so,
        # that is the error to report (its hint is right, "check the media type" would not be).
        cause = fetcher.errors.get(str(big.digest))
        if isinstance(cause, DigestMismatchError) and cause is not e:
            raise cause from None
        raise
    except BaseException:
        fetcher.cancel()
        tap.close()
        thread.join()
        raise
    finally:
        tap.close()
    thread.join()
    if "error" in box:
        raise box["error"]
    res: PullResult = box["result"]
    for w in res.warnings:
        warn(w)
    return res, snap, [str(big.digest)] if tap.streamed and snap.created else []


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
    res = store_gc(store, dry_run=dry_run, remove_snapshot=lambda key, dry: remove_snapshot(store, key, dry_run=dry))
    res.removed_builds = clean_stale_builds(store, dry_run=dry_run)
    return res


def fsck(*, root: str | os.PathLike[str] | Store, repair: bool = False, quick: bool = False) -> FsckResult:
    """Check the store: every blob re-hashed and the metadata (:func:`imagevol.store.fsck`), then
    every snapshot against its record (:func:`imagevol.materialize.check_snapshots`; ``quick``
    skips hashing the snapshots' files). ``repair`` fixes what can be fixed: bad blobs quarantined,
    dangling records dropped, damaged snapshots no volume uses dropped (the next mount rebuilds
    them); ``FsckResult.problems_left`` is what remains."""
    store = root if isinstance(root, Store) else Store(root)
    res = store_fsck(store, repair=repair)
    bad = set(res.corrupted) | set(res.unreadable) | set(res.quarantined)

    def trusted(digest: str, inode: tuple[int, int]) -> bool:
        # A hard link to a blob the pass above just re-hashed (and found good) needs no second read.
        try:
            d = Digest(digest)
            st = os.stat(store.blob_path(d), follow_symlinks=False)
        except (ImagevolError, OSError):
            return False
        return d not in bad and (st.st_dev, st.st_ino) == inode

    snaps = check_snapshots(store, repair=repair, quick=quick, trusted=trusted)
    res.snapshots_checked = snaps.checked
    res.damaged_snapshots = snaps.damaged
    res.unverifiable_snapshots = snaps.unverifiable
    res.snapshots_in_use = snaps.in_use
    res.dropped_snapshots = snaps.dropped
    return res
