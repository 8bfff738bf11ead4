"""The check of snapshots against their records, for ``imagevol fsck``: :func:`verify_snapshot`
compares one tree with its record (walked side by side, so memory does not grow with the tree),
:func:`check_snapshots` checks every snapshot and, on repair, drops the damaged ones no volume
uses (:class:`SnapshotCheck` says what it found).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..digest import Digest
from ..errors import InvalidDigestError
from ..fstree import _walk_tree
from ..store import Store
from .options import _DIR_FLAGS, _KEY_RE, SNAPSHOTS
from .record import _entry, _hash_at, _record_order, read_record
from .snapshots import _record_path, clean_stale_builds, remove_snapshot


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
