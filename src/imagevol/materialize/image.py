"""The ``image`` flavour: layers applied in order with the safe applier (whiteouts honoured), each
layer's uncompressed stream checked against the config's ``rootfs.diff_ids``.
A mixin of :class:`~imagevol.materialize.build._Builder`, whose primitives (``apply``,
``place_raw``, ``probe_tar``, ``extract_for``, ``untitled``, ``warn``) its methods use.
"""

from __future__ import annotations

from .. import mediatypes as mt
from ..errors import ContentRefusedError, ManifestError
from ..manifest import MAX_CONFIG_SIZE, parse_config


class _ImageFlavour:
    """The ``image`` flavour of the builder."""

    def image(self) -> None:
        if self.feed is not None:
            self.feed.wait(self.m.config.digest)
        cfg = parse_config(
            self.store.read_blob(self.m.config.digest, MAX_CONFIG_SIZE), f"config {self.m.config.digest.short}"
        )
        if len(cfg.diff_ids) != len(self.m.layers):
            raise ManifestError(
                f"image {self.m.digest.short} has {len(self.m.layers)} layers but its config lists "
                f"{len(cfg.diff_ids)} diff_ids",
                hint="the manifest and config disagree; the image is malformed",
            )
        for i, (layer, diff_id) in enumerate(zip(self.m.layers, cfg.diff_ids, strict=True)):
            what = self._what(i, layer)
            if layer.media_type == mt.DOCKER_LAYER:
                comp: str | None = None  # Docker's plain type is sometimes compressed: sniff
            else:
                comp = mt.layer_compression(layer.media_type)
                if comp is None:
                    raise ContentRefusedError(
                        f"{what}: unsupported image layer media type",
                        hint="imagevol applies tar, tar+gzip and tar+zstd layers (OCI and Docker)",
                    )
            self.apply(layer, self.root_fd, comp, self.image_opts, what, diff_id)
            self.contents[str(layer.digest)] = "/"
