"""Issue 14 "Runtime fidelity": one named test per disagreement the issue lists (cases 1-9).

Layouts are real OCI image layouts on disk (tests.support.layout); case 8 builds its layer with
Debian's umoci and mounts it as root; case 9 materializes into a real store.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from imagevol import mediatypes as mt
from imagevol.errors import ContentRefusedError, InvalidReferenceError
from imagevol.materialize import materialize, snapshot_key
from imagevol.platform import parse_platform_list
from imagevol.reference import parse_any, parse_reference, runtime_reference
from imagevol.resolve.explain import explain, predict, render_explain
from imagevol.resolve.runtimes import NESTED_ARTIFACT_ERROR, NESTED_IMAGE_ERROR, crio_image_name
from imagevol.sources.factory import open_source
from imagevol.sources.layout import LayoutSource
from imagevol.store import Store
from tests.support.clirun import Imagevol
from tests.support.layout import OCI_CONFIG, OCI_MANIFEST, LayoutWriter, dumps, gzip_bytes, plat, tar_bytes
from tests.support.need import need_tool, root_only

AMD64 = parse_platform_list("linux/amd64")


def _source(w: LayoutWriter, desc: dict[str, Any], tag: str) -> LayoutSource:
    w.tag(desc, tag)
    return LayoutSource(parse_any(f"oci:{w.path}:{tag}"))


def _predict(src: LayoutSource, runtime: str, node: str = "linux/amd64"):
    return predict(src, src.resolve(), parse_platform_list(node), runtime, "native")


def _image_with(w: LayoutWriter, files: dict[str, bytes], *, config: bytes | None = None, **extra: Any) -> dict:
    raw = tar_bytes(files)
    layer = w.blob(gzip_bytes(raw), "application/vnd.oci.image.layer.v1.tar+gzip")
    cfg_doc = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [layer_diff(raw)]}}
    cfg = w.blob(config if config is not None else dumps(cfg_doc), OCI_CONFIG)
    man = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg, "layers": [layer], **extra}
    return w.blob(dumps(man), OCI_MANIFEST)


def layer_diff(raw: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(raw).hexdigest()


# --- 1 ---------------------------------------------------------------------------------------
def test_case1_nested_index_crio_cannot_mount_imagevol_descends(tmp_path: Path) -> None:
    w = LayoutWriter(tmp_path / "l")
    inner = w.index([(w.image({"a": b"amd"}), plat("linux", "amd64"))])
    src = _source(w, w.index([(inner, plat("linux", "amd64"))]), "nested")
    crio = _predict(src, "crio")
    assert not crio.mounts and crio.exit_code == 4
    assert crio.error == (
        f"unable to pull image or OCI artifact: pull image err: {NESTED_IMAGE_ERROR}; artifact err: "
        f"{NESTED_ARTIFACT_ERROR}"
    )
    assert "Unexpectedly received a manifest list instead of a manifest for a single image" in crio.error
    assert "Treating manifest lists as individual manifests is not implemented" in crio.error
    own = _predict(src, "imagevol")
    assert own.mounts and any("nested index" in n for n in own.notes)
    assert _predict(src, "containerd").mounts


# --- 2 ---------------------------------------------------------------------------------------
def test_case2_crio_prefers_zstd_instance_among_duplicates(tmp_path: Path) -> None:
    w = LayoutWriter(tmp_path / "l")
    gz = w.image({"a": b"gzip"})
    zs = dict(w.image({"a": b"zstd"}), annotations={mt.ANN_ZSTD_INSTANCE: "true"})
    src = _source(w, w.index([(gz, plat("linux", "amd64")), (zs, plat("linux", "amd64"))]), "dup")
    crio = _predict(src, "crio")
    assert crio.mounts and crio.selection is not None
    assert str(crio.selection.descriptor.digest) == zs["digest"]
    assert crio.selection.steps[-1].chosen == 1
    # containerd has no such preference: the first of equal platforms.
    assert str(_predict(src, "containerd").selection.descriptor.digest) == gz["digest"]


# --- 3 ---------------------------------------------------------------------------------------
def test_case3_image_with_artifact_type_is_pulled_as_image_by_crio(tmp_path: Path) -> None:
    w = LayoutWriter(tmp_path / "l")
    src = _source(w, _image_with(w, {"bin/app": b"x"}, artifactType="application/vnd.example.sbom"), "typed")
    crio = _predict(src, "crio")
    assert crio.mounts
    assert "mounts manifest" in crio.summary and ": image, 1 layer" in crio.summary
    assert "EMPTY" not in crio.summary
    assert any("image copy succeeds first" in n for n in crio.notes)


# --- 4 ---------------------------------------------------------------------------------------
def test_case4_containerd_keeps_only_first_platformless_entry(tmp_path: Path) -> None:
    w = LayoutWriter(tmp_path / "l")
    arm = w.image({"a": b"arm"}, arch="arm64")
    amd = w.image({"a": b"amd"}, arch="amd64")
    root = w.index([(arm, None), (amd, None)])
    src = _source(w, root, "two-platformless")
    cd = _predict(src, "containerd")
    assert not cd.mounts and cd.exit_code == 3
    assert cd.error == f"no match for platform in manifest {root['digest']}: not found"
    # A platformed match is sorted before the platform-less ones.
    src2 = _source(w, w.index([(arm, None), (amd, plat("linux", "amd64"))]), "platformed-later")
    assert str(_predict(src2, "containerd").selection.descriptor.digest) == amd["digest"]


def test_case4_containerd_platformless_config_not_json_is_a_json_error(tmp_path: Path) -> None:
    w = LayoutWriter(tmp_path / "l")
    bad = _image_with(w, {"a": b"x"}, config=b"garbage")
    src = _source(w, w.index([(bad, None), (w.image({"a": b"amd"}), None)]), "garbage-config")
    cd = _predict(src, "containerd")
    assert not cd.mounts
    assert cd.error == "invalid character 'g' looking for beginning of value"
    assert cd.exit_code == 4


# --- 5 ---------------------------------------------------------------------------------------
def test_case5_containerd21_ignores_os_features_in_index(tmp_path: Path) -> None:
    w = LayoutWriter(tmp_path / "l")
    feat = w.image({"a": b"feat"})
    p = dict(plat("linux", "amd64"), **{"os.features": ["sse4"]})
    src = _source(w, w.index([(feat, p)]), "features")
    cd = _predict(src, "containerd")  # main's rules would refuse: the node lacks sse4
    assert cd.mounts and str(cd.selection.descriptor.digest) == feat["digest"]


# --- 6 ---------------------------------------------------------------------------------------
def test_case6_error_texts_are_the_runtimes_own(tmp_path: Path) -> None:
    w = LayoutWriter(tmp_path / "l")
    root = w.index([(w.image({"a": b"s"}, arch="s390x"), plat("linux", "s390x"))])
    src = _source(w, root, "s390x")
    inner = 'no image found in image index for architecture "amd64", variant "", OS "linux"'
    assert _predict(src, "crio").error == (
        f"unable to pull image or OCI artifact: pull image err: choosing an image from manifest list "
        f"oci:{w.path}:s390x: {inner}; artifact err: choose instance: {inner}"
    )
    assert _predict(src, "containerd").error == f"no match for platform in manifest {root['digest']}: not found"
    dl = _source(w, w.index([(w.image({"a": b"s"}, arch="s390x", docker=True), plat("linux", "s390x"))], docker=True),
                 "docker-list")  # fmt: skip
    err = _predict(dl, "crio").error or ""
    assert err.endswith("; artifact err: provided artifact is a container image")
    assert 'no image found in manifest list for architecture "amd64"' in err
    # CRI-O names a registry image with its transport and the familiar form.
    assert crio_image_name(open_source("docker.io/foo.com/bar:v1")) == "docker://foo.com/bar:v1"
    assert crio_image_name(open_source("registry.example:5000/a/b@sha256:" + "a" * 64)).startswith(
        "docker://registry.example:5000/a/b@sha256:"
    )


# --- 7 ---------------------------------------------------------------------------------------
def test_case7_references_as_the_runtimes_parse_them(tmp_path: Path) -> None:
    assert runtime_reference("192.168.1.1:75050/repo").error is None
    with pytest.raises(InvalidReferenceError):
        parse_reference("192.168.1.1:75050/repo")  # imagevol stays stricter for its own pulls
    r = runtime_reference("foo_bar.com/repo")
    assert r.error is None and r.string == "foo_bar.com/repo" and r.domain == ""
    assert runtime_reference("x@sha384:" + "b" * 96).error is None
    assert runtime_reference("docker.io/foo.com/bar").familiar == "foo.com/bar"
    d = "sha256:" + "c" * 64
    assert runtime_reference(f"ubuntu:22.04@{d}").docker_ref == f"docker.io/library/ubuntu@{d}"
    # explain says what containerd's CRI pulls when it differs.
    w = LayoutWriter(tmp_path / "l")
    w.tag(w.image({"a": b"x"}), "t")
    result = explain(open_source(f"example.com/app:v1@{d}"), [AMD64], ["containerd"], "native",
                     resolved=LayoutSource(parse_any(f"oci:{w.path}:t")).resolve())  # fmt: skip
    assert result["references"]["dockerRef"] == f"example.com/app@{d}"
    text = render_explain("example.com/app", result)
    assert f"containerd's CRI pulls example.com/app@{d}" in text


def test_case7_cli_says_runtimes_accept_what_imagevol_refuses(tmp_path: Path) -> None:
    iv = Imagevol(tmp_path / "store", tmp_path / "home")
    out = iv.run("explain", "192.168.1.1:75050/repo")
    assert out.returncode == 2, out.stderr
    assert "CRI-O 1.34 and containerd 2.1 accept it (as 192.168.1.1:75050/repo:latest)" in out.stderr


# --- 8 ---------------------------------------------------------------------------------------
@root_only("mounts the volume")
def test_case8_umoci_insert_layer_without_tar_end_mounts(tmp_path: Path) -> None:
    need_tool("umoci")
    w = LayoutWriter(tmp_path / "l")
    w.tag(w.image({"a.txt": b"base"}), "base")
    add = tmp_path / "add"
    (add / "sub").mkdir(parents=True)
    (add / "sub" / "f.txt").write_bytes(b"hello world, 13")  # 15 bytes: the last entry needs padding
    (add / "g").write_bytes(b"x")
    subprocess.run(["umoci", "insert", "--image", f"{w.path}:base", str(add), "/opt/add"], check=True)
    # umoci 0.4.7 ends the layer without padding and without end-of-archive blocks.
    man = json.loads((w.path / "blobs" / "sha256" / _tagged(w.path, "base")).read_bytes())
    import gzip

    last = gzip.decompress((w.path / "blobs" / "sha256" / man["layers"][-1]["digest"][7:]).read_bytes())
    assert len(last) % 512 != 0
    iv = Imagevol(tmp_path / "store", tmp_path / "home")
    target = tmp_path / "mnt"
    target.mkdir()
    iv.watch.append(target)
    try:
        out = iv.run("mount", f"oci:{w.path}:base", str(target))
        assert out.returncode == 0, out.stderr
        assert (target / "opt" / "add" / "sub" / "f.txt").read_bytes() == b"hello world, 13"
        assert (target / "opt" / "add" / "g").read_bytes() == b"x"
        assert (target / "a.txt").read_bytes() == b"base"
    finally:
        iv.run("unmount", str(target))


def test_case8_truncated_entry_data_is_still_refused(tmp_path: Path) -> None:
    """Go's reader ends cleanly inside the padding only: missing file data stays an error."""
    from imagevol.unpack.applier import apply_layer

    raw = tar_bytes({"f": b"x" * 1000})
    cut = raw[: 512 + 700]  # header + part of the data
    (tmp_path / "r").mkdir()
    with pytest.raises(ContentRefusedError, match="unexpected end of data"):
        apply_layer(tmp_path / "r", __import__("io").BytesIO(cut), compression="none")
    ok = raw[: 512 + 1000 + 5]  # complete data, padding cut short, no end blocks
    (tmp_path / "s").mkdir()
    apply_layer(tmp_path / "s", __import__("io").BytesIO(ok), compression="none")
    assert (tmp_path / "s" / "f").read_bytes() == b"x" * 1000


def _tagged(layout: Path, tag: str) -> str:
    idx = json.loads((layout / "index.json").read_text())
    for m in idx["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return m["digest"][7:]
    raise AssertionError(tag)


# --- 9 ---------------------------------------------------------------------------------------
def _artifact(w: LayoutWriter, layers: list[dict[str, Any]]) -> dict[str, Any]:
    cfg = w.blob(b"{}", mt.OCI_EMPTY)
    man = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.model",
           "config": cfg, "layers": layers}  # fmt: skip
    return w.blob(dumps(man), OCI_MANIFEST)


def test_case9_untitled_tar_artifact_layers_extract_at_root(tmp_path: Path) -> None:
    w = LayoutWriter(tmp_path / "l")
    layers = [
        w.blob(tar_bytes({"model/w.bin": b"weights"}), mt.OCI_LAYER),
        w.blob(gzip_bytes(tar_bytes({"cfg.json": b"{}"})), mt.OCI_LAYER_GZIP),
    ]
    src = _source(w, _artifact(w, layers), "untitled")
    crio = _predict(src, "crio")
    assert crio.mounts and "EMPTY" in crio.summary
    assert any("imagevol extracts them at the volume root, CRI-O skips them" in n for n in crio.notes)
    store = Store(tmp_path / "store")
    _, man = src.resolve()
    for d in (man.config, *man.layers):
        store.put_bytes(src.blob_bytes(d, 1 << 20))
    store.put_bytes(man.raw)
    seen: list[str] = []
    snap = materialize(store, man, warn=seen.append)
    assert (snap.path / "model" / "w.bin").read_bytes() == b"weights"
    assert (snap.path / "cfg.json").read_bytes() == b"{}"
    assert snap.contents == {str(x.digest): "/" for x in man.layers}
    assert snap.key == snapshot_key(man) != man.digest.hex  # never reuses a snapshot that skipped them


def test_case9_every_layer_skipped_fails_instead_of_empty_volume(tmp_path: Path) -> None:
    w = LayoutWriter(tmp_path / "l")
    layers = [w.blob(b"raw bytes", "application/vnd.example.raw")]
    src = _source(w, _artifact(w, layers), "all-skipped")
    store = Store(tmp_path / "store")
    _, man = src.resolve()
    for d in (man.config, *man.layers):
        store.put_bytes(src.blob_bytes(d, 1 << 20))
    store.put_bytes(man.raw)
    with pytest.raises(ContentRefusedError, match="every layer was skipped") as ei:
        materialize(store, man)
    assert "org.opencontainers.image.title" in (ei.value.hint or "")
