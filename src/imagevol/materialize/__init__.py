"""Turn a verified manifest into a read-only snapshot directory, once.

A manifest is materialized into ``R/snapshots/<key>`` (``key`` = the manifest digest's hex, plus a
short suffix when non-default options change the result, see :func:`snapshot_key`). The tree is
built in ``R/snapshots/.build-<key>-<random>`` under the file lock ``store.lock("snapshot-<key>")``,
sealed read-only and renamed into place atomically; a second caller (thread or process) waits on
the lock and reuses the result. A crash leaves only a ``.build-*`` directory, removed by the next
call. Facts about a snapshot (file count, warnings, what each layer became) are kept beside it in
``R/snapshots/.info-<key>.json`` so a reuse costs no tree walk. What it holds (every entry's path,
type, mode, size, owner, and each file's content digest) is recorded at build time in
``R/snapshots/.record-<key>.json``; ``imagevol fsck`` checks the tree against it
(:func:`check_snapshots`, docs/architecture.md). A ``.build-*`` leftover that cannot be removed
never fails another build, and gc removes those no builder holds (:func:`clean_stale_builds`).

How a manifest becomes files depends on its flavour (:func:`imagevol.manifest.flavour`):

``image``
    Layers applied in order with the safe applier (whiteouts honoured). Each layer's uncompressed
    stream is hashed as the applier reads it and must equal the config's ``rootfs.diff_ids`` entry
    (DigestMismatchError otherwise; the snapshot is discarded).
``artifact`` (OCI / ORAS)
    One file per layer at its title (``org.opencontainers.image.title``, else
    ``org.cncf.model.filepath``, else ``org.cnai.model.filepath``). Untitled layers typed tar /
    tar+gzip / tar+zstd (that are tars) are extracted at the volume root, where an image layer would
    go (CRI-O skips them); other untitled layers are skipped with a warning, as CRI-O does, or named
    by their digest hex with ``name_untitled="digest"``. If every layer is skipped, the mount fails
    (ContentRefusedError) instead of giving an empty volume. Raw files
    are HARD LINKS to the verified blob (zero copies; blobs are 0o444, so the file is read-only);
    across filesystems they are copied. Layers typed tar / tar+gzip / tar+zstd, or annotated
    ``io.deis.oras.content.unpack: "true"``, are extracted as the directory named by their title
    (whiteouts refused); a tar-typed layer whose first block is not a tar header (ORAS labels raw
    files ``...layer.v1.tar``) is placed as a file instead.
``modelpack`` (CNCF ModelPack)
    ``.raw`` layers hard-linked at ``org.cncf.model.filepath``; ``.tar[+gzip|+zstd]`` layers
    extracted so that their entries land at the file path. The mode of
    ``org.cncf.model.file.metadata+json`` is honoured for raw files: a hard link shares the blob's
    0o444 inode, so a file whose read-only mode is not 0o444 (executable, or owner-only) is copied
    and chmod-ed instead of linked.
``kitops`` (KitOps ModelKit)
    Layers ``application/vnd.kitops.modelkit.<type>.v1.<tar|raw>[+gzip|+zstd]``. Each layer is
    matched to its Kitfile entry by the ``digest`` the Kitfile records (KitOps >= 0.5), else by the
    order of entries of that type (older ModelKits, as ``kit unpack`` does); the entry's path is
    what the layer provides (``Snapshot.contents``). Tars are extracted at the snapshot root when
    their entries carry the full path (current kit), else under the entry's directory (older kit).
``docker-model`` (Docker Model Runner)
    Files at ``org.cncf.model.filepath`` when present, else the runtime-bundle names Docker uses:
    ``model.gguf`` (several: ``model-00001-of-0000N.gguf`` in layer order), ``model.safetensors``
    (likewise), ``model.mmproj``, ``template.jinja``, ``model.dduf``, ``LICENSE``
    (``LICENSE-00001-of-0000N``); ``dir.tar`` / ``vllm.config.tar`` layers are extracted at the
    root; any other type is named by its digest hex.

Where a tar layer belongs to a path ``P`` (title / file path), its first entry decides: entries
that start with ``P`` are extracted at the root (ORAS directories, current modctl and kit), entries
that start with ``P``'s last component under ``P``'s parent (older modctl and kit), anything else
inside ``P`` as a directory.

Every tar goes through :func:`imagevol.unpack.applier.apply_layer`; every other write resolves its
path one component at a time with ``O_NOFOLLOW`` from a descriptor of the build directory, so a
symlink made by an earlier layer is never followed: a title through a symlink is refused. A file
layer whose path an earlier layer already provides is refused (UnsafeContentError) rather than
silently shadowing it; tar layers merge into existing directories and replace what they overwrite,
as the applier does for image layers.

Files and directories keep the modes their layers declare (a 0640 file is 0640, a 0750 directory
0750, the root 0755 unless a layer declares ``./``), as the runtimes' overlay mounts show them;
read-only comes from the volume's mount, and the tree lies under the 0700 store root. Hard-linked
raw blobs are 0o444. Volumes never expose a snapshot's inodes writable (:mod:`imagevol.volume`).

The package is split by job: :mod:`.options` (options and constants), :mod:`.paths` (layer paths,
tar probing), :mod:`.record` (snapshot records), :mod:`.snapshots` (keys, reuse, removal, stale
builds), :mod:`.check` (fsck), :mod:`.build` (the builder and :func:`materialize`) and one module
per flavour (:mod:`.image`, :mod:`.artifact`, :mod:`.modelpack`, :mod:`.kitops`,
:mod:`.dockermodel`). This module re-exports the names used outside the package.
"""

from __future__ import annotations

from ..fstree import copy_fd, count_files, force_rmtree
from ..manifest import flavour as manifest_flavour
from .build import LayerFeed, materialize
from .check import SnapshotCheck, check_snapshots, snapshot_keys, verify_snapshot
from .options import HASH_AS_WRITTEN_MIN, SNAPSHOT_FORMAT, MaterializeOptions
from .paths import looks_like_tar, safe_parts
from .record import read_record, write_record
from .snapshots import (
    Snapshot,
    _lock_name,
    clean_stale_builds,
    find_snapshot,
    remove_snapshot,
    snapshot_key,
    snapshots_dir,
)

__all__ = [
    "HASH_AS_WRITTEN_MIN",
    "SNAPSHOT_FORMAT",
    "LayerFeed",
    "MaterializeOptions",
    "Snapshot",
    "SnapshotCheck",
    "_lock_name",
    "check_snapshots",
    "clean_stale_builds",
    "copy_fd",
    "count_files",
    "find_snapshot",
    "force_rmtree",
    "looks_like_tar",
    "manifest_flavour",
    "materialize",
    "read_record",
    "remove_snapshot",
    "safe_parts",
    "snapshot_key",
    "snapshot_keys",
    "snapshots_dir",
    "verify_snapshot",
    "write_record",
]
