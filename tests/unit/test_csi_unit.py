"""The CSI plugin's pure parts: volume attributes, access modes, secrets, error mapping, endpoint
parsing. The gRPC service itself is driven over its socket in tests/e2e/test_csi.py."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import grpc
import pytest

from imagevol.csi import csi_pb2 as pb
from imagevol.csi.attrs import check_capability, parse_attributes, registry_credentials
from imagevol.csi.server import socket_path, validate_driver_name
from imagevol.csi.status import Cancelled, Conflict, Pending, code_for, message_for, no_match_text
from imagevol.errors import (
    AuthError,
    BusyError,
    ContentRefusedError,
    DigestMismatchError,
    ImagevolError,
    InvalidPlatformError,
    InvalidReferenceError,
    ManifestError,
    NoMatchError,
    NotFoundError,
    RegistryError,
    StoreError,
    TransportError,
    UnsafeContentError,
    UsageError,
)
from imagevol.platform import parse_platform, parse_platform_list
from imagevol.reference import parse_any
from imagevol.resolve.select import select_manifest
from imagevol.sources.factory import open_source
from tests.support.layout import LayoutWriter, plat

NODE = [parse_platform("linux/amd64")]
Mode = pb.VolumeCapability.AccessMode
C = grpc.StatusCode


# --------------------------------------------------------------------------- attributes


def test_attributes_defaults() -> None:
    spec = parse_attributes({"image": "registry.example.com/models/llama:v1"}, NODE)
    assert spec.image == "registry.example.com/models/llama:v1"
    assert spec.ref_key == "registry.example.com/models/llama:v1"
    assert spec.platforms == tuple(NODE)
    assert (spec.policy, spec.pull_policy, spec.subpath) == ("native", "missing", None)


def test_attributes_all_set_and_kubelet_keys_ignored() -> None:
    spec = parse_attributes(
        {
            "image": " llama:v1 ",
            "platform": "linux/arm64, linux/amd64",
            "platformPolicy": "any",
            "pullPolicy": "IfNotPresent",
            "subPath": "./weights//sub/",
            "csi.storage.k8s.io/pod.name": "p",
            "csi.storage.k8s.io/ephemeral": "true",
        },
        NODE,
    )
    assert spec.ref_key == "docker.io/library/llama:v1"
    assert spec.platforms == tuple(parse_platform_list("linux/arm64,linux/amd64"))
    assert (spec.policy, spec.pull_policy, spec.subpath) == ("any", "missing", "weights/sub")


@pytest.mark.parametrize(("given", "want"), [("Always", "always"), ("never", "never"), ("MISSING", "missing")])
def test_pull_policy_spellings(given: str, want: str) -> None:
    assert parse_attributes({"image": "a/b:c", "pullPolicy": given}, NODE).pull_policy == want


@pytest.mark.parametrize(
    ("attrs", "exc", "needle"),
    [
        ({}, UsageError, '"image" is missing'),
        ({"image": "  "}, UsageError, '"image" is missing'),
        ({"image": "a/b:c", "Image": "x"}, UsageError, "'Image'"),
        ({"image": "a/b:c", "platformPolicy": "Native"}, UsageError, "platformPolicy"),
        ({"image": "a/b:c", "pullPolicy": "sometimes"}, UsageError, "pullPolicy"),
        ({"image": "a/b:c", "subPath": "a/../../etc"}, UsageError, ".."),
        ({"image": "a/b:c", "subPath": "a\0b"}, UsageError, "NUL"),
        ({"image": "models/Llama:v1"}, InvalidReferenceError, "models/Llama:v1"),
        ({"image": "a/b:c", "platform": "linux/arm64/v99/x"}, InvalidPlatformError, "linux/arm64/v99/x"),
        ({"image": "oci:/etc/layout:tag"}, UsageError, "OCI layout"),
    ],
)
def test_attributes_refused(attrs: dict[str, str], exc: type[Exception], needle: str) -> None:
    with pytest.raises(exc) as ei:
        parse_attributes(attrs, NODE)
    assert needle in str(ei.value)
    assert code_for(ei.value) == C.INVALID_ARGUMENT


# --------------------------------------------------------------------------- access


def _cap(mode: int, *, block: bool = False) -> pb.VolumeCapability:
    cap = pb.VolumeCapability(access_mode=Mode(mode=mode))
    (cap.block if block else cap.mount).SetInParent()
    return cap


WRITERS = [
    Mode.SINGLE_NODE_WRITER,
    Mode.MULTI_NODE_SINGLE_WRITER,
    Mode.MULTI_NODE_MULTI_WRITER,
    Mode.SINGLE_NODE_SINGLE_WRITER,
    Mode.SINGLE_NODE_MULTI_WRITER,
    Mode.UNKNOWN,
]


@pytest.mark.parametrize("mode", [*WRITERS, Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY])
def test_readonly_flag_accepts_every_mode(mode: int) -> None:
    check_capability(_cap(mode), readonly=True)  # a pod with `readOnly: true`


@pytest.mark.parametrize("mode", [Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY])
def test_reader_modes_accepted_without_flag(mode: int) -> None:
    check_capability(_cap(mode), readonly=False)


@pytest.mark.parametrize("mode", WRITERS)
def test_writable_requests_refused(mode: int) -> None:
    with pytest.raises(UsageError) as ei:
        check_capability(_cap(mode), readonly=False)
    assert "read-only" in ei.value.message and "readOnly: true" in (ei.value.hint or "")
    assert Mode.Mode.Name(mode) in ei.value.message


def test_block_and_missing_capability_refused() -> None:
    for cap, ro in ((_cap(Mode.MULTI_NODE_READER_ONLY, block=True), True), (None, True), (pb.VolumeCapability(), True)):
        with pytest.raises(UsageError):
            check_capability(cap, ro)


# --------------------------------------------------------------------------- secrets


def test_no_secret_means_node_credentials() -> None:
    assert registry_credentials({}, parse_any("r.example.com/a/b:c"), None) is None


def test_username_password_only_for_the_image_registry(tmp_path: Path) -> None:
    authfile = tmp_path / "auth.json"
    node = base64.b64encode(b"node:nodepw").decode()
    authfile.write_text(json.dumps({"auths": {"mirror.example.com": {"auth": node}}}))
    lookup = registry_credentials({"username": "u", "password": "p"}, parse_any("r.example.com/a/b:c"), str(authfile))
    assert lookup is not None
    cred = lookup("r.example.com", "a/b")
    assert (cred.username, cred.password) == ("u", "p")
    mirror = lookup("mirror.example.com", "a/b")  # not the secret's registry: the node's file
    assert (mirror.username, mirror.password) == ("node", "nodepw")
    assert "p'" not in repr(cred)  # secrets stay out of reprs


def test_dockerconfigjson_secret(tmp_path: Path) -> None:
    auth = base64.b64encode(b"alice:secret").decode()
    cfg = json.dumps({"auths": {"https://r.example.com/v1/": {"auth": auth}}})
    lookup = registry_credentials({".dockerconfigjson": cfg}, parse_any("r.example.com/a/b:c"), None)
    cred = lookup("r.example.com", "a/b")
    assert (cred.username, cred.password) == ("alice", "secret")
    assert lookup("other.example.com", "a/b") is None


def test_dockerconfigjson_ignores_credential_helpers(tmp_path: Path) -> None:
    cfg = json.dumps({"auths": {}, "credHelpers": {"r.example.com": "evil"}, "credsStore": "evil"})
    lookup = registry_credentials({".dockerconfigjson": cfg}, parse_any("r.example.com/a/b:c"), None)
    assert lookup("r.example.com", "a/b") is None  # no helper program was asked


@pytest.mark.parametrize(
    ("secrets", "needle"),
    [
        ({".dockerconfigjson": "{not json"}, "not valid JSON"),
        ({".dockerconfigjson": "[]"}, "JSON object"),
        ({".dockerconfigjson": '{"auths": []}'}, '"auths"'),
        ({"username": "u"}, "without a password"),
        ({"token": "t"}, "none of the keys"),
    ],
)
def test_bad_secrets(secrets: dict[str, str], needle: str) -> None:
    with pytest.raises(UsageError) as ei:
        registry_credentials(secrets, parse_any("r.example.com/a/b:c"), None)
    assert needle in ei.value.message
    for v in secrets.values():
        if len(v) > 3:
            assert v not in str(ei.value)


# --------------------------------------------------------------------------- error mapping


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (Pending("x"), C.ABORTED),
        (Cancelled("x"), C.ABORTED),
        (Conflict("x"), C.ALREADY_EXISTS),
        (UsageError("x"), C.INVALID_ARGUMENT),
        (InvalidReferenceError("x"), C.INVALID_ARGUMENT),
        (NoMatchError("x"), C.FAILED_PRECONDITION),
        (AuthError("x"), C.UNAUTHENTICATED),
        (AuthError("x", status=401), C.UNAUTHENTICATED),
        (AuthError("x", status=403), C.PERMISSION_DENIED),
        (NotFoundError("x"), C.NOT_FOUND),
        (TransportError("x"), C.UNAVAILABLE),
        (RegistryError("x", status=503), C.UNAVAILABLE),
        (RegistryError("x", status=429), C.RESOURCE_EXHAUSTED),
        (RegistryError("x", status=400), C.FAILED_PRECONDITION),
        (DigestMismatchError("x"), C.DATA_LOSS),
        (ManifestError("x"), C.FAILED_PRECONDITION),
        (UnsafeContentError("x"), C.FAILED_PRECONDITION),
        (ContentRefusedError("x"), C.FAILED_PRECONDITION),
        (StoreError("x"), C.UNAVAILABLE),
        (BusyError("x"), C.FAILED_PRECONDITION),
        (ImagevolError("x"), C.INTERNAL),
        (OSError(28, "No space left on device"), C.INTERNAL),
        (RuntimeError("boom"), C.INTERNAL),
    ],
)
def test_codes(exc: BaseException, code: grpc.StatusCode) -> None:
    assert code_for(exc) == code


def test_messages_carry_the_hint() -> None:
    assert message_for(NotFoundError("gone", hint="pull it")) == "gone\nhint: pull it"
    assert message_for(ImagevolError("plain")) == "plain"
    auth = message_for(AuthError("denied", hint="check the auth file", status=401))
    assert auth.startswith("denied\nhint: ") and "nodePublishSecretRef" in auth and "check the auth file" in auth
    assert message_for(OSError(28, "No space left on device", "/var/lib/imagevol")) == (
        "No space left on device: /var/lib/imagevol"
    )
    assert message_for(RuntimeError("boom")).startswith("unexpected RuntimeError: boom\nhint: ")


def test_no_match_text_explains_for_the_pod(tmp_path: Path) -> None:
    w = LayoutWriter(tmp_path / "layout")
    arm = w.image({"w": b"arm"}, arch="arm64", variant="v8")
    s390 = w.image({"w": b"s390x"}, arch="s390x")
    w.tag(w.index([(arm, plat("linux", "arm64", "v8")), (s390, plat("linux", "s390x"))]), "v1")
    source = open_source(f"oci:{tmp_path / 'layout'}:v1")
    with pytest.raises(NoMatchError) as ei:
        select_manifest(source, NODE)
    spec = parse_attributes({"image": "registry.example.com/m:v1"}, NODE)
    text = no_match_text(ei.value, spec)
    lines = text.splitlines()
    assert lines[0] == ei.value.message and "linux/amd64" in lines[0]
    assert "explain registry.example.com/m:v1 for node linux/amd64 (policy native):" in text
    assert "    [0] linux/arm64/v8: no-match" in text and "    [1] linux/s390x: no-match" in text
    hint = lines[-1]
    assert hint.startswith("hint: the index offers: linux/arm64/v8, linux/s390x")
    assert 'platformPolicy: "any"' in hint and 'platform: "linux/arm64/v8"' in hint
    assert "--platform" not in text  # pod terms, not command-line flags
    assert message_for(ei.value, spec) == text
    assert code_for(ei.value) == C.FAILED_PRECONDITION


# --------------------------------------------------------------------------- endpoint, driver name


@pytest.mark.parametrize(
    ("endpoint", "path"),
    [
        ("unix:///csi/csi.sock", "/csi/csi.sock"),
        ("unix:/csi/csi.sock", "/csi/csi.sock"),
        ("/csi/x.sock", "/csi/x.sock"),
    ],
)
def test_socket_path(endpoint: str, path: str) -> None:
    assert str(socket_path(endpoint)) == path


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:10000", "unix://csi.sock", "csi.sock", "unix:///" + "x" * 120])
def test_socket_path_refused(endpoint: str) -> None:
    with pytest.raises(UsageError):
        socket_path(endpoint)


def test_driver_names() -> None:
    assert validate_driver_name("csi.imagevol.io") == "csi.imagevol.io"
    for bad in ("", "-a", "a-", "a_b", "x" * 64, "csi/imagevol"):
        with pytest.raises(UsageError):
            validate_driver_name(bad)


# --------------------------------------------------------------------------- publisher bookkeeping


def test_failed_jobs_nobody_collects_are_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A publish whose pull fails after its caller gave up keeps its failure for the retry only
    for FAILED_RESULT_TTL; after that the job goes, so pods deleted meanwhile leave nothing behind."""
    from imagevol.csi import publisher as pubmod
    from imagevol.registry.egress import EgressPolicy
    from imagevol.registry.transport import RegistryOptions
    from tests.support.registry import free_port

    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: the pull fails at once
    options = RegistryOptions(retries=0, connect_timeout=2, read_timeout=2, egress=EgressPolicy.parse(["127.0.0.1:*"]))
    pub = pubmod.Publisher(pubmod.PluginConfig(root=tmp_path / "store", node_id="n", platforms=NODE, options=options))
    spec = parse_attributes({"image": f"{dead}/models/m:v1"}, NODE)
    t1, t2 = tmp_path / "pods" / "a" / "mount", tmp_path / "pods" / "b" / "mount"
    with pytest.raises(Pending):
        pub.publish("vol-a", t1, spec, timeout=0)
    job = pub._jobs[("vol-a", pubmod.canonical_target(t1))]
    assert isinstance(job.future.exception(timeout=30), TransportError)
    # Within the TTL the failure waits for the retry, which gets it (once).
    with pytest.raises(Pending):
        pub.publish("vol-b", t2, spec, timeout=0)
    assert ("vol-a", pubmod.canonical_target(t1)) in pub._jobs
    with pytest.raises(TransportError):
        pub.publish("vol-a", t1, spec, timeout=5)
    assert ("vol-a", pubmod.canonical_target(t1)) not in pub._jobs
    # vol-b's failure is never collected: past the TTL the next publish sweeps it away.
    job_b = pub._jobs[("vol-b", pubmod.canonical_target(t2))]
    job_b.future.exception(timeout=30)
    monkeypatch.setattr(pubmod, "FAILED_RESULT_TTL", 0.0)
    t3 = tmp_path / "pods" / "c" / "mount"
    with pytest.raises(Pending):
        pub.publish("vol-c", t3, spec, timeout=0)
    assert ("vol-b", pubmod.canonical_target(t2)) not in pub._jobs
    pub._jobs[("vol-c", pubmod.canonical_target(t3))].future.exception(timeout=30)  # no thread left running
    assert not pub._pulls
    assert not t1.exists() and not t2.exists() and not t3.exists()


def test_access_answers_on_disk_name_no_secret_and_expire(tmp_path: Path) -> None:
    """The cache of registry answers (KEP-2535) persists per (identity, repository, digest) with a
    wall-clock expiry; an expiry beyond the TTL (a clock set back, a lower --access-ttl) is not
    trusted; identities are HMACs under a per-store key (0600), so neither the secret nor its plain
    hash is written anywhere."""
    import hashlib
    import os
    import stat as stat_mod

    from imagevol.csi import publisher as pubmod
    from imagevol.digest import Digest

    root = tmp_path / "store"
    pub = pubmod.Publisher(pubmod.PluginConfig(root=root, node_id="n", platforms=NODE, access_ttl=60))
    pub.start()
    secret = {"username": "alice", "password": "correct horse battery staple"}
    key = pub._creds_key(secret)
    ident = pub.access.identity(key)
    assert ident not in ("node", key) and pub.access.identity("") == "node"
    d = Digest("sha256:" + "ab" * 32)
    repo = "registry.example.com/corp/secret-model"
    assert not pub.access.is_allowed(ident, repo, d)
    pub.access.allow(ident, repo, d)
    assert pub.access.is_allowed(ident, repo, d)
    assert not pub.access.is_allowed(ident, "registry.example.com/other", d)
    assert not pub.access.is_allowed(pub.access.identity(pub._creds_key({**secret, "password": "x"})), repo, d)
    # Another process on the same store (a restart): same key, same answer.
    again = pubmod.Publisher(pubmod.PluginConfig(root=root, node_id="n", platforms=NODE, access_ttl=60))
    again.start()
    assert again.access.identity(key) == ident and again.access.is_allowed(ident, repo, d)
    # A lower TTL than the answer was written with: not trusted.
    shorter = pubmod.Publisher(pubmod.PluginConfig(root=root, node_id="n", platforms=NODE, access_ttl=10))
    assert not shorter.access.is_allowed(ident, repo, d)
    # Expired answers are removed at start.
    path = pub.access.allowed_path(ident, repo, d)
    path.write_text('{"expires": 1}')
    assert not pub.access.is_allowed(ident, repo, d)
    pubmod.Publisher(pubmod.PluginConfig(root=root, node_id="n", platforms=NODE)).start()
    assert not path.exists()
    keyfile = root / "csi" / "identity.key"
    assert stat_mod.S_IMODE(keyfile.stat().st_mode) == 0o600
    needles = [
        secret["password"].encode(),
        key.encode(),
        hashlib.sha256(secret["password"].encode()).hexdigest().encode(),
    ]
    for dirpath, _, names in os.walk(root / "csi"):
        for n in names:
            data = (Path(dirpath) / n).read_bytes() + n.encode()
            assert not any(x in data for x in needles), n
