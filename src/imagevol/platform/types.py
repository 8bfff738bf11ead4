"""The platform value: :class:`Platform` (an OCI ``os/arch[/variant]`` with ``os.version`` and
``os.features``), its text forms (containerd ``Format`` / ``FormatAll``), its OCI JSON form, and the
percent-encoding of ``os.version`` and ``os.features`` inside ``os(version+feature...)`` that
``format_all`` writes and the parser reads back. No normalization, no host facts: the lowest room
of the platform package, which every other room builds on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidPlatformError

# --------------------------------------------------------------------------------------------
# The value type
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Platform:
    """An OCI platform. Fields hold what they were given; use :func:`normalize` for canonical form."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Accept any iterable of features (a list from JSON, say) but store a tuple: the
        # dataclass is frozen and hashable.
        if not isinstance(self.os_features, tuple):
            object.__setattr__(self, "os_features", tuple(self.os_features))

    def __str__(self) -> str:
        """containerd ``Format``: ``os/arch[/variant]``; ``unknown`` when the OS is empty."""
        if not self.os:
            return "unknown"
        return _join(self.os, self.architecture, self.variant)

    def format_all(self) -> str:
        """containerd ``FormatAll``: like ``str()`` plus ``(os.version+feature+...)`` after the OS.

        Special characters in the version and features are percent-encoded, features are sorted,
        deduplicated and empty ones dropped, so the result parses back with :func:`parse_platform`.
        """
        if not self.os:
            return "unknown"
        if not self.os_version and not self.os_features:
            return str(self)
        osv = _encode_os_option(self.os_version)
        feats = _format_os_features(self.os_features)
        head = self.os
        if osv or feats:
            head += "(" + osv + ("+" + feats if feats else "") + ")"
        return _join(head, self.architecture, self.variant)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Platform:
        """Build from an OCI descriptor's ``platform`` object. Missing keys become ""; no normalization."""
        if not isinstance(d, Mapping):
            raise InvalidPlatformError(f"platform must be a JSON object, got {type(d).__name__}")

        def text(key: str) -> str:
            value = d.get(key)
            if value is None:
                return ""
            if not isinstance(value, str):
                raise InvalidPlatformError(f"platform field {key!r} must be a string, got {type(value).__name__}")
            return value

        raw_features = d.get("os.features")
        features: tuple[str, ...] = ()
        if raw_features is not None:
            if not isinstance(raw_features, list) or not all(isinstance(f, str) for f in raw_features):
                raise InvalidPlatformError("platform field 'os.features' must be a list of strings")
            features = tuple(raw_features)
        return cls(
            os=text("os"),
            architecture=text("architecture"),
            variant=text("variant"),
            os_version=text("os.version"),
            os_features=features,
        )

    def to_dict(self) -> dict[str, Any]:
        """The OCI JSON form (key order as in the image-spec), omitting empty fields."""
        out: dict[str, Any] = {}
        if self.architecture:
            out["architecture"] = self.architecture
        if self.os:
            out["os"] = self.os
        if self.os_version:
            out["os.version"] = self.os_version
        if self.os_features:
            out["os.features"] = list(self.os_features)
        if self.variant:
            out["variant"] = self.variant
        return out


def _join(*parts: str) -> str:
    # Go's path.Join drops empty elements.
    return "/".join(p for p in parts if p)


# --------------------------------------------------------------------------------------------
# OS option encoding: windows(10.0.17763%2Bbuild.42+win32k)
# --------------------------------------------------------------------------------------------

_OS_OPTION_ESCAPES = {"%": "%25", "+": "%2B", "(": "%28", ")": "%29", "/": "%2F"}


def _encode_os_option(value: str) -> str:
    return "".join(_OS_OPTION_ESCAPES.get(ch, ch) for ch in value)


_HEX = frozenset("0123456789abcdefABCDEF")


def _decode_os_option(value: str, spec: str, what: str) -> str:
    """Strict percent-decoding like Go's url.PathUnescape (a bad escape is an error)."""
    if "%" not in value:
        return value
    out = bytearray()
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "%":
            pair = value[i + 1 : i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise InvalidPlatformError(
                    f"invalid platform {spec!r}: {what} {value!r} has a bad percent-escape {value[i : i + 3]!r}",
                    hint="escape '%' as %25, '+' as %2B, '(' as %28, ')' as %29, '/' as %2F",
                )
            out.append(int(pair, 16))
            i += 3
        else:
            out += ch.encode()
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPlatformError(
            f"invalid platform {spec!r}: {what} {value!r} does not decode to UTF-8 text"
        ) from None


def _format_os_features(features: Iterable[str]) -> str:
    return "+".join(_encode_os_option(f) for f in sorted({f for f in features if f}))
