"""The pure rules of automatic HTTPS, as tables: what a ClientHello asks for
(:mod:`palpo_gate.acme.clienthello`), when to renew and when to retry
(:mod:`palpo_gate.acme.schedule`), and the certificates the gate makes
(:mod:`palpo_gate.acme.certs`). No sockets."""

from __future__ import annotations

import hashlib
import ssl

import pytest
from cryptography import x509

from palpo_gate.acme import certs, clienthello, schedule
from palpo_gate.acme.clienthello import NEED_MORE, NOT_TLS, Hello


def client_hello(server_name: str | None, alpn: list[str] | None,
                 maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED) -> bytes:
    """The first flight of a real (OpenSSL) TLS client."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = maximum
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def records(hello: bytes, sizes: list[int]) -> bytes:
    """*hello* re-framed: its handshake bytes in records of *sizes* (the rest last)."""
    body = hello[5:]
    out = b""
    for size in [*sizes, len(body)]:
        part, body = body[:size], body[size:]
        if part:
            out += hello[:3] + len(part).to_bytes(2) + part
    return out


HELLOS = [
    ("acme-tls/1 for a name", "a.example", ["acme-tls/1"], Hello("a.example", ("acme-tls/1",))),
    ("a browser", "matrix.example.com", ["h2", "http/1.1"],
     Hello("matrix.example.com", ("h2", "http/1.1"))),
    ("no ALPN", "matrix.example.com", None, Hello("matrix.example.com", ())),
    ("no SNI", None, ["acme-tls/1"], Hello(None, ("acme-tls/1",))),
    ("upper-case SNI", "Matrix.Example.COM", ["http/1.1"],
     Hello("matrix.example.com", ("http/1.1",))),
]


@pytest.mark.parametrize(("name", "alpn", "expected"), [h[1:] for h in HELLOS],
                         ids=[h[0] for h in HELLOS])
def test_client_hello_names_and_protocols(name: str | None, alpn: list[str] | None,
                                          expected: Hello) -> None:
    for maximum in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.MAXIMUM_SUPPORTED):
        assert clienthello.parse(client_hello(name, alpn, maximum)) == expected


ACME_TLS_1 = [
    (Hello("a.example", ("acme-tls/1",)), True),
    (Hello(None, ("acme-tls/1",)), False),  # RFC 8737 section 3: SNI is required
    (Hello("a.example", ("acme-tls/1", "http/1.1")), False),  # it must be the only one
    (Hello("a.example", ("http/1.1",)), False),
    (Hello("a.example", ()), False),
]


@pytest.mark.parametrize(("hello", "validation"), ACME_TLS_1)
def test_acme_tls_1_is_the_only_protocol_with_a_name(hello: Hello, validation: bool) -> None:
    assert hello.acme_tls_1 is validation


def test_every_prefix_of_a_hello_needs_more() -> None:
    hello = client_hello("a.example", ["acme-tls/1"])
    for n in range(len(hello)):
        assert clienthello.parse(hello[:n]) is NEED_MORE, n


def test_a_hello_across_records() -> None:
    hello = client_hello("a.example", ["acme-tls/1"])
    expected = Hello("a.example", ("acme-tls/1",))
    for sizes in ([1], [3], [4], [60], [100, 1], [1, 1, 1, 1, 1]):
        framed = records(hello, sizes)
        assert clienthello.parse(framed) == expected, sizes
        assert clienthello.parse(framed[:-1]) is NEED_MORE, sizes
    # What follows the hello (a second flight) does not matter.
    assert clienthello.parse(hello + b"\x17\x03\x03\x00\x05hello") == expected


NOT_HELLOS = [
    ("plain HTTP", b"GET /_matrix/client/versions HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("PROXY header", b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 443\r\n"),
    ("SSLv2 hello", b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + b"\x00" * 40),
    ("a server hello", b"\x16\x03\x03\x00\x06\x02\x00\x00\x02\x03\x03"),
    ("an alert", b"\x15\x03\x03\x00\x02\x02\x28"),
    ("empty record", b"\x16\x03\x01\x00\x00" + b"\x16" * 10),
    ("record too long", b"\x16\x03\x01\x48\x01" + b"\x01" * 10),
    ("hello too long", b"\x16\x03\x01\x00\x04\x01\xff\xff\xff"),
]


@pytest.mark.parametrize("data", [n[1] for n in NOT_HELLOS], ids=[n[0] for n in NOT_HELLOS])
def test_not_a_hello(data: bytes) -> None:
    assert clienthello.parse(data) is NOT_TLS


def test_a_hello_with_broken_extensions_is_not_tls() -> None:
    hello = bytearray(client_hello("a.example", ["acme-tls/1"]))
    # The extensions block claims more bytes than the message holds.
    body = hello[9:]
    pos = 2 + 32
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos:pos + 2])
    pos += 1 + body[pos]
    body[pos:pos + 2] = (len(body) - pos).to_bytes(2)
    assert clienthello.parse(bytes(hello[:9] + body)) is NOT_TLS


# -- when to renew, when to retry --------------------------------------------------------

DAY = 86400.0
DUE = [
    # (not_before, not_after, renew_before, ari) → due
    ("90-day certificate, 30d", 0.0, 90 * DAY, 30 * DAY, None, 60 * DAY),
    ("45-day certificate, 30d: capped to 2/3 of 45 days", 0.0, 45 * DAY, 30 * DAY, None,
     15 * DAY),
    ("6-day certificate, 30d", 0.0, 6 * DAY, 30 * DAY, None, 2 * DAY),
    ("20 s certificate, 12 s", 100.0, 120.0, 12.0, None, 108.0),
    ("ARI says when", 0.0, 90 * DAY, 30 * DAY, 75 * DAY, 75 * DAY),
    ("ARI says earlier (revocation)", 0.0, 90 * DAY, 30 * DAY, 5 * DAY, 5 * DAY),
]


@pytest.mark.parametrize(("not_before", "not_after", "renew_before", "ari", "due"),
                         [d[1:] for d in DUE], ids=[d[0] for d in DUE])
def test_due(not_before: float, not_after: float, renew_before: float, ari: float | None,
             due: float) -> None:
    assert schedule.due(not_before, not_after, renew_before, ari) == pytest.approx(due)


def test_due_not_before_a_third_of_the_time_since_obtained() -> None:
    # A 25-hour certificate backdated by a day, obtained at 0: by renew_before
    # and the 2/3 cap it was due before it was obtained.
    assert schedule.due(-DAY, 3600.0, 30 * DAY) < 0
    assert schedule.due(-DAY, 3600.0, 30 * DAY, obtained=0.0) == pytest.approx(1200.0)
    # An ordinary one is not moved.
    assert schedule.due(0.0, 90 * DAY, 30 * DAY, obtained=3600.0) == 60 * DAY
    assert schedule.due(0.0, 90 * DAY, 30 * DAY, 5.0, obtained=3600.0) == 5.0  # ARI decides


RETRY = [
    # (failures, retry_after, remaining) → delay
    ("first failure, no certificate yet", 1, None, None, 60.0),
    ("doubling", 3, None, None, 240.0),
    ("capped at 6 h", 20, None, None, 6 * 3600.0),
    ("Retry-After longer", 1, 7200.0, None, 7200.0),
    ("Retry-After shorter than the back-off", 3, 10.0, None, 240.0),
    ("Retry-After beyond the cap", 20, 86400.0, None, 86400.0),
    ("a tenth of the time left", 5, None, 600.0, 60.0),
    ("plenty of time left", 2, None, 30 * DAY, 120.0),
    ("never sooner than 5 s", 1, None, 12.0, 5.0),
    ("never sooner than 5 s, expired", 1, None, -30.0, 5.0),
    ("Retry-After 0", 1, 0.0, 12.0, 5.0),
]


@pytest.mark.parametrize(("failures", "retry_after", "remaining", "delay"),
                         [r[1:] for r in RETRY], ids=[r[0] for r in RETRY])
def test_retry_delay(failures: int, retry_after: float | None, remaining: float | None,
                     delay: float) -> None:
    assert schedule.retry_delay(failures, retry_after=retry_after,
                                remaining=remaining) == pytest.approx(delay)


def test_retry_never_spins() -> None:
    for failures in range(1, 40):
        for remaining in (None, -1.0, 0.0, 1.0, 100.0, 1e7):
            for retry_after in (None, 0.0, 1.0):
                assert schedule.retry_delay(failures, retry_after=retry_after,
                                            remaining=remaining) >= schedule.MIN_RETRY


# -- certificates the gate makes ------------------------------------------------------------

def test_alpn_challenge_certificate_is_rfc_8737() -> None:
    keyauth = "token.thumbprint"
    pem = certs.alpn_challenge("a.example", keyauth)
    [cert] = certs.chain(pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["a.example"]
    ext = cert.extensions.get_extension_for_oid(certs.ACME_IDENTIFIER)
    assert ext.critical
    # extnValue: the DER OCTET STRING of the SHA-256 of the key authorization.
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(keyauth.encode()).digest()
    key, chain = certs.split(pem)
    assert b"PRIVATE KEY" in key and chain.count(b"BEGIN CERTIFICATE") == 1


def test_self_signed_covers_the_names_and_loads_as_one_file(tmp_path: object) -> None:
    import pathlib

    pem = certs.self_signed(("matrix.example.com", "example.com"))
    info = certs.info(pem)
    assert info.names == {"matrix.example.com", "example.com"}
    assert info.not_after - info.not_before > 6 * DAY
    path = pathlib.Path(str(tmp_path)) / "c.pem"
    path.write_bytes(pem)
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(path))  # key and chain
