"""The request handler: one client request in, one response out.

This module is the IO shell around the pure core. For each request it asks
:mod:`routing` what to do, answers the gate's own endpoints (``/health``,
``.well-known``, errors, each from its row of :mod:`errors`), and for
forwarded requests builds the head with :mod:`headers`, streams the body both
ways through an :mod:`upstream` connection, and enforces the body limits.
Every failure goes through the one ``except GateError`` funnel in
:meth:`ListenerHandler._forward`, which answers as :data:`errors.FAILURES`
says.

Shared state lives in :class:`Generation` (one config, its pool, its
documents); per-listener state in :class:`ListenerHandler`; per-request
state stays in local variables.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable
from email.utils import formatdate
from typing import Any

from aiohttp import web

from . import clients, compat, spool, wellknown
from . import headers as hdr
from .accesslog import AccessLog
from .config import UNIX_PEER, Config, Listener, join_host_port
from .errors import (
    LOCAL_ANSWERS,
    MISDIRECTED,
    VERSION_NOT_SUPPORTED,
    BadRequestBody,
    BodyTimeout,
    BodyTooLarge,
    ClientTooSlow,
    GateError,
    Outcome,
    UpstreamBroken,
    error_body,
)
from .exchange import may_retry
from .metrics import Registry, Series
from .ratelimit import Policy
from .response import ProxiedResponse
from .routing import ALLOW, Action, Decision, Router, media_upload
from .upstream import Connection, Pool

log = logging.getLogger("palpo_gate")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: The route class of each decision, as the metrics label it.
_ROUTE = {
    Action.FORWARD: "forward", Action.ADMIN: "admin", Action.HEALTH: "health",
    Action.WELL_KNOWN_SERVER: "well_known", Action.WELL_KNOWN_CLIENT: "well_known",
    Action.NOT_FOUND: "not_found", Action.BAD_REQUEST: "bad_request",
}
_NO_BODY_STATUSES = frozenset({204, 304})
# Bound once: a module global is one dict lookup, an Action member through
# its class two, on every request.
_FORWARD = Action.FORWARD
_ADMIN = Action.ADMIN
_HEALTH = Action.HEALTH
_WK_HEADERS = (*wellknown.CORS_HEADERS, wellknown.CACHE_CONTROL)
#: In a target, the parameter of a Matrix long-poll (``/sync?timeout=30000``)
_LONG_POLL = "timeout="
#: ACME HTTP-01 validation requests (RFC 8555 section 8.3)
_ACME_CHALLENGE = "/.well-known/acme-challenge/"


class Generation:
    """Everything built from one config: shared by all listeners of that config."""

    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop,
                 metrics: Registry | None = None) -> None:
        self.cfg = cfg
        #: the process's metrics (they outlive generations); None when off
        self.metrics = metrics
        self.pool = Pool(cfg.upstream, loop)
        self.documents = wellknown.build(cfg.well_known) if cfg.well_known else None
        self.access = AccessLog(cfg.log.access)
        self.allow_admin = cfg.admin.allow_from
        trusted = cfg.forwarding.trusted_proxies
        self.trusted = tuple(n for n in trusted if not isinstance(n, str))
        self.rid_name = cfg.forwarding.request_id_header.encode()
        self.rid_lower = self.rid_name.lower()
        self.buffer_uploads = cfg.forwarding.buffer_chunked_uploads
        self.limits = cfg.limits
        self.read_timeout = cfg.upstream.read_timeout
        # -- client addresses and limits (clients.py, ratelimit.py)
        #: peers on UNIX-socket listeners are trusted proxies when "unix:" is listed
        self.trusted_set = clients.Trusted(self.trusted, unix=UNIX_PEER in trusted)
        #: [rate_limits] of this config; set by the Gate, whose storage outlives generations
        self.rate: Policy | None = None


def _in(addr: str, networks: tuple[Any, ...]) -> bool:
    if not networks or not addr:
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:  # type: ignore[union-attr]
        ip = ip.ipv4_mapped  # type: ignore[union-attr]
    return any(ip in net for net in networks)


class ListenerHandler:
    """The aiohttp low-level handler of one listener."""

    def __init__(self, gen: Generation, listener: Listener) -> None:
        self.gen = gen
        self.listener = listener
        self.name = listener.name
        self.router = Router(listener.prefixes, gen.cfg.admin.blocked_prefixes,
                             gen.documents is not None)
        self.proto = b"https" if listener.tls else b"http"
        self.hosts = listener.hosts
        #: what this listener's upstream request heads share, and the pass that
        #: builds them; the port added to a Host without one is set once the
        #: socket is bound
        self.heads = hdr.RequestHeads(
            self.proto, gen.rid_name, listener.bind.port if listener.bind.kind == "tcp" else 0,
            b"localhost", gen.limits.max_body_size, media_upload if gen.buffer_uploads else None)
        #: set on reload: this listener's connections finish on this generation,
        #: each response announcing ``Connection: close``
        self.retired = False
        #: set by the listener (plain HTTP, [acme] set): answers ACME HTTP-01
        self.acme: Any = None
        # What every request reads of the generation, bound once.
        self._trusted = gen.trusted_set if gen.trusted_set else None
        self._pool = gen.pool
        self._read_timeout = gen.read_timeout
        #: whether a request's duration is measured (access log or metrics)
        self._timed = gen.access.enabled or gen.metrics is not None
        #: the metrics series of forwarded requests, per route (Registry.series):
        #: looked up once here, not on every request
        metrics = gen.metrics
        self._forward_series = (None if metrics is None
                                else metrics.series(self.name, _ROUTE[_FORWARD]))
        self._admin_series = (None if metrics is None
                              else metrics.series(self.name, _ROUTE[_ADMIN]))

    def bound(self, sockname: Any) -> None:
        """Record the address the listener socket really got (port 0 → a real port)."""
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            port = int(sockname[1])
            self.heads.bind(port, join_host_port(str(sockname[0]), port).encode())

    # -- dispatch ---------------------------------------------------------------

    def __call__(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        """Decide, then return the coroutine that answers: a plain function, so
        that a forwarded request runs one coroutine frame deep."""
        # The request's method, raw target, version and raw headers, as
        # request.method, .raw_path, .version and .raw_headers give them.
        message, protocol = compat.request_parts(request)
        method = message.method
        target = message.path
        decision = self.router.decide(method, target)
        action = decision.action
        gen = self.gen
        version = message.version
        if version != (1, 1) and version != (1, 0):
            # Refused before the handler (listeners.py); kept for any path around it.
            return _ready(self._answer(VERSION_NOT_SUPPORTED, True, hdr.new_request_id()))
        if action is _HEALTH:
            resp: web.StreamResponse = _health(method)
            if self.retired:
                resp.force_close()
            if gen.metrics is not None:
                gen.metrics.observe(self.name, "health", resp.status, 0.0, 0, 0)
            return _ready(resp)
        try:
            client = protocol.client_addr  # read once per connection (listeners.py)
        except AttributeError:
            client = _client_addr(request)
        # The connection address (TCP peer or PROXY header) is what X-Forwarded-For
        # appends; behind trusted proxies the client is further left (clients.py).
        peer = client
        trusted_set = self._trusted
        trusted = trusted_set is not None and peer in trusted_set
        if trusted:
            client = clients.forwarded_client(peer, clients.xff_values(message.raw_headers),
                                              trusted_set)
        if self.acme is not None and target.startswith(_ACME_CHALLENGE):
            # RFC 8555 section 8.3, for any Host: answered here, never forwarded.
            resp = self.acme.http01_response(method, target)
            return _ready(self._local(request, decision, client, self._rid(request), resp,
                                      "well_known"))
        if self.hosts is not None and not self._host_allowed(request):
            rid = self._rid(request)
            resp = self._answer(MISDIRECTED, decision.matrix, rid)
            return _ready(self._local(request, decision, client, rid, resp))
        if action is _FORWARD or (action is _ADMIN and _in(client, gen.allow_admin)):
            if method != "OPTIONS" or not decision.matrix:
                # The client's request id comes out of the head's one pass
                # (its checks are made in _forward, through the funnel).
                rid, req = self.heads.build(method, target, message.raw_headers, peer, trusted)
                series = self._forward_series if action is _FORWARD else self._admin_series
                rate = gen.rate
                if rate is not None and (rate.every or (method == "POST" and rate.posts)):
                    rules = rate.rules(method, decision.path)  # [rate_limits] (ratelimit.py)
                    if rules:
                        return self._forward_limited(rate, rules, request, method, target,
                                                     decision.matrix, client, rid, series, req)
                return self._forward(request, method, target, decision.matrix, client, rid,
                                     series, req)
            # A CORS preflight: browsers reject any non-2xx answer to it, so
            # forwarding it would turn an upstream outage into a CORS failure
            # instead of a readable 502. The Matrix client-server spec ("Web
            # Browser Clients") has OPTIONS answered with the CORS headers and
            # no endpoint logic, which needs nothing from the upstream.
            return _ready(self._local(request, decision, client, self._rid(request),
                                      _PREFLIGHT.response()))
        return _ready(self._local(request, decision, client, self._rid(request), None))

    def _rid(self, request: web.BaseRequest) -> bytes:
        """The request id of a request the gate answers itself: the client's
        when sane, else a new one (forwarded requests get theirs from
        :meth:`headers.RequestHeads.build`)."""
        rid = hdr.header_value(request.raw_headers, self.gen.rid_lower)
        if rid is None or not hdr.sane_request_id(rid):
            return hdr.new_request_id()
        return rid

    def _local(self, request: web.BaseRequest, decision: Decision, client: str, rid: bytes,
               resp: web.StreamResponse | None, route: str | None = None
               ) -> web.StreamResponse:
        """A request the gate answers itself (*resp*, else by its decision):
        counted (under *route*, else its decision's) and logged like forwarded ones."""
        action = decision.action
        if resp is None:
            if action is Action.WELL_KNOWN_SERVER or action is Action.WELL_KNOWN_CLIENT:
                resp = self._well_known(request.method, action, rid)
            elif action is Action.OPTIONS_ASTERISK:
                resp = web.Response(status=200, headers={"Allow": ALLOW})
            else:
                resp = self._answer(LOCAL_ANSWERS[action], decision.matrix, rid,
                                    decision.reason)
        if self.retired:
            resp.force_close()
        gen = self.gen
        if gen.access.enabled:
            gen.access.write(request, self.name, client, _Record(), time.monotonic(), rid, resp)
        if gen.metrics is not None:
            gen.metrics.observe(self.name, route or _ROUTE.get(action, "other"), resp.status,
                                0.0, 0, 0)
        return resp

    # -- local answers -------------------------------------------------------------

    def _host_allowed(self, request: web.BaseRequest) -> bool:
        host = request.headers.get("Host", "").lower()
        if host.startswith("["):
            host = host[: host.find("]") + 1]
        else:
            host = host.rsplit(":", 1)[0] if ":" in host else host
        assert self.hosts is not None
        return host.rstrip(".") in self.hosts

    def _answer(self, row: Outcome, matrix: bool, rid: bytes, reason: str = ""
                ) -> web.Response:
        """The answer a row of the :mod:`errors` tables gives; *reason* fills
        its ``{reason}``."""
        text = reason if row.text is None else row.text.format(reason=reason)
        resp = self._error(row.status, text, matrix if row.matrix is None else row.matrix,
                           rid, close=row.close, errcode=row.errcode)
        if row.allow is not None:
            resp.headers["Allow"] = row.allow
        return resp

    def _error(self, status: int, reason: str, matrix: bool, rid: bytes,
               close: bool = False, errcode: str | None = None) -> web.Response:
        body, ctype = error_body(status, reason, matrix, errcode)
        resp = web.Response(status=status, body=body, headers={"Content-Type": ctype})
        if matrix:
            resp.headers.extend(wellknown.CORS_HEADERS)
        resp.headers[self.gen.rid_name.decode()] = rid.decode()
        if close:
            resp.force_close()
        return resp

    def _well_known(self, method: str, action: Action, rid: bytes) -> web.Response:
        docs = self.gen.documents
        assert docs is not None
        if method == "OPTIONS":
            return web.Response(status=204, headers=_WK_HEADERS)
        if method not in ("GET", "HEAD"):
            resp = self._error(405, "method not allowed", True, rid)
            resp.headers["Allow"] = "GET, HEAD, OPTIONS"
            return resp
        body = docs.server if action is Action.WELL_KNOWN_SERVER else docs.client
        if body is None:
            return self._error(404, "not configured on this gateway", True, rid)
        resp = web.Response(status=200, body=body, headers=_WK_HEADERS)
        resp.content_type = "application/json"
        return resp

    # -- forwarding -------------------------------------------------------------------

    async def _forward_limited(self, rate: Policy, rules: Any, request: web.BaseRequest,
                               method: str, target: str, matrix: bool, client: str, rid: bytes,
                               series: Series | None, req: hdr.RequestHead
                               ) -> web.StreamResponse:
        """[rate_limits]: a 429 of the gate's own when *client* is over a limit
        (ratelimit.py), else forward."""
        resp = await rate.check(rules, client)
        if resp is None:
            return await self._forward(request, method, target, matrix, client, rid, series,
                                       req)
        gen = self.gen
        resp.headers[gen.rid_name.decode()] = rid.decode()
        if self.retired:
            resp.force_close()
        rec = _Record()
        rec.error = "rate_limited"
        if gen.access.enabled:
            gen.access.write(request, self.name, client, rec, time.monotonic(), rid, resp)
        if gen.metrics is not None:
            gen.metrics.observe(self.name, "rate_limited", 429, 0.0, 0, 0)
        return resp

    async def _forward(self, request: web.BaseRequest, method: str, target: str,
                       matrix: bool, client: str, rid: bytes, series: Series | None,
                       req: hdr.RequestHead) -> web.StreamResponse:
        """Forward one request (again if :func:`exchange.may_retry` allows), relay
        the response; failures go to the one funnel, :meth:`_failed`. *client*
        is the client (logs, limits); *req* its head, as
        :meth:`headers.RequestHeads.build` made it; *series* where its metrics go
        (None: off)."""
        started = time.monotonic() if self._timed else 0.0
        rec = _Record()
        resp: web.StreamResponse | None = None
        try:
            # RequestHeads.build: the head, the refusal of a head the gate will
            # not take (400 / 413, docs/DESIGN.md sections 3, 5), the framing,
            # a chunked upload to collect first (spool.with_length frames it).
            head, refusal, has_body, chunked, buffer, expect = req
            if refusal is not None:
                raise refusal
            if expect:
                _invite_body(request)
            if buffer:
                request, head = await self._collect(request, head, rec)
            read_timeout = self._read_timeout
            pool = self._pool
            if _LONG_POLL in target:
                _drop_idle_timer(request)
            for attempt in (0, 1):
                conn = rec.conn = (pool.idle() if attempt == 0 else None) or await pool.connect()
                conn.begin(method == "HEAD")
                conn.write(head)
                pump = None
                if has_body:
                    limits = self.gen.limits
                    pump = rec.pump = _BodyPump(request, conn, chunked, limits.max_body_size,
                                                limits.body_timeout, read_timeout)
                try:
                    # No response deadline while the body is sent (_BodyPump.sending).
                    while (fut := conn.wait_head(None if pump is not None and pump.sending
                                                 else read_timeout)) is not None:
                        await fut
                    break
                except UpstreamBroken:
                    if attempt or not _retry(rec, conn, method):
                        raise
            out, last = self._respond(request, rec, conn, method, rid)
            while not last:
                data = conn.take()
                if not data and (fut := conn.wait_body(read_timeout)) is not None:
                    await fut
                    continue
                rec.bytes_out += len(data)
                # The last piece, the head if still pending, the body's end: one write.
                last = conn.drained()
                if out.send(data, last):
                    # The client is behind: hold the upstream too, so a
                    # stalled client costs one piece, not one per side.
                    conn.pause()
                    await _drain(out, self.gen.limits.body_timeout)
            conn.finish(pump is None or pump.done())
            rec.conn = None
            resp = out
        except GateError as exc:
            resp = self._failed(exc, request, rec, matrix, rid)
        except ConnectionError:
            rec.error = "client_gone"  # the client went away: not an error of anyone's
            request.protocol.force_close()
            resp = rec.response or web.Response(status=499)
        finally:
            # Release what the request held; its access line and metrics.
            if (pump := rec.pump) is not None:
                rec.bytes_in = pump.consumed
                pump.cancel()
            if rec.conn is not None:
                rec.conn.finish(False)
            if rec.spooled is not None:
                rec.spooled.close()
            access = self.gen.access
            if access.enabled:
                access.write(request, self.name, client, rec, started, rid, resp)
            if series is not None:
                series.observe(resp.status if resp is not None else 499,
                               time.monotonic() - started, rec.bytes_in, rec.bytes_out)
        return resp

    async def _collect(self, request: web.BaseRequest, head: bytes, rec: _Record
                       ) -> tuple[web.BaseRequest, bytes]:
        """forwarding.buffer_chunked_uploads: the whole body first, then the
        head with its length and the body read back (spool.py)."""
        limits = self.gen.limits
        spooled = rec.spooled = await spool.collect(request, limits.max_body_size,
                                                    limits.body_timeout)
        return spool.replay(request, spooled), spool.with_length(head, spooled.size)

    def _respond(self, request: web.BaseRequest, rec: _Record, conn: Connection, method: str,
                 rid: bytes) -> tuple[ProxiedResponse, bool]:
        """Begin the client's response from the upstream's head; whether it
        is already whole (no body)."""
        status, reason, up_headers = conn.exchange.head()
        rec.upstream_status = status
        block, length_out = hdr.response_block(up_headers, self.gen.rid_name, rid)
        no_body = method == "HEAD" or status in _NO_BODY_STATUSES
        out = rec.response = ProxiedResponse(status, reason, block, length_out, no_body)
        if self.retired:
            out.force_close()
        out.start(request)
        if no_body:
            out.send(b"", last=True)
        return out, no_body

    def _failed(self, exc: GateError, request: web.BaseRequest, rec: _Record, matrix: bool,
                rid: bytes) -> web.StreamResponse:
        """The funnel: the answer to *exc*, as its row of errors.FAILURES says."""
        row = exc.outcome
        rec.error = row.word
        metrics = self.gen.metrics
        if metrics is not None and row.metric is not None:
            metrics.upstream_error(row.metric)
        _log_detail(exc, self.name, rid)
        if rec.response is not None and rec.response.started:
            # The response has begun: the only honest signal left is to
            # close the connection (never a clean short body).
            request.protocol.force_close()
            return rec.response
        return self._error(row.status, exc.public, matrix, rid, close=row.close,
                           errcode=row.errcode)


class _BodyPump:
    """Copies the client's request body to the upstream as it arrives."""

    def __init__(self, request: web.BaseRequest, conn: Connection, chunked: bool,
                 limit: int, body_timeout: float, write_timeout: float) -> None:
        self.consumed = 0
        #: True until the body is sent (or the pump ended otherwise). Until
        #: then the wait for the response has no deadline: limits.body_timeout
        #: polices the upload (a slow client's upload is not a slow
        #: upstream), and an early answer (401 mid-upload) still ends the wait.
        self.sending = True
        self._request = request
        self._conn = conn
        self._chunked = chunked
        self._limit = limit
        self._body_timeout = body_timeout
        self._write_timeout = write_timeout
        self._task = asyncio.get_running_loop().create_task(self._run(), name="body-pump")

    def done(self) -> bool:
        return self._task.done() and not self._task.cancelled() and \
            self._task.exception() is None

    def cancel(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        conn = self._conn
        try:
            content = self._request.content
            while True:
                try:
                    async with asyncio.timeout(self._body_timeout):
                        data = await content.readany()
                except TimeoutError:
                    raise BodyTimeout("request body stalled") from None
                if not data:
                    break
                self.consumed += len(data)
                if self.consumed > self._limit:
                    raise BodyTooLarge(f"request body over the limit of {self._limit} bytes")
                if self._chunked:
                    conn.write(b"%x\r\n" % len(data) + data + b"\r\n")
                else:
                    conn.write(data)
                await conn.drain(self._write_timeout)
            if self._chunked:
                conn.write(b"0\r\n\r\n")
        except GateError as exc:
            conn.fail(exc)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # the client's body could not be read
            conn.fail(BadRequestBody(f"request body unreadable: {exc}"))
        finally:
            # The wait for the response head gets its deadline from now on.
            self.sending = False
            conn.wake()


class _Record:
    """What the access log says about one request, and what it holds while
    it is forwarded (released at the end of :meth:`ListenerHandler._forward`)."""

    __slots__ = ("bytes_in", "bytes_out", "conn", "error", "pump", "response", "spooled",
                 "upstream_status")

    def __init__(self) -> None:
        self.upstream_status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.error = ""
        self.response: ProxiedResponse | None = None
        self.conn: Connection | None = None
        self.pump: _BodyPump | None = None
        self.spooled: spool.SpooledBody | None = None


def _invite_body(request: web.BaseRequest) -> None:
    """``Expect: 100-continue``: web.Server never answers it itself. The
    request has passed every check of its head (size, Host), so the body is
    invited now (RFC 9110 section 10.1.1), never before a refusal."""
    if request.version >= (1, 1):
        request.transport.write(_CONTINUE)  # type: ignore[union-attr]


def _drop_idle_timer(request: web.BaseRequest) -> None:
    """A Matrix long-poll (/sync, /events): held for up to its timeout, with
    no need of its connection's idle timer meanwhile (docs/DESIGN.md section 13)."""
    drop = getattr(request.protocol, "drop_idle_timer", None)
    if drop is not None:
        drop()


def _retry(rec: _Record, conn: Connection, method: str) -> bool:
    """Whether to send the request again after the upstream dropped *conn*
    unanswered (:func:`exchange.may_retry`); if so, *conn* is let go."""
    pump = rec.pump
    if not may_retry(method, conn.reused, conn.got_bytes,
                     0 if pump is None else pump.consumed):
        return False
    if pump is not None:
        pump.cancel()
        rec.pump = None
    conn.finish(reusable=False)
    rec.conn = None
    return True


async def _drain(out: ProxiedResponse, timeout: float) -> None:
    """Wait for a client that is behind, for at most *timeout* seconds."""
    try:
        async with asyncio.timeout(timeout):
            await out.drain()
    except TimeoutError:
        raise ClientTooSlow("client stopped reading the response") from None


def _log_detail(exc: GateError, listener: str, rid: bytes) -> None:
    """The detail of a failure, with the request id that ties it to the access
    line. The client was told ``exc.public`` only: the detail may name the
    upstream's address or quote a parser."""
    if exc.status >= 500:
        level = logging.WARNING
    elif exc.public != exc.reason:
        level = logging.INFO
    else:
        return  # the client was told all there is; the access line has the word
    # Escaped: a parser's message may quote what the peer sent.
    detail = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in exc.reason)
    log.log(level, "%s: %s (listener=%s rid=%s)", exc.log_word, detail, listener,
            rid.decode())


async def _ready(resp: web.StreamResponse) -> web.StreamResponse:
    return resp


def _client_addr(request: web.BaseRequest) -> str:
    """The client's IP address as text; "unix:" on a UNIX socket (as nginx)."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return str(peer[0]) if isinstance(peer, tuple) else "unix:"


def _health(method: str) -> web.Response:
    if method in ("GET", "HEAD"):
        return web.Response(text="OK\n")
    return web.Response(status=405, text="method not allowed\n", headers={"Allow": "GET, HEAD"})


class _Preflight:
    """The 204 answer to a CORS preflight, as prebuilt bytes: the CORS header
    lines once, the Date line once a second (RFC 9110 section 6.6.1). It goes
    out as a ProxiedResponse, which sends a header block as given: one write."""

    __slots__ = ("_block", "_cors", "_second")

    def __init__(self) -> None:
        self._cors = b"".join(b"%s: %s\r\n" % (name.encode(), value.encode())
                              for name, value in wellknown.CORS_HEADERS)
        self._second = -1
        self._block = b""

    def response(self) -> ProxiedResponse:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._block = b"%sDate: %s\r\n" % (self._cors,
                                                formatdate(now, usegmt=True).encode())
        return ProxiedResponse(204, b"No Content", self._block, None, True)


_PREFLIGHT = _Preflight()
