"""Small file-system helpers shared by the store, the materializer and the layout sink."""

from __future__ import annotations

import ctypes
import os
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
