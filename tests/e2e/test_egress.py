"""Server-side request forgery: what imagevol may contact (--allow-registry, registry/egress.py).

A pod names the registry of its volume, and the CSI plugin makes the requests: a reference to
``127.0.0.1:PORT/x:v1``, a registry whose blob redirect or token realm points at a node-local
service or a cloud metadata endpoint, would make the plugin fetch what only the node can reach,
and the error text would carry the answer into the pod's events. Checked here, with a "secret"
loopback service that records every request it gets:

* the CSI plugin refuses a registry outside its allow-list before any request (PERMISSION_DENIED,
  the allow-list named), and refuses loopback by address when the name is admitted (``*:*``);
  without any --allow-registry it refuses every pull;
* the CLI with --allow-registry: a name outside the list, an admitted name that resolves to
  loopback (``localhost:*``), 0.0.0.0, a blob redirect of an admitted registry to loopback, an
  IPv4-mapped loopback address, a name resolving to loopback, or 169.254.169.254, a token realm on
  loopback or link-local: all refused (exit 4), the secret service saw nothing;
* the host's own addresses (read from its interfaces at connect time) and the CSI plugin's
  --node-address are refused like loopback;
* an entry that names the address itself admits it; mirrors of registries.conf are admitted;
* an error answer that is not a registry error document (HTML, other JSON) is described by status
  and content type, never quoted, in the CLI and in the pod's event; a registry error document's
  code and message are quoted, its other fields not.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest

from tests.e2e.test_csi import Plugin, publish_request, rpc_error
from tests.support import oci
from tests.support.clirun import Imagevol
from tests.support.need import unavailable
from tests.support.proxy import Fault, Proxy
from tests.support.registry import Registry

pytestmark = pytest.mark.e2e

EXIT_REFUSED = 4
Answer = tuple[int, dict[str, str], bytes]


class Spy:
    """A loopback HTTP server answering ``answer(method, path)`` and recording every request."""

    def __init__(self, answer: Callable[[str, str], Answer], address: str = "127.0.0.1") -> None:
        spy = self
        self.answer = answer
        self.requests: list[tuple[str, str]] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _reply(self) -> None:
                spy.requests.append((self.command, self.path))
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                status, headers, body = spy.answer(self.command, self.path)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = do_PUT = _reply

        self.server = ThreadingHTTPServer((address, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.host = f"{address}:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def secret() -> str:
    return "node-local-secret-" + secrets.token_hex(8)


@pytest.fixture
def spy(secret: str) -> Iterator[Spy]:
    """The node-local service a forged request would reach: answers everything with the secret."""
    s = Spy(lambda method, path: (200, {"Content-Type": "text/plain"}, f"{secret}\n".encode()))
    yield s
    s.close()


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Imagevol]:
    c = Imagevol(tmp_path / "store", tmp_path / "home")
    yield c
    c.cleanup()


def _artifact() -> tuple[bytes, str]:
    layer = oci.descriptor(oci.OCI_LAYER, b"weights", annotations={"org.opencontainers.image.title": "w.bin"})
    return oci.make_artifact_manifest("application/vnd.example.model.v1", [layer])


def _fake_registry(blob_answer: Callable[[str, str], Answer] | None = None, challenge: str | None = None) -> Spy:
    """A registry serving one artifact's manifest (`models/m:v1`); its blobs answer `blob_answer`;
    with `challenge`, every API request answers 401 with that WWW-Authenticate."""
    body, digest = _artifact()

    def answer(method: str, path: str) -> Answer:
        if challenge is not None:
            return 401, {"WWW-Authenticate": challenge, "Content-Type": "application/json"}, b"{}"
        if path == "/v2/":
            return 200, {"Content-Type": "application/json"}, b"{}"
        if "/manifests/" in path:
            return 200, {"Content-Type": oci.OCI_MANIFEST, "Docker-Content-Digest": digest}, body
        if "/blobs/" in path and blob_answer is not None:
            return blob_answer(method, path)
        return 404, {"Content-Type": "application/json"}, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}'

    return Spy(answer)


def _refused(r, secret: str, *needles: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == EXIT_REFUSED, f"exit {r.returncode}:\n{out}"
    assert r.stderr.startswith("error: ") and "\nhint: " in r.stderr, r.stderr
    assert secret not in out, out
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


# --------------------------------------------------------------------------- the CLI with --allow-registry


def test_registry_outside_the_allow_list_is_refused_before_any_request(cli: Imagevol, spy: Spy, secret: str) -> None:
    r = cli.pull(f"{spy.host}/x:v1", "--allow-registry", "ghcr.io", "--allow-registry", "*.example.com")
    _refused(r, secret, f"registry {spy.host} is not in the allow-list", "ghcr.io, *.example.com")
    assert spy.requests == []


@pytest.mark.parametrize(
    ("name", "allow", "kind"),
    [
        ("localhost", "localhost:*", "a loopback address"),  # the name is admitted; what it resolves to is not
        ("127.0.0.1", "*:*", "a loopback address"),  # a name glob never admits a special address
        ("0.0.0.0", "*:*", "an unspecified address"),  # (Linux connects 0.0.0.0 to the host itself)
    ],
)
def test_admitted_name_on_a_loopback_address_is_refused(
    cli: Imagevol, spy: Spy, secret: str, name: str, allow: str, kind: str
) -> None:
    r = cli.pull(f"{name}:{spy.port}/x:v1", "--allow-registry", allow, "--retries", "0")
    _refused(r, secret, f"is {kind}", f"--allow-registry: {allow}")
    assert spy.requests == []


def _global_ipv4() -> str:
    """A non-loopback IPv4 address of this host (`ip -o -4 addr show scope global`)."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True)
    addrs = [line.split()[3].split("/")[0] for line in out.stdout.splitlines() if len(line.split()) > 3]
    if not addrs:
        unavailable("this host has no global IPv4 address to listen on")
    return addrs[0]


def test_the_hosts_own_address_is_refused(cli: Imagevol, secret: str) -> None:
    """A service on the node's own (non-loopback) address, found on the interfaces at connect time."""
    address = _global_ipv4()
    own = Spy(lambda method, path: (200, {"Content-Type": "text/plain"}, secret.encode()), address)
    try:
        r = cli.pull(f"{own.host}/x:v1", "--allow-registry", "*:*", "--retries", "0")
        _refused(r, secret, f"{address} is one of this node's own addresses")
        assert own.requests == []
        # Named by address, it is admitted (plain http, as --tls-verify=false allows off loopback).
        r = cli.pull(f"{own.host}/x:v1", "--allow-registry", own.host, "--retries", "0", "--tls-verify=false")
        assert r.returncode != 0 and secret not in r.stderr, r.stderr
        assert own.requests
    finally:
        own.close()


def test_entry_naming_the_address_admits_it(cli: Imagevol, registry: Registry, spy: Spy) -> None:
    """An entry that names the address (not a name glob) reaches it: the opt-in for local registries."""
    client = oci.Client(registry)
    body, digest = _artifact()
    for d in (b"weights", oci.OCI_EMPTY_DATA):
        client.push_blob("egress/m", d)
    client.push_manifest("egress/m", "v1", body, oci.OCI_MANIFEST)
    port = registry.host.rsplit(":", 1)[1]
    r = cli.pull(f"{registry.host}/egress/m:v1", "--allow-registry", f"127.0.0.1:{port}", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["digest"] == digest
    r = cli.pull(f"{registry.host}/egress/m:v1", "--allow-registry", "127.0.0.*:*", "--pull", "always")
    assert r.returncode == 0, r.stderr


def test_tls_through_checked_connections(cli: Imagevol, tls_registry: Registry, tmp_path: Path) -> None:
    """The checked connection goes to the literal address; TLS still verifies the certificate for
    the name asked for (`localhost`), and a certificate the CA did not sign is still refused."""
    client = oci.Client(tls_registry)
    body, digest = _artifact()
    for d in (b"weights", oci.OCI_EMPTY_DATA):
        client.push_blob("egress/tls", d)
    client.push_manifest("egress/tls", "v1", body, oci.OCI_MANIFEST)
    port = tls_registry.host.rsplit(":", 1)[1]
    allow = ("--allow-registry", f"localhost:{port},127.0.0.1:{port},[::1]:{port}")
    ref = f"localhost:{port}/egress/tls:v1"
    r = cli.pull(ref, *allow, "--retries", "0")
    assert r.returncode == 1 and "certificate" in r.stderr.lower(), r.stderr
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(Path(tls_registry.ca_file).read_bytes())
    r = cli.pull(ref, *allow, "--cert-dir", str(certs), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["digest"] == digest
    # Another name of 127.0.0.1 (from /etc/hosts), not in the certificate: refused by TLS, so the
    # certificate is checked against the name, not the address connected to.
    other = [n for n in _hosts_names("127.0.0.1") if n != "localhost"]
    if other:
        r = cli.pull(
            f"{other[0]}:{port}/egress/tls:v1",
            "--allow-registry",
            f"{other[0]}:{port},127.0.0.1:{port}",
            "--cert-dir",
            str(certs),
            "--retries",
            "0",
            "--pull",
            "always",
        )
        assert r.returncode == 1 and "certificate" in r.stderr.lower(), r.stderr


def _hosts_names(address: str) -> list[str]:
    names = []
    for line in Path("/etc/hosts").read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields and fields[0] == address:
            names += [n for n in fields[1:] if "." not in n and n.isascii()]
    return names


@pytest.mark.parametrize(
    "where",
    [
        "http://127.0.0.1:{port}/latest/meta-data/",
        "http://localhost:{port}/secret",
        "http://[::ffff:127.0.0.1]:{port}/secret",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    ],
)
def test_blob_redirect_to_a_node_local_address_is_refused(cli: Imagevol, spy: Spy, secret: str, where: str) -> None:
    """A registry the operator admitted redirects a blob GET (as to blob storage): the target's
    address is checked like the registry's, before any connection (169.254.169.254 is never tried)."""
    location = where.format(port=spy.port)
    reg = _fake_registry(lambda method, path: (307, {"Location": location}, b""))
    try:
        r = cli.pull(f"{reg.host}/models/m:v1", "--allow-registry", reg.host, "--retries", "0")
        _refused(r, secret, "refused to connect")
        assert "link-local" in r.stderr if "169.254" in where else "loopback" in r.stderr
        assert any("/blobs/" in p for _, p in reg.requests), reg.requests
    finally:
        reg.close()
    assert spy.requests == []


def test_redirect_of_the_real_registry_to_another_loopback_host_is_refused(
    cli: Imagevol, registry: Registry, secret: str
) -> None:
    """The real registry behind the proxy, which redirects blob GETs to a side server on 127.0.0.2."""
    client = oci.Client(registry)
    body, _ = _artifact()
    for d in (b"weights", oci.OCI_EMPTY_DATA):
        client.push_blob("egress/redirect", d)
    client.push_manifest("egress/redirect", "v1", body, oci.OCI_MANIFEST)
    with Proxy(registry.url) as p:
        p.fault = Fault(redirect_to_other_host=True)
        r = cli.pull(f"{p.host}/egress/redirect:v1", "--allow-registry", p.host, "--retries", "0")
        _refused(r, secret, "refused to connect to 127.0.0.2", "loopback")
        assert [q for q in p.requests if q.status == 302], p.requests
        assert p.side.requests == []


@pytest.mark.parametrize("realm", ["http://127.0.0.1:{port}/token", "http://169.254.169.254/token"])
def test_token_realm_on_a_node_local_address_is_refused(cli: Imagevol, spy: Spy, secret: str, realm: str) -> None:
    challenge = f'Bearer realm="{realm.format(port=spy.port)}",service="registry"'
    reg = _fake_registry(challenge=challenge)
    try:
        r = cli.pull(f"{reg.host}/models/m:v1", "--allow-registry", reg.host, "--retries", "0")
        _refused(r, secret, "refused to connect")
        assert reg.requests, "the registry was not asked"
    finally:
        reg.close()
    assert spy.requests == []


def test_mirrors_of_registries_conf_are_admitted(cli: Imagevol, registry: Registry, tmp_path: Path) -> None:
    """The operator's mirrors (here on loopback) need no entry; the registry a reference names does."""
    client = oci.Client(registry)
    body, digest = _artifact()
    for d in (b"weights", oci.OCI_EMPTY_DATA):
        client.push_blob("mirrored/models/m", d)
    client.push_manifest("mirrored/models/m", "v1", body, oci.OCI_MANIFEST)
    conf = tmp_path / "registries.conf"
    conf.write_text(
        '[[registry]]\nprefix = "models.example.invalid"\nlocation = "models.example.invalid"\n\n'
        f'[[registry.mirror]]\nlocation = "{registry.host}/mirrored"\n'
    )
    ref = "models.example.invalid/models/m:v1"
    args = ("--registries-conf", str(conf), "--retries", "0", "--json")
    r = cli.pull(ref, *args, "--allow-registry", "models.example.invalid")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["digest"] == digest
    r = cli.pull(ref, *args, "--allow-registry", "ghcr.io", "--pull", "always")
    assert r.returncode == EXIT_REFUSED and "models.example.invalid is not in the allow-list" in r.stderr, r.stderr


def test_invalid_allow_registry_is_a_usage_error(cli: Imagevol) -> None:
    r = cli.pull("ghcr.io/x/y:v1", "--allow-registry", "https://ghcr.io/x")
    assert r.returncode == 2, r.stderr
    assert "invalid --allow-registry 'https://ghcr.io/x'" in r.stderr and "hint:" in r.stderr


# --------------------------------------------------------------------------- error texts


@pytest.mark.parametrize(
    ("status", "ctype", "body", "shown", "code"),
    [
        (500, "text/html; charset=utf-8", "<html><body>{secret}</body></html>", "500", 1),
        (404, "application/json", '{{"token": "{secret}"}}', "application/json", 1),
        (403, "text/plain", "{secret}", "403", 1),
        (
            404,
            "application/json",
            '{{"errors": [{{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown", "detail": "{secret}"}}]}}',
            "MANIFEST_UNKNOWN: manifest unknown",
            1,
        ),
    ],
)
def test_error_answers_are_described_never_quoted(
    cli: Imagevol, secret: str, status: int, ctype: str, body: str, shown: str, code: int
) -> None:
    """Without any allow-list (the admin's CLI): what a non-registry answer said stays out of the
    error; a registry error document gives its code and message only."""
    data = body.format(secret=secret).encode()

    def answer(method: str, path: str) -> Answer:
        if path == "/v2/":
            return 200, {"Content-Type": "application/json"}, b"{}"
        return status, {"Content-Type": ctype}, data

    reg = Spy(answer)
    try:
        r = cli.pull(f"{reg.host}/models/m:v1", "--retries", "0")
    finally:
        reg.close()
    assert r.returncode == code, r.stderr
    assert r.stderr.startswith("error: "), r.stderr
    assert secret not in r.stdout + r.stderr, r.stderr
    assert str(status) in r.stderr or status == 404, r.stderr
    assert shown in r.stderr, r.stderr
    if "MANIFEST_UNKNOWN" not in body:
        assert ctype.split(";")[0] in r.stderr and "not a registry error document" in r.stderr, r.stderr


# --------------------------------------------------------------------------- the CSI plugin


@pytest.fixture
def plugin_env(tmp_path: Path) -> Iterator[Callable[..., Plugin]]:
    """Starts plugins with the given flags (no default --allow-registry); stops them at the end."""
    started: list[Plugin] = []
    sockdir = Path(tempfile.mkdtemp(prefix="ivcsi-", dir="/tmp"))
    cli = Imagevol(tmp_path / "store", tmp_path / "home", watch=[tmp_path / "pods"])

    def start(*flags: str) -> Plugin:
        for p in started:
            if p.proc is not None and p.proc.poll() is None:
                p.stop()
        p = Plugin(cli, sockdir / "csi.sock", tmp_path / f"plugin{len(started)}.log", *flags).start()
        started.append(p)
        return p

    yield start
    for p in started:
        if p.proc is not None and p.proc.poll() is None:
            p.stop()
    cli.cleanup()
    shutil.rmtree(sockdir, ignore_errors=True)


def _target(tmp_path: Path, name: str) -> Path:
    t = tmp_path / "pods" / secrets.token_hex(4) / "volumes" / "kubernetes.io~csi" / name / "mount"
    t.parent.mkdir(parents=True)
    return t


def _publish_error(p: Plugin, tmp_path: Path, vid: str, image: str) -> grpc.RpcError:
    req = publish_request(vid, _target(tmp_path, vid), {"image": image})
    return rpc_error(p.node.NodePublishVolume, req, timeout=60)


def test_csi_publish_naming_a_loopback_registry_is_refused(
    plugin_env: Callable[..., Plugin], spy: Spy, secret: str, tmp_path: Path
) -> None:
    image = f"{spy.host}/x:v1"
    # A registry outside the list: refused by name, before any request.
    p = plugin_env("--allow-registry", "registry.example.com")
    err = _publish_error(p, tmp_path, "csi-ssrf-1", image)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (err.code(), err.details())
    assert "allow-list" in err.details() and "--allow-registry: registry.example.com" in err.details()
    assert "\nhint: " in err.details()
    # Any name admitted: 127.0.0.1 is still loopback, refused by address.
    p = plugin_env("--allow-registry", "*:*")
    err = _publish_error(p, tmp_path, "csi-ssrf-2", image)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (err.code(), err.details())
    assert "loopback" in err.details()
    # The cloud metadata endpoint: refused before any connection.
    err = _publish_error(p, tmp_path, "csi-ssrf-2m", "169.254.169.254/latest/meta-data:v1")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (err.code(), err.details())
    assert "169.254.169.254 is a link-local address" in err.details()
    # No --allow-registry at all: nothing is contacted.
    p = plugin_env("--allow-registry=")
    err = _publish_error(p, tmp_path, "csi-ssrf-3", image)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (err.code(), err.details())
    assert "--allow-registry: empty" in err.details()
    assert "no --allow-registry" in p.current_log.read_text()
    assert spy.requests == []
    assert not any(secret in log.read_text() for log in tmp_path.glob("plugin*.log"))


def test_csi_node_address_is_refused(plugin_env: Callable[..., Plugin], tmp_path: Path) -> None:
    """In the pod network the node's IP is on no interface of the plugin: --node-address names it
    (TEST-NET-3 here, never connected to)."""
    p = plugin_env("--allow-registry", "*:*", "--node-address", "203.0.113.7")
    err = _publish_error(p, tmp_path, "csi-ssrf-5", "203.0.113.7:10250/x:v1")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (err.code(), err.details())
    assert "203.0.113.7 is one of this node's own addresses" in err.details()


def test_csi_event_never_quotes_a_non_registry_answer(
    plugin_env: Callable[..., Plugin], secret: str, tmp_path: Path
) -> None:
    """The operator admitted the address; what it answers (not a registry) stays out of the event."""
    reg = Spy(lambda method, path: (500, {"Content-Type": "text/html"}, f"<h1>{secret}</h1>".encode()))
    try:
        p = plugin_env("--allow-registry", reg.host, "--retries", "0")
        err = _publish_error(p, tmp_path, "csi-ssrf-4", f"{reg.host}/x:v1")
        assert reg.requests, "the admitted address was not contacted"
    finally:
        reg.close()
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    assert "500" in err.details() and "text/html" in err.details()
    assert secret not in err.details()
    assert not any(secret in log.read_text() for log in tmp_path.glob("plugin*.log"))
