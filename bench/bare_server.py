"""The floor of the gate's own stack: aiohttp's low-level ``web.Server`` on uvloop.

It answers every request with the fast upstream's ``/_matrix/client/versions``
body (the same ~240 bytes of JSON, ``Content-Type: application/json``) from
memory: no upstream, no routing, no header rules. The gate runs on the same
server class, the same event loop and the same parser, so gate / bare is the
cost of what the gate adds on top of the stack it is built on, and that ratio
hardly depends on the machine or on how busy it is.

The server is set up as the gate sets up its listeners (``handler_cancellation``,
no auto-decompression, no access log, the same backlog), with an optional TLS
listener on the same certificate as the gate's.

Run: ``python bench/bare_server.py --port N [--tls-port M --cert C --key K]
[--body-file F]``; it prints ``bare-server ready`` on stderr once listening;
SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import sys
from pathlib import Path

import uvloop
from aiohttp import web

HOST = "127.0.0.1"
BACKLOG = 4096  # as the gate's listeners
# The fast upstream's /versions answer (bench/palpo_bench/common.py VERSIONS_JSON); --body-file
# gives the exact bytes the runner serves.
DEFAULT_BODY = b'{"versions":["v1.11"]}'


def make_server(body: bytes) -> web.Server:
    async def answer(request: web.BaseRequest) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return web.Server(answer, handler_cancellation=True, auto_decompress=False,
                      access_log=None, keepalive_timeout=75.0)


async def serve(args: argparse.Namespace, body: bytes) -> None:
    loop = asyncio.get_running_loop()
    server = make_server(body)
    listeners = [await loop.create_server(server, HOST, args.port, backlog=BACKLOG)]
    if args.tls_port:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
        listeners.append(await loop.create_server(server, HOST, args.tls_port, ssl=ctx,
                                                  backlog=BACKLOG))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("bare-server ready", file=sys.stderr, flush=True)
    await stop.wait()
    for lst in listeners:
        lst.close()
    await server.shutdown(1.0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tls-port", type=int, default=0)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--body-file", help="the response body (default: a short JSON)")
    args = ap.parse_args(argv)
    if args.tls_port and not (args.cert and args.key):
        ap.error("--tls-port needs --cert and --key")
    body = Path(args.body_file).read_bytes() if args.body_file else DEFAULT_BODY
    uvloop.run(serve(args, body))


if __name__ == "__main__":
    main()
