"""The `Source` of a registry repository: `RegistrySource` resolves a reference and serves its
manifests and blobs through the endpoints registries.conf gives (mirrors first, the registry last),
trying the next endpoint when one fails and verifying every byte whichever served it. The
distribution API calls are `RegistryClient`'s (registry/client.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, BinaryIO

import urllib3

from ..digest import Digest
from ..errors import DigestMismatchError, ManifestError, NotFoundError, RegistryError, SizeMismatchError, TransportError
from ..manifest import MAX_CONFIG_SIZE, Descriptor, Index, Manifest, parse_manifest
from ..reference import Reference
from ..registry.client import RegistryClient, RegistryEndpoint
from ..registry.transport import Transport

log = logging.getLogger("imagevol.registry")


class _ResponseReader:
    """Adapts a urllib3 response to a closeable binary stream."""

    def __init__(self, resp: urllib3.BaseHTTPResponse) -> None:
        self.resp = resp

    def read(self, n: int = -1) -> bytes:
        return self.resp.read(None if n is None or n < 0 else n)

    def close(self) -> None:
        self.resp.release_conn()

    def __enter__(self) -> _ResponseReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RegistrySource:
    """A Source for one reference in a registry, through the mirrors of registries.conf.

    Endpoints are tried in order (mirrors first, then the registry itself); the first that serves
    the manifest serves the blobs, and the others are fallbacks. Every byte is verified whatever
    endpoint served it, so a mirror can be fast but cannot lie.
    """

    def __init__(
        self,
        ref: Reference,
        transport: Transport | None = None,
        *,
        endpoints: list[tuple[str, str]] | list[RegistryEndpoint] | None = None,
    ) -> None:
        """`endpoints`: where to pull from, in order, the registry itself last; (host, repository)
        pairs, or :class:`RegistryEndpoint` for mirrors that get ``?ns=``. Default: the registry."""
        self.ref = ref
        self.transport = transport or Transport()
        eps = [RegistryEndpoint(*e) for e in (endpoints or [(ref.api_domain, ref.path)])]
        self.clients = [RegistryClient(self.transport, e.host, e.repo, namespace=e.namespace) for e in eps]
        self.client = self.clients[-1]  # the origin (last endpoint)
        self._preferred: RegistryClient | None = None

    def describe(self) -> str:
        c = self._preferred or self.client
        return f"registry {c.host}/{c.repo}"

    def _ordered(self) -> list[RegistryClient]:
        if self._preferred is None:
            return list(self.clients)
        return [self._preferred, *[c for c in self.clients if c is not self._preferred]]

    def _try(self, what: str, fn: Callable[[RegistryClient], Any]) -> Any:
        # The registry the reference names must be admitted, whichever endpoint would serve it.
        self.transport.admit_registry(self.ref.api_domain)
        failures: list[str] = []
        last: Exception | None = None
        for c in self._ordered():
            try:
                out = fn(c)
                self._preferred = c
                return out
            except (TransportError, RegistryError, NotFoundError, DigestMismatchError, ManifestError) as e:
                if len(self.clients) == 1:
                    raise
                log.info("endpoint %s failed for %s: %s", c.host, what, e)
                failures.append(f"{c.host}: {e}")
                last = e
        assert last is not None
        if isinstance(last, (DigestMismatchError, ManifestError)):
            raise last
        raise (
            type(last)(
                f"{what}: every endpoint failed: " + "; ".join(failures),
                hint="check the mirrors in registries.conf and that the registry is reachable",
            )
            if type(last) in (TransportError, NotFoundError)
            else last
        )

    def resolve(self) -> tuple[Descriptor, Manifest | Index]:
        reference = str(self.ref.digest) if self.ref.digest else (self.ref.tag or "latest")

        def get(c: RegistryClient) -> tuple[Descriptor, Manifest | Index]:
            body, ctype, digest = c.get_manifest(reference, expected=self.ref.digest)
            doc = parse_manifest(body, ctype, expected_digest=digest, where=f"manifest {self.ref}")
            return Descriptor(doc.media_type, digest, len(body)), doc

        return self._try(f"manifest {self.ref}", get)

    def manifest(self, desc: Descriptor) -> Manifest | Index:
        def get(c: RegistryClient) -> Manifest | Index:
            body, _ctype, _ = c.get_manifest(str(desc.digest), expected=desc.digest)
            if len(body) != desc.size:
                raise SizeMismatchError.of(
                    f"manifest {desc.digest}", f"registry {c.host}/{c.repo}", desc.size, len(body)
                )
            # The descriptor's media type is authoritative for children; the header is advisory.
            return parse_manifest(body, desc.media_type, expected_digest=desc.digest, where=f"manifest {desc.digest}")

        return self._try(f"manifest {desc.digest}", get)

    def blob_bytes(self, desc: Descriptor, max_size: int = MAX_CONFIG_SIZE) -> bytes:
        if desc.data is not None:
            return desc.data
        if desc.size > max_size:
            raise ManifestError(f"blob {desc.digest} is {desc.size} bytes, over the {max_size} byte limit")
        return self._try(f"blob {desc.digest}", lambda c: c.get_blob_bytes(desc.digest, max_size, desc.size))

    def open_blob(self, desc: Descriptor, offset: int = 0) -> BinaryIO:
        return _ResponseReader(self.open_range(desc, offset, None))  # type: ignore[return-value]

    def confirm(self, digest: Digest, *, manifest: bool = False, sample: tuple[int, bytes] = (0, b"")) -> bool:
        """:meth:`RegistryClient.confirm` asked of the registry itself, never of a mirror (a mirror
        or pull-through cache may hold what the registry would refuse these credentials)."""
        return self.client.confirm(digest, manifest=manifest, sample=sample)

    def open_range(self, desc: Descriptor, start: int, end: int | None) -> urllib3.BaseHTTPResponse:
        """A streaming response for [start, end) of a blob; status 200 means the server ignored Range."""
        return self._try(f"blob {desc.digest}", lambda c: c.open_blob(desc.digest, start, end, size=desc.size))
