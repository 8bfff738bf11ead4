"""The content-addressed blob store, its garbage collector and its checker.

Layout under the root ``R`` (``R`` is created with mode 0o700 on first write)::

    R/blobs/<alg>/<hex>        verified blobs, mode 0o444; the path is built only from a validated Digest
    R/ingest/<sha256(key)>/    in-progress writes (see ingest.py); ``put-*.tmp`` files of put_bytes
    R/meta.db                  SQLite metadata (see meta.py)
    R/locks/<name>.lock        named advisory locks (``gc`` ...)
    R/quarantine/<alg>/        blobs that failed fsck, moved aside by ``fsck(repair=True)``

Every blob enters ``blobs/`` the same way: written elsewhere under ``R``, verified, fsynced, made
read-only, renamed into place, and the directory fsynced.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..digest import ALGORITHMS, Digest, Verifier, is_digest
from ..errors import DigestMismatchError, IngestBusyError, InvalidDigestError, NotFoundError, StoreError
from ..fsutil import fsync_dir as _fsync_dir
from ..jsonutil import loads as json_loads
from ..mediatypes import OCI_EMPTY_DATA, OCI_EMPTY_DIGEST
from .ingest import READ_CHUNK, Ingest, remove_ingest_dir
from .locks import FileLock, named_lock
from .meta import Meta

#: Manifests and configs are small; gc follows JSON children of blobs up to this size.
MAX_MANIFEST_BYTES = 4 << 20


def _validated(digest: Digest | str) -> Digest:
    # Digest(...) re-validates any plain string; a Digest instance was validated when it was made.
    if not isinstance(digest, str):
        raise InvalidDigestError(f"digest must be a string, got {type(digest).__name__}")
    return Digest(digest)


class Store:
    """A local content store rooted at ``root``. Safe for concurrent threads and processes."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root: Path = Path(os.path.abspath(os.fspath(root)))
        self._meta: Meta | None = None
        self._meta_pid = 0
        self._mu = threading.Lock()
        self._ready = False

    # -- layout ------------------------------------------------------------------------------------
    @property
    def blobs_dir(self) -> Path:
        return self.root / "blobs"

    @property
    def ingest_dir(self) -> Path:
        return self.root / "ingest"

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    def ensure(self) -> None:
        """Create the root (0o700) and its directories if missing."""
        if self._ready:
            return
        if not self.root.is_dir():
            try:
                self.root.mkdir(mode=0o700, parents=True)
                os.chmod(self.root, 0o700)  # mkdir's mode is filtered by the umask
            except FileExistsError:
                pass
        if not self.root.is_dir():
            raise StoreError(f"store root {self.root} is not a directory")
        for d in (self.blobs_dir, self.ingest_dir, self.locks_dir):
            d.mkdir(mode=0o700, exist_ok=True)
        self._ready = True

    def blob_path(self, digest: Digest) -> Path:
        """``R/blobs/<alg>/<hex>``; raises InvalidDigestError before building anything from a bad digest."""
        d = _validated(digest)
        path = self.blobs_dir / d.algorithm / d.hex
        # Defence in depth: a validated digest cannot escape, but never trust that silently.
        if os.path.commonpath([path, self.blobs_dir]) != str(self.blobs_dir):
            raise InvalidDigestError(f"digest {d!r} would leave the store")
        return path

    # -- reading -----------------------------------------------------------------------------------
    def has_blob(self, digest: Digest, size: int | None = None) -> bool:
        try:
            st = os.stat(self.blob_path(digest), follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        return size is None or st.st_size == size

    def blob_size(self, digest: Digest) -> int:
        try:
            return os.stat(self.blob_path(digest), follow_symlinks=False).st_size
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in the store") from None

    def open_blob(self, digest: Digest) -> BinaryIO:
        """Open a blob for reading; NotFoundError if it is absent."""
        path = self.blob_path(digest)
        try:
            # O_NONBLOCK: a FIFO put in place of a blob must not block the open (OCI layouts: the same).
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in the store", hint="pull the image first") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise StoreError(
                f"blob {digest} in the store is not a regular file (mode {st.st_mode:o})",
                hint="run `imagevol fsck --repair`, then pull again",
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def read_blob(self, digest: Digest, max_size: int) -> bytes:
        """Read a small blob (manifest, config) whole and verify it against its digest."""
        d = _validated(digest)
        with self.open_blob(d) as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_size:
                raise StoreError(f"blob {d} is {size} bytes, more than the {max_size} allowed here")
            data = f.read(max_size + 1)
        if len(data) > max_size:
            raise StoreError(f"blob {d} is more than the {max_size} bytes allowed here")
        v = Verifier(d)
        v.update(data)
        if not v.verified():
            raise DigestMismatchError(
                f"stored blob {d} is corrupted: it hashes to {v.digest()}",
                hint="run `imagevol fsck --repair`, then pull again",
            )
        return data

    def iter_blobs(self) -> Iterator[tuple[Digest, int]]:
        """(digest, size) of every well-named regular file under ``blobs/``."""
        for alg in sorted(ALGORITHMS):
            d = self.blobs_dir / alg
            try:
                names = sorted(os.listdir(d))
            except FileNotFoundError:
                continue
            for name in names:
                if not is_digest(f"{alg}:{name}"):
                    continue
                try:
                    st = os.stat(d / name, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield Digest(f"{alg}:{name}"), st.st_size

    # -- writing -----------------------------------------------------------------------------------
    def put_bytes(self, data: bytes, expected: Digest | None = None) -> Digest:
        """Store ``data``; verify it against ``expected`` if given. Idempotent; returns the digest."""
        exp = _validated(expected) if expected is not None else None
        alg = exp.algorithm if exp is not None else "sha256"
        got = Digest(f"{alg}:{hashlib.new(alg, data).hexdigest()}")
        if exp is not None and got != exp:
            raise DigestMismatchError(
                f"content does not match its digest: expected {exp}, got {got} ({len(data)} bytes)",
                hint="the source served wrong or corrupted bytes; nothing was stored",
            )
        target = self.blob_path(got)
        if self.has_blob(got, len(data)):
            return got
        self.ensure()
        tmp = self.ingest_dir / f"put-{os.getpid()}-{threading.get_ident()}-{os.urandom(6).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            try:
                view = memoryview(data)
                while len(view):
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                os.fchmod(fd, 0o444)
            finally:
                os.close(fd)
            target.parent.mkdir(mode=0o700, exist_ok=True)
            os.rename(tmp, target)
            _fsync_dir(target.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return got

    def ingest(self, digest: Digest, size: int, *, blocking: bool = True) -> Ingest:
        """Start or resume writing one blob; holds its ingest lock until commit/abort/close.

        A second process asking for the same digest blocks until the first is done; then its Ingest
        has ``already_present`` True (and ``has_blob()`` is True) if the first committed.
        With ``blocking=False`` a busy ingest raises StoreError instead.
        """
        d = _validated(digest)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise StoreError(f"invalid size {size!r} for blob {d}")
        directory = self.ingest_dir / hashlib.sha256(str(d).encode()).hexdigest()
        if self.has_blob(d, size):
            return Ingest(self, d, size, directory, None)
        self.ensure()
        directory.mkdir(mode=0o700, exist_ok=True)
        lock = FileLock(directory / "lock", recheck=True)
        if not lock.acquire(blocking):
            raise IngestBusyError(
                f"blob {d.short} is being downloaded by another process",
                hint="wait for the other pull to finish",
            )
        try:
            return Ingest(self, d, size, directory, lock)
        except BaseException:
            lock.release()
            raise

    def remove_blob(self, digest: Digest) -> bool:
        """Delete a blob (callers make sure nothing needs it: see gc)."""
        try:
            self.blob_path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    # -- metadata and locks ------------------------------------------------------------------------
    @property
    def meta(self) -> Meta:
        with self._mu:
            if self._meta is None or self._meta_pid != os.getpid():
                self.ensure()
                self._meta = Meta(self.root / "meta.db")
                self._meta_pid = os.getpid()
            return self._meta

    def lock(self, name: str, *, shared: bool = False, blocking: bool = True) -> contextlib.AbstractContextManager:
        """Named advisory lock ``R/locks/<name>.lock`` (exclusive unless ``shared``).

        gc takes ``lock("gc")`` exclusively; a pull that must not race gc holds ``lock("gc", shared=True)``.
        """
        self.ensure()
        return named_lock(self.locks_dir, name, shared=shared, blocking=blocking)

    @contextlib.contextmanager
    def hold(self, digests: Iterable[Digest], *, kind: str = "pull", name: str | None = None) -> Iterator[str]:
        """Keep `digests` (and what they reference) from gc while the block runs: the gc lock shared
        (gc waits) plus a lease naming them, removed on the way out. Yields the lease's name."""
        lease = name or f"{kind}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        with self.lock("gc", shared=True):
            self.meta.add_lease(lease, list(digests), kind=kind, pid=os.getpid())
            try:
                yield lease
            finally:
                self.meta.remove_lease(lease)

    def close(self) -> None:
        with self._mu:
            if self._meta is not None:
                self._meta.close()
                self._meta = None

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"


# -- garbage collection ----------------------------------------------------------------------------
@dataclass
class GcResult:
    removed: list[Digest] = field(default_factory=list)
    bytes_freed: int = 0
    kept: int = 0
    removed_ingests: list[str] = field(default_factory=list)
    ingest_bytes_freed: int = 0
    expired_leases: list[str] = field(default_factory=list)
    removed_snapshots: list[str] = field(default_factory=list)
    removed_builds: list[str] = field(default_factory=list)
    dry_run: bool = False


def _json_children(store: Store, digest: Digest) -> list[Digest]:
    """Descriptors named by a manifest/index blob (config, layers, manifests), if it is one."""
    try:
        if store.blob_size(digest) > MAX_MANIFEST_BYTES:
            return []
        with store.open_blob(digest) as f:
            if f.read(64).lstrip()[:1] != b"{":
                return []  # not JSON: a layer, not worth reading whole
        doc = json_loads(store.read_blob(digest, MAX_MANIFEST_BYTES))
    except (NotFoundError, StoreError, ValueError, UnicodeDecodeError):
        return []
    if not isinstance(doc, dict):
        return []
    descs: list[object] = []
    if isinstance(doc.get("config"), dict):
        descs.append(doc["config"])
    for key in ("layers", "manifests"):
        if isinstance(doc.get(key), list):
            descs.extend(doc[key])
    out = []
    for desc in descs:
        if isinstance(desc, dict) and isinstance(desc.get("digest"), str) and is_digest(desc["digest"]):
            out.append(Digest(desc["digest"]))
    return out


def reachable(store: Store, roots: set[Digest]) -> set[Digest]:
    """Everything reachable from ``roots`` through recorded children and manifest JSON."""
    meta = store.meta
    marked: set[Digest] = set()
    stack = list(roots)
    while stack:
        d = stack.pop()
        if d in marked:
            continue
        marked.add(d)
        kids = set(meta.children(d))
        kids.update(_json_children(store, d))
        stack.extend(k for k in kids if k not in marked)
    return marked


def _ingest_age(path: Path) -> float:
    """Seconds since the last write to an ingest (its files other than the lock, else the entry)."""
    newest = 0.0
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            for name in os.listdir(path):
                if name == "lock":  # taking the lock (gc probing it, too) rewrites it: not activity
                    continue
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, os.stat(path / name, follow_symlinks=False).st_mtime)
        if not newest:
            newest = os.stat(path, follow_symlinks=False).st_mtime
    return time.time() - newest


def _disk_usage(path: Path) -> int:
    total = 0
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            for name in os.listdir(path):
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(path / name, follow_symlinks=False).st_blocks * 512
        else:
            total = os.stat(path, follow_symlinks=False).st_blocks * 512
    return total


def _format1_snapshot(key: str) -> bool:
    """A snapshot keyed by the bare manifest digest hex: built before snapshots kept their declared
    modes (materialize.SNAPSHOT_FORMAT 1, write bits stripped). Never reused, so reclaimed even
    while its manifest is kept."""
    return len(key) in (64, 128) and all(c in "0123456789abcdef" for c in key)


def gc(
    store: Store,
    *,
    dry_run: bool = False,
    ingest_max_age: float = 24 * 3600.0,
    blocking: bool = True,
    remove_snapshot: Callable[[str, bool], int | None] | None = None,
) -> GcResult:
    """Remove blobs nothing needs, and stale ingests.

    Roots: refs, non-expired leases, volumes' manifests, and snapshots that are building or used by a
    volume; everything reachable from them (recorded children, and the descriptors of manifest JSON)
    is kept. Ingests untouched for ``ingest_max_age`` seconds whose lock is free are removed.
    ``remove_snapshot(key, dry_run)`` (from the materializer) deletes unused snapshots of manifests
    that are not kept and returns the bytes freed (None when the snapshot is busy).
    Holds ``store.lock("gc")`` exclusively throughout.
    """
    store.ensure()
    result = GcResult(dry_run=dry_run)
    with store.lock("gc", blocking=blocking):
        meta = store.meta
        leases = meta.leases()
        roots: set[Digest] = {r.digest for r in meta.list_refs()}
        for lease in leases:
            if lease.expired:
                result.expired_leases.append(lease.id)
            else:
                roots.update(lease.roots)
        volumes = meta.list_volumes()
        used_snapshots = {v.snapshot_key for v in volumes if v.snapshot_key}
        roots.update(v.digest for v in volumes)
        for snap in meta.list_snapshots():
            if snap.digest is not None and (snap.state != "ready" or snap.key in used_snapshots):
                roots.add(snap.digest)
        marked = reachable(store, roots)
        if remove_snapshot is not None:
            # Snapshots no volume uses and whose manifest is not kept go first (their files may be
            # hard links to the blobs swept below).
            for snap in meta.list_snapshots():
                if snap.state != "ready" or snap.key in used_snapshots:
                    continue
                if snap.digest is not None and snap.digest in marked and not _format1_snapshot(snap.key):
                    continue
                freed = remove_snapshot(snap.key, dry_run)
                if freed is not None:
                    result.removed_snapshots.append(snap.key)
                    result.bytes_freed += freed

        for digest, size in list(store.iter_blobs()):
            if digest in marked:
                result.kept += 1
                continue
            if dry_run or store.remove_blob(digest):
                result.removed.append(digest)
                result.bytes_freed += size
        if not dry_run:
            if result.removed:
                for alg in {d.algorithm for d in result.removed}:
                    _fsync_dir(store.blobs_dir / alg)
                meta.remove_children_of(result.removed)
            for lease_id in result.expired_leases:
                meta.remove_lease(lease_id)

        try:
            entries = sorted(os.listdir(store.ingest_dir))
        except FileNotFoundError:
            entries = []
        for name in entries:
            path = store.ingest_dir / name
            if _ingest_age(path) < ingest_max_age:
                continue
            usage = _disk_usage(path)
            if path.is_dir() and not path.is_symlink():
                lock = FileLock(path / "lock", recheck=True)
                if not lock.acquire(blocking=False):
                    continue  # a live writer holds it
                try:
                    if not dry_run:
                        remove_ingest_dir(path)
                finally:
                    lock.release()
            elif name.startswith("put-") and name.endswith(".tmp"):
                if not dry_run:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            else:
                continue
            result.removed_ingests.append(name)
            result.ingest_bytes_freed += usage
    return result


# -- fsck ------------------------------------------------------------------------------------------
@dataclass
class FsckResult:
    checked: int = 0
    bytes_checked: int = 0
    corrupted: list[Digest] = field(default_factory=list)
    unreadable: list[Digest] = field(default_factory=list)
    wrong_perms: list[Digest] = field(default_factory=list)
    stray_files: list[str] = field(default_factory=list)
    missing_children: list[tuple[Digest, Digest]] = field(default_factory=list)
    incomplete: list[tuple[Digest, Digest]] = field(default_factory=list)  # informational
    dangling_refs: list[str] = field(default_factory=list)
    quarantined: list[Digest] = field(default_factory=list)
    fixed_perms: list[Digest] = field(default_factory=list)
    removed_refs: list[str] = field(default_factory=list)
    removed_children_of: list[Digest] = field(default_factory=list)
    restored: list[Digest] = field(default_factory=list)  # blobs rebuilt from what every manifest holds inline
    # Snapshots (filled by imagevol.mount.fsck from imagevol.materialize.check_snapshots): key -> the
    # problems found; keys without a record; damaged ones a volume uses (key -> targets); dropped.
    snapshots_checked: int = 0
    damaged_snapshots: dict[str, list[str]] = field(default_factory=dict)
    unverifiable_snapshots: list[str] = field(default_factory=list)
    snapshots_in_use: dict[str, list[str]] = field(default_factory=dict)
    dropped_snapshots: list[str] = field(default_factory=list)
    repaired: bool = False

    @property
    def ok(self) -> bool:
        """Nothing was found wrong (before any repair)."""
        return not (
            self.corrupted
            or self.unreadable
            or self.wrong_perms
            or self.stray_files
            or self.missing_children
            or self.dangling_refs
            or self.damaged_snapshots
        )

    @property
    def problems_left(self) -> list[str]:
        """What is still wrong after this run (everything found, without a repair)."""
        fixed = set(self.quarantined) | set(self.fixed_perms) | set(self.removed_refs) | set(self.dropped_snapshots)
        left = [f"blob {d}" for d in (*self.corrupted, *self.unreadable, *self.wrong_perms) if d not in fixed]
        left += [f"stray {p}" for p in self.stray_files]
        left += [
            f"missing {kid} (child of {parent})" for parent, kid in self.missing_children if kid not in self.restored
        ]
        left += [f"ref {r}" for r in self.dangling_refs if r not in fixed]
        left += [f"snapshot {k}" for k in self.damaged_snapshots if k not in fixed]
        return left


def _hash_path(path: Path, digest: Digest) -> Verifier:
    v = Verifier(digest)
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := os.readv(fd, [view]):
            v.update(view[:n])
    finally:
        os.close(fd)
    return v


def fsck(store: Store, *, repair: bool = False) -> FsckResult:
    """Re-hash every blob and check the metadata against the blobs.

    Reports corrupted (hash mismatch), unreadable and wrongly-permissioned blobs, stray files under
    ``blobs/``, refs whose blob is missing or bad, and recorded children missing from the store.
    ``repair=True`` moves bad blobs to ``R/quarantine/<alg>/``, restores 0o444, and drops refs and
    children rows that name missing blobs (under ``store.lock("gc")``).
    """
    result = FsckResult(repaired=repair)
    if not store.blobs_dir.is_dir():
        return result
    guard = store.lock("gc") if repair else contextlib.nullcontext()
    with guard:
        for alg_dir in sorted(store.blobs_dir.iterdir()):
            if alg_dir.name not in ALGORITHMS or not alg_dir.is_dir() or alg_dir.is_symlink():
                result.stray_files.append(str(alg_dir.relative_to(store.root)))
                continue
            for name in sorted(os.listdir(alg_dir)):
                path = alg_dir / name
                if not is_digest(f"{alg_dir.name}:{name}"):
                    result.stray_files.append(str(path.relative_to(store.root)))
                    continue
                digest = Digest(f"{alg_dir.name}:{name}")
                try:
                    st = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    result.stray_files.append(str(path.relative_to(store.root)))
                    continue
                result.checked += 1
                try:
                    v = _hash_path(path, digest)
                except OSError:
                    result.unreadable.append(digest)
                    bad = True
                else:
                    result.bytes_checked += v.size
                    bad = not v.verified()
                    if bad:
                        result.corrupted.append(digest)
                if bad:
                    if repair:
                        qdir = store.quarantine_dir / digest.algorithm
                        qdir.mkdir(mode=0o700, parents=True, exist_ok=True)
                        os.rename(path, qdir / f"{digest.hex}.{time.time_ns()}")
                        result.quarantined.append(digest)
                    continue
                if stat.S_IMODE(st.st_mode) != 0o444:
                    result.wrong_perms.append(digest)
                    if repair:
                        os.chmod(path, 0o444)
                        result.fixed_perms.append(digest)

        meta = store.meta
        for ref in meta.list_refs():
            if not store.has_blob(ref.digest):
                result.dangling_refs.append(ref.ref)
                if repair and meta.remove_ref(ref.ref):
                    result.removed_refs.append(ref.ref)
        dangling_parents = []
        table = meta.all_children()
        # Only content a reference or a volume holds claims to be complete; children missing under
        # anything else are an interrupted pull's leftovers (resumable, reclaimed by gc), not damage.
        held: set[Digest] = set()
        todo = [r.digest for r in meta.list_refs()] + [v.digest for v in meta.list_volumes()]
        while todo:
            d = todo.pop()
            if d not in held:
                held.add(d)
                todo.extend(table.get(d, []))
        for parent, kids in table.items():
            if not store.has_blob(parent):
                dangling_parents.append(parent)
                continue
            for kid in kids:
                if not store.has_blob(kid):
                    (result.missing_children if parent in held else result.incomplete).append((parent, kid))
                    if repair and kid == OCI_EMPTY_DIGEST and kid not in result.restored:
                        # The empty descriptor's content is known; pulls before the inline config
                        # was stored recorded it as a child without storing it.
                        store.put_bytes(OCI_EMPTY_DATA, Digest(OCI_EMPTY_DIGEST))
                        result.restored.append(kid)
        if repair and dangling_parents:
            meta.remove_children_of(dangling_parents)
            result.removed_children_of.extend(dangling_parents)
    return result
