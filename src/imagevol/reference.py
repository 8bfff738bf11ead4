"""Image references: the distribution/reference grammar with Docker normalization, and `oci:` layouts.

Registry references follow github.com/distribution/reference (``ParseNormalizedNamed``)::

    reference := name [":" tag] ["@" digest]
    name      := [domain "/"] path
    domain    := host [":" port]      host: DNS name, IPv4, or "[" IPv6 "]" (no zone)
    path      := component ("/" component)*      at most 255 characters in all
    component := [a-z0-9]+ (("." | "_" | "__" | "-"+) [a-z0-9]+)*
    tag       := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}

The first component is a domain iff a "/" follows it and it contains "." or ":", is "localhost", or has
an uppercase letter. Otherwise the domain is ``docker.io``; Docker Hub names of one component get
``library/``. ``index.docker.io`` becomes ``docker.io``. Stricter than distribution/reference: a port
must be 1-65535, a bracketed IPv6 host must be a real IPv6 address, and a digest must be one imagevol
verifies (:class:`imagevol.digest.Digest`).

Layout references follow skopeo's ``oci:PATH[:TAG]`` plus ``oci:PATH@DIGEST``:

- ``@DIGEST`` is split at the last "@" when what follows looks like a digest (a known algorithm, or
  ``alg:`` and 32+ characters); it is then validated. A digest and a tag together are refused.
- Otherwise the tag is what follows the LAST ":" if it is tag-ish (the registry tag grammar, plus "+")
  and the path before it is not empty; else the whole text is the path. So the path may contain ":"
  only when a tag follows: ``oci:./a:b:c`` is path ``./a:b`` tag ``c``; ``oci:/x:y/z`` is path
  ``/x:y/z``. A trailing ":" means "no tag" (skopeo writes ``dir:``): ``oci:/a:b:`` is path ``/a:b``.
- No tag and no digest: the layout's only manifest (resolved elsewhere).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass, replace

from .digest import ALGORITHMS, Digest
from .errors import InvalidDigestError, InvalidReferenceError

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
DOCKER_HUB_API_DOMAIN = "registry-1.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
MAX_PATH_LENGTH = 255
MAX_TAG_LENGTH = 128
LAYOUT_PREFIX = "oci:"
DOCKER_PREFIX = "docker://"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_LAYOUT_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
_DOMAIN_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")
_IPV6_HOST = re.compile(r"\[([A-Fa-f0-9:]+)\]")
_IMAGE_ID = re.compile(r"[a-f0-9]{64}")
_DIGESTISH = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([A-Za-z0-9=_-]+)")
_SOURCE_INDEX = re.compile(r":@[0-9]+\Z")
_OTHER_TRANSPORTS = (
    "dir:",
    "docker-archive:",
    "docker-daemon:",
    "oci-archive:",
    "containers-storage:",
    "sif:",
    "tarball:",
)

_TAG_RULE = "tags are up to 128 chars of [A-Za-z0-9_.-] not starting with . or -"
_COMPONENT_RULE = (
    "path components are lowercase letters and digits, joined by '.', '_', '__' or dashes (not at the start or end)"
)
_DIGEST_HINT = "a digest is sha256: followed by 64, or sha512: followed by 128, lowercase hex digits"


def _q(s: str) -> str:
    """Quote for messages (escapes control and non-ASCII characters, so nothing hides)."""
    return json.dumps(s)


def _fail(whole: str, what: str, hint: str | None = None) -> InvalidReferenceError:
    return InvalidReferenceError(f"invalid reference {_q(whole)}: {what}", hint)


def _tag_problem(tag: str) -> str | None:
    if _TAG.fullmatch(tag):
        return None
    return f"tag {_q(tag)} is invalid: {_TAG_RULE}"


def _domain_problem(domain: str) -> str | None:
    bad = f"domain {_q(domain)} is invalid"
    if domain.startswith("["):
        end = domain.find("]")
        if end < 0:
            return f"{bad}: '[' without ']'"
        host, port = domain[: end + 1], domain[end + 1 :]
        if port and not port.startswith(":"):
            return f"{bad}: expected ':port' after ']'"
    else:
        host, sep, rest = domain.partition(":")
        port = sep + rest
        if ":" in rest:
            return f"{bad}: an IPv6 address must be in brackets, e.g. [::1]:5000"
    if port:
        digits = port[1:]
        if not (digits.isascii() and digits.isdigit()):
            return f"{bad}: the port must be a number"
        if not 1 <= int(digits) <= 65535:
            return f"{bad}: the port must be 1-65535"
    if host.startswith("["):
        if "%" in host:
            return f"{bad}: IPv6 zone identifiers (%...) are not allowed"
        m = _IPV6_HOST.fullmatch(host)
        if m is None:
            return f"{bad}: a bracketed host must be an IPv6 address"
        try:
            ipaddress.IPv6Address(m.group(1))
        except ValueError:
            return f"{bad}: {host} is not a valid IPv6 address"
        return None
    if not _DOMAIN_NAME.fullmatch(host):
        return f"{bad}: expected a DNS name or IPv4 address with an optional :port"
    return None


def _path_problem(path: str, shown: str | None = None) -> str | None:
    """Why `path` is not a valid repository path (`shown` is the user-written form, for messages)."""
    if re.search(r"[A-Z]", path):
        return f"repository name must be lowercase ({_q(shown if shown is not None else path)})"
    for comp in path.split("/"):
        if not comp:
            return f"repository path {_q(shown or path)} has an empty component (doubled or trailing '/')"
        if not _COMPONENT.fullmatch(comp):
            return f"path component {_q(comp)} is invalid: {_COMPONENT_RULE}"
    if len(path) > MAX_PATH_LENGTH:
        return f"repository path exceeds {MAX_PATH_LENGTH} characters ({len(path)})"
    return None


def _as_digest(value: str, whole: str) -> Digest:
    try:
        return Digest(value)
    except InvalidDigestError as exc:
        msg = exc.message
        if not msg.startswith("invalid digest"):
            msg = f"invalid digest {_q(value)}: {msg}"
        raise _fail(whole, msg, exc.hint or _DIGEST_HINT) from None


@dataclass(frozen=True)
class Reference:
    """A normalized registry reference: ``domain/path[:tag][@digest]``."""

    domain: str
    path: str
    tag: str | None = None
    digest: Digest | None = None

    def __post_init__(self) -> None:
        whole = str(self)
        problem = _domain_problem(self.domain) if self.domain else "the domain is empty"
        problem = problem or _path_problem(self.path)
        if problem is None and self.tag is not None:
            problem = _tag_problem(self.tag)
        if problem is not None:
            raise _fail(whole, problem)
        if self.digest is not None and not isinstance(self.digest, Digest):
            object.__setattr__(self, "digest", _as_digest(self.digest, whole))

    @property
    def repository(self) -> str:
        """``domain/path``, e.g. ``docker.io/library/ubuntu``."""
        return f"{self.domain}/{self.path}"

    @property
    def name(self) -> str:
        """The full repository name (same as :attr:`repository`)."""
        return self.repository

    @property
    def familiar_name(self) -> str:
        """The repository in Docker's short form (``ubuntu``, ``user/app``, ``ghcr.io/o/r``)."""
        if self.domain != DEFAULT_DOMAIN:
            return self.repository
        path = self.path
        if path.startswith(OFFICIAL_REPO_PREFIX) and "/" not in path[len(OFFICIAL_REPO_PREFIX) :]:
            return path[len(OFFICIAL_REPO_PREFIX) :]
        first = path.split("/", 1)[0]
        if is_domain(first):
            return self.repository  # dropping docker.io would make `first` read as a domain
        return path

    def familiar(self) -> str:
        """Docker's short form with tag and digest: ``ubuntu:22.04``, ``user/app@sha256:...``."""
        return self.familiar_name + self._suffix()

    def _suffix(self) -> str:
        s = f":{self.tag}" if self.tag is not None else ""
        return s + (f"@{self.digest}" if self.digest is not None else "")

    def __str__(self) -> str:
        return self.repository + self._suffix()

    def with_tag(self, tag: str) -> Reference:
        """The same reference with `tag` (a digest is kept)."""
        return replace(self, tag=tag)

    def with_digest(self, digest: Digest | str) -> Reference:
        """The same reference pinned to `digest` (a tag is kept)."""
        return replace(self, digest=_as_digest(digest, f"{self.repository}@{digest}"))

    @property
    def is_digested(self) -> bool:
        return self.digest is not None

    @property
    def api_domain(self) -> str:
        """The host to talk to: ``registry-1.docker.io`` for Docker Hub, else :attr:`domain`."""
        return DOCKER_HUB_API_DOMAIN if self.domain == DEFAULT_DOMAIN else self.domain

    @property
    def tag_or_digest(self) -> str | None:
        """What to request from the registry: the digest if pinned, else the tag."""
        return self.digest if self.digest is not None else self.tag


def is_domain(component: str) -> bool:
    """True when a name's first path component (followed by "/") names a registry host.

    distribution/reference's rule, with newer docker/reference's uppercase case: it contains "." or ":", is
    "localhost", or has uppercase letters (a repository path never does). The one place this is decided.
    """
    return component == "localhost" or "." in component or ":" in component or component.lower() != component


def _split_domain(name: str) -> tuple[str, str, str]:
    """Split a name into (domain, normalized path, path as the user wrote it)."""
    first, slash, rest = name.partition("/")
    if slash and is_domain(first):
        domain, remote = first, rest
        if domain == LEGACY_DEFAULT_DOMAIN:
            domain = DEFAULT_DOMAIN
    else:
        domain, remote = DEFAULT_DOMAIN, name
    path = remote
    if domain == DEFAULT_DOMAIN and "/" not in remote:
        path = OFFICIAL_REPO_PREFIX + remote
    return domain, path, remote


def _parse_registry(s: str, whole: str, default_tag: str | None) -> Reference:
    if not s:
        raise _fail(whole, "empty reference", "give a name such as ubuntu:22.04 or ghcr.io/org/repo:tag")
    if _IMAGE_ID.fullmatch(s):
        raise _fail(whole, "64-hex name looks like an image ID; use @sha256:<hex> to pin a digest")
    name, at, dig = s.partition("@")
    digest = _as_digest(dig, whole) if at else None
    tag: str | None = None
    colon = name.rfind(":")
    if "/" not in name and name.startswith("["):
        raise _fail(
            whole,
            f"{_q(name)} is a registry host without a repository path",
            "write [host]:port/repository",
        )
    if colon > name.rfind("/"):
        name, tag = name[:colon], name[colon + 1 :]
        if not tag:
            raise _fail(whole, "empty tag after ':'", "remove the trailing ':' or give a tag")
        if (problem := _tag_problem(tag)) is not None:
            raise _fail(whole, problem)
    if not name:
        raise _fail(whole, "missing repository name", "a reference starts with a name, e.g. ubuntu")
    domain, path, remote = _split_domain(name)
    if not remote:
        raise _fail(whole, f"missing repository path after {_q(domain)}")
    if (problem := _domain_problem(domain)) is not None:
        hint = None
        if "://" in whole:
            hint = "a reference has no URL scheme: write host/repository, not https://host/repository"
        raise _fail(whole, problem, hint)
    if (problem := _path_problem(path, remote)) is not None:
        hint = None
        if "must be lowercase" in problem:
            hint = "only the registry host may contain uppercase letters"
        raise _fail(whole, problem, hint)
    if tag is None and digest is None and default_tag is not None:
        if (problem := _tag_problem(default_tag)) is not None:
            raise _fail(whole, f"default {problem}")
        tag = default_tag
    return Reference(domain=domain, path=path, tag=tag, digest=digest)


def parse_reference(s: str, *, default_tag: str | None = DEFAULT_TAG) -> Reference:
    """Parse and normalize a registry reference (``ubuntu`` -> ``docker.io/library/ubuntu:latest``).

    `default_tag` is used when neither tag nor digest is given (``None``: leave both unset).
    """
    return _parse_registry(s, s, default_tag)


def _digestish(s: str) -> bool:
    m = _DIGESTISH.fullmatch(s)
    return m is not None and (m.group(1) in ALGORITHMS or len(m.group(2)) >= 32)


def _layout_problem(path: str, tag: str | None, digest: str | None) -> str | None:
    if not path:
        return "missing layout path"
    if "\x00" in path:
        return "the layout path contains a NUL byte"
    if tag is not None and digest is not None:
        return f"a layout reference takes a tag or a digest, not both (tag {_q(tag)})"
    if tag is not None and not _LAYOUT_TAG.fullmatch(tag):
        return f"tag {_q(tag)} is invalid: {_TAG_RULE} (or '+')"
    return None


@dataclass(frozen=True)
class LayoutReference:
    """A reference into an OCI image layout directory: ``oci:PATH[:TAG|@DIGEST]``."""

    path: str
    tag: str | None = None
    digest: Digest | None = None

    def __post_init__(self) -> None:
        whole = self._render()
        if (problem := _layout_problem(self.path, self.tag, self.digest)) is not None:
            raise _fail(whole, problem)
        if self.digest is not None and not isinstance(self.digest, Digest):
            object.__setattr__(self, "digest", _as_digest(self.digest, whole))

    def _render(self) -> str:
        s = LAYOUT_PREFIX + self.path
        s += f":{self.tag}" if self.tag is not None else ""
        return s + (f"@{self.digest}" if self.digest is not None else "")

    def __str__(self) -> str:
        s = self._render()
        if self.tag is None and self.digest is None:
            try:
                same = parse_layout_reference(s) == self
            except InvalidReferenceError:
                same = False
            if not same:
                s += ":"  # the path alone would read as PATH:TAG or PATH@DIGEST; ':' keeps it all path
        return s

    @property
    def tag_or_digest(self) -> str | None:
        """The digest if given, else the tag (``None``: the layout's only manifest)."""
        return self.digest if self.digest is not None else self.tag


def _split_layout_tag(rest: str) -> tuple[str, str | None]:
    """Split ``PATH:TAG`` at the last ':' if TAG is tag-ish and PATH is not empty; ``PATH:`` -> PATH."""
    colon = rest.rfind(":")
    if colon <= 0:
        return rest, None
    cand = rest[colon + 1 :]
    if cand == "":
        return rest[:colon], None
    if _LAYOUT_TAG.fullmatch(cand):
        return rest[:colon], cand
    return rest, None


def parse_layout_reference(s: str) -> LayoutReference:
    """Parse ``oci:PATH[:TAG]`` or ``oci:PATH@DIGEST`` (rules in the module docstring)."""
    hint = "write oci:PATH[:TAG] or oci:PATH@DIGEST"
    if not s.startswith(LAYOUT_PREFIX):
        raise _fail(s, "a layout reference starts with 'oci:'", hint)
    rest = s[len(LAYOUT_PREFIX) :]
    if _SOURCE_INDEX.search(rest):
        raise _fail(s, "a source index (:@N) is not supported", "select the manifest with @sha256:<hex>")
    tag: str | None
    digest: Digest | None = None
    at = rest.rfind("@")
    if at >= 0 and _digestish(rest[at + 1 :]):
        digest = _as_digest(rest[at + 1 :], s)
        path, tag = _split_layout_tag(rest[:at])
    else:
        path, tag = _split_layout_tag(rest)
    if (problem := _layout_problem(path, tag, digest)) is not None:
        raise _fail(s, problem, "drop the :tag; the digest alone selects the manifest" if digest else hint)
    return LayoutReference(path=path, tag=tag, digest=digest)


def parse_any(s: str, *, default_tag: str | None = DEFAULT_TAG) -> Reference | LayoutReference:
    """``oci:...`` -> :class:`LayoutReference`; ``docker://REF`` or ``REF`` -> :class:`Reference`."""
    if s.startswith(LAYOUT_PREFIX):
        return parse_layout_reference(s)
    if s.startswith(DOCKER_PREFIX):
        return _parse_registry(s[len(DOCKER_PREFIX) :], s, default_tag)
    for transport in _OTHER_TRANSPORTS:
        if s.startswith(transport):
            raise _fail(
                s,
                f"the {transport!r} transport is not supported",
                "use oci:PATH[:TAG] for a layout directory or docker://REF (or just REF) for a registry",
            )
    return _parse_registry(s, s, default_tag)


# --------------------------------------------------------------------------------------------
# What the runtimes do with a reference (distribution/reference v0.6.0, as containerd 2.1 and
# CRI-O 1.34 link it): a faithful model, used by `explain` and checked against the Go code's own
# answers (tests/truth/reference.json). imagevol's own parser above is deliberately stricter.
# --------------------------------------------------------------------------------------------

_GO_ALNUM = r"[a-z0-9]+"
_GO_SEP = r"(?:[._]|__|[-]+)"
_GO_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_GO_HOST = rf"(?:{_GO_DOMAIN_COMPONENT}(?:\.{_GO_DOMAIN_COMPONENT})*|\[(?:[a-fA-F0-9:]+)\])"
_GO_DOMAIN = _GO_HOST + r"(?::[0-9]+)?"
_GO_TAG = r"[\w][\w.-]{0,127}"
_GO_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][0-9A-Fa-f]{32,}"
_GO_PATH = rf"{_GO_ALNUM}(?:{_GO_SEP}{_GO_ALNUM})*(?:/{_GO_ALNUM}(?:{_GO_SEP}{_GO_ALNUM})*)*"
_GO_NAME = rf"(?:{_GO_DOMAIN}/)?{_GO_PATH}"
_GO_REFERENCE = re.compile(rf"({_GO_NAME})(?::({_GO_TAG}))?(?:@({_GO_DIGEST}))?", re.ASCII)
_GO_ANCHORED_NAME = re.compile(rf"(?:({_GO_DOMAIN})/)?({_GO_PATH})", re.ASCII)
_GO_DIGEST_ANCHORED = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+", re.ASCII)
# go-digest algorithms whose hash the runtimes link (crypto/sha256, crypto/sha512): encoded lengths.
_GO_DIGEST_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}


def _go_digest_problem(d: str) -> str | None:
    """go-digest v1.0.0 Digest.Validate."""
    i = d.find(":")
    if i <= 0 or i + 1 == len(d):
        return "invalid checksum digest format"
    alg, encoded = d[:i], d[i + 1 :]
    if alg not in _GO_DIGEST_LENGTHS:
        if not _GO_DIGEST_ANCHORED.fullmatch(d):
            return "invalid checksum digest format"
        return "unsupported digest algorithm"
    if len(encoded) != _GO_DIGEST_LENGTHS[alg]:
        return "invalid checksum digest length"
    if not re.fullmatch(r"[a-f0-9]+", encoded):
        return "invalid checksum digest format"
    return None


@dataclass(frozen=True)
class RuntimeReference:
    """A reference as distribution/reference parses it: ``ParseNormalizedNamed`` and friends.

    ``error`` is the Go error text when the runtimes refuse it (then the other fields are empty).
    ``string`` is ``String()``, ``familiar`` is ``FamiliarString()``, ``docker_ref`` is
    ``ParseDockerRef(...).String()`` (containerd's CRI: a tag is dropped when a digest is present,
    ``latest`` added when neither is).
    """

    input: str
    error: str | None = None
    domain: str = ""
    path: str = ""
    tag: str = ""
    digest: str = ""

    @property
    def name(self) -> str:
        if self.error is not None:
            return ""
        return f"{self.domain}/{self.path}" if self.domain else self.path

    @property
    def string(self) -> str:
        if self.error is not None:
            return ""
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    @property
    def familiar(self) -> str:
        if self.error is not None:
            return ""
        name = self.name
        if self.domain == DEFAULT_DOMAIN:
            name = self.path
            rest = self.path[len(OFFICIAL_REPO_PREFIX) :]
            if self.path.startswith(OFFICIAL_REPO_PREFIX) and "/" not in rest:
                name = rest
        return name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    @property
    def docker_ref(self) -> str:
        if self.error is not None:
            return ""
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag or DEFAULT_TAG}"

    def to_dict(self) -> dict[str, str | None]:
        return {
            "error": self.error,
            "string": self.string,
            "familiar": self.familiar,
            "dockerRef": self.docker_ref,
            "domain": self.domain,
            "path": self.path,
            "tag": self.tag,
            "digest": self.digest,
        }


def runtime_reference(s: str) -> RuntimeReference:
    """distribution/reference v0.6.0 ``ParseNormalizedNamed(s)`` (what CRI-O and containerd accept)."""
    if re.fullmatch(r"[a-f0-9]{64}", s):
        return RuntimeReference(s, f"invalid repository name ({s}), cannot specify 64-byte hexadecimal strings")
    first, slash, rest = s.partition("/")
    if not slash:
        domain, remainder = DEFAULT_DOMAIN, OFFICIAL_REPO_PREFIX + s
    else:
        if first == LEGACY_DEFAULT_DOMAIN:
            domain, remainder = DEFAULT_DOMAIN, rest
        elif is_domain(first):
            domain, remainder = first, rest
        else:
            domain, remainder = DEFAULT_DOMAIN, s
        if domain == DEFAULT_DOMAIN and "/" not in remainder:
            remainder = OFFICIAL_REPO_PREFIX + remainder
    remote = remainder.split(":", 1)[0]
    if remote.lower() != remote:
        return RuntimeReference(s, f"invalid reference format: repository name ({remote}) must be lowercase")
    whole = f"{domain}/{remainder}"
    m = _GO_REFERENCE.fullmatch(whole)
    if m is None:
        if _GO_REFERENCE.fullmatch(whole.lower()) is not None:
            return RuntimeReference(s, "repository name must be lowercase")
        return RuntimeReference(s, "invalid reference format")
    nm = _GO_ANCHORED_NAME.fullmatch(m.group(1))
    assert nm is not None
    rdomain, rpath = nm.group(1) or "", nm.group(2)
    if len(rpath) > MAX_PATH_LENGTH:
        return RuntimeReference(s, f"repository name must not be more than {MAX_PATH_LENGTH} characters")
    dig = m.group(3) or ""
    if dig and (problem := _go_digest_problem(dig)) is not None:
        return RuntimeReference(s, problem)
    return RuntimeReference(s, None, rdomain, rpath, m.group(2) or "", dig)


def ref_key(ref: Reference | LayoutReference) -> str:
    """The key a reference is recorded under in the store (canonical form; layouts by absolute path)."""
    if isinstance(ref, LayoutReference):
        return str(LayoutReference(os.path.abspath(ref.path), ref.tag, ref.digest))
    return str(ref)
