"""`imagevol pack DIR REF`: pack a directory as an image or artifact, push it, explain the result."""

from __future__ import annotations

import json
from typing import Any

import click

from ..pack import DEFAULT_ARTIFACT_TYPE, DEFAULT_PLATFORMS, FORMATS
from ..pack.tarwriter import COMPRESSIONS
from .common import handle_errors, main, make_options, registry_options


def _annotations(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{v!r} is not KEY=VALUE", param_hint="--annotation")
        out[key] = value
    return out


@main.command("pack")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("ref")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="image",
    show_default=True,
    help="image: runnable image, mounts on every runtime; artifact: OCI 1.1 artifact, one raw layer "
    "per file; modelpack: CNCF ModelPack model artifact.",
)
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    metavar="P[,P...]",
    help="Platforms of the index (repeatable or comma-separated). Images default to "
    + ", ".join(DEFAULT_PLATFORMS)
    + "; artifacts default to a bare manifest.",
)
@click.option(
    "--agnostic",
    is_flag=True,
    help="Image: an index with one platform-less entry (CRI-O mounts it on any node; containerd only "
    "on amd64, through its config).",
)
@click.option(
    "--compression",
    type=click.Choice(COMPRESSIONS),
    default="none",
    show_default=True,
    help="Compression of tar layers (raw artifact layers are never compressed).",
)
@click.option(
    "--artifact-type",
    default=None,
    metavar="TYPE",
    help=f"artifactType of --format artifact (default {DEFAULT_ARTIFACT_TYPE}).",
)
@click.option(
    "--annotation",
    "annotations",
    multiple=True,
    metavar="K=V",
    help="Annotation on the manifests and the index (repeatable).",
)
@click.option(
    "--large-file-size",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    metavar="MiB",
    help="Files this large get a layer of their own (image format).",
)
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    metavar="MiB",
    help="Blobs larger than this, and large blobs hashed while they upload, go in PATCH requests of at most this size.",
)
@click.option(
    "--mount-from",
    multiple=True,
    metavar="REPO",
    help="Repository on the same registry to mount existing blobs from (repeatable).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1, max=64),
    default=4,
    show_default=True,
    help="Layers built and blobs pushed at once.",
)
@click.option(
    "--progress",
    "progress_mode",
    type=click.Choice(["auto", "bars", "json", "none"]),
    default="auto",
    show_default=True,
    help="Progress on stderr.",
)
@click.option("--no-explain", is_flag=True, help="Do not print the runtime table after the push.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (and the explanation) as JSON.")
@registry_options
@click.pass_context
@handle_errors
def pack_cmd(
    ctx: click.Context,
    directory: str,
    ref: str,
    fmt: str,
    platforms: tuple[str, ...],
    agnostic: bool,
    compression: str,
    artifact_type: str | None,
    annotations: tuple[str, ...],
    large_file_size: int,
    chunk_size: int,
    mount_from: tuple[str, ...],
    concurrency: int,
    progress_mode: str,
    no_explain: bool,
    as_json: bool,
    **kw: Any,
) -> None:
    """Pack DIRECTORY into an OCI image or artifact and push it to REF (a registry reference, or
    oci:PATH[:TAG] for an OCI layout, created if needed).

    Packing is deterministic: the same directory gives the same digests anywhere (sorted entries,
    fixed mtimes: 0 or SOURCE_DATE_EPOCH, owner 0). Each file is read once: large blobs are hashed
    while they upload. Blobs the registry has are skipped when their digest is known first: small
    blobs, --mount-from, and files whose digests are remembered from an earlier pack
    (~/.cache/imagevol/pack-digests.json; IMAGEVOL_PACK_CACHE=FILE or off). Prints the digest,
    then which runtime mounts the result on linux/amd64, linux/arm64 and linux/arm/v7."""
    from ..pack import pack
    from ..platform import parse_platform_list
    from ..resolve.explain import DEFAULT_NODES, RUNTIMES, human_size, outcome_json, render_explain
    from ..resolve.explain import explain as do_explain
    from ..sources.factory import open_source
    from .common import progress_for, progress_shown

    anns = _annotations(annotations)
    options = make_options(kw)
    prog = progress_for(progress_mode)
    args: dict[str, Any] = dict(
        format=fmt,
        platforms=list(platforms) or None,
        agnostic=agnostic,
        compression=compression,
        artifact_type=artifact_type,
        annotations=anns,
        options=options,
        large_file_size=large_file_size << 20,
        chunk_size=chunk_size << 20,
        concurrency=concurrency,
        mount_from=mount_from,
    )
    with progress_shown(prog):
        res = pack(directory, ref, progress=prog, **args)

    explained = None
    if not no_explain:
        source = open_source(ref, options=options)
        nodes = [parse_platform_list(n) for n in DEFAULT_NODES]
        explained = do_explain(source, nodes, list(RUNTIMES), "native")
    if as_json:
        doc: dict[str, Any] = res.to_dict()
        if explained is not None:
            doc["explain"] = outcome_json(explained)
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(str(res.digest))
    kinds = {"image": "image", "artifact": "artifact", "modelpack": "ModelPack artifact"}
    shape = f"index of {len(res.manifests)} manifest(s)" if res.media_type.endswith("index.v1+json") else "manifest"
    click.echo(
        f"  {kinds[res.format]}, {shape}, {len(res.layers)} layer(s), {res.files} file(s), "
        f"{human_size(res.bytes_total)}; blobs: {res.blobs_pushed} pushed ({human_size(res.bytes_pushed)}), "
        f"{res.blobs_skipped} already there, {res.blobs_mounted} mounted; {res.seconds:.1f} s"
    )
    if explained is not None:
        click.echo(render_explain(ref, explained))
