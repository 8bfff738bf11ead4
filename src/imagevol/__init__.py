"""imagevol: mount OCI images and artifacts as read-only volumes on any CPU architecture.

The public API is a handful of calls; each returns a typed result and raises
:class:`imagevol.errors.ImagevolError` subclasses whose messages say what to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "explain", "inspect", "mount", "pull", "unmount"]

if TYPE_CHECKING:
    from .compose import MountResult
    from .fetch import PullResult
    from .volume import Volume


def pull(ref: str, **kwargs: Any) -> PullResult:
    """Resolve `ref` for a node and fetch its content into the store (see :func:`imagevol.fetch.plan.pull`)."""
    from .fetch import pull as _pull

    return _pull(ref, **kwargs)


def inspect(ref: str, **kwargs: Any) -> dict[str, Any]:
    """The descriptor tree of `ref` as plain data (see :func:`imagevol.resolve.explain.inspect_tree`)."""
    from .resolve.explain import inspect_tree
    from .sources.factory import open_source

    return inspect_tree(open_source(ref, **kwargs))


def explain(
    ref: str, nodes: list[list[Any]], *, runtimes: list[str] | None = None, policy: str = "native", **kwargs: Any
) -> dict[str, Any]:
    """What each runtime does with `ref` on each node (see :func:`imagevol.resolve.explain.explain`)."""
    from .resolve.explain import RUNTIMES
    from .resolve.explain import explain as _explain
    from .sources.factory import open_source

    return _explain(open_source(ref, **kwargs), nodes, runtimes or list(RUNTIMES), policy)


def mount(ref: str, target: str, **kwargs: Any) -> MountResult:
    """Mount `ref` read-only at `target` (see :func:`imagevol.compose.mount`)."""
    from .compose import mount as _mount

    return _mount(ref, target, **kwargs)


def unmount(target: str, **kwargs: Any) -> Volume:
    """Unmount the volume at `target` (see :func:`imagevol.compose.unmount`)."""
    from .compose import unmount as _unmount

    return _unmount(target, **kwargs)
