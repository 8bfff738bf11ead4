"""Property-based fuzzing (hypothesis) of everything that parses untrusted input.

* references: any text gives a Reference/LayoutReference or InvalidReferenceError, nothing else;
  what parses prints back to itself; references built from the grammar parse to their parts and
  round-trip through str() and the familiar form;
* manifests: any bytes give a Manifest/Index or ManifestError/DigestMismatchError; what parses
  survives every accessor and re-serializes its descriptors faithfully;
* platforms: any text gives a Platform or InvalidPlatformError, and format_all() parses back;
* the layer applier: random entry sequences (escaping names and links, whiteouts, devices,
  duplicates, PAX records) and random byte mutations of tar streams (plain, gzip, zstd) raise
  only ImagevolError subclasses and never write outside the root.

Fixed budget and reproducible: ``derandomize=True``, no example database, ``max_examples`` per
test chosen so the whole module stays well under 60 s on 2 cores.
Two inputs this suite found to crash imagevol (deeply nested JSON: RecursionError; an xattr name
with NUL: ValueError; both fixed in efdf02e) are in the strategies and pinned by regression tests
at the end.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from imagevol.digest import Digest
from imagevol.errors import (
    DigestMismatchError,
    ImagevolError,
    InvalidPlatformError,
    InvalidReferenceError,
    ManifestError,
)
from imagevol.manifest import Descriptor, Index, Manifest, flavour, parse_config, parse_manifest
from imagevol.platform import Platform, parse_platform, parse_platform_list
from imagevol.reference import LayoutReference, Reference, parse_any, parse_reference
from imagevol.unpack.applier import ApplyOptions, apply_layer
from tests.support.need import root_only

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)


def fuzz(max_examples: int) -> settings:
    """The module's settings with a fixed example budget."""
    return settings(FUZZ, max_examples=max_examples)


# --------------------------------------------------------------------------- references

_REF_TOKENS = [
    *"abcxyzAZ0189._-:/@[]%+ ",
    "sha256:",
    "sha512:",
    "oci:",
    "docker://",
    "localhost",
    "index.docker.io",
    "docker.io/",
    "library/",
    "[::1]",
    ":5000",
    "\x00",
    "é",
    "\udcff",
    "a" * 64,
    "0123456789abcdef" * 4,
    "0123456789abcdef" * 8,
    "x" * 130,
]
ref_text = st.one_of(
    st.lists(st.sampled_from(_REF_TOKENS), max_size=16).map("".join),
    st.text(max_size=80),
)


@fuzz(1000)
@given(ref_text)
def test_reference_parsing_is_total_and_round_trips(s: str) -> None:
    try:
        r = parse_any(s)
    except InvalidReferenceError as e:
        assert e.exit_code == 2 and e.message
        return
    assert isinstance(r, Reference | LayoutReference)
    again = parse_any(str(r))
    assert again == r, (s, str(r))
    assert str(again) == str(r)


_label = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)
_host = st.one_of(
    st.builds(
        lambda ls, tld: ".".join([*ls, tld]),
        st.lists(_label, min_size=1, max_size=3),
        st.sampled_from(["io", "com", "example"]),
    ),
    st.just("localhost"),
    st.builds(lambda a, b: f"10.{a}.{b}.1", st.integers(0, 255), st.integers(0, 255)),
    st.sampled_from(["[::1]", "[2001:db8::1]", "index.docker.io", "docker.io"]),
)
_domain = st.builds(lambda h, p: h + (f":{p}" if p else ""), _host, st.one_of(st.none(), st.integers(1, 65535)))
_component = st.from_regex(r"[a-z0-9]{1,6}(?:(?:\.|_|__|-{1,3})[a-z0-9]{1,6}){0,2}", fullmatch=True)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_digest = st.binary(min_size=1, max_size=8).map(lambda b: "sha256:" + hashlib.sha256(b).hexdigest())


@fuzz(500)
@given(
    st.one_of(st.none(), _domain),
    st.lists(_component, min_size=1, max_size=4),
    st.one_of(st.none(), _tag),
    st.one_of(st.none(), _digest),
)
def test_grammar_references_parse_to_their_parts(domain, comps, tag, digest) -> None:
    if domain is None:
        # Without a domain the first component must not read as one.
        assume("." not in comps[0] and comps[0] != "localhost" and not (len(comps) == 1 and len(comps[0]) == 64))
    path = "/".join(comps)
    s = (f"{domain}/" if domain else "") + path + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    if len(path) > 255:
        with pytest.raises(InvalidReferenceError):
            parse_reference(s)
        return
    r = parse_reference(s)
    want_domain = "docker.io" if domain in (None, "docker.io", "index.docker.io") else domain
    want_path = f"library/{path}" if want_domain == "docker.io" and len(comps) == 1 else path
    assert (r.domain, r.path) == (want_domain, want_path)
    assert r.tag == (tag if tag or digest else "latest")
    assert r.digest == digest
    assert parse_reference(str(r)) == r
    assert parse_reference(r.familiar()) == r


# --------------------------------------------------------------------------- manifests

_D = "sha256:" + "a" * 64
_KEYS = [
    "schemaVersion", "mediaType", "manifests", "layers", "config", "digest", "size", "annotations",
    "platform", "artifactType", "urls", "data", "subject", "os", "architecture", "variant",
    "os.features", "os.version", "rootfs", "diff_ids", "type", "org.opencontainers.image.title",
]  # fmt: skip
_VALUES = [
    2, 1, 0, 2.0, True, False, None, "", _D, "sha512:" + "b" * 128, "sha256:" + "A" * 64, "sha256:zz",
    "md5:abc", "e30=", "!!", -1, 10**30, "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json", "application/vnd.oci.empty.v1+json",
    "application/vnd.cncf.model.manifest.v1+json", "application/vnd.kitops.modelkit.config.v1+json",
    "application/vnd.docker.ai.gguf.v3", "../x", "\x00", "\udcff", "linux", "amd64",
]  # fmt: skip
_json = st.recursive(
    st.sampled_from(_VALUES),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(_KEYS), inner, max_size=7)),
    max_leaves=30,
)
_CTYPES = [
    None,
    "",
    "application/json",
    "text/plain",
    "application/vnd.oci.image.manifest.v1+json; charset=utf-8",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "text/html",
]


def _valid_manifest(data: bytes) -> bytes:
    layer = {
        "mediaType": "application/vnd.oci.image.layer.v1.tar",
        "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "annotations": {"org.opencontainers.image.title": "f"},
    }
    cfg = {
        "mediaType": "application/vnd.oci.empty.v1+json",
        "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest(),
        "size": 2,
        "data": base64.b64encode(b"{}").decode(),
    }
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/x",
            "config": cfg,
            "layers": [layer],
        }
    ).encode()


def _encode(doc: object) -> bytes:
    try:
        return json.dumps(doc).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return b"{}"


_MEDIA = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.empty.v1+json",
    "application/vnd.unknown.thing",
    "",
]
_descriptor = st.fixed_dictionaries(
    {
        "mediaType": st.sampled_from(_MEDIA),
        "digest": st.one_of(_digest, st.sampled_from(_VALUES)),
        "size": st.one_of(st.integers(0, 1 << 40), st.sampled_from(_VALUES)),
    },
    optional={
        "annotations": st.dictionaries(
            st.sampled_from(["org.opencontainers.image.title", "org.cncf.model.filepath", "k"]),
            st.one_of(st.text(max_size=8), st.sampled_from(_VALUES)),
            max_size=3,
        ),
        "platform": st.one_of(
            st.fixed_dictionaries(
                {
                    "os": st.sampled_from(["linux", "windows", ""]),
                    "architecture": st.sampled_from(["amd64", "arm64", "arm", "unknown"]),
                },
                optional={
                    "variant": st.sampled_from(["v7", "v8", ""]),
                    "os.features": st.lists(st.text(max_size=4), max_size=2),
                    "os.version": st.text(max_size=6),
                },
            ),
            st.sampled_from(_VALUES),
        ),
        "artifactType": st.sampled_from(_VALUES),
        "urls": st.one_of(st.lists(st.text(max_size=8), max_size=2), st.sampled_from(_VALUES)),
        "data": st.one_of(st.binary(max_size=8).map(lambda b: base64.b64encode(b).decode()), st.sampled_from(_VALUES)),
    },
)
_document = st.one_of(
    st.fixed_dictionaries(
        {
            "schemaVersion": st.sampled_from([2, 2, 2, 1, "2", None]),
            "config": _descriptor,
            "layers": st.lists(_descriptor, max_size=4),
        },
        optional={
            "mediaType": st.sampled_from(_MEDIA),
            "artifactType": st.sampled_from(_VALUES),
            "subject": _descriptor,
            "annotations": st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
            "manifests": st.lists(_descriptor, max_size=1),
        },
    ),
    st.fixed_dictionaries(
        {"schemaVersion": st.sampled_from([2, 2, 2, 1]), "manifests": st.lists(_descriptor, max_size=5)},
        optional={
            "mediaType": st.sampled_from(_MEDIA),
            "artifactType": st.sampled_from(_VALUES),
            "subject": _descriptor,
            "layers": st.lists(_descriptor, max_size=1),
        },
    ),
)
_deep_json = st.integers(1, 150_000).map(lambda n: b'{"schemaVersion":2,"layers":' + b"[" * n + b"]" * n + b"}")
_manifest_bytes = st.one_of(
    st.binary(max_size=300),
    _deep_json,
    _json.map(_encode),
    _document.map(_encode),
    st.builds(
        lambda data, flips: bytes(
            b ^ x if i in flips else b
            for i, (b, x) in enumerate(zip(_valid_manifest(data), b"\x55" * 4096, strict=False))
        ),
        st.binary(max_size=8),
        st.sets(st.integers(0, 600), max_size=3),
    ),
)


def _exercise(doc: Manifest | Index) -> None:
    descs = [doc.config, *doc.layers] if isinstance(doc, Manifest) else [*doc.manifests, *doc.ignored]
    for d in descs:
        assert isinstance(d.digest, Digest)
        again = Descriptor.from_dict(d.to_dict())
        assert again == d, (d, again)
        _ = d.title
    if isinstance(doc, Manifest):
        _ = (doc.kind, doc.total_size, doc.effective_artifact_type, flavour(doc))
    else:
        _ = doc.is_docker


@fuzz(1000)
@given(_manifest_bytes, st.sampled_from(_CTYPES), st.booleans())
def test_manifest_parsing_is_total(raw: bytes, content_type, with_digest: bool) -> None:
    expected = Digest("sha256:" + hashlib.sha256(raw).hexdigest()) if with_digest else None
    try:
        doc = parse_manifest(raw, content_type, expected_digest=expected)
    except (ManifestError, DigestMismatchError) as e:
        assert e.exit_code == 4 and e.message
    else:
        assert isinstance(doc, Manifest | Index)
        assert doc.raw == raw and str(doc.digest) == "sha256:" + hashlib.sha256(raw).hexdigest()
        _exercise(doc)
    try:
        cfg = parse_config(raw)
    except ManifestError:
        pass
    else:
        _ = (cfg.platform, cfg.runnable)
    if raw:  # the wrong digest is always refused, whatever the bytes
        with pytest.raises((ManifestError, DigestMismatchError)):
            parse_manifest(raw, content_type, expected_digest=Digest(_D))


# --------------------------------------------------------------------------- platforms

_PLAT_TOKENS = [
    *"linuxarm64amd/v78()+.%_-",
    "windows",
    "linux/",
    "arm64",
    "amd64",
    "arm/v7",
    "(10.0.17763+win32k)",
    "%2B",
    "%zz",
    "%ff",
    "\x00",
    "é",
    "*",
]


@fuzz(1000)
@given(st.one_of(st.lists(st.sampled_from(_PLAT_TOKENS), max_size=12).map("".join), st.text(max_size=40)))
def test_platform_parsing_is_total_and_round_trips(s: str) -> None:
    try:
        p = parse_platform(s)
    except InvalidPlatformError as e:
        assert e.exit_code == 2
    else:
        assert parse_platform(p.format_all()) == p, (s, p.format_all())
    try:
        for q in parse_platform_list(s):
            assert isinstance(q, Platform)
    except InvalidPlatformError:
        pass


@fuzz(500)
@given(
    st.dictionaries(
        st.sampled_from(["os", "architecture", "variant", "os.version", "os.features", "x"]), _json, max_size=5
    )
)
def test_platform_from_descriptor_json_is_total(d: dict) -> None:
    try:
        p = Platform.from_dict(d)
    except InvalidPlatformError:
        return
    assert Platform.from_dict(p.to_dict()) == Platform(
        p.os, p.architecture, p.variant, p.os_version, tuple(p.os_features)
    )


# --------------------------------------------------------------------------- the layer applier


class _Top:
    """A scratch directory holding ``outside`` (a host tree to protect) and one fresh layer root
    per example; ``changed()`` tells whether anything outside the root moved."""

    def __init__(self) -> None:
        self.top = Path(tempfile.mkdtemp(prefix="imagevol-fuzz-"))
        self.outside = self.top / "outside"
        (self.outside / "etc").mkdir(parents=True)
        (self.outside / "etc" / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
        (self.outside / "victim").write_bytes(b"do not touch")
        os.symlink("/etc", self.outside / "hostetc")
        self.n = 0
        self.before = self._state()

    def _state(self) -> tuple:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.outside):
            for name in sorted(dirnames + filenames):
                p = os.path.join(dirpath, name)
                st_ = os.lstat(p)
                data = Path(p).read_bytes() if os.path.isfile(p) and not os.path.islink(p) else b""
                out.append((p, st_.st_mode, st_.st_uid, st_.st_ino, st_.st_nlink, data))
        with open("/etc/passwd", "rb") as f:
            passwd = hashlib.sha256(f.read()).hexdigest()
        return tuple(out), passwd, sorted(os.listdir(self.top))

    def fresh_root(self) -> Path:
        self.n += 1
        root = self.top / "roots" / str(self.n)
        root.mkdir(parents=True)
        self.before = self._state()
        return root

    def check(self, root: Path) -> None:
        assert self._state() == self.before, "something outside the layer root changed"
        shutil.rmtree(root, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.top, ignore_errors=True)


@pytest.fixture(scope="module")
def scratch():
    t = _Top()
    yield t
    t.close()


def _components(out: str) -> st.SearchStrategy[str]:
    return st.sampled_from(
        [
            "a",
            "b",
            "etc",
            "passwd",
            "..",
            ".",
            "",
            ".wh.a",
            ".wh..wh..opq",
            ".wh..",
            "x" * 256,
            "d\udcff",
            out.lstrip("/"),
            "hostetc",
        ]
    )


def _entries(out: str):
    comp = _components(out)
    path = st.lists(comp, min_size=1, max_size=4).map("/".join)
    special = st.sampled_from(["/", "./", "", f"{out}/victim"])
    name = st.integers(0, 9).flatmap(lambda k: special if k == 9 else path)
    link = st.one_of(
        name,
        st.sampled_from(
            ["/", "/etc/passwd", f"{out}/etc/passwd", f"{out}/etc", "../" * 12 + out.lstrip("/"), "a/../../..", ""]
        ),
    )
    pax_records = st.dictionaries(
        st.sampled_from(
            [
                "path",
                "linkpath",
                "mtime",
                "uid",
                "gid",
                "SCHILY.xattr.user.k",
                "SCHILY.xattr.security.capability",
                "SCHILY.xattr.trusted.t",
                "SCHILY.xattr.user.a\x00b",
                "GNU.sparse.major",
            ]
        ),
        st.sampled_from(["", "0", "1", "-1", "1e30", "nan", "x", "..", "/etc/passwd", f"{out}/p", "a" * 300]),
        max_size=2,
    )
    pax = st.integers(0, 3).flatmap(lambda k: pax_records if k == 3 else st.just({}))
    entry = st.tuples(
        name,
        st.sampled_from(["file", "dir", "symlink", "hardlink", "fifo", "chr", "blk"]),
        link,
        st.sampled_from([0o644, 0o755, 0o4755, 0o7777, 0o000, 0o1777]),
        st.sampled_from([0, 1000, 65534, 2**21 - 1]),
        st.binary(max_size=40),
        pax,
    )
    return st.lists(entry, min_size=1, max_size=10)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
}


def _tar(entries, fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for name, kind, link, mode, uid, data, pax in entries:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = _TYPES[kind], mode, uid, uid, 1_700_000_000
            ti.linkname = link if kind in ("symlink", "hardlink") else ""
            ti.devmajor, ti.devminor = (1, 3) if kind in ("chr", "blk") else (0, 0)
            if fmt == tarfile.PAX_FORMAT:
                ti.pax_headers = dict(pax)
            if kind == "file":
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


_options = st.builds(
    ApplyOptions,
    devices=st.sampled_from(["skip", "refuse", "create"]),
    duplicates=st.sampled_from(["last", "refuse"]),
    setuid=st.sampled_from(["keep", "strip"]),
    whiteouts=st.sampled_from([True, True, True, False]),
    max_size=st.sampled_from([None] * 8 + [0, 700]),
    max_ratio=st.sampled_from([None] * 6 + [1.0]),
)


def _apply(scratch: _Top, data: bytes, options: ApplyOptions, compression: str | None) -> None:
    root = scratch.fresh_root()
    try:
        apply_layer(root, io.BytesIO(data), compression=compression, options=options, warn=lambda _m: None)
    except ImagevolError as e:
        assert e.exit_code in (1, 2, 4) and e.message
    finally:
        scratch.check(root)


@fuzz(400)
@given(st.data())
def test_applier_random_entry_sequences(scratch: _Top, data) -> None:
    out = str(scratch.outside)
    entries = data.draw(_entries(out))
    fmt = data.draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    try:
        layer = _tar(entries, fmt)
    except (ValueError, tarfile.TarError, UnicodeError):
        assume(False)
        return
    _apply(scratch, layer, data.draw(_options), None)


def _base_layers(out: str) -> list[bytes]:
    entries = [
        ("etc", "dir", "", 0o755, 0, b"", {}),
        ("etc/passwd", "file", "", 0o644, 0, b"inside\n", {}),
        ("l" * 150 + "/deep", "file", "", 0o644, 0, b"long", {}),
        ("s", "symlink", f"{out}/etc", 0o777, 0, b"", {}),
        ("s/x", "file", "", 0o644, 0, b"through", {}),
        ("h", "hardlink", "etc/passwd", 0o644, 0, b"", {}),
        ("up", "hardlink", "../../../etc/passwd", 0o644, 0, b"", {}),
        (".wh.gone", "file", "", 0o644, 0, b"", {}),
        ("p", "file", "", 0o644, 0, b"pax", {"path": "pax/" + "n" * 120, "mtime": "1.5"}),
        ("f", "fifo", "", 0o644, 0, b"", {}),
    ]
    return [
        _tar(entries, tarfile.PAX_FORMAT),
        _tar(entries, tarfile.GNU_FORMAT),
        _tar(entries[:4], tarfile.USTAR_FORMAT),
    ]


def _mutate(data: bytes, ops: list[tuple[int, int, bytes]]) -> bytes:
    b = bytearray(data)
    for op, pos, blob in ops:
        if not b:
            break
        i = pos % len(b)
        if op == 0:
            b[i] ^= blob[0] if blob else 0xFF
        elif op == 1:
            del b[i:]
        elif op == 2:
            b[i:i] = blob
        elif op == 3:
            start = i - i % 512
            b[start : start + 512] = bytes(512)
        else:
            start = i - i % 512
            b[start:start] = b[start : start + 512]
    return bytes(b)


_ops = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=16)), min_size=1, max_size=6
)


@fuzz(500)
@given(st.data())
def test_applier_mutated_streams(scratch: _Top, data) -> None:
    out = str(scratch.outside)
    base = data.draw(st.sampled_from(_base_layers(out)))
    how = data.draw(
        st.sampled_from(["plain", "gzip-then-mutate", "zstd-then-mutate", "mutate-then-gzip", "mutate-then-zstd"])
    )
    ops = data.draw(_ops)
    if how == "plain":
        layer, comp = _mutate(base, ops), None
    elif how.endswith("then-mutate"):
        packed = gzip.compress(base, mtime=0) if how.startswith("gzip") else zstandard.ZstdCompressor().compress(base)
        layer, comp = _mutate(packed, ops), data.draw(st.sampled_from([None, how.split("-")[0]]))
    else:
        mutated = _mutate(base, ops)
        layer = (
            gzip.compress(mutated, mtime=0) if how.endswith("gzip") else zstandard.ZstdCompressor().compress(mutated)
        )
        comp = None
    _apply(scratch, layer, data.draw(_options), comp)


# --------------------------------------------------------------------------- regressions (found here)


@pytest.mark.parametrize("parse", [parse_manifest, parse_config], ids=["manifest", "config"])
def test_deeply_nested_json_is_a_manifest_error(parse) -> None:
    """100,000 nested arrays (200 KB, well inside the 4 MiB cap) are malformed content, not a
    RecursionError escaping the parser (exit 1)."""
    with pytest.raises(ManifestError):
        parse(b'{"schemaVersion":2,"layers":' + b"[" * 100_000 + b"]" * 100_000 + b"}")


@root_only("xattrs are applied as root only")
def test_xattr_name_with_nul_is_not_an_unexpected_error(scratch: _Top) -> None:
    """A PAX record ``SCHILY.xattr.user.a<NUL>b``: os.setxattr raises ValueError for it, which
    must end as a warning or an ImagevolError, never escape apply_layer."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("f")
        ti.size, ti.pax_headers = 1, {"SCHILY.xattr.user.a\x00b": "v"}
        tf.addfile(ti, io.BytesIO(b"x"))
    root = scratch.fresh_root()
    try:
        try:
            apply_layer(root, io.BytesIO(buf.getvalue()), options=ApplyOptions(), warn=lambda _m: None)
        except ImagevolError:
            pass
    finally:
        scratch.check(root)
