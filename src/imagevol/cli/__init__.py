"""The `imagevol` command line: argument parsing and output only; the work is in the library."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from ..errors import EXIT_ERROR, ImagevolError
from ..fsutil import keep_freed_memory

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, hint: str | None, code: int) -> None:
    if _signalled and code != 128 + _signalled[0]:  # what cancelling raised ("pull cancelled", a cut read)
        _interrupted(_signalled[0])
    click.echo(f"error: {message}", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)
    sys.exit(code)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (raised in the main thread by :func:`stop_on_signals`' handler)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_signalled: list[int] = []


def _on_signal(signum: int, frame: Any) -> None:
    if _signalled:  # a second signal while the first one's cleanup runs: stop now
        os._exit(128 + _signalled[0])
    _signalled.append(signum)
    raise Interrupted(signum)


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread, wherever it waits: the
    library cancels the transfers in flight (their sockets are shut down, their threads joined,
    what was received recorded for the next run), releases its leases and locks as on any error,
    and the command exits 130 (SIGINT) or 143 (SIGTERM) with one `error: interrupted` line."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)


def _interrupted(signum: int) -> None:
    name = signal.Signals(signum).name
    _fail(f"interrupted by {name}", "run the command again: it resumes where this one stopped", 128 + signum)


def handle_errors(fn: F) -> F:
    """Map library errors to one `error:` line (plus a hint) and the shared exit codes."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ImagevolError as e:
            _fail(e.message, e.hint, e.exit_code)
        except KeyboardInterrupt as e:
            _interrupted(getattr(e, "signum", signal.SIGINT))
        except OSError as e:
            _fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e), None, EXIT_ERROR)
        except Exception as e:
            if os.environ.get("IMAGEVOL_DEBUG"):
                raise
            _fail(f"unexpected {type(e).__name__}: {e}", "set IMAGEVOL_DEBUG=1 for a traceback", EXIT_ERROR)

    return wrapper  # type: ignore[return-value]


def registry_options(fn: F) -> F:
    """Flags every command that reads a registry shares."""
    opts = [
        click.option(
            "--tls-verify",
            type=click.BOOL,
            default=None,
            help="Verify TLS certificates (default true; false also allows plain http).",
        ),
        click.option(
            "--cert-dir",
            type=click.Path(file_okay=False),
            default=None,
            help="Directory with ca.crt / client.cert / client.key for the registry.",
        ),
        click.option(
            "--authfile",
            type=click.Path(dir_okay=False),
            default=None,
            envvar="REGISTRY_AUTH_FILE",
            help="Credentials file (containers auth.json format).",
        ),
        click.option(
            "--registries-conf",
            type=click.Path(dir_okay=False),
            default=None,
            help="containers-registries.conf v2 file (mirrors, rewrites, insecure, blocked).",
        ),
        click.option(
            "--timeout",
            type=click.FloatRange(min=0.1),
            default=60.0,
            show_default=True,
            help="Seconds to wait for a registry to answer before retrying.",
        ),
        click.option(
            "--retries",
            type=click.IntRange(min=0),
            default=5,
            show_default=True,
            help="Retries on 429/5xx and connection resets.",
        ),
        click.option(
            "--allow-registry",
            "allow_registry",
            multiple=True,
            metavar="GLOB",
            help="Contact only registries matching GLOB (host[:port]: ghcr.io, *.example.com, registry.local:5000, "
            "*; repeatable), and no loopback, link-local or own address of this host unless an entry names the "
            "address (127.0.0.1:*). Mirrors of registries.conf are admitted. Always on in `csi` (none: no registry).",
        ),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def make_options(kw: dict[str, Any], *, always_restrict: bool = False) -> Any:
    """RegistryOptions from the registry flags. The egress policy (--allow-registry) applies when
    entries are given, or always with ``always_restrict`` (the CSI plugin)."""
    from ..registry.client import RegistryOptions
    from ..registry.egress import EgressPolicy

    allow = kw.pop("allow_registry", ()) or ()
    return RegistryOptions(
        egress=EgressPolicy.parse(allow) if allow or always_restrict else None,
        tls_verify=kw.pop("tls_verify", None),
        cert_dir=kw.pop("cert_dir", None),
        authfile=kw.pop("authfile", None),
        registries_conf=kw.pop("registries_conf", None),
        read_timeout=kw.pop("timeout", 60.0),
        retries=kw.pop("retries", 5),
    )


def parse_size(text: str) -> int:
    """`500G`, `2TiB`, `1048576`: bytes (K/M/G/T powers of 1024, an optional `iB` or `B`)."""
    import re

    from ..errors import UsageError

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"invalid size {text!r}", hint="write e.g. 500G, 2TiB or a number of bytes")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * (1024**power))


def parse_nodes(values: tuple[str, ...], default: list[str] | None = None) -> list[list[Any]]:
    from ..platform import host_platform, parse_platform_list

    if not values:
        if default:
            return [parse_platform_list(v) for v in default]
        return [[host_platform()]]
    return [parse_platform_list(v) for v in values]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--root",
    type=click.Path(file_okay=False),
    envvar="IMAGEVOL_ROOT",
    default=None,
    help="Store directory (default /var/lib/imagevol as root, else ~/.local/share/imagevol).",
)
@click.version_option(package_name="imagevol")
@click.pass_context
def main(ctx: click.Context, root: str | None) -> None:
    """Mount OCI images and artifacts (AI model weights above all) as read-only volumes, on any
    CPU architecture, with an explicit platform policy and an explanation of every choice.

    \b
    Exit codes: 0 success, 1 error, 2 usage, 3 no manifest matches the platform,
    4 content refused (verification failed or unsafe content).
    """
    ctx.ensure_object(dict)
    ctx.obj["root"] = root or default_root()
    if ctx.invoked_subcommand in ("pull", "mount", "pack"):
        keep_freed_memory()
        stop_on_signals()


def default_root() -> str:
    if os.geteuid() == 0:
        return "/var/lib/imagevol"
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "imagevol")


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


def progress_shown(prog: Any) -> Any:
    """The progress display's context (bars start and stop), or a no-op for callbacks without one."""
    import contextlib

    return prog if prog is not None and hasattr(prog, "__enter__") else contextlib.nullcontext()


def _progress_for(mode: str) -> Any:
    if mode == "auto":
        mode = "bars" if sys.stderr.isatty() else "none"
    if mode == "bars":
        from ..progress import Bars

        return Bars()
    if mode == "json":
        from ..progress import JsonLines

        return JsonLines()
    return None


def pull_options(fn: F) -> F:
    opts = [
        click.option(
            "--platform",
            "platforms",
            multiple=True,
            metavar="P[,P...]",
            help="The node's platform preference list (default: this host).",
        ),
        click.option(
            "--platform-policy",
            type=click.Choice(["native", "any"]),
            default="native",
            show_default=True,
            help="native: runtime matching; any: if nothing matches, the first entry.",
        ),
        click.option(
            "--pull",
            "pull_policy",
            type=click.Choice(["always", "missing", "never"]),
            default="missing",
            show_default=True,
            help="As Kubernetes' pullPolicy: Always / IfNotPresent / Never.",
        ),
        click.option(
            "--concurrency",
            type=click.IntRange(min=1, max=64),
            default=4,
            show_default=True,
            help="Blobs fetched at once.",
        ),
        click.option(
            "--streams",
            type=click.IntRange(min=1, max=16),
            default=1,
            show_default=True,
            help="Ranged connections per blob over --part-size (for links where one connection is slow).",
        ),
        click.option(
            "--part-size",
            type=click.IntRange(min=1),
            default=64,
            show_default=True,
            help="MiB: blobs larger than this are fetched over --streams connections.",
        ),
        click.option(
            "--progress",
            "progress_mode",
            type=click.Choice(["auto", "bars", "json", "none"]),
            default="auto",
            show_default=True,
            help="Progress on stderr.",
        ),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def do_pull(ctx: click.Context, ref: str, kw: dict[str, Any]) -> Any:
    from ..fetch.pull import pull

    nodes = parse_nodes(kw.pop("platforms"))
    node = [p for n in nodes for p in n]
    options = make_options(kw)
    prog = _progress_for(kw.pop("progress_mode"))
    args = dict(
        root=ctx.obj["root"],
        platforms=node,
        policy=kw.pop("platform_policy"),
        pull_policy=kw.pop("pull_policy"),
        options=options,
        concurrency=kw.pop("concurrency"),
        part_size=kw.pop("part_size") << 20,
        parts_per_blob=kw.pop("streams"),
    )
    with progress_shown(prog):
        return pull(ref, progress=prog, **args)


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
        from ..fetch.pull import export_layout
        from ..store import Store

        export_layout(Store(ctx.obj["root"]), res, output)
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2))
    else:
        click.echo(str(res.digest))


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
    from ..fetch.pull import ref_key
    from ..reference import parse_any
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
        _fail(f"{len(left)} problem(s) left in the store {ctx.obj['root']}", "; ".join(hints) or None, 4)


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
    prog = _progress_for(kw.pop("progress_mode"))
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
from . import csi, pack  # noqa: E402, F401  (register `imagevol csi` and `imagevol pack`)
