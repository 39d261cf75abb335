"""Listening sockets and the aiohttp connection handler of each listener.

This module owns:
- binding: TCP (SO_REUSEPORT for workers, IPV6_V6ONLY), UNIX (a stale socket
  file replaced), sockets passed by systemd or handed down by the supervisor;
  and the metrics endpoint's own listener;
- :class:`GateServer`, aiohttp's low-level ``web.Server`` (no router) of one
  listener of one generation, and its connections
  (:class:`_HeadTimeoutProtocol`) with the connection limits of docs/DESIGN.md section
  5: header timeout, idle keep-alive, line and head sizes, and the parser's
  refusals answered as Matrix JSON.

What a generation is and how reload swaps it is :mod:`generation`'s; the
request itself is :mod:`proxy`'s business, nothing here looks at one. The
aiohttp internals the connection handler reads are named in :mod:`compat`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Callable
from typing import Any

from aiohttp import http_exceptions, web, web_protocol
from aiohttp.http_writer import HttpVersion10, HttpVersion11
from aiohttp.streams import EMPTY_PAYLOAD

from . import compat, systemd
from . import metrics as metricsmod
from . import prelude as preludemod
from .accesslog import RefusedRequest, escape, redact_target
from .config import Bind, Config, ConfigError
from .errors import error_body, refusal
from .headers import new_request_id
from .proxy import ListenerHandler
from .response import HIGH_WATER
from .routing import _is_matrix
from .wellknown import CORS_HEADERS

log = logging.getLogger("palpo_gate")

#: aiohttp's C (llhttp) parser rejects smuggling vectors the pure-Python parser
#: has let through (several CVEs); the gate refuses to run without it.
C_PARSER = compat.C_PARSER
_aiohttp_data_received = compat.aiohttp_data_received


MAX_LINE_SIZE = 8190  # request line (aiohttp's default)
MAX_FIELD_SIZE = 8192  # one header field, name and value (nginx's 8k buffer)


class _Refused(http_exceptions.HttpProcessingError):
    """A request the connection handler refuses after the parser took it: a
    head over ``limits.max_header_size`` (431), an HTTP version other than
    1.0 / 1.1 (505). Carries what the access line says of it."""

    def __init__(self, status: int, reason: str, word: str, msg: Any = None) -> None:
        super().__init__(code=status, message=reason)
        self.status = status
        self.reason = reason
        #: the access line's error word
        self.word = word
        #: the parsed message (RawRequestMessage), None when the head was cut short
        self.msg = msg


def _head_size(msg: Any) -> int:
    """The size of a parsed request head as written with single spaces: the
    request line, each field as ``name: value``, CRLFs. llhttp drops the
    optional whitespace around values, so it is never more than what came."""
    size = len(msg.method) + len(msg.path.encode("utf-8", "surrogateescape")) + 12
    for name, value in msg.raw_headers:
        size += len(name) + len(value) + 4
    return size + 2


#: What the debug log and the access line say of the parser's refusals.
_TOO_MANY_HEADERS = "Too many headers"
#: The first bytes of a refused head kept for its access line.
_LINE_KEEP = 2048
_H2_PREFACE = b"PRI * HTTP/2.0"
#: How a request line begins: a method token, a space, a target.
_REQUEST_START = re.compile(rb"[A-Z][A-Z0-9_-]{0,31} (?:/|\*|[A-Za-z][A-Za-z0-9+.-]*://)")


def _parser_reason(exc: BaseException) -> str:
    """The parser's reason without the request bytes it quotes (a header line
    may hold a token): its first line, cut at the first ':' or quote."""
    text = getattr(exc, "message", "") or type(exc).__name__
    text = text.split("\n", 1)[0]
    for stop in (":", "'", '"'):
        text = text.split(stop, 1)[0]
    return text.strip() or type(exc).__name__


class _HeadTimeoutProtocol(compat.RequestHandler):
    """aiohttp's connection handler plus the limits of a request head.

    - A deadline: aiohttp only times out idle keep-alive connections; a
      client that sends its head a byte at a time (slowloris) must be cut
      after ``limits.header_timeout`` from its first byte.
    - A size: aiohttp caps a request line and each header field, not the
      head as a whole. Above ``limits.max_header_size`` the answer is 431 and
      nothing of the request is forwarded. The check costs a few integer
      operations per read (below).
    - HTTP/1.0 and 1.1 only (505 otherwise), and requests the parser
      refuses (400, 414, 431) answered as Matrix JSON, each with its access
      line and its count in the metrics.

    How the head size is checked without a parser hook: ``_rx`` counts the
    bytes read; ``_mark`` is an offset at or before the start of every head
    not yet parsed, moved only while the parser holds no unparsed bytes
    (``_clean``: not paused, not upgraded). Every head completed in a read
    lies within ``_rx - _mark`` bytes; only when that exceeds the limit is
    each one measured exactly from its parsed fields. A head still
    incomplete is cut once the bytes read since it certainly began
    (``_head_start``) exceed the limit, so a client cannot make the parser
    hold more than the limit plus one read.
    """

    __slots__ = ("_clean", "_head_line", "_head_start", "_head_timeout",
                 "_head_timer", "_last_payload", "_mark", "_max_head", "_refused",
                 "_refused_line", "_rx", "_seen", "client_addr")

    def __init__(self, manager: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self.client_addr = ""
        self._max_head: int = manager.handler.gen.limits.max_header_size
        self._rx = 0  # bytes read
        self._mark = 0  # at or before the start of every head not yet parsed
        self._head_start: int | None = 0  # bytes after it: the current head (None: in a body)
        self._head_line: bytes | None = None  # the start of the current head, when known
        self._seen = 0  # heads (and parse errors) accounted for, of _request_count
        self._last_payload: Any = None  # the body of the newest parsed head
        self._clean = True  # the parser holds no bytes it has not parsed
        self._refused = False  # a refusal is queued: nothing after it is read
        self._refused_line: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Once per connection rather than per request: the X-Forwarded-For value.
        peer = transport.get_extra_info("peername")
        self.client_addr = str(peer[0]) if isinstance(peer, tuple) else "unix:"
        # What a client that stops reading holds on its side (response.HIGH_WATER).
        transport.set_write_buffer_limits(HIGH_WATER)  # type: ignore[attr-defined]
        self.share_peername(peer)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        start = self._rx
        _aiohttp_data_received(self, data)
        rx = self._rx = start + len(data)
        clean_before = self._clean
        clean = self._clean = not (self.reading_paused or self.buffer_paused or self.upgraded)
        new = self.request_count - self._seen
        if new:
            self._seen += new
            msg, payload = self.messages[-1]
            try:
                version = msg.version
            except AttributeError:  # a parse error (_ErrInfo)
                version = None
            if (new > 1 or rx - self._mark > self._max_head
                    or (version is not HttpVersion11 and version is not HttpVersion10)):
                self._check_heads(new, data, start)
            if not self._refused:
                self._last_payload = payload
                if clean_before:
                    self._mark = start
                self._head_start = (rx if clean and (payload is EMPTY_PAYLOAD or payload.is_eof())
                                    else None)
                self._head_line = None
        elif self._head_start is not None:
            # Between requests or inside a head: all read since _head_start is head.
            if clean_before and clean:
                if rx - self._head_start > self._max_head:
                    self._refuse_incomplete_head(data, start)
                elif self._head_line is None and data:
                    self._head_line = self._line_of(data, start)
            else:
                self._head_start = rx if clean else None
        else:
            # Inside a body: the next head begins after it.
            payload = self._last_payload
            if clean and (payload is None or payload.is_eof()):
                self._head_start = rx
                if clean_before:
                    self._mark = start
            elif clean and clean_before:
                self._mark = rx
        if not clean and self.upgraded:
            self._last_request()
        if self.request_in_progress or self.messages:
            if self.request_in_progress and self.messages:
                # A message queued behind the request being handled: a parse
                # error in its body, say.
                self._fail_body_on_parse_error()
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
        elif self._head_timer is None and data:
            self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def _last_request(self) -> None:
        """A request with "Upgrade: websocket" (or CONNECT): aiohttp would
        parse what follows only after the answer, outside these checks. The
        gate never switches protocols (Upgrade is not forwarded), so that
        request is the connection's last."""
        self.message_tail = b""
        self.close()

    # -- refusals ----------------------------------------------------------------------

    def _check_heads(self, new: int, data: bytes, start: int) -> None:
        """The heads parsed in this read, one by one: a parse error, a version
        other than HTTP/1.x, a head over the limit each end the connection;
        the first such one is answered (after those before it), nothing after
        it is read or forwarded."""
        messages = self.messages
        first = len(messages) - new
        over = self._rx - self._mark > self._max_head
        for i in range(first, len(messages)):
            msg = messages[i][0]
            if isinstance(msg, compat.ErrInfo):
                if i == first:
                    self._refused_line = self._line_of(data, start)
            else:
                version = msg.version
                if version is not HttpVersion11 and version is not HttpVersion10:
                    exc = _Refused(*refusal("version_not_supported"), msg)
                elif over and _head_size(msg) > self._max_head:
                    exc = _Refused(*refusal("head_too_large"), msg)
                else:
                    continue
                messages[i] = (compat.ErrInfo(status=exc.status, exc=exc, message=exc.reason),
                               EMPTY_PAYLOAD)
            while len(messages) > i + 1:
                messages.pop()
            self._refused = True
            return

    def _line_of(self, data: bytes, start: int) -> bytes | None:
        """The start of the current head, for the access line of its refusal:
        kept from an earlier read, or this read's start when the head began
        with it. That is certain for a connection's first head; after that
        the read must begin like a request line (``METHOD /`` …), since a
        head may have begun at the end of the read before."""
        if self._head_line is not None:
            return self._head_line
        if self._head_start == start and (start == 0 or _REQUEST_START.match(data)):
            return data[:_LINE_KEEP]
        return None

    def _refuse_incomplete_head(self, data: bytes, start: int) -> None:
        self._refused_line = self._line_of(data, start)
        exc = _Refused(*refusal("head_too_large"))
        self.messages.append(
            (compat.ErrInfo(status=431, exc=exc, message=exc.reason), EMPTY_PAYLOAD))
        self._refused = True
        self.wake()

    def _fail_body_on_parse_error(self) -> None:
        """Invalid framing in the middle of a body being forwarded (a bad chunk
        size, say): aiohttp drops the body stream silently and queues a 400
        behind the request. Fail the body instead, so the handler aborts the
        upstream request and answers 400 at once (docs/DESIGN.md section 5)."""
        msg = self.messages[-1][0]
        request = self.current_request
        if not isinstance(msg, compat.ErrInfo) or request is None:
            return
        content = request.content
        if content.is_eof():
            return
        self.messages.pop()  # answered by the handler, not by a second 400
        content.set_exception(http_exceptions.BadHttpMessage(msg.message))
        content.feed_eof()  # nothing to linger for: the connection closes after

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """Requests refused before the handler saw them: 400 / 414 / 431 / 505
        as Matrix JSON with the CORS headers (a browser sees the status, not a
        CORS failure), each with an access line and a count in the metrics,
        the connection closed."""
        if isinstance(exc, _Refused):
            status, reason, word = exc.status, exc.reason, exc.word
            msg = exc.msg
            seen = (RefusedRequest(msg.method, msg.path, msg.version, msg.headers)
                    if msg is not None else RefusedRequest.from_line(self._refused_line))
            detail = reason
        elif status == 400 and isinstance(exc, http_exceptions.HttpProcessingError):
            line = self._refused_line
            if isinstance(exc, http_exceptions.LineTooLong):
                kind = "uri_too_long" if exc.args[1] == MAX_LINE_SIZE else "header_too_large"
            elif _TOO_MANY_HEADERS in str(exc):
                kind = "too_many_headers"
            elif line is not None and line.startswith(_H2_PREFACE):
                kind = "http2_preface"
            else:
                kind = "bad_request"
            status, reason, word = refusal(kind)
            seen = RefusedRequest.from_line(line)
            detail = _parser_reason(exc)
        else:
            return _plain_error(request, super().handle_error(request, status, exc, message))
        if request.writer.output_size > 0:
            raise ConnectionError("the response had begun")
        handler = self.server.handler
        gen = handler.gen
        rid = new_request_id()
        body, ctype = error_body(status, reason, matrix=True)
        resp = web.Response(status=status, body=body,
                            headers=(("Content-Type", ctype), *CORS_HEADERS,
                                     (gen.rid_name.decode(), rid.decode())))
        resp.force_close()
        # Any client can send these: debug, and never the raw bytes (a
        # request line or header may hold a token).
        log.debug("refused a request from %s on %s: %d %s (%s): %s %s", self.client_addr,
                  handler.name, status, reason, detail, escape(seen.method),
                  escape(redact_target(seen.raw_path)))
        if gen.access.enabled:
            gen.access.write(seen, handler.name, self.client_addr, _RefusedRecord(word),
                             time.monotonic(), rid, resp)
        if gen.metrics is not None:
            gen.metrics.observe(handler.name, "bad_request", status, 0.0, 0, 0)
        return resp

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.busy():
            log.debug("closing a connection whose request head did not arrive in time")
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


def _plain_error(request: Any, page: web.StreamResponse) -> web.Response:
    """A gate-made answer in place of aiohttp's own error *page* (which has
    logged the exception): its text names aiohttp and, in debug mode, holds a
    traceback. Matrix JSON with CORS on Matrix paths, as every gate error."""
    status = page.status
    matrix = _is_matrix(request.path)
    body, ctype = error_body(status, "internal error" if status >= 500 else "bad request",
                             matrix)
    resp = web.Response(status=status, body=body, headers={"Content-Type": ctype})
    if matrix:
        resp.headers.extend(CORS_HEADERS)
    resp.force_close()
    return resp


class _GateRequest(compat.Request):
    """A request whose gate-made responses name no software: aiohttp gives
    every response it frames ``Server: Python/3.x aiohttp/3.y``, and this
    hook runs after that, before the head is written. Forwarded responses
    frame themselves (:mod:`response`) and never pass here: their ``Server``
    is the upstream's."""

    def before_head(self, response: web.StreamResponse) -> None:
        response.headers.popall("Server", None)


class _RefusedRecord:
    """The access record of a refused request: nothing went upstream."""

    __slots__ = ("bytes_in", "bytes_out", "error", "upstream_status")

    def __init__(self, word: str) -> None:
        self.upstream_status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.error = word


class GateServer(compat.Server):
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
        #: connections whose handler task has not ended yet. aiohttp's own
        #: list drops a connection only once its task has ended, after
        #: connection_lost: on_empty is decided on this set instead.
        self._live: set[web_protocol.RequestHandler] = set()
        #: PROXY header, TLS after it, per-client connection cap (prelude.py)
        self.prelude: preludemod.Prelude | None = None

    request_class = _GateRequest

    def __call__(self) -> Any:
        proto = _HeadTimeoutProtocol(self, self._header_timeout, loop=self.loop,
                                     **self.protocol_kwargs)
        if self.prelude is not None:
            return self.prelude(proto)
        return proto

    def connection_made(self, handler: web_protocol.RequestHandler,
                        transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._live.add(handler)
        if self._metrics is not None:
            self._metrics.client_connection(self.handler.name, 1)

    def connection_lost(self, handler: web_protocol.RequestHandler,
                        exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        if self._metrics is not None:
            self._metrics.client_connection(self.handler.name, -1)
        if self.prelude is not None:
            self.prelude.connection_lost(handler)
        # The handler task (cancelled by aiohttp right after this) may still
        # be unwinding a request that uses this generation's pool: the
        # connection counts until the task has ended.
        task = compat.handler_task(handler)
        if task is not None and not task.done():
            task.add_done_callback(lambda _: self._gone(handler))
        else:
            self._gone(handler)

    def _gone(self, handler: web_protocol.RequestHandler) -> None:
        self._live.discard(handler)
        if self.on_empty is not None and not self._live:
            on_empty, self.on_empty = self.on_empty, None
            on_empty(self)

    def retire(self, on_empty: Callable[[GateServer], None]) -> None:
        """Serve no new connection; let open ones finish their requests.

        Their next responses carry ``Connection: close`` (announced, so no
        client races a close), idle ones end at the idle timeout; *on_empty*
        runs when the last one is gone.
        """
        self.handler.retired = True
        if self._live:
            self.on_empty = on_empty
        else:
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

