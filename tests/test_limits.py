"""Limits over real sockets (docs/DESIGN.md sections 2 and 5): strict framing, head sizes,
slowloris and idle timeouts, the body-size limit, Host checks, and the requests
the gate answers itself (CONNECT, ``OPTIONS *``, the admin block).

Every request here is written byte for byte on a raw socket to a real gate
running in the test's event loop, in front of a recording upstream; a refused
request must never reach that upstream.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from support.client import Conn, Resp, fetch, get
from support.gate import gate_toml, port_of, running_gate
from support.recorder import Req, recorder, response

CORS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "GET, POST, PUT, DELETE, OPTIONS",
}

# -- strict framing (docs/DESIGN.md section 5, RFC 9112 sections 6.3 and 11.2) -----------------

_POST = (b"POST /_matrix/client/v3/rooms/!r:x/send/m.room.message/t1 HTTP/1.1\r\n"
         b"Host: matrix.test\r\n")
_GET = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: matrix.test\r\n"
#: A second request hidden in the body: a lenient parser would forward it too.
_SMUGGLED = b"GET /_matrix/smuggled HTTP/1.1\r\nHost: matrix.test\r\n\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n\r\n"

FRAMING_CASES: dict[str, bytes] = {
    "cl-then-te": _POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"0\r\n\r\n" + _SMUGGLED,
    "te-then-cl": _POST + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
                  b"0\r\n\r\n" + _SMUGGLED,
    "two-cl-equal": _POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "two-cl-different": _POST + b"Content-Length: 5\r\nContent-Length: 57\r\n\r\nhello"
                        + _SMUGGLED,
    "cl-list": _POST + b"Content-Length: 5, 5\r\n\r\nhello",
    "cl-plus": _POST + b"Content-Length: +5\r\n\r\nhello",
    "cl-negative": _POST + b"Content-Length: -1\r\n\r\n" + _SMUGGLED,
    # aiohttp's parser accepts this one (docs/DESIGN.md section 11): the gate must refuse it.
    "te-gzip-chunked": _POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
                       b"5\r\nhello\r\n0\r\n\r\n",
    "te-identity": _POST + b"Transfer-Encoding: identity\r\n\r\nhello",
    "chunk-size-hex-prefix": _POST + _CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-plus": _POST + _CHUNKED + b"+5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-leading-space": _POST + _CHUNKED + b" 5\r\nhello\r\n0\r\n\r\n",
    "obs-fold": _GET + b"X-Folded: first\r\n  second\r\n\r\n",
    "space-before-colon": _GET + b"X-Name : value\r\n\r\n",
    "nul-in-value": _GET + b"X-Bad: a\x00b\r\n\r\n",
    "ctl-0x01-in-value": _GET + b"X-Bad: a\x01b\r\n\r\n",
    "bare-lf": b"GET /_matrix/client/versions HTTP/1.1\nHost: matrix.test\nX-A: b\n\n",
}


async def _refused(port: int, raw: bytes, statuses: tuple[int, ...] = (400,)) -> Resp:
    """Send *raw* in one write; the answer is one of *statuses* and the connection closes."""
    conn = await Conn.open(port)
    try:
        resp = await conn.request(raw, timeout=5)
        assert resp.status in statuses, (resp.status, resp.body[:300])
        assert await conn.closed_by_peer(timeout=3), "the gate kept the connection open"
        return resp
    finally:
        await conn.close()


@pytest.mark.parametrize("raw", list(FRAMING_CASES.values()), ids=list(FRAMING_CASES))
async def test_ambiguous_framing_is_refused_and_not_forwarded(raw: bytes) -> None:
    async with recorder() as up, running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        await _refused(port_of(gate), raw)
        await asyncio.sleep(0.1)  # anything forwarded would have arrived by now
        assert up.requests == []


async def test_bad_chunk_after_forwarded_head_aborts_upstream() -> None:
    """The head alone is fine and goes upstream; a bad chunk size that follows
    still gets 400 + close, and the upstream never sees a complete body."""
    async with recorder() as up, running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            await conn.send(_POST + _CHUNKED)
            await up.wait_requests(1)
            try:
                resp = await conn.request(b"0x5\r\nhello\r\n0\r\n\r\n", timeout=5)
            except TimeoutError:
                pytest.fail("no answer within 5 s to a bad chunk size sent after the head")
            assert resp.status == 400
            assert await conn.closed_by_peer(timeout=3)
        finally:
            await conn.close()
        await asyncio.sleep(0.2)
        assert not up.requests[0].body_done.is_set()
        assert up.closed_connections == up.connections == 1


async def test_framing_control_well_formed_requests_are_forwarded() -> None:
    """The same requests, well formed, do reach the upstream (the cases above fail
    for their framing, not for their path or method)."""
    async with recorder() as up, running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        port = port_of(gate)
        r1 = await fetch(port, _POST + b"Content-Length: 5\r\n\r\nhello")
        r2 = await fetch(port, _POST + _CHUNKED + b"5\r\nhello\r\n0\r\n\r\n")
        r3 = await fetch(port, _GET + b"X-Name: value\r\n\r\n")
        assert (r1.status, r2.status, r3.status) == (200, 200, 200)
        assert [r.body for r in up.requests] == [b"hello", b"hello", b""]


# -- sizes of the head --------------------------------------------------------------


async def test_request_line_too_long() -> None:
    async with recorder() as up, running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        port = port_of(gate)
        target = "/_matrix/client/v3/" + "a" * 9000
        await _refused(port, get(target, host="matrix.test"), (400, 414))
        # just under aiohttp's 8190-byte line limit is still served
        ok = await fetch(port, get("/_matrix/client/v3/" + "a" * 8000, host="matrix.test"))
        assert ok.status == 200
        assert len(up.requests) == 1


async def test_header_field_too_long() -> None:
    async with recorder() as up, running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        port = port_of(gate)
        raw = get("/_matrix/client/versions", host="matrix.test",
                  extra="X-Big: " + "b" * 9000 + "\r\n")
        await _refused(port, raw, (400, 431))
        assert up.requests == []


async def test_too_many_header_fields() -> None:
    async with recorder() as up, running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        port = port_of(gate)
        many = "".join(f"X-H{i}: {i}\r\n" for i in range(140))
        await _refused(port, get("/_matrix/client/versions", host="matrix.test", extra=many),
                       (400, 431))
        assert up.requests == []
        few = "".join(f"X-H{i}: {i}\r\n" for i in range(60))
        ok = await fetch(port, get("/_matrix/client/versions", host="matrix.test", extra=few))
        assert ok.status == 200
        assert len(up.requests) == 1


# -- the whole head: limits.max_header_size [32K] ------------------------------------------

CAP = 32 * 1024


def head_of(size: int, fields: int, target: str = "/_matrix/client/versions",
            method: str = "GET", extra: bytes = b"") -> bytes:
    """A request head of exactly *size* bytes: request line, Host, *extra*,
    then *fields* header fields of about equal length (X-F000 ...)."""
    start = (f"{method} {target} HTTP/1.1\r\nHost: matrix.test\r\n").encode() + extra
    room = size - len(start) - 2
    out = []
    for i in range(fields):
        name = b"X-F%03d" % i
        length = room // fields if i < fields - 1 else room - (room // fields) * (fields - 1)
        out.append(name + b": " + b"v" * (length - len(name) - 4) + b"\r\n")
    head = start + b"".join(out) + b"\r\n"
    assert len(head) == size
    return head


def _fields(req: Req) -> list[bytes]:
    return [n + b": " + v for n, v in req.headers if re.fullmatch(rb"X-F\d{3}", n)]


async def _head_refused(port: int, raw: bytes) -> None:
    resp = await _refused(port, raw, (431,))
    _assert_matrix_error(resp, "M_UNKNOWN")
    for name, value in CORS.items():
        assert resp.header(name) == value, (name, resp.headers)


# Many small fields (aiohttp allows up to 128), and few large ones (up to 8 KiB each).
SHAPES = {"120 small fields": 120, "4 large fields": 4}


@pytest.mark.parametrize("fields", list(SHAPES.values()), ids=list(SHAPES))
async def test_whole_head_at_the_cap_is_forwarded_one_byte_over_is_431(fields: int) -> None:
    async with recorder() as up, running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        port = port_of(gate)
        at = head_of(CAP, fields)
        resp = await fetch(port, at)
        assert resp.status == 200
        assert len(up.requests) == 1
        assert _fields(up.requests[0]) == at.split(b"\r\n")[2:-2]  # every field, as sent
        await _head_refused(port, head_of(CAP + 1, fields))
        await asyncio.sleep(0.1)
        assert len(up.requests) == 1


async def test_eight_8k_fields_and_one_1k_field_are_431() -> None:
    """Each field is under aiohttp's per-field limit; the head (65 KiB) is not."""
    fields = "".join(f"X-Big{i}: {'b' * 8000}\r\n" for i in range(8)) + f"X-One: {'o' * 1000}\r\n"
    async with recorder() as up, running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        await _head_refused(port_of(gate), get("/_matrix/client/versions", host="matrix.test",
                                               extra=fields))
        await asyncio.sleep(0.1)
        assert up.requests == []


async def test_head_in_pieces_is_measured_across_them() -> None:
    async with recorder() as up, running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        port = port_of(gate)
        for size, status in ((CAP, 200), (CAP + 1, 431)):
            conn = await Conn.open(port)
            try:
                head = head_of(size, 40)
                for i in range(0, len(head), 1000):
                    await conn.send(head[i:i + 1000])
                    await asyncio.sleep(0.002)
                resp = await conn.read_response(timeout=5)
                assert resp.status == status
            finally:
                await conn.close()
        assert len(up.requests) == 1


async def test_head_that_never_ends_is_cut_once_over_the_cap() -> None:
    """No final CRLF: the answer comes once the cap is passed, not at header_timeout."""
    async with recorder() as up, running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            head = head_of(CAP + 8192, 40)[:-2]  # without the empty line that ends it
            started = asyncio.get_running_loop().time()
            await conn.send(head)
            resp = await conn.read_response(timeout=5)
            assert resp.status == 431
            assert asyncio.get_running_loop().time() - started < 3
            assert await conn.closed_by_peer(timeout=3)
        finally:
            await conn.close()
        assert up.requests == []


async def test_each_request_on_a_connection_has_its_own_cap() -> None:
    """Pipelined or one after another, the count starts again for each head."""
    async with recorder() as up, running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        port = port_of(gate)
        conn = await Conn.open(port)
        try:
            for i in range(4):  # 4 x 30 KiB on one keep-alive connection
                resp = await conn.request(head_of(30 * 1024, 6, target=f"/_matrix/k{i}"))
                assert resp.status == 200
            # pipelined in one write: 3 x 20 KiB
            await conn.send(b"".join(head_of(20 * 1024, 4, target=f"/_matrix/p{i}")
                                     for i in range(3)))
            for _ in range(3):
                assert (await conn.read_response()).status == 200
        finally:
            await conn.close()
        assert [r.target for r in up.requests] == (
            [f"/_matrix/k{i}".encode() for i in range(4)]
            + [f"/_matrix/p{i}".encode() for i in range(3)])


async def test_pipelined_head_over_the_cap_ends_the_connection_there() -> None:
    async with recorder() as up, running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            await conn.send(head_of(1024, 1, target="/_matrix/first")
                            + head_of(CAP + 100, 5, target="/_matrix/over")
                            + head_of(1024, 1, target="/_matrix/after"))
            assert (await conn.read_response()).status == 200
            assert (await conn.read_response()).status == 431
            assert await conn.closed_by_peer(timeout=3)
        finally:
            await conn.close()
        await asyncio.sleep(0.1)
        assert [r.target for r in up.requests] == [b"/_matrix/first"]


async def test_a_head_after_a_body_is_measured_alone() -> None:
    """A request body never counts toward the next head."""
    body = b"b" * 200_000
    post = head_of(1024, 1, method="POST", target="/_matrix/media/v3/upload",
                   extra=b"Content-Length: %d\r\n" % len(body)) + body
    async with recorder() as up, running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            await conn.send(post + head_of(CAP, 8, target="/_matrix/next"))
            assert (await conn.read_response()).status == 200
            assert (await conn.read_response()).status == 200
            await conn.send(post + head_of(CAP + 1, 8, target="/_matrix/over"))
            assert (await conn.read_response()).status == 200
            assert (await conn.read_response()).status == 431
        finally:
            await conn.close()
        assert [(r.target, len(r.body)) for r in up.requests] == [
            (b"/_matrix/media/v3/upload", len(body)), (b"/_matrix/next", 0),
            (b"/_matrix/media/v3/upload", len(body))]


async def test_max_header_size_from_the_config() -> None:
    toml = gate_toml("http://127.0.0.1:9", extra='[limits]\nmax_header_size = "4K"')
    async with recorder() as up:
        toml = gate_toml(f"http://127.0.0.1:{up.port}", extra='[limits]\nmax_header_size = "4K"')
        async with running_gate(toml) as gate:
            port = port_of(gate)
            assert (await fetch(port, head_of(4096, 3))).status == 200
            await _head_refused(port, head_of(4097, 3))
            assert len(up.requests) == 1


async def test_nothing_after_an_upgrade_request_is_read() -> None:
    """aiohttp parses what follows "Upgrade: websocket" only after the answer,
    outside the head checks: the gate (which never upgrades) closes instead."""
    async with recorder() as up, running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            await conn.send(head_of(512, 1, extra=b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
                            + head_of(CAP + 100, 5, target="/_matrix/over"))
            assert (await conn.read_response()).status == 200
            assert await conn.closed_by_peer(timeout=3)
        finally:
            await conn.close()
        assert [r.target for r in up.requests] == [b"/_matrix/client/versions"]


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9"])
async def test_other_http_versions_are_505_matrix_json(version: bytes) -> None:
    async with recorder() as up, running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        raw = b"GET /_matrix/client/versions " + version + b"\r\nHost: matrix.test\r\n\r\n"
        resp = await _refused(port_of(gate), raw, (505,))
        _assert_matrix_error(resp, "M_UNKNOWN")
        assert resp.header("access-control-allow-origin") == "*"
        await asyncio.sleep(0.1)
        assert up.requests == []


# -- header_timeout (slowloris) and idle_timeout -----------------------------------------


async def _drip(conn: Conn, data: bytes, interval: float, max_seconds: float) -> tuple[bool, float]:
    """Send *data* one byte at a time; (closed by the gate, seconds from the first byte)."""
    loop = asyncio.get_running_loop()
    watcher = asyncio.ensure_future(conn.closed_by_peer(timeout=max_seconds))
    start = loop.time()
    try:
        for i in range(min(len(data), int(max_seconds / interval))):
            if watcher.done():
                break
            try:
                await conn.send(data[i:i + 1])
            except ConnectionError:
                break
            await asyncio.sleep(interval)
        closed = await watcher
    finally:
        watcher.cancel()
    return closed, loop.time() - start


async def test_slow_head_is_cut_after_header_timeout() -> None:
    async with recorder() as up, running_gate(gate_toml(
            f"http://127.0.0.1:{up.port}", extra='[limits]\nheader_timeout = "1s"')) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            head = get("/_matrix/client/versions", host="matrix.test",
                       extra="X-Padding: " + "p" * 60 + "\r\n")
            closed, elapsed = await _drip(conn, head, 0.2, max_seconds=6)
        finally:
            await conn.close()
        assert closed, "a head dripping one byte every 200 ms was never cut"
        assert 0.8 <= elapsed <= 3.0, elapsed
        assert up.requests == []


async def test_slow_head_on_a_keep_alive_connection_is_cut() -> None:
    """The deadline applies to every request head, not only the first one."""
    async with recorder() as up:
        toml = gate_toml(f"http://127.0.0.1:{up.port}", extra='[limits]\nheader_timeout = "1s"')
        async with running_gate(toml) as gate:
            conn = await Conn.open(port_of(gate))
            try:
                first = await conn.request(get("/_matrix/client/versions", host="matrix.test"))
                assert first.status == 200
                head = get("/_matrix/client/versions", host="matrix.test",
                           extra="X-Padding: " + "p" * 60 + "\r\n")
                closed, elapsed = await _drip(conn, head, 0.2, max_seconds=6)
            finally:
                await conn.close()
            assert closed and 0.8 <= elapsed <= 3.0, (closed, elapsed)
            assert len(up.requests) == 1


async def test_head_in_pieces_within_header_timeout_is_served() -> None:
    """Pieces within the deadline are fine, and a keep-alive connection older than
    the deadline is not cut for its age."""
    async with recorder() as up:
        toml = gate_toml(f"http://127.0.0.1:{up.port}", extra='[limits]\nheader_timeout = "1s"')
        async with running_gate(toml) as gate:
            conn = await Conn.open(port_of(gate))
            try:
                for _ in range(2):
                    head = get("/_matrix/client/versions", host="matrix.test")
                    for piece in (head[:10], head[10:30], head[30:]):
                        await conn.send(piece)
                        await asyncio.sleep(0.2)
                    resp = await conn.read_response(timeout=5)
                    assert resp.status == 200 and resp.complete
                    await asyncio.sleep(0.5)  # the connection is now > 1 s old
            finally:
                await conn.close()
            assert len(up.requests) == 2


async def test_idle_keep_alive_connection_is_closed() -> None:
    async with recorder() as up:
        toml = gate_toml(f"http://127.0.0.1:{up.port}", extra='[limits]\nidle_timeout = "1s"')
        async with running_gate(toml) as gate:
            loop = asyncio.get_running_loop()
            conn = await Conn.open(port_of(gate))
            try:
                resp = await conn.request(get("/_matrix/client/versions", host="matrix.test"))
                assert resp.status == 200 and resp.complete
                assert (resp.header("connection") or "").lower() != "close"
                start = loop.time()
                assert await conn.closed_by_peer(timeout=5), "idle connection never closed"
                elapsed = loop.time() - start
            finally:
                await conn.close()
            # kept alive for a while (keep-alive works), then closed by idle_timeout
            assert 0.7 <= elapsed <= 3.5, elapsed


async def test_held_long_poll_keeps_no_idle_timer_other_requests_keep_theirs() -> None:
    """A Matrix long-poll (``?timeout=``) may be held for its whole timeout:
    while it is held its connection has no idle timer (about 600 bytes, times
    every held sync). A connection of ordinary requests keeps the one timer
    aiohttp armed, so none is made and cancelled per request. After the
    responses, the idle timeout still closes both."""
    release = asyncio.Event()

    async def held(req: Req, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        if b"hold" in req.target:
            await release.wait()
        writer.write(response(200, b"{}"))

    async with recorder() as up:
        up.handler = held
        toml = gate_toml(f"http://127.0.0.1:{up.port}", extra='[limits]\nidle_timeout = "2s"')
        async with running_gate(toml) as gate:
            [(_, server, _)] = gate.servers
            port = port_of(gate)
            sync, other = await Conn.open(port), await Conn.open(port)
            try:
                # A quick request first on each: aiohttp's timer is armed after it.
                for conn in (sync, other):
                    assert (await conn.request(get("/_matrix/client/versions"))).status == 200
                await sync.send(get("/_matrix/client/v3/sync?hold=1&timeout=30000"))
                await other.send(get("/_matrix/client/v3/rooms/hold/messages"))
                await up.wait_requests(4)
                timers = sorted(c.keepalive_handle is not None for c in server.connections)
                assert timers == [False, True], "the long-poll alone drops its idle timer"
                release.set()
                for conn in (sync, other):
                    resp = await conn.read_response(timeout=5)
                    assert resp.status == 200 and resp.complete
                for conn in (sync, other):
                    assert await conn.closed_by_peer(timeout=6), "idle connection never closed"
            finally:
                release.set()
                await sync.close()
                await other.close()


async def test_connection_that_sends_nothing_is_closed() -> None:
    async with recorder() as up:
        toml = gate_toml(f"http://127.0.0.1:{up.port}", extra='[limits]\nidle_timeout = "1s"')
        async with running_gate(toml) as gate:
            conn = await Conn.open(port_of(gate))
            try:
                assert await conn.closed_by_peer(timeout=5), "silent connection never closed"
            finally:
                await conn.close()
            assert up.connections == 0


# -- max_body_size --------------------------------------------------------------------


def _assert_matrix_error(resp: Resp, errcode: str) -> None:
    assert (resp.header("content-type") or "").split(";")[0] == "application/json"
    doc = json.loads(resp.body)
    assert doc["errcode"] == errcode, doc
    assert isinstance(doc.get("error"), str)
    for name, value in CORS.items():
        assert resp.header(name) == value, (name, resp.headers)
    allowed = {h.strip().lower()
               for h in (resp.header("access-control-allow-headers") or "").split(",")}
    assert {"x-requested-with", "content-type", "authorization"} <= allowed, allowed


async def test_declared_body_over_limit_is_413_before_upstream() -> None:
    async with recorder() as up:
        toml = gate_toml(f"http://127.0.0.1:{up.port}",
                         extra="[limits]\nmax_body_size = 1000")
        async with running_gate(toml) as gate:
            port = port_of(gate)
            conn = await Conn.open(port)
            try:
                # Only the head is sent: the answer must not wait for the body.
                resp = await conn.request(
                    b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: matrix.test\r\n"
                    b"Content-Type: image/png\r\nContent-Length: 1001\r\n\r\n", timeout=5)
                assert resp.status == 413
                _assert_matrix_error(resp, "M_TOO_LARGE")
                # The connection is not kept for another request (aiohttp may still
                # read and discard the body for a while, so the client sees the 413).
                assert (resp.header("connection") or "").lower() == "close"
            finally:
                await conn.close()
            # Expect: 100-continue over the limit: 413 and never "100 Continue"
            conn = await Conn.open(port)
            try:
                await conn.send(b"PUT /_matrix/media/v3/upload/x/y HTTP/1.1\r\n"
                                b"Host: matrix.test\r\nExpect: 100-continue\r\n"
                                b"Content-Length: 5000000\r\n\r\n")
                resp = await conn.read_response(timeout=5)
                assert resp.status == 413
            finally:
                await conn.close()
            assert up.connections == 0 and up.requests == []
            # at the limit: forwarded
            ok = await fetch(port, b"POST /_matrix/media/v3/upload HTTP/1.1\r\n"
                                   b"Host: matrix.test\r\nContent-Length: 1000\r\n\r\n"
                             + b"x" * 1000)
            assert ok.status == 200
            assert [len(r.body) for r in up.requests] == [1000]


async def test_refused_heads_and_local_answers_carry_the_clients_request_id() -> None:
    """The request id of a refused head comes from the same pass as the
    refusal: the client's when sane, else a new one; local answers too."""
    sane = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
    limits = "[limits]\nmax_body_size = 1000"
    refused = {
        # (a lone "gzip" is the parser's to refuse; this one is the gate's)
        "coding": ("", _POST + b"Transfer-Encoding: gzip, chunked\r\n", 400),
        "size": ("", _POST + b"Content-Length: 1001\r\n", 413),
        "host": ("", b"GET /_matrix/client/versions HTTP/1.1\r\nHost: a@b\r\n", 400),
        "404": ("", b"GET /nothing HTTP/1.1\r\nHost: matrix.test\r\n", 404),
        "421": ('hosts = ["matrix.test"]',
                b"GET /_matrix/client/versions HTTP/1.1\r\nHost: evil.example\r\n", 421),
    }
    async with recorder() as up:
        for name, (listener, head, status) in refused.items():
            toml = gate_toml(f"http://127.0.0.1:{up.port}", listener=listener, extra=limits)
            async with running_gate(toml) as gate:
                port = port_of(gate)
                for sent, kept in ((b"X-Request-ID: rid-7.a\r\n", True),
                                   (b"x-request-id: a b\r\n", False), (b"", False)):
                    conn = await Conn.open(port)
                    try:
                        resp = await conn.request(head + sent + b"\r\n", timeout=5)
                    finally:
                        await conn.close()
                    assert resp.status == status, (name, sent, resp.status)
                    rid = resp.header_all("X-Request-ID")
                    assert len(rid) == 1 and sane.fullmatch(rid[0]), (name, sent, rid)
                    assert (rid[0] == "rid-7.a") is kept, (name, sent, rid)
        assert up.connections == 0 and up.requests == []


# -- hosts ------------------------------------------------------------------------------


async def test_host_not_in_hosts_is_421_and_not_forwarded() -> None:
    async with recorder() as up:
        toml = gate_toml(f"http://127.0.0.1:{up.port}", listener='hosts = ["matrix.test"]')
        async with running_gate(toml) as gate:
            port = port_of(gate)
            for host in ("evil.example", "matrix.test.evil.example", "127.0.0.1"):
                resp = await fetch(port, get("/_matrix/client/versions", host=host))
                assert resp.status == 421, (host, resp.status)
            assert up.requests == []


async def test_host_in_hosts_with_port_and_any_case_is_forwarded() -> None:
    async with recorder() as up:
        toml = gate_toml(f"http://127.0.0.1:{up.port}", listener='hosts = ["matrix.test"]')
        async with running_gate(toml) as gate:
            port = port_of(gate)
            for host in ("matrix.test", "matrix.test:8448", "MATRIX.Test", "Matrix.TEST:443"):
                resp = await fetch(port, get("/_matrix/client/versions", host=host))
                assert resp.status == 200, (host, resp.status)
            assert len(up.requests) == 4
            assert up.requests[1].header("host") == b"matrix.test:8448"


async def test_health_answers_whatever_the_host() -> None:
    async with recorder() as up:
        toml = gate_toml(f"http://127.0.0.1:{up.port}", listener='hosts = ["matrix.test"]')
        async with running_gate(toml) as gate:
            resp = await fetch(port_of(gate), get("/health", host="127.0.0.1:9"))
            assert resp.status == 200
            assert resp.body.strip() == b"OK"
            assert up.requests == []


# -- requests the gate answers itself ---------------------------------------------


async def test_connect_is_405() -> None:
    async with recorder() as up, running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        resp = await fetch(port_of(gate), b"CONNECT matrix.test:443 HTTP/1.1\r\n"
                                          b"Host: matrix.test:443\r\n\r\n")
        assert resp.status == 405
        await asyncio.sleep(0.1)
        assert up.requests == []


async def test_options_asterisk_is_answered() -> None:
    async with recorder() as up, running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        port = port_of(gate)
        conn = await Conn.open(port)
        try:
            resp = await conn.request(b"OPTIONS * HTTP/1.1\r\nHost: matrix.test\r\n\r\n")
            assert 200 <= resp.status < 300, resp.status
            # the connection stays usable
            again = await conn.request(get("/_matrix/client/versions", host="matrix.test"))
            assert again.status == 200
        finally:
            await conn.close()
        # other methods with the asterisk form are refused
        bad = await fetch(port, b"GET * HTTP/1.1\r\nHost: matrix.test\r\n\r\n")
        assert bad.status == 400
        assert [r.target for r in up.requests] == [b"/_matrix/client/versions"]


@pytest.mark.parametrize("target", [
    "/_palpo/admin/users", "/_synapse/admin/v1/users/@a:x", "/_SYNAPSE/Admin/v2/users",
    "/_synapse/admin",
])
async def test_admin_api_is_403_matrix_forbidden(target: str) -> None:
    async with recorder() as up, running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        resp = await fetch(port_of(gate), get(target, host="matrix.test",
                                              extra="Authorization: Bearer admin\r\n"))
        assert resp.status == 403
        _assert_matrix_error(resp, "M_FORBIDDEN")
        assert up.requests == []
