"""Pull: resolve a reference for a node, then fetch the chosen manifest's blobs into the store.

:func:`plan_pull` resolves and selects (or finds a complete earlier pull in the store, offline)
and returns a :class:`PullPlan`; :meth:`PullPlan.run` stores the manifests, has the fetcher
(:mod:`.fetcher`) bring in the missing blobs under a lease and records the reference, giving a
:class:`PullResult`. :func:`pull` is both in one call.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..digest import Digest
from ..errors import NotFoundError, UsageError
from ..manifest import Descriptor, Index, Manifest
from ..platform import Platform, host_platform
from ..progress import ProgressEvent, ProgressFn
from ..reference import LayoutReference, Reference, parse_any, ref_key
from ..registry.transport import RegistryOptions
from ..resolve.select import select_manifest
from ..resolve.trace import Selection
from ..sources.base import Source
from ..sources.factory import open_source
from ..sources.storesrc import StoreSource
from ..store import Store
from .fetcher import _Fetcher

PULL_POLICIES = ("always", "missing", "never")
DEFAULT_PART_SIZE = 64 << 20
DEFAULT_CONCURRENCY = 4
DEFAULT_PARTS_PER_BLOB = 1


@dataclass
class PullResult:
    """What a pull resolved and fetched."""

    reference: str
    root_digest: Digest
    digest: Digest
    manifest: Manifest
    selection: Selection
    source: str
    downloaded: int = 0
    reused: int = 0
    blobs: int = 0
    seconds: float = 0.0
    offline: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "rootDigest": str(self.root_digest),
            "digest": str(self.digest),
            "kind": self.manifest.kind,
            "platform": str(self.selection.platform) if self.selection.platform else None,
            "how": self.selection.how,
            "source": self.source,
            "downloadedBytes": self.downloaded,
            "reusedBytes": self.reused,
            "blobs": self.blobs,
            "seconds": round(self.seconds, 3),
            "offline": self.offline,
            "warnings": self.warnings,
        }


def _needed(manifest: Manifest) -> list[Descriptor]:
    out: list[Descriptor] = []
    seen: set[str] = set()
    for d in (manifest.config, *manifest.layers):
        if d.data is not None and d is manifest.config:
            continue
        if str(d.digest) not in seen:
            seen.add(str(d.digest))
            out.append(d)
    return out


def _store_manifests(store: Store, source: Source, sel: Selection, root_doc: Manifest | Index) -> None:
    """Keep the root, every index walked and the chosen manifest, with parent -> child links."""
    store.put_bytes(root_doc.raw, sel.root.digest)
    chain: list[Digest] = [sel.root.digest]
    for step in sel.steps:
        if step.chosen is None:
            continue
        entry = next((e for e in step.entries if e.position == step.chosen), None)
        if entry is None:
            continue
        child = entry.descriptor
        doc = source.manifest(child)
        store.put_bytes(doc.raw, child.digest)
        store.meta.set_children(Digest(step.digest), [child.digest])
        chain.append(child.digest)
    m = sel.manifest
    store.put_bytes(m.raw, sel.descriptor.digest)
    if m.config.data is not None:
        # An inline config (the empty descriptor's `data`) is stored like any other: it is recorded
        # as a child below, and fsck holds every recorded child of held content to be present.
        store.put_bytes(m.config.data, m.config.digest)
    store.meta.set_children(
        sel.descriptor.digest, [d.digest for d in _needed(m)] + ([m.config.digest] if m.config.data is not None else [])
    )


def _offline(store: Store, ref: Reference | LayoutReference) -> StoreSource | None:
    key = ref_key(ref)
    rec = store.meta.get_ref(key)
    if rec is not None and store.has_blob(rec.digest):
        return StoreSource(store, rec.digest, rec.media_type, key)
    if ref.digest is not None and store.has_blob(ref.digest):
        return StoreSource(store, ref.digest, "", key)
    return None


def _complete(store: Store, sel: Selection) -> bool:
    return all(d.data is not None or store.has_blob(d.digest, d.size) for d in _needed(sel.manifest))


@dataclass
class PullPlan:
    """A resolved pull (:func:`plan_pull`): the manifest chosen for the node, and what fetching it
    takes. :meth:`run` fetches; a caller may first tap blobs (``fetcher.taps``) to consume them
    while they download, or wait on single blobs (``fetcher.done_event``)."""

    store: Store
    key: str
    selection: Selection
    t0: float
    progress: ProgressFn | None = None
    offline: PullResult | None = None
    source: Source | None = None
    resolved: Any = None
    fetcher: _Fetcher | None = None

    @property
    def manifest(self) -> Manifest:
        return self.selection.manifest

    def missing(self) -> list[Descriptor]:
        """Blobs of the manifest not in the store yet."""
        return [d for d in _needed(self.manifest) if d.data is None and not self.store.has_blob(d.digest, d.size)]

    def run(self) -> PullResult:
        """Fetch what is missing into the store (nothing for a pull satisfied by the store)."""
        if self.offline is not None:
            return self.offline
        assert self.source is not None and self.fetcher is not None
        store, sel, source, fetcher = self.store, self.selection, self.source, self.fetcher
        try:
            with store.hold([sel.root.digest, sel.descriptor.digest]):
                _store_manifests(store, source, sel, self.resolved[1])
                fetcher.fetch_all(_needed(sel.manifest))
                store.meta.set_ref(
                    self.key,
                    sel.root.digest,
                    media_type=self.resolved[1].media_type,
                    platform=str(sel.platform) if sel.platform else None,
                    source=source.describe(),
                )
        except BaseException as e:
            for d in _needed(sel.manifest):  # nobody may wait for a blob that will not come
                fetcher._ended(d, e)
            raise
        if self.progress:
            self.progress(ProgressEvent("done", str(sel.descriptor.digest)))
        return PullResult(
            self.key,
            sel.root.digest,
            sel.descriptor.digest,
            sel.manifest,
            sel,
            source.describe(),
            downloaded=fetcher.downloaded,
            reused=fetcher.reused,
            blobs=len(_needed(sel.manifest)),
            seconds=time.monotonic() - self.t0,
            warnings=sel.warnings,
        )


def plan_pull(
    ref: str | Reference | LayoutReference,
    *,
    root: str | os.PathLike[str] | Store,
    platforms: list[Platform] | None = None,
    policy: str = "native",
    pull_policy: str = "missing",
    options: RegistryOptions | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    part_size: int = DEFAULT_PART_SIZE,
    parts_per_blob: int = DEFAULT_PARTS_PER_BLOB,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> PullPlan:
    """Resolve `ref` for the node and say what pulling it takes; :meth:`PullPlan.run` fetches.
    Arguments as :func:`pull`."""
    if pull_policy not in PULL_POLICIES:
        raise UsageError(f"unknown pull policy {pull_policy!r}", hint="use always, missing or never")
    t0 = time.monotonic()
    r = parse_any(ref) if isinstance(ref, str) else ref
    store = root if isinstance(root, Store) else Store(root)
    node = platforms or [host_platform()]
    key = ref_key(r)

    if pull_policy in ("missing", "never"):
        src = _offline(store, r)
        if src is not None:
            try:
                sel = select_manifest(src, node, policy=policy)
                if _complete(store, sel):
                    if progress:
                        progress(ProgressEvent("resolved", str(sel.descriptor.digest), message="in store"))
                    done = PullResult(
                        key,
                        sel.root.digest,
                        sel.descriptor.digest,
                        sel.manifest,
                        sel,
                        src.describe(),
                        reused=sel.manifest.total_size,
                        offline=True,
                        seconds=time.monotonic() - t0,
                        warnings=sel.warnings,
                    )
                    return PullPlan(store, key, sel, t0, progress, offline=done)
            except NotFoundError:
                pass  # e.g. another platform's manifest was never fetched: go to the source
        if pull_policy == "never":
            raise NotFoundError(
                f"{key} is not in the store at {store.root} (pull policy never)",
                hint="pull it first (`imagevol pull`), or use --pull missing",
            )

    source = open_source(ref if isinstance(ref, str) else r, options=options)
    resolved = source.resolve()
    chosen_ref = getattr(source, "ref", r)
    if chosen_ref != r:  # a short name resolved through a search registry
        key = ref_key(chosen_ref)
    sel = select_manifest(source, node, policy=policy, resolved=resolved)
    if progress:
        progress(
            ProgressEvent(
                "resolved", str(sel.descriptor.digest), size=sel.manifest.total_size, message=source.describe()
            )
        )
    fetcher = _Fetcher(
        store,
        source,
        concurrency=concurrency,
        part_size=part_size,
        parts_per_blob=parts_per_blob,
        progress=progress,
        retries=options.retries if options is not None else 5,
        cancel=cancel,
    )
    return PullPlan(store, key, sel, t0, progress, source=source, resolved=resolved, fetcher=fetcher)


def pull(
    ref: str | Reference | LayoutReference,
    *,
    root: str | os.PathLike[str] | Store,
    platforms: list[Platform] | None = None,
    policy: str = "native",
    pull_policy: str = "missing",
    options: RegistryOptions | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    part_size: int = DEFAULT_PART_SIZE,
    parts_per_blob: int = DEFAULT_PARTS_PER_BLOB,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> PullResult:
    """Resolve `ref` for the node (`platforms`, a preference list; default this host) and make the
    chosen manifest's content present and verified in the store at `root`.

    pull_policy as in Kubernetes: `always` resolves at the source; `missing` (IfNotPresent) uses
    the store when the reference was pulled before and its content is complete; `never` uses only
    the store and fails clearly when content is absent. Setting `cancel` stops the pull at the next
    piece of each stream ("pull cancelled"); what was received is kept for the next pull.
    """
    return plan_pull(
        ref,
        root=root,
        platforms=platforms,
        policy=policy,
        pull_policy=pull_policy,
        options=options,
        concurrency=concurrency,
        part_size=part_size,
        parts_per_blob=parts_per_blob,
        progress=progress,
        cancel=cancel,
    ).run()
