"""`imagevol csi`: the Kubernetes CSI node plugin (ephemeral inline volumes of images and artifacts)."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from ..csi import DEFAULT_DRIVER_NAME
from .common import handle_errors, main, make_options, registry_options


@main.command("csi")
@click.option(
    "--endpoint",
    required=True,
    envvar="CSI_ENDPOINT",
    metavar="unix:///PATH",
    help="The unix socket to serve CSI on, e.g. unix:///csi/csi.sock.",
)
@click.option(
    "--node-id",
    required=True,
    envvar="NODE_ID",
    help="This node's name, as NodeGetInfo reports it (default: $NODE_ID).",
)
@click.option("--driver-name", default=DEFAULT_DRIVER_NAME, show_default=True, help="The CSI driver name.")
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=9809,
    show_default=True,
    help="Port of the Prometheus /metrics endpoint; 0 turns it off.",
)
@click.option("--metrics-host", default="0.0.0.0", show_default=True, help="Address the metrics endpoint binds.")
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    metavar="os/arch[/variant]",
    help="The node's platform preference list, best first (repeatable or comma-separated; default: this "
    "host). A volume's `platform` attribute overrides it.",
)
@click.option(
    "--access-ttl",
    type=click.FloatRange(min=0),
    default=3600.0,
    show_default=True,
    metavar="SECONDS",
    help="How long a registry's confirmation that a volume's credentials may read content another volume's "
    "secret pulled onto the node is reused (kept in the store across restarts; 0: ask at every publish).",
)
@click.option(
    "--node-address",
    "node_addresses",
    multiple=True,
    metavar="IP",
    help="An address of this node that is not on an interface the plugin sees (its IP, when the plugin runs "
    "in the pod network); refused like the node's own (repeatable).",
)
@registry_options
@click.pass_context
@handle_errors
def csi_cmd(
    ctx: click.Context,
    endpoint: str,
    node_id: str,
    driver_name: str,
    metrics_port: int,
    metrics_host: str,
    platforms: tuple[str, ...],
    access_ttl: float,
    node_addresses: tuple[str, ...],
    **kw: Any,
) -> None:
    """Serve the CSI Identity and Node services for ephemeral inline volumes.

    \b
    A pod names the content in its csi volume:
      volumes:
      - name: model
        csi:
          driver: csi.imagevol.io
          readOnly: true
          volumeAttributes:
            image: registry.example.com/models/llama:v1
            platformPolicy: any        # native (default) | any
            pullPolicy: missing        # always | missing (default) | never
            platform: linux/arm64      # default: the node's (--platform)
            subPath: weights           # optional

    Volumes are read-only (a request without readOnly: true is refused). A pull that outlives the
    kubelet's deadline goes on; the kubelet's retry attaches to it. Runs until SIGTERM.
    """
    from ..csi.publisher import PluginConfig
    from ..csi.server import serve
    from ..errors import UsageError
    from ..platform import host_platform, parse_platform_list
    from ..registry.egress import EgressPolicy

    if not node_id.strip():
        raise UsageError("--node-id is empty", hint="pass the node's name (the downward API's spec.nodeName)")
    node: list[Any] = []
    for spec in platforms:
        for p in parse_platform_list(spec):
            if p not in node:
                node.append(p)
    options = make_options(kw, always_restrict=True)
    if node_addresses:
        options.egress = dataclasses.replace(options.egress, node=EgressPolicy.parse([], node_addresses).node)
    config = PluginConfig(
        root=Path(ctx.obj["root"]),
        node_id=node_id.strip(),
        driver_name=driver_name,
        platforms=node or [host_platform()],
        options=options,
        access_ttl=access_ttl,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s"))
    logger = logging.getLogger("imagevol")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    if config.options.egress is not None and not config.options.egress.allow:
        logger.warning(
            "no --allow-registry: every pull will be refused; list the registries pods may use "
            "(--allow-registry ghcr.io, --allow-registry '*.example.com', or '*' for any public registry)"
        )
    status = serve(config, endpoint, metrics_host=metrics_host, metrics_port=metrics_port)
    # Pulls run in daemon threads and resume at the next publish: do not wait for them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
