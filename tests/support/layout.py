"""Write real OCI image layouts for tests (independent of imagevol's own writer)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from tests.support.blobs import sha256_digest as sha

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def tar_bytes(files: dict[str, bytes], mtime: int = 1700000000) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in sorted(files.items()):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o644
            ti.mtime = mtime
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


class LayoutWriter:
    """Blobs, manifests and indexes into PATH as an OCI image layout."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.entries: list[dict[str, Any]] = []
        self.blobs: dict[str, bytes] = {}

    def blob(self, data: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
        d = sha(data)
        (self.path / "blobs" / "sha256" / d.split(":")[1]).write_bytes(data)
        self.blobs[d] = data
        desc = {"mediaType": media_type, "digest": d, "size": len(data)}
        desc.update({k: v for k, v in extra.items() if v is not None})
        return desc

    def image(
        self,
        files: dict[str, bytes],
        *,
        os_: str = "linux",
        arch: str = "amd64",
        variant: str | None = None,
        docker: bool = False,
    ) -> dict[str, Any]:
        """A one-layer image manifest (tar+gzip) with a real config; returns its descriptor."""
        raw = tar_bytes(files)
        layer = self.blob(gzip_bytes(raw), DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP)
        cfg_doc: dict[str, Any] = {
            "architecture": arch,
            "os": os_,
            "rootfs": {"type": "layers", "diff_ids": [sha(raw)]},
            "config": {},
        }
        if variant:
            cfg_doc["variant"] = variant
        cfg = self.blob(dumps(cfg_doc), DOCKER_CONFIG if docker else OCI_CONFIG)
        mt = DOCKER_MANIFEST if docker else OCI_MANIFEST
        man = {"schemaVersion": 2, "mediaType": mt, "config": cfg, "layers": [layer]}
        return self.blob(dumps(man), mt)

    def artifact(
        self,
        files: dict[str, bytes],
        *,
        artifact_type: str = "application/vnd.example.model.v1",
        layer_type: str = "application/vnd.oci.image.layer.v1.tar",
        config_type: str = OCI_EMPTY,
    ) -> dict[str, Any]:
        """An OCI 1.1 artifact: empty config, one raw layer per file titled with its name."""
        cfg = self.blob(b"{}", config_type)
        layers = [
            self.blob(data, layer_type, annotations={"org.opencontainers.image.title": name})
            for name, data in sorted(files.items())
        ]
        man = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": cfg,
            "layers": layers,
        }
        return self.blob(dumps(man), OCI_MANIFEST)

    def index(self, entries: list[tuple[dict[str, Any], dict[str, Any] | None]], *, docker: bool = False) -> dict:
        """An index (or Docker list) of (descriptor, platform-or-None) entries."""
        mt = DOCKER_LIST if docker else OCI_INDEX
        manifests = []
        for desc, plat in entries:
            d = dict(desc)
            if plat is not None:
                d["platform"] = plat
            manifests.append(d)
        doc = {"schemaVersion": 2, "mediaType": mt, "manifests": manifests}
        return self.blob(dumps(doc), mt)

    def tag(self, desc: dict[str, Any], name: str) -> None:
        d = dict(desc)
        d.pop("platform", None)
        d["annotations"] = {**d.get("annotations", {}), "org.opencontainers.image.ref.name": name}
        self.entries.append(d)
        self.write_index()

    def write_index(self) -> None:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.entries}
        (self.path / "index.json").write_bytes(dumps(doc))


def plat(os_: str, arch: str, variant: str | None = None) -> dict[str, str]:
    p = {"os": os_, "architecture": arch}
    if variant:
        p["variant"] = variant
    return p
