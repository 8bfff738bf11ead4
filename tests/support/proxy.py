"""A fault-injecting reverse proxy in front of a test registry (loopback only).

``Proxy(upstream_url).start()`` listens on ``127.0.0.1`` (a free port) and forwards every request
to the registry, streaming bodies in chunks (nothing is buffered whole, so a 1 GiB blob passes
through in constant memory). It counts the response body bytes it hands to clients, per request
path and in total (``bytes_for(digest)``, ``bytes_total``), and logs every request
(``requests``: ``Req(method, path, range, status)``, ``path`` as requested, query string included;
``req.bare_path`` and ``req.query`` split it; ``auth_log``: ``(path, had Authorization)``).

Faults are set at runtime with ``proxy.fault = Fault(...)`` (``None`` for none), each optionally
limited to requests whose path contains ``match`` (a digest or a path fragment), to one method,
and to the first ``times`` requests it applies to:

* ``wrong_bytes``: flip one byte (``flip_offset`` of each response body);
* ``truncate_after=N``: close the connection (FIN) after N body bytes;
* ``reset_after=N``: abort the connection (RST) after N body bytes;
* ``status=500|429|503``: answer that status without asking upstream (429/503 carry
  ``Retry-After: retry_after``);
* ``ignore_range``: drop the Range header upstream, so a ranged GET gets 200 and the whole body;
* ``wrong_content_type``: serve this Content-Type (``True``: ``text/html``);
* ``wrong_docker_content_digest``: serve a Docker-Content-Digest that names other bytes;
* ``stall_seconds``: wait (at most ``MAX_STALL``) after the headers, before the body;
* ``redirect_to_other_host``: answer a blob GET with 302 to a side server on another loopback
  address (``127.0.0.2``), like a registry redirecting to blob storage with a presigned URL. The
  side server records whether an ``Authorization`` header arrived (``proxy.side.requests``) and
  serves the blob from upstream with the credentials of the original request.

``proxy.rate_limit`` (bytes per second, shared by all connections; ``None``: unlimited) paces
body bytes, so what the proxy counts as sent is what the client has received, give or take a
chunk per connection (no megabytes parked in socket buffers). ``proxy.conn_rate_limit`` paces
each connection on its own (a link where one connection is slow, many are not).
``proxy.upload_rate_limit`` paces request bodies (pushes) on their way upstream;
``proxy.uploaded_for(fragment)`` counts the request body bytes relayed for paths containing it.

Every loop is bounded in count and time; only ``127.0.0.0/8`` addresses are used.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import ipaddress
import secrets
import socket
import ssl
import struct
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple
from urllib.parse import parse_qs, urlsplit

CHUNK = 1 << 20
MAX_STALL = 30.0
MAX_REQUEST_SECONDS = 600.0
IDLE_TIMEOUT = 30.0
UPSTREAM_TIMEOUT = 60.0
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
WRONG_DIGEST = "sha256:" + hashlib.sha256(b"not the bytes you asked for").hexdigest()


def _loopback(host: str) -> str:
    if host == "localhost":
        host = "127.0.0.1"
    if ipaddress.ip_address(host) not in ipaddress.ip_network("127.0.0.0/8"):
        raise ValueError(f"{host} is not a 127.0.0.0/8 address: the proxy only talks to loopback")
    return host


class Req(NamedTuple):
    method: str
    path: str  # as requested: the query string included
    range: str | None
    status: int

    @property
    def bare_path(self) -> str:
        """The path without its query string."""
        return urlsplit(self.path).path

    @property
    def query(self) -> dict[str, list[str]]:
        """The query string's parameters (``{"ns": ["docker.io"]}``); empty without one."""
        return parse_qs(urlsplit(self.path).query, keep_blank_values=True)


@dataclass
class Fault:
    """What to break; see the module docstring. ``times=None``: every matching request."""

    match: str | None = None
    method: str | None = None
    times: int | None = None
    wrong_bytes: bool = False
    flip_offset: int = 0
    truncate_after: int | None = None
    reset_after: int | None = None
    status: int | None = None
    retry_after: float | None = 1
    ignore_range: bool = False
    wrong_content_type: str | bool | None = None
    wrong_docker_content_digest: bool = False
    stall_seconds: float = 0.0
    redirect_to_other_host: bool = False

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        return self.match is None or self.match in path


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, addr: tuple[str, int], handler: type, proxy: Proxy) -> None:
        self.proxy = proxy
        self.open_sockets: set[socket.socket] = set()
        self.sockets_mu = threading.Lock()
        super().__init__(addr, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.sockets_mu:
            self.server.open_sockets.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.server.sockets_mu:
            self.server.open_sockets.discard(self.connection)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.server.proxy._handle(self)

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET


class _SideHandler(_Handler):
    def do_GET(self) -> None:
        self.server.proxy._handle_side(self)

    do_HEAD = do_GET


class SideServer:
    """The "other host" redirects go to; ``requests`` holds ``(path, Authorization or None)``."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.server: _Server | None = None
        self.url = ""

    @property
    def saw_authorization(self) -> bool:
        return any(auth is not None for _, auth in self.requests)


class Proxy:
    """A reverse proxy to ``upstream`` (``http[s]://127.x.y.z:port``); see the module docstring."""

    def __init__(
        self,
        upstream: str,
        *,
        host: str = "127.0.0.1",
        side_host: str = "127.0.0.2",
        upstream_ca: str | None = None,
        chunk: int = CHUNK,
    ) -> None:
        u = urlsplit(upstream)
        if u.scheme not in ("http", "https") or not u.hostname or not u.port:
            raise ValueError(f"upstream must be http[s]://HOST:PORT, not {upstream!r}")
        self.upstream_scheme = u.scheme
        self.upstream_host = _loopback(u.hostname)
        self.upstream_port = u.port
        self.upstream_ca = upstream_ca
        self.listen_host = _loopback(host)
        self.side_host = _loopback(side_host)
        self.chunk = max(1, chunk)
        self._mu = threading.Lock()
        self._fault: Fault | None = None
        self._fault_left: int | None = None
        self.fault_hits = 0
        self.requests: list[Req] = []
        self.auth_log: list[tuple[str, bool]] = []
        self._bytes: dict[str, int] = defaultdict(int)
        self._total = 0
        self._presigned: dict[str, tuple[str, dict[str, str]]] = {}
        self._stop = threading.Event()
        self.rate_limit: float | None = None
        self.conn_rate_limit: float | None = None
        self.upload_rate_limit: float | None = None
        self._uploaded: dict[str, int] = defaultdict(int)
        self._upload_next = 0.0
        self._pace_next = 0.0
        self.side = SideServer()
        self.server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self.port = 0

    # ---- lifecycle

    def start(self) -> Proxy:
        self.server = _Server((self.listen_host, 0), _Handler, self)
        self.port = self.server.server_address[1]
        side = _Server((self.side_host, 0), _SideHandler, self)
        self.side.server = side
        self.side.url = f"http://{self.side_host}:{side.server_address[1]}"
        for srv in (self.server, side):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for srv in (self.server, self.side.server):
            if srv is None:
                continue
            srv.shutdown()
            srv.server_close()
            with srv.sockets_mu:
                socks = list(srv.open_sockets)
            for s in socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=5)
        self.server = self.side.server = None

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the registry host to put in references."""
        return f"{self.listen_host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # ---- state

    @property
    def fault(self) -> Fault | None:
        return self._fault

    @fault.setter
    def fault(self, value: Fault | None) -> None:
        with self._mu:
            self._fault = value
            self._fault_left = value.times if value is not None else None
            self.fault_hits = 0

    def reset(self) -> None:
        """No fault, empty logs and counters."""
        self.fault = None
        self.rate_limit = None
        self.conn_rate_limit = None
        self.upload_rate_limit = None
        with self._mu:
            self._uploaded.clear()
            self.requests.clear()
            self.auth_log.clear()
            self._bytes.clear()
            self._total = 0
            self.side.requests.clear()

    def bytes_for(self, fragment: str) -> int:
        """Body bytes sent for every path containing ``fragment`` (a digest, say), side server included."""
        with self._mu:
            return sum(n for p, n in self._bytes.items() if fragment in p)

    def uploaded_for(self, fragment: str) -> int:
        """Request body bytes relayed upstream for every path containing ``fragment``."""
        with self._mu:
            return sum(n for p, n in self._uploaded.items() if fragment in p)

    @property
    def bytes_total(self) -> int:
        with self._mu:
            return self._total

    @property
    def bytes_by_path(self) -> dict[str, int]:
        with self._mu:
            return dict(self._bytes)

    def requests_for(self, fragment: str) -> list[Req]:
        with self._mu:
            return [r for r in self.requests if fragment in r.path]

    def _count(self, path: str, n: int) -> None:
        with self._mu:
            self._bytes[path] += n
            self._total += n

    def _log(self, method: str, path: str, rng: str | None, status: int) -> None:
        with self._mu:
            self.requests.append(Req(method, path, rng, status))

    def _active(self, method: str, path: str) -> Fault | None:
        with self._mu:
            f = self._fault
            if f is None or not f.matches(method, path):
                return None
            if self._fault_left is not None and self._fault_left <= 0:
                return None
            return f

    def _consume(self, f: Fault) -> bool:
        """Take one use of ``f``; False when it is used up (or replaced) meanwhile."""
        with self._mu:
            if self._fault is not f:
                return False
            if self._fault_left is not None:
                if self._fault_left <= 0:
                    return False
                self._fault_left -= 1
            self.fault_hits += 1
            return True

    # ---- upstream

    def _connect(self) -> http.client.HTTPConnection:
        if self.upstream_scheme == "https":
            ctx = ssl.create_default_context(cafile=self.upstream_ca)
            return http.client.HTTPSConnection(
                self.upstream_host, self.upstream_port, timeout=UPSTREAM_TIMEOUT, context=ctx
            )
        return http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=UPSTREAM_TIMEOUT)

    def _upstream(
        self, method: str, path: str, headers: list[tuple[str, str]], body_len: int, rfile
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = self._connect()
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                conn.putheader(k, v)
            conn.endheaders()
            left = body_len
            while left > 0:
                data = rfile.read(min(self.chunk, left))
                if not data:
                    break
                self._pace_upload(len(data))
                conn.send(data)
                left -= len(data)
                with self._mu:
                    self._uploaded[path] += len(data)
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    # ---- the proxy side

    def _handle(self, h: _Handler) -> None:
        method, path = h.command, h.path
        rng = h.headers.get("Range")
        with self._mu:
            self.auth_log.append((path, h.headers.get("Authorization") is not None))
        body_len = int(h.headers.get("Content-Length") or 0)
        f = self._active(method, path)
        if f is not None and f.status is not None and self._consume(f):
            if body_len:
                h.rfile.read(body_len)
            self._send_error(h, f)
            self._log(method, path, rng, f.status)
            return
        headers = [(k, v) for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP]
        if f is not None and f.ignore_range and rng is not None and self._consume(f):
            headers = [(k, v) for k, v in headers if k.lower() != "range"]
        try:
            conn, resp = self._upstream(method, path, headers, body_len, h.rfile)
        except OSError as e:
            self._send_simple(h, 502, f"upstream failed: {e}".encode())
            self._log(method, path, rng, 502)
            return
        try:
            ok = resp.status in (200, 206)
            if (
                f is not None
                and f.redirect_to_other_host
                and method == "GET"
                and "/blobs/sha256:" in path
                and ok
                and self._consume(f)
            ):
                key = secrets.token_hex(8)
                digest = urlsplit(path).path.rsplit("/", 1)[-1]
                with self._mu:
                    self._presigned[key] = (path, {k: v for k, v in headers if k.lower() == "authorization"})
                location = f"{self.side.url}/presigned/{key}/{digest}"
                h.send_response(302)
                h.send_header("Location", location)
                h.send_header("Content-Length", "0")
                h.end_headers()
                self._log(method, path, rng, 302)
                return
            self._relay(h, resp, method, path, f if ok else None)
            self._log(method, path, rng, resp.status)
        finally:
            conn.close()

    def _handle_side(self, h: _Handler) -> None:
        path = h.path
        auth = h.headers.get("Authorization")
        with self._mu:
            self.side.requests.append((path, auth))
        parts = path.split("/")
        entry = None
        if len(parts) == 4 and parts[1] == "presigned":
            with self._mu:
                entry = self._presigned.get(parts[2])
        if entry is None:
            self._send_simple(h, 404, b"no such object")
            return
        upstream_path, auth_headers = entry
        headers = [("Host", f"{self.upstream_host}:{self.upstream_port}"), *auth_headers.items()]
        if h.headers.get("Range"):
            headers.append(("Range", h.headers["Range"]))
        try:
            conn, resp = self._upstream(h.command, upstream_path, headers, 0, None)
        except OSError as e:
            self._send_simple(h, 502, f"upstream failed: {e}".encode())
            return
        try:
            self._relay(h, resp, h.command, path, None, keep=("content-type", "content-length", "content-range"))
        finally:
            conn.close()

    def _send_simple(self, h: _Handler, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
        try:
            h.send_response(status)
            for k, v in (extra or {}).items():
                h.send_header(k, v)
            h.send_header("Content-Type", "application/json" if body.startswith(b"{") else "text/plain")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(body)
        except OSError:
            h.close_connection = True

    def _send_error(self, h: _Handler, f: Fault) -> None:
        code = {429: "TOOMANYREQUESTS", 401: "UNAUTHORIZED", 404: "NOT_FOUND"}.get(f.status or 0, "UNAVAILABLE")
        body = b'{"errors":[{"code":"%s","message":"injected by the test proxy"}]}' % code.encode()
        extra = {}
        if f.status in (429, 503) and f.retry_after is not None:
            extra["Retry-After"] = f"{f.retry_after:g}"
        self._send_simple(h, f.status or 500, body, extra)

    def _relay(
        self,
        h: _Handler,
        resp: http.client.HTTPResponse,
        method: str,
        path: str,
        f: Fault | None,
        keep: tuple[str, ...] | None = None,
    ) -> None:
        """Send upstream's answer to the client, applying ``f``'s body and header faults."""
        headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
        if keep is not None:
            headers = [(k, v) for k, v in headers if k.lower() in keep]
        if f is not None and f.wrong_content_type and self._consume(f):
            ctype = "text/html" if f.wrong_content_type is True else str(f.wrong_content_type)
            headers = [(k, v) for k, v in headers if k.lower() != "content-type"] + [("Content-Type", ctype)]
        if f is not None and f.wrong_docker_content_digest and self._consume(f):
            headers = [(k, v) for k, v in headers if k.lower() != "docker-content-digest"]
            headers.append(("Docker-Content-Digest", WRONG_DIGEST))
        length_hdr = resp.getheader("Content-Length")
        has_body = method != "HEAD" and resp.status not in (204, 304) and not (100 <= resp.status < 200)
        h.send_response(resp.status, resp.reason)
        for k, v in headers:
            h.send_header(k, v)
        if has_body and length_hdr is None:
            h.send_header("Connection", "close")  # close-delimited body
            h.close_connection = True
        h.end_headers()
        if not has_body:
            return
        flip_at = cut_at = None
        reset = False
        body_fault = f is not None and (
            f.wrong_bytes or f.truncate_after is not None or f.reset_after is not None or f.stall_seconds > 0
        )
        if body_fault and f is not None and self._consume(f):
            if f.stall_seconds > 0:
                self._stop.wait(min(f.stall_seconds, MAX_STALL))
            if f.wrong_bytes:
                flip_at = max(0, f.flip_offset)
            if f.reset_after is not None:
                cut_at, reset = max(0, f.reset_after), True
            elif f.truncate_after is not None:
                cut_at = max(0, f.truncate_after)
        expected = int(length_hdr) if length_hdr and length_hdr.isdigit() else None
        deadline = time.monotonic() + MAX_REQUEST_SECONDS
        sent = 0
        while time.monotonic() < deadline and not self._stop.is_set():
            want = self.chunk if expected is None else min(self.chunk, expected - sent)
            if want <= 0:
                break
            data = resp.read(want)
            if not data:
                break
            if flip_at is not None and sent <= flip_at < sent + len(data):
                buf = bytearray(data)
                buf[flip_at - sent] ^= 0xFF
                data = bytes(buf)
            if cut_at is not None and sent + len(data) >= cut_at:
                data = data[: cut_at - sent]
                if self._write(h, path, data):
                    sent += len(data)
                self._cut(h, reset)
                return
            if not self._write(h, path, data):
                return
            sent += len(data)
        if expected is not None and sent != expected:
            h.close_connection = True  # upstream fell short: the client must see a cut connection
            self._cut(h, False)

    def _pace(self, n: int) -> None:
        rate = self.rate_limit
        if not rate or rate <= 0:
            return
        with self._mu:
            now = time.monotonic()
            start = max(self._pace_next, now)
            self._pace_next = start + n / rate
        if start > now:
            self._stop.wait(min(start - now, MAX_STALL))

    def _pace_upload(self, n: int) -> None:
        rate = self.upload_rate_limit
        if not rate or rate <= 0:
            return
        with self._mu:
            now = time.monotonic()
            start = max(self._upload_next, now)
            self._upload_next = start + n / rate
        if start > now:
            self._stop.wait(min(start - now, MAX_STALL))

    def _pace_conn(self, h: _Handler, n: int) -> None:
        rate = self.conn_rate_limit
        if not rate or rate <= 0:
            return
        now = time.monotonic()
        start = max(getattr(h, "pace_next", 0.0), now)
        h.pace_next = start + n / rate  # type: ignore[attr-defined]
        if start > now:
            self._stop.wait(min(start - now, MAX_STALL))

    def _write(self, h: _Handler, path: str, data: bytes) -> bool:
        if not data:
            return True
        self._pace(len(data))
        self._pace_conn(h, len(data))
        try:
            h.wfile.write(data)
        except OSError:
            h.close_connection = True
            return False
        self._count(path, len(data))
        return True

    def _cut(self, h: _Handler, reset: bool) -> None:
        h.close_connection = True
        sock = h.connection
        with contextlib.suppress(OSError):
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            else:
                sock.shutdown(socket.SHUT_RDWR)


__all__ = ["WRONG_DIGEST", "Fault", "Proxy", "Req", "SideServer"]
