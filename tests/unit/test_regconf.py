"""registries.conf v2 parsing and matching, drop-ins, and certs.d discovery."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from imagevol.errors import EXIT_ERROR, ImagevolError, UsageError, exit_code_for
from imagevol.registry import regconf
from imagevol.registry.regconf import (
    BlockedRegistryError,
    Endpoint,
    RegistryConfig,
    cert_dirs,
    find_registry,
    is_insecure,
    load_registries_conf,
    match_prefix,
    pull_endpoints,
    search_registries,
    tls_material,
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolate from the host: fake HOME, system paths under tmp_path, no env override."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("CONTAINERS_REGISTRIES_CONF", raising=False)
    monkeypatch.setattr(regconf, "SYSTEM_REGISTRIES_CONF", tmp_path / "etc" / "registries.conf")
    monkeypatch.setattr(
        regconf,
        "SYSTEM_CERTS_DIRS",
        (tmp_path / "etc" / "containers-certs.d", tmp_path / "etc" / "docker-certs.d"),
    )
    return home


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def conf(tmp_path: Path, text: str) -> RegistryConfig:
    return load_registries_conf(str(write(tmp_path / "registries.conf", text)))


def pulls(config: RegistryConfig, repository: str, by_digest: bool) -> list[tuple[str, str]]:
    return [(e.location, r) for e, r in pull_endpoints(config, repository, by_digest=by_digest)]


# ---------------------------------------------------------------------------------------------
# Matching and rewriting

REWRITE_CONF = """
[[registry]]
prefix = "example.com/foo"
location = "internal.example.com/bar"

[[registry]]
location = "example.com"
insecure = true

[[registry]]
prefix = "docker.io/library"
location = "hub-cache.local:5000/library"

[[registry]]
prefix = "*.wild.io"
location = "wild-cache.local"

[[registry]]
prefix = "*.nolocation.io"
"""


@pytest.mark.parametrize(
    ("repository", "expected"),
    [
        ("example.com/foo/image", [("internal.example.com/bar", "internal.example.com/bar/image")]),
        ("example.com/foo", [("internal.example.com/bar", "internal.example.com/bar")]),
        ("example.com/foobar/image", [("example.com", "example.com/foobar/image")]),
        ("example.com/other", [("example.com", "example.com/other")]),
        ("example.com:5000/x", [("example.com:5000", "example.com:5000/x")]),
        (
            "docker.io/library/ubuntu",
            [("hub-cache.local:5000/library", "hub-cache.local:5000/library/ubuntu")],
        ),
        ("docker.io/someone/ubuntu", [("docker.io", "docker.io/someone/ubuntu")]),
        ("a.wild.io/ns/m", [("wild-cache.local", "wild-cache.local/ns/m")]),
        ("a.b.wild.io:443/ns/m", [("wild-cache.local", "wild-cache.local/ns/m")]),
        ("wild.io/ns/m", [("wild.io", "wild.io/ns/m")]),
        ("notwild.io/ns/m", [("notwild.io", "notwild.io/ns/m")]),
        ("x.nolocation.io/m", [("x.nolocation.io", "x.nolocation.io/m")]),
    ],
)
def test_prefix_rewrite(tmp_path: Path, repository: str, expected: list[tuple[str, str]]) -> None:
    config = conf(tmp_path, REWRITE_CONF)
    assert pulls(config, repository, by_digest=False) == expected


@pytest.mark.parametrize(
    ("prefix", "repository", "result"),
    [
        ("example.com", "example.com", 11),
        ("example.com", "example.com/a", 11),
        ("example.com", "example.com:5000/a", -1),
        ("example.com", "example.comx/a", -1),
        ("example.com/a", "example.com/a:tag", 13),
        ("example.com/a", "example.com/a@sha256:x", 13),
        ("example.com/a", "example.com/ab", -1),
        ("*.example.com", "a.example.com/x", 13),
        ("*.example.com", "a.example.com:5000/x", 18),
        ("*.example.com", "example.com/x", -1),
        ("*.example.com", "a.example.com.evil.org/x", -1),
        ("*.example.com", "evil.org/a.example.com/x", -1),
    ],
)
def test_match_prefix(prefix: str, repository: str, result: int) -> None:
    assert match_prefix(prefix, repository) == result


def test_longest_prefix_wins_over_wildcard_and_order(tmp_path: Path) -> None:
    config = conf(
        tmp_path,
        """
        [[registry]]
        prefix = "*.example.com"
        location = "wild"

        [[registry]]
        prefix = "a.example.com/ns/deep"
        location = "deep.local"

        [[registry]]
        prefix = "a.example.com/ns"
        location = "ns.local"
        """,
    )
    cases = {
        "a.example.com/ns/deep/x": "a.example.com/ns/deep",
        "a.example.com/ns/x": "a.example.com/ns",
        "a.example.com/other": "*.example.com",
        "b.example.com/ns/x": "*.example.com",
    }
    for repository, prefix in cases.items():
        reg = find_registry(config, repository)
        assert reg is not None and reg.prefix == prefix, repository
    assert find_registry(config, "quay.io/x") is None


def test_first_duplicate_prefix_wins_in_one_file(tmp_path: Path) -> None:
    config = conf(
        tmp_path,
        """
        [[registry]]
        prefix = "q.io"
        location = "first.local"

        [[registry]]
        prefix = "q.io"
        location = "second.local"
        """,
    )
    assert pulls(config, "q.io/x", by_digest=False) == [("first.local", "first.local/x")]


# ---------------------------------------------------------------------------------------------
# Mirrors

MIRROR_CONF = """
[[registry]]
prefix = "docker.io"
location = "registry-1.docker.io"

[[registry.mirror]]
location = "all.local/hub"

[[registry.mirror]]
location = "digest.local"
pull-from-mirror = "digest-only"

[[registry.mirror]]
location = "tag.local"
pull-from-mirror = "tag-only"
insecure = true

[[registry.mirror]]
location = "explicit-all.local"
pull-from-mirror = "all"

[[registry]]
location = "legacy.io"
mirror-by-digest-only = true

[[registry.mirror]]
location = "legacy-mirror.local"
"""


@pytest.mark.parametrize(
    ("repository", "by_digest", "expected"),
    [
        (
            "docker.io/library/ubuntu",
            False,
            [
                ("all.local/hub", "all.local/hub/library/ubuntu"),
                ("tag.local", "tag.local/library/ubuntu"),
                ("explicit-all.local", "explicit-all.local/library/ubuntu"),
                ("registry-1.docker.io", "registry-1.docker.io/library/ubuntu"),
            ],
        ),
        (
            "docker.io/library/ubuntu",
            True,
            [
                ("all.local/hub", "all.local/hub/library/ubuntu"),
                ("digest.local", "digest.local/library/ubuntu"),
                ("explicit-all.local", "explicit-all.local/library/ubuntu"),
                ("registry-1.docker.io", "registry-1.docker.io/library/ubuntu"),
            ],
        ),
        ("legacy.io/m", False, [("legacy.io", "legacy.io/m")]),
        (
            "legacy.io/m",
            True,
            [("legacy-mirror.local", "legacy-mirror.local/m"), ("legacy.io", "legacy.io/m")],
        ),
    ],
)
def test_mirror_order_and_pull_from_mirror(
    tmp_path: Path, repository: str, by_digest: bool, expected: list[tuple[str, str]]
) -> None:
    config = conf(tmp_path, MIRROR_CONF)
    assert pulls(config, repository, by_digest) == expected


def test_endpoint_flags(tmp_path: Path) -> None:
    config = conf(tmp_path, MIRROR_CONF)
    endpoints = [e for e, _ in pull_endpoints(config, "docker.io/library/ubuntu", by_digest=False)]
    assert endpoints[1] == Endpoint("tag.local", insecure=True, pull_from_mirror="tag-only", is_mirror=True)
    assert endpoints[-1] == Endpoint("registry-1.docker.io", insecure=False, pull_from_mirror="all", is_mirror=False)
    assert all(e.is_mirror for e in endpoints[:-1])
    legacy = pull_endpoints(config, "legacy.io/m", by_digest=True)
    assert legacy[0][0].pull_from_mirror == "digest-only"
    assert endpoints[0].host == "all.local"


def test_unconfigured_registry_is_its_own_endpoint() -> None:
    assert pull_endpoints(RegistryConfig(), "quay.io/ns/m", by_digest=True) == [(Endpoint("quay.io"), "quay.io/ns/m")]


# ---------------------------------------------------------------------------------------------
# Blocked and insecure


def test_blocked_registry(tmp_path: Path) -> None:
    config = conf(
        tmp_path,
        """
        [[registry]]
        location = "bad.io"
        blocked = true

        [[registry.mirror]]
        location = "mirror.local"

        [[registry]]
        prefix = "good.io/blocked-ns"
        location = "good.io/blocked-ns"
        blocked = true
        """,
    )
    for repository in ("bad.io/x", "good.io/blocked-ns/m"):
        for by_digest in (False, True):
            with pytest.raises(BlockedRegistryError) as info:
                pull_endpoints(config, repository, by_digest=by_digest)
            assert str(tmp_path / "registries.conf") in str(info.value)
            assert repository.rsplit("/", 1)[0] in str(info.value)
            assert isinstance(info.value, ImagevolError)
            assert exit_code_for(info.value) == EXIT_ERROR
    assert pulls(config, "good.io/ok", by_digest=False) == [("good.io", "good.io/ok")]


def test_insecure(tmp_path: Path) -> None:
    config = conf(
        tmp_path,
        """
        [[registry]]
        location = "plain.local:5000"
        insecure = true

        [[registry]]
        prefix = "docker.io"
        location = "docker.io"

        [[registry.mirror]]
        location = "http-mirror.local/hub"
        insecure = true

        [[registry]]
        prefix = "*.lab.internal"
        insecure = true
        """,
    )
    cases = {
        "plain.local:5000": True,
        "plain.local": False,
        "plain.local:5001": False,
        "docker.io": False,
        "http-mirror.local": True,
        "gpu1.lab.internal": True,
        "lab.internal": False,
        "quay.io": False,
    }
    for host, expected in cases.items():
        assert is_insecure(config, host) is expected, host


# ---------------------------------------------------------------------------------------------
# Files: default paths, env, drop-ins


def test_missing_default_file_is_empty_config(home: Path) -> None:
    config = load_registries_conf()
    assert config.registries == [] and config.unqualified_search_registries == []
    assert config.short_name_mode is None and config.sources == []


def test_missing_explicit_file_is_an_error(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match=r"nope\.conf"):
        load_registries_conf(str(tmp_path / "nope.conf"))
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(tmp_path / "env-nope.conf"))
    with pytest.raises(UsageError, match=r"env-nope\.conf"):
        load_registries_conf()


def test_env_variable_selects_file(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(regconf.SYSTEM_REGISTRIES_CONF, 'unqualified-search-registries = ["system.io"]\n')
    f = write(tmp_path / "custom.conf", 'unqualified-search-registries = ["env.io"]\n')
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(f))
    assert search_registries(load_registries_conf()) == ["env.io"]
    monkeypatch.delenv("CONTAINERS_REGISTRIES_CONF")
    assert search_registries(load_registries_conf()) == ["system.io"]


def test_user_file_replaces_system_file(home: Path) -> None:
    write(regconf.SYSTEM_REGISTRIES_CONF, 'unqualified-search-registries = ["system.io"]\n')
    write(Path(f"{regconf.SYSTEM_REGISTRIES_CONF}.d") / "10-sys.conf", 'short-name-mode = "disabled"\n')
    write(home / ".config/containers/registries.conf", 'unqualified-search-registries = ["user.io"]\n')
    config = load_registries_conf()
    assert search_registries(config) == ["user.io"]
    assert config.short_name_mode is None


def test_system_file_with_system_and_user_dropins(home: Path) -> None:
    system = regconf.SYSTEM_REGISTRIES_CONF
    write(system, 'unqualified-search-registries = ["system.io"]\nshort-name-mode = "enforcing"\n')
    write(Path(f"{system}.d") / "10-a.conf", 'short-name-mode = "permissive"\n')
    write(home / ".config/containers/registries.conf.d" / "00-user.conf", 'short-name-mode = "disabled"\n')
    config = load_registries_conf()
    assert config.short_name_mode == "disabled"
    assert config.sources[0] == system and len(config.sources) == 3


def test_dropins_override_in_name_order(tmp_path: Path) -> None:
    main = write(
        tmp_path / "registries.conf",
        """
        unqualified-search-registries = ["docker.io", "quay.io"]
        short-name-mode = "enforcing"

        [[registry]]
        location = "q.io"

        [[registry]]
        location = "keep.io"
        insecure = true

        [aliases]
        "ubuntu" = "docker.io/library/ubuntu"
        """,
    )
    d = tmp_path / "registries.conf.d"
    write(
        d / "20-second.conf",
        """
        unqualified-search-registries = ["second.io"]

        [[registry]]
        location = "q.io"

        [[registry.mirror]]
        location = "second-mirror.local"
        """,
    )
    write(
        d / "10-first.conf",
        """
        unqualified-search-registries = ["first.io"]
        short-name-mode = "permissive"

        [[registry]]
        location = "q.io"
        blocked = true

        [aliases]
        "llama" = "ghcr.io/org/llama"
        """,
    )
    write(d / "30-ignored.conf.bak", "this is not toml [[[")
    (d / "40-dir.conf").mkdir()
    config = load_registries_conf(str(main))
    assert config.sources == [main, d / "10-first.conf", d / "20-second.conf"]
    assert search_registries(config) == ["second.io"]
    assert config.short_name_mode == "permissive"
    assert config.aliases == {"ubuntu": "docker.io/library/ubuntu", "llama": "ghcr.io/org/llama"}
    assert pulls(config, "q.io/m", by_digest=False) == [
        ("second-mirror.local", "second-mirror.local/m"),
        ("q.io", "q.io/m"),
    ]
    assert is_insecure(config, "keep.io")
    assert [r.prefix for r in config.registries] == ["keep.io", "q.io"]
    reg = find_registry(config, "q.io/m")
    assert reg is not None and reg.source == d / "20-second.conf"


def test_search_registries_copy_and_normalization(tmp_path: Path) -> None:
    config = conf(tmp_path, 'unqualified-search-registries = ["docker.io/", "localhost:5000", "[::1]:5000"]\n')
    got = search_registries(config)
    assert got == ["docker.io", "localhost:5000", "[::1]:5000"]
    got.append("x")
    assert search_registries(config) == ["docker.io", "localhost:5000", "[::1]:5000"]


# ---------------------------------------------------------------------------------------------
# Refused configurations


def test_v1_format_refused_with_hint(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="v1") as info:
        conf(
            tmp_path,
            """
            [registries.search]
            registries = ["docker.io"]

            [registries.insecure]
            registries = ["plain.local"]
            """,
        )
    assert str(tmp_path / "registries.conf") in str(info.value)
    assert info.value.hint and "unqualified-search-registries" in info.value.hint


def test_bad_toml_names_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        conf(tmp_path, '[[registry]]\nlocation = "a.io"\ninsecure = yes\n')
    message = str(info.value)
    assert str(tmp_path / "registries.conf") in message and "line 3" in message


def test_bad_dropin_names_dropin(tmp_path: Path) -> None:
    main = write(tmp_path / "registries.conf", "")
    bad = write(tmp_path / "registries.conf.d" / "50-bad.conf", "[[registry]]\nlocation = 5\n")
    with pytest.raises(UsageError, match=r"registry\[0\]\.location") as info:
        load_registries_conf(str(main))
    assert str(bad) in str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[[registry]]\nlocation = "https://a.io"\n', "registry[0].location"),
        ('[[registry]]\nprefix = "a.io"\nlocation = "http://b.io"\n', "registry[0].location"),
        ("[[registry]]\ninsecure = true\n", "registry[0]"),
        ('[[registry]]\nprefix = "a.io/x"\n', "registry[0].location"),
        ('[[registry]]\nprefix = "*.a.io/x"\n', "registry[0].prefix"),
        ('[[registry]]\nprefix = "*.a.io:5000"\n', "registry[0].prefix"),
        ('[[registry]]\nprefix = "a.*.io"\nlocation = "a.io"\n', "registry[0].prefix"),
        ('[[registry]]\nlocation = "a.io"\ninsecure = "yes"\n', "registry[0].insecure"),
        ('[[registry]]\nlocation = "a.io"\nblocked = 1\n', "registry[0].blocked"),
        ('[[registry]]\nlocation = "a.io"\npull-from-mirror = "all"\n', "registry[0].pull-from-mirror"),
        ('[[registry]]\nlocation = "bad host"\n', "registry[0].location"),
        ('[[registry]]\nlocation = "a.io//x"\n', "registry[0].location"),
        (
            '[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\ninsecure = true\n',
            "registry[0].mirror[0].location",
        ),
        (
            '[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\nlocation = "m"\npull-from-mirror = "some"\n',
            "registry[0].mirror[0].pull-from-mirror",
        ),
        (
            '[[registry]]\nlocation = "a.io"\nmirror-by-digest-only = true\n'
            '[[registry.mirror]]\nlocation = "m"\npull-from-mirror = "tag-only"\n',
            "registry[0].mirror[0].pull-from-mirror",
        ),
        (
            '[[registry]]\nlocation = "a.io"\ninsecure = true\n[[registry]]\nprefix = "b.io"\nlocation = "a.io"\n',
            "registry[1].insecure",
        ),
        (
            '[[registry]]\nlocation = "a.io"\n[[registry]]\nprefix = "c.io"\nlocation = "a.io"\nblocked = true\n',
            "registry[1].blocked",
        ),
        ('[registry]\nlocation = "a.io"\n', "registry"),
        ('unqualified-search-registries = "docker.io"\n', "unqualified-search-registries"),
        ('unqualified-search-registries = ["https://docker.io"]\n', "unqualified-search-registries[0]"),
        ('unqualified-search-registries = ["docker.io/library"]\n', "unqualified-search-registries[0]"),
        ("unqualified-search-registries = [1]\n", "unqualified-search-registries[0]"),
        ('short-name-mode = "prompt"\n', "short-name-mode"),
        ("[aliases]\nx = 1\n", "aliases.x"),
    ],
)
def test_validation_errors_name_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(UsageError) as info:
        conf(tmp_path, text)
    message = str(info.value)
    assert str(tmp_path / "registries.conf") in message
    assert f": {key}:" in message, message


def test_unknown_keys_are_ignored(tmp_path: Path) -> None:
    config = conf(
        tmp_path,
        """
        credential-helpers = ["containers-auth.json"]
        future-key = 1

        [[registry]]
        location = "a.io"
        future = true
        """,
    )
    assert [r.location for r in config.registries] == ["a.io"]


# ---------------------------------------------------------------------------------------------
# certs.d


def test_cert_dirs_order_and_existence(tmp_path: Path, home: Path) -> None:
    host = "reg.local:5000"
    containers_d, docker_d = regconf.SYSTEM_CERTS_DIRS
    assert cert_dirs(host) == []
    (docker_d / host).mkdir(parents=True)
    (containers_d / host).mkdir(parents=True)
    assert cert_dirs(host) == [containers_d / host, docker_d / host]
    user = home / ".config" / "containers" / "certs.d" / host
    user.mkdir(parents=True)
    extra = tmp_path / "extra"
    (extra / host).mkdir(parents=True)
    assert cert_dirs(host, extra=[str(extra), str(tmp_path / "absent")]) == [
        extra / host,
        user,
        containers_d / host,
        docker_d / host,
    ]
    assert cert_dirs("other.local") == []


@pytest.mark.parametrize("host", ["", "..", "a/b", "../etc"])
def test_cert_dirs_rejects_path_like_hosts(home: Path, host: str) -> None:
    with pytest.raises(UsageError):
        cert_dirs(host)


def test_tls_material(home: Path) -> None:
    host = "reg.local"
    d = regconf.SYSTEM_CERTS_DIRS[1] / host
    d.mkdir(parents=True)
    for name in ("ca.crt", "b-extra.crt", "client.cert", "client.key", "README"):
        (d / name).write_text("x")
    material = tls_material(host)
    assert material.directory == d
    assert material.ca_files == [d / "b-extra.crt", d / "ca.crt"]
    assert material.client_pairs == [(d / "client.cert", d / "client.key")]
    assert tls_material("none.local") == regconf.TLSMaterial()


def test_tls_material_first_directory_only(home: Path) -> None:
    host = "reg.local"
    first = regconf.SYSTEM_CERTS_DIRS[0] / host
    second = regconf.SYSTEM_CERTS_DIRS[1] / host
    for d in (first, second):
        d.mkdir(parents=True)
        (d / f"{d.parent.name}.crt").write_text("x")
    assert tls_material(host).ca_files == [first / "containers-certs.d.crt"]


@pytest.mark.parametrize(
    ("files", "match"),
    [
        (["client.cert"], "client.cert has no key client.key"),
        (["client.key"], "client.key has no client certificate client.cert"),
    ],
)
def test_tls_material_unpaired(tmp_path: Path, home: Path, files: list[str], match: str) -> None:
    d = tmp_path / "certs"
    d.mkdir()
    for name in files:
        (d / name).write_text("x")
    with pytest.raises(UsageError, match=match):
        tls_material("reg.local", certs_dir=str(d))


def test_tls_material_explicit_dir(tmp_path: Path, home: Path) -> None:
    d = tmp_path / "mycerts"
    d.mkdir()
    (d / "ca.crt").write_text("x")
    assert tls_material("anything", certs_dir=str(d)).ca_files == [d / "ca.crt"]
    with pytest.raises(UsageError, match="missing-dir"):
        tls_material("anything", certs_dir=str(tmp_path / "missing-dir"))


# ---------------------------------------------------------------------------------------------
# The `ns` query parameter sent to mirrors (containerd's convention)


def test_mirrors_get_the_reference_registry_as_ns(tmp_path: Path) -> None:
    from imagevol.reference import parse_reference
    from imagevol.registry.client import RegistryClient, RegistryEndpoint
    from imagevol.registry.transport import RegistryOptions, Transport
    from imagevol.sources.factory import pull_hosts, registry_endpoints

    conf = tmp_path / "registries.conf"
    conf.write_text(
        textwrap.dedent(
            """
            [[registry]]
            prefix = "docker.io"
            location = "docker.io"
            [[registry.mirror]]
            location = "127.0.0.1:30020"
            insecure = true
            [[registry.mirror]]
            location = "registry-1.docker.io/hub"
            [[registry]]
            prefix = "ghcr.io/models"
            location = "ghcr.io/models"
            [[registry.mirror]]
            location = "cache.example.com/ghcr"
            """
        )
    )
    # Endpoints only: nothing here opens a connection.
    options = RegistryOptions(registries_conf=str(conf))
    hub, insecure = pull_hosts(parse_reference("index.docker.io/library/ubuntu:24.04"), options)
    assert hub == [
        RegistryEndpoint("127.0.0.1:30020", "library/ubuntu", "docker.io"),  # Docker Hub is docker.io
        RegistryEndpoint("registry-1.docker.io", "hub/library/ubuntu", None),  # on the registry's own host
        RegistryEndpoint("registry-1.docker.io", "library/ubuntu", None),  # the registry itself
    ]
    assert insecure == frozenset({"127.0.0.1:30020"})
    ghcr, _ = pull_hosts(parse_reference("ghcr.io/models/llama@sha256:" + "a" * 64), options)
    assert [e.namespace for e in ghcr] == ["ghcr.io", None]
    # Without registries.conf entries: the registry alone, no `ns`.
    (own,), _ = pull_hosts(parse_reference("quay.io/a/b:c"), options)
    assert own == RegistryEndpoint("quay.io", "a/b", None)
    # The older pair form (used by the push side) is unchanged.
    assert registry_endpoints(parse_reference("ghcr.io/models/m:v1"), options)[0] == [
        ("cache.example.com", "ghcr/m"),
        ("ghcr.io", "models/m"),
    ]
    # The query goes on every URL of a mirror client (after a query the path has), and nowhere
    # else. (Hosts neither insecure nor loopback are https without a probe: no connection.)
    t = Transport(RegistryOptions())
    mirror = RegistryClient(t, "cache.example.com", "library/ubuntu", namespace="docker.io")
    assert mirror.url("manifests/24.04") == "https://cache.example.com/v2/library/ubuntu/manifests/24.04?ns=docker.io"
    assert mirror.url("blobs/uploads/?digest=x").endswith("/blobs/uploads/?digest=x&ns=docker.io")
    port = RegistryClient(t, "cache.example.com", "m", namespace="localhost:5000")
    assert port.url("blobs/sha256:00").endswith("?ns=localhost%3A5000")  # encoded as containerd does
    assert "ns=" not in RegistryClient(t, "ghcr.io", "models/m").url("manifests/v1")
