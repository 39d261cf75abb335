"""Routing decisions (docs/DESIGN.md section 2), as tables: no sockets.

The decision is made on a normalised copy of the path; these tests check the
decision only. That the raw target is then forwarded byte for byte is checked
over real sockets elsewhere, with the same ``targets.TARGETS`` table.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import targets

from palpo_gate.config import DEFAULT_BLOCKED_PREFIXES, ROLE_PREFIXES
from palpo_gate.routing import (
    Action,
    BadTarget,
    Decision,
    Router,
    normalise,
    second_readings,
)

CLIENT = Router(ROLE_PREFIXES["client"], DEFAULT_BLOCKED_PREFIXES, well_known=False)
FEDERATION = Router(ROLE_PREFIXES["federation"], DEFAULT_BLOCKED_PREFIXES, well_known=False)
CLIENT_WK = Router(ROLE_PREFIXES["client"], DEFAULT_BLOCKED_PREFIXES, well_known=True)


def _ids(table: Sequence[tuple[str, object]]) -> list[str]:
    return [row[0] or "(empty)" for row in table]


def _decide(router: Router, target: str, method: str = "GET") -> str:
    return router.decide(method, target).action.value


# -- the shared target table, on a client listener ------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [pytest.param(t, a, id=f"{why}: {t}") for t, a, why in targets.TARGETS],
)
def test_client_listener_target_table(target: str, expected: str) -> None:
    assert _decide(CLIENT, target) == expected


def test_target_table_is_whole() -> None:
    # The table is shared with the socket tests; a lost or duplicated row, or an
    # action name that does not exist, would go unnoticed there.
    assert len(targets.TARGETS) >= 92
    assert len({t for t, _, _ in targets.TARGETS}) == len(targets.TARGETS)
    assert {a for _, a, _ in targets.TARGETS} <= {a.value for a in Action}


# -- roles -------------------------------------------------------------------------------

FEDERATION_TABLE = [
    ("/_matrix/federation/v1/send/txn1", "forward"),
    ("/_matrix/key/v2/server", "forward"),
    ("/_matrix", "forward"),
    ("/_matrix/client/versions", "forward"),  # federation forwards all of /_matrix
    ("/_palpo/client/x", "not_found"),
    ("/_palpo/client", "not_found"),
    ("/_palpo/admin/users", "admin"),
    ("/_SYNAPSE/admin", "admin"),
    ("/health", "health"),
    ("/.well-known/matrix/server", "forward"),
    ("/_matrixfoo", "not_found"),
    ("/_matrix/../_palpo/admin", "bad_request"),
]


# -- [well_known] configured -------------------------------------------------------------

WELL_KNOWN_TABLE = [
    ("/.well-known/matrix/server", "well_known_server"),
    ("/.well-known/matrix/client", "well_known_client"),
    ("/.well-known/matrix/server?x=1", "well_known_server"),
    ("/.well-known/matrix/%63lient", "well_known_client"),
    ("//.well-known//matrix/client", "well_known_client"),
    ("/.well-known/matrix/x", "not_found"),
    ("/.well-known/matrix/support", "not_found"),
    ("/.well-known/matrix", "not_found"),
    ("/.well-known/other", "not_found"),
    ("/_matrix/client/versions", "forward"),
    ("/_palpo/admin", "admin"),
    ("/health", "health"),
]


def test_well_known_absent_forwards_the_documents_on_every_role() -> None:
    for router in (CLIENT, FEDERATION):
        assert _decide(router, "/.well-known/matrix/server") == "forward"
        assert _decide(router, "/.well-known/matrix/client") == "forward"


# -- methods and request-target forms ---------------------------------------------------

METHOD_TABLE = [
    ("CONNECT", "matrix.example.com:443", "method_not_allowed"),
    ("CONNECT", "/_matrix/client/versions", "method_not_allowed"),
    ("OPTIONS", "*", "options_asterisk"),
    ("GET", "*", "bad_request"),
    ("HEAD", "*", "bad_request"),
    ("POST", "*", "bad_request"),
    ("OPTIONS", "/_matrix/client/versions", "forward"),
    ("PUT", "/_matrix/client/v3/rooms/%21r%3Ahs/send/m.room.message/t1", "forward"),
    ("DELETE", "/_palpo/admin/x", "admin"),
    ("GET", "_matrix/x", "bad_request"),  # neither origin- nor absolute-form
]


@pytest.mark.parametrize(("method", "target", "expected"), METHOD_TABLE,
                         ids=[f"{m} {t}" for m, t, _ in METHOD_TABLE])
def test_methods_and_target_forms(method: str, target: str, expected: str) -> None:
    assert _decide(CLIENT, target, method) == expected


@pytest.mark.parametrize("target", targets.ABSOLUTE_FORM)
@pytest.mark.parametrize("method", ["GET", "POST", "OPTIONS"])
def test_absolute_form_is_refused(method: str, target: str) -> None:
    assert _decide(CLIENT, target, method) == "bad_request"


# -- custom prefix lists -----------------------------------------------------------------

EVERYTHING = Router(("/",), DEFAULT_BLOCKED_PREFIXES, well_known=False)
EVERYTHING_TABLE = [
    ("/", "forward"),
    ("/index.html", "forward"),
    ("/_matrix/client/versions", "forward"),
    ("/_palpo/other", "forward"),
    ("/.well-known/matrix/client", "forward"),
    ("/.well-known/other", "forward"),
    ("/healthz", "forward"),
    ("/health", "health"),
    ("/_palpo/admin", "admin"),
    ("/_Synapse/Admin/v1", "admin"),
    ("/_palpo%2Fadmin", "admin"),
    ("/a/../_palpo/admin", "bad_request"),
    ("/a\\b", "bad_request"),
    ("/%zz", "bad_request"),
]


NARROW = Router(("/_matrix/client", "/_matrix/media"), DEFAULT_BLOCKED_PREFIXES, well_known=True)
NARROW_TABLE = [
    ("/_matrix/client", "forward"),
    ("/_matrix/client/v3/sync", "forward"),
    ("/_matrix/media/v3/upload", "forward"),
    ("/_matrix/federation/v1/version", "not_found"),
    ("/_matrix/clientx", "not_found"),
    ("/_matrix", "not_found"),
    ("/_palpo/client/x", "not_found"),
]


BLOCKED = Router(ROLE_PREFIXES["client"], ("/_matrix/client/v3/admin", "/_Palpo/Internal"),
                 well_known=False)
BLOCKED_TABLE = [
    ("/_matrix/client/v3/admin", "admin"),
    ("/_matrix/client/v3/admin/whois/@u:hs", "admin"),
    ("/_matrix/client/V3/ADMIN/x", "admin"),
    ("/_matrix/client/v3/admin;x", "admin"),
    ("/_matrix/client/v3/%61dmin", "admin"),
    ("/_matrix/client/v3/adminx", "forward"),
    ("/_palpo/internal", "admin"),  # configured in mixed case, matched case-insensitively
    ("/_PALPO/INTERNAL/x", "admin"),
    # the default admin prefixes are replaced, not extended
    ("/_palpo/admin", "not_found"),
    ("/_synapse/admin/v1/users", "not_found"),
    ("/_matrix/client/versions", "forward"),
]


#: Each table with the listener it is decided on: the federation role, the
#: client role with [well_known], everything ("/"), a narrow prefix list, and
#: admin prefixes of the operator's own.
ROUTER_TABLES = {
    "federation": (FEDERATION, FEDERATION_TABLE),
    "well_known": (CLIENT_WK, WELL_KNOWN_TABLE),
    "everything": (EVERYTHING, EVERYTHING_TABLE),
    "narrow": (NARROW, NARROW_TABLE),
    "blocked": (BLOCKED, BLOCKED_TABLE),
}


@pytest.mark.parametrize(("router", "target", "expected"), [
    pytest.param(router, target, expected, id=f"{name}: {target}")
    for name, (router, table) in ROUTER_TABLES.items() for target, expected in table])
def test_router_tables(router: Router, target: str, expected: str) -> None:
    assert _decide(router, target) == expected


def test_no_blocked_prefixes_forwards_admin_paths_under_a_forward_prefix() -> None:
    router = Router(("/_matrix", "/_palpo"), (), well_known=False)
    assert _decide(router, "/_palpo/admin/users") == "forward"


# -- Decision.matrix: which errors get Matrix JSON and CORS (docs/DESIGN.md section 5) ----------

MATRIX_TABLE = [
    ("/_matrix", True),
    ("/_matrix/client/versions", True),
    ("/_matrix/client/unknown", True),
    ("/_palpo", True),
    ("/_palpo/other", True),
    ("/_palpo/admin/x", True),
    ("/_synapse", True),
    ("/_synapse/admin/v1/users", True),
    ("/.well-known/matrix", True),
    ("/.well-known/matrix/server", True),
    ("/.well-known/matrix/x", True),
    ("/%5fmatrix/client", True),
    ("/_matrix/%zz", True),  # a 400 on a Matrix path
    ("/_matrix/../x", True),
    ("/_matrix/x#frag", True),  # a 400 on a Matrix path, too
    ("/foo", False),
    ("/", False),
    ("/_matrixfoo", False),
    ("/.well-known/other", False),
    ("/health", False),
    ("/index.html", False),
]


@pytest.mark.parametrize(("target", "expected"), MATRIX_TABLE, ids=_ids(MATRIX_TABLE))
def test_decision_matrix_flag(target: str, expected: bool) -> None:
    assert CLIENT.decide("GET", target).matrix is expected


def test_decision_carries_the_normalised_path() -> None:
    d = CLIENT.decide("GET", "//%5fmatrix//client/versions?a=%2F")
    assert d == Decision(Action.FORWARD, "/_matrix/client/versions", "", True)


def test_refusals_say_why() -> None:
    for target in ("/_matrix/../x", "/_matrix/%zz", "/a\\b", "*", "http://h/x", "/x#f"):
        d = CLIENT.decide("GET", target)
        assert d.action is Action.BAD_REQUEST
        assert d.reason, target
    assert CLIENT.decide("CONNECT", "h:443").reason


# -- normalise() -------------------------------------------------------------------------

NORMALISE_TABLE = [
    ("/_matrix/client/versions", "/_matrix/client/versions"),
    ("/", "/"),
    ("", ""),
    ("/%5fmatrix/%5Fpalpo", "/_matrix/_palpo"),
    ("/_matrix/%25252e", "/_matrix/%252e"),  # decoded once only
    ("/_matrix/%252e%252e", "/_matrix/%2e%2e"),
    ("//_matrix///client//", "/_matrix/client/"),
    ("/a%2Fb", "/a/b"),
    ("/a%2f%2Fb", "/a/b"),  # decoded, then collapsed
    ("/caf%C3%A9", "/caf\xc3\xa9"),  # one character per byte
    ("/a%2f..%2fb", "/a/../b"),  # an encoded slash is data: not a dot segment
    ("/a%2F.%2Fb", "/a/./b"),
    ("/_matrix/x.y/...", "/_matrix/x.y/..."),
    ("/_matrix/.well", "/_matrix/.well"),
    ("/_matrix/x;y=1", "/_matrix/x;y=1"),
    ("/a%5cb", "/a\\b"),  # an encoded backslash is data
]


@pytest.mark.parametrize(("raw", "expected"), NORMALISE_TABLE, ids=_ids(NORMALISE_TABLE))
def test_normalise(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


NORMALISE_BAD = [
    "/_matrix/../x",
    "/_matrix/./x",
    "/_matrix/..",
    "/_matrix/.",
    "/..",
    "/%2e%2e/x",
    "/%2E/x",
    "/.%2e",
    "/_matrix/..;/x",
    "/_matrix/.;x/y",
    "/_matrix/%2e%2e%3bx/y",
    "/a%00b",  # a terminator to some servers
    "/_matrix/%2e.%00",
    "/a\\b",
    "\\",
    "/_matrix/%zz",
    "/_matrix/%g0",
    "/_matrix/%2",
    "/_matrix/%",
    "/_matrix/%%41",
]


@pytest.mark.parametrize("raw", NORMALISE_BAD)
def test_normalise_refuses(raw: str) -> None:
    with pytest.raises(BadTarget):
        normalise(raw)


# -- second_readings(): the path as a careless upstream would read it ------------------

SECOND_READING_TABLE = [
    # (raw path, readings: without and with merged slashes; () when none is made)
    ("/_matrix/client/versions", ()),
    ("/_matrix/a%2Fb", ()),  # no dot segment can appear
    ("/_matrix/x.y/%2e%2e%2e", ("/_matrix/x.y/...", "/_matrix/x.y/...")),
    ("/_matrix/a%2F..%2Fb", ("/_matrix/b", "/_matrix/b")),
    ("/_matrix/a%2F.%2Fb", ("/_matrix/a/b", "/_matrix/a/b")),
    ("/_matrix/x%2F..", ("/_matrix", "/_matrix")),
    ("/_matrix/x//..%2Fy", ("/_matrix/x/y", "/_matrix/y")),
    ("/_matrix/%5c..%5cy", ("/_matrix/y", "/y")),  # "/_matrix//../y"
    ("/_matrix/a%5c..%5cy", ("/_matrix/y", "/_matrix/y")),
    ("/_matrix/a%2F..;x%2Fy", ("/_matrix/y", "/_matrix/y")),
    ("/_matrix%2F..%2F..%2F..", ("/", "/")),  # never above the root
    ("/_matrix/a%2F..%2F..%2F_palpo%2Fadmin", ("/_palpo/admin", "/_palpo/admin")),
]


@pytest.mark.parametrize(("raw", "expected"), SECOND_READING_TABLE,
                         ids=_ids(SECOND_READING_TABLE))
def test_second_readings(raw: str, expected: tuple[str, ...]) -> None:
    assert second_readings(raw) == expected


def test_second_reading_refusals_say_where_they_lead() -> None:
    d = CLIENT.decide("GET", "/_matrix/x%2F..%2F..%2F_palpo%2Fadmin/v1/users")
    assert d.action is Action.BAD_REQUEST and "admin" in d.reason
    d = CLIENT.decide("GET", "/_matrix/a%2F..%2F..%2Fetc")
    assert d.action is Action.BAD_REQUEST and "/_matrix" in d.reason
    # The federation role forwards only /_matrix: climbing out of it is refused
    # there too, and staying under it is not.
    assert _decide(FEDERATION, "/_matrix/a%2F..%2F..%2F_palpo/client/x") == "bad_request"
    assert _decide(FEDERATION, "/_matrix/key/v2/a%2F..%2Fserver") == "forward"
# -- which methods are forwarded -----------------------------------------------------------

#: (method, target, action, matrix flag of the refusal)
FORWARDED_METHOD_TABLE = [
    *((m, "/_matrix/client/v3/rooms/%21r%3Ahs/x", "forward", True)
      for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS")),
    ("TRACE", "/_matrix/client/versions", "method_not_allowed", True),
    ("TRACE", "/index.html", "method_not_allowed", False),
    ("TRACE", "*", "method_not_allowed", False),
    ("PATCH", "/_matrix/client/v3/profile/%40u%3Ahs", "method_not_allowed", True),
    ("PROPFIND", "/_matrix/media/v3/download/hs/m", "method_not_allowed", True),
    ("MKCOL", "/_palpo/client/x", "method_not_allowed", True),
    ("COPY", "/_palpo/admin/x", "method_not_allowed", True),  # before the admin rule
    ("LOCK", "/_matrix/x?y=1", "method_not_allowed", True),
    ("SEARCH", "/.well-known/matrix/server", "method_not_allowed", True),
    ("PURGE", "/health", "method_not_allowed", False),
    ("get", "/_matrix/client/versions", "method_not_allowed", True),  # methods are case-sensitive
    ("CONNECT", "matrix.example.com:443", "method_not_allowed", False),
]


@pytest.mark.parametrize(("method", "target", "expected", "matrix"), FORWARDED_METHOD_TABLE,
                         ids=[f"{m} {t}" for m, t, _, _ in FORWARDED_METHOD_TABLE])
def test_only_the_matrix_methods_are_forwarded(method: str, target: str, expected: str,
                                               matrix: bool) -> None:
    for router in (CLIENT, CLIENT_WK):
        d = router.decide(method, target)
        assert d.action.value == expected
        if expected == "method_not_allowed":
            assert d.matrix is matrix
            assert method in d.reason


def test_options_asterisk_advertises_the_forwarded_methods() -> None:
    from palpo_gate.routing import ALLOW, FORWARDED_METHODS

    assert ALLOW == "GET, HEAD, POST, PUT, DELETE, OPTIONS"
    assert set(FORWARDED_METHODS) == {m for m, _, a, _ in FORWARDED_METHOD_TABLE
                                      if a == "forward"}


# -- remembered decisions (Router's memo) -----------------------------------------------

#: Every target of the shared table with each forwarded method, and the odd ones
#: a memo keyed on the path must not confuse: "*" by method, a '#' after the
#: query, an unsupported method on a remembered path.
MEMO_REQUESTS = [
    *((m, t) for t, _, _ in targets.TARGETS for m in ("GET", "OPTIONS", "PUT")),
    *(("GET", t) for t in targets.ABSOLUTE_FORM),
    ("OPTIONS", "*"), ("GET", "*"),
    ("GET", "/_matrix/client/versions?a=1#f"), ("GET", "/_matrix/client/versions#"),
    ("TRACE", "/_matrix/client/versions"), ("get", "/_matrix/client/versions"),
    ("GET", "/health?x#y"),
]


def _fresh_client() -> Router:
    return Router(ROLE_PREFIXES["client"], DEFAULT_BLOCKED_PREFIXES, well_known=False)


@pytest.mark.parametrize("order", ["forward", "backward", "interleaved"])
def test_a_remembered_decision_equals_a_fresh_one(order: str) -> None:
    requests = list(MEMO_REQUESTS)
    if order == "backward":
        requests.reverse()
    elif order == "interleaved":
        # Each request between two others, and every one asked again later.
        requests = requests[::2] + requests[1::2] + requests[::-3]
    router = _fresh_client()
    for _ in range(2):
        for method, target in requests:
            assert router.decide(method, target) == _fresh_client().decide(method, target), (
                method, target)


def test_a_common_path_is_remembered_whatever_its_query() -> None:
    router = _fresh_client()
    first = router.decide("GET", "/_matrix/client/v3/sync?since=s1&timeout=30000")
    assert first.action is Action.FORWARD
    # The very same Decision: the second request was one lookup.
    assert router.decide("GET", "/_matrix/client/v3/sync?since=s2") is first
    assert router.decide("OPTIONS", "/_matrix/client/v3/sync") is first
    assert "/_matrix/client/v3/sync" in router._memo


def test_the_memo_stays_bounded_under_unique_paths() -> None:
    from palpo_gate.routing import MEMO_ENTRIES

    router = _fresh_client()
    common = "/_matrix/client/versions"
    for i in range(MEMO_ENTRIES * 3 + 7):
        assert router.decide("GET", f"/_matrix/client/v3/rooms/!r{i}:hs/send/m/t{i}"
                             ).action is Action.FORWARD
        assert router.decide("GET", common).action is Action.FORWARD
        assert len(router._memo) <= MEMO_ENTRIES
    assert common in router._memo  # back after the last clear


def test_long_and_non_ascii_paths_are_not_remembered() -> None:
    from palpo_gate.routing import MEMO_PATH_MAX

    router = _fresh_client()
    longest = "/_matrix/" + "x" * (MEMO_PATH_MAX - len("/_matrix/"))
    too_long = longest + "y"
    for target in (too_long, "/_matrix/caf\xe9", longest):
        assert router.decide("GET", target).action is Action.FORWARD
    assert list(router._memo) == [longest]


def test_each_router_remembers_its_own_decisions() -> None:
    # A reload builds a new Router: what the old one remembered must not
    # decide for the new prefixes.
    client, narrow = _fresh_client(), Router(("/_matrix/client",), (), well_known=False)
    assert _decide(client, "/_palpo/client/x") == "forward"
    assert _decide(narrow, "/_palpo/client/x") == "not_found"
    assert _decide(client, "/_palpo/admin") == "admin"
    assert _decide(narrow, "/_palpo/admin") == "not_found"
