"""Per-client limits, ``[rate_limits]``.

The rule (which request counts against which limit) and the config are
tested with tables; the limits themselves over real sockets: a gate in the
test's event loop in front of the recording upstream, clients connecting
from 127.0.0.2, 127.0.0.3, ... so that each is a client address of its own.
Redis, several gate processes and workers: ``tests/test_ratelimit_shared.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pathlib
import socket
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support.client import Conn, Resp
from support.gate import gate_toml, port_of, run_gate
from support.net import free_port
from support.recorder import Recorder
from support.upstream_thread import threaded_upstream

from palpo_gate import config as configmod
from palpo_gate.config import Rate
from palpo_gate.generation import Gate
from palpo_gate.metrics import Registry
from palpo_gate.ratelimit import limited_route, refusal

CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Origin, X-Requested-With, Content-Type, Accept, Authorization",
}

# -- the rule -------------------------------------------------------------------------

ROUTES: list[tuple[str, str | None]] = [
    ("/_matrix/client/v3/login", "login"),
    ("/_matrix/client/r0/login", "login"),
    ("/_matrix/client/unstable/login", "login"),
    ("/_matrix/client/v3/login/", "login"),
    ("/_matrix/client/V3/LOGIN", "login"),
    ("/_matrix/client/v3/login;jsessionid=1", "login"),
    ("/_matrix/client/v3/register", "register"),
    ("/_matrix/client/r0/register", "register"),
    ("/_matrix/client/unstable/register", "register"),
    ("/_matrix/client/v3/account/password", "password"),
    ("/_matrix/client/r0/account/password", "password"),
    ("/_matrix/client/v3/account/password/email/requestToken", "password"),
    ("/_matrix/client/v3/account/password/msisdn/requestToken", "password"),
    ("/_matrix/client/v3/register/email/requestToken", "password"),
    ("/_matrix/client/r0/register/msisdn/requestToken", "password"),
    ("/_matrix/client/v3/account/3pid/email/requestToken", "password"),
    ("/_matrix/client/unstable/account/3pid/msisdn/requestToken", "password"),
    ("/_matrix/client/v3/account/3pid/email/requesttoken", "password"),
    # Not limited: other endpoints, other versions, other prefixes.
    ("/_matrix/client/v3/login/get_token", None),
    ("/_matrix/client/v1/login", None),
    ("/_matrix/client/v3/register/available", None),
    ("/_matrix/client/v1/register/m.login.registration_token/validity", None),
    ("/_matrix/client/v3/account/whoami", None),
    ("/_matrix/client/v3/account/3pid", None),
    ("/_matrix/client/v3/account/passwords", None),
    ("/_matrix/client/v3/loginx", None),
    ("/_matrix/client/v3/rooms/!r:x/send/m.room.message/login", None),
    ("/_matrix/client/v3/requestToken", None),
    ("/_matrix/federation/v1/login", None),
    ("/_matrix/client/versions", None),
    ("/login", None),
]


@pytest.mark.parametrize(("path", "limit"), ROUTES)
def test_limited_route(path: str, limit: str | None) -> None:
    assert limited_route(path) == limit


def _policy(toml: str):  # type: ignore[no-untyped-def]
    from palpo_gate.ratelimit import Policy, RateLimits

    return Policy(RateLimits.__new__(RateLimits), configmod.loads(toml))


@pytest.mark.parametrize(("toml", "method", "path", "names"), [
    ("", "POST", "/_matrix/client/v3/login", ["login"]),
    ("", "GET", "/_matrix/client/v3/login", []),
    ("", "PUT", "/_matrix/client/v3/register", []),
    ("", "POST", "/_matrix/client/v3/sync", []),
    ('[rate_limits]\nlogin = "0"', "POST", "/_matrix/client/v3/login", []),
    ('[rate_limits]\nrequests = "5/second"', "GET", "/_matrix/client/v3/sync", ["requests"]),
    ('[rate_limits]\nrequests = "5/second"', "POST", "/_matrix/client/v3/register",
     ["requests", "register"]),
])
def test_policy_rules(toml: str, method: str, path: str, names: list[str]) -> None:
    assert [n for n, _ in _policy(toml).rules(method, path)] == names


def test_policy_flags() -> None:
    p = _policy("")
    assert p.posts and not p.every and p.connections == 0
    p = _policy('[rate_limits]\nlogin = "0"\nregister = "0"\npassword = "0"')
    assert not p.posts and not p.every
    p = _policy('[rate_limits]\nrequests = "1/day"\nconnections = 4')
    assert p.every and p.connections == 4


def test_refusal_response() -> None:
    resp = refusal("login", 1500)
    assert resp.status == 429
    assert json.loads(resp.body) == {
        "errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 1500,
        "error": "Too many requests (login) from this address; retry in 2 s"}
    assert resp.headers["Retry-After"] == "2"
    assert refusal("login", 1).headers["Retry-After"] == "1"


# -- config -------------------------------------------------------------------------------


def test_config_defaults() -> None:
    rl = configmod.loads("").rate_limits
    assert (rl.login, rl.register, rl.password) == (
        Rate(10, "minute"), Rate(5, "minute"), Rate(5, "minute"))
    assert rl.requests is None and rl.connections == 0 and rl.storage == "memory://"
    assert not configmod.loads("").listeners[0].proxy_protocol


@pytest.mark.parametrize(("value", "rate"), [
    ('"1/second"', Rate(1, "second")), ('"300/hour"', Rate(300, "hour")),
    ('" 2 / day "', Rate(2, "day")), ('"0"', None), ("0", None),
])
def test_config_rates(value: str, rate: Rate | None) -> None:
    assert configmod.loads(f"[rate_limits]\npassword = {value}").rate_limits.password == rate


@pytest.mark.parametrize(("line", "error"), [
    ('login = "10/minutes"', "rate_limits.login: expected"),
    ('login = "0/minute"', "rate_limits.login: expected"),
    ('login = "10"', "rate_limits.login: expected"),
    ("login = 10", "rate_limits.login: expected"),
    ('requests = "1/week"', "rate_limits.requests: expected"),
    ("connections = -1", "rate_limits.connections: expected an integer"),
    ('connections = "4"', "rate_limits.connections: expected an integer"),
    ('storage = "memory"', "rate_limits.storage:"),
    ('storage = "redis://"', "rate_limits.storage: 'redis://': missing host"),
    ('storage = "redis://h:99999"', "rate_limits.storage:"),
    ('storage = "redis://h:6379/x"', "database number"),
    ('storage = "memcached://h"', "rate_limits.storage:"),
    ('logins = "1/second"', "rate_limits.logins: unknown key (did you mean 'login'?)"),
])
def test_config_errors(line: str, error: str) -> None:
    with pytest.raises(configmod.ConfigError) as exc:
        configmod.loads(f"[rate_limits]\n{line}")
    assert any(e.startswith(error) or error in e for e in exc.value.errors), exc.value.errors


@pytest.mark.parametrize("storage", [
    "memory://", "redis://127.0.0.1:6379/0", "redis://:secret@redis.internal", "rediss://r:6380",
    "redis+unix:///run/redis/redis.sock?db=1"])
def test_config_storage(storage: str) -> None:
    assert configmod.loads(f'[rate_limits]\nstorage = "{storage}"').rate_limits.storage == storage


def test_config_dump_round_trips() -> None:
    cfg = configmod.loads('[forwarding]\ntrusted_proxies = ["10.0.0.0/8"]\n'
                          '[[listeners]]\nbind = "127.0.0.1:0"\nproxy_protocol = true\n'
                          '[rate_limits]\nlogin = "3/second"\nregister = "0"\n'
                          'requests = "100/minute"\nconnections = 8\n'
                          'storage = "redis://127.0.0.1:6379/2"\n')
    again = configmod.loads(configmod.dump(cfg))
    assert again.rate_limits == cfg.rate_limits
    assert again.listeners[0].proxy_protocol


@pytest.mark.parametrize(("toml", "error"), [
    ('[[listeners]]\nbind = "127.0.0.1:0"\nproxy_protocol = true',
     "listeners[0].proxy_protocol: the header is accepted only from forwarding.trusted_proxies"),
    ('[forwarding]\ntrusted_proxies = ["10.0.0.1"]\n'
     '[[listeners]]\nbind = "unix:/tmp/x.sock"\nproxy_protocol = true',
     "listeners[0].proxy_protocol: a UNIX socket peer has no address"),
    ('[[listeners]]\nbind = "127.0.0.1:0"\nproxy_protocol = "yes"',
     "listeners[0].proxy_protocol: expected true or false"),
])
def test_config_proxy_protocol_errors(toml: str, error: str) -> None:
    with pytest.raises(configmod.ConfigError) as exc:
        configmod.loads(toml)
    assert any(e.startswith(error) for e in exc.value.errors), exc.value.errors


# -- over sockets ------------------------------------------------------------------------------

LOGIN = "/_matrix/client/v3/login"


def post(target: str, body: bytes = b'{"type":"m.login.password"}', extra: str = "") -> bytes:
    return (f"POST {target} HTTP/1.1\r\nHost: gate.test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def get(target: str, extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: gate.test\r\n{extra}\r\n".encode()


async def send(port: int, data: bytes, source: str) -> Resp:
    """One request on a new connection from *source*."""
    conn = await Conn.open(port, source=source)
    try:
        return await conn.request(data)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def gate_with(up: Recorder, rate_limits: str, *, extra: str = "", listener: str = "",
                    metrics: Registry | None = None, access: str = "off") -> AsyncIterator[Gate]:
    toml = gate_toml(f"http://127.0.0.1:{up.port}", listener=listener,
                     extra=f"[rate_limits]\n{rate_limits}\n{extra}")
    toml = toml.replace('access = "off"', f'access = "{access}"')
    gate = Gate(configmod.loads(toml), metrics=metrics)
    await gate.start()
    try:
        yield gate
    finally:
        await gate.close(0)


def forwarded(up: Recorder, target: str) -> list[tuple[bytes, bytes | None]]:
    """Method and X-Forwarded-For of each request for *target* the upstream received."""
    return [(r.method, r.header("x-forwarded-for")) for r in up.requests
            if r.target == target.encode()]


def assert_limited(resp: Resp) -> int:
    """*resp* is the gate's 429; its retry_after_ms."""
    assert resp.status == 429, resp
    assert resp.header("Content-Type") == "application/json"
    doc = resp.json()
    assert isinstance(doc, dict)
    assert doc["errcode"] == "M_LIMIT_EXCEEDED"
    assert isinstance(doc["error"], str) and doc["error"]
    wait = doc["retry_after_ms"]
    assert isinstance(wait, int) and wait > 0
    assert resp.header("Retry-After") == str(max(1, -(-wait // 1000)))
    for name, value in CORS.items():
        assert resp.header(name) == value
    assert resp.header("X-Request-ID")
    return wait


async def test_one_address_is_limited_another_is_not(up: Recorder) -> None:
    async with gate_with(up, 'login = "3/minute"') as gate:
        port = port_of(gate)
        for _ in range(3):
            assert (await send(port, post(LOGIN), "127.0.0.2")).status == 200
        assert_limited(await send(port, post(LOGIN), "127.0.0.2"))
        assert_limited(await send(port, post(LOGIN), "127.0.0.2"))
        # Another address has its own budget.
        for _ in range(3):
            assert (await send(port, post(LOGIN), "127.0.0.3")).status == 200
        assert_limited(await send(port, post(LOGIN), "127.0.0.3"))
        # The limited address still reaches everything else.
        assert (await send(port, get(LOGIN), "127.0.0.2")).status == 200
        assert (await send(port, get("/_matrix/client/v3/sync"), "127.0.0.2")).status == 200
        assert (await send(port, post("/_matrix/client/v3/createRoom"), "127.0.0.2")).status == 200
        # Only the requests within the budget reached the upstream, with the
        # client's address as X-Forwarded-For.
        assert forwarded(up, LOGIN) == [(b"POST", b"127.0.0.2")] * 3 \
            + [(b"POST", b"127.0.0.3")] * 3 + [(b"GET", b"127.0.0.2")]


async def test_keep_alive_connection_is_counted_per_request(up: Recorder) -> None:
    async with gate_with(up, 'login = "2/minute"') as gate:
        conn = await Conn.open(port_of(gate), source="127.0.0.2")
        try:
            assert (await conn.request(post(LOGIN))).status == 200
            assert (await conn.request(post(LOGIN))).status == 200
            assert_limited(await conn.request(post(LOGIN)))
            # The connection stays usable after a 429.
            assert (await conn.request(get("/_matrix/client/v3/sync"))).status == 200
        finally:
            await conn.close()


async def test_refusal_is_counted_logged_and_in_the_access_log(
        up: Recorder, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    registry = Registry(["main"])
    caplog.set_level(logging.WARNING, "palpo_gate")
    async with gate_with(up, 'login = "1/minute"\nregister = "1/minute"', metrics=registry,
                         access="plain") as gate:
        port = port_of(gate)
        await send(port, post(LOGIN), "127.0.0.2")
        assert_limited(await send(port, post(LOGIN), "127.0.0.2"))
        assert_limited(await send(port, post(LOGIN), "127.0.0.2"))
        await send(port, post("/_matrix/client/r0/register"), "127.0.0.4")
        assert_limited(await send(port, post("/_matrix/client/r0/register"), "127.0.0.4"))
        text = registry.render().decode()
    assert 'palpo_gate_rate_limited_total{limit="login"} 2' in text
    assert 'palpo_gate_rate_limited_total{limit="register"} 1' in text
    assert 'palpo_gate_rate_limited_total{limit="password"} 0' in text
    assert "# TYPE palpo_gate_rate_limited_total counter" in text
    assert 'palpo_gate_requests_total{listener="main",route="rate_limited",status="429"} 3' in text
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    # Logged with the address; a client that keeps trying is logged once a minute.
    assert len(refused) == 2, refused
    assert "login" in refused[0] and "127.0.0.2" in refused[0]
    assert "register" in refused[1] and "127.0.0.4" in refused[1]
    lines = [line for line in capfd.readouterr().out.splitlines() if " 429 " in line]
    assert len(lines) == 3
    assert lines[0].startswith("127.0.0.2 ") and "error=rate_limited" in lines[0]


async def test_every_client_api_version_and_password_endpoints(up: Recorder) -> None:
    async with gate_with(up, 'login = "1/minute"\nregister = "1/minute"\npassword = "2/minute"'
                         ) as gate:
        port = port_of(gate)
        # login: one budget over r0, v3 and unstable.
        assert (await send(port, post("/_matrix/client/r0/login"), "127.0.0.2")).status == 200
        assert_limited(await send(port, post("/_matrix/client/v3/login"), "127.0.0.2"))
        assert_limited(await send(port, post("/_matrix/client/unstable/login"), "127.0.0.2"))
        assert_limited(await send(port, post("/_matrix/client/v3/log%69n"), "127.0.0.2"))
        assert_limited(await send(port, post("/_matrix/client//v3/login"), "127.0.0.2"))
        # password: password change and reset, and 3PID tokens, one budget.
        for target in ("/_matrix/client/v3/account/password",
                       "/_matrix/client/r0/account/password/email/requestToken"):
            assert (await send(port, post(target), "127.0.0.2")).status == 200
        for target in ("/_matrix/client/v3/register/email/requestToken",
                       "/_matrix/client/unstable/account/3pid/msisdn/requestToken"):
            assert_limited(await send(port, post(target), "127.0.0.2"))
        # register: its own budget.
        assert (await send(port, post("/_matrix/client/v3/register"), "127.0.0.2")).status == 200
        assert_limited(await send(port, post("/_matrix/client/r0/register"), "127.0.0.2"))


async def test_budget_recovers_after_the_window(up: Recorder) -> None:
    async with gate_with(up, 'login = "2/second"') as gate:
        port = port_of(gate)
        assert (await send(port, post(LOGIN), "127.0.0.2")).status == 200
        assert (await send(port, post(LOGIN), "127.0.0.2")).status == 200
        wait = assert_limited(await send(port, post(LOGIN), "127.0.0.2"))
        assert wait <= 1000
        # Retry-After is honest: after it, a request gets through.
        await asyncio.sleep(wait / 1000 + 0.05)
        assert (await send(port, post(LOGIN), "127.0.0.2")).status == 200
        # Two windows later the whole budget is back.
        await asyncio.sleep(2.1)
        assert (await send(port, post(LOGIN), "127.0.0.2")).status == 200
        assert (await send(port, post(LOGIN), "127.0.0.2")).status == 200


async def test_requests_limit_counts_every_forwarded_request(up: Recorder) -> None:
    async with gate_with(up, 'requests = "4/minute"\nlogin = "0"') as gate:
        port = port_of(gate)
        for target in ("/_matrix/client/v3/sync", "/_matrix/client/versions", LOGIN):
            assert (await send(port, get(target), "127.0.0.2")).status == 200
        assert (await send(port, post(LOGIN), "127.0.0.2")).status == 200
        assert_limited(await send(port, get("/_matrix/client/v3/sync"), "127.0.0.2"))
        # Answers of the gate's own are not forwarded requests.
        assert (await send(port, get("/health"), "127.0.0.2")).status == 200
        assert (await send(port, get("/nothing/here"), "127.0.0.2")).status == 404
        assert (await send(port, get("/_matrix/client/v3/sync"), "127.0.0.3")).status == 200


async def test_off_limits_are_not_counted(up: Recorder) -> None:
    async with gate_with(up, 'login = "0"') as gate:
        port = port_of(gate)
        for _ in range(30):
            assert (await send(port, post(LOGIN), "127.0.0.2")).status == 200


async def test_connection_cap(up: Recorder) -> None:
    async with gate_with(up, "connections = 2") as gate:
        port = port_of(gate)
        a = await Conn.open(port, source="127.0.0.2")
        b = await Conn.open(port, source="127.0.0.2")
        c = await Conn.open(port, source="127.0.0.2")
        other = await Conn.open(port, source="127.0.0.3")
        try:
            assert (await a.request(get("/_matrix/client/v3/sync"))).status == 200
            assert (await b.request(get("/_matrix/client/v3/sync"))).status == 200
            # The third connection from the same address: 429, closed.
            assert_limited(await c.request(get("/_matrix/client/v3/sync")))
            assert await c.closed_by_peer()
            assert (await other.request(get("/_matrix/client/v3/sync"))).status == 200
            # A slot comes back when a connection ends.
            await a.close()
            await asyncio.sleep(0.1)
            d = await Conn.open(port, source="127.0.0.2")
            try:
                assert (await d.request(get("/_matrix/client/v3/sync"))).status == 200
            finally:
                await d.close()
        finally:
            for conn in (b, c, other):
                await conn.close()
    # The refused request never reached the upstream.
    assert len(up.requests) == 4


async def test_reload_keeps_the_counts(up: Recorder) -> None:
    port = free_port()

    def cfg(rate_limits: str) -> configmod.Config:
        return configmod.loads(gate_toml(
            f"http://127.0.0.1:{up.port}", extra=f"[rate_limits]\n{rate_limits}\n").replace(
            'bind = "127.0.0.1:0"', f'bind = "127.0.0.1:{port}"'))

    gate = Gate(cfg('login = "2/minute"'))
    await gate.start()
    try:
        assert (await send(port, post(LOGIN), "127.0.0.2")).status == 200
        assert (await send(port, post(LOGIN), "127.0.0.2")).status == 200
        await gate.reload(cfg('login = "2/minute"\nregister = "1/minute"'))
        assert_limited(await send(port, post(LOGIN), "127.0.0.2"))
        # A changed rate is a new budget.
        await gate.reload(cfg('login = "3/minute"'))
        assert (await send(port, post(LOGIN), "127.0.0.2")).status == 200
    finally:
        await gate.close(0)


async def test_memory_storage_forgets_expired_counts(up: Recorder) -> None:
    async with gate_with(up, 'login = "1/second"') as gate:
        port = port_of(gate)
        for i in range(2, 12):
            await send(port, post(LOGIN), f"127.0.0.{i}")
        storage = gate.rate_limits._backend.storage
        assert len(storage.storage) >= 10
        deadline = time.monotonic() + 6
        while storage.storage and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            await send(port, post(LOGIN), "127.0.1.1")  # a hit starts the sweep
            await asyncio.sleep(0.2)
        assert not any(k for k in storage.storage if "127.0.0." in k), list(storage.storage)


def _tls_client(ca: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca)


async def test_connection_cap_on_a_tls_listener(up: Recorder, tls_files: dict[str, str]) -> None:
    listener = (f'[listeners.tls]\ncert = "{tls_files["default_cert"]}"\n'
                f'key = "{tls_files["default_key"]}"\n')
    async with gate_with(up, "connections = 1", listener=listener) as gate:
        port = port_of(gate)
        ctx = _tls_client(tls_files["ca"])
        a = await Conn.open(port, source="127.0.0.2", ssl=ctx, server_hostname="localhost")
        b = await Conn.open(port, source="127.0.0.2", ssl=ctx, server_hostname="localhost")
        try:
            assert (await a.request(get("/_matrix/client/v3/sync"))).status == 200
            assert_limited(await b.request(get("/_matrix/client/v3/sync")))
            assert (await a.request(get("/_matrix/client/v3/sync"))).status == 200
        finally:
            await a.close()
            await b.close()


@pytest.mark.timeout(60)
def test_limits_in_the_real_process(tmp_path: pathlib.Path, tls_files: dict[str, str]) -> None:
    """uvloop, as operators run it: a TLS listener with a connection cap and the
    login limit."""
    port = free_port()
    with threaded_upstream() as upstream:
        config = f"""
[upstream]
url = "{upstream.url}"
[log]
access = "off"
[rate_limits]
login = "2/minute"
connections = 1
[[listeners]]
name = "tls"
bind = "127.0.0.1:{port}"
[listeners.tls]
cert = "{tls_files['default_cert']}"
key = "{tls_files['default_key']}"
"""
        ctx = _tls_client(tls_files["ca"])

        def request(data: bytes, source: str, *, hold: bool = False) -> tuple[bytes, Any]:
            raw = socket.create_connection(("127.0.0.1", port), timeout=10,
                                           source_address=(source, 0))
            sock = ctx.wrap_socket(raw, server_hostname="localhost")
            sock.sendall(data)
            answer = sock.recv(65536)
            if not hold:
                sock.close()
                return answer, None
            return answer, sock

        with run_gate(config, tmp_path):
            statuses = [request(post(LOGIN), "127.0.0.2")[0][:12] for _ in range(3)]
            assert statuses == [b"HTTP/1.1 200", b"HTTP/1.1 200", b"HTTP/1.1 429"]
            first, held = request(get("/_matrix/client/v3/sync"), "127.0.0.3", hold=True)
            try:
                assert first.startswith(b"HTTP/1.1 200")
                second, _ = request(get("/_matrix/client/v3/sync"), "127.0.0.3")
                assert second.startswith(b"HTTP/1.1 429")
            finally:
                held.close()
