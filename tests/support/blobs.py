"""The two byte helpers every builder of test content needs, written once."""

from __future__ import annotations

import gzip
import hashlib


def sha256_digest(data: bytes) -> str:
    """The OCI digest string of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gz(data: bytes) -> bytes:
    """gzip with mtime 0, so the same input always gives the same blob."""
    return gzip.compress(data, mtime=0)
