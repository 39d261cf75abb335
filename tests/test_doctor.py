"""``palpo-gate doctor`` against real deployments on loopback.

Each test builds a deployment (a gate with TLS listeners and delegation, a
homeserver, DNS records) with one thing wrong, runs the doctor and checks
that exactly the check that covers it fails, naming the cause and the fix.
The healthy deployment is Synapse behind the gate; the broken ones mostly
use a small in-test homeserver (fast to start, easy to break).

Names resolve through a DNS server of the test's own (dnslib on a loopback
UDP port) that the doctor is pointed at with ``--resolver``: ``example.test``
(the server name) and ``matrix.example.test`` (the delegated host) lead to
127.0.0.1, where the gate listens.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import pathlib
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dnslib import QTYPE, RCODE, RR, SRV, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer
from support.gate import run_gate, running_gate
from support.net import free_port
from support.synapse import SynapseServer, run_synapse
from yarl import URL

from palpo_gate import doctor
from palpo_gate.doctor import checks
from palpo_gate.doctor.checks import Result

SERVER_NAME = "example.test"
DELEGATED = "matrix.example.test"


# --------------------------------------------------------------------------
# DNS: a zone the test edits, served by dnslib on a loopback UDP port.


class Zone(BaseResolver):
    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[Any]] = {}
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.records = {
                (SERVER_NAME, "A"): [A("127.0.0.1")],
                (DELEGATED, "A"): [A("127.0.0.1")],
                ("other.example.test", "A"): [A("127.0.0.1")],
            }

    def add(self, name: str, qtype: str, rdata: Any) -> None:
        with self.lock:
            self.records.setdefault((name, qtype), []).append(rdata)

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        q = request.q
        name = str(q.qname).rstrip(".").lower()
        with self.lock:
            answers = list(self.records.get((name, QTYPE[q.qtype]), ()))
            known = any(n == name for n, _ in self.records)
        for rdata in answers:
            reply.add_answer(RR(q.qname, q.qtype, rdata=rdata, ttl=60))
        if not known:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


@pytest.fixture(scope="module")
def dns_server() -> Iterator[tuple[Zone, str]]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    zone = Zone()
    quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
    server = DNSServer(zone, port=port, address="127.0.0.1", logger=quiet)
    server.start_thread()
    try:
        yield zone, f"127.0.0.1:{port}"
    finally:
        server.stop()
        server.server.server_close()


@pytest.fixture
def dns(dns_server: tuple[Zone, str]) -> Iterator[tuple[Zone, str]]:
    """The zone, back to its default records for each test."""
    dns_server[0].reset()
    yield dns_server
    dns_server[0].reset()


# --------------------------------------------------------------------------
# TLS material: a CA (trustme) and certificates minted for each case.


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pki(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PEM files: "good" covers both names for a year; "other" covers
    other.test only; "expired" and "soon" (10 days left) are minted here with
    cryptography, signed by the same CA."""
    d = tmp_path_factory.mktemp("pki")
    out = {"ca": str(d / "ca.pem")}
    ca.cert_pem.write_to_path(out["ca"])
    for name, hosts in (("good", [DELEGATED, SERVER_NAME]), ("other", ["other.test"])):
        cert = ca.issue_cert(*hosts)
        cert.private_key_pem.write_to_path(str(d / f"{name}.key"))
        (d / f"{name}.crt").write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
        out[name] = str(d / f"{name}.crt")
        out[f"{name}_key"] = str(d / f"{name}.key")
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    for name, start, end in (("expired", now - 100 * day, now - 2 * day),
                             ("soon", now - 80 * day, now + 10 * day)):
        cert_pem, key_pem = mint(ca, [DELEGATED, SERVER_NAME], start, end)
        (d / f"{name}.crt").write_bytes(cert_pem)
        (d / f"{name}.key").write_bytes(key_pem)
        out[name] = str(d / f"{name}.crt")
        out[f"{name}_key"] = str(d / f"{name}.key")
    return out


def mint(ca: trustme.CA, names: list[str], not_before: datetime.datetime,
         not_after: datetime.datetime) -> tuple[bytes, bytes]:
    """A leaf certificate for *names* with the given dates, signed by *ca*."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


# --------------------------------------------------------------------------
# Gate configs


def gate_config(upstream: str, ports: tuple[int, int], pki: dict[str, str], *,
                cert: str = "good", federation_cert: str | None = None,
                well_known: str | None = "default", extra: str = "",
                hosts: str = "") -> str:
    """A client and a federation listener with TLS on 127.0.0.1, delegation
    to matrix.example.test."""
    client_port, fed_port = ports
    fed = federation_cert or cert
    if well_known == "default":
        well_known = (f'server = "{DELEGATED}:{fed_port}"\n'
                      f'client = "https://{DELEGATED}:{client_port}"')
    wk = f"[well_known]\n{well_known}\n" if well_known is not None else ""
    return f"""
[upstream]
url = "{upstream}"
[log]
access = "off"

[[listeners]]
name = "client"
bind = "127.0.0.1:{client_port}"
role = "client"
{hosts}
[listeners.tls]
cert = "{pki[cert]}"
key = "{pki[cert + '_key']}"

[[listeners]]
name = "federation"
bind = "127.0.0.1:{fed_port}"
role = "federation"
{hosts}
[listeners.tls]
cert = "{pki[fed]}"
key = "{pki[fed + '_key']}"

{wk}
{extra}
"""


def two_ports() -> tuple[int, int]:
    a = free_port()
    b = free_port()
    while b == a:
        b = free_port()
    return a, b


def run_doctor_cli(config: pathlib.Path, pki: dict[str, str], resolver: str,
                   *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "palpo_gate", "doctor", "--config", str(config),
         "--cafile", pki["ca"], "--resolver", resolver, *extra],
        capture_output=True, text=True, timeout=90)


async def diagnose(tmp_path: pathlib.Path, toml: str, pki: dict[str, str],
                   resolver: str) -> list[Result]:
    """The doctor in this process (the gate under test runs in this loop)."""
    path = tmp_path / "gate.toml"
    path.write_text(toml)
    from palpo_gate.doctor.fetch import parse_resolver

    return await doctor.diagnose(str(path), cafile=pki["ca"], resolver=parse_resolver(resolver))


def not_passed(results: list[Result]) -> dict[str, Result]:
    return {r.label: r for r in results if r.status != checks.PASS}


def show(results: list[Result]) -> str:
    return doctor.render_text(results)


# --------------------------------------------------------------------------
# The healthy deployment: Synapse behind the gate (real processes)


@pytest.fixture(scope="module")
def synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseServer]:
    with run_synapse(tmp_path_factory.mktemp("synapse"), server_name=SERVER_NAME) as hs:
        yield hs


@pytest.mark.timeout(180)
def test_healthy_synapse_deployment_passes_every_check(
        synapse: SynapseServer, pki: dict[str, str], dns: tuple[Zone, str],
        tmp_path: pathlib.Path) -> None:
    _, resolver = dns
    toml = gate_config(synapse.url, two_ports(), pki)
    with run_gate(toml, tmp_path) as gate:
        done = run_doctor_cli(tmp_path / "gate.toml", pki, resolver)
        json_run = run_doctor_cli(tmp_path / "gate.toml", pki, resolver, "--json")
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert all(line.startswith("PASS") for line in lines[:-1]), done.stdout
    expected = {"config", "listener[client]", "listener[federation]",
                "tls.handshake[client]", "tls.chain[client]", "tls.names[client]",
                "tls.expiry[client]", "tls.handshake[federation]", "tls.chain[federation]",
                "tls.names[federation]", "tls.expiry[federation]", "upstream.versions",
                "upstream.keys", "wellknown.server", "wellknown.client",
                "delegation.server", "delegation.srv", "delegation.client",
                "admin.allow_from", "admin.blocked", "federation.target[client]",
                "federation.target[federation]"}
    assert {line.split()[1].rstrip(":") for line in lines[:-1]} == expected
    assert lines[-1] == f"{len(expected)} passed, 0 warnings, 0 failed, 0 skipped"
    fed_port = gate.port("federation")
    assert (f"example.test: well-known → {DELEGATED}:{fed_port} → 127.0.0.1:{fed_port}: "
            "listener 'federation' (federation)") in done.stdout
    assert "%2F reached the homeserver's router as data" in done.stdout

    assert json_run.returncode == 0, json_run.stderr
    doc = json.loads(json_run.stdout)
    assert doc["ok"] is True
    assert doc["counts"] == {"pass": len(expected), "warn": 0, "fail": 0, "skip": 0}
    assert [c["id"] + (f"[{c['subject']}]" if c["subject"] else "") for c in doc["checks"]] \
        == [line.split()[1].rstrip(":") for line in lines[:-1]]


# --------------------------------------------------------------------------
# A small homeserver for the broken deployments: the answers the doctor asks
# for, its key document signed with signedjson (independent of the doctor's
# own verification). Routes split the raw path on literal "/" only, as
# Synapse and Palpo do, so an encoded slash stays inside its segment.


class FakeHomeserver:
    def __init__(self, *, well_known: dict[str, Any] | None = None,
                 server_name: str = SERVER_NAME) -> None:
        from signedjson.key import generate_signing_key, get_verify_key
        from signedjson.sign import sign_json

        key = generate_signing_key("fake")
        verify = get_verify_key(key)
        until = int(datetime.datetime.now(datetime.UTC).timestamp() * 1000) + 86_400_000
        doc = {
            "server_name": server_name,
            "valid_until_ts": until,
            "verify_keys": {f"ed25519:{key.version}": {
                "key": base64.b64encode(verify.encode()).decode().rstrip("=")}},
            "old_verify_keys": {},
        }
        self.key_doc = json.dumps(sign_json(doc, server_name, key)).encode()
        #: path → (JSON body, with CORS headers?)
        self.well_known = well_known or {}
        self.port = 0
        self.url = ""

    async def handle(self, request: web.BaseRequest) -> web.Response:
        path = request.raw_path.split("?", 1)[0]
        if path == "/_matrix/client/versions":
            return web.json_response({"versions": ["v1.11", "v1.12"]})
        if path == "/_matrix/key/v2/server" or (
                path.startswith("/_matrix/key/v2/server/") and path.count("/") == 5):
            return web.Response(body=self.key_doc, content_type="application/json")
        if path == "/_matrix/federation/v1/version":
            return web.json_response({"server": {"name": "fake", "version": "1"}})
        if path == "/_synapse/admin/v1/server_version":
            return web.json_response({"server_version": "fake"})
        if path in self.well_known:
            body, cors = self.well_known[path]
            headers = {"Access-Control-Allow-Origin": "*"} if cors else {}
            return web.json_response(body, headers=headers)
        return web.json_response({"errcode": "M_UNRECOGNIZED", "error": "Unrecognized"},
                                 status=404)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FakeHomeserver]:
        runner = web.ServerRunner(web.Server(self.handle), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            yield self
        finally:
            await runner.cleanup()


@contextlib.asynccontextmanager
async def deployment(toml: str) -> AsyncIterator[None]:
    async with running_gate(toml):
        yield


# --------------------------------------------------------------------------
# One test per failure


async def test_gate_not_running(pki: dict[str, str], dns: tuple[Zone, str],
                                tmp_path: pathlib.Path) -> None:
    ports = two_ports()
    async with FakeHomeserver().running() as hs:
        toml = gate_config(hs.url, ports, pki)  # and no gate started on it
        results = await diagnose(tmp_path, toml, pki, dns[1])
    by = {r.label: r for r in results}
    for name, port in (("client", ports[0]), ("federation", ports[1])):
        r = by[f"listener[{name}]"]
        assert (r.status, r.message) == (checks.FAIL, f"127.0.0.1:{port} does not answer: "
                                                      "connection refused")
        assert r.fix.startswith("start the gate")
    assert by["upstream.keys"].status == checks.PASS


async def test_chain_needs_the_private_ca(pki: dict[str, str], dns: tuple[Zone, str],
                                         tmp_path: pathlib.Path) -> None:
    """The gate's certificates come from a CA the system store does not
    know: without --cafile the chain fails, and so does every connection a
    remote server or client would make."""
    from palpo_gate.doctor.fetch import parse_resolver

    ports = two_ports()
    async with FakeHomeserver().running() as hs:
        toml = gate_config(hs.url, ports, pki)
        path = tmp_path / "gate.toml"
        path.write_text(toml)
        async with deployment(toml):
            results = await doctor.diagnose(str(path), resolver=parse_resolver(dns[1]))
    bad = not_passed(results)
    assert set(bad) == {"tls.chain[client]", "tls.chain[federation]", "delegation.server",
                        "delegation.client"}, show(results)
    r = bad["tls.chain[federation]"]
    assert r.message == (f"127.0.0.1:{ports[1]}: the certificate for {DELEGATED} does not "
                         "verify against the system store: unable to get local issuer "
                         "certificate")
    assert r.fix.startswith("put the whole chain (certificate, then intermediates: "
                            "fullchain.pem) in listeners[1].tls.cert, or pass --cafile")


async def test_unix_listener_and_a_dns_server_that_never_answers(
        pki: dict[str, str], tmp_path: pathlib.Path) -> None:
    """A plain listener on a UNIX socket is checked through the socket; a
    DNS server that never answers fails discovery within one timeout, and the
    fix points at it."""
    sock = tmp_path / "client.sock"
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never read
    silent.bind(("127.0.0.1", 0))
    fed_port = free_port()
    toml = f"""
[log]
access = "off"
[[listeners]]
name = "local"
bind = "unix:{sock}"
role = "client"
[[listeners]]
name = "federation"
bind = "127.0.0.1:{fed_port}"
role = "federation"
[listeners.tls]
cert = "{pki['good']}"
key = "{pki['good_key']}"
[well_known]
server = "{DELEGATED}:{fed_port}"
"""
    try:
        async with FakeHomeserver().running() as hs:
            toml = f'[upstream]\nurl = "{hs.url}"\n' + toml
            async with deployment(toml):
                started = asyncio.get_running_loop().time()
                results = await diagnose(tmp_path, toml, pki,
                                         f"127.0.0.1:{silent.getsockname()[1]}")
                took = asyncio.get_running_loop().time() - started
    finally:
        silent.close()
    by = {r.label: r for r in results}
    assert by["listener[local]"].message == f"unix:{sock} (http) answers /health"
    assert by["admin.blocked"].status == checks.PASS
    assert "through federation, local from 127.0.0.1, unix socket" in by["admin.blocked"].message
    assert by["federation.target[local]"].status == checks.PASS
    assert by["wellknown.client"].status == checks.WARN
    assert by["wellknown.client"].message.startswith("not served ([well_known] has no client)")
    r = by["delegation.server"]
    assert r.status == checks.FAIL
    assert "DNS lookup failed: A example.test: 127.0.0.1:" in r.message
    assert "did not answer within 5s" in r.message
    assert r.fix.startswith("check that 127.0.0.1:")
    assert by["delegation.srv"].status == checks.SKIP
    # One timeout, not one per lookup (discovery asks about ten questions).
    assert took < 20, took
    assert {k for k, r in by.items() if r.status == checks.FAIL} == {"delegation.server"}


async def test_upstream_down(pki: dict[str, str], dns: tuple[Zone, str],
                             tmp_path: pathlib.Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    toml = gate_config(down, two_ports(), pki)
    async with deployment(toml):
        results = await diagnose(tmp_path, toml, pki, dns[1])
    bad = not_passed(results)
    failed = {k for k, r in bad.items() if r.status == checks.FAIL}
    assert failed == {"upstream.versions", "upstream.keys"}, show(results)
    r = bad["upstream.versions"]
    assert r.message == f"{down} does not answer GET /_matrix/client/versions: connection refused"
    assert r.fix == "start the homeserver, or set upstream.url to where it listens"
    # What needs the homeserver's answers is not judged without them.
    assert {k for k, r in bad.items() if r.status == checks.SKIP} == {
        "delegation.server", "delegation.srv", "delegation.client", "federation.target"}


async def test_federation_certificate_for_another_name(
        pki: dict[str, str], dns: tuple[Zone, str], tmp_path: pathlib.Path) -> None:
    ports = two_ports()
    async with FakeHomeserver().running() as hs:
        toml = gate_config(hs.url, ports, pki, federation_cert="other")
        async with deployment(toml):
            results = await diagnose(tmp_path, toml, pki, dns[1])
    bad = not_passed(results)
    assert set(bad) == {"tls.names[federation]", "delegation.server"}, show(results)
    names = bad["tls.names[federation]"]
    assert names.status == checks.FAIL
    assert names.message == (f"127.0.0.1:{ports[1]}: certificate covers other.test, "
                             f"not {DELEGATED}")
    assert names.fix == f"set listeners[1].tls.cert to a certificate for {DELEGATED}"
    # A remote server is refused for the same reason.
    assert bad["delegation.server"].status == checks.FAIL
    assert "certificate verify failed" in bad["delegation.server"].message
    assert f"not valid for '{DELEGATED}'" in bad["delegation.server"].message


async def test_expired_certificate(pki: dict[str, str], dns: tuple[Zone, str],
                                   tmp_path: pathlib.Path) -> None:
    ports = two_ports()
    async with FakeHomeserver().running() as hs:
        toml = gate_config(hs.url, ports, pki, federation_cert="expired")
        async with deployment(toml):
            results = await diagnose(tmp_path, toml, pki, dns[1])
    bad = not_passed(results)
    assert set(bad) == {"tls.expiry[federation]", "delegation.server"}, show(results)
    expiry = bad["tls.expiry[federation]"]
    assert expiry.status == checks.FAIL
    assert expiry.message.startswith(f"127.0.0.1:{ports[1]}: the certificate for {DELEGATED} "
                                     "expired on ")
    assert expiry.fix.startswith("renew the certificate in listeners[1].tls.cert")
    assert "certificate has expired" in bad["delegation.server"].message


async def test_certificate_expiring_in_ten_days_is_a_warning(
        pki: dict[str, str], dns: tuple[Zone, str], tmp_path: pathlib.Path) -> None:
    ports = two_ports()
    async with FakeHomeserver().running() as hs:
        toml = gate_config(hs.url, ports, pki, cert="soon")
        path = tmp_path / "gate.toml"
        path.write_text(toml)
        async with deployment(toml):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "palpo_gate", "doctor", "--config", str(path),
                "--cafile", pki["ca"], "--resolver", dns[1],
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 90)
    text = out.decode()
    assert proc.returncode == 0, text + err.decode()  # a warning does not fail the run
    warns = [line for line in text.splitlines() if line.startswith("WARN")]
    assert len(warns) == 2, text
    for name, port in (("client", ports[0]), ("federation", ports[1])):
        line = next(w for w in warns if w.startswith(f"WARN  tls.expiry[{name}]: "))
        assert f"127.0.0.1:{port}: the certificate for {DELEGATED} expires on " in line
        assert "in 9.9 days" in line or "in 10.0 days" in line, line
        assert "(fix: renew the certificate in " in line
    assert not any(line.startswith("FAIL") for line in text.splitlines()), text
    assert text.splitlines()[-1].endswith("2 warnings, 0 failed, 0 skipped")


async def test_upstream_well_known_without_cors(
        pki: dict[str, str], dns: tuple[Zone, str], tmp_path: pathlib.Path) -> None:
    ports = two_ports()
    docs = {
        "/.well-known/matrix/server": ({"m.server": f"{DELEGATED}:{ports[1]}"}, False),
        "/.well-known/matrix/client": (
            {"m.homeserver": {"base_url": f"https://{DELEGATED}:{ports[0]}"}}, False),
    }
    async with FakeHomeserver(well_known=docs).running() as hs:
        toml = gate_config(hs.url, ports, pki, well_known=None)  # [well_known] absent
        async with deployment(toml):
            results = await diagnose(tmp_path, toml, pki, dns[1])
    bad = not_passed(results)
    assert set(bad) == {"wellknown.client", "wellknown.server"}, show(results)
    client = bad["wellknown.client"]
    assert client.status == checks.FAIL
    assert client.message == ("/.well-known/matrix/client from the homeserver, forwarded has no "
                              "Access-Control-Allow-Origin header: web clients cannot read it")
    assert client.fix == ("let the gate serve the documents with CORS: add [well_known] with "
                          f"client = \"https://{DELEGATED}:{ports[0]}\"")
    # Remote servers do not need CORS on the server document: a warning.
    assert bad["wellknown.server"].status == checks.WARN
    assert "no Access-Control-Allow-Origin header" in bad["wellknown.server"].message
    # The documents themselves are followed: delegation works.
    assert {r.label: r.status for r in results}["delegation.server"] == checks.PASS


async def test_m_server_points_at_an_unserved_port(
        pki: dict[str, str], dns: tuple[Zone, str], tmp_path: pathlib.Path) -> None:
    ports = two_ports()
    nobody = free_port()
    wk = f'server = "{DELEGATED}:{nobody}"\nclient = "https://{DELEGATED}:{ports[0]}"'
    async with FakeHomeserver().running() as hs:
        toml = gate_config(hs.url, ports, pki, well_known=wk)
        async with deployment(toml):
            results = await diagnose(tmp_path, toml, pki, dns[1])
    bad = not_passed(results)
    assert set(bad) == {"delegation.server"}, show(results)
    r = bad["delegation.server"]
    assert r.status == checks.FAIL
    assert r.message == (f"{SERVER_NAME}: well-known → {DELEGATED}:{nobody} → "
                         f"127.0.0.1:{nobody}: connection refused")
    assert r.fix == (f"no listener of this gate binds port {nobody}: set well_known.server "
                     f"(listener 'federation' binds port {ports[1]}: {DELEGATED}:{ports[1]})")


async def test_key_document_names_a_server_that_does_not_lead_here(
        pki: dict[str, str], dns: tuple[Zone, str], tmp_path: pathlib.Path) -> None:
    """The homeserver calls itself hs.test: remote servers resolve hs.test,
    which has no address, so the delegation the gate serves is never read."""
    async with FakeHomeserver(server_name="hs.test").running() as hs:
        toml = gate_config(hs.url, two_ports(), pki)
        async with deployment(toml):
            results = await diagnose(tmp_path, toml, pki, dns[1])
    bad = not_passed(results)
    assert set(bad) == {"delegation.server"}, show(results)
    r = bad["delegation.server"]
    assert r.message.startswith("hs.test: well-known → ")
    assert r.message.endswith(": hs.test has no A or AAAA record: remote servers cannot fetch "
                              "https://hs.test/.well-known/matrix/server")
    assert "correct server_name in the homeserver's config" in r.fix
    assert {r.label: r.message for r in results}["upstream.keys"].startswith(
        "server_name hs.test: ed25519:fake signature verifies")


async def test_admin_allowed_from_everywhere(
        pki: dict[str, str], dns: tuple[Zone, str], tmp_path: pathlib.Path) -> None:
    async with FakeHomeserver().running() as hs:
        toml = gate_config(hs.url, two_ports(), pki,
                           extra='[admin]\nallow_from = ["0.0.0.0/0"]')
        async with deployment(toml):
            results = await diagnose(tmp_path, toml, pki, dns[1])
    bad = not_passed(results)
    assert set(bad) == {"admin.allow_from", "admin.blocked[client]"}, show(results)
    static = bad["admin.allow_from"]
    assert static.status == checks.FAIL
    assert static.message == ("admin.allow_from contains 0.0.0.0/0: the admin API is open to "
                              "every address")
    live = bad["admin.blocked[client]"]
    assert live.status == checks.FAIL
    assert live.message == ("GET /_palpo/admin/v1/server_version from 127.0.0.1 answered 404 "
                            "from the homeserver: the admin API is reachable through this "
                            "listener")
    assert live.fix.startswith("admin.allow_from lets 127.0.0.1 in (0.0.0.0/0)")


async def test_admin_probe_comes_from_outside_allow_from(
        pki: dict[str, str], dns: tuple[Zone, str], tmp_path: pathlib.Path) -> None:
    """allow_from = 127.0.0.1 (the usual local admin): the doctor's probe
    comes from 127.0.0.2, which is outside, and is refused."""
    async with FakeHomeserver().running() as hs:
        toml = gate_config(hs.url, two_ports(), pki,
                           extra='[admin]\nallow_from = ["127.0.0.1/32"]')
        async with deployment(toml):
            results = await diagnose(tmp_path, toml, pki, dns[1])
    assert not not_passed(results), show(results)
    by = {r.label: r for r in results}
    assert by["admin.allow_from"].message == "admin API allowed from 127.0.0.1/32 only"
    assert by["admin.blocked"].message == ("/_palpo/admin, /_synapse/admin refused (403) "
                                           "through client, federation from 127.0.0.2")


async def test_srv_record_disagrees_with_well_known(
        pki: dict[str, str], dns: tuple[Zone, str], tmp_path: pathlib.Path) -> None:
    zone, resolver = dns
    ports = two_ports()
    elsewhere = free_port()
    zone.add(f"_matrix-fed._tcp.{SERVER_NAME}", "SRV",
             SRV(priority=10, weight=5, port=elsewhere, target="other.example.test."))
    async with FakeHomeserver().running() as hs:
        toml = gate_config(hs.url, ports, pki)
        async with deployment(toml):
            results = await diagnose(tmp_path, toml, pki, resolver)
    bad = not_passed(results)
    assert set(bad) == {"delegation.srv"}, show(results)
    r = bad["delegation.srv"]
    assert r.status == checks.FAIL
    assert r.message == (
        f"SRV _matrix-fed._tcp.{SERVER_NAME} → other.example.test:{elsewhere} disagrees with "
        f".well-known/matrix/server (m.server {DELEGATED}:{ports[1]} → {DELEGATED}:{ports[1]}):"
        f" a remote server whose well-known lookup fails goes to other.example.test:{elsewhere}")
    assert r.fix == (f"delete the SRV record _matrix-fed._tcp.{SERVER_NAME}, or point it at "
                     f"{DELEGATED}:{ports[1]}")


async def test_srv_record_that_agrees_passes(
        pki: dict[str, str], dns: tuple[Zone, str], tmp_path: pathlib.Path) -> None:
    zone, resolver = dns
    ports = two_ports()
    zone.add(f"_matrix-fed._tcp.{SERVER_NAME}", "SRV",
             SRV(priority=10, weight=5, port=ports[1], target=f"{DELEGATED}."))
    async with FakeHomeserver().running() as hs:
        toml = gate_config(hs.url, ports, pki)
        async with deployment(toml):
            results = await diagnose(tmp_path, toml, pki, resolver)
    assert not not_passed(results), show(results)
    srv = next(r for r in results if r.id == "delegation.srv")
    assert srv.message == (f"SRV _matrix-fed._tcp.{SERVER_NAME} → {DELEGATED}:{ports[1]} agrees "
                           f"with m.server {DELEGATED}:{ports[1]}")


class Website:
    """The main website of the server name, serving the delegation documents
    itself (HTTPS, certificate for example.test)."""

    def __init__(self, pki: dict[str, str], docs: dict[str, Any]) -> None:
        self.pki = pki
        self.docs = docs
        self.port = 0

    async def handle(self, request: web.BaseRequest) -> web.Response:
        if request.path in self.docs:
            return web.json_response(self.docs[request.path],
                                     headers={"Access-Control-Allow-Origin": "*"})
        return web.Response(status=404, text="not found")

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Website]:
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.pki["good"], self.pki["good_key"])
        runner = web.ServerRunner(web.Server(self.handle), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        self.port = runner.addresses[0][1]
        try:
            yield self
        finally:
            await runner.cleanup()


@pytest.mark.parametrize("gate_answers_for_server_name", [False, True])
async def test_well_known_served_by_the_website(
        gate_answers_for_server_name: bool, pki: dict[str, str], dns: tuple[Zone, str],
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """example.test's own web server serves the delegation; the gate serves
    matrix.example.test only. Remote servers fetch https://example.test/
    (port 443, which a test cannot bind: the doctor is told another port)."""
    from palpo_gate.doctor import fetch

    ports = two_ports()
    docs = {"/.well-known/matrix/server": {"m.server": f"{DELEGATED}:{ports[1]}"},
            "/.well-known/matrix/client": {
                "m.homeserver": {"base_url": f"https://{DELEGATED}:{ports[0]}"}}}
    # The gate either refuses Host example.test (hosts), or answers it with
    # the homeserver's 404 (no [well_known]): both times the website counts.
    hosts = "" if gate_answers_for_server_name else f'hosts = ["{DELEGATED}"]'
    async with Website(pki, docs).running() as site, FakeHomeserver().running() as hs:
        monkeypatch.setattr(fetch, "WELL_KNOWN_PORT", site.port)
        toml = gate_config(hs.url, ports, pki, well_known=None, hosts=hosts)
        async with deployment(toml):
            results = await diagnose(tmp_path, toml, pki, dns[1])
    assert not not_passed(results), show(results)
    by = {r.label: r.message for r in results}
    assert by["wellknown.server"] == (f'{{"m.server": "{DELEGATED}:{ports[1]}"}} from '
                                      f"https://{SERVER_NAME}/, JSON with CORS headers")
    assert by["delegation.server"].startswith(
        f"{SERVER_NAME}: well-known → {DELEGATED}:{ports[1]} → 127.0.0.1:{ports[1]}: "
        "listener 'federation'")
    assert by["delegation.client"].startswith(f"base_url https://{DELEGATED}:{ports[0]} → ")


# --------------------------------------------------------------------------
# A proxy between the gate and the homeserver that decodes %2F


class NormalisingProxy:
    """Forwards to *upstream* with every %2F in the path decoded to "/" (as
    nginx does with ``proxy_pass http://backend/;``, a URI part)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.url = ""
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.BaseRequest) -> web.Response:
        path, sep, query = request.raw_path.partition("?")
        target = path.replace("%2F", "/").replace("%2f", "/") + sep + query
        assert self.session is not None
        async with self.session.get(URL(self.upstream + target, encoded=True),
                                    headers={"Host": request.host}) as resp:
            body = await resp.read()
            return web.Response(status=resp.status, body=body,
                                content_type=resp.content_type)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[NormalisingProxy]:
        self.session = aiohttp.ClientSession(auto_decompress=False)
        runner = web.ServerRunner(web.Server(self.handle), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            yield self
        finally:
            await runner.cleanup()
            await self.session.close()


@pytest.mark.timeout(180)
async def test_proxy_that_decodes_encoded_slash_is_caught(
        synapse: SynapseServer, pki: dict[str, str], dns: tuple[Zone, str],
        tmp_path: pathlib.Path) -> None:
    async with NormalisingProxy(synapse.url).running() as proxy:
        toml = gate_config(proxy.url, two_ports(), pki)
        async with deployment(toml):
            results = await diagnose(tmp_path, toml, pki, dns[1])
    bad = not_passed(results)
    assert set(bad) == {"federation.target[client]", "federation.target[federation]"}, \
        show(results)
    r = bad["federation.target[federation]"]
    assert r.status == checks.FAIL
    assert r.message == (
        "/_matrix/key/v2/server/ed25519%3Adoctor%2Fprobe?doctor=%2F%3F%25%20 answers 404 but "
        "/_matrix/key/v2/server/ed25519%3Adoctor answers the key document, through the gate "
        f"and directly at upstream.url: something at or behind {proxy.url} decodes %2F before "
        "the homeserver routes the request; X-Matrix signatures over such paths fail with 401")
    assert r.fix.startswith("point upstream.url at the homeserver itself")


# --------------------------------------------------------------------------
# The command line: exit status, JSON, usage


async def test_cli_exit_1_and_json_when_a_check_fails(
        pki: dict[str, str], dns: tuple[Zone, str], tmp_path: pathlib.Path) -> None:
    ports = two_ports()
    async with FakeHomeserver().running() as hs:
        toml = gate_config(hs.url, ports, pki, federation_cert="other")
        path = tmp_path / "gate.toml"
        path.write_text(toml)
        async with deployment(toml):
            outs = []
            for extra in ((), ("--json",)):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "palpo_gate", "doctor", "-c", str(path),
                    "--cafile", pki["ca"], "--resolver", dns[1], *extra,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                out, _ = await asyncio.wait_for(proc.communicate(), 90)
                outs.append((proc.returncode, out.decode()))
    (rc_text, text), (rc_json, js) = outs
    assert rc_text == 1 and rc_json == 1
    assert (f"FAIL  tls.names[federation]: 127.0.0.1:{ports[1]}: certificate covers other.test, "
            f"not {DELEGATED} (fix: set listeners[1].tls.cert to a certificate for "
            f"{DELEGATED})") in text.splitlines()
    doc = json.loads(js)
    assert doc["ok"] is False
    assert doc["config"] == str(path)
    assert doc["counts"]["fail"] == 2
    failed = [c for c in doc["checks"] if c["status"] == "fail"]
    assert [(c["id"], c["subject"]) for c in failed] == [
        ("tls.names", "federation"), ("delegation.server", "")]
    assert failed[0]["fix"] == f"set listeners[1].tls.cert to a certificate for {DELEGATED}"
    # The same results as the text, line for line.
    assert len(doc["checks"]) == len(text.splitlines()) - 1


def test_cli_invalid_config_is_a_failed_check(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "gate.toml"
    path.write_text('[upstream]\nurl = "http://127.0.0.1:1"\nbogus = 1\n')
    done = subprocess.run([sys.executable, "-m", "palpo_gate", "doctor", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        f"FAIL  config: {path} is not valid: upstream.bogus: unknown key "
        f"(fix: run `palpo-gate check --config {path}` and fix each key it names)",
        "0 passed, 0 warnings, 1 failed, 0 skipped"]


@pytest.mark.parametrize(("args", "message"), [
    (("--resolver", "dns.example:53"), "--resolver: 'dns.example:53': the resolver must be an "
                                       "IP address"),
    (("--cafile", "/nonexistent/ca.pem"), "--cafile /nonexistent/ca.pem: not a readable file"),
])
def test_cli_usage_errors_exit_2(args: tuple[str, ...], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "palpo_gate", "doctor", *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == f"palpo-gate doctor: {message}"
    assert done.stdout == ""
