"""Table tests for imagevol.platform.

Vectors come from SPEC.md ("Runtime behaviour to know", "Grammar and matching facts") and from the
upstream test suites whose behaviour imagevol re-implements: containerd/platforms
(compare_test.go, platforms_test.go, defaults_test.go, platform_windows_compat_test.go,
cpuinfo_linux_test.go) and containers/image (internal/pkg/platform/platform_matcher_test.go).
"""

from __future__ import annotations

import pytest

import imagevol.platform.host as plat_host
from imagevol.errors import InvalidPlatformError, UsageError
from imagevol.platform import (
    ContainerdMatcher,
    CrioMatcher,
    Platform,
    host_platform,
    normalize,
    ordered_rank,
    parse_platform,
    parse_platform_list,
    wanted_platforms,
)


def P(s: str) -> Platform:
    return parse_platform(s)


def strs(platforms: list[Platform]) -> list[str]:
    return [str(p) for p in platforms]


@pytest.fixture(autouse=True)
def _pin_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs as if on linux/amd64, so host-dependent parses are deterministic."""
    monkeypatch.setattr(plat_host, "_host_spec", lambda: Platform("linux", "amd64"))
    monkeypatch.setattr(plat_host, "_host_os", lambda: "linux")


# ---------------------------------------------------------------------------------------------
# SPEC.md: containerd priority vectors (host -> accepted, best first)
# ---------------------------------------------------------------------------------------------

ARM_DOWN = ["linux/arm/v8", "linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("linux/amd64", ["linux/amd64", "linux/386"]),
        ("linux/amd64/v3", ["linux/amd64/v3", "linux/amd64/v2", "linux/amd64", "linux/386"]),
        (
            "linux/amd64/v4",
            ["linux/amd64/v4", "linux/amd64/v3", "linux/amd64/v2", "linux/amd64", "linux/386"],
        ),
        ("linux/amd64/v1", ["linux/amd64", "linux/386"]),
        ("linux/x86_64", ["linux/amd64", "linux/386"]),
        ("linux/arm64", ["linux/arm64", *ARM_DOWN]),
        ("linux/arm64/v8", ["linux/arm64", *ARM_DOWN]),
        ("linux/aarch64", ["linux/arm64", *ARM_DOWN]),
        ("linux/arm64/v8.2", ["linux/arm64/v8.2", "linux/arm64/v8.1", "linux/arm64", *ARM_DOWN]),
        (
            "linux/arm64/v9",
            [
                "linux/arm64/v9",
                *(f"linux/arm64/v8.{n}" for n in (5, 4, 3, 2, 1)),
                "linux/arm64",
                *ARM_DOWN,
            ],
        ),
        (
            "linux/arm64/v9.2",
            [
                "linux/arm64/v9.2",
                "linux/arm64/v9.1",
                "linux/arm64/v9",
                *(f"linux/arm64/v8.{n}" for n in (7, 6, 5, 4, 3, 2, 1)),
                "linux/arm64",
                *ARM_DOWN,
            ],
        ),
        ("linux/arm", ["linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]),
        ("linux/armhf", ["linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]),
        ("linux/arm/v8", ARM_DOWN),
        ("linux/arm/v6", ["linux/arm/v6", "linux/arm/v5"]),
        ("linux/armel", ["linux/arm/v6", "linux/arm/v5"]),
        ("linux/arm/v5", ["linux/arm/v5"]),
        ("linux/arm/v4", ["linux/arm/v4"]),
        ("linux/386", ["linux/386"]),
        ("linux/i386", ["linux/386"]),
        ("linux/s390x", ["linux/s390x"]),
        ("linux/riscv64", ["linux/riscv64"]),
        ("linux/arm64/v8.10", []),  # unknown arm64 variant: matches nothing
        ("linux/arm64/v10", []),
    ],
)
def test_containerd_priority_vector(host: str, expected: list[str]) -> None:
    assert strs(ContainerdMatcher(P(host)).accepted()) == expected


@pytest.mark.parametrize(
    "candidate", ["linux/arm64/v8.10", "linux/arm64", "linux/arm64/v8", "linux/arm/v7", "linux/arm64/v8.1"]
)
def test_unknown_arm64_variant_matches_nothing(candidate: str) -> None:
    m = ContainerdMatcher(P("linux/arm64/v8.10"))
    assert not m.match(P(candidate))
    assert m.rank(P(candidate)) is None


@pytest.mark.parametrize(
    ("host", "candidate", "rank"),
    [
        ("linux/amd64", "linux/amd64", 0),
        ("linux/amd64", "linux/386", 1),
        ("linux/amd64", "linux/x86_64", 0),
        ("linux/amd64/v3", "linux/amd64/v2", 1),
        ("linux/amd64/v3", "linux/amd64/v1", 2),
        ("linux/amd64/v3", "linux/386", 3),
        ("linux/arm64", "linux/arm/v7", 2),
        ("linux/arm64", "linux/armhf", 2),
        ("linux/arm64", "linux/arm", 2),
        ("linux/arm64", "linux/armel", 3),
        ("linux/arm64", "linux/aarch64/v8", 0),
        ("linux/arm64/v8.2", "linux/arm64", 2),
        ("linux/arm/v7", "linux/arm/v5", 2),
        ("linux/amd64", "linux/arm64", None),
    ],
)
def test_containerd_rank(host: str, candidate: str, rank: int | None) -> None:
    assert ContainerdMatcher(P(host)).rank(P(candidate)) == rank


# ---------------------------------------------------------------------------------------------
# containerd compare_test.go: TestOnly and TestOnlyStrict
# ---------------------------------------------------------------------------------------------

_ONLY: dict[str, dict[bool, list[str]]] = {
    "linux/amd64": {
        True: ["linux/amd64", "linux/386"],
        False: ["linux/amd64/v2", "linux/arm/v7", "linux/arm64", "windows/amd64", "windows/arm"],
    },
    "linux/amd64/v2": {
        True: ["linux/amd64", "linux/amd64/v1", "linux/amd64/v2", "linux/386"],
        False: [
            "linux/amd64/v3",
            "linux/amd64/v4",
            "linux/arm/v7",
            "linux/arm64",
            "windows/amd64",
            "windows/arm",
        ],
    },
    "linux/386": {
        True: ["linux/386"],
        False: ["linux/amd64", "linux/arm/v7", "linux/arm64", "windows/amd64", "windows/arm"],
    },
    "windows/amd64": {
        True: ["windows/amd64", "windows(10.0.17763)/amd64"],
        False: ["linux/amd64", "linux/arm/v7", "linux/arm64", "windows/arm"],
    },
    "linux/arm/v8": {
        True: ["linux/arm", "linux/arm/v5", "linux/arm/v6", "linux/arm/v7", "linux/arm/v8"],
        False: ["linux/amd64", "linux/arm/v4", "linux/arm64", "windows/amd64", "windows/arm"],
    },
    "linux/arm/v7": {
        True: ["linux/arm", "linux/arm/v5", "linux/arm/v6", "linux/arm/v7"],
        False: ["linux/amd64", "linux/arm/v4", "linux/arm/v8", "linux/arm64", "windows/amd64", "windows/arm"],
    },
    "linux/arm/v6": {
        True: ["linux/arm/v5", "linux/arm/v6"],
        False: [
            "linux/amd64",
            "linux/arm",
            "linux/arm/v4",
            "linux/arm/v7",
            "linux/arm/v8",
            "linux/arm64",
            "windows/amd64",
            "windows/arm",
        ],
    },
    "linux/arm/v5": {
        True: ["linux/arm/v5"],
        False: ["linux/amd64", "linux/arm", "linux/arm/v4", "linux/arm/v6", "linux/arm/v7", "linux/arm64"],
    },
    "linux/arm/v4": {
        True: ["linux/arm/v4"],
        False: ["linux/amd64", "linux/arm", "linux/arm/v5", "linux/arm/v6", "linux/arm/v7", "linux/arm64"],
    },
    "linux/arm64/v9.6": {
        True: [
            "linux/arm",
            "linux/arm/v5",
            "linux/arm/v6",
            "linux/arm/v7",
            "linux/arm/v8",
            "linux/arm64",
            "linux/arm64/v8",
            *(f"linux/arm64/v8.{n}" for n in range(1, 10)),
            "linux/arm64/v9",
            "linux/arm64/v9.0",
            *(f"linux/arm64/v9.{n}" for n in range(1, 7)),
        ],
        False: ["linux/amd64", "linux/arm/v4", "windows/amd64", "windows/arm", "linux/arm64/v8.10"],
    },
    "linux/arm64/v9": {
        True: [
            "linux/arm",
            "linux/arm/v5",
            "linux/arm/v6",
            "linux/arm/v7",
            "linux/arm/v8",
            "linux/arm64",
            "linux/arm64/v8",
            *(f"linux/arm64/v8.{n}" for n in range(1, 6)),
            "linux/arm64/v9",
            "linux/arm64/v9.0",
        ],
        False: ["linux/amd64", "linux/arm/v4", "windows/amd64", "windows/arm", "linux/arm64/v8.6"],
    },
    "linux/arm64/v8.1": {
        True: [
            "linux/arm",
            "linux/arm/v5",
            "linux/arm/v6",
            "linux/arm/v7",
            "linux/arm/v8",
            "linux/arm64",
            "linux/arm64/v8",
            "linux/arm64/v8.1",
        ],
        False: [
            "linux/amd64",
            "linux/arm/v4",
            "linux/arm/v9",
            "linux/arm64/v9",
            "windows/amd64",
            "windows/arm",
        ],
    },
    "linux/arm64": {
        True: [
            "linux/arm",
            "linux/arm/v5",
            "linux/arm/v6",
            "linux/arm/v7",
            "linux/arm/v8",
            "linux/arm64",
            "linux/arm64/v8",
        ],
        False: [
            "linux/amd64",
            "linux/arm/v4",
            "linux/arm/v9",
            "linux/arm64/v9",
            "windows/amd64",
            "windows/arm",
        ],
    },
}

_ONLY_STRICT: dict[str, dict[bool, list[str]]] = {
    "linux/amd64": {
        True: ["linux/amd64"],
        False: ["linux/386", "linux/arm/v7", "linux/arm64", "windows/amd64", "windows/arm"],
    },
    "linux/386": {
        True: ["linux/386"],
        False: ["linux/amd64", "linux/arm/v7", "linux/arm64", "windows/amd64", "windows/arm"],
    },
    "windows/amd64": {
        True: ["windows/amd64", "windows(10.0.17763)/amd64"],
        False: ["linux/amd64", "linux/arm/v7", "linux/arm64", "windows/arm"],
    },
    "windows(10.0.17763)/amd64": {
        True: ["windows/amd64", "windows(10.0.17763)/amd64"],
        False: ["linux/amd64", "linux/arm/v7", "linux/arm64", "windows/arm"],
    },
    "linux/arm/v8": {
        True: ["linux/arm/v8"],
        False: ["linux/arm", "linux/arm/v5", "linux/arm/v6", "linux/arm/v7", "linux/amd64", "linux/arm64"],
    },
    "linux/arm/v7": {
        True: ["linux/arm", "linux/arm/v7"],
        False: ["linux/arm/v5", "linux/arm/v6", "linux/amd64", "linux/arm/v4", "linux/arm/v8", "linux/arm64"],
    },
    "linux/arm/v6": {
        True: ["linux/arm/v6"],
        False: ["linux/arm/v5", "linux/amd64", "linux/arm", "linux/arm/v7", "linux/arm/v8", "linux/arm64"],
    },
    "linux/arm64/v9.5": {
        True: ["linux/arm64/v9.5"],
        False: [
            "linux/arm",
            "linux/arm/v8",
            "linux/arm64/v8",
            "linux/arm64/v8.1",
            "linux/arm64/v9",
            "linux/arm64/v9.1",
            "linux/arm64/v9.4",
        ],
    },
    "linux/arm64/v9": {
        True: ["linux/arm64/v9", "linux/arm64/v9.0"],
        False: ["linux/arm", "linux/arm/v8", "linux/arm/v9", "linux/arm64/v8", "linux/arm64/v8.1"],
    },
    "linux/arm64/v8.1": {
        True: ["linux/arm64/v8.1"],
        False: ["linux/arm", "linux/arm/v8", "linux/arm64/v8", "linux/arm64/v9", "windows/arm"],
    },
    "linux/arm64": {
        True: ["linux/arm64", "linux/arm64/v8"],
        False: [
            "linux/arm",
            "linux/arm/v7",
            "linux/arm/v8",
            "linux/amd64",
            "linux/arm64/v9",
            "windows/amd64",
        ],
    },
}


def _flatten(table: dict[str, dict[bool, list[str]]]) -> list[tuple[str, str, bool]]:
    return [(host, cand, ok) for host, by in table.items() for ok, cands in by.items() for cand in cands]


@pytest.mark.parametrize(("host", "candidate", "expected"), _flatten(_ONLY))
def test_containerd_only(host: str, candidate: str, expected: bool) -> None:
    assert ContainerdMatcher(P(host)).match(P(candidate)) is expected


@pytest.mark.parametrize(("host", "candidate", "expected"), _flatten(_ONLY_STRICT))
def test_containerd_only_strict(host: str, candidate: str, expected: bool) -> None:
    assert ContainerdMatcher(P(host), strict=True).match(P(candidate)) is expected


# ---------------------------------------------------------------------------------------------
# containerd: os.features (compare_test.go TestCompareOSFeatures, as Match results)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "candidate", "expected"),
    [
        ("linux/amd64", "linux/amd64", True),
        ("linux/amd64", "linux(+other)/amd64", False),
        ("linux(+none)/amd64", "linux/amd64", True),
        ("linux(+none)/amd64", "linux(+other)/amd64", False),
        ("linux(+other)/amd64", "linux(+other)/amd64", True),
        ("linux(+other)/amd64", "linux/amd64", True),
        ("linux(+af+other+zf)/amd64", "linux(+other)/amd64", True),
        ("linux(+af+other+zf)/amd64", "linux(+zf+af)/amd64", True),
        ("linux(+af+other+zf)/amd64", "linux(+bf)/amd64", False),
        ("linux(+f1+f2)/amd64", "linux(+f1+f2)/amd64", True),
        ("linux(+f1+f2)/amd64", "linux(+f2)/amd64", True),
        ("linux(+f1+f2)/amd64", "linux(+f1)/amd64", True),
        ("linux(+f1+f2)/amd64", "linux(+f1+f2+f3)/amd64", False),
        ("linux(+f1+f2)/amd64", "linux(+f2)/386", True),
        ("linux(7.2+other)/amd64", "linux(7.1)/amd64", True),  # os.version ignored off Windows
        ("linux(7.2+other)/amd64", "linux(7.2+other)/amd64", True),
        ("linux/amd64", "linux(+win32k)/amd64", False),  # only Windows implies win32k
        ("windows/amd64", "windows(+win32k)/amd64", True),
        ("windows(10.0.17763)/amd64", "windows(10.0.17763+win32k)/amd64", True),
        ("windows/amd64", "windows(+win32k+other)/amd64", False),
    ],
)
def test_containerd_os_features(host: str, candidate: str, expected: bool) -> None:
    """containerd's main branch (kept behind rules="main")."""
    assert ContainerdMatcher(P(host), rules="main").match(P(candidate)) is expected


@pytest.mark.parametrize(
    ("host", "candidate"),
    [
        ("linux/amd64", "linux(+other)/amd64"),
        ("linux(+f1+f2)/amd64", "linux(+f1+f2+f3)/amd64"),
        ("linux/amd64", "linux(+win32k)/amd64"),
        ("windows/amd64", "windows(+win32k+other)/amd64"),
    ],
)
def test_containerd21_ignores_os_features(host: str, candidate: str) -> None:
    """Issue 14 case 5: containerd 2.1 vendors containerd/platforms v1.0.0-rc.2, whose matcher ignores
    os.features: the default rules match what main refuses."""
    assert ContainerdMatcher(P(host)).match(P(candidate)) is True
    assert ContainerdMatcher(P(host), rules="main").match(P(candidate)) is False


def test_containerd21_parser_refuses_os_features() -> None:
    """Issue 14 case 5: rc.2's Parse takes only os(version): a feature list is an invalid OS component."""
    from imagevol.platform import parse_platform_containerd21

    with pytest.raises(InvalidPlatformError) as ei:
        parse_platform_containerd21("windows(10.0.17763+win32k)/amd64")
    assert ei.value.message.startswith('"windows(10.0.17763+win32k)" is an invalid OS component of')
    assert parse_platform_containerd21("windows(10.0.17763)/amd64") == Platform("windows", "amd64", "", "10.0.17763")
    assert P("windows(10.0.17763+win32k)/amd64").os_features == ("win32k",)  # main's grammar takes it


# ---------------------------------------------------------------------------------------------
# containerd: Windows os.version (platform_windows_compat_test.go, defaults_test.go, SPEC.md)
# ---------------------------------------------------------------------------------------------

RS5, LTSC2022, WIN11_22H2, V23H2, LTSC2025 = 17763, 20348, 22621, 25398, 26100


@pytest.mark.parametrize(
    ("host_build", "ctr_build", "runs"),
    [
        (RS5, RS5, True),
        (RS5, LTSC2022, False),
        (LTSC2022, RS5, False),
        (LTSC2022, LTSC2022, True),
        (WIN11_22H2, RS5, False),
        (WIN11_22H2, LTSC2022, True),
        (V23H2, RS5, False),
        (V23H2, LTSC2022, True),
        (LTSC2025, LTSC2022, True),
        (LTSC2022, LTSC2025, False),
        (LTSC2022, WIN11_22H2, False),
        (LTSC2025, WIN11_22H2, True),
        # SPEC: from the newest LTSC below the host up to the host
        (LTSC2025, LTSC2025, True),
        (LTSC2025, 26101, False),
        (WIN11_22H2, V23H2, False),
        (26200, LTSC2025, True),
        (26200, LTSC2022, False),
        (26200, 26200, True),
        (26200, 26300, False),
        (RS5, 17764, False),
        (RS5, 17762, False),
    ],
)
def test_windows_build_compat(host_build: int, ctr_build: int, runs: bool) -> None:
    host = Platform("windows", "amd64", os_version=f"10.0.{host_build}")
    image = Platform("windows", "amd64", os_version=f"10.0.{ctr_build}.1234")
    assert ContainerdMatcher(host).match(image) is runs


@pytest.mark.parametrize(
    ("host_version", "image_version", "expected"),
    [
        # TestMatchComparerMatch_ABICheckWCOW
        ("10.0.17763", "10.0.17763", True),
        ("10.0.17763", "10.0.20348", False),
        ("10.0.20348", "10.0.17763", False),
        ("10.0.20348", "10.0.20348", True),
        ("10.0.22621", "10.0.17763", False),
        ("10.0.22621", "10.0.20348", True),
        ("", "10.0.17763", True),
        ("", "", True),
        ("", "10.0.22621", True),
        # TestMatchComparerMatch_WCOW with a fixed host build
        ("10.0.17763", "10.0.17763.1", True),
        ("10.0.17763", "10.0.17763.2", True),
        ("10.0.17763", "10.0.17762.1", False),
        ("10.0.17763", "10.0.17764.1", False),
        ("10.0.17763", "", True),
        # TestFallbackOnOSVersion
        ("99.99.99.99", "", True),
        ("99.99.99.99", "10.0.17763", False),
        # major.minor must be equal
        ("10.0.26100", "6.3.9600", False),
        ("10.1.26100", "10.0.26100", False),
        # unparsable versions: an unparsable host matches everything, an unparsable image nothing
        ("10.0", "10.0.17763", True),
        ("abc", "10.0.17763", True),
        ("10.0.99999", "10.0.17763", True),
        ("10.0.17763", "10.0", False),
        ("10.0.17763", "10.0.x", False),
        ("10.0.17763", "+10.0.17763", False),
    ],
)
def test_windows_os_version(host_version: str, image_version: str, expected: bool) -> None:
    host = Platform("windows", "amd64", os_version=host_version)
    assert ContainerdMatcher(host).match(Platform("windows", "amd64", os_version=image_version)) is expected


@pytest.mark.parametrize(
    ("host", "candidate", "expected"),
    [
        # TestMatchComparerMatch_LCOW: a Linux matcher ignores os.version but needs linux
        ("linux/amd64", Platform("windows", "amd64"), False),
        ("linux/amd64", Platform("windows", "amd64", os_version="10.0.17763.2"), False),
        ("linux/amd64", Platform("linux", "amd64"), True),
        ("linux/amd64", Platform("linux", "amd64", os_version="10.0.17762.1"), True),
        # TestMatchComparerMatch_WCOW: a Windows matcher does not match Linux
        ("windows(10.0.17763)/amd64", Platform("linux", "amd64"), False),
        # the fallback arch (386) carries the os.version rule too
        ("windows(10.0.17763)/amd64", Platform("windows", "386", os_version="10.0.17763.1"), True),
        ("windows(10.0.17763)/amd64", Platform("windows", "386", os_version="10.0.20348.1"), False),
    ],
)
def test_windows_vs_linux(host: str, candidate: Platform, expected: bool) -> None:
    assert ContainerdMatcher(P(host)).match(candidate) is expected


def test_windows_platform_order_ws2025_host() -> None:
    # Test_PlatformOrder: both LTSC images run on a 2025 host, Linux does not.
    m = ContainerdMatcher(Platform("windows", "amd64", os_version="10.0.26100.2894"))
    assert m.match(Platform("windows", "amd64", os_version="10.0.20348.3091"))
    assert m.match(Platform("windows", "amd64", os_version="10.0.26100.3000"))
    assert not m.match(Platform("linux", "amd64"))
    assert not ContainerdMatcher(Platform("windows", "amd64", os_version="10.0.20348.3091")).match(
        Platform("windows", "amd64", os_version="10.0.26100.2894")
    )


# ---------------------------------------------------------------------------------------------
# containerd platforms_test.go: TestParseSelector (host pinned to linux/amd64)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected", "formatted", "matches"),
    [
        (
            "linux/arm64",
            Platform("linux", "arm64"),
            "linux/arm64",
            [
                Platform("linux", "aarch64"),
                Platform("linux", "aarch64", "v8"),
                Platform("linux", "arm64", "v8"),
            ],
        ),
        (
            "linux/arm64/v8",
            Platform("linux", "arm64", "v8"),
            "linux/arm64/v8",
            [Platform("linux", "aarch64"), Platform("linux", "aarch64", "v8"), Platform("linux", "arm64")],
        ),
        (
            "linux/arm",
            Platform("linux", "arm"),
            "linux/arm",
            [Platform("linux", "arm", "v7"), Platform("linux", "armhf"), Platform("linux", "arm", "7")],
        ),
        ("linux/arm/v6", Platform("linux", "arm", "v6"), "linux/arm/v6", [Platform("linux", "armel")]),
        (
            "linux/arm/v7",
            Platform("linux", "arm", "v7"),
            "linux/arm/v7",
            [Platform("linux", "arm"), Platform("linux", "armhf")],
        ),
        ("arm", Platform("linux", "arm"), "linux/arm", []),
        ("armel", Platform("linux", "arm", "v6"), "linux/arm/v6", []),
        ("armhf", Platform("linux", "arm"), "linux/arm", []),
        ("Aarch64", Platform("linux", "arm64"), "linux/arm64", []),
        ("x86_64", Platform("linux", "amd64"), "linux/amd64", []),
        ("Linux/x86_64", Platform("linux", "amd64"), "linux/amd64", []),
        ("i386", Platform("linux", "386"), "linux/386", []),
        ("linux", Platform("linux", "amd64"), "linux/amd64", []),
        ("s390x", Platform("linux", "s390x"), "linux/s390x", []),
        ("linux/s390x", Platform("linux", "s390x"), "linux/s390x", []),
        ("macOS", Platform("darwin", "amd64"), "darwin/amd64", []),
        ("windows", Platform("windows", "amd64"), "windows/amd64", []),
        ("amd64", Platform("linux", "amd64"), "linux/amd64", []),
        ("linux/amd64/v1", Platform("linux", "amd64"), "linux/amd64", []),
        ("linux/amd64/V3", Platform("linux", "amd64", "v3"), "linux/amd64/v3", []),
        ("linux/arm/7", Platform("linux", "arm", "v7"), "linux/arm/v7", []),
        ("linux/arm64/8", Platform("linux", "arm64", "v8"), "linux/arm64/v8", []),
        ("linux/arm64/v9.0", Platform("linux", "arm64", "v9"), "linux/arm64/v9", []),
        ("linux/armhf/v6", Platform("linux", "arm", "v7"), "linux/arm/v7", []),
        ("linux/i386/v9", Platform("linux", "386"), "linux/386", []),
        ("linux/arm64/v8.10", Platform("linux", "arm64", "v8.10"), "linux/arm64/v8.10", []),
        ("freebsd/riscv64", Platform("freebsd", "riscv64"), "freebsd/riscv64", []),
        ("plan9/unknownarch", Platform("plan9", "unknownarch"), "plan9/unknownarch", []),
    ],
)
def test_parse_selector(spec: str, expected: Platform, formatted: str, matches: list[Platform]) -> None:
    p = parse_platform(spec)
    assert p == expected
    m = ContainerdMatcher(p, strict=True)  # containerd NewMatcher
    assert m.match(expected)
    for candidate in matches:
        assert m.match(candidate), candidate
    assert str(p) == formatted
    assert str(parse_platform(formatted)) == formatted  # stable round trip


@pytest.mark.parametrize(
    ("spec", "expected", "formatted"),
    [
        ("windows()", Platform("windows", "amd64"), "windows/amd64"),
        ("windows(10.0.17763)", Platform("windows", "amd64", "", "10.0.17763"), "windows(10.0.17763)/amd64"),
        (
            "windows(10.0.17763+win32k)",
            Platform("windows", "amd64", "", "10.0.17763", ("win32k",)),
            "windows(10.0.17763+win32k)/amd64",
        ),
        ("linux(+gpu)", Platform("linux", "amd64", "", "", ("gpu",)), "linux(+gpu)/amd64"),
        ("linux(+gpu+simd)", Platform("linux", "amd64", "", "", ("gpu", "simd")), "linux(+gpu+simd)/amd64"),
        (
            "linux(+unsorted+erofs)",
            Platform("linux", "amd64", "", "", ("unsorted", "erofs")),
            "linux(+erofs+unsorted)/amd64",
        ),
        (
            "windows(10.0.17763%2Bbuild.42)",
            Platform("windows", "amd64", "", "10.0.17763+build.42"),
            "windows(10.0.17763%2Bbuild.42)/amd64",
        ),
        (
            "windows(10.0.17763%2Bbuild.42+win32k)",
            Platform("windows", "amd64", "", "10.0.17763+build.42", ("win32k",)),
            "windows(10.0.17763%2Bbuild.42+win32k)/amd64",
        ),
        ("windows(50%25done)", Platform("windows", "amd64", "", "50%done"), "windows(50%25done)/amd64"),
        (
            "windows(10.0.17763)/amd64",
            Platform("windows", "amd64", "", "10.0.17763"),
            "windows(10.0.17763)/amd64",
        ),
        (
            "Windows(10.0.20348)/ARM64",
            Platform("windows", "arm64", "", "10.0.20348"),
            "windows(10.0.20348)/arm64",
        ),
    ],
)
def test_parse_selector_format_all(spec: str, expected: Platform, formatted: str) -> None:
    p = parse_platform(spec)
    assert p == expected
    assert ContainerdMatcher(p, strict=True).match(expected)
    assert p.format_all() == formatted
    assert parse_platform(formatted).format_all() == formatted


@pytest.mark.parametrize(
    ("platform", "expected"),
    [
        (Platform("windows", "amd64", "", "10.0.17763+build.42"), "windows(10.0.17763%2Bbuild.42)/amd64"),
        (
            Platform("windows", "amd64", "", "10.0.17763+build.42", ("win32k",)),
            "windows(10.0.17763%2Bbuild.42+win32k)/amd64",
        ),
        (Platform("windows", "amd64", "", "50%done"), "windows(50%25done)/amd64"),
        (Platform("windows", "amd64", "", "1.0(beta)"), "windows(1.0%28beta%29)/amd64"),
        (Platform("windows", "amd64", "", "a/b"), "windows(a%2Fb)/amd64"),
        (Platform("windows", "amd64", "", "10.0.17763"), "windows(10.0.17763)/amd64"),
        (Platform("linux", "amd64", "", "", ("feat+v2",)), "linux(+feat%2Bv2)/amd64"),
        (Platform("linux", "amd64", "", "", ("100%gpu",)), "linux(+100%25gpu)/amd64"),
        (Platform("windows", "amd64", "", "10.0+build", ("feat+1",)), "windows(10.0%2Bbuild+feat%2B1)/amd64"),
    ],
)
def test_format_all_encoding_round_trip(platform: Platform, expected: str) -> None:
    assert platform.format_all() == expected
    back = parse_platform(expected)
    assert back.os_version == platform.os_version
    assert back.os_features == platform.os_features


@pytest.mark.parametrize(
    ("platform", "plain", "full"),
    [
        (
            Platform("linux", "amd64", "", "", ("", "gpu", "", "simd")),
            "linux/amd64",
            "linux(+gpu+simd)/amd64",
        ),
        (Platform("linux", "amd64", "", "", ("b", "a", "b")), "linux/amd64", "linux(+a+b)/amd64"),
        (Platform("linux", "amd64", "", "", ("",)), "linux/amd64", "linux/amd64"),
        (Platform("", "amd64"), "unknown", "unknown"),
        (Platform("linux", "arm", "v7"), "linux/arm/v7", "linux/arm/v7"),
        (Platform("linux", ""), "linux", "linux"),
        (Platform("windows", "amd64", "", "10.0.17763.1"), "windows/amd64", "windows(10.0.17763.1)/amd64"),
    ],
)
def test_format(platform: Platform, plain: str, full: str) -> None:
    assert str(platform) == plain
    assert platform.format_all() == full


# ---------------------------------------------------------------------------------------------
# Parse errors: the message names the bad part
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("", "empty"),  # TestParseSelectorInvalid
        ("/linux/arm", "''"),
        ("linux/arm/", "''"),
        ("linux /arm", "'linux '"),
        ("linux/&arm", "'&arm'"),
        ("linux/arm/foo/bar", "'bar'"),
        ("linux/arm/v7/extra/more", "'extra/more'"),
        ("*", "wildcard"),
        ("linux/*", "wildcard"),
        ("*/arm64", "wildcard"),
        ("linux//arm", "''"),
        ("linux/arm/v7 ", "'v7 '"),
        ("linux/arm/v@7", "'v@7'"),
        ("lin.ux/amd64", "'lin.ux'"),
        ("foo", "'foo'"),
        ("x86", "'x86'"),
        ("i686", "'i686'"),
        ("linux(10.0", "'linux(10.0'"),
        ("windows(10.0)x/amd64", "'windows(10.0)x'"),
        ("windows(10.0.17763++win32k)/amd64", "'windows(10.0.17763++win32k)'"),
        ("windows(10.0%zz)/amd64", "'%zz'"),
        ("windows(10%2)/amd64", "'%2'"),
        ("windows(%ff)/amd64", "UTF-8"),
        ("linux(+gpu%)/amd64", "'%'"),
        ("linux/amd64/v2/", "''"),
    ],
)
def test_parse_errors(spec: str, named: str) -> None:
    with pytest.raises(InvalidPlatformError) as info:
        parse_platform(spec)
    assert named in str(info.value)
    assert isinstance(info.value, UsageError)


def test_parse_error_has_hint() -> None:
    with pytest.raises(InvalidPlatformError) as info:
        parse_platform("linux/&arm")
    assert info.value.hint and "linux/arm64" in info.value.hint


@pytest.mark.parametrize("bad", [None, 5, b"linux/amd64"])
def test_parse_rejects_non_strings(bad: object) -> None:
    with pytest.raises(InvalidPlatformError):
        parse_platform(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Parsing depends on the host for lone OS / lone architecture
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "spec", "expected"),
    [
        (Platform("linux", "arm", "v6"), "linux", Platform("linux", "arm", "v6")),
        (Platform("linux", "arm", "v7"), "linux", Platform("linux", "arm")),
        (Platform("linux", "arm", "v8"), "linux", Platform("linux", "arm", "v8")),
        (Platform("linux", "arm64", "v8"), "linux", Platform("linux", "arm64")),
        (Platform("linux", "s390x"), "windows", Platform("windows", "s390x")),
        (Platform("darwin", "arm64", "v8"), "arm", Platform("darwin", "arm")),
        (Platform("darwin", "arm64", "v8"), "amd64", Platform("darwin", "amd64")),
    ],
)
def test_parse_lone_component_uses_host(
    monkeypatch: pytest.MonkeyPatch, host: Platform, spec: str, expected: Platform
) -> None:
    monkeypatch.setattr(plat_host, "_host_spec", lambda: host)
    monkeypatch.setattr(plat_host, "_host_os", lambda: host.os)
    assert parse_platform(spec) == expected


# ---------------------------------------------------------------------------------------------
# Normalization (containerd database.go)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (("linux", "x86_64", ""), ("linux", "amd64", "")),
        (("linux", "x86-64", ""), ("linux", "amd64", "")),
        (("linux", "AMD64", ""), ("linux", "amd64", "")),
        (("linux", "amd64", "v1"), ("linux", "amd64", "")),
        (("linux", "amd64", "V1"), ("linux", "amd64", "")),
        (("linux", "amd64", "v2"), ("linux", "amd64", "v2")),
        (("linux", "amd64", "v4"), ("linux", "amd64", "v4")),
        (("linux", "aarch64", ""), ("linux", "arm64", "")),
        (("linux", "aarch64", "v8"), ("linux", "arm64", "")),
        (("linux", "arm64", "v8"), ("linux", "arm64", "")),
        (("linux", "arm64", "8"), ("linux", "arm64", "")),
        (("linux", "arm64", "v8.0"), ("linux", "arm64", "")),
        (("linux", "arm64", "v8.2"), ("linux", "arm64", "v8.2")),
        (("linux", "arm64", "9"), ("linux", "arm64", "v9")),
        (("linux", "arm64", "9.0"), ("linux", "arm64", "v9")),
        (("linux", "arm64", "v9.0"), ("linux", "arm64", "v9")),
        (("linux", "arm64", "v9.1"), ("linux", "arm64", "v9.1")),
        (("linux", "armhf", ""), ("linux", "arm", "v7")),
        (("linux", "armhf", "v6"), ("linux", "arm", "v7")),
        (("linux", "armel", ""), ("linux", "arm", "v6")),
        (("linux", "arm", ""), ("linux", "arm", "v7")),
        (("linux", "arm", "7"), ("linux", "arm", "v7")),
        (("linux", "arm", "5"), ("linux", "arm", "v5")),
        (("linux", "arm", "6"), ("linux", "arm", "v6")),
        (("linux", "arm", "8"), ("linux", "arm", "v8")),
        (("linux", "arm", "4"), ("linux", "arm", "4")),
        (("linux", "arm", "V7"), ("linux", "arm", "v7")),
        (("linux", "i386", "v9"), ("linux", "386", "")),
        (("linux", "i686", ""), ("linux", "i686", "")),  # containerd does not map i686
        (("linux", "386", ""), ("linux", "386", "")),
        (("Linux", "PPC64LE", ""), ("linux", "ppc64le", "")),
        (("macos", "arm64", ""), ("darwin", "arm64", "")),
        (("MacOS", "arm64", ""), ("darwin", "arm64", "")),
        (("Windows", "amd64", ""), ("windows", "amd64", "")),
        (("", "amd64", ""), ("linux", "amd64", "")),  # empty OS -> this host's OS
        (("unknown", "unknown", ""), ("unknown", "unknown", "")),
    ],
)
def test_normalize(raw: tuple[str, str, str], expected: tuple[str, str, str]) -> None:
    n = normalize(Platform(*raw))
    assert (n.os, n.architecture, n.variant) == expected
    assert normalize(n) == n  # idempotent


def test_normalize_features_and_version() -> None:
    p = Platform("windows", "amd64", "", "10.0.17763.1", ("b", "a", "b"))
    assert normalize(p) == Platform("windows", "amd64", "", "10.0.17763.1", ("a", "b"))


# ---------------------------------------------------------------------------------------------
# CRI-O / containers/image (platform_matcher_test.go and SPEC.md)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (("linux", "amd64", ""), ["linux/amd64"]),
        (("linux", "arm", "v6"), ["linux/arm/v6", "linux/arm/v5", "linux/arm"]),
        (("linux", "arm", ""), ["linux/arm", "linux/arm/v8", "linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]),
        (("linux", "arm64", ""), ["linux/arm64", "linux/arm64/v8"]),
        (("freeBSD", "armel", "custom"), ["freeBSD/armel/custom", "freeBSD/armel"]),
        (("linux", "arm64", "v8"), ["linux/arm64/v8", "linux/arm64"]),
        (("linux", "arm64", "v9"), ["linux/arm64/v9", "linux/arm64"]),
        (
            ("linux", "arm", "v8"),
            ["linux/arm/v8", "linux/arm/v7", "linux/arm/v6", "linux/arm/v5", "linux/arm"],
        ),
        (("linux", "amd64", "v3"), ["linux/amd64/v3", "linux/amd64"]),
    ],
)
def test_wanted_platforms(choice: tuple[str, str, str], expected: list[str]) -> None:
    assert strs(wanted_platforms(*choice)) == expected


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        ("linux/amd64", ["linux/amd64"]),
        ("linux/amd64/v3", ["linux/amd64"]),  # CRI-O never detects amd64 levels
        ("linux/arm64", ["linux/arm64/v8", "linux/arm64"]),  # getCPUVariant: v8 on every arm64
        ("linux/aarch64", ["linux/arm64/v8", "linux/arm64"]),
        ("linux/arm64/v8.2", ["linux/arm64/v8", "linux/arm64"]),
        ("linux/arm", ["linux/arm/v7", "linux/arm/v6", "linux/arm/v5", "linux/arm"]),
        ("linux/arm/v7", ["linux/arm/v7", "linux/arm/v6", "linux/arm/v5", "linux/arm"]),
        ("linux/arm/v6", ["linux/arm/v6", "linux/arm/v5", "linux/arm"]),
        ("linux/armel", ["linux/arm/v6", "linux/arm/v5", "linux/arm"]),
        ("linux/arm/v8", ["linux/arm/v8", "linux/arm/v7", "linux/arm/v6", "linux/arm/v5", "linux/arm"]),
        ("linux/arm/v4", ["linux/arm/v4", "linux/arm"]),
        ("linux/386", ["linux/386"]),
        ("linux/s390x", ["linux/s390x"]),
        ("Linux/X86_64", ["linux/amd64"]),
        ("darwin/arm64", ["darwin/arm64/v8", "darwin/arm64"]),
        ("windows/arm/v6", ["windows/arm/v7", "windows/arm/v6", "windows/arm/v5", "windows/arm"]),
    ],
)
def test_crio_accepted(node: str, expected: list[str]) -> None:
    assert strs(CrioMatcher(P(node)).accepted()) == expected


@pytest.mark.parametrize(
    ("node", "candidate", "rank"),
    [
        ("linux/amd64", Platform("linux", "amd64"), 0),
        ("linux/amd64", Platform("linux", "386"), None),  # no amd64 -> 386 in CRI-O
        ("linux/amd64", Platform("linux", "amd64", "v1"), None),  # exact strings only
        ("linux/amd64", Platform("linux", "amd64", "v2"), None),
        ("linux/amd64", Platform("linux", "x86_64"), None),  # index entries are not normalized
        ("linux/amd64", Platform("Linux", "amd64"), None),
        ("linux/amd64", Platform("unknown", "unknown"), None),  # not a wildcard
        ("linux/amd64", Platform("linux", "amd64", os_version="5.15"), 0),  # os.version ignored
        ("linux/amd64", Platform("linux", "amd64", os_features=("gpu",)), 0),  # os.features ignored
        ("linux/arm64", Platform("linux", "arm64", "v8"), 0),
        ("linux/arm64", Platform("linux", "arm64"), 1),
        ("linux/arm64", Platform("linux", "aarch64"), None),
        ("linux/arm64", Platform("linux", "arm", "v7"), None),  # no arm64 -> arm in CRI-O
        ("linux/arm64", Platform("linux", "arm64", "v8.2"), None),
        ("linux/arm64", Platform("linux", "amd64"), None),  # cri-o#8781
        ("linux/arm", Platform("linux", "arm", "v7"), 0),
        ("linux/arm", Platform("linux", "arm", "v6"), 1),
        ("linux/arm", Platform("linux", "arm", "v5"), 2),
        ("linux/arm", Platform("linux", "arm"), 3),
        ("linux/arm", Platform("linux", "arm", "v8"), None),
        ("linux/arm", Platform("linux", "armhf"), None),
        ("linux/arm", Platform("linux", "arm", "7"), None),
        ("windows(10.0.20348)/amd64", Platform("windows", "amd64", os_version="10.0.17763"), 0),
    ],
)
def test_crio_rank(node: str, candidate: Platform, rank: int | None) -> None:
    m = CrioMatcher(P(node))
    assert m.rank(candidate) == rank
    assert m.match(candidate) is (rank is not None)


@pytest.mark.parametrize(
    ("candidate", "containerd", "crio"),
    [
        (Platform("linux", "aarch64"), True, False),
        (Platform("linux", "arm64", "v8"), True, True),
        (Platform("linux", "arm", "v7"), True, False),
        (Platform("Linux", "ARM64"), True, False),
        (Platform("linux", "arm64", "v8.1"), False, False),
        (Platform("linux", "amd64"), False, False),
    ],
)
def test_runtimes_differ_on_arm64_node(candidate: Platform, containerd: bool, crio: bool) -> None:
    node = P("linux/arm64")
    assert ContainerdMatcher(node).match(candidate) is containerd
    assert CrioMatcher(node).match(candidate) is crio


# ---------------------------------------------------------------------------------------------
# Preference lists and ordered_rank
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("linux/arm64,linux/amd64", ["linux/arm64", "linux/amd64"]),
        ("linux/amd64", ["linux/amd64"]),
        (" linux/arm64 , linux/amd64 ", ["linux/arm64", "linux/amd64"]),
        ("linux/amd64,linux/arm64,linux/amd64", ["linux/amd64", "linux/arm64"]),
        ("linux/amd64,linux/x86_64,amd64", ["linux/amd64"]),
        ("linux/arm,linux/arm/v7,linux/armhf", ["linux/arm"]),  # same after normalization
        ("linux/arm64/v8,linux/arm64", ["linux/arm64/v8"]),
        ("linux/arm/v6,linux/arm", ["linux/arm/v6", "linux/arm"]),
        ("windows(10.0.17763)/amd64,windows(10.0.20348)/amd64", ["windows/amd64", "windows/amd64"]),
    ],
)
def test_parse_platform_list(spec: str, expected: list[str]) -> None:
    assert strs(parse_platform_list(spec)) == expected


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("", "item 1 is empty"),
        ("linux/amd64,", "item 2 is empty"),
        (",linux/amd64", "item 1 is empty"),
        ("linux/amd64,,linux/arm64", "item 2 is empty"),
        ("linux/amd64, ,linux/arm64", "item 2 is empty"),
        ("linux/amd64,linux/&arm", "'&arm'"),
    ],
)
def test_parse_platform_list_errors(spec: str, named: str) -> None:
    with pytest.raises(InvalidPlatformError) as info:
        parse_platform_list(spec)
    assert named in str(info.value)


@pytest.mark.parametrize(
    ("nodes", "candidate", "expected"),
    [
        ("linux/arm64,linux/amd64", "linux/amd64", (1, 0)),
        ("linux/arm64,linux/amd64", "linux/arm64", (0, 0)),
        ("linux/arm64,linux/amd64", "linux/arm/v7", (0, 2)),
        ("linux/arm64,linux/amd64", "linux/386", (1, 1)),
        ("linux/arm64,linux/amd64", "linux/s390x", None),
        ("linux/amd64,linux/arm64", "linux/arm/v6", (1, 3)),
    ],
)
def test_ordered_rank_containerd(nodes: str, candidate: str, expected: tuple[int, int] | None) -> None:
    matchers = [ContainerdMatcher(p) for p in parse_platform_list(nodes)]
    assert ordered_rank(matchers, P(candidate)) == expected


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [
        (Platform("linux", "arm64", "v8"), (0, 0)),
        (Platform("linux", "arm64"), (0, 1)),
        (Platform("linux", "amd64"), (1, 0)),
        (Platform("linux", "arm", "v7"), None),
        (Platform("linux", "386"), None),
    ],
)
def test_ordered_rank_crio(candidate: Platform, expected: tuple[int, int] | None) -> None:
    matchers = [CrioMatcher(p) for p in parse_platform_list("linux/arm64,linux/amd64")]
    assert ordered_rank(matchers, candidate) == expected


def test_ordered_rank_mixed_and_empty() -> None:
    mixed = [CrioMatcher(P("linux/arm64")), ContainerdMatcher(P("linux/arm64"))]
    assert ordered_rank(mixed, Platform("linux", "arm", "v7")) == (1, 2)
    assert ordered_rank([], Platform("linux", "amd64")) is None


# ---------------------------------------------------------------------------------------------
# OCI JSON
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("d", "expected"),
    [
        ({"os": "linux", "architecture": "amd64"}, Platform("linux", "amd64")),
        ({"os": "linux", "architecture": "arm64", "variant": "v8"}, Platform("linux", "arm64", "v8")),
        ({"architecture": "aarch64"}, Platform("", "aarch64")),  # no normalization
        ({}, Platform("", "")),
        ({"os": "linux", "architecture": "amd64", "variant": None}, Platform("linux", "amd64")),
        (
            {
                "os": "windows",
                "architecture": "amd64",
                "os.version": "10.0.17763.1",
                "os.features": ["win32k"],
            },
            Platform("windows", "amd64", "", "10.0.17763.1", ("win32k",)),
        ),
        ({"os": "linux", "architecture": "amd64", "features": ["sse4"]}, Platform("linux", "amd64")),
        ({"os": "unknown", "architecture": "unknown"}, Platform("unknown", "unknown")),
    ],
)
def test_from_dict(d: dict[str, object], expected: Platform) -> None:
    assert Platform.from_dict(d) == expected


@pytest.mark.parametrize(
    "d",
    [
        {"os": 1, "architecture": "amd64"},
        {"os": "linux", "architecture": ["amd64"]},
        {"os": "linux", "architecture": "amd64", "os.features": "win32k"},
        {"os": "linux", "architecture": "amd64", "os.features": [1]},
        ["linux", "amd64"],
    ],
)
def test_from_dict_rejects_bad_types(d: object) -> None:
    with pytest.raises(InvalidPlatformError):
        Platform.from_dict(d)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("platform", "expected"),
    [
        (Platform("linux", "amd64"), {"architecture": "amd64", "os": "linux"}),
        (Platform("linux", "arm", "v7"), {"architecture": "arm", "os": "linux", "variant": "v7"}),
        (
            Platform("windows", "amd64", "", "10.0.17763.1", ("win32k",)),
            {
                "architecture": "amd64",
                "os": "windows",
                "os.version": "10.0.17763.1",
                "os.features": ["win32k"],
            },
        ),
        (Platform("", ""), {}),
    ],
)
def test_to_dict(platform: Platform, expected: dict[str, object]) -> None:
    assert platform.to_dict() == expected
    assert Platform.from_dict(platform.to_dict()) == platform


def test_platform_value_semantics() -> None:
    p = Platform("linux", "amd64", os_features=["b", "a"])  # type: ignore[arg-type]
    assert p.os_features == ("b", "a")
    assert hash(p) == hash(Platform("linux", "amd64", os_features=("b", "a")))
    with pytest.raises(AttributeError):
        p.os = "windows"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Host detection (containerd DefaultSpec + cpuinfo_linux.go)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("aarch64", "8"),  # TestGetCPUVariantFromArch
        ("Armv8", "8"),
        ("armv7", "7"),
        ("armv6", "6"),
        ("armv5", "5"),
        ("armv4", "4"),
        ("armv3", "3"),
        ("armv9", "unknown"),
        ("armxxxx", None),
        ("armv", None),
        ("armv7l", "7"),
        ("x86_64", None),
    ],
)
def test_cpu_variant_from_machine(machine: str, expected: str | None) -> None:
    assert plat_host._cpu_variant_from_machine(machine) == expected


_CPUINFO_ARM64 = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
_CPUINFO_ARMV7 = "processor\t: 0\nmodel name\t: ARMv7 Processor rev 4 (v7l)\nCPU architecture: 7\n"
_CPUINFO_RPI1 = "processor\t: 0\nmodel name\t: ARMv6-compatible processor rev 7 (v6l)\nCPU architecture: 7\n"
_CPUINFO_ARMV5 = "Processor\t: ARM926EJ-S rev 5 (v5l)\nCPU architecture: 5TEJ\n"
_CPUINFO_X86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)\n"


@pytest.mark.parametrize(
    ("goos", "machine", "bits", "cpuinfo", "expected"),
    [
        ("linux", "x86_64", 64, _CPUINFO_X86, Platform("linux", "amd64")),
        ("linux", "x86_64", 32, _CPUINFO_X86, Platform("linux", "386")),
        ("linux", "i686", 32, _CPUINFO_X86, Platform("linux", "386")),
        ("linux", "aarch64", 64, _CPUINFO_ARM64, Platform("linux", "arm64")),
        ("linux", "aarch64", 64, None, Platform("linux", "arm64")),
        ("linux", "aarch64", 32, _CPUINFO_ARM64, Platform("linux", "arm", "v8")),
        ("linux", "armv7l", 32, _CPUINFO_ARMV7, Platform("linux", "arm", "v7")),
        ("linux", "armv6l", 32, _CPUINFO_RPI1, Platform("linux", "arm", "v6")),
        ("linux", "armv5tejl", 32, _CPUINFO_ARMV5, Platform("linux", "arm", "v5")),
        ("linux", "armv7l", 32, "processor : 0\n", Platform("linux", "arm", "v7")),  # uname fallback
        ("linux", "armv6l", 32, None, Platform("linux", "arm", "v6")),
        ("linux", "ppc64le", 64, None, Platform("linux", "ppc64le")),
        ("linux", "s390x", 64, None, Platform("linux", "s390x")),
        ("linux", "riscv64", 64, None, Platform("linux", "riscv64")),
        ("linux", "loongarch64", 64, None, Platform("linux", "loong64")),
        ("darwin", "arm64", 64, None, Platform("darwin", "arm64")),
        ("darwin", "x86_64", 64, None, Platform("darwin", "amd64")),
    ],
)
def test_detect_host(goos: str, machine: str, bits: int, cpuinfo: str | None, expected: Platform) -> None:
    assert normalize(plat_host._detect_host(goos, machine, bits, cpuinfo)) == expected


def test_detect_host_windows_os_version() -> None:
    raw = plat_host._detect_host("windows", "AMD64", 64, None, (10, 0, 20348))
    assert normalize(raw) == Platform("windows", "amd64", "", "10.0.20348")
    assert raw.format_all() == "windows(10.0.20348)/amd64"


def test_detect_host_raw_arm64_variant_is_v8() -> None:
    # containerd DefaultSpec carries v8 before Normalize drops it
    assert plat_host._detect_host("linux", "aarch64", 64, _CPUINFO_ARM64).variant == "v8"


def test_host_platform_is_normalized(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plat_host, "_host_spec", lambda: Platform("linux", "arm64", "v8"))
    assert host_platform() == Platform("linux", "arm64")
    monkeypatch.setattr(plat_host, "_host_spec", lambda: Platform("linux", "arm", ""))
    assert host_platform() == Platform("linux", "arm", "v7")


def test_real_host_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real machine, not the pinned one
    h = host_platform()
    assert h == normalize(h)
    assert h.os and h.architecture
    assert ContainerdMatcher(h).match(h)
    assert CrioMatcher(h).accepted()[0].architecture == h.architecture


def test_matcher_repr() -> None:
    assert "linux/arm64" in repr(ContainerdMatcher(P("linux/arm64")))
    assert "OnlyStrict" in repr(ContainerdMatcher(P("linux/arm64"), strict=True))
    assert "linux/arm64" in repr(CrioMatcher(P("linux/arm64")))
