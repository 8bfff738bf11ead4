"""The gRPC side of the CSI node plugin: Identity and Node services on a unix socket.

Each RPC is logged as one line on stderr (method, volume id, result code, seconds; never secrets).
NodePublishVolume waits for its job until shortly before the caller's deadline (see
:mod:`imagevol.csi.publisher`) and answers ABORTED while the work goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import wrappers_pb2

from .. import __version__
from ..errors import ImagevolError, NotFoundError, UsageError
from . import csi_pb2 as pb
from . import csi_pb2_grpc as pb_grpc
from .attrs import VolumeSpec, check_capability, parse_attributes
from .metrics import Metrics
from .publisher import PluginConfig, Publisher
from .status import Pending, code_for, message_for

log = logging.getLogger("imagevol.csi")

RPC_WORKERS = 64
# Publishes that may wait for their job at once; the other workers stay free for Probe, unpublish
# and the rest (a publish beyond this answers "pending" at once, after starting its job).
MAX_WAITING_PUBLISHES = RPC_WORKERS - 8
SHUTDOWN_GRACE = 5.0
MOUNT_GRACE = 10.0
_DRIVER_NAME_MAX = 63


def socket_path(endpoint: str) -> Path:
    """The file of a ``unix:///ABS/PATH`` (or ``unix:PATH``, or plain ``/ABS/PATH``) endpoint."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:") :]
    elif endpoint.startswith("/"):
        path = endpoint
    else:
        raise UsageError(
            f"endpoint {endpoint!r} is not a unix socket",
            hint="use unix:///PATH (the kubelet and the CSI sidecars talk to node plugins over unix sockets)",
        )
    if not path.startswith("/"):
        raise UsageError(f"endpoint {endpoint!r} must name an absolute path", hint="write unix:///csi/csi.sock")
    if len(os.fsencode(path)) > 107:
        raise UsageError(f"socket path {path} is longer than the 107 bytes a unix socket address holds")
    return Path(path)


def validate_driver_name(name: str) -> str:
    import re

    if len(name) > _DRIVER_NAME_MAX or not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", name):
        raise UsageError(
            f"invalid driver name {name!r}",
            hint="a CSI driver name is at most 63 characters: letters, digits, '-' and '.', "
            "starting and ending with a letter or digit (e.g. csi.imagevol.io)",
        )
    return name


# A call whose time remaining is beyond this has no deadline: grpcio reports about 9.2e18 s for a
# call without one, more than any timestamp or lock timeout can hold.
NO_DEADLINE_ABOVE = 365 * 86400.0


def _budget(context: grpc.ServicerContext) -> float | None:
    """Seconds to wait before answering "pending": the caller's deadline less a margin for the
    answer to reach it (None: the caller set no deadline, and the call waits without limit)."""
    left = context.time_remaining()
    if left is None or not left < NO_DEADLINE_ABOVE:  # also NaN
        return None
    return max(0.0, left - min(1.0, max(0.05, 0.2 * left)))


class _Rpc:
    """Times an RPC, logs its one line and turns exceptions into gRPC status."""

    def __init__(self, method: str, volume_id: str = "", on_done: Callable[[grpc.StatusCode, Any], None] | None = None):
        self.method = method
        self.volume_id = volume_id
        self.on_done = on_done
        self.spec: VolumeSpec | None = None

    @contextlib.contextmanager
    def run(self, context: grpc.ServicerContext) -> Iterator[_Rpc]:
        t0 = time.monotonic()
        code, message, exc = grpc.StatusCode.OK, "", None
        try:
            yield self
        except Exception as e:
            exc = e
            code, message = code_for(e), message_for(e, self.spec)
            if code == grpc.StatusCode.INTERNAL and not isinstance(e, OSError | ImagevolError):
                log.exception("%s volume=%s: unexpected error", self.method, self.volume_id or "-")
        seconds = time.monotonic() - t0
        first = message.splitlines()[0] if message else ""
        vol = f" volume={self.volume_id}" if self.volume_id else ""
        log.info(
            "%s%s result=%s seconds=%.3f%s", self.method, vol, code.name, seconds, f" msg={first!r}" if first else ""
        )
        if self.on_done is not None:
            self.on_done(code, exc)
        if code != grpc.StatusCode.OK:
            context.abort(code, message)


class IdentityService(pb_grpc.IdentityServicer):
    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def GetPluginInfo(
        self, request: pb.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetPluginInfoResponse:
        with _Rpc("GetPluginInfo").run(context):
            return pb.GetPluginInfoResponse(name=self.publisher.config.driver_name, vendor_version=__version__)
        raise AssertionError("unreachable")  # context.abort raised

    def GetPluginCapabilities(
        self, request: pb.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.GetPluginCapabilitiesResponse:
        # A node-only plugin: no controller service, no topology constraints.
        with _Rpc("GetPluginCapabilities").run(context):
            return pb.GetPluginCapabilitiesResponse()
        raise AssertionError("unreachable")

    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeResponse:
        with _Rpc("Probe").run(context):
            ready, why = self.publisher.probe()
            if not ready:
                log.warning("Probe: not ready: %s", why)
            return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=ready))
        raise AssertionError("unreachable")


class NodeService(pb_grpc.NodeServicer):
    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.metrics = publisher.metrics
        self._waiting = threading.BoundedSemaphore(MAX_WAITING_PUBLISHES)

    def _publish_done(self, code: grpc.StatusCode, exc: Any) -> None:
        if code == grpc.StatusCode.OK:
            self.metrics.publishes.labels("success").inc()
        elif isinstance(exc, Pending):
            self.metrics.publishes.labels("pending").inc()
        else:
            self.metrics.publishes.labels("failure").inc()
            self.metrics.publish_failures.labels(code.name).inc()

    def _unpublish_done(self, code: grpc.StatusCode, exc: Any) -> None:
        self.metrics.unpublishes.labels("success" if code == grpc.StatusCode.OK else "failure").inc()

    def NodePublishVolume(
        self, request: pb.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodePublishVolumeResponse:
        rpc = _Rpc("NodePublishVolume", request.volume_id, self._publish_done)
        with rpc.run(context):
            if not request.volume_id:
                raise UsageError("volume_id is missing")
            if not request.target_path or not request.target_path.startswith("/"):
                raise UsageError(f"target_path {request.target_path!r} must be an absolute path")
            cap = request.volume_capability if request.HasField("volume_capability") else None
            check_capability(cap, request.readonly)
            rpc.spec = parse_attributes(dict(request.volume_context), self.publisher.config.platforms)
            may_wait = self._waiting.acquire(blocking=False)
            try:
                self.publisher.publish(
                    request.volume_id,
                    request.target_path,
                    rpc.spec,
                    secrets=dict(request.secrets),
                    timeout=_budget(context) if may_wait else 0.0,
                )
            finally:
                if may_wait:
                    self._waiting.release()
            return pb.NodePublishVolumeResponse()
        raise AssertionError("unreachable")

    def NodeUnpublishVolume(
        self, request: pb.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodeUnpublishVolumeResponse:
        with _Rpc("NodeUnpublishVolume", request.volume_id, self._unpublish_done).run(context):
            if not request.volume_id:
                raise UsageError("volume_id is missing")
            if not request.target_path or not request.target_path.startswith("/"):
                raise UsageError(f"target_path {request.target_path!r} must be an absolute path")
            self.publisher.unpublish(request.volume_id, request.target_path, timeout=_budget(context))
            return pb.NodeUnpublishVolumeResponse()
        raise AssertionError("unreachable")

    def NodeGetVolumeStats(
        self, request: pb.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> pb.NodeGetVolumeStatsResponse:
        # The kubelet polls it for the volume's health (VOLUME_CONDITION) and its usage metrics.
        with _Rpc("NodeGetVolumeStats", request.volume_id).run(context):
            if not request.volume_id:
                raise UsageError("volume_id is missing")
            if not request.volume_path:
                raise UsageError("volume_path is missing")
            if not request.volume_path.startswith("/"):  # csi-sanity expects NOT_FOUND here
                raise NotFoundError(f"no volume is published at {request.volume_path!r} (not an absolute path)")
            st = self.publisher.volume_stats(request.volume_id, request.volume_path)
            unit = pb.VolumeUsage
            return pb.NodeGetVolumeStatsResponse(
                usage=[
                    unit(total=st.bytes_total, available=st.bytes_available, used=st.bytes_used, unit=unit.BYTES),
                    unit(total=st.inodes_total, available=st.inodes_available, used=st.inodes_used, unit=unit.INODES),
                ],
                volume_condition=pb.VolumeCondition(abnormal=st.abnormal, message=st.message),
            )
        raise AssertionError("unreachable")

    def NodeGetCapabilities(
        self, request: pb.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.NodeGetCapabilitiesResponse:
        # No staging, no expansion: publish and unpublish are all an image volume needs; stats and
        # the volume's condition for the kubelet's health checks.
        with _Rpc("NodeGetCapabilities").run(context):
            rpc = pb.NodeServiceCapability.RPC
            return pb.NodeGetCapabilitiesResponse(
                capabilities=[
                    pb.NodeServiceCapability(rpc=rpc(type=t)) for t in (rpc.GET_VOLUME_STATS, rpc.VOLUME_CONDITION)
                ]
            )
        raise AssertionError("unreachable")

    def NodeGetInfo(self, request: pb.NodeGetInfoRequest, context: grpc.ServicerContext) -> pb.NodeGetInfoResponse:
        with _Rpc("NodeGetInfo").run(context):
            return pb.NodeGetInfoResponse(node_id=self.publisher.config.node_id)
        raise AssertionError("unreachable")


def _prepare_socket(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket", hint="choose another --endpoint, or remove it")
    path.unlink()  # a socket left by an earlier run of the plugin


def serve(
    config: PluginConfig,
    endpoint: str,
    *,
    metrics_host: str = "0.0.0.0",
    metrics_port: int = 0,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Run the plugin until SIGTERM/SIGINT (or `stop`); returns the exit status.

    The store is reconciled at start; if it is unusable the plugin still serves (Probe answers
    not ready, publishes fail UNAVAILABLE) and retries at each call.
    """
    validate_driver_name(config.driver_name)
    sock = socket_path(endpoint)
    metrics = Metrics()
    publisher = Publisher(config, metrics)
    try:
        publisher.start()
    except Exception as e:
        log.error("store %s is unusable (the plugin serves, Probe answers not ready): %s", config.root, e)
    if metrics_port:  # first: a port in use stops the plugin before its socket exists
        try:
            metrics.serve(metrics_host, metrics_port)
        except OSError as e:
            raise UsageError(
                f"cannot serve metrics on {metrics_host}:{metrics_port}: {e.strerror or e}",
                hint="choose another --metrics-port (0 turns the endpoint off)",
            ) from None
        log.info("metrics on http://%s:%d/metrics", metrics_host, metrics_port)
    _prepare_socket(sock)
    server = grpc.server(ThreadPoolExecutor(max_workers=RPC_WORKERS, thread_name_prefix="csi-rpc"))
    pb_grpc.add_IdentityServicer_to_server(IdentityService(publisher), server)
    pb_grpc.add_NodeServicer_to_server(NodeService(publisher), server)
    if server.add_insecure_port(f"unix://{sock}") == 0:
        raise UsageError(f"cannot listen on {sock}")
    server.start()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    log.info(
        "%s %s serving CSI Identity and Node on %s (node %s, platforms %s)",
        config.driver_name, __version__, sock, config.node_id, ",".join(str(p) for p in config.platforms),
    )  # fmt: skip
    if ready is not None:
        ready.set()
    stop.wait()
    log.info("stopping: no new calls; mounts in progress may finish (pulls resume at the next publish)")
    server.stop(SHUTDOWN_GRACE).wait()
    publisher.shutdown(MOUNT_GRACE)
    with contextlib.suppress(OSError):
        sock.unlink()
    log.info("stopped")
    return 0
