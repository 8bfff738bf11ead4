"""A registry that lies: a minimal distribution API server serving whatever bytes it is told to.

The real registry (``tests/support/registry.py``) refuses what a hostile registry or a
compromised mirror would serve: manifests over 4 MiB, indexes naming absent children, JSON its
parser rejects, bytes that do not hash to their digest. ``RogueRegistry`` serves exactly that,
on a free ``127.0.0.1`` port, plain HTTP, no auth::

    with RogueRegistry() as rogue:
        rogue.manifest("evil/cycle", "t", index_bytes, OCI_INDEX)
        rogue.manifest("evil/cycle", child_digest, index_bytes, OCI_INDEX)  # bytes of ANOTHER digest
        rogue.blob("evil/cycle", digest, data)
        rogue.stream("evil/endless", "t", OCI_MANIFEST)  # a body that never ends
        ref = f"{rogue.host}/evil/cycle:t"

``sent_for(fragment)`` counts the body bytes handed out for paths containing ``fragment``, so a
test can prove a client stopped reading; every request is logged in ``requests``. Endless bodies
are capped at ``STREAM_CAP`` bytes and stop when the client goes away. Nothing here uses
imagevol's code.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.blobs import sha256_digest

STREAM_CAP = 256 << 20
STREAM_SECONDS = 60.0
CHUNK = 64 << 10


@dataclass
class Answer:
    """What one path serves. ``body`` None with ``endless`` set: ``endless`` bytes repeated up to
    STREAM_CAP, with no Content-Length (a chunk-less, close-delimited body)."""

    body: bytes | None
    content_type: str = "application/octet-stream"
    digest_header: str | None = None
    content_length: int | None = None  # None: the real length (or none for endless bodies)
    endless: bytes = b""
    status: int = 200
    close_delimited: bool = False  # no Content-Length: the body ends where the connection closes


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, rogue: RogueRegistry) -> None:
        self.rogue = rogue
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.server.rogue._serve(self)

    do_HEAD = do_GET


class RogueRegistry:
    """See the module docstring."""

    def __init__(self) -> None:
        self._answers: dict[str, Answer] = {}
        self._mu = threading.Lock()
        self._sent: dict[str, int] = defaultdict(int)
        self.requests: list[tuple[str, str]] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- lifecycle

    def start(self) -> RogueRegistry:
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> RogueRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        assert self._server is not None, "not started"
        return f"127.0.0.1:{self._server.server_address[1]}"

    # ---- content

    def manifest(
        self,
        repo: str,
        ref: str,
        body: bytes,
        media_type: str,
        *,
        digest_header: str | bool | None = True,
        content_length: int | None = None,
    ) -> str:
        """Serve ``body`` at ``/v2/REPO/manifests/REF`` (REF a tag or ANY digest: nothing checks
        that the bytes hash to it). ``digest_header`` True: the body's real digest as
        Docker-Content-Digest; a string: that string; None/False: no header. Returns the body's
        real digest."""
        real = sha256_digest(body)
        header = real if digest_header is True else (digest_header or None)
        with self._mu:
            self._answers[f"/v2/{repo}/manifests/{ref}"] = Answer(body, media_type, header, content_length)
        return real

    def blob(self, repo: str, digest: str, data: bytes, *, close_delimited: bool = False) -> None:
        """Serve ``data`` as blob ``digest``; ``close_delimited``: without a Content-Length, the body
        ending when the connection closes (cleanly, after the last byte)."""
        with self._mu:
            self._answers[f"/v2/{repo}/blobs/{digest}"] = Answer(
                data, "application/octet-stream", digest, close_delimited=close_delimited
            )

    def stream(self, repo: str, ref: str, media_type: str, pattern: bytes = b" ") -> None:
        """A manifest body that never ends (``pattern`` repeated, no Content-Length)."""
        with self._mu:
            self._answers[f"/v2/{repo}/manifests/{ref}"] = Answer(None, media_type, None, None, pattern)

    def sent_for(self, fragment: str) -> int:
        with self._mu:
            return sum(n for p, n in self._sent.items() if fragment in p)

    # ---- serving

    def _serve(self, h: _Handler) -> None:
        path = h.path.split("?", 1)[0]
        with self._mu:
            self.requests.append((h.command, path))
            ans = self._answers.get(path)
        if path == "/v2/" or path == "/v2":
            ans = Answer(b"{}", "application/json")
        if ans is None:
            body = b'{"errors":[{"code":"NOT_FOUND","message":"rogue registry has nothing here"}]}'
            ans = Answer(body, "application/json", status=404)
        try:
            h.send_response(ans.status)
            h.send_header("Content-Type", ans.content_type)
            if ans.digest_header:
                h.send_header("Docker-Content-Digest", ans.digest_header)
            if ans.body is not None and not ans.close_delimited:
                h.send_header(
                    "Content-Length", str(ans.content_length if ans.content_length is not None else len(ans.body))
                )
            else:
                h.send_header("Connection", "close")
                h.close_connection = True
            h.end_headers()
            if h.command == "HEAD":
                return
            if ans.body is not None:
                self._write(h, path, ans.body)
                return
            chunk = (ans.endless * (CHUNK // max(1, len(ans.endless)) + 1))[:CHUNK]
            deadline = time.monotonic() + STREAM_SECONDS
            sent = 0
            while sent < STREAM_CAP and time.monotonic() < deadline and not self._stop.is_set():
                if not self._write(h, path, chunk):
                    break
                sent += len(chunk)
        except OSError:
            h.close_connection = True

    def _write(self, h: _Handler, path: str, data: bytes) -> bool:
        try:
            h.wfile.write(data)
            h.wfile.flush()
        except OSError:
            h.close_connection = True
            return False
        with self._mu:
            self._sent[path] += len(data)
        return True


__all__ = ["Answer", "RogueRegistry", "sha256_digest"]
