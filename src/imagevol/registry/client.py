"""Distribution-spec client (pull side) and the registry Source.

Built on urllib3 (measured ~4x the single-stream throughput of httpx on loopback; see
docs/performance.md). Handles: scheme choice (https, plain http for loopback or insecure hosts),
anonymous / bearer-token / basic auth with token caching and refresh, retries with backoff on
429/5xx and resets (Retry-After honoured), redirects that never forward Authorization to another
host, OCI error bodies turned into readable errors, Docker-Content-Digest verification and the
4 MiB cap on manifests and configs.

Mirrors. A request to a mirror of registries.conf (not to the registry itself) carries the query
parameter ``ns=<registry host of the reference>`` (``ns=docker.io``, ``ns=ghcr.io``), as
containerd adds it for the mirrors of its ``hosts.toml``: a mirror that serves several registries
(Spegel, Dragonfly's dfdaemon, a pull-through cache) learns which one the request is for. Servers
that do not know the parameter ignore it. It goes on manifest and blob requests only; token
requests and redirect targets (blob storage, presigned URLs) never get it.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import ipaddress
import logging
import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple
from urllib.parse import urlencode, urljoin, urlsplit

import urllib3

from .. import mediatypes as mt
from ..digest import Digest, digest_bytes
from ..errors import (
    AuthError,
    DigestMismatchError,
    ImagevolError,
    ManifestError,
    NotFoundError,
    RegistryError,
    SizeMismatchError,
    TransportError,
)
from ..jsonutil import loads as json_loads
from ..manifest import MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE, Descriptor, Index, Manifest, parse_manifest
from ..reference import Reference
from .egress import CheckedPoolManager, EgressPolicy

log = logging.getLogger("imagevol.registry")

USER_AGENT = "imagevol/0.1"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass
class RegistryOptions:
    """Settings shared by every registry request of one operation."""

    tls_verify: bool | None = None  # None: verify, except plain http allowed on loopback/insecure hosts
    cert_dir: str | None = None
    authfile: str | None = None
    registries_conf: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 20.0
    user_agent: str = USER_AGENT
    insecure_hosts: frozenset[str] = field(default_factory=frozenset)
    # Which registries and addresses may be contacted (--allow-registry; see registry/egress.py).
    # None: no restriction (the CLI without --allow-registry); the CSI plugin always sets one.
    egress: EgressPolicy | None = None
    # Injected for tests and embedding; default looks credentials up in auth files.
    credentials: Callable[[str, str], Any] | None = None


def is_loopback_host(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (with or without a port)."""
    name = host
    if name.startswith("["):
        name = name[1 : name.index("]")]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Parse `WWW-Authenticate: Bearer realm="...",service="...",scope="..."`."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_MEDIA_TYPE = re.compile(r"[\w.+-]{1,64}/[\w.+-]{1,64}")


def _printable(text: str, limit: int) -> str:
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def oci_error_text(body: bytes) -> str | None:
    """`CODE: message` lines from a distribution error document (JSON with an `errors` array), if
    the body is one. Only the codes and messages are quoted (printable, capped); never other fields."""
    try:
        doc = json_loads(body[:65536])
    except (ValueError, UnicodeDecodeError):
        return None
    errs = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errs, list) or not errs:
        return None
    parts = []
    for e in errs[:5]:
        if not isinstance(e, dict):
            continue
        code = e.get("code")
        code = code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else "UNKNOWN"
        message = e.get("message")
        message = _printable(message, 200) if isinstance(message, str) else ""
        parts.append(f"{code}: {message}" if message else code)
    return "; ".join(parts) or None


def error_detail(body: bytes, content_type: str | None = None) -> str:
    """What an error answer said, for an error text: the codes and messages of a registry error
    document; of anything else (an HTML page, a node-local service's answer) only its content type
    and size, never its bytes (they may be a secret the request was forged to fetch)."""
    text = oci_error_text(body)
    if text:
        return text
    if not body:
        return "an empty answer"
    ctype = (content_type or "").split(";", 1)[0].strip().lower()
    kind = ctype if _MEDIA_TYPE.fullmatch(ctype) else "untyped"
    size = f"{len(body)}{'+' if len(body) >= 65536 else ''}"
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} answer of {size} bytes, not a registry error document"


@dataclass
class _Token:
    header: str
    expires_at: float


class Transport:
    """Connection pools, scheme choices and tokens for one process. Thread-safe."""

    def __init__(self, options: RegistryOptions | None = None) -> None:
        self.options = options or RegistryOptions()
        self._pools: dict[tuple[str, bool], urllib3.PoolManager] = {}
        self._schemes: dict[str, str] = {}
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._basic: dict[str, str] = {}
        self._lock = threading.Lock()
        self._cred_cache: dict[tuple[str, str], Any] = {}
        # Endpoints registries.conf gives (mirrors, rewritten locations): operator-set, so neither
        # the allow-list nor the special-address rule applies to them.
        self._trusted: set[str] = set()

    # --- egress policy --------------------------------------------------
    def trust(self, host: str) -> None:
        """Mark ``host[:port]`` as operator-set (a registries.conf endpoint): the egress policy admits it."""
        with self._lock:
            self._trusted.add(host)

    def admit_registry(self, host: str) -> None:
        """Raise EgressRefusedError unless the egress policy admits the registry ``host[:port]``."""
        policy = self.options.egress
        if policy is None or host in self._trusted:
            return
        policy.check_registry(host)

    def _check_address(self, netloc: str, host: str, port: int, address: str) -> None:
        policy = self.options.egress
        if policy is None or netloc in self._trusted:
            return
        policy.check_address(host, port, address)

    # --- TLS and pools -------------------------------------------------
    def _verify_for(self, host: str) -> bool:
        if self.options.tls_verify is False:
            return False
        return host not in self.options.insecure_hosts or self.options.tls_verify is True

    def _ssl_context(self, host: str, verify: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        for ca in self._ca_files(host):
            ctx.load_verify_locations(cafile=str(ca))
        for cert, key in self._client_certs(host):
            ctx.load_cert_chain(str(cert), str(key))
        return ctx

    def _ca_files(self, host: str) -> list[Path]:
        try:
            from .regconf import tls_material
        except ImportError:  # pragma: no cover - regconf ships with the package
            return []
        return list(tls_material(host, certs_dir=self.options.cert_dir).ca_files)

    def _client_certs(self, host: str) -> list[tuple[Path, Path]]:
        try:
            from .regconf import tls_material
        except ImportError:  # pragma: no cover
            return []
        return list(tls_material(host, certs_dir=self.options.cert_dir).client_pairs)

    def pool(self, host: str, scheme: str) -> urllib3.PoolManager:
        verify = self._verify_for(host)
        key = (host, scheme == "https" and verify)
        with self._lock:
            pm = self._pools.get(key)
            if pm is None:
                kw: dict[str, Any] = {
                    "maxsize": 32,
                    "block": False,
                    "retries": False,
                    "timeout": urllib3.Timeout(connect=self.options.connect_timeout, read=self.options.read_timeout),
                }
                if scheme == "https":
                    kw["ssl_context"] = self._ssl_context(host, verify)
                    if not verify:
                        kw["cert_reqs"] = ssl.CERT_NONE
                        kw["assert_hostname"] = False
                if self.options.egress is None:
                    pm = urllib3.PoolManager(**kw)
                else:
                    # Every connection this pool makes checks the address it goes to (registry/egress.py).
                    pm = CheckedPoolManager(lambda h, p, a, netloc=host: self._check_address(netloc, h, p, a), **kw)
                self._pools[key] = pm
            return pm

    def plain_http_allowed(self, host: str) -> bool:
        return is_loopback_host(host) or host in self.options.insecure_hosts or self.options.tls_verify is False

    def scheme(self, host: str) -> str:
        with self._lock:
            s = self._schemes.get(host)
        if s:
            return s
        s = "https"
        if self.plain_http_allowed(host):
            s = self._probe_scheme(host)
        with self._lock:
            self._schemes[host] = s
        return s

    def _probe_scheme(self, host: str) -> str:
        """https if the host speaks TLS, else http (only for hosts where plain http is allowed)."""
        try:
            r = self.pool(host, "https").request(
                "GET",
                f"https://{host}/v2/",
                headers={"User-Agent": self.options.user_agent},
                preload_content=True,
                redirect=False,
            )
            r.release_conn()
            return "https"
        except urllib3.exceptions.SSLError as e:
            text = str(e).lower()
            if "certificate" in text and "wrong version" not in text:
                raise TransportError(
                    f"TLS certificate of {host} is not trusted: {e}",
                    hint="pass --cert-dir DIR with the registry's ca.crt, put it in "
                    f"/etc/containers/certs.d/{host}/, or use --tls-verify=false",
                ) from None
            return "http"
        except urllib3.exceptions.HTTPError:
            return "http"

    # --- credentials and tokens ---------------------------------------
    def credential(self, host: str, repo: str) -> Any:
        key = (host, repo)
        if key in self._cred_cache:
            return self._cred_cache[key]
        if self.options.credentials is not None:
            cred = self.options.credentials(host, repo)
        else:
            from .credentials import lookup_credential

            cred = lookup_credential(host, repo, authfile=self.options.authfile)
        self._cred_cache[key] = cred
        return cred

    def cached_auth(self, host: str, scope: str) -> str | None:
        with self._lock:
            tok = self._tokens.get((host, scope))
            if tok and tok.expires_at > time.time() + 5:
                return tok.header
            if tok:
                del self._tokens[(host, scope)]
            return self._basic.get(host)

    def forget_auth(self, host: str, scope: str) -> None:
        with self._lock:
            self._tokens.pop((host, scope), None)

    def authenticate(self, host: str, repo: str, scope: str, challenge: str) -> str:
        """Answer a 401 challenge; returns the Authorization header value to use."""
        scheme, params = parse_challenge(challenge)
        cred = self.credential(host, repo)
        if scheme == "basic":
            if cred is None:
                raise AuthError(
                    f"registry {host} requires authentication for {repo}",
                    hint="log in: put credentials in an auth file (--authfile, REGISTRY_AUTH_FILE, "
                    "containers auth.json or docker config.json)",
                    status=401,
                )
            value = "Basic " + base64.b64encode(f"{cred.username}:{cred.password}".encode()).decode()
            with self._lock:
                self._basic[host] = value
            return value
        if scheme != "bearer" or "realm" not in params:
            raise AuthError(f"registry {host} sent an unsupported auth challenge: {scheme}", status=401)
        realm = params["realm"]
        q: list[tuple[str, str]] = []
        if params.get("service"):
            q.append(("service", params["service"]))
        q.append(("scope", params.get("scope") or scope))
        url = realm + ("&" if "?" in realm else "?") + urlencode(q)
        headers = {"User-Agent": self.options.user_agent}
        if cred is not None:
            if getattr(cred, "identity_token", None):
                # OAuth2 refresh-token flow (identity tokens from `docker login`).
                return self._oauth_token(host, scope, realm, params, cred)
            headers["Authorization"] = "Basic " + base64.b64encode(f"{cred.username}:{cred.password}".encode()).decode()
        rhost = urlsplit(realm).netloc
        try:
            r = self.pool(rhost, urlsplit(realm).scheme or "https").request("GET", url, headers=headers, redirect=False)
        except urllib3.exceptions.HTTPError as e:
            raise TransportError(f"cannot reach token service {rhost} for {host}: {e}") from None
        if r.status in (401, 403):
            raise AuthError(
                f"token service {rhost} refused the credentials for {host}/{repo} ({r.status})",
                hint="check the username and password in your auth file"
                if cred
                else "this repository needs credentials; log in first",
                status=r.status,
            )
        if r.status != 200:
            raise AuthError(f"token service {rhost} answered {r.status} for {host}/{repo}", status=r.status)
        return self._store_token(host, scope, r.data)

    def _oauth_token(self, host: str, scope: str, realm: str, params: dict[str, str], cred: Any) -> str:
        body = urlencode(
            {
                "grant_type": "refresh_token",
                "refresh_token": cred.identity_token,
                "service": params.get("service", ""),
                "scope": params.get("scope") or scope,
                "client_id": "imagevol",
            }
        )
        rhost = urlsplit(realm).netloc
        r = self.pool(rhost, urlsplit(realm).scheme or "https").request(
            "POST",
            realm,
            body=body,
            headers={"Content-Type": "application/x-www-form-urlencoded", "User-Agent": self.options.user_agent},
            redirect=False,  # as every request here: no hop escapes the egress checks of its own netloc
        )
        if r.status != 200:
            raise AuthError(
                f"token service {rhost} refused the identity token for {host} ({r.status})", status=r.status
            )
        return self._store_token(host, scope, r.data)

    def _store_token(self, host: str, scope: str, data: bytes) -> str:
        try:
            doc = json_loads(data)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token or not isinstance(token, str):
            raise AuthError(f"token service for {host} returned no token")
        expires_in = doc.get("expires_in")
        if not isinstance(expires_in, (int, float)) or expires_in <= 0:
            expires_in = 60
        value = f"Bearer {token}"
        with self._lock:
            self._tokens[(host, scope)] = _Token(value, time.time() + float(expires_in))
        return value


_waits = threading.local()


def interruptible_by(cancel: threading.Event | None) -> None:
    """Retry waits of the registry requests this thread makes end as soon as `cancel` is set
    (ImagevolError "pull cancelled"): a cancelled pull does not sit out a 429's Retry-After."""
    _waits.cancel = cancel


class RegistryEndpoint(NamedTuple):
    """One place a :class:`RegistrySource` pulls from: a host and the repository there.

    ``namespace`` is set for a mirror: the registry host the reference names (``docker.io``,
    ``ghcr.io``), sent to the mirror as ``?ns=`` (see the module docs). None for the registry itself.
    """

    host: str
    repo: str
    namespace: str | None = None


class RegistryClient:
    """Talks the distribution API to one registry host for one repository.

    ``namespace``: for a mirror, the registry the content is for, added to every request's URL as
    ``ns=NAMESPACE`` (containerd's convention; see the module docs)."""

    def __init__(
        self, transport: Transport, host: str, repo: str, actions: str = "pull", namespace: str | None = None
    ) -> None:
        self.t = transport
        self.host = host
        self.repo = repo
        self.namespace = namespace or None
        # `actions` is "pull", or "pull,push" for a client that pushes.
        self.scope = f"repository:{repo}:{actions}"

    def url(self, path: str) -> str:
        self.t.admit_registry(self.host)
        url = f"{self.t.scheme(self.host)}://{self.host}/v2/{self.repo}/{path}"
        if self.namespace is None:
            return url
        return url + ("&" if "?" in path else "?") + urlencode({"ns": self.namespace})

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        ok: tuple[int, ...] = (200,),
        what: str = "",
        body: Any = None,
    ) -> urllib3.BaseHTTPResponse:
        """One API call with auth, retries and safe redirects. Raises on a status not in `ok`.

        `body` (bytes, or a re-iterable of bytes with a Content-Length header, so a retry can send
        it again) is passed to urllib3; pushes list 201/202/204 in `ok`."""
        url = self.url(path)
        attempt = 0
        authed_once = False
        while True:
            hdrs = {"User-Agent": self.t.options.user_agent, **(headers or {})}
            auth = self.t.cached_auth(self.host, self.scope)
            if auth:
                hdrs["Authorization"] = auth
            try:
                r = self._follow(method, url, hdrs, stream, body)
            except (
                urllib3.exceptions.ProtocolError,
                urllib3.exceptions.TimeoutError,
                urllib3.exceptions.NewConnectionError,
                urllib3.exceptions.SSLError,
                urllib3.exceptions.MaxRetryError,
                ConnectionError,
            ) as e:
                if attempt < self.t.options.retries:
                    self._sleep(attempt, None)
                    attempt += 1
                    continue
                raise TransportError(
                    f"{method} {self.host}/{self.repo}/{path} failed: {type(e).__name__}: {e}",
                    hint="check that the registry is reachable; --timeout raises the time limit",
                ) from None
            if r.status == 401 and not authed_once:
                challenge = r.headers.get("WWW-Authenticate", "")
                r.drain_conn()
                r.release_conn()
                self.t.forget_auth(self.host, self.scope)
                if not challenge:
                    raise AuthError(f"registry {self.host} answered 401 without a challenge", status=401)
                self.t.authenticate(self.host, self.repo, self.scope, challenge)
                authed_once = True
                continue
            if r.status in RETRY_STATUSES and attempt < self.t.options.retries:
                delay = _retry_after(r.headers.get("Retry-After"))
                r.drain_conn()
                r.release_conn()
                self._sleep(attempt, delay)
                attempt += 1
                continue
            if r.status in ok:
                return r
            body = r.read(65536) if stream else r.data
            r.release_conn()
            raise self._error(r.status, body, what or f"{method} {path}", r.headers.get("Content-Type"))

    def _sleep(self, attempt: int, retry_after: float | None) -> None:
        o = self.t.options
        delay = retry_after if retry_after is not None else min(o.max_backoff, o.backoff * (2**attempt))
        delay = min(delay, 60.0)
        delay += random.random() * 0.1 if retry_after is None else 0
        cancel = getattr(_waits, "cancel", None)
        if cancel is None:
            time.sleep(delay)
        elif cancel.wait(delay):
            raise ImagevolError("pull cancelled")

    def _follow(
        self, method: str, url: str, headers: dict[str, str], stream: bool, body: Any = None
    ) -> urllib3.BaseHTTPResponse:
        origin = urlsplit(url).netloc
        for _ in range(10):
            parts = urlsplit(url)
            pm = self.t.pool(parts.netloc, parts.scheme)
            r = pm.request(method, url, headers=headers, body=body, preload_content=not stream, redirect=False)
            if r.status not in (301, 302, 303, 307, 308):
                return r
            loc = r.headers.get("Location")
            r.drain_conn()
            r.release_conn()
            if not loc:
                return r
            url = urljoin(url, loc)
            if urlsplit(url).netloc != origin:
                # Never forward registry credentials to another host (blob storage, CDN).
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            if r.status == 303:
                method = "GET"
                body = None
                headers = {k: v for k, v in headers.items() if k.lower() not in ("content-length", "content-range")}
        raise TransportError(f"too many redirects from {origin}")

    def _error(self, status: int, body: bytes, what: str, content_type: str | None = None) -> Exception:
        detail = error_detail(body, content_type)
        where = f"{self.host}/{self.repo}"
        if status in (401, 403):
            return AuthError(
                f"registry {self.host} denied {what} on {self.repo} ({status}): {detail}",
                hint="check the credentials in your auth file and that they may pull this repository",
                status=status,
            )
        if status == 404:
            return NotFoundError(f"{what} not found in {where}: {detail}")
        return RegistryError(
            f"registry {self.host} answered {status} to {what} on {self.repo}: {detail}", status=status
        )

    # --- API --------------------------------------------------------------
    def get_manifest(self, reference: str, *, expected: Digest | None = None) -> tuple[bytes, str, Digest]:
        """GET a manifest by tag or digest: (body, content type, digest). Verified and size-capped."""
        r = self.request(
            "GET",
            f"manifests/{reference}",
            headers={"Accept": ", ".join(mt.ACCEPT_TYPES)},
            stream=True,
            what=f"manifest {reference}",
        )
        try:
            length = r.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > MAX_MANIFEST_SIZE:
                raise ManifestError(
                    f"manifest {reference} in {self.host}/{self.repo} is {length} bytes, over the "
                    f"{MAX_MANIFEST_SIZE} byte limit"
                )
            body = r.read(MAX_MANIFEST_SIZE + 1)
            if len(body) > MAX_MANIFEST_SIZE:
                raise ManifestError(
                    f"manifest {reference} in {self.host}/{self.repo} is over the {MAX_MANIFEST_SIZE} byte limit"
                )
        finally:
            r.release_conn()
        ctype = r.headers.get("Content-Type", "")
        header_digest = r.headers.get("Docker-Content-Digest")
        algo = expected.algorithm if expected else "sha256"
        if header_digest:
            try:
                hd = Digest(header_digest)
                algo = hd.algorithm
            except Exception:
                hd = None
        else:
            hd = None
        got = digest_bytes(body, algo)
        if expected is not None and digest_bytes(body, expected.algorithm) != expected:
            raise DigestMismatchError(
                f"manifest {reference} from {self.host}/{self.repo} does not match its digest "
                f"(got {digest_bytes(body, expected.algorithm)})",
                hint="the registry or a mirror served wrong bytes; nothing was used",
            )
        if hd is not None and hd != got:
            raise DigestMismatchError(
                f"manifest {reference} from {self.host}/{self.repo}: Docker-Content-Digest {hd} does not "
                f"match the body ({got})",
                hint="the registry or a mirror served inconsistent content; nothing was used",
            )
        return body, ctype, expected or digest_bytes(body, "sha256")

    def head_manifest(self, reference: str) -> tuple[str, Digest | None, int | None]:
        r = self.request(
            "HEAD",
            f"manifests/{reference}",
            headers={"Accept": ", ".join(mt.ACCEPT_TYPES)},
            what=f"manifest {reference}",
        )
        d = r.headers.get("Docker-Content-Digest")
        size = r.headers.get("Content-Length")
        return (
            r.headers.get("Content-Type", ""),
            Digest(d) if d else None,
            int(size) if size and size.isdigit() else None,
        )

    def get_blob_bytes(self, digest: Digest, max_size: int, size: int | None = None) -> bytes:
        """A small blob (a config), verified; with `size` (the descriptor's), of exactly that size."""
        r = self.request("GET", f"blobs/{digest}", stream=True, what=f"blob {digest}")
        try:
            if size is not None:
                served = served_size(r)
                if served is not None and served != size:
                    with contextlib.suppress(Exception):
                        r.close()  # unread body: the connection is not reused
                    raise SizeMismatchError.of(f"blob {digest}", f"registry {self.host}/{self.repo}", size, served)
            body = r.read((max_size if size is None else min(size, max_size)) + 1)
        finally:
            r.release_conn()
        if size is not None and len(body) != size:
            served_text = f"{len(body)}" if len(body) < size else f"more than {size}"
            raise SizeMismatchError.of(f"blob {digest}", f"registry {self.host}/{self.repo}", size, served_text)
        if len(body) > max_size:
            raise ManifestError(f"blob {digest} in {self.host}/{self.repo} is over the {max_size} byte limit")
        if digest_bytes(body, digest.algorithm) != digest:
            raise DigestMismatchError(
                f"blob {digest} from {self.host}/{self.repo} does not match its digest",
                hint="the registry or a mirror served wrong bytes; nothing was stored",
            )
        return body

    def open_blob(
        self, digest: Digest, start: int = 0, end: int | None = None, *, size: int | None = None
    ) -> urllib3.BaseHTTPResponse:
        """A streaming response for a blob or a byte range of it ([start, end) ; end None = to the end).

        The caller checks `status`: 206 for a honoured range, 200 when the server sent the whole blob.
        With `size` (the descriptor's), a response whose own length says the blob has another size
        is refused at once (SizeMismatchError): no retry can make it right.
        """
        headers = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
        r = self.request("GET", f"blobs/{digest}", headers=headers, stream=True, ok=(200, 206), what=f"blob {digest}")
        served = served_size(r) if size is not None else None
        if size is not None and served is not None and served != size:
            with contextlib.suppress(Exception):
                r.close()  # unread body: the connection is not reused
            raise SizeMismatchError.of(f"blob {digest}", f"registry {self.host}/{self.repo}", size, served)
        return r

    def confirm(self, digest: Digest, *, manifest: bool = False, sample: tuple[int, bytes] = (0, b"")) -> bool:
        """Whether this repository serves `digest` to these credentials: True if it does, False if
        the registry answers 401, 403 or 404, or serves other bytes.

        A manifest is fetched by digest and verified (at most 4 MiB). A blob is asked for the
        bytes `sample` = (offset, the bytes there): a ranged GET whose answer must equal them, so a
        registry that does not hold the blob cannot confirm it, whatever a HEAD of it would claim.
        Other failures (transport, 5xx after retries) raise.
        """
        try:
            if manifest:
                self.get_manifest(str(digest), expected=digest)
                return True
            offset, want = sample
            if not want:
                raise ValueError("confirm() of a blob needs a sample of its bytes")
            r = self.open_blob(digest, offset, offset + len(want))
            try:
                skip = offset if r.status == 200 else 0  # the server ignored Range: the whole blob
                while skip:
                    chunk = r.read(min(skip, 1 << 20))
                    if not chunk:
                        return False
                    skip -= len(chunk)
                got = r.read(len(want))
            finally:
                r.release_conn()
            return got == want
        except (AuthError, NotFoundError, DigestMismatchError, ManifestError):
            return False
        except RegistryError as e:  # another refusal (416, 400, ...); 429 and 5xx are not answers
            if e.status is not None and 400 <= e.status < 500 and e.status != 429:
                return False
            raise


def served_size(resp: urllib3.BaseHTTPResponse) -> int | None:
    """The size of the whole blob a response says it serves: the total of a 206's Content-Range, the
    Content-Length of a 200 (of an unencoded body); None when the response does not say."""
    if resp.status == 206:
        total = resp.headers.get("Content-Range", "").rpartition("/")[2].strip()
    elif resp.headers.get("Content-Encoding", "identity").strip().lower() == "identity":
        total = resp.headers.get("Content-Length", "").strip()
    else:
        return None
    return int(total) if total.isdigit() else None


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
