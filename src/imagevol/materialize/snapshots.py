"""Snapshots in the store: :class:`Snapshot`, its key (:func:`snapshot_key`), where it lives
(:func:`snapshots_dir`, its lock, info and record files), reuse of a ready one
(:func:`find_snapshot`), removal (:func:`remove_snapshot`) and the ``.build-*`` leftovers of
crashed or failed builds (:func:`clean_stale_builds`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import mediatypes as mt
from ..digest import Digest
from ..errors import ImagevolError, StoreError
from ..fstree import _walk_fd, count_files, force_rmtree
from ..fsutil import fsync_dir as _fsync_dir
from ..manifest import Manifest
from ..manifest import flavour as manifest_flavour
from ..store import Store
from ..unpack.applier import ApplyOptions
from .options import (
    _DIR_FLAGS,
    _KEY_RE,
    _NEW_FILE,
    BUILD_PREFIX,
    INFO_PREFIX,
    RECORD_PREFIX,
    SNAPSHOT_FORMAT,
    SNAPSHOTS,
    MaterializeOptions,
)
from .paths import _layer_path

log = logging.getLogger(__name__)


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
