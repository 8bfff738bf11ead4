"""What a NodePublishVolume request asks for: volume attributes, access mode, registry secrets.

Volume attributes (``volumeAttributes`` of a pod's inline ``csi`` volume):

``image`` (required)
    A registry reference (``registry.example.com/models/llama:v1``, ``...@sha256:...``). OCI layout
    references (``oci:PATH``) are refused: they would let a pod read any directory on the node.
``platform``
    The platform preference list for this volume (``linux/arm64`` or ``linux/arm64,linux/amd64``);
    default: the plugin's ``--platform`` list (the node's own platform).
``platformPolicy``
    ``native`` (default: runtime matching) or ``any`` (if nothing matches, the first entry).
``pullPolicy``
    ``always``, ``missing`` (default) or ``never``; Kubernetes' spellings ``Always``,
    ``IfNotPresent`` and ``Never`` are accepted too.
``subPath``
    Mount only this path inside the image or artifact.

Keys the kubelet adds itself (``csi.storage.k8s.io/...``, with ``podInfoOnMount``) are ignored; any
other key is refused, so a misspelt attribute fails loudly instead of being silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..platform import Platform, parse_platform_list
from ..reference import LayoutReference, Reference, parse_any
from ..registry.credentials import Credential, lookup_credential, lookup_in_auths, normalize_registry
from . import csi_pb2 as pb

ATTRIBUTES = ("image", "platform", "platformPolicy", "pullPolicy", "subPath")
KUBELET_PREFIX = "csi.storage.k8s.io/"
PLATFORM_POLICIES = ("native", "any")
_PULL_POLICIES = {
    "always": "always",
    "missing": "missing",
    "ifnotpresent": "missing",
    "never": "never",
}

_Mode = pb.VolumeCapability.AccessMode
READ_ONLY_MODES = frozenset({_Mode.SINGLE_NODE_READER_ONLY, _Mode.MULTI_NODE_READER_ONLY})


@dataclass(frozen=True)
class VolumeSpec:
    """One volume's content: what to pull for which platforms, and which part of it to mount."""

    image: str  # as the pod wrote it
    ref: Reference
    platforms: tuple[Platform, ...]
    policy: str
    pull_policy: str
    subpath: str | None
    platform_attr: str = ""  # the `platform` attribute as given ("": the plugin's --platform list)

    @property
    def ref_key(self) -> str:
        """The key the store records the reference under (canonical form)."""
        return str(self.ref)

    def describe(self) -> str:
        parts = [self.image, "platform " + ",".join(str(p) for p in self.platforms), f"policy {self.policy}"]
        if self.subpath:
            parts.append(f"subPath {self.subpath}")
        return ", ".join(parts)


def parse_attributes(context: Mapping[str, str], default_platforms: list[Platform]) -> VolumeSpec:
    """The volume attributes of a publish request as a :class:`VolumeSpec`; UsageError (with a hint
    naming the attribute) when one is missing, unknown or malformed."""
    unknown = sorted(k for k in context if k not in ATTRIBUTES and not k.startswith(KUBELET_PREFIX))
    if unknown:
        raise UsageError(
            "unknown volume attribute(s): " + ", ".join(repr(k) for k in unknown),
            hint="imagevol volumes take the attributes " + ", ".join(ATTRIBUTES) + " (names are case-sensitive)",
        )
    image = (context.get("image") or "").strip()
    if not image:
        raise UsageError(
            'volume attribute "image" is missing',
            hint='name the image or artifact in the pod\'s csi volume: volumeAttributes: {image: "registry/repo:tag"}',
        )
    ref = parse_any(image)
    if isinstance(ref, LayoutReference):
        raise UsageError(
            f"image {image!r} names an OCI layout on the node; the CSI plugin pulls only from registries",
            hint="push the layout to a registry (`imagevol pack` or `skopeo copy`) and name that reference",
        )
    spec = (context.get("platform") or "").strip()
    platforms = parse_platform_list(spec) if spec else list(default_platforms)
    policy = (context.get("platformPolicy") or "native").strip()
    if policy not in PLATFORM_POLICIES:
        raise UsageError(
            f'volume attribute platformPolicy is "{policy}"',
            hint='use "native" (runtime matching) or "any" (if nothing matches, the first entry)',
        )
    pull_policy = _PULL_POLICIES.get((context.get("pullPolicy") or "missing").strip().lower())
    if pull_policy is None:
        raise UsageError(
            f'volume attribute pullPolicy is "{context.get("pullPolicy")}"',
            hint='use "always", "missing" (IfNotPresent) or "never"',
        )
    subpath = context.get("subPath") or None
    if subpath is not None:
        if "\0" in subpath:
            raise UsageError("volume attribute subPath contains a NUL byte")
        parts = [c for c in subpath.split("/") if c not in ("", ".")]
        if ".." in parts:
            raise UsageError(
                f'volume attribute subPath "{subpath}" contains ".."',
                hint="a sub path is relative to the volume root and cannot leave it",
            )
        subpath = "/".join(parts) or None
    return VolumeSpec(image, ref, tuple(platforms), policy, pull_policy, subpath, spec)


def check_capability(cap: pb.VolumeCapability | None, readonly: bool) -> None:
    """Refuse what an image volume cannot be: a block device, or a writable file system.

    The kubelet sends every inline ephemeral volume with access mode SINGLE_NODE_WRITER (it maps
    the implied ReadWriteOnce; pkg/volume/csi/csi_mounter.go) and ``readonly`` set from the pod's
    ``volumes[].csi.readOnly``. So the mode alone cannot tell a read-only pod from a writing one:
    the request is accepted when ``readonly`` is true, or when the access mode itself is a reader
    mode (SINGLE_NODE_READER_ONLY, MULTI_NODE_READER_ONLY, for other COs); anything else asks for a
    writable volume and is refused, telling the user to add ``readOnly: true``. Refusing instead of
    silently mounting read-only also keeps the kubelet from trying to apply an fsGroup to the
    volume (it skips that only for volumes it knows to be read-only).
    """
    if cap is None or cap.WhichOneof("access_type") is None:
        if cap is None:
            raise UsageError("volume_capability is missing", hint="a CSI CO always sends one; check the caller")
        raise UsageError(
            "volume_capability has neither a mount nor a block access type",
            hint="image volumes are file systems: ask for access_type mount",
        )
    if cap.WhichOneof("access_type") == "block":
        raise UsageError(
            "image volumes are file systems, not block devices",
            hint="use volumeMode Filesystem (a volumeMount, not a volumeDevice)",
        )
    if readonly or cap.access_mode.mode in READ_ONLY_MODES:
        return
    mode = _Mode.Mode.Name(cap.access_mode.mode)
    raise UsageError(
        f"image volumes are read-only; this request asks for a writable volume (readonly=false, access mode {mode})",
        hint="add `readOnly: true` to the pod's csi volume (volumes[].csi.readOnly)",
    )


# --------------------------------------------------------------------------------------------------
# registry credentials from NodePublishVolumeRequest.secrets (a nodePublishSecretRef)


def registry_credentials(
    secrets: Mapping[str, str], ref: Reference, authfile: str | None
) -> Callable[[str, str], Any] | None:
    """A credentials lookup (for ``RegistryOptions.credentials``) from the volume's secret, or None
    when the secret is empty (then the node's auth files are used as for any pull).

    Keys: ``username`` and ``password`` (used for the image's own registry only), or
    ``.dockerconfigjson`` (a ``kubernetes.io/dockerconfigjson`` secret: its ``auths`` entries, by
    registry; credential helpers named in it are ignored, since a pod must not make the node run
    programs). Registries the secret does not cover (mirrors, say) fall back to the node's files.
    """
    if not secrets:
        return None
    auths: dict[str, Any] | None = None
    direct: Credential | None = None
    if ".dockerconfigjson" in secrets or ".dockercfg" in secrets:
        legacy = ".dockerconfigjson" not in secrets
        raw = secrets[".dockercfg" if legacy else ".dockerconfigjson"]
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UsageError(
                "the volume's secret holds a .dockerconfigjson that is not valid JSON",
                hint="create it with `kubectl create secret docker-registry`",
            ) from None
        if not isinstance(doc, dict):
            raise UsageError("the volume's secret .dockerconfigjson must be a JSON object")
        auths = doc if legacy else doc.get("auths", {})
        if not isinstance(auths, dict):
            raise UsageError('the volume\'s secret .dockerconfigjson: "auths" must be an object')
    elif "username" in secrets or "password" in secrets:
        username, password = secrets.get("username", ""), secrets.get("password", "")
        if not username or not password:
            raise UsageError(
                "the volume's secret has a username without a password (or the other way round)",
                hint="give both keys, username and password, or a .dockerconfigjson",
            )
        direct = Credential(username=username, password=password)
    else:
        raise UsageError(
            "the volume's secret has none of the keys username/password or .dockerconfigjson",
            hint="point nodePublishSecretRef at a kubernetes.io/dockerconfigjson secret or one with username "
            "and password",
        )
    home = normalize_registry(ref.domain)

    def lookup(host: str, repo: str) -> Credential | None:
        if direct is not None:
            if normalize_registry(host) == home:
                return direct
        elif auths is not None:
            cred = lookup_in_auths(auths, host, repo, source="the volume's secret", legacy=".dockercfg" in secrets)
            if cred is not None:
                return cred
        return lookup_credential(host, repo, authfile=authfile)

    return lookup
