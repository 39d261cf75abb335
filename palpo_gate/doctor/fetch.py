"""The doctor's IO: every request, handshake and DNS lookup it makes, into one
:class:`.facts.Facts`. It judges nothing (``checks.py`` does).

It looks at the deployment from three places:

- the upstream, directly at ``upstream.url`` (what the homeserver answers);
- the gate's listeners, at their bind addresses (wildcards reached over
  loopback), without trusting their certificates: those are examined apart;
- the outside, as a remote server and a client would: names resolved with
  real DNS (dnspython; ``--resolver`` picks the server), certificates
  verified against the system store plus ``--cafile``.

Every operation is bounded by a timeout; no failure raises out of here: it
is recorded as text on the record it belongs to.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
from datetime import UTC, datetime
from typing import Any

import aiohttp
import dns.asyncresolver
import dns.exception
import dns.resolver
from yarl import URL

from ..config import Bind, Config, Listener
from . import checks, discovery
from .facts import AdminProbe, Attempt, Facts, Http, Lookup, TlsProbe

TIMEOUT = 5.0  # seconds, per connection, handshake, request or DNS lookup
#: Where remote servers and clients fetch https://<server name>/.well-known/...
WELL_KNOWN_PORT = 443
MAX_BODY = 1 << 20
#: OpenSSL's X509_V_FLAG_NO_CHECK_TIME: the chain is judged apart from the
#: dates, which tls.expiry reports with the thresholds of its own.
_NO_CHECK_TIME = 0x200000
#: Source addresses the admin probe may use to come "from outside" on loopback.
_LOOPBACK_SOURCES = {4: ("127.0.0.1", "127.0.0.2"), 6: ("::1",)}


def parse_resolver(value: str) -> tuple[str, int]:
    """``HOST[:PORT]`` or ``[V6]:PORT`` → (address, port); ValueError otherwise."""
    host, port = discovery.split_host_port(value)
    if not discovery.is_ip(host):
        raise ValueError(f"{value!r}: the resolver must be an IP address")
    return host, port or 53


class _Dns:
    def __init__(self, resolver: tuple[str, int] | None) -> None:
        self.error = ""
        self.where = "the system resolver"
        self.res: dns.asyncresolver.Resolver | None = None
        try:
            self.res = dns.asyncresolver.Resolver(configure=resolver is None)
        except dns.resolver.NoResolverConfiguration:
            self.error = "no DNS resolver configured (use --resolver HOST:PORT)"
            return
        if resolver is not None:
            self.res.nameservers = [resolver[0]]
            self.res.port = resolver[1]
            self.where = discovery.join_host_port(*resolver)
        self.res.lifetime = TIMEOUT

    async def lookup(self, qname: str, qtype: str) -> Lookup:
        if self.res is None or self.error:
            return Lookup(qname, qtype, (), self.error)
        try:
            ans = await self.res.resolve(qname, qtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return Lookup(qname, qtype)
        except dns.exception.Timeout:
            # One silent server makes every later lookup wait as long: stop asking.
            self.error = f"{self.where} did not answer within {TIMEOUT:g}s"
            return Lookup(qname, qtype, (), self.error)
        except dns.exception.DNSException as exc:
            return Lookup(qname, qtype, (), str(exc) or type(exc).__name__)
        if qtype == "SRV":
            recs: tuple[Any, ...] = tuple(
                (r.priority, r.weight, r.port, r.target.to_text()) for r in ans)
        else:
            recs = tuple(r.address for r in ans)
        return Lookup(qname, qtype, recs)


def _error_text(exc: BaseException) -> str:
    """A failure as an operator reads it."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        err = exc.certificate_error
        why = getattr(err, "verify_message", "") or str(err)
        return f"certificate verify failed: {why}"
    if isinstance(exc, aiohttp.ClientConnectorSSLError | ssl.SSLError):
        inner = getattr(exc, "os_error", exc)
        return f"TLS handshake failed: {getattr(inner, 'reason', None) or inner}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        exc = exc.os_error
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return f"no answer within {TIMEOUT:g}s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def _base(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://{discovery.join_host_port(host, port)}"


class _Client:
    """aiohttp sessions: TCP (one per source address), UNIX (one per path)."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, str], aiohttp.ClientSession] = {}

    def _session(self, unix: str = "", source: str = "") -> aiohttp.ClientSession:
        key = (unix, source)
        s = self._sessions.get(key)
        if s is None:
            connector: aiohttp.BaseConnector
            if unix:
                connector = aiohttp.UnixConnector(path=unix, force_close=True)
            else:
                connector = aiohttp.TCPConnector(
                    force_close=True, local_addr=(source, 0) if source else None)
            # auto_decompress off: answers are compared byte for byte.
            s = aiohttp.ClientSession(
                connector=connector, auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=2 * TIMEOUT, connect=TIMEOUT))
            self._sessions[key] = s
        return s

    async def close(self) -> None:
        for s in self._sessions.values():
            await s.close()

    async def get(self, base: str, target: str, *, host: str | None = None,
                  sni: str | None = None, verify: ssl.SSLContext | None = None,
                  unix: str = "", source: str = "") -> Http:
        """GET *target* (sent exactly as written) from *base*."""
        what = f"GET {base}{target}" if not unix else f"GET unix:{unix} {target}"
        headers = {"Accept-Encoding": "identity", "User-Agent": "palpo-gate-doctor"}
        if host:
            headers["Host"] = host
        kw: dict[str, Any] = {"ssl": verify if verify is not None else False}
        if sni and base.startswith("https:"):
            kw["server_hostname"] = sni
        try:
            async with self._session(unix, source).get(
                    URL(base + target, encoded=True), headers=headers,
                    allow_redirects=False, **kw) as resp:
                body = await resp.content.read(MAX_BODY)
                return Http(what, resp.status, tuple(resp.headers.items()), body)
        except (aiohttp.ClientError, OSError, TimeoutError, ssl.SSLError) as exc:
            return Http(what, error=_error_text(exc))


def _contexts(cafile: str | None) -> tuple[ssl.SSLContext, ssl.SSLContext, ssl.SSLContext]:
    """(look, chain, remote): no verification at all; the chain only, without
    names or dates; everything, as a remote server checks it."""
    look = ssl.create_default_context()
    look.check_hostname = False
    look.verify_mode = ssl.CERT_NONE
    chain = ssl.create_default_context(cafile=cafile)
    chain.check_hostname = False
    chain.verify_flags |= _NO_CHECK_TIME
    remote = ssl.create_default_context()
    if cafile:
        remote.load_verify_locations(cafile)
    return look, chain, remote


async def _open(bind: Bind, ctx: ssl.SSLContext, name: str
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sni = name or None
    if bind.kind == "unix":
        coro = asyncio.open_unix_connection(bind.path, ssl=ctx, server_hostname=sni or "")
    else:
        coro = asyncio.open_connection(checks.connect_host(bind), bind.port, ssl=ctx,
                                       server_hostname=sni or "")
    return await asyncio.wait_for(coro, TIMEOUT)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), TIMEOUT)


async def _tls_probe(bind: Bind, name: str, look: ssl.SSLContext,
                     chain: ssl.SSLContext) -> TlsProbe:
    addr = checks.where(bind)
    try:
        _, writer = await _open(bind, look, name)
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        return TlsProbe(addr, name, error=_error_text(exc))
    sslobj = writer.get_extra_info("ssl_object")
    leaf = sslobj.getpeercert(binary_form=True) or b""
    version = sslobj.version() or ""
    await _close(writer)
    verify_error = ""
    try:
        _, writer = await _open(bind, chain, name)
    except ssl.SSLCertVerificationError as exc:
        verify_error = exc.verify_message or str(exc)
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        verify_error = _error_text(exc)
    else:
        await _close(writer)
    return TlsProbe(addr, name, leaf=leaf, version=version, verify_error=verify_error)


def _forwards(lst: Listener, path: str) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in lst.prefixes)


class _Gate:
    """Requests to one of the gate's own listeners, at its bind address."""

    def __init__(self, client: _Client, lst: Listener, host: str) -> None:
        self.client = client
        self.lst = lst
        self.host = host  # the Host header (and SNI) sent
        b = lst.bind
        scheme = "https" if lst.tls else "http"
        if b.kind == "unix":
            self.base, self.unix = f"{scheme}://localhost", b.path
        else:
            self.base, self.unix = _base(scheme, checks.connect_host(b), b.port), ""

    def get(self, target: str, host: str | None = None, source: str = "") -> Any:
        host = host or self.host or None
        try:
            sni: str | None = discovery.split_host_port(host)[0] if host else None
        except ValueError:
            sni = None
        return self.client.get(self.base, target, host=host,
                               sni=None if sni and discovery.is_ip(sni) else sni,
                               unix=self.unix, source=source)


def _upstream_base(cfg: Config) -> tuple[str, str]:
    u = cfg.upstream
    if u.kind == "unix":
        return "http://localhost", u.path
    return _base("http", u.host, u.port), ""


def _pick_wk_listener(reachable: list[Listener], host: str | None) -> Listener | None:
    """The listener a remote's ``https://<server name>/.well-known/...`` most
    likely reaches: one that answers for that host, a TLS client listener, on
    443 if there is one."""
    def rank(lst: Listener) -> tuple[bool, bool, bool]:
        return (lst.role != "client", lst.tls is None,
                not (lst.bind.kind == "tcp" and lst.bind.port == WELL_KNOWN_PORT))
    answering = [lst for lst in reachable
                 if host is None or lst.hosts is None or host in lst.hosts]
    return min(answering, key=rank, default=None)


async def _well_known_remotely(facts: Facts, client: _Client, dns_: _Dns,
                               remote: ssl.SSLContext) -> tuple[Http | None, Http | None]:
    """The documents at ``https://<server name>/``, fetched as a remote server
    or client fetches them: the name's addresses from DNS, port 443, the
    certificate verified. (None, None) when no address answers."""
    assert facts.server_name is not None
    host, port = discovery.split_host_port(facts.server_name)
    if port is not None or discovery.is_ip(host):
        return None, None  # such names are not delegated (Matrix spec, steps 1-2)
    for address, p in (await _addresses(facts, dns_, host, WELL_KNOWN_PORT))[:4]:
        base = _base("https", address, p)
        server = await client.get(base, "/.well-known/matrix/server", host=host, sni=host,
                                  verify=remote)
        if server.error:
            continue
        return server, await client.get(base, "/.well-known/matrix/client", host=host,
                                        sni=host, verify=remote)
    return None, None


async def _resolve(dns_: _Dns, facts: Facts, server_name: str, m_server: str | None
                   ) -> discovery.Route | None:
    """Run discovery, looking up what it asks for, into facts.dns."""
    for _ in range(64):  # each round adds one answer; a route needs far fewer
        try:
            got = discovery.discover(server_name, m_server, facts.dns)
        except ValueError:
            return None
        if isinstance(got, discovery.Route):
            return got
        facts.dns[(got.qname, got.qtype)] = await dns_.lookup(got.qname, got.qtype)
    return None


async def gather(cfg: Config, *, cafile: str | None = None,
                 resolver: tuple[str, int] | None = None,
                 now: datetime | None = None) -> Facts:
    facts = Facts(cfg=cfg, now=now or datetime.now(UTC), cafile=cafile)
    client = _Client()
    try:
        await _gather(facts, client, resolver)
    finally:
        await client.close()
    return facts


async def _gather(facts: Facts, client: _Client, resolver: tuple[str, int] | None) -> None:
    """Every fact the checks read, step by step, as a remote server and a
    client would find them."""
    look, chain, remote = _contexts(facts.cafile)
    keys = await _upstream_directly(facts, client)
    reachable = await _listener_health(facts, client)
    dns_ = _Dns(resolver)
    facts.dns_resolver = dns_.where
    m_server, base_url = await _delegation(facts, client, dns_, remote, reachable)
    await _tls_of_listeners(facts, reachable, m_server, base_url, look, chain)
    await _discovery(facts, client, dns_, remote, keys)
    await _client_base(facts, client, dns_, remote)
    # Through the gate's own listeners: the admin API, the federation target.
    await _admin(facts, client, reachable)
    await _targets_through(facts, client, reachable)


async def _addresses(facts: Facts, dns_: _Dns, host: str, port: int) -> list[Any]:
    """(address, port) pairs of *host*, asking DNS for what discovery still
    needs (A, then AAAA); the answers are kept in *facts* for the checks."""
    got: Any = None
    for _ in range(4):
        got = discovery.addresses(host, port, facts.dns)
        if not isinstance(got, discovery.Need):
            break
        facts.dns[(got.qname, got.qtype)] = await dns_.lookup(got.qname, got.qtype)
    return list(got[0]) if isinstance(got, tuple) else []


async def _upstream_directly(facts: Facts, client: _Client) -> Http:
    """The upstream's answers, asked directly; returns its key document."""
    base, unix = _upstream_base(facts.cfg)
    answers = await asyncio.gather(*(client.get(base, t, unix=unix)
                                     for t in checks.PROBES.values()))
    facts.upstream = dict(zip(checks.PROBES, answers, strict=True))
    keys = facts.upstream["keys"]
    if keys.status == 200:
        with contextlib.suppress(ValueError, AttributeError):
            name = keys.json().get("server_name")
            facts.server_name = name if isinstance(name, str) and name else None
    return keys


async def _listener_health(facts: Facts, client: _Client) -> list[Listener]:
    """/health on every listener the doctor can reach; returns those."""
    reachable: list[Listener] = []
    for lst in facts.cfg.listeners:
        why = checks.reachable(lst.bind)
        if why:
            facts.unreachable[lst.name] = why
        else:
            reachable.append(lst)
    healths = await asyncio.gather(*(_Gate(client, lst, "").get("/health")
                                     for lst in reachable))
    facts.health = {lst.name: h for lst, h in zip(reachable, healths, strict=True)}
    return reachable


async def _delegation(facts: Facts, client: _Client, dns_: _Dns, remote: Any,
                      reachable: list[Listener]) -> tuple[str | None, str | None]:
    """The delegation documents; returns (m.server, base_url) as served or
    configured."""
    # As the gate answers them for the server name (a gate that answers for
    # it is where https://<server name>/ leads) ...
    s_host = None
    with contextlib.suppress(ValueError):
        s_host = discovery.split_host_port(facts.server_name)[0] if facts.server_name else None
    wk = _pick_wk_listener(reachable, s_host)
    if wk is not None:
        host = facts.server_name or _listener_host(facts, wk)
        gate = _Gate(client, wk, host)
        facts.wk_listener, facts.wk_host = wk.name, host
        facts.wk_server, facts.wk_client = await asyncio.gather(
            gate.get("/.well-known/matrix/server"), gate.get("/.well-known/matrix/client"))
    # ... or, when no listener answers for it or the gate has no document, as
    # they are at https://<server name>/ (the main website often serves them).
    if facts.server_name is not None and (wk is None or facts.wk_server is None
                                          or facts.wk_server.status != 200):
        server, client_doc = await _well_known_remotely(facts, client, dns_, remote)
        if server is not None and (server.status == 200 or wk is None):
            facts.wk_server, facts.wk_client = server, client_doc
            facts.wk_listener, facts.wk_host = "", facts.server_name
    wkc = facts.cfg.well_known
    m_server = checks.server_doc(facts.wk_server) or (wkc.server if wkc else None) or None
    base_url = checks.client_doc(facts.wk_client) or (wkc.client if wkc else None) or None
    return m_server, base_url


async def _tls_of_listeners(facts: Facts, reachable: list[Listener], m_server: str | None,
                            base_url: str | None, look: Any, chain: Any) -> None:
    """TLS of every listener, for every name it serves."""
    probes = []
    for lst in reachable:
        if lst.tls is None:
            continue
        names = checks.listener_names(facts.cfg, lst, m_server, base_url, facts.server_name)
        facts.tls_names[lst.name] = names
        # No name known: one handshake without SNI still shows chain and dates.
        probes.append((lst.name, [_tls_probe(lst.bind, n, look, chain) for n in names or ("",)]))
    for name, coros in probes:
        facts.tls[name] = list(await asyncio.gather(*coros))


async def _discovery(facts: Facts, client: _Client, dns_: _Dns, remote: Any,
                     keys: Http) -> None:
    """Server discovery, as a remote server does it, up to the key document."""
    if facts.server_name is None:
        return
    served = checks.server_doc(facts.wk_server)
    route = await _resolve(dns_, facts, facts.server_name, served)
    if served is not None:
        await _resolve(dns_, facts, facts.server_name, None)  # the fallback: SRV
    if route is None:
        return
    for address, port in route.endpoints[:8]:
        http = await client.get(_base("https", address, port), checks.PROBES["keys"],
                                host=route.host_header, sni=route.tls_name, verify=remote)
        facts.route_attempts.append(Attempt(address, port, http))
        if checks.same_keys(http, keys):
            break


async def _client_base(facts: Facts, client: _Client, dns_: _Dns, remote: Any) -> None:
    """The client base URL, as a client follows it."""
    client_base = checks.client_doc(facts.wk_client)
    if client_base is None:
        return
    scheme, host, port, path = checks.base_url_parts(client_base)
    found = await _addresses(facts, dns_, host, port)
    default = 443 if scheme == "https" else 80
    host_header = host if port == default else discovery.join_host_port(host, port)
    for address, p in found[:8]:
        http = await client.get(_base(scheme, address, p),
                                path + checks.PROBES["versions"], host=host_header,
                                sni=host, verify=remote if scheme == "https" else None)
        facts.client_attempts.append(Attempt(address, p, http))
        if http.same_answer(facts.upstream["versions"]):
            break


async def _targets_through(facts: Facts, client: _Client, reachable: list[Listener]) -> None:
    """The federation probes through each listener that forwards them."""
    for lst in reachable:
        if not all(_forwards(lst, checks.PROBES[p].split("?")[0]) for p in checks.TARGET_PROBES):
            continue
        gate = _Gate(client, lst, _listener_host(facts, lst))
        got_all = await asyncio.gather(*(gate.get(checks.PROBES[p])
                                         for p in checks.TARGET_PROBES))
        facts.through[lst.name] = dict(zip(checks.TARGET_PROBES, got_all, strict=True))


def _listener_host(facts: Facts, lst: Listener) -> str:
    """A Host the listener answers for (its hosts restrict it)."""
    names = facts.tls_names.get(lst.name) or ()
    if lst.hosts:
        return sorted(lst.hosts)[0]
    if names:
        return names[0]
    return checks.where(lst.bind) if lst.bind.kind == "tcp" else "localhost"


def _admin_source(facts: Facts, lst: Listener) -> str | None:
    """An address to send from that admin.allow_from does not allow: the
    outside, as far as loopback can play it. None: every candidate is allowed."""
    b = lst.bind
    if b.kind != "tcp":
        return ""
    try:
        target = ipaddress.ip_address(checks.connect_host(b))
    except ValueError:
        return ""
    candidates = list(_LOOPBACK_SOURCES[target.version]) if target.is_loopback \
        else [str(target)]
    allowed = facts.cfg.admin.allow_from
    for c in candidates:
        if not any(ipaddress.ip_address(c) in n for n in allowed):
            return c
    if any(n.prefixlen == 0 for n in allowed):
        return candidates[0]  # allowed from everywhere: any address is the outside
    facts.admin_untested = (f"every address the doctor can send from ({', '.join(candidates)})"
                            " is in admin.allow_from")
    return None


async def _admin(facts: Facts, client: _Client, reachable: list[Listener]) -> None:
    for lst in reachable:
        source = _admin_source(facts, lst)
        if source is None:
            continue
        gate = _Gate(client, lst, _listener_host(facts, lst))
        for prefix in facts.cfg.admin.blocked_prefixes:
            path = prefix.rstrip("/") + checks.ADMIN_PROBE_SUFFIX
            http = await gate.get(path, source=source)
            facts.admin.append(AdminProbe(lst.name, source or "unix socket", path, http))
