"""Windows ``os.version`` compatibility (containerd ``platform_windows_compat.go``): which image
builds a Windows host of a given major.minor.build can run (the same build before LTSC 2022, then
from the newest stable-ABI LTSC release below the host up to the host's build). Used by the
containerd matcher when the wanted platform is Windows.
"""

from __future__ import annotations

import re

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
