"""Delegation over real sockets (docs/DESIGN.md sections 2 and 4): with ``[well_known]`` the
gate answers ``/.well-known/matrix/server`` and ``/client`` itself, with the
CORS headers of the Matrix spec's recommended values, on every listener; without it the
same paths are forwarded to Palpo byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from support.client import Conn, Resp, fetch, get
from support.gate import gate_toml, port_of, running_gate
from support.recorder import Recorder, recorder

from palpo_gate.generation import Gate

WELL_KNOWN = """
[well_known]
server = "matrix.example.com:443"
client = "https://matrix.example.com"
identity_server = "https://identity.example.com"
[well_known.client_extra]
"org.example" = "x"
"""

#: A second listener with the federation role (its prefixes are only /_matrix).
FEDERATION = """
[[listeners]]
name = "fed"
bind = "127.0.0.1:0"
role = "federation"
"""

SERVER_DOC = {"m.server": "matrix.example.com:443"}
CLIENT_DOC = {
    "m.homeserver": {"base_url": "https://matrix.example.com"},
    "m.identity_server": {"base_url": "https://identity.example.com"},
    "org.example": "x",
}
DOCS = {"/.well-known/matrix/server": SERVER_DOC, "/.well-known/matrix/client": CLIENT_DOC}
LISTENERS = ("main", "fed")


@contextlib.asynccontextmanager
async def gate_with(extra: str) -> AsyncIterator[tuple[Recorder, Gate]]:
    async with recorder() as up:
        async with running_gate(gate_toml(f"http://127.0.0.1:{up.port}",
                                          extra=extra + FEDERATION)) as gate:
            yield up, gate


def assert_cors(resp: Resp) -> None:
    """The CORS headers of the Matrix spec's recommended values (docs/DESIGN.md section 4)."""
    assert resp.header("access-control-allow-origin") == "*"
    assert resp.header("access-control-allow-methods") == "GET, POST, PUT, DELETE, OPTIONS"
    allowed = {h.strip().lower()
               for h in (resp.header("access-control-allow-headers") or "").split(",")}
    assert allowed == {"origin", "x-requested-with", "content-type", "accept",
                       "authorization"}, allowed


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("path", list(DOCS))
async def test_documents_are_served(listener: str, path: str) -> None:
    async with gate_with(WELL_KNOWN) as (up, gate):
        resp = await fetch(port_of(gate, listener), get(path, host="example.com"))
        assert resp.status == 200
        assert json.loads(resp.body) == DOCS[path]
        assert (resp.header("content-type") or "").split(";")[0].strip() == "application/json"
        assert_cors(resp)
        assert resp.header("cache-control") == "public, max-age=3600"
        assert resp.header("content-length") == str(len(resp.body))
        await asyncio.sleep(0.05)
        assert up.requests == []


@pytest.mark.parametrize("listener", LISTENERS)
async def test_preflight_is_204_with_cors(listener: str) -> None:
    async with gate_with(WELL_KNOWN) as (up, gate):
        port = port_of(gate, listener)
        for path in DOCS:
            resp = await fetch(port, get(
                path, host="example.com", method="OPTIONS",
                extra="Origin: https://app.element.io\r\n"
                      "Access-Control-Request-Method: GET\r\n"
                      "Access-Control-Request-Headers: authorization\r\n"))
            assert resp.status == 204
            assert_cors(resp)
            assert resp.body == b""
        assert up.requests == []


async def test_head_has_no_body() -> None:
    async with gate_with(WELL_KNOWN) as (up, gate):
        resp = await fetch(port_of(gate), get("/.well-known/matrix/client", host="example.com",
                                              method="HEAD"))
        assert resp.status == 200
        assert resp.body == b""
        assert up.requests == []


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_other_methods_are_405(method: str) -> None:
    async with gate_with(WELL_KNOWN) as (up, gate):
        for path in DOCS:
            resp = await fetch(port_of(gate), get(path, host="example.com", method=method,
                                                  extra="Content-Length: 2\r\n") + b"{}")
            assert resp.status == 405, (path, resp.status)
            assert_cors(resp)  # a browser must see the 405, not a CORS failure
        assert up.requests == []


async def test_keep_alive_serves_both_documents_in_turn() -> None:
    async with gate_with(WELL_KNOWN) as (up, gate):
        conn = await Conn.open(port_of(gate, "fed"))
        try:
            for path in (*DOCS, *DOCS):
                resp = await conn.request(get(path, host="example.com"))
                assert resp.status == 200 and json.loads(resp.body) == DOCS[path]
        finally:
            await conn.close()
        assert up.requests == []


@pytest.mark.parametrize("listener", LISTENERS)
async def test_without_well_known_the_paths_are_forwarded_raw(listener: str) -> None:
    async with gate_with("") as (up, gate):
        port = port_of(gate, listener)
        targets = ["/.well-known/matrix/server", "/.well-known/matrix/client?x=%2F&y=%7e"]
        for target in targets:
            resp = await fetch(port, get(target, host="example.com"))
            assert resp.status == 200
            assert resp.json() == {"target": target, "len": 0}  # the recorder's echo
        # A CORS preflight is the gate's own answer on every Matrix path
        # (tests/test_browser.py), forwarded documents included.
        options = await fetch(port, get(targets[0], host="example.com", method="OPTIONS"))
        assert options.status == 204
        assert_cors(options)
        assert [r.target for r in up.requests] == [t.encode() for t in targets]
        assert [r.method for r in up.requests] == [b"GET", b"GET"]
