"""materialize: images, ORAS / OCI artifacts, ModelPack, KitOps, Docker models; reuse and locking."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest

from imagevol import mediatypes as mt
from imagevol.digest import Digest
from imagevol.errors import DigestMismatchError, ManifestError, UnsafeContentError, UsageError
from imagevol.manifest import Manifest, parse_manifest
from imagevol.materialize import (
    MaterializeOptions,
    looks_like_tar,
    materialize,
    safe_parts,
    snapshot_key,
)
from imagevol.store import Store
from imagevol.unpack.applier import ApplyOptions
from tests.support.blobs import gz
from tests.support.blobs import sha256_digest as sha
from tests.support.deeptree import make_deep, rm_deep

AT = "application/vnd.example.artifact"


# -- builders --------------------------------------------------------------------------------------


def tar(entries: list[tuple[str, Any]]) -> bytes:
    """entries: (name, bytes) files, (name, None) dirs, (name, ("symlink", target)), (name, ("mode", bytes, mode))."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, spec in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1700000000
            if spec is None:
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
                tf.addfile(ti)
            elif isinstance(spec, tuple) and spec[0] == "symlink":
                ti.type = tarfile.SYMTYPE
                ti.linkname = spec[1]
                tf.addfile(ti)
            else:
                data, mode = (spec[1], spec[2]) if isinstance(spec, tuple) else (spec, 0o644)
                ti.size = len(data)
                ti.mode = mode
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


class Builder:
    def __init__(self, store: Store) -> None:
        self.store = store

    def desc(self, media_type: str, data: bytes, annotations: dict[str, str] | None = None) -> dict[str, Any]:
        d = self.store.put_bytes(data)
        out: dict[str, Any] = {"mediaType": media_type, "digest": str(d), "size": len(data)}
        if annotations:
            out["annotations"] = annotations
        return out

    def manifest(
        self,
        layers: list[dict[str, Any]],
        *,
        config: dict[str, Any] | None = None,
        artifact_type: str | None = None,
        media_type: str = mt.OCI_MANIFEST,
    ) -> Manifest:
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": config if config is not None else self.desc(mt.OCI_EMPTY, b"{}"),
            "layers": layers,
        }
        if artifact_type:
            doc["artifactType"] = artifact_type
        raw = json.dumps(doc).encode()
        self.store.put_bytes(raw)
        m = parse_manifest(raw)
        assert isinstance(m, Manifest)
        return m

    def image(self, layer_tars: list[bytes], *, compress: bool = True, diff_ids: list[str] | None = None) -> Manifest:
        cfg = {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids or [sha(t) for t in layer_tars]},
        }
        layers = [self.desc(mt.OCI_LAYER_GZIP, gz(t)) if compress else self.desc(mt.OCI_LAYER, t) for t in layer_tars]
        return self.manifest(layers, config=self.desc(mt.OCI_CONFIG, json.dumps(cfg).encode()))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def b(store: Store) -> Builder:
    return Builder(store)


def tree(path: Path) -> dict[str, str]:
    """relative path -> 'dir' | 'link:TARGET' | file content."""
    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(path):
        for n in dirs + files:
            p = Path(dirpath, n)
            rel = str(p.relative_to(path))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = p.read_bytes().decode(errors="replace")
    return out


def assert_sealed(path: Path) -> None:
    """Modes as declared (no write bits stripped: read-only comes from the mount); the root 0o755
    unless a layer declares `./`; the tree lies in the 0700 store root."""
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def leftovers(store: Store) -> list[str]:
    return sorted(n for n in os.listdir(store.root / "snapshots") if n.startswith(".build-"))


# -- images ----------------------------------------------------------------------------------------
def test_image_two_layers_with_whiteouts(store: Store, b: Builder) -> None:
    lower = tar(
        [
            ("etc", None),
            ("etc/a.conf", b"a"),
            ("etc/b.conf", b"b"),
            ("opt", None),
            ("opt/old", b"old"),
            ("bin", None),
            ("bin/tool", ("mode", b"#!/bin/sh\necho hi\n", 0o755)),
            ("gone.txt", b"gone"),
        ]
    )
    upper = tar([("etc/.wh.a.conf", b""), (".wh.gone.txt", b""), ("opt/.wh..wh..opq", b""), ("opt/new", b"new")])
    m = b.image([lower, upper])
    snap = materialize(store, m)
    assert snap.created and snap.flavour == "image"
    assert snap.key == snapshot_key(m) and snap.key.startswith(m.digest.hex + "-") and snap.digest == m.digest
    assert snap.path == store.root / "snapshots" / snap.key
    t = tree(snap.path)
    assert t == {
        "etc": "dir",
        "etc/b.conf": "b",
        "opt": "dir",
        "opt/new": "new",
        "bin": "dir",
        "bin/tool": "#!/bin/sh\necho hi\n",
    }
    assert snap.files == 3
    assert stat.S_IMODE((snap.path / "bin/tool").stat().st_mode) == 0o755  # as declared
    assert_sealed(snap.path)
    rec = store.meta.get_snapshot(snap.key)
    assert rec is not None and rec.state == "ready" and rec.digest == m.digest and rec.path == str(snap.path)
    assert leftovers(store) == []


def test_image_diff_id_mismatch_refused(store: Store, b: Builder) -> None:
    layer = tar([("a", b"a")])
    m = b.image([layer], diff_ids=[sha(b"something else")])
    with pytest.raises(DigestMismatchError, match="diff_id"):
        materialize(store, m)
    assert not (store.root / "snapshots" / snapshot_key(m)).exists()
    assert leftovers(store) == []
    assert store.meta.get_snapshot(snapshot_key(m)) is None


def test_image_layer_count_mismatch_refused(store: Store, b: Builder) -> None:
    layer = tar([("a", b"a")])
    m = b.image([layer], diff_ids=[sha(layer), sha(layer)])
    with pytest.raises(ManifestError, match="diff_ids"):
        materialize(store, m)


def test_docker_plain_tar_type_that_is_gzip_is_sniffed(store: Store, b: Builder) -> None:
    layer = tar([("hello", b"world")])
    cfg = {"rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}
    m = b.manifest(
        [b.desc(mt.DOCKER_LAYER, gz(layer))],
        config=b.desc(mt.DOCKER_CONFIG, json.dumps(cfg).encode()),
        media_type=mt.DOCKER_MANIFEST,
    )
    snap = materialize(store, m)
    assert tree(snap.path) == {"hello": "world"}


def test_image_layer_escaping_stays_inside(store: Store, b: Builder, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    layer = tar([("link", ("symlink", str(outside))), ("link/evil", b"x"), ("../../up", b"y")])
    snap = materialize(store, b.image([layer]))
    assert list(outside.iterdir()) == []
    assert (snap.path / str(outside).lstrip("/") / "evil").read_bytes() == b"x"
    assert (snap.path / "up").read_bytes() == b"y"


# -- ORAS / OCI artifacts --------------------------------------------------------------------------
def test_artifact_raw_layers_are_hardlinks(store: Store, b: Builder) -> None:
    m = b.manifest(
        [
            b.desc(mt.OCI_LAYER, b"not a tar: ORAS default type", {mt.ANN_TITLE: "weights.bin"}),
            b.desc("application/octet-stream", b"nested", {mt.ANN_TITLE: "a/b/c.bin"}),
            b.desc("application/x", b"cnai", {mt.ANN_CNAI_FILEPATH: "cnai.txt"}),
        ],
        config=b.desc(mt.ORAS_UNKNOWN_CONFIG, b"{}"),
    )
    snap = materialize(store, m)
    assert snap.flavour == "artifact"
    assert tree(snap.path) == {
        "weights.bin": "not a tar: ORAS default type",
        "a": "dir",
        "a/b": "dir",
        "a/b/c.bin": "nested",
        "cnai.txt": "cnai",
    }
    for layer, rel in zip(m.layers, ("weights.bin", "a/b/c.bin", "cnai.txt"), strict=True):
        st = (snap.path / rel).stat()
        assert st.st_ino == store.blob_path(layer.digest).stat().st_ino  # zero copies
        assert stat.S_IMODE(st.st_mode) == 0o444
    assert snap.contents[str(m.layers[1].digest)] == "a/b/c.bin"
    assert_sealed(snap.path)


@pytest.mark.parametrize("title", ["/etc/passwd", "../escape", "a/../../x", "a/../b", ".", "./a", "a//b", "x\0y"])
def test_artifact_escaping_titles_refused(store: Store, b: Builder, title: str) -> None:
    m = b.manifest([b.desc("application/x", b"data", {mt.ANN_TITLE: title})], artifact_type=AT)
    with pytest.raises(UnsafeContentError):
        materialize(store, m)
    assert not (store.root / "snapshots" / snapshot_key(m)).exists()
    assert leftovers(store) == []


def test_safe_parts() -> None:
    assert safe_parts("a/b/c.bin", "t") == ["a", "b", "c.bin"]
    assert safe_parts("dir/", "t") == ["dir"]
    assert safe_parts("./models/x", "t", normalize=True) == ["models", "x"]
    assert safe_parts(".", "t", normalize=True) == []
    with pytest.raises(UnsafeContentError):
        safe_parts("../x", "t", normalize=True)
    with pytest.raises(UnsafeContentError):
        safe_parts("a" * 256, "t")


def test_untitled_layers_skipped_with_warning_or_named_by_digest(store: Store, b: Builder) -> None:
    m = b.manifest(
        [b.desc("application/x", b"titled", {mt.ANN_TITLE: "t.txt"}), b.desc("application/x", b"anonymous")],
        artifact_type=AT,
    )
    seen: list[str] = []
    snap = materialize(store, m, warn=seen.append)
    assert tree(snap.path) == {"t.txt": "titled"}
    assert len(seen) == 1 and "no title" in seen[0] and snap.warnings == seen
    assert snap.contents[str(m.layers[1].digest)] is None

    opts = MaterializeOptions(name_untitled="digest")
    named = materialize(store, m, options=opts)
    assert named.key != snap.key and named.key.startswith(m.digest.hex + "-")
    assert tree(named.path) == {"t.txt": "titled", m.layers[1].digest.hex: "anonymous"}
    assert named.warnings == []


def test_options_validated() -> None:
    with pytest.raises(UsageError):
        MaterializeOptions(name_untitled="bogus")


def test_snapshot_key_suffix_only_when_result_changes(store: Store, b: Builder) -> None:
    titled = b.manifest([b.desc("application/x", b"x", {mt.ANN_TITLE: "x"})], artifact_type=AT)
    base = snapshot_key(titled)  # the digest hex and the tree format
    assert base.startswith(titled.digest.hex + "-") and len(base) == 64 + 13
    assert snapshot_key(titled, MaterializeOptions(name_untitled="digest")) == base
    assert snapshot_key(titled, MaterializeOptions(apply=ApplyOptions())) == base
    assert snapshot_key(titled, MaterializeOptions(apply=ApplyOptions(max_size=10))) == base
    k = snapshot_key(titled, MaterializeOptions(apply=ApplyOptions(devices="refuse")))
    assert k != base and k.startswith(titled.digest.hex + "-") and len(k) == 64 + 13


def test_oras_directory_tar_gzip_is_unpacked(store: Store, b: Builder) -> None:
    content = tar([("mydir", None), ("mydir/x.txt", b"x"), ("mydir/sub", None), ("mydir/sub/y.txt", b"y")])
    plain = tar([("./", None), ("./inside.txt", b"in")])
    m = b.manifest(
        [
            b.desc(
                mt.OCI_LAYER_GZIP,
                gz(content),
                {mt.ANN_TITLE: "mydir", mt.ANN_ORAS_UNPACK: "true", "io.deis.oras.content.digest": sha(content)},
            ),
            b.desc(mt.OCI_LAYER_GZIP, gz(plain), {mt.ANN_TITLE: "nested/data"}),
        ],
        config=b.desc(mt.ORAS_UNKNOWN_CONFIG, b"{}"),
    )
    snap = materialize(store, m)
    assert tree(snap.path) == {
        "mydir": "dir",
        "mydir/x.txt": "x",
        "mydir/sub": "dir",
        "mydir/sub/y.txt": "y",
        "nested": "dir",
        "nested/data": "dir",
        "nested/data/inside.txt": "in",
    }
    assert_sealed(snap.path)


def test_oras_directory_digest_annotation_verified(store: Store, b: Builder) -> None:
    content = tar([("d/x", b"x")])
    m = b.manifest(
        [
            b.desc(
                mt.OCI_LAYER_GZIP,
                gz(content),
                {mt.ANN_TITLE: "d", mt.ANN_ORAS_UNPACK: "true", "io.deis.oras.content.digest": sha(b"other")},
            )
        ],
        artifact_type=AT,
    )
    with pytest.raises(DigestMismatchError):
        materialize(store, m)


def test_raw_file_mislabelled_as_tar_is_placed_as_file(store: Store, b: Builder) -> None:
    data = b"GGUF" + bytes(1024)  # not a tar header: checksum does not match
    m = b.manifest([b.desc(mt.OCI_LAYER, data, {mt.ANN_TITLE: "model.gguf"})], artifact_type=AT)
    snap = materialize(store, m)
    p = snap.path / "model.gguf"
    assert p.read_bytes() == data
    assert p.stat().st_ino == store.blob_path(m.layers[0].digest).stat().st_ino
    assert snap.warnings == []


def test_compressed_tar_type_that_is_no_tar_is_placed_with_warning(store: Store, b: Builder) -> None:
    m = b.manifest([b.desc(mt.OCI_LAYER_GZIP, b"plain text", {mt.ANN_TITLE: "notes.txt"})], artifact_type=AT)
    snap = materialize(store, m)
    assert (snap.path / "notes.txt").read_bytes() == b"plain text"
    assert any("not one" in w for w in snap.warnings)


def test_looks_like_tar() -> None:
    assert looks_like_tar(tar([("a", b"a")])[:512])
    assert not looks_like_tar(bytes(512))
    assert not looks_like_tar(b"x" * 512)
    assert not looks_like_tar(b"short")


def test_duplicate_titles_refused(store: Store, b: Builder) -> None:
    m = b.manifest(
        [b.desc("application/x", b"one", {mt.ANN_TITLE: "f"}), b.desc("application/x", b"two", {mt.ANN_TITLE: "f"})],
        artifact_type=AT,
    )
    with pytest.raises(UnsafeContentError, match="earlier layer"):
        materialize(store, m)


def test_title_through_symlink_of_earlier_layer_refused(store: Store, b: Builder, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = tar([("d", None), ("d/link", ("symlink", str(outside)))])
    m = b.manifest(
        [
            b.desc(mt.OCI_LAYER_GZIP, gz(evil), {mt.ANN_TITLE: "d", mt.ANN_ORAS_UNPACK: "true"}),
            b.desc("application/x", b"pwned", {mt.ANN_TITLE: "d/link/x"}),
        ],
        artifact_type=AT,
    )
    with pytest.raises(UnsafeContentError, match="symbolic link"):
        materialize(store, m)
    assert list(outside.iterdir()) == []


def test_artifact_tar_whiteouts_refused(store: Store, b: Builder) -> None:
    m = b.manifest(
        [b.desc(mt.OCI_LAYER_GZIP, gz(tar([("d/.wh.x", b"")])), {mt.ANN_TITLE: "d"})],
        artifact_type=AT,
    )
    with pytest.raises(UnsafeContentError, match="whiteout"):
        materialize(store, m)


# -- ModelPack -------------------------------------------------------------------------------------
def mp_meta(name: str, mode: int) -> str:
    return json.dumps(
        {"name": name, "mode": mode, "uid": 0, "gid": 0, "size": 1, "mtime": "2025-01-01T00:00:00Z", "typeflag": 48}
    )


def test_modelpack_raw_tar_and_metadata_mode(store: Store, b: Builder) -> None:
    cfg = b.desc(mt.MODELPACK_CONFIG, json.dumps({"descriptor": {"name": "m"}}).encode())
    w = "application/vnd.cncf.model.weight.v1.raw"
    layers = [
        b.desc(
            w,
            b"weights",
            {mt.ANN_CNCF_FILEPATH: "model/w.safetensors", mt.ANN_CNCF_FILE_METADATA: mp_meta("w", 0o644)},
        ),
        b.desc(
            "application/vnd.cncf.model.code.v1.raw",
            b"#!/bin/sh\n",
            {mt.ANN_CNCF_FILEPATH: "run.sh", mt.ANN_CNCF_FILE_METADATA: mp_meta("run.sh", 0o755)},
        ),
        # modern modctl: tar entries carry the full file path
        b.desc(
            "application/vnd.cncf.model.weight.config.v1.tar",
            tar([("tokenizer/vocab.json", b"{}")]),
            {mt.ANN_CNCF_FILEPATH: "tokenizer/vocab.json"},
        ),
        # older modctl: entries carry the base name only
        b.desc(
            "application/vnd.cncf.model.weight.config.v1.tar",
            tar([("config.json", b"cfg")]),
            {mt.ANN_CNCF_FILEPATH: "cfg/config.json"},
        ),
        b.desc(
            "application/vnd.cncf.model.doc.v1.tar+gzip",
            gz(tar([("docs", None), ("docs/README.md", b"readme")])),
            {mt.ANN_CNCF_FILEPATH: "docs"},
        ),
    ]
    m = b.manifest(layers, config=cfg, artifact_type=mt.MODELPACK_ARTIFACT)
    snap = materialize(store, m)
    assert snap.flavour == "modelpack"
    assert tree(snap.path) == {
        "model": "dir",
        "model/w.safetensors": "weights",
        "run.sh": "#!/bin/sh\n",
        "tokenizer": "dir",
        "tokenizer/vocab.json": "{}",
        "cfg": "dir",
        "cfg/config.json": "cfg",
        "docs": "dir",
        "docs/README.md": "readme",
    }
    w_st = (snap.path / "model/w.safetensors").stat()
    assert w_st.st_ino == store.blob_path(m.layers[0].digest).stat().st_ino  # 0o644 -> read-only 0o444: a link
    run = (snap.path / "run.sh").stat()
    assert run.st_ino != store.blob_path(m.layers[1].digest).stat().st_ino  # executable: a copy
    assert stat.S_IMODE(run.st_mode) == 0o755  # the declared mode
    assert stat.S_IMODE(store.blob_path(m.layers[1].digest).stat().st_mode) == 0o444  # blob untouched
    assert_sealed(snap.path)


def test_modelpack_escaping_filepath_refused(store: Store, b: Builder) -> None:
    m = b.manifest(
        [b.desc("application/vnd.cncf.model.weight.v1.raw", b"w", {mt.ANN_CNCF_FILEPATH: "../../w"})],
        config=b.desc(mt.MODELPACK_CONFIG, b"{}"),
        artifact_type=mt.MODELPACK_ARTIFACT,
    )
    with pytest.raises(UnsafeContentError):
        materialize(store, m)


# -- KitOps ----------------------------------------------------------------------------------------
KIT = "application/vnd.kitops.modelkit.{}.v1.tar+gzip"


def kit_manifest(b: Builder, *, with_digests: bool, legacy_tars: bool = False) -> tuple[Manifest, dict[str, str]]:
    """A ModelKit like `kit pack` makes: one tar layer per Kitfile entry, the Kitfile as the config."""
    files = {
        "model": ("models/model.gguf", tar([("models/model.gguf", b"GGUF")])),
        "modelpart": ("models/tokenizer", tar([("models/tokenizer", None), ("models/tokenizer/tok.json", b"{}")])),
        "dataset": ("data/train.csv", tar([("data/train.csv", b"a,b\n")])),
        "code": ("src", tar([("src", None), ("src/main.py", b"print(1)\n")])),
        "docs": ("README.md", tar([("README.md", b"# kit\n")])),
    }
    if legacy_tars:  # before kit 0.5 the tars held paths relative to the entry's directory
        files["model"] = ("models/model.gguf", tar([("model.gguf", b"GGUF")]))
        files["dataset"] = ("data/train.csv", tar([("train.csv", b"a,b\n")]))
    layers = {k: b.desc(KIT.format(k), gz(t)) for k, (_, t) in files.items()}

    def info(k: str) -> dict[str, str]:
        if not with_digests:
            return {}
        return {"digest": layers[k]["digest"], "diffId": sha(files[k][1])}

    kitfile = {
        "manifestVersion": "1.0.0",
        "package": {"name": "demo"},
        "model": {
            "name": "demo",
            "path": files["model"][0],
            "parts": [{"path": files["modelpart"][0], **info("modelpart")}],
            **info("model"),
        },
        "datasets": [{"name": "train", "path": files["dataset"][0], **info("dataset")}],
        "code": [{"path": files["code"][0], **info("code")}],
        "docs": [{"path": files["docs"][0], **info("docs")}],
    }
    cfg = b.desc(mt.KITOPS_CONFIG, json.dumps(kitfile).encode())
    order = ["model", "modelpart", "dataset", "code", "docs"]
    m = b.manifest([layers[k] for k in order], config=cfg)
    return m, {layers[k]["digest"]: files[k][0] for k in order}


@pytest.mark.parametrize(("with_digests", "legacy_tars"), [(True, False), (False, False), (False, True)])
def test_kitops_modelkit(store: Store, b: Builder, with_digests: bool, legacy_tars: bool) -> None:
    m, provides = kit_manifest(b, with_digests=with_digests, legacy_tars=legacy_tars)
    snap = materialize(store, m)
    assert snap.flavour == "kitops"
    assert tree(snap.path) == {
        "models": "dir",
        "models/model.gguf": "GGUF",
        "models/tokenizer": "dir",
        "models/tokenizer/tok.json": "{}",
        "data": "dir",
        "data/train.csv": "a,b\n",
        "src": "dir",
        "src/main.py": "print(1)\n",
        "README.md": "# kit\n",
    }
    assert snap.contents == provides
    assert_sealed(snap.path)


def test_kitops_entries_cannot_escape(store: Store, b: Builder, tmp_path: Path) -> None:
    evil = tar([("../../../../evil.txt", b"x"), ("/abs.txt", b"y")])
    kitfile = {"manifestVersion": "1.0.0", "code": [{"path": "."}]}
    m = b.manifest(
        [b.desc(KIT.format("code"), gz(evil))],
        config=b.desc(mt.KITOPS_CONFIG, json.dumps(kitfile).encode()),
    )
    snap = materialize(store, m)
    assert tree(snap.path) == {"evil.txt": "x", "abs.txt": "y"}  # clamped inside the root
    assert not (tmp_path / "evil.txt").exists()


# -- Docker Model Runner ---------------------------------------------------------------------------
def docker_model(b: Builder, layers: list[dict[str, Any]]) -> Manifest:
    cfg = {"config": {"format": "gguf", "size": "10"}, "descriptor": {}, "rootfs": {"type": "rootfs", "diff_ids": []}}
    return b.manifest(
        layers, config=b.desc("application/vnd.docker.ai.model.config.v0.1+json", json.dumps(cfg).encode())
    )


def test_docker_model_gguf_and_license(store: Store, b: Builder) -> None:
    m = docker_model(
        b,
        [
            b.desc("application/vnd.docker.ai.gguf.v3", b"GGUF-weights"),
            b.desc("application/vnd.docker.ai.license", b"Apache-2.0"),
            b.desc("application/vnd.docker.ai.something.new", b"?"),
        ],
    )
    snap = materialize(store, m)
    assert snap.flavour == "docker-model"
    assert tree(snap.path) == {"model.gguf": "GGUF-weights", "LICENSE": "Apache-2.0", m.layers[2].digest.hex: "?"}
    assert (snap.path / "model.gguf").stat().st_ino == store.blob_path(m.layers[0].digest).stat().st_ino


def test_docker_model_shards_and_filepaths(store: Store, b: Builder) -> None:
    m = docker_model(
        b,
        [
            b.desc("application/vnd.docker.ai.gguf.v3", b"shard1"),
            b.desc("application/vnd.docker.ai.gguf.v3", b"shard2"),
            b.desc("application/vnd.docker.ai.license", b"L1"),
            b.desc("application/vnd.docker.ai.license", b"L2"),
            b.desc("application/vnd.docker.ai.safetensors", b"st", {mt.ANN_CNCF_FILEPATH: "sub/model.safetensors"}),
            b.desc("application/vnd.docker.ai.vllm.config.tar", tar([("config.json", b"{}")])),
        ],
    )
    snap = materialize(store, m)
    assert tree(snap.path) == {
        "model-00001-of-00002.gguf": "shard1",
        "model-00002-of-00002.gguf": "shard2",
        "LICENSE-00001-of-00002": "L1",
        "LICENSE-00002-of-00002": "L2",
        "sub": "dir",
        "sub/model.safetensors": "st",
        "config.json": "{}",
    }


# -- reuse, crashes, concurrency -------------------------------------------------------------------
def test_second_materialize_reuses_snapshot(store: Store, b: Builder) -> None:
    m = b.manifest(
        [b.desc("application/x", b"x", {mt.ANN_TITLE: "x"}), b.desc("application/x", b"u")], artifact_type=AT
    )
    first = materialize(store, m)
    before = {p: os.lstat(p).st_mtime_ns for p in (first.path, first.path / "x")}
    listing = sorted(os.listdir(store.root / "snapshots"))
    again = materialize(store, m)
    assert not again.created and again.path == first.path and again.key == first.key
    assert again.files == first.files == 1
    assert again.warnings == first.warnings and len(again.warnings) == 1
    assert again.contents == first.contents
    assert sorted(os.listdir(store.root / "snapshots")) == listing
    assert {p: os.lstat(p).st_mtime_ns for p in before} == before


def test_crashed_build_is_cleaned_next_time(store: Store, b: Builder) -> None:
    m = b.manifest([b.desc("application/x", b"x", {mt.ANN_TITLE: "x"})], artifact_type=AT)
    snaps = store.root / "snapshots"
    snaps.mkdir(parents=True)
    crashed = snaps / f".build-{m.digest.hex}-abc123"
    (crashed / "sub").mkdir(parents=True)
    (crashed / "sub" / "f").write_text("partial")
    os.chmod(crashed / "sub", 0o555)
    other = snaps / f".build-{'b' * 64}-zzz"  # another key, nobody building it
    other.mkdir()
    snap = materialize(store, m)
    assert snap.created
    assert leftovers(store) == []


def test_missing_snapshot_dir_is_rebuilt(store: Store, b: Builder) -> None:
    from imagevol.materialize import force_rmtree

    m = b.manifest([b.desc("application/x", b"x", {mt.ANN_TITLE: "x"})], artifact_type=AT)
    first = materialize(store, m)
    force_rmtree(first.path)
    again = materialize(store, m)
    assert again.created and tree(again.path) == {"x": "x"}


def _materialize_in_child(root: str, raw: bytes, start: Any, out: Any) -> None:
    m = parse_manifest(raw)
    store = Store(root)
    start.wait()
    snap = materialize(store, m)
    out.put((snap.created, str(snap.path), snap.files))


def test_concurrent_materialize_builds_once(store: Store, b: Builder) -> None:
    big = os.urandom(1 << 20)
    layers = [b.desc(mt.OCI_LAYER_GZIP, gz(tar([(f"d{i}/f", big)])), {mt.ANN_TITLE: f"t{i}"}) for i in range(4)]
    m = b.manifest(layers, artifact_type=AT)
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    out = ctx.Queue()
    procs = [ctx.Process(target=_materialize_in_child, args=(str(store.root), m.raw, start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sorted(r[0] for r in results) == [False, True]
    assert len({r[1] for r in results}) == 1 and {r[2] for r in results} == {4}
    names = [n for n in os.listdir(store.root / "snapshots") if not n.startswith((".info-", ".record-"))]
    assert names == [snapshot_key(m)]


def test_digest_is_a_digest(store: Store, b: Builder) -> None:
    m = b.manifest([b.desc("application/x", b"x", {mt.ANN_TITLE: "x"})], artifact_type=AT)
    snap = materialize(store, m)
    assert isinstance(snap.digest, Digest)


# -- hostile depths and leftover builds (issue item 9) ---------------------------------------------
@pytest.fixture
def deep_cleanup(tmp_path: Path) -> Any:
    """Remove deep trees a failing test leaves (pytest's own cleanup is recursive)."""
    yield
    for p in tmp_path.iterdir():
        rm_deep(p)


def test_title_3000_components_refused_before_building(store: Store, b: Builder, deep_cleanup: None) -> None:
    deep = b.manifest([b.desc("application/x", b"x", {mt.ANN_TITLE: "a/" * 3000 + "f"})], artifact_type=AT)
    with pytest.raises(UnsafeContentError, match="6001 bytes long, the limit is 4095"):
        materialize(store, deep)
    assert leftovers(store) == []
    ok = b.manifest([b.desc("application/x", b"y", {mt.ANN_TITLE: "y"})], artifact_type=AT)
    assert tree(materialize(store, ok).path) == {"y": "y"}


@pytest.mark.parametrize(
    ("ann", "value", "needle"),
    [
        (mt.ANN_TITLE, "a/" * 257 + "f", "more than 256 components"),
        (mt.ANN_CNCF_FILEPATH, "b/" * 300 + "f", "more than 256 components"),
        (mt.ANN_TITLE, ("x" * 200 + "/") * 21, "bytes long, the limit is 4095"),
    ],
)
def test_path_depth_and_length_limits(store: Store, b: Builder, ann: str, value: str, needle: str) -> None:
    m = b.manifest([b.desc("application/x", b"x", {ann: value})], artifact_type=AT)
    with pytest.raises(UnsafeContentError, match=needle):
        materialize(store, m)
    assert leftovers(store) == []
    # at the limit: accepted
    at = b.manifest([b.desc("application/x", b"z", {ann: "a/" * 255 + "f"})], artifact_type=AT)
    assert materialize(store, at).files == 1


def test_kitfile_path_over_the_depth_limit_refused(store: Store, b: Builder) -> None:
    kitfile = {"manifestVersion": "1.0", "model": {"path": "m/" * 300 + "w.bin"}}
    cfg = b.desc(mt.KITOPS_CONFIG, json.dumps(kitfile).encode())
    m = b.manifest([b.desc("application/vnd.kitops.modelkit.model.v1.raw", b"w")], config=cfg)
    with pytest.raises(UnsafeContentError, match="more than 256 components"):
        materialize(store, m)
    assert leftovers(store) == []


def test_force_rmtree_and_walks_handle_any_depth(tmp_path: Path, deep_cleanup: None) -> None:
    from imagevol.materialize import count_files, force_rmtree

    make_deep(tmp_path / "t", 3000, seal=True)
    assert count_files(tmp_path / "t") == 1
    force_rmtree(tmp_path / "t")
    assert not os.path.lexists(tmp_path / "t")


def test_gc_removes_a_3000_deep_stale_build(store: Store, b: Builder, deep_cleanup: None) -> None:
    from imagevol.compose import gc

    snaps = store.root / "snapshots"
    store.ensure()
    snaps.mkdir(mode=0o700)
    make_deep(snaps / f".build-{'c' * 64}-dead01", 3000, seal=True)
    res = gc(root=store, dry_run=True)
    assert res.removed_builds == [f".build-{'c' * 64}-dead01"] and leftovers(store) != []
    res = gc(root=store)
    assert res.removed_builds == [f".build-{'c' * 64}-dead01"]
    assert leftovers(store) == []


def test_gc_keeps_a_build_in_progress(store: Store, b: Builder) -> None:
    from imagevol.compose import gc
    from imagevol.materialize import _lock_name

    snaps = store.root / "snapshots"
    store.ensure()
    snaps.mkdir(mode=0o700)
    (snaps / f".build-{'d' * 64}-live01").mkdir()
    with store.lock(_lock_name("d" * 64)):
        assert gc(root=store).removed_builds == []
    assert leftovers(store) == [f".build-{'d' * 64}-live01"]


@pytest.fixture
def mounted_leftover(store: Store) -> Any:
    """A ``.build-*`` leftover with a file system mounted inside: imagevol refuses to remove it."""
    if os.geteuid() != 0:
        if os.environ.get("IMAGEVOL_ALLOW_SKIP") == "1":
            pytest.skip("needs root (mount)")
        pytest.fail("needs root (mount); set IMAGEVOL_ALLOW_SKIP=1 to skip", pytrace=False)
    import subprocess

    snaps = store.root / "snapshots"
    store.ensure()
    snaps.mkdir(mode=0o700)
    stuck = snaps / f".build-{'e' * 64}-stuck1"
    (stuck / "m").mkdir(parents=True)
    (stuck / "gone").write_text("removable")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(stuck / "m")], check=True)
    try:
        yield stuck
    finally:
        subprocess.run(["umount", str(stuck / "m")], check=True)


def test_undeletable_leftover_build_does_not_block_other_builds(store: Store, b: Builder, mounted_leftover) -> None:
    from imagevol.compose import gc

    m = b.manifest([b.desc("application/x", b"x", {mt.ANN_TITLE: "x"})], artifact_type=AT)
    assert tree(materialize(store, m).path) == {"x": "x"}
    m2 = b.manifest([b.desc("mediatype/x", b"x2", {mt.ANN_TITLE: "x2"})], artifact_type=AT)
    assert tree(materialize(store, m2).path) == {"x2": "x2"}
    assert gc(root=store).removed_builds == []  # gc does not fail either
    assert os.path.ismount(mounted_leftover / "m")
    assert not (mounted_leftover / "gone").exists()  # what could be removed is gone


# -- snapshot records and their check (issue item 2) -----------------------------------------------
def _record(store: Store, key: str) -> dict[str, Any]:
    from imagevol.materialize import read_record

    found = read_record(store.root / "snapshots" / f".record-{key}.json", key)
    assert found is not None
    header, entries = found
    return {**header, "entries": list(entries)}


def _mixed(store: Store, b: Builder) -> Manifest:
    """An artifact with a raw file (hard link to its blob) and a tar+gzip directory holding a file,
    an executable, a symlink and a subdirectory."""
    return b.manifest(
        [
            b.desc("application/x", b"raw bytes", {mt.ANN_TITLE: "raw.bin"}),
            b.desc(
                mt.OCI_LAYER_GZIP,
                gz(
                    tar(
                        [
                            ("d/", None),
                            ("d/f", b"file"),
                            ("d/run", ("mode", b"#!/bin/sh\n", 0o755)),
                            ("d/l", ("symlink", "f")),
                            ("d/s/", None),
                        ]
                    )
                ),
                {mt.ANN_TITLE: "d"},
            ),
        ],
        artifact_type=AT,
    )


def test_record_written_at_build_time(store: Store, b: Builder) -> None:
    from imagevol.materialize import check_snapshots

    m = _mixed(store, b)
    snap = materialize(store, m)
    doc = _record(store, snap.key)
    assert doc["version"] == 1 and doc["key"] == snap.key and doc["digest"] == str(m.digest)
    entries = {e[0]: e for e in doc["entries"]}
    assert set(entries) == {".", "raw.bin", "d", "d/f", "d/run", "d/l", "d/s"}
    raw_blob = m.layers[0].digest
    assert entries["raw.bin"][1:4] == ["file", stat.S_IMODE(os.stat(snap.path / "raw.bin").st_mode), 9]
    assert entries["raw.bin"][6] == str(raw_blob)  # taken from the blob, not re-read
    assert entries["d/f"][6] == sha(b"file") and entries["d/f"][3] == 4
    assert entries["d/run"][2] == stat.S_IMODE(os.stat(snap.path / "d/run").st_mode)
    assert entries["d/run"][2] & 0o111  # the real mode, whatever the sealing keeps
    assert entries["d/l"][1] == "symlink" and entries["d/l"][6] == "f"
    assert entries["d/s"][1] == "dir" and entries["."][1] == "dir"
    res = check_snapshots(store)
    assert res.checked == 1 and res.damaged == {} and res.unverifiable == []


@pytest.mark.parametrize(
    ("damage", "needle", "quick_sees"),
    [
        ("flip", "content: d/f: sha256:", False),
        ("chmod", "changed: d/f: mode", True),
        ("delete", "missing: d/f", True),
        ("extra", "extra: d/new", True),
        ("retarget", "changed: d/l: target 'f' -> 'run'", True),
        ("truncate", "changed: d/f: size 4 -> 2", True),
        ("replace-dir", "changed: d/s: type dir -> file", True),
        ("record", "record unreadable", True),
    ],
)
def test_check_finds_damage_and_repair_drops_the_snapshot(
    store: Store, b: Builder, damage: str, needle: str, quick_sees: bool
) -> None:
    from imagevol.materialize import check_snapshots

    m = _mixed(store, b)
    snap = materialize(store, m)
    p = snap.path
    os.chmod(p / "d", 0o755)
    if damage == "flip":
        os.chmod(p / "d/f", 0o644)
        (p / "d/f").write_bytes(b"fil3")  # same size, same mode: only the content differs
        os.chmod(p / "d/f", _record_mode(store, snap.key, "d/f"))
    elif damage == "chmod":
        os.chmod(p / "d/f", 0o4755)
    elif damage == "delete":
        (p / "d/f").unlink()
    elif damage == "extra":
        (p / "d/new").write_bytes(b"")
    elif damage == "retarget":
        (p / "d/l").unlink()
        (p / "d/l").symlink_to("run")
    elif damage == "truncate":
        os.chmod(p / "d/f", 0o644)
        (p / "d/f").write_bytes(b"fi")
        os.chmod(p / "d/f", _record_mode(store, snap.key, "d/f"))
    elif damage == "replace-dir":
        (p / "d/s").rmdir()
        (p / "d/s").write_bytes(b"")
    elif damage == "record":
        (store.root / "snapshots" / f".record-{snap.key}.json").write_bytes(b"{not json")
    if damage not in ("extra", "replace-dir", "delete", "retarget"):
        os.chmod(p / "d", _record_mode(store, snap.key, "d") if damage != "record" else 0o555)
    res = check_snapshots(store)
    assert list(res.damaged) == [snap.key]
    assert any(needle in d for d in res.damaged[snap.key]), res.damaged
    quick = check_snapshots(store, quick=True)
    assert (snap.key in quick.damaged) == quick_sees
    fixed = check_snapshots(store, repair=True)
    assert fixed.dropped == [snap.key] and fixed.problems_left == []
    assert not p.exists() and leftovers(store) == []
    again = materialize(store, m)
    assert again.created and tree(again.path)["d/f"] == "file"
    assert check_snapshots(store).damaged == {}


@pytest.mark.parametrize(
    ("cut", "needle"),
    [
        (lambda lines: lines[:-1], "cut short"),  # the end line lost
        (lambda lines: lines[:-3] + lines[-1:], "entry count does not match"),
        (lambda lines: [*lines[:2], "[1, 2]\n", *lines[2:]], "malformed entry on line 3"),
    ],
    ids=["no-end", "entries-lost", "malformed-line"],
)
def test_a_damaged_record_is_unreadable(store: Store, b: Builder, cut: Any, needle: str) -> None:
    from imagevol.materialize import check_snapshots

    snap = materialize(store, _mixed(store, b))
    path = store.root / "snapshots" / f".record-{snap.key}.json"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(cut(lines)))
    res = check_snapshots(store)
    assert list(res.damaged) == [snap.key] and len(res.damaged[snap.key]) == 1, res.damaged
    assert res.damaged[snap.key][0].startswith("record unreadable") and needle in res.damaged[snap.key][0]


def test_problems_are_capped_and_counted(store: Store, b: Builder) -> None:
    """A snapshot with 50 files gone lists 20 of them and counts the rest (memory stays flat in
    the damage too)."""
    from imagevol.materialize import check_snapshots

    m = b.image([tar([(f"f{i:02d}", b"x") for i in range(50)])])
    snap = materialize(store, m)
    os.chmod(snap.path, 0o755)
    for i in range(50):
        (snap.path / f"f{i:02d}").unlink()
    problems = check_snapshots(store).damaged[snap.key]
    assert problems[:2] == ["missing: f00", "missing: f01"] and len(problems) == 21
    assert problems[-1] == "... and 30 more"


def test_large_files_are_hashed_as_written_small_ones_when_recorded(
    store: Store, b: Builder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files of HASH_AS_WRITTEN_MIN bytes or more are hashed from the data the applier writes (no
    re-read); smaller ones are read once when the record is written, so nothing is kept per file."""
    import imagevol.materialize as mat
    import imagevol.materialize.record as mat_record

    big = os.urandom(mat.HASH_AS_WRITTEN_MIN) + b"tail"
    m = b.image([tar([("big.bin", big), ("small.txt", b"small"), ("d/", None)])])
    read: list[str] = []
    real = mat_record._hash_at
    monkeypatch.setattr(mat_record, "_hash_at", lambda dfd, name, *a: read.append(name) or real(dfd, name, *a))
    snap = materialize(store, m)
    assert read == ["small.txt"]
    entries = {e[0]: e for e in _record(store, snap.key)["entries"]}
    assert entries["big.bin"][6] == sha(big) and entries["small.txt"][6] == sha(b"small")
    assert [e[0] for e in _record(store, snap.key)["entries"]] == ["big.bin", "d", "small.txt", "."]


def _record_mode(store: Store, key: str, rel: str) -> int:
    return next(e[2] for e in _record(store, key)["entries"] if e[0] == rel)


def test_snapshot_without_record_is_unverifiable_and_rebuilt_on_repair(store: Store, b: Builder) -> None:
    from imagevol.materialize import check_snapshots

    m = _mixed(store, b)
    snap = materialize(store, m)
    (store.root / "snapshots" / f".record-{snap.key}.json").unlink()  # as built before records existed
    res = check_snapshots(store)
    assert res.unverifiable == [snap.key] and res.damaged == {} and res.problems_left == []
    fixed = check_snapshots(store, repair=True)
    assert fixed.dropped == [snap.key]
    again = materialize(store, m)
    assert again.created and _record(store, again.key)["version"] == 1
    assert check_snapshots(store).unverifiable == []


def test_image_snapshot_record_covers_every_layer(store: Store, b: Builder) -> None:
    from imagevol.materialize import check_snapshots

    m = b.image([tar([("a", b"1"), ("b/", None), ("b/c", b"22")]), tar([("a", b"333"), ("b/.wh.c", b"")])])
    snap = materialize(store, m)
    entries = {e[0]: e for e in _record(store, snap.key)["entries"]}
    assert set(entries) == {".", "a", "b"}
    assert entries["a"][3] == 3 and entries["a"][6] == sha(b"333")
    assert check_snapshots(store).damaged == {}


def test_record_of_extracted_files_hashed_as_written(store: Store, b: Builder) -> None:
    """Files the applier writes are hashed from the data it writes: through the page cache, around
    it (O_DIRECT, 8 MiB and more) and with holes (runs of zeros) alike; a raw blob copied with its
    own mode is read back. Every digest agrees with the bytes on disk."""
    from imagevol.materialize import check_snapshots

    big = os.urandom(9 << 20)
    holes = os.urandom(1000) + bytes(3 << 20) + os.urandom(1000)
    m = b.image([tar([("big", big), ("holes", holes), ("small", b"s")]), tar([("small", b"t"), ("new", b"n")])])
    snap = materialize(store, m)
    entries = {e[0]: e for e in _record(store, snap.key)["entries"]}
    assert entries["big"][6] == sha(big) and entries["holes"][6] == sha(holes)
    assert entries["small"][6] == sha(b"t") and entries["new"][6] == sha(b"n")
    exe = b.manifest(
        [
            b.desc(
                "application/vnd.cncf.model.weight.v1.raw",
                b"#!x",
                {mt.ANN_CNCF_FILEPATH: "run", mt.ANN_CNCF_FILE_METADATA: mp_meta("run", 0o755)},
            )
        ],
        artifact_type=mt.MODELPACK_ARTIFACT,
        config=b.desc(mt.MODELPACK_CONFIG, b"{}"),
    )
    s2 = materialize(store, exe)
    assert {e[0]: e for e in _record(store, s2.key)["entries"]}["run"][6] == sha(b"#!x")
    assert check_snapshots(store).damaged == {}
