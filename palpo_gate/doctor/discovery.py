"""Server discovery, as the Matrix spec defines it (server-server API,
"Resolving server names"): which address, port, Host header and certificate
name a remote homeserver uses to reach a server name.

Pure: :func:`discover` works over DNS answers it is given. When it needs one
it has not got, it returns :class:`Need`; the caller (``fetch.py``) looks it
up and asks again. So the algorithm is table-tested without a DNS server.

The steps, in the spec's order:

1. the server name is an IP literal: that address, its port or 8448;
2. the server name has a port: the host's A/AAAA records, that port;
3. ``https://<host>/.well-known/matrix/server`` names ``m.server``
   (a delegated host, with or without a port); then, for the delegated host:
   an IP literal; a port given (A/AAAA, that port); SRV
   ``_matrix-fed._tcp``; SRV ``_matrix._tcp`` (deprecated); A/AAAA on 8448;
   TLS name and Host header are the delegated host;
4. no usable well-known: SRV ``_matrix-fed._tcp.<host>``, then
5. SRV ``_matrix._tcp.<host>`` (deprecated), then
6. the host's A/AAAA records on port 8448.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from ..config import join_host_port
from .facts import Lookup

DEFAULT_PORT = 8448


@dataclass(frozen=True, slots=True)
class Need:
    """Look this up and call :func:`discover` again."""

    qname: str
    qtype: str


@dataclass(frozen=True, slots=True)
class Route:
    """Where discovery sends a remote server."""

    via: str  # "well-known", "SRV _matrix-fed._tcp.matrix.example.com", "port 8448", ...
    host_header: str
    tls_name: str
    #: (host, port) in the order a remote tries them, before address lookup
    targets: tuple[tuple[str, int], ...]
    #: (address, port) in the order a remote tries them
    endpoints: tuple[tuple[str, int], ...] = ()
    #: why a remote finds nothing to connect to ("" when endpoints were found)
    problem: str = ""
    #: why a remote cannot fetch the well-known document this route starts from
    well_known_problem: str = ""

    def describe(self) -> str:
        targets = ", ".join(f"{join_host_port(h, p)}" for h, p in self.targets)
        return f"{self.via} → {targets}" if targets else self.via


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def split_host_port(name: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``1.2.3.4:port``, ``[::1]:port`` → (host, port).

    ValueError for anything else (the grammar of server names in the
    appendix of the Matrix spec, loosely: no scheme, no path).
    """
    if not name or any(c in name for c in "/?#@ \t"):
        raise ValueError(f"{name!r} is not a host or host:port")
    if name.startswith("["):
        end = name.find("]")
        if end < 0 or not is_ip(name[1:end]):
            raise ValueError(f"{name!r}: bad IPv6 literal")
        host, rest = name[1:end], name[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"{name!r}: expected :port after ]")
        port_s = rest[1:]
    else:
        host, sep, port_s = name.partition(":")
        if ":" in port_s:
            raise ValueError(f"{name!r}: write an IPv6 address in brackets")
        if not sep:
            port_s = ""
        if not host:
            raise ValueError(f"{name!r}: no host")
        if not sep:
            return host.lower().rstrip("."), None
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"{name!r}: port must be 1-65535")
    return host.lower().rstrip("."), int(port_s)


def _srv_targets(records: tuple[object, ...]) -> tuple[tuple[str, int], ...]:
    """SRV records in the order a client tries them: lowest priority first,
    heavier weight first among equals (RFC 2782 picks by weighted chance;
    the doctor reports the likeliest order)."""
    ordered = sorted(records, key=lambda r: (r[0], -r[1]))  # type: ignore[index]
    return tuple((_target(str(r[3])), int(r[2])) for r in ordered)  # type: ignore[index]


def _target(name: str) -> str:
    return name if name == "." else name.rstrip(".").lower()


def addresses(host: str, port: int, dns: Mapping[tuple[str, str], Lookup]
               ) -> Need | tuple[tuple[tuple[str, int], ...], str]:
    """(endpoints, problem) for one host, or the lookup still missing."""
    if is_ip(host):
        return ((host, port),), ""
    out: list[tuple[str, int]] = []
    errors: list[str] = []
    for qtype in ("A", "AAAA"):
        ans = dns.get((host, qtype))
        if ans is None:
            return Need(host, qtype)
        out.extend((str(a), port) for a in ans.records)
        if ans.error:
            errors.append(f"{qtype} {host}: {ans.error}")
    if out:
        return tuple(out), ""
    if errors:
        return (), "DNS lookup failed: " + "; ".join(errors)
    return (), f"{host} has no A or AAAA record"


def _srv(host: str, dns: Mapping[tuple[str, str], Lookup]
         ) -> Need | tuple[str, tuple[tuple[str, int], ...], str]:
    """(service name, targets, error) of the first SRV name that has records;
    targets empty when neither has any."""
    errors = []
    for service in ("_matrix-fed._tcp", "_matrix._tcp"):
        qname = f"{service}.{host}"
        ans = dns.get((qname, "SRV"))
        if ans is None:
            return Need(qname, "SRV")
        if ans.error:
            errors.append(f"SRV {qname}: {ans.error}")
        if ans.records:
            return qname, _srv_targets(ans.records), ""
    return "", (), "; ".join(errors)


def _route(via: str, host_header: str, tls_name: str,
           targets: tuple[tuple[str, int], ...],
           dns: Mapping[tuple[str, str], Lookup], well_known_problem: str = "") -> Need | Route:
    endpoints: list[tuple[str, int]] = []
    problems: list[str] = []
    for host, port in targets:
        if host == ".":  # RFC 2782: target "." means "no such service here"
            problems.append("the SRV record's target is \".\" (service not available)")
            continue
        got = addresses(host, port, dns)
        if isinstance(got, Need):
            return got
        found, why = got
        endpoints.extend(found)
        if why:
            problems.append(why)
    return Route(via, host_header, tls_name, targets, tuple(endpoints),
                 "" if endpoints else "; ".join(problems) or "no address", well_known_problem)


def discover(server_name: str, m_server: str | None,
             dns: Mapping[tuple[str, str], Lookup]) -> Need | Route:
    """Resolve *server_name* as a remote homeserver does.

    *m_server* is the ``m.server`` value of the server's well-known document,
    or None when there is none (404, invalid, unreachable): steps 4-6.
    ValueError when *server_name* or *m_server* is not a server name.
    """
    host, port = split_host_port(server_name)
    if is_ip(host):
        return _route("IP literal", server_name, host, ((host, port or DEFAULT_PORT),), dns)
    if port is not None:
        return _route("explicit port", server_name, host, ((host, port),), dns)
    if m_server is not None:
        # The remote fetched https://<host>/.well-known/matrix/server: the
        # server name must have an address for that.
        got = addresses(host, 443, dns)
        if isinstance(got, Need):
            return got
        wk_problem = ""
        if not got[0]:
            wk_problem = (f"{got[1]}: remote servers cannot fetch "
                          f"https://{host}/.well-known/matrix/server")
        dhost, dport = split_host_port(m_server)
        if is_ip(dhost):
            return _route("well-known", m_server, dhost,
                          ((dhost, dport or DEFAULT_PORT),), dns, wk_problem)
        if dport is not None:
            return _route("well-known", m_server, dhost, ((dhost, dport),), dns, wk_problem)
        srv = _srv(dhost, dns)
        if isinstance(srv, Need):
            return srv
        qname, targets, _ = srv
        if targets:
            return _route(f"well-known, then SRV {qname}", dhost, dhost, targets, dns, wk_problem)
        return _route("well-known, no SRV: port 8448", dhost, dhost,
                      ((dhost, DEFAULT_PORT),), dns, wk_problem)
    srv = _srv(host, dns)
    if isinstance(srv, Need):
        return srv
    qname, targets, _ = srv
    if targets:
        return _route(f"SRV {qname}", host, host, targets, dns)
    return _route("no well-known, no SRV: port 8448", host, host, ((host, DEFAULT_PORT),), dns)
