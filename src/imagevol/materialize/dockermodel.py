"""The ``docker-model`` flavour (Docker Model Runner): files at their file path, else at the runtime-
bundle names Docker uses (``model.gguf``, ``model-0000N-of-0000M.safetensors``, ``LICENSE``...);
``dir.tar`` / ``vllm.config.tar`` layers extracted at the root.
A mixin of :class:`~imagevol.materialize.build._Builder`, whose primitives (``apply``,
``place_raw``, ``probe_tar``, ``extract_for``, ``untitled``, ``warn``) its methods use.
"""

from __future__ import annotations

from .. import mediatypes as mt
from .modelpack import _MODELPACK_RE
from .paths import _layer_path, safe_parts

# Docker Model Runner layer types.
DOCKER_AI_GGUF = "application/vnd.docker.ai.gguf.v3"
DOCKER_AI_SAFETENSORS = "application/vnd.docker.ai.safetensors"
DOCKER_AI_LICENSE = "application/vnd.docker.ai.license"
DOCKER_AI_MMPROJ = "application/vnd.docker.ai.mmproj"
DOCKER_AI_CHAT_TEMPLATE = "application/vnd.docker.ai.chat.template.jinja"
DOCKER_AI_DDUF = "application/vnd.docker.ai.dduf"
DOCKER_AI_DIR_TAR = "application/vnd.docker.ai.dir.tar"
DOCKER_AI_VLLM_CONFIG_TAR = "application/vnd.docker.ai.vllm.config.tar"
#: Runtime-bundle names of Docker Model Runner: media type -> (stem, extension).
DOCKER_AI_NAMES: dict[str, tuple[str, str]] = {
    DOCKER_AI_GGUF: ("model", ".gguf"),
    DOCKER_AI_SAFETENSORS: ("model", ".safetensors"),
    DOCKER_AI_MMPROJ: ("model", ".mmproj"),
    DOCKER_AI_CHAT_TEMPLATE: ("template", ".jinja"),
    DOCKER_AI_DDUF: ("model", ".dduf"),
    DOCKER_AI_LICENSE: ("LICENSE", ""),
}
DOCKER_AI_TARS = frozenset({DOCKER_AI_DIR_TAR, DOCKER_AI_VLLM_CONFIG_TAR})


class _DockerModelFlavour:
    """The ``docker-model`` flavour of the builder."""

    def docker_model(self) -> None:
        unnamed: dict[str, list[int]] = {}
        for i, layer in enumerate(self.m.layers):
            if layer.media_type in DOCKER_AI_NAMES and _layer_path(layer, "modelpack") is None:
                unnamed.setdefault(layer.media_type, []).append(i)
        for i, layer in enumerate(self.m.layers):
            what = self._what(i, layer)
            if _MODELPACK_RE.match(layer.media_type):
                self.modelpack_layer(i, layer)
                continue
            path = _layer_path(layer, "modelpack")
            if layer.media_type in DOCKER_AI_TARS or mt.layer_compression(layer.media_type) is not None:
                parts = safe_parts(path, f"{what}: file path") if path is not None else []
                comp = mt.layer_compression(layer.media_type) or "none"
                is_tar, first = self.probe_tar(layer, comp)
                if is_tar:
                    self.extract_for(layer, parts, first, comp, what)
                    self.contents[str(layer.digest)] = "/".join(parts) or "/"
                    continue
                if not parts:
                    parts = [layer.digest.hex]
                self.warn(f"{what}: typed as a tar but is not one: placed as a file")
            elif path is not None:
                parts = safe_parts(path, f"{what}: file path")
            elif layer.media_type in DOCKER_AI_NAMES:
                stem, ext = DOCKER_AI_NAMES[layer.media_type]
                group = unnamed[layer.media_type]
                n = len(group)
                parts = [f"{stem}{ext}" if n == 1 else f"{stem}-{group.index(i) + 1:05d}-of-{n:05d}{ext}"]
            else:
                parts = [layer.digest.hex]
            self.place_raw(layer, parts, what)
            self.contents[str(layer.digest)] = "/".join(parts)
