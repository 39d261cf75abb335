"""Real Matrix clients through the gate to a real homeserver.

Synapse (from PyPI, standing in for Palpo) behind ``palpo-gate`` started as a
real process with a TLS client listener and ``forwarding.buffer_chunked_uploads``
on. Synapse refuses chunked uploads ("Request must specify a Content-Length"),
so these tests show the option doing its job for the clients that send them:

- a chunked 20 MiB upload comes back by hash while the gate's own RSS stays
  flat;
- matrix-nio (PyPI): log in, sync, send, see the message through sync, upload
  with ``upload()`` and no file size (chunked, in 4 KiB pieces), download;
- matrix-js-sdk (npm, ``tests/js``): the same from Node.js.

The JS client needs Node.js and ``npm ci`` in ``tests/js`` (``.ci/run`` does
both); without them the test fails and says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import pathlib
import shutil
import ssl
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import nio
import pytest
import trustme
from support.gate import GateProcess, run_gate
from support.net import free_port
from support.synapse import SynapseServer, run_synapse

MiB = 1024 * 1024
PASSWORD = "correct horse battery staple"
JS_DIR = pathlib.Path(__file__).resolve().parent / "js"


@dataclasses.dataclass
class Deployment:
    url: str  # the gate's client listener, https://127.0.0.1:PORT
    ssl_context: ssl.SSLContext  # trusts the gate's certificate
    cafile: pathlib.Path
    gate: GateProcess
    synapse: SynapseServer

    def connection(self, timeout: float = 90) -> http.client.HTTPSConnection:
        u = urllib.parse.urlsplit(self.url)
        assert u.hostname and u.port
        return http.client.HTTPSConnection(u.hostname, u.port, context=self.ssl_context,
                                           timeout=timeout)

    def request(self, method: str, target: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        conn = self.connection()
        try:
            conn.request(method, target, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("clients")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    cert_path, key_path, cafile = (workdir / "fullchain.pem", workdir / "privkey.pem",
                                   workdir / "ca.pem")
    cert.private_key_pem.write_to_path(str(key_path))
    with cert_path.open("wb") as fh:
        for blob in cert.cert_chain_pems:
            fh.write(blob.bytes())
    ca.cert_pem.write_to_path(str(cafile))
    with run_synapse(workdir / "synapse") as hs:
        toml = f"""\
[upstream]
url = "{hs.url}"

[[listeners]]
name = "client"
bind = "127.0.0.1:{free_port()}"
role = "client"
[listeners.tls]
cert = "{cert_path}"
key = "{key_path}"

[forwarding]
buffer_chunked_uploads = true

[rate_limits]  # every client here registers and logs in from 127.0.0.1
login = "0"
register = "0"

[log]
access = "off"
"""
        with run_gate(toml, workdir / "gate") as gate:
            yield Deployment(f"https://127.0.0.1:{gate.port('client')}",
                             ssl.create_default_context(cafile=str(cafile)), cafile, gate, hs)


def register(dep: Deployment, prefix: str) -> str:
    """A new user (User-Interactive Auth, dummy stage); returns the user name."""
    username = f"{prefix}-{uuid.uuid4().hex[:8]}"
    target = "/_matrix/client/v3/register?kind=user"
    body = {"username": username, "password": PASSWORD}
    status, data = dep.request("POST", target, json.dumps(body).encode(),
                               {"Content-Type": "application/json"})
    assert status == 401, data
    session = json.loads(data)["session"]
    body["auth"] = {"type": "m.login.dummy", "session": session}
    status, data = dep.request("POST", target, json.dumps(body).encode(),
                               {"Content-Type": "application/json"})
    assert status == 200, data
    return username


def login(dep: Deployment, username: str) -> str:
    body = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": username},
            "password": PASSWORD}
    status, data = dep.request("POST", "/_matrix/client/v3/login", json.dumps(body).encode(),
                               {"Content-Type": "application/json"})
    assert status == 200, data
    return str(json.loads(data)["access_token"])


# -- a chunked 20 MiB upload, and the gate's memory ---------------------------------------


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class RssPeak:
    """Samples a process's RSS every 5 ms in a thread; ``growth`` is peak minus baseline."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = self.peak = rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss(self.pid))

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def chunked_upload(dep: Deployment, token: str, size: int, piece: int = 64 * 1024
                   ) -> tuple[int, bytes, str]:
    """Upload *size* generated bytes chunked (no Content-Length); (status, body, sha256)."""
    digest = hashlib.sha256()

    def pieces() -> Iterator[bytes]:
        sent = 0
        counter = 0
        while sent < size:
            block = hashlib.sha512(b"%d" % counter).digest() * (piece // 64)
            block = block[: size - sent]
            counter += 1
            sent += len(block)
            digest.update(block)
            yield block

    conn = dep.connection()
    try:
        # An iterable body and no Content-Length: http.client sends it chunked.
        conn.request("POST", "/_matrix/media/v3/upload?filename=big.bin", body=pieces(),
                     headers={"Authorization": f"Bearer {token}",
                              "Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        return resp.status, resp.read(), digest.hexdigest()
    finally:
        conn.close()


def download_sha256(dep: Deployment, token: str, mxc: str) -> tuple[int, int, str]:
    server_name, media_id = mxc[len("mxc://"):].split("/", 1)
    conn = dep.connection()
    try:
        conn.request("GET", f"/_matrix/client/v1/media/download/{server_name}/{media_id}",
                     headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        digest = hashlib.sha256()
        size = 0
        while data := resp.read(MiB):
            digest.update(data)
            size += len(data)
        return resp.status, size, digest.hexdigest()
    finally:
        conn.close()


@pytest.mark.timeout(180)
def test_chunked_20mib_upload_to_synapse_with_flat_gate_memory(deployment: Deployment) -> None:
    token = login(deployment, register(deployment, "big"))
    # Warm up every path the big upload takes (TLS, the pool, the temporary file).
    status, body, _ = chunked_upload(deployment, token, MiB)
    assert status == 200, body
    size = 20 * MiB
    with RssPeak(deployment.gate.proc.pid) as mem:
        t0 = time.monotonic()
        status, body, sent_sha = chunked_upload(deployment, token, size)
        t1 = time.monotonic()
    assert status == 200, body
    mxc = json.loads(body)["content_uri"]
    got_status, got_size, got_sha = download_sha256(deployment, token, mxc)
    print(f"\n[20 MiB chunked upload] {t1 - t0:.2f}s, gate RSS {mem.baseline / MiB:.1f} MiB"
          f" -> peak {mem.peak / MiB:.1f} MiB (+{mem.growth / MiB:.2f} MiB)")
    assert (got_status, got_size, got_sha) == (200, size, sent_sha)
    assert mem.growth < 5 * MiB, f"gate RSS grew by {mem.growth / MiB:.1f} MiB"


# -- matrix-nio ----------------------------------------------------------------------------


async def _nio_client(base_url: str, username: str, ctx: ssl.SSLContext) -> nio.AsyncClient:
    client = nio.AsyncClient(base_url, f"@{username}:hs.test", ssl=ctx)  # type: ignore[arg-type]
    resp = await client.login(PASSWORD, device_name="nio")
    assert isinstance(resp, nio.LoginResponse), resp
    return client


@pytest.mark.timeout(120)
async def test_matrix_nio_login_send_sync_upload(deployment: Deployment,
                                                 tmp_path: pathlib.Path) -> None:
    username = register(deployment, "nio")
    client = await _nio_client(deployment.url, username, deployment.ssl_context)
    try:
        first = await client.sync(timeout=0)
        assert isinstance(first, nio.SyncResponse), first
        room = await client.room_create(name="matrix-nio through the gate")
        assert isinstance(room, nio.RoomCreateResponse), room
        sent = await client.room_send(room.room_id, "m.room.message",
                                      {"msgtype": "m.text", "body": "hello from matrix-nio"})
        assert isinstance(sent, nio.RoomSendResponse), sent

        # Sync (a long-poll that returns once the message is there) until it is seen.
        since = first.next_batch
        seen: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while sent.event_id not in seen and time.monotonic() < deadline:
            sync = await client.sync(timeout=10_000, since=since)
            assert isinstance(sync, nio.SyncResponse), sync
            since = sync.next_batch
            joined = sync.rooms.join.get(room.room_id)
            for event in joined.timeline.events if joined else []:
                if isinstance(event, nio.RoomMessageText):
                    seen[event.event_id] = event.body
        assert seen.get(sent.event_id) == "hello from matrix-nio"

        # upload() with no file size sends the body chunked, in 4 KiB pieces.
        payload = os.urandom(2 * MiB + 123)
        path = tmp_path / "nio upload.bin"
        path.write_bytes(payload)
        with path.open("r+b") as fh:
            up, _ = await client.upload(fh, content_type="application/octet-stream",
                                        filename="nio upload.bin")
        assert isinstance(up, nio.UploadResponse), up
        assert up.content_uri.startswith("mxc://hs.test/")
        file_msg = await client.room_send(room.room_id, "m.room.message",
                                          {"msgtype": "m.file", "body": "nio upload.bin",
                                           "url": up.content_uri})
        assert isinstance(file_msg, nio.RoomSendResponse), file_msg

        down = await client.download(mxc=up.content_uri)
        assert isinstance(down, nio.DownloadResponse), down
        assert hashlib.sha256(down.body).hexdigest() == hashlib.sha256(payload).hexdigest()
        assert down.filename == "nio upload.bin"
    finally:
        await client.close()


@pytest.mark.timeout(60)
async def test_nio_upload_is_chunked_and_refused_by_synapse_without_the_gate(
        deployment: Deployment) -> None:
    """The case the option exists for: the same upload() straight to Synapse
    fails, because matrix-nio sends it without a Content-Length."""
    username = register(deployment, "niodirect")
    client = nio.AsyncClient(deployment.synapse.url, f"@{username}:hs.test")
    try:
        resp = await client.login(PASSWORD, device_name="nio direct")
        assert isinstance(resp, nio.LoginResponse), resp
        up, _ = await client.upload(lambda *_: b"x" * 10000, filename="direct.bin")
        assert isinstance(up, nio.UploadError), up
        assert "Content-Length" in up.message, up
    finally:
        await client.close()


# -- matrix-js-sdk ------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_matrix_js_sdk_login_send_sync_upload(deployment: Deployment) -> None:
    node = shutil.which("node")
    assert node, ("Node.js is not installed: the matrix-js-sdk test needs `node` on PATH "
                  "(Debian: apt-get install nodejs npm; .ci/run does it)")
    sdk = JS_DIR / "node_modules" / "matrix-js-sdk" / "package.json"
    assert sdk.is_file(), (f"matrix-js-sdk is not installed in {JS_DIR}: "
                           f"run `npm ci` there (.ci/run does it)")
    username = register(deployment, "js")
    env = {**os.environ, "NODE_EXTRA_CA_CERTS": str(deployment.cafile)}
    proc = subprocess.run([node, "client.mjs", deployment.url, username, PASSWORD],
                          cwd=JS_DIR, env=env, capture_output=True, text=True, timeout=150)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"node client.mjs exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}"
        f"\n--- stderr ---\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    print(f"\n[matrix-js-sdk] {json.dumps(result, indent=1)}")
    assert result["user_id"] == f"@{username}:hs.test"
    assert result["before"]["seen_body"] == "before sync from matrix-js-sdk"
    assert result["during"]["seen_body"] == "during sync from matrix-js-sdk"
    assert result["content_uri"].startswith("mxc://hs.test/")
    # authenticated media, through the gate
    assert result["download_url"].startswith(f"{deployment.url}/_matrix/client/v1/media/")
    assert result["download_status"] == 200
    assert result["got_sha256"] == result["sent_sha256"]

    # The room and the message are really on the homeserver (read back by another path).
    token = login(deployment, username)
    room = urllib.parse.quote(result["room_id"], safe="")
    event = urllib.parse.quote(result["during"]["event_id"], safe="")
    status, data = deployment.request("GET", f"/_matrix/client/v3/rooms/{room}/event/{event}",
                                      headers={"Authorization": f"Bearer {token}"})
    assert status == 200, data
    assert json.loads(data)["content"]["body"] == "during sync from matrix-js-sdk"

