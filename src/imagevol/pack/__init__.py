"""Pack a directory into an OCI image or artifact and push it (`imagevol pack DIR REF`).

Formats (see docs/formats.md, "Packing"):

``image`` (default)
    A runnable image every runtime mounts: real image configs (os, architecture, variant,
    ``rootfs.type=layers``, ``diff_ids``; no ``created`` unless ``SOURCE_DATE_EPOCH`` is set), tar
    layers. Files of ``large_file_size`` (64 MiB) and more get a layer each (so versions that share
    weight shards share blobs, and pulls fetch them in parallel); everything else (directories,
    symlinks, small files) is one layer, placed first. Hard links inside the directory stay hard
    links (all names of a file travel in the layer of its first name). Default platforms:
    :data:`DEFAULT_PLATFORMS` (an index with one manifest per platform; the manifests share every
    layer blob, only the small configs differ). ``agnostic``: an index with ONE entry and no
    ``platform``, config linux/amd64: CRI-O takes a platform-less entry on any node; containerd
    matches such an entry through its config, so it mounts it only on amd64 (``explain`` says so).
``artifact``
    An OCI 1.1 artifact: ``artifactType`` (default ``application/vnd.imagevol.data.v1``), the empty
    config, one raw ``application/octet-stream`` layer per regular file titled with its path
    (``org.opencontainers.image.title``, ``/``-separated) and carrying
    ``org.cncf.model.file.metadata+json``. Whatever raw layers cannot say (directories that are
    empty or not 0755, symlinks, files whose read-only mode is not 0444, e.g. executables) goes into
    ONE extra tar layer titled ``.imagevol-tree`` whose entries are relative to the root and which
    carries the annotation ``io.imagevol.layer.root: "true"``: imagevol extracts it at the volume
    root, so the volume equals the directory; ORAS and CRI-O see a file (or directory) named
    ``.imagevol-tree``. It carries no ORAS unpack annotation, because oras-go refuses tar entries
    outside the title.
``modelpack``
    A CNCF ModelPack (model-spec v1): artifactType ``application/vnd.cncf.model.manifest.v1+json``,
    config ``application/vnd.cncf.model.config.v1+json`` (descriptor, modelfs with diffIds,
    config), one ``application/vnd.cncf.model.<kind>.v1.raw`` layer per file (kinds in
    :func:`modelpack_kind`) with ``org.cncf.model.filepath``, ``org.opencontainers.image.title`` and
    ``org.cncf.model.file.metadata+json`` (mode honoured by imagevol); directories and symlinks in a
    ``weight.config.v1.tar`` layer at ``.imagevol-tree`` as above.

Determinism: the same directory gives the same digests on any host, cwd or day: entries sorted,
mtimes fixed (0 or ``SOURCE_DATE_EPOCH``), owners 0, no user names, JSON compact with fixed key
order, gzip without name or time, zstd multi-threaded (its output does not depend on the thread
count). ``--compression`` applies to tar layers; raw layers are never compressed.

The package's rooms: :mod:`.spec` (formats, defaults, the tree scan, ModelPack kinds), :mod:`.plan`
(layer plans, platforms), :mod:`.build` (layers, configs, manifests, index: :func:`build`),
:mod:`.push` (blobs then documents into a sink: :func:`write`), :mod:`.tarwriter`; here
:func:`pack`, the composition: build, then write.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..digest import Digest
from ..manifest import Descriptor
from ..platform import Platform
from ..progress import ProgressFn
from ..sinks import Sink, open_sink
from ..sinks.digestcache import DigestCache
from .build import Built, ManifestInfo, _draft, _emit, build
from .plan import LayerPlan, plan_image_layers
from .push import _push_blobs, _write_documents, write
from .spec import (
    DEFAULT_ARTIFACT_TYPE,
    DEFAULT_CONCURRENCY,
    DEFAULT_LARGE_FILE_SIZE,
    DEFAULT_PLATFORMS,
    FORMATS,
    TREE_TITLE,
    Entry,
    modelpack_kind,
    scan_tree,
)

__all__ = [
    "DEFAULT_ARTIFACT_TYPE",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_LARGE_FILE_SIZE",
    "DEFAULT_PLATFORMS",
    "FORMATS",
    "TREE_TITLE",
    "Built",
    "Entry",
    "LayerPlan",
    "ManifestInfo",
    "PackResult",
    "build",
    "modelpack_kind",
    "pack",
    "plan_image_layers",
    "scan_tree",
    "write",
]


@dataclass
class PackResult:
    """What a pack did: the root digest, the manifests per platform, the blobs written."""

    reference: str
    format: str
    digest: Digest
    media_type: str
    size: int
    manifests: list[ManifestInfo]
    layers: list[Descriptor]
    blobs_pushed: int = 0
    blobs_skipped: int = 0
    blobs_mounted: int = 0
    bytes_pushed: int = 0
    bytes_total: int = 0
    chunks: int = 0
    files: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "format": self.format,
            "digest": str(self.digest),
            "mediaType": self.media_type,
            "size": self.size,
            "manifests": [m.to_dict() for m in self.manifests],
            "layers": [
                {"mediaType": x.media_type, "digest": str(x.digest), "size": x.size, "title": x.title}
                for x in self.layers
            ],
            "blobsPushed": self.blobs_pushed,
            "blobsSkipped": self.blobs_skipped,
            "blobsMounted": self.blobs_mounted,
            "bytesPushed": self.bytes_pushed,
            "bytesTotal": self.bytes_total,
            "files": self.files,
            "seconds": round(self.seconds, 3),
        }


def pack(
    directory: str | os.PathLike[str],
    ref: str,
    *,
    format: str = "image",
    platforms: Sequence[Platform | str] | str | None = None,
    agnostic: bool = False,
    compression: str = "none",
    artifact_type: str | None = None,
    annotations: Mapping[str, str] | None = None,
    options: Any = None,
    progress: ProgressFn | None = None,
    large_file_size: int = DEFAULT_LARGE_FILE_SIZE,
    chunk_size: int | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    mount_from: Iterable[str] = (),
    workdir: str | os.PathLike[str] | None = None,
    sink: Sink | None = None,
    digest_cache: DigestCache | str | os.PathLike[str] | None = None,
) -> PackResult:
    """Pack ``directory`` and push it to ``ref`` (a registry reference, or ``oci:PATH[:TAG]``).

    ``platforms``: a list (or comma-separated string) of platforms for the index (default for
    images: :data:`DEFAULT_PLATFORMS`); ``agnostic``: one platform-less entry. ``options``: a
    :class:`imagevol.registry.transport.RegistryOptions`. ``progress`` receives
    :class:`imagevol.pull.ProgressEvent` values. ``chunk_size``: bytes per PATCH of a chunked
    upload (blobs up to that size go in one PUT). ``mount_from``: repositories on the same registry
    to mount blobs from. ``digest_cache``: a :class:`~imagevol.sinks.digestcache.DigestCache` or its
    file (default: the user's, see that module).

    Layers are pushed first: an uncompressed layer (a raw file, or a tar layer streamed from the files
    it holds) is read once, hashed while it uploads, unless a registry is to be asked first (small
    blobs, ``mount_from``, digests in the cache); then the configs, manifests and the root, whose
    digests depend on the layers'.
    """
    t0 = time.monotonic()
    if sink is None:
        sink = open_sink(ref, options=options, mount_from=tuple(mount_from), chunk_size=chunk_size)
    if workdir is None:
        from ..sinks.layout import LayoutSink

        if isinstance(sink, LayoutSink):
            workdir = sink.path  # scratch files are renamed into the layout's blobs
    cache = digest_cache if isinstance(digest_cache, DigestCache) else DigestCache.open(digest_cache)
    draft = _draft(
        directory,
        format=format,
        platforms=platforms,
        agnostic=agnostic,
        compression=compression,
        artifact_type=artifact_type,
        annotations=annotations,
        large_file_size=large_file_size,
        concurrency=concurrency,
        workdir=workdir,
        progress=progress,
    )
    built: Built | None = None
    try:
        layer_blobs = list(draft.builder.layer_blobs)
        _emit(progress, "resolved", digest=None, size=sum(x.size for x in layer_blobs), message=sink.describe())
        written: set[Digest] = set()
        _push_blobs(
            layer_blobs,
            sink,
            concurrency=concurrency,
            progress=progress,
            cache=cache,
            cache_info=draft.builder.cache_info,
            written=written,
        )
        built = draft.complete()
        rest = [x for d, x in built.blobs.items() if d not in written]
        _push_blobs(rest, sink, concurrency=concurrency, progress=progress, written=written)
        root = _write_documents(built, sink, progress, concurrency)
        cache.save()
    finally:
        draft.cleanup()
        if built is not None:
            built.cleanup()
        with contextlib.suppress(Exception):
            sink.close()
    st = sink.stats
    return PackResult(
        reference=ref,
        format=built.format,
        digest=root.digest,
        media_type=built.media_type,
        size=root.size,
        manifests=built.manifests,
        layers=built.layers,
        blobs_pushed=st.pushed,
        blobs_skipped=st.skipped,
        blobs_mounted=st.mounted,
        bytes_pushed=st.bytes_pushed,
        bytes_total=built.content_size,
        chunks=st.chunks,
        files=built.files,
        seconds=time.monotonic() - t0,
    )
