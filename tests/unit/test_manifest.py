"""Digests, media types and manifest parsing: every refusal rule, classification, descriptors."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from imagevol import mediatypes as mt
from imagevol.digest import Digest, Verifier, digest_bytes, is_digest
from imagevol.errors import DigestMismatchError, InvalidDigestError, ManifestError
from imagevol.manifest import MAX_MANIFEST_SIZE, Index, Manifest, flavour, parse_config, parse_manifest

H = "a" * 64
D = f"sha256:{H}"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (D, True),
        ("sha512:" + "b" * 128, True),
        ("sha256:" + "A" * 64, False),
        ("sha256:" + "a" * 63, False),
        ("sha256:" + "a" * 65, False),
        ("sha512:" + "a" * 64, False),
        ("md5:" + "a" * 32, False),
        ("sha256:../../etc/passwd", False),
        ("sha256:" + "g" * 64, False),
        ("sha256", False),
        (":" + H, False),
        ("", False),
        ("sha256:" + "a" * 62 + "/x", False),
        ("SHA256:" + H, False),
    ],
)
def test_digest_validation(value: str, ok: bool) -> None:
    assert is_digest(value) is ok
    if not ok:
        with pytest.raises(InvalidDigestError):
            Digest(value)


def test_digest_parts_and_verifier() -> None:
    d = digest_bytes(b"hello")
    assert d.algorithm == "sha256" and d.hex == hashlib.sha256(b"hello").hexdigest()
    v = Verifier(d)
    v.update(b"hel")
    v.update(b"lo")
    v.verify()
    v2 = Verifier(d)
    v2.update(b"hellO")
    with pytest.raises(DigestMismatchError) as ei:
        v2.verify("blob")
    assert ei.value.exit_code == 4


def desc(media_type: str = mt.OCI_LAYER_GZIP, data: bytes = b"x", **extra) -> dict:
    return {"mediaType": media_type, "digest": str(digest_bytes(data)), "size": len(data), **extra}


def manifest_doc(**extra) -> dict:
    return {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": desc(mt.OCI_CONFIG, b"{}"),
        "layers": [desc()],
        **extra,
    }


def b(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def test_parse_manifest_and_index() -> None:
    m = parse_manifest(b(manifest_doc()), mt.OCI_MANIFEST)
    assert isinstance(m, Manifest) and m.is_image and m.kind == "image" and flavour(m) == "image"
    idx = parse_manifest(
        b(
            {
                "schemaVersion": 2,
                "mediaType": mt.OCI_INDEX,
                "manifests": [
                    desc(mt.OCI_MANIFEST, platform={"os": "linux", "architecture": "arm64"}),
                    desc("application/vnd.example.unknown"),
                    desc(mt.OCI_INDEX, b"y"),
                ],
            }
        )
    )
    assert isinstance(idx, Index)
    assert [d.media_type for d in idx.manifests] == [mt.OCI_MANIFEST, mt.OCI_INDEX]
    assert [d.media_type for d in idx.ignored] == ["application/vnd.example.unknown"]
    assert str(idx.manifests[0].platform) == "linux/arm64"


@pytest.mark.parametrize(
    ("body", "ctype", "needle"),
    [
        (b({"schemaVersion": 1, "name": "x", "fsLayers": []}), None, "schema1"),
        (b({"schemaVersion": 2}), mt.DOCKER_SCHEMA1_SIGNED, "schema1"),
        (b({**manifest_doc(), "manifests": []}), None, "ambiguous"),
        (b({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [], "layers": []}), None, "ambiguous"),
        (b(manifest_doc()), mt.OCI_INDEX, "served as"),
        (b({**manifest_doc(), "mediaType": mt.DOCKER_MANIFEST}), mt.OCI_MANIFEST, "served as"),
        (b"not json", mt.OCI_MANIFEST, "not valid JSON"),
        (b"[1,2]", mt.OCI_MANIFEST, "not a JSON object"),
        (b({"schemaVersion": 3}), None, "schemaVersion"),
        (b({**manifest_doc(), "mediaType": "application/vnd.example"}), None, "unsupported media type"),
        (b({**manifest_doc(), "layers": [{"mediaType": "x", "digest": "sha256:../../x", "size": 1}]}), None, "digest"),
        (b({**manifest_doc(), "layers": [{**desc(), "size": -1}]}), None, "size"),
        (b({**manifest_doc(), "layers": [{**desc(), "annotations": {"a": 1}}]}), None, "annotations"),
        (
            b({**manifest_doc(), "config": {**desc(mt.OCI_CONFIG, b"{}"), "data": base64.b64encode(b"{1}").decode()}}),
            None,
            "embedded data",
        ),
        (
            b(
                {
                    "schemaVersion": 2,
                    "mediaType": mt.OCI_INDEX,
                    "manifests": [desc(mt.OCI_MANIFEST, platform={"os": 1, "architecture": "amd64"})],
                }
            ),
            None,
            "platform",
        ),
        (b({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "layers": []}), None, "no config"),
    ],
)
def test_refused(body: bytes, ctype: str | None, needle: str) -> None:
    with pytest.raises(ManifestError) as ei:
        parse_manifest(body, ctype)
    assert needle in str(ei.value)
    assert ei.value.exit_code == 4


def test_generic_content_type_accepted_and_params_stripped() -> None:
    body = b(manifest_doc())
    assert isinstance(parse_manifest(body, "application/json"), Manifest)
    assert isinstance(parse_manifest(body, mt.OCI_MANIFEST + "; charset=utf-8"), Manifest)
    doc = manifest_doc()
    del doc["mediaType"]
    assert parse_manifest(b(doc), None).media_type == mt.OCI_MANIFEST
    assert parse_manifest(b({"schemaVersion": 2, "manifests": []}), None).media_type == mt.OCI_INDEX


def test_oversize_and_digest_mismatch() -> None:
    big = b(manifest_doc(annotations={"pad": "x" * MAX_MANIFEST_SIZE}))
    with pytest.raises(ManifestError, match="limit"):
        parse_manifest(big, mt.OCI_MANIFEST)
    with pytest.raises(DigestMismatchError):
        parse_manifest(b(manifest_doc()), mt.OCI_MANIFEST, expected_digest=Digest(D))


@pytest.mark.parametrize(
    ("manifest_type", "config_type", "artifact_type", "image"),
    [
        (mt.OCI_MANIFEST, mt.OCI_CONFIG, None, True),
        (mt.DOCKER_MANIFEST, mt.DOCKER_CONFIG, None, True),
        (mt.OCI_MANIFEST, "", None, True),
        (mt.OCI_MANIFEST, mt.OCI_CONFIG, "application/vnd.x", False),
        (mt.OCI_MANIFEST, mt.OCI_EMPTY, "application/vnd.x", False),
        (mt.OCI_MANIFEST, mt.OCI_EMPTY, None, False),
        (mt.OCI_MANIFEST, mt.ORAS_UNKNOWN_CONFIG, None, False),
        (mt.OCI_MANIFEST, mt.MODELPACK_CONFIG, mt.MODELPACK_ARTIFACT, False),
        (mt.OCI_MANIFEST, mt.KITOPS_CONFIG, None, False),
    ],
)
def test_image_vs_artifact(manifest_type: str, config_type: str, artifact_type: str | None, image: bool) -> None:
    assert mt.is_image(manifest_type, config_type, artifact_type) is image
    assert mt.effective_artifact_type(artifact_type, config_type) == (artifact_type or config_type)


@pytest.mark.parametrize(
    ("config_type", "artifact_type", "layer_type", "expected"),
    [
        (mt.OCI_CONFIG, None, mt.OCI_LAYER_GZIP, "image"),
        (mt.OCI_EMPTY, "application/vnd.example", "application/octet-stream", "artifact"),
        (mt.ORAS_UNKNOWN_CONFIG, None, mt.OCI_LAYER, "artifact"),
        (mt.MODELPACK_CONFIG, mt.MODELPACK_ARTIFACT, "application/vnd.cncf.model.weight.v1.raw", "modelpack"),
        (mt.KITOPS_CONFIG, None, "application/vnd.kitops.modelkit.model.v1.tar", "kitops"),
        ("application/vnd.docker.ai.model.config.v0.1+json", None, "application/vnd.docker.ai.gguf.v3", "docker-model"),
    ],
)
def test_flavour(config_type: str, artifact_type: str | None, layer_type: str, expected: str) -> None:
    doc = manifest_doc(config=desc(config_type, b"{}"), layers=[desc(layer_type)])
    if artifact_type:
        doc["artifactType"] = artifact_type
    m = parse_manifest(b(doc), mt.OCI_MANIFEST)
    assert isinstance(m, Manifest)
    assert flavour(m) == expected


@pytest.mark.parametrize(
    ("media_type", "comp"),
    [
        (mt.OCI_LAYER, "none"),
        (mt.OCI_LAYER_GZIP, "gzip"),
        (mt.OCI_LAYER_ZSTD, "zstd"),
        (mt.DOCKER_LAYER, "none"),
        (mt.DOCKER_LAYER_GZIP, "gzip"),
        (mt.OCI_LAYER_ND_GZIP, "gzip"),
        ("application/vnd.cncf.model.weight.v1.tar+zstd", "zstd"),
        ("application/vnd.kitops.modelkit.model.v1.tar+gzip", "gzip"),
        ("application/octet-stream", None),
        ("application/vnd.cncf.model.weight.v1.raw", None),
    ],
)
def test_layer_compression(media_type: str, comp: str | None) -> None:
    assert mt.layer_compression(media_type) == comp


def test_title_precedence() -> None:
    doc = manifest_doc(
        layers=[
            desc(annotations={mt.ANN_TITLE: "a.bin", mt.ANN_CNCF_FILEPATH: "b.bin"}),
            desc(annotations={mt.ANN_CNCF_FILEPATH: "b.bin"}),
            desc(annotations={mt.ANN_CNAI_FILEPATH: "c.bin"}),
            desc(),
        ]
    )
    m = parse_manifest(b(doc), mt.OCI_MANIFEST)
    assert [x.title for x in m.layers] == ["a.bin", "b.bin", "c.bin", None]


def test_config_parsing() -> None:
    cfg = parse_config(
        json.dumps(
            {"os": "linux", "architecture": "arm64", "variant": "v8", "rootfs": {"type": "layers", "diff_ids": [D]}}
        ).encode()
    )
    assert cfg.runnable and str(cfg.platform) == "linux/arm64/v8" and cfg.diff_ids == (D,)
    assert not parse_config(b"{}").runnable
    with pytest.raises(ManifestError):
        parse_config(json.dumps({"rootfs": {"type": "layers", "diff_ids": ["sha256:bad"]}}).encode())
