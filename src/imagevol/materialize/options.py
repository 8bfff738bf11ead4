"""Options and constants of the materializer: where snapshots live in the store (``SNAPSHOTS`` and
the ``.build-`` / ``.info-`` / ``.record-`` prefixes), the tree format (``SNAPSHOT_FORMAT``), the
record version, the limits on names, chunks and tar probes, and :class:`MaterializeOptions` (how
untitled artifact layers are named, the applier policies).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import UsageError
from ..unpack.applier import ApplyOptions

SNAPSHOTS = "snapshots"
BUILD_PREFIX = ".build-"
INFO_PREFIX = ".info-"
RECORD_PREFIX = ".record-"
#: Version of the snapshot record format (docs/architecture.md, "Snapshot records").
RECORD_VERSION = 1
#: Files at least this large are hashed for the record as the applier writes them (smaller ones are
#: read again from the page cache when the record is written).
HASH_AS_WRITTEN_MIN = 1 << 20
UNTITLED_POLICIES = ("skip", "digest")
NAME_MAX = 255
CHUNK = 1 << 20
PROBE_LIMIT = 16 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_KEY_RE = re.compile(r"^[0-9a-f]{64}(?:[0-9a-f]{64})?(?:-[0-9a-f]{12})?$")
_COMPRESSIONS = {None: "none", "": "none", "none": "none", "gzip": "gzip", "gzip-fastest": "gzip", "zstd": "zstd"}


# What a snapshot tree looks like; a new value gives every snapshot a new key, so trees built the
# old way are never reused (gc reclaims them). 2: declared modes kept (1, unkeyed: write bits stripped).
SNAPSHOT_FORMAT = 2


@dataclass
class MaterializeOptions:
    """How to materialize.

    name_untitled: artifact layers without a title: ``"skip"`` them with a warning (CRI-O), or name
        the file by the layer's digest hex (``"digest"``).
    apply: policies of the layer applier (None: its defaults). Artifact tar layers always run with
        whiteouts refused.
    """

    name_untitled: str = "skip"
    apply: ApplyOptions | None = None

    def __post_init__(self) -> None:
        if self.name_untitled not in UNTITLED_POLICIES:
            raise UsageError(
                f"invalid name_untitled policy {self.name_untitled!r}",
                hint="name_untitled must be one of: " + ", ".join(UNTITLED_POLICIES),
            )
