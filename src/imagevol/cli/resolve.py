"""`imagevol inspect` and `imagevol explain`: what a reference names and what each runtime picks."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..errors import ImagevolError
from .common import (
    handle_errors,
    main,
    make_options,
    parse_nodes,
    registry_options,
)


@main.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the tree as JSON.")
@registry_options
@handle_errors
def inspect(ref: str, as_json: bool, **kw: Any) -> None:
    """Show the descriptor tree of REF: index entries with platforms, image or artifact,
    artifactType, config type, layers with media type, size and title.

    REF is a registry reference (`registry.example.com/models/llama:v1`) or an OCI layout
    (`oci:PATH[:TAG|@DIGEST]`)."""
    from ..resolve.explain import inspect_tree, render_tree
    from ..sources.factory import open_source

    source = open_source(ref, options=make_options(kw))
    tree = inspect_tree(source)
    if as_json:
        click.echo(json.dumps({"reference": ref, "source": source.describe(), "tree": tree}, indent=2))
    else:
        click.echo(render_tree(ref, tree))


@main.command()
@click.argument("ref")
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    metavar="P[,P...]",
    help="A node's platform preference list, e.g. linux/arm64,linux/amd64. Repeat for more "
    "nodes. Default: linux/amd64, linux/arm64 and linux/arm/v7.",
)
@click.option(
    "--platform-policy",
    type=click.Choice(["native", "any"]),
    default="native",
    show_default=True,
    help="native: runtime (CRI-O) matching; any: if nothing matches, the first entry.",
)
@click.option(
    "--runtime",
    "runtimes",
    multiple=True,
    type=click.Choice(["imagevol", "crio", "containerd"]),
    help="Predict this runtime's image volume (repeatable). Default: all three.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Show every index entry's verdict.")
@registry_options
@handle_errors
def explain(
    ref: str,
    platforms: tuple[str, ...],
    platform_policy: str,
    runtimes: tuple[str, ...],
    as_json: bool,
    verbose: bool,
    **kw: Any,
) -> None:
    """For each node platform, which manifest of REF is chosen and why, or why none matches and
    what would fix it; with --runtime, what CRI-O 1.34 or containerd 2.1 would do.

    Exits 3 when, on some node asked, a runtime asked for (default: imagevol) mounts nothing."""
    from ..resolve.explain import DEFAULT_NODES, RUNTIMES, outcome_json, render_explain
    from ..resolve.explain import explain as do_explain
    from ..sources.factory import open_source

    nodes = parse_nodes(platforms, list(DEFAULT_NODES))
    try:
        source = open_source(ref, options=make_options(kw))
    except ImagevolError as e:
        from ..resolve.explain import runtimes_accept_hint

        raise type(e)(e.message, runtimes_accept_hint(ref, e)) from None
    result = do_explain(source, nodes, list(runtimes) or list(RUNTIMES), platform_policy)
    if as_json:
        click.echo(json.dumps({"reference": ref, **outcome_json(result)}, indent=2))
    else:
        click.echo(render_explain(ref, result, verbose=verbose))
    # Exit status: the runtimes asked for, or imagevol's own outcome when none was asked.
    judged = set(runtimes) or {"imagevol"}
    failed = [o for n in result["nodes"] for o in n["outcomes"] if o.runtime in judged and not o.mounts]
    if failed:
        sys.exit(3)
