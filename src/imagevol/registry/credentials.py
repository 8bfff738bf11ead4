"""Registry credentials from containers-auth.json / Docker config files and credential helpers.

The semantics follow containers/image (`pkg/docker/config`), which podman and skopeo use:

* Files are searched in the order of :func:`auth_file_candidates`; the first file that yields a
  credential wins. Missing files are skipped.
* Within one file: ``credHelpers[registry]`` first (helpers are asked for the registry, never a
  namespace), then ``auths`` entries from the most specific key to the registry
  (``quay.io/ns/repo``, ``quay.io/ns``, ``quay.io``), then any ``auths`` key that normalizes to the
  registry (``https://index.docker.io/v1/``, ``http://host:5000/v2/``; ``docker.io``,
  ``index.docker.io`` and ``registry-1.docker.io`` are one registry), and last the Docker
  ``credsStore`` (which containers/image ignores; Docker itself consults it instead of inline
  entries, but ``docker login`` with a store only leaves empty ``{}`` markers inline, so inline
  secrets first is equivalent and saves a process).
* Helpers are programs ``docker-credential-NAME`` on ``$PATH``, run as ``NAME get`` with the server
  URL on stdin and answering ``{"ServerURL", "Username", "Secret"}``; the user ``<token>`` means the
  secret is an identity (refresh) token.

Secrets never appear in ``repr()``, log records or error messages.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AuthError, UsageError

log = logging.getLogger(__name__)

HELPER_TIMEOUT = 30.0
"""Seconds a credential helper may run before it is killed."""

DOCKER_HUB_HELPER_URL = "https://index.docker.io/v1/"
"""The server URL `docker login` uses for Docker Hub in credential helpers and config files."""

_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_HELPER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True, repr=False)
class Credential:
    """A username/password pair, or an identity token (then the username may be empty)."""

    username: str
    password: str
    identity_token: str | None = None

    def __repr__(self) -> str:
        password = "***" if self.password else "''"
        token = "***" if self.identity_token else "None"
        return f"Credential(username={self.username!r}, password={password}, identity_token={token})"

    __str__ = __repr__


@dataclass(frozen=True)
class _AuthFile:
    path: Path
    legacy: bool = False  # ~/.dockercfg: the top level is the `auths` map itself
    explicit: bool = False  # named by the caller: it must exist


def _home() -> Path:
    return Path(os.path.expanduser("~"))


def _auth_files(authfile: str | None) -> list[_AuthFile]:
    if authfile:
        return [_AuthFile(Path(authfile).expanduser(), explicit=True)]
    env = os.environ.get("REGISTRY_AUTH_FILE")
    if env:
        return [_AuthFile(Path(env).expanduser(), explicit=True)]
    home = _home()
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        runtime_file = Path(runtime_dir) / "containers" / "auth.json"
    else:
        runtime_file = Path(f"/run/containers/{os.getuid()}/auth.json")
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(home / ".config")
    docker_config = os.environ.get("DOCKER_CONFIG")
    docker_file = Path(docker_config) / "config.json" if docker_config else home / ".docker" / "config.json"
    return [
        _AuthFile(runtime_file),
        _AuthFile(Path(config_home) / "containers" / "auth.json"),
        _AuthFile(docker_file),
        _AuthFile(home / ".dockercfg", legacy=True),
    ]


def auth_file_candidates(authfile: str | None = None) -> list[Path]:
    """The auth files to search, best first (they need not exist).

    1. ``authfile`` (``--authfile``) if given: then it is the only file;
    2. else ``$REGISTRY_AUTH_FILE`` if set: then it is the only file;
    3. else, in this order:
       ``$XDG_RUNTIME_DIR/containers/auth.json`` (``/run/containers/$UID/auth.json`` without it),
       ``$XDG_CONFIG_HOME/containers/auth.json`` (default ``~/.config``),
       ``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``),
       ``~/.dockercfg`` (legacy format: the top-level object is the ``auths`` map).

    As in containers/image (podman, skopeo), a file the user names replaces the defaults rather
    than being prepended to them, and a named file that does not exist is an error.
    """
    return [f.path for f in _auth_files(authfile)]


def normalize_registry(registry: str) -> str:
    """One spelling for Docker Hub (``docker.io``); other registries unchanged."""
    return "docker.io" if registry in _DOCKER_HUB_ALIASES else registry


def normalize_auth_key(key: str, *, legacy: bool = False) -> str:
    """The registry an `auths` key names: URL forms lose scheme and path, Docker Hub is docker.io."""
    stripped = key.removeprefix("http://").removeprefix("https://")
    if legacy or stripped != key:
        stripped = stripped.split("/", 1)[0]
    return normalize_registry(stripped)


def _lookup_keys(registry: str, repository: str | None, legacy: bool) -> list[str]:
    if legacy or not repository:
        return [registry]
    key = f"{registry}/{repository}"
    keys = [key]
    while "/" in key:
        key = key.rsplit("/", 1)[0]
        keys.append(key)
    return keys


def _validate_query(registry: str, repository: str | None) -> None:
    if not registry or "/" in registry or registry.startswith(("http:", "https:")):
        raise UsageError(f"invalid registry {registry!r} for a credential lookup: expected host[:port]")
    if repository is not None:
        parts = repository.split("/")
        if any(not p for p in parts) or "@" in repository or ":" in repository:
            raise UsageError(
                f"invalid repository {repository!r} for a credential lookup: expected a path without tag or digest"
            )


def _read_auth_file(entry: _AuthFile) -> dict[str, Any] | None:
    """The parsed file, or None if it does not exist. Never puts file contents in errors."""
    path = entry.path
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        if entry.explicit:
            raise UsageError(
                f"auth file {path} does not exist",
                hint="check --authfile / $REGISTRY_AUTH_FILE, or run `podman login --authfile`",
            ) from None
        return None
    except OSError as exc:
        raise UsageError(f"cannot read auth file {path}: {exc.strerror or exc}") from None
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise UsageError(f"auth file {path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"auth file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    if not isinstance(data, dict):
        raise UsageError(f"auth file {path}: the top level must be a JSON object")
    return data


def _string_map(path: Path, data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"auth file {path}: key {key!r} must be an object")
    return value


def _decode_entry(path: str | Path, key: str, entry: Any) -> Credential | None:
    if not isinstance(entry, dict):
        raise UsageError(f"auth file {path}: auths[{key!r}] must be an object")
    auth = entry.get("auth") or ""
    token = entry.get("identitytoken") or None
    if not isinstance(auth, str):
        raise UsageError(f"auth file {path}: auths[{key!r}].auth must be a string")
    if token is not None and not isinstance(token, str):
        raise UsageError(f"auth file {path}: auths[{key!r}].identitytoken must be a string")
    username = password = ""
    if auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise UsageError(f"auth file {path}: auths[{key!r}].auth is not base64 of UTF-8 `user:password`") from None
        if ":" in decoded:
            username, password = decoded.split(":", 1)
            password = password.strip("\x00")
        else:
            # Docker skips such entries too; never echo the decoded text.
            log.warning("auth file %s: auths[%r].auth has no ':' separator; ignored", path, key)
    if not username and not password and not token:
        return None
    return Credential(username=username, password=password, identity_token=token)


def _helper_server_urls(registry: str) -> list[str]:
    if normalize_registry(registry) == "docker.io":
        return [DOCKER_HUB_HELPER_URL, "docker.io"]
    return [registry]


def _run_helper(helper: str, server_url: str, *, source: str, required: bool) -> Credential | None:
    """Ask `docker-credential-<helper>` for `server_url`.

    `source` names where the helper was configured (for messages). A helper that is not installed
    is an error if `required`, else skipped with a warning.
    """
    program = f"docker-credential-{helper}"
    exe = shutil.which(program)
    if exe is None:
        if required:
            raise AuthError(
                f"credential helper {program} (configured in {source}) is not on $PATH",
                hint=f"install {program} or remove it from {source}",
            )
        log.warning("credential helper %s (configured in %s) is not on $PATH; ignored", program, source)
        return None
    try:
        proc = subprocess.run(
            [exe, "get"],
            input=server_url.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AuthError(
            f"credential helper {program} did not answer for {server_url} within {HELPER_TIMEOUT:g} s"
        ) from None
    except OSError as exc:
        raise AuthError(f"cannot run credential helper {program}: {exc.strerror or exc}") from None
    if proc.returncode != 0:
        text = (proc.stdout or proc.stderr).decode("utf-8", "replace").strip()
        if "credentials not found" in text.lower():
            return None
        first = text.splitlines()[0][:200] if text else "(no message)"
        raise AuthError(
            f"credential helper {program} (from {source}) failed for {server_url} (exit {proc.returncode}): {first}",
            hint=f"check {program} itself, or its entry in {source}",
        )
    try:
        answer = json.loads(proc.stdout)
    except (json.JSONDecodeError, UnicodeDecodeError):
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("Secret", ""), str):
        # The output may hold the secret: never quote it.
        raise AuthError(f"credential helper {program} answered {server_url} with malformed JSON")
    username = answer.get("Username") or ""
    secret = answer.get("Secret") or ""
    if not isinstance(username, str):
        raise AuthError(f"credential helper {program} answered {server_url} with a non-string Username")
    if username == "<token>":
        return Credential(username="", password="", identity_token=secret) if secret else None
    if not username and not secret:
        return None
    return Credential(username=username, password=secret)


def _ask_helper(helper: Any, registry: str, *, path: Path, key: str, required: bool) -> Credential | None:
    source = f"{key} in {path}"
    if not isinstance(helper, str) or not _HELPER_NAME.fullmatch(helper):
        raise UsageError(f"auth file {path}: {key} must name a credential helper (letters, digits, . _ -)")
    for url in _helper_server_urls(registry):
        cred = _run_helper(helper, url, source=source, required=required)
        if cred is not None:
            log.debug("credentials for %s from helper %s (configured in %s)", registry, helper, path)
            return cred
    return None


def _find_in_file(entry: _AuthFile, registry: str, repository: str | None) -> Credential | None:
    data = _read_auth_file(entry)
    if not data:
        return None
    path = entry.path
    wanted = normalize_registry(registry)
    if entry.legacy:
        auths, helpers, store = data, {}, None
    else:
        auths = _string_map(path, data, "auths")
        helpers = _string_map(path, data, "credHelpers")
        store = data.get("credsStore") or None

    helper_key = registry if registry in helpers else None
    if helper_key is None:
        helper_key = next((k for k in helpers if normalize_auth_key(k) == wanted), None)
    if helper_key is not None:
        return _ask_helper(helpers[helper_key], registry, path=path, key=f"credHelpers[{helper_key!r}]", required=True)

    cred = lookup_in_auths(auths, registry, repository, source=path, legacy=entry.legacy)
    if cred is not None:
        return cred
    if store is not None:
        return _ask_helper(store, registry, path=path, key="credsStore", required=False)
    return None


def lookup_in_auths(
    auths: dict[str, Any], registry: str, repository: str | None = None, *, source: str | Path, legacy: bool = False
) -> Credential | None:
    """The credential for `registry` in an ``auths`` map (of an auth file, or of a Kubernetes
    ``.dockerconfigjson`` secret; `source` names it in errors): the most specific key first, then any
    key that normalizes to the registry. Credential helpers are not consulted here."""
    wanted = normalize_registry(registry)
    for key in _lookup_keys(registry, repository, legacy):
        if key in auths:
            cred = _decode_entry(source, key, auths[key])
            if cred is not None:
                log.debug("credentials for %s from %s (key %s)", registry, source, key)
            return cred
    for key, value in auths.items():
        if normalize_auth_key(key, legacy=legacy) == wanted:
            cred = _decode_entry(source, key, value)
            if cred is not None:
                log.debug("credentials for %s from %s (key %s)", registry, source, key)
            return cred
    return None


def lookup_credential(
    registry: str, repository: str | None = None, *, authfile: str | None = None
) -> Credential | None:
    """The credential for `registry` (``host[:port]``, ``docker.io`` for Docker Hub), or None.

    `repository` (the path inside the registry, e.g. ``library/ubuntu``) enables namespaced
    ``auths`` keys. Raises :class:`UsageError` for a malformed auth file (naming the file) and
    :class:`AuthError` when a credential helper fails (naming the helper).
    """
    _validate_query(registry, repository)
    for entry in _auth_files(authfile):
        cred = _find_in_file(entry, registry, repository)
        if cred is not None:
            return cred
    log.debug("no credentials for %s", registry if not repository else f"{registry}/{repository}")
    return None
