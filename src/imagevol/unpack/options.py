"""The policies and limits of applying a layer (ApplyOptions) and what applying it did (ApplyStats).

ApplyOptions holds the device, duplicate and setuid policies, the decompression-bomb limits
(DEFAULT_MAX_RATIO), the entry limit (DEFAULT_MAX_ENTRIES) and the whiteout and xattr switches; it
checks its policy names when made. Callers that only configure a layer import these from here (or
from :mod:`.applier`, which re-exports them) without the applier's machinery.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import UsageError

#: Default most entries one layer may hold (ApplyOptions.max_entries, `--max-entries`).
DEFAULT_MAX_ENTRIES = 1_000_000

_DEVICES = ("skip", "refuse", "create")
_DUPLICATES = ("last", "refuse")
_SETUID = ("keep", "strip")


def _is_root() -> bool:
    return os.geteuid() == 0


DEFAULT_MAX_RATIO = 250.0


@dataclass
class ApplyOptions:
    """Policies of :func:`apply_layer`.

    preserve_owner: chown entries to the layer's uid/gid (default: when running as root).
    devices: character/block devices and FIFOs: 'skip' (with a warning), 'refuse' or 'create'.
    duplicates: a path written twice by one layer: 'last' wins, or 'refuse' the layer.
    setuid: 'keep' setuid/setgid bits on non-directories, or 'strip' them.
    max_ratio / max_size: decompression-bomb limits (see :func:`..compression.open_decompressed`);
        by default a layer may expand at most :data:`DEFAULT_MAX_RATIO` times (real layers: 1-10x;
        gzip of zeros: ~1000x), with no size cap. None lifts a limit.
    max_entries: most tar entries one layer may hold (an inode bomb: 400,000 empty files gzip to
        2.5 MB); by default :data:`DEFAULT_MAX_ENTRIES`, well above real layers (a whole distribution's
        /usr holds a few hundred thousand files). None lifts the limit.
    whiteouts: apply OCI whiteouts (image layers); False for artifact tar layers, where a whiteout
        name is refused as unsafe.
    xattrs: apply SCHILY.xattr.user.* and trusted.* (default: when running as root);
    security_xattrs: also security.* (file capabilities, SELinux labels); off by default.
    """

    preserve_owner: bool = field(default_factory=_is_root)
    devices: str = "skip"
    duplicates: str = "last"
    setuid: str = "keep"
    max_ratio: float | None = DEFAULT_MAX_RATIO
    max_size: int | None = None
    max_entries: int | None = DEFAULT_MAX_ENTRIES
    whiteouts: bool = True
    xattrs: bool = field(default_factory=_is_root)
    security_xattrs: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("devices", _DEVICES), ("duplicates", _DUPLICATES), ("setuid", _SETUID)):
            value = getattr(self, name)
            if value not in allowed:
                raise UsageError(
                    f"invalid {name} policy {value!r}", hint=f"{name} must be one of: " + ", ".join(allowed)
                )


@dataclass
class ApplyStats:
    """What one layer did to the tree. `skipped` holds every warning (skipped entries, xattrs)."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    whiteouts: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)
