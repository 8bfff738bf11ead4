"""Which registries and network addresses imagevol may contact (server-side request forgery defence).

The CSI plugin runs as root on the host network: a pod that names ``127.0.0.1:PORT/x:v1``, or a
registry whose redirect or token realm points at a cloud metadata endpoint, would otherwise make
the plugin send requests to services only the node can reach. :class:`EgressPolicy` is the
operator's answer (``--allow-registry`` globs):

* A registry a reference names must match an allow-list entry (a ``fnmatch`` glob on
  ``host[:port]``: ``ghcr.io``, ``*.example.com``, ``registry.local:5000``, ``10.0.0.7:*``, ``*``).
  An entry without a port matches the host without a port (or on 443/80); ``:*`` matches every port.
  ``docker.io`` also matches Docker Hub's API host (``registry-1.docker.io``). Endpoints that
  registries.conf gives (mirrors, rewritten locations) are operator-set and need no entry.
* Every connection is checked on the address it is made to, after resolution (every address a
  name resolves to is checked, and the socket connects to a checked address, so DNS rebinding
  between check and connect is not possible): loopback, link-local (cloud metadata endpoints
  included), unspecified, multicast and broadcast addresses, known metadata addresses outside
  those ranges, their IPv4-mapped forms, and the node's own interface addresses are refused, unless
  an entry names the address itself (``127.0.0.1:5000``, ``127.0.0.1:*``, ``[::1]:*``): a name glob
  (``localhost:*``, ``*``) never admits a special address, whatever it resolves to. The same rule
  applies to registries, token realms and redirect targets (blob storage), which need no entry of
  their own (CDNs vary).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from urllib3 import PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import allowed_gai_family

from ..errors import EgressRefusedError, UsageError

__all__ = ["AllowEntry", "CheckedPoolManager", "EgressPolicy", "node_addresses", "special_kind"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Metadata services outside the loopback and link-local ranges (AWS IPv6, Alibaba Cloud).
_METADATA = (ipaddress.ip_network("fd00:ec2::254/128"), ipaddress.ip_network("100.100.100.200/32"))
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_BROADCAST = ipaddress.ip_address("255.255.255.255")
_DEFAULT_PORTS = ("443", "80")
_IPV4_GLOB = re.compile(r"[0-9*?.]*[0-9][0-9*?.]*")
_PORT_GLOB = re.compile(r"[0-9*?]+")
_HOST_GLOB = re.compile(r"[a-z0-9*?.\-_]+")
# Node addresses are read again at most this often (interfaces come and go, a lookup costs ~0.1 ms).
NODE_ADDRESSES_TTL = 5.0


@dataclass(frozen=True)
class AllowEntry:
    """One ``--allow-registry`` glob: ``host`` (lower case, IPv6 without brackets) and ``port`` globs."""

    text: str
    host: str
    port: str | None
    is_address: bool  # the host glob names addresses (IPv4 digits and wildcards, or bracketed IPv6)

    @classmethod
    def parse(cls, text: str) -> AllowEntry:
        t = text.strip().lower()
        bad = None
        if not t:
            bad = "it is empty"
        elif "://" in t or "/" in t or "@" in t:
            bad = "it is not host[:port] (no scheme, path or user)"
        if bad is None and t.startswith("["):
            end = t.find("]")
            host, rest = (t[1:end], t[end + 1 :]) if end > 0 else ("", "")
            if not host or (rest and not rest.startswith(":")) or not re.fullmatch(r"[0-9a-f:.*?]+", host):
                bad = "a bracketed IPv6 address must be [ADDRESS] or [ADDRESS]:PORT"
            port = rest[1:] if rest else None
            is_address = True
        elif bad is None:
            host, sep, port_text = t.partition(":")
            port = port_text if sep else None
            is_address = bool(_IPV4_GLOB.fullmatch(host))
            if not host or not _HOST_GLOB.fullmatch(host):
                bad = "the host part is not a name, an address or a glob of one"
        if bad is None and port is not None and not _PORT_GLOB.fullmatch(port):
            bad = "the port must be a number or a glob such as *"
        if bad is not None:
            raise UsageError(
                f"invalid --allow-registry {text!r}: {bad}",
                hint="write a registry host glob: ghcr.io, *.example.com, registry.local:5000, 127.0.0.1:*, [::1]:*",
            )
        return cls(text.strip(), host, port, is_address)

    def matches(self, host: str, port: str | None) -> bool:
        """Whether ``host`` (lower case, IPv6 without brackets) and ``port`` (None: the default one) match."""
        if self.port is None:
            if port is not None and port not in _DEFAULT_PORTS:
                return False
        elif not fnmatchcase(port or "443", self.port) and not (port is None and fnmatchcase("80", self.port)):
            return False
        return fnmatchcase(host, self.host)


def split_host(netloc: str) -> tuple[str, str | None]:
    """``host[:port]`` as (lower-case host, IPv6 without brackets; port or None)."""
    t = netloc.strip().lower()
    if t.startswith("["):
        end = t.find("]")
        if end > 0:
            rest = t[end + 1 :]
            return t[1:end], (rest[1:] or None) if rest.startswith(":") else None
    if t.count(":") == 1:
        host, port = t.split(":")
        return host, port or None
    return t, None


def _unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address inside an IPv4-mapped (::ffff:a.b.c.d) or IPv4-compatible (::a.b.c.d) IPv6 one."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if int(ip) >> 32 == 0 and int(ip) > 1:
            return ipaddress.IPv4Address(int(ip))
    return ip


def special_kind(address: str | IPAddress, node: Iterable[IPAddress] = ()) -> str | None:
    """Why an address is refused unless allowed by address ("a loopback address", ...), or None.
    ``node``: addresses of the node besides those of this network namespace's interfaces (a plugin
    in the pod network does not see the node's IP on an interface of its own)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0]) if isinstance(address, str) else address
    ip = _unwrap(ip)
    if ip.is_loopback:
        return "a loopback address"
    if any(ip in n for n in _METADATA):
        return "a cloud metadata address"
    if ip.is_link_local:
        return "a link-local address (where cloud metadata endpoints live)"
    if ip.is_unspecified or (isinstance(ip, ipaddress.IPv4Address) and ip in _THIS_NETWORK):
        return "an unspecified address"
    if ip.is_multicast or ip == _BROADCAST:
        return "a multicast or broadcast address"
    if ip in node_addresses() or ip in node:
        return "one of this node's own addresses"
    return None


# --- the node's own addresses ---------------------------------------------------------------------


class _Sockaddr(ctypes.Structure):
    _fields_ = [("sa_family", ctypes.c_ushort)]


class _Ifaddrs(ctypes.Structure):
    pass


_Ifaddrs._fields_ = [
    ("ifa_next", ctypes.POINTER(_Ifaddrs)),
    ("ifa_name", ctypes.c_char_p),
    ("ifa_flags", ctypes.c_uint),
    ("ifa_addr", ctypes.POINTER(_Sockaddr)),
    ("ifa_netmask", ctypes.POINTER(_Sockaddr)),
    ("ifa_ifu", ctypes.POINTER(_Sockaddr)),
    ("ifa_data", ctypes.c_void_p),
]

_libc: ctypes.CDLL | None = None
_node_cache: tuple[float, frozenset[IPAddress]] | None = None
_node_lock = threading.Lock()


def _getifaddrs() -> set[IPAddress]:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.getifaddrs.argtypes = [ctypes.POINTER(ctypes.POINTER(_Ifaddrs))]
        _libc.freeifaddrs.argtypes = [ctypes.POINTER(_Ifaddrs)]
    head = ctypes.POINTER(_Ifaddrs)()
    if _libc.getifaddrs(ctypes.byref(head)) != 0:
        raise OSError(ctypes.get_errno(), "getifaddrs failed")
    out: set[IPAddress] = set()
    try:
        p = head
        while p:
            sa = p.contents.ifa_addr
            if sa:
                fam = sa.contents.sa_family
                base = ctypes.addressof(sa.contents)
                if fam == socket.AF_INET:  # sockaddr_in: family, port, 4-byte address
                    out.add(ipaddress.IPv4Address(ctypes.string_at(base + 4, 4)))
                elif fam == socket.AF_INET6:  # sockaddr_in6: family, port, flowinfo, 16-byte address
                    out.add(ipaddress.IPv6Address(ctypes.string_at(base + 8, 16)))
            p = p.contents.ifa_next
    finally:
        _libc.freeifaddrs(head)
    return out


def _proc_inet6() -> set[IPAddress]:
    out: set[IPAddress] = set()
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr = line.split(" ", 1)[0]
                if len(hexaddr) == 32:
                    out.add(ipaddress.IPv6Address(bytes.fromhex(hexaddr)))
    except OSError:
        pass
    return out


def node_addresses() -> frozenset[IPAddress]:
    """Every address of every interface of this host (its network namespace): getifaddrs(3), and
    /proc/net/if_inet6 for IPv6. Cached for NODE_ADDRESSES_TTL seconds."""
    global _node_cache
    now = time.monotonic()
    with _node_lock:
        if _node_cache is not None and now - _node_cache[0] < NODE_ADDRESSES_TTL:
            return _node_cache[1]
    try:
        found = _getifaddrs()
    except (OSError, AttributeError):
        found = set()
    found |= _proc_inet6()
    addrs = frozenset(found)
    with _node_lock:
        _node_cache = (now, addrs)
    return addrs


# --- the policy -------------------------------------------------------------------------------------


def _docker_hub_aliases(host: str) -> list[str]:
    if host in ("registry-1.docker.io", "index.docker.io"):
        return [host, "docker.io"]
    return [host]


@dataclass(frozen=True)
class EgressPolicy:
    """The operator's allow-list and the special-address rule (see the module docs).

    An empty allow-list admits no registry: the CSI plugin without ``--allow-registry`` refuses
    every pull (``--allow-registry '*'`` admits any registry, special addresses still refused)."""

    allow: tuple[AllowEntry, ...] = ()
    # The node's addresses that are not on an interface here (the CSI plugin's --node-address).
    node: tuple[IPAddress, ...] = ()

    @classmethod
    def parse(cls, globs: Iterable[str], node: Iterable[str] = ()) -> EgressPolicy:
        entries: list[AllowEntry] = []
        for g in globs:
            for part in g.split(","):
                if part.strip():
                    entries.append(AllowEntry.parse(part))
        addresses: list[IPAddress] = []
        for a in node:
            try:
                addresses.append(_unwrap(ipaddress.ip_address(a.strip().strip("[]"))))
            except ValueError:
                raise UsageError(
                    f"invalid --node-address {a!r}: not an IP address",
                    hint="pass the node's IP, e.g. --node-address=$(NODE_IP) with NODE_IP from status.hostIP",
                ) from None
        return cls(tuple(entries), tuple(addresses))

    def describe(self) -> str:
        return ", ".join(e.text for e in self.allow) if self.allow else "empty"

    def allows_registry(self, netloc: str) -> bool:
        host, port = split_host(netloc)
        return any(e.matches(h, port) for h in _docker_hub_aliases(host) for e in self.allow)

    def check_registry(self, netloc: str) -> None:
        """Raise EgressRefusedError unless the registry ``host[:port]`` matches an entry."""
        if self.allows_registry(netloc):
            return
        raise EgressRefusedError(
            f"registry {netloc} is not in the allow-list of registries imagevol may contact "
            f"(--allow-registry: {self.describe()})",
            hint=f"use a registry of the allow-list, or have the operator add --allow-registry {netloc}",
        )

    def allows_address(self, ip: IPAddress, port: int) -> bool:
        """Whether an entry that names addresses admits ``ip`` on ``port``."""
        text = str(ip).lower()
        forms = {text, str(_unwrap(ip))}
        return any(e.is_address and e.matches(f, str(port)) for f in forms for e in self.allow)

    def check_address(self, host: str, port: int, address: str) -> None:
        """Raise EgressRefusedError if ``address`` (what ``host`` resolved to) is special and not
        named by an address entry."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        kind = special_kind(ip, self.node)
        if kind is None or self.allows_address(ip, port):
            return
        shown = f"[{ip}]" if ip.version == 6 else str(ip)
        what = f"{host}:{port}" if host.strip("[]").lower() == str(ip) else f"{host}:{port} (it resolves to {ip})"
        raise EgressRefusedError(
            f"refused to connect to {what}: {ip} is {kind} and no --allow-registry entry names it "
            f"(--allow-registry: {self.describe()})",
            hint=f"such addresses are reached only when the operator names the address itself, "
            f"e.g. --allow-registry {shown}:{port}",
        )


# --- connections that check the address they connect to ---------------------------------------------

AddressCheck = Callable[[str, int, str], None]  # (host as named, port, resolved address): raise to refuse


class _CheckedConnect:
    """Resolves the host once, has every address checked, and connects only to checked addresses
    (urllib3 would resolve again in create_connection: a rebinding name could change between)."""

    egress_check: AddressCheck | None = None
    host: str
    port: int
    _dns_host: str

    def _new_conn(self) -> socket.socket:
        check = self.egress_check
        if check is None:
            return super()._new_conn()  # type: ignore[misc]
        name = self._dns_host.strip("[]")
        try:
            infos = socket.getaddrinfo(name, self.port, allowed_gai_family(), socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise NameResolutionError(self.host, self, e) from e  # type: ignore[arg-type]
        addresses: list[str] = []
        for *_, sockaddr in infos:
            check(self.host, self.port, sockaddr[0])
            if sockaddr[0] not in addresses:
                addresses.append(sockaddr[0])
        last: Exception | None = None
        for address in addresses:
            self._dns_host = address  # a literal address: create_connection does not resolve it
            try:
                return super()._new_conn()  # type: ignore[misc]
            except (NewConnectionError, ConnectTimeoutError) as e:
                last = e
            finally:
                self._dns_host = name
        raise last or NewConnectionError(self, f"{self.host} resolved to no address")  # type: ignore[arg-type]


class CheckedHTTPConnection(_CheckedConnect, HTTPConnection):
    pass


class CheckedHTTPSConnection(_CheckedConnect, HTTPSConnection):
    pass


class _CheckedHTTPPool(HTTPConnectionPool):
    ConnectionCls = CheckedHTTPConnection
    egress_check: AddressCheck | None = None

    def _new_conn(self) -> Any:
        conn = super()._new_conn()
        conn.egress_check = self.egress_check
        return conn


class _CheckedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = CheckedHTTPSConnection
    egress_check: AddressCheck | None = None

    def _new_conn(self) -> Any:
        conn = super()._new_conn()
        conn.egress_check = self.egress_check
        return conn


class CheckedPoolManager(PoolManager):
    """A urllib3 PoolManager whose every new connection passes ``egress_check`` on each address
    its host resolves to, and connects to one of those addresses."""

    def __init__(self, egress_check: AddressCheck, **kw: Any) -> None:
        super().__init__(**kw)
        self.egress_check = egress_check
        self.pool_classes_by_scheme = {"http": _CheckedHTTPPool, "https": _CheckedHTTPSPool}

    def _new_pool(self, scheme: str, host: str, port: int, request_context: dict[str, Any] | None = None) -> Any:
        pool = super()._new_pool(scheme, host, port, request_context)
        pool.egress_check = self.egress_check  # type: ignore[attr-defined]
        return pool
