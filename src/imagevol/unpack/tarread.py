"""The tar reader: the one tar parser of imagevol, reading headers and entry data from a stream.

Headers are parsed by hand (ustar with its prefix field, GNU base-256 numbers, GNU long names and
links, PAX headers with path, linkpath, size, mtime, uid, gid and SCHILY.xattr.*; PAX global headers
are checked and then ignored, as containerd does); Python's ``tarfile`` is not used. Memory is
bounded: long names and PAX headers above MAX_META, PAX numbers of more than MAX_PAX_DIGITS digits
are refusals (ContentRefusedError), and entry data is handed out in pieces of at most CHUNK bytes.
What the entries mean for a tree is the applier's business (:mod:`.applier`).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import BinaryIO

from ..errors import ContentRefusedError

CHUNK = 1 << 20
BLOCK = 512
# Largest PAX header or GNU long name/link accepted (they are held in memory).
MAX_META = 1 << 20
# Most digits of a PAX number (size, uid, gid; twice that for mtime with its fraction): 2**64 has 20.
MAX_PAX_DIGITS = 32
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
