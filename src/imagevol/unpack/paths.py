"""Paths of layer entries inside the root: lexical cleaning and checks, and the per-path state.

``clean_path`` and ``_check_name`` turn an entry name into components that cannot leave the root
(``..`` clamped, NUL, NAME_MAX and PATH_MAX refused); MAX_SYMLINKS and MAX_DEPTH bound the
component-by-component resolution the applier does. ``_PathState`` remembers what one layer wrote
(for whiteouts, duplicates and the directory times set at the end), in memory up to SPILL_AT items
and in an unlinked temporary database past that, so memory stays flat in the number of entries.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import uuid
from collections.abc import Iterator

from ..errors import UnsafeContentError

log = logging.getLogger(__name__)

NAME_MAX = 255
PATH_MAX = 4096
# Longest chain of symlinks followed while resolving one path (Linux's limit is 40 as well).
MAX_SYMLINKS = 40
# Deepest directory the applier creates or resolves through; real images stay far below.
MAX_DEPTH = 256
# Per-path state of a layer beyond this many items moves from memory to a temporary database
# (_PathState), so memory stays flat in the number of entries.
SPILL_AT = 20_000


def clean_path(name: str) -> list[str]:
    """Lexical cleaning: components without '', '.', and '..' clamped at the root."""
    parts: list[str] = []
    for c in name.split("/"):
        if c in ("", "."):
            continue
        if c == "..":
            if parts:
                parts.pop()
            continue
        parts.append(c)
    return parts


def _key(parts: list[str]) -> str:
    return "/".join(parts)


def _child_key(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _check_name(name: str, what: str) -> list[str]:
    if "\0" in name:
        raise UnsafeContentError(f"layer entry {name!r}: {what} contains a NUL byte")
    parts = clean_path(name)
    for c in parts:
        if len(os.fsencode(c)) > NAME_MAX:
            raise UnsafeContentError(
                f"layer entry {name!r}: {what} has a component longer than {NAME_MAX} bytes",
                hint="no Linux filesystem can store such a name",
            )
    if len(os.fsencode(_key(parts))) >= PATH_MAX:
        raise UnsafeContentError(f"layer entry {name[:200]!r}...: {what} is longer than {PATH_MAX} bytes")
    return parts


# --------------------------------------------------------------------------------------------------
# What the applier remembers per path


class _PathState:
    """What one layer wrote, for whiteouts, duplicates and the directory times set at the end:

    * written: resolved key ('/'-joined, relative to the root) -> is a directory;
    * touched: every written key and all its ancestors (whiteouts keep what is in here);
    * fixups: directories whose mode/mtime are set at the end, in entry order;
    * kept times: directories this layer changes without an entry of their own keep their times
      (as umoci does): key -> (atime_ns, mtime_ns) before the first change.

    All of it grows with the number of entries, so memory stays flat: it is kept in dicts up to
    SPILL_AT items, then moved to a SQLite database in an unlinked file of the root's own file
    system (created with a random name, opened by SQLite, checked to be the file SQLite writes, and
    unlinked before any entry is applied: it never appears in the tree, and it is gone when closed).
    Where that cannot be done (a file system without locking, say), everything stays in memory, as
    the entry limit (ApplyOptions.max_entries) bounds it.
    """

    def __init__(self, root_fd: int) -> None:
        self._root_fd = root_fd
        self._written: dict[str, bool] = {}
        self._touched: set[str] = {""}
        self._fixups: list[tuple[str, int | None, int]] = []
        self._kept: dict[str, tuple[int, int]] = {}
        self._db: sqlite3.Connection | None = None
        self._spill_failed = False

    def _maybe_spill(self) -> None:
        """Called before each change, so that a change is made whole in one place or the other."""
        if self._db is not None or self._spill_failed:
            return
        if len(self._written) + len(self._touched) + len(self._fixups) + len(self._kept) >= SPILL_AT:
            self._spill()

    def _spill(self) -> None:
        db = self._open_db()
        if db is None:
            self._spill_failed = True
            return
        db.executemany("INSERT INTO written VALUES (?, ?)", self._written.items())
        db.executemany("INSERT INTO touched VALUES (?)", ((k,) for k in self._touched))
        db.executemany("INSERT INTO fixups (key, mode, mtime) VALUES (?, ?, ?)", self._fixups)
        db.executemany("INSERT INTO kept VALUES (?, ?, ?)", ((k, a, m) for k, (a, m) in self._kept.items()))
        self._written, self._touched, self._fixups, self._kept = {}, set(), [], {}
        self._db = db

    def _open_db(self) -> sqlite3.Connection | None:
        name = f".imagevol-apply-{uuid.uuid4().hex}"
        root_st = os.fstat(self._root_fd)  # the root's times are put back: the file comes and goes
        try:
            fd = os.open(
                name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self._root_fd
            )
        except OSError as e:
            log.debug("per-path state stays in memory: %s", e)
            return None
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(f"/proc/self/fd/{self._root_fd}/{name}", isolation_level=None, check_same_thread=False)
            for pragma in ("journal_mode=OFF", "synchronous=OFF", "locking_mode=EXCLUSIVE", "cache_size=-4096"):
                db.execute(f"PRAGMA {pragma}")
            db.execute("CREATE TABLE written (key TEXT PRIMARY KEY, dir INTEGER) WITHOUT ROWID")
            db.execute("CREATE TABLE touched (key TEXT PRIMARY KEY) WITHOUT ROWID")
            db.execute("CREATE TABLE fixups (seq INTEGER PRIMARY KEY, key TEXT, mode INTEGER, mtime INTEGER)")
            db.execute("CREATE INDEX fixups_key ON fixups (key)")
            db.execute("CREATE TABLE kept (key TEXT PRIMARY KEY, atime INTEGER, mtime INTEGER) WITHOUT ROWID")
            if os.fstat(fd).st_size == 0:  # SQLite wrote somewhere else (it resolves the path itself)
                raise OSError(errno.EIO, "the database is not the file created for it")
            db.execute("BEGIN")  # one transaction, never committed: nothing is synced
            return db
        except (sqlite3.Error, OSError) as e:
            log.debug("per-path state stays in memory: %s", e)
            if db is not None:
                db.close()
            return None
        finally:
            os.unlink(name, dir_fd=self._root_fd)
            os.close(fd)
            try:
                os.utime(self._root_fd, ns=(root_st.st_atime_ns, root_st.st_mtime_ns))
            except OSError:
                pass  # a root that is not ours (the finished layer's fixups still apply)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def mark(self, key: str, is_dir: bool) -> None:
        self._maybe_spill()
        db = self._db
        if db is None:
            self._written[key] = is_dir
            k = key
            while k not in self._touched:
                self._touched.add(k)
                k = k.rpartition("/")[0]
            return
        db.execute("INSERT OR REPLACE INTO written VALUES (?, ?)", (key, is_dir))
        k = key
        while db.execute("INSERT OR IGNORE INTO touched VALUES (?)", (k,)).rowcount:
            k = k.rpartition("/")[0]

    def written(self, key: str) -> bool | None:
        """Whether this layer wrote `key` as a directory (True), a non-directory (False), or not at all."""
        if self._db is None:
            return self._written.get(key)
        row = self._db.execute("SELECT dir FROM written WHERE key = ?", (key,)).fetchone()
        return None if row is None else bool(row[0])

    def touched(self, key: str) -> bool:
        if self._db is None:
            return key in self._touched
        return self._db.execute("SELECT 1 FROM touched WHERE key = ?", (key,)).fetchone() is not None

    def add_fixup(self, key: str, mode: int | None, mtime_ns: int) -> None:
        self._maybe_spill()
        if self._db is None:
            self._fixups.append((key, mode, mtime_ns))
        else:
            self._db.execute("INSERT INTO fixups (key, mode, mtime) VALUES (?, ?, ?)", (key, mode, mtime_ns))

    def fixups(self) -> Iterator[tuple[str, int | None, int]]:
        if self._db is None:
            yield from self._fixups
            return
        last = 0
        while rows := self._db.execute(
            "SELECT seq, key, mode, mtime FROM fixups WHERE seq > ? ORDER BY seq LIMIT 1000", (last,)
        ).fetchall():
            for seq, key, mode, mtime in rows:
                last = seq
                yield key, mode, mtime

    def has_kept_times(self, key: str) -> bool:
        if self._db is None:
            return key in self._kept
        return self._db.execute("SELECT 1 FROM kept WHERE key = ?", (key,)).fetchone() is not None

    def keep_times(self, key: str, atime_ns: int, mtime_ns: int) -> None:
        self._maybe_spill()
        if self._db is None:
            self._kept[key] = (atime_ns, mtime_ns)
        else:
            self._db.execute("INSERT OR IGNORE INTO kept VALUES (?, ?, ?)", (key, atime_ns, mtime_ns))

    def kept_times_without_fixup(self) -> Iterator[tuple[str, int, int]]:
        """Kept times of directories without a fixup of their own (those set their own mtime)."""
        if self._db is None:
            explicit = {key for key, _, _ in self._fixups}
            for key, (atime_ns, mtime_ns) in self._kept.items():
                if key not in explicit:
                    yield key, atime_ns, mtime_ns
            return
        last = ""
        while rows := self._db.execute(
            "SELECT key, atime, mtime FROM kept WHERE key > ? AND key NOT IN (SELECT key FROM fixups) "
            "ORDER BY key LIMIT 1000",
            (last,),
        ).fetchall():
            for key, atime_ns, mtime_ns in rows:
                last = key
                yield key, atime_ns, mtime_ns
