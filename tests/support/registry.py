"""A real OCI registry for the tests: Debian's ``docker-registry`` (distribution 2.8).

``Registry.start(tmp_dir, tls=..., auth=...)`` writes a config, starts the binary on a free
loopback port with its own storage directory and waits until ``/v2/`` answers. Optional TLS (a
CA and a server certificate made here with ``cryptography``), basic auth (an htpasswd file) or
token auth (a :class:`~tests.support.tokenserver.TokenServer` started alongside).

Nothing here uses imagevol's code.
"""

from __future__ import annotations

import atexit
import datetime as dt
import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .tokenserver import TokenServer

DEFAULT_BINARY = "/usr/bin/docker-registry"
DEFAULT_USERS = {"alice": "secret"}
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
SERVICE = "imagevol-test-registry"
ISSUER = "imagevol-test-token-issuer"

AuthMode = Literal["basic", "token"] | None


class RegistryUnavailable(RuntimeError):
    """The docker-registry binary (or a tool it needs) is missing."""


class RegistryStartError(RuntimeError):
    """The registry process did not come up; the message carries the log tail."""


def registry_binary() -> str:
    """Path of the registry binary: ``$IMAGEVOL_REGISTRY_BIN`` or ``/usr/bin/docker-registry``."""
    env = os.environ.get("IMAGEVOL_REGISTRY_BIN")
    if env:
        return env
    if os.path.exists(DEFAULT_BINARY):
        return DEFAULT_BINARY
    return shutil.which("docker-registry") or DEFAULT_BINARY


def registry_available() -> bool:
    path = registry_binary()
    return os.path.isfile(path) and os.access(path, os.X_OK)


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- certificates


@dataclass
class KeyPair:
    """A private key and its certificate, both in memory and as PEM files."""

    key: object
    cert: x509.Certificate
    key_file: Path
    cert_file: Path


def _write_pair(key, cert: x509.Certificate, directory: Path, name: str) -> KeyPair:
    directory.mkdir(parents=True, exist_ok=True)
    key_file = directory / f"{name}.key"
    cert_file = directory / f"{name}.crt"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return KeyPair(key, cert, key_file, cert_file)


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=7))


def generate_ca(directory: Path, name: str = "ca", common_name: str = "imagevol test CA") -> KeyPair:
    """A self-signed CA (EC P-256), written to ``directory/NAME.{key,crt}``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    cert = builder.sign(key, hashes.SHA256())
    return _write_pair(key, cert, Path(directory), name)


def issue_cert(
    ca: KeyPair,
    directory: Path,
    name: str,
    *,
    common_name: str,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    server: bool = True,
    rsa_key: bool = False,
) -> KeyPair:
    """A leaf certificate signed by ``ca``: a TLS server certificate (SANs, serverAuth) or, with
    ``server=False``, a signing certificate (digitalSignature only). ``rsa_key`` picks RSA-2048
    instead of EC P-256."""
    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if rsa_key
        else ec.generate_private_key(ec.SECP256R1())
    )
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=server and rsa_key,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.cert.public_key()),
            critical=False,
        )
    )
    if server:
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return _write_pair(key, cert, Path(directory), name)


# --------------------------------------------------------------------------- htpasswd


def htpasswd_line(user: str, password: str) -> str:
    """``user:$2...`` with a bcrypt hash: the ``bcrypt`` module when installed, else
    ``htpasswd -Bbn`` from Debian's apache2-utils."""
    try:
        import bcrypt  # type: ignore[import-not-found]
    except ImportError:
        bcrypt = None
    if bcrypt is not None:
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
        return f"{user}:{hashed}"
    tool = shutil.which("htpasswd")
    if tool is None:
        raise RegistryUnavailable(
            "basic auth fixtures need bcrypt hashes: install Debian's apache2-utils (htpasswd) "
            "or the Python package bcrypt"
        )
    out = subprocess.run(
        [tool, "-Bbn", "-C", "5", user, password],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return out.strip()


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    path.write_text("".join(htpasswd_line(u, p) + "\n" for u, p in users.items()))
    return path


# --------------------------------------------------------------------------- registry

_LIVE: weakref.WeakSet[Registry] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:  # pragma: no cover - safety net only
    for reg in list(_LIVE):
        try:
            reg.stop()
        except Exception:
            pass


class Registry:
    """One docker-registry process. Build with :meth:`start`."""

    def __init__(
        self,
        root: Path,
        *,
        tls: bool,
        auth: AuthMode,
        users: dict[str, str],
        port: int | None,
    ) -> None:
        if auth not in (None, "basic", "token"):
            raise ValueError(f"auth must be None, 'basic' or 'token', not {auth!r}")
        self.root = Path(root)
        self.tls = tls
        self.auth = auth
        self.users = dict(users)
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.storage_dir = self.root / "storage"
        self.log_file = self.root / "registry.log"
        self.config_file = self.root / "config.yml"
        self.ca_file: Path | None = None
        self.ca: KeyPair | None = None
        self.htpasswd_file: Path | None = None
        self.token_server: TokenServer | None = None
        self.service = SERVICE
        self.issuer = ISSUER
        self._proc: subprocess.Popen | None = None
        self._log_fh = None

    # ---- construction

    @classmethod
    def start(
        cls,
        tmp_dir: os.PathLike | str,
        *,
        tls: bool = False,
        auth: AuthMode = None,
        users: dict[str, str] | None = None,
        port: int | None = None,
        token_expires_in: int = 300,
    ) -> Registry:
        """Set up ``tmp_dir`` (config, storage, certs) and start the registry; returns once
        ``/v2/`` answers. With ``auth="token"`` a token server is started too
        (``reg.token_server``)."""
        binary = registry_binary()
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            raise RegistryUnavailable(
                f"registry binary {binary} not found: install Debian's docker-registry package "
                "(or set IMAGEVOL_REGISTRY_BIN)"
            )
        root = Path(tmp_dir)
        root.mkdir(parents=True, exist_ok=True)
        reg = cls(root, tls=tls, auth=auth, users=DEFAULT_USERS if users is None else users, port=port)
        try:
            reg._prepare(token_expires_in)
            reg._spawn()
            reg.wait_ready()
        except BaseException:
            reg.stop()
            raise
        return reg

    def _prepare(self, token_expires_in: int) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        certs = self.root / "certs"
        if self.tls or self.auth == "token":
            self.ca = generate_ca(certs)
        http: dict = {
            "addr": self.host,
            "secret": secrets.token_hex(16),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        }
        if self.tls:
            assert self.ca is not None
            server = issue_cert(
                self.ca,
                certs,
                "server",
                common_name="127.0.0.1",
                dns=("localhost",),
                ips=("127.0.0.1",),
            )
            http["tls"] = {"certificate": str(server.cert_file), "key": str(server.key_file)}
            self.ca_file = self.ca.cert_file
        config: dict = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}, "readonly": {"enabled": False}},
            },
            "http": http,
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.auth == "basic":
            self.htpasswd_file = write_htpasswd(self.root / "htpasswd", self.users)
            config["auth"] = {"htpasswd": {"realm": "imagevol-test", "path": str(self.htpasswd_file)}}
        elif self.auth == "token":
            assert self.ca is not None
            signer = issue_cert(self.ca, certs, "token-signer", common_name="token signer", server=False, rsa_key=True)
            self.token_server = TokenServer(
                users=self.users,
                service=self.service,
                issuer=self.issuer,
                signing_key=signer.key,
                signing_cert=signer.cert,
                expires_in=token_expires_in,
            )
            self.token_server.start()
            config["auth"] = {
                "token": {
                    "realm": self.token_server.realm,
                    "service": self.service,
                    "issuer": self.issuer,
                    "rootcertbundle": str(self.ca.cert_file),
                }
            }
        # distribution reads YAML; JSON is YAML.
        self.config_file.write_text(json.dumps(config, indent=2))

    def _spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self._log_fh = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        self._log_fh.write(f"--- starting registry on {self.host} at {time.ctime()}\n".encode())
        self._log_fh.flush()
        self._proc = subprocess.Popen(
            [registry_binary(), "serve", str(self.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        _LIVE.add(self)

    # ---- lifecycle

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _pool(self) -> urllib3.PoolManager:
        if self.tls:
            return urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=str(self.ca_file))
        return urllib3.PoolManager()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll ``GET /v2/`` until it answers (200 or 401); raise with the log tail if the
        process dies or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        pool = self._pool()
        last = "no answer yet"
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise RegistryStartError(
                    f"registry on {self.host} exited with {self._proc.returncode}; log tail:\n{self.log_tail()}"
                )
            try:
                r = pool.request(
                    "GET",
                    f"{self.url}/v2/",
                    timeout=urllib3.Timeout(connect=1.0, read=2.0),
                    retries=False,
                )
                if r.status in (200, 401):
                    return
                last = f"HTTP {r.status}"
            except urllib3.exceptions.HTTPError as e:
                last = repr(e)
            if time.monotonic() > deadline:
                raise RegistryStartError(
                    f"registry on {self.host} not ready after {timeout:.0f}s ({last}); log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def stop(self) -> None:
        """Stop the registry (and its token server). Idempotent."""
        self._stop_process()
        if self.token_server is not None:
            self.token_server.stop()
        _LIVE.discard(self)

    def restart(self) -> None:
        """Stop and start the registry process again: same port, config and storage. The
        token server (if any) keeps running."""
        self._stop_process()
        deadline = time.monotonic() + READY_TIMEOUT
        while not _port_free(self.port):
            if time.monotonic() > deadline:
                raise RegistryStartError(f"port {self.port} still busy after stopping the registry")
            time.sleep(0.05)
        self._spawn()
        self.wait_ready()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Registry {self.url} auth={self.auth} tls={self.tls} running={self.running()}>"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
