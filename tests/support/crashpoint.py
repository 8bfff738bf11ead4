"""Run the imagevol CLI in this process with a SIGKILL injected at a named point.

    python tests/support/crashpoint.py SPEC [SPEC ...] -- [imagevol CLI arguments]

SPEC is ``module:attr[.attr...]@before|after[#N][:pause=PATH]``: the process kills itself
(SIGKILL, so no ``finally`` block, ``atexit`` hook or lock release runs, exactly as a node's OOM
killer or a power cut would leave it) right before or right after the N-th call (default the
first) of that function or method. With ``:pause=PATH`` it does not die but creates
``PATH.reached`` and waits (at most 120 s) until ``PATH.go`` exists: a race window held open so
that a test can run another command inside it. Examples::

    imagevol.volume:_bind@after              # the bind mount exists, nothing recorded yet
    imagevol.store.ingest:Ingest.commit@after#2
    imagevol.fstree:_open_for_removal@before#3  # gc is half way through deleting a snapshot
    imagevol.mount:pull@after:pause=/tmp/x    # a mount has its content, holds no lease yet

A point that is never reached lets the command finish normally: callers check the exit status
(``-9`` when the kill happened) so a renamed function cannot make a crash test pass vacuously.
Only this process is affected; nothing here is imported by imagevol.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

PAUSE_LIMIT = 120.0


def die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def pause(path: str) -> None:
    Path(path + ".reached").touch()
    deadline = time.monotonic() + PAUSE_LIMIT
    while not os.path.exists(path + ".go") and time.monotonic() < deadline:
        time.sleep(0.01)


def install(spec: str) -> None:
    spec, _, option = spec.partition(":pause=")
    target, at, rest = spec.partition("@")
    when, _, nth = rest.partition("#")
    if not at or when not in ("before", "after") or ":" not in target:
        raise SystemExit(f"bad crash point {spec!r}: want module:attr@before|after[#N]")
    n = int(nth or 1)
    modname, _, dotted = target.partition(":")
    owner: Any = importlib.import_module(modname)
    *path, name = dotted.split(".")
    for p in path:
        owner = getattr(owner, p)
    orig = getattr(owner, name)
    calls = 0
    mu = threading.Lock()

    @functools.wraps(orig)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        with mu:
            calls += 1
            mine = calls
        hit = die if not option else functools.partial(pause, option)
        if mine == n and when == "before":
            hit()
        out = orig(*args, **kwargs)
        if mine == n and when == "after":
            hit()
        return out

    setattr(owner, name, wrapper)


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit(__doc__)
    cut = argv.index("--")
    for spec in argv[:cut]:
        install(spec)
    from imagevol.cli import main as cli_main

    cli_main(args=argv[cut + 1 :], prog_name="imagevol")


if __name__ == "__main__":
    main(sys.argv[1:])
