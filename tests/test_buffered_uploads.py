"""``forwarding.buffer_chunked_uploads``: chunked media uploads sent on with a
Content-Length (docs/DESIGN.md section 3).

The endpoint rule is a table (pure, no sockets). The rest runs a real gate in
the test's event loop in front of the recording upstream, which keeps the exact
bytes it receives; the client is a raw socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib

import pytest
from support.client import Conn, chunk, raw
from support.gate import gate_toml, port_of, running_gate
from support.recorder import Recorder, Req, count_handler, response

from palpo_gate import spool
from palpo_gate.routing import media_upload

MiB = 1024 * 1024

# -- the endpoint rule -------------------------------------------------------------------

MEDIA_UPLOAD_TABLE = [
    # (method, raw target, buffered?)
    ("POST", "/_matrix/media/v3/upload", True),
    ("POST", "/_matrix/media/v3/upload?filename=a%20b.png", True),
    ("POST", "/_matrix/media/r0/upload", True),
    ("POST", "/_matrix/media/v1/upload", True),
    ("POST", "/_matrix/media/unstable/upload", True),
    ("POST", "/_matrix/media/v3//upload", True),  # decided on the normalised path
    ("POST", "/_matrix/media/v3/%75pload", True),
    ("PUT", "/_matrix/media/v3/upload/hs.test/AbCdEf", True),
    ("PUT", "/_matrix/media/v3/upload/hs.test/AbCdEf?filename=x", True),
    ("PUT", "/_matrix/media/r0/upload/example.org:8448/m1", True),
    ("PUT", "/_matrix/media/unstable/fi.mau.msc2246/upload/hs.test/m1", True),
    # not an upload endpoint, or not with that method
    ("PUT", "/_matrix/media/v3/upload", False),
    ("POST", "/_matrix/media/v3/upload/hs.test/AbCdEf", False),
    ("GET", "/_matrix/media/v3/upload", False),
    ("POST", "/_matrix/media/v1/create", False),  # creates an MXC URI; no body
    ("PUT", "/_matrix/media/v3/upload/hs.test", False),
    ("PUT", "/_matrix/media/v3/upload/hs.test/m1/extra", False),
    ("POST", "/_matrix/media/v3/upload/", False),
    ("POST", "/_matrix/media/v3/uploads", False),
    ("POST", "/_matrix/media/upload", False),
    ("POST", "/_matrix/media/v3/UPLOAD", False),
    ("POST", "/_matrix/client/v1/media/upload", False),  # authenticated media: no uploads
    ("POST", "/_matrix/client/v3/rooms/!r:hs/send/m.room.message/t1", False),
    ("PUT", "/_matrix/client/v3/rooms/!r:hs/send/m.room.message/t1", False),
    ("POST", "/_palpo/client/media/v3/upload", False),
    ("POST", "/_matrixx/media/v3/upload", False),
    ("POST", "/x/_matrix/media/v3/upload", False),
    ("POST", "/_matrix/media/v3/upload/%2e%2e", False),  # refused by routing anyway
]


@pytest.mark.parametrize(("method", "target", "expected"), MEDIA_UPLOAD_TABLE,
                         ids=[f"{m} {t}" for m, t, _ in MEDIA_UPLOAD_TABLE])
def test_media_upload_table(method: str, target: str, expected: bool) -> None:
    assert media_upload(method, target) is expected


def test_with_length_adds_the_last_field() -> None:
    head = b"POST /x HTTP/1.1\r\nHost: h\r\n\r\n"
    assert spool.with_length(head, 12) == (
        b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\n\r\n")


# -- over sockets --------------------------------------------------------------------------


CHUNKED = [("Transfer-Encoding", "chunked"), ("Content-Type", "application/octet-stream")]


def config(up: Recorder, buffer: bool = True, limits: str = "") -> str:
    extra = f"[forwarding]\nbuffer_chunked_uploads = {'true' if buffer else 'false'}\n"
    if limits:
        extra += f"[limits]\n{limits}\n"
    return gate_toml(f"http://127.0.0.1:{up.port}", extra=extra)


def body_of(size: int) -> bytes:
    """*size* bytes that differ at every offset that matters (no repeating block)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d" % counter).digest()
        counter += 1
    return bytes(out[:size])


async def send_chunked(conn: Conn, method: str, target: str, body: bytes,
                       piece: int = 4096, headers: list[tuple[str, str]] | None = None) -> None:
    """The head, then *body* in *piece*-byte chunks (matrix-nio sends 4 KiB ones)."""
    await conn.send(raw(method, target, CHUNKED + (headers or [])))
    for i in range(0, len(body), piece):
        conn.writer.write(chunk(body[i:i + piece]))
        await conn.writer.drain()
    await conn.send(b"0\r\n\r\n")


BUFFERED = [
    ("POST", "/_matrix/media/v3/upload?filename=a.bin"),
    ("POST", "/_matrix/media/r0/upload"),
    ("PUT", "/_matrix/media/v3/upload/hs.test/AbCdEf"),
    ("PUT", "/_matrix/media/unstable/fi.mau.msc2246/upload/hs.test/AbCdEf"),
]


@pytest.mark.parametrize(("method", "target"), BUFFERED, ids=[f"{m} {t}" for m, t in BUFFERED])
@pytest.mark.parametrize("size", [0, 1000, spool.MEMORY_BOUND + 12345],
                         ids=["empty", "in-memory", "temp-file"])
async def test_chunked_upload_arrives_with_content_length(up: Recorder, method: str,
                                                          target: str, size: int) -> None:
    body = body_of(size)
    async with running_gate(config(up)) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            await send_chunked(conn, method, target, body)
            resp = await conn.read_response()
            assert resp.status == 200, resp
            # the connection is still good for the next request (keep-alive)
            again = await conn.request(raw("GET", "/_matrix/client/versions"))
            assert again.status == 200
        finally:
            await conn.close()
    req = up.requests[0]
    assert req.request_line == f"{method} {target} HTTP/1.1".encode()
    assert req.header_all("content-length") == [str(size).encode()]
    assert req.header_all("transfer-encoding") == []
    assert req.raw_body == body  # exact bytes, no chunk framing
    assert resp.json()["len"] == size  # type: ignore[index]
    assert len(up.requests) == 2 and up.connections == 1  # upstream connection reused


STREAMED = [
    ("POST", "/_matrix/client/v3/rooms/!r:hs/send/m.room.message/t1"),
    ("PUT", "/_matrix/client/v3/rooms/!r:hs/state/m.room.topic/"),
    ("POST", "/_matrix/client/v1/media/upload"),
    ("PUT", "/_matrix/media/v3/upload"),
    ("POST", "/_matrix/media/v1/create"),
]


@pytest.mark.parametrize(("method", "target"), STREAMED, ids=[f"{m} {t}" for m, t in STREAMED])
async def test_other_endpoints_keep_streaming_chunked(up: Recorder, method: str,
                                                      target: str) -> None:
    await _assert_streamed(up, config(up), method, target)


async def test_option_off_media_upload_keeps_streaming_chunked(up: Recorder) -> None:
    await _assert_streamed(up, config(up, buffer=False), "POST", "/_matrix/media/v3/upload")


async def _assert_streamed(up: Recorder, toml: str, method: str, target: str) -> None:
    first, rest = b"a" * 5000, b"b" * 7000
    async with running_gate(toml) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            await conn.send(raw(method, target, CHUNKED, chunk(first)))
            await up.wait_requests(1)
            req = up.requests[0]
            async with asyncio.timeout(5):
                await req.first_body_byte.wait()
            # the upstream has the head and the first bytes before the body ended
            assert not req.body_done.is_set()
            await conn.send(chunk(rest) + b"0\r\n\r\n")
            resp = await conn.read_response()
        finally:
            await conn.close()
    assert resp.status == 200, resp
    assert req.header_all("transfer-encoding") == [b"chunked"]
    assert req.header_all("content-length") == []
    assert req.body == first + rest


async def test_content_length_upload_is_not_held(up: Recorder) -> None:
    """A media upload with a Content-Length streams as before with the option on."""
    first, rest = b"a" * 20000, b"b" * 20000
    async with running_gate(config(up)) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            await conn.send(raw("POST", "/_matrix/media/v3/upload",
                                [("Content-Length", "40000")], first))
            await up.wait_requests(1)
            async with asyncio.timeout(5):
                await up.requests[0].first_body_byte.wait()
            await conn.send(rest)
            resp = await conn.read_response()
        finally:
            await conn.close()
    assert resp.status == 200
    assert up.requests[0].header_all("content-length") == [b"40000"]
    assert up.requests[0].body == first + rest


async def test_nothing_reaches_the_upstream_before_the_body_is_whole(up: Recorder) -> None:
    async with running_gate(config(up)) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            await conn.send(raw("POST", "/_matrix/media/v3/upload", CHUNKED,
                                chunk(b"x" * 5000)))
            await asyncio.sleep(0.5)
            assert up.connections == 0 and up.requests == []
            resp = await conn.request(chunk(b"y" * 5000) + b"0\r\n\r\n")
        finally:
            await conn.close()
    assert resp.status == 200
    assert up.requests[0].body == b"x" * 5000 + b"y" * 5000


async def test_over_max_body_size_is_413_and_nothing_forwarded(up: Recorder) -> None:
    async with running_gate(config(up, limits='max_body_size = "1M"')) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            await conn.send(raw("POST", "/_matrix/media/v3/upload", CHUNKED))
            reading = asyncio.ensure_future(conn.read_response(timeout=10))
            piece = b"x" * 65536
            with contextlib.suppress(ConnectionError):
                for _ in range(48):  # 3 MiB at most; stop once the answer came
                    if reading.done():
                        break
                    await conn.send(chunk(piece))
                    await asyncio.sleep(0.01)
            resp = await reading
        finally:
            await conn.close()
    assert resp.status == 413, resp
    assert resp.json()["errcode"] == "M_TOO_LARGE"  # type: ignore[index]
    assert resp.header("Access-Control-Allow-Origin") == "*"
    assert resp.header("Connection") == "close"
    assert up.connections == 0 and up.requests == []


async def test_exactly_max_body_size_is_forwarded(up: Recorder) -> None:
    body = body_of(100_000)
    async with running_gate(config(up, limits="max_body_size = 100000")) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            await send_chunked(conn, "POST", "/_matrix/media/v3/upload", body, piece=30000)
            resp = await conn.read_response()
        finally:
            await conn.close()
    assert resp.status == 200, resp
    assert up.requests[0].header_all("content-length") == [b"100000"]
    assert up.requests[0].raw_body == body


async def test_expect_100_continue_then_buffered(up: Recorder) -> None:
    body = body_of(50_000)
    async with running_gate(config(up)) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            await conn.send(raw("POST", "/_matrix/media/v3/upload",
                                [*CHUNKED, ("Expect", "100-continue")]))
            async with asyncio.timeout(5):
                interim = await conn.reader.readuntil(b"\r\n\r\n")
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            resp = await conn.request(chunk(body) + b"0\r\n\r\n")
        finally:
            await conn.close()
    assert resp.status == 200, resp
    req = up.requests[0]
    assert req.header_all("content-length") == [b"50000"]
    assert req.header_all("expect") == []  # hop-by-hop to the gate: it answered it
    assert req.raw_body == body


async def test_stalled_body_while_collecting_is_408(up: Recorder) -> None:
    async with running_gate(config(up, limits='body_timeout = "500ms"')) as gate:
        conn = await Conn.open(port_of(gate))
        loop = asyncio.get_running_loop()
        try:
            await conn.send(raw("POST", "/_matrix/media/v3/upload", CHUNKED,
                                chunk(b"x" * 1000)))
            t0 = loop.time()
            resp = await conn.read_response(timeout=5)
            elapsed = loop.time() - t0
        finally:
            await conn.close()
    assert resp.status == 408, resp
    assert resp.json()["errcode"] == "M_UNKNOWN"  # type: ignore[index]
    assert resp.header("Connection") == "close"
    assert 0.4 <= elapsed < 3.0, elapsed
    assert up.connections == 0


async def test_bad_chunk_while_collecting_is_400(up: Recorder) -> None:
    async with running_gate(config(up)) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            await conn.send(raw("POST", "/_matrix/media/v3/upload", CHUNKED,
                                chunk(b"hello")))
            resp = await conn.request(b"0x5\r\nhello\r\n0\r\n\r\n", timeout=5)
            assert resp.status == 400, resp
            assert await conn.closed_by_peer(timeout=3)
        finally:
            await conn.close()
    assert up.connections == 0


async def test_upstream_answer_to_a_buffered_upload_reaches_the_client(up: Recorder) -> None:
    """Synapse-like refusal of the upload itself: the gate passes it on unchanged."""
    async def refuse(req: Req, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await req.read_body(reader)
        writer.write(response(403, b'{"errcode":"M_FORBIDDEN"}',
                              [("Content-Type", "application/json")]))

    up.handler = refuse
    async with running_gate(config(up)) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            await send_chunked(conn, "POST", "/_matrix/media/v3/upload", b"z" * 9000)
            resp = await conn.read_response()
        finally:
            await conn.close()
    assert resp.status == 403
    assert resp.body == b'{"errcode":"M_FORBIDDEN"}'
    assert up.requests[0].header_all("content-length") == [b"9000"]


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def test_50mib_upload_is_collected_with_flat_memory(up: Recorder) -> None:
    """The gate runs in this process: its memory is this process's RSS. The
    client sends one reused block and the upstream only counts bytes."""
    size = 50 * MiB
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_bytes())
            await asyncio.sleep(0.01)

    up.handler = count_handler
    block = chunk(bytes(range(256)) * 256)  # 64 KiB of data per chunk
    async with running_gate(config(up, limits='max_body_size = "50M"')) as gate:
        conn = await Conn.open(port_of(gate))
        baseline = peak = rss_bytes()
        sampler = asyncio.get_running_loop().create_task(sample())
        try:
            await conn.send(raw("PUT", "/_matrix/media/v3/upload/hs.test/big", CHUNKED))
            async with asyncio.timeout(60):
                for _ in range(size // 65536):
                    conn.writer.write(block)
                    await conn.writer.drain()
                await conn.send(b"0\r\n\r\n")
            resp = await conn.read_response(timeout=60)
        finally:
            sampler.cancel()
            await conn.close()
    assert resp.status == 200, resp
    assert resp.body == b"%d" % size
    assert up.requests[0].header_all("content-length") == [str(size).encode()]
    growth = peak - baseline
    print(f"\n[buffered 50 MiB] RSS growth {growth / MiB:.1f} MiB")
    assert growth < 10 * MiB, f"RSS grew by {growth / MiB:.1f} MiB"


async def test_buffered_upload_with_the_access_log_on(up: Recorder) -> None:
    """The access line of a buffered upload is written from the replayed request."""
    toml = f"""
[upstream]
url = "http://127.0.0.1:{up.port}"
[log]
access = "json"
[forwarding]
buffer_chunked_uploads = true
[[listeners]]
name = "main"
bind = "127.0.0.1:0"
role = "client"
"""
    async with running_gate(toml) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            await send_chunked(conn, "POST", "/_matrix/media/v3/upload", b"q" * 10000)
            resp = await conn.read_response()
        finally:
            await conn.close()
    assert resp.status == 200, resp
    assert up.requests[0].header_all("content-length") == [b"10000"]
