"""The aiohttp internals compat.py relies on are where it expects them.

An aiohttp upgrade that renames or removes one of these fails here, naming
it, rather than deep inside a connection. Each check looks at a real
instance (or class) of the aiohttp version installed.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque

import pytest
from aiohttp import web, web_protocol

from palpo_gate import compat

#: What compat.RequestHandler reads on every connection (aiohttp 3.14).
HANDLER_ATTRS = ("_messages", "_request_count", "_request_in_progress", "_current_request",
                 "_keepalive_handle", "_message_tail", "_upgraded", "_waiter", "_manager",
                 "_loop", "_reading_paused", "_buffer_paused", "_task_handler")
#: What compat.StreamResponse sets in place of aiohttp's __init__ (aiohttp 3.14).
RESPONSE_ATTRS = ("_state", "_headers", "_status", "_reason")


async def _handler(request: web.BaseRequest) -> web.StreamResponse:
    return web.Response(text="ok")


@pytest.mark.parametrize("name", HANDLER_ATTRS)
async def test_request_handler_has(name: str) -> None:
    server = web.Server(_handler)
    conn = compat.RequestHandler(server, loop=asyncio.get_running_loop())
    assert hasattr(conn, name), f"aiohttp's RequestHandler has no {name} any more"


#: compat.RequestHandler's public names for aiohttp's slots.
SLOT_ALIASES = {
    "messages": "_messages", "request_count": "_request_count",
    "request_in_progress": "_request_in_progress", "current_request": "_current_request",
    "keepalive_handle": "_keepalive_handle", "message_tail": "_message_tail",
    "waiter": "_waiter", "server": "_manager", "task_handler": "_task_handler",
    "upgraded": "_upgraded", "reading_paused": "_reading_paused",
    "buffer_paused": "_buffer_paused", "loop": "_loop",
}


@pytest.mark.parametrize("alias", sorted(SLOT_ALIASES))
async def test_alias_reads_and_writes_aiohttps_slot(alias: str) -> None:
    """Each alias is aiohttp's own slot descriptor: what the gate reads or
    writes under it is what aiohttp reads or writes under its private name."""
    name = SLOT_ALIASES[alias]
    descriptor = inspect.getattr_static(compat.RequestHandler, alias)
    assert type(descriptor).__name__ == "member_descriptor", \
        f"aiohttp's {name} is no longer a slot"
    assert descriptor is inspect.getattr_static(web_protocol.RequestHandler, name)
    conn = compat.RequestHandler(web.Server(_handler), loop=asyncio.get_running_loop())
    marker = object()
    setattr(conn, alias, marker)
    assert getattr(conn, name) is marker


def test_request_handler_types() -> None:
    # The handler's own checks depend on these shapes, not only on the names.
    source = inspect.getsource(web_protocol.RequestHandler.__init__)
    assert "self._messages: deque" in source or "self._messages = deque" in source
    assert isinstance(compat.ErrInfo(status=400, exc=ValueError(), message="x"),
                      compat.ErrInfo)
    assert [f for f in ("status", "exc", "message") if not hasattr(compat.ErrInfo, f)] == []


def test_stream_response_init_sets_what_aiohttps_does() -> None:
    """compat.StreamResponse's light __init__ leaves the object as aiohttp's
    own __init__ would: the same instance fields, usable as a response."""
    plain = web.StreamResponse(status=204, reason="No Content")
    light = compat.StreamResponse(204, "No Content")
    assert sorted(vars(plain)) == sorted(vars(light)) == sorted(RESPONSE_ATTRS)
    assert (light.status, light.reason, dict(light.headers), len(light), bool(light)) == \
        (plain.status, plain.reason, dict(plain.headers), len(plain), bool(plain))
    key = web.ResponseKey("key", int)
    light[key] = 1
    light.headers["X"] = "y"
    assert light[key] == 1 and light.headers["x"] == "y"


def test_server_and_request_hooks() -> None:
    assert callable(getattr(web.Server, "_make_request", None))
    assert callable(getattr(web.BaseRequest, "_prepare_hook", None))
    assert "_prepare_hook" in inspect.getsource(web.StreamResponse._start)
    assert "_payload_writer" in inspect.signature(web.BaseRequest.__init__).parameters \
        or "payload_writer" in inspect.signature(web.BaseRequest.__init__).parameters


async def test_server_keeps_loop_and_kwargs() -> None:
    server = compat.Server(_handler, keepalive_timeout=7.0)
    assert server.loop is asyncio.get_running_loop()
    assert server.protocol_kwargs["keepalive_timeout"] == 7.0


def test_c_parser_is_detected() -> None:
    assert compat.C_PARSER, "aiohttp's C parser is not loaded, or its module moved"


async def test_hooks_run_over_a_real_connection() -> None:
    """A request made by compat.Server is its request_class, whose
    before_head sees the response before its head is written; the
    connection's internals read as compat says while a request is handled."""
    seen: dict[str, object] = {}

    class Req(compat.Request):
        def before_head(self, response: web.StreamResponse) -> None:
            seen["hook"] = response.headers.get("Server")
            response.headers["X-Hooked"] = "1"

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        conn = request.protocol
        assert isinstance(conn, compat.RequestHandler)
        seen["type"] = type(request).__name__
        seen["busy"] = compat.is_busy(conn) and conn.busy() and conn.request_in_progress
        seen["current"] = conn.current_request is request
        seen["count"] = conn.request_count
        task = compat.handler_task(conn)
        seen["task"] = isinstance(task, asyncio.Task) and not task.done()
        seen["messages"] = isinstance(conn.messages, deque)
        seen["server"] = conn.server is srv
        return web.Response(text="ok")

    class Srv(compat.Server):
        request_class = Req

        def __call__(self) -> compat.RequestHandler:
            return compat.RequestHandler(self, loop=self.loop, **self.protocol_kwargs)

    srv = Srv(handler)
    response = await _one_request(srv,
                                  b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"X-Hooked: 1" in response
    assert seen == {"hook": seen["hook"], "type": "Req", "busy": True, "current": True,
                    "count": 1, "task": True, "messages": True, "server": True}
    assert seen["hook"] is not None  # aiohttp's Server header was set before the hook


async def _one_request(srv: web.Server, request: bytes) -> bytes:
    """Serve *srv* on loopback, send *request* over a real socket, and return
    everything the server wrote until it closed the connection."""
    listener = await asyncio.get_running_loop().create_server(srv, "127.0.0.1", 0)
    try:
        port = listener.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        response = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        listener.close()
        await srv.shutdown(1)
    return response


async def test_request_parts_are_what_the_public_properties_give() -> None:
    """compat.request_parts reads the parser's message and the connection: the
    method, raw target, version and raw headers the handler takes from the
    message are what request.method, .raw_path, .version and .raw_headers say."""
    seen: dict[str, object] = {}

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        message, protocol = compat.request_parts(request)
        seen["parts"] = (message.method, message.path, message.version, message.raw_headers,
                         protocol)
        seen["public"] = (request.method, request.raw_path, request.version,
                          request.raw_headers, request.protocol)
        return web.Response(text="ok")

    await _one_request(web.Server(handler),
                       b"PUT /a/%2Fb?c=d%20 HTTP/1.0\r\nHost: x\r\nX-A: 1\r\n"
                       b"Content-Length: 0\r\n\r\n")
    assert seen["parts"] == seen["public"]
    method, path, version, raw, _ = seen["parts"]  # type: ignore[misc]
    assert (method, path, version) == ("PUT", "/a/%2Fb?c=d%20", (1, 0))
    assert raw == ((b"Host", b"x"), (b"X-A", b"1"), (b"Content-Length", b"0"))
