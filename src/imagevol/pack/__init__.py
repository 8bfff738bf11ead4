"""Pack a directory into an OCI image or artifact and push it (`imagevol pack DIR REF`).

Formats (see docs/formats.md, "Packing"):

``image`` (default)
    A runnable image every runtime mounts: real image configs (os, architecture, variant,
    ``rootfs.type=layers``, ``diff_ids``; no ``created`` unless ``SOURCE_DATE_EPOCH`` is set), tar
    layers. Files of ``large_file_size`` (64 MiB) and more get a layer each (so versions that share
    weight shards share blobs, and pulls fetch them in parallel); everything else (directories,
    symlinks, small files) is one layer, placed first. Hard links inside the directory stay hard
    links (all names of a file travel in the layer of its first name). Default platforms:
    :data:`DEFAULT_PLATFORMS` (an index with one manifest per platform; the manifests share every
    layer blob, only the small configs differ). ``agnostic``: an index with ONE entry and no
    ``platform``, config linux/amd64: CRI-O takes a platform-less entry on any node; containerd
    matches such an entry through its config, so it mounts it only on amd64 (``explain`` says so).
``artifact``
    An OCI 1.1 artifact: ``artifactType`` (default ``application/vnd.imagevol.data.v1``), the empty
    config, one raw ``application/octet-stream`` layer per regular file titled with its path
    (``org.opencontainers.image.title``, ``/``-separated) and carrying
    ``org.cncf.model.file.metadata+json``. Whatever raw layers cannot say (directories that are
    empty or not 0755, symlinks, files whose read-only mode is not 0444, e.g. executables) goes into
    ONE extra tar layer titled ``.imagevol-tree`` whose entries are relative to the root and which
    carries the annotation ``io.imagevol.layer.root: "true"``: imagevol extracts it at the volume
    root, so the volume equals the directory; ORAS and CRI-O see a file (or directory) named
    ``.imagevol-tree``. It carries no ORAS unpack annotation, because oras-go refuses tar entries
    outside the title.
``modelpack``
    A CNCF ModelPack (model-spec v1): artifactType ``application/vnd.cncf.model.manifest.v1+json``,
    config ``application/vnd.cncf.model.config.v1+json`` (descriptor, modelfs with diffIds,
    config), one ``application/vnd.cncf.model.<kind>.v1.raw`` layer per file (kinds in
    :func:`modelpack_kind`) with ``org.cncf.model.filepath``, ``org.opencontainers.image.title`` and
    ``org.cncf.model.file.metadata+json`` (mode honoured by imagevol); directories and symlinks in a
    ``weight.config.v1.tar`` layer at ``.imagevol-tree`` as above.

Determinism: the same directory gives the same digests on any host, cwd or day: entries sorted,
mtimes fixed (0 or ``SOURCE_DATE_EPOCH``), owners 0, no user names, JSON compact with fixed key
order, gzip without name or time, zstd multi-threaded (its output does not depend on the thread
count). ``--compression`` applies to tar layers; raw layers are never compressed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import mediatypes as mt
from ..digest import Digest, digest_bytes
from ..errors import UsageError
from ..manifest import Descriptor
from ..platform import Platform, parse_platform, parse_platform_list
from ..progress import ProgressEvent, ProgressFn
from ..registry.client import interruptible_by
from ..sinks import Blob, FileRange, Sink, hash_blob, open_sink, stop_with
from ..sinks.digestcache import DigestCache, composite_key, file_identity
from .tarwriter import COMPRESSIONS, LayerWriter, TarParts, source_date_epoch

__all__ = [
    "DEFAULT_ARTIFACT_TYPE",
    "DEFAULT_PLATFORMS",
    "FORMATS",
    "Built",
    "Entry",
    "PackResult",
    "build",
    "modelpack_kind",
    "pack",
    "plan_image_layers",
    "scan_tree",
]

FORMATS = ("image", "artifact", "modelpack")
DEFAULT_PLATFORMS = ("linux/amd64", "linux/arm64/v8", "linux/arm/v7", "linux/ppc64le", "linux/s390x", "linux/riscv64")
DEFAULT_ARTIFACT_TYPE = "application/vnd.imagevol.data.v1"
DEFAULT_LARGE_FILE_SIZE = 64 << 20
DEFAULT_CONCURRENCY = 4
TREE_TITLE = ".imagevol-tree"
RAW_FILE_TYPE = "application/octet-stream"
ANN_UNTESTED = "org.cncf.model.file.mediatype.untested"
AGNOSTIC_PLATFORM = Platform("linux", "amd64")

_LAYER_TYPES = {"none": mt.OCI_LAYER, "gzip": mt.OCI_LAYER_GZIP, "zstd": mt.OCI_LAYER_ZSTD}
_TAR_SUFFIX = {"none": "tar", "gzip": "tar+gzip", "zstd": "tar+zstd"}


def _dumps(doc: Any) -> bytes:
    """Compact JSON with the key order the document was built in (deterministic)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()


# ------------------------------------------------------------------------------------------------
# Scanning


@dataclass(frozen=True)
class Entry:
    """One thing in the directory. kind: ``dir``, ``file``, ``symlink`` or ``hardlink`` (another
    name of an earlier ``file``: ``target`` is that file's path)."""

    path: str
    kind: str
    mode: int
    size: int = 0
    source: str = ""
    target: str = ""
    identity: str = field(default="", compare=False)  # files: device, inode, size, mtime, ctime
    ctime_ns: int = field(default=0, compare=False)


def scan_tree(directory: str | os.PathLike[str]) -> list[Entry]:
    """Every entry below ``directory`` (not the directory itself), depth first, children sorted by
    the bytes of their names. Symlinks are not followed. Sockets, FIFOs and devices are refused."""
    root = Path(directory)
    try:
        st = root.stat()
    except FileNotFoundError:
        raise UsageError(f"{directory} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{directory} is not a directory", hint="pack takes a directory")
    out: list[Entry] = []
    inodes: dict[tuple[int, int], str] = {}

    def walk(dir_path: str, rel: str) -> None:
        with os.scandir(dir_path) as it:
            children = sorted(it, key=lambda e: os.fsencode(e.name))
        for child in children:
            path = f"{rel}{child.name}"
            cst = child.stat(follow_symlinks=False)
            mode = stat.S_IMODE(cst.st_mode)
            if stat.S_ISDIR(cst.st_mode):
                out.append(Entry(path, "dir", mode))
                walk(child.path, path + "/")
            elif stat.S_ISLNK(cst.st_mode):
                out.append(Entry(path, "symlink", 0o777, target=os.readlink(child.path)))
            elif stat.S_ISREG(cst.st_mode):
                key = (cst.st_dev, cst.st_ino)
                first = inodes.get(key) if cst.st_nlink > 1 else None
                ident = file_identity(cst)
                if first is not None:
                    out.append(Entry(path, "hardlink", mode, cst.st_size, child.path, first, ident, cst.st_ctime_ns))
                else:
                    if cst.st_nlink > 1:
                        inodes[key] = path
                    out.append(Entry(path, "file", mode, cst.st_size, child.path, "", ident, cst.st_ctime_ns))
            else:
                raise UsageError(
                    f"{child.path} is a socket, FIFO or device: pack takes directories, files and symlinks only",
                    hint="move it out of the directory",
                )

    walk(str(root), "")
    return out


# ------------------------------------------------------------------------------------------------
# Layer plans


@dataclass
class LayerPlan:
    """Entries that go into one tar layer."""

    name: str
    entries: list[Entry]


def plan_image_layers(entries: Sequence[Entry], large_file_size: int = DEFAULT_LARGE_FILE_SIZE) -> list[LayerPlan]:
    """Split an image: one layer per file of ``large_file_size`` bytes or more (with the hard links
    to it), everything else in one first layer (always present, possibly empty)."""
    large = {e.path for e in entries if e.kind == "file" and e.size >= large_file_size}
    small: list[Entry] = []
    own: dict[str, list[Entry]] = {}
    for e in entries:
        if e.kind == "file" and e.path in large:
            own[e.path] = [e]
        elif e.kind == "hardlink" and e.target in large:
            own[e.target].append(e)
        else:
            small.append(e)
    plans = [LayerPlan("files", small)]
    plans += [LayerPlan(path, group) for path, group in own.items()]
    return plans


def _plain_mode(mode: int) -> bool:
    """A file whose read-only mode is 0444 (0644, 0664, 0666, 0444): what a raw layer reproduces."""
    return (mode & 0o7777 & ~0o222) == 0o444


def _tree_plan(entries: Sequence[Entry], raw_paths: set[str]) -> LayerPlan | None:
    """The `.imagevol-tree` layer of an artifact, or None when raw layers say everything.

    Directories that hold a raw file below them and are 0755 come into being anyway; anything else
    (other directories, symlinks, files that are not raw layers) needs it.
    """
    covered: set[str] = set()
    for p in raw_paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            covered.add("/".join(parts[:i]))
    in_tree: set[str] = set()
    needed = False
    for e in entries:
        if e.kind == "dir":
            if e.mode != 0o755 or e.path not in covered:
                needed = True
        elif e.kind == "symlink" or e.path not in raw_paths:
            needed = True  # a symlink, or a file a raw layer cannot reproduce (its mode)
            in_tree.add(e.path)
    if not needed:
        return None
    if any(e.path == TREE_TITLE for e in entries):
        raise UsageError(
            f"the directory has a top-level {TREE_TITLE!r}, the name imagevol gives its tree layer",
            hint="rename it, or pack with --format image",
        )
    chosen = [e for e in entries if e.kind == "dir" or e.path in in_tree]
    return LayerPlan(TREE_TITLE, chosen)


# ------------------------------------------------------------------------------------------------
# ModelPack

_WEIGHT_EXT = frozenset(
    {".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx", ".h5", ".msgpack", ".ckpt", ".tflite", ".pdparams"}
)
_WEIGHT_CONFIG_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.model",
        "merges.txt",
        "special_tokens_map.json",
        "preprocessor_config.json",
        "chat_template.jinja",
    }
)
_DOC_EXT = frozenset({".md", ".rst"})
_CODE_EXT = frozenset({".py", ".sh", ".ipynb"})
_DATASET_DIRS = frozenset({"data", "dataset", "datasets"})
_DATASET_EXT = frozenset({".parquet", ".arrow", ".jsonl", ".csv", ".tsv"})
_FORMAT_BY_EXT = {
    ".safetensors": "safetensors",
    ".gguf": "gguf",
    ".onnx": "onnx",
    ".pt": "pytorch",
    ".pth": "pytorch",
    ".bin": "pytorch",
    ".ckpt": "pytorch",
    ".h5": "tensorflow",
    ".tflite": "tflite",
    ".msgpack": "flax",
    ".pdparams": "paddle",
}


def modelpack_kind(path: str, size: int = 0, large_file_size: int = DEFAULT_LARGE_FILE_SIZE) -> tuple[str, bool]:
    """(ModelPack layer kind, guessed) for a file path, first rule that applies:

    weight.config: config.json, generation_config.json, tokenizer*.json, tokenizer.model, vocab*,
    merges.txt, special_tokens_map.json, preprocessor_config.json, chat_template.jinja;
    doc: README*, LICENSE*, NOTICE*, *.md, *.rst; code: *.py, *.sh, *.ipynb;
    dataset: anything under a top-level data/, dataset/ or datasets/;
    weight: *.safetensors, *.bin, *.gguf, *.pt, *.pth, *.onnx, *.h5, *.msgpack, *.ckpt, *.tflite, *.pdparams;
    dataset: *.parquet, *.arrow, *.jsonl, *.csv, *.tsv;
    otherwise a guess (``guessed`` True, annotated ``org.cncf.model.file.mediatype.untested``):
    weight when ``large_file_size`` bytes or more, else weight.config.
    """
    name = path.rsplit("/", 1)[-1]
    lower = name.lower()
    ext = os.path.splitext(lower)[1]
    if (
        lower in _WEIGHT_CONFIG_NAMES
        or (lower.startswith("tokenizer") and lower.endswith(".json"))
        or lower.startswith("vocab")
    ):
        return "weight.config", False
    if lower.startswith(("readme", "license", "licence", "notice")) or ext in _DOC_EXT:
        return "doc", False
    if ext in _CODE_EXT:
        return "code", False
    if "/" in path and path.split("/", 1)[0].lower() in _DATASET_DIRS:
        return "dataset", False
    if ext in _WEIGHT_EXT:
        return "weight", False
    if ext in _DATASET_EXT:
        return "dataset", False
    return ("weight" if size >= large_file_size else "weight.config"), True


def _rfc3339(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _file_metadata(e: Entry, mtime: int) -> str:
    """``org.cncf.model.file.metadata+json`` (model-spec FileMetadata; Go field order)."""
    return _dumps(
        {
            "name": e.path.rsplit("/", 1)[-1],
            "mode": e.mode,
            "uid": 0,
            "gid": 0,
            "size": e.size,
            "mtime": _rfc3339(mtime),
            "typeflag": ord("0"),
        }
    ).decode()


# ------------------------------------------------------------------------------------------------
# Results


@dataclass
class ManifestInfo:
    """One manifest of the result: its platform in the index (None: none), digest and size."""

    platform: Platform | None
    digest: Digest
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "platform": str(self.platform) if self.platform else None,
            "digest": str(self.digest),
            "size": self.size,
        }


@dataclass
class Built:
    """A packed directory before it is written anywhere: blobs (configs in memory, compressed layers
    in ``workdir``, raw files and uncompressed tar layers read from the source files, see
    :class:`~imagevol.sinks.Blob`), child manifests and the root document."""

    format: str
    media_type: str
    body: bytes
    digest: Digest
    manifests: list[ManifestInfo]
    children: list[tuple[bytes, str]]
    blobs: dict[Digest, Blob]
    layers: list[Descriptor]
    workdir: Path | None = None
    files: int = 0

    @property
    def size(self) -> int:
        return len(self.body)

    @property
    def content_size(self) -> int:
        return sum(b.size for b in self.blobs.values())

    def cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


@dataclass
class PackResult:
    """What a pack did: the root digest, the manifests per platform, the blobs written."""

    reference: str
    format: str
    digest: Digest
    media_type: str
    size: int
    manifests: list[ManifestInfo]
    layers: list[Descriptor]
    blobs_pushed: int = 0
    blobs_skipped: int = 0
    blobs_mounted: int = 0
    bytes_pushed: int = 0
    bytes_total: int = 0
    chunks: int = 0
    files: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "format": self.format,
            "digest": str(self.digest),
            "mediaType": self.media_type,
            "size": self.size,
            "manifests": [m.to_dict() for m in self.manifests],
            "layers": [
                {"mediaType": x.media_type, "digest": str(x.digest), "size": x.size, "title": x.title}
                for x in self.layers
            ],
            "blobsPushed": self.blobs_pushed,
            "blobsSkipped": self.blobs_skipped,
            "blobsMounted": self.blobs_mounted,
            "bytesPushed": self.bytes_pushed,
            "bytesTotal": self.bytes_total,
            "files": self.files,
            "seconds": round(self.seconds, 3),
        }


# ------------------------------------------------------------------------------------------------
# Building


def _emit(progress: ProgressFn | None, kind: str, **kw: Any) -> None:
    if progress is not None:
        progress(ProgressEvent(kind, **kw))


def _run_parallel(fns: list[Callable[[], Any]], concurrency: int) -> list[Any]:
    """Run ``fns`` on up to ``concurrency`` threads; results in order; the first error cancels the rest."""
    if len(fns) <= 1 or concurrency <= 1:
        return [fn() for fn in fns]
    cancel = threading.Event()

    def run(fn: Callable[[], Any]) -> Any:
        # Reads of blobs (hashing, uploads) and registry retry waits in this thread end on `cancel`.
        stop_with(cancel)
        interruptible_by(cancel)
        try:
            return fn()
        finally:
            stop_with(None)
            interruptible_by(None)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="imagevol-pack") as ex:
        futures: list[Future[Any]] = [ex.submit(run, fn) for fn in fns]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]
        except BaseException:
            # An error, or an interrupt (Ctrl-C, SIGTERM) while waiting: the work in flight stops at
            # its next piece instead of running to its end before the pool is left.
            cancel.set()
            for p in futures:
                p.cancel()
            raise
        return [f.result() for f in futures]


@dataclass(eq=False)
class _Layer:
    """A layer of the result: its blob (the digest may come later: a streamed push computes it) and
    what the manifest says about it. diff_id None: the blob is uncompressed (its digest)."""

    blob: Blob
    media_type: str
    diff_id: Digest | None = None

    @property
    def digest(self) -> Digest:
        assert self.blob.digest is not None, "the layer has not been hashed yet"
        return self.blob.digest

    def descriptor(self, annotations: Mapping[str, str] | None = None) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.blob.size, annotations=dict(annotations or {}))

    @property
    def uncompressed(self) -> Digest:
        return self.diff_id or self.digest


@dataclass
class _CacheInfo:
    """How a blob's bytes are identified without reading them (None: they cannot be)."""

    key: str
    newest_ctime_ns: int


class _Builder:
    def __init__(
        self,
        root: Path,
        workdir: Path,
        compression: str,
        mtime: int,
        large_file_size: int,
        progress: ProgressFn | None,
    ) -> None:
        self.root = root
        self.workdir = workdir
        self.compression = compression
        self.mtime = mtime
        self.large_file_size = large_file_size
        self.progress = progress
        self.blobs: dict[Digest, Blob] = {}
        self.layer_blobs: list[Blob] = []  # in the order they were made; digests may come later
        self.cache_info: dict[int, _CacheInfo] = {}  # id(blob) ->
        self._raw: dict[str, Blob] = {}  # file identity -> its raw blob (hard links share one)
        self._mu = threading.Lock()

    def _add_blob(self, blob: Blob) -> None:
        assert blob.digest is not None
        self.blobs.setdefault(blob.digest, blob)

    def _add_layer_blob(self, blob: Blob, info: _CacheInfo | None) -> None:
        with self._mu:
            self.layer_blobs.append(blob)
            if info is not None:
                self.cache_info[id(blob)] = info

    def tar_layer(self, plan: LayerPlan, media_type: str) -> _Layer:
        """One tar layer. Uncompressed: described as parts (headers in memory, the files where they
        are), hashed later, nothing written; compressed: written to a scratch file, hashed on the way."""
        if self.compression == "none":
            tp = TarParts(mtime=self.mtime)
            self._add_entries(tp.tar, plan.entries)
            parts, size = tp.finish()
            blob = Blob(None, size, media_type, parts=parts, what=plan.name)
            sources = {Path(e.source): e for e in plan.entries if e.kind == "file"}
            key_parts: list[bytes | str] = []
            cacheable = True
            for p in parts:
                if isinstance(p, FileRange):
                    e = sources.get(p.path)
                    cacheable = cacheable and e is not None and bool(e.identity)
                    key_parts.append(e.identity if e is not None else "")
                else:
                    key_parts.append(p)
            newest = max((e.ctime_ns for e in sources.values()), default=0)
            self._add_layer_blob(blob, _CacheInfo(composite_key("tar", key_parts), newest) if cacheable else None)
            return _Layer(blob, media_type)
        _emit(self.progress, "pack-layer", message=plan.name)
        fd, tmp = tempfile.mkstemp(prefix="layer-", dir=self.workdir)
        with os.fdopen(fd, "wb") as f:
            w = LayerWriter(f, self.compression, mtime=self.mtime)
            self._add_entries(w.tar, plan.entries)
            digest, size, diff_id, _raw = w.finish()
        path = self.workdir / digest.hex
        os.replace(tmp, path)
        blob = Blob(digest, size, media_type, path=path, temporary=True, what=plan.name)
        self._add_layer_blob(blob, None)
        _emit(self.progress, "pack-layer-done", digest=str(digest), size=size, message=plan.name)
        return _Layer(blob, media_type, diff_id)

    def _add_entries(self, tar: Any, entries: Iterable[Entry]) -> None:
        for e in entries:
            if e.kind == "dir":
                tar.add_dir(e.path, e.mode)
            elif e.kind == "symlink":
                tar.add_symlink(e.path, e.target)
            elif e.kind == "hardlink":
                tar.add_hardlink(e.path, e.target, e.mode)
            else:
                tar.add_file(e.path, e.source, e.mode, e.size)

    def raw_file(self, e: Entry) -> Blob:
        """The file as a raw blob (not read here); every name of one file gives the same blob."""
        with self._mu:
            blob = self._raw.get(e.identity) if e.identity else None
            if blob is not None:
                return blob
            blob = Blob(
                None, e.size, RAW_FILE_TYPE, parts=(FileRange(e.source, 0, e.size, file_size=e.size),), what=e.path
            )
            if e.identity:
                self._raw[e.identity] = blob
        self._add_layer_blob(blob, _CacheInfo(f"raw:{e.identity}", e.ctime_ns) if e.identity else None)
        return blob

    def json_blob(self, doc: Any, media_type: str) -> Descriptor:
        body = _dumps(doc)
        d = digest_bytes(body)
        self._add_blob(Blob(d, len(body), media_type, data=body, what=media_type))
        return Descriptor(media_type, d, len(body))

    def collect_layer_blobs(self) -> None:
        """Once every layer blob has its digest: all of them by digest (identical content once)."""
        for blob in self.layer_blobs:
            self._add_blob(blob)


def _image_config(platform: Platform, diff_ids: list[Digest], mtime: int) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if mtime:
        doc["created"] = _rfc3339(mtime)
    doc["architecture"] = platform.architecture
    doc["os"] = platform.os
    if platform.variant:
        doc["variant"] = platform.variant
    doc["config"] = {}
    doc["rootfs"] = {"type": "layers", "diff_ids": [str(d) for d in diff_ids]}
    return doc


def _manifest_doc(
    config: Descriptor, layers: list[Descriptor], artifact_type: str | None, annotations: Mapping[str, str]
) -> bytes:
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST}
    if artifact_type:
        doc["artifactType"] = artifact_type
    doc["config"] = config.to_dict()
    doc["layers"] = [x.to_dict() for x in layers]
    if annotations:
        doc["annotations"] = dict(sorted(annotations.items()))
    return _dumps(doc)


def _index_doc(entries: list[tuple[bytes, Platform | None]], annotations: Mapping[str, str]) -> bytes:
    manifests = []
    for body, plat in entries:
        d: dict[str, Any] = {"mediaType": mt.OCI_MANIFEST, "digest": str(digest_bytes(body)), "size": len(body)}
        if plat is not None:
            d["platform"] = plat.to_dict()
        manifests.append(d)
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": manifests}
    if annotations:
        doc["annotations"] = dict(sorted(annotations.items()))
    return _dumps(doc)


def _resolve_platforms(
    fmt: str, platforms: Sequence[Platform | str] | str | None, agnostic: bool
) -> list[Platform] | None:
    """The index entries' platforms; None for a bare manifest (artifacts without --platform)."""
    if agnostic and platforms:
        raise UsageError("--agnostic and --platform exclude each other", hint="give one of them")
    if isinstance(platforms, str):
        plats = parse_platform_list(platforms)
    elif platforms:
        plats = []
        for p in platforms:
            for q in parse_platform_list(p) if isinstance(p, str) else [p]:
                if q not in plats:
                    plats.append(q)
    else:
        plats = []
    for p in plats:
        if not p.os or not p.architecture:
            raise UsageError(f"platform {p} needs an OS and an architecture", hint="e.g. linux/arm64")
    if agnostic:
        return [] if fmt == "image" else None
    if plats:
        return plats
    if fmt == "image":
        return [parse_platform(p) for p in DEFAULT_PLATFORMS]
    return None


@dataclass
class _Draft:
    """A pack whose layers are planned (tar headers made, compressed layers written) but whose
    uncompressed blobs are not read yet; :meth:`complete` makes the documents once every layer blob
    has its digest."""

    builder: _Builder
    finish: Callable[[], Built]
    files: int
    workdir: Path | None

    def pending(self) -> list[Blob]:
        return [x for x in self.builder.layer_blobs if x.digest is None]

    def complete(self) -> Built:
        self.builder.collect_layer_blobs()
        built = self.finish()
        built.workdir, self.workdir = self.workdir, None
        built.files = self.files
        return built

    def cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def _draft(
    directory: str | os.PathLike[str],
    *,
    format: str,
    platforms: Sequence[Platform | str] | str | None,
    agnostic: bool,
    compression: str,
    artifact_type: str | None,
    annotations: Mapping[str, str] | None,
    large_file_size: int,
    concurrency: int,
    workdir: str | os.PathLike[str] | None,
    progress: ProgressFn | None,
) -> _Draft:
    if format not in FORMATS:
        raise UsageError(f"unknown format {format!r}", hint="format is one of: " + ", ".join(FORMATS))
    if compression not in COMPRESSIONS:
        raise UsageError(
            f"unknown compression {compression!r}", hint="compression is one of: " + ", ".join(COMPRESSIONS)
        )
    if artifact_type is not None and format != "artifact":
        raise UsageError("--artifact-type applies to --format artifact only")
    if large_file_size < 1:
        raise UsageError("the large-file size must be at least 1 byte")
    anns = dict(annotations or {})
    plats = _resolve_platforms(format, platforms, agnostic)
    root = Path(directory)
    entries = scan_tree(root)
    mtime = source_date_epoch()
    scratch = Path(tempfile.mkdtemp(prefix=".imagevol-pack-", dir=workdir))
    b = _Builder(root, scratch, compression, mtime, large_file_size, progress)
    try:
        if format == "image":
            finish = _draft_image(b, entries, plats or [], agnostic, anns, concurrency)
        else:
            finish = _draft_artifact(b, entries, format, plats, artifact_type, anns)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    files = sum(1 for e in entries if e.kind in ("file", "hardlink"))
    return _Draft(b, finish, files, scratch)


def build(
    directory: str | os.PathLike[str],
    *,
    format: str = "image",
    platforms: Sequence[Platform | str] | str | None = None,
    agnostic: bool = False,
    compression: str = "none",
    artifact_type: str | None = None,
    annotations: Mapping[str, str] | None = None,
    large_file_size: int = DEFAULT_LARGE_FILE_SIZE,
    concurrency: int = DEFAULT_CONCURRENCY,
    workdir: str | os.PathLike[str] | None = None,
    progress: ProgressFn | None = None,
) -> Built:
    """Pack ``directory`` into blobs and manifests (nothing is pushed; every blob is hashed). Call
    ``cleanup()`` on the result when done (it owns a scratch directory under ``workdir`` or the
    system's temp dir, for compressed layers)."""
    draft = _draft(
        directory,
        format=format,
        platforms=platforms,
        agnostic=agnostic,
        compression=compression,
        artifact_type=artifact_type,
        annotations=annotations,
        large_file_size=large_file_size,
        concurrency=concurrency,
        workdir=workdir,
        progress=progress,
    )
    try:
        _run_parallel([lambda x=x: hash_blob(x) for x in draft.pending()], concurrency)
        return draft.complete()
    finally:
        draft.cleanup()


def _draft_image(
    b: _Builder,
    entries: list[Entry],
    plats: list[Platform],
    agnostic: bool,
    anns: dict[str, str],
    concurrency: int,
) -> Callable[[], Built]:
    plans = plan_image_layers(entries, b.large_file_size)
    media_type = _LAYER_TYPES[b.compression]
    layers: list[_Layer] = _run_parallel([lambda p=p: b.tar_layer(p, media_type) for p in plans], concurrency)

    def finish() -> Built:
        descs = [x.descriptor() for x in layers]
        diff_ids = [x.uncompressed for x in layers]
        children: list[tuple[bytes, str]] = []
        index_entries: list[tuple[bytes, Platform | None]] = []
        infos: list[ManifestInfo] = []
        targets: list[tuple[Platform, Platform | None]] = (
            [(AGNOSTIC_PLATFORM, None)] if agnostic else [(p, p) for p in plats]
        )
        for config_plat, entry_plat in targets:
            cfg = b.json_blob(_image_config(config_plat, diff_ids, b.mtime), mt.OCI_CONFIG)
            body = _manifest_doc(cfg, descs, None, anns)
            children.append((body, mt.OCI_MANIFEST))
            index_entries.append((body, entry_plat))
            infos.append(ManifestInfo(entry_plat, digest_bytes(body), len(body)))
        index = _index_doc(index_entries, anns)
        return Built("image", mt.OCI_INDEX, index, digest_bytes(index), infos, children, b.blobs, descs)

    return finish


def _draft_artifact(
    b: _Builder,
    entries: list[Entry],
    fmt: str,
    plats: list[Platform] | None,
    artifact_type: str | None,
    anns: dict[str, str],
) -> Callable[[], Built]:
    modelpack = fmt == "modelpack"
    files = [e for e in entries if e.kind in ("file", "hardlink")]
    raw = files if modelpack else [e for e in files if _plain_mode(e.mode)]
    raw_paths = {e.path for e in raw}
    tree = _tree_plan(entries, raw_paths)
    # One raw blob per file (every name of a hard-linked file shares it); read later.
    blobs = {e.path: b.raw_file(e) for e in raw}
    tree_layer: _Layer | None = None
    if tree is not None:
        if modelpack:
            tree_type = f"{mt.MODELPACK_LAYER_PREFIX}weight.config.v1.{_TAR_SUFFIX[b.compression]}"
            tree_ann = {mt.ANN_CNCF_FILEPATH: TREE_TITLE, mt.ANN_TITLE: TREE_TITLE, mt.ANN_IMAGEVOL_ROOT: "true"}
        else:
            tree_type = _LAYER_TYPES[b.compression]
            tree_ann = {mt.ANN_TITLE: TREE_TITLE, mt.ANN_IMAGEVOL_ROOT: "true"}
        tree_layer = b.tar_layer(tree, tree_type)

    def finish() -> Built:
        layers: list[Descriptor] = []
        diff_ids: list[Digest] = []
        formats: set[str] = set()
        for e in raw:
            d = blobs[e.path].digest
            assert d is not None
            a: dict[str, str] = {}
            if modelpack:
                kind, guessed = modelpack_kind(e.path, e.size, b.large_file_size)
                media_type = f"{mt.MODELPACK_LAYER_PREFIX}{kind}.v1.raw"
                a[mt.ANN_CNCF_FILEPATH] = e.path
                a[mt.ANN_CNCF_FILE_METADATA] = _file_metadata(e, b.mtime)
                if guessed:
                    a[ANN_UNTESTED] = "true"
                a[mt.ANN_TITLE] = e.path
                if kind == "weight":
                    fmt_name = _FORMAT_BY_EXT.get(os.path.splitext(e.path.lower())[1])
                    if fmt_name:
                        formats.add(fmt_name)
            else:
                media_type = RAW_FILE_TYPE
                a[mt.ANN_CNCF_FILE_METADATA] = _file_metadata(e, b.mtime)
                a[mt.ANN_TITLE] = e.path
            layers.append(Descriptor(media_type, d, e.size, annotations=dict(sorted(a.items()))))
            diff_ids.append(d)
        if tree_layer is not None:
            layers.append(tree_layer.descriptor(tree_ann))
            diff_ids.append(tree_layer.uncompressed)
        if modelpack:
            model_config: dict[str, Any] = {}
            if len(formats) == 1:
                model_config["format"] = formats.pop()
            descriptor: dict[str, Any] = {}
            if b.mtime:
                descriptor["createdAt"] = _rfc3339(b.mtime)
            cfg_doc = {
                "descriptor": descriptor,
                "modelfs": {"type": "layers", "diffIds": [str(d) for d in diff_ids]},
                "config": model_config,
            }
            config = b.json_blob(cfg_doc, mt.MODELPACK_CONFIG)
            art_type = mt.MODELPACK_ARTIFACT
        else:
            empty = digest_bytes(mt.OCI_EMPTY_DATA)
            b._add_blob(Blob(empty, 2, mt.OCI_EMPTY, data=mt.OCI_EMPTY_DATA, what="empty config"))
            config = Descriptor(mt.OCI_EMPTY, empty, 2, data=mt.OCI_EMPTY_DATA)
            art_type = artifact_type or DEFAULT_ARTIFACT_TYPE
            if not layers:  # OCI 1.1: an artifact without content has the empty descriptor as its layer
                layers.append(Descriptor(mt.OCI_EMPTY, empty, 2, data=mt.OCI_EMPTY_DATA))
        body = _manifest_doc(config, layers, art_type, anns)
        mdigest = digest_bytes(body)
        if plats is None:
            info = [ManifestInfo(None, mdigest, len(body))]
            return Built(fmt, mt.OCI_MANIFEST, body, mdigest, info, [], b.blobs, layers)
        index = _index_doc([(body, p) for p in plats], anns)
        infos = [ManifestInfo(p, mdigest, len(body)) for p in plats]
        return Built(fmt, mt.OCI_INDEX, index, digest_bytes(index), infos, [(body, mt.OCI_MANIFEST)], b.blobs, layers)

    return finish


# ------------------------------------------------------------------------------------------------
# Writing


def _push_blobs(
    blobs: Sequence[Blob],
    sink: Sink,
    *,
    concurrency: int,
    progress: ProgressFn | None,
    cache: DigestCache | None = None,
    cache_info: Mapping[int, _CacheInfo] | None = None,
    written: set[Digest] | None = None,
) -> None:
    """Write blobs in parallel (bounded), largest first. A blob without a digest gets one: from the
    cache when the destination has it (then it is not read at all), else by reading it, first or while
    the sink writes it (:meth:`Sink.wants_digest_first`). ``written``: digests written so far (a blob
    of the same content is written once); updated."""
    written = set() if written is None else written
    infos = cache_info or {}
    mu = threading.Lock()

    def one(blob: Blob) -> None:
        info = infos.get(id(blob))
        read_here = blob.digest is None
        if blob.digest is None and cache is not None and info is not None:
            known = cache.get(info.key)
            if known is not None and sink.has_blob(known, blob.size):
                blob.digest = known
                sink.stats.add(skipped=1)
                with mu:
                    written.add(known)
                _emit(progress, "blob-start", digest=str(known), size=blob.size)
                _emit(progress, "blob-done", digest=str(known), size=blob.size, cached=True, message="skipped")
                return
        started = time.time_ns()
        if blob.digest is None and sink.wants_digest_first(blob):
            hash_blob(blob)
        # A blob hashed while it is written is named by its path until its digest is known.
        label = str(blob.digest) if blob.digest is not None else f"upload:{blob.what}"
        _emit(progress, "blob-start", digest=label, size=blob.size)
        if blob.digest is not None:
            with mu:
                duplicate = blob.digest in written
                written.add(blob.digest)
            if duplicate:  # the same content as another blob, which is written
                _emit(progress, "blob-done", digest=label, size=blob.size, cached=True, message="duplicate")
                return

        def tick(n: int) -> None:
            _emit(progress, "bytes", digest=label, n=n)

        how = sink.put_blob(blob, tick if progress is not None else None)
        assert blob.digest is not None
        with mu:
            written.add(blob.digest)
        if read_here and cache is not None and info is not None:
            cache.put(info.key, blob.digest, info.newest_ctime_ns, started)
        message = how if label == blob.digest else f"{how} {blob.digest}"
        _emit(progress, "blob-done", digest=label, size=blob.size, cached=how != "pushed", message=message)

    order = sorted(blobs, key=lambda x: (-x.size, x.digest or "", x.what))
    _run_parallel([lambda x=x: one(x) for x in order], concurrency)


def _write_documents(built: Built, sink: Sink, progress: ProgressFn | None, concurrency: int) -> Descriptor:
    """The child manifests (in parallel), then the root under the sink's tag."""
    children: dict[Digest, tuple[bytes, str]] = {}
    for body, media_type in built.children:
        children.setdefault(digest_bytes(body), (body, media_type))
    _run_parallel([lambda c=c: sink.put_manifest(*c) for c in children.values()], concurrency)
    root = sink.put_root(built.body, built.media_type)
    _emit(progress, "done", digest=str(root.digest), size=root.size)
    return root


def write(
    built: Built, sink: Sink, *, concurrency: int = DEFAULT_CONCURRENCY, progress: ProgressFn | None = None
) -> Descriptor:
    """Blobs in parallel (bounded), then the child manifests, then the root under the sink's tag."""
    blobs = list(built.blobs.values())
    _emit(progress, "resolved", digest=str(built.digest), size=sum(x.size for x in blobs))
    _push_blobs(blobs, sink, concurrency=concurrency, progress=progress)
    return _write_documents(built, sink, progress, concurrency)


def pack(
    directory: str | os.PathLike[str],
    ref: str,
    *,
    format: str = "image",
    platforms: Sequence[Platform | str] | str | None = None,
    agnostic: bool = False,
    compression: str = "none",
    artifact_type: str | None = None,
    annotations: Mapping[str, str] | None = None,
    options: Any = None,
    progress: ProgressFn | None = None,
    large_file_size: int = DEFAULT_LARGE_FILE_SIZE,
    chunk_size: int | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    mount_from: Iterable[str] = (),
    workdir: str | os.PathLike[str] | None = None,
    sink: Sink | None = None,
    digest_cache: DigestCache | str | os.PathLike[str] | None = None,
) -> PackResult:
    """Pack ``directory`` and push it to ``ref`` (a registry reference, or ``oci:PATH[:TAG]``).

    ``platforms``: a list (or comma-separated string) of platforms for the index (default for
    images: :data:`DEFAULT_PLATFORMS`); ``agnostic``: one platform-less entry. ``options``: a
    :class:`imagevol.registry.transport.RegistryOptions`. ``progress`` receives
    :class:`imagevol.pull.ProgressEvent` values. ``chunk_size``: bytes per PATCH of a chunked
    upload (blobs up to that size go in one PUT). ``mount_from``: repositories on the same registry
    to mount blobs from. ``digest_cache``: a :class:`~imagevol.sinks.digestcache.DigestCache` or its
    file (default: the user's, see that module).

    Layers are pushed first: an uncompressed layer (a raw file, or a tar layer streamed from the files
    it holds) is read once, hashed while it uploads, unless a registry is to be asked first (small
    blobs, ``mount_from``, digests in the cache); then the configs, manifests and the root, whose
    digests depend on the layers'.
    """
    t0 = time.monotonic()
    if sink is None:
        sink = open_sink(ref, options=options, mount_from=tuple(mount_from), chunk_size=chunk_size)
    if workdir is None:
        from ..sinks.layout import LayoutSink

        if isinstance(sink, LayoutSink):
            workdir = sink.path  # scratch files are renamed into the layout's blobs
    cache = digest_cache if isinstance(digest_cache, DigestCache) else DigestCache.open(digest_cache)
    draft = _draft(
        directory,
        format=format,
        platforms=platforms,
        agnostic=agnostic,
        compression=compression,
        artifact_type=artifact_type,
        annotations=annotations,
        large_file_size=large_file_size,
        concurrency=concurrency,
        workdir=workdir,
        progress=progress,
    )
    built: Built | None = None
    try:
        layer_blobs = list(draft.builder.layer_blobs)
        _emit(progress, "resolved", digest=None, size=sum(x.size for x in layer_blobs), message=sink.describe())
        written: set[Digest] = set()
        _push_blobs(
            layer_blobs,
            sink,
            concurrency=concurrency,
            progress=progress,
            cache=cache,
            cache_info=draft.builder.cache_info,
            written=written,
        )
        built = draft.complete()
        rest = [x for d, x in built.blobs.items() if d not in written]
        _push_blobs(rest, sink, concurrency=concurrency, progress=progress, written=written)
        root = _write_documents(built, sink, progress, concurrency)
        cache.save()
    finally:
        draft.cleanup()
        if built is not None:
            built.cleanup()
        with contextlib.suppress(Exception):
            sink.close()
    st = sink.stats
    return PackResult(
        reference=ref,
        format=built.format,
        digest=root.digest,
        media_type=built.media_type,
        size=root.size,
        manifests=built.manifests,
        layers=built.layers,
        blobs_pushed=st.pushed,
        blobs_skipped=st.skipped,
        blobs_mounted=st.mounted,
        bytes_pushed=st.bytes_pushed,
        bytes_total=built.content_size,
        chunks=st.chunks,
        files=built.files,
        seconds=time.monotonic() - t0,
    )
