"""The content store as a Source: offline resolution of what an earlier pull recorded."""

from __future__ import annotations

from typing import BinaryIO

from ..digest import Digest
from ..errors import NotFoundError
from ..manifest import MAX_MANIFEST_SIZE, Descriptor, Index, Manifest, parse_manifest
from ..store import Store


class StoreSource:
    """Reads manifests and blobs from the store; `root` names the reference's root digest."""

    def __init__(self, store: Store, root: Digest, media_type: str, name: str) -> None:
        self.store = store
        self.root = root
        self.media_type = media_type
        self.name = name

    def describe(self) -> str:
        return f"store {self.name}"

    def _doc(self, digest: Digest, media_type: str) -> Manifest | Index:
        if not self.store.has_blob(digest):
            raise NotFoundError(f"manifest {digest} of {self.name} is not in the store")
        raw = self.store.read_blob(digest, MAX_MANIFEST_SIZE)
        return parse_manifest(raw, media_type, expected_digest=digest, where=f"manifest {digest}")

    def resolve(self) -> tuple[Descriptor, Manifest | Index]:
        doc = self._doc(self.root, self.media_type)
        return Descriptor(doc.media_type, self.root, len(doc.raw)), doc

    def manifest(self, desc: Descriptor) -> Manifest | Index:
        return self._doc(desc.digest, desc.media_type)

    def blob_bytes(self, desc: Descriptor, max_size: int) -> bytes:
        if desc.data is not None:
            return desc.data
        if not self.store.has_blob(desc.digest):
            raise NotFoundError(f"blob {desc.digest} of {self.name} is not in the store")
        return self.store.read_blob(desc.digest, max_size)

    def open_blob(self, desc: Descriptor, offset: int = 0) -> BinaryIO:
        f = self.store.open_blob(desc.digest)
        if offset:
            f.seek(offset)
        return f
