"""Forwarding over real sockets (docs/DESIGN.md sections 2, 3 and 5).

A real gate runs in the test's event loop on loopback, in front of the
recording upstream of ``support/recorder.py``; requests are written byte for
byte with the raw client of ``support/client.py``. Nothing is mocked: what is
asserted here is what the upstream and the user's client see on the wire.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import ssl

import pytest
import targets
from support.client import Conn, Resp, fetch, get, raw
from support.gate import gate_toml, port_of, running_gate
from support.net import free_port as closed_port
from support.recorder import Recorder, Req, echo_handler, recorder, response, up_url

FORWARD = [t for t, action, _ in targets.TARGETS if action == targets.F]
LOCAL = [(t, action) for t, action, _ in targets.TARGETS if action != targets.F]
ADMIN = [t for t, action, _ in targets.TARGETS if action == targets.ADMIN]
LOCAL_STATUS = {targets.ADMIN: 403, targets.BAD: 400, targets.NF: 404, targets.HEALTH: 200}

SANE_RID = re.compile(rb"^[A-Za-z0-9._:/+=@-]{1,128}$")


def assert_matrix_error(resp: Resp, status: int, errcode: str = "M_UNKNOWN") -> None:
    assert resp.status == status, resp
    assert resp.header("Content-Type") == "application/json"
    doc = resp.json()
    assert isinstance(doc, dict)
    assert doc["errcode"] == errcode
    assert isinstance(doc.get("error"), str) and doc["error"]
    assert resp.header("Access-Control-Allow-Origin") == "*"


# ---------------------------------------------------------------------------
# Byte-exactness and routing decisions on the wire


async def test_every_forward_target_reaches_upstream_byte_for_byte(up: Recorder) -> None:
    async with running_gate(gate_toml(up_url(up))) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            for i, target in enumerate(FORWARD):
                resp = await conn.request(get(target))
                assert resp.status == 200, (target, resp)
                assert len(up.requests) == i + 1, target
                assert up.requests[-1].request_line == b"GET " + target.encode() + b" HTTP/1.1"
                # the echo handler reports the target it parsed, too
                assert resp.json()["target"] == target  # type: ignore[index]
        finally:
            await conn.close()


async def test_every_forward_target_with_a_post_body(up: Recorder) -> None:
    async with running_gate(gate_toml(up_url(up))) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            for i, target in enumerate(FORWARD):
                body = b'{"msgtype":"m.text","body":"%d \xc3\xbc"}' % i
                resp = await conn.request(raw("POST", target, [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body)))], body))
                assert resp.status == 200, (target, resp)
                req = up.requests[-1]
                assert len(up.requests) == i + 1
                assert req.request_line == b"POST " + target.encode() + b" HTTP/1.1"
                assert req.body == body
                assert req.raw_body == body  # not re-framed
                assert req.header_all("content-length") == [str(len(body)).encode()]
                assert req.header("transfer-encoding") is None
        finally:
            await conn.close()


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_local_answers_never_reach_upstream(up: Recorder, method: str) -> None:
    async with running_gate(gate_toml(up_url(up))) as gate:
        port = port_of(gate)
        for target, action in LOCAL:
            headers = [("Content-Length", "2")] if method == "POST" else []
            resp = await fetch(port, raw(method, target, headers, b"{}" if headers else b""))
            expected = LOCAL_STATUS[action]
            if action == targets.HEALTH and method == "POST":
                expected = 405
            assert resp.status == expected, (method, target, resp)
            if action == targets.HEALTH and method == "GET":
                assert resp.body.strip() == b"OK"
            if action == targets.ADMIN:
                assert_matrix_error(resp, 403, "M_FORBIDDEN")
        await asyncio.sleep(0.05)
        assert up.requests == []
        assert up.connections == 0


async def test_absolute_form_and_parser_rejected_targets_are_400(up: Recorder) -> None:
    async with running_gate(gate_toml(up_url(up))) as gate:
        port = port_of(gate)
        for target in targets.ABSOLUTE_FORM + targets.PARSER_REJECTED:
            resp = await fetch(port, get(target))
            assert resp.status == 400, (target, resp)
        await asyncio.sleep(0.05)
        assert up.requests == []


async def test_admin_targets_forwarded_raw_from_allowed_addresses(up: Recorder) -> None:
    extra = '[admin]\nallow_from = ["127.0.0.0/8"]\n'
    async with running_gate(gate_toml(up_url(up), extra=extra)) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            for i, target in enumerate(ADMIN):
                resp = await conn.request(get(target))
                assert resp.status == 200, (target, resp)
                assert len(up.requests) == i + 1
                assert up.requests[-1].request_line == b"GET " + target.encode() + b" HTTP/1.1"
        finally:
            await conn.close()


async def test_admin_allow_from_elsewhere_still_403(up: Recorder) -> None:
    extra = '[admin]\nallow_from = ["10.0.0.0/8"]\n'
    async with running_gate(gate_toml(up_url(up), extra=extra)) as gate:
        resp = await fetch(port_of(gate), get("/_palpo/admin/users"))
        assert_matrix_error(resp, 403, "M_FORBIDDEN")
        assert up.requests == []


# ---------------------------------------------------------------------------
# Header rules


SPOOFED = [
    ("X-Forwarded-For", "203.0.113.7"),
    ("X-Forwarded-Proto", "https"),
    ("X-Real-IP", "203.0.113.8"),
    ("Forwarded", "for=203.0.113.9;proto=https"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Port", "443"),
]


async def test_forwarding_headers_from_an_untrusted_client(up: Recorder) -> None:
    async with running_gate(gate_toml(up_url(up))) as gate:
        resp = await fetch(port_of(gate), raw("GET", "/_matrix/client/versions", SPOOFED))
        assert resp.status == 200
        req = up.requests[0]
        assert req.header_all("x-forwarded-for") == [b"127.0.0.1"]
        assert req.header_all("x-forwarded-proto") == [b"http"]
        for name in ("x-real-ip", "forwarded", "x-forwarded-host", "x-forwarded-port"):
            assert req.header_all(name) == [], name
        assert b"203.0.113" not in req.head
        assert b"evil.example" not in req.head


async def test_forwarding_headers_from_a_trusted_proxy(up: Recorder) -> None:
    extra = '[forwarding]\ntrusted_proxies = ["127.0.0.1/32"]\n'
    async with running_gate(gate_toml(up_url(up), extra=extra)) as gate:
        resp = await fetch(port_of(gate), raw("GET", "/_matrix/client/versions", SPOOFED))
        assert resp.status == 200
        req = up.requests[0]
        xff = b", ".join(req.header_all("x-forwarded-for"))
        assert [p.strip() for p in xff.split(b",")] == [b"203.0.113.7", b"127.0.0.1"]
        assert req.header_all("forwarded") == [b"for=203.0.113.9;proto=https"]
        assert req.header_all("x-real-ip") == [b"203.0.113.8"]
        # a trusted proxy (a TLS-terminating frontend) says what the client used
        assert req.header_all("x-forwarded-proto") == [b"https"]


async def test_forwarded_proto_is_https_on_a_tls_listener(
        up: Recorder, tls_files: dict[str, str]) -> None:
    listener = (f'[listeners.tls]\ncert = "{tls_files["default_cert"]}"\n'
                f'key = "{tls_files["default_key"]}"\n')
    ctx = ssl.create_default_context(cafile=tls_files["ca"])
    async with running_gate(gate_toml(up_url(up), listener=listener)) as gate:
        port = port_of(gate)
        conn = await Conn.open(port, ssl=ctx, server_hostname="localhost")
        try:
            resp = await conn.request(raw("GET", "/_matrix/client/versions",
                                          [("X-Forwarded-Proto", "http")], host="localhost"))
        finally:
            await conn.close()
        assert resp.status == 200
        req = up.requests[0]
        assert req.header_all("x-forwarded-proto") == [b"https"]
        assert req.header_all("host") == [f"localhost:{port}".encode()]


async def test_host_gets_the_listener_port_only_when_it_has_none(up: Recorder) -> None:
    async with running_gate(gate_toml(up_url(up))) as gate:
        port = port_of(gate)
        conn = await Conn.open(port)
        try:
            for sent, expected in (("matrix.example.com", f"matrix.example.com:{port}"),
                                   ("matrix.example.com:8448", "matrix.example.com:8448"),
                                   ("Matrix.Example.COM", f"Matrix.Example.COM:{port}"),
                                   ("[::1]", f"[::1]:{port}"),
                                   ("[::1]:443", "[::1]:443")):
                resp = await conn.request(raw("GET", "/_matrix/x", host=sent))
                assert resp.status == 200, sent
                assert up.requests[-1].header_all("host") == [expected.encode()], sent
        finally:
            await conn.close()


async def test_request_id_generated_kept_or_replaced(up: Recorder) -> None:
    async with running_gate(gate_toml(up_url(up))) as gate:
        port = port_of(gate)
        seen: list[bytes] = []
        for _ in range(2):  # absent: generated, a new one each time
            resp = await fetch(port, get("/_matrix/x"))
            sent = up.requests[-1].header_all("x-request-id")
            assert len(sent) == 1 and SANE_RID.match(sent[0]), sent
            assert resp.header_all("X-Request-ID") == [sent[0].decode()]
            seen.append(sent[0])
        assert seen[0] != seen[1]

        resp = await fetch(port, raw("GET", "/_matrix/x", [("X-Request-ID", "req-42.abc")]))
        assert up.requests[-1].header_all("x-request-id") == [b"req-42.abc"]
        assert resp.header_all("X-Request-ID") == ["req-42.abc"]

        for insane in ("bad id <script>", "x" * 300, 'a"quoted"', "é"):
            resp = await fetch(port, raw("GET", "/_matrix/x", [("X-Request-ID", insane)]))
            assert resp.status == 200, insane
            sent = up.requests[-1].header_all("x-request-id")
            assert len(sent) == 1 and sent[0] != insane.encode("latin-1")
            assert SANE_RID.match(sent[0])
            assert resp.header_all("X-Request-ID") == [sent[0].decode()]


async def test_custom_request_id_header_both_directions(up: Recorder) -> None:
    extra = '[forwarding]\nrequest_id_header = "X-Correlation-ID"\n'
    async with running_gate(gate_toml(up_url(up), extra=extra)) as gate:
        port = port_of(gate)
        resp = await fetch(port, raw("GET", "/_matrix/x", [("X-Correlation-ID", "corr-7")]))
        assert up.requests[-1].header_all("x-correlation-id") == [b"corr-7"]
        assert resp.header_all("X-Correlation-ID") == ["corr-7"]

        resp = await fetch(port, get("/_matrix/x"))
        sent = up.requests[-1].header_all("x-correlation-id")
        assert len(sent) == 1 and SANE_RID.match(sent[0])
        assert resp.header_all("X-Correlation-ID") == [sent[0].decode()]


async def test_hop_by_hop_request_headers_removed(up: Recorder) -> None:
    async with running_gate(gate_toml(up_url(up))) as gate:
        resp = await fetch(port_of(gate), raw("GET", "/_matrix/x", [
            ("Connection", "keep-alive, X-Secret"),
            ("X-Secret", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "X-Foo"),
            ("Upgrade", "websocket"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("Authorization", "Bearer syt_token"),
        ]))
        assert resp.status == 200
        req = up.requests[0]
        names = {n.lower() for n, _ in req.headers}
        for hop in (b"x-secret", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                    b"upgrade", b"proxy-authorization", b"transfer-encoding"):
            assert hop not in names, hop
        for value in req.header_all("connection"):
            assert b"x-secret" not in value.lower()
        assert req.header_all("authorization") == [b"Bearer syt_token"]


async def test_hop_by_hop_response_headers_removed(up: Recorder) -> None:
    async def handler(req: Req, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await req.read_body(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\n"
            b"Connection: X-Secret\r\n"
            b"X-Secret: 1\r\n"
            b"Keep-Alive: timeout=5, max=100\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"Proxy-Authenticate: Basic realm=\"x\"\r\n"
            b"Trailer: X-Foo\r\n"
            b"Upgrade: h2c\r\n"
            b"Transfer-Encoding: chunked\r\n"
            b"Set-Cookie: a=1; Path=/\r\n"
            b"Set-Cookie: b=2; Path=/\r\n"
            b"X-CaSe-Name: v\r\n"
            b"Content-Type: text/plain\r\n"
            b"\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")

    up.handler = handler
    async with running_gate(gate_toml(up_url(up))) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            resp = await conn.request(get("/_matrix/x"))
            assert resp.status == 200 and resp.complete
            assert resp.body == b"hello world"
            for hop in ("X-Secret", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate",
                        "Trailer", "Upgrade"):
                assert resp.header_all(hop) == [], hop
            for value in resp.header_all("Connection"):
                assert "x-secret" not in value.lower()
            # at most the gate's own framing
            assert resp.header_all("Transfer-Encoding") in ([], ["chunked"])
            assert resp.header_all("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
            assert (b"X-CaSe-Name", b"v") in resp.headers
            # the connection is still good for the next request
            up.handler = echo_handler
            resp2 = await conn.request(get("/_matrix/y"))
            assert resp2.status == 200 and resp2.json()["target"] == "/_matrix/y"  # type: ignore[index]
        finally:
            await conn.close()


async def test_other_request_headers_kept_verbatim(up: Recorder) -> None:
    async with running_gate(gate_toml(up_url(up))) as gate:
        resp = await fetch(port_of(gate), raw("GET", "/_matrix/x", [
            ("X-Dup", "a"),
            ("x-MiXeD-CaSe", "Value With  Spaces"),
            ("X-Dup", "b"),
            ("Authorization", 'X-Matrix origin="a.test",key="ed25519:1",sig="abc"'),
        ]))
        assert resp.status == 200
        req = up.requests[0]
        assert [v for n, v in req.headers if n == b"X-Dup"] == [b"a", b"b"]
        assert (b"x-MiXeD-CaSe", b"Value With  Spaces") in req.headers
        assert req.header_all("authorization") == [
            b'X-Matrix origin="a.test",key="ed25519:1",sig="abc"']
        # nothing a client library would add on its own
        for name in ("accept-encoding", "user-agent", "accept", "content-type",
                     "content-length", "transfer-encoding", "expect"):
            assert req.header_all(name) == [], name


async def test_content_length_and_chunked_request_framing_kept(up: Recorder) -> None:
    async with running_gate(gate_toml(up_url(up))) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            resp = await conn.request(raw("PUT", "/_matrix/x", [("Content-Length", "11")],
                                          b"hello world"))
            assert resp.status == 200
            req = up.requests[-1]
            assert req.header_all("content-length") == [b"11"]
            assert req.header_all("transfer-encoding") == []
            assert req.raw_body == b"hello world"

            chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            resp = await conn.request(raw("POST", "/_matrix/y",
                                          [("Transfer-Encoding", "chunked")], chunked))
            assert resp.status == 200
            req = up.requests[-1]
            assert req.header_all("transfer-encoding") == [b"chunked"]
            assert req.header_all("content-length") == []
            assert req.body == b"hello world"
            # chunk framing on the wire (boundaries may differ), terminated properly
            assert req.raw_body != req.body
            assert req.raw_body.endswith(b"0\r\n\r\n")
            assert re.fullmatch(rb"(?:[0-9a-fA-F]+\r\n.*?\r\n)*0\r\n\r\n", req.raw_body, re.S)
        finally:
            await conn.close()


async def test_gzip_passes_untouched_both_ways(up: Recorder) -> None:
    payload = gzip.compress(json.dumps({"rooms": list(range(500))}).encode())
    upload = gzip.compress(b"upload " * 300)

    async def handler(req: Req, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await req.read_body(reader)
        writer.write(response(200, payload, [("Content-Type", "application/json"),
                                             ("Content-Encoding", "gzip"),
                                             ("Vary", "Accept-Encoding")]))

    up.handler = handler
    async with running_gate(gate_toml(up_url(up))) as gate:
        resp = await fetch(port_of(gate), raw("POST", "/_matrix/x", [
            ("Accept-Encoding", "gzip"), ("Content-Encoding", "gzip"),
            ("Content-Length", str(len(upload)))], upload))
        assert resp.status == 200
        assert resp.body == payload
        assert resp.header("Content-Encoding") == "gzip"
        assert resp.header("Content-Length") == str(len(payload))
        req = up.requests[0]
        assert req.body == upload
        assert req.header_all("content-encoding") == [b"gzip"]
        assert req.header_all("accept-encoding") == [b"gzip"]


# ---------------------------------------------------------------------------
# The keep-alive pool


async def test_sequential_requests_share_one_upstream_connection(up: Recorder) -> None:
    async with running_gate(gate_toml(up_url(up))) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            for i in range(20):
                resp = await conn.request(get(f"/_matrix/n/{i}"))
                assert resp.status == 200 and resp.complete
        finally:
            await conn.close()
        assert len(up.requests) == 20
        assert up.connections == 1


async def test_upstream_connection_close_is_not_a_502(up: Recorder) -> None:
    async def close_header(req: Req, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        await req.read_body(reader)
        writer.write(response(200, b"bye", [("Connection", "close")]))
        await writer.drain()
        writer.close()

    up.handler = close_header
    async with running_gate(gate_toml(up_url(up))) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            for i in range(3):
                resp = await conn.request(get(f"/_matrix/c/{i}"))
                assert resp.status == 200 and resp.body == b"bye", i
        finally:
            await conn.close()
        assert up.connections == 3


async def test_idle_pooled_connection_closed_by_upstream_is_not_a_502(up: Recorder) -> None:
    async def close_after(req: Req, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        # keep-alive response, then the upstream drops the idle connection
        await req.read_body(reader)
        writer.write(response(200, b"ok"))
        await writer.drain()
        writer.close()

    up.handler = close_after
    async with running_gate(gate_toml(up_url(up))) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            for i in range(3):
                resp = await conn.request(get(f"/_matrix/i/{i}"))
                assert resp.status == 200 and resp.body == b"ok", i
                await asyncio.sleep(0.1)  # the FIN reaches the idle pooled connection
            resp = await conn.request(raw("POST", "/_matrix/p", [("Content-Length", "4")],
                                          b"data"))
            assert resp.status == 200 and resp.body == b"ok"
            assert up.requests[-1].body == b"data"
        finally:
            await conn.close()


class DropOnReuse:
    """Answers the first request of a connection; on a reused connection it
    reads the request (body included) and closes without answering, once."""

    def __init__(self, how: str = "close") -> None:
        self.per_conn: dict[int, int] = {}
        self.dropped = 0
        self.how = how  # "close" (FIN) or "abort" (RST)

    async def __call__(self, req: Req, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        await req.read_body(reader)
        n = self.per_conn[id(writer)] = self.per_conn.get(id(writer), 0) + 1
        if n >= 2 and self.dropped == 0:
            self.dropped += 1
            if self.how == "abort":
                writer.transport.abort()
            else:
                writer.close()
            return
        writer.write(response(200, b"answer " + req.target))


async def second_on_a_dropped_reuse(up: Recorder, how: str, second: bytes) -> Resp:
    """The response to *second*, sent on the connection a GET was answered on,
    when the upstream drops its reused connection (*how*) unanswered, once."""
    dropper = DropOnReuse(how)
    up.handler = dropper
    async with running_gate(gate_toml(up_url(up))) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            resp = await conn.request(get("/_matrix/first"))
            assert resp.status == 200
            resp = await conn.request(second)
        finally:
            await conn.close()
    assert dropper.dropped == 1
    return resp


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_get_on_a_reused_connection_dropped_unanswered_is_retried(
        up: Recorder, how: str) -> None:
    resp = await second_on_a_dropped_reuse(up, how, get("/_matrix/second"))
    assert resp.status == 200, resp
    targets_seen = [r.target for r in up.requests]
    assert targets_seen == [b"/_matrix/first", b"/_matrix/second", b"/_matrix/second"]
    assert up.connections == 2


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_post_with_consumed_body_dropped_unanswered_is_not_retried(
        up: Recorder, how: str) -> None:
    body = b'{"body":"send me once"}'
    resp = await second_on_a_dropped_reuse(
        up, how, raw("POST", "/_matrix/client/v3/rooms/r/send/m/t1",
                     [("Content-Length", str(len(body)))], body))
    assert_matrix_error(resp, 502)
    posts = [r for r in up.requests if r.method == b"POST"]
    assert len(posts) == 1
    assert posts[0].body == body


# ---------------------------------------------------------------------------
# UNIX sockets


async def test_unix_socket_upstream_byte_exact(tmp_path: object) -> None:
    path = str(tmp_path / "up.sock")  # type: ignore[operator]
    async with recorder(unix_path=path) as up, running_gate(gate_toml(up_url(up))) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            for target in [*FORWARD[:20], "/_matrix/x?a=%2F&b=+&c=%zz"]:
                resp = await conn.request(get(target))
                assert resp.status == 200, target
                assert up.requests[-1].request_line == b"GET " + target.encode() + b" HTTP/1.1"
        finally:
            await conn.close()
        assert up.connections == 1


async def test_unix_socket_listener(up: Recorder, tmp_path: object) -> None:
    path = str(tmp_path / "gate.sock")  # type: ignore[operator]
    toml = f"""
[upstream]
url = "{up_url(up)}"
[log]
access = "off"
[[listeners]]
name = "main"
bind = "unix:{path}"
role = "client"
"""
    async with running_gate(toml):
        conn = await Conn.open(0, unix=path)
        try:
            target = "/_matrix/client/v3/rooms/%21abc%3Ahs.test/state?x=%2f"
            resp = await conn.request(get(target))
            assert resp.status == 200
            assert up.requests[-1].request_line == b"GET " + target.encode() + b" HTTP/1.1"
            resp = await conn.request(get("/_palpo/admin/users"))
            assert resp.status == 403
            assert len(up.requests) == 1
        finally:
            await conn.close()


# ---------------------------------------------------------------------------
# Upstream failures


async def test_refused_upstream_is_a_matrix_502() -> None:
    async with running_gate(gate_toml(f"http://127.0.0.1:{closed_port()}")) as gate:
        resp = await fetch(port_of(gate), get("/_matrix/client/versions",
                                              extra="X-Request-ID: trace-502\r\n"))
        assert_matrix_error(resp, 502)
        assert resp.header_all("X-Request-ID") == ["trace-502"]  # the operator can find it
        # the gate stays up and answers locally
        resp = await fetch(port_of(gate), get("/health"))
        assert resp.status == 200


async def test_silent_upstream_is_a_matrix_504(up: Recorder) -> None:
    closed = asyncio.Event()

    async def silent(req: Req, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers; returns when the gate hangs up
        closed.set()

    up.handler = silent
    extra_up = gate_toml(up_url(up)).replace(
        "[upstream]\n", '[upstream]\nread_timeout = "500ms"\n')
    async with running_gate(extra_up) as gate:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        resp = await fetch(port_of(gate), get("/_matrix/client/v3/sync?timeout=0"))
        elapsed = loop.time() - t0
        assert_matrix_error(resp, 504)
        assert 0.4 <= elapsed < 3.0, elapsed
        assert resp.header_all("X-Request-ID") == [
            up.requests[0].header("x-request-id").decode()]  # type: ignore[union-attr]
        async with asyncio.timeout(2):
            await closed.wait()  # the timed-out upstream connection was closed


async def cut_response(up: Recorder, target: str, *pieces: bytes) -> Resp:
    """The client's response when the upstream sends *pieces* (a pause after
    each) and then dies; the gate must have closed the client connection."""
    async def cut(req: Req, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
        await req.read_body(reader)
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.transport.abort()

    up.handler = cut
    async with running_gate(gate_toml(up_url(up))) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            await conn.send(get(target))
            resp = await conn.read_response()
            assert conn.reader.at_eof()  # the gate closed the client connection
            return resp
        finally:
            await conn.close()


async def test_upstream_cut_mid_response_closes_the_client(up: Recorder) -> None:
    resp = await cut_response(
        up, "/_matrix/media/x",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: 1000\r\n\r\n" + b"0123456789")
    assert resp.status == 200
    assert resp.header("Content-Length") == "1000"
    assert resp.complete is False
    assert resp.body == b"0123456789"


async def test_upstream_cut_mid_chunked_response_closes_the_client(up: Recorder) -> None:
    resp = await cut_response(
        up, "/_matrix/client/v3/sync",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"a\r\n0123456789\r\n",
        b"5\r\nabc")  # half a chunk, then the upstream dies
    assert resp.status == 200
    assert resp.complete is False  # never a clean, short body
    assert resp.body.startswith(b"0123456789")


async def test_response_delimited_by_close_arrives_whole(up: Recorder) -> None:
    async def until_close(req: Req, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        await req.read_body(reader)
        # neither Content-Length nor Transfer-Encoding: the body ends with the
        # connection (RFC 9112 section 6.3 rule 8); that is a complete response
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close")
        await writer.drain()
        writer.close()

    up.handler = until_close
    async with running_gate(gate_toml(up_url(up))) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            for target in ("/_matrix/a", "/_matrix/b"):
                resp = await conn.request(get(target))
                assert resp.status == 200 and resp.complete, target
                assert resp.body == b"until close"
        finally:
            await conn.close()


# ---------------------------------------------------------------------------
# Bodiless responses


async def test_head_204_304_carry_no_body_and_keep_the_connection(up: Recorder) -> None:
    async def handler(req: Req, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await req.read_body(reader)
        if req.method == b"HEAD":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 1234\r\n\r\n")
        elif req.target.endswith(b"/204"):
            writer.write(b"HTTP/1.1 204 No Content\r\nX-Kind: 204\r\n\r\n")
        elif req.target.endswith(b"/304"):
            writer.write(b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n")
        else:
            writer.write(response(200, b"after " + req.target))

    up.handler = handler
    async with running_gate(gate_toml(up_url(up))) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            resp = await conn.request(get("/_matrix/media/v3/download/hs/a", method="HEAD"),
                                      head_only=True)
            assert resp.status == 200
            assert resp.header("Content-Length") == "1234"
            resp = await conn.request(get("/_matrix/a"))
            assert conn.pending == b""
            assert resp.status == 200 and resp.body == b"after /_matrix/a"

            resp = await conn.request(get("/_matrix/x/204"))
            assert resp.status == 204 and resp.body == b""
            assert resp.header("X-Kind") == "204"
            resp = await conn.request(get("/_matrix/b"))
            assert resp.status == 200 and resp.body == b"after /_matrix/b"

            resp = await conn.request(get("/_matrix/x/304", extra='If-None-Match: "v1"\r\n'))
            assert resp.status == 304 and resp.body == b""
            assert resp.header("ETag") == '"v1"'
            resp = await conn.request(get("/_matrix/c"))
            assert resp.status == 200 and resp.body == b"after /_matrix/c"
        finally:
            await conn.close()
        assert up.requests[0].method == b"HEAD"
        assert up.requests[4].header_all("if-none-match") == [b'"v1"']


# ---------------------------------------------------------------------------
# Expect: 100-continue


async def test_expect_100_continue(up: Recorder) -> None:
    async with running_gate(gate_toml(up_url(up))) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            body = b'{"a":1}'
            await conn.send(raw("PUT", "/_matrix/client/v3/profile/x", [
                ("Expect", "100-continue"), ("Content-Length", str(len(body)))]))
            async with asyncio.timeout(5):
                interim = await conn.reader.readuntil(b"\r\n\r\n")
            assert interim.split(b"\r\n", 1)[0] == b"HTTP/1.1 100 Continue"
            await conn.send(body)
            resp = await conn.read_response()
            assert resp.status == 200
            assert up.requests[0].body == body
            assert up.requests[0].header_all("content-length") == [str(len(body)).encode()]
        finally:
            await conn.close()


async def test_expect_100_continue_over_the_limit_is_413(up: Recorder) -> None:
    extra = '[limits]\nmax_body_size = "1K"\n'
    async with running_gate(gate_toml(up_url(up), extra=extra)) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            await conn.send(raw("POST", "/_matrix/media/v3/upload", [
                ("Expect", "100-continue"), ("Content-Length", "5000")]))
            resp = await conn.read_response()  # a 100 would show up as status 100
            assert_matrix_error(resp, 413, "M_TOO_LARGE")
        finally:
            await conn.close()
        await asyncio.sleep(0.05)
        assert up.requests == []
        assert up.connections == 0
