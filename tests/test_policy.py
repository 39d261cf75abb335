"""Policy at the edges, over real sockets: what gate-made answers reveal (no
upstream address, parser message or software name), which methods pass,
which request headers never do, when ``100 Continue`` is sent, and client
addresses behind a frontend on a UNIX socket."""

from __future__ import annotations

import asyncio
import logging
import pathlib

import pytest
from support.client import Conn, Resp, fetch, get
from support.gate import gate_toml, port_of, running_gate
from support.net import free_port as _closed_port
from support.recorder import Recorder, Req, recorder
from test_forwarding import assert_matrix_error, raw

from palpo_gate import proxy

RID = "policy-rid-1"


def _assert_reveals_nothing(resp: Resp, *secrets: str) -> None:
    """Neither the body nor any header names the upstream or the software."""
    assert resp.header("Server") is None, resp.headers
    texts = [resp.body.decode("latin-1")] + [v.decode("latin-1") for _, v in resp.headers]
    for text in texts:
        for word in ("aiohttp", "Python", "httptools", "llhttp", *secrets):
            assert word not in text, (word, text)


def _detail_logged(caplog: pytest.LogCaptureFixture, level: int, *words: str) -> None:
    lines = [r.getMessage() for r in caplog.records
             if r.name == "palpo_gate" and r.levelno == level]
    assert any(all(w in line for w in words) for line in lines), lines


# ---------------------------------------------------------------------------
# Item: error bodies and headers reveal no internals


async def test_a_refused_upstream_is_a_generic_502_and_the_detail_is_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "palpo_gate")
    port = _closed_port()
    async with running_gate(gate_toml(f"http://127.0.0.1:{port}")) as gate:
        r = await fetch(port_of(gate), get("/_matrix/client/versions",
                                           extra=f"X-Request-ID: {RID}\r\n"))
    assert_matrix_error(r, 502)
    assert r.json() == {"errcode": "M_UNKNOWN", "error": "upstream unavailable"}
    _assert_reveals_nothing(r, str(port), "127.0.0.1", "refused")
    _detail_logged(caplog, logging.WARNING, "upstream_connect_error", f"127.0.0.1:{port}",
                   f"rid={RID}")


async def test_a_missing_upstream_socket_path_is_not_shown(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "palpo_gate")
    path = str(tmp_path / "palpo-secret.sock")
    async with running_gate(gate_toml(f"unix:{path}")) as gate:
        r = await fetch(port_of(gate), get("/_matrix/x", extra=f"X-Request-ID: {RID}\r\n"))
    assert_matrix_error(r, 502)
    _assert_reveals_nothing(r, "palpo-secret", str(tmp_path))
    _detail_logged(caplog, logging.WARNING, "upstream_connect_error", path, f"rid={RID}")


async def test_an_unparsable_upstream_response_hides_the_parser_message(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "palpo_gate")

    async def garbage(req: Req, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nBad Header Name: x\r\n\r\n")

    async with recorder() as up:
        up.handler = garbage
        async with running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
            r = await fetch(port_of(gate), get("/_matrix/x", extra=f"X-Request-ID: {RID}\r\n"))
    assert_matrix_error(r, 502)
    assert r.json()["error"] == "invalid response from upstream"  # type: ignore[index]
    _assert_reveals_nothing(r, "Invalid", "header")
    _detail_logged(caplog, logging.WARNING, "upstream_broken", "Invalid", f"rid={RID}")


async def test_a_slow_upstream_is_a_generic_504() -> None:
    async def silent(req: Req, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async with recorder() as up:
        up.handler = silent
        url = f"http://127.0.0.1:{up.port}"
        toml = gate_toml(url).replace(f'url = "{url}"', f'url = "{url}"\nread_timeout = "300ms"')
        async with running_gate(toml) as gate:
            r = await fetch(port_of(gate), get("/_matrix/x"))
    assert_matrix_error(r, 504)
    assert r.json()["error"] == "upstream timed out"  # type: ignore[index]
    _assert_reveals_nothing(r)


async def test_a_malformed_request_body_hides_the_parser_message(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "palpo_gate")
    async def hold(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async with recorder() as up:
        up.handler = hold
        async with running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
            conn = await Conn.open(port_of(gate))
            try:
                # The head and a first chunk are forwarded; then a chunk size
                # that is not hex, in the middle of the body being forwarded.
                await conn.send(raw("POST", "/_matrix/x", [
                    ("Transfer-Encoding", "chunked"), ("X-Request-ID", RID)],
                    b"5\r\nhello\r\n"))
                await up.wait_requests(1)
                await conn.send(b"ZZ\r\n")
                r = await conn.read_response()
            finally:
                await conn.close()
    assert_matrix_error(r, 400)
    assert r.json()["error"] == "invalid request body"  # type: ignore[index]
    _assert_reveals_nothing(r, "chunk", "ZZ")
    _detail_logged(caplog, logging.INFO, "bad_request_body", f"rid={RID}")


async def test_gate_made_answers_carry_no_server_header(up: Recorder) -> None:
    async with running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        port = port_of(gate)
        answers = [
            await fetch(port, get("/health")),
            await fetch(port, get("/nowhere")),
            await fetch(port, get("/_matrix/x", method="CONNECT")),
            await fetch(port, get("*", method="OPTIONS")),
            await fetch(port, b"GET /_matrix/\x01 HTTP/1.1\r\nHost: a\r\n\r\n"),
            await fetch(port, get("/_palpo/admin/x")),
        ]
    assert [a.status for a in answers] == [200, 404, 405, 200, 400, 403]
    for a in answers:
        _assert_reveals_nothing(a)


async def test_an_unexpected_failure_is_a_generic_500(
        up: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the gate: aiohttp's own page (its name, a traceback in debug
    mode) is replaced by a gate-made 500, Matrix JSON on Matrix paths."""
    def broken(*args: object) -> None:
        raise RuntimeError("secret state of a bug")

    monkeypatch.setattr(proxy.ListenerHandler, "_host_allowed", broken)
    async with running_gate(gate_toml(f"http://127.0.0.1:{up.port}",
                                      listener='hosts = ["gate.test"]')) as gate:
        r = await fetch(port_of(gate), get("/_matrix/x", extra="Accept: text/html\r\n"))
        r2 = await fetch(port_of(gate), get("/elsewhere"))
    assert_matrix_error(r, 500)
    assert r2.status == 500 and r2.header("Content-Type") == "text/plain; charset=utf-8"
    for resp in (r, r2):
        _assert_reveals_nothing(resp, "secret", "Traceback", "Internal Server Error")


# ---------------------------------------------------------------------------
# Item: client addresses behind a frontend on a UNIX socket


def _unix_toml(up: Recorder, sock: str, trusted: str) -> str:
    return gate_toml(f"http://127.0.0.1:{up.port}", role=None,
                     before=f"[forwarding]\ntrusted_proxies = [{trusted}]",
                     extra=f'[[listeners]]\nname = "front"\nbind = "unix:{sock}"')


FRONTEND_SENT = [("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-Proto", "https"),
                 ("X-Real-IP", "198.51.100.1")]


@pytest.mark.parametrize("trusted", ['"unix:"', '"unix:", "10.0.0.0/8"'])
async def test_a_trusted_frontend_on_a_unix_socket_passes_the_client_on(
        up: Recorder, tmp_path: pathlib.Path, trusted: str) -> None:
    sock = str(tmp_path / "front.sock")
    async with running_gate(_unix_toml(up, sock, trusted)) as gate:
        r = await fetch(0, raw("GET", "/_matrix/a", FRONTEND_SENT), unix=sock)
        assert r.status == 200
        # a TCP peer that is not listed gets no such trust
        r2 = await fetch(port_of(gate), raw("GET", "/_matrix/b", FRONTEND_SENT))
        assert r2.status == 200
    front, direct = up.requests
    assert front.header_all("x-forwarded-for") == [b"198.51.100.1"]  # nothing appended
    assert front.header_all("x-forwarded-proto") == [b"https"]  # the frontend's scheme
    assert front.header_all("x-real-ip") == [b"198.51.100.1"]
    assert direct.header_all("x-forwarded-for") == [b"127.0.0.1"]
    assert direct.header_all("x-forwarded-proto") == [b"http"]
    assert direct.header_all("x-real-ip") == []


async def test_an_untrusted_unix_socket_peer_sends_no_forwarded_for(
        up: Recorder, tmp_path: pathlib.Path) -> None:
    sock = str(tmp_path / "front.sock")
    async with running_gate(_unix_toml(up, sock, '"127.0.0.1/32"')) as gate:
        r = await fetch(0, raw("GET", "/_matrix/a", FRONTEND_SENT), unix=sock)
        r2 = await fetch(0, get("/_matrix/b"), unix=sock)
        assert r.status == r2.status == 200
        assert port_of(gate)
    for req in up.requests:
        # neither the client's made-up address nor nginx's "unix:"
        assert req.header_all("x-forwarded-for") == [], req.head
        assert req.header_all("x-forwarded-proto") == [b"http"]
        assert b"unix:" not in req.head and b"198.51.100.1" not in req.head


# ---------------------------------------------------------------------------
# Item: methods, httpoxy, 100 Continue


async def test_trace_and_webdav_methods_are_refused_not_forwarded(up: Recorder) -> None:
    async with running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        port = port_of(gate)
        trace = await fetch(port, raw("TRACE", "/_matrix/client/versions",
                                      [("Cookie", "session=secret")]))
        propfind = await fetch(port, raw("PROPFIND", "/_matrix/media/v3/download/hs/m",
                                         [("Depth", "1")]))
        patch = await fetch(port, raw("PATCH", "/_matrix/client/x", [("Content-Length", "2")],
                                      b"{}"))
        elsewhere = await fetch(port, raw("TRACE", "/index.html"))
        asterisk = await fetch(port, raw("OPTIONS", "*"))
        allowed = await fetch(port, raw("DELETE", "/_matrix/client/x"))
    for resp in (trace, propfind, patch):
        assert_matrix_error(resp, 405, "M_UNRECOGNIZED")
        assert resp.header("Allow") == "GET, HEAD, POST, PUT, DELETE, OPTIONS"
    assert b"secret" not in trace.body
    assert elsewhere.status == 405 and elsewhere.body.startswith(b"405 ")
    assert elsewhere.header("Allow") == "GET, HEAD, POST, PUT, DELETE, OPTIONS"
    assert (asterisk.status, asterisk.header("Allow")) == (
        200, "GET, HEAD, POST, PUT, DELETE, OPTIONS")
    assert allowed.status == 200
    assert [r.method for r in up.requests] == [b"DELETE"]


async def test_the_httpoxy_proxy_header_is_not_forwarded(up: Recorder) -> None:
    async with running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        r = await fetch(port_of(gate), raw("GET", "/_matrix/x", [
            ("Proxy", "http://evil.example:3128"), ("proxy", "x"), ("Accept", "*/*")]))
    assert r.status == 200
    [req] = up.requests
    assert req.header_all("proxy") == [] and b"evil.example" not in req.head
    assert req.header_all("accept") == [b"*/*"]


async def test_100_continue_only_after_the_host_is_validated(up: Recorder) -> None:
    async with running_gate(gate_toml(f"http://127.0.0.1:{up.port}")) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            await conn.send(raw("PUT", "/_matrix/client/x", [
                ("Content-Length", "5"), ("Expect", "100-continue")], host="a/b@c"))
            # The first head on the wire is the 400: no "100 Continue" before it.
            first = await conn.reader.readuntil(b"\r\n\r\n")
            assert first.startswith(b"HTTP/1.1 400 "), first
        finally:
            await conn.close()
        # A valid Host still gets its 100 Continue and the body forwarded.
        conn = await Conn.open(port_of(gate))
        try:
            await conn.send(raw("PUT", "/_matrix/client/y", [
                ("Content-Length", "5"), ("Expect", "100-continue")]))
            interim = await conn.reader.readuntil(b"\r\n\r\n")
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            await conn.send(b"hello")
            assert (await conn.read_response()).status == 200
        finally:
            await conn.close()
    assert [r.target for r in up.requests] == [b"/_matrix/client/y"]
