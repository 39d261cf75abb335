"""The error funnel: every failure the gate answers itself becomes one status,
one body and one log word here (SPEC section 5).

Upstream failures are raised as :class:`GateError` subclasses anywhere in the
IO shell and turned into a response only by :func:`error_body` and the proxy's
single ``except GateError`` clause. A client that disconnects is not an error.

What the client reads and what the log gets differ: the detail of an
upstream failure names the upstream's URL or socket path and carries parser
messages, so the client is told a fixed text per class (``generic``) and the
detail goes to the log with the request id.
"""

from __future__ import annotations

import json

#: Matrix error codes for the statuses the gate produces itself.
ERRCODES: dict[int, str] = {
    400: "M_UNKNOWN",
    403: "M_FORBIDDEN",
    404: "M_UNRECOGNIZED",
    405: "M_UNRECOGNIZED",
    408: "M_UNKNOWN",
    413: "M_TOO_LARGE",
    421: "M_UNKNOWN",
    500: "M_UNKNOWN",
    502: "M_UNKNOWN",
    503: "M_UNKNOWN",
    504: "M_UNKNOWN",
}


class GateError(Exception):
    """A failure the gate answers with *status*.

    *reason* is the detail, for the log; *public* is what the client is told:
    given, else the class's ``generic`` text, else the detail itself (for
    failures whose detail only describes the client's own request).
    """

    status = 502
    log_word = "error"
    #: the client's text for every instance of the class; None: the detail
    generic: str | None = None

    def __init__(self, reason: str, public: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.public = public or self.generic or reason


class UpstreamUnavailable(GateError):
    """Connection refused, unreachable, reset before any response byte (502)."""

    status = 502
    log_word = "upstream_connect_error"
    generic = "upstream unavailable"


class UpstreamConnectTimeout(GateError):
    status = 504
    log_word = "upstream_connect_timeout"
    generic = "upstream timed out"


class UpstreamTimeout(GateError):
    """No response byte within upstream.read_timeout (504)."""

    status = 504
    log_word = "upstream_timeout"
    generic = "upstream timed out"


class UpstreamBroken(GateError):
    """The upstream closed or sent garbage mid-response (502, or the client
    connection is closed if the response has begun)."""

    status = 502
    log_word = "upstream_broken"
    generic = "invalid response from upstream"


class BodyTooLarge(GateError):
    status = 413
    log_word = "body_too_large"


class BodyTimeout(GateError):
    """The client paused its request body longer than limits.body_timeout."""

    status = 408
    log_word = "body_timeout"


class ClientTooSlow(GateError):
    """The client took no response bytes for limits.body_timeout (nginx's
    send_timeout): it would hold an upstream connection for nothing."""

    status = 408
    log_word = "client_timeout"


class BadHost(GateError):
    status = 400
    log_word = "bad_host"


class BadRequestBody(GateError):
    # The detail may be the HTTP parser's message, quoting the bytes it choked on.
    status = 400
    log_word = "bad_request_body"
    generic = "invalid request body"


def error_body(status: int, reason: str, matrix: bool) -> tuple[bytes, str]:
    """(body, content type) of an error the gate answers itself."""
    if matrix:
        body = json.dumps({"errcode": ERRCODES.get(status, "M_UNKNOWN"), "error": reason})
        return body.encode(), "application/json"
    return f"{status} {reason}\n".encode(), "text/plain; charset=utf-8"
