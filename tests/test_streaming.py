"""Bodies stream through the gate in both directions (docs/DESIGN.md sections 3 and 5).

Real gate in the test's event loop, real recording upstream, raw client, all
on loopback. The gate runs in this process, so its memory is this process's
RSS (``/proc/self/status``); the test's own client and upstream never hold a
big body, they count bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from support.client import Conn, Resp, chunk, get, raw
from support.gate import gate_toml, port_of, running_gate
from support.recorder import Recorder, Req, count_handler, echo_handler, response, up_url

MiB = 1024 * 1024


def with_limits(up: Recorder, limits: str) -> str:
    return gate_toml(up_url(up), extra=f"[limits]\n{limits}\n")


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class RssSampler:
    """Samples this process's RSS every 10 ms; ``growth`` is peak minus baseline."""

    def __init__(self) -> None:
        self.baseline = rss_bytes()
        self.peak = self.baseline
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes())
            await asyncio.sleep(0.01)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def blocks(total: int, size: int = MiB) -> Iterator[bytes]:
    """*total* bytes of generated body, one reused block at a time."""
    block = bytes(range(256)) * (size // 256)
    sent = 0
    while sent < total:
        piece = block if total - sent >= size else block[: total - sent]
        sent += len(piece)
        yield piece


async def read_head(conn: Conn, timeout: float = 10.0) -> tuple[int, dict[str, str]]:
    async with asyncio.timeout(timeout):
        head = await conn.reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        n, _, v = line.partition(":")
        headers[n.strip().lower()] = v.strip()
    return status, headers


# ---------------------------------------------------------------------------
# Upload streaming


async def test_content_length_upload_streams_before_the_client_finishes(up: Recorder) -> None:
    async with running_gate(gate_toml(up_url(up))) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            first, rest = b"a" * 20000, b"b" * 20000
            await conn.send(raw("PUT", "/_matrix/media/v3/upload/hs/x",
                                [("Content-Length", str(len(first) + len(rest)))], first))
            await up.wait_requests(1)
            req = up.requests[0]
            async with asyncio.timeout(5):
                await req.first_body_byte.wait()
            # the upstream has body bytes while the client still holds the rest
            assert not req.body_done.is_set()
            assert 0 < len(req.raw_body) <= len(first)
            await conn.send(rest)
            resp = await conn.read_response()
            assert resp.status == 200
            assert resp.json()["len"] == 40000  # type: ignore[index]
            assert req.body == first + rest
            assert req.header_all("content-length") == [b"40000"]
        finally:
            await conn.close()


async def test_chunked_upload_streams_before_the_client_finishes(up: Recorder) -> None:
    async with running_gate(gate_toml(up_url(up))) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            first, rest = b"a" * 5000, b"b" * 7000
            await conn.send(raw("POST", "/_matrix/media/v3/upload",
                                [("Transfer-Encoding", "chunked")], chunk(first)))
            await up.wait_requests(1)
            req = up.requests[0]
            async with asyncio.timeout(5):
                await req.first_body_byte.wait()
            assert not req.body_done.is_set()
            assert req.header_all("transfer-encoding") == [b"chunked"]
            await conn.send(chunk(rest) + b"0\r\n\r\n")
            resp = await conn.read_response()
            assert resp.status == 200
            assert resp.json()["len"] == 12000  # type: ignore[index]
            assert req.body == first + rest
        finally:
            await conn.close()


# ---------------------------------------------------------------------------
# Download streaming


async def test_chunked_download_reaches_the_client_piece_by_piece(up: Recorder) -> None:
    last_written = asyncio.Event()
    pieces = [b"piece-%d;" % i * 50 for i in range(5)]

    async def slow(req: Req, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        await req.read_body(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for i, piece in enumerate(pieces):
            if i:
                await asyncio.sleep(0.2)
            writer.write(chunk(piece))
            await writer.drain()
        last_written.set()
        writer.write(b"0\r\n\r\n")

    up.handler = slow
    seen: list[tuple[int, bool]] = []  # (pieces of body so far, upstream done?)

    def on_chunk(resp: Resp) -> None:
        if resp.chunks and (not seen or seen[-1][0] != len(resp.chunks)):
            seen.append((len(resp.chunks), last_written.is_set()))

    async with running_gate(gate_toml(up_url(up))) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            await conn.send(get("/_matrix/client/v3/sync"))
            resp = await conn.read_response(on_chunk=on_chunk)
        finally:
            await conn.close()
    assert resp.status == 200 and resp.complete
    assert resp.body == b"".join(pieces)
    assert seen, "no body piece seen before the end of the response"
    assert seen[0][1] is False, "the first piece arrived only after the upstream finished"
    # most pieces arrived separately, while the upstream was still writing
    assert sum(1 for _, done in seen if not done) >= 3, seen


# ---------------------------------------------------------------------------
# Big bodies, flat memory


BIG = 200 * MiB
MAX_GROWTH = 40 * MiB


async def test_big_download_keeps_memory_flat(up: Recorder) -> None:
    async def big(req: Req, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
        await req.read_body(reader)
        if req.target.endswith(b"/warm-up"):
            writer.write(response(200, b"warm"))
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\n\r\n" % BIG)
        for block in blocks(BIG):
            writer.write(block)
            await writer.drain()

    up.handler = big
    async with running_gate(gate_toml(up_url(up))) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            assert (await conn.request(get("/_matrix/warm-up"))).body == b"warm"
            with RssSampler() as rss:
                await conn.send(get("/_matrix/media/v3/download/hs/big"))
                status, headers = await read_head(conn)
                assert status == 200
                assert headers.get("content-length") == str(BIG)
                got = 0
                async with asyncio.timeout(30):
                    while got < BIG:
                        data = await conn.reader.read(MiB)
                        if not data:
                            break
                        got += len(data)
            assert got == BIG
        finally:
            await conn.close()
    assert rss.growth < MAX_GROWTH, f"RSS grew by {rss.growth / MiB:.1f} MiB"


async def test_big_upload_keeps_memory_flat(up: Recorder) -> None:
    up.handler = count_handler
    async with running_gate(gate_toml(up_url(up), extra='[limits]\nmax_body_size = "1G"\n')
                            ) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            with RssSampler() as rss:
                await conn.send(raw("PUT", "/_matrix/media/v3/upload/hs/big",
                                    [("Content-Length", str(BIG)),
                                     ("Content-Type", "application/octet-stream")]))
                async with asyncio.timeout(30):
                    for block in blocks(BIG):
                        conn.writer.write(block)
                        await conn.writer.drain()
                resp = await conn.read_response(timeout=30)
        finally:
            await conn.close()
    assert resp.status == 200
    assert resp.body == b"%d" % BIG
    assert up.requests[0].header_all("content-length") == [str(BIG).encode()]
    assert rss.growth < MAX_GROWTH, f"RSS grew by {rss.growth / MiB:.1f} MiB"


# ---------------------------------------------------------------------------
# Limits on the request body


class BodyWatcher:
    """Upstream handler: reads the request body and records whether the gate
    closed the connection before the body was complete."""

    def __init__(self) -> None:
        self.aborted = asyncio.Event()
        self.completed = asyncio.Event()
        self.req: Req | None = None

    async def __call__(self, req: Req, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        self.req = req
        try:
            await req.read_body(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.aborted.set()
            return
        self.completed.set()
        writer.write(response(200, b"took it all"))


async def test_chunked_upload_over_max_body_size_is_413_and_aborted(up: Recorder) -> None:
    watcher = BodyWatcher()
    up.handler = watcher
    async with running_gate(with_limits(up, 'max_body_size = "1M"')) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            await conn.send(raw("POST", "/_matrix/media/v3/upload",
                                [("Transfer-Encoding", "chunked")]))
            reading = asyncio.ensure_future(conn.read_response(timeout=10))
            piece = b"x" * 65536
            sent = 0
            with contextlib.suppress(ConnectionError):
                for _ in range(48):  # 3 MiB at most; stop once the answer came
                    if reading.done():
                        break
                    await conn.send(chunk(piece))
                    sent += len(piece)
                    await asyncio.sleep(0.01)
            resp = await reading
        finally:
            await conn.close()
        assert resp.status == 413, resp
        assert resp.json()["errcode"] == "M_TOO_LARGE"  # type: ignore[index]
        assert resp.header("Access-Control-Allow-Origin") == "*"
        async with asyncio.timeout(2):
            await watcher.aborted.wait()
        assert not watcher.completed.is_set()
        assert watcher.req is not None and len(watcher.req.body) <= 1 * MiB + len(piece)


async def test_stalled_body_times_out_and_aborts_upstream(up: Recorder) -> None:
    watcher = BodyWatcher()
    up.handler = watcher
    async with running_gate(with_limits(up, 'body_timeout = "500ms"')) as gate:
        conn = await Conn.open(port_of(gate))
        loop = asyncio.get_running_loop()
        try:
            await conn.send(raw("PUT", "/_matrix/client/v3/rooms/r/send/m/t",
                                [("Content-Length", "1000")], b"{" * 500))
            t0 = loop.time()
            resp = await conn.read_response(timeout=5)
            elapsed = loop.time() - t0
            if resp.status != 408:
                closed = await conn.closed_by_peer(timeout=1)
        finally:
            await conn.close()
        # 408 (the client must not reuse the connection), or at least a close
        if resp.status == 408:
            assert resp.complete
            assert resp.json()["errcode"] == "M_UNKNOWN"  # type: ignore[index]
            assert resp.header("Connection") == "close"
        else:
            assert resp.status == 0 and closed, resp
        assert 0.4 <= elapsed < 3.0, elapsed
        async with asyncio.timeout(2):
            await watcher.aborted.wait()
        assert not watcher.completed.is_set()


# ---------------------------------------------------------------------------
# Client gone


async def test_client_gone_during_long_poll_closes_upstream(up: Recorder) -> None:
    upstream_closed = asyncio.Event()

    async def hold(req: Req, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        data = await reader.read(1)  # a long-poll: answers only when the gate hangs up
        if not data:
            upstream_closed.set()

    up.handler = hold
    async with running_gate(gate_toml(up_url(up))) as gate:
        port = port_of(gate)
        conn = await Conn.open(port)
        await conn.send(get("/_matrix/client/v3/sync?timeout=30000&since=s1"))
        await up.wait_requests(1)
        await asyncio.sleep(0.1)
        await conn.close()
        async with asyncio.timeout(2):
            await upstream_closed.wait()

        # the aborted connection is not reused for the next request
        up.handler = echo_handler
        conn = await Conn.open(port)
        try:
            resp = await conn.request(get("/_matrix/client/versions"))
        finally:
            await conn.close()
        assert resp.status == 200
        assert up.connections == 2


async def test_client_gone_mid_download_closes_upstream(up: Recorder) -> None:
    writer_saw_close = asyncio.Event()
    total = 100 * MiB

    async def endless(req: Req, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await req.read_body(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        try:
            for block in blocks(total, 65536):
                writer.write(block)
                await writer.drain()
        except ConnectionError:
            writer_saw_close.set()

    up.handler = endless
    async with running_gate(gate_toml(up_url(up))) as gate:
        conn = await Conn.open(port_of(gate))
        await conn.send(get("/_matrix/media/v3/download/hs/movie"))
        status, _ = await read_head(conn)
        assert status == 200
        got = 0
        async with asyncio.timeout(5):
            while got < 256 * 1024:
                data = await conn.reader.read(65536)
                assert data
                got += len(data)
        conn.writer.transport.abort()
        async with asyncio.timeout(2):
            await writer_saw_close.wait()


# ---------------------------------------------------------------------------
# Long-poll


async def test_long_poll_held_by_upstream_completes(up: Recorder) -> None:
    async def sync(req: Req, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        await req.read_body(reader)
        if b"/sync" in req.target:
            await asyncio.sleep(3)
        writer.write(response(200, b'{"next_batch":"s2"}', [("Content-Type", "application/json")]))

    up.handler = sync
    async with running_gate(gate_toml(up_url(up))) as gate:
        port = port_of(gate)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        conn = await Conn.open(port)
        other = await Conn.open(port)
        try:
            await conn.send(get("/_matrix/client/v3/sync?timeout=3000&since=s1"))
            await up.wait_requests(1)
            # another client is served meanwhile
            quick = await other.request(get("/_matrix/client/versions"))
            assert quick.status == 200
            assert loop.time() - t0 < 2.0
            resp = await conn.read_response(timeout=10)
        finally:
            await conn.close()
            await other.close()
        assert resp.status == 200 and resp.complete
        assert resp.json() == {"next_batch": "s2"}
        assert loop.time() - t0 >= 2.9
