"""The upstream's HTTP/1.1 response rules (palpo_gate/exchange.py), socket-free.

Each script is the bytes an upstream sends (and whether it then closes);
the expected outcome is the events the exchange reports, in order, and
whether the connection may carry the next request. Every script is fed
whole, one byte at a time, and split in two at every byte (or, for long
ones, at random points): the events must not depend on how the bytes came.
The end-to-end cases over real sockets stay in test_forwarding.py,
test_upstream_edges.py and test_edges.py.
"""

from __future__ import annotations

import random
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from palpo_gate.exchange import (
    EVENTS,
    MAX_RESPONSE_HEAD,
    OVERRUN,
    Exchange,
    may_retry,
)

Event = tuple[object, ...]

OK_2 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CL_2 = (b"Content-Length", b"2")


def feed(pieces: list[bytes], head_only: bool = False, eof: bool = False
         ) -> tuple[list[Event], Exchange]:
    """The events *pieces* make, data joined (its cut depends on the reads)."""
    ex = Exchange()
    ex.start(head_only)
    events: list[Event] = []
    for piece in pieces:
        _record(ex, ex.feed(piece), events)
    if eof:
        _record(ex, ex.eof(), events)
    return events, ex


def _record(ex: Exchange, bits: int, events: list[Event]) -> None:
    for bit, name in EVENTS:
        if not bits & bit:
            continue
        if name == "head":
            events.append(("head", *ex.head()))
        elif name == "data":
            data = ex.take()
            assert data, "a data event hands out bytes"
            if events and events[-1][0] == "data":
                events[-1] = ("data", events[-1][1] + data)  # type: ignore[operator]
            else:
                events.append(("data", data))
        elif name == "broken":
            events.append(("broken", ex.error))
        else:
            events.append((name,))


def splits(script: bytes, rng: random.Random) -> list[list[bytes]]:
    """The ways a script is fed: whole, a byte at a time, in two at each byte
    (long scripts: at 200 random points, and in random pieces)."""
    ways = [[script]]
    if len(script) <= 4096:
        ways.append([script[i:i + 1] for i in range(len(script))])
        points: list[int] = list(range(1, len(script)))
    else:
        points = sorted(rng.sample(range(1, len(script)), 200))
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(script)), 30))
            ways.append([script[a:b] for a, b in zip([0, *cuts], [*cuts, len(script)],
                                                      strict=True)])
    ways.extend([script[:i], script[i:]] for i in range(1, len(script)) if i in set(points))
    return ways


def head(status: int, reason: bytes, *headers: tuple[bytes, bytes]) -> Event:
    return ("head", status, reason, list(headers))


END: Event = ("end",)
OVER: Event = ("overrun",)


def broken(why: str) -> Event:
    return ("broken", why)


BAD = "invalid response from upstream: "
CLOSED = broken("upstream closed the connection")
PAD_NAME = b"X-Pad"


def padded_head(total: int, interim: bytes = b"") -> bytes:
    """A 200 head of exactly *total* bytes (with *interim* before it), CL 2."""
    status, tail = b"HTTP/1.1 200 OK\r\n", b"Content-Length: 2\r\n\r\n"
    pad = total - len(interim) - len(status) - len(tail) - len(b"X-Pad: \r\n")
    return interim + status + b"X-Pad: " + b"p" * pad + b"\r\n" + tail


AT_CAP = padded_head(MAX_RESPONSE_HEAD)
OVER_CAP = padded_head(MAX_RESPONSE_HEAD + 1)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"

#: (name, script, head_only, eof, events, reusable)
SCRIPTS: list[tuple[str, bytes, bool, bool, list[Event], bool]] = [
    # -- framing (RFC 9112 section 6.3)
    ("content-length", OK_2, False, False, [head(200, b"OK", CL_2), ("data", b"ok"), END], True),
    ("content-length 0", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False, False,
     [head(200, b"OK", (b"Content-Length", b"0")), END], True),
    ("chunked", b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n", False, False,
     [head(404, b"Not Found", (b"Transfer-Encoding", b"chunked")), ("data", b"abcde"), END],
     True),
    ("trailers are not merged into the head",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"2\r\nok\r\n0\r\nSet-Cookie: injected=1\r\n\r\n", False, False,
     [head(200, b"OK", (b"Transfer-Encoding", b"chunked")), ("data", b"ok"), END], True),
    ("delimited by close", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close",
     False, True,
     [head(200, b"OK", (b"Content-Type", b"text/plain")), ("data", b"until close"), END],
     False),
    ("delimited by close, not closed yet", b"HTTP/1.1 200 OK\r\n\r\nso far", False, False,
     [head(200, b"OK"), ("data", b"so far")], False),
    ("empty reason", b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n", False, False,
     [head(200, b"", (b"Content-Length", b"0")), END], True),
    # -- keep-alive
    ("Connection: close", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
     False, False, [head(200, b"OK", (b"Connection", b"close"), CL_2), ("data", b"ok"), END],
     False),
    ("HTTP/1.0 without keep-alive", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False,
     False, [head(200, b"OK", CL_2), ("data", b"ok"), END], False),
    ("HTTP/1.0 with keep-alive",
     b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", False, False,
     [head(200, b"OK", (b"Connection", b"keep-alive"), CL_2), ("data", b"ok"), END], True),
    # -- interim responses (RFC 9110 section 15.2)
    ("100 Continue skipped", CONTINUE + OK_2, False, False,
     [head(200, b"OK", CL_2), ("data", b"ok"), END], True),
    ("103 Early Hints skipped, their fields too",
     EARLY_HINTS + CONTINUE + OK_2,
     False, False, [head(200, b"OK", CL_2), ("data", b"ok"), END], True),
    ("101 unasked", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
     b"Connection: upgrade\r\n\r\nframes", False, False,
     [broken("upstream switched protocols unasked")], False),
    # -- bodiless responses
    ("HEAD ends at its head, reusable",
     b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1234\r\n\r\n", True, False,
     [head(200, b"OK", (b"Content-Type", b"image/png"), (b"Content-Length", b"1234")), END],
     True),
    ("HEAD with chunked framing", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
     True, False, [head(200, b"OK", (b"Transfer-Encoding", b"chunked")), END], True),
    # Without framing the parser takes the connection to end with the body
    # the GET would have had: not reused.
    ("HEAD without framing", b"HTTP/1.1 200 OK\r\n\r\n", True, False, [head(200, b"OK"), END],
     False),
    ("HEAD with Connection: close",
     b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\n", True, True,
     [head(200, b"OK", (b"Connection", b"close"), (b"Content-Length", b"5")), END], False),
    ("HEAD with a body after its head", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
     True, False, [head(200, b"OK", (b"Content-Length", b"5")), END, OVER], False),
    ("HEAD with a response after its head",
     b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" + OK_2, True, False,
     [head(200, b"OK", (b"Content-Length", b"0")), END, OVER], False),
    ("204 ends at its head", b"HTTP/1.1 204 No Content\r\nETag: \"a\"\r\n\r\n", False, False,
     [head(204, b"No Content", (b"ETag", b'"a"')), END], True),
    ("304 ends at its head whatever its length",
     b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n", False, False,
     [head(304, b"Not Modified", (b"Content-Length", b"99")), END], True),
    ("204 with a bogus chunked body",
     b"HTTP/1.1 204 No Content\r\nETag: \"abc\"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     False, False,
     [head(204, b"No Content", (b"ETag", b'"abc"'), (b"Transfer-Encoding", b"chunked")), END,
      OVER], False),
    ("204 delimited by nothing: the close is no body", b"HTTP/1.1 204 No Content\r\n\r\n",
     False, True, [head(204, b"No Content"), END], True),
    # -- bytes after the response
    ("a second response after it", OK_2 + b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED",
     False, False, [head(200, b"OK", CL_2), ("data", b"ok"), END, OVER], False),
    ("garbage after it", OK_2 + b"garbage", False, False,
     [head(200, b"OK", CL_2), ("data", b"ok"), END, OVER], False),
    ("bytes after Connection: close",
     b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nokXX", False, False,
     [head(200, b"OK", (b"Connection", b"close"), CL_2), ("data", b"ok"), END, OVER], False),
    ("a blank line after it is no message", OK_2 + b"\r\n", False, False,
     [head(200, b"OK", CL_2), ("data", b"ok"), END], True),
    ("the close after a complete response changes nothing", OK_2, False, True,
     [head(200, b"OK", CL_2), ("data", b"ok"), END], True),
    # -- broken responses
    ("Transfer-Encoding gzip", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nnot gzip",
     False, True, [broken(BAD + "upstream sent a Transfer-Encoding other than chunked")], False),
    ("Transfer-Encoding gzip, chunked",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", False, False,
     [broken(BAD + "upstream sent a Transfer-Encoding other than chunked")], False),
    ("two Transfer-Encoding fields",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", False, False,
     [broken(BAD + "upstream sent a Transfer-Encoding other than chunked")], False),
    ("Content-Length and Transfer-Encoding",
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     False, False,
     [broken(BAD + "Transfer-Encoding can't be present with Content-Length")], False),
    ("two Content-Lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
     False, False, [broken(BAD + "Duplicate Content-Length")], False),
    ("not HTTP", b"SSH-2.0-OpenSSH_9.2\r\n", False, True,
     [broken(BAD + "Expected HTTP/, RTSP/ or ICE/")], False),
    ("a bad chunk size", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"2\r\nok\r\nzz\r\n", False, False,
     [head(200, b"OK", (b"Transfer-Encoding", b"chunked")), ("data", b"ok"),
      broken(BAD + "Invalid character in chunk size")], False),
    ("cut in the body", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789", False,
     True, [head(200, b"OK", (b"Content-Length", b"1000")), ("data", b"0123456789"), CLOSED],
     False),
    ("cut in a chunk", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"a\r\n0123456789\r\n5\r\nabc", False, True,
     [head(200, b"OK", (b"Transfer-Encoding", b"chunked")), ("data", b"0123456789abc"),
      CLOSED], False),
    ("cut in the head", b"HTTP/1.1 200 OK\r\nContent-Le", False, True, [CLOSED], False),
    ("cut after an interim response", CONTINUE, False, True, [CLOSED], False),
    ("closed before any byte", b"", False, True, [CLOSED], False),
    # -- the head cap, counted before the tokenizer
    ("a head of exactly the cap", AT_CAP + b"ok", False, False,
     [("head", 200, b"OK", [(PAD_NAME, AT_CAP[24:-23]), CL_2]), ("data", b"ok"), END], True),
    ("a head one byte over the cap", OVER_CAP + b"ok", False, False,
     [broken(f"upstream response head over {MAX_RESPONSE_HEAD} bytes")], False),
    ("interim responses count toward the cap", padded_head(MAX_RESPONSE_HEAD + 1, CONTINUE),
     False, False, [broken(f"upstream response head over {MAX_RESPONSE_HEAD} bytes")], False),
    ("an endless header value", b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * (2 * MAX_RESPONSE_HEAD),
     False, False, [broken(f"upstream response head over {MAX_RESPONSE_HEAD} bytes")], False),
    ("a body is not counted", b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n"
     + b"b" * 200000, False, False,
     [head(200, b"OK", (b"Content-Length", b"200000")), ("data", b"b" * 200000), END], True),
]


@pytest.mark.parametrize(("script", "head_only", "eof", "expected", "reusable"),
                         [s[1:] for s in SCRIPTS], ids=[s[0] for s in SCRIPTS])
def test_script(script: bytes, head_only: bool, eof: bool, expected: list[Event],
                reusable: bool) -> None:
    rng = random.Random(len(script))
    for pieces in splits(script, rng):
        events, ex = feed(pieces, head_only, eof)
        assert events == expected, [len(p) for p in pieces][:10]
        assert ex.reusable is reusable, [len(p) for p in pieces][:10]


def test_the_padded_heads_are_the_size_they_claim() -> None:
    assert len(AT_CAP) == MAX_RESPONSE_HEAD
    assert AT_CAP[24:-23] == b"p" * (len(AT_CAP) - 47)
    assert len(OVER_CAP) == MAX_RESPONSE_HEAD + 1


def test_nothing_is_read_after_broken_or_overrun() -> None:
    ex = Exchange()
    ex.start(False)
    ex.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert ex.feed(OK_2) == 0 and ex.eof() == 0
    ex = Exchange()
    ex.start(False)
    assert ex.feed(OK_2 + b"junk") & OVERRUN
    assert ex.feed(b"more") == 0 and ex.eof() == 0


def test_successive_exchanges_on_one_connection() -> None:
    ex = Exchange()
    # A HEAD response announces a body that never comes: the next response
    # is read by a fresh parser, not taken as that body.
    for head_only, script, expected in [
        (False, OK_2, [head(200, b"OK", CL_2), ("data", b"ok"), END]),
        (True, b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
         [head(200, b"OK", (b"Content-Length", b"1234")), END]),
        (False, b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nnew",
         [head(201, b"Created", (b"Content-Length", b"3")), ("data", b"new"), END]),
        (False, CONTINUE + OK_2, [head(200, b"OK", CL_2), ("data", b"ok"), END]),
    ]:
        assert ex.reusable is False
        ex.start(head_only)
        events: list[Event] = []
        for byte in range(len(script)):
            _record(ex, ex.feed(script[byte:byte + 1]), events)
        assert events == expected
        assert ex.reusable
        ex.next_cycle()
        assert not ex.got_bytes and ex.buffered == 0


def test_got_bytes_counts_interim_responses() -> None:
    ex = Exchange()
    ex.start(False)
    assert not ex.got_bytes
    assert ex.feed(CONTINUE) == 0
    assert ex.got_bytes  # a retry would no longer be safe


# -- may_retry (RFC 9110 section 9.2.2) ---------------------------------------------------

RETRY_TABLE = [
    # method, reused, got_bytes, body_taken, retry
    ("GET", True, False, 0, True),
    ("HEAD", True, False, 0, True),
    ("PUT", True, False, 0, True),
    ("DELETE", True, False, 0, True),
    ("OPTIONS", True, False, 0, True),
    ("TRACE", True, False, 0, True),
    ("POST", True, False, 0, False),  # not idempotent, even without a body
    ("PATCH", True, False, 0, False),
    ("GET", False, False, 0, False),  # a fresh connection: no idle race to blame
    ("GET", True, True, 0, False),  # the upstream began to answer
    ("PUT", True, False, 1, False),  # a body byte was taken from the client
    ("get", True, False, 0, False),  # methods are case-sensitive (RFC 9110 section 9.1)
]


@pytest.mark.parametrize(("method", "reused", "got_bytes", "body_taken", "retry"), RETRY_TABLE)
def test_may_retry(method: str, reused: bool, got_bytes: bool, body_taken: int,
                   retry: bool) -> None:
    assert may_retry(method, reused, got_bytes, body_taken) is retry


# -- properties ------------------------------------------------------------------------

_token = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).map(str.encode)
_value = st.binary(max_size=20).map(lambda b: bytes(c for c in b if 0x20 < c < 0x7f))
_field = st.tuples(_token, _value).map(lambda f: b"%s: %s\r\n" % f)


@st.composite
def _framed(draw: st.DrawFn) -> tuple[bytes, bool]:
    """One response (valid or not), its framing drawn; and whether it is to HEAD."""
    status = draw(st.sampled_from([200, 200, 200, 201, 204, 206, 304, 404, 500, 101, 100]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    body = draw(st.binary(max_size=40))
    fields = b"".join(draw(st.lists(_field, max_size=4)))
    framing = draw(st.sampled_from(["length", "length", "chunked", "chunked", "close", "bad-te",
                                    "wrong-length"]))
    if framing == "length":
        fields += b"Content-Length: %d\r\n" % len(body)
    elif framing == "wrong-length":
        fields += b"Content-Length: %d\r\n" % (len(body) + draw(st.integers(-5, 5)))
    elif framing == "chunked":
        fields += b"Transfer-Encoding: chunked\r\n"
        cut = draw(st.integers(0, len(body)))
        parts = [p for p in (body[:cut], body[cut:]) if p]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    elif framing == "bad-te":
        fields += b"Transfer-Encoding: gzip\r\n"
    if draw(st.booleans()):
        fields += draw(st.sampled_from([b"Connection: close\r\n", b"Connection: keep-alive\r\n"]))
    interim = draw(st.sampled_from([b"", CONTINUE, EARLY_HINTS]))
    return interim + b"%s %d R\r\n%s\r\n%s" % (version, status, fields, body), draw(st.booleans())


@st.composite
def _stream(draw: st.DrawFn) -> tuple[bytes, bool, bool, list[int]]:
    """A byte stream from an upstream: a response, maybe cut, maybe with
    bytes after it; whether it answers HEAD; whether the upstream then
    closes; and where the reads split it."""
    script, head_only = draw(_framed())
    # Reads often end where a response ends: a cut there is drawn often.
    cuts = [len(script)] if draw(st.booleans()) else []
    tail = draw(st.sampled_from([b"", b"\r\n", b"junk", OK_2, b"\x00\xff"]))
    script += tail
    if draw(st.integers(0, 3)) == 0:  # cut short
        script = script[:draw(st.integers(0, len(script)))]
    if draw(st.integers(0, 3)) == 0:  # garbage first
        prefix = bytes(draw(st.lists(st.integers(0, 255), max_size=3)))
        script, cuts = prefix + script, [c + len(prefix) for c in cuts]
    cuts += draw(st.lists(st.integers(1, max(1, len(script) - 1)), max_size=8))
    return script, head_only, draw(st.booleans()), sorted({c for c in cuts
                                                            if 0 < c < len(script)})


@given(_stream())
def test_events_do_not_depend_on_how_the_bytes_are_split(
        stream: tuple[bytes, bool, bool, list[int]]) -> None:
    script, head_only, eof, cuts = stream
    whole, ex_whole = feed([script], head_only, eof)
    pieces = [script[a:b] for a, b in zip([0, *cuts], [*cuts, len(script)], strict=True)]
    split, ex_split = feed(pieces, head_only, eof)
    assert split == whole
    assert ex_split.reusable is ex_whole.reusable


@given(_stream())
def test_a_stream_is_never_both_complete_and_overrun(
        stream: tuple[bytes, bool, bool, list[int]]) -> None:
    """Overrun bytes are never part of a response: they come only after its
    end, and the connection is then never reused; broken is final."""
    script, head_only, eof, cuts = stream
    pieces = [script[a:b] for a, b in zip([0, *cuts], [*cuts, len(script)], strict=True)]
    events, ex = feed(pieces, head_only, eof)
    names = [e[0] for e in events]
    assert not (ex.reusable and ex.overrun)
    if "overrun" in names:
        assert names[-2:] == ["end", "overrun"]
    if "broken" in names:
        assert names[-1] == "broken" and "end" not in names and not ex.reusable
    order = [name for _, name in EVENTS]
    assert names == sorted(names, key=order.index)  # head, data, end, overrun, broken
    assert names.count("head") <= 1 and names.count("end") <= 1


def test_an_exchange_waiting_for_its_response_is_small() -> None:
    """A held long-poll keeps one Exchange per upstream connection while it
    waits: its slots and an empty body list, no per-response containers
    (the header list and the reason are made at the response's first byte).
    An Exchange that made them up front took 340 bytes."""
    waiting: list[Exchange] = []
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(1000):
            ex = Exchange()
            ex.start(False)
            waiting.append(ex)
        per_exchange = (tracemalloc.get_traced_memory()[0] - before) / len(waiting)
    finally:
        tracemalloc.stop()
    assert per_exchange < 280, per_exchange
    # and the first response on it still reads whole, on a reused one too
    ex = waiting[0]
    for _ in range(2):
        events: list[Event] = []
        _record(ex, ex.feed(OK_2), events)
        assert events == [("head", 200, b"OK", [CL_2]), ("data", b"ok"), ("end",)]
        ex.next_cycle()
        ex.start(False)
