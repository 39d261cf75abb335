"""The config file (docs/DESIGN.md section 7), as tables.

Values parse once into typed records; a bad document is refused with every
error at once, each naming its TOML key path; ``dump()`` prints a config that
``loads()`` reads back to the same record; ``config.example.toml`` documents
every key of the schema with its default, and loads.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import pathlib
import re
import tomllib
from collections.abc import Callable

import pytest
import trustme

from palpo_gate import config as configmod
from palpo_gate.config import (
    Admin,
    Bind,
    Config,
    ConfigError,
    Forwarding,
    Limits,
    Listener,
    Log,
    Server,
    Upstream,
    dump,
    loads,
    parse_bind,
    parse_duration,
    parse_size,
    parse_upstream_url,
)

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "config.example.toml"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A certificate chain and its key for matrix.example.com, as PEM files."""
    d = tmp_path_factory.mktemp("pem")
    ca = trustme.CA()
    leaf = ca.issue_cert("matrix.example.com", "example.com")
    leaf.private_key_pem.write_to_path(str(d / "privkey.pem"))
    (d / "fullchain.pem").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    return {"cert": str(d / "fullchain.pem"), "key": str(d / "privkey.pem")}


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loads(text)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


# -- durations and sizes -----------------------------------------------------------------

DURATIONS = [
    ("500ms", 0.5),
    ("30s", 30.0),
    ("2m", 120.0),
    ("1h", 3600.0),
    ("1.5s", 1.5),
    ("250 ms", 0.25),
    (" 10s ", 10.0),
    (1.5, 1.5),
    (30, 30.0),
    (0.001, 0.001),
]


@pytest.mark.parametrize(("raw", "seconds"), DURATIONS, ids=[repr(r) for r, _ in DURATIONS])
def test_parse_duration(raw: object, seconds: float) -> None:
    parsed = parse_duration(raw)
    assert isinstance(parsed, float)
    assert parsed == pytest.approx(seconds)


BAD_DURATIONS = [0, -1, "0s", "-5s", "30", "30sec", "s", "", "1d", "1.5.2s", "ms30",
                 True, False, None, [30], {"s": 30}, float("inf"), float("nan")]


@pytest.mark.parametrize("raw", BAD_DURATIONS, ids=[repr(r) for r in BAD_DURATIONS])
def test_parse_duration_refuses(raw: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(raw)


SIZES = [
    ("50M", 50 * MiB),
    ("50MiB", 50 * MiB),
    ("50mib", 50 * MiB),
    ("50MB", 50_000_000),
    ("1G", 1024**3),
    ("1GiB", 1024**3),
    ("1GB", 1_000_000_000),
    ("512K", 512 * 1024),
    ("512KB", 512_000),
    ("1T", 1024**4),
    ("1.5M", 3 * MiB // 2),
    ("50 M", 50 * MiB),
    ("100", 100),
    (0, 0),
    (1, 1),
    (52428800, 50 * MiB),
]


@pytest.mark.parametrize(("raw", "size"), SIZES, ids=[repr(r) for r, _ in SIZES])
def test_parse_size(raw: object, size: int) -> None:
    parsed = parse_size(raw)
    assert type(parsed) is int
    assert parsed == size


BAD_SIZES = [-1, "-1M", "50X", "50Mi", "M", "", "fifty", "1.2.3M", "50MiBs", 1.5,
             True, None, ["50M"]]


@pytest.mark.parametrize("raw", BAD_SIZES, ids=[repr(r) for r in BAD_SIZES])
def test_parse_size_refuses(raw: object) -> None:
    with pytest.raises(ValueError):
        parse_size(raw)


# -- binds and upstream URLs -------------------------------------------------------------

BINDS = [
    ("0.0.0.0:443", Bind("tcp", host="0.0.0.0", port=443)),
    ("127.0.0.1:8080", Bind("tcp", host="127.0.0.1", port=8080)),
    ("127.0.0.1:0", Bind("tcp", host="127.0.0.1", port=0)),
    ("localhost:8448", Bind("tcp", host="localhost", port=8448)),
    ("[::]:8448", Bind("tcp", host="::", port=8448)),
    ("[::1]:443", Bind("tcp", host="::1", port=443)),
    ("[2001:db8::1]:65535", Bind("tcp", host="2001:db8::1", port=65535)),
    ("unix:/run/palpo-gate/client.sock", Bind("unix", path="/run/palpo-gate/client.sock")),
    ("unix:@abstract", Bind("unix", path="@abstract")),
    ("systemd:client", Bind("systemd", path="client")),
    ("systemd:fed-8448", Bind("systemd", path="fed-8448")),
]


@pytest.mark.parametrize(("raw", "bind"), BINDS, ids=[r for r, _ in BINDS])
def test_parse_bind(raw: str, bind: Bind) -> None:
    assert parse_bind(raw) == bind
    assert str(parse_bind(raw)) == raw  # printed back as written


BAD_BINDS = [
    "0.0.0.0",  # no port
    "[::1]",  # no port
    "::1:443",  # IPv6 without brackets
    "[::1:443",  # unbalanced
    "[host]:443",  # not an IPv6 address
    "[::1]443",
    ":443",  # no host
    "0.0.0.0:65536",
    "0.0.0.0:-1",
    "0.0.0.0:https",
    "my host:443",
    "unix:relative.sock",
    "unix:",
    "systemd:",
    "systemd:bad name",
    "",
    443,
    None,
]


UPSTREAMS = [
    ("http://127.0.0.1:8008", ("tcp", "127.0.0.1", 8008, "")),
    ("http://127.0.0.1:8008/", ("tcp", "127.0.0.1", 8008, "")),
    ("http://palpo:8008", ("tcp", "palpo", 8008, "")),
    ("http://palpo", ("tcp", "palpo", 80, "")),
    ("http://[::1]:8008", ("tcp", "::1", 8008, "")),
    ("unix:/run/palpo/palpo.sock", ("unix", "", 0, "/run/palpo/palpo.sock")),
]


@pytest.mark.parametrize(("raw", "parsed"), UPSTREAMS, ids=[r for r, _ in UPSTREAMS])
def test_parse_upstream_url(raw: str, parsed: tuple[str, str, int, str]) -> None:
    assert parse_upstream_url(raw) == parsed


BAD_UPSTREAMS = [
    "https://127.0.0.1:8008",  # the upstream speaks plain HTTP
    "ftp://palpo:21",
    "127.0.0.1:8008",
    "http://",
    "http://:8008",
    "http://palpo:8008/_matrix",  # a path would change every target
    "http://palpo:8008?x=1",
    "http://palpo:8008#x",
    "http://palpo:99999",
    "http://::1:8008",
    "unix:palpo.sock",
    8008,
    None,
]


@pytest.mark.parametrize(("parse", "raw"), [
    *[pytest.param(parse_bind, raw, id=f"bind {raw!r}") for raw in BAD_BINDS],
    *[pytest.param(parse_upstream_url, raw, id=f"upstream {raw!r}") for raw in BAD_UPSTREAMS]])
def test_parse_bind_and_upstream_url_refuse(parse: Callable[[object], object],
                                            raw: object) -> None:
    with pytest.raises(ValueError):
        parse(raw)


# -- loads(): one bad document, one error, with its key path ----------------------------

L0 = '[[listeners]]\nname = "a"\nbind = "127.0.0.1:0"\n'
L1 = '[[listeners]]\nname = "b"\nbind = "127.0.0.1:1"\n'
TLS0 = L0 + '[listeners.tls]\ncert = "{cert}"\nkey = "{key}"\n'
SNI0 = TLS0 + '[[listeners.tls.sni]]\nnames = ["other.test"]\ncert = "{cert}"\nkey = "{key}"\n'
WK = '[well_known]\nserver = "matrix.example.com:443"\n'

BAD_CONFIGS: list[tuple[str, str, str, str]] = [
    # (id, document, key path, part of the message)
    # -- values that parse but cannot work
    ("empty hosts", L0 + "hosts = []\n", "listeners[0].hosts", "every request would get 421"),
    ("request id as Content-Length", "[forwarding]\nrequest_id_header = 'Content-Length'\n",
     "forwarding.request_id_header", "frames or sets itself"),
    ("request id as X-Forwarded-For", "[forwarding]\nrequest_id_header = 'x-forwarded-for'\n",
     "forwarding.request_id_header", "frames or sets itself"),
    ("client URL with a space", "[well_known]\nclient = 'https://x/ y'\n",
     "well_known.client", "expected an http:// or https:// URL"),
    # -- unknown keys, at every level
    ("top", "bogus = 1\n", "bogus", "unknown key"),
    ("top-table", "[logging]\nlevel = 'info'\n", "logging", "unknown key"),
    ("server", "[server]\nwrokers = 2\n", "server.wrokers",
     "unknown key (did you mean 'workers'?)"),
    ("upstream", "[upstream]\ntimeout = 5\n", "upstream.timeout", "unknown key"),
    ("listeners[0]", L0 + "port = 1\n", "listeners[0].port", "unknown key"),
    ("listeners[1]", L0 + L1 + "rol = 'client'\n", "listeners[1].rol",
     "unknown key (did you mean 'role'?)"),
    ("listeners[0].tls", TLS0 + "ciphers = 'HIGH'\n", "listeners[0].tls.ciphers",
     "unknown key"),
    ("listeners[0].tls.sni[0]", SNI0 + "name = 'x'\n", "listeners[0].tls.sni[0].name",
     "unknown key"),
    ("listeners[0].tls.sni[1]",
     SNI0 + '[[listeners.tls.sni]]\nnames = ["c.test"]\ncert = "{cert}"\nkey = "{key}"\nx = 1\n',
     "listeners[0].tls.sni[1].x", "unknown key"),
    ("well_known", WK + "m_server = 'x'\n", "well_known.m_server", "unknown key"),
    ("admin", "[admin]\nallow = []\n", "admin.allow", "unknown key"),
    ("limits", "[limits]\nmax_body = 1\n", "limits.max_body", "unknown key"),
    ("forwarding", "[forwarding]\ntrusted_proxy = []\n", "forwarding.trusted_proxy",
     "unknown key"),
    ("log", "[log]\nformat = 'json'\n", "log.format", "unknown key"),
    ("metrics", "[metrics]\nport = 9108\n", "metrics.port", "unknown key"),
    # -- wrong types
    ("server not a table", "server = 5\n", "server", "expected a table"),
    ("workers string", "[server]\nworkers = '2'\n", "server.workers", "expected an integer"),
    ("workers bool", "[server]\nworkers = true\n", "server.workers", "expected an integer"),
    ("pool_size float", "[upstream]\npool_size = 1.5\n", "upstream.pool_size",
     "expected an integer"),
    ("url number", "[upstream]\nurl = 8008\n", "upstream.url", "expected"),
    ("listeners table", "[listeners]\nname = 'a'\n", "listeners", "expected an array"),
    ("listener not a table", "listeners = [1]\n", "listeners[0]", "expected a table"),
    ("tls string", L0 + "tls = 'on'\n", "listeners[0].tls", "expected a table"),
    ("sni table", TLS0 + "sni = 'x'\n", "listeners[0].tls.sni", "expected an array"),
    ("strict_sni string", TLS0 + "strict_sni = 'yes'\n", "listeners[0].tls.strict_sni",
     "expected true or false"),
    ("prefixes string", L0 + "prefixes = '/_matrix'\n", "listeners[0].prefixes",
     "expected a list"),
    ("hosts string", L0 + "hosts = 'matrix.example.com'\n", "listeners[0].hosts",
     "expected a list"),
    ("allow_from string", "[admin]\nallow_from = '127.0.0.1'\n", "admin.allow_from",
     "expected a list"),
    ("trusted_proxies number", "[forwarding]\ntrusted_proxies = 10\n",
     "forwarding.trusted_proxies", "expected a list"),
    ("client_extra string", WK + "client_extra = 'x'\n", "well_known.client_extra",
     "expected a table"),
    ("max_body_size float", "[limits]\nmax_body_size = 1.5\n", "limits.max_body_size",
     "expected a size"),
    ("header_timeout bool", "[limits]\nheader_timeout = true\n", "limits.header_timeout",
     "expected a duration"),
    # -- bad values
    ("workers 0", "[server]\nworkers = 0\n", "server.workers", "from 1 to 256"),
    ("drain_timeout", "[server]\ndrain_timeout = 'soon'\n", "server.drain_timeout",
     "invalid duration"),
    ("https upstream", "[upstream]\nurl = 'https://palpo:8448'\n", "upstream.url",
     "plain HTTP"),
    ("upstream path", "[upstream]\nurl = 'http://palpo:8008/matrix'\n", "upstream.url",
     "no path"),
    ("connect_timeout 0", "[upstream]\nconnect_timeout = 0\n", "upstream.connect_timeout",
     "greater than zero"),
    ("read_timeout unit", "[upstream]\nread_timeout = '2d'\n", "upstream.read_timeout",
     "invalid duration"),
    ("pool_size negative", "[upstream]\npool_size = -1\n", "upstream.pool_size",
     "expected an integer"),
    ("no listeners", "listeners = []\n", "listeners", "at least one listener"),
    ("bind missing", '[[listeners]]\nname = "a"\n', "listeners[0].bind", "required"),
    ("bind without port", '[[listeners]]\nname = "a"\nbind = "0.0.0.0"\n',
     "listeners[0].bind", "port is required"),
    ("bind v6 without brackets", '[[listeners]]\nbind = "::1:443"\n', "listeners[0].bind",
     "brackets"),
    ("name empty", '[[listeners]]\nname = ""\nbind = "127.0.0.1:0"\n', "listeners[0].name",
     "non-empty string"),
    ("role", L0 + "role = 'admin'\n", "listeners[0].role",
     "expected one of 'client', 'federation'"),
    ("prefix relative", L0 + "prefixes = ['_matrix']\n", "listeners[0].prefixes[0]",
     "starting with '/'"),
    ("prefix encoded", L0 + "prefixes = ['/_matrix', '/a%2Fb']\n", "listeners[0].prefixes[1]",
     "decoded"),
    ("prefix dot-dot", L0 + "prefixes = ['/_matrix/../x']\n", "listeners[0].prefixes[0]",
     "'..'"),
    ("host with port", L0 + "hosts = ['matrix.example.com:443']\n", "listeners[0].hosts[0]",
     "without a port"),
    ("sni without names",
     TLS0 + '[[listeners.tls.sni]]\ncert = "{cert}"\nkey = "{key}"\n',
     "listeners[0].tls.sni[0].names", "required"),
    ("sni bad name", SNI0.replace('"other.test"', '"other.test", "other.test:443"'),
     "listeners[0].tls.sni[0].names[1]", "without a port"),
    ("duplicate name", L0 + L1.replace('"b"', '"a"'), "listeners[1].name",
     "'a' is used by another listener"),
    ("duplicate bind", L0.replace(":0", ":8443") + L1.replace(":1", ":8443"),
     "listeners[1].bind", "127.0.0.1:8443 is used by another listener"),
    ("well_known empty", "[well_known]\n", "well_known", "set server, client or both"),
    ("well_known server URL", "[well_known]\nserver = 'https://matrix.example.com'\n",
     "well_known.server", "host:port"),
    ("well_known client bare", "[well_known]\nclient = 'matrix.example.com'\n",
     "well_known.client", "http:// or https:// URL"),
    ("identity_server bare", WK + "identity_server = 'identity.example.com'\n",
     "well_known.identity_server", "http:// or https:// URL"),
    ("client_extra m.homeserver",
     WK + '[well_known.client_extra]\n"m.homeserver" = {{ base_url = "https://x" }}\n',
     "well_known.client_extra.m.homeserver", "set by well_known.client"),
    ("blocked prefix", "[admin]\nblocked_prefixes = ['/_palpo/admin', 'admin']\n",
     "admin.blocked_prefixes[1]", "starting with '/'"),
    ("allow_from", "[admin]\nallow_from = ['10.0.0.0/8', '10.0.0.300']\n",
     "admin.allow_from[1]", "not an IP address or CIDR"),
    ("max_body_size", "[limits]\nmax_body_size = '50 megabytes'\n", "limits.max_body_size",
     "invalid size"),
    ("max_body_size negative", "[limits]\nmax_body_size = -1\n", "limits.max_body_size",
     "negative"),
    ("idle_timeout", "[limits]\nidle_timeout = -5\n", "limits.idle_timeout",
     "greater than zero"),
    ("body_timeout", "[limits]\nbody_timeout = '60'\n", "limits.body_timeout",
     "invalid duration"),
    ("max_header_size small", "[limits]\nmax_header_size = 512\n", "limits.max_header_size",
     "from 1024"),
    ("max_header_size large", "[limits]\nmax_header_size = '2M'\n", "limits.max_header_size",
     "from 1024"),
    ("trusted proxy", "[forwarding]\ntrusted_proxies = ['proxy.local']\n",
     "forwarding.trusted_proxies[0]", "not an IP address or CIDR"),
    ("trusted proxy hint", "[forwarding]\ntrusted_proxies = ['unix']\n",
     "forwarding.trusted_proxies[0]", '(or "unix:" for peers on a UNIX-socket listener)'),
    ("trusted proxy socket path",
     "[forwarding]\ntrusted_proxies = ['10.0.0.0/8', 'unix:/run/nginx.sock']\n",
     "forwarding.trusted_proxies[1]", 'write "unix:" alone'),
    ("trusted proxy UNIX in caps", "[forwarding]\ntrusted_proxies = ['UNIX:']\n",
     "forwarding.trusted_proxies[0]", "not an IP address or CIDR"),
    ("trusted proxy number", "[forwarding]\ntrusted_proxies = [10]\n",
     "forwarding.trusted_proxies[0]", "expected a CIDR string"),
    ("metrics bind = a listener's",
     L0 + "[[listeners]]\nname = 'f'\nbind = '[::]:8448'\n[metrics]\nbind = '[::]:8448'\n",
     "metrics.bind", "[::]:8448 is also listeners[1].bind"),
    ("metrics bind = the default listener's", "[metrics]\nbind = '127.0.0.1:8080'\n",
     "metrics.bind", "is also listeners[0].bind"),
    ("metrics bind = a UNIX listener's",
     L0 + "[[listeners]]\nname = 'u'\nbind = 'unix:/run/g.sock'\n"
     "[metrics]\nbind = 'unix:/run/g.sock'\n",
     "metrics.bind", "unix:/run/g.sock is also listeners[1].bind"),
    ("request_id_header", "[forwarding]\nrequest_id_header = 'X Request ID'\n",
     "forwarding.request_id_header", "header name"),
    ("buffer_chunked_uploads", "[forwarding]\nbuffer_chunked_uploads = 'yes'\n",
     "forwarding.buffer_chunked_uploads", "expected true or false"),
    ("log level", "[log]\nlevel = 'verbose'\n", "log.level", "expected one of"),
    ("log access", "[log]\naccess = 'xml'\n", "log.access", "'plain', 'json', 'off'"),
    ("metrics bind", "[metrics]\nbind = '9108'\n", "metrics.bind", "port is required"),
]


@pytest.mark.parametrize(("text", "path", "message"), [r[1:] for r in BAD_CONFIGS],
                         ids=[r[0] for r in BAD_CONFIGS])
def test_bad_config_names_its_key_path(pem: dict[str, str], text: str, path: str,
                                       message: str) -> None:
    errors = errors_of(text.format(**pem))
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{path}: "), errors
    assert message in errors[0][len(path) + 2:], errors


def test_invalid_toml_names_the_source() -> None:
    with pytest.raises(ConfigError) as info:
        loads("[server\nworkers = 1\n", "/etc/palpo-gate/config.toml")
    [error] = info.value.errors
    assert error.startswith("/etc/palpo-gate/config.toml: invalid TOML")


def test_missing_certificate_files(tmp_path: pathlib.Path) -> None:
    cert, key = tmp_path / "nope" / "fullchain.pem", tmp_path / "nope" / "privkey.pem"
    errors = errors_of(L0 + L1 + f'[listeners.tls]\ncert = "{cert}"\nkey = "{key}"\n'
                       f'[[listeners.tls.sni]]\nnames = ["x.test"]\ncert = "{cert}"\n'
                       f'key = "{key}"\n')
    assert sorted(errors) == sorted([
        f"listeners[1].tls.cert: {cert}: file not found",
        f"listeners[1].tls.key: {key}: file not found",
        f"listeners[1].tls.sni[0].cert: {cert}: file not found",
        f"listeners[1].tls.sni[0].key: {key}: file not found",
    ])


def test_all_errors_are_reported_at_once(tmp_path: pathlib.Path) -> None:
    text = f"""
colour = "blue"
[server]
workers = 0
[upstream]
url = "https://palpo:8448"
read_timeout = "forever"
[[listeners]]
name = "a"
bind = "0.0.0.0"
role = "relay"
[listeners.tls]
cert = "{tmp_path}/missing.pem"
key = "{tmp_path}/missing.key"
[[listeners]]
name = "a"
bind = "0.0.0.0:443"
prefix = ["/_matrix"]
[admin]
allow_from = ["everyone"]
[limits]
max_body_size = "lots"
[forwarding]
request_id_header = ""
[log]
level = "loud"
[metrics]
bind = "localhost"
"""
    errors = errors_of(text)
    expected_paths = [
        "colour", "server.workers", "upstream.url", "upstream.read_timeout",
        "listeners[0].bind", "listeners[0].role", "listeners[0].tls.cert",
        "listeners[0].tls.key", "listeners[1].prefix", "listeners[1].name",
        "admin.allow_from[0]", "limits.max_body_size", "forwarding.request_id_header",
        "log.level", "metrics.bind",
    ]
    for path in expected_paths:
        assert any(e.startswith(f"{path}: ") for e in errors), (path, errors)
    assert len(errors) == len(expected_paths), errors


# -- defaults ----------------------------------------------------------------------------

#: docs/DESIGN.md sections 1 and 7, written out rather than taken from the dataclasses,
#: so that a changed default fails here.
SPEC_DEFAULT = Config(
    server=Server(workers=1, drain_timeout=10.0),
    upstream=Upstream(url="http://127.0.0.1:8008", kind="tcp", host="127.0.0.1", port=8008,
                      path="", connect_timeout=5.0, read_timeout=120.0, pool_size=64),
    listeners=(Listener(name="dev", bind=Bind("tcp", host="127.0.0.1", port=8080),
                        role="client", prefixes=("/_matrix", "/_palpo/client"),
                        hosts=None, tls=None),),
    well_known=None,
    admin=Admin(blocked_prefixes=("/_palpo/admin", "/_synapse/admin"), allow_from=()),
    limits=Limits(max_body_size=50 * MiB, header_timeout=30.0, body_timeout=60.0,
                  idle_timeout=75.0),
    forwarding=Forwarding(trusted_proxies=(), request_id_header="X-Request-ID",
                          buffer_chunked_uploads=False),
    log=Log(level="info", access="plain"),
    metrics=None,
    source="<string>",
)


def test_empty_document_is_the_dev_proxy() -> None:
    assert loads("") == SPEC_DEFAULT


def test_no_config_file_is_the_dev_proxy() -> None:
    assert configmod.load(None) == dataclasses.replace(SPEC_DEFAULT,
                                                       source="<built-in default>")


def test_empty_sections_are_the_defaults() -> None:
    text = "[server]\n[upstream]\n[admin]\n[limits]\n[forwarding]\n[log]\n"
    assert loads(text) == SPEC_DEFAULT


def test_listener_defaults() -> None:
    cfg = loads('[[listeners]]\nbind = "[::]:8448"\nrole = "federation"\n'
                '[[listeners]]\nname = "c"\nbind = "unix:/run/c.sock"\n')
    fed, client = cfg.listeners
    assert fed == Listener(name="listener0", bind=Bind("tcp", host="::", port=8448),
                           role="federation", prefixes=("/_matrix",), hosts=None, tls=None)
    assert client.role == "client"
    assert client.prefixes == ("/_matrix", "/_palpo/client")
    # the other sections keep their defaults when only listeners are given
    assert dataclasses.replace(cfg, listeners=SPEC_DEFAULT.listeners) == SPEC_DEFAULT


def test_metrics_default_bind_is_loopback() -> None:
    cfg = loads("[metrics]\n")
    assert cfg.metrics is not None
    assert cfg.metrics.bind == Bind("tcp", host="127.0.0.1", port=9108)


def test_values_are_parsed_once_at_load(pem: dict[str, str]) -> None:
    cfg = loads(f"""
[upstream]
url = "unix:/run/palpo/palpo.sock"
read_timeout = "2m"
[[listeners]]
name = "web"
bind = "[::]:443"
hosts = ["Matrix.Example.COM.", "[::1]"]
[listeners.tls]
cert = "{pem['cert']}"
key = "{pem['key']}"
[admin]
blocked_prefixes = ["/_Palpo/Admin/", "/_synapse/admin"]
allow_from = ["127.0.0.1", "10.1.2.3/8", "::1"]
[limits]
max_body_size = "100MB"
header_timeout = "500ms"
max_header_size = "64K"
[forwarding]
trusted_proxies = ["172.16.0.0/12", "unix:"]
""")
    assert cfg.upstream.kind == "unix" and cfg.upstream.path == "/run/palpo/palpo.sock"
    assert cfg.upstream.read_timeout == 120.0
    assert cfg.listeners[0].hosts == frozenset({"matrix.example.com", "[::1]"})
    assert cfg.admin.blocked_prefixes == ("/_palpo/admin", "/_synapse/admin")
    assert cfg.admin.allow_from == (ipaddress.ip_network("127.0.0.1/32"),
                                    ipaddress.ip_network("10.0.0.0/8"),
                                    ipaddress.ip_network("::1/128"))
    assert cfg.limits.max_body_size == 100_000_000
    assert cfg.limits.header_timeout == 0.5
    assert cfg.limits.max_header_size == 64 * 1024
    assert cfg.forwarding.trusted_proxies == (ipaddress.ip_network("172.16.0.0/12"),
                                              configmod.UNIX_PEER)


# -- dump() round trip -------------------------------------------------------------------

RICH = """
[server]
workers = 4
drain_timeout = "30s"

[upstream]
url = "unix:/run/palpo/palpo.sock"
connect_timeout = "1500ms"
read_timeout = "3m"
pool_size = 0

[[listeners]]
name = "client"
bind = "[::]:443"
role = "client"
hosts = ["matrix.example.com", "example.com"]
[listeners.tls]
cert = "{cert}"
key = "{key}"
strict_sni = true
[[listeners.tls.sni]]
names = ["other.test", "Upper.Test."]
cert = "{cert}"
key = "{key}"
[[listeners.tls.sni]]
names = ["third.test"]
cert = "{cert}"
key = "{key}"

[[listeners]]
name = "federation"
bind = "0.0.0.0:8448"
role = "federation"
prefixes = ["/_matrix/federation", "/_matrix/key/"]

[[listeners]]
name = "local"
bind = "unix:/run/palpo-gate/client.sock"
prefixes = ["/"]
hosts = ["localhost"]

[[listeners]]
name = "activated"
bind = "systemd:https"

[well_known]
server = "matrix.example.com:443"
client = "https://matrix.example.com"
identity_server = "https://identity.example.com"
[well_known.client_extra]
"io.element.e2ee" = {{ default = false, secure_backup_required = true }}
"org.example.list" = [1, 2, 3]
"org.example.text" = "Grüße, \\"quoted\\" and back\\\\slash"
"org.example.number" = 1.25

[admin]
blocked_prefixes = ["/_palpo/admin", "/_synapse/admin", "/_matrix/client/v3/admin"]
allow_from = ["127.0.0.1/32", "::1", "10.0.0.0/8"]

[limits]
max_body_size = "1G"
header_timeout = "10s"
body_timeout = 2.5
idle_timeout = "1h"

[forwarding]
trusted_proxies = ["172.16.0.0/12", "unix:", "fd00::/8"]
request_id_header = "X-Correlation-ID"
buffer_chunked_uploads = true

[log]
level = "debug"
access = "json"

[metrics]
bind = "[::1]:9108"
"""


def _round_trip(cfg: Config) -> None:
    text = dump(cfg)
    again = loads(text, "<dumped>")
    assert again == dataclasses.replace(cfg, source="<dumped>")
    assert dump(again).splitlines()[1:] == text.splitlines()[1:]  # stable


def test_dump_round_trips_the_default() -> None:
    _round_trip(loads(""))
    _round_trip(configmod.load(None))


def test_dump_round_trips_a_rich_config(pem: dict[str, str]) -> None:
    cfg = loads(RICH.format(**pem))
    assert len(cfg.listeners) == 4 and cfg.metrics is not None  # the document is all there
    _round_trip(cfg)


def test_dump_names_the_source() -> None:
    assert dump(loads("", "/etc/palpo-gate/config.toml")).startswith(
        "# effective configuration from /etc/palpo-gate/config.toml\n")


def test_dump_shows_the_effective_prefixes() -> None:
    text = dump(loads('[[listeners]]\nbind = "0.0.0.0:8448"\nrole = "federation"\n'))
    assert 'prefixes = ["/_matrix"]' in text


ODD_DURATIONS = ["1234567", "0.1234567", '"1000000s"']


@pytest.mark.parametrize("raw", ODD_DURATIONS)
def test_dump_round_trips_any_duration(raw: str) -> None:
    # `palpo-gate check` prints dump(); what it prints must read back the same
    _round_trip(loads(f"[upstream]\nread_timeout = {raw}\n"))


ODD_EXTRA = [
    pytest.param('"motd" = "line one\\nline two"', id="newline in a value"),
    pytest.param('"motd" = "bell\\u0007"', id="control character in a value"),
    pytest.param('"org.example.\\"q\\"" = 1', id="quote in a key"),
]


@pytest.mark.parametrize("line", ODD_EXTRA)
def test_dump_round_trips_any_client_extra(line: str) -> None:
    _round_trip(loads(WK + f"[well_known.client_extra]\n{line}\n"))


# -- config.example.toml -----------------------------------------------------------------

EXAMPLE_CERT = "/etc/palpo-gate/tls/fullchain.pem"
EXAMPLE_KEY = "/etc/palpo-gate/tls/privkey.pem"


def test_example_only_lacks_certificate_files() -> None:
    with pytest.raises(ConfigError) as info:
        loads(EXAMPLE.read_text(encoding="utf-8"), str(EXAMPLE))
    errors = info.value.errors
    assert errors
    for error in errors:
        assert re.fullmatch(r"listeners\[\d+\]\.tls\.(cert|key): \S+: file not found", error), \
            error


def _example_with(pem: dict[str, str]) -> str:
    text = EXAMPLE.read_text(encoding="utf-8")
    assert EXAMPLE_CERT in text and EXAMPLE_KEY in text
    return text.replace(EXAMPLE_CERT, pem["cert"]).replace(EXAMPLE_KEY, pem["key"])


def test_example_loads_with_real_certificates(pem: dict[str, str]) -> None:
    from palpo_gate.generation import ssl_contexts

    cfg = loads(_example_with(pem), str(EXAMPLE))
    assert [(lst.name, str(lst.bind), lst.role) for lst in cfg.listeners] == [
        ("client", "0.0.0.0:443", "client"), ("federation", "0.0.0.0:8448", "federation")]
    contexts = ssl_contexts(cfg)
    assert sorted(contexts) == ["client", "federation"]
    _round_trip(cfg)


def test_example_shows_the_defaults(pem: dict[str, str]) -> None:
    # "Every config key is documented ... in config.example.toml, with its default."
    cfg = loads(_example_with(pem))
    for section in ("server", "upstream", "admin", "limits", "forwarding", "log"):
        assert getattr(cfg, section) == getattr(SPEC_DEFAULT, section), section
    assert cfg.listeners[0].tls is not None and cfg.listeners[0].tls.strict_sni is False
    assert cfg.listeners[0].prefixes == ("/_matrix", "/_palpo/client")
    assert cfg.listeners[1].prefixes == ("/_matrix",)
    _, commented = _example_keys()
    assert commented[("listeners", "prefixes")] == '["/_matrix", "/_palpo/client"]'
    assert commented[("metrics", "bind")] == '"127.0.0.1:9108"'


#: Every section and key of the config schema (docs/DESIGN.md section 7, config.example.toml).
SPEC_KEYS: dict[str, tuple[str, ...]] = {
    "server": ("workers", "drain_timeout"),
    "upstream": ("url", "connect_timeout", "read_timeout", "pool_size"),
    "listeners": ("name", "bind", "role", "prefixes", "hosts"),
    "listeners.tls": ("cert", "key", "strict_sni", "acme"),
    "listeners.tls.sni": ("names", "cert", "key"),
    "well_known": ("server", "client", "identity_server"),
    "well_known.client_extra": (),
    "admin": ("blocked_prefixes", "allow_from"),
    "limits": ("max_body_size", "header_timeout", "body_timeout", "idle_timeout",
               "max_header_size"),
    "forwarding": ("trusted_proxies", "request_id_header"),
    "log": ("level", "access"),
    "metrics": ("bind",),
    "acme": ("directory", "email", "domains", "state_dir", "ca_bundle", "challenge",
             "renew_before"),
}

_HEADER_RE = re.compile(r"^\[\[?\s*([A-Za-z0-9_.]+)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(r"^([A-Za-z0-9_-]+)\s*=\s*(.*?)\s*(#.*)?$")


def _example_keys() -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    """Sections and keys of the example, the commented-out ones included."""
    sections: dict[str, set[str]] = {}
    values: dict[tuple[str, str], str] = {}
    current = ""
    for raw in EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        while line.startswith("#"):
            line = line[1:].strip()
        if m := _HEADER_RE.match(line):
            current = m.group(1)
            sections.setdefault(current, set())
        elif (m := _KEY_RE.match(line)) and current:
            sections[current].add(m.group(1))
            values.setdefault((current, m.group(1)), m.group(2))
    return sections, values


def test_example_parser_sees_commented_keys() -> None:
    sections, _ = _example_keys()
    assert "metrics" in sections and "listeners.tls.sni" in sections
    assert tomllib.loads(EXAMPLE.read_text(encoding="utf-8")).get("metrics") is None


@pytest.mark.parametrize("section", list(SPEC_KEYS))
def test_example_documents_every_spec_key(section: str) -> None:
    sections, _ = _example_keys()
    assert section in sections, f"[{section}] is not in config.example.toml"
    missing = set(SPEC_KEYS[section]) - sections[section]
    assert not missing, f"[{section}] lacks {sorted(missing)} in config.example.toml"


# -- [acme] (docs/DESIGN.md section 8) ---------------------------------------------------------

PLAIN = '[[listeners]]\nname = "web"\nbind = "127.0.0.1:8080"\n'
ACME_TLS = '[[listeners]]\nname = "tls"\nbind = "127.0.0.1:8443"\n[listeners.tls]\nacme = true\n'


def _acme(state_dir: pathlib.Path, **keys: str) -> str:
    lines = {"domains": '["matrix.example.com"]', "state_dir": f'"{state_dir}"', **keys}
    return "[acme]\n" + "".join(f"{k} = {v}\n" for k, v in lines.items() if v)


def test_acme_defaults(tmp_path: pathlib.Path) -> None:
    cfg = loads(PLAIN + ACME_TLS + _acme(tmp_path / "acme"))
    assert cfg.acme == configmod.Acme(
        domains=("matrix.example.com",), directory=configmod.LETS_ENCRYPT, email=None,
        state_dir=str(tmp_path / "acme"), ca_bundle=None, challenge="http-01",
        renew_before=30 * 86400.0)
    tls = cfg.listeners[1].tls
    assert tls is not None and tls.acme and tls.cert == "" and tls.key == ""
    assert configmod.Acme(domains=()).state_dir == "/var/lib/palpo-gate/acme"
    _round_trip(cfg)


def test_acme_values_parse(tmp_path: pathlib.Path, pem: dict[str, str]) -> None:
    cfg = loads(ACME_TLS + f'cert = "{pem["cert"]}"\nkey = "{pem["key"]}"\n' + _acme(
        tmp_path, domains='["Matrix.Example.com.", "example.com"]',
        directory='"https://ca.test:14000/dir"', email='"admin@example.com"',
        ca_bundle=f'"{pem["cert"]}"', challenge='"tls-alpn-01"', renew_before='"10d"'))
    assert cfg.acme is not None
    assert cfg.acme.domains == ("matrix.example.com", "example.com")
    assert (cfg.acme.directory, cfg.acme.email, cfg.acme.ca_bundle, cfg.acme.challenge,
            cfg.acme.renew_before) == ("https://ca.test:14000/dir", "admin@example.com",
                                       pem["cert"], "tls-alpn-01", 10 * 86400.0)
    assert cfg.listeners[0].tls is not None and cfg.listeners[0].tls.cert == pem["cert"]
    _round_trip(cfg)


def _domains(listed: str) -> str:
    """An [acme] section whose domains are *listed*."""
    return PLAIN + ACME_TLS + "[acme]\ndomains = [" + listed + "]\nstate_dir = '{tmp}'\n"


#: A valid [acme] section for a.example; a bad key is added after it.
ACME_A = _domains("'a.example'")

BAD_ACME = [
    ("acme = true without [acme]", PLAIN + ACME_TLS, "listeners[1].tls.acme",
     "there is no [acme] section"),
    ("no domains", PLAIN + ACME_TLS + "[acme]\nstate_dir = '{tmp}'\n", "acme.domains",
     "required"),
    ("empty domains", PLAIN + ACME_TLS + "[acme]\ndomains = []\nstate_dir = '{tmp}'\n",
     "acme.domains", "at least one DNS name"),
    ("domain not a DNS name", _domains("'matrix example'"), "acme.domains[0]", "not a DNS name"),
    ("domain with a port", _domains("'example.com:443'"), "acme.domains[0]", "not a DNS name"),
    ("single-label domain", _domains("'localhost'"), "acme.domains[0]", "not a DNS name"),
    ("wildcard domain", _domains("'*.example.com'"), "acme.domains[0]", "dns-01"),
    ("IP address domain", _domains("'192.0.2.1'"), "acme.domains[0]", "IP address"),
    ("domain twice", _domains("'a.example', 'A.example.'"), "acme.domains[1]", "listed twice"),
    ("plain http directory", ACME_A + "directory = 'http://ca.example/dir'\n", "acme.directory",
     "https://"),
    ("directory not a URL", ACME_A + "directory = 'letsencrypt'\n", "acme.directory", "https://"),
    ("directory with a bad port", ACME_A + "directory = 'https://ca.example:99999/dir'\n",
     "acme.directory", "https://"),
    ("state_dir under a file", PLAIN + ACME_TLS + "[acme]\ndomains = ['a.example']\n"
     "state_dir = '{file}/acme'\n", "acme.state_dir", "is not a directory"),
    ("state_dir relative", PLAIN + ACME_TLS + "[acme]\ndomains = ['a.example']\n"
     "state_dir = 'acme'\n", "acme.state_dir", "absolute"),
    ("ca_bundle missing", ACME_A + "ca_bundle = '{tmp}/none.pem'\n", "acme.ca_bundle", "not found"),
    ("ca_bundle not PEM", ACME_A + "ca_bundle = '{file}'\n", "acme.ca_bundle", "not a PEM bundle"),
    ("challenge dns-01", ACME_A + "challenge = 'dns-01'\n", "acme.challenge", "'http-01'"),
    ("http-01 without a plain listener", ACME_TLS + "[acme]\ndomains = ['a.example']\n"
     "state_dir = '{tmp}'\n", "acme.challenge", "plain-HTTP listener"),
    ("bad renew_before", ACME_A + "renew_before = 'a month'\n", "acme.renew_before", '"30d"'),
    ("bad email", ACME_A + "email = 'admin'\n", "acme.email", "e-mail address"),
    ("unknown key", ACME_A + "renew_befor = '30d'\n", "acme.renew_befor", "renew_before"),
    ("[acme] but no listener uses it", PLAIN + "[acme]\ndomains = ['a.example']\n"
     "state_dir = '{tmp}'\n", "acme", "no listener has tls.acme = true"),
    ("cert without key", PLAIN + ACME_TLS + "cert = '{file}'\n[acme]\ndomains = ['a.example']"
     "\nstate_dir = '{tmp}'\n", "listeners[1].tls.key", "required with"),
]


@pytest.mark.parametrize(("text", "path", "message"), [r[1:] for r in BAD_ACME],
                         ids=[r[0] for r in BAD_ACME])
def test_bad_acme_config_names_its_key_path(tmp_path: pathlib.Path, text: str, path: str,
                                            message: str) -> None:
    (tmp_path / "file").write_text("not a certificate\n")
    errors = errors_of(text.format(tmp=tmp_path, file=tmp_path / "file"))
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{path}: "), errors
    assert message in errors[0][len(path) + 2:], errors


ACME_EXAMPLE = EXAMPLE.with_name("config.acme.example.toml")


def test_acme_example_loads(tmp_path: pathlib.Path) -> None:
    text = ACME_EXAMPLE.read_text(encoding="utf-8")
    assert '"/var/lib/palpo-gate/acme"' in text
    cfg = loads(text.replace('"/var/lib/palpo-gate/acme"', f'"{tmp_path}/acme"'),
                str(ACME_EXAMPLE))
    assert cfg.acme is not None and cfg.acme.domains
    assert [(str(lst.bind), lst.tls is not None and lst.tls.acme) for lst in cfg.listeners] == [
        ("0.0.0.0:80", False), ("0.0.0.0:443", True), ("0.0.0.0:8448", True)]
    _round_trip(cfg)
