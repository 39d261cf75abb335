"""The upstream's HTTP/1.1 responses as rules: bytes in, events out.

This module owns how a response from the upstream is read (RFC 9112): its
framing, interim responses, bodiless responses, where it ends, what may
follow it, whether the connection can carry the next request, and whether a
failed request may be sent again. It knows no socket, event loop or clock:
:class:`Exchange` is fed the bytes that came and answers with the events
they made. :mod:`upstream` moves the bytes; :mod:`proxy` acts on the
events. httptools is the tokenizer.

The events are bits of what :meth:`Exchange.feed` and :meth:`Exchange.eof`
return, and happen in this order:

- :data:`HEAD`: the final response head is complete (:meth:`Exchange.head`);
- :data:`DATA`: body bytes wait in :meth:`Exchange.take`;
- :data:`END`: the response is complete;
- :data:`OVERRUN`: bytes came after the end of the response: the response
  stands, the connection is out of step and never reused;
- :data:`BROKEN`: the response cannot be read (:attr:`Exchange.error` says
  why); nothing follows.

Rules kept here:

- the body is framed by Content-Length, by chunked, or else by the close of
  the connection (RFC 9112 section 6.3); a Transfer-Encoding other than
  chunked is refused: it would be passed on mis-framed (section 6.1);
- interim responses (1xx) are skipped (RFC 9110 section 15.2), but their
  bytes count toward the response head cap; 101 is never asked for (the
  gate does not forward Upgrade), so a switch is a broken response;
- a response to HEAD ends at its head (RFC 9110 section 9.3.2), whatever its
  framing headers say, and leaves the connection reusable; so do 204 and 304
  (RFC 9112 section 6.3 rule 1), with no body;
- any byte after the end of a response makes the connection out of step
  (OVERRUN), and it is the same whether that byte came in the same read or a
  later one: nothing after the end is taken as part of the response;
- trailer fields are never merged into the head (RFC 9110 section 6.5.1);
- the response head (with the interim responses before it) is capped at
  :data:`MAX_RESPONSE_HEAD` bytes, counted before httptools sees them:
  httptools joins a long header value by repeated concatenation, quadratic
  in its length;
- the connection is reused only when the response was read to its end,
  both sides allow keep-alive, and nothing came after it.
"""

from __future__ import annotations

import httptools

#: The events, as bits of what :meth:`Exchange.feed` and :meth:`Exchange.eof` return.
HEAD = 1
DATA = 2
END = 4
OVERRUN = 8
BROKEN = 16
#: Their names, in the order they happen (for logs and tests).
EVENTS: tuple[tuple[int, str], ...] = (
    (HEAD, "head"), (DATA, "data"), (END, "end"), (OVERRUN, "overrun"), (BROKEN, "broken"),
)

#: The most bytes of response head (status line and header fields, with any
#: interim 1xx responses before it), as nginx's proxy_buffer_size bounds it.
MAX_RESPONSE_HEAD = 64 * 1024

#: RFC 9110 section 9.2.2: the methods whose repetition has the effect of one.
IDEMPOTENT: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

_NO_BODY = frozenset({204, 304})

#: The headers of a response not begun: the list is made at its first byte
#: (:meth:`Exchange.on_message_begin`), so a held long-poll carries none.
_NO_HEADERS: tuple[()] = ()


def may_retry(method: str, reused: bool, got_bytes: bool, body_taken: int) -> bool:
    """Whether a request that failed before its response may be sent again,
    once, on a new connection.

    RFC 9110 section 9.2.2: a proxy MUST NOT retry a request whose method is
    not idempotent (the upstream may have acted on it). Beyond that, only the
    race of a pooled (*reused*) connection the upstream closed while idle is
    retried: no byte of the response came (*got_bytes* False), and no byte
    of the request body was taken from the client (*body_taken* 0), since it
    could not be sent twice.
    """
    return reused and not got_bytes and body_taken == 0 and method in IDEMPOTENT


class _Overrun(Exception):
    """Raised inside the parser to stop it at bytes past the response."""


class _Refused(Exception):
    """Raised inside the parser at a response head the gate will not pass on."""


class Exchange:
    """The response side of the exchanges on one upstream connection, one at
    a time: :meth:`start`, then :meth:`feed` / :meth:`eof` until END, OVERRUN
    or BROKEN, then :meth:`next_cycle` if :attr:`reusable`."""

    # Slots: thousands of these are held during long-polls.
    __slots__ = (
        "_events", "_head_bytes", "_head_only", "_parser", "_reason", "_until_close", "body",
        "buffered", "complete", "error", "got_bytes", "head_ready", "headers", "keep_alive",
        "overrun", "reusable", "status",
    )

    def __init__(self) -> None:
        # Made at the first response byte: a held long-poll has none yet, and
        # a parser costs about 1 KiB.
        self._parser: httptools.HttpResponseParser | None = None
        self._head_only = False
        #: body pieces not yet taken (a list: an empty deque costs 760 bytes)
        self.body: list[bytes] = []
        #: bytes in :attr:`body`
        self.buffered = 0
        self.next_cycle()

    def next_cycle(self) -> None:
        """Fresh state for the next exchange on the same connection."""
        if self._head_only:
            # The parser still waits for the body the HEAD response's framing
            # announced: the next response gets a fresh one.
            self._parser = None
            self._head_only = False
        if self.body:
            self.take()
        self._events = 0
        #: a byte of a response came (an interim one too)
        self.got_bytes = False
        self.status = 0
        self._reason = b""  # bytes, not a bytearray: nothing to allocate until it comes
        self.headers: list[tuple[bytes, bytes]] | tuple[()] = _NO_HEADERS
        #: the final response head is complete
        self.head_ready = False
        #: the response is complete (its end or, for HEAD, its head came)
        self.complete = False
        self.keep_alive = False
        #: the connection may carry the next request: the response was read to
        #: its end, both sides allow keep-alive, and nothing came after it
        self.reusable = False
        #: bytes came after the end of the response
        self.overrun = False
        #: why the response is broken, None while it is not
        self.error: str | None = None
        self._until_close = False
        #: bytes fed before the final response head was complete
        self._head_bytes = 0

    def start(self, head_only: bool) -> None:
        """A request was sent; *head_only* when it was HEAD (no body will follow)."""
        self._head_only = head_only

    def head(self) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """(status, reason, raw headers) of the final response."""
        return self.status, self._reason, self.headers  # type: ignore[return-value]

    def take(self) -> bytes:
        """The body bytes not yet taken (b"" if none)."""
        body = self.body
        if not body:
            return b""
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self.buffered = 0
        return data

    # -- bytes in, events out ------------------------------------------------------

    def feed(self, data: bytes | memoryview) -> int:
        """Take bytes from the upstream; the events they made."""
        if self.overrun or self.error is not None:
            return 0  # nothing after the end of what can be read is looked at
        self.got_bytes = True
        self._events = 0
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpResponseParser(self)
        try:
            if self.head_ready:
                parser.feed_data(data)
            elif len(data) <= MAX_RESPONSE_HEAD - self._head_bytes:
                self._head_bytes += len(data)
                parser.feed_data(data)
            else:
                self._feed_capped(parser, data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Overrun) or self.complete:
                self._overrun()
            else:
                self._broken(f"invalid response from upstream: {cause or exc}")
        except httptools.HttpParserUpgrade:
            self._broken("upstream switched protocols unasked")
        except httptools.HttpParserError as exc:
            if self.complete:
                self._overrun()  # the response before it stands
            else:
                self._broken(f"invalid response from upstream: {exc}")
        return self._events

    def eof(self) -> int:
        """The upstream closed the connection; the events that made."""
        if self.complete or self.error is not None:
            return 0
        if self.head_ready and self._until_close:
            # RFC 9112 section 6.3 rule 8: the body ends when the connection does.
            self.complete = True
            return END
        self._broken("upstream closed the connection")
        return BROKEN

    def _feed_capped(self, parser: httptools.HttpResponseParser,
                     data: bytes | memoryview) -> None:
        """Feed the head up to its cap; past the cap, the head must be complete."""
        room = MAX_RESPONSE_HEAD - self._head_bytes
        self._head_bytes = MAX_RESPONSE_HEAD
        if room > 0:
            parser.feed_data(data[:room])
        if not self.head_ready:
            self._broken(f"upstream response head over {MAX_RESPONSE_HEAD} bytes")
        elif not self.overrun:
            parser.feed_data(data[room:])

    def _overrun(self) -> None:
        self.overrun = True
        self.reusable = False
        self._events |= OVERRUN

    def _broken(self, why: str) -> None:
        self.error = why
        self.reusable = False
        self._events |= BROKEN

    # -- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.head_ready:
            # A second message after the final response (RFC 9112 section 6.3:
            # a response to a request the gate never sent). Stop parsing here:
            # it must neither change the response being sent nor stay in the
            # pool half-parsed.
            raise _Overrun
        self._reason = b""
        self.headers = []

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        # After the head these are trailer fields: dropped.
        if not self.head_ready:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if status < 200:
            return  # interim (100, 103): not forwarded; the final response follows
        framed = False  # by Content-Length or chunked
        codings: list[bytes] = []
        for name, value in self.headers:
            size = len(name)  # compared first: most names are neither
            if size == 14:
                if name.lower() == b"content-length":
                    framed = True
            elif size == 17 and name.lower() == b"transfer-encoding":
                codings.append(value)
        if codings:
            if len(codings) > 1 or codings[0].strip().lower() != b"chunked":
                raise _Refused("upstream sent a Transfer-Encoding other than chunked")
            framed = True
        self.status = status
        self.head_ready = True
        if self._head_only:
            # Read now: the parser never reaches the end of this message.
            self.keep_alive = self.reusable = parser.should_keep_alive()
            self.complete = True
            self._events |= HEAD | END
            return
        if status not in _NO_BODY:
            self._until_close = not framed
        self._events |= HEAD

    def on_body(self, body: bytes) -> None:
        if self.complete:
            raise _Overrun  # a body after a HEAD response's head
        self.body.append(body)
        self.buffered += len(body)
        self._events |= DATA

    def on_message_complete(self) -> None:
        if not self.head_ready or self.complete:
            return  # end of an interim response; a HEAD response ended at its head
        # Read it here: httptools forgets it once feed_data() returns.
        assert self._parser is not None
        self.keep_alive = self.reusable = self._parser.should_keep_alive()
        self.complete = True
        self._events |= END
