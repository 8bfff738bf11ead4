"""SQLite metadata of the store: refs, ownership (children), leases, snapshots, volumes.

One database file (``R/meta.db``) shared by every imagevol process: WAL journal, a 30 s busy
timeout, and short transactions (``BEGIN IMMEDIATE`` for writes, so writers queue instead of failing
on lock upgrade). A ``schema_version`` table records the layout; a newer schema is refused.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..digest import Digest
from ..errors import StoreError

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30000

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS refs (
    ref        TEXT PRIMARY KEY,
    digest     TEXT NOT NULL,
    media_type TEXT NOT NULL,
    platform   TEXT,
    source     TEXT,
    pulled_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS children (
    parent TEXT NOT NULL,
    idx    INTEGER NOT NULL,
    child  TEXT NOT NULL,
    PRIMARY KEY (parent, idx)
);
CREATE INDEX IF NOT EXISTS children_child ON children (child);
CREATE TABLE IF NOT EXISTS leases (
    id         TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    pid        INTEGER,
    pid_start  INTEGER
);
CREATE TABLE IF NOT EXISTS lease_roots (
    lease_id TEXT NOT NULL REFERENCES leases (id) ON DELETE CASCADE,
    digest   TEXT NOT NULL,
    PRIMARY KEY (lease_id, digest)
);
CREATE TABLE IF NOT EXISTS snapshots (
    key        TEXT PRIMARY KEY,
    path       TEXT NOT NULL,
    state      TEXT NOT NULL,
    digest     TEXT,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS volumes (
    id           TEXT PRIMARY KEY,
    target       TEXT NOT NULL UNIQUE,
    ref          TEXT,
    digest       TEXT NOT NULL,
    snapshot_key TEXT,
    mode         TEXT NOT NULL,
    created_at   REAL NOT NULL
);
"""

_MIGRATIONS: dict[int, str] = {1: _SCHEMA_V1}


@dataclass(frozen=True)
class RefRecord:
    ref: str
    digest: Digest
    media_type: str
    platform: str | None
    source: str | None
    pulled_at: float


@dataclass(frozen=True)
class Lease:
    id: str
    kind: str
    roots: tuple[Digest, ...]
    created_at: float
    expires_at: float | None
    pid: int | None
    #: past ``expires_at``, or (kind "pull") its process is gone
    expired: bool


@dataclass(frozen=True)
class SnapshotRecord:
    key: str
    path: str
    state: str
    digest: Digest | None
    updated_at: float


@dataclass(frozen=True)
class VolumeRecord:
    id: str
    target: str
    ref: str | None
    digest: Digest
    snapshot_key: str | None
    mode: str
    created_at: float


def _proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (guards against pid reuse), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of stat(5); fields[0] is field 3
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, start: int | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when ``start`` is known, is the same process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    rest = raw[raw.rfind(b")") + 2 :].split()
    if rest and rest[0] in (b"Z", b"X"):
        return False
    if start is not None:
        try:
            return int(rest[19]) == start
        except (IndexError, ValueError):
            return True
    return True


def _text(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise StoreError(f"{what} must be a non-empty string, got {value!r}")
    return value


class Meta:
    """Metadata database. Thread-safe (one connection behind a lock); open one per process."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._mu = threading.RLock()
        try:
            self._db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot open metadata database {self.path}: {e}") from e
        self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._set_wal()
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    def _set_wal(self) -> None:
        # Switching the journal mode needs an exclusive lock and may not wait on the busy handler.
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise StoreError(f"cannot open metadata database {self.path}: {e}") from e
                time.sleep(0.05)
        if str(mode).lower() != "wal":
            raise StoreError(f"metadata database {self.path} cannot use WAL (journal mode {mode})")

    def _migrate(self) -> None:
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT max(version) FROM schema_version").fetchone()
            current = row[0] or 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"metadata database {self.path} has schema {current}; this imagevol knows {SCHEMA_VERSION}",
                    hint="use a newer imagevol with this store",
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for stmt in _MIGRATIONS[version].split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction (BEGIN IMMEDIATE: take the write lock up front)."""
        with self._mu:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise StoreError(f"metadata database {self.path} is busy: {e}") from e
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._mu:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._mu:
            self._db.close()

    def schema_version(self) -> int:
        return int(self._query("SELECT max(version) FROM schema_version")[0][0])

    # -- refs --------------------------------------------------------------------------------------
    def set_ref(
        self,
        ref: str,
        digest: Digest,
        *,
        media_type: str,
        platform: str | None = None,
        source: str | None = None,
    ) -> None:
        d = Digest(digest)
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO refs (ref, digest, media_type, platform, source, pulled_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (_text(ref, "ref"), str(d), media_type or "", platform, source, time.time()),
            )

    @staticmethod
    def _ref(row: tuple) -> RefRecord:
        return RefRecord(row[0], Digest(row[1]), row[2], row[3], row[4], row[5])

    def get_ref(self, ref: str) -> RefRecord | None:
        rows = self._query(
            "SELECT ref, digest, media_type, platform, source, pulled_at FROM refs WHERE ref = ?", (ref,)
        )
        return self._ref(rows[0]) if rows else None

    def list_refs(self) -> list[RefRecord]:
        rows = self._query("SELECT ref, digest, media_type, platform, source, pulled_at FROM refs ORDER BY ref")
        return [self._ref(r) for r in rows]

    def refs_to(self, digest: Digest) -> list[RefRecord]:
        rows = self._query(
            "SELECT ref, digest, media_type, platform, source, pulled_at FROM refs WHERE digest = ? ORDER BY ref",
            (str(Digest(digest)),),
        )
        return [self._ref(r) for r in rows]

    def remove_ref(self, ref: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM refs WHERE ref = ?", (ref,)).rowcount > 0

    # -- ownership ---------------------------------------------------------------------------------
    def set_children(self, parent: Digest, children: Iterable[Digest]) -> None:
        """Record (replace) the blobs a manifest/index owns, in order, duplicates dropped."""
        p = Digest(parent)
        kids: list[str] = []
        for c in children:
            s = str(Digest(c))
            if s not in kids:
                kids.append(s)
        with self._tx() as db:
            db.execute("DELETE FROM children WHERE parent = ?", (str(p),))
            db.executemany(
                "INSERT INTO children (parent, idx, child) VALUES (?, ?, ?)",
                [(str(p), i, c) for i, c in enumerate(kids)],
            )

    def children(self, parent: Digest) -> list[Digest]:
        rows = self._query("SELECT child FROM children WHERE parent = ? ORDER BY idx", (str(Digest(parent)),))
        return [Digest(r[0]) for r in rows]

    def parents(self, child: Digest) -> list[Digest]:
        rows = self._query(
            "SELECT DISTINCT parent FROM children WHERE child = ? ORDER BY parent", (str(Digest(child)),)
        )
        return [Digest(r[0]) for r in rows]

    def all_children(self) -> dict[Digest, list[Digest]]:
        out: dict[Digest, list[Digest]] = {}
        for parent, child in self._query("SELECT parent, child FROM children ORDER BY parent, idx"):
            out.setdefault(Digest(parent), []).append(Digest(child))
        return out

    def remove_children_of(self, parents: Iterable[Digest]) -> None:
        with self._tx() as db:
            db.executemany("DELETE FROM children WHERE parent = ?", [(str(Digest(p)),) for p in parents])

    # -- leases ------------------------------------------------------------------------------------
    def add_lease(
        self,
        lease_id: str,
        roots: Iterable[Digest],
        *,
        kind: str,
        expires_at: float | None = None,
        pid: int | None = None,
    ) -> None:
        """Create a lease, or update one: kind/expiry/pid are replaced and the roots are ADDED."""
        digests = sorted({str(Digest(r)) for r in roots})
        start = _proc_start_time(pid) if pid is not None else None
        with self._tx() as db:
            db.execute(
                "INSERT INTO leases (id, kind, created_at, expires_at, pid, pid_start)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, expires_at = excluded.expires_at,"
                " pid = excluded.pid, pid_start = excluded.pid_start",
                (_text(lease_id, "lease id"), _text(kind, "lease kind"), time.time(), expires_at, pid, start),
            )
            db.executemany(
                "INSERT OR IGNORE INTO lease_roots (lease_id, digest) VALUES (?, ?)",
                [(lease_id, d) for d in digests],
            )

    def remove_lease(self, lease_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM lease_roots WHERE lease_id = ?", (lease_id,))
            db.execute("DELETE FROM leases WHERE id = ?", (lease_id,))

    def leases(self) -> list[Lease]:
        rows = self._query("SELECT id, kind, created_at, expires_at, pid, pid_start FROM leases ORDER BY id")
        roots: dict[str, list[Digest]] = {}
        for lease_id, digest in self._query("SELECT lease_id, digest FROM lease_roots ORDER BY lease_id, digest"):
            roots.setdefault(lease_id, []).append(Digest(digest))
        now = time.time()
        out = []
        for lease_id, kind, created_at, expires_at, pid, pid_start in rows:
            expired = expires_at is not None and expires_at <= now
            if not expired and kind == "pull" and pid is not None:
                expired = not pid_alive(pid, pid_start)
            out.append(Lease(lease_id, kind, tuple(roots.get(lease_id, ())), created_at, expires_at, pid, expired))
        return out

    def get_lease(self, lease_id: str) -> Lease | None:
        for lease in self.leases():
            if lease.id == lease_id:
                return lease
        return None

    # -- snapshots ---------------------------------------------------------------------------------
    def set_snapshot(self, key: str, path: str, state: str, *, digest: Digest | None = None) -> None:
        """Record a snapshot (``state`` "building" or "ready"); ``digest`` = manifest it was built from."""
        d = str(Digest(digest)) if digest is not None else None
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO snapshots (key, path, state, digest, updated_at) VALUES (?, ?, ?, ?, ?)",
                (_text(key, "snapshot key"), os.fspath(path), _text(state, "snapshot state"), d, time.time()),
            )

    @staticmethod
    def _snap(row: tuple) -> SnapshotRecord:
        return SnapshotRecord(row[0], row[1], row[2], Digest(row[3]) if row[3] else None, row[4])

    def get_snapshot(self, key: str) -> SnapshotRecord | None:
        rows = self._query("SELECT key, path, state, digest, updated_at FROM snapshots WHERE key = ?", (key,))
        return self._snap(rows[0]) if rows else None

    def list_snapshots(self) -> list[SnapshotRecord]:
        rows = self._query("SELECT key, path, state, digest, updated_at FROM snapshots ORDER BY key")
        return [self._snap(r) for r in rows]

    def remove_snapshot(self, key: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM snapshots WHERE key = ?", (key,)).rowcount > 0

    # -- volumes -----------------------------------------------------------------------------------
    def add_volume(
        self,
        volume_id: str,
        target: str,
        ref: str | None,
        digest: Digest,
        snapshot_key: str | None,
        mode: str,
        created_at: float | None = None,
    ) -> VolumeRecord:
        """Record a mounted volume; StoreError if the id or the target is already recorded."""
        rec = VolumeRecord(
            _text(volume_id, "volume id"),
            _text(os.fspath(target), "volume target"),
            ref,
            Digest(digest),
            snapshot_key,
            _text(mode, "volume mode"),
            time.time() if created_at is None else float(created_at),
        )
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO volumes (id, target, ref, digest, snapshot_key, mode, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        rec.id,
                        rec.target,
                        rec.ref,
                        str(rec.digest),
                        rec.snapshot_key,
                        rec.mode,
                        rec.created_at,
                    ),
                )
        except sqlite3.IntegrityError as e:
            raise StoreError(
                f"volume {volume_id!r} or target {rec.target!r} is already recorded",
                hint="unmount the existing volume first",
            ) from e
        return rec

    @staticmethod
    def _vol(row: tuple) -> VolumeRecord:
        return VolumeRecord(row[0], row[1], row[2], Digest(row[3]), row[4], row[5], row[6])

    _VOL_COLS = "id, target, ref, digest, snapshot_key, mode, created_at"

    def get_volume(self, volume_id: str) -> VolumeRecord | None:
        rows = self._query(f"SELECT {self._VOL_COLS} FROM volumes WHERE id = ?", (volume_id,))
        return self._vol(rows[0]) if rows else None

    def get_volume_by_target(self, target: str) -> VolumeRecord | None:
        rows = self._query(f"SELECT {self._VOL_COLS} FROM volumes WHERE target = ?", (os.fspath(target),))
        return self._vol(rows[0]) if rows else None

    def list_volumes(self) -> list[VolumeRecord]:
        return [self._vol(r) for r in self._query(f"SELECT {self._VOL_COLS} FROM volumes ORDER BY created_at, id")]

    def remove_volume(self, volume_id: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM volumes WHERE id = ?", (volume_id,)).rowcount > 0
