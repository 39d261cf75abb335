"""The processes bench/profile_steps.py measures: the gate with steps ablated
(``serve``), the floors (``raw``, ``minproxy``), and the micro-steps run K
times in one process under callgrind (``micro``)."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from palpo_bench.common import BENCH_DIR, HOST, REPO_DIR

# -- ablations: each replaces a step by a lookup of its result ----------------


def _memo_method(cls: Any, name: str, key: Any) -> None:
    """cls.name(...) computes once per key(*args) and then returns that result."""
    real = getattr(cls, name)
    seen: dict[Any, Any] = {}

    def cached(self: Any, *args: Any) -> Any:
        k = key(*args)
        try:
            return seen[k]
        except KeyError:
            out = seen[k] = real(self, *args)
            return out

    setattr(cls, name, cached)


def _first_result(fn: Any) -> Any:
    """fn computed on the first call; later calls return that result."""
    seen: list[Any] = []

    def first(*args: Any) -> Any:
        if not seen:
            seen.append(fn(*args))
        return seen[0]

    return first


def _constant_for(fn: Any, name: bytes, value: bytes) -> Any:
    """fn(headers, n), except that n == *name* gives *value* at once."""
    def lookup(hs: Any, n: bytes) -> Any:
        return value if n == name else fn(hs, n)

    return lookup


def ablate(names: list[str]) -> None:
    from palpo_gate import headers, routing

    for name in names:
        if name == "route":
            _memo_method(routing.Router, "decide", lambda method, target: (method, target))
        elif name == "reqhead":
            # The one pass over the client's headers (head, checks, request id);
            # what _request_head does with its result stays.
            _memo_method(headers.RequestHeads, "build",
                         lambda method, target, raw, client, trusted: (method, target, client,
                                                                       trusted))
        elif name == "resphead":
            headers.response_block = _first_result(headers.response_block)
        elif name == "rid":
            # A request id without looking for the client's, checking or making
            # one (local answers); forwarded requests look for it in the head's
            # pass, which remains: only making one is left out.
            rid = headers.new_request_id()
            headers.header_value = _constant_for(headers.header_value, b"x-request-id", rid)
            headers.sane_request_id = lambda value: True
            # RequestHeads(..., buffer_upload=None, new_id=new_request_id)
            headers.RequestHeads.__init__.__defaults__ = (None, itertools.repeat(rid).__next__)
        elif name == "protocol":
            # aiohttp's own data_received instead of the head-timeout override
            # (which also cancels the keep-alive timer on every request).
            from aiohttp import web_protocol

            from palpo_gate import listeners
            listeners._HeadTimeoutProtocol.data_received = (  # type: ignore[method-assign]
                web_protocol.RequestHandler.data_received)
        elif name == "gcoff":
            # The cyclic collector's whole share (an upper bound; not a change to make).
            import gc

            gc.disable()
        elif name == "gcfreeze":
            # Everything imported so far moves to the permanent generation:
            # full collections no longer walk aiohttp's and the gate's modules.
            import gc

            import aiohttp.web  # noqa: F401

            import palpo_gate.generation
            import palpo_gate.process  # noqa: F401
            gc.collect()
            gc.freeze()
        else:
            raise SystemExit(f"unknown ablation {name!r}")


def cmd_serve(args: argparse.Namespace) -> int:
    """The gate, with the named steps ablated."""
    sys.path.insert(0, str(REPO_DIR))
    ablate([a for a in args.ablate.split(",") if a])
    from palpo_gate.cli import main

    return main(["--config", args.config])


# -- floors -------------------------------------------------------------------


async def _serve_until_sigterm(name: str, server: asyncio.AbstractServer) -> None:
    """Say "<name> ready" on stderr (what the driver waits for), serve until SIGTERM."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"{name} ready", file=sys.stderr, flush=True)
    await stop.wait()
    server.close()


def cmd_raw(args: argparse.Namespace) -> int:
    """uvloop + httptools, no aiohttp: the bytes bare's answer has, written at once."""
    import httptools
    import uvloop

    body = Path(args.body_file).read_bytes()
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
              b"Date: Mon, 01 Dec 2026 00:00:00 GMT\r\nServer: Python/3.11 aiohttp/3.14.5\r\n"
              b"\r\n%b" % (len(body), body))

    class Raw(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            self.transport.write(answer)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await _serve_until_sigterm(
            "raw", await loop.create_server(Raw, HOST, args.port, backlog=4096))

    uvloop.run(main())
    return 0


def cmd_minproxy(args: argparse.Namespace) -> int:
    """web.Server + the gate's pool and ProxiedResponse, no rule: a fixed request
    head, the upstream's headers passed as one fixed block."""
    sys.path.insert(0, str(REPO_DIR))
    import uvloop
    from aiohttp import web

    from palpo_gate import config
    from palpo_gate.response import ProxiedResponse
    from palpo_gate.upstream import Pool

    head = (b"GET /_matrix/client/versions HTTP/1.1\r\nHost: %s:%d\r\n\r\n"
            % (HOST.encode(), args.port))
    block = b"Content-Type: application/json\r\n"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        upstream = config.Upstream(url=f"http://{HOST}:{args.upstream_port}", kind="tcp",
                                   host=HOST, port=args.upstream_port, path="")
        pool = Pool(upstream, loop)

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            conn = pool.idle() or await pool.connect()  # as the handler checks one out
            conn.begin(head_only=False)
            conn.write(head)
            while (fut := conn.wait_head(60.0)) is not None:
                await fut
            status, reason, _ = conn.head()
            data = conn.take()
            while not conn.drained():
                if (fut := conn.wait_body(60.0)) is not None:
                    await fut
                data += conn.take()
            out = ProxiedResponse(status, reason, block, len(data), False)
            out.start(request)
            out.send(data, last=True)
            conn.finish(reusable=True)
            return out

        server = web.Server(handler, handler_cancellation=True, auto_decompress=False,
                            access_log=None, keepalive_timeout=75.0)
        await _serve_until_sigterm(
            "minproxy", await loop.create_server(server, HOST, args.port, backlog=4096))

    uvloop.run(main())
    return 0


# -- micro-steps, in one process under callgrind -----------------------------


def _self_control(what: str) -> None:
    subprocess.run(["callgrind_control", what, str(os.getpid())], check=True,
                   capture_output=True, timeout=120)


def cmd_micro(args: argparse.Namespace) -> int:
    """Ir per call of each step: zero, K calls, dump (callgrind_control on this
    very process), minus an empty loop of K. Prints JSON on stdout."""
    sys.path.insert(0, str(REPO_DIR))
    sys.path.insert(0, str(BENCH_DIR))
    import instructions
    import uvloop
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request
    from multidict import CIMultiDict

    from palpo_gate import config, headers
    from palpo_gate.accesslog import AccessLog
    from palpo_gate.metrics import Registry
    from palpo_gate.proxy import Generation, ListenerHandler, _Record
    from palpo_gate.response import ProxiedResponse
    from palpo_gate.upstream import Pool

    cfg = config.load(args.config)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    metrics = Registry([cfg.listeners[0].name])
    # With metrics, as the bench gate runs (they are reached only through the
    # whole-handler step; the others do not read gen.metrics).
    gen = Generation(cfg, loop, metrics)
    handler = ListenerHandler(gen, cfg.listeners[0])
    handler.bound((HOST, 8008))
    target = "/_matrix/client/versions"
    wrk_headers = CIMultiDict({"Host": f"{HOST}:8008"})

    class Transport:  # what ProxiedResponse and aiohttp touch, nothing else
        def write(self, data: bytes) -> None:
            pass

        def is_closing(self) -> bool:
            return False

        def get_write_buffer_size(self) -> int:
            return 0

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return (HOST, 40000) if name == "peername" else default

    class Writer:
        output_size = 0
        buffer_size = 0

    transport, writer = Transport(), Writer()
    request = make_mocked_request("GET", target, headers=wrk_headers, transport=transport,
                                  writer=writer, loop=loop)
    raw = request.raw_headers
    upstream_head = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n"
                     b"Date: Mon, 01 Dec 2026 00:00:00 GMT\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 240\r\n"
                     b"Connection: keep-alive\r\n\r\n") + b"x" * 240
    pool = Pool(cfg.upstream, loop)
    from palpo_gate.upstream import Connection

    class _T:
        def write(self, data: bytes) -> None:
            pass

        def is_closing(self) -> bool:
            return False

    conn = Connection(pool)
    conn.transport = _T()  # type: ignore[assignment]
    pool._all.add(conn)
    pool._release(conn)  # idle in the pool, as between two requests
    up_headers = [(b"Server", b"nginx/1.22.1"), (b"Date", b"Mon, 01 Dec 2026 00:00:00 GMT"),
                  (b"Content-Type", b"application/json"), (b"Content-Length", b"240"),
                  (b"Connection", b"keep-alive")]
    rid = headers.new_request_id()
    access = AccessLog("plain")
    rec = _Record()
    rec.upstream_status, rec.bytes_out = 200, 240
    resp_for_log = web.Response(status=200)
    body = b"x" * 240
    block, _ = headers.response_block(up_headers, gen.rid_name, rid)

    def exchange() -> None:
        c = pool._idle.pop() if pool._idle else conn
        c._in_exchange = False
        c.begin(head_only=False)
        c.write(b"GET / HTTP/1.1\r\n\r\n")
        c.data_received(upstream_head)
        c.wait_head(60.0)
        c.head()
        c.take()
        c.drained()
        c.finish(reusable=True)

    def proxied() -> None:
        out = ProxiedResponse(200, b"OK", block, 240, False)
        out.start(request)
        out.send(body, last=True)

    def deadline() -> None:
        fut = loop.create_future()
        key = pool.deadlines.add(fut, 60.0, "upstream did not answer in time")
        pool.deadlines.remove(key, fut)

    def web_response() -> None:
        web.Response(body=body, content_type="application/json")

    async def acquire_coro() -> None:
        c = await pool.acquire()
        pool._release(c)

    def pool_idle() -> None:
        pool._release(pool.idle())  # type: ignore[arg-type]

    def pool_checkout() -> None:
        co = acquire_coro()
        try:
            co.send(None)
        except StopIteration:
            pass

    class Upstream:  # answers the request head at once: the handler never waits
        def __init__(self, conn: Any) -> None:
            self.conn = conn

        def write(self, data: bytes) -> None:
            self.conn.data_received(upstream_head)

        def is_closing(self) -> bool:
            return False

    class Protocol:  # what the handler reads of the client connection (listeners.py)
        client_addr = HOST
        ssl_context = None
        peername = (HOST, 40000)
        sockname = (HOST, 8008)

        def __init__(self) -> None:
            self.transport = transport

        def force_close(self) -> None:
            pass

    up_pool = gen.pool
    up_conn = Connection(up_pool)
    up_conn.transport = Upstream(up_conn)  # type: ignore[assignment]
    up_pool._all.add(up_conn)
    up_pool._release(up_conn)
    get = make_mocked_request("GET", target, headers=wrk_headers, writer=writer,
                              transport=transport, protocol=Protocol(), loop=loop)

    def handler_get() -> None:
        co = handler(get)
        try:
            co.send(None)
        except StopIteration as stop:
            assert stop.value.status == 200, stop.value.status
        else:
            raise RuntimeError("the handler waited")

    steps = {
        "empty": lambda: None,
        "handler: __call__ + _forward (a GET answered at once)": handler_get,
        "route: Router.decide": lambda: handler.router.decide("GET", target),
        "request id: header_value + sane + new": lambda: (
            headers.sane_request_id(headers.header_value(raw, gen.rid_lower))
            or headers.new_request_id()),
        "request id: new_request_id": headers.new_request_id,
        "request head: RequestHeads.build only (request id included)": lambda: (
            handler.heads.build("GET", target, raw, HOST, False)),
        "response head: response_block": lambda: headers.response_block(
            up_headers, gen.rid_name, rid),
        "pool checkout: idle() + release (the handler's path)": pool_idle,
        "pool checkout: acquire coroutine + release": pool_checkout,
        "upstream exchange: begin/write/parse (httptools)/take/finish": exchange,
        "client write: ProxiedResponse init+start+send": proxied,
        "(bare) web.Response(body, content_type)": web_response,
        "client write, part: StreamResponse.__init__": lambda: web.StreamResponse(status=200),
        "upstream wait: create_future + Deadlines.add/remove": deadline,
        "metrics: Registry.observe": lambda: metrics.observe("plain", "forward", 200, 0.001,
                                                             0, 240),
        "access log: AccessLog.line": lambda: access.line(request, "plain", HOST, rec,
                                                          time.monotonic(), rid,
                                                          resp_for_log),
        "record: _Record() + 2x time.monotonic": lambda: (_Record(), time.monotonic(),
                                                          time.monotonic()),
    }
    k = args.k
    out: dict[str, float] = {}
    out_file = Path(args.out_file)
    only = [w for w in args.steps.split(",") if w]
    if only:
        steps = {n: f for n, f in steps.items() if n == "empty" or any(w in n for w in only)}
    for name, fn in steps.items():
        for _ in range(200):  # warm: the adaptive interpreter specialises
            fn()
        _self_control("-z")
        for _ in range(k):
            fn()
        _self_control("-d")
        part = instructions.dump_parts(out_file)[-1]
        out[name] = instructions.dump_summary(part) / k
    base = out.pop("empty")
    result = {name: round(v - base, 1) for name, v in out.items()}
    result["_empty_loop"] = round(base, 1)
    print(json.dumps(result))
    return 0
