"""registries.conf (v2) and certs.d: where to pull a repository from, and with which TLS material.

The semantics follow containers/image (`pkg/sysregistriesv2`, `docker/docker_client.go`,
`pkg/tlsclientconfig`), which CRI-O, podman and skopeo use, so one node configuration serves all:

* ``[[registry]]`` entries match a repository by ``prefix`` (default: ``location``); the longest
  prefix wins. ``prefix = "*.example.com"`` matches any subdomain host (not ``example.com``).
  The matched prefix is replaced by the endpoint's ``location`` to give the repository to pull.
* ``[[registry.mirror]]`` entries are tried in order before the registry's own location, filtered
  by ``pull-from-mirror`` (``all``, ``digest-only``, ``tag-only``) or the legacy registry-wide
  ``mirror-by-digest-only``. A ``blocked`` registry refuses every pull that matches it.
* Files: the main file, then drop-ins ``*.conf`` from the drop-in directories, each sorted by name;
  a drop-in replaces registries with the same prefix and any top-level setting it sets.
* The v1 format (``[registries.search]``) is refused with a hint to convert.
* certs.d: ``<root>/HOST[:PORT]/`` holds CA files ``*.crt`` and client pairs ``NAME.cert`` +
  ``NAME.key``; the first existing directory of ``~/.config/containers/certs.d``,
  ``/etc/containers/certs.d`` and ``/etc/docker/certs.d`` is used.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EXIT_ERROR, ImagevolError, UsageError

log = logging.getLogger(__name__)

SYSTEM_REGISTRIES_CONF = Path("/etc/containers/registries.conf")
USER_REGISTRIES_CONF = Path(".config/containers/registries.conf")  # relative to $HOME
SYSTEM_CERTS_DIRS: tuple[Path, ...] = (Path("/etc/containers/certs.d"), Path("/etc/docker/certs.d"))
USER_CERTS_DIR = Path(".config/containers/certs.d")  # relative to $HOME

PULL_FROM_MIRROR_VALUES = ("all", "digest-only", "tag-only")
SHORT_NAME_MODES = ("disabled", "enforcing", "permissive")

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])"
_HOST_PORT = re.compile(rf"{_HOST}(?::[0-9]+)?")
_WILDCARD = re.compile(rf"\*\.{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*")

_TOP_KEYS = {
    "registry",
    "unqualified-search-registries",
    "short-name-mode",
    "aliases",
    "credential-helpers",
    "additional-layer-store-auth-helper",
}
_REGISTRY_KEYS = {
    "prefix",
    "location",
    "insecure",
    "blocked",
    "mirror",
    "mirror-by-digest-only",
    "pull-from-mirror",
}
_MIRROR_KEYS = {"location", "insecure", "pull-from-mirror"}


class BlockedRegistryError(ImagevolError):
    """A registries.conf entry blocks pulls from the registry a reference names."""

    exit_code = EXIT_ERROR

    def __init__(self, registry: str, config_file: Path | str | None, repository: str) -> None:
        where = str(config_file) if config_file else "registries.conf"
        super().__init__(
            f"registry {registry} is blocked by {where}: refusing to pull {repository}",
            hint=f"remove `blocked = true` from the [[registry]] with prefix {registry!r} in {where}",
        )
        self.registry = registry
        self.config_file = config_file


@dataclass(frozen=True)
class Endpoint:
    """A place to pull from: ``host[:port][/path-prefix]``."""

    location: str
    insecure: bool = False
    pull_from_mirror: str = "all"
    is_mirror: bool = False

    @property
    def host(self) -> str:
        """``host[:port]`` of the location."""
        return self.location.split("/", 1)[0]


@dataclass(frozen=True)
class Registry:
    """One ``[[registry]]`` entry (after validation; ``prefix`` defaults to ``location``)."""

    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: tuple[Endpoint, ...] = ()
    source: Path | None = None  # the file that defined it

    @property
    def is_wildcard(self) -> bool:
        return self.prefix.startswith("*.")

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(location=self.location, insecure=self.insecure)


@dataclass
class RegistryConfig:
    """The merged content of registries.conf and its drop-ins."""

    registries: list[Registry] = field(default_factory=list)
    unqualified_search_registries: list[str] = field(default_factory=list)
    short_name_mode: str | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)  # files read, in order


@dataclass(frozen=True)
class TLSMaterial:
    """TLS files for one host: extra CA certificates and client certificate/key pairs."""

    directory: Path | None = None
    ca_files: list[Path] = field(default_factory=list)
    client_pairs: list[tuple[Path, Path]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Parsing


@dataclass
class _FileConf:
    path: Path
    registries: list[Registry]
    unqualified_search_registries: list[str] | None
    short_name_mode: str | None
    aliases: dict[str, str]


def _err(path: Path, key: str, message: str, hint: str | None = None) -> UsageError:
    return UsageError(f"{path}: {key}: {message}", hint=hint)


def _opt(table: dict[str, Any], key: str, kind: type, default: Any, path: Path, where: str) -> Any:
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, kind):
        raise _err(path, f"{where}{key}", f"must be a {kind.__name__}, not {type(value).__name__}")
    return value


def _unknown_keys(table: dict[str, Any], known: set[str], path: Path, where: str) -> None:
    for key in table:
        if key not in known:
            log.debug("%s: ignoring unknown key %s%s", path, where, key)


def _check_location(value: str, path: Path, key: str, *, allow_wildcard: bool = False) -> str:
    trimmed = value.rstrip("/")
    if trimmed.startswith(("http://", "https://")):
        raise _err(path, key, f"{value!r}: URI schemes are not supported", hint="write host[:port][/path] only")
    if allow_wildcard and trimmed.startswith("*"):
        if not _WILDCARD.fullmatch(trimmed):
            raise _err(
                path,
                key,
                f"wildcard prefix {value!r} must look like *.example.com (no port, path, '@' or ':')",
            )
        return trimmed
    host, _, rest = trimmed.partition("/")
    if not _HOST_PORT.fullmatch(host):
        raise _err(path, key, f"{value!r} does not start with a valid host[:port]")
    if rest and (any(not part for part in rest.split("/")) or re.search(r"\s", rest)):
        raise _err(path, key, f"{value!r} has an empty or malformed path component")
    return trimmed


def _parse_mirror(table: Any, path: Path, where: str, by_digest_only: bool) -> Endpoint:
    if not isinstance(table, dict):
        raise _err(path, where.rstrip("."), "must be a table ([[registry.mirror]])")
    _unknown_keys(table, _MIRROR_KEYS, path, where)
    location = _opt(table, "location", str, "", path, where)
    if not location.strip("/"):
        raise _err(path, f"{where}location", "a mirror needs a location")
    location = _check_location(location, path, f"{where}location")
    insecure = _opt(table, "insecure", bool, False, path, where)
    pull_from = _opt(table, "pull-from-mirror", str, "", path, where)
    if pull_from and by_digest_only:
        raise _err(
            path,
            f"{where}pull-from-mirror",
            "cannot be combined with mirror-by-digest-only on the registry",
            hint='drop mirror-by-digest-only and set pull-from-mirror = "digest-only" per mirror',
        )
    if pull_from and pull_from not in PULL_FROM_MIRROR_VALUES:
        raise _err(
            path,
            f"{where}pull-from-mirror",
            f"{pull_from!r} is not one of {', '.join(PULL_FROM_MIRROR_VALUES)}",
        )
    if by_digest_only:
        pull_from = "digest-only"
    return Endpoint(location=location, insecure=insecure, pull_from_mirror=pull_from or "all", is_mirror=True)


def _parse_registry(table: Any, path: Path, index: int) -> Registry:
    where = f"registry[{index}]."
    if not isinstance(table, dict):
        raise _err(path, f"registry[{index}]", "must be a table ([[registry]])")
    _unknown_keys(table, _REGISTRY_KEYS, path, where)
    location = _opt(table, "location", str, "", path, where)
    prefix = _opt(table, "prefix", str, "", path, where)
    if location:
        location = _check_location(location, path, f"{where}location")
    if prefix:
        prefix = _check_location(prefix, path, f"{where}prefix", allow_wildcard=True)
    if not prefix:
        if not location:
            raise _err(path, f"registry[{index}]", "needs a location or a prefix")
        prefix = location
    elif not location and not prefix.startswith("*."):
        raise _err(path, f"{where}location", "is required unless the prefix is a wildcard (*.example.com)")
    if "pull-from-mirror" in table:
        raise _err(
            path,
            f"{where}pull-from-mirror",
            "is only valid in a [[registry.mirror]] table",
        )
    insecure = _opt(table, "insecure", bool, False, path, where)
    blocked = _opt(table, "blocked", bool, False, path, where)
    by_digest_only = _opt(table, "mirror-by-digest-only", bool, False, path, where)
    raw_mirrors = _opt(table, "mirror", list, [], path, where)
    mirrors = tuple(_parse_mirror(m, path, f"{where}mirror[{j}].", by_digest_only) for j, m in enumerate(raw_mirrors))
    return Registry(
        prefix=prefix,
        location=location,
        insecure=insecure,
        blocked=blocked,
        mirror_by_digest_only=by_digest_only,
        mirrors=mirrors,
        source=path,
    )


_V1_HINT = (
    'convert to the v2 format: `unqualified-search-registries = ["docker.io"]` replaces '
    '[registries.search]; a `[[registry]]` table with `location = "HOST"` and `insecure = true` '
    "or `blocked = true` replaces [registries.insecure] / [registries.block] "
    "(see containers-registries.conf(5))"
)


def _parse_file(path: Path) -> _FileConf:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a registries.conf file") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: invalid TOML: {exc}") from None

    if "registries" in data:
        raise _err(path, "registries", "this is the v1 registries.conf format, which is not supported", _V1_HINT)
    _unknown_keys(data, _TOP_KEYS, path, "")

    raw_registries = _opt(data, "registry", list, [], path, "")
    registries: list[Registry] = []
    seen: dict[str, Registry] = {}
    by_location: dict[str, Registry] = {}
    for i, table in enumerate(raw_registries):
        reg = _parse_registry(table, path, i)
        identity = reg.location or reg.prefix
        other = by_location.setdefault(identity, reg)
        for attr in ("insecure", "blocked"):
            if getattr(other, attr) != getattr(reg, attr):
                raise _err(
                    path,
                    f"registry[{i}].{attr}",
                    f"registry {identity!r} is defined more than once with conflicting {attr!r}",
                )
        if reg.prefix in seen:
            # containers/image: the first entry with a prefix wins, later ones are ignored.
            log.debug("%s: registry[%d] repeats prefix %r; ignored", path, i, reg.prefix)
            continue
        seen[reg.prefix] = reg
        registries.append(reg)

    search: list[str] | None = None
    if "unqualified-search-registries" in data:
        raw = _opt(data, "unqualified-search-registries", list, [], path, "")
        search = []
        for i, value in enumerate(raw):
            key = f"unqualified-search-registries[{i}]"
            if not isinstance(value, str):
                raise _err(path, key, "must be a string")
            host = value.rstrip("/")
            if host.startswith(("http://", "https://")) or not _HOST_PORT.fullmatch(host):
                raise _err(path, key, f"{value!r} is not a registry host[:port]")
            search.append(host)

    mode = _opt(data, "short-name-mode", str, "", path, "") or None
    if mode is not None and mode not in SHORT_NAME_MODES:
        raise _err(path, "short-name-mode", f"{mode!r} is not one of {', '.join(SHORT_NAME_MODES)}")

    aliases: dict[str, str] = {}
    for name, value in _opt(data, "aliases", dict, {}, path, "").items():
        if not isinstance(value, str):
            raise _err(path, f"aliases.{name}", "must be a string")
        aliases[name] = value

    return _FileConf(path, registries, search, mode, aliases)


def _dropins(directory: Path) -> list[Path]:
    try:
        entries = sorted(directory.iterdir(), key=lambda p: p.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise UsageError(f"cannot read drop-in directory {directory}: {exc.strerror or exc}") from None
    return [p for p in entries if p.name.endswith(".conf") and p.is_file()]


def _config_files(path: str | None) -> tuple[Path, bool, list[Path]]:
    """(main file, explicitly chosen, drop-in directories)."""
    chosen = path or os.environ.get("CONTAINERS_REGISTRIES_CONF") or None
    if chosen:
        main = Path(chosen).expanduser()
        return main, True, [Path(f"{main}.d")]
    home = Path(os.path.expanduser("~"))
    user = home / USER_REGISTRIES_CONF
    if user.is_file():
        return user, False, [Path(f"{user}.d")]
    return SYSTEM_REGISTRIES_CONF, False, [Path(f"{SYSTEM_REGISTRIES_CONF}.d"), Path(f"{user}.d")]


def load_registries_conf(path: str | None = None) -> RegistryConfig:
    """Read registries.conf and its drop-ins.

    The main file is `path`, else ``$CONTAINERS_REGISTRIES_CONF``, else
    ``~/.config/containers/registries.conf`` if it exists, else ``/etc/containers/registries.conf``.
    Drop-ins are ``*.conf`` files in ``<main file>.d/`` (for the system file also in
    ``~/.config/containers/registries.conf.d/``), applied in name order. A missing default file
    gives an empty configuration; a missing file the caller chose is a :class:`UsageError`.
    """
    main, explicit, dirs = _config_files(path)
    files: list[_FileConf] = []
    if main.exists() or explicit:
        if not main.exists():
            raise UsageError(
                f"registries configuration {main} does not exist",
                hint="check --registries-conf / $CONTAINERS_REGISTRIES_CONF",
            )
        files.append(_parse_file(main))
    for directory in dirs:
        for dropin in _dropins(directory):
            files.append(_parse_file(dropin))

    config = RegistryConfig()
    by_prefix: dict[str, Registry] = {}
    for conf in files:
        for reg in conf.registries:
            by_prefix[reg.prefix] = reg
        if conf.unqualified_search_registries is not None:
            config.unqualified_search_registries = list(conf.unqualified_search_registries)
        if conf.short_name_mode is not None:
            config.short_name_mode = conf.short_name_mode
        config.aliases.update(conf.aliases)
        config.sources.append(conf.path)
        log.debug("loaded registries configuration %s", conf.path)
    config.registries = [by_prefix[p] for p in sorted(by_prefix)]
    return config


# ---------------------------------------------------------------------------------------------
# Matching


def _split_port(host: str) -> str:
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.split(":", 1)[0]


def match_prefix(prefix: str, repository: str) -> int:
    """How many leading characters of `repository` `prefix` matches, or -1.

    A plain prefix matches at a path boundary (``example.com/foo`` matches ``example.com/foo`` and
    ``example.com/foo/bar``, not ``example.com/foobar``; ``example.com`` does not match
    ``example.com:5000``). ``*.example.com`` matches the whole ``host[:port]`` of any subdomain.
    """
    if prefix.startswith("*."):
        host = repository.split("/", 1)[0]
        name = _split_port(host)
        suffix = prefix[1:]
        if name.endswith(suffix) and len(name) > len(suffix):
            return len(host)
        return -1
    if repository == prefix:
        return len(prefix)
    if not repository.startswith(prefix):
        return -1
    nxt = repository[len(prefix)]
    if nxt == "/" or (nxt in ":@" and "/" in prefix):
        return len(prefix)
    return -1


def find_registry(config: RegistryConfig, repository: str) -> Registry | None:
    """The ``[[registry]]`` with the longest prefix matching `repository` (``host[:port]/path``)."""
    best: Registry | None = None
    for reg in config.registries:
        if match_prefix(reg.prefix, repository) != -1 and (best is None or len(reg.prefix) > len(best.prefix)):
            best = reg
    return best


def _rewrite(reg: Registry, endpoint: Endpoint, repository: str) -> tuple[Endpoint, str]:
    n = match_prefix(reg.prefix, repository)
    if not endpoint.location:  # wildcard prefix without location: pull from the host itself
        host = repository.split("/", 1)[0]
        return Endpoint(host, endpoint.insecure, endpoint.pull_from_mirror, endpoint.is_mirror), repository
    return endpoint, endpoint.location + repository[n:]


def pull_endpoints(config: RegistryConfig, repository: str, *, by_digest: bool) -> list[tuple[Endpoint, str]]:
    """Where to pull `repository` (``host[:port]/path``) from, in order: (endpoint, repository there).

    Mirrors come first (``digest-only`` ones only for pulls by digest, ``tag-only`` ones only for
    pulls by tag), then the registry's own location. Raises :class:`BlockedRegistryError` when the
    matching registry is blocked.
    """
    reg = find_registry(config, repository)
    if reg is None:
        return [(Endpoint(location=repository.split("/", 1)[0]), repository)]
    if reg.blocked:
        raise BlockedRegistryError(reg.prefix, reg.source, repository)
    result: list[tuple[Endpoint, str]] = []
    for mirror in reg.mirrors:
        if mirror.pull_from_mirror == "digest-only" and not by_digest:
            continue
        if mirror.pull_from_mirror == "tag-only" and by_digest:
            continue
        result.append(_rewrite(reg, mirror, repository))
    result.append(_rewrite(reg, reg.endpoint, repository))
    return result


def is_insecure(config: RegistryConfig, host: str) -> bool:
    """Whether `host` (``host[:port]``) may be reached over plain HTTP / unverified TLS.

    True if the registry matching `host` is insecure, or any insecure registry or mirror has its
    location on `host`.
    """
    reg = find_registry(config, host)
    if reg is not None and reg.insecure:
        return True
    for r in config.registries:
        if r.insecure and r.location and r.endpoint.host == host:
            return True
        if any(m.insecure and m.host == host for m in r.mirrors):
            return True
    return False


def search_registries(config: RegistryConfig) -> list[str]:
    """The ``unqualified-search-registries``, in order (a copy)."""
    return list(config.unqualified_search_registries)


# ---------------------------------------------------------------------------------------------
# certs.d


def _check_host(host: str) -> None:
    if not host or host in (".", "..") or any(c in host for c in "/\\\0") or host.strip() != host:
        raise UsageError(f"invalid registry host {host!r} for a certs.d lookup")


def cert_dirs(host: str, *, extra: list[str] | None = None) -> list[Path]:
    """Existing per-host certificate directories for `host` (``host[:port]``), best first.

    ``extra`` are certs.d-style roots (each holding ``HOST[:PORT]/`` directories) tried first; then
    ``~/.config/containers/certs.d``, ``/etc/containers/certs.d``, ``/etc/docker/certs.d`` — the
    containers/image order (a rootless user's directory overrides the system's).
    """
    _check_host(host)
    roots = [Path(e).expanduser() for e in extra or []]
    roots.append(Path(os.path.expanduser("~")) / USER_CERTS_DIR)
    roots.extend(SYSTEM_CERTS_DIRS)
    found: list[Path] = []
    for root in roots:
        candidate = root / host
        try:
            if candidate.is_dir() and candidate not in found:
                found.append(candidate)
        except OSError as exc:  # e.g. permission denied on a parent
            log.debug("skipping certs directory %s: %s", candidate, exc)
    return found


def _scan_cert_dir(directory: Path) -> TLSMaterial:
    try:
        names = sorted(p.name for p in directory.iterdir() if p.is_file())
    except PermissionError as exc:
        log.debug("skipping certs directory %s: %s", directory, exc)
        return TLSMaterial(directory=directory)
    except OSError as exc:
        raise UsageError(f"cannot read certificates directory {directory}: {exc.strerror or exc}") from None
    present = set(names)
    ca_files: list[Path] = []
    pairs: list[tuple[Path, Path]] = []
    for name in names:
        if name.endswith(".crt"):
            ca_files.append(directory / name)
        elif name.endswith(".cert"):
            key = name[: -len(".cert")] + ".key"
            if key not in present:
                raise UsageError(
                    f"{directory}: client certificate {name} has no key {key}",
                    hint="CA certificates must use the extension .crt",
                )
            pairs.append((directory / name, directory / key))
        elif name.endswith(".key"):
            cert = name[: -len(".key")] + ".cert"
            if cert not in present:
                raise UsageError(f"{directory}: key {name} has no client certificate {cert}")
    return TLSMaterial(directory=directory, ca_files=ca_files, client_pairs=pairs)


def tls_material(host: str, *, certs_dir: str | None = None) -> TLSMaterial:
    """CA files and client certificate pairs for `host`.

    `certs_dir` (like skopeo's ``--cert-dir``) is the directory itself and must exist; otherwise the
    first directory of :func:`cert_dirs` is used, and none at all gives empty material.
    """
    if certs_dir is not None:
        directory = Path(certs_dir).expanduser()
        if not directory.is_dir():
            raise UsageError(f"certificates directory {directory} does not exist")
        return _scan_cert_dir(directory)
    dirs = cert_dirs(host)
    if not dirs:
        return TLSMaterial()
    return _scan_cert_dir(dirs[0])
