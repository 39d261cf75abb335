"""The access log (docs/DESIGN.md section 6): the line formats and redaction as tables,
then the real process: ``python -m palpo_gate`` with a recording upstream,
its stdout read line by line."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import pathlib
import re
import socket
import threading
import time
import types
import urllib.request
from collections.abc import Iterator
from datetime import datetime

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from support.gate import gate_toml, run_gate
from support.net import free_port
from support.pipes import os_pipe
from support.recorder import Recorder, recorder
from test_metrics import parse, values

from palpo_gate import accesslog, logpipe
from palpo_gate.accesslog import AccessLog, escape, escape_bare, redact_target

R = "<redacted>"

# ---------------------------------------------------------------------------
# Redaction

REDACTION = [
    # (target, logged)
    ("/_matrix/client/v3/sync", "/_matrix/client/v3/sync"),
    ("/_matrix/client/v3/sync?since=s1&timeout=0", "/_matrix/client/v3/sync?since=s1&timeout=0"),
    ("/x?access_token=abc", f"/x?access_token={R}"),
    ("/x?a=1&access_token=abc&b=2", f"/x?a=1&access_token={R}&b=2"),
    ("/x?a=1&access_token=abc", f"/x?a=1&access_token={R}"),
    ("/x?access_token=abc&access_token=def", f"/x?access_token={R}&access_token={R}"),
    # Palpo's form-urlencoded parser decodes names: these are tokens too.
    ("/x?%61ccess_token=abc", f"/x?%61ccess_token={R}"),
    ("/x?access%5Ftoken=abc&b=%2F", f"/x?access%5Ftoken={R}&b=%2F"),
    ("/x?%61%63%63%65%73%73%5f%74%6f%6b%65%6e=abc", f"/x?%61%63%63%65%73%73%5f%74%6f%6b%65%6e={R}"),
    # Case-insensitive: over-redacting a log line costs nothing.
    ("/x?ACCESS_TOKEN=abc", f"/x?ACCESS_TOKEN={R}"),
    # The value runs to the next "&" (";" is no separator for Palpo) …
    ("/x?access_token=ab;c=d&e=f", f"/x?access_token={R}&e=f"),
    ("/x?access_token=a=b", f"/x?access_token={R}"),
    ("/x?access_token=abc#frag", f"/x?access_token={R}"),
    ("/x?access_token=a%20b%26c&d", f"/x?access_token={R}&d"),
    # … and every other byte stays as the client sent it.
    ("/_matrix/a%2Fb?q=%22x%22&access_token=t&f=%7B%7D",
     f"/_matrix/a%2Fb?q=%22x%22&access_token={R}&f=%7B%7D"),
    ("/x?&&access_token=abc&", f"/x?&&access_token={R}&"),
    # Not a token parameter.
    ("/x?access_token=", "/x?access_token="),
    ("/x?access_token", "/x?access_token"),
    ("/x?my_access_token=abc", "/x?my_access_token=abc"),
    ("/x?access_tokens=abc", "/x?access_tokens=abc"),
    ("/x?a=access_token=abc", "/x?a=access_token=abc"),
    ("/x?access+token=abc", "/x?access+token=abc"),
    ("/x?%2561ccess_token=abc", "/x?%2561ccess_token=abc"),  # decoded once: "%61ccess_token"
    # The 3PID validation link's secrets (Synapse redacts client_secret too).
    ("/_matrix/client/v3/register/email/submit_token?sid=s1&client_secret=CS&token=T",
     f"/_matrix/client/v3/register/email/submit_token?sid=s1&client_secret={R}&token={R}"),
    ("/x?CLIENT_SECRET=a&Token=b", f"/x?CLIENT_SECRET={R}&Token={R}"),
    ("/x?client%5Fsecret=a", f"/x?client%5Fsecret={R}"),
    ("/x?tok%65n=a", f"/x?tok%65n={R}"),
    ("/x?tokens=a&my_token=b&client_secrets=c", "/x?tokens=a&my_token=b&client_secrets=c"),
    ("/x?sid=1&secret=a", "/x?sid=1&secret=a"),
    ("/x/access_token=abc", "/x/access_token=abc"),  # a path, not a query
    ("/x?q=%2F%2f", "/x?q=%2F%2f"),
]


@pytest.mark.parametrize(("target", "logged"), REDACTION)
def test_redact_target(target: str, logged: str) -> None:
    assert redact_target(target) == logged


def test_redact_unchanged_target_is_the_same_object() -> None:
    target = "/_matrix/client/v3/sync?since=s1&timeout=30000"
    assert redact_target(target) is target


# ---------------------------------------------------------------------------
# Escaping (nginx escape=default)

ESCAPES = [
    # (value, quoted field, unquoted field)
    ("/_matrix/client/v3/sync", "/_matrix/client/v3/sync", "/_matrix/client/v3/sync"),
    ('a"b', "a\\x22b", "a\\x22b"),
    ("a\\b", "a\\x5Cb", "a\\x5Cb"),
    ("a b", "a b", "a\\x20b"),
    ("\x00\t\n\r\x1b\x7f", "\\x00\\x09\\x0A\\x0D\\x1B\\x7F", "\\x00\\x09\\x0A\\x0D\\x1B\\x7F"),
    ("café", "caf\\xC3\\xA9", "caf\\xC3\\xA9"),
    ("caf\udcc3\udca9", "caf\\xC3\\xA9", "caf\\xC3\\xA9"),  # surrogate-escaped raw bytes
    ("|{}^`<>'", "|{}^`<>'", "|{}^`<>'"),
    ("", "", ""),
]


@pytest.mark.parametrize(("value", "quoted", "bare"), ESCAPES)
def test_escape(value: str, quoted: str, bare: str) -> None:
    assert escape(value) == quoted
    assert escape_bare(value) == bare
    for out in (escape(value), escape_bare(value)):
        assert out.isascii() and out.isprintable() and '"' not in out
    assert " " not in escape_bare(value)


# ---------------------------------------------------------------------------
# The formatter

PLAIN = re.compile(
    r'^(?P<client>\S+) - - \[(?P<time>\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4})\] '
    r'"(?P<method>[A-Z]+) (?P<target>[^"]*) (?P<protocol>HTTP/\d\.\d)" '
    r'(?P<status>\d{3}) (?P<bytes_out>\d+) "(?P<referer>[^"]*)" "(?P<user_agent>[^"]*)" '
    r'listener=(?P<listener>\S+) upstream_status=(?P<upstream_status>\d{3}|-) '
    r'bytes_in=(?P<bytes_in>\d+) duration=(?P<duration>\d+\.\d{3}) rid=(?P<rid>\S+)'
    r'(?: error=(?P<error>\S+))?$')
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}$")
JSON_FIELDS = {
    "time": str, "client": str, "listener": str, "method": str, "target": str,
    "protocol": str, "status": int, "upstream_status": (int, type(None)), "bytes_in": int,
    "bytes_out": int, "duration_ms": float, "request_id": str,
    "user_agent": (str, type(None)), "referer": (str, type(None)), "error": (str, type(None)),
}


def unescape(field: str) -> bytes:
    """Undo the plain format's \\xHH escapes."""
    return re.sub(rb"\\x([0-9A-F]{2})", lambda m: bytes([int(m[1], 16)]),
                  field.encode("ascii"))


def record(upstream_status: int = 0, bytes_in: int = 0, bytes_out: int = 0,
           error: str = "") -> types.SimpleNamespace:
    return types.SimpleNamespace(upstream_status=upstream_status, bytes_in=bytes_in,
                                 bytes_out=bytes_out, error=error)


def line(fmt: str, *, method: str = "GET", target: str = "/_matrix/client/versions",
         headers: dict[str, str] | None = None, rec: types.SimpleNamespace | None = None,
         resp: web.StreamResponse | None = None, started: float | None = None,
         listener: str = "client", client: str = "192.0.2.7", rid: bytes = b"rid-1") -> str:
    request = make_mocked_request(method, target, headers=headers or {})
    out = AccessLog(fmt).line(request, listener, client, rec or record(),
                              time.monotonic() if started is None else started, rid, resp)
    assert out.endswith("\n") and out.count("\n") == 1
    return out[:-1]


def test_json_line_fields_and_types() -> None:
    rec = record(upstream_status=200, bytes_in=12, bytes_out=345)
    out = line("json", method="PUT", target="/_matrix/client/v3/x?access_token=s3cret&a=%2F",
               headers={"User-Agent": 'ua "quoted"', "Referer": "https://c.example/?access_token=t"},
               rec=rec, resp=web.Response(status=200), started=time.monotonic() - 0.25)
    doc = json.loads(out)
    assert set(doc) == set(JSON_FIELDS)
    for key, typ in JSON_FIELDS.items():
        assert isinstance(doc[key], typ), key
    assert RFC3339.match(doc["time"])
    assert doc == {**doc, "client": "192.0.2.7", "listener": "client", "method": "PUT",
                   "target": f"/_matrix/client/v3/x?access_token={R}&a=%2F",
                   "protocol": "HTTP/1.1", "status": 200, "upstream_status": 200,
                   "bytes_in": 12, "bytes_out": 345, "request_id": "rid-1",
                   "user_agent": 'ua "quoted"', "referer": f"https://c.example/?access_token={R}",
                   "error": None}
    assert 250 <= doc["duration_ms"] < 5000
    assert "s3cret" not in out


def test_json_local_answer_has_null_upstream_and_the_body_length() -> None:
    resp = web.Response(status=404, body=b'{"errcode":"M_UNRECOGNIZED"}')
    doc = json.loads(line("json", target="/nope", resp=resp))
    assert doc["status"] == 404
    assert doc["upstream_status"] is None
    assert doc["bytes_out"] == len(resp.body)  # type: ignore[arg-type]
    assert doc["user_agent"] is None and doc["referer"] is None and doc["error"] is None
    # HEAD: the body is not sent.
    assert json.loads(line("json", method="HEAD", target="/nope", resp=resp))["bytes_out"] == 0


@pytest.mark.parametrize("fmt", ["json", "plain"])
def test_client_gone_is_499(fmt: str) -> None:
    rec = record(upstream_status=200, bytes_out=10, error="client_gone")
    out = line(fmt, rec=rec, resp=None)
    if fmt == "json":
        doc = json.loads(out)
        assert (doc["status"], doc["bytes_out"], doc["error"]) == (499, 10, "client_gone")
    else:
        m = PLAIN.match(out)
        assert m is not None, out
        assert (m["status"], m["bytes_out"], m["error"]) == ("499", "10", "client_gone")


def test_plain_line_is_combined_format_plus_fields() -> None:
    rec = record(upstream_status=502, bytes_in=3, bytes_out=7, error="upstream_refused")
    out = line("plain", method="POST", target="/_matrix/client/v3/login",
               headers={"User-Agent": "Element/1.11"}, rec=rec, resp=web.Response(status=502),
               listener="client", client="2001:db8::1", rid=b"abc.def")
    m = PLAIN.match(out)
    assert m is not None, out
    assert m.groupdict() == {
        **m.groupdict(), "client": "2001:db8::1", "method": "POST",
        "target": "/_matrix/client/v3/login", "protocol": "HTTP/1.1", "status": "502",
        "bytes_out": "7", "referer": "-", "user_agent": "Element/1.11", "listener": "client",
        "upstream_status": "502", "bytes_in": "3", "rid": "abc.def", "error": "upstream_refused"}
    assert time.strptime(m["time"], "%d/%b/%Y:%H:%M:%S %z")


def test_plain_escapes_every_field_a_client_or_operator_controls() -> None:
    target = '/_matrix/x?q="a\\b"&access_token=TOKVAL&r=\x7f'
    out = line("plain", target=target,
               headers={"User-Agent": 'evil" "x\tz', "Referer": 'r"\\'},
               listener='two words"', client="unix:", resp=web.Response(status=404))
    m = PLAIN.match(out)
    assert m is not None, out
    assert unescape(m["target"]) == target.replace("TOKVAL", R).encode()
    assert unescape(m["user_agent"]) == b'evil" "x\tz'
    assert unescape(m["referer"]) == b'r"\\'
    assert unescape(m["listener"]) == b'two words"'
    assert out.isascii() and out.isprintable()
    # Splitting on quotes gives the combined format's fields.
    assert out.count('"') == 6


#: Values that need escaping in a quoted field, an unquoted one, or both, and
#: ones that need none (the line is then written without escaping).
TRICKY = [*(v for v, _, _ in ESCAPES), " ", "-", "a\x7fb", "\u2028", "x\udcff", '"',
          "\\", "/x?access_token=s3cret&b=%22", "/x?%61ccess_token=a%20b&token=t\x01",
          "/_matrix/client/v3/sync?since=s1", "https://c.example/?client_secret=x y"]
PLAIN_FIELDS = ("method", "target", "agent", "referer", "client", "rid", "error")


@pytest.mark.parametrize("field", PLAIN_FIELDS)
def test_plain_line_without_escaping_is_the_escaped_line(field: str) -> None:
    # A line is written without escaping only when escaping would change
    # nothing: for each field and each value, the line equals the one made
    # by escaping every field.
    log = AccessLog("plain")
    log._clock._set(1_700_000_000)
    names = ("client", '"client"')
    for value in TRICKY:
        values = {"method": "GET", "target": "/_matrix/client/versions", "agent": None,
                  "referer": None, "client": "192.0.2.7", "rid": "rid-1", "error": "",
                  field: value}
        request = types.SimpleNamespace(method=values["method"], raw_path=values["target"],
                                        version=(1, 1))
        rec = record(upstream_status=200, bytes_in=3, bytes_out=9, error=values["error"])
        args = (request, names, values["client"], rec, 200, 9, 12.3456, values["rid"],
                values["agent"], values["referer"])
        out = log._plain(*args)
        assert out == log._plain_escaped(*args), (field, value)
        assert out.isascii() and out[:-1].isprintable() and out.count('"') == 6, (field, value)
        if field in ("target", "referer"):  # the fields that are redacted
            assert "s3cret" not in out


def test_upstream_status_absent_in_plain_is_dash() -> None:
    m = PLAIN.match(line("plain", target="/nope", resp=web.Response(status=404, body=b"x")))
    assert m is not None
    assert (m["upstream_status"], m["bytes_out"], m["error"]) == ("-", "1", None)


def test_timestamps_are_formatted_once_a_second() -> None:
    clock = accesslog._Clock()
    second = 1_700_000_000
    clock._set(second)
    local = datetime.fromtimestamp(second).astimezone()
    assert json.loads(clock.iso_json) == local.isoformat()
    assert clock.plain == local.strftime("%d/%b/%Y:%H:%M:%S %z")
    clock.tick()
    first, second = clock.plain, clock._second
    clock.tick()
    if clock._second == second:  # within the same second: not formatted again
        assert clock.plain is first


def test_write_goes_to_the_descriptor_one_line_each() -> None:
    with os_pipe() as (r, w):
        log = AccessLog("json", logpipe.LogPipe(w, "stdout"))
        request = make_mocked_request("GET", "/a")
        for _ in range(3):
            log.write(request, "client", "127.0.0.1", record(), time.monotonic(), b"r",
                      web.Response(status=404))
        lines = os.read(r, 65536).decode("utf-8").splitlines()
    assert len(lines) == 3 and all(json.loads(x)["target"] == "/a" for x in lines)


def test_a_broken_stdout_disables_the_log_without_failing_the_request() -> None:
    with os_pipe() as (r, w):
        os.close(r)  # the reader is gone: EPIPE
        log = AccessLog("plain", logpipe.LogPipe(w, "stdout"))
        log.write(make_mocked_request("GET", "/a"), "client", "127.0.0.1", record(),
                  time.monotonic(), b"r", None)
    assert log.enabled is False


def test_no_stdout_at_all_disables_the_log() -> None:
    with os_pipe() as (_, w):
        pass  # both closed: as a gate started with stdout closed
    log = AccessLog("json", logpipe.LogPipe(w, "stdout"))
    log.write(make_mocked_request("GET", "/a"), "client", "127.0.0.1", record(),
              time.monotonic(), b"r", None)
    assert log.enabled is False


# Bytes that are not UTF-8: raw 0xFF, a lone lead byte, a lone continuation byte.
_BAD_UTF8 = b"caf\xc3 \xff\x80 ok \xc3\xa9"


def test_json_lines_are_valid_unicode_whatever_the_bytes() -> None:
    """Header values carry bytes that are not UTF-8 (obs-text) as lone
    surrogates; the JSON line escapes them as the text \\xHH instead, so a
    strict reader (UTF-8 decoding, no lone surrogates) takes every line."""
    text = _BAD_UTF8.decode("utf-8", "surrogateescape")
    with os_pipe() as (r, w):
        log = AccessLog("json", logpipe.LogPipe(w, "stdout"))
        # As aiohttp's C parser hands them over (make_mocked_request cannot).
        headers = {"User-Agent": text, "Referer": "https://r/" + text}
        log.write(accesslog.RefusedRequest("GET", "/a", (1, 1), headers),
                  "client", "127.0.0.1", record(), time.monotonic(), b"r", web.Response())
        log.write(accesslog.RefusedRequest.from_line(b"G\xffT /p\xfe?access_token=s HTTP/1.1"),
                  "client", "127.0.0.1", record(), time.monotonic(), b"r", web.Response())
        raw = os.read(r, 65536)
    lines = raw.decode("utf-8").splitlines()  # strict
    assert len(lines) == 2
    first, second = (json.loads(x) for x in lines)
    want = "caf\\xC3 \\xFF\\x80 ok \u00e9"  # valid UTF-8 stays a character
    assert first["user_agent"] == want
    assert first["referer"] == "https://r/" + want
    assert (second["method"], second["target"]) == ("G\\xFFT", f"/p\\xFE?access_token={R}")
    for doc in (first, second):
        # No lone surrogate anywhere: every value encodes as UTF-8.
        json.dumps(doc, ensure_ascii=False).encode("utf-8")


REFUSED_LINES = [
    # (raw start of the head, method, target, protocol)
    (None, "-", "-", "-"),
    (b"", "-", "-", "-"),
    (b"GET /x?access_token=t HTTP/1.1\r\nHost: a\r\n\r\n", "GET",
     f"/x?access_token={R}", "HTTP/1.1"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "PRI", "*", "HTTP/2.0"),
    (b"GET /" + b"a" * 3000, "GET", "/" + "a" * 1023 + "...", "-"),  # 414: cut, no protocol
    (b"GET /x HTTP/1.1 extra\r\n", "GET", "/x", "-"),
    (b"\x16\x03\x01\x00\xa5\x01", "\\x16\\x03\\x01\\x00\\xA5\\x01", "-", "-"),  # TLS
]


@pytest.mark.parametrize(("raw", "method", "target", "protocol"), REFUSED_LINES)
def test_refused_request_line(raw: bytes | None, method: str, target: str,
                              protocol: str) -> None:
    request = accesslog.RefusedRequest.from_line(raw)
    out = AccessLog("plain").line(request, "client", "192.0.2.7",
                                  record(error="bad_request"), time.monotonic(), b"r",
                                  web.Response(status=400, body=b"{}"))
    assert f'"{method} {target} {protocol}" 400 2 "-" "-" listener=client' in out, out
    assert out.endswith(" error=bad_request\n")


def test_formats() -> None:
    assert AccessLog("off").enabled is False
    assert AccessLog("json").enabled and AccessLog("plain").enabled
    with pytest.raises(ValueError):
        AccessLog("combined")


# ---------------------------------------------------------------------------
# The real process


@contextlib.contextmanager
def threaded_recorder() -> Iterator[Recorder]:
    """The asyncio recording upstream, on its own loop in a thread (the gate
    under test is another process, so the test itself stays synchronous)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Recorder] = {}
    stop = asyncio.Event()

    async def main() -> None:
        async with recorder() as rec:
            box["rec"] = rec
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(10), "recorder did not start"
        yield box["rec"]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def gate_config(upstream_port: int, port: int, access: str) -> str:
    return gate_toml(f"http://127.0.0.1:{upstream_port}", bind=f"127.0.0.1:{port}",
                     access=access, log='level = "info"')


def fetch(conn: http.client.HTTPConnection, method: str, target: str,
          body: bytes | None = None, headers: dict[str, str] | None = None
          ) -> tuple[int, bytes, str]:
    """status, body, X-Request-ID of one exchange on a keep-alive connection."""
    conn.request(method, target, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, data, resp.getheader("X-Request-ID") or ""


def wait_lines(lines: list[str], n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(lines) < n and time.monotonic() < deadline:
        time.sleep(0.02)


FORWARDED = ('/_matrix/client/v3/rooms/%21r%3Aexample.org/send/m.room.message/t1'
             '?access_token=SECRET%2Btoken&ts=%2F"x"')
NOT_FOUND = "/nowhere/a%2Fb%2e/%7E?q=1"
ADMIN = "/_palpo/admin/users?access_token=ADMINSECRET"


def test_json_lines_from_the_real_process(tmp_path: pathlib.Path) -> None:
    port = free_port()
    body = b'{"msgtype":"m.text","body":"hello"}'
    with threaded_recorder() as upstream, \
            run_gate(gate_config(upstream.port, port, "json"), tmp_path) as gp:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        answers = [
            fetch(conn, "PUT", FORWARDED, body,
                  {"User-Agent": "test-agent/1.0", "X-Request-ID": "client-chosen-id",
                   "Content-Type": "application/json"}),
            fetch(conn, "GET", "/health"),
            fetch(conn, "GET", NOT_FOUND),
            fetch(conn, "GET", ADMIN),
        ]
        conn.close()
        wait_lines(gp.stdout_lines, 3)
        received = [r.target for r in upstream.requests]
    # The gate has stopped: its stdout is complete.
    assert [a[0] for a in answers] == [200, 200, 404, 403]
    assert received == [FORWARDED.encode()]  # the real token went upstream
    assert len(gp.stdout_lines) == 3, gp.stdout_lines  # /health is not logged
    docs = [json.loads(x) for x in gp.stdout_lines]
    for doc in docs:
        assert set(doc) == set(JSON_FIELDS)
        for key, typ in JSON_FIELDS.items():
            assert isinstance(doc[key], typ), (key, doc)
        assert RFC3339.match(doc["time"])
        assert (doc["client"], doc["listener"], doc["protocol"]) == (
            "127.0.0.1", "main", "HTTP/1.1")
        assert doc["duration_ms"] >= 0
        assert doc["error"] is None and doc["referer"] is None
    fwd, nf, adm = docs
    (_, fwd_body, fwd_rid), _, (_, nf_body, nf_rid), (_, adm_body, adm_rid) = answers
    assert fwd == {**fwd, "method": "PUT", "status": 200, "upstream_status": 200,
                   "target": FORWARDED.replace("SECRET%2Btoken", R),
                   "bytes_in": len(body), "bytes_out": len(fwd_body),
                   "request_id": "client-chosen-id", "user_agent": "test-agent/1.0"}
    assert fwd_rid == "client-chosen-id"
    assert nf == {**nf, "method": "GET", "status": 404, "upstream_status": None,
                  "target": NOT_FOUND, "bytes_in": 0, "bytes_out": len(nf_body),
                  "request_id": nf_rid, "user_agent": None}
    assert adm == {**adm, "method": "GET", "status": 403, "upstream_status": None,
                   "target": f"/_palpo/admin/users?access_token={R}", "bytes_in": 0,
                   "bytes_out": len(adm_body), "request_id": adm_rid}
    assert nf_rid and adm_rid and nf_rid != adm_rid
    text = "".join(gp.stdout_lines)
    assert "SECRET" not in text and "ADMINSECRET" not in text


def test_plain_lines_from_the_real_process(tmp_path: pathlib.Path) -> None:
    port = free_port()
    target = '/_matrix/client/versions?q="a\\b"&access_token=TOKVAL'
    with threaded_recorder() as upstream, \
            run_gate(gate_config(upstream.port, port, "plain"), tmp_path) as gp:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        status, data, rid = fetch(conn, "GET", target, headers={"User-Agent": 'a "b" \\c'})
        fetch(conn, "GET", "/health")
        conn.close()
        wait_lines(gp.stdout_lines, 1)
        received = [r.target for r in upstream.requests]
    assert status == 200 and received == [target.encode()]
    assert len(gp.stdout_lines) == 1, gp.stdout_lines
    m = PLAIN.match(gp.stdout_lines[0].rstrip("\n"))
    assert m is not None, gp.stdout_lines[0]
    assert unescape(m["target"]) == target.replace("TOKVAL", R).encode()
    assert unescape(m["user_agent"]) == b'a "b" \\c'
    assert (m["client"], m["method"], m["status"], m["upstream_status"], m["listener"],
            m["rid"], m["bytes_out"], m["bytes_in"]) == (
        "127.0.0.1", "GET", "200", "200", "main", rid, str(len(data)), "0")


def test_off_writes_nothing(tmp_path: pathlib.Path) -> None:
    port = free_port()
    with threaded_recorder() as upstream, \
            run_gate(gate_config(upstream.port, port, "off"), tmp_path) as gp:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        assert fetch(conn, "GET", "/_matrix/client/versions")[0] == 200
        assert fetch(conn, "GET", "/nowhere")[0] == 404
        conn.close()
        assert len(upstream.requests) == 1
    assert gp.stdout_lines == []


# ---------------------------------------------------------------------------
# Requests refused before they were parsed whole (the real process)


def raw_exchange(port: int, *requests: bytes) -> list[bytes]:
    """Send each request on one connection after the answer to the one before;
    the raw answers (the last one read until the gate closes)."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for i, req in enumerate(requests):
            s.sendall(req)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
                if i < len(requests) - 1 and b"\r\n\r\n" in data:
                    break  # /health: a short answer, the connection stays open
            answers.append(data)
    return answers


def metric_values(port: int, name: str) -> dict[tuple[str, ...], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return values(parse(r.read()), name)


REFUSED = [
    # (name, requests on one connection, status, error word, method, target, protocol)
    ("malformed", [b"GET /_matrix/client/v3/sync?access_token=SECRET1 HTTP/1.1\r\n"
                   b"Host: a\r\nBad Header: y\r\n\r\n"],
     400, "bad_request", "GET", f"/_matrix/client/v3/sync?access_token={R}", "HTTP/1.1"),
    ("malformed after /health", [b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n",
                                 b"POST /_matrix/x?client_secret=SECRET2&token=SECRET3 "
                                 b"HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n"],
     400, "bad_request", "POST", f"/_matrix/x?client_secret={R}&token={R}", "HTTP/1.1"),
    ("414", [b"GET /_matrix/" + b"a" * 9000 + b"?access_token=SECRET4 HTTP/1.1\r\n\r\n"],
     414, "uri_too_long", "GET", "/_matrix/" + "a" * 1015 + "...", "-"),
    ("431 field", [b"GET /_matrix/y HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n"],
     431, "header_too_large", "GET", "/_matrix/y", "HTTP/1.1"),
    ("431 head", [b"GET /_matrix/z?access_token=SECRET5 HTTP/1.1\r\nHost: a\r\n"
                  b"User-Agent: big-head/1\r\n"
                  + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 8000) for i in range(8)) + b"\r\n"],
     431, "head_too_large", "GET", f"/_matrix/z?access_token={R}", "HTTP/1.1"),
    ("505", [b"GET /_matrix/client/versions HTTP/2.0\r\nHost: a\r\n\r\n"],
     505, "version_not_supported", "GET", "/_matrix/client/versions", "HTTP/2.0"),
    ("h2 preface", [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"],
     400, "http2_preface", "PRI", "*", "HTTP/2.0"),
]


def test_refused_requests_get_an_access_line_and_a_count(tmp_path: pathlib.Path) -> None:
    """400 / 414 / 431 / 505 and the HTTP/2 preface: each gets a Matrix JSON
    answer, an access line (as much of the request as was read, redacted) and
    its count under route="bad_request". At level debug the refusal is
    logged, redacted too: never the raw request line with its token."""
    port, metrics_port = free_port(), free_port()
    toml = gate_config(9, port, "json").replace('level = "info"', 'level = "debug"') + (
        f'[metrics]\nbind = "127.0.0.1:{metrics_port}"\n')
    with run_gate(toml, tmp_path) as gp:
        answers = {name: raw_exchange(port, *reqs)[-1] for name, reqs, *_ in REFUSED}
        wait_lines(gp.stdout_lines, len(REFUSED))
        counts = metric_values(metrics_port, "palpo_gate_requests_total")
    lines = [json.loads(x) for x in gp.stdout_lines]
    assert len(lines) == len(REFUSED), gp.stdout_lines
    for (name, _, status, word, method, target, protocol), doc in zip(REFUSED, lines,
                                                                      strict=True):
        answer = answers[name]
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] == str(status).encode(), (name, answer[:200])
        assert json.loads(body)["errcode"] == "M_UNKNOWN"
        assert b"\r\nAccess-Control-Allow-Origin: *\r\n" in head
        rid = re.search(rb"\r\nX-Request-ID: (\S+)\r\n", head)
        assert rid is not None and doc["request_id"] == rid[1].decode()
        assert (doc["status"], doc["error"], doc["method"], doc["target"], doc["protocol"]) == (
            status, word, method, target, protocol), name
        assert (doc["client"], doc["listener"], doc["upstream_status"], doc["bytes_out"]) == (
            "127.0.0.1", "main", None, len(body))
    assert lines[4]["user_agent"] == "big-head/1"  # parsed whole, then refused
    assert {k: v for k, v in counts.items() if k[1] == "bad_request"} == {
        ("main", "bad_request", "400"): 3, ("main", "bad_request", "414"): 1,
        ("main", "bad_request", "431"): 2, ("main", "bad_request", "505"): 1}
    debug = [x for x in gp.stderr_lines if "refused a request" in x]
    assert len(debug) == len(REFUSED)
    assert "GET /_matrix/client/v3/sync?access_token=<redacted>" in debug[0]
    for text in ("".join(gp.stdout_lines), "".join(gp.stderr_lines)):
        assert "SECRET" not in text


def test_json_lines_of_the_real_process_are_valid_unicode(tmp_path: pathlib.Path) -> None:
    port = free_port()
    with run_gate(gate_config(9, port, "json"), tmp_path) as gp:
        [answer] = raw_exchange(port, b"GET /nowhere HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
                                      b"User-Agent: caf\xc3 \xff\xc3\xa9\r\n"
                                      b"Referer: https://r.example/\xfe\r\n\r\n")
        wait_lines(gp.stdout_lines, 1)
    assert answer.startswith(b"HTTP/1.1 404 ")
    [doc] = [json.loads(x.encode("utf-8").decode("utf-8")) for x in gp.stdout_lines]
    assert doc["user_agent"] == "caf\\xC3 \\xFF\u00e9"
    assert doc["referer"] == "https://r.example/\\xFE"
    json.dumps(doc, ensure_ascii=False).encode("utf-8")  # no lone surrogate
