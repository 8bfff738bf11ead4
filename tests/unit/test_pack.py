"""Packing without a registry: deterministic tars, layer split, index sharing, ModelPack kinds,
artifact tree layers, compression determinism, the OCI layout sink."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard

from imagevol import mediatypes as mt
from imagevol.digest import digest_bytes
from imagevol.errors import ImagevolError, UsageError
from imagevol.manifest import Index, Manifest, parse_config, parse_manifest
from imagevol.pack import (
    DEFAULT_PLATFORMS,
    TREE_TITLE,
    build,
    modelpack_kind,
    pack,
    plan_image_layers,
    scan_tree,
)
from imagevol.pack.tarwriter import LayerWriter, TarParts, TarWriter
from imagevol.reference import parse_layout_reference
from imagevol.sinks import Blob, FileRange, hash_blob
from imagevol.sinks import digestcache as dc
from imagevol.sinks.digestcache import DigestCache
from imagevol.sinks.layout import LayoutSink
from imagevol.sinks.registry import _Body
from imagevol.sources.layout import LayoutSource

MiB = 1 << 20


def make_tree(root: Path, *, big: int = 2 * MiB, seed: bytes = b"x") -> Path:
    """A small model directory with every kind of entry pack handles."""
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"hidden": 8}')
    (root / "README.md").write_text("# tiny\n")
    (root / "model-00001.safetensors").write_bytes(hashlib.sha256(seed).digest() * (big // 32))
    (root / "model-00002.safetensors").write_bytes(hashlib.sha256(seed + b"2").digest() * (big // 32))
    os.link(root / "model-00001.safetensors", root / "alias.safetensors")
    (root / "tok").mkdir()
    (root / "tok" / "tokenizer.json").write_text("{}")
    (root / "tok" / "vocab.txt").write_text("a\nb\n")
    os.link(root / "tok" / "vocab.txt", root / "tok" / "vocab-copy.txt")
    (root / "empty").mkdir()
    (root / "private").mkdir(mode=0o700)
    (root / "private").chmod(0o700)
    (root / "private" / "secret").write_text("s")
    (root / "private" / "secret").chmod(0o600)
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "latest").symlink_to("model-00001.safetensors")
    (root / "dangling").symlink_to("../nowhere")
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text('{"x":1}\n')
    (root / ("ünïcode-" + "n" * 120)).write_text("long non-ascii name")
    return root


def members(data: bytes, compression: str = "none") -> list[tarfile.TarInfo]:
    if compression == "gzip":
        data = gzip.decompress(data)
    elif compression == "zstd":
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return tf.getmembers()


def blob_bytes(built, digest) -> bytes:
    return built.blobs[digest].read_bytes()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "model")


# ----------------------------------------------------------------------------------------- scanning


def test_scan_is_depth_first_sorted_and_keeps_hardlinks(tree: Path) -> None:
    entries = scan_tree(tree)
    paths = [e.path for e in entries]
    # depth first, children sorted by name bytes: a directory's content right after it
    assert paths.index("tok") + 1 == paths.index("tok/tokenizer.json")
    top = [p for p in paths if "/" not in p]
    assert top == sorted(top, key=os.fsencode)
    kinds = {e.path: e for e in entries}
    assert kinds["alias.safetensors"].kind == "file"  # sorts first: the primary name
    assert kinds["model-00001.safetensors"].kind == "hardlink"
    assert kinds["model-00001.safetensors"].target == "alias.safetensors"
    assert kinds["latest"].kind == "symlink" and kinds["latest"].target == "model-00001.safetensors"
    assert kinds["private"].mode == 0o700 and kinds["private/secret"].mode == 0o600
    assert kinds["empty"].kind == "dir"


def test_scan_refuses_fifos(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "d" / "pipe")
    with pytest.raises(UsageError, match="FIFO"):
        scan_tree(tmp_path / "d")


# ----------------------------------------------------------------------------------------- tar writer


def test_tar_headers_are_fixed_and_minimal() -> None:
    out = io.BytesIO()
    w = TarWriter(out, mtime=0)
    w.add_dir("d", 0o750)
    w.add_bytes("d/f", b"abc", 0o640)
    w.add_symlink("d/l", "f")
    w.add_hardlink("d/h", "d/f", 0o640)
    w.close()
    data = out.getvalue()
    assert len(data) % 512 == 0 and data.endswith(bytes(1024))
    assert len(data) == 512 * 5 + 1024  # 4 headers, 1 data block, end: no record padding
    ms = members(data)
    assert [(m.name, m.type) for m in ms] == [
        ("d", tarfile.DIRTYPE),
        ("d/f", tarfile.REGTYPE),
        ("d/l", tarfile.SYMTYPE),
        ("d/h", tarfile.LNKTYPE),
    ]
    for m in ms:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.devmajor, m.devminor) == (0, 0, 0, "", "", 0, 0)
        assert not m.pax_headers  # ustar is enough: no PAX records
    assert oct(ms[0].mode) == oct(0o750) and ms[3].linkname == "d/f"


def test_long_and_non_ascii_names_use_pax(tmp_path: Path) -> None:
    out = io.BytesIO()
    w = TarWriter(out)
    name = "dir/" + "ü" * 70 + ".bin"
    w.add_bytes(name, b"z")
    w.close()
    (m,) = members(out.getvalue())
    assert m.name == name and m.pax_headers.get("path") == name


def test_file_that_changes_size_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"12345")
    w = TarWriter(io.BytesIO())
    with pytest.raises(Exception, match="grew"):
        w.add_file("f", f, 0o644, 3)
    with pytest.raises(Exception, match="shrank"):
        TarWriter(io.BytesIO()).add_file("f", f, 0o644, 9)


def test_tar_parts_are_the_bytes_the_tar_writer_writes(tree: Path) -> None:
    """An uncompressed layer described as parts (headers in memory, files where they are) is, byte
    for byte, the tar the writer streams; no file is read to describe it."""
    entries = scan_tree(tree)
    out = io.BytesIO()
    w = TarWriter(out)
    tp = TarParts()
    for t in (w, tp.tar):
        for e in entries:
            if e.kind == "dir":
                t.add_dir(e.path, e.mode)
            elif e.kind == "symlink":
                t.add_symlink(e.path, e.target)
            elif e.kind == "hardlink":
                t.add_hardlink(e.path, e.target, e.mode)
            else:
                t.add_file(e.path, e.source, e.mode, e.size)
    w.close()
    parts, size = tp.finish()
    assert size == len(out.getvalue())
    assert {p.path for p in parts if isinstance(p, FileRange)} == {Path(e.source) for e in entries if e.kind == "file"}
    blob = Blob(None, size, parts=parts)
    assert blob.read_bytes() == out.getvalue()
    assert hash_blob(blob) == digest_bytes(out.getvalue()) == blob.digest
    # any window of the blob, across parts, as the chunked upload reads it
    buf = bytearray(1000)
    for start, length in ((0, 1), (511, 1026), (size - 1500, 1500), (700, size - 700)):
        got = b"".join(bytes(v) for v in blob.views(buf, start, length))
        assert got == out.getvalue()[start : start + length]


def test_file_parts_refuse_files_that_changed(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * 5000)
    blob = Blob(None, 5000, parts=(b"head", FileRange(f, 0, 4996, file_size=4996)))
    with pytest.raises(ImagevolError, match="changed size"):
        hash_blob(blob)  # the file is longer than when it was scanned
    f.write_bytes(b"x" * 100)
    with pytest.raises(ImagevolError, match="shrank"):
        hash_blob(blob)
    f.unlink()
    with pytest.raises(ImagevolError, match="cannot read"):
        hash_blob(blob)
    assert blob.digest is None


def test_upload_body_hashes_what_it_sends_and_restarts_when_sent_again(tmp_path: Path) -> None:
    """A retried request sends the body again: the running hash restarts from its state before the
    chunk, so the digest covers each byte once."""
    data = os.urandom(3 * MiB + 17)
    f = tmp_path / "f"
    f.write_bytes(data)
    blob = Blob(None, len(data), parts=(FileRange(f, 0, len(data), file_size=len(data)),))
    before = hashlib.sha256(data[:100])
    body = _Body(blob, 100, 2 * MiB, bytearray(MiB), None, before)
    partial = iter(body)
    next(partial)  # a first attempt that broke after one piece
    assert body.hashed is None
    sent = b"".join(bytes(v) for v in body)
    assert sent == data[100 : 100 + 2 * MiB]
    assert body.hashed.hexdigest() == hashlib.sha256(data[: 100 + 2 * MiB]).hexdigest()
    assert before.hexdigest() == hashlib.sha256(data[:100]).hexdigest()  # left as it was


def test_digest_cache_round_trip_and_racy_files(tmp_path: Path) -> None:
    path = tmp_path / "c" / "digests.json"
    cache = DigestCache(path)
    d = digest_bytes(b"x")
    now = 10 * dc.RACY_NS
    assert cache.put("raw:a", d, newest_ctime_ns=now - 3 * dc.RACY_NS, read_started_ns=now)
    # a file changed within the racy window of the read is not remembered
    assert not cache.put("raw:b", d, newest_ctime_ns=now - dc.RACY_NS // 2, read_started_ns=now)
    cache.save()
    again = DigestCache(path)
    assert again.get("raw:a") == d and again.get("raw:b") is None and again.get(None) is None
    # another process's entries are kept when this one saves
    other = DigestCache(path)
    other.put("raw:c", d, newest_ctime_ns=0, read_started_ns=now)
    again.put("raw:d", d, newest_ctime_ns=0, read_started_ns=now)
    other.save()
    again.save()
    assert {k for k in ("raw:a", "raw:c", "raw:d") if DigestCache(path).get(k) == d} == {"raw:a", "raw:c", "raw:d"}
    path.write_text("not json")
    assert DigestCache(path).get("raw:a") is None  # unreadable: ignored
    assert DigestCache(None).put("raw:a", d, newest_ctime_ns=0, read_started_ns=now) is False


def test_digest_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IMAGEVOL_PACK_CACHE", "off")
    assert dc.default_cache_path() is None
    monkeypatch.setenv("IMAGEVOL_PACK_CACHE", str(tmp_path / "x.json"))
    assert dc.default_cache_path() == tmp_path / "x.json"
    monkeypatch.delenv("IMAGEVOL_PACK_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert dc.default_cache_path() == tmp_path / "imagevol" / "pack-digests.json"


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_layer_writer_digests_in_one_pass(compression: str) -> None:
    out = io.BytesIO()
    w = LayerWriter(out, compression)
    w.tar.add_bytes("a", os.urandom(100_000))
    digest, size, diff_id, raw_size = w.finish()
    blob = out.getvalue()
    assert digest == digest_bytes(blob) and size == len(blob)
    raw = blob
    if compression == "gzip":
        raw = gzip.decompress(blob)
        assert blob[4:8] == bytes(4)  # gzip header mtime 0
        assert not blob[3] & 0x08  # no file name
    elif compression == "zstd":
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    assert diff_id == digest_bytes(raw) and raw_size == len(raw)
    if compression == "none":
        assert diff_id == digest


def test_zstd_output_does_not_depend_on_thread_count() -> None:
    """libzstd's multi-threaded output is the same for any worker count, so ``threads=-1`` (all
    CPUs of whatever machine packs) gives the same blob everywhere."""
    data = os.urandom(3 * MiB) + bytes(6 * MiB) + b"weights" * 300_000
    ours = io.BytesIO()
    lw = LayerWriter(ours, "zstd")
    lw.write(data)  # the tar stream as the tar writer hands it on
    lw.finish()  # ends the archive: two zero blocks
    outs = {ours.getvalue()}
    stream = data + bytes(1024)
    for threads in (1, 2, 4, 8):
        buf = io.BytesIO()
        w = zstandard.ZstdCompressor(level=3, threads=threads).stream_writer(buf, closefd=False)
        for i in range(0, len(stream), 700_001):  # other write sizes: boundaries must not matter
            w.write(stream[i : i + 700_001])
        w.close()
        outs.add(buf.getvalue())
    assert len(outs) == 1


# ----------------------------------------------------------------------------------------- image format


def test_layer_split_large_files_alone_hardlinks_follow(tree: Path) -> None:
    plans = plan_image_layers(scan_tree(tree), large_file_size=1 * MiB)
    assert plans[0].name == "files"
    large = {p.name: [e.path for e in p.entries] for p in plans[1:]}
    assert large == {
        "alias.safetensors": ["alias.safetensors", "model-00001.safetensors"],
        "model-00002.safetensors": ["model-00002.safetensors"],
    }
    small = [e.path for e in plans[0].entries]
    assert "empty" in small and "latest" in small and "tok/vocab.txt" in small
    assert not any(p.endswith(".safetensors") for p in small)
    # with a threshold above every size, one layer
    assert len(plan_image_layers(scan_tree(tree), large_file_size=1 << 40)) == 1


def test_image_index_shares_layers_across_default_platforms(tree: Path) -> None:
    b = build(tree, format="image", large_file_size=1 * MiB)
    try:
        idx = parse_manifest(b.body, mt.OCI_INDEX)
        assert isinstance(idx, Index)
        assert [str(d.platform) for d in idx.manifests] == [
            "linux/amd64",
            "linux/arm64/v8",
            "linux/arm/v7",
            "linux/ppc64le",
            "linux/s390x",
            "linux/riscv64",
        ]
        assert len(DEFAULT_PLATFORMS) == 6
        mans = [parse_manifest(body, mt.OCI_MANIFEST) for body, _ in b.children]
        layer_sets = {tuple(x.digest for x in m.layers) for m in mans}
        assert len(layer_sets) == 1 and len(next(iter(layer_sets))) == 3
        configs = {m.config.digest for m in mans}
        assert len(configs) == 6
        for desc, m in zip(idx.manifests, mans, strict=True):
            assert isinstance(m, Manifest) and m.is_image and m.digest == desc.digest
            cfg = parse_config(blob_bytes(b, m.config.digest))
            assert cfg.platform == desc.platform and cfg.runnable
            assert "created" not in cfg.raw
            # diff_ids are the uncompressed layers (here uncompressed: the blobs)
            assert list(cfg.diff_ids) == [x.digest for x in m.layers]
        # the small layer holds the tree's structure with modes, symlinks, hard links
        small = {m.name: m for m in members(blob_bytes(b, mans[0].layers[0].digest))}
        assert small["empty"].isdir() and small["private"].mode == 0o700
        assert small["latest"].issym() and small["dangling"].linkname == "../nowhere"
        # "vocab-copy.txt" sorts before "vocab.txt": it is the file, the other name a hard link to it
        assert small["tok/vocab.txt"].islnk() and small["tok/vocab.txt"].linkname == "tok/vocab-copy.txt"
        assert small["run.sh"].mode == 0o755
    finally:
        b.cleanup()


def test_image_platforms_and_agnostic(tree: Path) -> None:
    b = build(tree, platforms=["linux/arm64,linux/amd64"])
    idx = parse_manifest(b.body, mt.OCI_INDEX)
    assert [str(d.platform) for d in idx.manifests] == ["linux/arm64", "linux/amd64"]
    b.cleanup()
    b = build(tree, agnostic=True, compression="gzip")
    try:
        idx = parse_manifest(b.body, mt.OCI_INDEX)
        assert len(idx.manifests) == 1 and idx.manifests[0].platform is None
        m = parse_manifest(b.children[0][0], mt.OCI_MANIFEST)
        cfg = parse_config(blob_bytes(b, m.config.digest))
        assert (cfg.os, cfg.architecture, cfg.variant) == ("linux", "amd64", "")
        assert all(x.media_type == mt.OCI_LAYER_GZIP for x in m.layers)
        assert cfg.diff_ids[0] != m.layers[0].digest  # compressed: diff_id is of the tar
    finally:
        b.cleanup()
    with pytest.raises(UsageError, match="exclude"):
        build(tree, agnostic=True, platforms=["linux/amd64"])


@pytest.mark.parametrize("fmt", ["image", "artifact", "modelpack"])
@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_same_tree_same_digests_whatever_mtimes_cwd_and_location(
    tmp_path: Path, fmt: str, compression: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = make_tree(tmp_path / "a")
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b, symlinks=True)  # new inodes, new mtimes (hard links become copies: redo)
    os.unlink(b / "model-00001.safetensors")
    os.link(b / "alias.safetensors", b / "model-00001.safetensors")
    os.unlink(b / "tok" / "vocab-copy.txt")
    os.link(b / "tok" / "vocab.txt", b / "tok" / "vocab-copy.txt")
    for p in b.rglob("*"):
        os.utime(p, (1_234_567_890, 1_234_567_890), follow_symlinks=False)
    kw = dict(format=fmt, compression=compression, large_file_size=1 * MiB)
    monkeypatch.chdir(tmp_path)
    first = build("a", **kw)
    monkeypatch.chdir(b.parent)
    second = build(b, **kw)
    try:
        assert first.digest == second.digest
        assert [m.digest for m in first.manifests] == [m.digest for m in second.manifests]
        assert sorted(first.blobs) == sorted(second.blobs)
    finally:
        first.cleanup()
        second.cleanup()


def test_source_date_epoch_sets_mtimes_and_created(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = build(tree, platforms=["linux/amd64"])
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    dated = build(tree, platforms=["linux/amd64"])
    try:
        assert plain.digest != dated.digest
        m = parse_manifest(dated.children[0][0], mt.OCI_MANIFEST)
        assert json.loads(blob_bytes(dated, m.config.digest))["created"] == "2023-11-14T22:13:20Z"
        assert {x.mtime for x in members(blob_bytes(dated, m.layers[0].digest))} == {1700000000}
    finally:
        plain.cleanup()
        dated.cleanup()


# ----------------------------------------------------------------------------------------- artifacts


def test_artifact_raw_layers_and_tree(tree: Path) -> None:
    b = build(tree, format="artifact", artifact_type="application/vnd.example.data.v1")
    try:
        m = parse_manifest(b.body, mt.OCI_MANIFEST)
        assert isinstance(m, Manifest) and not m.is_image
        assert m.artifact_type == "application/vnd.example.data.v1"
        assert m.config.media_type == mt.OCI_EMPTY and m.config.digest == mt.OCI_EMPTY_DIGEST
        assert m.config.data == b"{}" and m.config.size == 2
        assert b'"data":"e30="' in b.body
        raw = [x for x in m.layers if x.media_type == "application/octet-stream"]
        titles = [x.title for x in raw]
        # plain-mode files are raw layers; the executable and the 0600 file are not
        assert "config.json" in titles and "tok/tokenizer.json" in titles and "data/train.jsonl" in titles
        assert "run.sh" not in titles and "private/secret" not in titles
        # hard links: the same blob twice
        byname = {x.title: x for x in raw}
        assert byname["alias.safetensors"].digest == byname["model-00001.safetensors"].digest
        meta = json.loads(byname["config.json"].annotations[mt.ANN_CNCF_FILE_METADATA])
        assert meta == {
            "name": "config.json",
            "mode": 0o644,
            "uid": 0,
            "gid": 0,
            "size": 13,
            "mtime": "1970-01-01T00:00:00Z",
            "typeflag": 48,
        }
        tree_layer = m.layers[-1]
        assert tree_layer.title == TREE_TITLE and tree_layer.media_type == mt.OCI_LAYER
        assert mt.ANN_ORAS_UNPACK not in tree_layer.annotations
        assert tree_layer.annotations[mt.ANN_IMAGEVOL_ROOT] == "true"  # imagevol extracts it at the root
        ms = members(blob_bytes(b, tree_layer.digest))
        assert TREE_TITLE not in {x.name for x in ms}
        names = {x.name: x for x in ms}
        assert names["run.sh"].isfile() and names["run.sh"].mode == 0o755
        assert names["private/secret"].mode == 0o600 and names["private"].mode == 0o700
        assert names["empty"].isdir() and names["latest"].issym()
        assert "config.json" not in names
    finally:
        b.cleanup()


def test_artifact_of_plain_files_has_no_tree(tmp_path: Path) -> None:
    d = tmp_path / "plain"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"a")
    (d / "sub" / "b.bin").write_bytes(b"b")
    b = build(d, format="artifact")
    try:
        m = parse_manifest(b.body, mt.OCI_MANIFEST)
        assert [x.title for x in m.layers] == ["a.bin", "sub/b.bin"]
        assert m.effective_artifact_type == "application/vnd.imagevol.data.v1"
    finally:
        b.cleanup()
    with pytest.raises(UsageError, match="artifact"):
        build(d, format="image", artifact_type="x/y")


def test_artifact_with_platforms_is_an_index_of_one_manifest(tree: Path) -> None:
    b = build(tree, format="artifact", platforms=["linux/amd64", "linux/arm64"])
    try:
        idx = parse_manifest(b.body, mt.OCI_INDEX)
        assert len({d.digest for d in idx.manifests}) == 1
        assert [str(d.platform) for d in idx.manifests] == ["linux/amd64", "linux/arm64"]
    finally:
        b.cleanup()


@pytest.mark.parametrize(
    ("path", "kind", "guessed"),
    [
        ("model-00001-of-00002.safetensors", "weight", False),
        ("sub/pytorch_model.bin", "weight", False),
        ("model.gguf", "weight", False),
        ("onnx/model.onnx", "weight", False),
        ("config.json", "weight.config", False),
        ("generation_config.json", "weight.config", False),
        ("tokenizer.json", "weight.config", False),
        ("tokenizer_config.json", "weight.config", False),
        ("tokenizer.model", "weight.config", False),
        ("vocab.txt", "weight.config", False),
        ("merges.txt", "weight.config", False),
        ("special_tokens_map.json", "weight.config", False),
        ("README.md", "doc", False),
        ("LICENSE", "doc", False),
        ("docs/usage.md", "doc", False),
        ("modeling.py", "code", False),
        ("scripts/run.sh", "code", False),
        ("demo.ipynb", "code", False),
        ("data/train.bin", "dataset", False),
        ("datasets/x.txt", "dataset", False),
        ("eval.parquet", "dataset", False),
        ("notes.txt", "weight.config", True),
    ],
)
def test_modelpack_kinds(path: str, kind: str, guessed: bool) -> None:
    assert modelpack_kind(path, 10) == (kind, guessed)


def test_modelpack_unknown_large_file_is_a_weight() -> None:
    assert modelpack_kind("blob.dat", 200 * MiB) == ("weight", True)


def test_modelpack_manifest_and_config(tree: Path) -> None:
    b = build(tree, format="modelpack")
    try:
        m = parse_manifest(b.body, mt.OCI_MANIFEST)
        assert m.artifact_type == mt.MODELPACK_ARTIFACT and m.config.media_type == mt.MODELPACK_CONFIG
        by = {x.annotations.get(mt.ANN_CNCF_FILEPATH): x for x in m.layers}
        assert by["model-00002.safetensors"].media_type == "application/vnd.cncf.model.weight.v1.raw"
        assert by["README.md"].media_type == "application/vnd.cncf.model.doc.v1.raw"
        assert by["run.sh"].media_type == "application/vnd.cncf.model.code.v1.raw"
        assert by["data/train.jsonl"].media_type == "application/vnd.cncf.model.dataset.v1.raw"
        assert by["tok/tokenizer.json"].media_type == "application/vnd.cncf.model.weight.config.v1.raw"
        assert by["run.sh"].title == "run.sh"
        assert json.loads(by["run.sh"].annotations[mt.ANN_CNCF_FILE_METADATA])["mode"] == 0o755
        assert json.loads(by["private/secret"].annotations[mt.ANN_CNCF_FILE_METADATA])["mode"] == 0o600
        cfg = json.loads(blob_bytes(b, m.config.digest))
        assert list(cfg) == ["descriptor", "modelfs", "config"]
        assert cfg["modelfs"]["type"] == "layers"
        assert cfg["config"] == {"format": "safetensors"}
        # raw layers: the diff_id is the blob; the tree tar (uncompressed) likewise
        assert cfg["modelfs"]["diffIds"] == [str(x.digest) for x in m.layers]
        tree_layer = by[TREE_TITLE]
        assert tree_layer.media_type == "application/vnd.cncf.model.weight.config.v1.tar"
        names = [x.name for x in members(blob_bytes(b, tree_layer.digest))]
        assert tree_layer.annotations[mt.ANN_IMAGEVOL_ROOT] == "true"
        assert TREE_TITLE not in names and "empty" in names and "latest" in names
        assert "run.sh" not in names  # modes travel in the metadata annotation
    finally:
        b.cleanup()


# ----------------------------------------------------------------------------------------- sinks


def test_file_range_is_re_iterable(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(bytes(range(256)) * 10_000)
    seen: list[int] = []
    body = FileRange(f, 100, 2 * MiB, seen.append)
    once = b"".join(body)
    again = b"".join(body)
    assert once == again == f.read_bytes()[100 : 100 + 2 * MiB]
    assert sum(seen) == 4 * MiB


def test_pack_into_layout_tags_and_replaces(tree: Path, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    kw = dict(format="image", platforms=["linux/amd64", "linux/arm64"], large_file_size=1 * MiB)
    r1 = pack(tree, f"oci:{layout}:v1", **kw)
    assert r1.blobs_pushed == 5 and r1.blobs_skipped == 0  # small-files layer, 2 shard layers, 2 configs
    r2 = pack(tree, f"oci:{layout}:v2", format="artifact")
    (tree / "extra.txt").write_text("new")
    r3 = pack(tree, f"oci:{layout}:v1", **kw)
    assert r3.digest != r1.digest and r3.blobs_skipped == 2  # the shard layers are shared
    index = json.loads((layout / "index.json").read_text())
    tags = {e["annotations"][mt.ANN_REF_NAME]: e["digest"] for e in index["manifests"]}
    assert tags == {"v1": r3.digest, "v2": r2.digest}
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert not [p for p in layout.iterdir() if p.name.startswith(".imagevol-pack")]
    assert not [p for p in (layout / "blobs" / "sha256").iterdir() if p.name.startswith(".")]
    src = LayoutSource(parse_layout_reference(f"oci:{layout}:v1"))
    desc, doc = src.resolve()
    assert desc.digest == r3.digest and isinstance(doc, Index)
    for child in doc.manifests:
        m = src.manifest(child)
        for x in (m.config, *m.layers):
            src.blob_bytes(x, 1 << 30)  # verified against the digest
    # packing into the layout moved the scratch tars and copied nothing of the source
    assert (tree / "config.json").stat().st_nlink == 1


def test_layout_sink_blob_modes(tmp_path: Path) -> None:
    sink = LayoutSink(tmp_path / "l", tag="t")
    src = tmp_path / "blob"
    src.write_bytes(b"hello")
    d = digest_bytes(b"hello")
    assert sink.put_blob_file(src, d, 5, mode="copy") is True
    assert sink.put_blob_file(src, d, 5, mode="copy") is False
    assert sink.blob_path(d).read_bytes() == b"hello"
    other = digest_bytes(b"other")
    with pytest.raises(Exception, match=r"changed|bytes"):
        sink.put_blob_file(src, other, 5, mode="copy")
    assert not sink.has_blob(other)
    assert sink.put_blob_bytes(b"{}") == mt.OCI_EMPTY_DIGEST
    with pytest.raises(UsageError, match="not empty"):
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "file").write_text("x")
        LayoutSink(tmp_path / "junk")


def test_second_pack_into_a_layout_reads_no_file_with_the_digest_cache(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imagevol.pack.push as push_module

    monkeypatch.setattr(dc, "RACY_NS", 0)  # the files were written just now
    calls: list[str] = []
    real = push_module.hash_blob

    def counting(blob, *a, **kw):
        calls.append(blob.what)
        return real(blob, *a, **kw)

    monkeypatch.setattr(push_module, "hash_blob", counting)
    layout = tmp_path / "layout"
    kw = dict(format="image", platforms=["linux/amd64"], large_file_size=1 * MiB, digest_cache=tmp_path / "c.json")
    first = pack(tree, f"oci:{layout}:v1", **kw)
    assert calls and first.blobs_pushed == 4  # small-files layer, 2 shard layers, config
    calls.clear()
    second = pack(tree, f"oci:{layout}:v2", **kw)
    assert calls == [] and second.digest == first.digest
    assert second.blobs_skipped == 4 and second.bytes_pushed == 0
    # a changed file is read again (its ctime moved), the others are not
    (tree / "README.md").write_text("# changed\n")
    third = pack(tree, f"oci:{layout}:v3", **kw)
    assert calls == ["files"] and third.digest != first.digest
    # without a cache every layer is read again (and found in the layout)
    calls.clear()
    fourth = pack(tree, f"oci:{layout}:v4", **{**kw, "digest_cache": DigestCache(None)})
    assert sorted(calls) == sorted(["files", "model-00002.safetensors", "alias.safetensors"])
    assert fourth.digest == third.digest and fourth.blobs_skipped == 4


def test_large_blobs_are_hashed_while_copied_into_a_layout(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imagevol.pack.push as push_module
    import imagevol.sinks.layout as layout_module

    monkeypatch.setattr(layout_module, "STREAM_MIN_SIZE", 1 * MiB)  # the 2 MiB shards stream
    calls: list[str] = []
    real = push_module.hash_blob
    monkeypatch.setattr(
        push_module, "hash_blob", lambda blob, *a, **kw: calls.append(blob.what) or real(blob, *a, **kw)
    )
    layout = tmp_path / "layout"
    kw = dict(format="artifact", digest_cache=DigestCache(None))
    first = pack(tree, f"oci:{layout}:a", **kw)
    shards = {"alias.safetensors", "model-00002.safetensors"}
    assert calls and not shards & set(calls)  # small blobs hashed first, the shards while copied
    built = build(tree, format="artifact")
    try:
        assert first.digest == built.digest  # the same digests as hashing first
    finally:
        built.cleanup()
    # every distinct blob once (tok/tokenizer.json holds "{}": the empty config's bytes)
    assert first.blobs_pushed == len({x.digest for x in first.layers} | {mt.OCI_EMPTY_DIGEST})
    # again, without a cache: the shards are copied again, found there, and the copies dropped
    calls.clear()
    again = pack(tree, f"oci:{layout}:b", **kw)
    assert again.digest == first.digest and again.blobs_pushed == 0 and again.bytes_pushed == 0
    assert not [p for p in (layout / "blobs" / "sha256").iterdir() if p.name.startswith(".")]
    src = LayoutSource(parse_layout_reference(f"oci:{layout}:b"))
    _, m = src.resolve()
    for x in m.layers:
        src.blob_bytes(x, 1 << 30)  # verified against the digest


def test_pack_image_round_trip_keeps_modes(tmp_path: Path) -> None:
    """`pack --format image` records the files' own modes and a mounted image shows them: 0640
    stays 0640, 0755 stays 0755, a 0750 directory 0750 (the mount used to strip every write bit)."""
    from imagevol import mount as mount_api

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d").chmod(0o750)
    (src / "d" / "owner.txt").write_text("0640")
    (src / "d" / "owner.txt").chmod(0o640)
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    layout = tmp_path / "layout"
    pack(src, f"oci:{layout}:v1", format="image", platforms=["linux/amd64", "linux/arm64"])
    res = mount_api(f"oci:{layout}:v1", tmp_path / "vol", root=tmp_path / "store", mode="copy")
    for root in (res.snapshot.path, tmp_path / "vol"):
        modes = {p: stat.S_IMODE(os.lstat(root / p).st_mode) for p in ("d", "d/owner.txt", "run.sh")}
        assert modes == {"d": 0o750, "d/owner.txt": 0o640, "run.sh": 0o755}, root
