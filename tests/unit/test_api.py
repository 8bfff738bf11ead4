"""The package-level API: `imagevol.pull`, `imagevol.mount`, ... stay functions once every stage
module is imported (no submodule of the package shares an API name)."""

from __future__ import annotations

import importlib
import inspect

import imagevol


def test_api_names_are_functions_after_their_submodules_are_imported() -> None:
    for module in ("fetch.plan", "compose", "resolve.explain", "cli"):
        importlib.import_module(f"imagevol.{module}")
    for name in ("pull", "mount", "explain", "unmount", "inspect"):
        fn = getattr(imagevol, name)
        assert inspect.isfunction(fn), f"imagevol.{name} is {fn!r}"
    assert set(imagevol.__all__) >= {"pull", "mount", "unmount", "explain", "inspect"}
