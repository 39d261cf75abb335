"""Edge cases found by an adversarial review, over real sockets: a misbehaving
upstream must not desync the client or poison the pool, non-idempotent
requests are never replayed, slow readers are cut, refusals are Matrix JSON."""

from __future__ import annotations

import asyncio
import socket

from support.client import Conn, fetch, get
from support.gate import gate_toml, port_of, running_gate
from support.recorder import Recorder, Req, recorder, response
from test_forwarding import DropOnReuse, assert_matrix_error, raw


def _url(up: Recorder) -> str:
    return f"http://127.0.0.1:{up.port}"


async def test_bytes_after_the_response_neither_change_it_nor_poison_the_pool() -> None:
    async def extra(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if req.target == b"/_matrix/extra":
            # A second, unasked-for response in the same write.
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                         b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\nSMUGGLED")
        else:
            writer.write(response(200, b"clean"))

    async with recorder() as up:
        up.handler = extra
        async with running_gate(gate_toml(_url(up))) as gate:
            conn = await Conn.open(port_of(gate))
            try:
                r = await conn.request(get("/_matrix/extra"))
                assert (r.status, r.header("Content-Length"), r.body) == (200, "2", b"ok")
                # The same client connection stays in step.
                r = await conn.request(get("/_matrix/next"))
                assert (r.status, r.body) == (200, b"clean")
            finally:
                await conn.close()
            # Another client is not handed the out-of-step upstream connection.
            r = await fetch(port_of(gate), get("/_matrix/other"))
            assert (r.status, r.body) == (200, b"clean")
            assert up.connections >= 2


async def test_a_204_with_a_bogus_body_keeps_its_headers() -> None:
    async def bogus(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 204 No Content\r\nETag: \"abc\"\r\n"
                     b"Access-Control-Allow-Origin: *\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"0\r\n\r\n")

    async with recorder() as up:
        up.handler = bogus
        async with running_gate(gate_toml(_url(up))) as gate:
            conn = await Conn.open(port_of(gate))
            try:
                await conn.send(get("/_matrix/x"))
                r = await conn.read_response(head_only=True)
                assert r.status == 204
                assert r.header("ETag") == '"abc"'
                assert r.header("Access-Control-Allow-Origin") == "*"
                assert r.header("Transfer-Encoding") is None
            finally:
                await conn.close()


async def test_trailers_are_not_merged_into_the_head() -> None:
    async def trailer(req: Req, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"2\r\nok\r\n0\r\nSet-Cookie: injected=1\r\n\r\n")

    async with recorder() as up:
        up.handler = trailer
        async with running_gate(gate_toml(_url(up))) as gate:
            r = await fetch(port_of(gate), get("/_matrix/x"))
            assert (r.status, r.body) == (200, b"ok")
            assert r.header("Set-Cookie") is None


async def test_an_upstream_transfer_coding_other_than_chunked_is_a_502() -> None:
    async def gzip_te(req: Req, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nnot really gzip")
        writer.close()

    async with recorder() as up:
        up.handler = gzip_te
        async with running_gate(gate_toml(_url(up))) as gate:
            assert_matrix_error(await fetch(port_of(gate), get("/_matrix/x")), 502)


async def test_a_bodyless_post_is_never_replayed() -> None:
    async with recorder() as up:
        dropper = DropOnReuse()
        up.handler = dropper
        async with running_gate(gate_toml(_url(up))) as gate:
            conn = await Conn.open(port_of(gate))
            try:
                assert (await conn.request(get("/_matrix/first"))).status == 200
                r = await conn.request(raw("POST", "/_matrix/client/v3/createRoom",
                                           [("Content-Length", "0")]))
            finally:
                await conn.close()
            assert_matrix_error(r, 502)
            assert [q.method for q in up.requests].count(b"POST") == 1


async def test_a_client_that_stops_reading_is_cut_and_frees_the_upstream() -> None:
    released = asyncio.Event()

    async def big(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = 64 * 1024 * 1024
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"x" * 65536
        try:
            for _ in range(size // len(chunk)):
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            released.set()
            raise

    async with recorder() as up:
        up.handler = big
        toml = gate_toml(_url(up), extra='[limits]\nbody_timeout = "1s"')
        async with running_gate(toml) as gate:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port_of(gate)))
            sock.setblocking(False)
            try:
                sock.send(get("/_matrix/media/big"))
                # Never read: the gate must give up on this client and close
                # the upstream connection rather than hold it forever.
                async with asyncio.timeout(10):
                    await released.wait()
            finally:
                sock.close()


async def test_oversized_request_line_and_header_are_414_and_431_as_matrix_json() -> None:
    async with recorder() as up:
        async with running_gate(gate_toml(_url(up))) as gate:
            port = port_of(gate)
            r = await fetch(port, get("/_matrix/" + "a" * 9000))
            assert_matrix_error(r, 414)
            assert r.header("Access-Control-Allow-Origin") == "*"
            r = await fetch(port, get("/_matrix/x", extra="X-Big: " + "b" * 9000 + "\r\n"))
            assert_matrix_error(r, 431)
            many = "".join(f"X-H{i}: {i}\r\n" for i in range(200))
            assert_matrix_error(await fetch(port, get("/_matrix/x", extra=many)), 431)
            assert up.requests == []


async def test_invalid_host_is_refused_and_underscore_forwarding_headers_dropped() -> None:
    async with recorder() as up:
        async with running_gate(gate_toml(_url(up))) as gate:
            port = port_of(gate)
            assert_matrix_error(await fetch(port, get("/_matrix/x", host="x/_palpo/admin")), 400)
            assert_matrix_error(await fetch(port, get("/_matrix/x", host="a@b")), 400)
            assert up.requests == []
            r = await fetch(port, get("/_matrix/x", extra="X_Forwarded_For: 6.6.6.6\r\n"
                                                       "X_Real_IP: 6.6.6.6\r\nX_Other: kept\r\n"))
            assert r.status == 200
            req = up.requests[-1]
            assert req.header("X_Forwarded_For") is None and req.header("X_Real_IP") is None
            assert req.header("X_Other") == b"kept"
            assert req.header("X-Forwarded-For") == b"127.0.0.1"


async def test_http_versions_other_than_1_0_and_1_1_are_refused() -> None:
    async with recorder() as up:
        async with running_gate(gate_toml(_url(up))) as gate:
            port = port_of(gate)
            r = await fetch(port, b"GET /_matrix/x HTTP/2.0\r\nHost: h\r\n\r\n")
            assert r.status == 505
            assert up.requests == []
            # An HTTP/1.0 client gets an HTTP/1.1 response that says it closes.
            conn = await Conn.open(port)
            try:
                await conn.send(b"GET /_matrix/x HTTP/1.0\r\nHost: h\r\n\r\n")
                data = await conn.reader.read()
            finally:
                await conn.close()
            assert data.startswith(b"HTTP/1.1 200 ")
