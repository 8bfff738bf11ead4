"""Turn a verified manifest into a read-only snapshot directory, once.

A manifest is materialized into ``R/snapshots/<key>`` (``key`` = the manifest digest's hex, plus a
short suffix when non-default options change the result, see :func:`snapshot_key`). The tree is
built in ``R/snapshots/.build-<key>-<random>`` under the file lock ``store.lock("snapshot-<key>")``,
sealed read-only and renamed into place atomically; a second caller (thread or process) waits on
the lock and reuses the result. A crash leaves only a ``.build-*`` directory, removed by the next
call. Facts about a snapshot (file count, warnings, what each layer became) are kept beside it in
``R/snapshots/.info-<key>.json`` so a reuse costs no tree walk. What it holds (every entry's path,
type, mode, size, owner, and each file's content digest) is recorded at build time in
``R/snapshots/.record-<key>.json``; ``imagevol fsck`` checks the tree against it
(:func:`check_snapshots`, docs/architecture.md). A ``.build-*`` leftover that cannot be removed
never fails another build, and gc removes those no builder holds (:func:`clean_stale_builds`).

How a manifest becomes files depends on its flavour (:func:`imagevol.manifest.flavour`):

``image``
    Layers applied in order with the safe applier (whiteouts honoured). Each layer's uncompressed
    stream is hashed as the applier reads it and must equal the config's ``rootfs.diff_ids`` entry
    (DigestMismatchError otherwise; the snapshot is discarded).
``artifact`` (OCI / ORAS)
    One file per layer at its title (``org.opencontainers.image.title``, else
    ``org.cncf.model.filepath``, else ``org.cnai.model.filepath``). Untitled layers typed tar /
    tar+gzip / tar+zstd (that are tars) are extracted at the volume root, where an image layer would
    go (CRI-O skips them); other untitled layers are skipped with a warning, as CRI-O does, or named
    by their digest hex with ``name_untitled="digest"``. If every layer is skipped, the mount fails
    (ContentRefusedError) instead of giving an empty volume. Raw files
    are HARD LINKS to the verified blob (zero copies; blobs are 0o444, so the file is read-only);
    across filesystems they are copied. Layers typed tar / tar+gzip / tar+zstd, or annotated
    ``io.deis.oras.content.unpack: "true"``, are extracted as the directory named by their title
    (whiteouts refused); a tar-typed layer whose first block is not a tar header (ORAS labels raw
    files ``...layer.v1.tar``) is placed as a file instead.
``modelpack`` (CNCF ModelPack)
    ``.raw`` layers hard-linked at ``org.cncf.model.filepath``; ``.tar[+gzip|+zstd]`` layers
    extracted so that their entries land at the file path. The mode of
    ``org.cncf.model.file.metadata+json`` is honoured for raw files: a hard link shares the blob's
    0o444 inode, so a file whose read-only mode is not 0o444 (executable, or owner-only) is copied
    and chmod-ed instead of linked.
``kitops`` (KitOps ModelKit)
    Layers ``application/vnd.kitops.modelkit.<type>.v1.<tar|raw>[+gzip|+zstd]``. Each layer is
    matched to its Kitfile entry by the ``digest`` the Kitfile records (KitOps >= 0.5), else by the
    order of entries of that type (older ModelKits, as ``kit unpack`` does); the entry's path is
    what the layer provides (``Snapshot.contents``). Tars are extracted at the snapshot root when
    their entries carry the full path (current kit), else under the entry's directory (older kit).
``docker-model`` (Docker Model Runner)
    Files at ``org.cncf.model.filepath`` when present, else the runtime-bundle names Docker uses:
    ``model.gguf`` (several: ``model-00001-of-0000N.gguf`` in layer order), ``model.safetensors``
    (likewise), ``model.mmproj``, ``template.jinja``, ``model.dduf``, ``LICENSE``
    (``LICENSE-00001-of-0000N``); ``dir.tar`` / ``vllm.config.tar`` layers are extracted at the
    root; any other type is named by its digest hex.

Where a tar layer belongs to a path ``P`` (title / file path), its first entry decides: entries
that start with ``P`` are extracted at the root (ORAS directories, current modctl and kit), entries
that start with ``P``'s last component under ``P``'s parent (older modctl and kit), anything else
inside ``P`` as a directory.

Every tar goes through :func:`imagevol.unpack.applier.apply_layer`; every other write resolves its
path one component at a time with ``O_NOFOLLOW`` from a descriptor of the build directory, so a
symlink made by an earlier layer is never followed: a title through a symlink is refused. A file
layer whose path an earlier layer already provides is refused (UnsafeContentError) rather than
silently shadowing it; tar layers merge into existing directories and replace what they overwrite,
as the applier does for image layers.

Files and directories keep the modes their layers declare (a 0640 file is 0640, a 0750 directory
0750, the root 0755 unless a layer declares ``./``), as the runtimes' overlay mounts show them;
read-only comes from the volume's mount, and the tree lies under the 0700 store root. Hard-linked
raw blobs are 0o444. Volumes never expose a snapshot's inodes writable (:mod:`imagevol.volume`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import logging
import os
import queue
import re
import stat
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from .. import mediatypes as mt
from ..digest import Digest
from ..errors import (
    ContentRefusedError,
    DigestMismatchError,
    ImagevolError,
    InvalidDigestError,
    ManifestError,
    StoreError,
    UnsafeContentError,
    UsageError,
)
from ..fsutil import fsync_dir as _fsync_dir
from ..jsonutil import loads as json_loads
from ..manifest import MAX_CONFIG_SIZE, Descriptor, Manifest, parse_config
from ..manifest import flavour as manifest_flavour
from ..store import Store
from ..unpack.applier import MAX_DEPTH, PATH_MAX, ApplyOptions, apply_layer, clean_path
from ..unpack.compression import open_decompressed

__all__ = [
    "LayerFeed",
    "MaterializeOptions",
    "Snapshot",
    "SnapshotCheck",
    "check_snapshots",
    "clean_stale_builds",
    "copy_fd",
    "find_snapshot",
    "force_rmtree",
    "materialize",
    "read_record",
    "remove_snapshot",
    "snapshot_key",
    "snapshots_dir",
    "verify_snapshot",
    "write_record",
]

log = logging.getLogger(__name__)

SNAPSHOTS = "snapshots"
BUILD_PREFIX = ".build-"
INFO_PREFIX = ".info-"
RECORD_PREFIX = ".record-"
#: Version of the snapshot record format (docs/architecture.md, "Snapshot records").
RECORD_VERSION = 1
#: Files at least this large are hashed for the record as the applier writes them (smaller ones are
#: read again from the page cache when the record is written).
HASH_AS_WRITTEN_MIN = 1 << 20
UNTITLED_POLICIES = ("skip", "digest")
NAME_MAX = 255
CHUNK = 1 << 20
PROBE_LIMIT = 16 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_KEY_RE = re.compile(r"^[0-9a-f]{64}(?:[0-9a-f]{64})?(?:-[0-9a-f]{12})?$")
_MODELPACK_RE = re.compile(r"^application/vnd\.cncf\.model\.([a-z]+(?:\.[a-z]+)?)\.v1\.(raw|tar)(?:\+([a-z-]+))?$")
_KITOPS_RE = re.compile(r"^application/vnd\.kitops\.modelkit\.(\w+)\.v1\.(\w+)(?:\+([\w-]+))?$")
_COMPRESSIONS = {None: "none", "": "none", "none": "none", "gzip": "gzip", "gzip-fastest": "gzip", "zstd": "zstd"}

# ORAS: digest of the uncompressed tar of a directory layer.
ANN_ORAS_DIGEST = "io.deis.oras.content.digest"
# KitOps: code-typed layers that hold prompts.
ANN_KIT_SUBTYPE = "ml.kitops.modelkit.layer-subtype"

# Docker Model Runner layer types.
DOCKER_AI_GGUF = "application/vnd.docker.ai.gguf.v3"
DOCKER_AI_SAFETENSORS = "application/vnd.docker.ai.safetensors"
DOCKER_AI_LICENSE = "application/vnd.docker.ai.license"
DOCKER_AI_MMPROJ = "application/vnd.docker.ai.mmproj"
DOCKER_AI_CHAT_TEMPLATE = "application/vnd.docker.ai.chat.template.jinja"
DOCKER_AI_DDUF = "application/vnd.docker.ai.dduf"
DOCKER_AI_DIR_TAR = "application/vnd.docker.ai.dir.tar"
DOCKER_AI_VLLM_CONFIG_TAR = "application/vnd.docker.ai.vllm.config.tar"
#: Runtime-bundle names of Docker Model Runner: media type -> (stem, extension).
DOCKER_AI_NAMES: dict[str, tuple[str, str]] = {
    DOCKER_AI_GGUF: ("model", ".gguf"),
    DOCKER_AI_SAFETENSORS: ("model", ".safetensors"),
    DOCKER_AI_MMPROJ: ("model", ".mmproj"),
    DOCKER_AI_CHAT_TEMPLATE: ("template", ".jinja"),
    DOCKER_AI_DDUF: ("model", ".dduf"),
    DOCKER_AI_LICENSE: ("LICENSE", ""),
}
DOCKER_AI_TARS = frozenset({DOCKER_AI_DIR_TAR, DOCKER_AI_VLLM_CONFIG_TAR})


@dataclass
class MaterializeOptions:
    """How to materialize.

    name_untitled: artifact layers without a title: ``"skip"`` them with a warning (CRI-O), or name
        the file by the layer's digest hex (``"digest"``).
    apply: policies of the layer applier (None: its defaults). Artifact tar layers always run with
        whiteouts refused.
    """

    name_untitled: str = "skip"
    apply: ApplyOptions | None = None

    def __post_init__(self) -> None:
        if self.name_untitled not in UNTITLED_POLICIES:
            raise UsageError(
                f"invalid name_untitled policy {self.name_untitled!r}",
                hint="name_untitled must be one of: " + ", ".join(UNTITLED_POLICIES),
            )


@dataclass
class Snapshot:
    """A materialized manifest: a read-only directory tree.

    contents: layer digest -> where the layer went ("/" for image layers and tars extracted at the
        root, the file or directory path otherwise, for KitOps the Kitfile path it provides, None if
        skipped).
    """

    key: str
    path: Path
    digest: Digest
    flavour: str
    files: int
    warnings: list[str] = field(default_factory=list)
    created: bool = True
    contents: dict[str, str | None] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Keys and locations


def _apply_fields(opts: ApplyOptions) -> dict[str, Any]:
    """The applier options that change the resulting tree (the size limits only refuse)."""
    d = dataclasses.asdict(opts)
    d.pop("max_ratio", None)
    d.pop("max_size", None)
    d.pop("max_entries", None)
    return d


def _untitled_layers(manifest: Manifest, fl: str) -> bool:
    if fl in ("artifact", "modelpack"):
        return any(_layer_path(layer, fl) is None for layer in manifest.layers)
    return False


# What a snapshot tree looks like; a new value gives every snapshot a new key, so trees built the
# old way are never reused (gc reclaims them). 2: declared modes kept (1, unkeyed: write bits stripped).
SNAPSHOT_FORMAT = 2


def snapshot_key(manifest: Manifest, options: MaterializeOptions | None = None) -> str:
    """The snapshot's name: the manifest digest's hex, plus ``-<12 hex>`` of the tree format
    (:data:`SNAPSHOT_FORMAT`) and the non-default options that change the result
    (``name_untitled="digest"`` with untitled layers present, or applier policies that differ from
    the defaults)."""
    opts = options if options is not None else MaterializeOptions()
    fl = manifest_flavour(manifest)
    tweaks: dict[str, Any] = {"format": SNAPSHOT_FORMAT}
    if opts.name_untitled != "skip" and _untitled_layers(manifest, fl):
        tweaks["untitled"] = opts.name_untitled
    elif fl == "artifact" and any(
        _layer_path(x, fl) is None and mt.layer_compression(x.media_type) is not None for x in manifest.layers
    ):
        tweaks["untitled-tar"] = "root"  # extracted at the root since issue 14 (skipped before)
    if opts.apply is not None:
        given = _apply_fields(opts.apply)
        if given != _apply_fields(ApplyOptions()):
            tweaks["apply"] = given
    suffix = hashlib.sha256(json.dumps(tweaks, sort_keys=True).encode()).hexdigest()[:12]
    return f"{manifest.digest.hex}-{suffix}"


def snapshots_dir(store: Store) -> Path:
    """``R/snapshots`` (created, mode 0o700)."""
    store.ensure()
    d = store.root / SNAPSHOTS
    with contextlib.suppress(FileExistsError):
        d.mkdir(mode=0o700)
    if d.is_symlink() or not d.is_dir():
        raise StoreError(f"{d} is not a directory")
    return d


def _lock_name(key: str) -> str:
    name = f"snapshot-{key}"
    if len(name) > 128:
        name = "snapshot-" + hashlib.sha256(key.encode()).hexdigest()[:48]
    return name


def _info_path(snaps: Path, key: str) -> Path:
    return snaps / f"{INFO_PREFIX}{key}.json"


def _record_path(snaps: Path, key: str) -> Path:
    return snaps / f"{RECORD_PREFIX}{key}.json"


def remove_snapshot(store: Store, key: str, *, dry_run: bool = False) -> int | None:
    """Delete the snapshot `key` (its tree, info file and record) unless it is being built right
    now; returns the bytes its files took (hard links to blobs count nothing), or None if busy.
    Callers (gc) make sure no volume uses it."""
    snaps = snapshots_dir(store)
    try:
        with store.lock(_lock_name(key), blocking=False):
            path = snaps / key
            freed = 0
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                fd = os.open(path, _DIR_FLAGS)
                try:
                    for _, _, st in _walk_fd(fd):
                        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                            freed += st.st_blocks * 512
                finally:
                    os.close(fd)
            if not dry_run:
                # Out of sight first (record, info, name), then delete: a kill mid-delete leaves a
                # `.build-*` leftover the next materialize sweeps, never a partial snapshot in use.
                store.meta.remove_snapshot(key)
                with contextlib.suppress(FileNotFoundError):
                    _info_path(snaps, key).unlink()
                with contextlib.suppress(FileNotFoundError):
                    _record_path(snaps, key).unlink()
                doomed = snaps / f"{BUILD_PREFIX}{key}-gc{os.urandom(4).hex()}"
                try:
                    os.rename(path, doomed)
                except FileNotFoundError:
                    return freed
                _fsync_dir(snaps)
                force_rmtree(doomed)
            return freed
    except StoreError:
        return None


from ..fstree import _open_for_removal, _rmtree_at, _seal, _walk_fd, _walk_tree, copy_fd, count_files, force_rmtree  # noqa: E402,F401

# --------------------------------------------------------------------------------------------------
# Snapshot records: what a snapshot holds, written at build time, checked by fsck

#: Entry types of a record.
_TYPES = (
    (stat.S_ISREG, "file"),
    (stat.S_ISDIR, "dir"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISCHR, "chr"),
    (stat.S_ISBLK, "blk"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "sock"),
)


def _type_of(st: os.stat_result) -> str:
    for test, name in _TYPES:
        if test(st.st_mode):
            return name
    return "other"


def _hash_at(dfd: int, name: str, algorithm: str = "sha256") -> str:
    """``algorithm:hex`` of the regular file ``name`` of ``dfd`` (never following a symlink)."""
    h = hashlib.new(algorithm)
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
    try:
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := os.readv(fd, [view]):
            h.update(view[:n])
    finally:
        os.close(fd)
    return f"{algorithm}:{h.hexdigest()}"


def _entry(dfd: int, rel: str, name: str, st: os.stat_result, content: str | None) -> list[Any]:
    """One record entry: ``[path, type, mode, size, uid, gid, extra]``; ``extra`` is the content
    digest of a file, the target of a symlink, ``major:minor`` of a device, else None."""
    typ = _type_of(st)
    extra: str | None = None
    size = 0
    if typ == "file":
        size = st.st_size
        extra = content
    elif typ == "symlink":
        extra = os.fsdecode(os.readlink(name, dir_fd=dfd))
    elif typ in ("chr", "blk"):
        extra = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return [rel, typ, stat.S_IMODE(st.st_mode), size, st.st_uid, st.st_gid, extra]


def _blob_inode(store: Store, digest: str) -> tuple[int, int] | None:
    try:
        st = os.stat(store.blob_path(Digest(digest)), follow_symlinks=False)
    except (OSError, ImagevolError):
        return None
    return st.st_dev, st.st_ino


def _record_entries(
    store: Store,
    root_fd: int,
    known: dict[tuple[int, int], str],
    hashed: dict[tuple[int, int], tuple[str, int]] | None = None,
) -> Iterator[list[Any]]:
    """The record of the tree at ``root_fd``: every entry below it and then its root (``"."``),
    children first, names sorted (:func:`_walk_tree`'s order, :func:`_record_order`). Regular files
    carry their content digest: for a hard link to a verified blob (an inode in ``known`` that is
    still the blob's) the blob's digest; for a file hashed as it was written (``hashed``: inode ->
    (digest, size), when the size still agrees) that digest; for anything else the sha256 of its
    bytes, read once per inode. Nothing is kept per entry but for files with several links."""
    linked: dict[tuple[int, int], str] = {}
    for dfd, rel, name, st in _walk_tree(root_fd):
        content = None
        if stat.S_ISREG(st.st_mode):
            ino = (st.st_dev, st.st_ino)
            content = linked.get(ino) if st.st_nlink > 1 else None
            if content is None:
                blob = known.get(ino)
                done = hashed.get(ino) if hashed is not None else None
                if blob is not None and _blob_inode(store, blob) == ino:
                    content = blob
                elif done is not None and done[1] == st.st_size:
                    content = done[0]
                else:
                    content = _hash_at(dfd, name)
                if st.st_nlink > 1:
                    linked[ino] = content
        yield _entry(dfd, rel, name, st, content)
    yield _entry(root_fd, ".", ".", os.fstat(root_fd), None)


def write_record(path: Path, header: dict[str, Any], entries: Iterable[list[Any]]) -> int:
    """Write a snapshot record to ``path`` atomically, one JSON document per line: ``header``
    (version, key, manifest digest), every entry, then ``{"end": count}``; streamed, so memory does
    not grow with the number of entries. Returns the number of entries."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, _NEW_FILE, 0o600)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="ascii", buffering=1 << 20) as f:
            f.write(json.dumps(header, sort_keys=True) + "\n")
            for e in entries:
                f.write(json.dumps(e, separators=(",", ":")) + "\n")
                count += 1
            f.write(json.dumps({"end": count}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return count


def read_record(path: Path, key: str) -> tuple[dict[str, Any], Iterator[list[Any]]] | None:
    """The header of the record at ``path`` and an iterator over its entries (read as iterated;
    ValueError from the iterator for a malformed line or a record cut short). None if there is no
    record; ValueError if its header is not a record of snapshot ``key``."""
    try:
        f = open(path, encoding="ascii")  # noqa: SIM115 - closed by the iterator
    except FileNotFoundError:
        return None
    try:
        header = json.loads(f.readline())
    except (ValueError, UnicodeDecodeError):
        f.close()
        raise ValueError("not a snapshot record") from None
    if not isinstance(header, dict) or header.get("version") != RECORD_VERSION or header.get("key") != key:
        f.close()
        raise ValueError(f"not a version-{RECORD_VERSION} record of this snapshot")

    def entries() -> Iterator[list[Any]]:
        with f:
            for count, line in enumerate(f):
                try:
                    e = json.loads(line)
                except (ValueError, UnicodeDecodeError):
                    raise ValueError(f"malformed entry on line {count + 2}") from None
                if isinstance(e, dict) and set(e) == {"end"}:
                    if e["end"] != count or f.readline():
                        raise ValueError("entry count does not match")
                    return
                if not (isinstance(e, list) and len(e) == 7 and isinstance(e[0], str)):
                    raise ValueError(f"malformed entry on line {count + 2}")
                yield e
            raise ValueError("the record is cut short")

    return header, entries()


def _record_order(rel: str) -> tuple[tuple[int, str], ...]:
    """Sort key of :func:`_walk_tree`'s order: names sorted, a directory after its children, the
    root (``"."``) last."""
    if rel == ".":
        return ((1, ""),)
    return (*((0, c) for c in rel.split("/")), (1, ""))


@dataclass
class SnapshotCheck:
    """What :func:`check_snapshots` found. ``damaged``: key -> the first problems found;
    ``unverifiable``: snapshots without a record (built before records existed); ``in_use``: damaged
    snapshots a volume still uses (not dropped: they cannot be rebuilt under a live mount);
    ``dropped``: damaged (or, on repair, unverifiable and unused) snapshots removed so that the next
    mount rebuilds them."""

    checked: int = 0
    files_hashed: int = 0
    bytes_hashed: int = 0
    damaged: dict[str, list[str]] = field(default_factory=dict)
    unverifiable: list[str] = field(default_factory=list)
    in_use: dict[str, list[str]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    @property
    def problems_left(self) -> list[str]:
        """Damaged snapshots still in the store."""
        return [k for k in self.damaged if k not in self.dropped]


_MAX_DETAILS = 20


def verify_snapshot(
    store: Store,
    key: str,
    *,
    quick: bool = False,
    trusted: Callable[[str, tuple[int, int]], bool] | None = None,
    stats: SnapshotCheck | None = None,
) -> list[str] | None:
    """Compare the snapshot ``key`` with its record: missing and extra entries, a changed type,
    mode, size, owner or symlink target, and (unless ``quick``) the content digest of every regular
    file. ``trusted(digest, (dev, ino))`` may vouch for a file without reading it (a hard link to a
    blob that was just verified). The tree and the record are read side by side in one order, so
    memory does not grow with the number of entries. Returns the problems found ([] clean; the
    first _MAX_DETAILS and a count of the rest), None without a record."""
    snaps = store.root / SNAPSHOTS
    try:
        found = read_record(_record_path(snaps, key), key)
    except (OSError, ValueError) as e:
        return [f"record unreadable: {e}"]
    if found is None:
        return None
    _, record = found
    problems: list[str] = []
    more = 0
    hashed: dict[tuple[int, int], str] = {}

    def note(msg: str) -> None:
        nonlocal more
        if len(problems) < _MAX_DETAILS:
            problems.append(msg)
        else:
            more += 1

    def compare(exp: list[Any], dfd: int, rel: str, name: str, st: os.stat_result) -> None:
        got = _entry(dfd, rel, name, st, None)
        for i, what in ((1, "type"), (2, "mode"), (3, "size"), (4, "uid"), (5, "gid")):
            if got[i] != exp[i]:
                shown = (oct(exp[i]), oct(got[i])) if what == "mode" else (exp[i], got[i])
                note(f"changed: {rel}: {what} {shown[0]} -> {shown[1]}")
                return
        if got[1] in ("symlink", "chr", "blk") and got[6] != exp[6]:
            note(f"changed: {rel}: target {exp[6]!r} -> {got[6]!r}")
        elif got[1] == "file" and not quick:
            ino = (st.st_dev, st.st_ino)
            if isinstance(exp[6], str) and trusted is not None and trusted(exp[6], ino):
                return
            digest = hashed.get(ino)
            if digest is None:
                try:
                    alg = Digest(exp[6]).algorithm if isinstance(exp[6], str) else "sha256"
                except InvalidDigestError:
                    alg = "sha256"
                digest = _hash_at(dfd, name, alg)
                if st.st_nlink > 1:
                    hashed[ino] = digest
                if stats is not None:
                    stats.files_hashed += 1
                    stats.bytes_hashed += st.st_size
            if digest != exp[6]:
                note(f"content: {rel}: {exp[6]} -> {digest}")

    try:
        root_fd = os.open(snaps / key, _DIR_FLAGS)
    except OSError as e:
        return [f"snapshot directory unreadable: {e.strerror}"]
    try:
        walk = itertools.chain(_walk_tree(root_fd), [(root_fd, ".", ".", os.fstat(root_fd))])
        exp = next(record, None)
        got = next(walk, None)
        while exp is not None or got is not None:
            if got is None or (exp is not None and _record_order(exp[0]) < _record_order(got[1])):
                assert exp is not None
                note(f"missing: {exp[0]}")
                exp = next(record, None)
            elif exp is None or _record_order(got[1]) < _record_order(exp[0]):
                note(f"extra: {got[1]}")
                got = next(walk, None)
            else:
                compare(exp, *got)
                exp = next(record, None)
                got = next(walk, None)
    except ValueError as e:
        return [f"record unreadable: {e}"]
    except OSError as e:
        note(f"walk failed: {e.strerror or e}: {e.filename or ''}".rstrip(": "))
    finally:
        os.close(root_fd)
        record.close()
    if more:
        problems.append(f"... and {more} more")
    return problems


def snapshot_keys(store: Store) -> list[str]:
    """The keys of the snapshots in ``R/snapshots`` (directories with a snapshot key as name)."""
    snaps = store.root / SNAPSHOTS
    try:
        names = sorted(os.listdir(snaps))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for name in names:
        if _KEY_RE.match(name):
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISDIR(os.stat(snaps / name, follow_symlinks=False).st_mode):
                    out.append(name)
    return out


def check_snapshots(
    store: Store,
    *,
    repair: bool = False,
    quick: bool = False,
    trusted: Callable[[str, tuple[int, int]], bool] | None = None,
) -> SnapshotCheck:
    """Check every snapshot against its record (:func:`verify_snapshot`). With ``repair``, a damaged
    snapshot no volume uses is dropped the way gc drops one (record and info first, then renamed to
    ``.build-*`` and deleted), so the next mount rebuilds it; so is an unused snapshot without a
    record (rebuilt with one). A damaged snapshot a volume uses is reported in ``in_use`` and kept:
    unmount the volume, then repair again. Stale ``.build-*`` directories are removed too."""
    res = SnapshotCheck()
    guard = store.lock("gc") if repair else contextlib.nullcontext()
    with guard:
        users: dict[str, list[str]] = {}
        for v in store.meta.list_volumes():
            if v.snapshot_key:
                users.setdefault(v.snapshot_key, []).append(v.target)
        for key in snapshot_keys(store):
            problems = verify_snapshot(store, key, quick=quick, trusted=trusted, stats=res)
            res.checked += 1
            if problems is None:
                res.unverifiable.append(key)
                if repair and key not in users and remove_snapshot(store, key) is not None:
                    res.dropped.append(key)
                continue
            if not problems:
                continue
            res.damaged[key] = problems
            if key in users:
                res.in_use[key] = users[key]
            elif repair and remove_snapshot(store, key) is not None:
                res.dropped.append(key)
        if repair:
            clean_stale_builds(store)
    return res


# --------------------------------------------------------------------------------------------------
# Paths and tar probing


def _layer_path(layer: Descriptor, fl: str) -> str | None:
    """The path annotation of a layer: for ModelPack the file path first, else the OCI title first."""
    keys = (
        (mt.ANN_CNCF_FILEPATH, mt.ANN_CNAI_FILEPATH, mt.ANN_TITLE)
        if fl == "modelpack"
        else (mt.ANN_TITLE, mt.ANN_CNCF_FILEPATH, mt.ANN_CNAI_FILEPATH)
    )
    for k in keys:
        v = layer.annotations.get(k)
        if v:
            return v
    return None


def _check_limits(path: str, what: str) -> None:
    """The limits the applier puts on tar entry paths, for titles, ModelPack and Kitfile paths:
    at most PATH_MAX - 1 bytes and MAX_DEPTH components (UnsafeContentError)."""
    try:
        size = len(os.fsencode(path))
    except UnicodeEncodeError:
        raise UnsafeContentError(f"{what}: path {path!r} is not valid Unicode (a lone surrogate)") from None
    if size >= PATH_MAX:
        raise UnsafeContentError(
            f"{what}: path {path[:60]!r}... is {size} bytes long, the limit is {PATH_MAX - 1}",
            hint="titles and file paths of artifacts are held to the limits of image layer paths",
        )
    if path.count("/") >= MAX_DEPTH and len([c for c in path.split("/") if c not in ("", ".")]) > MAX_DEPTH:
        raise UnsafeContentError(
            f"{what}: path {path[:60]!r}... has more than {MAX_DEPTH} components",
            hint="titles and file paths of artifacts are held to the limits of image layer paths",
        )


def _precheck_paths(manifest: Manifest) -> None:
    """Refuse an over-long or over-deep title / file path annotation before anything is built."""
    for i, layer in enumerate(manifest.layers):
        for k in (mt.ANN_TITLE, mt.ANN_CNCF_FILEPATH, mt.ANN_CNAI_FILEPATH):
            v = layer.annotations.get(k)
            if isinstance(v, str) and v:
                _check_limits(v, f"layer {i} ({layer.digest.short}, {layer.media_type or 'no media type'}): {k}")


def safe_parts(path: str, what: str, *, normalize: bool = False) -> list[str]:
    """Split a title / file path into components, refusing anything that could escape.

    Refused (UnsafeContentError): empty, NUL, absolute, longer than the applier's PATH_MAX - 1 bytes
    or deeper than its MAX_DEPTH components, a ``..`` component, and — unless
    ``normalize`` — empty or ``.`` components (one trailing ``/`` is tolerated) and the bare ``.``.
    With ``normalize`` (Kitfile paths), ``./`` components are dropped and ``.`` means the root.
    """
    if not isinstance(path, str) or not path:
        raise UnsafeContentError(f"{what}: empty path")
    if "\0" in path:
        raise UnsafeContentError(f"{what}: path {path!r} contains a NUL byte")
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise UnsafeContentError(f"{what}: path {path!r} is not valid Unicode (a lone surrogate)") from None
    if path.startswith("/"):
        raise UnsafeContentError(f"{what}: path {path!r} is absolute", hint="paths must be relative to the volume")
    _check_limits(path, what)
    parts = path.split("/")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    out: list[str] = []
    for c in parts:
        if normalize and c in ("", "."):
            continue
        if c == "..":
            raise UnsafeContentError(f"{what}: path {path!r} has a '..' component", hint="it would escape the volume")
        if c in ("", "."):
            raise UnsafeContentError(f"{what}: path {path!r} has an empty or '.' component")
        if len(os.fsencode(c)) > NAME_MAX:
            raise UnsafeContentError(f"{what}: path {path[:80]!r}... has a component longer than {NAME_MAX} bytes")
        out.append(c)
    if not out and not normalize:
        raise UnsafeContentError(f"{what}: path {path!r} names the volume root itself")
    return out


def _octal(field_: bytes) -> int | None:
    s = field_.replace(b"\0", b" ").strip()
    if not s:
        return None
    try:
        return int(s, 8)
    except ValueError:
        return None


def looks_like_tar(block: bytes) -> bool:
    """True if ``block`` (the first 512 bytes of a stream) is a valid tar header: its checksum
    matches (ustar, GNU and v7 headers all carry one). An all-zero block (an empty archive) is not
    taken for a tar: such a layer is placed as a file."""
    if len(block) < 512 or not block.strip(b"\0"):
        return False
    stored = _octal(block[148:156])
    if stored is None:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:512])
    signed = unsigned - 256 * sum(1 for b in block[:148] if b > 127) - 256 * sum(1 for b in block[156:512] if b > 127)
    return stored in (unsigned, signed)


def _tar_base(parts: list[str], first: list[str]) -> list[str]:
    """Where a tar that belongs to path ``parts`` is extracted, from its first entry's components."""
    if not parts:
        return []
    if first[: len(parts)] == parts or (first and len(first) < len(parts) and parts[: len(first)] == first):
        return []  # entries carry the full path (the first entry may be a parent directory of it)
    if first[:1] == parts[-1:]:
        return parts[:-1]  # entries carry the last component
    return parts  # entries are the directory's content


def _read_upto(f: BinaryIO, n: int) -> bytes:
    """`n` bytes of `f`, fewer only at its end (raw streams may hand out less per read)."""
    parts: list[bytes] = []
    got = 0
    while got < n and (data := f.read(n - got)):
        parts.append(data)
        got += len(data)
    return b"".join(parts)


class _Tee:
    """A read-only stream that hashes what passes through it. The hashing runs in a thread of its
    own (hashlib releases the GIL on large buffers), so on two cores it overlaps decompression and
    writing instead of adding to them; small reads are batched, and at most a few MiB wait."""

    BATCH = 256 << 10

    def __init__(self, f: BinaryIO, hasher: Any | None) -> None:
        self._f = f
        self._h = hasher
        self.size = 0
        self._buf = bytearray()
        self._q: queue.Queue[bytes | None] | None = None
        self._thread: threading.Thread | None = None
        if hasher is not None:
            self._q = queue.Queue(maxsize=8)
            self._thread = threading.Thread(target=self._run, name="imagevol-diffid", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self._q is not None
        while (item := self._q.get()) is not None:
            self._h.update(item)

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if data and self._q is not None:
            if len(data) >= self.BATCH and not self._buf:
                self._q.put(data)
            else:
                self._buf += data
                if len(self._buf) >= self.BATCH:
                    self._q.put(bytes(self._buf))
                    self._buf.clear()
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    def close(self) -> None:
        """Stop the hashing thread (idempotent); called on every path out of the layer."""
        if self._thread is not None and self._q is not None:
            if self._buf:
                self._q.put(bytes(self._buf))
                self._buf.clear()
            self._q.put(None)
            self._thread.join()
            self._thread = None

    def hexdigest(self) -> str:
        assert self._h is not None
        self.close()
        return self._h.hexdigest()


class _FileHashes:
    """sha256 of every file the applier writes, for the snapshot record, computed from the data as
    it is written (no re-read), in a thread of its own (hashlib releases the GIL on large buffers,
    so on two cores it overlaps decompression and writing). ``done[(dev, ino)] = (digest, size)``
    once :meth:`finish` has returned."""

    def __init__(self) -> None:
        self.done: dict[tuple[int, int], tuple[str, int]] = {}
        # Inodes given a sink so far (main thread): a small file reusing one must reset it.
        self._given: set[tuple[int, int]] = set()
        # (inode, data): None starts a file (a reused inode forgets its earlier file), b"" ends it.
        self._q: queue.Queue[tuple[tuple[int, int], bytes | None] | None] = queue.Queue(maxsize=16)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        open_: dict[tuple[int, int], tuple[Any, int]] = {}
        while (item := self._q.get()) is not None:
            if self._error is not None:
                continue
            ino, data = item
            try:
                if data is None:
                    self.done.pop(ino, None)
                    open_[ino] = (hashlib.sha256(), 0)
                elif not data:
                    h, size = open_.pop(ino)
                    self.done[ino] = (f"sha256:{h.hexdigest()}", size)
                else:
                    h, size = open_[ino]
                    h.update(data)
                    open_[ino] = (h, size + len(data))
            except BaseException as e:  # reported by finish()
                self._error = e

    def _put(self, item: tuple[tuple[int, int], bytes | None]) -> None:
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="imagevol-record-hash", daemon=True)
            self._thread.start()
        self._q.put(item)

    def sink(self, fd: int, size: int) -> _FileSink | None:
        """A sink for the new file `fd` of `size` bytes; None (nothing kept) below
        HASH_AS_WRITTEN_MIN: small files are hashed again when the record is written, so what is
        kept here grows with the bytes written, not with the number of files."""
        st = os.fstat(fd)
        ino = (st.st_dev, st.st_ino)
        if size < HASH_AS_WRITTEN_MIN:
            if ino in self._given:
                self._put((ino, None))  # a reused inode forgets its earlier file
                self._given.discard(ino)
            return None
        self._given.add(ino)
        self._put((ino, None))
        return _FileSink(self, ino)

    def forget(self, fd: int) -> None:
        """`fd` is a new file not hashed as written: forget what an earlier file of its inode had."""
        st = os.fstat(fd)
        ino = (st.st_dev, st.st_ino)
        if ino in self._given:
            self._put((ino, None))
            self._given.discard(ino)

    def finish(self) -> None:
        """Wait until everything written so far is hashed (idempotent; the thread ends)."""
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error


class _FileSink:
    __slots__ = ("_hashes", "_ino")

    def __init__(self, hashes: _FileHashes, ino: tuple[int, int]) -> None:
        self._hashes = hashes
        self._ino = ino

    def update(self, data: bytes) -> None:
        if data:
            self._hashes._put((self._ino, data))

    def close(self) -> None:
        self._hashes._put((self._ino, b""))


# --------------------------------------------------------------------------------------------------
# The builder


class LayerFeed(Protocol):
    """Where the builder finds blobs that may still be downloading (extraction while pulling)."""

    def wait(self, digest: Digest) -> None:
        """Return once the blob is in the store; raise why it will not be."""

    def open(self, layer: Descriptor) -> AbstractContextManager[BinaryIO]:
        """The layer's bytes, in order: as they download, or from the store."""
        ...


class _Builder:
    def __init__(
        self,
        store: Store,
        manifest: Manifest,
        root: Path,
        opts: MaterializeOptions,
        warn: Callable[[str], None] | None,
        feed: LayerFeed | None = None,
    ) -> None:
        self.store = store
        self.feed = feed
        self.m = manifest
        self.opts = opts
        self._warn_cb = warn
        self.warnings: list[str] = []
        self.contents: dict[str, str | None] = {}
        self.image_opts = opts.apply if opts.apply is not None else ApplyOptions()
        self.artifact_opts = dataclasses.replace(self.image_opts, whiteouts=False)
        self.root_fd = os.open(root, _DIR_FLAGS)
        os.fchmod(self.root_fd, 0o755)  # the root's mode unless a layer declares `./`
        #: (st_dev, st_ino) -> digest of the files that are hard links to verified blobs, whose
        #: content the snapshot record takes from the blob's name instead of reading them.
        self.known: dict[tuple[int, int], str] = {}
        self.hashes = _FileHashes()

    def _know(self, pfd: int, name: str, digest: Digest) -> None:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        self.known[(st.st_dev, st.st_ino)] = str(digest)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.hashes.finish()
        os.close(self.root_fd)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        if self._warn_cb is not None:
            self._warn_cb(msg)

    @staticmethod
    def _what(i: int, layer: Descriptor) -> str:
        return f"layer {i} ({layer.digest.short}, {layer.media_type or 'no media type'})"

    # -- primitives

    def _open_dir(self, parts: list[str], what: str) -> int:
        """Open (creating as needed, 0o755) the directory ``parts`` below the root, following nothing."""
        fd = os.dup(self.root_fd)
        try:
            for i, c in enumerate(parts):
                try:
                    nfd = os.open(c, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(c, 0o755, dir_fd=fd)
                    nfd = os.open(c, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(nfd, 0o755)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafeContentError(
                            f"{what}: {'/'.join(parts[: i + 1])!r} is a symbolic link or not a directory",
                            hint="a path of an artifact may not pass through a symlink or a file of another layer",
                        ) from None
                    raise
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _claim(self, pfd: int, name: str, what: str, path: str) -> None:
        try:
            os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        raise UnsafeContentError(
            f"{what}: {path!r} is already provided by an earlier layer",
            hint="an artifact may name each file only once",
        )

    def place_raw(
        self,
        layer: Descriptor,
        parts: list[str],
        what: str,
        *,
        mode: int | None = None,
        compression: str = "none",
    ) -> None:
        """The blob as the file ``parts``: a hard link, or a copy (other file system, a ``mode``
        other than 0o444, or a compressed blob, which is decompressed)."""
        path = "/".join(parts)
        pfd = self._open_dir(parts[:-1], what)
        try:
            name = parts[-1]
            self._claim(pfd, name, what, path)
            if mode is None and compression == "none":
                try:
                    os.link(self.store.blob_path(layer.digest), name, dst_dir_fd=pfd, follow_symlinks=False)
                    self._know(pfd, name, layer.digest)
                    return
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES, errno.EOPNOTSUPP):
                        raise
            self._copy_blob(layer, pfd, name, 0o444 if mode is None else mode, compression, what)
        finally:
            os.close(pfd)

    def _copy_blob(self, layer: Descriptor, pfd: int, name: str, mode: int, compression: str, what: str) -> None:
        dfd = os.open(name, _NEW_FILE, 0o600, dir_fd=pfd)
        try:
            self.hashes.forget(dfd)  # not hashed as copied
            with self.store.open_blob(layer.digest) as f:
                if compression == "none":
                    copy_fd(f.fileno(), dfd)
                else:
                    opts = self.artifact_opts
                    data = open_decompressed(f, compression, max_ratio=opts.max_ratio, max_size=opts.max_size)
                    while chunk := data.read(CHUNK):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(dfd, view) :]
            os.fchmod(dfd, mode)
        finally:
            os.close(dfd)

    def apply(
        self,
        layer: Descriptor,
        dir_fd: int,
        compression: str | None,
        options: ApplyOptions,
        what: str,
        expect: Digest | None = None,
    ) -> None:
        """Apply a tar layer onto the directory ``dir_fd``; verify its uncompressed digest if given."""
        opened = self.feed.open(layer) if self.feed is not None else self.store.open_blob(layer.digest)
        with opened as f:
            data = open_decompressed(f, compression, max_ratio=options.max_ratio, max_size=options.max_size)
            tee = _Tee(data, expect.hasher() if expect is not None else None)
            try:
                apply_layer(
                    f"/proc/self/fd/{dir_fd}",
                    tee,
                    compression="none",
                    options=options,
                    warn=self.warn,
                    file_sink=self.hashes.sink,
                )
                tee.drain()
            except UnsafeContentError as e:
                raise UnsafeContentError(f"{what}: {e.message}", e.hint) from None
            except ContentRefusedError as e:
                raise type(e)(f"{what}: {e.message}", e.hint) from None
            finally:
                tee.close()
        if expect is not None:
            got = f"{expect.algorithm}:{tee.hexdigest()}"
            if got != expect:
                raise DigestMismatchError(
                    f"{what}: uncompressed content does not match its diff_id: expected {expect}, got {got}",
                    hint="the image's config and layers disagree; the snapshot was discarded",
                )

    def probe_tar(self, layer: Descriptor, compression: str | None) -> tuple[bool, list[str]]:
        """(is it a tar, components of its first named entry) — reads only the first headers."""
        try:
            with self.store.open_blob(layer.digest) as f:
                head = _read_upto(open_decompressed(f, compression), 512)
        except ContentRefusedError:
            return False, []
        if not looks_like_tar(head):
            return False, []
        # The probe inflates at most PROBE_LIMIT bytes (a huge first member must not be inflated
        # just to find the next header); the extraction itself runs under the configured limits.
        limit = PROBE_LIMIT if self.artifact_opts.max_size is None else min(PROBE_LIMIT, self.artifact_opts.max_size)
        try:
            with (
                self.store.open_blob(layer.digest) as f,
                tarfile.open(
                    fileobj=open_decompressed(f, compression, max_ratio=self.artifact_opts.max_ratio, max_size=limit),
                    mode="r|",
                ) as tf,
            ):
                for i, member in enumerate(tf):
                    parts = clean_path(member.name)
                    if parts:
                        return True, parts
                    if i >= 64:
                        break
        except (tarfile.TarError, ContentRefusedError, UnicodeError, ValueError, EOFError):
            pass
        return True, []

    def extract_for(
        self,
        layer: Descriptor,
        parts: list[str],
        first: list[str],
        compression: str | None,
        what: str,
        expect: Digest | None = None,
    ) -> list[str]:
        base = [] if layer.annotations.get(mt.ANN_IMAGEVOL_ROOT) == "true" else _tar_base(parts, first)
        fd = self._open_dir(base, what)
        try:
            self.apply(layer, fd, compression, self.artifact_opts, what, expect)
        finally:
            os.close(fd)
        return base

    def untitled(self, i: int, layer: Descriptor, what: str) -> list[str] | None:
        if self.opts.name_untitled == "digest":
            return [layer.digest.hex]
        self.warn(f"{what} has no title annotation: skipped (CRI-O does the same)")
        self.contents[str(layer.digest)] = None
        return None

    # -- flavours

    def image(self) -> None:
        if self.feed is not None:
            self.feed.wait(self.m.config.digest)
        cfg = parse_config(
            self.store.read_blob(self.m.config.digest, MAX_CONFIG_SIZE), f"config {self.m.config.digest.short}"
        )
        if len(cfg.diff_ids) != len(self.m.layers):
            raise ManifestError(
                f"image {self.m.digest.short} has {len(self.m.layers)} layers but its config lists "
                f"{len(cfg.diff_ids)} diff_ids",
                hint="the manifest and config disagree; the image is malformed",
            )
        for i, (layer, diff_id) in enumerate(zip(self.m.layers, cfg.diff_ids, strict=True)):
            what = self._what(i, layer)
            if layer.media_type == mt.DOCKER_LAYER:
                comp: str | None = None  # Docker's plain type is sometimes compressed: sniff
            else:
                comp = mt.layer_compression(layer.media_type)
                if comp is None:
                    raise ContentRefusedError(
                        f"{what}: unsupported image layer media type",
                        hint="imagevol applies tar, tar+gzip and tar+zstd layers (OCI and Docker)",
                    )
            self.apply(layer, self.root_fd, comp, self.image_opts, what, diff_id)
            self.contents[str(layer.digest)] = "/"

    def _is_tar_typed(self, layer: Descriptor) -> bool:
        return (
            mt.layer_compression(layer.media_type) is not None
            or layer.annotations.get(mt.ANN_ORAS_UNPACK, "").lower() == "true"
        )

    def generic(self, i: int, layer: Descriptor, path: str | None) -> None:
        """An OCI / ORAS artifact layer: a file at its title, or a directory if it is a tar."""
        what = self._what(i, layer)
        parts = safe_parts(path, f"{what}: title") if path is not None else self.untitled(i, layer, what)
        if parts is None:
            return
        if self._is_tar_typed(layer):
            comp = mt.layer_compression(layer.media_type)
            is_tar, first = self.probe_tar(layer, comp)
            if is_tar:
                expect = None
                raw = layer.annotations.get(ANN_ORAS_DIGEST)
                if raw:
                    try:
                        expect = Digest(raw)
                    except InvalidDigestError:
                        self.warn(f"{what}: ignoring invalid {ANN_ORAS_DIGEST} annotation {raw!r}")
                self.extract_for(layer, parts, first, comp, what, expect)
                self.contents[str(layer.digest)] = "/".join(parts)
                return
            if comp not in (None, "none"):
                self.warn(f"{what}: typed as a compressed tar but is not one: placed as a file")
        self.place_raw(layer, parts, what)
        self.contents[str(layer.digest)] = "/".join(parts)

    def artifact(self) -> None:
        for i, layer in enumerate(self.m.layers):
            path = _layer_path(layer, "artifact")
            if path is None and self.opts.name_untitled == "skip" and self.untitled_tar(i, layer):
                continue
            self.generic(i, layer, path)
        if self.m.layers and all(self.contents.get(str(x.digest)) is None for x in self.m.layers):
            raise ContentRefusedError(
                f"artifact {self.m.digest.short}: every layer was skipped ({len(self.m.layers)} without "
                "org.opencontainers.image.title, none of them a tar): the volume would be empty",
                hint="annotate each layer with org.opencontainers.image.title, or mount with --name-untitled "
                "digest to name the files by their digests",
            )

    def untitled_tar(self, i: int, layer: Descriptor) -> bool:
        """An untitled tar / tar+gzip / tar+zstd artifact layer is extracted at the volume root, where
        an image layer would go (CRI-O skips it). False when it is not tar-typed or not a tar."""
        comp = mt.layer_compression(layer.media_type)
        if comp is None:
            return False
        is_tar, _first = self.probe_tar(layer, comp)
        if not is_tar:
            return False
        what = self._what(i, layer)
        fd = self._open_dir([], what)
        try:
            self.apply(layer, fd, comp, self.artifact_opts, what)
        finally:
            os.close(fd)
        self.warn(f"{what} has no title annotation: a tar, extracted at the volume root (CRI-O skips it)")
        self.contents[str(layer.digest)] = "/"
        return True

    def _metadata_mode(self, layer: Descriptor, what: str) -> int | None:
        """The mode a raw ModelPack file declares, or None when its read-only part is 0o444 (the file
        is then a hard link to the 0o444 blob; any other mode, an executable, a copy with that mode)."""
        raw = layer.annotations.get(mt.ANN_CNCF_FILE_METADATA)
        if not raw:
            return None
        try:
            meta = json_loads(raw)
            mode = meta.get("mode") if isinstance(meta, dict) else None
        except ValueError:
            mode = None
        if mode is None:
            self.warn(f"{what}: unreadable {mt.ANN_CNCF_FILE_METADATA} annotation ignored")
            return None
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
            self.warn(f"{what}: invalid file mode {mode!r} in {mt.ANN_CNCF_FILE_METADATA} ignored")
            return None
        eff = mode & 0o777
        return None if eff & ~0o222 == 0o444 else eff  # 0o644 & co: the blob's 0o444, a hard link

    def modelpack(self) -> None:
        for i, layer in enumerate(self.m.layers):
            if _MODELPACK_RE.match(layer.media_type):
                self.modelpack_layer(i, layer)
            else:
                self.generic(i, layer, _layer_path(layer, "artifact"))

    def modelpack_layer(self, i: int, layer: Descriptor) -> None:
        """A ``application/vnd.cncf.model.<kind>.v1.<raw|tar>[+gzip|+zstd]`` layer."""
        m = _MODELPACK_RE.match(layer.media_type)
        assert m is not None
        what = self._what(i, layer)
        fmt, comp_name = m.group(2), m.group(3)
        comp = _COMPRESSIONS.get(comp_name)
        if comp is None:
            raise ContentRefusedError(f"{what}: unsupported compression {comp_name!r}")
        path = _layer_path(layer, "modelpack")
        parts = safe_parts(path, f"{what}: file path") if path is not None else self.untitled(i, layer, what)
        if parts is None:
            return
        self.contents[str(layer.digest)] = "/".join(parts)
        if fmt == "tar":
            is_tar, first = self.probe_tar(layer, comp)
            if is_tar:
                self.extract_for(layer, parts, first, comp, what)
                return
            self.warn(f"{what}: typed as a tar but is not one: placed as a file")
            comp = "none"
        self.place_raw(layer, parts, what, mode=self._metadata_mode(layer, what), compression=comp)

    def _kitfile(self) -> dict[str, Any]:
        try:
            doc = json_loads(self.store.read_blob(self.m.config.digest, MAX_CONFIG_SIZE))
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(f"ModelKit config {self.m.config.digest.short} is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ManifestError(f"ModelKit config {self.m.config.digest.short} is not a JSON object")
        return doc

    def kitops(self) -> None:
        kf = self._kitfile() if self.m.config.media_type == mt.KITOPS_CONFIG else {}

        def entries(v: Any) -> list[dict[str, Any]]:
            return [e for e in v if isinstance(e, dict)] if isinstance(v, list) else []

        model = kf.get("model") if isinstance(kf.get("model"), dict) else None
        by_type: dict[str, list[dict[str, Any]]] = {
            "model": [model] if model is not None else [],
            "modelpart": entries(model.get("parts")) if model is not None else [],
            "dataset": [e for e in entries(kf.get("datasets")) if not e.get("remotePath")],
            "code": entries(kf.get("code")),
            "prompt": entries(kf.get("prompts")),
            "docs": entries(kf.get("docs")),
        }
        by_digest: dict[str, dict[str, Any]] = {}
        for lst in (*by_type.values(), entries(kf.get("mcpServers"))):
            for e in lst:
                if isinstance(e.get("digest"), str):
                    by_digest[e["digest"]] = e
        seen: dict[str, int] = {}
        for i, layer in enumerate(self.m.layers):
            m = _KITOPS_RE.match(layer.media_type)
            if m is None:
                self.generic(i, layer, _layer_path(layer, "artifact"))
                continue
            what = self._what(i, layer)
            base, fmt, comp_name = m.groups()
            comp = _COMPRESSIONS.get(comp_name)
            if comp is None or fmt not in ("tar", "raw"):
                raise ContentRefusedError(
                    f"{what}: unsupported KitOps layer format {fmt!r}/{comp_name!r}",
                    hint="KitOps layers are tar or raw, uncompressed, gzip or zstd",
                )
            entry = by_digest.get(str(layer.digest))
            if entry is None:
                typ = "prompt" if base == "code" and layer.annotations.get(ANN_KIT_SUBTYPE) == "prompt" else base
                if typ == "model" and seen.get("model", 0) >= 1:
                    typ = "modelpart"  # more weights than the Kitfile's one model: parts, as kit does
                idx = seen.get(typ, 0)
                seen[typ] = idx + 1
                lst = by_type.get(typ, [])
                entry = lst[idx] if idx < len(lst) else None
            kit_path = entry.get("path") if entry is not None and isinstance(entry.get("path"), str) else None
            path = layer.annotations.get(mt.ANN_CNCF_FILEPATH) or kit_path
            if kit_path is None and path is None:
                self.warn(f"{what}: no Kitfile entry or file path names this layer")
            if fmt == "raw":
                parts = (
                    safe_parts(path, f"{what}: path", normalize=True) if path is not None else None
                ) or self.untitled(i, layer, what)
                if parts is None:
                    continue
                self.place_raw(layer, parts, what, compression=comp)
            else:
                parts = safe_parts(path, f"{what}: path", normalize=True) if path is not None else []
                is_tar, first = self.probe_tar(layer, comp)
                if not is_tar:
                    raise ContentRefusedError(f"{what}: typed as a tar but is not one")
                self.extract_for(layer, parts, first, comp, what)
            self.contents[str(layer.digest)] = kit_path or path or "/"

    def docker_model(self) -> None:
        unnamed: dict[str, list[int]] = {}
        for i, layer in enumerate(self.m.layers):
            if layer.media_type in DOCKER_AI_NAMES and _layer_path(layer, "modelpack") is None:
                unnamed.setdefault(layer.media_type, []).append(i)
        for i, layer in enumerate(self.m.layers):
            what = self._what(i, layer)
            if _MODELPACK_RE.match(layer.media_type):
                self.modelpack_layer(i, layer)
                continue
            path = _layer_path(layer, "modelpack")
            if layer.media_type in DOCKER_AI_TARS or mt.layer_compression(layer.media_type) is not None:
                parts = safe_parts(path, f"{what}: file path") if path is not None else []
                comp = mt.layer_compression(layer.media_type) or "none"
                is_tar, first = self.probe_tar(layer, comp)
                if is_tar:
                    self.extract_for(layer, parts, first, comp, what)
                    self.contents[str(layer.digest)] = "/".join(parts) or "/"
                    continue
                if not parts:
                    parts = [layer.digest.hex]
                self.warn(f"{what}: typed as a tar but is not one: placed as a file")
            elif path is not None:
                parts = safe_parts(path, f"{what}: file path")
            elif layer.media_type in DOCKER_AI_NAMES:
                stem, ext = DOCKER_AI_NAMES[layer.media_type]
                group = unnamed[layer.media_type]
                n = len(group)
                parts = [f"{stem}{ext}" if n == 1 else f"{stem}-{group.index(i) + 1:05d}-of-{n:05d}{ext}"]
            else:
                parts = [layer.digest.hex]
            self.place_raw(layer, parts, what)
            self.contents[str(layer.digest)] = "/".join(parts)

    def run(self, fl: str) -> int:
        if self.feed is not None and fl != "image":  # only image layers are read as they download
            for d in (self.m.config, *self.m.layers):
                self.feed.wait(d.digest)
            self.feed = None
        {
            "image": self.image,
            "artifact": self.artifact,
            "modelpack": self.modelpack,
            "kitops": self.kitops,
            "docker-model": self.docker_model,
        }[fl]()
        return _seal(self.root_fd)


# --------------------------------------------------------------------------------------------------
# materialize


def _read_info(snaps: Path, key: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(_info_path(snaps, key).read_bytes())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _write_info(snaps: Path, key: str, info: dict[str, Any], *, path: Path | None = None) -> None:
    path = _info_path(snaps, key) if path is None else path
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, _NEW_FILE, 0o600)
    try:
        data = json.dumps(info, sort_keys=True).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def _reuse(store: Store, snaps: Path, key: str, manifest: Manifest, fl: str) -> Snapshot | None:
    final = snaps / key
    try:
        st = os.stat(final, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    info = _read_info(snaps, key) or {}
    rec = store.meta.get_snapshot(key)
    if rec is None or rec.state != "ready" or rec.path != str(final):
        store.meta.set_snapshot(key, str(final), "ready", digest=manifest.digest)
    files = info.get("files")
    if not isinstance(files, int):
        files = count_files(final)
    warnings = info.get("warnings")
    contents = info.get("contents")
    return Snapshot(
        key=key,
        path=final,
        digest=manifest.digest,
        flavour=info.get("flavour") if isinstance(info.get("flavour"), str) else fl,
        files=files,
        warnings=list(warnings) if isinstance(warnings, list) else [],
        created=False,
        contents=dict(contents) if isinstance(contents, dict) else {},
    )


def _build_key(name: str) -> str | None:
    """The snapshot key of a ``.build-<key>-<random>`` directory name, if it is one."""
    if not name.startswith(BUILD_PREFIX):
        return None
    key = name[len(BUILD_PREFIX) :].rsplit("-", 1)[0]
    return key if _KEY_RE.match(key) else None


def _clean_builds(store: Store, snaps: Path, held_key: str | None, *, dry_run: bool = False) -> list[str]:
    """Remove ``.build-*`` leftovers of crashed or failed builds: those of ``held_key`` (the caller
    holds its lock), and any other whose lock is free right now (its builder is gone). Best effort:
    a leftover that cannot be removed (a mount inside it, an immutable file) is left, with what
    could be removed of it gone, and never fails the caller. Returns the names removed."""
    removed: list[str] = []
    try:
        names = sorted(os.listdir(snaps))
    except OSError:
        return removed
    for name in names:
        key = _build_key(name)
        if key is None:
            continue
        try:
            if key == held_key:
                if not dry_run:
                    force_rmtree(snaps / name)
            else:
                with store.lock(_lock_name(key), blocking=False):
                    if not dry_run:
                        force_rmtree(snaps / name)
        except StoreError:
            continue  # being built right now (its lock is held)
        except (OSError, ImagevolError) as e:
            log.warning("cannot remove the leftover build %s: %s", snaps / name, e)
            continue
        removed.append(name)
    return removed


def clean_stale_builds(store: Store, *, dry_run: bool = False) -> list[str]:
    """Remove the ``.build-*`` directories no builder holds (crashed or failed builds), for gc.
    Returns the names removed (or that would be, with ``dry_run``)."""
    snaps = store.root / SNAPSHOTS
    if not snaps.is_dir() or snaps.is_symlink():
        return []
    return _clean_builds(store, snaps, None, dry_run=dry_run)


def find_snapshot(store: Store, manifest: Manifest, options: MaterializeOptions | None = None) -> Snapshot | None:
    """The ready snapshot of ``manifest`` built with ``options``, if there is one."""
    opts = options if options is not None else MaterializeOptions()
    return _reuse(store, snapshots_dir(store), snapshot_key(manifest, opts), manifest, manifest_flavour(manifest))


def materialize(
    store: Store,
    manifest: Manifest,
    *,
    options: MaterializeOptions | None = None,
    warn: Callable[[str], None] | None = None,
    feed: LayerFeed | None = None,
) -> Snapshot:
    """Materialize ``manifest`` (whose config and layers are in ``store``, verified) into a
    read-only snapshot, or return the existing one (``created=False``). See the module docs.

    With a ``feed``, blobs may still be downloading: image layers are applied as their bytes
    arrive, and the snapshot is kept only if every blob was verified in the end."""
    opts = options if options is not None else MaterializeOptions()
    fl = manifest_flavour(manifest)
    key = snapshot_key(manifest, opts)
    snaps = snapshots_dir(store)
    found = _reuse(store, snaps, key, manifest, fl)
    if found is not None:
        return found
    if fl != "image":
        _precheck_paths(manifest)
    with store.lock(_lock_name(key)):
        found = _reuse(store, snaps, key, manifest, fl)
        if found is not None:
            return found
        _clean_builds(store, snaps, key)
        final = snaps / key
        store.meta.set_snapshot(key, str(final), "building", digest=manifest.digest)
        build = Path(tempfile.mkdtemp(prefix=f"{BUILD_PREFIX}{key}-", dir=snaps))
        try:
            builder = _Builder(store, manifest, build, opts, warn, feed)
            try:
                files = builder.run(fl)
                builder.hashes.finish()
                write_record(
                    _record_path(snaps, key),
                    {"version": RECORD_VERSION, "key": key, "digest": str(manifest.digest)},
                    _record_entries(store, builder.root_fd, builder.known, builder.hashes.done),
                )
            finally:
                builder.close()
            info = {
                "flavour": fl,
                "files": files,
                "warnings": builder.warnings,
                "contents": builder.contents,
                "digest": str(manifest.digest),
            }
            _write_info(snaps, key, info)
            os.rename(build, final)
            _fsync_dir(snaps)
        except BaseException:
            with contextlib.suppress(OSError, ImagevolError):
                force_rmtree(build)
            with contextlib.suppress(OSError):
                _info_path(snaps, key).unlink()
            with contextlib.suppress(OSError):
                _record_path(snaps, key).unlink()
            with contextlib.suppress(Exception):
                store.meta.remove_snapshot(key)
            raise
        store.meta.set_snapshot(key, str(final), "ready", digest=manifest.digest)
        return Snapshot(
            key=key,
            path=final,
            digest=manifest.digest,
            flavour=fl,
            files=files,
            warnings=list(builder.warnings),
            created=True,
            contents=dict(builder.contents),
        )
