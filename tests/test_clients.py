"""The client address rule (palpo_gate.clients), with tables: no sockets."""

from __future__ import annotations

import ipaddress

import pytest

from palpo_gate.clients import (
    Trusted,
    canonical,
    forwarded_client,
    limit_key,
    xff_values,
)

TRUSTED = Trusted([ipaddress.ip_network(n) for n in ("10.0.0.0/8", "192.0.2.1/32", "fd00::/8")])

#: (peer, X-Forwarded-For lines, expected client)
CHAINS: list[tuple[str, list[bytes], str]] = [
    # One proxy: the address it saw.
    ("10.0.0.1", [b"203.0.113.5"], "203.0.113.5"),
    # A spoofed entry to the left of the real client is the client's own doing.
    ("10.0.0.1", [b"1.1.1.1, 203.0.113.5"], "203.0.113.5"),
    ("10.0.0.1", [b"10.9.9.9, 203.0.113.5"], "203.0.113.5"),
    # Several trusted hops: the rightmost untrusted entry.
    ("10.0.0.1", [b"203.0.113.5, 10.0.0.2, 192.0.2.1"], "203.0.113.5"),
    ("10.0.0.1", [b"198.51.100.1, 203.0.113.5, 10.0.0.2"], "203.0.113.5"),
    # Several header lines are one list, in order (RFC 9110 section 5.3).
    ("10.0.0.1", [b"198.51.100.1", b"203.0.113.5, 10.0.0.2"], "203.0.113.5"),
    ("10.0.0.1", [b"203.0.113.5", b"10.0.0.2"], "203.0.113.5"),
    # Spaces, ports, brackets, IPv6, v4-mapped.
    ("10.0.0.1", [b" 203.0.113.5 ,10.0.0.2 "], "203.0.113.5"),
    ("10.0.0.1", [b"203.0.113.5:4711"], "203.0.113.5"),
    ("10.0.0.1", [b"[2001:db8::5]:443"], "2001:db8::5"),
    ("10.0.0.1", [b"2001:DB8::5"], "2001:db8::5"),
    ("10.0.0.1", [b"::ffff:203.0.113.5"], "203.0.113.5"),
    ("fd00::1", [b"2001:db8::5, fd00::2"], "2001:db8::5"),
    # Every entry trusted: the leftmost (the request began inside).
    ("10.0.0.1", [b"10.1.1.1, 10.0.0.2"], "10.1.1.1"),
    # No header: the peer itself.
    ("10.0.0.1", [], "10.0.0.1"),
    # Garbage stops the walk at the last good address.
    ("10.0.0.1", [b"203.0.113.5, unknown"], "10.0.0.1"),
    ("10.0.0.1", [b"203.0.113.5, nonsense, 10.0.0.2"], "10.0.0.2"),
    ("10.0.0.1", [b""], "10.0.0.1"),
    ("10.0.0.1", [b"203.0.113.5,"], "10.0.0.1"),
    ("10.0.0.1", [b"[2001:db8::5"], "10.0.0.1"),
    ("10.0.0.1", [b"_"], "10.0.0.1"),
]


@pytest.mark.parametrize(("peer", "xff", "expect"), CHAINS)
def test_forwarded_client(peer: str, xff: list[bytes], expect: str) -> None:
    assert forwarded_client(peer, xff, TRUSTED) == expect


@pytest.mark.parametrize(("addr", "trusted"), [
    ("10.1.2.3", True), ("192.0.2.1", True), ("192.0.2.2", False), ("::ffff:10.0.0.1", True),
    ("fd12::1", True), ("2001:db8::1", False), ("unix:", False), ("", False), ("nonsense", False),
])
def test_trusted(addr: str, trusted: bool) -> None:
    assert (addr in TRUSTED) is trusted
    assert (addr in TRUSTED) is trusted  # the cached answer is the same
    assert not Trusted([])
    assert TRUSTED


@pytest.mark.parametrize(("addr", "key"), [
    ("203.0.113.5", "203.0.113.5"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
    ("::ffff:203.0.113.5", "203.0.113.5"),
    ("unix:", "unix:"),
])
def test_limit_key(addr: str, key: str) -> None:
    assert limit_key(addr) == key


@pytest.mark.parametrize(("text", "out"), [
    ("::ffff:127.0.0.2", "127.0.0.2"), ("2001:DB8::1", "2001:db8::1"), ("unix:", "unix:"),
    ("127.0.0.1", "127.0.0.1"),
])
def test_canonical(text: str, out: str) -> None:
    assert canonical(text) == out


def test_xff_values_in_order_any_case() -> None:
    headers = [(b"Host", b"x"), (b"X-Forwarded-For", b"1.1.1.1"), (b"x-forwarded-for", b"2.2.2.2"),
               (b"X-Forwarded-Fort", b"3.3.3.3"), (b"X_Forwarded_For", b"4.4.4.4")]
    assert xff_values(headers) == [b"1.1.1.1", b"2.2.2.2"]
