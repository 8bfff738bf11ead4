"""Apply one image layer (a tar stream) onto a directory, safely.

imagevol runs as root and unpacks content from the network, so the applier assumes every layer is
hostile. The rules (SPEC.md, "Layer extraction safety"):

* Every entry path is cleaned lexically (leading ``/`` and ``./`` dropped, ``..`` clamped at the root)
  and then resolved component by component *inside* the root: each step opens the next directory
  with ``O_NOFOLLOW`` relative to the previous one's descriptor; a symlink met on the way is read and
  its target resolved again from the root (absolute targets are root-relative) or from its own
  directory (relative targets), with ``..`` never climbing above the root. No system call is ever
  given more than one component of a layer path, so the kernel never resolves anything outside the
  root, even if the tree changes under the applier.
* The last component is never followed: a file over a symlink replaces the link, a directory over a
  symlink replaces the link, a hardlink to a symlink links the symlink itself. Files are created with
  ``O_CREAT|O_EXCL|O_NOFOLLOW`` after removing what was there, never truncated in place.
* Hardlink targets are resolved like entry paths (``../../../../etc/passwd`` is ROOT/etc/passwd) and
  must be an existing non-directory inside the root.
* OCI whiteouts (``.wh.NAME``, opaque ``.wh..wh..opq``) remove only content of LOWER layers: paths
  written by this layer are tracked, so a file and its whiteout in one layer keep the file and an
  opaque marker after a child keeps that child. ``.wh.``, ``.wh..`` and ``.wh...`` are refused.
* A non-directory entry for the root itself, a NUL in a name, a name component longer than
  NAME_MAX and a path longer than PATH_MAX are refused (UnsafeContentError, exit code 4).
* Malformed or hostile numbers and counts are refusals too (exit code 4), never a stray
  ValueError or OSError: a PAX number of more than MAX_PAX_DIGITS digits, more hard links to one
  file (or subdirectories in one directory) than the file system allows (EMLINK), more than
  ApplyOptions.max_entries entries (LimitExceededError). What the applier remembers per path moves
  to a temporary database past SPILL_AT items (_PathState), so memory stays flat in the number of
  entries; warnings past MAX_WARNINGS are counted, not kept.

The tar format is read by an own header parser (ustar, GNU long names/links, PAX headers with path,
linkpath, size, mtime, uid, gid and SCHILY.xattr.*; PAX global headers are ignored, as containerd
does); Python's ``tarfile`` is not used at all. Sparse files and unknown entry types are skipped
with a warning. File data is streamed in 1 MiB pieces; all-zero pieces become holes.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import stat
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import BinaryIO, Protocol

from ..errors import ContentRefusedError, ImagevolError, LimitExceededError, UnsafeContentError, UsageError
from ..fsutil import AlignedWriter, pwrite_direct, reopen_direct, start_writeback
from .compression import open_decompressed

__all__ = ["DEFAULT_MAX_ENTRIES", "ApplyOptions", "ApplyStats", "apply_layer"]

log = logging.getLogger(__name__)

CHUNK = 1 << 20
#: Files of at least this size are written around the page cache (O_DIRECT) where the file system
#: allows it; smaller ones are not worth a synchronous disk write each.
DIRECT_MIN = 8 << 20
#: Writeback of a file being extracted is started every this many bytes (see fsutil.start_writeback).
WRITEBACK_EVERY = 8 << 20
BLOCK = 512
NAME_MAX = 255
PATH_MAX = 4096
# Longest chain of symlinks followed while resolving one path (Linux's limit is 40 as well).
MAX_SYMLINKS = 40
# Deepest directory the applier creates or resolves through; real images stay far below.
MAX_DEPTH = 256
# Largest PAX header or GNU long name/link accepted (they are held in memory).
MAX_META = 1 << 20
# Most digits of a PAX number (size, uid, gid; twice that for mtime with its fraction): 2**64 has 20.
MAX_PAX_DIGITS = 32
#: Default most entries one layer may hold (ApplyOptions.max_entries, `--max-entries`).
DEFAULT_MAX_ENTRIES = 1_000_000
# Per-path state of a layer beyond this many items moves from memory to a temporary database
# (_PathState), so memory stays flat in the number of entries.
SPILL_AT = 20_000
# Warnings kept (and passed on) per layer; the rest are counted.
MAX_WARNINGS = 1000

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_ZERO_BYTES = bytes(CHUNK)
_ZERO = memoryview(_ZERO_BYTES)
_ZERO_BLOCK = bytes(BLOCK)
# Latest mtime accepted (9999-12-31T23:59:59Z); earlier than the epoch is clamped to the epoch.
_MAX_MTIME_S = 253402300799

# Tar type flags.
_REG = frozenset({b"0", b"\0", b"7"})
_LNK = b"1"
_SYM = b"2"
_CHR = b"3"
_BLK = b"4"
_DIR = b"5"
_FIFO = b"6"
_HEADER_ONLY = frozenset({_LNK, _SYM, _CHR, _BLK, _DIR, _FIFO})
_TYPE_NAMES = {
    b"S": "GNU sparse file",
    b"D": "GNU dump directory",
    b"M": "GNU multi-volume continuation",
    b"V": "GNU volume label",
    b"N": "GNU old long name",
}

_DEVICES = ("skip", "refuse", "create")
_DUPLICATES = ("last", "refuse")
_SETUID = ("keep", "strip")


def _is_root() -> bool:
    return os.geteuid() == 0


DEFAULT_MAX_RATIO = 250.0


@dataclass
class ApplyOptions:
    """Policies of :func:`apply_layer`.

    preserve_owner: chown entries to the layer's uid/gid (default: when running as root).
    devices: character/block devices and FIFOs: 'skip' (with a warning), 'refuse' or 'create'.
    duplicates: a path written twice by one layer: 'last' wins, or 'refuse' the layer.
    setuid: 'keep' setuid/setgid bits on non-directories, or 'strip' them.
    max_ratio / max_size: decompression-bomb limits (see :func:`..compression.open_decompressed`);
        by default a layer may expand at most :data:`DEFAULT_MAX_RATIO` times (real layers: 1-10x;
        gzip of zeros: ~1000x), with no size cap. None lifts a limit.
    max_entries: most tar entries one layer may hold (an inode bomb: 400,000 empty files gzip to
        2.5 MB); by default :data:`DEFAULT_MAX_ENTRIES`, well above real layers (a whole distribution's
        /usr holds a few hundred thousand files). None lifts the limit.
    whiteouts: apply OCI whiteouts (image layers); False for artifact tar layers, where a whiteout
        name is refused as unsafe.
    xattrs: apply SCHILY.xattr.user.* and trusted.* (default: when running as root);
    security_xattrs: also security.* (file capabilities, SELinux labels); off by default.
    """

    preserve_owner: bool = field(default_factory=_is_root)
    devices: str = "skip"
    duplicates: str = "last"
    setuid: str = "keep"
    max_ratio: float | None = DEFAULT_MAX_RATIO
    max_size: int | None = None
    max_entries: int | None = DEFAULT_MAX_ENTRIES
    whiteouts: bool = True
    xattrs: bool = field(default_factory=_is_root)
    security_xattrs: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("devices", _DEVICES), ("duplicates", _DUPLICATES), ("setuid", _SETUID)):
            value = getattr(self, name)
            if value not in allowed:
                raise UsageError(
                    f"invalid {name} policy {value!r}", hint=f"{name} must be one of: " + ", ".join(allowed)
                )


@dataclass
class ApplyStats:
    """What one layer did to the tree. `skipped` holds every warning (skipped entries, xattrs)."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    whiteouts: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Tar header parsing


@dataclass
class _Entry:
    name: str
    type: bytes
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    sparse: bool = False


def _bad_tar(what: str) -> ContentRefusedError:
    return ContentRefusedError(
        f"layer is not a valid tar archive: {what}",
        hint="the blob may be corrupt, or not a tar layer (check its media type and compression)",
    )


def _nts(field_: bytes) -> bytes:
    """A NUL-terminated header string field."""
    return field_.split(b"\0", 1)[0]


def _number(field_: bytes, what: str) -> int:
    """A numeric header field: octal text, or GNU base-256 when the high bit of the first byte is set."""
    if field_ and field_[0] & 0x80:
        if field_[0] & 0x40:  # negative two's complement
            return int.from_bytes(field_, "big", signed=True)
        return int.from_bytes(bytes([field_[0] & 0x3F]) + field_[1:], "big")
    text = _nts(field_).strip(b" ")
    if not text:
        return 0
    if text.strip(b"01234567"):
        raise _bad_tar(f"invalid {what} field {field_!r}")
    return int(text, 8)


def _decimal(value: bytes, key: str) -> int:
    text = value.decode("ascii", "replace")
    if len(text) > MAX_PAX_DIGITS:
        # int() of more than 4300 digits raises ValueError (sys.int_info.str_digits_check_threshold),
        # and no size, id or time needs more than 20.
        raise _bad_tar(f"PAX {key} has {len(text)} digits (at most {MAX_PAX_DIGITS} are accepted)")
    if not text.isdigit():
        raise _bad_tar(f"invalid PAX {key} {text!r}")
    return int(text)


def _pax_time_ns(value: bytes) -> int:
    if len(value) > MAX_PAX_DIGITS * 2:
        raise _bad_tar(f"PAX mtime has {len(value)} characters (at most {MAX_PAX_DIGITS * 2} are accepted)")
    try:
        t = Decimal(value.decode("ascii"))
    except (InvalidOperation, UnicodeDecodeError):
        raise _bad_tar(f"invalid PAX mtime {value!r}") from None
    if not t.is_finite():
        raise _bad_tar(f"invalid PAX mtime {value!r}")
    t = min(max(t, Decimal(0)), Decimal(_MAX_MTIME_S))
    return int(t * 1_000_000_000)


def _parse_pax(data: bytes) -> list[tuple[str, bytes]]:
    """PAX extended header records `"%d %s=%s\\n"`; values are raw bytes."""
    records: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(data):
        if not data[pos:].strip(b"\0"):
            break  # NUL padding
        sp = data.find(b" ", pos, pos + 24)
        if sp < 0 or not data[pos:sp].isdigit():
            raise _bad_tar("malformed PAX record length")
        length = int(data[pos:sp])
        end = pos + length
        if length <= sp - pos or end > len(data) or data[end - 1 : end] != b"\n":
            raise _bad_tar("malformed PAX record")
        record = data[sp + 1 : end - 1]
        key, eq, value = record.partition(b"=")
        if not eq or not key:
            raise _bad_tar("malformed PAX record (no key)")
        records.append((key.decode("utf-8", "surrogateescape"), value))
        pos = end
    return records


class _TarReader:
    """Reads tar headers and entry data sequentially from a stream, with bounded memory."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._remaining = 0  # data bytes of the current entry not read yet
        self._pad = 0
        self._first = True

    def _read_exact(self, n: int) -> bytes:
        data = self._f.read(n)
        if len(data) == n:
            return data
        parts = [data]
        got = len(data)
        while got < n:
            more = self._f.read(n - got)
            if not more:
                raise _bad_tar("unexpected end of data")
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def _skip(self, n: int) -> None:
        while n > 0:
            data = self._f.read(min(n, CHUNK))
            if not data:
                raise _bad_tar("unexpected end of data")
            n -= len(data)

    def read_data(self, n: int = CHUNK) -> bytes:
        """The next piece (at most `n` bytes) of the current entry's data; b'' at its end."""
        n = min(n, self._remaining)
        if n <= 0:
            return b""
        data = self._f.read(n)  # as the stream hands it out: joining short reads would copy them
        if not data:
            raise _bad_tar("unexpected end of data")
        self._remaining -= len(data)
        return data

    def drain(self) -> None:
        """Read the stream to its end, so a wrapping verifier or decompressor sees every byte."""
        while self._f.read(CHUNK):
            pass

    def _meta(self, size: int, what: str) -> bytes:
        if size > MAX_META:
            raise ContentRefusedError(
                f"layer has a {what} of {size} bytes (limit {MAX_META})",
                hint="such a header is not produced by any image builder",
            )
        data = self._read_exact(size)
        self._skip(-size % BLOCK)
        return data

    def _skip_padding(self, n: int) -> bool:
        """Skip the last entry's padding; False when the stream ends inside it, which Go's archive/tar
        (so every runtime, and umoci 0.4.7 that writes such layers) takes as a clean end."""
        while n > 0:
            data = self._f.read(n)
            if not data:
                return False
            n -= len(data)
        return True

    def next(self) -> _Entry | None:
        """The next entry (long names and PAX headers applied), or None at the end of the archive.

        Like Go's archive/tar, the archive may end without its end-of-archive blocks, at a header
        boundary or inside the last entry's padding; an entry's data must be complete."""
        self._skip(self._remaining)
        pad, self._remaining, self._pad = self._pad, 0, 0
        if not self._skip_padding(pad):
            return None
        longname: bytes | None = None
        longlink: bytes | None = None
        pax: dict[str, bytes] = {}
        pending = False
        while True:
            block = self._f.read(BLOCK)
            if len(block) < BLOCK:
                more = self._f.read(BLOCK - len(block)) if block else b""
                block += more
            if not block:
                if pending:
                    raise _bad_tar("archive ends after an extended header")
                return None
            if len(block) < BLOCK:
                raise _bad_tar("unexpected end of data in a header")
            if block == _ZERO_BLOCK:
                if pending:
                    raise _bad_tar("archive ends after an extended header")
                return None
            self._check_checksum(block)
            self._first = False
            typ = block[156:157]
            size = _number(block[124:136], "size")
            if size < 0:
                raise _bad_tar("negative size")
            if typ == b"L":
                longname = self._meta(size, "GNU long name").rstrip(b"\0")
                pending = True
                continue
            if typ == b"K":
                longlink = self._meta(size, "GNU long link name").rstrip(b"\0")
                pending = True
                continue
            if typ == b"g":
                # Global headers are checked and then ignored, as Go's archive/tar (containerd) does:
                # the tree must be the one the runtimes see.
                _parse_pax(self._meta(size, "PAX global header"))
                continue
            if typ == b"x":
                for key, value in _parse_pax(self._meta(size, "PAX header")):
                    pax[key] = value  # an empty value unsets the keyword: the ustar field applies
                pending = True
                continue
            entry = self._entry(block, typ, size, longname, longlink, pax)
            data_size = 0 if entry.type in _HEADER_ONLY else entry.size
            self._remaining = data_size
            self._pad = -data_size % BLOCK
            return entry

    def _check_checksum(self, block: bytes) -> None:
        try:
            stored = _number(block[148:156], "checksum")
        except ContentRefusedError:
            stored = -1
        unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
        signed = sum(struct.unpack("148b", block[:148])) + 8 * 32 + sum(struct.unpack("356b", block[156:]))
        if stored not in (unsigned, signed):
            if self._first:
                raise _bad_tar("the first header has a bad checksum")
            raise _bad_tar("a header has a bad checksum")

    def _entry(
        self,
        block: bytes,
        typ: bytes,
        size: int,
        longname: bytes | None,
        longlink: bytes | None,
        local: dict[str, bytes],
    ) -> _Entry:
        name = _nts(block[0:100])
        if block[257:263] == b"ustar\0":  # POSIX ustar: a prefix field
            prefix = _nts(block[345:500])
            if prefix:
                name = prefix + b"/" + name
        linkname = _nts(block[157:257])
        if longname is not None:
            name = longname
        if longlink is not None:
            linkname = longlink
        pax = local
        if pax.get("path"):
            name = pax["path"]
        if pax.get("linkpath"):
            linkname = pax["linkpath"]
        if typ == b"\0" and name.endswith(b"/"):
            typ = _DIR  # pre-POSIX directory
        e = _Entry(
            name=os.fsdecode(name),
            type=typ,
            mode=_number(block[100:108], "mode") & 0o7777,
            uid=_number(block[108:116], "uid"),
            gid=_number(block[116:124], "gid"),
            size=size,
            linkname=os.fsdecode(linkname),
            devmajor=_number(block[329:337], "devmajor") if typ in (_CHR, _BLK) else 0,
            devminor=_number(block[337:345], "devminor") if typ in (_CHR, _BLK) else 0,
        )
        mtime = _number(block[136:148], "mtime")
        e.mtime_ns = min(max(mtime, 0), _MAX_MTIME_S) * 1_000_000_000
        for key, value in pax.items():
            if not value:
                continue
            if key == "size":
                e.size = _decimal(value, key)
            elif key == "uid":
                e.uid = _decimal(value, key)
            elif key == "gid":
                e.gid = _decimal(value, key)
            elif key == "mtime":
                e.mtime_ns = _pax_time_ns(value)
            elif key.startswith("SCHILY.xattr."):
                e.xattrs[key[len("SCHILY.xattr.") :]] = value
            elif key.startswith("GNU.sparse."):
                e.sparse = True
        if typ == b"S":
            e.sparse = True
        return e


# --------------------------------------------------------------------------------------------------
# Paths


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


# --------------------------------------------------------------------------------------------------
# The applier


class FileSink(Protocol):
    """Sees the data of one regular file as the applier writes it (holes as the zero bytes they
    read as), then ``close()``; ``FileSinks`` are made per file by ``apply_layer(file_sink=)``."""

    def update(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class _Applier:
    #: file_sink(fd of the new file, its size) for every regular file written (see apply_layer).
    file_sink: Callable[[int, int], FileSink | None] | None = None

    def __init__(self, root: str | os.PathLike[str], options: ApplyOptions, warn: Callable[[str], None] | None) -> None:
        self.opts = options
        self.stats = ApplyStats()
        self._warn_cb = warn
        self.suppressed = 0
        self._is_root = os.geteuid() == 0
        try:
            self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ImagevolError(f"cannot open layer root {os.fspath(root)!r}: {e.strerror}") from None
        # What this layer wrote (paths, directory fixups, kept times): see _PathState.
        self.paths = _PathState(self.root_fd)

    def _keep_times(self, pfd: int, pkey: str) -> None:
        if not self.paths.has_kept_times(pkey):
            st = os.fstat(pfd)
            self.paths.keep_times(pkey, st.st_atime_ns, st.st_mtime_ns)

    def close(self) -> None:
        self.paths.close()
        os.close(self.root_fd)
        if self.suppressed:
            msg = f"{self.suppressed} more warnings not shown (only the first {MAX_WARNINGS} are)"
            self.stats.skipped.append(msg)
            if self._warn_cb is not None:
                self._warn_cb(msg)
            else:
                log.warning("%s", msg)

    def warn(self, msg: str) -> None:
        if len(self.stats.skipped) >= MAX_WARNINGS:
            self.suppressed += 1  # a layer of a million FIFOs must not keep a million messages
            return
        self.stats.skipped.append(msg)
        if self._warn_cb is not None:
            self._warn_cb(msg)
        else:
            log.warning("%s", msg)

    # -- bookkeeping

    def _mark(self, key: str, is_dir: bool) -> None:
        self.paths.mark(key, is_dir)

    # -- resolution inside the root

    def _open_resolved(self, parts: list[str]) -> int:
        """Reopen a directory known by its resolved components, following nothing."""
        fd = os.dup(self.root_fd)
        try:
            for c in parts:
                nfd = os.open(c, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except OSError:
            os.close(fd)
            raise UnsafeContentError(
                f"the tree under the layer root changed while applying ({_key(parts)!r})"
            ) from None
        return fd

    def _walk(self, parts: list[str], *, create: bool, what: str) -> tuple[int, list[str]] | None:
        """Resolve the directory `parts` inside the root, following symlinks root-relatively.

        Returns an open descriptor (the caller closes it) and the resolved components. A missing
        component is kept pending, so that a later `..` can cancel it (`missing/../etc` is `etc`, as
        containerd's RootPath has it); pending directories are created at the end when `create` (as
        this layer's content), else the result is None. A non-directory component gives None when
        not `create`, and UnsafeContentError when `create`.
        """
        fd = os.dup(self.root_fd)
        resolved: list[str] = []
        pending: list[str] = []
        todo = list(reversed(parts))
        links = 0
        ok = False
        try:
            while todo:
                c = todo.pop()
                if c in ("", "."):
                    continue
                if c == "..":
                    if pending:
                        pending.pop()
                    elif resolved:
                        resolved.pop()
                        nfd = self._open_resolved(resolved)
                        os.close(fd)
                        fd = nfd
                    continue
                if len(resolved) + len(pending) >= MAX_DEPTH:
                    raise UnsafeContentError(f"layer entry {what!r}: resolves deeper than {MAX_DEPTH} directories")
                if pending:
                    pending.append(c)
                    continue
                try:
                    nfd = os.open(c, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    pending.append(c)
                    continue
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.stat(c, dir_fd=fd, follow_symlinks=False)
                    if not stat.S_ISLNK(st.st_mode):
                        if not create:
                            return None
                        raise UnsafeContentError(
                            f"layer entry {what!r}: {_key([*resolved, c])!r} is not a directory",
                            hint="the layer writes below a non-directory; it is malformed",
                        ) from None
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise UnsafeContentError(f"layer entry {what!r}: too many levels of symbolic links") from None
                    target = os.readlink(c, dir_fd=fd)
                    if target.startswith("/"):
                        os.close(fd)
                        fd = os.dup(self.root_fd)
                        resolved = []
                    todo.extend(reversed(target.split("/")))
                    continue
                os.close(fd)
                fd = nfd
                resolved.append(c)
            if pending:
                if not create:
                    return None
                for c in pending:
                    try:
                        os.mkdir(c, 0o700, dir_fd=fd)
                    except FileExistsError:
                        raise UnsafeContentError(f"layer entry {what!r}: the tree changed while applying") from None
                    nfd = os.open(c, _DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = nfd
                    os.fchmod(fd, 0o755)
                    resolved.append(c)
                    self._mark(_key(resolved), True)
            ok = True
            return fd, resolved
        finally:
            if not ok:
                os.close(fd)

    # -- removal

    def _rmtree(self, parent_fd: int, name: str) -> None:
        """Remove directory `name` of `parent_fd` and everything below, never following a symlink."""
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        stack: list[tuple[int, str, int, list[str]]] = [(parent_fd, name, fd, os.listdir(fd))]
        try:
            while stack:
                pfd, nm, dfd, pending = stack[-1]
                if pending:
                    child = pending.pop()
                    try:
                        st = os.stat(child, dir_fd=dfd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        cfd = os.open(child, _DIR_FLAGS, dir_fd=dfd)
                        if not self._is_root:
                            try:
                                os.fchmod(cfd, stat.S_IMODE(st.st_mode) | 0o700)
                            except OSError:
                                pass
                        stack.append((dfd, child, cfd, os.listdir(cfd)))
                    else:
                        os.unlink(child, dir_fd=dfd)
                    continue
                stack.pop()
                os.close(dfd)
                os.rmdir(nm, dir_fd=pfd)
        finally:
            for _, _, dfd, _ in stack:
                os.close(dfd)

    def _remove(self, parent_fd: int, name: str) -> None:
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            self._rmtree(parent_fd, name)
        else:
            os.unlink(name, dir_fd=parent_fd)

    def _remove_lower(self, parent_fd: int, name: str, key: str) -> None:
        """Remove what lower layers put at `key`, keeping everything this layer wrote."""
        if not self.paths.touched(key):
            self._remove(parent_fd, name)
            return
        if self.paths.written(key) is False:
            return  # a non-directory written by this layer
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError:
            return
        try:
            for child in os.listdir(fd):
                self._remove_lower(fd, child, _child_key(key, child))
        finally:
            os.close(fd)

    def _prepare(self, pfd: int, base: str, key: str, name: str, is_dir: bool) -> bool:
        """Clear the way for an entry; True if an existing directory is kept (dir over dir)."""
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        existing_dir = stat.S_ISDIR(st.st_mode)
        if is_dir and existing_dir:
            return True
        if self.opts.duplicates == "refuse" and self.paths.written(key) is not None:
            raise UnsafeContentError(
                f"layer entry {name!r}: the layer writes this path twice",
                hint="duplicates='last' lets the last entry win",
            )
        if existing_dir:
            self._rmtree(pfd, base)
        else:
            os.unlink(base, dir_fd=pfd)
        return False

    # -- metadata

    def _owner_ok(self, e: _Entry) -> bool:
        if not self.opts.preserve_owner:
            return False
        if not (0 <= e.uid < 0xFFFFFFFF and 0 <= e.gid < 0xFFFFFFFF):
            raise UnsafeContentError(f"layer entry {e.name!r}: invalid uid/gid {e.uid}/{e.gid}")
        return True

    def _mode(self, e: _Entry, is_dir: bool) -> int:
        mode = e.mode & 0o7777
        if not is_dir and self.opts.setuid == "strip":
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
        return mode

    def _xattrs(self, fd: int, e: _Entry) -> None:
        for key, value in e.xattrs.items():
            ns = key.partition(".")[0]
            allowed = self.opts.xattrs and (
                ns in ("user", "trusted") or (ns == "security" and self.opts.security_xattrs)
            )
            if not allowed:
                self.warn(f"{e.name}: extended attribute {key!r} not applied (policy)")
                continue
            try:
                os.setxattr(fd, key, value)
            except (OSError, ValueError) as ex:  # ValueError: a NUL inside the name
                why = ex.strerror if isinstance(ex, OSError) else str(ex)
                self.warn(f"{e.name}: extended attribute {key!r} not applied: {why}")

    def _fd_metadata(self, fd: int, e: _Entry, is_dir: bool) -> int:
        if self._owner_ok(e):
            os.fchown(fd, e.uid, e.gid)
        mode = self._mode(e, is_dir)
        os.fchmod(fd, mode | 0o700 if is_dir and not self._is_root else mode)
        if e.xattrs:
            self._xattrs(fd, e)
        return mode

    # -- entries

    def apply(self, e: _Entry, tar: _TarReader) -> None:
        parts = _check_name(e.name, "name")
        base = parts[-1] if parts else ""
        if base.startswith(WHITEOUT_PREFIX) or (parts and parts[0].startswith(WHITEOUT_META_PREFIX)):
            if not self.opts.whiteouts:
                raise UnsafeContentError(f"layer entry {e.name!r}: whiteout names are not allowed in artifact layers")
            if parts[0].startswith(WHITEOUT_META_PREFIX) and parts != [WHITEOUT_OPAQUE]:
                self.warn(f"{e.name}: AUFS metadata entry skipped")
                return
            self._whiteout(e, parts)
            return
        typ = e.type
        if not parts:
            if typ != _DIR:
                raise UnsafeContentError(f"layer entry {e.name!r}: a non-directory entry for the root is refused")
            fd = os.dup(self.root_fd)
            try:
                mode = self._fd_metadata(fd, e, True)
            finally:
                os.close(fd)
            self.paths.add_fixup("", None if self._is_root else mode, e.mtime_ns)
            return
        if e.sparse:
            self.warn(f"{e.name}: sparse file skipped (not supported)")
            return
        if typ in (_CHR, _BLK, _FIFO) and self.opts.devices != "create":
            kind = {_CHR: "character device", _BLK: "block device", _FIFO: "FIFO"}[typ]
            if self.opts.devices == "refuse":
                raise UnsafeContentError(
                    f"layer entry {e.name!r}: {kind} refused (devices='refuse')",
                    hint="devices='skip' skips device nodes with a warning",
                )
            self.warn(f"{e.name}: {kind} skipped (devices='skip')")
            return
        if typ not in _REG and typ not in _HEADER_ONLY:
            kind = _TYPE_NAMES.get(typ, f"entry of unknown type {typ!r}")
            self.warn(f"{e.name}: {kind} skipped")
            return
        link_parts: list[str] | None = None
        if typ == _LNK:
            link_parts = _check_name(e.linkname, "hardlink target")
            if not link_parts:
                raise UnsafeContentError(f"layer entry {e.name!r}: hardlink to the root directory")
        elif typ == _SYM:
            if "\0" in e.linkname or not e.linkname:
                raise UnsafeContentError(f"layer entry {e.name!r}: invalid symlink target {e.linkname!r}")
            if len(os.fsencode(e.linkname)) >= PATH_MAX:
                raise UnsafeContentError(f"layer entry {e.name!r}: symlink target longer than {PATH_MAX}")
        walked = self._walk(parts[:-1], create=True, what=e.name)
        assert walked is not None
        pfd, presolved = walked
        key = _key([*presolved, base])
        self._keep_times(pfd, _key(presolved))
        try:
            if typ == _DIR:
                self._dir(pfd, base, key, e)
            elif typ == _SYM:
                self._symlink(pfd, base, key, e)
            elif typ == _LNK:
                assert link_parts is not None
                self._hardlink(pfd, base, key, e, link_parts)
            elif typ in _REG:
                self._file(pfd, base, key, e, tar)
            else:
                self._device(pfd, base, key, e)
        except OSError as ex:
            if ex.errno == errno.ENAMETOOLONG:
                raise UnsafeContentError(f"layer entry {e.name!r}: name too long") from None
            raise
        finally:
            os.close(pfd)

    def _file(self, pfd: int, base: str, key: str, e: _Entry, tar: _TarReader) -> None:
        self._prepare(pfd, base, key, e.name, False)
        fd = os.open(base, _NEW_FILE_FLAGS, 0o600, dir_fd=pfd)
        try:
            self._mark(key, False)
            sink = self.file_sink(fd, e.size) if self.file_sink is not None else None
            dfd = reopen_direct(fd) if e.size >= DIRECT_MIN else None
            if dfd is not None:
                try:
                    written = self._file_direct(fd, dfd, tar, sink)
                finally:
                    os.close(dfd)
                if sink is not None:
                    sink.close()
                self._fd_metadata(fd, e, False)
                os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
                self.stats.files += 1
                self.stats.bytes += written
                return
            written = 0
            flushed = 0
            hole = False
            while True:
                chunk = tar.read_data(CHUNK)
                if not chunk:
                    break
                if sink is not None:
                    sink.update(chunk)
                n = len(chunk)
                if chunk[0] == 0 and chunk == (_ZERO_BYTES if n == CHUNK else _ZERO[:n]):
                    os.lseek(fd, n, os.SEEK_CUR)
                    hole = True
                else:
                    mv = memoryview(chunk)
                    while mv:
                        mv = mv[os.write(fd, mv) :]
                    hole = False
                written += n
                if written - flushed >= WRITEBACK_EVERY:
                    start_writeback(fd, flushed, written - flushed)
                    flushed = written
            if hole:
                os.ftruncate(fd, written)
            if sink is not None:
                sink.close()
            self._fd_metadata(fd, e, False)
            os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
        finally:
            os.close(fd)
        self.stats.files += 1
        self.stats.bytes += written

    def _file_direct(self, fd: int, dfd: int, tar: _TarReader, sink: FileSink | None = None) -> int:
        """A large file's data, gathered into aligned buffers and written around the page cache
        by a thread of its own (fsutil.AlignedWriter): extraction goes on while the disk writes,
        and no fresh page-cache memory is touched (docs/performance.md). Runs of zeros stay holes."""
        direct = [dfd]

        def put(offset: int, view: memoryview) -> None:
            if not pwrite_direct(fd, direct[0], offset, view):
                direct[0] = None  # refused: the rest through the page cache

        w = AlignedWriter(put, 0, name="imagevol-extract-write")
        try:
            hole = False
            while chunk := tar.read_data(CHUNK):
                if sink is not None:
                    sink.update(chunk)
                n = len(chunk)
                if chunk[0] == 0 and chunk == (_ZERO_BYTES if n == CHUNK else _ZERO[:n]):
                    w.skip(n)
                    hole = True
                else:
                    w.write(chunk)
                    hole = False
            w.close()
        except BaseException:
            w.abandon()
            raise
        if hole:
            os.ftruncate(fd, w.pos)
        return w.pos

    def _dir(self, pfd: int, base: str, key: str, e: _Entry) -> None:
        if not self._prepare(pfd, base, key, e.name, True):
            os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        try:
            mode = self._fd_metadata(fd, e, True)
        finally:
            os.close(fd)
        self._mark(key, True)
        self.paths.add_fixup(key, None if self._is_root else mode, e.mtime_ns)
        self.stats.dirs += 1

    def _symlink(self, pfd: int, base: str, key: str, e: _Entry) -> None:
        self._prepare(pfd, base, key, e.name, False)
        os.symlink(e.linkname, base, dir_fd=pfd)
        self._mark(key, False)
        if self._owner_ok(e):
            os.chown(base, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        if e.xattrs:
            self.warn(f"{e.name}: extended attributes on a symlink not applied")
        os.utime(base, ns=(e.mtime_ns, e.mtime_ns), dir_fd=pfd, follow_symlinks=False)
        self.stats.symlinks += 1

    def _hardlink(self, pfd: int, base: str, key: str, e: _Entry, link_parts: list[str]) -> None:
        missing = UnsafeContentError(
            f"layer entry {e.name!r}: hardlink target {e.linkname!r} does not exist inside the root",
            hint="a hardlink must point at a file written earlier (in this or a lower layer)",
        )
        walked = self._walk(link_parts[:-1], create=False, what=e.linkname)
        if walked is None:
            raise missing
        tfd, tresolved = walked
        try:
            tbase = link_parts[-1]
            try:
                st = os.stat(tbase, dir_fd=tfd, follow_symlinks=False)
            except FileNotFoundError:
                raise missing from None
            if stat.S_ISDIR(st.st_mode):
                raise UnsafeContentError(f"layer entry {e.name!r}: hardlink target {e.linkname!r} is a directory")
            if _key([*tresolved, tbase]) == key:
                return  # a link to itself: nothing to do
            self._prepare(pfd, base, key, e.name, False)
            try:
                os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                raise missing from None
        finally:
            os.close(tfd)
        self._mark(key, False)
        self.stats.hardlinks += 1

    def _device(self, pfd: int, base: str, key: str, e: _Entry) -> None:
        self._prepare(pfd, base, key, e.name, False)
        mode = self._mode(e, False)
        try:
            if e.type == _FIFO:
                os.mkfifo(base, 0o600, dir_fd=pfd)
            else:
                kind = stat.S_IFCHR if e.type == _CHR else stat.S_IFBLK
                os.mknod(base, kind | 0o600, os.makedev(e.devmajor, e.devminor), dir_fd=pfd)
        except (OSError, OverflowError, ValueError) as ex:
            self.warn(f"{e.name}: device node not created: {ex}")
            return
        self._mark(key, False)
        if self._owner_ok(e):
            os.chown(base, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        fd = os.open(base, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)
        os.utime(base, ns=(e.mtime_ns, e.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def _whiteout(self, e: _Entry, parts: list[str]) -> None:
        base = parts[-1]
        opaque = base == WHITEOUT_OPAQUE
        if not opaque and base.startswith(WHITEOUT_META_PREFIX):
            self.warn(f"{e.name}: AUFS metadata entry skipped")
            return
        target = base[len(WHITEOUT_PREFIX) :]
        if not opaque and target in ("", ".", ".."):
            raise UnsafeContentError(f"layer entry {e.name!r}: invalid whiteout")
        self.stats.whiteouts += 1
        walked = self._walk(parts[:-1], create=False, what=e.name)
        if walked is None:
            return  # the parent does not exist: nothing to hide
        pfd, presolved = walked
        pkey = _key(presolved)
        self._keep_times(pfd, pkey)
        try:
            if opaque:
                for child in os.listdir(pfd):
                    self._remove_lower(pfd, child, _child_key(pkey, child))
            else:
                self._remove_lower(pfd, target, _child_key(pkey, target))
        finally:
            os.close(pfd)

    def finish(self) -> None:
        """Directory modes (when not root) and mtimes, now that nothing more is written in them."""
        for key, atime_ns, mtime_ns in self.paths.kept_times_without_fixup():
            try:
                fd = self._open_resolved(key.split("/") if key else [])
            except UnsafeContentError:
                continue
            try:
                os.utime(fd, ns=(atime_ns, mtime_ns))
            finally:
                os.close(fd)
        for key, mode, mtime_ns in self.paths.fixups():
            try:
                fd = self._open_resolved(key.split("/") if key else [])
            except UnsafeContentError:
                continue  # replaced by a later entry of this layer
            try:
                if mode is not None:
                    os.fchmod(fd, mode)
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(fd)


def apply_layer(
    root: str | os.PathLike[str],
    stream: BinaryIO,
    *,
    compression: str | None = None,
    options: ApplyOptions | None = None,
    warn: Callable[[str], None] | None = None,
    file_sink: Callable[[int, int], FileSink | None] | None = None,
) -> ApplyStats:
    """Apply one layer (a tar stream, compressed or not) onto the directory `root`.

    `file_sink(fd, size)`, when given, is called for every regular file created (its new
    descriptor and the size its entry declares); the sink it returns, if any, sees the file's data
    as it is written (the snapshot record hashes large files this way).

    `root` may already hold lower layers. `compression` is 'gzip', 'zstd' or 'none'; None sniffs.
    Warnings (skipped entries) go to `warn` (else the log) and to ``ApplyStats.skipped``.
    Raises UnsafeContentError for content that tries to leave the root or is refused by policy,
    ContentRefusedError for a malformed or oversized stream. On error the tree is left partially
    applied: callers apply into a fresh directory and discard it on failure.
    """
    opts = options if options is not None else ApplyOptions()
    data = open_decompressed(stream, compression, max_ratio=opts.max_ratio, max_size=opts.max_size)
    applier = _Applier(root, opts, warn)
    applier.file_sink = file_sink
    try:
        tar = _TarReader(data)
        entries = 0
        while (entry := tar.next()) is not None:
            entries += 1
            if opts.max_entries is not None and entries > opts.max_entries:
                raise LimitExceededError(
                    f"layer holds more than {opts.max_entries} entries (at {entry.name!r})",
                    hint="an inode bomb, or a very large layer: raise the limit with --max-entries "
                    "(ApplyOptions.max_entries) if you trust it",
                )
            try:
                applier.apply(entry, tar)
            except OSError as ex:
                if ex.errno != errno.EMLINK:
                    raise
                raise UnsafeContentError(
                    f"layer entry {entry.name!r}: too many links (the layer makes more hard links to one file, "
                    "or more subdirectories in one directory, than the file system allows)",
                    hint="the layer is malformed or hostile; no image builder writes such a layer",
                ) from None
        tar.drain()
        applier.finish()
    finally:
        applier.close()
    return applier.stats
