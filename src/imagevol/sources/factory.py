"""Open the right Source for a reference string."""

from __future__ import annotations

from ..reference import LayoutReference, Reference, parse_any
from .base import Source
from .layout import LayoutSource
from .registry import RegistryOptions, RegistrySource, Transport


def open_source(
    ref: str | Reference | LayoutReference,
    *,
    options: RegistryOptions | None = None,
    transport: Transport | None = None,
) -> Source:
    """A Source for `ref`: `oci:PATH[:TAG|@DIGEST]` opens a layout, anything else a registry."""
    r = parse_any(ref) if isinstance(ref, str) else ref
    if isinstance(r, LayoutReference):
        return LayoutSource(r)
    return RegistrySource(r, transport or Transport(options))
