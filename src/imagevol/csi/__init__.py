"""The Kubernetes CSI node plugin (``imagevol csi``): images and artifacts as ephemeral inline volumes.

- :mod:`.server`: the gRPC Identity and Node services on a unix socket, one log line per call;
- :mod:`.publisher`: background publish jobs a retry attaches to, shared pulls, records that
  survive a restart, unpublish;
- :mod:`.attrs`: volume attributes, access modes, registry credentials from the volume's secret;
- :mod:`.status`: library errors as gRPC codes and messages for pod events;
- :mod:`.metrics`: Prometheus counters;
- ``csi.proto``: the CSI v1 messages and services served (``csi_pb2*.py`` are generated from it by
  ``scripts/gen-csi-proto``).
"""

DEFAULT_DRIVER_NAME = "csi.imagevol.io"
