"""imagevol: mount OCI images and artifacts as read-only volumes on any CPU architecture."""

from __future__ import annotations

__version__ = "0.1.0"
