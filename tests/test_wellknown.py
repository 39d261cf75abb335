"""Delegation documents and CORS (docs/DESIGN.md section 4) and the error funnel's bodies
(docs/DESIGN.md section 5), as tables: no sockets."""

from __future__ import annotations

import json

import pytest

from palpo_gate import errors, wellknown
from palpo_gate.config import ConfigError, WellKnown, loads

SERVER = "matrix.example.com:443"
BASE = "https://matrix.example.com"
IDENTITY = "https://identity.example.com"

BUILD_TABLE: list[tuple[str, WellKnown, object, object]] = [
    # (id, [well_known], server document, client document); None: not configured
    (
        "server only",
        WellKnown(server=SERVER, client=""),
        {"m.server": SERVER},
        None,
    ),
    (
        "client only",
        WellKnown(server="", client=BASE),
        None,
        {"m.homeserver": {"base_url": BASE}},
    ),
    (
        "both, as in the Matrix spec's recommended values",
        WellKnown(server=SERVER, client=BASE, identity_server=IDENTITY),
        {"m.server": SERVER},
        {"m.homeserver": {"base_url": BASE}, "m.identity_server": {"base_url": IDENTITY}},
    ),
    (
        "client_extra merged into the client document",
        WellKnown(server=SERVER, client=BASE, client_extra={
            "io.element.e2ee": {"default": False, "secure_backup_required": True},
            "org.matrix.msc3575.proxy": {"url": "https://sliding.example.com"},
            "org.example.list": [1, 2.5, "x"],
        }),
        {"m.server": SERVER},
        {"m.homeserver": {"base_url": BASE},
         "io.element.e2ee": {"default": False, "secure_backup_required": True},
         "org.matrix.msc3575.proxy": {"url": "https://sliding.example.com"},
         "org.example.list": [1, 2.5, "x"]},
    ),
    (
        "identity server and extra together",
        WellKnown(server="", client=BASE, identity_server=IDENTITY,
                  client_extra={"org.example.motd": "Grüße \"aus\" Köln"}),
        None,
        {"m.homeserver": {"base_url": BASE}, "m.identity_server": {"base_url": IDENTITY},
         "org.example.motd": "Grüße \"aus\" Köln"},
    ),
]


@pytest.mark.parametrize(("wk", "server", "client"), [r[1:] for r in BUILD_TABLE],
                         ids=[r[0] for r in BUILD_TABLE])
def test_build(wk: WellKnown, server: object, client: object) -> None:
    docs = wellknown.build(wk)
    for got, expected in ((docs.server, server), (docs.client, client)):
        if expected is None:
            assert got is None
        else:
            assert isinstance(got, bytes)
            assert json.loads(got.decode("utf-8")) == expected


def test_documents_from_the_config_file() -> None:
    cfg = loads(f"""
[well_known]
server = "{SERVER}"
client = "{BASE}"
identity_server = "{IDENTITY}"
[well_known.client_extra]
"io.element.e2ee" = {{ default = false }}
""")
    assert cfg.well_known is not None
    docs = wellknown.build(cfg.well_known)
    assert docs.server is not None and docs.client is not None
    assert json.loads(docs.server) == {"m.server": SERVER}
    assert json.loads(docs.client) == {
        "m.homeserver": {"base_url": BASE}, "m.identity_server": {"base_url": IDENTITY},
        "io.element.e2ee": {"default": False}}


def test_every_client_extra_the_config_accepts_can_be_served() -> None:
    # TOML has date/time values, JSON has not. A config that loads must build its
    # documents; otherwise the error belongs in ConfigError, with its key path.
    text = f"""
[well_known]
client = "{BASE}"
[well_known.client_extra]
"org.example.since" = 2024-05-27
"""
    try:
        cfg = loads(text)
    except ConfigError as exc:
        assert any(e.startswith("well_known.client_extra") for e in exc.errors), exc.errors
        return
    assert cfg.well_known is not None
    docs = wellknown.build(cfg.well_known)
    assert docs.client is not None
    json.loads(docs.client)


def test_cors_headers_are_the_recommended_ones() -> None:
    # docs/DESIGN.md section 4: the CORS headers of the Matrix spec's recommended values.
    assert dict(wellknown.CORS_HEADERS) == {
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
        "Access-Control-Allow-Headers":
            "Origin, X-Requested-With, Content-Type, Accept, Authorization",
    }
    assert len(wellknown.CORS_HEADERS) == 3


# -- error bodies ------------------------------------------------------------------------

MATRIX_ERRORS = [
    (502, "upstream unavailable", "M_UNKNOWN"),
    (504, "upstream timed out", "M_UNKNOWN"),
    (403, "the admin API is not reachable from here", "M_FORBIDDEN"),
    (413, "request body larger than 52428800 bytes", "M_TOO_LARGE"),
    (404, "no such endpoint", "M_UNRECOGNIZED"),
    (405, "CONNECT is not supported", "M_UNRECOGNIZED"),
    (400, "dot segment in path", "M_UNKNOWN"),
    (421, "misdirected request", "M_UNKNOWN"),
    (418, "a status without its own code", "M_UNKNOWN"),
    (502, 'quotes " and \\ and non-ASCII: Grüße', "M_UNKNOWN"),
]


@pytest.mark.parametrize(("status", "reason", "errcode"), MATRIX_ERRORS,
                         ids=[f"{s}-{c}" for s, _, c in MATRIX_ERRORS])
def test_error_body_on_matrix_paths(status: int, reason: str, errcode: str) -> None:
    body, content_type = errors.error_body(status, reason, matrix=True)
    assert content_type == "application/json"
    assert json.loads(body.decode("utf-8")) == {"errcode": errcode, "error": reason}


PLAIN_ERRORS = [
    (502, "upstream unavailable", b"502 upstream unavailable\n"),
    (404, "not found", b"404 not found\n"),
    (400, "asterisk-form target", b"400 asterisk-form target\n"),
    (413, "größer", "413 größer\n".encode()),
]


@pytest.mark.parametrize(("status", "reason", "expected"), PLAIN_ERRORS,
                         ids=[str(s) for s, _, _ in PLAIN_ERRORS])
def test_error_body_elsewhere(status: int, reason: str, expected: bytes) -> None:
    body, content_type = errors.error_body(status, reason, matrix=False)
    assert content_type == "text/plain; charset=utf-8"
    assert body == expected


GATE_ERRORS = [
    (errors.UpstreamUnavailable, 502),  # refused / unreachable
    (errors.UpstreamConnectTimeout, 504),
    (errors.UpstreamTimeout, 504),  # too slow
    (errors.UpstreamBroken, 502),
    (errors.BodyTooLarge, 413),
    (errors.BadRequestBody, 400),
]


@pytest.mark.parametrize(("cls", "status"), GATE_ERRORS, ids=[c.__name__ for c, _ in GATE_ERRORS])
def test_gate_error_statuses(cls: type[errors.GateError], status: int) -> None:
    exc = cls("why")
    assert isinstance(exc, errors.GateError)
    assert exc.status == status
    assert exc.reason == "why"
    assert exc.log_word and " " not in exc.log_word
