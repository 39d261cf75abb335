"""Automatic HTTPS against a real ACME CA (docs/DESIGN.md section 8): Debian's pebble on
loopback (``tests/support/pebble.py``), the gate run as operators run it.

Pebble resolves every name to 127.0.0.1 and validates on the gate's own
listeners (its ``httpPort`` / ``tlsPort``); it rejects 5 % of good nonces
(its default) in every test here, so the ``badNonce`` retry path runs.
Served chains are verified against pebble's root (``/roots/0``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import os
import pathlib
import re
import signal
import ssl
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

import pytest
import trustme
from aiohttp import web
from cryptography import x509
from support.client import Conn, fetch
from support.gate import GateProcess, run_gate
from support.net import free_port
from support.pebble import Pebble, run_pebble
from support.recorder import Req, echo_handler, recorder

from palpo_gate.acme import certs
from palpo_gate.acme.store import ca_dir_name

T = TypeVar("T")

DOMAINS = ("matrix.test", "example.test")
GET_VERSIONS = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: matrix.test\r\n\r\n"


# -- helpers -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    """One CA for the tests that need no special one; every test has its own
    state directory, hence its own account."""
    with run_pebble(tmp_path_factory.mktemp("pebble"), free_port(), free_port()) as p:
        yield p


def gate_toml(pebble: Pebble, state_dir: pathlib.Path, upstream_port: int, *,
              domains: tuple[str, ...] = DOMAINS, challenge: str = "http-01",
              plain: bool = True, renew_before: str | None = None, workers: int = 1,
              metrics_port: int | None = None, directory: str | None = None,
              ca_bundle: str | None = None) -> str:
    """Listeners where pebble validates: plain HTTP on its httpPort (every
    path forwarded, so that an ACME request reaching Palpo would show), TLS
    with acme = true on its tlsPort."""
    text = f"""
[server]
workers = {workers}
drain_timeout = "1s"
[upstream]
url = "http://127.0.0.1:{upstream_port}"
[log]
level = "debug"
"""
    if plain:
        text += f"""
[[listeners]]
name = "http"
bind = "127.0.0.1:{pebble.http_port}"
prefixes = ["/"]
"""
    text += f"""
[[listeners]]
name = "https"
bind = "127.0.0.1:{pebble.tls_port}"
[listeners.tls]
acme = true
[acme]
directory = "{directory or pebble.directory}"
ca_bundle = "{ca_bundle or pebble.ca_bundle}"
email = "admin@example.test"
domains = [{", ".join(f'"{d}"' for d in domains)}]
state_dir = "{state_dir}"
challenge = "{challenge}"
"""
    if renew_before:
        text += f'renew_before = "{renew_before}"\n'
    if metrics_port:
        text += f'[metrics]\nbind = "127.0.0.1:{metrics_port}"\n'
    return text


def client_context(root: bytes | None = None) -> ssl.SSLContext:
    """Verifying against *root*, or (None) looking at whatever is served."""
    if root is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cadata=root.decode())
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def peer_cert(conn: Conn) -> x509.Certificate:
    der = conn.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


async def leaf(port: int, name: str, root: bytes | None = None) -> x509.Certificate:
    """The certificate a new handshake for *name* gets (verified against *root*)."""
    conn = await Conn.open(port, ssl=client_context(root), server_hostname=name)
    try:
        return peer_cert(conn)
    finally:
        await conn.close()


def from_pebble(cert: x509.Certificate) -> bool:
    return "Pebble" in cert.issuer.rfc4514_string()


def names(cert: x509.Certificate) -> set[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName))


async def until(probe: Callable[[], Awaitable[T | None] | T | None], timeout: float,
                what: str) -> T:
    """Poll *probe* until it gives something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
            if asyncio.iscoroutine(value):
                value = await value
        except (OSError, ssl.SSLError):
            value = None
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


async def issued(port: int, name: str = DOMAINS[0], timeout: float = 30.0,
                 other_than: int | None = None) -> x509.Certificate:
    """The CA's certificate for *name*, once a new handshake gets it."""
    async def probe() -> x509.Certificate | None:
        cert = await leaf(port, name)
        ok = from_pebble(cert) and cert.serial_number != other_than
        return cert if ok else None
    return await until(probe, timeout, f"a certificate from the CA for {name}")


def log_lines(gp: GateProcess, text: str) -> list[str]:
    return [line for line in list(gp.stderr_lines) if text in line]


def log_time(line: str) -> float:
    stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
    assert stamp, line
    return datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


# -- obtaining --------------------------------------------------------------------------------

async def test_empty_state_dir_gets_a_certificate_for_two_names(
        pebble: Pebble, tmp_path: pathlib.Path) -> None:
    orders = pebble.orders()
    async with recorder() as up:
        started = time.monotonic()
        with run_gate(gate_toml(pebble, tmp_path / "acme", up.port), tmp_path / "gate") as gp:
            first = await issued(pebble.tls_port)
            took = time.monotonic() - started
            root = pebble.root()
            for name in DOMAINS:
                cert = await leaf(pebble.tls_port, name, root)  # verified: chain and name
                assert cert.serial_number == first.serial_number
                assert names(cert) == set(DOMAINS)

            # /_matrix through it.
            conn = await Conn.open(pebble.tls_port, ssl=client_context(root),
                                   server_hostname="matrix.test")
            resp = await conn.request(GET_VERSIONS)
            await conn.close()
            assert resp.status == 200
            assert [r.target for r in up.requests] == [b"/_matrix/client/versions"]

            # The CA's HTTP-01 requests were answered on the plain listener,
            # none forwarded, although that listener forwards every path.
            answered = [line for line in gp.stdout_lines
                        if "/.well-known/acme-challenge/" in line and '" 200 ' in line]
            assert len(answered) >= len(DOMAINS), gp.stdout_lines
            # With no order open the path is the gate's 404, still not forwarded.
            resp = await fetch(pebble.http_port, b"GET /.well-known/acme-challenge/x HTTP/1.1"
                                                 b"\r\nHost: matrix.test\r\n\r\n")
            assert resp.status == 404
            resp = await fetch(pebble.http_port, b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n")
            assert resp.status == 200
            assert [r.target for r in up.requests] == [b"/_matrix/client/versions", b"/other"]
            [obtained] = log_lines(gp, "acme: obtained a certificate")
    assert pebble.orders() == orders + 1
    assert "Traceback" not in "".join(gp.stderr_lines)
    print(f"\nfirst issuance: {took:.2f}s from the gate's start to a verified handshake; "
          f"gate log: {obtained.split('acme: ', 2)[-1].strip()}")


async def test_key_files_are_created_0600(pebble: Pebble, tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state" / "acme"  # neither exists yet
    async with recorder() as up:
        # umask 0: the modes must not depend on it.
        with run_gate(gate_toml(pebble, state, up.port), tmp_path / "gate",
                      preexec_fn=lambda: os.umask(0)):
            await issued(pebble.tls_port)
    ca = state / ca_dir_name(pebble.directory)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [tmp_path / "state", *sorted(tmp_path.joinpath("state").rglob("*"))]}
    assert modes == {
        "state": 0o700,
        "state/acme": 0o700,
        "state/acme/lock": 0o600,
        "state/acme/selfsigned.pem": 0o600,
        f"state/acme/{ca.name}": 0o700,
        f"state/acme/{ca.name}/account.key": 0o600,
        f"state/acme/{ca.name}/certificate.pem": 0o600,
    }, modes
    # The challenges are gone with the order; the certificate's key is new
    # (not the account's).
    pem = (ca / "certificate.pem").read_bytes()
    key, _ = certs.split(pem)
    assert key and key not in (ca / "account.key").read_bytes()


async def test_tls_alpn_01_alone(pebble: Pebble, tmp_path: pathlib.Path) -> None:
    """No plain listener (no port 80): the CA validates on the TLS listener."""
    async with recorder() as up:
        toml = gate_toml(pebble, tmp_path / "acme", up.port, challenge="tls-alpn-01",
                         plain=False)
        with run_gate(toml, tmp_path / "gate") as gp:
            first = await issued(pebble.tls_port)
            root = pebble.root()
            for name in DOMAINS:
                assert (await leaf(pebble.tls_port, name, root)).serial_number == \
                    first.serial_number
            conn = await Conn.open(pebble.tls_port, ssl=client_context(root),
                                   server_hostname="matrix.test")
            assert (await conn.request(GET_VERSIONS)).status == 200
            await conn.close()
            # acme-tls/1 with no open challenge: the ordinary certificate, no
            # ALPN agreed (RFC 8737 section 3: the validation then fails).
            ctx = client_context()
            ctx.set_alpn_protocols(["acme-tls/1"])
            conn = await Conn.open(pebble.tls_port, ssl=ctx, server_hostname="matrix.test")
            assert conn.writer.get_extra_info("ssl_object").selected_alpn_protocol() is None
            assert peer_cert(conn).serial_number == first.serial_number
            await conn.close()
            assert log_lines(gp, "(tls-alpn-01)")
            assert log_lines(gp, "answering a tls-alpn-01 validation for matrix.test")


# -- restart, reload ---------------------------------------------------------------------------

async def test_restart_serves_the_stored_certificate_and_places_no_order(
        pebble: Pebble, tmp_path: pathlib.Path) -> None:
    state = tmp_path / "acme"
    async with recorder() as up:
        toml = gate_toml(pebble, state, up.port)
        with run_gate(toml, tmp_path / "gate"):
            first = await issued(pebble.tls_port)
        orders, issued_count = pebble.orders(), pebble.issued()

        with run_gate(toml, tmp_path / "gate") as gp:
            # From the first handshake on: no temporary certificate this time.
            root = pebble.root()
            assert (await leaf(pebble.tls_port, DOMAINS[1], root)).serial_number == \
                first.serial_number
            assert log_lines(gp, "acme: serving the stored certificate")
            assert not log_lines(gp, "self-signed")
            await asyncio.sleep(1.5)
            assert (pebble.orders(), pebble.issued()) == (orders, issued_count)

            # SIGHUP with one more name: the new set is ordered, no restart.
            path = tmp_path / "gate" / "gate.toml"
            path.write_text(gate_toml(pebble, state, up.port, domains=(*DOMAINS, "new.test")))
            gp.proc.send_signal(signal.SIGHUP)

            async def new_set() -> bool:
                cert = await leaf(pebble.tls_port, "new.test")
                return from_pebble(cert) and names(cert) == {*DOMAINS, "new.test"}
            await until(new_set, 30, "a certificate for the new set of names")
            cert = await leaf(pebble.tls_port, "new.test", root)
            assert cert.serial_number != first.serial_number
            assert pebble.orders() == orders + 1
            assert gp.proc.poll() is None


# -- renewal -------------------------------------------------------------------------------------

async def test_renewal_swaps_the_certificate_under_a_held_long_poll(
        tmp_path: pathlib.Path) -> None:
    """Certificates valid 12 s, renewed 8 s before expiry: the first one is
    due 4 s after it was issued."""
    with run_pebble(tmp_path / "pebble", free_port(), free_port(), validity=12) as pebble:
        async with recorder() as up:
            release = asyncio.Event()

            async def hold_sync(req: Req, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
                if req.target.startswith(b"/_matrix/client/v3/sync"):
                    await release.wait()
                await echo_handler(req, reader, writer)
            up.handler = hold_sync
            toml = gate_toml(pebble, tmp_path / "acme", up.port, renew_before="8s")
            with run_gate(toml, tmp_path / "gate") as gp:
                first = await issued(pebble.tls_port)
                root = pebble.root()
                held = await Conn.open(pebble.tls_port, ssl=client_context(root),
                                       server_hostname="matrix.test")
                assert peer_cert(held).serial_number == first.serial_number
                await held.send(b"GET /_matrix/client/v3/sync?timeout=30000 HTTP/1.1\r\n"
                                b"Host: matrix.test\r\n\r\n")
                await up.wait_requests(1)

                renewed = await issued(pebble.tls_port, other_than=first.serial_number,
                                       timeout=40)
                assert renewed.not_valid_before_utc >= first.not_valid_before_utc
                for name in DOMAINS:  # new handshakes, verified
                    cert = await leaf(pebble.tls_port, name, root)
                    assert cert.serial_number != first.serial_number
                assert not release.is_set() and len(up.requests) == 1

                release.set()
                resp = await held.read_response(timeout=10)
                assert resp.status == 200
                # The held connection goes on, on the certificate it began with.
                assert (await held.request(GET_VERSIONS)).status == 200
                assert peer_cert(held).serial_number == first.serial_number
                await held.close()
                assert len(log_lines(gp, "acme: obtained a certificate")) >= 2
                assert not log_lines(gp, "reloaded") and gp.proc.poll() is None


async def test_ca_down_at_renewal_keeps_the_old_certificate(tmp_path: pathlib.Path) -> None:
    """Certificates valid 12 s, due 4 s after they were issued; the CA stops
    right after the first one."""
    with run_pebble(tmp_path / "pebble", free_port(), free_port(), validity=12) as pebble:
        async with recorder() as up:
            metrics = free_port()
            toml = gate_toml(pebble, tmp_path / "acme", up.port, renew_before="8s",
                             metrics_port=metrics)
            with run_gate(toml, tmp_path / "gate") as gp:
                first = await issued(pebble.tls_port)
                root = pebble.root()
                pebble.stop()

                [failure] = await until(lambda: log_lines(gp, "could not obtain"), 30,
                                        "a failed renewal")
                seen = scrape(metrics)
                assert "cannot reach the CA" in failure, failure
                assert "still serving the certificate valid until" in failure, failure
                assert re.search(r"next attempt in \d+s", failure), failure
                cert = await leaf(pebble.tls_port, DOMAINS[0], root)
                assert cert.serial_number == first.serial_number
                assert seen["palpo_gate_acme_failures_total"] == 1
                for name in DOMAINS:
                    assert seen[f'palpo_gate_certificate_expiry_timestamp_seconds'
                                f'{{name="{name}"}}'] == first.not_valid_after_utc.timestamp()
                assert "Traceback" not in "".join(gp.stderr_lines)

                # The CA is back (a new pebble run: a new root, the account
                # unknown to it): the next attempt, backed off, succeeds.
                pebble.start()
                renewed = await issued(pebble.tls_port, other_than=first.serial_number,
                                       timeout=30)
                await leaf(pebble.tls_port, DOMAINS[1], pebble.root())
                failures = log_lines(gp, "could not obtain")
                assert scrape(metrics)["palpo_gate_acme_failures_total"] == len(failures)
                expiry = scrape(metrics)[
                    f'palpo_gate_certificate_expiry_timestamp_seconds{{name="{DOMAINS[0]}"}}']
                assert expiry == renewed.not_valid_after_utc.timestamp()
                # Never a loop: attempts after a failure are spaced by the back-off.
                lines = list(gp.stderr_lines)
                second = [i for i, line in enumerate(lines) if "acme: obtained" in line][1]
                attempts = [log_time(line) for line in lines[:second] if "acme: ordering" in line]
                assert len(attempts) == len(failures) + 2, lines
                gaps = [b - a for a, b in itertools.pairwise(attempts[1:])]
                assert all(gap >= 4.5 for gap in gaps), gaps  # the 5 s floor


@contextlib.asynccontextmanager
async def serve_https(app: web.Application) -> AsyncIterator[tuple[int, trustme.CA]]:
    """*app* over HTTPS on a loopback port, with a certificate for 127.0.0.1
    from a CA of its own: (port, CA)."""
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        yield runner.addresses[0][1], ca
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def refusing_ca(tmp_path: pathlib.Path, retry_after: str) -> AsyncIterator[tuple[str,
                                                                                        str]]:
    """An HTTPS server whose ACME directory answers 429 with Retry-After, as a
    CA's rate limit does (RFC 8555 section 6.6); pebble has no rate limits."""
    async def directory(request: web.Request) -> web.Response:
        return web.json_response(
            {"type": "urn:ietf:params:acme:error:rateLimited",
             "detail": "too many certificates already issued", "status": 429},
            status=429, content_type="application/problem+json",
            headers={"Retry-After": retry_after})

    app = web.Application()
    app.router.add_get("/dir", directory)
    async with serve_https(app) as (port, ca):
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        yield f"https://127.0.0.1:{port}/dir", str(tmp_path / "ca.pem")


async def test_retry_after_is_respected(pebble: Pebble, tmp_path: pathlib.Path) -> None:
    async with refusing_ca(tmp_path, "3600") as (directory, bundle), recorder() as up:
        toml = gate_toml(pebble, tmp_path / "acme", up.port, directory=directory,
                         ca_bundle=bundle)
        with run_gate(toml, tmp_path / "gate") as gp:
            [failure] = await until(lambda: log_lines(gp, "could not obtain"), 20,
                                    "a refused order")
            assert "too many certificates already issued (rateLimited)" in failure, failure
            assert "still serving the temporary self-signed certificate" in failure
            assert "next attempt in 60m" in failure, failure  # not the 60 s back-off
            cert = await leaf(pebble.tls_port, DOMAINS[0])
            assert cert.issuer == cert.subject and names(cert) == set(DOMAINS)


def _cert_id(cert: x509.Certificate) -> str:
    """RFC 9773 section 4.1: base64url(AKI keyIdentifier) "." base64url(serial,
    as the bytes of its DER INTEGER)."""
    import base64

    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    serial = cert.serial_number.to_bytes(cert.serial_number.bit_length() // 8 + 1, "big")

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert aki.key_identifier is not None
    return f"{b64(aki.key_identifier)}.{b64(serial)}"


def _bundle(path: pathlib.Path, pem: bytes, other: str) -> pathlib.Path:
    path.write_bytes(pem + pathlib.Path(other).read_bytes())
    return path


@contextlib.asynccontextmanager
async def with_renewal_info(pebble: Pebble, tmp_path: pathlib.Path,
                            soon: Callable[[], bool]) -> AsyncIterator[tuple[str, str,
                                                                             list[str]]]:
    """Pebble's directory plus ``renewalInfo`` (RFC 9773), which this pebble
    lacks: the directory and the renewal information come from here, every
    other URL in the directory is pebble's own. While *soon()* holds, the
    suggested window opens a second from now; after, in 50 days."""
    seen: list[str] = []

    async def directory(request: web.Request) -> web.Response:
        doc = json.loads(await asyncio.to_thread(pebble._get, pebble.directory))
        doc["renewalInfo"] = f"https://127.0.0.1:{port}/renewal-info"
        return web.json_response(doc)

    async def renewal_info(request: web.Request) -> web.Response:
        seen.append(request.match_info["id"])
        start = datetime.datetime.now(datetime.UTC) + (
            datetime.timedelta(seconds=1) if soon() else datetime.timedelta(days=50))
        window = {"start": start.isoformat(), "end": (start + datetime.timedelta(
            seconds=1)).isoformat()}
        return web.json_response({"suggestedWindow": window}, headers={"Retry-After": "3600"})

    app = web.Application()
    app.router.add_get("/dir", directory)
    app.router.add_get("/renewal-info/{id}", renewal_info)
    async with serve_https(app) as (port, ca):
        bundle = _bundle(tmp_path / "bundle.pem", ca.cert_pem.bytes(), pebble.ca_bundle)
        yield f"https://127.0.0.1:{port}/dir", str(bundle), seen


async def test_renewal_information_decides_when(pebble: Pebble, tmp_path: pathlib.Path) -> None:
    """A CA that offers renewal information (ARI) and suggests renewing a
    5-year certificate now (as after a revocation): the gate renews within
    the window, though renew_before is 30 days."""
    orders, issued_before = pebble.orders(), pebble.issued()
    first: list[x509.Certificate] = []
    # Soon for the first certificate only.
    async with with_renewal_info(pebble, tmp_path, lambda: pebble.issued() - issued_before < 2
                                 ) as (directory, bundle, seen), recorder() as up:
        toml = gate_toml(pebble, tmp_path / "acme", up.port, directory=directory,
                         ca_bundle=bundle)
        with run_gate(toml, tmp_path / "gate") as gp:
            first.append(await issued(pebble.tls_port))
            renewed = await issued(pebble.tls_port, other_than=first[0].serial_number,
                                   timeout=20)
            await leaf(pebble.tls_port, DOMAINS[1], pebble.root())
            assert _cert_id(first[0]) in seen, seen
            assert log_lines(gp, f"the CA suggests renewing the certificate (serial "
                                 f"{first[0].serial_number:x})")
            # The new certificate's window is in 50 days: no third order.
            await until(lambda: _cert_id(renewed) in seen, 10, "renewal information asked")
            await asyncio.sleep(1.5)
            assert pebble.orders() == orders + 2
            assert (await leaf(pebble.tls_port, DOMAINS[0])).serial_number == \
                renewed.serial_number


# -- workers ---------------------------------------------------------------------------------------

def _children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                fields = pathlib.Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1]
                if int(fields.split()[1]) == pid:
                    out.add(int(entry))
    return out


def _owners(server_port: int, client_ports: list[int], pids: set[int]) -> dict[int, int]:
    """Which process holds the server side of each client connection."""
    inode_of = {}
    for line in pathlib.Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
        if local == server_port:
            inode_of[remote] = fields[9]
    owner = {}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                owner[link] = pid
    return {port: owner[f"socket:[{inode_of[port]}]"] for port in client_ports
            if port in inode_of and f"socket:[{inode_of[port]}]" in owner}


async def test_two_workers_one_order_both_serve(pebble: Pebble, tmp_path: pathlib.Path) -> None:
    orders = pebble.orders()
    async with recorder() as up:
        toml = gate_toml(pebble, tmp_path / "acme", up.port, workers=2)
        with run_gate(toml, tmp_path / "gate") as gp:
            first = await issued(pebble.tls_port)
            root = pebble.root()
            workers = _children(gp.proc.pid)
            assert len(workers) == 2

            async def everyone_serves_it() -> dict[int, int] | None:
                conns: list[Conn] = []
                try:
                    for _ in range(16):  # verified: a temporary certificate fails here
                        conns.append(await Conn.open(pebble.tls_port, ssl=client_context(root),
                                                     server_hostname="matrix.test"))
                    if any(peer_cert(c).serial_number != first.serial_number for c in conns):
                        return None  # a worker has not picked it up yet
                    ports = [c.writer.get_extra_info("sockname")[1] for c in conns]
                    owners = _owners(pebble.tls_port, ports, workers)
                    return owners if set(owners.values()) == workers else None
                finally:
                    for c in conns:
                        await c.close()
            await until(everyone_serves_it, 15, "both workers serving the certificate")
        assert pebble.orders() == orders + 1
        assert len(log_lines(gp, "acme: ordering a certificate")) == 1
        assert len(log_lines(gp, "acme: obtained a certificate")) == 1


# -- check -----------------------------------------------------------------------------------------

def _check(path: pathlib.Path, text: str) -> subprocess.CompletedProcess[str]:
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "palpo_gate", "check", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_check_reports_bad_acme_config_by_key_path(tmp_path: pathlib.Path) -> None:
    tls = '[[listeners]]\nname = "tls"\nbind = "127.0.0.1:8443"\n[listeners.tls]\nacme = true\n'
    plain = '[[listeners]]\nname = "web"\nbind = "127.0.0.1:8080"\n'
    (tmp_path / "file").write_text("")

    proc = _check(tmp_path / "a.toml", plain + tls)
    assert proc.returncode == 2
    assert "listeners[1].tls.acme: true, but there is no [acme] section" in proc.stderr

    proc = _check(tmp_path / "b.toml", plain + tls + f"""
[acme]
directory = "http://acme.example/directory"
domains = ["matrix.example.com", "not a name"]
state_dir = "{tmp_path}/file/acme"
""")
    assert proc.returncode == 2
    errors = [line.strip() for line in proc.stderr.splitlines()[1:]]
    assert [e.split(":")[0] for e in errors] == ["acme.domains[1]", "acme.directory",
                                                 "acme.state_dir"], proc.stderr

    proc = _check(tmp_path / "c.toml", plain + "[acme]\ndomains = []\n"
                  f'state_dir = "{tmp_path}/acme"\n')
    assert proc.returncode == 2
    assert "acme.domains: required: at least one DNS name" in proc.stderr
    assert "acme: no listener has tls.acme = true" in proc.stderr

    # A good one: printed, and nothing written (check only reads).
    proc = _check(tmp_path / "d.toml", plain + tls + "[acme]\n"
                  f'domains = ["matrix.example.com"]\nstate_dir = "{tmp_path}/acme"\n')
    assert proc.returncode == 0, proc.stderr
    assert "acme = true" in proc.stdout and 'domains = ["matrix.example.com"]' in proc.stdout
    assert not (tmp_path / "acme").exists()


# -- the TLS-ALPN-01 front on asyncio's own loop --------------------------------------------

async def _handshake_in_pieces(port: int, name: str, pause: float) -> x509.Certificate:
    """A TLS handshake whose ClientHello arrives in two TCP segments, *pause*
    apart (a ClientHello larger than one segment, or a slow client)."""
    ctx = client_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with contextlib.suppress(ssl.SSLWantReadError):
            obj.do_handshake()
        hello = outgoing.read()
        writer.write(hello[:7])
        await writer.drain()
        await asyncio.sleep(pause)
        writer.write(hello[7:])
        await writer.drain()
        while True:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "closed during the handshake"
            incoming.write(data)
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                writer.write(outgoing.read())
                await writer.drain()
        der = obj.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)
    finally:
        writer.close()


async def test_tls_alpn_front_before_any_certificate(tmp_path: pathlib.Path) -> None:
    """In the test's own (asyncio, not uvloop) loop, with a CA that cannot be
    reached: the fronted listener serves the temporary certificate, forwards
    /_matrix, reads a ClientHello that comes in pieces, and drops what is not
    TLS."""
    from support.gate import port_of, running_gate

    async with recorder() as up:
        toml = f"""
[upstream]
url = "http://127.0.0.1:{up.port}"
[log]
access = "off"
[[listeners]]
name = "main"
bind = "127.0.0.1:0"
[listeners.tls]
acme = true
[acme]
directory = "https://127.0.0.1:1/directory"
domains = ["matrix.test"]
state_dir = "{tmp_path}/acme"
challenge = "tls-alpn-01"
"""
        async with running_gate(toml) as gate:
            port = port_of(gate)
            cert = await leaf(port, "matrix.test")
            assert cert.issuer == cert.subject and names(cert) == {"matrix.test"}
            conn = await Conn.open(port, ssl=client_context(), server_hostname="matrix.test")
            assert (await conn.request(GET_VERSIONS)).status == 200
            await conn.close()
            slow = await _handshake_in_pieces(port, "matrix.test", 0.2)
            assert slow.serial_number == cert.serial_number
            # Plain HTTP on the TLS port: no TLS, no answer, closed.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(GET_VERSIONS)
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            assert [r.target for r in up.requests] == [b"/_matrix/client/versions"]


async def test_reload_that_adds_acme_is_refused(tmp_path: pathlib.Path) -> None:
    from support.gate import running_gate

    from palpo_gate import config as configmod
    from palpo_gate.config import ConfigError

    plain = '[[listeners]]\nname = "main"\nbind = "127.0.0.1:0"\n'
    async with running_gate(plain) as gate:
        cfg = configmod.loads(plain + '[[listeners]]\nname = "tls"\nbind = "127.0.0.1:0"\n'
                              '[listeners.tls]\nacme = true\n[acme]\ndomains = ["a.test"]\n'
                              f'state_dir = "{tmp_path}/acme"\n')
        with pytest.raises(ConfigError) as info:
            await gate.reload(cfg)
        assert info.value.errors == ["acme: [acme] was added: automatic certificates start "
                                     "with the next restart"]
        assert gate.generation == 1 and gate.acme is None
