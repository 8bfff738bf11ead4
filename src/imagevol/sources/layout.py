"""OCI image layouts on disk (`oci:PATH[:TAG|@DIGEST]`), read side.

The layout's `index.json` is the root; a tag names the entry whose
`org.opencontainers.image.ref.name` annotation equals it (skopeo's and umoci's convention).
Every blob path is built from a validated digest and checked to stay inside the layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import BinaryIO

from .. import mediatypes as mt
from ..digest import Digest, digest_bytes
from ..errors import DigestMismatchError, ManifestError, NotFoundError, SizeMismatchError, UsageError
from ..manifest import MAX_MANIFEST_SIZE, Descriptor, Index, Manifest, parse_manifest
from ..reference import LayoutReference


class LayoutSource:
    """A Source reading one reference out of an OCI image layout directory."""

    def __init__(self, ref: LayoutReference) -> None:
        self.ref = ref
        self.path = Path(ref.path)
        if not self.path.is_dir():
            raise NotFoundError(
                f"OCI layout {ref.path!r} does not exist or is not a directory",
                hint="an `oci:` reference names a directory holding oci-layout and index.json",
            )
        layout_file = self.path / "oci-layout"
        if not layout_file.is_file():
            raise UsageError(
                f"{ref.path!r} is not an OCI image layout: it has no oci-layout file",
                hint="create one with `skopeo copy ... oci:DIR:TAG` or `imagevol pull --output oci:DIR:TAG`",
            )
        try:
            version = json.loads(layout_file.read_bytes()).get("imageLayoutVersion")
        except (ValueError, AttributeError):
            version = None
        if version != "1.0.0":
            raise ManifestError(f"{ref.path}/oci-layout: unsupported imageLayoutVersion {version!r}")

    def describe(self) -> str:
        return f"OCI layout {self.ref}"

    def _blob_path(self, digest: Digest) -> Path:
        d = Digest(digest)  # validated before it becomes a path
        return self.path / "blobs" / d.algorithm / d.hex

    def _read_index(self) -> Index:
        p = self.path / "index.json"
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise ManifestError(f"OCI layout {self.ref.path!r} has no index.json") from None
        top = parse_manifest(raw, mt.OCI_INDEX, where=f"{self.ref.path}/index.json")
        if not isinstance(top, Index):
            raise ManifestError(f"{self.ref.path}/index.json is not an image index")
        return top

    def resolve(self) -> tuple[Descriptor, Manifest | Index]:
        top = self._read_index()
        if self.ref.digest is not None:
            for d in (*top.manifests, *top.ignored):
                if d.digest == self.ref.digest:
                    return d, self.manifest(d)
            # A digest of a nested manifest is used as is, if the blob exists.
            p = self._blob_path(self.ref.digest)
            if p.is_file():
                raw = self._read_small(p, MAX_MANIFEST_SIZE, str(self.ref.digest))
                doc = parse_manifest(raw, None, expected_digest=self.ref.digest, where=f"{self.ref}")
                return Descriptor(doc.media_type, self.ref.digest, len(raw)), doc
            raise NotFoundError(f"{self.ref.digest} is not in OCI layout {self.ref.path!r}")
        entries = list(top.manifests)
        if self.ref.tag is not None:
            named = [d for d in entries if d.annotations.get(mt.ANN_REF_NAME) == self.ref.tag]
            if not named:
                tags = sorted({d.annotations[mt.ANN_REF_NAME] for d in entries if mt.ANN_REF_NAME in d.annotations})
                raise NotFoundError(
                    f"tag {self.ref.tag!r} not found in OCI layout {self.ref.path!r}",
                    hint=("tags present: " + ", ".join(tags)) if tags else "the layout has no tagged entries",
                )
            d = named[0]
            return d, self.manifest(d)
        if len(entries) == 1:
            return entries[0], self.manifest(entries[0])
        if not entries:
            raise NotFoundError(f"OCI layout {self.ref.path!r} holds no manifests")
        tags = sorted({d.annotations.get(mt.ANN_REF_NAME, "") for d in entries} - {""})
        raise UsageError(
            f"OCI layout {self.ref.path!r} holds {len(entries)} manifests; name one",
            hint="use oci:PATH:TAG" + (f" (tags: {', '.join(tags)})" if tags else "") + " or oci:PATH@DIGEST",
        )

    def _read_small(self, p: Path, max_size: int, what: str) -> bytes:
        try:
            with open(p, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > max_size:
                    raise ManifestError(f"{what} is {size} bytes, over the {max_size} byte limit")
                return f.read(max_size + 1)
        except FileNotFoundError:
            raise NotFoundError(f"blob {what} is missing from OCI layout {self.ref.path!r}") from None

    def manifest(self, desc: Descriptor) -> Manifest | Index:
        raw = self._read_small(self._blob_path(desc.digest), MAX_MANIFEST_SIZE, str(desc.digest))
        if len(raw) != desc.size:
            raise SizeMismatchError.of(f"manifest {desc.digest}", self.describe(), desc.size, len(raw))
        return parse_manifest(raw, desc.media_type, expected_digest=desc.digest, where=f"manifest {desc.digest}")

    def blob_bytes(self, desc: Descriptor, max_size: int) -> bytes:
        if desc.data is not None:
            return desc.data
        if desc.size > max_size:
            raise ManifestError(f"blob {desc.digest} is {desc.size} bytes, over the {max_size} byte limit")
        raw = self._read_small(self._blob_path(desc.digest), max_size, str(desc.digest))
        if len(raw) != desc.size:
            raise SizeMismatchError.of(f"blob {desc.digest}", self.describe(), desc.size, len(raw))
        if digest_bytes(raw, desc.digest.algorithm) != desc.digest:
            raise DigestMismatchError(f"blob {desc.digest} in OCI layout {self.ref.path!r} does not match its digest")
        return raw

    def open_blob(self, desc: Descriptor, offset: int = 0) -> BinaryIO:
        try:
            f = open(self._blob_path(desc.digest), "rb")  # noqa: SIM115 - returned to the caller
        except FileNotFoundError:
            raise NotFoundError(f"blob {desc.digest} is missing from OCI layout {self.ref.path!r}") from None
        size = os.fstat(f.fileno()).st_size
        if size != desc.size:
            f.close()
            raise SizeMismatchError.of(f"blob {desc.digest}", self.describe(), desc.size, size)
        if offset:
            f.seek(offset)
        return f
