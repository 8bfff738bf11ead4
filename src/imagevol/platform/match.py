"""The two ways runtimes pick a platform out of an index, behind one :class:`Matcher` protocol.

:class:`ContainerdMatcher` is containerd's ``platforms.Only`` (or ``OnlyStrict``): a priority
vector (amd64/vN -> vN..v1 then 386; arm64/v8.x, v9.x -> lower arm64 variants then arm/v8..v5;
arm/vN -> vN..v5), every candidate normalized before it is compared, Windows ``os.version`` checked
with the LTSC compatibility rule (:mod:`.windows`). :class:`CrioMatcher` is containers/image's
``WantedPlatforms`` + ``MatchesPlatform``: a list of wanted platforms compared by exact string
equality with the index entry, NOT normalized. :func:`ordered_rank` ranks a candidate against a
preference list of node platforms.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

from .canonical import normalize
from .types import Platform
from .windows import windows_os_version_matches


class Matcher(Protocol):
    """What :class:`ContainerdMatcher` and :class:`CrioMatcher` both offer (containerd's ``Matcher``
    plus the rank that orders candidates): ``match(p)`` accepts p, ``rank(p)`` is p's position in
    ``accepted()`` (best first, None when not accepted), ``platform`` is the normalized node platform.
    """

    platform: Platform

    def match(self, p: Platform) -> bool: ...

    def rank(self, p: Platform) -> int | None: ...

    def accepted(self) -> list[Platform]: ...


# --------------------------------------------------------------------------------------------
# containerd matcher
# --------------------------------------------------------------------------------------------

_ARM64_VARIANT_VERSIONS: dict[str, tuple[tuple[int, int], ...]] = {
    "v8": ((8, 0),),
    "v8.0": ((8, 0),),
    **{f"v8.{minor}": ((8, minor),) for minor in range(1, 10)},
    "v9": ((9, 0), (8, 5)),
    "v9.0": ((9, 0), (8, 5)),
    **{f"v9.{minor}": ((9, minor), (8, min(minor + 5, 9))) for minor in range(1, 8)},
}


def _int_variant(variant: str) -> int | None:
    """Go strconv.Atoi(strings.TrimPrefix(variant, "v")); None when it fails."""
    digits = variant[1:] if variant.startswith("v") else variant
    if re.fullmatch(r"[+-]?[0-9]+", digits) is None:
        return None
    return int(digits)


def _platform_vector(p: Platform) -> list[Platform]:
    """containerd platformVector: p and what it can also run, best first (p is normalized)."""

    def with_variant(arch: str, variant: str) -> Platform:
        return Platform(p.os, arch, variant, p.os_version, p.os_features)

    if p.architecture == "amd64":
        vector = [p]
        level = _int_variant(p.variant)
        if level is not None and level > 1:
            vector += [with_variant("amd64", f"v{n}") for n in range(level - 1, 0, -1)]
        vector.append(with_variant("386", ""))
        return vector
    if p.architecture == "arm":
        vector = [p]
        level = _int_variant(p.variant)
        if level is not None and level > 5:
            vector += [with_variant("arm", f"v{n}") for n in range(level - 1, 4, -1)]
        return vector
    if p.architecture == "arm64":
        variant = p.variant or "v8"
        versions = _ARM64_VARIANT_VERSIONS.get(variant)
        if versions is None:  # an arm64 variant containerd does not know matches nothing
            return []
        vector = []
        for major, top_minor in versions:
            for minor in range(top_minor, -1, -1):
                vector.append(with_variant("arm64", f"v{major}" if minor == 0 else f"v{major}.{minor}"))
        # Every arm64/v8.x and v9.x runs arm/v8 (32-bit) and below.
        if variant.startswith(("v8", "v9")):
            variant = "v8"
        return vector + _platform_vector(with_variant("arm", variant))
    return [p]


# containerd releases and the containerd/platforms rules they vendor.
CONTAINERD_RULES = ("2.1", "main")


class _ExactMatcher:
    """containerd NewMatcher: one platform, the candidate normalized before comparing.

    ``rules="2.1"`` is containerd/platforms v1.0.0-rc.2 (containerd 2.1): ``os.features`` are
    ignored. ``rules="main"``: a candidate's features must be a subset (``win32k`` implied on Windows).
    """

    __slots__ = ("platform", "rules", "windows")

    def __init__(self, platform: Platform, rules: str = "2.1") -> None:
        self.windows = platform.os == "windows"
        self.platform = normalize(platform)
        self.rules = rules

    def match(self, candidate: Platform) -> bool:
        if self.rules == "2.1":
            n = normalize(candidate)
            want = self.platform
            if (n.os, n.architecture, n.variant) != (want.os, want.architecture, want.variant):
                return False
            return not self.windows or windows_os_version_matches(want.os_version, candidate.os_version)
        features = candidate.os_features
        if self.windows and "win32k" in features:
            # windowsStripFeaturesMatcher: win32k is implied on Windows hosts.
            i = features.index("win32k")
            features = features[:i] + features[i + 1 :]
        n = normalize(Platform(candidate.os, candidate.architecture, candidate.variant, candidate.os_version, features))
        want = self.platform
        if (n.os, n.architecture, n.variant) != (want.os, want.architecture, want.variant):
            return False
        if self.windows and not windows_os_version_matches(want.os_version, candidate.os_version):
            return False
        return set(n.os_features) <= set(want.os_features)


class ContainerdMatcher:
    """containerd ``platforms.Only(platform)`` (or ``OnlyStrict`` with ``strict=True``).

    ``accepted()`` is the priority vector, best first; ``rank(p)`` is p's position in it (``Less``
    of two candidates compares their ranks). Candidates are normalized before comparison. For
    Windows, ``os.version`` must be compatible (same major.minor.build for hosts before 10.0.20348,
    otherwise from the newest LTSC below the host up to the host's build); elsewhere ``os.version``
    is ignored. ``rules`` names the containerd release: ``"2.1"`` (containerd/platforms
    v1.0.0-rc.2, the default) ignores ``os.features``; ``"main"`` requires a candidate's features to
    be a subset of the wanted ones (``win32k`` implied on Windows); main also ranks, among equal
    platforms, the entry with more matching features first, which this class does not model.
    """

    __slots__ = ("_matchers", "platform", "rules", "strict")

    def __init__(self, platform: Platform, *, strict: bool = False, rules: str = "2.1") -> None:
        if rules not in CONTAINERD_RULES:
            raise ValueError(f"unknown containerd rules {rules!r}: use one of {', '.join(CONTAINERD_RULES)}")
        self.platform = normalize(platform)
        self.strict = strict
        self.rules = rules
        vector = [self.platform] if strict else _platform_vector(self.platform)
        self._matchers = [_ExactMatcher(v, rules) for v in vector]

    def less(self, a: Platform, b: Platform) -> bool:
        """``Less(a, b)``: a is matched by an earlier entry of the vector than b."""
        ra, rb = self.rank(a), self.rank(b)
        return ra is not None and (rb is None or ra < rb)

    def match(self, p: Platform) -> bool:
        return self.rank(p) is not None

    def rank(self, p: Platform) -> int | None:
        for index, m in enumerate(self._matchers):
            if m.match(p):
                return index
        return None

    def accepted(self) -> list[Platform]:
        return [m.platform for m in self._matchers]

    def __repr__(self) -> str:
        kind = "OnlyStrict" if self.strict else "Only"
        return f"ContainerdMatcher({kind} {self.platform.format_all()})"


# --------------------------------------------------------------------------------------------
# CRI-O (containers/image) matcher
# --------------------------------------------------------------------------------------------

# For each architecture, its variants from most capable to most compatible.
_CRIO_COMPATIBILITY: dict[str, tuple[str, ...]] = {"arm": ("v8", "v7", "v6", "v5"), "arm64": ("v8",)}


def wanted_platforms(os_name: str, architecture: str, variant: str) -> list[Platform]:
    """containers/image ``WantedPlatforms`` for explicit OS / architecture / variant choices.

    A variant walks down the compatibility list from itself (an unknown one stands alone), then
    "". Without a variant: "" first, then the whole compatibility list. Nothing is normalized.
    """
    if variant:
        order = _CRIO_COMPATIBILITY.get(architecture, ())
        variants = list(order[order.index(variant) :]) if variant in order else [variant]
        variants.append("")
    else:
        variants = ["", *_CRIO_COMPATIBILITY.get(architecture, ())]
    return [Platform(os_name, architecture, v) for v in variants]


def _crio_node_variant(node: Platform) -> str:
    """The variant containers/image's getCPUVariant would detect on a node of this platform.

    arm64 always reports v8 (Linux prints "CPU architecture: 8" on every aarch64 CPU), so a
    node given as arm64/v8.2 or arm64/v9 still wants v8. An arm node's variant is the given one
    (v7 when none was given). Windows/Darwin: arm64 v8, arm v7. Other architectures: none.
    """
    if node.os in ("darwin", "windows"):
        return {"arm64": "v8", "arm": "v7"}.get(node.architecture, "")
    if node.architecture == "arm64":
        return "v8"
    if node.architecture == "arm":
        return node.variant
    return ""


class CrioMatcher:
    """CRI-O / containers/image platform choice for a node: ``WantedPlatforms`` + ``MatchesPlatform``.

    The node platform is normalized and its variant auto-detected as CRI-O would on that node.
    Index entries are compared by exact os/architecture/variant string equality, NOT normalized
    (``aarch64`` or ``Linux`` never match); ``os.version`` and ``os.features`` are ignored.
    """

    __slots__ = ("_wanted", "platform")

    def __init__(self, platform: Platform) -> None:
        self.platform = normalize(platform)
        node = self.platform
        self._wanted = wanted_platforms(node.os, node.architecture, _crio_node_variant(node))

    def match(self, p: Platform) -> bool:
        return self.rank(p) is not None

    def rank(self, p: Platform) -> int | None:
        for index, w in enumerate(self._wanted):
            if (p.architecture, p.os, p.variant) == (w.architecture, w.os, w.variant):
                return index
        return None

    def accepted(self) -> list[Platform]:
        return list(self._wanted)

    def __repr__(self) -> str:
        return f"CrioMatcher({self.platform})"


def ordered_rank(matchers: Sequence[Matcher], p: Platform) -> tuple[int, int] | None:
    """For a preference list of node platforms: (index of the first matcher accepting p, its rank)."""
    for index, matcher in enumerate(matchers):
        r = matcher.rank(p)
        if r is not None:
            return (index, r)
    return None
