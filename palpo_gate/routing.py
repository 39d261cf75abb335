"""Routing: what the gate does with a request target (SPEC section 2).

This module owns the one rule everything rests on: the *decision* is made on a
normalised copy of the path, the *request* is forwarded with the raw target,
byte for byte. Nothing here ever produces a target to send: it only decides.

The normalised copy: percent-escapes decoded once, repeated slashes collapsed.
A target that could mean different things to different parsers is refused
(400) rather than guessed at: absolute-form, a fragment, a raw backslash, an
invalid escape, a ``.`` or ``..`` segment (literal, encoded, or followed by
``;params``). Matrix never uses them, and an upstream that resolved them could
be steered past the admin block (``/_matrix/%2e%2e/_palpo/admin``).

Pure: no sockets, no aiohttp. Tested with tables in ``tests/test_routing.py``.
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple


class Action(enum.Enum):
    FORWARD = "forward"
    ADMIN = "admin"  # forwarded only if the client is in admin.allow_from, else 403
    HEALTH = "health"
    WELL_KNOWN_SERVER = "well_known_server"
    WELL_KNOWN_CLIENT = "well_known_client"
    OPTIONS_ASTERISK = "options_asterisk"
    NOT_FOUND = "not_found"
    BAD_REQUEST = "bad_request"
    METHOD_NOT_ALLOWED = "method_not_allowed"


class Decision(NamedTuple):
    """What to do with one request (a tuple: made once per request, cheaply)."""

    action: Action
    #: the normalised path (decoded, slashes collapsed), for logs and error bodies
    path: str = ""
    #: why a request was refused; empty otherwise
    reason: str = ""
    #: True when error bodies should be Matrix JSON with CORS (a Matrix path)
    matrix: bool = False


class BadTarget(ValueError):
    """The target is refused with 400; the message says why."""


#: The methods the Matrix APIs use (client-server, federation, application
#: service, push; Palpo's admin API too); any other is refused with 405
#: rather than forwarded: TRACE would echo cookies and credentials back
#: (nginx refuses it too), WebDAV methods have no Matrix meaning, and no
#: Matrix endpoint uses PATCH. ``OPTIONS *`` and the 405's Allow list them.
FORWARDED_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS")
ALLOW = ", ".join(FORWARDED_METHODS)
_METHODS = frozenset(FORWARDED_METHODS)

_ESCAPE_RE = re.compile(r"%([0-9A-Fa-f]{2})?")
_SLASHES_RE = re.compile(r"/{2,}")
_HEALTH = "/health"
_WELL_KNOWN_SERVER = "/.well-known/matrix/server"
_WELL_KNOWN_CLIENT = "/.well-known/matrix/client"
_WELL_KNOWN_PREFIX = "/.well-known/matrix"
#: Paths whose error bodies are Matrix JSON with CORS headers (SPEC section 5).
_MATRIX_ROOTS = ("/_matrix", "/_palpo", "/_synapse", _WELL_KNOWN_PREFIX)


def _prefix_re(prefixes: tuple[str, ...], flags: int = 0) -> re.Pattern[str]:
    """One regex for segment-boundary matching of several prefixes (the table
    stays data; matching it is one call into the regex engine)."""
    if "/" in prefixes:
        return re.compile("/", flags)
    if not prefixes:
        return re.compile("(?!)")
    alternatives = "|".join(re.escape(p) for p in sorted(prefixes, key=len, reverse=True))
    return re.compile(f"(?:{alternatives})(?:/|$)", flags)


_MATRIX_RE = _prefix_re(_MATRIX_ROOTS)


def _unescape(m: re.Match[str]) -> str:
    hexpair = m.group(1)
    if hexpair is None:
        raise BadTarget("invalid percent-escape")
    # latin-1: one character per byte, so ASCII prefixes compare exactly and
    # non-ASCII bytes can never turn into '/' or '.'.
    return chr(int(hexpair, 16))


def normalise(path: str) -> str:
    """The decision copy of *path* (the target without its query).

    Raises :class:`BadTarget` for targets refused by SPEC section 2.
    """
    if "\\" in path:
        raise BadTarget("backslash in path")
    decoded = _ESCAPE_RE.sub(_unescape, path) if "%" in path else path
    if "//" in decoded:
        decoded = _SLASHES_RE.sub("/", decoded)
    if "/." in decoded or "\\." in decoded:  # a dot segment starts right after a separator
        # A decoded backslash is split on too, and a segment ends at NUL: an
        # upstream that took '\\' for '/' or stopped at NUL would see these
        # as dot segments.
        for segment in decoded.replace("\\", "/").split("/"):
            # '..;' and '.;x' are dot segments to servers that strip path
            # parameters (RFC 3986 section 3.3), so they are refused too.
            if segment.split(";", 1)[0].split("\0", 1)[0] in (".", ".."):
                raise BadTarget("dot segment in path")
    return decoded


def _under(path: str, prefix: str) -> bool:
    """Segment-boundary match: /_matrix matches /_matrix and /_matrix/x, not /_matrixfoo."""
    return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"
                                        or prefix == "/")


def _strip_params(path: str) -> str:
    """``/_palpo;x/admin`` → ``/_palpo/admin``: what a parameter-stripping server would see."""
    if ";" not in path:
        return path
    return "/".join(seg.split(";", 1)[0] for seg in path.split("/"))


class Router:
    """The routing table of one listener, built once at load."""

    __slots__ = ("_admin", "_forward", "_well_known")

    def __init__(self, prefixes: tuple[str, ...], blocked_prefixes: tuple[str, ...],
                 well_known: bool) -> None:
        forward = tuple(prefixes)
        if not well_known and not any(_under(_WELL_KNOWN_PREFIX, p) for p in prefixes):
            # [well_known] absent: delegation documents come from Palpo.
            forward += (_WELL_KNOWN_PREFIX,)
        self._forward = _prefix_re(forward)
        # Matched against the lower-cased path: case-insensitive.
        self._admin = _prefix_re(tuple(p.lower() for p in blocked_prefixes))
        self._well_known = well_known

    def decide(self, method: str, target: str) -> Decision:
        if method not in _METHODS:
            return Decision(Action.METHOD_NOT_ALLOWED, reason=f"{method} is not supported",
                            matrix=_is_matrix(target.split("?", 1)[0]))
        if not target.startswith("/"):
            if target == "*":
                if method == "OPTIONS":
                    return Decision(Action.OPTIONS_ASTERISK)
                return Decision(Action.BAD_REQUEST, reason="asterisk-form target")
            return Decision(Action.BAD_REQUEST, reason="only origin-form targets are accepted")
        qpos = target.find("?")
        raw_path = target if qpos < 0 else target[:qpos]
        if "#" in target:
            return Decision(Action.BAD_REQUEST, raw_path.split("#", 1)[0],
                            "fragment in request target", _is_matrix(raw_path))
        try:
            path = normalise(raw_path)
        except BadTarget as exc:
            return Decision(Action.BAD_REQUEST, raw_path, str(exc), _is_matrix(raw_path))
        matrix = _MATRIX_RE.match(path) is not None

        if path == _HEALTH:
            return Decision(Action.HEALTH, path)
        if self._well_known:
            if path == _WELL_KNOWN_SERVER:
                return Decision(Action.WELL_KNOWN_SERVER, path, matrix=True)
            if path == _WELL_KNOWN_CLIENT:
                return Decision(Action.WELL_KNOWN_CLIENT, path, matrix=True)
        # Admin prefixes are matched case-insensitively and with ;params
        # stripped: no spelling of the path reaches the admin API.
        if self._admin.match(_strip_params(path).lower()) is not None:
            return Decision(Action.ADMIN, path, "", True)
        if self._forward.match(path) is not None:
            return Decision(Action.FORWARD, path, "", matrix)
        return Decision(Action.NOT_FOUND, path, "", matrix)


def _is_matrix(path: str) -> bool:
    return _MATRIX_RE.match(path) is not None
