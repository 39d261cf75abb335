"""The error funnel: every failure the gate answers itself becomes one status,
one body and one log word here, from the tables below (docs/DESIGN.md section 5).

Upstream failures are raised as :class:`GateError` subclasses anywhere in the
IO shell and turned into a response only by :func:`error_body` and the proxy's
single ``except GateError`` clause. A client that disconnects is not an error.

What the client reads and what the log gets differ: the detail of an
upstream failure names the upstream's URL or socket path and carries parser
messages, so the client is told a fixed text per class (its row's ``text``) and
the detail goes to the log with the request id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

from .routing import ALLOW, Action

#: Matrix error codes for the statuses the gate produces itself.
ERRCODES: dict[int, str] = {
    400: "M_UNKNOWN",
    403: "M_FORBIDDEN",
    404: "M_UNRECOGNIZED",
    405: "M_UNRECOGNIZED",
    408: "M_UNKNOWN",
    413: "M_TOO_LARGE",
    414: "M_UNKNOWN",
    421: "M_UNKNOWN",
    431: "M_UNKNOWN",
    500: "M_UNKNOWN",
    502: "M_UNKNOWN",
    503: "M_UNKNOWN",
    504: "M_UNKNOWN",
    505: "M_UNKNOWN",
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the gate answers one kind of failure or refusal: a row of the tables below."""

    status: int
    #: the client's text; None: the failure's own detail. ``{reason}`` takes
    #: the router's reason for a refused target.
    text: str | None = None
    #: the access line's error word ("" for an answer that is no error)
    word: str = ""
    #: the client connection is closed after the answer: what follows the
    #: request on it cannot be trusted to be in step (a body not read, a
    #: head not understood)
    close: bool = False
    #: the ``kind`` label of ``palpo_gate_upstream_errors_total``, if counted there
    metric: str | None = None
    #: True: Matrix JSON whatever the path; None: as the path is
    matrix: bool | None = None
    #: the Allow header of a 405
    allow: str | None = None
    #: the Matrix errcode (from :data:`ERRCODES` by status unless given)
    errcode: str = ""

    def __post_init__(self) -> None:
        if not self.errcode:
            object.__setattr__(self, "errcode", ERRCODES.get(self.status, "M_UNKNOWN"))


class GateError(Exception):
    """A failure the gate answers as its row of :data:`FAILURES` says.

    *reason* is the detail, for the log; *public* is what the client is told:
    given, else the row's text, else the detail itself (for failures whose
    detail only describes the client's own request).
    """

    #: this class's row of :data:`FAILURES` (set below, from the table)
    outcome: ClassVar[Outcome]

    def __init__(self, reason: str, public: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.public = public or self.outcome.text or reason

    @property
    def status(self) -> int:
        return self.outcome.status

    @property
    def log_word(self) -> str:
        return self.outcome.word


class UpstreamUnavailable(GateError):
    """Connection refused, unreachable, reset before any response byte."""


class UpstreamConnectTimeout(GateError):
    """No connection to the upstream within upstream.connect_timeout."""


class UpstreamTimeout(GateError):
    """No response byte within upstream.read_timeout."""


class UpstreamBroken(GateError):
    """The upstream closed or sent garbage mid-response (the client connection
    is closed instead if the response has begun)."""


class BodyTooLarge(GateError):
    """A request body over limits.max_body_size."""


class BodyTimeout(GateError):
    """The client paused its request body longer than limits.body_timeout."""


class ClientTooSlow(GateError):
    """The client took no response bytes for limits.body_timeout (nginx's
    send_timeout): it would hold an upstream connection for nothing."""


class BadHost(GateError):
    """A Host header that is not ``uri-host [ ":" port ]``."""


class BadRequestBody(GateError):
    """A request body the gate cannot frame or read. The detail may be the
    HTTP parser's message, quoting the bytes it choked on."""


#: The one table of failures: what the client gets, whether its connection
#: closes, what the metrics count and the access line says. Upstream
#: failures tell the client a fixed text: their detail names the upstream's
#: address and quotes parser messages (it goes to the log with the request id).
FAILURES: dict[type[GateError], Outcome] = {
    UpstreamUnavailable: Outcome(502, "upstream unavailable", "upstream_connect_error",
                                 metric="connect_error"),
    UpstreamConnectTimeout: Outcome(504, "upstream timed out", "upstream_connect_timeout",
                                    metric="connect_timeout"),
    UpstreamTimeout: Outcome(504, "upstream timed out", "upstream_timeout", metric="timeout"),
    UpstreamBroken: Outcome(502, "invalid response from upstream", "upstream_broken",
                            metric="broken"),
    BodyTooLarge: Outcome(413, None, "body_too_large", close=True),
    BodyTimeout: Outcome(408, None, "body_timeout", close=True),
    ClientTooSlow: Outcome(408, None, "client_timeout", close=True),
    BadHost: Outcome(400, None, "bad_host", close=True),
    BadRequestBody: Outcome(400, "invalid request body", "bad_request_body", close=True),
}
for _cls, _row in FAILURES.items():
    _cls.outcome = _row

#: The routing decisions the gate answers itself with an error (the others
#: forward, or answer health, well-known and ``OPTIONS *``).
LOCAL_ANSWERS: dict[Action, Outcome] = {
    # admin.allow_from does not hold the client: Matrix JSON, the admin API is under /_synapse
    Action.ADMIN: Outcome(403, "the admin API is not reachable through this gateway",
                          matrix=True),
    Action.BAD_REQUEST: Outcome(400, "bad request target: {reason}", close=True),
    Action.METHOD_NOT_ALLOWED: Outcome(405, "{reason}", allow=ALLOW),
    Action.NOT_FOUND: Outcome(404, "no such endpoint on this gateway"),
}
#: A Host outside the listener's ``hosts`` (RFC 9110 section 15.5.20).
MISDIRECTED = Outcome(421, "this server does not answer for that host")
#: An HTTP version other than 1.0 and 1.1 (RFC 9110 section 15.6.6).
VERSION_NOT_SUPPORTED = Outcome(505, "HTTP version not supported", "version_not_supported",
                                close=True, matrix=True)

#: Requests refused before the handler sees them (the connection's parser
#: or its head limits), by kind: always Matrix JSON, the connection closed.
REFUSALS: dict[str, Outcome] = {
    "version_not_supported": VERSION_NOT_SUPPORTED,
    "head_too_large": Outcome(431, "request head too large", "head_too_large", close=True,
                              matrix=True),
    "uri_too_long": Outcome(414, "request line too long", "uri_too_long", close=True,
                            matrix=True),
    "header_too_large": Outcome(431, "header field too long", "header_too_large",
                                close=True, matrix=True),
    "too_many_headers": Outcome(431, "too many header fields", "header_too_large",
                                close=True, matrix=True),
    "http2_preface": Outcome(400, "HTTP/2 is not served here", "http2_preface", close=True,
                             matrix=True),
    "bad_request": Outcome(400, "malformed request", "bad_request", close=True, matrix=True),
}


def refusal(kind: str) -> tuple[int, str, str]:
    """(status, reason, access word) of a request refused before the handler:
    a key of :data:`REFUSALS`."""
    row = REFUSALS[kind]
    assert row.text is not None
    return row.status, row.text, row.word


def error_body(status: int, reason: str, matrix: bool, errcode: str | None = None
               ) -> tuple[bytes, str]:
    """(body, content type) of an error the gate answers itself; *errcode*
    defaults to the status's in :data:`ERRCODES`."""
    if matrix:
        body = json.dumps({"errcode": errcode or ERRCODES.get(status, "M_UNKNOWN"),
                           "error": reason})
        return body.encode(), "application/json"
    return f"{status} {reason}\n".encode(), "text/plain; charset=utf-8"
