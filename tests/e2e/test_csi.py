"""The CSI node plugin (`imagevol csi`) driven over its unix socket the way the kubelet drives it.

The plugin runs as a separate process (so a restart is a real restart) against the real registry,
often through the counting, rate-limited proxy (tests/support/proxy.py) so a pull outlasts a short
deadline. Requests are built as the kubelet builds them for an inline ephemeral volume
(pkg/volume/csi/csi_mounter.go): access mode SINGLE_NODE_WRITER, `readonly` from the pod's
`readOnly`, pod information in the volume context, the parent of the target made, the target not.

Checked: identity calls; Probe ready and not ready; a publish whose deadline expires mid-pull,
retried until it succeeds with the blob crossing the wire once; concurrent publishes of one image
sharing one pull; idempotency and conflicts; unpublish (unmounted, target gone, content released
to gc); restarts of the plugin between publish and unpublish, and a SIGKILL mid-pull that the
next publish resumes; the no-match error carrying the explain trace; read-write and block
requests refused; an ORAS artifact under a foreign-architecture index with platformPolicy any;
credentials from the volume's secret; unpublish while the pull still runs; metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

import imagevol.fetch.fetcher
from imagevol.csi import csi_pb2 as pb
from imagevol.csi import csi_pb2_grpc as pb_grpc
from tests.support import need, oci
from tests.support.clirun import Imagevol, mount_options, mountpoints
from tests.support.proxy import Proxy
from tests.support.registry import free_port
from tests.support.rogue import RogueRegistry
from tests.support.tars import E, push_image, tar_layer

pytestmark = pytest.mark.e2e

root_only = need.root_only("bind mounts need root")
MiB = 1 << 20
TITLE = "org.opencontainers.image.title"
NODE = "linux/amd64"
Mode = pb.VolumeCapability.AccessMode
RETRYABLE = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED)
# How often a pull records the progress of a blob (what a killed pull keeps).
MARK_EVERY = getattr(imagevol.fetch.fetcher, "MARK_EVERY", 8 * MiB)


# --------------------------------------------------------------------------- the plugin process


class Plugin:
    """`python -m imagevol --root ROOT csi ...` in its own session, with stubs on its socket."""

    def __init__(self, cli: Imagevol, sock: Path, log: Path, *extra: str) -> None:
        self.cli, self.sock, self.log, self.extra = cli, sock, log, extra
        self.metrics_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None
        self.starts = 0

    def start(self) -> Plugin:
        self.starts += 1
        log = self.log.with_name(f"{self.log.stem}-{self.starts}.log")
        self.proc = self.cli.popen(
            "csi",
            "--endpoint",
            f"unix://{self.sock}",
            "--node-id",
            "n1",
            "--platform",
            NODE,
            "--metrics-port",
            str(self.metrics_port),
            "--metrics-host",
            "127.0.0.1",
            # The test registries are on loopback, which the plugin refuses unless the operator names it.
            *(() if any(a.startswith("--allow-registry") for a in self.extra) else ("--allow-registry", "127.*:*")),
            *self.extra,
            log=log,
        )
        self.current_log = log
        self.channel = grpc.insecure_channel(f"unix://{self.sock}")
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the plugin exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                self.identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=2)
                return self
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the plugin did not answer within 30 s:\n{log.read_text()}") from None
                time.sleep(0.1)

    @property
    def identity(self) -> pb_grpc.IdentityStub:
        return pb_grpc.IdentityStub(self.channel)

    @property
    def node(self) -> pb_grpc.NodeStub:
        return pb_grpc.NodeStub(self.channel)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise AssertionError(f"the plugin ignored signal {sig}:\n{self.current_log.read_text()}") from None

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


@dataclass
class Env:
    cli: Imagevol
    plugin: Plugin
    pods: Path
    tmp: Path

    def target(self, name: str) -> Path:
        """`/var/lib/kubelet/pods/UID/volumes/kubernetes.io~csi/NAME/mount`: the parent exists."""
        t = self.pods / os.urandom(4).hex() / "volumes" / "kubernetes.io~csi" / name / "mount"
        t.parent.mkdir(parents=True)
        return t


def _start_env(tmp_path: Path, root: Path | None = None) -> Env:
    sockdir = Path(tempfile.mkdtemp(prefix="ivcsi-", dir="/tmp"))  # a unix socket path is short
    pods = tmp_path / "pods"
    pods.mkdir(exist_ok=True)
    cli = Imagevol(root or tmp_path / "store", tmp_path / "home", watch=[pods])
    plugin = Plugin(cli, sockdir / "csi.sock", tmp_path / "plugin.log").start()
    return Env(cli, plugin, pods, tmp_path)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = _start_env(tmp_path)
    yield e
    if e.plugin.proc is not None and e.plugin.proc.poll() is None:
        e.plugin.stop()
    e.cli.cleanup()
    shutil.rmtree(e.plugin.sock.parent, ignore_errors=True)


# --------------------------------------------------------------------------- kubelet-like calls


def publish_request(
    volume_id: str,
    target: Path,
    attrs: dict[str, str],
    *,
    readonly: bool = True,
    mode: int = Mode.SINGLE_NODE_WRITER,
    block: bool = False,
    secrets: dict[str, str] | None = None,
) -> pb.NodePublishVolumeRequest:
    cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(mode=mode))
    if block:
        cap.block.SetInParent()
    else:
        cap.mount.SetInParent()
    context = {
        **attrs,
        "csi.storage.k8s.io/pod.name": "model-server",
        "csi.storage.k8s.io/pod.namespace": "default",
        "csi.storage.k8s.io/pod.uid": target.parts[-5],
        "csi.storage.k8s.io/serviceAccount.name": "default",
        "csi.storage.k8s.io/ephemeral": "true",
    }
    return pb.NodePublishVolumeRequest(
        volume_id=volume_id,
        target_path=str(target),
        volume_capability=cap,
        readonly=readonly,
        volume_context=context,
        secrets=secrets or {},
    )


def rpc_error(call, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        call(*args, **kw)
    return ei.value


def publish_until_ok(
    plugin: Plugin,
    req: pb.NodePublishVolumeRequest,
    deadline: float,
    limit: float = 90,
    errors: list[grpc.RpcError] | None = None,
) -> int:
    """Call as the kubelet does until the publish succeeds; returns the number of calls (the
    retryable errors on the way are appended to `errors`)."""
    calls = 0
    end = time.monotonic() + limit
    while True:
        calls += 1
        try:
            plugin.node.NodePublishVolume(req, timeout=deadline)
            return calls
        except grpc.RpcError as e:
            assert e.code() in RETRYABLE, f"{e.code()}: {e.details()}"
            assert time.monotonic() < end, f"still pending after {limit} s"
            if errors is not None:
                errors.append(e)
            time.sleep(0.05)


def unpublish(plugin: Plugin, volume_id: str, target: Path, timeout: float = 30) -> None:
    plugin.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target)), timeout=timeout
    )


def files_under(path: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(path):
        for n in names:
            p = Path(dirpath, n)
            out[str(p.relative_to(path))] = p.read_bytes()
    return out


def gc(cli: Imagevol) -> dict:
    r = cli.run("gc", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# --------------------------------------------------------------------------- content


@dataclass
class Img:
    repo: str
    tag: str
    files: dict[str, bytes]
    blobs: dict[str, int]  # layer and config digests -> size

    def ref(self, host: str) -> str:
        return f"{host}/{self.repo}:{self.tag}"

    @property
    def big(self) -> tuple[str, int]:
        return max(self.blobs.items(), key=lambda kv: kv[1])


def _image(client: oci.Client, name: str, files: dict[str, bytes]) -> Img:
    repo = f"csi/{name}-{os.urandom(3).hex()}"
    dirs = sorted({p.rsplit("/", 1)[0] for p in files if "/" in p})
    layer = tar_layer([E(d, kind="dir") for d in dirs] + [E(p, d) for p, d in sorted(files.items())])
    push_image(client, repo, "v1", [layer])
    man = json.loads(client.get_manifest(repo, "v1")[0])
    return Img(repo, "v1", files, {d["digest"]: d["size"] for d in (man["config"], *man["layers"])})


@dataclass
class Content:
    small: Img
    other: Img
    big: Img
    huge: Img
    foreign: Img  # an index whose one entry is an arm64-only ORAS artifact


@pytest.fixture(scope="module")
def content(registry, tmp_path_factory) -> Content:
    client = oci.Client(registry)
    small = _image(client, "small", {"model/config.json": b'{"layers": 2}', "model/weights.bin": b"small weights"})
    other = _image(client, "other", {"other.txt": b"another image"})
    # Random bytes do not compress: the gzip layer is as big as its content.
    big = _image(client, "big", {"model/weights.bin": os.urandom(4 * MiB), "model/config.json": b"{}"})
    # Big enough that a kill after the first progress record leaves a good part to resume.
    huge = _image(client, "huge", {"weights.bin": os.urandom(MARK_EVERY + 12 * MiB)})

    import oras.client

    src = tmp_path_factory.mktemp("oras")
    (src / "weights").mkdir()
    (src / "weights" / "model.safetensors").write_bytes(b"arm64 artifact weights")
    (src / "config.json").write_bytes(b'{"arch": "arm64"}')
    ann = src / "annotations.json"
    ann.write_text(json.dumps({str(src / "weights" / "model.safetensors"): {TITLE: "weights/model.safetensors"}}))
    repo = f"csi/foreign-{os.urandom(3).hex()}"
    oc = oras.client.OrasClient(hostname=registry.host, insecure=True)
    oc.push(
        target=f"{registry.host}/{repo}:artifact",
        files=[str(src / "weights" / "model.safetensors"), str(src / "config.json")],
        annotation_file=str(ann),
        disable_path_validation=True,
        quiet=True,
    )
    body, _, _ = client.get_manifest(repo, "artifact")
    man = json.loads(body)
    entry = oci.descriptor(oci.OCI_MANIFEST, body, platform=oci.platform("linux", "arm64", "v8"))
    index, _ = oci.make_index([entry])
    client.push_manifest(repo, "v1", index, oci.OCI_INDEX)
    foreign = Img(
        repo,
        "v1",
        {"weights/model.safetensors": b"arm64 artifact weights", "config.json": b'{"arch": "arm64"}'},
        {d["digest"]: d["size"] for d in man["layers"]},
    )
    return Content(small, other, big, huge, foreign)


@pytest.fixture
def proxy(registry) -> Iterator[Proxy]:
    # Small chunks: the rate limit paces smoothly and the byte counts are what the client received.
    p = Proxy(registry.url, chunk=64 << 10).start()
    yield p
    p.stop()


def manifest_gets(proxy: Proxy, img: Img) -> int:
    return sum(1 for r in proxy.requests_for(f"/{img.repo}/manifests/") if r.method == "GET")


# --------------------------------------------------------------------------- identity, probe


def test_identity_and_node_info(env: Env) -> None:
    p = env.plugin
    info = p.identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=5)
    assert info.name == "csi.imagevol.io"
    assert info.vendor_version
    caps = p.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=5)
    services = [c.service.type for c in caps.capabilities if c.HasField("service")]
    assert pb.PluginCapability.Service.CONTROLLER_SERVICE not in services  # a node-only plugin
    probe = p.identity.Probe(pb.ProbeRequest(), timeout=5)
    assert probe.HasField("ready") and probe.ready.value is True
    assert p.node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=5).node_id == "n1"
    node_caps = p.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=5)
    rpcs = {c.rpc.type for c in node_caps.capabilities}
    assert pb.NodeServiceCapability.RPC.STAGE_UNSTAGE_VOLUME not in rpcs  # the kubelet must not stage
    assert pb.NodeServiceCapability.RPC.GET_VOLUME_STATS in rpcs
    # An RPC of the Node service the plugin does not serve: UNIMPLEMENTED, as the spec allows.
    stage = p.channel.unary_unary("/csi.v1.Node/NodeStageVolume")
    e = rpc_error(stage, b"", timeout=5)
    assert e.code() == grpc.StatusCode.UNIMPLEMENTED
    # One log line per call.
    time.sleep(0.2)
    log = p.current_log.read_text()
    assert "GetPluginInfo result=OK" in log and "NodeGetInfo result=OK" in log


def test_probe_not_ready_until_the_store_is_usable(tmp_path: Path) -> None:
    blocker = tmp_path / "disk"
    blocker.write_text("a file where the store's parent directory should be")
    root = blocker / "store"
    e = _start_env(tmp_path, root=root)
    try:
        p = e.plugin
        probe = p.identity.Probe(pb.ProbeRequest(), timeout=5)
        assert probe.HasField("ready") and probe.ready.value is False
        req = publish_request("csi-x", e.target("vol"), {"image": "127.0.0.1:1/x/y:z"})
        err = rpc_error(p.node.NodePublishVolume, req, timeout=10)
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert str(root) in err.details()
        # The store comes back (the node's volume was fixed): ready without a restart.
        blocker.unlink()
        probe = p.identity.Probe(pb.ProbeRequest(), timeout=5)
        assert probe.ready.value is True
        assert root.is_dir()
        # A metadata database that does not open is not ready either.
        p.stop()
        shutil.rmtree(root)
        root.mkdir()
        (root / "meta.db").write_bytes(b"this is not an SQLite database" * 100)
        p.start()
        assert p.identity.Probe(pb.ProbeRequest(), timeout=5).ready.value is False
    finally:
        if e.plugin.proc is not None and e.plugin.proc.poll() is None:
            e.plugin.stop()
        shutil.rmtree(e.plugin.sock.parent, ignore_errors=True)


def test_metrics_port_in_use_stops_the_plugin_clearly(tmp_path: Path) -> None:
    import socket

    cli = Imagevol(tmp_path / "store", tmp_path / "home")
    sock = Path(tempfile.mkdtemp(prefix="ivcsi-", dir="/tmp")) / "csi.sock"
    try:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            args = ("csi", "--endpoint", f"unix://{sock}", "--node-id", "n1", "--metrics-host", "127.0.0.1")
            r = cli.run(*args, "--metrics-port", str(port), timeout=60)
        assert r.returncode != 0
        assert f"cannot serve metrics on 127.0.0.1:{port}" in r.stderr and "--metrics-port" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert not sock.exists(), "the plugin must not leave a socket the registrar would find"
    finally:
        shutil.rmtree(sock.parent, ignore_errors=True)


# --------------------------------------------------------------------------- refused requests


def test_refused_requests(env: Env, content: Content, registry) -> None:
    p = env.plugin
    ref = content.small.ref(registry.host)
    target = env.target("vol")
    cases = [
        # A pod without `readOnly: true`: the kubelet sends readonly=false, SINGLE_NODE_WRITER.
        (publish_request("csi-rw", target, {"image": ref}, readonly=False), "readOnly: true"),
        (
            publish_request("csi-rw2", target, {"image": ref}, readonly=False, mode=Mode.MULTI_NODE_MULTI_WRITER),
            "read-only",
        ),
        (publish_request("csi-blk", target, {"image": ref}, block=True), "block"),
        (publish_request("csi-noimg", target, {}), '"image" is missing'),
        (publish_request("csi-typo", target, {"image": ref, "pullpolicy": "always"}), "'pullpolicy'"),
        (publish_request("csi-pol", target, {"image": ref, "platformPolicy": "maybe"}), "platformPolicy"),
        (publish_request("csi-plat", target, {"image": ref, "platform": "linux/"}), "platform"),
        (publish_request("csi-ref", target, {"image": "Not A Reference"}), "Not A Reference"),
        (publish_request("csi-oci", target, {"image": "oci:/var/lib/secret:latest"}), "OCI layout"),
        (publish_request("csi-sub", target, {"image": ref, "subPath": "../etc"}), ".."),
        (publish_request("", target, {"image": ref}), "volume_id"),
    ]
    for req, needle in cases:
        err = rpc_error(p.node.NodePublishVolume, req, timeout=10)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (req.volume_id, err.code(), err.details())
        assert needle in err.details(), (needle, err.details())
    assert not target.exists()
    assert p.metric("imagevol_publish_failures_total", reason="INVALID_ARGUMENT") == len(cases)
    assert p.metric("imagevol_pulls_total", result="success") == 0


@root_only
def test_read_only_modes_and_read_only_flag_publish(env: Env, content: Content, registry) -> None:
    """A pod with `readOnly: true` (readonly=true, SINGLE_NODE_WRITER) and a CO asking for a
    reader access mode both get a read-only bind mount."""
    p = env.plugin
    ref = content.small.ref(registry.host)
    t1, t2 = env.target("a"), env.target("b")
    t2.mkdir()  # older kubelets made the target directory themselves
    p.node.NodePublishVolume(publish_request("csi-a", t1, {"image": ref}, readonly=True), timeout=60)
    req = publish_request("csi-b", t2, {"image": ref}, readonly=False, mode=Mode.MULTI_NODE_READER_ONLY)
    p.node.NodePublishVolume(req, timeout=60)
    for t in (t1, t2):
        assert files_under(t) == content.small.files
        assert {"ro", "nosuid", "nodev"} <= mount_options(t)
        with pytest.raises(OSError):
            (t / "new").write_bytes(b"x")
    unpublish(p, "csi-a", t1)
    unpublish(p, "csi-b", t2)
    assert not t1.exists() and not t2.exists(), "the kubelet expects the target gone"


# --------------------------------------------------------------------------- deadlines


@root_only
def test_deadline_expires_mid_pull_then_retries_attach(env: Env, content: Content, proxy: Proxy) -> None:
    p = env.plugin
    img = content.big
    digest, size = img.big
    proxy.rate_limit = 2 * MiB  # ~2 s for the 4 MiB layer: four times the kubelet-like deadline
    target = env.target("model")
    req = publish_request("csi-deadline", target, {"image": img.ref(proxy.host)})
    t0 = time.monotonic()
    first = rpc_error(p.node.NodePublishVolume, req, timeout=0.5)
    assert first.code() in RETRYABLE
    assert time.monotonic() - t0 < 5  # answered at its deadline, not after the pull
    errors = [first]
    calls = 1 + publish_until_ok(p, req, deadline=0.5, errors=errors)
    assert calls >= 3, "the pull should have outlived several deadlines"
    assert files_under(target) == img.files
    assert target in {Path(m) for m in mountpoints()}
    # The retries attached to the one pull: one resolution, the layer's bytes sent once.
    assert manifest_gets(proxy, img) == 1
    assert proxy.bytes_for(digest) == size
    assert p.metric("imagevol_pulls_total", result="success") == 1
    assert p.metric("imagevol_publish_total", result="pending") >= 2
    assert p.metric("imagevol_publish_total", result="success") == 1
    assert p.metric("imagevol_pull_bytes_total") >= size
    assert p.metric("imagevol_volumes") == 1
    assert p.metric("imagevol_pull_duration_seconds_count") == 1
    assert p.metric("imagevol_publish_duration_seconds_count") == 1
    # The plugin answers "pending" shortly before the deadline (a loaded machine may deliver an
    # answer late, then the caller sees DEADLINE_EXCEEDED), saying what is going on.
    aborted = [e for e in errors if e.code() == grpc.StatusCode.ABORTED]
    for e in aborted:
        assert "csi-deadline" in e.details() and "the work goes on" in e.details(), e.details()
        assert any(w in e.details() for w in ("pulling", "resolving", "queued", "waiting", "mounting")), e.details()
    unpublish(p, "csi-deadline", target)
    assert p.metric("imagevol_volumes") == 0


@root_only
def test_concurrent_publishes_share_one_pull(env: Env, content: Content, proxy: Proxy) -> None:
    p = env.plugin
    img = content.big
    digest, size = img.big
    proxy.rate_limit = 4 * MiB
    targets = {f"csi-conc-{i}": env.target(f"vol{i}") for i in range(4)}
    errors: list[BaseException] = []

    def one(vid: str, target: Path) -> None:
        try:
            publish_until_ok(p, publish_request(vid, target, {"image": img.ref(proxy.host)}), deadline=0.6)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=kv) for kv in targets.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for target in targets.values():
        assert files_under(target) == img.files
    assert manifest_gets(proxy, img) == 1
    assert proxy.bytes_for(digest) == size
    assert p.metric("imagevol_pulls_total", result="success") == 1
    assert p.metric("imagevol_volumes") == len(targets)
    for vid, target in targets.items():
        unpublish(p, vid, target)
        assert not target.exists()
    assert p.metric("imagevol_volumes") == 0


def wait_for(what: str, cond, limit: float = 60) -> None:
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, f"{what}: not within {limit} s"
        time.sleep(0.1)


def test_unpublish_while_pulling_cancels_the_mount(env: Env, content: Content, proxy: Proxy) -> None:
    p, cli = env.plugin, env.cli
    img = content.big
    digest, size = img.big
    proxy.rate_limit = 1 * MiB  # the 4 MiB layer takes 4 s at least, however fast the machine
    target = env.target("vol")
    ref = img.ref(proxy.host)
    req = publish_request("csi-cancel", target, {"image": ref})
    err = rpc_error(p.node.NodePublishVolume, req, timeout=0.3)
    assert err.code() in RETRYABLE
    unpublish(p, "csi-cancel", target, timeout=10)
    # Unpublish did not wait for the pull: the layer is still on its way.
    assert p.metric("imagevol_pulls_total", result="success") == 0, "unpublish waited for the pull"
    assert proxy.bytes_for(digest) < size
    # The pull finishes for the store; the cancelled volume is never mounted, and the reference
    # the plugin pulled for it is forgotten again, so gc can reclaim the content.
    wait_for("the pull", lambda: p.metric("imagevol_pulls_total", result="success") == 1)
    wait_for("the reference forgotten", lambda: ref not in {i["reference"] for i in cli.images()})
    assert not target.exists()
    assert str(target) not in mountpoints()
    assert p.metric("imagevol_volumes") == 0
    if need.IS_ROOT:
        # A later publish of the same volume works; the blobs are still in the store (no gc ran
        # in between): only the manifest is fetched again.
        proxy.rate_limit = None
        before = proxy.bytes_total
        p.node.NodePublishVolume(req, timeout=60)
        assert files_under(target) == img.files
        assert proxy.bytes_total - before < 64 << 10
        unpublish(p, "csi-cancel", target)
    assert set(img.blobs) <= set(gc(cli)["removed"])


def test_calls_without_a_deadline_wait_without_limit(env: Env, content: Content, proxy: Proxy) -> None:
    """A call without a gRPC deadline (grpcio reports ~9.2e18 s remaining) waits until its work is
    done: no timestamp is computed from it (that ended in INTERNAL: OverflowError)."""
    p = env.plugin
    img = content.big
    proxy.rate_limit = 4 * MiB  # the publish waits for a pull of about a second
    target = env.target("vol")
    req = publish_request("csi-nodeadline", target, {"image": img.ref(proxy.host)})
    p.node.NodePublishVolume(req)  # no timeout: no deadline
    if need.IS_ROOT:
        assert files_under(target) == img.files
    p.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="csi-nodeadline", target_path=str(target)))
    assert not target.exists()
    assert "OverflowError" not in p.current_log.read_text()


@root_only
def test_a_job_leaves_the_table_only_when_done(tmp_path: Path, content: Content, proxy: Proxy) -> None:
    """The jobs table holds every job whose thread still runs: a wait that cannot be timed (no
    deadline) and an unpublish during the pull leave the job where the next call finds it."""
    from imagevol.csi.attrs import parse_attributes
    from imagevol.csi.publisher import PluginConfig, Publisher, canonical_target
    from imagevol.csi.status import Pending
    from imagevol.platform import parse_platform
    from imagevol.registry.egress import EgressPolicy
    from imagevol.registry.transport import RegistryOptions

    node = [parse_platform(NODE)]
    loopback = RegistryOptions(egress=EgressPolicy.parse(["127.*:*"]))
    pub = Publisher(PluginConfig(root=tmp_path / "store", node_id="n1", platforms=node, options=loopback))
    spec = parse_attributes({"image": content.big.ref(proxy.host)}, node)
    proxy.rate_limit = 2 * MiB
    t1, t2 = tmp_path / "pods" / "a" / "mount", tmp_path / "pods" / "b" / "mount"
    t1.parent.mkdir(parents=True)
    t2.parent.mkdir(parents=True)
    # Unpublished while pulling: cancelled, yet in the table until its thread is done.
    proxy.rate_limit = 1 * MiB  # the 4 MiB layer takes 4 s at least
    with pytest.raises(Pending):
        pub.publish("vol-b", t2, spec, timeout=0)
    key = ("vol-b", canonical_target(t2))
    wait_for("the pull", lambda: proxy.bytes_total > 0)
    pub.unpublish("vol-b", t2)
    job = pub._jobs.get(key)
    assert job is not None and job.cancelled and not job.future.done(), "a running job left the table"
    with pytest.raises(Pending, match="unpublished while"):
        pub.publish("vol-b", t2, spec, timeout=0)
    job.future.exception(timeout=120)
    wait_for("the job gone", lambda: key not in pub._jobs)
    assert not t2.exists() and str(t2) not in mountpoints()
    # A wait without limit (the time a call without deadline has): the call waits for the job.
    out: list[object] = []
    waiter = threading.Thread(target=lambda: out.append(_call(pub.publish, "vol-a", t1, spec, timeout=9.2e18)))
    waiter.start()
    waiter.join(120)
    assert out and not isinstance(out[0], BaseException), out
    assert files_under(t1) == content.big.files
    assert ("vol-a", canonical_target(t1)) not in pub._jobs  # done and delivered
    pub.unpublish("vol-a", t1, timeout=9.2e18)
    assert not t1.exists()


def test_publish_extracts_while_it_downloads_and_materializes_once(
    tmp_path: Path, content: Content, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish goes through the composition `imagevol mount` uses: the shared pull extracts the
    largest layer while it downloads (the streamed layers, as test_stream.py observes them), builds
    the snapshot with the options the volume is made with, and the volume finds it ready: one
    extraction, one GET of the layer."""
    import imagevol.compose
    import imagevol.csi.publisher as publisher
    from imagevol.csi.attrs import parse_attributes
    from imagevol.platform import parse_platform
    from imagevol.registry.egress import EgressPolicy
    from imagevol.registry.transport import RegistryOptions

    calls: list[tuple[str, bool, bool]] = []  # (who, fed by a pull in progress, snapshot created)

    def spy(who: str, real):
        def materialize(*args, **kw):
            snap = real(*args, **kw)
            calls.append((who, kw.get("feed") is not None, snap.created))
            return snap

        return materialize

    monkeypatch.setattr(imagevol.compose, "materialize", spy("pull", imagevol.compose.materialize))
    monkeypatch.setattr(publisher, "materialize", spy("volume", publisher.materialize))
    node = [parse_platform(NODE)]
    loopback = RegistryOptions(egress=EgressPolicy.parse(["127.*:*"]))
    pub = publisher.Publisher(
        publisher.PluginConfig(root=tmp_path / "store", node_id="n1", platforms=node, options=loopback)
    )
    pulls: list[publisher.SharedPull] = []
    attach = pub._attach_pull
    monkeypatch.setattr(pub, "_attach_pull", lambda *a: pulls.append(attach(*a)) or pulls[-1])
    spec = parse_attributes({"image": content.big.ref(proxy.host)}, node)
    proxy.rate_limit = 4 * MiB  # the 4 MiB layer takes a second: the extraction runs alongside
    target = tmp_path / "pods" / "a" / "mount"
    target.parent.mkdir(parents=True)
    try:
        pub.publish("vol-a", target, spec, timeout=120)
        assert files_under(target) == content.big.files
        layer = content.big.big[0]
        assert len(pulls) == 1 and pulls[0].streamed == [layer]
        assert calls == [("pull", True, True), ("volume", False, False)], calls
        assert sum(1 for r in proxy.requests_for(layer) if r.method == "GET") == 1
    finally:
        pub.unpublish("vol-a", target)
    assert not target.exists()


def _call(fn, *args, **kw) -> object:
    try:
        return fn(*args, **kw)
    except BaseException as e:
        return e


@root_only
def test_volume_stats(env: Env, content: Content, registry) -> None:
    """NodeGetVolumeStats: usage of the file system the volume lives on, and its condition (the
    kubelet's volume health); NOT_FOUND for a path without the volume, INVALID_ARGUMENT for a
    request without id or path."""
    p = env.plugin
    rpcs = {c.rpc.type for c in p.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=5).capabilities}
    assert {pb.NodeServiceCapability.RPC.GET_VOLUME_STATS, pb.NodeServiceCapability.RPC.VOLUME_CONDITION} <= rpcs
    target = env.target("vol")
    p.node.NodePublishVolume(
        publish_request("csi-stats", target, {"image": content.small.ref(registry.host)}), timeout=60
    )

    def stats(vid: str = "csi-stats", path: str = str(target)) -> pb.NodeGetVolumeStatsResponse:
        return p.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=path), timeout=10)

    r = stats()
    units = {u.unit: u for u in r.usage}
    st = os.statvfs(target)
    b, i = units[pb.VolumeUsage.BYTES], units[pb.VolumeUsage.INODES]
    assert b.total == st.f_blocks * st.f_frsize and 0 < b.used <= b.total and b.available <= b.total
    assert i.total == st.f_files and 0 < i.used <= i.total
    assert r.HasField("volume_condition") and not r.volume_condition.abnormal
    for vid, path, code in [
        ("", str(target), grpc.StatusCode.INVALID_ARGUMENT),
        ("csi-stats", "", grpc.StatusCode.INVALID_ARGUMENT),
        ("csi-stats", str(env.target("other")), grpc.StatusCode.NOT_FOUND),
        ("csi-stats", "some/path", grpc.StatusCode.NOT_FOUND),  # what csi-sanity expects
        ("csi-other", str(target), grpc.StatusCode.NOT_FOUND),
    ]:
        assert rpc_error(stats, vid, path).code() == code, (vid, path)
    # The mount is gone (someone unmounted it): abnormal, saying so.
    subprocess.run(["umount", str(target)], check=True)
    r = stats()
    assert r.volume_condition.abnormal and "no longer mounted" in r.volume_condition.message
    unpublish(p, "csi-stats", target)
    assert rpc_error(stats).code() == grpc.StatusCode.NOT_FOUND


# --------------------------------------------------------------------------- idempotency, unpublish, gc


@root_only
def test_publish_is_idempotent_and_conflicts_are_refused(env: Env, content: Content, proxy: Proxy) -> None:
    p = env.plugin
    target = env.target("vol")
    attrs = {"image": content.small.ref(proxy.host)}
    req = publish_request("csi-idem", target, attrs)
    p.node.NodePublishVolume(req, timeout=60)
    seen = len(proxy.requests)
    for _ in range(3):
        p.node.NodePublishVolume(req, timeout=5)
    assert len(proxy.requests) == seen, "a repeated publish must not go to the registry"
    assert files_under(target) == content.small.files
    # The same target with other content.
    other = publish_request("csi-idem", target, {"image": content.other.ref(proxy.host)})
    err = rpc_error(p.node.NodePublishVolume, other, timeout=10)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert content.small.repo in err.details()
    assert files_under(target) == content.small.files
    # The same target and content for another volume id: that volume is not the one there.
    err = rpc_error(p.node.NodePublishVolume, publish_request("csi-idem-2", target, attrs), timeout=10)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "csi-idem" in err.details() and "csi-idem-2" in err.details()
    # Unpublishing another volume id leaves the volume in place (that id is not published there).
    unpublish(p, "csi-idem-2", target)
    assert str(target) in mountpoints() and files_under(target) == content.small.files
    unpublish(p, "csi-idem", target)
    assert not target.exists()


@root_only
def test_unpublish_releases_content_to_gc(env: Env, content: Content, registry) -> None:
    p, cli = env.plugin, env.cli
    img = content.small
    target = env.target("vol")
    p.node.NodePublishVolume(publish_request("csi-gc", target, {"image": img.ref(registry.host)}), timeout=60)
    gc(cli)
    for d in img.blobs:
        assert cli.blob(d).exists(), "gc must keep what a volume holds"
    unpublish(p, "csi-gc", target)
    assert not target.exists() and str(target) not in mountpoints()
    assert target.parent.exists()  # the kubelet's directory stays
    # Idempotent: again, and for a target that never was.
    unpublish(p, "csi-gc", target)
    unpublish(p, "csi-never", env.target("never"))
    assert img.ref(registry.host) not in {i["reference"] for i in cli.images()}
    res = gc(cli)
    assert set(img.blobs) <= set(res["removed"])
    for d in img.blobs:
        assert not cli.blob(d).exists()
    # A reference pulled by hand is the admin's: unpublish leaves it (and its content) in place.
    other = content.other
    r = cli.pull(other.ref(registry.host))
    assert r.returncode == 0, r.stderr
    t2 = env.target("vol2")
    p.node.NodePublishVolume(publish_request("csi-gc2", t2, {"image": other.ref(registry.host)}), timeout=60)
    unpublish(p, "csi-gc2", t2)
    gc(cli)
    for d in other.blobs:
        assert cli.blob(d).exists()
    assert other.ref(registry.host) in {i["reference"] for i in cli.images()}


@root_only
def test_unpublish_of_a_busy_volume_is_a_failed_precondition(env: Env, content: Content, registry) -> None:
    """A volume a process still uses cannot be unmounted: the kubelet hears FAILED_PRECONDITION
    (not INTERNAL) with what to do, the volume stays as it was, and the retry after the process
    let go succeeds."""
    p = env.plugin
    img = content.small
    target = env.target("vol")
    p.node.NodePublishVolume(publish_request("csi-busy", target, {"image": img.ref(registry.host)}), timeout=60)
    name = sorted(img.files)[0]
    with open(target / name, "rb") as held:
        e = rpc_error(unpublish, p, "csi-busy", target)
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, (e.code(), e.details())
        assert "busy" in e.details() and "hint:" in e.details(), e.details()
        assert str(target) in mountpoints()
        assert held.read() == img.files[name]
    unpublish(p, "csi-busy", target)
    assert not target.exists() and str(target) not in mountpoints()


@root_only
def test_restart_between_publish_and_unpublish(env: Env, content: Content, proxy: Proxy) -> None:
    p, cli = env.plugin, env.cli
    img = content.small
    target = env.target("vol")
    req = publish_request("csi-restart", target, {"image": img.ref(proxy.host), "subPath": "model"})
    p.node.NodePublishVolume(req, timeout=60)
    assert files_under(target) == {k.removeprefix("model/"): v for k, v in img.files.items()}
    assert p.stop(signal.SIGTERM) == 0
    assert not p.sock.exists(), "a stopped plugin removes its socket"
    assert str(target) in mountpoints(), "volumes outlive the plugin"
    p.extra = ("--platform", "linux/arm64")  # the node's list changed meanwhile: its volumes stay
    p.start()
    assert p.identity.Probe(pb.ProbeRequest(), timeout=5).ready.value is True
    assert p.metric("imagevol_volumes") == 1  # re-discovered from the records
    seen = len(proxy.requests)
    p.node.NodePublishVolume(req, timeout=5)  # the kubelet's retry after the restart
    assert len(proxy.requests) == seen
    assert p.metric("imagevol_pulls_total", result="success") == 0
    # Unpublish after a hard kill and another start.
    p.stop(signal.SIGKILL)
    p.start()
    unpublish(p, "csi-restart", target)
    assert not target.exists() and str(target) not in mountpoints()
    assert set(img.blobs) <= set(gc(cli)["removed"])


@root_only
def test_killed_mid_pull_resumes_after_restart(env: Env, content: Content, proxy: Proxy) -> None:
    p = env.plugin
    img = content.huge
    digest, size = img.big
    proxy.rate_limit = 10 * MiB
    target = env.target("vol")
    req = publish_request("csi-kill", target, {"image": img.ref(proxy.host)})
    err = rpc_error(p.node.NodePublishVolume, req, timeout=0.5)
    assert err.code() in RETRYABLE
    end = time.monotonic() + 30
    while proxy.bytes_for(digest) < MARK_EVERY + 2 * MiB:  # past the pull's first progress record
        assert time.monotonic() < end
        time.sleep(0.02)
    p.stop(signal.SIGKILL)
    before = proxy.bytes_for(digest)
    assert before < size
    p.start()
    publish_until_ok(p, req, deadline=1.0)
    assert files_under(target) == img.files
    again = proxy.bytes_for(digest) - before
    assert again < size - 4 * MiB, f"the pull started over: {again} of {size} bytes fetched again"
    unpublish(p, "csi-kill", target)


@root_only
def test_sigterm_while_a_publish_waits(env: Env, content: Content, proxy: Proxy) -> None:
    """The kubelet's call waits for the pull with a long deadline when the plugin is told to stop
    (a DaemonSet rollout): the plugin exits promptly and cleanly instead of waiting for the pull
    or the caller's deadline, the call fails retryably, and the retry after the restart mounts."""
    p = env.plugin
    img = content.big
    digest, size = img.big
    proxy.rate_limit = 512 << 10  # 8 s or more for the layer
    target = env.target("vol")
    req = publish_request("csi-term", target, {"image": img.ref(proxy.host)})
    outcome: list[grpc.RpcError | None] = []

    def call() -> None:
        try:
            p.node.NodePublishVolume(req, timeout=120)
            outcome.append(None)
        except grpc.RpcError as e:
            outcome.append(e)

    caller = threading.Thread(target=call)
    caller.start()
    wait_for("the layer's first bytes", lambda: proxy.bytes_for(digest) > 0, limit=30)
    t0 = time.monotonic()
    assert p.stop(signal.SIGTERM, timeout=60) == 0
    stopped_after = time.monotonic() - t0
    caller.join(30)
    assert not caller.is_alive()
    assert stopped_after < 30, f"SIGTERM took {stopped_after:.1f} s"
    assert proxy.bytes_for(digest) < size, "the plugin waited for the pull before it stopped"
    assert outcome and outcome[0] is not None, "the publish cannot have succeeded"
    assert outcome[0].code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, *RETRYABLE)
    assert str(target) not in mountpoints()
    proxy.rate_limit = None
    p.start()
    publish_until_ok(p, req, deadline=5)
    assert files_under(target) == img.files
    unpublish(p, "csi-term", target)


# --------------------------------------------------------------------------- platforms, artifacts, credentials


def test_no_match_for_the_node_platform(env: Env, content: Content, registry) -> None:
    p = env.plugin
    target = env.target("vol")
    req = publish_request("csi-nomatch", target, {"image": content.foreign.ref(registry.host)})
    err = rpc_error(p.node.NodePublishVolume, req, timeout=30)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    d = err.details()
    assert "no manifest" in d and NODE in d
    assert "[0] linux/arm64/v8: no-match" in d  # the explain trace, entry by entry
    assert 'platformPolicy: "any"' in d and 'platform: "linux/arm64/v8"' in d
    assert not target.exists()
    assert p.metric("imagevol_publish_failures_total", reason="FAILED_PRECONDITION") == 1
    assert p.metric("imagevol_pulls_total", result="failure") == 1
    # Delivered once: the next call tries again (and fails again, the same way).
    err2 = rpc_error(p.node.NodePublishVolume, req, timeout=30)
    assert err2.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert p.metric("imagevol_pulls_total", result="failure") == 2


@root_only
def test_artifact_on_foreign_arch_with_platform_policy_any(env: Env, content: Content, registry) -> None:
    p = env.plugin
    img = content.foreign
    t1, t2 = env.target("all"), env.target("sub")
    p.node.NodePublishVolume(
        publish_request("csi-any", t1, {"image": img.ref(registry.host), "platformPolicy": "any"}), timeout=60
    )
    assert files_under(t1) == img.files
    for layer in img.blobs:  # raw artifact layers are the verified blobs themselves
        title = next(k for k, v in img.files.items() if len(v) == img.blobs[layer])
        assert os.stat(t1 / title).st_ino == os.stat(env.cli.blob(layer)).st_ino
    attrs = {"image": img.ref(registry.host), "platformPolicy": "any", "subPath": "weights", "pullPolicy": "never"}
    p.node.NodePublishVolume(publish_request("csi-any-sub", t2, attrs), timeout=60)
    assert files_under(t2) == {"model.safetensors": img.files["weights/model.safetensors"]}
    t3 = env.target("missing")
    missing = publish_request("csi-any-missing", t3, {**attrs, "subPath": "tokenizer"})
    err = rpc_error(p.node.NodePublishVolume, missing, timeout=60)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert 'sub path "tokenizer" does not exist' in err.details() and "subPath" in err.details()
    assert not t3.exists()
    unpublish(p, "csi-any", t1)
    unpublish(p, "csi-any-sub", t2)


def test_pull_policy_never_without_content(env: Env, content: Content, registry) -> None:
    p = env.plugin
    req = publish_request(
        "csi-never", env.target("v"), {"image": content.other.ref(registry.host), "pullPolicy": "Never"}
    )
    err = rpc_error(p.node.NodePublishVolume, req, timeout=30)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "not in the store" in err.details() and "hint:" in err.details()


def test_credentials_from_the_volume_secret(env: Env, basic_registry) -> None:
    p = env.plugin
    client = oci.Client(basic_registry)
    img = _image(client, "private", {"secret/weights.bin": b"private weights"})
    ref = img.ref(basic_registry.host)
    target = env.target("vol")
    err = rpc_error(p.node.NodePublishVolume, publish_request("csi-auth0", target, {"image": ref}), timeout=30)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "nodePublishSecretRef" in err.details()
    user, password = next(iter(basic_registry.users.items()))
    wrong = publish_request("csi-auth1", target, {"image": ref}, secrets={"username": user, "password": "nope"})
    err = rpc_error(p.node.NodePublishVolume, wrong, timeout=30)
    assert err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert "nope" not in err.details() and "nope" not in p.current_log.read_text()
    if not need.IS_ROOT:
        return
    good = publish_request("csi-auth2", target, {"image": ref}, secrets={"username": user, "password": password})
    p.node.NodePublishVolume(good, timeout=60)
    assert files_under(target) == img.files
    unpublish(p, "csi-auth2", target)
    # A kubernetes.io/dockerconfigjson secret.
    auth = __import__("base64").b64encode(f"{user}:{password}".encode()).decode()
    cfg = json.dumps({"auths": {basic_registry.host: {"auth": auth}}})
    t2 = env.target("vol2")
    req = publish_request("csi-auth3", t2, {"image": ref, "pullPolicy": "always"}, secrets={".dockerconfigjson": cfg})
    p.node.NodePublishVolume(req, timeout=60)
    assert files_under(t2) == img.files
    unpublish(p, "csi-auth3", t2)


@root_only
def test_private_content_needs_the_volumes_own_credentials(env: Env, basic_registry) -> None:
    """Content that one volume's secret pulled onto the node is not handed to a volume that may
    not read it: served from the store, it is checked at the registry with the other volume's
    credentials (pullPolicy never, which cannot ask, is refused), whatever name the reference
    gives it."""
    p = env.plugin
    client = oci.Client(basic_registry)
    img = _image(client, "tenant-a", {"w.bin": b"tenant A's private weights"})
    ref = img.ref(basic_registry.host)
    digest = oci.sha256_digest(client.get_manifest(img.repo, img.tag)[0])
    user, password = next(iter(basic_registry.users.items()))
    secret = {"username": user, "password": password}
    ta = env.target("a")
    p.node.NodePublishVolume(publish_request("csi-a", ta, {"image": ref}, secrets=secret), timeout=60)
    assert files_under(ta) == img.files
    # Without credentials, the content in the store is not enough: the registry says no.
    tb = env.target("b")
    for attrs, codes, needle in [
        ({"image": ref}, (grpc.StatusCode.PERMISSION_DENIED,), "nodePublishSecretRef"),
        ({"image": ref, "pullPolicy": "Never"}, (grpc.StatusCode.PERMISSION_DENIED,), "pullPolicy"),
        # The same digest under another name on the same registry (no pull there ever).
        (
            {"image": f"{basic_registry.host}/csi/elsewhere@{digest}"},
            (grpc.StatusCode.PERMISSION_DENIED,),
            "does not confirm",
        ),
    ]:
        err = rpc_error(p.node.NodePublishVolume, publish_request("csi-b", tb, attrs), timeout=30)
        assert err.code() in codes, (attrs, err.code(), err.details())
        assert needle in err.details()
        assert not tb.exists() and str(tb) not in mountpoints()
    wrong = {"username": user, "password": "not-the-password"}
    err = rpc_error(p.node.NodePublishVolume, publish_request("csi-b", tb, {"image": ref}, secrets=wrong), timeout=30)
    assert err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert not tb.exists()
    # The same credentials in another volume mount from the store, before and after a restart.
    tc = env.target("c")
    p.node.NodePublishVolume(publish_request("csi-c", tc, {"image": ref}, secrets=secret), timeout=60)
    assert files_under(tc) == img.files
    p.stop()
    p.start()
    td = env.target("d")
    p.node.NodePublishVolume(publish_request("csi-d", td, {"image": ref}, secrets=secret), timeout=60)
    assert files_under(td) == img.files
    err = rpc_error(p.node.NodePublishVolume, publish_request("csi-b", tb, {"image": ref}), timeout=30)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    for vid, t in (("csi-a", ta), ("csi-c", tc), ("csi-d", td)):
        unpublish(p, vid, t)


@root_only
def test_private_blobs_need_the_volumes_own_credentials(env: Env, basic_registry) -> None:
    """KEP-2535 for every digest (the issue's case): pod A mounts a private image with its secret;
    pod B, without one, publishes an artifact of its own from a registry it controls whose layer
    descriptor copies A's layer digest and size. The store holds that layer, so the pull never
    fetches it: B is refused unless B's registry serves those bytes to B (a registry that does not
    hold them, or that only claims to, is refused), and B's volume never holds A's bytes. A volume
    with its own valid credentials for A's repository is admitted after one check per digest; the
    answer is cached, across a plugin restart too, for --access-ttl seconds."""
    p = env.plugin
    client = oci.Client(basic_registry)
    weights = os.urandom(256 << 10)  # random: a slice of it cannot be guessed
    img = _image(client, "secret-model", {"weights.bin": weights})
    man = json.loads(client.get_manifest(img.repo, img.tag)[0])
    layer = man["layers"][0]
    user, password = next(iter(basic_registry.users.items()))
    px = Proxy(basic_registry.url, chunk=64 << 10).start()
    rogue = RogueRegistry().start()
    try:
        ref = img.ref(px.host)
        ta = env.target("a")
        p.node.NodePublishVolume(
            publish_request("csi-a", ta, {"image": ref}, secrets={"username": user, "password": password}), timeout=60
        )
        assert files_under(ta) == img.files
        # B's artifact: its own config, A's layer descriptor (titled: the volume would hold it as a file).
        cfg = b'{"model": "b"}'
        stolen = {**layer, "annotations": {TITLE: "stolen.bin"}}
        body, _ = oci.make_image_manifest(
            oci.descriptor("application/vnd.example.b.config.v1+json", cfg), [stolen], artifact_type="application/x-b"
        )
        rogue.manifest("b/model", "v1", body, oci.OCI_MANIFEST)
        rogue.blob("b/model", oci.sha256_digest(cfg), cfg)
        tb = env.target("b")
        px.reset()

        def refused(attrs: dict[str, str], vid: str = "csi-b") -> str:
            err = rpc_error(p.node.NodePublishVolume, publish_request(vid, tb, attrs), timeout=30)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (err.code(), err.details())
            assert not tb.exists() and str(tb) not in mountpoints()
            return err.details()

        for policy in ("IfNotPresent", "Always"):
            details = refused({"image": f"{rogue.host}/b/model:v1", "pullPolicy": policy})
            assert layer["digest"] in details and "does not confirm" in details
            assert img.repo not in details and px.host not in details  # nothing of A's but the digest
        assert ("GET", f"/v2/b/model/blobs/{layer['digest']}") in rogue.requests  # B's registry was asked
        # The refused pull leaves no reference behind (gc can reclaim B's manifest).
        wait_for("B's reference forgotten", lambda: not any("b/model" in i["reference"] for i in env.cli.images()))
        assert not px.requests  # A's registry is not B's business
        # A registry that claims the blob but serves other bytes does not confirm it either.
        rogue.blob("b/model", layer["digest"], os.urandom(layer["size"]))
        refused({"image": f"{rogue.host}/b/model:v1"})
        # By digest (B's manifest is in the store): pullPolicy never cannot ask, and is refused.
        details = refused({"image": f"{rogue.host}/b/model@{oci.sha256_digest(body)}", "pullPolicy": "Never"})
        assert "pullPolicy" in details
        # Other valid credentials for A's repository (a dockerconfigjson secret: another identity).
        auth = __import__("base64").b64encode(f"{user}:{password}".encode()).decode()
        other = {".dockerconfigjson": json.dumps({"auths": {px.host: {"auth": auth}}})}
        px.reset()
        tc = env.target("c")
        p.node.NodePublishVolume(publish_request("csi-c", tc, {"image": ref}, secrets=other), timeout=60)
        assert files_under(tc) == img.files
        asked = [r for r in px.requests if r.status == 200 or r.status == 206]
        assert {r.bare_path.rsplit("/", 1)[-1] for r in asked} >= {layer["digest"], man["config"]["digest"]}
        assert all(r.method == "GET" for r in asked)
        assert px.bytes_for(layer["digest"]) <= 4096  # a slice, not the layer
        # Cached: the next volume with those credentials, and again after a restart, asks nothing.
        px.reset()
        td = env.target("d")
        p.node.NodePublishVolume(publish_request("csi-d", td, {"image": ref}, secrets=other), timeout=60)
        assert not px.requests, px.requests
        p.stop()
        p.start()
        te = env.target("e")
        p.node.NodePublishVolume(publish_request("csi-e", te, {"image": ref}, secrets=other), timeout=60)
        assert files_under(te) == img.files
        assert not px.requests, px.requests
        refused({"image": f"{rogue.host}/b/model:v1"})  # B still may not
        # An answer older than the TTL is not used: a plugin with --access-ttl 0 asks again.
        for vid, t in (("csi-a", ta), ("csi-c", tc), ("csi-d", td), ("csi-e", te)):
            unpublish(p, vid, t)
        p.stop()
        p.extra = (*p.extra, "--access-ttl", "0")
        p.start()
        tf = env.target("f")
        p.node.NodePublishVolume(publish_request("csi-f", tf, {"image": ref}, secrets=other), timeout=60)
        assert any(layer["digest"] in r.path for r in px.requests)
        unpublish(p, "csi-f", tf)
    finally:
        px.stop()
        rogue.stop()


@root_only
def test_private_content_per_repository_with_tokens(env: Env, token_registry) -> None:
    """Valid credentials are not enough: the registry must grant them the repository. With a
    token registry that scopes access per repository, a second tenant's own (valid) credentials
    get the first tenant's image only once the token server grants them that repository."""
    ts = token_registry.token_server
    p = env.plugin
    img = _image(oci.Client(token_registry), "tenant-a", {"w.bin": os.urandom(64 << 10)})
    ref = img.ref(token_registry.host)
    alice = dict(zip(("username", "password"), next(iter(token_registry.users.items())), strict=True))
    bob = {"username": "bob", "password": "bobs-password"}
    granted: set[str] = set()

    def grant(user: str | None, typ: str, name: str, actions: list[str]) -> list[str]:
        if user == "bob":
            return [a for a in actions if a == "pull"] if name in granted else []
        return list(actions) if user is not None else []

    saved = ts.grant
    ts.users["bob"] = bob["password"]
    ts.grant = grant
    try:
        ta = env.target("a")
        p.node.NodePublishVolume(publish_request("csi-a", ta, {"image": ref}, secrets=alice), timeout=60)
        tb = env.target("b")
        err = rpc_error(p.node.NodePublishVolume, publish_request("csi-b", tb, {"image": ref}, secrets=bob), timeout=30)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
        assert not tb.exists()
        granted.add(img.repo)
        p.node.NodePublishVolume(publish_request("csi-b", tb, {"image": ref}, secrets=bob), timeout=60)
        assert files_under(tb) == img.files
        unpublish(p, "csi-a", ta)
        unpublish(p, "csi-b", tb)
    finally:
        ts.grant = saved
        ts.users.pop("bob", None)


@root_only
def test_subpath_through_a_symlink_out_is_no_oracle(env: Env, registry) -> None:
    """An image with `host -> /`: subPath `host/etc/shadow` (exists on the node) and
    `host/etc/missing` get the same answer (code and text but for the path); before, the first
    passed the plugin's existence check through the symlink and failed later with "passes through
    a symbolic link", the second said "does not exist": a pod learned which node files exist."""
    client = oci.Client(registry)
    repo = f"csi/hostlink-{os.urandom(3).hex()}"
    push_image(client, repo, "v1", [tar_layer([E("host", kind="symlink", link="/"), E("in.txt", b"x")])])
    ref = f"{registry.host}/{repo}:v1"
    answers = []
    for i, sub in enumerate(("host/etc/shadow", "host/etc/missing", "host", "in.txt/deeper")):
        target = env.target(f"oracle{i}")
        err = rpc_error(
            env.plugin.node.NodePublishVolume,
            publish_request(f"o{i}", target, {"image": ref, "subPath": sub}),
            timeout=60,
        )
        answers.append((err.code(), err.details().replace(f'"{sub}"', '"SUB"')))
        assert not target.exists()
    assert answers[0][0] == grpc.StatusCode.NOT_FOUND
    assert len(set(answers)) == 1, answers
    assert 'sub path "SUB" does not exist' in answers[0][1]
