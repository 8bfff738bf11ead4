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
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import mediatypes as mt
from .digest import Digest, digest_bytes
from .errors import ImagevolError, UsageError
from .manifest import Descriptor
from .platform import Platform, parse_platform, parse_platform_list
from .pull import ProgressEvent, ProgressFn
from .sinks import Blob, Sink, open_sink
from .tarwriter import COMPRESSIONS, LayerWriter, source_date_epoch

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
CHUNK = 1 << 20

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
                if first is not None:
                    out.append(Entry(path, "hardlink", mode, cst.st_size, child.path, target=first))
                else:
                    if cst.st_nlink > 1:
                        inodes[key] = path
                    out.append(Entry(path, "file", mode, cst.st_size, child.path))
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
    """A packed directory before it is written anywhere: blobs (files in ``workdir`` or the source
    files themselves), child manifests and the root document."""

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
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="imagevol-pack") as ex:
        futures: list[Future[Any]] = [ex.submit(fn) for fn in fns]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                for p in pending:
                    p.cancel()
                raise f.exception()  # type: ignore[misc]
        return [f.result() for f in futures]


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

    def _add_blob(self, blob: Blob) -> None:
        self.blobs.setdefault(blob.digest, blob)

    def tar_layer(self, plan: LayerPlan, media_type: str) -> tuple[Descriptor, Digest]:
        """Write one tar layer to a scratch file; (descriptor, diff_id)."""
        _emit(self.progress, "pack-layer", message=plan.name)
        fd, tmp = tempfile.mkstemp(prefix="layer-", dir=self.workdir)
        with os.fdopen(fd, "wb") as f:
            w = LayerWriter(f, self.compression, mtime=self.mtime)
            for e in plan.entries:
                if e.kind == "dir":
                    w.tar.add_dir(e.path, e.mode)
                elif e.kind == "symlink":
                    w.tar.add_symlink(e.path, e.target)
                elif e.kind == "hardlink":
                    w.tar.add_hardlink(e.path, e.target, e.mode)
                else:
                    w.tar.add_file(e.path, e.source, e.mode, e.size)
            digest, size, diff_id, _raw = w.finish()
        path = self.workdir / digest.hex
        os.replace(tmp, path)
        self._add_blob(Blob(digest, size, media_type, path=path, temporary=True, what=plan.name))
        _emit(self.progress, "pack-layer-done", digest=str(digest), size=size, message=plan.name)
        return Descriptor(media_type, digest, size), diff_id

    def raw_file(self, e: Entry) -> Digest:
        h = hashlib.sha256()
        n = 0
        with open(e.source, "rb", buffering=0) as f:
            while data := f.read(CHUNK):
                h.update(data)
                n += len(data)
        if n != e.size:
            raise ImagevolError(f"{e.source} changed while it was packed", hint="do not modify the directory now")
        d = Digest("sha256:" + h.hexdigest())
        self._add_blob(Blob(d, n, RAW_FILE_TYPE, path=Path(e.source), what=e.path))
        return d

    def json_blob(self, doc: Any, media_type: str) -> Descriptor:
        body = _dumps(doc)
        d = digest_bytes(body)
        self._add_blob(Blob(d, len(body), media_type, data=body, what=media_type))
        return Descriptor(media_type, d, len(body))


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
    """Pack ``directory`` into blobs and manifests (nothing is pushed). Call ``cleanup()`` on the
    result when done (it owns a scratch directory under ``workdir`` or the system's temp dir)."""
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
            built = _build_image(b, entries, plats or [], agnostic, anns, concurrency)
        else:
            built = _build_artifact(b, entries, format, plats, artifact_type, anns, concurrency)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    built.workdir = scratch
    built.files = sum(1 for e in entries if e.kind in ("file", "hardlink"))
    return built


def _build_image(
    b: _Builder,
    entries: list[Entry],
    plats: list[Platform],
    agnostic: bool,
    anns: dict[str, str],
    concurrency: int,
) -> Built:
    plans = plan_image_layers(entries, b.large_file_size)
    media_type = _LAYER_TYPES[b.compression]
    results = _run_parallel([lambda p=p: b.tar_layer(p, media_type) for p in plans], concurrency)
    layers = [d for d, _ in results]
    diff_ids = [x for _, x in results]
    children: list[tuple[bytes, str]] = []
    index_entries: list[tuple[bytes, Platform | None]] = []
    infos: list[ManifestInfo] = []
    targets: list[tuple[Platform, Platform | None]] = (
        [(AGNOSTIC_PLATFORM, None)] if agnostic else [(p, p) for p in plats]
    )
    for config_plat, entry_plat in targets:
        cfg = b.json_blob(_image_config(config_plat, diff_ids, b.mtime), mt.OCI_CONFIG)
        body = _manifest_doc(cfg, layers, None, anns)
        children.append((body, mt.OCI_MANIFEST))
        index_entries.append((body, entry_plat))
        infos.append(ManifestInfo(entry_plat, digest_bytes(body), len(body)))
    index = _index_doc(index_entries, anns)
    return Built("image", mt.OCI_INDEX, index, digest_bytes(index), infos, children, b.blobs, layers)


def _build_artifact(
    b: _Builder,
    entries: list[Entry],
    fmt: str,
    plats: list[Platform] | None,
    artifact_type: str | None,
    anns: dict[str, str],
    concurrency: int,
) -> Built:
    modelpack = fmt == "modelpack"
    files = [e for e in entries if e.kind in ("file", "hardlink")]
    raw = files if modelpack else [e for e in files if _plain_mode(e.mode)]
    raw_paths = {e.path for e in raw}
    tree = _tree_plan(entries, raw_paths)
    # Hash the files (in parallel); hard links hash once.
    primaries = [e for e in raw if e.kind == "file"]
    digests = dict(
        zip(
            (e.path for e in primaries),
            _run_parallel([lambda e=e: b.raw_file(e) for e in primaries], concurrency),
            strict=True,
        )
    )
    by_inode_target = {e.path: digests[e.target] for e in raw if e.kind == "hardlink" and e.target in digests}
    layers: list[Descriptor] = []
    diff_ids: list[Digest] = []
    formats: set[str] = set()
    for e in raw:
        d = digests.get(e.path) or by_inode_target.get(e.path)
        if d is None:  # a hard link to a file that is not a raw layer (an executable): hash it
            d = b.raw_file(Entry(e.path, "file", e.mode, e.size, e.source))
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
    if tree is not None:
        if modelpack:
            tree_type = f"{mt.MODELPACK_LAYER_PREFIX}weight.config.v1.{_TAR_SUFFIX[b.compression]}"
            tree_ann = {mt.ANN_CNCF_FILEPATH: TREE_TITLE, mt.ANN_TITLE: TREE_TITLE, mt.ANN_IMAGEVOL_ROOT: "true"}
        else:
            tree_type = _LAYER_TYPES[b.compression]
            tree_ann = {mt.ANN_TITLE: TREE_TITLE, mt.ANN_IMAGEVOL_ROOT: "true"}
        desc, diff_id = b.tar_layer(tree, tree_type)
        layers.append(Descriptor(tree_type, desc.digest, desc.size, annotations=tree_ann))
        diff_ids.append(diff_id)
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


# ------------------------------------------------------------------------------------------------
# Writing


def write(
    built: Built, sink: Sink, *, concurrency: int = DEFAULT_CONCURRENCY, progress: ProgressFn | None = None
) -> Descriptor:
    """Blobs in parallel (bounded), then the child manifests, then the root under the sink's tag."""
    blobs = sorted(built.blobs.values(), key=lambda x: (-x.size, x.digest))
    _emit(progress, "resolved", digest=str(built.digest), size=sum(x.size for x in blobs))

    def one(blob: Blob) -> str:
        _emit(progress, "blob-start", digest=str(blob.digest), size=blob.size)

        def tick(n: int) -> None:
            _emit(progress, "bytes", digest=str(blob.digest), n=n)

        how = sink.put_blob(blob, tick if progress is not None else None)
        _emit(progress, "blob-done", digest=str(blob.digest), size=blob.size, cached=how != "pushed", message=how)
        return how

    _run_parallel([lambda x=x: one(x) for x in blobs], concurrency)
    seen: set[Digest] = set()
    for body, media_type in built.children:
        d = digest_bytes(body)
        if d not in seen:
            seen.add(d)
            sink.put_manifest(body, media_type)
    root = sink.put_root(built.body, built.media_type)
    _emit(progress, "done", digest=str(root.digest), size=root.size)
    return root


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
) -> PackResult:
    """Pack ``directory`` and push it to ``ref`` (a registry reference, or ``oci:PATH[:TAG]``).

    ``platforms``: a list (or comma-separated string) of platforms for the index (default for
    images: :data:`DEFAULT_PLATFORMS`); ``agnostic``: one platform-less entry. ``options``: a
    :class:`imagevol.sources.registry.RegistryOptions`. ``progress`` receives
    :class:`imagevol.pull.ProgressEvent` values. ``chunk_size``: bytes per PATCH of a chunked
    upload (blobs up to that size go in one PUT). ``mount_from``: repositories on the same registry
    to mount blobs from.
    """
    t0 = time.monotonic()
    if sink is None:
        sink = open_sink(ref, options=options, mount_from=tuple(mount_from), chunk_size=chunk_size)
    if workdir is None:
        from .sinks.layout import LayoutSink

        if isinstance(sink, LayoutSink):
            workdir = sink.path  # scratch files are renamed into the layout's blobs
    built = build(
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
        root = write(built, sink, concurrency=concurrency, progress=progress)
    finally:
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
