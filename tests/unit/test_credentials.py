"""Credentials: auth file order, key normalization, namespaced keys, credential helpers."""

from __future__ import annotations

import base64
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from imagevol.errors import AuthError, UsageError
from imagevol.registry import credentials
from imagevol.registry.credentials import (
    Credential,
    auth_file_candidates,
    lookup_credential,
    normalize_auth_key,
)

SECRET = "s3cr3t-P4ss"
TOKEN = "tok-REFRESH-123"


def b64(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def auths(**entries: str) -> dict:
    return {"auths": {k: {"auth": v} for k, v in entries.items()}}


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean environment: HOME, XDG_RUNTIME_DIR and a PATH dir for helpers under tmp_path."""
    home = tmp_path / "home"
    run = tmp_path / "run"
    bin_dir = tmp_path / "bin"
    for d in (home, run, bin_dir):
        d.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    for var in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return tmp_path


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


HELPER_SCRIPT = """\
import json, sys, time
from pathlib import Path
here = Path(__file__).parent
conf = json.loads((here / (Path(__file__).name + ".json")).read_text())
assert sys.argv[1:] == ["get"], sys.argv
url = sys.stdin.read()
with open(here / (Path(__file__).name + ".log"), "a") as log:
    log.write(url + "\\n")
mode = conf.get("mode", "ok")
if mode == "sleep":
    time.sleep(10)
if mode == "fail":
    print("error talking to the keychain: boom")
    sys.exit(3)
if mode == "garbage":
    print("not json " + conf["secret"])
    sys.exit(0)
creds = conf.get("creds", {})
if url not in creds:
    print("credentials not found in native keychain")
    sys.exit(1)
print(json.dumps({"ServerURL": url, **creds[url]}))
"""


def make_helper(env: Path, name: str = "test", **conf: object) -> Path:
    exe = env / "bin" / f"docker-credential-{name}"
    exe.write_text(f"#!{sys.executable}\n{HELPER_SCRIPT}")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    (env / "bin" / f"docker-credential-{name}.json").write_text(json.dumps(conf))
    return exe


def helper_calls(env: Path, name: str = "test") -> list[str]:
    log = env / "bin" / f"docker-credential-{name}.log"
    return log.read_text().splitlines() if log.exists() else []


# ---------------------------------------------------------------------------------------------
# File order


def test_candidates_default_order(env: Path) -> None:
    home = env / "home"
    assert auth_file_candidates() == [
        env / "run" / "containers" / "auth.json",
        home / ".config" / "containers" / "auth.json",
        home / ".docker" / "config.json",
        home / ".dockercfg",
    ]


def test_candidates_follow_env(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(env / "xdg"))
    monkeypatch.setenv("DOCKER_CONFIG", str(env / "dockercfgdir"))
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert auth_file_candidates() == [
        Path(f"/run/containers/{os.getuid()}/auth.json"),
        env / "xdg" / "containers" / "auth.json",
        env / "dockercfgdir" / "config.json",
        env / "home" / ".dockercfg",
    ]


@pytest.mark.parametrize(
    ("flag", "env_file", "expected"),
    [
        ("flag.json", None, "flag.json"),
        (None, "envfile.json", "envfile.json"),
        ("flag.json", "envfile.json", "flag.json"),
    ],
)
def test_user_chosen_file_is_the_only_one(
    env: Path, monkeypatch: pytest.MonkeyPatch, flag: str | None, env_file: str | None, expected: str
) -> None:
    if env_file:
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(env / env_file))
    assert auth_file_candidates(str(env / flag) if flag else None) == [env / expected]


def test_first_file_with_credentials_wins(env: Path) -> None:
    home = env / "home"
    write_json(env / "run" / "containers" / "auth.json", auths(**{"other.io": b64("x", "y")}))
    write_json(home / ".config" / "containers" / "auth.json", auths(**{"quay.io": b64("xdg", "1")}))
    write_json(home / ".docker" / "config.json", auths(**{"quay.io": b64("docker", "2")}))
    assert lookup_credential("quay.io") == Credential("xdg", "1")
    assert lookup_credential("other.io") == Credential("x", "y")
    assert lookup_credential("nowhere.io") is None


def test_docker_config_env_and_legacy_file(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(env / "dc"))
    write_json(env / "dc" / "config.json", auths(**{"a.io": b64("dc", "1")}))
    legacy = {"https://index.docker.io/v1/": {"auth": b64("hub", "2"), "email": "x@y"}}
    write_json(env / "home" / ".dockercfg", legacy)
    assert lookup_credential("a.io") == Credential("dc", "1")
    assert lookup_credential("docker.io", "library/ubuntu") == Credential("hub", "2")


def test_explicit_authfile_excludes_defaults_and_must_exist(env: Path) -> None:
    write_json(env / "home" / ".docker" / "config.json", auths(**{"a.io": b64("u", "p")}))
    explicit = write_json(env / "mine.json", auths(**{"b.io": b64("m", "q")}))
    assert lookup_credential("a.io", authfile=str(explicit)) is None
    assert lookup_credential("b.io", authfile=str(explicit)) == Credential("m", "q")
    with pytest.raises(UsageError, match=r"missing\.json"):
        lookup_credential("a.io", authfile=str(env / "missing.json"))


def test_registry_auth_file_env(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = write_json(env / "ra.json", auths(**{"b.io": b64("env", "p")}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(f))
    assert lookup_credential("b.io") == Credential("env", "p")


# ---------------------------------------------------------------------------------------------
# Keys


@pytest.mark.parametrize(
    ("key", "registry", "found"),
    [
        ("https://index.docker.io/v1/", "docker.io", True),
        ("index.docker.io", "docker.io", True),
        ("registry-1.docker.io", "docker.io", True),
        ("docker.io", "docker.io", True),
        ("docker.io", "index.docker.io", True),
        ("http://localhost:5000/v2/", "localhost:5000", True),
        ("https://quay.io", "quay.io", True),
        ("localhost:5000", "localhost:5000", True),
        ("localhost:5000", "localhost:5001", False),
        ("example.com", "example.com:5000", False),
        ("example.com:5000", "example.com", False),
        ("quay.io", "docker.io", False),
    ],
)
def test_key_normalization(env: Path, key: str, registry: str, found: bool) -> None:
    write_json(env / "home" / ".docker" / "config.json", auths(**{key: b64("u", "p")}))
    expected = Credential("u", "p") if found else None
    assert lookup_credential(registry) == expected


@pytest.mark.parametrize(
    ("key", "legacy", "expected"),
    [
        ("https://index.docker.io/v1/", False, "docker.io"),
        ("registry-1.docker.io", False, "docker.io"),
        ("quay.io/ns/repo", False, "quay.io/ns/repo"),
        ("https://quay.io/ns", False, "quay.io"),
        ("quay.io/ns", True, "quay.io"),
    ],
)
def test_normalize_auth_key(key: str, legacy: bool, expected: str) -> None:
    assert normalize_auth_key(key, legacy=legacy) == expected


@pytest.mark.parametrize(
    ("repository", "expected_user"),
    [
        ("ns/repo", "repo"),
        ("ns/repo/deeper", "repo"),
        ("ns/other", "ns"),
        ("nsx/repo", "registry"),
        ("other/x", "registry"),
        (None, "registry"),
    ],
)
def test_namespaced_keys_most_specific_first(env: Path, repository: str | None, expected_user: str) -> None:
    write_json(
        env / "home" / ".config" / "containers" / "auth.json",
        auths(
            **{
                "quay.io": b64("registry", "1"),
                "quay.io/ns": b64("ns", "2"),
                "quay.io/ns/repo": b64("repo", "3"),
            }
        ),
    )
    cred = lookup_credential("quay.io", repository)
    assert cred is not None and cred.username == expected_user


def test_identity_token_and_empty_entries(env: Path) -> None:
    write_json(
        env / "run" / "containers" / "auth.json",
        {
            "auths": {
                "tok.io": {"identitytoken": TOKEN},
                "both.io": {"auth": b64("u", "p"), "identitytoken": TOKEN},
                "empty.io": {},
                "nocolon.io": {"auth": base64.b64encode(b"justtext").decode()},
            }
        },
    )
    write_json(env / "home" / ".docker" / "config.json", auths(**{"empty.io": b64("later", "x")}))
    assert lookup_credential("tok.io") == Credential("", "", TOKEN)
    assert lookup_credential("both.io") == Credential("u", "p", TOKEN)
    # An empty marker (left by `docker login` with a helper) does not stop the search.
    assert lookup_credential("empty.io") == Credential("later", "x")
    assert lookup_credential("nocolon.io") is None


def test_password_keeps_colons_and_drops_nul_padding(env: Path) -> None:
    raw = base64.b64encode(b"user:pa:ss\x00\x00").decode()
    write_json(env / "run" / "containers" / "auth.json", {"auths": {"a.io": {"auth": raw}}})
    assert lookup_credential("a.io") == Credential("user", "pa:ss")


# ---------------------------------------------------------------------------------------------
# Malformed files and arguments


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"auths": {', r"not valid JSON \(line 1"),
        ("[1, 2]", "top level must be a JSON object"),
        ('{"auths": []}', "'auths' must be an object"),
        ('{"auths": {"a.io": "x"}}', r"auths\['a.io'\] must be an object"),
        ('{"auths": {"a.io": {"auth": 5}}}', r"auths\['a.io'\].auth must be a string"),
        ('{"auths": {"a.io": {"auth": "%%%not-base64"}}}', r"auths\['a.io'\].auth is not base64"),
        ('{"credHelpers": {"a.io": "../../bin/sh"}}', r"credHelpers\['a.io'\] must name a credential helper"),
    ],
)
def test_malformed_auth_file_names_the_file(env: Path, content: str, match: str) -> None:
    path = env / "run" / "containers" / "auth.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(UsageError, match=match) as info:
        lookup_credential("a.io")
    assert str(path) in str(info.value)


def test_empty_file_is_no_credentials(env: Path) -> None:
    path = env / "run" / "containers" / "auth.json"
    path.parent.mkdir(parents=True)
    path.write_text("  \n")
    assert lookup_credential("a.io") is None


def test_bad_base64_error_has_no_secret(env: Path) -> None:
    write_json(env / "run" / "containers" / "auth.json", {"auths": {"a.io": {"auth": SECRET + "!"}}})
    with pytest.raises(UsageError) as info:
        lookup_credential("a.io")
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)


@pytest.mark.parametrize(
    ("registry", "repository"),
    [
        ("https://quay.io", None),
        ("quay.io/ns", None),
        ("", None),
        ("quay.io", "ns/repo:tag"),
        ("quay.io", "ns/repo@sha256:abc"),
        ("quay.io", "ns//repo"),
    ],
)
def test_invalid_queries(env: Path, registry: str, repository: str | None) -> None:
    with pytest.raises(UsageError):
        lookup_credential(registry, repository)


# ---------------------------------------------------------------------------------------------
# Credential helpers


def test_cred_helper_per_registry(env: Path) -> None:
    make_helper(env, creds={"quay.io": {"Username": "helper-user", "Secret": SECRET}})
    write_json(
        env / "home" / ".docker" / "config.json",
        {"auths": {"quay.io": {"auth": b64("inline", "x")}}, "credHelpers": {"quay.io": "test"}},
    )
    assert lookup_credential("quay.io", "ns/repo") == Credential("helper-user", SECRET)
    assert helper_calls(env) == ["quay.io"]


def test_cred_helper_identity_token(env: Path) -> None:
    make_helper(env, creds={"quay.io": {"Username": "<token>", "Secret": TOKEN}})
    write_json(env / "home" / ".docker" / "config.json", {"credHelpers": {"quay.io": "test"}})
    assert lookup_credential("quay.io") == Credential("", "", TOKEN)


def test_cred_helper_docker_hub_server_url(env: Path) -> None:
    make_helper(env, creds={"https://index.docker.io/v1/": {"Username": "hub", "Secret": SECRET}})
    write_json(env / "home" / ".docker" / "config.json", {"credHelpers": {"docker.io": "test"}})
    assert lookup_credential("docker.io", "library/ubuntu") == Credential("hub", SECRET)
    assert helper_calls(env) == ["https://index.docker.io/v1/"]


def test_cred_helper_not_found_falls_through_to_next_file(env: Path) -> None:
    make_helper(env, creds={})
    write_json(env / "run" / "containers" / "auth.json", {"credHelpers": {"quay.io": "test"}})
    write_json(env / "home" / ".docker" / "config.json", auths(**{"quay.io": b64("next", "file")}))
    assert lookup_credential("quay.io") == Credential("next", "file")
    assert helper_calls(env) == ["quay.io"]


def test_cred_helper_not_found_is_none(env: Path) -> None:
    make_helper(env, creds={})
    write_json(env / "home" / ".docker" / "config.json", {"credHelpers": {"quay.io": "test"}})
    assert lookup_credential("quay.io") is None


def test_cred_helper_failure_names_helper(env: Path) -> None:
    make_helper(env, mode="fail", creds={"quay.io": {"Username": "u", "Secret": SECRET}})
    write_json(env / "home" / ".docker" / "config.json", {"credHelpers": {"quay.io": "test"}})
    with pytest.raises(AuthError, match="docker-credential-test") as info:
        lookup_credential("quay.io")
    assert "boom" in str(info.value)
    assert SECRET not in str(info.value)


def test_cred_helper_garbage_output_never_quoted(env: Path) -> None:
    make_helper(env, mode="garbage", secret=SECRET)
    write_json(env / "home" / ".docker" / "config.json", {"credHelpers": {"quay.io": "test"}})
    with pytest.raises(AuthError, match=r"docker-credential-test.*malformed") as info:
        lookup_credential("quay.io")
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)


def test_cred_helper_missing_is_an_error(env: Path) -> None:
    write_json(env / "home" / ".docker" / "config.json", {"credHelpers": {"quay.io": "absent"}})
    with pytest.raises(AuthError, match="docker-credential-absent"):
        lookup_credential("quay.io")


def test_cred_helper_timeout(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(credentials, "HELPER_TIMEOUT", 0.5)
    make_helper(env, mode="sleep")
    write_json(env / "home" / ".docker" / "config.json", {"credHelpers": {"quay.io": "test"}})
    with pytest.raises(AuthError, match="docker-credential-test did not answer"):
        lookup_credential("quay.io")


def test_creds_store(env: Path) -> None:
    make_helper(env, creds={"ghcr.io": {"Username": "store", "Secret": SECRET}})
    write_json(
        env / "home" / ".docker" / "config.json",
        {"auths": {"ghcr.io": {}, "inline.io": {"auth": b64("inline", "p")}}, "credsStore": "test"},
    )
    assert lookup_credential("ghcr.io", "org/model") == Credential("store", SECRET)
    # Inline secrets win over the store, without running it.
    assert lookup_credential("inline.io") == Credential("inline", "p")
    assert helper_calls(env) == ["ghcr.io"]
    assert lookup_credential("unknown.io") is None


def test_creds_store_missing_helper_is_ignored(env: Path) -> None:
    write_json(
        env / "home" / ".docker" / "config.json",
        {"auths": {"https://index.docker.io/v1/": {}}, "credsStore": "desktop-not-installed"},
    )
    assert lookup_credential("docker.io") is None


def test_creds_store_failure_is_an_error(env: Path) -> None:
    make_helper(env, mode="fail")
    write_json(env / "home" / ".docker" / "config.json", {"credsStore": "test"})
    with pytest.raises(AuthError, match="credsStore"):
        lookup_credential("quay.io")


# ---------------------------------------------------------------------------------------------
# Secrets stay secret


def test_repr_hides_secrets() -> None:
    cred = Credential("alice", SECRET, TOKEN)
    for text in (repr(cred), str(cred), f"{cred}", repr([cred])):
        assert SECRET not in text and TOKEN not in text
        assert "alice" in text and "***" in text
    assert "***" not in repr(Credential("bob", "", None)).split("username")[0]


def test_lookup_logs_no_secrets(env: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_helper(env, creds={"quay.io": {"Username": "u", "Secret": SECRET}})
    write_json(
        env / "home" / ".docker" / "config.json",
        {
            "auths": {
                "a.io": {"auth": b64("u", SECRET)},
                "bad.io": {"auth": base64.b64encode(b"x").decode()},
            },
            "credHelpers": {"quay.io": "test"},
        },
    )
    caplog.set_level("DEBUG", logger="imagevol")
    lookup_credential("a.io")
    lookup_credential("quay.io")
    lookup_credential("bad.io")
    assert caplog.records
    assert SECRET not in caplog.text
