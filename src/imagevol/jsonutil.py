"""JSON from untrusted sources: deep nesting is a ValueError like any other malformed document
(json.loads raises RecursionError, which would otherwise escape every `except ValueError`)."""

from __future__ import annotations

import json
from typing import Any


def loads(data: bytes | str) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
