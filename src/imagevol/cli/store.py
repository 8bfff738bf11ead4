"""Store commands: `images`, `rm`, `gc`, `fsck`."""

from __future__ import annotations

import json

import click

from .common import fail, handle_errors, main


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def images(ctx: click.Context, as_json: bool) -> None:
    """List references in the store."""
    from ..store import Store

    store = Store(ctx.obj["root"])
    refs = store.meta.list_refs() if store.root.exists() else []
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "reference": r.ref,
                        "digest": str(r.digest),
                        "mediaType": r.media_type,
                        "platform": r.platform,
                        "source": r.source,
                        "pulledAt": r.pulled_at,
                    }
                    for r in refs
                ],
                indent=2,
            )
        )
        return
    for r in refs:
        click.echo(f"{r.ref}  {r.digest}  {r.platform or ''}")


@main.command()
@click.argument("ref")
@click.pass_context
@handle_errors
def rm(ctx: click.Context, ref: str) -> None:
    """Forget REF (its content goes at the next gc, unless a volume or another reference holds it)."""
    from ..errors import ImagevolError, NotFoundError
    from ..reference import parse_any, ref_key
    from ..store import Store

    store = Store(ctx.obj["root"])
    key = ref_key(parse_any(ref))
    rec = store.meta.get_ref(key)
    if rec is None:
        raise NotFoundError(f"{key} is not in the store", hint="`imagevol images` lists what is")
    users = [v for v in store.meta.list_volumes() if v.ref == key]
    if users:
        raise ImagevolError(
            f"{key} is in use by {len(users)} volume(s): " + ", ".join(v.target for v in users),
            hint="unmount them first (`imagevol unmount TARGET`)",
        )
    store.meta.remove_ref(key)
    click.echo(f"removed {key}")


@main.command()
@click.option("--dry-run", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def gc(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Remove content no reference, volume or pull in flight holds."""
    from ..compose import gc as run_gc

    res = run_gc(root=ctx.obj["root"], dry_run=dry_run)
    freed = res.bytes_freed + res.ingest_bytes_freed
    if as_json:
        click.echo(
            json.dumps(
                {
                    "removed": [str(d) for d in res.removed],
                    "removedSnapshots": res.removed_snapshots,
                    "removedIngests": res.removed_ingests,
                    "removedBuilds": res.removed_builds,
                    "bytesFreed": freed,
                    "dryRun": dry_run,
                },
                indent=2,
            )
        )
    else:
        click.echo(
            f"{'would remove' if dry_run else 'removed'} {len(res.removed)} blob(s), "
            f"{len(res.removed_snapshots)} snapshot(s), {len(res.removed_ingests)} stale download(s), "
            f"{len(res.removed_builds)} stale build(s): "
            f"{freed} bytes"
        )


@main.command()
@click.option(
    "--repair",
    is_flag=True,
    help="Quarantine bad blobs, drop dangling records and damaged snapshots no volume uses (the next mount rebuilds).",
)
@click.option("--quick", is_flag=True, help="Check snapshots' entries and metadata but not their files' content.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def fsck(ctx: click.Context, repair: bool, quick: bool, as_json: bool) -> None:
    """Re-verify every blob and every snapshot (against the record written when it was built).

    Exit 0 when the store is clean (or a --repair fixed everything), 4 while problems remain."""
    import dataclasses

    from ..compose import fsck as run_fsck

    res = run_fsck(root=ctx.obj["root"], repair=repair, quick=quick)
    left = res.problems_left
    doc = dataclasses.asdict(res)  # Digest is a str: it serializes as "sha256:..."; pairs as lists
    if as_json:
        click.echo(json.dumps({**doc, "ok": res.ok, "problemsLeft": left}, indent=2))
    else:
        for k, v in doc.items():
            if isinstance(v, (list, dict)) and v:
                click.echo(f"{k}: {len(v)}")
                items = v.items() if isinstance(v, dict) else enumerate(v)
                for i, (key, x) in enumerate(items):
                    if i >= 20:
                        click.echo("  ...")
                        break
                    if isinstance(v, dict):
                        click.echo(f"  {key}: " + "; ".join(str(y) for y in x[:5]))
                    else:
                        click.echo("  " + (" -> ".join(x) if isinstance(x, (list, tuple)) else str(x)))
        if res.ok:
            click.echo("ok")
        elif not left:
            click.echo("problems found, all repaired")
        else:
            click.echo(f"problems found: {len(left)} left")
    if left:
        hints = []
        if res.snapshots_in_use:
            hints.append("unmount the volumes on damaged snapshots, then run `imagevol fsck --repair` again")
        elif not repair:
            hints.append("`imagevol fsck --repair` fixes what it can")
        if res.missing_children or res.quarantined:
            hints.append("pull the affected references again to fetch missing content")
        if res.stray_files and repair:
            hints.append("move the stray files listed out of the store's blobs/ (imagevol never writes them)")
        if not hints:
            hints.append("`imagevol fsck --json` lists every problem")
        fail(f"{len(left)} problem(s) left in the store {ctx.obj['root']}", "; ".join(hints) or None, 4)
