"""What the gate's process carries: libraries only a configured feature needs
are not imported by a process that does not use them (each costs megabytes
of RSS), and the features still work when they are used; a held connection
keeps one copy of what it needs.

Imports are read the way an operator would check them: the real process
started with ``PYTHONPROFILEIMPORTTIME=1`` (``python -X importtime``), which
prints one line per module imported on stderr.
"""

from __future__ import annotations

import asyncio
import http.client
import pathlib
import re
import ssl

import uvloop
from support.client import Conn
from support.client import get as client_get
from support.gate import gate_toml, port_of, run_gate, running_gate
from support.net import free_port
from support.upstream_thread import threaded_upstream

#: Top-level packages a plain config (TCP and TLS listeners, the default
#: [rate_limits], no [acme], no strict SNI) must not load.
OPTIONAL = ("cryptography", "limits", "redis", "acme", "josepy", "dns", "requests")

_IMPORT_LINE = re.compile(r"import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)\s*$")


def imported(stderr_lines: list[str]) -> set[str]:
    """Every module the process imported, from its -X importtime lines."""
    return {m.group(1) for line in stderr_lines if (m := _IMPORT_LINE.search(line))}


def top_level(modules: set[str]) -> set[str]:
    return {name.split(".", 1)[0] for name in modules}


def plain_config(upstream_port: int, port: int, tls_port: int, tls_files: dict[str, str],
                 rate_limits: str = "") -> str:
    return gate_toml(
        f"http://127.0.0.1:{upstream_port}", bind=f"127.0.0.1:{port}",
        extra=f"""
[[listeners]]
name = "tls"
bind = "127.0.0.1:{tls_port}"
role = "client"
[listeners.tls]
cert = "{tls_files['default_cert']}"
key = "{tls_files['default_key']}"
{rate_limits}
""")


def get(conn: http.client.HTTPConnection, method: str, target: str) -> int:
    conn.request(method, target, body=b"{}" if method == "POST" else None)
    resp = conn.getresponse()
    resp.read()
    return resp.status


def test_plain_config_loads_no_optional_library(tmp_path: pathlib.Path,
                                                 tls_files: dict[str, str]) -> None:
    port, tls_port = free_port(), free_port()
    tls = ssl.create_default_context(cafile=tls_files["ca"])
    with threaded_upstream() as upstream, \
            run_gate(plain_config(upstream.port, port, tls_port, tls_files), tmp_path,
                     env={"PYTHONPROFILEIMPORTTIME": "1"}) as gp:
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        secure = http.client.HTTPSConnection("localhost", tls_port, timeout=10, context=tls)
        for conn in (plain, secure):
            assert get(conn, "GET", "/_matrix/client/versions") == 200
            conn.close()
    modules = imported(gp.stderr_lines)
    assert "palpo_gate.proxy" in modules  # the lines were read
    assert top_level(modules).isdisjoint(OPTIONAL), sorted(
        m for m in modules if m.split(".", 1)[0] in OPTIONAL)


def test_rate_limits_load_their_library_at_the_first_count(tmp_path: pathlib.Path,
                                                           tls_files: dict[str, str]) -> None:
    port, tls_port = free_port(), free_port()
    with threaded_upstream() as upstream, \
            run_gate(plain_config(upstream.port, port, tls_port, tls_files,
                                  '[rate_limits]\nlogin = "1/minute"'), tmp_path,
                     env={"PYTHONPROFILEIMPORTTIME": "1"}) as gp:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        assert get(conn, "GET", "/_matrix/client/versions") == 200
        loaded_before = "limits" in top_level(imported(gp.stderr_lines))
        assert get(conn, "POST", "/_matrix/client/v3/login") == 200
        assert get(conn, "POST", "/_matrix/client/v3/login") == 429
        conn.close()
    assert not loaded_before
    assert "limits" in top_level(imported(gp.stderr_lines))


def test_a_held_connection_keeps_one_copy_of_its_peer_address() -> None:
    """aiohttp asks the transport for the peer address again at the first
    request, and uvloop's transport (the gate's loop) makes a new tuple per
    call; a held long-poll keeps the one the gate read when the connection
    came, and still completes."""

    async def held() -> int:
        with threaded_upstream(sync_hold=1.0) as upstream:
            async with running_gate(gate_toml(upstream.url)) as gate:
                conn = await Conn.open(port_of(gate))
                await conn.send(client_get("/_matrix/client/v3/sync?timeout=30000", "localhost"))
                deadline = asyncio.get_running_loop().time() + 10
                while not upstream.requests:
                    assert asyncio.get_running_loop().time() < deadline, "never forwarded"
                    await asyncio.sleep(0.02)
                (_, server, _), = gate.servers
                handler, = server.connections
                assert handler.current_request is not None  # held
                assert handler.peername[0] is handler.client_addr
                assert handler.current_request.remote == "127.0.0.1"
                resp = await conn.read_response()
                await conn.close()
        return resp.status

    assert uvloop.run(held()) == 200
