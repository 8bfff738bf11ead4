"""Progress: the events a pull or a pack reports, and their display (rich bars on a terminal,
JSON lines or nothing otherwise)."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class ProgressEvent:
    """One progress report: kind is `resolved`, `blob-start`, `bytes`, `blob-done` or `done`."""

    kind: str
    digest: str | None = None
    size: int = 0
    n: int = 0
    cached: bool = False
    message: str = ""


ProgressFn = Callable[[ProgressEvent], None]


class JsonLines:
    """One JSON object per event on stderr (throttled for byte events)."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._bytes: dict[str, int] = {}
        self._mu = threading.Lock()

    def __call__(self, ev: ProgressEvent) -> None:
        with self._mu:
            if ev.kind == "bytes" and ev.digest:
                self._bytes[ev.digest] = self._bytes.get(ev.digest, 0) + ev.n
                now = time.monotonic()
                if now - self._last.get(ev.digest, 0) < 0.5:
                    return
                self._last[ev.digest] = now
                out: dict[str, Any] = {"event": "progress", "digest": ev.digest, "bytes": self._bytes[ev.digest]}
            else:
                out = {"event": ev.kind, "digest": ev.digest, "size": ev.size, "cached": ev.cached}
                if ev.message:
                    out["message"] = ev.message
            sys.stderr.write(json.dumps(out) + "\n")
            sys.stderr.flush()


class Bars:
    """rich progress: one bar per blob in flight and a total (bytes, rate, ETA)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.p = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self.total = None
        self.tasks: dict[str, Any] = {}
        self._mu = threading.Lock()

    def __enter__(self) -> Bars:
        self.p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.p.stop()

    def __call__(self, ev: ProgressEvent) -> None:
        with self._mu:
            if ev.kind == "resolved":
                self.total = self.p.add_task("total", total=ev.size or None)
            elif ev.kind == "blob-start" and ev.digest:
                self.tasks[ev.digest] = self.p.add_task(ev.digest[7:19], total=ev.size)
            elif ev.kind == "bytes" and ev.digest:
                t = self.tasks.get(ev.digest)
                if t is not None:
                    self.p.advance(t, ev.n)
                if self.total is not None:
                    self.p.advance(self.total, ev.n)
            elif ev.kind == "blob-done" and ev.digest:
                t = self.tasks.get(ev.digest)
                if t is not None:
                    self.p.update(t, completed=ev.size)
                elif ev.cached and self.total is not None:
                    self.p.advance(self.total, ev.size)
