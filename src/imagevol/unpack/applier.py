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

The tar format is read by the own header parser of :mod:`.tarread` (ustar, GNU long names/links, PAX headers with path,
linkpath, size, mtime, uid, gid and SCHILY.xattr.*; PAX global headers are ignored, as containerd
does); Python's ``tarfile`` is not used at all. Sparse files and unknown entry types are skipped
with a warning. File data is streamed in 1 MiB pieces; all-zero pieces become holes.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from typing import BinaryIO, Protocol

from ..errors import ImagevolError, LimitExceededError, UnsafeContentError
from ..fsutil import AlignedWriter, pwrite_direct, reopen_direct, start_writeback
from .compression import open_decompressed
from .options import DEFAULT_MAX_ENTRIES, DEFAULT_MAX_RATIO, ApplyOptions, ApplyStats
from .paths import MAX_DEPTH, MAX_SYMLINKS, PATH_MAX, _check_name, _child_key, _key, _PathState, clean_path
from .tarread import (
    _BLK,
    _CHR,
    _DIR,
    _FIFO,
    _HEADER_ONLY,
    _LNK,
    _REG,
    _SYM,
    _TYPE_NAMES,
    CHUNK,
    _Entry,
    _TarReader,
)

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_MAX_RATIO",
    "MAX_DEPTH",
    "PATH_MAX",
    "ApplyOptions",
    "ApplyStats",
    "FileSink",
    "apply_layer",
    "clean_path",
]

log = logging.getLogger(__name__)

#: Files of at least this size are written around the page cache (O_DIRECT) where the file system
#: allows it; smaller ones are not worth a synchronous disk write each.
DIRECT_MIN = 8 << 20
#: Writeback of a file being extracted is started every this many bytes (see fsutil.start_writeback).
WRITEBACK_EVERY = 8 << 20
# Warnings kept (and passed on) per layer; the rest are counted.
MAX_WARNINGS = 1000

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_ZERO_BYTES = bytes(CHUNK)
_ZERO = memoryview(_ZERO_BYTES)


class FileSink(Protocol):
    """Sees the data of one regular file as the applier writes it (holes as the zero bytes they
    read as), then ``close()``; ``FileSinks`` are made per file by ``apply_layer(file_sink=)``."""

    def update(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class _Applier:
    """Applies entries onto the root; one class over 300 lines on purpose: resolution inside the
    root (_walk), removal, whiteouts and every entry kind share one root descriptor, one _PathState
    and one warning budget, and each step is a few lines that read that state. Resolution and
    removal could become a base class in paths.py; that is left for a later split."""

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
