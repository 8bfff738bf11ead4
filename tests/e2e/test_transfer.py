"""Trusting what a transfer says, and stopping one promptly (real registry, the fault-injecting proxy).

- A blob, config or manifest whose bytes are shorter or longer than its descriptor states is a
  verification failure reported at once (exit 4, "size mismatch"), on every path: small streamed
  blobs, large blobs in pieces (one stream, and ranged streams), the layer streamed under
  extraction (mount), and OCI layout sources. No retry is made (the proxy counts the requests).
- SIGINT / SIGTERM during a pull or a mount of a slow, large blob stops within a few seconds (not
  when the blob is done), exits 130 / 143 with one `error: interrupted` line, leaves the store
  fsck-clean, and the next pull fetches only what was missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import oci
from tests.support.clirun import Imagevol, refused
from tests.support.layout import LayoutWriter
from tests.support.proxy import Fault, Proxy
from tests.support.registry import Registry
from tests.support.rogue import RogueRegistry
from tests.support.tars import E, gz, tar_layer

pytestmark = pytest.mark.e2e

MiB = 1 << 20
TITLE = "org.opencontainers.image.title"
ARTIFACT_TYPE = "application/vnd.example.model.v1"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def _no_retry(px: Proxy, digest: str, streams: int) -> None:
    """Each range of the blob was asked for once at most (a retry asks again), by at most one
    request per stream."""
    reqs = [q for q in px.requests_for(digest) if q.method == "GET"]
    assert 1 <= len(reqs) <= streams, reqs
    ranges = [q.range for q in reqs]
    assert len(set(ranges)) == len(ranges), f"a range was asked for twice (a retry): {reqs}"


# --------------------------------------------------------------------------- item 12: sizes


def _push_lying(registry: Registry, repo: str, *, layer: bytes, layer_size: int, config: bytes, config_size: int):
    """An artifact whose layer and config descriptors state the given sizes (the registry accepts
    a manifest naming blobs it has, whatever sizes it states)."""
    c = oci.Client(registry)
    c.push_blob(repo, layer)
    c.push_blob(repo, config)
    cfg = {"mediaType": "application/vnd.example.config.v1+json", "digest": oci.sha256_digest(config)}
    cfg["size"] = config_size
    lay = {"mediaType": oci.OCI_LAYER, "digest": oci.sha256_digest(layer), "size": layer_size}
    lay["annotations"] = {TITLE: "model.bin"}
    body, digest = oci.make_image_manifest(cfg, [lay], artifact_type=ARTIFACT_TYPE)
    c.push_manifest(repo, "v1", body, oci.OCI_MANIFEST)
    return digest


# (what lies, real size of the layer, stated minus real): small blobs stream in one response, blobs
# of 4 MiB and more are fetched in pieces; --streams 4 --part-size 1 makes ranged requests.
SIZE_CASES = [
    ("layer", 1000, +500),
    ("layer", 1000, -1),
    ("layer", 6 * MiB, +MiB),
    ("layer", 6 * MiB, -MiB // 2),
    ("config", 1000, +10),
    ("config", 1000, -10),
]


@pytest.mark.parametrize("ranged", [False, True], ids=["one-stream", "ranged"])
@pytest.mark.parametrize(("what", "real", "delta"), SIZE_CASES, ids=lambda v: str(v))
def test_size_mismatch_is_refused_at_once(
    registry: Registry, px: Proxy, iv: Imagevol, what: str, real: int, delta: int, ranged: bool
) -> None:
    layer = os.urandom(real if what == "layer" else 3000)
    config = json.dumps({"pad": "x" * ((real if what == "config" else 100) - 10)}).encode()
    lying = layer if what == "layer" else config
    repo = f"transfer/size-{what}-{real}-{'plus' if delta > 0 else 'minus'}-{'r' if ranged else 's'}"
    _push_lying(
        registry,
        repo,
        layer=layer,
        layer_size=len(layer) + (delta if what == "layer" else 0),
        config=config,
        config_size=len(config) + (delta if what == "config" else 0),
    )
    args = ("--streams", "4", "--part-size", "1") if ranged else ()
    r = iv.pull(f"{px.host}/{repo}:v1", *args)
    refused(r, 4)
    assert "size mismatch" in r.stderr, r.stderr
    assert f"states {len(lying) + delta} bytes" in r.stderr, r.stderr
    assert "serves different content than the manifest describes" in r.stderr, r.stderr
    _no_retry(px, oci.sha256_digest(lying), 4 if ranged else 1)
    assert not iv.blob(oci.sha256_digest(lying)).exists()
    assert iv.images() == []
    iv.fsck()


def test_size_mismatch_of_an_index_child_manifest(registry: Registry, px: Proxy, iv: Imagevol) -> None:
    """An index entry stating another size than its manifest's bytes: refused, not used."""
    c = oci.Client(registry)
    repo = "transfer/size-index"
    c.push_blob(repo, oci.OCI_EMPTY_DATA)
    data = os.urandom(100)
    c.push_blob(repo, data)
    lay = oci.descriptor(oci.OCI_LAYER, data, annotations={TITLE: "a.bin"})
    body, digest = oci.make_artifact_manifest(ARTIFACT_TYPE, [lay])
    c.push_manifest(repo, digest, body, oci.OCI_MANIFEST)
    entry = {"mediaType": oci.OCI_MANIFEST, "digest": digest, "size": len(body) + 7}
    idx, _ = oci.make_index([entry])
    c.push_manifest(repo, "v1", idx, oci.OCI_INDEX)
    r = iv.pull(f"{px.host}/{repo}:v1", "--platform-policy", "any")
    refused(r, 4)
    assert "size mismatch" in r.stderr and f"manifest {digest}" in r.stderr, r.stderr
    assert len([q for q in px.requests_for(f"manifests/{digest}") if q.method == "GET"]) == 1
    iv.fsck()


@pytest.mark.parametrize("real", [1000, 6 * MiB], ids=["streamed", "pieces"])
def test_size_mismatch_of_a_body_without_length(iv: Imagevol, real: int) -> None:
    """A blob served without Content-Length (the body ends where the connection closes) that ends
    cleanly short of its descriptor's size: a size mismatch at once, not a cut retried."""
    with RogueRegistry() as rogue:
        data = os.urandom(real)
        digest = oci.sha256_digest(data)
        rogue.blob("evil/short", digest, data, close_delimited=True)
        rogue.blob("evil/short", oci.sha256_digest(oci.OCI_EMPTY_DATA), oci.OCI_EMPTY_DATA)
        lay = {"mediaType": oci.OCI_LAYER, "digest": digest, "size": real + 4096, "annotations": {TITLE: "w.bin"}}
        body, _ = oci.make_artifact_manifest(ARTIFACT_TYPE, [lay])
        rogue.manifest("evil/short", "v1", body, oci.OCI_MANIFEST)
        r = iv.pull(f"{rogue.host}/evil/short:v1")
        refused(r, 4)
        assert "size mismatch" in r.stderr and f"serves {real}" in r.stderr, r.stderr
        assert rogue.requests.count(("GET", f"/v2/evil/short/blobs/{digest}")) == 1, rogue.requests
    iv.fsck()


def _image_with_lying_layer(registry: Registry, repo: str, delta: int) -> tuple[str, str]:
    raw = tar_layer([E("w.bin", os.urandom(6 * MiB)), E("a.txt", b"a")])
    blob = gz(raw)
    c = oci.Client(registry)
    c.push_blob(repo, blob)
    cfg = oci.canonical_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [oci.sha256_digest(raw)]},
        }
    )
    c.push_blob(repo, cfg)
    lay = {"mediaType": oci.OCI_LAYER_GZIP, "digest": oci.sha256_digest(blob), "size": len(blob) + delta}
    body, digest = oci.make_image_manifest(oci.descriptor(OCI_CONFIG, cfg), [lay])
    c.push_manifest(repo, "v1", body, oci.OCI_MANIFEST)
    return digest, oci.sha256_digest(blob)


@pytest.mark.parametrize("delta", [MiB, -1000], ids=["shorter", "longer"])
def test_size_mismatch_of_the_layer_streamed_under_extraction(
    registry: Registry, px: Proxy, iv: Imagevol, tmp_path: Path, delta: int
) -> None:
    repo = f"transfer/size-mount-{'short' if delta > 0 else 'long'}"
    _, blob = _image_with_lying_layer(registry, repo, delta)
    target = tmp_path / "vol"
    r = iv.mount(f"{px.host}/{repo}:v1", target)
    refused(r, 4)
    assert "size mismatch" in r.stderr, r.stderr
    _no_retry(px, blob, 1)
    assert iv.volumes() == [] and iv.snapshot_dirs() == []
    assert not iv.blob(blob).exists()
    iv.fsck()


@pytest.mark.parametrize("what", ["layer-short", "layer-long", "config-short", "manifest-short"])
def test_size_mismatch_in_an_oci_layout(iv: Imagevol, tmp_path: Path, what: str) -> None:
    lw = LayoutWriter(tmp_path / "layout")
    cfg = lw.blob(b'{"architecture":"amd64","os":"linux"}', "application/vnd.example.config.v1+json")
    lay = lw.blob(os.urandom(5000), oci.OCI_LAYER, annotations={TITLE: "a.bin"})
    if what.startswith("layer"):
        lay["size"] += 100 if what == "layer-short" else -100
    if what == "config-short":
        cfg["size"] += 3
    man = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "artifactType": ARTIFACT_TYPE, "config": cfg}
    man["layers"] = [lay]
    desc = lw.blob(oci.canonical_json(man), oci.OCI_MANIFEST)
    if what == "manifest-short":
        desc["size"] += 1
    lw.tag(desc, "v1")
    r = iv.pull(f"oci:{tmp_path / 'layout'}:v1", "--retries", "0")
    refused(r, 4)
    assert "size mismatch" in r.stderr, r.stderr
    iv.fsck()


# --------------------------------------------------------------------------- item 13: stopping

SLOW_MIB = 96
SLOW_RATE = 2 * MiB  # bytes per second at the proxy: the blob takes 48 s, the test a few
STOP_WITHIN = 5.0  # seconds from the signal to the exit (the old code waited for the whole blob)


@pytest.fixture(scope="module")
def slow_artifact(registry: Registry) -> tuple[str, str, int]:
    """(repo, blob digest, size): one random blob of SLOW_MIB MiB."""
    repo, data = "transfer/slow", os.urandom(SLOW_MIB * MiB)
    c = oci.Client(registry)
    c.push_blob(repo, data)
    c.push_blob(repo, oci.OCI_EMPTY_DATA)
    body, _ = oci.make_artifact_manifest(
        ARTIFACT_TYPE, [oci.descriptor(oci.OCI_LAYER, data, annotations={TITLE: "w.bin"})]
    )
    c.push_manifest(repo, "v1", body, oci.OCI_MANIFEST)
    return repo, oci.sha256_digest(data), len(data)


@pytest.fixture(scope="module")
def slow_image(registry: Registry) -> tuple[str, str, int]:
    """(repo, layer digest, size): an image whose one layer is a gzip of SLOW_MIB MiB of random bytes."""
    repo = "transfer/slow-image"
    raw = tar_layer([E("w.bin", os.urandom(SLOW_MIB * MiB)), E("a.txt", b"a")])
    blob = gz(raw)
    c = oci.Client(registry)
    c.push_blob(repo, blob)
    cfg = oci.canonical_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [oci.sha256_digest(raw)]},
        }
    )
    c.push_blob(repo, cfg)
    body, _ = oci.make_image_manifest(oci.descriptor(OCI_CONFIG, cfg), [oci.descriptor(oci.OCI_LAYER_GZIP, blob)])
    c.push_manifest(repo, "v1", body, oci.OCI_MANIFEST)
    return repo, oci.sha256_digest(blob), len(blob)


def _recorded(root: Path, digest: str) -> int:
    """Bytes of blob `digest` its ingest's part map records."""
    meta = root / "ingest" / hashlib.sha256(digest.encode()).hexdigest() / "meta.json"
    try:
        return sum(e - s for s, e in json.loads(meta.read_text())["ranges"])
    except (OSError, ValueError, KeyError):
        return 0


def _signal_stops(p, sig: int, log: Path, what: str) -> None:
    """Send `sig` to the process; it must exit 128+sig within STOP_WITHIN with one error line."""
    os.kill(p.pid, sig)
    t0 = time.monotonic()
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=60)
    took = time.monotonic() - t0
    out = log.read_text()
    print(f"{what} stopped {took:.2f} s after {signal.Signals(sig).name}")
    assert p.returncode == 128 + sig, f"exit {p.returncode}, wanted {128 + sig}:\n{out}"
    assert took < STOP_WITHIN, f"took {took:.1f} s to stop after {signal.Signals(sig).name}:\n{out}"
    assert f"error: interrupted by {signal.Signals(sig).name}" in out and "Traceback" not in out, out
    assert out.count("error:") == 1, out


def _interrupt(iv: Imagevol, px: Proxy, tmp_path: Path, sig: int, digest: str, *args: str) -> tuple[int, int]:
    """Start `imagevol ARGS` with the blob paced at the proxy, signal it once its ingest has recorded
    bytes, and check how it stops; returns (bytes the proxy sent for the blob, bytes recorded)."""
    px.rate_limit = SLOW_RATE
    log = tmp_path / "interrupted.log"
    p = iv.popen(*args, log=log)
    try:
        deadline = time.monotonic() + 120
        while _recorded(iv.root, digest) == 0:
            assert p.poll() is None, f"ended early ({p.returncode}): {log.read_text()}"
            assert time.monotonic() < deadline, "no progress was recorded"
            time.sleep(0.05)
        time.sleep(0.5)  # well inside the blob: bytes are arriving
        _signal_stops(p, sig, log, args[0])
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    px.rate_limit = None
    # Let the proxy notice the client went away, then take its count.
    last, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 0.3:
        now = px.bytes_for(digest)
        if now != last:
            last, stable_since = now, time.monotonic()
        time.sleep(0.05)
    return px.bytes_for(digest), _recorded(iv.root, digest)


@pytest.mark.parametrize("streams", ["1", "4"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_a_pull_promptly_and_it_resumes(
    slow_artifact: tuple[str, str, int], px: Proxy, iv: Imagevol, tmp_path: Path, sig: int, streams: str
) -> None:
    repo, digest, size = slow_artifact
    ref = f"{px.host}/{repo}:v1"
    args = ("pull", ref, "--progress", "none", "--streams", streams, "--part-size", "16")
    sent, recorded = _interrupt(iv, px, tmp_path, sig, digest, *args)
    assert 0 < recorded < size and sent < size
    # Every piece received whole was recorded (one piece per stream may have been in flight).
    assert recorded >= sent - int(streams) * 5 * MiB, (sent, recorded)
    assert not iv.blob(digest).exists()
    iv.fsck()
    # The next pull fetches only what was not recorded.
    px.reset()
    r = iv.pull(ref, "--streams", streams, "--part-size", "16")
    assert r.returncode == 0, r.stderr
    assert px.bytes_for(digest) == size - recorded, (px.bytes_for(digest), size, recorded)
    assert oci.sha256_digest(iv.blob(digest).read_bytes()) == digest
    iv.fsck()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_a_mount_while_it_extracts(
    slow_image: tuple[str, str, int], px: Proxy, iv: Imagevol, tmp_path: Path, sig: int
) -> None:
    repo, digest, size = slow_image
    ref = f"{px.host}/{repo}:v1"
    target = tmp_path / "vol"
    sent, recorded = _interrupt(iv, px, tmp_path, sig, digest, "mount", ref, str(target), "--progress", "none")
    assert 0 < recorded < size and sent < size
    assert iv.volumes() == [] and iv.snapshot_dirs() == []
    assert not target.exists() or not any(target.iterdir())
    iv.fsck()
    px.reset()
    doc = iv.mount_ok(ref, tmp_path / "vol2")
    assert doc["pull"]["digest"]
    assert px.bytes_for(digest) == size - recorded, (px.bytes_for(digest), size, recorded)
    assert (tmp_path / "vol2" / "a.txt").read_bytes() == b"a"
    iv.fsck()


def test_signal_while_another_process_holds_the_blob(
    slow_artifact: tuple[str, str, int], px: Proxy, iv: Imagevol, tmp_path: Path
) -> None:
    """Another process downloads the blob (holds its ingest lock): the pull waiting for it stops too."""
    repo, digest, _ = slow_artifact
    lock_dir = iv.root / "ingest" / hashlib.sha256(digest.encode()).hexdigest()
    lock_dir.mkdir(parents=True)
    fd = os.open(lock_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        log = tmp_path / "waiting.log"
        p = iv.popen("pull", f"{px.host}/{repo}:v1", "--progress", "none", log=log)
        try:
            deadline = time.monotonic() + 60
            config = oci.sha256_digest(oci.OCI_EMPTY_DATA)
            while not iv.blob(config).exists():  # fetched first (smaller): the pull now waits for the lock
                assert p.poll() is None, log.read_text()
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(0.5)
            _signal_stops(p, signal.SIGINT, log, "pull")
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    finally:
        os.close(fd)
    assert px.bytes_for(digest) == 0
    iv.fsck()


def test_signal_during_a_retry_wait(
    slow_artifact: tuple[str, str, int], px: Proxy, iv: Imagevol, tmp_path: Path
) -> None:
    """The registry answers 503 with Retry-After: 30; the pull waiting to retry stops at once."""
    repo, digest, _ = slow_artifact
    px.fault = Fault(match=digest, status=503, retry_after=30)
    log = tmp_path / "retry.log"
    p = iv.popen("pull", f"{px.host}/{repo}:v1", "--progress", "none", log=log)
    try:
        deadline = time.monotonic() + 60
        while px.fault_hits == 0:
            assert p.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        _signal_stops(p, signal.SIGTERM, log, "pull")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    iv.fsck()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_a_push_promptly(px: Proxy, iv: Imagevol, tmp_path: Path, sig: int) -> None:
    """`imagevol pack` pushing two files to a registry whose uploads are paced: the uploads in
    flight stop at their next piece, not when their blobs are sent."""
    model = tmp_path / "model"
    model.mkdir()
    for name in ("a.bin", "b.bin"):
        with open(model / name, "wb") as f:
            for _ in range(SLOW_MIB // 2):
                f.write(os.urandom(MiB))
    px.upload_rate_limit = SLOW_RATE
    log = tmp_path / "push.log"
    repo = f"transfer/push-{int(sig)}"
    ref = f"{px.host}/{repo}:v1"
    p = iv.popen("pack", str(model), ref, "--format", "artifact", "--progress", "none", "--no-explain", log=log)
    try:
        deadline = time.monotonic() + 120
        while px.uploaded_for(repo) < 4 * MiB:
            assert p.poll() is None, f"ended early ({p.returncode}): {log.read_text()}"
            assert time.monotonic() < deadline, "no upload started"
            time.sleep(0.05)
        _signal_stops(p, sig, log, "pack")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    assert px.uploaded_for(repo) < SLOW_MIB * MiB
