"""Canonical platform names: containerd ``Normalize`` (``database.go``) and the names Go knows
(``isKnownOS`` / ``isKnownArch``), used by the parser and by every matcher before it compares; and
:func:`host_platform`, this machine's platform in canonical form (``Normalize(DefaultSpec())``). An
empty OS means this host's OS, so this room reads the host facts of :mod:`.host`.
"""

from __future__ import annotations

from . import host
from .types import Platform

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
        return host._host_os()
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


def host_platform() -> Platform:
    """This machine's platform, normalized (containerd ``Normalize(DefaultSpec())``).

    The ARM variant comes from ``/proc/cpuinfo`` like containerd's (so arm64 -> "" after
    normalization, arm -> v5..v8); Windows hosts carry ``os.version`` = major.minor.build.
    """
    return normalize(host._host_spec())
