"""The access log: one line per request, plain or JSON (docs/DESIGN.md section 6).

This module owns the line formats, the redaction of credentials in logged
targets and the escaping that keeps every line splittable. It is the one
place where client addresses are written down (Palpo sees the gate's
address). It must not change what is forwarded: redaction works on a copy
of the target made for the log line only. ``/health`` is never logged: the
handler returns before a record is made.

Fields, in both formats: the time the line is written (local time, with its
UTC offset), the client address ("unix:" on a UNIX socket), the listener
name, method, raw target, protocol, status (499 when the client went away
before an answer), upstream status (none for an answer of the gate's own),
request body bytes read, response body bytes sent (like nginx's
``$body_bytes_sent``), duration, request id, User-Agent, Referer, and the
error word of a failed request.

``plain`` is nginx's ``combined`` format followed by ``key=value`` fields, so
tools that read combined logs read its first part (one line, wrapped here)::

    127.0.0.1 - - [01/May/2024:12:00:00 +0000] "GET /_matrix/client/versions HTTP/1.1"
    200 52 "-" "curl/8.5" listener=client upstream_status=200 bytes_in=0
    duration=0.003 rid=5f0c… [error=WORD]

``duration`` is in seconds, as nginx's ``$request_time``; JSON has
``duration_ms``. Escaping follows nginx's ``escape=default``: ``"``, ``\\``
and every byte below 0x20 or above 0x7E become ``\\xHH`` in the quoted
fields; the unquoted fields also escape the space. A line never holds a raw quote,
control character or newline, so it can always be split.

``json`` writes one object per line; strings are escaped by the JSON rules
with non-ASCII as ``\\uXXXX``; absent values are ``null``. Bytes of the
target, User-Agent or Referer that are not UTF-8 become the text ``\\xHH``
(as in ``plain``), so every line is valid Unicode for a strict JSON reader
(a lone surrogate ``\\udcXX`` is not).

A request the gate refused before it was parsed whole (400 malformed, 414,
431, 505, the HTTP/2 preface) gets a line too: method, target and protocol
as far as they were read, else ``-``; no upstream status.

Redaction: in the query (everything after the first ``?``) of the target and
of the Referer, each ``&``-separated parameter named in
:data:`SECRET_PARAMS` has its value replaced by ``<redacted>``: the Matrix
client API accepts ``?access_token=`` as a credential (client-server API
"Using access tokens"); ``client_secret=`` and ``token=`` are what the
3PID validation links (``.../submit_token?sid=&client_secret=&token=``)
carry. Synapse redacts ``access_token`` and ``client_secret``
(``synapse/http/__init__.py``, ``redact_uri``). The
name is compared after percent-decoding (once) and ASCII lower-casing: a
form-urlencoded query parser, as Palpo's web framework uses, decodes names,
so ``%61ccess_token=`` is a token too, and an over-redacted log line costs
nothing. ``;`` is not a separator (form-urlencoded splits on ``&`` only), so
a value runs to the next ``&``: splitting on ``;`` would leave the part of a
token after a ``;`` in the log. An empty value stays empty. Everything else
in the target stays byte for byte as the client sent it.

Cost: the timestamps are formatted once a second, listener names once, a
target with neither ``%`` nor a secret name in its query is not split, and a
plain line is checked for what needs escaping once over all its fields (a
line with nothing to escape, nearly every one, escapes no field); a
line is one non-blocking ``write(2)`` on stdout through :mod:`logpipe`,
which stays whole when several workers share the stream (up to PIPE_BUF
bytes) and never holds the event loop when nothing reads stdout.
"""

from __future__ import annotations

import codecs
import logging
import re
import time
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any
from urllib.parse import unquote_to_bytes

from . import logpipe

log = logging.getLogger("palpo_gate")

FORMATS = ("plain", "json", "off")

#: What a redacted value reads as.
REDACTED = "<redacted>"
#: Query parameters whose values never reach the log (decoded, lower-case).
SECRET_PARAMS = frozenset({b"access_token", b"client_secret", b"token"})
#: Substrings one of which every secret name contains ("token" covers
#: "access_token"): a query with none of them is not split.
_SECRET_HINTS = ("token", "client_secret")

# nginx escape=default: '"', '\' and bytes outside 0x20..0x7E become \xHH.
_QUOTED = tuple(
    chr(b) if 0x20 <= b <= 0x7E and b not in (0x22, 0x5C) else f"\\x{b:02X}"
    for b in range(256))
# Unquoted fields end at a space, so the space is escaped too.
_BARE = tuple("\\x20" if b == 0x20 else s for b, s in enumerate(_QUOTED))

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

#: None: the protocol of a refused request that was not read.
_PROTOCOLS: dict[Any, str] = {(1, 1): "HTTP/1.1", (1, 0): "HTTP/1.0", (0, 9): "HTTP/0.9",
                              None: "-"}

#: The longest target a refused request's line shows (a 414 may be 8 KiB
#: or more); what is cut is marked with "...".
REFUSED_TARGET_MAX = 1024
_METHOD_MAX = 32
_VERSION_RE = re.compile(rb"HTTP/(\d)\.(\d)")

_JSON_LINE = (
    '{"time":%s,"client":%s,"listener":%s,"method":%s,"target":%s,"protocol":%s,'
    '"status":%d,"upstream_status":%s,"bytes_in":%d,"bytes_out":%d,"duration_ms":%.3f,'
    '"request_id":%s,"user_agent":%s,"referer":%s,"error":%s}\n')


# --------------------------------------------------------------------------
# Pure helpers: redaction and escaping


def _param_name(name: str) -> bytes:
    """A query parameter name as a form-urlencoded parser reads it, lower-cased."""
    if "%" in name or "+" in name:
        return unquote_to_bytes(name.replace("+", " ")).lower()
    return name.lower().encode("utf-8", "surrogateescape")


def redact_target(target: str) -> str:
    """*target* with the value of every secret query parameter replaced by
    ``<redacted>``; everything else unchanged (see the module docstring)."""
    q = target.find("?")
    if q < 0:
        return target
    query = target[q + 1:]
    if "%" not in query:
        # No escapes: a secret name must appear as it is (cheaper than a regex).
        lowered = query.lower()
        for name in _SECRET_HINTS:
            if name in lowered:
                break
        else:
            return target
    params = query.split("&")
    changed = False
    for i, param in enumerate(params):
        name, eq, value = param.partition("=")
        if eq and value and _param_name(name) in SECRET_PARAMS:
            params[i] = name + "=" + REDACTED
            changed = True
    return target[: q + 1] + "&".join(params) if changed else target


def _bytes_of(value: str) -> bytes:
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no byte stands for
        return value.encode("utf-8", "backslashreplace")


def _hex_escape(exc: UnicodeError) -> tuple[str, int]:
    assert isinstance(exc, UnicodeDecodeError)
    bad = exc.object[exc.start:exc.end]
    return "".join([f"\\x{b:02X}" for b in bad]), exc.end


codecs.register_error("palpo_gate.hex", _hex_escape)


def json_text(value: str) -> str:
    """*value* as a JSON string that is valid Unicode: a byte that is not part
    of valid UTF-8 (carried as a lone surrogate by ``surrogateescape``)
    becomes the text ``\\xHH``, never ``\\udcXX``."""
    if value.isascii():
        return _json_str(value)
    return _json_str(_bytes_of(value).decode("utf-8", "palpo_gate.hex"))


def escape(value: str) -> str:
    """*value* safe inside a double-quoted field of a plain line."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return value
    return "".join([_QUOTED[b] for b in _bytes_of(value)])


def escape_bare(value: str) -> str:
    """*value* safe as an unquoted, space-separated field of a plain line."""
    if (value.isascii() and value.isprintable() and " " not in value
            and '"' not in value and "\\" not in value):
        return value
    return "".join([_BARE[b] for b in _bytes_of(value)])


class _Clock:
    """The two timestamp forms, rebuilt only when the second changes."""

    __slots__ = ("_second", "iso_json", "plain")

    def __init__(self) -> None:
        self._second = -1
        self.plain = ""
        self.iso_json = ""

    def tick(self) -> None:
        second = int(time.time())
        if second != self._second:
            self._set(second)

    def _set(self, second: int) -> None:
        self._second = second
        t = time.localtime(second)
        off = t.tm_gmtoff or 0
        sign = "-" if off < 0 else "+"
        hh, mm = divmod(abs(off) // 60, 60)
        hms = f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
        # %b would follow LC_TIME; the combined format wants English months.
        self.plain = (f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:{hms} "
                      f"{sign}{hh:02d}{mm:02d}")
        # RFC 3339, already a JSON string.
        self.iso_json = (f'"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{hms}'
                         f'{sign}{hh:02d}:{mm:02d}"')


def _protocol(version: Any) -> str:
    proto = _PROTOCOLS.get(version)
    return proto if proto is not None else f"HTTP/{version[0]}.{version[1]}"


class RefusedRequest:
    """What the access line says of a request refused before it was parsed
    whole: the parts of its request line that were read, else "-"."""

    __slots__ = ("headers", "method", "raw_path", "version")

    def __init__(self, method: str = "-", raw_path: str = "-", version: Any = None,
                 headers: Any = None) -> None:
        self.method = method
        self.raw_path = raw_path
        #: (major, minor), or None when not read
        self.version = version
        self.headers = headers if headers is not None else {}

    @classmethod
    def from_line(cls, line: bytes | None) -> RefusedRequest:
        """The parts of a raw request line (or of its start) that can be told."""
        if line:
            line = line.split(b"\n", 1)[0].removesuffix(b"\r")
        if not line:
            return cls()
        parts = line.split(b" ", 2)
        method = parts[0][:_METHOD_MAX].decode("utf-8", "surrogateescape") or "-"
        target = "-"
        version = None
        if len(parts) > 1 and parts[1]:
            raw = parts[1]
            cut = len(raw) > REFUSED_TARGET_MAX
            target = raw[:REFUSED_TARGET_MAX].decode("utf-8", "surrogateescape")
            if cut:
                target += "..."
        if len(parts) > 2 and (m := _VERSION_RE.fullmatch(parts[2])):
            version = (int(m[1]), int(m[2]))
        return cls(method, target, version)


# --------------------------------------------------------------------------
# The writer


class AccessLog:
    """Formats and writes access lines for one config generation."""

    def __init__(self, fmt: str, out: logpipe.LogPipe | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"access log format must be one of {FORMATS}, not {fmt!r}")
        self.format = fmt
        #: read by the handler before it builds a record; off after stdout broke
        self.enabled = fmt != "off"
        self._out = out  # None: the process's stdout, at the first write
        self._clock = _Clock()
        self._line = self._json if fmt == "json" else self._plain
        #: listener name → (plain field, JSON string), built once per name
        self._names: dict[str, tuple[str, str]] = {}

    def write(self, request: Any, listener: str, client: str, rec: Any, started: float,
              rid: bytes, resp: Any) -> None:
        """Write the line of one finished (or abandoned) request.

        *rec* carries ``upstream_status`` (0: the gate answered itself),
        ``bytes_in``, ``bytes_out`` and ``error``; *resp* is None when the
        client went away before any answer (logged as 499). Never raises nor
        waits: a request is not failed or held because its log line could
        not be written (see :mod:`logpipe`).
        """
        line = self.line(request, listener, client, rec, started, rid, resp)
        out = self._out
        if out is None:
            out = self._out = logpipe.stdout()
        # Lines are ASCII (both formats escape everything else).
        if not out.write(line.encode()):  # stdout closed or gone: it will not come back
            self.enabled = False
            log.error("access log disabled: cannot write to %s: %s", out.name, out.broken)

    def line(self, request: Any, listener: str, client: str, rec: Any, started: float,
             rid: bytes, resp: Any) -> str:
        """The line (with its newline) that :meth:`write` writes."""
        self._clock.tick()
        status = resp.status if resp is not None else 499  # client gone before an answer
        bytes_out = rec.bytes_out
        if not bytes_out and request.method != "HEAD":
            # An answer of the gate's own (error, well-known, 405 …) is a
            # web.Response with its body in memory; a forwarded one counts
            # its bytes in rec.
            body = getattr(resp, "body", None)
            if isinstance(body, bytes | bytearray):
                bytes_out = len(body)
        names = self._names.get(listener)
        if names is None:
            names = self._names[listener] = (escape_bare(listener) or "-", _json_str(listener))
        headers = request.headers
        return self._line(
            request, names, client, rec, status, bytes_out,
            (time.monotonic() - started) * 1000.0, rid.decode("ascii", "replace"),
            headers.get("User-Agent"), headers.get("Referer"))

    def _plain(self, request: Any, names: tuple[str, str], client: str, rec: Any,
               status: int, bytes_out: int, duration_ms: float, rid: str,
               agent: str | None, referer: str | None) -> str:
        method = request.method
        target = redact_target(request.raw_path)
        ref = redact_target(referer) if referer else "-"
        ag = agent or "-"
        error = rec.error
        # The checks of escape() and escape_bare() once over all fields instead
        # of once per field: nearly every line needs no escaping at all; one
        # that does is made by _plain_escaped (the same bytes either way).
        bare = f"{client}{rid}{error}"
        fields = f"{method} {target} {ref} {ag} {bare}"
        if not (fields.isascii() and fields.isprintable() and '"' not in fields
                and "\\" not in fields and " " not in bare):
            return self._plain_escaped(request, names, client, rec, status, bytes_out,
                                       duration_ms, rid, agent, referer)
        return (f'{client or "-"} - - [{self._clock.plain}] "{method} {target} '
                f'{_protocol(request.version)}" {status} {bytes_out} "{ref}" "{ag}" '
                f'listener={names[0]} upstream_status={rec.upstream_status or "-"} '
                f'bytes_in={rec.bytes_in} duration={duration_ms / 1000.0:.3f} '
                f'rid={rid or "-"}{" error=" + error if error else ""}\n')

    def _plain_escaped(self, request: Any, names: tuple[str, str], client: str, rec: Any,
                       status: int, bytes_out: int, duration_ms: float, rid: str,
                       agent: str | None, referer: str | None) -> str:
        line = (f'{escape_bare(client) or "-"} - - [{self._clock.plain}] '
                f'"{escape(request.method)} {escape(redact_target(request.raw_path))} '
                f'{_protocol(request.version)}" {status} {bytes_out} '
                f'"{escape(redact_target(referer)) if referer else "-"}" '
                f'"{escape(agent) if agent else "-"}" '
                f'listener={names[0]} upstream_status={rec.upstream_status or "-"} '
                f'bytes_in={rec.bytes_in} duration={duration_ms / 1000.0:.3f} '
                f'rid={escape_bare(rid) or "-"}')
        if rec.error:
            line += f" error={escape_bare(rec.error)}"
        return line + "\n"

    def _json(self, request: Any, names: tuple[str, str], client: str, rec: Any,
              status: int, bytes_out: int, duration_ms: float, rid: str,
              agent: str | None, referer: str | None) -> str:
        return _JSON_LINE % (
            self._clock.iso_json, _json_str(client), names[1], json_text(request.method),
            json_text(redact_target(request.raw_path)), _json_str(_protocol(request.version)),
            status, rec.upstream_status or "null", rec.bytes_in, bytes_out, duration_ms,
            _json_str(rid),
            json_text(agent) if agent is not None else "null",
            json_text(redact_target(referer)) if referer is not None else "null",
            _json_str(rec.error) if rec.error else "null")
