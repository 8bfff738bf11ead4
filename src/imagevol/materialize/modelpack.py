"""The ``modelpack`` flavour (CNCF ModelPack): ``.raw`` layers at their file path (a copy when the
declared mode is not the blob's 0o444), ``.tar`` layers extracted so their entries land there.
A mixin of :class:`~imagevol.materialize.build._Builder`, whose primitives (``apply``,
``place_raw``, ``probe_tar``, ``extract_for``, ``untitled``, ``warn``) its methods use.
"""

from __future__ import annotations

import re

from .. import mediatypes as mt
from ..errors import ContentRefusedError
from ..jsonutil import loads as json_loads
from ..manifest import Descriptor
from .options import _COMPRESSIONS
from .paths import _layer_path, safe_parts

_MODELPACK_RE = re.compile(r"^application/vnd\.cncf\.model\.([a-z]+(?:\.[a-z]+)?)\.v1\.(raw|tar)(?:\+([a-z-]+))?$")


class _ModelPackFlavour:
    """The ``modelpack`` flavour of the builder (its layers also occur in Docker models)."""

    def _metadata_mode(self, layer: Descriptor, what: str) -> int | None:
        """The mode a raw ModelPack file declares, or None when its read-only part is 0o444 (the file
        is then a hard link to the 0o444 blob; any other mode, an executable, a copy with that mode)."""
        raw = layer.annotations.get(mt.ANN_CNCF_FILE_METADATA)
        if not raw:
            return None
        try:
            meta = json_loads(raw)
            mode = meta.get("mode") if isinstance(meta, dict) else None
        except ValueError:
            mode = None
        if mode is None:
            self.warn(f"{what}: unreadable {mt.ANN_CNCF_FILE_METADATA} annotation ignored")
            return None
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
            self.warn(f"{what}: invalid file mode {mode!r} in {mt.ANN_CNCF_FILE_METADATA} ignored")
            return None
        eff = mode & 0o777
        return None if eff & ~0o222 == 0o444 else eff  # 0o644 & co: the blob's 0o444, a hard link

    def modelpack(self) -> None:
        for i, layer in enumerate(self.m.layers):
            if _MODELPACK_RE.match(layer.media_type):
                self.modelpack_layer(i, layer)
            else:
                self.generic(i, layer, _layer_path(layer, "artifact"))

    def modelpack_layer(self, i: int, layer: Descriptor) -> None:
        """A ``application/vnd.cncf.model.<kind>.v1.<raw|tar>[+gzip|+zstd]`` layer."""
        m = _MODELPACK_RE.match(layer.media_type)
        assert m is not None
        what = self._what(i, layer)
        fmt, comp_name = m.group(2), m.group(3)
        comp = _COMPRESSIONS.get(comp_name)
        if comp is None:
            raise ContentRefusedError(f"{what}: unsupported compression {comp_name!r}")
        path = _layer_path(layer, "modelpack")
        parts = safe_parts(path, f"{what}: file path") if path is not None else self.untitled(i, layer, what)
        if parts is None:
            return
        self.contents[str(layer.digest)] = "/".join(parts)
        if fmt == "tar":
            is_tar, first = self.probe_tar(layer, comp)
            if is_tar:
                self.extract_for(layer, parts, first, comp, what)
                return
            self.warn(f"{what}: typed as a tar but is not one: placed as a file")
            comp = "none"
        self.place_raw(layer, parts, what, mode=self._metadata_mode(layer, what), compression=comp)
