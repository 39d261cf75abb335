"""Every use of aiohttp's internals, in one place (aiohttp 3.14).

The gate runs on aiohttp's low-level server and reaches past its public API
where that API has no hook: the connection handler checks request heads
between reads, the drain tells busy connections from idle ones, forwarded
responses are written as bytes. Each such reach is a name below, with the
aiohttp source it relies on; nothing else in the package touches a private
aiohttp attribute. ``pyproject.toml`` pins aiohttp to 3.14.x, and
``tests/test_compat.py`` fails, naming the attribute, when an upgrade moves
one. Hot-path reads are plain attribute reads in methods of the subclasses
here, so that a name costs no more than the attribute itself.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.abc import AbstractStreamWriter

#: aiohttp 3.14 ``web_protocol._ErrInfo(status, exc, message)``: what the
#: request parser queues in place of a message it refused; the connection
#: loop answers it through ``RequestHandler.handle_error``.
ErrInfo = web_protocol._ErrInfo

#: aiohttp 3.14 ``web_protocol.HttpRequestParser`` is the C (llhttp) parser
#: when its module is ``aiohttp._http_parser``, else the pure-Python one.
C_PARSER = web_protocol.HttpRequestParser.__module__ == "aiohttp._http_parser"


_data_received = web_protocol.RequestHandler.data_received


class RequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler (``web_protocol.RequestHandler``, one per
    client connection) with the internals the gate reads named.

    aiohttp 3.14 keeps, per connection: ``_messages`` (a deque of parsed
    ``(message, payload)`` pairs not yet handled), ``_request_count``
    (heads parsed so far, refusals included), ``_request_in_progress``,
    ``_current_request``, ``_keepalive_handle`` (the idle timer),
    ``_message_tail`` (bytes after an upgrade), ``_upgraded``, ``_waiter``
    (what the connection loop awaits between requests), ``_cache`` (its
    cached properties, ``peername`` among them), ``_manager`` (the
    ``web.Server``) and, from ``base_protocol.BaseProtocol``,
    ``_reading_paused`` / ``_buffer_paused``.
    """

    __slots__ = ()

    @property
    def messages(self) -> deque[Any]:
        """Parsed (message, payload) pairs waiting for the handler; the queue
        itself, so that a refusal can replace or drop entries."""
        return self._messages

    @property
    def request_count(self) -> int:
        """Heads parsed on this connection so far (refusals included)."""
        return self._request_count

    @property
    def current_request(self) -> web.BaseRequest | None:
        """The request being handled, if any."""
        return self._current_request

    def share_peername(self, peer: Any) -> None:
        """Let aiohttp's ``peername`` (a property cached in ``_cache`` at the
        first request) be *peer*, which the gate read at connection_made:
        the transport makes a new tuple at every call, and a held connection
        need not keep two."""
        self._cache["peername"] = peer

    @property
    def upgraded(self) -> bool:
        """The parser saw ``Upgrade`` / CONNECT and stopped parsing."""
        return self._upgraded

    def feed(self, data: bytes) -> tuple[bool, int]:
        """aiohttp's ``data_received(data)``; then whether bytes read may wait
        in aiohttp unparsed (reading paused, or the parser stopped at an
        upgrade), and how many heads were parsed so far. One call per read:
        this runs on every request."""
        _data_received(self, data)
        return (self._reading_paused or self._buffer_paused or self._upgraded,
                self._request_count)

    def busy(self) -> bool:
        """A request is being handled or waits to be."""
        return self._request_in_progress or bool(self._messages)

    def hold_while_busy(self) -> int:
        """After a read: 0 when no request is handled or queued; else the idle
        keep-alive timer is stopped (aiohttp arms it again after the
        response, and a held long-poll need not keep a timer meanwhile) and
        the answer is 1, or 2 when a message is queued behind the request
        being handled (a parse error in its body, say)."""
        if self._request_in_progress:
            state = 2 if self._messages else 1
        elif self._messages:
            state = 1
        else:
            return 0
        handle = self._keepalive_handle
        if handle is not None:
            handle.cancel()
            self._keepalive_handle = None
        return state

    def drop_message_tail(self) -> None:
        """Forget the bytes aiohttp kept after an upgrade request."""
        self._message_tail = b""

    def wake(self) -> None:
        """Wake the connection loop waiting for the next message."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def server(self) -> Any:
        """The ``web.Server`` that made this connection (None once lost)."""
        return self._manager

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop


def handler_task(conn: web_protocol.RequestHandler) -> asyncio.Task[None] | None:
    """aiohttp 3.14 ``RequestHandler._task_handler``: the task running the
    connection's request loop (None before the connection is made)."""
    return conn._task_handler


def is_busy(conn: web_protocol.RequestHandler) -> bool:
    """aiohttp 3.14 ``RequestHandler._request_in_progress`` / ``_messages``:
    a request is being handled or waits to be (else the connection is idle)."""
    return conn._request_in_progress or bool(conn._messages)


class Server(web.Server):
    """``web.Server`` whose requests are :attr:`request_class`.

    aiohttp 3.14 ``web_server.Server`` builds each request in
    ``_make_request`` and keeps the loop and the connection handler's
    keyword arguments as ``_loop`` and ``_kwargs``.
    """

    request_class: type[web.BaseRequest] = web.BaseRequest

    def _make_request(self, message: Any, payload: Any, protocol: Any, writer: Any,
                      task: Any) -> web.BaseRequest:
        return self.request_class(message, payload, protocol, writer, task, self._loop)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def protocol_kwargs(self) -> dict[str, Any]:
        """What aiohttp passes to each ``RequestHandler`` it makes."""
        return self._kwargs


class Request(web.BaseRequest):
    """A request with a hook on the head of every response aiohttp frames
    for it: aiohttp 3.14 ``StreamResponse._start`` awaits
    ``request._prepare_hook(response)`` after ``_prepare_headers`` (which
    adds ``Server`` / ``Date``) and before the head is written."""

    def before_head(self, response: web.StreamResponse) -> None:
        """Change *response*'s headers before they are written."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        self.before_head(response)


class StreamResponse(web.StreamResponse):
    """A response that writes its own bytes to the client's transport.

    aiohttp 3.14 ``StreamResponse`` is prepared once ``_payload_writer`` is
    set (taken from ``request._payload_writer``) and done once ``_eof_sent``;
    its connection loop reads ``keep_alive`` (``_keep_alive``) and
    ``body_length`` (``_body_length``) after the handler returned.
    """

    __slots__ = ()

    def claim_writer(self, request: web.BaseRequest,
                     keep_alive: bool) -> AbstractStreamWriter | None:
        """Start this response on *request* with the keep-alive decision
        aiohttp's connection loop acts on: the payload writer, or None when
        the response was started or finished already."""
        if self._eof_sent or self._payload_writer is not None:
            return None
        self._req = request
        self._keep_alive = keep_alive
        writer = self._payload_writer = request._payload_writer
        return writer

    def mark_finished(self, body_length: int) -> None:
        """The whole response was written (as ``write_eof`` records it)."""
        self._eof_sent = True
        self._req = None
        self._payload_writer = None
        self._body_length = body_length
