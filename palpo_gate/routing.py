"""Routing: what the gate does with a request target (docs/DESIGN.md section 2).

This module owns the one rule everything rests on: the *decision* is made on a
normalised copy of the path, the *request* is forwarded with the raw target,
byte for byte. Nothing here ever produces a target to send: it only decides.

Two readings of a path are made; see docs/DESIGN.md ("Routing"):

- The first reading is the one that decides. Segments are the pieces between
  *literal* ``/`` characters, each percent-decoded once. A segment that decodes
  to ``.`` or ``..`` (also ``.;x``, ``..;x``) is refused (400), and so are a raw
  backslash, ``%00`` and an invalid escape: these are dot segments or
  terminators to some server, and Matrix never needs them. An encoded slash is
  *data*: Matrix puts client-chosen strings into the path (transaction IDs,
  state keys, room aliases, user IDs), and ``quote("a/../b", safe="")`` is
  ``a%2F..%2Fb``, which must reach Palpo unchanged. Prefixes are matched on the
  fully decoded path with repeated slashes collapsed.
- The second reading is defence in depth against an upstream that *would*
  decode ``%2F`` and then resolve dot segments: decode everything, take a
  decoded ``\\`` for ``/``, resolve dot segments as RFC 3986 section 5.2.4
  does (with and without merging repeated slashes, and with ``;params``
  stripped from dot segments). When that reading lands under an admin prefix,
  or outside the prefix the first reading matched, the request is refused
  (400). It is only made when a dot segment could appear in it at all.

A decision depends on nothing but the method (whether it is forwarded at all,
and ``OPTIONS`` for ``*``), the path before ``?`` and whether the target has a
``#``; so each :class:`Router` remembers the decisions of the paths it has
read (bounded, see :data:`MEMO_ENTRIES`), and a request on a common fixed path
(``/sync``, ``/versions``, ``/keys/query``) costs one dict lookup.

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
#: Paths whose error bodies are Matrix JSON with CORS headers (docs/DESIGN.md section 5).
_MATRIX_ROOTS = ("/_matrix", "/_palpo", "/_synapse", _WELL_KNOWN_PREFIX)


#: The most decisions one Router remembers; when full, it forgets them all.
#: Clearing rather than evicting one at a time keeps a hit to one lookup (an
#: LRU would reorder on every hit) and a miss to one more ``len``; a client
#: sending unique paths costs one clear per this many requests, after which
#: the common paths come back on their next request.
MEMO_ENTRIES = 2048
#: Longer paths (and paths that are not ASCII) are decided every time: they
#: are not the common fixed paths, and this bounds a full memo to ~1.4 MiB.
MEMO_PATH_MAX = 256


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


def _decode(path: str) -> str:
    return _ESCAPE_RE.sub(_unescape, path) if "%" in path else path


def normalise(path: str) -> str:
    """The first reading of *path* (the target without its query): decoded
    once, repeated slashes collapsed. This copy decides where a request goes.

    Raises :class:`BadTarget` for targets refused by docs/DESIGN.md section 2 (items 2, 3).
    """
    if "\\" in path:
        raise BadTarget("backslash in path")
    decoded = _decode(path)
    if "\0" in decoded:
        raise BadTarget("NUL in path")
    if "//" in decoded:
        decoded = _SLASHES_RE.sub("/", decoded)
    if "/." in decoded:  # a dot segment starts right after a separator
        # Segments are split on *literal* slashes only: an encoded slash is
        # data inside a segment (a transaction ID such as "a/../b").
        for segment in path.split("/"):
            # '..;' and '.;x' are dot segments to servers that strip path
            # parameters (RFC 3986 section 3.3), so they are refused too.
            if _decode(segment).split(";", 1)[0] in (".", ".."):
                raise BadTarget("dot segment in path")
    return decoded


def _resolve(path: str, merge: bool) -> str:
    """RFC 3986 section 5.2.4 (remove_dot_segments) on a decoded path, with
    ``;params`` stripped from would-be dot segments, and repeated slashes
    merged first when *merge* (as nginx's merge_slashes)."""
    out: list[str] = []
    for segment in path.split("/")[1:]:
        if merge and not segment:
            continue
        core = segment.split(";", 1)[0]
        if core == ".":
            continue
        if core == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return "/" + "/".join(out)


def second_readings(path: str) -> tuple[str, ...]:
    """What a careless upstream could make of *path* (the raw path, already
    accepted by :func:`normalise`): everything decoded, a decoded backslash
    taken for a slash, dot segments resolved. Empty when no dot segment can
    appear in such a reading, which is the case for nearly every request."""
    decoded = _decode(path)
    if "\\" in decoded:
        decoded = decoded.replace("\\", "/")
    if "/." not in decoded:
        return ()
    return _resolve(decoded, merge=False), _resolve(decoded, merge=True)


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

    __slots__ = ("_admin", "_forward", "_memo", "_well_known")

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
        #: raw path (before '?') → its decision, for the forwarded methods.
        #: Per Router: a reload builds a new one, with its own prefixes.
        self._memo: dict[str, Decision] = {}

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
        # From here on the decision depends on raw_path alone.
        memo = self._memo
        decision = memo.get(raw_path)
        if decision is None:
            decision = self._decide_path(raw_path)
            if len(raw_path) <= MEMO_PATH_MAX and raw_path.isascii():
                if len(memo) >= MEMO_ENTRIES:
                    memo.clear()
                memo[raw_path] = decision
        return decision

    def _decide_path(self, raw_path: str) -> Decision:
        """The decision on an origin-form path without ``?`` or ``#``, for a forwarded method."""
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
        if self._is_admin(path):
            return Decision(Action.ADMIN, path, "", True)
        if "/." in path or "\\" in path:
            # A dot segment may hide behind an encoded slash or backslash.
            reason = self._second_reading_refused(raw_path, path)
            if reason:
                return Decision(Action.BAD_REQUEST, path, reason, matrix)
        if self._forward.match(path) is not None:
            return Decision(Action.FORWARD, path, "", matrix)
        return Decision(Action.NOT_FOUND, path, "", matrix)

    def _is_admin(self, path: str) -> bool:
        return self._admin.match(_strip_params(path).lower()) is not None

    def _second_reading_refused(self, raw_path: str, path: str) -> str:
        """Why the second reading of *raw_path* is refused; empty if it is not
        (docs/DESIGN.md section 2, item 4)."""
        readings = second_readings(raw_path)
        forward = self._forward.match(path)
        prefix = forward.group(0).rstrip("/") if forward is not None else ""
        for reading in readings:
            if self._is_admin(reading):
                return "encoded dot segments lead to the admin API"
            if forward is not None and prefix and not _under(reading, prefix):
                return "encoded dot segments lead out of " + prefix
        return ""


def _is_matrix(path: str) -> bool:
    return _MATRIX_RE.match(path) is not None


#: The media upload endpoints (Matrix client-server API, "Content repository"):
#: ``POST /_matrix/media/v3/upload`` and, since v1.7, ``PUT
#: /_matrix/media/v3/upload/{serverName}/{mediaId}``; the same under r0, v1 and
#: MSC2246's ``unstable/fi.mau.msc2246`` before them. Authenticated media (v1.11,
#: ``/_matrix/client/v1/media``) moved downloads there, not uploads, and
#: ``/_matrix/media/v1/create`` has no body.
_MEDIA_UPLOAD = {
    "POST": re.compile(r"/_matrix/media/(?:unstable/[^/]+|[^/]+)/upload"),
    "PUT": re.compile(r"/_matrix/media/(?:unstable/[^/]+|[^/]+)/upload/[^/]+/[^/]+"),
}


def media_upload(method: str, target: str) -> bool:
    """True when *target* (raw, as the client sent it) names a media upload endpoint.

    Matched on the normalised path, as every routing decision is. Only asked
    about chunked requests when ``forwarding.buffer_chunked_uploads`` is on.
    """
    pattern = _MEDIA_UPLOAD.get(method)
    if pattern is None:
        return False
    try:
        path = normalise(target.split("?", 1)[0])
    except BadTarget:
        return False
    return pattern.fullmatch(path) is not None
