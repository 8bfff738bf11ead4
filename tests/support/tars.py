"""Tar layers of any shape (hostile ones included) and pushing them as images or artifacts.

``tar_layer([...])`` writes entries exactly as given: names are not cleaned, so ``../x``,
``/abs``, ``.wh..`` and links out of the tree reach the registry as written. ``push_image`` makes
a runnable OCI image (config with matching ``rootfs.diff_ids``); ``push_artifact`` an OCI 1.1
artifact. Nothing here uses imagevol's code.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from typing import Any

from tests.support.blobs import gz

from .oci import (
    OCI_CONFIG,
    OCI_EMPTY,
    OCI_EMPTY_DATA,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Client,
    canonical_json,
    descriptor,
    make_image_manifest,
    sha256_digest,
)

MTIME = 1_700_000_000
TITLE = "org.opencontainers.image.title"


@dataclass
class E:
    """One tar entry. kind: file, dir, symlink, hardlink, fifo."""

    name: str
    data: bytes = b""
    kind: str = "file"
    mode: int | None = None
    link: str = ""
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME
    pax: dict[str, str] = field(default_factory=dict)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def tar_layer(entries: list[E]) -> bytes:
    """An uncompressed PAX tar of ``entries``, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = _TYPES[e.kind]
            ti.mode = e.mode if e.mode is not None else (0o755 if e.kind == "dir" else 0o644)
            ti.uid, ti.gid, ti.mtime = e.uid, e.gid, e.mtime
            ti.linkname = e.link
            ti.pax_headers = dict(e.pax)
            if e.kind == "file":
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def files_tar(files: dict[str, bytes], *, mode: int = 0o644) -> bytes:
    """A tar of regular files (parent directories implied)."""
    return tar_layer([E(name, data, mode=mode) for name, data in sorted(files.items())])


def push_image(client: Client, repo: str, tag: str, layers: list[bytes], *, arch: str = "amd64") -> str:
    """Push a runnable OCI image of uncompressed tars ``layers`` (sent gzip-compressed); returns
    the manifest digest."""
    descs = []
    for raw in layers:
        blob = gz(raw)
        client.push_blob(repo, blob)
        descs.append(descriptor(OCI_LAYER_GZIP, blob))
    cfg = canonical_json(
        {
            "architecture": arch,
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(raw) for raw in layers]},
        }
    )
    client.push_blob(repo, cfg)
    body, digest = make_image_manifest(descriptor(OCI_CONFIG, cfg), descs)
    client.push_manifest(repo, tag, body, OCI_MANIFEST)
    return digest


def push_artifact(
    client: Client,
    repo: str,
    tag: str,
    layers: list[tuple[str, bytes, dict[str, str] | None]],
    *,
    artifact_type: str | None = "application/vnd.example.model.v1",
    config: tuple[str, bytes] = (OCI_EMPTY, OCI_EMPTY_DATA),
    annotations: dict[str, Any] | None = None,
) -> str:
    """Push an artifact: ``layers`` are (media type, data, annotations); returns the digest."""
    descs = []
    for media_type, data, ann in layers:
        client.push_blob(repo, data)
        descs.append(descriptor(media_type, data, annotations=ann or None))
    client.push_blob(repo, config[1])
    body, digest = make_image_manifest(
        descriptor(config[0], config[1]), descs, artifact_type=artifact_type, annotations=annotations
    )
    client.push_manifest(repo, tag, body, OCI_MANIFEST)
    return digest


def _ustar_header(name: str, typeflag: bytes, mode: int, link: str = "") -> bytes:
    """One ustar header of an empty entry (names of at most 100 bytes)."""
    h = bytearray(512)
    raw = name.encode()
    assert len(raw) <= 100 and len(link) <= 100, name
    h[0 : len(raw)] = raw
    h[157 : 157 + len(link)] = link.encode()
    h[100:108] = b"%07o\0" % mode
    h[108:116] = b"%07o\0" % 0
    h[116:124] = b"%07o\0" % 0
    h[124:136] = b"%011o\0" % 0
    h[136:148] = b"%011o\0" % MTIME
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def many_entries_gz(n: int, *, per_dir: int = 1000) -> bytes:
    """A gzip-compressed tar of `n` entries: directories `dNNNNN/` each holding up to `per_dir`
    empty files (the directories count as entries). An inode bomb: 400,000 entries gzip to 1-4 MB.
    Written header by header (tarfile takes ten times longer)."""
    import zlib

    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    out: list[bytes] = []
    batch: list[bytes] = []
    count = 0
    d = 0
    while count < n:
        dname = f"d{d:06d}/"
        batch.append(_ustar_header(dname, b"5", 0o755))
        count += 1
        for i in range(min(per_dir, n - count)):
            batch.append(_ustar_header(f"{dname}f{i:06d}", b"0", 0o644))
            count += 1
        out.append(z.compress(b"".join(batch)))
        batch.clear()
        d += 1
    out.append(z.compress(bytes(1024)))
    out.append(z.flush())
    return b"".join(out)


def hardlinks_gz(n: int) -> bytes:
    """A gzip-compressed tar of one empty file `f` and `n` hard links to it (`lNNNNNNN`)."""
    import zlib

    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [z.compress(_ustar_header("f", b"0", 0o644))]
    for i in range(0, n, 1000):
        out.append(
            z.compress(b"".join(_ustar_header(f"l{j:07d}", b"1", 0o644, "f") for j in range(i, min(n, i + 1000))))
        )
    out.append(z.compress(bytes(1024)))
    out.append(z.flush())
    return b"".join(out)
