"""Fixtures most end-to-end modules share (a module may define its own variant by the same name)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.clirun import Imagevol
from tests.support.proxy import Proxy
from tests.support.registry import Registry


@pytest.fixture(scope="module")
def module_proxy(registry: Registry) -> Iterator[Proxy]:
    """A fault-injecting proxy in front of the plain registry, one per test module."""
    with Proxy(registry.url) as p:
        yield p


@pytest.fixture
def px(module_proxy: Proxy) -> Iterator[Proxy]:
    """The module's proxy, reset (no faults, counters at zero) before and after the test."""
    module_proxy.reset()
    yield module_proxy
    module_proxy.reset()


@pytest.fixture
def iv(tmp_path: Path) -> Iterator[Imagevol]:
    """The imagevol CLI on a fresh store under the test's directory; nothing may leak out of it."""
    c = Imagevol(tmp_path / "store", tmp_path / "home", watch=[tmp_path])
    yield c
    c.cleanup()
