"""Listeners and the process lifecycle.

This module owns the sockets the gate listens on (TCP, UNIX, systemd-passed),
the aiohttp low-level server of each listener with the connection limits of
SPEC section 5 (header timeout, idle keep-alive, line and header sizes), and
the run loop: bind everything, serve, and on SIGTERM / SIGINT stop accepting
and drain in-flight requests for ``server.drain_timeout``.

The request itself is :mod:`proxy`'s business; nothing here looks at one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import stat
from typing import Any

from aiohttp import http_exceptions, web, web_protocol

from . import tls as tlsmod
from .config import Bind, Config, ConfigError, Listener
from .proxy import Generation, ListenerHandler

log = logging.getLogger("palpo_gate")

#: aiohttp's C (llhttp) parser rejects smuggling vectors the pure-Python parser
#: has let through (several CVEs); the gate refuses to run without it.
C_PARSER = web_protocol.HttpRequestParser.__module__ == "aiohttp._http_parser"


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
    :class:`_HeadTimeoutProtocol` connections."""

    def __init__(self, handler: ListenerHandler, cfg: Config) -> None:
        super().__init__(
            handler,  # type: ignore[arg-type]
            handler_cancellation=True,  # client gone → upstream request aborted
            auto_decompress=False,
            keepalive_timeout=cfg.limits.idle_timeout,
            access_log=None,
        )
        self._header_timeout = cfg.limits.header_timeout

    def __call__(self) -> web_protocol.RequestHandler:
        return _HeadTimeoutProtocol(self, self._header_timeout, loop=self._loop,
                                    **self._kwargs)


# -- sockets ------------------------------------------------------------------------

SD_LISTEN_FDS_START = 3
#: Pending connections per listener (capped by net.core.somaxconn). asyncio's
#: default of 100 overflows when thousands of clients reconnect at once.
LISTEN_BACKLOG = 4096


def systemd_sockets() -> dict[str, socket.socket]:
    """Sockets passed by systemd socket activation, by LISTEN_FDNAMES name."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    out: dict[str, socket.socket] = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        name = names[i] if i < len(names) and names[i] else f"fd{fd}"
        out[name] = socket.socket(fileno=fd)
    return out


def bind_socket(bind: Bind, passed: dict[str, socket.socket]) -> socket.socket:
    """A listening socket for *bind*; raises OSError with a readable message."""
    if bind.kind == "systemd":
        sock = passed.get(bind.path)
        if sock is None:
            raise OSError(f"no socket named {bind.path!r} was passed by systemd "
                          f"(LISTEN_FDNAMES={os.environ.get('LISTEN_FDNAMES', '')!r})")
        sock.setblocking(False)
        return sock
    if bind.kind == "unix":
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


def ssl_contexts(cfg: Config) -> dict[str, ssl.SSLContext]:
    """Every listener's SSL context, built at load; errors name the key path."""
    out: dict[str, ssl.SSLContext] = {}
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


# -- the running gate ----------------------------------------------------------------


class Gate:
    """A running gate: its listeners, servers and the generation they serve."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.contexts = ssl_contexts(cfg)
        self.gen = Generation(cfg, self.loop)
        self.handlers: dict[str, ListenerHandler] = {}
        self.servers: list[tuple[Listener, GateServer, asyncio.AbstractServer]] = []
        self.stopping = asyncio.Event()

    async def start(self) -> None:
        passed = systemd_sockets()
        try:
            for i, lst in enumerate(self.cfg.listeners):
                try:
                    sock = bind_socket(lst.bind, passed)
                except OSError as exc:
                    raise ConfigError(
                        [f"listeners[{i}].bind: cannot listen on {lst.bind}: "
                         f"{exc.strerror or exc}"]) from None
                handler = ListenerHandler(self.gen, lst)
                handler.bound(sock.getsockname())
                gate_server = GateServer(handler, self.cfg)
                ctx = self.contexts.get(lst.name)
                srv = await self.loop.create_server(
                    gate_server, sock=sock, ssl=ctx, backlog=LISTEN_BACKLOG,
                    ssl_handshake_timeout=self.cfg.limits.header_timeout if ctx else None)
                self.handlers[lst.name] = handler
                self.servers.append((lst, gate_server, srv))
                log.info("listener %s on %s (%s%s)", lst.name, _where(sock, lst), lst.role,
                         ", TLS" if lst.tls else "")
        except BaseException:
            await self.close(0)
            raise

    def addresses(self) -> dict[str, Any]:
        return {lst.name: srv.sockets[0].getsockname() for lst, _, srv in self.servers}

    async def close(self, drain_timeout: float) -> None:
        """Stop accepting, let in-flight requests finish for *drain_timeout*, close."""
        for _, _, srv in self.servers:
            srv.close()
        for _, gs, _ in self.servers:
            for conn in gs.connections:
                # Idle keep-alive connections hold no request: close them now
                # rather than wait the drain out for a request that won't come.
                if not conn._request_in_progress and not conn._messages:
                    conn.force_close()
        if drain_timeout > 0:
            await asyncio.gather(*(gs.shutdown(drain_timeout) for _, gs, _ in self.servers),
                                 return_exceptions=True)
        else:
            for _, gs, _ in self.servers:
                for conn in gs.connections:
                    conn.force_close()
        for _, _, srv in self.servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        for lst, _, _ in self.servers:
            if lst.bind.kind == "unix" and not lst.bind.path.startswith("@"):
                with contextlib.suppress(OSError):
                    os.unlink(lst.bind.path)
        self.gen.pool.close()
        self.servers.clear()


def _where(sock: socket.socket, lst: Listener) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        host = f"[{name[0]}]" if ":" in name[0] else name[0]
        return f"{host}:{name[1]}"
    return str(lst.bind)


async def serve(cfg: Config) -> int:
    """Run the gate until SIGTERM / SIGINT; the exit status."""
    gate = Gate(cfg)
    await gate.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Reload arrives with the service work; until then SIGHUP must not kill.
    loop.add_signal_handler(signal.SIGHUP,
                            lambda: log.warning("SIGHUP: reload is not supported yet; ignored"))
    if cfg.server.workers > 1:
        log.warning("server.workers = %d: worker processes are not supported yet; "
                    "running one process", cfg.server.workers)
    log.info("palpo-gate ready: %d listener(s), upstream %s", len(gate.servers), cfg.upstream.url)
    try:
        await stop.wait()
        log.info("stopping: draining in-flight requests for up to %gs", cfg.server.drain_timeout)
    finally:
        await gate.close(cfg.server.drain_timeout)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0
