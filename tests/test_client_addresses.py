"""The client address over real sockets: X-Forwarded-For from
trusted proxies, and the PROXY protocol (versions 1 and 2) on listeners with
``proxy_protocol = true``, plain and TLS.

What counts is what the upstream receives (X-Forwarded-For), what the access
log shows and what the limits count. Clients connect from 127.0.0.2,
127.0.0.3, ... to be separate addresses; 127.0.0.1 plays the balancer.
The last tests run the real process (uvloop) as operators do.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import socket
import ssl
import time
from collections.abc import AsyncIterator

import pytest
from support.client import Conn, Resp
from support.gate import gate_toml, port_of, run_gate
from support.net import free_port
from support.recorder import Recorder
from support.upstream_thread import threaded_upstream

from palpo_gate import config as configmod
from palpo_gate.generation import Gate
from palpo_gate.proxyproto import v1, v2

LOGIN = "/_matrix/client/v3/login"
SYNC = "/_matrix/client/v3/sync"


def post(target: str, extra: str = "") -> bytes:
    body = b'{"type":"m.login.password"}'
    return (f"POST {target} HTTP/1.1\r\nHost: gate.test\r\nContent-Length: {len(body)}\r\n"
            f"{extra}\r\n").encode() + body


def get(target: str, extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: gate.test\r\n{extra}\r\n".encode()


@contextlib.asynccontextmanager
async def gate_with(up: Recorder, *, trusted: str = "", listener: str = "",
                    rate_limits: str = 'login = "2/minute"', limits: str = "",
                    access: str = "off", tls: dict[str, str] | None = None, more: str = ""
                    ) -> AsyncIterator[Gate]:
    extra = f"[forwarding]\ntrusted_proxies = [{trusted}]\n[rate_limits]\n{rate_limits}\n{more}"
    if limits:
        extra += f"[limits]\n{limits}\n"
    if tls is not None:
        listener += (f'\n[listeners.tls]\ncert = "{tls["default_cert"]}"\n'
                     f'key = "{tls["default_key"]}"\n')
    toml = gate_toml(f"http://127.0.0.1:{up.port}", listener=listener, extra=extra)
    gate = Gate(configmod.loads(toml.replace('access = "off"', f'access = "{access}"')))
    await gate.start()
    try:
        yield gate
    finally:
        await gate.close(0)


async def send(port: int, data: bytes, source: str = "127.0.0.1", *,
               first: bytes = b"") -> Resp:
    """One request on a new connection from *source*, *first* written before it."""
    conn = await Conn.open(port, source=source)
    try:
        return await conn.request(first + data)
    finally:
        await conn.close()


def xff(up: Recorder) -> list[bytes | None]:
    return [r.header("x-forwarded-for") for r in up.requests]


# -- X-Forwarded-For -------------------------------------------------------------------


async def test_spoofed_forwarded_for_from_an_untrusted_peer_buys_nothing(
        up: Recorder, capfd: pytest.CaptureFixture[str]) -> None:
    async with gate_with(up, trusted='"127.0.0.10/32"', access="plain") as gate:
        port = port_of(gate)
        for i in range(4):
            resp = await send(port, post(LOGIN, f"X-Forwarded-For: 198.51.100.{i}\r\n"),
                              "127.0.0.2")
            assert resp.status == (200 if i < 2 else 429), (i, resp)
        # The upstream got the peer, never the made-up addresses.
        assert xff(up) == [b"127.0.0.2", b"127.0.0.2"]
    lines = capfd.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.startswith("127.0.0.2 ") for line in lines), lines


async def test_trusted_proxy_chain_rightmost_untrusted_address(
        up: Recorder, capfd: pytest.CaptureFixture[str]) -> None:
    async with gate_with(up, trusted='"127.0.0.10/32", "10.0.0.0/8"', access="plain") as gate:
        port = port_of(gate)

        async def via_proxy(chain: str) -> int:
            return (await send(port, post(LOGIN, f"X-Forwarded-For: {chain}\r\n"),
                               "127.0.0.10")).status

        # 203.0.113.5 behind two trusted proxies; what it wrote itself on the
        # left changes nothing.
        assert await via_proxy("203.0.113.5, 10.1.1.1") == 200
        assert await via_proxy("6.6.6.6, 203.0.113.5, 10.1.1.1") == 200
        assert await via_proxy("7.7.7.7, 203.0.113.5") == 429
        # Another client behind the same proxy has its own budget.
        assert await via_proxy("203.0.113.6") == 200
        # The proxy itself is not limited by its clients.
        assert (await send(port, post(LOGIN), "127.0.0.10")).status == 200
        # Upstream: the chain kept, the peer appended.
        assert xff(up) == [b"203.0.113.5, 10.1.1.1, 127.0.0.10",
                           b"6.6.6.6, 203.0.113.5, 10.1.1.1, 127.0.0.10",
                           b"203.0.113.6, 127.0.0.10", b"127.0.0.10"]
    clients = [line.split(" ", 1)[0] for line in capfd.readouterr().out.splitlines()]
    assert clients == ["203.0.113.5", "203.0.113.5", "203.0.113.5", "203.0.113.6", "127.0.0.10"]


async def test_admin_allow_from_sees_the_client_behind_the_proxy(up: Recorder) -> None:
    async with gate_with(up, trusted='"127.0.0.10/32"',
                         more='[admin]\nallow_from = ["203.0.113.0/24"]\n') as gate:
        port = port_of(gate)
        admin = get("/_synapse/admin/v1/server_version", "X-Forwarded-For: {}\r\n")
        assert (await send(port, admin.replace(b"{}", b"203.0.113.9"), "127.0.0.10")).status == 200
        assert (await send(port, admin.replace(b"{}", b"198.51.100.1"), "127.0.0.10")
                ).status == 403
        # A client cannot claim the allowed address itself.
        assert (await send(port, admin.replace(b"{}", b"203.0.113.9"), "127.0.0.2")).status == 403


# -- PROXY protocol ------------------------------------------------------------------------

PP = "proxy_protocol = true"
BALANCER = '"127.0.0.1/32"'

HEADERS = {
    "v1-tcp4": (lambda a: v1("TCP4", a, "127.0.0.1", 40000, 443), "203.0.113.{}"),
    "v1-tcp6": (lambda a: v1("TCP6", a, "::1", 40000, 443), "2001:db8:{}::1"),
    "v2-tcp4": (lambda a: v2("TCP4", a, "127.0.0.1", 40000, 443), "203.0.113.{}"),
    "v2-tcp6": (lambda a: v2("TCP6", a, "::1", 40000, 443), "2001:db8:{}::1"),
}


@pytest.mark.parametrize("kind", HEADERS)
async def test_proxy_header_gives_the_client_address(up: Recorder, kind: str,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    make, pattern = HEADERS[kind]
    a, b = pattern.format(5), pattern.format(6)
    async with gate_with(up, trusted=BALANCER, listener=PP, access="plain") as gate:
        port = port_of(gate)
        # Two clients behind one balancer: separate budgets.
        for addr, expect in ((a, 200), (a, 200), (a, 429), (b, 200)):
            assert (await send(port, post(LOGIN), first=make(addr))).status == expect
        # Keep-alive: every request of the connection is the header's client.
        conn = await Conn.open(port)
        try:
            await conn.send(make(b))
            assert (await conn.request(get(SYNC))).status == 200
            assert (await conn.request(post(LOGIN))).status == 200
            assert (await conn.request(post(LOGIN))).status == 429
        finally:
            await conn.close()
        assert xff(up) == [a.encode(), a.encode(), b.encode(), b.encode(), b.encode()]
    clients = [line.split(" ", 1)[0] for line in capfd.readouterr().out.splitlines()]
    assert clients == [a, a, a, b, b, b, b]


@pytest.mark.parametrize("header", [v2("LOCAL"), v1("UNKNOWN"), b"PROXY UNKNOWN x y\r\n",
                                    v2("UNKNOWN")], ids=["v2-local", "v1-unknown",
                                                         "v1-unknown-junk", "v2-unspec"])
async def test_proxy_local_and_unknown_use_the_peer(up: Recorder, header: bytes) -> None:
    async with gate_with(up, trusted=BALANCER, listener=PP) as gate:
        assert (await send(port_of(gate), get(SYNC), first=header)).status == 200
    assert xff(up) == [b"127.0.0.1"]


async def closed_silently(port: int, data: bytes, source: str = "127.0.0.1", *,
                          pause: float = 0.0, then: bytes = b"") -> bytes:
    """Connect, write *data* (then *then* after *pause*), and read until the
    gate closes; what it answered (b"" if nothing)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                   local_addr=(source, 0))
    got = b""
    try:
        writer.write(data)
        if pause:
            await asyncio.sleep(pause)
            if then and not writer.is_closing():
                writer.write(then)
        async with asyncio.timeout(5):
            while chunk := await reader.read(65536):
                got += chunk
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return got


REFUSED = {
    "missing": get(SYNC),
    "malformed-v1": b"PROXY TCP4 203.0.113.5 127.0.0.1 40000\r\n" + get(SYNC),
    "bad-address": b"PROXY TCP4 203.0.113.500 127.0.0.1 1 2\r\n" + get(SYNC),
    "malformed-v2": v2("TCP4", "203.0.113.5", "127.0.0.1", 1, 2)[:13] + b"\x99" + get(SYNC),
    "v2-over-cap": v2("TCP4", "203.0.113.5", "127.0.0.1", 1, 2, tlvs=bytes(5000)) + get(SYNC),
    "v1-too-long": b"PROXY UNKNOWN " + b"x" * 200 + b"\r\n" + get(SYNC),
    "tls-instead": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),
}


@pytest.mark.parametrize("name", REFUSED)
async def test_proxy_bad_headers_close_the_connection(up: Recorder, name: str) -> None:
    async with gate_with(up, trusted=BALANCER, listener=PP) as gate:
        assert await closed_silently(port_of(gate), REFUSED[name]) == b""
    assert up.requests == []


async def test_proxy_truncated_header_then_close_forwards_nothing(up: Recorder) -> None:
    async with gate_with(up, trusted=BALANCER, listener=PP) as gate:
        port = port_of(gate)
        for header in (v1("TCP4", "203.0.113.5", "127.0.0.1", 1, 2),
                       v2("TCP6", "2001:db8::5", "::1", 1, 2)):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(header[:-3])
            await writer.drain()
            writer.write_eof()
            async with asyncio.timeout(5):
                assert await reader.read() == b""
            writer.close()
        # The gate is fine afterwards.
        assert (await send(port, get(SYNC), first=v1("TCP4", "203.0.113.5", "1.1.1.1", 1, 2))
                ).status == 200
    assert xff(up) == [b"203.0.113.5"]


@pytest.mark.parametrize("kind", ["v1", "v2"])
async def test_proxy_header_slower_than_header_timeout_is_cut(up: Recorder, kind: str) -> None:
    header = (v1 if kind == "v1" else v2)("TCP4", "203.0.113.5", "127.0.0.1", 1, 2)
    async with gate_with(up, trusted=BALANCER, listener=PP, limits='header_timeout = "0.5s"'
                         ) as gate:
        started = time.monotonic()
        got = await closed_silently(port_of(gate), header[:10], pause=2.0,
                                    then=header[10:] + get(SYNC))
        # Cut at the timeout (not after the client finished), nothing answered.
        assert got == b""
        assert time.monotonic() - started < 4.5
        # Nothing at all: cut too.
        assert await closed_silently(port_of(gate), b"", pause=0.1) == b""
    assert up.requests == []


async def test_proxy_header_from_an_untrusted_peer_is_refused(up: Recorder) -> None:
    async with gate_with(up, trusted=BALANCER, listener=PP) as gate:
        header = v1("TCP4", "203.0.113.5", "127.0.0.1", 1, 2)
        assert await closed_silently(port_of(gate), header + get(SYNC), "127.0.0.2") == b""
        assert await closed_silently(port_of(gate), get(SYNC), "127.0.0.2") == b""
    assert up.requests == []


@pytest.mark.parametrize("kind", ["v1", "v2"])
async def test_proxy_header_split_byte_by_byte(up: Recorder, kind: str) -> None:
    header = (v1 if kind == "v1" else v2)("TCP6", "2001:db8::77", "::1", 1, 2)
    async with gate_with(up, trusted=BALANCER, listener=PP) as gate:
        conn = await Conn.open(port_of(gate))
        sock = conn.writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for i in range(len(header)):
                await conn.send(header[i:i + 1])
                await asyncio.sleep(0.005)
            assert (await conn.request(get(SYNC))).status == 200
        finally:
            await conn.close()
    assert xff(up) == [b"2001:db8::77"]


async def test_proxy_header_and_connection_cap_count_the_header_address(up: Recorder) -> None:
    async with gate_with(up, trusted=BALANCER, listener=PP,
                         rate_limits="connections = 1") as gate:
        port = port_of(gate)
        a = await Conn.open(port)
        b = await Conn.open(port)
        c = await Conn.open(port)
        try:
            await a.send(v1("TCP4", "203.0.113.5", "127.0.0.1", 1, 2))
            await b.send(v1("TCP4", "203.0.113.5", "127.0.0.1", 3, 2))
            await c.send(v1("TCP4", "203.0.113.6", "127.0.0.1", 4, 2))
            assert (await a.request(get(SYNC))).status == 200
            assert (await b.request(get(SYNC))).status == 429
            assert (await c.request(get(SYNC))).status == 200
        finally:
            for conn in (a, b, c):
                await conn.close()


# -- PROXY protocol on a TLS listener: the header comes before the handshake ----------


def _tls_after_header(port: int, header: bytes, request: bytes, cafile: str, *,
                      together: bool) -> bytes:
    """Write *header*, then a TLS handshake (its ClientHello in the same write
    when *together*), then *request* (with Connection: close); the decrypted answer."""
    ctx = ssl.create_default_context(cafile=cafile)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        if together:
            sock.sendall(header + hello)
        else:
            sock.sendall(header)
            time.sleep(0.05)
            sock.sendall(hello)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if pending := outgoing.read():
                    sock.sendall(pending)
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during the handshake") from None
                incoming.write(data)
        if pending := outgoing.read():
            sock.sendall(pending)
        tls.write(request)
        sock.sendall(outgoing.read())
        answer = b""
        while True:
            try:
                chunk = tls.read(65536)
                if not chunk:  # close_notify
                    return answer
                answer += chunk
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                if not data:
                    return answer
                incoming.write(data)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return answer


@pytest.mark.parametrize("together", [True, False], ids=["same-packet", "separate"])
@pytest.mark.parametrize("kind", ["v1", "v2"])
async def test_proxy_header_before_tls(up: Recorder, tls_files: dict[str, str], kind: str,
                                       together: bool) -> None:
    header = (v1 if kind == "v1" else v2)("TCP4", "203.0.113.8", "127.0.0.1", 1, 443)
    async with gate_with(up, trusted=BALANCER, listener=PP, tls=tls_files) as gate:
        answer = await asyncio.to_thread(
            _tls_after_header, port_of(gate), header, get(SYNC, "Connection: close\r\n"),
            tls_files["ca"], together=together)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        # Without the header, or TLS without it: closed.
        assert await closed_silently(port_of(gate), b"\x16\x03\x01\x00\x05hello") == b""
    assert xff(up) == [b"203.0.113.8"]
    assert up.requests[0].header("x-forwarded-proto") == b"https"


# -- the real process (uvloop) -------------------------------------------------------


@pytest.mark.timeout(60)
def test_proxy_protocol_in_the_real_process(tmp_path: pathlib.Path,
                                            tls_files: dict[str, str]) -> None:
    plain, secure = free_port(), free_port()
    with threaded_upstream() as upstream:
        config = f"""
[upstream]
url = "{upstream.url}"
[log]
access = "off"
[forwarding]
trusted_proxies = ["127.0.0.1/32"]
[rate_limits]
login = "1/minute"
[[listeners]]
name = "plain"
bind = "127.0.0.1:{plain}"
proxy_protocol = true
[[listeners]]
name = "tls"
bind = "127.0.0.1:{secure}"
proxy_protocol = true
[listeners.tls]
cert = "{tls_files['default_cert']}"
key = "{tls_files['default_key']}"
"""
        with run_gate(config, tmp_path):
            for i, make in enumerate((v1, v2)):
                header = make("TCP6", f"2001:db8:{i + 1}::1", "::1", 1, 2)
                with socket.create_connection(("127.0.0.1", plain), timeout=5) as sock:
                    sock.sendall(header + post(LOGIN, "Connection: close\r\n"))
                    assert _read_all(sock).startswith(b"HTTP/1.1 200 ")
                with socket.create_connection(("127.0.0.1", plain), timeout=5) as sock:
                    for byte in header:
                        sock.sendall(bytes([byte]))
                    sock.sendall(post(LOGIN, "Connection: close\r\n"))
                    assert _read_all(sock).startswith(b"HTTP/1.1 429 ")
                answer = _tls_after_header(secure, make("TCP4", f"203.0.113.{i + 1}", "1.1.1.1",
                                                        1, 2),
                                           get(SYNC, "Connection: close\r\n"), tls_files["ca"],
                                           together=True)
                assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
            with socket.create_connection(("127.0.0.1", plain), timeout=5) as sock:
                sock.sendall(get(SYNC))
                assert _read_all(sock) == b""
    got = [(r.target, r.headers.get(b"x-forwarded-for")) for r in upstream.requests]
    assert got == [(LOGIN.encode(), b"2001:db8:1::1"), (SYNC.encode(), b"203.0.113.1"),
                   (LOGIN.encode(), b"2001:db8:2::1"), (SYNC.encode(), b"203.0.113.2")]


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionError:
        pass
    return data


async def test_ipv6_clients_count_per_64(up: Recorder) -> None:
    """An IPv6 client picks any address of its /64 at will: one budget for the /64."""
    async with gate_with(up, trusted=BALANCER, listener=PP) as gate:
        port = port_of(gate)

        async def login(addr: str) -> int:
            return (await send(port, post(LOGIN), first=v1("TCP6", addr, "::1", 1, 2))).status

        assert await login("2001:db8:5:6::1") == 200
        assert await login("2001:db8:5:6:ffff::2") == 200
        assert await login("2001:db8:5:6::3") == 429
        assert await login("2001:db8:5:7::1") == 200
