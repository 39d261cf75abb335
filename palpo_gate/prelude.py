"""What happens on a client connection before HTTP.

This module owns the connection's first moments, when a listener asks for
them: reading the PROXY protocol header (``proxy_protocol = true``), the TLS
handshake that follows it on a TLS listener, and the per-client cap on
concurrent connections (``rate_limits.connections``). Then it hands the
connection, the bytes read past the header and the client address to
aiohttp's request handler (:class:`listeners._HeadTimeoutProtocol`), and is out
of the way. A listener that needs none of this never sees this module.

- The header is taken only from a peer in ``forwarding.trusted_proxies``;
  another peer is closed at once. A header that is missing, malformed,
  truncated, over its size cap or slower than ``limits.header_timeout``
  (from the accept) closes the connection; nothing is forwarded.
- TLS: a balancer writes the header *before* the TLS handshake, so on a TLS
  listener with the PROXY protocol the asyncio server is plain and the
  handshake starts here, with ``loop.start_tls``, once the header is read.
  Until then the header is read exactly (:class:`proxyproto.NeedMore` says
  how much at least is missing), so no byte of the ClientHello is consumed.
- The connection cap counts per connection address (the PROXY address or
  the TCP peer); trusted proxies carry many clients and are not capped. A
  connection over the cap is answered 429 on its first request and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import Awaitable
from types import SimpleNamespace
from typing import Any

from aiohttp import web, web_protocol

from . import headers as hdr
from . import proxyproto
from .clients import Trusted, canonical
from .ratelimit import RateLimits, refusal

log = logging.getLogger("palpo_gate")

#: One read of a connection in its prelude: a version 2 header at its cap fits,
#: and thousands of slow connections do not each hold a large buffer.
_READ_SIZE = proxyproto.V2_MAX_LENGTH
#: Bytes kept while a connection waits for its slot before reading pauses.
_MAX_PENDING = 65536


def for_listener(lst: Any, cfg: Any, gen: Any, context: ssl.SSLContext | None,
                 limits: RateLimits) -> Prelude | None:
    """The prelude of *lst*'s connections, or None when it needs none."""
    cap = cfg.rate_limits.connections
    if not lst.proxy_protocol and not cap:
        return None
    return Prelude(proxy_protocol=lst.proxy_protocol, trusted=gen.trusted_set,
                   header_timeout=cfg.limits.header_timeout, tls=context, limits=limits,
                   cap=cap, gen=gen, listener=lst.name)


class Prelude:
    """The prelude of one listener's connections (one per listener and generation)."""

    def __init__(self, *, proxy_protocol: bool, trusted: Trusted, header_timeout: float,
                 tls: ssl.SSLContext | None, limits: RateLimits | None, cap: int,
                 gen: Any = None, listener: str = "") -> None:
        self.proxy_protocol = proxy_protocol
        self.trusted = trusted
        self.header_timeout = header_timeout
        #: set on TLS listeners with the PROXY protocol: the handshake follows the header
        self.tls = tls if proxy_protocol else None
        self.limits = limits if cap > 0 else None
        self.cap = cap
        self.pending: set[_PreludeProtocol] = set()
        #: handed-over handlers holding a connection slot, and for which address
        self.held: dict[Any, str] = {}
        #: the generation and listener name, for the refusals' log lines and metrics
        self.gen = gen
        self.listener = listener

    def __call__(self, inner: web_protocol.RequestHandler) -> _PreludeProtocol:
        return _PreludeProtocol(self, inner)

    def connection_lost(self, handler: Any) -> None:
        """The handed-over connection of *handler* ended: give its slot back."""
        addr = self.held.pop(handler, None)
        if addr is not None and self.limits is not None:
            self.limits.release_connection(addr)

    def close(self) -> None:
        """Close the connections still in their prelude (the gate is stopping)."""
        for proto in list(self.pending):
            proto.abort("the gate is stopping")

    def refuser(self, addr: str) -> web_protocol.RequestHandler:
        """A handler that answers every request of *addr* 429 and closes."""
        return web.Server(functools.partial(self._refuse, addr), access_log=None)()

    async def _refuse(self, addr: str, request: web.BaseRequest) -> web.StreamResponse:
        resp = refusal("connections", 1000)
        resp.force_close()
        gen = self.gen
        if gen is None:
            return resp
        rid = hdr.header_value(request.raw_headers, gen.rid_lower)
        if not hdr.sane_request_id(rid):
            rid = hdr.new_request_id()
        assert rid is not None
        resp.headers[gen.rid_name.decode()] = rid.decode()
        if gen.access.enabled:
            rec = SimpleNamespace(upstream_status=0, bytes_in=0, bytes_out=0,
                                  error="rate_limited", response=None)
            gen.access.write(request, self.listener, addr, rec, time.monotonic(), rid, resp)
        if gen.metrics is not None:
            gen.metrics.observe(self.listener, "rate_limited", 429, 0.0, 0, 0)
        return resp


class _PreludeProtocol(asyncio.BufferedProtocol):
    def __init__(self, prelude: Prelude, inner: web_protocol.RequestHandler) -> None:
        self.p = prelude
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.addr = ""
        self.buf = b""
        #: reading the PROXY header; how many bytes the next read may take
        self.in_header = prelude.proxy_protocol
        self.want = proxyproto.V1_MIN_LENGTH if prelude.tls is not None else _READ_SIZE
        self.paused = False
        self.done = False
        self._rbuf = bytearray(_READ_SIZE)
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    # -- asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:
            return  # the TLS transport of start_tls: it is taken from its return value
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = canonical(str(peer[0])) if isinstance(peer, tuple) else "unix:"
        self.addr = self.peer
        self.p.pending.add(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.p.header_timeout, self._timed_out)
        if self.in_header:
            if self.peer not in self.p.trusted:
                log.debug("closing a connection from %s: the PROXY protocol header is "
                          "taken only from forwarding.trusted_proxies", self.peer)
                self.abort("")
        else:
            self._admit()

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._rbuf)[:self.want if self.in_header else _READ_SIZE]

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self._rbuf[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.buf += data
        if not self.in_header:
            if len(self.buf) > _MAX_PENDING and self.transport is not None and not self.paused:
                self.paused = True
                self.transport.pause_reading()
            return
        event = proxyproto.parse(self.buf)
        if type(event) is proxyproto.NeedMore:
            if self.p.tls is not None:
                self.want = event.at_least
            return
        if type(event) is proxyproto.Invalid:
            log.debug("closing a connection from %s: %s", self.peer, event.reason)
            self.abort("")
            return
        assert type(event) is proxyproto.Header
        self.in_header = False
        self.buf = self.buf[event.length:]
        if event.addr is not None:
            self.addr = canonical(event.addr)
        if self.p.tls is not None:
            # Stop reading now: the ClientHello is start_tls's to read (uvloop
            # would otherwise read on into this protocol's buffer at once).
            assert self.transport is not None and not self.buf  # read exactly up to here
            self.transport.pause_reading()
            self._task = asyncio.get_running_loop().create_task(self._start_tls())
        else:
            self._admit()

    def eof_received(self) -> bool | None:
        if not self.done:
            log.debug("closing a connection from %s: it ended before its request", self.peer)
            self.abort("")
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.done:
            self._finish()
            if self._task is not None:
                self._task.cancel()

    # -- the steps

    async def _start_tls(self) -> None:
        assert self.transport is not None and self.p.tls is not None
        loop = asyncio.get_running_loop()
        try:
            # self stays the protocol above TLS until the hand-over: bytes that
            # arrive with the end of the handshake are kept, not lost.
            tls = await loop.start_tls(self.transport, self, self.p.tls, server_side=True,
                                       ssl_handshake_timeout=self.p.header_timeout)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.debug("TLS handshake after the PROXY header from %s failed: %r", self.addr, exc)
            self.abort("")
            return
        if self.done or tls is None:
            if tls is not None:
                tls.abort()
            return
        self.transport = tls  # type: ignore[assignment]
        self._admit()

    def _admit(self) -> None:
        limits = self.p.limits
        if limits is None or self.addr in self.p.trusted or self.addr == "unix:":
            self._hand_over(slot=False)
            return
        try:
            got = limits.acquire_connection(self.addr, self.p.cap)
        except Exception:  # the supervisor's store is gone: fail open
            self._hand_over(slot=False)
            return
        if got is True or got is False:
            self._admitted(got)
        else:
            self._task = asyncio.get_running_loop().create_task(self._wait_slot(got))

    async def _wait_slot(self, got: Awaitable[int]) -> None:
        try:
            ok = bool(await asyncio.wait_for(got, 0.5))
        except Exception:
            self._hand_over(slot=False)  # fail open
            return
        if self.done:
            if ok and self.p.limits is not None:
                self.p.limits.release_connection(self.addr)
            return
        self._admitted(ok)

    def _admitted(self, ok: bool) -> None:
        if ok:
            self._hand_over(slot=True)
            return
        assert self.p.limits is not None
        self.p.limits.connection_refused(self.addr)
        self.inner = self.p.refuser(self.addr)
        self._hand_over(slot=False)

    def _hand_over(self, slot: bool) -> None:
        """aiohttp's handler takes the connection from here on."""
        transport = self.transport
        assert transport is not None
        self._finish()
        inner = self.inner
        transport.set_protocol(inner)
        inner.connection_made(transport)
        if slot:
            self.p.held[inner] = self.addr
        if hasattr(inner, "client_addr"):
            inner.client_addr = self.addr
        if self.paused:
            transport.resume_reading()
        if self.buf:
            data, self.buf = self.buf, b""
            inner.data_received(data)

    # -- ending

    def _timed_out(self) -> None:
        self._timer = None
        if not self.done:
            log.debug("closing a connection from %s: no complete PROXY header or TLS "
                      "handshake within limits.header_timeout", self.peer)
            self.abort("")

    def abort(self, why: str) -> None:
        if self.done:
            return
        transport = self.transport
        self._finish()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.abort()

    def _finish(self) -> None:
        self.done = True
        self.p.pending.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
