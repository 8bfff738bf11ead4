"""Prometheus metrics of the CSI plugin, in a registry of their own (no process-global state).

=====================================  =====================================================
imagevol_pulls_total{result}           pulls run (one per shared pull, not per volume);
                                       result: success, failure
imagevol_pull_bytes_total              bytes downloaded from registries (resumed bytes and
                                       content already in the store are not counted)
imagevol_pull_duration_seconds         how long pulls took (histogram)
imagevol_publish_total{result}         NodePublishVolume answers; result: success,
                                       pending (the pull goes on; the caller retries),
                                       failure
imagevol_publish_failures_total{reason}  failed NodePublishVolume answers by gRPC code
                                       (INVALID_ARGUMENT, FAILED_PRECONDITION, ...)
imagevol_publish_duration_seconds      from a volume's first publish call to its mount
                                       (histogram; retries included)
imagevol_unpublish_total{result}       NodeUnpublishVolume answers
imagevol_volumes                       volumes this plugin has published and not yet
                                       unpublished
=====================================  =====================================================
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Pulls of model weights run from seconds to many minutes.
_PULL_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_PUBLISH_BUCKETS = (0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    """The plugin's counters; :meth:`serve` exposes them over HTTP (``/metrics``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.pulls = Counter(
            "imagevol_pulls", "Pulls run (shared by the volumes of one image).", ["result"], registry=r
        )
        self.pull_bytes = Counter("imagevol_pull_bytes", "Bytes downloaded from registries.", registry=r)
        self.pull_seconds = Histogram(
            "imagevol_pull_duration_seconds", "Duration of pulls.", buckets=_PULL_BUCKETS, registry=r
        )
        self.publishes = Counter("imagevol_publish", "NodePublishVolume answers.", ["result"], registry=r)
        self.publish_failures = Counter(
            "imagevol_publish_failures", "Failed NodePublishVolume answers by gRPC code.", ["reason"], registry=r
        )
        self.publish_seconds = Histogram(
            "imagevol_publish_duration_seconds",
            "From a volume's first NodePublishVolume call to its mount.",
            buckets=_PUBLISH_BUCKETS,
            registry=r,
        )
        self.unpublishes = Counter("imagevol_unpublish", "NodeUnpublishVolume answers.", ["result"], registry=r)
        self.volumes = Gauge("imagevol_volumes", "Volumes published by this plugin.", registry=r)
        for result in ("success", "failure"):
            self.pulls.labels(result)
            self.unpublishes.labels(result)
        for result in ("success", "pending", "failure"):
            self.publishes.labels(result)

    def serve(self, host: str, port: int) -> None:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread."""
        start_http_server(port, addr=host, registry=self.registry)
