"""Small file-system helpers shared by the store, the materializer and the layout sink."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import queue
import threading
from collections.abc import Callable
from typing import Any


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so that a rename or an unlink in it survives a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# sync_file_range(2) is not in the os module. SYNC_FILE_RANGE_WRITE starts writeback of a range
# without waiting for it: the disk works while the download goes on, so the final fsync has little
# left to do, and written pages turn clean early instead of piling up as dirty page cache (which on
# this class of machine also made the writes themselves 1.5-5x cheaper; docs/performance.md).
_SYNC_FILE_RANGE_WRITE = 2
_sfr: Any = None


def _load_sfr() -> Any:
    global _sfr
    if _sfr is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _sfr = fn
        except (OSError, AttributeError):
            _sfr = False
    return _sfr


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``[offset, offset+nbytes)`` of ``fd`` to disk, without waiting.

    A hint only: where the call is missing or refused (other OS, some file systems), nothing happens.
    """
    fn = _load_sfr()
    if fn and nbytes > 0:
        fn(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Have glibc's malloc serve the megabyte-sized buffers a pull or an extraction allocates and
    frees by the thousand (bytes received, decompressed) from memory it keeps, instead of a fresh
    mapping each (by default any allocation over 128 KiB-32 MiB is one, and freed heap over 128 KiB
    goes back to the kernel). Fresh memory is what costs on a VM whose freed pages go back to the
    host: 0.4-0.6 s of system time in a 2 GiB image mount (docs/performance.md). For short-lived
    commands; False where the C library has no mallopt."""
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return bool(fn(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(fn(_M_TRIM_THRESHOLD, trim_threshold))


# ------------------------------------------------------------------------------ direct (O_DIRECT) writes

#: Offsets, lengths and buffer addresses of direct writes are multiples of this: it covers 512-byte
#: and 4 KiB logical blocks, and the DMA alignment block devices ask for.
DIRECT_ALIGN = 4096


def direct_io_enabled() -> bool:
    """Whether large files may be written around the page cache (``IMAGEVOL_DIRECT_IO=0`` says no)."""
    return os.environ.get("IMAGEVOL_DIRECT_IO", "1").strip().lower() not in ("0", "off", "no", "false")


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def pread_full(fd: int, view: memoryview, offset: int) -> int:
    """pread until ``view`` is full or the file ends; returns the bytes read."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            break
        got += n
    return got


def pwrite_direct(fd: int, dfd: int | None, offset: int, view: memoryview) -> bool:
    """Write ``view`` at ``offset``: its whole blocks through ``dfd`` (the file opened O_DIRECT), the
    unaligned head and tail through ``fd``. ``view`` must sit in memory at the same offset modulo
    :data:`DIRECT_ALIGN` as ``offset`` in the file. Returns False when ``dfd`` refused (EINVAL:
    misaligned memory, or a file system that takes O_DIRECT but not these writes); the bytes are
    then written through ``fd``, and the caller should stop using ``dfd``."""
    head = min(len(view), -offset % DIRECT_ALIGN)
    body = (len(view) - head) // DIRECT_ALIGN * DIRECT_ALIGN
    if dfd is None or not body:
        pwrite_all(fd, view, offset)
        return True
    ok = True
    if head:
        pwrite_all(fd, view[:head], offset)
    pos, mid = offset + head, view[head : head + body]
    try:
        while len(mid):
            n = os.pwrite(dfd, mid, pos)
            if n % DIRECT_ALIGN:  # a short direct write: the rest through the page cache
                pwrite_all(fd, mid[n:], pos + n)
                break
            mid = mid[n:]
            pos += n
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        ok = False
        pwrite_all(fd, mid, pos)
    if head + body < len(view):
        pwrite_all(fd, view[head + body :], offset + head + body)
    return ok


def reopen_direct(fd: int) -> int | None:
    """A second, O_DIRECT, descriptor for the file open at ``fd`` (through /proc/self/fd, so the
    same inode whatever its path does meanwhile), or None where direct I/O is off or refused."""
    if not direct_io_enabled():
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except (OSError, AttributeError):
        return None


class AlignedWriter:
    """Sequential writes to one file, gathered into page-aligned buffers that a thread of its own
    hands to ``write(offset, view)`` (typically :func:`pwrite_direct`), so that the caller only
    copies bytes into memory it has touched before and never waits for the disk unless all
    ``depth`` buffers are in flight. Errors of the writing thread are raised by the next call.

    Each buffer holds ``size`` bytes placed as the file is (at ``offset % DIRECT_ALIGN``), so a
    buffer that starts at an aligned offset is written whole with O_DIRECT."""

    def __init__(
        self,
        write: Callable[[int, memoryview], object],
        offset: int = 0,
        *,
        size: int = 4 << 20,
        depth: int = 2,
        name: str = "imagevol-write",
    ) -> None:
        self._write = write
        self.size = size
        self.pos = offset  # the file offset of the next byte
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for _ in range(depth):
            self._free.put(mmap.mmap(-1, size + DIRECT_ALIGN))
        self._todo: queue.SimpleQueue[tuple[int, mmap.mmap | None, int, Callable[[], object] | None] | None] = (
            queue.SimpleQueue()
        )
        self._buf: mmap.mmap | None = None
        self._start = offset  # file offset of the current buffer's first byte
        self._fill = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._todo.get()) is not None:
            off, buf, n, then = item
            try:
                if self._error is None:
                    if buf is not None:
                        a = off % DIRECT_ALIGN
                        with memoryview(buf) as m:
                            self._write(off, m[a : a + n])
                    if then is not None:
                        then()
            except BaseException as e:
                self._error = e
            finally:
                if buf is not None:
                    self._free.put(buf)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _submit(self, then: Callable[[], object] | None = None) -> None:
        if self._buf is not None and self._fill:
            self._todo.put((self._start, self._buf, self._fill, then))
        else:
            if self._buf is not None:
                self._free.put(self._buf)
            if then is not None:
                self._todo.put((self.pos, None, 0, then))
        self._buf, self._fill, self._start = None, 0, self.pos

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        view = memoryview(data).cast("B")
        while len(view):
            if self._buf is None:
                self._buf = self._free.get()
                self._start, self._fill = self.pos, 0
            a = self._start % DIRECT_ALIGN
            k = min(len(view), self.size - self._fill)
            self._buf[a + self._fill : a + self._fill + k] = view[:k]
            self._fill += k
            self.pos += k
            view = view[k:]
            if self._fill == self.size:
                self._submit()

    def skip(self, n: int) -> None:
        """Leave ``n`` bytes unwritten (a hole): what is gathered so far is written first."""
        self._check()
        self._submit()
        self.pos += n
        self._start = self.pos

    def then(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` in the writing thread once everything written so far is on its way to the file
        (recording progress that must not run ahead of the data)."""
        self._check()
        self._submit(fn)

    def close(self) -> None:
        """Write what is gathered, wait for the thread, and raise its error if it had one."""
        if self._thread.is_alive():
            with contextlib.suppress(BaseException):
                self._submit()
            self._todo.put(None)
            self._thread.join()
        while True:
            try:
                self._free.get_nowait().close()
            except queue.Empty:
                break
            except BufferError:
                pass
        self._check()

    def abandon(self) -> None:
        """Stop without raising (the caller is handling another error); nothing more is written."""
        if self._error is None:
            self._error = ImagevolAbandoned()
        with contextlib.suppress(BaseException):
            self.close()


class ImagevolAbandoned(Exception):
    """Set on an AlignedWriter that was abandoned: later writes are dropped."""


# ioctl FICLONE (linux/fs.h: _IOW(0x94, 9, int)): the destination becomes a copy-on-write clone of
# the source, an inode of its own sharing the extents (btrfs, XFS with reflink, bcachefs, ...).
FICLONE = 0x40049409


def reflink(src_fd: int, dst_fd: int) -> bool:
    """Make the (empty) file ``dst_fd`` a reflink of ``src_fd``; False where the file systems cannot
    (no reflink support, two file systems), and the caller copies instead."""
    import fcntl

    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.EPERM, errno.EBADF):
            return False
        raise
    return True
