"""This host's platform facts, as containerd's ``DefaultSpec`` finds them (before normalization):
GOOS from ``sys.platform``, GOARCH from ``uname -m`` and the interpreter's pointer size, the ARM
variant from ``/proc/cpuinfo`` (containerd ``cpuinfo_linux.go``), the Windows build as
``os.version``. :func:`_detect_host` is the pure function of those facts; :func:`_host_spec` reads
them once from the running machine. The normalized host platform (:func:`host_platform`) is built
on this in :mod:`.canonical`; tests pin the host by patching this module's ``_host_spec`` /
``_host_os``, which the other rooms look up here.
"""

from __future__ import annotations

import functools
import platform as _stdlib_platform
import struct
import sys

from .types import Platform

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
