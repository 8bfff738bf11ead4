"""What a test needs from the machine: root, a command, a Python module, a registry binary.

One rule for all of them: a test whose need is not met FAILS with a message naming what is
missing and how to get it, so a missing tool or a run as the wrong user cannot pass as a green
run full of skips. ``IMAGEVOL_ALLOW_SKIP=1`` turns those failures into skips (a developer's
laptop without the Debian tools, a run as an ordinary user).

- ``unavailable(msg)``: fail (or skip under the opt-in) with ``msg``;
- ``need_root(why)`` / ``root_only(why)`` (a marker, checked before the test's fixtures run);
- ``need_tool(*names)``: commands on PATH (``./dev setup`` installs the Debian ones);
- ``IS_ROOT``, ``ALLOW_SKIP``.

Opt-in suites that run only when asked (``IMAGEVOL_CSI_SANITY``) keep their own ``skipif``: they
are not a missing need but a choice.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

IS_ROOT = os.geteuid() == 0
ALLOW_SKIP = os.environ.get("IMAGEVOL_ALLOW_SKIP") == "1"
ROOT_MARK = "needs_root"


def unavailable(msg: str) -> NoReturn:
    """Fail with ``msg``, or skip with it when ``IMAGEVOL_ALLOW_SKIP=1``."""
    if ALLOW_SKIP:
        pytest.skip(msg)
    pytest.fail(f"{msg} (IMAGEVOL_ALLOW_SKIP=1 skips instead)", pytrace=False)


def need_root(why: str) -> None:
    if not IS_ROOT:
        unavailable(f"needs root ({why}); run the tests as root, e.g. sudo ./dev test")


def root_only(why: str) -> pytest.MarkDecorator:
    """A marker: the test needs root (``tests/conftest.py`` checks it before the test's fixtures)."""
    return getattr(pytest.mark, ROOT_MARK)(why)


def need_tool(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        unavailable(f"{', '.join(missing)} not found on PATH: ./dev setup installs the Debian tools")
