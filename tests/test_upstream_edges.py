"""The upstream leg under slow clients and hostile upstreams, over real sockets.

- an upload slower than ``upstream.read_timeout`` is not cut: the response
  deadline starts once the body is sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

from conftest import port_of, running_gate
from support.client import Conn
from support.recorder import Recorder, Req, recorder, response
from test_forwarding import assert_matrix_error

KiB = 1024
MiB = 1024 * KiB


def _toml(up: Recorder, *, port: int = 0, upstream: str = "", limits: str = "") -> str:
    return f"""
[upstream]
url = "http://127.0.0.1:{up.port}"
{upstream}
[log]
access = "off"
[limits]
{limits}
[[listeners]]
name = "main"
bind = "127.0.0.1:{port}"
role = "client"
"""



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
