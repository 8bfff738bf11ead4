"""Error answers of registries turned into error text: the codes and messages of a distribution
error document (`oci_error_text`), or of any other answer only its content type and size
(`error_detail`), never its bytes. Used by the pull client and the push sink.
"""

from __future__ import annotations

import re

from ..jsonutil import loads as json_loads

_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_MEDIA_TYPE = re.compile(r"[\w.+-]{1,64}/[\w.+-]{1,64}")


def _printable(text: str, limit: int) -> str:
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def oci_error_text(body: bytes) -> str | None:
    """`CODE: message` lines from a distribution error document (JSON with an `errors` array), if
    the body is one. Only the codes and messages are quoted (printable, capped); never other fields."""
    try:
        doc = json_loads(body[:65536])
    except (ValueError, UnicodeDecodeError):
        return None
    errs = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errs, list) or not errs:
        return None
    parts = []
    for e in errs[:5]:
        if not isinstance(e, dict):
            continue
        code = e.get("code")
        code = code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else "UNKNOWN"
        message = e.get("message")
        message = _printable(message, 200) if isinstance(message, str) else ""
        parts.append(f"{code}: {message}" if message else code)
    return "; ".join(parts) or None


def error_detail(body: bytes, content_type: str | None = None) -> str:
    """What an error answer said, for an error text: the codes and messages of a registry error
    document; of anything else (an HTML page, a node-local service's answer) only its content type
    and size, never its bytes (they may be a secret the request was forged to fetch)."""
    text = oci_error_text(body)
    if text:
        return text
    if not body:
        return "an empty answer"
    ctype = (content_type or "").split(";", 1)[0].strip().lower()
    kind = ctype if _MEDIA_TYPE.fullmatch(ctype) else "untyped"
    size = f"{len(body)}{'+' if len(body) >= 65536 else ''}"
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} answer of {size} bytes, not a registry error document"
