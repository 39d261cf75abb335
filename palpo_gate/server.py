"""Listeners and the process lifecycle.

This module owns the sockets the gate listens on (TCP, UNIX, systemd-passed),
the aiohttp low-level server of each listener with the connection limits of
SPEC section 5 (header timeout, idle keep-alive, line and header sizes), and
and the graceful stop: stop accepting, drain in-flight requests.

Reload: a new config becomes a new :class:`proxy.Generation`; each listening
socket whose bind is unchanged is kept and only the factory for its new
connections is swapped. Open connections finish on the generation they began
with. The process lifecycle (signals, systemd) is :mod:`run`'s.

The request itself is :mod:`proxy`'s business; nothing here looks at one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import stat
from collections.abc import Callable
from typing import Any

from aiohttp import http_exceptions, web, web_protocol

from . import metrics as metricsmod
from . import prelude as preludemod
from . import ratelimit, systemd
from . import tls as tlsmod
from .config import Bind, Config, ConfigError, Listener
from .errors import error_body
from .metrics import Registry
from .proxy import Generation, ListenerHandler
from .wellknown import CORS_HEADERS

log = logging.getLogger("palpo_gate")

#: aiohttp's C (llhttp) parser rejects smuggling vectors the pure-Python parser
#: has let through (several CVEs); the gate refuses to run without it.
C_PARSER = web_protocol.HttpRequestParser.__module__ == "aiohttp._http_parser"


MAX_LINE_SIZE = 8190  # request line (aiohttp's default)
MAX_FIELD_SIZE = 8192  # one header field, name and value (nginx's 8k buffer)


class _HeadTimeoutProtocol(web_protocol.RequestHandler):
    """aiohttp's connection handler plus a deadline for a request head.

    aiohttp only times out idle keep-alive connections; a client that sends
    its head a byte at a time (slowloris) must be cut after
    ``limits.header_timeout`` from its first byte.
    """

    __slots__ = ("_head_timeout", "_head_timer", "client_addr")

    def __init__(self, manager: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self.client_addr = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Once per connection rather than per request: the X-Forwarded-For value.
        peer = transport.get_extra_info("peername")
        self.client_addr = str(peer[0]) if isinstance(peer, tuple) else "unix:"
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # _request_in_progress / _messages / _current_request are aiohttp 3.14
        # internals (pinned to 3.14.x in pyproject.toml).
        if self._request_in_progress and self._messages:
            self._fail_body_on_parse_error()
        if self._request_in_progress or self._messages:
            if self._keepalive_handle is not None:
                # aiohttp re-arms it after the response; a held long-poll
                # need not keep a timer (~600 B) meanwhile.
                self._keepalive_handle.cancel()
                self._keepalive_handle = None
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
        elif self._head_timer is None and data:
            self._head_timer = self._loop.call_later(self._head_timeout, self._head_timed_out)

    def _fail_body_on_parse_error(self) -> None:
        """Invalid framing in the middle of a body being forwarded (a bad chunk
        size, say): aiohttp drops the body stream silently and queues a 400
        behind the request. Fail the body instead, so the handler aborts the
        upstream request and answers 400 at once (SPEC section 5)."""
        msg = self._messages[-1][0]
        request = self._current_request
        if not isinstance(msg, web_protocol._ErrInfo) or request is None:
            return
        content = request.content
        if content.is_eof():
            return
        self._messages.pop()  # answered by the handler, not by a second 400
        content.set_exception(http_exceptions.BadHttpMessage(msg.message))
        content.feed_eof()  # nothing to linger for: the connection closes after

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """Requests the parser refused: 414 / 431 / 400 as Matrix JSON with the
        CORS headers (a browser sees the status, not a CORS failure), logged
        quietly (any client can send them), the connection closed."""
        if status != 400 or not isinstance(exc, http_exceptions.HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, http_exceptions.LineTooLong):
            status = 414 if exc.args[1] == MAX_LINE_SIZE else 431
            reason = "request line too long" if status == 414 else "header field too long"
        elif "Too many headers" in str(exc):
            status, reason = 431, "too many header fields"
        else:
            reason = "malformed request"
        log.debug("refused a malformed request from %s: %s", self.client_addr, exc)
        if request.writer.output_size > 0:
            raise ConnectionError("the response had begun")
        body, ctype = error_body(status, reason, matrix=True)
        resp = web.Response(status=status, body=body,
                            headers=(("Content-Type", ctype), *CORS_HEADERS))
        resp.force_close()
        return resp

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._request_in_progress and not self._messages:
            log.debug("closing a connection whose request head did not arrive in time")
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


class GateServer(web.Server):
    """``web.Server`` (no router: the router matches decoded paths) making
    :class:`_HeadTimeoutProtocol` connections for one listener of one
    generation."""

    def __init__(self, handler: ListenerHandler, cfg: Config) -> None:
        super().__init__(
            handler,  # type: ignore[arg-type]
            handler_cancellation=True,  # client gone → upstream request aborted
            auto_decompress=False,
            keepalive_timeout=cfg.limits.idle_timeout,
            access_log=None,
            # Different sizes tell the refusals apart: 414 for the request line,
            # 431 for a header field (see handle_error).
            max_line_size=MAX_LINE_SIZE,
            max_field_size=MAX_FIELD_SIZE,
        )
        self.handler = handler
        self._metrics = handler.gen.metrics
        self._header_timeout = cfg.limits.header_timeout
        #: called once a retired server has no connection left
        self.on_empty: Callable[[GateServer], None] | None = None
        #: PROXY header, TLS after it, per-client connection cap (prelude.py)
        self.prelude: preludemod.Prelude | None = None

    def __call__(self) -> Any:
        proto = _HeadTimeoutProtocol(self, self._header_timeout, loop=self._loop,
                                     **self._kwargs)
        if self.prelude is not None:
            return self.prelude(proto)
        return proto

    def connection_made(self, handler: web_protocol.RequestHandler,
                        transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if self._metrics is not None:
            self._metrics.client_connection(self.handler.name, 1)

    def connection_lost(self, handler: web_protocol.RequestHandler,
                        exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        if self._metrics is not None:
            self._metrics.client_connection(self.handler.name, -1)
        if self.prelude is not None:
            self.prelude.connection_lost(handler)
        if self.on_empty is not None and not self._connections:
            self.on_empty(self)

    def retire(self, on_empty: Callable[[GateServer], None]) -> None:
        """Serve no new connection; let open ones finish their requests.

        Their next responses carry ``Connection: close`` (announced, so no
        client races a close), idle ones end at the idle timeout; *on_empty*
        runs when the last one is gone.
        """
        self.handler.retired = True
        self.on_empty = on_empty
        if not self._connections:
            on_empty(self)


# -- sockets ------------------------------------------------------------------------

#: Pending connections per listener (capped by net.core.somaxconn). asyncio's
#: default of 100 overflows when thousands of clients reconnect at once.
LISTEN_BACKLOG = 4096


def systemd_sockets() -> dict[str, socket.socket]:
    """Sockets passed by systemd socket activation, by ``FileDescriptorName=``.

    One socket per name: ``ListenStream=443`` gives one dual-stack socket.
    A unit that passes several under one name gets the first served and a
    warning (give each its own name and listener).
    """
    out: dict[str, socket.socket] = {}
    for name, socks in systemd.listen_fds().items():
        if len(socks) > 1:
            log.warning("systemd passed %d sockets named %r; serving the first (give each "
                        "its own FileDescriptorName= and [[listeners]] entry)", len(socks), name)
            for extra in socks[1:]:
                extra.close()
        out[name] = socks[0]
    return out


def bind_socket(bind: Bind, passed: dict[str, socket.socket], *,
                reuse_port: bool = False) -> socket.socket:
    """A listening socket for *bind*; raises OSError with a readable message.

    *passed* holds sockets bound elsewhere (systemd, or the supervisor for
    UNIX sockets shared by workers), by name or ``unix:`` path.
    """
    if bind.kind == "systemd":
        sock = passed.get(bind.path)
        if sock is None:
            names = sorted(k for k in passed if not k.startswith("unix:"))
            raise OSError(f"no socket named {bind.path!r} was passed by systemd "
                          f"(passed: {', '.join(names) or 'none'})")
        sock.setblocking(False)
        return sock
    if bind.kind == "unix":
        inherited = passed.get(str(bind))
        if inherited is not None:
            inherited.setblocking(False)
            return inherited
        path = "\0" + bind.path[1:] if bind.path.startswith("@") else bind.path
        if not bind.path.startswith("@"):
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.unlink(path)  # a stale socket from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
    else:
        infos = socket.getaddrinfo(bind.host or None, bind.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                # workers: one socket per process, the kernel spreads connections
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # "[::]:443" next to "0.0.0.0:443", as nginx's ipv6only=on.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
        except OSError:
            sock.close()
            raise
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


async def serve_metrics(bind: Bind, render: Callable[[], bytes],
                        passed: dict[str, socket.socket]) -> asyncio.AbstractServer:
    """The Prometheus endpoint on ``[metrics] bind``, its own listener."""
    try:
        sock = bind_socket(bind, passed)
    except OSError as exc:
        raise ConfigError(
            [f"metrics.bind: cannot listen on {bind}: {exc.strerror or exc}"]) from None
    server = web.Server(metricsmod.make_handler(render), access_log=None)
    return await asyncio.get_running_loop().create_server(server, sock=sock)


def cert_sets(cfg: Config) -> dict[str, tlsmod.CertSet]:
    """Every TLS listener's certificates, loaded; errors name the key path."""
    out: dict[str, tlsmod.CertSet] = {}
    errors: list[str] = []
    for i, lst in enumerate(cfg.listeners):
        if lst.tls is not None:
            try:
                out[lst.name] = tlsmod.build(lst.tls, f"listeners[{i}].tls")
            except ConfigError as exc:
                errors.extend(exc.errors)
    if errors:
        raise ConfigError(errors)
    return out


def ssl_contexts(cfg: Config) -> dict[str, ssl.SSLContext]:
    """The default SSL context of every TLS listener (validates certificates)."""
    return {name: certs.default for name, certs in cert_sets(cfg).items()}


# -- the running gate ----------------------------------------------------------------


def _slot_key(lst: Listener) -> tuple[str, bool, bool]:
    """Listeners with equal keys can share a listening socket across a reload.
    (With the PROXY protocol, TLS starts after the header, in prelude.py: the
    asyncio server of such a TLS listener is a plain one.)"""
    return str(lst.bind), lst.tls is not None, lst.tls is not None and lst.proxy_protocol


class _Slot:
    """One listening socket and its asyncio server. It outlives config
    generations while its key is unchanged: a reload swaps what new
    connections get, not the socket (no refused connections)."""

    def __init__(self, key: tuple[str, bool, bool], sock: socket.socket, owned: bool) -> None:
        self.key = key
        self.sock = sock
        #: bound here (not passed by systemd or the supervisor): ours to unlink
        self.owned = owned
        self.listener: Listener | None = None
        self.gate_server: GateServer | None = None
        self.certs: tlsmod.CertSet | None = None
        self.context: ssl.SSLContext | None = None
        self.server: asyncio.AbstractServer | None = None

    def new_connection(self) -> web_protocol.RequestHandler:
        assert self.gate_server is not None
        return self.gate_server()

    def current_certs(self) -> tlsmod.CertSet:
        assert self.certs is not None
        return self.certs


class Gate:
    """A running gate: its listening sockets and the generation they serve.

    A reload builds a new :class:`Generation` and swaps one reference per
    listener; connections already open stay on the generation they started
    with until they end.
    """

    def __init__(self, cfg: Config, *, passed: dict[str, socket.socket] | None = None,
                 reuse_port: bool = False, metrics: Registry | None = None) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self._certs = cert_sets(cfg)
        self.generation = 1
        self.metrics = metrics
        self.gen = Generation(cfg, self.loop, metrics)
        #: [rate_limits]: storage and counters outlive generations (ratelimit.py)
        self.rate_limits = ratelimit.RateLimits(metrics)
        self.gen.rate = self.rate_limits.policy(cfg)
        self._passed = passed if passed is not None else systemd_sockets()
        self._reuse_port = reuse_port
        self._slots: dict[str, _Slot] = {}  # by listener name
        self._retired: set[GateServer] = set()
        self._draining_gens: dict[Generation, set[GateServer]] = {}
        self._lock = asyncio.Lock()

    # -- views used by tests and the run loop

    @property
    def servers(self) -> list[tuple[Listener, GateServer, asyncio.AbstractServer]]:
        return [(s.listener, s.gate_server, s.server) for s in self._slots.values()
                if s.listener and s.gate_server and s.server]

    @property
    def contexts(self) -> dict[str, ssl.SSLContext]:
        return {name: s.context for name, s in self._slots.items() if s.context is not None}

    def upstream_connections(self) -> tuple[int, int]:
        """(open, idle) upstream connections of every live generation."""
        pools = [self.gen.pool, *(g.pool for g in self._draining_gens)]
        return sum(p.open_count for p in pools), sum(p.idle_count for p in pools)

    def addresses(self) -> dict[str, Any]:
        return {name: s.sock.getsockname() for name, s in self._slots.items()}

    # -- start, reload, close

    async def start(self) -> None:
        try:
            slots = self._open_slots(self.cfg, {})
            await self._commit(self.cfg, self.gen, self._certs, slots)
        except BaseException:
            await self.close(0)
            raise
        for name, slot in self._slots.items():
            assert slot.listener is not None
            log.info("listener %s on %s (%s%s)", name, _where(slot.sock, slot.listener),
                     slot.listener.role, ", TLS" if slot.listener.tls else "")

    def _open_slots(self, cfg: Config, reusable: dict[tuple[str, bool, bool], _Slot]
                    ) -> dict[str, _Slot]:
        """A slot per listener of *cfg*: reused when its key is unchanged, else
        newly bound. Raises ConfigError (closing what it bound) if a bind fails."""
        slots: dict[str, _Slot] = {}
        fresh: list[_Slot] = []
        try:
            for i, lst in enumerate(cfg.listeners):
                key = _slot_key(lst)
                slot = reusable.pop(key, None)
                if slot is None:
                    try:
                        sock = bind_socket(lst.bind, self._passed, reuse_port=self._reuse_port)
                    except OSError as exc:
                        raise ConfigError([f"listeners[{i}].bind: cannot listen on {lst.bind}: "
                                           f"{exc.strerror or exc}"]) from None
                    handed = lst.bind.kind == "systemd" or str(lst.bind) in self._passed
                    slot = _Slot(key, sock, owned=not handed)
                    fresh.append(slot)
                slots[lst.name] = slot
        except BaseException:
            for slot in fresh:
                slot.sock.close()
            raise
        return slots

    async def _commit(self, cfg: Config, gen: Generation, certs: dict[str, tlsmod.CertSet],
                      slots: dict[str, _Slot]) -> None:
        """Point every slot at *gen*; start servers for new sockets."""
        for lst in cfg.listeners:
            slot = slots[lst.name]
            handler = ListenerHandler(gen, lst)
            handler.bound(slot.sock.getsockname())
            slot.listener = lst
            slot.gate_server = GateServer(handler, cfg)
            slot.certs = certs.get(lst.name)
            if slot.server is None:
                if slot.certs is not None:
                    slot.context = tlsmod.listening_context(slot.current_certs)
                context = None if slot.key[2] else slot.context  # prelude.py: TLS after PROXY
                slot.server = await self.loop.create_server(
                    slot.new_connection, sock=slot.sock, ssl=context,
                    backlog=LISTEN_BACKLOG,
                    ssl_handshake_timeout=cfg.limits.header_timeout if context else None)
            slot.gate_server.prelude = preludemod.for_listener(
                lst, cfg, gen, slot.context, self.rate_limits)
        self._slots = slots

    async def reload(self, cfg: Config) -> None:
        """Serve *cfg* from now on. Raises ConfigError (and changes nothing) if
        its certificates or new listening sockets cannot be had."""
        async with self._lock:
            certs = cert_sets(cfg)
            old_slots = dict(self._slots)
            reusable = {s.key: s for s in old_slots.values()}
            slots = self._open_slots(cfg, reusable)
            # Sockets no new listener wants stop accepting now.
            wanted = {str(lst.bind) for lst in cfg.listeners}
            for slot in reusable.values():
                if slot.server is not None:
                    slot.server.close()
                if slot.listener is not None and str(slot.listener.bind) not in wanted:
                    self._unlink(slot)
            old_gen = self.gen
            old_servers = {s.gate_server for s in old_slots.values() if s.gate_server}
            new_gen = Generation(cfg, self.loop, self.metrics)
            new_gen.rate = self.rate_limits.policy(cfg)
            await self._commit(cfg, new_gen, certs, slots)
            self.cfg, self.gen, self._certs = cfg, new_gen, certs
            self.generation += 1
            self._draining_gens[old_gen] = set(old_servers)
            for gs in old_servers:
                self._retired.add(gs)
                gs.retire(lambda g, gen=old_gen: self._server_empty(gen, g))

    def _server_empty(self, gen: Generation, gs: GateServer) -> None:
        self._retired.discard(gs)
        servers = self._draining_gens.get(gen)
        if servers is None:
            return
        servers.discard(gs)
        if not servers:
            del self._draining_gens[gen]
            gen.pool.close()  # the last connection of that generation is gone

    async def close(self, drain_timeout: float) -> None:
        """Stop accepting, let in-flight requests finish for *drain_timeout*, close."""
        servers = [s.server for s in self._slots.values() if s.server is not None]
        gate_servers = [s.gate_server for s in self._slots.values() if s.gate_server]
        gate_servers += list(self._retired)
        for srv in servers:
            srv.close()
        for gs in gate_servers:
            if gs.prelude is not None:
                gs.prelude.close()
        busy: list[asyncio.Task[None]] = []
        for gs in gate_servers:
            for conn in gs.connections:
                task = conn._task_handler
                if conn._request_in_progress or conn._messages:
                    # Finish the request in hand, then close (no next request).
                    conn.close()
                    if task is not None and not task.done():
                        busy.append(task)
                else:
                    # Idle keep-alive: close now rather than wait the drain out
                    # for a request that won't come.
                    conn.force_close()
        # One deadline for the whole drain (aiohttp's own shutdown(timeout)
        # waits up to twice its timeout).
        if busy and drain_timeout > 0:
            await asyncio.wait(busy, timeout=drain_timeout)
        cut = False
        for gs in gate_servers:
            for conn in gs.connections:
                cut = True
                conn.force_close()  # handler cancellation aborts its upstream request
        if cut and busy:
            await asyncio.wait(busy, timeout=1.0)
        for srv in servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        for slot in self._slots.values():
            if slot.server is None:
                slot.sock.close()
            self._unlink(slot)
        self.gen.pool.close()
        for gen in self._draining_gens:
            gen.pool.close()
        self._draining_gens.clear()
        self._retired.clear()
        self._slots.clear()
        await self.rate_limits.close()

    @staticmethod
    def _unlink(slot: _Slot) -> None:
        lst = slot.listener
        if (slot.owned and lst is not None and lst.bind.kind == "unix"
                and not lst.bind.path.startswith("@")):
            with contextlib.suppress(OSError):
                os.unlink(lst.bind.path)


def _where(sock: socket.socket, lst: Listener) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        host = f"[{name[0]}]" if ":" in name[0] else name[0]
        return f"{host}:{name[1]}"
    return str(lst.bind)
