"""The upstream leg under slow clients and hostile upstreams, over real sockets.

- an upload slower than ``upstream.read_timeout`` is not cut: the response
  deadline starts once the body is sent;
- the upstream's response head is capped (memory, and httptools' quadratic
  joining of a long header value);
- a HEAD response leaves its upstream connection reusable;
- a client that stops reading holds a bounded amount of memory, also when
  it stops after reading fast;
- a fast download arrives byte for byte (Content-Length and chunked).

Memory is measured on a gate process of its own (``run_gate``), so that the
test's clients and upstreams do not count.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import pathlib
import random
import socket
import time
from collections.abc import AsyncIterator

import httptools
import pytest
from support.client import Conn, Resp, fetch, get
from support.gate import gate_toml, port_of, run_gate, running_gate
from support.net import free_port
from support.recorder import Handler, Recorder, Req, recorder, response
from test_forwarding import assert_matrix_error

from palpo_gate import config as configmod
from palpo_gate import upstream
from palpo_gate.upstream import MAX_RESPONSE_HEAD, Pool

KiB = 1024
MiB = 1024 * KiB


def _toml(up: Recorder, *, port: int = 0, upstream: str = "", limits: str = "") -> str:
    return gate_toml(f"http://127.0.0.1:{up.port}", bind=f"127.0.0.1:{port}",
                     upstream_keys=upstream, before=f"[limits]\n{limits}")


def _rss_kib(pid: int, key: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {key} for pid {pid}")


# ---------------------------------------------------------------------------
# Slow uploads: the response deadline starts once the body is sent


UPLOAD_PIECE = 32 * KiB
UPLOAD_PIECES = 14
UPLOAD_PAUSE = 0.25  # 14 pieces: about 3.5 s, against a read_timeout of 1 s


def _upload_head(length: int) -> bytes:
    return (b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: gate.test\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % length)


def _piece(i: int) -> bytes:
    return bytes([i % 251]) * UPLOAD_PIECE


async def test_an_upload_slower_than_read_timeout_is_not_cut() -> None:
    async def digest(req: Req, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        body = await req.read_body(reader)
        writer.write(response(200, hashlib.sha256(body).hexdigest().encode()))

    total = UPLOAD_PIECE * UPLOAD_PIECES
    expected = hashlib.sha256(b"".join(_piece(i) for i in range(UPLOAD_PIECES))).hexdigest()
    async with recorder() as up:
        up.handler = digest
        async with running_gate(_toml(up, upstream='read_timeout = "1s"')) as gate:
            conn = await Conn.open(port_of(gate))
            try:
                started = time.monotonic()
                await conn.send(_upload_head(total))
                for i in range(UPLOAD_PIECES):
                    await conn.send(_piece(i))
                    await asyncio.sleep(UPLOAD_PAUSE)
                took = time.monotonic() - started
                resp = await conn.read_response()
            finally:
                await conn.close()
    assert took > 3.0
    assert resp.status == 200, resp
    assert resp.body.decode() == expected
    assert len(up.requests[0].body) == total


async def test_the_response_deadline_still_runs_once_the_body_is_sent() -> None:
    async def silent(req: Req, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await req.read_body(reader)
        await reader.read()  # never answers; returns when the gate closes

    async with recorder() as up:
        up.handler = silent
        async with running_gate(_toml(up, upstream='read_timeout = "1s"')) as gate:
            conn = await Conn.open(port_of(gate))
            try:
                await conn.send(_upload_head(UPLOAD_PIECE * 4))
                for i in range(4):
                    await conn.send(_piece(i))
                    await asyncio.sleep(0.4)  # 1.6 s of upload, over read_timeout
                sent = time.monotonic()
                resp = await conn.read_response(timeout=15)
                waited = time.monotonic() - sent
            finally:
                await conn.close()
    assert_matrix_error(resp, 504)
    assert 0.5 < waited < 6, waited


async def test_an_early_answer_mid_upload_is_delivered() -> None:
    async def refuse(req: Req, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        # Answers from the head alone, as a homeserver refusing a bad token does.
        writer.write(response(401, b'{"errcode":"M_UNKNOWN_TOKEN"}',
                              [("Content-Type", "application/json")], reason="Unauthorized"))
        await writer.drain()
        await reader.read()  # the rest of the body is not read; until the gate closes

    async with recorder() as up:
        up.handler = refuse
        async with running_gate(_toml(up, upstream='read_timeout = "1s"')) as gate:
            conn = await Conn.open(port_of(gate))
            try:
                await conn.send(_upload_head(UPLOAD_PIECE * 100))
                await conn.send(_piece(0))
                resp = await conn.read_response(timeout=10)
            finally:
                await conn.close()
    assert resp.status == 401
    assert resp.body == b'{"errcode":"M_UNKNOWN_TOKEN"}'


# ---------------------------------------------------------------------------
# The response head is capped


class HeadFlood:
    """Upstream handler: a response head that does not end (many 8 KiB header
    fields, or one header value that grows), sent until the gate closes the
    connection or *limit* bytes have gone; then a valid end of head."""

    def __init__(self, kind: str, limit: int) -> None:
        self.kind = kind
        self.limit = limit
        self.sent = 0
        self.cut = asyncio.Event()

    async def __call__(self, req: Req, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n")
        if self.kind == "value":
            writer.write(b"X-Big: ")
        pad = b"a" * (8 * KiB)
        i = 0
        try:
            while self.sent < self.limit:
                if self.kind == "fields":
                    piece = b"X-Pad-%d: %s\r\n" % (i, pad)
                    i += 1
                else:
                    piece = pad * 8
                writer.write(piece)
                self.sent += len(piece)
                await writer.drain()
            writer.write(b"\r\nContent-Length: 2\r\n\r\nok" if self.kind == "value"
                         else b"Content-Length: 2\r\n\r\nok")
            await writer.drain()
        except ConnectionError:
            self.cut.set()
            raise


async def _health_probe(port: int, stop: asyncio.Event) -> float:
    """GET /health on fresh connections until *stop*; the slowest answer (s)."""
    worst = 0.0
    while not stop.is_set():
        started = time.monotonic()
        r = await fetch(port, get("/health"))
        assert r.status == 200
        worst = max(worst, time.monotonic() - started)
        await asyncio.sleep(0.02)
    return worst


async def _flood_through_gate(kind: str, limit: int, tmp_path: pathlib.Path
                              ) -> tuple[Resp, float, float, int, HeadFlood]:
    flood = HeadFlood(kind, limit)
    async with recorder() as up:
        up.handler = flood
        port = free_port()
        with run_gate(_toml(up, port=port), tmp_path) as gp:
            pid = gp.proc.pid
            await fetch(port, get("/health"))
            rss_before = _rss_kib(pid)
            stop = asyncio.Event()
            probe = asyncio.create_task(_health_probe(port, stop))
            started = time.monotonic()
            resp = await fetch(port, get("/_matrix/media/v3/download/hs/x"))
            took = time.monotonic() - started
            await asyncio.sleep(0.5)  # /health keeps being asked meanwhile
            stop.set()
            worst = await probe
            growth_kib = _rss_kib(pid, "VmHWM") - rss_before
    return resp, took, worst, growth_kib, flood


async def test_an_endless_response_head_of_many_fields_is_a_502(tmp_path: pathlib.Path) -> None:
    resp, took, worst, growth_kib, flood = await _flood_through_gate(
        "fields", 8 * MiB, tmp_path)
    assert_matrix_error(resp, 502)
    assert took < 10, took
    assert flood.cut.is_set(), f"the gate read {flood.sent} bytes of head"
    assert growth_kib < 8 * KiB, f"gate RSS grew by {growth_kib} KiB"
    assert worst < 2.0, f"/health took {worst:.2f} s"


async def test_one_endless_header_value_is_a_502(tmp_path: pathlib.Path) -> None:
    # Before the cap, httptools joined the value piece by piece (quadratic):
    # 64 MiB held the event loop for about 20 s.
    resp, took, worst, growth_kib, flood = await _flood_through_gate(
        "value", 64 * MiB, tmp_path)
    assert_matrix_error(resp, 502)
    assert took < 10, took
    assert flood.cut.is_set(), f"the gate read {flood.sent} bytes of head"
    assert growth_kib < 8 * KiB, f"gate RSS grew by {growth_kib} KiB"
    assert worst < 2.0, f"/health took {worst:.2f} s"


async def test_a_head_just_under_the_cap_is_forwarded() -> None:
    async def big_head(req: Req, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        status = b"HTTP/1.1 200 OK\r\n"
        tail = b"Content-Length: 2\r\n\r\n"
        pad = MAX_RESPONSE_HEAD - len(status) - len(tail) - len(b"X-Pad: \r\n")
        # Sent in small pieces, as a slow upstream would.
        head = status + b"X-Pad: " + b"p" * pad + b"\r\n" + tail
        assert len(head) == MAX_RESPONSE_HEAD
        for i in range(0, len(head), 1000):
            writer.write(head[i:i + 1000])
            await writer.drain()
        writer.write(b"ok")

    async with recorder() as up:
        up.handler = big_head
        async with running_gate(_toml(up)) as gate:
            conn = await Conn.open(port_of(gate))
            try:
                r = await conn.request(get("/_matrix/x"))
                assert (r.status, r.body) == (200, b"ok")
                assert len(r.header("X-Pad") or "") > 60000
                # The connection stays usable for the next request.
                r = await conn.request(get("/_matrix/x"))
                assert (r.status, r.body) == (200, b"ok")
            finally:
                await conn.close()
        assert up.connections == 1


async def test_a_head_over_the_cap_closes_the_upstream_connection() -> None:
    async def over(req: Req, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        if req.target == b"/_matrix/over":
            writer.write(b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * MAX_RESPONSE_HEAD
                         + b"\r\nContent-Length: 2\r\n\r\nok")
        else:
            writer.write(response(200, b"fine"))

    async with recorder() as up:
        up.handler = over
        async with running_gate(_toml(up)) as gate:
            conn = await Conn.open(port_of(gate))
            try:
                r = await conn.request(get("/_matrix/over"))
                assert_matrix_error(r, 502)
                r = await conn.request(get("/_matrix/next"))
                assert (r.status, r.body) == (200, b"fine")
            finally:
                await conn.close()
        assert up.connections == 2


# ---------------------------------------------------------------------------
# HEAD responses leave the connection reusable


def _head_handler(extra: bytes = b"", later: bytes = b"", close: bool = False) -> Handler:
    async def handler(req: Req, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        if req.method == b"HEAD":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
                         + (b"Connection: close\r\n" if close else b"")
                         + b"Content-Length: 1234\r\n\r\n" + extra)
            if later:
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.write(later)
            if close:
                await writer.drain()
                writer.close()
        else:
            writer.write(response(200, b"body of " + req.target))
    return handler


async def test_200_heads_on_one_client_connection_use_one_upstream_connection() -> None:
    async with recorder() as up:
        up.handler = _head_handler()
        async with running_gate(_toml(up)) as gate:
            conn = await Conn.open(port_of(gate))
            try:
                for i in range(200):
                    r = await conn.request(get(f"/_matrix/media/v3/download/hs/{i}",
                                               method="HEAD"), head_only=True)
                    assert r.status == 200
                    assert r.header("Content-Length") == "1234"
                # A GET after them gets its own response, not a stale one.
                r = await conn.request(get("/_matrix/after"))
                assert (r.status, r.body) == (200, b"body of /_matrix/after")
                assert conn.pending == b""
            finally:
                await conn.close()
        assert len(up.requests) == 201
        assert up.connections == 1


async def test_a_head_response_with_connection_close_is_not_reused() -> None:
    async with recorder() as up:
        up.handler = _head_handler(close=True)
        async with running_gate(_toml(up)) as gate:
            conn = await Conn.open(port_of(gate))
            try:
                r = await conn.request(get("/_matrix/a", method="HEAD"), head_only=True)
                assert r.status == 200
                r = await conn.request(get("/_matrix/b"))
                assert (r.status, r.body) == (200, b"body of /_matrix/b")
            finally:
                await conn.close()
        assert up.connections == 2


async def test_bytes_after_a_head_response_make_the_connection_out_of_step() -> None:
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"
    for label, handler in (("same write", _head_handler(extra=smuggled)),
                           ("later write", _head_handler(later=smuggled))):
        async with recorder() as up:
            up.handler = handler
            async with running_gate(_toml(up)) as gate:
                conn = await Conn.open(port_of(gate))
                try:
                    r = await conn.request(get("/_matrix/a", method="HEAD"), head_only=True)
                    assert r.status == 200, label
                    await asyncio.sleep(0.5)  # the later write has come meanwhile
                    r = await conn.request(get("/_matrix/b"))
                    assert (r.status, r.body) == (200, b"body of /_matrix/b"), label
                finally:
                    await conn.close()
            assert up.connections == 2, label


# ---------------------------------------------------------------------------
# A client that stops reading holds little


STALLED = 100
BIG_BODY = 256 * MiB


def _big_body(fill: bytes) -> Handler:
    """An upstream answering BIG_BODY bytes of *fill* (a small answer to
    ``/warm-up``), as fast as the gate takes them."""
    block = fill * MiB

    async def big(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if req.target.endswith(b"/warm-up"):
            writer.write(response(200, b"warm"))
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\n\r\n" % BIG_BODY)
        for _ in range(BIG_BODY // MiB):
            writer.write(block)
            await writer.drain()

    return big


@contextlib.asynccontextmanager
async def _download_gate(fill: bytes, tmp_path: pathlib.Path
                         ) -> AsyncIterator[tuple[Recorder, int, int]]:
    """The real gate process in front of a _big_body upstream, warmed up:
    (the upstream, the gate's port, its pid)."""
    async with recorder() as up:
        up.handler = _big_body(fill)
        port = free_port()
        with run_gate(_toml(up, port=port, limits='body_timeout = "120s"'), tmp_path) as gp:
            for _ in range(3):
                assert (await fetch(port, get("/_matrix/warm-up"))).body == b"warm"
            yield up, port, gp.proc.pid


async def _settled_rss(pid: int, timeout: float = 30) -> int:
    """The gate's RSS once it has not moved for 2 s."""
    last, settled_at, deadline = -1, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        rss = _rss_kib(pid)
        if rss != last:
            last, settled_at = rss, time.monotonic()
        elif time.monotonic() - settled_at > 2:
            break
    return _rss_kib(pid)


async def test_stalled_downloads_hold_little_memory_each(tmp_path: pathlib.Path) -> None:
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    async with _download_gate(b"x", tmp_path) as (up, port, pid):
        try:
            await asyncio.sleep(0.3)
            rss_before = _rss_kib(pid)
            for _ in range(STALLED):
                s = socket.socket()
                s.setblocking(False)
                await loop.sock_connect(s, ("127.0.0.1", port))
                s.send(get("/_matrix/media/v3/download/hs/big"))  # then never read
                socks.append(s)
            await up.wait_requests(3 + STALLED, timeout=30)
            # Until the gate's memory settles: every download has filled the
            # socket buffers and the gate holds what it holds.
            per_client = (await _settled_rss(pid) - rss_before) / STALLED
            # The gate still answers while they stall.
            assert (await fetch(port, get("/health"))).status == 200
        finally:
            for s in socks:
                s.close()
    assert per_client < 300, f"{per_client:.0f} KiB per stalled download"


FAST_THEN_STALLED = 40
FAST_START = 4 * MiB


async def test_a_client_that_stalls_after_a_fast_start_holds_little(
        tmp_path: pathlib.Path) -> None:
    # A client that read fast (large socket buffers, reads at full size on
    # both legs) and then stops: what the gate keeps for it falls back to
    # the bound of a client that never read.
    conns: list[Conn] = []
    async with _download_gate(b"y", tmp_path) as (_, port, pid):
        try:
            rss_before = await _settled_rss(pid)
            for _ in range(FAST_THEN_STALLED):
                conn = await Conn.open(port)
                conns.append(conn)
                await conn.send(get("/_matrix/media/v3/download/hs/big"))
                got = 0
                async with asyncio.timeout(30):
                    while got < FAST_START:  # as fast as it comes, then never again
                        data = await conn.reader.read(MiB)
                        assert data
                        got += len(data)
                # The stream reader stops reading from the socket past its limit.
                conn.writer.transport.pause_reading()
            per_client = (await _settled_rss(pid) - rss_before) / FAST_THEN_STALLED
            assert (await fetch(port, get("/health"))).status == 200
        finally:
            for conn in conns:
                conn.writer.transport.abort()
    assert per_client < 300, f"{per_client:.0f} KiB per download stalled after a fast start"


async def test_reads_grow_while_the_client_keeps_up_and_shrink_when_it_stops(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A spy on the pool's reads (the real ones: it records and calls on).
    reads: list[int] = []
    real = upstream.Connection.buffer_updated

    def spy(self: upstream.Connection, nbytes: int) -> None:
        reads.append(nbytes)
        real(self, nbytes)

    monkeypatch.setattr(upstream.Connection, "buffer_updated", spy)
    block = b"z" * MiB

    async def big(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG_BODY)
        with contextlib.suppress(ConnectionError):
            for _ in range(BIG_BODY // MiB):
                writer.write(block)
                await writer.drain()

    async with recorder() as up:
        up.handler = big
        async with running_gate(_toml(up)) as gate:
            conn = await Conn.open(port_of(gate))
            try:
                await conn.send(get("/_matrix/media/v3/download/hs/big"))
                got = 0
                async with asyncio.timeout(30):
                    while got < FAST_BODY:
                        data = await conn.reader.read(4 * MiB)
                        assert data
                        got += len(data)
                fast = list(reads)
                # Now it stops reading: once the kernel holds what it can,
                # the gate's reads are back to their smallest size.
                conn.writer.transport.pause_reading()
                await asyncio.sleep(2)
                stalled = reads[len(fast):]
            finally:
                conn.writer.transport.abort()
    large = sum(n for n in fast if n > 64 * KiB)
    assert large > sum(fast) // 2, f"reads of a fast download: {sorted(set(fast))}"
    assert stalled and max(stalled[-8:]) <= 64 * KiB, f"reads after the stall: {stalled[-8:]}"


class _Digest:
    """httptools callbacks: the status and the sha256 of the body as it comes."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0
        self.done = False
        self.chunked = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"transfer-encoding" and value.lower() == b"chunked":
            self.chunked = True

    def on_body(self, body: bytes) -> None:
        self.sha.update(body)
        self.size += len(body)

    def on_message_complete(self) -> None:
        self.done = True


FAST_BODY = 32 * MiB


async def test_a_fast_download_arrives_byte_exact() -> None:
    rng = random.Random(12)
    body = rng.randbytes(FAST_BODY)
    expected = hashlib.sha256(body).hexdigest()

    async def serve(req: Req, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        chunked = req.target.endswith(b"/chunked")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     + (b"Transfer-Encoding: chunked\r\n\r\n" if chunked
                        else b"Content-Length: %d\r\n\r\n" % FAST_BODY))
        pos, sizes = 0, random.Random(7)
        while pos < FAST_BODY:
            # Odd sizes, so that pieces and reads never line up.
            n = min(sizes.randrange(1, 700_000), FAST_BODY - pos)
            piece = body[pos:pos + n]
            writer.write(b"%x\r\n%b\r\n" % (n, piece) if chunked else piece)
            pos += n
            await writer.drain()
        if chunked:
            writer.write(b"0\r\n\r\n")

    async with recorder() as up:
        up.handler = serve
        async with running_gate(_toml(up)) as gate:
            conn = await Conn.open(port_of(gate))
            try:
                for kind in ("length", "chunked"):
                    got = _Digest()
                    parser = httptools.HttpResponseParser(got)
                    await conn.send(get(f"/_matrix/media/v3/download/hs/{kind}"))
                    async with asyncio.timeout(60):
                        while not got.done:
                            data = await conn.reader.read(1 << 20)
                            assert data, f"{kind}: the gate closed after {got.size} bytes"
                            parser.feed_data(data)
                    assert parser.get_status_code() == 200
                    assert got.chunked == (kind == "chunked")
                    assert (got.size, got.sha.hexdigest()) == (FAST_BODY, expected), kind
            finally:
                await conn.close()
        assert up.connections == 1  # both on one upstream connection, reused



async def test_a_connection_paused_for_a_slow_client_is_pooled_reading_again() -> None:
    # The forward loop pauses upstream reads while the client is behind, also
    # at the last piece of a response; the connection then goes back to the
    # pool and must read again: its next response, or the upstream closing it.
    async with recorder() as up:
        cfg = configmod.loads(_toml(up, upstream='read_timeout = "2s"')).upstream
        pool = Pool(cfg, asyncio.get_running_loop())
        try:
            for i in range(2):
                conn = await pool.acquire()
                conn.begin(head_only=False)
                conn.write(get(f"/_matrix/{i}"))
                status, _, _ = await conn.read_head(2)
                body = b""
                while data := await conn.read_body(2):
                    body += data
                assert (status, conn.drained()) == (200, True)
                assert b'"target": "/_matrix/%d"' % i in body
                conn.pause()
                conn.finish(reusable=True)
                assert pool.idle_count == 1
            assert up.connections == 1
        finally:
            pool.close()
