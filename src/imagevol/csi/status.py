"""Library errors as gRPC status codes and messages a Kubernetes user can act on.

The kubelet shows a failed NodePublishVolume as a pod event (``MountVolume.SetUp failed for volume
...: rpc error: code = ... desc = MESSAGE``), so the message starts with what was wrong and ends with
a ``hint:`` line saying what to change, in the pod's terms (volume attributes, secrets) where the
library's hint speaks of command-line flags.

Codes (the kubelet retries every failure; for DEADLINE_EXCEEDED, ABORTED, UNAVAILABLE and
RESOURCE_EXHAUSTED it also treats the mount as possibly still in progress):

=====================================  ==================================================
Pending (the pull goes on), Cancelled  ABORTED ("operation pending": call again)
Conflict (the target holds another     ALREADY_EXISTS
volume)
UsageError (bad reference, platform,   INVALID_ARGUMENT
attribute, read-write request)
NoMatchError (no manifest for the      FAILED_PRECONDITION, with the explain trace
node's platform)
EgressRefusedError (a registry outside  PERMISSION_DENIED
--allow-registry, a loopback, link-
local or node address)
AuthError                              UNAUTHENTICATED (401, no credentials) or
                                       PERMISSION_DENIED (403)
NotFoundError                          NOT_FOUND
TransportError, registry 5xx           UNAVAILABLE
registry 429                           RESOURCE_EXHAUSTED
other registry answers                 FAILED_PRECONDITION
DigestMismatchError                    DATA_LOSS
other ContentRefusedError (unsafe or   FAILED_PRECONDITION
refused content, bad manifests)
StoreError                             UNAVAILABLE (the node's store is unusable)
BusyError (unpublish of a volume that  FAILED_PRECONDITION (the kubelet retries once the
processes still use)                   pod's processes are gone)
anything else                          INTERNAL
=====================================  ==================================================
"""

from __future__ import annotations

import grpc

from ..errors import (
    AuthError,
    BusyError,
    ContentRefusedError,
    DigestMismatchError,
    EgressRefusedError,
    ImagevolError,
    NoMatchError,
    NotFoundError,
    RegistryError,
    StoreError,
    TransportError,
    UsageError,
)
from ..resolve.trace import IndexStep
from .attrs import VolumeSpec

Code = grpc.StatusCode


class Pending(ImagevolError):
    """The work goes on in the background; the caller should call again (ABORTED)."""


class Conflict(ImagevolError):
    """The target already holds another volume (ALREADY_EXISTS)."""


class Cancelled(ImagevolError):
    """A publish that was still pulling when its volume was unpublished."""


def code_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for an exception (see the module docs)."""
    if isinstance(exc, Pending | Cancelled):
        return Code.ABORTED
    if isinstance(exc, Conflict):
        return Code.ALREADY_EXISTS
    if isinstance(exc, UsageError):
        return Code.INVALID_ARGUMENT
    if isinstance(exc, NoMatchError):
        return Code.FAILED_PRECONDITION
    if isinstance(exc, EgressRefusedError):
        return Code.PERMISSION_DENIED
    if isinstance(exc, AuthError):
        return Code.PERMISSION_DENIED if exc.status == 403 else Code.UNAUTHENTICATED
    if isinstance(exc, NotFoundError):
        return Code.NOT_FOUND
    if isinstance(exc, TransportError):
        return Code.UNAVAILABLE
    if isinstance(exc, RegistryError):
        if exc.status == 429:
            return Code.RESOURCE_EXHAUSTED
        if exc.status is not None and exc.status >= 500:
            return Code.UNAVAILABLE
        return Code.FAILED_PRECONDITION
    if isinstance(exc, DigestMismatchError):
        return Code.DATA_LOSS
    if isinstance(exc, ContentRefusedError):
        return Code.FAILED_PRECONDITION
    if isinstance(exc, StoreError):
        return Code.UNAVAILABLE
    if isinstance(exc, BusyError):
        return Code.FAILED_PRECONDITION
    return Code.INTERNAL


def message_for(exc: BaseException, spec: VolumeSpec | None = None) -> str:
    """What went wrong and what would help, for a pod event."""
    if isinstance(exc, NoMatchError):
        return no_match_text(exc, spec)
    if isinstance(exc, ImagevolError):
        hint = exc.hint
        if isinstance(exc, AuthError):
            hint = (
                "give the volume a nodePublishSecretRef (a kubernetes.io/dockerconfigjson secret, or keys "
                "username and password), or configure the plugin's --authfile" + (f"; {exc.hint}" if exc.hint else "")
            )
        return exc.message + (f"\nhint: {hint}" if hint else "")
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return f"unexpected {type(exc).__name__}: {exc}\nhint: the plugin's log has the details"


def _trace_lines(steps: list[IndexStep]) -> list[str]:
    lines = []
    for st in steps:
        lines.append(f"  index {st.digest[:19]}: {st.reason}" if st.reason else f"  index {st.digest[:19]}")
        for e in st.entries:
            note = f" - {e.note}" if e.note else ""
            lines.append(f"    [{e.position}] {e.platform or '(no platform)'}: {e.verdict}{note}")
    return lines


def no_match_text(exc: NoMatchError, spec: VolumeSpec | None) -> str:
    """The error, the verdict on every index entry (what ``imagevol explain -v`` shows for this
    node), and which volume attribute would make it mount."""
    steps = [s for s in exc.trace if isinstance(s, IndexStep)] if isinstance(exc.trace, list) else []
    lines = [exc.message]
    if spec is not None:
        node = ",".join(str(p) for p in spec.platforms)
        lines.append(f"explain {spec.image} for node {node} (policy {spec.policy}):")
    lines += _trace_lines(steps)
    offered: list[str] = []
    if steps:
        offered = [e.platform or "(no platform)" for e in steps[0].entries]
    hint = f"the index offers: {', '.join(offered) or 'nothing'}" if steps else (exc.hint or "")
    if spec is None or spec.policy == "native":
        firsts = [e.platform for e in steps[0].entries if e.platform] if steps else []
        hint += '; to mount it anyway set the volume attribute platformPolicy: "any"'
        if firsts:
            hint += f' or platform: "{firsts[0]}"'
        hint += "; or repack it platform-less (`imagevol pack --agnostic`)"
    lines.append(f"hint: {hint}")
    return "\n".join(lines)


def reason_for(exc: BaseException) -> str:
    """A short label for metrics: the gRPC code name."""
    return code_for(exc).name
