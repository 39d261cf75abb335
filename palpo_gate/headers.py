"""Header rules for both directions (docs/DESIGN.md section 3).

This module owns which headers cross the gate and which the gate sets:
- hop-by-hop headers, and every header named in ``Connection``, are removed
  in both directions *before* anything is added (RFC 9110 section 7.6.1);
- ``X-Forwarded-For``, ``X-Forwarded-Proto``, ``Host`` and the request-id
  header are set by the gate, replacing whatever the client sent; from a
  trusted proxy, its ``X-Forwarded-For`` chain is kept (the peer's address
  appended) and so is its ``X-Forwarded-Proto`` when it is http or https;
- X-Forwarded-For only ever gains IP addresses: a peer on a UNIX socket has
  none, so nothing is appended for it (and without a trusted chain the
  header is not sent at all) where nginx would write ``unix:``;
- other forwarding headers the client may have made up (``Forwarded``,
  ``X-Real-IP``, ``X-Forwarded-Host``, ``X-Forwarded-Port``) are dropped
  unless the peer is a trusted proxy;
- ``Proxy`` is dropped: CGI-style upstreams read it as ``HTTP_PROXY``, the
  outgoing proxy setting (httpoxy, CVE-2016-5385).

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
    b"proxy",  # httpoxy: never a real request header
})

#: Client-made forwarding headers: dropped unless the peer is a trusted proxy.
_UNTRUSTED_FORWARDING: frozenset[bytes] = frozenset({
    b"forwarded", b"x-real-ip", b"x-forwarded-host", b"x-forwarded-port",
})

#: Response headers the gate frames itself (the body length is re-emitted).
_RESPONSE_REPLACED: frozenset[bytes] = frozenset({b"content-length"})

_DROP_TRUSTED = HOP_BY_HOP | _REQUEST_REPLACED
_DROP_UNTRUSTED = _DROP_TRUSTED | _UNTRUSTED_FORWARDING
_DROP_RESPONSE = HOP_BY_HOP | _RESPONSE_REPLACED

_REQUEST_ID_RE = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")

#: The client address of a peer on a UNIX socket (as nginx's $remote_addr).
UNIX_PEER = "unix:"
#: X-Forwarded-Proto values kept from a trusted proxy (lower-cased).
_PROTOS = frozenset({b"http", b"https"})


_HOST_RE = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(:[0-9]*)?")


def valid_host(value: bytes) -> bool:
    """``uri-host [ ":" port ]`` (RFC 9110 section 7.2): no '/', '@', spaces."""
    return _HOST_RE.fullmatch(value) is not None


def sane_request_id(value: bytes | None) -> bool:
    return value is not None and _REQUEST_ID_RE.fullmatch(value) is not None


class _RequestIds:
    """Unique request ids without a syscall each: os.urandom() per request
    cost a getrandom() call on the hot path. A random per-process prefix
    (re-drawn after fork) and a counter: 32 hex digits, unique, not secret."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self._prefix = os.urandom(10).hex().encode()
        self._count = 0

    def __call__(self) -> bytes:
        self._count += 1
        if self._count > 0xFFFFFFFFFFFF:
            self.reset()
            self._count = 1
        return b"%s%012x" % (self._prefix, self._count)


new_request_id = _RequestIds()


def host_with_port(host: bytes | None, port: int, fallback: bytes) -> bytes:
    """The Host to send upstream: the client's, with the listener's port added when
    it gave none (what Palpo's own nginx recipe does: ``Host $host:$server_port``)."""
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


def _drop_named(connection: list[bytes], lines: list[bytes], lnames: list[bytes]
                ) -> tuple[list[bytes], frozenset[bytes]]:
    """The Connection-token rule, for both directions (RFC 9110 section 7.6.1):
    every header named in a ``Connection`` header (*connection*: their
    values) is hop-by-hop and is removed, in any case, every copy. *lines*
    are the header lines kept so far and *lnames* their lower-case names;
    returns the lines left and the names that were listed beyond the
    standard hop-by-hop ones."""
    tokens = {t.strip().lower() for v in connection for t in v.split(b",")}
    named = frozenset(tokens - HOP_BY_HOP - {b""})
    if named:
        lines = [line for line, lname in zip(lines, lnames, strict=True) if lname not in named]
    return lines, named


def build_request_head(method: bytes, target: bytes, headers: RawHeaders, *,
                       client_addr: str, peer_trusted: bool, proto: bytes, host: bytes,
                       request_id_name: bytes, request_id: bytes, framing: bytes) -> bytes:
    """The request head sent upstream, ``\\r\\n\\r\\n`` included.

    *client_addr* is the peer's IP address, or :data:`UNIX_PEER`. *framing*
    is the body framing line (``Content-Length: N`` or ``Transfer-Encoding:
    chunked``) or empty for no body. One pass: this runs for every request.
    """
    rid_lower = request_id_name.lower()
    drop = _DROP_TRUSTED if peer_trusted else _DROP_UNTRUSTED
    lines: list[bytes] = []
    lnames: list[bytes] = []
    connection: list[bytes] = []
    prior_xff: list[bytes] = []
    prior_proto: bytes | None = None
    for name, value in headers:
        lname = name.lower()
        if lname in drop or lname == rid_lower:
            if lname == b"connection":
                connection.append(value)
            elif peer_trusted:
                if lname == b"x-forwarded-for":
                    prior_xff.append(value)
                elif lname == b"x-forwarded-proto":
                    prior_proto = value  # the last one: the nearest proxy's
            continue
        # X_Forwarded_For and friends: CGI-style servers read them as the real
        # header (HTTP_X_FORWARDED_FOR); the client must not smuggle them in.
        if b"_" in lname:
            dashed = lname.replace(b"_", b"-")
            if dashed in drop or dashed == rid_lower:
                continue
        lines.append(b"%b: %b\r\n" % (name, value))
        lnames.append(lname)
    if connection:
        lines, named = _drop_named(connection, lines, lnames)
        if b"x-forwarded-for" in named:
            prior_xff = []
        if b"x-forwarded-proto" in named:
            prior_proto = None
    if prior_proto is not None:
        # A TLS-terminating frontend says what the client used; anything but
        # a plain scheme is not passed on.
        prior_proto = prior_proto.strip().lower()
        if prior_proto in _PROTOS:
            proto = prior_proto
    if client_addr != UNIX_PEER:
        prior_xff.append(client_addr.encode())
    if prior_xff:
        tail = b"X-Forwarded-For: %b\r\nX-Forwarded-Proto: %b\r\n%b: %b\r\n" % (
            b", ".join(prior_xff), proto, request_id_name, request_id)
    else:
        tail = b"X-Forwarded-Proto: %b\r\n%b: %b\r\n" % (proto, request_id_name, request_id)
    return b"".join((
        b"%b %b HTTP/1.1\r\nHost: %b\r\n" % (method, target, host),
        *lines,
        tail,
        b"%b\r\n\r\n" % framing if framing else b"\r\n",
    ))


_KEEP_ALIVE = [b"keep-alive"]


def response_block(headers: RawHeaders, request_id_name: bytes, request_id: bytes
                   ) -> tuple[bytes, int | None]:
    """The response header lines for the client, and the upstream's Content-Length.

    The request id replaces any the upstream sent; framing headers are the
    gate's to write (:mod:`response`). One pass, as for requests.
    """
    rid_lower = request_id_name.lower()
    length: bytes | None = None
    lines: list[bytes] = []
    lnames: list[bytes] = []
    connection: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        if lname in _DROP_RESPONSE or lname == rid_lower:
            if lname == b"content-length":
                length = value
            elif lname == b"connection":
                connection.append(value)
            continue
        lines.append(b"%b: %b\r\n" % (name, value))
        lnames.append(lname)
    # nginx's (and most servers') ``Connection: keep-alive`` names nothing
    # beyond the hop-by-hop headers: no tokenising for it.
    if connection and connection != _KEEP_ALIVE:
        lines, _ = _drop_named(connection, lines, lnames)
    lines.append(b"%b: %b\r\n" % (request_id_name, request_id))
    return b"".join(lines), None if length is None else int(length)


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of *name* (lower-case), or None."""
    for n, v in headers:
        if n.lower() == name:
            return v
    return None
