"""The connection layer under every registry request: connection pools, TLS, scheme choice, tokens.

`Transport` holds, for one process, the urllib3 pools (one per host and TLS choice, each checking
the address it connects to against the egress policy), the https-or-http choice per host (plain
http only for loopback or insecure hosts), the TLS material of certs.d, credentials and the
bearer/basic tokens that answer a 401 challenge. `RegistryOptions` are the settings it and the
API client share. The distribution API itself is in registry/client.py.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import urllib3

from ..errors import AuthError, TransportError
from ..jsonutil import loads as json_loads
from .egress import CheckedPoolManager, EgressPolicy

USER_AGENT = "imagevol/0.1"


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
