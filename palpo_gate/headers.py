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
from collections.abc import Callable, Iterable, Sequence

from .errors import BadHost, BadRequestBody, BodyTooLarge, GateError

RawHeaders = Sequence[tuple[bytes, bytes]]
#: What :meth:`RequestHeads.build` makes of a request's headers:
#: ``(head, refusal, has_body, chunked, buffer, expect)``.
RequestHead = tuple[bytes, GateError | None, bool, bool, bool, bool]

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


#: Bytes looked for in a header name or Host as ints: ``b"_" in name`` makes
#: CPython raise and clear a TypeError inside bytes.__contains__ (it tries the
#: needle as an int first), ten times the cost of ``0x5F in name``, a memchr.
_UNDERSCORE = ord("_")
_COLON = ord(":")

#: A valid Host: ``uri-host [ ":" port ]`` (RFC 9110 section 7.2): no '/', '@', spaces.
_HOST_RE = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(:[0-9]*)?")
#: RequestHeads remembers the Hosts it found valid, with the Host each one
#: becomes upstream (:func:`host_with_port`): clients send the same few, and a
#: dict lookup costs a fraction of the match and the call. Bounded (emptied
#: when full), and only short Hosts are kept, so a client sending a new Host
#: per request costs at most _HOSTS_MAX x _HOST_LEN bytes and the match it
#: costs anyway. Invalid ones are never kept: their answer is always the match's.
_HOSTS_MAX = 1024
_HOST_LEN = 128


def valid_host(host: bytes) -> bool:
    """Whether *host* is a valid Host value (RFC 9110 section 7.2)."""
    return _HOST_RE.fullmatch(host) is not None


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
        #: the prefix in the format: an id is one ``%`` of one int, no tuple
        self._format = os.urandom(10).hex().encode() + b"%012x"
        self._count = 0

    def __call__(self) -> bytes:
        count = self._count = self._count + 1
        if count > 0xFFFFFFFFFFFF:
            self.reset()
            count = self._count = 1
        return self._format % count


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
    if _COLON in host:
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


class RequestHeads:
    """One listener's upstream request heads: what they share, and the one
    pass over a request's raw headers that builds each (:meth:`build`).

    That pass is all the gate reads of a forwarded request's headers: the
    framing (RFC 9112 section 6.1), Host, Expect and the client's request id
    come out of the same loop that applies the rules above, so a request
    costs one pass, not one lookup per header the gate needs.
    """

    __slots__ = ("_hosts", "_rid_tail", "buffer_upload", "fallback_host", "max_body", "new_id",
                 "port", "proto", "rid_lower", "rid_name")

    def __init__(self, proto: bytes, request_id_name: bytes, port: int, fallback_host: bytes,
                 max_body: int, buffer_upload: Callable[[str, str], bool] | None = None,
                 new_id: Callable[[], bytes] = new_request_id) -> None:
        #: X-Forwarded-Proto unless a trusted proxy said otherwise
        self.proto = proto
        self.rid_name = request_id_name
        self.rid_lower = request_id_name.lower()
        #: the head's last lines up to the request id, when the scheme is the listener's
        self._rid_tail = b"X-Forwarded-Proto: %b\r\n%b: " % (proto, request_id_name)
        #: the port added to a Host without one (0: none), and the Host when
        #: the client sent none (:func:`host_with_port`)
        self.port = port
        self.fallback_host = fallback_host
        #: valid Hosts seen, and the Host each is sent upstream as (see _HOSTS_MAX)
        self._hosts: dict[bytes, bytes] = {}
        #: limits.max_body_size: a larger Content-Length is refused
        self.max_body = max_body
        #: forwarding.buffer_chunked_uploads: (method, target) -> whether a
        #: chunked body is collected first; None when off
        self.buffer_upload = buffer_upload
        self.new_id = new_id

    def bind(self, port: int, fallback_host: bytes) -> None:
        """Set the port added to a Host without one, and the Host sent when
        the client gave none (once the listener's socket is bound)."""
        self.port = port
        self.fallback_host = fallback_host
        self._hosts.clear()  # what they were made of changed

    def build(self, method: str, target: str, headers: RawHeaders, client_addr: str,
              peer_trusted: bool
              ) -> tuple[bytes, RequestHead]:
        """The request id, and ``(head, refusal, has_body, chunked, buffer,
        expect)`` for one request.

        *head* is the head to send upstream, ``\\r\\n\\r\\n`` included, framed
        as the client framed the body (``Content-Length: N``, ``Transfer-Encoding:
        chunked``, or nothing); a chunked body to *buffer* first gets no framing
        (:func:`spool.with_length` adds it). *refusal* is the error to answer
        instead (a Transfer-Encoding other than chunked, a Content-Length over
        the limit, a bad Host, checked in that order; *head* is then empty).
        *chunked*: the body is sent on chunked as it comes; *expect*: the client
        sent ``Expect: 100-continue`` for a body. The request id is the
        client's when sane, else a new one. *client_addr* is the peer's IP
        address, or :data:`UNIX_PEER`.
        """
        rid_lower = self.rid_lower
        drop = _DROP_TRUSTED if peer_trusted else _DROP_UNTRUSTED
        lines: list[bytes] = []
        lnames: list[bytes] = []
        connection: list[bytes] = []
        prior_xff: list[bytes] = []
        prior_proto: bytes | None = None
        host = rid = length = te = expect = None
        for name, value in headers:
            lname = name.lower()
            if lname in drop or lname == rid_lower:
                # The first of each, as a lookup by name would give.
                if lname == b"host":
                    if host is None:
                        host = value
                elif lname == rid_lower:
                    if rid is None:
                        rid = value
                elif lname == b"content-length":
                    if length is None:
                        length = value
                elif lname == b"transfer-encoding":
                    if te is None:
                        te = value
                elif lname == b"expect":
                    if expect is None:
                        expect = value
                elif lname == b"connection":
                    connection.append(value)
                elif peer_trusted:
                    if lname == b"x-forwarded-for":
                        prior_xff.append(value)
                    elif lname == b"x-forwarded-proto":
                        prior_proto = value  # the last one: the nearest proxy's
                continue
            # X_Forwarded_For and friends: CGI-style servers read them as the real
            # header (HTTP_X_FORWARDED_FOR); the client must not smuggle them in.
            if _UNDERSCORE in lname:
                dashed = lname.replace(b"_", b"-")
                if dashed in drop or dashed == rid_lower:
                    continue
            lines.append(b"%b: %b\r\n" % (name, value))
            lnames.append(lname)
        if rid is None or _REQUEST_ID_RE.fullmatch(rid) is None:
            rid = self.new_id()
        # Framing (RFC 9112 section 6.1): the C parser already refused CL+TE,
        # repeated TE and bad chunk sizes; a coding other than chunked is ours.
        if te is not None and te.strip().lower() != b"chunked":
            msg = "only Transfer-Encoding: chunked is accepted"
            return rid, (b"", BadRequestBody(msg, public=msg), False, False, False, False)
        size = None if length is None else int(length)
        if size is not None and size > self.max_body:
            return rid, (b"", BodyTooLarge(f"request body over the limit of {self.max_body} bytes"),
                         False, False, False, False)
        buffer = False
        if te is not None:
            # forwarding.buffer_chunked_uploads: collected first, framed then.
            buffer = self.buffer_upload is not None and self.buffer_upload(method, target)
            framing = b"\r\n" if buffer else b"Transfer-Encoding: chunked\r\n\r\n"
            has_body = True
        elif size is not None:
            framing = b"Content-Length: %d\r\n\r\n" % size
            has_body = size > 0
        else:
            framing = b"\r\n"
            has_body = False
        if host is None:
            upstream_host = self.fallback_host
        else:
            known = self._hosts.get(host)
            if known is None:
                if _HOST_RE.fullmatch(host) is None:
                    return rid, (b"", BadHost("invalid Host header"), False, False, False, False)
                known = host_with_port(host, self.port, self.fallback_host)
                if len(host) <= _HOST_LEN:
                    if len(self._hosts) >= _HOSTS_MAX:
                        self._hosts.clear()
                    self._hosts[host] = known
            upstream_host = known
        if connection:
            lines, named = _drop_named(connection, lines, lnames)
            if b"x-forwarded-for" in named:
                prior_xff = []
            if b"x-forwarded-proto" in named:
                prior_proto = None
        rid_tail = self._rid_tail
        if prior_proto is not None:
            # A TLS-terminating frontend says what the client used; anything but
            # a plain scheme is not passed on.
            prior_proto = prior_proto.strip().lower()
            if prior_proto in _PROTOS:
                rid_tail = b"X-Forwarded-Proto: %b\r\n%b: " % (prior_proto, self.rid_name)
        if client_addr != UNIX_PEER:
            prior_xff.append(client_addr.encode())
        if prior_xff:
            tail = b"X-Forwarded-For: %b\r\n%b%b\r\n" % (b", ".join(prior_xff), rid_tail, rid)
        else:
            tail = b"%b%b\r\n" % (rid_tail, rid)
        head = b"".join((
            b"%b %b HTTP/1.1\r\nHost: %b\r\n" % (
                method.encode(), target.encode("utf-8", "surrogateescape"), upstream_host),
            *lines,
            tail,
            framing,
        ))
        return rid, (head, None, has_body, te is not None and not buffer, buffer,
                     has_body and expect is not None and expect.lower() == b"100-continue")


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
