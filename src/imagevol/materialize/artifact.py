"""The ``artifact`` flavour (OCI / ORAS): one file per layer at its title, tar layers extracted as
the directory their title names, untitled tars at the volume root; ``generic`` places any layer
the other flavours do not know.
A mixin of :class:`~imagevol.materialize.build._Builder`, whose primitives (``apply``,
``place_raw``, ``probe_tar``, ``extract_for``, ``untitled``, ``warn``) its methods use.
"""

from __future__ import annotations

import os

from .. import mediatypes as mt
from ..digest import Digest
from ..errors import ContentRefusedError, InvalidDigestError
from ..manifest import Descriptor
from .paths import _layer_path, safe_parts

# ORAS: digest of the uncompressed tar of a directory layer.
ANN_ORAS_DIGEST = "io.deis.oras.content.digest"


class _ArtifactFlavour:
    """The ``artifact`` flavour of the builder, and ``generic`` for every flavour."""

    def _is_tar_typed(self, layer: Descriptor) -> bool:
        return (
            mt.layer_compression(layer.media_type) is not None
            or layer.annotations.get(mt.ANN_ORAS_UNPACK, "").lower() == "true"
        )

    def generic(self, i: int, layer: Descriptor, path: str | None) -> None:
        """An OCI / ORAS artifact layer: a file at its title, or a directory if it is a tar."""
        what = self._what(i, layer)
        parts = safe_parts(path, f"{what}: title") if path is not None else self.untitled(i, layer, what)
        if parts is None:
            return
        if self._is_tar_typed(layer):
            comp = mt.layer_compression(layer.media_type)
            is_tar, first = self.probe_tar(layer, comp)
            if is_tar:
                expect = None
                raw = layer.annotations.get(ANN_ORAS_DIGEST)
                if raw:
                    try:
                        expect = Digest(raw)
                    except InvalidDigestError:
                        self.warn(f"{what}: ignoring invalid {ANN_ORAS_DIGEST} annotation {raw!r}")
                self.extract_for(layer, parts, first, comp, what, expect)
                self.contents[str(layer.digest)] = "/".join(parts)
                return
            if comp not in (None, "none"):
                self.warn(f"{what}: typed as a compressed tar but is not one: placed as a file")
        self.place_raw(layer, parts, what)
        self.contents[str(layer.digest)] = "/".join(parts)

    def artifact(self) -> None:
        for i, layer in enumerate(self.m.layers):
            path = _layer_path(layer, "artifact")
            if path is None and self.opts.name_untitled == "skip" and self.untitled_tar(i, layer):
                continue
            self.generic(i, layer, path)
        if self.m.layers and all(self.contents.get(str(x.digest)) is None for x in self.m.layers):
            raise ContentRefusedError(
                f"artifact {self.m.digest.short}: every layer was skipped ({len(self.m.layers)} without "
                "org.opencontainers.image.title, none of them a tar): the volume would be empty",
                hint="annotate each layer with org.opencontainers.image.title, or mount with --name-untitled "
                "digest to name the files by their digests",
            )

    def untitled_tar(self, i: int, layer: Descriptor) -> bool:
        """An untitled tar / tar+gzip / tar+zstd artifact layer is extracted at the volume root, where
        an image layer would go (CRI-O skips it). False when it is not tar-typed or not a tar."""
        comp = mt.layer_compression(layer.media_type)
        if comp is None:
            return False
        is_tar, _first = self.probe_tar(layer, comp)
        if not is_tar:
            return False
        what = self._what(i, layer)
        fd = self._open_dir([], what)
        try:
            self.apply(layer, fd, comp, self.artifact_opts, what)
        finally:
            os.close(fd)
        self.warn(f"{what} has no title annotation: a tar, extracted at the volume root (CRI-O skips it)")
        self.contents[str(layer.digest)] = "/"
        return True
