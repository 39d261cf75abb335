"""The PROXY protocol header, versions 1 (text) and 2 (binary): bytes in, one
event out (h11's shape). Pure: no sockets; tested with byte scripts in
``tests/test_proxyproto.py``.

An L4 balancer (HAProxy ``send-proxy``/``send-proxy-v2``, AWS NLB, ...)
writes this header first on every connection it opens to the gate, so that
the gate learns the address of the client behind it. The format is
HAProxy's "The PROXY protocol" (versions 1 and 2,
https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt); section numbers
below are that document's.

:func:`parse` takes every byte received so far and answers one of:

- :class:`NeedMore` - not enough bytes yet; ``at_least`` more are needed,
  and reading exactly that many never reads past the header (a TLS
  handshake may follow it, and it must not be consumed here);
- :class:`Header` - the header is complete; ``length`` bytes are its, the
  rest belongs to the connection's next protocol;
- :class:`Invalid` - not a valid header; the connection must be closed.

The receiver must not guess (section 2.1: "the receiver MUST NOT try to
guess whether the protocol header is present or not"): anything that is not
a header from its first byte is :class:`Invalid`, and so is a header over
its size cap (107 bytes for version 1, :data:`V2_MAX_LENGTH` for version 2).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal, NamedTuple

#: Section 2.1: "a receiver ... must not accept more than 107 bytes" (the
#: longest TCP6 line, CRLF included).
V1_MAX_LENGTH = 107
V1_PREFIX = b"PROXY "
V1_MIN_LENGTH = 15  # "PROXY UNKNOWN\r\n"
#: Section 2.2: the twelve bytes every version 2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, length
#: The largest version 2 header accepted (fixed part, addresses and TLVs).
#: The addresses take at most 216 bytes (AF_UNIX); the TLVs of common
#: balancers (AWS NLB's VPC endpoint id, HAProxy's TLS fields) a few hundred.
V2_MAX_LENGTH = 4096

Family = Literal["TCP4", "TCP6", "UNKNOWN", "LOCAL"]


class NeedMore(NamedTuple):
    at_least: int


class Header(NamedTuple):
    """A complete header. *addr* and *port* are the client's (the source);
    they are None for ``UNKNOWN`` (the balancer could not tell) and ``LOCAL``
    (a connection of the balancer's own, a health check): section 2.1 and 2.2
    say to use the connection's real endpoints then."""

    family: Family
    addr: str | None
    port: int | None
    length: int
    version: int


class Invalid(NamedTuple):
    reason: str


Event = NeedMore | Header | Invalid

# Section 2.1: "PROXY" SP ("TCP4" | "TCP6" | "UNKNOWN") ..., single spaces, CRLF.
_V1_TCP_RE = re.compile(rb"(TCP4|TCP6) ([0-9A-Fa-f.:]+) ([0-9A-Fa-f.:]+) "
                        rb"(0|[1-9][0-9]{0,4}) (0|[1-9][0-9]{0,4})")
# What may appear in a version 1 line before its CRLF (printable US-ASCII).
_V1_CHAR_RE = re.compile(rb"[\x20-\x7e]*")

# Section 2.2, the 14th byte: the high nibble is the address family, the low
# one the transport protocol.
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0, 1, 2, 3
_STREAM = 1
#: Address block length per family (section 2.2: "struct proxy_addr").
_V2_ADDR_LEN = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}


def parse(buf: bytes) -> Event:
    """The header at the start of *buf* (every byte received so far)."""
    if not buf:
        return NeedMore(V1_MIN_LENGTH)
    if buf[0] == 0x50:  # "P"
        return _parse_v1(buf)
    if buf[0] == 0x0D:
        return _parse_v2(buf)
    return Invalid("the connection did not start with a PROXY protocol header")


def _parse_v1(buf: bytes) -> Event:
    n = min(len(buf), len(V1_PREFIX))
    if buf[:n] != V1_PREFIX[:n]:
        return Invalid("the connection did not start with a PROXY protocol header")
    end = buf.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        scanned = buf[:V1_MAX_LENGTH]
        if not _V1_CHAR_RE.fullmatch(scanned.rstrip(b"\r")) or b"\r" in scanned[:-1]:
            return Invalid("a control character in a version 1 header")
        if len(buf) >= V1_MAX_LENGTH:
            return Invalid(f"a version 1 header longer than {V1_MAX_LENGTH} bytes")
        # At least the CRLF is missing (only the LF when a CR ends the buffer),
        # and no header is shorter than V1_MIN_LENGTH.
        return NeedMore(max(1 if buf.endswith(b"\r") else 2, V1_MIN_LENGTH - len(buf)))
    if end < len(V1_PREFIX):
        return Invalid("a truncated version 1 header")
    line = buf[len(V1_PREFIX):end]
    if not _V1_CHAR_RE.fullmatch(line):
        return Invalid("a control character in a version 1 header")
    length = end + 2
    if line == b"UNKNOWN" or line.startswith(b"UNKNOWN "):
        # "the receiver must ignore anything presented before the CRLF".
        return Header("UNKNOWN", None, None, length, 1)
    m = _V1_TCP_RE.fullmatch(line)
    if m is None:
        return Invalid("a malformed version 1 header")
    proto, src, dst, sport, dport = m.groups()
    try:
        if proto == b"TCP4":
            ips = ipaddress.IPv4Address(src.decode()), ipaddress.IPv4Address(dst.decode())
        else:
            ips = ipaddress.IPv6Address(src.decode()), ipaddress.IPv6Address(dst.decode())
    except ValueError:
        return Invalid(f"an invalid {proto.decode()} address in a version 1 header")
    if int(sport) > 65535 or int(dport) > 65535:
        return Invalid("a port over 65535 in a version 1 header")
    family: Family = "TCP4" if proto == b"TCP4" else "TCP6"
    return Header(family, str(ips[0]), int(sport), length, 1)


def _parse_v2(buf: bytes) -> Event:
    n = min(len(buf), len(V2_SIGNATURE))
    if buf[:n] != V2_SIGNATURE[:n]:
        return Invalid("the connection did not start with a PROXY protocol header")
    # Refuse a bad version or family as soon as its byte arrives.
    if len(buf) > 12 and (buf[12] >> 4 != 2 or buf[12] & 0x0F > 1):
        return Invalid(f"PROXY protocol version 2 byte 0x{buf[12]:02x}: an unknown "
                       "version or command")
    if len(buf) > 13 and (buf[13] >> 4 > _AF_UNIX or buf[13] & 0x0F > 2):
        return Invalid(f"PROXY protocol version 2 byte 0x{buf[13]:02x}: an unknown "
                       "address family or transport")
    if len(buf) < V2_FIXED:
        return NeedMore(V2_FIXED - len(buf))
    total = V2_FIXED + int.from_bytes(buf[14:16], "big")
    if total > V2_MAX_LENGTH:
        return Invalid(f"a version 2 header of {total} bytes, over the cap of {V2_MAX_LENGTH}")
    if len(buf) < total:
        return NeedMore(total - len(buf))
    command, family, transport = buf[12] & 0x0F, buf[13] >> 4, buf[13] & 0x0F
    if command == 0:
        # LOCAL: "the receiver must accept this connection as valid and must use
        # the real connection endpoints and discard the protocol block".
        return Header("LOCAL", None, None, total, 2)
    if total - V2_FIXED < _V2_ADDR_LEN.get(family, 0):
        return Invalid("a version 2 header too short for its addresses")
    if family in (_AF_UNSPEC, _AF_UNIX):
        # No IP address to learn: use the real connection endpoints.
        return Header("UNKNOWN", None, None, total, 2)
    if transport != _STREAM:
        return Invalid("a version 2 header for a datagram or unspecified transport")
    if family == _AF_INET:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(buf[16:20])
        return Header("TCP4", str(ip), int.from_bytes(buf[24:26], "big"), total, 2)
    ip = ipaddress.IPv6Address(buf[16:32])
    return Header("TCP6", str(ip), int.from_bytes(buf[48:50], "big"), total, 2)


# -- building headers (what a balancer sends; used by the tests and the docs) --

def v1(family: Family, src: str = "", dst: str = "", sport: int = 0, dport: int = 0) -> bytes:
    """A version 1 header."""
    if family in ("UNKNOWN", "LOCAL"):
        return b"PROXY UNKNOWN\r\n"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2(family: Family, src: str = "", dst: str = "", sport: int = 0, dport: int = 0,
       tlvs: bytes = b"") -> bytes:
    """A version 2 header (command PROXY, or LOCAL for ``family="LOCAL"``)."""
    if family == "LOCAL":
        return V2_SIGNATURE + b"\x20\x00" + len(tlvs).to_bytes(2, "big") + tlvs
    if family == "UNKNOWN":
        return V2_SIGNATURE + b"\x21\x00" + len(tlvs).to_bytes(2, "big") + tlvs
    if family == "TCP4":
        fam = b"\x11"
        block = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
    else:
        fam = b"\x21"
        block = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
    block += sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + tlvs
    return V2_SIGNATURE + b"\x21" + fam + len(block).to_bytes(2, "big") + block
