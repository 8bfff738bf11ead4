"""A small Docker-registry token issuer for the tests (the "token" auth of distribution 2.8).

``GET /token?service=S&scope=repository:NAME:pull,push`` with basic credentials returns
``{"token", "access_token", "expires_in", "issued_at"}``; the JWT is signed RS256 (RSA key) or
ES256 (EC P-256 key) and carries the signing certificate in ``x5c`` (distribution checks that
chain against its ``rootcertbundle``) plus ``kid`` = the libtrust key ID of the public key.
``POST /token`` takes the OAuth2 form (``grant_type=password`` or ``refresh_token``).

Unauthenticated requests get a token with an empty ``access`` list (so the registry answers
401 insufficient_scope); wrong credentials get 401 from here. ``expires_in`` is mutable;
``claim_lifetime`` (when not None) overrides the JWT's ``exp - iat`` alone, e.g. -120 to mint
tokens that the registry already rejects (it allows 60 s of leeway). ``issued`` counts tokens,
``requests`` records each request.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

GrantFn = Callable[[str | None, str, str, list[str]], list[str]]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def libtrust_key_id(public_key) -> str:
    """docker/libtrust's key ID: base32 of the first 240 bits of SHA-256(DER SPKI), 4-char
    groups joined by ':'."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    enc = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(enc[i : i + 4] for i in range(0, len(enc), 4))


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """``type:name:actions`` -> (type, name, actions). The name may itself hold colons
    (``repository:127.0.0.1:5000/foo:pull``): type is up to the first colon, actions after the
    last."""
    if scope.count(":") < 2:
        return None
    typ, rest = scope.split(":", 1)
    name, actions = rest.rsplit(":", 1)
    return typ, name, [a for a in actions.split(",") if a]


def decode_jwt(token: str) -> tuple[dict, dict]:
    """(header, claims) of a compact JWT, unverified: for assertions in tests."""
    h, c, _ = token.split(".")
    return json.loads(b64url_decode(h)), json.loads(b64url_decode(c))


def allow_all(user: str | None, typ: str, name: str, actions: list[str]) -> list[str]:
    """Default policy: authenticated users get what they ask for, anonymous gets nothing."""
    return list(actions) if user is not None else []


class TokenServer:
    """Token issuer on ``127.0.0.1`` (a free port), served by a thread."""

    def __init__(
        self,
        *,
        users: dict[str, str],
        service: str,
        issuer: str,
        signing_key,
        signing_cert: x509.Certificate,
        chain: tuple[x509.Certificate, ...] = (),
        expires_in: int = 300,
        grant: GrantFn = allow_all,
    ) -> None:
        self.users = dict(users)
        self.service = service
        self.issuer = issuer
        self.signing_key = signing_key
        self.signing_cert = signing_cert
        self.chain = tuple(chain)
        self.expires_in = expires_in
        self.claim_lifetime: int | None = None
        self.grant = grant
        self.issued = 0
        self.requests: list[dict] = []
        self._refresh: dict[str, str] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # ---- lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def start(self) -> TokenServer:
        server = self

        class Handler(_Handler):
            token_server = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"tokenserver:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def reset(self) -> None:
        """Back to defaults for the next test: counters, log, lifetime overrides."""
        with self._lock:
            self.issued = 0
            self.requests.clear()
            self.claim_lifetime = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- tokens

    def _alg(self) -> str:
        if isinstance(self.signing_key, rsa.RSAPrivateKey):
            return "RS256"
        if isinstance(self.signing_key, ec.EllipticCurvePrivateKey):
            return "ES256"
        raise TypeError(f"unsupported signing key {type(self.signing_key).__name__}")

    def _sign(self, data: bytes) -> bytes:
        if isinstance(self.signing_key, rsa.RSAPrivateKey):
            return self.signing_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        der = self.signing_key.sign(data, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def issue(
        self,
        subject: str | None,
        access: list[dict],
        *,
        lifetime: int | None = None,
        audience: str | None = None,
    ) -> str:
        """Mint a JWT. ``access`` is a list of ``{"type", "name", "actions"}``."""
        now = int(time.time())
        if lifetime is None:
            lifetime = self.claim_lifetime if self.claim_lifetime is not None else self.expires_in
        header = {
            "typ": "JWT",
            "alg": self._alg(),
            "kid": libtrust_key_id(self.signing_key.public_key()),
            "x5c": [
                base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                for c in (self.signing_cert, *self.chain)
            ],
        }
        claims = {
            "iss": self.issuer,
            "sub": subject or "",
            "aud": audience or self.service,
            "exp": now + lifetime,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(12),
            "access": access,
        }
        signing_input = (
            b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        sig = self._sign(signing_input.encode())
        with self._lock:
            self.issued += 1
        return signing_input + "." + b64url(sig)

    def token_response(self, user: str | None, scopes: list[str], *, offline: bool = False) -> dict:
        access: list[dict] = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            typ, name, actions = parsed
            granted = self.grant(user, typ, name, actions)
            if granted:
                access.append({"type": typ, "name": name, "actions": granted})
        token = self.issue(user, access)
        body = {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if offline and user is not None:
            refresh = secrets.token_urlsafe(24)
            with self._lock:
                self._refresh[refresh] = user
            body["refresh_token"] = refresh
        return body


class _Handler(BaseHTTPRequestHandler):
    token_server: TokenServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _basic_user(self) -> tuple[bool, str | None]:
        """(credentials ok, user); no Authorization header -> (True, None)."""
        header = self.headers.get("Authorization")
        if not header:
            return True, None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except Exception:
            return False, None
        return self._check(user, password)

    def _check(self, user: str, password: str) -> tuple[bool, str | None]:
        ts = self.token_server
        if user in ts.users and secrets.compare_digest(ts.users[user], password):
            return True, user
        return False, user

    def _finish(self, ok: bool, user: str | None, service: str | None, scopes: list[str], offline: bool) -> None:
        ts = self.token_server
        entry = {
            "method": "GET",
            "user": user,
            "ok": ok,
            "service": service,
            "scopes": scopes,
            "query": sorted(parse_qs(urlsplit(self.path).query, keep_blank_values=True)),  # parameter names
        }
        with ts._lock:
            ts.requests.append(entry)
        if not ok:
            self._reply(
                401,
                {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                {"WWW-Authenticate": 'Basic realm="imagevol-test-token"'},
            )
            return
        if service is not None and service != ts.service:
            self._reply(400, {"errors": [{"code": "DENIED", "message": f"unknown service {service!r}"}]})
            return
        self._reply(200, ts.token_response(user, scopes, offline=offline))

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path != "/token":
            self._reply(404, {"errors": [{"code": "NOT_FOUND"}]})
            return
        q = parse_qs(parts.query)
        scopes = [s for v in q.get("scope", []) for s in v.split(" ") if s]
        ok, user = self._basic_user()
        offline = (q.get("offline_token") or [""])[0].lower() == "true"
        self._finish(ok, user, (q.get("service") or [None])[0], scopes, offline)

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        if parts.path != "/token":
            self._reply(404, {"errors": [{"code": "NOT_FOUND"}]})
            return
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())

        def field(name: str) -> str | None:
            return (form.get(name) or [None])[0]

        scopes = [s for v in form.get("scope", []) for s in v.split(" ") if s]
        grant_type = field("grant_type")
        if grant_type == "password":
            ok, user = self._check(field("username") or "", field("password") or "")
        elif grant_type == "refresh_token":
            with self.token_server._lock:
                user = self.token_server._refresh.get(field("refresh_token") or "")
            ok = user is not None
        else:
            self._reply(400, {"error": "unsupported_grant_type"})
            return
        ts = self.token_server
        with ts._lock:
            ts.requests.append({"method": "POST", "user": user, "ok": ok, "grant_type": grant_type})
        if not ok:
            self._reply(401, {"error": "invalid_grant"})
            return
        body = ts.token_response(user, scopes, offline=grant_type == "password")
        if grant_type == "refresh_token":
            body["refresh_token"] = field("refresh_token")
        self._reply(200, body)
