"""The benchmark's slow upstream: held ``/sync`` long-polls and whole-body uploads.

It stands in for the two Palpo behaviours that a fast static server cannot
imitate, and nothing else:

* ``GET /_matrix/client/v3/sync?...`` is answered ``--hold`` seconds after the
  request arrived (``timeout=0`` in the query answers at once, as Matrix does),
  so a proxy must keep thousands of idle request pairs open;
* ``POST /_matrix/media/v3/upload`` is answered only after the whole body has
  arrived, so upload throughput is the proxy's, not a buffer's;
* ``GET /_bench/stats`` is the runner's side door (never proxied): how many
  long-polls are held right now and the peak, uploads completed, bytes received.

One uvloop process, httptools parsing, keep-alive, no per-request allocation
beyond the response bytes. Run: ``python bench/slow_upstream.py --port N``;
it prints ``slow-upstream ready`` on stderr when listening; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import sys

import httptools
import uvloop

SYNC_PATH = b"/_matrix/client/v3/sync"
UPLOAD_PATH = b"/_matrix/media/v3/upload"
STATS_PATH = b"/_bench/stats"
SYNC_BODY = b'{"next_batch":"s72595_4483_1934","rooms":{"join":{},"invite":{},"leave":{}}}'


class Stats:
    """Counters shared by every connection (one process, one thread)."""

    def __init__(self) -> None:
        self.held = 0
        self.max_held = 0
        self.syncs_answered = 0
        self.uploads_completed = 0
        self.upload_bytes = 0

    def as_json(self) -> bytes:
        return json.dumps(vars(self)).encode()


def response(status: bytes, body: bytes, keep_alive: bool) -> bytes:
    head = [b"HTTP/1.1 ", status, b"\r\nContent-Type: application/json\r\nContent-Length: ",
            str(len(body)).encode(), b"\r\n"]
    if not keep_alive:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + body


def wants_no_hold(query: bytes) -> bool:
    return any(part == b"timeout=0" for part in query.split(b"&"))


class UpstreamProtocol(asyncio.Protocol):
    """One client connection; httptools calls the ``on_*`` methods."""

    def __init__(self, hold: float, stats: Stats) -> None:
        self.hold = hold
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.header_name = b""
        self.body_bytes = 0
        self.timer: asyncio.TimerHandle | None = None

    # -- connection ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._send(b"400 Bad Request", b'{"errcode":"M_UNKNOWN"}', False)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:  # the client (the proxy) gave up a held poll
            self.timer.cancel()
            self.timer = None
            self.stats.held -= 1
        self.transport = None

    def _send(self, status: bytes, body: bytes, keep_alive: bool) -> None:
        if self.transport is None:
            return
        self.transport.write(response(status, body, keep_alive))
        if not keep_alive:
            self.transport.close()

    # -- httptools callbacks ------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"expect" and value.lower() == b"100-continue":
            if self.transport is not None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        self.stats.upload_bytes += len(body)

    def on_message_complete(self) -> None:
        # should_keep_alive() must be read here: after feed_data() returns it
        # no longer describes this message.
        keep_alive = self.parser.should_keep_alive()
        method = self.parser.get_method()
        path, _, query = self.url.partition(b"?")
        if path == SYNC_PATH:
            self._sync(query, keep_alive)
        elif path == UPLOAD_PATH and method == b"POST":
            self.stats.uploads_completed += 1
            body = b'{"content_uri":"mxc://bench/upload","bytes":%d}' % self.body_bytes
            self._send(b"200 OK", body, keep_alive)
        elif path == STATS_PATH:
            self._send(b"200 OK", self.stats.as_json(), keep_alive)
        else:
            self._send(b"404 Not Found", b'{"errcode":"M_NOT_FOUND"}', keep_alive)

    # -- /sync ----------------------------------------------------------------
    def _sync(self, query: bytes, keep_alive: bool) -> None:
        if self.hold <= 0 or wants_no_hold(query):
            self.stats.syncs_answered += 1
            self._send(b"200 OK", SYNC_BODY, keep_alive)
            return
        self.stats.held += 1
        self.stats.max_held = max(self.stats.max_held, self.stats.held)
        self.timer = self.loop.call_later(self.hold, self._answer_sync, keep_alive)

    def _answer_sync(self, keep_alive: bool) -> None:
        self.timer = None
        self.stats.held -= 1
        self.stats.syncs_answered += 1
        self._send(b"200 OK", SYNC_BODY, keep_alive)


async def serve(host: str, port: int, hold: float, backlog: int) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    server = await loop.create_server(lambda: UpstreamProtocol(hold, stats), host, port,
                                      backlog=backlog, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"slow-upstream ready on {host}:{port} (hold {hold}s)", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        server.close()


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--hold", type=float, default=10.0,
                    help="seconds a /sync long-poll is held before its answer (default 10)")
    ap.add_argument("--backlog", type=int, default=16384)
    args = ap.parse_args(argv)
    raise_fd_limit()
    uvloop.run(serve(args.host, args.port, args.hold, args.backlog))
    return 0


if __name__ == "__main__":
    sys.exit(main())
