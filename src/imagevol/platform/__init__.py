"""Platforms (`os/arch[/variant]`) and the two ways runtimes pick one out of an index.

Everything here re-implements, in Python, the behaviour of the two runtimes an image volume meets:

* containerd (`github.com/containerd/platforms`): :func:`parse_platform` follows ``Parse``,
  :func:`normalize` follows ``Normalize``, :meth:`Platform.__str__` / :meth:`Platform.format_all`
  follow ``Format`` / ``FormatAll``, and :class:`ContainerdMatcher` follows ``Only`` (or
  ``OnlyStrict``): a priority vector (amd64/vN -> vN..v1 then 386; arm64/v8.x, v9.x -> lower
  arm64 variants then arm/v8..v5; arm/vN -> vN..v5), every candidate normalized before it is
  compared, Windows ``os.version`` checked with the LTSC compatibility rule; ``os.features`` are
  ignored as containerd 2.1's containerd/platforms v1.0.0-rc.2 does (``rules="main"``: a candidate's
  features must be a subset of the wanted ones). :func:`parse_platform_containerd21` is rc.2's
  ``Parse`` (no ``+features``, no percent-escapes).
* CRI-O (`containers/image`, ``internal/pkg/platform``): :class:`CrioMatcher` follows
  ``WantedPlatforms`` + ``MatchesPlatform``: a list of wanted platforms (arm: v8, v7, v6, v5;
  arm64: v8; a wanted variant walks down the list and then ""), compared by exact string
  equality with the index entry, which is NOT normalized. ``os.version`` and ``os.features`` are
  ignored.

Matching semantics are those of containerd 2.1 / containers/image 5.36 (CRI-O 1.34).

The package is split into rooms, lowest first: :mod:`.types` (the :class:`Platform` value and its
text forms), :mod:`.host` (this machine's facts), :mod:`.canonical` (``Normalize`` and
:func:`host_platform`), :mod:`.parse` (``Parse``), :mod:`.windows` (``os.version`` compatibility)
and :mod:`.match` (the matchers behind :class:`Matcher`). This module only re-exports.
"""

from __future__ import annotations

from .canonical import host_platform, normalize
from .match import (
    CONTAINERD_RULES,
    ContainerdMatcher,
    CrioMatcher,
    Matcher,
    ordered_rank,
    wanted_platforms,
)
from .parse import parse_platform, parse_platform_containerd21, parse_platform_list
from .types import Platform
from .windows import windows_os_version_matches

__all__ = [
    "CONTAINERD_RULES",
    "ContainerdMatcher",
    "CrioMatcher",
    "Matcher",
    "Platform",
    "host_platform",
    "normalize",
    "ordered_rank",
    "parse_platform",
    "parse_platform_containerd21",
    "parse_platform_list",
    "wanted_platforms",
    "windows_os_version_matches",
]
