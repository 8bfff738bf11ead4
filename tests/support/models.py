"""Model packaging formats as their own tools write them: CNCF ModelPack (modctl), KitOps
ModelKits (kit) and Docker Model Runner models (docker model). Each builder returns a
:class:`ModelFixture`: what to push and exactly which files (with which content) a volume of it
must show. Nothing here uses imagevol's code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .oci import Client
from .tars import E, gz, push_artifact, tar_layer

MODELPACK_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODELPACK_FILEPATH = "org.cncf.model.filepath"
MODELPACK_METADATA = "org.cncf.model.file.metadata+json"
KITOPS_CONFIG = "application/vnd.kitops.modelkit.config.v1+json"
DOCKER_AI_CONFIG = "application/vnd.docker.ai.model.config.v0.1+json"
DOCKER_AI_GGUF = "application/vnd.docker.ai.gguf.v3"
DOCKER_AI_LICENSE = "application/vnd.docker.ai.license"


@dataclass
class ModelFixture:
    name: str
    layers: list[tuple[str, bytes, dict[str, str] | None]]
    config: tuple[str, bytes]
    artifact_type: str | None
    files: dict[str, bytes]  # every regular file the volume shows, and its content
    modes: dict[str, int] = field(default_factory=dict)  # expected modes of some files

    def push(self, client: Client, repo: str, tag: str) -> str:
        return push_artifact(client, repo, tag, self.layers, artifact_type=self.artifact_type, config=self.config)


def modelpack() -> ModelFixture:
    """A modctl-style ModelPack: raw weights at a nested file path, a tar config layer whose entry
    carries the full path, a tar+gzip docs directory, and an executable raw code file whose mode
    comes from the file metadata annotation."""
    weights = b"\x00safetensors-weights\x01" * 512
    cfg_json = b'{"architectures": ["Toy"]}'
    readme = b"# toy model\n"
    script = b"#!/bin/sh\necho serve\n"
    config = {
        "descriptor": {"name": "toy", "version": "1"},
        "config": {"format": "safetensors", "paramSize": "1k"},
        "modelfs": {"type": "layers", "diffIds": []},
    }
    meta = json.dumps({"name": "run.sh", "mode": 0o755, "uid": 0, "gid": 0, "size": len(script), "typeflag": 48})
    layers = [
        (
            "application/vnd.cncf.model.weight.v1.raw",
            weights,
            {MODELPACK_FILEPATH: "weights/model.safetensors"},
        ),
        (
            "application/vnd.cncf.model.weight.config.v1.tar",
            tar_layer([E("config.json", cfg_json)]),
            {MODELPACK_FILEPATH: "config.json"},
        ),
        (
            "application/vnd.cncf.model.doc.v1.tar+gzip",
            gz(tar_layer([E("docs", kind="dir"), E("docs/README.md", readme)])),
            {MODELPACK_FILEPATH: "docs"},
        ),
        (
            "application/vnd.cncf.model.code.v1.raw",
            script,
            {MODELPACK_FILEPATH: "scripts/run.sh", MODELPACK_METADATA: meta},
        ),
    ]
    return ModelFixture(
        name="modelpack",
        layers=layers,
        config=(MODELPACK_CONFIG, json.dumps(config).encode()),
        artifact_type=MODELPACK_ARTIFACT,
        files={
            "weights/model.safetensors": weights,
            "config.json": cfg_json,
            "docs/README.md": readme,
            "scripts/run.sh": script,
        },
        modes={"weights/model.safetensors": 0o444, "scripts/run.sh": 0o755},  # the declared mode
    )


KITFILE = {
    "manifestVersion": "1.0.0",
    "package": {"name": "m"},
    "model": {"path": "model.gguf"},
    "datasets": [{"path": "data/train.csv"}],
    "docs": [{"path": "README.md"}],
}


def kitops() -> ModelFixture:
    """A ModelKit as `kit pack` writes it: the Kitfile as config, one tar per Kitfile entry holding
    the entry's path, no title annotations."""
    gguf = b"GGUF\x03\x00\x00\x00" + b"q" * 4096
    csv = b"x,y\n1,2\n3,4\n"
    readme = b"# m\n"
    base = "application/vnd.kitops.modelkit"
    layers = [
        (f"{base}.model.v1.tar", tar_layer([E("model.gguf", gguf)]), None),
        (f"{base}.dataset.v1.tar", tar_layer([E("data", kind="dir"), E("data/train.csv", csv)]), None),
        (f"{base}.docs.v1.tar", tar_layer([E("README.md", readme)]), None),
    ]
    return ModelFixture(
        name="kitops",
        layers=layers,
        config=(KITOPS_CONFIG, json.dumps(KITFILE).encode()),
        artifact_type=None,
        files={"model.gguf": gguf, "data/train.csv": csv, "README.md": readme},
    )


def docker_model() -> ModelFixture:
    """A Docker Model Runner model (config v0.1): a GGUF and a license, no names on the layers."""
    gguf = b"GGUF\x03\x00\x00\x00" + b"d" * 4096
    lic = b"Apache License 2.0\n"
    config = {
        "config": {"format": "gguf", "quantization": "Q4_K_M", "parameters": "1k", "size": str(len(gguf))},
        "descriptor": {"created": "2025-01-01T00:00:00Z"},
        "rootfs": {"type": "rootfs", "diff_ids": []},
    }
    return ModelFixture(
        name="docker-model",
        layers=[(DOCKER_AI_GGUF, gguf, None), (DOCKER_AI_LICENSE, lic, None)],
        config=(DOCKER_AI_CONFIG, json.dumps(config).encode()),
        artifact_type=None,
        files={"model.gguf": gguf, "LICENSE": lic},
    )
