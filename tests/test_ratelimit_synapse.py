"""Per-client login limits in front of a real homeserver (Synapse, standing in
for Palpo, with its own limits off): through the gate, one address is
limited and another is not, the homeserver never sees a refused attempt, and
it sees each client's own address in X-Forwarded-For.

The gate runs as ``python -m palpo_gate``; clients connect from 127.0.0.2,
127.0.0.3, ... to be separate addresses.
"""

from __future__ import annotations

import http.client
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from support.gate import run_gate
from support.net import free_port
from support.synapse import SynapseServer, run_synapse

PASSWORD = "correct horse battery staple"


def call(port: int, method: str, target: str, body: Any = None, source: str = "127.0.0.1",
         token: str | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30,
                                      source_address=(source, 0))
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, target, body=None if body is None else json.dumps(body).encode(),
                     headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else None
    finally:
        conn.close()


@pytest.fixture(scope="module")
def synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseServer]:
    with run_synapse(tmp_path_factory.mktemp("synapse")) as hs:
        yield hs


@pytest.fixture(scope="module")
def gate_port(synapse: SynapseServer, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[int]:
    port = free_port()
    config = f"""
[upstream]
url = "{synapse.url}"
[log]
access = "off"
[[listeners]]
name = "client"
bind = "127.0.0.1:{port}"
[rate_limits]
login = "3/minute"
register = "4/minute"
"""
    with run_gate(config, tmp_path_factory.mktemp("gate")):
        yield port


def register(port: int, source: str) -> str:
    username = f"u{uuid.uuid4().hex[:10]}"
    target = "/_matrix/client/v3/register?kind=user"
    status, challenge = call(port, "POST", target, {"username": username,
                                                    "password": PASSWORD}, source)
    assert status == 401, challenge
    status, done = call(port, "POST", target, {
        "username": username, "password": PASSWORD,
        "auth": {"type": "m.login.dummy", "session": challenge["session"]}}, source)
    assert status == 200, done
    return username


def login(port: int, username: str, source: str, password: str = PASSWORD) -> tuple[int, Any]:
    return call(port, "POST", "/_matrix/client/v3/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": username},
        "password": password}, source)


def synapse_logins(synapse: SynapseServer, source: str) -> int:
    """Login requests Synapse processed from the client address *source*
    (Synapse logs the X-Forwarded-For address: its listener has x_forwarded)."""
    text = synapse.log_path.read_text(errors="replace")
    return sum(1 for line in text.splitlines()
               if "Processed request" in line and "/_matrix/client/v3/login" in line
               and f" - {source} - " in line)


@pytest.mark.timeout(180)
def test_login_limited_per_address_through_the_gate(synapse: SynapseServer,
                                                    gate_port: int) -> None:
    user = register(gate_port, "127.0.0.5")
    # Password guessing from one address: the homeserver answers the first
    # three, the gate refuses the rest, right password or not.
    for _ in range(3):
        status, body = login(gate_port, user, "127.0.0.2", "wrong password")
        assert status == 403 and body["errcode"] == "M_FORBIDDEN", body
    status, body = login(gate_port, user, "127.0.0.2")
    assert status == 429, body
    assert body["errcode"] == "M_LIMIT_EXCEEDED" and body["retry_after_ms"] > 0
    # The user logs in from their own address, unaffected.
    status, body = login(gate_port, user, "127.0.0.3")
    assert status == 200, body
    token = body["access_token"]
    status, body = call(gate_port, "GET", "/_matrix/client/v3/account/whoami", source="127.0.0.3",
                        token=token)
    assert status == 200 and body["user_id"].startswith(f"@{user}:"), body
    # The limited address still reaches the homeserver for everything else.
    status, body = call(gate_port, "GET", "/_matrix/client/v3/login", source="127.0.0.2")
    assert status == 200 and body["flows"], body
    status, body = call(gate_port, "GET", "/_matrix/client/v3/account/whoami",
                        source="127.0.0.2", token=token)
    assert status == 200, body
    # Synapse saw each client's own address, and never the refused attempt.
    assert synapse_logins(synapse, "127.0.0.2") == 4  # three POSTs and the GET
    assert synapse_logins(synapse, "127.0.0.3") == 1


@pytest.mark.timeout(180)
def test_registration_limited_per_address_through_the_gate(gate_port: int) -> None:
    register(gate_port, "127.0.0.6")  # two requests: the challenge and the answer
    register(gate_port, "127.0.0.6")
    status, body = call(gate_port, "POST", "/_matrix/client/v3/register?kind=user",
                        {"username": "x" + uuid.uuid4().hex[:8], "password": PASSWORD},
                        "127.0.0.6")
    assert status == 429 and body["errcode"] == "M_LIMIT_EXCEEDED", body
    register(gate_port, "127.0.0.7")
