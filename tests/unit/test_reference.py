"""Table tests for imagevol.reference: SPEC vectors plus distribution/reference's test vectors."""

from __future__ import annotations

import pytest

from imagevol.digest import Digest
from imagevol.errors import EXIT_USAGE, InvalidReferenceError, UsageError
from imagevol.reference import (
    LayoutReference,
    Reference,
    parse_any,
    parse_layout_reference,
    parse_reference,
)

F64 = "f" * 64
D = f"sha256:{F64}"
D2 = "sha256:dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c"
D3 = "sha256:e6693c20186f837fc393390135d8a598a96a833917917789d63766cab6c59582"
D512 = "sha512:" + "a" * 128
HEX64 = "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a"


# (input, domain, path, tag, digest) -- parse_reference with the default tag "latest".
NORMALIZE = [
    # SPEC
    ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
    ("test.com:5000", "docker.io", "library/test.com", "5000", None),
    ("[2001:db8::1]:5000/repo", "[2001:db8::1]:5000", "repo", "latest", None),
    # distribution/reference TestReferenceParse, normalized
    ("test_com", "docker.io", "library/test_com", "latest", None),
    ("test.com:tag", "docker.io", "library/test.com", "tag", None),
    ("test.com/repo:tag", "test.com", "repo", "tag", None),
    ("test:5000/repo", "test:5000", "repo", "latest", None),
    ("test:5000/repo:tag", "test:5000", "repo", "tag", None),
    (f"test:5000/repo@{D}", "test:5000", "repo", None, D),
    (f"test:5000/repo:tag@{D}", "test:5000", "repo", "tag", D),
    ("lowercase:Uppercase", "docker.io", "library/lowercase", "Uppercase", None),
    ("sub-dom1.foo.com/bar/baz/quux", "sub-dom1.foo.com", "bar/baz/quux", "latest", None),
    (
        "sub-dom1.foo.com/bar/baz/quux:some-long-tag",
        "sub-dom1.foo.com",
        "bar/baz/quux",
        "some-long-tag",
        None,
    ),
    (
        "b.gcr.io/test.example.com/my-app:test.example.com",
        "b.gcr.io",
        "test.example.com/my-app",
        "test.example.com",
        None,
    ),
    ("xn--n3h.com/myimage:xn--n3h.com", "xn--n3h.com", "myimage", "xn--n3h.com", None),
    (f"xn--7o8h.com/myimage:xn--7o8h.com@{D}", "xn--7o8h.com", "myimage", "xn--7o8h.com", D),
    ("foo_bar.com:8080", "docker.io", "library/foo_bar.com", "8080", None),
    ("foo/foo_bar.com:8080", "docker.io", "foo/foo_bar.com", "8080", None),
    ("192.168.1.1", "docker.io", "library/192.168.1.1", "latest", None),
    ("192.168.1.1:tag", "docker.io", "library/192.168.1.1", "tag", None),
    ("192.168.1.1:5000", "docker.io", "library/192.168.1.1", "5000", None),
    ("192.168.1.1/repo", "192.168.1.1", "repo", "latest", None),
    ("192.168.1.1:5000/repo", "192.168.1.1:5000", "repo", "latest", None),
    ("192.168.1.1:5000/repo:5050", "192.168.1.1:5000", "repo", "5050", None),
    ("[2001:db8::1]/repo", "[2001:db8::1]", "repo", "latest", None),
    ("[2001:db8:1:2:3:4:5:6]/repo:tag", "[2001:db8:1:2:3:4:5:6]", "repo", "tag", None),
    ("[2001:db8::1]:5000/repo:tag", "[2001:db8::1]:5000", "repo", "tag", None),
    (f"[2001:db8::1]:5000/repo@{D}", "[2001:db8::1]:5000", "repo", None, D),
    (f"[2001:db8::1]:5000/repo:tag@{D}", "[2001:db8::1]:5000", "repo", "tag", D),
    ("[2001:db8::]:5000/repo", "[2001:db8::]:5000", "repo", "latest", None),
    ("[::1]:5000/repo", "[::1]:5000", "repo", "latest", None),
    (
        "[2001:0db8:85a3:0000:0000:8a2e:0370:7334]:5000/r",
        "[2001:0db8:85a3:0000:0000:8a2e:0370:7334]:5000",
        "r",
        "latest",
        None,
    ),
    # TestNormalizedSplitHostname / TestParseRepositoryInfo
    ("test.com/foo", "test.com", "foo", "latest", None),
    ("test_com/foo", "docker.io", "test_com/foo", "latest", None),
    ("docker/migrator", "docker.io", "docker/migrator", "latest", None),
    ("test.com:8080/foo", "test.com:8080", "foo", "latest", None),
    ("test-com:8080/foo", "test-com:8080", "foo", "latest", None),
    ("foo", "docker.io", "library/foo", "latest", None),
    ("xn--n3h.com/foo", "xn--n3h.com", "foo", "latest", None),
    ("xn--n3h.com:18080/foo", "xn--n3h.com:18080", "foo", "latest", None),
    ("docker.io/foo", "docker.io", "library/foo", "latest", None),
    ("docker.io/library/foo", "docker.io", "library/foo", "latest", None),
    ("docker.io/library/foo/bar", "docker.io", "library/foo/bar", "latest", None),
    ("localhost/fooo", "localhost", "fooo", "latest", None),
    ("localhost/fooo/bar", "localhost", "fooo/bar", "latest", None),
    ("LOCALDOMAIN/fooo", "LOCALDOMAIN", "fooo", "latest", None),
    ("LOCALDOMAIN/fooo/bar", "LOCALDOMAIN", "fooo/bar", "latest", None),
    ("fooo/bar", "docker.io", "fooo/bar", "latest", None),
    ("index.docker.io/fooo/bar", "docker.io", "fooo/bar", "latest", None),
    ("library/ubuntu", "docker.io", "library/ubuntu", "latest", None),
    ("nonlibrary/ubuntu", "docker.io", "nonlibrary/ubuntu", "latest", None),
    ("other/library", "docker.io", "other/library", "latest", None),
    ("127.0.0.1:8000/private/moonbase", "127.0.0.1:8000", "private/moonbase", "latest", None),
    ("127.0.0.1:8000/privatebase", "127.0.0.1:8000", "privatebase", "latest", None),
    ("example.com/private/moonbase", "example.com", "private/moonbase", "latest", None),
    ("example.com:8000/privatebasee", "example.com:8000", "privatebasee", "latest", None),
    ("ubuntu-12.04-base", "docker.io", "library/ubuntu-12.04-base", "latest", None),
    ("index.docker.io/library/ubuntu-12.04-base", "docker.io", "library/ubuntu-12.04-base", "latest", None),
    ("store/foo/bar", "docker.io", "store/foo/bar", "latest", None),
    ("Foo/bar", "Foo", "bar", "latest", None),
    ("FOO/bar", "FOO", "bar", "latest", None),
    ("Docker/docker", "Docker", "docker", "latest", None),
    ("Uppercase/lowercase:tag", "Uppercase", "lowercase", "tag", None),
    ("Asdf.com/foo/bar", "Asdf.com", "foo/bar", "latest", None),
    # TestParseAnyReference / TestParseDockerRef (tag and digest both kept)
    ("redis", "docker.io", "library/redis", "latest", None),
    (f"redis@{D2}", "docker.io", "library/redis", None, D2),
    (f"dmcgowan/myapp@{D2}", "docker.io", "dmcgowan/myapp", None, D2),
    ("docker.io/mcgowan/myapp:latest", "docker.io", "mcgowan/myapp", "latest", None),
    (HEX64[:-1], "docker.io", "library/" + HEX64[:-1], "latest", None),
    ("dbcc1", "docker.io", "library/dbcc1", "latest", None),
    (f"docker.io/{HEX64}", "docker.io", f"library/{HEX64}", "latest", None),
    (f"{HEX64}:v1", "docker.io", f"library/{HEX64}", "v1", None),
    (f"busybox:latest@{D3}", "docker.io", "library/busybox", "latest", D3),
    (f"gcr.io/library/busybox:latest@{D3}", "gcr.io", "library/busybox", "latest", D3),
    ("gcr.io/library/busybox", "gcr.io", "library/busybox", "latest", None),
    # TestValidateRemoteName and friends
    ("docker-rules/docker", "docker.io", "docker-rules/docker", "latest", None),
    ("docker---rules/docker", "docker.io", "docker---rules/docker", "latest", None),
    ("d/docker", "docker.io", "d/docker", "latest", None),
    ("jess/t", "docker.io", "jess/t", "latest", None),
    ("dock__er/docker", "docker.io", "dock__er/docker", "latest", None),
    (
        "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
        "docker.io",
        "library/thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
        "latest",
        None,
    ),
    (
        "registry.io/foo/project--id.module--name.ver---sion--name",
        "registry.io",
        "foo/project--id.module--name.ver---sion--name",
        "latest",
        None,
    ),
    (
        "example.com/some_separator__underscore/myimage",
        "example.com",
        "some_separator__underscore/myimage",
        "latest",
        None,
    ),
    ("example.com/xn--7o8h.com/myimage", "example.com", "xn--7o8h.com/myimage", "latest", None),
    ("localhost:8080/name", "localhost:8080", "name", "latest", None),
    ("localhost:8080", "docker.io", "library/localhost", "8080", None),
    (f"localhost@{D}", "docker.io", "library/localhost", None, D),
    ("localhost", "docker.io", "library/localhost", "latest", None),
    ("192.168.0.1:8/debian", "192.168.0.1:8", "debian", "latest", None),
    ("192.168.0.2:25000/debian", "192.168.0.2:25000", "debian", "latest", None),
    ("[fc00::1]:5000/docker/docker", "[fc00::1]:5000", "docker/docker", "latest", None),
    (
        "[fc00:1:2:3:4:5:6:7]:5000/library/debian",
        "[fc00:1:2:3:4:5:6:7]:5000",
        "library/debian",
        "latest",
        None,
    ),
    ("a/a/a/a", "docker.io", "a/a/a/a", "latest", None),
    (
        "aa/aa/aa/aa/aa/aa/aa/aa/aa/bb/bb/bb/bb/bb/bb",
        "docker.io",
        "aa/aa/aa/aa/aa/aa/aa/aa/aa/bb/bb/bb/bb/bb/bb",
        "latest",
        None,
    ),
    ("registry.com:8080/myapp:tag", "registry.com:8080", "myapp", "tag", None),
    (f"registry.com:8080/myapp:tag2@{D}", "registry.com:8080", "myapp", "tag2", D),
    ("quay.io/org/app:_under", "quay.io", "org/app", "_under", None),
    ("quay.io/org/app:v1.2.3-rc.1_b", "quay.io", "org/app", "v1.2.3-rc.1_b", None),
    (f"ghcr.io/o/r@{D512}", "ghcr.io", "o/r", None, D512),
    ("localhost:65535/x", "localhost:65535", "x", "latest", None),
    ("my-registry:1/x", "my-registry:1", "x", "latest", None),
]


@pytest.mark.parametrize(("text", "domain", "path", "tag", "digest"), NORMALIZE)
def test_normalize(text: str, domain: str, path: str, tag: str | None, digest: str | None) -> None:
    ref = parse_reference(text)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == (domain, path, tag, digest)
    assert ref.repository == ref.name == f"{domain}/{path}"
    assert isinstance(ref.digest, Digest) or ref.digest is None
    # The canonical string parses back to the same reference, as does the familiar form.
    assert parse_reference(str(ref)) == ref
    assert parse_reference(ref.familiar()) == ref
    assert parse_any(str(ref)) == ref
    assert parse_any(f"docker://{text}") == ref


# (input, canonical string, familiar string)
CANONICAL = [
    ("ubuntu", "docker.io/library/ubuntu:latest", "ubuntu:latest"),
    ("ubuntu:22.04", "docker.io/library/ubuntu:22.04", "ubuntu:22.04"),
    ("docker.io/library/redis:latest", "docker.io/library/redis:latest", "redis:latest"),
    ("index.docker.io/library/redis", "docker.io/library/redis:latest", "redis:latest"),
    ("dmcgowan/myapp", "docker.io/dmcgowan/myapp:latest", "dmcgowan/myapp:latest"),
    ("docker.io/dmcgowan/myapp", "docker.io/dmcgowan/myapp:latest", "dmcgowan/myapp:latest"),
    (f"redis@{D2}", f"docker.io/library/redis@{D2}", f"redis@{D2}"),
    (f"dmcgowan/myapp@{D2}", f"docker.io/dmcgowan/myapp@{D2}", f"dmcgowan/myapp@{D2}"),
    (f"busybox:latest@{D}", f"docker.io/library/busybox:latest@{D}", f"busybox:latest@{D}"),
    ("library/foo/bar", "docker.io/library/foo/bar:latest", "library/foo/bar:latest"),
    ("store/foo/bar", "docker.io/store/foo/bar:latest", "store/foo/bar:latest"),
    ("other/library", "docker.io/other/library:latest", "other/library:latest"),
    ("localhost/fooo", "localhost/fooo:latest", "localhost/fooo:latest"),
    ("LOCALDOMAIN/fooo/bar", "LOCALDOMAIN/fooo/bar:latest", "LOCALDOMAIN/fooo/bar:latest"),
    (
        "example.com:8000/private/moonbase",
        "example.com:8000/private/moonbase:latest",
        "example.com:8000/private/moonbase:latest",
    ),
    ("127.0.0.1:8000/privatebase", "127.0.0.1:8000/privatebase:latest", "127.0.0.1:8000/privatebase:latest"),
    ("FOO/bar", "FOO/bar:latest", "FOO/bar:latest"),
    ("ghcr.io/org/model:v1", "ghcr.io/org/model:v1", "ghcr.io/org/model:v1"),
    ("[::1]:5000/repo:t", "[::1]:5000/repo:t", "[::1]:5000/repo:t"),
    ("test.com:5000", "docker.io/library/test.com:5000", "test.com:5000"),
    # Dropping docker.io would turn the first component into a domain; familiar() keeps it.
    ("docker.io/foo.bar/baz", "docker.io/foo.bar/baz:latest", "docker.io/foo.bar/baz:latest"),
    ("docker.io/localhost/baz", "docker.io/localhost/baz:latest", "docker.io/localhost/baz:latest"),
    ("docker.io/library/foo.bar", "docker.io/library/foo.bar:latest", "foo.bar:latest"),
]


@pytest.mark.parametrize(("text", "canonical", "familiar"), CANONICAL)
def test_canonical_and_familiar(text: str, canonical: str, familiar: str) -> None:
    ref = parse_reference(text)
    assert str(ref) == canonical
    assert ref.familiar() == familiar
    assert parse_reference(familiar) == ref


@pytest.mark.parametrize(
    ("text", "familiar_name"),
    [
        ("ubuntu", "ubuntu"),
        ("docker.io/library/ubuntu-12.04-base", "ubuntu-12.04-base"),
        ("library/foo/bar", "library/foo/bar"),
        ("fooo/bar", "fooo/bar"),
        ("quay.io/a/b", "quay.io/a/b"),
    ],
)
def test_familiar_name(text: str, familiar_name: str) -> None:
    assert parse_reference(text).familiar_name == familiar_name


# (input, substring the message must contain). Every message names the input.
INVALID = [
    # SPEC
    ("[fe80::1%eth0]:5000/repo", 'domain "[fe80::1%eth0]:5000" is invalid'),
    ("Uppercase:tag", "repository name must be lowercase"),
    ("docker///docker", "empty component"),
    ("-docker", 'path component "-docker" is invalid'),
    ("dock..er/docker", 'domain "dock..er" is invalid'),
    (HEX64, "64-hex name looks like an image ID; use @sha256:<hex> to pin a digest"),
    ("", "empty reference"),
    ("ubuntu:", "empty tag"),
    # distribution/reference TestValidateReferenceName / TestValidateRemoteName
    ("https://github.com/docker/docker", 'domain "https:" is invalid'),
    ("docker/Docker", "repository name must be lowercase"),
    ("-docker/docker", 'path component "-docker" is invalid'),
    ("-docker.io/docker/docker", 'domain "-docker.io" is invalid'),
    ("docker.io/docker/Docker", "repository name must be lowercase"),
    ("docker.io/docker///docker", "empty component"),
    ("[fc00::1]", "registry host without a repository path"),
    ("[fc00::1]:5000", "registry host without a repository path"),
    ("fc00::1:5000/debian", "must be in brackets"),
    ("[fe80::1%eth0]:5000/debian", "zone"),
    ("[2001:db8:3:4::192.0.2.33]:5000/debian", 'domain "[2001:db8:3:4::192.0.2.33]:5000" is invalid'),
    ("docker-/docker", 'path component "docker-" is invalid'),
    ("-docker-/docker", 'path component "-docker-" is invalid'),
    ("____/____", 'path component "____" is invalid'),
    ("_docker/_docker", 'path component "_docker" is invalid'),
    ("dock_.er/docker", 'domain "dock_.er" is invalid'),
    ("dock-.er/docker", 'domain "dock-.er" is invalid'),
    ("docker/", "empty component"),
    ("docker.io/", "missing repository path"),
    ("localhost/", "missing repository path"),
    # TestReferenceParse
    (":justtag", "missing repository name"),
    (f"@{D}", "missing repository name"),
    ("repo@sha256:" + "f" * 34, "invalid digest"),
    (f"validname@invaliddigest:{F64}", "invalid digest"),
    ("validname@sha256:" + "F" * 64, "invalid digest"),
    ("validname@sha256:" + "f" * 65, "invalid digest"),
    ("validname@sha512:" + "f" * 64, "invalid digest"),
    ("validname@md5:" + "f" * 32, "invalid digest"),
    ("repo@", "invalid digest"),
    (f"repo@{D}@{D}", "invalid digest"),
    ("test:5000/Uppercase/lowercase:tag", "repository name must be lowercase"),
    ("aa/asdf$$^/aa", 'path component "asdf$$^" is invalid'),
    ("[2001:db8::1]", "registry host without a repository path"),
    ("[2001:db8::1]:5000", "registry host without a repository path"),
    ("[2001:db8::1]:tag", "registry host without a repository path"),
    ("[fe80::1%@invalidzone]:5000/repo", "invalid"),
    # regexp_test.go
    ("a^a", 'path component "a^a" is invalid'),
    ("a/a/a/a/", "empty component"),
    ("a//a/a", "empty component"),
    ("foo.com/", "missing repository path"),
    ("foo.com:http/bar", "port must be a number"),
    ("a-/a/a/a", 'path component "a-" is invalid'),
    ("foo.com/a-/a/a", 'path component "a-" is invalid'),
    ("foo/bar-", 'path component "bar-" is invalid'),
    ("foo/-bar", 'path component "-bar" is invalid'),
    ("foo_bar.com:8080/app", 'domain "foo_bar.com:8080" is invalid'),
    ("docker_/docker_", 'path component "docker_" is invalid'),
    ("example.com/__underscore/myimage", 'path component "__underscore" is invalid'),
    ("example.com/..dots/myimage", 'path component "..dots" is invalid'),
    ("example.com/.dots/myimage", 'path component ".dots" is invalid'),
    ("example.com/nodouble..dots/myimage", 'path component "nodouble..dots" is invalid'),
    ("docker./docker", 'domain "docker." is invalid'),
    (".docker/docker", 'domain ".docker" is invalid'),
    ("do..cker/docker", 'domain "do..cker" is invalid'),
    ("do__cker:8080/docker", 'domain "do__cker:8080" is invalid'),
    ("Foo/FarB", "repository name must be lowercase"),
    ("registry.com:8080/myapp@sha256:badbadbadbad", "invalid digest"),
    ("registry.com:8080/myapp:invalid~tag", 'tag "invalid~tag" is invalid'),
    ("bad_hostname.com:8080/myapp:tag", 'domain "bad_hostname.com:8080" is invalid'),
    ("localhost:http/name@" + D, 'domain "localhost:http" is invalid'),
    ("registry.com:8080/myapp@bad", "invalid digest"),
    ("registry.com:8080/myapp@2bad", "invalid digest"),
    ("[fd00:1:2::3]75050/x", "expected ':port' after ']'"),
    ("[fd00:1:2::3]::75050/x", "port must be a number"),
    ("[fd00123123123]:5000/x", "not a valid IPv6 address"),
    ("192.168.1.1:75050/x", "port must be 1-65535"),
    ("localhost:0/x", "port must be 1-65535"),
    ("[::1:5000/x", "'[' without ']'"),
    ("[::ffff:1.2.3.4]:5000/x", "bracketed host must be an IPv6 address"),
    # tags
    ("ubuntu:-x", 'tag "-x" is invalid: tags are up to 128 chars of [A-Za-z0-9_.-] not starting with . or -'),
    ("ubuntu:.x", 'tag ".x" is invalid'),
    ("ubuntu:a+b", 'tag "a+b" is invalid'),
    ("ubuntu:a/b", 'domain "ubuntu:a" is invalid: the port must be a number'),
    ("ubuntu:tag:", "empty tag"),
    ("ubuntu:t\u00e4g", "is invalid"),
    # whitespace, control and odd characters
    ("ubuntu ", 'path component "ubuntu "'),
    (" ubuntu", 'path component " ubuntu"'),
    ("ubuntu\n", 'path component "ubuntu\\n"'),
    ("ubuntu:latest\n", 'tag "latest\\n" is invalid'),
    ("ub\u00fcntu", 'path component "ub\\u00fcntu"'),
    ("a:b:c", 'path component "a:b" is invalid'),
    ("docker://ubuntu", 'domain "docker:" is invalid'),
    ("oci:/tmp/x", "invalid"),
]


@pytest.mark.parametrize(("text", "needle"), INVALID)
def test_invalid(text: str, needle: str) -> None:
    with pytest.raises(InvalidReferenceError) as info:
        parse_reference(text)
    msg = str(info.value)
    assert needle in msg
    assert msg.startswith("invalid reference ")


def test_error_names_input_and_is_a_usage_error() -> None:
    with pytest.raises(InvalidReferenceError) as info:
        parse_reference("Foo:tag")
    err = info.value
    assert str(err) == 'invalid reference "Foo:tag": repository name must be lowercase ("Foo")'
    assert err.hint
    assert isinstance(err, UsageError)
    assert err.exit_code == EXIT_USAGE


def test_scheme_hint() -> None:
    with pytest.raises(InvalidReferenceError) as info:
        parse_reference("https://ghcr.io/org/repo")
    assert info.value.hint is not None and "scheme" in info.value.hint


def test_digest_error_has_hint() -> None:
    with pytest.raises(InvalidReferenceError) as info:
        parse_reference("ubuntu@sha256:abc")
    assert 'invalid reference "ubuntu@sha256:abc": invalid digest' in str(info.value)
    assert info.value.hint


# Length limits: the path (domain excluded, library/ included) is at most 255; tags at most 128.
LIMITS_OK = [
    "example.com/" + "a" * 255 + ":tag",
    "a" * 247,  # docker.io/library/ + 247 = 255
    "x/" + "a" * 253,
    "a/" * 127 + "a:tag-puts-this-over-max",
    "ubuntu:" + "a" * 128,
    "ubuntu:" + "_" * 128,
    "a" * 63 + "g",  # 64 chars but not hex: a name, not an image ID
]
LIMITS_BAD = [
    ("domain/" + "a" * 256 + ":tag", "repository path exceeds 255 characters"),
    ("example.com/" + "a" * 256, "repository path exceeds 255 characters"),
    ("a" * 248, "repository path exceeds 255 characters"),
    ("x/" + "a" * 254, "repository path exceeds 255 characters"),
    ("a/" * 128 + "a", "repository path exceeds 255 characters"),
    (
        "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_this_is_not_a_valid_namespace"
        "_because_its_lenth_is_greater_than_255_this_is_not_a_valid_namespace_because_its_lenth_is_greater"
        "_than_255_this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255/docker",
        "repository path exceeds 255 characters",
    ),
    ("ubuntu:" + "a" * 129, 'tag "' + "a" * 129 + '" is invalid'),
]


@pytest.mark.parametrize("text", LIMITS_OK)
def test_limits_ok(text: str) -> None:
    ref = parse_reference(text)
    assert len(ref.path) <= 255
    assert ref.tag is None or len(ref.tag) <= 128


@pytest.mark.parametrize(("text", "needle"), LIMITS_BAD)
def test_limits_bad(text: str, needle: str) -> None:
    with pytest.raises(InvalidReferenceError, match="invalid reference") as info:
        parse_reference(text)
    assert needle in str(info.value)


def test_exact_limits() -> None:
    assert len(parse_reference("example.com/" + "a" * 255).path) == 255
    assert len(parse_reference("a" * 247).path) == 255
    assert len(parse_reference("ubuntu:" + "v" * 128).tag or "") == 128


@pytest.mark.parametrize(
    ("text", "default_tag", "tag", "tag_or_digest"),
    [
        ("ubuntu", None, None, None),
        ("ubuntu", "stable", "stable", "stable"),
        ("ubuntu:1", None, "1", "1"),
        ("ubuntu:1", "stable", "1", "1"),
        (f"ubuntu@{D}", "stable", None, D),
        (f"ubuntu@{D}", None, None, D),
        (f"ubuntu:1@{D}", None, "1", D),
    ],
)
def test_default_tag(text: str, default_tag: str | None, tag: str | None, tag_or_digest: str | None) -> None:
    ref = parse_reference(text, default_tag=default_tag)
    assert ref.tag == tag
    assert ref.tag_or_digest == tag_or_digest
    assert ref.is_digested == (ref.digest is not None)


def test_invalid_default_tag() -> None:
    with pytest.raises(InvalidReferenceError, match="default tag"):
        parse_reference("ubuntu", default_tag="-bad")


@pytest.mark.parametrize(
    ("text", "api_domain"),
    [
        ("ubuntu", "registry-1.docker.io"),
        ("docker.io/library/ubuntu", "registry-1.docker.io"),
        ("index.docker.io/x/y", "registry-1.docker.io"),
        ("ghcr.io/o/r", "ghcr.io"),
        ("localhost:5000/r", "localhost:5000"),
        ("[::1]:5000/r", "[::1]:5000"),
        ("registry-1.docker.io/library/x", "registry-1.docker.io"),
    ],
)
def test_api_domain(text: str, api_domain: str) -> None:
    assert parse_reference(text).api_domain == api_domain


def test_digest_wins_for_tag_or_digest() -> None:
    ref = parse_reference(f"ghcr.io/o/r:v1@{D}")
    assert ref.tag == "v1" and ref.digest == D
    assert ref.tag_or_digest == D
    assert ref.is_digested


def test_with_tag_and_with_digest() -> None:
    ref = parse_reference("ubuntu")
    assert str(ref.with_tag("22.04")) == "docker.io/library/ubuntu:22.04"
    pinned = ref.with_digest(D)
    assert isinstance(pinned.digest, Digest)
    assert str(pinned) == f"docker.io/library/ubuntu:latest@{D}"
    assert str(pinned.with_tag("TAG5")) == f"docker.io/library/ubuntu:TAG5@{D}"
    assert ref.with_digest(Digest(D2)).digest == D2
    assert ref == parse_reference("ubuntu")  # frozen: the original is unchanged


@pytest.mark.parametrize("tag", ["-foo", ".foo", "", "a b", "x" * 129, "a/b", "a:b"])
def test_with_tag_rejects(tag: str) -> None:
    with pytest.raises(InvalidReferenceError, match="tag"):
        parse_reference("busybox").with_tag(tag)


@pytest.mark.parametrize("digest", ["foo", "sha256:abc", "sha256:" + "F" * 64, "md5:" + "0" * 32, ""])
def test_with_digest_rejects(digest: str) -> None:
    with pytest.raises(InvalidReferenceError, match="invalid digest"):
        parse_reference("busybox").with_digest(digest)


def test_reference_is_frozen_and_hashable() -> None:
    ref = parse_reference("ubuntu")
    with pytest.raises(AttributeError):
        ref.tag = "x"  # type: ignore[misc]
    assert len({ref, parse_reference("docker.io/library/ubuntu:latest")}) == 1


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"domain": "", "path": "x"}, "domain is empty"),
        ({"domain": "bad_host", "path": "x"}, 'domain "bad_host" is invalid'),
        ({"domain": "docker.io", "path": "Library/x"}, "must be lowercase"),
        ({"domain": "docker.io", "path": "a//b"}, "empty component"),
        ({"domain": "docker.io", "path": "a" * 256}, "exceeds 255"),
        ({"domain": "docker.io", "path": "x", "tag": "-t"}, 'tag "-t" is invalid'),
        ({"domain": "docker.io", "path": "x", "digest": "sha256:1"}, "invalid digest"),
    ],
)
def test_reference_constructor_validates(kwargs: dict[str, str], needle: str) -> None:
    with pytest.raises(InvalidReferenceError) as info:
        Reference(**kwargs)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_reference_constructor_coerces_digest() -> None:
    ref = Reference("ghcr.io", "o/r", digest=D)  # type: ignore[arg-type]
    assert isinstance(ref.digest, Digest)
    assert str(ref) == f"ghcr.io/o/r@{D}"


# (input, path, tag, digest, str)
LAYOUT = [
    ("oci:/tmp/x", "/tmp/x", None, None, "oci:/tmp/x"),
    ("oci:/tmp/x:v1", "/tmp/x", "v1", None, "oci:/tmp/x:v1"),
    (f"oci:rel/dir@{D}", "rel/dir", None, D, f"oci:rel/dir@{D}"),
    (f"oci:/tmp/x@{D512}", "/tmp/x", None, D512, f"oci:/tmp/x@{D512}"),
    ("oci:./a:b:c", "./a:b", "c", None, "oci:./a:b:c"),  # split at the LAST ':'
    ("oci:/x:y/z", "/x:y/z", None, None, "oci:/x:y/z"),  # 'y/z' is no tag: all path
    ("oci:/a:b:", "/a:b", None, None, "oci:/a:b:"),  # trailing ':' = no tag, path keeps its ':'
    ("oci:/tmp/x:", "/tmp/x", None, None, "oci:/tmp/x"),  # skopeo writes 'dir:'
    ("oci:x", "x", None, None, "oci:x"),
    ("oci:.", ".", None, None, "oci:."),
    ("oci:./layout:latest", "./layout", "latest", None, "oci:./layout:latest"),
    ("oci:../up/dir:1.0.0", "../up/dir", "1.0.0", None, "oci:../up/dir:1.0.0"),
    ("oci:/m:1.0+build.5", "/m", "1.0+build.5", None, "oci:/m:1.0+build.5"),  # '+' allowed (ref.name)
    ("oci:/m:Upper_Case", "/m", "Upper_Case", None, "oci:/m:Upper_Case"),
    ("oci:/m:" + "t" * 128, "/m", "t" * 128, None, "oci:/m:" + "t" * 128),
    ("oci:/m:" + "t" * 129, "/m:" + "t" * 129, None, None, "oci:/m:" + "t" * 129),  # too long: path
    ("oci:/x:-bad", "/x:-bad", None, None, "oci:/x:-bad"),
    ("oci::v1", ":v1", None, None, "oci::v1"),  # path before ':' would be empty: all path
    ("oci:/a@b:v1", "/a@b", "v1", None, "oci:/a@b:v1"),  # 'b:v1' is not a digest
    ("oci:/user@host/dir", "/user@host/dir", None, None, "oci:/user@host/dir"),
    (f"oci:/a:@{D}", "/a", None, D, f"oci:/a@{D}"),
    ("oci:/with space/dir:tag", "/with space/dir", "tag", None, "oci:/with space/dir:tag"),
    ("oci:/tmp/x:docker.io", "/tmp/x", "docker.io", None, "oci:/tmp/x:docker.io"),
]


@pytest.mark.parametrize(("text", "path", "tag", "digest", "rendered"), LAYOUT)
def test_layout(text: str, path: str, tag: str | None, digest: str | None, rendered: str) -> None:
    ref = parse_layout_reference(text)
    assert (ref.path, ref.tag, ref.digest) == (path, tag, digest)
    assert str(ref) == rendered
    assert parse_layout_reference(str(ref)) == ref
    assert parse_any(text) == ref
    assert ref.tag_or_digest == (digest if digest is not None else tag)


LAYOUT_BAD = [
    ("oci:", "missing layout path"),
    (f"oci:@{D}", "missing layout path"),
    (f"oci:/p:v1@{D}", "a layout reference takes a tag or a digest, not both"),
    ("oci:/a@sha256:abc", "invalid digest"),
    ("oci:/a@sha512:" + "0" * 64, "invalid digest"),
    ("oci:/a@md5:" + "0" * 32, "invalid digest"),
    ("oci:/a@sha256:" + "F" * 64, "invalid digest"),
    ("oci:dir:@0", "source index"),
    ("oci:/a\x00b", "NUL"),
    ("/tmp/x", "starts with 'oci:'"),
]


@pytest.mark.parametrize(("text", "needle"), LAYOUT_BAD)
def test_layout_invalid(text: str, needle: str) -> None:
    with pytest.raises(InvalidReferenceError) as info:
        parse_layout_reference(text)
    assert needle in str(info.value)
    assert str(info.value).startswith("invalid reference ")


@pytest.mark.parametrize(
    ("kwargs", "rendered"),
    [
        ({"path": "/a:b"}, "oci:/a:b:"),
        ({"path": "x:"}, "oci:x::"),
        ({"path": f"/x@{D}"}, f"oci:/x@{D}:"),
        ({"path": "/d", "tag": "v1"}, "oci:/d:v1"),
        ({"path": "/d", "digest": D}, f"oci:/d@{D}"),
        ({"path": "/plain"}, "oci:/plain"),
    ],
)
def test_layout_str_round_trips(kwargs: dict[str, str], rendered: str) -> None:
    ref = LayoutReference(**kwargs)  # type: ignore[arg-type]
    assert str(ref) == rendered
    assert parse_layout_reference(rendered) == ref


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"path": ""}, "missing layout path"),
        ({"path": "/d", "tag": "v1", "digest": D}, "not both"),
        ({"path": "/d", "tag": "-v"}, 'tag "-v" is invalid'),
        ({"path": "/d", "tag": "a:b"}, 'tag "a:b" is invalid'),
        ({"path": "/d", "digest": "sha256:00"}, "invalid digest"),
    ],
)
def test_layout_constructor_validates(kwargs: dict[str, str], needle: str) -> None:
    with pytest.raises(InvalidReferenceError) as info:
        LayoutReference(**kwargs)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_layout_digest_is_a_digest() -> None:
    ref = parse_layout_reference(f"oci:/l@{D}")
    assert isinstance(ref.digest, Digest)
    assert ref.tag is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("docker://ubuntu", "docker.io/library/ubuntu:latest"),
        ("docker://ghcr.io/o/r:v1", "ghcr.io/o/r:v1"),
        (f"docker://localhost:5000/r@{D}", f"localhost:5000/r@{D}"),
        ("docker://[::1]:5000/r", "[::1]:5000/r:latest"),
        ("ubuntu:22.04", "docker.io/library/ubuntu:22.04"),
        ("oci:/tmp/x:v1", "oci:/tmp/x:v1"),
        ("oci:/tmp/x", "oci:/tmp/x"),
        (f"oci:rel/dir@{D}", f"oci:rel/dir@{D}"),
        ("ocifoo/bar", "docker.io/ocifoo/bar:latest"),
        ("oci/bar", "docker.io/oci/bar:latest"),
        ("oci", "docker.io/library/oci:latest"),
    ],
)
def test_parse_any(text: str, expected: str) -> None:
    assert str(parse_any(text)) == expected


def test_parse_any_types_and_default_tag() -> None:
    assert isinstance(parse_any("oci:/x"), LayoutReference)
    assert isinstance(parse_any("docker://x"), Reference)
    assert isinstance(parse_any("x"), Reference)
    assert parse_any("docker://x", default_tag=None) == parse_reference("x", default_tag=None)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("docker://", 'invalid reference "docker://": empty reference'),
        ("docker://Foo:tag", 'invalid reference "docker://Foo:tag": repository name must be lowercase'),
        (f"docker://{HEX64}", "looks like an image ID"),
        ("docker://docker://ubuntu", 'domain "docker:" is invalid'),
        ("dir:/tmp/x", "transport is not supported"),
        ("oci-archive:/tmp/x.tar", "transport is not supported"),
        ("docker-archive:/tmp/x.tar", "transport is not supported"),
        ("containers-storage:ubuntu", "transport is not supported"),
        ("oci:", "missing layout path"),
        ("OCI:/tmp/x", "invalid reference"),
    ],
)
def test_parse_any_invalid(text: str, needle: str) -> None:
    with pytest.raises(InvalidReferenceError) as info:
        parse_any(text)
    assert needle in str(info.value)


def test_is_domain_one_rule_for_every_caller():
    """One function decides whether a first component is a registry host (issue 16: it was written five times)."""
    from imagevol.reference import is_domain

    for host in ("localhost", "ghcr.io", "registry:5000", "[::1]:5000", "Registry"):
        assert is_domain(host), host
    for path in ("library", "user", "org-name", "a_b"):
        assert not is_domain(path), path


def test_push_mount_from_uppercase_first_component_is_another_registry():
    """`--mount-from Other/repo` names a registry host by the uppercase rule, as `parse_reference` reads it.

    The sink's copy of the rule lacked the uppercase case, so it asked this registry to mount a repository
    `Other/repo` (not a valid repository name) instead of ignoring the source on another registry.
    """
    from imagevol.reference import parse_reference
    from imagevol.sinks.registry import RegistrySink

    assert parse_reference("Other/repo:v1").domain == "Other"
    sink = RegistrySink(parse_reference("127.0.0.1:5000/me/app:v1"), mount_from=["Other/repo", "lib/base"])
    assert sink.mount_from == ["lib/base"]
