"""What every command shares: the `imagevol` group, error and signal handling, typed option
decorators (registry, pull), option objects and progress output."""

from __future__ import annotations

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


def fail(message: str, hint: str | None, code: int) -> None:
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
    fail(f"interrupted by {name}", "run the command again: it resumes where this one stopped", 128 + signum)


def handle_errors(fn: F) -> F:
    """Map library errors to one `error:` line (plus a hint) and the shared exit codes."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ImagevolError as e:
            fail(e.message, e.hint, e.exit_code)
        except KeyboardInterrupt as e:
            _interrupted(getattr(e, "signum", signal.SIGINT))
        except OSError as e:
            fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e), None, EXIT_ERROR)
        except Exception as e:
            if os.environ.get("IMAGEVOL_DEBUG"):
                raise
            fail(f"unexpected {type(e).__name__}: {e}", "set IMAGEVOL_DEBUG=1 for a traceback", EXIT_ERROR)

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
    from ..registry.egress import EgressPolicy
    from ..registry.transport import RegistryOptions

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


def progress_shown(prog: Any) -> Any:
    """The progress display's context (bars start and stop), or a no-op for callbacks without one."""
    import contextlib

    return prog if prog is not None and hasattr(prog, "__enter__") else contextlib.nullcontext()


def progress_for(mode: str) -> Any:
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
    from ..fetch import pull

    nodes = parse_nodes(kw.pop("platforms"))
    node = [p for n in nodes for p in n]
    options = make_options(kw)
    prog = progress_for(kw.pop("progress_mode"))
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
