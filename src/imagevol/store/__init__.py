"""The local content store: verified blobs, resumable ingests, SQLite metadata, gc and fsck.

See :mod:`imagevol.store.blobs` for the on-disk layout.
"""

from __future__ import annotations

from .blobs import MAX_MANIFEST_BYTES, FsckResult, GcResult, Store, fsck, gc, reachable
from .ingest import Ingest, merge_ranges, missing_ranges
from .locks import FileLock
from .meta import Lease, Meta, RefRecord, SnapshotRecord, VolumeRecord

__all__ = [
    "MAX_MANIFEST_BYTES",
    "FileLock",
    "FsckResult",
    "GcResult",
    "Ingest",
    "Lease",
    "Meta",
    "RefRecord",
    "SnapshotRecord",
    "Store",
    "VolumeRecord",
    "fsck",
    "gc",
    "merge_ranges",
    "missing_ranges",
    "reachable",
]
