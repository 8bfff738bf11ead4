"""Session fixtures: real docker-registry instances on 127.0.0.1, started lazily (on first use)
and stopped at the end of the session.

- ``registry``: plain HTTP, no auth
- ``tls_registry``: HTTPS with a generated CA (``reg.ca_file``)
- ``basic_registry``: HTTP + htpasswd (users ``reg.users``, default alice/secret)
- ``token_registry``: HTTP + Bearer tokens from ``reg.token_server`` (a TokenServer)

A missing ``/usr/bin/docker-registry`` fails these fixtures, or skips them when
``IMAGEVOL_ALLOW_SKIP=1`` (``tests/support/need.py``; so does a ``root_only`` test run as a user).
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# `tests.support` must import under a bare `pytest` too (python -m pytest adds the cwd itself).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support.need import ROOT_MARK, need_root, unavailable  # noqa: E402
from tests.support.registry import (  # noqa: E402
    Registry,
    RegistryUnavailable,
    registry_available,
    registry_binary,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{ROOT_MARK}(why): the test needs root (tests/support/need.py)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    mark = item.get_closest_marker(ROOT_MARK)
    if mark is not None:
        need_root(*mark.args)


def _start(root: Path, name: str, **kw) -> Registry:
    if not registry_available():
        msg = (
            f"registry binary {registry_binary()} is missing: install Debian's docker-registry package "
            "(apt-get install docker-registry) or set IMAGEVOL_REGISTRY_BIN"
        )
        unavailable(msg)
    try:
        return Registry.start(root / name, **kw)
    except RegistryUnavailable as e:
        unavailable(str(e))


@pytest.fixture(scope="session", autouse=True)
def _private_pack_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`imagevol pack`'s digest cache (in-process and in the CLI runs the tests start) lives in this
    session's temp dir, not in the user's ~/.cache."""
    if "IMAGEVOL_PACK_CACHE" in os.environ:
        yield
        return
    os.environ["IMAGEVOL_PACK_CACHE"] = str(tmp_path_factory.mktemp("pack-cache") / "pack-digests.json")
    try:
        yield
    finally:
        os.environ.pop("IMAGEVOL_PACK_CACHE", None)


@pytest.fixture(scope="session")
def registries_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registries")


@pytest.fixture(scope="session")
def registry(registries_root: Path) -> Iterator[Registry]:
    reg = _start(registries_root, "plain")
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def tls_registry(registries_root: Path) -> Iterator[Registry]:
    reg = _start(registries_root, "tls", tls=True)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def basic_registry(registries_root: Path) -> Iterator[Registry]:
    reg = _start(registries_root, "basic", auth="basic")
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def token_registry(registries_root: Path) -> Iterator[Registry]:
    reg = _start(registries_root, "token", auth="token")
    yield reg
    reg.stop()


@pytest.fixture
def unique_repo(request: pytest.FixtureRequest) -> str:
    """A repository name no other test uses: ``test/<test-name>-<random>``."""
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40] or "t"
    return f"test/{base}-{uuid.uuid4().hex[:8]}"
