"""Tables for the doctor's pure parts: server discovery (``discovery.py``) and
every check (``checks.py``) over hand-made facts. No sockets.

Certificates are minted here with cryptography; key documents are signed
with signedjson, so the doctor's own ed25519 verification is checked against
an independent implementation.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from signedjson.key import generate_signing_key, get_verify_key
from signedjson.sign import sign_json

from palpo_gate import config as configmod
from palpo_gate import doctor
from palpo_gate.config import Tls
from palpo_gate.doctor import checks, discovery
from palpo_gate.doctor.checks import FAIL, PASS, SKIP, WARN
from palpo_gate.doctor.discovery import Need, Route
from palpo_gate.doctor.facts import AdminProbe, Attempt, Facts, Http, Lookup, TlsProbe

NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)
MINUTE = datetime.timedelta(minutes=1)
S = "example.test"
D = "matrix.example.test"

BASE_TOML = f"""
[upstream]
url = "http://127.0.0.1:8008"
[[listeners]]
name = "client"
bind = "127.0.0.1:8443"
role = "client"
[[listeners]]
name = "federation"
bind = "0.0.0.0:8448"
role = "federation"
[well_known]
server = "{D}:8448"
client = "https://{D}:8443"
"""


def cfg(extra: str = "", toml: str = BASE_TOML, tls: bool = False) -> configmod.Config:
    c = configmod.loads(toml + extra)
    if tls:
        c = dataclasses.replace(c, listeners=tuple(
            dataclasses.replace(lst, tls=Tls("cert.pem", "key.pem")) for lst in c.listeners))
    return c


def facts(c: configmod.Config | None = None, **kw: Any) -> Facts:
    f = Facts(cfg=c or cfg(), now=NOW)
    for k, v in kw.items():
        setattr(f, k, v)
    return f


def http(status: int = 200, body: Any = b"", headers: dict[str, str] | None = None,
         error: str = "", what: str = "GET x") -> Http:
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    return Http(what, status if not error else 0, tuple((headers or {}).items()), body, error)


def lookups(*items: tuple[str, str, tuple[Any, ...]]) -> dict[tuple[str, str], Lookup]:
    return {(n, t): Lookup(n, t, r) for n, t, r in items}


# --------------------------------------------------------------------------
# Certificates and key documents


_CA_KEY = ec.generate_private_key(ec.SECP256R1())


def der(names: tuple[str, ...] = (D,), ips: tuple[str, ...] = (), *,
        before: datetime.datetime = NOW - 30 * DAY, after: datetime.datetime = NOW + 60 * DAY,
        san: bool = True, cn: str = "leaf") -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(before).not_valid_after(after))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(n) for n in names]
            + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]), False)
    return b.sign(_CA_KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


_SIGNING_KEY = generate_signing_key("k1")
_VERIFY_B64 = __import__("base64").b64encode(
    get_verify_key(_SIGNING_KEY).encode()).decode().rstrip("=")


def key_doc(server_name: str = S, until: datetime.datetime = NOW + DAY,
            sign_as: str | None = None, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "server_name": server_name,
        "valid_until_ts": int(until.timestamp() * 1000),
        "verify_keys": {"ed25519:k1": {"key": _VERIFY_B64}},
        "old_verify_keys": {},
    }
    signed = sign_json(doc, sign_as or server_name, _SIGNING_KEY)
    signed.update(changes)
    return signed


# --------------------------------------------------------------------------
# discovery.split_host_port


@pytest.mark.parametrize(("name", "expected"), [
    ("example.com", ("example.com", None)),
    ("Example.COM.", ("example.com", None)),
    ("example.com:8448", ("example.com", 8448)),
    ("1.2.3.4", ("1.2.3.4", None)),
    ("1.2.3.4:443", ("1.2.3.4", 443)),
    ("[::1]", ("::1", None)),
    ("[2001:db8::1]:8448", ("2001:db8::1", 8448)),
])
def test_split_host_port(name: str, expected: tuple[str, int | None]) -> None:
    assert discovery.split_host_port(name) == expected


@pytest.mark.parametrize("name", [
    "", "https://example.com", "example.com/x", "example.com:0", "example.com:65536",
    "example.com:x", "::1", "[::1", "[nothost]:1", ":8448", "[::1]x", "a b",
])
def test_split_host_port_refuses(name: str) -> None:
    with pytest.raises(ValueError):
        discovery.split_host_port(name)


# --------------------------------------------------------------------------
# discovery.discover: the Matrix spec's steps, over given DNS answers

A = "A"
AAAA = "AAAA"
SRV = "SRV"
FED = f"_matrix-fed._tcp.{D}"

DISCOVERY_CASES: list[tuple[str, str, str | None, dict[tuple[str, str], Lookup], Route]] = [
    ("1. IP literal, default port", "10.0.0.1", None, {},
     Route("IP literal", "10.0.0.1", "10.0.0.1", (("10.0.0.1", 8448),), (("10.0.0.1", 8448),))),
    ("1. IPv6 literal with port", "[2001:db8::1]:9000", None, {},
     Route("IP literal", "[2001:db8::1]:9000", "2001:db8::1", (("2001:db8::1", 9000),),
           (("2001:db8::1", 9000),))),
    ("2. explicit port: A/AAAA, no well-known", f"{S}:1234", "ignored:1",
     lookups((S, A, ("10.0.0.1",)), (S, AAAA, ("2001:db8::5",))),
     Route("explicit port", f"{S}:1234", S, ((S, 1234),),
           (("10.0.0.1", 1234), ("2001:db8::5", 1234)))),
    ("3.1 well-known names an IP", S, "10.9.9.9",
     lookups((S, A, ("10.0.0.1",)), (S, AAAA, ())),
     Route("well-known", "10.9.9.9", "10.9.9.9", (("10.9.9.9", 8448),),
           (("10.9.9.9", 8448),))),
    ("3.2 well-known with a port", S, f"{D}:443",
     lookups((S, A, ("10.0.0.1",)), (S, AAAA, ()), (D, A, ("10.0.0.2",)), (D, AAAA, ())),
     Route("well-known", f"{D}:443", D, ((D, 443),), (("10.0.0.2", 443),))),
    ("3.3 well-known without port, SRV _matrix-fed", S, D,
     lookups((S, A, ("10.0.0.1",)), (S, AAAA, ()),
             (FED, SRV, ((10, 0, 8449, "fed.example.test."),)),
             ("fed.example.test", A, ("10.0.0.3",)), ("fed.example.test", AAAA, ()),),
     Route(f"well-known, then SRV {FED}", D, D, (("fed.example.test", 8449),),
           (("10.0.0.3", 8449),))),
    ("3.4 only the deprecated _matrix._tcp", S, D,
     lookups((S, A, ("10.0.0.1",)), (S, AAAA, ()), (FED, SRV, ()),
             (f"_matrix._tcp.{D}", SRV, ((10, 0, 8450, f"{D}."),)),
             (D, A, ("10.0.0.2",)), (D, AAAA, ())),
     Route(f"well-known, then SRV _matrix._tcp.{D}", D, D, ((D, 8450),),
           (("10.0.0.2", 8450),))),
    ("3.5 well-known without port, no SRV: 8448", S, D,
     lookups((S, A, ("10.0.0.1",)), (S, AAAA, ()), (FED, SRV, ()),
             (f"_matrix._tcp.{D}", SRV, ()), (D, A, ("10.0.0.2",)), (D, AAAA, ())),
     Route("well-known, no SRV: port 8448", D, D, ((D, 8448),), (("10.0.0.2", 8448),))),
    ("4. no well-known, SRV on the server name: Host and TLS name stay the server name", S,
     None,
     lookups((f"_matrix-fed._tcp.{S}", SRV, ((5, 0, 443, f"{D}."),)),
             (D, A, ("10.0.0.2",)), (D, AAAA, ())),
     Route(f"SRV _matrix-fed._tcp.{S}", S, S, ((D, 443),), (("10.0.0.2", 443),))),
    ("6. nothing: the server name on 8448", S, None,
     lookups((f"_matrix-fed._tcp.{S}", SRV, ()), (f"_matrix._tcp.{S}", SRV, ()),
             (S, A, ("10.0.0.1",)), (S, AAAA, ())),
     Route("no well-known, no SRV: port 8448", S, S, ((S, 8448),), (("10.0.0.1", 8448),))),
    ("SRV order: priority, then weight", S, None,
     lookups((f"_matrix-fed._tcp.{S}", SRV, ((20, 0, 3, "c.test."), (10, 1, 2, "b.test."),
                                                (10, 9, 1, "a.test."))),
             ("a.test", A, ("10.0.0.1",)), ("a.test", AAAA, ()),
             ("b.test", A, ("10.0.0.2",)), ("b.test", AAAA, ()),
             ("c.test", A, ("10.0.0.3",)), ("c.test", AAAA, ())),
     Route(f"SRV _matrix-fed._tcp.{S}", S, S, (("a.test", 1), ("b.test", 2), ("c.test", 3)),
           (("10.0.0.1", 1), ("10.0.0.2", 2), ("10.0.0.3", 3)))),
    ("the delegated host has no address", S, f"{D}:443",
     lookups((S, A, ("10.0.0.1",)), (S, AAAA, ()), (D, A, ()), (D, AAAA, ())),
     Route("well-known", f"{D}:443", D, ((D, 443),), (),
           f"{D} has no A or AAAA record")),
    ("the server name has no address: the well-known cannot be fetched", S, f"{D}:443",
     lookups((S, A, ()), (S, AAAA, ()), (D, A, ("10.0.0.2",)), (D, AAAA, ())),
     Route("well-known", f"{D}:443", D, ((D, 443),), (("10.0.0.2", 443),), "",
           f"{S} has no A or AAAA record: remote servers cannot fetch "
           f"https://{S}/.well-known/matrix/server")),
    ("SRV target '.': no service", S, None,
     lookups((f"_matrix-fed._tcp.{S}", SRV, ((0, 0, 0, "."),))),
     Route(f"SRV _matrix-fed._tcp.{S}", S, S, ((".", 0),), (),
           "the SRV record's target is \".\" (service not available)")),
]


@pytest.mark.parametrize(("server_name", "m_server", "dns", "expected"),
                         [c[1:] for c in DISCOVERY_CASES], ids=[c[0] for c in DISCOVERY_CASES])
def test_discover(server_name: str, m_server: str | None,
                  dns: dict[tuple[str, str], Lookup], expected: Route) -> None:
    assert discovery.discover(server_name, m_server, dns) == expected


def test_discover_asks_for_each_lookup_in_the_spec_order() -> None:
    """Well-known without a port, nothing in DNS but the delegated host's A:
    the questions come one at a time, in the order of the spec's steps."""
    answers = lookups((S, A, ("10.0.0.1",)), (S, AAAA, ()), (FED, SRV, ()),
                      (f"_matrix._tcp.{D}", SRV, ()), (D, A, ("10.0.0.2",)), (D, AAAA, ()))
    known: dict[tuple[str, str], Lookup] = {}
    asked = []
    while isinstance(got := discovery.discover(S, D, known), Need):
        asked.append((got.qname, got.qtype))
        known[(got.qname, got.qtype)] = answers[(got.qname, got.qtype)]
    assert asked == [(S, A), (S, AAAA), (FED, SRV), (f"_matrix._tcp.{D}", SRV), (D, A),
                     (D, AAAA)]
    assert got.endpoints == (("10.0.0.2", 8448),)


def test_discover_reports_dns_errors() -> None:
    dns = {(S, A): Lookup(S, A, (), "timed out"), (S, AAAA): Lookup(S, AAAA, (), "timed out"),
           (f"_matrix-fed._tcp.{S}", SRV): Lookup("", SRV),
           (f"_matrix._tcp.{S}", SRV): Lookup("", SRV)}
    route = discovery.discover(S, None, dns)
    assert isinstance(route, Route)
    assert route.problem == f"DNS lookup failed: A {S}: timed out; AAAA {S}: timed out"


# --------------------------------------------------------------------------
# Certificates: names and dates


@pytest.mark.parametrize(("names", "ips", "name", "covered"), [
    ((D,), (), D, True),
    ((D,), (), D.upper(), True),
    ((D,), (), S, False),
    (("*.example.test",), (), D, True),
    (("*.example.test",), (), S, False),  # a wildcard does not cover the apex
    (("*.example.test",), (), "a.matrix.example.test", False),  # nor two labels
    (("*.test",), (), "example.test", True),
    ((), ("127.0.0.1",), "127.0.0.1", True),
    ((D,), (), "127.0.0.1", False),
    ((), ("::1",), "0:0::1", True),
])
def test_covers(names: tuple[str, ...], ips: tuple[str, ...], name: str,
                covered: bool) -> None:
    cert = x509.load_der_x509_certificate(der(names, ips))
    assert checks.covers(cert, name) is covered


def test_common_name_alone_covers_nothing() -> None:
    cert = x509.load_der_x509_certificate(der(san=False, cn=D))
    assert checks.covers(cert, D) is False


def tls_facts(probes: list[TlsProbe], names: tuple[str, ...] = (D,)) -> Facts:
    return facts(cfg(tls=True), tls={"federation": probes}, tls_names={"federation": names},
                 cafile="/etc/ca.pem")


def probe(leaf: bytes = b"", name: str = D, **kw: Any) -> TlsProbe:
    return TlsProbe("127.0.0.1:8448", name, leaf=leaf, version="TLSv1.3", **kw)


def fed_results(f: Facts) -> dict[str, checks.Result]:
    return {r.id: r for r in checks.check_tls(f) if r.subject == "federation"}


@pytest.mark.parametrize(("after", "status", "text"), [
    (NOW + 60 * DAY, PASS, "valid until 2027-01-30 12:00 UTC (60 days)"),
    (NOW + 14 * DAY + MINUTE, PASS, "(14 days)"),
    (NOW + 14 * DAY - MINUTE, WARN, "expires on 2026-12-15 11:59 UTC, in 14.0 days"),
    (NOW + 10 * DAY, WARN, "in 10.0 days"),
    (NOW + 7 * DAY + MINUTE, WARN, "in 7.0 days"),
    (NOW + 7 * DAY - MINUTE, FAIL, "in 7.0 days"),
    (NOW + DAY / 2, FAIL, "in 0.5 days"),
    (NOW - DAY, FAIL, "expired on 2026-11-30 12:00 UTC"),
])
def test_expiry_thresholds(after: datetime.datetime, status: str, text: str) -> None:
    r = fed_results(tls_facts([probe(der(after=after))]))["tls.expiry"]
    assert r.status == status, r
    assert text in r.message
    if status != PASS:
        assert r.fix.startswith("renew the certificate in listeners[1].tls.cert")


def test_expiry_reports_the_soonest_of_several_certificates() -> None:
    soon = probe(der((S,), after=NOW + 3 * DAY), name=S)
    later = probe(der(after=NOW + 90 * DAY))
    r = fed_results(tls_facts([later, soon], (D, S)))["tls.expiry"]
    assert r.status == FAIL
    assert r.message == "127.0.0.1:8448: the certificate for example.test expires on " \
                        "2026-12-04 12:00 UTC, in 3.0 days"


def test_not_yet_valid() -> None:
    r = fed_results(tls_facts([probe(der(before=NOW + DAY))]))["tls.expiry"]
    assert r.status == FAIL
    assert "is not valid before 2026-12-02 12:00 UTC" in r.message


def test_names_for_every_name_served() -> None:
    probes = [probe(der((D, S)), name=D), probe(der((D,)), name=S)]
    r = fed_results(tls_facts(probes, (D, S)))["tls.names"]
    assert (r.status, r.message, r.fix) == (
        FAIL, f"127.0.0.1:8448: certificate covers {D}, not {S}",
        f"set listeners[1].tls.cert to a certificate for {S}")


def test_names_fix_mentions_sni_entries_when_the_listener_has_them() -> None:
    c = cfg(tls=True)
    lst = dataclasses.replace(c.listeners[1], tls=Tls("c", "k", sni=(
        configmod.SniCert(("x.test",), "c2", "k2"),)))
    c = dataclasses.replace(c, listeners=(c.listeners[0], lst))
    f = facts(c, tls={"federation": [probe(der(("other.test",)))]},
              tls_names={"federation": (D,)})
    r = fed_results(f)["tls.names"]
    assert r.fix.endswith(f", or add a [[listeners.tls.sni]] entry for {D}")


@pytest.mark.parametrize(("verify_error", "fix_start"), [
    ("unable to get local issuer certificate", "put the whole chain"),
    ("self-signed certificate", "use a certificate from a CA that remote servers trust"),
    ("certificate signature failure", "replace listeners[1].tls.cert with"),
])
def test_chain(verify_error: str, fix_start: str) -> None:
    r = fed_results(tls_facts([probe(der(), verify_error=verify_error)]))["tls.chain"]
    assert r.status == FAIL
    assert r.message == (f"127.0.0.1:8448: the certificate for {D} does not verify against "
                         f"the system store and /etc/ca.pem: {verify_error}")
    assert r.fix.startswith(fix_start)


def test_handshake_failure_skips_the_rest() -> None:
    got = fed_results(tls_facts([probe(error="connection refused")]))
    assert got["tls.handshake"].status == FAIL
    assert got["tls.handshake"].message == \
        f"127.0.0.1:8448 does not complete a TLS handshake for {D}: connection refused"
    assert [got[c].status for c in ("tls.chain", "tls.names", "tls.expiry")] == [SKIP] * 3


def test_no_name_known_still_checks_chain_and_dates() -> None:
    got = fed_results(tls_facts([probe(der(), name="")], ()))
    assert got["tls.handshake"].message == "127.0.0.1:8448 answers TLSv1.3 (no SNI)"
    assert got["tls.names"].status == SKIP
    assert got["tls.chain"].status == PASS and got["tls.expiry"].status == PASS


def test_systemd_listener_is_skipped() -> None:
    f = tls_facts([])
    f.unreachable["federation"] = "systemd:fed is a socket systemd passes in"
    assert [(r.id, r.status) for r in checks.check_tls(f) if r.subject == "federation"] == \
        [("tls", SKIP)]


# --------------------------------------------------------------------------
# Which names, where to connect


@pytest.mark.parametrize(("extra", "listener", "m_server", "base", "server_name", "names"), [
    ("", 1, f"{D}:8448", None, S, (D,)),
    ("", 1, None, None, S, (S,)),  # no delegation: remote servers use the server name
    ("", 1, "10.0.0.1:8448", None, S, ("10.0.0.1",)),
    ("", 0, None, f"https://{D}:8443", S, (D,)),
    ("", 0, None, None, f"{S}:8448", (S,)),
    ("", 0, None, None, None, ()),
    ('hosts = ["b.test", "a.test"]\n', 2, f"{D}:8448", None, S, ("a.test", "b.test")),
])
def test_listener_names(extra: str, listener: int, m_server: str | None, base: str | None,
                        server_name: str | None, names: tuple[str, ...]) -> None:
    toml = BASE_TOML + f'[[listeners]]\nname = "third"\nbind = "127.0.0.1:9"\n{extra}'
    c = cfg(toml=toml)
    assert checks.listener_names(c, c.listeners[listener], m_server, base, server_name) == names


@pytest.mark.parametrize(("bind", "host", "reason"), [
    ("127.0.0.1:8443", "127.0.0.1", ""),
    ("0.0.0.0:8443", "127.0.0.1", ""),
    ("[::]:8443", "::1", ""),
    ("[2001:db8::1]:8443", "2001:db8::1", ""),
    ("127.0.0.1:0", "127.0.0.1", "127.0.0.1:0: port 0 is chosen when the gate starts"),
])
def test_where_the_doctor_connects(bind: str, host: str, reason: str) -> None:
    b = configmod.parse_bind(bind)
    assert checks.connect_host(b) == host
    assert checks.reachable(b) == reason


def test_systemd_bind_is_unreachable() -> None:
    assert "systemd passes in" in checks.reachable(configmod.parse_bind("systemd:fed"))


@pytest.mark.parametrize(("address", "port", "names"), [
    ("127.0.0.1", 8443, ["client"]),
    ("127.0.0.1", 8448, ["federation"]),  # 0.0.0.0 takes every IPv4 address
    ("10.1.2.3", 8448, ["federation"]),
    ("10.1.2.3", 8443, []),  # client binds 127.0.0.1 only
    ("::1", 8448, []),  # 0.0.0.0 is IPv4 only
    ("127.0.0.1", 9999, []),
])
def test_listeners_at(address: str, port: int, names: list[str]) -> None:
    assert [lst.name for lst in checks.listeners_at(cfg(), address, port)] == names


# --------------------------------------------------------------------------
# The upstream


def up(versions: Http | None = None, keys: Http | None = None) -> dict[str, Http]:
    return {"versions": versions or http(body={"versions": ["v1.1", "v1.12"]}),
            "keys": keys or http(body=key_doc())}


@pytest.mark.parametrize(("versions", "status", "text"), [
    (http(body={"versions": ["r0.6.1", "v1.12"]}), PASS, "answers Matrix versions r0.6.1 … v1.12"),
    (http(error="connection refused"), FAIL,
     "http://127.0.0.1:8008 does not answer GET /_matrix/client/versions: connection refused"),
    (http(502, b"bad gateway"), FAIL, "answers GET /_matrix/client/versions with 502"),
    (http(body=b"<html>"), FAIL, "something that is not Matrix JSON"),
    (http(body={"versions": []}), FAIL, "not Matrix JSON"),
    (http(body={"versions": [1]}), FAIL, "not Matrix JSON"),
])
def test_upstream_versions(versions: Http, status: str, text: str) -> None:
    r = checks.check_upstream(facts(upstream=up(versions=versions)))[0]
    assert r.id == "upstream.versions"
    assert r.status == status and text in r.message, r


@pytest.mark.parametrize(("doc", "status", "text"), [
    (key_doc(), PASS, "server_name example.test: ed25519:k1 signature verifies, valid until "
                      "2026-12-02 12:00 UTC"),
    (key_doc(server_name="other.test"), PASS, "server_name other.test"),
    (key_doc(valid_until_ts=1), FAIL, "the signature by ed25519:k1 does not verify"),
    (key_doc(old_verify_keys={"ed25519:x": {"key": "AAAA"}}), FAIL, "does not verify"),
    (key_doc(sign_as="other.test"), FAIL, "not signed by example.test"),
    (key_doc(until=NOW - DAY), FAIL, "valid_until_ts 2026-11-30 12:00 UTC has passed"),
    (key_doc(verify_keys={}), FAIL, "no ed25519 key in verify_keys"),
    (key_doc(server_name=None), FAIL, "no server_name"),
    (["not", "an", "object"], FAIL, "not a JSON object"),
])
def test_upstream_keys(doc: Any, status: str, text: str) -> None:
    r = checks.check_upstream(facts(upstream=up(keys=http(body=doc))))[1]
    assert r.id == "upstream.keys"
    assert r.status == status and text in r.message, r


def test_key_signature_over_unsigned_and_signatures_excluded() -> None:
    """Matrix signs the object without "signatures" and "unsigned": adding
    "unsigned" keeps the signature valid."""
    r = checks.check_upstream(facts(upstream=up(keys=http(body=key_doc(unsigned={"x": 1})))))[1]
    assert r.status == PASS


@pytest.mark.parametrize(("a", "b", "same"), [
    (http(body=key_doc()), http(body=key_doc()), True),
    # Palpo signs each answer anew with a fresh valid_until_ts.
    (http(body=key_doc()), http(body=key_doc(until=NOW + 2 * DAY)), True),
    (http(body=key_doc()), http(body=key_doc(server_name="x.test")), False),
    (http(body=key_doc()), http(404, key_doc()), False),
    (http(body=b"x"), http(body=b"y"), False),
])
def test_same_keys(a: Http, b: Http, same: bool) -> None:
    assert checks.same_keys(a, b) is same


# --------------------------------------------------------------------------
# Delegation documents

CORS = {"Access-Control-Allow-Origin": "*", "Content-Type": "application/json"}
JSON = {"Content-Type": "application/json"}
NO_WK = "\n".join(BASE_TOML.splitlines()[:-3])


@pytest.mark.parametrize(("toml", "doc", "status", "text"), [
    (BASE_TOML, http(body={"m.server": f"{D}:8448"}, headers=CORS), PASS,
     "from the gate's [well_known], JSON with CORS headers"),
    (NO_WK, http(body={"m.server": f"{D}:8448"}, headers=CORS), PASS,
     "from the homeserver, forwarded, JSON with CORS headers"),
    (NO_WK, http(body={"m.server": D}, headers=JSON), WARN, "no Access-Control-Allow-Origin"),
    (NO_WK, http(body={"m.server": D}, headers={"Access-Control-Allow-Origin": "*"}), WARN,
     "Content-Type is missing, not application/json"),
    (NO_WK, http(404, {"errcode": "M_NOT_FOUND"}), PASS, "not served (404 from the homeserver)"),
    (NO_WK, http(502, b""), FAIL, "/.well-known/matrix/server answers 502"),
    (NO_WK, http(body=b"{", headers=CORS), FAIL, "not a valid document (from the homeserver, "
                                                 "forwarded): not JSON"),
    (NO_WK, http(body={"server": D}, headers=CORS), FAIL, "no 'm.server'"),
    (NO_WK, http(body={"m.server": 8448}, headers=CORS), FAIL, "m.server is not a string"),
    (NO_WK, http(body={"m.server": "https://x"}, headers=CORS), FAIL, "is not a host"),
    (NO_WK, http(error="connection refused"), FAIL, "no answer through listener 'client'"),
    (NO_WK, http(421, b""), FAIL, "listener 'client' refuses Host example.test (421)"),
])
def test_well_known_server(toml: str, doc: Http, status: str, text: str) -> None:
    f = facts(cfg(toml=toml), wk_server=doc, wk_listener="client", wk_host=S)
    r = checks.check_wellknown(f)[0]
    assert r.id == "wellknown.server"
    assert r.status == status and text in r.message, r


def test_well_known_the_gate_does_not_serve() -> None:
    """[well_known] with a client document only: the server document is the
    gate's own 404, meaning no delegation."""
    f = facts(cfg(toml=NO_WK + f'\n[well_known]\nclient = "https://{D}"\n'),
              wk_server=http(404), wk_client=http(body=CLIENT_DOC, headers=CORS),
              wk_listener="client", wk_host=S)
    server, client = checks.check_wellknown(f)
    assert (server.status, server.message) == (
        PASS, "not served ([well_known] has no server): no delegation; remote servers look up "
              "SRV records, then port 8448 of the server name")
    assert client.status == PASS


def test_well_known_from_the_server_names_website() -> None:
    """No listener answers for the server name: the documents were fetched
    from https://example.test/, and fixes point there."""
    f = facts(cfg(toml=NO_WK), wk_server=http(body={"m.server": f"{D}:8448"}, headers=JSON),
              wk_client=http(body=CLIENT_DOC, headers=JSON), wk_listener="", wk_host=S)
    server, client = checks.check_wellknown(f)
    assert (server.status, server.message, server.fix) == (
        WARN, f'{{"m.server": "{D}:8448"}} from https://{S}/; no Access-Control-Allow-Origin '
              "header", f"make https://{S}/ send them")
    assert (client.status, client.fix) == (
        FAIL, f"make https://{S}/ send Access-Control-Allow-Origin: * with it")
    f.wk_server = http(error="connection refused")
    assert checks.check_wellknown(f)[0].message == \
        f"no answer from https://{S}/: connection refused"


def test_well_known_421_fix_names_the_hosts_key() -> None:
    f = facts(wk_server=http(421), wk_client=http(421), wk_listener="federation",
              wk_host=f"{S}:8448")
    r = checks.check_wellknown(f)[0]
    assert r.fix == "add example.test to listeners[1].hosts"


CLIENT_DOC = {"m.homeserver": {"base_url": f"https://{D}"}}


@pytest.mark.parametrize(("toml", "doc", "status", "text"), [
    (BASE_TOML, http(body=CLIENT_DOC, headers=CORS), PASS,
     f"base_url https://{D} from the gate's [well_known], JSON with CORS headers"),
    (NO_WK, http(body=CLIENT_DOC, headers=JSON), FAIL,
     "from the homeserver, forwarded has no Access-Control-Allow-Origin header: web clients "
     "cannot read it"),
    (NO_WK, http(body=CLIENT_DOC, headers={**JSON, "Access-Control-Allow-Origin": "https://a"}),
     FAIL, "Access-Control-Allow-Origin is 'https://a', not '*'"),
    (NO_WK, http(404), WARN, "clients cannot find the homeserver from a user ID"),
    (NO_WK, http(body={"m.homeserver": {}}, headers=CORS), FAIL, "no 'base_url'"),
    (NO_WK, http(body={"m.homeserver": {"base_url": "matrix.example.test"}}, headers=CORS), FAIL,
     "is not an http(s) URL"),
    (NO_WK, http(body={**CLIENT_DOC, "m.identity_server": {"base_url": 3}}, headers=CORS), FAIL,
     "m.identity_server has no valid base_url"),
])
def test_well_known_client(toml: str, doc: Http, status: str, text: str) -> None:
    f = facts(cfg(toml=toml), wk_client=doc, wk_listener="client", wk_host=S)
    r = checks.check_wellknown(f)[1]
    assert r.id == "wellknown.client"
    assert r.status == status and text in r.message, r


# --------------------------------------------------------------------------
# Delegation: where discovery ends, SRV agreement, the base URL

DNS_OK = lookups((S, A, ("127.0.0.1",)), (S, AAAA, ()), (D, A, ("127.0.0.1",)), (D, AAAA, ()),
                 (f"_matrix-fed._tcp.{S}", SRV, ()), (f"_matrix._tcp.{S}", SRV, ()))
KEYS = http(body=key_doc())


def deleg(attempts: list[Attempt], dns: dict[tuple[str, str], Lookup] | None = None,
          m_server: str = f"{D}:8448", **kw: Any) -> Facts:
    kw = {"wk_listener": "client", "wk_host": S, **kw}
    return facts(server_name=S, dns=dict(dns or DNS_OK),
                 wk_server=http(body={"m.server": m_server}, headers=CORS),
                 upstream=up(keys=KEYS), route_attempts=attempts, **kw)


def test_delegation_server_reaches_the_federation_listener() -> None:
    r = checks.check_delegation(deleg([Attempt("127.0.0.1", 8448, KEYS)]))[0]
    assert (r.status, r.message) == (PASS, f"{S}: well-known → {D}:8448 → 127.0.0.1:8448: "
                                     "listener 'federation' (federation) answers with this "
                                     "homeserver's keys")


def test_delegation_server_through_port_mapping() -> None:
    f = deleg([Attempt("127.0.0.1", 443, KEYS)], m_server=f"{D}:443")
    r = checks.check_delegation(f)[0]
    assert r.status == PASS
    assert "not a listener of this gate by address (port mapping, or another proxy)" in r.message


@pytest.mark.parametrize(("attempt", "text", "fix"), [
    (Attempt("127.0.0.1", 9999, http(error="connection refused")),
     "→ 127.0.0.1:9999: connection refused",
     "no listener of this gate binds port 9999: set well_known.server (listener 'federation' "
     f"binds port 8448: {D}:8448)"),
    (Attempt("127.0.0.1", 8448, http(error="connection refused")),
     "connection refused", "start the gate"),
    (Attempt("127.0.0.1", 8448, http(error="certificate verify failed: Hostname mismatch")),
     "certificate verify failed", f"serve a certificate for {D} there"),
    (Attempt("127.0.0.1", 8448, http(body=key_doc(server_name="x.test"))),
     "answers GET /_matrix/key/v2/server with 200, not this homeserver's key document",
     "the address reaches another server"),
    (Attempt("127.0.0.1", 8448, http(404)), "with 404", "the address reaches another server"),
])
def test_delegation_server_failures(attempt: Attempt, text: str, fix: str) -> None:
    port = 9999 if attempt.port == 9999 else 8448
    r = checks.check_delegation(deleg([attempt], m_server=f"{D}:{port}"))[0]
    assert r.status == FAIL and text in r.message, r
    assert r.fix.startswith(fix), r.fix


def test_delegation_server_first_good_attempt_wins() -> None:
    """A remote tries the addresses in order: one refused then one answering
    is a working deployment."""
    f = deleg([Attempt("127.0.0.1", 8448, http(error="connection refused")),
               Attempt("127.0.0.1", 8448, KEYS)])
    assert checks.check_delegation(f)[0].status == PASS


def test_delegation_server_without_a_dns_record() -> None:
    dns = {**DNS_OK, (D, A): Lookup(D, A)}
    r = checks.check_delegation(deleg([], dns))[0]
    assert (r.status, r.message) == (FAIL, f"{S}: well-known → {D}:8448: {D} has no A or "
                                     "AAAA record")


def test_delegation_server_forwarded_document_fix() -> None:
    f = deleg([Attempt("127.0.0.1", 9999, http(error="connection refused"))],
              m_server=f"{D}:9999")
    f.cfg = cfg(toml=NO_WK)
    r = checks.check_delegation(f)[0]
    assert r.fix.startswith("no listener of this gate binds port 9999: correct the homeserver's "
                            "/.well-known document, or add [well_known] server")


def test_delegation_needs_the_server_name() -> None:
    got = checks.check_delegation(facts(upstream=up(keys=http(error="refused"))))
    assert [(r.id, r.status) for r in got] == [
        ("delegation.server", SKIP), ("delegation.srv", SKIP), ("delegation.client", SKIP)]


SRV_FED_S = f"_matrix-fed._tcp.{S}"


@pytest.mark.parametrize(("records", "status", "text"), [
    ({}, PASS, f"no SRV record for {S}: when the well-known lookup fails, remote servers try "
               f"{S}:8448"),
    ({(SRV_FED_S, SRV): ((10, 0, 8448, f"{D}."),)}, PASS,
     f"SRV {SRV_FED_S} → {D}:8448 agrees with m.server {D}:8448"),
    # Another name for the same address and port agrees too.
    ({(SRV_FED_S, SRV): ((10, 0, 8448, "alias.test."),), ("alias.test", A): ("127.0.0.1",),
      ("alias.test", AAAA): ()}, PASS, "agrees"),
    ({(SRV_FED_S, SRV): ((10, 0, 8449, f"{D}."),)}, FAIL,
     f"SRV {SRV_FED_S} → {D}:8449 disagrees with .well-known/matrix/server (m.server {D}:8448 "
     f"→ {D}:8448): a remote server whose well-known lookup fails goes to {D}:8449"),
    ({(f"_matrix._tcp.{S}", SRV): ((10, 0, 1, "old.test."),), ("old.test", A): (),
      ("old.test", AAAA): ()}, FAIL, f"SRV _matrix._tcp.{S} → old.test:1 disagrees"),
])
def test_delegation_srv(records: dict[tuple[str, str], tuple[Any, ...]], status: str,
                        text: str) -> None:
    dns = dict(DNS_OK)
    for (n, t), recs in records.items():
        dns[(n, t)] = Lookup(n, t, recs)
    r = checks.check_delegation(deleg([Attempt("127.0.0.1", 8448, KEYS)], dns))[1]
    assert r.id == "delegation.srv"
    assert r.status == status and text in r.message, r
    if status == FAIL:
        assert r.fix.startswith("delete the SRV record _matrix")


def test_delegation_when_dns_fails() -> None:
    dead = "127.0.0.1:53 did not answer within 5s"
    dns = {k: Lookup(k[0], k[1], (), dead) for k in DNS_OK}
    f = deleg([], dns, dns_resolver="127.0.0.1:53")
    server, srv, _ = checks.check_delegation(f)
    assert server.status == FAIL
    assert server.message.startswith(f"{S}: well-known → {D}:8448: DNS lookup failed: A {S}: "
                                     f"{dead}")
    assert server.fix == "check that 127.0.0.1:53 answers (or pass --resolver HOST:PORT)"
    assert (srv.status, srv.message) == (
        SKIP, f"the SRV lookup of _matrix-fed._tcp.{S} failed: {dead}")


def test_delegation_srv_not_applicable_without_well_known() -> None:
    f = deleg([])
    f.wk_server = http(404)
    r = checks.check_delegation(f)[1]
    assert (r.status, r.message) == (PASS, "no well-known delegation: SRV records, if any, are "
                                           "the route (delegation.server)")


VERSIONS = http(body={"versions": ["v1.12"]})


def client_facts(attempts: list[Attempt], base: str = f"https://{D}:8443") -> Facts:
    return facts(upstream=up(versions=VERSIONS), wk_listener="client", wk_host=S,
                 wk_client=http(body={"m.homeserver": {"base_url": base}}, headers=CORS),
                 client_attempts=attempts, dns=dict(DNS_OK))


@pytest.mark.parametrize(("base", "attempts", "status", "text", "fix"), [
    (f"https://{D}:8443", [Attempt("127.0.0.1", 8443, VERSIONS)], PASS,
     f"base_url https://{D}:8443 → 127.0.0.1:8443: listener 'client' (client) answers "
     "/_matrix/client/versions", ""),
    (f"https://{D}:8448", [Attempt("127.0.0.1", 8448, VERSIONS)], WARN,
     "a federation listener, which does not forward /_palpo/client",
     "point base_url at a client listener"),
    (f"https://{D}", [Attempt("127.0.0.1", 443, http(error="connection refused"))], FAIL,
     f"base_url https://{D} → 127.0.0.1:443: connection refused",
     "no listener of this gate binds port 443: set well_known.client (listener 'client' binds "
     f"port 8443: https://{D}:8443)"),
    (f"https://{D}:8443", [Attempt("127.0.0.1", 8443, http(404))], FAIL,
     "answers GET /_matrix/client/versions with 404", "the base URL reaches another server"),
    (f"https://{D}:8443", [], FAIL, f"{D} has no A or AAAA record",
     f"add an A/AAAA record for {D}"),
])
def test_delegation_client(base: str, attempts: list[Attempt], status: str, text: str,
                           fix: str) -> None:
    r = checks.check_delegation(client_facts(attempts, base))[2]
    assert r.id == "delegation.client"
    assert r.status == status and text in r.message, r
    assert r.fix.startswith(fix)


# --------------------------------------------------------------------------
# The admin API and the federation target

REFUSED = http(403, {"errcode": "M_FORBIDDEN", "error": "the admin API is not reachable"})


@pytest.mark.parametrize(("allow", "status", "text"), [
    ("[]", PASS, "empty: the admin API is refused through every listener"),
    ('["10.0.0.0/8", "::1"]', PASS, "admin API allowed from 10.0.0.0/8, ::1/128 only"),
    ('["0.0.0.0/0"]', FAIL, "contains 0.0.0.0/0: the admin API is open to every address"),
    ('["10.0.0.0/8", "::/0"]', FAIL, "contains ::/0"),
])
def test_admin_allow_from(allow: str, status: str, text: str) -> None:
    f = facts(cfg(f"[admin]\nallow_from = {allow}\n"))
    r = checks.check_admin(f)[0]
    assert r.status == status and text in r.message, r


@pytest.mark.parametrize(("answer", "status", "text"), [
    (REFUSED, PASS, "/_synapse/admin refused (403) through client from 127.0.0.2"),
    (http(200, {"server_version": "1"}), FAIL,
     "GET /_synapse/admin/v1/server_version from 127.0.0.2 answered 200 from the homeserver"),
    # A 403 that is not the gate's: Synapse's own refusal of a user token.
    (http(403, {"errcode": "M_UNKNOWN"}), FAIL, "answered 403 from the homeserver"),
    (http(401, {"errcode": "M_MISSING_TOKEN"}), FAIL, "answered 401"),
    (http(error="connection refused"), FAIL, "no answer: connection refused"),
])
def test_admin_blocked(answer: Http, status: str, text: str) -> None:
    f = facts(admin=[AdminProbe("client", "127.0.0.2", "/_synapse/admin/v1/server_version",
                                answer)])
    r = checks.check_admin(f)[1]
    assert r.id == "admin.blocked"
    assert r.status == status and text in r.message, r


def test_admin_untested_when_every_source_is_allowed() -> None:
    f = facts(admin_untested="every address the doctor can send from (::1) is in "
                             "admin.allow_from")
    r = checks.check_admin(f)[1]
    assert (r.status, r.message) == (SKIP, f.admin_untested)


KEY_ANSWER = http(body=key_doc())
NOT_FOUND = http(404, {"errcode": "M_UNRECOGNIZED"})
FED_VERSION = http(body={"server": {"name": "x"}})


def answers(**over: Http) -> dict[str, Http]:
    base = {"keys": KEY_ANSWER, "keys_id": KEY_ANSWER, "keys_slash": KEY_ANSWER,
            "fed_version": FED_VERSION}
    return {**base, **over}


@pytest.mark.parametrize(("direct", "through", "status", "text"), [
    (answers(), answers(), PASS, "4 escaped targets answer the same through the gate as "
                                 "directly, byte for byte; %2F reached the homeserver's router "
                                 "as data"),
    # A homeserver without the key-id form: the probe cannot tell, the comparison can.
    (answers(keys_id=NOT_FOUND, keys_slash=NOT_FOUND),
     answers(keys_id=NOT_FOUND, keys_slash=NOT_FOUND), PASS, "does not serve the key-id form"),
    # Something behind upstream.url decodes %2F: both paths see it.
    (answers(keys_slash=NOT_FOUND), answers(keys_slash=NOT_FOUND), FAIL,
     "through the gate and directly at upstream.url: something at or behind "
     "http://127.0.0.1:8008 decodes %2F"),
    # Only through the gate.
    (answers(), answers(keys_slash=NOT_FOUND), FAIL,
     "through the gate the homeserver answers differently: /_matrix/key/v2/server/ed25519%3A"
     "doctor%2Fprobe?doctor=%2F%3F%25%20: 404 through the gate, 200 direct"),
    (answers(), answers(fed_version=http(error="no answer within 5s")), FAIL,
     "no answer through the gate: no answer within 5s"),
])
def test_federation_target(direct: dict[str, Http], through: dict[str, Http], status: str,
                           text: str) -> None:
    f = facts(upstream={**direct, "versions": VERSIONS}, through={"federation": through})
    r = checks.check_target(f)[0]
    assert (r.id, r.subject) == ("federation.target", "federation")
    assert r.status == status and text in r.message, r


def test_federation_target_needs_the_key_document() -> None:
    f = facts(upstream=answers(keys=http(error="refused")), through={"federation": answers()})
    assert checks.check_target(f)[0].status == SKIP


# --------------------------------------------------------------------------
# Listeners, and the whole table


@pytest.mark.parametrize(("answer", "status", "text"), [
    (http(body=b"OK\n"), PASS, "http://127.0.0.1:8443 answers /health"),
    (http(error="connection refused"), FAIL, "127.0.0.1:8443 does not answer: connection refused"),
    (http(404, b"not found"), FAIL, "answers /health with 404 b'not found': another program"),
])
def test_listener_health(answer: Http, status: str, text: str) -> None:
    r = checks.check_listeners(facts(health={"client": answer}))[0]
    assert (r.label, r.status) == ("listener[client]", status)
    assert text in r.message


def test_result_lines_and_exit_status() -> None:
    results = [
        checks.Result("config", "", PASS, "gate.toml is valid"),
        checks.Result("tls.expiry", "client", WARN, "expires in 10.0 days", "renew it"),
        checks.Result("tls.names", "federation", FAIL, "covers a, not b", "set x"),
        checks.Result("delegation.srv", "", SKIP, "needs y", "ignored"),
    ]
    assert doctor.render_text(results).splitlines() == [
        "PASS  config: gate.toml is valid",
        "WARN  tls.expiry[client]: expires in 10.0 days (fix: renew it)",
        "FAIL  tls.names[federation]: covers a, not b (fix: set x)",
        "SKIP  delegation.srv: needs y",
        "1 passed, 1 warning, 1 failed, 1 skipped",
    ]
    doc = json.loads(doctor.render_json(results, "gate.toml"))
    assert doc["ok"] is False
    assert doc["counts"] == {"pass": 1, "warn": 1, "fail": 1, "skip": 1}
    assert doc["checks"][2] == {"id": "tls.names", "subject": "federation", "status": "fail",
                                "message": "covers a, not b", "fix": "set x"}
    assert json.loads(doctor.render_json(results[:2], "g"))["ok"] is True


def test_every_check_runs_on_empty_facts() -> None:
    """A gate and upstream that answer nothing at all still give one line per
    check, each naming why, and never an exception."""
    f = facts(upstream={p: http(error="connection refused") for p in checks.PROBES},
              health={"client": http(error="connection refused"),
                      "federation": http(error="connection refused")})
    results = checks.run(f)
    assert {r.status for r in results} <= {FAIL, SKIP, PASS}
    assert [r.label for r in results if r.status == FAIL] == [
        "listener[client]", "listener[federation]", "upstream.versions", "upstream.keys"]
