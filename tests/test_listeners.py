"""Several listeners at once: roles, prefix overrides, IPv4 and IPv6, over real sockets."""

from __future__ import annotations

from support.client import Conn, fetch, get
from support.gate import gate_toml, running_gate
from support.recorder import recorder

TWO_LISTENERS = """
[upstream]
url = "{upstream}"
[log]
access = "off"
[[listeners]]
name = "client"
bind = "127.0.0.1:0"
role = "client"
[[listeners]]
name = "federation"
bind = "[::1]:0"
role = "federation"
[[listeners]]
name = "custom"
bind = "127.0.0.1:0"
role = "client"
prefixes = ["/_matrix/client", "/custom"]
"""


async def test_roles_decide_the_forwarded_prefixes_per_listener() -> None:
    async with recorder() as up:
        async with running_gate(TWO_LISTENERS.format(upstream=f"http://127.0.0.1:{up.port}")) as g:
            addr = g.addresses()
            client, fed, custom = addr["client"][1], addr["federation"][1], addr["custom"][1]

            r = await fetch(client, get("/_palpo/client/v1/x"))
            assert r.status == 200
            assert up.requests[-1].request_line == b"GET /_palpo/client/v1/x HTTP/1.1"

            # The federation role forwards /_matrix only.
            r = await fetch(fed, get("/_palpo/client/v1/x"), host="::1")
            assert r.status == 404
            r = await fetch(fed, get("/_matrix/federation/v1/version"), host="::1")
            assert r.status == 200
            assert up.requests[-1].request_line == b"GET /_matrix/federation/v1/version HTTP/1.1"
            assert up.requests[-1].header("x-forwarded-for") == b"::1"

            # A prefix list replaces the role's list.
            before = len(up.requests)
            assert (await fetch(custom, get("/custom/a%2Fb"))).status == 200
            assert up.requests[-1].request_line == b"GET /custom/a%2Fb HTTP/1.1"
            assert (await fetch(custom, get("/_matrix/federation/v1/version"))).status == 404
            assert (await fetch(custom, get("/_palpo/client/x"))).status == 404
            assert len(up.requests) == before + 1


async def test_ipv6_listener_and_ipv6_upstream_forward_byte_exact() -> None:
    async with recorder(host="::1") as up:
        toml = gate_toml(f"http://[::1]:{up.port}", name="v6", bind="[::1]:0", role=None,
                         before='[admin]\nallow_from = ["::1"]')
        async with running_gate(toml) as g:
            port = g.addresses()["v6"][1]
            conn = await Conn.open(port, host="::1")
            try:
                r = await conn.request(get("/_matrix/x%2Fy?q=%3A", host="[::1]"))
                assert r.status == 200
                req = up.requests[-1]
                assert req.request_line == b"GET /_matrix/x%2Fy?q=%3A HTTP/1.1"
                assert req.header("host") == f"[::1]:{port}".encode()
                assert req.header("x-forwarded-for") == b"::1"
                # admin.allow_from matches an IPv6 client address.
                r = await conn.request(get("/_synapse/admin/v1/server_version", host="[::1]"))
                assert r.status == 200
                assert up.requests[-1].request_line == \
                    b"GET /_synapse/admin/v1/server_version HTTP/1.1"
            finally:
                await conn.close()


async def test_ipv4_client_is_not_in_an_ipv6_allow_list() -> None:
    async with recorder() as up:
        toml = gate_toml(f"http://127.0.0.1:{up.port}", name="v4", role=None,
                         before='[admin]\nallow_from = ["::1"]')
        async with running_gate(toml) as g:
            r = await fetch(g.addresses()["v4"][1], get("/_palpo/admin/x"))
            assert r.status == 403
            assert up.requests == []
