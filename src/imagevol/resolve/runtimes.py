"""What the runtimes say and read, as their Go code does: CRI-O 1.34's pull error texts and the
errors for index entries it cannot pull, and containerd's reading of a config's platform (Go's
encoding/json errors included). `select` uses them to predict each runtime faithfully."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..errors import ManifestError
from ..jsonutil import loads as json_loads
from ..manifest import Descriptor
from ..platform import Platform, normalize
from ..reference import LayoutReference, Reference, runtime_reference
from ..sources.base import Source

if TYPE_CHECKING:
    from .trace import IndexStep

__all__ = [
    "ARTIFACT_IS_IMAGE_ERROR",
    "NESTED_ARTIFACT_ERROR",
    "NESTED_IMAGE_ERROR",
    "CrioNestedIndexError",
    "CrioUnusableEntryError",
    "crio_image_name",
    "crio_pull_error",
    "go_config_platform",
]


NESTED_IMAGE_ERROR = (
    "copying system image from manifest list: Unexpectedly received a manifest list instead of a manifest for a "
    "single image"
)
NESTED_ARTIFACT_ERROR = "parse manifest from blob: Treating manifest lists as individual manifests is not implemented"
ARTIFACT_IS_IMAGE_ERROR = "provided artifact is a container image"


def crio_image_name(source: Source) -> str:
    """containers/image ``transports.ImageName`` of what CRI-O would pull: ``docker://`` + the familiar
    reference (for an OCI layout source, the ``oci:`` transport name)."""
    ref = getattr(source, "ref", None)
    if isinstance(ref, Reference):
        rt = runtime_reference(str(ref))
        return "docker://" + (rt.familiar if rt.error is None else ref.familiar())
    if isinstance(ref, LayoutReference):
        return f"oci:{ref.path}:{ref.tag or ''}" if ref.digest is None else f"oci:{ref.path}@{ref.digest}"
    return "docker://" + str(ref)


def crio_pull_error(source: Source, image_err: str, artifact_err: str) -> str:
    """CRI-O 1.34 tries an image copy first and, when it fails, an OCI artifact pull."""
    del source
    return f"unable to pull image or OCI artifact: pull image err: {image_err}; artifact err: {artifact_err}"


class CrioUnusableEntryError(ManifestError):
    """CRI-O 1.34 chose an index entry it cannot pull (`descriptor`)."""

    def __init__(self, message: str, hint: str, trace: list[IndexStep], descriptor: Descriptor) -> None:
        super().__init__(message, hint)
        self.trace = trace
        self.descriptor = descriptor


class CrioNestedIndexError(CrioUnusableEntryError):
    """CRI-O 1.34 chose an index entry that is itself an index: neither its image nor its artifact path
    can mount it."""

    def __init__(self, message: str, trace: list[IndexStep], descriptor: Descriptor) -> None:
        super().__init__(
            message,
            "imagevol descends into nested indexes (its own resolution); for CRI-O, point the reference at the "
            "inner index or flatten the index",
            trace,
            descriptor,
        )


_GO_JSON_KINDS = {dict: "object", list: "array", str: "string", bool: "bool", int: "number", float: "number"}
_GO_PLATFORM_STRINGS = ("architecture", "os", "os.version", "variant")


def go_config_platform(raw: bytes) -> tuple[Platform | None, str | None]:
    """containerd's ``ConfigPlatform``: the config decoded into an OCI platform by Go's encoding/json
    (keys matched case-insensitively, other keys ignored), normalized. Returns (platform, None), or
    (None, the Go error text) for the errors a config in the wild gives: not JSON, wrong JSON types."""
    text = raw.decode("utf-8", errors="replace")
    stripped = text.lstrip(" \t\r\n")
    if not stripped:
        return None, "unexpected end of JSON input"
    first = stripped[0]
    if first not in '{["-0123456789tfn':
        return None, f"invalid character {_go_char(first)} looking for beginning of value"
    try:
        doc = json_loads(raw)
    except ValueError as e:
        pos = getattr(e, "pos", None)
        if pos is not None and pos >= len(raw.rstrip()):
            return None, "unexpected end of JSON input"
        return None, f"invalid JSON ({e})"  # Go words it differently; not produced by the truth cases
    if doc is None:
        return normalize(Platform("", "")), None
    if not isinstance(doc, dict):
        kind = _GO_JSON_KINDS.get(type(doc), "value")
        return None, f"json: cannot unmarshal {kind} into Go value of type v1.Platform"
    fields: dict[str, Any] = {}
    for key, value in doc.items():
        k = key.lower()
        if k in _GO_PLATFORM_STRINGS:
            if value is not None and not isinstance(value, str):
                kind = _GO_JSON_KINDS.get(type(value), "value")
                return None, f"json: cannot unmarshal {kind} into Go struct field Platform.{k} of type string"
            if value is not None:
                fields[k] = value
        elif k == "os.features":
            if value is not None and not isinstance(value, list):
                kind = _GO_JSON_KINDS.get(type(value), "value")
                return None, f"json: cannot unmarshal {kind} into Go struct field Platform.os.features of type []string"
            for item in value or []:
                if item is not None and not isinstance(item, str):
                    kind = _GO_JSON_KINDS.get(type(item), "value")
                    return (
                        None,
                        f"json: cannot unmarshal {kind} into Go struct field Platform.os.features of type string",
                    )
    p = Platform(
        os=fields.get("os", ""),
        architecture=fields.get("architecture", ""),
        variant=fields.get("variant", ""),
        os_version=fields.get("os.version", ""),
    )
    return normalize(p), None


def _go_char(ch: str) -> str:
    """Go's encoding/json quoteChar."""
    if ch == "'":
        return "'\\''"
    if ch == '"':
        return "'\"'"
    if ch.isprintable() and ch.isascii():
        return f"'{ch}'"
    return json.dumps(ch)
