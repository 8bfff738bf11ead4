"""Typed, validated OCI / Docker manifests, indexes, descriptors and image configs.

Parsing refuses what a careful runtime refuses: schema1, oversized documents, a body whose
`mediaType` disagrees with the Content-Type it was served with, and documents that are both a
manifest and an index (CVE-2021-41190). Unknown index children are kept aside, not errors.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import mediatypes as mt
from .digest import Digest, digest_bytes
from .errors import InvalidDigestError, InvalidPlatformError, ManifestError
from .jsonutil import loads as json_loads
from .platform import Platform

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
MAX_CONFIG_SIZE = 4 * 1024 * 1024

_GENERIC_CONTENT_TYPES = frozenset(
    {"", "application/json", "text/plain", "application/octet-stream", "binary/octet-stream"}
)


def _where(where: str) -> str:
    return f" in {where}" if where else ""


def _annotations(obj: Any, where: str) -> dict[str, str]:
    if obj is None:
        return {}
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
        raise ManifestError(f"annotations{_where(where)} must be a map of strings to strings")
    return dict(obj)


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A content descriptor: what a blob or manifest is, its digest and size."""

    media_type: str
    digest: Digest
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    artifact_type: str | None = None
    urls: tuple[str, ...] = ()
    data: bytes | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str = "descriptor") -> Descriptor:
        if not isinstance(d, dict):
            raise ManifestError(f"{where} must be a JSON object")
        media_type = d.get("mediaType", "")
        if not isinstance(media_type, str):
            raise ManifestError(f"{where}: mediaType must be a string")
        raw_digest = d.get("digest")
        if not isinstance(raw_digest, str):
            raise ManifestError(f"{where}: digest is missing or not a string")
        try:
            digest = Digest(raw_digest)
        except InvalidDigestError as e:
            raise ManifestError(f"{where}: {e.message}") from None
        size = d.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{where}: size must be a non-negative integer, got {size!r}")
        platform = None
        if d.get("platform") is not None:
            p = d["platform"]
            if not isinstance(p, dict):
                raise ManifestError(f"{where}: platform must be a JSON object")
            try:
                platform = Platform.from_dict(p)
            except InvalidPlatformError as e:
                raise ManifestError(f"{where}: platform: {e.message}") from None
        artifact_type = d.get("artifactType")
        if artifact_type is not None and not isinstance(artifact_type, str):
            raise ManifestError(f"{where}: artifactType must be a string")
        urls = d.get("urls") or []
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ManifestError(f"{where}: urls must be a list of strings")
        data = None
        if d.get("data") is not None:
            try:
                data = base64.b64decode(d["data"], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise ManifestError(f"{where}: data is not valid base64") from None
            if len(data) != size or digest_bytes(data, digest.algorithm) != digest:
                raise ManifestError(f"{where}: embedded data does not match the descriptor's digest and size")
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            annotations=_annotations(d.get("annotations"), where),
            platform=platform,
            artifact_type=artifact_type or None,
            urls=tuple(urls),
            data=data,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.data is not None:
            out["data"] = base64.b64encode(self.data).decode()
        if self.platform is not None:
            out["platform"] = self.platform.to_dict()
        return out

    @property
    def title(self) -> str | None:
        """The file name a layer carries: OCI title, else the ModelPack file path."""
        for key in (mt.ANN_TITLE, mt.ANN_CNCF_FILEPATH, mt.ANN_CNAI_FILEPATH):
            v = self.annotations.get(key)
            if v:
                return v
        return None


@dataclass(frozen=True, slots=True)
class Manifest:
    """An image or artifact manifest (OCI or Docker schema2)."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    digest: Digest
    raw: bytes = field(repr=False)
    artifact_type: str | None = None
    subject: Descriptor | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_image(self) -> bool:
        """CRI-O's rule: image iff OCI/Docker manifest, image (or no) config type, no artifactType."""
        return mt.is_image(self.media_type, self.config.media_type, self.artifact_type)

    @property
    def kind(self) -> str:
        return "image" if self.is_image else "artifact"

    @property
    def effective_artifact_type(self) -> str:
        return mt.effective_artifact_type(self.artifact_type, self.config.media_type)

    @property
    def total_size(self) -> int:
        return self.config.size + sum(layer.size for layer in self.layers)


@dataclass(frozen=True, slots=True)
class Index:
    """An OCI image index or a Docker manifest list."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    digest: Digest
    raw: bytes = field(repr=False)
    ignored: tuple[Descriptor, ...] = ()
    artifact_type: str | None = None
    subject: Descriptor | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_docker(self) -> bool:
        return self.media_type == mt.DOCKER_MANIFEST_LIST


def _strip_params(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_manifest(
    raw: bytes,
    content_type: str | None = None,
    *,
    expected_digest: Digest | None = None,
    where: str = "",
) -> Manifest | Index:
    """Parse and validate a manifest or index.

    `content_type` is what the source said it is (an HTTP Content-Type or a descriptor's mediaType).
    `expected_digest`, when given, is checked against the bytes before anything else.
    """
    w = where or "manifest"
    if len(raw) > MAX_MANIFEST_SIZE:
        raise ManifestError(
            f"{w} is {len(raw)} bytes, over the {MAX_MANIFEST_SIZE} byte limit for manifests",
            hint="manifests this large are refused to bound memory; check the source",
        )
    digest = digest_bytes(raw, expected_digest.algorithm if expected_digest else "sha256")
    if expected_digest is not None and digest != expected_digest:
        from .errors import DigestMismatchError

        raise DigestMismatchError(
            f"{w} does not match its digest: expected {expected_digest}, got {digest}",
            hint="the source served wrong bytes for this digest; nothing was used",
        )
    ctype = _strip_params(content_type)
    if ctype in mt.SCHEMA1_TYPES:
        raise _schema1(w)
    try:
        doc = json_loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise ManifestError(f"{w} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{w} is not a JSON object")
    if doc.get("schemaVersion") == 1:
        raise _schema1(w)
    if doc.get("schemaVersion") != 2:
        raise ManifestError(f"{w}: unsupported schemaVersion {doc.get('schemaVersion')!r} (expected 2)")
    body_type = doc.get("mediaType")
    if body_type is not None and not isinstance(body_type, str):
        raise ManifestError(f"{w}: mediaType must be a string")
    has_manifests = "manifests" in doc
    has_layers = "layers" in doc or "config" in doc
    if has_manifests and has_layers:
        raise ManifestError(
            f"{w} is ambiguous: it has both 'manifests' (index) and 'layers'/'config' (manifest)",
            hint="such documents are refused (CVE-2021-41190); the publisher must fix the manifest",
        )
    if body_type and ctype and ctype not in _GENERIC_CONTENT_TYPES and body_type != ctype:
        raise ManifestError(
            f"{w} was served as {ctype!r} but its body says mediaType {body_type!r}",
            hint="a registry or mirror is serving mismatched content; refused (CVE-2021-41190)",
        )
    media_type = body_type or (ctype if ctype not in _GENERIC_CONTENT_TYPES else "")
    if not media_type:
        media_type = mt.OCI_INDEX if has_manifests else mt.OCI_MANIFEST
    if media_type in mt.SCHEMA1_TYPES:
        raise _schema1(w)
    if mt.is_index(media_type):
        if has_layers:
            raise ManifestError(f"{w}: an index ({media_type}) must not have layers or config")
        return _parse_index(doc, raw, digest, media_type, w)
    if mt.is_manifest(media_type):
        if has_manifests:
            raise ManifestError(f"{w}: a manifest ({media_type}) must not have 'manifests'")
        return _parse_image_manifest(doc, raw, digest, media_type, w)
    raise ManifestError(
        f"{w} has unsupported media type {media_type!r}",
        hint="imagevol reads OCI image manifests/indexes and Docker schema2 manifests/lists",
    )


def _schema1(w: str) -> ManifestError:
    return ManifestError(
        f"{w} is a Docker schema1 manifest, which is not supported (deprecated since 2017)",
        hint="re-push the image in a current format, e.g. `skopeo copy --format oci` or `--format v2s2`",
    )


def _subject(doc: dict[str, Any], w: str) -> Descriptor | None:
    if doc.get("subject") is None:
        return None
    return Descriptor.from_dict(doc["subject"], f"{w} subject")


def _parse_index(doc: dict[str, Any], raw: bytes, digest: Digest, media_type: str, w: str) -> Index:
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise ManifestError(f"{w}: 'manifests' must be a list")
    known: list[Descriptor] = []
    ignored: list[Descriptor] = []
    for i, e in enumerate(entries):
        d = Descriptor.from_dict(e, f"{w} manifests[{i}]")
        if d.media_type in mt.SCHEMA1_TYPES:
            ignored.append(d)
        elif mt.is_manifest(d.media_type) or mt.is_index(d.media_type):
            known.append(d)
        else:
            ignored.append(d)
    artifact_type = doc.get("artifactType")
    return Index(
        media_type=media_type,
        manifests=tuple(known),
        digest=digest,
        raw=raw,
        ignored=tuple(ignored),
        artifact_type=artifact_type if isinstance(artifact_type, str) and artifact_type else None,
        subject=_subject(doc, w),
        annotations=_annotations(doc.get("annotations"), w),
    )


def _parse_image_manifest(doc: dict[str, Any], raw: bytes, digest: Digest, media_type: str, w: str) -> Manifest:
    if "config" not in doc:
        raise ManifestError(f"{w}: manifest has no config descriptor")
    config = Descriptor.from_dict(doc["config"], f"{w} config")
    layers_doc = doc.get("layers")
    if layers_doc is None:
        layers_doc = []
    if not isinstance(layers_doc, list):
        raise ManifestError(f"{w}: 'layers' must be a list")
    layers = tuple(Descriptor.from_dict(x, f"{w} layers[{i}]") for i, x in enumerate(layers_doc))
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise ManifestError(f"{w}: artifactType must be a string")
    return Manifest(
        media_type=media_type,
        config=config,
        layers=layers,
        digest=digest,
        raw=raw,
        artifact_type=artifact_type or None,
        subject=_subject(doc, w),
        annotations=_annotations(doc.get("annotations"), w),
    )


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The parts of an image config imagevol uses; `raw` keeps the rest."""

    os: str
    architecture: str
    variant: str
    diff_ids: tuple[Digest, ...]
    rootfs_type: str
    raw: Mapping[str, Any] = field(repr=False, default_factory=dict)

    @property
    def platform(self) -> Platform:
        return Platform(os=self.os, architecture=self.architecture, variant=self.variant)

    @property
    def runnable(self) -> bool:
        """What containerd needs to mount an image volume: a config with rootfs layers."""
        return self.rootfs_type == "layers"


def parse_config(raw: bytes, where: str = "config") -> ImageConfig:
    if len(raw) > MAX_CONFIG_SIZE:
        raise ManifestError(f"{where} is {len(raw)} bytes, over the {MAX_CONFIG_SIZE} byte limit")
    try:
        doc = json_loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise ManifestError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{where} is not a JSON object")
    rootfs = doc.get("rootfs") if isinstance(doc.get("rootfs"), dict) else {}
    diff_ids_raw = rootfs.get("diff_ids") or []
    if not isinstance(diff_ids_raw, list):
        raise ManifestError(f"{where}: rootfs.diff_ids must be a list")
    try:
        diff_ids = tuple(Digest(x) for x in diff_ids_raw)
    except InvalidDigestError as e:
        raise ManifestError(f"{where}: rootfs.diff_ids: {e.message}") from None

    def s(key: str) -> str:
        v = doc.get(key)
        return v if isinstance(v, str) else ""

    return ImageConfig(
        os=s("os"),
        architecture=s("architecture"),
        variant=s("variant"),
        diff_ids=diff_ids,
        rootfs_type=rootfs.get("type", "") if isinstance(rootfs.get("type", ""), str) else "",
        raw=doc,
    )


def flavour(m: Manifest) -> str:
    """What kind of content a manifest carries, which decides how it is materialized:
    `image`, `modelpack`, `kitops`, `docker-model` or `artifact` (OCI/ORAS files)."""
    if m.is_image:
        return "image"
    at = m.effective_artifact_type
    cfg = m.config.media_type
    if (
        at == mt.MODELPACK_ARTIFACT
        or cfg == mt.MODELPACK_CONFIG
        or any(x.media_type.startswith(mt.MODELPACK_LAYER_PREFIX) for x in m.layers)
    ):
        return "modelpack"
    if cfg == mt.KITOPS_CONFIG or any(x.media_type.startswith(mt.KITOPS_LAYER_PREFIX) for x in m.layers):
        return "kitops"
    if cfg.startswith(mt.DOCKER_AI_CONFIG_PREFIX) or any(
        x.media_type.startswith(mt.DOCKER_AI_PREFIX) for x in m.layers
    ):
        return "docker-model"
    return "artifact"
