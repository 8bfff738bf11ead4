#!/usr/bin/env python3
"""Build examples/tiny-model: the OCI layout `./dev demo` mounts (no registry needed).

Its `latest` tag is an index with two entries holding the same three files:
  [0] linux/arm64/v8  an image (one tar+gzip layer, real config with rootfs.diff_ids)
  [1] (no platform)   an OCI 1.1 artifact (empty config, one raw layer per file, titled)
so every node mounts it: arm64 nodes take the image, every other node the platform-less artifact
(`imagevol explain oci:examples/tiny-model:latest` shows what CRI-O and containerd would do).
Deterministic: running it again writes the same digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import struct
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "tiny-model"
MTIME = 1700000000


def safetensors() -> bytes:
    """A valid safetensors file: one F32 tensor of shape [4, 8]."""
    values = [((i * 37) % 101) / 101.0 for i in range(32)]
    data = struct.pack("<32f", *values)
    header = {"weight": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, len(data)]},
              "__metadata__": {"format": "pt"}}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


FILES = {
    "config.json": json.dumps({"architectures": ["TinyModel"], "hidden_size": 8, "model_type": "tiny"},
                              indent=2).encode() + b"\n",
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "WordLevel",
                                  "vocab": {"<unk>": 0, "hello": 1, "world": 2}}}, indent=2).encode() + b"\n",
    "model.safetensors": safetensors(),
}


def dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def blob(data: bytes, media_type: str, **extra: object) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (OUT / "blobs" / "sha256" / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data), **extra}


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "blobs" / "sha256").mkdir(parents=True)
    (OUT / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    # The image: one layer holding the files under model/.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo("model")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, MTIME
        tf.addfile(d)
        for name, data in sorted(FILES.items()):
            ti = tarfile.TarInfo(f"model/{name}")
            ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
            tf.addfile(ti, io.BytesIO(data))
    raw = buf.getvalue()
    layer = blob(gzip.compress(raw, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip")
    config = blob(dumps({"architecture": "arm64", "variant": "v8", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]}}),
                  "application/vnd.oci.image.config.v1+json")
    image = blob(dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "config": config, "layers": [layer]}), "application/vnd.oci.image.manifest.v1+json")
    # The artifact: the same files as raw layers under model/.
    empty = blob(b"{}", "application/vnd.oci.empty.v1+json")
    layers = [blob(data, "application/octet-stream",
                   annotations={"org.opencontainers.image.title": f"model/{name}"})
              for name, data in sorted(FILES.items())]
    artifact = blob(dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "artifactType": "application/vnd.imagevol.example.model.v1",
                           "config": empty, "layers": layers}), "application/vnd.oci.image.manifest.v1+json")
    index = blob(dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [{**image, "platform": {"architecture": "arm64", "os": "linux",
                                                             "variant": "v8"}}, artifact]}),
                 "application/vnd.oci.image.index.v1+json")
    index["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (OUT / "index.json").write_bytes(dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                            "manifests": [index]}))
    print(f"wrote {OUT} ({index['digest']})")


if __name__ == "__main__":
    main()
