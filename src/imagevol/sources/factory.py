"""Open the right Source for a reference string."""

from __future__ import annotations

from ..reference import LayoutReference, Reference, parse_any
from .base import Source
from .layout import LayoutSource
from .registry import RegistryOptions, RegistrySource, Transport


def registry_endpoints(ref: Reference, options: RegistryOptions) -> tuple[list[tuple[str, str]], frozenset[str]]:
    """(host, repository) pairs to try for `ref`, mirrors first, and the hosts marked insecure."""
    from .regconf import is_insecure, load_registries_conf, pull_endpoints

    config = load_registries_conf(options.registries_conf)
    pairs = pull_endpoints(config, f"{ref.domain}/{ref.path}", by_digest=ref.digest is not None)
    out: list[tuple[str, str]] = []
    insecure: set[str] = set()
    for endpoint, repository in pairs:
        host, _, repo = repository.partition("/")
        api_host = "registry-1.docker.io" if host in ("docker.io", "index.docker.io") else host
        out.append((api_host, repo))
        if endpoint.insecure or is_insecure(config, host):
            insecure.add(api_host)
    return out, frozenset(insecure)


def open_source(
    ref: str | Reference | LayoutReference,
    *,
    options: RegistryOptions | None = None,
    transport: Transport | None = None,
) -> Source:
    """A Source for `ref`: `oci:PATH[:TAG|@DIGEST]` opens a layout, anything else a registry
    (through the mirrors and rewrites of registries.conf)."""
    r = parse_any(ref) if isinstance(ref, str) else ref
    if isinstance(r, LayoutReference):
        return LayoutSource(r)
    options = options or (transport.options if transport else RegistryOptions())
    endpoints, insecure = registry_endpoints(r, options)
    if insecure - options.insecure_hosts:
        options.insecure_hosts = options.insecure_hosts | insecure
    return RegistrySource(r, transport or Transport(options), endpoints=endpoints)
