"""`imagevol pull` end to end against the real registry, directly and through the fault-injecting
proxy (tests/support/proxy.py): TLS and auth, mirrors from registries.conf, resume after SIGKILL
of a big blob, concurrent pulls of one reference, refused content and transport faults, and the
pull policies."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support import oci
from tests.support.clirun import Imagevol
from tests.support.proxy import Fault, Proxy
from tests.support.registry import Registry

pytestmark = pytest.mark.e2e

MiB = 1 << 20
BIG_MIB = int(os.environ.get("IMAGEVOL_TEST_BIG_MIB", "1024"))
ARTIFACT_TYPE = "application/vnd.example.model.v1"
TITLE = "org.opencontainers.image.title"
RUN_TIMEOUT = 180


# --------------------------------------------------------------------------- running imagevol


@pytest.fixture
def cli(tmp_path: Path) -> Imagevol:
    return Imagevol(tmp_path / "store", tmp_path / "home")


def _clear_error(r: subprocess.CompletedProcess[str], *codes: int) -> None:
    assert r.returncode in codes, f"exit {r.returncode}, wanted {codes}:\n{r.stdout}\n{r.stderr}"
    assert r.stderr.startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def _ok(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 0, f"exit {r.returncode}:\n{r.stdout}\n{r.stderr}"


def _authfile(path: Path, host: str, user: str, password: str) -> Path:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return path


# --------------------------------------------------------------------------- content


@dataclass
class Artifact:
    repo: str
    tag: str
    digest: str  # manifest digest
    blobs: dict[str, int] = field(default_factory=dict)  # layer digest -> size
    config: str = oci.sha256_digest(oci.OCI_EMPTY_DATA)

    def ref(self, host: str) -> str:
        return f"{host}/{self.repo}:{self.tag}"

    def by_digest(self, host: str) -> str:
        return f"{host}/{self.repo}@{self.digest}"


def push_artifact(client: oci.Client, repo: str, files: dict[str, bytes], tag: str = "v1") -> Artifact:
    layers = []
    blobs = {}
    for name, data in files.items():
        d = client.push_blob(repo, data)
        blobs[d] = len(data)
        layers.append(oci.descriptor(oci.OCI_LAYER, data, annotations={TITLE: name}))
    client.push_blob(repo, oci.OCI_EMPTY_DATA)
    body, digest = oci.make_artifact_manifest(ARTIFACT_TYPE, layers)
    client.push_manifest(repo, tag, body, oci.OCI_MANIFEST)
    return Artifact(repo, tag, digest, blobs)


def _location_path(location: str) -> str:
    u = urlsplit(location)
    return u.path + (f"?{u.query}" if u.query else "")


def push_blob_file(reg: Registry, repo: str, path: Path, digest: str, size: int, *, chunk: int = 256 * MiB) -> None:
    """Chunked upload (POST, PATCH per chunk with Content-Range, PUT ?digest=) streaming from
    `path`: the blob is never in memory. For registries without auth."""
    conn = http.client.HTTPConnection(reg.host, timeout=300, blocksize=MiB)
    try:

        def call(method: str, url: str, headers: dict[str, str], body_from=None, n: int = 0):
            conn.putrequest(method, url, skip_accept_encoding=True)
            for k, v in {**headers, "Content-Length": str(n)}.items():
                conn.putheader(k, v)
            conn.endheaders()
            left = n
            while left > 0:
                data = body_from.read(min(MiB, left))
                assert data, "source file ended early"
                conn.send(data)
                left -= len(data)
            resp = conn.getresponse()
            body = resp.read()
            return resp, body

        resp, body = call("POST", f"/v2/{repo}/blobs/uploads/", {})
        assert resp.status == 202, body
        location = _location_path(resp.getheader("Location"))
        offset = 0
        with open(path, "rb") as f:
            while offset < size:
                n = min(chunk, size - offset)
                resp, body = call(
                    "PATCH",
                    location,
                    {"Content-Type": "application/octet-stream", "Content-Range": f"{offset}-{offset + n - 1}"},
                    f,
                    n,
                )
                assert resp.status == 202, body
                location = _location_path(resp.getheader("Location"))
                offset += n
        sep = "&" if "?" in location else "?"
        resp, body = call("PUT", f"{location}{sep}digest={digest}", {})
        assert resp.status == 201, body
    finally:
        conn.close()


def write_random_file(path: Path, size: int) -> str:
    """`size` incompressible bytes written in 1 MiB chunks; returns their digest."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            data = os.urandom(min(MiB, left))
            f.write(data)
            h.update(data)
            left -= len(data)
    return "sha256:" + h.hexdigest()


def push_big_artifact(reg: Registry, repo: str, path: Path, size: int, title: str) -> Artifact:
    digest = write_random_file(path, size)
    push_blob_file(reg, repo, path, digest, size)
    path.unlink()
    client = oci.Client(reg)
    client.push_blob(repo, oci.OCI_EMPTY_DATA)
    layer = {"mediaType": oci.OCI_LAYER, "digest": digest, "size": size, "annotations": {TITLE: title}}
    body, mdigest = oci.make_artifact_manifest(ARTIFACT_TYPE, [layer])
    client.push_manifest(repo, "v1", body, oci.OCI_MANIFEST)
    return Artifact(repo, "v1", mdigest, {digest: size})


@pytest.fixture(scope="module")
def small(registry: Registry) -> Artifact:
    """config.json, a 3 MiB and a 6 MiB weights file (random)."""
    files = {
        "config.json": b'{"model_type": "test"}',
        "weights-a.bin": os.urandom(3 * MiB),
        "weights-b.bin": os.urandom(6 * MiB + 123),
    }
    return push_artifact(oci.Client(registry), "pull/small", files)


def _blob_of(art: Artifact, size_at_least: int) -> tuple[str, int]:
    return next((d, n) for d, n in sorted(art.blobs.items(), key=lambda x: x[1]) if n >= size_at_least)


# --------------------------------------------------------------------------- TLS and auth


def test_tls_with_cert_dir(tls_registry: Registry, cli: Imagevol, tmp_path: Path) -> None:
    art = push_artifact(oci.Client(tls_registry), "pull/tls", {"w.bin": os.urandom(300_000)})
    r = cli.pull(art.ref(tls_registry.host))
    _clear_error(r, 1)
    assert "certificate" in r.stderr.lower()
    assert not cli.blob(next(iter(art.blobs))).exists()
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(Path(tls_registry.ca_file).read_bytes())
    r = cli.pull(art.ref(tls_registry.host), "--cert-dir", str(certs))
    _ok(r)
    assert r.stdout.strip() == art.digest
    for d, n in art.blobs.items():
        cli.assert_blob(d, n)
    cli.fsck()


@pytest.mark.parametrize("which", ["basic_registry", "token_registry"])
def test_auth_pull_and_wrong_credentials(request: pytest.FixtureRequest, which: str, cli: Imagevol, tmp_path) -> None:
    reg: Registry = request.getfixturevalue(which)
    art = push_artifact(oci.Client(reg), f"pull/{which}", {"w.bin": os.urandom(200_000)})
    user, password = next(iter(reg.users.items()))
    ref = art.ref(reg.host)

    empty = tmp_path / "empty.json"
    empty.write_text('{"auths": {}}')
    r = cli.pull(ref, "--authfile", str(empty))
    _clear_error(r, 1)
    assert "401" in r.stderr or "denied" in r.stderr.lower() or "authentication" in r.stderr.lower()

    bad_pw = "Wr0ng-pa55word-xyzzy"
    bad = _authfile(tmp_path / "bad.json", reg.host, user, bad_pw)
    r = cli.pull(ref, "--authfile", str(bad))
    _clear_error(r, 1)
    assert "401" in r.stderr or "denied" in r.stderr.lower(), r.stderr
    out = r.stdout + r.stderr
    assert bad_pw not in out
    assert base64.b64encode(f"{user}:{bad_pw}".encode()).decode() not in out
    assert not cli.blob(next(iter(art.blobs))).exists()

    good = _authfile(tmp_path / "good.json", reg.host, user, password)
    r = cli.pull(ref, "--authfile", str(good), "--json")
    _ok(r)
    assert password not in r.stdout + r.stderr
    assert json.loads(r.stdout)["digest"] == art.digest
    for d, n in art.blobs.items():
        cli.assert_blob(d, n)
    cli.fsck()


# --------------------------------------------------------------------------- mirrors


def _mirror_pair(tmp_path: Path) -> tuple[Registry, Registry, Artifact]:
    """An origin and a mirror holding the same artifact (origin: models/m, mirror: cache/models/m)."""
    origin = Registry.start(tmp_path / "origin")
    try:
        mirror = Registry.start(tmp_path / "mirror")
    except BaseException:
        origin.stop()
        raise
    files = {"config.json": b"{}", "w.bin": os.urandom(2 * MiB)}
    art = push_artifact(oci.Client(origin), "models/m", files)
    copy = push_artifact(oci.Client(mirror), "cache/models/m", files)
    assert copy.digest == art.digest
    return origin, mirror, art


def _registries_conf(path: Path, origin: Registry, mirror_host: str, pull_from: str | None = None) -> Path:
    extra = f'pull-from-mirror = "{pull_from}"\n' if pull_from else ""
    path.write_text(
        f'[[registry]]\nprefix = "{origin.host}/models"\nlocation = "{origin.host}/models"\n\n'
        f'[[registry.mirror]]\nlocation = "{mirror_host}/cache/models"\n{extra}'
    )
    return path


def test_mirror_serves_while_origin_is_down(registry: Registry, tmp_path: Path, cli: Imagevol) -> None:
    origin, mirror, art = _mirror_pair(tmp_path)
    try:
        conf = _registries_conf(tmp_path / "registries.conf", origin, mirror.host)
        origin.stop()
        r = cli.pull(art.ref(origin.host), "--registries-conf", str(conf), "--json", "--retries", "0")
        _ok(r)
        res = json.loads(r.stdout)
        assert res["digest"] == art.digest
        assert mirror.host in res["source"]
        for d, n in art.blobs.items():
            cli.assert_blob(d, n)
        cli.fsck()
        # The reference is recorded under the name asked for, not the mirror's.
        assert [i["reference"] for i in cli.images()] == [art.ref(origin.host)]
    finally:
        origin.stop()
        mirror.stop()


def test_digest_only_mirror(registry: Registry, tmp_path: Path) -> None:
    origin, mirror, art = _mirror_pair(tmp_path)
    try:
        with Proxy(mirror.url) as mp:
            conf = _registries_conf(tmp_path / "registries.conf", origin, mp.host, "digest-only")
            # A tag pull skips the digest-only mirror entirely.
            by_tag = Imagevol(tmp_path / "s1", tmp_path / "home")
            r = by_tag.pull(art.ref(origin.host), "--registries-conf", str(conf), "--json")
            _ok(r)
            assert origin.host in json.loads(r.stdout)["source"]
            assert not [q for q in mp.requests if "/manifests/" in q.path], mp.requests
            assert mp.bytes_total == 0
            # A digest pull uses it (the origin is down to prove it).
            origin.stop()
            by_digest = Imagevol(tmp_path / "s2", tmp_path / "home")
            r = by_digest.pull(art.by_digest(origin.host), "--registries-conf", str(conf), "--json", "--retries", "0")
            _ok(r)
            assert json.loads(r.stdout)["digest"] == art.digest
            assert [q.status for q in mp.requests if q.bare_path.endswith(f"/manifests/{art.digest}")][:1] == [200]
            for d, n in art.blobs.items():
                assert mp.bytes_for(d) == n
                by_digest.assert_blob(d, n)
            by_digest.fsck()
    finally:
        origin.stop()
        mirror.stop()


def test_mirror_requests_carry_ns(registry: Registry, token_registry: Registry, cli: Imagevol, tmp_path: Path) -> None:
    """containerd's `ns` query parameter: every manifest and blob request to a mirror names the
    registry the reference is for (``ns=ORIGIN-HOST``), so a mirror serving several registries
    (Spegel, Dragonfly) knows where the content comes from. Requests to the registry itself, to
    the mirror's token service and to the host a blob is redirected to carry none. The mirror
    here is a real docker-registry 2.8 behind token auth, which ignores the parameter."""
    tag = os.urandom(3).hex()
    files = {"config.json": b"{}", "w.bin": os.urandom(2 * MiB)}
    art = push_artifact(oci.Client(registry), f"ns-{tag}/models/m", files)
    copy = push_artifact(oci.Client(token_registry), f"cache/ns-{tag}/models/m", files)
    assert copy.digest == art.digest
    only_origin = push_artifact(oci.Client(registry), f"ns-{tag}/models/o", {"o.bin": os.urandom(100_000)})
    big = max(art.blobs, key=lambda d: art.blobs[d])
    user, password = next(iter(token_registry.users.items()))
    ts = token_registry.token_server
    assert ts is not None
    with Proxy(registry.url) as op, Proxy(token_registry.url) as mp:
        conf = tmp_path / "registries.conf"
        conf.write_text(
            f'[[registry]]\nprefix = "{op.host}/ns-{tag}/models"\nlocation = "{op.host}/ns-{tag}/models"\n\n'
            f'[[registry.mirror]]\nlocation = "{mp.host}/cache/ns-{tag}/models"\n'
        )
        auth = _authfile(tmp_path / "auth.json", mp.host, user, password)
        mp.fault = Fault(redirect_to_other_host=True, match=big)  # the mirror sends the big blob elsewhere
        r = cli.pull(art.ref(op.host), "--registries-conf", str(conf), "--authfile", str(auth), "--json")
        _ok(r)
        assert mp.host in json.loads(r.stdout)["source"]
        for d, n in art.blobs.items():
            cli.assert_blob(d, n)
        api = [q for q in mp.requests if "/manifests/" in q.bare_path or "/blobs/" in q.bare_path]
        assert {q.bare_path.rsplit("/", 1)[-1] for q in api} >= {"v1", *art.blobs}
        for q in api:
            assert q.query == {"ns": [op.host]}, q
        assert 401 in {q.status for q in api}, "the mirror asked for a token"
        assert 302 in {q.status for q in api}, "the mirror redirected the big blob"
        # The redirect target and the token service get no `ns`; the token still works.
        assert mp.side.requests and all(urlsplit(path).query == "" for path, _ in mp.side.requests)
        tokens = [t for t in ts.requests if any(f"cache/ns-{tag}/" in s for s in t.get("scopes", []))]
        assert tokens and all(t["ok"] for t in tokens)
        assert all("ns" not in t["query"] for t in tokens), tokens
        assert not op.requests, "the mirror had everything"
        # Content the mirror lacks: the mirror is asked (with `ns`), then the registry (without).
        r = cli.pull(only_origin.ref(op.host), "--registries-conf", str(conf), "--authfile", str(auth), "--json")
        _ok(r)
        assert op.host in json.loads(r.stdout)["source"]
        missed = [q for q in mp.requests if "/models/o/manifests/" in q.bare_path]
        assert missed and all(q.query == {"ns": [op.host]} for q in missed)
        assert 404 in {q.status for q in missed}
        assert op.requests and all(q.query == {} for q in op.requests), op.requests
        assert {q.bare_path.rsplit("/", 1)[-1] for q in op.requests} >= {"v1", *only_origin.blobs}
    cli.fsck()


# --------------------------------------------------------------------------- resume and concurrency


@pytest.fixture(scope="module")
def big(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    path = tmp_path_factory.mktemp("big") / "model.bin"
    return push_big_artifact(registry, "pull/big", path, BIG_MIB * MiB, "model.bin")


def _ingest_ranges(root: Path) -> list:
    out = []
    for meta in (root / "ingest").glob("*/meta.json"):
        try:
            out.append(json.loads(meta.read_text())["ranges"])
        except (OSError, ValueError, KeyError):
            pass
    return out


@pytest.mark.parametrize("streams", ["1", "4"])
def test_resume_after_sigkill(big: Artifact, px: Proxy, cli: Imagevol, tmp_path: Path, streams: str) -> None:
    """Killed mid-blob, one stream or several (whose pieces land out of order, some kept for the
    hashing, some written ahead), the next pull fetches only what was not recorded."""
    (digest, size), part = next(iter(big.blobs.items())), 64 * MiB
    ref = big.ref(px.host)
    # Paced, so the proxy's count at the kill is what the client received (not MiBs in socket buffers).
    px.rate_limit = 256 * MiB
    args = ("--progress", "none", "--part-size", "64", "--streams", streams)
    p = cli.popen("pull", ref, *args, log=tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 150
        while px.bytes_for(digest) < 0.4 * size:
            assert p.poll() is None, f"pull ended early ({p.returncode}): {(tmp_path / 'first.log').read_text()}"
            assert time.monotonic() < deadline, "the first pull made no progress"
            time.sleep(0.005)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    # Let the proxy notice the dead client, then take the count.
    last, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 0.3:
        now = px.bytes_for(digest)
        if now != last:
            last, stable_since = now, time.monotonic()
        time.sleep(0.05)
    sent_first = px.bytes_for(digest)
    assert sent_first < size
    kept = _ingest_ranges(cli.root)
    assert not cli.blob(digest).exists()

    px.rate_limit = None
    t0 = time.monotonic()
    r = cli.pull(ref, "--part-size", "64", "--streams", streams, "--json", timeout=300)
    _ok(r)
    sent_second = px.bytes_for(digest) - sent_first
    remainder = size - sent_first
    print(
        f"resume: {sent_first / MiB:.0f} MiB before the kill, {sent_second / MiB:.0f} MiB after "
        f"({remainder / MiB:.0f} left)"
    )
    assert sent_second < remainder + part, (
        f"second pull downloaded {sent_second / MiB:.1f} MiB; {remainder / MiB:.1f} MiB were left after "
        f"{sent_first / MiB:.1f} MiB (ingest part map after the kill: {kept}; took {time.monotonic() - t0:.1f}s)"
    )
    assert json.loads(r.stdout)["digest"] == big.digest
    cli.fsck()
    cli.assert_blob(digest, size)
    assert not list((cli.root / "ingest").glob("*/data"))


@pytest.fixture(scope="module")
def medium(registry: Registry) -> Artifact:
    files = {"tokenizer.json": os.urandom(100_000), "weights.bin": os.urandom(64 * MiB)}
    return push_artifact(oci.Client(registry), "pull/medium", files)


def test_eight_concurrent_pulls_download_once(medium: Artifact, px: Proxy, cli: Imagevol, tmp_path: Path) -> None:
    ref = medium.ref(px.host)
    procs = [
        cli.popen("pull", ref, "--progress", "none", "--part-size", "16", log=tmp_path / f"p{i}.log") for i in range(8)
    ]
    try:
        for p in procs:
            p.wait(timeout=RUN_TIMEOUT)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    logs = [(tmp_path / f"p{i}.log").read_text() for i in range(8)]
    assert [p.returncode for p in procs] == [0] * 8, logs
    assert {log.strip() for log in logs} == {medium.digest}
    for d, n in {**medium.blobs, medium.config: len(oci.OCI_EMPTY_DATA)}.items():
        assert px.bytes_for(d) == n, (d, n, px.requests_for(d))
        cli.assert_blob(d, n)
    cli.fsck()


# --------------------------------------------------------------------------- refused content and faults


@pytest.mark.parametrize("part_mib", ["64", "1"], ids=["stream", "ranged"])
def test_wrong_bytes_refused(small: Artifact, px: Proxy, cli: Imagevol, part_mib: str) -> None:
    digest, _ = _blob_of(small, 6 * MiB)
    px.fault = Fault(match=digest, wrong_bytes=True, flip_offset=12345)
    r = cli.pull(small.ref(px.host), "--part-size", part_mib, "--streams", "4")
    _clear_error(r, 4)
    assert px.fault_hits >= 1
    assert not cli.blob(digest).exists()
    assert cli.images() == []
    cli.fsck()


@pytest.mark.parametrize("part_mib", ["64", "1"], ids=["stream", "ranged"])
@pytest.mark.parametrize("mode", ["truncate", "reset"])
@pytest.mark.parametrize("times", [1, None], ids=["once", "always"])
def test_cut_body_is_an_error_or_a_verified_retry(
    small: Artifact, px: Proxy, cli: Imagevol, part_mib: str, mode: str, times: int | None
) -> None:
    digest, size = _blob_of(small, 6 * MiB)
    # Cut once mid-body, or cut every answer right after its headers (no progress is possible).
    cut = 300_000 if times == 1 else 0
    kw = {"truncate_after": cut} if mode == "truncate" else {"reset_after": cut}
    px.fault = Fault(match=digest, times=times, **kw)
    r = cli.pull(small.ref(px.host), "--part-size", part_mib, "--streams", "4", "--retries", "2")
    assert px.fault_hits >= 1
    if r.returncode == 0:
        cli.assert_blob(digest, size)
    else:
        _clear_error(r, 1, 4)
        assert times is None or "cut" in r.stderr or "ended" in r.stderr or "reset" in r.stderr.lower()
        assert not cli.blob(digest).exists()
    if times is None:
        assert r.returncode != 0, "every answer was cut, yet the pull succeeded"
    cli.fsck()
    # Whatever happened, a clean run completes (resuming what was kept) and verifies.
    px.fault = None
    _ok(cli.pull(small.ref(px.host), "--part-size", part_mib, "--streams", "4"))
    for d, n in small.blobs.items():
        cli.assert_blob(d, n)
    cli.fsck()


def test_ignore_range_still_verified(small: Artifact, px: Proxy, cli: Imagevol) -> None:
    digest, size = _blob_of(small, 6 * MiB)
    px.fault = Fault(match=digest, ignore_range=True)
    _ok(cli.pull(small.ref(px.host), "--part-size", "1", "--streams", "4"))
    ranged = [q for q in px.requests_for(digest) if q.range]
    assert ranged and all(q.status == 200 for q in ranged), px.requests_for(digest)
    cli.assert_blob(digest, size)
    cli.fsck()


def test_ignore_range_on_resume_restarts_verified(small: Artifact, px: Proxy, cli: Imagevol) -> None:
    """A pull cut mid-blob leaves parts on disk; the next one asks for the rest with Range, gets
    200 and the whole blob, and must still store exactly the right bytes."""
    digest, size = _blob_of(small, 6 * MiB)
    px.fault = Fault(match=digest, truncate_after=256 * 1024 + 5)  # each answer: 256 KiB of 6 MiB
    r = cli.pull(small.ref(px.host), "--retries", "0")
    assert r.returncode != 0
    assert not cli.blob(digest).exists()
    px.fault = Fault(match=digest, ignore_range=True)
    _ok(cli.pull(small.ref(px.host)))
    cli.assert_blob(digest, size)
    cli.fsck()


@pytest.mark.parametrize("target", ["blob", "manifest"])
def test_429_with_retry_after_then_success(small: Artifact, px: Proxy, cli: Imagevol, target: str) -> None:
    match = _blob_of(small, 6 * MiB)[0] if target == "blob" else "/manifests/"
    px.fault = Fault(match=match, status=429, retry_after=1, times=2)
    t0 = time.monotonic()
    _ok(cli.pull(small.ref(px.host)))
    elapsed = time.monotonic() - t0
    statuses = [q.status for q in px.requests if match in q.path]
    assert statuses[:3] == [429, 429, 200], px.requests
    assert elapsed >= 1.9, f"Retry-After: 1 (twice) not honoured: {elapsed:.2f}s"
    for d, n in small.blobs.items():
        cli.assert_blob(d, n)


@pytest.mark.parametrize("target", ["blob", "manifest"])
def test_500s_retried_then_success(small: Artifact, px: Proxy, cli: Imagevol, target: str) -> None:
    match = _blob_of(small, 6 * MiB)[0] if target == "blob" else "/manifests/"
    px.fault = Fault(match=match, status=500, times=2)
    _ok(cli.pull(small.ref(px.host)))
    assert [q.status for q in px.requests if match in q.path][:3] == [500, 500, 200], px.requests
    for d, n in small.blobs.items():
        cli.assert_blob(d, n)
    cli.fsck()


def test_500s_forever_is_a_clear_error(small: Artifact, px: Proxy, cli: Imagevol) -> None:
    digest, _ = _blob_of(small, 6 * MiB)
    px.fault = Fault(match=digest, status=500)
    r = cli.pull(small.ref(px.host), "--retries", "1")
    _clear_error(r, 1)
    assert "500" in r.stderr
    assert not cli.blob(digest).exists()
    cli.fsck()


@pytest.mark.parametrize("which", ["basic_registry", "token_registry"])
def test_cross_host_redirect_never_carries_authorization(
    request: pytest.FixtureRequest, which: str, cli: Imagevol, tmp_path: Path
) -> None:
    reg: Registry = request.getfixturevalue(which)
    art = push_artifact(oci.Client(reg), f"pull/redirect-{which}", {"a.bin": os.urandom(3 * MiB), "b": b"tiny"})
    user, password = next(iter(reg.users.items()))
    with Proxy(reg.url) as p:
        auth = _authfile(tmp_path / "auth.json", p.host, user, password)
        p.fault = Fault(redirect_to_other_host=True)
        r = cli.pull(art.ref(p.host), "--authfile", str(auth), "--part-size", "1", "--streams", "4")
        _ok(r)
        redirected = [q for q in p.requests if q.status == 302]
        assert redirected, p.requests
        # The registry saw credentials; the other host never did.
        assert any(ok for path, ok in p.auth_log if "/blobs/" in path)
        assert p.side.requests, "the redirect was not followed"
        assert not p.side.saw_authorization, p.side.requests
        for d, n in art.blobs.items():
            assert any(d in path for path, _ in p.side.requests)
            cli.assert_blob(d, n)
        cli.fsck()


def test_wrong_docker_content_digest_refused(small: Artifact, px: Proxy, cli: Imagevol) -> None:
    px.fault = Fault(match="/manifests/", wrong_docker_content_digest=True)
    r = cli.pull(small.ref(px.host))
    _clear_error(r, 4)
    assert "Docker-Content-Digest" in r.stderr
    assert cli.images() == []
    assert not any(cli.blob(d).exists() for d in small.blobs)
    cli.fsck()


def test_wrong_content_type_refused(small: Artifact, px: Proxy, cli: Imagevol) -> None:
    px.fault = Fault(match="/manifests/", wrong_content_type=oci.DOCKER_MANIFEST_LIST)
    r = cli.pull(small.ref(px.host))
    _clear_error(r, 4)
    assert cli.images() == []
    cli.fsck()


def test_stalled_body_times_out_and_retries(small: Artifact, px: Proxy, cli: Imagevol) -> None:
    digest, size = _blob_of(small, 3 * MiB)
    px.fault = Fault(match=digest, stall_seconds=6, times=1)
    t0 = time.monotonic()
    r = cli.pull(small.ref(px.host), "--timeout", "1")
    elapsed = time.monotonic() - t0
    assert px.fault_hits == 1
    if r.returncode == 0:
        cli.assert_blob(digest, size)
        assert elapsed < 6, f"the stall was waited out ({elapsed:.1f}s) instead of timing out"
    else:
        _clear_error(r, 1)
        assert not cli.blob(digest).exists()
    cli.fsck()


# --------------------------------------------------------------------------- pull policies


def test_pull_never_with_empty_store(small: Artifact, px: Proxy, cli: Imagevol) -> None:
    ref = small.ref(px.host)
    r = cli.pull(ref, "--pull", "never")
    _clear_error(r, 1)
    assert ref in r.stderr
    assert px.requests == []


def test_pull_missing_twice_makes_no_request(small: Artifact, px: Proxy, cli: Imagevol) -> None:
    ref = small.ref(px.host)
    _ok(cli.pull(ref, "--pull", "missing"))
    seen = list(px.requests)
    assert seen
    r = cli.pull(ref, "--pull", "missing", "--json")
    _ok(r)
    assert json.loads(r.stdout)["offline"] is True
    assert px.requests == seen
    # --pull never now works from the store alone; --pull always asks the registry but
    # downloads no blob again.
    _ok(cli.pull(ref, "--pull", "never"))
    assert px.requests == seen
    before = {d: px.bytes_for(d) for d in small.blobs}
    r = cli.pull(ref, "--pull", "always", "--json")
    _ok(r)
    assert len(px.requests) > len(seen)
    assert {d: px.bytes_for(d) for d in small.blobs} == before
    assert json.loads(r.stdout)["downloadedBytes"] == 0
    cli.fsck()
