"""End-to-end tests against a real Matrix homeserver (Synapse, standing in for Palpo).

Every request goes THROUGH palpo_gate, started as ``python -m palpo_gate``
(HTTPS client and federation listeners in front of Synapse).
``PALPO_GATE_E2E=direct`` talks to Synapse directly over plain HTTP instead,
which checks the tests themselves; it is never the default.

Requests are sent with ``http.client`` and a raw request target, so percent
escapes reach the server exactly as written here; anything that changes them
on the way (decoding, re-encoding, case changes) makes these tests fail.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import importlib
import importlib.util
import json
import os
import pathlib
import re
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import trustme
from support.net import free_port
from support.remote_hs import RemoteHomeserver, run_remote_hs
from support.synapse import SynapseServer, run_synapse

PASSWORD = "correct horse battery staple ü"


# --------------------------------------------------------------------------
# HTTP helpers: raw request target, exact bytes on the wire.


@dataclasses.dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.body[:500]!r}"


def http_request(
    base_url: str,
    method: str,
    target: str,
    *,
    body: bytes | None = None,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 30,
) -> Response:
    """Send one request; ``target`` goes on the request line unchanged."""
    url = urllib.parse.urlsplit(base_url)
    assert url.hostname and url.port
    conn: http.client.HTTPConnection
    if url.scheme == "https":
        conn = http.client.HTTPSConnection(
            url.hostname, url.port, context=ssl_context, timeout=timeout
        )
    else:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    hdrs = dict(headers or {})
    if json_body is not None:
        assert body is None
        body = json.dumps(json_body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, target, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.headers, data)
    finally:
        conn.close()


def q(s: str) -> str:
    """Percent-encode one path segment / query value (everything reserved)."""
    return urllib.parse.quote(s, safe="")


# --------------------------------------------------------------------------
# The base the tests talk to: palpo_gate in front of Synapse, or Synapse.


@dataclasses.dataclass
class HsBase:
    url: str  # client API base, scheme://host:port
    federation_url: str  # federation API base, scheme://host:port
    ssl_context: ssl.SSLContext | None  # trusts the gate's certificate (None: plain HTTP)
    cafile: str | None  # PEM of the CA that issued the gate's certificate
    server_name: str  # the homeserver's server_name (federation destination)
    via_gate: bool
    synapse: SynapseServer

    def request(self, method: str, target: str, **kw: Any) -> Response:
        return http_request(self.url, method, target, ssl_context=self.ssl_context, **kw)

    def federation_request(self, method: str, target: str, **kw: Any) -> Response:
        return http_request(self.federation_url, method, target, ssl_context=self.ssl_context, **kw)


def _gate_module() -> Any | None:
    """support.gate, or None when PALPO_GATE_E2E=direct (debugging the tests
    themselves against Synapse alone). The default always goes through the gate."""
    mode = os.environ.get("PALPO_GATE_E2E", "gate").lower()
    if mode not in ("gate", "direct"):
        raise pytest.UsageError(f"PALPO_GATE_E2E must be gate or direct, not {mode!r}")
    if mode == "direct":
        return None
    return importlib.import_module("support.gate")


def gate_config(
    upstream: str, client_bind: str, federation_bind: str, cert: pathlib.Path, key: pathlib.Path
) -> str:
    return f"""\
[upstream]
url = "{upstream}"

[[listeners]]
name = "client"
bind = "{client_bind}"
role = "client"
[listeners.tls]
cert = "{cert}"
key = "{key}"

[[listeners]]
name = "federation"
bind = "{federation_bind}"
role = "federation"
[listeners.tls]
cert = "{cert}"
key = "{key}"

[rate_limits]  # every test user registers and logs in from 127.0.0.1
login = "0"
register = "0"
password = "0"
"""


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def synapse_hs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseServer]:
    workdir = tmp_path_factory.mktemp("synapse")
    with run_synapse(workdir) as hs:
        yield hs


@pytest.fixture(scope="module")
def hs_base(
    synapse_hs: SynapseServer, tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HsBase]:
    gate = _gate_module()
    if gate is None:
        print(f"\n[test_synapse] talking to Synapse directly at {synapse_hs.url}")
        yield HsBase(
            url=synapse_hs.url,
            federation_url=synapse_hs.url,
            ssl_context=None,
            cafile=None,
            server_name=synapse_hs.server_name,
            via_gate=False,
            synapse=synapse_hs,
        )
        return

    workdir = tmp_path_factory.mktemp("gate")
    cert = tls_ca.issue_cert("localhost", "127.0.0.1", "::1")
    cert_path = workdir / "fullchain.pem"
    key_path = workdir / "privkey.pem"
    cafile = workdir / "ca.pem"
    cert.private_key_pem.write_to_path(str(key_path))
    with cert_path.open("wb") as fh:
        for blob in cert.cert_chain_pems:
            fh.write(blob.bytes())
    tls_ca.cert_pem.write_to_path(str(cafile))
    config = gate_config(
        synapse_hs.url,
        f"127.0.0.1:{free_port()}",
        f"127.0.0.1:{free_port()}",
        cert_path,
        key_path,
    )
    ctx = ssl.create_default_context(cafile=str(cafile))
    with gate.run_gate(config, workdir) as running:
        client_port = running.port("client")
        federation_port = running.port("federation")
        print(
            f"\n[test_synapse] through palpo_gate: client https://127.0.0.1:{client_port},"
            f" federation https://127.0.0.1:{federation_port} -> {synapse_hs.url}"
        )
        yield HsBase(
            url=f"https://127.0.0.1:{client_port}",
            federation_url=f"https://127.0.0.1:{federation_port}",
            ssl_context=ctx,
            cafile=str(cafile),
            server_name=synapse_hs.server_name,
            via_gate=True,
            synapse=synapse_hs,
        )


# --------------------------------------------------------------------------
# Matrix client helpers.


@dataclasses.dataclass
class User:
    base: HsBase
    username: str
    user_id: str
    access_token: str
    device_id: str

    def call(
        self, method: str, target: str, json_body: Any = None, expect: int = 200, **kw: Any
    ) -> Any:
        headers = dict(kw.pop("headers", {}) or {})
        headers["Authorization"] = f"Bearer {self.access_token}"
        if json_body is None and method in ("POST", "PUT") and "body" not in kw:
            json_body = {}
        resp = self.base.request(method, target, json_body=json_body, headers=headers, **kw)
        assert resp.status == expect, f"{method} {target}: {resp}"
        return resp.json() if resp.body else None


def register(base: HsBase, username: str, password: str = PASSWORD) -> dict[str, Any]:
    """Register through the User-Interactive Auth dummy flow."""
    target = "/_matrix/client/v3/register?kind=user"
    first = base.request("POST", target, json_body={"username": username, "password": password})
    assert first.status == 401, f"expected a UIA challenge: {first}"
    challenge = first.json()
    assert any(flow["stages"] == ["m.login.dummy"] for flow in challenge["flows"]), challenge
    second = base.request(
        "POST",
        target,
        json_body={
            "username": username,
            "password": password,
            "auth": {"type": "m.login.dummy", "session": challenge["session"]},
            "initial_device_display_name": f"{username} register",
        },
    )
    assert second.status == 200, f"register {username}: {second}"
    return second.json()


def login(base: HsBase, username: str, password: str = PASSWORD) -> User:
    resp = base.request(
        "POST",
        "/_matrix/client/v3/login",
        json_body={
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": username},
            "password": password,
            "initial_device_display_name": f"{username} login",
        },
    )
    assert resp.status == 200, f"login {username}: {resp}"
    data = resp.json()
    return User(base, username, data["user_id"], data["access_token"], data["device_id"])


def new_user(base: HsBase, prefix: str) -> User:
    username = f"{prefix}-{uuid.uuid4().hex[:8]}"
    register(base, username)
    return login(base, username)


@pytest.fixture(scope="module")
def alice(hs_base: HsBase) -> User:
    return new_user(hs_base, "alice")


@pytest.fixture(scope="module")
def bob(hs_base: HsBase) -> User:
    return new_user(hs_base, "bob")


@pytest.fixture(scope="module")
def shared_room(alice: User, bob: User) -> str:
    """A private room alice created and bob joined."""
    room_id = alice.call(
        "POST",
        "/_matrix/client/v3/createRoom",
        {"preset": "private_chat", "name": "shared", "invite": [bob.user_id]},
    )["room_id"]
    bob.call("POST", f"/_matrix/client/v3/join/{q(room_id)}", {})
    return room_id


@pytest.fixture(scope="module")
def remote(tls_ca: trustme.CA) -> Iterator[RemoteHomeserver]:
    with run_remote_hs(tls_ca) as r:
        yield r


def send_text(user: User, room_id: str, txn_raw: str, body: str) -> str:
    """PUT a text message; ``txn_raw`` is already percent-encoded as it goes on the wire."""
    target = f"/_matrix/client/v3/rooms/{q(room_id)}/send/m.room.message/{txn_raw}"
    data = user.call("PUT", target, {"msgtype": "m.text", "body": body})
    assert data["event_id"].startswith("$"), data
    return data["event_id"]


# --------------------------------------------------------------------------
# The tests.


@pytest.mark.timeout(120)
def test_register_login_whoami(hs_base: HsBase) -> None:
    users = []
    for prefix in ("carol", "dave"):
        username = f"{prefix}-{uuid.uuid4().hex[:8]}"
        reg = register(hs_base, username)
        assert reg["user_id"] == f"@{username}:{hs_base.server_name}"
        assert reg["access_token"]
        user = login(hs_base, username)
        assert user.user_id == reg["user_id"]
        assert user.access_token != reg["access_token"]  # a new device, a new token
        users.append(user)

    for user in users:
        who = user.call("GET", "/_matrix/client/v3/account/whoami")
        assert who["user_id"] == user.user_id
        assert who["device_id"] == user.device_id

    # A wrong password is refused; a missing token is refused.
    bad = hs_base.request(
        "POST",
        "/_matrix/client/v3/login",
        json_body={
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": users[0].username},
            "password": "wrong",
        },
    )
    assert bad.status == 403 and bad.json()["errcode"] == "M_FORBIDDEN", bad
    anon = hs_base.request("GET", "/_matrix/client/v3/account/whoami")
    assert anon.status == 401 and anon.json()["errcode"] == "M_MISSING_TOKEN", anon


@pytest.mark.timeout(60)
def test_room_alias_with_escapes(hs_base: HsBase, alice: User, bob: User) -> None:
    # Characters a naive proxy mangles: '#', '/', '?', '&', '=', '+', '%', non-ASCII.
    localpart = f"room#1/ü?&=+%é-{uuid.uuid4().hex[:6]}"
    alias = f"#{localpart}:{hs_base.server_name}"
    created = alice.call(
        "POST",
        "/_matrix/client/v3/createRoom",
        {"preset": "public_chat", "room_alias_name": localpart, "name": "escapes"},
    )
    room_id = created["room_id"]

    # GET /directory/room/%23room%231%2F%C3%BC%3F%26%3D%2B%25%C3%A9-...%3Ahs.test
    encoded = q(alias)
    assert "%2F" in encoded and "%3F" in encoded and "%25" in encoded and "%C3%BC" in encoded
    resolved = bob.call("GET", f"/_matrix/client/v3/directory/room/{encoded}")
    assert resolved["room_id"] == room_id
    assert hs_base.server_name in resolved["servers"]

    # Unauthenticated resolution works too (it is a public endpoint).
    anon = hs_base.request("GET", f"/_matrix/client/v3/directory/room/{encoded}")
    assert anon.status == 200 and anon.json()["room_id"] == room_id, anon

    # An alias that differs only by one escaped byte does not exist.
    other = q(f"#{localpart}x:{hs_base.server_name}")
    missing = hs_base.request("GET", f"/_matrix/client/v3/directory/room/{other}")
    assert missing.status == 404 and missing.json()["errcode"] == "M_NOT_FOUND", missing

    joined = bob.call("POST", f"/_matrix/client/v3/join/{encoded}", {})
    assert joined["room_id"] == room_id

    members = alice.call("GET", f"/_matrix/client/v3/rooms/{q(room_id)}/joined_members")
    assert set(members["joined"]) == {alice.user_id, bob.user_id}

    canonical = bob.call(
        "GET", f"/_matrix/client/v3/rooms/{q(room_id)}/state/m.room.canonical_alias/"
    )
    assert canonical["alias"] == alias


@pytest.mark.timeout(60)
def test_send_with_escaped_txn_ids(
    hs_base: HsBase, alice: User, bob: User, shared_room: str
) -> None:
    # (raw txn id, as it goes on the wire)
    txns = [
        ("a/b?c%dü", "a%2Fb%3Fc%25d%C3%BC"),
        ("x y+z&k=v#f", "x%20y+z%26k%3Dv%23f"),
        ("semi;colon,comma~tilde", "semi%3Bcolon%2Ccomma~tilde"),
        # Client-chosen strings with /../ inside: quote(txn, safe="") encodes the
        # slashes, so these are not dot segments and must reach the homeserver.
        ("a%2Fb%20c/../d", "a%252Fb%2520c%2F..%2Fd"),
        ("../../x", "..%2F..%2Fx"),
        ("./y/./z", ".%2Fy%2F.%2Fz"),
        ("tail/..", "tail%2F.."),
        (f"plain-{uuid.uuid4().hex}", None),
    ]
    sent: dict[str, str] = {}  # body -> event id
    for raw, wire in txns:
        wire = wire or raw
        assert urllib.parse.unquote(wire) == raw
        body = f"message with txn {raw!r}"
        event_id = send_text(alice, shared_room, wire, body)
        # Same txn id again -> same event: the txn id arrived byte-exact, both times.
        again = send_text(alice, shared_room, wire, body)
        assert again == event_id, f"txn {wire!r} not idempotent: {event_id} vs {again}"
        sent[body] = event_id

        # The sender's own device sees its transaction id in `unsigned`.
        event = alice.call("GET", f"/_matrix/client/v3/rooms/{q(shared_room)}/event/{q(event_id)}")
        assert event["content"]["body"] == body
        assert event.get("unsigned", {}).get("transaction_id") == raw, event

    assert len(set(sent.values())) == len(txns)

    # Bob sees every message once, in order, via /messages (filter in the query, escaped).
    flt = q(json.dumps({"types": ["m.room.message"]}, separators=(",", ":")))
    page = bob.call(
        "GET",
        f"/_matrix/client/v3/rooms/{q(shared_room)}/messages?dir=b&limit=50&filter={flt}",
    )
    seen = {
        ev["content"]["body"]: ev["event_id"]
        for ev in page["chunk"]
        if ev["type"] == "m.room.message"
    }
    assert seen == sent
    bodies_in_order = [ev["content"]["body"] for ev in reversed(page["chunk"])]
    assert bodies_in_order == list(sent)


@pytest.mark.timeout(60)
def test_state_keys_with_dot_segments(hs_base: HsBase, alice: User, bob: User,
                                      shared_room: str) -> None:
    # State keys are client-chosen strings too; one that looks like a URL with
    # /../ in it goes on the wire as https%3A%2F%2Fexample.org%2F..%2Fx.
    keys = ["https://example.org/../x", "../..", "a/./b/../c", f"k-{uuid.uuid4().hex[:6]}"]
    room = q(shared_room)
    for i, key in enumerate(keys):
        wire = q(key)
        assert "/" not in wire
        put = alice.call("PUT", f"/_matrix/client/v3/rooms/{room}/state/org.example.link/{wire}",
                         {"n": i, "key": key})
        assert put["event_id"].startswith("$"), put
        # Read back by the same escaped path, by another user.
        got = bob.call("GET", f"/_matrix/client/v3/rooms/{room}/state/org.example.link/{wire}")
        assert got == {"n": i, "key": key}
    # The room state holds each key exactly as sent, byte for byte, and nothing else.
    state = bob.call("GET", f"/_matrix/client/v3/rooms/{room}/state")
    links = {ev["state_key"]: ev["content"] for ev in state if ev["type"] == "org.example.link"}
    assert links == {key: {"n": i, "key": key} for i, key in enumerate(keys)}


@pytest.mark.timeout(60)
def test_sync_long_poll(hs_base: HsBase, alice: User, bob: User, shared_room: str) -> None:
    sync_filter = q(
        json.dumps(
            {
                "room": {
                    "rooms": [shared_room],
                    "timeline": {"limit": 10, "types": ["m.room.message"]},
                    "state": {"types": []},
                    "ephemeral": {"types": []},
                    "account_data": {"types": []},
                },
                "presence": {"types": []},
                "account_data": {"types": []},
            },
            separators=(",", ":"),
        )
    )
    first = bob.call("GET", f"/_matrix/client/v3/sync?filter={sync_filter}&timeout=0")
    since = first["next_batch"]

    result: dict[str, Any] = {}
    done = threading.Event()

    def poll() -> None:
        try:
            started = time.monotonic()
            result["started"] = started
            result["data"] = bob.call(
                "GET",
                f"/_matrix/client/v3/sync?filter={sync_filter}&since={q(since)}&timeout=5000",
                timeout=20,
            )
            result["returned"] = time.monotonic()
        except BaseException as exc:  # surfaced in the main thread below
            result["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=poll, name="sync-long-poll")
    thread.start()
    try:
        time.sleep(1.0)
        assert not done.is_set(), f"/sync returned before anything happened: {result}"
        send_started = time.monotonic()
        body = f"wake up {uuid.uuid4().hex}"
        event_id = send_text(alice, shared_room, f"wake-{uuid.uuid4().hex}", body)
        assert done.wait(10), "/sync did not return after the message was sent"
    finally:
        thread.join(20)
    if "error" in result:
        raise result["error"]

    held = send_started - result["started"]
    total = result["returned"] - result["started"]
    after_send = result["returned"] - send_started
    print(f"\n[sync] held {held:.2f}s, returned {after_send:.3f}s after the send")
    assert held >= 0.9
    assert result["returned"] > send_started
    assert total < 4.0, f"/sync took {total:.2f}s: it did not wake up on the new message"

    timeline = result["data"]["rooms"]["join"][shared_room]["timeline"]["events"]
    assert [(ev["event_id"], ev["content"]["body"]) for ev in timeline] == [(event_id, body)]
    assert result["data"]["next_batch"] != since


@pytest.mark.timeout(120)
def test_media_upload_download_20mib(hs_base: HsBase, alice: User, bob: User) -> None:
    payload = os.urandom(20 * 1024 * 1024)
    digest = hashlib.sha256(payload).hexdigest()
    filename = "résumé #1?.bin"
    t0 = time.monotonic()
    up = alice.call(
        "POST",
        f"/_matrix/media/v3/upload?filename={q(filename)}",
        body=payload,
        headers={"Content-Type": "application/octet-stream"},
        timeout=90,
    )
    t1 = time.monotonic()
    mxc = up["content_uri"]
    assert mxc.startswith(f"mxc://{hs_base.server_name}/"), up
    server_name, media_id = mxc[len("mxc://") :].split("/", 1)

    resp = hs_base.request(
        "GET",
        f"/_matrix/client/v1/media/download/{q(server_name)}/{q(media_id)}",
        headers={"Authorization": f"Bearer {bob.access_token}"},
        timeout=90,
    )
    t2 = time.monotonic()
    print(f"\n[media] upload {t1 - t0:.2f}s, download {t2 - t1:.2f}s")
    assert resp.status == 200, resp
    assert len(resp.body) == len(payload)
    assert hashlib.sha256(resp.body).hexdigest() == digest
    assert resp.headers.get("Content-Length") == str(len(payload))
    # The escaped filename from the upload query came back intact.
    disposition = resp.headers.get("Content-Disposition", "")
    print(f"[media] Content-Disposition: {disposition}")
    match = re.search(r"filename\*=utf-8''([^;\s]+)", disposition, re.IGNORECASE)
    assert match, disposition
    assert urllib.parse.unquote(match.group(1)) == filename, disposition

    # Authenticated media: no token, no bytes.
    anon = hs_base.request(
        "GET", f"/_matrix/client/v1/media/download/{q(server_name)}/{q(media_id)}"
    )
    assert anon.status == 401, anon


def _corrupt(sig_header: str) -> str:
    """Flip one character in the middle of the sig="..." value."""
    start = sig_header.index('sig="') + len('sig="')
    end = sig_header.index('"', start)
    mid = (start + end) // 2
    flipped = "A" if sig_header[mid] != "A" else "B"
    return sig_header[:mid] + flipped + sig_header[mid + 1 :]


@pytest.mark.timeout(90)
def test_federation_signed_requests(hs_base: HsBase, alice: User, remote: RemoteHomeserver) -> None:
    dest = hs_base.server_name
    room_id = alice.call(
        "POST",
        "/_matrix/client/v3/createRoom",
        {"preset": "public_chat", "name": "federated", "room_version": "10"},
    )["room_id"]
    remote_user = f"@fed-user:{remote.server_name}"

    # make_join: the room id and user id are escaped in the path (%21 %3A %40).
    make_join = f"/_matrix/federation/v1/make_join/{q(room_id)}/{q(remote_user)}?ver=10&ver=11"
    assert "%21" in make_join and "%40" in make_join and "%3A" in make_join
    auth = remote.sign_request("GET", make_join, dest)
    resp = hs_base.federation_request("GET", make_join, headers={"Authorization": auth})
    assert resp.status == 200, f"make_join: {resp}\n{hs_base.synapse.log_tail(30)}"
    data = resp.json()
    assert data["room_version"] == "10"
    event = data["event"]
    assert event["type"] == "m.room.member"
    assert event["room_id"] == room_id
    assert event["state_key"] == remote_user
    assert event["sender"] == remote_user
    assert event["content"]["membership"] == "join"
    # Synapse fetched the remote's key to check the signature.
    assert ("GET", "/_matrix/key/v2/server") in remote.requests, remote.requests

    # Profile query: escapes in the query string. Set a displayname that needs them.
    displayname = "Alice ü/?&=%"
    alice.call(
        "PUT",
        f"/_matrix/client/v3/profile/{q(alice.user_id)}/displayname",
        {"displayname": displayname},
    )
    profile = f"/_matrix/federation/v1/query/profile?user_id={q(alice.user_id)}&field=displayname"
    assert "%40" in profile and "%3A" in profile
    auth = remote.sign_request("GET", profile, dest)
    resp = hs_base.federation_request("GET", profile, headers={"Authorization": auth})
    assert resp.status == 200, f"query/profile: {resp}"
    assert resp.json() == {"displayname": displayname}

    # A corrupted signature is refused: the check is real.
    resp = hs_base.federation_request("GET", profile, headers={"Authorization": _corrupt(auth)})
    assert resp.status == 401, f"corrupted signature accepted: {resp}"
    assert resp.json()["errcode"] == "M_UNAUTHORIZED", resp

    # A valid signature over a differently-escaped URI (what a re-encoding proxy
    # would produce: lower-case escapes) is refused as well.
    reencoded = profile.replace("%3A", "%3a")
    assert reencoded != profile
    auth_other = remote.sign_request("GET", reencoded, dest)
    resp = hs_base.federation_request("GET", profile, headers={"Authorization": auth_other})
    assert resp.status == 401, f"signature over another URI accepted: {resp}"

    # POST with a signed JSON body: the body is part of what is signed.
    room_dir = "/_matrix/federation/v1/publicRooms"
    content = {"limit": 10, "filter": {"generic_search_term": "federated"}}
    auth = remote.sign_request("POST", room_dir, dest, content)
    resp = hs_base.federation_request(
        "POST", room_dir, json_body=content, headers={"Authorization": auth}
    )
    assert resp.status == 200, f"publicRooms: {resp}"
    assert isinstance(resp.json()["chunk"], list)
    tampered = dict(content, limit=11)
    resp = hs_base.federation_request(
        "POST", room_dir, json_body=tampered, headers={"Authorization": auth}
    )
    assert resp.status == 401, f"signature over another body accepted: {resp}"

    # No Authorization at all.
    resp = hs_base.federation_request("GET", profile)
    assert resp.status == 401, resp
