"""Building: a scanned and planned directory becomes blobs and documents, nothing is written
anywhere. :class:`_Builder` makes the layers (tar layers as parts or compressed scratch files, raw
file blobs; digests may come later, while they are pushed) and the config blobs; the drafts
(:func:`_draft`, :func:`_draft_image`, :func:`_draft_artifact`) turn them into the config, manifest
and index documents once every layer has its digest (:class:`Built`); :func:`build` hashes
everything first. Also the parallel runner the build and the push share (:func:`_run_parallel`: the
first error or an interrupt cancels the rest)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import mediatypes as mt
from ..digest import Digest, digest_bytes
from ..errors import UsageError
from ..manifest import Descriptor
from ..platform import Platform
from ..progress import ProgressEvent, ProgressFn
from ..registry.client import interruptible_by
from ..sinks import Blob, FileRange, hash_blob, stop_with
from ..sinks.digestcache import composite_key
from .plan import LayerPlan, _plain_mode, _resolve_platforms, _tree_plan, plan_image_layers
from .spec import (
    _FORMAT_BY_EXT,
    _LAYER_TYPES,
    _TAR_SUFFIX,
    AGNOSTIC_PLATFORM,
    ANN_UNTESTED,
    DEFAULT_ARTIFACT_TYPE,
    DEFAULT_CONCURRENCY,
    DEFAULT_LARGE_FILE_SIZE,
    FORMATS,
    RAW_FILE_TYPE,
    TREE_TITLE,
    Entry,
    modelpack_kind,
    scan_tree,
)
from .tarwriter import COMPRESSIONS, LayerWriter, TarParts, source_date_epoch


def _dumps(doc: Any) -> bytes:
    """Compact JSON with the key order the document was built in (deterministic)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()


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
