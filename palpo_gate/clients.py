"""The client address: who a request is from.

This module owns the one rule for it. The address is:

- the TCP peer of the connection, by default;
- on a listener with ``proxy_protocol = true``, the source address of the
  PROXY protocol header (:mod:`proxyproto`) that a trusted balancer put in
  front of the connection: the balancer is an L4 hop, not an HTTP one, so
  that address takes the peer's place (call it the connection address);
- when the connection address is in ``forwarding.trusted_proxies``, the
  rightmost address of ``X-Forwarded-For`` that is not itself trusted (each
  trusted proxy appends the address it saw, so entries to the right of the
  first untrusted one were written by proxies the gate trusts, and
  everything to its left by whoever the client was: a client-made header
  from an untrusted peer buys nothing).

That address is what the access log shows, what ``admin.allow_from`` and
``[rate_limits]`` look at. (``X-Forwarded-For`` sent upstream is the chain
of the forwarding rules: the trusted chain kept, the connection address appended,
so its rightmost untrusted entry is this same address.)

Pure: no sockets; tested with tables in ``tests/test_clients.py``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from .config import UNIX_PEER

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: How many distinct peer addresses :class:`Trusted` remembers before it
#: starts over (the set of peers a gate sees is small; a bound keeps a scan
#: of many addresses from growing it without end).
_CACHE_SIZE = 4096


def ip_of(text: str) -> IPAddress | None:
    """*text* as an IP address (an IPv4-mapped IPv6 one as IPv4), or None."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:  # type: ignore[union-attr]
        return ip.ipv4_mapped  # type: ignore[union-attr]
    return ip


def canonical(text: str) -> str:
    """The address as the gate writes it: IPv4-mapped IPv6 as IPv4, IPv6
    compressed and lower-case. Anything else ("unix:") unchanged."""
    ip = ip_of(text)
    return text if ip is None else str(ip)


class Trusted:
    """``forwarding.trusted_proxies``: is an address one of them?

    Answers are cached per address text: the same few proxies ask on every
    request, and an ``ipaddress`` parse costs more than the dict lookup.
    """

    __slots__ = ("_cache", "networks", "unix")

    def __init__(self, networks: Iterable[IPNetwork], unix: bool = False) -> None:
        self.networks = tuple(networks)
        #: every peer of a UNIX-socket listener ("unix:") is trusted
        self.unix = unix
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks) or self.unix

    def __contains__(self, addr: str) -> bool:
        hit = self._cache.get(addr)
        if hit is not None:
            return hit
        if addr == UNIX_PEER:
            return self.unix
        ip = ip_of(addr)
        found = ip is not None and any(ip in net for net in self.networks)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[addr] = found
        return found


def _entry(item: str) -> str | None:
    """One X-Forwarded-For entry as an address, or None if it is none.

    Entries are addresses; some balancers add a port (``1.2.3.4:5678``,
    ``[2001:db8::1]:443``), which is dropped.
    """
    item = item.strip()
    if item.startswith("["):
        end = item.find("]")
        if end < 0:
            return None
        item = item[1:end]
    elif item.count(":") == 1:
        item = item.split(":", 1)[0]
    ip = ip_of(item)
    return None if ip is None else str(ip)


def forwarded_client(peer: str, xff: Sequence[bytes], trusted: Trusted) -> str:
    """The client address of a request from the trusted *peer*, given the
    values of its ``X-Forwarded-For`` header lines (in order).

    Walks the chain from the right past trusted addresses; the first
    untrusted one is the client. When every entry is trusted, the leftmost is
    (the request began inside the trusted network). An entry that is not an
    address ends the walk at the last address known good: the proxy that
    passed the garbage on is the client as far as the gate can tell.
    """
    client = peer
    for value in reversed(xff):
        for item in reversed(value.decode("latin-1").split(",")):
            addr = _entry(item)
            if addr is None:
                return client
            client = addr
            if addr not in trusted:
                return addr
    return client


def xff_values(headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    """The values of every ``X-Forwarded-For`` line of a request, in order."""
    return [v for n, v in headers if len(n) == 15 and n.lower() == b"x-forwarded-for"]


def limit_key(addr: str) -> str:
    """What the per-client limits count an address as.

    An IPv6 client usually holds a whole /64 (RFC 6177, RFC 7934 section 6)
    and can pick a new address in it for every request, so an IPv6 address
    counts as its /64; an IPv4 one as itself.
    """
    if ":" not in addr:
        return addr
    ip = ip_of(addr)
    if ip is None or ip.version == 4:
        return addr if ip is None else str(ip)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
