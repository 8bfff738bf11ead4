"""The one interface every content source offers (a registry repository, an OCI layout)."""

from __future__ import annotations

from typing import BinaryIO, Protocol

from ..manifest import Descriptor, Index, Manifest


class Source(Protocol):
    """Where manifests and blobs of one reference come from. All content is verified."""

    def describe(self) -> str:
        """A short human name for messages, e.g. `registry 127.0.0.1:5000/models/llama`."""
        ...

    def resolve(self) -> tuple[Descriptor, Manifest | Index]:
        """The root descriptor of the reference and its parsed (verified) document."""
        ...

    def manifest(self, desc: Descriptor) -> Manifest | Index:
        """A child manifest or index named by `desc`, verified against its digest."""
        ...

    def blob_bytes(self, desc: Descriptor, max_size: int) -> bytes:
        """A small blob (a config), verified, refused above `max_size`."""
        ...

    def open_blob(self, desc: Descriptor, offset: int = 0) -> BinaryIO:
        """A stream of a blob's bytes from `offset` (unverified; the caller hashes)."""
        ...
