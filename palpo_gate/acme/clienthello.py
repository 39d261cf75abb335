"""What a TLS ClientHello asks for: the server name and the ALPN protocols.

Pure: bytes in, a :class:`Hello` out; no sockets. The TLS-ALPN-01 front
(:mod:`.front`) reads the first bytes of a connection with it before TLS
starts, because Python's ``sni_callback`` cannot see the client's ALPN list,
and the certificate for an ``acme-tls/1`` handshake (RFC 8737 section 3)
must be chosen before the server's first flight.

The wire format (RFC 8446 section 4.1.2, RFC 5246 section 7.4.1.2)::

    TLSPlaintext: type(1)=22 handshake, legacy_version(2), length(2), fragment
    Handshake:    msg_type(1)=1 client_hello, length(3), body
    ClientHello:  legacy_version(2), random(32), legacy_session_id<0..32>,
                  cipher_suites<2..2^16-2>, legacy_compression_methods<1..2^8-1>,
                  extensions<8..2^16-1>
    Extension:    extension_type(2), extension_data<0..2^16-1>
    server_name (0), RFC 6066 section 3: ServerNameList<1..2^16-1> of
                  name_type(1)=0 host_name, HostName<1..2^16-1>
    ALPN (16), RFC 7301 section 3.1: ProtocolNameList<2..2^16-1> of
                  ProtocolName<1..2^8-1>

A ClientHello may span several records; anything that is not one (plain
HTTP on a TLS port, SSLv2, garbage) is :data:`NOT_TLS`, and TLS then fails
the handshake as it would have anyway.
"""

from __future__ import annotations

from typing import Final, NamedTuple

#: The ALPN protocol of TLS-ALPN-01 validation (RFC 8737 section 6.2).
ACME_TLS_1: Final = "acme-tls/1"

#: The most bytes read before deciding: a ClientHello is a few hundred bytes,
#: about 1.8 KiB with a post-quantum key share; 16 KiB is one full record.
MAX_HELLO: Final = 16 * 1024 + 5

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16


class Hello(NamedTuple):
    server_name: str | None
    alpn: tuple[str, ...]

    @property
    def acme_tls_1(self) -> bool:
        """A TLS-ALPN-01 validation: ``acme-tls/1`` the only protocol offered,
        for one server name (RFC 8737 section 3)."""
        return self.alpn == (ACME_TLS_1,) and self.server_name is not None


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: More bytes are needed to read the whole ClientHello.
NEED_MORE: Final = _Marker("NEED_MORE")
#: Not a TLS ClientHello (or not one this reader understands).
NOT_TLS: Final = _Marker("NOT_TLS")


def parse(data: bytes) -> Hello | _Marker:
    """The ClientHello at the start of *data*, :data:`NEED_MORE` or :data:`NOT_TLS`."""
    handshake = bytearray()
    pos = 0
    need: int | None = None  # the handshake message's length, once known
    while need is None or len(handshake) < need:
        if len(data) < pos + 5:
            return NEED_MORE if len(data) < MAX_HELLO else NOT_TLS
        rtype, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3:pos + 5])
        if rtype != _HANDSHAKE or major != 3 or length == 0 or length > 2 ** 14:
            return NOT_TLS
        fragment = data[pos + 5:pos + 5 + length]
        handshake += fragment
        if len(fragment) < length:
            if len(data) >= MAX_HELLO:
                return NOT_TLS
            if need is None and len(handshake) >= 4 and handshake[0] != _CLIENT_HELLO:
                return NOT_TLS
            return NEED_MORE
        pos += 5 + length
        if need is None and len(handshake) >= 4:
            if handshake[0] != _CLIENT_HELLO:
                return NOT_TLS
            need = 4 + int.from_bytes(handshake[1:4])
            if need > MAX_HELLO:
                return NOT_TLS
    try:
        return _client_hello(memoryview(bytes(handshake[4:need])))
    except (IndexError, ValueError, UnicodeDecodeError):
        return NOT_TLS


def _vector(buf: memoryview, pos: int, size_len: int) -> tuple[memoryview, int]:
    """The variable-length vector at *pos* and the position after it."""
    end = pos + size_len
    if end > len(buf):
        raise IndexError("truncated length")
    n = int.from_bytes(buf[pos:end])
    if end + n > len(buf):
        raise IndexError("truncated vector")
    return buf[end:end + n], end + n


def _client_hello(body: memoryview) -> Hello:
    pos = 2 + 32  # legacy_version, random
    _, pos = _vector(body, pos, 1)  # legacy_session_id
    _, pos = _vector(body, pos, 2)  # cipher_suites
    _, pos = _vector(body, pos, 1)  # legacy_compression_methods
    if pos == len(body):
        return Hello(None, ())  # no extensions at all (TLS 1.0-era clients)
    extensions, _ = _vector(body, pos, 2)
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    pos = 0
    while pos < len(extensions):
        if pos + 4 > len(extensions):
            raise IndexError("truncated extension")
        etype = int.from_bytes(extensions[pos:pos + 2])
        data, pos = _vector(extensions, pos + 2, 2)
        if etype == _EXT_SERVER_NAME:
            names, _ = _vector(data, 0, 2)
            i = 0
            while i < len(names):
                kind = names[i]
                name, i = _vector(names, i + 1, 2)
                if kind == 0 and server_name is None:
                    server_name = bytes(name).decode("ascii").lower().rstrip(".")
        elif etype == _EXT_ALPN:
            protocols, _ = _vector(data, 0, 2)
            found = []
            i = 0
            while i < len(protocols):
                proto, i = _vector(protocols, i, 1)
                found.append(bytes(proto).decode("ascii", "replace"))
            alpn = tuple(found)
    return Hello(server_name or None, alpn)
