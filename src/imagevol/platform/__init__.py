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
"""

from __future__ import annotations

import functools
import platform as _stdlib_platform
import re
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidPlatformError

__all__ = [
    "ContainerdMatcher",
    "CrioMatcher",
    "Platform",
    "host_platform",
    "normalize",
    "ordered_rank",
    "parse_platform",
    "parse_platform_containerd21",
    "parse_platform_list",
    "wanted_platforms",
]

_FORMAT_HINT = "a platform is os[(os.version+feature...)][/arch[/variant]], e.g. linux/arm64 or linux/arm/v7"


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


# --------------------------------------------------------------------------------------------
# Normalization (containerd database.go)
# --------------------------------------------------------------------------------------------

# Go's syslist (containerd database.go isKnownOS / isKnownArch).
_KNOWN_OS = frozenset({
    "aix", "android", "darwin", "dragonfly", "freebsd", "hurd", "illumos", "ios", "js", "linux",
    "nacl", "netbsd", "openbsd", "plan9", "solaris", "windows", "zos"
})  # fmt: skip
_KNOWN_ARCH = frozenset({
    "386", "amd64", "amd64p32", "arm", "armbe", "arm64", "arm64be", "ppc64", "ppc64le", "loong64",
    "mips", "mipsle", "mips64", "mips64le", "mips64p32", "mips64p32le", "ppc", "riscv", "riscv64",
    "s390", "s390x", "sparc", "sparc64", "wasm"
})  # fmt: skip


def _normalize_os(os_name: str) -> str:
    if not os_name:
        return _host_os()
    os_name = os_name.lower()
    if os_name == "macos":
        return "darwin"
    return os_name


def _normalize_arch(arch: str, variant: str) -> tuple[str, str]:
    arch, variant = arch.lower(), variant.lower()
    if arch == "i386":
        return "386", ""
    if arch in ("x86_64", "x86-64", "amd64"):
        return "amd64", ("" if variant == "v1" else variant)
    if arch in ("aarch64", "arm64"):
        if variant in ("8", "v8", "v8.0"):
            variant = ""
        elif variant in ("9", "9.0", "v9.0"):
            variant = "v9"
        return "arm64", variant
    if arch == "armhf":
        return "arm", "v7"
    if arch == "armel":
        return "arm", "v6"
    if arch == "arm":
        if variant in ("", "7"):
            variant = "v7"
        elif variant in ("5", "6", "8"):
            variant = "v" + variant
        return "arm", variant
    return arch, variant


def normalize(p: Platform) -> Platform:
    """containerd ``Normalize``.

    OS lowercased (``macos`` -> ``darwin``, "" -> this host's OS); architecture and variant
    lowercased and canonicalized (``x86_64``/``x86-64`` -> amd64, ``amd64/v1`` -> amd64,
    ``aarch64`` -> arm64, arm64 ``8``/``v8``/``v8.0`` -> "", ``9``/``9.0``/``v9.0`` -> v9,
    ``armhf`` -> arm/v7, ``armel`` -> arm/v6, arm ""/``7`` -> v7, ``5``/``6``/``8`` -> vN,
    ``i386`` -> 386); ``os.features`` sorted and deduplicated; ``os.version`` untouched.
    Like containerd, ``i686`` is NOT mapped to 386.
    """
    arch, variant = _normalize_arch(p.architecture, p.variant)
    return Platform(
        os=_normalize_os(p.os),
        architecture=arch,
        variant=variant,
        os_version=p.os_version,
        os_features=tuple(sorted(set(p.os_features))),
    )


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
            arch = _host_goarch()
            variant = ""
            if arch == "arm" and _host_cpu_variant() != "v7":
                variant = _host_cpu_variant()
            return Platform(os_name, arch, variant, os_version, features)
        arch, variant = _normalize_arch(parts[0], "")
        if arch == "arm" and variant == "v7":
            variant = ""
        if arch in _KNOWN_ARCH:
            return Platform(_host_os(), arch, variant, os_version, features)
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


# --------------------------------------------------------------------------------------------
# This host (containerd DefaultSpec + cpuinfo)
# --------------------------------------------------------------------------------------------

_MACHINE_TO_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "x64": "amd64",
    "i386": "386",
    "i486": "386",
    "i586": "386",
    "i686": "386",
    "x86": "386",
    "aarch64": "arm64",
    "arm64": "arm64",
    "aarch64_be": "arm64be",
    "ppc64le": "ppc64le",
    "ppc64": "ppc64",
    "ppc": "ppc",
    "s390x": "s390x",
    "s390": "s390",
    "riscv64": "riscv64",
    "loongarch64": "loong64",
    "mips": "mips",
    "mipsel": "mipsle",
    "mips64": "mips64",
    "mips64el": "mips64le",
    "sparc64": "sparc64",
}

_BITS32 = {
    "amd64": "386",
    "arm64": "arm",
    "ppc64": "ppc",
    "s390x": "s390",
    "mips64": "mips",
    "mips64le": "mipsle",
}


def _goarch_from_machine(machine: str, pointer_bits: int = 64) -> str:
    """Map ``uname -m`` to Go's GOARCH naming (which containerd's host platform uses).

    A 32-bit interpreter on a 64-bit kernel reports the kernel's machine; like a 32-bit Go
    binary (GOARCH), take the 32-bit userland's architecture then.
    """
    m = machine.strip().lower()
    is_arm32 = m.startswith("armv") or m in ("arm", "armhf", "armel")
    arch = "arm" if is_arm32 else _MACHINE_TO_GOARCH.get(m, m)
    if pointer_bits == 32:
        arch = _BITS32.get(arch, arch)
    return arch


def _goos_from_sys_platform(name: str) -> str:
    name = name.lower()
    for prefix, goos in (
        ("linux", "linux"),
        ("darwin", "darwin"),
        ("win32", "windows"),
        ("cygwin", "windows"),
        ("freebsd", "freebsd"),
        ("openbsd", "openbsd"),
        ("netbsd", "netbsd"),
        ("dragonfly", "dragonfly"),
        ("sunos", "solaris"),
        ("aix", "aix"),
    ):
        if name.startswith(prefix):
            return goos
    return name


def _cpuinfo_field(cpuinfo: str, pattern: str) -> str | None:
    """First ``key : value`` line whose key equals pattern case-insensitively (containerd getCPUInfo)."""
    for line in cpuinfo.splitlines():
        fields = line.split(":")
        if len(fields) > 1 and fields[0].strip().lower() == pattern.lower():
            return fields[1].strip()
    return None


def _cpu_variant_from_machine(machine: str) -> str | None:
    """containerd getCPUVariantFromArch: ``aarch64`` -> 8, ``armvNx`` -> N; None when invalid."""
    m = machine.lower()
    if m == "aarch64":
        return "8"
    if m.startswith("armv") and len(m) >= 5:
        return {"v8": "8", "v7": "7", "v6": "6", "v5": "5", "v4": "4", "v3": "3"}.get(m[3:5], "unknown")
    return None


def _cpu_variant_linux(goarch: str, cpuinfo: str | None, machine: str) -> str:
    """containerd getCPUVariant on Linux (arm and arm64 only); "" when it cannot tell."""
    variant = _cpuinfo_field(cpuinfo, "Cpu architecture") if cpuinfo is not None else None
    if variant is None:
        variant = _cpu_variant_from_machine(machine)
        if variant is None:
            return ""
    # Raspberry Pi ARMv6 boards report "CPU architecture: 7" (kernel quirk).
    if goarch == "arm" and variant == "7" and cpuinfo is not None:
        model = _cpuinfo_field(cpuinfo, "model name")
        if model is not None and model.lower().startswith("armv6-compatible"):
            variant = "6"
    v = variant.lower()
    if v in ("8", "aarch64"):
        return "v8"
    if v in ("7", "7m", "?(12)", "?(13)", "?(14)", "?(15)", "?(16)", "?(17)"):
        return "v7"
    if v in ("6", "6tej"):
        return "v6"
    if v in ("5", "5t", "5te", "5tej"):
        return "v5"
    if v in ("4", "4t"):
        return "v4"
    if v == "3":
        return "v3"
    return "unknown"


def _cpu_variant(goos: str, goarch: str, cpuinfo: str | None, machine: str) -> str:
    """containerd cpuVariant(): only ARM hosts have one."""
    if goarch not in ("arm", "arm64"):
        return ""
    if goos == "linux":
        return _cpu_variant_linux(goarch, cpuinfo, machine)
    if goos in ("windows", "darwin"):
        return "v8" if goarch == "arm64" else "v7"
    if goos == "freebsd":
        return "v8" if goarch == "arm64" else "unknown"
    return ""


def _detect_host(
    goos: str,
    machine: str,
    pointer_bits: int,
    cpuinfo: str | None,
    windows_version: tuple[int, int, int] | None = None,
) -> Platform:
    """containerd DefaultSpec for the given facts (before normalization)."""
    goarch = _goarch_from_machine(machine, pointer_bits)
    os_version = ""
    if goos == "windows" and windows_version is not None:
        os_version = "{}.{}.{}".format(*windows_version)
    return Platform(goos, goarch, _cpu_variant(goos, goarch, cpuinfo, machine), os_version)


@functools.cache
def _host_spec() -> Platform:
    goos = _goos_from_sys_platform(sys.platform)
    cpuinfo: str | None = None
    if goos == "linux":
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = None
    windows_version = None
    if goos == "windows":
        wv = sys.getwindowsversion()  # type: ignore[attr-defined]
        windows_version = (wv.major, wv.minor, wv.build)
    return _detect_host(goos, _stdlib_platform.machine(), struct.calcsize("P") * 8, cpuinfo, windows_version)


def _host_os() -> str:
    return _goos_from_sys_platform(sys.platform)


def _host_goarch() -> str:
    return _host_spec().architecture


def _host_cpu_variant() -> str:
    return _host_spec().variant


def host_platform() -> Platform:
    """This machine's platform, normalized (containerd ``Normalize(DefaultSpec())``).

    The ARM variant comes from ``/proc/cpuinfo`` like containerd's (so arm64 -> "" after
    normalization, arm -> v5..v8); Windows hosts carry ``os.version`` = major.minor.build.
    """
    return normalize(_host_spec())


# --------------------------------------------------------------------------------------------
# Windows os.version compatibility (containerd platform_windows_compat.go)
# --------------------------------------------------------------------------------------------

_LTSC2022 = 20348
_LTSC2025 = 26100
# Stable-ABI LTSC releases, ascending: a host after one of them runs containers from it onward.
_COMPAT_LTSC_RELEASES = (_LTSC2022, _LTSC2025)
_DIGITS = re.compile(r"[0-9]+")


def _windows_os_version(value: str) -> tuple[int, int, int]:
    """major.minor.build of an ``os.version`` (revision ignored); (0, 0, 0) when unparsable."""
    if value.count(".") < 2:
        return (0, 0, 0)
    major, minor, build = value.split(".")[:3]
    limits = ((major, 0xFF), (minor, 0xFF), (build, 0xFFFF))
    if not all(_DIGITS.fullmatch(s) and int(s) <= limit for s, limit in limits):
        return (0, 0, 0)
    return (int(major), int(minor), int(build))


def _windows_compatible(host: tuple[int, int, int], ctr: tuple[int, int, int]) -> bool:
    """Can a Windows host of this version run a container image built for ``ctr``?"""
    if host[:2] != ctr[:2]:
        return False
    if host[2] < _LTSC2022:
        return host[2] == ctr[2]
    supported = _LTSC2022
    for release in reversed(_COMPAT_LTSC_RELEASES):
        if host[2] > release:
            supported = release
            break
    return supported <= ctr[2] <= host[2]


def windows_os_version_matches(host_version: str, image_version: str) -> bool:
    """containerd's windowsVersionMatcher: an empty host or image version matches anything."""
    host = _windows_os_version(host_version)
    if host == (0, 0, 0) or image_version == "":
        return True
    return _windows_compatible(host, _windows_os_version(image_version))


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


def ordered_rank(matchers: Sequence[ContainerdMatcher | CrioMatcher], p: Platform) -> tuple[int, int] | None:
    """For a preference list of node platforms: (index of the first matcher accepting p, its rank)."""
    for index, matcher in enumerate(matchers):
        r = matcher.rank(p)
        if r is not None:
            return (index, r)
    return None
