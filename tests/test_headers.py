"""Header rules in both directions (docs/DESIGN.md section 3), as tables: no sockets.

Headers are raw ``(name, value)`` byte pairs as the parser saw them; what
passes must keep its name spelling, value, order and duplicates.
"""

from __future__ import annotations

import pytest

from palpo_gate import headers as headers_mod
from palpo_gate.errors import BadHost, BadRequestBody, BodyTooLarge
from palpo_gate.headers import (
    RequestHead,
    RequestHeads,
    host_with_port,
    new_request_id,
    response_block,
    sane_request_id,
    valid_host,
)

H = list[tuple[bytes, bytes]]

#: docs/DESIGN.md section 3, spelled as a client would send them.
HOP_BY_HOP = [
    b"Connection", b"Keep-Alive", b"Proxy-Connection", b"TE", b"Trailer",
    b"Transfer-Encoding", b"Upgrade", b"Proxy-Authorization", b"Proxy-Authenticate",
]
HOP_VALUES = {
    b"Connection": b"keep-alive", b"Keep-Alive": b"timeout=5, max=100",
    b"Proxy-Connection": b"keep-alive", b"TE": b"trailers", b"Trailer": b"Expires",
    b"Transfer-Encoding": b"chunked", b"Upgrade": b"websocket",
    b"Proxy-Authorization": b"Basic dTpw", b"Proxy-Authenticate": b"Basic realm=x",
}

# -- hop-by-hop and the Connection-token rule, in both directions ---------------------------
#
# The same table runs through the two functions that serve traffic:
# RequestHeads.build (client -> upstream) and response_block (upstream -> client).

AROUND: H = [(b"Accept", b"*/*"), (b"Authorization", b"Bearer t")]
RID = b"X-Request-ID"


def _passed_request(headers: H) -> bytes:
    """The header lines RequestHeads.build passes on from *headers*."""
    head = _head(headers)
    start = len(REQ_LINE + b"\r\n" + HOST + b"\r\n")
    end = head.index(b"X-Forwarded-For: ")
    assert head[end:].startswith(_lines(*TAIL_UNTRUSTED)[:-2]), head
    return head[start:end]


def _passed_response(headers: H) -> bytes:
    """The header lines response_block passes on from *headers*."""
    block, _ = response_block(headers, RID, b"rid-1")
    assert block.endswith(b"X-Request-ID: rid-1\r\n"), block
    return block[:-len(b"X-Request-ID: rid-1\r\n")]


def _block(headers: H) -> bytes:
    return b"".join(b"%s: %s\r\n" % (n, v) for n, v in headers)


@pytest.mark.parametrize("direction", ["request", "response"])
@pytest.mark.parametrize("spelling", ["as-is", "lower", "upper"])
@pytest.mark.parametrize("name", HOP_BY_HOP, ids=[n.decode() for n in HOP_BY_HOP])
def test_each_hop_by_hop_header_is_removed(name: bytes, spelling: str, direction: str) -> None:
    sent = {"as-is": name, "lower": name.lower(), "upper": name.upper()}[spelling]
    headers = [AROUND[0], (sent, HOP_VALUES[name]), AROUND[1]]
    passed = _passed_request if direction == "request" else _passed_response
    assert passed(headers) == _block(AROUND)


STRIP_TABLE: list[tuple[str, H, H]] = [
    (
        "named in Connection",
        [(b"Connection", b"X-A"), (b"X-A", b"1"), (b"X-B", b"2")],
        [(b"X-B", b"2")],
    ),
    (
        "several names in one Connection header",
        [(b"X-A", b"1"), (b"Connection", b"X-A, X-B"), (b"X-B", b"2"), (b"X-C", b"3")],
        [(b"X-C", b"3")],
    ),
    (
        "several Connection headers",
        [(b"Connection", b"X-A"), (b"X-A", b"1"), (b"connection", b"x-b"), (b"X-B", b"2"),
         (b"X-C", b"3")],
        [(b"X-C", b"3")],
    ),
    (
        "odd case and whitespace in the Connection list",
        [(b"CONNECTION", b"  x-A ,,\t X-b\t, "), (b"x-a", b"1"), (b"X-B", b"2"),
         (b"X-C", b"3")],
        [(b"X-C", b"3")],
    ),
    (
        "a named header is removed wherever it appears, every copy",
        [(b"X-A", b"1"), (b"Accept", b"a"), (b"X-A", b"2"), (b"Connection", b"x-a")],
        [(b"Accept", b"a")],
    ),
    (
        "the rest keeps order, case and duplicates",
        [(b"accept", b"a"), (b"X-Custom", b"v1"), (b"Connection", b"close"),
         (b"x-custom", b"v2"), (b"ACCEPT-Language", b"de"), (b"X-Custom", b"v1")],
        [(b"accept", b"a"), (b"X-Custom", b"v1"), (b"x-custom", b"v2"),
         (b"ACCEPT-Language", b"de"), (b"X-Custom", b"v1")],
    ),
    (
        "values are untouched",
        [(b"Cookie", b"a=1;  b=2 "), (b"Content-Type", b"application/json; charset=UTF-8")],
        [(b"Cookie", b"a=1;  b=2 "), (b"Content-Type", b"application/json; charset=UTF-8")],
    ),
    (
        "a name listed in Connection that is hop-by-hop anyway",
        [(b"Connection", b"Keep-Alive, TE"), (b"Keep-Alive", b"timeout=5"), (b"X-A", b"1")],
        [(b"X-A", b"1")],
    ),
    ("an empty Connection list", [(b"Connection", b" , "), (b"X-A", b"1")], [(b"X-A", b"1")]),
    ("nothing", [], []),
]




@pytest.mark.parametrize("direction", ["request", "response"])
@pytest.mark.parametrize(("headers", "expected"), [r[1:] for r in STRIP_TABLE],
                         ids=[r[0] for r in STRIP_TABLE])
def test_connection_named_headers_are_removed(headers: H, expected: H, direction: str) -> None:
    passed = _passed_request if direction == "request" else _passed_response
    assert passed(headers) == _block(expected)


def test_the_header_builders_do_not_modify_their_input() -> None:
    headers = [(b"Connection", b"X-A"), (b"X-A", b"1"), (b"Content-Length", b"1")]
    _head(headers)
    response_block(headers, RID, b"rid-1")
    assert headers == [(b"Connection", b"X-A"), (b"X-A", b"1"), (b"Content-Length", b"1")]


# -- RequestHeads.build: the head ----------------------------------------------------------

CLIENT = "203.0.113.7"
LIMIT = 1000


def _build(headers: H, *, trusted: bool = False, rid_name: bytes = b"X-Request-ID",
           method: str = "GET", target: str = "/_matrix/client/versions",
           proto: bytes = b"https", port: int = 443,
           fallback: bytes = b"matrix.example.com:443", client: str = CLIENT,
           buffer: object = None) -> tuple[bytes, RequestHead]:
    """RequestHeads.build as a listener on *port* runs it; a new request id is ``rid-1``."""
    heads = RequestHeads(proto, rid_name, port, fallback, LIMIT,
                         buffer,  # type: ignore[arg-type]
                         new_id=lambda: b"rid-1")
    return heads.build(method, target, headers, client, trusted)


def _head(headers: H, **kwargs: object) -> bytes:
    """The head built from *headers*, which the gate takes."""
    _, (head, refusal, *_) = _build(headers, **kwargs)  # type: ignore[arg-type]
    assert refusal is None
    return head


def _lines(*lines: bytes) -> bytes:
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n"


TAIL_UNTRUSTED = (b"X-Forwarded-For: 203.0.113.7", b"X-Forwarded-Proto: https",
                  b"X-Request-ID: rid-1")
REQ_LINE = b"GET /_matrix/client/versions HTTP/1.1"
HOST = b"Host: matrix.example.com:443"

CLIENT_FORWARDING: H = [
    (b"Forwarded", b"for=198.51.100.1"), (b"X-Real-IP", b"198.51.100.1"),
    (b"X-Forwarded-Host", b"evil.example"), (b"X-Forwarded-Port", b"1234"),
]
SET_BY_GATE: H = [
    (b"Host", b"evil.example"), (b"X-Forwarded-For", b"198.51.100.1"),
    (b"X-Forwarded-Proto", b"http"), (b"X-Request-ID", b"client-id"),
    (b"Content-Length", b"999"), (b"Expect", b"100-continue"),
]

HEAD_TABLE: list[tuple[str, dict[str, object], bytes]] = [
    (
        "no headers",
        {"headers": []},
        _lines(REQ_LINE, HOST, *TAIL_UNTRUSTED),
    ),
    (
        "other headers keep order, case and duplicates",
        {"headers": [(b"user-agent", b"ua"), (b"Accept", b"*/*"), (b"X-Dup", b"1"),
                     (b"Authorization", b"X-Matrix origin=o,key=k,sig=s"), (b"x-dup", b"2")]},
        _lines(REQ_LINE, HOST, b"user-agent: ua", b"Accept: */*", b"X-Dup: 1",
               b"Authorization: X-Matrix origin=o,key=k,sig=s", b"x-dup: 2", *TAIL_UNTRUSTED),
    ),
    (
        "client-sent Host, X-Forwarded-*, request id, Content-Length, Expect: the gate's lines",
        {"headers": [(b"Accept", b"a"), *SET_BY_GATE, (b"User-Agent", b"ua")]},
        _lines(REQ_LINE, b"Host: evil.example:443", b"Accept: a", b"User-Agent: ua",
               TAIL_UNTRUSTED[0], TAIL_UNTRUSTED[1], b"X-Request-ID: client-id",
               b"Content-Length: 999"),
    ),
    (
        "replaced whatever the case of the name",
        {"headers": [(b"HOST", b"h"), (b"x-forwarded-for", b"1.1.1.1"),
                     (b"X-FORWARDED-PROTO", b"http"), (b"x-request-id", b"c"),
                     (b"content-length", b"1"), (b"EXPECT", b"100-continue")]},
        _lines(REQ_LINE, b"Host: h:443", TAIL_UNTRUSTED[0], TAIL_UNTRUSTED[1],
               b"X-Request-ID: c", b"Content-Length: 1"),
    ),
    (
        "untrusted peer: made-up forwarding headers dropped",
        {"headers": [(b"Accept", b"a"), *CLIENT_FORWARDING, (b"User-Agent", b"ua")]},
        _lines(REQ_LINE, HOST, b"Accept: a", b"User-Agent: ua", *TAIL_UNTRUSTED),
    ),
    (
        "trusted peer: forwarding headers kept in place",
        {"headers": [(b"Accept", b"a"), *CLIENT_FORWARDING, (b"User-Agent", b"ua")],
         "trusted": True},
        _lines(REQ_LINE, HOST, b"Accept: a", b"Forwarded: for=198.51.100.1",
               b"X-Real-IP: 198.51.100.1", b"X-Forwarded-Host: evil.example",
               b"X-Forwarded-Port: 1234", b"User-Agent: ua", *TAIL_UNTRUSTED),
    ),
    (
        "trusted peer: X-Forwarded-For appended to",
        {"headers": [(b"X-Forwarded-For", b"198.51.100.1")], "trusted": True},
        _lines(REQ_LINE, HOST, b"X-Forwarded-For: 198.51.100.1, 203.0.113.7",
               *TAIL_UNTRUSTED[1:]),
    ),
    (
        "trusted peer: several X-Forwarded-For headers joined in order",
        {"headers": [(b"X-Forwarded-For", b"192.0.2.1"), (b"Accept", b"a"),
                     (b"x-forwarded-for", b"192.0.2.2, 192.0.2.3")], "trusted": True},
        _lines(REQ_LINE, HOST, b"Accept: a",
               b"X-Forwarded-For: 192.0.2.1, 192.0.2.2, 192.0.2.3, 203.0.113.7",
               *TAIL_UNTRUSTED[1:]),
    ),
    (
        "trusted peer without X-Forwarded-For: just the client",
        {"headers": [(b"Accept", b"a")], "trusted": True},
        _lines(REQ_LINE, HOST, b"Accept: a", *TAIL_UNTRUSTED),
    ),
    (
        "untrusted peer: several X-Forwarded-For headers all discarded",
        {"headers": [(b"X-Forwarded-For", b"192.0.2.1"), (b"X-Forwarded-For", b"192.0.2.2")]},
        _lines(REQ_LINE, HOST, *TAIL_UNTRUSTED),
    ),
    (
        # RFC 9110 section 7.6.1: a header named in Connection is removed before
        # the gate adds its own; the trusted proxy's X-Forwarded-For is one of them.
        "trusted peer: X-Forwarded-For named in Connection is not appended to",
        {"headers": [(b"X-Forwarded-For", b"192.0.2.1"), (b"Connection", b"X-Forwarded-For")],
         "trusted": True},
        _lines(REQ_LINE, HOST, *TAIL_UNTRUSTED),
    ),
    (
        "hop-by-hop and Connection-named headers removed",
        {"headers": [(b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"s"),
                     (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"),
                     (b"Upgrade", b"websocket"), (b"Proxy-Authorization", b"Basic x"),
                     (b"Proxy-Connection", b"keep-alive"), (b"Trailer", b"X"),
                     (b"Transfer-Encoding", b"chunked"), (b"Accept", b"a")]},
        _lines(REQ_LINE, HOST, b"Accept: a", *TAIL_UNTRUSTED, b"Transfer-Encoding: chunked"),
    ),
    (
        "Content-Length framing line last",
        {"headers": [(b"Content-Type", b"application/json"), (b"Content-Length", b"2")],
         "method": "POST", "target": "/_matrix/client/v3/login"},
        _lines(b"POST /_matrix/client/v3/login HTTP/1.1", HOST,
               b"Content-Type: application/json", *TAIL_UNTRUSTED, b"Content-Length: 2"),
    ),
    (
        "raw target byte for byte",
        {"headers": [], "method": "PUT",
         "target": "/_matrix/client/v3/rooms/%21a%3Ahs/send/m.room.message/a%2fb%2E?x=%2F&&"},
        _lines(b"PUT /_matrix/client/v3/rooms/%21a%3Ahs/send/m.room.message/a%2fb%2E?x=%2F&& "
               b"HTTP/1.1", HOST, *TAIL_UNTRUSTED),
    ),
    (
        "plain listener, IPv6 Host",
        {"headers": [(b"Host", b"[::1]")], "proto": b"http", "port": 8080},
        _lines(REQ_LINE, b"Host: [::1]:8080", b"X-Forwarded-For: 203.0.113.7",
               b"X-Forwarded-Proto: http", b"X-Request-ID: rid-1"),
    ),
    (
        "custom request id header: the client's taken, X-Request-ID passes",
        {"headers": [(b"x-correlation-id", b"client"), (b"X-Request-ID", b"other")],
         "rid_name": b"X-Correlation-ID"},
        _lines(REQ_LINE, HOST, b"X-Request-ID: other", b"X-Forwarded-For: 203.0.113.7",
               b"X-Forwarded-Proto: https", b"X-Correlation-ID: client"),
    ),
    (
        "custom request id header: an insane one replaced",
        {"headers": [(b"X-Correlation-ID", b"a b")], "rid_name": b"X-Correlation-ID"},
        _lines(REQ_LINE, HOST, b"X-Forwarded-For: 203.0.113.7",
               b"X-Forwarded-Proto: https", b"X-Correlation-ID: rid-1"),
    ),
]


@pytest.mark.parametrize(("kwargs", "expected"), [r[1:] for r in HEAD_TABLE],
                         ids=[r[0] for r in HEAD_TABLE])
def test_request_head(kwargs: dict[str, object], expected: bytes) -> None:
    assert _head(**kwargs) == expected  # type: ignore[arg-type]


XFP = b"X-Forwarded-Proto"
RID_LINE = b"X-Request-ID: rid-1"
XFF_CLIENT = b"X-Forwarded-For: 203.0.113.7"

#: Forwarding from a trusted frontend: its scheme is kept when plain; a peer
#: on a UNIX socket adds no address (it has none) and nginx's "unix:" never
#: reaches the upstream; httpoxy's Proxy header never passes.
FRONTEND_TABLE: list[tuple[str, dict[str, object], bytes]] = [
    ("trusted peer: its X-Forwarded-Proto kept",
     {"headers": [(XFP, b"http")], "trusted": True},
     _lines(REQ_LINE, HOST, XFF_CLIENT, b"X-Forwarded-Proto: http", RID_LINE)),
    ("trusted peer: X-Forwarded-Proto lower-cased",
     {"headers": [(b"x-forwarded-proto", b" HTTPS ")], "trusted": True, "proto": b"http"},
     _lines(REQ_LINE, HOST, XFF_CLIENT, b"X-Forwarded-Proto: https", RID_LINE)),
    ("trusted peer: the last X-Forwarded-Proto (the nearest proxy's)",
     {"headers": [(XFP, b"https"), (XFP, b"http")], "trusted": True},
     _lines(REQ_LINE, HOST, XFF_CLIENT, b"X-Forwarded-Proto: http", RID_LINE)),
    *((f"trusted peer: X-Forwarded-Proto {bad!r} is not a scheme: the listener's",
       {"headers": [(XFP, bad)], "trusted": True, "proto": b"http"},
       _lines(REQ_LINE, HOST, XFF_CLIENT, b"X-Forwarded-Proto: http", RID_LINE))
      for bad in (b"", b"ftp", b"https, http", b"https\x00", b"javascript")),
    ("trusted peer: X-Forwarded-Proto named in Connection is not kept",
     {"headers": [(XFP, b"http"), (b"Connection", b"X-Forwarded-Proto")], "trusted": True},
     _lines(REQ_LINE, HOST, XFF_CLIENT, b"X-Forwarded-Proto: https", RID_LINE)),
    ("untrusted UNIX-socket peer: X-Forwarded-Proto replaced",
     {"headers": [(XFP, b"http")], "client": "unix:"},
     _lines(REQ_LINE, HOST, b"X-Forwarded-Proto: https", RID_LINE)),
    ("UNIX-socket peer, untrusted: no X-Forwarded-For at all",
     {"headers": [(b"X-Forwarded-For", b"198.51.100.1"), (b"Accept", b"a")],
      "client": "unix:"},
     _lines(REQ_LINE, HOST, b"Accept: a", b"X-Forwarded-Proto: https", RID_LINE)),
    ("UNIX-socket peer, trusted: its chain as sent, nothing appended",
     {"headers": [(b"X-Forwarded-For", b"198.51.100.1, 192.0.2.4"), (XFP, b"https")],
      "client": "unix:", "trusted": True, "proto": b"http"},
     _lines(REQ_LINE, HOST, b"X-Forwarded-For: 198.51.100.1, 192.0.2.4",
            b"X-Forwarded-Proto: https", RID_LINE)),
    ("UNIX-socket peer, trusted, without a chain: no X-Forwarded-For",
     {"headers": [], "client": "unix:", "trusted": True},
     _lines(REQ_LINE, HOST, b"X-Forwarded-Proto: https", RID_LINE)),
    ("httpoxy: Proxy dropped from an untrusted peer",
     {"headers": [(b"Proxy", b"http://evil.example:3128"), (b"Accept", b"a")]},
     _lines(REQ_LINE, HOST, b"Accept: a", *TAIL_UNTRUSTED)),
    ("httpoxy: Proxy dropped from a trusted peer too, whatever its case",
     {"headers": [(b"PROXY", b"http://evil.example:3128"), (b"Accept", b"a")],
      "trusted": True},
     _lines(REQ_LINE, HOST, b"Accept: a", *TAIL_UNTRUSTED)),
]


@pytest.mark.parametrize(("kwargs", "expected"), [r[1:] for r in FRONTEND_TABLE],
                         ids=[r[0] for r in FRONTEND_TABLE])
def test_request_head_behind_a_frontend(kwargs: dict[str, object],
                                              expected: bytes) -> None:
    head = _head(**kwargs)  # type: ignore[arg-type]
    assert head == expected
    assert b"unix:" not in head


def test_request_head_has_host_first_and_one_of_each_gate_header() -> None:
    head = _head([*SET_BY_GATE, *SET_BY_GATE, *CLIENT_FORWARDING, (b"Accept", b"a")],
                 trusted=True)
    lines = head.split(b"\r\n")
    assert lines[1].startswith(b"Host: ")
    names = [line.split(b":", 1)[0].lower() for line in lines[1:] if line]
    for name in (b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id",
                 b"content-length"):
        assert names.count(name) == 1, name
    assert b"expect" not in names
    assert head.endswith(b"\r\n\r\n") and head.count(b"\r\n\r\n") == 1


# -- RequestHeads.build: framing, Host, Expect, the request id ------------------------------
#
# What the handler acts on, from the same pass that builds the head: the
# framing (RFC 9112 section 6.1), the refusals (in this order: a coding other
# than chunked 400, a Content-Length over limits.max_body_size 413, a bad
# Host 400), Expect: 100-continue for a body, and the client's request id
# when sane (the first one; else a new one, here rid-1).

TE_REFUSED = ("BadRequestBody", "only Transfer-Encoding: chunked is accepted")
TOO_LARGE = ("BodyTooLarge", f"request body over the limit of {LIMIT} bytes")
BAD_HOST = ("BadHost", "invalid Host header")
CL = b"Content-Length"
TE = b"Transfer-Encoding"
EXPECT = (b"Expect", b"100-continue")
BODY = (CL, b"5")

#: (id, headers, _build kwargs, expected: has_body, chunked, buffer, expect,
#:  the last line before the blank one, Host line, rid, refusal)
FACTS_TABLE: list[tuple[str, H, dict[str, object], dict[str, object]]] = [
    ("no body", [], {}, {"body": False, "last": RID_LINE}),
    ("Content-Length: 0 is no body, framed all the same", [(CL, b"0")], {},
     {"body": False, "last": b"Content-Length: 0"}),
    ("Content-Length", [BODY], {}, {"body": True, "last": b"Content-Length: 5"}),
    ("content-length in lower case", [(b"content-length", b"5")], {},
     {"body": True, "last": b"Content-Length: 5"}),
    ("Content-Length re-emitted as a number", [(CL, b"007")], {},
     {"body": True, "last": b"Content-Length: 7"}),
    ("Content-Length at the limit", [(CL, b"%d" % LIMIT)], {},
     {"body": True, "last": b"Content-Length: %d" % LIMIT}),
    ("Content-Length over the limit: 413", [(CL, b"%d" % (LIMIT + 1))], {},
     {"refusal": TOO_LARGE}),
    ("chunked", [(TE, b"chunked")], {},
     {"body": True, "chunked": True, "last": b"Transfer-Encoding: chunked"}),
    ("chunked in any case, around spaces", [(b"TRANSFER-ENCODING", b" Chunked\t")], {},
     {"body": True, "chunked": True, "last": b"Transfer-Encoding: chunked"}),
    ("a coding other than chunked: 400", [(TE, b"gzip")], {}, {"refusal": TE_REFUSED}),
    ("codings before chunked: 400", [(TE, b"gzip, chunked")], {}, {"refusal": TE_REFUSED}),
    ("an empty Transfer-Encoding: 400", [(TE, b"")], {}, {"refusal": TE_REFUSED}),
    ("the first Transfer-Encoding decides", [(TE, b"gzip"), (TE, b"chunked")], {},
     {"refusal": TE_REFUSED}),
    ("buffer_chunked_uploads, a media upload: collected, framed later",
     [(TE, b"chunked")], {"buffer": lambda method, target: True},
     {"body": True, "buffer": True, "last": RID_LINE}),
    ("buffer_chunked_uploads, not a media upload: sent on chunked",
     [(TE, b"chunked")], {"buffer": lambda method, target: False},
     {"body": True, "chunked": True, "last": b"Transfer-Encoding: chunked"}),
    ("buffer_chunked_uploads never asked about a Content-Length body", [BODY],
     {"buffer": lambda method, target: pytest.fail("asked")},
     {"body": True, "last": b"Content-Length: 5"}),
    ("no Host: the listener's address", [], {}, {"host": b"Host: matrix.example.com:443"}),
    ("an empty Host: the listener's address", [(b"Host", b"")], {},
     {"host": b"Host: matrix.example.com:443"}),
    ("Host without a port: the listener's added", [(b"host", b"hs.example")], {},
     {"host": b"Host: hs.example:443"}),
    ("Host with a port, any case of the name", [(b"HOST", b"Hs.Example:8448")], {},
     {"host": b"Host: Hs.Example:8448"}),
    ("the first Host", [(b"Host", b"a.example"), (b"Host", b"b.example")], {},
     {"host": b"Host: a.example:443"}),
    ("Host on a UNIX-socket listener: no port added", [(b"Host", b"hs.example")],
     {"port": 0, "fallback": b"localhost"}, {"host": b"Host: hs.example"}),
    *((f"Host {bad!r}: 400", [(b"Host", bad)], {}, {"refusal": BAD_HOST})
      for bad in (b"a b", b"evil.example/x", b"user@hs.example", b"[::1", b"hs:443x")),
    ("a bad coding is refused before a bad Host", [(TE, b"gzip"), (b"Host", b"a b")], {},
     {"refusal": TE_REFUSED}),
    ("a body over the limit is refused before a bad Host",
     [(CL, b"%d" % (LIMIT + 1)), (b"Host", b"a b")], {}, {"refusal": TOO_LARGE}),
    ("Expect: 100-continue with a body", [BODY, EXPECT], {},
     {"body": True, "expect": True, "last": b"Content-Length: 5"}),
    ("Expect: 100-continue, chunked", [EXPECT, (TE, b"chunked")], {},
     {"body": True, "chunked": True, "expect": True, "last": b"Transfer-Encoding: chunked"}),
    ("Expect in any case", [BODY, (b"EXPECT", b"100-Continue")], {},
     {"body": True, "expect": True, "last": b"Content-Length: 5"}),
    ("Expect: 100-continue without a body", [EXPECT], {}, {"expect": False}),
    ("Expect: 100-continue with Content-Length: 0", [EXPECT, (CL, b"0")], {},
     {"body": False, "expect": False, "last": b"Content-Length: 0"}),
    ("another expectation", [BODY, (b"Expect", b"something-else")], {},
     {"body": True, "expect": False, "last": b"Content-Length: 5"}),
    ("the first Expect", [BODY, (b"Expect", b"x"), EXPECT], {},
     {"body": True, "expect": False, "last": b"Content-Length: 5"}),
    ("no Expect answered when the body is refused", [(CL, b"%d" % (LIMIT + 1)), EXPECT], {},
     {"refusal": TOO_LARGE}),
    ("request id absent: a new one", [], {}, {"rid": b"rid-1"}),
    ("request id present and sane: the client's", [(b"X-Request-ID", b"abc-123")], {},
     {"rid": b"abc-123"}),
    ("request id, any case of the name", [(b"x-REQUEST-id", b"abc-123")], {},
     {"rid": b"abc-123"}),
    *((f"request id {bad!r}: a new one", [(b"X-Request-ID", bad)], {}, {"rid": b"rid-1"})
      for bad in (b"", b"a b", b"a" * 129, b"abc\r\nX-Injected: 1", b"caf\xc3\xa9")),
    ("request id duplicated: the first", [(b"X-Request-ID", b"one"), (b"x-request-id", b"two")],
     {}, {"rid": b"one"}),
    ("request id duplicated, the first insane: a new one, never the second",
     [(b"X-Request-ID", b"o n e"), (b"X-Request-ID", b"two")], {}, {"rid": b"rid-1"}),
    ("an underscore spelling is no request id (and is dropped)",
     [(b"X_Request_ID", b"smuggled")], {}, {"rid": b"rid-1"}),
    ("the request id of a refused request is the client's", [(b"X-Request-ID", b"abc"),
                                                            (TE, b"gzip")], {},
     {"rid": b"abc", "refusal": TE_REFUSED}),
]


@pytest.mark.parametrize(("headers", "kwargs", "expected"), [r[1:] for r in FACTS_TABLE],
                         ids=[r[0] for r in FACTS_TABLE])
def test_request_head_facts(headers: H, kwargs: dict[str, object],
                            expected: dict[str, object]) -> None:
    rid, (head, refusal, has_body, chunked, buffer, expect) = _build(
        headers, **kwargs)  # type: ignore[arg-type]
    assert rid == expected.get("rid", rid)
    if "refusal" in expected:
        assert refusal is not None and head == b""
        assert (type(refusal).__name__, refusal.public) == expected["refusal"]
        assert not (has_body or chunked or buffer or expect)
        return
    assert refusal is None
    assert has_body is expected.get("body", False)
    assert chunked is expected.get("chunked", False)
    assert buffer is expected.get("buffer", False)
    assert expect is expected.get("expect", False)
    lines = head.split(b"\r\n")
    assert head.endswith(b"\r\n\r\n") and head.count(b"\r\n\r\n") == 1
    # The request id in the head is the one returned; framing comes last.
    assert b"X-Request-ID: " + rid in lines
    if "last" in expected:
        assert lines[-3] == expected["last"]
    if "host" in expected:
        assert lines[1] == expected["host"]


def test_request_head_asks_about_buffering_with_the_method_and_raw_target() -> None:
    asked: list[tuple[str, str]] = []
    target = "/_matrix/media/v3/upload?filename=a%2Fb"
    _build([(TE, b"chunked")], method="POST", target=target,
           buffer=lambda method, target: asked.append((method, target)) or True)
    assert asked == [("POST", target)]


def test_request_head_refusals_are_the_funnel_errors() -> None:
    for headers, cls in (([(TE, b"gzip")], BadRequestBody),
                         ([(CL, b"%d" % (LIMIT + 1))], BodyTooLarge),
                         ([(b"Host", b"a b")], BadHost)):
        _, (_, refusal, *_) = _build(headers)
        assert type(refusal) is cls


# -- host_with_port ----------------------------------------------------------------------

HOST_TABLE: list[tuple[bytes | None, int, bytes]] = [
    (b"matrix.example.com", 443, b"matrix.example.com:443"),
    (b"matrix.example.com:8448", 443, b"matrix.example.com:8448"),
    (b"127.0.0.1", 8080, b"127.0.0.1:8080"),
    (b"127.0.0.1:8080", 443, b"127.0.0.1:8080"),
    (b"[::1]", 8448, b"[::1]:8448"),
    (b"[2001:db8::1]:443", 8448, b"[2001:db8::1]:443"),
    (b"Matrix.Example.COM", 443, b"Matrix.Example.COM:443"),  # case kept
    (b"", 443, b"fallback:443"),
    (None, 443, b"fallback:443"),
    (b"matrix.example.com", 0, b"matrix.example.com"),  # unix listener: no port
    (b"[::1]", 0, b"[::1]"),
]


@pytest.mark.parametrize(("host", "port", "expected"), HOST_TABLE,
                         ids=[f"{h!r}-{p}" for h, p, _ in HOST_TABLE])
def test_host_with_port(host: bytes | None, port: int, expected: bytes) -> None:
    assert host_with_port(host, port, b"fallback:443") == expected


# -- request ids -------------------------------------------------------------------------

GOOD_IDS = [
    b"a",
    b"rid-1",
    b"550e8400-e29b-41d4-a716-446655440000",
    b"0123456789abcdef0123456789abcdef",
    b"req.1:2/3+4=5@6_7",
    b"Ab0" * 42 + b"xy",  # 128 bytes
]
BAD_IDS = [
    pytest.param(None, id="absent"),
    pytest.param(b"", id="empty"),
    pytest.param(b"a" * 129, id="129 bytes"),
    pytest.param(b"a b", id="inner space"),
    pytest.param(b" abc", id="leading space"),
    pytest.param(b"abc ", id="trailing space"),
    pytest.param(b"a\tb", id="tab"),
    pytest.param(b"abc\r\nX-Injected: 1", id="CRLF and a header"),
    pytest.param(b"abc\n", id="trailing LF"),
    pytest.param(b"abc\r", id="trailing CR"),
    pytest.param(b"abc\r\n", id="trailing CRLF"),
    pytest.param(b"\nabc", id="leading LF"),
    pytest.param(b"a\x00b", id="NUL"),
    pytest.param(b"caf\xc3\xa9", id="UTF-8"),
    pytest.param(b"\xff", id="non-ASCII byte"),
    pytest.param(b"a" * 128 + b"\n", id="128 bytes and a trailing LF"),
]


@pytest.mark.parametrize("value", GOOD_IDS, ids=[v[:20].decode() for v in GOOD_IDS])
def test_sane_request_id_accepts(value: bytes) -> None:
    assert len(value) <= 128
    assert sane_request_id(value) is True


@pytest.mark.parametrize("value", BAD_IDS)
def test_sane_request_id_refuses(value: bytes | None) -> None:
    assert sane_request_id(value) is False


#: Host values and whether they are valid (RFC 9110 section 7.2).
HOSTS = [
    b"example.org", b"example.org:8448", b"127.0.0.1:8008", b"[::1]:443", b"[::1]", b"",
    b"EXAMPLE.org.", b"a" * 300, b"a" * 128, b"a" * 129 + b":1",
    b"example.org/evil", b"user@example.org", b"exa mple.org", b"[::1", b"example.org:80x",
    b"a" * 300 + b"@",
]


def _upstream_host(heads: RequestHeads, host: bytes) -> bytes | None:
    """The Host line *heads* sends upstream for a client's *host*; None if refused."""
    _, (head, refusal, *_) = heads.build("GET", "/", [(b"Host", host)], "10.0.0.1", False)
    if refusal is not None:
        assert isinstance(refusal, BadHost) and head == b""
        return None
    return head.split(b"\r\n")[1]


def test_remembered_hosts_give_the_answers_of_the_match_and_host_with_port() -> None:
    heads = RequestHeads(b"http", b"X-Request-Id", 8008, b"localhost:8008", 1 << 20)
    for _ in range(3):  # first time, then from the memory
        for host in HOSTS:
            want = (b"Host: " + host_with_port(host, 8008, b"localhost:8008")
                    if valid_host(host) else None)
            assert _upstream_host(heads, host) == want, host
    # Only valid, short ones are remembered.
    assert set(heads._hosts) == {
        h for h in HOSTS if valid_host(h) and len(h) <= headers_mod._HOST_LEN}
    assert b"a" * 300 not in heads._hosts


def test_valid_host_is_the_match() -> None:
    for host in HOSTS:
        assert valid_host(host) is (headers_mod._HOST_RE.fullmatch(host) is not None)
    assert valid_host(b"[::1]:443") and not valid_host(b"example.org/evil")


def test_remembered_hosts_are_bounded() -> None:
    heads = RequestHeads(b"http", b"X-Request-Id", 8008, b"localhost", 1 << 20)
    most = headers_mod._HOSTS_MAX
    for i in range(3 * most + 7):
        assert _upstream_host(heads, b"h%d.example.org" % i) == b"Host: h%d.example.org:8008" % i
        assert len(heads._hosts) <= most
    assert _upstream_host(heads, b"h1.example.org") == b"Host: h1.example.org:8008"
    assert _upstream_host(heads, b"h1.example.org/x") is None


def test_a_remembered_host_follows_the_bound_port() -> None:
    # The port is set once the socket is bound (port 0 in the config): what
    # was remembered before is not sent with the old port.
    heads = RequestHeads(b"http", b"X-Request-Id", 0, b"localhost", 1 << 20)
    assert _upstream_host(heads, b"example.org") == b"Host: example.org"
    assert _upstream_host(heads, b"") == b"Host: localhost"
    heads.bind(41234, b"127.0.0.1:41234")
    assert _upstream_host(heads, b"example.org") == b"Host: example.org:41234"
    assert _upstream_host(heads, b"") == b"Host: 127.0.0.1:41234"


def test_a_remembered_host_does_not_let_an_invalid_one_through() -> None:
    heads = RequestHeads(b"http", b"X-Request-Id", 8008, b"localhost", 1 << 20)
    for _ in range(2):
        assert _upstream_host(heads, b"example.org") == b"Host: example.org:8008"
    assert _upstream_host(heads, b"example.org/x") is None
    assert _upstream_host(heads, b"example.org@x") is None


def test_new_request_ids_are_sane_and_distinct() -> None:
    ids = {new_request_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(sane_request_id(i) for i in ids)


# -- response_block ----------------------------------------------------------------------

#: (name, upstream headers, request id header name, lines passed, Content-Length)
RESPONSE_TABLE: list[tuple[str, H, bytes, H, int | None]] = [
    (
        "Content-Length and hop-by-hop removed, Set-Cookie duplicates kept",
        [(b"Content-Type", b"application/json"), (b"Content-Length", b"5"),
         (b"Set-Cookie", b"a=1; Path=/"), (b"Connection", b"close, X-Internal"),
         (b"X-Internal", b"x"), (b"Set-Cookie", b"b=2; Path=/"),
         (b"Transfer-Encoding", b"chunked"), (b"Keep-Alive", b"timeout=5"),
         (b"Proxy-Authenticate", b"Basic"), (b"Upgrade", b"h2c"), (b"Trailer", b"X"),
         (b"set-cookie", b"a=1; Path=/"), (b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT")],
        RID,
        [(b"Content-Type", b"application/json"), (b"Set-Cookie", b"a=1; Path=/"),
         (b"Set-Cookie", b"b=2; Path=/"), (b"set-cookie", b"a=1; Path=/"),
         (b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT")],
        5,
    ),
    (
        "content-length in any case: the last one is the length",
        [(b"content-length", b"5"), (b"CONTENT-LENGTH", b"5"), (b"ETag", b'"x"')],
        RID, [(b"ETag", b'"x"')], 5,
    ),
    (
        "no Content-Length: none (the gate frames the body itself)",
        [(b"Content-Encoding", b"gzip"), (b"Vary", b"Accept-Encoding"),
         (b"Cache-Control", b"no-cache")],
        RID,
        [(b"Content-Encoding", b"gzip"), (b"Vary", b"Accept-Encoding"),
         (b"Cache-Control", b"no-cache")],
        None,
    ),
    (
        "Content-Length 0",
        [(b"Content-Length", b"0")], RID, [], 0,
    ),
    (
        "the upstream's request id replaced by the gate's, whatever its case",
        [(b"x-request-id", b"from-upstream"), (b"ETag", b'"x"'), (b"X-REQUEST-ID", b"2")],
        RID, [(b"ETag", b'"x"')], None,
    ),
    (
        "a custom request id header: X-Request-ID passes, the custom one replaced",
        [(b"X-Request-ID", b"up"), (b"x-correlation-id", b"up")],
        b"X-Correlation-ID", [(b"X-Request-ID", b"up")], None,
    ),
    (
        "Connection naming Content-Type and the request id header",
        [(b"Connection", b"content-type, x-request-id"), (b"Content-Type", b"text/plain"),
         (b"Content-Length", b"2")],
        RID, [], 2,
    ),
    ("nothing", [], RID, [], None),
]


@pytest.mark.parametrize(("headers", "rid_name", "expected", "length"),
                         [r[1:] for r in RESPONSE_TABLE], ids=[r[0] for r in RESPONSE_TABLE])
def test_response_block(headers: H, rid_name: bytes, expected: H, length: int | None) -> None:
    block, length_out = response_block(headers, rid_name, b"rid-1")
    assert block == _block(expected) + rid_name + b": rid-1\r\n"
    assert length_out == length


# -- response_block against the rule, written out plainly --------------------------------


def _rule_response(headers: H, rid_name: bytes) -> tuple[bytes, int | None]:
    """RFC 9110 section 7.6.1 and the gate's own fields, the slow way: every
    hop-by-hop header, every header named in any Connection header (any
    case, every copy), Content-Length (the last is the length) and the
    upstream's request id are dropped; the rest keeps order, case, values."""
    named = {t.strip().lower() for n, v in headers if n.lower() == b"connection"
             for t in v.split(b",")}
    drop = {n.lower() for n in HOP_BY_HOP} | named | {b"content-length", rid_name.lower()}
    lengths = [v for n, v in headers if n.lower() == b"content-length"]
    kept = [(n, v) for n, v in headers if n.lower() not in drop]
    return (_block(kept) + rid_name + b": rid-1\r\n",
            int(lengths[-1]) if lengths else None)


CT = (b"Content-Type", b"application/json")
NGINX: H = [(b"Server", b"nginx"), (b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT"), CT,
            (b"Content-Length", b"240"), (b"Connection", b"keep-alive")]

#: (name, upstream headers, request id header name)
RULE_ROWS: list[tuple[str, H, bytes]] = [
    ("nginx's head", NGINX, RID),
    ("keep-alive first", [(b"Connection", b"keep-alive"), *NGINX[:3]], RID),
    ("Keep-Alive spelled otherwise", [(b"connection", b"Keep-Alive"), CT], RID),
    ("KEEP-ALIVE", [(b"CONNECTION", b"KEEP-ALIVE"), CT], RID),
    ("keep-alive with spaces", [(b"Connection", b" keep-alive "), CT], RID),
    ("keep-alive and a name", [(b"Connection", b"keep-alive, X-A"), (b"X-A", b"1"), CT], RID),
    ("two Connection headers, the second names one",
     [(b"Connection", b"keep-alive"), (b"X-A", b"1"), (b"Connection", b"x-a"), CT], RID),
    ("two Connection: keep-alive", [(b"Connection", b"keep-alive"), CT,
                                    (b"Connection", b"keep-alive")], RID),
    ("keep-alive with a Keep-Alive header",
     [(b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"), CT], RID),
    ("close", [(b"Connection", b"close"), CT, (b"Content-Length", b"0")], RID),
    ("close names a header called Close", [(b"Connection", b"close"), (b"Close", b"x"), CT],
     RID),
    ("keep-alive never names a header", [(b"Connection", b"keep-alive"), (b"X-Keep", b"1")],
     RID),
    ("a name in odd case and whitespace",
     [(b"Connection", b"\tX-a ,keep-alive,"), (b"x-A", b"1"), (b"X-A", b"2"), CT], RID),
    ("Connection names Content-Length: its length still counts",
     [(b"Connection", b"Content-Length"), (b"Content-Length", b"7"), CT], RID),
    ("the request id in any case, every copy",
     [(b"x-request-id", b"a"), CT, (b"X-REQUEST-ID", b"b"), (b"X-Request-Id", b"c")], RID),
    ("a custom request id header and Connection naming X-Request-ID",
     [(b"Connection", b"x-request-id"), (b"X-Request-ID", b"up"), (b"X-Trace", b"t")],
     b"X-Trace"),
    ("duplicates and Set-Cookie kept in order",
     [(b"Set-Cookie", b"a=1"), (b"Connection", b"keep-alive"), (b"set-cookie", b"b=2"),
      (b"Set-Cookie", b"a=1"), (b"Vary", b"Origin"), (b"Vary", b"Accept")], RID),
    ("values with inner and trailing whitespace untouched",
     [(b"X-A", b"a  b\t"), (b"Connection", b"keep-alive"), (b"X-B", b"")], RID),
    ("every hop-by-hop header at once", [(n, HOP_VALUES[n]) for n in HOP_BY_HOP] + [CT], RID),
    ("only keep-alive", [(b"Connection", b"keep-alive")], RID),
]


@pytest.mark.parametrize(("headers", "rid_name"), [r[1:] for r in RULE_ROWS],
                         ids=[r[0] for r in RULE_ROWS])
def test_response_block_keeps_the_rule(headers: H, rid_name: bytes) -> None:
    assert response_block(headers, rid_name, b"rid-1") == _rule_response(headers, rid_name)
