"""Platform text to :class:`Platform`: :func:`parse_platform` is containerd's ``platforms.Parse``
(main branch: ``os(version+feature...)`` with percent-escapes), :func:`parse_platform_containerd21`
is containerd 2.1's (containerd/platforms v1.0.0-rc.2, with its Go error texts), and
:func:`parse_platform_list` reads a comma-separated preference list. A lone OS or architecture is
completed from this host (:mod:`.host`).
"""

from __future__ import annotations

import re

from ..errors import InvalidPlatformError
from . import host
from .canonical import _KNOWN_ARCH, _KNOWN_OS, _normalize_arch, _normalize_os, normalize
from .types import Platform, _decode_os_option

_FORMAT_HINT = "a platform is os[(os.version+feature...)][/arch[/variant]], e.g. linux/arm64 or linux/arm/v7"


# --------------------------------------------------------------------------------------------
# Parsing (containerd platforms.go Parse)
# --------------------------------------------------------------------------------------------

_SPECIFIER_RE = re.compile(r"[A-Za-z0-9_.-]+")
_OS_RE = re.compile(r"([A-Za-z0-9_-]+)(?:\(([A-Za-z0-9_.%-]*)((?:\+[A-Za-z0-9_.%-]+)*)\))?")
_COMPONENT_NAMES = ("OS", "architecture", "variant")


def parse_platform(spec: str) -> Platform:
    """Parse a platform specifier exactly like containerd's ``platforms.Parse``.

    Forms: ``os`` (architecture of this host), ``arch`` (OS of this host), ``os/arch``,
    ``os/arch/variant``; the OS may carry ``(version+feature+...)`` with percent-escapes.
    Names are normalized like containerd's Parse does it, which is not quite :func:`normalize`:
    ``linux/arm`` and ``linux/armhf`` give arm with variant "" (v7 implied), ``linux/arm/v7``
    keeps v7, ``linux/arm64/v8`` keeps v8, ``linux/arm64`` has no variant. Matchers normalize
    anyway, so these spellings match the same entries.
    """
    if not isinstance(spec, str):
        raise InvalidPlatformError(f"platform must be a string, got {type(spec).__name__}")
    if not spec:
        raise InvalidPlatformError("empty platform", hint=_FORMAT_HINT)
    if "*" in spec:
        raise InvalidPlatformError(f"invalid platform {spec!r}: wildcards are not supported", hint=_FORMAT_HINT)

    parts = spec.split("/", 3)
    m = _OS_RE.fullmatch(parts[0])
    if m is None:
        raise InvalidPlatformError(
            f"invalid platform {spec!r}: {parts[0]!r} is not a valid OS component "
            "(letters, digits, '_' and '-', optionally followed by '(version+feature...)')",
            hint=_FORMAT_HINT,
        )
    os_name = _normalize_os(m.group(1))
    os_version = _decode_os_option(m.group(2) or "", spec, "OS version")
    features: tuple[str, ...] = ()
    if m.group(3):
        decoded = (_decode_os_option(raw, spec, "OS feature") for raw in m.group(3)[1:].split("+"))
        features = tuple(f for f in decoded if f)

    for index, part in enumerate(parts[1:3], start=1):
        if not _SPECIFIER_RE.fullmatch(part):
            raise InvalidPlatformError(
                f"invalid platform {spec!r}: {part!r} is not a valid {_COMPONENT_NAMES[index]} component "
                "(letters, digits, '_', '.' and '-', not empty)",
                hint=_FORMAT_HINT,
            )
    if len(parts) > 3:
        raise InvalidPlatformError(
            f"invalid platform {spec!r}: too many components, {parts[3]!r} follows the variant",
            hint=_FORMAT_HINT,
        )

    if len(parts) == 1:
        if os_name in _KNOWN_OS:
            arch = host._host_goarch()
            variant = ""
            if arch == "arm" and host._host_cpu_variant() != "v7":
                variant = host._host_cpu_variant()
            return Platform(os_name, arch, variant, os_version, features)
        arch, variant = _normalize_arch(parts[0], "")
        if arch == "arm" and variant == "v7":
            variant = ""
        if arch in _KNOWN_ARCH:
            return Platform(host._host_os(), arch, variant, os_version, features)
        raise InvalidPlatformError(
            f"invalid platform {spec!r}: unknown operating system or architecture {parts[0]!r}",
            hint=_FORMAT_HINT,
        )
    if len(parts) == 2:
        arch, variant = _normalize_arch(parts[1], "")
        if arch == "arm" and variant == "v7":
            variant = ""
        return Platform(os_name, arch, variant, os_version, features)
    arch, variant = _normalize_arch(parts[1], parts[2])
    if arch == "arm64" and variant == "":
        variant = "v8"
    return Platform(os_name, arch, variant, os_version, features)


_RC2_OS_RE = re.compile(r"([A-Za-z0-9_-]+)(?:\(([A-Za-z0-9_.-]*)\))?", re.ASCII)
_RC2_SPECIFIER_RE = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)
# The patterns as Go's %q prints them in rc.2's errors.
_RC2_OS_PATTERN = r'"^([A-Za-z0-9_-]+)(?:\\(([A-Za-z0-9_.-]*)\\))?$"'
_RC2_SPECIFIER_PATTERN = r'"^[A-Za-z0-9_.-]+$"'


def _go_quote(s: str) -> str:
    """Go's %q for printable ASCII text (the only text the truth tables quote)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_platform_containerd21(spec: str, *, host_os: str = "linux", host_arch: str = "amd64") -> Platform:
    """containerd/platforms v1.0.0-rc.2 ``Parse`` (containerd 2.1), on a host of `host_os`/`host_arch`.

    Unlike :func:`parse_platform` (containerd's main branch) the OS takes only ``(os.version)``:
    ``windows(10.0.17763+win32k)/amd64`` is refused and nothing is percent-decoded. Errors carry
    the Go error text.
    """
    if "*" in spec:
        raise InvalidPlatformError(f"{_go_quote(spec)}: wildcards not yet supported: invalid argument")
    parts = spec.split("/", 3)
    m = _RC2_OS_RE.fullmatch(parts[0])
    if m is None:
        raise InvalidPlatformError(
            f"{_go_quote(parts[0])} is an invalid OS component of {_go_quote(spec)}: OSAndVersion specifier "
            f"component must match {_RC2_OS_PATTERN}: invalid argument"
        )
    os_name = host_os if not m.group(1) else _normalize_os(m.group(1))
    os_version = m.group(2) or ""
    for part in parts[1:]:
        if not _RC2_SPECIFIER_RE.fullmatch(part):
            raise InvalidPlatformError(
                f"{_go_quote(part)} is an invalid component of {_go_quote(spec)}: platform specifier component "
                f"must match {_RC2_SPECIFIER_PATTERN}: invalid argument"
            )
    if len(parts) == 1:
        if os_name in _KNOWN_OS:
            return Platform(os_name, host_arch, "", os_version)
        arch, variant = _normalize_arch(parts[0], "")
        if arch == "arm" and variant == "v7":
            variant = ""
        if arch in _KNOWN_ARCH:
            return Platform(host_os, arch, variant, os_version)
        raise InvalidPlatformError(f"{_go_quote(spec)}: unknown operating system or architecture: invalid argument")
    if len(parts) == 2:
        arch, variant = _normalize_arch(parts[1], "")
        if arch == "arm" and variant == "v7":
            variant = ""
        return Platform(os_name, arch, variant, os_version)
    if len(parts) == 3:
        arch, variant = _normalize_arch(parts[1], parts[2])
        if arch == "arm64" and variant == "":
            variant = "v8"
        return Platform(os_name, arch, variant, os_version)
    raise InvalidPlatformError(f"{_go_quote(spec)}: cannot parse platform specifier: invalid argument")


def parse_platform_list(spec: str) -> list[Platform]:
    """Parse a comma-separated preference list (``linux/arm64,linux/amd64``), best first.

    Whitespace around items is ignored; an empty item is an error. Items that normalize to the
    same platform are duplicates: the first one is kept, in its position.
    """
    if not isinstance(spec, str):
        raise InvalidPlatformError(f"platform list must be a string, got {type(spec).__name__}")
    result: list[Platform] = []
    seen: set[Platform] = set()
    for position, item in enumerate(spec.split(","), start=1):
        item = item.strip()
        if not item:
            raise InvalidPlatformError(
                f"invalid platform list {spec!r}: item {position} is empty",
                hint="separate platforms with single commas, e.g. linux/arm64,linux/amd64",
            )
        p = parse_platform(item)
        key = normalize(p)
        if key in seen:
            continue
        seen.add(key)
        result.append(p)
    return result
