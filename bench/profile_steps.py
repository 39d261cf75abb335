"""Where a proxied small GET's instructions go, step by step (callgrind, deterministic).

Instruction counts (bench/instructions.py) do not move with the machine's
load, so differences of a few thousand instructions between two servers are
real. This tool measures, each under callgrind on the same small GET:

* floors: ``raw`` (uvloop + httptools answering fixed bytes: no aiohttp at
  all), ``bare`` (aiohttp's web.Server answering from memory, as bench/run.py's
  bare arm), ``minproxy`` (web.Server + the gate's upstream pool and
  ProxiedResponse, with a fixed request head and response block: the
  upstream round trip without any rule);
* the gate as benchmarked, and the gate with one step *ablated*: replaced by
  a lookup of its result for the same request (``route``: the routing
  decision; ``reqhead``: the whole request-head step, checks and header rules;
  ``resphead``: the response header rules), or with metrics or the access log
  turned on; the difference to the gate is what the step costs in place;
* micro-steps (``micro``): one call of a step, K times in a loop, inside one
  process under callgrind, minus the empty loop.

    python bench/profile_steps.py                 # everything, ~15 min
    python bench/profile_steps.py --only micro     # some: raw,bare,minproxy,gate,
                                                  # gate-route,... micro

Results: bench/results/profile-<date>.json (figures) and a table on stdout.
The sub-commands ``serve``, ``raw``, ``minproxy`` and ``micro`` are the
processes it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
HOST = "127.0.0.1"

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
    from palpo_gate import headers, proxy, routing

    for name in names:
        if name == "route":
            _memo_method(routing.Router, "decide", lambda method, target: (method, target))
        elif name == "reqhead":
            _memo_method(proxy.ListenerHandler, "_request_head",
                         lambda request, method, target, client, rid: target)
        elif name == "resphead":
            headers.response_block = _first_result(headers.response_block)
        elif name == "rid":
            # A request id without looking for the client's, checking or making one.
            headers.header_value = _constant_for(headers.header_value, b"x-request-id",
                                                 headers.new_request_id())
            headers.sane_request_id = lambda value: True
        elif name == "protocol":
            # aiohttp's own data_received instead of the head-timeout override
            # (which also cancels the keep-alive timer on every request).
            from aiohttp import web_protocol

            from palpo_gate import server
            server._HeadTimeoutProtocol.data_received = (  # type: ignore[method-assign]
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

            import palpo_gate.run
            import palpo_gate.server  # noqa: F401
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
        server = await loop.create_server(Raw, HOST, args.port, backlog=4096)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print("raw ready", file=sys.stderr, flush=True)
        await stop.wait()
        server.close()

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
            conn = await pool.acquire()
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
        srv = await loop.create_server(server, HOST, args.port, backlog=4096)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print("minproxy ready", file=sys.stderr, flush=True)
        await stop.wait()
        srv.close()

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
    gen = Generation(cfg, loop, None)
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
    metrics = Registry([cfg.listeners[0].name])
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

    def pool_checkout() -> None:
        co = acquire_coro()
        try:
            co.send(None)
        except StopIteration:
            pass

    steps = {
        "empty": lambda: None,
        "route: Router.decide": lambda: handler.router.decide("GET", target),
        "request id: header_value + sane + new": lambda: (
            headers.sane_request_id(headers.header_value(raw, gen.rid_lower))
            or headers.new_request_id()),
        "request head: ListenerHandler._request_head": lambda: handler._request_head(
            request, "GET", target, HOST, rid),
        "request head: build_request_head only": lambda: headers.build_request_head(
            b"GET", target.encode(), raw, client_addr=HOST, peer_trusted=False,
            proto=b"http", host=b"127.0.0.1:8008", request_id_name=gen.rid_name,
            request_id=rid, framing=b""),
        "response head: response_block": lambda: headers.response_block(
            up_headers, gen.rid_name, rid),
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


# -- the driver -----------------------------------------------------------------

VARIANTS = ("raw", "bare", "minproxy", "gate", "gate-route", "gate-reqhead", "gate-resphead",
            "gate-rid", "gate-protocol", "gate-route+reqhead+resphead+rid+protocol",
            "gate-gcoff", "gate-gcfreeze",
            "gate+metrics", "gate+access", "micro", "py-spy", "py-spy-bare", "syscalls-gate",
            "syscalls-bare")

#: Functions whose inclusive share of the gate's samples py-spy reports: the
#: steps of a proxied request, and aiohttp's machinery around the handler.
PYSPY_STEPS = {
    "route (Router.decide)": (("decide", "palpo_gate/routing.py"),),
    "request head (_request_head)": (("_request_head", "palpo_gate/proxy.py"),),
    "response head (response_block)": (("response_block", "palpo_gate/headers.py"),),
    "request id (header_value/new_request_id/sane)": (
        ("header_value", "palpo_gate/headers.py"), ("__call__", "palpo_gate/headers.py"),
        ("sane_request_id", "palpo_gate/headers.py")),
    "pool checkout (Pool.acquire)": (("acquire", "palpo_gate/upstream.py"),),
    "upstream write (Connection.write)": (("write", "palpo_gate/upstream.py"),),
    "response parse (Connection.data_received)": (("data_received", "palpo_gate/upstream.py"),),
    "client write (ProxiedResponse)": (("start", "palpo_gate/response.py"),
                                       ("send", "palpo_gate/response.py"),
                                       ("__init__", "palpo_gate/response.py")),
    "accounting (_Record, finish)": (("__init__", "palpo_gate/proxy.py"),
                                     ("finish", "palpo_gate/upstream.py")),
    "the gate's handler (ListenerHandler.__call__ + _forward)": (
        ("__call__", "palpo_gate/proxy.py"), ("_forward", "palpo_gate/proxy.py")),
    "aiohttp: request parse (RequestHandler.data_received)": (
        ("data_received", "aiohttp/web_protocol.py"), ("data_received", "palpo_gate/server.py")),
    "aiohttp: per-request loop (RequestHandler.start)": (("start", "aiohttp/web_protocol.py"),),
    "aiohttp: _handle_request + finish_response": (("_handle_request", "aiohttp/web_protocol.py"),
                                                   ("finish_response", "aiohttp/web_protocol.py")),
}


def syscalls(instructions: Any, start: Any, n: int, conns: int, tmp: Path) -> dict[str, Any]:
    """System calls per request (strace -c -f attached over N small GETs on a
    natively running server): the kernel work that instruction counts miss."""
    svc = start([])
    out = tmp / f"strace-{svc.pid}.txt"
    try:
        client = instructions.KeepAliveClient(svc.ports["plain"], "/_matrix/client/versions",
                                              conns)
        try:
            client.run(max(200, n // 5), timeout=30)
            proc = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(svc.pid)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached
            client.run(n, timeout=60)
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
        finally:
            client.close()
    finally:
        svc.stop()
    calls: dict[str, float] = {}
    for line in out.read_text().splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(fields) >= 5 and fields[3].isdigit() and not line.startswith("100.00"):
            calls[fields[-1]] = round(int(fields[3]) / n, 3)
    return {"per_request": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
            "total_per_request": round(sum(calls.values()), 3)}


def pyspy_profile(ctx: Any, start: Any, seconds: int, out: Path) -> dict[str, Any]:
    """py-spy (sampling, --nonblocking) on the gate under wrk -c64: the share of
    samples in each step (inclusive), and the top functions by own samples."""
    import shutil

    from palpo_bench import common, wrk

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    svc = start([])
    try:
        port = svc.ports["plain"]
        wrk.run_wrk(ctx, wrk.url(port, common.VERSIONS_PATH), 2, 64)
        spy_proc = subprocess.Popen([spy, "record", "--nonblocking", "-r", "400", "-d",
                                     str(seconds), "-f", "raw", "-o", str(out), "--pid",
                                     str(svc.pid)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
        wrk.run_wrk(ctx, wrk.url(port, common.VERSIONS_PATH), seconds + 2, 64)
        _, err = spy_proc.communicate(timeout=60)
        if not out.exists():
            raise RuntimeError(f"py-spy wrote nothing: {err[-1000:]}")
    finally:
        svc.stop()
    total = 0
    steps = dict.fromkeys(PYSPY_STEPS, 0)
    own: dict[str, int] = {}
    frame_re = re.compile(r"^(.*?) \((.*?)(?::\d+)?\)$")
    for line in out.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = []
        for frame in stack.split(";"):
            m = frame_re.match(frame)
            frames.append((m[1], m[2]) if m else (frame, ""))
        for step, needles in PYSPY_STEPS.items():
            # py-spy names methods Class.method
            if any((f == fn or f.endswith("." + fn)) and path.endswith(suffix)
                   for fn, suffix in needles for f, path in frames):
                steps[step] += count
        fn, path = frames[-1]
        leaf = f"{fn} ({'/'.join(path.split('/')[-2:])})"
        own[leaf] = own.get(leaf, 0) + count
    top = sorted(own.items(), key=lambda kv: -kv[1])[:25]
    return {"samples": total,
            "steps_pct": {k: round(100 * v / total, 1) for k, v in steps.items()},
            "top_own_pct": {k: round(100 * v / total, 1) for k, v in top}}


def drive(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(BENCH_DIR))
    import instructions
    from palpo_bench import arms, cli, common, procs
    from palpo_bench import tools as bench_tools

    only = args.only.split(",") if args.only else list(VARIANTS)
    bad = [v for v in only if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; choose from {','.join(VARIANTS)}")
    rargs = cli.parse_args(["--rounds", "0", "--instructions", str(args.requests),
                            "--no-install"])
    tools = bench_tools.ensure_tools(False, instructions=True)
    fd_limit = bench_tools.raise_fd_limit()
    cpu_load, cpu_proxy, _ = cli.choose_cpus(rargs)
    tmp = Path(tempfile.mkdtemp(prefix="palpo-profile-"))
    cert, key = arms.make_cert(tmp, tools["openssl"])
    ctx = arms.Ctx(rargs, cli.choose_mode(rargs), tools, tmp, cert, key,
                   arms.make_upload_lua(tmp), cpu_load, cpu_proxy, fd_limit)
    me = [sys.executable, str(Path(__file__).resolve())]
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(REPO_DIR)}
    results: dict[str, Any] = {}

    def gate_variant(ablations: str, metrics: bool = False, access: bool = False) -> Any:
        def start(prefix: list[str]) -> Any:
            assert ctx.upstream is not None
            workdir = tmp / f"gate-{ctx.starts}"
            ctx.starts += 1
            workdir.mkdir()
            ports = {"plain": procs.free_port(), "tls": procs.free_port()}
            toml = arms.gate_toml(ctx, ctx.upstream.ports["plain"], ports)
            if access:
                toml = toml.replace('access = "off"', 'access = "plain"')
            if metrics:
                toml += f'\n[metrics]\nbind = "{HOST}:{procs.free_port()}"\n'
            conf = workdir / "gate.toml"
            conf.write_text(toml)
            svc = procs.launch("gate", [*procs.pin(cpu_proxy), *prefix, *me, "serve", "--ablate",
                                        ablations, "--config", str(conf)], workdir, ports, env=env)
            procs.wait_ready(svc, procs.log_says(workdir / "stderr.log", "palpo-gate ready"), 600)
            return svc
        return start

    def floor(kind: str) -> Any:
        def start(prefix: list[str]) -> Any:
            assert ctx.upstream is not None
            workdir = tmp / f"{kind}-{ctx.starts}"
            ctx.starts += 1
            workdir.mkdir()
            ports = {"plain": procs.free_port()}
            cmd = [*procs.pin(cpu_proxy), *prefix, *me, kind, "--port", str(ports["plain"])]
            if kind == "raw":
                cmd += ["--body-file", str(arms.versions_body(tmp))]
            else:
                cmd += ["--upstream-port", str(ctx.upstream.ports["plain"])]
            svc = procs.launch(kind, cmd, workdir, ports, env=env)
            procs.wait_ready(svc, procs.log_says(workdir / "stderr.log", f"{kind} ready"), 600)
            return svc
        return start

    starters = {
        "raw": floor("raw"),
        "bare": lambda p: arms.start_bare(ctx, p, ready_s=600),
        "minproxy": floor("minproxy"),
        "gate": gate_variant(""),
        "gate-route": gate_variant("route"),
        "gate-reqhead": gate_variant("reqhead"),
        "gate-resphead": gate_variant("resphead"),
        "gate-route+reqhead+resphead": gate_variant("route,reqhead,resphead"),
        "gate-rid": gate_variant("rid"),
        "gate-protocol": gate_variant("protocol"),
        "gate-gcoff": gate_variant("gcoff"),
        "gate-gcfreeze": gate_variant("gcfreeze"),
        "gate-route+reqhead+resphead+rid+protocol": gate_variant(
            "route,reqhead,resphead,rid,protocol"),
        "gate+metrics": gate_variant("", metrics=True),
        "gate+access": gate_variant("", access=True),
    }
    try:
        arms.start_upstreams(ctx)
        for name in only:
            if name.startswith("syscalls-"):
                results[name] = syscalls(instructions, starters[name.split("-", 1)[1]],
                                         args.requests, args.conns, tmp)
                continue
            if name in ("py-spy", "py-spy-bare"):
                starter = starters["gate" if name == "py-spy" else "bare"]
                results[name] = pyspy_profile(ctx, starter, args.seconds,
                                              tmp / f"{name}.txt")
                continue
            if name == "micro":
                continue
            subject = instructions.Subject(name, starters[name], common.VERSIONS_PATH)
            results[name] = instructions.measure_callgrind(
                subject, tmp / "callgrind", args.requests, args.conns,
                max(200, args.requests // 5), 3, common.log)
        if "micro" in only:
            conf = tmp / "micro.toml"
            conf.write_text(arms.gate_toml(ctx, 9, {"plain": 8008, "tls": 8443}))
            out_file = tmp / "callgrind" / "callgrind.micro"
            out_file.parent.mkdir(exist_ok=True)
            proc = subprocess.run([*instructions.callgrind_prefix(out_file), *me, "micro",
                                   "--config", str(conf), "--k", str(args.k),
                                   "--out-file", str(out_file)],
                                  capture_output=True, text=True, env=env, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"micro failed: {proc.stderr[-3000:]}")
            results["micro"] = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        for svc in list(reversed(procs.STARTED)):
            procs.stop_service(svc)
        if not args.keep_tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            common.log(f"temp dir kept: {tmp}")
    now = dt.datetime.now(dt.UTC).astimezone()
    out = {"date": now.isoformat(timespec="seconds"), "requests": args.requests,
           "connections": args.conns, "results": results}
    path = args.out / f"profile-{now:%Y-%m-%d}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    if path.exists():  # keep what an earlier partial run measured
        old = json.loads(path.read_text())
        out["results"] = {**old.get("results", {}), **results}
    path.write_text(json.dumps(out, indent=2) + "\n")
    gate = out["results"].get("gate", {}).get("ir_per_request")
    for name, r in out["results"].items():
        if name == "micro":
            for step, ir in r.items():
                print(f"  micro {step:<62} {ir:>10,.0f} Ir")
            continue
        if name.startswith(("py-spy", "syscalls")):
            print(name, json.dumps(r, indent=1))
            continue
        ir = r["ir_per_request"]
        diff = f"{ir - gate:+10,.0f} vs gate" if gate else ""
        print(f"{name:<30} {ir:>10,.0f} Ir/request  {diff}")
    common.log(f"written: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    p = sub.add_parser("serve")
    p.add_argument("--ablate", default="")
    p.add_argument("--config", required=True)
    p = sub.add_parser("raw")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--body-file", required=True)
    p = sub.add_parser("minproxy")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream-port", type=int, required=True)
    p = sub.add_parser("micro")
    p.add_argument("--config", required=True)
    p.add_argument("--k", type=int, default=2000)
    p.add_argument("--out-file", required=True)
    ap.add_argument("--only", help=f"comma-separated, from {','.join(VARIANTS)}")
    ap.add_argument("--requests", type=int, default=2000, help="small GETs per measurement")
    ap.add_argument("--conns", type=int, default=64, help="keep-alive connections")
    ap.add_argument("--k", type=int, default=2000, help="calls per micro-step")
    ap.add_argument("--seconds", type=int, default=15, help="py-spy recording under wrk")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    ap.add_argument("--keep-tmp", action="store_true")
    args = ap.parse_args(argv)
    commands = {"serve": cmd_serve, "raw": cmd_raw, "minproxy": cmd_minproxy,
                "micro": cmd_micro}
    if args.cmd in commands:
        return commands[args.cmd](args)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
