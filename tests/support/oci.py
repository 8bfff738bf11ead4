"""Fixture builders and a tiny registry client for the tests, independent of imagevol's code.

Client side: :class:`Client` (or the functions ``get``/``request``/``push_blob``/
``push_manifest``/``get_manifest``/``get_blob``/``push_image``) speaks the distribution API with
urllib3, verifies TLS against the registry's own CA and handles its auth: basic, or the
Bearer challenge -> token server -> retry dance. Credentials default to the registry's first
user; pass ``creds=None`` for anonymous or ``creds=("user", "pw")``.

Builder side: ``descriptor``, ``make_image_manifest``, ``make_artifact_manifest``,
``make_index`` return ``(bytes, digest)`` (or a dict for descriptors) for OCI and Docker
manifests, indexes, manifest lists and artifacts with the empty config.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any
from urllib.parse import urlencode, urljoin

import urllib3

from tests.support.blobs import sha256_digest

# Media types, spelled out here so fixtures do not depend on imagevol.
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_EMPTY_DATA = b"{}"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
ACCEPT_ALL = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST))

DEFAULT = object()  # "use the registry's first user" for creds
TIMEOUT = urllib3.Timeout(connect=5.0, read=60.0)


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class RegistryHTTPError(RuntimeError):
    def __init__(self, method: str, url: str, response: urllib3.BaseHTTPResponse) -> None:
        self.status = response.status
        self.response = response
        body = response.data[:500].decode(errors="replace")
        super().__init__(f"{method} {url} -> HTTP {response.status}: {body}")


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="x",service="y",scope="z"`` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


def basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Client:
    """One registry, one identity; caches Bearer tokens per scope."""

    def __init__(self, reg, creds: Any = DEFAULT) -> None:
        self.reg = reg
        if creds is DEFAULT:
            creds = next(iter(reg.users.items())) if getattr(reg, "auth", None) and reg.users else None
        self.creds: tuple[str, str] | None = tuple(creds) if creds else None
        ca = getattr(reg, "ca_file", None)
        self.pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=str(ca)) if ca else urllib3.PoolManager()
        self.tokens: dict[str, str] = {}
        self.last_challenge: dict[str, str] | None = None

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.reg.url + path

    def fetch_token(self, params: dict[str, str]) -> str:
        """GET the realm with service/scope (and basic creds if any); return the token."""
        query = {k: params[k] for k in ("service", "scope") if k in params}
        url = params["realm"] + ("?" + urlencode(query) if query else "")
        headers = {"Authorization": basic_header(*self.creds)} if self.creds else {}
        r = self.pool.request("GET", url, headers=headers, timeout=TIMEOUT, retries=False)
        if r.status != 200:
            raise RegistryHTTPError("GET", url, r)
        body = json.loads(r.data)
        return body.get("token") or body["access_token"]

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        expect: tuple[int, ...] | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """One API call with auth; ``expect`` raises :class:`RegistryHTTPError` on another
        status. The response is fully read (``.data``)."""
        url = self.url(path)
        hdrs = dict(headers or {})
        if getattr(self.reg, "auth", None) == "basic" and self.creds:
            hdrs["Authorization"] = basic_header(*self.creds)
        r = self._send(method, url, body, hdrs, self._cached_token(url))
        if r.status == 401 and "WWW-Authenticate" in r.headers:
            scheme, params = parse_challenge(r.headers["WWW-Authenticate"])
            self.last_challenge = params
            if scheme == "basic" and self.creds and "Authorization" not in hdrs:
                hdrs["Authorization"] = basic_header(*self.creds)
                r = self._send(method, url, body, hdrs, None)
            elif scheme == "bearer" and "realm" in params:
                token = self.fetch_token(params)
                self.tokens[params.get("scope", "")] = token
                r = self._send(method, url, body, hdrs, token)
        if expect is not None and r.status not in expect:
            raise RegistryHTTPError(method, url, r)
        return r

    def _cached_token(self, url: str) -> str | None:
        m = re.search(r"/v2/(.+?)/(?:blobs|manifests|tags)/", url)
        if not m:
            return None
        for scope, token in self.tokens.items():
            if scope.startswith(f"repository:{m.group(1)}:"):
                return token
        return None

    def _send(self, method, url, body, headers, token) -> urllib3.BaseHTTPResponse:
        hdrs = dict(headers)
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        return self.pool.request(method, url, body=body, headers=hdrs, timeout=TIMEOUT, retries=False, redirect=False)

    # ---- API

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = sha256_digest(data)
        r = self.request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"}, expect=(202,))
        location = urljoin(self.reg.url + "/", r.headers["Location"])
        sep = "&" if "?" in location else "?"
        self.request(
            "PUT",
            f"{location}{sep}digest={digest}",
            body=data,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
            expect=(201,),
        )
        return digest

    def push_manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        r = self.request(
            "PUT",
            f"/v2/{repo}/manifests/{ref}",
            body=body,
            headers={"Content-Type": media_type},
            expect=(201,),
        )
        digest = sha256_digest(body)
        got = r.headers.get("Docker-Content-Digest")
        if got and got != digest:
            raise AssertionError(f"registry says {got}, we computed {digest}")
        return digest

    def get_manifest(self, repo: str, ref: str, accept: str = ACCEPT_ALL) -> tuple[bytes, str, str]:
        """(body, Content-Type, Docker-Content-Digest)."""
        r = self.request("GET", f"/v2/{repo}/manifests/{ref}", headers={"Accept": accept}, expect=(200,))
        return r.data, r.headers.get("Content-Type", ""), r.headers.get("Docker-Content-Digest", "")

    def get_blob(self, repo: str, digest: str) -> bytes:
        return self.request("GET", f"/v2/{repo}/blobs/{digest}", expect=(200,)).data


def _client(reg, creds) -> Client:
    return Client(reg, creds)


def request(reg, method: str, path: str, *, creds: Any = DEFAULT, **kw) -> urllib3.BaseHTTPResponse:
    return _client(reg, creds).request(method, path, **kw)


def get(reg, path: str, *, creds: Any = DEFAULT, headers: dict[str, str] | None = None, expect=None):
    """GET ``path`` (``/v2/...`` or a full URL) with auth; returns the urllib3 response."""
    return _client(reg, creds).request("GET", path, headers=headers, expect=expect)


def push_blob(reg, repo: str, data: bytes, *, creds: Any = DEFAULT) -> str:
    return _client(reg, creds).push_blob(repo, data)


def push_manifest(reg, repo: str, ref: str, body: bytes, media_type: str, *, creds: Any = DEFAULT) -> str:
    return _client(reg, creds).push_manifest(repo, ref, body, media_type)


def get_manifest(reg, repo: str, ref: str, *, accept: str = ACCEPT_ALL, creds: Any = DEFAULT):
    return _client(reg, creds).get_manifest(repo, ref, accept)


def get_blob(reg, repo: str, digest: str, *, creds: Any = DEFAULT) -> bytes:
    return _client(reg, creds).get_blob(repo, digest)


# --------------------------------------------------------------------------- builders


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict:
    """``{"mediaType", "digest", "size", **extra}``; ``extra`` may hold annotations, platform,
    artifactType, urls..."""
    d = {"mediaType": media_type, "digest": sha256_digest(data), "size": len(data)}
    d.update({k: v for k, v in extra.items() if v is not None})
    return d


def make_image_manifest(
    config: dict,
    layers: list[dict],
    *,
    media_type: str = OCI_MANIFEST,
    artifact_type: str | None = None,
    annotations: dict[str, str] | None = None,
    subject: dict | None = None,
) -> tuple[bytes, str]:
    """An OCI image manifest (or Docker schema2 with ``media_type=DOCKER_MANIFEST``) from
    descriptors."""
    m: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type}
    if artifact_type:
        m["artifactType"] = artifact_type
    m["config"] = config
    m["layers"] = layers
    if subject:
        m["subject"] = subject
    if annotations:
        m["annotations"] = annotations
    body = canonical_json(m)
    return body, sha256_digest(body)


def empty_config() -> dict:
    return descriptor(OCI_EMPTY, OCI_EMPTY_DATA)


def make_artifact_manifest(
    artifact_type: str, layers: list[dict], *, annotations: dict[str, str] | None = None
) -> tuple[bytes, str]:
    """An artifact the 1.1 way: image manifest, ``artifactType``, empty config ``{}``. Push
    ``OCI_EMPTY_DATA`` as a blob too."""
    return make_image_manifest(empty_config(), layers, artifact_type=artifact_type, annotations=annotations)


def platform(os_: str = "linux", arch: str = "amd64", variant: str | None = None) -> dict:
    p = {"architecture": arch, "os": os_}
    if variant:
        p["variant"] = variant
    return p


def make_index(
    entries: list[dict],
    *,
    media_type: str = OCI_INDEX,
    annotations: dict[str, str] | None = None,
) -> tuple[bytes, str]:
    """An OCI index (or Docker manifest list with ``media_type=DOCKER_MANIFEST_LIST``);
    ``entries`` are descriptors, e.g. ``descriptor(OCI_MANIFEST, body, platform=platform())``."""
    idx: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}
    if annotations:
        idx["annotations"] = annotations
    body = canonical_json(idx)
    return body, sha256_digest(body)


def push_image(
    reg,
    repo: str,
    ref: str,
    layers: list[tuple[str, bytes]] | list[bytes],
    *,
    config: tuple[str, bytes] | None = None,
    media_type: str = OCI_MANIFEST,
    artifact_type: str | None = None,
    annotations: dict[str, str] | None = None,
    creds: Any = DEFAULT,
) -> tuple[bytes, str]:
    """Push config + layer blobs and the manifest under ``ref``; returns (manifest, digest).
    Layers are ``(media_type, data)`` or plain bytes (OCI tar). Without ``config``: empty
    config for OCI, a minimal image config for Docker."""
    c = Client(reg, creds)
    if config is None:
        if media_type == DOCKER_MANIFEST:
            config = (DOCKER_CONFIG, canonical_json({"architecture": "amd64", "os": "linux", "rootfs": {}}))
        else:
            config = (OCI_EMPTY, OCI_EMPTY_DATA)
    descs = []
    for layer in layers:
        mt, data = layer if isinstance(layer, tuple) else (OCI_LAYER, layer)
        c.push_blob(repo, data)
        descs.append(descriptor(mt, data))
    c.push_blob(repo, config[1])
    body, digest = make_image_manifest(
        descriptor(*config),
        descs,
        media_type=media_type,
        artifact_type=artifact_type,
        annotations=annotations,
    )
    c.push_manifest(repo, ref, body, media_type)
    return body, digest
