"""The differential cases (input of scripts/truth) and how they are stored.

`python -m tests.truth.cases [SRC]` prints the cases as JSON (SRC, default /work/src, holds the
upstream sources whose test vectors are included: distribution+reference, containerd+platforms).
`python -m tests.truth.cases --store CASES ANSWERS` writes tests/truth/cases.json.gz and
answers.json.gz. scripts/gen-truth runs both around the Go program; the tests read the stored files.

The cases: every string literal of distribution/reference's reference_test.go and normalize_test.go
and of containerd/platforms' platforms_test.go, compare_test.go and platform_windows_compat_test.go,
plus generated references, platforms, and index layouts (platform-less mixes, nested indexes,
duplicates with zstd twins, arm/v5-v8 and amd64/v1-v4 variants, Windows os.version, artifacts and
unknown media types in indexes, Docker lists), each asked for a set of nodes.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CASES = HERE / "cases.json.gz"
ANSWERS = HERE / "answers.json.gz"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
ZSTD_ANNOTATION = "io.github.containers.compression.zstd"
UPSTREAM_TESTS = {
    "references": ("distribution+reference/reference_test.go", "distribution+reference/normalize_test.go"),
    "platforms": (
        "containerd+platforms/platforms_test.go",
        "containerd+platforms/compare_test.go",
        "containerd+platforms/platform_windows_compat_test.go",
    ),
}
_GO_STRING = re.compile(r'"((?:[^"\\\n]|\\.)*)"|`([^`]*)`')


def go_literals(path: Path) -> list[str]:
    """The string literals of a Go source file, in order, deduplicated."""
    out: list[str] = []
    for m in _GO_STRING.finditer(path.read_text()):
        if m.group(2) is not None:
            s = m.group(2)
        else:
            try:
                s = json.loads('"' + m.group(1) + '"')
            except ValueError:
                continue
        if s not in out and len(s) < 400:
            out.append(s)
    return out


# --- references --------------------------------------------------------------------------------
def generated_references() -> list[str]:
    d256 = "sha256:" + "a" * 64
    out = [
        "ubuntu",
        "192.168.1.1:75050/repo",
        "192.168.1.1:0/repo",
        "localhost:99999/a",
        "foo_bar.com/repo",
        "foo_bar.com:8080/repo",
        "docker.io/foo.com/bar",
        "docker.io/localhost/bar",
        "docker.io/foo:5000/bar",
        "index.docker.io/foo.com/bar",
        "index.docker.io/ubuntu",
        "docker.io/library/foo.com",
        "a/b:t@" + d256,
        "ubuntu:22.04@" + d256,
        "x@sha384:" + "b" * 96,
        "x@sha512:" + "c" * 128,
        "x@sha256:" + "A" * 64,
        "x@sha256:" + "a" * 63,
        "x@sha384:" + "b" * 95,
        "x@md5:" + "d" * 32,
        "x@sha1:" + "d" * 40,
        "x@" + "e" * 64,
        "a" * 64,
        "a" * 63,
        "[2001:db8::1]:5000/repo",
        "[2001:db8::1]/repo",
        "[fe80::1%eth0]:5000/repo",
        "[::1]/a:tag",
        "Uppercase:tag",
        "test.com:5000",
        "docker///docker",
        "-docker",
        "dock..er/docker",
        "a" * 255,
        "a/" + "b" * 252,
        "a/" + "b" * 253,
        "example.com/" + "c" * 255,
        "example.com/" + "c" * 256,
        "ubuntu:" + "t" * 128,
        "ubuntu:" + "t" * 129,
        "",
        ":tag",
        "@" + d256,
    ]
    domains = [
        "",
        "localhost/",
        "localhost:5000/",
        "example.com/",
        "Example.COM/",
        "ex_ample.com/",
        "1.2.3.4:65536/",
        "docker.io/",
        "index.docker.io/",
        "[::1]:5000/",
        "host:port/",
        "a.b.c:1/",
        "LOCALHOST/",
    ]
    paths = ["app", "org/app", "a.b/c", "a__b", "a___b", "a--b", "a-", "A", "a/B", "x/y/z", "a..b", "a._b"]
    suffixes = [
        "",
        ":v1",
        ":V1.0-rc_1",
        ":.bad",
        ":-bad",
        "@" + d256,
        ":v1@" + d256,
        "@sha512:" + "f" * 128,
        "@sha384:" + "9" * 96,
    ]
    for d, p, s in itertools.product(domains, paths, suffixes):
        out.append(d + p + s)
    return out


# --- platforms ---------------------------------------------------------------------------------
def generated_platform_specs() -> list[str]:
    out = [
        "windows(10.0.17763+win32k)/amd64",
        "windows(10.0.17763)/amd64",
        "linux(+f1)/amd64",
        "linux()/amd64",
        "linux(%2B)/amd64",
        "linux",
        "windows",
        "darwin",
        "amd64",
        "arm",
        "arm64",
        "armhf",
        "armel",
        "aarch64",
        "x86_64",
        "i386",
        "ppc64le",
        "s390x",
        "foo",
        "*",
        "linux/*",
        "linux/amd64/v2/extra",
        "",
        "/",
        "linux/",
        "Linux/AMD64",
        "macos/arm64",
        "linux/arm64/8",
        "linux/arm64/v8.0",
        "linux/arm64/9.0",
        "linux/arm/7",
        "linux/arm/5",
        "linux/amd64/v1",
        "linux/x86-64",
        "linux/aarch64/v8",
        "linux/arm/v9",
        "linux/arm64/v8.2",
        "linux/amd64/v3",
        "linux/riscv64",
        "linux/loong64",
        "linux/mips64le",
        "windows(10.0.20348.1)/amd64",
        "plan9/386",
        "linux/a b",
        "linux/arm/v7 ",
    ]
    return out


ARCHES = [
    ("amd64", ""),
    ("amd64", "v1"),
    ("amd64", "v2"),
    ("amd64", "v3"),
    ("amd64", "v4"),
    ("386", ""),
    ("x86_64", ""),
    ("i386", ""),
    ("arm64", ""),
    ("arm64", "v8"),
    ("arm64", "v8.0"),
    ("arm64", "v8.2"),
    ("arm64", "v9"),
    ("arm64", "v9.0"),
    ("arm64", "v8.10"),
    ("arm64", "8"),
    ("aarch64", ""),
    ("arm", ""),
    ("arm", "v5"),
    ("arm", "v6"),
    ("arm", "v7"),
    ("arm", "v8"),
    ("arm", "7"),
    ("armhf", ""),
    ("armel", ""),
    ("s390x", ""),
    ("ppc64le", ""),
    ("riscv64", ""),
]


def pdict(os_: str, arch: str, variant: str = "", osv: str = "", feats: list[str] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"architecture": arch, "os": os_}
    if variant:
        d["variant"] = variant
    if osv:
        d["os.version"] = osv
    if feats:
        d["os.features"] = feats
    return d


def generated_normalize() -> list[dict[str, Any]]:
    out = [pdict(o, a, v) for o in ("linux", "Linux", "macos", "windows", "") for a, v in ARCHES]
    out += [pdict("linux", a.upper(), v.upper()) for a, v in ARCHES]
    return out


WINDOWS_VERSIONS = [
    "",
    "10.0.17763",
    "10.0.17763.1",
    "10.0.17763.5820",
    "10.0.19041",
    "10.0.20348",
    "10.0.20348.2",
    "10.0.22621",
    "10.0.25398",
    "10.0.26100",
    "10.0.26100.3",
    "10.0.26200",
    "10.1.20348",
    "6.3.9600",
    "bogus",
    "10.0",
    "10.0.70000",
]
HOSTS = [pdict("linux", a, v) for a, v in ARCHES if a in ("amd64", "arm64", "arm", "386", "s390x")]
HOSTS += [pdict("windows", "amd64", "", osv) for osv in WINDOWS_VERSIONS[:12]]
HOSTS += [pdict("linux", "amd64", "", "", ["f1"]), pdict("windows", "amd64", "", "10.0.17763", ["win32k"])]


def generated_matches(parsed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cands = [pdict(o, a, v) for o in ("linux", "windows", "Linux") for a, v in ARCHES]
    cands += [pdict("windows", "amd64", "", osv) for osv in WINDOWS_VERSIONS]
    cands += [pdict("linux", "amd64", "", "", f) for f in (["f1"], ["other"], ["win32k"])]
    cands += [pdict("windows", "amd64", "", "10.0.17763", f) for f in (["win32k"], ["win32k", "other"])]
    cands += [pdict("unknown", "unknown"), pdict("", "amd64"), pdict("linux", "")]
    cands += parsed
    out = []
    for h in HOSTS + parsed[:12]:
        for i, c in enumerate(cands):
            case: dict[str, Any] = {"host": h, "candidate": c}
            if i % 3 == 0:
                case["other"] = cands[(i * 7 + 3) % len(cands)]
            out.append(case)
    return out


# --- layouts -----------------------------------------------------------------------------------
def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


class Blobs:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def add(self, data: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
        d = _sha(data)
        self.blobs[d] = data
        desc: dict[str, Any] = {"mediaType": media_type, "digest": d, "size": len(data)}
        desc.update({k: v for k, v in extra.items() if v is not None})
        return desc

    def image(
        self,
        tag: str,
        config: bytes | None = None,
        *,
        docker: bool = False,
        zstd: bool = False,
        artifact: str | None = None,
        config_type: str | None = None,
    ) -> dict[str, Any]:
        """A manifest (one layer named by `tag`); `config` raw bytes, default a linux/amd64 image config."""
        layer_type = DOCKER_LAYER_GZIP if docker else (OCI_LAYER_ZSTD if zstd else OCI_LAYER_GZIP)
        layer = self.add(tag.encode() + (b"-zstd" if zstd else b""), layer_type)
        cfg = (
            config
            if config is not None
            else _dumps(
                {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}
            )
        )
        ctype = config_type or (DOCKER_CONFIG if docker else OCI_CONFIG)
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
            "config": self.add(cfg, ctype),
            "layers": [layer],
        }
        if artifact:
            doc["artifactType"] = artifact
        return self.add(_dumps(doc), doc["mediaType"])

    def index(self, entries: list[dict[str, Any]], *, docker: bool = False) -> dict[str, Any]:
        mt = DOCKER_LIST if docker else OCI_INDEX
        return self.add(_dumps({"schemaVersion": 2, "mediaType": mt, "manifests": entries}), mt)


def _entry(desc: dict[str, Any], platform: dict[str, Any] | None = None, **ann: str) -> dict[str, Any]:
    e = dict(desc)
    if platform is not None:
        e["platform"] = platform
    if ann:
        e["annotations"] = {k.replace("_", "."): v for k, v in ann.items()}
    return e


CONFIGS: dict[str, bytes] = {
    "amd64": _dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}),
    "arm64": _dumps({"architecture": "arm64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}),
    "armv7": _dumps({"architecture": "arm", "os": "linux", "variant": "v7", "rootfs": {"type": "layers"}}),
    "noos": _dumps({"architecture": "amd64"}),
    "empty": b"{}",
    "null": b"null",
    "garbage": b"garbage",
    "array": b"[1,2]",
    "string": b'"linux"',
    "number-os": b'{"os": 5, "architecture": "amd64"}',
    "upper-keys": b'{"OS": "linux", "Architecture": "arm64"}',
    "features": b'{"os": "linux", "architecture": "amd64", "os.features": [1]}',
    "truncated": b'{"os": "linux"',
    "blank": b"",
}
NODES = [pdict("linux", "amd64"), pdict("linux", "arm64"), pdict("linux", "arm", "v7"), pdict("linux", "arm", "v6")]


def generated_layouts() -> tuple[dict[str, bytes], list[dict[str, Any]]]:
    b = Blobs()
    layouts: list[dict[str, Any]] = []

    def add(name: str, root: dict[str, Any], nodes: list[dict[str, Any]] | None = None) -> None:
        layouts.append({"name": name, "root": root, "nodes": nodes or NODES})

    # Every platform-less mix of up to three entries (OCI index and Docker list).
    kinds: dict[str, tuple[dict[str, Any] | None, str]] = {
        "P-amd64": (pdict("linux", "amd64"), "amd64"),
        "P-arm64": (pdict("linux", "arm64"), "arm64"),
        "P-armv7": (pdict("linux", "arm", "v7"), "armv7"),
        "N-amd64": (None, "amd64"),
        "N-arm64": (None, "arm64"),
        "N-empty": (None, "empty"),
        "N-garbage": (None, "garbage"),
        "N-array": (None, "array"),
    }
    for n in (1, 2, 3):
        for combo in itertools.product(sorted(kinds), repeat=n):
            for docker in (False, True):
                if docker and n == 3:
                    continue
                entries = []
                for i, k in enumerate(combo):
                    plat, cfg = kinds[k]
                    entries.append(_entry(b.image(f"{k}-{i}", CONFIGS[cfg], docker=docker), plat))
                add(f"mix{'-docker' if docker else ''}:{'+'.join(combo)}", b.index(entries, docker=docker))
    for name, cfg in CONFIGS.items():
        add(f"config:{name}", b.index([_entry(b.image(f"cfg-{name}", cfg))]))
        add(
            f"config-after:{name}",
            b.index([_entry(b.image(f"cfg2-{name}", cfg)), _entry(b.image("cfg2-arm64", CONFIGS["arm64"]))]),
        )
    # Nested indexes.
    inner_amd = b.index(
        [
            _entry(b.image("in-amd64"), pdict("linux", "amd64")),
            _entry(b.image("in-arm64", CONFIGS["arm64"]), pdict("linux", "arm64")),
        ]
    )
    inner_arm = b.index([_entry(b.image("in2-armv7", CONFIGS["armv7"]), pdict("linux", "arm", "v7"))])
    inner_nop = b.index([_entry(b.image("in3-none", CONFIGS["arm64"]))])
    top_amd = _entry(b.image("top-amd64"), pdict("linux", "amd64"))
    for combo in itertools.product(
        ["inner-amd-P", "inner-amd-N", "inner-arm-P", "inner-arm-N", "inner-nop-N", "top-amd64"], repeat=2
    ):
        entries = []
        for k in combo:
            if k == "top-amd64":
                entries.append(top_amd)
                continue
            inner = {"inner-amd": inner_amd, "inner-arm": inner_arm, "inner-nop": inner_nop}[k.rsplit("-", 1)[0]]
            plat = None
            if k.endswith("-P"):
                plat = pdict("linux", "arm", "v7") if "arm" in k.split("-")[1] else pdict("linux", "amd64")
            entries.append(_entry(inner, plat))
        add(f"nested:{'+'.join(combo)}", b.index(entries))
    add("nested:deep", b.index([_entry(b.index([_entry(inner_amd)]))]))
    # Duplicates for one platform, zstd twins.
    for zs in itertools.product([False, True], repeat=3):
        entries = []
        for i, z in enumerate(zs):
            ann = {"io_github_containers_compression_zstd": "true"} if z else {}
            entries.append(_entry(b.image(f"dup-{i}", zstd=z), pdict("linux", "amd64"), **ann))
        add(f"dup:{''.join('z' if z else 'g' for z in zs)}", b.index(entries))
        entries2 = [_entry(b.image("dup-arm", CONFIGS["arm64"]), pdict("linux", "arm64")), *entries]
        add(f"dup-arm-first:{''.join('z' if z else 'g' for z in zs)}", b.index(entries2))
    add(
        "dup:zstd-false",
        b.index(
            [
                _entry(b.image("dz-0"), pdict("linux", "amd64")),
                _entry(
                    b.image("dz-1", zstd=True), pdict("linux", "amd64"), io_github_containers_compression_zstd="false"
                ),
            ]
        ),
    )
    add(
        "dup:zstd-platformless",
        b.index(
            [
                _entry(b.image("dp-0"), None),
                _entry(b.image("dp-1", zstd=True), None, io_github_containers_compression_zstd="true"),
            ]
        ),
    )
    # Variants: arm/v5-v8 and arm, amd64/v1-v4; every subset, both orders.
    arm_nodes = [pdict("linux", "arm", v) for v in ("v5", "v6", "v7", "v8")] + [
        pdict("linux", "arm64"),
        pdict("linux", "arm64", "v8.2"),
    ]
    amd_nodes = [pdict("linux", "amd64", v) for v in ("", "v2", "v3", "v4")] + [pdict("linux", "386")]
    for family, variants, nodes in (
        ("arm", ["", "v5", "v6", "v7", "v8"], arm_nodes),
        ("amd64", ["", "v1", "v2", "v3", "v4"], amd_nodes),
    ):
        for r in (1, 2, 3):
            for subset in itertools.combinations(variants, r):
                for order in (subset, tuple(reversed(subset))) if r > 1 else (subset,):
                    entries = [_entry(b.image(f"{family}-{v or 'none'}"), pdict("linux", family, v)) for v in order]
                    add(f"variants:{family}:{','.join(v or '-' for v in order)}", b.index(entries), nodes)
    arm64_variants = ["", "v8", "v8.2", "v9"]
    for r in (1, 2):
        for order in itertools.permutations(arm64_variants, r):
            entries = [_entry(b.image(f"arm64-{v or 'none'}"), pdict("linux", "arm64", v)) for v in order]
            add(f"variants:arm64:{','.join(v or '-' for v in order)}", b.index(entries), arm_nodes)
    # Windows os.version.
    win_nodes = [
        pdict("windows", "amd64", "", v)
        for v in ("10.0.17763.1", "10.0.20348.5", "10.0.22621.1", "10.0.26100.1", "10.0.26200.2", "")
    ]
    win_versions = [
        "10.0.17763.4010",
        "10.0.20348.1",
        "10.0.20348.2000",
        "10.0.22621.1",
        "10.0.25398.1",
        "10.0.26100.1",
        "",
    ]
    for r in (1, 2):
        for order in itertools.permutations(win_versions, r):
            entries = [_entry(b.image(f"win-{v or 'none'}"), pdict("windows", "amd64", "", v)) for v in order]
            add(f"windows:{','.join(v or '-' for v in order)}", b.index(entries), win_nodes)
    entries = [
        _entry(b.image("win-lin"), pdict("linux", "amd64")),
        _entry(b.image("win-w"), pdict("windows", "amd64", "", "10.0.20348.1", ["win32k"])),
    ]
    add("windows:features", b.index(entries), win_nodes)
    add(
        "features:linux",
        b.index(
            [
                _entry(b.image("feat-1"), pdict("linux", "amd64", "", "", ["f1"])),
                _entry(b.image("feat-0"), pdict("linux", "amd64")),
            ]
        ),
        [pdict("linux", "amd64"), pdict("linux", "amd64", "", "", ["f1"])],
    )
    # Artifacts and unknown media types in indexes.
    art = b.image(
        "art", b"{}", artifact="application/vnd.example.model", config_type="application/vnd.oci.empty.v1+json"
    )
    art_img = b.image("art-img", artifact="application/vnd.example.sbom")
    unknown = b.add(b'{"x":1}', "application/vnd.example.unknown+json")
    for combo in itertools.product(["art-N", "art-P", "artimg-N", "unk-N", "unk-P", "img-P", "img-N"], repeat=2):
        entries = []
        for k in combo:
            desc = {"art": art, "artimg": art_img, "unk": unknown, "img": b.image("ai-img")}[k.split("-")[0]]
            entries.append(_entry(desc, pdict("linux", "amd64") if k.endswith("-P") else None))
        add(f"artifacts:{'+'.join(combo)}", b.index(entries))
    add(
        "attestation",
        b.index(
            [
                _entry(b.image("att-img"), pdict("linux", "amd64")),
                _entry(
                    b.image("att", b"{}"), pdict("unknown", "unknown"), vnd_docker_reference_type="attestation-manifest"
                ),
            ]
        ),
    )
    # Docker lists with unnormalized platforms.
    for arch, variant in (
        ("aarch64", ""),
        ("arm64", "v8"),
        ("x86_64", ""),
        ("arm", ""),
        ("armhf", ""),
        ("arm", "7"),
        ("AMD64", ""),
        ("arm64", ""),
    ):
        for docker in (False, True):
            entries = [_entry(b.image(f"raw-{arch}-{variant}", docker=docker), pdict("linux", arch, variant))]
            add(f"raw{'-docker' if docker else ''}:{arch}/{variant}", b.index(entries, docker=docker))
    # A single manifest (no index): taken as is.
    add("single", b.image("single"))
    return b.blobs, layouts


def build(src: Path) -> dict[str, Any]:
    refs: list[str] = []
    specs: list[str] = []
    for rel in UPSTREAM_TESTS["references"]:
        refs += go_literals(src / rel)
    for rel in UPSTREAM_TESTS["platforms"]:
        specs += go_literals(src / rel)
    refs = list(dict.fromkeys(refs + generated_references()))
    specs = list(dict.fromkeys(specs + generated_platform_specs()))
    parsed = [
        pdict(*m.groups(default="")) for s in specs if (m := re.fullmatch(r"(linux|windows)/(\w+)(?:/(\w+))?", s))
    ]
    blobs, layouts = generated_layouts()
    return {
        "references": refs,
        "platformParse": specs,
        "platformNormalize": generated_normalize(),
        "platformMatch": generated_matches(list({json.dumps(p): p for p in parsed}.values())),
        "blobs": {d: base64.b64encode(v).decode() for d, v in sorted(blobs.items())},
        "layouts": layouts,
    }


def load() -> tuple[dict[str, Any], dict[str, Any]]:
    with gzip.open(CASES, "rt") as f:
        cases = json.load(f)
    with gzip.open(ANSWERS, "rt") as f:
        answers = json.load(f)
    return cases, answers


def _store(obj: Any, path: Path) -> None:
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--store":
        cases = json.loads(Path(argv[1]).read_text())
        answers = json.loads(Path(argv[2]).read_text())
        _store(cases, CASES)
        _store(answers, ANSWERS)
        return 0
    src = Path(argv[0]) if argv else Path("/work/src")
    json.dump(build(src), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
