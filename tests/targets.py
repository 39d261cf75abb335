"""The target table: request targets and what the gate must do with each, on a
``client`` listener with the default admin prefixes and no ``[well_known]``.

Shared by the pure routing tests (``test_routing.py``: the decision) and the
socket tests (``test_forwarding.py``: every FORWARD target reaches the
recording upstream byte for byte, every other one never reaches it).
"""

from __future__ import annotations

F = "forward"
ADMIN = "admin"  # 403 unless admin.allow_from matches
BAD = "bad_request"  # 400
NF = "not_found"  # 404
HEALTH = "health"

TARGETS: list[tuple[str, str, str]] = [
    # (target, expected action, why)
    # -- plain Matrix paths
    ("/_matrix", F, "the prefix itself"),
    ("/_matrix/", F, "prefix with a trailing slash"),
    ("/_matrix/client/versions", F, "client API"),
    ("/_matrix/federation/v1/version", F, "federation API"),
    ("/_matrix/key/v2/server", F, "key API"),
    ("/_matrix/media/v3/download/hs/abc", F, "media"),
    ("/_palpo/client/x", F, "Palpo's client prefix"),
    ("/_palpo/client", F, "Palpo's client prefix itself"),
    # -- escapes are decided on decoded, forwarded raw
    ("/_matrix/client/v3/rooms/%21abc%3Ahs.test/send/m.room.message/t1", F, "room id escapes"),
    ("/_matrix/client/v3/directory/room/%23room%3Ahs.test", F, "alias escapes"),
    ("/_matrix/client/v3/rooms/!abc:hs.test/state", F, "unescaped ! and :"),
    ("/_matrix/a%2Fb/c", F, "encoded slash stays encoded"),
    ("/_matrix/a%2fb/c", F, "lower-case encoded slash keeps its case"),
    ("/_matrix/c%25d", F, "encoded percent"),
    ("/_matrix/%25252e", F, "double-encoded: decoded once only"),
    ("/_matrix/%252e%252e/x", F, "encoded %2e is not a dot after one decode"),
    ("/_matrix/caf%C3%A9", F, "UTF-8 escapes upper-case"),
    ("/_matrix/caf%c3%a9", F, "UTF-8 escapes lower-case"),
    ("/_matrix/send/a%2Fb%3Fc%25d%C3%BC", F, "txn id with / ? % and u-umlaut"),
    ("/%5fmatrix/client/versions", F, "encoded underscore in the prefix"),
    ("/%5Fmatrix/client/versions", F, "encoded underscore, upper-case"),
    ("/_matrix/x;y=1", F, "semicolon params pass through"),
    ("/_matrix/a;b/c", F, "semicolon in a middle segment"),
    ("/_matrix//double//slash", F, "double slashes kept"),
    ("//_matrix/client", F, "leading double slash collapses for the decision"),
    ("/_matrix/x.y", F, "a dot inside a segment"),
    ("/_matrix/...", F, "three dots is a name, not a dot segment"),
    ("/_matrix/.well", F, "leading dot name"),
    ("/_matrix/x?", F, "empty query kept"),
    ("/_matrix/x?a=%2F&b=+&c=%zz", F, "query is never decoded or checked"),
    ("/_matrix/x?next=/../_palpo/admin", F, "dots in the query do not matter"),
    ("/_matrix/x?a=1&a=2&%3D=%26", F, "repeated and encoded query keys"),
    ("/_matrix/client/v3/sync?timeout=30000&since=s72594_4483_1934", F, "sync query"),
    ("/_matrix/x|y{z}", F, "unusual but legal bytes the C parser accepts"),
    ("/_matrix/%7E~", F, "tilde raw and encoded"),
    ("/_matrix/%20space", F, "encoded space"),
    ("/_matrix/%5c", F, "encoded backslash is data"),
    ("/_matrix/%2e%2e%2e", F, "three encoded dots"),
    # -- client-chosen strings with /../ inside: an encoded slash is data
    ("/_matrix/client/v3/rooms/!r:hs/send/m.room.message/a%252Fb%2520c%2F..%2Fd", F,
     "txn id 'a%2Fb c/../d' quoted with safe=''"),
    ("/_matrix/client/v3/rooms/!r:hs/state/m.room.topic/https%3A%2F%2Fexample.org%2F..%2Fx", F,
     "state key with /../ inside"),
    ("/_matrix/client/v3/profile/%40a%2F..%2Fb%3Ahs", F, "historical user id with /../"),
    ("/_matrix/client/v3/rooms/!r:hs/send/m.room.message/x%2F..", F,
     "encoded /.. at the end of the path"),
    ("/_matrix/client/v3/rooms/!r:hs/send/m.room.message/x%2F..%2F", F,
     "encoded /../ at the end of the path"),
    ("/_matrix/client/v3/user/%40u%3Ahs/filter/a%2F.%2Fb", F, "encoded /./ inside a parameter"),
    ("/_matrix/a%2f..%2f_palpo/admin", F,
     "read as a careless upstream would, still under /_matrix and not admin"),
    # -- segment boundaries
    ("/_matrixfoo", NF, "not on a segment boundary"),
    ("/_matrix.foo", NF, "not on a segment boundary"),
    ("/_palpo/clientx", NF, "not on a segment boundary"),
    ("/_palpo", NF, "only /_palpo/client is forwarded"),
    ("/_palpo/other", NF, "other Palpo paths"),
    ("/_MATRIX/client/versions", NF, "forward prefixes are case-sensitive"),
    ("/", NF, "root"),
    ("/index.html", NF, "a web page"),
    ("/.well-known/matrix/server", F, "delegation forwarded when [well_known] is absent"),
    ("/.well-known/matrix/client", F, "delegation forwarded when [well_known] is absent"),
    ("/.well-known/other", NF, "other well-known documents"),
    # -- health
    ("/health", HEALTH, "health"),
    ("/health?x=1", HEALTH, "health with a query"),
    ("/%68ealth", HEALTH, "health, decoded"),
    ("/healthz", NF, "not health"),
    # -- admin, every spelling
    ("/_palpo/admin", ADMIN, "admin prefix"),
    ("/_palpo/admin/users", ADMIN, "below the admin prefix"),
    ("/_synapse/admin/v1/users", ADMIN, "Synapse-compatible admin mount"),
    ("/_PALPO/admin", ADMIN, "upper-case"),
    ("/_Palpo/Admin/x", ADMIN, "mixed case"),
    ("/_SYNAPSE/ADMIN/v2/users", ADMIN, "upper-case Synapse spelling"),
    ("/_palpo%2fadmin", ADMIN, "encoded slash"),
    ("/_palpo%2Fadmin/x", ADMIN, "encoded slash upper-case"),
    ("/%5fpalpo/admin", ADMIN, "encoded underscore"),
    ("/_palpo/%61dmin", ADMIN, "encoded letter"),
    ("/_palpo/%41DMIN", ADMIN, "encoded upper-case letter"),
    ("//_palpo/admin", ADMIN, "leading double slash"),
    ("/_palpo//admin", ADMIN, "inner double slash"),
    ("/_palpo/admin/", ADMIN, "trailing slash"),
    ("/_palpo/admin?x=1", ADMIN, "with a query"),
    ("/_palpo;x/admin", ADMIN, "path parameter on the first segment"),
    ("/_palpo/admin;x", ADMIN, "path parameter on the admin segment"),
    ("/_synapse%2Fadmin", ADMIN, "encoded slash, Synapse spelling"),
    ("/_palpo/adminx", NF, "not on a segment boundary: not admin, not forwarded"),
    ("/_palpo%252fadmin", NF, "double-encoded slash is not a slash after one decode"),
    # -- dot segments and other ambiguous targets
    ("/_matrix/../_palpo/admin", BAD, "literal dot-dot"),
    ("/_matrix/./x", BAD, "literal dot"),
    ("/_matrix/..", BAD, "trailing dot-dot"),
    ("/_matrix/.", BAD, "trailing dot"),
    ("/_matrix/%2e%2e/_palpo/admin", BAD, "encoded dot-dot"),
    ("/_matrix/%2E%2E/x", BAD, "encoded dot-dot upper-case"),
    ("/_matrix/.%2e/x", BAD, "half-encoded dot-dot"),
    ("/_matrix/%2e/x", BAD, "encoded dot"),
    ("/_matrix/..;/x", BAD, "dot-dot with an empty parameter"),
    ("/_matrix/..;jsessionid=1/x", BAD, "dot-dot with a parameter"),
    ("/_matrix\\..\\_palpo/admin", BAD, "raw backslash"),
    ("/_matrix/a\\b", BAD, "raw backslash alone"),
    ("/_matrix/%zz", BAD, "invalid escape"),
    ("/_matrix/%2", BAD, "truncated escape"),
    ("/_matrix/%", BAD, "lone percent"),
    ("/_matrix/x#frag", BAD, "fragment"),
    ("/_matrix/%5c..%5c_palpo/admin", BAD, "dot-dot between encoded backslashes"),
    ("/_matrix/..%00/x", BAD, "dot-dot ended by an encoded NUL"),
    ("/_matrix/%00nul", BAD, "encoded NUL: a terminator to some servers"),
    # -- second reading (decode everything, then resolve dot segments)
    ("/_matrix/x%2F..%2F..%2F_palpo%2Fadmin/v1/users", BAD, "second reading lands on admin"),
    ("/_matrix%2F..%2F_palpo/admin", BAD, "encoded slash after the prefix, then admin"),
    ("/_matrix/a%2F..%2F..%2Fetc/passwd", BAD, "second reading climbs out of /_matrix"),
    ("/_matrix/a%2F..%2F..%2F_matrixx", BAD, "second reading leaves /_matrix for a neighbour"),
    ("/_matrix/x//..%2F..%2F_palpo/admin", BAD, "reaches admin once slashes are merged"),
    ("/_matrix/%2F..%2Fx", BAD, "leaves /_matrix once the empty segment is merged away"),
    ("/_matrix/%5c..%5c..%5cx", BAD, "encoded backslashes climb out of /_matrix"),
    ("/_matrix/a%2F..;x%2F..%2Fy", BAD, "dot-dot with a parameter, behind encoded slashes"),
    ("/_palpo/client/a%2F..%2F..%2Fadmin", BAD, "from Palpo's client prefix into its admin"),
    ("/_matrix/a%2F%2e%2E%2F..%2Fsynapse", BAD, "encoded dots behind encoded slashes climb out"),
    ("*", BAD, "asterisk-form with GET"),
]

#: Targets the C parser itself refuses with 400 before the gate sees them.
PARSER_REJECTED = [
    "_matrix/x",  # no leading slash (not origin-form, not absolute-form)
    "/_matrix/caf\xc3\xa9",  # raw non-ASCII bytes
]

#: Absolute-form: the parser accepts it, the gate refuses it (400).
ABSOLUTE_FORM = [
    "http://evil.example/_matrix/client/versions",
    "https://h/_palpo/admin/x",
]
