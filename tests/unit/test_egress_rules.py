"""The egress policy's rules on their own (registry/egress.py): allow-list globs, the special
addresses (including the IPv6 forms of IPv4 ones, which a reference cannot spell but a resolver or
a redirect can), the host's interface addresses, and how refusals read. The connections that use
them are tested end to end in tests/e2e/test_egress.py."""

from __future__ import annotations

import ipaddress
import subprocess

import pytest

from imagevol.errors import EgressRefusedError, UsageError
from imagevol.registry.egress import EgressPolicy, node_addresses, special_kind
from imagevol.registry.errortext import error_detail, oci_error_text


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("::ffff:169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("8.8.8.8", None),
        ("10.0.0.1", None),
        ("2001:4860:4860::8888", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_special_addresses(address: str, kind: str | None) -> None:
    got = special_kind(address)
    if kind is None:
        assert got is None
    else:
        assert got is not None and kind in got, got


def test_the_hosts_interface_addresses_are_its_own() -> None:
    out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    listed = {ipaddress.ip_address(line.split()[3].split("/")[0]) for line in out.splitlines()}
    assert listed <= node_addresses()
    for a in listed - {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}:
        if not a.is_link_local:
            assert special_kind(a) == "one of this node's own addresses", a
    assert special_kind("203.0.113.7", node=[ipaddress.ip_address("203.0.113.7")]) == "one of this node's own addresses"


@pytest.mark.parametrize(
    ("netloc", "admitted"),
    [
        ("ghcr.io", True),
        ("GHCR.io", True),
        ("ghcr.io:443", True),
        ("ghcr.io:5000", False),
        ("evil-ghcr.io", False),
        ("a.example.com", True),
        ("a.b.example.com", True),
        ("example.com", False),
        ("registry.local:5000", True),
        ("registry.local", False),
        ("registry.local:5001", False),
        ("registry-1.docker.io", True),  # docker.io's API host
        ("10.0.0.7:5000", True),
        ("127.0.0.1:5000", False),
    ],
)
def test_allow_list_globs(netloc: str, admitted: bool) -> None:
    policy = EgressPolicy.parse(["ghcr.io", "*.example.com,registry.local:5000", "docker.io", "10.0.0.7:*"])
    assert policy.allows_registry(netloc) is admitted
    if not admitted:
        with pytest.raises(EgressRefusedError) as ei:
            policy.check_registry(netloc)
        assert netloc in ei.value.message and "ghcr.io, *.example.com" in ei.value.message
        assert f"--allow-registry {netloc}" in (ei.value.hint or "")


def test_no_entry_admits_nothing() -> None:
    with pytest.raises(EgressRefusedError, match=r"--allow-registry: empty"):
        EgressPolicy().check_registry("ghcr.io")
    assert EgressPolicy.parse(["*"]).allows_registry("anything.example")


@pytest.mark.parametrize(
    ("entries", "address", "port", "admitted"),
    [
        (["127.0.0.1:*"], "127.0.0.1", 5000, True),
        (["127.0.0.1:*"], "::ffff:127.0.0.1", 5000, True),
        (["127.0.0.1:5000"], "127.0.0.1", 5001, False),
        (["127.*:*"], "127.0.0.2", 1, True),
        (["[::1]:*"], "::1", 80, True),
        (["*"], "127.0.0.1", 443, False),  # a name glob never admits a special address
        (["*:*"], "169.254.169.254", 80, False),
        (["localhost:*"], "127.0.0.1", 5000, False),
        (["*:*"], "8.8.8.8", 443, True),  # not special: no entry needed at the address level
    ],
)
def test_special_addresses_need_an_entry_naming_them(
    entries: list[str], address: str, port: int, admitted: bool
) -> None:
    policy = EgressPolicy.parse(entries)
    if admitted:
        policy.check_address("h", port, address)
    else:
        with pytest.raises(EgressRefusedError) as ei:
            policy.check_address("some.name", port, address)
        assert f"some.name:{port} (it resolves to {address})" in ei.value.message
        assert "--allow-registry" in (ei.value.hint or "")


@pytest.mark.parametrize(
    "bad", ["", "https://ghcr.io", "ghcr.io/org", "user@host", "host:port", "[::1", "a b", ":5000", "::1"]
)
def test_invalid_entries_are_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError, match="invalid --allow-registry") as ei:
        from imagevol.registry.egress import AllowEntry

        AllowEntry.parse(bad)
    assert ei.value.hint
    with pytest.raises(UsageError, match="invalid --node-address"):
        EgressPolicy.parse([], ["not-an-ip"])


def test_error_detail_quotes_only_codes_and_messages() -> None:
    doc = b'{"errors": [{"code": "DENIED", "message": "no\\u001b[31m way", "detail": "SECRET"}, {"code": "x<y>"}]}'
    assert oci_error_text(doc) == "DENIED: no [31m way; UNKNOWN"
    assert error_detail(b"<html>SECRET</html>", "text/html; charset=utf-8") == (
        "a text/html answer of 19 bytes, not a registry error document"
    )
    assert error_detail(b'{"token": "SECRET"}', "application/json") == (
        "an application/json answer of 19 bytes, not a registry error document"
    )
    assert error_detail(b"SECRET", "SECRET/<script>") == "an untyped answer of 6 bytes, not a registry error document"
    assert error_detail(b"") == "an empty answer"
    assert len(oci_error_text(b'{"errors": [{"code": "X", "message": "' + b"m" * 5000 + b'"}]}') or "") < 220
