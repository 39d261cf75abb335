"""Reload (SIGHUP's work) in process: a new generation takes new connections,
kept sockets never refuse one, open connections finish on the old generation,
a bad config changes nothing, renewed certificates reach new handshakes."""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import ssl

import pytest
import trustme
from support.client import Conn, fetch, get
from support.gate import gate_toml, running_gate
from support.net import free_port
from support.recorder import Req, recorder, response

from palpo_gate import config as configmod


def _toml(upstream_port: int, port: int, *, extra: str = "", listeners: str = "") -> str:
    return gate_toml(f"http://127.0.0.1:{upstream_port}", bind=f"127.0.0.1:{port}", role=None,
                     before=extra, listener=listeners)


async def test_reload_swaps_the_generation_and_keeps_the_socket() -> None:
    async with recorder() as old_up, recorder() as new_up:
        port = free_port()
        async with running_gate(_toml(old_up.port, port)) as gate:
            sock_before = gate._slots["main"].sock
            assert (await fetch(port, get("/_matrix/a"))).status == 200
            assert (await fetch(port, get("/_palpo/admin/x"))).status == 403

            await gate.reload(configmod.loads(_toml(
                new_up.port, port, extra='[admin]\nallow_from = ["127.0.0.1/32"]')))

            assert gate.generation == 2
            assert gate._slots["main"].sock is sock_before  # the same listening socket
            r = await fetch(port, get("/_matrix/b%2Fc"))
            assert r.status == 200
            assert new_up.requests[-1].request_line == b"GET /_matrix/b%2Fc HTTP/1.1"
            assert (await fetch(port, get("/_palpo/admin/x"))).status == 200
            assert [r.target for r in old_up.requests] == [b"/_matrix/a"]


async def test_open_connections_finish_on_the_old_generation() -> None:
    release = asyncio.Event()

    async def held(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if req.target.startswith(b"/_matrix/client/v3/sync"):
            await release.wait()
        writer.write(response(200, b"old"))

    async with recorder() as old_up, recorder() as new_up:
        old_up.handler = held
        port = free_port()
        async with running_gate(_toml(old_up.port, port)) as gate:
            keep = await Conn.open(port)
            poll = await Conn.open(port)
            try:
                assert (await keep.request(get("/_matrix/1"))).status == 200
                await poll.send(get("/_matrix/client/v3/sync?timeout=30000"))
                await old_up.wait_requests(2)

                await gate.reload(configmod.loads(_toml(new_up.port, port)))

                # The held long-poll completes, on the old upstream.
                release.set()
                r = await poll.read_response()
                assert r.status == 200 and r.body == b"old"
                # The open keep-alive connection is served by the old generation
                # once more, and told to close (announced, so no request races it).
                r = await keep.request(get("/_matrix/2"))
                assert r.status == 200 and r.body == b"old"
                assert r.header("Connection") == "close"
                assert await keep.closed_by_peer(5)
                # A new connection gets the new generation.
                r = await fetch(port, get("/_matrix/3"))
                assert r.status == 200 and r.body != b"old"
                assert [q.target for q in new_up.requests] == [b"/_matrix/3"]
            finally:
                await keep.close()
                await poll.close()
            # The old generation's upstream connections are closed once its
            # last client connection is gone.
            old_pool_gone = old_up.closed_connections
            for _ in range(50):
                if old_up.closed_connections == old_up.connections:
                    break
                await asyncio.sleep(0.05)
            assert old_up.closed_connections == old_up.connections >= old_pool_gone


async def test_a_bad_config_changes_nothing(tmp_path: pytest.TempPathFactory) -> None:
    async with recorder() as up:
        port = free_port()
        async with running_gate(_toml(up.port, port)) as gate:
            bad = _toml(up.port, port, listeners=(
                '[listeners.tls]\ncert = "/nonexistent/cert.pem"\nkey = "/nonexistent/key.pem"'))
            with pytest.raises(configmod.ConfigError) as err:
                await gate.reload(configmod.loads(bad))
            assert any("listeners[0].tls.cert" in e for e in err.value.errors)
            assert gate.generation == 1
            assert (await fetch(port, get("/_matrix/still"))).status == 200


async def test_a_listener_that_cannot_bind_fails_the_reload_whole() -> None:
    import socket

    async with recorder() as up:
        port = free_port()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            async with running_gate(_toml(up.port, port)) as gate:
                extra_listener = f'[[listeners]]\nname = "second"\nbind = "127.0.0.1:{busy}"'
                with pytest.raises(configmod.ConfigError) as err:
                    await gate.reload(configmod.loads(_toml(up.port, port) + extra_listener))
                assert any(e.startswith("listeners[1].bind") for e in err.value.errors)
                assert gate.generation == 1
                assert list(gate.addresses()) == ["main"]
                assert (await fetch(port, get("/_matrix/x"))).status == 200


async def test_listeners_added_and_removed() -> None:
    async with recorder() as up:
        port, port2 = free_port(), free_port()
        async with running_gate(_toml(up.port, port)) as gate:
            second = (f'[[listeners]]\nname = "second"\nbind = "127.0.0.1:{port2}"\n'
                      'role = "federation"')
            await gate.reload(configmod.loads(_toml(up.port, port) + second))
            assert (await fetch(port2, get("/_matrix/federation/v1/version"))).status == 200
            assert (await fetch(port2, get("/_palpo/client/x"))).status == 404

            # Drop "main": its socket stops accepting; "second" keeps serving.
            only_second = f"""
[upstream]
url = "http://127.0.0.1:{up.port}"
[log]
access = "off"
{second}
"""
            await gate.reload(configmod.loads(only_second))
            with pytest.raises(OSError):
                await fetch(port, get("/_matrix/x"))
            assert (await fetch(port2, get("/_matrix/x"))).status == 200


def _write_cert(ca: trustme.CA, host: str, cert_path: str, key_path: str) -> None:
    cert = ca.issue_cert(host, "127.0.0.1")
    cert.private_key_pem.write_to_path(key_path)
    with open(cert_path, "wb") as f:
        for pem in cert.cert_chain_pems:
            f.write(pem.bytes())


async def _peer_names(port: int, ca: trustme.CA, sni: str) -> set[str]:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.check_hostname = False
    conn = await Conn.open(port, ssl=ctx, server_hostname=sni)
    try:
        cert = conn.writer.get_extra_info("peercert")
        return {v for k, v in cert.get("subjectAltName", ()) if k == "DNS"}
    finally:
        await conn.close()


async def test_certificates_renewed_on_disk_reach_new_handshakes(
        tmp_path: pathlib.Path) -> None:
    ca = trustme.CA()
    cert, key = str(tmp_path / "fullchain.pem"), str(tmp_path / "privkey.pem")
    _write_cert(ca, "before.test", cert, key)
    async with recorder() as up:
        port = free_port()
        toml = _toml(up.port, port, listeners=f'[listeners.tls]\ncert = "{cert}"\nkey = "{key}"')
        async with running_gate(toml) as gate:
            assert await _peer_names(port, ca, "before.test") == {"before.test"}
            held = await Conn.open(port, ssl=_trusting(ca), server_hostname="before.test")
            try:
                # Renewal: new files in place (as certbot's symlink swap), then reload.
                staged = tmp_path / "new"
                staged.mkdir()
                _write_cert(ca, "after.test", str(staged / "c.pem"), str(staged / "k.pem"))
                shutil.copy(staged / "c.pem", cert)
                shutil.copy(staged / "k.pem", key)
                await gate.reload(configmod.loads(toml))
                assert await _peer_names(port, ca, "after.test") == {"after.test"}
                assert await _peer_names(port, ca, "unknown.test") == {"after.test"}
                # The connection opened before the reload still works.
                assert (await held.request(get("/_matrix/x"))).status == 200
            finally:
                await held.close()


def _trusting(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.check_hostname = False
    return ctx


def _open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


async def test_reloads_across_keep_alive_connections_leak_nothing() -> None:
    """Each round: a keep-alive request (an idle upstream connection in the
    pool), a reload, then the client closes. The old generation must drain
    and close its pool; nothing may pile up over rounds."""
    rounds = 100
    async with recorder() as up:
        port = free_port()
        toml = _toml(up.port, port)
        async with running_gate(toml) as gate:
            # Warm-up round: whatever the first round opens for good (the
            # recorder's server side, lazily made objects) is not a leak.
            conn = await Conn.open(port)
            assert (await conn.request(get("/_matrix/warm"))).status == 200
            await conn.close()
            await asyncio.sleep(0.05)
            fds_before = _open_fds()
            async with asyncio.timeout(60):
                for i in range(rounds):
                    conn = await Conn.open(port)
                    try:
                        assert (await conn.request(get(f"/_matrix/r{i}"))).status == 200
                        await gate.reload(configmod.loads(toml))
                    finally:
                        await conn.close()
                # Let the closes land (the gate sees EOF, its handler tasks end).
                for _ in range(100):
                    if not gate._draining_gens and gate.upstream_connections()[0] <= 1:
                        break
                    await asyncio.sleep(0.05)
            assert gate.generation == rounds + 1
            assert not gate._draining_gens and not gate._retired
            # Only the current generation's pool is left: at most the one
            # connection the last round's request may have left idle there.
            open_, idle = gate.upstream_connections()
            assert open_ == idle <= 1
            for _ in range(50):  # the upstream side's closes land too
                if up.connections - up.closed_connections <= 1:
                    break
                await asyncio.sleep(0.05)
            assert up.connections - up.closed_connections <= 1
            assert _open_fds() <= fds_before + 2


async def test_a_reload_turns_tls_on_and_off_on_the_same_bind(
        tls_files: dict[str, str]) -> None:
    ctx = ssl.create_default_context(cafile=tls_files["ca"])
    tls = (f'[listeners.tls]\ncert = "{tls_files["default_cert"]}"\n'
           f'key = "{tls_files["default_key"]}"')
    async with recorder() as up:
        port = free_port()
        plain_toml, tls_toml = _toml(up.port, port), _toml(up.port, port, listeners=tls)
        async with running_gate(plain_toml) as gate:
            held = await Conn.open(port)
            try:
                assert (await held.request(get("/_matrix/1"))).status == 200

                await gate.reload(configmod.loads(tls_toml))  # no "address already in use"

                assert gate.generation == 2
                assert gate.addresses()["main"][1] == port
                conn = await Conn.open(port, ssl=ctx, server_hostname="localhost")
                try:
                    assert (await conn.request(get("/_matrix/2"))).status == 200
                finally:
                    await conn.close()
                # A plain request on a new connection is not served any more.
                try:
                    plain = (await fetch(port, get("/_matrix/plain"))).status
                except Exception as exc:  # a TLS alert is no HTTP: any failure will do
                    plain = type(exc).__name__
                assert plain != 200
                # The plain connection opened before is served to its end.
                r = await held.request(get("/_matrix/3"))
                assert r.status == 200 and r.header("Connection") == "close"
            finally:
                await held.close()

            await gate.reload(configmod.loads(plain_toml))  # and off again
            assert (await fetch(port, get("/_matrix/4"))).status == 200
            assert gate.contexts == {}
        assert [r.target for r in up.requests] == [
            b"/_matrix/1", b"/_matrix/2", b"/_matrix/3", b"/_matrix/4"]
