"""Core end to end: every fixture pushed to a real registry, `explain` and `inspect` through the CLI
for linux/amd64, linux/arm64 and linux/arm/v6 under both policies and all three runtimes; the same
on an OCI layout written by skopeo (an oracle no one here wrote)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.support.fixtures import ALL, build_core_layout, expectations, push_layout_tag
from tests.support.oci import Client

pytestmark = pytest.mark.e2e
NODES = ("linux/amd64", "linux/arm64", "linux/arm/v6")


def imagevol(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagevol", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def pushed(registry, tmp_path_factory):
    layout = tmp_path_factory.mktemp("core-push") / "layout"
    build_core_layout(layout)
    client = Client(registry)
    for fx in ALL:
        push_layout_tag(client, layout, fx, "core/fixtures")
    return registry, layout


def _table():
    rows = defaultdict(dict)
    for fx, node, rt, pol, exp in expectations():
        # CRI-O and containerd have no policy: their rows hold under both.
        for p in (pol,) if rt == "imagevol" else ("native", "any"):
            rows[(fx, p)][(node, rt)] = exp
    return sorted(rows.items())


@pytest.mark.parametrize(("key", "table"), _table(), ids=lambda v: "-".join(v) if isinstance(v, tuple) else "")
def test_explain_against_registry(pushed, key, table) -> None:
    registry, _ = pushed
    fixture, policy = key
    args = ["explain", f"{registry.host}/core/fixtures:{fixture}", "--platform-policy", policy, "--json"]
    for n in NODES:
        args += ["--platform", n]
    for rt in ("imagevol", "crio", "containerd"):
        args += ["--runtime", rt]
    r = imagevol(*args)
    doc = json.loads(r.stdout)
    got = {}
    for node in doc["nodes"]:
        for o in node["outcomes"]:
            got[(node["node"][0], o["runtime"])] = o
    any_fail = False
    for (node, rt), (status, position, kind) in table.items():
        o = got[(node, rt)]
        assert o["mounts"] == (status == "mounts"), (node, rt, o)
        if status == "mounts":
            sel = o["selection"]
            assert sel["kind"] == kind
            if position is None:
                assert sel["how"] == "direct"
            else:
                assert sel["steps"][-1]["chosen"] == position, (node, rt, sel)
        else:
            any_fail = True
            assert o["error"], o
    assert r.returncode == (3 if any_fail else 0), r.stderr


def test_no_match_exit_code_and_hint(pushed) -> None:
    registry, _ = pushed
    r = imagevol("explain", f"{registry.host}/core/fixtures:arm64-only", "--platform", "linux/amd64")
    assert r.returncode == 3
    assert "no match" in r.stdout
    assert "--platform-policy any" in r.stdout
    r = imagevol(
        "explain", f"{registry.host}/core/fixtures:arm64-only", "--platform", "linux/amd64", "--platform-policy", "any"
    )
    assert r.returncode == 0, r.stdout
    assert "fallback" in r.stdout


def test_crio_error_text(pushed) -> None:
    registry, _ = pushed
    r = imagevol(
        "explain", f"{registry.host}/core/fixtures:four-platform", "--platform", "linux/arm/v6", "--runtime", "crio"
    )
    assert r.returncode == 3
    inner = 'no image found in image index for architecture "arm", variant "v6", OS "linux"'
    # CRI-O 1.34's own text: the image path (containers/image names the image docker://FAMILIAR),
    # then the artifact path (issue 14 case 6).
    assert (
        "unable to pull image or OCI artifact: pull image err: choosing an image from manifest list "
        f"docker://{registry.host}/core/fixtures:four-platform: {inner}; artifact err: choose instance: {inner}"
    ) in r.stdout


def test_inspect_registry_tree(pushed) -> None:
    registry, _ = pushed
    r = imagevol("inspect", f"{registry.host}/core/fixtures:mixed-artifact", "--json")
    assert r.returncode == 0, r.stderr
    tree = json.loads(r.stdout)["tree"]
    assert tree["kind"] == "index"
    kinds = [m["kind"] for m in tree["manifests"]]
    assert kinds == ["image", "artifact"]
    art = tree["manifests"][1]
    assert art["effectiveArtifactType"] == "application/vnd.example.model.v1"
    assert sorted(x["title"] for x in art["layers"]) == ["config.json", "model.safetensors"]
    r = imagevol("inspect", f"{registry.host}/core/fixtures:nested")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("index, ") == 2


def test_missing_tag_is_a_clear_error(pushed) -> None:
    registry, _ = pushed
    r = imagevol("inspect", f"{registry.host}/core/fixtures:nope")
    assert r.returncode == 1
    assert r.stderr.startswith("error: ")
    assert "nope" in r.stderr


def test_bad_reference_is_usage_error() -> None:
    r = imagevol("inspect", "Upper/Case:tag")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ")


def test_skopeo_layout(pushed, tmp_path) -> None:
    """A layout written by `skopeo copy` (the oracle) reads the same as the registry."""
    registry, _ = pushed
    dest = tmp_path / "sk"
    subprocess.run(
        [
            "skopeo", "copy", "--all", "--preserve-digests", "--src-tls-verify=false",
            f"docker://{registry.host}/core/fixtures:four-platform", f"oci:{dest}:four",
        ],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    r = imagevol("inspect", f"oci:{dest}:four", "--json")
    assert r.returncode == 0, r.stderr
    tree = json.loads(r.stdout)["tree"]
    assert [m["platform"]["architecture"] for m in tree["manifests"]] == ["amd64", "arm64", "arm", "s390x"]
    r2 = imagevol("inspect", f"{registry.host}/core/fixtures:four-platform", "--json")
    assert json.loads(r2.stdout)["tree"]["digest"] == tree["digest"]
    r = imagevol("explain", f"oci:{dest}:four", "--platform", "linux/arm64", "--json")
    assert r.returncode == 0
    out = json.loads(r.stdout)["nodes"][0]["outcomes"]
    assert all(o["mounts"] for o in out)
    r = imagevol("explain", f"oci:{dest}:four", "--platform", "linux/arm/v6", "--runtime", "crio")
    assert r.returncode == 3


def test_token_registry_anonymous_denied_and_authfile(token_registry, tmp_path) -> None:
    """Bearer challenge: without credentials the pull is denied; with an auth file it reads."""
    layout = tmp_path / "l"
    build_core_layout(layout)
    push_layout_tag(Client(token_registry), layout, "four-platform", "core/private")
    ref = f"{token_registry.host}/core/private:four-platform"
    (tmp_path / "empty.json").write_text("{}")
    r = imagevol("inspect", ref, env={"REGISTRY_AUTH_FILE": str(tmp_path / "empty.json"), "HOME": str(tmp_path)})
    assert r.returncode == 1
    assert r.stderr.startswith("error: ")
    assert "401" in r.stderr or "denied" in r.stderr
    user, pw = next(iter(token_registry.users.items()))
    import base64

    auth = tmp_path / "auth.json"
    token = base64.b64encode(f"{user}:{pw}".encode()).decode()
    auth.write_text(json.dumps({"auths": {token_registry.host: {"auth": token}}}))
    r = imagevol("inspect", ref, "--authfile", str(auth))
    assert r.returncode == 0, r.stderr
    assert pw not in r.stdout + r.stderr


def test_tls_registry_with_cert_dir(tls_registry, tmp_path) -> None:
    layout = tmp_path / "l"
    build_core_layout(layout)
    push_layout_tag(Client(tls_registry), layout, "arm64-only", "core/tls")
    ref = f"{tls_registry.host}/core/tls:arm64-only"
    r = imagevol("inspect", ref)
    assert r.returncode == 1
    assert "certificate" in r.stderr.lower()
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(Path(tls_registry.ca_file).read_bytes())
    r = imagevol("inspect", ref, "--cert-dir", str(certs))
    assert r.returncode == 0, r.stderr
    r = imagevol("inspect", ref, "--tls-verify=false")
    assert r.returncode == 0, r.stderr


def test_short_name_search_registries(pushed, tmp_path) -> None:
    """A short name is tried against unqualified-search-registries in order; an alias maps it."""
    from tests.support.registry import Registry

    registry, _ = pushed
    with Registry.start(tmp_path / "empty") as empty:
        conf = tmp_path / "registries.conf"
        conf.write_text(f'unqualified-search-registries = ["{empty.host}", "{registry.host}"]\n')
        r = imagevol("inspect", "core/fixtures:four-platform", "--registries-conf", str(conf), "--json")
        assert r.returncode == 0, r.stderr
        assert registry.host in json.loads(r.stdout)["source"]
        r = imagevol("inspect", "core/missing:v1", "--registries-conf", str(conf))
        assert r.returncode == 1
        assert "search registr" in r.stderr
    conf.write_text(f'[aliases]\n"mymodel" = "{registry.host}/core/fixtures"\n')
    r = imagevol("inspect", "mymodel:arm64-only", "--registries-conf", str(conf), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tree"]["manifests"][0]["platform"]["architecture"] == "arm64"
