"""`imagevol pull`: resolve for this node and fetch into the store (or export a layout)."""

from __future__ import annotations

import json
from typing import Any

import click

from .common import (
    do_pull,
    handle_errors,
    main,
    pull_options,
    registry_options,
)


@main.command("pull")
@click.argument("ref")
@pull_options
@click.option(
    "--output",
    default=None,
    metavar="oci:DIR[:TAG]",
    help="Also write the chosen manifest and its blobs to an OCI layout (skopeo and umoci read it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@registry_options
@click.pass_context
@handle_errors
def pull_cmd(ctx: click.Context, ref: str, output: str | None, as_json: bool, **kw: Any) -> None:
    """Resolve REF for this node and fetch its content into the store (parallel, ranged,
    resumable, verified). Prints the digest of the manifest chosen."""
    if output:
        from ..errors import UsageError
        from ..reference import LayoutReference, parse_any

        if not isinstance(parse_any(output), LayoutReference):
            raise UsageError(f"--output must be an OCI layout (oci:DIR[:TAG]), not {output!r}")
    res = do_pull(ctx, ref, kw)
    for w in res.warnings:
        click.echo(f"warning: {w}", err=True)
    if output:
        from ..fetch import export_layout
        from ..store import Store

        export_layout(Store(ctx.obj["root"]), res, output)
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2))
    else:
        click.echo(str(res.digest))
