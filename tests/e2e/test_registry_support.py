"""The test-suite's registry infrastructure works against the real docker-registry."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import urllib3

from tests.support import oci
from tests.support.need import need_tool
from tests.support.registry import Registry, RegistryStartError, issue_cert
from tests.support.tokenserver import TokenServer, decode_jwt, parse_scope

pytestmark = pytest.mark.e2e

ALL = ["registry", "tls_registry", "basic_registry", "token_registry"]


@pytest.fixture
def token_server(token_registry):
    ts = token_registry.token_server
    ts.reset()
    saved = ts.expires_in
    yield ts
    ts.expires_in = saved
    ts.reset()


def _push_sample(reg: Registry, repo: str) -> tuple[bytes, str, bytes, str]:
    layer = b"layer for " + repo.encode()
    layer_digest = oci.push_blob(reg, repo, layer)
    oci.push_blob(reg, repo, oci.OCI_EMPTY_DATA)
    body, digest = oci.make_image_manifest(oci.empty_config(), [oci.descriptor(oci.OCI_LAYER, layer)])
    assert oci.push_manifest(reg, repo, "v1", body, oci.OCI_MANIFEST) == digest
    return layer, layer_digest, body, digest


@pytest.mark.parametrize("which", ALL)
def test_push_and_pull_blob_and_manifest(request, which, unique_repo):
    reg: Registry = request.getfixturevalue(which)
    layer, layer_digest, body, digest = _push_sample(reg, unique_repo)
    assert layer_digest == oci.sha256_digest(layer)
    assert oci.get_blob(reg, unique_repo, layer_digest) == layer
    for ref in ("v1", digest):
        got, ctype, got_digest = oci.get_manifest(reg, unique_repo, ref)
        assert (got, ctype, got_digest) == (body, oci.OCI_MANIFEST, digest)
    tags = json.loads(oci.get(reg, f"/v2/{unique_repo}/tags/list", expect=(200,)).data)
    assert tags == {"name": unique_repo, "tags": ["v1"]}
    head = oci.request(reg, "HEAD", f"/v2/{unique_repo}/blobs/{layer_digest}", expect=(200,))
    assert int(head.headers["Content-Length"]) == len(layer)
    missing = oci.get(reg, f"/v2/{unique_repo}/manifests/nope")
    assert missing.status == 404


def test_tls_is_verified_against_generated_ca(tls_registry, unique_repo):
    assert tls_registry.url.startswith("https://127.0.0.1:")
    assert tls_registry.ca_file is not None and Path(tls_registry.ca_file).is_file()
    _push_sample(tls_registry, unique_repo)
    # The certificate names localhost too.
    pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=str(tls_registry.ca_file))
    r = pool.request("GET", f"https://localhost:{tls_registry.port}/v2/", retries=False, timeout=5)
    assert r.status == 200
    # Without the CA the handshake fails.
    bare = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=None)
    with pytest.raises(urllib3.exceptions.SSLError):
        bare.request("GET", f"{tls_registry.url}/v2/", retries=False, timeout=5)
    ctx = ssl.create_default_context(cafile=str(tls_registry.ca_file))
    with (
        socket.create_connection(("127.0.0.1", tls_registry.port), timeout=5) as s,
        ctx.wrap_socket(s, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_basic_auth(basic_registry, unique_repo):
    _push_sample(basic_registry, unique_repo)
    path = f"/v2/{unique_repo}/manifests/v1"
    ok = oci.get(basic_registry, path, creds=("alice", "secret"), headers={"Accept": oci.OCI_MANIFEST})
    assert ok.status == 200
    wrong = oci.get(basic_registry, path, creds=("alice", "wrong"))
    assert wrong.status == 401
    anon = oci.get(basic_registry, path, creds=None)
    assert anon.status == 401
    assert anon.headers["WWW-Authenticate"].startswith("Basic ")
    assert basic_registry.htpasswd_file is not None
    assert basic_registry.htpasswd_file.read_text().startswith("alice:$2")


def test_token_flow_challenge_token_retry(token_registry, token_server, unique_repo):
    _push_sample(token_registry, unique_repo)
    token_server.reset()
    pool = urllib3.PoolManager()
    url = f"{token_registry.url}/v2/{unique_repo}/manifests/v1"
    accept = {"Accept": oci.OCI_MANIFEST}
    r = pool.request("GET", url, headers=accept, retries=False)
    assert r.status == 401
    scheme, params = oci.parse_challenge(r.headers["WWW-Authenticate"])
    assert scheme == "bearer"
    assert params == {
        "realm": token_server.realm,
        "service": token_registry.service,
        "scope": f"repository:{unique_repo}:pull",
    }
    t = pool.request(
        "GET",
        params["realm"],
        fields={"service": params["service"], "scope": params["scope"]},
        headers={"Authorization": oci.basic_header("alice", "secret")},
        retries=False,
    )
    assert t.status == 200
    body = json.loads(t.data)
    assert set(body) >= {"token", "access_token", "expires_in", "issued_at"}
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == token_server.expires_in
    header, claims = decode_jwt(body["token"])
    assert header["alg"] == "RS256" and header["x5c"] and header["kid"].count(":") == 11
    assert claims["iss"] == token_registry.issuer and claims["aud"] == token_registry.service
    assert claims["sub"] == "alice"
    assert claims["access"] == [{"type": "repository", "name": unique_repo, "actions": ["pull"]}]
    assert {"exp", "nbf", "iat", "jti"} <= set(claims)
    ok = pool.request("GET", url, headers={**accept, "Authorization": f"Bearer {body['token']}"}, retries=False)
    assert ok.status == 200
    assert ok.headers["Docker-Content-Digest"] == oci.sha256_digest(ok.data)
    assert token_server.issued == 1
    assert token_server.requests[-1]["user"] == "alice"


def test_token_anonymous_and_wrong_credentials(token_registry, token_server, unique_repo):
    _push_sample(token_registry, unique_repo)
    path = f"/v2/{unique_repo}/manifests/v1"
    anon = oci.Client(token_registry, creds=None)
    r = anon.request("GET", path)
    assert r.status == 401  # token issued, but with empty access
    assert "insufficient_scope" in r.headers["WWW-Authenticate"]
    token = anon.tokens[f"repository:{unique_repo}:pull"]
    assert decode_jwt(token)[1]["access"] == []
    bad = oci.Client(token_registry, creds=("alice", "nope"))
    with pytest.raises(oci.RegistryHTTPError) as e:
        bad.request("GET", path)
    assert e.value.status == 401
    assert [r["ok"] for r in token_server.requests[-2:]] == [True, False]


def test_token_expiry_and_refresh(token_registry, token_server, unique_repo):
    _push_sample(token_registry, unique_repo)
    path = f"/v2/{unique_repo}/manifests/v1"
    token_server.expires_in = 7
    c = oci.Client(token_registry)
    assert c.request("GET", path, headers={"Accept": oci.OCI_MANIFEST}).status == 200
    _, claims = decode_jwt(next(iter(c.tokens.values())))
    assert claims["exp"] - claims["iat"] == 7
    # A token already past exp + the registry's 60 s leeway is refused ...
    token_server.claim_lifetime = -120
    stale = token_server.issue("alice", [{"type": "repository", "name": unique_repo, "actions": ["pull"]}])
    r = urllib3.PoolManager().request(
        "GET", f"{token_registry.url}{path}", headers={"Authorization": f"Bearer {stale}"}, retries=False
    )
    assert r.status == 401
    assert r.headers["WWW-Authenticate"].lower().startswith("bearer ")
    # ... and a client holding it gets a fresh one on the 401 challenge.
    token_server.claim_lifetime = None
    before = token_server.issued
    c2 = oci.Client(token_registry)
    c2.tokens[f"repository:{unique_repo}:pull"] = stale
    assert c2.request("GET", path, headers={"Accept": oci.OCI_MANIFEST}).status == 200
    assert token_server.issued == before + 1


def test_token_scope_name_with_host_port(token_server):
    name = "127.0.0.1:5000/org/model"
    assert parse_scope(f"repository:{name}:pull,push") == ("repository", name, ["pull", "push"])
    pool = urllib3.PoolManager()
    r = pool.request(
        "GET",
        token_server.realm,
        fields={"service": token_server.service, "scope": f"repository:{name}:pull,push"},
        headers={"Authorization": oci.basic_header("alice", "secret")},
        retries=False,
    )
    assert r.status == 200
    access = decode_jwt(json.loads(r.data)["token"])[1]["access"]
    assert access == [{"type": "repository", "name": name, "actions": ["pull", "push"]}]


def test_token_oauth2_post_and_refresh(token_registry, token_server, unique_repo):
    _push_sample(token_registry, unique_repo)
    pool = urllib3.PoolManager()
    form = {
        "grant_type": "password",
        "username": "alice",
        "password": "secret",
        "service": token_registry.service,
        "scope": f"repository:{unique_repo}:pull",
        "client_id": "imagevol-tests",
    }
    r = pool.request_encode_body("POST", token_server.realm, fields=form, encode_multipart=False)
    assert r.status == 200
    body = json.loads(r.data)
    refresh = body["refresh_token"]
    r2 = pool.request_encode_body(
        "POST",
        token_server.realm,
        fields={
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "service": token_registry.service,
            "scope": f"repository:{unique_repo}:pull",
        },
        encode_multipart=False,
    )
    assert r2.status == 200
    for token in (body["access_token"], json.loads(r2.data)["access_token"]):
        ok = pool.request(
            "GET",
            f"{token_registry.url}/v2/{unique_repo}/manifests/v1",
            headers={"Authorization": f"Bearer {token}", "Accept": oci.OCI_MANIFEST},
            retries=False,
        )
        assert ok.status == 200
    bad = pool.request_encode_body("POST", token_server.realm, fields={**form, "password": "x"}, encode_multipart=False)
    assert bad.status == 401


def test_es256_token_is_accepted(token_registry, tmp_path, unique_repo):
    _push_sample(token_registry, unique_repo)
    signer = issue_cert(token_registry.ca, tmp_path, "es", common_name="es signer", server=False)
    ts = TokenServer(
        users={},
        service=token_registry.service,
        issuer=token_registry.issuer,
        signing_key=signer.key,
        signing_cert=signer.cert,
    )
    token = ts.issue("bob", [{"type": "repository", "name": unique_repo, "actions": ["pull"]}])
    assert decode_jwt(token)[0]["alg"] == "ES256"
    r = urllib3.PoolManager().request(
        "GET",
        f"{token_registry.url}/v2/{unique_repo}/manifests/v1",
        headers={"Authorization": f"Bearer {token}", "Accept": oci.OCI_MANIFEST},
        retries=False,
    )
    assert r.status == 200


def test_builders_are_accepted_by_the_registry(registry, unique_repo):
    repo = unique_repo
    # Artifact with the empty config and a custom layer type.
    weights = b"\x00" * 1024
    oci.push_blob(registry, repo, weights)
    oci.push_blob(registry, repo, oci.OCI_EMPTY_DATA)
    art, art_digest = oci.make_artifact_manifest(
        "application/vnd.example.model.v1",
        [
            oci.descriptor(
                "application/vnd.example.weights",
                weights,
                annotations={"org.opencontainers.image.title": "w.bin"},
            )
        ],
    )
    assert json.loads(art)["config"]["digest"] == oci.sha256_digest(b"{}")
    assert oci.push_manifest(registry, repo, "artifact", art, oci.OCI_MANIFEST) == art_digest
    # Docker schema2 image + manifest list; OCI image + index.
    docker_body, docker_digest = oci.push_image(
        registry, repo, "docker", [(oci.DOCKER_LAYER_GZIP, b"gz?")], media_type=oci.DOCKER_MANIFEST
    )
    oci_body, oci_digest = oci.push_image(registry, repo, "oci", [b"tar"])
    lst, lst_digest = oci.make_index(
        [oci.descriptor(oci.DOCKER_MANIFEST, docker_body, platform=oci.platform(arch="amd64"))],
        media_type=oci.DOCKER_MANIFEST_LIST,
    )
    oci.push_manifest(registry, repo, "list", lst, oci.DOCKER_MANIFEST_LIST)
    idx, idx_digest = oci.make_index(
        [
            oci.descriptor(oci.OCI_MANIFEST, oci_body, platform=oci.platform(arch="arm64", variant="v8")),
            oci.descriptor(oci.OCI_MANIFEST, art, artifactType="application/vnd.example.model.v1"),
        ]
    )
    oci.push_manifest(registry, repo, "index", idx, oci.OCI_INDEX)
    for ref, body, mt, digest in [
        ("artifact", art, oci.OCI_MANIFEST, art_digest),
        ("docker", docker_body, oci.DOCKER_MANIFEST, docker_digest),
        ("oci", oci_body, oci.OCI_MANIFEST, oci_digest),
        ("list", lst, oci.DOCKER_MANIFEST_LIST, lst_digest),
        ("index", idx, oci.OCI_INDEX, idx_digest),
    ]:
        assert oci.get_manifest(registry, repo, ref) == (body, mt, digest)


def _skopeo(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    need_tool("skopeo")
    env = {
        **os.environ,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "HOME": str(tmp_path),
        "XDG_RUNTIME_DIR": str(tmp_path),
    }
    return subprocess.run(
        ["skopeo", "--command-timeout", "60s", *args],
        capture_output=True,
        timeout=90,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_skopeo_inspect_raw_plain(registry, unique_repo, tmp_path):
    _, _, body, _ = _push_sample(registry, unique_repo)
    p = _skopeo(
        "inspect",
        "--raw",
        "--tls-verify=false",
        f"docker://{registry.host}/{unique_repo}:v1",
        tmp_path=tmp_path,
    )
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout == body


@pytest.mark.parametrize("which", ["tls_registry", "basic_registry", "token_registry"])
def test_skopeo_inspect_raw_secured(request, which, unique_repo, tmp_path):
    reg: Registry = request.getfixturevalue(which)
    _, _, body, _ = _push_sample(reg, unique_repo)
    args = ["inspect", "--raw"]
    if reg.tls:
        certs = tmp_path / "certs"
        certs.mkdir()
        shutil.copy(reg.ca_file, certs / "ca.crt")
        args += ["--cert-dir", str(certs), "--tls-verify=true"]
    else:
        args += ["--tls-verify=false"]
    if reg.auth:
        args += ["--creds", "alice:secret"]
    p = _skopeo(*args, f"docker://{reg.host}/{unique_repo}:v1", tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout == body
    if reg.auth:
        bad = _skopeo(
            "inspect", "--raw", "--tls-verify=false", "--creds", "alice:wrong",
            f"docker://{reg.host}/{unique_repo}:v1", tmp_path=tmp_path,
        )  # fmt: skip
        assert bad.returncode != 0


def test_restart_keeps_content_and_port(tmp_path, unique_repo):
    with Registry.start(tmp_path / "r") as reg:
        _, layer_digest, body, digest = _push_sample(reg, unique_repo)
        host, pid = reg.host, reg.pid
        reg.restart()
        assert reg.host == host and reg.pid != pid and reg.running()
        assert oci.get_manifest(reg, unique_repo, "v1") == (body, oci.OCI_MANIFEST, digest)
        assert oci.get_blob(reg, unique_repo, layer_digest)
        assert reg.storage_dir.is_dir() and reg.log_file.stat().st_size > 0
    assert not reg.running()
    with pytest.raises(urllib3.exceptions.HTTPError):
        urllib3.PoolManager().request("GET", f"{reg.url}/v2/", retries=False, timeout=2)


def test_start_failure_reports_log_tail(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(RegistryStartError) as e:
            Registry.start(tmp_path / "r", port=port)
    assert "log tail" in str(e.value)
