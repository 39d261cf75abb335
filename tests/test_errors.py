"""The error tables (palpo_gate/errors.py): one row per failure, local answer
and refusal, each with its status, errcode, close, metric kind and log word."""

from __future__ import annotations

import json

import pytest

from palpo_gate import errors
from palpo_gate.errors import FAILURES, LOCAL_ANSWERS, REFUSALS, GateError, Outcome, refusal
from palpo_gate.metrics import UPSTREAM_ERROR_KINDS
from palpo_gate.routing import Action

#: (class, status, errcode, close, metric kind, log word, client text)
FAILURE_TABLE: list[tuple[type[GateError], int, str, bool, str | None, str, str]] = [
    (errors.UpstreamUnavailable, 502, "M_UNKNOWN", False, "connect_error",
     "upstream_connect_error", "upstream unavailable"),
    (errors.UpstreamConnectTimeout, 504, "M_UNKNOWN", False, "connect_timeout",
     "upstream_connect_timeout", "upstream timed out"),
    (errors.UpstreamTimeout, 504, "M_UNKNOWN", False, "timeout", "upstream_timeout",
     "upstream timed out"),
    (errors.UpstreamBroken, 502, "M_UNKNOWN", False, "broken", "upstream_broken",
     "invalid response from upstream"),
    (errors.BodyTooLarge, 413, "M_TOO_LARGE", True, None, "body_too_large", "detail"),
    (errors.BodyTimeout, 408, "M_UNKNOWN", True, None, "body_timeout", "detail"),
    (errors.ClientTooSlow, 408, "M_UNKNOWN", True, None, "client_timeout", "detail"),
    (errors.BadHost, 400, "M_UNKNOWN", True, None, "bad_host", "detail"),
    (errors.BadRequestBody, 400, "M_UNKNOWN", True, None, "bad_request_body",
     "invalid request body"),
]


@pytest.mark.parametrize(("cls", "status", "errcode", "close", "metric", "word", "public"),
                         FAILURE_TABLE, ids=[r[0].__name__ for r in FAILURE_TABLE])
def test_failure_rows(cls: type[GateError], status: int, errcode: str, close: bool,
                      metric: str | None, word: str, public: str) -> None:
    exc = cls("detail")
    row = FAILURES[cls]
    assert exc.outcome is row
    assert (exc.status, row.errcode, row.close, row.metric, exc.log_word) == (
        status, errcode, close, metric, word)
    assert exc.public == public  # upstream details (addresses, parser text) stay in the log
    assert cls("detail", public="told").public == "told"


def test_every_failure_class_has_a_row() -> None:
    classes = {c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, GateError) and c is not GateError}
    assert classes == set(FAILURES) == {r[0] for r in FAILURE_TABLE}
    kinds = sorted(r.metric for r in FAILURES.values() if r.metric is not None)
    assert kinds == sorted(UPSTREAM_ERROR_KINDS)


def test_every_action_is_answered() -> None:
    # FORWARD, ADMIN (when allowed), HEALTH, the well-known documents and
    # OPTIONS * are the handler's own; every other decision has a row.
    own = {Action.FORWARD, Action.HEALTH, Action.WELL_KNOWN_SERVER, Action.WELL_KNOWN_CLIENT,
           Action.OPTIONS_ASTERISK}
    assert set(LOCAL_ANSWERS) == set(Action) - own


LOCAL_TABLE = [
    (Action.ADMIN, 403, "M_FORBIDDEN", False, True),
    (Action.BAD_REQUEST, 400, "M_UNKNOWN", True, None),
    (Action.METHOD_NOT_ALLOWED, 405, "M_UNRECOGNIZED", False, None),
    (Action.NOT_FOUND, 404, "M_UNRECOGNIZED", False, None),
]


@pytest.mark.parametrize(("action", "status", "errcode", "close", "matrix"), LOCAL_TABLE,
                         ids=[r[0].name for r in LOCAL_TABLE])
def test_local_answer_rows(action: Action, status: int, errcode: str, close: bool,
                           matrix: bool | None) -> None:
    row = LOCAL_ANSWERS[action]
    assert (row.status, row.errcode, row.close, row.matrix) == (status, errcode, close, matrix)
    assert row.word == "" and row.metric is None


#: What the connection handler answers for each refusal before the handler.
REFUSAL_TABLE = [
    ("version_not_supported", 505, "HTTP version not supported", "version_not_supported"),
    ("head_too_large", 431, "request head too large", "head_too_large"),
    ("uri_too_long", 414, "request line too long", "uri_too_long"),
    ("header_too_large", 431, "header field too long", "header_too_large"),
    ("too_many_headers", 431, "too many header fields", "header_too_large"),
    ("http2_preface", 400, "HTTP/2 is not served here", "http2_preface"),
    ("bad_request", 400, "malformed request", "bad_request"),
]


@pytest.mark.parametrize(("kind", "status", "reason", "word"), REFUSAL_TABLE,
                         ids=[r[0] for r in REFUSAL_TABLE])
def test_refusals(kind: str, status: int, reason: str, word: str) -> None:
    assert refusal(kind) == (status, reason, word)
    row = REFUSALS[kind]
    assert row.close and row.matrix  # Matrix JSON, the connection closed


def test_every_refusal_is_in_the_table() -> None:
    assert set(REFUSALS) == {r[0] for r in REFUSAL_TABLE}


def test_errcode_defaults_to_the_status_and_reaches_the_body() -> None:
    assert Outcome(413).errcode == "M_TOO_LARGE"
    assert Outcome(418).errcode == "M_UNKNOWN"
    assert Outcome(400, errcode="M_NOT_JSON").errcode == "M_NOT_JSON"
    body, ctype = errors.error_body(400, "bad", True, "M_NOT_JSON")
    assert ctype == "application/json"
    assert json.loads(body) == {"errcode": "M_NOT_JSON", "error": "bad"}
