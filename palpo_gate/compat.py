"""Every use of aiohttp's internals, in one place (aiohttp 3.14).

The gate runs on aiohttp's low-level server and reaches past its public API
where that API has no hook: the connection handler checks request heads
between reads, the drain tells busy connections from idle ones, forwarded
responses are written as bytes. Each such reach is a name below, with the
aiohttp source it relies on; nothing else in the package touches a private
aiohttp attribute. ``pyproject.toml`` pins aiohttp to 3.14.x, and
``tests/test_compat.py`` fails, naming the attribute, when an upgrade moves
one. Hot-path names cost no more than the private attribute itself: the
connection handler's are aiohttp's own slot descriptors under public names,
and the forwarded response sets the few fields aiohttp's ``__init__`` would.
"""

from __future__ import annotations

import asyncio
import operator
from typing import Any

from aiohttp import base_protocol, web, web_protocol
from multidict import CIMultiDict

#: aiohttp 3.14 ``web_protocol._ErrInfo(status, exc, message)``: what the
#: request parser queues in place of a message it refused; the connection
#: loop answers it through ``RequestHandler.handle_error``.
ErrInfo = web_protocol._ErrInfo

#: aiohttp 3.14 ``web_protocol.HttpRequestParser`` is the C (llhttp) parser
#: when its module is ``aiohttp._http_parser``, else the pure-Python one.
C_PARSER = web_protocol.HttpRequestParser.__module__ == "aiohttp._http_parser"


#: aiohttp's ``RequestHandler.data_received`` (public protocol API: it
#: parses what came and queues the messages): a plain function, so that the
#: gate's override calls it without a ``super()`` lookup on every read.
aiohttp_data_received = web_protocol.RequestHandler.data_received

#: aiohttp 3.14 ``BaseRequest._message`` (the parser's ``RawRequestMessage``:
#: ``method``, ``path``, ``version``, ``raw_headers``, ...) and
#: ``BaseRequest._protocol`` (the connection's ``RequestHandler``), in one C
#: call: the public ``method``, ``raw_path``, ``version``, ``raw_headers``
#: and ``protocol`` are each a call into Python the first time they are read,
#: which is every request. ``request_parts(request) -> (message, protocol)``
request_parts = operator.attrgetter("_message", "_protocol")

_Handler = web_protocol.RequestHandler
_Base = base_protocol.BaseProtocol


class RequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler (``web_protocol.RequestHandler``, one per
    client connection) with the internals the gate reads named.

    aiohttp 3.14 keeps its per-connection state in ``__slots__``. Each name
    below is a class attribute that *is* aiohttp's slot descriptor: reading
    or writing it reads or writes aiohttp's slot, at the cost of the private
    name itself (no call), which matters on every read of every connection.
    ``tests/test_compat.py`` checks they are slot descriptors still.
    """

    __slots__ = ()

    #: parsed ``(message, payload)`` pairs not yet handled (a deque); a
    #: refusal replaces or drops entries
    messages = _Handler._messages
    #: heads parsed on this connection so far, refusals included
    request_count = _Handler._request_count
    #: a request is being handled
    request_in_progress = _Handler._request_in_progress
    #: the request being handled, if any
    current_request = _Handler._current_request
    #: the idle keep-alive timer (a TimerHandle or None); aiohttp arms it
    #: after a response when none is armed, and drops it when it fires
    #: while a request is in progress
    keepalive_handle = _Handler._keepalive_handle
    #: bytes aiohttp kept after an upgrade request
    message_tail = _Handler._message_tail
    #: what the connection loop awaits between requests
    waiter = _Handler._waiter
    #: the ``web.Server`` that made this connection (None once lost)
    server = _Handler._manager
    #: the task running the connection's request loop
    task_handler = _Handler._task_handler
    #: from ``base_protocol.BaseProtocol``: the parser stopped at an Upgrade /
    #: CONNECT request; reading paused (flow control, or too many queued
    #: messages); the event loop
    upgraded = _Base._upgraded
    reading_paused = _Base._reading_paused
    buffer_paused = _Base._buffer_paused
    loop = _Base._loop

    def share_peername(self, peer: Any) -> None:
        """Let aiohttp's ``peername`` (a property cached in its ``_cache``
        slot at the first request) be *peer*, which the gate read at
        connection_made: the transport makes a new tuple at every call, and a
        held connection need not keep two."""
        self._cache["peername"] = peer

    def busy(self) -> bool:
        """A request is being handled or waits to be."""
        return self.request_in_progress or bool(self.messages)

    def drop_idle_timer(self) -> None:
        """Cancel the idle keep-alive timer while a request is held: aiohttp
        arms a new one after the response (it arms one only when none is
        armed, which is why quick requests keep theirs: no timer is made and
        cancelled per request)."""
        handle = self.keepalive_handle
        if handle is not None:
            handle.cancel()
            self.keepalive_handle = None

    def wake(self) -> None:
        """Wake the connection loop waiting for the next message."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


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
    """A ``StreamResponse`` set up with less than aiohttp's ``__init__`` does.

    aiohttp 3.14 ``StreamResponse.__init__`` keeps its state in ``_state``
    (the response's own mapping), ``_headers`` (a ``CIMultiDict``),
    ``_status`` and ``_reason``; everything else has a class default. A
    response that frames itself (:mod:`response`) needs only those, set
    directly, on every forwarded request.
    """

    def __init__(self, status: int, reason: str = "") -> None:
        # Not super().__init__(): its keyword handling and reason look-up run
        # on every request, for headers this response never uses.
        self._state = {}
        self._headers = CIMultiDict()
        self._status = status
        self._reason = reason
