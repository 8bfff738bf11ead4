"""What a selection returns: the manifest chosen for a node, and the trace of every index entry's
verdict on the way (what `imagevol explain` prints and the CSI plugin reports)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..manifest import Descriptor, Manifest
from ..platform import Platform


@dataclass
class EntryVerdict:
    """What happened to one index entry."""

    position: int
    descriptor: Descriptor
    verdict: str  # match | platform-less | no-match | ignored | fallback
    rank: tuple[int, int] | None = None
    note: str = ""

    @property
    def platform(self) -> str | None:
        p = self.descriptor.platform
        return None if p is None else platform_text(p)

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "digest": str(self.descriptor.digest),
            "mediaType": self.descriptor.media_type,
            "platform": self.platform,
            "verdict": self.verdict,
            "rank": list(self.rank) if self.rank else None,
            "note": self.note,
        }


@dataclass
class IndexStep:
    """One index visited while selecting."""

    digest: str
    media_type: str
    entries: list[EntryVerdict] = field(default_factory=list)
    chosen: int | None = None  # position of the entry followed
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "mediaType": self.media_type,
            "entries": [e.to_dict() for e in self.entries],
            "chosen": self.chosen,
            "reason": self.reason,
        }


@dataclass
class Selection:
    """The manifest chosen for a node, and why."""

    root: Descriptor
    descriptor: Descriptor
    manifest: Manifest
    how: str  # direct | platform | platform-less | fallback
    platform: Platform | None
    steps: list[IndexStep] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root.digest),
            "digest": str(self.descriptor.digest),
            "mediaType": self.descriptor.media_type,
            "how": self.how,
            "platform": platform_text(self.platform) if self.platform else None,
            "kind": self.manifest.kind,
            "steps": [s.to_dict() for s in self.steps],
            "warnings": list(self.warnings),
        }


def platform_text(p: Platform) -> str:
    s = str(p)
    return s if s else "(empty)"
