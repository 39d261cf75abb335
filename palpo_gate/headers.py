"""Header rules for both directions (SPEC section 3).

This module owns which headers cross the gate and which the gate sets:
- hop-by-hop headers, and every header named in ``Connection``, are removed
  in both directions *before* anything is added (RFC 9110 section 7.6.1);
- ``X-Forwarded-For``, ``X-Forwarded-Proto``, ``Host`` and the request-id
  header are set by the gate, replacing whatever the client sent;
- other forwarding headers the client may have made up (``Forwarded``,
  ``X-Real-IP``, ``X-Forwarded-Host``, ``X-Forwarded-Port``) are dropped
  unless the peer is a trusted proxy.

It works on raw ``(name, value)`` byte pairs as the parser saw them, so names,
values, order and duplicates of everything that passes reach the other side
unchanged. Pure: no sockets; tested with tables in ``tests/test_headers.py``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

RawHeaders = Sequence[tuple[bytes, bytes]]

#: RFC 9110 section 7.6.1 plus the de-facto ones (Keep-Alive, Proxy-Connection).
HOP_BY_HOP: frozenset[bytes] = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authorization", b"proxy-authenticate",
})

#: Request headers the gate sets or frames itself. Content-Length is re-emitted
#: from the body framing; Expect is answered by the gate (100 Continue).
_REQUEST_REPLACED: frozenset[bytes] = frozenset({
    b"host", b"x-forwarded-for", b"x-forwarded-proto", b"content-length", b"expect",
})

#: Client-made forwarding headers: dropped unless the peer is a trusted proxy.
_UNTRUSTED_FORWARDING: frozenset[bytes] = frozenset({
    b"forwarded", b"x-real-ip", b"x-forwarded-host", b"x-forwarded-port",
})

#: Response headers the gate frames itself (the body length is re-emitted).
_RESPONSE_REPLACED: frozenset[bytes] = frozenset({b"content-length"})

_REQUEST_ID_RE = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")


def connection_tokens(headers: RawHeaders) -> frozenset[bytes]:
    """Lower-case names listed in every ``Connection`` header (RFC 9110 section 7.6.1)."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(names)


def strip_hop_by_hop(headers: RawHeaders, also: frozenset[bytes] = frozenset()
                     ) -> list[tuple[bytes, bytes]]:
    """*headers* without hop-by-hop ones, those named in Connection, and *also*."""
    drop = HOP_BY_HOP | also
    named = connection_tokens(headers)
    if named:
        drop = drop | named
    return [(n, v) for n, v in headers if n.lower() not in drop]


_HOST_RE = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(:[0-9]*)?")


def valid_host(value: bytes) -> bool:
    """``uri-host [ ":" port ]`` (RFC 9110 section 7.2): no '/', '@', spaces."""
    return _HOST_RE.fullmatch(value) is not None


def sane_request_id(value: bytes | None) -> bool:
    return value is not None and _REQUEST_ID_RE.fullmatch(value) is not None


def new_request_id() -> bytes:
    return os.urandom(16).hex().encode()


def host_with_port(host: bytes | None, port: int, fallback: bytes) -> bytes:
    """The Host to send upstream: the client's, with the listener's port added when
    it gave none (the seed's nginx ``Host $host:$server_port``)."""
    if not host:
        return fallback
    if port <= 0:
        return host
    if host.startswith(b"["):
        if host.endswith(b"]"):
            return host + b":%d" % port
        return host
    if b":" in host:
        return host
    return host + b":%d" % port


def build_request_head(
    method: bytes,
    target: bytes,
    headers: RawHeaders,
    *,
    client_addr: str,
    peer_trusted: bool,
    proto: bytes,
    host: bytes,
    request_id_name: bytes,
    request_id: bytes,
    framing: bytes,
) -> bytes:
    """The request head sent upstream, ``\\r\\n\\r\\n`` included.

    *framing* is the body framing line (``Content-Length: N`` or
    ``Transfer-Encoding: chunked``) or empty for no body.
    """
    rid_lower = request_id_name.lower()
    drop = _REQUEST_REPLACED | {rid_lower}
    if not peer_trusted:
        drop = drop | _UNTRUSTED_FORWARDING
    out = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    prior_xff: list[bytes] = []
    if peer_trusted:
        # Read after hop-by-hop removal: an XFF named in Connection is gone.
        prior_xff = [v for n, v in strip_hop_by_hop(headers) if n.lower() == b"x-forwarded-for"]
    for name, value in strip_hop_by_hop(headers, drop):
        # X_Forwarded_For and friends: CGI-style servers read them as the real
        # header (HTTP_X_FORWARDED_FOR); the client must not smuggle them in.
        if b"_" in name and name.lower().replace(b"_", b"-") in drop:
            continue
        out += (name, b": ", value, b"\r\n")
    xff = b", ".join([*prior_xff, client_addr.encode()])
    out += (b"X-Forwarded-For: ", xff, b"\r\nX-Forwarded-Proto: ", proto, b"\r\n",
            request_id_name, b": ", request_id, b"\r\n")
    if framing:
        out += (framing, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def response_headers(headers: RawHeaders) -> list[tuple[bytes, bytes]]:
    """Upstream response headers that go to the client (framing is the gate's)."""
    return strip_hop_by_hop(headers, _RESPONSE_REPLACED)


def response_block(headers: RawHeaders, request_id_name: bytes, request_id: bytes
                   ) -> tuple[bytes, int | None]:
    """The response header lines for the client, and the upstream's Content-Length.

    The request id replaces any the upstream sent; framing headers are the
    gate's to write (:mod:`response`).
    """
    length = header_value(headers, b"content-length")
    kept = strip_hop_by_hop(headers, _RESPONSE_REPLACED | {request_id_name.lower()})
    out = [b"%b: %b\r\n" % pair for pair in kept]
    out.append(b"%b: %b\r\n" % (request_id_name, request_id))
    return b"".join(out), None if length is None else int(length)


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of *name* (lower-case), or None."""
    for n, v in headers:
        if n.lower() == name:
            return v
    return None
