"""Volume commands: `mount`, `unmount`, `volumes`."""

from __future__ import annotations

import json
from typing import Any

import click

from .common import (
    handle_errors,
    main,
    make_options,
    parse_nodes,
    parse_size,
    progress_for,
    progress_shown,
    pull_options,
    registry_options,
)


@main.command("mount")
@click.argument("ref")
@click.argument("target", type=click.Path(file_okay=True))
@pull_options
@click.option("--subpath", default=None, help="Mount only this path inside the volume (for artifacts, a title prefix).")
@click.option(
    "--mode",
    type=click.Choice(["auto", "bind", "hardlink", "copy"]),
    default="auto",
    show_default=True,
    help="auto: a read-only bind mount as root, else a private copy (reflinks where possible); "
    "hardlink: the same (never links into the store).",
)
@click.option(
    "--name-untitled",
    type=click.Choice(["skip", "digest"]),
    default="skip",
    show_default=True,
    help="Artifact layers without a title: skip them (as CRI-O) or name them by digest.",
)
@click.option(
    "--max-ratio",
    type=click.FloatRange(min=0),
    default=250.0,
    show_default=True,
    help="Refuse a layer that expands more than this many times (decompression bomb); 0: no limit.",
)
@click.option(
    "--max-size",
    default=None,
    metavar="SIZE",
    help="Refuse a layer that expands to more than SIZE (e.g. 500G, 2TiB, bytes).",
)
@click.option(
    "--max-entries",
    type=click.IntRange(min=0),
    default=1_000_000,  # unpack.applier.DEFAULT_MAX_ENTRIES (not imported: the CLI starts fast)
    show_default=True,
    help="Refuse a layer of more than this many tar entries (an inode bomb); 0: no limit.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@registry_options
@click.pass_context
@handle_errors
def mount_cmd(
    ctx: click.Context,
    ref: str,
    target: str,
    subpath: str | None,
    mode: str,
    name_untitled: str,
    max_ratio: float,
    max_size: str | None,
    max_entries: int,
    as_json: bool,
    **kw: Any,
) -> None:
    """Mount REF read-only at TARGET: resolve for this node, pull what is missing, materialize once,
    then a nosuid,nodev read-only bind mount (as root) or a private copy (reflinks where possible)."""
    from ..compose import mount

    nodes = parse_nodes(kw.pop("platforms"))
    prog = progress_for(kw.pop("progress_mode"))
    args = dict(
        root=ctx.obj["root"],
        platforms=[p for n in nodes for p in n],
        policy=kw.pop("platform_policy"),
        pull_policy=kw.pop("pull_policy"),
        concurrency=kw.pop("concurrency"),
        part_size=kw.pop("part_size") << 20,
        parts_per_blob=kw.pop("streams"),
        subpath=subpath,
        mode=mode,
        name_untitled=name_untitled,
        max_ratio=max_ratio or None,
        max_size=parse_size(max_size) if max_size else None,
        max_entries=max_entries or None,
        warn=lambda m: click.echo(f"warning: {m}", err=True),
    )
    options = make_options(kw)
    with progress_shown(prog):
        res = mount(ref, target, options=options, progress=prog, **args)
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2))
    else:
        v = res.volume
        kind = "read-only" if v.mode == "bind" else "a private copy"
        click.echo(f"mounted {v.ref} ({res.snapshot.flavour}, {v.digest.short}) at {v.target} [{v.mode}, {kind}]")


@main.command("unmount")
@click.argument("target", type=click.Path())
@click.pass_context
@handle_errors
def unmount_cmd(ctx: click.Context, target: str) -> None:
    """Unmount the volume at TARGET and release its content (gc may then reclaim it)."""
    from ..compose import unmount

    v = unmount(target, root=ctx.obj["root"])
    click.echo(f"unmounted {v.target}")


@main.command("volumes")
@click.option("--json", "as_json", is_flag=True)
@click.option("--prune", is_flag=True, help="Drop records of volumes whose mount is gone (reboot, manual umount).")
@click.pass_context
@handle_errors
def volumes_cmd(ctx: click.Context, as_json: bool, prune: bool) -> None:
    """List volumes, checked against the kernel's mount table."""
    from ..compose import volumes

    vols = volumes(root=ctx.obj["root"], reconcile_stale=prune)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "id": v.id,
                        "target": str(v.target),
                        "reference": v.ref,
                        "digest": str(v.digest),
                        "mode": v.mode,
                        "subpath": v.subpath,
                        "mounted": v.mounted,
                        "createdAt": v.created_at,
                    }
                    for v in vols
                ],
                indent=2,
            )
        )
        return
    for v in vols:
        state = "mounted" if v.mounted else "GONE (run `imagevol volumes --prune`)"
        sub = f" subpath={v.subpath}" if v.subpath else ""
        click.echo(f"{v.target}  {v.ref}  {v.digest.short}  {v.mode}{sub}  {state}")


if __name__ == "__main__":  # pragma: no cover
    main()
