"""Push to a registry (distribution spec, push side).

Per blob whose digest is known: ``HEAD`` first (present: skipped); then, when the blob is known in
one of the ``mount_from`` repositories on the same registry, a cross-repository mount
(``POST /v2/<repo>/blobs/uploads/?mount=<digest>&from=<repo>``: 201 mounted; 202 means the
registry declined and opened an upload session, which is then used). Otherwise an upload:
monolithic (``POST`` then ``PUT ?digest=`` with the body) up to the chunk size, chunked above it
(``PATCH`` requests of at most ``chunk_size`` bytes with ``Content-Range: start-end``, one after
the other, each to the ``Location`` the previous answer gave, then ``PUT ?digest=``).

A blob without a digest (a large file, or a tar layer streamed from the files it holds) is hashed
while it uploads: ``POST``, the chunked ``PATCH`` requests with the bytes hashed as they are sent,
then ``PUT ?digest=`` with the digest just computed; each byte is read once. Such a blob cannot be
skipped (its digest is not known before it is sent): pack asks for the digest first
(:meth:`RegistrySink.wants_digest_first`) for blobs under ``stream_min_size``, with
``mount_from``, or when a digest cache knows it.

Bodies are read in 1 MiB pieces into one reused buffer per upload (constant memory) and re-sent
from their start, with the hash restarted from the state before the request, when the client
retries a request. Upload locations may be relative (distribution 2.8) or absolute; a location on
another host is used without the registry's credentials.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import urllib3

from ..digest import Digest, digest_bytes
from ..errors import AuthError, DigestMismatchError, NotFoundError, RegistryError, TransportError, UsageError
from ..manifest import Descriptor
from ..reference import Reference, is_domain
from ..registry.client import RegistryClient
from ..registry.errortext import error_detail
from ..registry.transport import RegistryOptions, Transport
from . import PIECE, Blob, PushStats

__all__ = ["DEFAULT_CHUNK_SIZE", "RegistrySink"]

log = logging.getLogger("imagevol.push")

DEFAULT_CHUNK_SIZE = 64 << 20
# Blobs from this size on are hashed while they upload unless their digest is already known.
DEFAULT_STREAM_MIN_SIZE = 32 << 20
BLOB_ATTEMPTS = 2
OCTET = "application/octet-stream"


class RegistrySink:
    """Pushes blobs and manifests to one repository (``ref``) of a registry."""

    def __init__(
        self,
        ref: Reference,
        *,
        options: RegistryOptions | None = None,
        transport: Transport | None = None,
        mount_from: Iterable[str] = (),
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        stream_min_size: int = DEFAULT_STREAM_MIN_SIZE,
    ) -> None:
        if ref.digest is not None:
            raise UsageError(
                f"cannot push to {ref}: a digest names existing content",
                hint="push to a tag (REPO:TAG); the digest is printed after the push",
            )
        if chunk_size < 1:
            raise UsageError("chunk size must be at least 1 byte")
        self.ref = ref
        self.tag = ref.tag or "latest"
        options = options or (transport.options if transport else RegistryOptions())
        if transport is None:
            from ..sources.factory import registry_endpoints

            _, insecure = registry_endpoints(ref, options)
            if insecure - options.insecure_hosts:
                options.insecure_hosts = options.insecure_hosts | insecure
            transport = Transport(options)
        self.transport = transport
        self.host = ref.api_domain
        self.repo = ref.path
        self.client = RegistryClient(transport, self.host, self.repo, actions="pull,push")
        self.chunk_size = chunk_size
        self.stream_min_size = stream_min_size
        self.mount_from = self._mount_repos(mount_from)
        self.stats = PushStats()

    def describe(self) -> str:
        return f"registry {self.host}/{self.repo}:{self.tag}"

    def _mount_repos(self, values: Iterable[str]) -> list[str]:
        out: list[str] = []
        for v in values:
            v = v.strip().strip("/")
            for prefix in (f"{self.ref.domain}/", f"{self.host}/"):
                if v.startswith(prefix):
                    v = v[len(prefix) :]
                    break
            else:
                first = v.split("/", 1)[0]
                if "/" in v and is_domain(first):
                    log.warning("mount source %s is on another registry: ignored", v)
                    continue
            v = v.split("@", 1)[0]
            if ":" in v.rsplit("/", 1)[-1]:
                v = v.rsplit(":", 1)[0]
            if v and v != self.repo and v not in out:
                out.append(v)
        return out

    # --- locations ------------------------------------------------------------------------------
    def _at(
        self,
        method: str,
        location: str,
        *,
        headers: dict[str, str] | None = None,
        body: Any = None,
        ok: tuple[int, ...],
        what: str,
    ) -> urllib3.BaseHTTPResponse:
        """A request to an upload ``Location`` (relative or absolute)."""
        base = self.client.url("blobs/uploads/")
        url = urljoin(base, location)
        parts = urlsplit(url)
        prefix = f"/v2/{self.repo}/"
        if parts.netloc == urlsplit(base).netloc and parts.path.startswith(prefix):
            path = parts.path[len(prefix) :] + (f"?{parts.query}" if parts.query else "")
            return self.client.request(method, path, headers=headers, body=body, ok=ok, what=what)
        # Another host (storage service): never send the registry's credentials there.
        hdrs = {"User-Agent": self.transport.options.user_agent, **(headers or {})}
        try:
            r = self.transport.pool(parts.netloc, parts.scheme).request(
                method, url, headers=hdrs, body=body, redirect=False
            )
        except urllib3.exceptions.HTTPError as e:
            raise TransportError(f"{what}: {method} {parts.netloc} failed: {e}") from None
        if r.status not in ok:
            detail = error_detail(r.data, r.headers.get("Content-Type"))
            raise RegistryError(f"{what}: {parts.netloc} answered {r.status}: {detail}", status=r.status)
        return r

    @staticmethod
    def _with_digest(location: str, digest: Digest) -> str:
        sep = "&" if "?" in location else "?"
        return f"{location}{sep}digest={quote(str(digest), safe=':')}"

    @staticmethod
    def _location(r: urllib3.BaseHTTPResponse, what: str) -> str:
        loc = r.headers.get("Location")
        if not loc:
            raise RegistryError(f"{what}: the registry answered {r.status} without a Location header")
        return loc

    # --- blobs ----------------------------------------------------------------------------------
    def has_blob(self, digest: Digest, size: int | None = None) -> bool:
        r = self.client.request("HEAD", f"blobs/{digest}", ok=(200, 404), what=f"blob {digest}")
        if r.status != 200:
            return False
        if size is not None:
            length = r.headers.get("Content-Length")
            if length and length.isdigit() and int(length) != size:
                return False
        return True

    def _source_has(self, repo: str, digest: Digest) -> bool:
        c = RegistryClient(self.transport, self.host, repo)
        try:
            r = c.request("HEAD", f"blobs/{digest}", ok=(200, 404), what=f"blob {digest} in {repo}")
        except (AuthError, NotFoundError, RegistryError):
            return False
        return r.status == 200

    def _try_mount(self, digest: Digest) -> tuple[bool, str | None]:
        """(mounted, an upload location the registry opened instead, if any)."""
        for repo in self.mount_from:
            if not self._source_has(repo, digest):
                continue
            q = f"?mount={quote(str(digest), safe=':')}&from={quote(repo, safe='/')}"
            try:
                r = self.client.request(
                    "POST",
                    f"blobs/uploads/{q}",
                    headers={"Content-Length": "0"},
                    body=b"",
                    ok=(201, 202),
                    what=f"mount of {digest} from {repo}",
                )
            except (AuthError, RegistryError) as e:
                log.info("mount of %s from %s refused: %s", digest, repo, e)
                continue
            if r.status == 201:
                return True, None
            return False, self._location(r, "mount")
        return False, None

    def wants_digest_first(self, blob: Blob) -> bool:
        return blob.size < self.stream_min_size or bool(self.mount_from)

    def put_blob(self, blob: Blob, progress: Callable[[int], None] | None = None) -> str:
        label = blob.digest.short if blob.digest is not None else "(digest computed on the way)"
        what = f"upload of blob {label}" + (f" ({blob.what})" if blob.what else "")
        location: str | None = None
        if blob.digest is not None:
            if self.has_blob(blob.digest):
                self.stats.add(skipped=1)
                return "skipped"
            if self.mount_from:
                mounted, location = self._try_mount(blob.digest)
                if mounted:
                    self.stats.add(mounted=1)
                    return "mounted"
        for attempt in range(BLOB_ATTEMPTS):
            if location is None:
                r = self.client.request(
                    "POST", "blobs/uploads/", headers={"Content-Length": "0"}, body=b"", ok=(202,), what=what
                )
                location = self._location(r, what)
            try:
                if blob.digest is None:
                    blob.digest = self._upload_hashing(blob, location, what, progress)
                else:
                    self._upload(blob, location, what, progress)
                self.stats.add(pushed=1, bytes_pushed=blob.size)
                return "pushed"
            except (TransportError, RegistryError) as e:
                if isinstance(e, AuthError) or attempt + 1 >= BLOB_ATTEMPTS:
                    raise
                status = getattr(e, "status", None)
                if status is not None and status < 500 and status not in (400, 404, 416):
                    raise
                log.info("%s failed (%s); starting over", what, e)
                with contextlib.suppress(Exception):
                    self._at("DELETE", location, ok=(202, 204, 404), what=what)
                location = None
        raise AssertionError("unreachable")

    def _body(self, blob: Blob, start: int, length: int, buf: bytearray, progress: Callable[[int], None] | None) -> Any:
        if blob.data is not None and length == len(blob.data):
            if progress:
                progress(length)
            return blob.data
        return _Body(blob, start, length, buf, progress)

    def _patches(
        self,
        blob: Blob,
        location: str,
        what: str,
        progress: Callable[[int], None] | None,
        hasher: Any = None,
    ) -> tuple[str, Any]:
        """The blob in ``PATCH`` requests of at most ``chunk_size`` bytes; (the last Location, the hash
        state after the last byte when ``hasher`` was given)."""
        size = blob.size
        buf = bytearray(min(PIECE, max(size, 1)))
        offset = 0
        while offset < size:
            n = min(self.chunk_size, size - offset)
            body = _Body(blob, offset, n, buf, progress, hasher)
            r = self._at(
                "PATCH",
                location,
                headers={
                    "Content-Type": OCTET,
                    "Content-Length": str(n),
                    "Content-Range": f"{offset}-{offset + n - 1}",
                },
                body=body,
                ok=(202, 204),
                what=what,
            )
            if hasher is not None:
                if body.hashed is None:  # the body was not read to its end, yet the registry took it
                    raise RegistryError(f"{what}: the registry answered before the chunk at {offset} was sent")
                hasher = body.hashed
            location = self._location(r, what)
            offset += n
            self.stats.add(chunks=1)
        return location, hasher

    def _finish(self, location: str, digest: Digest, what: str) -> None:
        r = self._at(
            "PUT",
            self._with_digest(location, digest),
            headers={"Content-Length": "0"},
            body=b"",
            ok=(201, 204),
            what=what,
        )
        self._check_digest(r, digest, what)

    @staticmethod
    def _check_digest(r: urllib3.BaseHTTPResponse, digest: Digest, what: str) -> None:
        got = r.headers.get("Docker-Content-Digest")
        if got and got != digest:
            raise DigestMismatchError(f"{what}: the registry stored {got}, expected {digest}")

    def _upload(self, blob: Blob, location: str, what: str, progress: Callable[[int], None] | None) -> None:
        assert blob.digest is not None
        size = blob.size
        if size <= self.chunk_size:
            r = self._at(
                "PUT",
                self._with_digest(location, blob.digest),
                headers={"Content-Type": OCTET, "Content-Length": str(size)},
                body=self._body(blob, 0, size, bytearray(min(PIECE, max(size, 1))), progress),
                ok=(201, 204),
                what=what,
            )
            self._check_digest(r, blob.digest, what)
            return
        location, _ = self._patches(blob, location, what, progress)
        self._finish(location, blob.digest, what)

    def _upload_hashing(self, blob: Blob, location: str, what: str, progress: Callable[[int], None] | None) -> Digest:
        """Upload a blob whose digest is not known yet, hashing the bytes as they are sent."""
        location, h = self._patches(blob, location, what, progress, hashlib.sha256())
        digest = Digest("sha256:" + h.hexdigest())
        self._finish(location, digest, what)
        return digest

    # --- manifests ------------------------------------------------------------------------------
    def _put_manifest(self, body: bytes, media_type: str, reference: str) -> Descriptor:
        digest = digest_bytes(body)
        r = self.client.request(
            "PUT",
            f"manifests/{reference}",
            headers={"Content-Type": media_type, "Content-Length": str(len(body))},
            body=body,
            ok=(200, 201, 202, 204),
            what=f"manifest {reference}",
        )
        got = r.headers.get("Docker-Content-Digest")
        if got and got != digest:
            raise DigestMismatchError(f"manifest {reference}: the registry says {got}, expected {digest}")
        self.stats.add(manifests=1)
        return Descriptor(media_type, digest, len(body))

    def put_manifest(self, body: bytes, media_type: str) -> Descriptor:
        return self._put_manifest(body, media_type, str(digest_bytes(body)))

    def put_root(self, body: bytes, media_type: str) -> Descriptor:
        return self._put_manifest(body, media_type, self.tag)

    def close(self) -> None:
        pass


class _Body:
    """Bytes ``[start, start + length)`` of a blob as a request body that can be sent again (a retry
    iterates from the start). Pieces are views of ``buf``, read as they are sent. With ``hasher``
    (the hash state before ``start``), the bytes are hashed into a copy of it on the way: ``hashed``
    is that copy once the body has been read to its end (None before)."""

    def __init__(
        self,
        blob: Blob,
        start: int,
        length: int,
        buf: bytearray,
        progress: Callable[[int], None] | None,
        hasher: Any = None,
    ) -> None:
        self.blob = blob
        self.start = start
        self.length = length
        self.buf = buf
        self.progress = progress
        self.hasher = hasher
        self.hashed: Any = None

    def __iter__(self) -> Iterator[memoryview]:
        self.hashed = None
        h = self.hasher.copy() if self.hasher is not None else None
        for view in self.blob.views(self.buf, self.start, self.length):
            if h is not None:
                h.update(view)
            if self.progress is not None:
                self.progress(len(view))
            yield view
        self.hashed = h
