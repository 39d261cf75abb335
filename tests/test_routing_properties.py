"""Routing properties (docs/DESIGN.md, "Routing"), checked with Hypothesis on
targets built from Matrix-like segments, escapes in either case, encoded
slashes and backslashes, dot segments and ``;`` parameters.

- Nothing forwarded has a second reading (what a careless upstream could make
  of the path: everything decoded, dot segments resolved) under an admin prefix.
- A target decides the same however its unreserved characters (RFC 3986
  section 2.3) are spelled: literally, or percent-encoded in either hex case
  (RFC 3986 section 6.2.2.2: such escapes are equivalent to the characters).

Pure: no sockets. The example count is the ``ci`` profile's (tests/conftest.py);
``--hypothesis-profile=thorough`` runs many more.
"""

from __future__ import annotations

import re
import string

from hypothesis import given
from hypothesis import strategies as st

from palpo_gate.config import DEFAULT_BLOCKED_PREFIXES, ROLE_PREFIXES
from palpo_gate.routing import Action, Router, second_readings

ROUTERS = {
    "client": Router(ROLE_PREFIXES["client"], DEFAULT_BLOCKED_PREFIXES, well_known=False),
    "federation": Router(ROLE_PREFIXES["federation"], DEFAULT_BLOCKED_PREFIXES,
                         well_known=False),
    # Everything forwarded but the admin API: the widest door to an admin prefix.
    "everything": Router(("/",), DEFAULT_BLOCKED_PREFIXES, well_known=True),
}

#: Where a target starts: under a forwarded prefix, or not.
HEADS = ((), ("x",), ("_matrix",), ("_matrix", "client", "v3"), ("_matrix", "federation", "v1"),
         ("_palpo", "client"), ("_matrix", "media", "v3", "download"))
#: What may follow: Matrix-like segments and dot segments, then a climb of
#: ``..`` segments back towards the root.
MIDDLE = ("rooms", "!room:example.org", "@alice:hs.test", "send", "m.room.message",
          "txn-1.2~x", ".well-known", "_matrix", "admin", "..", ".", "", "...")
#: Where a target may end: an admin prefix (in other cases too), or not.
TAILS = (("_palpo", "admin"), ("_PALPO", "Admin"), ("_synapse", "admin", "v1", "users"),
         ("_palpo", "admin", ""), ("_palpo",), ("admin",), ())
PARAMS = ("", "", "", "", ";", ";x", ";a=b")
#: Between segments: a literal slash, a repeated one, an encoded slash or
#: backslash (either case; a raw backslash is refused outright). A target
#: mostly keeps one kind.
SEPARATORS = ("/", "%2F", "%2f", "%5C", "%5c", "//")
UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")


def escape(ch: str, upper: bool) -> str:
    code = f"%{ord(ch):02X}"
    return code if upper else code.lower()


def bit(mask: int, i: int) -> bool:
    return bool(mask >> i & 1)


@st.composite
def segment(draw: st.DrawFn, word: str) -> str:
    """*word* with maybe a ``;`` parameter, about one character in four
    percent-encoded, in either case."""
    text = word + draw(st.sampled_from(PARAMS))
    bits = st.integers(0, (1 << len(text)) - 1)
    escaped, upper = draw(bits) & draw(bits), draw(bits)
    return "".join(escape(ch, bit(upper, i)) if bit(escaped, i) else ch
                   for i, ch in enumerate(text))


@st.composite
def targets(draw: st.DrawFn) -> str:
    words = [*draw(st.sampled_from(HEADS)),
             *draw(st.lists(st.sampled_from(MIDDLE), max_size=3)),
             *[".."] * draw(st.integers(0, 5)),
             *draw(st.sampled_from(TAILS))]
    usual = draw(st.sampled_from(SEPARATORS))
    separator = st.sampled_from((usual, usual, usual, *SEPARATORS))
    parts = ["/", draw(segment(words[0] if words else ""))]
    for word in words[1:]:
        parts += [draw(separator), draw(segment(word))]
    query = draw(st.sampled_from(("", "", "?", "?a=%2F..%2F", "?x=1")))
    return "".join(parts) + query


def under_admin(path: str) -> bool:
    """*path* is an admin prefix or below one, compared as the admin rule does:
    in any case, with ``;params`` stripped from each segment."""
    bare = "/".join(seg.split(";", 1)[0] for seg in path.split("/")).lower()
    return any(bare == p or bare.startswith(p + "/") for p in DEFAULT_BLOCKED_PREFIXES)


@given(target=targets(), role=st.sampled_from(sorted(ROUTERS)))
def test_nothing_forwarded_has_a_second_reading_under_an_admin_prefix(
        target: str, role: str) -> None:
    decision = ROUTERS[role].decide("GET", target)
    if decision.action is Action.FORWARD:
        assert not under_admin(decision.path), decision
        readings = second_readings(target.split("?", 1)[0])
        assert not [r for r in readings if under_admin(r)], (decision, readings)


_TOKEN = re.compile(r"%[0-9A-Fa-f]{2}|.", re.S)


@st.composite
def respelled(draw: st.DrawFn, target: str) -> str:
    """*target* with each unreserved character, literal or escaped, spelled
    anew: literally, or escaped in upper or lower case."""
    tokens = _TOKEN.findall(target)
    bits = st.integers(0, (1 << len(tokens)) - 1)
    escaped, upper = draw(bits), draw(bits)
    out = []
    for i, token in enumerate(tokens):
        ch = chr(int(token[1:], 16)) if len(token) == 3 else token
        if ch not in UNRESERVED:
            out.append(token)
        else:
            out.append(escape(ch, bit(upper, i)) if bit(escaped, i) else ch)
    return "".join(out)


@given(data=st.data(), target=targets(), role=st.sampled_from(sorted(ROUTERS)))
def test_unreserved_characters_decide_the_same_however_spelled(
        data: st.DataObject, target: str, role: str) -> None:
    router = ROUTERS[role]
    other = data.draw(respelled(target), label="respelled")
    first, second = router.decide("GET", target), router.decide("GET", other)
    assert first.action is second.action, (first, second)
    if first.action is not Action.BAD_REQUEST:  # a refusal names the raw path
        assert first.path == second.path


#: One Router for the whole run, so that its memo fills with what earlier
#: examples asked (and is cleared when full) while the property is checked.
_REMEMBERING = Router(ROLE_PREFIXES["client"], DEFAULT_BLOCKED_PREFIXES, well_known=False)
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH", "get")


@given(method=st.sampled_from(METHODS),
       target=st.one_of(targets(), st.text(max_size=40),
                        st.text(alphabet="/_matrix%2eE5cC.;?#*\\", max_size=30)))
def test_a_decision_is_the_same_asked_again_or_by_a_fresh_router(
        method: str, target: str) -> None:
    fresh = Router(ROLE_PREFIXES["client"], DEFAULT_BLOCKED_PREFIXES, well_known=False)
    first = _REMEMBERING.decide(method, target)
    assert _REMEMBERING.decide(method, target) == first
    assert fresh.decide(method, target) == first
    assert fresh.decide(method, target) == first
