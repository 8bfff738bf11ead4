"""Private content on a shared node (KEP-2535): which digests came in with a volume's own registry
credentials (private markers), which identities a registry confirmed may read them (the access
cache, per HMAC identity, repository and digest, for `--access-ttl`), and the check a publish
passes before its volume is created (:meth:`Access.admit`)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets as _secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..digest import Digest
from ..errors import AuthError
from ..fetch import PullResult
from ..manifest import Descriptor
from ..reference import Reference, parse_any
from ..registry.transport import RegistryOptions
from ..resolve.trace import Selection
from ..sources.factory import open_source
from ..sources.registry import RegistrySource
from ..store import Store
from .attrs import VolumeSpec
from .records import CSI_DIR, read_json, write_bytes_atomic, write_json

log = logging.getLogger("imagevol.csi")

CHECK_CONCURRENCY = 4
"""Private digests of one publish confirmed at the registry at once."""
SAMPLE_BYTES = 4096
"""Size of the slice of a private blob a registry must serve to confirm it holds the blob."""


@dataclass(frozen=True)
class Used:
    """One digest a volume uses: a manifest or index (``manifest``), or a blob."""

    digest: Digest
    manifest: bool
    size: int


def used_digests(sel: Selection) -> list[Used]:
    """Every digest a volume of this selection uses: the root, each index walked, the manifest, its
    config and layers (inline data and empty blobs, which hold nothing private, left out)."""
    out: list[Used] = []
    seen: set[str] = set()

    def add(d: Descriptor, manifest: bool) -> None:
        if d.data is not None or (not manifest and d.size == 0) or str(d.digest) in seen:
            return
        seen.add(str(d.digest))
        out.append(Used(d.digest, manifest, d.size))

    add(sel.root, True)
    for step in sel.steps:
        entry = next((e for e in step.entries if e.position == step.chosen), None) if step.chosen is not None else None
        if entry is not None:
            add(entry.descriptor, True)
    add(sel.descriptor, True)
    for d in (sel.manifest.config, *sel.manifest.layers):
        add(d, False)
    return out


class Access:
    """The private-content gate of one store: markers, the access cache, and the registry check."""

    def __init__(self, store: Store, access_ttl: float) -> None:
        self.store = store
        self.access_ttl = access_ttl
        self._identity_key: bytes | None = None

    @property
    def private_dir(self) -> Path:
        return self.store.root / CSI_DIR / "private"

    def private_marker(self, digest: Digest) -> Path:
        return self.private_dir / f"{digest.algorithm}-{digest.hex}.json"

    def is_private(self, digest: Digest) -> bool:
        return self.private_marker(digest).exists()

    def mark_private(self, used: list[Used]) -> None:
        for u in used:
            marker = self.private_marker(u.digest)
            if not marker.exists():
                write_json(marker, {"digest": str(u.digest), "manifest": u.manifest, "since": time.time()})

    @property
    def allowed_dir(self) -> Path:
        return self.store.root / CSI_DIR / "allowed"

    def identity(self, creds_key: str) -> str:
        """Who asks, for the cache of registry answers: ``node`` (no volume secret: the node's
        auth files), else an HMAC of the secret under the store's own random key."""
        if not creds_key:
            return "node"
        if self._identity_key is None:
            path = self.store.root / CSI_DIR / "identity.key"
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                key = path.read_bytes()
            else:
                key = _secrets.token_bytes(32)
                with os.fdopen(fd, "wb") as f:
                    f.write(key)
                    f.flush()
                    os.fsync(f.fileno())
            if len(key) != 32:  # a torn write (a crash between create and write): a fresh key
                key = _secrets.token_bytes(32)
                write_bytes_atomic(path, key)
            self._identity_key = key
        return hmac.new(self._identity_key, creds_key.encode(), "sha256").hexdigest()

    def allowed_path(self, identity: str, repo: str, digest: Digest) -> Path:
        name = hashlib.sha256(f"{identity}\0{repo}\0{digest}".encode()).hexdigest()[:40]
        return self.allowed_dir / f"{name}.json"

    def is_allowed(self, identity: str, repo: str, digest: Digest) -> bool:
        doc = read_json(self.allowed_path(identity, repo, digest))
        expires = doc.get("expires") if doc else None
        now = time.time()
        # Also refused: an expiry further away than the TTL (a clock set back, a lower --access-ttl).
        return isinstance(expires, int | float) and now < expires <= now + self.access_ttl

    def allow(self, identity: str, repo: str, digest: Digest) -> None:
        if self.access_ttl > 0:
            write_json(self.allowed_path(identity, repo, digest), {"expires": time.time() + self.access_ttl})

    def sample(self, u: Used) -> tuple[int, bytes]:
        n = min(u.size, SAMPLE_BYTES)
        offset = _secrets.randbelow(u.size - n + 1)
        with self.store.open_blob(u.digest) as f:
            f.seek(offset)
            return offset, f.read(n)

    def admit(
        self, spec: VolumeSpec, res: PullResult, used: list[Used], proved: set[str], options: RegistryOptions,
        creds_key: str,
    ) -> None:  # fmt: skip
        """Serve this pull's content to a volume with these credentials only if, for each private
        digest it uses, the registry confirmed them (see the module docs); raises AuthError."""
        private = [u for u in used if self.is_private(u.digest)]
        if not private:
            return
        ref = parse_any(res.reference)
        if not isinstance(ref, Reference):
            raise AuthError(f"{spec.image}: private content can only be checked at a registry", status=403)
        repo = ref.repository
        identity = self.identity(creds_key)
        todo: list[Used] = []
        for u in private:
            if str(u.digest) in proved:  # fetched from the registry with these credentials just now
                self.allow(identity, repo, u.digest)
            elif not self.is_allowed(identity, repo, u.digest):
                todo.append(u)
        if not todo:
            return
        if spec.pull_policy == "never":
            u = todo[0]
            raise AuthError(
                f"{spec.image} uses {'manifest' if u.manifest else 'blob'} {u.digest}, which is in this node's store "
                "only because another volume's registry credentials pulled it; with pullPolicy never the plugin "
                "cannot check that this volume may read it",
                hint='use pullPolicy "missing": the registry is asked once with this volume\'s credentials '
                "(no download)",
                status=403,
            )
        source = open_source(ref, options=options)
        if not isinstance(source, RegistrySource):
            raise AuthError(f"{spec.image}: private content can only be checked at a registry", status=403)

        def confirm(u: Used) -> bool:
            return source.confirm(u.digest, manifest=u.manifest, sample=(0, b"") if u.manifest else self.sample(u))

        answers = [confirm(todo[0])]  # alone first: it settles the auth (a token) the others reuse
        if answers[0] and len(todo) > 1:
            with ThreadPoolExecutor(max_workers=CHECK_CONCURRENCY, thread_name_prefix="csi-check") as pool:
                answers += pool.map(confirm, todo[1:])
        for u, ok in zip(todo, answers, strict=False):
            if not ok:
                raise AuthError(
                    f"{spec.image}: {ref.domain} does not confirm that this volume's credentials may read "
                    f"{'manifest' if u.manifest else 'blob'} {u.digest} in {ref.path}; this node holds that content "
                    "from another volume's registry credentials, and serves it only to volumes the registry lets "
                    "read it",
                    hint=f"the volume's credentials must be able to pull {repo}",
                    status=403,
                )
        for u in todo:
            self.allow(identity, repo, u.digest)
        log.info("pull %s: the registry confirmed %d private digest(s) for this volume", spec.image, len(todo))

    def sweep(self) -> None:
        """At start: drop markers of content gc reclaimed, and expired confirmations."""
        for path in sorted(self.private_dir.glob("*.json")) if self.private_dir.is_dir() else []:
            doc = read_json(path)
            try:
                gone = doc is None or not self.store.has_blob(Digest(str(doc.get("digest"))))
            except Exception:
                gone = True
            if gone:  # reclaimed by gc: nothing left to protect
                path.unlink(missing_ok=True)
        now = time.time()
        for path in sorted(self.allowed_dir.glob("*.json")) if self.allowed_dir.is_dir() else []:
            doc = read_json(path)
            expires = doc.get("expires") if doc else None
            if not isinstance(expires, int | float) or expires <= now:
                path.unlink(missing_ok=True)
