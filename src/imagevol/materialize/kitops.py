"""The ``kitops`` flavour (KitOps ModelKit): each layer matched to its Kitfile entry (by digest, else
by order within its type) and placed or extracted at the path that entry names.
A mixin of :class:`~imagevol.materialize.build._Builder`, whose primitives (``apply``,
``place_raw``, ``probe_tar``, ``extract_for``, ``untitled``, ``warn``) its methods use.
"""

from __future__ import annotations

import re
from typing import Any

from .. import mediatypes as mt
from ..errors import ContentRefusedError, ManifestError
from ..jsonutil import loads as json_loads
from ..manifest import MAX_CONFIG_SIZE
from .options import _COMPRESSIONS
from .paths import _layer_path, safe_parts

_KITOPS_RE = re.compile(r"^application/vnd\.kitops\.modelkit\.(\w+)\.v1\.(\w+)(?:\+([\w-]+))?$")


# KitOps: code-typed layers that hold prompts.
ANN_KIT_SUBTYPE = "ml.kitops.modelkit.layer-subtype"


class _KitOpsFlavour:
    """The ``kitops`` flavour of the builder."""

    def _kitfile(self) -> dict[str, Any]:
        try:
            doc = json_loads(self.store.read_blob(self.m.config.digest, MAX_CONFIG_SIZE))
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(f"ModelKit config {self.m.config.digest.short} is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ManifestError(f"ModelKit config {self.m.config.digest.short} is not a JSON object")
        return doc

    def kitops(self) -> None:
        kf = self._kitfile() if self.m.config.media_type == mt.KITOPS_CONFIG else {}

        def entries(v: Any) -> list[dict[str, Any]]:
            return [e for e in v if isinstance(e, dict)] if isinstance(v, list) else []

        model = kf.get("model") if isinstance(kf.get("model"), dict) else None
        by_type: dict[str, list[dict[str, Any]]] = {
            "model": [model] if model is not None else [],
            "modelpart": entries(model.get("parts")) if model is not None else [],
            "dataset": [e for e in entries(kf.get("datasets")) if not e.get("remotePath")],
            "code": entries(kf.get("code")),
            "prompt": entries(kf.get("prompts")),
            "docs": entries(kf.get("docs")),
        }
        by_digest: dict[str, dict[str, Any]] = {}
        for lst in (*by_type.values(), entries(kf.get("mcpServers"))):
            for e in lst:
                if isinstance(e.get("digest"), str):
                    by_digest[e["digest"]] = e
        seen: dict[str, int] = {}
        for i, layer in enumerate(self.m.layers):
            m = _KITOPS_RE.match(layer.media_type)
            if m is None:
                self.generic(i, layer, _layer_path(layer, "artifact"))
                continue
            what = self._what(i, layer)
            base, fmt, comp_name = m.groups()
            comp = _COMPRESSIONS.get(comp_name)
            if comp is None or fmt not in ("tar", "raw"):
                raise ContentRefusedError(
                    f"{what}: unsupported KitOps layer format {fmt!r}/{comp_name!r}",
                    hint="KitOps layers are tar or raw, uncompressed, gzip or zstd",
                )
            entry = by_digest.get(str(layer.digest))
            if entry is None:
                typ = "prompt" if base == "code" and layer.annotations.get(ANN_KIT_SUBTYPE) == "prompt" else base
                if typ == "model" and seen.get("model", 0) >= 1:
                    typ = "modelpart"  # more weights than the Kitfile's one model: parts, as kit does
                idx = seen.get(typ, 0)
                seen[typ] = idx + 1
                lst = by_type.get(typ, [])
                entry = lst[idx] if idx < len(lst) else None
            kit_path = entry.get("path") if entry is not None and isinstance(entry.get("path"), str) else None
            path = layer.annotations.get(mt.ANN_CNCF_FILEPATH) or kit_path
            if kit_path is None and path is None:
                self.warn(f"{what}: no Kitfile entry or file path names this layer")
            if fmt == "raw":
                parts = (
                    safe_parts(path, f"{what}: path", normalize=True) if path is not None else None
                ) or self.untitled(i, layer, what)
                if parts is None:
                    continue
                self.place_raw(layer, parts, what, compression=comp)
            else:
                parts = safe_parts(path, f"{what}: path", normalize=True) if path is not None else []
                is_tar, first = self.probe_tar(layer, comp)
                if not is_tar:
                    raise ContentRefusedError(f"{what}: typed as a tar but is not one")
                self.extract_for(layer, parts, first, comp, what)
            self.contents[str(layer.digest)] = kit_path or path or "/"
