"""The `imagevol` command line: argument parsing and output only; the work is in the library.

One module per command group; each registers its commands on the group in `common`.
"""

from __future__ import annotations

from . import csi, fetch, pack, resolve, store, volumes  # noqa: F401  (register the commands)
from .common import main

__all__ = ["main"]
