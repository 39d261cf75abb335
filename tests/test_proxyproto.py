"""The PROXY protocol parser (palpo_gate.proxyproto): byte scripts in, one event out.

Every valid script is also fed split at every byte: each prefix must say
NeedMore, and never ask for more bytes than the header still has (a TLS
handshake may follow the header and must not be read by the parser)."""

from __future__ import annotations

import pytest

from palpo_gate.proxyproto import (
    V1_MAX_LENGTH,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    Header,
    Invalid,
    NeedMore,
    parse,
    v1,
    v2,
)

TLS_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
HTTP = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def _v2_raw(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + len(body).to_bytes(2, "big") + body


V4_BLOCK = (bytes([203, 0, 113, 7, 10, 0, 0, 1]) + (51000).to_bytes(2, "big")
            + (443).to_bytes(2, "big"))
V6_BLOCK = (bytes.fromhex("20010db8000000000000000000000042") + bytes(15) + b"\x01"
            + (40000).to_bytes(2, "big") + (8448).to_bytes(2, "big"))

#: (name, header bytes, expected Header without its length: family, addr, port, version)
VALID: list[tuple[str, bytes, tuple[str, str | None, int | None, int]]] = [
    ("v1 tcp4", b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n",
     ("TCP4", "203.0.113.7", 51000, 1)),
    ("v1 tcp4 port 0", b"PROXY TCP4 1.2.3.4 5.6.7.8 0 65535\r\n", ("TCP4", "1.2.3.4", 0, 1)),
    ("v1 tcp6", b"PROXY TCP6 2001:db8::42 ::1 40000 8448\r\n", ("TCP6", "2001:db8::42", 40000, 1)),
    ("v1 tcp6 upper case", b"PROXY TCP6 2001:DB8::AB ::1 1 2\r\n", ("TCP6", "2001:db8::ab", 1, 1)),
    ("v1 tcp6 v4-mapped", b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n",
     ("TCP6", "::ffff:c000:201", 1, 1)),
    ("v1 longest tcp6", b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
     b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
     ("TCP6", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535, 1)),
    # Section 2.1's worst case, exactly 107 bytes.
    ("v1 longest (107 bytes)", b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
     b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n", ("UNKNOWN", None, None, 1)),
    ("v1 unknown", b"PROXY UNKNOWN\r\n", ("UNKNOWN", None, None, 1)),
    ("v1 unknown with junk", b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n", ("UNKNOWN", None, None, 1)),
    ("v2 tcp4", _v2_raw(0x21, 0x11, V4_BLOCK), ("TCP4", "203.0.113.7", 51000, 2)),
    ("v2 tcp6", _v2_raw(0x21, 0x21, V6_BLOCK), ("TCP6", "2001:db8::42", 40000, 2)),
    ("v2 tcp4 with TLVs", _v2_raw(0x21, 0x11, V4_BLOCK + b"\x04\x00\x03abc" + b"\xea\x00\x05vpce1"),
     ("TCP4", "203.0.113.7", 51000, 2)),
    ("v2 local", _v2_raw(0x20, 0x00, b""), ("LOCAL", None, None, 2)),
    ("v2 local with an address block", _v2_raw(0x20, 0x11, V4_BLOCK), ("LOCAL", None, None, 2)),
    ("v2 unspec family", _v2_raw(0x21, 0x00, b""), ("UNKNOWN", None, None, 2)),
    ("v2 unix family", _v2_raw(0x21, 0x31, bytes(216)), ("UNKNOWN", None, None, 2)),
    ("v2 at the size cap", _v2_raw(0x21, 0x11, V4_BLOCK + bytes(V2_MAX_LENGTH - 16 - 12)),
     ("TCP4", "203.0.113.7", 51000, 2)),
    ("built v1", v1("TCP4", "192.0.2.9", "192.0.2.1", 1234, 80), ("TCP4", "192.0.2.9", 1234, 1)),
    ("built v2 tcp6", v2("TCP6", "2001:db8::9", "2001:db8::1", 4321, 443),
     ("TCP6", "2001:db8::9", 4321, 2)),
    ("built v2 local", v2("LOCAL"), ("LOCAL", None, None, 2)),
]


@pytest.mark.parametrize(("name", "header", "expect"), VALID, ids=[v[0] for v in VALID])
@pytest.mark.parametrize("tail", [b"", HTTP, TLS_HELLO], ids=["alone", "http", "tls"])
def test_valid_headers(name: str, header: bytes, expect: tuple, tail: bytes) -> None:
    event = parse(header + tail)
    assert event == Header(*expect[:3], len(header), expect[3])


@pytest.mark.parametrize(("name", "header", "expect"), VALID, ids=[v[0] for v in VALID])
def test_split_at_every_byte_never_reads_past_the_header(name: str, header: bytes,
                                                         expect: tuple) -> None:
    if name == "v1 longest (107 bytes)":
        assert len(header) == V1_MAX_LENGTH
    for k in range(len(header)):
        event = parse(header[:k])
        assert type(event) is NeedMore, (k, event)
        assert 1 <= event.at_least <= len(header) - k, (k, event)
    # Read the way the gate does on a TLS listener: exactly at_least each time.
    got = b""
    reads = 0
    while type(event := parse(got)) is NeedMore:
        got += header[len(got):len(got) + event.at_least]
        reads += 1
    assert event == Header(*expect[:3], len(header), expect[3]) and got == header
    assert reads <= len(header)


#: (name, bytes): each must be Invalid as a whole, and no prefix may be a Header.
INVALID: list[tuple[str, bytes]] = [
    ("plain http", HTTP),
    ("tls hello", TLS_HELLO + bytes(200)),
    ("lower-case proxy", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("no space after PROXY", b"PROXY\r\n"),
    ("unknown protocol", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("tcp4 with v6 addresses", b"PROXY TCP4 ::1 ::1 1 2\r\n"),
    ("tcp6 with v4 addresses", b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("bad v4 address", b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n"),
    ("v4 leading zero", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n"),
    ("v6 zone", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n"),
    ("port over 65535", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n"),
    ("port with leading zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n"),
    ("port not a number", b"PROXY TCP4 1.2.3.4 5.6.7.8 http 2\r\n"),
    ("missing port", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"),
    ("extra field", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"),
    ("double space", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n"),
    ("trailing space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n"),
    ("bare LF", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n" + HTTP),
    ("CR without LF", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\r\n"),
    ("NUL in line", b"PROXY TCP4 1.2.3.4\x00 5.6.7.8 1 2\r\n"),
    ("v1 over 107 bytes", b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"),
    ("v1 without end", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b" " * 200),
    ("v2 bad signature", b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + V4_BLOCK),
    ("v2 version 1", _v2_raw(0x11, 0x11, V4_BLOCK)),
    ("v2 version 3", _v2_raw(0x31, 0x11, V4_BLOCK)),
    ("v2 command 2", _v2_raw(0x22, 0x11, V4_BLOCK)),
    ("v2 family 4", _v2_raw(0x21, 0x41, V4_BLOCK)),
    ("v2 transport 3", _v2_raw(0x21, 0x13, V4_BLOCK)),
    ("v2 tcp4 datagram", _v2_raw(0x21, 0x12, V4_BLOCK)),
    ("v2 tcp4 unspec transport", _v2_raw(0x21, 0x10, V4_BLOCK)),
    ("v2 tcp4 block too short", _v2_raw(0x21, 0x11, V4_BLOCK[:11])),
    ("v2 tcp6 block too short", _v2_raw(0x21, 0x21, V4_BLOCK)),
    ("v2 over the cap", _v2_raw(0x21, 0x11, V4_BLOCK + bytes(V2_MAX_LENGTH))),
    ("v2 length 65535", V2_SIGNATURE + b"\x21\x11\xff\xff" + V4_BLOCK),
]


@pytest.mark.parametrize(("name", "data"), INVALID, ids=[v[0] for v in INVALID])
def test_invalid_headers(name: str, data: bytes) -> None:
    assert type(parse(data)) is Invalid, parse(data)
    for k in range(len(data)):
        assert type(parse(data[:k])) in (NeedMore, Invalid), k


@pytest.mark.parametrize(("data", "at_least"), [
    (b"", 15),
    (b"P", 14),
    (b"PROXY TCP4 1.2.3.4", 2),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", 1),
    (V2_SIGNATURE, 4),
    (V2_SIGNATURE + b"\x21\x11\x00\x0c", 12),
    (V2_SIGNATURE + b"\x21\x11\x00\x0c" + V4_BLOCK[:5], 7),
])
def test_truncated_headers_ask_for_more(data: bytes, at_least: int) -> None:
    assert parse(data) == NeedMore(at_least)


def test_early_refusal_before_the_line_ends() -> None:
    # A client speaking HTTP is refused on its first byte, not after 107.
    assert type(parse(b"G")) is Invalid
    assert type(parse(b"\x16")) is Invalid
    assert type(parse(b"PROXZ")) is Invalid
    assert type(parse(V2_SIGNATURE[:5] + b"X")) is Invalid
    assert type(parse(V2_SIGNATURE + b"\x31")) is Invalid  # version 3, at byte 13
