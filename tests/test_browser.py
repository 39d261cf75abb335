"""Browser clients and CORS preflights: over a plain socket, and in a real Chromium.

A browser preflights every cross-origin request that carries ``Authorization``
or a JSON ``Content-Type`` (every authenticated Element request) with an
``OPTIONS``, and rejects any non-2xx answer to it: the script then sees
``TypeError: Failed to fetch`` instead of the real response. The gate answers
these ``OPTIONS`` itself on Matrix paths (the Matrix client-server spec, "Web
Browser Clients": CORS headers and no endpoint logic), so that while Palpo is
down the script still reads the gate's 502 and its Matrix JSON.

The browser test drives Debian's ``chromium`` headless; it fails, never skips,
when chromium is missing (``.ci/run`` installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO

import pytest
from aiohttp import web
from support.client import Conn, Resp, fetch, get
from support.gate import gate_toml, port_of
from support.net import free_port
from support.recorder import recorder

from palpo_gate import config as configmod
from palpo_gate.errors import error_body
from palpo_gate.generation import Gate
from palpo_gate.metrics import Registry
from palpo_gate.wellknown import CORS_HEADERS

PREFLIGHT = ("Origin: http://app.example\r\n"
             "Access-Control-Request-Method: GET\r\n"
             "Access-Control-Request-Headers: authorization\r\n")


def toml(upstream: str, *, access: str = "off", main: str = "", extra: str = "") -> str:
    """A client listener "main" and a federation listener "fed", both on port 0."""
    return gate_toml(upstream, upstream_keys='connect_timeout = "2s"', access=access,
                     listener=main, extra='[[listeners]]\nname = "fed"\nbind = "127.0.0.1:0"\n'
                     f'role = "federation"\n{extra}')


@contextlib.asynccontextmanager
async def gate_on(text: str, metrics: Registry | None = None) -> AsyncIterator[Gate]:
    gate = Gate(configmod.loads(text), metrics=metrics)
    await gate.start()
    try:
        yield gate
    finally:
        await gate.close(0)


def assert_preflight_answer(resp: Resp) -> None:
    """204 with exactly the CORS headers of every Matrix answer, and no body."""
    assert resp.status == 204, (resp.status, resp.body)
    for name, value in CORS_HEADERS:
        assert resp.header_all(name) == [value], name
    allowed = {h.strip().lower()
               for h in (resp.header("access-control-allow-headers") or "").split(",")}
    # What Element and matrix-js-sdk send on a cross-origin request.
    assert {"authorization", "content-type", "x-requested-with", "accept"} <= allowed
    assert resp.body == b""
    assert parsedate_to_datetime(resp.header("date") or "").tzinfo is not None
    assert resp.header("content-length") in (None, "0")
    assert resp.header("transfer-encoding") is None


# -- over a plain socket -------------------------------------------------------------

MATRIX_TARGETS = [
    ("main", "/_matrix/client/v3/sync?since=s1_2&timeout=30000"),
    ("main", "/_matrix/client/v3/login"),
    ("main", "/_matrix/client/v3/rooms/%21r%3Ahs/send/m.room.message/t1"),
    ("main", "/_matrix/media/v3/upload"),
    ("main", "/_palpo/client/x"),
    ("main", "/.well-known/matrix/client"),  # forwarded: no [well_known] here
    ("fed", "/_matrix/federation/v1/version"),
]


@pytest.mark.parametrize(("listener", "target"), MATRIX_TARGETS,
                         ids=[f"{n} {t}" for n, t in MATRIX_TARGETS])
@pytest.mark.parametrize("headers", [PREFLIGHT, ""], ids=["preflight", "bare"])
async def test_options_on_a_matrix_path_is_answered_not_forwarded(
        listener: str, target: str, headers: str) -> None:
    async with recorder() as up, gate_on(toml(f"http://127.0.0.1:{up.port}")) as gate:
        resp = await fetch(port_of(gate, listener), get(target, host="matrix.test",
                                                        method="OPTIONS", extra=headers))
        assert_preflight_answer(resp)
        await asyncio.sleep(0.05)
        assert up.requests == []


async def test_preflight_is_answered_while_the_upstream_is_down() -> None:
    async with gate_on(toml(f"http://127.0.0.1:{free_port()}")) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            target = "/_matrix/client/v3/sync?timeout=0"
            assert_preflight_answer(await conn.request(
                get(target, host="matrix.test", method="OPTIONS", extra=PREFLIGHT)))
            # The request the preflight allowed: the 502 a script can read.
            resp = await conn.request(get(target, host="matrix.test",
                                          extra="Origin: http://app.example\r\n"
                                                "Authorization: Bearer x\r\n"))
            assert resp.status == 502
            assert resp.header("access-control-allow-origin") == "*"
            assert resp.json()["errcode"] == "M_UNKNOWN"  # type: ignore[index]
        finally:
            await conn.close()


async def test_keep_alive_after_a_preflight_with_a_body() -> None:
    """A body sent with the OPTIONS is not read as the next request."""
    async with recorder() as up, gate_on(toml(f"http://127.0.0.1:{up.port}")) as gate:
        conn = await Conn.open(port_of(gate))
        try:
            smuggled = b"GET /_matrix/x HTTP/1.1\r\nHost: matrix.test\r\n\r\n"
            resp = await conn.request(get("/_matrix/client/v3/login", host="matrix.test",
                                          method="OPTIONS",
                                          extra=f"Content-Length: {len(smuggled)}\r\n")
                                      + smuggled)
            assert_preflight_answer(resp)
            again = await conn.request(get("/_matrix/client/versions", host="matrix.test"))
            assert again.status == 200
        finally:
            await conn.close()
        assert [r.target for r in up.requests] == [b"/_matrix/client/versions"]


async def test_options_off_the_matrix_paths_is_still_forwarded() -> None:
    """A path that is not a Matrix API (here a web app under /app) keeps its own
    OPTIONS semantics: the gate has no CORS policy for it."""
    async with recorder() as up:
        text = toml(f"http://127.0.0.1:{up.port}", main='prefixes = ["/_matrix", "/app"]')
        async with gate_on(text) as gate:
            resp = await fetch(port_of(gate), get("/app/index.html", host="matrix.test",
                                                  method="OPTIONS", extra=PREFLIGHT))
            assert resp.status == 200
            assert [(r.method, r.target) for r in up.requests] == [
                (b"OPTIONS", b"/app/index.html")]


async def test_admin_preflight_is_answered_for_allowed_clients_only() -> None:
    admin = "/_palpo/admin/users"
    async with recorder() as up:
        allowed = toml(f"http://127.0.0.1:{up.port}",
                       extra='[admin]\nallow_from = ["127.0.0.1/32"]\n')
        async with gate_on(allowed) as gate:
            resp = await fetch(port_of(gate), get(admin, host="matrix.test", method="OPTIONS",
                                                  extra=PREFLIGHT))
            assert_preflight_answer(resp)
        await asyncio.sleep(0.05)
        assert up.requests == []
        # Outside admin.allow_from the admin API answers 403 to every method.
        async with gate_on(toml(f"http://127.0.0.1:{up.port}")) as gate:
            resp = await fetch(port_of(gate), get(admin, host="matrix.test", method="OPTIONS",
                                                  extra=PREFLIGHT))
            assert resp.status == 403
            assert resp.header("access-control-allow-origin") == "*"
        assert up.requests == []


async def test_preflight_has_an_access_line_and_a_metric(
        capfd: pytest.CaptureFixture[str]) -> None:
    registry = Registry()
    async with recorder() as up:
        async with gate_on(toml(f"http://127.0.0.1:{up.port}", access="json"),
                           metrics=registry) as gate:
            capfd.readouterr()
            resp = await fetch(port_of(gate), get("/_matrix/client/v3/sync", host="matrix.test",
                                                  method="OPTIONS", extra=PREFLIGHT))
            assert_preflight_answer(resp)
        lines = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
    assert [(x["method"], x["target"], x["status"], x["upstream_status"]) for x in lines] == [
        ("OPTIONS", "/_matrix/client/v3/sync", 204, None)]
    assert (b'palpo_gate_requests_total{listener="main",route="forward",status="204"} 1'
            in registry.render())


# -- in Chromium ---------------------------------------------------------------------

#: Debian's package; .ci/run installs it.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--no-proxy-server",
)

#: The page's script: two preflighted requests, as Element makes them, to the
#: gate on another origin; what the script could read goes back to /result.
PAGE = """<!doctype html>
<meta charset="utf-8"><title>cors</title>
<script>
const GATE = %(gate)s;
async function probe(name, path, init) {
  try {
    const r = await fetch(GATE + path, init);
    const text = await r.text();
    let errcode;
    try { errcode = JSON.parse(text).errcode; } catch (e) { errcode = "not JSON: " + text; }
    return {name, status: r.status, errcode, type: r.headers.get("content-type")};
  } catch (e) {
    return {name, error: String(e)};
  }
}
async function main() {
  return [
    await probe("sync", "/_matrix/client/v3/sync?timeout=0",
                {headers: {"Authorization": "Bearer x"}}),
    await probe("login", "/_matrix/client/v3/login",
                {method: "POST", headers: {"Content-Type": "application/json"},
                 body: JSON.stringify({type: "m.login.password", password: "secret",
                                       identifier: {type: "m.id.user", user: "alice"}})}),
  ];
}
main().catch(e => [{name: "page", error: String(e)}])
  .then(results => fetch("/result", {method: "POST", body: JSON.stringify(results)}));
</script>
"""


def chromium() -> str:
    path = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if path is None:
        pytest.fail(f"{CHROMIUM} not found: the browser test needs Debian's chromium "
                    "(apt-get install chromium; .ci/run installs it)")
    return path


@contextlib.asynccontextmanager
async def page_server(gate_origin: str) -> AsyncIterator[tuple[str, asyncio.Future[object]]]:
    """The page on its own origin; yields its URL and the future of its results."""
    results: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    html = PAGE % {"gate": json.dumps(gate_origin)}

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/result" and request.method == "POST":
            if not results.done():
                results.set_result(json.loads(await request.text()))
            return web.Response(status=204)
        if request.path == "/":
            return web.Response(text=html, content_type="text/html")
        return web.Response(status=404)

    runner = web.ServerRunner(web.Server(handle), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}/", results
    finally:
        await runner.cleanup()


def open_log(path: Path) -> IO[bytes]:
    return path.open("wb")  # a local file, opened before the browser starts


async def run_page(url: str, results: asyncio.Future[object], tmp_path: Path) -> object:
    """Open *url* in headless Chromium and wait for what its script reports."""
    out = tmp_path / "chromium.log"
    with open_log(out) as log:
        proc = await asyncio.create_subprocess_exec(
            chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", url,
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True)  # its own process group: renderer and zygote with it
    try:
        waiter = asyncio.ensure_future(proc.wait())
        done, _ = await asyncio.wait({results, waiter}, timeout=90,
                                     return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if results not in done:
            why = "did not report within 90 s" if not done else \
                f"exited ({proc.returncode}) before the page reported"
            pytest.fail(f"chromium {why}; its log:\n"
                        + out.read_text(errors="replace")[-3000:])
        return results.result()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


@pytest.mark.timeout(180)
async def test_browser_reads_the_502_while_the_upstream_is_down(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    closed = free_port()  # nothing listens there: Palpo is down
    async with gate_on(toml(f"http://127.0.0.1:{closed}", access="json")) as gate:
        origin = f"http://127.0.0.1:{port_of(gate)}"
        async with page_server(origin) as (url, results):
            got = await run_page(url, results, tmp_path)
    body, ctype = error_body(502, "x", True)
    expected = [{"name": name, "status": 502, "errcode": json.loads(body)["errcode"],
                 "type": ctype}
                for name in ("sync", "login")]
    assert got == expected, f"what the page's script could read: {got}"
    # Both requests really were preflighted, and each preflight got the 204.
    seen = [json.loads(line) for line in capfd.readouterr().out.splitlines()
            if line.startswith("{")]
    assert [(x["method"], x["target"].split("?")[0], x["status"]) for x in seen] == [
        ("OPTIONS", "/_matrix/client/v3/sync", 204),
        ("GET", "/_matrix/client/v3/sync", 502),
        ("OPTIONS", "/_matrix/client/v3/login", 204),
        ("POST", "/_matrix/client/v3/login", 502),
    ]
