"""Digests of packed content, remembered by the identity of the files it was read from.

A large blob is hashed while it uploads, so its digest is not known before it is sent and the
registry cannot be asked first whether it has it. This cache makes a second pack of unchanged files
as cheap as before: a blob whose files have the same device, inode, size, mtime and ctime as when
it was last read gets its digest from here, and a ``HEAD`` (or a look into the layout) decides
whether it is sent at all. A blob the destination does not have is read and hashed again (the
cached digest is not trusted for the upload itself).

A file changed within a clock tick of the moment it was read could keep its times, so an entry is
recorded only for files whose ctime is at least :data:`RACY_NS` older than the start of the read
(git's "racily clean" rule). ctime cannot be set by users: any write, chmod or rename of a file
moves it forward.

Location: ``$IMAGEVOL_PACK_CACHE`` (a file; ``off`` disables the cache), else
``$XDG_CACHE_HOME/imagevol/pack-digests.json``, else ``~/.cache/imagevol/pack-digests.json``. The
file is JSON, rewritten atomically (merged with what other processes wrote meanwhile), and holds at
most :data:`MAX_ENTRIES` entries (the most recently used). It is an optimisation: an unreadable or
unwritable cache is ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

from ..digest import Digest

__all__ = ["RACY_NS", "DigestCache", "default_cache_path", "file_identity"]

log = logging.getLogger("imagevol.pack")

ENV = "IMAGEVOL_PACK_CACHE"
MAX_ENTRIES = 20_000
RACY_NS = 2_000_000_000
VERSION = 1


def default_cache_path() -> Path | None:
    value = os.environ.get(ENV)
    if value is not None:
        value = value.strip()
        return None if value.lower() in ("", "off", "0", "none") else Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):
        return None
    return Path(base) / "imagevol" / "pack-digests.json"


def file_identity(st: os.stat_result) -> str:
    """What identifies a file's content without reading it."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def composite_key(kind: str, parts: list[bytes | str]) -> str:
    """A key for a blob made of bytes and files (``str`` items: :func:`file_identity` values)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, str):
            data = p.encode()
            h.update(b"F%d:" % len(data) + data)
        else:
            h.update(b"B%d:" % len(p) + p)
    return f"{kind}:{h.hexdigest()}"


class DigestCache:
    """key -> digest, loaded once, saved once (thread-safe in between)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, list] = {}  # key -> [digest, last used (unix seconds)]
        self._dirty = False
        self._mu = threading.Lock()
        if path is not None:
            self._entries = self._load(path)

    @classmethod
    def open(cls, path: Path | str | None = None) -> DigestCache:
        return cls(Path(path) if path is not None else default_cache_path())

    @staticmethod
    def _load(path: Path) -> dict[str, list]:
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.debug("digest cache %s unreadable: %s", path, e)
            return {}
        if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("entries"), dict):
            return {}
        out: dict[str, list] = {}
        for k, v in doc["entries"].items():
            if isinstance(k, str) and isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                out[k] = v
        return out

    def get(self, key: str | None) -> Digest | None:
        if key is None:
            return None
        with self._mu:
            v = self._entries.get(key)
            if v is None:
                return None
            try:
                d = Digest(v[0])
            except Exception:
                return None
            v[1] = int(time.time())
            self._dirty = True
            return d

    def put(self, key: str | None, digest: Digest, newest_ctime_ns: int, read_started_ns: int) -> bool:
        """Remember ``key -> digest`` unless a file of the key changed too close to the read."""
        if key is None or self.path is None or newest_ctime_ns >= read_started_ns - RACY_NS:
            return False
        with self._mu:
            self._entries[key] = [str(digest), int(time.time())]
            self._dirty = True
        return True

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._mu:
                merged = self._load(self.path)
                for k, v in self._entries.items():
                    if k not in merged or merged[k][1] <= v[1]:
                        merged[k] = v
                if len(merged) > MAX_ENTRIES:
                    keep = sorted(merged.items(), key=lambda kv: kv[1][1], reverse=True)[:MAX_ENTRIES]
                    merged = dict(keep)
                body = json.dumps({"version": VERSION, "entries": merged}, separators=(",", ":")).encode()
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
                try:
                    with open(tmp, "wb") as f:
                        f.write(body)
                    os.replace(tmp, self.path)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
                self._dirty = False
        except OSError as e:
            log.debug("digest cache %s not written: %s", self.path, e)
