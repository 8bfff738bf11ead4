"""Open the right Source for a reference string."""

from __future__ import annotations

from typing import Any, BinaryIO

from ..errors import AuthError, NotFoundError
from ..manifest import Descriptor, Index, Manifest
from ..reference import LayoutReference, Reference, is_domain, parse_any, parse_reference
from ..registry.client import RegistryEndpoint
from ..registry.transport import RegistryOptions, Transport
from .base import Source
from .layout import LayoutSource
from .registry import RegistrySource


def pull_hosts(ref: Reference, options: RegistryOptions) -> tuple[list[RegistryEndpoint], frozenset[str]]:
    """Where to pull `ref` from, mirrors first (each with the ``ns`` it is sent: the reference's
    registry host), the registry itself last; and the hosts marked insecure."""
    from ..registry.regconf import is_insecure, load_registries_conf, pull_endpoints

    config = load_registries_conf(options.registries_conf)
    pairs = pull_endpoints(config, f"{ref.domain}/{ref.path}", by_digest=ref.digest is not None)
    out: list[RegistryEndpoint] = []
    insecure: set[str] = set()
    for endpoint, repository in pairs:
        host, _, repo = repository.partition("/")
        api_host = "registry-1.docker.io" if host in ("docker.io", "index.docker.io") else host
        # As containerd: a mirror on the registry's own host is the registry, not a proxy for it.
        ns = ref.domain if endpoint.is_mirror and api_host != ref.api_domain else None
        out.append(RegistryEndpoint(api_host, repo, ns))
        if endpoint.insecure or is_insecure(config, host):
            insecure.add(api_host)
    return out, frozenset(insecure)


def registry_endpoints(ref: Reference, options: RegistryOptions) -> tuple[list[tuple[str, str]], frozenset[str]]:
    """(host, repository) pairs to try for `ref`, mirrors first, and the hosts marked insecure."""
    eps, insecure = pull_hosts(ref, options)
    return [(e.host, e.repo) for e in eps], insecure


def is_short_name(s: str) -> bool:
    """True when `s` names no registry (`ubuntu`, `org/model:v1`): registries.conf search applies."""
    if s.startswith(("oci:", "docker://")):
        return False
    first, slash, _ = s.split("@", 1)[0].partition("/")
    return not (slash and is_domain(first))


class SearchSource:
    """A short name tried against `unqualified-search-registries` in order; the first that has it wins."""

    def __init__(self, name: str, candidates: list[RegistrySource]) -> None:
        self.name = name
        self.candidates = candidates
        self.chosen: RegistrySource | None = None

    @property
    def ref(self) -> Reference:
        return (self.chosen or self.candidates[0]).ref

    def describe(self) -> str:
        return (self.chosen or self.candidates[0]).describe()

    def resolve(self) -> tuple[Descriptor, Manifest | Index]:
        tried = []
        for c in self.candidates:
            try:
                out = c.resolve()
            except (NotFoundError, AuthError) as e:
                tried.append(f"{c.ref}: {e.message}")
                continue
            self.chosen = c
            return out
        raise NotFoundError(
            f"short name {self.name!r} was not found in any search registry: " + "; ".join(tried),
            hint="use a fully qualified reference (registry/repository:tag)",
        )

    def _src(self) -> RegistrySource:
        if self.chosen is None:
            self.resolve()
        assert self.chosen is not None
        return self.chosen

    def manifest(self, desc: Descriptor) -> Manifest | Index:
        return self._src().manifest(desc)

    def blob_bytes(self, desc: Descriptor, max_size: int) -> bytes:
        return self._src().blob_bytes(desc, max_size)

    def open_blob(self, desc: Descriptor, offset: int = 0) -> BinaryIO:
        return self._src().open_blob(desc, offset)

    def open_range(self, desc: Descriptor, start: int, end: int | None) -> Any:
        return self._src().open_range(desc, start, end)


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
    transport = transport or Transport(options)
    if isinstance(ref, str) and is_short_name(ref):
        from ..registry.regconf import load_registries_conf

        config = load_registries_conf(options.registries_conf)
        name = ref[len("docker://") :] if ref.startswith("docker://") else ref
        alias = config.aliases.get(name.split("@")[0].split(":")[0])
        if alias:
            r = parse_reference(alias + name[len(name.split("@")[0].split(":")[0]) :])
        elif config.unqualified_search_registries:
            cands = [parse_reference(f"{reg}/{name}") for reg in config.unqualified_search_registries]
            return SearchSource(name, [_registry_source(c, options, transport) for c in cands])
    return _registry_source(r, options, transport)


def _registry_source(r: Reference, options: RegistryOptions, transport: Transport) -> RegistrySource:
    endpoints, insecure = pull_hosts(r, options)
    if insecure - options.insecure_hosts:
        options.insecure_hosts = options.insecure_hosts | insecure
    for e in endpoints:
        if e.host != r.api_domain:
            # A mirror or rewritten location from registries.conf: the operator chose it, the pod did not.
            transport.trust(e.host)
    return RegistrySource(r, transport, endpoints=endpoints)
